//! Object dispatch's engine: keeps an image's object ops within its in-flight budget without a thread of
//! its own.
//!
//! An image request arrives as a list of per-object compound ops ([`ObjOp`]). An op that finds the FIFO
//! empty, the budget free and nobody else sending starts at once on the caller's thread (the caller becomes
//! the *sender* for as long as it starts ops); otherwise it is parked in the image's FIFO. The sender keeps
//! starting parked ops until the FIFO is empty or the budget is used up. A completion that gives budget back
//! becomes the sender itself when ops are parked and nobody sends, so parked ops leave from the messenger
//! thread that completed an op, without blocking and without a thread hop. The common case, a submitter
//! that finds room, takes the image's lock twice (to start, and to see that nothing else is parked) and
//! goes straight to the Objecter; its completion takes it once more.
//!
//! Invariants (asserted or argued where they are used):
//! - **Budget.** At most `depth` object ops and (unless only one op is in flight) `bytes_max` bytes are in
//!   flight per image. Both are clamped to the Objecter's own budget, so with the image alone on its
//!   Objecter, `aio_operate` always finds room and never waits, which matters because the sender may be a
//!   messenger thread. (The Objecter drops an op from its budget before it runs the op's callback, and we
//!   count an op in flight from before `aio_operate` until its callback, so the Objecter's ops from this
//!   image are always a subset of ours.)
//! - **Order.** Object ops start in the order they were submitted: only the sender starts ops, there is one
//!   sender at a time, it pops the FIFO in order, and a new op starts directly only when nothing is parked
//!   and nobody sends (otherwise it is parked behind the rest). So two requests from one submitter
//!   reach the Objecter in the order they were submitted, as with the former dispatcher thread, and the
//!   Objecter keeps per-object order from there.
//! - **Progress.** When the FIFO is non-empty, either a sender is running or the head does not fit the
//!   budget (so an op is in flight, and its completion will start the head). Nobody waits while it is the
//!   sender.
//! - **Backpressure never blocks a callback.** A submitter that is not inside one of our completion
//!   callbacks waits (up to `wait_max`, then [`RbdError::QueueFull`]) while `parked_max` ops are parked.
//!   A submission from inside a completion callback (a messenger thread; marked by a thread-local) never
//!   waits: it may use `callback_parked_max` more slots, and when even those are taken its op fails at once
//!   with [`RbdError::QueueFull`]. So the FIFO never holds more than `parked_max + callback_parked_max` ops
//!   and a messenger thread never sleeps here.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use rados::objecter::{IoCtx, ObjectOperation, OpReply, RadosError};

use crate::image::{RbdError, Result};
use crate::layers::Done;
use crate::striper::ObjectExtent;

/// Object ops an image parks before ordinary submitters wait (the former dispatcher queue held 1024
/// requests).
pub const PARKED_OPS_MAX: usize = 1024;
/// Further parked ops only submissions from completion callbacks may use (they never wait).
pub const CALLBACK_PARKED_OPS_MAX: usize = 256;
/// Longest a submitter waits for room among the parked ops, and `close` for them to be started (as the
/// Objecter's own wait for budget room).
pub const SUBMIT_WAIT_MAX: Duration = Duration::from_secs(120);

/// An image's budget and queue bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Object ops in flight (at least 1).
    pub depth: usize,
    /// Bytes in flight, counted as the Objecter counts them (payloads plus read lengths); one op larger than
    /// this goes alone.
    pub bytes_max: u64,
    /// Parked ops before ordinary submitters wait.
    pub parked_max: usize,
    /// Extra parked ops for submissions from completion callbacks.
    pub callback_parked_max: usize,
    /// How long a submitter waits for room, and `close` for parked ops to start.
    pub wait_max: Duration,
}

/// Where object ops go: the Objecter (through an [`IoCtx`]) in production, a fake in tests.
pub trait ObjectSink: Send + Sync + 'static {
    /// Starts `op` on `oid`; `done` runs exactly once with the outcome, at once or later on another thread.
    /// Must not block while the caller keeps within the budget it was given.
    fn start(
        &self,
        oid: &str,
        op: ObjectOperation,
        done: impl FnOnce(std::result::Result<OpReply, RadosError>) + Send + 'static,
    );
}

impl ObjectSink for IoCtx {
    fn start(
        &self,
        oid: &str,
        op: ObjectOperation,
        done: impl FnOnce(std::result::Result<OpReply, RadosError>) + Send + 'static,
    ) {
        match self.aio_operate(oid, op) {
            Ok(c) => c.on_complete(done),
            Err(e) => done(Err(e)),
        }
    }
}

thread_local! {
    /// Nesting depth of our completion callbacks on this thread.
    static IN_COMPLETION: Cell<u32> = const { Cell::new(0) };
}

/// Marks the current thread as running a completion callback for as long as it lives.
struct CompletionScope;

impl CompletionScope {
    fn enter() -> CompletionScope {
        IN_COMPLETION.with(|c| c.set(c.get() + 1));
        CompletionScope
    }
}

impl Drop for CompletionScope {
    fn drop(&mut self) {
        IN_COMPLETION.with(|c| c.set(c.get() - 1));
    }
}

/// True while this thread runs one of our completion callbacks (it must not block).
pub fn in_completion() -> bool {
    IN_COMPLETION.with(|c| c.get() > 0)
}

