//! Objecter: cuttle's client library (Ceph's librados over its Objecter).
//!
//! A program opens an [`IoCtx`] on a pool and reads and writes objects; the Objecter underneath computes each
//! object's PG and primary OSD from the newest map the [`MonClient`] holds, sends the op there, tracks it by
//! tid until the answer comes, and sends it again, with the same [`ReqId`] so that the OSD never applies it
//! twice, whenever the answer cannot come from where it went:
//! - a new map moves the PG to another primary (or the primary moved to a new address: it restarted);
//! - the lossy session to the OSD faults (`handle_reset`), after a per-OSD backoff so that a dead OSD that the
//!   map still calls up is not hammered;
//! - the OSD answers `Misdirected` (its map says it is not the primary): the op waits for a newer map, and is
//!   retried after a short delay in case none comes;
//! - the PG has no primary (all its OSDs are down): the op waits, it does not fail, until a map gives it one
//!   (or its timeout, `rados_osd_op_timeout`, passes).
//!
//! Ops to the same object keep their order: resends go out in tid order, and while an OSD's session waits out
//! its backoff, newer ops to that OSD wait behind the older ones instead of overtaking them.
//!
//! Layout: [`Tracker`] is the sans-IO core (submit, `handle_map`, `handle_op_reply`, `handle_reset`,
//! `handle_timeout` taking `now`; `poll_output`, `poll_timeout`); [`Objecter`] is the shell that owns the
//! lock, the connections and a timer thread. Messages are sent in the order the core emitted them but outside
//! the core's lock (Ceph found that sending under the Objecter's session lock cost a third of its random-read
//! IOPS, PR 7508).
//!
//! In-flight work is bounded (`objecter_inflight_ops`, `objecter_inflight_op_bytes`): submitting blocks, with
//! a timeout, until there is room. There is no unbounded queue anywhere in the client.
//!
//! What it deliberately is not: no watch/notify, no object classes, no snapshots, no caching, no striping (that
//! is `rbd`'s job). Listing is a per-PG walk, not a consistent snapshot of the pool.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use messenger::{Connection, Dispatcher, EntityName, EntityType, Message, Messenger, Policy, Refused};
use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::Serialize;

use crate::config::{secs, Config};
use crate::ids::{Epoch, OsdId, PgId, PoolId};
use crate::map::OsdMap;
use crate::monclient::{MonClient, MonClientError};
use crate::msg::{
    types, OpOut, OsdCommand, OsdCommandReply, OsdError, OsdOp, OsdOpReply, PgListRequest, ReqId,
};
use crate::placement::{object_to_pg, Placement};

/// Most steps in one compound op: one op is one message and one atomic transaction at the OSD.
pub const OPS_PER_REQUEST_MAX: usize = 256;
/// Largest page [`IoCtx::list`] returns.
pub const LIST_PAGE_MAX: usize = 100_000;
/// The first resend after a session fault is immediate; each further fault without an answer in between
/// doubles the wait, from this...
const RESET_BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// ...up to this, which bounds how late ops reach an OSD that comes back.
const RESET_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After a `Misdirected` answer the op waits for a newer map, but no longer than this before trying again.
const MISDIRECTED_RETRY: Duration = Duration::from_millis(100);
/// The timer thread looks at deadlines at least this often (so a timeout fires at most this late).
const TICK_MAX: Duration = Duration::from_millis(100);
/// How long a submitter waits for room in the in-flight budget when ops have no timeout of their own.
const BUDGET_WAIT_MAX: Duration = Duration::from_secs(120);
/// OSD commands give up after this long when ops have no timeout of their own.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What can go wrong with an op, as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RadosError {
    #[error("object not found")]
    NotFound,
    #[error("object already exists")]
    Exists,
    #[error("no such attribute")]
    NoAttr,
    #[error("no such pool '{0}'")]
    NoSuchPool(String),
    /// An `assert_version` guard failed: the object changed since it was read.
    #[error("version mismatch: object is at version {actual}")]
    VersionMismatch { actual: u64 },
    /// Empty or longer than `osd_max_object_name_len`; refused before anything is sent.
    #[error("invalid object name: {0}")]
    InvalidName(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("too large: {0}")]
    TooLarge(String),
    /// The op (or the wait for room to submit it) took longer than this.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    #[error("no cluster map from the monitor at {addr} within {timeout:?}")]
    NoMap { addr: SocketAddr, timeout: Duration },
    #[error("the objecter is shut down")]
    ShutDown,
    #[error("i/o error on the OSD: {0}")]
    Io(String),
    /// A write found no room (ENOSPC): the OSD's device, or the cluster past its full ratio.
    #[error("no space left on the OSD: {0}")]
    NoSpace(String),
    /// The OSD's answer does not fit the op that was sent (a bug on one side).
    #[error("malformed reply: {0}")]
    Protocol(String),
}

impl RadosError {
    fn from_osd(e: OsdError, pool: &str) -> RadosError {
        match e {
            OsdError::NotFound => RadosError::NotFound,
            OsdError::Exists => RadosError::Exists,
            OsdError::NoAttr => RadosError::NoAttr,
            OsdError::VersionMismatch { actual } => RadosError::VersionMismatch { actual },
            OsdError::Invalid(s) => RadosError::Invalid(s),
            OsdError::TooLarge(s) => RadosError::TooLarge(s),
            OsdError::NoSuchPool(_) => RadosError::NoSuchPool(pool.to_string()),
            OsdError::Io(s) => RadosError::Io(s),
            OsdError::NoSpace(s) => RadosError::NoSpace(s),
            // Handled by the tracker (the op is sent again); never reaches the application.
            OsdError::Misdirected(e) => RadosError::Protocol(format!("unexpected misdirected answer at {e}")),
        }
    }
}

/// A compound op on one object, applied atomically by the PG's primary: either every step applies or none
/// does. Build it step by step, e.g. `ObjectOperation::new().assert_version(v).write_full(data)`.
#[derive(Clone, Debug, Default)]
pub struct ObjectOperation {
    ops: Vec<OsdOp>,
    /// Payloads of the write-class steps, in op order.
    payload: Vec<Bytes>,
    /// Bytes the op is charged against the in-flight budget: payloads plus the lengths it asks to read.
    budget_bytes: u64,
}

impl ObjectOperation {
    pub fn new() -> ObjectOperation {
        ObjectOperation::default()
    }

    /// Steps so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether any step modifies the object.
    pub fn is_write(&self) -> bool {
        self.ops.iter().any(OsdOp::is_write)
    }

    /// The steps, in order.
    pub fn ops(&self) -> &[OsdOp] {
        &self.ops
    }

    fn push(mut self, op: OsdOp, payload: Option<Bytes>) -> Self {
        if let Some(p) = payload {
            assert_eq!(p.len() as u64, op.payload_len());
            self.budget_bytes = self.budget_bytes.saturating_add(p.len() as u64);
            self.payload.push(p);
        }
        self.ops.push(op);
        self
    }

    /// Fails the whole op with [`RadosError::VersionMismatch`] unless the object is at exactly `version`
    /// (0: the object does not exist). The guard of a safe read-modify-write.
    pub fn assert_version(self, version: u64) -> Self {
        self.push(OsdOp::AssertVersion { version }, None)
    }

    /// Creates the object; with `exclusive`, fails with [`RadosError::Exists`] if it exists.
    pub fn create(self, exclusive: bool) -> Self {
        self.push(OsdOp::Create { exclusive }, None)
    }

    pub fn write(self, offset: u64, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        self.push(OsdOp::Write { offset, len: data.len() as u64 }, Some(data))
    }

    /// Replaces the whole content.
    pub fn write_full(self, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        self.push(OsdOp::WriteFull { len: data.len() as u64 }, Some(data))
    }

    pub fn append(self, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        self.push(OsdOp::Append { len: data.len() as u64 }, Some(data))
    }

    pub fn zero(self, offset: u64, len: u64) -> Self {
        self.push(OsdOp::Zero { offset, len }, None)
    }

    pub fn truncate(self, size: u64) -> Self {
        self.push(OsdOp::Truncate { size }, None)
    }

    pub fn remove(self) -> Self {
        self.push(OsdOp::Remove, None)
    }

    pub fn setxattr(self, name: &str, value: impl Into<Bytes>) -> Self {
        let value = value.into();
        self.push(OsdOp::SetXattr { name: name.to_string(), len: value.len() as u64 }, Some(value))
    }

    pub fn rmxattr(self, name: &str) -> Self {
        self.push(OsdOp::RmXattr { name: name.to_string() }, None)
    }

    pub fn omap_set(self, pairs: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        let keys: Vec<(String, Vec<u8>)> = pairs.into_iter().collect();
        let mut s = self;
        s.budget_bytes =
            s.budget_bytes.saturating_add(keys.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum());
        s.push(OsdOp::OmapSet { keys }, None)
    }

    pub fn omap_rm(self, keys: impl IntoIterator<Item = String>) -> Self {
        self.push(OsdOp::OmapRm { keys: keys.into_iter().collect() }, None)
    }

    /// Reads `len` bytes at `offset` (`len` 0: to the end); the reply's output is [`OpOutput::Data`].
    pub fn read(mut self, offset: u64, len: u64) -> Self {
        self.budget_bytes = self.budget_bytes.saturating_add(len);
        self.push(OsdOp::Read { offset, len }, None)
    }

