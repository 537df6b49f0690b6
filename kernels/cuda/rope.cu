// Rotary position embedding, in place on x: [T, n_heads * head_dim]; row t is at position positions[t].
// Pair i (i < rotary_dim / 2) is rotated by angle positions[t] * inv_freq[i], computed in f32 with the precise
// sincosf (angles reach 1e5 rad at long contexts, where the fast intrinsic loses all accuracy).
//   interleaved (GGUF/llama.cpp "normal"): dims (2i, 2i + 1)
//   neox (Hugging Face rotate_half):       dims (i, i + rotary_dim / 2)
// Dimensions at and past rotary_dim are left as they are. Launch: one thread per pair, block 256.
#include "common.cuh"

template <class A>
__device__ __forceinline__ void rope_impl(u16* __restrict__ x, const u32* __restrict__ positions,
                                          const float* __restrict__ inv_freq, int T, int n_heads, int head_dim,
                                          int half_rot, int neox) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long total = (long)T * n_heads * half_rot;
    if (idx >= total) return;
    const int i = (int)(idx % half_rot);
    const long th = idx / half_rot;  // t * n_heads + head
    const int t = (int)(th / n_heads);
    u16* head = x + th * head_dim;
    const int d0 = neox ? i : 2 * i;
    const int d1 = neox ? i + half_rot : 2 * i + 1;
    const float angle = (float)positions[t] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    const float a = A::to_f32(head[d0]), b = A::to_f32(head[d1]);
    head[d0] = A::from_f32(a * c - b * s);
    head[d1] = A::from_f32(a * s + b * c);
}

#define ROPE(act, A)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) rope_##act(u16* x, const u32* positions, const float* inv_freq, \
                                                                 int T, int n_heads, int head_dim, int half_rot,     \
                                                                 int neox) {                                         \
        rope_impl<A>(x, positions, inv_freq, T, n_heads, head_dim, half_rot, neox);                                  \
    }
FOR_EACH_ACT(ROPE)

// RoPE on a row's query and key heads, and the row's key and value into their KV-cache slot, in one launch (the
// decode step's rope(q), rope(k) and kv_store fused; docs/CUDA.md). Launch: grid (T), block 128. Every value is
// what the three separate kernels write: the rotation is rope_impl's, the key is stored after rotation, bit for
// bit in both the key tensor (in place, as rope does) and the cache.
template <class A>
__device__ __forceinline__ void rotate_pair(u16* __restrict__ head, u16* __restrict__ cache_head, int i, float pos,
                                            const float* __restrict__ inv_freq, int half_rot, int neox) {
    const int d0 = neox ? i : 2 * i;
    const int d1 = neox ? i + half_rot : 2 * i + 1;
    const float angle = pos * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    const float a = A::to_f32(head[d0]), b = A::to_f32(head[d1]);
    const u16 r0 = A::from_f32(a * c - b * s), r1 = A::from_f32(a * s + b * c);
    head[d0] = r0;
    head[d1] = r1;
    if (cache_head) {
        cache_head[d0] = r0;
        cache_head[d1] = r1;
    }
}

template <class A>
__device__ void rope_kv_store_impl(u16* __restrict__ q, u16* __restrict__ k, const u16* __restrict__ v,
                                   u16* __restrict__ k_cache, u16* __restrict__ v_cache,
                                   const u32* __restrict__ positions, const u32* __restrict__ slots,
                                   const float* __restrict__ inv_freq, int n_heads, int n_kv_heads, int head_dim,
                                   int half_rot, int neox) {
    const long t = blockIdx.x;
    const float pos = (float)positions[t];
    const long kw = (long)n_kv_heads * head_dim;
    u16* qrow = q + t * n_heads * head_dim;
    u16* krow = k + t * kw;
    u16* kdst = k_cache + (long)slots[t] * kw;
    for (int p = threadIdx.x; p < n_heads * half_rot; p += blockDim.x)
        rotate_pair<A>(qrow + (p / half_rot) * head_dim, nullptr, p % half_rot, pos, inv_freq, half_rot, neox);
    for (int p = threadIdx.x; p < n_kv_heads * half_rot; p += blockDim.x) {
        const int h = p / half_rot;
        rotate_pair<A>(krow + h * head_dim, kdst + h * head_dim, p % half_rot, pos, inv_freq, half_rot, neox);
    }
    // The key dimensions past rotary_dim (copied as they are) and the whole value row.
    const u16* vrow = v + t * kw;
    u16* vdst = v_cache + (long)slots[t] * kw;
    for (int e = threadIdx.x; e < (int)kw; e += blockDim.x) {
        if (e % head_dim >= 2 * half_rot) kdst[e] = krow[e];
        vdst[e] = vrow[e];
    }
}

#define ROPE_KV_STORE(act, A)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                                                \
        rope_kv_store_##act(u16* q, u16* k, const u16* v, u16* k_cache, u16* v_cache, const u32* positions,         \
                            const u32* slots, const float* inv_freq, int n_heads, int n_kv_heads, int head_dim,     \
                            int half_rot, int neox) {                                                                \
        rope_kv_store_impl<A>(q, k, v, k_cache, v_cache, positions, slots, inv_freq, n_heads, n_kv_heads, head_dim, \
                              half_rot, neox);                                                                       \
    }
FOR_EACH_ACT(ROPE_KV_STORE)
