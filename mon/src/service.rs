//! The monitor's runtime: [`MonState`] driven by a messenger, a tick thread and the store.
//!
//! Threads: the monitor's own messenger worker pool (`ms_async_op_threads`), the messenger's queued dispatch
//! thread, which handles every monitor request (a request may commit an epoch, and a redb commit blocks: it
//! must never run on a worker thread), and a tick thread (every [`TICK_INTERVAL`]). Both the dispatch thread
//! and the tick thread take the one core lock, so requests and ticks are applied one at a time, each as
//! handle -> persist -> publish -> reply.
//!
//! If the store fails to persist, the monitor stops serving at once (it can no longer tell what reached the
//! disk, and its state is ahead of it): [`Monitor::is_failed`] turns true and the daemon exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerError, Policy, Refused,
    WorkerPool, WORKERS_MAX,
};
use parking_lot::Mutex;

use rados::config::Config;
use rados::msg::{types, MonError, MonReply, MonRequest};
use rados::{Epoch, OsdId};

use crate::state::{Effect, MonOptions, MonState, OptionsError, RestoreError};
use crate::store::{Store, StoreError};

/// How often the tick thread runs [`MonState::tick`] (failure grace, down-out timer, health log).
pub const TICK_INTERVAL: Duration = Duration::from_millis(200);
/// Most subscribed connections (OSDs, clients, watchers).
pub const SUBSCRIBERS_MAX: usize = 4096;
/// A subscriber with this many bytes not yet written to it gets no more pushes until it reads: it catches up
/// later from its last epoch (a full map if it fell too far behind), so a subscriber that does not read costs
/// the monitor at most this much memory, not a backlog of every incremental and log entry.
pub const SUBSCRIBER_BACKLOG_MAX: u64 = 1 << 20;
/// Receive throttles, as Ceph's `mon_client_bytes` and `mon_daemon_bytes`.
const CLIENT_BYTES_MAX: u64 = 100 << 20;
const DAEMON_BYTES_MAX: u64 = 400 << 20;
/// Garbage from the network is logged, but not every piece of a flood.
const GARBAGE_LOGGED_FIRST: u64 = 10;
const GARBAGE_LOGGED_EVERY: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("config: mon_host is not set (the address the monitor binds and everyone connects to)")]
    NoMonHost,
    #[error("config: ms_async_op_threads must be in 1..={WORKERS_MAX}, not {0}")]
    Threads(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Messenger(#[from] MessengerError),
    #[error("starting monitor threads: {0}")]
    Io(std::io::Error),
}

/// A running monitor. [`Monitor::shutdown`] (or dropping it) stops it.
pub struct Monitor {
    inner: Arc<Inner>,
    msgr: Arc<Messenger>,
    pool: Arc<WorkerPool>,
    addr: SocketAddr,
    tick_stop: Mutex<Option<Sender<()>>>,
    tick_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Monitor({})", self.addr)
    }
}

struct Inner {
    core: Mutex<Core>,
    clock: Clock,
    failed: AtomicBool,
    garbage: AtomicU64,
}

struct Core {
    state: MonState,
    /// `None` once shut down.
    store: Option<Store>,
    /// By connection id.
    subs: HashMap<u64, Subscriber>,
}

struct Subscriber {
    conn: Connection,
    /// The newest epoch the subscriber has been sent (or said it has).
    have: Option<Epoch>,
    log: bool,
}

/// Where map updates go: a subscriber's connection (a fake in tests).
trait Outbox {
    /// Bytes queued and not yet written to the peer.
    fn outgoing_bytes(&self) -> u64;
    fn send(&self, m: Message) -> bool;
}

impl Outbox for Connection {
    fn outgoing_bytes(&self) -> u64 {
        Connection::outgoing_bytes(self)
    }
    fn send(&self, m: Message) -> bool {
        self.send_message(m).is_ok()
    }
}

fn push_map(state: &MonState, s: &mut Subscriber) {
    push_map_to(state, &s.conn, &mut s.have, SUBSCRIBER_BACKLOG_MAX);
}

/// Brings a subscriber at `have` to the current epoch, unless it has `backlog_max` bytes not yet written to
/// it (then it is left behind, and a later call sends what it missed in one update: a full map if it fell
/// far behind).
fn push_map_to(state: &MonState, to: &dyn Outbox, have: &mut Option<Epoch>, backlog_max: u64) {
    let cur = state.map().epoch;
    if have.is_some_and(|h| h >= cur) || to.outgoing_bytes() >= backlog_max {
        return;
    }
    if let Some(update) = state.map_update_since(*have) {
        if !to.send(Message::encode(types::MON_MAP, &update)) {
            return;
        }
    }
    *have = Some(cur);
}

