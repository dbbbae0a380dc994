//! The mio shell: a pool of worker threads, each owning one `mio::Poll` (its event center) with socket events,
//! timers and a queue of external tasks. This is the only code in the project that touches sockets. It moves
//! bytes between sockets and the sans-IO state machines in `session.rs`, and turns their outputs into socket
//! operations and dispatcher calls.
//!
//! A socket is owned by exactly one worker for its life on that worker. Sockets move between workers only as a
//! whole (deregistered here, registered there), when an accepted socket's handshake names a session that lives
//! on another worker.
//!
//! A worker also serves *guests*: event sources that are not messenger sessions (the NBD server's listener and
//! connections), so that their work runs on the same thread as the messenger traffic it causes instead of
//! handing off to a loop of their own. The worker only registers a guest, tells it when its source is ready or
//! when it was kicked ([`GuestHandle::kick`]), and drops it when it says it is done; what the guest does with
//! its socket is its own business.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use parking_lot::Mutex;
use slab::Slab;

use crate::counters::Counters;
use crate::entity::EntityType;
use crate::frame::{RxBuf, TxQueue, IOV_MAX};
use crate::message::Message;
use crate::messenger::{ConnShared, Delivery, MsgrInner, BUSY_RETRY};
use crate::session::{Acceptor, Adoption, CloseReason, HandshakeRequest, Output, Session};
use crate::throttle::ThrottleGrant;

const WAKER_TOKEN: Token = Token(usize::MAX);
/// Guests' tokens are their slab keys plus this, apart from the sessions' (a slab never gets near it).
const GUEST_TOKEN_BASE: usize = 1 << (usize::BITS - 1);
/// A connection blocked on a throttle looks again after this long (Ceph re-arms a 1 ms timer too).
const THROTTLE_RETRY: Duration = Duration::from_millis(1);
/// Events handled per `poll` call.
const EVENTS_CAPACITY: usize = 1024;

/// The most tasks a worker's queue holds. A thread that is not a worker waits for room (workers never wait for
/// anything, so room comes); a worker never waits (it could be waiting for itself, or for a worker waiting for
/// it): it keeps what it could not post in its own FIFO and posts it from its loop ([`post_deferred`]). What a
/// worker posts to another is at most one `Kick` per connection and one `KickGuest` per guest until the target
/// takes it off its queue (the `kick_queued` and `kicked` flags), one `Route` per accepted socket and one
/// `Connect` per session, so that FIFO is bounded by the sessions and sockets the worker has; an accepted socket
/// whose chosen worker's queue is full stays on the accepting worker instead.
pub const TASK_QUEUE_MAX: usize = 1024;
/// A thread that is not a worker and finds a worker's queue full logs after waiting this long, and waits on.
const TASK_POST_WAIT: Duration = Duration::from_secs(10);
/// A worker holding tasks it could not post looks again after this long.
const TASK_RETRY: Duration = Duration::from_millis(1);

/// Cross-thread work for a worker, in a queue of at most [`TASK_QUEUE_MAX`].
pub(crate) enum Task {
    Listen(TcpListener, Arc<MsgrInner>),
    Accepted(TcpStream, Arc<MsgrInner>),
    Connect(Arc<ConnShared>, Session),
    Route { conn: Arc<ConnShared>, stream: TcpStream, req: HandshakeRequest, rx: RxBuf },
    Kick(Arc<ConnShared>),
    AddGuest(Arc<GuestShared>, Box<dyn Guest>),
    KickGuest(Arc<GuestShared>),
    ShutdownMessenger(Arc<MsgrInner>, Sender<()>),
    Stop,
}

pub(crate) struct WorkerShared {
    pub idx: usize,
    tx: Sender<Task>,
    waker: Waker,
    /// Set while a wakeup is pending; the waker is written only on the empty-to-non-empty edge.
    woken: AtomicBool,
    /// Sockets owned: new connections go to the least-loaded worker.
    pub load: AtomicUsize,
}

thread_local! {
    /// The worker running on this thread, if any (its `WorkerShared` address), so that a worker posting to
    /// itself (a fast dispatcher replying inline) skips the eventfd write: its loop drains tasks before it
    /// polls again.
    static CURRENT_WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// True on any messenger worker's thread (where nothing may wait).
pub(crate) fn on_worker_thread() -> bool {
    CURRENT_WORKER.with(|c| c.get()) != 0
}

thread_local! {
    /// Set by [`never_wait_on_this_thread`].
    static NEVER_WAITS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one that must never wait on a connection's outgoing bound, as a worker must not:
/// a thread that runs events on behalf of the workers (an OSD's shard thread, which runs the events the workers
/// queued for it). Its sends on lossless connections go over the bound instead of waiting
/// (`Connection::send_message`). Otherwise two daemons whose shard threads each waited for the other's
/// connection to drain, while their workers held the other's messages for those very shards (a dispatcher
/// that is busy), would wait for each other.
pub fn never_wait_on_this_thread() {
    NEVER_WAITS.with(|c| c.set(true));
}

/// True where a send must not wait: a worker, or a thread marked with [`never_wait_on_this_thread`].
pub(crate) fn must_not_wait() -> bool {
    on_worker_thread() || NEVER_WAITS.with(|c| c.get())
}

thread_local! {
    /// A lossless connection this worker thread queued a message on beyond its outgoing bound while delivering
    /// a message (see [`note_overrun`]).
    static OVERRUN: std::cell::RefCell<Option<Arc<ConnShared>>> = const { std::cell::RefCell::new(None) };
}

/// A worker thread queued a message on `conn` beyond its outgoing bound. The session whose message was being
/// delivered then stops reading until `conn` is back within its bound, if it is lossy: a client is where load
/// comes from, and holding it back cannot close a cycle (two daemons that each stopped reading the other until
/// the other read would wait forever; daemon peers never stop reading for a backlog).
pub(crate) fn note_overrun(conn: &Arc<ConnShared>) {
    if on_worker_thread() {
        OVERRUN.with(|o| *o.borrow_mut() = Some(Arc::clone(conn)));
    }
}

fn take_overrun() -> Option<Arc<ConnShared>> {
    OVERRUN.with(|o| o.borrow_mut().take())
}

impl WorkerShared {
    /// True on this worker's own thread.
    fn is_current(&self) -> bool {
        CURRENT_WORKER.with(|c| c.get()) == self as *const WorkerShared as usize
    }

    /// Queues a task for this worker. Off the workers it waits while the queue is full; on a worker it never
    /// waits: a task that does not fit, and every task the same worker posts after it, waits in that worker's
    /// own FIFO instead ([`post_deferred`]), so one thread's tasks arrive in the order it posted them.
    pub fn post(self: &Arc<Self>, t: Task) {
        if on_worker_thread() {
            DEFERRED.with(|d| {
                let mut d = d.borrow_mut();
                if !d.is_empty() {
                    d.push_back((Arc::clone(self), t));
                    return;
                }
                match self.tx.try_send(t) {
                    Ok(()) => self.wake(),
                    Err(TrySendError::Disconnected(_)) => {} // the worker has stopped; the pool is shutting down
                    Err(TrySendError::Full(t)) => d.push_back((Arc::clone(self), t)),
                }
            });
            return;
        }
        let mut t = match self.tx.try_send(t) {
            Ok(()) => return self.wake(),
            Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(t)) => t,
        };
        loop {
            match self.tx.send_timeout(t, TASK_POST_WAIT) {
                Ok(()) => return self.wake(),
                Err(SendTimeoutError::Disconnected(_)) => return,
                Err(SendTimeoutError::Timeout(back)) => {
                    tracing::error!(
                        "worker {} has not taken a task in {TASK_POST_WAIT:?}; waiting on",
                        self.idx
                    );
                    t = back;
                }
            }
        }
    }

    /// Queues a task if there is room now; gives it back otherwise.
    // The task comes back to the caller, which handles it another way: no copy.
    #[allow(clippy::result_large_err)]
    fn try_post(self: &Arc<Self>, t: Task) -> Result<(), Task> {
        match self.tx.try_send(t) {
            Ok(()) => {
                self.wake();
                Ok(())
            }
            Err(TrySendError::Full(t)) => Err(t),
            Err(TrySendError::Disconnected(_)) => Ok(()), // stopped: nobody will take it anywhere
        }
    }

    fn wake(&self) {
        if self.is_current() {
            return;
        }
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!("cannot wake worker {}: {e}", self.idx);
            }
        }
    }
}

