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
    /// Send throttle: `Connection::send_message` blocks while this many bytes are queued or unacknowledged on
    /// the connection (0 = unlimited). It keeps a fast producer's memory bounded.
    pub send_throttle_bytes: u64,
}

impl Policy {
    const fn base(lossy: bool, server: bool, standby: bool, resetcheck: bool) -> Policy {
        Policy {
            lossy,
            server,
            standby,
            resetcheck,
            throttle_messages: 0,
            throttle_bytes: 0,
            send_throttle_bytes: 0,
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

    pub const fn with_send_throttle(mut self, bytes: u64) -> Policy {
        self.send_throttle_bytes = bytes;
        self
    }
}
