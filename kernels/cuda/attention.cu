// Causal grouped-query attention over the paged KV cache (caches: [n_slots, n_kv_heads * D], slot of position p
// of a sequence = table[p / block_tokens] * block_tokens + p % block_tokens). Query head h reads KV head h / G,
// G = n_heads / n_kv_heads. Scores are computed in f32 with an online softmax; no [T, T] matrix is ever stored.
//
// Decode (flash-decoding), any D with D % 8 == 0 and D <= 256, one query row per grid z:
//   attn_decode:  grid (n_splits, n_kv_heads * ceil(G / 8), rows), block 128. A block takes one query row, one KV
//                 head, up to 8 of its query heads and one split of 64 key positions; it writes the split's
//                 unnormalised output, max and sum (f32) to a workspace. Splits past the row's context return.
//   attn_combine: grid (n_heads, rows, ceil(D / 32)), block 128. Merges the splits of one (row, head) into 32
//                 dimensions of the output, 16 splits at a time in parallel, in a fixed order.
//   row_info[2r] = number of visible keys (position + 1), row_info[2r + 1] = offset of the row's block table in
//   `tables`. Because splits beyond the context simply return, a launch sized for a maximum context serves every
//   shorter one, which keeps the decode step replayable as a CUDA graph.
//
// Prefill (flash-attention 2 on tensor cores), D = 64 or 128:
//   attn_prefill: grid (ceil(max rows / 64), n_heads, n_seqs), block 128 = 4 warps x 16 query rows. K/V tiles of
//                 BKV positions (64 for D = 64, 32 for D = 128) are gathered through the block table with cp.async
//                 into two stages: tile t + 1 is in flight while tile t is computed (the Q tile is staged in the
//                 second stage's space before the first prefetch); S = Q K^T and O += P V run as mma.sync m16n8k16;
//                 P is rounded to the activation type for the second product. Tiles wholly after the last query
//                 position of the block are skipped.
//   seq_info[4s..4s+4] = (first row, rows, position of the first row, block-table offset).
#include "common.cuh"

#define ATT_SPLIT 64
#define ATT_THREADS 128
#define ATT_GB 8
#define ATT_DMAX 256
#define ATT_U 8  // K (then V) rows a decode thread loads back to back before it uses them
#define ATT_CMB_COLS 8     // combine: float4 columns per block (32 dimensions)
#define ATT_CMB_ROWS 16    // combine: split rows per block, ATT_THREADS / ATT_CMB_COLS
#define ATT_CMB_TILE 1024  // combine: splits whose weights sit in shared memory at once
#define ATT_CMB_U 8        // combine: 16-byte loads a thread issues before it adds them

