//! State-machine tests of the session protocol without sockets: two nodes, an in-memory network of byte pipes
//! that the test controls (delivery, cutting sockets, dropping bytes in flight), and a clock that only moves
//! when the test moves it. Covers handshake, reconnect, reset, connect races, keepalive and timeouts, plus a
//! seeded randomized run with many faults; a failing seed is printed and replays exactly.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use messenger::entity::EntityName;
use messenger::frame::{FrameLimits, Tag, TxQueue};
use messenger::session::{
    Acceptor, Adoption, CloseReason, HandshakeRequest, Output, Session, SessionConfig, SessionReconnect,
    State,
};
use messenger::{Message, Policy};

enum AccEnd {
    Acceptor(Acceptor),
    Session,
    Closing,
}

struct Pipe {
    init: usize,
    /// Bytes travelling towards the initiating node and towards the accepting node.
    to_init: Vec<u8>,
    to_acc: Vec<u8>,
    acc: AccEnd,
    open: bool,
}

struct Node {
    name: EntityName,
    addr: Option<SocketAddr>,
    policy: Policy,
    sess: Option<Session>,
    /// The pipe the session is attached to.
    pipe: Option<usize>,
    delivered: Vec<u64>,
    events: Vec<&'static str>,
    cookie: u64,
}

struct Net {
    now: Instant,
    nodes: [Node; 2],
    pipes: Vec<Pipe>,
}

