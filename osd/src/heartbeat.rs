//! OSD-to-OSD heartbeats, as Ceph's (`OSD::heartbeat`, `handle_osd_ping`, `heartbeat_check`).
//!
//! Two layers:
//! - [`Heartbeat`]: the failure detector as a sans-IO state machine. It reads no clock (`now` comes in), draws
//!   no random number (the caller passes one per call for the jitter), and talks through [`HbOutput`]s: pings to
//!   send, failure reports to file with the monitor, and cancellations of those reports.
//! - [`HeartbeatService`]: the runtime. Three messengers on the process-wide worker pool (the `hb_front` and
//!   `hb_back` servers, which answer pings inline on the worker thread, and the `hb` client, which sends our
//!   pings) and one thread that drives the state machine.
//!
//! Every peer is pinged on both networks: the front one (the public network clients use) and the back one (the
//! cluster network replication uses). A peer is failed when *either* network has left a ping unanswered for
//! `grace`, because an OSD that clients cannot reach, or that cannot replicate, is as useless as a dead one and
//! should be marked down rather than blackholing I/O (ceph.md §2.5).
//!
//! What it deliberately is not: it does not pick its peers (the OSD does, from the map), does not talk to the
//! monitor (the OSD turns [`HbReport`]s into `MonRequest::OsdFailure`), and does not decide that a peer is
//! down: only the monitor does that, from several reporters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use messenger::util::{round_up_ms, SplitMix64};
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerError, Policy, Refused,
    WorkerPool,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use rados::config::{secs, Config};
use rados::ids::{Epoch, OsdId};
use rados::msg::PingTime;

/// Message type of [`OsdPing`] (the osd crate owns 0x0300..0x03ff).
pub const OSD_PING: u16 = 0x0320;

/// Every ping and ping reply is padded to this many bytes (Ceph's `osd_heartbeat_min_size`, 2000 B). Tiny pings
/// would pass through a link whose MTU is misconfigured (jumbo frames on one side only) while every real data
/// message stalls; padding past 1500 bytes makes such a link fail the heartbeats too, so the broken OSD is
/// reported instead of silently hanging I/O (Ceph PR 15535, tracker 20087).
pub const OSD_PING_MIN_BYTES: usize = 2000;

/// Most heartbeat peers one OSD tracks; extra peers in `set_peers` are ignored (the OSD picks PG peers plus a
/// few neighbours, far fewer than this).
pub const PEERS_MAX: usize = 4096;

/// Unanswered pings remembered per peer and network. At the fastest round (half the interval) this covers far
/// more than any sane grace; past it the second-oldest is forgotten, which keeps the oldest (the failure
/// anchor) exact.
pub const PINGS_OUTSTANDING_MAX: usize = 256;

/// Outputs the state machine may hold before the caller drains them: a round is two pings per peer, plus at
/// most one report or cancel per peer. A caller that never drains is a programmer error.
const OUTPUTS_MAX: usize = 16 * PEERS_MAX;

/// Ceph's fixed part of the pause between rounds (`heartbeat_entry`: 0.5 s + up to 90% of the interval).
const ROUND_BASE: Duration = Duration::from_millis(500);

/// Reply and wakeup events queued towards the heartbeat thread. When it is full, replies are dropped: the
/// thread is not keeping up, which the stall check below notices anyway.
const EVENTS_MAX: usize = 4096;

/// Events handled per loop turn before timers and the stop flag are looked at again.
const EVENTS_PER_TURN: usize = 256;

/// The heartbeat thread never sleeps longer than this (it rechecks the stop flag and its own lateness).
const WAIT_MAX: Duration = Duration::from_secs(1);

/// Pings queued on one connection that has not opened yet. Beyond this the peer is not accepting (a hung
/// process whose kernel still completes TCP handshakes); the connection is dropped and made anew next round.
const CONN_QUEUED_MAX: usize = 8;

/// Shortest interval and grace `HeartbeatService::start` accepts: below these the rounds would spin.
const INTERVAL_MIN: Duration = Duration::from_millis(10);

/// Longest interval and grace `HeartbeatService::start` accepts (a day: anything longer is a typo).
const SETTING_MAX: Duration = Duration::from_secs(86_400);

/// Which network a ping travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Network {
    /// The public network (clients), served by the `hb_front` messenger.
    Front,
    /// The cluster network (replication), served by the `hb_back` messenger.
    Back,
}

impl Network {
    pub const ALL: [Network; 2] = [Network::Front, Network::Back];

    fn idx(self) -> usize {
        match self {
            Network::Front => 0,
            Network::Back => 1,
        }
    }
}

/// The heartbeat message, in both directions. The body travels in the front; the data segment is zero padding
/// up to [`OSD_PING_MIN_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdPing {
    /// The sender.
    pub from: OsdId,
    /// The network the ping was sent on; a reply echoes it, so together with the stamp it names the ping.
    pub network: Network,
    /// The pinger's timestamp, echoed unchanged in the reply: it identifies the ping and measures the RTT.
    pub stamp_ns: u64,
    /// False for a ping, true for its reply.
    pub reply: bool,
    /// The sender's map epoch.
    pub epoch: Epoch,
}

/// The state machine's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// This OSD.
    pub me: OsdId,
    /// `osd_heartbeat_interval`: rounds are 0.5 s + up to 90% of it apart; reports are refreshed this often.
    pub interval: Duration,
    /// `osd_heartbeat_grace`: a ping unanswered this long fails the peer.
    pub grace: Duration,
}

/// A heartbeat peer and its heartbeat addresses (the map's `hb_front` and `hb_back`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub osd: OsdId,
    pub front: SocketAddr,
    pub back: SocketAddr,
}

impl Peer {
    pub fn addr(&self, network: Network) -> SocketAddr {
        match network {
            Network::Front => self.front,
            Network::Back => self.back,
        }
    }
}

/// What the state machine asks its caller to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HbOutput {
    /// Send a ping with this stamp to `peer` on `network`.
    Ping { peer: OsdId, network: Network, stamp_ns: u64 },
    /// Tell the monitor `target` has not answered for `failed_for` (repeated every interval while it lasts).
    Report { target: OsdId, failed_for: Duration },
    /// Withdraw an earlier report: `target` answers again (or is no longer our peer).
    Cancel { target: OsdId },
}

/// One network of one peer.
#[derive(Clone, Debug, Default)]
struct NetState {
    /// Stamps of the pings not answered yet, oldest first.
    outstanding: VecDeque<u64>,
    /// The newest stamp answered; replies to older ones carry no news.
    last_answered: Option<u64>,
    /// The round-trip time of the reply to `last_answered`.
    last_rtt: Option<Duration>,
}

