//! Split-K of the one-row decode GEMV (kernels/cuda/gemv.cu, docs/CUDA.md "GEMV"): how many blocks share the K
//! range of each output row. Pure host logic, so its tests run without a GPU.
//!
//! A GEMV block holds 4 warps of 2 output rows; a lane keeps 8 weight loads of 16 bytes in flight (one pipelined
//! group of `GEMV_UNROLL_T1` chunk steps per row), so one block puts 16 KiB in flight on its SM, against about
//! 20–26 KiB that an H100/H200 needs per SM (Little's law at ~600 ns). Splitting K across blocks whose f32 partial
//! sums `gemv_reduce_*` adds in a fixed order (deterministic, but rounded differently from the unsplit kernel) costs
//! a second launch (~1.5 µs); scripts/sass-report's model shows that this outweighs the gain while at least half the
//! SMs have a block (N = 1024, the K/V projections of a GQA model: 128 blocks on 132 SMs, stays unsplit), so only
//! shorter outputs are split, towards two blocks per SM.

// Used by the CUDA backend only; built without it for the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Output rows of one GEMV block (`GEMV_WARPS * GEMV_ROWS` in gemv.cu).
pub(crate) const GEMV_ROWS_PER_BLOCK: usize = 8;
/// Chunk steps per lane in one pipelined group at NT = 1 (`GemvUnroll<1>::U` in gemv.cu).
pub(crate) const GEMV_UNROLL_T1: usize = 4;
/// Most splits of one row (each adds `N * 4` bytes of partial sums and a share of the reduction).
pub(crate) const MAX_SPLITS: usize = 8;
/// Blocks per SM the split aims for.
const BLOCKS_PER_SM: usize = 2;

/// `(splits, chunks per split)` for a one-row GEMV of `n` outputs over `chunks` 16-byte chunks per row on a device
/// with `sms` multiprocessors; `(1, chunks)` when the output alone gives at least half the SMs a block or K is too
/// short to split (every split keeps at least two pipelined groups per lane, so one is in flight while one is computed).
/// The chunks per split are a multiple of a warp's group (`32 * GEMV_UNROLL_T1`), so only the last split has a
/// remainder.
pub(crate) fn split_k(n: usize, chunks: usize, sms: usize) -> (usize, usize) {
    let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK).max(1);
    if 2 * blocks >= sms {
        return (1, chunks);
    }
    let want = (BLOCKS_PER_SM * sms).div_ceil(blocks);
    let group = 32 * GEMV_UNROLL_T1;
    let splits = want.min(MAX_SPLITS).min(chunks / (2 * group));
    if splits <= 1 {
        return (1, chunks);
    }
    let cps = chunks.div_ceil(splits).next_multiple_of(group);
    (chunks.div_ceil(cps), cps)
}

/// Shared-memory bytes per 32 activations of the one-row Q8_0/Q4_0/Q4_1 GEMV that quantises its activations in the
/// block (`gemv1q_impl` in kernels/cuda/gemv_q8.cu: two 16-byte halves of int8 codes and a 16-byte meta).
pub(crate) const XS_BYTES_PER_BLOCK: usize = 48;
/// Most dynamic shared memory that GEMV takes: the default limit, so no opt-in and at K = 14336 (21 KiB) still ten
/// blocks per SM by shared memory, more than its registers allow.
pub(crate) const XS_MAX_SMEM: usize = 48 * 1024;

