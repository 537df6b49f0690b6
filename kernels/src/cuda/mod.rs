//! CUDA backend: our own kernels (kernels/cuda/*.cu) behind the [`Backend`](crate::Backend) interface, on cudarc
//! with dynamically loaded driver and NVRTC libraries, so the crate builds and runs on machines without CUDA.
//!
//! - [`modules`]: the kernel sources (and nvcc PTX when it was available at build time) built into the crate;
//! - [`names`]: the kernel entry points the host launches;
//! - [`repack`]: the device layout of quantised weights;
//! - with the `cuda` feature: [`CudaBackend`] (one context, one stream, lazily loaded modules), [`nvrtc`]
//!   (run-time compilation) and [`DecodeGraph`] (the decode step as a CUDA graph);
//! - without it: a stand-in whose storage type cannot be constructed and whose constructor answers "not compiled
//!   with CUDA", so callers need no `cfg`.
//!
//! Design notes, launch shapes and what is graph-captured: docs/CUDA.md.

mod gemm_plan;
mod gemv_plan;
pub mod modules;
pub mod names;
pub mod repack;

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod sampling;
mod stage_plan;
#[cfg(feature = "cuda")]
mod staging;
mod step_record;
#[cfg(feature = "cuda")]
mod storage;
#[cfg(feature = "cuda")]
mod wgmma;
mod wgmma_plan;

#[cfg(feature = "cuda")]
pub use backend::{CudaBackend, DeviceInfo, NO_DRIVER, probe};
#[cfg(feature = "cuda")]
pub use graph::DecodeGraph;
#[cfg(feature = "cuda")]
pub use sampling::MAX_TOP as MAX_SAMPLE_TOP;
#[cfg(feature = "cuda")]
pub use storage::CudaStorage;
#[cfg(feature = "cuda")]
pub use wgmma::{WgmmaMode, WgmmaStatus};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, CudaStorage, NO_DRIVER, probe};

#[cfg(test)]
mod gemv_q8_spec;
#[cfg(test)]
mod sampling_spec;