#[derive(Clone, Debug)]
struct PeerState {
    peer: Peer,
    nets: [NetState; 2],
    /// When the last `Report` for this peer went out; `None` while it is not reported.
    reported_at: Option<Instant>,
}

impl PeerState {
    fn new(peer: Peer) -> PeerState {
        PeerState { peer, nets: Default::default(), reported_at: None }
    }

    /// The send stamp of the oldest unanswered ping on either network.
    fn oldest_outstanding(&self) -> Option<u64> {
        self.nets.iter().filter_map(|n| n.outstanding.front().copied()).min()
    }
}

/// The failure detector of one OSD. Drive it with [`Heartbeat::handle_timeout`] at [`Heartbeat::poll_timeout`],
/// feed it replies with [`Heartbeat::handle_reply`], and drain [`Heartbeat::poll_output`] after every call.
#[derive(Debug)]
pub struct Heartbeat {
    cfg: HeartbeatConfig,
    /// Stamps are nanoseconds since this instant, so they fit a u64 and mean nothing to anyone else.
    base: Instant,
    peers: BTreeMap<OsdId, PeerState>,
    /// The next ping round; `None` while there are no peers.
    next_round: Option<Instant>,
    /// Our own processing is stuck: our view of the others is stale, so we accuse nobody.
    local_stall: bool,
    out: VecDeque<HbOutput>,
}

impl Heartbeat {
    pub fn new(cfg: HeartbeatConfig, now: Instant) -> Heartbeat {
        // Rounds at least half a millisecond apart: shorter would spin (and the service refuses under 10 ms).
        assert!(cfg.interval >= Duration::from_millis(1), "heartbeat interval {:?} too short", cfg.interval);
        assert!(!cfg.grace.is_zero(), "heartbeat grace must be positive");
        Heartbeat {
            cfg,
            base: now,
            peers: BTreeMap::new(),
            next_round: None,
            local_stall: false,
            out: VecDeque::new(),
        }
    }

    pub fn config(&self) -> &HeartbeatConfig {
        &self.cfg
    }

    /// Replaces the peer set (after a map change). New peers start with a clean slate; a peer whose addresses
    /// changed (it restarted) keeps its history, so a failure it was reported for is cancelled only once it
    /// answers at its new addresses; a removed peer's report is cancelled. Ourselves and peers beyond
    /// [`PEERS_MAX`] are ignored; for a duplicated id the last entry wins.
    pub fn set_peers(&mut self, now: Instant, peers: Vec<Peer>) {
        let mut wanted: BTreeMap<OsdId, Peer> = BTreeMap::new();
        for p in peers {
            if p.osd == self.cfg.me {
                continue;
            }
            if wanted.len() >= PEERS_MAX && !wanted.contains_key(&p.osd) {
                continue;
            }
            wanted.insert(p.osd, p);
        }
        let removed: Vec<OsdId> = self.peers.keys().filter(|o| !wanted.contains_key(o)).copied().collect();
        for osd in removed {
            let st = self.peers.remove(&osd).expect("key taken from the map");
            if st.reported_at.is_some() {
                self.push(HbOutput::Cancel { target: osd });
            }
        }
        for (osd, p) in wanted {
            self.peers.entry(osd).and_modify(|st| st.peer = p).or_insert_with(|| PeerState::new(p));
        }
        assert!(self.peers.len() <= PEERS_MAX);
        assert!(!self.peers.contains_key(&self.cfg.me));
        // A first peer is pinged at once rather than a whole round later; later additions join the next round.
        match (self.peers.is_empty(), self.next_round) {
            (true, _) => self.next_round = None,
            (false, None) => self.next_round = Some(now),
            (false, Some(_)) => {}
        }
    }

    pub fn peer(&self, osd: OsdId) -> Option<&Peer> {
        self.peers.get(&osd).map(|st| &st.peer)
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values().map(|st| &st.peer)
    }

    /// Tells the detector whether our own processing is stuck (Ceph skips `heartbeat_check` when its heartbeat
    /// queue is older than grace/2). While it is, no peer is reported: the silence is probably ours.
    pub fn set_local_stall(&mut self, stalled: bool) {
        self.local_stall = stalled;
    }

    pub fn local_stall(&self) -> bool {
        self.local_stall
    }