template <class A>
__device__ __forceinline__ void attn_decode_impl(const u16* __restrict__ q, const u16* __restrict__ kc,
                                                 const u16* __restrict__ vc, const u32* __restrict__ row_info,
                                                 const u32* __restrict__ tables, float* __restrict__ part_o,
                                                 float* __restrict__ part_ml, int n_heads, int n_kv, int D, int bt,
                                                 float scale, int n_splits) {
    // `big` holds the query heads (f32) while scoring, then the per-part output sums while reducing.
    __shared__ __align__(16) float big[ATT_GB * 1024];
    __shared__ float ss[ATT_GB][ATT_SPLIT];
    __shared__ u32 sslot[ATT_SPLIT];
    const int split = blockIdx.x, r = blockIdx.z, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int G = n_heads / n_kv;
    const int gpk = (G + ATT_GB - 1) / ATT_GB;
    const int kvh = blockIdx.y / gpk, g0 = (blockIdx.y % gpk) * ATT_GB;
    const int gb = min(ATT_GB, G - g0);
    const int n_ctx = (int)row_info[2 * r], toff = (int)row_info[2 * r + 1];
    const int k_begin = split * ATT_SPLIT;
    if (k_begin >= n_ctx) return;
    const int nk = min(ATT_SPLIT, n_ctx - k_begin);
    const long kvw = (long)n_kv * D;
    const int h0 = kvh * G + g0;
    float* sq = big;  // [ATT_GB][D]

    for (int i = tid; i < gb * D; i += ATT_THREADS) {
        const int g = i / D, d = i % D;
        sq[g * D + d] = A::to_f32(q[((long)r * n_heads + h0 + g) * D + d]);
    }
    for (int j = tid; j < nk; j += ATT_THREADS) {
        const int p = k_begin + j;
        sslot[j] = tables[toff + p / bt] * (u32)bt + (u32)(p % bt);
    }
    __syncthreads();

    // Scores: TPK threads per key (power of two covering D / 8 chunks of 8), KPP keys per pass. A thread issues the
    // K loads of ATT_U passes back to back (ordered asm, so the compiler cannot sink each next to its use) and only
    // then computes, so one DRAM round trip serves up to ATT_U * KPP keys (all 64 of a split when D <= 128). Lanes
    // past the last chunk (sub >= chunks, when D / 8 is not a power of two) load chunk 0 and contribute 0; keys past
    // the split's end in the last pass load the last key and are not stored. The arithmetic per score (8 fused
    // multiply-adds in order, then the xor tree over the TPK lanes) is the same as one key per pass.
    const int chunks = D / 8;
    int tpk = 1;
    while (tpk < chunks) tpk <<= 1;
    const int kpp = ATT_THREADS / tpk, sub = tid % tpk, kq = tid / tpk;
    const bool sub_ok = sub < chunks;
    const int csub = sub_ok ? sub : 0;
    const u16* kbase = kc + (long)kvh * D + csub * 8;
    float qr[ATT_GB][8];  // this lane's 8 query values of each head, read once from shared memory
#pragma unroll
    for (int g = 0; g < ATT_GB; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) qr[g][i] = g < gb ? sq[g * D + csub * 8 + i] : 0.f;
    for (int j0 = 0; j0 < nk; j0 += ATT_U * kpp) {
        uint4 kr[ATT_U];
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            if (j0 + u * kpp < nk) {  // the same for the whole block
                const int j = min(j0 + u * kpp + kq, nk - 1);
                kr[u] = ld_stream_v4_ordered(kbase + (long)sslot[j] * kvw);
            }
        }
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            if (j0 + u * kpp >= nk) break;
            const int j = j0 + u * kpp + kq;
            float kf[8];
            unpack8<A>(kr[u], kf);
#pragma unroll
            for (int g = 0; g < ATT_GB; ++g) {
                if (g >= gb) break;
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) dot = fmaf(qr[g][i], kf[i], dot);
                if (!sub_ok) dot = 0.f;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
                    if (o < tpk) dot += __shfl_xor_sync(FULL_MASK, dot, o);
                if (sub == 0 && j < nk) ss[g][j] = dot * scale;
            }
        }
    }

    // Output: thread = (part, chunk of 8 dims); parts stride over the keys, then a fixed-order sum over parts. The
    // first ATT_U V rows of a thread are loaded before the softmax's barriers, so they travel while it runs; later
    // batches (D > 128) are loaded at the end of the previous one.
    const int np = ATT_THREADS / chunks, c = tid % chunks, part = tid / chunks;
    const u16* vbase = vc + (long)kvh * D + c * 8;
    uint4 vr[ATT_U];
    if (part < np) {
#pragma unroll
        for (int u = 0; u < ATT_U; ++u) {
            const int j = part + u * np;
            if (j < nk) vr[u] = ld_stream_v4_ordered(vbase + (long)sslot[j] * kvw);
        }
    }
    __syncthreads();

    // Softmax of the split, one warp per query head.
    for (int g = warp; g < gb; g += ATT_THREADS / 32) {
        const float s0 = lane < nk ? ss[g][lane] : -f32_inf();
        const float s1 = lane + 32 < nk ? ss[g][lane + 32] : -f32_inf();
        const float m = warp_max(fmaxf(s0, s1));
        const float p0 = lane < nk ? __expf(s0 - m) : 0.f;
        const float p1 = lane + 32 < nk ? __expf(s1 - m) : 0.f;
        const float l = warp_sum(p0 + p1);
        if (lane < nk) ss[g][lane] = p0;
        if (lane + 32 < nk) ss[g][lane + 32] = p1;
        if (lane == 0) {
            float* ml = part_ml + (((long)r * n_heads + h0 + g) * n_splits + split) * 2;
            ml[0] = m;
            ml[1] = l;
        }
    }
    __syncthreads();

    float acc[ATT_GB][8];
