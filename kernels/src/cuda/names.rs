//! Names of the kernel entry points (`extern "C"` in kernels/cuda/*.cu) as the host launches them: module and
//! function. One place, so that the NVRTC test can check that every name the host uses exists in the PTX.

use crate::DType;

/// Weight dtypes with an entry point per kernel family that reads weights. The other file formats (Q5_0, Q5_1,
/// IQ4_NL, the K-quants, IQ4_XS) have no CUDA kernels yet: uploading them is a `KernelError::NotOnCuda`.
pub const WEIGHT_DTYPES: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1];
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
pub fn gemv_splitk(act: DType, w: DType) -> String {
    format!("gemv_splitk_{act}_{w}")
}
pub fn gemv_reduce(act: DType) -> String {
    format!("gemv_reduce_{act}")
}
pub fn gemv_scalar(act: DType, w: DType) -> String {
    format!("gemv_scalar_{act}_{w}")
}
pub fn gemm(act: DType, w: DType) -> String {
    format!("gemm_{act}_{w}")
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
        for w in WEIGHT_DTYPES {
            v.push(("embedding", embedding(act, w)));
            v.push(("gemm", gemm(act, w)));
            v.extend(GEMV_TILES.iter().map(|&t| ("gemv", gemv(act, w, t))));
            v.push(("gemv", gemv_splitk(act, w)));
        }
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