    /// Output: [`OpOutput::Stat`].
    pub fn stat(self) -> Self {
        self.push(OsdOp::Stat, None)
    }

    /// Output: [`OpOutput::Data`].
    pub fn getxattr(self, name: &str) -> Self {
        self.push(OsdOp::GetXattr { name: name.to_string() }, None)
    }

    /// The object's attribute names; output: [`OpOutput::Keys`].
    pub fn listxattrs(self) -> Self {
        self.push(OsdOp::ListXattrs, None)
    }

    /// Output: [`OpOutput::Pairs`] (keys that are absent are left out).
    pub fn omap_get(self, keys: impl IntoIterator<Item = String>) -> Self {
        self.push(OsdOp::OmapGet { keys: keys.into_iter().collect() }, None)
    }

    /// Keys after `after` (all with ""), at most `max`; output: [`OpOutput::Keys`].
    pub fn omap_get_keys(self, after: &str, max: u32) -> Self {
        self.push(OsdOp::OmapGetKeys { after: after.to_string(), max }, None)
    }

    /// The data segment: payloads concatenated in op order (no copy for a single payload).
    fn data(&self) -> Bytes {
        match self.payload.len() {
            0 => Bytes::new(),
            1 => self.payload[0].clone(),
            _ => {
                let total: usize = self.payload.iter().map(Bytes::len).sum();
                let mut b = BytesMut::with_capacity(total);
                for p in &self.payload {
                    b.extend_from_slice(p);
                }
                b.freeze()
            }
        }
    }
}

/// One step's result, in the order of the steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutput {
    /// Write-class steps and guards.
    None,
    /// Read and getxattr.
    Data(Bytes),
    Stat {
        size: u64,
        version: u64,
    },
    Keys(Vec<String>),
    Pairs(Vec<(String, Vec<u8>)>),
}

/// The answer to a successful op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpReply {
    /// The object's version after the op (writes) or as read.
    pub version: u64,
    /// One per step, in order.
    pub outs: Vec<OpOutput>,
}

impl OpReply {
    fn out(&self, i: usize) -> Result<&OpOutput, RadosError> {
        self.outs.get(i).ok_or_else(|| RadosError::Protocol(format!("no output for step {i}")))
    }

    /// Step `i`'s bytes (read, getxattr).
    pub fn data(&self, i: usize) -> Result<Bytes, RadosError> {
        match self.out(i)? {
            OpOutput::Data(b) => Ok(b.clone()),
            o => Err(RadosError::Protocol(format!("step {i}: expected data, got {o:?}"))),
        }
    }

    /// Step `i`'s (size, version).
    pub fn stat(&self, i: usize) -> Result<(u64, u64), RadosError> {
        match self.out(i)? {
            OpOutput::Stat { size, version } => Ok((*size, *version)),
            o => Err(RadosError::Protocol(format!("step {i}: expected a stat, got {o:?}"))),
        }
    }

    pub fn keys(&self, i: usize) -> Result<Vec<String>, RadosError> {
        match self.out(i)? {
            OpOutput::Keys(k) => Ok(k.clone()),
            o => Err(RadosError::Protocol(format!("step {i}: expected keys, got {o:?}"))),
        }
    }

    pub fn pairs(&self, i: usize) -> Result<BTreeMap<String, Vec<u8>>, RadosError> {
        match self.out(i)? {
            OpOutput::Pairs(p) => Ok(p.iter().cloned().collect()),
            o => Err(RadosError::Protocol(format!("step {i}: expected key/value pairs, got {o:?}"))),
        }
    }
}

/// Splits a reply's data segment among its outputs.
#[doc(hidden)] // Public for the osd_msg fuzz target.
pub fn split_outs(outs: Vec<OpOut>, data: Bytes) -> Result<Vec<OpOutput>, String> {
    let mut at = 0usize;
    let mut v = Vec::with_capacity(outs.len());
    for o in outs {
        v.push(match o {
            OpOut::None => OpOutput::None,
            OpOut::Data { len } => {
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| at.checked_add(len))
                    .filter(|&end| end <= data.len())
                    .ok_or_else(|| {
                        format!("an output of {len} bytes overruns the {}-byte data segment", data.len())
                    })?;
                let b = data.slice(at..end);
                at = end;
                OpOutput::Data(b)
            }
            OpOut::Stat { size, version } => OpOutput::Stat { size, version },
            OpOut::Keys(k) => OpOutput::Keys(k),
            OpOut::Pairs(p) => OpOutput::Pairs(p),
        });
    }
    if at != data.len() {
        return Err(format!("{} bytes of the data segment belong to no output", data.len() - at));
    }
    Ok(v)
}

/// Where an op goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// The primary of the object's PG.
    Object { pool: PoolId, pool_name: Arc<str>, oid: String },
    /// A given PG's primary (listing).
    Pg(PgId),
    /// A given OSD (admin commands).
    Osd(OsdId),
}

#[derive(Clone, Debug)]
enum Request {
    Op { ops: Vec<OsdOp>, data: Bytes },
    Command(OsdCommand),
}

/// What a completed op gives back.
#[derive(Clone, Debug, PartialEq)]
enum Reply {
    Op(OpReply),
    Command(OsdCommandReply),
}

type Outcome = Result<Reply, RadosError>;

/// The borrowed twin of [`crate::msg::OsdOpRequest`]: the same fields in the same order, so the same postcard
/// bytes (a test below pins that), without cloning the op list and name on every send.
#[derive(Serialize)]
struct OsdOpRequestRef<'a> {
    reqid: ReqId,
    pgid: PgId,
    oid: &'a str,
    epoch: Epoch,
    ops: &'a [OsdOp],
}

/// The in-flight budget of the tracker.
#[derive(Clone, Copy, Debug)]
struct Limits {
    ops_max: usize,
    bytes_max: u64,
}

/// An op the shell hands to the tracker.
struct NewOp<T> {
    token: T,
    target: Target,
    request: Request,
    bytes: u64,
    timeout: Option<Duration>,
}

struct Op<T> {
    token: T,
    target: Target,
    request: Request,
    bytes: u64,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    /// Placement under the tracker's current map.
    pgid: Option<PgId>,
    primary: Option<OsdId>,
    /// The OSD and session generation it was last sent on; `None` while it waits to be (re)sent.
    sent: Option<(OsdId, u64)>,
    /// After a `Misdirected` answer: not before this (or a newer map).
    hold_until: Option<Instant>,
    attempts: u32,
}

/// The client's session with one OSD, as the tracker sees it: a generation that changes whenever what was
/// sent on the previous one may have been lost.
#[derive(Debug)]
struct OsdSession {
    gen: u64,
    addr: SocketAddr,
    /// After a fault: nothing goes to this OSD before then.
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// What the tracker asks its shell to do.
#[derive(Debug)]
enum Output<T> {
    /// Send `msg` to `osd` at `addr` on session generation `gen`.
    Send { tid: u64, osd: OsdId, addr: SocketAddr, gen: u64, msg: Message },
    /// The op is over; hand the outcome to whoever waits.
    Done { token: T, outcome: Outcome },
}

/// The sans-IO core of the Objecter: in-flight ops by tid, their targets under the current map, and when to
/// send them again. It reads no clock and opens no socket; `T` is whatever the shell wants back on completion.
struct Tracker<T> {
    client: u64,
    nonce: u64,
    limits: Limits,
    map: Option<Arc<OsdMap>>,
    /// Primary per PG under `map` (a miss builds a `Placement`, linear in the map).
    primaries: HashMap<PgId, Option<OsdId>>,
    sessions: HashMap<OsdId, OsdSession>,
    /// By tid, so that iteration (and so every resend) goes in submission order.
    ops: BTreeMap<u64, Op<T>>,
    next_tid: u64,
    bytes_in_flight: u64,
    out: VecDeque<Output<T>>,
}

impl<T> Tracker<T> {
    fn new(client: u64, nonce: u64, limits: Limits) -> Tracker<T> {
        assert!(limits.ops_max > 0);
        Tracker {
            client,
            nonce,
            limits,
            map: None,
            primaries: HashMap::new(),
            sessions: HashMap::new(),
            ops: BTreeMap::new(),
            next_tid: 1,
            bytes_in_flight: 0,
            out: VecDeque::new(),
        }
    }

    fn epoch(&self) -> Option<Epoch> {
        self.map.as_ref().map(|m| m.epoch)
    }

    /// Whether an op of `bytes` fits the in-flight budget now. An op larger than the byte budget fits when
    /// nothing else is in flight (as Ceph's throttle), so that it can never wait forever.
    fn has_room(&self, bytes: u64) -> bool {
        self.ops.len() < self.limits.ops_max
            && (self.ops.is_empty() || self.bytes_in_flight.saturating_add(bytes) <= self.limits.bytes_max)
    }

    fn in_flight(&self) -> (usize, u64) {
        (self.ops.len(), self.bytes_in_flight)
    }

