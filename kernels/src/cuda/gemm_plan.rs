//! Launch plan of the tensor-core GEMM (kernels/cuda/gemm.cu, docs/CUDA.md "GEMM"): which variant, how the weight
//! tile is filled, how much dynamic shared memory, and how K is split across blocks so that short prefills fill the
//! SMs. Pure host logic, so its tests (and the mirror of the kernel's index arithmetic below) run without a GPU.
//!
//! A block computes a `bm × bn` output tile (`bm` = 128 with 8 warps, or 64 with 4 warps for T ≤ 64; `bn` = 256
//! with 64 × 64 warp tiles, or 128 with 64 × 32 warp tiles for the scaled and the weights_q.cuh formats) in k-tiles of
//! 32. When the output tiles alone give fewer blocks than the device has SMs, K is split into `splits` contiguous
//! ranges of `kts` k-tiles; block z writes f32 partial sums to `ws[z][t][n]` and `gemv_reduce_*` adds them in the
//! order z = 0, 1, … (deterministic: the result depends on the plan only, not on the order in which blocks run).

// Used by the CUDA backend only; built without it for the tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::DType;

/// K elements per k-tile (`GEMM_BK`); one shared row is 32 × 2 bytes = four 16-byte chunks.
pub(crate) const GEMM_BK: usize = 32;
/// Largest T served by the 64-row variant (`gemm_small_*`).
pub(crate) const SMALL_T: usize = 64;
/// Least k-tiles per split (a split shorter than this spends more on its prologue and partial sums than it gains).
pub(crate) const MIN_KTS: usize = 8;
/// Most splits of one output tile.
pub(crate) const MAX_SPLITS: usize = 16;

/// Pipeline stages (`GEMM_STAGES`).
pub(crate) const GEMM_STAGES: usize = 4;

/// How the kernel fills its weight tile (`GEMM_DIRECT`, `GEMM_DEQ`, `GEMM_SCALED` and `GemmNarrow` in gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FillMode {
    /// Weights of the activation type, copied with `cp.async`.
    Direct,
    /// F32 or the other 16-bit type: fetched to registers before the math, converted into the tile after it.
    Deq,
    /// The weights_q.cuh formats: as `Deq`, with 64 × 32 warp tiles (`GemmNarrow`).
    DeqNarrow,
    /// Q8_0, Q4_0, Q4_1: integer codes in the tile, the block scale (and Q4_1's minimum) applied in f32 after the
    /// `mma`.
    Scaled,
}

impl FillMode {
    pub(crate) fn of(act: DType, w: DType) -> FillMode {
        match w {
            w if w == act => FillMode::Direct,
            DType::F32 | DType::F16 | DType::BF16 => FillMode::Deq,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => FillMode::Scaled,
            _ => FillMode::DeqNarrow,
        }
    }

    /// Columns of the block's output tile (`GEMM_BN(GemmNI<MODE, W>::value)`).
    pub(crate) fn bn(self) -> usize {
        match self {
            FillMode::Direct | FillMode::Deq => 256,
            FillMode::DeqNarrow | FillMode::Scaled => 128,
        }
    }
}

/// Bytes of dynamic shared memory of a block with `bm` activation rows (`GEMM_SMEM_BYTES(BM, BN, MODE)`).
pub(crate) fn smem_bytes(bm: usize, mode: FillMode) -> usize {
    let bn = mode.bn();
    let scales = if mode == FillMode::Scaled { bn * 8 } else { 0 };
    GEMM_STAGES * ((bm + bn) * GEMM_BK * 2 + scales)
}

/// One GEMM launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GemmPlan {
    /// `gemm_small_*` (64 rows, 128 threads) rather than `gemm_*` (128 rows, 256 threads).
    pub small: bool,
    pub bm: usize,
    pub threads: u32,
    pub grid: (u32, u32, u32),
    /// K-tiles per split (the kernel's `kts`); every k-tile when unsplit.
    pub kts: usize,
    pub splits: usize,
    pub smem: u32,
}

