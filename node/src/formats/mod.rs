//! Model file formats: GGUF (read and write) and Hugging Face safetensors directories, each seen through the
//! canonical (GGUF) tensor names.

pub mod gguf;
pub mod gguf_writer;
pub mod hf;
pub mod mapped;
pub mod safetensors;

pub use gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufValue, GgufValueType, GgufWeights};
pub use gguf_writer::GgufWriter;
pub use hf::HfWeights;
pub use mapped::MappedFile;
pub use safetensors::SafetensorsFile;
