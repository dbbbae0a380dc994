//! Feeds arbitrary bytes, in arbitrary chunks, to the messenger's frame decoder. It must never panic, and every
//! frame it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use messenger::frame::{decode_frame, FrameLimits, RxBuf, TxQueue};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let limits = FrameLimits { front_bytes_max: 1 << 16, data_bytes_max: 1 << 20 };
    let mut rx = RxBuf::new();
    for piece in rest.chunks(chunk) {
        rx.extend_from_slice(piece);
        loop {
            let before = rx.data().to_vec();
            match decode_frame(&mut rx, &limits) {
                Ok(Some(f)) => {
                    let mut tx = TxQueue::new();
                    tx.push_frame(f.tag, &f.segments[0], &f.segments[1], &f.segments[2]);
                    let wire = tx.take_all();
                    assert_eq!(&before[..wire.len()], &wire[..], "a decoded frame re-encodes to its bytes");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
