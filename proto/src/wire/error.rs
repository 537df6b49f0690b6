/// Everything a frame reader can refuse. A peer that sends any of these gets an `Error` frame and loses its stream;
/// other sessions are not affected.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o error on the stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame truncated: {needed} bytes needed, {got} available")]
    Truncated { needed: usize, got: usize },
    #[error("bad frame magic {0:02x?} (expected \"SL\")")]
    BadMagic([u8; 2]),
    #[error("unsupported wire version {0} (this build speaks version {current})", current = super::VERSION)]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown payload dtype code {0}")]
    UnknownDType(u8),
    #[error("{what} of {len} exceeds the limit of {limit}")]
    Oversized { what: &'static str, len: u64, limit: u64 },
    #[error("malformed {kind} frame: {detail}")]
    Malformed { kind: &'static str, detail: String },
    #[error("expected a {expected} frame, got {got}")]
    UnexpectedKind { expected: &'static str, got: &'static str },
}

pub type WireResult<T> = std::result::Result<T, WireError>;

pub(crate) fn malformed(kind: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Malformed { kind, detail: detail.into() }
}
