//! Names of the kernel entry points (`extern "C"` in kernels/cuda/*.cu) as the host launches them: module and
//! function. One place, so that the NVRTC test can check that every name the host uses exists in the PTX.

use crate::DType;

/// Plain weight dtypes: their GEMV reads 16-bit activations (kernels/cuda/gemv.cu, formats in weights.cuh).
pub const WEIGHT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
/// Quantised weight dtypes: their GEMV reads Q8-quantised activations with `dp4a` (kernels/cuda/gemv_q8.cu; GEMV
/// units of Q8_0/Q4_0/Q4_1 and everything of the other formats in weights_q.cuh). With [`WEIGHT_DTYPES`] these are
/// every format a GGUF file may hold that the CPU backend computes with, so the CUDA backend takes every weight the
/// CPU takes.
pub const Q8_ACT_WEIGHT_DTYPES: [DType; 12] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::IQ4_NL,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_XS,
];

/// Whether the CUDA backend has kernels for weights of `dtype`.
pub fn weight_supported(dtype: DType) -> bool {
    WEIGHT_DTYPES.contains(&dtype) || Q8_ACT_WEIGHT_DTYPES.contains(&dtype)
}

/// Q8_0/Q4_0/Q4_1 at T = 1 do not run `quantize_q8_*` + the gemv_q8.cu tile: their one-row GEMV (and split-K, and
/// gate|up) quantise the activations inside the GEMV block, into shared memory ([`gemv_xs`], gemv_q8.cu), or, when
/// that would not fit, run on 16-bit activations in `gemv.cu` (docs/CUDA.md, "Quantised GEMV").
pub fn one_row_on_act(w: DType) -> bool {
    matches!(w, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
}

/// The module holding the decode GEMV kernel of weights `w` for `tile` activation rows (1 also for split-K).
pub fn gemv_module(w: DType, tile: usize) -> &'static str {
    if Q8_ACT_WEIGHT_DTYPES.contains(&w) && !(tile == 1 && one_row_on_act(w)) { "gemv_q8" } else { "gemv" }
}
/// Activation dtypes of the CUDA backend.
pub const ACT_DTYPES: [DType; 2] = [DType::F16, DType::BF16];
/// Decode GEMV row-tile sizes (activation rows sharing one pass over the weights).
pub const GEMV_TILES: [usize; 4] = [1, 2, 4, 8];
/// Head sizes of the tensor-core prefill attention.
pub const PREFILL_HEAD_DIMS: [usize; 2] = [64, 128];

