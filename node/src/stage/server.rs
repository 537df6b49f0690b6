//! The QUIC driver of the stage core: an accept loop, a reader and a writer task per stream, and one task that owns
//! the [`StageCore`], feeds it events and carries out its actions (writes, dials through the connection pool, compute
//! on this worker thread with `block_in_place`, or on the blocking pool on a single-threaded runtime).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use super::core::{
    Action, Admission, BatchGauge, BatchStats, Event, Peer, StageCompute, StageConfig, StageCore, StreamId,
};
use super::shard_stage::ShardStage;
use crate::model::{Shard, ShardKv};
use shardline_proto::pool::ConnectionPool;
use shardline_proto::tls::{StageIdentity, TlsError};
use shardline_proto::wire::{Expect, Fingerprint, Frame, Limits, WireError, read_frame_expecting, write_frame};

/// A QUIC server running one shard for many sessions.
pub struct StageServer {
    stage: Arc<ShardStage>,
    config: StageConfig,
    admission: Admission,
    batch: BatchGauge,
    endpoint: quinn::Endpoint,
    fingerprint: Fingerprint,
    addr: SocketAddr,
    accept: JoinHandle<()>,
    core: JoinHandle<()>,
    /// Into the core's task, for [`StageServer::drain`].
    tx: UnboundedSender<Msg>,
}

impl Drop for StageServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.core.abort();
        self.endpoint.close(0u32.into(), b"stage server stopped");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind the stage server to {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

impl StageServer {
    /// Binds the QUIC endpoint with a fresh self-signed certificate and starts accepting sessions. A peer may open as
    /// many streams on one connection as the stage has session slots, twice over (streams of ended sessions are
    /// released a round trip later), and, unless the config says otherwise, hold three quarters of the KV cache.
    pub fn start(
        shard: Arc<Shard>,
        model_id: String,
        listen: SocketAddr,
        mut config: StageConfig,
    ) -> Result<StageServer, StageError> {
        if config.max_kv_tokens_per_peer.is_none() {
            let cache = shard.kv_capacity_tokens();
            config.max_kv_tokens_per_peer = Some(cache - cache / 4);
        }
        let identity = StageIdentity::generate()?;
        let streams = u32::try_from(config.max_sessions.saturating_mul(2)).unwrap_or(u32::MAX).max(2);
        let endpoint = quinn::Endpoint::server(identity.server_config_with_streams(streams)?, listen)
            .map_err(|source| StageError::Bind { addr: listen, source })?;
        let addr = endpoint.local_addr().map_err(|source| StageError::Bind { addr: listen, source })?;
        let stage = Arc::new(ShardStage::new(shard, model_id));
        let core = StageCore::new(stage.clone(), config.clone());
        let admission = core.admission().clone();
        let batch = core.batch_gauge().clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            core,
            pool: Arc::new(ConnectionPool::new(endpoint.clone())),
            limits: config.limits,
            tx: tx.clone(),
            streams: HashMap::new(),
            next_accepted: 0,
        };
        let core = tokio::spawn(driver.run(rx));
        let accept = tokio::spawn(accept_loop(endpoint.clone(), tx.clone()));
        info!(%addr, fingerprint = %hex::encode(identity.fingerprint()), "stage server listening");
        Ok(StageServer {
            stage,
            config,
            admission,
            batch,
            endpoint,
            fingerprint: identity.fingerprint(),
            addr,
            accept,
            core,
            tx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 of the server certificate, to publish in the announcement.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Sessions holding a slot now.
    pub fn active_sessions(&self) -> usize {
        self.admission.active()
    }

    /// Graceful shutdown (docs/RELIABILITY.md, "Drain"): refuses new sessions at once, waits at most `limit` for the
    /// running ones to end, then ends the rest with a `Busy` error frame (their owners fail over on it) and waits a
    /// moment for those frames to leave. Returns the sessions that had to be cut off.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        let _ = self.tx.send(Msg::Event(Event::Drain));
        let by = tokio::time::Instant::now() + limit;
        while self.admission.active() > 0 && tokio::time::Instant::now() < by {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let cut = self.admission.active();
        if cut > 0 {
            let _ = self.tx.send(Msg::Event(Event::DrainExpired));
            let by = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            while self.admission.active() > 0 && tokio::time::Instant::now() < by {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // The error frames are queued on the streams' writer tasks; give them a moment on the wire.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        cut
    }

    /// What the batch scheduler did last: sessions and rows in the last batch, chunks queued behind it.
    pub fn batch_stats(&self) -> BatchStats {
        self.batch.read()
    }

    /// A cheap handle reporting the current load, for announcements.
    pub fn probe(&self) -> LoadProbe {
        LoadProbe { admission: self.admission.clone(), shard: self.stage.shard().clone(), batch: self.batch.clone() }
    }

    pub fn shard(&self) -> &Arc<Shard> {
        self.stage.shard()
    }

    /// Test-only fault injection: from now on the stage computes as if its weights were tampered with
    /// (`ShardStage`'s `tampered` field), or honestly again with `false`.
    #[cfg(feature = "test-support")]
    pub fn tamper(&self, on: bool) {
        self.stage.tamper_switch().store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test-only fault injection: from now on the stage's logits are partly NaN before it samples
    /// (`ShardStage`'s `poisoned` field), or clean again with `false`.
    #[cfg(feature = "test-support")]
    pub fn poison_logits(&self, on: bool) {
        self.stage.poison_switch().store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn config(&self) -> &StageConfig {
        &self.config
    }
}

/// Reads a server's current load without holding the server.
#[derive(Clone)]
pub struct LoadProbe {
    admission: Admission,
    shard: Arc<Shard>,
    batch: BatchGauge,
}

impl LoadProbe {
    pub fn active_sessions(&self) -> usize {
        self.admission.active()
    }

    pub fn free_kv_tokens(&self) -> usize {
        self.shard.free_kv_tokens()
    }

    /// The batch scheduler's last batch and queue depth.
    pub fn batch_stats(&self) -> BatchStats {
        self.batch.read()
    }
}

/// What reaches the task that owns the core.
enum Msg {
    Accepted(quinn::SendStream, quinn::RecvStream, Peer),
    Dialed(StreamId, Result<(quinn::SendStream, quinn::RecvStream), String>),
    Event(Event<ShardKv>),
}

async fn accept_loop(endpoint: quinn::Endpoint, tx: UnboundedSender<Msg>) {
    while let Some(incoming) = endpoint.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "incoming connection failed");
                    return;
                }
            };
            let peer = Peer::of_ip(conn.remote_address().ip());
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        if tx.send(Msg::Accepted(send, recv, peer)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        debug!(remote = %conn.remote_address(), reason = %e, "connection closed");
                        return;
                    }
                }
            }
        });
    }
}

