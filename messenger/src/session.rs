//! The connection state machine: handshake, session establishment, lossless resend, reconnect, reset, connect
//! races and keepalive. It does no IO and reads no clock: the shell feeds it bytes, socket events and `now`, and
//! drains its transmit queue and outputs (STYLE.md §2).
//!
//! Two machines live here:
//! - [`Acceptor`] runs on a freshly accepted socket until the peer has said who it is (banner, then a
//!   `ClientIdent` or `SessionReconnect` frame). The shell then routes the socket to the peer's [`Session`].
//! - [`Session`] is one logical connection to one peer. It outlives sockets: a lossless session keeps every
//!   sent message until the peer acknowledges it and resends the rest, in order, on the next socket.
//!
//! Sequence numbers: every message gets `seq = out_seq + 1` when first written and keeps it across resends; the
//! receiver delivers `seq == in_seq + 1`, drops `seq <= in_seq` (a resent duplicate) and faults on a gap.
//! Acks ride in every message header (`ack_seq`) and in an explicit `Ack` frame when there is nothing else to
//! send. Cookies identify a session incarnation on each side; `connect_seq` counts successful reconnects and
//! `global_seq` counts connect attempts, so a stale or duplicate attempt can be told to retry.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::entity::{EntityName, PeerKey};
use crate::frame::{self, Frame, FrameError, FrameLimits, RxBuf, Tag, TxQueue, BANNER_BYTES};
use crate::message::{Message, MsgHeader};
use crate::policy::Policy;
use crate::throttle::ThrottleGrant;

/// Bytes the shell reads ahead beyond the frame in progress.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;
/// A lossy session sends an ack frame of its own only after this many messages not acknowledged otherwise
/// (see [`Session::flush_acks`]).
pub const LOSSY_ACK_EVERY: u64 = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientIdent {
    pub name: EntityName,
    /// Where the sender listens, if it does (clients do not).
    pub addr: Option<SocketAddr>,
    pub nonce: u64,
    pub cookie: u64,
    pub global_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIdent {
    pub name: EntityName,
    pub addr: Option<SocketAddr>,
    pub nonce: u64,
    pub cookie: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReconnect {
    pub name: EntityName,
    pub addr: Option<SocketAddr>,
    pub nonce: u64,
    /// The sender's cookie and the cookie it knows for the receiver.
    pub cookie: u64,
    pub peer_cookie: u64,
    pub global_seq: u64,
    pub connect_seq: u64,
    /// The last sequence number the sender received: the receiver drops everything up to it.
    pub in_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectOk {
    pub in_seq: u64,
    pub connect_seq: u64,
}

/// What a freshly accepted socket's peer asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeRequest {
    Fresh(ClientIdent),
    Reconnect(SessionReconnect),
}

impl HandshakeRequest {
    pub fn peer_name(&self) -> EntityName {
        match self {
            HandshakeRequest::Fresh(c) => c.name,
            HandshakeRequest::Reconnect(r) => r.name,
        }
    }

    pub fn peer_key(&self) -> PeerKey {
        let (name, addr, nonce) = match self {
            HandshakeRequest::Fresh(c) => (c.name, c.addr, c.nonce),
            HandshakeRequest::Reconnect(r) => (r.name, r.addr, r.nonce),
        };
        match addr {
            Some(a) => PeerKey::Listening(a),
            None => PeerKey::Anonymous(name, nonce),
        }
    }
}

/// Why a socket was closed; logged and counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Frame(FrameError),
    Protocol(&'static str),
    PeerClosed,
    SocketError(String),
    HandshakeTimeout,
    IdleTimeout,
    PeerNotReading,
    /// A lossy peer left more unread than its outgoing bound (`Policy::send_bytes_max`).
    SendBacklog,
    Replaced,
    RejectedHandshake(&'static str),
    MarkedDown,
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Frame(e) => write!(f, "bad frame: {e}"),
            CloseReason::Protocol(s) => write!(f, "protocol error: {s}"),
            CloseReason::PeerClosed => write!(f, "peer closed the socket"),
            CloseReason::SocketError(e) => write!(f, "socket error: {e}"),
            CloseReason::HandshakeTimeout => write!(f, "handshake did not complete in time"),
            CloseReason::IdleTimeout => write!(f, "nothing received within the idle timeout"),
            CloseReason::PeerNotReading => write!(f, "peer stopped reading"),
            CloseReason::SendBacklog => write!(f, "peer left more unread than the outgoing bound"),
            CloseReason::Replaced => write!(f, "replaced by a newer socket for the same session"),
            CloseReason::RejectedHandshake(s) => write!(f, "handshake answered with {s}"),
            CloseReason::MarkedDown => write!(f, "marked down"),
            CloseReason::Shutdown => write!(f, "messenger shut down"),
        }
    }
}

/// Settings a session needs; the shell fills them from the messenger's config.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub my_name: EntityName,
    pub my_addr: Option<SocketAddr>,
    pub my_nonce: u64,
    pub policy: Policy,
    pub limits: FrameLimits,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Option<Duration>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Stop reading from the peer while this many bytes wait to be written to it.
    pub outgoing_bytes_soft_max: usize,
    /// A session left without a socket this long is closed.
    pub standby_timeout: Duration,
}

