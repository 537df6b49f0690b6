//! Server-sent events for `stream: true`: one chunk per text piece, a last chunk with the finish reason, a usage
//! chunk when `stream_options.include_usage` is set, then `data: [DONE]`. The event stream owns the generation's
//! receiver, so a client that disconnects drops it and thereby cancels the generation.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream;
use serde::Serialize;
use shardline_node::generate::Generation;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::generation::GenEvent;
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
}

fn json_event(value: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

impl StreamCtx {
    fn chunk(&self, text: Option<String>, finish: Option<&'static str>, role: bool) -> Event {
        match self.kind {
            StreamKind::Chat => json_event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta { role: role.then_some("assistant"), content: text },
                    logprobs: None,
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
                    logprobs: None,
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
    fn opening(&self) -> Vec<Event> {
        match (self.kind, &self.echo) {
            (StreamKind::Chat, _) => vec![self.chunk(Some(String::new()), None, true)],
            (StreamKind::Completion, Some(e)) if !e.is_empty() => vec![self.chunk(Some(e.clone()), None, false)],
            (StreamKind::Completion, _) => Vec::new(),
        }
    }

    fn closing(&self, g: &Generation) -> Vec<Event> {
        let mut out = vec![self.chunk(None, finish_reason(g.finish), false)];
        if self.include_usage {
            out.push(self.usage_chunk(Usage::new(g.prompt_tokens.len(), g.tokens.len())));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }

    /// Events for one generation event, and whether the stream ends after them.
    fn events_for(&self, ev: GenEvent) -> (Vec<Event>, bool) {
        match ev {
            GenEvent::Text(t) => (vec![self.chunk(Some(t), None, false)], false),
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
pub fn response(ctx: StreamCtx, first: GenEvent, rx: mpsc::Receiver<GenEvent>) -> Response {
    let mut head = ctx.opening();
    let (first_events, finished) = ctx.events_for(first);
    head.extend(first_events);
    let rest = stream::unfold((rx, ctx, finished), |(mut rx, ctx, finished)| async move {
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