/// The driver's side of one stream: read credits to its reader task, frames to its writer task.
struct StreamIo {
    credit: UnboundedSender<Expect>,
    writes: UnboundedSender<Write>,
    reader: JoinHandle<()>,
}

enum Write {
    Frame(Frame),
    Finish,
}

struct Driver {
    core: StageCore<Arc<ShardStage>>,
    pool: Arc<ConnectionPool>,
    limits: Limits,
    tx: UnboundedSender<Msg>,
    streams: HashMap<StreamId, StreamIo>,
    next_accepted: u64,
}

impl Driver {
    async fn run(mut self, mut rx: UnboundedReceiver<Msg>) {
        loop {
            let deadline = self.core.next_deadline();
            let msg = match deadline {
                Some(d) => {
                    tokio::select! {
                        m = rx.recv() => m,
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d)) => {
                            Some(Msg::Event(Event::Tick))
                        }
                    }
                }
                None => rx.recv().await,
            };
            let Some(msg) = msg else { return };
            self.take(msg);
            // Everything already waiting goes in before the core is polled, so it lands in one batch.
            while let Ok(msg) = rx.try_recv() {
                self.take(msg);
            }
            while let Some(action) = self.core.poll_action() {
                self.act(action).await;
            }
        }
    }

    fn take(&mut self, msg: Msg) {
        let now = Instant::now();
        let event = match msg {
            Msg::Accepted(send, recv, peer) => {
                let stream = StreamId::Accepted(self.next_accepted);
                self.next_accepted += 1;
                self.attach_io(stream, send, recv);
                Event::Accepted { stream, peer }
            }
            Msg::Dialed(stream, Ok((send, recv))) => {
                self.attach_io(stream, send, recv);
                Event::Dialed { stream, result: Ok(()) }
            }
            Msg::Dialed(stream, Err(e)) => Event::Dialed { stream, result: Err(e) },
            Msg::Event(e) => e,
        };
        self.core.handle(now, event);
    }

    fn attach_io(&mut self, stream: StreamId, send: quinn::SendStream, recv: quinn::RecvStream) {
        let (credit, credits) = mpsc::unbounded_channel();
        let (writes, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_stream(stream, recv, credits, self.tx.clone(), self.limits));
        tokio::spawn(write_stream(stream, send, queue, self.tx.clone()));
        self.streams.insert(stream, StreamIo { credit, writes, reader });
    }

    async fn act(&mut self, action: Action<ShardKv>) {
        match action {
            Action::Read { stream, expect } => {
                if let Some(io) = self.streams.get(&stream) {
                    let _ = io.credit.send(expect);
                }
            }
            Action::Send { stream, frame } => {
                if let Some(io) = self.streams.get(&stream) {
                    let _ = io.writes.send(Write::Frame(frame));
                }
            }
            Action::Finish { stream } => {
                if let Some(io) = self.streams.remove(&stream) {
                    io.reader.abort();
                    let _ = io.writes.send(Write::Finish);
                }
            }
            Action::Dial { stream, addr, fingerprint } => {
                let pool = self.pool.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = async {
                        let conn = pool.get(addr, fingerprint).await.map_err(|e| e.to_string())?;
                        conn.open_bi().await.map_err(|e| {
                            pool.forget(addr, fingerprint);
                            format!("next stage {addr}: {e}")
                        })
                    }
                    .await;
                    let _ = tx.send(Msg::Dialed(stream, result));
                });
            }
            Action::Compute(batch) => {
                let stage = self.core.model().clone();
                // Timed on the compute thread: the scheduler learns each step's cost from it (`Event::ComputeTime`).
                let gauge = self.core.batch_gauge().clone();
                let run = move || {
                    let (started, cpu) = (Instant::now(), shardline_kernels::cpu_time::thread());
                    let results = stage.compute(batch);
                    if let (Some(a), Some(b)) = (cpu, shardline_kernels::cpu_time::thread()) {
                        gauge.add_compute_cpu(b.saturating_sub(a));
                    }
                    (results, started.elapsed())
                };
                // On a multi-threaded runtime the batch runs on this worker thread (its other tasks move to other
                // workers): no hand-off to the blocking pool and back on every decode step of every stage.
                let results = if tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread
                {
                    tokio::task::block_in_place(run)
                } else {
                    match tokio::task::spawn_blocking(run).await {
                        Ok(r) => r,
                        Err(e) => {
                            let reason = format!("compute task failed: {e}");
                            return self.core.handle(Instant::now(), Event::ComputeLost { reason });
                        }
                    }
                };
                let (results, took) = results;
                let now = Instant::now();
                self.core.handle(now, Event::Computed(results));
                self.core.handle(now, Event::ComputeTime(took));
            }
        }
    }
}