    /// Starts tracking an op and sends it if its PG has a primary. Gives the op back if it cannot exist under
    /// the current map (its pool is gone).
    fn submit(&mut self, now: Instant, new: NewOp<T>) -> Result<u64, (Box<NewOp<T>>, RadosError)> {
        let (pgid, primary) = match &self.map {
            Some(map) => match resolve(map, &mut self.primaries, &new.target) {
                Ok(p) => p,
                Err(e) => return Err((Box::new(new), e)),
            },
            None => (None, None),
        };
        let tid = self.next_tid;
        self.next_tid += 1;
        let op = Op {
            token: new.token,
            target: new.target,
            request: new.request,
            bytes: new.bytes,
            timeout: new.timeout,
            deadline: new.timeout.map(|t| now + t),
            pgid,
            primary,
            sent: None,
            hold_until: None,
            attempts: 0,
        };
        self.bytes_in_flight += op.bytes;
        let prev = self.ops.insert(tid, op);
        assert!(prev.is_none(), "tid {tid} reused");
        self.try_send(now, tid);
        Ok(tid)
    }

    /// A newer map: re-place every op; those whose primary (or its session) changed go out again.
    fn handle_map(&mut self, now: Instant, map: Arc<OsdMap>) {
        if self.epoch().is_some_and(|e| e >= map.epoch) {
            return;
        }
        self.primaries.clear();
        // An OSD at a new address is a new process: what went to the old one is sent again.
        for (osd, s) in self.sessions.iter_mut() {
            if let Some(addr) = map.osds.get(osd).and_then(|i| i.addrs).map(|a| a.public) {
                if addr != s.addr {
                    s.gen += 1;
                    s.addr = addr;
                    s.retry_at = None;
                    s.backoff = Duration::ZERO;
                }
            }
        }
        self.map = Some(Arc::clone(&map));
        let tids: Vec<u64> = self.ops.keys().copied().collect();
        for tid in tids {
            let op = self.ops.get_mut(&tid).expect("tid listed above");
            match resolve(&map, &mut self.primaries, &op.target) {
                Err(e) => {
                    self.complete(tid, Err(e));
                    continue;
                }
                Ok((pgid, primary)) => {
                    op.pgid = pgid;
                    op.primary = primary;
                    if let Some((osd, gen)) = op.sent {
                        let same_session = self.sessions.get(&osd).is_some_and(|s| s.gen == gen);
                        if Some(osd) != primary || !same_session {
                            op.sent = None;
                        }
                    }
                    // A newer map is what a misdirected op was waiting for.
                    op.hold_until = None;
                }
            }
            self.try_send(now, tid);
        }
    }

    /// An OSD answered an op.
    fn handle_op_reply(&mut self, now: Instant, from: OsdId, reply: OsdOpReply, data: Bytes) {
        let tid = reply.tid;
        let Some(op) = self.ops.get_mut(&tid) else {
            return; // Already answered (a resend's duplicate), timed out, or never ours.
        };
        let Request::Op { ops, .. } = &op.request else {
            tracing::warn!(%from, tid, "op reply for a command; ignored");
            return;
        };
        let steps = ops.len();
        if op.sent.map(|s| s.0) != Some(from) {
            // An answer to an earlier attempt, from an OSD the op has since been sent away from: the current
            // attempt will be answered by the current primary (the same reqid is not applied twice).
            tracing::debug!(%from, tid, "reply from an OSD the op is no longer sent to; ignored");
            return;
        }
        if let Err(OsdError::Misdirected(e)) = &reply.result {
            tracing::debug!(%from, tid, osd_epoch = %e, "misdirected; waiting for a newer map");
            op.sent = None;
            op.hold_until = Some(now + MISDIRECTED_RETRY);
            return;
        }
        let pool = pool_label(&op.target);
        if let Some(s) = self.sessions.get_mut(&from) {
            s.backoff = Duration::ZERO;
        }
        let outcome = match reply.result {
            Err(e) => Err(RadosError::from_osd(e, &pool)),
            Ok(()) if reply.outs.len() != steps => {
                Err(RadosError::Protocol(format!("{} outputs for {steps} steps", reply.outs.len())))
            }
            Ok(()) => split_outs(reply.outs, data)
                .map(|outs| Reply::Op(OpReply { version: reply.version, outs }))
                .map_err(RadosError::Protocol),
        };
        self.complete(tid, outcome);
    }

    /// An OSD answered a command (matched by the message's tid).
    fn handle_command_reply(&mut self, now: Instant, from: OsdId, tid: u64, reply: OsdCommandReply) {
        let Some(op) = self.ops.get_mut(&tid) else { return };
        if !matches!(op.request, Request::Command(_)) {
            tracing::warn!(%from, tid, "command reply for an op; ignored");
            return;
        }
        if op.sent.map(|s| s.0) != Some(from) {
            return;
        }
        if let Some(s) = self.sessions.get_mut(&from) {
            s.backoff = Duration::ZERO;
        }
        match (&reply.result, &op.target) {
            (Err(OsdError::Misdirected(_)), Target::Pg(_)) => {
                op.sent = None;
                op.hold_until = Some(now + MISDIRECTED_RETRY);
            }
            _ => self.complete(tid, Ok(Reply::Command(reply))),
        }
    }

    /// The session generation `gen` with `osd` faulted: whatever was sent on it may be lost. Everything sent
    /// on it goes out again on the next generation, after the OSD's backoff.
    fn handle_reset(&mut self, now: Instant, osd: OsdId, gen: u64) {
        let Some(s) = self.sessions.get_mut(&osd) else { return };
        if s.gen != gen {
            return; // An older session's fault: its ops were already moved on.
        }
        s.gen += 1;
        s.retry_at = Some(now + s.backoff);
        s.backoff = (s.backoff * 2).clamp(RESET_BACKOFF_FIRST, RESET_BACKOFF_MAX);
        tracing::debug!(%osd, gen, backoff = ?s.backoff, "osd session reset; resending its ops");
        let mut unsent = Vec::new();
        for (&tid, op) in self.ops.iter_mut() {
            if op.sent == Some((osd, gen)) {
                op.sent = None;
                unsent.push(tid);
            }
        }
        for tid in unsent {
            self.try_send(now, tid);
        }
    }

    /// Fails ops past their deadline and sends those whose wait (backoff, misdirect hold) is over.
    fn handle_timeout(&mut self, now: Instant) {
        for s in self.sessions.values_mut() {
            if s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
            }
        }
        let expired: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| op.deadline.is_some_and(|d| d <= now))
            .map(|(&t, _)| t)
            .collect();
        for tid in expired {
            let timeout = self.ops[&tid].timeout.unwrap_or_default();
            self.complete(tid, Err(RadosError::TimedOut(timeout)));
        }
        let waiting: Vec<u64> =
            self.ops.iter().filter(|(_, op)| op.sent.is_none()).map(|(&t, _)| t).collect();
        for tid in waiting {
            let op = self.ops.get_mut(&tid).expect("tid listed above");
            if op.hold_until.is_some_and(|t| t <= now) {
                op.hold_until = None;
            }
            self.try_send(now, tid);
        }
    }

    /// When `handle_timeout` next has something to do.
    fn poll_timeout(&self) -> Option<Instant> {
        let sessions = self.sessions.values().filter_map(|s| s.retry_at);
        let ops = self.ops.values().flat_map(|op| {
            let hold = if op.sent.is_none() { op.hold_until } else { None };
            [op.deadline, hold].into_iter().flatten()
        });
        sessions.chain(ops).min()
    }

    fn poll_output(&mut self) -> Option<Output<T>> {
        self.out.pop_front()
    }

    /// Fails every op (the Objecter is shutting down).
    fn fail_all(&mut self, e: RadosError) {
        let tids: Vec<u64> = self.ops.keys().copied().collect();
        for tid in tids {
            self.complete(tid, Err(e.clone()));
        }
    }

    /// Fails one op (the shell could not send it at all).
    fn fail(&mut self, tid: u64, e: RadosError) {
        if self.ops.contains_key(&tid) {
            self.complete(tid, Err(e));
        }
    }

    fn complete(&mut self, tid: u64, outcome: Outcome) {
        let op = self.ops.remove(&tid).expect("completing an op that is tracked");
        assert!(self.bytes_in_flight >= op.bytes);
        self.bytes_in_flight -= op.bytes;
        self.out.push_back(Output::Done { token: op.token, outcome });
    }

    /// Sends op `tid` if it is waiting and nothing holds it back.
    fn try_send(&mut self, now: Instant, tid: u64) {
        let Some(map) = &self.map else { return };
        let op = self.ops.get_mut(&tid).expect("sending an op that is tracked");
        if op.sent.is_some() || op.hold_until.is_some_and(|t| t > now) {
            return;
        }
        let Some(osd) = op.primary else { return }; // No primary: wait for a map that gives one.
                                                    // `resolve` only names OSDs that are up with an address.
        let Some(addr) = map.osds.get(&osd).and_then(|i| i.addrs).map(|a| a.public) else { return };
        let s = self.sessions.entry(osd).or_insert_with(|| OsdSession {
            gen: 1,
            addr,
            retry_at: None,
            backoff: Duration::ZERO,
        });
        assert_eq!(s.addr, addr, "handle_map keeps session addresses current");
        if s.retry_at.is_some_and(|t| t > now) {
            return; // Backing off; the timer sends it (in tid order with the others).
        }
        let msg = match &op.request {
            Request::Op { ops, data } => {
                let Target::Object { oid, .. } = &op.target else { unreachable!("ops target objects") };
                let pgid = op.pgid.expect("an op with a primary has a PG");
                let body = OsdOpRequestRef {
                    reqid: ReqId { client: self.client, nonce: self.nonce, tid },
                    pgid,
                    oid,
                    epoch: map.epoch,
                    ops,
                };
                Message::encode(types::OSD_OP, &body).with_data(data.clone())
            }
            Request::Command(OsdCommand::PgList(r)) => {
                let r = PgListRequest { epoch: map.epoch, ..r.clone() };
                Message::encode(types::OSD_COMMAND, &OsdCommand::PgList(r))
            }
            Request::Command(c) => Message::encode(types::OSD_COMMAND, c),
        };
        op.sent = Some((osd, s.gen));
        op.attempts += 1;
        if op.attempts > 1 {
            tracing::debug!(tid, %osd, attempt = op.attempts, "resending");
        }
        self.out.push_back(Output::Send { tid, osd, addr, gen: s.gen, msg: msg.with_tid(tid) });
    }
}

