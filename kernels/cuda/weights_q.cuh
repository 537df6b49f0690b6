// The quantised weight formats beyond Q8_0/Q4_0/Q4_1: Q5_0, Q5_1, IQ4_NL (blocks of 32) and the super-block formats
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS (blocks of 256), in the split device layout of `kernels/src/cuda/repack.rs`:
// every block's quant bytes (a multiple of 16) in block order, then every block's remaining bytes (scales, `d`,
// `qh`) in block order, each block's rest in ggml's byte order. Byte layouts and the decoding they mirror are
// `kernels/src/superblock.rs` (checked bit for bit against gguf-py); docs/REFERENCE.md summarises them.
//
// Each format provides two interfaces:
//   - dequantisation to f32 (`load1`, `fetch8`/`convert8`/`load8` as in weights.cuh), evaluated in ggml's order
//     (`(d * scale) * code - (dmin * min)`, no contraction), for the embedding gather and the GEMM's shared tiles;
//   - the decode GEMV unit on Q8 activations (gemv_q8.cu): `Chunk` = the 16-byte quant vector(s) of CHUNK weights
//     plus the raw scale bits, `load_chunk` (ordered loads only), and `dot`, which multiplies the integer codes with
//     the int8 activations by `dp4a` (four products and a sum per instruction) and applies the scales once per
//     16 or 32 weights. No per-weight int->float conversion: nibbles and high bits are assembled four at a time
//     with 32-bit masks and shifts, IQ4 table values with `prmt` byte permutes.
//
// Q8 activations (quantize_q8_* in gemv_q8.cu): per 32 activations of a row, 32 int8 `q` (row-major like x) and a
// float4 meta {d, d * sum(q[0..16]), d, d * sum(q[16..32])}, `x ~= d * q`, `d = amax / 127` (the CPU's Q8 rule,
// kernels/src/cpu/dot/act.rs). `dot` takes `xq`, `xm` at the start of the activation row.
//
// GEMV tuning per format (gemv_q8.cu; values chosen from scripts/sass-report: the most chunk steps per pipelined
// group that compile without spilling): NA = streamed 16-byte weight vectors per chunk, UD / UQ = chunk steps per
// group at NT <= 2 / NT >= 4, MINB4 = 1 where the NT >= 4 kernels need `__launch_bounds__(128, 1)` not to spill.
//
// In a GEMV lane `c` walks chunks c, c + 32, ...; the chunk's position inside its block (`cc`, 0 .. CPB - 1) is
// therefore the same on every step of a lane (CPB divides 32) and is passed in, so every selector that depends on it
// is computed once per lane.
#pragma once
#include "common.cuh"

// ---------------------------------------------------------------------------------------------------------------
// Small helpers (inline PTX: no toolkit header).

