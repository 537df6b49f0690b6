//! The vocabulary as a model file states it, and the bytes each token contributes to decoded text.

use crate::tokenizer::byte_level;

/// Kind of a vocabulary entry, numbered as GGUF `tokenizer.ggml.token_type` numbers it (llama.cpp's
/// `llama_token_type`). The kind decides whether the token is recognised when written in text and how it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Type 0 or a number outside the table: decodes to nothing and is never matched in text.
    Undefined,
    /// An ordinary piece of text.
    Normal,
    /// `<unk>`: matched in text like a control token.
    Unknown,
    /// `<s>`, `<|im_start|>`, `<|eot_id|>`: matched in text, decodes to its own text.
    Control,
    /// Added by the model's authors: matched in text, decodes to its own text.
    UserDefined,
    /// Reserved slot: decodes to nothing.
    Unused,
    /// SentencePiece byte fallback `<0xXX>`: decodes to that one raw byte.
    Byte,
}

impl TokenKind {
    /// The kind for a GGUF `tokenizer.ggml.token_type` value.
    pub fn from_gguf(code: i32) -> Self {
        match code {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Written in the input text, the token is recognised as itself before the rest is split into pieces
    /// (llama.cpp's `parse_special = true`).
    pub fn is_special(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }
}

/// The tokenizer part of a GGUF file's metadata, read into plain fields (`tokenizer.ggml.*`,
/// `tokenizer.chat_template`). Optional fields are `None` when the key is absent; the tokenizer then applies
/// llama.cpp's default for the model type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE by scores).
    pub model: String,
    /// `tokenizer.ggml.pre`: pre-tokenizer of byte-level BPE models (`smollm`, `llama-bpe`, `gpt-2`, ...);
    /// `None` means llama.cpp's `default`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token; empty when the file has none (all tokens normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`, one per token: merge priority of SentencePiece pieces; empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in rank order (byte-level BPE only).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn, e.g. `<|eot_id|>`); found by its text when absent.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message, `<|eom_id|>`); found by its text when absent.
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`: SentencePiece models put a space before text that starts the input.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`: the model's Jinja chat template.
    pub chat_template: Option<String>,
}

/// How normal tokens spell their bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// GPT-2 byte-level: every byte is stored as one printable character (`Ġ` for a space).
    ByteLevel,
    /// SentencePiece: text with `▁` for a space; bytes outside the pieces come as `<0xXX>` tokens.
    SentencePiece,
}

/// Where a SentencePiece tokenizer writes a space in front of text, which decoding then drops again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpacePrefix {
    /// Never (byte-level BPE).
    None,
    /// Before the text that starts the input and before each text that follows a special token (llama.cpp's
    /// `add_space_prefix`; Hugging Face's legacy `Prepend("▁")` normalizer, which runs on each stretch between added
    /// tokens).
    AfterSpecial,
    /// Only before the text that starts the input (Hugging Face `Metaspace` with `prepend_scheme: "first"`).
    First,
}

/// Where decoding stands, for [`SpacePrefix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TextPos {
    /// Nothing has been written yet.
    Start,
    /// The last token was a special token.
    AfterSpecial,
    /// Inside text.
    Text,
}

impl SpacePrefix {
    /// Whether a text token at `pos` starts with the prefix space.
    pub fn strips_at(self, pos: TextPos) -> bool {
        match self {
            Self::None => false,
            Self::AfterSpecial => pos != TextPos::Text,
            Self::First => pos == TextPos::Start,
        }
    }
}

/// One vocabulary entry with its decoded bytes computed once (llama.cpp keeps the same cache).
#[derive(Clone, Debug)]
pub(crate) struct TokenEntry {
    pub text: String,
    pub kind: TokenKind,
    /// Bytes this token adds to decoded text. May be part of a UTF-8 sequence (byte tokens, byte-level pieces).
    pub piece: Box<[u8]>,
}

impl TokenEntry {
    pub fn new(text: String, kind: TokenKind, style: PieceStyle) -> Self {
        let piece = piece_bytes(&text, kind, style).into_boxed_slice();
        Self { text, kind, piece }
    }
}

/// The bytes a token decodes to, as llama.cpp's `token_to_piece` with `special = true` renders them.
fn piece_bytes(text: &str, kind: TokenKind, style: PieceStyle) -> Vec<u8> {
    match kind {
        TokenKind::Unknown | TokenKind::Control | TokenKind::UserDefined => text.as_bytes().to_vec(),
        TokenKind::Undefined | TokenKind::Unused => Vec::new(),
        TokenKind::Byte => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
        TokenKind::Normal => match style {
            // A character outside the byte table cannot come from the byte-level encoder; keep it as UTF-8
            // rather than dropping it.
            PieceStyle::ByteLevel => {
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match byte_level::char_to_byte(c) {
                        Some(b) => out.push(b),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            PieceStyle::SentencePiece => text.replace('\u{2581}', " ").into_bytes(),
        },
    }
}

/// The byte of a SentencePiece byte-fallback token `<0xXX>`.
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_parse_two_hex_digits_only() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(parse_byte_token("<0xff>"), Some(0xff));
        assert_eq!(parse_byte_token("<0x100>"), None);
        assert_eq!(parse_byte_token("<0xZZ>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }

    #[test]
    fn pieces_follow_kind_and_style() {
        let sp = PieceStyle::SentencePiece;
        assert_eq!(&*TokenEntry::new("\u{2581}the".into(), TokenKind::Normal, sp).piece, b" the");
        assert_eq!(&*TokenEntry::new("<0xE6>".into(), TokenKind::Byte, sp).piece, &[0xE6]);
        assert_eq!(&*TokenEntry::new("<s>".into(), TokenKind::Control, sp).piece, b"<s>");
        assert!(TokenEntry::new("<pad>".into(), TokenKind::Unused, sp).piece.is_empty());
        let bl = PieceStyle::ByteLevel;
        assert_eq!(&*TokenEntry::new("\u{120}world".into(), TokenKind::Normal, bl).piece, b" world");
        assert_eq!(&*TokenEntry::new("\u{10a}".into(), TokenKind::Normal, bl).piece, b"\n");
    }
}
