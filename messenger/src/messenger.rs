//! The public API: `Messenger` (one per entity and purpose), `Connection` handles, `Dispatcher`s and the queued
//! dispatch thread. Lifecycle as Ceph's: create, bind, add dispatchers, start, ready (accepting), connect/send,
//! mark_down, shutdown, wait.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::config::MessengerConfig;
use crate::counters::{Counters, CountersSnapshot};
use crate::entity::{EntityName, EntityType, PeerKey};
use crate::message::Message;
use crate::policy::Policy;
use crate::session::{CloseReason, Session, SessionConfig};
use crate::throttle::Throttle;
use crate::worker::{Task, WorkerPool};

/// Upper layers implement this to receive messages and connection events. A dispatcher that returns
/// `can_fast_dispatch == true` for a message gets it inline on the worker thread: it must be quick and must
/// not block. The others are delivered in priority order on the messenger's dispatch thread.
///
/// A dispatcher that cannot take a message now says so with [`Refused::Busy`] instead of dropping it or
/// waiting: the messenger keeps the message, first in line, stops reading its connection (the peer's TCP
/// window fills, as with a full throttle) and offers it again every [`BUSY_RETRY`] until it is taken, before
/// any message received after it.
// Handing the message back on Err is the point of the chain (it moves on or waits, no copy).
#[allow(clippy::result_large_err)]
pub trait Dispatcher: Send + Sync {
    /// Decided from the message alone (its type), never from mutable state.
    fn can_fast_dispatch(&self, _msg: &Message) -> bool {
        false
    }
    /// Handles a message, gives it back for the next dispatcher in the chain ([`Refused::NotMine`]), or gives
    /// it back to be offered again later ([`Refused::Busy`]).
    fn dispatch(&self, conn: &Connection, msg: Message) -> Result<(), Refused>;
    /// A session we initiated, or one a peer initiated, is established.
    fn handle_connect(&self, _conn: &Connection) {}
    /// A lossy session ended on a fault; what was queued on it was dropped.
    fn handle_reset(&self, _conn: &Connection) {}
    /// The peer lost its session state (it restarted); what was queued on the connection was dropped.
    fn handle_remote_reset(&self, _conn: &Connection) {}
}

/// Why a dispatcher gave a message back.
#[derive(Debug)]
pub enum Refused {
    /// Not this dispatcher's message: the next dispatcher in the chain gets it.
    NotMine(Message),
    /// This dispatcher's message, but it cannot take it now (a full queue): the messenger keeps it, stops
    /// reading the connection, and offers it to the same dispatcher again after [`BUSY_RETRY`], before any later
    /// message of that connection.
    Busy(Message),
}

/// How long a message a dispatcher was too busy for waits before it is offered again (as a full throttle's
/// retry, and Ceph's 1 ms throttle timer).
pub const BUSY_RETRY: Duration = Duration::from_millis(1);

/// What became of a message handed to the dispatchers on a worker ([`MsgrInner::deliver`]).
// The Busy case carries the message back to the worker, which keeps it: no copy.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Delivery {
    /// Taken, queued for the dispatch thread, or dropped because nobody claimed it.
    Done,
    /// The fast dispatcher was busy: the worker keeps the message and offers it again later.
    Busy(Message),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("connection is closed")]
    Closed,
    #[error("outgoing bound stayed full for {0:?}")]
    Timeout(Duration),
    #[error("{queued} bytes wait for a peer that does not read them (bound {max}); session faulted")]
    Backlog { queued: u64, max: u64 },
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum MessengerError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("messenger is already bound")]
    AlreadyBound,
    #[error("messenger is shut down")]
    ShutDown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnEvent {
    Ready,
    Reset,
    RemoteReset,
}

/// A handle on a session with one peer. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Connection(pub(crate) Arc<ConnShared>);

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connection({} to {:?} {})", self.0.id, self.0.peer_name(), self.0.key)
    }
}

impl PartialEq for Connection {
    fn eq(&self, o: &Connection) -> bool {
        Arc::ptr_eq(&self.0, &o.0)
    }
}
impl Eq for Connection {}