thread_local! {
    /// Tasks this worker thread could not post because their target's queue was full, in the order it posted
    /// them (see [`TASK_QUEUE_MAX`] for why this is bounded).
    static DEFERRED: RefCell<VecDeque<(Arc<WorkerShared>, Task)>> = const { RefCell::new(VecDeque::new()) };
}

/// Posts what this worker thread deferred, in order, until a target is still full. Returns whether anything
/// is left.
fn post_deferred() -> bool {
    DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        while let Some((w, t)) = d.pop_front() {
            match w.tx.try_send(t) {
                Ok(()) => w.wake(),
                Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(t)) => {
                    d.push_front((w, t));
                    return true;
                }
            }
        }
        false
    })
}

/// N event-loop threads shared by every messenger in the process.
pub struct WorkerPool {
    pub(crate) workers: Vec<Arc<WorkerShared>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerPool({} workers)", self.workers.len())
    }
}

/// Default worker count (Ceph's ms_async_op_threads).
pub const WORKERS_DEFAULT: usize = 3;
pub const WORKERS_MAX: usize = 24;
/// Default time a worker polls without sleeping while a lossless peer owes it an answer ([`Worker::spin`]).
pub const SPIN_DEFAULT: Duration = Duration::from_micros(30);

impl WorkerPool {
    /// `n` workers that spin for [`SPIN_DEFAULT`].
    pub fn new(n: usize) -> io::Result<Arc<WorkerPool>> {
        WorkerPool::with_spin(n, SPIN_DEFAULT)
    }

    /// `n` workers that poll without sleeping for up to `spin` after handling events while a lossless peer owes
    /// them an acknowledgement (zero: never).
    pub fn with_spin(n: usize, spin: Duration) -> io::Result<Arc<WorkerPool>> {
        assert!((1..=WORKERS_MAX).contains(&n), "worker count {n} outside 1..={WORKERS_MAX}");
        let mut workers = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for idx in 0..n {
            let poll = Poll::new()?;
            let waker = Waker::new(poll.registry(), WAKER_TOKEN)?;
            let (tx, rx) = crossbeam_channel::bounded(TASK_QUEUE_MAX);
            let shared = Arc::new(WorkerShared {
                idx,
                tx,
                waker,
                woken: AtomicBool::new(false),
                load: AtomicUsize::new(0),
            });
            let worker = Worker::new(Arc::clone(&shared), poll, rx, spin);
            let handle =
                std::thread::Builder::new().name(format!("msgr-worker-{idx}")).spawn(move || worker.run())?;
            workers.push(shared);
            threads.push(handle);
        }
        Ok(Arc::new(WorkerPool { workers, threads: Mutex::new(threads) }))
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Picks the least-loaded worker for a new socket and charges it at once, so that a burst of connects
    /// spreads out instead of all landing on the worker that looked idle when the burst began (Ceph's
    /// `NetworkStack::get_worker`). The task that carries the socket must be inserted with `precharged`.
    pub(crate) fn pick_worker(&self) -> &Arc<WorkerShared> {
        let w =
            self.workers.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)).expect("at least one worker");
        w.load.fetch_add(1, Ordering::Relaxed);
        w
    }

    /// Tasks waiting in each worker's queue (at most [`TASK_QUEUE_MAX`] each).
    pub fn queued_tasks(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.tx.len()).collect()
    }

    /// Sockets owned by each worker.
    pub fn loads(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.load.load(Ordering::Relaxed)).collect()
    }

    /// Stops every worker and joins its thread. Messengers should be shut down first.
    pub fn shutdown(&self) {
        for w in &self.workers {
            w.post(Task::Stop);
        }
        for t in self.threads.lock().drain(..) {
            if t.join().is_err() {
                tracing::error!("a messenger worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether an edge-triggered socket may hold input not read yet: the one rule for every reader of such a socket
/// (messenger sessions, guests). An event says "may"; a read that comes back short, or would block, says
/// "drained" (new input raises a new edge), except that once the peer's FIN was seen a short read is not the
/// end, since the EOF after the data raises no edge of its own: reads then go on until they return it.
/// Tracking this saves the EAGAIN read that every wake-up for some other reason would otherwise cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadReadiness {
    may_read: bool,
    read_closed: bool,
}

impl ReadReadiness {
    /// A socket just attached: it may hold input already.
    pub fn attached() -> ReadReadiness {
        ReadReadiness { may_read: true, read_closed: false }
    }

    /// A readiness event: `readable`, and whether the peer closed its side (or the socket failed).
    pub fn on_event(&mut self, readable: bool, read_closed: bool) {
        self.may_read |= readable || read_closed;
        self.read_closed |= read_closed;
    }

    pub fn may_read(&self) -> bool {
        self.may_read
    }

    /// A read returned less than the room offered.
    pub fn short_read(&mut self) {
        if !self.read_closed {
            self.may_read = false;
        }
    }

    /// A read would block.
    pub fn would_block(&mut self) {
        self.may_read = false;
    }
}

/// What a guest is told when the worker calls it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestEvent {
    /// The source became readable (also set with `read_closed`).
    pub readable: bool,
    /// The source became writable.
    pub writable: bool,
    /// The peer closed its side, or the socket failed: with edge-triggered readiness, reads should go on
    /// until they return the end (or the error), since no further edge will come.
    pub read_closed: bool,
    /// [`GuestHandle::kick`] was called since the guest was last called for a kick.
    pub kicked: bool,
}

/// An event source a worker serves on its own event loop besides the messenger's sockets: a listener or a
/// socket of another protocol, with its state (see the module doc). A guest is called only on its worker's
/// thread, one call at a time, and must not block there: it shares the thread with every messenger session of
/// the worker.
pub trait Guest: Send + 'static {
    /// Registers the guest's one source with `registry` under `token`. Register it edge-triggered for every
    /// readiness it needs (all mio sources are): the guest is called once per edge and must drain what it
    /// can (until `WouldBlock`) or remember that it stopped early. An error drops the guest.
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()>;
    /// The source is ready, or the guest was kicked. Returns false when the guest is done: the worker then
    /// calls [`Guest::deregister`] and drops it. Calls may be spurious (an event for a token that a guest
    /// removed earlier had, say): a read or write that would block is the answer to those.
    fn ready(&mut self, ev: GuestEvent) -> bool;
    /// Takes the source out of `registry` (after `ready` returned false).
    fn deregister(&mut self, registry: &Registry);
}

/// The shared half of a guest: which worker serves it, where, and whether a kick is on its way.
pub(crate) struct GuestShared {
    worker: Arc<WorkerShared>,
    /// The guest's slab key on its worker (usize::MAX until the worker has installed it).
    key: AtomicUsize,
    kicked: AtomicBool,
    gone: AtomicBool,
}

/// A handle on a guest served by a [`WorkerPool`]: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct GuestHandle(Arc<GuestShared>);

impl std::fmt::Debug for GuestHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestHandle(worker {}, gone {})", self.0.worker.idx, self.is_gone())
    }
}

