// Sampling on the device: two kernels read one row of 16-bit logits and write back only the chosen token, its
// log-probability and the n_top most likely tokens with theirs (a few hundred bytes instead of the vocabulary).
//
// Semantics (shared with the host model in kernels/src/cuda/sampling_spec.rs and the CPU backend):
// - Every logit must be finite: a row holding a NaN or an infinity is refused (no token is drawn, not even from the
//   finite rest; the histogram pass counts them, docs/SECURITY.md), as the CPU backend refuses it.
// - Rank: tokens by logit descending, ties by lower id first; -0 as +0. Greedy (temperature <= 0) takes rank 0.
// - Otherwise, with w_i = exp((x_i - x_max) / temperature): keep the first top_k ranks (all when 0); of those keep
//   the shortest rank prefix whose w-mass reaches top_p of the kept mass (all when top_p >= 1, one token when
//   top_p <= 0); draw u = uniform(seed, position) (kernels/src/rng.rs, recomputed here bit for bit) and take the
//   first token of the prefix, in rank order, at which the running w-mass exceeds u times the prefix mass.
// - logprob and the top list are under the unmodified distribution (temperature 1, whole vocabulary).
//
// How: a 16-bit logit has at most 65536 values, so one pass over the row that counts tokens per value (a
// histogram indexed by the order-preserving 16-bit key) holds everything a cut needs: every token of one value has
// the same weight, so the running mass in rank order is a walk over the histogram from the top, and within a bin the
// tokens are ranked by id. `sample_hist_*` is that pass, spread over many blocks (16-byte loads, warp-aggregated
// atomics, integer counts: the result is the same on every run). `sample_pick_*` is one block: it walks the
// histogram (each thread owns 64 consecutive bins; a cut is a block-wide prefix sum over the threads' totals, then
// a warp-wide one over the 64 bins of the thread that holds it), then reads the row once more to turn (bin, index
// within the bin) into token ids. Masses are fixed-point integers (w * 2^40, summed in u64), so every choice is
// exact and bit-identical from run to run. It leaves the histogram zeroed for the next row.
#include "common.cuh"

