//! End-to-end fault tests against a real local cluster: processes on 127.0.0.1, a client library in this
//! process, real signals.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;
use rados::config::Config;
use rados::msg::OsdCommand;
use rados::objecter::IoCtx;
use rados::{OsdId, PgId};

const GRACE_S: u64 = 3;

// Goal: a 10 MiB object put with `rados` reads back byte-identical and exists on exactly the 3 OSDs that
// placement names. Method: rados put/get through the CLI; `cuttle osd map` names the acting set; every OSD is
// asked (OsdCommand::ListObjects) which objects of that PG it holds.
#[test]
fn a_10mib_object_reads_back_and_lives_exactly_where_placement_says() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("place", 4, &[]);
    let data: Vec<u8> = (0..10u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let src = c.dir.join("src.bin");
    let dst = c.dir.join("dst.bin");
    write_file(&src, &data);
    let out = c.rados(&["-p", "rbd", "put", "big-object", src.to_str().unwrap()]);
    assert!(out.status.success(), "put: {}", stderr(&out));
    let out = c.rados(&["-p", "rbd", "get", "big-object", dst.to_str().unwrap()]);
    assert!(out.status.success(), "get: {}", stderr(&out));
    assert!(std::fs::read(&dst).unwrap() == data, "read back byte-identical");
    let m = c.json(&["osd", "map", "rbd", "big-object"]);
    let acting: Vec<u32> =
        m["acting"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(acting.len(), 3, "{m}");
    let pgid: PgId = m["pgid"].as_str().unwrap().parse().unwrap();
    let lib = lib_open(&c.conf());
    for osd in 0..4u32 {
        let r = lib.objecter.osd_command(OsdId(osd), OsdCommand::ListObjects { pgid }).unwrap();
        let names = r.result.unwrap();
        let holds = names.iter().any(|n| n == "big-object");
        assert_eq!(holds, acting.contains(&osd), "osd.{osd} holds={holds}, acting={acting:?}");
    }
}

/// Appends to `objects` objects from `threads` writers, each waiting for its append to be acknowledged before
/// the next, and records every acknowledged entry and the time of every acknowledgement.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Vec<u32>>>>,
    ack_times: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(io: &IoCtx, writers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(vec![Vec::new(); writers]));
        let ack_times = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..writers)
            .map(|w| {
                let (io, stop, acked, ack_times) =
                    (io.clone(), stop.clone(), acked.clone(), ack_times.clone());
                std::thread::spawn(move || {
                    let oid = format!("load-{w}");
                    let mut n = 0u32;
                    while !stop.load(Ordering::Acquire) {
                        n += 1;
                        match io.append(&oid, n.to_le_bytes().to_vec()) {
                            Ok(_) => {
                                acked.lock()[w].push(n);
                                ack_times.lock().push(Instant::now());
                            }
                            Err(e) => panic!("append {n} to {oid} failed: {e}"),
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, ack_times, threads }
    }

    /// The longest gap between consecutive acknowledgements (of any writer) after `from`.
    fn max_stall_after(&self, from: Instant) -> Duration {
        let mut t = self.ack_times.lock().clone();
        t.sort();
        let mut prev = from;
        let mut worst = Duration::ZERO;
        for x in t.into_iter().filter(|x| *x >= from) {
            worst = worst.max(x - prev);
            prev = x;
        }
        worst
    }

    fn acks_after(&self, from: Instant) -> usize {
        self.ack_times.lock().iter().filter(|x| **x > from).count()
    }

    /// Stops the writers and checks every object holds exactly its acknowledged entries, in order.
    fn stop_and_check(self, io: &IoCtx) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        for (w, entries) in self.acked.lock().iter().enumerate() {
            let oid = format!("load-{w}");
            let bytes = io.read(&oid, 0, 0).unwrap_or_else(|e| panic!("reading {oid}: {e}"));
            let got: Vec<u32> = bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(&got, entries, "{oid}: acknowledged appends lost, duplicated or reordered");
        }
    }
}

fn fault_cluster(tag: &str) -> Cluster {
    Cluster::up(
        tag,
        3,
        &[
            "osd_heartbeat_interval=0.5",
            &format!("osd_heartbeat_grace={GRACE_S}"),
            "ms_connection_idle_timeout=10",
        ],
    )
}

// Goal: a killed OSD is noticed, marked down and routed around, losing nothing acknowledged. Method: size 3,
// min_size 2, grace 3 s; 8 writers append to their own objects; kill -9 one OSD; the mon must mark it down
// within grace + 3 s, the longest pause in acknowledgements must stay under that too, writes must continue, and
// every object must read back as exactly its acknowledged appends.
#[test]
fn kill_9_of_an_osd_under_write_load_loses_nothing() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = fault_cluster("kill");
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    let load = Load::start(&io, 8);
    std::thread::sleep(Duration::from_secs(1));
    let t_kill = Instant::now();
    c.signal("osd.1", "KILL");
    let took = c.wait_until("osd.1 marked down", Duration::from_secs(GRACE_S + 6), || !osd_up(&lib, 1));
    assert!(took <= Duration::from_secs(GRACE_S + 3), "marked down after {took:?}");
    let t_down = Instant::now();
    c.wait_until("writes continue", Duration::from_secs(10), || load.acks_after(t_down) > 100);
    std::thread::sleep(Duration::from_secs(1));
    let stall = load.max_stall_after(t_kill);
    assert!(stall <= Duration::from_secs(GRACE_S + 3), "writes stalled for {stall:?}");
    load.stop_and_check(&io);
    eprintln!("kill -9: marked down after {took:?}, longest write stall {stall:?}");
}

// Goal: a hung OSD (SIGSTOP) is detected like a dead one, and after SIGCONT it boots again and serves the
// newest data. Method: as the kill test, with SIGSTOP; after the writes continue, SIGCONT; wait until it is up
// again and the cluster is healthy; keep writing through it, then read everything back.
#[test]
fn sigstop_is_detected_and_sigcont_rejoins_without_stale_reads() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = fault_cluster("stop");
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    let load = Load::start(&io, 8);
    std::thread::sleep(Duration::from_secs(1));
    let t_stop = Instant::now();
    c.signal("osd.2", "STOP");
    let took = c.wait_until("osd.2 marked down", Duration::from_secs(GRACE_S + 6), || !osd_up(&lib, 2));
    assert!(took <= Duration::from_secs(GRACE_S + 3), "marked down after {took:?}");
    let t_down = Instant::now();
    c.wait_until("writes continue", Duration::from_secs(10), || load.acks_after(t_down) > 100);
    let stall = load.max_stall_after(t_stop);
    assert!(stall <= Duration::from_secs(GRACE_S + 3), "writes stalled for {stall:?}");
    c.signal("osd.2", "CONT");
    c.wait_until("osd.2 boots again", Duration::from_secs(20), || osd_up(&lib, 2));
    c.wait_until("HEALTH_OK after it rejoins", Duration::from_secs(30), || {
        c.json(&["health"])["status"] == "HEALTH_OK"
    });
    let t_back = Instant::now();
    c.wait_until("writes continue with it back", Duration::from_secs(10), || load.acks_after(t_back) > 100);
    load.stop_and_check(&io);
    eprintln!("SIGSTOP: marked down after {took:?}, longest write stall {stall:?}");
}

