// A CPU stand-in for the CUDA built-ins the GPU engine's kernels use, so the kernels' own source
// (actors/src/engine/gpu/kernels/*.cu) runs on the CPU against reference implementations. Blocks run
// one at a time; the threads of a block run as real threads, with __syncthreads as a block barrier
// and warp shuffles through a per-warp exchange with a warp barrier. Slow, exact in what it checks:
// indexing, synchronisation structure, and the arithmetic's formulas (not CUDA's float rounding).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local emu_dim3 threadIdx;
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

inline std::unique_ptr<std::barrier<>> emu_block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_barriers;
inline float emu_exchange[32][32];
inline std::mutex emu_atomic;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    emu_exchange[warp][lane] = v;
    emu_warp_barriers[warp]->arrive_and_wait();
    float r = emu_exchange[warp][lane ^ offset];
    emu_warp_barriers[warp]->arrive_and_wait();
    return r;
}

inline int atomicMin(int* p, int v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    int old = *p;
    if (v < old) *p = v;
    return old;
}
inline int atomicMax(int* p, int v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    int old = *p;
    if (v > old) *p = v;
    return old;
}

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

// Run `kernel(args...)` over `grid` blocks of `block` threads (block.x a multiple of 32).
template <typename... Params, typename... Args>
void emu_launch(void (*kernel)(Params...), emu_dim3 grid, unsigned block, Args... args) {
    gridDim = grid;
    blockDim = emu_dim3{block, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = emu_dim3{x, y, z};
                emu_block_barrier = std::make_unique<std::barrier<>>(block);
                emu_warp_barriers.clear();
                for (unsigned w = 0; w < (block + 31) / 32; w++)
                    emu_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < block; t++)
                    threads.emplace_back([=] {
                        threadIdx = emu_dim3{t, 0, 0};
                        kernel(args...);
                    });
                for (auto& th : threads) th.join();
            }
}