/// Launch plan of that GEMV for `n` outputs over `k` activations on `sms` multiprocessors: `(splits, chunks per
/// split, dynamic shared memory bytes)`, the split chosen by [`split_k`] over 32-value chunks; `None` when `k` is
/// not whole 32-blocks or a block's K range would need more than [`XS_MAX_SMEM`] (then the GEMV of gemv.cu on
/// 16-bit activations runs).
pub(crate) fn xs_plan(n: usize, k: usize, sms: usize) -> Option<(usize, usize, usize)> {
    if k == 0 || !k.is_multiple_of(32) {
        return None;
    }
    let chunks = k / 32;
    let (splits, cps) = split_k(n, chunks, sms);
    let smem = cps.min(chunks) * XS_BYTES_PER_BLOCK;
    (smem <= XS_MAX_SMEM).then_some((splits, cps, smem))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gemv1q_impl`'s shared-memory use, statement for statement: block z quantises 32-blocks `lo..hi` of the row
    /// into slots `0..hi - lo` of three arrays of 16-byte entries (halves 0, halves 1, metas), and a lane's step on
    /// chunk c reads slot c - lo of each. Every slot read is one the block wrote, every write is inside the plan's
    /// dynamic shared memory, and a warp's reads of one step are 32 consecutive 16-byte entries (no bank conflict).
    #[test]
    fn one_row_q8_blocks_read_only_what_they_quantised_inside_their_shared_memory() {
        for &(n, k, sms) in &[
            (4096, 4096, 132),
            (1024, 4096, 132),
            (4096, 14336, 132),
            (24, 8192, 132),
            (24, 16384, 108),
            (45, 96, 132),
            (512, 14336, 132),
            (64, 28672, 132),
            (576, 1536, 132),
        ] {
            let (splits, cps, smem) = xs_plan(n, k, sms).expect("fits");
            let chunks = k / 32;
            assert!(smem <= XS_MAX_SMEM);
            // Split blocks start on a whole group of every format (U = 2 and 4); unsplit, cps is the whole row.
            assert!(splits == 1 || cps % (32 * GEMV_UNROLL_T1) == 0, "n {n} k {k}: cps {cps}");
            assert!(splits > 1 || cps == chunks);
            let mut covered = vec![0u32; chunks];
            for z in 0..splits {
                let lo = (z * cps).min(chunks);
                let hi = (lo + cps).min(chunks);
                let nb = hi - lo;
                // Three arrays of nb 16-byte entries.
                assert!(3 * 16 * nb <= smem, "n {n} k {k}: {nb} blocks in {smem} bytes");
                let written: Vec<bool> = (0..nb).map(|_| true).collect();
                for u in [2, 4] {
                    for lane in 0..32 {
                        for c in lane_chunks(lo, hi, lane, u) {
                            let slot = c - lo;
                            assert!(slot < nb && written[slot]);
                            if u == 4 {
                                covered[c] += 1;
                            }
                        }
                    }
                }
                // One step of a warp: lanes read slots s, s + 1, ..., s + 31 (consecutive 16-byte entries).
                let s0: Vec<usize> =
                    (0..32).map(|lane| lane_chunks(lo, hi, lane, 4)).filter_map(|v| v.first().copied()).collect();
                assert!(s0.windows(2).all(|w| w[1] == w[0] + 1), "{s0:?}");
            }
            assert!(covered.iter().all(|&c| c == 1), "n {n} k {k}: every chunk read by one lane of one split");
        }
        assert_eq!(xs_plan(4096, 4096, 132), Some((1, 128, 6144)));
        assert_eq!(xs_plan(4096, 14336, 132), Some((1, 448, 21504)));
        assert_eq!(xs_plan(4096, 32768, 132), Some((1, 1024, 49152)));
        // Past 48 KiB unsplit: the 16-bit-activation GEMV of gemv.cu.
        assert_eq!(xs_plan(4096, 32800, 132), None);
        // A short output over a long K is split, and each split's range fits.
        assert!(matches!(xs_plan(64, 65536, 132), Some((s, _, m)) if s > 1 && m <= XS_MAX_SMEM));
        assert_eq!(xs_plan(8, 48, 132), None);
        assert_eq!(xs_plan(8, 0, 132), None);
    }

    /// The chunk ranges the kernel's blocks cover (block z: `[z * cps, min((z + 1) * cps, chunks))`).
    fn ranges(chunks: usize, splits: usize, cps: usize) -> Vec<std::ops::Range<usize>> {
        (0..splits).map(|z| z * cps..((z + 1) * cps).min(chunks)).collect()
    }

    #[test]
    fn short_outputs_are_split_and_every_chunk_is_covered_once() {
        // f16 K = 4096 (512 chunks) and K = 14336 (1792 chunks), on 132 and 108 SMs.
        for &(n, chunks, sms) in
            &[(512, 512, 132), (512, 1792, 132), (256, 512, 108), (256, 1792, 132), (64, 1792, 132)]
        {
            let (splits, cps) = split_k(n, chunks, sms);
            assert!(splits > 1, "n {n}, chunks {chunks}: not split");
            assert!(splits <= MAX_SPLITS);
            assert_eq!(cps % (32 * GEMV_UNROLL_T1), 0);
            let r = ranges(chunks, splits, cps);
            assert!(r.iter().all(|r| !r.is_empty()), "{r:?}");
            assert!(r.windows(2).all(|w| w[0].end == w[1].start), "{r:?}");
            assert_eq!((r[0].start, r[r.len() - 1].end), (0, chunks));
            // Every split keeps at least two groups per lane.
            assert!(r.iter().all(|r| r.len() >= 2 * 32 * GEMV_UNROLL_T1) || r.len() == 1, "{r:?}");
            // Enough blocks per SM, or as many splits as K allows.
            let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK) * splits;
            assert!(blocks >= BLOCKS_PER_SM * sms || splits == MAX_SPLITS || splits >= chunks / 256, "{blocks}");
        }
    }

    /// The chunks one lane visits in `gemv_impl` (kernels/cuda/gemv.cu), statement for statement: the pipelined
    /// main loop over whole groups of `u` steps (prefetching the next group when it is whole), then the remainder.
    fn lane_chunks(lo: usize, hi: usize, lane: usize, u: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        let mut c = lo + lane;
        let mut next: Vec<usize> = Vec::new();
        let mut more = c + 32 * (u - 1) < hi;
        if more {
            next = (0..u).map(|i| c + 32 * i).collect();
        }
        while more {
            let current = next.clone();
            let cn = c + 32 * u;
            more = cn + 32 * (u - 1) < hi;
            if more {
                next = (0..u).map(|i| cn + 32 * i).collect();
            }
            assert_eq!(current, (0..u).map(|i| c + 32 * i).collect::<Vec<_>>(), "the prefetched group is the one used");
            seen.extend(current);
            c = cn;
        }
        while c < hi {
            seen.push(c);
            c += 32;
        }
        seen
    }

    #[test]
    fn the_pipelined_loop_visits_every_chunk_of_its_range_once() {
        for u in [2, 4] {
            for &chunks in &[1usize, 31, 32, 72, 127, 128, 129, 255, 256, 512, 513, 1792] {
                for split in [false, true] {
                    let (splits, cps) =
                        if split { (3, (chunks.div_ceil(3)).next_multiple_of(32 * u)) } else { (1, chunks) };
                    let mut count = vec![0u32; chunks];
                    for z in 0..splits {
                        let lo = (z * cps).min(chunks);
                        let hi = (lo + cps).min(chunks);
                        for lane in 0..32 {
                            for c in lane_chunks(lo, hi, lane, u) {
                                assert!((lo..hi).contains(&c), "chunk {c} outside {lo}..{hi}");
                                count[c] += 1;
                            }
                        }
                    }
                    assert!(count.iter().all(|&n| n == 1), "u {u}, chunks {chunks}, split {split}: {count:?}");
                }
            }
        }
    }

    #[test]
    fn long_outputs_and_short_rows_are_not_split() {
        assert_eq!(split_k(4096, 512, 132), (1, 512)); // 512 blocks: ~3.9 per SM already
        assert_eq!(split_k(1024, 1792, 132), (1, 1792)); // 128 blocks: one on almost every SM
        assert_eq!(split_k(528, 512, 132), (1, 512)); // 66 blocks: half the SMs
        assert_eq!(split_k(14336, 512, 132), (1, 512));
        assert_eq!(split_k(256, 128, 132), (1, 128)); // Q4 K = 4096: one group per lane, nothing to split
        assert_eq!(split_k(576, 72, 132), (1, 72)); // SmolLM2-135M
    }
}
