//! The sharded op queue (Ceph's `ShardedOpWQ`): PG `seed mod shards` picks the shard, and each shard owns its
//! PGs outright behind one lock, so a slow PG stalls only its own shard and no PG needs a lock of its own.
//!
//! Events run inline on the thread that submits them (a messenger worker, for client ops and replication
//! messages: Ceph's fast dispatch carried all the way into the PG) whenever the shard is free; only when
//! another thread is inside the shard does the event wait in the shard's bounded queue, and whoever holds the
//! shard runs it before letting go. Each shard also has a thread of its own, which ticks the PGs' timers, takes
//! over a backlog that an inline runner left behind (a runner stops after [`INLINE_BATCH_MAX`] events so that
//! its sockets are not starved), and watches for the process having been frozen. On this path an op costs no
//! thread hand-off in the OSD: the earlier design (worker -> shard thread -> worker) spent most of the OSD's
//! CPU in the kernel switching threads.
//!
//! The queue cannot overflow: every message in it or held by a PG keeps its messenger throttle budget until it
//! is answered or dropped, and the queue is sized for the client and peer throttles together (see `daemon`).
//!
//! The shard also holds what must wait for a newer map: a client op or peer message stamped with an epoch
//! this OSD has not seen yet waits until the MonClient brings that map. And after the process was frozen
//! (SIGSTOP, a long stall), client ops wait briefly for a map newer than the one it had: while it slept the
//! monitor may have given its PGs to others, and it must not answer from a stale copy.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use messenger::{Connection, EntityName, Message, Messenger};
use parking_lot::Mutex;

use rados::ids::{Epoch, OsdId, PgId};
use rados::map::OsdMap;
use rados::msg::{
    types, OsdCommandReply, OsdError, OsdIoStats, OsdOp, OsdOpReply, OsdOpRequest, PgListRequest, PgStat,
};
use rados::placement::{object_to_pg, Placement};

use crate::exec::OpLimits;
use crate::inline::{InlineQueue, Runner};
use crate::pg::{ClientOp, ListOp, Pg, PgMapView, PgOutput, PoolParams, META_OBJECT};
use crate::proto::PeerMsg;
use crate::store::{ObjectStore, Transaction};

/// How often a shard looks at its PGs' timers and publishes their stats.
pub const TICK: Duration = Duration::from_millis(500);
/// Events held for a newer map, per shard. The throttles keep this far from full.
pub const MAP_WAIT_MAX: usize = 16_384;
/// Names in one `ListObjects` answer.
pub const LIST_OBJECTS_MAX: usize = 4096;
/// After a freeze, client ops wait at most this long for a newer map.
pub const STALL_HOLD: Duration = Duration::from_secs(3);
/// Events a submitting thread runs inline before it hands the rest of the backlog to the shard's thread.
pub const INLINE_BATCH_MAX: usize = 64;

/// What a client op needs to be answered: the session it came on, its message tid, and the message itself,
/// whose receive-throttle budget stays taken until the op is answered (backpressure on the client).
#[derive(Debug)]
pub struct ClientCtx {
    pub conn: Connection,
    pub tid: u64,
    /// The op changes its object (counted as a write when answered).
    write: bool,
    /// Payload bytes the op brought (its writes' data).
    in_bytes: u64,
    _msg: Message,
}

/// Client ops this OSD answered as a primary, and their bytes: counters that only grow, reported to the
/// monitor for its client I/O rates. Shared by the shards (relaxed: each counter is a sum on its own).
#[derive(Debug, Default)]
pub struct IoCounters {
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
}

