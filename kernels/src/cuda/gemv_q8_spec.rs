//! Host-side mirror of the Q8-activation GEMV and the dequantisation of kernels/cuda/weights_q.cuh and gemv_q8.cu,
//! statement for statement (same byte offsets in the split layout of `repack.rs`, same `dp4a`/`prmt` integer tricks,
//! same order of the float scale arithmetic), checked against the CPU decoders (`quant::dequantize`, bit-exact with
//! gguf-py) on random blocks. No GPU is needed: this is where an index or a bit trick of the CUDA code is first
//! caught; `kernels/tests/parity.rs` runs the kernels themselves when a GPU is present.

use half::f16;

use super::repack;
use crate::DType;

// ------------------------------------------------------------------------------------------------------------------
// The device helpers.

fn dp4a_us(a: u32, b: u32, c: i32) -> i32 {
    (0..4).fold(c, |s, i| s + ((a >> (8 * i)) & 0xff) as i32 * ((b >> (8 * i)) & 0xff) as u8 as i8 as i32)
}

fn dp4a_ss(a: u32, b: u32, c: i32) -> i32 {
    (0..4).fold(c, |s, i| s + ((a >> (8 * i)) & 0xff) as u8 as i8 as i32 * ((b >> (8 * i)) & 0xff) as u8 as i8 as i32)
}

/// PTX `prmt.b32` in the default mode with selectors < 8 (the kernels never set a selector's bit 3).
fn prmt(a: u32, b: u32, sel: u32) -> u32 {
    let bytes = ((b as u64) << 32) | a as u64;
    (0..4).fold(0, |r, n| {
        let s = (sel >> (4 * n)) & 0xf;
        assert!(s < 8, "selector {s} would replicate a sign");
        r | ((((bytes >> (8 * s)) & 0xff) as u32) << (8 * n))
    })
}

fn dot16_us(w: [u32; 4], x: [u32; 4]) -> i32 {
    dp4a_us(w[3], x[3], dp4a_us(w[2], x[2], dp4a_us(w[1], x[1], dp4a_us(w[0], x[0], 0))))
}
fn dot16_ss(w: [u32; 4], x: [u32; 4]) -> i32 {
    dp4a_ss(w[3], x[3], dp4a_ss(w[2], x[2], dp4a_ss(w[1], x[1], dp4a_ss(w[0], x[0], 0))))
}

fn spread4(t: u32) -> u32 {
    ((t & 0xf).wrapping_mul(0x0020_4081)) & 0x0101_0101
}

const IQ4_T: [u32; 4] = [0xbfad_9881, 0xf6ea_ddcf, 0x2619_0d01, 0x7159_4535];

fn iq4_lut4(u: u32) -> u32 {
    let lo = prmt(IQ4_T[0], IQ4_T[1], u & 0x7777);
    let hi = prmt(IQ4_T[2], IQ4_T[3], u & 0x7777);
    prmt(lo, hi, 0x3210 | ((u & 0x8888) >> 1))
}

fn iq4_word(q: u32) -> (u32, u32) {
    let (v01, v23) = (iq4_lut4(q & 0xffff), iq4_lut4(q >> 16));
    (prmt(v01, v23, 0x6420), prmt(v01, v23, 0x7531))
}

fn u16_at(b: &[u8], at: usize) -> u32 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u32
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn v4_at(b: &[u8], at: usize) -> [u32; 4] {
    assert_eq!(at % 16, 0, "a 16-byte vector load must be aligned");
    [u32_at(b, at), u32_at(b, at + 4), u32_at(b, at + 8), u32_at(b, at + 12)]
}
fn f16lo(v: u32) -> f32 {
    f16::from_bits((v & 0xffff) as u16).to_f32()
}
fn f16hi(v: u32) -> f32 {
    f16::from_bits((v >> 16) as u16).to_f32()
}

// ------------------------------------------------------------------------------------------------------------------
// Q8 activations (quantize_q8_impl).

struct Q8Act {
    q: Vec<u8>,
    /// {d, s0, d, s1} per 32-block.
    m: Vec<[f32; 4]>,
}

