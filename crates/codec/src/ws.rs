//! WebSocket frame headers (RFC 6455 §5.2), for MQTT over WebSocket: what the broker's server
//! side and `ferry bench`'s client side both read and write. Sans-I/O, like the rest of the
//! codec; the handshakes and the streams live with their users.

use bytes::{BufMut, BytesMut};

/// Appended to the client's key before hashing it into `Sec-WebSocket-Accept`.
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// The three reserved bits (0 unless an extension was agreed).
    pub rsv: u8,
    pub opcode: u8,
    /// The masking key; clients must mask, servers must not.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Bytes the header takes, before the payload.
    pub size: usize,
}

/// The header at the front of `buf`, or `None` while it is incomplete.
pub fn parse_header(buf: &[u8]) -> Option<FrameHeader> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let (len, at) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (n as u64, 2),
    };
    let (mask, size) = if b1 & 0x80 != 0 {
        (Some(buf.get(at..at + 4)?.try_into().ok()?), at + 4)
    } else {
        (None, at)
    };
    Some(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        len,
        size,
    })
}

/// Appends the header of a final frame of `len` payload bytes (masked with `mask`, if any),
/// reserving room for the payload.
pub fn put_header(out: &mut BytesMut, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.reserve(len + 14);
    out.put_u8(0x80 | opcode);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(masked | len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(masked | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(masked | 127);
        out.put_u64(len as u64);
    }
    if let Some(mask) = mask {
        out.put_slice(&mask);
    }
}

/// Masks or unmasks `data` in place, `data[0]` being byte `offset` of the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_all_three_length_forms() {
        for len in [0usize, 125, 126, 65_535, 65_536, 100_000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = BytesMut::new();
                put_header(&mut out, OP_BINARY, len, mask);
                let h = parse_header(&out).expect("complete");
                assert_eq!(
                    (h.fin, h.rsv, h.opcode, h.mask, h.len, h.size),
                    (true, 0, OP_BINARY, mask, len as u64, out.len()),
                    "{len} {mask:?}"
                );
                // Any prefix is incomplete.
                for cut in 0..out.len() {
                    assert_eq!(parse_header(&out[..cut]), None, "{len} {mask:?} {cut}");
                }
            }
        }
    }

    #[test]
    fn masking_twice_restores_and_offsets_continue() {
        let data: Vec<u8> = (0..=255).collect();
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        let mut pieces = data.clone();
        let (a, b) = pieces.split_at_mut(7);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 7);
        assert_eq!(pieces, whole);
        apply_mask(&mut whole, mask, 0);
        assert_eq!(whole, data);
        // Reserved bits and FIN are read as sent.
        assert_eq!(
            parse_header(&[0x71, 0x00]).map(|h| (h.fin, h.rsv)),
            Some((false, 7))
        );
    }
}
