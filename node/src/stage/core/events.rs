//! What a driver tells the stage core: things that happened on streams, in compute, and on the clock.

use std::time::Duration;

use super::batch::ComputeResult;
use super::quota::Peer;
use shardline_proto::wire::Frame;

/// Names one bidirectional stream for the core. The driver numbers the streams it accepts; the core numbers the
/// streams it asks the driver to dial ([`super::Action::Dial`]); the two spaces never collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    Accepted(u64),
    Dialed(u64),
}

/// One thing that happened. Time is not part of an event: [`super::StageCore::handle`] takes `now` beside it, so the
/// core never reads a clock.
#[derive(Debug)]
pub enum Event<K> {
    /// `peer` opened a stream to this stage. The core answers with [`super::Action::Read`] for its first frame.
    Accepted { stream: StreamId, peer: Peer },
    /// One complete frame was read from `stream`, in answer to a [`super::Action::Read`].
    Frame { stream: StreamId, frame: Frame },
    /// The peer finished its send side cleanly between frames (in answer to a read).
    Finished { stream: StreamId },
    /// The stream was reset or its connection lost: the peer went away; nothing malformed arrived.
    Lost { stream: StreamId, reason: String },
    /// Bytes arrived on `stream` that are not a valid frame (bad header, over a limit, bad body).
    Malformed { stream: StreamId, error: String },
    /// The result of a [`super::Action::Dial`]: the stream to the next stage is open, or why not.
    Dialed { stream: StreamId, result: Result<(), String> },
    /// A frame given in a [`super::Action::Send`] was handed to the transport (used to bound unsent output).
    Sent { stream: StreamId },
    /// A frame could not be written: the peer is gone.
    SendFailed { stream: StreamId, reason: String },
    /// The batch of a [`super::Action::Compute`] ran; every item comes back, KV handle included.
    Computed(Vec<ComputeResult<K>>),
    /// How long the batch that came back in the last [`Event::Computed`] took to compute, as the driver measured it
    /// (sent right after it). The scheduler learns what a step costs from these (`schedule`, `cost`); a driver that
    /// never sends them gets the fixed token budget.
    ComputeTime(Duration),
    /// The batch was lost with its KV handles (the compute thread panicked): its sessions fail with `Compute`.
    ComputeLost { reason: String },
    /// The node is shutting down (docs/RELIABILITY.md, "Drain"): from now on every open is refused as busy, while
    /// running sessions go on.
    Drain,
    /// The drain deadline passed: every session still held ends with a `Busy` error frame, so its owner fails over
    /// at once instead of waiting to notice the node is gone.
    DrainExpired,
    /// Nothing happened but time passed: the driver sends this at [`super::StageCore::next_deadline`].
    Tick,
}
