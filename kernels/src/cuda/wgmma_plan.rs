//! Host side of the Hopper GEMM (kernels/cuda/gemm_sm90.cu, docs/CUDA.md "GEMM on Hopper"): when the backend
//! takes it, the parameters of its two TMA tensor maps, and a mirror of the shared-memory arithmetic that the
//! kernel, the TMA unit and `wgmma` must agree on (128-byte swizzle, matrix descriptors). Pure host logic, so the
//! tests below run without a GPU.
//!
//! The kernel computes 128 × 256 output tiles in k-tiles of 64 (one 128-byte row per tile row), without split-K.
//! The mma.sync GEMM (gemm.cu) splits K to fill the SMs; this one does not, so the host takes it only when its
//! output tiles alone keep the SMs busy enough to beat mma.sync: see [`use_wgmma`].

// The plan is used by the CUDA backend only (built without it for the tests); the mirror of the kernel's
// shared-memory arithmetic (swizzle, descriptors, accumulator layout) by the tests only.
#![cfg_attr(not(test), allow(dead_code))]

/// Block tile rows (`WG_BM`): two consumer warp groups of 64 rows.
pub(crate) const WG_BM: usize = 128;
/// Block tile columns (`WG_BN`): `wgmma.m64n256k16`.
pub(crate) const WG_BN: usize = 256;
/// K elements per k-tile (`WG_BK`): 64 × 2 bytes = one 128-byte swizzle row.
pub(crate) const WG_BK: usize = 64;
/// Pipeline stages (`WG_STAGES`).
pub(crate) const WG_STAGES: usize = 4;
/// Threads per block (`WG_THREADS`): one producer and two consumer warp groups.
pub(crate) const WG_THREADS: u32 = 384;
/// Bytes of one stage: the activation tile then the weight tile.
pub(crate) const WG_STAGE_BYTES: usize = (WG_BM + WG_BN) * WG_BK * 2;
/// Dynamic shared memory (`WG_SMEM_BYTES`): the stages and 1 KiB of slack to start them on a 1024-byte boundary.
pub(crate) const WG_SMEM_BYTES: usize = WG_STAGES * WG_STAGE_BYTES + 1024;
/// Shared memory a block may have on sm_90 (227 KiB), static included (the kernel's 1 KiB of barriers).
pub(crate) const SM90_MAX_BLOCK_SMEM: usize = 227 * 1024;

/// Fraction of the sm_90 dense tensor peak that `mma.sync` is assumed to reach (published microbenchmarks: 60–70%;
/// `MMA_SYNC_SM90` in scripts/sass-report). Not measured here: no GPU has run either kernel.
pub(crate) const MMA_SYNC_SM90: f64 = 0.65;
/// Fewest activation rows worth the path: below one full 128-row tile the mma.sync kernels (64-row tiles, split-K)
/// waste less.
pub(crate) const WG_MIN_T: usize = 128;

/// Useful fraction of the work the wgmma grid occupies the SMs for: `T·N` over (waves × SMs × one tile), where a
/// wave is one block per SM (192 KiB of shared memory each). Partial tiles at the T and N edges count as waste.
pub(crate) fn wave_efficiency(t: usize, n: usize, sms: usize) -> f64 {
    let tiles = t.div_ceil(WG_BM) * n.div_ceil(WG_BN);
    let waves = tiles.div_ceil(sms.max(1));
    (t * n) as f64 / (waves * sms.max(1) * WG_BM * WG_BN) as f64
}

/// Whether a GEMM of `t` rows (same-type 16-bit weights, sm_90) should take the wgmma kernel. The mma.sync GEMM
/// splits K until every SM works, at (by assumption) `MMA_SYNC_SM90` of the tensor rate; the wgmma kernel runs at
/// the full rate but only on the SMs its output tiles occupy. Per unit of work it wins when its wave efficiency
/// exceeds that ratio: time ∝ waves · tile / rate_wgmma against ≈ work / (SMs · rate_mma.sync).
/// Examples on 132 SMs: N = 4096 takes it from T = 687 (one wave of 96 tiles, 0.65; T = 640: 0.61, T = 1024:
/// 0.97), N = 14336 from T = 197 (112 tiles; T = 128: 56 tiles, 0.42).
pub(crate) fn use_wgmma(t: usize, n: usize, k: usize, sms: usize) -> bool {
    t >= WG_MIN_T && k.is_multiple_of(8) && k >= WG_BK && wave_efficiency(t, n, sms) >= MMA_SYNC_SM90
}

