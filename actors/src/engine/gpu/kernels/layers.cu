// The per-token ops of a llama block that are not matrix products (those run through cuBLAS).
// Activations between ops: the residual stream `x` in f32 [T, hidden]; GEMM inputs in bf16.

// x[t] = embedding row ids[t] (bf16 table -> f32). Grid: T blocks.
extern "C" __global__ void embed(const bf16* table, const int* ids, float* x, int hidden) {
    int t = blockIdx.x;
    const bf16* row = table + (long long)ids[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[(long long)t * hidden + i] = bf2f(row[i]);
}

// out[r] = bf16(x[row] / sqrt(mean(x[row]^2) + eps) * w), row = rows ? rows[r] : r. Grid: R blocks.
extern "C" __global__ void rms_norm(const float* x, const float* w, bf16* out, const int* rows,
                                    int hidden, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    int row = rows ? rows[r] : r;
    const float* xr = x + (long long)row * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(long long)r * hidden + i] = f2bf(xr[i] * inv * w[i]);
}

// RoPE on the query and key parts of qkv rows [T, (heads + 2 * KV_HEADS) * HEAD_DIM] (f32, in
// place for the queries), rotating adjacent pairs as GGUF's llama layout expects; then the rotated
// key and the value go into the paged caches at slot slots[t] (bf16, [slot, KV_HEADS, HEAD_DIM]).
// Grid: T blocks.
extern "C" __global__ void rope_kv(float* qkv, bf16* k_cache, bf16* v_cache, const int* pos,
                                   const int* slots, const float* cos_t, const float* sin_t,
                                   int heads) {
    int t = blockIdx.x;
    const int half = HEAD_DIM / 2;
    const int kvw = KV_HEADS * HEAD_DIM;
    int width = heads * HEAD_DIM + 2 * kvw;
    float* row = qkv + (long long)t * width;
    const float* c = cos_t + (long long)pos[t] * half;
    const float* s = sin_t + (long long)pos[t] * half;
    long long slot = slots[t];
    int q_pairs = heads * half, k_pairs = KV_HEADS * half;
    for (int p = threadIdx.x; p < q_pairs + k_pairs; p += blockDim.x) {
        bool is_q = p < q_pairs;
        int pp = is_q ? p : p - q_pairs;
        int i = pp % half;
        float* v = row + (is_q ? 0 : heads * HEAD_DIM) + 2 * pp;
        float a = v[0], b = v[1];
        float ra = a * c[i] - b * s[i];
        float rb = a * s[i] + b * c[i];
        if (is_q) {
            v[0] = ra;
            v[1] = rb;
        } else {
            bf16* dst = k_cache + slot * kvw + 2 * pp;
            dst[0] = f2bf(ra);
            dst[1] = f2bf(rb);
        }
    }
    const float* vsrc = row + heads * HEAD_DIM + kvw;
    for (int i = threadIdx.x; i < kvw; i += blockDim.x) v_cache[slot * kvw + i] = f2bf(vsrc[i]);
}

// Paged causal attention with grouped queries. Query token t (row of qkv) at position pos[t] of
// sequence seq[t] attends over positions 0..=pos[t] of that sequence, whose KV lives in blocks
// block_tables[seq[t] * max_blocks + j] of `block_size` slots.
//
// `fused` (decode steps, where no sequence has two tokens in the step): the queries and the token's
// own key are rotated here, and the block whose partition holds position pos[t] writes the rotated
// key and the value into slot slots[t] first; rope_kv does not run. Otherwise rope_kv has already
// rotated the queries in place and written every token's key and value.
//
// Grid: (T, KV_HEADS, P). Token t's keys are split into P partitions of ceil((pos[t] + 1) / P)
// positions (the last ones may be empty); each block handles one partition for the GROUP query
// heads sharing one KV head. With P == 1 it writes the normalised output (bf16 [T, heads *
// HEAD_DIM]); otherwise it writes its partial softmax state to `partials`, and the last of the P
// blocks of (t, KV head) to finish (counted in `counters`, which it resets to 0) combines them.
// Block: 256 threads = 8 warps; within a warp, LANES_PER_KEY lanes read one key (8 bf16 = 16 bytes
// each), so a warp reads 32 / LANES_PER_KEY keys at once.
#define LANES_PER_KEY (HEAD_DIM / 8)
#define KEYS_PER_WARP (32 / LANES_PER_KEY)
#define ATT_WARPS 8
#define ATT_GROUPS (ATT_WARPS * KEYS_PER_WARP)
#define PARTIAL_WIDTH (HEAD_DIM + 2)

