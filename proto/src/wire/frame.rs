//! Frames: what each kind carries, and how bodies are laid out after the header (see `docs/PROTOCOL.md`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::buf::{Reader, Writer};
use super::error::{WireError, WireResult, malformed};
use super::header::{FLAG_LAST, FrameKind, Header, PayloadDType};
use super::limits::Limits;
use crate::span::LayerRange;

/// Identifies a session on every stage of its route; chosen at random by the session owner.
pub type SessionId = u64;

/// SHA-256 of a stage's DER certificate, the value clients pin.
pub type Fingerprint = [u8; 32];

/// Bytes of a [`SessionKey`].
pub const KEY_LEN: usize = 16;

/// A per-session, per-stage capability: 128 random bits the owner draws from a cryptographic generator and gives a
/// stage in `Open`; the previous stage must present it in `Attach`. Session ids are not secrets (they are logged); a
/// key is, and is never logged.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionKey(pub [u8; KEY_LEN]);

impl SessionKey {
    /// Compares in time independent of where the keys differ, so a peer cannot find a key byte by byte.
    pub fn matches(&self, other: &SessionKey) -> bool {
        self.0.iter().zip(other.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// The element type of hidden states on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    pub fn payload(self) -> PayloadDType {
        match self {
            WireDType::F32 => PayloadDType::F32,
            WireDType::F16 => PayloadDType::F16,
            WireDType::BF16 => PayloadDType::BF16,
        }
    }

    pub fn from_payload(p: PayloadDType, kind: &'static str) -> WireResult<Self> {
        match p {
            PayloadDType::F32 => Ok(WireDType::F32),
            PayloadDType::F16 => Ok(WireDType::F16),
            PayloadDType::BF16 => Ok(WireDType::BF16),
            other => Err(malformed(kind, format!("{other:?} is not a hidden-state dtype"))),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.payload().size()
    }
}

impl std::str::FromStr for WireDType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(WireDType::F32),
            "f16" => Ok(WireDType::F16),
            "bf16" => Ok(WireDType::BF16),
            other => Err(format!("unknown wire dtype {other:?} (f32, f16 or bf16)")),
        }
    }
}

/// Bytes kept in a `u32` buffer so they can be viewed as `f32`, `f16`, `bf16` or `u32` with `bytemuck` without a
/// copy or a per-element conversion.
#[derive(Clone, PartialEq, Eq)]
pub struct AlignedBytes {
    words: Vec<u32>,
    len: usize,
}

impl AlignedBytes {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self { words: vec![0; len.div_ceil(4)], len }
    }

    /// A copy of `bytes`, written once (no zero-fill first).
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut words = Vec::with_capacity(bytes.len().div_ceil(4));
        let chunks = bytes.chunks_exact(4);
        let tail = chunks.remainder();
        words.extend(chunks.map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])));
        if !tail.is_empty() {
            let mut last = [0u8; 4];
            last[..tail.len()].copy_from_slice(tail);
            words.push(u32::from_ne_bytes(last));
        }
        Self { words, len: bytes.len() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Turns a buffer holding exactly `len / 4` u32 values into them, without copying.
    fn into_u32s(self) -> Vec<u32> {
        debug_assert_eq!(self.len % 4, 0);
        self.words
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len)
    }
}

/// Hidden states `[n_tokens, width]` of one chunk in the session's wire dtype, little-endian.
#[derive(Clone, Debug, PartialEq)]
pub struct HiddenStates {
    dtype: WireDType,
    n_tokens: usize,
    width: usize,
    data: AlignedBytes,
}

impl HiddenStates {
    /// Wraps raw little-endian bytes; fails unless their length is exactly `n_tokens * width * size(dtype)`.
    pub fn from_bytes(dtype: WireDType, n_tokens: usize, width: usize, bytes: &[u8]) -> WireResult<Self> {
        Self::new(dtype, n_tokens, width, AlignedBytes::copy_from(bytes))
    }

