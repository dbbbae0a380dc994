//! The monitor over real sockets on 127.0.0.1: a MonClient gets the map, runs commands, receives pushed
//! epochs and log entries, and survives a monitor restart; garbage does not bring the monitor down.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use messenger::{EntityName, Message, Messenger, MessengerConfig, WorkerPool};
use mon::Monitor;
use rados::config::Config;
use rados::map::OsdAddrs;
use rados::monclient::MonClient;
use rados::msg::{types, MonCommand, MonReply, MonRequest};
use rados::{Epoch, OsdId};

const WAIT: Duration = Duration::from_secs(5);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuttle-mon-loopback-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(mon_host: SocketAddr) -> Config {
    Config {
        fsid: "01234567-89ab-cdef-0123-456789abcdef".into(),
        mon_host: Some(mon_host),
        ms_async_op_threads: 1,
        ms_initial_backoff: 0.01,
        ms_max_backoff: 0.1,
        ..Config::default()
    }
}

/// A client messenger with its own single worker, as a tool would have.
fn client(name: EntityName) -> (Arc<WorkerPool>, Arc<Messenger>) {
    let pool = WorkerPool::new(1).unwrap();
    let cfg = MessengerConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(2),
        ..MessengerConfig::default()
    };
    let nonce = (std::process::id() as u64) << 20 | name.num;
    let msgr = Arc::new(Messenger::new(Arc::clone(&pool), name, nonce, cfg));
    msgr.start().unwrap();
    (pool, msgr)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn monclient_gets_maps_and_pushes_across_a_restart() {
    // Goal: the monitor serves maps, commands, pushed incrementals and the log over the messenger, and a
    // restarted monitor (same address and data dir) has the same pools and epochs while the MonClient
    // reconnects by itself. Method: a Monitor on port 0, a MonClient, a pool create, a restart, another
    // create.
    let dir = scratch("restart");
    let mon = Monitor::start(&config("127.0.0.1:0".parse().unwrap()), &dir).unwrap();
    let addr = mon.addr();
    assert_ne!(addr.port(), 0);

    let (pool, msgr) = client(EntityName::client(1));
    let mc = MonClient::start(Arc::clone(&msgr), addr, false);
    let map = mc.wait_for_map(None, WAIT).unwrap();
    assert_eq!(map.epoch, Epoch(1));
    assert_eq!(map.fsid.to_string(), "01234567-89ab-cdef-0123-456789abcdef");

    let (map_tx, map_rx) = crossbeam_channel::unbounded();
    mc.on_map(move |m| {
        let _ = map_tx.send(m.epoch);
    });
    let (log_tx, log_rx) = crossbeam_channel::unbounded();
    mc.on_log(move |e| {
        let _ = log_tx.send(e.message.clone());
    });
    // on_log resubscribes on the same session, so the monitor sees it before the command below.

    let create = |name: &str| MonCommand::PoolCreate {
        name: name.into(),
        size: Some(2),
        min_size: None,
        pg_num: Some(16),
    };
    let out = json(&mc.command(create("rbd"), WAIT).unwrap());
    assert_eq!(out["pool_id"], 1);
    assert_eq!(map_rx.recv_timeout(WAIT).unwrap(), Epoch(2), "the new epoch is pushed");
    let map = mc.wait_for_map(Some(Epoch(2)), WAIT).unwrap();
    assert_eq!(map.pool_by_name("rbd").map(|p| (p.size, p.pg_num)), Some((2, 16)));
    let logged = log_rx.recv_timeout(WAIT).unwrap();
    assert!(logged.starts_with("pool 'rbd' created"), "{logged}");
    let status = json(&mc.command(MonCommand::Status, WAIT).unwrap());
    assert_eq!(status["osdmap"]["epoch"], 2);
    assert_eq!(status["health"]["status"], "HEALTH_WARN", "no OSDs");

    mon.shutdown();
    drop(mon);
    let mon = Monitor::start(&config(addr), &dir).unwrap();
    assert_eq!(mon.addr(), addr);
    assert_eq!(mon.epoch(), Epoch(2));

    // The MonClient notices the closed session, reconnects, resubscribes and resends what is pending.
    let status = json(&mc.command(MonCommand::Status, WAIT).unwrap());
    assert!(status["osdmap"]["epoch"].as_u64().unwrap() >= 2);
    let pools = json(&mc.command(MonCommand::PoolLs, WAIT).unwrap());
    assert_eq!(pools[0]["pool_name"], "rbd");
    assert_eq!(pools[0]["pool_id"], 1);
    json(&mc.command(create("second"), WAIT).unwrap());
    let map = mc.wait_for_map(Some(Epoch(3)), WAIT).unwrap();
    assert_eq!(map.pool_by_name("second").map(|p| p.id.0), Some(2));
    assert_eq!(map.pool_by_name("rbd").map(|p| p.id.0), Some(1));
    // The callback runs just after the map is installed: wait for it rather than race it.
    let pushed = std::iter::from_fn(|| map_rx.recv_timeout(WAIT).ok()).any(|e| e == Epoch(3));
    assert!(pushed, "the restarted monitor pushes to the resubscribed client");

    mc.shutdown();
    msgr.shutdown();
    pool.shutdown();
    mon.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn osd_registers_boots_and_is_marked_down_over_the_wire() {
    // Goal: the OSD side of the protocol works through the service: `osd new` (idempotent), boot, a
    // clean mark-down, and the map pushed to a subscriber reflects each. Method: a messenger named like an
    // OSD drives a MonClient.
    let dir = scratch("osd");
    let mon = Monitor::start(&config("127.0.0.1:0".parse().unwrap()), &dir).unwrap();
    let (pool, msgr) = client(EntityName::osd(0));
    let mc = MonClient::start(Arc::clone(&msgr), mon.addr(), false);
    mc.wait_for_map(None, WAIT).unwrap();

    let uuid = [7u8; 16];
    let new = MonRequest::OsdNew { uuid, host: "h".into() };
    assert_eq!(mc.request(new.clone(), WAIT).unwrap(), MonReply::OsdId(OsdId(0)));
    assert_eq!(mc.request(new, WAIT).unwrap(), MonReply::OsdId(OsdId(0)));
    let a: SocketAddr = "127.0.0.1:6800".parse().unwrap();
    let addrs = OsdAddrs { public: a, cluster: a, hb_front: a, hb_back: a };
    let boot = MonRequest::OsdBoot { osd: OsdId(0), uuid, addrs, host: "h".into() };
    assert_eq!(mc.request(boot, WAIT).unwrap(), MonReply::Ok);
    let map = mc.wait_for_map(Some(Epoch(3)), WAIT).unwrap();
    assert!(map.is_up(OsdId(0)) && map.is_in(OsdId(0)));
    assert_eq!(mc.request(MonRequest::OsdMarkMeDown { osd: OsdId(0) }, WAIT).unwrap(), MonReply::Ok);
    let map = mc.wait_for_map(Some(Epoch(4)), WAIT).unwrap();
    assert!(!map.is_up(OsdId(0)));
    let tree = json(&mc.command(MonCommand::OsdTree, WAIT).unwrap());
    assert_eq!(tree["nodes"][2]["status"], "down");

    mc.shutdown();
    msgr.shutdown();
    pool.shutdown();
    mon.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn garbage_does_not_stop_the_monitor() {
    // Goal: bytes that are not our protocol, undecodable requests and messages of foreign types are
    // dropped and the monitor keeps serving. Method: a raw TCP client, a messenger sending bad messages,
    // then a normal command.
    let dir = scratch("garbage");
    let mon = Monitor::start(&config("127.0.0.1:0".parse().unwrap()), &dir).unwrap();
    let addr = mon.addr();

    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let _ = raw.write_all(&[0xde; 4096]);
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink); // The monitor closes the socket.

    let (pool, msgr) = client(EntityName::client(2));
    let conn = msgr.connect(EntityName::mon(0), addr).unwrap();
    conn.send_message(Message::encode(types::MON_REQUEST, &vec![0xffu8; 32]).with_tid(1)).unwrap();
    conn.send_message(Message::encode(types::OSD_OP, &"not for the monitor").with_tid(2)).unwrap();
    conn.send_message(Message::encode(0x7777, &()).with_tid(3)).unwrap();

    let mc = MonClient::start(Arc::clone(&msgr), addr, false);
    let health = json(&mc.command(MonCommand::Health, WAIT).unwrap());
    assert_eq!(health["status"], "HEALTH_WARN");
    assert_eq!(health["checks"]["TOO_FEW_OSDS"]["summary"]["message"], "no osds");
    let long = MonCommand::PoolCreate { name: "x".repeat(10_000), size: None, min_size: None, pg_num: None };
    assert!(mc.command(long, WAIT).is_err());
    assert!(!mon.is_failed());

    mc.shutdown();
    msgr.shutdown();
    pool.shutdown();
    mon.shutdown();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn start_fails_cleanly_on_bad_config_and_busy_port() {
    // Goal: missing mon_host, missing fsid, a port in use and a data dir in use are errors, not panics.
    // Method: start monitors that cannot run.
    let dir = scratch("bad");
    let mut cfg = config("127.0.0.1:0".parse().unwrap());
    cfg.mon_host = None;
    assert!(matches!(Monitor::start(&cfg, &dir), Err(mon::MonitorError::NoMonHost)));
    let mut cfg = config("127.0.0.1:0".parse().unwrap());
    cfg.fsid.clear();
    assert!(matches!(Monitor::start(&cfg, &dir), Err(mon::MonitorError::Options(_))));

    let mon = Monitor::start(&config("127.0.0.1:0".parse().unwrap()), &dir).unwrap();
    let e = Monitor::start(&config(mon.addr()), &scratch("bad2")).unwrap_err();
    assert!(matches!(e, mon::MonitorError::Messenger(_)), "{e}");
    let e = Monitor::start(&config("127.0.0.1:0".parse().unwrap()), &dir).unwrap_err();
    assert!(matches!(e, mon::MonitorError::Store(mon::StoreError::InUse { .. })), "{e}");
    mon.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(scratch("bad2"));
}
