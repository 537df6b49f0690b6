// Weight formats as they sit in device memory, and how kernels read them.
//
// Plain weights (f32, f16, bf16) are row-major `[rows, K]` as in the model file.
//
// Quantised weights (ggml Q8_0, Q4_0, Q4_1: blocks of 32 along K) are split at upload into two regions so that
// the quants of a row are contiguous and 16-byte aligned (one vector load = 16 int8 of Q8_0 or one whole Q4 block):
//   qs     : every block's quant bytes in block order (Q8_0: 32 bytes per block, Q4_*: the 16 nibble bytes, low
//            nibble = element j, high nibble = element j + 16, exactly as in ggml);
//   scales : one f16 `d` per block (Q8_0, Q4_0) or the pair (f16 `d`, f16 `m`) per block (Q4_1).
// Block `b` of the tensor (counting along rows) is element range `32b .. 32b + 32`. The total size equals the
// ggml size, so the tensor's byte length does not change.
//
// Every format provides
//   fetch8 / convert8          : the 8 weights at element index e .. e+8 (e % 8 == 0), split into the raw loads and
//                                the arithmetic so that a pipelined kernel can issue the loads early;
//   load8(qs, scales, e, out)  : both at once;
//   load1(qs, scales, e)       : the single weight at element index e;
//   Chunk / load_chunk / dot   : the GEMV unit, one 16-byte load of quants and the dot product of those weights
//                                with CHUNK activations. `load_chunk` only loads (ordered loads, raw scale bits):
//                                every conversion is in `dot`, so a GEMV can issue many chunks before waiting.
#pragma once
#include "common.cuh"

struct WF32 {
    static constexpr int CHUNK = 4;
    static constexpr bool QUANT = false;
    struct Raw8 {
        uint4 a, b;
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8*, long e) {
        const float* p = (const float*)qs + e;
        return Raw8{ld_stream_v4(p), ld_stream_v4(p + 4)};
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) {
        out[0] = __uint_as_float(r.a.x), out[1] = __uint_as_float(r.a.y), out[2] = __uint_as_float(r.a.z);
        out[3] = __uint_as_float(r.a.w), out[4] = __uint_as_float(r.b.x), out[5] = __uint_as_float(r.b.y);
        out[6] = __uint_as_float(r.b.z), out[7] = __uint_as_float(r.b.w);
    }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8*, long e) {
        return __uint_as_float(ld_nc_u32((const float*)qs + e));
    }
    struct Chunk {
        uint4 q;
    };
    // Chunk `c` of row `row`: elements 4c .. 4c + 4.
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8*, long row, int c, int K) {
        return Chunk{ld_stream_v4_ordered((const float*)qs + row * K + (long)c * CHUNK)};
    }
    template <class A>
    static __device__ __forceinline__ float dot(const Chunk& w, const u16* x) {
        uint2 xv = *(const uint2*)x;
        float x0, x1, x2, x3;
        unpack2<A>(xv.x, x0, x1);
        unpack2<A>(xv.y, x2, x3);
        return __uint_as_float(w.q.x) * x0 + __uint_as_float(w.q.y) * x1 + __uint_as_float(w.q.z) * x2 +
               __uint_as_float(w.q.w) * x3;
    }
};

template <class H>
struct WHalf {
    static constexpr int CHUNK = 8;
    static constexpr bool QUANT = false;
    struct Raw8 {
        uint4 q;
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8*, long e) {
        return Raw8{ld_stream_v4((const u16*)qs + e)};
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) { unpack8<H>(r.q, out); }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8*, long e) {
        return H::to_f32(ld_nc_u16((const u16*)qs + e));
    }
    struct Chunk {
        uint4 q;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8*, long row, int c, int K) {
        return Chunk{ld_stream_v4_ordered((const u16*)qs + row * K + (long)c * CHUNK)};
    }
    template <class A>
    static __device__ __forceinline__ float dot(const Chunk& w, const u16* x) {
        float wf[8], xf[8];
        unpack8<H>(w.q, wf);
        unpack8<A>(ld_nc_v4(x), xf);
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(wf[i], xf[i], s);
        return s;
    }
};
typedef WHalf<ActF16> WF16;
typedef WHalf<ActBF16> WBF16;

// Sum of x[i] * q[i] over 4 signed bytes packed in `q`, x given as f32.
__device__ __forceinline__ float dot4_i8(u32 q, const float* x) {
    return x[0] * (float)(i8)(q & 0xff) + x[1] * (float)(i8)((q >> 8) & 0xff) + x[2] * (float)(i8)((q >> 16) & 0xff) +
           x[3] * (float)(i8)(q >> 24);
}

struct WQ8_0 {
    static constexpr int CHUNK = 16;
    static constexpr bool QUANT = true;
    struct Raw8 {
        u64 q;
        u16 d;
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8* sc, long e) {
        return Raw8{ld_nc_u64(qs + e), ld_nc_u16((const u16*)sc + e / 32)};
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) {
        const float d = f16_to_f32(r.d);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = d * (float)(i8)((r.q >> (8 * i)) & 0xff);
    }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        float d = f16_to_f32(ld_nc_u16((const u16*)sc + e / 32));
        return d * (float)(i8)qs[e];
    }
    struct Chunk {
        uint4 q;
        u32 d;  // f16 bits in the low half
    };
    // Chunk `c` of a row: elements 16c .. 16c + 16, half of block c / 2.
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int K) {
        long e = row * K + (long)c * CHUNK;
        return Chunk{ld_stream_v4_ordered(qs + e), ld_nc_u16_ordered((const u16*)sc + e / 32)};
    }
    template <class A>
    static __device__ __forceinline__ float dot(const Chunk& w, const u16* x) {
        float xf[16];
        unpack8<A>(ld_nc_v4(x), xf);
        unpack8<A>(ld_nc_v4(x + 8), xf + 8);
        float s = dot4_i8(w.q.x, xf) + dot4_i8(w.q.y, xf + 4) + dot4_i8(w.q.z, xf + 8) + dot4_i8(w.q.w, xf + 12);
        return f16_to_f32((u16)w.d) * s;
    }
};