/// What an object op does with its answer.
#[derive(Debug)]
pub enum OnDone {
    /// Its read steps' bytes go to these pieces of the request's buffer; an absent object or a short read
    /// leaves zeros.
    Read(Vec<ObjectExtent>),
    /// A write: any error fails the request.
    Write,
    /// Discard-type ops: an absent object is fine.
    AbsentOk,
}

/// One compound op on one object of an image request.
#[derive(Debug)]
pub struct ObjOp {
    pub oid: String,
    pub op: ObjectOperation,
    /// What it costs against the byte budget (as `ObjectOperation` charges the Objecter's).
    pub bytes: u64,
    pub on_done: OnDone,
}

/// Zeros for reads of absent objects, handed out without allocating.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn zeros(len: usize) -> Bytes {
    if len <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..len])
    } else {
        Bytes::from(vec![0; len])
    }
}

/// A request of several object ops: what is outstanding and, for reads, the buffer being filled.
struct ReqState {
    pending: usize,
    buf: Vec<u8>,
    read: bool,
    err: Option<RbdError>,
    done: Option<Done>,
}

/// Where an object op's outcome goes.
enum ReqRef {
    /// The request's only op: its answer completes the request directly (no shared state, and a read
    /// covering the whole request hands the reply's bytes through without a copy).
    Only { buf_len: usize, done: Done },
    /// One of several ops: counts down the shared state.
    Shared(Arc<Mutex<ReqState>>),
}

impl ReqRef {
    fn complete(self, on_done: OnDone, r: std::result::Result<OpReply, RadosError>) {
        match self {
            ReqRef::Only { buf_len, done } => done(only_outcome(on_done, buf_len, r)),
            ReqRef::Shared(st) => {
                let mut g = st.lock();
                let err = match (on_done, r) {
                    (OnDone::Read(pieces), Ok(reply)) => copy_pieces(&mut g.buf, &pieces, &reply).err(),
                    (OnDone::Read(_) | OnDone::AbsentOk, Err(RadosError::NotFound)) => None,
                    (_, Ok(_)) => None,
                    (_, Err(e)) => Some(RbdError::from(e)),
                };
                if let Some(e) = err {
                    g.err.get_or_insert(e);
                }
                assert!(g.pending > 0, "an object op answers once");
                g.pending -= 1;
                if g.pending > 0 {
                    return;
                }
                let r = match g.err.take() {
                    Some(e) => Err(e),
                    None if g.read => Ok(Bytes::from(std::mem::take(&mut g.buf))),
                    None => Ok(Bytes::new()),
                };
                let done = g.done.take().expect("a request completes once");
                drop(g);
                done(r);
            }
        }
    }
}

/// Copies each read step's bytes to its piece of `buf` (shorter data leaves the zeros there).
fn copy_pieces(buf: &mut [u8], pieces: &[ObjectExtent], reply: &OpReply) -> Result<()> {
    let mut err = None;
    for (i, p) in pieces.iter().enumerate() {
        match reply.data(i) {
            Ok(d) => {
                let n = d.len().min(p.len as usize);
                let at = p.buffer_offset as usize;
                buf[at..at + n].copy_from_slice(&d[..n]);
            }
            Err(e) => err = Some(e.into()),
        }
    }
    err.map_or(Ok(()), Err)
}

/// The outcome of a request of one object op.
fn only_outcome(
    on_done: OnDone,
    buf_len: usize,
    r: std::result::Result<OpReply, RadosError>,
) -> Result<Bytes> {
    match (on_done, r) {
        (OnDone::Read(pieces), Ok(reply)) => {
            if let [p] = pieces.as_slice() {
                if p.buffer_offset == 0 && p.len as usize == buf_len {
                    // The common case (a 4K read inside one object): the reply's bytes are the answer.
                    let d = reply.data(0)?;
                    return Ok(match d.len().cmp(&buf_len) {
                        std::cmp::Ordering::Equal => d,
                        std::cmp::Ordering::Greater => d.slice(..buf_len),
                        std::cmp::Ordering::Less => {
                            // A short read (past the object's end): the rest reads as zeros.
                            let mut v = Vec::with_capacity(buf_len);
                            v.extend_from_slice(&d);
                            v.resize(buf_len, 0);
                            Bytes::from(v)
                        }
                    });
                }
            }
            let mut buf = vec![0; buf_len];
            copy_pieces(&mut buf, &pieces, &reply)?;
            Ok(Bytes::from(buf))
        }
        (OnDone::Read(_), Err(RadosError::NotFound)) => Ok(zeros(buf_len)),
        (OnDone::AbsentOk, Err(RadosError::NotFound)) => Ok(Bytes::new()),
        (_, Ok(_)) => Ok(Bytes::new()),
        (_, Err(e)) => Err(e.into()),
    }
}

/// An object op waiting for budget.
struct Parked {
    op: ObjOp,
    req: ReqRef,
}

impl Parked {
    /// Fails the op without starting it; a request of several ops still counts it down.
    fn fail(self, e: RbdError) {
        match self.req {
            ReqRef::Only { done, .. } => done(Err(e)),
            ReqRef::Shared(st) => {
                st.lock().err.get_or_insert(e);
                // Counted down with a harmless outcome: the error recorded first wins.
                ReqRef::Shared(st).complete(OnDone::Write, Ok(OpReply { version: 0, outs: Vec::new() }));
            }
        }
    }
}

