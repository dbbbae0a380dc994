//! A placement group on one OSD: primary-copy replication and peering, as a sans-IO state machine.
//!
//! [`Pg`] reads no clock (time comes in as `now`), opens no socket and spawns no thread. It is driven by
//! `handle_map`, `handle_client_op`, `handle_list`, `handle_peer` and `tick`, and says what to do through
//! [`Pg::poll_output`]: messages to other OSDs and replies to clients. Client context (`C`) is opaque to it: the
//! shard passes the connection and message it needs to answer, tests pass a number. The store is the one thing
//! it touches directly: applying a transaction is the PG's own state change.
//!
//! # Replication
//!
//! The primary (first OSD of the acting set) orders the PG's writes. For each write request it executes the
//! ops ([`crate::exec`]), gives the result the next PG version (`Eversion { epoch: interval start, v:
//! last_update.v + 1 }`; the object's version becomes that), appends the PG metadata changes (new
//! `last_update`, a remembered reply for the request id) to the same transaction, queues it to its store, and
//! sends it to every other acting OSD as a `RepOp`. The client is answered once the write is durable on every
//! acting OSD: the primary's own commit is one more acknowledgement it waits for, and a replica answers its
//! primary only once its copy is committed ([`Pg::handle_commit`]; see [`crate::store::ObjectStore`]).
//! Replicas apply RepOps in the order they arrive (one ordered, lossless session per OSD pair), so each replica
//! holds a prefix of the primary's writes of the interval. Everything else that reports the PG's stored state
//! (peering summaries, remembered replies) also leaves only once what the PG queued is durable, and work that
//! finds the store's commit queue full waits, in order, for its next commit.
//!
//! A resent request (same `ReqId`) that is still in flight waits for the first one; one that completed gets the
//! remembered reply (a bounded record of the last [`DUPS_MAX`] writes, kept in the PG metadata on every
//! replica, so a new primary knows it too). Reads are served by the primary; a read of an object with writes
//! in flight waits for them, and later ops on that object wait behind it, so a client never reads
//! unacknowledged data and its ops on one object are answered in order.
//!
//! # Peering and recovery
//!
//! A new interval starts when the map changes the PG's acting set, its primary, the pool's size or min_size,
//! or the address of an acting OSD (a restarted OSD). The new primary does not serve ops until:
//!
//! 1. **GetInfo**: every acting OSD (itself included) sends its summary: `last_update`, its remembered
//!    replies, and every object's version (paged).
//! 2. The **authoritative** summary is the one with the greatest `last_update` (ties: the primary itself, then
//!    the lowest id). Because versions sort by interval epoch first, a deposed primary's unacknowledged writes
//!    (made at an older epoch) lose to anything written in a later interval; because an acknowledged write is
//!    on every acting OSD of its interval, and any two acting sets of at least min_size out of the pool's size
//!    OSDs overlap (2 of 3 here), the authoritative peer holds every acknowledged write.
//! 3. **Pull**: if the authoritative peer is another OSD, the primary copies from it every object whose version
//!    differs from its own (whole objects) and removes what the authoritative peer does not have, then adopts its
//!    `last_update` and remembered replies.
//! 4. **Push**: every other acting OSD gets the same treatment from the primary.
//! 5. **Activate**: replicas adopt the metadata and accept RepOps of this interval; the primary serves the
//!    waiting ops. Writes that were in flight when the interval changed are re-run: they were applied and
//!    remembered locally, so if they survived peering they are now on every acting OSD and are answered from
//!    the remembered replies; if they were rolled back they execute again.
//!
//! OSDs may see different subsets of the map epochs (a MonClient hands over only the newest of several maps), so
//! they can disagree on when an interval began: an OSD that was marked down and up again at the same addresses
//! saw a new interval its primary may have missed. A replica answers a message its primary sent from an
//! interval it considers over with `PgNewInterval`, and the primary peers again from that epoch. A cluster
//! session reset (its queue dropped) and lack of progress for [`PEER_RETRY`] also start a new peering round;
//! every step of peering is idempotent.
//!
//! A PG whose acting set is smaller than the pool's min_size does not peer: ops wait (bounded) for a map that
//! brings enough OSDs. What this is not: Ceph's past intervals and `up_thru`. Peering looks only at the current
//! acting set, which is sound while acting sets of one PG keep overlapping (an OSD keeps its place while it is
//! down, until it is marked out); a PG whose data lives only on OSDs outside its acting set is not found.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use messenger::crc::CrcBytes;

use rados::ids::{Epoch, OsdId, PgId};
use rados::msg::{OpOut, OsdCommandReply, OsdError, OsdOpReply, OsdOpRequest, PgListRequest, PgStat, ReqId};

use crate::exec::{self, OpLimits};
use crate::proto::{
    DupEntry, ObjectCopy, PeerMsg, PgActivate, PgInfo, PgNewInterval, PgPull, PgPush, PgPushReply, PgQuery,
    RepOp, RepOpReply,
};
use crate::store::{CommitSeq, Eversion, ObjectId, ObjectStore, StoreError, Transaction};

/// Remembered replies per PG (Ceph's `osd_pg_log_dups_tracked` is 3000).
pub const DUPS_MAX: u64 = 1024;
/// Ops a PG holds at once (waiting to become active, waiting for an object's writes, or in flight). The
/// messenger's client throttle normally stops clients long before this.
pub const WAITING_OPS_MAX: usize = 4096;
/// Objects per page of a peering summary.
pub const SUMMARY_PAGE_OBJECTS: usize = 1024;
/// Object copies in flight per PG and peer during recovery.
pub const RECOVERY_OPS_MAX: usize = 8;
/// Most names in one page of a pool listing.
pub const LIST_PAGE_MAX: usize = 1024;
/// The PG's metadata object: its omap holds `last_update` and the remembered replies. Clients cannot name it
/// (empty names are refused) and listings skip it.
pub const META_OBJECT: &str = "";
/// An op waiting this long is logged as slow.
const SLOW_OP: Duration = Duration::from_secs(30);
/// Peering taking this long is logged, naming whom it waits for.
const SLOW_PEERING: Duration = Duration::from_secs(10);
/// Peering that has not finished, or a write some replica has not acknowledged, after this long starts a new
/// peering round. Sessions between OSDs are lossless, so this only matters when one was reset (its queue
/// dropped) in a way no map change reflects; re-peering is idempotent and repairs it.
pub const PEER_RETRY: Duration = Duration::from_secs(15);
const KEY_LAST_UPDATE: &str = "last_update";
const KEY_DUP_PREFIX: &str = "dup.";

/// What the PG needs from its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolParams {
    pub size: u8,
    pub min_size: u8,
}

/// The PG as one map epoch places it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgMapView {
    pub epoch: Epoch,
    /// `None`: the pool was deleted.
    pub pool: Option<PoolParams>,
    /// Up OSDs serving the PG, primary first.
    pub acting: Vec<OsdId>,
    pub primary: Option<OsdId>,
    /// The acting OSDs' cluster addresses, in `acting` order. An OSD that restarted at new addresses lost its
    /// memory and its sessions, so that starts a new interval even when the acting set stays the same.
    pub acting_addrs: Vec<Option<SocketAddr>>,
}

impl PgMapView {
    fn same_interval(&self, other: &PgMapView) -> bool {
        self.acting == other.acting
            && self.primary == other.primary
            && self.pool == other.pool
            && self.acting_addrs == other.acting_addrs
    }
}

/// A client request for this PG, with what the caller needs to answer it.
#[derive(Debug)]
pub struct ClientOp<C> {
    pub req: OsdOpRequest,
    /// The request's data segment, with the block crcs its receipt computed.
    pub data: CrcBytes,
    pub ctx: C,
}

/// A pool listing request for this PG.
#[derive(Debug)]
pub struct ListOp<C> {
    pub req: PgListRequest,
    pub ctx: C,
}

/// What the PG asks its caller to do.
#[derive(Debug)]
pub enum PgOutput<C> {
    Send {
        to: OsdId,
        msg: PeerMsg,
    },
    Reply {
        ctx: C,
        reply: OsdOpReply,
        /// The reply's data segment, in parts sent back to back.
        data: Vec<CrcBytes>,
    },
    ListReply {
        ctx: C,
        reply: OsdCommandReply,
    },
    /// The PG became active or stopped being active: worth telling the monitor soon.
    StateChanged,
}

/// Where the PG stands on this OSD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgState {
    /// Not in the acting set (or no map yet): holds nothing to serve.
    Stray,
    Replica,
    /// Primary, but fewer than min_size OSDs are up (or the pool is gone): ops wait.
    Inactive,
    Peering,
    Active,
}

#[derive(Debug)]
enum Item<C> {
    Op(ClientOp<C>),
    List(ListOp<C>),
}

#[derive(Debug)]
struct Waiting<C> {
    /// Arrival order, kept when ops are put back after an interval change.
    seq: u64,
    since: Instant,
    item: Item<C>,
}

#[derive(Debug)]
struct InFlight<C> {
    reqid: ReqId,
    sent_at: Instant,
    name: String,
    /// The local transaction's place in the store's commit order.
    commit: CommitSeq,
    /// Replicas yet to answer, and this OSD itself until its own commit is durable.
    waiting_on: BTreeSet<OsdId>,
    reply: OsdOpReply,
    data: Vec<CrcBytes>,
    /// The request and every resend of it that arrived meanwhile.
    waiters: Vec<Waiting<C>>,
}

/// Work that waits for room in the store's commit queue.
#[derive(Debug)]
enum Backlogged<C> {
    Op(Waiting<C>),
    RepOp { from: OsdId, epoch: Epoch, version: Eversion, txn: Transaction },
}

/// Remembered replies, by request id, oldest first.
#[derive(Debug, Default)]
struct Dups {
    by_reqid: HashMap<ReqId, DupEntry>,
    order: VecDeque<(u64, ReqId)>,
}

impl Dups {
    fn from_entries(mut entries: Vec<DupEntry>) -> Dups {
        entries.sort_by_key(|e| e.version);
        let mut d = Dups::default();
        for e in entries {
            d.insert(e);
        }
        d
    }

    fn insert(&mut self, e: DupEntry) {
        self.order.push_back((e.version, e.reqid));
        self.by_reqid.insert(e.reqid, e);
        while self.order.len() as u64 > DUPS_MAX {
            let (v, r) = self.order.pop_front().expect("longer than DUPS_MAX");
            if self.by_reqid.get(&r).is_some_and(|e| e.version == v) {
                self.by_reqid.remove(&r);
            }
        }
    }

    fn get(&self, r: &ReqId) -> Option<&DupEntry> {
        self.by_reqid.get(r)
    }
}

/// One peer's view of the PG, as GetInfo collects it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Summary {
    last_update: Eversion,
    dups: Vec<DupEntry>,
    objects: BTreeMap<String, Eversion>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    GetInfo,
    Pull,
    Push,
}

#[derive(Debug)]
struct Peering {
    round: u32,
    since: Instant,
    phase: Phase,
    infos: BTreeMap<OsdId, Summary>,
    /// Pages received so far from peers that have more to send.
    partial: BTreeMap<OsdId, Summary>,
    auth: Option<OsdId>,
    to_pull: VecDeque<String>,
    pulling: BTreeSet<String>,
    to_push: BTreeMap<OsdId, VecDeque<String>>,
    pushing: BTreeMap<OsdId, BTreeSet<String>>,
    last_log: Instant,
}

/// One PG on one OSD. See the module documentation.
pub struct Pg<C> {
    pgid: PgId,
    whoami: OsdId,
    store: Arc<dyn ObjectStore>,
    limits: OpLimits,
    view: Option<PgMapView>,
    /// The epoch at which the current interval started.
    interval: Epoch,
    state: PgState,
    peering_round: u32,
    peering: Option<Peering>,
    /// Primary while active: the version of the last write.
    last_update: Eversion,
    dups: Dups,
    in_flight: BTreeMap<Eversion, InFlight<C>>,
    in_flight_reqids: HashMap<ReqId, Eversion>,
    writes_in_flight: HashMap<String, usize>,
    /// Ops on one object waiting behind a read that waits for that object's writes.
    blocked: HashMap<String, VecDeque<Waiting<C>>>,
    /// Ops waiting for the PG to become active.
    waiting: VecDeque<Waiting<C>>,
    next_seq: u64,
    /// Replica: the interval whose primary activated us (RepOps of other intervals are refused).
    activated: Option<Epoch>,
    /// Replica: the stale epoch we last told our primary about (once is enough).
    stale_told: Option<Epoch>,
    outputs: VecDeque<PgOutput<C>>,
    /// Outputs that report or acknowledge what this PG queued to the store, each held until the store has made
    /// durable everything the PG had queued when it was emitted (see [`Pg::emit_durable`]).
    after_commit: VecDeque<(CommitSeq, PgOutput<C>)>,
    /// The newest commit sequence of a transaction this PG queued.
    last_queued: CommitSeq,
    /// The full OSD for whose sake writes that add data are refused (ENOSPC): this one, its store past
    /// `mon_osd_full_ratio`, or one of the acting set that the map marks full.
    full: Option<OsdId>,
    /// What found the store's commit queue full (`StoreError::Busy`), in arrival order: retried after each
    /// commit. While it is not empty, every new op and replicated write joins it, so order is kept.
    store_backlog: VecDeque<Backlogged<C>>,
    /// `do_op` runs on behalf of the backlog (its op may be put back at the front).
    backlog_retry: bool,
    last_slow_log: Option<Instant>,
}