#pragma unroll
    for (int g = 0; g < ATT_GB; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    if (part < np) {
        for (int j0 = part; j0 < nk; j0 += ATT_U * np) {
#pragma unroll
            for (int u = 0; u < ATT_U; ++u) {
                const int j = j0 + u * np;
                if (j >= nk) break;
                float vf[8];
                unpack8<A>(vr[u], vf);
#pragma unroll
                for (int g = 0; g < ATT_GB; ++g) {
                    if (g >= gb) break;
                    const float p = ss[g][j];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
                }
            }
#pragma unroll
            for (int u = 0; u < ATT_U; ++u) {
                const int j = j0 + (ATT_U + u) * np;
                if (j < nk) vr[u] = ld_stream_v4_ordered(vbase + (long)sslot[j] * kvw);
            }
        }
    }
    float* red = big;  // [np][ATT_GB][D], np * D <= 1024
    __syncthreads();   // every thread is done with sq
    if (part < np) {
#pragma unroll
        for (int g = 0; g < ATT_GB; ++g) {
            if (g >= gb) break;
#pragma unroll
            for (int i = 0; i < 8; ++i) red[(part * ATT_GB + g) * D + c * 8 + i] = acc[g][i];
        }
    }
    __syncthreads();
    for (int i = tid; i < gb * D; i += ATT_THREADS) {
        const int g = i / D, d = i % D;
        float s = 0.f;
        for (int p = 0; p < np; ++p) s += red[(p * ATT_GB + g) * D + d];
        part_o[(((long)r * n_heads + h0 + g) * n_splits + split) * D + d] = s;
    }
}