__device__ __forceinline__ uint4 ld_nc_v4_ordered(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ u64 ld_nc_u64_ordered(const void* p) {
    u64 v;
    asm volatile("ld.global.nc.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_nc_u8_ordered(const void* p) {
    u32 v;
    asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ u32 ld_nc_u8(const void* p) {
    u32 v;
    asm("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// Sum of a[i] * b[i] over the four bytes, a unsigned, b signed, plus c.
__device__ __forceinline__ int dp4a_us(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The same with both signed.
__device__ __forceinline__ int dp4a_ss(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// Bytes of {b, a} selected by the four low selector nibbles (each < 8: no sign replication).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Sum over 16 weights: four words of unsigned byte codes times four words of int8 activations.
__device__ __forceinline__ int dot16_us(u32 w0, u32 w1, u32 w2, u32 w3, const uint4& x) {
    return dp4a_us(w3, x.w, dp4a_us(w2, x.z, dp4a_us(w1, x.y, dp4a_us(w0, x.x, 0))));
}
__device__ __forceinline__ int dot16_ss(u32 w0, u32 w1, u32 w2, u32 w3, const uint4& x) {
    return dp4a_ss(w3, x.w, dp4a_ss(w2, x.z, dp4a_ss(w1, x.y, dp4a_ss(w0, x.x, 0))));
}

// Bit i (i < 4) of `t` to bit 0 of byte i (no carries: the four shifted copies do not overlap).
__device__ __forceinline__ u32 spread4(u32 t) { return ((t & 0xfu) * 0x00204081u) & 0x01010101u; }

// The IQ4_NL / IQ4_XS values (kvalues_iq4nl: -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113) as int8,
// four per word.
#define IQ4_T0 0xbfad9881u
#define IQ4_T1 0xf6eaddcfu
#define IQ4_T2 0x26190d01u
#define IQ4_T3 0x71594535u

// Table values of the four nibbles in the low 16 bits of `u`, one int8 per byte.
__device__ __forceinline__ u32 iq4_lut4(u32 u) {
    const u32 lo = prmt(IQ4_T0, IQ4_T1, u & 0x7777u);  // entries 0..7
    const u32 hi = prmt(IQ4_T2, IQ4_T3, u & 0x7777u);  // entries 8..15
    return prmt(lo, hi, 0x3210u | ((u & 0x8888u) >> 1));
}

// Table values of the low and the high nibbles of the four bytes of `q`.
__device__ __forceinline__ void iq4_word(u32 q, u32& lo, u32& hi) {
    const u32 v01 = iq4_lut4(q & 0xffffu), v23 = iq4_lut4(q >> 16);
    lo = prmt(v01, v23, 0x6420u);
    hi = prmt(v01, v23, 0x7531u);
}

__device__ __forceinline__ float4 as_float4(const uint4& v) {
    return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
}

// Meta of activation block `a`: {d, s(half 0), d, s(half 1)}.
__device__ __forceinline__ float4 xmeta(const float4* xm, int a) { return as_float4(ld_nc_v4(xm + a)); }

// The 16 int8 activations of half `h` of 32-block `a` of the row.
__device__ __forceinline__ uint4 xq16(const i8* xq, int a, int h) { return ld_nc_v4(xq + 32 * a + 16 * h); }

__device__ __forceinline__ float half_sum(const float4& m, int h) { return h ? m.w : m.y; }

// {d, s(half h)} of activation block `a`: one 8-byte load.
__device__ __forceinline__ float2 xmeta2(const float4* xm, int a, int h) {
    const u64 v = ld_nc_u64((const float*)(xm + a) + 2 * h);
    return make_float2(__uint_as_float((u32)v), __uint_as_float((u32)(v >> 32)));
}

__device__ __forceinline__ float f16lo(u32 v) { return f16_to_f32((u16)(v & 0xffffu)); }
__device__ __forceinline__ float f16hi(u32 v) { return f16_to_f32((u16)(v >> 16)); }

// ggml's float order, without contraction into an FMA (so the values equal the CPU's bit for bit).
__device__ __forceinline__ float deq(float dl, int code) { return __fmul_rn(dl, (float)code); }
__device__ __forceinline__ float deq_min(float dl, int code, float ml) { return __fsub_rn(__fmul_rn(dl, (float)code), ml); }

// f32 dequantisation interface on top of `load1` (the formats here are not contiguous in 8-element runs, so the
// GEMM tile and the embedding take eight single elements; the GEMM fetches them before its math).
template <class W>
struct QDeq {
    struct Raw8 {
        float v[8];
    };
    static __device__ __forceinline__ Raw8 fetch8(const u8* qs, const u8* sc, long e) {
        Raw8 r;
#pragma unroll
        for (int i = 0; i < 8; ++i) r.v[i] = W::load1(qs, sc, e + i);
        return r;
    }
    static __device__ __forceinline__ void convert8(const Raw8& r, float* out) {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = r.v[i];
    }
    static __device__ __forceinline__ void load8(const u8* qs, const u8* sc, long e, float* out) {
        convert8(fetch8(qs, sc, e), out);
    }
};

// ---------------------------------------------------------------------------------------------------------------
// 32-element blocks: Q5_0 (rest: d, qh[4]), Q5_1 (rest: d, m, qh[4]), IQ4_NL (rest: d). Chunk = one block.

struct WQ5_0 : QDeq<WQ5_0> {
    static constexpr int QK = 32, CHUNK = 32, CPB = 1, NA = 1, UD = 4, UQ = 2, MINB4 = 1;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 32;
        const int j = (int)(e % 32);
        const u32 byte = ld_nc_u8(qs + b * 16 + (j & 15));
        const u8* r = sc + b * 6;
        const u32 qh = ld_nc_u16(r + 2) | ((u32)ld_nc_u16(r + 4) << 16);
        const int code = (int)(((j >= 16 ? byte >> 4 : byte & 0xf)) | (((qh >> j) & 1) << 4)) - 16;
        return deq(f16_to_f32(ld_nc_u16(r)), code);
    }
    struct Chunk {
        uint4 q;
        u32 d, qh;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int, int K) {
        const long b = row * (K / 32) + c;
        const u8* r = sc + b * 6;
        return Chunk{ld_stream_v4_ordered(qs + b * 16), ld_nc_u16_ordered(r),
                     ld_nc_u16_ordered(r + 2) | (ld_nc_u16_ordered(r + 4) << 16)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int) {
        const uint4 x0 = xq16(xq, c, 0), x1 = xq16(xq, c, 1);
        const float4 m = xmeta(xm, c);
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
        u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (q[i] & 0x0f0f0f0fu) | (spread4(w.qh >> (4 * i)) << 4);
            hi[i] = ((q[i] >> 4) & 0x0f0f0f0fu) | (spread4(w.qh >> (16 + 4 * i)) << 4);
        }
        const int s = dot16_us(lo[0], lo[1], lo[2], lo[3], x0) + dot16_us(hi[0], hi[1], hi[2], hi[3], x1);
        // codes are stored + 16: sum (v - 16) * d_x * q = d_x * sum(v q) - 16 * (d_x * sum q)
        return f16lo(w.d) * (m.x * (float)s - 16.f * (m.y + m.w));
    }
};

struct WQ5_1 : QDeq<WQ5_1> {
    static constexpr int QK = 32, CHUNK = 32, CPB = 1, NA = 1, UD = 4, UQ = 2, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 32;
        const int j = (int)(e % 32);
        const u32 byte = ld_nc_u8(qs + b * 16 + (j & 15));
        const u64 r = ld_nc_u64(sc + b * 8);
        const u32 dm = (u32)r, qh = (u32)(r >> 32);
        const int code = (int)(((j >= 16 ? byte >> 4 : byte & 0xf)) | (((qh >> j) & 1) << 4));
        return __fadd_rn(deq(f16lo(dm), code), f16hi(dm));
    }
    struct Chunk {
        uint4 q;
        u64 r;  // d, m (f16) and qh
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int, int K) {
        const long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 16), ld_nc_u64_ordered(sc + b * 8)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int) {
        const uint4 x0 = xq16(xq, c, 0), x1 = xq16(xq, c, 1);
        const float4 m = xmeta(xm, c);
        const u32 dm = (u32)w.r, qh = (u32)(w.r >> 32);
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
        u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (q[i] & 0x0f0f0f0fu) | (spread4(qh >> (4 * i)) << 4);
            hi[i] = ((q[i] >> 4) & 0x0f0f0f0fu) | (spread4(qh >> (16 + 4 * i)) << 4);
        }
        const int s = dot16_us(lo[0], lo[1], lo[2], lo[3], x0) + dot16_us(hi[0], hi[1], hi[2], hi[3], x1);
        return fmaf(f16lo(dm) * m.x, (float)s, f16hi(dm) * (m.y + m.w));
    }
};

struct WIQ4_NL : QDeq<WIQ4_NL> {
    static constexpr int QK = 32, CHUNK = 32, CPB = 1, NA = 1, UD = 2, UQ = 2, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 32;
        const int j = (int)(e % 32);
        const u32 byte = ld_nc_u8(qs + b * 16 + (j & 15));
        const u32 nib = j >= 16 ? byte >> 4 : byte & 0xf;
        const int code = (int)(i8)(iq4_lut4(nib) & 0xff);
        return deq(f16_to_f32(ld_nc_u16(sc + b * 2)), code);
    }
    struct Chunk {
        uint4 q;
        u32 d;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int, int K) {
        const long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 16), ld_nc_u16_ordered(sc + b * 2)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int) {
        const uint4 x0 = xq16(xq, c, 0), x1 = xq16(xq, c, 1);
        const float dx = __uint_as_float(ld_nc_u32(xm + c));
        u32 lo[4], hi[4];
        iq4_word(w.q.x, lo[0], hi[0]);
        iq4_word(w.q.y, lo[1], hi[1]);
        iq4_word(w.q.z, lo[2], hi[2]);
        iq4_word(w.q.w, lo[3], hi[3]);
        const int s = dot16_ss(lo[0], lo[1], lo[2], lo[3], x0) + dot16_ss(hi[0], hi[1], hi[2], hi[3], x1);
        return f16lo(w.d) * dx * (float)s;
    }
};

// ---------------------------------------------------------------------------------------------------------------
// The GEMV units of Q8_0, Q4_0 and Q4_1 on Q8 activations (their dequantisation for the GEMM and the embedding is
// WQ8_0 / WQ4_0 / WQ4_1 of weights.cuh; the split layout is the same). Chunk = one block.

struct GQ8_0 {
    static constexpr int QK = 32, CHUNK = 32, CPB = 1, NA = 2, UD = 2, UQ = 1, MINB4 = 0;
    struct Chunk {
        uint4 q0, q1;
        u32 d;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int, int K) {
        const long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 32), ld_stream_v4_ordered(qs + b * 32 + 16),
                     ld_nc_u16_ordered(sc + b * 2)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int) {
        return dotx(w, xq16(xq, c, 0), xq16(xq, c, 1), __uint_as_float(ld_nc_u32(xm + c)));
    }
    // The chunk against the activation block's two 16-byte halves and its scale d (gemv_q8.cu's one-row kernel
    // reads them from shared memory).
    static __device__ __forceinline__ float dotx(const Chunk& w, const uint4& x0, const uint4& x1, float dx) {
        const int s = dot16_ss(w.q0.x, w.q0.y, w.q0.z, w.q0.w, x0) + dot16_ss(w.q1.x, w.q1.y, w.q1.z, w.q1.w, x1);
        return f16lo(w.d) * dx * (float)s;
    }
    static __device__ __forceinline__ float dotx(const Chunk& w, const uint4& x0, const uint4& x1, const float4& m) {
        return dotx(w, x0, x1, m.x);
    }
};

