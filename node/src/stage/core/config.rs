//! Tunables of a stage, read by the core and its drivers.

use std::time::Duration;

use shardline_proto::wire::Limits;

#[derive(Clone, Debug)]
pub struct StageConfig {
    /// Sessions admitted at once; more get a `Busy` error.
    pub max_sessions: usize,
    /// A session with no input for this long is ended and its KV cache freed.
    pub idle_timeout: Duration,
    /// How long to wait for the next stage to accept a session.
    pub connect_timeout: Duration,
    pub limits: Limits,
    /// Rows (positions) per compute batch that prefill chunks may fill after every waiting decode row: the
    /// chunked-prefill budget. A long prompt delays the sessions decoding beside it by at most this many rows of
    /// compute per step; larger values prefill faster and stall decoders longer (see `core::schedule`).
    pub batch_tokens: usize,
    /// Opens that may wait for KV-cache blocks when the pool is full (each at most `connect_timeout`); more are
    /// refused `Busy` at once.
    pub max_waiting: usize,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            batch_tokens: 128,
            max_waiting: 16,
        }
    }
}