// Combine: a block merges the splits of one (row, head) for 32 of its dimensions (grid z = ceil(D / 32)): thread =
// (split row 0..15, float4 column 0..7). The weights e^(m_s - M) of up to ATT_CMB_TILE splits are computed once into
// shared memory; each thread then walks splits srow, srow + 16, ... issuing ATT_CMB_U 16-byte loads before it adds
// them, and the 16 split rows are summed in a fixed order at the end, so the result is the same on every run.
template <class A>
__device__ __forceinline__ void attn_combine_impl(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                                  const u32* __restrict__ row_info, u16* __restrict__ out,
                                                  int n_heads, int D, int n_splits) {
    __shared__ float sw[ATT_CMB_TILE];
    __shared__ float red[ATT_CMB_ROWS][ATT_CMB_COLS * 4];
    __shared__ float scratch[32];
    const int h = blockIdx.x, r = blockIdx.y, d0 = blockIdx.z * ATT_CMB_COLS * 4;
    const int n_ctx = (int)row_info[2 * r];
    if (n_ctx == 0 || d0 >= D) return;  // a row of no sequence: left as it is
    const int tid = threadIdx.x, col = tid % ATT_CMB_COLS, srow = tid / ATT_CMB_COLS;
    const int ns = (n_ctx + ATT_SPLIT - 1) / ATT_SPLIT;
    const long base = ((long)r * n_heads + h) * n_splits;
    float m = -f32_inf();
    for (int s = tid; s < ns; s += ATT_THREADS) m = fmaxf(m, part_ml[(base + s) * 2]);
    m = block_max(m, scratch);
    const int dc = d0 + col * 4;  // D % 8 == 0, so a column is wholly inside D or wholly outside
    const float* po = part_o + base * D + dc;
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, den = 0.f;
    for (int t0 = 0; t0 < ns; t0 += ATT_CMB_TILE) {
        const int tn = min(ATT_CMB_TILE, ns - t0);
        __syncthreads();  // the previous tile's weights are used up
        for (int i = tid; i < tn; i += ATT_THREADS) {
            const float w = __expf(part_ml[(base + t0 + i) * 2] - m);
            sw[i] = w;
            den += w * part_ml[(base + t0 + i) * 2 + 1];
        }
        __syncthreads();
        if (dc < D) {
            for (int i0 = srow; i0 < tn; i0 += ATT_CMB_U * ATT_CMB_ROWS) {
                uint4 v[ATT_CMB_U];
#pragma unroll
                for (int u = 0; u < ATT_CMB_U; ++u) {
                    const int i = i0 + u * ATT_CMB_ROWS;
                    if (i < tn) v[u] = ld_stream_v4_ordered(po + (long)(t0 + i) * D);
                }
#pragma unroll
                for (int u = 0; u < ATT_CMB_U; ++u) {
                    const int i = i0 + u * ATT_CMB_ROWS;
                    if (i >= tn) break;
                    const float w = sw[i];
                    acc[0] = fmaf(w, __uint_as_float(v[u].x), acc[0]);
                    acc[1] = fmaf(w, __uint_as_float(v[u].y), acc[1]);
                    acc[2] = fmaf(w, __uint_as_float(v[u].z), acc[2]);
                    acc[3] = fmaf(w, __uint_as_float(v[u].w), acc[3]);
                }
            }
        }
    }
    den = block_sum(den, scratch);
#pragma unroll
    for (int k = 0; k < 4; ++k) red[srow][col * 4 + k] = acc[k];
    __syncthreads();
    const int d = d0 + tid;
    if (tid < ATT_CMB_COLS * 4 && d < D) {
        float num = 0.f;
        for (int rr = 0; rr < ATT_CMB_ROWS; ++rr) num += red[rr][tid];
        out[((long)r * n_heads + h) * D + d] = A::from_f32(num * (1.f / den));
    }
}

