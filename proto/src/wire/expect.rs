//! What a reader will accept as the next frame of a stream, checked on the header before the payload is read or
//! allocated. The [`Limits`](super::Limits) bound any frame; an `Expect` bounds the frame this stream may carry now:
//! its kinds (a stream's first frame is `Open` or `Attach`, never 64 MiB of hidden states), its session, and the
//! payload its session can still take. A peer that breaks it costs the reader 36 bytes, not the payload.

use super::error::{WireError, WireResult, malformed};
use super::frame::SessionId;
use super::header::{FrameKind, Header};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Bit `code` set for every acceptable [`FrameKind`] code.
    kinds: u16,
    /// The session every frame must name, once the stream belongs to one.
    session: Option<SessionId>,
    /// Largest acceptable payload, in bytes.
    max_payload: u32,
}

impl Expect {
    /// Any frame the [`Limits`](super::Limits) allow (owners reading their control streams, tests).
    pub const ANY: Expect = Expect { kinds: u16::MAX, session: None, max_payload: u32::MAX };

    /// Frames of the given kinds, of any session and size within the limits.
    pub fn kinds(kinds: &[FrameKind]) -> Self {
        Expect { kinds: kinds.iter().fold(0, |m, k| m | (1 << *k as u16)), ..Self::ANY }
    }

    /// Only frames naming `session`.
    pub fn session(self, session: SessionId) -> Self {
        Expect { session: Some(session), ..self }
    }

    /// Payloads of at most `bytes`.
    pub fn max_payload(self, bytes: usize) -> Self {
        Expect { max_payload: u32::try_from(bytes).unwrap_or(u32::MAX), ..self }
    }

    pub fn allows(&self, kind: FrameKind) -> bool {
        self.kinds & (1 << kind as u16) != 0
    }

    /// Refuses a header this stream cannot carry now.
    pub fn check(&self, h: &Header) -> WireResult<()> {
        if !self.allows(h.kind) {
            return Err(malformed(h.kind.name(), "this frame kind is not expected on this stream now"));
        }
        if let Some(s) = self.session
            && h.session != s
        {
            return Err(malformed(
                h.kind.name(),
                format!("frame for session {} on a stream of session {s}", h.session),
            ));
        }
        if h.payload_len > self.max_payload {
            return Err(WireError::Oversized {
                what: "payload bytes for this stream",
                len: h.payload_len as u64,
                limit: self.max_payload as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::header::PayloadDType;

    fn header(kind: FrameKind, session: u64, payload_len: u32) -> Header {
        Header { kind, flags: 0, dtype: PayloadDType::None, session, position: 0, n_tokens: 0, width: 0, payload_len }
    }

    #[test]
    fn kinds_session_and_size_are_checked() {
        let e = Expect::kinds(&[FrameKind::Prefill, FrameKind::Close]).session(7).max_payload(100);
        assert!(e.check(&header(FrameKind::Prefill, 7, 100)).is_ok());
        assert!(e.check(&header(FrameKind::Close, 7, 0)).is_ok());
        assert!(e.check(&header(FrameKind::Open, 7, 10)).is_err());
        assert!(e.check(&header(FrameKind::Prefill, 8, 10)).is_err());
        assert!(matches!(e.check(&header(FrameKind::Prefill, 7, 101)), Err(WireError::Oversized { .. })));
        assert!(Expect::ANY.check(&header(FrameKind::Error, 1, u32::MAX)).is_ok());
    }
}
