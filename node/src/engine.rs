//! The single-process engine: a model opened from a path, its tokenizer, and shards covering every layer, ready
//! to generate. `shardline generate` is a thin layer over this.

use std::path::Path;
use std::sync::Arc;

use shardline_kernels::Backend;

use crate::error::{ModelError, Result};
use crate::generate::{self, GenerateParams, Generation, LocalPipeline, PieceDecoder};
use crate::model::open::ModelFiles;
use crate::model::{LayerRange, Shard, ShardOptions};
use crate::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};

/// A whole model loaded in this process.
pub struct Engine {
    files: ModelFiles,
    tokenizer: Arc<Tokenizer>,
    pipeline: LocalPipeline,
}

/// Reads the tokenizer that belongs to a model (GGUF metadata, or `tokenizer.json` in a Hugging Face directory).
pub fn load_tokenizer(files: &ModelFiles) -> Result<Tokenizer> {
    match (files.gguf(), files.hf_dir()) {
        (Some(gguf), _) => Tokenizer::from_gguf(gguf),
        (None, Some(dir)) => Tokenizer::from_hf_dir(dir),
        (None, None) => Err(ModelError::Tokenizer("the model has no tokenizer".into())),
    }
}

impl Engine {
    /// Opens `path` and loads it as shards `splits` (one shard `0..N` when empty) on `backend`. `progress` receives
    /// `(tensors loaded, tensors total)`.
    pub fn load(
        path: &Path,
        backend: Arc<dyn Backend>,
        splits: &[LayerRange],
        opts: ShardOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        let tokenizer = Arc::new(load_tokenizer(&files)?);
        let weights = files.weights();
        let n = files.config().n_layers;
        let ranges = if splits.is_empty() { vec![LayerRange::full(n)] } else { splits.to_vec() };
        let shards = ranges
            .iter()
            .map(|r| {
                Shard::load_with_progress(weights.as_ref(), *r, backend.clone(), opts.clone(), progress).map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { files, tokenizer, pipeline: LocalPipeline::new(shards)? })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn pipeline(&self) -> &LocalPipeline {
        &self.pipeline
    }

    /// Tokenises a prompt: as-is, or as one user turn of the model's chat template.
    pub fn prompt_tokens(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        encode_prompt(&self.tokenizer, prompt, chat)
    }

    /// Generates from `prompt` tokens on this thread; `on_text` receives text as it becomes final and answers
    /// whether to go on. The local session's steps never wait on anything, so the async generation loop is driven
    /// to completion in place (no runtime needed).
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation> {
        let context = self.pipeline.context_length();
        if prompt.len() + params.max_tokens > context {
            return Err(ModelError::ContextOverflow { tokens: prompt.len(), max_new: params.max_tokens, context });
        }
        let mut session = self.pipeline.open_session(prompt.len() + params.max_tokens)?;
        let mut decoder = TextStream::new(self.tokenizer.clone());
        Ok(futures::executor::block_on(generate::generate(&mut session, prompt, params, &mut decoder, on_text))?)
    }
}

/// Tokenises `prompt`, rendering it as a single user message of the chat template when `chat` is set.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let text = tokenizer.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
        // The template writes BOS itself where the model wants one.
        tokenizer.encode(&text, false)
    } else {
        tokenizer.encode(prompt, true)
    }
}

/// The generation stop tokens a tokenizer declares (EOS and end-of-turn tokens).
pub fn stop_tokens(tokenizer: &Tokenizer) -> Vec<u32> {
    tokenizer.end_tokens().to_vec()
}

/// [`PieceDecoder`] over a tokenizer's streaming decoder (special tokens are not printed).
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    inner: StreamDecoder,
}

impl TextStream {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, inner: StreamDecoder::new(true) }
    }
}

impl PieceDecoder for TextStream {
    fn push(&mut self, token: u32) -> String {
        self.inner.push(&self.tokenizer, token).unwrap_or_default()
    }

    fn finish(&mut self) -> String {
        self.inner.finish()
    }
}