struct Queue {
    inflight_ops: usize,
    inflight_bytes: u64,
    parked: VecDeque<Parked>,
    /// A thread is starting parked ops (the sender).
    sending: bool,
    closed: bool,
    /// Threads waiting on `room` (submitters and `close`).
    waiting: usize,
}

impl Queue {
    fn fits(&self, limits: &Limits, bytes: u64) -> bool {
        self.inflight_ops < limits.depth
            && (self.inflight_ops == 0 || self.inflight_bytes.saturating_add(bytes) <= limits.bytes_max)
    }

    /// Whether the caller must become the sender: ops are parked, the head fits, nobody sends.
    fn needs_sender(&self, limits: &Limits) -> bool {
        !self.sending && self.parked.front().is_some_and(|p| self.fits(limits, p.op.bytes))
    }
}

/// Counters for tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub inflight_ops: usize,
    pub inflight_bytes: u64,
    pub parked: usize,
    /// Submitters (and `close`) waiting for room.
    pub waiting: usize,
}

/// One image's object-op budget and FIFO over a sink.
pub struct Dispatch<S> {
    sink: S,
    limits: Limits,
    q: Mutex<Queue>,
    /// Signalled when a parked op starts (room for a waiting submitter) and on close.
    room: Condvar,
    closed: AtomicBool,
}

impl<S: ObjectSink> Dispatch<S> {
    pub fn new(sink: S, mut limits: Limits) -> Arc<Dispatch<S>> {
        limits.depth = limits.depth.max(1);
        limits.parked_max = limits.parked_max.max(1);
        Arc::new(Dispatch {
            sink,
            limits,
            q: Mutex::new(Queue {
                inflight_ops: 0,
                inflight_bytes: 0,
                parked: VecDeque::new(),
                sending: false,
                closed: false,
                waiting: 0,
            }),
            room: Condvar::new(),
            closed: AtomicBool::new(false),
        })
    }

    #[cfg(test)]
    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub fn stats(&self) -> Stats {
        let q = self.q.lock();
        Stats {
            inflight_ops: q.inflight_ops,
            inflight_bytes: q.inflight_bytes,
            parked: q.parked.len(),
            waiting: q.waiting,
        }
    }

    /// Submits the object ops of one image request; `done` gets the read's bytes (`buf_len` of them) or
    /// empty bytes, once every op has answered. May wait for room (see the module doc), never when called
    /// from a completion callback.
    pub fn submit(self: &Arc<Self>, ops: Vec<ObjOp>, buf_len: usize, done: Done) {
        if self.is_closed() {
            return done(Err(RbdError::Closed));
        }
        match ops.len() {
            0 => done(Ok(zeros(buf_len))),
            1 => {
                let op = ops.into_iter().next().expect("one op");
                self.enqueue(std::iter::once(Parked { op, req: ReqRef::Only { buf_len, done } }));
            }
            n => {
                let read = ops.iter().any(|o| matches!(o.on_done, OnDone::Read(_)));
                let st = Arc::new(Mutex::new(ReqState {
                    pending: n,
                    buf: if read { vec![0; buf_len] } else { Vec::new() },
                    read,
                    err: None,
                    done: Some(done),
                }));
                self.enqueue(ops.into_iter().map(|op| Parked { op, req: ReqRef::Shared(Arc::clone(&st)) }));
            }
        }
    }

    fn enqueue(self: &Arc<Self>, ops: impl Iterator<Item = Parked>) {
        let from_callback = in_completion();
        let l = self.limits;
        let mut failed: Vec<(Parked, RbdError)> = Vec::new();
        let mut err: Option<RbdError> = None;
        let mut deadline: Option<Instant> = None;
        // An op that found the FIFO empty, the budget free and nobody sending: it is already counted in
        // flight and we are the sender, so it starts without going through the FIFO.
        let mut direct: Option<Parked> = None;
        let mut q = self.q.lock();
        for p in ops {
            if let Some(e) = &err {
                failed.push((p, e.clone()));
                continue;
            }
            if from_callback {
                // Never wait: take the reserved room or fail at once.
                if q.parked.len() >= l.parked_max + l.callback_parked_max {
                    err = Some(RbdError::QueueFull { parked_ops: q.parked.len(), waited_ms: 0 });
                }
            } else {
                while q.parked.len() >= l.parked_max && !q.closed {
                    // Nobody waits while it is the sender: start what can start first.
                    if let Some(first) = direct.take() {
                        MutexGuard::unlocked(&mut q, || self.send(Some(first)));
                        continue;
                    }
                    if q.needs_sender(&l) {
                        q.sending = true;
                        MutexGuard::unlocked(&mut q, || self.send(None));
                        continue;
                    }
                    let d = *deadline.get_or_insert_with(|| Instant::now() + l.wait_max);
                    q.waiting += 1;
                    let timed_out = self.room.wait_until(&mut q, d).timed_out();
                    q.waiting -= 1;
                    if timed_out && q.parked.len() >= l.parked_max && !q.closed {
                        tracing::warn!(
                            parked = q.parked.len(),
                            "rbd: no room for object ops within {:?}",
                            l.wait_max
                        );
                        err = Some(RbdError::QueueFull {
                            parked_ops: q.parked.len(),
                            waited_ms: l.wait_max.as_millis() as u64,
                        });
                        break;
                    }
                }
            }
            if err.is_none() && q.closed {
                err = Some(RbdError::Closed);
            }
            if let Some(e) = &err {
                failed.push((p, e.clone()));
            } else if !q.sending && q.parked.is_empty() && q.fits(&l, p.op.bytes) {
                debug_assert!(direct.is_none(), "a direct op makes us the sender");
                q.inflight_ops += 1;
                q.inflight_bytes += p.op.bytes;
                assert!(q.inflight_ops <= l.depth, "queue depth exceeded");
                q.sending = true;
                direct = Some(p);
            } else {
                q.parked.push_back(p);
            }
        }
        let send = direct.is_some() || q.needs_sender(&l);
        if send {
            q.sending = true;
        }
        drop(q);
        for (p, e) in failed {
            p.fail(e);
        }
        if send {
            self.send(direct);
        }
    }