/// What the session asks of the shell or tells the upper layer.
#[derive(Debug)]
pub enum Output {
    /// Open a new socket to the peer (connecting side).
    OpenSocket,
    /// Close the current socket.
    CloseSocket(CloseReason),
    /// The session is established on a socket (`reconnected`: an existing session resumed).
    Ready {
        reconnected: bool,
    },
    Message(Message),
    /// A lossy session ended on a fault: everything queued was dropped (dispatcher `handle_reset`).
    Reset,
    /// The peer lost its session state (it restarted, or reset us): queued messages were dropped
    /// (dispatcher `handle_remote_reset`).
    RemoteReset,
    /// Messages with this many payload bytes left the session: acknowledged (lossless), written to the socket
    /// (lossy), or dropped by a reset. The connection's outgoing bound gets them back.
    Released {
        messages: u64,
        bytes: u64,
    },
    /// This many messages were written again after a reconnect.
    Resent(u64),
    /// The session is over; the shell forgets it.
    Closed,
}

/// The verdict on a handshake request routed to a session.
#[derive(Debug)]
pub enum Adoption {
    /// The session took the socket; the shell closes the session's previous socket, if any, and attaches this
    /// one. The reply is already in the session's transmit queue.
    Adopted,
    /// The socket gets these bytes (a Wait, Retry or Reset frame) and is then closed.
    Rejected { reply: Vec<u8>, reason: &'static str },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Connecting side, waiting for the shell to report the TCP connect.
    Connecting,
    /// Our banner is out; waiting for the peer's banner.
    Banner,
    /// Our ident or reconnect is out; waiting for the peer's answer.
    Ident,
    Open,
    /// Waiting to reconnect.
    Backoff,
    /// Lossless, no socket, waiting for the peer or for something to send.
    Standby,
    /// Lost a connect race: waiting for the peer's connection to arrive (with a timer in case it never does).
    Wait,
    Closed,
}

/// One logical connection to one peer.
pub struct Session {
    cfg: SessionConfig,
    /// Where to connect to, for the connecting side.
    peer_addr: Option<SocketAddr>,
    peer_name: Option<EntityName>,
    state: State,
    /// Creation time: keepalive stamps are nanoseconds since this instant.
    epoch: Instant,

    my_cookie: u64,
    peer_cookie: u64,
    global_seq: u64,
    peer_global_seq: u64,
    connect_seq: u64,
    /// The session was established at least once with the current cookies (so a reconnect is possible).
    established: bool,

    out_seq: u64,
    in_seq: u64,
    acked_seq_sent: u64,
    /// Not yet written on the current socket, in order; resends come first with their seqs kept.
    out: VecDeque<Message>,
    /// Written but not acknowledged (lossless only).
    sent: VecDeque<Message>,

    rx: RxBuf,
    tx: TxQueue,
    /// Lossy messages in `tx`: the stream position just past each one's frame and its payload bytes. A lossy
    /// message leaves the session's outgoing bytes (`Output::Released`) once its frame has left `tx`.
    lossy_in_tx: VecDeque<(u64, u64)>,
    grant: Option<ThrottleGrant>,
    grant_wanted: Option<usize>,
    /// The upper layer cannot take a message now ([`Session::hold_input`]): nothing is read meanwhile.
    input_held: bool,

    handshake_deadline: Option<Instant>,
    retry_at: Option<Instant>,
    standby_since: Option<Instant>,
    backoff: Duration,
    last_rx: Instant,
    last_tx_progress: Instant,
    next_keepalive: Option<Instant>,
    rtt: Option<Duration>,

    outputs: VecDeque<Output>,
}

impl Session {
    /// A session that will connect to `peer_addr` (it asks for a socket at once).
    pub fn connect(cfg: SessionConfig, peer_addr: SocketAddr, cookie: u64, now: Instant) -> Session {
        let mut s = Session::new(cfg, Some(peer_addr), cookie, now);
        s.open_socket(now);
        s
    }

    /// A session created for a peer that connected to us; the shell calls [`Session::adopt`] next.
    pub fn accept(cfg: SessionConfig, cookie: u64, now: Instant) -> Session {
        let mut s = Session::new(cfg, None, cookie, now);
        s.enter_standby(now);
        s
    }

