//! Opens a model from a path: a GGUF file or a Hugging Face directory. The tokenizer reaches the file-level data
//! it needs (GGUF metadata, or the directory with `tokenizer.json`) through [`ModelFiles`].

use std::path::Path;
use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::formats::gguf::{GgufFile, GgufWeights};
use crate::formats::hf::HfWeights;
use crate::model::config::ModelConfig;
use crate::model::source::WeightSource;

/// An opened model with its format-specific files.
#[derive(Clone, Debug)]
pub enum ModelFiles {
    Gguf(Arc<GgufWeights>),
    Hf(Arc<HfWeights>),
}

impl ModelFiles {
    /// A directory is read as a Hugging Face model (`config.json` + safetensors), anything else as a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta =
            std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.display().to_string(), source })?;
        if meta.is_dir() {
            Ok(ModelFiles::Hf(Arc::new(HfWeights::open(path)?)))
        } else {
            Ok(ModelFiles::Gguf(Arc::new(GgufWeights::open(path)?)))
        }
    }

    /// The weights in canonical tensor names.
    pub fn weights(&self) -> Arc<dyn WeightSource> {
        match self {
            ModelFiles::Gguf(w) => w.clone(),
            ModelFiles::Hf(w) => w.clone(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            ModelFiles::Gguf(w) => w.config(),
            ModelFiles::Hf(w) => w.config(),
        }
    }

    /// The GGUF file (metadata holds the tokenizer and chat template), for a GGUF model.
    pub fn gguf(&self) -> Option<&Arc<GgufFile>> {
        match self {
            ModelFiles::Gguf(w) => Some(w.file()),
            ModelFiles::Hf(_) => None,
        }
    }

    /// The model directory (holding `tokenizer.json` and `tokenizer_config.json`), for a Hugging Face model.
    pub fn hf_dir(&self) -> Option<&Path> {
        match self {
            ModelFiles::Gguf(_) => None,
            ModelFiles::Hf(w) => Some(w.dir()),
        }
    }

    /// The path the model was opened from.
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Gguf(w) => w.file().path(),
            ModelFiles::Hf(w) => w.dir(),
        }
    }
}

/// Opens a GGUF file or a Hugging Face directory as a [`WeightSource`].
pub fn open_model(path: impl AsRef<Path>) -> Result<Arc<dyn WeightSource>> {
    Ok(ModelFiles::open(path)?.weights())
}

/// The name people know a model by: the file name without `.gguf` (`SmolLM2-135M-Instruct.Q4_1`), or the
/// directory's name for a Hugging Face directory. Logs, errors and the API's model list use it; the 64-hex model id
/// is for machines.
pub fn display_name(path: &Path) -> String {
    // `.` or `models/..` name a directory only once resolved.
    let base = path.canonicalize().ok();
    let name = base.as_deref().unwrap_or(path).file_name().map(|n| n.to_string_lossy().into_owned());
    match name {
        Some(n) => n.strip_suffix(".gguf").map(str::to_string).unwrap_or(n),
        None => path.display().to_string(),
    }
}
