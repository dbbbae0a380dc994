//! Goal: no byte sequence from a client makes the NBD server session panic, hang, or break its own limits.
//! Method: feed arbitrary bytes in fuzzer-chosen chunks to a `ServerSession` with one export, answer every
//! request at once (reads with data of the right length, a fuzzer-chosen share with errors), drain every
//! transmit, and check the session's invariants after each step.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rbd::nbd::{
    wire, Event, ExportCatalog, ExportInfo, NbdError, RequestKind, ServerSession, REQUESTS_IN_FLIGHT_MAX,
};

/// Client flags plus NBD_OPT_GO for "disk", so the fuzzer reaches transmission without discovering the
/// handshake itself.
fn handshake_prefix() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&wire::FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&wire::OPT_GO.to_be_bytes());
    out.extend_from_slice(&(4u32 + 4 + 2).to_be_bytes());
    out.extend_from_slice(&4u32.to_be_bytes());
    out.extend_from_slice(b"disk");
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: bit 0 prepends the handshake, bit 1 negotiates structured replies first, bits 2..=6 pick the
    // chunk size, bit 7 makes the export read-only; byte 1 decides which requests fail.
    let (control, fail_mask, input) = match data {
        [control, fail_mask, rest @ ..] => (*control, *fail_mask, rest),
        _ => return,
    };
    let mut stream = Vec::new();
    if control & 1 != 0 {
        let prefix = handshake_prefix();
        if control & 2 != 0 {
            // Structured replies go between the client flags and the GO.
            stream.extend_from_slice(&prefix[..4]);
            stream.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
            stream.extend_from_slice(&wire::OPT_STRUCTURED_REPLY.to_be_bytes());
            stream.extend_from_slice(&0u32.to_be_bytes());
            stream.extend_from_slice(&prefix[4..]);
        } else {
            stream.extend_from_slice(&prefix);
        }
    }
    stream.extend_from_slice(input);
    let chunk = usize::from((control >> 2) & 0x1f) + 1;

    let catalog = ExportCatalog::new(vec![ExportInfo {
        name: "disk".into(),
        size_bytes: 1 << 20,
        read_only: control & 0x80 != 0,
        can_multi_conn: true,
        description: "fuzz".into(),
    }])
    .expect("a valid catalog");
    let mut session = ServerSession::new(Arc::new(catalog));
    let mut answered = 0u32;
    for piece in stream.chunks(chunk) {
        session.received(piece);
        while let Some(event) = session.poll_event() {
            if let Event::Request { id, kind, .. } = event {
                let fail = fail_mask & (1 << (answered % 8)) != 0;
                answered += 1;
                let result = match kind {
                    _ if fail => Err(NbdError::Io),
                    RequestKind::Read { len, .. } => Ok(Some(vec![0u8; len as usize].into())),
                    _ => Ok(None),
                };
                session.reply(id, result).expect("replies are well formed");
            }
        }
        while session.poll_transmit().is_some() {}
        assert!(session.in_flight() <= REQUESTS_IN_FLIGHT_MAX);
        assert_eq!(session.transmit_backlog_bytes(), 0);
    }
});