impl Connection {
    /// Queues a message. The connection holds at most its policy's `send_bytes_max` payload bytes for sending
    /// (queued and unwritten on a lossy session, unacknowledged on a lossless one). At that bound:
    /// - a lossy session refuses the message with [`SendError::Backlog`] and is faulted (its peer is not
    ///   reading what it asked for; the dispatcher hears `handle_reset`, and a client resends on its new
    ///   session);
    /// - a lossless session makes the caller wait, up to the messenger's `send_timeout`, then refuses it with
    ///   [`SendError::Timeout`] (nothing it accepted is ever dropped);
    /// - except on a messenger worker thread (a fast dispatcher, an OSD shard running inline) or a thread marked
    ///   with [`crate::never_wait_on_this_thread`], which must never wait: there a message to a lossless peer is
    ///   accepted over the bound and counted (`send_overruns`). A worker's sends are caused by the message it
    ///   is delivering, and when that message came on a lossy session (a client), the session is not read
    ///   again until the connection is back within its bound.
    pub fn send_message(&self, m: Message) -> Result<(), SendError> {
        self.0.send(m)
    }

    /// Payload bytes this connection holds for sending (see [`Connection::send_message`]).
    pub fn outgoing_bytes(&self) -> u64 {
        self.0.send_bound.in_use().1
    }

    /// The most payload bytes this connection ever held for sending.
    pub fn outgoing_bytes_high_water(&self) -> u64 {
        self.0.send_bound.high_water_bytes()
    }

    /// The connection's outgoing bound (its policy's `send_bytes_max`).
    pub fn outgoing_bytes_max(&self) -> u64 {
        self.0.send_bound.max_bytes()
    }

    /// Sends a keepalive now; its echo updates `rtt()`.
    pub fn send_keepalive(&self) {
        self.0.inbox.lock().keepalive = true;
        self.0.kick();
    }

    /// Ends the session at once, dropping anything queued.
    pub fn mark_down(&self) {
        self.0.inbox.lock().mark_down = true;
        self.0.kick();
    }

