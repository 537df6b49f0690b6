//! The generation loop, independent of where the layers run: a [`Stepper`] feeds tokens through the model and
//! samples the next one (in-process shards here, a QUIC pipeline in the swarm client); this module handles prefill
//! chunking, stop tokens, stop strings, streaming text and timing.

use std::sync::Arc;
use std::time::Instant;

use shardline_kernels::{Sampled, SamplingParams};

use crate::error::{ModelError, Result};
use crate::model::{Shard, ShardInput, ShardOutput, ShardSession};

/// Something that runs a session's tokens through every layer and samples the token that follows them.
pub trait Stepper {
    /// Feeds `tokens` (the next positions of the session) and samples the token after the last of them, at position
    /// `session length after feeding`, with `n_top` top log-probabilities.
    fn step(&mut self, tokens: &[u32], sampling: &SamplingParams, n_top: usize) -> Result<Sampled>;
}

/// Turns generated token ids into text pieces as they arrive (holding back incomplete UTF-8).
pub trait PieceDecoder {
    fn push(&mut self, token: u32) -> String;
    /// Whatever is held back, at the end of generation.
    fn finish(&mut self) -> String;
}

/// Shards covering `0..N` in order, run one after the other in this process.
pub struct LocalPipeline {
    shards: Vec<Arc<Shard>>,
}

impl LocalPipeline {
    /// Checks that the shards are contiguous and cover the whole model.
    pub fn new(shards: Vec<Arc<Shard>>) -> Result<Self> {
        let first = shards.first().ok_or_else(|| ModelError::Invalid("a pipeline needs at least one shard".into()))?;
        let n = first.config().n_layers;
        let mut at = 0;
        for s in &shards {
            if s.layers().start != at {
                return Err(ModelError::Invalid(format!(
                    "shards do not chain: layer {at} expected, shard {} found",
                    s.layers()
                )));
            }
            at = s.layers().end;
        }
        if at != n {
            return Err(ModelError::Invalid(format!("shards end at layer {at}, the model has {n}")));
        }
        Ok(Self { shards })
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    pub fn context_length(&self) -> usize {
        self.shards[0].config().context_length
    }

    /// Opens a session of at most `max_tokens` positions on every shard.
    pub fn open_session(&self, max_tokens: usize) -> Result<LocalSession<'_>> {
        let sessions = self.shards.iter().map(|s| s.open_session(max_tokens)).collect::<Result<Vec<_>>>()?;
        Ok(LocalSession { pipeline: self, sessions })
    }
}

/// One session over a [`LocalPipeline`].
pub struct LocalSession<'a> {
    pipeline: &'a LocalPipeline,
    sessions: Vec<ShardSession>,
}

impl LocalSession<'_> {
    /// Positions already fed.
    pub fn len(&self) -> usize {
        self.sessions[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `tokens` through every shard; returns logits of the last position, or of every one with `all_logits`.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<shardline_kernels::Tensor> {
        let mut hidden: Option<shardline_kernels::Tensor> = None;
        for (shard, sess) in self.pipeline.shards.iter().zip(self.sessions.iter_mut()) {
            let input = match &hidden {
                None => ShardInput::Tokens(tokens),
                Some(h) => ShardInput::Hidden(h),
            };
            let out = if all_logits { shard.forward_all_logits(sess, input)? } else { shard.forward(sess, input)? };
            match out {
                ShardOutput::Hidden(h) => hidden = Some(h),
                ShardOutput::Logits(l) => return Ok(l),
            }
        }
        Err(ModelError::Invalid("the last shard returned no logits".into()))
    }
}

impl Stepper for LocalSession<'_> {
    fn step(&mut self, tokens: &[u32], sampling: &SamplingParams, n_top: usize) -> Result<Sampled> {
        let logits = self.forward(tokens, false)?;
        let last = self.pipeline.shards.last().expect("a pipeline has shards");
        last.sample(&logits, sampling, self.len() as u64, n_top)
    }
}

/// What to generate and when to stop.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (EOS, end-of-turn); they are not part of the text.
    pub stop_tokens: Vec<u32>,
    /// Strings that end generation; the text is cut before them.
    pub stop_strings: Vec<String>,
    /// Top log-probabilities to record per generated token (0 = none).
    pub n_top_logprobs: usize,
    /// Prompt positions fed per forward call during prefill.
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::GREEDY,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            n_top_logprobs: 0,
            prefill_chunk: 512,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller's text callback asked to stop (client went away).
    Cancelled,
}

/// The result of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    /// Generated ids, without a final stop token.
    pub tokens: Vec<u32>,
    pub samples: Vec<Sampled>,
    pub text: String,
    pub finish: FinishReason,
    /// Seconds from start to the first sampled token (the prefill).
    pub prefill_secs: f64,
    /// Seconds spent producing the tokens after the first.
    pub decode_secs: f64,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens.len(), self.prefill_secs)
    }

    /// Tokens per second after the first token (each costs one decode step).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.samples.len().saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: that much must be held back
/// from the stream until it is known not to start a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                keep = keep.max(i);
            }
        }
    }
    keep
}

