//! The NBD server shell: one mio event loop thread serving one open [`Image`] to many connections, each a
//! [`ServerSession`].
//!
//! Requests go to the image's async API and are answered as they complete, out of order: each request's
//! completion callback ([`Image::aio_read_with`] and friends, which skip the [`crate::image::AioCompletion`]
//! slot) pushes its reply onto [`Replies`] and wakes the loop through a mio [`Waker`] (only when the queue
//! turns non-empty), so a request costs no thread hand-off of its own. The image starts the request's
//! object ops on the loop thread itself (or parks them when the image's queue depth is used up).
//! Flushes and FUA writes call the blocking [`Image::flush`], which must not run in a completion callback
//! (an Objecter thread) nor on the loop, so they go to one flush thread; a flush first waits there for the
//! writes issued before it (see [`WriteTracker`]), which complete through callbacks, never that thread.
//!
//! Flow control is the session's: the loop reads a socket only while [`ServerSession::wants_read`], which
//! turns false at [`super::REQUESTS_IN_FLIGHT_MAX`] requests in flight or a large reply backlog. Sockets are
//! registered edge-triggered for both directions once; after every change the loop "pumps" the connection
//! (read while wanted, write while there is output, each until `WouldBlock`), so no readiness edge is lost.
//!
//! Shutdown ([`Server::run`]'s stop flag): the listener closes, connections stop reading, every request in
//! flight completes and its reply is sent (bounded by [`DRAIN_TIMEOUT`]), then the image is flushed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::{Condvar, Mutex};

use super::{Event, ExportCatalog, ExportInfo, NbdError, RequestId, RequestKind, ServerSession};
use crate::image::{Image, RbdError};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Bytes read from a socket per call: bounded chunks, as the session's contract asks.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// How often the loop looks at the stop flag when nothing happens.
const POLL_TICK: Duration = Duration::from_millis(100);
/// Longest a stop waits for requests in flight to complete and their replies to be written.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once; more are accepted and closed at once.
pub const CONNECTIONS_MAX: usize = 1024;

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

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
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

/// Work for the flush thread.
enum FlushJob {
    /// An NBD flush: wait for the writes numbered at most `upto`, then flush the image.
    Flush { conn: usize, id: RequestId, upto: u64 },
    /// A FUA write (or trim/zeroes) that completed successfully: flush the image, then reply.
    Fua { conn: usize, id: RequestId },
}

/// Replies completed off the loop thread, waiting for the loop. Bounded in practice by the requests in
/// flight, which each session caps.
struct Replies {
    queue: Mutex<Vec<Done>>,
    waker: Waker,
}

impl Replies {
    fn push(&self, d: Done) {
        let was_empty = {
            let mut q = self.queue.lock();
            let e = q.is_empty();
            q.push(d);
            e
        };
        // The loop takes the whole queue at once, so only the push that makes it non-empty needs to wake
        // it; later pushes are seen by that same drain or wake it again once it has emptied the queue.
        if was_empty {
            let _ = self.waker.wake();
        }
    }

    fn take(&self) -> Vec<Done> {
        std::mem::take(&mut *self.queue.lock())
    }
}

struct Done {
    conn: usize,
    id: RequestId,
    result: Result<Option<Bytes>, NbdError>,
}

struct Conn {
    stream: Stream,
    session: ServerSession,
    out: VecDeque<Bytes>,
    /// Bytes of `out.front()` already written.
    out_pos: usize,
    /// The session ended (or the socket failed): write what is queued, then close.
    closing: bool,
    /// Stopping: read nothing more, only finish what is in flight.
    no_read: bool,
}

/// An NBD server for one image. Build with [`Server::bind`], then [`Server::run`] on the thread that should
/// own the event loop.
pub struct Server {
    poll: Poll,
    listener: Option<Listener>,
    bound: BoundAddr,
    image: Arc<Image>,
    catalog: Arc<ExportCatalog>,
    read_only: bool,
    conns: HashMap<usize, Conn>,
    next_conn: usize,
    /// Shared with write callbacks (FUA); emptied at the end of [`Server::run`] so that callbacks still
    /// pending then cannot keep the flush thread alive.
    flushes: Arc<Mutex<Option<Sender<FlushJob>>>>,
    replies: Arc<Replies>,
    tracker: Arc<WriteTracker>,
    threads: Vec<JoinHandle<()>>,
    /// The socket read buffer, kept between pumps: allocating and zeroing it per pump (once per reply)
    /// cost more than the reply itself.
    read_buf: Vec<u8>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nbd::Server({:?}, {} connections)", self.bound, self.conns.len())
    }
}

fn to_nbd(e: &RbdError) -> NbdError {
    match e {
        RbdError::OutOfRange { .. } => NbdError::Inval,
        RbdError::Closed => NbdError::Shutdown,
        _ => NbdError::Io,
    }
}