// Goal: a restarted monitor keeps its map, and OSDs and clients reconnect by themselves. Method: note the
// epoch, pools and OSD ids; SIGTERM the monitor; `cuttle up` again restarts it; the in-process client keeps
// writing without being told anything; an OSD marked down through the new monitor boots again (so the OSDs'
// monitor sessions are back too).
#[test]
fn a_restarted_monitor_keeps_its_map_and_everyone_reconnects() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("monrestart", 3, &["osd_heartbeat_interval=0.5", "osd_heartbeat_grace=3"]);
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    io.write_full("before", b"kept".to_vec()).unwrap();
    let before = c.json(&["osd", "dump"]);
    c.signal("mon.0", "TERM");
    c.wait_until("mon.0 exits", Duration::from_secs(10), || !c.dir.join("mon.0.pid").exists());
    let out = std::process::Command::new(cuttle_bin()).args(["up", "--dir"]).arg(&c.dir).output().unwrap();
    assert!(out.status.success(), "restart: {}", String::from_utf8_lossy(&out.stderr));
    let after = c.json(&["osd", "dump"]);
    assert_eq!(after["fsid"], before["fsid"]);
    assert!(after["epoch"].as_u64() >= before["epoch"].as_u64(), "{} -> {}", before["epoch"], after["epoch"]);
    assert_eq!(after["pools"], before["pools"]);
    let ids = |v: &serde_json::Value| {
        v["osds"].as_array().unwrap().iter().map(|o| o["osd"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&after), ids(&before));
    // The client reconnected by itself: it reads and writes, and sees the new monitor's epochs.
    assert_eq!(&io.read("before", 0, 0).unwrap()[..], b"kept");
    io.write_full("after", b"written".to_vec()).unwrap();
    // Marked down through the new monitor, osd.1 boots again at once: two new epochs (down, then up) reach
    // the client, and the cluster log says why.
    let epoch = lib.monc.map().unwrap().epoch;
    let out = c.cuttle(&["osd", "down", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_until("osd.1 down and up again, seen by the client", Duration::from_secs(20), || {
        lib.monc.map().is_some_and(|m| m.epoch.0 >= epoch.0 + 2 && m.is_up(OsdId(1)))
    });
    let log = c.json(&["log", "50"]).to_string();
    assert!(log.contains("osd.1 boot"), "{log}");
    c.wait_until("HEALTH_OK", Duration::from_secs(30), || c.json(&["health"])["status"] == "HEALTH_OK");
    assert_eq!(&io.read("after", 0, 0).unwrap()[..], b"written");
}

// Goal: garbage sent to any daemon port crashes nothing. Method: random bytes and a huge fake frame to the
// monitor and to every OSD address (public, cluster, both heartbeat ports); then the cluster is still healthy
// and serves I/O.
#[test]
fn garbage_to_every_daemon_port_crashes_nothing() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("garbage", 3, &[]);
    let dump = c.json(&["osd", "dump"]);
    let mut addrs: Vec<SocketAddr> = vec![Config::load(&c.conf()).unwrap().mon_host.unwrap()];
    for o in dump["osds"].as_array().unwrap() {
        for k in ["public_addr", "cluster_addr", "heartbeat_front_addr", "heartbeat_back_addr"] {
            addrs.push(o[k].as_str().unwrap().parse().unwrap());
        }
    }
    let mut junk = vec![0u8; 64 * 1024];
    let mut x = 0x1234_5678_9abc_def0u64;
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for a in &addrs {
        for payload in [&junk[..], &b"cuttle1\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xff\xff\xff\xff"[..]] {
            if let Ok(mut s) = TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(payload);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for d in ["mon.0", "osd.0", "osd.1", "osd.2"] {
        assert!(tools::process_alive(c.pid(d)), "{d} died");
    }
    assert_eq!(c.json(&["health"])["status"], "HEALTH_OK");
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    io.write_full("still-works", b"yes".to_vec()).unwrap();
    assert_eq!(&io.read("still-works", 0, 0).unwrap()[..], b"yes");
}

/// Runs `cuttle-osd --fsck --deep` on a stopped OSD's data directory; panics with its report unless clean.
fn fsck_clean(c: &Cluster, osd: u32) {
    let dir = c.dir.join(format!("osd.{osd}"));
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_cuttle-osd"))
        .args(["--fsck", "--deep", "--data"])
        .arg(&dir));
    assert!(out.status.success(), "fsck of osd.{osd}: {}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("clean"), "{}", stdout(&out));
}

// Goal: a power cut of the whole cluster (every daemon killed at once in the middle of a write load) loses no
// acknowledged write and leaves every store consistent. Method: 8 writers append to their own objects (each
// append is acknowledged only once durable on every acting OSD); kill -9 the monitor and every OSD at once;
// `cuttle up` on the same directory; the writers' ops are resent and go on; every object must read back as
// exactly its acknowledged appends (the resent one once); then `cuttle down` and a deep fsck of each OSD.
#[test]
fn kill_9_of_every_daemon_under_write_load_loses_nothing_acknowledged() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("killall", 3, &["rados_osd_op_timeout=60"]);
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    let t0 = Instant::now();
    let load = Load::start(&io, 8);
    c.wait_until("writes flow", Duration::from_secs(10), || load.acks_after(t0) > 200);
    let daemons = ["mon.0", "osd.0", "osd.1", "osd.2"];
    let pids: Vec<u32> = daemons.iter().map(|d| c.pid(d)).collect();
    for d in daemons {
        c.signal(d, "KILL");
    }
    let t_kill = Instant::now();
    for (d, pid) in daemons.into_iter().zip(pids) {
        c.wait_until(&format!("{d} to die"), Duration::from_secs(10), || !tools::process_alive(pid));
    }
    let acked_before = load.acks_after(t0);
    let up = run(std::process::Command::new(cuttle_bin()).args(["up", "--dir"]).arg(&c.dir));
    assert!(up.status.success(), "cuttle up after the power cut: {}{}", stdout(&up), stderr(&up));
    let t_up = Instant::now();
    c.wait_until("writes continue after the restart", Duration::from_secs(60), || {
        load.acks_after(t_up) > 100
    });
    load.stop_and_check(&io);
    eprintln!("power cut: {acked_before} appends acknowledged before it; restart took {:?}", t_up - t_kill);
    drop(lib);
    let down = run(std::process::Command::new(cuttle_bin()).args(["down", "--dir"]).arg(&c.dir));
    assert!(down.status.success(), "{}", stderr(&down));
    for osd in 0..3 {
        fsck_clean(&c, osd);
    }
}