impl GemmPlan {
    /// Bytes of f32 partial sums the split needs (0 when unsplit).
    pub(crate) fn workspace_bytes(&self, t: usize, n: usize) -> usize {
        if self.splits > 1 { self.splits * t * n * 4 } else { 0 }
    }

    /// The k-tile range of split `z` (mirror of the kernel's, for the tests): `[z·kts, min(KT, (z+1)·kts))` (the kernel's `kbeg`, `kend`).
    #[cfg(test)]
    pub(crate) fn ktiles(&self, z: usize, k: usize) -> std::ops::Range<usize> {
        let kt = k.div_ceil(GEMM_BK);
        (z * self.kts).min(kt)..((z + 1) * self.kts).min(kt)
    }
}

/// The plan for `out[t, n] = x[t, k] · w[n, k]ᵀ` on a device with `sms` multiprocessors.
pub(crate) fn plan(t: usize, n: usize, k: usize, sms: usize, mode: FillMode) -> GemmPlan {
    let small = t <= SMALL_T;
    let (bm, bn) = (if small { 64 } else { 128 }, mode.bn());
    let tiles = n.div_ceil(bn) * t.div_ceil(bm);
    let kt = k.div_ceil(GEMM_BK).max(1);
    // Split into as many blocks as fit on the SMs at once (one wave: a second, part-filled wave would cost a whole
    // k-range's time): blocks of the 128-row variant hold an SM alone, the 64-row one fits two.
    let resident = sms * if small { 2 } else { 1 };
    let mut splits = 1;
    if tiles < sms {
        splits = (resident / tiles).min(MAX_SPLITS).min(kt / MIN_KTS).max(1);
    }
    let kts = kt.div_ceil(splits);
    let splits = kt.div_ceil(kts); // no empty split
    GemmPlan {
        small,
        bm,
        threads: if small { 128 } else { 256 },
        grid: (n.div_ceil(bn) as u32, t.div_ceil(bm) as u32, splits as u32),
        kts,
        splits,
        smem: smem_bytes(bm, mode) as u32,
    }
}

