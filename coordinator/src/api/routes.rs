//! Request handlers: parse and validate the OpenAI request, tokenise (chat messages through the model's own
//! template), start the generation, and answer with JSON or an SSE stream.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shardline_kernels::SamplingParams;
use shardline_node::engine::stop_tokens;
use shardline_node::generate::{FinishReason, GenerateParams, Generation};
use shardline_node::tokenizer::ChatMessage;

use super::error::ApiError;
use super::generation::{self, GenEvent};
use super::openai::{
    AssistantMessage, ChatChoice, ChatRequest, ChatResponse, CompletionChoice, CompletionRequest, Coverage, ModelCard,
    ModelList, Prompt, Sampling, Usage,
};
use super::sse::{self, StreamCtx, StreamKind, StreamLogprobs};
use super::{ApiState, MAX_BODY_BYTES, ServedModel, dashboard, logprobs, swarm, unix_secs};

/// The API's routes over `state`.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/swarm", get(swarm::swarm))
        .route("/v1/swarm/events", get(swarm::events))
        .route("/", get(dashboard::page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .with_state(state)
}

/// OpenAI's `finish_reason`; `None` for a cancelled generation (nobody reads it).
pub fn finish_reason(f: FinishReason) -> Option<&'static str> {
    match f {
        FinishReason::Stop => Some("stop"),
        FinishReason::Length => Some("length"),
        FinishReason::Cancelled => None,
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

fn counted(state: &ApiState, endpoint: &'static str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    state.metrics.record_request(endpoint, resp.status());
    resp
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Sampling and stop settings of a request, checked.
fn generate_params(
    s: &Sampling,
    model: &ServedModel,
    max_tokens: usize,
    n_top: usize,
) -> Result<GenerateParams, ApiError> {
    if let Some(n) = s.n
        && n != 1
    {
        return Err(ApiError::invalid_param("n", "only n = 1 is supported"));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid_param("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param("top_p", "top_p must be in (0, 1]"));
    }
    if max_tokens == 0 {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    if n_top > 20 {
        return Err(ApiError::invalid_param("logprobs", "at most 20 top log-probabilities per token"));
    }
    Ok(GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_k: s.top_k.unwrap_or(0),
            top_p,
            seed: s.seed.unwrap_or_else(rand::random),
        },
        stop_tokens: if s.ignore_eos { Vec::new() } else { stop_tokens(&model.tokenizer) },
        stop_strings: s.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        n_top_logprobs: n_top,
        ..GenerateParams::default()
    })
}

/// Prompt plus new tokens must fit the context; the sum is checked (a client may send `max_tokens` up to 2^64-1).
fn check_context(model: &ServedModel, prompt: usize, max_tokens: usize) -> Result<(), ApiError> {
    if prompt == 0 {
        return Err(ApiError::invalid_param("prompt", "the prompt has no tokens"));
    }
    match prompt.checked_add(max_tokens) {
        Some(total) if total <= model.context_length => Ok(()),
        _ => Err(ApiError::context_exceeded(prompt, max_tokens, model.context_length)),
    }
}

/// Refuses prompt text longer than any prompt that fits the model's context could be, before it is tokenised.
fn check_prompt_bytes(state: &ApiState, model: &ServedModel, param: &str, bytes: usize) -> Result<(), ApiError> {
    let limit = state.config.max_prompt_bytes(model.context_length);
    if bytes > limit {
        let msg = format!("the prompt is {bytes} bytes; at most {limit} bytes are accepted for this model's context");
        return Err(ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid_param(param, msg) });
    }
    Ok(())
}

/// Runs `work` (tokenising, rendering a chat template) on the blocking pool, at most `TOKENISE_SLOTS` at once, so a
/// large prompt never holds an async worker thread: other requests and `/health` are served meanwhile.
async fn off_runtime<T: Send + 'static>(
    state: &ApiState,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _slot = state.tokenise_slots.acquire().await.map_err(|_| ApiError::internal("tokeniser closed"))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("tokeniser failed: {e}")))?
}

