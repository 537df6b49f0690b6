//! ggml's 256-value super-block formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) and the 32-value Q5_0, Q5_1 and
//! IQ4_NL: byte layouts decoded into integer codes and scales.
//!
//! Every format reads as `x = (d · scale_g) · code − (dmin · min_g)` for the 16-value group `g` an element falls in
//! (a 32-value sub-block's scale serves both of its groups; formats without minimums have `min_g = 0`). The integer
//! form is what the matmul multiplies exactly against 8-bit activations (see `cpu/dot/mod.rs`), and the float
//! expression, evaluated in that order, is ggml's `dequantize_row_*` (and gguf-py's): the decoded values match those
//! bit for bit. Byte layouts follow `block_q2_K` … `block_iq4_xs` of ggml-common.h; `docs/REFERENCE.md` summarises
//! them.

use half::f16;

use crate::DType;

/// Elements per super-block (`QK_K` in ggml).
pub const QK_K: usize = 256;

/// The 16 values an IQ4_NL/IQ4_XS index selects (`kvalues_iq4nl` in ggml).
pub const IQ4_VALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// One super-block decoded to integers.
#[derive(Clone, Debug)]
pub struct SuperBlock {
    /// Super-scale of the group scales.
    pub d: f32,
    /// Super-scale of the group minimums (0 for formats without them).
    pub dmin: f32,
    /// Signed code of each element, in element order (offsets such as Q6_K's −32 already applied).
    pub codes: [i8; QK_K],
    /// Integer scale of each 16-value group.
    pub scales: [i8; 16],
    /// Integer minimum of each 16-value group (0 for formats without minimums).
    pub mins: [u8; 16],
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scales and minimums of the 8 sub-blocks of Q4_K and Q5_K (ggml `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// [`scale_min_k4`] on whole words, as ggml's SIMD kernels compute it: the 8 scales as the bytes of the first `u64`,
/// the 8 minimums as those of the second (`s` holds the 12 scale bytes).
#[inline(always)]
pub fn scale_min_k4_words(s: &[u8]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let [u0, u1, u2] = [0, 1, 2].map(|i| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]));
    let sc_lo = u0 & LOW6;
    let m_lo = u1 & LOW6;
    let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
    let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
    (sc_lo as u64 | (sc_hi as u64) << 32, m_lo as u64 | (m_hi as u64) << 32)
}

/// The 16 signed 6-bit scales of Q3_K.
#[inline]
pub fn scales_q3_k(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|k| {
        let low = if k < 8 { s[k] & 0x0f } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// The 8 signed 6-bit scales of IQ4_XS.
#[inline]
pub fn scales_iq4_xs(blk: &[u8]) -> [i8; 8] {
    let high = u16::from_le_bytes([blk[2], blk[3]]);
    std::array::from_fn(|j| {
        let low = (blk[4 + j / 2] >> (4 * (j % 2))) & 0x0f;
        (low | ((((high >> (2 * j)) & 3) as u8) << 4)) as i8 - 32
    })
}

/// Decodes one block of a super-block `dtype` (`blk` holds exactly its `block_bytes`).
pub fn decode(dtype: DType, blk: &[u8]) -> SuperBlock {
    debug_assert_eq!(blk.len(), dtype.block_bytes());
    let mut sb = SuperBlock { d: 0.0, dmin: 0.0, codes: [0; QK_K], scales: [0; 16], mins: [0; 16] };
    match dtype {
        DType::Q2_K => {
            let (scales, qs) = (&blk[..16], &blk[16..80]);
            sb.d = f16_at(blk, 80);
            sb.dmin = f16_at(blk, 82);
            for (e, c) in sb.codes.iter_mut().enumerate() {
                let (h, g, i) = (e / 128, (e % 128) / 32, e % 32);
                *c = ((qs[32 * h + i] >> (2 * g)) & 3) as i8;
            }
            for (g, &s) in scales.iter().enumerate() {
                sb.scales[g] = (s & 0x0f) as i8;
                sb.mins[g] = s >> 4;
            }
        }
        DType::Q3_K => {
            let (hmask, qs) = (&blk[..32], &blk[32..96]);
            sb.d = f16_at(blk, 108);
            for (e, c) in sb.codes.iter_mut().enumerate() {
                let (h, g, i) = (e / 128, (e % 128) / 32, e % 32);
                let low = ((qs[32 * h + i] >> (2 * g)) & 3) as i8;
                let high_set = (hmask[i] >> (e / 32)) & 1 == 1;
                *c = if high_set { low } else { low - 4 };
            }
            sb.scales = scales_q3_k(&blk[96..108]);
        }
        DType::Q4_K | DType::Q5_K => {
            sb.d = f16_at(blk, 0);
            sb.dmin = f16_at(blk, 2);
            let (sc, m) = scale_min_k4(&blk[4..16]);
            let (qh, qs) =
                if dtype == DType::Q5_K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
            for (e, c) in sb.codes.iter_mut().enumerate() {
                let (j, i) = (e / 32, e % 32);
                let low = (qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0f;
                let high = qh.map_or(0, |qh| ((qh[i] >> j) & 1) << 4);
                *c = (low | high) as i8;
            }
            for g in 0..16 {
                sb.scales[g] = sc[g / 2] as i8;
                sb.mins[g] = m[g / 2];
            }
        }
        DType::Q6_K => {
            let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
            sb.d = f16_at(blk, 208);
            for (e, c) in sb.codes.iter_mut().enumerate() {
                let (h, r) = (e / 128, e % 128);
                let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
                let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                *c = (low | (high << 4)) as i8 - 32;
            }
            for (o, &s) in sb.scales.iter_mut().zip(scales) {
                *o = s as i8;
            }
        }
        DType::IQ4_XS => {
            sb.d = f16_at(blk, 0);
            let sc = scales_iq4_xs(blk);
            let qs = &blk[8..136];
            for (e, c) in sb.codes.iter_mut().enumerate() {
                let (j, i) = (e / 32, e % 32);
                *c = IQ4_VALUES[((qs[16 * j + i % 16] >> (4 * (i / 16))) & 0x0f) as usize];
            }
            for g in 0..16 {
                sb.scales[g] = sc[g / 2];
            }
        }
        _ => debug_assert!(false, "{dtype} is not a super-block format"),
    }
    sb
}

/// Whether the format has group minimums (`x = … − dmin · min`).
pub const fn has_mins(dtype: DType) -> bool {
    matches!(dtype, DType::Q2_K | DType::Q4_K | DType::Q5_K)
}

/// Decodes a super-block to floats the way ggml does: `(d · scale) · code − (dmin · min)`.
pub fn dequantize(dtype: DType, blk: &[u8], out: &mut [f32]) {
    let sb = decode(dtype, blk);
    for (g, o) in out.chunks_exact_mut(16).enumerate() {
        let dl = sb.d * sb.scales[g] as f32;
        let ml = sb.dmin * sb.mins[g] as f32;
        for (v, &c) in o.iter_mut().zip(&sb.codes[16 * g..16 * g + 16]) {
            *v = if has_mins(dtype) { dl * c as f32 - ml } else { dl * c as f32 };
        }
    }
}

/// One 32-value block of Q5_0, Q5_1 or IQ4_NL decoded: scale `d`, minimum `m` (Q5_1 only, else 0) and the signed
/// codes, `x = d · code + m`.
pub fn decode32(dtype: DType, blk: &[u8]) -> (f32, f32, [i8; 32]) {
    let d = f16_at(blk, 0);
    let mut codes = [0i8; 32];
    match dtype {
        DType::IQ4_NL => {
            for (j, &q) in blk[2..18].iter().enumerate() {
                codes[j] = IQ4_VALUES[(q & 0x0f) as usize];
                codes[j + 16] = IQ4_VALUES[(q >> 4) as usize];
            }
            (d, 0.0, codes)
        }
        _ => {
            let q5_1 = dtype == DType::Q5_1;
            let at = if q5_1 { 4 } else { 2 };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let zero = if q5_1 { 0 } else { 16 };
            for (j, &q) in blk[at + 4..at + 20].iter().enumerate() {
                let h0 = ((qh >> j) & 1) as u8;
                let h1 = ((qh >> (j + 16)) & 1) as u8;
                codes[j] = ((q & 0x0f) | (h0 << 4)) as i8 - zero;
                codes[j + 16] = ((q >> 4) | (h1 << 4)) as i8 - zero;
            }
            (d, if q5_1 { f16_at(blk, 2) } else { 0.0 }, codes)
        }
    }
}

/// Decodes a Q5_0, Q5_1 or IQ4_NL block to floats as ggml does: `d · code`, plus `m` for Q5_1.
pub fn dequantize32(dtype: DType, blk: &[u8], out: &mut [f32]) {
    let (d, m, codes) = decode32(dtype, blk);
    for (o, &c) in out.iter_mut().zip(&codes) {
        *o = if dtype == DType::Q5_1 { d * c as f32 + m } else { d * c as f32 };
    }
}

/// ggml `quantize_row_q5_0_ref` (one block): the value of largest magnitude maps to −16,
/// `q = min(31, trunc(x/d + 16.5))`.
pub fn quantize_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = crate::quant::signed_absmax(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id + 16.5) as i8).min(31) as u8);
    push_q5(f16::from_f32(d), None, &q, out);
}

/// ggml `quantize_row_q5_1_ref` (one block): `d = (max − min) / 31`, `m = min`, `q = trunc((x − min)/d + 0.5)`.
pub fn quantize_q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: [u8; 32] = std::array::from_fn(|j| (((x[j] - min) * id + 0.5) as u8).min(31));
    push_q5(f16::from_f32(d), Some(f16::from_f32(min)), &q, out);
}

fn push_q5(d: f16, m: Option<f16>, q: &[u8; 32], out: &mut Vec<u8>) {
    out.extend_from_slice(&d.to_le_bytes());
    if let Some(m) = m {
        out.extend_from_slice(&m.to_le_bytes());
    }
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 >> 4) & 1) << j;
    }
    out.extend_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out.push((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_scales_are_the_byte_scales() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let s: [u8; 12] = std::array::from_fn(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 56) as u8
            });
            let (sc, m) = scale_min_k4(&s);
            assert_eq!(scale_min_k4_words(&s), (u64::from_le_bytes(sc), u64::from_le_bytes(m)), "scale bytes {s:?}");
        }
    }
}
