// RMSNorm, alone and fused with the residual add that precedes it in a Llama block.
//   rms_norm:      out = x / sqrt(mean(x^2) + eps) * w
//   add_rms_norm:  residual += x (rounded to the activation type); out = rms_norm(residual) * w
// The norm of the fused kernel is taken over the rounded residual, so it equals rms_norm of what is stored.
// Launch: grid (rows), block 256; 16-byte accesses when `width % 8 == 0`. Norm weights are f32, f16 or bf16.
#include "common.cuh"
#include "weights.cuh"

#define NORM_THREADS 256

template <class A, class W, bool FUSED>
__device__ __forceinline__ void rms_impl(u16* __restrict__ resid, const u16* __restrict__ x, const u8* __restrict__ w,
                                         u16* __restrict__ out, int width, float eps) {
    __shared__ float scratch[32];
    const long r = blockIdx.x;
    const u16* xr = x + r * width;
    u16* rr = FUSED ? resid + r * width : nullptr;
    u16* orow = out + r * width;
    // The row the norm is taken of: the residual after the add, or x itself.
    const u16* src = FUSED ? (const u16*)rr : xr;
    float ss = 0.f;
    const bool vec = width % 8 == 0;
    if (vec) {
        for (int k = threadIdx.x * 8; k < width; k += blockDim.x * 8) {
            float v[8];
            if (FUSED) {
                float a[8], b[8];
                unpack8<A>(ld_global_v4(rr + k), a);
                unpack8<A>(ld_nc_v4(xr + k), b);
#pragma unroll
                for (int i = 0; i < 8; ++i) a[i] += b[i];
                uint4 s = pack8<A>(a);
                *(uint4*)(rr + k) = s;
                unpack8<A>(s, v);
            } else {
                unpack8<A>(ld_nc_v4(xr + k), v);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = fmaf(v[i], v[i], ss);
        }
    } else {
        for (int k = threadIdx.x; k < width; k += blockDim.x) {
            float v;
            if (FUSED) {
                u16 s = A::from_f32(A::to_f32(rr[k]) + A::to_f32(xr[k]));
                rr[k] = s;
                v = A::to_f32(s);
            } else {
                v = A::to_f32(xr[k]);
            }
            ss = fmaf(v, v, ss);
        }
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)width + eps);
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed between the passes.
    if (vec) {
        for (int k = threadIdx.x * 8; k < width; k += blockDim.x * 8) {
            float v[8], g[8];
            // `src` may be the residual this thread just wrote: a coherent load.
            unpack8<A>(ld_global_v4(src + k), v);
            W::load8(w, nullptr, k, g);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * g[i];
            *(uint4*)(orow + k) = pack8<A>(v);
        }
    } else {
        for (int k = threadIdx.x; k < width; k += blockDim.x)
            orow[k] = A::from_f32(A::to_f32(src[k]) * inv * W::load1(w, nullptr, k));
    }
}

#define NORM(act, A, wname, W)                                                                                       \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                         \
        rms_norm_##act##_##wname(const u16* x, const u8* w, u16* out, int width, float eps) {                        \
        rms_impl<A, W, false>(nullptr, x, w, out, width, eps);                                                       \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                                         \
        add_rms_norm_##act##_##wname(u16* resid, const u16* x, const u8* w, u16* out, int width, float eps) {        \
        rms_impl<A, W, true>(resid, x, w, out, width, eps);                                                          \
    }
#define NORM_ACT(act, A) NORM(act, A, f32, WF32) NORM(act, A, f16, WF16) NORM(act, A, bf16, WBF16)
FOR_EACH_ACT(NORM_ACT)