    pub fn peer_name(&self) -> Option<EntityName> {
        self.0.peer_name()
    }
    pub fn peer_key(&self) -> PeerKey {
        self.0.key
    }
    /// Round-trip time measured by the last keepalive echo.
    pub fn rtt(&self) -> Option<Duration> {
        match self.0.rtt_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }
    /// True once the session has been established at least once.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }
    pub fn id(&self) -> u64 {
        self.0.id
    }
    /// Messages queued or awaiting acknowledgement, as of the last time the worker looked.
    pub fn unacked_messages(&self) -> usize {
        self.0.unacked.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub(crate) struct Inbox {
    msgs: VecDeque<Message>,
    keepalive: bool,
    mark_down: bool,
    /// A send found the (lossy) session at its outgoing bound: the worker faults it.
    backlog_fault: bool,
}

pub(crate) struct ConnShared {
    pub id: u64,
    pub key: PeerKey,
    pub msgr: Arc<MsgrInner>,
    connect_addr: Option<SocketAddr>,
    peer_name: Mutex<Option<EntityName>>,
    /// The owning worker, and the session's slab token there (usize::MAX until the worker has installed it).
    home_worker: AtomicUsize,
    home_token: AtomicUsize,
    inbox: Mutex<Inbox>,
    /// The inbox has something the worker has not drained yet.
    kicked: AtomicBool,
    /// A `Kick` for this connection is in its worker's task queue (or in a worker's deferred FIFO).
    kick_queued: AtomicBool,
    closed: AtomicBool,
    ready: AtomicBool,
    rtt_ns: AtomicU64,
    unacked: AtomicUsize,
    /// Payload bytes held for sending, bounded by the policy's `send_bytes_max` ([`Connection::send_message`]).
    send_bound: Throttle,
    lossy: bool,
}

impl ConnShared {
    fn send(self: &Arc<Self>, m: Message) -> Result<(), SendError> {
        let max =
            self.msgr.cfg.limits.data_bytes_max as usize + self.msgr.cfg.limits.front_bytes_max as usize;
        if m.payload_bytes() > max {
            return Err(SendError::TooLarge(m.payload_bytes()));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let bytes = m.payload_bytes() as u64;
        if self.lossy {
            if !self.send_bound.try_take(1, bytes) {
                let (queued, max) = (self.send_bound.in_use().1, self.send_bound.max_bytes());
                // Once per fault: sends refused until the worker has faulted the session are not news.
                if !std::mem::replace(&mut self.inbox.lock().backlog_fault, true) {
                    Counters::add(&self.msgr.counters.send_backlog_faults, 1);
                    tracing::info!(peer = %crate::entity::shown_peer(self.peer_name()), conn = self.id, queued, "outgoing bound reached; faulting");
                    self.kick();
                }
                return Err(SendError::Backlog { queued, max });
            }
        } else if crate::worker::must_not_wait() {
            if !self.send_bound.take_over(1, bytes) {
                Counters::add(&self.msgr.counters.send_overruns, 1);
                crate::worker::note_overrun(self);
            }
        } else {
            let timeout = self.msgr.cfg.send_timeout;
            if !self.send_bound.take_wait(1, bytes, timeout) {
                return Err(SendError::Timeout(timeout));
            }
        }
        Counters::add(&self.msgr.counters.msgs_out, 1);
        {
            let mut inbox = self.inbox.lock();
            if self.closed.load(Ordering::Acquire) {
                drop(inbox);
                self.released(1, m.payload_bytes() as u64);
                return Err(SendError::Closed);
            }
            inbox.msgs.push_back(m);
        }
        self.kick();
        Ok(())
    }

    /// Tells the owning worker that the inbox has something. At most one `Kick` per connection is in a
    /// worker's task queue: another is posted only once the worker has taken that one off ([`Self::kick_taken`]).
    fn kick(self: &Arc<Self>) {
        self.kicked.store(true, Ordering::Release);
        if !self.kick_queued.swap(true, Ordering::AcqRel) {
            let w = self.home_worker();
            self.msgr.pool.workers[w].post(Task::Kick(Arc::clone(self)));
        }
    }

    /// The owning worker took this connection's `Kick` off its queue (it drains the inbox next).
    pub fn kick_taken(&self) {
        assert!(self.kick_queued.swap(false, Ordering::AcqRel), "a Kick was taken that was never posted");
    }

    pub fn set_home(&self, worker: usize, token: usize) {
        self.home_worker.store(worker, Ordering::Release);
        self.home_token.store(token, Ordering::Release);
    }
    pub fn home_worker(&self) -> usize {
        self.home_worker.load(Ordering::Acquire)
    }
    pub fn token(&self) -> Option<usize> {
        match self.home_token.load(Ordering::Acquire) {
            usize::MAX => None,
            t => Some(t),
        }
    }
    pub fn connect_addr(&self) -> Option<SocketAddr> {
        self.connect_addr.or(match self.key {
            PeerKey::Listening(a) => Some(a),
            PeerKey::Anonymous(..) => None,
        })
    }
    pub fn peer_name(&self) -> Option<EntityName> {
        *self.peer_name.lock()
    }

    pub fn set_ready(&self, name: Option<EntityName>) {
        if name.is_some() {
            *self.peer_name.lock() = name;
        }
        self.ready.store(true, Ordering::Release);
    }

    /// Something was queued since the worker last drained the inbox (its `Kick` may still be on the way).
    pub fn kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Moves what upper layers queued into the session. Runs on the owning worker.
    pub fn drain_inbox(&self, sess: &mut Session, now: Instant) {
        self.kicked.store(false, Ordering::Release);
        let inbox = std::mem::take(&mut *self.inbox.lock());
        for m in inbox.msgs {
            sess.queue_message(now, m);
        }
        if inbox.keepalive {
            sess.send_keepalive(now);
        }
        if inbox.backlog_fault {
            sess.send_backlog_fault(now);
        }
        if inbox.mark_down {
            sess.mark_down(CloseReason::MarkedDown);
        }
        self.unacked.store(sess.unacked_messages(), Ordering::Relaxed);
        if let Some(rtt) = sess.rtt() {
            self.rtt_ns.store(rtt.as_nanos().max(1) as u64, Ordering::Relaxed);
        }
    }

    pub fn released(&self, messages: u64, bytes: u64) {
        self.send_bound.put(messages, bytes);
    }

    pub fn closed_flag(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether the connection holds more for sending than its bound.
    pub fn over_bound(&self) -> bool {
        self.send_bound.in_use().1 > self.send_bound.max_bytes()
    }

    /// The session is gone: refuse new sends, give back the budget of anything still in the inbox, and leave
    /// the registry.
    pub fn closed(self: &Arc<Self>, sess: &mut Session) {
        self.closed.store(true, Ordering::Release);
        let leftover = std::mem::take(&mut self.inbox.lock().msgs);
        for m in &leftover {
            self.released(1, m.payload_bytes() as u64);
        }
        if let Some(rtt) = sess.rtt() {
            self.rtt_ns.store(rtt.as_nanos().max(1) as u64, Ordering::Relaxed);
        }
        let mut reg = self.msgr.sessions.lock();
        if reg.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, self)) {
            reg.remove(&self.key);
        }
    }
}

enum DispatchItem {
    Message(Connection, Message),
    Event(Connection, ConnEvent),
}

struct Queued {
    priority: u8,
    order: u64,
    item: DispatchItem,
}
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.priority, self.order) == (o.priority, o.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    // Higher priority first; within a priority, first in first out.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.priority.cmp(&o.priority).then(o.order.cmp(&self.order))
    }
}