/// The parameters `cuTensorMapEncodeTiled` gets for a row-major `[rows, k]` matrix of 16-bit values read in boxes
/// of `box_rows` × 64 (innermost dimension first, as the driver wants them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TensorMapSpec {
    /// `globalDim`: {K, rows}.
    pub dims: [u64; 2],
    /// `globalStrides` (bytes, the dimensions above the innermost): {2 K}.
    pub strides: [u64; 1],
    /// `boxDim`: {64, box_rows}.
    pub box_dim: [u32; 2],
    /// `elementStrides`: {1, 1}.
    pub elem_strides: [u32; 2],
}

/// Why a matrix cannot be read through a tensor map (the driver's rules for `cuTensorMapEncodeTiled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MapError {
    /// The global address is not a multiple of 16 bytes.
    Misaligned(u64),
    /// A row's byte stride is not a multiple of 16 (K % 8 != 0) or not below 2^40.
    Stride(u64),
    /// A dimension is 0 or above 2^32.
    Dim(u64),
    /// The box is wider than the 128-byte swizzle span or taller than 256 rows.
    Box(u32, u32),
}

impl TensorMapSpec {
    /// The tensor map of a `[rows, k]` 16-bit matrix at device address `addr`, boxes of `box_rows` rows.
    pub(crate) fn new(addr: u64, rows: usize, k: usize, box_rows: usize) -> Result<Self, MapError> {
        if !addr.is_multiple_of(16) {
            return Err(MapError::Misaligned(addr));
        }
        let stride = 2 * k as u64;
        if !stride.is_multiple_of(16) || stride >= 1 << 40 {
            return Err(MapError::Stride(stride));
        }
        for d in [k as u64, rows as u64] {
            if d == 0 || d > 1 << 32 {
                return Err(MapError::Dim(d));
            }
        }
        // With the 128-byte swizzle the inner box dimension times the element size must not exceed 128 bytes;
        // every box dimension is at most 256.
        let box_dim = [WG_BK as u32, box_rows as u32];
        if box_dim[0] as usize * 2 > 128 || box_dim[1] == 0 || box_dim[1] > 256 {
            return Err(MapError::Box(box_dim[0], box_dim[1]));
        }
        Ok(Self { dims: [k as u64, rows as u64], strides: [stride], box_dim, elem_strides: [1, 1] })
    }

    /// Bytes one box writes into shared memory (what the producer's `arrive.expect_tx` announces; the TMA unit
    /// counts a box's zero-filled out-of-range elements too).
    pub(crate) fn box_bytes(&self) -> usize {
        self.box_dim[0] as usize * self.box_dim[1] as usize * 2
    }
}

/// Byte offset in a tile where the TMA unit stores 16-byte chunk `c` (0..8) of row `r` with the 128-byte swizzle:
/// rows of 128 bytes, chunk `c ^ (r % 8)`.
pub(crate) fn tma_swizzle128(r: usize, c: usize) -> usize {
    r * 128 + ((c ^ (r % 8)) << 4)
}

/// The address `wgmma` reads for a logical shared address `a` under the 128-byte swizzle: bits 4–6 XOR bits 7–9
/// (the pattern repeats every 1024 bytes, so a tile must start on a 1024-byte boundary for it to line up).
pub(crate) fn hw_swizzle128(a: u32) -> u32 {
    a ^ (((a >> 7) & 7) << 4)
}

/// Fields of a `wgmma` shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Desc {
    /// Start address (bytes; encoded >> 4 in 14 bits).
    pub start: u32,
    /// Leading dimension byte offset (bytes; encoded >> 4, bits 16–29).
    pub lbo: u32,
    /// Stride dimension byte offset (bytes; encoded >> 4, bits 32–45): between 8-row groups.
    pub sbo: u32,
    /// Matrix base offset (bits 49–51).
    pub base_offset: u32,
    /// Swizzle mode (bits 62–63): 0 none, 1 128-byte, 2 64-byte, 3 32-byte.
    pub swizzle: u32,
}