impl Q8Act {
    fn new(x: &[f32]) -> Self {
        let mut q = Vec::with_capacity(x.len());
        let mut m = Vec::new();
        for b in x.chunks_exact(32) {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let (mut s0, mut s1) = (0i32, 0i32);
            for (i, &v) in b.iter().enumerate() {
                let c = ((v * id).round_ties_even() as i32).clamp(-127, 127);
                q.push(c as i8 as u8);
                if i < 16 {
                    s0 += c;
                } else {
                    s1 += c;
                }
            }
            m.push([d, d * s0 as f32, d, d * s1 as f32]);
        }
        Q8Act { q, m }
    }
    fn xq16(&self, a: usize, h: usize) -> [u32; 4] {
        v4_at(&self.q, 32 * a + 16 * h)
    }
    /// The activations as the kernel sees them: d * q.
    fn values(&self) -> Vec<f32> {
        self.q.iter().enumerate().map(|(i, &c)| self.m[i / 32][0] * c as i8 as f32).collect()
    }
}

// ------------------------------------------------------------------------------------------------------------------
// The formats: chunk geometry, `load_chunk` + `dot` fused (the loads are plain reads here), and `load1`.

fn geometry(dtype: DType) -> (usize, usize, usize) {
    // (QK, CHUNK, CPB)
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => (32, 32, 1),
        DType::Q2_K | DType::Q3_K => (256, 64, 4),
        _ => (256, 32, 8),
    }
}

fn k4_scales(head: [u32; 4], j: usize) -> (u32, u32) {
    let (s0, s1, s2) = (head[1], head[2], head[3]);
    let (sc4, m4) = if j < 2 {
        (s0 & 0x3f3f_3f3f, s1 & 0x3f3f_3f3f)
    } else {
        ((s2 & 0x0f0f_0f0f) | ((s0 >> 2) & 0x3030_3030), ((s2 >> 4) & 0x0f0f_0f0f) | ((s1 >> 2) & 0x3030_3030))
    };
    let sh = 16 * (j & 1);
    ((sc4 >> sh) & 0xffff, (m4 >> sh) & 0xffff)
}

fn k4_dot(lo: [u32; 4], hi: [u32; 4], head: [u32; 4], x: &Q8Act, row_a0: usize, c: usize, cc: usize) -> f32 {
    let (j, h) = (cc >> 1, cc & 1);
    let a0 = row_a0 + (c >> 3) * 8 + 2 * j;
    let (x0, x1) = (x.xq16(a0, h), x.xq16(a0 + 1, h));
    let (m0, m1) = ((x.m[a0][0], x.m[a0][1 + 2 * h]), (x.m[a0 + 1][0], x.m[a0 + 1][1 + 2 * h]));
    let (s0, s1) = (dot16_us(lo, x0), dot16_us(hi, x1));
    let (sc, mn) = k4_scales(head, j);
    let (d, dmin) = (f16lo(head[0]), f16hi(head[0]));
    let v = m0.0 * (s0 * (sc & 0xff) as i32) as f32 + m1.0 * (s1 * (sc >> 8) as i32) as f32;
    let mins = (mn & 0xff) as f32 * m0.1 + (mn >> 8) as f32 * m1.1;
    d * v - dmin * mins
}