__device__ __forceinline__ void load8(const bf16* p, float* out) {
    uint4 raw = *(const uint4*)p;
    unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

extern "C" __global__ void __launch_bounds__(256) attention(
    const float* qkv, bf16* k_cache, bf16* v_cache, const int* seq, const int* pos,
    const int* block_tables, int max_blocks, int block_size, int heads, float scale, bf16* out,
    float* partials, int* counters, int fused, const int* slots, const float* cos_t,
    const float* sin_t) {
    __shared__ float s_m[ATT_GROUPS][GROUP];
    __shared__ float s_l[ATT_GROUPS][GROUP];
    __shared__ float s_acc[ATT_GROUPS][GROUP][HEAD_DIM];
    __shared__ int s_last;
    int t = blockIdx.x, kvh = blockIdx.y, p = blockIdx.z, P = gridDim.z;
    int ctx = pos[t] + 1;
    // Each token splits its own context into P parts, so a step's launch depends on P alone (what
    // lets a captured graph replay it at any context length).
    int part = (ctx + P - 1) / P;
    int begin = p * part;
    int end = min(begin + part, ctx);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int sub = lane % LANES_PER_KEY;
    int group = warp * KEYS_PER_WARP + lane / LANES_PER_KEY;
    const int kvw = KV_HEADS * HEAD_DIM;
    const int half = HEAD_DIM / 2;
    int width = heads * HEAD_DIM + 2 * kvw;
    const float* qrow = qkv + (long long)t * width;
    const float* cs = cos_t + (long long)(ctx - 1) * half;
    const float* sn = sin_t + (long long)(ctx - 1) * half;
    if (fused && begin <= ctx - 1 && ctx - 1 < end) {
        // This block's partition holds the token itself: its key and value go into the cache first.
        const float* krow = qrow + heads * HEAD_DIM + kvh * HEAD_DIM;
        const float* vrow = krow + kvw;
        long long dst = (long long)slots[t] * kvw + kvh * HEAD_DIM;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float a = krow[2 * i], b = krow[2 * i + 1];
            k_cache[dst + 2 * i] = f2bf(a * cs[i] - b * sn[i]);
            k_cache[dst + 2 * i + 1] = f2bf(a * sn[i] + b * cs[i]);
        }
        for (int i = threadIdx.x; i < HEAD_DIM; i += blockDim.x) v_cache[dst + i] = f2bf(vrow[i]);
        __syncthreads();
    }
    float q[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        const float* qh = qrow + (kvh * GROUP + g) * HEAD_DIM + sub * 8;
        if (fused) {
#pragma unroll
            for (int m = 0; m < 4; m++) {
                float a = qh[2 * m], b = qh[2 * m + 1];
                int i = sub * 4 + m;
                q[g][2 * m] = (a * cs[i] - b * sn[i]) * scale;
                q[g][2 * m + 1] = (a * sn[i] + b * cs[i]) * scale;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) q[g][i] = qh[i] * scale;
        }
    }
    float m[GROUP], l[GROUP], acc[GROUP][8];
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[g][i] = 0.0f;
    }
    const int* table = block_tables + (long long)seq[t] * max_blocks;
    // The trip count is uniform within a warp (shuffles need every lane); lanes past the end load
    // nothing and keep their state.
    for (int j0 = begin + warp * KEYS_PER_WARP; j0 < end; j0 += ATT_GROUPS) {
        int j = j0 + lane / LANES_PER_KEY;
        bool valid = j < end;
        float k[8], v[8];
        if (valid) {
            long long slot = (long long)table[j / block_size] * block_size + (j % block_size);
            long long off = slot * kvw + kvh * HEAD_DIM + sub * 8;
            load8(k_cache + off, k);
            load8(v_cache + off, v);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) k[i] = v[i] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < GROUP; g++) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) d += q[g][i] * k[i];