// Q4_0 (MIN = false: codes - 8) and Q4_1 (MIN = true: d * code + m).
template <bool MIN>
struct GQ4 {
    static constexpr int QK = 32, CHUNK = 32, CPB = 1, NA = 1, UD = 4, UQ = 2, MINB4 = 0;
    struct Chunk {
        uint4 q;
        u32 dm;  // d (f16), and m (f16) in the high half for Q4_1
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int, int K) {
        const long b = row * (K / 32) + c;
        return Chunk{ld_stream_v4_ordered(qs + b * 16),
                     MIN ? ld_nc_u32_ordered(sc + b * 4) : ld_nc_u16_ordered(sc + b * 2)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int) {
        return dotx(w, xq16(xq, c, 0), xq16(xq, c, 1), xmeta(xm, c));
    }
    // The chunk against the activation block's two 16-byte halves and its meta (as GQ8_0::dotx).
    static __device__ __forceinline__ float dotx(const Chunk& w, const uint4& x0, const uint4& x1, const float4& m) {
        const int s = dot16_us(w.q.x & 0x0f0f0f0fu, w.q.y & 0x0f0f0f0fu, w.q.z & 0x0f0f0f0fu, w.q.w & 0x0f0f0f0fu, x0) +
                      dot16_us((w.q.x >> 4) & 0x0f0f0f0fu, (w.q.y >> 4) & 0x0f0f0f0fu, (w.q.z >> 4) & 0x0f0f0f0fu,
                               (w.q.w >> 4) & 0x0f0f0f0fu, x1);
        if (MIN) return fmaf(f16lo(w.dm) * m.x, (float)s, f16hi(w.dm) * (m.y + m.w));
        return f16lo(w.dm) * (m.x * (float)s - 8.f * (m.y + m.w));  // codes are stored + 8
    }
};
typedef GQ4<false> GQ4_0;
typedef GQ4<true> GQ4_1;

// ---------------------------------------------------------------------------------------------------------------
// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and minimums packed in 12 bytes (rest: d, dmin, scales[12] =
// 16 bytes, one aligned vector). Quants: Q4_K qs[128]; Q5_K qh[32], qs[128]. Byte l of qs group j (32 bytes) holds
// element 64j + l (low nibble, sub-block 2j) and 64j + 32 + l (high nibble, sub-block 2j + 1). Chunk cc (0..7) is
// qs bytes 16cc .. 16cc + 16: j = cc / 2, half h = cc % 2 of both sub-blocks.

// Scale and minimum bytes of sub-blocks 2j, 2j + 1 from the 12 packed bytes (ggml get_scale_min_k4), as
// sc = scale(2j) | scale(2j + 1) << 8, mn likewise.
__device__ __forceinline__ void k4_scales(const uint4& head, int j, u32& sc, u32& mn) {
    const u32 s0 = head.y, s1 = head.z, s2 = head.w;
    u32 sc4, m4;
    if (j < 2) {
        sc4 = s0 & 0x3f3f3f3fu;
        m4 = s1 & 0x3f3f3f3fu;
    } else {
        sc4 = (s2 & 0x0f0f0f0fu) | ((s0 >> 2) & 0x30303030u);
        m4 = ((s2 >> 4) & 0x0f0f0f0fu) | ((s1 >> 2) & 0x30303030u);
    }
    const int sh = 16 * (j & 1);
    sc = (sc4 >> sh) & 0xffffu;
    mn = (m4 >> sh) & 0xffffu;
}

// The 6-bit scale and minimum of sub-block p (0..7) read byte by byte (dequantisation path).
__device__ __forceinline__ void k4_scale_min(const u8* s, int p, int& sc, int& mn) {
    if (p < 4) {
        sc = (int)(ld_nc_u8(s + p) & 63);
        mn = (int)(ld_nc_u8(s + p + 4) & 63);
    } else {
        const u32 a = ld_nc_u8(s + p + 4);
        sc = (int)((a & 0xf) | ((ld_nc_u8(s + p - 4) >> 6) << 4));
        mn = (int)((a >> 4) | ((ld_nc_u8(s + p) >> 6) << 4));
    }
}

// Shared end of Q4_K/Q5_K's dot: codes of the two half sub-blocks, the head, the activations.
__device__ __forceinline__ float k4_dot(const u32* lo, const u32* hi, const uint4& head, const i8* xq,
                                        const float4* xm, int c, int cc) {
    const int j = cc >> 1, h = cc & 1;
    const int a0 = (c >> 3) * 8 + 2 * j;  // activation 32-blocks of sub-blocks 2j, 2j + 1
    const uint4 x0 = xq16(xq, a0, h), x1 = xq16(xq, a0 + 1, h);
    const float2 m0 = xmeta2(xm, a0, h), m1 = xmeta2(xm, a0 + 1, h);
    const int s0 = dot16_us(lo[0], lo[1], lo[2], lo[3], x0), s1 = dot16_us(hi[0], hi[1], hi[2], hi[3], x1);
    u32 sc, mn;
    k4_scales(head, j, sc, mn);
    const float d = f16lo(head.x), dmin = f16hi(head.x);
    const float v = m0.x * (float)(s0 * (int)(sc & 0xff)) + m1.x * (float)(s1 * (int)(sc >> 8));
    const float mins = (float)(mn & 0xff) * m0.y + (float)(mn >> 8) * m1.y;
    return d * v - dmin * mins;
}

struct WQ4_K : QDeq<WQ4_K> {
    static constexpr int QK = 256, CHUNK = 32, CPB = 8, NA = 1, UD = 2, UQ = 2, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), p = i / 32, l = i % 32;
        const u8* head = sc + b * 16;
        const u32 code = (ld_nc_u8(qs + b * 128 + 32 * (p / 2) + l) >> (4 * (p % 2))) & 0xf;
        int s, m;
        k4_scale_min(head + 4, p, s, m);
        const u32 dd = ld_nc_u32(head);
        return deq_min(__fmul_rn(f16lo(dd), (float)s), (int)code, __fmul_rn(f16hi(dd), (float)m));
    }
    struct Chunk {
        uint4 q, head;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 3);
        return Chunk{ld_stream_v4_ordered(qs + b * 128 + 16 * cc), ld_nc_v4_ordered(sc + b * 16)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
        u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = q[i] & 0x0f0f0f0fu;
            hi[i] = (q[i] >> 4) & 0x0f0f0f0fu;
        }
        return k4_dot(lo, hi, w.head, xq, xm, c, cc);
    }
};

