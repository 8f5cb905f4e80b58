// Runs the GPU engine's kernels (the .cu sources themselves) on the CPU through emu.h and checks each
// against a plain reference: GGUF dequantization, RMSNorm, RoPE + paged KV write, paged attention
// (whole and partitioned + combined, and with RoPE fused for decode), SiLU·up, and sampling. See
// run.sh.
#include "emu.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>

#include "common.cuh"
#include "weights.cu"
#include "layers.cu"
#include "sample.cu"

static int failures = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            std::printf(__VA_ARGS__);                      \
            std::printf("\n");                             \
            failures++;                                    \
        }                                                  \
    } while (0)

static std::mt19937 rng(42);
static float uniform(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

static unsigned short to_half(float f) {
    // Round-to-nearest f32 -> f16 for normal values in range (enough for scales).
    unsigned u; std::memcpy(&u, &f, 4);
    unsigned sign = (u >> 16) & 0x8000;
    int exp = (int)((u >> 23) & 0xff) - 127 + 15;
    unsigned man = u & 0x7fffff;
    if (exp <= 0) return (unsigned short)sign;
    unsigned h = sign | (exp << 10) | (man >> 13);
    if (man & 0x1000) h++;
    return (unsigned short)h;
}
static float bf(bf16 v) { return bf2f(v); }
static bool close(float a, float b, float rel, float abs_) { return std::fabs(a - b) <= abs_ + rel * std::fabs(b); }

static void check_dequant() {
    const int blocks = 7, n = blocks * 32;
    // Q8_0
    std::vector<unsigned char> q8(blocks * 34);
    std::vector<float> ref(n);
    for (int b = 0; b < blocks; b++) {
        unsigned short d = to_half(uniform(0.001f, 0.1f));
        std::memcpy(&q8[b * 34], &d, 2);
        for (int j = 0; j < 32; j++) {
            signed char q = (signed char)(int)uniform(-127, 127);
            q8[b * 34 + 2 + j] = (unsigned char)q;
            ref[b * 32 + j] = emu_half_to_float(d) * q;
        }
    }
    std::vector<bf16> out(n);
    emu_launch(dequant_q8_0, {1, 1, 1}, 256, q8.data(), out.data(), (long long)n);
    for (int i = 0; i < n; i++) CHECK(close(bf(out[i]), ref[i], 0.01f, 1e-6f), "q8_0[%d] %f vs %f", i, bf(out[i]), ref[i]);
    // Q4_0 and Q4_1: value j < 16 is byte j's low nibble, j >= 16 byte j-16's high nibble.
    std::vector<unsigned char> q40(blocks * 18), q41(blocks * 20);
    std::vector<float> ref0(n), ref1(n);
    for (int b = 0; b < blocks; b++) {
        unsigned short d = to_half(uniform(0.001f, 0.1f)), m = to_half(uniform(-0.1f, 0.1f));
        std::memcpy(&q40[b * 18], &d, 2);
        std::memcpy(&q41[b * 20], &d, 2);
        std::memcpy(&q41[b * 20 + 2], &m, 2);
        for (int j = 0; j < 16; j++) {
            unsigned char byte = (unsigned char)(rng() & 0xff);
            q40[b * 18 + 2 + j] = byte;
            q41[b * 20 + 4 + j] = byte;
            float dd = emu_half_to_float(d), mm = emu_half_to_float(m);
            ref0[b * 32 + j] = ((byte & 15) - 8) * dd;
            ref0[b * 32 + j + 16] = ((byte >> 4) - 8) * dd;
            ref1[b * 32 + j] = (byte & 15) * dd + mm;
            ref1[b * 32 + j + 16] = (byte >> 4) * dd + mm;
        }
    }
    emu_launch(dequant_q4_0, {1, 1, 1}, 256, q40.data(), out.data(), (long long)n);
    for (int i = 0; i < n; i++) CHECK(close(bf(out[i]), ref0[i], 0.01f, 1e-6f), "q4_0[%d] %f vs %f", i, bf(out[i]), ref0[i]);
    emu_launch(dequant_q4_1, {1, 1, 1}, 256, q41.data(), out.data(), (long long)n);
    for (int i = 0; i < n; i++) CHECK(close(bf(out[i]), ref1[i], 0.01f, 1e-6f), "q4_1[%d] %f vs %f", i, bf(out[i]), ref1[i]);
    std::printf("dequantization: checked\n");
}

static void check_norm_and_silu() {
    const int T = 3, H = 576, F = 600;
    std::vector<float> x(T * H), w(H);
    for (auto& v : x) v = uniform(-2, 2);
    for (auto& v : w) v = uniform(0.5f, 1.5f);
    std::vector<bf16> out(2 * H);
    int rows[2] = {2, 0};
    emu_launch(rms_norm, {2, 1, 1}, 256, (const float*)x.data(), (const float*)w.data(), out.data(), (const int*)rows, H, 1e-5f);
    for (int r = 0; r < 2; r++) {
        const float* xr = &x[rows[r] * H];
        double ss = 0;
        for (int i = 0; i < H; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / std::sqrt((float)(ss / H) + 1e-5f);
        for (int i = 0; i < H; i++) CHECK(close(bf(out[r * H + i]), xr[i] * inv * w[i], 0.01f, 1e-4f), "rms_norm row %d[%d]", r, i);
    }
    std::vector<float> gu(T * 2 * F);
    for (auto& v : gu) v = uniform(-4, 4);
    std::vector<bf16> act(T * F);
    emu_launch(silu_mul, {T, (F + 255) / 256, 1}, 256, (const float*)gu.data(), act.data(), F);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < F; i++) {
            float g = gu[t * 2 * F + i], u = gu[t * 2 * F + F + i];
            CHECK(close(bf(act[t * F + i]), g / (1 + std::exp(-g)) * u, 0.01f, 1e-4f), "silu_mul[%d,%d]", t, i);
        }
    std::printf("rms_norm, silu_mul: checked\n");
}

const int HEADS = GROUP * KV_HEADS, KVW = KV_HEADS * HEAD_DIM, WIDTH = HEADS * HEAD_DIM + 2 * KVW;

// RoPE tables [ctx, HEAD_DIM / 2] with base 10000, as the engine builds them.
static void rope_tables(int ctx, std::vector<float>& cos_t, std::vector<float>& sin_t) {
    const int half = HEAD_DIM / 2;
    cos_t.assign(ctx * half, 0.0f);
    sin_t.assign(ctx * half, 0.0f);
    for (int p = 0; p < ctx; p++)
        for (int i = 0; i < half; i++) {
            float a = p * std::pow(10000.0f, -2.0f * i / HEAD_DIM);
            cos_t[p * half + i] = std::cos(a);
            sin_t[p * half + i] = std::sin(a);
        }
}

static void check_rope_kv() {
    const int T = 4, CTX = 64, half = HEAD_DIM / 2, slots_total = 200;
    std::vector<float> cos_t, sin_t;
    rope_tables(CTX, cos_t, sin_t);
    std::vector<float> qkv(T * WIDTH);
    for (auto& v : qkv) v = uniform(-1, 1);
    auto orig = qkv;
    int pos[T] = {0, 5, 63, 17}, slots[T] = {3, 150, 77, 0};
    std::vector<bf16> kc(slots_total * KVW), vc(slots_total * KVW);
    emu_launch(rope_kv, {T, 1, 1}, 128, qkv.data(), kc.data(), vc.data(), (const int*)pos, (const int*)slots,
               (const float*)cos_t.data(), (const float*)sin_t.data(), HEADS);
    for (int t = 0; t < T; t++) {
        const float* c = &cos_t[pos[t] * half];
        const float* s = &sin_t[pos[t] * half];
        for (int h = 0; h < HEADS + KV_HEADS; h++)
            for (int i = 0; i < half; i++) {
                float a = orig[t * WIDTH + h * HEAD_DIM + 2 * i], b = orig[t * WIDTH + h * HEAD_DIM + 2 * i + 1];
                float ra = a * c[i] - b * s[i], rb = a * s[i] + b * c[i];
                if (h < HEADS) {
                    CHECK(close(qkv[t * WIDTH + h * HEAD_DIM + 2 * i], ra, 1e-5f, 1e-6f), "rope q t%d h%d i%d", t, h, i);
                    CHECK(close(qkv[t * WIDTH + h * HEAD_DIM + 2 * i + 1], rb, 1e-5f, 1e-6f), "rope q t%d h%d i%d", t, h, i);
                } else {
                    int kh = h - HEADS;
                    CHECK(close(bf(kc[slots[t] * KVW + kh * HEAD_DIM + 2 * i]), ra, 0.01f, 1e-3f), "rope k t%d h%d i%d", t, kh, i);
                    CHECK(close(bf(kc[slots[t] * KVW + kh * HEAD_DIM + 2 * i + 1]), rb, 0.01f, 1e-3f), "rope k t%d h%d i%d", t, kh, i);
                }
            }
        for (int i = 0; i < KVW; i++)
            CHECK(close(bf(vc[slots[t] * KVW + i]), orig[t * WIDTH + HEADS * HEAD_DIM + KVW + i], 0.01f, 1e-3f), "v t%d i%d", t, i);
    }
    std::printf("rope_kv: checked\n");
}

static void check_attention() {
    const int BS = 16, MAXB = 16, NBLOCKS = 64;
    // Three sequences: a 5-token prefill chunk, one decode token at position 36, and a 3-token chunk
    // ending at position 129.
    struct Tok { int seq, pos; };
    std::vector<Tok> toks = {{0, 0}, {0, 1}, {0, 2}, {0, 3}, {0, 4}, {1, 36}, {2, 127}, {2, 128}, {2, 129}};
    const int T = (int)toks.size();
    std::vector<int> perm(NBLOCKS);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int> tables(3 * MAXB);
    for (int i = 0; i < 3 * MAXB; i++) tables[i] = perm[i % NBLOCKS];
    std::vector<bf16> kc(NBLOCKS * BS * KVW), vc(NBLOCKS * BS * KVW);
    for (auto& v : kc) v = f2bf(uniform(-1, 1));
    for (auto& v : vc) v = f2bf(uniform(-1, 1));
    std::vector<float> qkv(T * WIDTH);
    for (auto& v : qkv) v = uniform(-1, 1);
    std::vector<int> seq(T), pos(T);
    for (int t = 0; t < T; t++) seq[t] = toks[t].seq, pos[t] = toks[t].pos;
    float scale = 1.0f / std::sqrt((float)HEAD_DIM);
    // Reference.
    std::vector<float> ref(T * HEADS * HEAD_DIM);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < HEADS; h++) {
            int kvh = h / GROUP, ctx = pos[t] + 1;
            std::vector<double> sc(ctx);
            double mx = -1e30;
            for (int j = 0; j < ctx; j++) {
                int slot = tables[seq[t] * MAXB + j / BS] * BS + j % BS;
                double d = 0;
                for (int i = 0; i < HEAD_DIM; i++) d += qkv[t * WIDTH + h * HEAD_DIM + i] * bf(kc[slot * KVW + kvh * HEAD_DIM + i]);
                sc[j] = d * scale;
                mx = std::max(mx, sc[j]);
            }
            double sum = 0;
            for (auto& s : sc) sum += (s = std::exp(s - mx));
            for (int i = 0; i < HEAD_DIM; i++) {
                double a = 0;
                for (int j = 0; j < ctx; j++) {
                    int slot = tables[seq[t] * MAXB + j / BS] * BS + j % BS;
                    a += sc[j] * bf(vc[slot * KVW + kvh * HEAD_DIM + i]);
                }
                ref[(t * HEADS + h) * HEAD_DIM + i] = (float)(a / sum);
            }
        }
    // Each token splits its own context into P parts; with P = 40 most partitions of the prefill
    // tokens are empty. With P > 1 the last block of each (token, KV head) combines.
    std::vector<int> counters(T * KV_HEADS, 0);
    for (int P : {1, 4, 9, 40}) {
        std::vector<bf16> out(T * HEADS * HEAD_DIM, 0);
        std::vector<float> partials((size_t)T * KV_HEADS * P * GROUP * (HEAD_DIM + 2));
        emu_launch(attention, {(unsigned)T, KV_HEADS, (unsigned)P}, 256, (const float*)qkv.data(), kc.data(),
                   vc.data(), (const int*)seq.data(), (const int*)pos.data(), (const int*)tables.data(), MAXB, BS,
                   HEADS, scale, out.data(), partials.data(), counters.data(), 0, (const int*)nullptr,
                   (const float*)nullptr, (const float*)nullptr);
        for (int c : counters) CHECK(c == 0, "attention P=%d left a counter at %d", P, c);
        int bad = 0;
        for (size_t i = 0; i < out.size(); i++)
            if (!close(bf(out[i]), ref[i], 0.02f, 2e-3f)) {
                if (bad++ < 5) std::printf("  attention P=%d [%zu]: %f vs %f\n", P, i, bf(out[i]), ref[i]);
            }
        CHECK(bad == 0, "attention with %d partition(s): %d of %zu values differ", P, bad, out.size());
    }
    std::printf("attention (1, 4, 9 and 40 partitions): checked\n");
}