impl GuestHandle {
    /// Has the worker call the guest with [`GuestEvent::kicked`] soon. Kicks before that call merge into one
    /// (so the worker's task queue holds at most one per guest). From the guest's own worker this costs no
    /// wake-up: the worker runs its tasks before it polls again.
    pub fn kick(&self) {
        if !self.0.gone.load(Ordering::Acquire) && !self.0.kicked.swap(true, Ordering::AcqRel) {
            self.0.worker.post(Task::KickGuest(Arc::clone(&self.0)));
        }
    }

    /// True when called on the thread of the worker that serves the guest.
    pub fn on_own_worker(&self) -> bool {
        self.0.worker.is_current()
    }

    /// The index of the worker that serves the guest.
    pub fn worker(&self) -> usize {
        self.0.worker.idx
    }

    /// True once the worker has deregistered and dropped the guest (it said it was done, its registration
    /// failed, or the pool stopped).
    pub fn is_gone(&self) -> bool {
        self.0.gone.load(Ordering::Acquire)
    }
}

impl WorkerPool {
    /// Hands a guest to the least-loaded worker (it counts as one socket there). `make` builds the guest
    /// around its own handle, so the guest can give kicks to others (completion callbacks, say) before it is
    /// first called. Returns the handle.
    pub fn add_guest(&self, make: impl FnOnce(GuestHandle) -> Box<dyn Guest>) -> GuestHandle {
        let w = Arc::clone(self.pick_worker());
        let shared = Arc::new(GuestShared {
            worker: Arc::clone(&w),
            key: AtomicUsize::new(usize::MAX),
            kicked: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        });
        let handle = GuestHandle(Arc::clone(&shared));
        let guest = make(handle.clone());
        w.post(Task::AddGuest(shared, guest));
        handle
    }
}

struct GuestEntry {
    shared: Arc<GuestShared>,
    guest: Box<dyn Guest>,
}

/// Deregisters and drops a guest; only then is it reported gone, so whoever waits for that sees its drop done.
fn drop_guest(g: GuestEntry, registry: &Registry) {
    let GuestEntry { shared, mut guest } = g;
    guest.deregister(registry);
    drop(guest);
    shared.gone.store(true, Ordering::Release);
}

enum Role {
    Listener(TcpListener),
    Acceptor {
        stream: TcpStream,
        acc: Acceptor,
    },
    /// A rejected handshake: write the reply, then close.
    Closing {
        stream: TcpStream,
        tx: TxQueue,
    },
    Session(Box<SessionEntry>),
}

struct SessionEntry {
    sess: Session,
    conn: Arc<ConnShared>,
    stream: Option<TcpStream>,
    /// The TCP connect is in progress (waiting for writable).
    connecting: bool,
    throttle_retry: Option<Instant>,
    /// A received message its fast dispatcher was too busy for: offered again at `busy_retry`, before anything
    /// else is read or delivered from this session (the session holds its input meanwhile).
    parked: Option<Message>,
    /// A lossless connection this session's last message made go over its outgoing bound (lossy sessions
    /// only, [`note_overrun`]): nothing more is read or delivered from this session until it is back within.
    blocked_on: Option<Arc<ConnShared>>,
    /// When a parked message or the `blocked_on` bound is looked at again.
    busy_retry: Option<Instant>,
    /// Whether the socket may hold input: a drive caused by anything but a readable event (a reply queued by
    /// a dispatcher, a timer, a task) then reads nothing; with one drive per queued reply, those EAGAIN reads
    /// were most of an OSD's syscalls.
    read: ReadReadiness,
}

struct Entry {
    role: Role,
    msgr: Arc<MsgrInner>,
    deadline: Option<Instant>,
}

struct Worker {
    shared: Arc<WorkerShared>,
    poll: Poll,
    rx: Receiver<Task>,
    entries: Slab<Entry>,
    guests: Slab<GuestEntry>,
    timers: BTreeSet<(Instant, usize)>,
    op_count: u64,
    stopping: bool,
    /// How long to poll without sleeping while a peer owes us an answer ([`Worker::spin`]).
    spin: Duration,
    /// Tokens of the lossless sessions among `entries` (daemon peers: few, while clients may be many), which
    /// [`Worker::awaiting_peer`] looks at.
    lossless: Vec<usize>,
}

