// Weight conversion at load: GGUF blocks (or dense f32/f16) to bf16 on the device. One thread per
// output element; `n` elements, written to `dst`.

// Q8_0: 34-byte blocks of 32 values, f16 scale then 32 int8.
extern "C" __global__ void dequant_q8_0(const unsigned char* src, bf16* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned char* block = src + (i >> 5) * 34;
    float d = h2f(*(const f16*)block);
    signed char q = (signed char)block[2 + (i & 31)];
    dst[i] = f2bf(d * (float)q);
}

// Q4_0: 18-byte blocks, f16 scale then 16 bytes: value j < 16 is the low nibble of byte j, value
// j >= 16 the high nibble of byte j - 16; value = (nibble - 8) * d.
extern "C" __global__ void dequant_q4_0(const unsigned char* src, bf16* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned char* block = src + (i >> 5) * 18;
    float d = h2f(*(const f16*)block);
    int j = (int)(i & 31);
    unsigned char b = block[2 + (j & 15)];
    int q = j < 16 ? (b & 0xf) : (b >> 4);
    dst[i] = f2bf(d * (float)(q - 8));
}

// Q4_1: 20-byte blocks, f16 scale d, f16 minimum m, then 16 bytes of nibbles as in Q4_0;
// value = nibble * d + m.
extern "C" __global__ void dequant_q4_1(const unsigned char* src, bf16* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned char* block = src + (i >> 5) * 20;
    float d = h2f(*(const f16*)block);
    float m = h2f(*(const f16*)(block + 2));
    int j = (int)(i & 31);
    unsigned char b = block[4 + (j & 15)];
    int q = j < 16 ? (b & 0xf) : (b >> 4);
    dst[i] = f2bf(d * (float)q + m);
}

extern "C" __global__ void f16_to_bf16(const f16* src, bf16* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f2bf(h2f(src[i]));
}

extern "C" __global__ void f32_to_bf16(const float* src, bf16* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f2bf(src[i]);
}
