//! Tunables of a stage, read by the core and its drivers.

use std::time::Duration;

use super::auth::HopPolicy;
use shardline_proto::wire::Limits;

/// How often an owner pings a session that has no input due, well inside the stages' default idle timeout
/// ([`StageConfig::idle_timeout`]) so that a few late pings never end a live session.
pub const OWNER_KEEP_ALIVE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Sessions admitted at once; more get a `Busy` error.
    pub max_sessions: usize,
    /// Sessions one peer (source address) may hold at once; `None`: three quarters of `max_sessions` (at least 1), so
    /// one client can never take every slot (`docs/SECURITY.md`, *Stage*).
    pub max_sessions_per_peer: Option<usize>,
    /// KV-cache positions one peer may hold reserved at once; `None`: no bound but the cache itself (the stage server
    /// sets three quarters of the cache).
    pub max_kv_tokens_per_peer: Option<usize>,
    /// A session with no input, no output and no `Ping` for this long is ended and its KV cache freed. Owners ping
    /// every [`OWNER_KEEP_ALIVE`], so only a vanished or stalled owner reaches it.
    pub idle_timeout: Duration,
    /// How long to wait for the next stage to accept a session.
    pub connect_timeout: Duration,
    pub limits: Limits,
    /// Rows (positions) per compute batch that prefill chunks may fill after every waiting decode row: the
    /// chunked-prefill budget. A long prompt delays the sessions decoding beside it by at most this many rows of
    /// compute per step; larger values prefill faster and stall decoders longer (see `core::schedule`).
    pub batch_tokens: usize,
    /// When decode rows are in a step, its prompt rows are cut so that the step's predicted time (learned from the
    /// measured steps) is at most this many times that of the decode rows alone: the decoders' longest wait between
    /// two tokens while a long prompt prefills, in decode steps. Larger values prefill faster beside decoders.
    pub max_step_stretch: f64,
    /// The longest a stage holds its next batch back for decode steps on their way to it, of sessions that were
    /// batched with a session whose decode is ready (a quarter of the last step's time, at most this; zero: never).
    /// Keeps sessions that travel the pipeline together in one batch instead of splitting on the transport's jitter
    /// (`StageCore::gather`). The in-process driver sets it to zero: it delivers a step's inputs before polling.
    /// Default 10 ms: the quarter step is the bound wherever a step takes under 40 ms (was 2 ms, which on CPU stages
    /// sharing cores cut the window below the jitter of a preempted hop and left batches of 5 where 8 travel
    /// together; docs/PERFORMANCE.md, "Session 9").
    pub gather_wait: Duration,
    /// Groups the stage splits its decoding sessions into: a batch holds at most ⌈decoding sessions / groups⌉ decode
    /// rows, the sessions that have waited longest first, so that several groups travel the pipeline at once and
    /// its stages compute side by side (pipeline micro-batches). 1 (the default): every ready decode in one batch.
    /// Worth raising only where the stages of one route share the cores: three 1-thread stages on a 2-core machine
    /// keep both cores busy with 2 groups (one group leaves all but one stage idle), and a 16-session group splits
    /// into two of 8 instead of into the uneven pieces the transport's jitter would cut
    /// (docs/PERFORMANCE.md, "Where the 3-stage swarm loses at C = 16").
    pub decode_groups: usize,
    /// Opens that may wait for KV-cache blocks when the pool is full (each at most `connect_timeout`); more are
    /// refused `Busy` at once.
    pub max_waiting: usize,
    /// Which next hops the stage may dial ([`HopPolicy::Signed`] on every networked stage).
    pub next_hops: HopPolicy,
}

impl StageConfig {
    /// Sessions one peer may hold (see [`StageConfig::max_sessions_per_peer`]).
    pub fn sessions_per_peer(&self) -> usize {
        self.max_sessions_per_peer
            .unwrap_or(self.max_sessions - self.max_sessions / 4)
            .clamp(1, self.max_sessions.max(1))
    }
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_sessions_per_peer: None,
            max_kv_tokens_per_peer: None,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            batch_tokens: 128,
            max_step_stretch: 3.0,
            gather_wait: Duration::from_millis(10),
            decode_groups: 1,
            max_waiting: 16,
            next_hops: HopPolicy::Signed,
        }
    }
}