fn cfg(n: &Node) -> SessionConfig {
    SessionConfig {
        my_name: n.name,
        my_addr: n.addr,
        my_nonce: n.name.num,
        policy: n.policy,
        limits: FrameLimits::default(),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
        keepalive_interval: Some(Duration::from_secs(5)),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(15),
        outgoing_bytes_soft_max: 1 << 20,
        standby_timeout: Duration::from_secs(900),
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Net {
    fn new(a: (EntityName, Option<SocketAddr>, Policy), b: (EntityName, Option<SocketAddr>, Policy)) -> Net {
        let node = |(name, addr, policy): (EntityName, Option<SocketAddr>, Policy), cookie| Node {
            name,
            addr,
            policy,
            sess: None,
            pipe: None,
            delivered: Vec::new(),
            events: Vec::new(),
            cookie,
        };
        Net { now: Instant::now(), nodes: [node(a, 100), node(b, 200)], pipes: Vec::new() }
    }

    fn client_server() -> Net {
        Net::new(
            (EntityName::client(1), None, Policy::lossless_client()),
            (EntityName::osd(2), Some(addr(6802)), Policy::stateful_server()),
        )
    }

    fn peers() -> Net {
        Net::new(
            (EntityName::osd(1), Some(addr(6801)), Policy::lossless_peer()),
            (EntityName::osd(2), Some(addr(6802)), Policy::lossless_peer()),
        )
    }

    fn next_cookie(&mut self, i: usize) -> u64 {
        self.nodes[i].cookie += 1;
        self.nodes[i].cookie
    }

    /// Node `i` sends message number `n` to the other node, creating a connecting session if it has none.
    fn send(&mut self, i: usize, n: u64) {
        if self.nodes[i].sess.is_none() {
            let peer = self.nodes[1 - i].addr.expect("the peer listens");
            let cookie = self.next_cookie(i);
            self.nodes[i].sess = Some(Session::connect(cfg(&self.nodes[i]), peer, cookie, self.now));
        }
        let now = self.now;
        self.nodes[i].sess.as_mut().unwrap().queue_message(now, Message::encode(1, &n).with_tid(n));
    }

    fn state(&self, i: usize) -> State {
        self.nodes[i].sess.as_ref().map_or(State::Closed, |s| s.state())
    }

    /// Cuts whatever socket node `i` is using, losing the bytes in flight.
    fn cut(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].pipe {
            self.pipes[p].open = false;
            self.pipes[p].to_init.clear();
            self.pipes[p].to_acc.clear();
        }
    }

    /// Node `i` restarts: it forgets its session entirely.
    fn restart(&mut self, i: usize) {
        self.cut(i);
        self.nodes[i].sess = None;
        self.nodes[i].pipe = None;
        self.nodes[i].name.num += 0;
    }

    fn outputs(&mut self, i: usize) -> bool {
        let mut progressed = false;
        loop {
            let now = self.now;
            let Some(s) = self.nodes[i].sess.as_mut() else { return progressed };
            let Some(out) = s.poll_output() else { return progressed };
            progressed = true;
            match out {
                Output::OpenSocket => {
                    if let Some(p) = self.nodes[i].pipe.take() {
                        self.pipes[p].open = false;
                    }
                    let acc = Acceptor::new(now, Duration::from_secs(2), FrameLimits::default());
                    self.pipes.push(Pipe {
                        init: i,
                        to_init: Vec::new(),
                        to_acc: Vec::new(),
                        acc: AccEnd::Acceptor(acc),
                        open: true,
                    });
                    self.nodes[i].pipe = Some(self.pipes.len() - 1);
                    self.nodes[i].sess.as_mut().unwrap().socket_connected(now);
                }
                Output::CloseSocket(_) => {
                    if let Some(p) = self.nodes[i].pipe.take() {
                        self.pipes[p].open = false;
                    }
                }
                Output::Message(m) => self.nodes[i].delivered.push(m.decode().unwrap()),
                Output::Ready { reconnected } => {
                    self.nodes[i].events.push(if reconnected { "reconnected" } else { "ready" })
                }
                Output::Reset => self.nodes[i].events.push("reset"),
                Output::RemoteReset => self.nodes[i].events.push("remote_reset"),
                Output::Closed => {
                    self.nodes[i].events.push("closed");
                    self.nodes[i].sess = None;
                    self.nodes[i].pipe = None;
                }
                Output::Released { .. } | Output::Resent(_) => {}
            }
        }
    }

    /// Moves bytes and outputs until nothing changes (time does not advance).
    fn settle(&mut self) {
        for _ in 0..10_000 {
            if !self.step() {
                return;
            }
        }
        panic!("network did not settle");
    }

    fn step(&mut self) -> bool {
        let mut progressed = false;
        let now = self.now;
        for i in 0..2 {
            progressed |= self.outputs(i);
            // A session whose pipe was closed by the other end sees the close.
            if let Some(p) = self.nodes[i].pipe {
                if !self.pipes[p].open {
                    self.nodes[i].pipe = None;
                    if let Some(s) = self.nodes[i].sess.as_mut() {
                        s.socket_closed(now, CloseReason::PeerClosed);
                        progressed = true;
                    }
                    continue;
                }
                let s = self.nodes[i].sess.as_mut().unwrap();
                s.flush_acks(now);
                let out = s.tx().take_all();
                let pipe = &mut self.pipes[p];
                let (outbox, inbox) = if pipe.init == i {
                    (&mut pipe.to_acc, &mut pipe.to_init)
                } else {
                    (&mut pipe.to_init, &mut pipe.to_acc)
                };
                progressed |= !out.is_empty();
                outbox.extend_from_slice(&out);
                if !inbox.is_empty() && s.read_hint().is_some() {
                    s.rx().extend_from_slice(inbox);
                    inbox.clear();
                    s.process_input(now);
                    progressed = true;
                }
                if s.grant_wanted().is_some() {
                    let g = messenger::throttle::ThrottleGrant::try_take(&[], 1, 0).unwrap();
                    s.give_grant(now, g);
                    progressed = true;
                }
            }
        }
        for p in 0..self.pipes.len() {
            progressed |= self.step_acceptor(p);
        }
        progressed
    }

    fn step_acceptor(&mut self, p: usize) -> bool {
        let now = self.now;
        let pipe = &mut self.pipes[p];
        if !pipe.open {
            return false;
        }
        let AccEnd::Acceptor(acc) = &mut pipe.acc else { return false };
        let mut progressed = false;
        let out = acc.tx().take_all();
        progressed |= !out.is_empty();
        pipe.to_init.extend_from_slice(&out);
        if !pipe.to_acc.is_empty() && acc.read_hint().is_some() {
            acc.rx().extend_from_slice(&pipe.to_acc);
            pipe.to_acc.clear();
            acc.process_input();
            progressed = true;
        }
        let Some(outcome) = acc.take_outcome() else { return progressed };
        let acc_node = 1 - pipe.init;
        match outcome {
            Err(_) => pipe.open = false,
            Ok((req, rx)) => {
                if self.nodes[acc_node].sess.is_none() {
                    let cookie = self.next_cookie(acc_node);
                    self.nodes[acc_node].sess =
                        Some(Session::accept(cfg(&self.nodes[acc_node]), cookie, now));
                }
                let s = self.nodes[acc_node].sess.as_mut().unwrap();
                match s.adopt(now, req, rx) {
                    Adoption::Adopted => {
                        if let Some(old) = self.nodes[acc_node].pipe.replace(p) {
                            if old != p {
                                self.pipes[old].open = false;
                            }
                        }
                        self.pipes[p].acc = AccEnd::Session;
                    }
                    Adoption::Rejected { reply, .. } => {
                        self.pipes[p].to_init.extend_from_slice(&reply);
                        self.pipes[p].acc = AccEnd::Closing;
                        // Let the initiator read the reply before the close is noticed.
                        self.deliver_then_close(p);
                    }
                }
            }
        }
        true
    }

    fn deliver_then_close(&mut self, p: usize) {
        let init = self.pipes[p].init;
        let now = self.now;
        if self.nodes[init].pipe == Some(p) {
            if let Some(s) = self.nodes[init].sess.as_mut() {
                let bytes = std::mem::take(&mut self.pipes[p].to_init);
                s.rx().extend_from_slice(&bytes);
                s.process_input(now);
            }
        }
        self.pipes[p].open = false;
    }

    /// Advances the clock to the next timer of either session and fires it.
    fn tick(&mut self) {
        let next = self.nodes.iter().filter_map(|n| n.sess.as_ref()?.poll_timeout()).min();
        let Some(t) = next else { return };
        self.now = self.now.max(t);
        let now = self.now;
        for n in &mut self.nodes {
            if let Some(s) = n.sess.as_mut() {
                s.handle_timeout(now);
            }
        }
        self.settle();
    }

    /// Settles, then runs timers until `cond` holds (bounded).
    fn run_until(&mut self, what: &str, cond: impl Fn(&Net) -> bool) {
        self.settle();
        for _ in 0..200 {
            if cond(self) {
                return;
            }
            self.tick();
        }
        panic!("never reached: {what}; states {:?} {:?}", self.state(0), self.state(1));
    }
}

// Goal: the basic handshake opens a session both ways. Method: client sends one message; both sides open.
#[test]
fn handshake_opens_the_session_on_both_sides() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    assert_eq!(net.state(0), State::Open);
    assert_eq!(net.state(1), State::Open);
    assert_eq!(net.nodes[1].delivered, vec![1]);
    assert_eq!(net.nodes[0].events, vec!["ready"]);
    assert_eq!(net.nodes[1].events, vec!["ready"]);
    net.send(1, 7);
    net.settle();
    assert_eq!(net.nodes[0].delivered, vec![7]);
}