impl<C> std::fmt::Debug for Pg<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("pgid", &self.pgid)
            .field("state", &self.state)
            .field("interval", &self.interval)
            .field("last_update", &self.last_update)
            .finish()
    }
}

fn meta_oid(pg: PgId) -> ObjectId {
    ObjectId::new(pg, META_OBJECT)
}

fn dup_key(v: u64) -> String {
    format!("{KEY_DUP_PREFIX}{v:020}")
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("in-memory encoding of a serde value cannot fail")
}

/// The PG metadata as stored: `last_update` and the remembered replies. Garbage in the metadata object (which
/// only this module writes) is skipped with a warning rather than trusted.
#[doc(hidden)] // Public for the peer_msg fuzz target.
pub fn load_meta(store: &dyn ObjectStore, pg: PgId) -> (Eversion, Vec<DupEntry>) {
    let mut last_update = Eversion::ZERO;
    let mut dups = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = match store.omap_list(pg, META_OBJECT, after.as_deref(), 1024) {
            Ok(p) => p,
            Err(StoreError::NotFound(_)) => break,
            Err(e) => {
                tracing::error!(%pg, "cannot read PG metadata: {e}");
                break;
            }
        };
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, v) in page {
            if k == KEY_LAST_UPDATE {
                match postcard::from_bytes(&v) {
                    Ok(lu) => last_update = lu,
                    Err(e) => tracing::warn!(%pg, "bad last_update in PG metadata: {e}"),
                }
            } else if k.starts_with(KEY_DUP_PREFIX) {
                match postcard::from_bytes::<DupEntry>(&v) {
                    Ok(d) => dups.push(d),
                    Err(e) => tracing::warn!(%pg, key = %k, "bad remembered reply in PG metadata: {e}"),
                }
            }
        }
    }
    (last_update, dups)
}

/// Replaces the PG metadata wholesale (peering adopts another OSD's).
#[doc(hidden)] // Public for the peer_msg fuzz target.
pub fn meta_replace_txn(pg: PgId, last_update: Eversion, dups: &[DupEntry]) -> Transaction {
    let mut t = Transaction::new();
    t.touch(meta_oid(pg));
    t.omap_clear(meta_oid(pg));
    let mut pairs = vec![(KEY_LAST_UPDATE.to_string(), encode(&last_update))];
    pairs.extend(dups.iter().map(|d| (dup_key(d.version), encode(d))));
    t.omap_set(meta_oid(pg), pairs);
    t
}

