//! Accept loop and stream dispatch of the stage server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::session::{self, Input, SessionSlot};
use crate::model::Shard;
use shardline_proto::pool::ConnectionPool;
use shardline_proto::tls::{StageIdentity, TlsError};
use shardline_proto::wire::{ErrorCode, Frame, Limits, SessionId, WireError, read_frame, write_frame};

/// Tunables of a stage server.
#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Sessions admitted at once; more get a `Busy` error.
    pub max_sessions: usize,
    /// A session with no input for this long is ended and its KV cache freed.
    pub idle_timeout: Duration,
    /// How long to wait for the next stage to accept a session.
    pub connect_timeout: Duration,
    pub limits: Limits,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// State shared by every stream of a server.
pub(crate) struct Shared {
    pub shard: Arc<Shard>,
    pub model_id: String,
    pub config: StageConfig,
    pub pool: ConnectionPool,
    pub sessions: Mutex<HashMap<SessionId, SessionSlot>>,
    pub active: AtomicUsize,
}

impl Shared {
    pub fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionSlot>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A QUIC server running one shard for many sessions.
pub struct StageServer {
    shared: Arc<Shared>,
    fingerprint: shardline_proto::wire::Fingerprint,
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for StageServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.pool.endpoint().close(0u32.into(), b"stage server stopped");
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
    /// Binds the QUIC endpoint with a fresh self-signed certificate and starts accepting sessions.
    pub fn start(
        shard: Arc<Shard>,
        model_id: String,
        listen: SocketAddr,
        config: StageConfig,
    ) -> Result<StageServer, StageError> {
        let identity = StageIdentity::generate()?;
        let endpoint = quinn::Endpoint::server(identity.server_config()?, listen)
            .map_err(|source| StageError::Bind { addr: listen, source })?;
        let addr = endpoint.local_addr().map_err(|source| StageError::Bind { addr: listen, source })?;
        let shared = Arc::new(Shared {
            shard,
            model_id,
            config,
            pool: ConnectionPool::new(endpoint.clone()),
            sessions: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(endpoint, shared.clone()));
        info!(%addr, fingerprint = %hex::encode(identity.fingerprint()), "stage server listening");
        Ok(StageServer { shared, fingerprint: identity.fingerprint(), addr, accept })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 of the server certificate, to publish in the announcement.
    pub fn fingerprint(&self) -> shardline_proto::wire::Fingerprint {
        self.fingerprint
    }

    /// Sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// A cheap handle reporting the current load, for announcements.
    pub fn probe(&self) -> LoadProbe {
        LoadProbe { shared: self.shared.clone() }
    }

    pub fn shard(&self) -> &Arc<Shard> {
        &self.shared.shard
    }

    pub fn config(&self) -> &StageConfig {
        &self.shared.config
    }
}

/// Reads a server's current load without holding the server.
#[derive(Clone)]
pub struct LoadProbe {
    shared: Arc<Shared>,
}

impl LoadProbe {
    pub fn active_sessions(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    pub fn free_kv_tokens(&self) -> usize {
        self.shared.shard.free_kv_tokens()
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "incoming connection failed");
                    return;
                }
            };
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        tokio::spawn(handle_stream(shared.clone(), send, recv));
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

/// Sends an error frame and finishes the stream; failures to do so are moot (the peer is gone).
pub(crate) async fn refuse(send: &mut quinn::SendStream, session: SessionId, code: ErrorCode, message: String) {
    debug!(session, ?code, %message, "refusing stream");
    let _ = write_frame(send, &Frame::Error { session, code, message }).await;
    let _ = send.finish();
}

async fn handle_stream(shared: Arc<Shared>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let limits = shared.config.limits;
    let first = match read_frame(&mut recv, &limits).await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => return refuse(&mut send, 0, ErrorCode::Malformed, e.to_string()).await,
    };
    match first {
        Frame::Open { session, open } => session::run_control(shared, session, open, send, recv).await,
        Frame::Attach { session, dtype, width } => {
            let slot = shared.sessions().get_mut(&session).and_then(|s| s.take_upstream());
            let Some((inputs, expect)) = slot else {
                return refuse(&mut send, session, ErrorCode::UnknownSession, format!("no session {session}")).await;
            };
            if expect != (dtype, width) {
                let msg = format!("session expects {:?} x {}, attach says {dtype:?} x {width}", expect.0, expect.1);
                return refuse(&mut send, session, ErrorCode::BadRequest, msg).await;
            }
            if write_frame(&mut send, &Frame::Opened { session }).await.is_err() {
                return;
            }
            forward_inputs(session, &mut recv, &inputs, &limits).await;
            let _ = send.finish();
        }
        other => {
            let msg = format!("a stream starts with open or attach, not {}", other.kind().name());
            refuse(&mut send, other.session(), ErrorCode::Malformed, msg).await
        }
    }
}

/// Reads input frames of `session` from a stream into the session task, until the stream ends or misbehaves.
pub(crate) async fn forward_inputs(
    session: SessionId,
    recv: &mut quinn::RecvStream,
    inputs: &mpsc::Sender<Input>,
    limits: &Limits,
) {
    loop {
        let input = match read_frame(recv, limits).await {
            Ok(Some(f)) if f.session() != session => {
                Input::Failed(ErrorCode::BadRequest, format!("frame for session {} on session {session}", f.session()))
            }
            Ok(Some(f @ (Frame::Prefill { .. } | Frame::Decode { .. }))) => Input::Frame(f),
            Ok(Some(Frame::Close { .. })) => Input::Close,
            Ok(Some(other)) => Input::Failed(ErrorCode::Malformed, format!("unexpected {} frame", other.kind().name())),
            Ok(None) => Input::Ended,
            // The stream was reset or its connection lost: the sender went away, which ends the session like a
            // close (its KV cache is freed); nothing malformed arrived.
            Err(WireError::Io(e)) => {
                debug!(session, error = %e, "input stream lost: ending the session");
                Input::Ended
            }
            Err(e) => {
                warn!(session, error = %e, "malformed frame: ending the session");
                Input::Failed(ErrorCode::Malformed, e.to_string())
            }
        };
        let last = !matches!(input, Input::Frame(_));
        if inputs.send(input).await.is_err() || last {
            return;
        }
    }
}
