//! A pipeline session as its owner sees it: control streams to every stage of a route, prompt chunks into the first
//! stage, tokens back from the last. Opening goes from the last stage to the first, so each stage can attach to its
//! successor (which already holds the session) before it reports ready.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use shardline_kernels::SamplingParams;
use shardline_node::stage::core::OWNER_KEEP_ALIVE;
use shardline_node::wire_convert::sampling_to_wire;
use shardline_proto::pool::ConnectionPool;
use shardline_proto::wire::{
    ErrorCode, Frame, Hop, Limits, SessionId, SessionKey, SessionOpen, StageData, TokenResult, WireDType, read_frame,
    write_frame,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::blame;
use crate::deadline::{self, DeadlineConfig, StepMemory, StepTimes, Watched};
use crate::routing::Route;

/// What a session needs besides its route.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub model_id: String,
    pub n_layers: u32,
    pub hidden: u32,
    /// Positions reserved on every stage (prompt + new tokens).
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub n_top: u8,
    pub wire_dtype: WireDType,
    /// Positions per prefill frame: smaller chunks pipeline better across stages, larger ones amortise overhead.
    pub prefill_chunk: usize,
    /// When a step is late and a silent stage is taken for dead (`deadline.rs`).
    pub detect: DeadlineConfig,
    /// Step times the client's earlier sessions measured, to start this one's deadlines from (`deadline.rs`).
    pub step_memory: Option<Arc<StepMemory>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Route(#[from] crate::routing::RouteError),
    #[error("node {peer} is busy: {source}")]
    Busy { peer: PeerId, source: crate::queue::QueueError },
    #[error("cannot reach stage {peer}: {detail}")]
    Connect { peer: PeerId, detail: String },
    #[error("stage {peer} failed ({code:?}): {message}")]
    Stage { peer: PeerId, code: ErrorCode, message: String },
    /// The owner's own deadline watch (`deadline.rs`) found the stage's connection silent (no packet, not even an
    /// acknowledgement of a keep-alive) past the detection limit while a step or an open waited on it: the node is
    /// taken for dead or cut off. Unlike a stage's `Timeout` error frame, this names its culprit.
    #[error("stage {peer} silent for {silent:?} {during}: taken for dead")]
    Silent { peer: PeerId, silent: Duration, during: &'static str },
    /// The peer sent what the protocol does not allow where it did (a wrong frame kind, a token for the wrong
    /// position, a log-probability that cannot be one).
    #[error("stage {peer} broke the protocol: {detail}")]
    Violation { peer: PeerId, detail: String },
    /// The request asks for something no route can serve (a size beyond what the protocol carries).
    #[error("{0}")]
    Request(String),
    /// The owner's own state is wrong (no stage to blame).
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no token within {0:?}")]
    Timeout(std::time::Duration),
    #[error("sampling parameters cannot change within a session")]
    SamplingChanged,
    /// The stages return the top log-probabilities asked for when the session opened, no more.
    #[error("{asked} top log-probabilities asked for, the session was opened with {opened}")]
    TopChanged { asked: usize, opened: u8 },
    #[error("gave up after {0} failovers: {1}")]
    Exhausted(usize, Box<SessionError>),
}

impl SessionError {
    /// The node to blame and ban, when the failure is a peer's fault (see `blame.rs`: a full node is not at fault).
    pub fn failed_peer(&self) -> Option<PeerId> {
        match crate::blame::classify(self) {
            crate::blame::Fault::Peer(p) => Some(p),
            _ => None,
        }
    }
}

/// Longest wait for the stages to end their control streams after `Close`: a stage that does not answer by then is
/// left to its idle timeout.
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a failed write to a stage waits for the error frame that says why the stage stopped reading
/// ([`RouteSession::write_failed`]).
pub const WRITE_FAILURE_GRACE: Duration = Duration::from_millis(200);

enum StageEvent {
    Frame(Frame),
    /// The control stream ended or broke.
    Gone(String),
}

/// An open session on every stage of a route.
pub struct RouteSession {
    id: SessionId,
    route: Route,
    controls: Vec<quinn::SendStream>,
    events: mpsc::Receiver<(usize, StageEvent)>,
    readers: Vec<JoinHandle<()>>,
    position: u64,
    prefill_chunk: usize,
    /// Each stage's QUIC connection, in route order: watched for silence while a step is late.
    conns: Vec<quinn::Connection>,
    times: StepTimes,
    /// Positions written since the last token, and when the first of them was written.
    pending: usize,
    pending_since: std::time::Instant,
    /// Wall time of the last sampled one-token step, first frame written to token read (`trust.rs` times nodes).
    last_decode: Option<std::time::Duration>,
}

impl Drop for RouteSession {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

impl RouteSession {
    /// Opens the session on every stage, last stage first. `rtt` receives the measured round-trip time per stage;
    /// `record` gives a node's signed announcement, which the stage before it needs to dial it.
    ///
    /// Each stage gets its own random key; the stage before it presents it in `Attach`. The id is not a secret (it is
    /// logged); the keys are never logged (docs/SECURITY.md, *Stage*).
    pub async fn open(
        pool: &ConnectionPool,
        route: Route,
        params: &SessionParams,
        limits: Limits,
        mut rtt: impl FnMut(PeerId, std::time::Duration),
        record: impl Fn(&PeerId) -> Option<Arc<[u8]>>,
    ) -> Result<RouteSession, SessionError> {
        let id: SessionId = rand::random();
        // `rand::random` draws from the thread-local generator, a CSPRNG seeded from the operating system.
        let keys: Vec<SessionKey> = route.stages.iter().map(|_| SessionKey(rand::random())).collect();
        let n = route.stages.len();
        let route_cost_s = route.cost_ms.max(0.0) / 1000.0;
        let times = StepTimes::new(params.detect, Duration::from_secs_f64(route_cost_s));
        let times = match &params.step_memory {
            Some(m) => times.with_memory(m.clone()),
            None => times,
        };
        let layout: Vec<String> = route.stages.iter().map(|s| format!("{}@{}", s.span, s.addr)).collect();
        let (tx, events) = mpsc::channel(256);
        let mut controls: Vec<Option<quinn::SendStream>> = (0..n).map(|_| None).collect();
        let mut readers = Vec::with_capacity(n);
        let mut conns: Vec<Option<quinn::Connection>> = (0..n).map(|_| None).collect();
        for i in (0..n).rev() {
            let stage = &route.stages[i];
            let peer = stage.peer;
            let conn_err = |detail: String| SessionError::Connect { peer, detail };
            // A node that died since it was registered answers no handshake: bounded, not the QUIC idle timeout.
            let conn = tokio::time::timeout(params.detect.connect, pool.get(stage.addr, stage.fingerprint))
                .await
                .map_err(|_| conn_err(format!("no QUIC handshake within {:?}", params.detect.connect)))?
                .map_err(|e| conn_err(e.to_string()))?;
            rtt(peer, conn.rtt());
            let (mut send, mut recv) = match conn.open_bi().await {
                Ok(s) => s,
                Err(e) => {
                    pool.forget(stage.addr, stage.fingerprint);
                    return Err(conn_err(e.to_string()));
                }
            };
            let rest = route.stages[i + 1..]
                .iter()
                .map(|s| Hop { layers: s.span, addr: s.addr, fingerprint: s.fingerprint })
                .collect();
            let open = SessionOpen {
                model_id: params.model_id.clone(),
                n_layers: params.n_layers,
                span: stage.span,
                max_tokens: params.max_tokens,
                sampling: sampling_to_wire(&params.sampling),
                n_top: params.n_top,
                wire_dtype: params.wire_dtype,
                hidden: params.hidden,
                rest,
                attach_key: keys[i],
                next_key: keys.get(i + 1).copied().unwrap_or_default(),
                next_record: route
                    .stages
                    .get(i + 1)
                    .and_then(|s| record(&s.peer))
                    .map(|r| r.to_vec())
                    .unwrap_or_default(),
            };
            write_frame(&mut send, &Frame::Open { session: id, open }).await.map_err(|e| conn_err(e.to_string()))?;
            // A cached connection to a stage that died since is only found out by its silence.
            let late_at = std::time::Instant::now() + params.detect.floor;
            let opened = match deadline::watch(
                read_frame(&mut recv, &limits),
                std::slice::from_ref(&conn),
                late_at,
                &params.detect,
            )
            .await
            {
                Watched::Done(r) => r,
                Watched::Silent { silent, .. } => {
                    conn.close(0u32.into(), b"silent");
                    return Err(SessionError::Silent { peer, silent, during: "with no answer to open" });
                }
            };
            match opened {
                Ok(Some(Frame::Opened { .. })) => {}
                Ok(Some(Frame::Error { code, message, .. })) => {
                    return Err(SessionError::Stage { peer: blamed(&route, i, code), code, message });
                }
                Ok(Some(other)) => {
                    let detail = format!("answered open with {}", other.kind().name());
                    return Err(SessionError::Violation { peer, detail });
                }
                Ok(None) => return Err(conn_err("the stream ended before the answer to open".into())),
                Err(e) => return Err(conn_err(e.to_string())),
            }
            let tx = tx.clone();
            readers.push(tokio::spawn(async move {
                loop {
                    let ev = match read_frame(&mut recv, &limits).await {
                        Ok(Some(f)) => StageEvent::Frame(f),
                        Ok(None) => StageEvent::Gone("control stream ended".into()),
                        Err(e) => StageEvent::Gone(e.to_string()),
                    };
                    let stop = matches!(ev, StageEvent::Gone(_));
                    if tx.send((i, ev)).await.is_err() || stop {
                        return;
                    }
                }
            }));
            controls[i] = Some(send);
            conns[i] = Some(conn);
        }
        let controls = controls.into_iter().map(|c| c.expect("every stage opened")).collect();
        // Every slot was filled above (any failure returned early).
        let conns = conns.into_iter().flatten().collect();
        // The stages log under the same session id, so one request can be followed across machines.
        info!(session = id, route = %layout.join(" "), "pipeline session open");
        Ok(RouteSession {
            id,
            route,
            controls,
            events,
            readers,
            position: 0,
            prefill_chunk: params.prefill_chunk.max(1),
            conns,
            times,
            pending: 0,
            pending_since: std::time::Instant::now(),
            last_decode: None,
        })
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Wall time of the last step if it fed one token and sampled (the owner's measurement of the route).
    pub fn last_decode(&self) -> Option<std::time::Duration> {
        self.last_decode
    }

    /// Positions fed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Feeds `tokens` in prefill chunks (pipelined: every chunk is sent at once, stages work on them as they arrive).
    /// With `sample`, waits for the token the last stage draws after them.
    pub async fn feed(&mut self, tokens: &[u32], sample: bool) -> Result<Option<TokenResult>, SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::Protocol("nothing to feed".into()));
        }
        let first = self.route.stages[0].peer;
        let started = std::time::Instant::now();
        self.last_decode = None;
        let chunks: Vec<&[u32]> = tokens.chunks(self.prefill_chunk).collect();
        for (k, chunk) in chunks.iter().enumerate() {
            let last = k + 1 == chunks.len() && sample;
            let data = StageData::Tokens(chunk.to_vec());
            let frame = if chunk.len() == 1 && last && self.position > 0 {
                Frame::Decode { session: self.id, position: self.position, data }
            } else {
                Frame::Prefill { session: self.id, position: self.position, last, data }
            };
            if let Err(e) = write_frame(&mut self.controls[0], &frame).await {
                return Err(self.write_failed(first, e.to_string()).await);
            }
            if self.pending == 0 {
                self.pending_since = std::time::Instant::now();
            }
            self.pending += chunk.len();
            self.position += chunk.len() as u64;
        }
        if !sample {
            return Ok(None);
        }
        let expected = self.position;
        let late_at = self.times.deadline(self.pending_since, self.pending);
        let detect = self.times.config();
        let waiting = next_event(&mut self.events, &mut self.controls, self.id);
        let (i, ev) = match deadline::watch(waiting, &self.conns, late_at, &detect).await {
            Watched::Done(Some(ev)) => ev,
            Watched::Done(None) => return Err(SessionError::Protocol("every stage stream ended".into())),
            Watched::Silent { stage, silent } => {
                // Closed, so the pool dials afresh should the node come back.
                self.conns[stage].close(0u32.into(), b"silent");
                let peer = self.route.stages[stage].peer;
                return Err(SessionError::Silent { peer, silent, during: "during a late step" });
            }
        };
        if matches!(ev, StageEvent::Frame(Frame::Token { .. })) {
            self.times.record(self.pending, self.pending_since.elapsed());
            self.pending = 0;
        }
        let peer = self.route.stages[i].peer;
        let n = self.route.stages.len();
        match ev {
            StageEvent::Frame(Frame::Token { position, result, .. }) if position == expected && i + 1 == n => {
                if tokens.len() == 1 {
                    self.last_decode = Some(started.elapsed());
                }
                match blame::implausible_token(&result) {
                    None => Ok(Some(result)),
                    Some(detail) => Err(SessionError::Violation { peer, detail }),
                }
            }
            StageEvent::Frame(Frame::Error { code, message, .. }) => {
                Err(SessionError::Stage { peer: blamed(&self.route, i, code), code, message })
            }
            StageEvent::Frame(Frame::Token { position, .. }) => {
                let detail = format!("token for position {position} from stage {i} of {n}, expected {expected}");
                Err(SessionError::Violation { peer, detail })
            }
            StageEvent::Frame(other) => {
                Err(SessionError::Violation { peer, detail: format!("unexpected {} frame", other.kind().name()) })
            }
            StageEvent::Gone(detail) => Err(SessionError::Stage { peer, code: ErrorCode::Other(0), message: detail }),
        }
    }

    /// The error for a failed write of input to the first stage. A stage stops reading a session it has ended, and
    /// the frame that says why — a `Downstream` naming its next hop, say, when the stage after it died — may already
    /// be on its way: it names the party at fault, where the failed write alone would blame the first stage. So the
    /// events of [`WRITE_FAILURE_GRACE`] are read first, and only without an error frame among them is the first
    /// stage blamed.
    async fn write_failed(&mut self, first: PeerId, detail: String) -> SessionError {
        let until = tokio::time::Instant::now() + WRITE_FAILURE_GRACE;
        loop {
            let waiting = next_event(&mut self.events, &mut self.controls, self.id);
            match tokio::time::timeout_at(until, waiting).await {
                Ok(Some((i, StageEvent::Frame(Frame::Error { code, message, .. })))) => {
                    return SessionError::Stage { peer: blamed(&self.route, i, code), code, message };
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return SessionError::Connect { peer: first, detail },
            }
        }
    }

    /// Tells every stage the session is alive (a failed write shows up as the stage's stream ending).
    pub async fn ping(&mut self) {
        ping(&mut self.controls, self.id).await;
    }

    /// Closes the session on every stage (they free the KV cache), and waits (at most [`CLOSE_WAIT`]) until each
    /// stage has ended its side of the control stream, which it does after freeing the session's slot. The owner's
    /// queue permits are released after this, so the owner never counts a slot free that the stage still holds: a
    /// session admitted right after would be refused as Busy.
    pub async fn close(mut self) {
        let id = self.id;
        for c in &mut self.controls {
            let _ = write_frame(c, &Frame::Close { session: id }).await;
            let _ = c.finish();
        }
        // Readers are kept last stage first; one that already ended has reported its stream gone.
        let n = self.controls.len();
        let mut open = vec![true; n];
        for (k, r) in self.readers.iter().enumerate() {
            if r.is_finished() {
                open[n - 1 - k] = false;
            }
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while open.iter().any(|o| *o) {
                match self.events.recv().await {
                    Some((i, StageEvent::Gone(_))) => open[i] = false,
                    Some(_) => {}
                    None => return,
                }
            }
        })
        .await;
    }
}

/// The next frame from any stage. While none comes, every stage gets a `Ping` each [`OWNER_KEEP_ALIVE`], so a long
/// step (a long prompt on a slow first stage) never reaches a later stage's idle timeout.
async fn next_event(
    events: &mut mpsc::Receiver<(usize, StageEvent)>,
    controls: &mut [quinn::SendStream],
    id: SessionId,
) -> Option<(usize, StageEvent)> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + OWNER_KEEP_ALIVE, OWNER_KEEP_ALIVE);
    loop {
        tokio::select! {
            ev = events.recv() => return ev,
            _ = tick.tick() => ping(controls, id).await,
        }
    }
}

