//! Byte-level BPE of GGUF `tokenizer.ggml.model = "gpt2"` vocabularies (SmolLM, Llama 3, GPT-2 style models),
//! built as a `tokenizers::Tokenizer` from the file's tokens and merges. The pre-tokenizer is the sequence of
//! split expressions llama.cpp uses for the file's `tokenizer.ggml.pre` name: each expression cuts every stretch
//! left by the previous ones into matches and the text between them; the byte-level step then spells each byte as
//! one character before the merges run.

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{ModelError, Result};
use crate::tokenizer::vocab::TokenEntry;

/// GPT-2's split expression: contractions, letter runs, number runs, other-symbol runs (each with an optional
/// leading space), and whitespace not followed by a non-space.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's expression (case-insensitive contractions spelled out as llama.cpp does, numbers in groups of up
/// to three digits, newlines kept apart from other whitespace).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's expression: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenization of one `tokenizer.ggml.pre` family and the defaults llama.cpp attaches to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PreTokenizer {
    /// Split expressions, applied in order.
    pub regexes: &'static [&'static str],
    /// A word that is itself a vocabulary entry is taken whole, without running the merges (Llama 3).
    pub ignore_merges: bool,
    /// Whether BOS is added when the file does not say (`tokenizer.ggml.add_bos_token` absent).
    pub add_bos: bool,
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value; `None` (key absent) is llama.cpp's `default`. Names llama.cpp
/// knows but this table does not are refused rather than silently tokenized another way.
pub(crate) fn pre_tokenizer(name: Option<&str>) -> Result<PreTokenizer> {
    const DEFAULT: PreTokenizer = PreTokenizer {
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    };
    let plain = |regexes| PreTokenizer { regexes, ignore_merges: false, add_bos: false };
    Ok(match name.unwrap_or("default") {
        "default" => DEFAULT,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" => {
            PreTokenizer { regexes: &[LLAMA3], ignore_merges: true, add_bos: true }
        }
        "dbrx" | "smaug-bpe" => plain(&[LLAMA3]),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            plain(&[r"\p{N}", GPT2])
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => plain(&[GPT2]),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "megrez" | "stablelm2" | "hunyuan" => plain(&[QWEN2]),
        "falcon" => plain(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]),
        other => {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.pre".into(),
                detail: format!(
                    "pre-tokenizer {other:?} is not supported (supported: default, llama-bpe/llama3, smollm, \
                     starcoder, gpt-2, qwen2, falcon and their aliases)"
                ),
            });
        }
    })
}

fn hf_error(what: &str) -> impl Fn(tokenizers::Error) -> ModelError + '_ {
    move |e| ModelError::Tokenizer(format!("{what}: {e}"))
}

/// Builds the BPE tokenizer for plain text (special tokens are cut out before it runs, see `SpecialMatcher`).
/// A merge whose parts or result are not in the vocabulary can never produce a token; llama.cpp keeps such merges
/// and falls back to single bytes, the `tokenizers` crate refuses them, so they are dropped with a warning.
pub(crate) fn build(tokens: &[TokenEntry], merges: &[String], pre: &PreTokenizer) -> Result<HfTokenizer> {
    let vocab: Vocab = tokens.iter().zip(0u32..).map(|(t, id)| (t.text.clone(), id)).collect();
    let mut pairs = Vec::with_capacity(merges.len());
    let mut dropped = 0usize;
    for (rank, merge) in merges.iter().enumerate() {
        // The separator is the first space after the first character (a part may itself be a space in vocabularies
        // that are not byte-level).
        let sep = merge.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(i, _)| i);
        let Some(sep) = sep else {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.merges".into(),
                detail: format!("merge {rank} ({merge:?}) is not two parts separated by a space"),
            });
        };
        let (left, right) = (&merge[..sep], &merge[sep + 1..]);
        let joined = format!("{left}{right}");
        if vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&joined) {
            pairs.push((left.to_string(), right.to_string()));
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::warn!(dropped, "BPE merges whose parts or result are not in the vocabulary were dropped");
    }

    let model = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(hf_error("building the BPE model"))?;
    let mut steps = Vec::with_capacity(pre.regexes.len() + 1);
    for regex in pre.regexes {
        let split = Split::new(SplitPattern::Regex((*regex).to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(hf_error("compiling a pre-tokenizer expression"))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));

    let mut tokenizer = HfTokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tokenizer)
}

/// Appends the ids of plain `text` (no special tokens in it).
pub(crate) fn encode_text(tokenizer: &HfTokenizer, text: &str, out: &mut Vec<u32>) -> Result<()> {
    let encoding = tokenizer.encode_fast(text, false).map_err(hf_error("encoding"))?;
    out.extend_from_slice(encoding.get_ids());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_pre_tokenizers_compile_and_unknown_ones_are_refused() {
        for name in [None, Some("smollm"), Some("llama-bpe"), Some("gpt-2"), Some("qwen2"), Some("falcon")] {
            let pre = pre_tokenizer(name).unwrap();
            for regex in pre.regexes {
                Split::new(SplitPattern::Regex((*regex).to_string()), SplitDelimiterBehavior::Isolated, false)
                    .unwrap_or_else(|e| panic!("{name:?}: {regex}: {e}"));
            }
        }
        assert!(pre_tokenizer(Some("llama-bpe")).unwrap().ignore_merges);
        assert!(matches!(pre_tokenizer(Some("no-such-pre")), Err(ModelError::BadMetadata { .. })));
    }
}