#pragma unroll
            for (int o = LANES_PER_KEY / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
            if (valid) {
                float m_new = fmaxf(m[g], d);
                float correction = __expf(m[g] - m_new);
                float w = __expf(d - m_new);
                l[g] = l[g] * correction + w;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * correction + w * v[i];
                m[g] = m_new;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < GROUP; g++) {
        if (sub == 0) {
            s_m[group][g] = m[g];
            s_l[group][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < 8; i++) s_acc[group][g][sub * 8 + i] = acc[g][i];
    }
    __syncthreads();
    float* mine = partials + ((long long)(t * KV_HEADS + kvh) * P * GROUP) * PARTIAL_WIDTH;
    const long long stride = (long long)GROUP * PARTIAL_WIDTH;
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += blockDim.x) {
        int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float M = NEG_INF;
        for (int k = 0; k < ATT_GROUPS; k++) M = fmaxf(M, s_m[k][g]);
        float L = 0.0f, A = 0.0f;
        if (M != NEG_INF) {
            for (int k = 0; k < ATT_GROUPS; k++) {
                float w = __expf(s_m[k][g] - M);
                L += s_l[k][g] * w;
                A += s_acc[k][g][d] * w;
            }
        }
        int head = kvh * GROUP + g;
        if (P == 1) {
            out[(long long)t * heads * HEAD_DIM + head * HEAD_DIM + d] = f2bf(L > 0.0f ? A / L : 0.0f);
        } else {
            float* dst = mine + p * stride + g * PARTIAL_WIDTH;
            dst[2 + d] = A;
            if (d == 0) {
                dst[0] = M;
                dst[1] = L;
            }
        }
    }
    if (P == 1) return;
    // The last of the P blocks of (t, kvh) to get here combines the partitions.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* counter = counters + t * KV_HEADS + kvh;
        s_last = atomicAdd(counter, 1) == P - 1;
        if (s_last) *counter = 0;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int idx = threadIdx.x; idx < GROUP * HEAD_DIM; idx += blockDim.x) {
        int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
        const float* base = mine + g * PARTIAL_WIDTH;
        float M = NEG_INF;
        for (int k = 0; k < P; k++) M = fmaxf(M, __ldcg(base + k * stride));
        float L = 0.0f, A = 0.0f;
        for (int k = 0; k < P; k++) {
            float mk = __ldcg(base + k * stride);
            if (mk == NEG_INF) continue;
            float w = __expf(mk - M);
            L += __ldcg(base + k * stride + 1) * w;
            A += __ldcg(base + k * stride + 2 + d) * w;
        }
        int head = kvh * GROUP + g;
        out[(long long)t * heads * HEAD_DIM + head * HEAD_DIM + d] = f2bf(L > 0.0f ? A / L : 0.0f);
    }
}

// out[t, i] = bf16(silu(gate) * up) from gate_up rows [T, 2 * ffn] (gate first).
// Grid: (T, ceil(ffn / blockDim)).
extern "C" __global__ void silu_mul(const float* gate_up, bf16* out, int ffn) {
    int t = blockIdx.x;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const float* row = gate_up + (long long)t * 2 * ffn;
    float g = row[i];
    out[(long long)t * ffn + i] = f2bf(g / (1.0f + __expf(-g)) * row[ffn + i]);
}