// Goal: after a socket fault the client reconnects and the stream resumes exactly once, in order. Method: cut
// the socket with messages in flight (their bytes lost), let the backoff timer fire, check delivery.
#[test]
fn reconnect_resends_what_was_lost_exactly_once() {
    let mut net = Net::client_server();
    for n in 1..=5 {
        net.send(0, n);
    }
    net.settle();
    for n in 6..=10 {
        net.send(0, n);
    }
    // Bytes of 6..=10 are in the client's tx; move them into the pipe, then cut it: they are lost.
    net.step();
    net.cut(0);
    for n in 11..=12 {
        net.send(0, n);
    }
    net.run_until("reconnected", |n| n.state(0) == State::Open && n.nodes[1].delivered.len() == 12);
    assert_eq!(net.nodes[1].delivered, (1..=12).collect::<Vec<_>>());
    assert!(net.nodes[0].events.contains(&"reconnected"));
    assert!(!net.nodes[0].events.contains(&"remote_reset"));
}

// Goal: the server's replies survive a fault too (the server never reconnects; it resends when the client
// does). Method: server sends, the socket is cut, the client reconnects after a send of its own.
#[test]
fn server_side_messages_are_resent_when_the_client_returns() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    net.send(1, 100);
    net.step();
    net.cut(1);
    net.settle();
    assert_eq!(net.state(1), State::Standby);
    net.run_until("client got the reply", |n| n.nodes[0].delivered == vec![100]);
}