    /// Starts `first` (already counted in flight), then parked ops in FIFO order while they fit the budget.
    /// Only the sender calls this (it set `sending`); it clears `sending` under the same lock in which it
    /// finds nothing more to start, so a completion or submitter that looks afterwards takes over (no lost
    /// wake-up).
    fn send(self: &Arc<Self>, mut next: Option<Parked>) {
        loop {
            if let Some(p) = next.take() {
                self.start(p);
            }
            let mut q = self.q.lock();
            assert!(q.sending, "only the sender starts parked ops");
            let fits = q.parked.front().is_some_and(|p| q.fits(&self.limits, p.op.bytes));
            if !fits {
                q.sending = false;
                return;
            }
            let p = q.parked.pop_front().expect("a head that fits");
            q.inflight_ops += 1;
            q.inflight_bytes += p.op.bytes;
            assert!(q.inflight_ops <= self.limits.depth, "queue depth exceeded");
            if q.waiting > 0 {
                if q.closed {
                    self.room.notify_all();
                } else {
                    self.room.notify_one();
                }
            }
            next = Some(p);
        }
    }

    /// Hands one op to the sink; its completion gives the budget back and may become the sender.
    fn start(self: &Arc<Self>, p: Parked) {
        let Parked { op: ObjOp { oid, op, bytes, on_done }, req } = p;
        let d = Arc::clone(self);
        self.sink.start(&oid, op, move |r| {
            // Whatever runs from here (parked ops, the request's callbacks, submissions they make) runs on
            // a completion thread and must not wait.
            let _scope = CompletionScope::enter();
            d.release(bytes);
            req.complete(on_done, r);
        });
    }

    fn release(self: &Arc<Self>, bytes: u64) {
        let send = {
            let mut q = self.q.lock();
            assert!(q.inflight_ops > 0 && q.inflight_bytes >= bytes, "an op is released once");
            q.inflight_ops -= 1;
            q.inflight_bytes -= bytes;
            let s = q.needs_sender(&self.limits);
            if s {
                q.sending = true;
            }
            s
        };
        if send {
            self.send(None);
        }
    }