    pub fn new(dtype: WireDType, n_tokens: usize, width: usize, data: AlignedBytes) -> WireResult<Self> {
        let expected = n_tokens.checked_mul(width).and_then(|e| e.checked_mul(dtype.size()));
        if expected != Some(data.len()) {
            return Err(malformed(
                "hidden states",
                format!("{} bytes for [{n_tokens}, {width}] of {dtype:?}", data.len()),
            ));
        }
        Ok(Self { dtype, n_tokens, width, data })
    }

    /// Hidden states given as f32 values (no conversion: the bytes are cast).
    pub fn from_f32(n_tokens: usize, width: usize, values: &[f32]) -> WireResult<Self> {
        Self::from_bytes(WireDType::F32, n_tokens, width, bytemuck::cast_slice(values))
    }

    pub fn dtype(&self) -> WireDType {
        self.dtype
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_bytes()
    }

    /// The values as f32, when the dtype is f32 (a cast of the aligned buffer, no copy).
    pub fn as_f32(&self) -> Option<&[f32]> {
        (self.dtype == WireDType::F32).then(|| bytemuck::cast_slice(self.data.as_bytes()))
    }

    /// The values as f16 or bf16 (a cast, no copy).
    pub fn as_half<T: bytemuck::Pod>(&self) -> Option<&[T]> {
        (self.dtype.size() == 2 && std::mem::size_of::<T>() == 2).then(|| bytemuck::cast_slice(self.data.as_bytes()))
    }
}

/// What a prefill chunk or decode step carries: token ids (into the first stage) or hidden states (between stages).
#[derive(Clone, Debug, PartialEq)]
pub enum StageData {
    Tokens(Vec<u32>),
    Hidden(HiddenStates),
}

impl StageData {
    pub fn n_tokens(&self) -> usize {
        match self {
            StageData::Tokens(t) => t.len(),
            StageData::Hidden(h) => h.n_tokens(),
        }
    }

    fn dtype(&self) -> PayloadDType {
        match self {
            StageData::Tokens(_) => PayloadDType::Tokens,
            StageData::Hidden(h) => h.dtype.payload(),
        }
    }

    fn width(&self) -> u32 {
        match self {
            StageData::Tokens(_) => 0,
            StageData::Hidden(h) => h.width as u32,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            StageData::Tokens(t) => bytemuck::cast_slice(t),
            StageData::Hidden(h) => h.as_bytes(),
        }
    }
}

/// Sampling parameters as the wire carries them in `Open` (the compute side converts them to its own type).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WireSampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Keep the smallest set whose probability reaches `top_p` (1.0 = off).
    pub top_p: f32,
    /// Seed of the counter-based generator: a draw depends only on `(seed, position)`.
    pub seed: u64,
}

impl WireSampling {
    pub const GREEDY: WireSampling = WireSampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
}

/// One stage of the rest of a route: who runs which layers, where, and which certificate to expect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub layers: LayerRange,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

/// Everything a stage needs to join a session.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionOpen {
    /// Model id (hex digest) the owner expects; a stage serving another model refuses.
    pub model_id: String,
    /// Blocks of the whole model, `N`.
    pub n_layers: u32,
    /// Layers this stage runs for the session (inside its shard).
    pub span: LayerRange,
    /// Positions the session may reach (prompt + new tokens), reserved in the KV cache at open.
    pub max_tokens: u32,
    pub sampling: WireSampling,
    /// Top log-probabilities returned with each token (0 = none).
    pub n_top: u8,
    /// Element type of hidden states between stages.
    pub wire_dtype: WireDType,
    /// Width of the hidden state, checked against the stage's model.
    pub hidden: u32,
    /// The stages after this one, next hop first; empty on the last stage.
    pub rest: Vec<Hop>,
    /// What the previous stage must present in its `Attach` (ignored on the first stage, which has none).
    pub attach_key: SessionKey,
    /// What this stage presents in its `Attach` to the next hop (ignored on the last stage).
    pub next_key: SessionKey,
    /// The next hop's signed announcement (the DHT record value, `SignedAnnouncement::to_bytes`): a stage dials only
    /// an address and certificate that a node of the same model signed for. Empty on the last stage.
    pub next_record: Vec<u8>,
}