impl IoCounters {
    fn count(&self, write: bool, bytes: u64) {
        let (ops, b) =
            if write { (&self.write_ops, &self.write_bytes) } else { (&self.read_ops, &self.read_bytes) };
        ops.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> OsdIoStats {
        OsdIoStats {
            read_ops: self.read_ops.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_ops: self.write_ops.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Work for a shard.
#[derive(Debug)]
pub enum ShardEvent {
    Op {
        conn: Connection,
        msg: Message,
        req: OsdOpRequest,
    },
    List {
        conn: Connection,
        msg: Message,
        req: PgListRequest,
    },
    ListObjects {
        conn: Connection,
        tid: u64,
        pgid: PgId,
    },
    Peer {
        from: OsdId,
        peer: PeerMsg,
        msg: Message,
    },
    /// The cluster session with this OSD was reset: what was queued to it is gone.
    PeerReset(OsdId),
    Map(Arc<OsdMap>),
}

impl ShardEvent {
    /// The map epoch the event needs before it can be handled.
    fn epoch(&self) -> Epoch {
        match self {
            ShardEvent::Op { req, .. } => req.epoch,
            ShardEvent::List { req, .. } => req.epoch,
            ShardEvent::Peer { peer, .. } => peer.epoch(),
            ShardEvent::ListObjects { .. } | ShardEvent::PeerReset(_) | ShardEvent::Map(_) => Epoch(0),
        }
    }

    fn is_client(&self) -> bool {
        matches!(self, ShardEvent::Op { .. } | ShardEvent::List { .. })
    }
}

/// Notices that the process was frozen and holds client ops until a newer map shows whether the monitor moved
/// our PGs meanwhile. Shared by the shards: whichever notices first holds them all.
#[derive(Debug)]
pub struct StallGuard {
    /// A gap this long between two looks at the clock means we did not run.
    gap: Duration,
    hold: Mutex<Option<(Instant, Epoch)>>,
}

impl StallGuard {
    pub fn new(gap: Duration) -> StallGuard {
        StallGuard { gap, hold: Mutex::new(None) }
    }

    /// Called by each thread that ticks regularly, with when it last looked and now.
    pub fn check(&self, last: Instant, now: Instant, epoch: Epoch) {
        let gap = now.saturating_duration_since(last);
        if gap >= self.gap {
            tracing::warn!(gap_ms = gap.as_millis() as u64, %epoch, "this OSD did not run for a while; client ops wait for a newer map");
            *self.hold.lock() = Some((now + STALL_HOLD, epoch));
        }
    }

    /// Whether client ops must still wait, given the map we have.
    pub fn holding(&self, now: Instant, epoch: Epoch) -> bool {
        let mut h = self.hold.lock();
        match *h {
            Some((until, stale)) if now < until && epoch <= stale => true,
            Some(_) => {
                *h = None;
                false
            }
            None => false,
        }
    }
}

/// What a shard shares with the rest of the daemon.
#[derive(Clone)]
pub struct ShardShared {
    pub whoami: OsdId,
    pub index: usize,
    pub count: usize,
    pub store: Arc<dyn ObjectStore>,
    pub limits: OpLimits,
    pub cluster: Arc<Messenger>,
    /// Stats of the PGs this shard is primary for, published every tick.
    pub stats: Arc<Mutex<BTreeMap<PgId, PgStat>>>,
    /// The OSD's client I/O counters (one set for all shards).
    pub io: Arc<IoCounters>,
    /// Writes in flight in this shard (shutdown waits for them).
    pub writes_in_flight: Arc<AtomicUsize>,
    /// Poked when a PG becomes active or inactive (the daemon reports to the monitor soon).
    pub report_now: Sender<()>,
    pub guard: Arc<StallGuard>,
    /// `mon_osd_full_ratio`: past it, the shard's PGs refuse writes that add data (before the monitor marks
    /// this OSD full in the map, which stops the PGs of other primaries too).
    pub full_ratio: f64,
}

/// One shard's thread state.
pub struct Shard {
    sh: ShardShared,
    map: Option<Arc<OsdMap>>,
    pgs: HashMap<PgId, Pg<ClientCtx>>,
    waiting_map: VecDeque<ShardEvent>,
    /// PGs waiting for the store to commit (answered when the store rings the shard's doorbell).
    committing: HashSet<PgId>,
    last_beat: Instant,
}

impl Shard {
    pub fn new(sh: ShardShared) -> Shard {
        Shard {
            sh,
            map: None,
            pgs: HashMap::new(),
            waiting_map: VecDeque::new(),
            committing: HashSet::new(),
            last_beat: Instant::now(),
        }
    }

    fn epoch(&self) -> Epoch {
        self.map.as_ref().map_or(Epoch(0), |m| m.epoch)
    }

    pub fn handle(&mut self, now: Instant, ev: ShardEvent) {
        match ev {
            ShardEvent::Map(m) => self.handle_map(now, m),
            ShardEvent::ListObjects { conn, tid, pgid } => self.list_objects(&conn, tid, pgid),
            ShardEvent::PeerReset(osd) => {
                let pgids: Vec<PgId> = self.pgs.keys().copied().collect();
                for pgid in pgids {
                    if let Some(pg) = self.pgs.get_mut(&pgid) {
                        pg.handle_peer_reset(now, osd);
                    }
                    self.flush(pgid);
                }
            }
            ev => {
                if self.must_wait(now, &ev) {
                    return self.park(ev);
                }
                self.route(now, ev);
            }
        }
    }

    fn must_wait(&self, now: Instant, ev: &ShardEvent) -> bool {
        let epoch = self.epoch();
        self.map.is_none() || ev.epoch() > epoch || (ev.is_client() && self.sh.guard.holding(now, epoch))
    }

    fn park(&mut self, ev: ShardEvent) {
        if self.waiting_map.len() >= MAP_WAIT_MAX {
            tracing::warn!(shard = self.sh.index, "too many events waiting for a newer map; refusing one");
            if let ShardEvent::Op { conn, msg, req } = ev {
                let e = OsdError::Io("osd is waiting for a newer map".into());
                reply_op(&conn, msg.tid, &req, Err(e), self.epoch());
            }
            return;
        }
        self.waiting_map.push_back(ev);
    }

    /// Hands parked events on once their map has arrived (or the stall hold has ended), in arrival order.
    fn unpark(&mut self, now: Instant) {
        if self.waiting_map.is_empty() {
            return;
        }
        let parked: Vec<ShardEvent> = self.waiting_map.drain(..).collect();
        for ev in parked {
            if self.must_wait(now, &ev) {
                self.waiting_map.push_back(ev);
            } else {
                self.route(now, ev);
            }
        }
    }

    fn route(&mut self, now: Instant, ev: ShardEvent) {
        let map = Arc::clone(self.map.as_ref().expect("events wait for the first map"));
        match ev {
            ShardEvent::Op { conn, msg, req } => {
                if let Err(e) = check_pg(&map, req.pgid, Some(&req.oid), req.epoch) {
                    return reply_op(&conn, msg.tid, &req, Err(e), map.epoch);
                }
                let Some(pg) = self.pgs.get_mut(&req.pgid) else {
                    return reply_op(&conn, msg.tid, &req, Err(OsdError::Misdirected(map.epoch)), map.epoch);
                };
                let data = msg.crc_data();
                let write = req.ops.iter().any(OsdOp::is_write);
                let in_bytes = req.ops.iter().map(OsdOp::payload_len).sum();
                let ctx = ClientCtx { conn, tid: msg.tid, write, in_bytes, _msg: msg };
                let pgid = req.pgid;
                pg.handle_client_op(now, ClientOp { req, data, ctx });
                self.flush(pgid);
            }
            ShardEvent::List { conn, msg, req } => {
                if let Err(e) = check_pg(&map, req.pgid, None, req.epoch) {
                    return reply_command(&conn, msg.tid, OsdCommandReply { result: Err(e), next: None });
                }
                let Some(pg) = self.pgs.get_mut(&req.pgid) else {
                    let reply = OsdCommandReply { result: Err(OsdError::Misdirected(map.epoch)), next: None };
                    return reply_command(&conn, msg.tid, reply);
                };
                let pgid = req.pgid;
                let ctx = ClientCtx { conn, tid: msg.tid, write: false, in_bytes: 0, _msg: msg };
                pg.handle_list(now, ListOp { req, ctx });
                self.flush(pgid);
            }
            ShardEvent::Peer { from, peer, msg: _hold } => {
                let pgid = peer.pgid();
                match self.pgs.get_mut(&pgid) {
                    Some(pg) => {
                        pg.handle_peer(now, from, peer);
                        self.flush(pgid);
                    }
                    None => {
                        tracing::debug!(%pgid, %from, kind = peer.kind(), "message for a PG this OSD does not serve")
                    }
                }
            }
            ShardEvent::ListObjects { .. } | ShardEvent::PeerReset(_) | ShardEvent::Map(_) => {
                unreachable!("handled without routing")
            }
        }
    }

    fn handle_map(&mut self, now: Instant, map: Arc<OsdMap>) {
        if self.map.as_ref().is_some_and(|m| m.epoch >= map.epoch) {
            return;
        }
        self.map = Some(Arc::clone(&map));
        let me = self.sh.whoami;
        let store_full = self.store_full();
        let placement = Placement::new(&map);
        let mut seen: Vec<PgId> = Vec::new();
        for pool in map.pools.values() {
            let mut seed = self.sh.index as u32;
            while seed < pool.pg_num {
                let pgid = PgId::new(pool.id, seed);
                seed = match seed.checked_add(self.sh.count as u32) {
                    Some(s) => s,
                    None => break,
                };
                let ua = match placement.up_acting(pgid) {
                    Ok(ua) => ua,
                    Err(e) => {
                        tracing::error!(%pgid, "cannot place a PG of the map: {e}");
                        continue;
                    }
                };
                if !ua.acting.contains(&me) && !self.pgs.contains_key(&pgid) {
                    continue;
                }
                let view = PgMapView {
                    epoch: map.epoch,
                    pool: Some(PoolParams { size: pool.size, min_size: pool.min_size }),
                    acting_addrs: ua
                        .acting
                        .iter()
                        .map(|o| map.osds.get(o).and_then(|i| i.addrs).map(|a| a.cluster))
                        .collect(),
                    acting: ua.acting,
                    primary: ua.primary,
                };
                let pg = self
                    .pgs
                    .entry(pgid)
                    .or_insert_with(|| Pg::new(pgid, me, Arc::clone(&self.sh.store), self.sh.limits));
                // Before the map: what the new map lets run must already see who is full.
                pg.set_full(full_osd(me, store_full, &map, &view.acting));
                pg.handle_map(now, view);
                seen.push(pgid);
            }
        }
        // PGs of deleted pools (or beyond a shrunk pg_num) answer what they hold, then go.
        let gone: Vec<PgId> = self.pgs.keys().filter(|p| !seen.contains(p)).copied().collect();
        for pgid in gone {
            let view = PgMapView {
                epoch: map.epoch,
                pool: None,
                acting: vec![],
                primary: None,
                acting_addrs: vec![],
            };
            if let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.handle_map(now, view);
            }
        }
        let touched: Vec<PgId> = self.pgs.keys().copied().collect();
        for pgid in touched {
            self.flush(pgid);
            if self.pgs.get(&pgid).is_some_and(|p| {
                p.state() == crate::pg::PgState::Stray && p.ops_held() == 0 && !p.awaits_commit()
            }) {
                self.pgs.remove(&pgid);
            }
        }
        self.remove_deleted_pools(&map);
        self.unpark(now);
        self.publish_stats();
    }

    /// Drops the data of PGs whose pool no longer exists.
    fn remove_deleted_pools(&self, map: &OsdMap) {
        for pgid in self.sh.store.list_pgs() {
            if pgid.seed as usize % self.sh.count != self.sh.index || map.pools.contains_key(&pgid.pool) {
                continue;
            }
            let mut t = Transaction::new();
            t.remove_pg(pgid);
            match self.sh.store.queue(&t) {
                Ok(_) => tracing::info!(%pgid, "removed the data of a deleted pool's PG"),
                Err(e) => tracing::error!(%pgid, "cannot remove a deleted pool's PG: {e}"),
            }
        }
    }

    /// Whether this OSD's own store is past `mon_osd_full_ratio`.
    fn store_full(&self) -> bool {
        self.sh.store.statfs().used_ratio().is_some_and(|r| r >= self.sh.full_ratio)
    }

    fn tick(&mut self, now: Instant) {
        let store_full = self.store_full();
        let me = self.sh.whoami;
        for pg in self.pgs.values_mut() {
            let map = self.map.as_ref().expect("PGs are made by a map, so the shard has one");
            pg.set_full(full_osd(me, store_full, map, pg.acting()));
            pg.tick(now);
        }
        let pgids: Vec<PgId> = self.pgs.keys().copied().collect();
        for pgid in pgids {
            self.flush(pgid);
        }
        self.unpark(now);
        self.publish_stats();
        self.publish_in_flight();
    }

    fn publish_stats(&self) {
        let stats: BTreeMap<PgId, PgStat> =
            self.pgs.values().filter_map(|pg| pg.stat().map(|s| (pg.pgid(), s))).collect();
        *self.sh.stats.lock() = stats;
    }

    fn publish_in_flight(&self) {
        let n = self.pgs.values().map(|pg| pg.writes_in_flight()).sum();
        self.sh.writes_in_flight.store(n, Ordering::Relaxed);
    }

    /// The store committed more: every PG that waited for it moves on.
    fn handle_commit(&mut self, now: Instant) {
        for pgid in std::mem::take(&mut self.committing) {
            if let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.handle_commit(now);
            }
            self.flush(pgid);
        }
    }

    /// Carries out what a PG asked for.
    fn flush(&mut self, pgid: PgId) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let mut outs = Vec::new();
        while let Some(o) = pg.poll_output() {
            outs.push(o);
        }
        if pg.awaits_commit() {
            self.committing.insert(pgid);
        }
        for o in outs {
            match o {
                PgOutput::Send { to, msg } => self.send_peer(to, &msg),
                PgOutput::Reply { ctx, reply, data } => {
                    if reply.result.is_ok() {
                        let bytes =
                            if ctx.write { ctx.in_bytes } else { data.iter().map(|d| d.len() as u64).sum() };
                        self.sh.io.count(ctx.write, bytes);
                    }
                    let m =
                        Message::encode(types::OSD_OP_REPLY, &reply).with_tid(ctx.tid).with_data_parts(data);
                    // A client that went away resends to whoever is primary then; nothing to do here.
                    let _ = ctx.conn.send_message(m);
                }
                PgOutput::ListReply { ctx, reply } => reply_command(&ctx.conn, ctx.tid, reply),
                PgOutput::StateChanged => {
                    let _ = self.sh.report_now.try_send(());
                }
            }
        }
    }

    fn send_peer(&self, to: OsdId, msg: &PeerMsg) {
        let Some(map) = self.map.as_ref() else { return };
        let Some(addrs) = map.osds.get(&to).and_then(|i| i.addrs) else {
            tracing::warn!(%to, kind = msg.kind(), "no address for a peer in the map; message dropped");
            return;
        };
        let name = EntityName::osd(u64::from(to.0));
        let sent = self
            .sh
            .cluster
            .connect(name, addrs.cluster)
            .map_err(|e| e.to_string())
            .and_then(|c| c.send_message(msg.encode()).map_err(|e| e.to_string()));
        if let Err(e) = sent {
            tracing::warn!(%to, kind = msg.kind(), pg = %msg.pgid(), "cannot send to a peer: {e}");
        }
    }

    fn list_objects(&self, conn: &Connection, tid: u64, pgid: PgId) {
        let entries = self.sh.store.list(pgid, None, LIST_OBJECTS_MAX + 2);
        let mut names: Vec<String> =
            entries.into_iter().map(|e| e.name).filter(|n| n != META_OBJECT).collect();
        let next = if names.len() > LIST_OBJECTS_MAX {
            names.truncate(LIST_OBJECTS_MAX);
            names.last().cloned()
        } else {
            None
        };
        reply_command(conn, tid, OsdCommandReply { result: Ok(names), next });
    }
}

/// A shard as the rest of the daemon sees it: submit events (run inline when the shard is free), stop it.
pub type ShardHandle = InlineQueue<Shard>;
/// Why a shard did not take an event.
pub type SubmitError = crate::inline::SubmitError<ShardEvent>;

impl Runner for Shard {
    type Event = ShardEvent;