    /// Refuses new requests. Parked ops are still started as budget frees up: from a completion callback
    /// this returns at once; elsewhere it waits (up to `wait_max`) until every parked op has started, and
    /// fails those still parked then with [`RbdError::Closed`]. Ops in flight complete as usual.
    pub fn close(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        let mut q = self.q.lock();
        q.closed = true;
        self.room.notify_all();
        if in_completion() {
            return;
        }
        let deadline = Instant::now() + self.limits.wait_max;
        while !q.parked.is_empty() {
            if q.needs_sender(&self.limits) {
                q.sending = true;
                MutexGuard::unlocked(&mut q, || self.send(None));
                continue;
            }
            q.waiting += 1;
            let timed_out = self.room.wait_until(&mut q, deadline).timed_out();
            q.waiting -= 1;
            if timed_out {
                break;
            }
        }
        let left: Vec<Parked> = q.parked.drain(..).collect();
        drop(q);
        if !left.is_empty() {
            tracing::warn!(ops = left.len(), "rbd: object ops still parked at close fail with Closed");
        }
        for p in left {
            p.fail(RbdError::Closed);
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A sink that records what starts and answers when the test says so (or at once).
    use super::*;
    use rados::msg::OsdOp;
    use rados::objecter::OpOutput;

    /// An op's callback, held until the test answers it.
    pub type OpCallback = Box<dyn FnOnce(std::result::Result<OpReply, RadosError>) + Send>;

    /// How the fake answers an op.
    pub type Answer = Box<dyn Fn(&str, &[OsdOp]) -> std::result::Result<OpReply, RadosError> + Send>;

    pub struct FakeState {
        pub hold: bool,
        /// Ops started and not answered: object name, steps, callback.
        pub held: Vec<(String, Vec<OsdOp>, OpCallback)>,
        /// Object names in the order their ops started.
        pub started: Vec<String>,
        pub inflight: usize,
        pub inflight_max_seen: usize,
        pub answer: Answer,
    }

    pub struct FakeSink(pub Mutex<FakeState>);

    /// Reads answer `fill` bytes of the asked length, everything else an empty success.
    pub fn ok_answer(fill: u8) -> Answer {
        Box::new(move |_, ops| {
            let outs = ops
                .iter()
                .map(|o| match o {
                    OsdOp::Read { len, .. } => OpOutput::Data(Bytes::from(vec![fill; *len as usize])),
                    _ => OpOutput::None,
                })
                .collect();
            Ok(OpReply { version: 1, outs })
        })
    }

    impl FakeSink {
        pub fn new(hold: bool) -> FakeSink {
            FakeSink(Mutex::new(FakeState {
                hold,
                held: Vec::new(),
                started: Vec::new(),
                inflight: 0,
                inflight_max_seen: 0,
                answer: ok_answer(0),
            }))
        }

        pub fn held(&self) -> usize {
            self.0.lock().held.len()
        }

        pub fn started(&self) -> Vec<String> {
            self.0.lock().started.clone()
        }

        /// Answers held op `i` with `r`, as the Objecter does: out of its budget first, then the callback
        /// (outside the fake's lock).
        pub fn release_with(&self, i: usize, r: std::result::Result<OpReply, RadosError>) {
            let (_, _, cb) = {
                let mut g = self.0.lock();
                g.inflight -= 1;
                g.held.remove(i)
            };
            cb(r);
        }

        /// Answers held op `i` with the fake's answer function.
        pub fn release(&self, i: usize) {
            let r = {
                let g = self.0.lock();
                let (oid, ops, _) = &g.held[i];
                (g.answer)(oid, ops)
            };
            self.release_with(i, r);
        }

        /// Answers every held op, oldest first, including ops that start meanwhile.
        pub fn release_all(&self) {
            while self.held() > 0 {
                self.release(0);
            }
        }
    }

    impl ObjectSink for FakeSink {
        fn start(
            &self,
            oid: &str,
            op: ObjectOperation,
            done: impl FnOnce(std::result::Result<OpReply, RadosError>) + Send + 'static,
        ) {
            let mut g = self.0.lock();
            g.started.push(oid.to_string());
            g.inflight += 1;
            g.inflight_max_seen = g.inflight_max_seen.max(g.inflight);
            if g.hold {
                g.held.push((oid.to_string(), op.ops().to_vec(), Box::new(done)));
                return;
            }
            let r = (g.answer)(oid, op.ops());
            g.inflight -= 1;
            drop(g);
            done(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSink;
    use super::*;

    type Outcomes = Arc<Mutex<Vec<(usize, Result<Bytes>)>>>;

    fn limits(depth: usize, parked_max: usize, callback_parked_max: usize, wait: Duration) -> Limits {
        Limits { depth, bytes_max: 1 << 30, parked_max, callback_parked_max, wait_max: wait }
    }

    fn wop(oid: &str, bytes: u64) -> ObjOp {
        let op = ObjectOperation::new().write(0, Bytes::from(vec![1; bytes as usize]));
        ObjOp { oid: oid.into(), op, bytes, on_done: OnDone::Write }
    }

    fn rop(oid: &str, buffer_offset: u64, len: u64) -> ObjOp {
        let piece = ObjectExtent { object_no: 0, offset_in_object: 0, len, buffer_offset };
        ObjOp {
            oid: oid.into(),
            op: ObjectOperation::new().read(0, len),
            bytes: len,
            on_done: OnDone::Read(vec![piece]),
        }
    }

    fn recorder() -> Outcomes {
        Arc::new(Mutex::new(Vec::new()))
    }

    fn into(out: &Outcomes, i: usize) -> Done {
        let out = Arc::clone(out);
        Box::new(move |r| out.lock().push((i, r)))
    }

    fn outcome(out: &Outcomes, i: usize) -> Option<Result<Bytes>> {
        let v: Vec<_> = out.lock().iter().filter(|(j, _)| *j == i).map(|(_, r)| r.clone()).collect();
        assert!(v.len() <= 1, "request {i} completed {} times", v.len());
        v.into_iter().next()
    }

    /// Runs `f` on a thread and fails the test if it does not return within 5 s.
    fn within_5s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || drop(tx.send(f())));
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| panic!("{what} did not return within 5 s"))
    }

    #[test]
    fn queue_depth_bounds_ops_in_flight_and_parked_ops_start_in_fifo_order() {
        // Goal: never more than `depth` object ops in flight, object ops start exactly in submission order,
        // every request completes once. Method: depth 4 over a holding fake; 40 requests of 1 or 3 ops;
        // answer held ops in a seeded random order, checking the in-flight count after every answer.
        let d = Dispatch::new(FakeSink::new(true), limits(4, 1000, 16, Duration::from_secs(5)));
        let out = recorder();
        let mut order = Vec::new();
        for i in 0..40 {
            let ops: Vec<ObjOp> = if i % 3 == 0 {
                (0..3).map(|k| wop(&format!("r{i}.{k}"), 10)).collect()
            } else {
                vec![wop(&format!("r{i}"), 10)]
            };
            order.extend(ops.iter().map(|o| o.oid.clone()));
            d.submit(ops, 0, into(&out, i));
        }
        assert_eq!(d.sink().held(), 4);
        assert_eq!(d.stats().parked, order.len() - 4);
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        while d.sink().held() > 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            d.sink().release((x % d.sink().held() as u64) as usize);
            let s = d.stats();
            assert!(s.inflight_ops <= 4 && d.sink().held() <= 4, "{s:?}");
        }
        assert_eq!(d.sink().0.lock().inflight_max_seen, 4);
        assert_eq!(d.sink().started(), order, "object ops start in FIFO order");
        for i in 0..40 {
            assert_eq!(outcome(&out, i), Some(Ok(Bytes::new())), "request {i}");
        }
        assert_eq!(d.stats(), Stats { inflight_ops: 0, inflight_bytes: 0, parked: 0, waiting: 0 });
    }

    #[test]
    fn concurrent_submitters_and_callbacks_never_exceed_the_depth() {
        // Goal: the bounds hold under threads: submitters on 3 threads (the FIFO small enough that they
        // wait), completions on another, and callbacks that submit more. Method: an answering thread drains
        // the holding fake in random order; every request must complete, the fake never sees more than
        // `depth` ops at once, and the FIFO never holds more than parked_max + callback_parked_max.
        let d = Dispatch::new(FakeSink::new(true), limits(3, 8, 4, Duration::from_secs(20)));
        let out = recorder();
        let stop = Arc::new(AtomicBool::new(false));
        let answerer = {
            let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut x: u64 = 88172645463325252;
                while !stop.load(Ordering::Acquire) || d.sink().held() > 0 {
                    let n = d.sink().held();
                    let s = d.stats();
                    assert!(s.parked <= 12 && s.inflight_ops <= 3, "{s:?}");
                    if n == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    d.sink().release((x % n as u64) as usize);
                }
            })
        };
        let submitters: Vec<_> = (0..3)
            .map(|t| {
                let (d, out) = (Arc::clone(&d), Arc::clone(&out));
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let id = t * 1000 + i;
                        let ops = (0..1 + i % 2).map(|k| wop(&format!("t{t}.{i}.{k}"), 1)).collect();
                        if i % 10 == 0 {
                            // Its callback submits a follow-up request from the completing thread.
                            let (d2, out2) = (Arc::clone(&d), Arc::clone(&out));
                            let follow = into(&out, id + 500);
                            d.submit(
                                ops,
                                0,
                                Box::new(move |r| {
                                    assert!(in_completion());
                                    out2.lock().push((id, r));
                                    d2.submit(vec![wop(&format!("f{id}"), 1)], 0, follow);
                                }),
                            );
                        } else {
                            d.submit(ops, 0, into(&out, id));
                        }
                    }
                })
            })
            .collect();
        for s in submitters {
            s.join().unwrap();
        }
        // Follow-ups may still be parked behind the last ops: let the answerer finish them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.lock().len() < 3 * 200 + 3 * 20 {
            assert!(Instant::now() < deadline, "only {} of 660 requests completed", out.lock().len());
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        answerer.join().unwrap();
        assert!(d.sink().0.lock().inflight_max_seen <= 3);
        let v = out.lock();
        assert_eq!(v.len(), 660);
        // A follow-up fails only if it found even the callback room full, and then at once (QueueFull).
        for (i, r) in v.iter() {
            match r {
                Ok(_) => {}
                Err(RbdError::QueueFull { waited_ms: 0, .. }) if i % 1000 >= 500 => {}
                Err(e) => panic!("request {i}: {e}"),
            }
        }
    }

    #[test]
    fn a_request_with_more_ops_than_the_fifo_holds_still_goes_through_in_order() {
        // Goal: a plain submitter whose one request outgrows the FIFO starts what it holds before waiting
        // (it must never wait as the sender) and finishes. Method: depth 2, parked_max 2, a 9-op request;
        // once with a fake that answers at once, once with answers released from another thread.
        for hold in [false, true] {
            let d = Dispatch::new(FakeSink::new(hold), limits(2, 2, 2, Duration::from_secs(10)));
            let out = recorder();
            let stop = Arc::new(AtomicBool::new(false));
            let answerer = {
                let (d, stop) = (Arc::clone(&d), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if d.sink().held() > 0 {
                            d.sink().release(0);
                        } else {
                            std::thread::yield_now();
                        }
                    }
                })
            };
            let names: Vec<String> = (0..9).map(|i| format!("o{i}")).collect();
            let d2 = Arc::clone(&d);
            let (ops, out2) = (names.iter().map(|n| wop(n, 1)).collect(), Arc::clone(&out));
            within_5s("the big submission", move || d2.submit(ops, 0, into(&out2, 0)));
            let deadline = Instant::now() + Duration::from_secs(5);
            while outcome(&out, 0).is_none() {
                assert!(Instant::now() < deadline, "the request never completed (hold {hold})");
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Release);
            answerer.join().unwrap();
            assert_eq!(outcome(&out, 0), Some(Ok(Bytes::new())));
            assert_eq!(d.sink().started(), names);
            assert!(d.sink().0.lock().inflight_max_seen <= 2);
        }
    }

    #[test]
    fn the_byte_budget_bounds_bytes_in_flight_and_a_larger_op_goes_alone() {
        // Goal: the Objecter's byte rule holds per image: at most bytes_max in flight unless one op is
        // larger, which then goes alone. Method: 10 000-byte budget, 4096-byte ops and a 50 000-byte op.
        let l = Limits { bytes_max: 10_000, ..limits(8, 100, 10, Duration::from_secs(5)) };
        let d = Dispatch::new(FakeSink::new(true), l);
        let out = recorder();
        for (i, (name, bytes)) in
            [("a", 4096), ("b", 4096), ("c", 4096), ("big", 50_000), ("e", 4096)].iter().enumerate()
        {
            d.submit(vec![wop(name, *bytes)], 0, into(&out, i));
        }
        assert_eq!(d.sink().started(), ["a", "b"], "a third 4096 would pass 10 000 bytes");
        d.sink().release(0);
        assert_eq!(d.sink().started(), ["a", "b", "c"]);
        d.sink().release(0);
        assert_eq!(d.sink().held(), 1, "the big op waits for an empty budget");
        d.sink().release(0);
        assert_eq!(d.sink().started(), ["a", "b", "c", "big"]);
        assert_eq!(d.stats().inflight_bytes, 50_000);
        assert_eq!(d.stats().parked, 1, "nothing joins the big op");
        d.sink().release_all();
        assert_eq!(d.sink().started(), ["a", "b", "c", "big", "e"]);
        assert_eq!(out.lock().len(), 5);
    }

    #[test]
    fn a_submission_from_a_completion_callback_never_waits() {
        // Goal: with the FIFO full, a request submitted from inside a completion callback neither blocks
        // the completing thread nor breaks FIFO order: it takes the callback room, and once that is full
        // it fails at once. Method: depth 1, parked_max 2, callback room 2; A in flight, B and C parked;
        // A's callback (after B started) parks X, filling the ordinary room, then submits D1..D4: D1 and D2
        // take the callback room, D3 and D4 fail (a waiting submitter would hang for the 60 s wait_max);
        // answering A must return promptly.
        let d = Dispatch::new(FakeSink::new(true), limits(1, 2, 2, Duration::from_secs(60)));
        let out = recorder();
        let (d2, out2) = (Arc::clone(&d), Arc::clone(&out));
        d.submit(
            vec![wop("A", 1)],
            0,
            Box::new(move |r| {
                out2.lock().push((0, r));
                // B started when A's budget came back, so the FIFO holds C: fill it up first.
                d2.submit(vec![wop("X", 1)], 0, into(&out2, 9));
                assert_eq!(d2.stats().parked, 2, "the ordinary room is full");
                for k in 1..=4 {
                    d2.submit(vec![wop(&format!("D{k}"), 1)], 0, into(&out2, 10 + k));
                }
            }),
        );
        d.submit(vec![wop("B", 1)], 0, into(&out, 1));
        d.submit(vec![wop("C", 1)], 0, into(&out, 2));
        let d3 = Arc::clone(&d);
        within_5s("answering A", move || d3.sink().release(0));
        assert!(outcome(&out, 0).unwrap().is_ok());
        assert!(
            matches!(outcome(&out, 14), Some(Err(RbdError::QueueFull { waited_ms: 0, .. }))),
            "D4 fails at once"
        );
        assert_eq!(d.stats().parked, 4, "C, X, D1..D3");
        d.sink().release_all();
        assert_eq!(d.sink().started(), ["A", "B", "C", "X", "D1", "D2"]);
        for i in [1, 2, 9, 11, 12] {
            assert_eq!(outcome(&out, i), Some(Ok(Bytes::new())), "request {i}");
        }
    }

    /// Waits (at most 5 s, else fails) until `n` threads wait for room: what a test observes instead of
    /// sleeping and hoping the other thread got there.
    fn wait_until_waiting<S: ObjectSink>(d: &Dispatch<S>, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.stats().waiting < n {
            assert!(Instant::now() < deadline, "{n} threads never waited for room");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_ordinary_submitter_waits_for_room_and_gives_up_with_queue_full() {
        // Goal: backpressure blocks a plain submitter until a parked op starts, and never forever. Method:
        // depth 1, parked_max 1: C waits until A answers (B starts); D, with nothing answering, fails with
        // QueueFull after wait_max and is never started.
        let d = Dispatch::new(FakeSink::new(true), limits(1, 1, 1, Duration::from_millis(200)));
        let out = recorder();
        d.submit(vec![wop("A", 1)], 0, into(&out, 0));
        d.submit(vec![wop("B", 1)], 0, into(&out, 1));
        let (d2, out2) = (Arc::clone(&d), Arc::clone(&out));
        let t = std::thread::spawn(move || d2.submit(vec![wop("C", 1)], 0, into(&out2, 2)));
        wait_until_waiting(&d, 1);
        assert!(!t.is_finished(), "C waits for room");
        d.sink().release(0);
        t.join().unwrap();
        assert_eq!(d.stats().parked, 1, "C parked behind B");
        let t0 = Instant::now();
        d.submit(vec![wop("D", 1)], 0, into(&out, 3));
        assert!(t0.elapsed() >= Duration::from_millis(200));
        assert!(matches!(outcome(&out, 3), Some(Err(RbdError::QueueFull { waited_ms: 200, .. }))));
        d.sink().release_all();
        assert_eq!(d.sink().started(), ["A", "B", "C"]);
        assert_eq!(out.lock().len(), 4);
    }

    #[test]
    fn errors_propagate_to_the_request() {
        // Goal: an op's error fails its request (once, even with several ops), absent objects read as zeros
        // and are fine for discards, and a reply without the read's data is an error. Method: a fake that
        // answers at once (so completions also run inline on the submitting thread) by object name.
        let d = Dispatch::new(FakeSink::new(false), limits(2, 10, 10, Duration::from_secs(5)));
        d.sink().0.lock().answer = Box::new(|oid, ops| match oid {
            "bad" => Err(RadosError::Io("boom".into())),
            "absent" => Err(RadosError::NotFound),
            "nodata" => Ok(OpReply { version: 1, outs: vec![] }),
            _ => fake::ok_answer(7)(oid, ops),
        });
        let out = recorder();
        d.submit(vec![wop("bad", 1)], 0, into(&out, 0));
        d.submit(vec![wop("absent", 1)], 0, into(&out, 1));
        let discard = ObjOp {
            oid: "absent".into(),
            op: ObjectOperation::new().remove(),
            bytes: 0,
            on_done: OnDone::AbsentOk,
        };
        d.submit(vec![discard], 0, into(&out, 2));
        d.submit(vec![rop("absent", 0, 8)], 8, into(&out, 3));
        d.submit(vec![rop("absent", 0, 4), rop("ok", 4, 4)], 8, into(&out, 4));
        d.submit(vec![wop("ok", 1), wop("bad", 1), wop("ok2", 1)], 0, into(&out, 5));
        d.submit(vec![rop("nodata", 0, 4)], 4, into(&out, 6));
        d.submit(vec![rop("ok", 0, 4), rop("nodata", 4, 4)], 8, into(&out, 7));
        assert_eq!(outcome(&out, 0), Some(Err(RbdError::Rados(RadosError::Io("boom".into())))));
        assert_eq!(
            outcome(&out, 1),
            Some(Err(RbdError::Rados(RadosError::NotFound))),
            "a write needs no object but must not be told NotFound silently"
        );
        assert_eq!(outcome(&out, 2), Some(Ok(Bytes::new())));
        assert_eq!(outcome(&out, 3), Some(Ok(Bytes::from(vec![0; 8]))));
        assert_eq!(outcome(&out, 4), Some(Ok(Bytes::from(vec![0, 0, 0, 0, 7, 7, 7, 7]))));
        assert_eq!(outcome(&out, 5), Some(Err(RbdError::Rados(RadosError::Io("boom".into())))));
        assert!(matches!(outcome(&out, 6), Some(Err(RbdError::Rados(RadosError::Protocol(_))))));
        assert!(matches!(outcome(&out, 7), Some(Err(RbdError::Rados(RadosError::Protocol(_))))));
        assert_eq!(d.stats(), Stats { inflight_ops: 0, inflight_bytes: 0, parked: 0, waiting: 0 });
    }

    #[test]
    fn a_read_of_one_object_extent_hands_the_reply_bytes_through() {
        // Goal: the common 4K read costs no zeroed buffer and no copy, and short reads are still padded.
        // Method: answer a one-piece read with known bytes and compare the pointer; answer another short.
        let d = Dispatch::new(FakeSink::new(true), limits(2, 10, 10, Duration::from_secs(5)));
        let out = recorder();
        d.submit(vec![rop("o", 0, 4096)], 4096, into(&out, 0));
        d.submit(vec![rop("o", 0, 4096)], 4096, into(&out, 1));
        let reply = Bytes::from(vec![5; 4096]);
        let ptr = reply.as_ptr();
        let data = |b: Bytes| Ok(OpReply { version: 1, outs: vec![rados::objecter::OpOutput::Data(b)] });
        d.sink().release_with(0, data(reply));
        d.sink().release_with(0, data(Bytes::from(vec![6; 100])));
        let got = outcome(&out, 0).unwrap().unwrap();
        assert_eq!(got.as_ptr(), ptr, "the reply's bytes, not a copy");
        let short = outcome(&out, 1).unwrap().unwrap();
        assert_eq!(short.len(), 4096);
        assert!(short[..100].iter().all(|b| *b == 6) && short[100..].iter().all(|b| *b == 0));
    }

    #[test]
    fn close_starts_parked_ops_or_fails_them_and_never_hangs() {
        // Goal: close with parked ops completes them or fails them with Closed, within wait_max. Method:
        // (1) nothing answers: close returns after wait_max, the parked requests fail with Closed, the one
        // in flight still completes later, new requests are refused; (2) answers come while close waits:
        // every parked op starts and close returns.
        let d = Dispatch::new(FakeSink::new(true), limits(1, 10, 10, Duration::from_millis(100)));
        let out = recorder();
        for (i, n) in ["A", "B", "C"].iter().enumerate() {
            d.submit(vec![wop(n, 1)], 0, into(&out, i));
        }
        d.submit(vec![wop("D1", 1), wop("D2", 1)], 0, into(&out, 3));
        let d2 = Arc::clone(&d);
        within_5s("close", move || d2.close());
        for i in 1..=3 {
            assert_eq!(outcome(&out, i), Some(Err(RbdError::Closed)), "request {i}");
        }
        assert_eq!(outcome(&out, 0), None, "A is still in flight");
        d.submit(vec![wop("E", 1)], 0, into(&out, 4));
        assert_eq!(outcome(&out, 4), Some(Err(RbdError::Closed)));
        d.sink().release(0);
        assert_eq!(outcome(&out, 0), Some(Ok(Bytes::new())));
        assert_eq!(d.sink().started(), ["A"]);

        let d = Dispatch::new(FakeSink::new(true), limits(1, 10, 10, Duration::from_secs(10)));
        let out = recorder();
        for (i, n) in ["A", "B", "C"].iter().enumerate() {
            d.submit(vec![wop(n, 1)], 0, into(&out, i));
        }
        let d2 = Arc::clone(&d);
        let closing = std::thread::spawn(move || d2.close());
        wait_until_waiting(&d, 1);
        assert!(!closing.is_finished(), "close waits for parked ops to start");
        d.sink().release(0);
        d.sink().release(0);
        within_5s("close", move || closing.join().unwrap());
        assert_eq!(d.sink().started(), ["A", "B", "C"]);
        d.sink().release(0);
        for i in 0..3 {
            assert_eq!(outcome(&out, i), Some(Ok(Bytes::new())), "request {i}");
        }
    }
}
