//! The generation loop, independent of where the layers run: a [`Stepper`] feeds tokens through the model and
//! samples the next one (in-process shards here, a QUIC pipeline in the coordinator's `SwarmSession`); this module
//! handles prefill chunking, stop tokens, stop strings, streaming text and timing.
//!
//! The loop is async so that a swarm session awaits its stages without a thread blocked on it; the local session's
//! futures complete at their first poll (the forward runs inside them), and [`crate::engine::Engine::generate`]
//! drives them to completion in place. Errors keep the stepper's own type ([`GenerateError::Step`]), so the
//! coordinator's API can still tell a busy swarm (429) from a broken stage (502).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use shardline_kernels::{Sampled, SamplingParams};

use crate::error::{ModelError, Result};
use crate::model::{Shard, ShardInput, ShardKv, ShardOutput};

/// Something that runs a session's tokens through every layer and samples the token that follows them.
pub trait Stepper {
    /// Why a step failed, kept typed end to end (the local engine's [`ModelError`], the swarm's session error).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Feeds `tokens` (the next positions of the session) without sampling: every prefill chunk but the last.
    fn feed(&mut self, tokens: &[u32]) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;

    /// Feeds `tokens` (the next positions of the session) and samples the token after the last of them, at position
    /// `session length after feeding`, with `n_top` top log-probabilities.
    fn step(
        &mut self,
        tokens: &[u32],
        sampling: &SamplingParams,
        n_top: usize,
    ) -> impl Future<Output = std::result::Result<Sampled, Self::Error>> + Send;
}

/// Why a generation failed: the loop's own check, or the stepper's error as it was raised.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError<E> {
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    #[error(transparent)]
    Step(E),
}

impl From<GenerateError<ModelError>> for ModelError {
    fn from(e: GenerateError<ModelError>) -> Self {
        match e {
            GenerateError::EmptyPrompt => ModelError::Invalid(e.to_string()),
            GenerateError::Step(e) => e,
        }
    }
}

/// Where generated text goes as it becomes final.
pub trait TextSink {
    /// A generated token (never a stop token), as soon as it is sampled; its text may come in a later
    /// [`TextSink::text`] call, or never (a stop string cut it away).
    fn token(&mut self, _sample: &Sampled) {}

    /// Text that became final; `false` cancels the generation (the reader went away).
    fn text(&mut self, text: &str) -> impl Future<Output = bool> + Send;
}

/// A closure receives the text and answers whether to go on.
impl<F: FnMut(&str) -> bool + Send + ?Sized> TextSink for F {
    async fn text(&mut self, text: &str) -> bool {
        self(text)
    }
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
    sessions: Vec<ShardKv>,
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

    /// [`Stepper::step`] on this thread, for callers outside async code (benches, reference runs in tests): the
    /// local session never waits on anything, so the two are the same computation.
    pub fn step_sync(&mut self, tokens: &[u32], sampling: &SamplingParams, n_top: usize) -> Result<Sampled> {
        let logits = self.forward(tokens, false)?;
        let last = self.pipeline.shards.last().ok_or_else(|| ModelError::Invalid("a pipeline has no shards".into()))?;
        last.sample(&logits, sampling, self.len() as u64, n_top)
    }
}