// Goal: a peer that restarted is detected (session reset) and reported as a remote reset. Method: the server
// forgets its session; the client's reconnect is answered with SessionReset; the client starts a fresh session
// and new messages flow.
#[test]
fn reset_after_the_peer_restarts() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    net.restart(1);
    net.send(0, 2);
    net.run_until("fresh session", |n| {
        n.nodes[0].events.contains(&"remote_reset") && n.state(0) == State::Open
    });
    // Message 2 was queued on the old session and dropped by the reset, as in Ceph; new messages flow.
    net.send(0, 3);
    net.settle();
    assert_eq!(net.nodes[1].delivered, vec![1, 3]);
}

// Goal: a stale reconnect attempt is told to retry. Method: hand-made SessionReconnect requests with an old
// global_seq, an old connect_seq and a wrong cookie against an open server session.
#[test]
fn stale_reconnects_get_retry_and_unknown_sessions_get_reset() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    // Reconnect once so the server's connect_seq and peer global_seq move past 1.
    net.cut(0);
    net.send(0, 2);
    net.run_until("reconnected", |n| n.nodes[1].delivered.len() == 2);
    let client_cookie = 101;
    let server_cookie = 201;
    let base = SessionReconnect {
        name: EntityName::client(1),
        addr: None,
        nonce: 1,
        cookie: client_cookie,
        peer_cookie: server_cookie,
        global_seq: 2,
        connect_seq: 1,
        in_seq: 0,
    };
    let now = net.now;
    let server = net.nodes[1].sess.as_mut().unwrap();
    let tag_of = |a: Adoption| match a {
        Adoption::Rejected { reply, .. } => reply[0],
        Adoption::Adopted => 0,
    };
    let stale_global = SessionReconnect { global_seq: 1, ..base.clone() };
    assert_eq!(
        tag_of(server.adopt(now, HandshakeRequest::Reconnect(stale_global), Default::default())),
        Tag::SessionRetryGlobal as u8
    );
    let stale_connect = SessionReconnect { connect_seq: 0, ..base.clone() };
    assert_eq!(
        tag_of(server.adopt(now, HandshakeRequest::Reconnect(stale_connect), Default::default())),
        Tag::SessionRetry as u8
    );
    let unknown = SessionReconnect { peer_cookie: 999, ..base.clone() };
    assert_eq!(
        tag_of(server.adopt(now, HandshakeRequest::Reconnect(unknown), Default::default())),
        Tag::SessionReset as u8
    );
    assert_eq!(server.state(), State::Open, "rejected attempts leave the session alone");
}

// Goal: simultaneous connects between two lossless peers resolve to one session. Method: both nodes send at
// once, so both open sockets and both accept; the higher address wins as the connecting side (Wait for the
// other); every message is delivered once.
#[test]
fn connect_race_resolves_to_one_session() {
    let mut net = Net::peers();
    net.send(0, 1);
    net.send(1, 2);
    net.run_until("both delivered", |n| n.nodes[0].delivered == vec![2] && n.nodes[1].delivered == vec![1]);
    assert_eq!(net.state(0), State::Open);
    assert_eq!(net.state(1), State::Open);
    assert_eq!(net.nodes[0].pipe, net.nodes[1].pipe, "both sides use the same socket");
    let init = net.pipes[net.nodes[0].pipe.unwrap()].init;
    assert_eq!(init, 1, "the peer with the higher address connected");
    // And later traffic flows both ways.
    net.send(0, 3);
    net.send(1, 4);
    net.settle();
    assert_eq!(net.nodes[0].delivered, vec![2, 4]);
    assert_eq!(net.nodes[1].delivered, vec![1, 3]);
}

// Goal: a lossless peer with nothing to send waits in standby after a fault, and either side reconnects when it
// has something to say. Method: cut, check standby, send from the side that accepted the session.
#[test]
fn lossless_peers_reconnect_from_either_side() {
    let mut net = Net::peers();
    net.send(0, 1);
    net.run_until("open", |n| n.nodes[1].delivered == vec![1]);
    net.cut(0);
    net.settle();
    assert_eq!(net.state(0), State::Standby);
    assert_eq!(net.state(1), State::Standby);
    net.send(1, 2);
    net.run_until("delivered", |n| n.nodes[0].delivered == vec![2]);
}

