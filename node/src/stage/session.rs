//! One session on one stage: admission, the link to the next stage, and the loop that runs input chunks in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shardline_kernels::{Sampled, SamplingParams};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::server::{Shared, forward_inputs, refuse};
use crate::error::ModelError;
use crate::model::{LayerRange, ShardInput, ShardOutput, ShardSession};
use crate::wire_convert::{compute_dtype, sampling_from_wire};
use shardline_proto::wire::{
    ErrorCode, Frame, HiddenStates, SessionId, SessionOpen, StageData, TokenResult, WireDType, read_frame, write_frame,
};

/// What reaches a session task, from its control stream or its data stream.
pub(crate) enum Input {
    Frame(Frame),
    Close,
    /// The stream ended without `Close` (the owner or the previous stage went away).
    Ended,
    Failed(ErrorCode, String),
}

/// A session's entry in the server map: the input channel a data stream attaches to (once).
pub(crate) struct SessionSlot {
    upstream: Option<(mpsc::Sender<Input>, (WireDType, u32))>,
}

impl SessionSlot {
    pub fn take_upstream(&mut self) -> Option<(mpsc::Sender<Input>, (WireDType, u32))> {
        self.upstream.take()
    }
}

/// Frees the admission slot and the map entry when the session ends, however it ends.
struct Admission {
    shared: Arc<Shared>,
    session: SessionId,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.sessions().remove(&self.session);
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn check_open(shared: &Shared, open: &SessionOpen) -> Result<(), String> {
    let shard = &shared.shard;
    let c = shard.config();
    if open.model_id != shared.model_id {
        return Err(format!("this stage serves model {}, not {}", shared.model_id, open.model_id));
    }
    if open.n_layers as usize != c.n_layers || open.hidden as usize != c.hidden {
        return Err(format!(
            "model shape {} layers x {} does not match {} x {}",
            open.n_layers, open.hidden, c.n_layers, c.hidden
        ));
    }
    let l = shard.layers();
    if open.span.start < l.start || open.span.end > l.end {
        return Err(format!("span {} is not inside this stage's layers {l}", open.span));
    }
    if open.max_tokens == 0 || open.max_tokens as usize > c.context_length {
        return Err(format!("max_tokens {} outside 1..={}", open.max_tokens, c.context_length));
    }
    Ok(())
}

/// Handles a control stream whose first frame was `Open`.
pub(crate) async fn run_control(
    shared: Arc<Shared>,
    session: SessionId,
    open: SessionOpen,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let span = info_span!("session", session, layers = %open.span);
    async move {
        if let Err(msg) = check_open(&shared, &open) {
            return refuse(&mut send, session, ErrorCode::BadRequest, msg).await;
        }
        if shared.active.fetch_add(1, Ordering::Relaxed) >= shared.config.max_sessions {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            let msg = format!("{} sessions running", shared.config.max_sessions);
            return refuse(&mut send, session, ErrorCode::Busy, msg).await;
        }
        let duplicate = {
            let mut map = shared.sessions();
            let duplicate = map.contains_key(&session);
            if !duplicate {
                map.insert(session, SessionSlot { upstream: None });
            }
            duplicate
        };
        if duplicate {
            shared.active.fetch_sub(1, Ordering::Relaxed);
            return refuse(&mut send, session, ErrorCode::BadRequest, "session id in use".into()).await;
        }
        let _admission = Admission { shared: shared.clone(), session };
        let kv = match shared.shard.open_session(open.max_tokens as usize) {
            Ok(kv) => kv,
            Err(e @ ModelError::KvCacheFull { .. }) => {
                return refuse(&mut send, session, ErrorCode::Busy, e.to_string()).await;
            }
            Err(e) => return refuse(&mut send, session, ErrorCode::BadRequest, e.to_string()).await,
        };
        let (tx, rx) = mpsc::channel(64);
        // The next stage: connect, attach, and wait for it to accept, before telling the owner we are ready.
        let downstream = match open.rest.first() {
            None => None,
            Some(next) => {
                let attach = attach_next(&shared, session, &open, next.addr, next.fingerprint);
                match tokio::time::timeout(shared.config.connect_timeout, attach).await {
                    Ok(Ok((dsend, drecv))) => {
                        tokio::spawn(watch_downstream(session, drecv, tx.clone(), shared.config.limits));
                        Some(dsend)
                    }
                    Ok(Err(msg)) => return refuse(&mut send, session, ErrorCode::Downstream, msg).await,
                    Err(_) => {
                        let msg = format!("next stage {} did not accept in time", next.addr);
                        return refuse(&mut send, session, ErrorCode::Downstream, msg).await;
                    }
                }
            }
        };
        if open.span.start > 0
            && let Some(slot) = shared.sessions().get_mut(&session)
        {
            slot.upstream = Some((tx.clone(), (open.wire_dtype, open.hidden)));
        }
        if write_frame(&mut send, &Frame::Opened { session }).await.is_err() {
            return;
        }
        debug!("session open");
        let limits = shared.config.limits;
        let control_tx = tx.clone();
        let reader = tokio::spawn(async move { forward_inputs(session, &mut recv, &control_tx, &limits).await });
        drop(tx);
        let mut run = SessionRun { shared: shared.clone(), session, open, kv: Some(kv), position: 0, downstream };
        let outcome = run.serve(rx, &mut send).await;
        reader.abort();
        if let Err((code, message)) = outcome {
            warn!(?code, %message, "session failed");
            let _ = write_frame(&mut send, &Frame::Error { session, code, message }).await;
        }
        let _ = send.finish();
        if let Some(mut d) = run.downstream.take() {
            let _ = write_frame(&mut d, &Frame::Close { session }).await;
            let _ = d.finish();
        }
        debug!("session closed: KV cache freed");
    }
    .instrument(span)
    .await
}

async fn attach_next(
    shared: &Shared,
    session: SessionId,
    open: &SessionOpen,
    addr: std::net::SocketAddr,
    fingerprint: shardline_proto::wire::Fingerprint,
) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
    let conn = shared.pool.get(addr, fingerprint).await.map_err(|e| e.to_string())?;
    let (mut dsend, mut drecv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            shared.pool.forget(addr, fingerprint);
            return Err(format!("next stage {addr}: {e}"));
        }
    };
    write_frame(&mut dsend, &Frame::Attach { session, dtype: open.wire_dtype, width: open.hidden })
        .await
        .map_err(|e| format!("next stage {addr}: {e}"))?;
    match read_frame(&mut drecv, &shared.config.limits).await {
        Ok(Some(Frame::Opened { .. })) => Ok((dsend, drecv)),
        Ok(Some(Frame::Error { code, message, .. })) => Err(format!("next stage {addr} refused ({code:?}): {message}")),
        Ok(other) => Err(format!("next stage {addr} answered {other:?}")),
        Err(e) => Err(format!("next stage {addr}: {e}")),
    }
}

