//! Primitive field readers and writers: integers, variable byte integers, strings, binary data.

use crate::{ByteStr, DecodeError, EncodeError};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Reads fields off the body of one frame; every read checks the remaining length first.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::Truncated(what));
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Truncated(what));
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        match read_varint(&self.buf)? {
            Some((value, len)) => {
                self.buf.advance(len);
                Ok(value)
            }
            None => Err(DecodeError::Truncated(what)),
        }
    }

    pub(crate) fn take(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if self.buf.len() < len {
            return Err(DecodeError::Truncated(what));
        }
        Ok(self.buf.split_to(len))
    }

    pub(crate) fn binary(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u16(what)? as usize;
        self.take(len, what)
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<ByteStr, DecodeError> {
        let raw = self.binary(what)?;
        utf8(raw)
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Validates an MQTT UTF-8 string: well-formed UTF-8 without U+0000 (MQTT 5 §1.5.4).
pub(crate) fn utf8(raw: Bytes) -> Result<ByteStr, DecodeError> {
    if raw.contains(&0) {
        return Err(DecodeError::NullCharacter);
    }
    ByteStr::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)
}

/// Reads a variable byte integer from the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((value, bytes used)))` when complete, an error when a fifth byte would be needed.
pub(crate) fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::MalformedLength)
}

pub(crate) fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(buf: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub(crate) fn put_binary(
    buf: &mut BytesMut,
    data: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong(what))?;
    buf.put_u16(len);
    buf.put_slice(data);
    Ok(())
}

/// Encoded size of a length-prefixed string or binary field.
pub(crate) fn field_len(data: &[u8]) -> usize {
    2 + data.len()
}