/// Starts the generation and waits for its first event, so that failures before any output (no route, full
/// queues) are answered with their status code even for streams.
async fn start(
    state: &ApiState,
    model: &Arc<ServedModel>,
    request_id: &str,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<(GenEvent, tokio::sync::mpsc::Receiver<GenEvent>), ApiError> {
    let mut rx = generation::spawn(model.clone(), request_id, prompt, params, state.metrics.clone(), &state.config);
    match rx.recv().await {
        None => Err(ApiError::internal("generation ended without a result")),
        Some(GenEvent::Failed(e)) => Err(e),
        Some(first) => Ok((first, rx)),
    }
}

/// Waits for the end of a non-streamed generation.
async fn collect(first: GenEvent, mut rx: tokio::sync::mpsc::Receiver<GenEvent>) -> Result<Generation, ApiError> {
    let mut ev = Some(first);
    loop {
        let next = match ev.take() {
            Some(e) => Some(e),
            None => rx.recv().await,
        };
        match next {
            None => return Err(ApiError::internal("generation ended without a result")),
            Some(GenEvent::Text { .. }) => {}
            Some(GenEvent::Done(g)) => return Ok(*g),
            Some(GenEvent::Failed(e)) => return Err(e),
        }
    }
}

/// Reads a request body whole, within the body timeout (a total for the whole body) and the size limit.
async fn read_body(state: &ApiState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.body_timeout;
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Err(_) => Err(ApiError::body_timeout(limit)),
        Ok(Err(e)) => {
            Err(ApiError::invalid(format!("cannot read the request body (at most {MAX_BODY_BYTES} bytes): {e}")))
        }
        Ok(Ok(b)) => Ok(b),
    }
}

async fn completions(State(state): State<Arc<ApiState>>, body: Body) -> Response {
    let r = match read_body(&state, body).await {
        Ok(body) => completion(&state, &body).await,
        Err(e) => Err(e),
    };
    counted(&state, "completions", r)
}

async fn completion(state: &ApiState, body: &Bytes) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let model = state.model(&req.model).ok_or_else(|| ApiError::unknown_model(&req.model))?;
    let tok = &model.tokenizer;
    let text = match &req.prompt {
        Prompt::Text(s) => Some(s.clone()),
        Prompt::TextBatch(v) if v.len() == 1 => Some(v[0].clone()),
        Prompt::Tokens(_) => None,
        Prompt::TokenBatch(v) if v.len() == 1 => None,
        _ => return Err(ApiError::invalid_param("prompt", "only one prompt per request is supported")),
    };
    let prompt = match (&req.prompt, text) {
        (_, Some(text)) => {
            check_prompt_bytes(state, &model, "prompt", text.len())?;
            let tok = tok.clone();
            off_runtime(state, move || {
                tok.encode(&text, true).map_err(|e| ApiError::invalid_param("prompt", e.to_string()))
            })
            .await?
        }
        (Prompt::Tokens(t), None) => t.clone(),
        (Prompt::TokenBatch(v), None) => v[0].clone(),
        _ => return Err(ApiError::invalid_param("prompt", "only one prompt per request is supported")),
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= tok.vocab_size()) {
        return Err(ApiError::invalid_param("prompt", format!("token {bad} is outside the vocabulary")));
    }
    let max_tokens = req.max_tokens.unwrap_or(state.config.default_completion_tokens);
    check_context(&model, prompt.len(), max_tokens)?;
    let n_top = req.logprobs.unwrap_or(0);
    let params = generate_params(&req.sampling, &model, max_tokens, n_top)?;
    let echo = match (&req.prompt, req.echo) {
        (_, false) => None,
        (Prompt::Text(s), true) => Some(s.clone()),
        (Prompt::TextBatch(v), true) => Some(v[0].clone()),
        (_, true) => Some(tok.decode(&prompt).map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?),
    };
    let prompt_len = prompt.len();
    let id = request_id("cmpl");
    let (first, rx) = start(state, &model, &id, prompt, params).await?;
    let ctx = StreamCtx {
        kind: StreamKind::Completion,
        id,
        created: unix_secs(),
        model: req.model.clone(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: req
            .logprobs
            .map(|_| StreamLogprobs::new(model.tokenizer.clone(), echo.as_ref().map_or(0, String::len))),
        echo,
    };
    if req.stream {
        return Ok(sse::response(ctx, first, rx));
    }
    let g = collect(first, rx).await?;
    let prefix = ctx.echo.unwrap_or_default();
    let generated = &g.samples[..g.tokens.len().min(g.samples.len())];
    let logprobs = req.logprobs.map(|_| logprobs::completion(&model.tokenizer, generated, &mut prefix.len()));
    let resp = super::openai::CompletionResponse {
        id: ctx.id,
        object: "text_completion",
        created: ctx.created,
        model: ctx.model,
        choices: vec![CompletionChoice {
            index: 0,
            text: prefix + &g.text,
            logprobs,
            finish_reason: finish_reason(g.finish),
        }],
        usage: Some(Usage::new(prompt_len, g.tokens.len())),
    };
    Ok(axum::Json(resp).into_response())
}

