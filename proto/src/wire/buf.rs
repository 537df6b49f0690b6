//! Bounds-checked little-endian readers and writers for frame bodies and signed announcements. Every read checks the
//! remaining length first, so a short or hostile buffer gives an error, never a panic or an oversized allocation.

use super::error::{WireResult, malformed};

/// Appends little-endian fields to a byte vector.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A string as `u16` byte length + UTF-8. Longer strings are cut at a character boundary below 65,535 bytes, so
    /// the writer never produces a frame that its own reader rejects.
    pub fn str16(&mut self, v: &str) -> &mut Self {
        let mut end = v.len().min(u16::MAX as usize);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16).bytes(&v.as_bytes()[..end])
    }

    /// A byte string as `u16` length + bytes; the caller keeps it under 65,536 bytes.
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        let len = v.len().min(u16::MAX as usize);
        self.u16(len as u16).bytes(&v[..len])
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian fields from a byte slice, naming the structure being read in its errors.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> WireResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(malformed(
                self.what,
                format!("needs {n} more bytes at offset {}, {} left", self.pos, self.remaining()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn array<const N: usize>(&mut self) -> WireResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> WireResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> WireResult<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> WireResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> WireResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn f32(&mut self) -> WireResult<f32> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    pub fn str16(&mut self) -> WireResult<String> {
        let len = self.u16()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed(self.what, "string is not UTF-8"))
    }

    pub fn bytes16(&mut self) -> WireResult<&'a [u8]> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// Fails unless every byte was consumed: trailing garbage is a malformed structure, not padding.
    pub fn finish(self) -> WireResult<()> {
        if self.remaining() != 0 {
            return Err(malformed(self.what, format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}