/// One chunk of row `row` against the activations (whose 32-blocks for this row start at `row_a0` = 0 here).
fn chunk_dot(dtype: DType, qs: &[u8], sc: &[u8], row: usize, c: usize, k: usize, x: &Q8Act) -> f32 {
    let (qk, _, cpb) = geometry(dtype);
    let cc = c % cpb;
    let b = row * (k / qk) + c / cpb;
    match dtype {
        DType::Q5_0 | DType::Q5_1 => {
            let q = v4_at(qs, b * 16);
            let (d, m, qh) = if dtype == DType::Q5_0 {
                let r = b * 6;
                (f16lo(u16_at(sc, r)), 0.0, u16_at(sc, r + 2) | (u16_at(sc, r + 4) << 16))
            } else {
                let r = u64_at(sc, b * 8);
                (f16lo(r as u32), f16hi(r as u32), (r >> 32) as u32)
            };
            let (x0, x1) = (x.xq16(c, 0), x.xq16(c, 1));
            let mm = x.m[c];
            let mut lo = [0u32; 4];
            let mut hi = [0u32; 4];
            for i in 0..4 {
                lo[i] = (q[i] & 0x0f0f_0f0f) | (spread4(qh >> (4 * i)) << 4);
                hi[i] = ((q[i] >> 4) & 0x0f0f_0f0f) | (spread4(qh >> (16 + 4 * i)) << 4);
            }
            let s = dot16_us(lo, x0) + dot16_us(hi, x1);
            if dtype == DType::Q5_0 {
                d * (mm[0] * s as f32 - 16.0 * (mm[1] + mm[3]))
            } else {
                (d * mm[0]).mul_add(s as f32, m * (mm[1] + mm[3]))
            }
        }
        DType::IQ4_NL => {
            let q = v4_at(qs, b * 16);
            let d = f16lo(u16_at(sc, b * 2));
            let (x0, x1) = (x.xq16(c, 0), x.xq16(c, 1));
            let (mut lo, mut hi) = ([0u32; 4], [0u32; 4]);
            for i in 0..4 {
                (lo[i], hi[i]) = iq4_word(q[i]);
            }
            d * x.m[c][0] * (dot16_ss(lo, x0) + dot16_ss(hi, x1)) as f32
        }
        DType::Q4_K => {
            let q = v4_at(qs, b * 128 + 16 * cc);
            let head = v4_at(sc, b * 16);
            let lo = q.map(|w| w & 0x0f0f_0f0f);
            let hi = q.map(|w| (w >> 4) & 0x0f0f_0f0f);
            k4_dot(lo, hi, head, x, 0, c, cc)
        }
        DType::Q5_K => {
            let blk = b * 160;
            let (q, qh) = (v4_at(qs, blk + 32 + 16 * cc), v4_at(qs, blk + 16 * (cc & 1)));
            let head = v4_at(sc, b * 16);
            let j = cc >> 1;
            let (mut lo, mut hi) = ([0u32; 4], [0u32; 4]);
            for i in 0..4 {
                lo[i] = (q[i] & 0x0f0f_0f0f) | (((qh[i] >> (2 * j)) & 0x0101_0101) << 4);
                hi[i] = ((q[i] >> 4) & 0x0f0f_0f0f) | (((qh[i] >> (2 * j + 1)) & 0x0101_0101) << 4);
            }
            k4_dot(lo, hi, head, x, 0, c, cc)
        }
        DType::Q6_K => {
            let (h, kk) = (cc >> 2, cc & 3);
            let blk = b * 192;
            let (ql, qh) = (v4_at(qs, blk + 64 * h + 16 * kk), v4_at(qs, blk + 128 + 32 * h + 16 * (kk & 1)));
            let rest = b * 18;
            let (s0, s1, d) = (sc[rest + 8 * h + kk], sc[rest + 8 * h + 4 + kk], u16_at(sc, rest + 16));
            let sl = 2 * (kk >> 1);
            let (mut lo, mut hi) = ([0u32; 4], [0u32; 4]);
            for i in 0..4 {
                lo[i] = (ql[i] & 0x0f0f_0f0f) | (((qh[i] >> sl) & 0x0303_0303) << 4);
                hi[i] = ((ql[i] >> 4) & 0x0f0f_0f0f) | (((qh[i] >> (sl + 4)) & 0x0303_0303) << 4);
            }
            let a0 = (c >> 3) * 8 + 4 * h + (kk >> 1);
            let (a1, hx) = (a0 + 2, kk & 1);
            let (d0, d1) = (dot16_us(lo, x.xq16(a0, hx)), dot16_us(hi, x.xq16(a1, hx)));
            let v0 = x.m[a0][0].mul_add(d0 as f32, -32.0 * x.m[a0][1 + 2 * hx]);
            let v1 = x.m[a1][0].mul_add(d1 as f32, -32.0 * x.m[a1][1 + 2 * hx]);
            f16lo(d) * ((s0 as i8) as f32 * v0 + (s1 as i8) as f32 * v1)
        }
        DType::IQ4_XS => {
            let q = v4_at(qs, b * 128 + 16 * cc);
            let r = u64_at(sc, b * 8);
            let a = (c >> 3) * 8 + cc;
            let (mut lo, mut hi) = ([0u32; 4], [0u32; 4]);
            for i in 0..4 {
                (lo[i], hi[i]) = iq4_word(q[i]);
            }
            let s = dot16_ss(lo, x.xq16(a, 0)) + dot16_ss(hi, x.xq16(a, 1));
            f16lo(r as u32) * iq4_xs_scale(r, cc) as f32 * x.m[a][0] * s as f32
        }
        DType::Q2_K => {
            let (h, kk) = (cc >> 1, cc & 1);
            let q = v4_at(qs, b * 64 + 16 * cc);
            let rest = b * 20 + 8 * h;
            let (sa, sb, dd) = (u32_at(sc, rest), u32_at(sc, rest + 4), u32_at(sc, b * 20 + 16));
            let (mut v, mut mins) = (0f32, 0f32);
            for g in 0..4 {
                let a = (c >> 2) * 8 + 4 * h + g;
                let w = q.map(|w| (w >> (2 * g)) & 0x0303_0303);
                let s = dot16_us(w, x.xq16(a, kk));
                let sbyte = ((if g < 2 { sa } else { sb }) >> (8 * (2 * (g & 1) + kk))) & 0xff;
                v = x.m[a][0].mul_add((s * (sbyte & 0xf) as i32) as f32, v);
                mins = ((sbyte >> 4) as f32).mul_add(x.m[a][1 + 2 * kk], mins);
            }
            f16lo(dd) * v - f16hi(dd) * mins
        }
        DType::Q3_K => {
            let (h, kk) = (cc >> 1, cc & 1);
            let blk = b * 96;
            let (q, hm) = (v4_at(qs, blk + 32 + 16 * cc), v4_at(qs, blk + 16 * (cc & 1)));
            let rest = b * 14;
            let w0 = u16_at(sc, rest) | (u16_at(sc, rest + 2) << 16);
            let w1 = u16_at(sc, rest + 4) | (u16_at(sc, rest + 6) << 16);
            let w2 = u16_at(sc, rest + 8) | (u16_at(sc, rest + 10) << 16);
            let d = u16_at(sc, rest + 12);
            let mut v = 0f32;
            for g in 0..4 {
                let a = (c >> 2) * 8 + 4 * h + g;
                let mut cw = [0u32; 4];
                for i in 0..4 {
                    cw[i] = ((q[i] >> (2 * g)) & 0x0303_0303) | (((hm[i] >> (4 * h + g)) & 0x0101_0101) << 2);
                }
                let s = dot16_us(cw, x.xq16(a, kk));
                let scale = q3_scale(w0, w1, w2, 8 * h + 2 * g + kk);
                v = (scale as f32).mul_add(x.m[a][0].mul_add(s as f32, -4.0 * x.m[a][1 + 2 * kk]), v);
            }
            f16lo(d) * v
        }
        DType::Q8_0 => {
            let (q0, q1, d) = (v4_at(qs, b * 32), v4_at(qs, b * 32 + 16), f16lo(u16_at(sc, b * 2)));
            d * x.m[c][0] * (dot16_ss(q0, x.xq16(c, 0)) + dot16_ss(q1, x.xq16(c, 1))) as f32
        }
        DType::Q4_0 | DType::Q4_1 => {
            let q = v4_at(qs, b * 16);
            let dm = if dtype == DType::Q4_1 { u32_at(sc, b * 4) } else { u16_at(sc, b * 2) };
            let mm = x.m[c];
            let s = dot16_us(q.map(|w| w & 0x0f0f_0f0f), x.xq16(c, 0))
                + dot16_us(q.map(|w| (w >> 4) & 0x0f0f_0f0f), x.xq16(c, 1));
            if dtype == DType::Q4_1 {
                (f16lo(dm) * mm[0]).mul_add(s as f32, f16hi(dm) * (mm[1] + mm[3]))
            } else {
                f16lo(dm) * (mm[0] * s as f32 - 8.0 * (mm[1] + mm[3]))
            }
        }
        _ => unreachable!("{dtype} is not a Q8-activation format"),
    }
}