template <class A, int D, int BKV>
__device__ __forceinline__ void attn_prefill_impl(const u16* __restrict__ q, const u16* __restrict__ kc,
                                                  const u16* __restrict__ vc, const u32* __restrict__ seq_info,
                                                  const u32* __restrict__ tables, u16* __restrict__ out, int n_heads,
                                                  int n_kv, int bt, float scale) {
    constexpr int BQ = 64, ST = D + 8, CPR = D / 8;
    // Two stages of (K tile, V tile); the Q tile is staged in stage 1's space, which is free until the first
    // prefetch (issued after every warp holds its Q fragments in registers).
    constexpr int TILE = BKV * ST, QS = BQ * ST;
    constexpr int SMEM = 4 * TILE > 2 * TILE + QS ? 4 * TILE : 2 * TILE + QS;
    __shared__ __align__(16) u16 smem[SMEM];
    __shared__ u32 sslot[2][BKV];
    u16* const sQ = smem + 2 * TILE;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int s = blockIdx.z, h = blockIdx.y;
    const int row_start = (int)seq_info[4 * s], n_rows = (int)seq_info[4 * s + 1];
    const int pos0 = (int)seq_info[4 * s + 2], toff = (int)seq_info[4 * s + 3];
    const int q0 = blockIdx.x * BQ;
    if (q0 >= n_rows) return;
    const int kvh = h / (n_heads / n_kv);
    const long qw = (long)n_heads * D, kvw = (long)n_kv * D;
    const int kv_end = pos0 + min(q0 + BQ, n_rows);  // one past the last visible key of this block
    // Slot of key p (0 past the visible keys: such rows are zero-filled and masked).
    auto slot_of = [&](int p) -> u32 { return p < kv_end ? tables[toff + p / bt] * (u32)bt + (u32)(p % bt) : 0u; };
    // cp.async of the K and V rows of the tile starting at key j0 into stage `st`, from the slots in sslot[st].
    auto issue_tile = [&](int j0, int st) {
        u16* sK = smem + st * 2 * TILE;
        u16* sV = sK + TILE;
        for (int id = tid; id < BKV * CPR; id += ATT_THREADS) {
            const int rr = id / CPR, cc = id % CPR;
            const bool ok = j0 + rr < kv_end;
            const long off = ok ? (long)sslot[st][rr] * kvw + (long)kvh * D + cc * 8 : 0;
            cp_async16(smem_addr(&sK[rr * ST + cc * 8]), kc + off, ok);
            cp_async16(smem_addr(&sV[rr * ST + cc * 8]), vc + off, ok);
        }
    };

    for (int id = tid; id < BQ * CPR; id += ATT_THREADS) {
        const int rr = id / CPR, cc = id % CPR;
        const bool ok = q0 + rr < n_rows;
        const u16* src = q + (ok ? (long)(row_start + q0 + rr) * qw + (long)h * D + cc * 8 : 0);
        cp_async16(smem_addr(&sQ[rr * ST + cc * 8]), src, ok);
    }
    if (tid < BKV) {
        sslot[0][tid] = slot_of(tid);
        sslot[1][tid] = slot_of(BKV + tid);
    }
    __syncthreads();
    issue_tile(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const int row = warp * 16 + (lane & 15), col = ks * 16 + (lane >> 4) * 8;
        ldmatrix_x4(smem_addr(&sQ[row * ST + col]), qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3]);
    }
    __syncthreads();  // every warp holds its Q fragments: stage 1 may be overwritten

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float mrow[2] = {-f32_inf(), -f32_inf()}, lrow[2] = {0.f, 0.f};
    const int qpos0 = pos0 + q0 + warp * 16 + g;    // position of row g; row g + 8 is 8 further
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units, so exp2 can be used

    // Tile t is computed from stage t % 2 while tile t + 1 is copied into the other stage. Iteration t: issue tile
    // t + 1 (its slots were written in iteration t - 1), wait for tile t, compute it, then write the slots of tile
    // t + 2 into sslot[t % 2] (read from the table during the compute) for the next iteration's issue.
    for (int j0 = 0, st = 0; j0 < kv_end; j0 += BKV, st ^= 1) {
        if (j0 + BKV < kv_end) issue_tile(j0 + BKV, st ^ 1);
        cp_async_commit();  // possibly empty, so that "all but the newest group" is always tile t
        cp_async_wait<1>();
        __syncthreads();
        const u32 next_slot = tid < BKV ? slot_of(j0 + 2 * BKV + tid) : 0u;
        const u16* sK = smem + st * 2 * TILE;
        const u16* sV = sK + TILE;

        float sacc[BKV / 8][4];
#pragma unroll
        for (int i = 0; i < BKV / 8; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int nj = 0; nj < BKV / 16; ++nj) {
                const int row = nj * 16 + (lane & 7) + (lane >> 4) * 8, col = ks * 16 + ((lane >> 3) & 1) * 8;
                u32 b[4];
                ldmatrix_x4(smem_addr(&sK[row * ST + col]), b[0], b[1], b[2], b[3]);
                mma_16816<A>(sacc[2 * nj], qf[ks], b);
                mma_16816<A>(sacc[2 * nj + 1], qf[ks], b + 2);
            }
        }
        // Causal mask and online softmax; rows g and g + 8 of the warp's 16, each spread over a quad of lanes.
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int qpos = qpos0 + hf * 8;
            float mx = -f32_inf();
