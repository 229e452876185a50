//! Feeds arbitrary bytes to the decoder as a stream of frames, for each protocol level. Every
//! packet that decodes must re-encode to a frame of `encoded_len` bytes that decodes back to the
//! same packet.

#![no_main]

use bytes::BytesMut;
use ferry_codec::{decode, Packet, Protocol};
use libfuzzer_sys::fuzz_target;

const MAX_PACKET_SIZE: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode(&mut buf, protocol, MAX_PACKET_SIZE) {
            check_round_trip(&packet, protocol);
        }
    }
});

fn check_round_trip(packet: &Packet, protocol: Protocol) {
    let mut encoded = BytesMut::new();
    packet
        .encode(protocol, &mut encoded)
        .unwrap_or_else(|e| panic!("re-encoding {packet:?} for {protocol:?}: {e}"));
    let wire_protocol = match packet {
        Packet::Connect(c) => c.protocol,
        _ => protocol,
    };
    assert_eq!(
        packet.encoded_len(wire_protocol),
        encoded.len(),
        "encoded_len of {packet:?}"
    );
    let frame = encoded.clone();
    let again = decode(&mut encoded, protocol, u32::MAX)
        .unwrap_or_else(|e| panic!("decoding re-encoded {packet:?} ({frame:02x?}): {e}"));
    assert_eq!(again.as_ref(), Some(packet), "frame {frame:02x?}");
    assert!(encoded.is_empty(), "bytes left after {packet:?}");
}
