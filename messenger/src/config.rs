//! Messenger settings, with Ceph's defaults where Ceph has the option (names in the comments).

use std::time::Duration;

use crate::frame::FrameLimits;

#[derive(Clone, Debug)]
pub struct MessengerConfig {
    /// Segment limits for received frames (a message's front and data).
    pub limits: FrameLimits,
    /// A handshake (connect, banner, ident) must finish within this (ms_connection_ready_timeout, 10 s).
    pub connect_timeout: Duration,
    /// A session that receives nothing for this long, or cannot write for this long, is faulted. Ceph's
    /// ms_connection_idle_timeout is 900 s; we keep connections alive with keepalives instead and detect a dead
    /// peer in a minute.
    pub idle_timeout: Duration,
    /// Keepalives on open sessions, which also measure the round-trip time. None disables them.
    pub keepalive_interval: Option<Duration>,
    /// Reconnect backoff, doubling from initial to max (ms_initial_backoff 0.2 s, ms_max_backoff 15 s).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Messenger-wide bytes held by dispatch (ms_dispatch_throttle_bytes, 100 MiB).
    pub dispatch_throttle_bytes: u64,
    /// How long `Connection::send_message` may wait, off the workers, for room under a lossless connection's
    /// outgoing bound (`Policy::send_bytes_max`) before it refuses the message.
    pub send_timeout: Duration,
    /// A serving session stops reading from its client while this many bytes wait to be written to it.
    pub outgoing_bytes_soft_max: usize,
    /// A lossless session left without a socket (waiting for its peer to come back) this long is closed
    /// (Ceph's ms_connection_idle_timeout, 900 s).
    pub standby_timeout: Duration,
    /// Fail every Nth socket read or write on this messenger's sockets (ms_inject_socket_failures; 0 = off).
    pub inject_socket_failures: u64,
    pub tcp_nodelay: bool,
    /// Listen backlog (ms_tcp_listen_backlog, 512).
    pub listen_backlog: i32,
}

impl Default for MessengerConfig {
    fn default() -> Self {
        MessengerConfig {
            limits: FrameLimits::default(),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Some(Duration::from_secs(5)),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(15),
            dispatch_throttle_bytes: 100 << 20,
            send_timeout: Duration::from_secs(60),
            outgoing_bytes_soft_max: 64 << 20,
            standby_timeout: Duration::from_secs(900),
            inject_socket_failures: 0,
            tcp_nodelay: true,
            listen_backlog: 512,
        }
    }
}