async fn ping(controls: &mut [quinn::SendStream], id: SessionId) {
    for c in controls {
        let _ = write_frame(c, &Frame::Ping { session: id }).await;
    }
}

/// Whom an error frame from stage `i` blames: a stage that lost its successor points at the successor, one that got
/// invalid input points at its predecessor, any other error at the stage itself.
fn blamed(route: &Route, i: usize, code: ErrorCode) -> PeerId {
    route.stages[blame::blamed_stage(code, i, route.stages.len())].peer
}

/// Shares one pool between sessions.
pub type SharedPool = Arc<ConnectionPool>;

#[cfg(test)]
mod tests {
    //! The blame race of a failed write (docs/SECURITY.md, "Which hop"): the first stage of a two-stage route loses
    //! its successor, reports `Downstream` and stops reading the owner's input, so the owner's next write fails. The
    //! failure must be blamed on the stage the error frame names, never on the first stage whose stream broke.

    use std::future::Future;
    use std::net::SocketAddr;

    use shardline_proto::LayerRange;
    use shardline_proto::tls::StageIdentity;
    use shardline_proto::wire::Fingerprint;
    use tokio::sync::oneshot;

    use super::*;
    use crate::blame::Fault;
    use crate::routing::RouteStage;

    /// A stage on loopback that answers the first `Open` with `Opened`, then hands its connection and control
    /// stream to `script`. The endpoint lives as long as the script.
    async fn scripted_stage<F, Fut>(script: F) -> (SocketAddr, Fingerprint)
    where
        F: FnOnce(quinn::Connection, quinn::SendStream, quinn::RecvStream, SessionId) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let id = StageIdentity::generate().unwrap();
        let endpoint = quinn::Endpoint::server(id.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(async move {
            let conn = endpoint.accept().await.expect("the owner dials").await.expect("handshake");
            let (mut send, mut recv) = conn.accept_bi().await.expect("control stream");
            let session = match read_frame(&mut recv, &Limits::default()).await {
                Ok(Some(Frame::Open { session, .. })) => session,
                other => panic!("expected Open, got {other:?}"),
            };
            write_frame(&mut send, &Frame::Opened { session }).await.unwrap();
            script(conn, send, recv, session).await;
            drop(endpoint);
        });
        (addr, id.fingerprint())
    }

