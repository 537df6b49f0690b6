//! One generation over the swarm for an HTTP request: the engine's generation loop runs on a blocking thread over
//! the model's `SwarmClient`, and hands text to the request handler through a bounded channel. When the handler goes
//! away (the HTTP client disconnected), the next send fails, the loop stops, and the session is closed on every
//! stage, which frees its KV cache there.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use shardline_kernels::{Sampled, SamplingParams};
use shardline_node::ModelError;
use shardline_node::engine::TextStream;
use shardline_node::generate::{self, FinishReason, GenerateParams, Generation, Stepper};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span};

use crate::client::SwarmSession;
use crate::session::SessionError;

use super::ServedModel;
use super::error::ApiError;
use super::metrics::Metrics;

/// What the generation thread reports, in order: text pieces, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum GenEvent {
    /// Text that became final, with the samples of the generated tokens sampled since the previous `Text` (in
    /// order; never a stop token). A token whose text is held back (incomplete UTF-8, a possible stop string)
    /// arrives with a later piece, and the tokens of text that never becomes a piece only in `Done`.
    Text {
        text: String,
        samples: Vec<Sampled>,
    },
    Done(Box<Generation>),
    Failed(ApiError),
}

/// Steps a swarm session, keeping its typed error (the engine's loop only sees a `ModelError`), and collects the
/// samples of generated tokens for the next text event.
struct ApiStepper {
    session: SwarmSession,
    handle: tokio::runtime::Handle,
    error: Option<SessionError>,
    /// Prompt positions not fed yet: a sample taken before the whole prompt is fed is not a generated token.
    prompt_left: usize,
    stop_tokens: Vec<u32>,
    pending: Rc<RefCell<Vec<Sampled>>>,
    metrics: Arc<Metrics>,
}

impl Stepper for ApiStepper {
    fn step(&mut self, tokens: &[u32], _sampling: &SamplingParams, _n_top: usize) -> shardline_node::Result<Sampled> {
        let s = self.handle.block_on(self.session.step(tokens)).map_err(|e| {
            let message = format!("swarm: {e}");
            self.error = Some(e);
            ModelError::Invalid(message)
        })?;
        self.prompt_left = self.prompt_left.saturating_sub(tokens.len());
        // The generation loop ends at a stop token without making it part of the output.
        if self.prompt_left == 0 && !self.stop_tokens.contains(&s.token) {
            self.pending.borrow_mut().push(s.clone());
            self.metrics.record_token();
        }
        Ok(s)
    }
}

/// Starts generating `prompt` with `params` on `model`; events arrive on the returned channel. Dropping the receiver
/// cancels the generation. Everything logged on its behalf (routing, failover, the pipeline session ids that the
/// stages log too) is inside a `request` span carrying `request_id`, the id the client gets back.
pub fn spawn(
    model: Arc<ServedModel>,
    request_id: &str,
    prompt: Vec<u32>,
    params: GenerateParams,
    metrics: Arc<Metrics>,
    retry_after_secs: u64,
) -> mpsc::Receiver<GenEvent> {
    let (tx, rx) = mpsc::channel(64);
    let handle = tokio::runtime::Handle::current();
    let session = model.client.session(prompt.len() + params.max_tokens, params.sampling, params.n_top_logprobs);
    let span = info_span!("request", id = %request_id, model = %model.name);
    tokio::task::spawn_blocking(move || {
        let _in_request = span.enter();
        let pending = Rc::new(RefCell::new(Vec::new()));
        let mut stepper = ApiStepper {
            session,
            handle: handle.clone(),
            error: None,
            prompt_left: prompt.len(),
            stop_tokens: params.stop_tokens.clone(),
            pending: pending.clone(),
            metrics: metrics.clone(),
        };
        let mut decoder = TextStream::new(model.tokenizer.clone());
        let text_tx = tx.clone();
        let result = generate::generate(&mut stepper, &prompt, &params, &mut decoder, &mut |text| {
            let samples = std::mem::take(&mut *pending.borrow_mut());
            text_tx.blocking_send(GenEvent::Text { text: text.to_string(), samples }).is_ok()
        });
        let ApiStepper { session, error, .. } = stepper;
        handle.block_on(session.close());
        let event = match result {
            Ok(g) => {
                metrics.record_generation(&g);
                if g.finish == FinishReason::Cancelled {
                    info!(tokens = g.tokens.len(), "client went away: session closed");
                } else {
                    debug!(tokens = g.tokens.len(), finish = ?g.finish, "generation done");
                }
                GenEvent::Done(Box::new(g))
            }
            Err(e) => {
                let err = match error {
                    Some(s) => ApiError::from_session(&s, retry_after_secs),
                    None => ApiError::internal(e.to_string()),
                };
                metrics.record_failure(&err);
                info!(error = %err, "generation failed");
                GenEvent::Failed(err)
            }
        };
        let _ = tx.blocking_send(event);
    });
    rx
}
