//! The stage wire protocol: versioned, length-prefixed binary frames over QUIC streams. `docs/PROTOCOL.md` is the
//! contract for third-party clients; this module is its reference implementation.
//!
//! Every frame is a fixed 36-byte [`Header`] followed by `payload_len` bytes. Readers check every size in the header
//! against [`Limits`] (and against each other) before allocating the payload, and turn every violation into a typed
//! [`WireError`].

#[cfg(target_endian = "big")]
compile_error!("the shardline wire format casts little-endian payloads in place; big-endian hosts are not supported");

pub mod buf;
pub mod error;
pub mod expect;
pub mod frame;
pub mod header;
pub mod io;
pub mod limits;

pub use error::{WireError, WireResult};
pub use expect::Expect;
pub use frame::{
    AlignedBytes, ErrorCode, Fingerprint, Frame, HiddenStates, Hop, KEY_LEN, SessionId, SessionKey, SessionOpen,
    StageData, TokenResult, WireDType, WireSampling,
};
pub use header::{FrameKind, HEADER_LEN, Header, PayloadDType};
pub use io::{read_frame, read_frame_expecting, write_frame};
pub use limits::Limits;

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SL";

/// The protocol version this build speaks. A reader rejects frames of any other version. Version 2 added session
/// keys (`Open`, `Attach`), the next hop's signed announcement in `Open`, `Ping` and the `Upstream` error code
/// (`docs/PROTOCOL.md`, *Changes*).
pub const VERSION: u8 = 2;
