//! Three real `Osd`s on 127.0.0.1 with a minimal in-process fake monitor (a messenger answering Subscribe,
//! OsdNew, OsdBoot, OsdMarkMeDown with maps built by `rados::map`), driven by raw OSD_OP messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, Policy, Refused, WorkerPool,
};
use parking_lot::Mutex;

use osd::daemon::Osd;
use rados::config::Config;
use rados::ids::{Epoch, Fsid, OsdId, PgId, PoolId};
use rados::map::{Incremental, OsdChange, OsdInfo, OsdMap, Pool, WEIGHT_ONE};
use rados::msg::{
    types, MapUpdate, MonReply, MonRequest, OpOut, OsdCommand, OsdCommandReply, OsdError, OsdOp, OsdOpReply,
    OsdOpRequest, PgListRequest, ReqId,
};
use rados::placement::{object_to_pg, Placement};

// ---------------------------------------------------------------------------------------------------------------
// The fake monitor.

struct MonState {
    map: OsdMap,
    uuids: HashMap<[u8; 16], OsdId>,
    subs: Vec<Connection>,
    failures: u64,
    reports: HashMap<OsdId, usize>,
}

struct FakeMon {
    msgr: Messenger,
    state: Mutex<MonState>,
}

struct MonDispatcher(Arc<FakeMon>);

impl FakeMon {
    fn start(pool: &Arc<WorkerPool>) -> Arc<FakeMon> {
        let msgr = Messenger::new(Arc::clone(pool), EntityName::mon(0), 1, Default::default());
        msgr.set_default_policy(Policy::stateless_server());
        msgr.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut map = OsdMap::new(Fsid([7; 16]));
        let inc = map.incremental();
        map.apply(&inc).unwrap();
        let mon = Arc::new(FakeMon {
            msgr,
            state: Mutex::new(MonState {
                map,
                uuids: HashMap::new(),
                subs: Vec::new(),
                failures: 0,
                reports: HashMap::new(),
            }),
        });
        mon.msgr.add_dispatcher_tail(Arc::new(MonDispatcher(Arc::clone(&mon))));
        mon.msgr.start().unwrap();
        mon.msgr.ready();
        mon
    }

    fn addr(&self) -> SocketAddr {
        self.msgr.my_addr().unwrap()
    }

    fn map(&self) -> OsdMap {
        self.state.lock().map.clone()
    }

    fn commit(&self, f: impl FnOnce(&OsdMap, &mut Incremental)) {
        let mut st = self.state.lock();
        let mut inc = st.map.incremental();
        f(&st.map, &mut inc);
        st.map.apply(&inc).unwrap();
        let update = MapUpdate { full: Some(st.map.clone()), incrementals: vec![] };
        st.subs.retain(|c| !c.is_closed());
        for c in &st.subs {
            let _ = c.send_message(Message::encode(types::MON_MAP, &update));
        }
    }

    fn set_up(&self, osd: OsdId, up: bool) {
        self.commit(|_, inc| {
            inc.osd_changes.insert(osd, OsdChange { up: Some(up), ..OsdChange::default() });
        });
    }

    fn create_pool(&self, id: u32, size: u8, min_size: u8, pg_num: u32) {
        self.commit(|_, inc| {
            let pool = Pool { id: PoolId(id), name: format!("p{id}"), size, min_size, pg_num };
            inc.new_pools.insert(PoolId(id), pool);
        });
    }

    fn handle(&self, conn: &Connection, m: &Message) {
        let Ok(req) = m.decode::<MonRequest>() else { return };
        let reply = match req {
            MonRequest::Subscribe { .. } => {
                let mut st = self.state.lock();
                let update = MapUpdate { full: Some(st.map.clone()), incrementals: vec![] };
                let _ = conn.send_message(Message::encode(types::MON_MAP, &update));
                st.subs.push(conn.clone());
                return;
            }
            MonRequest::OsdNew { uuid, host } => {
                let known = self.state.lock().uuids.get(&uuid).copied();
                let id = match known {
                    Some(id) => id,
                    None => {
                        let mut id = OsdId(0);
                        self.commit(|map, inc| {
                            id = OsdId(map.osds.len() as u32);
                            let info =
                                OsdInfo { addrs: None, up: false, in_: true, weight: WEIGHT_ONE, host };
                            inc.new_osds.insert(id, info);
                        });
                        self.state.lock().uuids.insert(uuid, id);
                        id
                    }
                };
                MonReply::OsdId(id)
            }
            MonRequest::OsdBoot { osd, addrs, .. } => {
                let same =
                    self.state.lock().map.osds.get(&osd).is_some_and(|i| i.up && i.addrs == Some(addrs));
                if !same {
                    self.commit(|_, inc| {
                        let change = OsdChange { up: Some(true), addrs: Some(addrs), ..OsdChange::default() };
                        inc.osd_changes.insert(osd, change);
                    });
                }
                MonReply::Ok
            }
            MonRequest::OsdMarkMeDown { osd } => {
                self.set_up(osd, false);
                MonReply::Ok
            }
            MonRequest::OsdFailure { .. } => {
                self.state.lock().failures += 1;
                MonReply::Ok
            }
            MonRequest::OsdReport { osd, .. } => {
                *self.state.lock().reports.entry(osd).or_default() += 1;
                MonReply::Ok
            }
            MonRequest::Command(_) => MonReply::Ok,
        };
        let _ = conn.send_message(Message::encode(types::MON_REPLY, &reply).with_tid(m.tid));
    }
}

