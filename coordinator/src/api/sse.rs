//! Server-sent events for `stream: true`: one chunk per text piece, a last chunk with the finish reason, a usage
//! chunk when `stream_options.include_usage` is set, then `data: [DONE]`. With `logprobs`, each chunk carries the
//! log-probabilities of the tokens whose text it brings, and the last chunk those of tokens that brought no text (a
//! stop string cut them away), so the chunks together report exactly the tokens of the unstreamed response. The
//! event stream owns the generation's receiver, so a client that disconnects drops it and thereby cancels the
//! generation.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream;
use serde::Serialize;
use shardline_kernels::Sampled;
use shardline_node::generate::Generation;
use shardline_node::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::generation::GenEvent;
use super::logprobs;
use super::openai::{ChatChunk, ChunkChoice, CompletionChoice, CompletionResponse, Delta, Usage};
use super::routes::finish_reason;

/// Which endpoint the stream answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Chat,
    Completion,
}

/// What every chunk of one stream shares.
#[derive(Clone, Debug)]
pub struct StreamCtx {
    pub kind: StreamKind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    /// Text sent before the generated text (completions with `echo`).
    pub echo: Option<String>,
    /// Set when the request asked for log-probabilities.
    pub logprobs: Option<StreamLogprobs>,
}

/// Log-probabilities sent so far in one stream.
#[derive(Clone, Debug)]
pub struct StreamLogprobs {
    tokenizer: Arc<Tokenizer>,
    /// Generated tokens whose log-probabilities were sent.
    sent: usize,
    /// Byte offset of the next token's text in the whole returned text (completions' `text_offset`).
    offset: usize,
}

impl StreamLogprobs {
    /// `echo_len`: bytes of echoed prompt before the generated text.
    pub fn new(tokenizer: Arc<Tokenizer>, echo_len: usize) -> Self {
        Self { tokenizer, sent: 0, offset: echo_len }
    }
}

fn json_event(value: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

impl StreamCtx {
    /// One chunk; `samples` are the tokens whose log-probabilities it carries (ignored unless they were asked for).
    fn chunk(&mut self, text: Option<String>, finish: Option<&'static str>, role: bool, samples: &[Sampled]) -> Event {
        let lp = self.logprobs.as_mut().filter(|_| !samples.is_empty());
        let (chat_lp, completion_lp) = match (lp, self.kind) {
            (None, _) => (None, None),
            (Some(lp), StreamKind::Chat) => {
                lp.sent += samples.len();
                (Some(logprobs::chat(&lp.tokenizer, samples)), None)
            }
            (Some(lp), StreamKind::Completion) => {
                lp.sent += samples.len();
                (None, Some(logprobs::completion(&lp.tokenizer, samples, &mut lp.offset)))
            }
        };
        match self.kind {
            StreamKind::Chat => json_event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta { role: role.then_some("assistant"), content: text },
                    logprobs: chat_lp,
                    finish_reason: finish,
                }],
                usage: self.include_usage.then_some(None),
            }),
            StreamKind::Completion => json_event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default(),
                    logprobs: completion_lp,
                    finish_reason: finish,
                }],
                usage: None,
            }),
        }
    }

    fn usage_chunk(&self, usage: Usage) -> Event {
        match self.kind {
            StreamKind::Chat => json_event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            StreamKind::Completion => json_event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(usage),
            }),
        }
    }

    /// Events opening the stream: the assistant role (chat) or the echoed prompt (completions).
    fn opening(&mut self) -> Vec<Event> {
        match (self.kind, self.echo.clone()) {
            (StreamKind::Chat, _) => vec![self.chunk(Some(String::new()), None, true, &[])],
            (StreamKind::Completion, Some(e)) if !e.is_empty() => vec![self.chunk(Some(e), None, false, &[])],
            (StreamKind::Completion, _) => Vec::new(),
        }
    }

    fn closing(&mut self, g: &Generation) -> Vec<Event> {
        let sent = self.logprobs.as_ref().map_or(0, |lp| lp.sent);
        let unsent = g.samples.get(sent..g.tokens.len()).unwrap_or_default();
        let mut out = vec![self.chunk(None, finish_reason(g.finish), false, unsent)];
        if self.include_usage {
            out.push(self.usage_chunk(Usage::new(g.prompt_tokens.len(), g.tokens.len())));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }

    /// Events for one generation event, and whether the stream ends after them.
    fn events_for(&mut self, ev: GenEvent) -> (Vec<Event>, bool) {
        match ev {
            GenEvent::Text { text, samples } => (vec![self.chunk(Some(text), None, false, &samples)], false),
            GenEvent::Done(g) => (self.closing(&g), true),
            GenEvent::Failed(e) => (vec![error_event(&e)], true),
        }
    }
}

fn error_event(e: &ApiError) -> Event {
    Event::default().data(e.body_json())
}

/// The SSE response: `first` (already received, so errors before any output could still get a status code) and
/// then everything `rx` brings.
pub fn response(mut ctx: StreamCtx, first: GenEvent, rx: mpsc::Receiver<GenEvent>) -> Response {
    let mut head = ctx.opening();
    let (first_events, finished) = ctx.events_for(first);
    head.extend(first_events);
    let rest = stream::unfold((rx, ctx, finished), |(mut rx, mut ctx, finished)| async move {
        if finished {
            return None;
        }
        let (events, finished) = match rx.recv().await {
            Some(ev) => ctx.events_for(ev),
            None => (vec![error_event(&ApiError::internal("generation ended without a result"))], true),
        };
        Some((stream::iter(events), (rx, ctx, finished)))
    })
    .flatten();
    let events = stream::iter(head).chain(rest).map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