#pragma unroll
            for (int nt = 0; nt < BKV / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = j0 + nt * 8 + 2 * c + e;
                    float v = sacc[nt][2 * hf + e] * sl2;
                    if (key > qpos || key >= kv_end) v = -f32_inf();
                    sacc[nt][2 * hf + e] = v;
                    mx = fmaxf(mx, v);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            const float m_new = fmaxf(mrow[hf], mx);
            const float corr = exp2f(mrow[hf] - m_new);
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BKV / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(sacc[nt][2 * hf + e] - m_new);
                    sacc[nt][2 * hf + e] = p;
                    sum += p;
                }
            }
            lrow[hf] = lrow[hf] * corr + sum;
            mrow[hf] = m_new;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * hf] *= corr;
                o[dt][2 * hf + 1] *= corr;
            }
        }
        // O += P V with P (16 x BKV) as the A operand, straight from the score accumulators.
#pragma unroll
        for (int kk = 0; kk < BKV / 16; ++kk) {
            u32 pa[4];
            pa[0] = A::pack2(sacc[2 * kk][0], sacc[2 * kk][1]);
            pa[1] = A::pack2(sacc[2 * kk][2], sacc[2 * kk][3]);
            pa[2] = A::pack2(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1]);
            pa[3] = A::pack2(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3]);
#pragma unroll
            for (int dj = 0; dj < D / 16; ++dj) {
                const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = dj * 16 + (lane >> 4) * 8;
                u32 b[4];
                ldmatrix_x4_trans(smem_addr(&sV[row * ST + col]), b[0], b[1], b[2], b[3]);
                mma_16816<A>(o[2 * dj], pa, b);
                mma_16816<A>(o[2 * dj + 1], pa, b + 2);
            }
        }
        if (tid < BKV) sslot[st][tid] = next_slot;  // stage st's slots were read when tile t was issued
        __syncthreads();  // stage st is free for tile t + 2, and its slots are visible
    }

#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        float l = lrow[hf];
        l += __shfl_xor_sync(FULL_MASK, l, 1);
        l += __shfl_xor_sync(FULL_MASK, l, 2);
        const float inv = 1.f / l;
        const int row = q0 + warp * 16 + g + hf * 8;
        if (row < n_rows) {
            u16* orow = out + (long)(row_start + row) * qw + (long)h * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *(u32*)(orow + dt * 8 + 2 * c) = A::pack2(o[dt][2 * hf] * inv, o[dt][2 * hf + 1] * inv);
        }
    }
}

#define ATTENTION(act, A)                                                                                            \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_decode_##act(                                      \
        const u16* q, const u16* kc, const u16* vc, const u32* row_info, const u32* tables, float* part_o,           \
        float* part_ml, int n_heads, int n_kv, int D, int bt, float scale, int n_splits) {                           \
        attn_decode_impl<A>(q, kc, vc, row_info, tables, part_o, part_ml, n_heads, n_kv, D, bt, scale, n_splits);    \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_combine_##act(                                     \
        const float* part_o, const float* part_ml, const u32* row_info, u16* out, int n_heads, int D, int n_splits) { \
        attn_combine_impl<A>(part_o, part_ml, row_info, out, n_heads, D, n_splits);                                  \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_prefill_##act##_d64(                               \
        const u16* q, const u16* kc, const u16* vc, const u32* seq_info, const u32* tables, u16* out, int n_heads,   \
        int n_kv, int bt, float scale) {                                                                             \
        attn_prefill_impl<A, 64, 64>(q, kc, vc, seq_info, tables, out, n_heads, n_kv, bt, scale);                    \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_prefill_##act##_d128(                              \
        const u16* q, const u16* kc, const u16* vc, const u32* seq_info, const u32* tables, u16* out, int n_heads,   \
        int n_kv, int bt, float scale) {                                                                             \
        attn_prefill_impl<A, 128, 32>(q, kc, vc, seq_info, tables, out, n_heads, n_kv, bt, scale);                   \
    }
FOR_EACH_ACT(ATTENTION)