    /// When [`Heartbeat::handle_timeout`] has work next: a ping round, a peer crossing the grace, or a report
    /// to refresh.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_round;
        if !self.local_stall {
            for st in self.peers.values() {
                let at = match (st.reported_at, st.oldest_outstanding()) {
                    (Some(reported), _) => Some(reported + self.cfg.interval),
                    (None, Some(oldest)) => Some(self.instant_of(oldest) + self.cfg.grace),
                    (None, None) => None,
                };
                next = match (next, at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        next
    }

    /// Runs what is due at `now`: a ping round (then the next one is scheduled `rand` decides when, as Ceph's
    /// jitter), and the failure check. `rand` is used only when a round is scheduled.
    pub fn handle_timeout(&mut self, now: Instant, rand: u64) {
        if self.next_round.is_some_and(|t| now >= t) {
            self.ping_round(now);
            let delay = self.round_delay(rand);
            assert!(!delay.is_zero());
            // From now, not from the missed deadline: a late thread pings once, not in a burst.
            self.next_round = Some(now + delay);
        }
        self.check(now);
    }

    /// A reply from `peer` on `network` to our ping with `stamp_ns`. Replies to unknown pings (forged, from a
    /// previous peer set, or older than one already answered) are ignored.
    pub fn handle_reply(&mut self, now: Instant, peer: OsdId, network: Network, stamp_ns: u64) {
        let now_ns = self.stamp_of(now);
        let Some(st) = self.peers.get_mut(&peer) else { return };
        let net = &mut st.nets[network.idx()];
        if stamp_ns > now_ns || !net.outstanding.contains(&stamp_ns) {
            return;
        }
        // A reply to a ping proves the peer was alive after every earlier ping too (as Ceph's ping_history).
        while net.outstanding.front().is_some_and(|&s| s <= stamp_ns) {
            net.outstanding.pop_front();
        }
        assert!(net.last_answered.is_none_or(|a| a < stamp_ns), "answered stamps only grow");
        net.last_answered = Some(stamp_ns);
        net.last_rtt = Some(Duration::from_nanos(now_ns - stamp_ns));
        self.check(now);
    }

    pub fn poll_output(&mut self) -> Option<HbOutput> {
        self.out.pop_front()
    }

    /// The last round-trip time per peer and network, in peer order.
    pub fn ping_times(&self) -> Vec<PingTime> {
        let us = |d: Option<Duration>| d.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.peers
            .values()
            .map(|st| PingTime {
                peer: st.peer.osd,
                front_us: us(st.nets[Network::Front.idx()].last_rtt),
                back_us: us(st.nets[Network::Back.idx()].last_rtt),
            })
            .collect()
    }

    /// How long `osd` has been failed at `now` (since its oldest ping unanswered beyond the grace), if it is.
    pub fn failed_for(&self, now: Instant, osd: OsdId) -> Option<Duration> {
        self.peers.get(&osd).and_then(|st| self.failed_for_state(now, st))
    }

    /// True while `osd` is reported (a `Report` went out and no `Cancel` since).
    pub fn is_reported(&self, osd: OsdId) -> bool {
        self.peers.get(&osd).is_some_and(|st| st.reported_at.is_some())
    }

    fn failed_for_state(&self, now: Instant, st: &PeerState) -> Option<Duration> {
        // The oldest outstanding ping over both networks is the oldest over the failed ones whenever any has
        // failed (a failed network's oldest ping is older than any healthy network's).
        let oldest = self.instant_of(st.oldest_outstanding()?);
        let silent = now.saturating_duration_since(oldest);
        // At or past the grace, so that a timer set for exactly `oldest + grace` finds the peer failed.
        (silent >= self.cfg.grace).then_some(silent)
    }

    /// Emits a report for every failed peer whose report is new or due for a refresh, and a cancel for every
    /// reported peer that is no longer failed.
    fn check(&mut self, now: Instant) {
        let mut emit = Vec::new();
        for st in self.peers.values() {
            match self.failed_for_state(now, st) {
                Some(failed_for) => {
                    let due = st.reported_at.is_none_or(|at| now >= at + self.cfg.interval);
                    if due && !self.local_stall {
                        emit.push(HbOutput::Report { target: st.peer.osd, failed_for });
                    }
                }
                None if st.reported_at.is_some() => emit.push(HbOutput::Cancel { target: st.peer.osd }),
                None => {}
            }
        }
        for o in emit {
            let (target, reported) = match o {
                HbOutput::Report { target, failed_for } => {
                    assert!(failed_for >= self.cfg.grace);
                    (target, Some(now))
                }
                HbOutput::Cancel { target } => (target, None),
                HbOutput::Ping { .. } => unreachable!("check emits no pings"),
            };
            self.peers.get_mut(&target).expect("emitted for a present peer").reported_at = reported;
            self.push(o);
        }
    }

    fn ping_round(&mut self, now: Instant) {
        let stamp_ns = self.stamp_of(now);
        let mut pings = Vec::with_capacity(2 * self.peers.len());
        for st in self.peers.values_mut() {
            for network in Network::ALL {
                let net = &mut st.nets[network.idx()];
                assert!(net.outstanding.back().is_none_or(|&s| s < stamp_ns), "one round per instant");
                if net.outstanding.len() >= PINGS_OUTSTANDING_MAX {
                    // Keep the oldest: it is what failure is measured from.
                    net.outstanding.remove(1);
                }
                net.outstanding.push_back(stamp_ns);
                assert!(net.outstanding.len() <= PINGS_OUTSTANDING_MAX);
                pings.push(HbOutput::Ping { peer: st.peer.osd, network, stamp_ns });
            }
        }
        for p in pings {
            self.push(p);
        }
    }

    /// Ceph's pause between rounds, `0.5 s + U[0, 0.9) × interval`, with the fixed part capped at half the
    /// interval so short test intervals still mean frequent rounds. So with interval 1 s rounds are 0.5–1.4 s
    /// apart, with the default 6 s 0.5–5.9 s.
    fn round_delay(&self, rand: u64) -> Duration {
        // rand / 2^64 is the fraction in [0, 1); integer arithmetic keeps the upper bound strict and the result
        // identical on every platform.
        let spread_ns = self.cfg.interval.as_nanos() * 9 / 10;
        let jitter_ns = (spread_ns * u128::from(rand)) >> 64;
        assert!(jitter_ns < spread_ns.max(1));
        let jitter = Duration::from_nanos(u64::try_from(jitter_ns).unwrap_or(u64::MAX));
        ROUND_BASE.min(self.cfg.interval / 2) + jitter
    }

    fn push(&mut self, o: HbOutput) {
        self.out.push_back(o);
        assert!(self.out.len() <= OUTPUTS_MAX, "heartbeat outputs not drained");
    }

    fn stamp_of(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant_of(&self, stamp_ns: u64) -> Instant {
        self.base + Duration::from_nanos(stamp_ns)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The runtime.

/// What the heartbeat service tells the OSD; it becomes `MonRequest::OsdFailure { alive: false | true, .. }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HbReport {
    /// `target` has not answered on one or both networks for `failed_for` (refreshed every interval).
    Failed { target: OsdId, failed_for: Duration },
    /// `target` answers again: withdraw the report.
    Alive { target: OsdId },
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error("heartbeat messenger: {0}")]
    Messenger(#[from] MessengerError),
    #[error("cannot start a heartbeat thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("bad heartbeat config: {0}")]
    Config(String),
}

/// Sent to the heartbeat thread.
enum Event {
    /// A ping reply, with when the messenger handed it to us (to measure our own queueing delay).
    Reply { from: OsdId, network: Network, stamp_ns: u64, at: Instant },
    /// Look at the stop flag and the pending peer set.
    Wake,
}

/// State shared between the service handle, the thread and the dispatchers.
struct Shared {
    me: OsdId,
    stop: AtomicBool,
    /// The newest peer set not yet taken by the thread (latest wins, so `set_peers` never blocks).
    pending_peers: Mutex<Option<Vec<Peer>>>,
    /// The map epoch our pings and replies carry.
    epoch: AtomicU32,
    ping_times: Mutex<Vec<PingTime>>,
    tx: Sender<Event>,
}

impl Shared {
    fn wake(&self) {
        // A full queue already guarantees the thread is awake and will loop back to the flags.
        let _ = self.tx.try_send(Event::Wake);
    }
}

/// A ping or reply message, padded to [`OSD_PING_MIN_BYTES`].
fn ping_message(ping: &OsdPing) -> Message {
    static PAD: [u8; OSD_PING_MIN_BYTES] = [0; OSD_PING_MIN_BYTES];
    let m = Message::encode(OSD_PING, ping).with_priority(messenger::message::PRIO_HIGH);
    let pad = OSD_PING_MIN_BYTES.saturating_sub(m.front.len());
    let m = m.with_data(Bytes::from_static(&PAD[..pad]));
    assert!(m.payload_bytes() >= OSD_PING_MIN_BYTES);
    m
}

/// The `hb_front` / `hb_back` server side: answers pings inline on the messenger worker.
struct PingServer {
    shared: Arc<Shared>,
    network: Network,
}

impl Dispatcher for PingServer {
    fn can_fast_dispatch(&self, msg: &Message) -> bool {
        msg.msg_type == OSD_PING
    }

    fn dispatch(&self, conn: &Connection, msg: Message) -> Result<(), Refused> {
        if msg.msg_type != OSD_PING {
            // Nothing else belongs on a heartbeat port; dropping it frees its throttle budget.
            tracing::debug!(network = ?self.network, msg_type = msg.msg_type, ?conn, "unexpected message dropped");
            return Ok(());
        }
        let ping = match msg.decode::<OsdPing>() {
            Ok(p) if !p.reply => p,
            Ok(_) => return Ok(()), // a reply sent to a server: not ours to handle
            Err(e) => {
                tracing::debug!(network = ?self.network, ?conn, "bad ping: {e}");
                return Ok(());
            }
        };
        if ping.network != self.network {
            // The pinger's map has our addresses swapped; answer anyway (the echo keeps its bookkeeping right).
            tracing::debug!(network = ?self.network, from = %ping.from, "ping for the other network");
        }
        let reply = OsdPing {
            from: self.shared.me,
            network: ping.network,
            stamp_ns: ping.stamp_ns,
            reply: true,
            epoch: Epoch(self.shared.epoch.load(Ordering::Relaxed)),
        };
        // Never blocks: heartbeat sessions are lossy, so a send at the outgoing bound fails (and faults the
        // session) instead of waiting. A closed connection just loses the reply.
        let _ = conn.send_message(ping_message(&reply));
        Ok(())
    }
}

/// The `hb` client side: hands replies to the heartbeat thread.
struct PingClient {
    shared: Arc<Shared>,
}

impl Dispatcher for PingClient {
    fn can_fast_dispatch(&self, msg: &Message) -> bool {
        msg.msg_type == OSD_PING
    }

    fn dispatch(&self, conn: &Connection, msg: Message) -> Result<(), Refused> {
        if msg.msg_type != OSD_PING {
            tracing::debug!(
                msg_type = msg.msg_type,
                ?conn,
                "unexpected message on the heartbeat client dropped"
            );
            return Ok(());
        }
        let reply = match msg.decode::<OsdPing>() {
            Ok(p) if p.reply => p,
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::debug!(?conn, "bad ping reply: {e}");
                return Ok(());
            }
        };
        // The connection was opened to osd.N's heartbeat address; a reply claiming to be someone else comes
        // from whoever took over that address and proves nothing about osd.N.
        if conn.peer_name() != Some(EntityName::osd(u64::from(reply.from.0))) {
            tracing::debug!(?conn, from = %reply.from, "ping reply from an unexpected peer dropped");
            return Ok(());
        }
        let ev = Event::Reply {
            from: reply.from,
            network: reply.network,
            stamp_ns: reply.stamp_ns,
            at: Instant::now(),
        };
        match self.shared.tx.try_send(ev) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => tracing::debug!("heartbeat queue full: reply dropped"),
            Err(TrySendError::Disconnected(_)) => {} // shutting down
        }
        Ok(())
    }
}

/// The heartbeat runtime of one OSD: servers on both heartbeat networks, a pinging client, and the thread that
/// runs the [`Heartbeat`] state machine.
pub struct HeartbeatService {
    shared: Arc<Shared>,
    front: Arc<Messenger>,
    back: Arc<Messenger>,
    client: Arc<Messenger>,
    front_addr: SocketAddr,
    back_addr: SocketAddr,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for HeartbeatService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeartbeatService({} front {} back {})", self.shared.me, self.front_addr, self.back_addr)
    }
}

impl HeartbeatService {
    /// Binds `hb_front` and `hb_back` on `ip` (free ports), starts them and the `hb` client on `pool`, and
    /// starts the heartbeat thread with no peers. `report` is called on that thread: it must not block for
    /// long (hand the report to the MonClient and return).
    pub fn start(
        pool: Arc<WorkerPool>,
        cfg: &Config,
        me: OsdId,
        nonce: u64,
        ip: IpAddr,
        report: Box<dyn Fn(HbReport) + Send + Sync>,
    ) -> Result<HeartbeatService, HeartbeatError> {
        let check = |name: &str, v: f64| {
            // Checked before `secs`, which cannot represent infinite or astronomically large values.
            let range = INTERVAL_MIN.as_secs_f64()..=SETTING_MAX.as_secs_f64();
            if range.contains(&v) {
                Ok(secs(v))
            } else {
                Err(HeartbeatError::Config(format!("{name} = {v} s is outside {range:?} s")))
            }
        };
        let interval = check("osd_heartbeat_interval", cfg.osd_heartbeat_interval)?;
        let grace = check("osd_heartbeat_grace", cfg.osd_heartbeat_grace)?;
        let hb_cfg = HeartbeatConfig { me, interval, grace };
        let (tx, rx) = crossbeam_channel::bounded(EVENTS_MAX);
        let shared = Arc::new(Shared {
            me,
            stop: AtomicBool::new(false),
            pending_peers: Mutex::new(None),
            epoch: AtomicU32::new(0),
            ping_times: Mutex::new(Vec::new()),
            tx,
        });
        let name = EntityName::osd(u64::from(me.0));
        let msgr = || Arc::new(Messenger::new(Arc::clone(&pool), name, nonce, cfg.messenger()));

        let server = |network: Network| -> Result<(Arc<Messenger>, SocketAddr), HeartbeatError> {
            let m = msgr();
            // Pingers are lossy clients: a fault simply ends the session and they connect again next round.
            // Anyone else who connects gets the same treatment.
            m.set_default_policy(Policy::stateless_server());
            m.set_policy(EntityType::Osd, Policy::stateless_server());
            m.add_dispatcher_head(Arc::new(PingServer { shared: Arc::clone(&shared), network }));
            let addr = m.bind(SocketAddr::new(ip, 0))?;
            m.start().map_err(HeartbeatError::Spawn)?;
            m.ready();
            Ok((m, addr))
        };
        let (front, front_addr) = server(Network::Front)?;
        let (back, back_addr) = server(Network::Back)?;

        let client = msgr();
        client.set_default_policy(Policy::lossy_client());
        client.set_policy(EntityType::Osd, Policy::lossy_client());
        client.add_dispatcher_head(Arc::new(PingClient { shared: Arc::clone(&shared) }));
        client.start().map_err(HeartbeatError::Spawn)?;

        let mut runner = Runner {
            hb: Heartbeat::new(hb_cfg, Instant::now()),
            shared: Arc::clone(&shared),
            client: Arc::clone(&client),
            rx,
            report,
            conns: HashMap::new(),
            rng: SplitMix64(nonce ^ 0x6862_6a69_7474_6572),
            stall_until: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("hb-{me}"))
            .spawn(move || runner.run())
            .map_err(HeartbeatError::Spawn)?;
        tracing::info!(%me, %front_addr, %back_addr, ?interval, ?grace, "heartbeat started");
        Ok(HeartbeatService {
            shared,
            front,
            back,
            client,
            front_addr,
            back_addr,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The `hb_front` address, for the map's `OsdAddrs`.
    pub fn front_addr(&self) -> SocketAddr {
        self.front_addr
    }

    /// The `hb_back` address, for the map's `OsdAddrs`.
    pub fn back_addr(&self) -> SocketAddr {
        self.back_addr
    }

    /// Replaces the peer set (see [`Heartbeat::set_peers`]); `epoch` is the map it was computed from. Never
    /// blocks: the heartbeat thread picks up the newest set.
    pub fn set_peers(&self, epoch: Epoch, peers: Vec<Peer>) {
        self.shared.epoch.fetch_max(epoch.0, Ordering::Relaxed);
        *self.shared.pending_peers.lock() = Some(peers);
        self.shared.wake();
    }

    /// The last round-trip times per peer, front and back.
    pub fn ping_times(&self) -> Vec<PingTime> {
        self.shared.ping_times.lock().clone()
    }

    /// Stops the thread, then the three messengers, and waits for all of them. Idempotent.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.lock().take() {
            if t.join().is_err() {
                tracing::error!(me = %self.shared.me, "heartbeat thread panicked");
            }
        }
        for m in [&self.client, &self.front, &self.back] {
            m.shutdown();
            m.wait();
        }
    }
}

impl Drop for HeartbeatService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The heartbeat thread's state.
struct Runner {
    hb: Heartbeat,
    shared: Arc<Shared>,
    client: Arc<Messenger>,
    rx: Receiver<Event>,
    report: Box<dyn Fn(HbReport) + Send + Sync>,
    /// Our connection to each peer's heartbeat address, per network.
    conns: HashMap<(OsdId, Network), (SocketAddr, Connection)>,
    rng: SplitMix64,
    /// Until when we consider ourselves stalled (see `note_lateness`).
    stall_until: Option<Instant>,
}

impl Runner {
    fn run(&mut self) {
        let mut expected_wake: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            if let Some(w) = expected_wake.take() {
                self.note_lateness(now, now.saturating_duration_since(w));
            }
            let pending = self.shared.pending_peers.lock().take();
            if let Some(peers) = pending {
                self.hb.set_peers(now, peers);
                self.prune_conns();
                self.publish_ping_times();
            }
            self.hb.set_local_stall(self.stall_until.is_some_and(|u| now < u));
            self.hb.handle_timeout(now, self.rng.next_u64());
            self.drain_outputs();

            let mut deadline = self.hb.poll_timeout().map_or(now + WAIT_MAX, |t| t.min(now + WAIT_MAX));
            if let Some(u) = self.stall_until.filter(|&u| u > now) {
                deadline = deadline.min(u); // so the stall ends on time
            }
            let wait = round_up_ms(deadline.saturating_duration_since(now));
            match self.rx.recv_timeout(wait) {
                Ok(ev) => {
                    let mut replies = self.handle_event(ev);
                    for _ in 1..EVENTS_PER_TURN {
                        match self.rx.try_recv() {
                            Ok(ev) => replies |= self.handle_event(ev),
                            Err(_) => break,
                        }
                    }
                    if replies {
                        self.publish_ping_times();
                    }
                }
                Err(RecvTimeoutError::Timeout) => expected_wake = Some(now + wait),
                Err(RecvTimeoutError::Disconnected) => unreachable!("Shared holds a sender"),
            }
        }
        tracing::debug!(me = %self.shared.me, "heartbeat thread stopped");
    }

