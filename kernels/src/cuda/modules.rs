//! The CUDA kernel modules built into the crate by `build.rs`: one per `kernels/cuda/*.cu`, each as inlined source
//! (for NVRTC) and, when nvcc was available at build time, as `compute_80` PTX.

/// One `.cu` file of `kernels/cuda`.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    /// File stem, e.g. `"gemv"`.
    pub name: &'static str,
    /// The source with its local headers inlined: compiles on its own, without an include path.
    pub source: &'static str,
    /// PTX compiled by nvcc at build time, if nvcc was found.
    pub ptx: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The module called `name`.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

/// File-name stem of a compiled artifact of `m`: its name and a fingerprint (FNV-1a) of its source, so that a
/// directory of prebuilt kernels (`SHARDLINE_KERNEL_DIR`) is never used with a source it was not compiled from.
/// Artifacts are `<stem>-sm_XY.cubin` (machine code for one architecture) and `<stem>.ptx`.
pub fn artifact_stem(m: &KernelModule) -> String {
    let h = m.source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{}-{h:016x}", m.name)
}

/// The architecture a module is compiled for regardless of the device's own, if any: `gemm_sm90` uses `wgmma` and
/// TMA, which exist only on `sm_90a` (docs/CUDA.md, "GEMM on Hopper").
pub fn required_arch(name: &str) -> Option<&'static str> {
    (name == "gemm_sm90").then_some("sm_90a")
}

/// Whether module `name` can run on a device of compute capability `compute` (`sm_90a` code runs on 9.0 only).
pub fn runs_on(name: &str, compute: (i32, i32)) -> bool {
    match required_arch(name) {
        Some("sm_90a") => compute == (9, 0),
        _ => true,
    }
}

/// Whether every module was compiled by nvcc at build time (then NVRTC is not needed at run time).
pub fn all_prebuilt() -> bool {
    MODULES.iter().all(|m| m.ptx.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_a_self_contained_module() {
        for name in [
            "attention",
            "elementwise",
            "embedding",
            "gemm",
            "gemm_sm90",
            "gemv",
            "kv_cache",
            "norm",
            "rope",
            "sampling",
        ] {
            let m = module(name).unwrap_or_else(|| panic!("module {name} missing"));
            assert!(m.source.contains("extern \"C\" __global__"), "{name} has no entry point");
            assert!(!m.source.contains("#include \""), "{name} still includes a local header");
            assert!(!m.source.contains('\0'), "{name} contains a NUL byte");
        }
    }
}