/// Runs one generation: prefill `prompt` in chunks, then decode until a stop condition. `on_text` receives the text
/// as it becomes final and returns `false` to cancel.
pub fn generate(
    stepper: &mut dyn Stepper,
    prompt: &[u32],
    params: &GenerateParams,
    decoder: &mut dyn PieceDecoder,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid("the prompt has no tokens".into()));
    }
    let start = Instant::now();
    let chunk = params.prefill_chunk.max(1);
    let mut fed = 0;
    let mut next = None;
    while fed < prompt.len() {
        let end = (fed + chunk).min(prompt.len());
        let want_sample = end == prompt.len();
        let s =
            stepper.step(&prompt[fed..end], &params.sampling, if want_sample { params.n_top_logprobs } else { 0 })?;
        if want_sample {
            next = Some(s);
        }
        fed = end;
    }
    let prefill_secs = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut out = Generation {
        prompt_tokens: prompt.to_vec(),
        tokens: Vec::new(),
        samples: Vec::new(),
        text: String::new(),
        finish: FinishReason::Length,
        prefill_secs,
        decode_secs: 0.0,
    };
    // Text already handed to `on_text`.
    let mut emitted = 0;
    while let Some(s) = next.take() {
        let token = s.token;
        out.samples.push(s);
        if params.stop_tokens.contains(&token) {
            out.finish = FinishReason::Stop;
            break;
        }
        out.tokens.push(token);
        out.text.push_str(&decoder.push(token));
        if let Some(cut) = params.stop_strings.iter().filter_map(|s| out.text.find(s.as_str())).min() {
            out.text.truncate(cut);
            out.finish = FinishReason::Stop;
            break;
        }
        let safe = out.text.len() - held_back(&out.text, &params.stop_strings);
        if safe > emitted {
            if !on_text(&out.text[emitted..safe]) {
                out.finish = FinishReason::Cancelled;
                break;
            }
            emitted = safe;
        }
        if out.tokens.len() >= params.max_tokens {
            break;
        }
        next = Some(stepper.step(&[token], &params.sampling, params.n_top_logprobs)?);
    }
    if out.finish == FinishReason::Length {
        out.text.push_str(&decoder.finish());
    }
    if out.text.len() > emitted && out.finish != FinishReason::Cancelled {
        on_text(&out.text[emitted..]);
    }
    out.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits a scripted sequence of tokens, one per step.
    struct Script(Vec<u32>, usize);

    impl Stepper for Script {
        fn step(&mut self, _: &[u32], _: &SamplingParams, _: usize) -> Result<Sampled> {
            let t = self.0[self.1];
            self.1 += 1;
            Ok(Sampled { token: t, logprob: 0.0, top: vec![] })
        }
    }

    /// Token `i` decodes to the i-th letter.
    struct Letters;

    impl PieceDecoder for Letters {
        fn push(&mut self, token: u32) -> String {
            char::from(b'a' + token as u8).to_string()
        }
        fn finish(&mut self) -> String {
            String::new()
        }
    }

    fn run(script: Vec<u32>, params: GenerateParams) -> (Generation, String) {
        let mut streamed = String::new();
        let g = generate(&mut Script(script, 0), &[1, 2, 3], &params, &mut Letters, &mut |t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
        (g, streamed)
    }

    #[test]
    fn stops_at_max_tokens_and_streams_everything() {
        let (g, streamed) = run(vec![0, 1, 2, 3, 4, 5], GenerateParams { max_tokens: 4, ..Default::default() });
        assert_eq!(g.tokens, vec![0, 1, 2, 3]);
        assert_eq!(g.text, "abcd");
        assert_eq!(streamed, "abcd");
        assert_eq!(g.finish, FinishReason::Length);
    }

    #[test]
    fn stop_token_is_not_part_of_the_output() {
        let p = GenerateParams { max_tokens: 10, stop_tokens: vec![2], ..Default::default() };
        let (g, streamed) = run(vec![0, 1, 2, 3], p);
        assert_eq!(g.tokens, vec![0, 1]);
        assert_eq!(streamed, "ab");
        assert_eq!(g.finish, FinishReason::Stop);
    }

    #[test]
    fn stop_string_cuts_text_and_is_never_streamed() {
        let p = GenerateParams { max_tokens: 10, stop_strings: vec!["cde".into()], ..Default::default() };
        let (g, streamed) = run(vec![0, 1, 2, 3, 4, 5, 6], p);
        assert_eq!(g.text, "ab");
        assert_eq!(streamed, "ab");
        assert_eq!(g.finish, FinishReason::Stop);
        // A partial match that does not complete is released.
        let p = GenerateParams { max_tokens: 5, stop_strings: vec!["cdx".into()], ..Default::default() };
        let (g, streamed) = run(vec![0, 1, 2, 3, 4, 5, 6], p);
        assert_eq!(g.text, "abcde");
        assert_eq!(streamed, "abcde");
    }

    #[test]
    fn held_back_finds_partial_stop_prefixes() {
        assert_eq!(held_back("hello wor", &["world".into()]), 3);
        assert_eq!(held_back("hello", &["world".into()]), 0);
        assert_eq!(held_back("ab", &["b".into()]), 0);
    }
}
