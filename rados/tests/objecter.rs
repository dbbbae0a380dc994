//! The Objecter against a fake monitor and fake OSDs on real messengers (127.0.0.1).
//!
//! The fake monitor answers `Subscribe` with the full map and can push a new one; each fake OSD keeps objects
//! in a HashMap, executes compound ops atomically, remembers answers by reqid (a resend is answered, not
//! applied again), and can be told to stay silent, hold ops until released, refuse them as `Misdirected`, or
//! drop the connection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, Policy, Refused, WorkerPool,
};
use parking_lot::Mutex;
use rados::config::Config;
use rados::map::{OsdAddrs, OsdChange, OsdInfo, OsdMap, Pool, WEIGHT_ONE};
use rados::monclient::MonClient;
use rados::msg::{
    types, MapUpdate, MonReply, MonRequest, OpOut, OsdCommand, OsdCommandReply, OsdError, OsdOp, OsdOpReply,
    OsdOpRequest, ReqId,
};
use rados::objecter::{IoCtx, ObjectOperation, Objecter, RadosError};
use rados::placement::{object_to_pg, Placement};
use rados::{Epoch, Fsid, OsdId, PgId, PoolId};

// ---------------------------------------------------------------------------------------------------------
// The fake monitor.

struct FakeMon {
    msgr: Messenger,
    state: Arc<MonState>,
}

struct MonState {
    map: Mutex<OsdMap>,
    subscribers: Mutex<Vec<Connection>>,
}

struct MonDispatcher(Arc<MonState>);

impl Dispatcher for MonDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        m.msg_type == types::MON_REQUEST
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        match m.decode::<MonRequest>() {
            Ok(MonRequest::Subscribe { .. }) => {
                let map = self.0.map.lock().clone();
                let u = MapUpdate { full: Some(map), incrementals: vec![] };
                let _ = conn.send_message(Message::encode(types::MON_MAP, &u));
                self.0.subscribers.lock().push(conn.clone());
            }
            Ok(_) => {
                let _ = conn.send_message(Message::encode(types::MON_REPLY, &MonReply::Ok).with_tid(m.tid));
            }
            Err(_) => conn.mark_down(),
        }
        Ok(())
    }
}

impl FakeMon {
    fn start(pool: &Arc<WorkerPool>, map: OsdMap) -> FakeMon {
        let msgr =
            Messenger::new(Arc::clone(pool), EntityName::mon(0), nonce(), Config::default().messenger());
        msgr.set_policy(EntityType::Client, Policy::stateless_server());
        let state = Arc::new(MonState { map: Mutex::new(map), subscribers: Mutex::new(Vec::new()) });
        msgr.add_dispatcher_tail(Arc::new(MonDispatcher(Arc::clone(&state))));
        msgr.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        msgr.start().unwrap();
        msgr.ready();
        FakeMon { msgr, state }
    }

    fn addr(&self) -> SocketAddr {
        self.msgr.my_addr().unwrap()
    }

    fn map(&self) -> OsdMap {
        self.state.map.lock().clone()
    }

    /// Publishes the next epoch, changed by `f`.
    fn change(&self, f: impl FnOnce(&mut rados::map::Incremental)) -> OsdMap {
        let mut map = self.state.map.lock();
        let mut inc = map.incremental();
        f(&mut inc);
        map.apply(&inc).unwrap();
        let u = MapUpdate { full: Some(map.clone()), incrementals: vec![] };
        for c in self.state.subscribers.lock().iter() {
            let _ = c.send_message(Message::encode(types::MON_MAP, &u));
        }
        map.clone()
    }

    fn set_up(&self, osd: OsdId, up: bool) -> OsdMap {
        self.change(|inc| {
            inc.osd_changes.insert(osd, OsdChange { up: Some(up), ..Default::default() });
        })
    }
}

// ---------------------------------------------------------------------------------------------------------
// The fake OSD.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Normal,
    /// Records ops and never answers.
    Silent,
    /// Records ops and answers them on `release`.
    Hold,
    /// Answers `Misdirected` at this epoch.
    Misdirect(Epoch),
    /// Applies the next N ops, then drops the connection instead of answering.
    ApplyThenDrop(u32),
}

#[derive(Clone, Debug, Default)]
struct Obj {
    pg: Option<PgId>,
    data: Vec<u8>,
    version: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
    omap: BTreeMap<String, Vec<u8>>,
}

struct OsdState {
    mode: Mutex<Mode>,
    objects: Mutex<HashMap<String, Obj>>,
    /// Every op received, in order: (reqid, oid, the client's epoch).
    seen: Mutex<Vec<(ReqId, String, Epoch)>>,
    /// Answers by reqid, so that a resend is answered without being applied again.
    answered: Mutex<HashMap<ReqId, (OsdOpReply, Bytes)>>,
    applied: AtomicU64,
    held: Mutex<Vec<(Connection, Message)>>,
    /// Versions grow across the OSD, as a PG log's do, so a recreated object never reuses one.
    version: AtomicU64,
}