// Goal: keepalives measure the round-trip time, and a handshake that never completes times out and backs off.
// Method: advance the clock to the keepalive timer; separately, connect to a peer that never answers.
#[test]
fn keepalive_measures_rtt_and_handshakes_time_out() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    assert!(net.nodes[0].sess.as_ref().unwrap().rtt().is_none());
    net.tick();
    assert!(net.nodes[0].sess.as_ref().unwrap().rtt().is_some(), "keepalive ack measured the rtt");

    let c = Net::client_server();
    let t0 = c.now;
    let mut s = Session::connect(cfg(&c.nodes[0]), addr(6802), 5, t0);
    assert!(matches!(s.poll_output(), Some(Output::OpenSocket)));
    s.socket_connected(t0);
    let deadline = s.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(2));
    s.handle_timeout(deadline);
    assert!(matches!(s.poll_output(), Some(Output::CloseSocket(CloseReason::HandshakeTimeout))));
    assert_eq!(s.state(), State::Backoff);
    assert_eq!(s.poll_timeout(), Some(deadline + Duration::from_millis(200)));
}

// Goal: a lossy session ends on the first fault and says so. Method: lossy client, stateless server, cut.
#[test]
fn lossy_sessions_reset_on_fault() {
    let mut net = Net::new(
        (EntityName::client(1), None, Policy::lossy_client()),
        (EntityName::osd(2), Some(addr(6802)), Policy::stateless_server()),
    );
    net.send(0, 1);
    net.settle();
    net.cut(0);
    net.settle();
    assert!(net.nodes[0].events.ends_with(&["reset", "closed"]));
    assert!(net.nodes[1].events.ends_with(&["reset", "closed"]));
}