struct WQ5_K : QDeq<WQ5_K> {
    static constexpr int QK = 256, CHUNK = 32, CPB = 8, NA = 2, UD = 1, UQ = 1, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), p = i / 32, l = i % 32;
        const u8* head = sc + b * 16;
        const u8* blk = qs + b * 160;
        const u32 low = (ld_nc_u8(blk + 32 + 32 * (p / 2) + l) >> (4 * (p % 2))) & 0xf;
        const u32 high = (ld_nc_u8(blk + l) >> p) & 1;
        int s, m;
        k4_scale_min(head + 4, p, s, m);
        const u32 dd = ld_nc_u32(head);
        return deq_min(__fmul_rn(f16lo(dd), (float)s), (int)(low | (high << 4)), __fmul_rn(f16hi(dd), (float)m));
    }
    struct Chunk {
        uint4 q, qh, head;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 3);
        const u8* blk = qs + b * 160;
        return Chunk{ld_stream_v4_ordered(blk + 32 + 16 * cc), ld_stream_v4_ordered(blk + 16 * (cc & 1)),
                     ld_nc_v4_ordered(sc + b * 16)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const int j = cc >> 1;
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, qh[4] = {w.qh.x, w.qh.y, w.qh.z, w.qh.w};
        u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (q[i] & 0x0f0f0f0fu) | (((qh[i] >> (2 * j)) & 0x01010101u) << 4);
            hi[i] = ((q[i] >> 4) & 0x0f0f0f0fu) | (((qh[i] >> (2 * j + 1)) & 0x01010101u) << 4);
        }
        return k4_dot(lo, hi, w.head, xq, xm, c, cc);
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Q6_K: quants ql[128], qh[64]; rest scales[16] (int8), d (18 bytes). Element 128h + r: low nibble of
// ql[64h + r % 64] (shifted by 4 (r / 64)), two high bits of qh[32h + r % 32] (shifted by 2 (r / 32)), code - 32.
// Chunk cc (0..7), h = cc / 4, k = cc % 4: ql bytes 64h + 16k .. + 16 (elements 128h + 16k + i, low nibbles, and
// 128h + 64 + 16k + i, high nibbles) and the 16 qh bytes 32h + 16 (k % 2) .. that hold their high bits (each qh
// vector serves two chunks of the warp: the same addresses, one transaction).

