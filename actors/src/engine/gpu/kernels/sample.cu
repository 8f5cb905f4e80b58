// Next-token selection on the device, one block of 1024 threads per logits row, each thread holding
// VOCAB_PER_THREAD logits in registers (element i = k * 1024 + thread).
//
// params: SAMPLE_PARAMS ints per row:
//   0 temperature (f32 bits; <= 0 means greedy)   1 top_p (f32 bits; >= 1 off)
//   2 min_p (f32 bits; <= 0 off)                   3 top_k (<= 0 off)
//   4 seed low 32 bits    5 seed high 32 bits      6 step (tokens generated so far)
//   7 offset of the row's banned ids in `banned`   8 how many
// out_tok[r] = the token; out_logprob[r] = its log-probability under the raw logits (before the
// temperature), as vLLM reports by default.
#define SAMPLE_PARAMS 9
#define SAMPLE_THREADS 1024
#define BISECT_STEPS 30

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Sum over the block of e^x for kept x >= theta.
__device__ __forceinline__ float kept_mass(const float* x, float theta, float* scratch) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < VOCAB_PER_THREAD; k++) s += x[k] >= theta ? __expf(x[k]) : 0.0f;
    return block_sum(s, scratch);
}

__device__ __forceinline__ float kept_count(const float* x, float theta, float* scratch) {
    float c = 0.0f;
#pragma unroll
    for (int k = 0; k < VOCAB_PER_THREAD; k++) c += x[k] >= theta ? 1.0f : 0.0f;
    return block_sum(c, scratch);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample(
    float* logits, int vocab, const int* params, const int* banned, int* out_tok, float* out_logprob) {
    __shared__ float scratch[32];
    __shared__ float prefix[SAMPLE_THREADS];
    __shared__ int chosen;
    int r = blockIdx.x, tid = threadIdx.x;
    const int* pr = params + r * SAMPLE_PARAMS;
    float* row = logits + (long long)r * vocab;
    float temperature = __int_as_float(pr[0]);
    float top_p = __int_as_float(pr[1]);
    float min_p = __int_as_float(pr[2]);
    int top_k = pr[3];
    unsigned long long seed = ((unsigned long long)(unsigned)pr[5] << 32) | (unsigned)pr[4];
    unsigned step = (unsigned)pr[6];
    // Banned ids (stop tokens before min_tokens) never win.
    for (int b = tid; b < pr[8]; b += blockDim.x) {
        int id = banned[pr[7] + b];
        if (id >= 0 && id < vocab) row[id] = NEG_INF;
    }
    if (tid == 0) chosen = -1;
    __syncthreads();
    float x[VOCAB_PER_THREAD];
    float best = NEG_INF;
    int best_i = 0x7fffffff;
#pragma unroll
    for (int k = 0; k < VOCAB_PER_THREAD; k++) {
        int i = k * SAMPLE_THREADS + tid;
        x[k] = i < vocab ? row[i] : NEG_INF;
        if (x[k] > best) {
            best = x[k];
            best_i = i;
        }
    }
    float m = block_max(best, scratch);
    float z = 0.0f;
#pragma unroll
    for (int k = 0; k < VOCAB_PER_THREAD; k++) z += __expf(x[k] - m);
    float lse = m + __logf(block_sum(z, scratch));
    if (!(temperature > 0.0f) || top_k == 1) {
        // Greedy: the lowest index among the maxima.
        if (tid == 0) chosen = 0x7fffffff;
        __syncthreads();
        if (best == m) atomicMin(&chosen, best_i);
        __syncthreads();
    } else {
        // x <- (x - m) / T: the largest is 0, probabilities are e^x / mass.
#pragma unroll
        for (int k = 0; k < VOCAB_PER_THREAD; k++) x[k] = (x[k] - m) / temperature;
        float theta = -1e30f;
        if (min_p > 0.0f) theta = __logf(min_p);
        if (top_k > 0 && top_k < vocab) {
            // Largest threshold keeping at least top_k tokens.
            float lo = -88.0f, hi = 0.0f;
            if (kept_count(x, lo, scratch) >= (float)top_k) {
                for (int s = 0; s < BISECT_STEPS; s++) {
                    float mid = 0.5f * (lo + hi);
                    if (kept_count(x, mid, scratch) >= (float)top_k) lo = mid; else hi = mid;
                }
                theta = fmaxf(theta, lo);
            }
        }
        if (top_p > 0.0f && top_p < 1.0f) {
            // Largest threshold keeping at least top_p of the mass left after top_k and min_p.
            float base = kept_mass(x, theta, scratch);
            float lo = fmaxf(theta, -88.0f), hi = 0.0f;
            if (kept_mass(x, lo, scratch) >= top_p * base) {
                for (int s = 0; s < BISECT_STEPS; s++) {
                    float mid = 0.5f * (lo + hi);
                    if (kept_mass(x, mid, scratch) >= top_p * base) lo = mid; else hi = mid;
                }
                theta = fmaxf(theta, lo);
            }
        }
        // Each thread's kept mass, an exclusive scan over threads, then the thread whose range holds
        // the draw walks its own elements.
        float mine = 0.0f;
#pragma unroll
        for (int k = 0; k < VOCAB_PER_THREAD; k++) mine += x[k] >= theta ? __expf(x[k]) : 0.0f;
        prefix[tid] = mine;
        __syncthreads();
        for (int o = 1; o < SAMPLE_THREADS; o <<= 1) {
            float add = tid >= o ? prefix[tid - o] : 0.0f;
            __syncthreads();
            prefix[tid] += add;
            __syncthreads();
        }
        float total = prefix[SAMPLE_THREADS - 1];
        float before = prefix[tid] - mine;
        unsigned long long bits = splitmix64(seed ^ splitmix64((unsigned long long)step + 1ull));
        float u = (float)(bits >> 40) * (1.0f / 16777216.0f) * total;
        if (mine > 0.0f && u >= before && u < before + mine) {
            float acc = before;
            int pick = -1;
#pragma unroll
            for (int k = 0; k < VOCAB_PER_THREAD; k++) {
                if (x[k] >= theta) {
                    acc += __expf(x[k]);
                    if (pick < 0 && u < acc) pick = k * SAMPLE_THREADS + tid;
                }
            }
            if (pick < 0) {
                // Rounding put the draw past this thread's last kept element: take that one.
#pragma unroll
                for (int k = 0; k < VOCAB_PER_THREAD; k++) if (x[k] >= theta) pick = k * SAMPLE_THREADS + tid;
            }
            atomicMax(&chosen, pick);
        }
        __syncthreads();
        if (chosen < 0) {
            // The draw fell past the total by rounding: the most likely token.
            __syncthreads();
            if (tid == 0) chosen = 0x7fffffff;
            __syncthreads();
            if (best == m) atomicMin(&chosen, best_i);
            __syncthreads();
        }
    }
    if (tid == 0) {
        // No candidate at all (every logit NaN or banned): token 0, reported as impossible, rather
        // than an index past the row.
        int tok = chosen >= 0 && chosen < vocab ? chosen : 0;
        out_tok[r] = tok;
        out_logprob[r] = chosen >= 0 && chosen < vocab ? row[tok] - lse : NEG_INF;
    }
}
