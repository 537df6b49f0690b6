//! What the stage core asks its driver to do.

use std::net::SocketAddr;

use super::batch::ComputeBatch;
use super::events::StreamId;
use shardline_proto::wire::{Expect, Fingerprint, Frame};

/// One request to the driver, taken with [`super::StageCore::poll_action`] and carried out in order.
#[derive(Debug)]
pub enum Action<K> {
    /// Read the next frame of `stream` and report it ([`super::Event::Frame`], `Finished`, `Lost` or `Malformed`).
    /// The core asks for one frame at a time and only while the session has room for it, so a peer that sends
    /// faster than the stage computes is held back by the transport's flow control, not by a growing queue here.
    /// The frame's header must pass `expect` (kinds this stream may carry now, its session, the payload the session
    /// can still take) before its payload is read: a frame that fails it is reported `Malformed`.
    Read { stream: StreamId, expect: Expect },
    /// Write `frame` on `stream`, after the frames sent before it; report [`super::Event::Sent`] or `SendFailed`.
    Send { stream: StreamId, frame: Frame },
    /// Finish the send side of `stream` once its queued frames are written, and stop reading it. The core forgets
    /// the stream: later events about it are ignored.
    Finish { stream: StreamId },
    /// Open a stream to the stage at `addr` whose certificate is `fingerprint`, and report [`super::Event::Dialed`]
    /// for `stream`. The core then sends the `Attach` frame itself.
    Dial { stream: StreamId, addr: SocketAddr, fingerprint: Fingerprint },
    /// Run this batch and report [`super::Event::Computed`] with every item. The core issues one batch at a time.
    Compute(ComputeBatch<K>),
}