struct WQ6_K : QDeq<WQ6_K> {
    static constexpr int QK = 256, CHUNK = 32, CPB = 8, NA = 2, UD = 2, UQ = 1, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), h = i / 128, r = i % 128;
        const u8* blk = qs + b * 192;
        const u32 low = (ld_nc_u8(blk + 64 * h + r % 64) >> (4 * (r / 64))) & 0xf;
        const u32 high = (ld_nc_u8(blk + 128 + 32 * h + r % 32) >> (2 * (r / 32))) & 3;
        const u8* rest = sc + b * 18;
        const int s = (int)(i8)ld_nc_u8(rest + i / 16);
        return deq(__fmul_rn(f16_to_f32(ld_nc_u16(rest + 16)), (float)s), (int)(low | (high << 4)) - 32);
    }
    struct Chunk {
        uint4 ql, qh;
        u32 s0, s1, d;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 3);
        const int h = cc >> 2, k = cc & 3;
        const u8* blk = qs + b * 192;
        const u8* rest = sc + b * 18;
        return Chunk{ld_stream_v4_ordered(blk + 64 * h + 16 * k), ld_stream_v4_ordered(blk + 128 + 32 * h + 16 * (k & 1)),
                     ld_nc_u8_ordered(rest + 8 * h + k), ld_nc_u8_ordered(rest + 8 * h + 4 + k),
                     ld_nc_u16_ordered(rest + 16)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const int h = cc >> 2, k = cc & 3;
        const int sl = 2 * (k >> 1);
        const u32 ql[4] = {w.ql.x, w.ql.y, w.ql.z, w.ql.w}, qh[4] = {w.qh.x, w.qh.y, w.qh.z, w.qh.w};
        u32 lo[4], hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo[i] = (ql[i] & 0x0f0f0f0fu) | (((qh[i] >> sl) & 0x03030303u) << 4);
            hi[i] = ((ql[i] >> 4) & 0x0f0f0f0fu) | (((qh[i] >> (sl + 4)) & 0x03030303u) << 4);
        }
        const int a0 = (c >> 3) * 8 + 4 * h + (k >> 1), a1 = a0 + 2, hx = k & 1;
        const uint4 x0 = xq16(xq, a0, hx), x1 = xq16(xq, a1, hx);
        const float2 m0 = xmeta2(xm, a0, hx), m1 = xmeta2(xm, a1, hx);
        const int d0 = dot16_us(lo[0], lo[1], lo[2], lo[3], x0), d1 = dot16_us(hi[0], hi[1], hi[2], hi[3], x1);
        // codes are stored + 32
        const float v0 = fmaf(m0.x, (float)d0, -32.f * m0.y);
        const float v1 = fmaf(m1.x, (float)d1, -32.f * m1.y);
        return f16lo(w.d) * ((float)(int)(i8)w.s0 * v0 + (float)(int)(i8)w.s1 * v1);
    }
};