    fn new(cfg: SessionConfig, peer_addr: Option<SocketAddr>, cookie: u64, now: Instant) -> Session {
        assert!(cookie != 0, "cookie 0 means 'none' on the wire");
        let backoff = cfg.initial_backoff;
        Session {
            cfg,
            peer_addr,
            peer_name: None,
            state: State::Standby,
            epoch: now,
            my_cookie: cookie,
            peer_cookie: 0,
            global_seq: 0,
            peer_global_seq: 0,
            connect_seq: 0,
            established: false,
            out_seq: 0,
            in_seq: 0,
            acked_seq_sent: 0,
            out: VecDeque::new(),
            sent: VecDeque::new(),
            rx: RxBuf::new(),
            tx: TxQueue::new(),
            lossy_in_tx: VecDeque::new(),
            grant: None,
            grant_wanted: None,
            input_held: false,
            handshake_deadline: None,
            retry_at: None,
            standby_since: None,
            backoff,
            last_rx: now,
            last_tx_progress: now,
            next_keepalive: None,
            rtt: None,
            outputs: VecDeque::new(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn peer_name(&self) -> Option<EntityName> {
        self.peer_name
    }
    pub fn policy(&self) -> &Policy {
        &self.cfg.policy
    }
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }
    pub fn in_seq(&self) -> u64 {
        self.in_seq
    }
    pub fn out_seq(&self) -> u64 {
        self.out_seq
    }
    /// Messages queued or awaiting acknowledgement.
    pub fn unacked_messages(&self) -> usize {
        self.out.len() + self.sent.len()
    }
    pub fn tx(&mut self) -> &mut TxQueue {
        &mut self.tx
    }
    pub fn rx(&mut self) -> &mut RxBuf {
        &mut self.rx
    }
    pub fn has_socket(&self) -> bool {
        matches!(self.state, State::Banner | State::Ident | State::Open)
    }

    /// Whether the shell should read more from the socket now, and how much room to reserve.
    pub fn read_hint(&self) -> Option<usize> {
        if !self.has_socket() || self.grant_wanted.is_some() || self.input_held {
            return None;
        }
        if self.backlogged() {
            return None;
        }
        let frame_rest = frame::peek_preamble(self.rx.data(), &self.cfg.limits)
            .ok()
            .flatten()
            .map_or(0, |p| p.frame_bytes().saturating_sub(self.rx.len()));
        Some(frame_rest.max(READ_AHEAD_BYTES))
    }

    /// So much waits to be written to a client that we stop reading its requests until it reads our answers.
    /// Only the serving side of a session holds back: if both sides of a session did (a client with many large
    /// requests queued, or two OSDs replicating to each other), each would wait for the other to read first, a
    /// deadlock. A connecting side's own queue is bounded by its send throttle and its upper layer.
    fn backlogged(&self) -> bool {
        self.cfg.policy.server && self.tx.queued_bytes() >= self.cfg.outgoing_bytes_soft_max
    }

    /// We are not reading on purpose (backlog or throttle): the peer's silence is our doing, so the receive idle
    /// clock does not run.
    fn holding_back(&self) -> bool {
        self.backlogged() || self.grant_wanted.is_some() || self.input_held
    }

    /// The upper layer cannot take another message now (a dispatcher said it is busy and the shell keeps that
    /// message): read nothing until released, and do not count the peer's silence meanwhile. Survives socket
    /// faults: the kept message was received (and may be acknowledged) and is still to be delivered.
    pub fn hold_input(&mut self, now: Instant, held: bool) {
        if self.input_held && !held {
            // Reading resumes: the receive idle clock, stopped while we held back, starts again.
            self.last_rx = now;
        }
        self.input_held = held;
    }

    pub fn input_held(&self) -> bool {
        self.input_held
    }

    /// Payload bytes of the message frame waiting for throttle budget.
    pub fn grant_wanted(&self) -> Option<usize> {
        self.grant_wanted
    }

    pub fn give_grant(&mut self, now: Instant, g: ThrottleGrant) {
        assert!(self.grant_wanted.is_some() && self.grant.is_none());
        self.grant_wanted = None;
        self.grant = Some(g);
        // Reading resumes: the receive idle clock, stopped while we waited for budget, starts again.
        self.last_rx = now;
        self.process_input(now);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next instant `handle_timeout` must run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        match self.state {
            State::Banner | State::Ident => consider(self.handshake_deadline),
            State::Connecting => consider(self.handshake_deadline),
            State::Open => {
                consider(self.next_keepalive);
                // While we hold back from reading, the peer's silence is our doing: only writing is timed.
                if !self.holding_back() {
                    consider(Some(self.last_rx + self.cfg.idle_timeout));
                }
                if !self.tx.is_empty() {
                    consider(Some(self.last_tx_progress + self.cfg.idle_timeout));
                }
            }
            State::Backoff | State::Wait => consider(self.retry_at),
            State::Standby => consider(self.standby_since.map(|t| t + self.cfg.standby_timeout)),
            State::Closed => {}
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Connecting | State::Banner | State::Ident => {
                if self.handshake_deadline.is_some_and(|d| now >= d) {
                    self.fault(now, CloseReason::HandshakeTimeout);
                }
            }
            State::Open => {
                if !self.holding_back() && now >= self.last_rx + self.cfg.idle_timeout {
                    self.fault(now, CloseReason::IdleTimeout);
                } else if !self.tx.is_empty() && now >= self.last_tx_progress + self.cfg.idle_timeout {
                    self.fault(now, CloseReason::PeerNotReading);
                } else if self.next_keepalive.is_some_and(|k| now >= k) {
                    self.send_keepalive(now);
                }
            }
            State::Backoff | State::Wait => {
                if self.retry_at.is_some_and(|r| now >= r) {
                    self.retry_at = None;
                    self.open_socket(now);
                }
            }
            State::Standby => {
                if self.standby_since.is_some_and(|t| now >= t + self.cfg.standby_timeout) {
                    // Nobody came back for this session: forget it rather than keep it forever (a peer that
                    // handshakes with random identities must not accumulate sessions).
                    tracing::info!(peer = %crate::entity::shown_peer(self.peer_name), "standby session expired");
                    self.drop_queues();
                    self.state = State::Closed;
                    self.outputs.push_back(Output::Reset);
                    self.outputs.push_back(Output::Closed);
                }
            }
            State::Closed => {}
        }
    }

    // ---- upper-layer requests ----

    pub fn queue_message(&mut self, now: Instant, mut m: Message) {
        if self.state == State::Closed {
            self.release(&[m]);
            return;
        }
        assert!(m.seq == 0, "a new message carries no sequence number yet");
        m.grant = None;
        self.out.push_back(m);
        match self.state {
            State::Open => self.write_pending(now),
            State::Standby if !self.cfg.policy.server && self.peer_addr.is_some() => self.open_socket(now),
            _ => {}
        }
    }

    pub fn send_keepalive(&mut self, now: Instant) {
        if self.state == State::Open {
            let stamp = now.duration_since(self.epoch).as_nanos() as u64;
            self.push_control(now, Tag::Keepalive, &stamp);
        }
        self.next_keepalive = self.cfg.keepalive_interval.map(|i| now + i);
    }

    /// A send found this lossy session's outgoing bytes at their bound: the peer is not reading what it asked
    /// for. The session faults (dropping what is queued, reporting a reset) rather than hold more for it.
    pub fn send_backlog_fault(&mut self, now: Instant) {
        assert!(self.cfg.policy.lossy, "a lossless session never drops what it accepted");
        if self.state != State::Closed {
            self.fault(now, CloseReason::SendBacklog);
        }
    }

    /// Ends the session at once; nothing more is sent or delivered.
    pub fn mark_down(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        if self.has_socket() || self.state == State::Connecting {
            self.outputs.push_back(Output::CloseSocket(reason));
        }
        self.drop_queues();
        self.state = State::Closed;
        self.outputs.push_back(Output::Closed);
    }

    // ---- socket events ----

    /// The TCP connect the session asked for completed.
    pub fn socket_connected(&mut self, now: Instant) {
        if self.state != State::Connecting {
            return;
        }
        self.rx.clear();
        self.clear_tx();
        self.tx.push_raw(&frame::encode_banner());
        self.state = State::Banner;
        self.last_rx = now;
        self.last_tx_progress = now;
    }

    /// The socket failed or the peer closed it.
    pub fn socket_closed(&mut self, now: Instant, reason: CloseReason) {
        if matches!(self.state, State::Connecting | State::Banner | State::Ident | State::Open) {
            self.fault(now, reason);
        }
    }

    /// `n` bytes of the transmit queue were written.
    pub fn wrote(&mut self, now: Instant, n: usize) {
        let was_backlogged = self.backlogged();
        self.tx.advance(n);
        if n > 0 {
            self.last_tx_progress = now;
        }
        self.release_lossy_sent();
        if was_backlogged && !self.backlogged() {
            // Reading resumes: the receive idle clock, stopped while we did not read, starts again, and the
            // messages already buffered are now decoded.
            self.last_rx = now;
            self.process_input(now);
        }
    }

    /// Consumes whatever complete frames the receive buffer holds.
    pub fn process_input(&mut self, now: Instant) {
        if !self.rx.is_empty() {
            self.last_rx = now;
        }
        loop {
            match self.state {
                State::Banner => {
                    if self.rx.len() < BANNER_BYTES {
                        break;
                    }
                    let b = self.rx.split_to(BANNER_BYTES);
                    if let Err(e) = frame::decode_banner(b[..].try_into().expect("banner length")) {
                        self.fault(now, CloseReason::Frame(e));
                        break;
                    }
                    self.send_ident(now);
                    self.state = State::Ident;
                }
                State::Ident | State::Open => {
                    match frame::peek_preamble(self.rx.data(), &self.cfg.limits) {
                        Err(e) => {
                            self.fault(now, CloseReason::Frame(e));
                            break;
                        }
                        Ok(None) => break,
                        Ok(Some(p)) if p.tag == Tag::Message && self.grant.is_none() => {
                            if self.state != State::Open {
                                self.fault(now, CloseReason::Protocol("message before the session is open"));
                                break;
                            }
                            if self.backlogged() {
                                // Do not take more requests from a peer that is not reading our answers,
                                // even ones already buffered; `wrote` resumes once the backlog drains.
                                break;
                            }
                            self.grant_wanted = Some(p.payload_bytes());
                            break;
                        }
                        Ok(Some(_)) => {}
                    }
                    match frame::decode_frame(&mut self.rx, &self.cfg.limits) {
                        Err(e) => {
                            self.fault(now, CloseReason::Frame(e));
                            break;
                        }
                        Ok(None) => break,
                        Ok(Some(f)) => {
                            if let Err(reason) = self.handle_frame(now, f) {
                                self.fault(now, reason);
                                break;
                            }
                        }
                    }
                }
                _ => break,
            }
        }
        if self.state == State::Open {
            self.write_pending(now);
        }
    }

    /// Acknowledges what was received if no message is going out to carry the ack. The shell calls this just
    /// before it writes, after upper layers had their chance to answer inline, so a request-reply exchange
    /// costs one frame each way, not two.
    ///
    /// A lossy session acknowledges on its own only every [`LOSSY_ACK_EVERY`] messages (and with each
    /// keepalive answer): its peer is lossy too (policies pair that way) and drops a message once written, so
    /// the ack trims nothing there. A standalone ack to such a peer only woke it up to read the ack: a client
    /// that gets replies from one OSD and sends its next ops to others made every OSD wake once more per batch.
    /// The rare acks keep a peer that does keep messages (a misconfigured lossless one) bounded.
    pub fn flush_acks(&mut self, now: Instant) {
        let owed = self.in_seq.saturating_sub(self.acked_seq_sent);
        if self.state == State::Open && owed > 0 && (!self.cfg.policy.lossy || owed >= LOSSY_ACK_EVERY) {
            self.send_ack(now);
        }
    }

    fn send_ack(&mut self, now: Instant) {
        let seq = self.in_seq;
        self.push_control(now, Tag::Ack, &seq);
        self.acked_seq_sent = seq;
    }

    fn handle_frame(&mut self, now: Instant, f: Frame) -> Result<(), CloseReason> {
        let bad = CloseReason::Frame;
        match (self.state, f.tag) {
            (State::Ident, Tag::ServerIdent) => {
                let si: ServerIdent = f.payload().map_err(bad)?;
                if self.established && si.cookie != self.peer_cookie {
                    return Err(CloseReason::Protocol("server ident answered a reconnect"));
                }
                self.peer_name = Some(si.name);
                self.peer_cookie = si.cookie;
                self.open(now, false);
            }
            (State::Ident, Tag::SessionReconnectOk) => {
                let ok: ReconnectOk = f.payload().map_err(bad)?;
                if !self.established {
                    return Err(CloseReason::Protocol("reconnect ok without a session"));
                }
                self.connect_seq = ok.connect_seq;
                self.discard_acked(ok.in_seq);
                self.open(now, true);
            }
            (State::Ident, Tag::SessionReset) => {
                tracing::info!(peer = %crate::entity::shown_peer(self.peer_name), "peer has no session for us: resetting");
                self.reset_session(true);
                self.reconnect_now(now, CloseReason::RejectedHandshake("SessionReset"));
            }
            (State::Ident, Tag::SessionRetry) => {
                let cs: u64 = f.payload().map_err(bad)?;
                self.connect_seq = cs;
                self.reconnect_now(now, CloseReason::RejectedHandshake("SessionRetry"));
            }
            (State::Ident, Tag::SessionRetryGlobal) => {
                let gs: u64 = f.payload().map_err(bad)?;
                self.global_seq = self.global_seq.max(gs);
                self.reconnect_now(now, CloseReason::RejectedHandshake("SessionRetryGlobal"));
            }
            (State::Ident, Tag::Wait) => {
                self.outputs.push_back(Output::CloseSocket(CloseReason::RejectedHandshake("Wait")));
                self.requeue_sent();
                self.clear_tx();
                self.state = State::Wait;
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
            }
            (State::Open, Tag::Message) => {
                let h =
                    MsgHeader::decode(&f.segments[0]).ok_or(CloseReason::Protocol("bad message header"))?;
                let grant = self.grant.take();
                self.discard_acked(h.ack_seq);
                if h.seq <= self.in_seq {
                    tracing::trace!(seq = h.seq, in_seq = self.in_seq, "dropping duplicate");
                    return Ok(());
                }
                if h.seq != self.in_seq + 1 {
                    return Err(CloseReason::Protocol("message sequence gap"));
                }
                self.in_seq = h.seq;
                let [_, front, data] = f.segments;
                self.outputs.push_back(Output::Message(Message {
                    msg_type: h.msg_type,
                    priority: h.priority,
                    tid: h.tid,
                    front,
                    data,
                    data_crcs: f.data_crcs,
                    data_more: Vec::new(),
                    seq: h.seq,
                    grant,
                }));
            }
            (State::Open, Tag::Ack) => {
                let seq: u64 = f.payload().map_err(bad)?;
                self.discard_acked(seq);
            }
            (State::Open, Tag::Keepalive) => {
                let stamp: u64 = f.payload().map_err(bad)?;
                self.push_control(now, Tag::KeepaliveAck, &stamp);
                if self.in_seq > self.acked_seq_sent {
                    self.send_ack(now);
                }
            }
            (State::Open, Tag::KeepaliveAck) => {
                let stamp: u64 = f.payload().map_err(bad)?;
                let sent_at = self.epoch + Duration::from_nanos(stamp);
                if sent_at > now {
                    return Err(CloseReason::Protocol("keepalive ack from the future"));
                }
                self.rtt = Some(now - sent_at);
            }
            (_, _) => return Err(CloseReason::Protocol("unexpected frame for the session state")),
        }
        Ok(())
    }

    /// Routes a handshake from a freshly accepted socket to this session.
    pub fn adopt(&mut self, now: Instant, req: HandshakeRequest, rx: RxBuf) -> Adoption {
        let reject = |tag: Tag, payload: &dyn erased::Payload, reason: &'static str| {
            let mut tx = TxQueue::new();
            payload.push(&mut tx, tag);
            Adoption::Rejected { reply: tx.take_all(), reason }
        };
        if self.state == State::Closed {
            return reject(Tag::SessionReset, &true, "session closed");
        }
        let racing =
            matches!(self.state, State::Connecting | State::Banner | State::Ident) && !self.cfg.policy.server;
        let we_win_race = || match (self.cfg.my_addr, req.peer_key()) {
            (Some(mine), PeerKey::Listening(theirs)) => mine > theirs,
            _ => false,
        };
        let reconnected = match &req {
            HandshakeRequest::Fresh(ci) => {
                if racing && we_win_race() {
                    return reject(Tag::Wait, &(), "Wait (our connect wins the race)");
                }
                if self.established && ci.cookie != self.peer_cookie {
                    // The peer lost the session: it restarted, or gave up on us.
                    if !self.cfg.policy.lossy {
                        tracing::info!(peer = %ci.name, "peer opened a new session: it lost the old one");
                        self.reset_session(true);
                    }
                }
                self.peer_cookie = ci.cookie;
                self.peer_global_seq = ci.global_seq;
                false
            }
            HandshakeRequest::Reconnect(r) => {
                // The peer must know this incarnation of us. If we never saw the session open (our fresh ident
                // was accepted but the answer was lost), the peer's cookie is new to us but the session is not.
                let knows_us = r.peer_cookie == self.my_cookie;
                let same_peer = r.cookie == self.peer_cookie || (!self.established && self.peer_cookie == 0);
                if !knows_us || !same_peer {
                    return reject(Tag::SessionReset, &true, "SessionReset (unknown session)");
                }
                self.peer_cookie = r.cookie;
                if r.global_seq < self.peer_global_seq {
                    return reject(
                        Tag::SessionRetryGlobal,
                        &self.peer_global_seq,
                        "RetryGlobal (stale attempt)",
                    );
                }
                if r.connect_seq < self.connect_seq {
                    return reject(Tag::SessionRetry, &self.connect_seq, "Retry (stale connect_seq)");
                }
                if racing && we_win_race() {
                    return reject(Tag::Wait, &(), "Wait (our connect wins the race)");
                }
                self.peer_global_seq = r.global_seq;
                self.connect_seq = r.connect_seq + 1;
                true
            }
        };
        // Take over: whatever socket we had is replaced (the shell closes it on `Adopted`; an output here would
        // reach the shell after it attached the new socket).
        self.requeue_sent();
        self.clear_tx();
        self.grant = None;
        self.grant_wanted = None;
        self.rx = rx;
        self.peer_name = Some(req.peer_name());
        if !self.cfg.policy.server && self.peer_addr.is_none() {
            // A peer that listens can be reconnected to by either side (lossless peers both connect).
            if let PeerKey::Listening(a) = req.peer_key() {
                self.peer_addr = Some(a);
            }
        }
        let (name, addr, nonce, cookie) =
            (self.cfg.my_name, self.cfg.my_addr, self.cfg.my_nonce, self.my_cookie);
        match req {
            HandshakeRequest::Fresh(_) => {
                self.tx.push_control(Tag::ServerIdent, &ServerIdent { name, addr, nonce, cookie });
            }
            HandshakeRequest::Reconnect(r) => {
                self.discard_acked(r.in_seq);
                let ok = ReconnectOk { in_seq: self.in_seq, connect_seq: self.connect_seq };
                self.tx.push_control(Tag::SessionReconnectOk, &ok);
            }
        }
        self.open(now, reconnected);
        self.process_input(now);
        Adoption::Adopted
    }

    // ---- internals ----

    fn open(&mut self, now: Instant, reconnected: bool) {
        self.state = State::Open;
        self.established = true;
        self.handshake_deadline = None;
        self.retry_at = None;
        self.backoff = self.cfg.initial_backoff;
        self.last_rx = now;
        self.last_tx_progress = now;
        self.acked_seq_sent = 0;
        self.next_keepalive = self.cfg.keepalive_interval.map(|i| now + i);
        self.outputs.push_back(Output::Ready { reconnected });
        self.write_pending(now);
    }

    fn enter_standby(&mut self, now: Instant) {
        self.state = State::Standby;
        self.standby_since = Some(now);
    }

    fn open_socket(&mut self, now: Instant) {
        assert!(self.peer_addr.is_some(), "only a connecting side opens sockets");
        self.global_seq += 1;
        self.state = State::Connecting;
        self.handshake_deadline = Some(now + self.cfg.connect_timeout);
        self.outputs.push_back(Output::OpenSocket);
    }

    fn send_ident(&mut self, _now: Instant) {
        let (name, addr, nonce) = (self.cfg.my_name, self.cfg.my_addr, self.cfg.my_nonce);
        if self.established {
            let r = SessionReconnect {
                name,
                addr,
                nonce,
                cookie: self.my_cookie,
                peer_cookie: self.peer_cookie,
                global_seq: self.global_seq,
                connect_seq: self.connect_seq,
                in_seq: self.in_seq,
            };
            self.tx.push_control(Tag::SessionReconnect, &r);
        } else {
            let ci = ClientIdent { name, addr, nonce, cookie: self.my_cookie, global_seq: self.global_seq };
            self.tx.push_control(Tag::ClientIdent, &ci);
        }
    }

    fn push_control<T: Serialize>(&mut self, now: Instant, tag: Tag, payload: &T) {
        if self.tx.is_empty() {
            self.last_tx_progress = now;
        }
        self.tx.push_control(tag, payload);
    }

    /// Moves queued messages into the transmit queue, assigning sequence numbers to new ones.
    fn write_pending(&mut self, now: Instant) {
        if self.out.is_empty() {
            return;
        }
        if self.tx.is_empty() {
            self.last_tx_progress = now;
        }
        let lossy = self.cfg.policy.lossy;
        let mut resent = 0;
        while let Some(mut m) = self.out.pop_front() {
            if m.seq != 0 {
                resent += 1;
            } else {
                self.out_seq += 1;
                m.seq = self.out_seq;
            }
            assert!(m.seq <= self.out_seq);
            self.tx.push_frame_parts(Tag::Message, &m.encode_header(self.in_seq), &m.front, m.data_parts());
            self.acked_seq_sent = self.in_seq;
            if lossy {
                // Nobody will ask for it again: its bytes are the frame's, and it counts until they are written.
                let end = self.tx.end_position();
                assert!(self.lossy_in_tx.back().is_none_or(|&(e, _)| e < end), "frames queue in order");
                self.lossy_in_tx.push_back((end, m.payload_bytes() as u64));
            } else {
                self.sent.push_back(m);
            }
        }
        if resent > 0 {
            self.outputs.push_back(Output::Resent(resent));
        }
    }

    /// Empties the transmit queue (the socket is gone or replaced): lossy messages in it are dropped.
    fn clear_tx(&mut self) {
        self.tx.clear();
        self.release_lossy_sent();
        assert!(self.lossy_in_tx.is_empty(), "a cleared transmit queue holds no message");
    }

    /// Lossy messages whose frames have left the transmit queue leave the outgoing bytes.
    fn release_lossy_sent(&mut self) {
        let gone = self.tx.gone_bytes();
        let mut released = (0u64, 0u64);
        while let Some(&(end, bytes)) = self.lossy_in_tx.front() {
            if end > gone {
                break;
            }
            self.lossy_in_tx.pop_front();
            released.0 += 1;
            released.1 += bytes;
        }
        if released.0 > 0 {
            self.outputs.push_back(Output::Released { messages: released.0, bytes: released.1 });
        }
    }

    /// Payload bytes of lossy messages queued on the socket and not yet written.
    pub fn lossy_bytes_in_tx(&self) -> u64 {
        self.lossy_in_tx.iter().map(|&(_, b)| b).sum()
    }

    fn discard_acked(&mut self, seq: u64) {
        let mut released = (0u64, 0u64);
        while self.sent.front().is_some_and(|m| m.seq <= seq) {
            let m = self.sent.pop_front().expect("front checked");
            released.0 += 1;
            released.1 += m.payload_bytes() as u64;
        }
        // After a reconnect the resent messages wait in `out` again; drop those the peer already has.
        while self.out.front().is_some_and(|m| m.seq != 0 && m.seq <= seq) {
            let m = self.out.pop_front().expect("front checked");
            released.0 += 1;
            released.1 += m.payload_bytes() as u64;
        }
        if released.0 > 0 {
            self.outputs.push_back(Output::Released { messages: released.0, bytes: released.1 });
        }
    }

    fn requeue_sent(&mut self) {
        while let Some(m) = self.sent.pop_back() {
            self.out.push_front(m);
        }
    }

    fn release(&mut self, msgs: &[Message]) {
        let bytes: usize = msgs.iter().map(Message::payload_bytes).sum();
        if !msgs.is_empty() {
            self.outputs.push_back(Output::Released { messages: msgs.len() as u64, bytes: bytes as u64 });
        }
    }

    fn drop_queues(&mut self) {
        let dropped: Vec<Message> = self.sent.drain(..).chain(self.out.drain(..)).collect();
        self.release(&dropped);
        self.clear_tx();
        self.rx.clear();
        self.grant = None;
        self.grant_wanted = None;
    }

    /// Forgets the session with the peer: queues, sequence numbers and the peer's cookie.
    fn reset_session(&mut self, notify: bool) {
        let had_state = self.established;
        let dropped: Vec<Message> = self.sent.drain(..).chain(self.out.drain(..)).collect();
        self.release(&dropped);
        self.out_seq = 0;
        self.in_seq = 0;
        self.acked_seq_sent = 0;
        self.peer_cookie = 0;
        self.connect_seq = 0;
        self.established = false;
        // A new incarnation: a peer still holding the old cookie must not resume the dropped session.
        self.my_cookie = next_cookie(self.my_cookie);
        if notify && had_state {
            self.outputs.push_back(Output::RemoteReset);
        }
    }

    fn reconnect_now(&mut self, now: Instant, reason: CloseReason) {
        self.outputs.push_back(Output::CloseSocket(reason));
        self.requeue_sent();
        self.clear_tx();
        if self.peer_addr.is_some() {
            self.open_socket(now);
        } else {
            self.enter_standby(now);
        }
    }

    fn fault(&mut self, now: Instant, reason: CloseReason) {
        let had_socket = self.has_socket();
        tracing::debug!(peer = ?self.peer_name, state = ?self.state, %reason, "fault");
        if had_socket || self.state == State::Connecting {
            self.outputs.push_back(Output::CloseSocket(reason));
        }
        self.clear_tx();
        self.rx.clear();
        self.grant = None;
        self.grant_wanted = None;
        self.handshake_deadline = None;
        let p = self.cfg.policy;
        if p.lossy {
            self.drop_queues();
            self.state = State::Closed;
            self.outputs.push_back(Output::Reset);
            self.outputs.push_back(Output::Closed);
            return;
        }
        self.requeue_sent();
        let idle = self.out.is_empty();
        if p.server || self.peer_addr.is_none() || (p.standby && idle && self.established) {
            self.enter_standby(now);
        } else {
            self.state = State::Backoff;
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(self.cfg.max_backoff);
        }
    }
}

/// The cookie after `c` (splitmix64): deterministic, never 0.
fn next_cookie(c: u64) -> u64 {
    crate::util::splitmix64(c).max(1)
}

/// Runs on an accepted socket until the peer has identified itself.
pub struct Acceptor {
    limits: FrameLimits,
    deadline: Instant,
    banner_seen: bool,
    rx: RxBuf,
    tx: TxQueue,
    done: Option<Result<HandshakeRequest, CloseReason>>,
}

impl Acceptor {
    pub fn new(now: Instant, connect_timeout: Duration, limits: FrameLimits) -> Acceptor {
        let mut tx = TxQueue::new();
        tx.push_raw(&frame::encode_banner());
        Acceptor {
            limits,
            deadline: now + connect_timeout,
            banner_seen: false,
            rx: RxBuf::new(),
            tx,
            done: None,
        }
    }

