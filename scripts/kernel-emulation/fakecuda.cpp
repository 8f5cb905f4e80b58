// A CPU stand-in for the three CUDA libraries the GPU engine loads at run time (libcuda, libnvrtc,
// libcublas), so the engine itself (cudarc, forward.rs, the scheduler) runs end to end without a
// GPU. "Device" memory is host memory; NVRTC "compiles" the kernel source with g++ against emu.h
// into a shared object whose path stands in for the PTX; cuLaunchKernel calls the emulated kernel;
// cublasGemmEx is a plain loop. Only what the engine uses is here. See engine.sh.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#ifndef EMU_DIR
#error "EMU_DIR must name the directory holding emu.h"
#endif

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
struct Ctx { int dummy; };
struct Stream { int dummy; };
struct Func { void (*launch)(unsigned, unsigned, unsigned, unsigned, void**); };
static Ctx the_ctx;
static thread_local Ctx* current = nullptr;
static const size_t TOTAL = 8ull << 30;
static size_t allocated = 0;
static std::map<CUdeviceptr, size_t> sizes;

extern "C" {
CUresult cuInit(unsigned) { return 0; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { *d = ordinal; return ordinal == 0 ? 0 : 101; }
CUresult cuDeviceGetName(char* name, int len, CUdevice) { std::snprintf(name, len, "Emulated GPU (CPU)"); return 0; }
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = TOTAL; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
    // 75/76: compute capability major/minor.
    *v = attrib == 75 ? 9 : attrib == 76 ? 0 : 0;
    return 0;
}
CUresult cuDevicePrimaryCtxRetain(Ctx** c, CUdevice) { *c = &the_ctx; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return 0; }
CUresult cuCtxSetCurrent(Ctx* c) { current = c; return 0; }
CUresult cuCtxGetCurrent(Ctx** c) { *c = current; return 0; }
CUresult cuCtxSynchronize() { return 0; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) { *least = 0; *greatest = 0; return 0; }
CUresult cuStreamCreate(Stream** s, unsigned) { *s = new Stream{}; return 0; }
CUresult cuStreamCreateWithPriority(Stream** s, unsigned, int) { *s = new Stream{}; return 0; }
CUresult cuStreamDestroy_v2(Stream* s) { delete s; return 0; }
CUresult cuStreamSynchronize(Stream*) { return 0; }
// No graph capture here: the engine falls back to launching each step's kernels itself.
CUresult cuStreamBeginCapture_v2(Stream*, int) { return 801; }  // CUDA_ERROR_NOT_SUPPORTED
CUresult cuStreamEndCapture(Stream*, void** graph) { *graph = nullptr; return 801; }
CUresult cuMemGetInfo_v2(size_t* free_, size_t* total) { *total = TOTAL; *free_ = TOTAL - allocated; return 0; }
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (allocated + bytes > TOTAL) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    void* m = std::calloc(1, bytes + 64);
    if (!m) return 2;
    allocated += bytes;
    *p = (CUdeviceptr)m;
    sizes[*p] = bytes;
    return 0;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    auto it = sizes.find(p);
    if (it == sizes.end()) return 1;  // CUDA_ERROR_INVALID_VALUE: not ours, or freed twice
    allocated -= it->second;
    sizes.erase(it);
    std::free((void*)p);
    return 0;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, Stream*) { std::memcpy((void*)dst, src, n); return 0; }
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, Stream*) { std::memcpy(dst, (void*)src, n); return 0; }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, Stream*) { std::memset((void*)dst, v, n); return 0; }
CUresult cuGetErrorString(CUresult, const char** s) { *s = "emulated CUDA error"; return 0; }
CUresult cuGetErrorName(CUresult, const char** s) { *s = "CUDA_ERROR_EMULATED"; return 0; }

CUresult cuModuleLoadData(void** module, const void* image) {
    void* h = dlopen((const char*)image, RTLD_NOW | RTLD_LOCAL);
    if (!h) { std::fprintf(stderr, "fakecuda: %s\n", dlerror()); return 200; }
    *module = h;
    return 0;
}
CUresult cuModuleUnload(void*) { return 0; }
CUresult cuModuleGetFunction(Func** f, void* module, const char* name) {
    std::string sym = std::string("emu_kernel_") + name;
    void* p = dlsym(module, sym.c_str());
    if (!p) return 500;  // CUDA_ERROR_NOT_FOUND
    *f = new Func{(void (*)(unsigned, unsigned, unsigned, unsigned, void**))p};
    return 0;
}
CUresult cuFuncGetAttribute(int* v, int, Func*) { *v = 0; return 0; }
CUresult cuLaunchKernel(Func* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned, Stream*, void** params, void**) {
    if (by != 1 || bz != 1 || bx == 0 || bx > 1024) return 1;
    f->launch(gx, gy, gz, bx, params);
    return 0;
}

