use crate::DType;

/// Everything a kernel or a backend can refuse. Foreign (driver, NVRTC) errors are wrapped here in one place.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op} does not support dtype {dtype:?}")]
    UnsupportedDType { op: &'static str, dtype: DType },
    #[error("tensor lives on {found} but the {backend} backend was asked to use it")]
    WrongDevice { backend: &'static str, found: &'static str },
    #[error("{len} elements of {dtype:?} is not a whole number of blocks ({block} elements each)")]
    PartialBlock { dtype: DType, len: usize, block: usize },
    #[error("byte length {got} does not match {expected} expected for {what}")]
    ByteLength { what: String, expected: usize, got: usize },
    #[error("KV cache slot {slot} is outside the pool of {capacity} token slots")]
    KvSlot { slot: usize, capacity: usize },
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    #[error("{dtype} weights are not supported on CUDA yet (the CPU backend computes with them)")]
    NotOnCuda { dtype: DType },
    #[error("CUDA error: {0}")]
    Cuda(String),
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N")]
    UnknownDevice(String),
    /// A row of logits holds NaN or infinite entries: the forward that produced them went wrong (or a node's weights
    /// or code were made to), so no token is drawn from them, not even from the finite rest (docs/SECURITY.md).
    #[error("{nan} NaN and {infinite} infinite logits of {vocab} (the first at token {first}): no token is drawn")]
    NonFiniteLogits { nan: usize, infinite: usize, vocab: usize, first: usize },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape { op, detail: detail.into() }
}
