//! Connection policies per peer type, as Ceph's `Policy.h`.

/// How a session behaves on faults and who reconnects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// A fault ends the session: queued and unacknowledged messages are dropped, the dispatcher gets
    /// `handle_reset`. Otherwise every message is kept until acknowledged and resent after a reconnect.
    pub lossy: bool,
    /// This side never initiates a (re)connect; after a fault it waits for the peer (Ceph's STANDBY).
    pub server: bool,
    /// A lossless connecting side with nothing to send waits in standby instead of reconnecting at once.
    pub standby: bool,
    /// Detect a restarted peer and report it (`handle_remote_reset`).
    pub resetcheck: bool,
    /// Receive throttle for messages from peers of this type: at most this many messages and bytes are held by
    /// the upper layers at once (0 = unlimited).
    pub throttle_messages: u64,
    pub throttle_bytes: u64,
    /// The most payload bytes a connection holds for sending: queued and not yet written to the socket (lossy),
    /// or not yet acknowledged by the peer (lossless). Never 0. What a sender meets at the bound depends on the
    /// session (see `Connection::send_message`): a lossy session fails the send and is faulted; a lossless one
    /// makes a non-worker sender wait (up to the messenger's `send_timeout`) and lets a worker thread, which must
    /// never wait, go over it (counted as `send_overruns`).
    pub send_bytes_max: u64,
}

/// Outgoing bound of a lossy session (clients, the monitor's sessions, the client-facing side of an OSD): the
/// same as the most a client may have an OSD hold for it the other way (Ceph's osd_client_message_size_cap,
/// 500 MiB). Reached only by a peer that stops reading what it asked for; it is then cut off.
pub const LOSSY_SEND_BYTES_MAX: u64 = 500 << 20;
/// Outgoing bound of a lossless session (daemon peers): twice the client bound, so that replicating everything
/// clients may have in flight to one replica (one client bound's worth) fits, with room for recovery pushes.
pub const LOSSLESS_SEND_BYTES_MAX: u64 = 1 << 30;

impl Policy {
    const fn base(lossy: bool, server: bool, standby: bool, resetcheck: bool) -> Policy {
        Policy {
            lossy,
            server,
            standby,
            resetcheck,
            throttle_messages: 0,
            throttle_bytes: 0,
            send_bytes_max: if lossy { LOSSY_SEND_BYTES_MAX } else { LOSSLESS_SEND_BYTES_MAX },
        }
    }
    /// A client whose sessions end on the first fault (e.g. heartbeat clients, the Objecter).
    pub const fn lossy_client() -> Policy {
        Policy::base(true, false, false, false)
    }
    /// A client that reconnects and resends until everything is acknowledged.
    pub const fn lossless_client() -> Policy {
        Policy::base(false, false, false, true)
    }
    /// Daemon-to-daemon: either side reconnects when it has something to send.
    pub const fn lossless_peer() -> Policy {
        Policy::base(false, false, true, false)
    }
    /// Serves lossless clients: keeps the session across faults and waits for the client to come back.
    pub const fn stateful_server() -> Policy {
        Policy::base(false, true, true, true)
    }
    /// Serves lossy clients: a fault ends the session.
    pub const fn stateless_server() -> Policy {
        Policy::base(true, true, false, false)
    }

    pub const fn with_throttle(mut self, messages: u64, bytes: u64) -> Policy {
        self.throttle_messages = messages;
        self.throttle_bytes = bytes;
        self
    }

    /// Another outgoing bound than the default ([`LOSSY_SEND_BYTES_MAX`], [`LOSSLESS_SEND_BYTES_MAX`]).
    pub const fn with_send_bytes_max(mut self, bytes: u64) -> Policy {
        assert!(bytes > 0, "every connection's outgoing bytes are bounded");
        self.send_bytes_max = bytes;
        self
    }
}
