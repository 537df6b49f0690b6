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