/// The token the last stage drew, with its log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenResult {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a stage refused or ended a session. Codes are part of the protocol; unknown ones are kept as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The peer sent a frame that does not parse or breaks a limit.
    Malformed,
    /// The frame names a session this stage does not hold.
    UnknownSession,
    /// No capacity: too many sessions or not enough free KV cache.
    Busy,
    /// The request does not fit this stage (other model, span outside the shard, wrong width, out-of-order position).
    BadRequest,
    /// The forward pass or sampling failed.
    Compute,
    /// The next stage of the route failed or could not be reached.
    Downstream,
    /// The session was idle for too long.
    Timeout,
    /// The previous stage of the route broke the data stream: closed it (a stage never closes its successor on its
    /// own), sent a frame that does not parse, hidden states of the wrong position or shape, or input no honest
    /// stage produces (non-finite hidden states). The owner blames the previous hop, not the stage that reports it.
    Upstream,
    Other(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Malformed => 1,
            ErrorCode::UnknownSession => 2,
            ErrorCode::Busy => 3,
            ErrorCode::BadRequest => 4,
            ErrorCode::Compute => 5,
            ErrorCode::Downstream => 6,
            ErrorCode::Timeout => 7,
            ErrorCode::Upstream => 8,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_code(c: u16) -> Self {
        match c {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::UnknownSession,
            3 => ErrorCode::Busy,
            4 => ErrorCode::BadRequest,
            5 => ErrorCode::Compute,
            6 => ErrorCode::Downstream,
            7 => ErrorCode::Timeout,
            8 => ErrorCode::Upstream,
            other => ErrorCode::Other(other),
        }
    }
}

