//! shardline's compute crate: the [`Backend`] interface, the CPU reference backend, and the CUDA backend.

pub mod backend;
pub mod cpu;
pub mod cpu_time;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod quant;
pub mod rng;
pub mod step_graph;
pub mod superblock;
pub mod tensor;

pub use backend::{
    AttnSeq, AttnShape, Backend, DeviceKind, Draw, Llama3Scaling, RopeConfig, RopeStyle, Sampled, SamplingParams,
};
pub use dtype::DType;
pub use error::{KernelError, Result};
pub use tensor::{HostBytes, Storage, Tensor};
