//! Text to token ids and back, end-of-generation tokens, and chat prompts from the model's own template.
//!
//! Three sources give a [`Tokenizer`]:
//! - a GGUF file with a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3): a
//!   `tokenizers::Tokenizer` built from the file's tokens and merges, with llama.cpp's pre-tokenizer for the file's
//!   `tokenizer.ggml.pre` (`bpe.rs`);
//! - a GGUF file with a SentencePiece vocabulary (`"llama"`: Llama 2, TinyLlama, Mistral v0.1): merges by piece
//!   score, written here (`spm.rs`);
//! - a Hugging Face model directory (`tokenizer.json`, `tokenizer_config.json`), run by the `tokenizers` crate.
//!
//! Token ids agree with llama.cpp's `llama_tokenize(..., parse_special = true)`: special tokens written in the text
//! (`<|im_start|>`) become their ids. Decoding renders every token as llama.cpp's `token_to_piece` does, so that
//! `decode(encode(s)) == s`.

mod bpe;
mod byte_level;
mod chat;
mod gguf;
mod hf;
mod specials;
mod spm;
mod stream;
mod vocab;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use tokenizers::Tokenizer as HfTokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::StreamDecoder;
pub use vocab::{GgufVocab, TokenKind};

use crate::error::{ModelError, Result};
use specials::{Fragment, SpecialMatcher};
use spm::SpmModel;
pub(crate) use vocab::TextPos;
use vocab::{PieceStyle, SpacePrefix, TokenEntry};

/// What turns plain text into ids.
enum Engine {
    /// GGUF byte-level BPE: special tokens are cut out here, the text between them goes through the crate's BPE.
    ByteLevelBpe { bpe: Box<HfTokenizer>, specials: SpecialMatcher },
    /// GGUF SentencePiece: special tokens are cut out here, the text between them is merged by score.
    SentencePiece { spm: SpmModel, specials: SpecialMatcher },
    /// A `tokenizer.json`, which finds its added tokens itself. With `post_processor` its post-processor adds
    /// BOS/EOS; otherwise `tokenizer_config.json` said and they are added here.
    HuggingFace { hf: Box<HfTokenizer>, post_processor: bool },
}

/// Everything a tokenizer is assembled from, whatever the source.
pub(crate) struct Parts {
    pub texts: Vec<String>,
    pub kinds: Vec<TokenKind>,
    pub style: PieceStyle,
    pub engine: EngineSpec,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    /// End tokens stated elsewhere (Hugging Face `generation_config.json`).
    pub extra_end_tokens: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub space_prefix: SpacePrefix,
    pub chat_template: Option<String>,
    /// Texts the chat template sees as `bos_token` / `eos_token`; the token texts when `None`.
    pub template_bos: Option<String>,
    pub template_eos: Option<String>,
}

pub(crate) enum EngineSpec {
    ByteLevelBpe { merges: Vec<String>, pre: bpe::PreTokenizer },
    SentencePiece { scores: Vec<f32> },
    HuggingFace { hf: Box<HfTokenizer>, post_processor: bool },
}

