//! The NBD server shell: serves one open [`Image`] to many connections, each a [`ServerSession`], on the
//! messenger's worker threads.
//!
//! The listener and every connection are [`Guest`]s of the client's [`WorkerPool`]: their sockets sit in a
//! messenger worker's event loop, so a request is read, handed to the image, sent to the OSDs, answered and
//! replied to on the worker that also carries the OSD traffic, without a thread of its own to hand off to
//! (with one worker, as `cuttle up` configures clients, a read costs no thread switch at all).
//!
//! A connection's state (socket, session, unwritten replies) sits behind a mutex (uncontended while everything
//! runs on one worker). Requests go to the image's async API and are answered as they complete, out of order:
//! each request's completion callback ([`Image::aio_read_with`] and friends) locks the connection, gives the
//! session its reply and writes it out until the socket would block; the rest waits for the socket's writable
//! edge. A callback that runs on the connection's own worker leaves the write to a kick of the connection
//! instead, so the replies completed by one batch of OSD messages go out in one `writev`. The lock is never
//! held while calling into the image: a callback may run inside that call (a read served by the cache, an
//! error). Requests the session yields are queued on the connection and started, in order, by whoever finds
//! the queue non-empty and nobody starting it (the connection's worker, or a callback whose reply let
//! buffered requests through); a callback that runs inside a start only queues.
//!
//! A worker must never block, and two things in the image can: a write-back cache (a writer over the dirty
//! limit, a discard behind an overlapping write-back) and object dispatch once its queue of parked object
//! ops is full (an ordinary submitter waits for room). So writes, trims and zeroes start through
//! [`Image::try_aio_write_with`] and [`Image::try_aio_discard_with`], which hand a request back instead of
//! waiting (the cache decides under its own lock); those, and any request that does not fit in
//! [`OPS_OUTSTANDING_MAX`] (the object ops this server has outstanding, an upper bound counted from each
//! request's range in stripe units), go to one submit thread, which may block. The bound keeps the parked
//! ops well below dispatch's `PARKED_OPS_MAX`, so a start on a worker finds room. Flushes and FUA writes
//! call the blocking [`Image::flush`], which must not run on a worker nor in a completion callback, so they
//! go to one flush thread; a flush first waits there for the writes issued before it (see `WriteTracker`),
//! which complete through callbacks, never that thread. Their replies take the same direct path.
//!
//! Flow control is the session's: a connection reads only while [`ServerSession::wants_read`], which turns
//! false at [`super::REQUESTS_IN_FLIGHT_MAX`] requests in flight or a large reply backlog; a reply that makes
//! it true again kicks the connection. Sockets are registered edge-triggered for both directions once, and
//! a connection remembers whether its socket may still hold input (a short read means drained).
//!
//! Shutdown ([`Server::run`]'s stop flag): the listener closes, connections stop reading, every request in
//! flight completes and its reply is sent (bounded by [`DRAIN_TIMEOUT`]), connections close, then the image
//! is flushed.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use messenger::{Guest, GuestEvent, GuestHandle, ReadReadiness, WorkerPool};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use parking_lot::{Condvar, Mutex};

use super::{Event, ExportCatalog, ExportInfo, NbdError, RequestId, RequestKind, ServerSession};
use crate::image::{Image, RbdError};
use crate::striper::Layout;

