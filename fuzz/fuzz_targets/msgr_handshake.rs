//! Drives the accept-side handshake (Acceptor) and, when it identifies a peer, a server Session adopting it,
//! with arbitrary peer bytes in arbitrary chunks. Neither may panic, whatever the peer sends.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use messenger::entity::EntityName;
use messenger::frame::FrameLimits;
use messenger::session::{Acceptor, Session, SessionConfig};
use messenger::Policy;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let now = Instant::now();
    let limits = FrameLimits { front_bytes_max: 1 << 16, data_bytes_max: 1 << 20 };
    let mut acc = Acceptor::new(now, Duration::from_secs(1), limits);
    let mut pieces = rest.chunks(chunk);
    let (req, rx) = loop {
        let Some(p) = pieces.next() else { return };
        acc.rx().extend_from_slice(p);
        acc.process_input();
        match acc.take_outcome() {
            None => continue,
            Some(Err(_)) => return,
            Some(Ok(x)) => break x,
        }
    };
    let cfg = SessionConfig {
        my_name: EntityName::osd(0),
        my_addr: Some(([127, 0, 0, 1], 6800).into()),
        my_nonce: 1,
        policy: if chunk % 2 == 0 { Policy::stateful_server() } else { Policy::stateless_server() },
        limits,
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        keepalive_interval: Some(Duration::from_secs(1)),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        outgoing_bytes_soft_max: 1 << 20,
        standby_timeout: Duration::from_secs(900),
    };
    let mut s = Session::accept(cfg, 7, now);
    let _ = s.adopt(now, req, rx);
    let mut t = now;
    for p in pieces {
        t += Duration::from_millis(100);
        if s.read_hint().is_some() {
            s.rx().extend_from_slice(p);
            s.process_input(t);
        }
        if s.grant_wanted().is_some() {
            s.give_grant(t, messenger::throttle::ThrottleGrant::try_take(&[], 1, 0).expect("no throttles"));
        }
        s.flush_acks(t);
        let _ = s.tx().take_all();
        while s.poll_output().is_some() {}
        s.handle_timeout(t);
    }
});