/// The op's PG and the primary it goes to under `map` (`None`: no OSD of the PG is up; the op waits).
fn resolve(
    map: &OsdMap,
    cache: &mut HashMap<PgId, Option<OsdId>>,
    target: &Target,
) -> Result<(Option<PgId>, Option<OsdId>), RadosError> {
    let pg = match target {
        Target::Object { pool, pool_name, oid } => {
            let p = map.pools.get(pool).ok_or_else(|| RadosError::NoSuchPool(pool_name.to_string()))?;
            object_to_pg(p, oid.as_bytes())
        }
        Target::Pg(pg) => {
            let p =
                map.pools.get(&pg.pool).ok_or_else(|| RadosError::NoSuchPool(format!("id {}", pg.pool)))?;
            if pg.seed >= p.pg_num {
                return Err(RadosError::Invalid(format!(
                    "pg {pg} does not exist: the pool has {} PGs",
                    p.pg_num
                )));
            }
            *pg
        }
        Target::Osd(osd) => {
            let reachable = map.osds.get(osd).is_some_and(|i| i.up && i.addrs.is_some());
            return Ok((None, reachable.then_some(*osd)));
        }
    };
    let primary = *cache.entry(pg).or_insert_with(|| {
        let primary = Placement::new(map).up_acting(pg).ok()?.primary?;
        map.osds.get(&primary).and_then(|i| i.addrs).map(|_| primary)
    });
    Ok((Some(pg), primary))
}

fn pool_label(t: &Target) -> String {
    match t {
        Target::Object { pool_name, .. } => pool_name.to_string(),
        Target::Pg(pg) => format!("id {}", pg.pool),
        Target::Osd(_) => String::new(),
    }
}

type Slot<R> = crate::completion::Slot<Result<R, RadosError>>;

/// The shell's token for an op: where to deliver its outcome.
enum Waiter {
    Op(Arc<Slot<OpReply>>),
    Command(Arc<Slot<OsdCommandReply>>),
}

impl Waiter {
    fn complete(self, outcome: Outcome) {
        match self {
            Waiter::Op(s) => s.complete(outcome.and_then(|r| match r {
                Reply::Op(r) => Ok(r),
                Reply::Command(_) => Err(RadosError::Protocol("command reply to an op".into())),
            })),
            Waiter::Command(s) => s.complete(outcome.and_then(|r| match r {
                Reply::Command(r) => Ok(r),
                Reply::Op(_) => Err(RadosError::Protocol("op reply to a command".into())),
            })),
        }
    }
}

/// A handle on an op in flight.
pub struct Completion(Arc<Slot<OpReply>>);

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Completion(done: {})", self.is_done())
    }
}

impl Completion {
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }

    /// Waits for the outcome. The op's own timeout (`rados_osd_op_timeout`) bounds the wait when it is set;
    /// an Objecter shutdown ends it with [`RadosError::ShutDown`].
    pub fn wait(self) -> Result<OpReply, RadosError> {
        self.0.take_until(None).expect("waiting without a deadline ends with a result")
    }

    /// Waits at most `timeout`; gives the completion back if the op is still in flight (it stays in flight).
    pub fn wait_timeout(self, timeout: Duration) -> Result<Result<OpReply, RadosError>, Completion> {
        match self.0.take_until(Some(Instant::now() + timeout)) {
            Some(r) => Ok(r),
            None => Err(self),
        }
    }

    /// Hands the outcome to `f` instead of a waiter: at once if the op is done, otherwise on the thread that
    /// completes it (a messenger worker or the timer: `f` must be quick, must not block, and must not submit
    /// ops that could wait for room in the in-flight budget).
    pub fn on_complete(self, f: impl FnOnce(Result<OpReply, RadosError>) + Send + 'static) {
        self.0.on_complete(f)
    }
}

/// Where a pool listing continues (see [`IoCtx::list`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListCursor {
    seed: u32,
    after: Option<String>,
}

/// Per-client limits and timeouts, from the config.
#[derive(Clone, Copy, Debug)]
struct ClientLimits {
    name_len_max: usize,
    write_bytes_max: u64,
    object_bytes_max: u64,
    op_timeout: Option<Duration>,
    map_timeout: Duration,
}

/// A session the shell holds for one OSD.
struct OsdConn {
    gen: u64,
    addr: SocketAddr,
    conn: Connection,
}

/// Why a send failed.
enum SendFailure {
    /// The session is gone; the tracker resends on the next one.
    Reset { osd: OsdId, gen: u64 },
    /// The message can never be sent.
    Fatal { tid: u64, error: RadosError },
}

/// The client library: tracks ops to OSDs on top of a messenger and a MonClient. Create with
/// [`Objecter::new`], open pools with [`Objecter::ioctx`].
pub struct Objecter {
    msgr: Arc<Messenger>,
    monc: Arc<MonClient>,
    limits: ClientLimits,
    core: Mutex<Tracker<Waiter>>,
    /// Signalled (with `core`) when ops complete: submitters wait on it for room in the budget.
    room: Condvar,
    /// Signalled (with `core`) when a timer may be due sooner than the timer thread thinks.
    timer_wake: Condvar,
    /// Held while sending, and taken before `core` is released, so that messages leave in the order the
    /// tracker emitted them. Lock order: `core`, then `conns`; never the other way.
    conns: Mutex<HashMap<OsdId, OsdConn>>,
    stopping: AtomicBool,
    timer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Objecter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ops, bytes) = self.in_flight();
        write!(f, "Objecter({}, {ops} ops / {bytes} bytes in flight)", self.msgr.name())
    }
}

impl Objecter {
    /// Wires an Objecter onto `msgr` (a client messenger; it sets the lossy-client policy for OSDs) and
    /// `monc` (whose maps it follows). Does not wait for a map: ops submitted before one arrives wait for it.
    /// One Objecter per messenger: OSD replies are fast-dispatched to the first dispatcher that claims them.
    pub fn new(msgr: Arc<Messenger>, monc: Arc<MonClient>, cfg: &Config) -> Arc<Objecter> {
        msgr.set_policy(EntityType::Osd, Policy::lossy_client());
        let op_timeout = (cfg.rados_osd_op_timeout > 0.0).then(|| secs(cfg.rados_osd_op_timeout));
        let limits = ClientLimits {
            name_len_max: cfg.osd_max_object_name_len,
            write_bytes_max: cfg.osd_max_write_size,
            object_bytes_max: cfg.osd_max_object_size,
            op_timeout,
            map_timeout: secs(cfg.rados_mon_op_timeout),
        };
        let core = Tracker::new(
            msgr.name().num,
            instance_nonce(),
            Limits { ops_max: cfg.objecter_inflight_ops.max(1), bytes_max: cfg.objecter_inflight_op_bytes },
        );
        let o = Arc::new(Objecter {
            msgr: Arc::clone(&msgr),
            monc: Arc::clone(&monc),
            limits,
            core: Mutex::new(core),
            room: Condvar::new(),
            timer_wake: Condvar::new(),
            conns: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            timer: Mutex::new(None),
        });
        msgr.add_dispatcher_head(Arc::new(ObjecterDispatcher(Arc::downgrade(&o))));
        let weak = Arc::downgrade(&o);
        monc.on_map(move |m| {
            if let Some(o) = weak.upgrade() {
                o.handle_map(m);
            }
        });
        // A map that arrived before the callback was registered (the callback ignores epochs it has seen).
        if let Some(m) = monc.map() {
            o.handle_map(&m);
        }
        let weak = Arc::downgrade(&o);
        let t = std::thread::Builder::new()
            .name("objecter-timer".into())
            .spawn(move || loop {
                let Some(o) = weak.upgrade() else { return };
                if o.stopping.load(Ordering::Acquire) {
                    return;
                }
                o.tick();
            })
            .expect("spawning the objecter timer thread");
        *o.timer.lock() = Some(t);
        o
    }

    /// An I/O context on the pool called `pool`. Waits (up to `rados_mon_op_timeout`) for the first map.
    pub fn ioctx(self: &Arc<Self>, pool: &str) -> Result<IoCtx, RadosError> {
        let map = self.wait_for_map()?;
        let p = map.pool_by_name(pool).ok_or_else(|| RadosError::NoSuchPool(pool.to_string()))?;
        Ok(IoCtx { objecter: Arc::clone(self), pool: p.id, pool_name: Arc::from(pool) })
    }