struct FakeOsd {
    id: OsdId,
    msgr: Messenger,
    st: Arc<OsdState>,
}

struct OsdDispatcher(Arc<OsdState>);

impl Dispatcher for OsdDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        matches!(m.msg_type, types::OSD_OP | types::OSD_COMMAND)
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        if m.msg_type == types::OSD_COMMAND {
            self.0.command(conn, &m);
            return Ok(());
        }
        let Ok(req) = m.decode::<OsdOpRequest>() else {
            conn.mark_down();
            return Ok(());
        };
        self.0.seen.lock().push((req.reqid, req.oid.clone(), req.epoch));
        let mode = *self.0.mode.lock();
        match mode {
            Mode::Silent => {}
            Mode::Hold => self.0.held.lock().push((conn.clone(), m)),
            Mode::Misdirect(e) => {
                let r = OsdOpReply {
                    tid: req.reqid.tid,
                    epoch: e,
                    result: Err(OsdError::Misdirected(e)),
                    version: 0,
                    outs: vec![],
                };
                let _ = conn.send_message(Message::encode(types::OSD_OP_REPLY, &r).with_tid(m.tid));
            }
            Mode::ApplyThenDrop(n) => {
                self.0.answer(&req, &m.data);
                *self.0.mode.lock() = if n > 1 { Mode::ApplyThenDrop(n - 1) } else { Mode::Normal };
                conn.mark_down();
            }
            Mode::Normal => {
                let (r, data) = self.0.answer(&req, &m.data);
                let _ = conn
                    .send_message(Message::encode(types::OSD_OP_REPLY, &r).with_tid(m.tid).with_data(data));
            }
        }
        Ok(())
    }
}

impl OsdState {
    /// The answer to `req`: the remembered one for a resend, otherwise the result of executing it.
    fn answer(&self, req: &OsdOpRequest, data: &Bytes) -> (OsdOpReply, Bytes) {
        if let Some(a) = self.answered.lock().get(&req.reqid) {
            return a.clone();
        }
        let mut objects = self.objects.lock();
        let (result, version, outs, out_data) = match self.execute(&mut objects, req, data) {
            Ok((version, outs, out_data)) => (Ok(()), version, outs, out_data),
            Err(e) => (Err(e), 0, vec![], vec![]),
        };
        let r = OsdOpReply { tid: req.reqid.tid, epoch: req.epoch, result, version, outs };
        let a = (r, Bytes::from(out_data));
        if req.ops.iter().any(OsdOp::is_write) {
            self.answered.lock().insert(req.reqid, a.clone());
        }
        a
    }