/// Byte offset of 16-byte chunk `c` (0..4) of row `r` in a tile of 64-byte rows (mirror of `gemm_swz`, for the tests).
#[cfg(test)]
pub(crate) fn swz(r: usize, c: usize) -> usize {
    r * 64 + ((c ^ ((r >> 1) & 3)) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::modules;

    fn gemm_source() -> &'static str {
        modules::module("gemm").expect("gemm module").source
    }

    /// The mirror above follows the kernel: constants and the index expressions are those of gemm.cu.
    #[test]
    fn mirror_matches_the_kernel_source() {
        let src = gemm_source();
        for needle in [
            "#define GEMM_BN(NI) (32 * (NI))".to_string(),
            "(MODE == GEMM_DIRECT || (MODE == GEMM_DEQ && !GemmNarrow<W>::value)) ? 8 : 4;".to_string(),
            format!("#define GEMM_BK {GEMM_BK}"),
            format!("#define GEMM_STAGES {GEMM_STAGES}"),
            "return (u32)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));".to_string(),
            "const int id = tid + i * NTHR, r = id >> 2, c = id & 3;".to_string(),
            "gemm_swz(wm + mi * 16 + (lane & 15), 2 * kk + (lane >> 4))".to_string(),
            "gemm_swz(wn + nj * 16 + (lane & 7) + (lane >> 4) * 8,".to_string(),
            "2 * kk + ((lane >> 3) & 1))".to_string(),
            "const int kbeg = blockIdx.z * kts, kend = min(KT, kbeg + kts);".to_string(),
            "float* wz = ws + (long)blockIdx.z * T * N;".to_string(),
            "(((BM) + (BN)) * 64 + ((MODE) == GEMM_SCALED ? (BN) * 8 : 0))".to_string(),
            "GEMM(f16, ActF16, q4_1, WQ4_1, GEMM_SCALED)".to_string(),
            "GEMM(bf16, ActBF16, q8_0, WQ8_0, GEMM_SCALED)".to_string(),
            "GEMM(f16, ActF16, f32, WF32, GEMM_DEQ)".to_string(),
        ] {
            assert!(src.contains(&needle), "gemm.cu no longer contains `{needle}`: update gemm_plan.rs");
        }
        let gemv = modules::module("gemv").expect("gemv module").source;
        assert!(
            gemv.contains("for (int z = 0; z < splits; ++z) s += ws[(long)z * tn + i];"),
            "gemv_reduce no longer adds the splits in order"
        );
    }

    #[test]
    fn swizzle_is_a_bijection_within_each_row() {
        for rows in [64, 128, 256] {
            let mut seen = vec![false; rows * 4];
            for r in 0..rows {
                for c in 0..4 {
                    let a = swz(r, c);
                    assert_eq!(a % 16, 0);
                    assert_eq!(a / 64, r, "chunk stays in its row");
                    assert!(!seen[a / 16], "row {r} chunk {c} collides");
                    seen[a / 16] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    /// Row and chunk each lane gives `ldmatrix.x4` (A: `a_frag`, B: `b_frag`), as in gemm.cu.
    fn a_lane(wm: usize, mi: usize, kk: usize, lane: usize) -> (usize, usize) {
        (wm + mi * 16 + (lane & 15), 2 * kk + (lane >> 4))
    }
    fn b_lane(wn: usize, nj: usize, kk: usize, lane: usize) -> (usize, usize) {
        (wn + nj * 16 + (lane & 7) + (lane >> 4) * 8, 2 * kk + ((lane >> 3) & 1))
    }

    /// Each ldmatrix phase (8 lanes, one 8x8 matrix: 8 row addresses of 16 bytes) hits 8 distinct 16-byte bank
    /// groups of the 128-byte bank window: no conflict.
    #[test]
    fn ldmatrix_phases_are_conflict_free() {
        let check = |addr: &dyn Fn(usize) -> usize, what: &str| {
            for phase in 0..4 {
                let mut groups: Vec<usize> = (0..8).map(|i| (addr(phase * 8 + i) / 16) % 8).collect();
                groups.sort();
                groups.dedup();
                assert_eq!(groups.len(), 8, "{what}, phase {phase}: bank groups collide");
            }
        };
        for wm in [0, 64] {
            for mi in 0..4 {
                for kk in 0..2 {
                    check(
                        &|l| {
                            let (r, c) = a_lane(wm, mi, kk, l);
                            swz(r, c)
                        },
                        &format!("A wm {wm} mi {mi} kk {kk}"),
                    );
                }
            }
        }
        for wn in [0, 32, 64, 96, 128, 160, 192, 224] {
            for nj in 0..4 {
                for kk in 0..2 {
                    check(
                        &|l| {
                            let (r, c) = b_lane(wn, nj, kk, l);
                            swz(r, c)
                        },
                        &format!("B wn {wn} nj {nj} kk {kk}"),
                    );
                }
            }
        }
        // The 16-byte cp.async stores of a warp (4 phases of 8 lanes) are conflict-free too.
        for nthr in [128, 256] {
            for i in 0..2 {
                for w in 0..nthr / 32 {
                    check(
                        &|l| {
                            let id = w * 32 + l + i * nthr;
                            swz(id >> 2, id & 3)
                        },
                        &format!("cp.async {nthr} threads warp {w}"),
                    );
                }
            }
        }
    }

    /// Fills a `rows`-row tile through the kernel's cp.async mapping (every element exactly once), reads it back
    /// with an emulated `ldmatrix.x4`, and checks every register of the mma fragments holds the element the
    /// m16n8k16 layout wants (docs of `mma_16816` in common.cuh).
    #[test]
    fn cp_async_mapping_and_fragments_cover_the_tile() {
        // value of logical element (r, k): a unique tag
        let tag = |r: usize, k: usize| (r * 32 + k) as u32;
        for (bm, nthr, bn, wtile) in [(128, 256, 256, 64), (64, 128, 256, 64), (128, 256, 128, 32), (64, 128, 128, 32)]
        {
            for rows in [bm, bn] {
                let mut smem = vec![u32::MAX; rows * 32];
                let mut writes = vec![0u32; rows * 4];
                for tid in 0..nthr {
                    for i in 0..rows * 4 / nthr {
                        let id = tid + i * nthr;
                        let (r, c) = (id >> 2, id & 3);
                        writes[r * 4 + c] += 1;
                        let at = swz(r, c) / 2;
                        for e in 0..8 {
                            smem[at + e] = tag(r, c * 8 + e);
                        }
                    }
                }
                assert!(writes.iter().all(|&w| w == 1), "bm {bm} rows {rows}: a chunk is loaded {writes:?} times");
                // ldmatrix.x4: matrix j takes its 8 row addresses from lanes 8j..8j+8; lane l receives, of matrix
                // j, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1.
                let ldm = |addr: &dyn Fn(usize) -> usize| -> [[(u32, u32); 4]; 32] {
                    let mut out = [[(0, 0); 4]; 32];
                    for (l, o) in out.iter_mut().enumerate() {
                        for (j, reg) in o.iter_mut().enumerate() {
                            let a = addr(8 * j + l / 4) / 2 + 2 * (l % 4);
                            *reg = (smem[a], smem[a + 1]);
                        }
                    }
                    out
                };
                for kk in 0..2 {
                    if rows == bm {
                        for wm in (0..bm).step_by(64) {
                            for mi in 0..4 {
                                let f = ldm(&|l| {
                                    let (r, c) = a_lane(wm, mi, kk, l);
                                    swz(r, c)
                                });
                                for (l, regs) in f.iter().enumerate() {
                                    let (g, c) = (l / 4, l % 4);
                                    let r0 = wm + mi * 16;
                                    let k0 = kk * 16;
                                    let want = [(g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)];
                                    for (reg, (dr, dk)) in regs.iter().zip(want) {
                                        assert_eq!(*reg, (tag(r0 + dr, k0 + dk), tag(r0 + dr, k0 + dk + 1)));
                                    }
                                }
                            }
                        }
                    }
                    if rows == bn {
                        for wn in (0..bn).step_by(wtile) {
                            for nj in 0..wtile / 16 {
                                let f = ldm(&|l| {
                                    let (r, c) = b_lane(wn, nj, kk, l);
                                    swz(r, c)
                                });
                                // registers: b[2nj][0], b[2nj][1], b[2nj+1][0], b[2nj+1][1]; b0 = W[n = g][2c..],
                                // b1 = W[g][2c + 8..] of the ni's 8 columns.
                                for (l, regs) in f.iter().enumerate() {
                                    let (g, c) = (l / 4, l % 4);
                                    let k0 = kk * 16;
                                    for (j, reg) in regs.iter().enumerate() {
                                        let n = wn + nj * 16 + (j / 2) * 8 + g;
                                        let k = k0 + 2 * c + (j % 2) * 8;
                                        assert_eq!(*reg, (tag(n, k), tag(n, k + 1)), "B nj {nj} kk {kk} lane {l}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn split_k_covers_every_k_tile_once_in_order() {
        for &(t, n, k) in &[
            (9, 4096, 4096),
            (64, 4096, 4096),
            (65, 4096, 4096),
            (256, 4096, 4096),
            (300, 4096, 14336),
            (9, 1024, 4096),
            (17, 45, 40),
            (130, 129, 72),
            (4096, 4096, 4096),
            (64, 14336, 4096),
            (9, 576, 1536),
        ] {
            for sms in [1, 108, 132] {
                let p = plan(t, n, k, sms, FillMode::Direct);
                let kt = k.div_ceil(GEMM_BK);
                let mut next = 0;
                for z in 0..p.splits {
                    let r = p.ktiles(z, k);
                    assert_eq!(r.start, next, "{t}x{n}x{k}: split {z} starts at {} not {next}", r.start);
                    assert!(!r.is_empty(), "{t}x{n}x{k} on {sms} SMs: split {z} is empty");
                    if z + 1 < p.splits {
                        assert_eq!(r.len(), p.kts);
                        assert!(p.splits == 1 || p.kts >= MIN_KTS, "{t}x{n}x{k}: splits of {} k-tiles", p.kts);
                    }
                    next = r.end;
                }
                assert_eq!(next, kt, "{t}x{n}x{k}: k-tiles not all covered");
                assert_eq!(p.grid.2 as usize, p.splits);
                assert_eq!(p.small, t <= SMALL_T);
                // Split only when the output tiles leave SMs idle, and never past one wave of resident blocks.
                if p.splits > 1 {
                    let tiles = (p.grid.0 as usize) * (p.grid.1 as usize);
                    assert!(tiles < sms);
                    assert!(p.splits <= MAX_SPLITS);
                    assert!(tiles * p.splits <= sms * if p.small { 2 } else { 1 }, "{t}x{n}x{k}: two waves");
                }
            }
        }
        // The shapes issue 16 names: T in 9..=256 fills an H100/H200 (132 SMs) at N = K = 4096.
        for t in [9, 32, 64, 65, 128, 256] {
            let p = plan(t, 4096, 4096, 132, FillMode::Direct);
            let blocks = p.grid.0 * p.grid.1 * p.grid.2;
            assert!(blocks >= 128, "T = {t}: {blocks} blocks");
        }
    }

    /// The split result depends on the plan only: each split sums its k-tiles in ascending order, the reduction adds
    /// the splits in ascending z. Emulated in f32 with the blocks run in two different orders: same bits.
    #[test]
    fn split_reduction_order_is_fixed() {
        let (t, n, k) = (3, 5, 32 * 40);
        let p = plan(t, n, k, 132, FillMode::Direct);
        assert!(p.splits > 1);
        let x: Vec<f32> = (0..t * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 113.0).collect();
        let run = |order: &[usize]| -> Vec<f32> {
            let mut ws = vec![f32::NAN; p.splits * t * n];
            for &z in order {
                for ti in 0..t {
                    for ni in 0..n {
                        let mut acc = 0f32;
                        for kt in p.ktiles(z, k) {
                            for kk in kt * GEMM_BK..((kt + 1) * GEMM_BK).min(k) {
                                acc += x[ti * k + kk] * w[ni * k + kk];
                            }
                        }
                        ws[(z * t + ti) * n + ni] = acc;
                    }
                }
            }
            // gemv_reduce: s = 0; for z in 0..splits: s += ws[z][i]
            (0..t * n).map(|i| (0..p.splits).fold(0f32, |s, z| s + ws[z * t * n + i])).collect()
        };
        let fwd: Vec<usize> = (0..p.splits).collect();
        let rev: Vec<usize> = (0..p.splits).rev().collect();
        let a = run(&fwd);
        let b = run(&rev);
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn shared_memory_fits_every_sm80_to_sm90_card() {
        // sm_86 / sm_89 allow 99 KiB (101,376 bytes) of dynamic shared memory per block, sm_80 163 KiB, sm_90 227 KiB.
        for mode in [FillMode::Direct, FillMode::Deq, FillMode::DeqNarrow, FillMode::Scaled] {
            for bm in [64, 128] {
                assert!(smem_bytes(bm, mode) <= 101_376, "{mode:?} bm {bm}: {}", smem_bytes(bm, mode));
            }
        }
        assert_eq!(smem_bytes(128, FillMode::Direct), 96 * 1024);
        assert_eq!(smem_bytes(128, FillMode::Scaled), 68 * 1024);
        assert_eq!(FillMode::of(DType::F16, DType::F16), FillMode::Direct);
        assert_eq!(FillMode::of(DType::BF16, DType::F16), FillMode::Deq);
        assert_eq!(FillMode::of(DType::BF16, DType::Q8_0), FillMode::Scaled);
        assert_eq!(FillMode::of(DType::F16, DType::Q4_K), FillMode::DeqNarrow);
        assert_eq!(FillMode::of(DType::F16, DType::F32), FillMode::Deq);
    }

    /// Why GEMM_SCALED (issue 16, "Parity details"), on the host in f32: bf16 activations, Q8_0 weights, one output
    /// row. Decode (`gemv.cu`, T = 1): each lane sums `d · Σ₁₆ x·q` over its 16-element chunks (chunk c, c + 32, …),
    /// then a butterfly over the 32 lanes. Prefill now: per 32-block `acc += d · Σ₃₂ x·q` (the two k16 `mma` of a
    /// k-tile summed, then scaled), split sums added in order. Prefill before: `Σ x · bf16(d·q)`, every weight rounded.
    /// Rounded to bf16, the new prefill equals decode on nearly every output and is never more than one unit in
    /// the last place away; the old one differed on most.
    #[test]
    fn scaled_prefill_rounds_like_decode() {
        use half::bf16;
        let (n, k) = (512usize, 4096usize);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let x: Vec<f32> =
            (0..k).map(|_| bf16::from_f32((next() % 2001) as f32 / 1000.0 - 1.0).to_f32()).collect::<Vec<_>>();
        let (mut same_new, mut same_old, mut worst_new) = (0, 0, 0f32);
        for _ in 0..n {
            let q: Vec<i8> = (0..k).map(|_| (next() % 255) as i64 as i8).map(|v| v.wrapping_sub(127)).collect();
            let d: Vec<f32> =
                (0..k / 32).map(|_| half::f16::from_f32((1 + next() % 1000) as f32 * 1e-5).to_f32()).collect();
            // decode: lanes over 16-element chunks, then a xor butterfly
            let mut lanes = [0f32; 32];
            for (c, lane) in (0..k / 16).map(|c| (c, c % 32)) {
                let s = (0..16).fold(0f32, |s, j| s + x[16 * c + j] * q[16 * c + j] as f32);
                lanes[lane] += d[c / 2] * s;
            }
            let mut width = 16;
            while width > 0 {
                let prev = lanes;
                for (l, v) in lanes.iter_mut().enumerate() {
                    *v = prev[l] + prev[l ^ width];
                }
                width /= 2;
            }
            let decode = bf16::from_f32(lanes[0]);
            // prefill now: per block d * (sum of two k16 halves)
            let mut acc = 0f32;
            for b in 0..k / 32 {
                let half =
                    |h: usize| (0..16).fold(0f32, |s, j| s + x[32 * b + 16 * h + j] * q[32 * b + 16 * h + j] as f32);
                acc += d[b] * (half(0) + half(1));
            }
            let new = bf16::from_f32(acc);
            // prefill before: each weight rounded to bf16
            let old =
                bf16::from_f32((0..k).fold(0f32, |s, i| s + x[i] * bf16::from_f32(d[i / 32] * q[i] as f32).to_f32()));
            same_new += (new == decode) as usize;
            same_old += (old == decode) as usize;
            let ulp = (bf16::from_bits(decode.to_bits() + 1).to_f32() - decode.to_f32()).abs();
            worst_new = worst_new.max((new.to_f32() - decode.to_f32()).abs() / ulp);
        }
        assert!(worst_new <= 1.0, "prefill {worst_new} ulp from decode");
        assert!(same_new * 100 >= n * 95, "only {same_new} of {n} outputs equal (scaled after the mma)");
        assert!(
            same_old * 100 <= n * 80,
            "{same_old} of {n} equal with rounded weights: the test cannot tell them apart"
        );
    }
}