    /// The newest map the MonClient has, waiting for the first one.
    pub fn wait_for_map(&self) -> Result<Arc<OsdMap>, RadosError> {
        self.monc.wait_for_map(None, self.limits.map_timeout).map_err(|e| match e {
            MonClientError::Timeout { addr, timeout } => RadosError::NoMap { addr, timeout },
            MonClientError::ShutDown => RadosError::ShutDown,
            other => RadosError::Io(other.to_string()),
        })
    }

    /// Runs an admin command on one OSD (waiting while the OSD is down, up to the op timeout or 60 s).
    pub fn osd_command(&self, osd: OsdId, cmd: OsdCommand) -> Result<OsdCommandReply, RadosError> {
        self.command(Target::Osd(osd), cmd)
    }

    /// Ops and bytes in flight now.
    pub fn in_flight(&self) -> (usize, u64) {
        self.core.lock().in_flight()
    }

    /// The epoch of the map the Objecter places ops with.
    pub fn epoch(&self) -> Option<Epoch> {
        self.core.lock().epoch()
    }

    /// Fails every op in flight with [`RadosError::ShutDown`], refuses new ones, closes the OSD sessions and
    /// stops the timer thread. The messenger and MonClient are the caller's to shut down.
    pub fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut core = self.core.lock();
        core.fail_all(RadosError::ShutDown);
        self.room.notify_all();
        self.timer_wake.notify_all();
        self.flush(core);
        for (_, c) in self.conns.lock().drain() {
            c.conn.mark_down();
        }
        if let Some(t) = self.timer.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    fn command(&self, target: Target, cmd: OsdCommand) -> Result<OsdCommandReply, RadosError> {
        let slot: Arc<Slot<_>> = Arc::new(Slot::default());
        let timeout = self.limits.op_timeout.unwrap_or(COMMAND_TIMEOUT);
        self.submit(NewOp {
            token: Waiter::Command(Arc::clone(&slot)),
            target,
            request: Request::Command(cmd),
            bytes: 0,
            timeout: Some(timeout),
        })?;
        slot.take_until(None).expect("waiting without a deadline ends with a result")
    }

    /// Waits for room in the budget, then hands the op to the tracker.
    fn submit(&self, mut new: NewOp<Waiter>) -> Result<(), RadosError> {
        let wait_max = new.timeout.unwrap_or(BUDGET_WAIT_MAX);
        let deadline = Instant::now() + wait_max;
        let mut retried = false;
        loop {
            let mut core = self.core.lock();
            while !core.has_room(new.bytes) {
                if self.stopping.load(Ordering::Acquire) {
                    return Err(RadosError::ShutDown);
                }
                if self.room.wait_until(&mut core, deadline).timed_out() && !core.has_room(new.bytes) {
                    return Err(RadosError::TimedOut(wait_max));
                }
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err(RadosError::ShutDown);
            }
            match core.submit(Instant::now(), new) {
                Ok(_) => {
                    self.flush(core);
                    return Ok(());
                }
                Err((back, e @ RadosError::NoSuchPool(_))) => {
                    // The IoCtx may have been opened on a map the tracker has not applied yet (a new pool).
                    let ours = core.epoch();
                    drop(core);
                    match self.monc.map() {
                        Some(m) if !retried && ours.is_some_and(|e| m.epoch > e) => {
                            self.handle_map(&m);
                            retried = true;
                            new = *back;
                        }
                        _ => return Err(e),
                    }
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    fn handle_map(&self, map: &Arc<OsdMap>) {
        let mut core = self.core.lock();
        core.handle_map(Instant::now(), Arc::clone(map));
        self.flush(core);
        // Sessions with OSDs that went down or moved serve nothing any more; their ops were re-targeted.
        self.conns.lock().retain(|osd, c| {
            let keep = map.osds.get(osd).is_some_and(|i| i.up && i.addrs.is_some_and(|a| a.public == c.addr));
            if !keep {
                c.conn.mark_down();
            }
            keep
        });
    }

    fn handle_op_reply(&self, from: OsdId, reply: OsdOpReply, data: Bytes) {
        // A misdirected op waits on a timer the timer thread may not know of yet.
        let misdirected = matches!(reply.result, Err(OsdError::Misdirected(_)));
        let mut core = self.core.lock();
        core.handle_op_reply(Instant::now(), from, reply, data);
        if misdirected {
            self.timer_wake.notify_one();
        }
        self.flush(core);
    }

    fn handle_command_reply(&self, from: OsdId, tid: u64, reply: OsdCommandReply) {
        let mut core = self.core.lock();
        core.handle_command_reply(Instant::now(), from, tid, reply);
        self.timer_wake.notify_one();
        self.flush(core);
    }

    fn handle_conn_reset(&self, conn: &Connection, lossy: bool) {
        let which = self.conns.lock().iter().find(|(_, c)| c.conn == *conn).map(|(osd, c)| (*osd, c.gen));
        let Some((osd, gen)) = which else { return }; // A session we already replaced or closed.
        if lossy {
            // The messenger queues the reset event just before its worker marks the session closed and drops it
            // from the registry. Until then `connect` would hand the dying session back and the resend would
            // vanish with it, so wait for the close (it is the worker's next step; the bound is only a guard).
            let deadline = Instant::now() + Duration::from_secs(1);
            while !conn.is_closed() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
            if !conn.is_closed() {
                tracing::warn!(%osd, "a reset session is still open after 1 s; closing it");
                conn.mark_down();
            }
        }
        let mut core = self.core.lock();
        core.handle_reset(Instant::now(), osd, gen);
        self.timer_wake.notify_one();
        self.flush(core);
    }

    /// One round of the timer thread: sleep until something is due (at most `TICK_MAX`), then handle it.
    fn tick(&self) {
        let mut core = self.core.lock();
        let now = Instant::now();
        let due = core.poll_timeout().map_or(now + TICK_MAX, |t| t.min(now + TICK_MAX));
        if due > now {
            self.timer_wake.wait_until(&mut core, due);
        }
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        core.handle_timeout(Instant::now());
        self.flush(core);
    }

    /// Carries out what the tracker asked for: sends (in order, outside the core's lock) and completions.
    fn flush<'a>(&'a self, mut core: MutexGuard<'a, Tracker<Waiter>>) {
        loop {
            if core.out.is_empty() {
                return;
            }
            let outs: Vec<Output<Waiter>> = std::iter::from_fn(|| core.poll_output()).collect();
            let mut conns = self.conns.lock();
            drop(core);
            let mut failures = Vec::new();
            let mut done = Vec::new();
            for o in outs {
                match o {
                    Output::Send { tid, osd, addr, gen, msg } => {
                        if let Err(f) = self.send(&mut conns, tid, osd, addr, gen, msg) {
                            failures.push(f);
                        }
                    }
                    Output::Done { token, outcome } => done.push((token, outcome)),
                }
            }
            drop(conns);
            if !done.is_empty() {
                self.room.notify_all();
                for (w, outcome) in done {
                    w.complete(outcome);
                }
            }
            if failures.is_empty() {
                return;
            }
            core = self.core.lock();
            let now = Instant::now();
            for f in failures {
                match f {
                    SendFailure::Reset { osd, gen } => core.handle_reset(now, osd, gen),
                    SendFailure::Fatal { tid, error } => core.fail(tid, error),
                }
            }
            self.timer_wake.notify_one();
        }
    }

    fn send(
        &self,
        conns: &mut HashMap<OsdId, OsdConn>,
        tid: u64,
        osd: OsdId,
        addr: SocketAddr,
        gen: u64,
        msg: Message,
    ) -> Result<(), SendFailure> {
        let conn = match conns.get(&osd) {
            Some(c) if c.gen == gen && c.addr == addr => c.conn.clone(),
            _ => {
                let c = self
                    .msgr
                    .connect(EntityName::osd(u64::from(osd.0)), addr)
                    .map_err(|_| SendFailure::Fatal { tid, error: RadosError::ShutDown })?;
                if let Some(old) = conns.insert(osd, OsdConn { gen, addr, conn: c.clone() }) {
                    if old.conn != c {
                        old.conn.mark_down();
                    }
                }
                c
            }
        };
        conn.send_message(msg).map_err(|e| match e {
            messenger::SendError::TooLarge(n) => SendFailure::Fatal {
                tid,
                error: RadosError::TooLarge(format!(
                    "a {n}-byte message is over the messenger's frame limit"
                )),
            },
            // A backlog faulted the (lossy) session: like a reset, the op goes again on a new one.
            messenger::SendError::Closed
            | messenger::SendError::Timeout(_)
            | messenger::SendError::Backlog { .. } => SendFailure::Reset { osd, gen },
        })
    }
}

impl Drop for Objecter {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // A Completion outlives the Objecter: whoever waits on one must not wait forever.
        let core = self.core.get_mut();
        core.fail_all(RadosError::ShutDown);
        while let Some(o) = core.poll_output() {
            if let Output::Done { token, outcome } = o {
                token.complete(outcome);
            }
        }
        for (_, c) in self.conns.get_mut().drain() {
            c.conn.mark_down();
        }
    }
}

/// Distinguishes this Objecter instance in its `ReqId`s from an earlier one of the same client id.
fn instance_nonce() -> u64 {
    messenger::util::entropy()
}

/// The dispatcher half, holding the Objecter weakly so that dropping the Objecter ends it.
struct ObjecterDispatcher(Weak<Objecter>);

impl Dispatcher for ObjecterDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        matches!(m.msg_type, types::OSD_OP_REPLY | types::OSD_COMMAND_REPLY)
    }