    /// Handles one event; true if it was a reply.
    fn handle_event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Wake => false,
            Event::Reply { from, network, stamp_ns, at } => {
                let now = Instant::now();
                self.note_lateness(now, now.saturating_duration_since(at));
                self.hb.set_local_stall(self.stall_until.is_some_and(|u| now < u));
                self.hb.handle_reply(now, from, network, stamp_ns);
                self.drain_outputs();
                true
            }
        }
    }

    /// Ceph's reporter self-check: if our heartbeat thread woke, or handled a reply, more than grace/2 late,
    /// this process was stalled (CPU starvation, SIGSTOP, swapping) and the silence we see from peers may be
    /// our own. Accuse nobody until a fresh round has had time to be answered.
    fn note_lateness(&mut self, now: Instant, late: Duration) {
        let hold = self.hb.config().grace / 2;
        if late > hold {
            tracing::warn!(me = %self.shared.me, ?late, "heartbeat processing stalled; not reporting peers");
            self.stall_until = Some(now + hold);
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(o) = self.hb.poll_output() {
            match o {
                HbOutput::Ping { peer, network, stamp_ns } => self.send_ping(peer, network, stamp_ns),
                HbOutput::Report { target, failed_for } => {
                    tracing::info!(me = %self.shared.me, %target, ?failed_for, "peer failed heartbeats");
                    (self.report)(HbReport::Failed { target, failed_for });
                }
                HbOutput::Cancel { target } => {
                    tracing::info!(me = %self.shared.me, %target, "peer answers heartbeats again");
                    (self.report)(HbReport::Alive { target });
                }
            }
        }
    }

    fn send_ping(&mut self, peer: OsdId, network: Network, stamp_ns: u64) {
        let Some(addr) = self.hb.peer(peer).map(|p| p.addr(network)) else { return };
        let key = (peer, network);
        let usable = self
            .conns
            .get(&key)
            .is_some_and(|(a, c)| *a == addr && !c.is_closed() && c.unacked_messages() <= CONN_QUEUED_MAX);
        if !usable {
            if let Some((_, old)) = self.conns.remove(&key) {
                old.mark_down();
            }
            // A lossy session that failed is simply made anew here, once per round.
            match self.client.connect(EntityName::osd(u64::from(peer.0)), addr) {
                Ok(c) => {
                    self.conns.insert(key, (addr, c));
                }
                Err(e) => {
                    tracing::debug!(%peer, ?network, %addr, "cannot connect: {e}");
                    return;
                }
            }
        }
        let (_, conn) = self.conns.get(&key).expect("inserted above");
        let ping = OsdPing {
            from: self.shared.me,
            network,
            stamp_ns,
            reply: false,
            epoch: Epoch(self.shared.epoch.load(Ordering::Relaxed)),
        };
        if let Err(e) = conn.send_message(ping_message(&ping)) {
            // The ping stays outstanding in the state machine: a lost ping counts as an unanswered one.
            tracing::debug!(%peer, ?network, %addr, "ping not sent: {e}");
        }
    }

    /// Drops connections to peers that left the set or moved.
    fn prune_conns(&mut self) {
        let hb = &self.hb;
        self.conns.retain(|(osd, network), (addr, conn)| {
            let keep = hb.peer(*osd).is_some_and(|p| p.addr(*network) == *addr);
            if !keep {
                conn.mark_down();
            }
            keep
        });
    }

    fn publish_ping_times(&self) {
        *self.shared.ping_times.lock() = self.hb.ping_times();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: OsdId = OsdId(0);
    const INTERVAL: Duration = Duration::from_secs(1);
    const GRACE: Duration = Duration::from_secs(3);

    fn peer(n: u32) -> Peer {
        Peer {
            osd: OsdId(n),
            front: SocketAddr::from(([127, 0, 0, 1], 7000 + n as u16)),
            back: SocketAddr::from(([127, 0, 0, 1], 8000 + n as u16)),
        }
    }

    fn new_hb(t0: Instant) -> Heartbeat {
        Heartbeat::new(HeartbeatConfig { me: ME, interval: INTERVAL, grace: GRACE }, t0)
    }

    fn drain(hb: &mut Heartbeat) -> Vec<HbOutput> {
        std::iter::from_fn(|| hb.poll_output()).collect()
    }

    /// Pings sent in `out`, as (peer, network, stamp).
    fn pings(out: &[HbOutput]) -> Vec<(OsdId, Network, u64)> {
        out.iter()
            .filter_map(|o| match *o {
                HbOutput::Ping { peer, network, stamp_ns } => Some((peer, network, stamp_ns)),
                _ => None,
            })
            .collect()
    }

    fn reports(out: &[HbOutput]) -> Vec<HbOutput> {
        out.iter().filter(|o| !matches!(o, HbOutput::Ping { .. })).cloned().collect()
    }

    /// Runs the machine from `from` to `to` at every timer it asks for, answering each ping after `rtt` when
    /// `answer(peer, network, now)` says so. Returns every non-ping output with the time it came out.
    fn run(
        hb: &mut Heartbeat,
        from: Instant,
        to: Instant,
        rtt: Duration,
        rand: &mut impl FnMut() -> u64,
        answer: &mut impl FnMut(OsdId, Network, Instant) -> bool,
    ) -> Vec<(Instant, HbOutput)> {
        let mut now = from;
        let mut replies: Vec<(Instant, OsdId, Network, u64)> = Vec::new();
        let mut seen = Vec::new();
        loop {
            let next_timer = hb.poll_timeout().expect("peers present");
            let next_reply = replies.iter().map(|r| r.0).min();
            let next = next_reply.map_or(next_timer, |r| r.min(next_timer));
            if next > to {
                break;
            }
            assert!(next >= now, "time never goes back");
            now = next;
            if next_reply == Some(now) {
                let i = replies.iter().position(|r| r.0 == now).expect("found above");
                let (_, p, n, s) = replies.remove(i);
                hb.handle_reply(now, p, n, s);
            } else {
                hb.handle_timeout(now, rand());
            }
            for o in drain(hb) {
                match o {
                    HbOutput::Ping { peer, network, stamp_ns } => {
                        if answer(peer, network, now) {
                            replies.push((now + rtt, peer, network, stamp_ns));
                        }
                    }
                    o => seen.push((now, o)),
                }
            }
        }
        seen
    }

    #[test]
    fn round_delay_stays_within_jitter_bounds() {
        // Goal: rounds are min(0.5 s, interval/2) + [0, 0.9) × interval apart, so 0.5–1.4 s at interval 1 s.
        // Method: the delay for the extreme and middle random values, and the real schedule over many rounds.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        assert_eq!(hb.round_delay(0), Duration::from_millis(500));
        assert_eq!(hb.round_delay(u64::MAX / 2 + 1), Duration::from_millis(950));
        let max = hb.round_delay(u64::MAX);
        assert!(max < Duration::from_millis(1400) && max > Duration::from_millis(1399), "{max:?}");
        let short = Heartbeat::new(
            HeartbeatConfig { me: ME, interval: Duration::from_millis(200), grace: GRACE },
            t0,
        );
        assert_eq!(short.round_delay(0), Duration::from_millis(100));
        assert!(short.round_delay(u64::MAX) < Duration::from_millis(280));

        hb.set_peers(t0, vec![peer(1)]);
        assert_eq!(hb.poll_timeout(), Some(t0), "a first peer is pinged at once");
        let mut rng = SplitMix64(42);
        let mut last = None;
        for _ in 0..1000 {
            let now = hb.poll_timeout().expect("peers present");
            hb.handle_timeout(now, rng.next_u64());
            let out = drain(&mut hb);
            let p = pings(&out);
            assert_eq!(p.len(), 2, "both networks each round: {out:?}");
            if let Some(prev) = last {
                let gap: Duration = now - prev;
                assert!(gap >= Duration::from_millis(500) && gap < Duration::from_millis(1400), "{gap:?}");
            }
            last = Some(now);
            // Answer at once so the failure timer never gets in the way.
            for (peer, network, stamp) in p {
                hb.handle_reply(now, peer, network, stamp);
            }
        }
    }

    #[test]
    fn every_round_pings_every_peer_on_both_networks() {
        // Goal: one round is a ping per peer and network, all with the round's stamp, and never to ourselves.
        // Method: three peers plus our own id in the set; one round.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1), peer(2), Peer { osd: ME, ..peer(9) }, peer(3)]);
        let now = t0 + Duration::from_millis(5);
        hb.handle_timeout(now, 0);
        let p = pings(&drain(&mut hb));
        let stamp = 5_000_000;
        let want: Vec<_> = [1, 2, 3]
            .into_iter()
            .flat_map(|n| [(OsdId(n), Network::Front, stamp), (OsdId(n), Network::Back, stamp)])
            .collect();
        assert_eq!(p, want);
        assert_eq!(hb.peer(OsdId(2)).map(|p| p.addr(Network::Back)), Some(peer(2).back));
        assert!(hb.peer(ME).is_none());
    }

    #[test]
    fn silent_peer_is_reported_after_grace_with_failed_for_and_refreshed_every_interval() {
        // Goal: a peer silent on both networks is reported the moment its oldest unanswered ping is `grace`
        // old, with failed_for = time since that ping, then again every interval; a peer that answers is not.
        // Method: peers 1 (answers) and 2 (never answers); run 6.5 s of simulated time.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1), peer(2)]);
        let mut rand = || 0u64; // rounds exactly 0.5 s apart
        let seen = run(
            &mut hb,
            t0,
            t0 + Duration::from_millis(6500),
            Duration::from_millis(1),
            &mut rand,
            &mut |p, _, _| p == OsdId(1),
        );
        // First ping at t0; reported at t0 + 3 s, refreshed at 4, 5, 6 s.
        let want: Vec<_> = [3, 4, 5, 6]
            .into_iter()
            .map(|s| {
                let at = t0 + Duration::from_secs(s);
                (at, HbOutput::Report { target: OsdId(2), failed_for: Duration::from_secs(s) })
            })
            .collect();
        assert_eq!(seen, want);
        assert!(hb.is_reported(OsdId(2)) && !hb.is_reported(OsdId(1)));
        assert_eq!(
            hb.failed_for(t0 + Duration::from_millis(6500), OsdId(2)),
            Some(Duration::from_millis(6500))
        );
        assert_eq!(hb.failed_for(t0 + Duration::from_millis(6500), OsdId(1)), None);
    }

    #[test]
    fn peer_answering_on_one_network_only_is_reported() {
        // Goal: a peer whose back network is silent is failed although its front answers (Ceph needs both).
        // Method: peer 1 answers only front pings; it must be reported at grace.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let seen = run(
            &mut hb,
            t0,
            t0 + Duration::from_millis(3200),
            Duration::from_millis(1),
            &mut || 0,
            &mut |_, n, _| n == Network::Front,
        );
        assert_eq!(seen, vec![(t0 + GRACE, HbOutput::Report { target: OsdId(1), failed_for: GRACE })]);
        let pt = hb.ping_times();
        assert_eq!(pt.len(), 1);
        assert_eq!(pt[0].front_us, Some(1000));
        assert_eq!(pt[0].back_us, None);
    }

    #[test]
    fn report_is_cancelled_once_both_networks_answer_again() {
        // Goal: a reported peer gets exactly one Cancel, and only when both networks answer again.
        // Method: peer 1 is silent until 5 s, then answers front only until 7 s, then both.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let seen = run(
            &mut hb,
            t0,
            t0 + Duration::from_secs(10),
            Duration::from_millis(2),
            &mut || 0,
            &mut |_, n, now| {
                let since = now - t0;
                since >= Duration::from_secs(7) || (since >= Duration::from_secs(5) && n == Network::Front)
            },
        );
        let cancels: Vec<_> = seen.iter().filter(|(_, o)| matches!(o, HbOutput::Cancel { .. })).collect();
        assert_eq!(cancels.len(), 1, "{seen:?}");
        // The first back ping answered is the one sent at 7 s, answered 2 ms later.
        assert_eq!(*cancels[0], (t0 + Duration::from_millis(7002), HbOutput::Cancel { target: OsdId(1) }));
        let reports = seen.iter().filter(|(_, o)| matches!(o, HbOutput::Report { .. })).count();
        assert_eq!(reports, 5, "at 3, 4, 5, 6 and 7 s: {seen:?}");
        assert!(!hb.is_reported(OsdId(1)));
        // After the cancel nothing else is said.
        assert!(matches!(seen.last(), Some((_, HbOutput::Cancel { .. }))));
    }

    #[test]
    fn removed_peer_report_is_cancelled_and_unreported_peer_is_dropped_quietly() {
        // Goal: removing a reported peer cancels its report; removing a healthy one says nothing; a removed
        // peer's late replies are ignored; an empty set stops the rounds.
        // Method: two silent peers, one reported; remove both in two steps.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let seen =
            run(&mut hb, t0, t0 + Duration::from_millis(3100), Duration::ZERO, &mut || 0, &mut |_, _, _| {
                false
            });
        assert_eq!(seen.len(), 1);
        let now = t0 + Duration::from_millis(3200);
        hb.set_peers(now, vec![peer(1), peer(2)]);
        assert!(drain(&mut hb).is_empty());
        hb.set_peers(now, vec![peer(2)]);
        assert_eq!(drain(&mut hb), vec![HbOutput::Cancel { target: OsdId(1) }]);
        hb.handle_reply(now, OsdId(1), Network::Front, 0);
        assert!(drain(&mut hb).is_empty());
        assert!(hb.ping_times().iter().all(|p| p.peer == OsdId(2)));
        hb.set_peers(now, vec![]);
        assert!(drain(&mut hb).is_empty());
        assert_eq!(hb.poll_timeout(), None);
    }

    #[test]
    fn rtts_are_recorded_per_network_and_stale_or_forged_replies_ignored() {
        // Goal: ping_times holds the RTT of the newest answered ping per network, in µs; replies to unknown,
        // future or already-answered stamps change nothing.
        // Method: one round, answered front after 300 µs and back after 1.5 ms, plus bogus replies.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1), peer(2)]);
        hb.handle_timeout(t0, 0);
        let p = pings(&drain(&mut hb));
        let stamp = p[0].2;
        hb.handle_reply(t0 + Duration::from_micros(300), OsdId(1), Network::Front, stamp);
        hb.handle_reply(t0 + Duration::from_micros(1500), OsdId(1), Network::Back, stamp);
        // Bogus: a duplicate, a stamp never sent, one from the future, an unknown peer.
        hb.handle_reply(t0 + Duration::from_millis(9), OsdId(1), Network::Front, stamp);
        hb.handle_reply(t0 + Duration::from_millis(9), OsdId(2), Network::Front, stamp + 1);
        hb.handle_reply(t0 + Duration::from_millis(9), OsdId(2), Network::Back, u64::MAX);
        hb.handle_reply(t0 + Duration::from_millis(9), OsdId(7), Network::Back, stamp);
        assert!(drain(&mut hb).is_empty());
        assert_eq!(
            hb.ping_times(),
            vec![
                PingTime { peer: OsdId(1), front_us: Some(300), back_us: Some(1500) },
                PingTime { peer: OsdId(2), front_us: None, back_us: None },
            ]
        );
        // Peer 2 still has its unanswered pings: failed at grace, not before.
        assert_eq!(hb.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        assert_eq!(hb.failed_for(t0 + GRACE - Duration::from_nanos(1), OsdId(2)), None);
        assert_eq!(hb.failed_for(t0 + GRACE, OsdId(2)), Some(GRACE));
    }

    #[test]
    fn a_reply_answers_every_older_ping_on_its_network() {
        // Goal: as Ceph's ping_history, a reply to a later ping clears earlier unanswered ones, so a peer that
        // lost a few pings is not failed from the first lost one; a late reply to a cleared ping is ignored.
        // Method: three rounds, only the third answered; the peer is then healthy and not failed at grace.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let mut stamps = Vec::new();
        for i in 0..3 {
            let now = hb.poll_timeout().expect("peers present");
            hb.handle_timeout(now, 0);
            assert_eq!(now, t0 + Duration::from_millis(500 * i));
            stamps.push(pings(&drain(&mut hb))[0].2);
        }
        let t = t0 + Duration::from_millis(1001);
        for n in Network::ALL {
            hb.handle_reply(t, OsdId(1), n, stamps[2]);
        }
        hb.handle_reply(t, OsdId(1), Network::Front, stamps[0]);
        assert_eq!(hb.ping_times()[0].front_us, Some(1000), "RTT of the newest answered ping");
        assert_eq!(hb.failed_for(t0 + GRACE, OsdId(1)), None);
        // Nothing is outstanding: the only timer left is the next round.
        assert_eq!(hb.poll_timeout(), Some(t0 + Duration::from_millis(1500)));
    }

    #[test]
    fn local_stall_suppresses_reports_until_it_clears() {
        // Goal: the reporter self-check: while we are stalled we accuse nobody (and ask for no report timers);
        // once the stall clears, a peer still failed is reported at once.
        // Method: a silent peer; stall from 2 s to 5 s.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let seen =
            run(&mut hb, t0, t0 + Duration::from_secs(2), Duration::ZERO, &mut || 0, &mut |_, _, _| false);
        assert!(seen.is_empty());
        hb.set_local_stall(true);
        assert!(hb.local_stall());
        let seen = run(
            &mut hb,
            t0 + Duration::from_secs(2),
            t0 + Duration::from_secs(5),
            Duration::ZERO,
            &mut || 0,
            &mut |_, _, _| false,
        );
        assert!(seen.is_empty(), "{seen:?}");
        // Only the round timer remains while stalled.
        assert_eq!(hb.poll_timeout(), Some(t0 + Duration::from_millis(5500)));
        hb.set_local_stall(false);
        let now = t0 + Duration::from_millis(5001);
        assert!(hb.poll_timeout().is_some_and(|t| t <= now));
        hb.handle_timeout(now, 0);
        assert_eq!(
            reports(&drain(&mut hb)),
            vec![HbOutput::Report { target: OsdId(1), failed_for: now - t0 }]
        );
    }

    #[test]
    fn restarted_peer_keeps_its_report_until_it_answers_at_new_addresses() {
        // Goal: a peer that moves (restart: new addresses) stays reported until it answers, then is cancelled;
        // pings go to the new addresses.
        // Method: report peer 1, move it, answer the next round.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        run(&mut hb, t0, t0 + Duration::from_millis(3100), Duration::ZERO, &mut || 0, &mut |_, _, _| false);
        assert!(hb.is_reported(OsdId(1)));
        let moved = Peer {
            osd: OsdId(1),
            front: SocketAddr::from(([127, 0, 0, 2], 1)),
            back: SocketAddr::from(([127, 0, 0, 2], 2)),
        };
        hb.set_peers(t0 + Duration::from_millis(3200), vec![moved]);
        assert!(drain(&mut hb).is_empty(), "moving is not removing");
        assert_eq!(hb.peer(OsdId(1)), Some(&moved));
        let seen = run(
            &mut hb,
            t0 + Duration::from_millis(3200),
            t0 + Duration::from_secs(4),
            Duration::from_millis(1),
            &mut || 0,
            &mut |_, _, _| true,
        );
        assert_eq!(seen, vec![(t0 + Duration::from_millis(3501), HbOutput::Cancel { target: OsdId(1) })]);
    }

    #[test]
    fn outstanding_pings_are_bounded_and_keep_the_oldest() {
        // Goal: a peer silent for a very long time costs bounded memory, and failed_for still counts from
        // its first unanswered ping.
        // Method: 2000 silent rounds (more than PINGS_OUTSTANDING_MAX), then check the queue and failed_for.
        let t0 = Instant::now();
        let mut hb = new_hb(t0);
        hb.set_peers(t0, vec![peer(1)]);
        let mut now = t0;
        for _ in 0..2000 {
            now = hb.poll_timeout().expect("peers present");
            hb.handle_timeout(now, 0);
            drain(&mut hb);
        }
        let st = &hb.peers[&OsdId(1)];
        assert!(st.nets.iter().all(|n| n.outstanding.len() == PINGS_OUTSTANDING_MAX));
        assert_eq!(hb.failed_for(now, OsdId(1)), Some(now - t0));
    }

    #[test]
    fn same_rand_sequence_gives_the_same_run() {
        // Goal: the machine is deterministic: same inputs and random numbers, same outputs at the same times.
        // Method: two runs of a lossy scenario (random drops) from one seed, compared output by output.
        let go = |seed: u64| {
            let t0 = Instant::now();
            let mut hb = new_hb(t0);
            hb.set_peers(t0, (1..=5).map(peer).collect());
            let mut rng = SplitMix64(seed);
            let mut drops = SplitMix64(seed ^ 1);
            let seen = run(
                &mut hb,
                t0,
                t0 + Duration::from_secs(30),
                Duration::from_millis(3),
                &mut || rng.next_u64(),
                &mut |p, _, now| {
                    // Peer 5 dies at 10 s; the others lose 30% of pings.
                    !(p == OsdId(5) && now - t0 > Duration::from_secs(10)) && drops.next_u64() % 10 >= 3
                },
            );
            seen.into_iter().map(|(t, o)| (t - t0, o)).collect::<Vec<_>>()
        };
        let a = go(7);
        assert_eq!(a, go(7));
        assert!(a.iter().any(|(_, o)| matches!(o, HbOutput::Report { target: OsdId(5), .. })), "{a:?}");
    }

    #[test]
    fn ping_message_is_padded_and_round_trips() {
        // Goal: pings carry at least osd_heartbeat_min_size bytes and decode back to what was sent.
        // Method: encode one, check its size, decode it.
        let p =
            OsdPing { from: OsdId(3), network: Network::Back, stamp_ns: 123, reply: true, epoch: Epoch(9) };
        let m = ping_message(&p);
        assert_eq!(m.msg_type, OSD_PING);
        assert_eq!(m.payload_bytes(), OSD_PING_MIN_BYTES);
        assert_eq!(m.decode::<OsdPing>().expect("decodes"), p);
    }
}