/// Watches the data stream to the next stage: an error frame or a reset from it fails this session.
async fn watch_downstream(
    session: SessionId,
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Input>,
    limits: shardline_proto::wire::Limits,
) {
    let failure = match read_frame(&mut recv, &limits).await {
        Ok(None) => return,
        Ok(Some(Frame::Error { code, message, .. })) => format!("next stage failed ({code:?}): {message}"),
        Ok(Some(other)) => format!("next stage sent {}", other.kind().name()),
        Err(e) => format!("next stage stream: {e}"),
    };
    debug!(session, %failure, "downstream failure");
    let _ = tx.send(Input::Failed(ErrorCode::Downstream, failure)).await;
}

enum StepOut {
    Hidden(Vec<u8>, usize),
    Token(Sampled),
    Nothing,
}

struct SessionRun {
    shared: Arc<Shared>,
    session: SessionId,
    open: SessionOpen,
    kv: Option<ShardSession>,
    /// Positions fed so far: the position the next input must start at.
    position: u64,
    downstream: Option<quinn::SendStream>,
}

type Failure = (ErrorCode, String);

impl SessionRun {
    async fn serve(&mut self, mut rx: mpsc::Receiver<Input>, control: &mut quinn::SendStream) -> Result<(), Failure> {
        let idle = self.shared.config.idle_timeout;
        loop {
            let input = match tokio::time::timeout(idle, rx.recv()).await {
                Err(_) => return Err((ErrorCode::Timeout, format!("no input for {idle:?}"))),
                Ok(None) | Ok(Some(Input::Close)) | Ok(Some(Input::Ended)) => return Ok(()),
                Ok(Some(Input::Failed(code, msg))) => return Err((code, msg)),
                Ok(Some(Input::Frame(f))) => f,
            };
            let (position, data, sample, last_flag) = match input {
                Frame::Prefill { position, last, data, .. } => (position, data, last, Some(last)),
                Frame::Decode { position, data, .. } => (position, data, true, None),
                _ => unreachable!("forward_inputs passes only prefill and decode frames"),
            };
            if position != self.position {
                return Err((ErrorCode::BadRequest, format!("position {position}, expected {}", self.position)));
            }
            let n = data.n_tokens();
            match self.step(data, sample).await? {
                StepOut::Hidden(bytes, rows) => {
                    let hidden =
                        HiddenStates::from_bytes(self.open.wire_dtype, rows, self.open.hidden as usize, &bytes)
                            .map_err(|e| (ErrorCode::Compute, e.to_string()))?;
                    let data = StageData::Hidden(hidden);
                    let session = self.session;
                    let frame = match last_flag {
                        Some(last) => Frame::Prefill { session, position, last, data },
                        None => Frame::Decode { session, position, data },
                    };
                    let d = self.downstream.as_mut().ok_or((ErrorCode::Compute, "no next stage".to_string()))?;
                    write_frame(d, &frame).await.map_err(|e| (ErrorCode::Downstream, e.to_string()))?;
                }
                StepOut::Token(s) => {
                    let result = TokenResult { token: s.token, logprob: s.logprob, top: s.top };
                    let frame = Frame::Token { session: self.session, position: self.position + n as u64, result };
                    write_frame(control, &frame).await.map_err(|e| (ErrorCode::Other(0), e.to_string()))?;
                }
                StepOut::Nothing => {}
            }
            self.position += n as u64;
        }
    }