#define SAMPLE_PICK_THREADS 1024
#define SAMPLE_HIST_THREADS 256
#define SAMPLE_MAX_TOP 256
#define SAMPLE_BINS 65536
#define SAMPLE_BINS_PER_THREAD (SAMPLE_BINS / SAMPLE_PICK_THREADS)
// Words of `state` after the bins: [largest key][non-finite logits][NaN logits][~(first non-finite index)].
#define SAMPLE_NONFINITE (SAMPLE_BINS + 1)
#define SAMPLE_NAN (SAMPLE_BINS + 2)
#define SAMPLE_FIRST_BAD (SAMPLE_BINS + 3)

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// rng.rs `uniform`: 24 random bits in [0, 1).
__device__ __forceinline__ float uniform01(u64 seed, u64 position) {
    const u64 z = mix64(seed ^ mix64(position + 0x9e3779b97f4a7c15ull));
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Bits of +inf in each 16-bit format (a magnitude above it is a NaN).
__device__ __forceinline__ u32 inf_bits(ActF16) { return 0x7c00u; }
__device__ __forceinline__ u32 inf_bits(ActBF16) { return 0x7f80u; }

// The 16-bit logit mapped so that unsigned order is float order: NaN ranks as -inf and -0 as +0 (equal logits, so
// a tie between them goes to the lower id, as on the CPU). Never 0 (that is a NaN pattern, mapped away).
template <class A>
__device__ __forceinline__ u32 key16(u32 h) {
    if ((h & 0x7fffu) > inf_bits(A())) h = 0x8000u | inf_bits(A());
    if (h == 0x8000u) h = 0u;
    return (h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u);
}

// The logit of a key (inverse of key16).
template <class A>
__device__ __forceinline__ float key_value(u32 k) {
    const u32 h = (k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu);
    return A::to_f32((u16)h);
}

// Fixed-point mass of a logit, w = exp((x - x_max) * inv_t) in (0, 1] times 2^40 (sampling_spec.rs `mass`).
__device__ __forceinline__ u64 mass(float x, float x_max, float inv_t) {
    return (u64)(expf((x - x_max) * inv_t) * 1099511627776.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 1: the histogram of keys, the largest key and the non-finite logits. `state` = [65536 bin counts][largest
// key][non-finite count][NaN count][~first non-finite index], zero on entry.

// Counts a raw 16-bit logit `h` at index `i` if it is an infinity or a NaN (exponent all ones).
template <class A>
struct BadCount {
    u32 bad = 0, nan = 0, first_inv = 0;
    __device__ __forceinline__ void add(u32 h, int i, bool valid) {
        const u32 mag = h & 0x7fffu;
        if (valid && mag >= inf_bits(A())) {
            ++bad;
            nan += mag > inf_bits(A()) ? 1u : 0u;
            first_inv = max(first_inv, ~(u32)i);
        }
    }
    // Warp-wide sums, added to `state` by lane 0 only when something was found. All 32 lanes must call it.
    __device__ __forceinline__ void flush(u32* state) const {
        const u32 b = __reduce_add_sync(FULL_MASK, bad);
        if (b == 0u) return;
        const u32 n = __reduce_add_sync(FULL_MASK, nan);
        const u32 f = __reduce_max_sync(FULL_MASK, first_inv);
        if ((threadIdx.x & 31) == 0) {
            atomicAdd(&state[SAMPLE_NONFINITE], b);
            if (n) atomicAdd(&state[SAMPLE_NAN], n);
            atomicMax(&state[SAMPLE_FIRST_BAD], f);
        }
    }
};

// Adds one to bin `key` for every valid lane; lanes with the same key add once (most logits share a few values near
// the bulk of the distribution and would otherwise queue on one counter). All 32 lanes must call it.
__device__ __forceinline__ void hist_add(u32* hist, u32 key, bool valid) {
    const u32 k = valid ? key : 0xffffffffu;
    const unsigned group = __match_any_sync(FULL_MASK, k);
    if (valid && (int)(threadIdx.x & 31) == __ffs(group) - 1) atomicAdd(&hist[key], (u32)__popc(group));
}

template <class A>
__device__ void hist_impl(const u16* __restrict__ row, int V, u32* __restrict__ state) {
    const int lane = threadIdx.x & 31;
    // Elements before the first 16-byte boundary (the row starts at row * V * 2 bytes) and after the last whole
    // vector are read one by one by the first warp; the rest as 8 logits per 16-byte load.
    const int head = min(V, (int)(((16u - ((u32)(size_t)row & 15u)) & 15u) >> 1));
    const int nvec = (V - head) >> 3;
    const int tail = head + 8 * nvec;
    const u16* vec = row + head;
    u32 best = 0;
    BadCount<A> bad;
    const int stride = gridDim.x * blockDim.x;
    // Warp-uniform trip count, so every lane reaches the warp-wide match in hist_add.
    for (int base = blockIdx.x * blockDim.x + threadIdx.x - lane; base < nvec; base += stride) {
        const int v = base + lane;
        const bool ok = v < nvec;
        const uint4 q = ok ? ld_nc_v4(vec + 8 * v) : make_uint4(0u, 0u, 0u, 0u);
        const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 h = (w[j >> 1] >> (16 * (j & 1))) & 0xffffu;
            const u32 k = key16<A>(h);
            bad.add(h, head + 8 * v + j, ok);
            hist_add(state, k, ok);
            best = ok && k > best ? k : best;
        }
    }
    if (blockIdx.x == 0 && threadIdx.x < 32) {  // at most 7 + 7 scalar elements
        const int i = lane < head ? lane : tail + (lane - head);
        const bool ok = lane < head || (i >= tail && i < V);
        const u32 h = ok ? (u32)ld_nc_u16(row + i) : 0u;
        const u32 k = ok ? key16<A>(h) : 0u;
        bad.add(h, i, ok);
        hist_add(state, k, ok);
        best = k > best ? k : best;
    }
    best = __reduce_max_sync(FULL_MASK, best);
    if (lane == 0 && best) atomicMax(&state[SAMPLE_BINS], best);
    bad.flush(state);
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 2: one block walks the histogram and reads the row once more for the ids.

// Which tokens of a bin count: all of bins above `bin`, the first `count` (by id) of `bin`, none below.
struct Limit {
    u32 bin, count;
};

struct PickShared {
    u64 warp64[32];
    float red[32];
    int found_t;
    u64 found_above;
    u32 res_bin;
    u64 res_above;
    u32 warp32a[32], warp32b[32];
    u32 n_top_found;
    u64 top[SAMPLE_MAX_TOP];
    u32 token;
};

// Thread t holds bins hi(t) - 63 .. hi(t); rank order is descending bin, so thread 0 holds the best ones.
__device__ __forceinline__ int hi_bin(int t) { return SAMPLE_BINS - 1 - SAMPLE_BINS_PER_THREAD * t; }

__device__ __forceinline__ u32 kept(u32 bin, u32 c, Limit lim) {
    return bin > lim.bin ? c : (bin == lim.bin ? min(c, lim.count) : 0u);
}

// Weight of a bin in a cut over counts (by_mass false) or masses of the kept tokens.
template <class A>
__device__ __forceinline__ u64 bin_weight(u32 bin, u32 c, bool by_mass, Limit lim, float x_max, float inv_t) {
    if (c == 0) return 0;
    if (!by_mass) return c;
    const u32 n = kept(bin, c, lim);
    return n ? (u64)n * mass(key_value<A>(bin), x_max, inv_t) : 0ull;
}

// Walks this thread's 64 bins in bin order (16 16-byte loads, four at a time in flight), calling f(bin, count) for
// each: the one walk of the histogram that thread_weight and thread_first_pass share.
template <class F>
__device__ __forceinline__ void for_each_bin(const u32* hist, F&& f) {
    const int lo = hi_bin((int)threadIdx.x) - (SAMPLE_BINS_PER_THREAD - 1);
    for (int g = 0; g < SAMPLE_BINS_PER_THREAD; g += 16) {
        uint4 q[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) q[j] = ld_global_v4(hist + lo + g + 4 * j);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 c[4] = {q[j].x, q[j].y, q[j].z, q[j].w};
#pragma unroll
            for (int e = 0; e < 4; ++e) f((u32)(lo + g + 4 * j + e), c[e]);
        }
    }
}

// This thread's total weight over its 64 bins.
template <class A>
__device__ u64 thread_weight(const u32* hist, bool by_mass, Limit lim, float x_max, float inv_t) {
    u64 total = 0;
    for_each_bin(hist, [&](u32 bin, u32 c) { total += bin_weight<A>(bin, c, by_mass, lim, x_max, inv_t); });
    return total;
}

// One read of this thread's bins for everything that needs no cut: Σ count · exp(x − x_max) (temperature 1, whole
// vocabulary, in bin order), the token count, and when `masses` the total mass at temperature 1/inv_t.
template <class A>
__device__ float thread_first_pass(const u32* hist, float x_max, bool masses, float inv_t, u64& count, u64& mass_all) {
    float s = 0.f;
    u64 n = 0, m = 0;
    for_each_bin(hist, [&](u32 bin, u32 c) {
        if (c) {
            const float x = key_value<A>(bin);
            s += (float)c * expf(x - x_max);
            n += c;
            if (masses) m += (u64)c * mass(x, x_max, inv_t);
        }
    });
    count = n;
    mass_all = m;
    return s;
}

__device__ __forceinline__ u64 warp_incl_scan_u64(u64 v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 n = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

__device__ __forceinline__ u64 block_sum_u64(u64 v, PickShared& sh) {
    v = warp_incl_scan_u64(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 31) sh.warp64[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 t = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh.warp64[w];
    return t;
}

// Bin and weight above it at which the running weight in rank order first exceeds `target`:
// above <= target < above + weight(bin). `w` is this thread's total; `target` is clamped below the block's total
// (which the callers guarantee already; the clamp keeps a rounding surprise from walking off the end).
template <class A>
__device__ void find_bin(const u32* hist, u64 w, u64 target, bool by_mass, Limit lim, float x_max, float inv_t,
                         PickShared& sh, u32& bin_out, u64& above_out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const u64 incl = warp_incl_scan_u64(w);
    __syncthreads();
    if (lane == 31) sh.warp64[warp] = incl;
    if (threadIdx.x == 0) {
        sh.found_t = -1;
        sh.found_above = 0;
    }
    __syncthreads();
    u64 before = 0, total = 0;
    for (int i = 0; i < nwarps; ++i) {
        if (i < warp) before += sh.warp64[i];
        total += sh.warp64[i];
    }
    if (total == 0) total = 1;
    if (target >= total) target = total - 1;
    const u64 excl = before + incl - w;
    if (w > 0 && excl <= target && target < excl + w) {
        sh.found_t = (int)threadIdx.x;
        sh.found_above = excl;
    }
    __syncthreads();
    const int t = sh.found_t < 0 ? 0 : sh.found_t;
    const u64 above = sh.found_above;
    // The 64 bins of thread t, two per lane in rank order, scanned by warp 0.
    if (warp == 0) {
        const u32 b0 = (u32)(hi_bin(t) - 2 * lane), b1 = b0 - 1;
        const u64 w0 = bin_weight<A>(b0, hist[b0], by_mass, lim, x_max, inv_t);
        const u64 w1 = bin_weight<A>(b1, hist[b1], by_mass, lim, x_max, inv_t);
        const u64 in = warp_incl_scan_u64(w0 + w1);
        const u64 ex = above + in - w0 - w1;
        u32 bin = 0xffffffffu;
        u64 at = 0;
        if (w0 > 0 && ex <= target && target < ex + w0) {
            bin = b0;
            at = ex;
        } else if (w1 > 0 && ex + w0 <= target && target < ex + w0 + w1) {
            bin = b1;
            at = ex + w0;
        }
        const unsigned hit = __ballot_sync(FULL_MASK, bin != 0xffffffffu);
        const int src = hit ? __ffs(hit) - 1 : 0;
        bin = __shfl_sync(FULL_MASK, bin, src);
        at = __shfl_sync(FULL_MASK, at, src);
        if (lane == 0) {
            sh.res_bin = hit ? bin : (u32)hi_bin(t);
            sh.res_above = hit ? at : above;
        }
    }
    __syncthreads();
    bin_out = sh.res_bin;
    above_out = sh.res_above;
    __syncthreads();
}

// Exclusive prefix over the block (thread order) of two u32 counts.
__device__ __forceinline__ void block_excl2(u32 a, u32 b, PickShared& sh, u32& ea, u32& eb) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 ia = a, ib = b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 na = __shfl_up_sync(FULL_MASK, ia, o), nb = __shfl_up_sync(FULL_MASK, ib, o);
        if (lane >= o) {
            ia += na;
            ib += nb;
        }
    }
    __syncthreads();
    if (lane == 31) {
        sh.warp32a[warp] = ia;
        sh.warp32b[warp] = ib;
    }
    __syncthreads();
    u32 pa = 0, pb = 0;
    for (int i = 0; i < warp; ++i) {
        pa += sh.warp32a[i];
        pb += sh.warp32b[i];
    }
    ea = pa + ia - a;
    eb = pb + ib - b;
    __syncthreads();
}

// Calls f(id, key) for every element of row[s0..s1), as whole 16-byte vectors when the row is aligned.
template <class A, class F>
__device__ __forceinline__ void walk_segment(const u16* __restrict__ row, int s0, int s1, bool aligned, F& f) {
    int i = s0;
    if (aligned)
        for (; i + 8 <= s1; i += 8) {
            const uint4 q = ld_nc_v4(row + i);
            const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) f(i + j, key16<A>((w[j >> 1] >> (16 * (j & 1))) & 0xffffu));
        }
    for (; i < s1; ++i) f(i, key16<A>(ld_nc_u16(row + i)));
}

// First read of a segment: how many of its tokens fall in the chosen bin and in the top list's last bin (0: none).
struct CountPass {
    u32 chosen_bin, top_bin, n_chosen, n_topbin;
    __device__ __forceinline__ void operator()(int, u32 k) {
        n_chosen += k == chosen_bin;
        n_topbin += k == top_bin;
    }
};

// Second read, knowing the rank within its bin of the segment's first token of each: the chosen token (index
// `chosen_j` of its bin), and the top list (every token above its last bin, and the first `top_r` of that bin).
struct ListPass {
    u32 chosen_bin, chosen_j, top_bin, top_r, r_chosen, r_topbin;
    PickShared* sh;
    __device__ __forceinline__ void operator()(int i, u32 k) {
        if (k == chosen_bin) {
            if (r_chosen == chosen_j) sh->token = (u32)i;
            ++r_chosen;
        }
        bool in_top = top_bin != 0u && k > top_bin;
        if (top_bin != 0u && k == top_bin) {
            in_top = r_topbin < top_r;
            ++r_topbin;
        }
        if (in_top) {
            const u32 at = atomicAdd(&sh->n_top_found, 1u);
            if (at < SAMPLE_MAX_TOP) sh->top[at] = ((u64)k << 32) | (u64)(~(u32)i);
        }
    }
};

// out[0] = token (0xffffffff when the row is refused: out[1] then holds the largest logit, out[2] the number of
// non-finite logits, out[3] of NaNs, out[4] ~ the first non-finite index), out[1] = logprob bits,
// out[2 + 2j] = j-th top token, out[3 + 2j] = its logprob bits.
template <class A>
__device__ void pick_impl(const u16* __restrict__ row, int V, float temperature, int top_k, float top_p, u64 seed,
                          u64 position, int n_top, u32* __restrict__ state, u32* __restrict__ out) {
    __shared__ PickShared sh;
    const u32* hist = state;
    const u32 max_key = state[SAMPLE_BINS];
    const float x_max = key_value<A>(max_key);
    const u32 n_bad = state[SAMPLE_NONFINITE], n_nan = state[SAMPLE_NAN], first_bad = state[SAMPLE_FIRST_BAD];
    // Refused: a NaN or infinite logit, or no finite one.
    const bool ok = n_bad == 0u && !(x_max == f32_inf() || x_max == -f32_inf());
    const Limit all = {0u, 0xffffffffu};

    u32 chosen_bin = max_key, chosen_j = 0, top_bin = 0, top_r = 0;
    float lse = 0.f;
    const int nt = min(min(n_top, SAMPLE_MAX_TOP), V);
    if (ok) {
        const bool sampled = temperature > 0.f, cut_k = sampled && top_k > 0 && top_k < V;
        const float inv_t = sampled ? 1.f / temperature : 1.f;
        u64 counts, masses;
        lse = x_max + logf(block_sum(thread_first_pass<A>(hist, x_max, sampled && !cut_k, inv_t, counts, masses), sh.red));
        if (sampled) {
            Limit lim = all;
            u32 bin;
            u64 above;
            if (cut_k) {
                find_bin<A>(hist, counts, (u64)(top_k - 1), false, all, x_max, inv_t, sh, bin, above);
                lim = {bin, (u32)((u64)top_k - above)};
                masses = thread_weight<A>(hist, true, lim, x_max, inv_t);
            }
            if (top_p < 1.f) {
                const u64 z = block_sum_u64(masses, sh);
                const double want = ceil((double)fmaxf(top_p, 0.f) * (double)z);
                const u64 target = want < 1.0 ? 0ull : min((u64)want - 1ull, z - 1ull);
                find_bin<A>(hist, masses, target, true, lim, x_max, inv_t, sh, bin, above);
                const u64 w = mass(key_value<A>(bin), x_max, inv_t);
                lim = {bin, (u32)((target - above) / w + 1)};
                masses = thread_weight<A>(hist, true, lim, x_max, inv_t);
            }
            const u64 z = block_sum_u64(masses, sh);
            const double u = (double)uniform01(seed, position);
            const u64 target = min((u64)floor(u * (double)z), z - 1ull);
            find_bin<A>(hist, masses, target, true, lim, x_max, inv_t, sh, bin, above);
            chosen_bin = bin;
            chosen_j = (u32)((target - above) / mass(key_value<A>(bin), x_max, inv_t));
        }
        if (nt > 0) {
            u64 above;
            find_bin<A>(hist, counts, (u64)(nt - 1), false, all, x_max, 1.f, sh, top_bin, above);
            top_r = (u32)((u64)nt - above);
        }
    }
    // Every read of the histogram is done: leave it zeroed for the next row.
    __syncthreads();
    {
        const int lo = hi_bin((int)threadIdx.x) - (SAMPLE_BINS_PER_THREAD - 1);
        for (int g = 0; g < SAMPLE_BINS_PER_THREAD; g += 4)
            *reinterpret_cast<uint4*>(state + lo + g) = make_uint4(0u, 0u, 0u, 0u);
        if (threadIdx.x == 0) {
            state[SAMPLE_BINS] = 0u;
            state[SAMPLE_NONFINITE] = 0u;
            state[SAMPLE_NAN] = 0u;
            state[SAMPLE_FIRST_BAD] = 0u;
        }
    }
    if (!ok) {
        if (threadIdx.x == 0) {
            out[0] = 0xffffffffu;
            out[1] = __float_as_uint(x_max);
            out[2] = n_bad;
            out[3] = n_nan;
            out[4] = first_bad;
        }
        return;
    }

    // The ids: thread t reads a contiguous segment of the row (whole 16-byte vectors when the row is aligned),
    // counts the tokens of the chosen bin and of the top list's last bin, and after a block-wide prefix of those
    // counts knows the rank within the bin of each one it holds.
    const int seg = ((V + (int)blockDim.x - 1) / (int)blockDim.x + 7) & ~7;
    const int s0 = min(V, seg * (int)threadIdx.x), s1 = min(V, s0 + seg);
    const bool aligned = (((size_t)row) & 15u) == 0;
    CountPass count = {chosen_bin, nt > 0 ? top_bin : 0u, 0u, 0u};
    walk_segment<A>(row, s0, s1, aligned, count);
    ListPass list = {chosen_bin, chosen_j, nt > 0 ? top_bin : 0u, top_r, 0u, 0u, &sh};
    block_excl2(count.n_chosen, count.n_topbin, sh, list.r_chosen, list.r_topbin);
    if (threadIdx.x == 0) {
        sh.n_top_found = 0;
        sh.token = 0;
    }
    __syncthreads();
    walk_segment<A>(row, s0, s1, aligned, list);
    __syncthreads();
    if (threadIdx.x == 0) {
        out[0] = sh.token;
        out[1] = __float_as_uint(key_value<A>(chosen_bin) - lse);
    }
    // The top list in rank order: an entry's place is the number of entries ranked above it (keys are distinct).
    const int n = min((int)sh.n_top_found, nt);
    if ((int)threadIdx.x < n) {
        const u64 mine = sh.top[threadIdx.x];
        int place = 0;
        for (int j = 0; j < n; ++j) place += sh.top[j] > mine;
        out[2 + 2 * place] = ~(u32)(mine & 0xffffffffull);
        out[3 + 2 * place] = __float_as_uint(key_value<A>((u32)(mine >> 32)) - lse);
    }
}

#define SAMPLE(act, A)                                                                                               \
    extern "C" __global__ void __launch_bounds__(SAMPLE_HIST_THREADS)                                                  \
        sample_hist_##act(const u16* row, int V, u32* state) {                                                       \
        hist_impl<A>(row, V, state);                                                                                 \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(SAMPLE_PICK_THREADS)                                                  \
        sample_pick_##act(const u16* row, int V, float temperature, int top_k, float top_p, u64 seed,               \
                          u64 position, int n_top, u32* state, u32* out) {                                           \
        pick_impl<A>(row, V, temperature, top_k, top_p, seed, position, n_top, state, out);                          \
    }
FOR_EACH_ACT(SAMPLE)
