//! Feeds the messenger's frame decoder, in arbitrary chunks, either raw bytes or (first byte odd) frames built
//! from the input with valid checksums and then one byte flipped — raw bytes alone almost never get past the
//! preamble crc. It must never panic, and every frame it accepts must re-encode to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use messenger::frame::{decode_frame, FrameLimits, RxBuf, TxQueue};

fn wire_from(data: &[u8]) -> Vec<u8> {
    // [tag, flip_at_lo, flip_at_hi, len0, len1, len2, ...segment bytes]
    if data.len() < 6 {
        return data.to_vec();
    }
    let (hdr, rest) = data.split_at(6);
    let tag = hdr[0] % 14; // includes invalid tags 0 and 13
    let lens = [hdr[3] as usize, hdr[4] as usize * 8, hdr[5] as usize * 64];
    let mut segs = [Bytes::new(), Bytes::new(), Bytes::new()];
    let mut off = 0;
    for (seg, len) in segs.iter_mut().zip(lens) {
        let n = len.min(rest.len() - off);
        *seg = Bytes::copy_from_slice(&rest[off..off + n]);
        off += n;
    }
    let mut tx = TxQueue::new();
    // push_frame only takes known tags: encode with Ack and patch the tag byte and preamble crc by hand.
    tx.push_frame(messenger::frame::Tag::Ack, &segs[0], &segs[1], &segs[2]);
    let mut wire = tx.take_all();
    wire[0] = tag;
    let crc = crc32c::crc32c(&wire[..20]);
    wire[20..24].copy_from_slice(&crc.to_le_bytes());
    let flip = u16::from_le_bytes([hdr[1], hdr[2]]) as usize;
    if flip < wire.len() * 2 && flip < wire.len() {
        wire[flip] ^= 0x5a;
    }
    wire
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let chunk = usize::from(mode >> 1).max(1);
    let wire = if mode & 1 == 1 { wire_from(rest) } else { rest.to_vec() };
    let limits = FrameLimits { front_bytes_max: 1 << 16, data_bytes_max: 1 << 20 };
    let mut rx = RxBuf::new();
    for piece in wire.chunks(chunk) {
        rx.extend_from_slice(piece);
        loop {
            let before = rx.data().to_vec();
            match decode_frame(&mut rx, &limits) {
                Ok(Some(f)) => {
                    let mut tx = TxQueue::new();
                    tx.push_frame(f.tag, &f.segments[0], &f.segments[1], &f.segments[2]);
                    let again = tx.take_all();
                    assert_eq!(&before[..again.len()], &again[..], "a decoded frame re-encodes to its bytes");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