/// A protocol message. See `docs/PROTOCOL.md` for who sends which on which stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Owner → stage (control stream): join session `session`.
    Open {
        session: SessionId,
        open: SessionOpen,
    },
    /// Stage → owner (control stream) or next stage → stage (data stream): ready.
    Opened {
        session: SessionId,
    },
    /// Stage → next stage (first frame of a data stream): the hidden states of `session` follow on this stream. `key`
    /// is the next stage's [`SessionOpen::attach_key`].
    Attach {
        session: SessionId,
        dtype: WireDType,
        width: u32,
        key: SessionKey,
    },
    /// Positions `position..position + n` of the prompt; `last` asks the last stage to sample afterwards.
    Prefill {
        session: SessionId,
        position: u64,
        last: bool,
        data: StageData,
    },
    /// One new position; the last stage samples after it.
    Decode {
        session: SessionId,
        position: u64,
        data: StageData,
    },
    /// Last stage → owner: the token drawn for `position`.
    Token {
        session: SessionId,
        position: u64,
        result: TokenResult,
    },
    /// Owner → stage: free the session.
    Close {
        session: SessionId,
    },
    Error {
        session: SessionId,
        code: ErrorCode,
        message: String,
    },
    /// Owner → stage (control stream): keep the session although no input is due (long generations, slow clients);
    /// resets the stage's idle timeout.
    Ping {
        session: SessionId,
    },
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Open { .. } => FrameKind::Open,
            Frame::Opened { .. } => FrameKind::Opened,
            Frame::Attach { .. } => FrameKind::Attach,
            Frame::Prefill { .. } => FrameKind::Prefill,
            Frame::Decode { .. } => FrameKind::Decode,
            Frame::Token { .. } => FrameKind::Token,
            Frame::Close { .. } => FrameKind::Close,
            Frame::Error { .. } => FrameKind::Error,
            Frame::Ping { .. } => FrameKind::Ping,
        }
    }

    pub fn session(&self) -> SessionId {
        match self {
            Frame::Open { session, .. }
            | Frame::Opened { session }
            | Frame::Attach { session, .. }
            | Frame::Prefill { session, .. }
            | Frame::Decode { session, .. }
            | Frame::Token { session, .. }
            | Frame::Close { session }
            | Frame::Error { session, .. }
            | Frame::Ping { session } => *session,
        }
    }

    /// The header and the payload of this frame. Hidden states and token ids are borrowed, not copied.
    pub fn parts(&self) -> (Header, Payload<'_>) {
        let session = self.session();
        let mut h = Header {
            kind: self.kind(),
            flags: 0,
            dtype: PayloadDType::None,
            session,
            position: 0,
            n_tokens: 0,
            width: 0,
            payload_len: 0,
        };
        let payload = match self {
            Frame::Open { open, .. } => {
                h.dtype = open.wire_dtype.payload();
                h.width = open.hidden;
                Payload::Owned(encode_open(open))
            }
            Frame::Opened { .. } | Frame::Close { .. } | Frame::Ping { .. } => Payload::Borrowed(&[]),
            Frame::Attach { dtype, width, key, .. } => {
                h.dtype = dtype.payload();
                h.width = *width;
                Payload::Borrowed(&key.0)
            }
            Frame::Prefill { position, last, data, .. } => {
                h.flags = if *last { FLAG_LAST } else { 0 };
                h.position = *position;
                h.n_tokens = data.n_tokens() as u32;
                h.dtype = data.dtype();
                h.width = data.width();
                Payload::Borrowed(data.bytes())
            }
            Frame::Decode { position, data, .. } => {
                h.position = *position;
                h.n_tokens = data.n_tokens() as u32;
                h.dtype = data.dtype();
                h.width = data.width();
                Payload::Borrowed(data.bytes())
            }
            Frame::Token { position, result, .. } => {
                h.position = *position;
                h.n_tokens = 1;
                let mut w = Writer::new();
                w.u32(result.token).f32(result.logprob).u8(result.top.len().min(u8::MAX as usize) as u8);
                for &(t, lp) in result.top.iter().take(u8::MAX as usize) {
                    w.u32(t).f32(lp);
                }
                Payload::Owned(w.finish())
            }
            Frame::Error { code, message, .. } => {
                let mut w = Writer::new();
                // Error messages are for operators: cut to 4 KiB so the frame always fits the control limit.
                let mut end = message.len().min(4096);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                w.u16(code.code()).str16(&message[..end]);
                Payload::Owned(w.finish())
            }
        };
        h.payload_len = payload.as_ref().len() as u32;
        (h, payload)
    }

    /// The whole frame as bytes (header + payload) in a new buffer. A sender of many large frames should prefer
    /// [`Frame::encode_into`] (or `write_frame`, which copies nothing): with glibc, allocating and freeing a fresh
    /// megabyte-sized output per frame while the frame itself is alive makes the heap trim and fault its pages back
    /// in on every call (docs/PERFORMANCE.md, `wire`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Replaces the contents of `out` with the whole frame (header + payload), reusing its capacity.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (h, payload) = self.parts();
        out.clear();
        out.reserve(super::HEADER_LEN + payload.as_ref().len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(payload.as_ref());
    }

    /// Parses one frame from the start of `buf`, returning it and the bytes it used.
    pub fn decode(buf: &[u8], limits: &Limits) -> WireResult<(Frame, usize)> {
        let hl = super::HEADER_LEN;
        if buf.len() < hl {
            return Err(WireError::Truncated { needed: hl, got: buf.len() });
        }
        let mut hb = [0u8; super::HEADER_LEN];
        hb.copy_from_slice(&buf[..hl]);
        let header = Header::decode(&hb, limits)?;
        let total = hl + header.payload_len as usize;
        if buf.len() < total {
            return Err(WireError::Truncated { needed: total, got: buf.len() });
        }
        let payload = AlignedBytes::copy_from(&buf[hl..total]);
        Ok((Frame::from_parts(header, payload, limits)?, total))
    }

    /// Builds a frame from a validated header and its payload (`payload.len() == header.payload_len`).
    pub fn from_parts(h: Header, payload: AlignedBytes, limits: &Limits) -> WireResult<Frame> {
        let name = h.kind.name();
        let session = h.session;
        let no_shape = |h: &Header| -> WireResult<()> {
            if h.position != 0 || h.n_tokens != 0 || h.width != 0 || h.dtype != PayloadDType::None {
                return Err(malformed(h.kind.name(), "position, n_tokens, width and dtype must be zero"));
            }
            Ok(())
        };
        Ok(match h.kind {
            FrameKind::Open => {
                if h.position != 0 || h.n_tokens != 0 {
                    return Err(malformed(name, "position and n_tokens must be zero"));
                }
                let wire_dtype = WireDType::from_payload(h.dtype, name)?;
                if h.width == 0 || h.width as usize > limits.max_width {
                    return Err(WireError::Oversized {
                        what: "hidden width",
                        len: h.width as u64,
                        limit: limits.max_width as u64,
                    });
                }
                let open = decode_open(payload.as_bytes(), wire_dtype, h.width, limits)?;
                Frame::Open { session, open }
            }
            FrameKind::Opened => {
                no_shape(&h)?;
                Frame::Opened { session }
            }
            FrameKind::Close => {
                no_shape(&h)?;
                Frame::Close { session }
            }
            FrameKind::Ping => {
                no_shape(&h)?;
                Frame::Ping { session }
            }
            FrameKind::Attach => {
                if h.position != 0 || h.n_tokens != 0 {
                    return Err(malformed(name, "position and n_tokens must be zero"));
                }
                let dtype = WireDType::from_payload(h.dtype, name)?;
                if h.width == 0 || h.width as usize > limits.max_width {
                    return Err(malformed(name, format!("hidden width {} out of range", h.width)));
                }
                let key = SessionKey(payload.as_bytes().try_into().map_err(|_| malformed(name, "session key length"))?);
                Frame::Attach { session, dtype, width: h.width, key }
            }
            FrameKind::Prefill | FrameKind::Decode => {
                let n = h.n_tokens as usize;
                let data = match h.dtype {
                    PayloadDType::Tokens => StageData::Tokens(payload.into_u32s()),
                    other => StageData::Hidden(HiddenStates::new(
                        WireDType::from_payload(other, name)?,
                        n,
                        h.width as usize,
                        payload,
                    )?),
                };
                if h.kind == FrameKind::Prefill {
                    Frame::Prefill { session, position: h.position, last: h.flags & FLAG_LAST != 0, data }
                } else {
                    Frame::Decode { session, position: h.position, data }
                }
            }
            FrameKind::Token => {
                if h.n_tokens != 1 || h.width != 0 || h.dtype != PayloadDType::None {
                    return Err(malformed(name, "a token result has n_tokens 1, width 0, dtype none"));
                }
                let mut r = Reader::new(payload.as_bytes(), name);
                let token = r.u32()?;
                let logprob = r.f32()?;
                let n_top = r.u8()? as usize;
                if n_top > limits.max_top {
                    return Err(WireError::Oversized {
                        what: "top log-probabilities",
                        len: n_top as u64,
                        limit: limits.max_top as u64,
                    });
                }
                let mut top = Vec::with_capacity(n_top);
                for _ in 0..n_top {
                    top.push((r.u32()?, r.f32()?));
                }
                r.finish()?;
                Frame::Token { session, position: h.position, result: TokenResult { token, logprob, top } }
            }
            FrameKind::Error => {
                no_shape(&h)?;
                let mut r = Reader::new(payload.as_bytes(), name);
                let code = ErrorCode::from_code(r.u16()?);
                let message = r.str16()?;
                r.finish()?;
                Frame::Error { session, code, message }
            }
        })
    }
}