// Decode steps: attention rotates the queries and the token's key itself and writes the key and value
// into the cache; the same as rope_kv followed by attention.
static void check_fused_attention() {
    const int BS = 16, MAXB = 16, NBLOCKS = 64, CTX = 256, half = HEAD_DIM / 2;
    std::vector<float> cos_t, sin_t;
    rope_tables(CTX, cos_t, sin_t);
    // Three sequences, one token each: positions 0, 36 and 129.
    const int T = 3;
    std::vector<int> seq = {0, 1, 2}, pos = {0, 36, 129};
    std::vector<int> perm(NBLOCKS);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<int> tables(T * MAXB), slots(T);
    for (int i = 0; i < T * MAXB; i++) tables[i] = perm[i % NBLOCKS];
    for (int t = 0; t < T; t++) slots[t] = tables[t * MAXB + pos[t] / BS] * BS + pos[t] % BS;
    std::vector<bf16> kc(NBLOCKS * BS * KVW), vc(NBLOCKS * BS * KVW);
    for (auto& v : kc) v = f2bf(uniform(-1, 1));
    for (auto& v : vc) v = f2bf(uniform(-1, 1));
    std::vector<float> qkv(T * WIDTH);
    for (auto& v : qkv) v = uniform(-1, 1);
    float scale = 1.0f / std::sqrt((float)HEAD_DIM);
    // Reference: rope_kv, then attention as prefill runs it.
    auto ref_qkv = qkv;
    auto ref_kc = kc, ref_vc = vc;
    emu_launch(rope_kv, {T, 1, 1}, 128, ref_qkv.data(), ref_kc.data(), ref_vc.data(), (const int*)pos.data(),
               (const int*)slots.data(), (const float*)cos_t.data(), (const float*)sin_t.data(), HEADS);
    std::vector<int> counters(T * KV_HEADS, 0);
    for (int P : {1, 5}) {
        std::vector<bf16> ref(T * HEADS * HEAD_DIM, 0), out(T * HEADS * HEAD_DIM, 0);
        std::vector<float> partials((size_t)T * KV_HEADS * P * GROUP * (HEAD_DIM + 2));
        emu_launch(attention, {(unsigned)T, KV_HEADS, (unsigned)P}, 256, (const float*)ref_qkv.data(), ref_kc.data(),
                   ref_vc.data(), (const int*)seq.data(), (const int*)pos.data(), (const int*)tables.data(), MAXB, BS,
                   HEADS, scale, ref.data(), partials.data(), counters.data(), 0, (const int*)nullptr,
                   (const float*)nullptr, (const float*)nullptr);
        auto fkc = kc, fvc = vc;
        emu_launch(attention, {(unsigned)T, KV_HEADS, (unsigned)P}, 256, (const float*)qkv.data(), fkc.data(),
                   fvc.data(), (const int*)seq.data(), (const int*)pos.data(), (const int*)tables.data(), MAXB, BS,
                   HEADS, scale, out.data(), partials.data(), counters.data(), 1, (const int*)slots.data(),
                   (const float*)cos_t.data(), (const float*)sin_t.data());
        int bad = 0;
        for (size_t i = 0; i < out.size(); i++)
            if (!close(bf(out[i]), bf(ref[i]), 0.01f, 1e-3f)) {
                if (bad++ < 5) std::printf("  fused attention P=%d [%zu]: %f vs %f\n", P, i, bf(out[i]), bf(ref[i]));
            }
        CHECK(bad == 0, "fused attention with %d partition(s): %d of %zu values differ", P, bad, out.size());
        for (int t = 0; t < T; t++)
            for (int i = 0; i < KVW; i++) {
                size_t at = (size_t)slots[t] * KVW + i;
                CHECK(close(bf(fkc[at]), bf(ref_kc[at]), 1e-3f, 1e-4f), "fused key t%d[%d]", t, i);
                CHECK(bf(fvc[at]) == bf(ref_vc[at]), "fused value t%d[%d]", t, i);
            }
        CHECK(fkc.size() == ref_kc.size(), "cache size");
    }
    std::printf("attention with RoPE and the KV write fused (decode): checked\n");
}