// Goal: a lossy session sends no ack frame of its own for each batch (its lossy peer keeps nothing to trim, and
// the frame only wakes it), yet a peer that does keep messages stays bounded; a lossless session acks at once.
// Method: a lossless client (it keeps what it sent until acked) sends to a stateless (lossy) server and to a
// stateful one. Against the stateless server, 10 messages stay unacked after settling, the 128th message
// brings an ack, and a keepalive answer acks the rest; against the stateful server nothing stays unacked.
#[test]
fn lossy_sessions_ack_rarely_lossless_ones_at_once() {
    let unacked = |net: &Net| net.nodes[0].sess.as_ref().unwrap().unacked_messages();
    let mut net = Net::new(
        (EntityName::client(1), None, Policy::lossless_client()),
        (EntityName::osd(2), Some(addr(6802)), Policy::stateless_server()),
    );
    for n in 1..=10 {
        net.send(0, n);
    }
    net.settle();
    assert_eq!(net.nodes[1].delivered.len(), 10);
    assert_eq!(unacked(&net), 10, "a lossy server acks no batch on its own");
    for n in 11..=messenger::session::LOSSY_ACK_EVERY {
        net.send(0, n);
        net.settle();
    }
    assert_eq!(unacked(&net), 0, "every LOSSY_ACK_EVERY messages it does");
    net.send(0, 1000);
    net.settle();
    assert_eq!(unacked(&net), 1);
    net.tick(); // the client's keepalive; the answer carries an ack
    assert_eq!(unacked(&net), 0, "a keepalive answer acks what is owed");

    let mut net = Net::client_server();
    for n in 1..=10 {
        net.send(0, n);
    }
    net.settle();
    assert_eq!(unacked(&net), 0, "a stateful server acks at once");
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_run(seed: u64) {
    let mut rng = Rng(seed.max(1));
    let mut net = if seed.is_multiple_of(2) { Net::peers() } else { Net::client_server() };
    let both = seed.is_multiple_of(2);
    let (mut next0, mut next1) = (1u64, 1_000_000u64);
    for _ in 0..400 {
        match rng.next() % 10 {
            0..=3 => {
                net.send(0, next0);
                next0 += 1;
            }
            4..=5 if both || net.state(1) != State::Closed => {
                if both || net.nodes[1].sess.is_some() {
                    net.send(1, next1);
                    next1 += 1;
                }
            }
            6 => net.cut((rng.next() % 2) as usize),
            7 => net.tick(),
            _ => {
                for _ in 0..(rng.next() % 5) {
                    net.step();
                }
            }
        }
    }
    let (want0, want1) = (next0 - 1, next1 - 1_000_000);
    if std::env::var("SIM_DEBUG").is_ok() {
        net.settle();
        for _ in 0..50 {
            net.tick();
        }
        eprintln!(
            "want {want0} {want1}; node1 got {:?}; node0 got {:?}",
            net.nodes[1].delivered, net.nodes[0].delivered
        );
        eprintln!("events0 {:?}\nevents1 {:?}", net.nodes[0].events, net.nodes[1].events);
        eprintln!(
            "seqs0 in {} out {} unacked {}",
            net.nodes[0].sess.as_ref().unwrap().in_seq(),
            net.nodes[0].sess.as_ref().unwrap().out_seq(),
            net.nodes[0].sess.as_ref().unwrap().unacked_messages()
        );
        eprintln!(
            "seqs1 in {} out {} unacked {}",
            net.nodes[1].sess.as_ref().unwrap().in_seq(),
            net.nodes[1].sess.as_ref().unwrap().out_seq(),
            net.nodes[1].sess.as_ref().unwrap().unacked_messages()
        );
    }
    net.run_until("all delivered", |n| {
        n.nodes[1].delivered.len() as u64 == want0 && n.nodes[0].delivered.len() as u64 == want1
    });
    assert_eq!(net.nodes[1].delivered, (1..next0).collect::<Vec<_>>());
    assert_eq!(net.nodes[0].delivered, (1_000_000..next1).collect::<Vec<_>>());
}

// Goal: exactly-once in-order delivery both ways under random faults, for lossless clients and lossless peers.
// Method: 300 seeded runs of random sends, socket cuts (bytes in flight lost), timer firings and partial
// delivery; on failure the seed is printed and `random_run(seed)` replays it.
#[test]
fn randomized_faults_never_lose_duplicate_or_reorder() {
    for seed in 1..=300u64 {
        let r = std::panic::catch_unwind(|| random_run(seed));
        if r.is_err() {
            panic!(
                "random_run failed for seed {seed}; replay it with SIM_SEED={seed} cargo test -p messenger \
                 --test session_sim replay_one_seed -- --ignored"
            );
        }
    }
}

/// Replays one seed of `randomized_faults_never_lose_duplicate_or_reorder` (the seed a failure printed): a command, not a check, so it
/// is ignored in the suite and fails when it is not given its seed:
/// `SIM_SEED=N cargo test -p messenger --test session_sim replay_one_seed -- --ignored`.
#[test]
#[ignore = "a replay command: needs SIM_SEED"]
fn replay_one_seed() {
    let seed = std::env::var("SIM_SEED").expect("set SIM_SEED to the seed to replay");
    random_run(seed.parse().expect("SIM_SEED is a number"));
}

#[test]
fn frames_from_tx_queue_are_what_the_acceptor_expects() {
    // A sanity check of the harness itself: an Acceptor given a banner and a ClientIdent identifies the peer.
    let mut acc = Acceptor::new(Instant::now(), Duration::from_secs(1), FrameLimits::default());
    let mut tx = TxQueue::new();
    tx.push_raw(&messenger::frame::encode_banner());
    let ci = messenger::session::ClientIdent {
        name: EntityName::client(9),
        addr: None,
        nonce: 3,
        cookie: 4,
        global_seq: 1,
    };
    tx.push_control(Tag::ClientIdent, &ci);
    acc.rx().extend_from_slice(&tx.take_all());
    acc.process_input();
    let (req, rest) = acc.take_outcome().unwrap().unwrap();
    assert_eq!(req, HandshakeRequest::Fresh(ci));
    assert!(rest.is_empty());
    let _ = Bytes::new();
}

/// A stateless server's session opened by `client.9`'s ClientIdent, as the shell opens it after the acceptor.
fn opened_server_session(cfg: SessionConfig, now: Instant) -> Session {
    let mut acc = Acceptor::new(now, Duration::from_secs(1), FrameLimits::default());
    let mut tx = TxQueue::new();
    tx.push_raw(&messenger::frame::encode_banner());
    let ci = messenger::session::ClientIdent {
        name: EntityName::client(9),
        addr: None,
        nonce: 3,
        cookie: 4,
        global_seq: 1,
    };
    tx.push_control(Tag::ClientIdent, &ci);
    acc.rx().extend_from_slice(&tx.take_all());
    acc.process_input();
    let (req, rx) = acc.take_outcome().unwrap().unwrap();
    let mut s = Session::accept(cfg, 77, now);
    assert!(matches!(s.adopt(now, req, rx), Adoption::Adopted));
    while s.poll_output().is_some() {}
    s
}

/// The shell wrote `n` bytes of the session's transmit queue (slicing it first, as the shell does).
fn peer_takes(s: &mut Session, now: Instant, n: usize) {
    let mut slices = [std::io::IoSlice::new(&[]); messenger::frame::IOV_MAX];
    s.tx().io_slices(&mut slices);
    s.wrote(now, n);
}

// Goal: an unidentified peer cannot make the acceptor wait for, or buffer, the bytes a Message announces.
// Method: a banner, then only the preamble of a Message with a 1 MiB front; the acceptor refuses it at once.
#[test]
fn acceptor_refuses_a_message_before_the_ident_from_its_preamble() {
    let mut acc = Acceptor::new(Instant::now(), Duration::from_secs(10), FrameLimits::default());
    let mut tx = TxQueue::new();
    let header = [0; messenger::frame::MSG_HEADER_BYTES];
    tx.push_frame(Tag::Message, &header, &Bytes::from(vec![0; 1 << 20]), &Bytes::new());
    let wire = tx.take_all();
    acc.rx().extend_from_slice(&messenger::frame::encode_banner());
    acc.rx().extend_from_slice(&wire[..messenger::frame::PREAMBLE_BYTES]);
    acc.process_input();
    assert!(matches!(acc.take_outcome(), Some(Err(CloseReason::Protocol(_)))));
}

// Goal: a session that stopped reading because the peer does not take its output is faulted for that, not for
// the silence its own pause causes, and the receive idle clock restarts when reading resumes. Method: with a
// 1 MiB soft max and a 1 s idle timeout, a server session queues a 2 MiB reply; the peer takes 1000 bytes at
// 0.5 s and nothing more: the deadline is 1.5 s and the fault says PeerNotReading. A second session's backlog
// drains at 0.9 s: it is not faulted at 1 s, and its next deadline is 1.9 s.
#[test]
fn a_backlogged_session_is_timed_by_its_writes_not_by_its_silence() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(1);
    let cfg = SessionConfig {
        my_name: EntityName::osd(2),
        my_addr: Some(addr(6802)),
        my_nonce: 2,
        policy: Policy::stateless_server(),
        limits: FrameLimits::default(),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: idle,
        keepalive_interval: None,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(15),
        outgoing_bytes_soft_max: 1 << 20,
        standby_timeout: Duration::from_secs(900),
    };
    let reply = || Message::new(2, Bytes::from_static(b"r")).with_data(Bytes::from(vec![0; 2 << 20]));

    let mut stuck = opened_server_session(cfg.clone(), t0);
    stuck.queue_message(t0, reply());
    assert_eq!(stuck.read_hint(), None, "reading paused by the backlog");
    let progress = t0 + Duration::from_millis(500);
    peer_takes(&mut stuck, progress, 1000);
    assert_eq!(stuck.poll_timeout(), Some(progress + idle), "only the write side is timed");
    stuck.handle_timeout(progress + idle);
    let closed = std::iter::from_fn(|| stuck.poll_output()).find_map(|o| {
        if let Output::CloseSocket(r) = o {
            Some(r)
        } else {
            None
        }
    });
    assert_eq!(closed, Some(CloseReason::PeerNotReading));

    let mut drained = opened_server_session(cfg, t0);
    drained.queue_message(t0, reply());
    let resumed = t0 + Duration::from_millis(900);
    let queued = drained.tx().queued_bytes();
    peer_takes(&mut drained, resumed, queued);
    assert!(drained.read_hint().is_some(), "reading resumed");
    drained.handle_timeout(t0 + idle);
    assert!(
        std::iter::from_fn(|| drained.poll_output()).all(|o| !matches!(o, Output::CloseSocket(_))),
        "not faulted for the silence of its own pause"
    );
    assert_eq!(drained.poll_timeout(), Some(resumed + idle));
}