// NVRTC: g++ stands in for the compiler; the "PTX" is the path of the shared object it builds.
struct Program { std::string src, so, log; };
int nvrtcCreateProgram(Program** p, const char* src, const char*, int, const char* const*, const char* const*) {
    *p = new Program{src, "", ""};
    return 0;
}
int nvrtcDestroyProgram(Program** p) { delete *p; *p = nullptr; return 0; }
int nvrtcCompileProgram(Program* p, int n, const char* const* options) {
    std::string defines;
    for (int i = 0; i < n; i++)
        if (std::strncmp(options[i], "-D", 2) == 0) defines += std::string(" '") + options[i] + "'";
    // The emulation headers are part of what is compiled: a change to them is a new program.
    std::string headers;
    for (const char* name : {EMU_DIR "/emu.h", EMU_DIR "/exports.h"})
        if (FILE* f = std::fopen(name, "r")) {
            char buf[4096];
            size_t n;
            while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) headers.append(buf, n);
            std::fclose(f);
        }
    size_t h = std::hash<std::string>{}(p->src + defines + headers);
    std::string dir = "/tmp/dynamix-fakecuda";
    std::string base = dir + "/k" + std::to_string(h);
    p->so = base + ".so";
    if (FILE* existing = std::fopen(p->so.c_str(), "r")) { std::fclose(existing); return 0; }
    std::system(("mkdir -p " + dir).c_str());
    FILE* out = std::fopen((base + ".cpp").c_str(), "w");
    if (!out) return 3;
    std::fprintf(out, "#include \"emu.h\"\n%s\n#include \"exports.h\"\n", p->src.c_str());
    std::fclose(out);
    std::string cmd = "g++ -std=c++20 -O1 -shared -fPIC -pthread -DDYNAMIX_KERNEL_EMULATION" + defines +
                      " -I " EMU_DIR " -o " + base + ".tmp.so " + base + ".cpp 2> " + base + ".log && mv " + base +
                      ".tmp.so " + p->so;
    if (std::system(cmd.c_str()) != 0) {
        p->log = "g++ failed; see " + base + ".log";
        return 6;  // NVRTC_ERROR_COMPILATION
    }
    return 0;
}
int nvrtcGetProgramLogSize(Program* p, size_t* n) { *n = p->log.size() + 1; return 0; }
int nvrtcGetProgramLog(Program* p, char* log) { std::memcpy(log, p->log.c_str(), p->log.size() + 1); return 0; }
int nvrtcGetPTXSize(Program* p, size_t* n) { *n = p->so.size() + 1; return 0; }
int nvrtcGetPTX(Program* p, char* ptx) { std::memcpy(ptx, p->so.c_str(), p->so.size() + 1); return 0; }
const char* nvrtcGetErrorString(int) { return "emulated NVRTC error"; }
int nvrtcVersion(int* major, int* minor) { *major = 13; *minor = 0; return 0; }

// cuBLAS: C = alpha op(A) op(B) + beta C, column-major, bf16 A/B, f32 C (what the engine asks).
struct Blas { int dummy; };
int cublasCreate_v2(Blas** h) { *h = new Blas{}; return 0; }
int cublasDestroy_v2(Blas* h) { delete h; return 0; }
int cublasSetStream_v2(Blas*, Stream*) { return 0; }
int cublasSetMathMode(Blas*, int) { return 0; }
int cublasSetWorkspace_v2(Blas*, void*, size_t) { return 0; }
static float bf16f(unsigned short v) { unsigned u = (unsigned)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
int cublasGemmEx(Blas*, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int atype,
                 int lda, const void* B, int btype, int ldb, const void* beta, void* C, int ctype, int ldc, int, int) {
    // Only what forward.rs issues: A transposed, B not, bf16 (14) inputs, f32 (0) output.
    if (transa != 1 || transb != 0 || atype != 14 || btype != 14 || ctype != 0) return 7;  // NOT_SUPPORTED
    const unsigned short* a = (const unsigned short*)A;
    const unsigned short* b = (const unsigned short*)B;
    float* c = (float*)C;
    float al = *(const float*)alpha, be = *(const float*)beta;
    unsigned workers = std::max(1u, std::min(8u, std::thread::hardware_concurrency()));
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < workers; w++)
        pool.emplace_back([=] {
            for (int j = (int)w; j < n; j += (int)workers)
                for (int i = 0; i < m; i++) {
                    // op(A)[i][p] = A[p + i*lda]; B[p][j] = B[p + j*ldb].
                    float acc = 0;
                    for (int p = 0; p < k; p++) acc += bf16f(a[p + (size_t)i * lda]) * bf16f(b[p + (size_t)j * ldb]);
                    float* out = &c[i + (size_t)j * ldc];
                    *out = al * acc + (be == 0 ? 0 : be * *out);
                }
        });
    for (auto& t : pool) t.join();
    return 0;
}
}