/// `wg_desc` of gemm_sm90.cu: the descriptor of a K-major, 128-byte-swizzled tile starting at `saddr`.
pub(crate) fn wg_desc(saddr: u32) -> u64 {
    (((saddr & 0x3FFFF) >> 4) as u64) | (1u64 << 16) | (((1024 >> 4) as u64) << 32) | (1u64 << 62)
}

impl Desc {
    pub(crate) fn decode(d: u64) -> Desc {
        Desc {
            start: ((d & 0x3FFF) as u32) << 4,
            lbo: (((d >> 16) & 0x3FFF) as u32) << 4,
            sbo: (((d >> 32) & 0x3FFF) as u32) << 4,
            base_offset: ((d >> 49) & 7) as u32,
            swizzle: ((d >> 62) & 3) as u32,
        }
    }
}

/// Shared address `wgmma` (K-major operand, 128-byte swizzle) reads for row `r` and 16-byte chunk `h` (0 or 1: k
/// 0–7 or 8–15 of the k16 step) of the matrix described by `desc`: rows 128 bytes apart within an 8-row group,
/// groups `sbo` apart, then the swizzle applied to the address.
pub(crate) fn wgmma_read_addr(desc: u64, r: usize, h: usize) -> u32 {
    let d = Desc::decode(desc);
    assert_eq!(d.swizzle, 1, "128-byte swizzle");
    let logical = d.start + (r / 8) as u32 * d.sbo + (r % 8) as u32 * 128 + (h as u32) * 16;
    hw_swizzle128(logical)
}

/// Offsets of a stage's tiles: (activation tile, weight tile) relative to the 1024-aligned base.
pub(crate) fn stage_tiles(s: usize) -> (usize, usize) {
    let a = s * WG_STAGE_BYTES;
    (a, a + WG_BM * WG_BK * 2)
}

