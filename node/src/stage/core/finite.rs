//! Hidden states entering a stage must be finite: a NaN or infinity is no output of an honest stage (the quantised
//! matmuls would turn it into zeros and the session would go on with garbage, `docs/SECURITY.md`, *Stage*), so the
//! stage refuses it and blames the stage that sent it. The test reads exponent bits in place, for every wire dtype,
//! without converting an element.

use shardline_proto::wire::{HiddenStates, WireDType};

/// Index of the first NaN or infinite element, if any.
pub fn first_non_finite(h: &HiddenStates) -> Option<usize> {
    match h.dtype() {
        WireDType::F32 => h.as_f32()?.iter().position(|v| !v.is_finite()),
        // binary16: exponent bits 10..15 all ones; bfloat16: bits 7..15.
        WireDType::F16 => first_all_ones(h.as_half::<u16>()?, 0x7C00),
        WireDType::BF16 => first_all_ones(h.as_half::<u16>()?, 0x7F80),
    }
}

fn first_all_ones(bits: &[u16], exponent: u16) -> Option<usize> {
    bits.iter().position(|b| b & exponent == exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half(dtype: WireDType, values: &[f32]) -> HiddenStates {
        let bits: Vec<u16> = match dtype {
            WireDType::F16 => values.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect(),
            _ => values.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect(),
        };
        HiddenStates::from_bytes(dtype, 1, values.len(), bytemuck::cast_slice(&bits)).unwrap()
    }

    #[test]
    fn finds_nan_and_infinities_in_every_dtype() {
        let fine = [0.0, -1.5, 6.0e4, -6.0e4, 1.0e-7];
        for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
            let mut v = fine.to_vec();
            v[i + 1] = bad;
            assert_eq!(first_non_finite(&HiddenStates::from_f32(1, v.len(), &v).unwrap()), Some(i + 1));
            for d in [WireDType::F16, WireDType::BF16] {
                assert_eq!(first_non_finite(&half(d, &v)), Some(i + 1), "{d:?} {bad}");
            }
        }
        assert_eq!(first_non_finite(&HiddenStates::from_f32(1, 5, &fine).unwrap()), None);
        for d in [WireDType::F16, WireDType::BF16] {
            assert_eq!(first_non_finite(&half(d, &fine)), None, "{d:?}");
        }
    }
}