/// Reads a whole object for recovery: its copy description and its data.
fn read_copy(
    store: &dyn ObjectStore,
    pg: PgId,
    name: &str,
) -> Result<Option<(ObjectCopy, Bytes)>, StoreError> {
    let st = match store.stat(pg, name) {
        Ok(st) => st,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let data = store.read(pg, name, 0, st.size)?;
    assert_eq!(data.len() as u64, st.size, "a whole-object read returns the whole object");
    let attrs = store.getattrs(pg, name)?.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
    let omap = store.omap_list(pg, name, None, usize::MAX)?;
    Ok(Some((ObjectCopy { version: st.version, size: st.size, attrs, omap }, data)))
}

/// The transaction that makes the local copy of `name` equal to `copy` (or absent).
#[doc(hidden)] // Public for the peer_msg fuzz target.
pub fn copy_txn(
    pg: PgId,
    name: &str,
    exists_locally: bool,
    copy: Option<&ObjectCopy>,
    data: CrcBytes,
) -> Result<Transaction, String> {
    let oid = ObjectId::new(pg, name);
    let mut t = Transaction::new();
    if exists_locally {
        t.remove(oid.clone());
    }
    match copy {
        None => {
            if !data.is_empty() {
                return Err(format!("removal of {oid} carries {} data bytes", data.len()));
            }
        }
        Some(c) => {
            if data.len() as u64 != c.size {
                return Err(format!("copy of {oid} has {} data bytes for a size of {}", data.len(), c.size));
            }
            t.touch(oid.clone());
            if !data.is_empty() {
                t.write(oid.clone(), 0, data);
            }
            for (k, v) in &c.attrs {
                t.setattr(oid.clone(), k.clone(), Bytes::copy_from_slice(v));
            }
            if !c.omap.is_empty() {
                t.omap_set(oid.clone(), c.omap.clone());
            }
            t.set_version(oid, c.version);
        }
    }
    Ok(t)
}

/// Outputs of a write as remembered for resends: read data inside a write request is not kept.
fn dup_outs(outs: &[OpOut]) -> Vec<OpOut> {
    outs.iter().map(|o| if let OpOut::Data { .. } = o { OpOut::Data { len: 0 } } else { o.clone() }).collect()
}

impl<C> Pg<C> {
    pub fn new(pgid: PgId, whoami: OsdId, store: Arc<dyn ObjectStore>, limits: OpLimits) -> Pg<C> {
        Pg {
            pgid,
            whoami,
            store,
            limits,
            view: None,
            interval: Epoch(0),
            state: PgState::Stray,
            peering_round: 0,
            peering: None,
            last_update: Eversion::ZERO,
            dups: Dups::default(),
            in_flight: BTreeMap::new(),
            in_flight_reqids: HashMap::new(),
            writes_in_flight: HashMap::new(),
            blocked: HashMap::new(),
            waiting: VecDeque::new(),
            next_seq: 0,
            activated: None,
            stale_told: None,
            outputs: VecDeque::new(),
            after_commit: VecDeque::new(),
            last_queued: CommitSeq(0),
            full: None,
            store_backlog: VecDeque::new(),
            backlog_retry: false,
            last_slow_log: None,
        }
    }

    pub fn pgid(&self) -> PgId {
        self.pgid
    }

    pub fn state(&self) -> PgState {
        self.state
    }

    /// The epoch at which the current interval began.
    pub fn interval(&self) -> Epoch {
        self.interval
    }

    /// Writes sent to replicas and not yet acknowledged by all of them.
    pub fn writes_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Ops held: waiting for activation, for an object's writes, or in flight.
    pub fn ops_held(&self) -> usize {
        self.waiting.len()
            + self.store_backlog.iter().filter(|b| matches!(b, Backlogged::Op(_))).count()
            + self.blocked.values().map(|q| q.len()).sum::<usize>()
            + self.in_flight.values().map(|f| f.waiters.len()).sum::<usize>()
    }

    pub fn poll_output(&mut self) -> Option<PgOutput<C>> {
        self.outputs.pop_front()
    }

    /// The acting set of the PG's current map, primary first (empty before the first map).
    pub fn acting(&self) -> &[OsdId] {
        self.view.as_ref().map_or(&[], |v| v.acting.as_slice())
    }

    /// Which OSD, if any, is too full to take writes that add data (see [`Pg::handle_client_op`]): set by the
    /// shard from its store's use and the map's full OSDs. A replica that is full must stop writes at the
    /// primary: one it cannot apply would make it diverge and the PG peer again.
    pub fn set_full(&mut self, full: Option<OsdId>) {
        self.full = full;
    }

    /// Whether the PG waits for the store to commit something: call [`Pg::handle_commit`] when it has.
    pub fn awaits_commit(&self) -> bool {
        // Local commits come in queue order, which is version order: if any write waits for ours, the newest does.
        !self.after_commit.is_empty()
            || !self.store_backlog.is_empty()
            || self.in_flight.values().next_back().is_some_and(|f| f.waiting_on.contains(&self.whoami))
    }

    /// The store committed more: releases held outputs and completes writes that waited for their local commit.
    pub fn handle_commit(&mut self, now: Instant) {
        let committed = self.store.committed();
        while self.after_commit.front().is_some_and(|(seq, _)| *seq <= committed) {
            let (_, out) = self.after_commit.pop_front().expect("just looked");
            self.outputs.push_back(out);
        }
        let me = self.whoami;
        let mut any = false;
        for f in self.in_flight.values_mut() {
            if f.commit > committed {
                break;
            }
            any |= f.waiting_on.remove(&me);
        }
        if any {
            self.complete_ready(now);
        }
        self.retry_backlog(now);
    }

    /// Queues a transaction to the store (see [`ObjectStore::queue`]).
    fn queue(&mut self, txn: &Transaction) -> Result<CommitSeq, StoreError> {
        let seq = self.store.queue(txn)?;
        self.last_queued = self.last_queued.max(seq);
        Ok(seq)
    }

    /// Emits an output that reports or acknowledges this PG's stored state (a replica's answer, a peering
    /// summary, a remembered reply): it leaves once everything the PG has queued so far is durable, so nobody
    /// is ever told of a change that a crash could take back. Held outputs leave in order.
    fn emit_durable(&mut self, out: PgOutput<C>) {
        if self.after_commit.is_empty() && self.store.committed() >= self.last_queued {
            self.outputs.push_back(out);
        } else {
            self.after_commit.push_back((self.last_queued, out));
        }
    }

    fn send_durable(&mut self, to: OsdId, msg: PeerMsg) {
        assert_ne!(to, self.whoami, "a PG never messages its own OSD");
        self.emit_durable(PgOutput::Send { to, msg });
    }

    /// The PG's stats for the monitor, when this OSD is its primary.
    pub fn stat(&self) -> Option<PgStat> {
        let view = self.view.as_ref()?;
        let pool = view.pool?;
        if view.primary != Some(self.whoami) {
            return None;
        }
        let usage = self.store.pg_usage(self.pgid);
        let meta = u64::from(self.store.stat(self.pgid, META_OBJECT).is_ok());
        Some(PgStat {
            pgid: self.pgid,
            acting_up: view.acting.len().min(u8::MAX as usize) as u8,
            size: pool.size,
            min_size: pool.min_size,
            objects: usage.objects.saturating_sub(meta),
            bytes: usage.bytes,
        })
    }

    fn epoch(&self) -> Epoch {
        self.view.as_ref().map_or(Epoch(0), |v| v.epoch)
    }

    fn replicas(&self) -> Vec<OsdId> {
        self.view
            .as_ref()
            .map_or_else(Vec::new, |v| v.acting.iter().copied().filter(|&o| o != self.whoami).collect())
    }

    fn send(&mut self, to: OsdId, msg: PeerMsg) {
        assert_ne!(to, self.whoami, "a PG never messages its own OSD");
        self.outputs.push_back(PgOutput::Send { to, msg });
    }

    fn reply_err(&mut self, ctx: C, req: &OsdOpRequest, e: OsdError, version: u64) {
        let reply =
            OsdOpReply { tid: req.reqid.tid, epoch: self.epoch(), result: Err(e), version, outs: Vec::new() };
        self.outputs.push_back(PgOutput::Reply { ctx, reply, data: Vec::new() });
    }

    fn answer(&mut self, w: Waiting<C>, e: OsdError) {
        match w.item {
            Item::Op(op) => self.reply_err(op.ctx, &op.req, e, 0),
            Item::List(l) => {
                let reply = OsdCommandReply { result: Err(e), next: None };
                self.outputs.push_back(PgOutput::ListReply { ctx: l.ctx, reply });
            }
        }
    }

    fn set_state(&mut self, s: PgState) {
        let was_active = self.state == PgState::Active;
        self.state = s;
        if was_active != (s == PgState::Active) {
            self.outputs.push_back(PgOutput::StateChanged);
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Map changes.

    /// A new map. Starts a new interval when the PG's placement changed: ops in flight go back to the queue
    /// (or are answered `Misdirected` if this OSD is no longer the primary) and the primary peers.
    pub fn handle_map(&mut self, now: Instant, view: PgMapView) {
        assert!(self.view.as_ref().is_none_or(|v| v.epoch <= view.epoch), "maps only move forward");
        let changed = self.view.as_ref().is_none_or(|old| !old.same_interval(&view));
        let epoch = view.epoch;
        self.view = Some(view);
        if !changed {
            return;
        }
        let view = self.view.clone().expect("just set");
        let old_interval = self.interval;
        self.interval = epoch;
        self.peering = None;
        self.activated = None;
        let held = self.take_held();
        let Some(pool) = view.pool else {
            // The pool was deleted: nothing here will ever be served again.
            self.set_state(PgState::Stray);
            for w in held {
                self.answer(w, OsdError::NoSuchPool(self.pgid.pool));
            }
            return;
        };
        let role = if view.primary == Some(self.whoami) {
            PgState::Inactive
        } else if view.acting.contains(&self.whoami) {
            PgState::Replica
        } else {
            PgState::Stray
        };
        tracing::debug!(pg = %self.pgid, ?role, acting = ?view.acting, from = %old_interval, to = %epoch, "new interval");
        self.set_state(role);
        if role != PgState::Inactive {
            for w in held {
                self.answer(w, OsdError::Misdirected(epoch));
            }
            return;
        }
        self.waiting = held.into();
        if view.acting.len() >= usize::from(pool.min_size) {
            self.start_peering(now);
        } else {
            tracing::info!(
                pg = %self.pgid, acting = %osd_list(&view.acting), min_size = pool.min_size,
                "fewer OSDs up than min_size: ops wait"
            );
        }
    }

    /// Every op the PG holds, in arrival order, with in-flight bookkeeping cleared.
    fn take_held(&mut self) -> Vec<Waiting<C>> {
        let mut all: Vec<Waiting<C>> = Vec::new();
        for (_, f) in std::mem::take(&mut self.in_flight) {
            all.extend(f.waiters);
        }
        self.in_flight_reqids.clear();
        self.writes_in_flight.clear();
        for (_, q) in self.blocked.drain() {
            all.extend(q);
        }
        all.extend(self.waiting.drain(..));
        // Backlogged replicated writes belong to the interval that is over: the new primary peers again.
        for b in self.store_backlog.drain(..) {
            if let Backlogged::Op(w) = b {
                all.push(w);
            }
        }
        all.sort_by_key(|w| w.seq);
        all
    }

    // -----------------------------------------------------------------------------------------------------------
    // Client ops.

    pub fn handle_client_op(&mut self, now: Instant, op: ClientOp<C>) {
        if let Err(e) = self.limits.check_name(&op.req.oid) {
            return self.reply_err(op.ctx, &op.req, e, 0);
        }
        if self.ops_held() >= WAITING_OPS_MAX {
            tracing::warn!(pg = %self.pgid, "too many ops held; refusing one");
            let e = OsdError::Io(format!("pg {} has too many ops waiting", self.pgid));
            return self.reply_err(op.ctx, &op.req, e, 0);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enqueue(now, Waiting { seq, since: now, item: Item::Op(op) });
    }

    pub fn handle_list(&mut self, now: Instant, op: ListOp<C>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enqueue(now, Waiting { seq, since: now, item: Item::List(op) });
    }

    fn enqueue(&mut self, now: Instant, w: Waiting<C>) {
        match self.state {
            PgState::Active => self.do_op(now, w),
            PgState::Inactive | PgState::Peering => {
                if self.view.as_ref().is_some_and(|v| v.pool.is_none()) {
                    return self.answer(w, OsdError::NoSuchPool(self.pgid.pool));
                }
                if self.waiting.len() >= WAITING_OPS_MAX {
                    tracing::warn!(pg = %self.pgid, "too many ops waiting for the PG to become active");
                    return self
                        .answer(w, OsdError::Io(format!("pg {} has too many waiting ops", self.pgid)));
                }
                self.waiting.push_back(w);
            }
            PgState::Replica | PgState::Stray => {
                let e = self.epoch();
                self.answer(w, OsdError::Misdirected(e));
            }
        }
    }

    fn do_op(&mut self, now: Instant, w: Waiting<C>) {
        assert_eq!(self.state, PgState::Active);
        if !self.store_backlog.is_empty() && !self.backlog_retry {
            self.store_backlog.push_back(Backlogged::Op(w));
            return;
        }
        let Waiting { seq, since, item } = w;
        let op = match item {
            Item::List(l) => return self.do_list(l),
            Item::Op(op) => op,
        };
        let reqid = op.req.reqid;
        let write = exec::is_write(&op.req.ops);
        // Only writes are remembered: a read is safe to run again, and must not be answered with a write's
        // reply should a client ever reuse a request id.
        if let Some(v) = self.in_flight_reqids.get(&reqid).filter(|_| write) {
            tracing::debug!(pg = %self.pgid, ?reqid, "resent op attached to its first copy in flight");
            let f = self.in_flight.get_mut(v).expect("in_flight_reqids indexes in_flight");
            f.waiters.push(Waiting { seq, since, item: Item::Op(op) });
            return;
        }
        if let Some(d) = self.dups.get(&reqid).filter(|_| write) {
            tracing::debug!(pg = %self.pgid, ?reqid, version = d.version, "resent op answered from its reply");
            let reply = OsdOpReply {
                tid: reqid.tid,
                epoch: self.epoch(),
                result: Ok(()),
                version: d.version,
                outs: d.outs.clone(),
            };
            // The write it remembers may have been queued by this PG (a write re-run after peering) and not be
            // durable yet.
            self.emit_durable(PgOutput::Reply { ctx: op.ctx, reply, data: Vec::new() });
            return;
        }
        let name = &op.req.oid;
        if self.blocked.contains_key(name) || (!write && self.writes_in_flight.contains_key(name)) {
            let name = name.clone();
            self.blocked.entry(name).or_default().push_back(Waiting { seq, since, item: Item::Op(op) });
            return;
        }
        self.execute(now, seq, since, op);
    }

    fn execute(&mut self, now: Instant, seq: u64, since: Instant, op: ClientOp<C>) {
        let next = Eversion { epoch: self.interval, v: self.last_update.v + 1 };
        let write = exec::is_write(&op.req.ops);
        let adds_data = write && !exec::frees_only(&op.req.ops);
        if let Some(osd) = self.full.filter(|_| adds_data) {
            let e = OsdError::NoSpace(format!("{osd} is full; delete data to free space"));
            let version = self.store.stat(self.pgid, &op.req.oid).map_or(0, |s| s.version.v);
            return self.reply_err(op.ctx, &op.req, e, version);
        }
        let result =
            exec::execute(&*self.store, self.pgid, &op.req.oid, &op.req.ops, &op.data, &self.limits, next);
        let ex = match result {
            Ok(ex) => ex,
            Err(e) => {
                let version = self.store.stat(self.pgid, &op.req.oid).map_or(0, |s| s.version.v);
                return self.reply_err(op.ctx, &op.req, e, version);
            }
        };
        if !write {
            let reply = OsdOpReply {
                tid: op.req.reqid.tid,
                epoch: self.epoch(),
                result: Ok(()),
                version: ex.version_before,
                outs: ex.outs,
            };
            self.outputs.push_back(PgOutput::Reply { ctx: op.ctx, reply, data: ex.data });
            return;
        }

        let reqid = op.req.reqid;
        let dup = DupEntry { reqid, version: next.v, outs: dup_outs(&ex.outs) };
        let mut txn = ex.txn;
        let meta = meta_oid(self.pgid);
        txn.touch(meta.clone());
        txn.omap_set(
            meta.clone(),
            vec![(KEY_LAST_UPDATE.into(), encode(&next)), (dup_key(next.v), encode(&dup))],
        );
        if next.v > DUPS_MAX {
            txn.omap_rm(meta, vec![dup_key(next.v - DUPS_MAX)]);
        }
        let commit = match self.queue(&txn) {
            Ok(seq) => seq,
            Err(StoreError::Busy(_)) => {
                // Nothing changed: the op runs again, in its place, after the next commit.
                let w = Waiting { seq, since, item: Item::Op(op) };
                if self.backlog_retry {
                    self.store_backlog.push_front(Backlogged::Op(w));
                } else {
                    self.store_backlog.push_back(Backlogged::Op(w));
                }
                return;
            }
            Err(e) => {
                tracing::error!(pg = %self.pgid, oid = %op.req.oid, "local apply failed: {e}");
                return self.reply_err(op.ctx, &op.req, exec::store_err(e), ex.version_before);
            }
        };
        assert!(next > self.last_update, "PG versions only grow");
        self.last_update = next;
        self.dups.insert(dup);
        let reply = OsdOpReply {
            tid: reqid.tid,
            epoch: self.epoch(),
            result: Ok(()),
            version: next.v,
            outs: ex.outs,
        };
        let replicas = self.replicas();
        let name = op.req.oid.clone();
        let waiters = vec![Waiting { seq, since, item: Item::Op(op) }];
        let mut waiting_on: BTreeSet<OsdId> = replicas.iter().copied().collect();
        if self.store.committed() < commit {
            waiting_on.insert(self.whoami);
        }
        let f = InFlight { reqid, sent_at: now, name, commit, waiting_on, reply, data: ex.data, waiters };
        if f.waiting_on.is_empty() {
            return self.complete(f);
        }
        let (ops, payload) = txn.to_wire();
        for &r in &replicas {
            let m = RepOp { pgid: self.pgid, epoch: self.interval, version: next, reqid, ops: ops.clone() };
            self.send(r, PeerMsg::RepOp(m, payload.clone()));
        }
        *self.writes_in_flight.entry(f.name.clone()).or_default() += 1;
        self.in_flight_reqids.insert(reqid, next);
        assert!(self.in_flight.insert(next, f).is_none(), "one write per version");
    }

    /// Answers every copy of a completed write.
    fn complete(&mut self, f: InFlight<C>) {
        for w in f.waiters {
            let Item::Op(op) = w.item else { unreachable!("only client ops are in flight") };
            let mut reply = f.reply.clone();
            reply.tid = op.req.reqid.tid;
            self.outputs.push_back(PgOutput::Reply { ctx: op.ctx, reply, data: f.data.clone() });
        }
    }

    /// Completes writes from the oldest on while every replica has applied them, then lets ops waiting for
    /// those objects go.
    fn complete_ready(&mut self, now: Instant) {
        let mut freed: Vec<String> = Vec::new();
        while let Some(entry) = self.in_flight.first_entry() {
            if !entry.get().waiting_on.is_empty() {
                break;
            }
            let f = entry.remove();
            self.in_flight_reqids.remove(&f.reqid);
            let n = self.writes_in_flight.get_mut(&f.name).expect("counted when sent");
            *n -= 1;
            if *n == 0 {
                self.writes_in_flight.remove(&f.name);
                freed.push(f.name.clone());
            }
            self.complete(f);
        }
        for name in freed {
            self.unblock(now, &name);
        }
    }

    fn unblock(&mut self, now: Instant, name: &str) {
        let Some(mut q) = self.blocked.remove(name) else { return };
        while let Some(w) = q.pop_front() {
            if self.state != PgState::Active {
                self.waiting.push_back(w);
                continue;
            }
            self.do_op(now, w);
            if let Some(again) = self.blocked.get_mut(name) {
                // It waits again (a read behind a write it let through): the rest stay behind it.
                again.extend(q);
                return;
            }
        }
    }

    fn do_list(&mut self, l: ListOp<C>) {
        let max = if l.req.max == 0 { LIST_PAGE_MAX } else { (l.req.max as usize).min(LIST_PAGE_MAX) };
        let after = l.req.after.as_deref();
        // One more than asked, to know whether there is a next page; the metadata object is skipped.
        let mut names: Vec<String> = self
            .store
            .list(self.pgid, after, max + 2)
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != META_OBJECT)
            .collect();
        let next = if names.len() > max {
            names.truncate(max);
            names.last().cloned()
        } else {
            None
        };
        let reply = OsdCommandReply { result: Ok(names), next };
        self.outputs.push_back(PgOutput::ListReply { ctx: l.ctx, reply });
    }

    // -----------------------------------------------------------------------------------------------------------
    // Peer messages.

    pub fn handle_peer(&mut self, now: Instant, from: OsdId, msg: PeerMsg) {
        assert_eq!(msg.pgid(), self.pgid, "routed to the wrong PG");
        match msg {
            PeerMsg::RepOp(m, data) => self.handle_rep_op(from, m, data),
            PeerMsg::RepOpReply(m) => self.handle_rep_op_reply(now, from, m),
            PeerMsg::Query(m) => self.handle_query(from, m),
            PeerMsg::Info(m) => self.handle_info(now, from, m),
            PeerMsg::Pull(m) => self.handle_pull(from, m),
            PeerMsg::PullReply(m, data) => self.handle_pull_reply(now, from, m, data),
            PeerMsg::Push(m, data) => self.handle_push(from, m, data),
            PeerMsg::PushReply(m) => self.handle_push_reply(now, from, m),
            PeerMsg::Activate(m) => self.handle_activate(from, m),
            PeerMsg::NewInterval(m) => self.handle_new_interval(now, from, m),
        }
    }

    /// Whether a message is from the primary of this OSD's current interval (a deposed primary's are not).
    /// When our own primary writes from an interval we consider over, it missed the map epochs that ended it
    /// (the MonClient hands over only the newest of several maps): we tell it, and it peers again.
    fn is_from_my_primary(&mut self, from: OsdId, epoch: Epoch, what: &str) -> bool {
        let mine = self.view.as_ref().is_some_and(|v| v.primary == Some(from));
        let ok = self.state == PgState::Replica && mine && epoch >= self.interval;
        if !ok {
            tracing::debug!(
                pg = %self.pgid, %from, %epoch, interval = %self.interval, state = ?self.state,
                "dropping {what} from an OSD that is not my primary in this interval"
            );
            if self.state == PgState::Replica && mine && self.stale_told != Some(epoch) {
                self.stale_told = Some(epoch);
                let m = PgNewInterval { pgid: self.pgid, epoch: self.interval };
                self.send(from, PeerMsg::NewInterval(m));
            }
        }
        ok
    }

    /// The session with `osd` was reset: messages queued to it may be lost. A primary peers again with it.
    pub fn handle_peer_reset(&mut self, now: Instant, osd: OsdId) {
        let acting = self.view.as_ref().is_some_and(|v| v.acting.contains(&osd));
        if acting && osd != self.whoami && matches!(self.state, PgState::Peering | PgState::Active) {
            tracing::info!(pg = %self.pgid, peer = %osd, "session with a replica was reset; peering again");
            self.restart_peering(now);
        }
    }

    fn handle_new_interval(&mut self, now: Instant, from: OsdId, m: PgNewInterval) {
        let acting = self.view.as_ref().is_some_and(|v| v.acting.contains(&from));
        if !acting || m.epoch <= self.interval || !matches!(self.state, PgState::Peering | PgState::Active) {
            return;
        }
        tracing::info!(
            pg = %self.pgid, %from, ours = %self.interval, theirs = %m.epoch,
            "a replica saw the interval change where we did not; peering again"
        );
        self.interval = m.epoch;
        self.restart_peering(now);
    }

    fn handle_rep_op(&mut self, from: OsdId, m: RepOp, data: CrcBytes) {
        if !self.is_from_my_primary(from, m.epoch, "rep_op") {
            return;
        }
        if self.activated != Some(m.epoch) {
            tracing::warn!(pg = %self.pgid, %from, epoch = %m.epoch, "rep_op before activation; dropped");
            return;
        }
        let txn = Transaction::from_wire(m.ops, data).and_then(|t| {
            if t.ops().iter().any(|op| !op_in_pg(op, self.pgid)) {
                return Err(StoreError::Invalid("transaction touches another PG".into()));
            }
            Ok(t)
        });
        match txn {
            Ok(txn) => self.apply_rep_op(from, m.epoch, m.version, txn),
            Err(e) => self.answer_rep_op(from, m.epoch, m.version, Err(e)),
        }
    }

    /// Queues a replicated write, in arrival order behind any the store had no room for yet.
    fn apply_rep_op(&mut self, from: OsdId, epoch: Epoch, version: Eversion, txn: Transaction) {
        if !self.store_backlog.is_empty() {
            self.store_backlog.push_back(Backlogged::RepOp { from, epoch, version, txn });
            return;
        }
        match self.queue(&txn) {
            Err(StoreError::Busy(_)) => {
                self.store_backlog.push_back(Backlogged::RepOp { from, epoch, version, txn })
            }
            r => self.answer_rep_op(from, epoch, version, r.map(|_| ())),
        }
    }

    fn answer_rep_op(&mut self, from: OsdId, epoch: Epoch, version: Eversion, r: Result<(), StoreError>) {
        let result = r.map_err(|e| {
            tracing::error!(pg = %self.pgid, %from, %version, "cannot apply rep_op: {e}");
            e.to_string()
        });
        let reply = RepOpReply { pgid: self.pgid, epoch, version, result };
        // The primary counts this as our copy: it leaves once the write is durable here.
        self.send_durable(from, PeerMsg::RepOpReply(reply));
    }

    /// Runs again what waited for room in the store's commit queue, in order, until it is full again.
    fn retry_backlog(&mut self, now: Instant) {
        while let Some(b) = self.store_backlog.pop_front() {
            let before = self.store_backlog.len();
            match b {
                Backlogged::Op(w) => {
                    if self.state != PgState::Active {
                        self.waiting.push_back(w);
                        continue;
                    }
                    self.backlog_retry = true;
                    self.do_op(now, w);
                    self.backlog_retry = false;
                }
                Backlogged::RepOp { from, epoch, version, txn } => {
                    if self.activated != Some(epoch) {
                        continue; // its interval is over: the primary peers again
                    }
                    match self.queue(&txn) {
                        Err(StoreError::Busy(_)) => {
                            self.store_backlog.push_front(Backlogged::RepOp { from, epoch, version, txn })
                        }
                        r => self.answer_rep_op(from, epoch, version, r.map(|_| ())),
                    }
                }
            }
            if self.store_backlog.len() > before {
                return; // the store is full again; what just went back waits for the next commit
            }
        }
    }

    fn handle_rep_op_reply(&mut self, now: Instant, from: OsdId, m: RepOpReply) {
        if self.state != PgState::Active || m.epoch != self.interval {
            return;
        }
        if let Err(e) = m.result {
            tracing::warn!(pg = %self.pgid, %from, version = %m.version, "replica failed a write ({e}); peering again");
            return self.restart_peering(now);
        }
        match self.in_flight.get_mut(&m.version) {
            Some(f) => {
                f.waiting_on.remove(&from);
            }
            None => {
                tracing::debug!(pg = %self.pgid, %from, version = %m.version, "reply for no write in flight")
            }
        }
        self.complete_ready(now);
    }

    fn handle_query(&mut self, from: OsdId, m: PgQuery) {
        if !self.is_from_my_primary(from, m.epoch, "pg_query") {
            return;
        }
        let info = self.summary_page(m.epoch, m.round, m.after.as_deref());
        // Peering decides from summaries: they describe only what a crash here cannot take back.
        self.send_durable(from, PeerMsg::Info(info));
    }

    /// One page of this OSD's summary of the PG.
    fn summary_page(&self, epoch: Epoch, round: u32, after: Option<&str>) -> PgInfo {
        let (last_update, dups) =
            if after.is_none() { load_meta(&*self.store, self.pgid) } else { (Eversion::ZERO, Vec::new()) };
        let mut raw = self.store.list(self.pgid, after, SUMMARY_PAGE_OBJECTS + 1);
        let next = if raw.len() > SUMMARY_PAGE_OBJECTS {
            raw.truncate(SUMMARY_PAGE_OBJECTS);
            raw.last().map(|e| e.name.clone())
        } else {
            None
        };
        let objects: Vec<(String, Eversion)> =
            raw.into_iter().filter(|e| e.name != META_OBJECT).map(|e| (e.name, e.version)).collect();
        PgInfo { pgid: self.pgid, epoch, round, last_update, dups, objects, next }
    }

    fn local_summary(&self) -> Summary {
        let mut s = Summary::default();
        let mut after: Option<String> = None;
        loop {
            let page = self.summary_page(self.interval, 0, after.as_deref());
            if after.is_none() {
                s.last_update = page.last_update;
                s.dups = page.dups;
            }
            s.objects.extend(page.objects);
            match page.next {
                Some(n) => after = Some(n),
                None => return s,
            }
        }
    }

    fn handle_pull(&mut self, from: OsdId, m: PgPull) {
        if !self.is_from_my_primary(from, m.epoch, "pg_pull") {
            return;
        }
        let (copy, data) = match read_copy(&*self.store, self.pgid, &m.name) {
            Ok(Some((c, d))) => (Some(c), d),
            Ok(None) => (None, Bytes::new()),
            Err(e) => {
                tracing::error!(pg = %self.pgid, name = %m.name, "cannot read object for recovery: {e}");
                return;
            }
        };
        let push = PgPush { pgid: self.pgid, epoch: m.epoch, round: m.round, name: m.name, copy };
        self.send(from, PeerMsg::PullReply(push, data.into()));
    }

    fn handle_push(&mut self, from: OsdId, m: PgPush, data: CrcBytes) {
        if !self.is_from_my_primary(from, m.epoch, "pg_push") {
            return;
        }
        let exists = self.store.stat(self.pgid, &m.name).is_ok();
        match copy_txn(self.pgid, &m.name, exists, m.copy.as_ref(), data) {
            Ok(t) => {
                if let Err(e) = self.queue(&t) {
                    tracing::error!(pg = %self.pgid, name = %m.name, "cannot apply pushed copy: {e}");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(pg = %self.pgid, %from, "bad push: {e}");
                return;
            }
        }
        let reply = PgPushReply { pgid: self.pgid, epoch: m.epoch, round: m.round, name: m.name };
        self.send_durable(from, PeerMsg::PushReply(reply));
    }

    fn handle_activate(&mut self, from: OsdId, m: PgActivate) {
        if !self.is_from_my_primary(from, m.epoch, "pg_activate") {
            return;
        }
        if let Err(e) = self.queue(&meta_replace_txn(self.pgid, m.last_update, &m.dups)) {
            tracing::error!(pg = %self.pgid, "cannot store PG metadata: {e}");
            return;
        }
        tracing::debug!(pg = %self.pgid, %from, epoch = %m.epoch, last_update = %m.last_update, "activated as replica");
        self.activated = Some(m.epoch);
    }

    // -----------------------------------------------------------------------------------------------------------
    // Peering (primary).

    fn start_peering(&mut self, now: Instant) {
        assert_eq!(self.view.as_ref().and_then(|v| v.primary), Some(self.whoami));
        self.peering_round += 1;
        let round = self.peering_round;
        self.set_state(PgState::Peering);
        let mut p = Peering {
            round,
            since: now,
            phase: Phase::GetInfo,
            infos: BTreeMap::new(),
            partial: BTreeMap::new(),
            auth: None,
            to_pull: VecDeque::new(),
            pulling: BTreeSet::new(),
            to_push: BTreeMap::new(),
            pushing: BTreeMap::new(),
            last_log: now,
        };
        p.infos.insert(self.whoami, self.local_summary());
        for r in self.replicas() {
            p.partial.insert(r, Summary::default());
            let q = PgQuery { pgid: self.pgid, epoch: self.interval, round, after: None };
            self.send(r, PeerMsg::Query(q));
        }
        tracing::debug!(pg = %self.pgid, interval = %self.interval, round, "peering");
        self.peering = Some(p);
        self.advance_peering(now);
    }

    /// Back to the queue with everything in flight, and peer again (a replica could not apply a write).
    fn restart_peering(&mut self, now: Instant) {
        let held = self.take_held();
        self.waiting = held.into();
        self.peering = None;
        self.start_peering(now);
    }

    fn peering_msg_ok(&self, epoch: Epoch, round: u32, phase: Phase) -> bool {
        self.state == PgState::Peering
            && epoch == self.interval
            && self.peering.as_ref().is_some_and(|p| p.round == round && p.phase == phase)
    }

    fn handle_info(&mut self, now: Instant, from: OsdId, m: PgInfo) {
        if !self.peering_msg_ok(m.epoch, m.round, Phase::GetInfo) {
            return;
        }
        let p = self.peering.as_mut().expect("checked");
        let Some(s) = p.partial.get_mut(&from) else { return };
        // Only the first page carries the metadata; later pages have none.
        s.last_update = s.last_update.max(m.last_update);
        s.dups.extend(m.dups);
        s.objects.extend(m.objects);
        match m.next {
            Some(after) => {
                let q = PgQuery { pgid: self.pgid, epoch: self.interval, round: m.round, after: Some(after) };
                self.send(from, PeerMsg::Query(q));
            }
            None => {
                let s = p.partial.remove(&from).expect("present");
                p.infos.insert(from, s);
                self.advance_peering(now);
            }
        }
    }

    fn handle_pull_reply(&mut self, now: Instant, from: OsdId, m: PgPush, data: CrcBytes) {
        if !self.peering_msg_ok(m.epoch, m.round, Phase::Pull) {
            return;
        }
        let p = self.peering.as_mut().expect("checked");
        if p.auth != Some(from) || !p.pulling.remove(&m.name) {
            return;
        }
        let auth = p.auth.expect("set in the pull phase");
        let want = p.infos[&auth].objects.get(&m.name).copied();
        if m.copy.as_ref().map(|c| c.version) != want {
            tracing::warn!(pg = %self.pgid, %from, name = %m.name, "pulled copy is not the summarised version; peering again");
            return self.restart_peering(now);
        }
        let exists = self.store.stat(self.pgid, &m.name).is_ok();
        let applied = copy_txn(self.pgid, &m.name, exists, m.copy.as_ref(), data)
            .map_err(|e| e.to_string())
            .and_then(|t| self.queue(&t).map(|_| ()).map_err(|e| e.to_string()));
        if let Err(e) = applied {
            tracing::error!(pg = %self.pgid, name = %m.name, "cannot apply pulled copy: {e}; peering again");
            return self.restart_peering(now);
        }
        self.advance_peering(now);
    }

    fn handle_push_reply(&mut self, now: Instant, from: OsdId, m: PgPushReply) {
        if !self.peering_msg_ok(m.epoch, m.round, Phase::Push) {
            return;
        }
        let p = self.peering.as_mut().expect("checked");
        if !p.pushing.get_mut(&from).is_some_and(|s| s.remove(&m.name)) {
            return;
        }
        self.advance_peering(now);
    }

    /// Moves peering forward as far as the answers so far allow, sending what the next step needs.
    fn advance_peering(&mut self, now: Instant) {
        loop {
            let Some(p) = self.peering.as_mut() else { return };
            match p.phase {
                Phase::GetInfo => {
                    if !p.partial.is_empty() {
                        return;
                    }
                    let me = self.whoami;
                    let (&auth, best) = p
                        .infos
                        .iter()
                        .max_by(|(a, sa), (b, sb)| {
                            sa.last_update
                                .cmp(&sb.last_update)
                                .then((**a == me).cmp(&(**b == me)))
                                .then(b.cmp(a))
                        })
                        .expect("the primary's own summary is always there");
                    let best = best.clone();
                    p.auth = Some(auth);
                    p.phase = Phase::Pull;
                    if auth != me {
                        let mine = &p.infos[&me].objects;
                        p.to_pull = best
                            .objects
                            .iter()
                            .filter(|(n, v)| mine.get(*n) != Some(v))
                            .map(|(n, _)| n.clone())
                            .collect();
                        let stale: Vec<String> =
                            mine.keys().filter(|n| !best.objects.contains_key(*n)).cloned().collect();
                        tracing::info!(
                            pg = %self.pgid, %auth, last_update = %best.last_update,
                            pulls = p.to_pull.len(), removes = stale.len(), "recovering from the authoritative peer"
                        );
                        for chunk in stale.chunks(1024) {
                            let mut t = Transaction::new();
                            for n in chunk {
                                t.remove(ObjectId::new(self.pgid, n.clone()));
                            }
                            match self.store.queue(&t) {
                                Ok(seq) => self.last_queued = self.last_queued.max(seq),
                                Err(e) => {
                                    tracing::error!(pg = %self.pgid, "cannot remove stale objects: {e}")
                                }
                            }
                        }
                    }
                }
                Phase::Pull => {
                    let auth = p.auth.expect("chosen in GetInfo");
                    while p.pulling.len() < RECOVERY_OPS_MAX {
                        let Some(name) = p.to_pull.pop_front() else { break };
                        p.pulling.insert(name.clone());
                        let m = PgPull { pgid: self.pgid, epoch: self.interval, round: p.round, name };
                        self.outputs.push_back(PgOutput::Send { to: auth, msg: PeerMsg::Pull(m) });
                    }
                    if !p.pulling.is_empty() {
                        return;
                    }
                    let me = self.whoami;
                    if auth != me {
                        let best = p.infos[&auth].clone();
                        match self.store.queue(&meta_replace_txn(self.pgid, best.last_update, &best.dups)) {
                            Ok(seq) => self.last_queued = self.last_queued.max(seq),
                            Err(e) => tracing::error!(pg = %self.pgid, "cannot store PG metadata: {e}"),
                        }
                        p.infos.insert(me, best);
                    }
                    let mine = p.infos[&me].objects.clone();
                    for (&r, theirs) in &p.infos {
                        if r == me {
                            continue;
                        }
                        let mut diff: VecDeque<String> = mine
                            .iter()
                            .filter(|(n, v)| theirs.objects.get(*n) != Some(v))
                            .map(|(n, _)| n.clone())
                            .collect();
                        diff.extend(theirs.objects.keys().filter(|n| !mine.contains_key(*n)).cloned());
                        if !diff.is_empty() {
                            tracing::info!(pg = %self.pgid, to = %r, objects = diff.len(), "pushing to a replica");
                        }
                        p.to_push.insert(r, diff);
                        p.pushing.insert(r, BTreeSet::new());
                    }
                    p.phase = Phase::Push;
                }
                Phase::Push => {
                    let mut sends: Vec<(OsdId, String)> = Vec::new();
                    for (r, q) in p.to_push.iter_mut() {
                        let busy = p.pushing.get_mut(r).expect("one per replica");
                        while busy.len() < RECOVERY_OPS_MAX {
                            let Some(name) = q.pop_front() else { break };
                            busy.insert(name.clone());
                            sends.push((*r, name));
                        }
                    }
                    let round = p.round;
                    let done = p.pushing.values().all(|s| s.is_empty());
                    for (to, name) in sends {
                        let (copy, data) = match read_copy(&*self.store, self.pgid, &name) {
                            Ok(Some((c, d))) => (Some(c), d),
                            Ok(None) => (None, Bytes::new()),
                            Err(e) => {
                                tracing::error!(pg = %self.pgid, %name, "cannot read object to push: {e}");
                                (None, Bytes::new())
                            }
                        };
                        let m = PgPush { pgid: self.pgid, epoch: self.interval, round, name, copy };
                        self.send(to, PeerMsg::Push(m, data.into()));
                    }
                    if !done {
                        return;
                    }
                    return self.activate(now);
                }
            }
        }
    }

    fn activate(&mut self, now: Instant) {
        let p = self.peering.take().expect("activating a peering PG");
        let (last_update, dups) = load_meta(&*self.store, self.pgid);
        assert_eq!(last_update, p.infos[&self.whoami].last_update, "adopted the authoritative metadata");
        for r in self.replicas() {
            let m = PgActivate {
                pgid: self.pgid,
                epoch: self.interval,
                round: p.round,
                last_update,
                dups: dups.clone(),
            };
            self.send(r, PeerMsg::Activate(m));
        }
        self.last_update = last_update;
        self.dups = Dups::from_entries(dups);
        tracing::info!(
            pg = %self.pgid, interval = %self.interval, %last_update, acting = %self.view.as_ref().map_or_else(String::new, |v| osd_list(&v.acting)),
            took_ms = now.saturating_duration_since(p.since).as_millis() as u64, "active"
        );
        self.set_state(PgState::Active);
        let waiting: Vec<Waiting<C>> = self.waiting.drain(..).collect();
        for w in waiting {
            if self.state != PgState::Active {
                self.waiting.push_back(w);
            } else {
                self.do_op(now, w);
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Time.

    /// Logs ops that waited long and peering that takes long; retries peering that is stuck.
    pub fn tick(&mut self, now: Instant) {
        let stuck_peering =
            self.peering.as_ref().is_some_and(|p| now.saturating_duration_since(p.since) >= PEER_RETRY);
        let stuck_write = self.state == PgState::Active
            && self
                .in_flight
                .values()
                .next()
                .is_some_and(|f| now.saturating_duration_since(f.sent_at) >= PEER_RETRY);
        if stuck_peering || stuck_write {
            tracing::warn!(pg = %self.pgid, stuck_peering, stuck_write, "no progress with the replicas; peering again");
            self.restart_peering(now);
        }
        if let Some(p) = self.peering.as_mut() {
            if now.saturating_duration_since(p.last_log) >= SLOW_PEERING {
                p.last_log = now;
                let waiting_for: Vec<OsdId> = match p.phase {
                    Phase::GetInfo => p.partial.keys().copied().collect(),
                    Phase::Pull => p.auth.into_iter().collect(),
                    Phase::Push => p.pushing.iter().filter(|(_, s)| !s.is_empty()).map(|(o, _)| *o).collect(),
                };
                tracing::warn!(
                    pg = %self.pgid, phase = ?p.phase, ?waiting_for,
                    secs = now.saturating_duration_since(p.since).as_secs(), "peering is slow"
                );
            }
        }
        let oldest = self
            .waiting
            .iter()
            .chain(self.blocked.values().flatten())
            .chain(self.in_flight.values().flat_map(|f| f.waiters.iter()))
            .map(|w| w.since)
            .min();
        if let Some(since) = oldest {
            let age = now.saturating_duration_since(since);
            let logged_recently =
                self.last_slow_log.is_some_and(|t| now.saturating_duration_since(t) < SLOW_OP);
            if age >= SLOW_OP && !logged_recently {
                self.last_slow_log = Some(now);
                let waiting_on: BTreeSet<OsdId> =
                    self.in_flight.values().flat_map(|f| f.waiting_on.iter().copied()).collect();
                tracing::warn!(
                    pg = %self.pgid, state = ?self.state, ops = self.ops_held(), oldest_secs = age.as_secs(),
                    ?waiting_on, "slow ops"
                );
            }
        }
    }
}

#[doc(hidden)] // Public for the peer_msg fuzz target.
pub fn op_in_pg(op: &crate::store::TxOp, pg: PgId) -> bool {
    use crate::store::TxOp::*;
    match op {
        Touch { oid }
        | Write { oid, .. }
        | Zero { oid, .. }
        | Truncate { oid, .. }
        | Remove { oid }
        | SetAttr { oid, .. }
        | RmAttr { oid, .. }
        | OmapSet { oid, .. }
        | OmapRm { oid, .. }
        | OmapClear { oid }
        | SetVersion { oid, .. } => oid.pg == pg,
        RemovePg { .. } => false,
    }
}

/// OSD ids as Ceph logs them: `[1,2,0]`.
fn osd_list(osds: &[OsdId]) -> String {
    let ids: Vec<String> = osds.iter().map(|o| o.0.to_string()).collect();
    format!("[{}]", ids.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rados::ids::PoolId;
    use rados::msg::OsdOp;

    use crate::store::{ListEntry, MemStore, ObjectStat, PgUsage};

    /// A MemStore whose commits can be held back, as a slow disk holds them: while `hold` is set, what is queued
    /// is visible but not committed until [`TestStore::commit_all`].
    #[derive(Default)]
    struct TestStore {
        mem: MemStore,
        hold: std::sync::atomic::AtomicBool,
        /// Refuse every transaction with `Busy` (a full commit queue).
        busy: std::sync::atomic::AtomicBool,
        queued: std::sync::atomic::AtomicU64,
        durable: std::sync::atomic::AtomicU64,
    }

    impl TestStore {
        fn commit_all(&self) {
            use std::sync::atomic::Ordering::SeqCst;
            self.durable.store(self.queued.load(SeqCst), SeqCst);
        }
    }

    impl ObjectStore for TestStore {
        fn queue(&self, txn: &Transaction) -> Result<CommitSeq, StoreError> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.busy.load(SeqCst) {
                return Err(StoreError::Busy("commit queue full".into()));
            }
            self.mem.queue(txn)?;
            let seq = self.queued.fetch_add(1, SeqCst) + 1;
            if !self.hold.load(SeqCst) {
                self.durable.store(seq, SeqCst);
            }
            Ok(CommitSeq(seq))
        }
        fn committed(&self) -> CommitSeq {
            CommitSeq(self.durable.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn stat(&self, pg: PgId, name: &str) -> Result<ObjectStat, StoreError> {
            self.mem.stat(pg, name)
        }
        fn read(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
            self.mem.read(pg, name, offset, len)
        }
        fn getattr(&self, pg: PgId, name: &str, attr: &str) -> Result<Bytes, StoreError> {
            self.mem.getattr(pg, name, attr)
        }
        fn getattrs(&self, pg: PgId, name: &str) -> Result<Vec<(String, Bytes)>, StoreError> {
            self.mem.getattrs(pg, name)
        }
        fn omap_get(
            &self,
            pg: PgId,
            name: &str,
            keys: &[String],
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.mem.omap_get(pg, name, keys)
        }
        fn omap_list(
            &self,
            pg: PgId,
            name: &str,
            after: Option<&str>,
            max: usize,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.mem.omap_list(pg, name, after, max)
        }
        fn list(&self, pg: PgId, after: Option<&str>, max: usize) -> Vec<ListEntry> {
            self.mem.list(pg, after, max)
        }
        fn list_pgs(&self) -> Vec<PgId> {
            self.mem.list_pgs()
        }
        fn pg_usage(&self, pg: PgId) -> PgUsage {
            self.mem.pg_usage(pg)
        }
        fn statfs(&self) -> rados::msg::OsdStatfs {
            self.mem.statfs()
        }
    }

    const LIMITS: OpLimits =
        OpLimits { max_object_size: 1 << 20, max_write_size: 1 << 20, max_object_name_len: 64 };

    fn pgid() -> PgId {
        PgId::new(PoolId(1), 0)
    }

    struct Node {
        store: Arc<TestStore>,
        pg: Pg<u64>,
        /// Frozen (SIGSTOP): receives nothing, sends nothing, sees no maps, until thawed.
        frozen: bool,
        /// Messages stamped with an epoch newer than this node's map, waiting for it (the shard does this).
        parked: Vec<(OsdId, PeerMsg)>,
        /// Address generation: bumped when the node restarts.
        generation: u16,
    }

    /// Several OSDs holding one PG, wired by an in-memory FIFO network.
    struct Sim {
        nodes: BTreeMap<OsdId, Node>,
        net: VecDeque<(OsdId, OsdId, PeerMsg)>,
        /// Messages to or from a frozen node, delivered when it thaws.
        held: Vec<(OsdId, OsdId, PeerMsg)>,
        replies: Vec<(OsdId, u64, OsdOpReply, Bytes)>,
        list_replies: Vec<(u64, OsdCommandReply)>,
        epoch: u32,
        view: Option<(Vec<OsdId>, PoolParams)>,
        now: Instant,
        next_tid: u64,
    }

    fn osd(i: u32) -> OsdId {
        OsdId(i)
    }

    fn reqid(tid: u64) -> ReqId {
        ReqId { client: 7, nonce: 1, tid }
    }

    impl Sim {
        fn new(n: u32) -> Sim {
            let mut nodes = BTreeMap::new();
            for i in 0..n {
                let store = Arc::new(TestStore::default());
                let pg = Pg::new(pgid(), osd(i), Arc::clone(&store) as Arc<dyn ObjectStore>, LIMITS);
                nodes.insert(osd(i), Node { store, pg, frozen: false, parked: Vec::new(), generation: 0 });
            }
            Sim {
                nodes,
                net: VecDeque::new(),
                held: Vec::new(),
                replies: Vec::new(),
                list_replies: Vec::new(),
                epoch: 0,
                view: None,
                now: Instant::now(),
                next_tid: 10_000,
            }
        }

        fn view_for(&self, acting: &[OsdId], pool: PoolParams) -> PgMapView {
            PgMapView {
                epoch: Epoch(self.epoch),
                pool: Some(pool),
                acting: acting.to_vec(),
                primary: acting.first().copied(),
                acting_addrs: acting
                    .iter()
                    .map(|o| {
                        let g = self.nodes[o].generation;
                        Some(SocketAddr::from(([127, 0, 0, 1], 1000 + 100 * g + o.0 as u16)))
                    })
                    .collect(),
            }
        }

        /// A new map epoch placing the PG on `acting` (primary first); frozen nodes do not see it yet.
        fn map(&mut self, acting: &[u32], size: u8, min_size: u8) {
            self.epoch += 1;
            let acting: Vec<OsdId> = acting.iter().map(|&i| osd(i)).collect();
            let pool = PoolParams { size, min_size };
            self.view = Some((acting.clone(), pool));
            let view = self.view_for(&acting, pool);
            let ids: Vec<OsdId> = self.nodes.keys().copied().collect();
            for id in ids {
                if !self.nodes[&id].frozen {
                    self.give_map(id, view.clone());
                }
            }
            self.run();
        }

        /// A map epoch that only `who` sees; the others will skip it (their MonClient coalesced it away).
        fn map_only(&mut self, who: &[u32], acting: &[u32], size: u8, min_size: u8) {
            self.epoch += 1;
            let acting: Vec<OsdId> = acting.iter().map(|&i| osd(i)).collect();
            let view = self.view_for(&acting, PoolParams { size, min_size });
            for &i in who {
                self.give_map(osd(i), view.clone());
            }
            self.run();
        }

        fn give_map(&mut self, id: OsdId, view: PgMapView) {
            let now = self.now;
            let node = self.nodes.get_mut(&id).unwrap();
            node.pg.handle_map(now, view);
            let parked = std::mem::take(&mut node.parked);
            for (from, m) in parked {
                self.deliver(from, id, m);
            }
        }

        fn deliver(&mut self, from: OsdId, to: OsdId, m: PeerMsg) {
            let now = self.now;
            let node = self.nodes.get_mut(&to).unwrap();
            if node.frozen {
                self.held.push((from, to, m));
                return;
            }
            if m.epoch() > node.pg.view.as_ref().map_or(Epoch(0), |v| v.epoch) {
                node.parked.push((from, m));
                return;
            }
            node.pg.handle_peer(now, from, m);
        }

        /// Moves outputs into the network and replies, and delivers messages until nothing moves.
        fn run(&mut self) {
            loop {
                self.drain();
                let Some((from, to, m)) = self.net.pop_front() else { return };
                self.deliver(from, to, m);
            }
        }

        /// Delivers only messages that match `pred`, leaving the rest queued (to stage partial progress).
        fn run_only(&mut self, pred: impl Fn(OsdId, OsdId, &PeerMsg) -> bool) {
            loop {
                self.drain();
                let Some(i) = self.net.iter().position(|(f, t, m)| pred(*f, *t, m)) else { return };
                let (from, to, m) = self.net.remove(i).unwrap();
                self.deliver(from, to, m);
            }
        }

        fn drain(&mut self) {
            let ids: Vec<OsdId> = self.nodes.keys().copied().collect();
            for id in ids {
                if self.nodes[&id].frozen {
                    continue;
                }
                let mut outs = Vec::new();
                let node = self.nodes.get_mut(&id).unwrap();
                while let Some(o) = node.pg.poll_output() {
                    outs.push(o);
                }
                for o in outs {
                    match o {
                        PgOutput::Send { to, msg } => {
                            if self.nodes[&to].frozen {
                                self.held.push((id, to, msg));
                            } else {
                                self.net.push_back((id, to, msg));
                            }
                        }
                        PgOutput::Reply { ctx, reply, data } => {
                            self.replies.push((id, ctx, reply, data.concat().into()))
                        }
                        PgOutput::ListReply { ctx, reply } => self.list_replies.push((ctx, reply)),
                        PgOutput::StateChanged => {}
                    }
                }
            }
        }

        /// Holds (or stops holding) node `i`'s commits.
        fn hold_commits(&mut self, i: u32, hold: bool) {
            self.nodes[&osd(i)].store.hold.store(hold, std::sync::atomic::Ordering::SeqCst);
        }

        /// Node `i`'s store makes everything durable and tells the PG, as the store's notifier would.
        fn commit(&mut self, i: u32) {
            let now = self.now;
            let node = self.nodes.get_mut(&osd(i)).unwrap();
            node.store.commit_all();
            node.pg.handle_commit(now);
            self.run();
        }

        fn freeze(&mut self, i: u32) {
            self.drain();
            self.nodes.get_mut(&osd(i)).unwrap().frozen = true;
        }

        /// Thaws a node: it first handles what was queued for it (with its old map), then sends what it
        /// produced meanwhile, then catches up with the map.
        fn thaw(&mut self, i: u32) {
            let id = osd(i);
            self.nodes.get_mut(&id).unwrap().frozen = false;
            let held: Vec<_> = std::mem::take(&mut self.held);
            for (from, to, m) in held {
                if to == id {
                    self.deliver(from, to, m);
                } else if from == id {
                    self.net.push_back((from, to, m));
                } else {
                    self.held.push((from, to, m));
                }
            }
            self.run();
            if let Some((acting, pool)) = self.view.clone() {
                let view = self.view_for(&acting, pool);
                self.give_map(id, view);
            }
            self.run();
        }

        /// Sends a client op to `at`; returns its context number.
        fn op(&mut self, at: u32, tid: u64, oid: &str, ops: Vec<OsdOp>, data: &[u8]) -> u64 {
            let ctx = self.next_tid;
            self.next_tid += 1;
            let req = OsdOpRequest {
                reqid: reqid(tid),
                pgid: pgid(),
                oid: oid.into(),
                epoch: Epoch(self.epoch),
                ops,
            };
            let now = self.now;
            let node = self.nodes.get_mut(&osd(at)).unwrap();
            if node.frozen {
                node.pg
                    .handle_client_op(now, ClientOp { req, data: Bytes::copy_from_slice(data).into(), ctx });
                return ctx;
            }
            node.pg.handle_client_op(now, ClientOp { req, data: Bytes::copy_from_slice(data).into(), ctx });
            self.run();
            ctx
        }

        fn write(&mut self, at: u32, tid: u64, oid: &str, data: &[u8]) -> u64 {
            self.op(at, tid, oid, vec![OsdOp::WriteFull { len: data.len() as u64 }], data)
        }

        fn reply(&self, ctx: u64) -> Option<&OsdOpReply> {
            self.replies.iter().find(|r| r.1 == ctx).map(|r| &r.2)
        }

        fn replies_for(&self, ctx: u64) -> usize {
            self.replies.iter().filter(|r| r.1 == ctx).count()
        }

        fn read(&mut self, at: u32, oid: &str) -> Result<Vec<u8>, OsdError> {
            let tid = 1_000_000 + self.next_tid;
            let ctx = self.op(at, tid, oid, vec![OsdOp::Read { offset: 0, len: 0 }], b"");
            let (_, _, reply, data) = self.replies.iter().find(|r| r.1 == ctx).expect("reads are answered");
            reply.result.clone().map(|_| data.to_vec())
        }

        fn objects(&self, i: u32) -> Vec<(String, Vec<u8>, u64)> {
            let s = &self.nodes[&osd(i)].store;
            s.list(pgid(), None, usize::MAX)
                .into_iter()
                .filter(|e| e.name != META_OBJECT)
                .map(|e| {
                    let data = s.read(pgid(), &e.name, 0, u64::MAX).unwrap().to_vec();
                    (e.name, data, e.version.v)
                })
                .collect()
        }

        fn state(&self, i: u32) -> PgState {
            self.nodes[&osd(i)].pg.state()
        }
    }

    const SIZE3: (u8, u8) = (3, 2);

    fn three() -> Sim {
        let mut sim = Sim::new(3);
        sim.map(&[0, 1, 2], SIZE3.0, SIZE3.1);
        assert_eq!(sim.state(0), PgState::Active);
        assert_eq!(sim.state(1), PgState::Replica);
        sim
    }

    #[test]
    fn writes_are_answered_only_after_every_replica_applied_them() {
        // Goal: primary-copy replication acks after all acting replicas. Method: deliver the RepOp to one
        // replica only and check there is no reply; then to the other; check versions and every copy.
        let mut sim = three();
        let req = OsdOpRequest {
            reqid: reqid(1),
            pgid: pgid(),
            oid: "a".into(),
            epoch: Epoch(sim.epoch),
            ops: vec![OsdOp::WriteFull { len: 3 }],
        };
        let now = sim.now;
        sim.nodes
            .get_mut(&osd(0))
            .unwrap()
            .pg
            .handle_client_op(now, ClientOp { req, data: Bytes::from_static(b"abc").into(), ctx: 99 });
        sim.run_only(|_, to, m| to == osd(1) || matches!(m, PeerMsg::RepOpReply(_)));
        assert!(sim.reply(99).is_none(), "osd.2 has not applied it yet");
        assert_eq!(sim.objects(1).len(), 1);
        assert!(sim.objects(2).is_empty());
        sim.run();
        let r = sim.reply(99).unwrap();
        assert_eq!((r.result.clone(), r.version, r.tid), (Ok(()), 1, 1));
        for i in 0..3 {
            assert_eq!(sim.objects(i), vec![("a".to_string(), b"abc".to_vec(), 1)], "osd.{i}");
        }
        // Versions: the object's version is the PG version of its last write.
        sim.write(0, 2, "b", b"x");
        let ctx = sim.write(0, 3, "a", b"second");
        assert_eq!(sim.reply(ctx).unwrap().version, 3);
        assert_eq!(sim.read(0, "a").unwrap(), b"second");
        let ctx = sim.op(0, 4, "a", vec![OsdOp::AssertVersion { version: 2 }, OsdOp::Remove], b"");
        assert_eq!(sim.reply(ctx).unwrap().result, Err(OsdError::VersionMismatch { actual: 3 }));
        let ctx = sim.op(0, 5, "a", vec![OsdOp::AssertVersion { version: 3 }, OsdOp::Remove], b"");
        assert_eq!(sim.reply(ctx).unwrap().result, Ok(()));
        for i in 0..3 {
            assert_eq!(sim.objects(i), vec![("b".to_string(), b"x".to_vec(), 2)], "osd.{i}");
        }
        // Replicas refuse client ops.
        let ctx = sim.write(1, 6, "c", b"x");
        assert_eq!(sim.reply(ctx).unwrap().result, Err(OsdError::Misdirected(Epoch(sim.epoch))));
    }

    #[test]
    fn ops_wait_below_min_size_and_run_when_the_map_allows() {
        // Goal: a PG with fewer than min_size OSDs up makes ops wait rather than fail. Method: a map with only
        // the primary up; a write and a listing wait; a map adding a replica lets them through.
        let mut sim = Sim::new(3);
        sim.map(&[0], 3, 2);
        assert_eq!(sim.state(0), PgState::Inactive);
        let w = sim.write(0, 1, "a", b"abc");
        let now = sim.now;
        let list = ListOp {
            req: PgListRequest { pgid: pgid(), epoch: Epoch(sim.epoch), after: None, max: 10 },
            ctx: 77,
        };
        sim.nodes.get_mut(&osd(0)).unwrap().pg.handle_list(now, list);
        sim.run();
        assert!(sim.reply(w).is_none() && sim.list_replies.is_empty(), "waiting, not failing");
        sim.map(&[0, 1], 3, 2);
        assert_eq!(sim.state(0), PgState::Active);
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        assert_eq!(sim.objects(1).len(), 1);
        assert_eq!(sim.list_replies.len(), 1);
        // The listing was queued after the write and ran after it.
        assert_eq!(sim.list_replies[0].1.result, Ok(vec!["a".to_string()]));
        // Back below min_size: ops wait again, in flight ones included.
        sim.map(&[0], 3, 2);
        let w2 = sim.write(0, 2, "b", b"x");
        assert!(sim.reply(w2).is_none());
        sim.map(&[0, 2], 3, 2);
        assert_eq!(sim.reply(w2).unwrap().result, Ok(()));
        assert_eq!(sim.objects(2).len(), 2, "osd.2 recovered a and got b");
    }

    #[test]
    fn resent_requests_are_never_applied_twice() {
        // Goal: duplicate suppression. Method: an append resent while in flight (attached), after it
        // completed (remembered reply), and to a new primary after a primary change (remembered replies travel
        // with the PG); the object must hold the appended byte once.
        let mut sim = three();
        let req = |tid| OsdOpRequest {
            reqid: reqid(tid),
            pgid: pgid(),
            oid: "log".into(),
            epoch: Epoch(1),
            ops: vec![OsdOp::Append { len: 1 }],
        };
        let now = sim.now;
        let pg = &mut sim.nodes.get_mut(&osd(0)).unwrap().pg;
        pg.handle_client_op(now, ClientOp { req: req(1), data: Bytes::from_static(b"x").into(), ctx: 1 });
        pg.handle_client_op(now, ClientOp { req: req(1), data: Bytes::from_static(b"x").into(), ctx: 2 });
        sim.run();
        let (a, b) = (sim.reply(1).unwrap().clone(), sim.reply(2).unwrap().clone());
        assert_eq!(a, b, "the resend got the same reply");
        assert_eq!(a.version, 1);
        let c = sim.op(0, 1, "log", vec![OsdOp::Append { len: 1 }], b"x");
        assert_eq!(sim.reply(c).unwrap(), &a);
        assert_eq!(sim.read(0, "log").unwrap(), b"x");

        // A new primary (same OSDs, another order) knows the reply too.
        sim.map(&[1, 2, 0], 3, 2);
        assert_eq!(sim.state(1), PgState::Active);
        let d = sim.op(1, 1, "log", vec![OsdOp::Append { len: 1 }], b"x");
        assert_eq!(sim.reply(d).unwrap().version, 1);
        assert_eq!(sim.read(1, "log").unwrap(), b"x");
        let e = sim.op(1, 2, "log", vec![OsdOp::Append { len: 1 }], b"y");
        assert_eq!(sim.reply(e).unwrap().version, 2);
        for i in 0..3 {
            assert_eq!(sim.objects(i), vec![("log".to_string(), b"xy".to_vec(), 2)]);
        }
    }

    #[test]
    fn reads_wait_for_writes_in_flight_on_their_object_and_keep_order() {
        // Goal: no read sees an unacknowledged write, and ops on one object are answered in order, while
        // other objects are not held up. Method: hold the RepOp replies, read the object and another.
        let mut sim = three();
        sim.write(0, 1, "a", b"old");
        sim.write(0, 2, "b", b"bbb");
        let now = sim.now;
        let mk = |tid, oid: &str, ops| OsdOpRequest {
            reqid: reqid(tid),
            pgid: pgid(),
            oid: oid.into(),
            epoch: Epoch(1),
            ops,
        };
        let pg = &mut sim.nodes.get_mut(&osd(0)).unwrap().pg;
        pg.handle_client_op(
            now,
            ClientOp {
                req: mk(10, "a", vec![OsdOp::WriteFull { len: 3 }]),
                data: Bytes::from_static(b"new").into(),
                ctx: 10,
            },
        );
        pg.handle_client_op(
            now,
            ClientOp {
                req: mk(11, "a", vec![OsdOp::Read { offset: 0, len: 0 }]),
                data: Bytes::new().into(),
                ctx: 11,
            },
        );
        pg.handle_client_op(
            now,
            ClientOp {
                req: mk(12, "a", vec![OsdOp::Append { len: 1 }]),
                data: Bytes::from_static(b"!").into(),
                ctx: 12,
            },
        );
        pg.handle_client_op(
            now,
            ClientOp {
                req: mk(13, "b", vec![OsdOp::Read { offset: 0, len: 0 }]),
                data: Bytes::new().into(),
                ctx: 13,
            },
        );
        sim.run_only(|_, _, m| !matches!(m, PeerMsg::RepOp(..)));
        assert!(sim.reply(13).is_some(), "another object is not held up");
        assert!(sim.reply(10).is_none() && sim.reply(11).is_none() && sim.reply(12).is_none());
        sim.run();
        let data = sim.replies.iter().find(|r| r.1 == 11).unwrap().3.clone();
        assert_eq!(&data[..], b"new", "the read saw the write before it, not the append after it");
        let order: Vec<u64> = sim.replies.iter().map(|r| r.1).filter(|c| (10..=12).contains(c)).collect();
        assert_eq!(order, vec![10, 11, 12]);
    }

    #[test]
    fn a_returning_osd_never_serves_stale_data() {
        // Goal: the required scenario. 3 OSDs, size 3, min_size 2; osd.2 freezes (SIGSTOP), a write in flight
        // stalls until the map marks it down, writes continue on the other two (overwrite, remove, create);
        // osd.2 thaws with its old map, then boots and becomes primary: it must serve the latest
        // acknowledged data, removed objects stay removed, and every copy ends identical. Method: the sim.
        let mut sim = three();
        sim.write(0, 1, "a", b"a1");
        sim.write(0, 2, "c", b"c1");
        for n in 0..3 {
            sim.write(0, 10 + n, &format!("keep{n}"), b"k");
        }
        sim.freeze(2);
        let stalled = sim.write(0, 3, "b", b"b1");
        assert!(sim.reply(stalled).is_none(), "osd.2 has not applied it");
        // The monitor marks osd.2 down: the write completes on the remaining acting set after peering.
        sim.map(&[0, 1], 3, 2);
        assert_eq!(sim.reply(stalled).unwrap().result, Ok(()));
        sim.write(0, 4, "a", b"a2");
        let rm = sim.op(0, 5, "c", vec![OsdOp::Remove], b"");
        assert_eq!(sim.reply(rm).unwrap().result, Ok(()));
        sim.write(0, 6, "d", b"d1");

        // osd.2 thaws: it first sees the traffic queued for it under its old map, then the current map (down),
        // then boots; placement makes it the primary.
        sim.thaw(2);
        assert_eq!(sim.state(2), PgState::Stray);
        sim.map(&[2, 0, 1], 3, 2);
        assert_eq!(sim.state(2), PgState::Active);
        assert_eq!(sim.read(2, "a").unwrap(), b"a2");
        assert_eq!(sim.read(2, "b").unwrap(), b"b1");
        assert_eq!(sim.read(2, "c"), Err(OsdError::NotFound));
        assert_eq!(sim.read(2, "d").unwrap(), b"d1");
        let w = sim.write(2, 7, "a", b"a3");
        assert_eq!(sim.reply(w).unwrap().version, 10, "versions continue from the authoritative history");
        let expect = sim.objects(2);
        let mut names: Vec<&str> = expect.iter().map(|o| o.0.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b", "d", "keep0", "keep1", "keep2"]);
        for i in 0..2 {
            assert_eq!(sim.objects(i), expect, "osd.{i} matches the primary");
        }
    }

    #[test]
    fn a_deposed_primarys_unacknowledged_write_is_rolled_back() {
        // Goal: divergent writes lose. Method: osd.0 (primary) freezes; the map makes osd.1 primary, which
        // acknowledges a write; frozen osd.0 still executes a client write under its old map (its RepOps are
        // refused by the others as belonging to a finished interval); when osd.0 is primary again, peering
        // takes osd.1's newer history and the divergent write disappears; it was never acknowledged.
        let mut sim = three();
        sim.write(0, 1, "x", b"x1");
        sim.freeze(0);
        sim.map(&[1, 2], 3, 2);
        let w = sim.write(1, 2, "x", b"x2");
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        let div = sim.write(0, 3, "y", b"divergent");
        sim.thaw(0);
        assert!(sim.replies.iter().all(|r| r.1 != div || r.2.result.is_err()), "never acknowledged");
        sim.map(&[0, 1, 2], 3, 2);
        assert_eq!(sim.state(0), PgState::Active);
        assert_eq!(sim.read(0, "x").unwrap(), b"x2");
        assert_eq!(sim.read(0, "y"), Err(OsdError::NotFound));
        for i in 1..3 {
            assert_eq!(sim.objects(i), sim.objects(0));
        }
    }

    #[test]
    fn peering_pages_large_summaries_and_an_empty_restarted_osd_is_refilled() {
        // Goal: summaries larger than a page and a restarted (empty) OSD. Method: 2100 objects on two OSDs;
        // the third restarts empty at new addresses; then the primary role moves to the OSD that must read the
        // others' summaries in pages.
        let mut sim = Sim::new(3);
        sim.map(&[0, 1], 3, 2);
        for n in 0..2100u64 {
            sim.write(0, n + 1, &format!("o{n:05}"), &n.to_le_bytes());
        }
        sim.nodes.get_mut(&osd(2)).unwrap().generation += 1;
        sim.map(&[0, 1, 2], 3, 2);
        assert_eq!(sim.objects(2).len(), 2100);
        // osd.1 restarts empty (MemStore) and becomes primary: it pulls everything in pages.
        let fresh = Arc::new(TestStore::default());
        let node = sim.nodes.get_mut(&osd(1)).unwrap();
        node.store = Arc::clone(&fresh);
        node.pg = Pg::new(pgid(), osd(1), fresh as Arc<dyn ObjectStore>, LIMITS);
        node.generation += 1;
        sim.map(&[1, 0, 2], 3, 2);
        assert_eq!(sim.state(1), PgState::Active);
        assert_eq!(sim.objects(1), sim.objects(0));
        assert_eq!(sim.read(1, "o02099").unwrap(), 2099u64.to_le_bytes());
        let w = sim.write(1, 5000, "new", b"n");
        assert_eq!(sim.reply(w).unwrap().version, 2101);
    }

    #[test]
    fn a_write_is_answered_only_once_it_is_durable_on_every_acting_osd() {
        // Goal: never acknowledge what a crash could take back: the client hears of a write only after the
        // primary's own commit and every replica's, and a read of the object waits as long. Method: three OSDs
        // whose stores hold their commits; a write, then a read of it; let the commits go one OSD at a time
        // (replicas first, then the primary) and look at the replies after each.
        let mut sim = three();
        for i in 0..3 {
            sim.hold_commits(i, true);
        }
        let w = sim.write(0, 1, "a", b"v1");
        let r = sim.op(0, 2, "a", vec![OsdOp::Read { offset: 0, len: 0 }], b"");
        assert!(sim.reply(w).is_none() && sim.reply(r).is_none(), "nothing is durable yet");
        assert!(sim.nodes[&osd(0)].pg.awaits_commit());
        sim.commit(1);
        assert!(sim.reply(w).is_none(), "osd.2 and the primary have not committed");
        sim.commit(2);
        assert!(sim.reply(w).is_none() && sim.reply(r).is_none(), "the primary has not committed");
        sim.commit(0);
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        assert_eq!(sim.reply(r).unwrap().result, Ok(()), "the read went once the write was durable");
        assert!(sim.replies.iter().position(|x| x.1 == w) < sim.replies.iter().position(|x| x.1 == r));
        assert!(!sim.nodes[&osd(0)].pg.awaits_commit());
    }

    #[test]
    fn writes_that_find_the_commit_queue_full_wait_in_order_and_run_after_a_commit() {
        // Goal: a full commit queue (Busy) is backpressure, not an error: the client is never told, the ops run
        // in their order once the store has room, on the primary and on a replica. Method: make osd.0's store
        // busy, send two writes and a read of the first object; nothing is answered; let it go: all three
        // answered in order, with the read seeing the write. Then the same with a busy replica.
        let mut sim = three();
        sim.nodes[&osd(0)].store.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        let a = sim.write(0, 1, "a", b"one");
        let b = sim.write(0, 2, "b", b"two");
        let r = sim.op(0, 3, "a", vec![OsdOp::Read { offset: 0, len: 0 }], b"");
        assert!(sim.replies.is_empty(), "nothing is answered while the store is busy");
        sim.nodes[&osd(0)].store.busy.store(false, std::sync::atomic::Ordering::SeqCst);
        sim.commit(0);
        let at = |ctx: u64| sim.replies.iter().position(|x| x.1 == ctx).expect("answered");
        assert!(at(a) < at(r), "the read of a waits for the write of a");
        assert_eq!(sim.replies.len(), 3, "b is answered too, once");
        assert!(sim.replies.iter().all(|x| x.2.result.is_ok()));
        assert_eq!(&sim.replies[at(r)].3[..], b"one");
        assert_eq!(sim.reply(b).unwrap().version, 2, "b kept its place after a");

        sim.nodes[&osd(2)].store.busy.store(true, std::sync::atomic::Ordering::SeqCst);
        let c = sim.write(0, 4, "c", b"three");
        assert!(sim.reply(c).is_none(), "osd.2 has not taken it");
        sim.nodes[&osd(2)].store.busy.store(false, std::sync::atomic::Ordering::SeqCst);
        sim.commit(2);
        assert_eq!(sim.reply(c).unwrap().result, Ok(()));
        for i in 0..3 {
            assert_eq!(sim.objects(i).len(), 3, "osd.{i}");
        }
    }

    #[test]
    fn a_replica_marked_full_stops_writes_at_the_primary_but_not_deletes() {
        // Goal: Ceph's full state: a primary whose acting set holds a full OSD refuses writes that add data
        // with ENOSPC naming that OSD, rather than send the replica a write it has no room for (it would
        // refuse it, and the PG would peer again); deletes still go through, so space can be freed; writes
        // resume once the OSD is no longer full. Method: three OSDs; the primary's PG is told osd.2 is full,
        // as the shard does from the map.
        let mut sim = three();
        sim.write(0, 1, "a", b"abc");
        sim.write(0, 2, "b", b"def");
        sim.nodes.get_mut(&osd(0)).unwrap().pg.set_full(Some(osd(2)));
        let w = sim.write(0, 3, "c", b"new");
        let refused = OsdError::NoSpace("osd.2 is full; delete data to free space".into());
        assert_eq!(sim.reply(w).unwrap().result, Err(refused));
        let d = sim.op(0, 4, "a", vec![OsdOp::Remove], b"");
        assert_eq!(sim.reply(d).unwrap().result, Ok(()));
        for i in 0..3 {
            assert_eq!(sim.objects(i), vec![("b".to_string(), b"def".to_vec(), 2)], "osd.{i}");
        }
        assert_eq!(
            (sim.state(0), sim.nodes[&osd(0)].pg.interval()),
            (PgState::Active, Epoch(1)),
            "no peering"
        );

        sim.nodes.get_mut(&osd(0)).unwrap().pg.set_full(None);
        let w = sim.write(0, 5, "c", b"new");
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        for i in 0..3 {
            assert_eq!(sim.objects(i).len(), 2, "osd.{i}");
        }
    }

    #[test]
    fn a_replica_answers_its_primary_only_after_its_own_commit() {
        // Goal: the primary counts a replica's copy only once it is durable there, whatever the primary's own
        // disk does. Method: hold only osd.1's commits; the write waits for it alone, and a resend of the
        // same request is answered once, after osd.1 commits.
        let mut sim = three();
        sim.hold_commits(1, true);
        let w = sim.write(0, 1, "a", b"v1");
        assert!(sim.reply(w).is_none());
        let again = sim.write(0, 1, "a", b"v1");
        assert!(sim.reply(again).is_none(), "a resend waits for the first copy");
        sim.commit(1);
        assert_eq!(sim.replies_for(w), 1);
        assert_eq!(sim.replies_for(again), 1);
        assert_eq!(sim.reply(w).unwrap().version, sim.reply(again).unwrap().version);
    }

    #[test]
    fn a_replica_that_cannot_apply_a_write_triggers_peering_again() {
        // Goal: a diverged replica is repaired rather than left inconsistent. Method: remove an object behind
        // a replica's back, then zero it through the primary: the replica's apply fails, the primary peers
        // again, pushes its copy, and the op is answered once.
        let mut sim = three();
        sim.write(0, 1, "a", b"abcdef");
        let mut t = Transaction::new();
        t.remove(ObjectId::new(pgid(), "a"));
        sim.nodes[&osd(2)].store.apply(&t).unwrap();
        let z = sim.op(0, 2, "a", vec![OsdOp::Zero { offset: 0, len: 2 }], b"");
        assert_eq!(sim.replies_for(z), 1);
        assert_eq!(sim.reply(z).unwrap().result, Ok(()));
        assert_eq!(sim.state(0), PgState::Active);
        for i in 0..3 {
            assert_eq!(sim.objects(i), vec![("a".to_string(), b"\0\0cdef".to_vec(), 2)], "osd.{i}");
        }
    }

    #[test]
    fn a_replica_that_saw_an_interval_change_the_primary_missed_makes_it_peer_again() {
        // Goal: OSDs that saw different subsets of the map epochs agree on the interval. Method: osd.1 alone
        // sees the epoch marking it down; everyone sees the next one (back up at the same addresses), which
        // for osd.0 and osd.2 looks like the old interval. A write through osd.0 must still complete, on
        // every OSD, and osd.0's next write carries the newer interval's epoch.
        let mut sim = three();
        sim.write(0, 1, "a", b"1");
        sim.map_only(&[1], &[0, 2], 3, 2);
        sim.map(&[0, 1, 2], 3, 2);
        assert_eq!(sim.nodes[&osd(0)].pg.interval(), Epoch(1), "osd.0 saw no change");
        assert_eq!(sim.nodes[&osd(1)].pg.interval(), Epoch(3));
        let w = sim.write(0, 2, "b", b"2");
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        assert_eq!(sim.nodes[&osd(0)].pg.interval(), Epoch(3), "osd.0 adopted the newer interval");
        for i in 0..3 {
            assert_eq!(sim.objects(i).len(), 2, "osd.{i}");
        }
        // And the other way round: the primary saw a change the replicas missed.
        sim.map_only(&[0], &[0, 2], 3, 2);
        sim.map(&[0, 1, 2], 3, 2);
        let w = sim.write(0, 3, "c", b"3");
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        assert_eq!(sim.objects(1).len(), 3);
    }

    #[test]
    fn lost_messages_are_repaired_by_a_session_reset_or_the_retry_timer() {
        // Goal: a peer session reset (its queue dropped) or any other loss cannot stall a PG for good. Method:
        // drop a RepOp on the floor, report the reset: the write completes after re-peering; then drop one
        // again, report nothing, and let the tick's retry timer do it.
        let mut sim = three();
        let w = sim.write(0, 1, "a", b"keep");
        assert_eq!(sim.reply(w).unwrap().result, Ok(()));
        let lose_rep_op_to_2 = |sim: &mut Sim, tid, data: &[u8]| {
            let req = OsdOpRequest {
                reqid: reqid(tid),
                pgid: pgid(),
                oid: "b".into(),
                epoch: Epoch(sim.epoch),
                ops: vec![OsdOp::WriteFull { len: data.len() as u64 }],
            };
            let now = sim.now;
            let op = ClientOp { req, data: Bytes::copy_from_slice(data).into(), ctx: tid };
            sim.nodes.get_mut(&osd(0)).unwrap().pg.handle_client_op(now, op);
            sim.drain();
            let before = sim.net.len();
            sim.net.retain(|(_, to, m)| !(*to == osd(2) && matches!(m, PeerMsg::RepOp(..))));
            assert_eq!(sim.net.len(), before - 1, "one RepOp lost");
            sim.run();
            assert!(sim.reply(tid).is_none(), "stalled on the lost RepOp");
        };
        lose_rep_op_to_2(&mut sim, 2, b"v1");
        let now = sim.now;
        sim.nodes.get_mut(&osd(0)).unwrap().pg.handle_peer_reset(now, osd(2));
        sim.run();
        assert_eq!(sim.reply(2).unwrap().result, Ok(()));
        assert_eq!(sim.objects(2), sim.objects(0));

        lose_rep_op_to_2(&mut sim, 3, b"v2");
        sim.now += PEER_RETRY;
        let now = sim.now;
        sim.nodes.get_mut(&osd(0)).unwrap().pg.tick(now);
        sim.run();
        assert_eq!(sim.reply(3).unwrap().result, Ok(()));
        assert_eq!(sim.objects(2), sim.objects(0));
        assert_eq!(sim.read(2, "b"), Err(OsdError::Misdirected(Epoch(1))));
        assert_eq!(sim.read(0, "b").unwrap(), b"v2");
    }

    #[test]
    fn a_deleted_pool_answers_what_waits_with_no_such_pool() {
        // Goal: ops waiting in a PG whose pool is deleted get a typed error, not silence. Method: a write
        // waiting below min_size, then a map without the pool.
        let mut sim = Sim::new(2);
        sim.map(&[0], 2, 2);
        let w = sim.write(0, 1, "a", b"x");
        assert!(sim.reply(w).is_none());
        sim.epoch += 1;
        let view = PgMapView {
            epoch: Epoch(sim.epoch),
            pool: None,
            acting: vec![],
            primary: None,
            acting_addrs: vec![],
        };
        sim.give_map(osd(0), view);
        sim.run();
        assert_eq!(sim.reply(w).unwrap().result, Err(OsdError::NoSuchPool(PoolId(1))));
        assert_eq!(sim.state(0), PgState::Stray);
    }

    #[test]
    fn pool_listing_pages_and_skips_metadata() {
        // Goal: PgList paging from the primary. Method: five objects, pages of two.
        let mut sim = three();
        for n in 0..5 {
            sim.write(0, n + 1, &format!("k{n}"), b"v");
        }
        let mut after = None;
        let mut all = Vec::new();
        for page in 0..4 {
            let now = sim.now;
            let req = PgListRequest { pgid: pgid(), epoch: Epoch(sim.epoch), after: after.clone(), max: 2 };
            sim.nodes.get_mut(&osd(0)).unwrap().pg.handle_list(now, ListOp { req, ctx: page });
            sim.run();
            let (_, r) = sim.list_replies.pop().unwrap();
            all.extend(r.result.unwrap());
            after = r.next;
            if after.is_none() {
                break;
            }
        }
        // Every object once, in the store's listing order (name hash, then name).
        let mut want: Vec<String> = (0..5).map(|n| format!("k{n}")).collect();
        want.sort_by_cached_key(|n| crate::store::ListKey::new(n));
        assert_eq!(all, want);
    }
}