/// Reads one frame per credit and reports it, until the stream ends, fails, or the core stops asking. Each credit says
/// what the frame may be; a header that breaks it is reported before its payload is read.
async fn read_stream(
    stream: StreamId,
    mut recv: quinn::RecvStream,
    mut credits: UnboundedReceiver<Expect>,
    tx: UnboundedSender<Msg>,
    limits: Limits,
) {
    while let Some(expect) = credits.recv().await {
        let event = match read_frame_expecting(&mut recv, &limits, &expect).await {
            Ok(Some(frame)) => Event::Frame { stream, frame },
            Ok(None) => Event::Finished { stream },
            // A reset or a lost connection: the sender went away; nothing malformed arrived.
            Err(WireError::Io(e)) => Event::Lost { stream, reason: e.to_string() },
            Err(e) => Event::Malformed { stream, error: e.to_string() },
        };
        let last = !matches!(event, Event::Frame { .. });
        if tx.send(Msg::Event(event)).is_err() || last {
            return;
        }
    }
}

/// Writes frames in order and reports each, until told to finish or a write fails.
async fn write_stream(
    stream: StreamId,
    mut send: quinn::SendStream,
    mut queue: UnboundedReceiver<Write>,
    tx: UnboundedSender<Msg>,
) {
    while let Some(w) = queue.recv().await {
        match w {
            Write::Frame(frame) => {
                let event = match write_frame(&mut send, &frame).await {
                    Ok(()) => Event::Sent { stream },
                    Err(e) => Event::SendFailed { stream, reason: e.to_string() },
                };
                let failed = matches!(event, Event::SendFailed { .. });
                let _ = tx.send(Msg::Event(event));
                if failed {
                    return;
                }
            }
            Write::Finish => {
                let _ = send.finish();
                return;
            }
        }
    }
}