    pub fn rx(&mut self) -> &mut RxBuf {
        &mut self.rx
    }
    pub fn tx(&mut self) -> &mut TxQueue {
        &mut self.tx
    }
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
    /// Reading stops once the peer's first frame is in: the rest belongs to the session.
    pub fn read_hint(&self) -> Option<usize> {
        if self.done.is_some() {
            return None;
        }
        Some(frame::CONTROL_BYTES_MAX as usize + frame::PREAMBLE_BYTES + 8)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.done.is_none() && now >= self.deadline {
            self.done = Some(Err(CloseReason::HandshakeTimeout));
        }
    }

    pub fn process_input(&mut self) {
        if self.done.is_some() {
            return;
        }
        if !self.banner_seen {
            if self.rx.len() < BANNER_BYTES {
                return;
            }
            let b = self.rx.split_to(BANNER_BYTES);
            if let Err(e) = frame::decode_banner(b[..].try_into().expect("banner length")) {
                self.done = Some(Err(CloseReason::Frame(e)));
                return;
            }
            self.banner_seen = true;
        }
        // Judge the first frame by its preamble: a Message may announce megabytes, and an unidentified peer gets
        // neither the buffer nor the wait for them.
        if let Ok(Some(p)) = frame::peek_preamble(self.rx.data(), &self.limits) {
            if !matches!(p.tag, Tag::ClientIdent | Tag::SessionReconnect) {
                self.done = Some(Err(CloseReason::Protocol("first frame is not an ident or reconnect")));
                return;
            }
        }
        let f = match frame::decode_frame(&mut self.rx, &self.limits) {
            Ok(None) => return,
            Ok(Some(f)) => f,
            Err(e) => {
                self.done = Some(Err(CloseReason::Frame(e)));
                return;
            }
        };
        let req = match f.tag {
            Tag::ClientIdent => f.payload().map(HandshakeRequest::Fresh),
            Tag::SessionReconnect => f.payload().map(HandshakeRequest::Reconnect),
            tag => unreachable!("the preamble of a {tag:?} frame was refused above"),
        };
        self.done = Some(req.map_err(CloseReason::Frame));
    }

    /// The outcome, once known: the request and the bytes read past it.
    pub fn take_outcome(&mut self) -> Option<Result<(HandshakeRequest, RxBuf), CloseReason>> {
        let done = self.done.take()?;
        Some(done.map(|req| (req, std::mem::take(&mut self.rx))))
    }

    /// Whether the outcome is known (for the shell to stop reading).
    pub fn is_done(&self) -> bool {
        self.done.is_some()
    }
}

/// A tiny helper so `adopt` can build reject replies from payloads of different types.
mod erased {
    use super::{Tag, TxQueue};
    pub trait Payload {
        fn push(&self, tx: &mut TxQueue, tag: Tag);
    }
    impl<T: serde::Serialize> Payload for T {
        fn push(&self, tx: &mut TxQueue, tag: Tag) {
            tx.push_control(tag, self);
        }
    }
}