    /// Applies every step to a copy of the object, and keeps the copy only if all of them succeed.
    #[allow(clippy::type_complexity)]
    fn execute(
        &self,
        objects: &mut HashMap<String, Obj>,
        req: &OsdOpRequest,
        data: &Bytes,
    ) -> Result<(u64, Vec<OpOut>, Vec<u8>), OsdError> {
        let mut obj = objects.get(&req.oid).cloned();
        let (mut at, mut outs, mut out_data, mut wrote) = (0usize, vec![], vec![], false);
        let mut payload = |len: u64| {
            let p = data.slice(at..at + len as usize);
            at += len as usize;
            p
        };
        for op in &req.ops {
            let mut out = OpOut::None;
            let exists = obj.is_some();
            let o = &mut obj;
            match op {
                OsdOp::AssertVersion { version } => {
                    let actual = o.as_ref().map_or(0, |o| o.version);
                    if actual != *version {
                        return Err(OsdError::VersionMismatch { actual });
                    }
                }
                OsdOp::Create { exclusive } => {
                    if exists && *exclusive {
                        return Err(OsdError::Exists);
                    }
                    o.get_or_insert_with(Obj::default);
                    wrote = true;
                }
                OsdOp::Write { offset, len } => {
                    let p = payload(*len);
                    let d = &mut o.get_or_insert_with(Obj::default).data;
                    let end = *offset as usize + p.len();
                    if d.len() < end {
                        d.resize(end, 0);
                    }
                    d[*offset as usize..end].copy_from_slice(&p);
                    wrote = true;
                }
                OsdOp::WriteFull { len } => {
                    o.get_or_insert_with(Obj::default).data = payload(*len).to_vec();
                    wrote = true;
                }
                OsdOp::Append { len } => {
                    let p = payload(*len);
                    o.get_or_insert_with(Obj::default).data.extend_from_slice(&p);
                    wrote = true;
                }
                OsdOp::Zero { offset, len } => {
                    if let Some(o) = o {
                        let end = ((offset + len) as usize).min(o.data.len());
                        if (*offset as usize) < end {
                            o.data[*offset as usize..end].fill(0);
                        }
                    }
                    wrote = true;
                }
                OsdOp::Truncate { size } => {
                    o.get_or_insert_with(Obj::default).data.resize(*size as usize, 0);
                    wrote = true;
                }
                OsdOp::Remove => {
                    if o.take().is_none() {
                        return Err(OsdError::NotFound);
                    }
                    wrote = true;
                }
                OsdOp::SetXattr { name, len } => {
                    let p = payload(*len);
                    o.get_or_insert_with(Obj::default).xattrs.insert(name.clone(), p.to_vec());
                    wrote = true;
                }
                OsdOp::RmXattr { name } => {
                    o.as_mut().ok_or(OsdError::NotFound)?.xattrs.remove(name).ok_or(OsdError::NoAttr)?;
                    wrote = true;
                }
                OsdOp::OmapSet { keys } => {
                    o.get_or_insert_with(Obj::default).omap.extend(keys.iter().cloned());
                    wrote = true;
                }
                OsdOp::OmapRm { keys } => {
                    let om = &mut o.as_mut().ok_or(OsdError::NotFound)?.omap;
                    for k in keys {
                        om.remove(k);
                    }
                    wrote = true;
                }
                OsdOp::Read { offset, len } => {
                    let d = &o.as_ref().ok_or(OsdError::NotFound)?.data;
                    let start = (*offset as usize).min(d.len());
                    let end = if *len == 0 { d.len() } else { (start + *len as usize).min(d.len()) };
                    out_data.extend_from_slice(&d[start..end]);
                    out = OpOut::Data { len: (end - start) as u64 };
                }
                OsdOp::Stat => {
                    let o = o.as_ref().ok_or(OsdError::NotFound)?;
                    out = OpOut::Stat { size: o.data.len() as u64, version: o.version };
                }
                OsdOp::GetXattr { name } => {
                    let v = o.as_ref().ok_or(OsdError::NotFound)?.xattrs.get(name).ok_or(OsdError::NoAttr)?;
                    out_data.extend_from_slice(v);
                    out = OpOut::Data { len: v.len() as u64 };
                }
                OsdOp::ListXattrs => {
                    let xattrs = &o.as_ref().ok_or(OsdError::NotFound)?.xattrs;
                    out = OpOut::Keys(xattrs.keys().cloned().collect());
                }
                OsdOp::OmapGet { keys } => {
                    let om = &o.as_ref().ok_or(OsdError::NotFound)?.omap;
                    out = OpOut::Pairs(
                        keys.iter().filter_map(|k| om.get(k).map(|v| (k.clone(), v.clone()))).collect(),
                    );
                }
                OsdOp::OmapGetKeys { after, max } => {
                    let om = &o.as_ref().ok_or(OsdError::NotFound)?.omap;
                    let keys = om.keys().filter(|k| k.as_str() > after.as_str()).take(*max as usize).cloned();
                    out = OpOut::Keys(keys.collect());
                }
            }
            outs.push(out);
        }
        let version = match (wrote, &mut obj) {
            (true, Some(o)) => {
                o.version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
                o.pg = Some(req.pgid);
                o.version
            }
            (_, o) => o.as_ref().map_or(0, |o| o.version),
        };
        match obj {
            Some(o) => {
                objects.insert(req.oid.clone(), o);
            }
            None => {
                objects.remove(&req.oid);
            }
        }
        if wrote {
            self.applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok((version, outs, out_data))
    }

    fn command(&self, conn: &Connection, m: &Message) {
        let Ok(cmd) = m.decode::<OsdCommand>() else {
            conn.mark_down();
            return;
        };
        let objects = self.objects.lock();
        let in_pg = |pg: PgId| {
            let mut v: Vec<String> =
                objects.iter().filter(|(_, o)| o.pg == Some(pg)).map(|(n, _)| n.clone()).collect();
            v.sort();
            v
        };
        let reply = match cmd {
            OsdCommand::ListObjects { pgid } => OsdCommandReply { result: Ok(in_pg(pgid)), next: None },
            OsdCommand::PgList(r) => {
                let all: Vec<String> =
                    in_pg(r.pgid).into_iter().filter(|n| r.after.as_ref().is_none_or(|a| n > a)).collect();
                let page: Vec<String> = all.iter().take(r.max as usize).cloned().collect();
                let next = (all.len() > page.len()).then(|| page.last().cloned()).flatten();
                OsdCommandReply { result: Ok(page), next }
            }
        };
        let _ = conn.send_message(Message::encode(types::OSD_COMMAND_REPLY, &reply).with_tid(m.tid));
    }
}

impl FakeOsd {
    fn start(pool: &Arc<WorkerPool>, id: u32) -> FakeOsd {
        let msgr = Messenger::new(
            Arc::clone(pool),
            EntityName::osd(id.into()),
            nonce(),
            Config::default().messenger(),
        );
        msgr.set_policy(EntityType::Client, Policy::stateless_server());
        let st = Arc::new(OsdState {
            mode: Mutex::new(Mode::Normal),
            objects: Mutex::new(HashMap::new()),
            seen: Mutex::new(Vec::new()),
            answered: Mutex::new(HashMap::new()),
            applied: AtomicU64::new(0),
            held: Mutex::new(Vec::new()),
            version: AtomicU64::new(0),
        });
        msgr.add_dispatcher_tail(Arc::new(OsdDispatcher(Arc::clone(&st))));
        msgr.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        msgr.start().unwrap();
        msgr.ready();
        FakeOsd { id: OsdId(id), msgr, st }
    }

