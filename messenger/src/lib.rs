//! cuttle's AsyncMessenger: how every daemon and client talks.
//!
//! Layers, bottom up:
//! - [`frame`]: the wire format (banner, self-checksummed preamble, crc'd segments) and the transmit queue;
//!   [`crc`]: crcs computed once and reused ([`CrcBytes`]).
//! - [`session`]: the connection state machine — handshake, lossless resend, reconnect, reset, connect races,
//!   keepalive. It does no IO and reads no clock, so it is tested without sockets.
//! - `worker`: the mio shell. A [`WorkerPool`] of event-loop threads, shared by every messenger in a process,
//!   owns all sockets and moves bytes between them and the state machines. It also serves [`Guest`]s, event
//!   sources of other protocols (the NBD server), on the same threads.
//! - [`Messenger`]: the API (bind, start, ready, connect, send, mark_down, shutdown, wait), policies,
//!   throttles and dispatch.
//!
//! What it deliberately is not: it does not interpret message bodies (upper layers encode them with postcard),
//! does not encrypt (a secure mode can slot in at the frame layer later), and does not retry at the
//! application level (a lossy session's fault is reported, not hidden).

pub mod config;
mod counters;
pub mod crc;
pub mod entity;
pub mod frame;
pub mod message;
mod messenger;
pub mod policy;
pub mod session;
pub mod throttle;
pub mod util;
mod worker;

pub use config::MessengerConfig;
pub use counters::CountersSnapshot;
pub use crc::CrcBytes;
pub use entity::{EntityName, EntityType, PeerKey};
pub use message::Message;
pub use messenger::{Connection, Dispatcher, Messenger, MessengerError, Refused, SendError, BUSY_RETRY};
pub use policy::Policy;
pub use worker::{
    never_wait_on_this_thread, Guest, GuestEvent, GuestHandle, ReadReadiness, WorkerPool, TASK_QUEUE_MAX,
    WORKERS_DEFAULT, WORKERS_MAX,
};