/// The queued dispatcher's queue. It is bounded by the dispatch throttle: every queued message holds budget.
#[derive(Default)]
struct DispatchQueue {
    heap: Mutex<(BinaryHeap<Queued>, u64, bool)>,
    cond: Condvar,
}

/// The default policy, and one per peer type with its receive throttle.
type Policies = (Policy, HashMap<EntityType, (Policy, Option<Arc<Throttle>>)>);

pub(crate) struct MsgrInner {
    pub name: EntityName,
    pub cfg: MessengerConfig,
    pub pool: Arc<WorkerPool>,
    pub counters: Arc<Counters>,
    pub dispatch_throttle: Arc<Throttle>,
    nonce: u64,
    my_addr: OnceLock<SocketAddr>,
    policies: RwLock<Policies>,
    dispatchers: RwLock<Vec<Arc<dyn Dispatcher>>>,
    pub sessions: Mutex<HashMap<PeerKey, Arc<ConnShared>>>,
    queue: DispatchQueue,
    next_conn_id: AtomicU64,
    cookie_state: AtomicU64,
    shut_down: AtomicBool,
}

impl MsgrInner {
    pub fn session_config(&self, peer_type: EntityType) -> SessionConfig {
        SessionConfig {
            my_name: self.name,
            my_addr: self.my_addr.get().copied(),
            my_nonce: self.nonce,
            policy: self.policy(peer_type),
            limits: self.cfg.limits,
            connect_timeout: self.cfg.connect_timeout,
            idle_timeout: self.cfg.idle_timeout,
            keepalive_interval: self.cfg.keepalive_interval,
            initial_backoff: self.cfg.initial_backoff,
            max_backoff: self.cfg.max_backoff,
            outgoing_bytes_soft_max: self.cfg.outgoing_bytes_soft_max,
            standby_timeout: self.cfg.standby_timeout,
        }
    }

    fn policy(&self, ty: EntityType) -> Policy {
        let p = self.policies.read();
        p.1.get(&ty).map_or(p.0, |x| x.0)
    }

    pub fn policy_throttle(&self, peer: Option<EntityName>) -> Option<Arc<Throttle>> {
        let p = self.policies.read();
        peer.and_then(|n| p.1.get(&n.ty)).and_then(|x| x.1.clone())
    }

    /// A fresh, non-zero session cookie (splitmix64 over a per-messenger seed: unique, not secret).
    pub fn new_cookie(&self) -> u64 {
        let z = self.cookie_state.fetch_add(crate::util::GOLDEN_GAMMA, Ordering::Relaxed);
        crate::util::mix64(z).max(1)
    }

    fn new_conn(
        self: &Arc<Self>,
        key: PeerKey,
        connect_addr: Option<SocketAddr>,
        peer_ty: EntityType,
        worker: usize,
    ) -> Arc<ConnShared> {
        let p = self.policy(peer_ty);
        Arc::new(ConnShared {
            id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            key,
            msgr: Arc::clone(self),
            connect_addr,
            peer_name: Mutex::new(None),
            home_worker: AtomicUsize::new(worker),
            home_token: AtomicUsize::new(usize::MAX),
            inbox: Mutex::new(Inbox::default()),
            kicked: AtomicBool::new(false),
            kick_queued: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            rtt_ns: AtomicU64::new(0),
            unacked: AtomicUsize::new(0),
            send_bound: Throttle::new("send", 0, p.send_bytes_max),
            lossy: p.lossy,
        })
    }

