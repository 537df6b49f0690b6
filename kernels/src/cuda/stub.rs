//! The CUDA backend when the crate is built without the `cuda` feature: its storage cannot be constructed and its
//! constructor answers "not compiled with CUDA", so callers compile unchanged and fall back to the CPU.

use std::sync::Arc;

use crate::DType;
use crate::backend::{AttnSeq, AttnShape, Backend, DeviceKind, RopeConfig, Sampled, SamplingParams};
use crate::error::{KernelError, Result};
use crate::tensor::{HostBytes, Tensor};

const NOT_COMPILED: &str = "not compiled with CUDA (build shardline-kernels with the `cuda` feature)";
/// Without CUDA compiled in, every machine is a CPU machine (see the CUDA build's `NO_DRIVER`).
pub const NO_DRIVER: &str = NOT_COMPILED;

/// Device memory of a CUDA tensor (uninhabited without the `cuda` feature).
#[derive(Debug)]
pub enum CudaStorage {}

impl CudaStorage {
    pub fn byte_len(&self) -> usize {
        match *self {}
    }

    pub fn share(&self) -> Option<CudaStorage> {
        match *self {}
    }
}

/// The CUDA backend (uninhabited without the `cuda` feature).
#[derive(Debug)]
pub enum CudaBackend {}

impl CudaBackend {
    /// Always fails: the crate was built without CUDA support.
    pub fn new(_ordinal: usize, _act: DType) -> Result<Arc<Self>> {
        Err(KernelError::CudaUnavailable(NOT_COMPILED.into()))
    }
}

/// Number of usable CUDA devices, or why there are none (always the latter here).
pub fn probe() -> std::result::Result<usize, String> {
    Err(NOT_COMPILED.into())
}

/// Never called: no value of the stand-in exists.
impl Backend for CudaBackend {
    fn kind(&self) -> DeviceKind {
        match *self {}
    }
    fn describe(&self) -> String {
        match *self {}
    }
    fn act_dtype(&self) -> DType {
        match *self {}
    }
    fn upload_weight(&self, _: DType, _: &[usize], _: HostBytes) -> Result<Tensor> {
        match *self {}
    }
    fn upload_f32(&self, _: &[usize], _: &[f32]) -> Result<Tensor> {
        match *self {}
    }
    fn upload_raw(&self, _: &[usize], _: DType, _: &[u8]) -> Result<Tensor> {
        match *self {}
    }
    fn download_f32(&self, _: &Tensor) -> Result<Vec<f32>> {
        match *self {}
    }
    fn download_raw(&self, _: &Tensor, _: DType) -> Result<Vec<u8>> {
        match *self {}
    }
    fn alloc(&self, _: &[usize]) -> Result<Tensor> {
        match *self {}
    }
    fn synchronize(&self) -> Result<()> {
        match *self {}
    }
    fn embedding(&self, _: &Tensor, _: &[u32], _: &mut Tensor) -> Result<()> {
        match *self {}
    }
    fn rms_norm(&self, _: &Tensor, _: &Tensor, _: f32, _: &mut Tensor) -> Result<()> {
        match *self {}
    }
    fn add_rms_norm(&self, _: &mut Tensor, _: &Tensor, _: &Tensor, _: f32, _: &mut Tensor) -> Result<()> {
        match *self {}
    }
    fn matmul(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        match *self {}
    }
    fn rope(&self, _: &mut Tensor, _: &[u32], _: usize, _: &Tensor, _: &RopeConfig) -> Result<()> {
        match *self {}
    }
    fn rope_table(&self, _: &[f32]) -> Result<Tensor> {
        match *self {}
    }
    fn swiglu(&self, _: &Tensor, _: &Tensor, _: &mut Tensor) -> Result<()> {
        match *self {}
    }
    fn add(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        match *self {}
    }
    fn add_bias(&self, _: &mut Tensor, _: &Tensor) -> Result<()> {
        match *self {}
    }
    fn copy_rows(&self, _: &Tensor, _: usize, _: &mut Tensor, _: usize, _: usize) -> Result<()> {
        match *self {}
    }
    fn kv_store(&self, _: &mut Tensor, _: &mut Tensor, _: &Tensor, _: &Tensor, _: &[u32]) -> Result<()> {
        match *self {}
    }
    fn attention(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &[AttnSeq<'_>],
        _: &AttnShape,
        _: &mut Tensor,
    ) -> Result<()> {
        match *self {}
    }
    fn sample(&self, _: &Tensor, _: usize, _: &SamplingParams, _: u64, _: usize) -> Result<Sampled> {
        match *self {}
    }
}
