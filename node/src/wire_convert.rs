//! Conversions between the wire's own types (`shardline_proto::wire`) and the compute side's (`shardline_kernels`).
//! The protocol crate knows nothing of kernels, so the conversions live here, at the edge where both meet.

use shardline_kernels::{DType, SamplingParams};
use shardline_proto::wire::{WireDType, WireSampling};

/// The compute dtype of hidden states carried as `w`, for `Backend::upload_raw` / `download_raw`.
pub fn compute_dtype(w: WireDType) -> DType {
    match w {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::BF16 => DType::BF16,
    }
}

/// The wire dtype matching a backend's activation dtype (f32 for anything that is not a 16-bit float).
pub fn wire_dtype_of(d: DType) -> WireDType {
    match d {
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::BF16,
        _ => WireDType::F32,
    }
}

/// Sampling parameters as carried in `Open`.
pub fn sampling_to_wire(p: &SamplingParams) -> WireSampling {
    WireSampling {
        temperature: p.temperature,
        top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
        top_p: p.top_p,
        seed: p.seed,
    }
}

/// Sampling parameters a stage runs from an `Open` frame.
pub fn sampling_from_wire(w: &WireSampling) -> SamplingParams {
    SamplingParams { temperature: w.temperature, top_k: w.top_k as usize, top_p: w.top_p, seed: w.seed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_round_trips_and_saturates_top_k() {
        let p = SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, seed: 7 };
        assert_eq!(sampling_from_wire(&sampling_to_wire(&p)), p);
        let huge = SamplingParams { top_k: usize::MAX, ..p };
        assert_eq!(sampling_to_wire(&huge).top_k, u32::MAX);
    }

    #[test]
    fn dtypes_round_trip() {
        for w in [WireDType::F32, WireDType::F16, WireDType::BF16] {
            assert_eq!(wire_dtype_of(compute_dtype(w)), w);
        }
    }
}
