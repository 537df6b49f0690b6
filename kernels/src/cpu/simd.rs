//! Which instruction set the CPU kernels use, chosen once at run time.
//!
//! Every level computes exactly the same numbers: integer block dot products are exact whatever the instructions,
//! and the floating-point accumulation order is fixed by the definitions in [`super::dot`]. The level only changes
//! speed, so nodes with different CPUs stay bit-identical (see docs/ARCHITECTURE.md, determinism).

use std::fmt;

/// Instruction-set level of the CPU matmul kernels, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust; the definition every other level must reproduce bit for bit.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, integer dot products with `vpmaddubsw`.
    Avx2,
    /// AVX2 with the 256-bit VEX `vpdpbusd` of AVX-VNNI.
    AvxVnni,
    /// AVX-512 (F, BW, VL) with 512-bit `vpdpbusd` of AVX512-VNNI (and BMI2, which every such CPU has).
    Avx512Vnni,
}

impl SimdLevel {
    /// All levels, slowest first.
    pub const ALL: [SimdLevel; 4] = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::AvxVnni, SimdLevel::Avx512Vnni];

    /// The fastest level this CPU supports.
    pub fn detect() -> Self {
        Self::ALL.into_iter().rev().find(|l| l.is_supported()).unwrap_or(SimdLevel::Scalar)
    }

    /// Whether this CPU can run the level's kernels.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::AvxVnni => SimdLevel::Avx2.is_supported() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512Vnni => {
                SimdLevel::Avx2.is_supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("bmi2")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::AvxVnni => "avx-vnni",
            SimdLevel::Avx512Vnni => "avx512-vnni",
        }
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Defines `fn $name(avx2: bool, args…)` that calls the `#[inline(always)]` function `$body(args…)`, compiled for
/// AVX2 when `avx2` is set. For the element-wise loops of the backend, which the compiler vectorises: the source's
/// operations and their order are kept either way (no FMA contraction), so the results are the same bits, only
/// computed with wider vectors.
macro_rules! avx2_variant {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:path) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(avx2: bool, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: callers set `avx2` only when the CPU supports AVX2.
                return unsafe { wide($($arg),*) };
            }
            let _ = avx2;
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_variant;
