//! Incremental decoding of generated tokens into text.
//!
//! A token can end in the middle of a UTF-8 character: byte-level BPE splits rare characters and emoji across
//! tokens, SentencePiece spells them as `<0xXX>` byte tokens. The decoder keeps such an incomplete tail back until
//! the tokens that complete it arrive, so every piece it hands out is whole text.

use crate::error::Result;
use crate::tokenizer::{TextPos, Tokenizer};

/// Turns tokens into text pieces as they arrive. Owns no tokenizer: pass the same one to every call.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    /// Decoded bytes not yet handed out: at most the first 1-3 bytes of a character.
    pending: Vec<u8>,
    /// Where decoding stands, for dropping a SentencePiece space prefix.
    pos: TextPos,
    skip_special: bool,
}

impl StreamDecoder {
    /// `skip_special`: control, unknown and user-defined tokens produce no text (they still end the text before
    /// them, for the SentencePiece space prefix).
    pub fn new(skip_special: bool) -> Self {
        Self { pending: Vec::new(), pos: TextPos::Start, skip_special }
    }

    /// Adds one token and returns the text it completes (empty while a character is still incomplete).
    /// An id outside the vocabulary is an error and leaves the decoder as it was.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        tokenizer.append_piece(id, self.skip_special, &mut self.pos, &mut self.pending)?;
        Ok(self.take_complete())
    }

    /// Hands out whatever is held back, with an incomplete character as U+FFFD, and starts over.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        self.pos = TextPos::Start;
        rest
    }

    /// Bytes held back because they do not yet form a whole character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // The tail may still become a character: keep it.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be text: one replacement character, as lossy decoding writes.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }
}