impl Stepper for LocalSession<'_> {
    type Error = ModelError;

    /// Runs the shards; the last position's logits are computed (one row of the head) and dropped unsampled.
    async fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.forward(tokens, false).map(drop)
    }

    async fn step(&mut self, tokens: &[u32], sampling: &SamplingParams, n_top: usize) -> Result<Sampled> {
        self.step_sync(tokens, sampling, n_top)
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

/// Runs one generation: prefill `prompt` in chunks (only the last one samples), then decode until a stop condition.
/// `sink` receives each generated token as it is sampled and the text as it becomes final, and cancels by answering
/// `false`.
pub async fn generate<S, D, T>(
    stepper: &mut S,
    prompt: &[u32],
    params: &GenerateParams,
    decoder: &mut D,
    sink: &mut T,
) -> std::result::Result<Generation, GenerateError<S::Error>>
where
    S: Stepper + ?Sized,
    D: PieceDecoder + ?Sized,
    T: TextSink + ?Sized,
{
    let Some((head, last_chunk)) = split_last_chunk(prompt, params.prefill_chunk) else {
        return Err(GenerateError::EmptyPrompt);
    };
    let start = Instant::now();
    for c in head.chunks(params.prefill_chunk.max(1)) {
        stepper.feed(c).await.map_err(GenerateError::Step)?;
    }
    let first = stepper.step(last_chunk, &params.sampling, params.n_top_logprobs).await.map_err(GenerateError::Step)?;
    let mut next = Some(first);
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
    // Text already handed to the sink.
    let mut emitted = 0;
    while let Some(s) = next.take() {
        let token = s.token;
        if params.stop_tokens.contains(&token) {
            out.samples.push(s);
            out.finish = FinishReason::Stop;
            break;
        }
        sink.token(&s);
        out.samples.push(s);
        out.tokens.push(token);
        out.text.push_str(&decoder.push(token));
        if let Some(cut) = params.stop_strings.iter().filter_map(|s| out.text.find(s.as_str())).min() {
            out.text.truncate(cut);
            out.finish = FinishReason::Stop;
            break;
        }
        let safe = out.text.len() - held_back(&out.text, &params.stop_strings);
        if safe > emitted {
            if !sink.text(&out.text[emitted..safe]).await {
                out.finish = FinishReason::Cancelled;
                break;
            }
            emitted = safe;
        }
        if out.tokens.len() >= params.max_tokens {
            break;
        }
        next =
            Some(stepper.step(&[token], &params.sampling, params.n_top_logprobs).await.map_err(GenerateError::Step)?);
    }
    if out.finish == FinishReason::Length {
        out.text.push_str(&decoder.finish());
    }
    if out.text.len() > emitted && out.finish != FinishReason::Cancelled {
        sink.text(&out.text[emitted..]).await;
    }
    out.decode_secs = decode_start.elapsed().as_secs_f64();
    Ok(out)
}

/// Splits a prompt into the positions fed without sampling and the last prefill chunk (`chunk` positions at most,
/// never empty), in that order; `None` for an empty prompt. The head is a whole number of chunks, so every chunk but the last is
/// full, as when the whole prompt is cut from the front.
fn split_last_chunk(prompt: &[u32], chunk: usize) -> Option<(&[u32], &[u32])> {
    if prompt.is_empty() {
        return None;
    }
    let chunk = chunk.max(1);
    let head_len = (prompt.len() - 1) / chunk * chunk;
    Some(prompt.split_at(head_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits a scripted sequence of tokens, one per sampled step, and records what it was asked.
    #[derive(Default)]
    struct Script {
        tokens: Vec<u32>,
        sampled: usize,
        /// Lengths of the chunks fed without sampling, in order.
        fed: Vec<usize>,
        /// `(tokens fed, n_top)` of every sampled step, in order.
        steps: Vec<(usize, usize)>,
        /// Fail the step with this index.
        fail_at: Option<usize>,
    }

    #[derive(Debug, PartialEq, thiserror::Error)]
    enum ScriptError {
        #[error("busy")]
        Busy,
    }

    impl Script {
        fn new(tokens: Vec<u32>) -> Self {
            Self { tokens, ..Default::default() }
        }
    }

    impl Stepper for Script {
        type Error = ScriptError;

        async fn feed(&mut self, tokens: &[u32]) -> std::result::Result<(), ScriptError> {
            self.fed.push(tokens.len());
            Ok(())
        }

        async fn step(
            &mut self,
            tokens: &[u32],
            _: &SamplingParams,
            n_top: usize,
        ) -> std::result::Result<Sampled, ScriptError> {
            if self.fail_at == Some(self.steps.len()) {
                return Err(ScriptError::Busy);
            }
            self.steps.push((tokens.len(), n_top));
            let t = self.tokens[self.sampled];
            self.sampled += 1;
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

    fn run_on(
        script: &mut Script,
        prompt: &[u32],
        params: GenerateParams,
    ) -> (std::result::Result<Generation, GenerateError<ScriptError>>, String) {
        let mut streamed = String::new();
        let mut sink = |t: &str| {
            streamed.push_str(t);
            true
        };
        let g = futures::executor::block_on(generate(script, prompt, &params, &mut Letters, &mut sink));
        (g, streamed)
    }

    fn run(script: Vec<u32>, params: GenerateParams) -> (Generation, String) {
        let (g, streamed) = run_on(&mut Script::new(script), &[1, 2, 3], params);
        (g.unwrap(), streamed)
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

    #[test]
    fn only_the_last_prefill_chunk_samples() {
        let mut script = Script::new(vec![0, 1, 2]);
        let prompt: Vec<u32> = (0..10).collect();
        let params = GenerateParams { max_tokens: 3, prefill_chunk: 4, ..Default::default() };
        let (g, _) = run_on(&mut script, &prompt, params);
        assert_eq!(g.unwrap().tokens, vec![0, 1, 2]);
        // 10 positions in chunks of 4: two fed unsampled, the last 2 sampled, then two decode steps of one token.
        assert_eq!(script.fed, vec![4, 4]);
        assert_eq!(script.steps.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2, 1, 1]);
        // A prompt that is a whole number of chunks samples after its last full chunk.
        let mut script = Script::new(vec![0]);
        let params = GenerateParams { max_tokens: 1, prefill_chunk: 5, ..Default::default() };
        let (g, _) = run_on(&mut script, &prompt, params);
        assert_eq!(g.unwrap().tokens, vec![0]);
        assert_eq!((script.fed, script.steps.len()), (vec![5], 1));
        assert_eq!(script.steps[0].0, 5);
        // A prompt within one chunk is never fed without sampling.
        let mut script = Script::new(vec![0]);
        let params = GenerateParams { max_tokens: 1, ..Default::default() };
        let (g, _) = run_on(&mut script, &prompt, params);
        assert!(g.is_ok());
        assert_eq!((script.fed.len(), script.steps[0].0), (0, 10));
    }

    #[test]
    fn n_top_reaches_every_sampled_step() {
        let mut script = Script::new(vec![0, 1, 2, 3]);
        let params = GenerateParams { max_tokens: 4, n_top_logprobs: 5, prefill_chunk: 2, ..Default::default() };
        let (g, _) = run_on(&mut script, &[1, 2, 3, 4, 5], params);
        assert_eq!(g.unwrap().tokens.len(), 4);
        assert_eq!(script.fed, vec![2, 2]);
        assert_eq!(script.steps, vec![(1, 5), (1, 5), (1, 5), (1, 5)]);
    }

    #[test]
    fn the_steppers_error_comes_back_typed() {
        // Failing in prefill and in decode, the error is the stepper's own value, not a message.
        for fail_at in [0, 2] {
            let mut script = Script { fail_at: Some(fail_at), ..Script::new(vec![0, 1, 2, 3]) };
            let (g, streamed) = run_on(&mut script, &[1, 2, 3], GenerateParams::default());
            assert!(matches!(g, Err(GenerateError::Step(ScriptError::Busy))), "{g:?}");
            assert_eq!(streamed.len(), fail_at);
        }
        let (g, _) = run_on(&mut Script::new(vec![0]), &[], GenerateParams::default());
        assert!(matches!(g, Err(GenerateError::EmptyPrompt)));
    }

    #[test]
    fn sink_sees_generated_tokens_but_not_the_stop_token() {
        struct Collect(Vec<u32>, String);
        impl TextSink for Collect {
            fn token(&mut self, s: &Sampled) {
                self.0.push(s.token);
            }
            async fn text(&mut self, text: &str) -> bool {
                self.1.push_str(text);
                true
            }
        }
        let mut sink = Collect(Vec::new(), String::new());
        let params = GenerateParams { max_tokens: 10, stop_tokens: vec![2], ..Default::default() };
        let g = futures::executor::block_on(generate(
            &mut Script::new(vec![0, 1, 2, 3]),
            &[1],
            &params,
            &mut Letters,
            &mut sink,
        ))
        .unwrap();
        assert_eq!(sink.0, vec![0, 1]);
        assert_eq!(sink.1, "ab");
        assert_eq!(g.samples.len(), 3, "the stop token's sample is kept in the generation");
    }
}