    fn dispatch(&self, conn: &Connection, mut m: Message) -> Result<(), Refused> {
        if !matches!(m.msg_type, types::OSD_OP_REPLY | types::OSD_COMMAND_REPLY) {
            return Err(Refused::NotMine(m));
        }
        let Some(o) = self.0.upgrade() else { return Ok(()) };
        let from = conn
            .peer_name()
            .filter(|n| n.ty == EntityType::Osd)
            .and_then(|n| u32::try_from(n.num).ok())
            .map(OsdId);
        let Some(from) = from else {
            tracing::warn!(?conn, "OSD reply from a peer that is not an OSD; dropped");
            return Ok(());
        };
        match m.msg_type {
            types::OSD_OP_REPLY => match m.decode::<OsdOpReply>() {
                Ok(r) => o.handle_op_reply(from, r, std::mem::take(&mut m.data)),
                Err(e) => tracing::warn!(%from, "bad op reply: {e}"),
            },
            _ => match m.decode::<OsdCommandReply>() {
                Ok(r) => o.handle_command_reply(from, m.tid, r),
                Err(e) => tracing::warn!(%from, "bad command reply: {e}"),
            },
        }
        Ok(())
    }

    fn handle_reset(&self, conn: &Connection) {
        if let Some(o) = self.0.upgrade() {
            o.handle_conn_reset(conn, true);
        }
    }

    /// Not expected on lossy OSD sessions; if it happens, what was queued is gone, so resend it.
    fn handle_remote_reset(&self, conn: &Connection) {
        if let Some(o) = self.0.upgrade() {
            o.handle_conn_reset(conn, false);
        }
    }
}

/// Object I/O on one pool. Cheap to clone. Every call checks the object name first (non-empty, at most
/// `osd_max_object_name_len` bytes) and fails with [`RadosError::InvalidName`] before sending anything.
#[derive(Clone)]
pub struct IoCtx {
    objecter: Arc<Objecter>,
    pool: PoolId,
    pool_name: Arc<str>,
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoCtx({} {:?})", self.pool, self.pool_name)
    }
}

impl IoCtx {
    pub fn pool_id(&self) -> PoolId {
        self.pool
    }

    pub fn pool_name(&self) -> &str {
        &self.pool_name
    }

    pub fn objecter(&self) -> &Arc<Objecter> {
        &self.objecter
    }

    /// Submits a compound op; blocks only while the in-flight budget is full (up to the op timeout, or
    /// 120 s without one).
    pub fn aio_operate(&self, oid: &str, op: ObjectOperation) -> Result<Completion, RadosError> {
        self.check_name(oid)?;
        self.check_op(&op)?;
        let slot: Arc<Slot<_>> = Arc::new(Slot::default());
        let data = op.data();
        let bytes = op.budget_bytes;
        self.objecter.submit(NewOp {
            token: Waiter::Op(Arc::clone(&slot)),
            target: Target::Object {
                pool: self.pool,
                pool_name: Arc::clone(&self.pool_name),
                oid: oid.to_string(),
            },
            request: Request::Op { ops: op.ops, data },
            bytes,
            timeout: self.objecter.limits.op_timeout,
        })?;
        Ok(Completion(slot))
    }

    /// Runs a compound op and waits for it.
    pub fn operate(&self, oid: &str, op: ObjectOperation) -> Result<OpReply, RadosError> {
        self.aio_operate(oid, op)?.wait()
    }

    pub fn aio_write(
        &self,
        oid: &str,
        offset: u64,
        data: impl Into<Bytes>,
    ) -> Result<Completion, RadosError> {
        self.aio_operate(oid, ObjectOperation::new().write(offset, data))
    }

    pub fn aio_write_full(&self, oid: &str, data: impl Into<Bytes>) -> Result<Completion, RadosError> {
        self.aio_operate(oid, ObjectOperation::new().write_full(data))
    }

    /// `len` 0 reads to the end; the data is `reply.data(0)`.
    pub fn aio_read(&self, oid: &str, offset: u64, len: u64) -> Result<Completion, RadosError> {
        self.aio_operate(oid, ObjectOperation::new().read(offset, len))
    }

    pub fn aio_remove(&self, oid: &str) -> Result<Completion, RadosError> {
        self.aio_operate(oid, ObjectOperation::new().remove())
    }

    /// Writes at `offset`, creating the object if needed. Returns the object's new version.
    pub fn write(&self, oid: &str, offset: u64, data: impl Into<Bytes>) -> Result<u64, RadosError> {
        Ok(self.operate(oid, ObjectOperation::new().write(offset, data))?.version)
    }

    /// Replaces the object's content. Returns its new version.
    pub fn write_full(&self, oid: &str, data: impl Into<Bytes>) -> Result<u64, RadosError> {
        Ok(self.operate(oid, ObjectOperation::new().write_full(data))?.version)
    }

    pub fn append(&self, oid: &str, data: impl Into<Bytes>) -> Result<u64, RadosError> {
        Ok(self.operate(oid, ObjectOperation::new().append(data))?.version)
    }

    /// Reads `len` bytes at `offset` (`len` 0: to the end). Short at the end of the object.
    pub fn read(&self, oid: &str, offset: u64, len: u64) -> Result<Bytes, RadosError> {
        self.operate(oid, ObjectOperation::new().read(offset, len))?.data(0)
    }

    /// (size, version).
    pub fn stat(&self, oid: &str) -> Result<(u64, u64), RadosError> {
        self.operate(oid, ObjectOperation::new().stat())?.stat(0)
    }