impl Dispatcher for MonDispatcher {
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        if m.msg_type != types::MON_REQUEST {
            return Err(Refused::NotMine(m));
        }
        self.0.handle(conn, &m);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A raw client.

struct Replies(Sender<Message>);

impl Dispatcher for Replies {
    fn can_fast_dispatch(&self, _m: &Message) -> bool {
        true
    }
    fn dispatch(&self, _conn: &Connection, m: Message) -> Result<(), Refused> {
        let _ = self.0.send(m);
        Ok(())
    }
}

struct Client {
    msgr: Messenger,
    rx: Receiver<Message>,
    next_tid: AtomicU64,
}

impl Client {
    fn new(pool: &Arc<WorkerPool>) -> Client {
        let msgr = Messenger::new(Arc::clone(pool), EntityName::client(4242), 99, Default::default());
        msgr.set_policy(EntityType::Osd, Policy::lossy_client());
        let (tx, rx) = crossbeam_channel::unbounded();
        msgr.add_dispatcher_tail(Arc::new(Replies(tx)));
        msgr.start().unwrap();
        Client { msgr, rx, next_tid: AtomicU64::new(1) }
    }

    fn send(&self, map: &OsdMap, to: OsdId, msg: Message) {
        let addr = map.osds[&to].addrs.unwrap().public;
        self.msgr.connect(EntityName::osd(u64::from(to.0)), addr).unwrap().send_message(msg).unwrap();
    }