/// Bytes read from a socket per call: bounded chunks, as the session's contract asks.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Reply chunks gathered into one `writev`.
const WRITE_SLICES_MAX: usize = 64;
/// How often [`Server::run`] looks at the stop flag, and at the drain, while waiting.
const POLL_TICK: Duration = Duration::from_millis(100);
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// Longest a stop waits for requests in flight to complete and their replies to be written.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a stop waits for the workers to let go of the listener and the connections.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more are accepted and closed at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Object ops (an upper bound per request: the stripe units its range touches) this server has outstanding
/// at most before requests wait on the submit thread instead of starting on a worker. Half of object
/// dispatch's parked ops, so the cache's write-backs and read-ahead (a few dozen ops) cannot fill the rest,
/// and a start on a worker never waits for room.
pub const OPS_OUTSTANDING_MAX: usize = 512;
/// Longest the submit thread waits for room among the outstanding ops before starting anyway (object
/// dispatch then bounds it). Ops always complete, so this is a backstop.
const OPS_WAIT_MAX: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {what}: {source}")]
    Bind { what: String, source: io::Error },
    #[error("event loop: {0}")]
    Io(#[from] io::Error),
    #[error("bad export: {0}")]
    Catalog(#[from] super::CatalogError),
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// The address actually bound (a TCP port 0 becomes the chosen port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl BoundAddr {
    /// The NBD URI (as libnbd and qemu spell it) for `export`.
    pub fn uri(&self, export: &str) -> String {
        match self {
            BoundAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            BoundAddr::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
}

/// Writes submitted and not yet completed, by sequence number, so a flush can wait for exactly the writes
/// issued before it (on any connection) and not for later ones.
#[derive(Default)]
struct WriteTracker {
    state: Mutex<(u64, BTreeSet<u64>)>,
    cv: Condvar,
}

impl WriteTracker {
    fn begin(&self) -> u64 {
        let mut g = self.state.lock();
        g.0 += 1;
        let seq = g.0;
        g.1.insert(seq);
        seq
    }

    fn end(&self, seq: u64) {
        self.state.lock().1.remove(&seq);
        self.cv.notify_all();
    }

    /// Waits until every write numbered at most `upto` has completed. Writes always complete (each object
    /// op ends by answer, timeout or Objecter shutdown), so this ends.
    fn wait_upto(&self, upto: u64) {
        let mut g = self.state.lock();
        while g.1.first().is_some_and(|&s| s <= upto) {
            self.cv.wait(&mut g);
        }
    }

    fn issued(&self) -> u64 {
        self.state.lock().0
    }
}

/// The object ops this server has outstanding (see [`OPS_OUTSTANDING_MAX`]).
#[derive(Default)]
struct OpsBudget {
    outstanding: Mutex<usize>,
    room: Condvar,
}

impl OpsBudget {
    /// Takes `cost` if it fits; never waits (a worker's and a callback's way).
    fn try_take(&self, cost: usize) -> bool {
        let mut g = self.outstanding.lock();
        if *g + cost > OPS_OUTSTANDING_MAX {
            return false;
        }
        *g += cost;
        true
    }

    /// Takes `cost`, waiting while it does not fit (the submit thread's way). A request larger than the
    /// whole budget goes once nothing else is outstanding.
    fn take_wait(&self, cost: usize) {
        let deadline = Instant::now() + OPS_WAIT_MAX;
        let mut g = self.outstanding.lock();
        while *g > 0 && *g + cost > OPS_OUTSTANDING_MAX {
            if self.room.wait_until(&mut g, deadline).timed_out() {
                tracing::warn!(outstanding = *g, cost, "nbd: no room among outstanding ops; starting anyway");
                break;
            }
        }
        *g += cost;
    }

    fn give(&self, cost: usize) {
        let mut g = self.outstanding.lock();
        assert!(*g >= cost, "ops budget given back twice");
        *g -= cost;
        drop(g);
        self.room.notify_one();
    }
}

/// Work for the flush thread.
enum FlushJob {
    /// An NBD flush: wait for the writes numbered at most `upto`, then flush the image.
    Flush { conn: Arc<Conn>, id: RequestId, upto: u64 },
    /// A FUA write (or trim/zeroes) that completed successfully: flush the image, then reply.
    Fua { conn: Arc<Conn>, id: RequestId },
}

/// A request for the submit thread: one that may block, or that did not fit the ops budget.
struct SubmitJob {
    conn: Arc<Conn>,
    id: RequestId,
    kind: RequestKind,
    /// The write's number in the [`WriteTracker`], taken when it was received.
    seq: Option<u64>,
    cost: usize,
}

/// What the listener, the connections, the callbacks and the helper threads share.
struct Shared {
    image: Arc<Image>,
    catalog: Arc<ExportCatalog>,
    /// For the cost of a request (the layout never changes; a resize changes only the size).
    layout: Layout,
    tracker: WriteTracker,
    ops: OpsBudget,
    /// Emptied when the server stops so that the threads end (and callbacks still pending then cannot keep
    /// them alive).
    flushes: Mutex<Option<Sender<FlushJob>>>,
    submits: Mutex<Option<Sender<SubmitJob>>>,
    /// Open connections, for the drain and [`CONNECTIONS_MAX`].
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    /// Set by [`Server::run`] on stop: accept nothing more.
    stopping: AtomicBool,
}

/// An upper bound on the object ops of a request for `[offset, offset + len)`: each op covers at least one
/// piece of a stripe unit, and the range touches this many stripe units.
fn ops_cost(layout: &Layout, offset: u64, len: u64) -> usize {
    let su = layout.stripe_unit_bytes();
    let last = offset.saturating_add(len.max(1) - 1);
    (last / su - offset / su + 1).min(usize::MAX as u64) as usize
}

impl Shared {
    fn cost(&self, offset: u64, len: u64) -> usize {
        ops_cost(&self.layout, offset, len)
    }

    fn flush_job(&self, job: FlushJob) {
        // No flush thread: the server has stopped and nobody waits for this reply.
        if let Some(f) = &*self.flushes.lock() {
            let _ = f.send(job);
        }
    }
}

/// One connection: its worker's handle and its state.
struct Conn {
    id: u64,
    shared: Arc<Shared>,
    guest: GuestHandle,
    st: Mutex<ConnState>,
}

struct ConnState {
    /// None once closed: replies that arrive later are dropped (the writes themselves still complete).
    stream: Option<Stream>,
    session: ServerSession,
    out: VecDeque<Bytes>,
    /// Bytes of `out.front()` already written.
    out_pos: usize,
    /// The session ended (or the socket failed): write what is queued, then close.
    closing: bool,
    /// Stopping: read nothing more, only finish what is in flight.
    no_read: bool,
    /// Whether the socket may hold input not read yet (edge-triggered, as the messenger's sessions).
    read: ReadReadiness,
    /// Reading stopped because the session wanted no more (flow control) while input may be waiting: a
    /// reply that makes it want more kicks the connection.
    read_held: bool,
    /// Requests yielded by the session and not started yet, in order.
    to_submit: VecDeque<(RequestId, RequestKind)>,
    /// Someone is starting requests from `to_submit` (see the module doc).
    submitting: bool,
}

thread_local! {
    /// The read buffer of the worker this runs on: allocated and zeroed once per thread, not per read.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl ConnState {
    /// Drains the session after any call: requests to `to_submit`, reply bytes to `out`.
    fn take_output(&mut self, conn: u64) {
        loop {
            let mut moved = false;
            while let Some(ev) = self.session.poll_event() {
                moved = true;
                match ev {
                    Event::ExportSelected { export } => {
                        tracing::debug!(conn, export = %export.name, "export selected")
                    }
                    Event::Request { id, kind, .. } => self.to_submit.push_back((id, kind)),
                    Event::Close { reason } => {
                        tracing::debug!(conn, "session closed: {reason}");
                        self.closing = true;
                    }
                }
            }
            // poll_transmit may let buffered input through, which makes events: hence the loop.
            while let Some(b) = self.session.poll_transmit() {
                moved = true;
                self.out.push_back(b);
            }
            if !moved {
                return;
            }
        }
    }

    /// The socket failed or the client went away: nothing more is written.
    fn fail(&mut self) {
        self.closing = true;
        self.out.clear();
        self.out_pos = 0;
    }

    /// Writes `out` until it is empty or the socket would block.
    fn write_out(&mut self, conn: u64) {
        let Some(stream) = self.stream.as_mut() else { return };
        while !self.out.is_empty() {
            let r = {
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES_MAX];
                let mut n = 0;
                for (i, b) in self.out.iter().take(WRITE_SLICES_MAX).enumerate() {
                    slices[i] = IoSlice::new(if i == 0 { &b[self.out_pos..] } else { b });
                    n += 1;
                }
                stream.write_vectored(&slices[..n])
            };
            match r {
                Ok(0) => {
                    self.fail();
                    return;
                }
                Ok(mut w) => {
                    while w > 0 {
                        let front = self.out.front().expect("wrote no more than was offered");
                        let left = front.len() - self.out_pos;
                        if w < left {
                            self.out_pos += w;
                            break;
                        }
                        w -= left;
                        self.out.pop_front();
                        self.out_pos = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn, "write: {e}");
                    self.fail();
                    return;
                }
            }
        }
    }

    /// Reads while the session wants input and the socket may hold some.
    fn read_in(&mut self, conn: u64, buf: &mut [u8]) {
        while self.read.may_read() && !self.closing && !self.no_read {
            if !self.session.wants_read() {
                self.read_held = true;
                return;
            }
            let Some(stream) = self.stream.as_mut() else { return };
            match stream.read(buf) {
                Ok(0) => {
                    tracing::debug!(conn, "client closed the connection");
                    self.fail();
                }
                Ok(n) => {
                    self.session.received(&buf[..n]);
                    self.take_output(conn);
                    if n < buf.len() {
                        self.read.short_read();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.read.would_block(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn, "read: {e}");
                    self.fail();
                }
            }
        }
    }

    /// Nothing left to do but close.
    fn finished(&self) -> bool {
        self.closing && self.out.is_empty()
    }

    /// Requests in flight or replies not yet written.
    fn busy(&self) -> bool {
        self.stream.is_some() && (self.session.in_flight() > 0 || !self.out.is_empty())
    }

    /// Makes the caller the one who starts queued requests, if there are some and nobody else does.
    fn claim(&mut self) -> Option<VecDeque<(RequestId, RequestKind)>> {
        if self.submitting || self.to_submit.is_empty() {
            return None;
        }
        self.submitting = true;
        Some(std::mem::take(&mut self.to_submit))
    }
}

fn to_nbd(e: &RbdError) -> NbdError {
    match e {
        RbdError::OutOfRange { .. } => NbdError::Inval,
        RbdError::Closed => NbdError::Shutdown,
        RbdError::Rados(rados::objecter::RadosError::NoSpace(_)) => NbdError::NoSpc,
        _ => NbdError::Io,
    }
}

impl Conn {
    /// A request completed (on any thread: a worker, a helper thread, or inside the call that started it):
    /// reply and write. Never called with the state locked.
    fn complete(self: &Arc<Self>, id: RequestId, result: Result<Option<Bytes>, NbdError>) {
        let mut st = self.st.lock();
        if st.stream.is_none() {
            return; // closed: nobody to tell
        }
        if let Err(e) = st.session.reply(id, result) {
            tracing::error!(conn = self.id, "reply refused: {e}");
        }
        st.take_output(self.id);
        let mut kick = false;
        if self.guest.on_own_worker() {
            // The worker runs its kicks after the events at hand: the replies those complete share a writev.
            kick |= !st.out.is_empty();
        } else {
            st.write_out(self.id);
        }
        if st.read_held && st.session.wants_read() {
            st.read_held = false;
            kick = true;
        }
        kick |= st.finished();
        let batch = st.claim();
        drop(st);
        if kick {
            self.guest.kick();
        }
        if let Some(batch) = batch {
            self.run_submissions(batch);
        }
    }

    /// Starts `batch`, then whatever was queued meanwhile, until the queue is empty (the caller claimed it).
    fn run_submissions(self: &Arc<Self>, mut batch: VecDeque<(RequestId, RequestKind)>) {
        loop {
            for (id, kind) in batch.drain(..) {
                self.submit(id, kind);
            }
            let mut st = self.st.lock();
            if st.to_submit.is_empty() {
                st.submitting = false;
                return;
            }
            batch = std::mem::take(&mut st.to_submit);
        }
    }

    /// Starts one request here if that cannot block, else hands it to the submit (or flush) thread.
    fn submit(self: &Arc<Self>, id: RequestId, kind: RequestKind) {
        let sh = &self.shared;
        let (seq, cost) = match &kind {
            RequestKind::Flush => {
                let upto = sh.tracker.issued();
                return sh.flush_job(FlushJob::Flush { conn: Arc::clone(self), id, upto });
            }
            RequestKind::Read { offset, len } => (None, sh.cost(*offset, *len as u64)),
            RequestKind::Write { offset, data, .. } => {
                (Some(sh.tracker.begin()), sh.cost(*offset, data.len() as u64))
            }
            RequestKind::Trim { offset, len, .. } | RequestKind::WriteZeroes { offset, len, .. } => {
                (Some(sh.tracker.begin()), sh.cost(*offset, *len as u64))
            }
        };
        let kind = if sh.ops.try_take(cost) {
            match self.start(id, kind, seq, cost, true) {
                None => return,
                Some(back) => {
                    // The cache would have made it wait: it starts on the submit thread instead.
                    sh.ops.give(cost);
                    back
                }
            }
        } else {
            kind
        };
        let job = SubmitJob { conn: Arc::clone(self), id, kind, seq, cost };
        let refused = match &*sh.submits.lock() {
            Some(s) => s.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = refused {
            // The server has stopped: nothing starts any more.
            if let Some(seq) = job.seq {
                sh.tracker.end(seq);
            }
            self.complete(id, Err(NbdError::Shutdown));
        }
    }

    /// Starts a request whose `cost` is taken from the ops budget. With `nowait` (a worker, a callback), a
    /// write or discard that would wait in the image's write-back cache is handed back unstarted (its budget
    /// still taken) instead; reads never wait there.
    fn start(
        self: &Arc<Self>,
        id: RequestId,
        kind: RequestKind,
        seq: Option<u64>,
        cost: usize,
        nowait: bool,
    ) -> Option<RequestKind> {
        let img = &self.shared.image;
        let r = match kind {
            RequestKind::Read { offset, len } => {
                let (c, sh) = (Arc::clone(self), Arc::clone(&self.shared));
                img.aio_read_with(offset, len as u64, move |res| {
                    sh.ops.give(cost);
                    c.complete(id, res.map(Some).map_err(|e| to_nbd(&e)))
                })
            }
            RequestKind::Write { offset, data, fua } => {
                let seq = seq.expect("a write has a sequence number");
                let done = self.write_done(id, seq, fua, cost);
                if nowait {
                    match img.try_aio_write_with(offset, data, done) {
                        Ok(Some(data)) => return Some(RequestKind::Write { offset, data, fua }),
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                } else {
                    img.aio_write_with(offset, data, done)
                }
            }
            // Zeroing is discard: without snapshots or a parent, discarded ranges read as zeros. NO_HOLE
            // is a SHOULD about allocation, not about content, so ignoring it is allowed.
            RequestKind::Trim { offset, len, fua } | RequestKind::WriteZeroes { offset, len, fua, .. } => {
                let seq = seq.expect("a trim has a sequence number");
                let done = self.write_done(id, seq, fua, cost);
                if nowait {
                    match img.try_aio_discard_with(offset, len as u64, done) {
                        Ok(false) => return Some(kind),
                        Ok(true) => Ok(()),
                        Err(e) => Err(e),
                    }
                } else {
                    img.aio_discard_with(offset, len as u64, done)
                }
            }
            RequestKind::Flush => unreachable!("flushes go to the flush thread"),
        };
        // On Err nothing started and the callback was dropped unrun.
        if let Err(e) = r {
            self.shared.ops.give(cost);
            if let Some(seq) = seq {
                self.shared.tracker.end(seq);
            }
            self.complete(id, Err(to_nbd(&e)));
        }
        None
    }

    /// The completion callback of a write, trim or zeroes request numbered `seq`: it no longer holds back
    /// flushes; a FUA request goes on to the flush thread (durable before the reply; acknowledged writes
    /// already are without a cache, and a cache layer is drained by flush), any other is answered now.
    fn write_done(
        self: &Arc<Self>,
        id: RequestId,
        seq: u64,
        fua: bool,
        cost: usize,
    ) -> impl FnOnce(Result<(), RbdError>) + Send + 'static {
        let conn = Arc::clone(self);
        move |r| {
            let sh = &conn.shared;
            sh.ops.give(cost);
            sh.tracker.end(seq);
            if fua && r.is_ok() {
                sh.flush_job(FlushJob::Fua { conn: Arc::clone(&conn), id });
                return;
            }
            conn.complete(id, r.map(|()| None).map_err(|e| to_nbd(&e)));
        }
    }
}

/// A connection as its worker sees it.
struct ConnGuest {
    conn: Arc<Conn>,
    /// The socket, taken out of the state when the connection closed, until the worker deregisters it.
    closed: Option<Stream>,
}

impl Guest for ConnGuest {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let mut st = self.conn.st.lock();
        let stream = st.stream.as_mut().expect("a new connection has its socket");
        registry.register(stream.source(), token, Interest::READABLE | Interest::WRITABLE)
    }

    fn ready(&mut self, ev: GuestEvent) -> bool {
        let conn = &self.conn;
        let id = conn.id;
        let mut st = conn.st.lock();
        st.read.on_event(ev.readable, ev.read_closed);
        st.read_held = false;
        loop {
            st.take_output(id);
            st.write_out(id);
            READ_BUF.with_borrow_mut(|buf| {
                if buf.len() != READ_CHUNK_BYTES {
                    *buf = vec![0; READ_CHUNK_BYTES];
                }
                st.read_in(id, buf)
            });
            st.write_out(id);
            let Some(batch) = st.claim() else { break };
            drop(st);
            conn.run_submissions(batch);
            st = conn.st.lock();
        }
        if st.finished() {
            // Requests still in flight complete into the void; the writes themselves still complete in the
            // image.
            self.closed = st.stream.take();
            tracing::debug!(conn = id, "connection closed");
            return false;
        }
        true
    }

    fn deregister(&mut self, registry: &Registry) {
        if let Some(mut s) = self.closed.take() {
            let _ = registry.deregister(s.source());
        }
    }
}

impl Drop for ConnGuest {
    fn drop(&mut self) {
        // However the worker let go (closed, failed to register, pool stopped), the connection is gone.
        self.conn.st.lock().stream = None;
        self.conn.shared.conns.lock().remove(&self.conn.id);
    }
}

/// The listening socket as its worker sees it.
struct ListenerGuest {
    listener: Option<Listener>,
    shared: Arc<Shared>,
    pool: Arc<WorkerPool>,
}

impl Guest for ListenerGuest {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self.listener.as_mut().expect("registered once") {
            Listener::Unix(l, _) => registry.register(l, token, Interest::READABLE),
            Listener::Tcp(l) => registry.register(l, token, Interest::READABLE),
        }
    }

    fn ready(&mut self, _ev: GuestEvent) -> bool {
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                return false;
            }
            let stream = match self.listener.as_ref().expect("open while registered") {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
            };
            let stream = match stream {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds or similar: wait for the next connection's edge rather than spin.
                    tracing::warn!("accept: {e}");
                    return true;
                }
            };
            if self.shared.conns.lock().len() >= CONNECTIONS_MAX {
                tracing::warn!("{CONNECTIONS_MAX} connections open; refusing one");
                continue;
            }
            let session = ServerSession::new(Arc::clone(&self.shared.catalog));
            let (id, h) = add_conn(&self.shared, &self.pool, stream, session);
            tracing::debug!(conn = id, worker = h.worker(), "connection accepted");
            // The greeting is queued in the session. Registering the socket raises its writable edge, which
            // sends it; the kick (queued behind the registration) only makes that independent of epoll.
            h.kick();
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        match self.listener.take() {
            Some(Listener::Unix(mut l, path)) => {
                let _ = registry.deregister(&mut l);
                let _ = std::fs::remove_file(path);
            }
            Some(Listener::Tcp(mut l)) => {
                let _ = registry.deregister(&mut l);
            }
            None => {}
        }
    }
}

