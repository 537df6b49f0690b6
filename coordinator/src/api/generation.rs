//! One generation over the swarm for an HTTP request: the engine's generation loop runs on a blocking thread over
//! the model's `SwarmClient`, and hands text to the request handler through a bounded channel. When the handler goes
//! away (the HTTP client disconnected), the next send fails, the loop stops, and the session is closed on every
//! stage, which frees its KV cache there.

use std::sync::Arc;

use shardline_kernels::{Sampled, SamplingParams};
use shardline_node::ModelError;
use shardline_node::engine::TextStream;
use shardline_node::generate::{self, FinishReason, GenerateParams, Generation, Stepper};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::client::SwarmSession;
use crate::session::SessionError;

use super::ServedModel;
use super::error::ApiError;
use super::metrics::Metrics;

/// What the generation thread reports, in order: text pieces, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done(Box<Generation>),
    Failed(ApiError),
}

/// Steps a swarm session, keeping its typed error (the engine's loop only sees a `ModelError`).
struct ApiStepper {
    session: SwarmSession,
    handle: tokio::runtime::Handle,
    error: Option<SessionError>,
}

impl Stepper for ApiStepper {
    fn step(&mut self, tokens: &[u32], _sampling: &SamplingParams, _n_top: usize) -> shardline_node::Result<Sampled> {
        self.handle.block_on(self.session.step(tokens)).map_err(|e| {
            let message = format!("swarm: {e}");
            self.error = Some(e);
            ModelError::Invalid(message)
        })
    }
}

/// Starts generating `prompt` with `params` on `model`; events arrive on the returned channel. Dropping the receiver
/// cancels the generation.
pub fn spawn(
    model: Arc<ServedModel>,
    prompt: Vec<u32>,
    params: GenerateParams,
    metrics: Arc<Metrics>,
    retry_after_secs: u64,
) -> mpsc::Receiver<GenEvent> {
    let (tx, rx) = mpsc::channel(64);
    let handle = tokio::runtime::Handle::current();
    let session = model.client.session(prompt.len() + params.max_tokens, params.sampling, params.n_top_logprobs);
    tokio::task::spawn_blocking(move || {
        let mut stepper = ApiStepper { session, handle: handle.clone(), error: None };
        let mut decoder = TextStream::new(model.tokenizer.clone());
        let text_tx = tx.clone();
        let result = generate::generate(&mut stepper, &prompt, &params, &mut decoder, &mut |text| {
            text_tx.blocking_send(GenEvent::Text(text.to_string())).is_ok()
        });
        let ApiStepper { session, error, .. } = stepper;
        handle.block_on(session.close());
        let event = match result {
            Ok(g) => {
                metrics.record_generation(&g);
                if g.finish == FinishReason::Cancelled {
                    info!(model = %model.name, tokens = g.tokens.len(), "client went away: session closed");
                } else {
                    debug!(model = %model.name, tokens = g.tokens.len(), finish = ?g.finish, "generation done");
                }
                GenEvent::Done(Box::new(g))
            }
            Err(e) => {
                let err = match error {
                    Some(s) => ApiError::from_session(&s, retry_after_secs),
                    None => ApiError::internal(e.to_string()),
                };
                metrics.record_failure(&err);
                info!(model = %model.name, error = %err, "generation failed");
                GenEvent::Failed(err)
            }
        };
        let _ = tx.blocking_send(event);
    });
    rx
}