impl Worker {
    fn new(shared: Arc<WorkerShared>, poll: Poll, rx: Receiver<Task>, spin: Duration) -> Worker {
        Worker {
            shared,
            poll,
            rx,
            spin,
            lossless: Vec::new(),
            entries: Slab::new(),
            guests: Slab::new(),
            timers: BTreeSet::new(),
            op_count: 0,
            stopping: false,
        }
    }

    /// Whether a lossless peer owes this worker an acknowledgement (and likely a reply): then the next event
    /// is probably a few microseconds away.
    fn awaiting_peer(&self) -> bool {
        self.lossless.iter().any(|&t| match &self.entries[t].role {
            Role::Session(se) => se.sess.unacked_messages() > 0,
            _ => unreachable!("only sessions are listed as lossless"),
        })
    }

    /// Polls without sleeping for up to `spin`, yielding the CPU between polls; true if events arrived. On a
    /// VM, a sleep in `epoll_wait` and the wake-up that ends it cost more CPU than such a wait: an OSD's round
    /// trips to its replicas under 4 KiB writes cost 8-13 % less OSD CPU per op this way, and up to 16 % more
    /// ops complete (`rados bench`, alternating runs); reads and 4 MiB writes do not change. Only a worker that
    /// just handled events and awaits a lossless peer spins, so a client or an idle daemon never does.
    fn spin(&mut self, events: &mut Events) -> bool {
        if self.spin.is_zero() {
            return false;
        }
        let until = Instant::now() + self.spin;
        loop {
            if self.poll.poll(events, Some(Duration::ZERO)).is_ok() && !events.is_empty() {
                return true;
            }
            if !self.rx.is_empty() {
                return true; // a task: the loop drains it whether or not the waker's event came with it
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    fn run(mut self) {
        CURRENT_WORKER.with(|c| c.set(Arc::as_ptr(&self.shared) as usize));
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let mut busy = false;
        while !self.stopping {
            let deferred = post_deferred();
            let mut timeout = if !self.rx.is_empty() {
                Some(Duration::ZERO) // tasks this thread posted to itself while handling the last batch
            } else {
                self.timers
                    .first()
                    .map(|&(t, _)| crate::util::round_up_ms(t.saturating_duration_since(Instant::now())))
            };
            if deferred {
                timeout = Some(timeout.map_or(TASK_RETRY, |t| t.min(TASK_RETRY)));
            }
            if busy && timeout != Some(Duration::ZERO) && self.awaiting_peer() && self.spin(&mut events) {
                // something arrived while spinning: handle it below without having slept
            } else if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("worker {} poll failed: {e}", self.shared.idx);
                }
                continue;
            }
            for ev in events.iter() {
                if ev.token() == WAKER_TOKEN {
                    continue; // tasks are drained below on every iteration
                }
                let closed = ev.is_read_closed() || ev.is_error();
                if ev.token().0 >= GUEST_TOKEN_BASE {
                    let ge = GuestEvent {
                        readable: ev.is_readable() || closed,
                        writable: ev.is_writable(),
                        read_closed: closed,
                        kicked: false,
                    };
                    self.guest_ready(ev.token().0 - GUEST_TOKEN_BASE, ge);
                    continue;
                }
                self.on_ready(ev.token().0, ev.is_readable() || closed, closed);
            }
            busy = self.drain_tasks() || !events.is_empty();
            self.run_timers();
        }
        for e in self.entries.drain() {
            close_entry_quietly(e);
        }
        for g in self.guests.drain() {
            drop_guest(g, self.poll.registry());
        }
    }

    fn guest_ready(&mut self, key: usize, ev: GuestEvent) {
        let Some(g) = self.guests.get_mut(key) else { return };
        if !g.guest.ready(ev) {
            let g = self.guests.remove(key);
            self.shared.load.fetch_sub(1, Ordering::Relaxed);
            drop_guest(g, self.poll.registry());
            tracing::trace!(key, "guest removed");
        }
    }

    /// Handles every queued task; true if there was one.
    fn drain_tasks(&mut self) -> bool {
        self.shared.woken.store(false, Ordering::Release);
        let mut any = false;
        while let Ok(t) = self.rx.try_recv() {
            self.handle_task(t);
            any = true;
        }
        any
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(t, token)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            let Some(e) = self.entries.get_mut(token) else { continue };
            if e.deadline != Some(t) {
                continue;
            }
            e.deadline = None;
            match &mut e.role {
                Role::Acceptor { acc, .. } => acc.handle_timeout(now),
                Role::Closing { .. } => {
                    self.remove(token, "reply to a rejected handshake was not taken in time");
                    continue;
                }
                Role::Session(se) => {
                    if se.throttle_retry.is_some_and(|r| r <= now) {
                        se.throttle_retry = None;
                    }
                    if se.busy_retry.is_some_and(|r| r <= now) {
                        se.busy_retry = None;
                    }
                    se.sess.handle_timeout(now);
                }
                Role::Listener(_) => {}
            }
            self.drive(token);
        }
    }