fn iq4_xs_scale(r: u64, j: usize) -> i32 {
    let sh = ((r >> 16) & 0xffff) as u32;
    let sl = (r >> 32) as u32;
    (((sl >> (4 * j)) & 0xf) | (((sh >> (2 * j)) & 3) << 4)) as i32 - 32
}

fn q3_scale(w0: u32, w1: u32, w2: u32, g: usize) -> i32 {
    let lb = g & 7;
    let lowb = ((if lb < 4 { w0 } else { w1 }) >> (8 * (lb & 3))) & 0xff;
    let low = (if g < 8 { lowb } else { lowb >> 4 }) & 0xf;
    let high = ((w2 >> (8 * (g & 3))) >> (2 * (g >> 2))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// `load1` of weights_q.cuh: element `e` of the tensor, dequantised in ggml's float order.
fn load1(dtype: DType, qs: &[u8], sc: &[u8], e: usize) -> f32 {
    let mul = |a: f32, b: f32| a * b; // __fmul_rn: no contraction in Rust either
    match dtype {
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
            let (b, j) = (e / 32, e % 32);
            let byte = qs[b * 16 + (j & 15)] as u32;
            let nib = if j >= 16 { byte >> 4 } else { byte & 0xf };
            match dtype {
                DType::Q5_0 => {
                    let r = b * 6;
                    let qh = u16_at(sc, r + 2) | (u16_at(sc, r + 4) << 16);
                    mul(f16lo(u16_at(sc, r)), ((nib | (((qh >> j) & 1) << 4)) as i32 - 16) as f32)
                }
                DType::Q5_1 => {
                    let r = u64_at(sc, b * 8);
                    let qh = (r >> 32) as u32;
                    mul(f16lo(r as u32), (nib | (((qh >> j) & 1) << 4)) as f32) + f16hi(r as u32)
                }
                _ => mul(f16lo(u16_at(sc, b * 2)), (iq4_lut4(nib) & 0xff) as u8 as i8 as f32),
            }
        }
        DType::Q4_K | DType::Q5_K => {
            let (b, i) = (e / 256, e % 256);
            let (p, l) = (i / 32, i % 32);
            let head = b * 16;
            let code = if dtype == DType::Q4_K {
                (qs[b * 128 + 32 * (p / 2) + l] as u32 >> (4 * (p % 2))) & 0xf
            } else {
                let blk = b * 160;
                let low = (qs[blk + 32 + 32 * (p / 2) + l] as u32 >> (4 * (p % 2))) & 0xf;
                low | (((qs[blk + l] as u32 >> p) & 1) << 4)
            };
            let s = &sc[head + 4..head + 16];
            let (scv, mn) = if p < 4 {
                (s[p] as u32 & 63, s[p + 4] as u32 & 63)
            } else {
                let a = s[p + 4] as u32;
                ((a & 0xf) | ((s[p - 4] as u32 >> 6) << 4), (a >> 4) | ((s[p] as u32 >> 6) << 4))
            };
            let dd = u32_at(sc, head);
            mul(mul(f16lo(dd), scv as f32), code as f32) - mul(f16hi(dd), mn as f32)
        }
        DType::Q6_K => {
            let (b, i) = (e / 256, e % 256);
            let (h, r) = (i / 128, i % 128);
            let blk = b * 192;
            let low = (qs[blk + 64 * h + r % 64] as u32 >> (4 * (r / 64))) & 0xf;
            let high = (qs[blk + 128 + 32 * h + r % 32] as u32 >> (2 * (r / 32))) & 3;
            let rest = b * 18;
            let s = sc[rest + i / 16] as i8 as f32;
            mul(mul(f16lo(u16_at(sc, rest + 16)), s), ((low | (high << 4)) as i32 - 32) as f32)
        }
        DType::IQ4_XS => {
            let (b, i) = (e / 256, e % 256);
            let (j, l) = (i / 32, i % 32);
            let byte = qs[b * 128 + 16 * j + (l & 15)] as u32;
            let code = (iq4_lut4(if l >= 16 { byte >> 4 } else { byte & 0xf }) & 0xff) as u8 as i8;
            let r = u64_at(sc, b * 8);
            mul(mul(f16lo(r as u32), iq4_xs_scale(r, j) as f32), code as f32)
        }
        DType::Q2_K => {
            let (b, i) = (e / 256, e % 256);
            let (h, g, l) = (i / 128, (i % 128) / 32, i % 32);
            let code = (qs[b * 64 + 32 * h + l] as u32 >> (2 * g)) & 3;
            let rest = b * 20;
            let (s, dd) = (sc[rest + i / 16] as u32, u32_at(sc, rest + 16));
            mul(mul(f16lo(dd), (s & 0xf) as f32), code as f32) - mul(f16hi(dd), (s >> 4) as f32)
        }
        DType::Q3_K => {
            let (b, i) = (e / 256, e % 256);
            let (h, g, l) = (i / 128, (i % 128) / 32, i % 32);
            let blk = b * 96;
            let low = ((qs[blk + 32 + 32 * h + l] >> (2 * g)) & 3) as i32;
            let high = (qs[blk + l] >> (i / 32)) & 1;
            let rest = b * 14;
            let g16 = i / 16;
            let (lowb, hb) = (sc[rest + (g16 & 7)] as u32, sc[rest + 8 + (g16 & 3)] as u32);
            let s =
                (((if g16 < 8 { lowb } else { lowb >> 4 }) & 0xf) | (((hb >> (2 * (g16 >> 2))) & 3) << 4)) as i32 - 32;
            let d = f16lo(u16_at(sc, rest + 12));
            mul(mul(d, s as f32), (if high == 1 { low } else { low - 4 }) as f32)
        }
        _ => unreachable!("{dtype} is not a Q8-activation format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::mix64;

    /// Random blocks with finite, moderate f16 scales (the rest of every byte random).
    fn blocks(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let bb = dtype.block_bytes();
        let mut v: Vec<u8> = (0..n * bb).map(|i| (mix64(seed ^ i as u64) >> 29) as u8).collect();
        let scales: &[usize] = match dtype {
            DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS => &[0],
            DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
            DType::Q2_K => &[80, 82],
            DType::Q3_K => &[108],
            DType::Q6_K => &[208],
            _ => unreachable!(),
        };
        for (b, blk) in v.chunks_exact_mut(bb).enumerate() {
            for (k, &at) in scales.iter().enumerate() {
                let d = 0.001 + (mix64(seed ^ (b * 7 + k) as u64) % 1000) as f32 * 1e-5;
                blk[at..at + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            }
        }
        v
    }

    #[test]
    fn dequantisation_mirror_equals_the_cpu_decoders_bit_for_bit() {
        // The formats dequantised by weights_q.cuh (Q8_0/Q4_0/Q4_1 use weights.cuh's, unchanged).
        for dtype in super::super::names::Q8_ACT_WEIGHT_DTYPES.into_iter().skip(3) {
            let n = 12;
            let ggml = blocks(dtype, n, dtype.block_bytes() as u64);
            let (split, at) = repack::split_blocks(dtype, &ggml).unwrap();
            let (qs, sc) = split.split_at(at);
            let mut want = vec![0f32; n * dtype.block_elems()];
            crate::quant::dequantize(dtype, &ggml, &mut want).unwrap();
            for (e, &w) in want.iter().enumerate() {
                let got = load1(dtype, qs, sc, e);
                assert_eq!(got.to_bits(), w.to_bits(), "{dtype} element {e}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn dp4a_gemv_mirror_equals_the_dequantised_dot_product() {
        for dtype in super::super::names::Q8_ACT_WEIGHT_DTYPES {
            let (qk, chunk, _) = geometry(dtype);
            let (rows, k) = (3, 4 * qk.max(256));
            let ggml = blocks(dtype, rows * k / qk, 17 + dtype.block_bytes() as u64);
            let (split, at) = repack::split_blocks(dtype, &ggml).unwrap();
            let (qs, sc) = split.split_at(at);
            let mut w = vec![0f32; rows * k];
            crate::quant::dequantize(dtype, &ggml, &mut w).unwrap();
            let x: Vec<f32> = (0..k).map(|i| ((mix64(99 ^ i as u64) % 2001) as f32 - 1000.0) / 700.0).collect();
            let xa = Q8Act::new(&x);
            let xv = xa.values();
            for row in 0..rows {
                // Lane order as the kernel's: chunk c, c + 32, ... per lane, then the lanes' sums.
                let got: f32 = (0..32)
                    .map(|lane| {
                        (lane..k / chunk).step_by(32).map(|c| chunk_dot(dtype, qs, sc, row, c, k, &xa)).sum::<f32>()
                    })
                    .sum();
                let wr = &w[row * k..(row + 1) * k];
                let want: f64 = wr.iter().zip(&xv).map(|(&a, &b)| a as f64 * b as f64).sum();
                let scale: f64 = wr.iter().zip(&xv).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!(
                    ((got as f64) - want).abs() <= 1e-5 * scale + 1e-6,
                    "{dtype} row {row}: {got} vs {want} (sum of |terms| {scale})"
                );
            }
        }
    }

    #[test]
    fn prmt_table_lookup_gives_the_iq4_values() {
        for nib in 0..16u32 {
            let v = (iq4_lut4(nib) & 0xff) as u8 as i8;
            assert_eq!(v, crate::superblock::IQ4_VALUES[nib as usize], "nibble {nib}");
        }
        let q = 0xfedc_ba98u32;
        let (lo, hi) = iq4_word(q);
        for i in 0..4 {
            let byte = (q >> (8 * i)) & 0xff;
            assert_eq!(((lo >> (8 * i)) & 0xff) as u8 as i8, crate::superblock::IQ4_VALUES[(byte & 0xf) as usize]);
            assert_eq!(((hi >> (8 * i)) & 0xff) as u8 as i8, crate::superblock::IQ4_VALUES[(byte >> 4) as usize]);
        }
    }

    #[test]
    fn spread4_puts_each_bit_in_its_byte() {
        for t in 0..16u32 {
            let s = spread4(t);
            for i in 0..4 {
                assert_eq!((s >> (8 * i)) & 0xff, (t >> i) & 1);
            }
        }
    }
}