// ---------------------------------------------------------------------------------------------------------------
// IQ4_XS: quants qs[128] (sub-block j: bytes 16j .. 16j + 16, element 32j + l low nibble, 32j + 16 + l high);
// rest d, scales_h (u16), scales_l[4] (8 bytes). Chunk cc = sub-block j (one 32-block of activations).

struct WIQ4_XS : QDeq<WIQ4_XS> {
    static constexpr int QK = 256, CHUNK = 32, CPB = 8, NA = 1, UD = 2, UQ = 2, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ int scale(u64 r, int j) {
        const u32 sh = (u32)(r >> 16) & 0xffffu, sl = (u32)(r >> 32);
        return (int)(((sl >> (4 * j)) & 0xf) | (((sh >> (2 * j)) & 3) << 4)) - 32;
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), j = i / 32, l = i % 32;
        const u32 byte = ld_nc_u8(qs + b * 128 + 16 * j + (l & 15));
        const int code = (int)(i8)(iq4_lut4(l >= 16 ? byte >> 4 : byte & 0xf) & 0xff);
        const u64 r = ld_nc_u64(sc + b * 8);
        return deq(__fmul_rn(f16lo((u32)r), (float)scale(r, j)), code);
    }
    struct Chunk {
        uint4 q;
        u64 r;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 3);
        return Chunk{ld_stream_v4_ordered(qs + b * 128 + 16 * cc), ld_nc_u64_ordered(sc + b * 8)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const int a = (c >> 3) * 8 + cc;
        const uint4 x0 = xq16(xq, a, 0), x1 = xq16(xq, a, 1);
        const float m = __uint_as_float(ld_nc_u32(xm + a));
        u32 lo[4], hi[4];
        iq4_word(w.q.x, lo[0], hi[0]);
        iq4_word(w.q.y, lo[1], hi[1]);
        iq4_word(w.q.z, lo[2], hi[2]);
        iq4_word(w.q.w, lo[3], hi[3]);
        const int s = dot16_ss(lo[0], lo[1], lo[2], lo[3], x0) + dot16_ss(hi[0], hi[1], hi[2], hi[3], x1);
        return f16lo((u32)w.r) * (float)scale(w.r, cc) * m * (float)s;
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Q2_K and Q3_K: 2-bit quants qs[64]; element 128h + 32g + l is bits 2g of qs[32h + l]; 16 groups of 16 with their
// own scale. Chunk cc (0..3), h = cc / 2, half k = cc % 2: qs bytes 16cc .. + 16, i.e. for g = 0..3 the 16 elements
// 128h + 32g + 16k + i (activation 32-block 4h + g, half k; scale group 8h + 2g + k). 64 weights per chunk.

// Q2_K rest: scales[16] (low nibble scale, high nibble minimum), d, dmin (20 bytes).
struct WQ2_K : QDeq<WQ2_K> {
    static constexpr int QK = 256, CHUNK = 64, CPB = 4, NA = 1, UD = 2, UQ = 1, MINB4 = 0;
    static constexpr bool QUANT = true;
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), h = i / 128, g = (i % 128) / 32, l = i % 32;
        const int code = (int)((ld_nc_u8(qs + b * 64 + 32 * h + l) >> (2 * g)) & 3);
        const u8* rest = sc + b * 20;
        const u32 s = ld_nc_u8(rest + i / 16), dd = ld_nc_u32(rest + 16);
        return deq_min(__fmul_rn(f16lo(dd), (float)(s & 0xf)), code, __fmul_rn(f16hi(dd), (float)(s >> 4)));
    }
    struct Chunk {
        uint4 q;
        u32 sa, sb, dd;  // scales[8h .. 8h + 4], scales[8h + 4 .. 8h + 8], d | dmin << 16
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 2);
        const u8* rest = sc + b * 20 + 8 * (cc >> 1);
        return Chunk{ld_stream_v4_ordered(qs + b * 64 + 16 * cc), ld_nc_u32_ordered(rest), ld_nc_u32_ordered(rest + 4),
                     ld_nc_u32_ordered(sc + b * 20 + 16)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const int h = cc >> 1, k = cc & 1;
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w};
        float v = 0.f, mins = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const int a = (c >> 2) * 8 + 4 * h + g;
            // ordered: issued group by group, so the compiler does not hold all 4 x NT activation vectors at once
            const uint4 x = ld_nc_v4_ordered(xq + 32 * a + 16 * k);
            const float2 m = xmeta2(xm, a, k);
            const int s = dot16_us((q[0] >> (2 * g)) & 0x03030303u, (q[1] >> (2 * g)) & 0x03030303u,
                                   (q[2] >> (2 * g)) & 0x03030303u, (q[3] >> (2 * g)) & 0x03030303u, x);
            // group 8h + 2g + k: byte 2g + k of scales[8h ..]
            const u32 sb = ((g < 2 ? w.sa : w.sb) >> (8 * (2 * (g & 1) + k))) & 0xff;
            v = fmaf(m.x, (float)(s * (int)(sb & 0xf)), v);
            mins = fmaf((float)(sb >> 4), m.y, mins);
        }
        return f16lo(w.dd) * v - f16hi(w.dd) * mins;
    }
};

