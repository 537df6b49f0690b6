//! SentencePiece-style BPE of GGUF `tokenizer.ggml.model = "llama"` vocabularies (Llama 2, TinyLlama, Mistral v0.1).
//!
//! Written by hand: these files carry pieces with scores but no merge list, and the `tokenizers` crate can only
//! build its BPE from merges (its Unigram model scores whole segmentations, which gives other ids). The algorithm
//! is the one llama.cpp runs: start from single characters, repeatedly join the adjacent pair whose joined text is a
//! vocabulary piece with the highest score (ties: the leftmost pair), and spell any final symbol that is not a piece
//! as byte-fallback tokens `<0xXX>`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::error::{ModelError, Result};
use crate::tokenizer::vocab::{TokenEntry, parse_byte_token};

/// SentencePiece's visible space, which stands for `' '` inside pieces.
pub(crate) const SPACE: char = '\u{2581}';

/// Scores and byte-fallback table of a SentencePiece vocabulary.
#[derive(Clone, Debug)]
pub(crate) struct SpmModel {
    scores: Vec<f32>,
    /// Id of `<0xXX>` for each byte, if the vocabulary has it.
    byte_tokens: Box<[Option<u32>; 256]>,
    unk: Option<u32>,
}

/// A run of the input text that is one symbol, linked to its neighbours (indices into the symbol list).
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate join of two adjacent symbols.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the joined text; a bigram whose symbols changed since it was queued no longer matches it.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// The greatest bigram is joined first: highest score, then leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl SpmModel {
    /// `scores` has one entry per token, or is empty (all zero).
    pub fn new(tokens: &[TokenEntry], scores: Vec<f32>, unk: Option<u32>) -> Result<Self> {
        if !scores.is_empty() && scores.len() != tokens.len() {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.scores".into(),
                detail: format!("{} scores for {} tokens", scores.len(), tokens.len()),
            });
        }
        let scores = if scores.is_empty() { vec![0.0; tokens.len()] } else { scores };
        let mut byte_tokens = Box::new([None; 256]);
        for (token, id) in tokens.iter().zip(0u32..) {
            if let Some(b) = parse_byte_token(&token.text) {
                // Upper-case hex as llama.cpp writes it wins over other spellings of the same byte.
                let slot = &mut byte_tokens[usize::from(b)];
                if slot.is_none() || token.text == format!("<0x{b:02X}>") {
                    *slot = Some(id);
                }
            }
        }
        Ok(Self { scores, byte_tokens, unk })
    }

    /// Appends the ids of `text`, which must already have its spaces written as `▁` (and the space prefix added).
    pub fn encode(&self, text: &str, ids: &HashMap<String, u32>, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (start + c.len_utf8() < text.len()).then_some(i + 1),
            });
        }
        if symbols.is_empty() {
            return Ok(());
        }

        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.queue_bigram(text, ids, &symbols, right - 1, right, &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.len {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.left].next = right.next;
            symbols[bigram.right].len = 0;
            if let Some(next) = right.next {
                symbols[next].prev = Some(bigram.left);
            }
            if let Some(prev) = left.prev {
                self.queue_bigram(text, ids, &symbols, prev, bigram.left, &mut queue);
            }
            if let Some(next) = right.next {
                self.queue_bigram(text, ids, &symbols, bigram.left, next, &mut queue);
            }
        }

        // Every joined symbol is a piece by construction; only single characters can be missing from the
        // vocabulary, and those are spelled as bytes.
        let mut at = Some(0);
        while let Some(i) = at {
            let symbol = symbols[i];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.byte_token(b, ids)?);
                    }
                }
            }
            at = symbol.next;
        }
        Ok(())
    }

    fn queue_bigram(
        &self,
        text: &str,
        ids: &HashMap<String, u32>,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let start = symbols[left].start;
        let len = symbols[left].len + symbols[right].len;
        if let Some(&id) = ids.get(&text[start..start + len]) {
            queue.push(Bigram { score: self.scores[id as usize], left, right, len });
        }
    }

    /// The token for one byte with no piece: `<0xXX>`, else a one-character piece, else `<unk>`.
    fn byte_token(&self, b: u8, ids: &HashMap<String, u32>) -> Result<u32> {
        if let Some(id) = self.byte_tokens[usize::from(b)] {
            return Ok(id);
        }
        if b.is_ascii()
            && let Some(&id) = ids.get(char::from(b).encode_utf8(&mut [0; 4]) as &str)
        {
            return Ok(id);
        }
        self.unk.ok_or_else(|| {
            ModelError::Tokenizer(format!("byte 0x{b:02X} has no piece, byte token or <unk> in the vocabulary"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::vocab::{PieceStyle, TokenKind};

    fn model(pieces: &[(&str, f32)]) -> (SpmModel, HashMap<String, u32>) {
        let tokens: Vec<TokenEntry> = pieces
            .iter()
            .map(|(t, _)| TokenEntry::new(t.to_string(), TokenKind::Normal, PieceStyle::SentencePiece))
            .collect();
        let ids = tokens.iter().zip(0u32..).map(|(t, id)| (t.text.clone(), id)).collect();
        (SpmModel::new(&tokens, pieces.iter().map(|p| p.1).collect(), Some(0)).unwrap(), ids)
    }

    #[test]
    fn highest_score_joins_first_and_ties_go_left() {
        let (m, ids) = model(&[("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -2.0), ("bb", -3.0), ("abb", -1.5)]);
        let mut out = Vec::new();
        m.encode("abb", &ids, &mut out).unwrap();
        // "ab" (-2) beats "bb" (-3); then "ab"+"b" = "abb".
        assert_eq!(out, vec![5]);
        out.clear();
        let (m, ids) = model(&[("<unk>", 0.0), ("a", -1.0), ("aa", -1.0)]);
        m.encode("aaa", &ids, &mut out).unwrap();
        assert_eq!(out, vec![2, 1], "equal scores: the leftmost pair joins");
    }

    #[test]
    fn missing_characters_fall_back_to_bytes_then_unk() {
        let (m, ids) = model(&[("<unk>", 0.0), ("<0xC3>", 0.0), ("<0xA9>", 0.0), ("x", -1.0)]);
        let mut out = Vec::new();
        m.encode("x\u{e9}", &ids, &mut out).unwrap();
        assert_eq!(out, vec![3, 1, 2]);
        out.clear();
        m.encode("y", &ids, &mut out).unwrap();
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn mismatched_scores_are_an_error() {
        let tokens = vec![TokenEntry::new("a".into(), TokenKind::Normal, PieceStyle::SentencePiece)];
        assert!(SpmModel::new(&tokens, vec![1.0, 2.0], None).is_err());
    }
}