    /// The session an accepted socket belongs to, creating it (owned by `worker`) if there is none.
    pub fn session_for_incoming(
        self: &Arc<Self>,
        key: PeerKey,
        peer: EntityName,
        worker: usize,
    ) -> (Arc<ConnShared>, bool) {
        let mut reg = self.sessions.lock();
        if let Some(c) = reg.get(&key) {
            if !c.closed.load(Ordering::Acquire) {
                return (Arc::clone(c), false);
            }
        }
        let c = self.new_conn(key, None, peer.ty, worker);
        *c.peer_name.lock() = Some(peer);
        reg.insert(key, Arc::clone(&c));
        (c, true)
    }

    /// Hands a received message to the dispatchers: inline to a fast dispatcher that claims it (which may
    /// be busy: the message comes back), else to the dispatch thread's queue.
    pub fn deliver(self: &Arc<Self>, conn: &Arc<ConnShared>, m: Message) -> Delivery {
        let conn = Connection(Arc::clone(conn));
        let ds = self.dispatchers.read();
        if let Some(d) = ds.iter().find(|d| d.can_fast_dispatch(&m)) {
            let d = Arc::clone(d);
            drop(ds);
            return match d.dispatch(&conn, m) {
                Ok(()) => Delivery::Done,
                Err(Refused::Busy(m)) => {
                    Counters::add(&self.counters.dispatch_busy, 1);
                    Delivery::Busy(m)
                }
                Err(Refused::NotMine(m)) => {
                    tracing::warn!(msg = ?m, "fast dispatcher declined a message it claimed; dropped");
                    Delivery::Done
                }
            };
        }
        drop(ds);
        self.enqueue(m.priority, DispatchItem::Message(conn, m));
        Delivery::Done
    }

    pub fn deliver_event(self: &Arc<Self>, conn: &Arc<ConnShared>, ev: ConnEvent) {
        self.enqueue(u8::MAX, DispatchItem::Event(Connection(Arc::clone(conn)), ev));
    }

    fn enqueue(&self, priority: u8, item: DispatchItem) {
        let mut q = self.queue.heap.lock();
        if q.2 {
            return; // shut down
        }
        q.1 += 1;
        let order = q.1;
        q.0.push(Queued { priority, order, item });
        drop(q);
        self.queue.cond.notify_one();
    }

    fn dispatch_loop(self: Arc<Self>) {
        loop {
            let item = {
                let mut q = self.queue.heap.lock();
                loop {
                    if let Some(x) = q.0.pop() {
                        break x.item;
                    }
                    if q.2 {
                        return;
                    }
                    self.queue.cond.wait(&mut q);
                }
            };
            let ds: Vec<Arc<dyn Dispatcher>> = self.dispatchers.read().clone();
            match item {
                DispatchItem::Message(conn, mut m) => {
                    for d in &ds {
                        m = match self.dispatch_queued(d.as_ref(), &conn, m) {
                            None => break,
                            Some(back) => back,
                        };
                    }
                }
                DispatchItem::Event(conn, ev) => {
                    for d in &ds {
                        match ev {
                            ConnEvent::Ready => d.handle_connect(&conn),
                            ConnEvent::Reset => d.handle_reset(&conn),
                            ConnEvent::RemoteReset => d.handle_remote_reset(&conn),
                        }
                    }
                }
            }
        }
    }
}