async fn chat_completions(State(state): State<Arc<ApiState>>, body: Body) -> Response {
    let r = match read_body(&state, body).await {
        Ok(body) => chat(&state, &body).await,
        Err(e) => Err(e),
    };
    counted(&state, "chat_completions", r)
}

async fn chat(state: &ApiState, body: &Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    let model = state.model(&req.model).ok_or_else(|| ApiError::unknown_model(&req.model))?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param("messages", "messages must not be empty"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| m.text().map(|t| ChatMessage::new(m.role.clone(), t)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::invalid_param("messages", e))?;
    let bytes = messages.iter().fold(0usize, |n, m| n.saturating_add(m.content.len()).saturating_add(m.role.len()));
    check_prompt_bytes(state, &model, "messages", bytes)?;
    let tok = model.tokenizer.clone();
    let prompt = off_runtime(state, move || {
        let text =
            tok.apply_chat_template(&messages, true).map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        // The template writes BOS itself where the model wants one.
        tok.encode(&text, false).map_err(|e| ApiError::invalid_param("messages", e.to_string()))
    })
    .await?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or_else(|| {
        model.context_length.saturating_sub(prompt.len()).min(state.config.default_chat_tokens).max(1)
    });
    check_context(&model, prompt.len(), max_tokens)?;
    let n_top = if req.logprobs { req.top_logprobs.unwrap_or(0) } else { 0 };
    let params = generate_params(&req.sampling, &model, max_tokens, n_top)?;
    let prompt_len = prompt.len();
    let id = request_id("chatcmpl");
    let (first, rx) = start(state, &model, &id, prompt, params).await?;
    let ctx = StreamCtx {
        kind: StreamKind::Chat,
        id,
        created: unix_secs(),
        model: req.model.clone(),
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        echo: None,
        logprobs: req.logprobs.then(|| StreamLogprobs::new(model.tokenizer.clone(), 0)),
    };
    if req.stream {
        return Ok(sse::response(ctx, first, rx));
    }
    let g = collect(first, rx).await?;
    let generated = &g.samples[..g.tokens.len().min(g.samples.len())];
    let logprobs = req.logprobs.then(|| logprobs::chat(&model.tokenizer, generated));
    let resp = ChatResponse {
        id: ctx.id,
        object: "chat.completion",
        created: ctx.created,
        model: ctx.model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage { role: "assistant", content: g.text },
            logprobs,
            finish_reason: finish_reason(g.finish),
        }],
        usage: Usage::new(prompt_len, g.tokens.len()),
    };
    Ok(axum::Json(resp).into_response())
}

fn card(state: &ApiState, m: &ServedModel) -> ModelCard {
    let missing = m.missing_layers(&state.registry);
    ModelCard {
        id: m.name.clone(),
        object: "model",
        created: m.created,
        owned_by: "shardline",
        shardline_model_id: m.model_id.clone(),
        coverage: Coverage {
            n_layers: m.n_layers,
            routable: missing.is_empty(),
            missing: missing.iter().map(|r| r.to_string()).collect(),
            nodes: state.registry.snapshot(&m.model_id).len(),
        },
    }
}

async fn models(State(state): State<Arc<ApiState>>) -> Response {
    let (data, partial) = state.models.iter().map(|m| card(&state, m)).partition(|c| c.coverage.routable);
    let r = axum::Json(ModelList { object: "list", data, partial }).into_response();
    counted(&state, "models", Ok(r))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    /// Served models that are fully routable now.
    routable: Vec<String>,
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let routable: Vec<String> =
        state.models.iter().filter(|m| m.missing_layers(&state.registry).is_empty()).map(|m| m.name.clone()).collect();
    let (status, word) =
        if routable.is_empty() { (StatusCode::SERVICE_UNAVAILABLE, "unavailable") } else { (StatusCode::OK, "ok") };
    (status, axum::Json(Health { status: word, routable })).into_response()
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let text = state.metrics.render(&state.registry);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