pub fn embedding(act: DType, w: DType) -> String {
    format!("embedding_{act}_{w}")
}
pub fn rms_norm(act: DType, w: DType) -> String {
    format!("rms_norm_{act}_{w}")
}
pub fn add_rms_norm(act: DType, w: DType) -> String {
    format!("add_rms_norm_{act}_{w}")
}
pub fn rope(act: DType) -> String {
    format!("rope_{act}")
}
pub fn swiglu(act: DType) -> String {
    format!("swiglu_{act}")
}
pub fn add(act: DType) -> String {
    format!("add_{act}")
}
pub fn add_bias(act: DType, w: DType) -> String {
    format!("add_bias_{act}_{w}")
}
pub const KV_STORE: &str = "kv_store_b16";
pub fn gemv(act: DType, w: DType, tile: usize) -> String {
    format!("gemv_{act}_{w}_t{tile}")
}
/// The gate|up GEMV whose epilogue stores `silu(gate) * up` (kernels/cuda/gemv.cu, gemv_q8.cu; module as
/// [`gemv_module`]).
pub fn gemv_swiglu(act: DType, w: DType, tile: usize) -> String {
    format!("gemv_swiglu_{act}_{w}_t{tile}")
}
pub fn gemv_splitk(act: DType, w: DType) -> String {
    format!("gemv_splitk_{act}_{w}")
}
pub fn gemv_reduce(act: DType) -> String {
    format!("gemv_reduce_{act}")
}
pub fn gemv_scalar(act: DType, w: DType) -> String {
    format!("gemv_scalar_{act}_{w}")
}
/// One-row GEMV of Q8_0/Q4_0/Q4_1 that quantises its activations into shared memory (module `gemv_q8`).
pub fn gemv_xs(act: DType, w: DType) -> String {
    format!("gemv_{act}_{w}_xs_t1")
}
/// Split-K of [`gemv_xs`] (each block quantises its own K range).
pub fn gemv_splitk_xs(act: DType, w: DType) -> String {
    format!("gemv_splitk_{act}_{w}_xs")
}
/// gate|up + SwiGLU of [`gemv_xs`].
pub fn gemv_swiglu_xs(act: DType, w: DType) -> String {
    format!("gemv_swiglu_{act}_{w}_xs_t1")
}
/// Quantises activation rows to int8 blocks of 32 with a float4 meta, for the `gemv_q8` kernels.
pub fn quantize_q8(act: DType) -> String {
    format!("quantize_q8_{act}")
}
pub fn gemm(act: DType, w: DType) -> String {
    format!("gemm_{act}_{w}")
}
/// The 64-row GEMM variant for T <= 64 (kernels/cuda/gemm.cu).
pub fn gemm_small(act: DType, w: DType) -> String {
    format!("gemm_small_{act}_{w}")
}
/// The Hopper GEMM (kernels/cuda/gemm_sm90.cu, module `gemm_sm90`, sm_90a only): same-type 16-bit weights.
pub fn gemm_wgmma(act: DType) -> String {
    format!("gemm_wgmma_{act}_{act}")
}
pub fn attn_decode(act: DType) -> String {
    format!("attn_decode_{act}")
}
pub fn attn_combine(act: DType) -> String {
    format!("attn_combine_{act}")
}
pub fn attn_prefill(act: DType, head_dim: usize) -> String {
    format!("attn_prefill_{act}_d{head_dim}")
}
/// RoPE on q and k plus the KV-cache store, fused (kernels/cuda/rope.cu).
pub fn rope_kv_store(act: DType) -> String {
    format!("rope_kv_store_{act}")
}
/// The sampler's two passes (kernels/cuda/sampling.cu): the grid-wide histogram of the row, then the one-block pick.
pub fn sample_hist(act: DType) -> String {
    format!("sample_hist_{act}")
}
pub fn sample_pick(act: DType) -> String {
    format!("sample_pick_{act}")
}

/// Every (module, entry point) the host may launch.
pub fn all() -> Vec<(&'static str, String)> {
    let mut v = vec![("kv_cache", KV_STORE.to_string())];
    let plain = [DType::F32, DType::F16, DType::BF16];
    for act in ACT_DTYPES {
        for w in WEIGHT_DTYPES.into_iter().chain(Q8_ACT_WEIGHT_DTYPES) {
            v.push(("embedding", embedding(act, w)));
            v.push(("gemm", gemm(act, w)));
            v.push(("gemm", gemm_small(act, w)));
            v.extend(GEMV_TILES.iter().map(|&t| (gemv_module(w, t), gemv(act, w, t))));
            v.extend(GEMV_TILES.iter().map(|&t| (gemv_module(w, t), gemv_swiglu(act, w, t))));
            v.push((gemv_module(w, 1), gemv_splitk(act, w)));
            if one_row_on_act(w) {
                v.push(("gemv_q8", gemv_xs(act, w)));
                v.push(("gemv_q8", gemv_splitk_xs(act, w)));
                v.push(("gemv_q8", gemv_swiglu_xs(act, w)));
            }
        }
        v.push(("gemv_q8", quantize_q8(act)));
        v.push(("gemm_sm90", gemm_wgmma(act)));
        for w in plain {
            v.push(("norm", rms_norm(act, w)));
            v.push(("norm", add_rms_norm(act, w)));
            v.push(("elementwise", add_bias(act, w)));
            v.push(("gemv", gemv_scalar(act, w)));
        }
        v.push(("gemv", gemv_reduce(act)));
        v.push(("rope", rope(act)));
        v.push(("rope", rope_kv_store(act)));
        v.push(("elementwise", swiglu(act)));
        v.push(("elementwise", add(act)));
        v.push(("attention", attn_decode(act)));
        v.push(("attention", attn_combine(act)));
        v.extend(PREFILL_HEAD_DIMS.iter().map(|&d| ("attention", attn_prefill(act, d))));
        v.push(("sampling", sample_hist(act)));
        v.push(("sampling", sample_pick(act)));
    }
    v
}