    pub fn remove(&self, oid: &str) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().remove()).map(drop)
    }

    pub fn truncate(&self, oid: &str, size: u64) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().truncate(size)).map(drop)
    }

    pub fn zero(&self, oid: &str, offset: u64, len: u64) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().zero(offset, len)).map(drop)
    }

    pub fn create(&self, oid: &str, exclusive: bool) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().create(exclusive)).map(drop)
    }

    pub fn setxattr(&self, oid: &str, name: &str, value: impl Into<Bytes>) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().setxattr(name, value)).map(drop)
    }

    pub fn getxattr(&self, oid: &str, name: &str) -> Result<Bytes, RadosError> {
        self.operate(oid, ObjectOperation::new().getxattr(name))?.data(0)
    }

    /// The names of the object's attributes, in order.
    pub fn listxattrs(&self, oid: &str) -> Result<Vec<String>, RadosError> {
        self.operate(oid, ObjectOperation::new().listxattrs())?.keys(0)
    }

    pub fn rmxattr(&self, oid: &str, name: &str) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().rmxattr(name)).map(drop)
    }

    pub fn omap_set(
        &self,
        oid: &str,
        pairs: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().omap_set(pairs)).map(drop)
    }

    /// The values of those `keys` that exist.
    pub fn omap_get(
        &self,
        oid: &str,
        keys: impl IntoIterator<Item = String>,
    ) -> Result<BTreeMap<String, Vec<u8>>, RadosError> {
        self.operate(oid, ObjectOperation::new().omap_get(keys))?.pairs(0)
    }

    /// Keys after `after` ("" for the first), at most `max`, in order.
    pub fn omap_get_keys(&self, oid: &str, after: &str, max: u32) -> Result<Vec<String>, RadosError> {
        self.operate(oid, ObjectOperation::new().omap_get_keys(after, max))?.keys(0)
    }

    pub fn omap_rm(&self, oid: &str, keys: impl IntoIterator<Item = String>) -> Result<(), RadosError> {
        self.operate(oid, ObjectOperation::new().omap_rm(keys)).map(drop)
    }

    /// One page of the pool's object names, at most `max`, walking its PGs in order from `cursor` (`None`:
    /// the start). Returns the cursor of the next page, `None` at the end. Objects written during a walk may
    /// or may not appear.
    pub fn list(
        &self,
        cursor: Option<&ListCursor>,
        max: usize,
    ) -> Result<(Vec<String>, Option<ListCursor>), RadosError> {
        if max == 0 || max > LIST_PAGE_MAX {
            return Err(RadosError::Invalid(format!(
                "a listing page holds 1 to {LIST_PAGE_MAX} names, not {max}"
            )));
        }
        let map = self.objecter.wait_for_map()?;
        let pg_num = map
            .pools
            .get(&self.pool)
            .ok_or_else(|| RadosError::NoSuchPool(self.pool_name.to_string()))?
            .pg_num;
        let (mut seed, mut after) = cursor.map_or((0, None), |c| (c.seed, c.after.clone()));
        let mut names = Vec::new();
        while seed < pg_num {
            let want = max - names.len();
            let pgid = PgId::new(self.pool, seed);
            let req = PgListRequest {
                pgid,
                epoch: Epoch(0), // The tracker fills in its epoch when it sends.
                after: after.clone(),
                max: u32::try_from(want).expect("want <= LIST_PAGE_MAX"),
            };
            let reply = self.objecter.command(Target::Pg(pgid), OsdCommand::PgList(req))?;
            let got = reply.result.map_err(|e| RadosError::from_osd(e, &self.pool_name))?;
            if got.len() > want {
                return Err(RadosError::Protocol(format!(
                    "pg {pgid} listed {} names, {want} asked",
                    got.len()
                )));
            }
            names.extend(got);
            match reply.next {
                Some(next) if Some(&next) == after.as_ref() => {
                    return Err(RadosError::Protocol(format!(
                        "pg {pgid} listing does not advance past {next:?}"
                    )));
                }
                Some(next) => after = Some(next),
                None => {
                    seed += 1;
                    after = None;
                }
            }
            if names.len() == max {
                let more = (seed < pg_num).then_some(ListCursor { seed, after });
                return Ok((names, more));
            }
        }
        Ok((names, None))
    }

    fn check_name(&self, oid: &str) -> Result<(), RadosError> {
        if oid.is_empty() {
            return Err(RadosError::InvalidName("the name is empty".into()));
        }
        let max = self.objecter.limits.name_len_max;
        if oid.len() > max {
            return Err(RadosError::InvalidName(format!(
                "the name is {} bytes, longer than osd_max_object_name_len ({max})",
                oid.len()
            )));
        }
        Ok(())
    }

    fn check_op(&self, op: &ObjectOperation) -> Result<(), RadosError> {
        if op.ops.is_empty() {
            return Err(RadosError::Invalid("an operation needs at least one step".into()));
        }
        if op.ops.len() > OPS_PER_REQUEST_MAX {
            return Err(RadosError::Invalid(format!(
                "{} steps in one operation, at most {OPS_PER_REQUEST_MAX}",
                op.ops.len()
            )));
        }
        let l = &self.objecter.limits;
        let payload: u64 = op.payload.iter().map(|p| p.len() as u64).sum();
        if payload > l.write_bytes_max {
            return Err(RadosError::TooLarge(format!(
                "{payload} bytes written in one operation, more than osd_max_write_size ({})",
                l.write_bytes_max
            )));
        }
        for o in &op.ops {
            let end = match *o {
                OsdOp::Write { offset, len } | OsdOp::Zero { offset, len } => offset.checked_add(len),
                OsdOp::Read { offset, len } => {
                    offset
                        .checked_add(len)
                        .ok_or_else(|| RadosError::Invalid("read extent overflows".into()))?;
                    continue;
                }
                OsdOp::WriteFull { len } => Some(len),
                OsdOp::Truncate { size } => Some(size),
                _ => continue,
            };
            let end = end.ok_or_else(|| RadosError::Invalid(format!("{o:?}: the extent overflows")))?;
            if end > l.object_bytes_max {
                return Err(RadosError::TooLarge(format!(
                    "{o:?} reaches byte {end}, beyond osd_max_object_size ({})",
                    l.object_bytes_max
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::{OsdAddrs, OsdChange, OsdInfo, Pool, WEIGHT_ONE};
    use crate::msg::OsdOpRequest;
    use crate::Fsid;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn addrs(port: u16) -> OsdAddrs {
        OsdAddrs {
            public: addr(port),
            cluster: addr(port + 1),
            hb_front: addr(port + 2),
            hb_back: addr(port + 3),
        }
    }

    /// Epoch 1: `n` OSDs up on their own hosts (osd.i at port 7000 + 10 i), pool 1 "rbd" of `size` and 8 PGs.
    fn map(n: u32, size: u8) -> OsdMap {
        let mut m = OsdMap::new(Fsid([7; 16]));
        let mut inc = m.incremental();
        for i in 0..n {
            let info = OsdInfo {
                addrs: Some(addrs(7000 + 10 * i as u16)),
                up: true,
                in_: true,
                weight: WEIGHT_ONE,
                host: format!("h{i}"),
            };
            inc.new_osds.insert(OsdId(i), info);
        }
        inc.new_pools
            .insert(PoolId(1), Pool { id: PoolId(1), name: "rbd".into(), size, min_size: 1, pg_num: 8 });
        m.apply(&inc).unwrap();
        m
    }

    fn next(m: &OsdMap, f: impl FnOnce(&mut crate::map::Incremental)) -> Arc<OsdMap> {
        let mut inc = m.incremental();
        f(&mut inc);
        let mut n = m.clone();
        n.apply(&inc).unwrap();
        Arc::new(n)
    }

    fn mark(m: &OsdMap, osd: u32, up: bool) -> Arc<OsdMap> {
        next(m, |inc| {
            inc.osd_changes.insert(OsdId(osd), OsdChange { up: Some(up), ..Default::default() });
        })
    }

    fn tracker(ops_max: usize, bytes_max: u64) -> Tracker<u32> {
        Tracker::new(4121, 99, Limits { ops_max, bytes_max })
    }

    fn write(oid: &str, token: u32, timeout: Option<Duration>) -> NewOp<u32> {
        NewOp {
            token,
            target: Target::Object { pool: PoolId(1), pool_name: Arc::from("rbd"), oid: oid.into() },
            request: Request::Op { ops: vec![OsdOp::WriteFull { len: 3 }], data: Bytes::from_static(b"abc") },
            bytes: 3,
            timeout,
        }
    }

    /// A send as (tid, osd, session generation, decoded request).
    type Sent = (u64, OsdId, u64, OsdOpRequest);

    /// Drains outputs: the sends, and the completions as (token, outcome).
    fn drain(t: &mut Tracker<u32>) -> (Vec<Sent>, Vec<(u32, Outcome)>) {
        let (mut sends, mut done) = (Vec::new(), Vec::new());
        while let Some(o) = t.poll_output() {
            match o {
                Output::Send { tid, osd, gen, msg, .. } => {
                    assert_eq!(msg.msg_type, types::OSD_OP);
                    assert_eq!(msg.tid, tid);
                    sends.push((tid, osd, gen, msg.decode::<OsdOpRequest>().unwrap()));
                }
                Output::Done { token, outcome } => done.push((token, outcome)),
            }
        }
        (sends, done)
    }

    fn ok_reply(tid: u64, version: u64) -> OsdOpReply {
        OsdOpReply { tid, epoch: Epoch(1), result: Ok(()), version, outs: vec![OpOut::None] }
    }

    fn primary(m: &OsdMap, oid: &str) -> OsdId {
        let pg = object_to_pg(&m.pools[&PoolId(1)], oid.as_bytes());
        Placement::new(m).up_acting(pg).unwrap().primary.unwrap()
    }

    #[test]
    fn borrowed_request_encodes_like_the_owned_one() {
        // Goal: the borrowed twin of OsdOpRequest is byte-identical on the wire. Method: encode both.
        let ops = vec![OsdOp::AssertVersion { version: 3 }, OsdOp::Write { offset: 4096, len: 512 }];
        let owned = OsdOpRequest {
            reqid: ReqId { client: 1, nonce: 2, tid: 3 },
            pgid: PgId::new(PoolId(1), 5),
            oid: "rbd_data.x".into(),
            epoch: Epoch(9),
            ops: ops.clone(),
        };
        let borrowed = OsdOpRequestRef {
            reqid: owned.reqid,
            pgid: owned.pgid,
            oid: &owned.oid,
            epoch: owned.epoch,
            ops: &ops,
        };
        assert_eq!(postcard::to_stdvec(&owned).unwrap(), postcard::to_stdvec(&borrowed).unwrap());
    }

    #[test]
    fn ops_wait_for_a_map_then_go_to_the_primary() {
        // Goal: an op submitted before any map waits, and is sent to its PG's primary once a map arrives.
        // Method: drive the tracker by hand.
        let now = Instant::now();
        let mut t = tracker(8, 1 << 20);
        t.submit(now, write("obj", 1, None)).map_err(|e| e.1).unwrap();
        assert!(drain(&mut t).0.is_empty());
        let m = Arc::new(map(3, 3));
        t.handle_map(now, Arc::clone(&m));
        let (sends, _) = drain(&mut t);
        assert_eq!(sends.len(), 1);
        let (tid, osd, _, req) = &sends[0];
        assert_eq!(*osd, primary(&m, "obj"));
        assert_eq!(req.reqid, ReqId { client: 4121, nonce: 99, tid: *tid });
        assert_eq!(req.epoch, Epoch(1));
        t.handle_op_reply(now, *osd, ok_reply(*tid, 1), Bytes::new());
        let (_, done) = drain(&mut t);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].1, Ok(Reply::Op(OpReply { version: 1, outs: vec![OpOutput::None] })));
        assert_eq!(t.in_flight(), (0, 0));
    }

    #[test]
    fn map_change_retargets_with_the_same_reqid_and_ignores_the_old_primary() {
        // Goal: when the primary goes down, the op goes to the new primary with its reqid unchanged, and a late
        // answer from the old primary is ignored. Method: tracker by hand, mark the primary down.
        let now = Instant::now();
        let m = Arc::new(map(3, 3));
        let mut t = tracker(8, 1 << 20);
        t.handle_map(now, Arc::clone(&m));
        t.submit(now, write("obj", 1, None)).map_err(|e| e.1).unwrap();
        let (s1, _) = drain(&mut t);
        let old = s1[0].1;
        let m2 = mark(&m, old.0, false);
        t.handle_map(now, Arc::clone(&m2));
        let (s2, _) = drain(&mut t);
        assert_eq!(s2.len(), 1);
        assert_ne!(s2[0].1, old);
        assert_eq!(s2[0].1, primary(&m2, "obj"));
        assert_eq!(s2[0].3.reqid, s1[0].3.reqid);
        assert_eq!(s2[0].3.epoch, Epoch(2));
        t.handle_op_reply(now, old, ok_reply(s1[0].0, 1), Bytes::new());
        assert!(drain(&mut t).1.is_empty(), "the old primary's answer does not complete the op");
        t.handle_op_reply(now, s2[0].1, ok_reply(s1[0].0, 1), Bytes::new());
        assert_eq!(drain(&mut t).1.len(), 1);
        // A map that does not move the primary sends nothing again.
        t.submit(now, write("obj", 2, None)).map_err(|e| e.1).unwrap();
        drain(&mut t);
        t.handle_map(now, next(&m2, |_| {}));
        assert!(drain(&mut t).0.is_empty());
    }

    #[test]
    fn resets_resend_in_order_after_a_growing_backoff() {
        // Goal: a session fault resends what was sent on it, at once the first time and after a doubling
        // backoff after that; newer ops wait behind older ones; an answer resets the backoff.
        // Method: tracker by hand with a fake clock.
        let t0 = Instant::now();
        let m = Arc::new(map(1, 1));
        let mut t = tracker(8, 1 << 20);
        t.handle_map(t0, m);
        t.submit(t0, write("a", 1, None)).map_err(|e| e.1).unwrap();
        let (s, _) = drain(&mut t);
        let (tid_a, osd, gen, _) = s[0].clone();
        t.handle_reset(t0, osd, gen);
        let (s, _) = drain(&mut t);
        assert_eq!(s.len(), 1, "first fault: resent at once");
        assert_eq!((s[0].0, s[0].2), (tid_a, gen + 1));
        t.handle_reset(t0, osd, gen); // A stale fault of the old generation changes nothing.
        assert!(drain(&mut t).0.is_empty());
        t.handle_reset(t0, osd, gen + 1);
        assert!(drain(&mut t).0.is_empty(), "second fault: backing off");
        t.submit(t0, write("b", 2, None)).map_err(|e| e.1).unwrap();
        assert!(drain(&mut t).0.is_empty(), "a newer op does not overtake");
        assert_eq!(t.poll_timeout(), Some(t0 + RESET_BACKOFF_FIRST));
        t.handle_timeout(t0 + RESET_BACKOFF_FIRST);
        let (s, _) = drain(&mut t);
        assert_eq!(s.iter().map(|s| s.0).collect::<Vec<_>>(), vec![tid_a, tid_a + 1], "in tid order");
        t.handle_reset(t0, osd, gen + 2);
        assert_eq!(t.poll_timeout(), Some(t0 + RESET_BACKOFF_FIRST * 2));
        t.handle_timeout(t0 + RESET_BACKOFF_FIRST * 2);
        let (s, _) = drain(&mut t);
        t.handle_op_reply(t0, osd, ok_reply(s[0].0, 1), Bytes::new());
        assert_eq!(t.sessions[&osd].backoff, Duration::ZERO, "an answer proves the session works");
    }

    #[test]
    fn no_primary_waits_and_timeouts_fail() {
        // Goal: an op whose PG has no up OSD waits (is not failed) until a map brings one, and an op with a
        // timeout fails with TimedOut when it passes. Method: tracker by hand.
        let t0 = Instant::now();
        let m = map(1, 1);
        let down = mark(&m, 0, false);
        let mut t = tracker(8, 1 << 20);
        t.handle_map(t0, Arc::clone(&down));
        t.submit(t0, write("a", 1, None)).map_err(|e| e.1).unwrap();
        t.submit(t0, write("b", 2, Some(Duration::from_secs(1)))).map_err(|e| e.1).unwrap();
        assert!(drain(&mut t).0.is_empty());
        t.handle_timeout(t0 + Duration::from_secs(2));
        let (_, done) = drain(&mut t);
        assert_eq!(done, vec![(2, Err(RadosError::TimedOut(Duration::from_secs(1))))]);
        t.handle_map(t0, mark(&down, 0, true));
        assert_eq!(drain(&mut t).0.len(), 1);
    }

    #[test]
    fn misdirected_waits_for_a_newer_map_or_retries() {
        // Goal: a Misdirected answer does not fail the op: a newer map resends it at once, and without one it
        // is retried after MISDIRECTED_RETRY. Method: tracker by hand.
        let t0 = Instant::now();
        let m = Arc::new(map(3, 3));
        let mut t = tracker(8, 1 << 20);
        t.handle_map(t0, Arc::clone(&m));
        t.submit(t0, write("obj", 1, None)).map_err(|e| e.1).unwrap();
        let (s, _) = drain(&mut t);
        let (tid, osd, ..) = s[0].clone();
        let mis = |tid| OsdOpReply {
            tid,
            epoch: Epoch(2),
            result: Err(OsdError::Misdirected(Epoch(2))),
            version: 0,
            outs: vec![],
        };
        t.handle_op_reply(t0, osd, mis(tid), Bytes::new());
        let (s, d) = drain(&mut t);
        assert!(s.is_empty() && d.is_empty());
        t.handle_timeout(t0 + MISDIRECTED_RETRY);
        assert_eq!(drain(&mut t).0.len(), 1, "retried without a new map");
        t.handle_op_reply(t0, osd, mis(tid), Bytes::new());
        t.handle_map(t0, next(&m, |_| {}));
        let (s, _) = drain(&mut t);
        assert_eq!(s.len(), 1, "a newer map sends it again at once");
        assert_eq!(s[0].3.epoch, Epoch(2));
    }

    #[test]
    fn budget_counts_ops_and_bytes_and_admits_one_big_op() {
        // Goal: the in-flight budget bounds ops and bytes, but an op bigger than the byte budget still goes
        // alone. Method: tracker by hand.
        let now = Instant::now();
        let mut t = tracker(2, 4);
        assert!(t.has_room(100), "nothing in flight: anything fits");
        t.submit(now, write("a", 1, None)).map_err(|e| e.1).unwrap();
        assert!(!t.has_room(2));
        assert!(t.has_room(1));
        t.submit(now, write("b", 2, None)).map_err(|e| e.1).unwrap_or_else(|_| unreachable!());
        assert!(!t.has_room(0), "two ops is the limit");
        t.fail_all(RadosError::ShutDown);
        assert_eq!(t.in_flight(), (0, 0));
        assert!(drain(&mut t).1.iter().all(|(_, r)| *r == Err(RadosError::ShutDown)));
    }

    #[test]
    fn pool_removal_fails_ops_and_bad_replies_are_protocol_errors() {
        // Goal: ops on a deleted pool fail with NoSuchPool; a reply whose outputs do not fit the data segment
        // fails the op with a Protocol error instead of panicking. Method: tracker by hand.
        let now = Instant::now();
        let m = Arc::new(map(1, 1));
        let mut t = tracker(8, 1 << 20);
        t.handle_map(now, Arc::clone(&m));
        t.submit(now, write("a", 1, None)).map_err(|e| e.1).unwrap();
        let (s, _) = drain(&mut t);
        let bad = OsdOpReply {
            tid: s[0].0,
            epoch: Epoch(1),
            result: Ok(()),
            version: 1,
            outs: vec![OpOut::Data { len: 10 }],
        };
        t.handle_op_reply(now, s[0].1, bad, Bytes::from_static(b"short"));
        assert!(matches!(drain(&mut t).1[0].1, Err(RadosError::Protocol(_))));
        t.submit(now, write("b", 2, None)).map_err(|e| e.1).unwrap();
        t.handle_map(
            now,
            next(&m, |inc| {
                inc.removed_pools.insert(PoolId(1));
            }),
        );
        assert_eq!(drain(&mut t).1, vec![(2, Err(RadosError::NoSuchPool("rbd".into())))]);
        assert!(matches!(t.submit(now, write("c", 3, None)), Err((_, RadosError::NoSuchPool(_)))));
    }

    #[test]
    fn outputs_split_the_data_segment_in_order() {
        // Goal: read outputs take consecutive slices of the data segment; leftovers are an error.
        let outs = vec![
            OpOut::Data { len: 2 },
            OpOut::None,
            OpOut::Stat { size: 4, version: 2 },
            OpOut::Data { len: 3 },
        ];
        let v = split_outs(outs, Bytes::from_static(b"abcde")).unwrap();
        assert_eq!(v[0], OpOutput::Data(Bytes::from_static(b"ab")));
        assert_eq!(v[3], OpOutput::Data(Bytes::from_static(b"cde")));
        assert!(split_outs(vec![OpOut::Data { len: 2 }], Bytes::from_static(b"abc")).is_err());
        assert!(split_outs(vec![OpOut::Data { len: u64::MAX }], Bytes::from_static(b"abc")).is_err());
    }

    #[test]
    fn compound_payloads_concatenate_in_op_order() {
        // Goal: the data segment is the write payloads in op order; the budget counts payloads and reads.
        let op = ObjectOperation::new()
            .write(0, &b"ab"[..])
            .read(0, 10)
            .setxattr("x", &b"cd"[..])
            .append(&b"e"[..]);
        assert_eq!(op.data(), Bytes::from_static(b"abcde"));
        assert_eq!(op.budget_bytes, 15);
        assert!(op.is_write());
        assert!(!ObjectOperation::new().read(0, 0).stat().is_write());
    }
}