// The 8 nibbles of `q` (4 bytes) that hold elements j..j+8 of a Q4 block: low nibbles for j < 16, else high.
__device__ __forceinline__ void nibbles8(u64 q, bool high, float* out) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (float)((q >> (8 * i + (high ? 4 : 0))) & 0xf);
}

// Sum of x[j] * low_nibble(q byte j) and x[j + 16] * high_nibble(q byte j) over the four bytes of `q`,
// with `xlo` = x[j..j+4] and `xhi` = x[j+16..j+20].
__device__ __forceinline__ float dot4_q4(u32 q, const float* xlo, const float* xhi) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32 b = (q >> (8 * i)) & 0xff;
        s = fmaf(xlo[i], (float)(b & 0xf), s);
        s = fmaf(xhi[i], (float)(b >> 4), s);
    }
    return s;
}

// Shared code of Q4_0 and Q4_1: a chunk is one whole block (16 bytes = 32 nibbles).
struct Q4Common {
    static constexpr int CHUNK = 32;
    // Returns sum x*q over the block and sets `xsum` = sum x.
    template <class A>
    static __device__ __forceinline__ float dot_q(const uint4& q, const u16* x, float& xsum) {
        float xf[32];
        unpack8<A>(ld_nc_v4(x), xf);
        unpack8<A>(ld_nc_v4(x + 8), xf + 8);
        unpack8<A>(ld_nc_v4(x + 16), xf + 16);
        unpack8<A>(ld_nc_v4(x + 24), xf + 24);
        float s = dot4_q4(q.x, xf, xf + 16) + dot4_q4(q.y, xf + 4, xf + 20) + dot4_q4(q.z, xf + 8, xf + 24) +
                  dot4_q4(q.w, xf + 12, xf + 28);
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < 32; ++i) t += xf[i];
        xsum = t;
        return s;
    }
};

struct WQ4_0 {
    static constexpr int CHUNK = 32;
    static constexpr bool QUANT = true;
    struct Raw8 {
        u64 q;
        u16 d;
        bool high;
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8* sc, long e) {
        const long b = e / 32;
        const int j = (int)(e % 32);
        return Raw8{ld_nc_u64(qs + b * 16 + (j & 15)), ld_nc_u16((const u16*)sc + b), j >= 16};
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) {
        const float d = f16_to_f32(r.d);
        nibbles8(r.q, r.high, out);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = d * (out[i] - 8.f);
    }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        long b = e / 32;
        int j = (int)(e % 32);
        u32 byte = qs[b * 16 + (j & 15)];
        float q = (float)(j >= 16 ? byte >> 4 : byte & 0xf);
        return f16_to_f32(ld_nc_u16((const u16*)sc + b)) * (q - 8.f);
    }
    struct Chunk {
        uint4 q;
        u32 d;  // f16 bits in the low half
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int K) {
        long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 16), ld_nc_u16_ordered((const u16*)sc + b)};
    }
    template <class A>
    static __device__ __forceinline__ float dot(const Chunk& w, const u16* x) {
        float xsum;
        float s = Q4Common::dot_q<A>(w.q, x, xsum);
        return f16_to_f32((u16)w.d) * (s - 8.f * xsum);
    }
};

struct WQ4_1 {
    static constexpr int CHUNK = 32;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ void dm(const u8* sc, long b, float& d, float& m) {
        u32 v = ld_nc_u32((const u32*)sc + b);
        d = f16_to_f32((u16)(v & 0xffff));
        m = f16_to_f32((u16)(v >> 16));
    }
    struct Raw8 {
        u64 q;
        u32 dm;
        bool high;
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8* sc, long e) {
        const long b = e / 32;
        const int j = (int)(e % 32);
        return Raw8{ld_nc_u64(qs + b * 16 + (j & 15)), ld_nc_u32((const u32*)sc + b), j >= 16};
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) {
        const float d = f16_to_f32((u16)(r.dm & 0xffff)), m = f16_to_f32((u16)(r.dm >> 16));
        nibbles8(r.q, r.high, out);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = fmaf(d, out[i], m);
    }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        long b = e / 32;
        int j = (int)(e % 32);
        u32 byte = qs[b * 16 + (j & 15)];
        float q = (float)(j >= 16 ? byte >> 4 : byte & 0xf);
        float d, m;
        dm(sc, b, d, m);
        return fmaf(d, q, m);
    }
    struct Chunk {
        uint4 q;
        u32 dm;  // f16 bits of d (low half) and m (high half)
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int K) {
        long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 16), ld_nc_u32_ordered((const u32*)sc + b)};
    }
    template <class A>
    static __device__ __forceinline__ float dot(const Chunk& w, const u16* x) {
        float xsum;
        float s = Q4Common::dot_q<A>(w.q, x, xsum);
        const float d = f16_to_f32((u16)(w.dm & 0xffff)), m = f16_to_f32((u16)(w.dm >> 16));
        return fmaf(d, s, m * xsum);
    }
};

// Every weight format with the suffix of its entry points.
#define FOR_EACH_WEIGHT(M, act, A)                                                                                   \
    M(act, A, f32, WF32) M(act, A, f16, WF16) M(act, A, bf16, WBF16) M(act, A, q8_0, WQ8_0) M(act, A, q4_0, WQ4_0)   \
        M(act, A, q4_1, WQ4_1)