    fn stage(addr: SocketAddr, fingerprint: Fingerprint, span: LayerRange) -> RouteStage {
        RouteStage { peer: PeerId::random(), span, addr, fingerprint, queue: None }
    }

    /// How long after it stopped reading the first stage sends its error frame in [`Report::AfterStopping`]: a
    /// quarter of the 200 ms [`WRITE_FAILURE_GRACE`] (fixed: a grace shorter than this fails the test).
    const FRAME_DELAY: Duration = Duration::from_millis(50);

    /// Which way the first stage orders its two acts once its successor is gone.
    #[derive(Clone, Copy)]
    enum Report {
        /// `Downstream` on the control stream, then stop reading (what a stage does).
        ThenStop,
        /// Stop reading first, and send `Downstream` [`FRAME_DELAY`] later: the frame is still on its way when the
        /// owner's write fails.
        AfterStopping,
    }

    /// Opens a session on a scripted two-stage route, kills the last stage, has the first one report it as
    /// `Report` says, and feeds input until a write to the first stage fails. Returns the error and the two peers.
    async fn failed_write(report: Report) -> (SessionError, PeerId, PeerId) {
        // The last stage: killed (its connection closed without a word) when the test says.
        let (kill, killed) = oneshot::channel::<()>();
        let (tail_gone_tx, tail_gone) = oneshot::channel::<()>();
        let (tail_addr, tail_fp) = scripted_stage(move |conn, _send, _recv, _session| async move {
            let _ = killed.await;
            conn.close(0u32.into(), b"killed");
            let _ = tail_gone_tx.send(());
        })
        .await;
        // The first stage: once its successor is gone, reports it and stops reading the owner's input; keeps the
        // connection and its side of the stream open (a stage that ended the session does not end its link).
        let (stopped_tx, stopped) = oneshot::channel::<()>();
        let (head_addr, head_fp) = scripted_stage(move |conn, mut send, mut recv, session| async move {
            let _ = tail_gone.await;
            let downstream =
                Frame::Error { session, code: ErrorCode::Downstream, message: "next stage unreachable".into() };
            match report {
                Report::ThenStop => {
                    write_frame(&mut send, &downstream).await.unwrap();
                    recv.stop(0u32.into()).unwrap();
                    let _ = stopped_tx.send(());
                }
                Report::AfterStopping => {
                    recv.stop(0u32.into()).unwrap();
                    let _ = stopped_tx.send(());
                    tokio::time::sleep(FRAME_DELAY).await;
                    // Fails only where the owner gave up before the frame came (the test then fails on the blame).
                    let _ = write_frame(&mut send, &downstream).await;
                }
            }
            conn.closed().await;
        })
        .await;
        let route = Route {
            stages: vec![
                stage(head_addr, head_fp, LayerRange::new(0, 3)),
                stage(tail_addr, tail_fp, LayerRange::new(3, 6)),
            ],
            cost_ms: 1.0,
        };
        let (head, tail) = (route.stages[0].peer, route.stages[1].peer);
        let params = SessionParams {
            model_id: "scripted".into(),
            n_layers: 6,
            hidden: 32,
            max_tokens: 1 << 20,
            sampling: SamplingParams::GREEDY,
            n_top: 0,
            wire_dtype: WireDType::F32,
            prefill_chunk: 16,
            detect: DeadlineConfig::default(),
            step_memory: None,
        };
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let pool = ConnectionPool::new(endpoint);
        let mut session =
            RouteSession::open(&pool, route, &params, Limits::default(), |_, _| {}, |_| None).await.unwrap();
        kill.send(()).unwrap();
        stopped.await.expect("the first stage stopped reading");
        // Writes succeed into the send buffer until the stage's STOP_SENDING arrives; the first one after fails.
        // No event is read in between (`sample` is false), so the error frame waits in the channel (or on the wire)
        // for the failed write's grace. The bound only guards against a hang.
        let err = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match session.feed(&[1], false).await {
                    Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("a write to the first stage fails once it stopped reading");
        (err, head, tail)
    }

    fn assert_blames_the_tail(err: &SessionError, head: PeerId, tail: PeerId) {
        match err {
            SessionError::Stage { peer, code: ErrorCode::Downstream, .. } => {
                assert_eq!(*peer, tail, "the Downstream frame names the last stage")
            }
            other => panic!("the failed write was not blamed on the error frame: {other}"),
        }
        // What the client bans (`client.rs`): the culprit, not the stage that reported it.
        assert_eq!(blame::classify(err), Fault::Peer(tail));
        assert_ne!(err.failed_peer(), Some(head), "the first stage is innocent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_blamed_on_the_stage_the_error_frame_names() {
        let (err, head, tail) = failed_write(Report::ThenStop).await;
        assert_blames_the_tail(&err, head, tail);
    }

    /// The frame that names the culprit arrives after the write failed, within [`WRITE_FAILURE_GRACE`]: the owner
    /// waits for it. (Timing: the frame leaves the stage [`FRAME_DELAY`] after it stopped reading, and the write
    /// cannot fail before that stop, so the frame arrives at most 50 ms, plus loopback, after the failure: 150 ms of
    /// margin within the 200 ms grace.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_waits_for_the_error_frame_still_on_its_way() {
        let (err, head, tail) = failed_write(Report::AfterStopping).await;
        assert_blames_the_tail(&err, head, tail);
    }
}
