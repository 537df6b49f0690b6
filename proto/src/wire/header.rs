//! The fixed 36-byte header that starts every frame. Layout (all integers little-endian):
//!
//! | offset | size | field        |
//! |-------:|-----:|--------------|
//! | 0      | 2    | magic `"SL"` |
//! | 2      | 1    | version (2)  |
//! | 3      | 1    | kind         |
//! | 4      | 1    | flags        |
//! | 5      | 1    | dtype        |
//! | 6      | 2    | reserved (0) |
//! | 8      | 8    | session id   |
//! | 16     | 8    | position     |
//! | 24     | 4    | n_tokens     |
//! | 28     | 4    | width        |
//! | 32     | 4    | payload length in bytes |

use super::error::{WireError, WireResult, malformed};
use super::frame::KEY_LEN;
use super::limits::Limits;
use super::{MAGIC, VERSION};

pub const HEADER_LEN: usize = 36;

/// What a frame is. The numeric codes are part of the protocol (`docs/PROTOCOL.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Open = 1,
    Opened = 2,
    Attach = 3,
    Prefill = 4,
    Decode = 5,
    Token = 6,
    Close = 7,
    Error = 8,
    /// Owner → stage (control stream): the session is alive though no input is due; resets the idle timeout.
    Ping = 9,
}

impl FrameKind {
    pub fn from_code(code: u8) -> WireResult<Self> {
        Ok(match code {
            1 => FrameKind::Open,
            2 => FrameKind::Opened,
            3 => FrameKind::Attach,
            4 => FrameKind::Prefill,
            5 => FrameKind::Decode,
            6 => FrameKind::Token,
            7 => FrameKind::Close,
            8 => FrameKind::Error,
            9 => FrameKind::Ping,
            other => return Err(WireError::UnknownKind(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Open => "open",
            FrameKind::Opened => "opened",
            FrameKind::Attach => "attach",
            FrameKind::Prefill => "prefill",
            FrameKind::Decode => "decode",
            FrameKind::Token => "token",
            FrameKind::Close => "close",
            FrameKind::Error => "error",
            FrameKind::Ping => "ping",
        }
    }
}

/// Payload element type. `Tokens` is u32 token ids; the others are hidden states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PayloadDType {
    None = 0,
    Tokens = 1,
    F32 = 2,
    F16 = 3,
    BF16 = 4,
}

impl PayloadDType {
    pub fn from_code(code: u8) -> WireResult<Self> {
        Ok(match code {
            0 => PayloadDType::None,
            1 => PayloadDType::Tokens,
            2 => PayloadDType::F32,
            3 => PayloadDType::F16,
            4 => PayloadDType::BF16,
            other => return Err(WireError::UnknownDType(other)),
        })
    }

    /// Bytes per element (0 for `None`).
    pub fn size(self) -> usize {
        match self {
            PayloadDType::None => 0,
            PayloadDType::Tokens | PayloadDType::F32 => 4,
            PayloadDType::F16 | PayloadDType::BF16 => 2,
        }
    }
}

/// Flag bit of `Prefill`: this is the last chunk of the prompt, the last stage samples after it.
pub const FLAG_LAST: u8 = 1;

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub flags: u8,
    pub dtype: PayloadDType,
    pub session: u64,
    pub position: u64,
    pub n_tokens: u32,
    pub width: u32,
    pub payload_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = self.kind as u8;
        h[4] = self.flags;
        h[5] = self.dtype as u8;
        h[8..16].copy_from_slice(&self.session.to_le_bytes());
        h[16..24].copy_from_slice(&self.position.to_le_bytes());
        h[24..28].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[28..32].copy_from_slice(&self.width.to_le_bytes());
        h[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        h
    }

    /// Parses and validates a header: magic, version, kind, dtype, and every size against `limits` and against each
    /// other, so that the payload length is known to be acceptable before a single payload byte is allocated.
    pub fn decode(h: &[u8; HEADER_LEN], limits: &Limits) -> WireResult<Self> {
        let magic = [h[0], h[1]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if h[2] != VERSION {
            return Err(WireError::UnsupportedVersion(h[2]));
        }
        let kind = FrameKind::from_code(h[3])?;
        let flags = h[4];
        let dtype = PayloadDType::from_code(h[5])?;
        let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let header = Header {
            kind,
            flags,
            dtype,
            session: le64(8),
            position: le64(16),
            n_tokens: le32(24),
            width: le32(28),
            payload_len: le32(32),
        };
        if h[6] != 0 || h[7] != 0 {
            return Err(malformed(kind.name(), "reserved header bytes are not zero"));
        }
        header.validate(limits)?;
        Ok(header)
    }

    fn validate(&self, limits: &Limits) -> WireResult<()> {
        let name = self.kind.name();
        let len = self.payload_len as u64;
        let known_flags = if self.kind == FrameKind::Prefill { FLAG_LAST } else { 0 };
        if self.flags & !known_flags != 0 {
            return Err(malformed(name, format!("unknown flags {:#04x}", self.flags)));
        }
        match self.kind {
            FrameKind::Prefill | FrameKind::Decode => {
                let n = self.n_tokens as u64;
                if n == 0 {
                    return Err(malformed(name, "no tokens"));
                }
                if n > limits.max_tokens_per_frame as u64 {
                    return Err(WireError::Oversized {
                        what: "tokens per frame",
                        len: n,
                        limit: limits.max_tokens_per_frame as u64,
                    });
                }
                if self.kind == FrameKind::Decode && n != 1 {
                    return Err(malformed(name, format!("a decode step carries one position, not {n}")));
                }
                let expected = match self.dtype {
                    PayloadDType::None => return Err(malformed(name, "payload dtype is none")),
                    PayloadDType::Tokens => {
                        if self.width != 0 {
                            return Err(malformed(name, "token payloads have width 0"));
                        }
                        n * 4
                    }
                    hidden => {
                        let w = self.width as u64;
                        if w == 0 || w > limits.max_width as u64 {
                            return Err(WireError::Oversized {
                                what: "hidden width",
                                len: w,
                                limit: limits.max_width as u64,
                            });
                        }
                        n * w * hidden.size() as u64
                    }
                };
                if expected > limits.max_payload as u64 {
                    return Err(WireError::Oversized {
                        what: "payload bytes",
                        len: expected,
                        limit: limits.max_payload as u64,
                    });
                }
                if len != expected {
                    return Err(malformed(name, format!("payload of {len} bytes, shape needs {expected}")));
                }
            }
            FrameKind::Open | FrameKind::Token | FrameKind::Error => {
                if len > limits.max_control_payload as u64 {
                    return Err(WireError::Oversized {
                        what: "control payload bytes",
                        len,
                        limit: limits.max_control_payload as u64,
                    });
                }
            }
            FrameKind::Attach => {
                if len != KEY_LEN as u64 {
                    return Err(malformed(
                        name,
                        format!("{len} payload bytes, an attach carries the {KEY_LEN}-byte session key"),
                    ));
                }
            }
            FrameKind::Opened | FrameKind::Close | FrameKind::Ping => {
                if len != 0 {
                    return Err(malformed(name, format!("{len} payload bytes on a frame without payload")));
                }
            }
        }
        Ok(())
    }
}