    /// Whoever runs events checks for a freeze: after SIGCONT a worker may get here before the shard's thread
    /// has ticked. Only the shard's thread moves `last_beat`, so an idle shard is not mistaken for a frozen one.
    fn begin(&mut self, now: Instant) {
        self.sh.guard.check(self.last_beat, now, self.epoch());
    }

    fn handle(&mut self, now: Instant, ev: ShardEvent) {
        Shard::handle(self, now, ev);
    }

    /// The store rang: it committed a group of transactions.
    fn doorbell(&mut self, now: Instant) {
        self.handle_commit(now);
    }

    /// Once per run of events rather than per event: shutdown only needs the count to reach 0 eventually.
    fn end(&mut self) {
        self.publish_in_flight();
    }

    fn turn(&mut self, now: Instant, tick: bool) {
        self.last_beat = now;
        if tick {
            self.tick(now);
        }
    }
}

/// The full OSD that stops writes adding data to a PG placed on `acting`: this one when its own store is full
/// (it need not wait for the monitor to mark it), else the first of `acting` that `map` marks full. Ceph's
/// primaries check the acting set the same way, so that a full replica is never sent a write it cannot apply.
fn full_osd(me: OsdId, store_full: bool, map: &OsdMap, acting: &[OsdId]) -> Option<OsdId> {
    if store_full {
        return Some(me);
    }
    acting.iter().copied().find(|&osd| map.is_full(osd))
}

/// Checks a request's PG against our map: the pool exists, the PG is in range, the object maps to it.
fn check_pg(map: &OsdMap, pgid: PgId, oid: Option<&str>, client_epoch: Epoch) -> Result<(), OsdError> {
    let Some(pool) = map.pools.get(&pgid.pool) else { return Err(OsdError::NoSuchPool(pgid.pool)) };
    if pgid.seed >= pool.pg_num {
        return Err(OsdError::Invalid(format!("pg {pgid} does not exist: pool has {} PGs", pool.pg_num)));
    }
    if let Some(oid) = oid {
        if object_to_pg(pool, oid.as_bytes()) != pgid {
            // A client with an older map may have placed it with a different pg_num.
            return Err(if client_epoch < map.epoch {
                OsdError::Misdirected(map.epoch)
            } else {
                OsdError::Invalid(format!("object {oid:?} does not belong to pg {pgid}"))
            });
        }
    }
    Ok(())
}

pub fn reply_op(conn: &Connection, tid: u64, req: &OsdOpRequest, result: Result<(), OsdError>, epoch: Epoch) {
    let reply = OsdOpReply { tid: req.reqid.tid, epoch, result, version: 0, outs: Vec::new() };
    let _ =
        conn.send_message(Message::encode(types::OSD_OP_REPLY, &reply).with_tid(tid).with_data(Bytes::new()));
}

pub fn reply_command(conn: &Connection, tid: u64, reply: OsdCommandReply) {
    let _ = conn.send_message(Message::encode(types::OSD_COMMAND_REPLY, &reply).with_tid(tid));
}