// Goal: a session nobody comes back for is forgotten. Method: a lossless client vanishes (its socket is cut and
// it never reconnects); the stateful server's session sits in standby until standby_timeout, then closes.
#[test]
fn abandoned_standby_sessions_expire() {
    let mut net = Net::client_server();
    net.send(0, 1);
    net.settle();
    net.restart(0);
    net.settle();
    assert_eq!(net.state(1), State::Standby);
    let t0 = net.now;
    net.tick();
    assert_eq!(net.state(1), State::Closed);
    assert!(net.now >= t0 + Duration::from_secs(900));
    assert!(net.nodes[1].events.ends_with(&["reset", "closed"]));
}

fn server_cfg(policy: Policy, idle: Duration) -> SessionConfig {
    SessionConfig {
        my_name: EntityName::osd(2),
        my_addr: Some(addr(6802)),
        my_nonce: 2,
        policy,
        limits: FrameLimits::default(),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: idle,
        keepalive_interval: None,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(15),
        outgoing_bytes_soft_max: 64 << 20,
        standby_timeout: Duration::from_secs(900),
    }
}

fn released(s: &mut Session) -> (u64, u64) {
    let mut r = (0, 0);
    while let Some(o) = s.poll_output() {
        if let Output::Released { messages, bytes } = o {
            r.0 += messages;
            r.1 += bytes;
        }
    }
    r
}

