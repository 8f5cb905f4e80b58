// A CPU stand-in for the CUDA built-ins the GPU engine's kernels use, so the kernels' own source
// (actors/src/engine/gpu/kernels/*.cu) runs on the CPU. Blocks run one after another; the threads of
// a block are fibers (ucontext) on the calling thread, switched at __syncthreads and warp shuffles,
// which wait for every thread of the block (or lane of the warp) to arrive. Exact in what it checks:
// indexing, synchronisation structure and the formulas (not CUDA's float rounding or timing).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>
#include <algorithm>

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline emu_dim3 threadIdx;
inline emu_dim3 blockIdx;
inline emu_dim3 blockDim;
inline emu_dim3 gridDim;

struct uint4 {
    unsigned x, y, z, w;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct EmuFiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
};
inline ucontext_t emu_scheduler;
inline EmuFiber* emu_current = nullptr;
inline std::function<void()> emu_body;

inline void emu_yield() { swapcontext(&emu_current->ctx, &emu_scheduler); }

// Waits until `n` fibers arrived; the last to arrive opens the next generation.
struct EmuBarrier {
    unsigned n = 0, count = 0;
    unsigned long generation = 0;
    void wait() {
        unsigned long g = generation;
        if (++count == n) {
            count = 0;
            generation++;
            return;
        }
        while (generation == g) emu_yield();
    }
};
inline EmuBarrier emu_block_barrier;
inline EmuBarrier emu_warp_barriers[32];
inline float emu_exchange[32][32];

inline void __syncthreads() { emu_block_barrier.wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu_exchange[warp][lane] = v;
    emu_warp_barriers[warp].wait();
    float r = emu_exchange[warp][lane ^ offset];
    emu_warp_barriers[warp].wait();
    return r;
}

inline int atomicMin(int* p, int v) { int old = *p; if (v < old) *p = v; return old; }
inline int atomicAdd(int* p, int v) { int old = *p; *p += v; return old; }
inline void __threadfence() {}
inline float __ldcg(const float* p) { return *p; }
inline int atomicMax(int* p, int v) { int old = *p; if (v > old) *p = v; return old; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::fmaxf;
using std::min;
using std::max;

inline float emu_half_to_float(unsigned short h) {
    unsigned sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
    float v;
    if (exp == 0) v = std::ldexp((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((float)(man | 1024), (int)exp - 25);
    return sign ? -v : v;
}

inline void emu_fiber_entry() {
    emu_body();
    emu_current->done = true;
}

// Run `kernel(args...)` over `grid` blocks of `block` threads.
template <typename... Params, typename... Args>
void emu_launch(void (*kernel)(Params...), emu_dim3 grid, unsigned block, Args... args) {
    static std::vector<EmuFiber> fibers;
    if (fibers.size() < block) fibers.resize(block);
    gridDim = grid;
    blockDim = emu_dim3{block, 1, 1};
    emu_body = [=] { kernel(args...); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = emu_dim3{x, y, z};
                emu_block_barrier = EmuBarrier{block};
                for (unsigned w = 0; w < (block + 31) / 32; w++) emu_warp_barriers[w] = EmuBarrier{std::min(32u, block - 32 * w)};
                for (unsigned t = 0; t < block; t++) {
                    EmuFiber& f = fibers[t];
                    if (f.stack.empty()) f.stack.resize(256 << 10);
                    f.done = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &emu_scheduler;
                    makecontext(&f.ctx, emu_fiber_entry, 0);
                }
                for (bool running = true; running;) {
                    running = false;
                    for (unsigned t = 0; t < block; t++) {
                        EmuFiber& f = fibers[t];
                        if (f.done) continue;
                        running = true;
                        threadIdx = emu_dim3{t, 0, 0};
                        emu_current = &f;
                        swapcontext(&emu_scheduler, &f.ctx);
                    }
                }
            }
}