/// Unix-epoch milliseconds that never go backwards: the wall clock read once at start, plus monotonic time.
/// Timers (grace, down-out) must not jump when the wall clock is stepped.
struct Clock {
    start: Instant,
    start_unix_ms: u64,
}

impl Clock {
    fn new() -> Clock {
        let start_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Clock { start: Instant::now(), start_unix_ms }
    }

    fn now_ms(&self) -> u64 {
        self.start_unix_ms + self.start.elapsed().as_millis() as u64
    }
}

impl Monitor {
    /// Opens (or creates) the store in `data_dir`, binds `mon.0` at `cfg.mon_host` and starts serving.
    pub fn start(cfg: &Config, data_dir: &Path) -> Result<Monitor, MonitorError> {
        let opts = MonOptions::from_config(cfg)?;
        let bind_addr = cfg.mon_host.ok_or(MonitorError::NoMonHost)?;
        if !(1..=WORKERS_MAX).contains(&cfg.ms_async_op_threads) {
            return Err(MonitorError::Threads(cfg.ms_async_op_threads));
        }
        // Bind before touching the store, so that a monitor started on a taken port creates nothing.
        // Locals drop in reverse order on an early return: the messenger shuts down before its pool.
        let pool = WorkerPool::new(cfg.ms_async_op_threads).map_err(MonitorError::Io)?;
        let msgr = Arc::new(Messenger::new(Arc::clone(&pool), EntityName::mon(0), nonce(), cfg.messenger()));
        // Clients and OSDs hold lossy sessions with the monitor (they reconnect and resubscribe); the monitor
        // keeps no session state across faults.
        msgr.set_default_policy(Policy::stateless_server());
        msgr.set_policy(EntityType::Client, Policy::stateless_server().with_throttle(0, CLIENT_BYTES_MAX));
        msgr.set_policy(EntityType::Osd, Policy::stateless_server().with_throttle(0, DAEMON_BYTES_MAX));
        let addr = msgr.bind(bind_addr)?;

        let clock = Clock::new();
        let (state, store) = open_state(opts, data_dir, &clock)?;
        let inner = Arc::new(Inner {
            core: Mutex::new(Core { state, store: Some(store), subs: HashMap::new() }),
            clock,
            failed: AtomicBool::new(false),
            garbage: AtomicU64::new(0),
        });
        msgr.add_dispatcher_tail(Arc::new(MonDispatcher(Arc::clone(&inner))));
        msgr.start().map_err(MonitorError::Io)?;
        msgr.ready();

        let (tick_tx, tick_rx) = crossbeam_channel::bounded(1);
        let tick_inner = Arc::clone(&inner);
        let tick_thread = std::thread::Builder::new()
            .name("mon-tick".into())
            .spawn(move || tick_loop(tick_inner, tick_rx))
            .map_err(MonitorError::Io)?;
        tracing::info!(%addr, "monitor serving");
        Ok(Monitor {
            inner,
            msgr,
            pool,
            addr,
            tick_stop: Mutex::new(Some(tick_tx)),
            tick_thread: Mutex::new(Some(tick_thread)),
        })
    }

    /// The address the monitor listens on (`mon_host`, with the port filled in if it was 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current map's epoch.
    pub fn epoch(&self) -> Epoch {
        self.inner.core.lock().state.map().epoch
    }