    fn recv(&self, tid: u64, timeout: Duration) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.rx.recv_deadline(deadline).ok()?;
            if m.tid == tid {
                return Some(m);
            }
        }
    }

    /// Sends one op to the PG's primary (in `mon`'s current map) and waits for the answer, resending on
    /// Misdirected or silence as an Objecter would. `tid` fixes the request id (for resend tests).
    fn op_with(
        &self,
        mon: &FakeMon,
        tid: u64,
        oid: &str,
        ops: Vec<OsdOp>,
        data: &[u8],
        within: Duration,
    ) -> (OsdOpReply, Bytes) {
        let deadline = Instant::now() + within;
        loop {
            let map = mon.map();
            let pool = &map.pools[&PoolId(oid_pool(oid))];
            let pgid = object_to_pg(pool, oid.as_bytes());
            let primary = Placement::new(&map).up_acting(pgid).unwrap().primary;
            if let Some(primary) = primary {
                let req = OsdOpRequest {
                    reqid: ReqId { client: 4242, nonce: 99, tid },
                    pgid,
                    oid: oid.into(),
                    epoch: map.epoch,
                    ops: ops.clone(),
                };
                let msg = Message::encode(types::OSD_OP, &req)
                    .with_tid(tid)
                    .with_data(Bytes::copy_from_slice(data));
                self.send(&map, primary, msg);
                if let Some(m) = self.recv(tid, Duration::from_millis(1500)) {
                    let reply: OsdOpReply = m.decode().unwrap();
                    if !matches!(reply.result, Err(OsdError::Misdirected(_))) {
                        return (reply, m.data.clone());
                    }
                }
            }
            assert!(Instant::now() < deadline, "op on {oid} got no answer within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn op(&self, mon: &FakeMon, oid: &str, ops: Vec<OsdOp>, data: &[u8]) -> (OsdOpReply, Bytes) {
        let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
        self.op_with(mon, tid, oid, ops, data, Duration::from_secs(8))
    }

    fn command(&self, map: &OsdMap, to: OsdId, cmd: &OsdCommand) -> OsdCommandReply {
        let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
        self.send(map, to, Message::encode(types::OSD_COMMAND, cmd).with_tid(tid));
        self.recv(tid, Duration::from_secs(5)).expect("command answered").decode().unwrap()
    }
}

/// Object names carry their pool: "p2/..." lives in pool 2, anything else in pool 1.
fn oid_pool(oid: &str) -> u32 {
    if oid.starts_with("p2/") {
        2
    } else {
        1
    }
}

// ---------------------------------------------------------------------------------------------------------------

fn config(mon: SocketAddr) -> Config {
    Config {
        mon_host: Some(mon),
        fsid: Fsid([7; 16]).to_string(),
        ms_async_op_threads: 2,
        osd_op_num_shards: 2,
        osd_heartbeat_interval: 0.5,
        osd_heartbeat_grace: 5.0,
        rados_mon_op_timeout: 5.0,
        // These tests restart OSDs empty in-process; BlueStore's restarts are the end-to-end tests'.
        osd_objectstore: "memstore".into(),
        ..Config::default()
    }
}

fn data_dir(tag: &str, i: usize) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cuttle-osd-loop-{}-{tag}-{i}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn holders(client: &Client, mon: &FakeMon, oid: &str) -> Vec<OsdId> {
    let map = mon.map();
    let pgid: PgId = object_to_pg(&map.pools[&PoolId(oid_pool(oid))], oid.as_bytes());
    let mut out = Vec::new();
    for (&id, info) in &map.osds {
        if !info.up {
            continue;
        }
        let r = client.command(&map, id, &OsdCommand::ListObjects { pgid });
        if r.result.unwrap().iter().any(|n| n == oid) {
            out.push(id);
        }
    }
    out
}

#[test]
fn three_osds_replicate_recover_and_wait_below_min_size() {
    // Goal: the daemon end to end without real processes: registration and boot, replication to the three
    // OSDs placement names, reads, duplicate suppression, boot-again after a wrong mark-down, PGs of a
    // min_size-3 pool waiting while one OSD is away without stalling the other pool's PGs on the same shards,
    // and a restarted (empty) OSD refilled by peering so the waiting ops complete. Method: three `Osd`s and a
    // fake monitor in-process, a raw client sending OSD_OP messages.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let pool = WorkerPool::new(2).unwrap();
    let mon = FakeMon::start(&pool);
    let cfg = config(mon.addr());
    let dirs: Vec<PathBuf> = (0..3).map(|i| data_dir("a", i)).collect();
    let mut osds: Vec<Option<Osd>> =
        (0..3).map(|i| Some(Osd::start(&cfg, &dirs[i], format!("host{i}")).expect("osd starts"))).collect();
    for o in osds.iter().flatten() {
        assert!(o.wait_until_up(Duration::from_secs(5)), "{} up", o.id());
    }
    mon.create_pool(1, 3, 2, 8);
    mon.create_pool(2, 3, 3, 8);
    let client = Client::new(&pool);

    for n in 0..12 {
        let oid = format!("obj{n}");
        let (r, _) = client.op(&mon, &oid, vec![OsdOp::WriteFull { len: 4 }], &(n as u32).to_le_bytes());
        assert_eq!(r.result, Ok(()), "{oid}");
    }
    let (r, data) = client.op(&mon, "obj3", vec![OsdOp::Read { offset: 0, len: 0 }, OsdOp::Stat], b"");
    assert_eq!(r.result, Ok(()));
    assert_eq!(&data[..], &3u32.to_le_bytes());
    assert!(matches!(r.outs[1], OpOut::Stat { size: 4, .. }));
    assert_eq!(holders(&client, &mon, "obj3"), vec![OsdId(0), OsdId(1), OsdId(2)]);
    let (r, _) = client.op(&mon, "missing", vec![OsdOp::Stat], b"");
    assert_eq!(r.result, Err(OsdError::NotFound));
    let (r, _) = client.op(&mon, &"x".repeat(5000), vec![OsdOp::Stat], b"");
    assert!(matches!(r.result, Err(OsdError::TooLarge(_))));

    // The same request id twice: one append.
    let (a, _) =
        client.op_with(&mon, 777, "log", vec![OsdOp::Append { len: 1 }], b"x", Duration::from_secs(5));
    let (b, _) =
        client.op_with(&mon, 777, "log", vec![OsdOp::Append { len: 1 }], b"x", Duration::from_secs(5));
    assert_eq!((a.result.clone(), a.version), (b.result, b.version));
    let (_, data) = client.op(&mon, "log", vec![OsdOp::Read { offset: 0, len: 0 }], b"");
    assert_eq!(&data[..], b"x");

    // Pool listing through the primaries.
    let map = mon.map();
    let placement = Placement::new(&map);
    let mut listed = Vec::new();
    for seed in 0..8 {
        let pgid = PgId::new(PoolId(1), seed);
        let primary = placement.up_acting(pgid).unwrap().primary.unwrap();
        let req = PgListRequest { pgid, epoch: map.epoch, after: None, max: 100 };
        listed.extend(client.command(&map, primary, &OsdCommand::PgList(req)).result.unwrap());
    }
    listed.sort();
    assert_eq!(listed.len(), 13, "{listed:?}");

    // Wrongly marked down: osd.1 boots again by itself.
    mon.set_up(OsdId(1), false);
    wait_until("osd.1 to boot again", Duration::from_secs(5), || mon.map().osds[&OsdId(1)].up);
    let (r, _) = client.op(&mon, "obj5", vec![OsdOp::WriteFull { len: 2 }], b"v2");
    assert_eq!(r.result, Ok(()));

    // osd.2 leaves cleanly: pool 1 keeps serving (min_size 2), pool 2 (min_size 3) waits.
    let id2 = osds[2].as_ref().unwrap().id();
    osds[2].take().unwrap().shutdown();
    wait_until("osd.2 marked down", Duration::from_secs(5), || !mon.map().osds[&id2].up);
    let waiting_tid = 9_000;
    {
        let map = mon.map();
        let oid = "p2/waits";
        let pgid = object_to_pg(&map.pools[&PoolId(2)], oid.as_bytes());
        let primary = Placement::new(&map).up_acting(pgid).unwrap().primary.unwrap();
        let req = OsdOpRequest {
            reqid: ReqId { client: 4242, nonce: 99, tid: waiting_tid },
            pgid,
            oid: oid.into(),
            epoch: map.epoch,
            ops: vec![OsdOp::WriteFull { len: 1 }],
        };
        client.send(
            &map,
            primary,
            Message::encode(types::OSD_OP, &req).with_tid(waiting_tid).with_data(Bytes::from_static(b"w")),
        );
    }
    let started = Instant::now();
    for n in 0..12 {
        let oid = format!("obj{n}");
        let (r, data) = client.op(&mon, &oid, vec![OsdOp::Read { offset: 0, len: 0 }], b"");
        assert_eq!(r.result, Ok(()), "{oid} readable with two OSDs");
        let want: &[u8] = if n == 5 { b"v2" } else { &(n as u32).to_le_bytes() };
        assert_eq!(&data[..], want);
        let (r, _) = client.op(&mon, &format!("new{n}"), vec![OsdOp::WriteFull { len: 1 }], b"n");
        assert_eq!(r.result, Ok(()));
    }
    assert!(started.elapsed() < Duration::from_secs(3), "pool 1 is not held up by pool 2's waiting PG");
    assert!(
        client.recv(waiting_tid, Duration::from_millis(200)).is_none(),
        "pool 2 op waits, it does not fail"
    );

    // osd.2 restarts empty (MemStore) with the same identity and new addresses: peering refills it, and the
    // waiting op completes.
    let restarted = Osd::start(&cfg, &dirs[2], "host2".into()).expect("restart");
    assert_eq!(restarted.id(), id2, "same id from DATA/whoami");
    assert!(restarted.wait_until_up(Duration::from_secs(5)));
    osds[2] = Some(restarted);
    let m = client.recv(waiting_tid, Duration::from_secs(5)).expect("the waiting op completes");
    assert_eq!(m.decode::<OsdOpReply>().unwrap().result, Ok(()));
    // Recovery copies PG by PG: each object is back on all three within the bound, in no set order.
    for oid in ["obj3", "new7"] {
        wait_until(&format!("osd.2 to hold {oid} again"), Duration::from_secs(5), || {
            holders(&client, &mon, oid).len() == 3
        });
    }
    let (r, data) = client.op(&mon, "obj5", vec![OsdOp::Read { offset: 0, len: 0 }], b"");
    assert_eq!((r.result, &data[..]), (Ok(()), &b"v2"[..]));

    wait_until("PG reports", Duration::from_secs(5), || mon.state.lock().reports.len() == 3);
    for o in osds.iter().flatten() {
        o.shutdown();
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = Epoch(0);
}

#[test]
fn bad_requests_and_garbage_get_typed_errors_and_never_hurt_the_daemon() {
    // Goal: bad input from the network is answered with a typed error or dropped, and the OSD keeps serving.
    // Method: one OSD (pool of size 1) and a raw client sending undecodable bodies, unknown pools and PGs,
    // misplaced and empty object names, unknown message types, and forged replication messages.
    let pool = WorkerPool::new(2).unwrap();
    let mon = FakeMon::start(&pool);
    let cfg = config(mon.addr());
    let dir = data_dir("bad", 0);
    let osd = Osd::start(&cfg, &dir, "solo".into()).expect("osd starts");
    assert!(osd.wait_until_up(Duration::from_secs(5)));
    mon.create_pool(1, 1, 1, 4);
    let client = Client::new(&pool);
    let (r, _) = client.op(&mon, "ok", vec![OsdOp::WriteFull { len: 2 }], b"hi");
    assert_eq!(r.result, Ok(()));

    let map = mon.map();
    let me = osd.id();
    let raw = |tid: u64, msg_type: u16, front: &'static [u8]| {
        client.send(&map, me, Message::new(msg_type, Bytes::from_static(front)).with_tid(tid));
        client.recv(tid, Duration::from_secs(2))
    };
    let reply = raw(5001, types::OSD_OP, b"\xff\xff\xff garbage").expect("answered");
    assert!(matches!(reply.decode::<OsdOpReply>().unwrap().result, Err(OsdError::Invalid(_))));
    let reply = raw(5002, types::OSD_COMMAND, b"\xff\xff").expect("answered");
    assert!(matches!(reply.decode::<OsdCommandReply>().unwrap().result, Err(OsdError::Invalid(_))));
    assert!(raw(5003, 0x0999, b"junk").is_none(), "unknown types are ignored");

    let send = |tid: u64, pgid: PgId, oid: &str, epoch: Epoch| -> OsdOpReply {
        let req = OsdOpRequest {
            reqid: ReqId { client: 1, nonce: 1, tid },
            pgid,
            oid: oid.into(),
            epoch,
            ops: vec![OsdOp::Stat],
        };
        client.send(&map, me, Message::encode(types::OSD_OP, &req).with_tid(tid));
        client.recv(tid, Duration::from_secs(2)).expect("answered").decode().unwrap()
    };
    let pool1 = &map.pools[&PoolId(1)];
    assert_eq!(
        send(6001, PgId::new(PoolId(9), 0), "x", map.epoch).result,
        Err(OsdError::NoSuchPool(PoolId(9)))
    );
    assert!(matches!(
        send(6002, PgId::new(PoolId(1), 100), "x", map.epoch).result,
        Err(OsdError::Invalid(_))
    ));
    let right = object_to_pg(pool1, b"x");
    let wrong = PgId::new(PoolId(1), (right.seed + 1) % 4);
    assert!(matches!(send(6003, wrong, "x", map.epoch).result, Err(OsdError::Invalid(_))));
    assert_eq!(
        send(6004, wrong, "x", Epoch(1)).result,
        Err(OsdError::Misdirected(map.epoch)),
        "older client map"
    );
    assert!(matches!(send(6005, object_to_pg(pool1, b""), "", map.epoch).result, Err(OsdError::Invalid(_))));

    // An op from the future waits for the map instead of being answered from an old one.
    let req = OsdOpRequest {
        reqid: ReqId { client: 1, nonce: 1, tid: 7001 },
        pgid: right,
        oid: "x".into(),
        epoch: Epoch(map.epoch.0 + 1),
        ops: vec![OsdOp::Stat],
    };
    client.send(&map, me, Message::encode(types::OSD_OP, &req).with_tid(7001));
    assert!(client.recv(7001, Duration::from_millis(300)).is_none());
    mon.create_pool(2, 1, 1, 1);
    let m = client.recv(7001, Duration::from_secs(3)).expect("answered once the map arrives");
    assert_eq!(m.decode::<OsdOpReply>().unwrap().result, Err(OsdError::NotFound));

    // Forged replication traffic on the cluster port from a client is dropped.
    let addr = map.osds[&me].addrs.unwrap().cluster;
    let conn = client.msgr.connect(EntityName::osd(u64::from(me.0)), addr).unwrap();
    for t in osd::proto::types::FIRST..=osd::proto::types::PG_NEW_INTERVAL {
        let _ = conn.send_message(Message::new(t, Bytes::from_static(b"\x01\x02\x03")));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (r, data) = client.op(&mon, "ok", vec![OsdOp::Read { offset: 0, len: 0 }], b"");
    assert_eq!((r.result, &data[..]), (Ok(()), &b"hi"[..]));
    osd.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
