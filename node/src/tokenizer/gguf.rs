//! Reading the tokenizer metadata of a GGUF file (`tokenizer.ggml.*`, `tokenizer.chat_template`).

use crate::error::Result;
use crate::formats::gguf::GgufFile;
use crate::tokenizer::{GgufVocab, Tokenizer};

fn owned(list: Option<Vec<&str>>) -> Vec<String> {
    list.unwrap_or_default().into_iter().map(str::to_owned).collect()
}

impl GgufVocab {
    /// Reads the tokenizer keys of `file`. Keys of the wrong type are errors; absent optional keys are `None` or
    /// empty.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Ok(Self {
            model: file.get_str("tokenizer.ggml.model")?.to_owned(),
            pre: file.opt_str("tokenizer.ggml.pre")?.map(str::to_owned),
            tokens: file.get_str_array("tokenizer.ggml.tokens")?.into_iter().map(str::to_owned).collect(),
            token_types: file.opt_i32_array("tokenizer.ggml.token_type")?.unwrap_or_default(),
            scores: file.opt_f32_array("tokenizer.ggml.scores")?.unwrap_or_default(),
            merges: owned(file.opt_str_array("tokenizer.ggml.merges")?),
            bos: file.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: file.opt_u32("tokenizer.ggml.eos_token_id")?,
            eot: file.opt_u32("tokenizer.ggml.eot_token_id")?,
            eom: file.opt_u32("tokenizer.ggml.eom_token_id")?,
            unk: file.opt_u32("tokenizer.ggml.unknown_token_id")?,
            add_bos: file.opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos: file.opt_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: file.opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: file.opt_str("tokenizer.chat_template")?.map(str::to_owned),
        })
    }
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF model file from its metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_vocab(GgufVocab::from_gguf(file)?)
    }
}