impl MsgrInner {
    /// Offers a message to one dispatcher on the dispatch thread; returns it if that dispatcher says it is not
    /// its. A busy dispatcher gets the same message again every [`BUSY_RETRY`] and everything behind it in the
    /// queue waits (each queued message holds throttle budget, so the sockets feeding it stop being read),
    /// until it takes the message or the messenger shuts down.
    fn dispatch_queued(&self, d: &dyn Dispatcher, conn: &Connection, mut m: Message) -> Option<Message> {
        loop {
            match d.dispatch(conn, m) {
                Ok(()) => return None,
                Err(Refused::NotMine(back)) => return Some(back),
                Err(Refused::Busy(back)) => {
                    Counters::add(&self.counters.dispatch_busy, 1);
                    if self.queue.heap.lock().2 {
                        return None; // shut down: nothing is delivered any more
                    }
                    m = back;
                    std::thread::sleep(BUSY_RETRY);
                }
            }
        }
    }
}

/// One endpoint: an entity's identity, its policies, its dispatchers and (optionally) a listening socket.
pub struct Messenger {
    inner: Arc<MsgrInner>,
    listener: Mutex<Option<mio::net::TcpListener>>,
    dispatch_thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Messenger({} at {:?})", self.inner.name, self.inner.my_addr.get())
    }
}

impl Messenger {
    /// `nonce` distinguishes instances of the same entity (a restarted daemon); pass something random, such as
    /// the process id mixed with the start time.
    pub fn new(pool: Arc<WorkerPool>, name: EntityName, nonce: u64, cfg: MessengerConfig) -> Messenger {
        let dispatch_throttle = Arc::new(Throttle::new("dispatch", 0, cfg.dispatch_throttle_bytes));
        let inner = Arc::new(MsgrInner {
            name,
            cfg,
            pool,
            counters: Arc::new(Counters::default()),
            dispatch_throttle,
            nonce,
            my_addr: OnceLock::new(),
            policies: RwLock::new((Policy::lossless_peer(), HashMap::new())),
            dispatchers: RwLock::new(Vec::new()),
            sessions: Mutex::new(HashMap::new()),
            queue: DispatchQueue::default(),
            next_conn_id: AtomicU64::new(1),
            cookie_state: AtomicU64::new(nonce ^ 0x6375_7474_6c65),
            shut_down: AtomicBool::new(false),
        });
        Messenger { inner, listener: Mutex::new(None), dispatch_thread: Mutex::new(None) }
    }

    pub fn name(&self) -> EntityName {
        self.inner.name
    }

    pub fn set_default_policy(&self, p: Policy) {
        assert!(p.send_bytes_max > 0, "every connection's outgoing bytes are bounded");
        self.inner.policies.write().0 = p;
    }

    /// The policy for peers of one type, with its receive throttle.
    pub fn set_policy(&self, peer_type: EntityType, p: Policy) {
        assert!(p.send_bytes_max > 0, "every connection's outgoing bytes are bounded");
        let t = (p.throttle_messages > 0 || p.throttle_bytes > 0)
            .then(|| Arc::new(Throttle::new("policy", p.throttle_messages, p.throttle_bytes)));
        self.inner.policies.write().1.insert(peer_type, (p, t));
    }

    /// Binds the listening socket (non-blocking, TCP_NODELAY on accepted sockets, SO_REUSEADDR, the configured
    /// backlog). Port 0 picks a free port; the bound address is returned.
    pub fn bind(&self, addr: SocketAddr) -> Result<SocketAddr, MessengerError> {
        if self.inner.my_addr.get().is_some() {
            return Err(MessengerError::AlreadyBound);
        }
        let err = |source| MessengerError::Bind { addr, source };
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
            .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        s.bind(&addr.into()).map_err(err)?;
        s.listen(self.inner.cfg.listen_backlog).map_err(err)?;
        let std_listener: std::net::TcpListener = s.into();
        let bound = std_listener.local_addr().map_err(err)?;
        self.inner.my_addr.set(bound).map_err(|_| MessengerError::AlreadyBound)?;
        *self.listener.lock() = Some(mio::net::TcpListener::from_std(std_listener));
        tracing::info!(name = %self.inner.name, %bound, "bound");
        Ok(bound)
    }

    pub fn my_addr(&self) -> Option<SocketAddr> {
        self.inner.my_addr.get().copied()
    }

    pub fn add_dispatcher_head(&self, d: Arc<dyn Dispatcher>) {
        self.inner.dispatchers.write().insert(0, d);
    }

    pub fn add_dispatcher_tail(&self, d: Arc<dyn Dispatcher>) {
        self.inner.dispatchers.write().push(d);
    }

