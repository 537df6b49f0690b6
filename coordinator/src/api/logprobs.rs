//! Log-probabilities of generated tokens in OpenAI's two shapes, built the same way for a whole response and for
//! the chunks of a stream, so that a streamed request reports exactly what the same request reports unstreamed.

use shardline_kernels::Sampled;
use shardline_node::tokenizer::Tokenizer;

use super::openai::{ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob};

/// The bytes of a token's piece (empty for an id the vocabulary lacks).
fn piece(tok: &Tokenizer, id: u32) -> Vec<u8> {
    tok.token_to_piece(id).map(|b| b.to_vec()).unwrap_or_default()
}

fn text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&piece(tok, id)).into_owned()
}

/// Chat shape (`{"content": [{token, logprob, bytes, top_logprobs}]}`) for `samples`.
pub fn chat(tok: &Tokenizer, samples: &[Sampled]) -> ChatLogprobs {
    let content = samples
        .iter()
        .map(|s| {
            let bytes = piece(tok, s.token);
            TokenLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                logprob: s.logprob,
                bytes,
                top_logprobs: s
                    .top
                    .iter()
                    .map(|&(t, logprob)| {
                        let bytes = piece(tok, t);
                        TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), logprob, bytes }
                    })
                    .collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}

/// Legacy completions shape for `samples`. `offset` is the byte offset of the first token's text in the returned
/// text (after any echoed prompt); it is advanced past these tokens, so consecutive chunks continue where the last
/// one ended.
pub fn completion(tok: &Tokenizer, samples: &[Sampled], offset: &mut usize) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    for s in samples {
        let t = text(tok, s.token);
        lp.text_offset.push(*offset);
        *offset += t.len();
        lp.tokens.push(t);
        lp.token_logprobs.push(s.logprob);
        lp.top_logprobs.push(s.top.iter().map(|&(id, p)| (text(tok, id), p.into())).collect());
    }
    lp
}