    fn handle_task(&mut self, t: Task) {
        let now = Instant::now();
        match t {
            Task::Listen(listener, msgr) => {
                let token = self.insert(Role::Listener(listener), msgr);
                if let Role::Listener(l) = &mut self.entries[token].role {
                    if let Err(e) = self.poll.registry().register(l, Token(token), Interest::READABLE) {
                        tracing::error!("cannot register listener: {e}");
                    }
                }
                self.accept_all(token);
            }
            Task::Accepted(stream, msgr) => self.add_acceptor(stream, msgr, now),
            Task::Connect(conn, sess) => {
                let msgr = Arc::clone(&conn.msgr);
                let se = SessionEntry {
                    sess,
                    conn,
                    stream: None,
                    connecting: false,
                    throttle_retry: None,
                    parked: None,
                    blocked_on: None,
                    busy_retry: None,
                    read: ReadReadiness::default(),
                };
                let token = self.insert_precharged(Role::Session(Box::new(se)), msgr);
                if let Role::Session(se) = &self.entries[token].role {
                    se.conn.set_home(self.shared.idx, token);
                }
                self.drive(token);
            }
            Task::Route { conn, stream, req, rx } => self.route_here(conn, stream, req, rx, now),
            Task::Kick(conn) => {
                // Off the queue: the next kick posts again (at most one Kick per connection is queued).
                conn.kick_taken();
                let Some(token) = conn.token() else { return };
                let Some(Entry { role: Role::Session(se), .. }) = self.entries.get_mut(token) else { return };
                if !Arc::ptr_eq(&se.conn, &conn) {
                    return;
                }
                conn.drain_inbox(&mut se.sess, now);
                self.drive(token);
            }
            Task::AddGuest(shared, mut guest) => {
                let key = self.guests.vacant_key();
                if let Err(e) = guest.register(self.poll.registry(), Token(GUEST_TOKEN_BASE + key)) {
                    tracing::warn!("cannot register a guest: {e}");
                    self.shared.load.fetch_sub(1, Ordering::Relaxed);
                    drop(guest);
                    shared.gone.store(true, Ordering::Release);
                    return;
                }
                shared.key.store(key, Ordering::Release);
                self.guests.insert(GuestEntry { shared, guest });
            }
            Task::KickGuest(shared) => {
                let key = shared.key.load(Ordering::Acquire);
                match self.guests.get(key) {
                    Some(g) if Arc::ptr_eq(&g.shared, &shared) => {}
                    _ => return, // gone already
                }
                shared.kicked.store(false, Ordering::Release);
                self.guest_ready(key, GuestEvent { kicked: true, ..GuestEvent::default() });
            }
            Task::ShutdownMessenger(msgr, done) => {
                let mine: Vec<usize> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| Arc::ptr_eq(&e.msgr, &msgr))
                    .map(|(k, _)| k)
                    .collect();
                for token in mine {
                    if let Role::Session(se) = &mut self.entries[token].role {
                        se.sess.mark_down(CloseReason::Shutdown);
                        self.drive(token);
                    }
                    if self.entries.contains(token) {
                        self.remove(token, "messenger shut down");
                    }
                }
                let _ = done.send(());
            }
            Task::Stop => self.stopping = true,
        }
    }

    fn insert(&mut self, role: Role, msgr: Arc<MsgrInner>) -> usize {
        self.shared.load.fetch_add(1, Ordering::Relaxed);
        self.insert_precharged(role, msgr)
    }

    /// Inserts an entry whose load was charged by `pick_worker`.
    fn insert_precharged(&mut self, role: Role, msgr: Arc<MsgrInner>) -> usize {
        let lossless = matches!(&role, Role::Session(se) if !se.sess.policy().lossy);
        let token = self.entries.insert(Entry { role, msgr, deadline: None });
        if lossless {
            self.lossless.push(token);
        }
        token
    }

    fn remove(&mut self, token: usize, why: &str) {
        let e = self.entries.remove(token);
        self.lossless.retain(|&t| t != token);
        self.shared.load.fetch_sub(1, Ordering::Relaxed);
        if let Some(d) = e.deadline {
            self.timers.remove(&(d, token));
        }
        tracing::trace!(token, why, "entry removed");
        let registry = self.poll.registry();
        match e.role {
            Role::Listener(mut l) => {
                let _ = registry.deregister(&mut l);
            }
            Role::Acceptor { mut stream, .. } | Role::Closing { mut stream, .. } => {
                let _ = registry.deregister(&mut stream);
            }
            Role::Session(mut se) => {
                if let Some(mut s) = se.stream.take() {
                    let _ = registry.deregister(&mut s);
                }
                se.conn.closed(&mut se.sess);
            }
        }
    }

    fn add_acceptor(&mut self, stream: TcpStream, msgr: Arc<MsgrInner>, now: Instant) {
        if let Err(e) = stream.set_nodelay(msgr.cfg.tcp_nodelay) {
            tracing::debug!("set_nodelay: {e}");
        }
        let acc = Acceptor::new(now, msgr.cfg.connect_timeout, msgr.cfg.limits);
        let token = self.insert_precharged(Role::Acceptor { stream, acc }, msgr);
        if let Role::Acceptor { stream, .. } = &mut self.entries[token].role {
            if let Err(e) =
                self.poll.registry().register(stream, Token(token), Interest::READABLE | Interest::WRITABLE)
            {
                tracing::warn!("cannot register accepted socket: {e}");
                self.remove(token, "register failed");
                return;
            }
        }
        self.drive(token);
    }

    fn accept_all(&mut self, token: usize) {
        loop {
            let Entry { role: Role::Listener(l), msgr, .. } = &self.entries[token] else { return };
            match l.accept() {
                Ok((stream, peer)) => {
                    let msgr = Arc::clone(msgr);
                    Counters::add(&msgr.counters.accepts, 1);
                    tracing::debug!(%peer, "accepted");
                    let target = Arc::clone(msgr.pool.pick_worker());
                    if target.idx == self.shared.idx {
                        self.add_acceptor(stream, msgr, Instant::now());
                    } else if let Err(t) = target.try_post(Task::Accepted(stream, msgr)) {
                        // The chosen worker's queue is full: the socket stays here (charged here instead).
                        let Task::Accepted(stream, msgr) = t else { unreachable!("we posted an accept") };
                        target.load.fetch_sub(1, Ordering::Relaxed);
                        self.shared.load.fetch_add(1, Ordering::Relaxed);
                        self.add_acceptor(stream, msgr, Instant::now());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or similar: log and wait for the next readiness event rather than spin.
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_ready(&mut self, token: usize, readable: bool, read_closed: bool) {
        let Some(e) = self.entries.get_mut(token) else { return };
        if let Role::Session(se) = &mut e.role {
            se.read.on_event(readable, read_closed);
        }
        match &mut e.role {
            Role::Listener(_) => self.accept_all(token),
            Role::Session(se) if se.connecting => {
                let Some(stream) = se.stream.as_ref() else { return };
                match stream.take_error() {
                    Ok(Some(err)) | Err(err) => {
                        se.connecting = false;
                        se.sess.socket_closed(Instant::now(), CloseReason::SocketError(err.to_string()));
                    }
                    Ok(None) => match stream.peer_addr() {
                        Ok(_) => {
                            se.connecting = false;
                            Counters::add(&e.msgr.counters.connects, 1);
                            se.sess.socket_connected(Instant::now());
                        }
                        Err(err) if err.kind() == io::ErrorKind::NotConnected => return,
                        Err(err) => {
                            se.connecting = false;
                            se.sess.socket_closed(Instant::now(), CloseReason::SocketError(err.to_string()));
                        }
                    },
                }
                self.drive(token);
            }
            _ => self.drive(token),
        }
    }

    /// Moves bytes for one entry until its socket would block, then applies the state machine's outputs and
    /// re-arms its timer. Every path that changes an entry ends here.
    fn drive(&mut self, token: usize) {
        let now = Instant::now();
        let Some(e) = self.entries.get_mut(token) else { return };
        let inject = e.msgr.cfg.inject_socket_failures;
        let counters = Arc::clone(&e.msgr.counters);
        match &mut e.role {
            Role::Listener(_) => {}
            Role::Closing { stream, tx, .. } => {
                let r = write_from(stream, &mut self.op_count, inject, &counters, now, tx);
                if r.is_err() || tx.is_empty() {
                    let _ = stream.shutdown(Shutdown::Both);
                    self.remove(token, "rejected handshake answered");
                }
            }
            Role::Acceptor { stream, acc } => {
                let mut failed = write_from(stream, &mut self.op_count, inject, &counters, now, acc).err();
                if failed.is_none() {
                    let mut unused = ReadReadiness::attached(); // a handshake reads on every drive
                    failed = read_into(stream, &mut self.op_count, inject, &counters, acc, &mut unused).err();
                }
                if let Some(reason) = failed {
                    counters.faults.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(token, %reason, "closing accepted socket");
                    self.remove(token, "accept failed");
                    return;
                }
                if acc.is_done() && acc.tx().is_empty() {
                    match acc.take_outcome().expect("done") {
                        Err(reason) => {
                            counters.faults.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(token, %reason, "closing accepted socket");
                            self.remove(token, "handshake failed");
                        }
                        Ok((req, rx)) => self.route(token, req, rx, now),
                    }
                    return;
                }
                let d = if acc.is_done() { None } else { Some(acc.deadline()) };
                self.set_deadline(token, d);
            }
            Role::Session(_) => self.drive_session(token, now, inject, counters),
        }
    }

    /// One pass per readiness event or task: feed the session everything already buffered (throttle grants,
    /// outputs, replies queued inline by fast dispatchers) before writing, so that the replies to a batch of
    /// requests go out in one `writev`; then write; then read; repeat while anything moved.
    fn drive_session(&mut self, token: usize, now: Instant, inject: u64, counters: Arc<Counters>) {
        let msgr = Arc::clone(&self.entries[token].msgr);
        let policy_throttle = {
            let Role::Session(se) = &self.entries[token].role else {
                unreachable!("drive_session on a session")
            };
            msgr.policy_throttle(se.sess.peer_name())
        };
        let mut throttles = vec![&msgr.dispatch_throttle];
        if let Some(t) = policy_throttle.as_ref() {
            throttles.push(t);
        }
        loop {
            let mut progressed = false;
            loop {
                let mut moved = false;
                let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
                // Replies a fast dispatcher queued for the messages just delivered: take them now, so they batch
                // and so the backlog they make is seen before reading more from a peer that does not read.
                if se.conn.kicked() {
                    se.conn.drain_inbox(&mut se.sess, now);
                }
                // Outputs first: a message decoded by the last read reaches its dispatcher (and is parked if it
                // is busy) before the next message's grant is given, so at most one message is ever decoded but
                // not yet delivered, and none can queue behind a parked one.
                loop {
                    let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
                    let Some(out) = se.sess.poll_output() else { break };
                    moved = true;
                    if self.apply_output(token, out, now, &msgr) {
                        return; // the session is gone
                    }
                }
                let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
                if se.busy_retry.is_none() {
                    if se.blocked_on.as_ref().is_some_and(|c| c.over_bound() && !c.closed_flag()) {
                        se.busy_retry = Some(now + BUSY_RETRY);
                    } else {
                        se.blocked_on = None;
                        if let Some(m) = se.parked.take() {
                            se.deliver(&msgr, m, now);
                        }
                        if se.parked.is_none() && se.blocked_on.is_none() && se.sess.input_held() {
                            se.sess.hold_input(now, false);
                            moved = true;
                        }
                    }
                }
                // No grant while a message waits for its dispatcher or its session is held back: the next
                // message must not overtake it.
                if let (Some(bytes), false) = (se.sess.grant_wanted(), se.sess.input_held()) {
                    if se.throttle_retry.is_none() {
                        match ThrottleGrant::try_take(&throttles, 1, bytes as u64) {
                            Some(g) => {
                                se.sess.give_grant(now, g);
                                moved = true;
                            }
                            None => {
                                counters.throttle_stalls.fetch_add(1, Ordering::Relaxed);
                                se.throttle_retry = Some(now + THROTTLE_RETRY);
                            }
                        }
                    }
                }
                if !moved {
                    break;
                }
                progressed = true;
            }
            let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
            if let (Some(stream), false) = (se.stream.as_mut(), se.connecting) {
                se.sess.flush_acks(now);
                if se.sess.has_socket() && !se.sess.tx().is_empty() {
                    let before = se.sess.tx().queued_bytes();
                    match write_from(stream, &mut self.op_count, inject, &counters, now, &mut se.sess) {
                        Ok(()) => progressed |= se.sess.tx().queued_bytes() != before,
                        Err(reason) => {
                            se.sess.socket_closed(now, reason);
                            progressed = true;
                        }
                    }
                }
            }
            if let (Some(stream), false) = (se.stream.as_mut(), se.connecting) {
                if se.read.may_read() && se.sess.read_hint().is_some() {
                    match read_into(stream, &mut self.op_count, inject, &counters, &mut se.sess, &mut se.read)
                    {
                        Ok(n) => progressed |= n > 0,
                        Err(reason) => {
                            se.sess.socket_closed(now, reason);
                            progressed = true;
                        }
                    }
                }
            }
            if !progressed {
                break; // drained, or the socket would block on write: wait for the next event
            }
        }
        let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
        let mut d = se.sess.poll_timeout();
        for r in [se.throttle_retry, se.busy_retry].into_iter().flatten() {
            d = Some(d.map_or(r, |d| d.min(r)));
        }
        self.set_deadline(token, d);
    }

    /// Returns true when the entry was removed.
    fn apply_output(&mut self, token: usize, out: Output, now: Instant, msgr: &Arc<MsgrInner>) -> bool {
        let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
        match out {
            Output::OpenSocket => {
                if let Some(mut s) = se.stream.take() {
                    let _ = self.poll.registry().deregister(&mut s);
                }
                let addr = se.sess_peer_addr();
                match open_socket(addr, msgr.cfg.tcp_nodelay) {
                    Ok(mut s) => {
                        match self.poll.registry().register(
                            &mut s,
                            Token(token),
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            Ok(()) => {
                                se.stream = Some(s);
                                se.connecting = true;
                                se.read = ReadReadiness::attached();
                            }
                            Err(e) => se.sess.socket_closed(now, CloseReason::SocketError(e.to_string())),
                        }
                    }
                    Err(e) => {
                        se.sess
                            .socket_closed(now, CloseReason::SocketError(format!("connect to {addr}: {e}")));
                    }
                }
            }
            Output::CloseSocket(reason) => {
                if !matches!(reason, CloseReason::Replaced | CloseReason::MarkedDown | CloseReason::Shutdown)
                {
                    msgr.counters.faults.fetch_add(1, Ordering::Relaxed);
                }
                let peer = se.sess.peer_name();
                let shown = peer.map_or_else(|| "unidentified".to_string(), |p| p.to_string());
                // A client that hangs up after its command, a socket replaced or marked down, a shutdown: the
                // routine end of a session, which would otherwise fill a monitor's log (one line per CLI
                // run). Faults and a daemon peer that vanishes stay at info.
                let routine = match reason {
                    CloseReason::Replaced | CloseReason::MarkedDown | CloseReason::Shutdown => true,
                    CloseReason::PeerClosed => peer.is_some_and(|p| p.ty == EntityType::Client),
                    _ => false,
                };
                if routine {
                    tracing::debug!(peer = %shown, conn = se.conn.id, %reason, "closing socket");
                } else {
                    tracing::info!(peer = %shown, conn = se.conn.id, %reason, "closing socket");
                }
                se.connecting = false;
                if let Some(mut s) = se.stream.take() {
                    let _ = self.poll.registry().deregister(&mut s);
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            Output::Ready { reconnected } => {
                if reconnected {
                    msgr.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                se.conn.set_ready(se.sess.peer_name());
                tracing::debug!(peer = ?se.sess.peer_name(), conn = se.conn.id, reconnected, "session open");
                if !reconnected {
                    msgr.deliver_event(&se.conn, crate::messenger::ConnEvent::Ready);
                }
            }
            Output::Message(m) => {
                msgr.counters.msgs_in.fetch_add(1, Ordering::Relaxed);
                // One message per throttle grant, and no grant while input is held: nothing overtakes a parked
                // message.
                assert!(se.parked.is_none(), "a message was received while another waits for its dispatcher");
                assert!(!se.sess.input_held(), "a message was received while input is held");
                se.deliver(msgr, m, now);
            }
            Output::Reset => {
                msgr.counters.resets.fetch_add(1, Ordering::Relaxed);
                // Closed and out of the registry before the dispatcher hears of it, so a `connect` from its
                // handle_reset gets a new session, not this dying one.
                se.conn.closed(&mut se.sess);
                msgr.deliver_event(&se.conn, crate::messenger::ConnEvent::Reset);
            }
            Output::RemoteReset => {
                msgr.counters.remote_resets.fetch_add(1, Ordering::Relaxed);
                msgr.deliver_event(&se.conn, crate::messenger::ConnEvent::RemoteReset);
            }
            Output::Released { messages, bytes } => se.conn.released(messages, bytes),
            Output::Resent(n) => {
                msgr.counters.resent.fetch_add(n, Ordering::Relaxed);
            }
            Output::Closed => {
                self.remove(token, "session closed");
                return true;
            }
        }
        false
    }

    /// An accepted socket's handshake is complete: find or create its session.
    fn route(&mut self, token: usize, req: HandshakeRequest, rx: RxBuf, now: Instant) {
        let e = self.entries.remove(token);
        self.shared.load.fetch_sub(1, Ordering::Relaxed);
        if let Some(d) = e.deadline {
            self.timers.remove(&(d, token));
        }
        let Role::Acceptor { mut stream, .. } = e.role else { unreachable!("route from an acceptor") };
        let msgr = e.msgr;
        let key = req.peer_key();
        let (conn, created) = msgr.session_for_incoming(key, req.peer_name(), self.shared.idx);
        if created {
            let sess = Session::accept(msgr.session_config(req.peer_name().ty), msgr.new_cookie(), now);
            let se = SessionEntry {
                sess,
                conn: Arc::clone(&conn),
                stream: None,
                connecting: false,
                throttle_retry: None,
                parked: None,
                blocked_on: None,
                busy_retry: None,
                read: ReadReadiness::default(),
            };
            let t = self.insert(Role::Session(Box::new(se)), Arc::clone(&msgr));
            conn.set_home(self.shared.idx, t);
        }
        let home = conn.home_worker();
        if home == self.shared.idx {
            self.route_here(conn, stream, req, rx, now);
        } else {
            let _ = self.poll.registry().deregister(&mut stream);
            msgr.pool.workers[home].post(Task::Route { conn, stream, req, rx });
        }
    }

    fn route_here(
        &mut self,
        conn: Arc<ConnShared>,
        mut stream: TcpStream,
        req: HandshakeRequest,
        rx: RxBuf,
        now: Instant,
    ) {
        let registry = self.poll.registry();
        let live = conn.token().and_then(|t| match self.entries.get_mut(t) {
            Some(Entry { role: Role::Session(se), .. }) if Arc::ptr_eq(&se.conn, &conn) => Some(t),
            _ => None,
        });
        let Some(token) = live else {
            // The session closed while the socket was on its way: let the peer start over.
            let _ = registry.deregister(&mut stream);
            let _ = stream.shutdown(Shutdown::Both);
            return;
        };
        let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
        conn.drain_inbox(&mut se.sess, now);
        let adoption = se.sess.adopt(now, req, rx);
        let registry = self.poll.registry();
        let Role::Session(se) = &mut self.entries[token].role else { unreachable!() };
        match adoption {
            Adoption::Adopted => {
                // The old socket, if any, is closed by the CloseSocket(Replaced) output in drive().
                if let Some(mut old) = se.stream.take() {
                    let _ = registry.deregister(&mut old);
                    let _ = old.shutdown(Shutdown::Both);
                }
                // A socket routed from another worker is not registered here yet; one from this worker is.
                let r = registry
                    .reregister(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)
                    .or_else(|_| {
                        registry.register(&mut stream, Token(token), Interest::READABLE | Interest::WRITABLE)
                    });
                if let Err(e) = r {
                    se.sess.socket_closed(now, CloseReason::SocketError(e.to_string()));
                } else {
                    se.stream = Some(stream);
                    se.connecting = false;
                    se.read = ReadReadiness::attached();
                }
                self.drive(token);
            }
            Adoption::Rejected { reply, reason } => {
                tracing::info!(peer = %crate::entity::shown_peer(conn.peer_name()), reason, "rejecting handshake");
                let mut tx = TxQueue::new();
                tx.push_raw(&reply);
                let msgr = Arc::clone(&conn.msgr);
                let deadline = now + msgr.cfg.connect_timeout;
                let t = self.insert(Role::Closing { stream, tx }, msgr);
                let registry = self.poll.registry();
                if let Role::Closing { stream, .. } = &mut self.entries[t].role {
                    let r = registry
                        .reregister(stream, Token(t), Interest::WRITABLE)
                        .or_else(|_| registry.register(stream, Token(t), Interest::WRITABLE));
                    if r.is_err() {
                        self.remove(t, "register failed");
                        return;
                    }
                }
                self.set_deadline(t, Some(deadline));
                self.drive(t);
                self.drive(token);
            }
        }
    }

    fn set_deadline(&mut self, token: usize, d: Option<Instant>) {
        let Some(e) = self.entries.get_mut(token) else { return };
        if e.deadline == d {
            return;
        }
        if let Some(old) = e.deadline {
            self.timers.remove(&(old, token));
        }
        e.deadline = d;
        if let Some(d) = d {
            self.timers.insert((d, token));
        }
    }
}

impl SessionEntry {
    /// Hands a received message to the dispatchers. If the fast dispatcher is busy the message is parked; if
    /// delivering it made this worker overrun a lossless connection's outgoing bound and this session is lossy,
    /// the session is held back until that connection is within its bound. Either way the session stops
    /// reading and looks again after [`BUSY_RETRY`].
    fn deliver(&mut self, msgr: &Arc<MsgrInner>, m: Message, now: Instant) {
        let _ = take_overrun();
        if let Delivery::Busy(m) = msgr.deliver(&self.conn, m) {
            self.parked = Some(m);
        }
        if let Some(c) = take_overrun().filter(|_| self.sess.policy().lossy) {
            self.blocked_on = Some(c);
        }
        if self.parked.is_some() || self.blocked_on.is_some() {
            self.busy_retry = Some(now + BUSY_RETRY);
            self.sess.hold_input(now, true);
        }
    }

    fn sess_peer_addr(&self) -> SocketAddr {
        self.conn.connect_addr().expect("only sessions with an address open sockets")
    }
}

fn close_entry_quietly(e: Entry) {
    if let Role::Session(mut se) = e.role {
        se.sess.mark_down(CloseReason::Shutdown);
        se.conn.closed(&mut se.sess);
    }
}

fn open_socket(addr: SocketAddr, nodelay: bool) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(nodelay)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(115) /* EINPROGRESS */ || e.kind() == io::ErrorKind::WouldBlock => {
        }
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

fn injected(op_count: &mut u64, every: u64, counters: &Counters) -> bool {
    if every == 0 {
        return false;
    }
    *op_count += 1;
    if (*op_count).is_multiple_of(every) {
        counters.injected_faults.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    false
}

/// A sans-IO machine the shell feeds from and drains to a socket.
trait Endpoint {
    fn read_hint(&self) -> Option<usize>;
    fn rx(&mut self) -> &mut RxBuf;
    fn consumed(&mut self, now: Instant);
    fn tx(&mut self) -> &mut TxQueue;
    fn wrote(&mut self, now: Instant, n: usize) {
        let _ = now;
        self.tx().advance(n);
    }
}

impl Endpoint for Acceptor {
    fn read_hint(&self) -> Option<usize> {
        Acceptor::read_hint(self)
    }
    fn rx(&mut self) -> &mut RxBuf {
        Acceptor::rx(self)
    }
    fn consumed(&mut self, _now: Instant) {
        self.process_input();
    }
    fn tx(&mut self) -> &mut TxQueue {
        Acceptor::tx(self)
    }
}

impl Endpoint for Session {
    fn read_hint(&self) -> Option<usize> {
        Session::read_hint(self)
    }
    fn rx(&mut self) -> &mut RxBuf {
        Session::rx(self)
    }
    fn consumed(&mut self, now: Instant) {
        self.process_input(now);
    }
    fn tx(&mut self) -> &mut TxQueue {
        Session::tx(self)
    }
    fn wrote(&mut self, now: Instant, n: usize) {
        Session::wrote(self, now, n);
    }
}

impl Endpoint for TxQueue {
    fn read_hint(&self) -> Option<usize> {
        None
    }
    fn rx(&mut self) -> &mut RxBuf {
        unreachable!("a closing socket reads nothing")
    }
    fn consumed(&mut self, _now: Instant) {}
    fn tx(&mut self) -> &mut TxQueue {
        self
    }
}

/// Reads until the socket is drained or the endpoint stops wanting input, telling `readiness` how the reads
/// ended. Returns the bytes read.
fn read_into<E: Endpoint>(
    stream: &mut TcpStream,
    op_count: &mut u64,
    inject: u64,
    counters: &Counters,
    ep: &mut E,
    readiness: &mut ReadReadiness,
) -> Result<usize, CloseReason> {
    let mut total = 0;
    while let Some(hint) = ep.read_hint() {
        if injected(op_count, inject, counters) {
            return Err(CloseReason::SocketError("injected read failure".into()));
        }
        match ep.rx().read_from(stream, hint) {
            Ok((0, _)) => return Err(CloseReason::PeerClosed),
            Ok((n, offered)) => {
                total += n;
                counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                ep.consumed(Instant::now());
                if n < offered {
                    readiness.short_read();
                    if !readiness.may_read() {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                readiness.would_block();
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CloseReason::SocketError(e.to_string())),
        }
    }
    Ok(total)
}

/// Writes until the queue is empty or the socket is full (a short write).
fn write_from<E: Endpoint>(
    stream: &mut TcpStream,
    op_count: &mut u64,
    inject: u64,
    counters: &Counters,
    now: Instant,
    ep: &mut E,
) -> Result<(), CloseReason> {
    while !ep.tx().is_empty() {
        if injected(op_count, inject, counters) {
            return Err(CloseReason::SocketError("injected write failure".into()));
        }
        let r = {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let n = ep.tx().io_slices(&mut slices);
            let offered: usize = slices[..n].iter().map(|s| s.len()).sum();
            stream.write_vectored(&slices[..n]).map(|w| (w, offered))
        };
        match r {
            Ok((0, _)) => return Err(CloseReason::PeerClosed),
            Ok((n, offered)) => {
                counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                ep.wrote(now, n);
                if n < offered {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CloseReason::SocketError(e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_readiness_ends_at_a_short_read_unless_the_peer_closed() {
        let mut r = ReadReadiness::default();
        assert!(!r.may_read());
        r.on_event(true, false);
        r.short_read();
        assert!(!r.may_read(), "a short read means drained");
        r = ReadReadiness::attached();
        r.on_event(true, true);
        r.short_read();
        assert!(r.may_read(), "after the FIN, reads go on until they return the end");
        r.would_block();
        assert!(!r.may_read());
    }
}