// Goal: a session whose upper layer is busy (the shell keeps a message a dispatcher refused) reads nothing and
// is not faulted for the silence its own pause causes; the idle clock restarts when it lets go. Method: a 1 s
// idle timeout; input held at 0 s: no read hint and no deadline, no fault at 5 s; released at 5 s: reading
// resumes and the next deadline is 6 s.
#[test]
fn a_held_session_reads_nothing_and_is_not_timed_by_its_silence() {
    let t0 = Instant::now();
    let idle = Duration::from_secs(1);
    let mut s = opened_server_session(server_cfg(Policy::stateful_server(), idle), t0);
    let ident = s.tx().queued_bytes();
    peer_takes(&mut s, t0, ident);
    assert!(s.read_hint().is_some());
    s.hold_input(t0, true);
    assert_eq!(s.read_hint(), None, "nothing is read while input is held");
    assert_eq!(s.poll_timeout(), None, "the peer's silence is ours: not timed");
    let later = t0 + 5 * idle;
    s.handle_timeout(later);
    assert!(std::iter::from_fn(|| s.poll_output()).all(|o| !matches!(o, Output::CloseSocket(_))));
    s.hold_input(later, false);
    assert!(s.read_hint().is_some(), "reading resumes");
    assert_eq!(s.poll_timeout(), Some(later + idle), "the idle clock restarts");
}

// Goal: a lossy message counts against its connection's outgoing bound until its frame is written, not merely
// until it is framed, and a fault gives back what it drops. Method: a lossy server session queues a 1 MiB reply;
// nothing is released until the peer took every byte of its frame; a second reply is dropped by a fault
// (send_backlog_fault, reason SendBacklog) and released with the reset.
#[test]
fn a_lossy_message_leaves_the_outgoing_bytes_once_its_frame_is_written() {
    let t0 = Instant::now();
    let mut s = opened_server_session(server_cfg(Policy::stateless_server(), Duration::from_secs(60)), t0);
    let reply = || Message::new(2, Bytes::from_static(b"r")).with_data(Bytes::from(vec![0; 1 << 20]));
    let bytes = reply().payload_bytes() as u64;
    s.queue_message(t0, reply());
    assert_eq!(released(&mut s), (0, 0), "framed, not written");
    assert_eq!(s.lossy_bytes_in_tx(), bytes);
    let frame = s.tx().queued_bytes();
    peer_takes(&mut s, t0, frame - 1);
    assert_eq!(released(&mut s), (0, 0), "one byte of the frame is still queued");
    peer_takes(&mut s, t0, 1);
    assert_eq!(released(&mut s), (1, bytes), "written");
    assert_eq!(s.lossy_bytes_in_tx(), 0);

    s.queue_message(t0, reply());
    s.send_backlog_fault(t0);
    let outs: Vec<Output> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(outs.iter().any(|o| matches!(o, Output::CloseSocket(CloseReason::SendBacklog))), "{outs:?}");
    assert!(outs.iter().any(|o| matches!(o, Output::Released { messages: 1, bytes: b } if *b == bytes)));
    assert!(outs.iter().any(|o| matches!(o, Output::Reset)));
    assert_eq!(s.state(), State::Closed);
}