/// Where accumulator `i` (0..128) of lane `lane` in warp `warp` (0..4) of a consumer warp group lands in its
/// 64 × 256 tile: (row, column); the `m16n8` accumulator layout repeated over 32 column groups of 8.
pub(crate) fn acc_position(warp: usize, lane: usize, i: usize) -> (usize, usize) {
    let (j, e) = (i / 4, i % 4);
    (16 * warp + lane / 4 + 8 * (e / 2), 8 * j + 2 * (lane % 4) + (e & 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::modules;

    fn source() -> &'static str {
        modules::module("gemm_sm90").expect("gemm_sm90 module").source
    }

    /// The constants and expressions mirrored here are those of gemm_sm90.cu.
    #[test]
    fn mirror_matches_the_kernel_source() {
        let src = source();
        for needle in [
            format!("#define WG_BM {WG_BM}"),
            format!("#define WG_BN {WG_BN}"),
            format!("#define WG_BK {WG_BK}"),
            format!("#define WG_STAGES {WG_STAGES}"),
            format!("#define WG_THREADS {WG_THREADS}"),
            "#define WG_SMEM_BYTES (WG_STAGES * WG_STAGE_BYTES + 1024)".to_string(),
            "return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);"
                .to_string(),
            "wg_desc(sa + 32 * kk), wg_desc(sb + 32 * kk)".to_string(),
            "(u32)(c * 64 * 128)".to_string(),
            "mbar_expect_tx(full0 + 8 * s, WG_STAGE_BYTES);".to_string(),
            "tma_load_2d(sa, ta, kt * WG_BK, m0, full0 + 8 * s);".to_string(),
            "tma_load_2d(sb, tb, kt * WG_BK, n0, full0 + 8 * s);".to_string(),
            "const u32 base = (smem_addr(wg_smem) + 1023u) & ~1023u;".to_string(),
            "const float v0 = acc[4 * j + 2 * half], v1 = acc[4 * j + 2 * half + 1];".to_string(),
            "const int m = m0 + c * 64 + warp * 16 + g + half * 8;".to_string(),
            "const int n = n0 + j * 8 + 2 * c4;".to_string(),
        ] {
            assert!(src.contains(&needle), "gemm_sm90.cu no longer contains `{needle}`: update wgmma_plan.rs");
        }
        // One wrapper macro, instantiated for both 16-bit types (f32 accumulators, both operands of one type).
        assert!(src.contains(r#""wgmma.mma_async.sync.aligned.m64n256k16.f32." #T "." #T " ""#));
        assert!(src.contains("WGMMA_M64N256K16(f16)"));
        assert!(src.contains("WGMMA_M64N256K16(bf16)"));
    }

    #[test]
    fn shared_memory_fits_one_block_per_sm() {
        assert_eq!(WG_STAGE_BYTES, 48 * 1024);
        // The kernel's static shared memory (the mbarriers, padded by ptxas to 1 KiB) comes on top.
        const { assert!(WG_SMEM_BYTES + 1024 <= SM90_MAX_BLOCK_SMEM) };
        // Every tile starts on a 1024-byte boundary once the base is.
        for s in 0..WG_STAGES {
            let (a, b) = stage_tiles(s);
            assert_eq!(a % 1024, 0);
            assert_eq!(b % 1024, 0);
            assert!(b + WG_BN * WG_BK * 2 <= WG_SMEM_BYTES - 1024);
        }
        // The two TMA boxes of a stage are exactly the bytes the producer announces.
        let a = TensorMapSpec::new(0, 4096, 4096, WG_BM).unwrap();
        let b = TensorMapSpec::new(0, 4096, 4096, WG_BN).unwrap();
        assert_eq!(a.box_bytes() + b.box_bytes(), WG_STAGE_BYTES);
    }

    /// The descriptor's fields decode to what the layout needs: the start address in 16-byte units, SBO 1024,
    /// the 128-byte swizzle, base offset 0 (tiles are 1024-aligned), and the start of every k16 step of every stage
    /// (up to 193 KiB) fits the 14-bit field (addresses below 256 KiB).
    #[test]
    fn descriptor_fields() {
        for s in 0..WG_STAGES {
            let (a, b) = stage_tiles(s);
            for base in [0u32, 1024, 0x400 * 7] {
                for off in [a, a + 64 * 128, b] {
                    for kk in 0..WG_BK / 16 {
                        let addr = base + off as u32 + 32 * kk as u32;
                        let d = Desc::decode(wg_desc(addr));
                        assert_eq!(d, Desc { start: addr, lbo: 16, sbo: 1024, base_offset: 0, swizzle: 1 });
                        assert!(addr < 1 << 18);
                    }
                }
            }
        }
        // Bits outside the five fields are zero.
        let d = wg_desc(0x3FFF0);
        assert_eq!(d & !(0x3FFFu64 | 0x3FFF << 16 | 0x3FFF << 32 | 7 << 49 | 3 << 62), 0);
    }

    /// The heart of the layout: for every row of a 128- or 256-row tile, every k16 step of the k-tile and both
    /// 8-element halves of it, the address `wgmma` reads through the descriptor (start advanced 32 bytes per k16
    /// step, SBO 1024, hardware swizzle) is where the TMA unit stored those 8 elements (chunk 2 kk + h of the row).
    /// Also with the consumer's 64-row offset into the activation tile, and for every stage.
    #[test]
    fn descriptor_reads_what_the_tma_wrote() {
        for s in 0..WG_STAGES {
            let (ta, tb) = stage_tiles(s);
            for (tile, rows, row0) in [(ta, 64, 0), (ta, 64, 64), (tb, WG_BN, 0)] {
                let base = 0x400u32 * 3; // any 1024-aligned base
                let start = base + tile as u32 + (row0 * 128) as u32;
                for kk in 0..WG_BK / 16 {
                    let desc = wg_desc(start + 32 * kk as u32);
                    for r in 0..rows {
                        for h in 0..2 {
                            let want = base + tile as u32 + tma_swizzle128(row0 + r, 2 * kk + h) as u32;
                            assert_eq!(wgmma_read_addr(desc, r, h), want, "stage {s} row {r} kk {kk} h {h}");
                        }
                    }
                }
            }
        }
    }

    /// Without the swizzle (or with a base that is not 1024-aligned) the same reads would be wrong: the test above
    /// is not vacuous.
    #[test]
    fn a_misaligned_tile_would_be_read_wrongly() {
        let base = 512u32;
        let desc = wg_desc(base + 32);
        let wrong = (0..8).any(|r| wgmma_read_addr(desc, r, 0) != base + tma_swizzle128(r, 2) as u32);
        assert!(wrong);
    }

    /// Each row's 8 chunks are a permutation (the swizzle loses nothing), and the 8 rows of a group put a given
    /// logical chunk in 8 different 16-byte bank groups (conflict-free reads of a column of core matrices).
    #[test]
    fn swizzle_is_a_bijection_and_conflict_free() {
        for r in 0..256 {
            let mut seen = [false; 8];
            for c in 0..8 {
                let o = tma_swizzle128(r, c);
                assert_eq!(o / 128, r);
                seen[(o % 128) / 16] = true;
            }
            assert!(seen.iter().all(|&x| x));
        }
        for g in 0..32 {
            for c in 0..8 {
                let mut banks: Vec<usize> = (0..8).map(|i| (tma_swizzle128(8 * g + i, c) % 128) / 16).collect();
                banks.sort();
                banks.dedup();
                assert_eq!(banks.len(), 8);
            }
        }
    }

    /// The epilogue covers the 64 × 256 tile of a warp group exactly once.
    #[test]
    fn accumulators_cover_the_tile_once() {
        let mut hit = vec![0u8; 64 * 256];
        for warp in 0..4 {
            for lane in 0..32 {
                for i in 0..128 {
                    let (r, c) = acc_position(warp, lane, i);
                    hit[r * 256 + c] += 1;
                }
            }
        }
        assert!(hit.iter().all(|&h| h == 1));
    }

    #[test]
    fn tensor_map_parameters() {
        let a = TensorMapSpec::new(0x7f00_0000_0100, 300, 4096, WG_BM).unwrap();
        assert_eq!(a.dims, [4096, 300]);
        assert_eq!(a.strides, [8192]);
        assert_eq!(a.box_dim, [64, 128]);
        assert_eq!(a.elem_strides, [1, 1]);
        assert_eq!(TensorMapSpec::new(0x108, 300, 4096, WG_BM), Err(MapError::Misaligned(0x108)));
        assert_eq!(TensorMapSpec::new(0x100, 300, 4100, WG_BM), Err(MapError::Stride(8200)));
        assert_eq!(TensorMapSpec::new(0x100, 0, 4096, WG_BM), Err(MapError::Dim(0)));
        assert_eq!(TensorMapSpec::new(0x100, 10, 4096, 512), Err(MapError::Box(64, 512)));
        // Ragged shapes are fine: the TMA unit zero-fills past K and past the rows.
        assert!(TensorMapSpec::new(0x100, 1, 8, WG_BN).is_ok());
    }

    /// The wave rule on an H100/H200 (132 SMs) for the prefill shapes of docs/CUDA.md.
    #[test]
    fn which_shapes_take_wgmma() {
        let sms = 132;
        assert!(!use_wgmma(64, 4096, 4096, sms), "under one tile of rows");
        assert!(!use_wgmma(512, 4096, 4096, sms), "64 tiles on 132 SMs");
        assert!(!use_wgmma(640, 4096, 4096, sms));
        assert!(!use_wgmma(686, 4096, 4096, sms));
        assert!(use_wgmma(687, 4096, 4096, sms));
        assert!(!use_wgmma(196, 14336, 4096, sms));
        assert!(use_wgmma(197, 14336, 4096, sms));
        assert!(use_wgmma(1024, 4096, 4096, sms));
        assert!(use_wgmma(4096, 4096, 4096, sms));
        assert!(!use_wgmma(128, 14336, 4096, sms));
        assert!(use_wgmma(256, 14336, 4096, sms));
        assert!(use_wgmma(2048, 14336, 4096, sms));
        assert!(!use_wgmma(4096, 4096, 4100, sms), "K % 8 != 0: no tensor map");
        assert!(!use_wgmma(4096, 4096, 32, sms), "K under one k-tile");
        let e = wave_efficiency(1024, 4096, sms);
        assert!((e - 128.0 / 132.0).abs() < 1e-12, "{e}");
    }
}
