//! Per-messenger counters, readable through the API.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub $name: AtomicU64,)* }

        /// A snapshot of a messenger's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct CountersSnapshot { $(#[doc = $doc] pub $name: u64,)* }

        impl Counters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    bytes_in: "Bytes read from sockets.",
    bytes_out: "Bytes written to sockets.",
    msgs_in: "Messages delivered to dispatchers.",
    msgs_out: "Messages queued for sending.",
    faults: "Sockets closed by a fault (error, bad input, timeout).",
    reconnects: "Sessions resumed on a new socket.",
    resent: "Messages written again after a reconnect.",
    remote_resets: "Sessions whose peer lost its state.",
    resets: "Lossy sessions ended by a fault.",
    accepts: "Sockets accepted.",
    connects: "Sockets opened.",
    throttle_stalls: "Times a connection stopped reading for lack of throttle budget.",
    injected_faults: "Socket operations failed on purpose (inject_socket_failures).",
    dispatch_busy: "Times a dispatcher said it was busy for a message (it is offered again later).",
    send_backlog_faults: "Lossy sessions faulted because a send found their outgoing bytes at the bound.",
    send_overruns: "Messages a worker queued on a lossless connection already at its outgoing bound.",
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}
