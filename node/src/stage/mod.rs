//! The stage server: serves one shard to pipeline sessions over QUIC.
//!
//! Per connection, every bidirectional stream is either a *control* stream (first frame `Open`, from a session owner)
//! or a *data* stream (first frame `Attach`, from the previous stage of a session's route). A session is one task that
//! owns the shard's KV-cache reservation and consumes input chunks in order from its control stream (first stage) or
//! its data stream (later stages); each chunk's output goes straight to the next stage's data stream, or (last stage)
//! the sampled token goes back to the owner on the control stream. A malformed frame ends only its own stream and
//! session; the KV cache is freed on close, on stream reset, and after an idle timeout.

pub mod node;
pub mod server;
mod session;

pub use node::{NodeArgs, NodeHandle, run_node, start_node};
pub use server::{StageConfig, StageServer};
