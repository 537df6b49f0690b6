//! One generation over the swarm for an HTTP request: an async task runs the engine's generation loop over the
//! model's `SwarmSession` and hands text to the request handler through a bounded channel. When the handler goes
//! away (the HTTP client disconnected), the next send fails, the loop stops, and the session is closed on every
//! stage, which frees its KV cache there.

use std::sync::Arc;
use std::time::Duration;

use shardline_kernels::Sampled;
use shardline_node::engine::TextStream;
use shardline_node::generate::{self, FinishReason, GenerateParams, Generation, TextSink};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span};

use super::error::ApiError;
use super::metrics::Metrics;
use super::{ApiConfig, ServedModel};

/// Events buffered between the generation task and the response; a reader that falls this far behind holds the
/// generation at its next text event.
const CHANNEL_EVENTS: usize = 64;

/// What the generation task reports, in order: text pieces, then exactly one `Done` or `Failed`.
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

/// Sends the loop's text to the response as `GenEvent::Text`, with the samples of the tokens generated since the
/// previous one, and counts each generated token in the live rates as it is sampled.
struct ChannelSink {
    tx: mpsc::Sender<GenEvent>,
    pending: Vec<Sampled>,
    metrics: Arc<Metrics>,
    /// Longest wait for room in the channel before the reader counts as gone; `None` waits as long as the reader
    /// takes (the default: `ApiConfig::send_timeout`).
    send_timeout: Option<Duration>,
}

impl TextSink for ChannelSink {
    fn token(&mut self, sample: &Sampled) {
        self.pending.push(sample.clone());
        self.metrics.record_token();
    }

    async fn text(&mut self, text: &str) -> bool {
        let event = GenEvent::Text { text: text.to_string(), samples: std::mem::take(&mut self.pending) };
        self.send(event).await
    }
}

impl ChannelSink {
    /// Whether the event reached the channel (a reader is still there).
    async fn send(&self, event: GenEvent) -> bool {
        match self.send_timeout {
            None => self.tx.send(event).await.is_ok(),
            Some(limit) => self.tx.send_timeout(event, limit).await.is_ok(),
        }
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
    config: &ApiConfig,
) -> mpsc::Receiver<GenEvent> {
    let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
    // Checked against the context by the caller; saturating here keeps an unchecked caller from wrapping around.
    let positions = prompt.len().saturating_add(params.max_tokens);
    let mut session = model.client.session(positions, params.sampling, params.n_top_logprobs);
    let span = info_span!("request", id = %request_id, model = %model.name);
    let retry_after_secs = config.retry_after_secs;
    let mut sink = ChannelSink { tx, pending: Vec::new(), metrics: metrics.clone(), send_timeout: config.send_timeout };
    let task = async move {
        let mut decoder = TextStream::new(model.tokenizer.clone());
        let result = generate::generate(&mut session, &prompt, &params, &mut decoder, &mut sink).await;
        session.close().await;
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
                let err = ApiError::from_generation(&e, retry_after_secs);
                metrics.record_failure(&err);
                info!(error = %err, "generation failed");
                GenEvent::Failed(err)
            }
        };
        sink.send(event).await;
    };
    tokio::spawn(task.instrument(span));
    rx
}

#[cfg(test)]
mod tests {
    use libp2p::PeerId;
    use shardline_kernels::SamplingParams;
    use shardline_node::generate::{GenerateError, PieceDecoder};
    use shardline_proto::wire::ErrorCode;

    use crate::session::SessionError;

    use super::*;

    fn sink(tx: mpsc::Sender<GenEvent>, send_timeout: Option<Duration>) -> ChannelSink {
        ChannelSink { tx, pending: Vec::new(), metrics: Arc::new(Metrics::default()), send_timeout }
    }

    #[tokio::test]
    async fn text_carries_the_tokens_sampled_since_the_last_piece() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut s = sink(tx, None);
        s.token(&Sampled { token: 7, logprob: -0.5, top: vec![] });
        s.token(&Sampled { token: 8, logprob: -1.5, top: vec![] });
        assert!(s.text("ab").await);
        assert!(s.text("c").await);
        let Some(GenEvent::Text { text, samples }) = rx.recv().await else { panic!("a text event") };
        assert_eq!((text.as_str(), samples.iter().map(|s| s.token).collect::<Vec<_>>()), ("ab", vec![7, 8]));
        let Some(GenEvent::Text { samples, .. }) = rx.recv().await else { panic!("a text event") };
        assert!(samples.is_empty());
        assert_eq!(s.metrics.rates().tokens.iter().sum::<u64>(), 2, "each generated token counted once");
        drop(rx);
        assert!(!s.text("d").await, "a reader that went away cancels the generation");
    }

    /// Stages that always answer that they are out of KV cache.
    struct BusyStages;

    impl generate::Stepper for BusyStages {
        type Error = SessionError;

        async fn feed(&mut self, _: &[u32]) -> Result<(), SessionError> {
            Ok(())
        }

        async fn step(&mut self, _: &[u32], _: &SamplingParams, _: usize) -> Result<Sampled, SessionError> {
            Err(SessionError::Stage { peer: PeerId::random(), code: ErrorCode::Busy, message: "kv cache full".into() })
        }
    }

    struct NoText;

    impl PieceDecoder for NoText {
        fn push(&mut self, _: u32) -> String {
            String::new()
        }
        fn finish(&mut self) -> String {
            String::new()
        }
    }

    #[tokio::test]
    async fn a_busy_stage_reaches_the_api_as_429_through_the_loop() {
        let params = GenerateParams { prefill_chunk: 2, ..GenerateParams::default() };
        let r = generate::generate(&mut BusyStages, &[1, 2, 3], &params, &mut NoText, &mut |_: &str| true).await;
        let Err(e) = r else { panic!("the step fails") };
        assert!(matches!(e, GenerateError::Step(SessionError::Stage { code: ErrorCode::Busy, .. })), "{e:?}");
        let api = ApiError::from_generation(&e, 4);
        assert_eq!((api.status.as_u16(), api.retry_after), (429, Some(4)));
    }

    #[tokio::test]
    async fn a_send_timeout_gives_up_on_a_stalled_reader() {
        let (tx, _rx) = mpsc::channel(1);
        let mut s = sink(tx, Some(Duration::from_millis(50)));
        assert!(s.text("a").await, "room for one event");
        assert!(!s.text("b").await, "the reader never reads: the send gives up after the timeout");
    }
}