/// Serves `stream` as a new connection on one of `pool`'s workers, starting from `session`.
fn add_conn(
    shared: &Arc<Shared>,
    pool: &WorkerPool,
    stream: Stream,
    session: ServerSession,
) -> (u64, GuestHandle) {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::clone(shared);
    let h = pool.add_guest(move |guest| {
        let st = ConnState {
            stream: Some(stream),
            session,
            out: VecDeque::new(),
            out_pos: 0,
            closing: false,
            no_read: false,
            read: ReadReadiness::default(),
            read_held: false,
            to_submit: VecDeque::new(),
            submitting: false,
        };
        let conn = Arc::new(Conn { id, shared: Arc::clone(&shared), guest, st: Mutex::new(st) });
        shared.conns.lock().insert(id, Arc::clone(&conn));
        Box::new(ConnGuest { conn, closed: None })
    });
    (id, h)
}

/// A connection made with [`Server::attach`].
pub struct Attached {
    id: u64,
    shared: Arc<Shared>,
}

impl Attached {
    /// False once the connection closed (the client disconnected, the socket failed, or the server stopped).
    pub fn is_open(&self) -> bool {
        self.shared.conns.lock().contains_key(&self.id)
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attached(conn {}, open {})", self.id, self.is_open())
    }
}

/// An NBD server for one image, served on a messenger [`WorkerPool`] (the one the image's Objecter uses, so
/// that requests and their OSD traffic share threads). Build with [`Server::bind`], then [`Server::run`].
pub struct Server {
    shared: Arc<Shared>,
    pool: Arc<WorkerPool>,
    listener: Option<Listener>,
    bound: BoundAddr,
    read_only: bool,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd::Server({:?}, {} connections)", self.bound, self.shared.conns.lock().len())
    }
}

