//! One session's state inside the core: where its frames come from and go to, the inputs waiting for compute, and
//! the admission slot and KV reservation it owns (both freed when the entry is dropped).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use super::admission::Slot;
use super::batch::Failure;
use super::events::StreamId;
use super::quota::PeerLease;
use shardline_proto::wire::{SessionOpen, StageData};

/// Input chunks a session holds before compute, at most (frames not yet read stay in the transport).
pub const INPUT_QUEUE: usize = 4;

/// Frames a session may have handed to the driver but not yet seen written on its output stream; past this the
/// session computes nothing more until the next stage (or the owner) reads.
pub const OUTPUT_WINDOW: usize = 4;

pub(super) enum Phase {
    /// Dialing and attaching the next stage; the owner has not been told `Opened` yet.
    Opening {
        deadline: Instant,
    },
    Running,
    /// Ended while a chunk was computing: the entry waits for the KV handle to come back, then is dropped.
    Closing,
}

/// The previous stage's data stream (sessions whose span does not start at layer 0).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Upstream {
    /// First stage: inputs come on the control stream.
    None,
    /// Waiting for the previous stage's `Attach`.
    Expected,
    Attached(StreamId),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Dialing,
    Attaching,
    Ready,
}

/// The data stream to the next stage.
pub(super) struct Downstream {
    pub stream: StreamId,
    pub addr: SocketAddr,
    pub link: Link,
}

/// How the chunk's output frame is labelled.
#[derive(Clone, Copy, Debug)]
pub(super) enum ChunkKind {
    Prefill { last: bool },
    Decode,
}

pub(super) struct Chunk {
    pub position: u64,
    pub kind: ChunkKind,
    pub data: StageData,
}

/// A chunk taken for compute: what its result frame needs.
#[derive(Clone, Copy)]
pub(super) struct InFlight {
    pub position: u64,
    pub n: u64,
    pub kind: ChunkKind,
}

/// Inputs in arrival order. An `End` (close, end of stream, a refused frame) is processed after the chunks before it,
/// as the owner sent them.
pub(super) enum Queued {
    Chunk(Chunk),
    End(Result<(), Failure>),
}

pub(super) struct StageSession<K> {
    pub open: SessionOpen,
    pub control: StreamId,
    pub phase: Phase,
    pub upstream: Upstream,
    pub downstream: Option<Downstream>,
    /// `None` while lent to a compute batch.
    pub kv: Option<K>,
    pub in_flight: Option<InFlight>,
    pub queue: VecDeque<Queued>,
    /// The position the next arriving chunk must start at.
    pub next_position: u64,
    /// No more input is read once an `End` is queued.
    pub input_closed: bool,
    /// Last input, compute result or written output: the idle timeout counts from here.
    pub last_active: Instant,
    /// Admission order on this stage (lower is older): the scheduler serves older prompts first.
    pub arrival: u64,
    /// The batch this session was last computed in (0: none yet): its cohort, which the stage waits for a moment
    /// when part of it is ready (`StageCore::gather`).
    pub cohort: u64,
    /// Its last chunk drew a token or carried a decode: its next input is a decode step.
    pub awaits_decode: bool,
    /// Dropped with the entry, after `kv`: gives the admission back.
    pub _slot: Slot,
    /// The owner's share of its per-peer quota, given back with the entry.
    pub _lease: PeerLease,
}

impl<K> StageSession<K> {
    /// The streams input frames arrive on.
    pub fn input_streams(&self) -> impl Iterator<Item = StreamId> {
        let upstream = match self.upstream {
            Upstream::Attached(s) => Some(s),
            _ => None,
        };
        std::iter::once(self.control).chain(upstream)
    }

    /// Where this session's outputs go: hidden states to the next stage, or tokens to the owner.
    pub fn output_stream(&self) -> StreamId {
        self.downstream.as_ref().map_or(self.control, |d| d.stream)
    }

    pub fn has_ready_chunk(&self) -> bool {
        self.in_flight.is_none() && self.kv.is_some() && matches!(self.queue.front(), Some(Queued::Chunk(_)))
    }
}