    /// Starts the dispatch thread.
    pub fn start(&self) -> io::Result<()> {
        let mut t = self.dispatch_thread.lock();
        if t.is_none() {
            let inner = Arc::clone(&self.inner);
            let name = format!("ms-dispatch-{}", self.inner.name);
            *t = Some(std::thread::Builder::new().name(name).spawn(move || inner.dispatch_loop())?);
        }
        Ok(())
    }

    /// Starts accepting connections (the listener goes to worker 0, as in Ceph).
    pub fn ready(&self) {
        if let Some(l) = self.listener.lock().take() {
            self.inner.pool.workers[0].post(Task::Listen(l, Arc::clone(&self.inner)));
        }
    }

    /// The connection to a peer at `addr`, creating the session (and its first socket) if needed.
    pub fn connect(&self, peer: EntityName, addr: SocketAddr) -> Result<Connection, MessengerError> {
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(MessengerError::ShutDown);
        }
        let key = PeerKey::Listening(addr);
        let mut reg = self.inner.sessions.lock();
        if let Some(c) = reg.get(&key) {
            // A session marked down is closed by its worker a little later, dropping whatever is queued on
            // it: handing it out meanwhile would lose the caller's messages without a reset. A new session
            // takes its place (the peer sees a new session and knows the old one's messages are gone).
            if !c.closed.load(Ordering::Acquire) && !c.inbox.lock().mark_down {
                return Ok(Connection(Arc::clone(c)));
            }
        }
        let w = self.inner.pool.pick_worker();
        let conn = self.inner.new_conn(key, Some(addr), peer.ty, w.idx);
        *conn.peer_name.lock() = Some(peer);
        reg.insert(key, Arc::clone(&conn));
        drop(reg);
        let sess = Session::connect(
            self.inner.session_config(peer.ty),
            addr,
            self.inner.new_cookie(),
            Instant::now(),
        );
        // Kicks posted before the worker installs the session queue behind this task on the same channel.
        w.post(Task::Connect(Arc::clone(&conn), sess));
        Ok(Connection(conn))
    }

    /// Sends to a peer, connecting if needed.
    pub fn send_to(&self, peer: EntityName, addr: SocketAddr, m: Message) -> Result<(), SendError> {
        self.connect(peer, addr).map_err(|_| SendError::Closed)?.send_message(m)
    }

    /// Ends the session with the peer at `addr`, if there is one.
    pub fn mark_down(&self, addr: SocketAddr) {
        let c = self.inner.sessions.lock().get(&PeerKey::Listening(addr)).cloned();
        if let Some(c) = c {
            Connection(c).mark_down();
        }
    }

    pub fn counters(&self) -> CountersSnapshot {
        self.inner.counters.snapshot()
    }

    /// (messages, bytes) currently held by the dispatch throttle, and the most bytes it ever held.
    pub fn dispatch_throttle_usage(&self) -> ((u64, u64), u64) {
        (self.inner.dispatch_throttle.in_use(), self.inner.dispatch_throttle.high_water_bytes())
    }

    /// Closes every socket and session of this messenger and stops its dispatch thread. Returns once every
    /// worker has let go of them.
    pub fn shutdown(&self) {
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.listener.lock().take();
        let (tx, rx) = crossbeam_channel::bounded(self.inner.pool.len());
        for w in &self.inner.pool.workers {
            w.post(Task::ShutdownMessenger(Arc::clone(&self.inner), tx.clone()));
        }
        for _ in 0..self.inner.pool.len() {
            if rx.recv_timeout(Duration::from_secs(10)).is_err() {
                tracing::error!("a worker did not confirm messenger shutdown within 10 s");
                break;
            }
        }
        let mut q = self.inner.queue.heap.lock();
        q.2 = true;
        q.0.clear();
        drop(q);
        self.inner.queue.cond.notify_all();
    }

    /// Waits for the dispatch thread to exit (after `shutdown`).
    pub fn wait(&self) {
        if let Some(t) = self.dispatch_thread.lock().take() {
            if t.join().is_err() {
                tracing::error!("dispatch thread panicked");
            }
        }
    }
}

impl Drop for Messenger {
    fn drop(&mut self) {
        self.shutdown();
        self.wait();
    }
}