static void check_sample() {
    const int V = 3000;
    static_assert(VOCAB_PER_THREAD * 1024 >= 3000, "VOCAB_PER_THREAD");
    const int R = 8;
    std::vector<float> base(V);
    for (auto& v : base) v = uniform(-5, 5);
    base[1234] = 9.0f;  // clear argmax
    base[77] = 8.5f;    // runner-up
    base[2999] = 8.0f;
    std::vector<float> logits;
    for (int r = 0; r < R; r++) logits.insert(logits.end(), base.begin(), base.end());
    auto bits = [](float f) { return __float_as_int(f); };
    // rows: 0 greedy; 1 greedy with the argmax banned; 2 top_k=1 at T=1; 3 top_p tiny; 4 min_p 0.99;
    // 5..7 T=1 top_k=3 with different seeds.
    std::vector<int> params(R * SAMPLE_PARAMS, 0);
    auto set = [&](int r, float t, float p, float mp, int k, unsigned long long seed, int boff, int blen) {
        int* q = &params[r * SAMPLE_PARAMS];
        q[0] = bits(t); q[1] = bits(p); q[2] = bits(mp); q[3] = k;
        q[4] = (int)(unsigned)seed; q[5] = (int)(unsigned)(seed >> 32); q[6] = 3; q[7] = boff; q[8] = blen;
    };
    set(0, 0.0f, 1.0f, 0.0f, 0, 1, 0, 0);
    set(1, 0.0f, 1.0f, 0.0f, 0, 1, 0, 1);
    set(2, 1.0f, 1.0f, 0.0f, 1, 1, 0, 0);
    set(3, 1.0f, 1e-6f, 0.0f, 0, 1, 0, 0);
    set(4, 1.0f, 1.0f, 0.99f, 0, 1, 0, 0);
    for (int r = 5; r < 8; r++) set(r, 1.0f, 1.0f, 0.0f, 3, 1000 + r, 0, 0);
    int banned[1] = {1234};
    std::vector<int> tok(R);
    std::vector<float> lp(R);
    emu_launch(sample, {R, 1, 1}, 1024, logits.data(), V, (const int*)params.data(), (const int*)banned, tok.data(), lp.data());
    double mx = 9.0, sum = 0;
    for (float v : base) sum += std::exp(v - mx);
    double lse = mx + std::log(sum);
    CHECK(tok[0] == 1234, "greedy picked %d", tok[0]);
    CHECK(close(lp[0], (float)(9.0 - lse), 1e-4f, 1e-4f), "greedy logprob %f vs %f", lp[0], (float)(9.0 - lse));
    CHECK(tok[1] == 77, "greedy with the argmax banned picked %d", tok[1]);
    CHECK(tok[2] == 1234, "top_k=1 picked %d", tok[2]);
    CHECK(tok[3] == 1234, "top_p=1e-6 picked %d", tok[3]);
    CHECK(tok[4] == 1234, "min_p=0.99 picked %d", tok[4]);
    for (int r = 5; r < 8; r++) CHECK(tok[r] == 1234 || tok[r] == 77 || tok[r] == 2999, "top_k=3 row %d picked %d", r, tok[r]);
    // The draw follows the distribution: over many seeds, top_k=3 picks each of the three about
    // as often as its renormalised probability says.
    const int N = 300;
    std::vector<float> many;
    std::vector<int> mparams;
    for (int r = 0; r < N; r++) {
        many.insert(many.end(), base.begin(), base.end());
        int q[SAMPLE_PARAMS] = {bits(1.0f), bits(1.0f), bits(0.0f), 3, r * 7919 + 1, 0, 0, 0, 0};
        mparams.insert(mparams.end(), q, q + SAMPLE_PARAMS);
    }
    std::vector<int> mt(N);
    std::vector<float> ml(N);
    emu_launch(sample, {N, 1, 1}, 1024, many.data(), V, (const int*)mparams.data(), (const int*)banned, mt.data(), ml.data());
    int c1234 = 0, c77 = 0, c2999 = 0;
    for (int t : mt) c1234 += t == 1234, c77 += t == 77, c2999 += t == 2999;
    double z = std::exp(0.0) + std::exp(-0.5) + std::exp(-1.0);
    std::printf("  top_k=3 over %d seeds: %d/%d/%d (expected about %.0f/%.0f/%.0f)\n", N, c1234, c77, c2999, N / z,
                N * std::exp(-0.5) / z, N * std::exp(-1.0) / z);
    CHECK(c1234 + c77 + c2999 == N, "top_k=3 picked outside the top 3");
    CHECK(std::abs(c1234 - N / z) < 0.15 * N && std::abs(c77 - N * std::exp(-0.5) / z) < 0.15 * N, "top_k=3 frequencies off");
    // A row with no candidate (every logit NaN) yields token 0 instead of reading past the row.
    std::vector<float> nan_row(V, NAN);
    int nan_params[SAMPLE_PARAMS] = {bits(0.0f), bits(1.0f), bits(0.0f), 0, 1, 0, 0, 0, 0};
    int nan_tok = -1;
    float nan_lp = 0;
    emu_launch(sample, {1, 1, 1}, 1024, nan_row.data(), V, (const int*)nan_params, (const int*)banned, &nan_tok, &nan_lp);
    CHECK(nan_tok == 0, "an all-NaN row picked %d", nan_tok);
    std::printf("sample: checked\n");
}

int main() {
    check_dequant();
    check_norm_and_silu();
    check_rope_kv();
    check_attention();
    check_fused_attention();
    check_sample();
    std::printf(failures ? "%d check(s) FAILED\n" : "all kernel checks passed\n", failures);
    return failures ? 1 : 0;
}