/// A frame payload: borrowed for bulk data, owned for small encoded bodies.
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Payload<'_> {
    fn as_ref(&self) -> &[u8] {
        match self {
            Payload::Borrowed(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

pub(crate) fn encode_addr(w: &mut Writer, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => w.u8(4).bytes(&ip.octets()),
        IpAddr::V6(ip) => w.u8(6).bytes(&ip.octets()),
    };
    w.u16(addr.port());
}

pub(crate) fn decode_addr(r: &mut Reader<'_>) -> WireResult<SocketAddr> {
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        other => return Err(malformed("address", format!("unknown address family {other}"))),
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}

fn encode_open(o: &SessionOpen) -> Vec<u8> {
    let mut w = Writer::new();
    w.str16(&o.model_id)
        .u32(o.n_layers)
        .u32(o.span.start as u32)
        .u32(o.span.end as u32)
        .u32(o.max_tokens)
        .f32(o.sampling.temperature)
        .u32(o.sampling.top_k)
        .f32(o.sampling.top_p)
        .u64(o.sampling.seed)
        .u8(o.n_top)
        .u8(o.rest.len().min(u8::MAX as usize) as u8);
    for hop in o.rest.iter().take(u8::MAX as usize) {
        w.u32(hop.layers.start as u32).u32(hop.layers.end as u32);
        encode_addr(&mut w, &hop.addr);
        w.bytes(&hop.fingerprint);
    }
    w.bytes(&o.attach_key.0).bytes(&o.next_key.0).bytes16(&o.next_record);
    w.finish()
}

fn decode_open(buf: &[u8], wire_dtype: WireDType, hidden: u32, limits: &Limits) -> WireResult<SessionOpen> {
    let mut r = Reader::new(buf, "open");
    let model_id = r.str16()?;
    let n_layers = r.u32()?;
    let span = LayerRange::new(r.u32()? as usize, r.u32()? as usize);
    if span.start >= span.end || span.end > n_layers as usize {
        return Err(malformed("open", format!("span {span} is not inside 0..{n_layers}")));
    }
    let max_tokens = r.u32()?;
    let sampling = WireSampling { temperature: r.f32()?, top_k: r.u32()?, top_p: r.f32()?, seed: r.u64()? };
    if !sampling.temperature.is_finite() || !sampling.top_p.is_finite() {
        return Err(malformed("open", "temperature and top_p must be finite"));
    }
    let n_top = r.u8()?;
    if n_top as usize > limits.max_top {
        return Err(WireError::Oversized {
            what: "top log-probabilities",
            len: n_top as u64,
            limit: limits.max_top as u64,
        });
    }
    let n_hops = r.u8()? as usize;
    if n_hops > limits.max_hops {
        return Err(WireError::Oversized { what: "route hops", len: n_hops as u64, limit: limits.max_hops as u64 });
    }
    let mut rest = Vec::with_capacity(n_hops);
    let mut expect_start = span.end;
    for _ in 0..n_hops {
        let layers = LayerRange::new(r.u32()? as usize, r.u32()? as usize);
        if layers.start != expect_start || layers.start >= layers.end || layers.end > n_layers as usize {
            return Err(malformed("open", format!("hop {layers} does not continue the route at layer {expect_start}")));
        }
        expect_start = layers.end;
        let addr = decode_addr(&mut r)?;
        let fingerprint = r.array::<32>()?;
        rest.push(Hop { layers, addr, fingerprint });
    }
    if expect_start != n_layers as usize {
        return Err(malformed("open", format!("route ends at layer {expect_start}, the model has {n_layers}")));
    }
    let attach_key = SessionKey(r.array::<KEY_LEN>()?);
    let next_key = SessionKey(r.array::<KEY_LEN>()?);
    let next_record = r.bytes16()?.to_vec();
    if rest.is_empty() && !next_record.is_empty() {
        return Err(malformed("open", "the last stage of a route has no next hop to vouch for"));
    }
    r.finish()?;
    Ok(SessionOpen {
        model_id,
        n_layers,
        span,
        max_tokens,
        sampling,
        n_top,
        wire_dtype,
        hidden,
        rest,
        attach_key,
        next_key,
        next_record,
    })
}