    /// Runs one chunk through this stage's span on a blocking thread.
    async fn step(&mut self, data: StageData, sample: bool) -> Result<StepOut, Failure> {
        let span: LayerRange = self.open.span;
        let first = span.start == 0;
        match (&data, first) {
            (StageData::Tokens(_), true) => {}
            (StageData::Hidden(h), false)
                if h.dtype() == self.open.wire_dtype && h.width() == self.open.hidden as usize => {}
            _ => {
                return Err((ErrorCode::BadRequest, format!("input of the wrong kind or shape for span {span}")));
            }
        }
        let shard = self.shared.shard.clone();
        let mut kv = self.kv.take().ok_or((ErrorCode::Compute, "session state lost".to_string()))?;
        let params: SamplingParams = sampling_from_wire(&self.open.sampling);
        let n_top = self.open.n_top as usize;
        let wire = self.open.wire_dtype;
        let compute = move || {
            let mut run = || -> Result<StepOut, ModelError> {
                let backend = shard.backend().clone();
                let out = match &data {
                    StageData::Tokens(t) => shard.forward_span(&mut kv, ShardInput::Tokens(t), span)?,
                    StageData::Hidden(h) => {
                        let x = backend.upload_raw(&[h.n_tokens(), h.width()], compute_dtype(wire), h.as_bytes())?;
                        shard.forward_span(&mut kv, ShardInput::Hidden(&x), span)?
                    }
                };
                Ok(match out {
                    ShardOutput::Hidden(t) => {
                        let rows = t.rows();
                        StepOut::Hidden(backend.download_raw(&t, compute_dtype(wire))?, rows)
                    }
                    ShardOutput::Logits(l) if sample => {
                        StepOut::Token(shard.sample(&l, &params, kv.len() as u64, n_top)?)
                    }
                    ShardOutput::Logits(_) => StepOut::Nothing,
                })
            };
            let out = run();
            (kv, out)
        };
        // On a multi-threaded runtime the chunk runs on this worker thread (its other tasks move to other workers):
        // no hand-off to the blocking pool and back on every decode step of every stage.
        let (kv, out) =
            if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                tokio::task::block_in_place(compute)
            } else {
                tokio::task::spawn_blocking(compute)
                    .await
                    .map_err(|e| (ErrorCode::Compute, format!("compute task failed: {e}")))?
            };
        self.kv = Some(kv);
        out.map_err(|e| match e {
            ModelError::ContextOverflow { .. } => (ErrorCode::BadRequest, e.to_string()),
            other => (ErrorCode::Compute, other.to_string()),
        })
    }
}
