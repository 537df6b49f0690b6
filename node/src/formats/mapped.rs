//! Model files seen as bytes: a read-only memory map shared by every tensor view of the file.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::error::{ModelError, Result};

/// The bytes of a model file (a memory map, or a buffer for images built in memory), shared by the tensor views.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Maps `path` read-only. An empty file gives an empty buffer (mapping one is refused by some platforms), so the
/// parser reports it as truncated like any other short file.
pub fn map_file(path: &Path) -> Result<SharedBytes> {
    let io_err = |source| ModelError::Io { path: path.display().to_string(), source };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(Arc::new(Vec::<u8>::new()));
    }
    // SAFETY: the map is read-only and private. Like every memory-mapped model loader we rely on the model file not
    // being truncated or rewritten while it is served; doing so is an operator error.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err)?;
    Ok(Arc::new(map))
}

/// A model file format parsed from [`SharedBytes`]: `open` maps a file, `from_bytes` takes an image built in memory
/// (tests, fuzzing); both only read the header, never tensor data.
pub trait MappedFile: Sized {
    /// Parses the header of `bytes`; `path` only labels errors.
    fn parse(path: &Path, bytes: SharedBytes) -> Result<Self>;

    /// Maps `path` and parses its header.
    fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::parse(path, map_file(path)?)
    }

    /// Parses an image held in memory; `path` only labels errors.
    fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path.as_ref(), Arc::new(bytes))
    }
}