    /// The store failed: the monitor has stopped serving and its process should exit non-zero.
    pub fn is_failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// Stops the tick thread, the messenger and the worker pool (threads joined), and closes the store.
    /// Idempotent.
    pub fn shutdown(&self) {
        drop(self.tick_stop.lock().take());
        if let Some(t) = self.tick_thread.lock().take() {
            if t.join().is_err() {
                tracing::error!("the monitor tick thread panicked");
            }
        }
        self.msgr.shutdown();
        self.msgr.wait();
        self.pool.shutdown();
        let mut core = self.inner.core.lock();
        core.subs.clear();
        if core.store.take().is_some() {
            tracing::info!("monitor stopped");
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The state from the store in `data_dir`, or a new cluster (whose first epoch is persisted before this
/// returns).
fn open_state(opts: MonOptions, data_dir: &Path, clock: &Clock) -> Result<(MonState, Store), MonitorError> {
    let (mut store, persisted) = Store::open(data_dir, opts.fsid)?;
    let state = match persisted {
        Some(p) => {
            let state = MonState::restore(opts, p, clock.now_ms())?;
            tracing::info!(epoch = %state.map().epoch, fsid = %state.map().fsid, "monitor store opened");
            state
        }
        None => {
            let (state, effects) = MonState::create(opts, clock.now_ms());
            store.persist(&effects, state.map())?;
            tracing::info!(fsid = %state.map().fsid, "new monitor store created");
            state
        }
    };
    Ok((state, store))
}

fn tick_loop(inner: Arc<Inner>, stop: Receiver<()>) {
    loop {
        match stop.recv_timeout(TICK_INTERVAL) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // The sender is dropped (or sent) at shutdown.
            _ => return,
        }
        let mut core = inner.core.lock();
        if core.store.is_none() || inner.failed.load(Ordering::Acquire) {
            continue;
        }
        core.subs.retain(|_, s| !s.conn.is_closed());
        let effects = core.state.tick(inner.clock.now_ms());
        inner.apply(&mut core, effects);
        inner.catch_up(&mut core);
    }
}

impl Inner {
    fn handle_request(&self, conn: &Connection, m: Message) {
        let req: MonRequest = match m.decode() {
            Ok(r) => r,
            Err(e) => {
                self.garbage(conn, &format!("undecodable monitor request: {e}"));
                let reply = MonReply::Error(MonError::Invalid("cannot decode the request".into()));
                let _ = conn.send_message(Message::encode(types::MON_REPLY, &reply).with_tid(m.tid));
                return;
            }
        };
        let from_osd = conn
            .peer_name()
            .filter(|n| n.ty == EntityType::Osd)
            .and_then(|n| u32::try_from(n.num).ok())
            .map(OsdId);
        let mut core = self.core.lock();
        if core.store.is_none() || self.failed.load(Ordering::Acquire) {
            return;
        }
        if let MonRequest::Subscribe { have, log } = req {
            self.subscribe(&mut core, conn, have, log);
            return;
        }
        tracing::debug!(peer = ?conn.peer_name(), ?req, "request");
        let (reply, effects) = core.state.handle(self.clock.now_ms(), from_osd, req);
        if !self.apply(&mut core, effects) {
            return; // Not durable: must not be acknowledged.
        }
        drop(core);
        let _ = conn.send_message(Message::encode(types::MON_REPLY, &reply).with_tid(m.tid));
    }

    fn subscribe(&self, core: &mut Core, conn: &Connection, have: Option<Epoch>, log: bool) {
        let cur = core.state.map().epoch;
        if have.is_some_and(|h| h > cur) {
            tracing::warn!(peer = %messenger::entity::shown_peer(conn.peer_name()), ?have, %cur, "subscriber claims a newer map than ours");
        }
        if !core.subs.contains_key(&conn.id()) {
            core.subs.retain(|_, s| !s.conn.is_closed());
            if core.subs.len() >= SUBSCRIBERS_MAX {
                tracing::warn!(peer = %messenger::entity::shown_peer(conn.peer_name()), "too many subscribers; subscription refused");
                return;
            }
        }
        if let Some(update) = core.state.map_update_since(have) {
            let _ = conn.send_message(Message::encode(types::MON_MAP, &update));
        }
        core.subs.insert(conn.id(), Subscriber { conn: conn.clone(), have: Some(cur), log });
    }

    /// Persists the effects of one state-machine call, then publishes them. Returns false (and fails the
    /// monitor) if they could not be made durable.
    fn apply(&self, core: &mut Core, effects: Vec<Effect>) -> bool {
        if effects.is_empty() {
            return true;
        }
        let Core { state, store, subs } = core;
        let Some(store) = store.as_mut() else { return false };
        if let Err(e) = store.persist(&effects, state.map()) {
            tracing::error!("cannot persist the monitor state: {e}; the monitor stops");
            self.failed.store(true, Ordering::Release);
            return false;
        }
        let committed = effects.iter().any(|e| matches!(e, Effect::Commit(_)));
        subs.retain(|_, s| !s.conn.is_closed());
        if committed {
            tracing::info!(epoch = %state.map().epoch, "committed");
            for s in subs.values_mut() {
                push_map(state, s);
            }
        }
        for e in &effects {
            if let Effect::Log(entry) = e {
                tracing::info!(target: "cluster", seq = entry.seq, "{}", entry.message);
                // The log is best effort for a watcher that does not read: entries beyond its backlog are
                // not queued for it (it can ask for the last entries with `cuttle log`).
                for s in subs.values().filter(|s| s.log && s.conn.outgoing_bytes() < SUBSCRIBER_BACKLOG_MAX) {
                    let _ = s.conn.send_message(Message::encode(types::MON_LOG, entry));
                }
            }
        }
        true
    }

    /// Sends subscribers that were left behind (their backlog was full) what they missed, once they read.
    fn catch_up(&self, core: &mut Core) {
        let Core { state, subs, .. } = core;
        for s in subs.values_mut() {
            push_map(state, s);
        }
    }

    fn garbage(&self, conn: &Connection, what: &str) {
        let n = self.garbage.fetch_add(1, Ordering::Relaxed);
        if n < GARBAGE_LOGGED_FIRST || n.is_multiple_of(GARBAGE_LOGGED_EVERY) {
            tracing::warn!(peer = %messenger::entity::shown_peer(conn.peer_name()), key = %conn.peer_key(), dropped_so_far = n, "{what}; dropped");
        }
    }
}

/// Receives monitor requests on the queued dispatch thread (never fast: handling one may block on a commit).
struct MonDispatcher(Arc<Inner>);

impl Dispatcher for MonDispatcher {
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        match m.msg_type {
            types::MON_REQUEST => self.0.handle_request(conn, m),
            other => self.0.garbage(conn, &format!("message of type {other:#06x} is not for the monitor")),
        }
        Ok(())
    }

    fn handle_reset(&self, conn: &Connection) {
        self.0.core.lock().subs.remove(&conn.id());
    }

    fn handle_remote_reset(&self, conn: &Connection) {
        self.0.core.lock().subs.remove(&conn.id());
    }
}

/// A messenger nonce that differs between monitor instances (a restarted monitor is a new peer instance).
fn nonce() -> u64 {
    messenger::util::entropy()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::cell::RefCell;

    use rados::msg::MapUpdate;

    /// A subscriber that reads nothing until told to: what it was sent piles up here.
    #[derive(Default)]
    struct Stalled {
        queued: RefCell<Vec<Message>>,
    }

    impl Outbox for Stalled {
        fn outgoing_bytes(&self) -> u64 {
            self.queued.borrow().iter().map(|m| m.payload_bytes() as u64).sum()
        }
        fn send(&self, m: Message) -> bool {
            self.queued.borrow_mut().push(m);
            true
        }
    }

    // Goal: a subscriber that does not read costs the monitor at most its backlog bound, however many epochs
    // pass, and once it reads it catches up in one update. Method: 600 epochs (OSD registrations) with a
    // subscriber that never reads and a 4 KiB bound: what is queued for it stays within the bound plus one
    // update; then it reads everything and one more push brings it to the newest epoch with a full map.
    #[test]
    fn a_subscriber_that_does_not_read_is_bounded_and_catches_up_with_one_update() {
        const BOUND: u64 = 4096;
        let cfg = Config { fsid: rados::Fsid([3; 16]).to_string(), ..Config::default() };
        let (mut state, _) = MonState::create(MonOptions::from_config(&cfg).unwrap(), 1_000);
        let sub = Stalled::default();
        let mut have = Some(state.map().epoch);
        let mut largest = 0;
        for i in 0..600u32 {
            let mut uuid = [0xa5u8; 16];
            uuid[..4].copy_from_slice(&i.to_le_bytes());
            let (reply, _) = state.handle(1_000, None, MonRequest::OsdNew { uuid, host: "h".into() });
            assert!(matches!(reply, MonReply::OsdId(_)), "{reply:?}");
            push_map_to(&state, &sub, &mut have, BOUND);
            largest = largest.max(sub.queued.borrow().last().map_or(0, |m| m.payload_bytes() as u64));
            assert!(sub.outgoing_bytes() <= BOUND + largest, "{} bytes queued", sub.outgoing_bytes());
        }
        let behind = have.unwrap();
        assert!(behind < state.map().epoch, "the subscriber was left behind");
        sub.queued.borrow_mut().clear();
        push_map_to(&state, &sub, &mut have, BOUND);
        assert_eq!(have, Some(state.map().epoch));
        let q = sub.queued.borrow();
        assert_eq!(q.len(), 1, "one update brings it up to date");
        let update: MapUpdate = q[0].decode().unwrap();
        assert_eq!(update.full.map(|m| m.epoch), Some(state.map().epoch), "far behind: a full map");
    }
}