impl Server {
    /// Binds `addr` (a stale unix socket at the path is replaced: the caller owns the path, e.g. by a
    /// pidfile) and prepares the export `name` for `image`, to be served on `pool`'s workers.
    pub fn bind(
        image: Arc<Image>,
        name: &str,
        addr: &ListenAddr,
        read_only: bool,
        pool: Arc<WorkerPool>,
    ) -> Result<Server, ServerError> {
        // CAN_MULTI_CONN promises that a flush (or FUA write) acknowledged on one connection covers writes
        // completed on every connection, and that all connections see the same data. Both hold here: all
        // connections share this one Image, so they share its cache (if any) and see one another's
        // completed writes; a flush waits for every write issued before it, whichever connection sent it
        // (WriteTracker is per server, not per connection), and then calls Image::flush, which returns
        // only once every write acknowledged before it is on the OSDs. Two separate servers (processes)
        // for one image would break this; the map pidfile prevents that.
        let export = ExportInfo {
            name: name.to_string(),
            size_bytes: image.size(),
            read_only,
            can_multi_conn: true,
            description: format!("cuttle rbd image {name}"),
        };
        let catalog = Arc::new(ExportCatalog::new(vec![export])?);
        let bind_err = |what: String| move |source| ServerError::Bind { what, source };
        let (listener, bound) = match addr {
            ListenAddr::Unix(path) => {
                // Only a socket is replaced (a server killed with -9 leaves its socket behind); any other
                // file at the path is the user's and makes the bind fail.
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(bind_err(path.display().to_string()))?;
                (Listener::Unix(l, path.clone()), BoundAddr::Unix(path.clone()))
            }
            ListenAddr::Tcp(a) => {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(*a),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .map_err(bind_err(a.to_string()))?;
                // A restarted map must be able to take the port back while old connections linger.
                s.set_reuse_address(true).map_err(bind_err(a.to_string()))?;
                s.bind(&(*a).into()).map_err(bind_err(a.to_string()))?;
                s.listen(128).map_err(bind_err(a.to_string()))?;
                s.set_nonblocking(true).map_err(bind_err(a.to_string()))?;
                let l = TcpListener::from_std(s.into());
                let local = l.local_addr()?;
                (Listener::Tcp(l), BoundAddr::Tcp(local))
            }
        };
        let (flush_tx, flush_rx) = crossbeam_channel::unbounded::<FlushJob>();
        let (submit_tx, submit_rx) = crossbeam_channel::unbounded::<SubmitJob>();
        let shared = Arc::new(Shared {
            layout: image.layout(),
            image,
            catalog,
            tracker: WriteTracker::default(),
            ops: OpsBudget::default(),
            flushes: Mutex::new(Some(flush_tx)),
            submits: Mutex::new(Some(submit_tx)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let sh = Arc::clone(&shared);
        threads.push(std::thread::Builder::new().name("nbd-flush".into()).spawn(move || {
            for f in flush_rx {
                let (conn, id) = match f {
                    FlushJob::Flush { conn, id, upto } => {
                        sh.tracker.wait_upto(upto);
                        (conn, id)
                    }
                    FlushJob::Fua { conn, id } => (conn, id),
                };
                let result = sh.image.flush().map(|()| None).map_err(|e| to_nbd(&e));
                conn.complete(id, result);
            }
        })?);
        let sh = Arc::clone(&shared);
        let submit = std::thread::Builder::new().name("nbd-submit".into()).spawn(move || {
            for j in submit_rx {
                sh.ops.take_wait(j.cost);
                let started = j.conn.start(j.id, j.kind, j.seq, j.cost, false);
                debug_assert!(started.is_none(), "only a nowait start is handed back");
            }
        });
        match submit {
            Ok(t) => threads.push(t),
            Err(e) => {
                drop(shared.flushes.lock().take());
                for t in threads {
                    let _ = t.join();
                }
                return Err(e.into());
            }
        }
        Ok(Server { shared, pool, listener: Some(listener), bound, read_only, threads })
    }

    pub fn local_addr(&self) -> &BoundAddr {
        &self.bound
    }

    /// Serves the export on `stream`, one end of a socket pair whose other end went to a client that did
    /// its handshake another way: the kernel's NBD driver, which speaks the transmission phase at once with
    /// the flags [`Server::transmission_flags`] gives (see `nbd::kernel`). Served from now on, before
    /// [`Server::run`], and drained by its stop like any connection.
    pub fn attach(&self, stream: std::os::unix::net::UnixStream) -> Result<Attached, ServerError> {
        stream.set_nonblocking(true)?;
        let export = &self.shared.catalog.exports()[0].name;
        let session = ServerSession::preconnected(Arc::clone(&self.shared.catalog), export)
            .expect("the catalog holds its own first export");
        let (id, h) = add_conn(&self.shared, &self.pool, Stream::Unix(UnixStream::from_std(stream)), session);
        tracing::debug!(conn = id, worker = h.worker(), "connection attached");
        h.kick();
        Ok(Attached { id, shared: Arc::clone(&self.shared) })
    }

    /// The `NBD_FLAG_*` transmission flags of the export, as a handshake would have told a client.
    pub fn transmission_flags(&self) -> u16 {
        // Without structured replies: the kernel's driver speaks only simple ones.
        super::transmission_flags(&self.shared.catalog.exports()[0], false)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves until `stop` is set, then drains (see the module doc) and returns.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), ServerError> {
        let listener = self.listener.take().expect("run once");
        let (shared, pool) = (Arc::clone(&self.shared), Arc::clone(&self.pool));
        let lh =
            self.pool.add_guest(move |_| Box::new(ListenerGuest { listener: Some(listener), shared, pool }));
        while !stop.load(Ordering::Acquire) {
            if lh.is_gone() {
                return Err(ServerError::Io(io::Error::other("the listener could not be served")));
            }
            std::thread::sleep(POLL_TICK);
        }
        tracing::info!("stopping: no new connections, finishing requests in flight");
        let sh = &self.shared;
        sh.stopping.store(true, Ordering::Release);
        lh.kick();
        wait_bounded(CLOSE_TIMEOUT, || lh.is_gone());
        let conns = || sh.conns.lock().values().cloned().collect::<Vec<_>>();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let mut busy = false;
            for c in conns() {
                let mut st = c.st.lock();
                busy |= st.busy();
                if !st.no_read {
                    st.no_read = true;
                    drop(st);
                    c.guest.kick();
                }
            }
            if !busy {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
                break;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        // Connections close (clients see EOF); every acknowledged write is on the OSDs; flush for a cache.
        for c in conns() {
            c.st.lock().fail();
            c.guest.kick();
        }
        if !wait_bounded(CLOSE_TIMEOUT, || sh.conns.lock().is_empty()) {
            tracing::warn!("connections still open after {CLOSE_TIMEOUT:?}");
        }
        if let Err(e) = sh.image.flush() {
            tracing::error!("final flush: {e}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Callbacks still pending hold the connections, not the threads: without their senders the threads
        // end once their queues are empty.
        drop(self.shared.flushes.lock().take());
        drop(self.shared.submits.lock().take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits in short steps until `done`, at most `limit`. Returns whether it happened.
fn wait_bounded(limit: Duration, done: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(DRAIN_POLL);
    }
    true
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdUnixStream;

    use bytes::BufMut;

    use super::super::wire::*;
    use super::super::REQUESTS_IN_FLIGHT_MAX;
    use super::*;

    #[test]
    fn ops_cost_counts_the_stripe_units_a_range_touches() {
        // Goal: the budget's estimate bounds a request's object ops. Method: ranges inside, across and over
        // 4 MiB objects, and with 64 KiB stripe units.
        let plain = Layout::from_order(22).unwrap();
        assert_eq!(ops_cost(&plain, 0, 4096), 1);
        assert_eq!(ops_cost(&plain, (4 << 20) - 10, 20), 2);
        assert_eq!(ops_cost(&plain, 1234, 32 << 20), 9);
        assert_eq!(ops_cost(&plain, 0, 32 << 20), 8);
        assert_eq!(ops_cost(&plain, 7, 0), 1, "an empty range still counts one");
        let striped = Layout::new(4 << 20, 64 << 10, 4).unwrap();
        assert_eq!(ops_cost(&striped, 0, 256 << 10), 4);
    }

    #[test]
    fn the_ops_budget_bounds_starts_and_lets_an_oversized_request_go_alone() {
        // Goal: try_take refuses what does not fit; take_wait waits for room, and a request larger than the
        // whole budget goes once nothing else is outstanding. Method: take, refuse, give from another thread.
        let b = Arc::new(OpsBudget::default());
        assert!(b.try_take(OPS_OUTSTANDING_MAX - 1));
        assert!(!b.try_take(2));
        assert!(b.try_take(1));
        let b2 = Arc::clone(&b);
        let t = std::thread::spawn(move || {
            b2.take_wait(OPS_OUTSTANDING_MAX * 4); // waits until everything is given back
            b2.give(OPS_OUTSTANDING_MAX * 4);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "an oversized request went while others were outstanding");
        b.give(OPS_OUTSTANDING_MAX);
        t.join().unwrap();
        assert_eq!(*b.outstanding.lock(), 0);
    }

    fn state(stream: UnixStream) -> ConnState {
        let export = ExportInfo {
            name: "d".into(),
            size_bytes: 1 << 30,
            read_only: false,
            can_multi_conn: true,
            description: String::new(),
        };
        let catalog = Arc::new(ExportCatalog::new(vec![export]).unwrap());
        ConnState {
            stream: Some(Stream::Unix(stream)),
            session: ServerSession::new(catalog),
            out: VecDeque::new(),
            out_pos: 0,
            closing: false,
            no_read: false,
            read: ReadReadiness::attached(),
            read_held: false,
            to_submit: VecDeque::new(),
            submitting: false,
        }
    }

    /// The client's half of a fixed-newstyle handshake for export "d", without zeroes.
    fn handshake() -> Vec<u8> {
        let mut b = Vec::new();
        b.put_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        b.put_u64(IHAVEOPT);
        b.put_u32(OPT_EXPORT_NAME);
        b.put_u32(1);
        b.put_u8(b'd');
        b
    }

    fn request(b: &mut Vec<u8>, cmd: u16, cookie: u64, offset: u64, len: u32) {
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(0);
        b.put_u16(cmd);
        b.put_u64(cookie);
        b.put_u64(offset);
        b.put_u32(len);
    }

    /// Our end of a socket pair, with the session past the handshake; the peer has read the greeting.
    fn connected() -> (ConnState, StdUnixStream) {
        let (ours, mut peer) = StdUnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut st = state(UnixStream::from_std(ours));
        peer.write_all(&handshake()).unwrap();
        st.read_in(1, &mut vec![0u8; READ_CHUNK_BYTES]);
        st.take_output(1);
        st.write_out(1);
        assert!(st.out.is_empty() && !st.closing);
        // Greeting (magic, IHAVEOPT, flags), then the export's size and flags.
        let mut hello = [0u8; 18 + 10];
        peer.read_exact(&mut hello).unwrap();
        (st, peer)
    }

    #[test]
    fn a_connection_holds_reading_at_the_in_flight_limit_and_resumes_after_a_reply() {
        // Goal: the shell reads only while the session wants input and remembers that it stopped with input
        // left in the socket (read_held with may_read), which is what makes a reply kick the connection.
        // Method: a real unix socket pair; the peer sends more 4 KiB writes than may be in flight (more
        // bytes than one read chunk); answer one and read again.
        let (mut st, mut peer) = connected();
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut input = Vec::new();
        let n = REQUESTS_IN_FLIGHT_MAX + 64;
        for i in 0..n {
            request(&mut input, CMD_WRITE, i as u64, (i as u64) << 12, 4096);
            input.extend_from_slice(&[i as u8; 4096]);
        }
        let writer = std::thread::spawn(move || {
            peer.write_all(&input).unwrap();
            peer
        });
        let t = Instant::now();
        while st.to_submit.len() < REQUESTS_IN_FLIGHT_MAX {
            assert!(t.elapsed() < Duration::from_secs(10), "requests never came");
            st.read.on_event(true, false); // as a readable edge would
            st.read_in(1, &mut buf);
        }
        assert_eq!(st.to_submit.len(), REQUESTS_IN_FLIGHT_MAX, "no more requests than may be in flight");
        assert!(!st.session.wants_read());
        // The last read may have been short (the peer was still writing): its next edge finds the session
        // full and holds.
        st.read.on_event(true, false);
        st.read_in(1, &mut buf);
        assert!(st.read_held && st.read.may_read() && !st.closing);
        assert_eq!(st.to_submit.len(), REQUESTS_IN_FLIGHT_MAX);

        let (id, kind) = st.to_submit.pop_front().unwrap();
        let RequestKind::Write { offset: 0, data, fua: false } = kind else { panic!("{kind:?}") };
        assert!(data.iter().all(|&b| b == 0));
        st.session.reply(id, Ok(None)).unwrap();
        st.take_output(1);
        assert!(st.session.wants_read() || st.to_submit.len() == REQUESTS_IN_FLIGHT_MAX);
        st.read_held = false;
        st.read_in(1, &mut buf);
        assert_eq!(st.to_submit.len(), REQUESTS_IN_FLIGHT_MAX, "the freed slot was taken again");
        let (_, next) = st.to_submit.back().unwrap();
        assert!(
            matches!(next, RequestKind::Write { offset, .. } if *offset == (REQUESTS_IN_FLIGHT_MAX as u64) << 12)
        );
        drop(writer);
    }

    #[test]
    fn replies_larger_than_the_socket_buffer_go_out_in_pieces_in_order() {
        // Goal: write_out stops at WouldBlock part-way through a chunk and resumes exactly there. Method: a
        // real unix socket pair; 64 reads of 256 KiB answered (in reverse order) while the peer does not
        // read; then the peer reads everything and checks each reply's cookie and data.
        let (mut st, mut peer) = connected();
        let n = 64usize;
        const LEN: usize = 256 << 10;
        let mut input = Vec::new();
        for i in 0..n {
            request(&mut input, CMD_READ, i as u64, (i * LEN) as u64, LEN as u32);
        }
        peer.write_all(&input).unwrap();
        st.read.on_event(true, false);
        st.read_in(1, &mut vec![0u8; READ_CHUNK_BYTES]);
        assert_eq!(st.to_submit.len(), n);
        let data = |cookie: usize| Bytes::from((0..LEN).map(|j| (j + cookie) as u8).collect::<Vec<u8>>());
        for (id, kind) in std::mem::take(&mut st.to_submit).into_iter().rev() {
            let RequestKind::Read { offset, .. } = kind else { panic!("{kind:?}") };
            st.session.reply(id, Ok(Some(data(offset as usize / LEN)))).unwrap();
        }
        st.take_output(1);
        st.write_out(1);
        assert!(!st.out.is_empty() && !st.closing, "16 MiB fit in the socket buffer?");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        let t = Instant::now();
        while !st.out.is_empty() {
            assert!(t.elapsed() < Duration::from_secs(10), "the replies never drained");
            st.write_out(1);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!st.closing);
        st.stream = None; // EOF for the reader
        let all = reader.join().unwrap();
        assert_eq!(all.len(), n * (16 + LEN));
        for (i, r) in all.chunks(16 + LEN).enumerate() {
            let cookie = n - 1 - i;
            assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes(), "reply {i} magic");
            assert_eq!(&r[4..8], &[0; 4], "reply {i} error");
            assert_eq!(&r[8..16], &(cookie as u64).to_be_bytes(), "reply {i} cookie");
            assert!(r[16..] == data(cookie)[..], "reply {i} data");
        }
    }
}