// Q3_K: quants hmask[32], qs[64] (the third bit of element 128h + 32g + l is bit 4h + g of hmask[l]; code =
// low | bit << 2, minus 4); rest scales[12] (16 signed 6-bit scales, ggml's packing), d (14 bytes).
struct WQ3_K : QDeq<WQ3_K> {
    static constexpr int QK = 256, CHUNK = 64, CPB = 4, NA = 2, UD = 1, UQ = 1, MINB4 = 0;
    static constexpr bool QUANT = true;
    // Scale of group G from the 12 packed bytes in w0 (bytes 0..3), w1 (4..7), w2 (8..11).
    static __device__ __forceinline__ int scale(u32 w0, u32 w1, u32 w2, int G) {
        const int lb = G & 7;
        const u32 lowb = ((lb < 4 ? w0 : w1) >> (8 * (lb & 3))) & 0xff;
        const u32 low = (G < 8 ? lowb : lowb >> 4) & 0xf;
        const u32 high = ((w2 >> (8 * (G & 3))) >> (2 * (G >> 2))) & 3;
        return (int)(low | (high << 4)) - 32;
    }
    static __device__ __forceinline__ float load1(const u8* qs, const u8* sc, long e) {
        const long b = e / 256;
        const int i = (int)(e % 256), h = i / 128, g = (i % 128) / 32, l = i % 32;
        const u8* blk = qs + b * 96;
        const int low = (int)((ld_nc_u8(blk + 32 + 32 * h + l) >> (2 * g)) & 3);
        const int high = (int)((ld_nc_u8(blk + l) >> (i / 32)) & 1);
        // scale(G) from its two bytes (as `scale` reads them from the words)
        const u8* rest = sc + b * 14;
        const int G = i / 16;
        const u32 lowb = ld_nc_u8(rest + (G & 7)), hb = ld_nc_u8(rest + 8 + (G & 3));
        const int s = (int)(((G < 8 ? lowb : lowb >> 4) & 0xf) | (((hb >> (2 * (G >> 2))) & 3) << 4)) - 32;
        return deq(__fmul_rn(f16_to_f32(ld_nc_u16(rest + 12)), (float)s), high ? low : low - 4);
    }
    struct Chunk {
        uint4 q, hm;
        u32 w0, w1, w2, d;
    };
    static __device__ __forceinline__ Chunk load_chunk(const u8* qs, const u8* sc, long row, int c, int cc, int K) {
        const long b = row * (K / 256) + (c >> 2);
        const u8* blk = qs + b * 96;
        const u8* rest = sc + b * 14;
        return Chunk{ld_stream_v4_ordered(blk + 32 + 16 * cc), ld_stream_v4_ordered(blk + 16 * (cc & 1)),
                     ld_nc_u16_ordered(rest) | (ld_nc_u16_ordered(rest + 2) << 16),
                     ld_nc_u16_ordered(rest + 4) | (ld_nc_u16_ordered(rest + 6) << 16),
                     ld_nc_u16_ordered(rest + 8) | (ld_nc_u16_ordered(rest + 10) << 16), ld_nc_u16_ordered(rest + 12)};
    }
    static __device__ __forceinline__ float dot(const Chunk& w, const i8* xq, const float4* xm, int c, int cc) {
        const int h = cc >> 1, k = cc & 1;
        const u32 q[4] = {w.q.x, w.q.y, w.q.z, w.q.w}, hm[4] = {w.hm.x, w.hm.y, w.hm.z, w.hm.w};
        float v = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const int a = (c >> 2) * 8 + 4 * h + g;
            const uint4 x = xq16(xq, a, k);
            const float2 m = xmeta2(xm, a, k);
            u32 cw[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                cw[i] = ((q[i] >> (2 * g)) & 0x03030303u) | (((hm[i] >> (4 * h + g)) & 0x01010101u) << 2);
            const int s = dot16_us(cw[0], cw[1], cw[2], cw[3], x);
            const int sc = scale(w.w0, w.w1, w.w2, 8 * h + 2 * g + k);
            // codes are stored + 4
            v = fmaf((float)sc, fmaf(m.x, (float)s, -4.f * m.y), v);
        }
        return f16lo(w.d) * v;
    }
};

// Every format here with the suffix of its entry points.
#define FOR_EACH_QWEIGHT(M, act, A)                                                                                  \
    M(act, A, q5_0, WQ5_0) M(act, A, q5_1, WQ5_1) M(act, A, iq4_nl, WIQ4_NL) M(act, A, q2_k, WQ2_K)                  \
        M(act, A, q3_k, WQ3_K) M(act, A, q4_k, WQ4_K) M(act, A, q5_k, WQ5_K) M(act, A, q6_k, WQ6_K)                  \
            M(act, A, iq4_xs, WIQ4_XS)
