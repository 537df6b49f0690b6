//! CUDA backend. Without the `cuda` feature this is a stand-in whose storage type cannot be constructed and whose
//! constructor answers "not compiled with CUDA", so callers need no `cfg`.

/// Device memory of a CUDA tensor (stand-in: uninhabited without the `cuda` feature).
#[derive(Debug)]
pub enum CudaStorage {}

impl CudaStorage {
    pub fn byte_len(&self) -> usize {
        match *self {}
    }
}
