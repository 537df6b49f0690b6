//! The stage server: serves one shard to pipeline sessions.
//!
//! Per connection, every bidirectional stream is either a *control* stream (first frame `Open`, from a session owner)
//! or a *data* stream (first frame `Attach`, from the previous stage of a session's route). Each session owns the
//! shard's KV-cache reservation and consumes input chunks in order from its control stream (first stage) or its data
//! stream (later stages); each chunk's output goes straight to the next stage's data stream, or (last stage) the
//! sampled token goes back to the owner on the control stream. A malformed frame ends only its own stream and
//! session; the KV cache is freed on close, on stream reset, and after an idle timeout.
//!
//! All of that is decided in [`core`], a state machine that does no I/O; [`server`] drives it over QUIC and
//! [`local`] in memory, for tests and benches.

pub mod core;
pub mod local;
pub mod node;
pub mod server;
mod shard_stage;

pub use self::core::{StageConfig, StageCore};
pub use local::LocalSwarm;
pub use node::{NodeArgs, NodeHandle, run_node, start_node};
pub use server::{LoadProbe, StageServer};
pub use shard_stage::ShardStage;