impl Server {
    /// Binds `addr` (a stale unix socket at the path is replaced: the caller owns the path, e.g. by a
    /// pidfile) and prepares the export `name` for `image`.
    pub fn bind(
        image: Arc<Image>,
        name: &str,
        addr: &ListenAddr,
        read_only: bool,
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
        let poll = Poll::new()?;
        let bind_err = |what: String| move |source| ServerError::Bind { what, source };
        let (mut listener, bound) = match addr {
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
        match &mut listener {
            Listener::Unix(l, _) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
            Listener::Tcp(l) => poll.registry().register(l, LISTENER, Interest::READABLE)?,
        }
        let replies =
            Arc::new(Replies { queue: Mutex::new(Vec::new()), waker: Waker::new(poll.registry(), WAKER)? });
        let (flush_tx, flush_rx) = crossbeam_channel::unbounded::<FlushJob>();
        let tracker = Arc::new(WriteTracker::default());
        let mut threads = Vec::new();
        {
            let (r, t, img) = (Arc::clone(&replies), Arc::clone(&tracker), Arc::clone(&image));
            threads.push(std::thread::Builder::new().name("nbd-flush".into()).spawn(move || {
                for f in flush_rx {
                    let (conn, id) = match f {
                        FlushJob::Flush { conn, id, upto } => {
                            t.wait_upto(upto);
                            (conn, id)
                        }
                        FlushJob::Fua { conn, id } => (conn, id),
                    };
                    let result = img.flush().map(|()| None).map_err(|e| to_nbd(&e));
                    r.push(Done { conn, id, result });
                }
            })?);
        }
        Ok(Server {
            poll,
            listener: Some(listener),
            bound,
            image,
            catalog,
            read_only,
            conns: HashMap::new(),
            next_conn: FIRST_CONN,
            flushes: Arc::new(Mutex::new(Some(flush_tx))),
            replies,
            tracker,
            threads,
            read_buf: vec![0u8; READ_CHUNK_BYTES],
        })
    }

    pub fn local_addr(&self) -> &BoundAddr {
        &self.bound
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves until `stop` is set, then drains (see the module doc) and returns.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(256);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Acquire) && drain_deadline.is_none() {
                tracing::info!("stopping: no new connections, finishing requests in flight");
                self.close_listener();
                for c in self.conns.values_mut() {
                    c.no_read = true;
                }
                drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
            }
            if let Some(d) = drain_deadline {
                let busy = self.conns.values().any(|c| c.session.in_flight() > 0 || !c.out.is_empty());
                if !busy {
                    break;
                }
                if Instant::now() > d {
                    tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
                    break;
                }
            }
            match self.poll.poll(&mut events, Some(POLL_TICK)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) => self.pump(t),
                }
            }
            // Completions (the waker only says "look here").
            let mut touched = BTreeSet::new();
            for d in self.replies.take() {
                if let Some(c) = self.conns.get_mut(&d.conn) {
                    if let Err(e) = c.session.reply(d.id, d.result) {
                        tracing::error!(conn = d.conn, "reply refused: {e}");
                    }
                    touched.insert(d.conn);
                }
            }
            for t in touched {
                self.pump(t);
            }
        }
        // Connections close (clients see EOF); every acknowledged write is on the OSDs; flush for a cache.
        self.conns.clear();
        if let Err(e) = self.image.flush() {
            tracing::error!("final flush: {e}");
        }
        self.close_listener();
        drop(self.flushes.lock().take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(())
    }

    fn close_listener(&mut self) {
        if let Some(l) = self.listener.take() {
            match l {
                Listener::Unix(mut l, path) => {
                    let _ = self.poll.registry().deregister(&mut l);
                    let _ = std::fs::remove_file(path);
                }
                Listener::Tcp(mut l) => {
                    let _ = self.poll.registry().deregister(&mut l);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match &self.listener {
                Some(Listener::Unix(l, _)) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Some(Listener::Tcp(l)) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                }),
                None => return,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= CONNECTIONS_MAX {
                tracing::warn!("{CONNECTIONS_MAX} connections open; refusing one");
                continue;
            }
            let t = self.next_conn;
            self.next_conn += 1;
            if let Err(e) = self.poll.registry().register(
                stream.source(),
                Token(t),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("registering a connection: {e}");
                continue;
            }
            tracing::debug!(conn = t, "connection accepted");
            let session = ServerSession::new(Arc::clone(&self.catalog));
            self.conns.insert(
                t,
                Conn { stream, session, out: VecDeque::new(), out_pos: 0, closing: false, no_read: false },
            );
            self.pump(t);
        }
    }

    /// Moves everything that can move on connection `t`: events, replies out, input in, until nothing
    /// changes or the socket would block; closes it when done.
    fn pump(&mut self, t: usize) {
        let Some(mut c) = self.conns.remove(&t) else { return };
        let mut buf = std::mem::take(&mut self.read_buf);
        // An empty buffer would read as EOF; pump never runs inside itself, so the buffer is always home.
        assert_eq!(buf.len(), READ_CHUNK_BYTES, "pump is not reentrant");
        loop {
            let mut progress = false;
            while let Some(ev) = c.session.poll_event() {
                progress = true;
                match ev {
                    Event::ExportSelected { export } => {
                        tracing::debug!(conn = t, export = %export.name, "export selected")
                    }
                    Event::Request { id, kind, .. } => self.submit(t, &mut c, id, kind),
                    Event::Close { reason } => {
                        tracing::debug!(conn = t, "session closed: {reason}");
                        c.closing = true;
                    }
                }
            }
            while let Some(b) = c.session.poll_transmit() {
                c.out.push_back(b);
            }
            // Write.
            while let Some(front) = c.out.front() {
                match c.stream.write(&front[c.out_pos..]) {
                    Ok(0) => {
                        c.closing = true;
                        c.out.clear();
                    }
                    Ok(n) => {
                        progress = true;
                        c.out_pos += n;
                        if c.out_pos == front.len() {
                            c.out.pop_front();
                            c.out_pos = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(conn = t, "write: {e}");
                        c.closing = true;
                        c.out.clear();
                    }
                }
            }
            // Read.
            if !c.closing && !c.no_read && c.session.wants_read() {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        tracing::debug!(conn = t, "client closed the connection");
                        c.closing = true;
                        c.out.clear();
                    }
                    Ok(n) => {
                        progress = true;
                        c.session.received(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => {
                        tracing::debug!(conn = t, "read: {e}");
                        c.closing = true;
                        c.out.clear();
                    }
                }
            }
            if c.closing && c.out.is_empty() {
                // Replies to requests still in flight are dropped when they arrive (the conn is gone);
                // the writes themselves still complete in the image.
                let _ = self.poll.registry().deregister(c.stream.source());
                tracing::debug!(conn = t, "connection closed");
                self.read_buf = buf;
                return;
            }
            if !progress {
                break;
            }
        }
        self.conns.insert(t, c);
        self.read_buf = buf;
    }

    fn submit(&mut self, t: usize, c: &mut Conn, id: RequestId, kind: RequestKind) {
        let img = &self.image;
        let fail = |c: &mut Conn, e: RbdError| {
            let _ = c.session.reply(id, Err(to_nbd(&e)));
        };
        match kind {
            RequestKind::Read { offset, len } => {
                let r = Arc::clone(&self.replies);
                let done = move |res: Result<Bytes, RbdError>| {
                    r.push(Done { conn: t, id, result: res.map(Some).map_err(|e| to_nbd(&e)) })
                };
                if let Err(e) = img.aio_read_with(offset, len as u64, done) {
                    fail(c, e)
                }
            }
            RequestKind::Write { offset, data, fua } => {
                let seq = self.tracker.begin();
                match img.aio_write_with(offset, data, self.write_done(t, id, seq, fua)) {
                    Ok(()) => {}
                    Err(e) => {
                        self.tracker.end(seq);
                        fail(c, e)
                    }
                }
            }
            // Zeroing is discard: without snapshots or a parent, discarded ranges read as zeros. NO_HOLE
            // is a SHOULD about allocation, not about content, so ignoring it is allowed.
            RequestKind::Trim { offset, len, fua } | RequestKind::WriteZeroes { offset, len, fua, .. } => {
                let seq = self.tracker.begin();
                match img.aio_discard_with(offset, len as u64, self.write_done(t, id, seq, fua)) {
                    Ok(()) => {}
                    Err(e) => {
                        self.tracker.end(seq);
                        fail(c, e)
                    }
                }
            }
            RequestKind::Flush => {
                let upto = self.tracker.issued();
                if let Some(f) = &*self.flushes.lock() {
                    let _ = f.send(FlushJob::Flush { conn: t, id, upto });
                }
            }
        }
    }

    /// The completion callback of a write, trim or zeroes request numbered `seq`: it no longer holds back
    /// flushes; a FUA request goes on to the flush thread (durable before the reply; acknowledged writes
    /// already are without a cache, and a cache layer is drained by flush), any other is answered now.
    fn write_done(
        &self,
        conn: usize,
        id: RequestId,
        seq: u64,
        fua: bool,
    ) -> impl FnOnce(Result<(), RbdError>) + Send + 'static {
        let (replies, tracker) = (Arc::clone(&self.replies), Arc::clone(&self.tracker));
        let flushes = Arc::clone(&self.flushes);
        move |r| {
            tracker.end(seq);
            if fua && r.is_ok() {
                // No flush thread: the server has stopped and nobody waits for this reply.
                if let Some(f) = &*flushes.lock() {
                    let _ = f.send(FlushJob::Fua { conn, id });
                }
                return;
            }
            replies.push(Done { conn, id, result: r.map(|()| None).map_err(|e| to_nbd(&e)) });
        }
    }
}