/// A model's tokenizer. Immutable once built and shareable between threads.
pub struct Tokenizer {
    tokens: Vec<TokenEntry>,
    ids: HashMap<String, u32>,
    engine: Engine,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    end_tokens: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Where SentencePiece models put a space before text; decoding removes it again.
    space_prefix: SpacePrefix,
    /// The compiled template, or why it failed to compile (kept so that a model with a template minijinja cannot
    /// read still tokenizes).
    chat_template: Option<std::result::Result<ChatTemplate, String>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = match &self.engine {
            Engine::ByteLevelBpe { .. } => "byte-level BPE",
            Engine::SentencePiece { .. } => "SentencePiece",
            Engine::HuggingFace { .. } => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("engine", &engine)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("end_tokens", &self.end_tokens)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("chat_template", &self.chat_template.as_ref().map(|t| t.is_ok()))
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer of a GGUF file from its tokenizer metadata.
    pub fn from_gguf_vocab(vocab: GgufVocab) -> Result<Self> {
        let n = vocab.tokens.len();
        let kinds = if vocab.token_types.is_empty() {
            vec![TokenKind::Normal; n]
        } else if vocab.token_types.len() == n {
            vocab.token_types.iter().map(|&t| TokenKind::from_gguf(t)).collect()
        } else {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.token_type".into(),
                detail: format!("{} types for {n} tokens", vocab.token_types.len()),
            });
        };
        let parts = match vocab.model.as_str() {
            "gpt2" => {
                let pre = bpe::pre_tokenizer(vocab.pre.as_deref())?;
                Parts {
                    kinds,
                    style: PieceStyle::ByteLevel,
                    bos: vocab.bos,
                    eos: vocab.eos,
                    eot: vocab.eot,
                    eom: vocab.eom,
                    unk: vocab.unk,
                    extra_end_tokens: Vec::new(),
                    add_bos: vocab.add_bos.unwrap_or(pre.add_bos),
                    add_eos: vocab.add_eos.unwrap_or(false),
                    // llama.cpp's byte-level BPE never adds a space prefix, whatever the file says.
                    space_prefix: SpacePrefix::None,
                    engine: EngineSpec::ByteLevelBpe { merges: vocab.merges, pre },
                    texts: vocab.tokens,
                    chat_template: vocab.chat_template,
                    template_bos: None,
                    template_eos: None,
                }
            }
            // llama.cpp's defaults for SentencePiece files: <unk> 0, <s> 1, </s> 2, BOS added, space prefix on.
            "llama" => Parts {
                kinds,
                style: PieceStyle::SentencePiece,
                bos: vocab.bos.or((n > 1).then_some(1)),
                eos: vocab.eos.or((n > 2).then_some(2)),
                eot: vocab.eot,
                eom: vocab.eom,
                unk: vocab.unk.or((n > 0).then_some(0)),
                extra_end_tokens: Vec::new(),
                add_bos: vocab.add_bos.unwrap_or(true),
                add_eos: vocab.add_eos.unwrap_or(false),
                space_prefix: if vocab.add_space_prefix.unwrap_or(true) {
                    SpacePrefix::AfterSpecial
                } else {
                    SpacePrefix::None
                },
                engine: EngineSpec::SentencePiece { scores: vocab.scores },
                texts: vocab.tokens,
                chat_template: vocab.chat_template,
                template_bos: None,
                template_eos: None,
            },
            other => {
                return Err(ModelError::BadMetadata {
                    key: "tokenizer.ggml.model".into(),
                    detail: format!("tokenizer model {other:?} is not supported (supported: gpt2, llama)"),
                });
            }
        };
        Self::from_parts(parts)
    }

    /// Loads a Hugging Face tokenizer directory: `tokenizer.json`, and when present `tokenizer_config.json`
    /// (BOS/EOS, whether to add them, chat template), `chat_template.jinja` and `generation_config.json` (further
    /// end tokens).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        hf::load(dir.as_ref())
    }

    pub(crate) fn from_parts(parts: Parts) -> Result<Self> {
        let Parts {
            texts,
            mut kinds,
            style,
            engine,
            bos,
            eos,
            eot,
            eom,
            unk,
            extra_end_tokens,
            add_bos,
            add_eos,
            space_prefix,
            chat_template,
            template_bos,
            template_eos,
        } = parts;
        let n = texts.len();
        if n == 0 {
            return Err(ModelError::Tokenizer("the vocabulary is empty".into()));
        }
        if u32::try_from(n).is_err() || kinds.len() != n {
            return Err(ModelError::Tokenizer(format!("{n} tokens with {} kinds", kinds.len())));
        }
        let named = [("bos", bos), ("eos", eos), ("eot", eot), ("eom", eom), ("unknown", unk)];
        for (name, id) in named.into_iter().chain(extra_end_tokens.iter().map(|&id| ("end", Some(id)))) {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(ModelError::BadMetadata {
                    key: format!("tokenizer.ggml.{name}_token_id"),
                    detail: format!("token id {id} is outside the vocabulary of {n} tokens"),
                });
            }
        }
        if add_bos && bos.is_none() {
            return Err(ModelError::MissingMetadata("tokenizer.ggml.bos_token_id (the model adds BOS)".into()));
        }
        if add_eos && eos.is_none() {
            return Err(ModelError::MissingMetadata("tokenizer.ggml.eos_token_id (the model adds EOS)".into()));
        }

        let ends = specials::detect_end_tokens(&texts, &mut kinds, eos, eot, eom);
        let mut end_tokens = ends.all;
        end_tokens.extend(extra_end_tokens);
        end_tokens.sort_unstable();
        end_tokens.dedup();

        let mut ids = HashMap::with_capacity(n);
        for (text, id) in texts.iter().zip(0u32..) {
            ids.insert(text.clone(), id);
        }
        let tokens: Vec<TokenEntry> =
            texts.into_iter().zip(kinds).map(|(text, kind)| TokenEntry::new(text, kind, style)).collect();

        let engine = match engine {
            EngineSpec::ByteLevelBpe { merges, pre } => Engine::ByteLevelBpe {
                bpe: Box::new(bpe::build(&tokens, &merges, &pre)?),
                specials: SpecialMatcher::new(&tokens),
            },
            EngineSpec::SentencePiece { scores } => Engine::SentencePiece {
                spm: SpmModel::new(&tokens, scores, unk)?,
                specials: SpecialMatcher::new(&tokens),
            },
            EngineSpec::HuggingFace { hf, post_processor } => Engine::HuggingFace { hf, post_processor },
        };

        let text_of = |id: Option<u32>| id.map(|id| tokens[id as usize].text.clone()).unwrap_or_default();
        let chat_template = chat_template.map(|source| {
            let bos_text = template_bos.unwrap_or_else(|| text_of(bos));
            let eos_text = template_eos.unwrap_or_else(|| text_of(eos));
            ChatTemplate::new(source, bos_text, eos_text).map_err(|e| {
                tracing::warn!(error = %e, "the model's chat template does not compile");
                e.to_string()
            })
        });

        Ok(Self {
            tokens,
            ids,
            engine,
            bos,
            eos,
            eot: ends.eot,
            unk,
            end_tokens,
            add_bos,
            add_eos,
            space_prefix,
            chat_template,
        })
    }

    /// Token ids of `text`. Special tokens written in the text become their ids. With `add_special`, BOS and EOS
    /// are added where the model asks for them ([`Tokenizer::add_bos`], [`Tokenizer::add_eos`]).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        if let Engine::HuggingFace { hf, post_processor: true } = &self.engine {
            let encoding = hf.encode_fast(text, add_special).map_err(hf::error("encoding"))?;
            return Ok(encoding.get_ids().to_vec());
        }
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match &self.engine {
            Engine::HuggingFace { hf, .. } => {
                let encoding = hf.encode_fast(text, false).map_err(hf::error("encoding"))?;
                out.extend_from_slice(encoding.get_ids());
            }
            Engine::ByteLevelBpe { bpe, specials } => {
                for fragment in specials.partition(text) {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(text) => bpe::encode_text(bpe, text, &mut out)?,
                    }
                }
            }
            Engine::SentencePiece { spm, specials } => self.encode_sentencepiece(spm, specials, text, &mut out)?,
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// llama.cpp's SentencePiece path: spaces become `▁`, and text that starts the input or follows a special
    /// token gets the space prefix.
    fn encode_sentencepiece(
        &self,
        spm: &SpmModel,
        specials: &SpecialMatcher,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let mut after_special = true;
        for fragment in specials.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(text) => {
                    let mut escaped = String::with_capacity(text.len() + 3);
                    if self.space_prefix == SpacePrefix::AfterSpecial && after_special {
                        escaped.push(spm::SPACE);
                    }
                    escaped.extend(text.chars().map(|c| if c == ' ' { spm::SPACE } else { c }));
                    spm.encode(&escaped, &self.ids, out)?;
                    after_special = false;
                }
            }
        }
        Ok(())
    }

    /// Text of `ids`, special tokens included as their text (`<|im_end|>`). Bytes that do not form UTF-8 (an
    /// incomplete character at the end) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids` without control, unknown and user-defined tokens: what a user reads.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut pos = TextPos::Start;
        for &id in ids {
            self.append_piece(id, skip_special, &mut pos, &mut bytes)?;
        }
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Appends the bytes `id` contributes to text. `pos` tracks where a SentencePiece space prefix is to be
    /// dropped again (see `SpacePrefix`); a skipped special token still ends the text before it.
    pub(crate) fn append_piece(&self, id: u32, skip_special: bool, pos: &mut TextPos, out: &mut Vec<u8>) -> Result<()> {
        let token = self.token(id)?;
        if token.kind.is_special() {
            if !skip_special {
                out.extend_from_slice(&token.piece);
                *pos = TextPos::AfterSpecial;
            } else if *pos == TextPos::Text {
                *pos = TextPos::AfterSpecial;
            }
            return Ok(());
        }
        let mut piece: &[u8] = &token.piece;
        if piece.is_empty() {
            return Ok(());
        }
        if self.space_prefix.strips_at(*pos) {
            piece = piece.strip_prefix(b" ").unwrap_or(piece);
        }
        *pos = TextPos::Text;
        out.extend_from_slice(piece);
        Ok(())
    }

    fn token(&self, id: u32) -> Result<&TokenEntry> {
        self.tokens.get(id as usize).ok_or_else(|| {
            ModelError::Tokenizer(format!("token id {id} is outside the vocabulary of {} tokens", self.tokens.len()))
        })
    }

    /// The bytes `id` decodes to on its own (special tokens as their text). A byte token or part of a
    /// byte-level character is not valid UTF-8 by itself; [`StreamDecoder`] joins such pieces.
    pub fn token_to_piece(&self, id: u32) -> Result<&[u8]> {
        Ok(&self.token(id)?.piece)
    }

    /// The vocabulary entry of `id` as the model stores it (`Ġworld`, `▁the`, `<0x0A>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| t.text.as_str())
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.tokens.get(id as usize).map(|t| t.kind)
    }

    /// The id of the vocabulary entry spelled exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Number of token ids, added tokens included (the embedding matrix may have more rows).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End of turn (`<|eot_id|>`, `<|im_end|>`), from the file or found by its text.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether `encode(_, true)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(_, true)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Every token that ends generation (EOS, EOT, and the other end tokens llama.cpp recognises), sorted.
    pub fn end_tokens(&self) -> &[u32] {
        &self.end_tokens
    }

    pub fn is_end_token(&self, id: u32) -> bool {
        self.end_tokens.binary_search(&id).is_ok()
    }

    /// The model's chat template, if it has one that compiles.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref().and_then(|t| t.as_ref().ok())
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match &self.chat_template {
            Some(Ok(template)) => template.render(messages, add_generation_prompt),
            Some(Err(e)) => Err(ModelError::ChatTemplate(e.clone())),
            None => Err(ModelError::ChatTemplate("the model has no chat template".into())),
        }
    }

    /// A decoder for streaming generated tokens into text (see [`StreamDecoder::new`]).
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }
}