    fn set_mode(&self, m: Mode) {
        *self.st.mode.lock() = m;
    }

    /// Answers the held ops and goes back to normal.
    fn release(&self) {
        self.set_mode(Mode::Normal);
        let d = OsdDispatcher(Arc::clone(&self.st));
        let held: Vec<_> = std::mem::take(&mut *self.st.held.lock());
        for (conn, m) in held {
            d.dispatch(&conn, m).unwrap();
        }
    }

    fn seen(&self) -> Vec<(ReqId, String, Epoch)> {
        self.st.seen.lock().clone()
    }

    fn has(&self, oid: &str) -> bool {
        self.st.objects.lock().contains_key(oid)
    }

    fn info(&self) -> OsdInfo {
        let a = self.msgr.my_addr().unwrap();
        OsdInfo {
            addrs: Some(OsdAddrs { public: a, cluster: a, hb_front: a, hb_back: a }),
            up: true,
            in_: true,
            weight: WEIGHT_ONE,
            host: format!("host{}", self.id.0),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A cluster of fakes and a client.

struct Cluster {
    mon: FakeMon,
    osds: Vec<FakeOsd>,
    objecter: Arc<Objecter>,
    monc: Arc<MonClient>,
    _client: Arc<Messenger>,
    _pool: Arc<WorkerPool>,
}

fn nonce() -> u64 {
    static N: AtomicU64 = AtomicU64::new(1);
    N.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32)
}

fn test_config() -> Config {
    Config { ms_initial_backoff: 0.005, ms_max_backoff: 0.1, rados_mon_op_timeout: 5.0, ..Default::default() }
}

/// `n` fake OSDs (up unless listed in `down`), pool 1 "rbd" of `size` replicas and `pg_num` PGs, a fake
/// monitor, and an Objecter that has the first map.
fn cluster(n: u32, size: u8, pg_num: u32, down: &[u32], cfg: Config) -> Cluster {
    let pool = WorkerPool::new(2).unwrap();
    let osds: Vec<FakeOsd> = (0..n).map(|i| FakeOsd::start(&pool, i)).collect();
    let mut map = OsdMap::new(Fsid([3; 16]));
    let mut inc = map.incremental();
    for o in &osds {
        let mut info = o.info();
        info.up = !down.contains(&o.id.0);
        inc.new_osds.insert(o.id, info);
    }
    inc.new_pools.insert(PoolId(1), Pool { id: PoolId(1), name: "rbd".into(), size, min_size: 1, pg_num });
    map.apply(&inc).unwrap();
    let mon = FakeMon::start(&pool, map);
    let client =
        Arc::new(Messenger::new(Arc::clone(&pool), EntityName::client(nonce()), nonce(), cfg.messenger()));
    client.start().unwrap();
    let monc = MonClient::start(Arc::clone(&client), mon.addr(), false);
    let objecter = Objecter::new(Arc::clone(&client), Arc::clone(&monc), &cfg);
    objecter.wait_for_map().unwrap();
    Cluster { mon, osds, objecter, monc, _client: client, _pool: pool }
}

impl Cluster {
    fn ioctx(&self) -> IoCtx {
        self.objecter.ioctx("rbd").unwrap()
    }

    fn primary(&self, map: &OsdMap, oid: &str) -> &FakeOsd {
        let pg = object_to_pg(&map.pools[&PoolId(1)], oid.as_bytes());
        let p = Placement::new(map).up_acting(pg).unwrap().primary.unwrap();
        &self.osds[p.0 as usize]
    }

    /// Waits until the Objecter places ops with `epoch`.
    fn wait_epoch(&self, epoch: Epoch) {
        wait_for("the objecter to apply the map", || self.objecter.epoch() >= Some(epoch));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.objecter.shutdown();
        self.monc.shutdown();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn ops_go_to_the_primary_and_every_op_kind_round_trips() {
    // Goal: each op lands on the primary placement names, and each op kind does what it says. Method: three
    // fake OSDs that do not replicate, so an object exists only where the Objecter sent it.
    let c = cluster(3, 3, 8, &[], test_config());
    let io = c.ioctx();
    let map = c.mon.map();
    for i in 0..20 {
        let oid = format!("obj{i}");
        assert!(io.write_full(&oid, format!("data{i}").into_bytes()).unwrap() > 0);
        let p = c.primary(&map, &oid);
        for o in &c.osds {
            assert_eq!(o.has(&oid), o.id == p.id, "{oid} on {:?}, primary {:?}", o.id, p.id);
        }
        assert!(o_seen_by(p, &oid));
    }
    assert_eq!(io.read("obj3", 0, 0).unwrap(), Bytes::from_static(b"data3"));
    assert_eq!(io.read("obj3", 1, 2).unwrap(), Bytes::from_static(b"at"));
    io.write("obj3", 5, &b"++"[..]).unwrap();
    io.append("obj3", &b"!"[..]).unwrap();
    assert_eq!(io.read("obj3", 0, 0).unwrap(), Bytes::from_static(b"data3++!"));
    io.zero("obj3", 0, 2).unwrap();
    io.truncate("obj3", 4).unwrap();
    assert_eq!(io.read("obj3", 0, 0).unwrap(), Bytes::from_static(b"\0\0ta"));
    let (size, v1) = io.stat("obj3").unwrap();
    assert_eq!(size, 4);
    io.setxattr("obj3", "color", &b"blue"[..]).unwrap();
    assert_eq!(io.getxattr("obj3", "color").unwrap(), Bytes::from_static(b"blue"));
    io.rmxattr("obj3", "color").unwrap();
    assert_eq!(io.getxattr("obj3", "color"), Err(RadosError::NoAttr));
    io.omap_set(
        "obj3",
        [("a".to_string(), b"1".to_vec()), ("b".into(), b"2".to_vec()), ("c".into(), vec![])],
    )
    .unwrap();
    assert_eq!(io.omap_get_keys("obj3", "", 10).unwrap(), ["a", "b", "c"]);
    assert_eq!(io.omap_get_keys("obj3", "a", 1).unwrap(), ["b"]);
    let got = io.omap_get("obj3", ["b".to_string(), "zz".to_string()]).unwrap();
    assert_eq!(got, BTreeMap::from([("b".to_string(), b"2".to_vec())]));
    io.omap_rm("obj3", ["a".to_string()]).unwrap();
    assert_eq!(io.omap_get_keys("obj3", "", 10).unwrap(), ["b", "c"]);
    assert!(io.stat("obj3").unwrap().1 > v1, "every write bumps the version");
    io.create("fresh", false).unwrap();
    assert_eq!(io.stat("fresh").unwrap().0, 0);
    io.remove("obj3").unwrap();
    assert_eq!(io.stat("obj3"), Err(RadosError::NotFound));
    // The async API: a completion and a callback.
    let comp = io.aio_write_full("async", &b"xyz"[..]).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    comp.on_complete(move |r| tx.send(r.map(|r| r.version)).unwrap());
    let v = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert!(v > 0, "the write got a version");
    let comp = io.aio_write_full("async", &b"xyz"[..]).unwrap();
    assert!(comp.wait().unwrap().version > v, "a waiter gets the outcome too");
    let r = io.aio_read("async", 0, 0).unwrap().wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(r.data(0).unwrap(), Bytes::from_static(b"xyz"));
    assert_eq!(c.objecter.in_flight(), (0, 0));
}

fn o_seen_by(o: &FakeOsd, oid: &str) -> bool {
    o.seen().iter().any(|(_, n, _)| n == oid)
}

#[test]
fn a_map_change_retargets_in_flight_ops_with_the_same_reqid() {
    // Goal: an op in flight to a primary that goes down is sent to the new primary with the same ReqId.
    // Method: the primary stays silent; the fake monitor marks it down; the new primary answers.
    let c = cluster(3, 3, 8, &[], test_config());
    let io = c.ioctx();
    let map = c.mon.map();
    let old = c.primary(&map, "moving");
    old.set_mode(Mode::Silent);
    let comp = io.aio_write_full("moving", &b"v1"[..]).unwrap();
    wait_for("the old primary to see the op", || o_seen_by(old, "moving"));
    let comp = comp.wait_timeout(Duration::from_millis(100)).expect_err("a silent primary does not answer");
    let map2 = c.mon.set_up(old.id, false);
    let new = c.primary(&map2, "moving");
    assert_ne!(new.id, old.id);
    let r = comp.wait_timeout(Duration::from_secs(5)).expect("completes after the map change").unwrap();
    assert!(r.version > 0);
    let (old_req, _, e1) = old.seen()[0].clone();
    let (new_req, _, e2) = new.seen().into_iter().find(|(_, n, _)| n == "moving").unwrap();
    assert_eq!(old_req, new_req, "a resend keeps its reqid");
    assert_eq!((e1, e2), (map.epoch, map2.epoch));
    assert!(new.has("moving") && !old.has("moving"));
}

#[test]
fn a_reset_connection_causes_a_resend_that_is_not_applied_twice() {
    // Goal: when the session to the primary drops before the answer, the op is resent with the same ReqId
    // and answered from the OSD's memory of it. Method: the fake applies the op, then drops the connection.
    let c = cluster(1, 1, 4, &[], test_config());
    let io = c.ioctx();
    let osd = &c.osds[0];
    osd.set_mode(Mode::ApplyThenDrop(2));
    let v = io.write_full("dropped", &b"once"[..]).unwrap();
    let seen: Vec<ReqId> = osd.seen().into_iter().map(|s| s.0).collect();
    assert_eq!(seen.len(), 3, "sent, resent after a reset, resent after another: {seen:?}");
    assert!(seen.iter().all(|r| *r == seen[0]));
    assert_eq!(osd.st.applied.load(Ordering::Relaxed), 1);
    assert_eq!(io.stat("dropped").unwrap(), (4, v));
    // The session recovers for what follows.
    io.write_full("after", &b"x"[..]).unwrap();
}

#[test]
fn an_op_on_a_pg_without_an_up_osd_waits_for_a_map_that_brings_one() {
    // Goal: an op whose PG has no up OSD neither fails nor is lost: it completes once a map brings the OSD up.
    // Method: the only OSD starts down; the fake monitor marks it up later.
    let c = cluster(1, 1, 4, &[0], test_config());
    let io = c.ioctx();
    let comp = io.aio_write_full("patient", &b"x"[..]).unwrap();
    let comp = comp.wait_timeout(Duration::from_millis(300)).expect_err("no OSD is up to answer");
    assert!(c.osds[0].seen().is_empty());
    c.mon.set_up(OsdId(0), true);
    comp.wait_timeout(Duration::from_secs(5)).expect("completes once the OSD is up").unwrap();
    assert!(c.osds[0].has("patient"));
}

#[test]
fn a_misdirected_op_waits_for_the_map_that_names_the_new_primary() {
    // Goal: an OSD that says it is not the primary does not fail the op: it goes to the primary of the next
    // map. Method: the primary answers Misdirected until the monitor marks it out.
    let c = cluster(2, 2, 4, &[], test_config());
    let io = c.ioctx();
    let map = c.mon.map();
    let old = c.primary(&map, "lost");
    old.set_mode(Mode::Misdirect(Epoch(map.epoch.0 + 1)));
    let comp = io.aio_write_full("lost", &b"x"[..]).unwrap();
    wait_for("retries of the misdirected op", || old.seen().len() >= 2);
    assert!(!comp.is_done());
    let map2 = c.mon.change(|inc| {
        inc.osd_changes.insert(old.id, OsdChange { in_: Some(false), ..Default::default() });
    });
    comp.wait_timeout(Duration::from_secs(5)).expect("completes on the new primary").unwrap();
    let new = c.primary(&map2, "lost");
    assert_ne!(new.id, old.id);
    assert!(new.has("lost"));
    let reqids: BTreeSet<ReqId> = old.seen().iter().chain(new.seen().iter()).map(|s| s.0).collect();
    assert_eq!(reqids.len(), 1);
}

#[test]
fn in_flight_limits_block_submitters_until_ops_complete() {
    // Goal: at most objecter_inflight_ops ops and objecter_inflight_op_bytes bytes are in flight; a submitter
    // beyond that blocks until room is made, and gives up with TimedOut after the op timeout.
    // Method: fake OSDs hold every op until released.
    let mut cfg = test_config();
    cfg.objecter_inflight_ops = 2;
    cfg.objecter_inflight_op_bytes = 1000;
    let c = cluster(1, 1, 4, &[], cfg);
    let io = c.ioctx();
    c.osds[0].set_mode(Mode::Hold);
    let a = io.aio_write_full("a", vec![1u8; 10]).unwrap();
    let b = io.aio_write_full("b", vec![2u8; 10]).unwrap();
    assert_eq!(c.objecter.in_flight(), (2, 20));
    let io2 = io.clone();
    let blocked = std::thread::spawn(move || io2.write_full("c", vec![3u8; 10]));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!blocked.is_finished(), "a third op waits for room");
    wait_for("the OSD to hold both ops", || c.osds[0].st.held.lock().len() == 2);
    c.osds[0].release();
    a.wait().unwrap();
    b.wait().unwrap();
    blocked.join().unwrap().unwrap();
    // Bytes: 800 in flight leave no room for 800 more.
    c.osds[0].set_mode(Mode::Hold);
    let big = io.aio_write_full("big1", vec![0u8; 800]).unwrap();
    let io2 = io.clone();
    let blocked = std::thread::spawn(move || io2.write_full("big2", vec![0u8; 800]));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!blocked.is_finished());
    assert_eq!(c.objecter.in_flight(), (1, 800));
    wait_for("the OSD to hold the op", || c.osds[0].st.held.lock().len() == 1);
    c.osds[0].release();
    big.wait().unwrap();
    blocked.join().unwrap().unwrap();
    assert_eq!(c.objecter.in_flight(), (0, 0));

    // With an op timeout, a submitter that finds no room gives up, and so do the ops.
    let mut cfg = test_config();
    cfg.objecter_inflight_ops = 1;
    cfg.rados_osd_op_timeout = 0.3;
    let c = cluster(1, 1, 4, &[], cfg);
    let io = c.ioctx();
    c.osds[0].set_mode(Mode::Silent);
    let a = io.aio_write_full("a", vec![1u8; 10]).unwrap();
    let t = Instant::now();
    assert!(matches!(io.write_full("b", vec![1u8; 10]), Err(RadosError::TimedOut(_))));
    assert!(t.elapsed() >= Duration::from_millis(200), "it waited");
    assert!(matches!(a.wait(), Err(RadosError::TimedOut(_))));
}

#[test]
fn typed_errors_come_through() {
    // Goal: each failure reaches the caller as its own RadosError variant; bad names and sizes are refused
    // before anything is sent. Method: provoke each against the fakes.
    let mut cfg = test_config();
    cfg.osd_max_object_name_len = 16;
    cfg.osd_max_object_size = 1 << 20;
    cfg.osd_max_write_size = 1 << 16;
    let c = cluster(1, 1, 4, &[], cfg);
    let io = c.ioctx();
    assert_eq!(io.read("missing", 0, 0), Err(RadosError::NotFound));
    assert_eq!(io.remove("missing"), Err(RadosError::NotFound));
    io.create("there", true).unwrap();
    assert_eq!(io.create("there", true), Err(RadosError::Exists));
    io.create("there", false).unwrap();
    assert_eq!(io.getxattr("there", "nope"), Err(RadosError::NoAttr));
    let (_, v) = io.stat("there").unwrap();
    let stale = ObjectOperation::new().assert_version(v + 100).write_full(&b"x"[..]);
    assert_eq!(io.operate("there", stale).unwrap_err(), RadosError::VersionMismatch { actual: v });
    assert_eq!(c.objecter.ioctx("nope").unwrap_err(), RadosError::NoSuchPool("nope".into()));
    let sent_before = c.osds[0].seen().len();
    assert!(matches!(io.write_full("", &b"x"[..]), Err(RadosError::InvalidName(_))));
    assert!(matches!(io.stat(&"n".repeat(17)), Err(RadosError::InvalidName(_))));
    io.stat(&"n".repeat(16)).unwrap_err(); // Long enough but valid: the OSD answers NotFound.
    assert!(matches!(io.write("big", (1 << 20) - 1, &b"ab"[..]), Err(RadosError::TooLarge(_))));
    assert!(matches!(io.write_full("big", vec![0u8; (1 << 16) + 1]), Err(RadosError::TooLarge(_))));
    assert!(matches!(io.truncate("big", u64::MAX), Err(RadosError::TooLarge(_))));
    assert!(matches!(io.zero("big", u64::MAX, 2), Err(RadosError::Invalid(_))));
    assert!(matches!(io.operate("big", ObjectOperation::new()), Err(RadosError::Invalid(_))));
    assert!(matches!(io.list(None, 0), Err(RadosError::Invalid(_))));
    assert_eq!(c.osds[0].seen().len(), sent_before + 1, "only the valid stat went out");

    // Timeouts and shutdown.
    let mut cfg = test_config();
    cfg.rados_osd_op_timeout = 0.2;
    let c = cluster(1, 1, 4, &[], cfg);
    let io = c.ioctx();
    c.osds[0].set_mode(Mode::Silent);
    assert!(matches!(io.stat("x"), Err(RadosError::TimedOut(_))));
    let pending = io.aio_write_full("y", &b"y"[..]).unwrap();
    c.objecter.shutdown();
    assert_eq!(pending.wait(), Err(RadosError::ShutDown));
    assert!(matches!(io.stat("x"), Err(RadosError::ShutDown)));
}

#[test]
fn compound_ops_apply_atomically_and_assert_version_guards_read_modify_write() {
    // Goal: a compound op applies all its steps or none, and assert_version makes read-modify-write safe.
    // Method: compound ops against a fake OSD that executes them atomically.
    let c = cluster(1, 1, 4, &[], test_config());
    let io = c.ioctx();
    let op = ObjectOperation::new()
        .assert_version(0)
        .create(true)
        .write_full(&b"hello"[..])
        .setxattr("owner", &b"me"[..])
        .omap_set([("k".to_string(), b"v".to_vec())]);
    let v1 = io.operate("rmw", op).unwrap().version;
    let r = io
        .operate("rmw", ObjectOperation::new().stat().read(0, 0).getxattr("owner").omap_get_keys("", 10))
        .unwrap();
    assert_eq!(r.stat(0).unwrap(), (5, v1));
    assert_eq!(r.data(1).unwrap(), Bytes::from_static(b"hello"));
    assert_eq!(r.data(2).unwrap(), Bytes::from_static(b"me"));
    assert_eq!(r.keys(3).unwrap(), ["k"]);
    // Read-modify-write: two writers read v1; the first wins, the second is refused.
    let first = ObjectOperation::new().assert_version(v1).write_full(&b"first"[..]);
    let v2 = io.operate("rmw", first).unwrap().version;
    let second = ObjectOperation::new().assert_version(v1).write_full(&b"second"[..]);
    assert_eq!(io.operate("rmw", second).unwrap_err(), RadosError::VersionMismatch { actual: v2 });
    assert_eq!(io.read("rmw", 0, 0).unwrap(), Bytes::from_static(b"first"));
    // A failing step undoes the steps before it.
    let doomed = ObjectOperation::new().append(&b" and more"[..]).setxattr("owner", &b"you"[..]).create(true);
    assert_eq!(io.operate("rmw", doomed).unwrap_err(), RadosError::Exists);
    assert_eq!(io.read("rmw", 0, 0).unwrap(), Bytes::from_static(b"first"));
    assert_eq!(io.getxattr("rmw", "owner").unwrap(), Bytes::from_static(b"me"));
    assert_eq!(io.stat("rmw").unwrap().1, v2);
}

#[test]
fn listing_paginates_across_pgs() {
    // Goal: list() returns every object exactly once, in pages of at most `max`, walking PG by PG with a
    // cursor. Method: 50 objects over 8 PGs on 3 fake OSDs, listed 7 at a time; also one big page.
    let c = cluster(3, 2, 8, &[], test_config());
    let io = c.ioctx();
    let want: BTreeSet<String> = (0..50).map(|i| format!("o{i}")).collect();
    for o in &want {
        io.write_full(o, &b"x"[..]).unwrap();
    }
    let (mut got, mut pages, mut cursor) = (Vec::new(), 0, None);
    loop {
        let (names, next) = io.list(cursor.as_ref(), 7).unwrap();
        assert!(names.len() <= 7);
        if next.is_some() {
            assert_eq!(names.len(), 7, "only the last page is short");
        }
        got.extend(names);
        pages += 1;
        assert!(pages <= 20, "the walk ends");
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(got.len(), 50, "no duplicates");
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!(pages, 8);
    let (all, next) = io.list(None, 1000).unwrap();
    assert_eq!((all.len(), next), (50, None));
    // Each PG was asked of its primary: every OSD that is primary for some PG answered a listing.
    let map = c.mon.map();
    let pg = object_to_pg(&map.pools[&PoolId(1)], b"o1");
    let p = Placement::new(&map).up_acting(pg).unwrap().primary.unwrap();
    let held = c.objecter.osd_command(p, OsdCommand::ListObjects { pgid: pg }).unwrap();
    assert!(held.result.unwrap().contains(&"o1".to_string()));
}

#[test]
fn an_osd_restarted_at_a_new_address_gets_the_ops_in_flight_to_its_old_one() {
    // Goal: an OSD that comes back at a new address gets the ops that were in flight to its old one.
    // Method: the primary stays silent; the monitor publishes the same OSD id at another fake's address.
    let c = cluster(2, 1, 4, &[], test_config());
    let io = c.ioctx();
    let map = c.mon.map();
    let old = c.primary(&map, "reborn");
    old.set_mode(Mode::Silent);
    let comp = io.aio_write_full("reborn", &b"x"[..]).unwrap();
    wait_for("the op to reach the old process", || o_seen_by(old, "reborn"));
    // The "restarted" process: a fresh fake OSD with the same id on a new port.
    let pool = WorkerPool::new(1).unwrap();
    let reborn = FakeOsd::start(&pool, old.id.0);
    let map2 = c.mon.change(|inc| {
        inc.osd_changes.insert(old.id, OsdChange { addrs: reborn.info().addrs, ..Default::default() });
    });
    c.wait_epoch(map2.epoch);
    comp.wait_timeout(Duration::from_secs(5)).expect("the new process answers").unwrap();
    assert!(reborn.has("reborn"));
    assert_eq!(reborn.seen()[0].0, old.seen()[0].0);
}
