//! Reading and writing frames on async byte streams (QUIC streams in practice).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{WireError, WireResult};
use super::expect::Expect;
use super::frame::{AlignedBytes, Frame};
use super::header::{HEADER_LEN, Header};
use super::limits::Limits;

/// Reads the next frame. `Ok(None)` is a clean end of stream between frames; an end inside a frame is `Truncated`.
/// The header is validated against `limits` before the payload buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, limits: &Limits) -> WireResult<Option<Frame>> {
    read_frame_expecting(r, limits, &Expect::ANY).await
}

/// As [`read_frame`], and the header must also pass `expect` (kind, session, payload budget) before a single payload
/// byte is read or allocated.
pub async fn read_frame_expecting<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
    expect: &Expect,
) -> WireResult<Option<Frame>> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut hb[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(WireError::Truncated { needed: HEADER_LEN, got });
        }
        got += n;
    }
    let header = Header::decode(&hb, limits)?;
    expect.check(&header)?;
    let len = header.payload_len as usize;
    let mut payload = AlignedBytes::zeroed(len);
    let buf = payload.as_bytes_mut();
    let mut got = 0;
    while got < len {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(WireError::Truncated { needed: HEADER_LEN + len, got: HEADER_LEN + got });
        }
        got += n;
    }
    Frame::from_parts(header, payload, limits).map(Some)
}

/// Writes one frame: the header, then the payload straight from the frame's buffers (no copy of hidden states).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> WireResult<()> {
    let (header, payload) = frame.parts();
    w.write_all(&header.encode()).await?;
    let body = payload.as_ref();
    if !body.is_empty() {
        w.write_all(body).await?;
    }
    Ok(())
}
