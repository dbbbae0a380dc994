//! End-to-end tests of a local cluster's daemon lifecycle: `cuttle up` on an existing cluster, `cuttle
//! start|stop|restart`, detaching daemons, pidfiles that outlive their process, and what the cluster log and
//! health say while an OSD restarts. Real processes on 127.0.0.1 (daemons bind port 0).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rados::msg::MonCommand;

/// Short failure detection, so that a killed OSD is marked down in seconds.
const FAST: &[&str] = &["osd_heartbeat_grace=3", "osd_heartbeat_interval=1"];

fn cuttle_dir(c: &Cluster, args: &[&str]) -> std::process::Output {
    run(Command::new(cuttle_bin()).args(args).arg("--dir").arg(&c.dir))
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}{}", stdout(o), stderr(o));
    stdout(o)
}

fn num_up(c: &Cluster) -> u64 {
    c.json(&["status"])["osdmap"]["num_up_osds"].as_u64().unwrap()
}

fn osd_bin() -> std::path::PathBuf {
    std::path::Path::new(cuttle_bin()).with_file_name("cuttle-osd")
}

// Goal: a dead OSD can be brought back: `cuttle up` on the directory starts the daemons that are not running
// and names them (it used to answer "cluster already up" from the monitor alone); `cuttle stop|start|restart
// osd.N` and `mon.X` do what systemctl does for one daemon; `cuttle-osd` without -f detaches once it has
// booted, and with -f stays in the foreground. Method: kill -9 osd.1, then the commands, each checked by its
// output, the pidfiles and the cluster's status; bad daemon names are refused.
#[test]
fn a_dead_osd_is_brought_back_and_daemons_start_and_stop_one_by_one() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("life", 3, FAST);
    let killed = c.pid("osd.1");
    c.signal("osd.1", "KILL");
    c.wait_until("osd.1 to die", Duration::from_secs(10), || !tools::process_alive(killed));
    let out = ok(&cuttle_dir(&c, &["up"]), "cuttle up");
    assert!(out.contains("started osd.1"), "{out}");
    assert!(
        !out.contains("already up") && !out.contains("started osd.0") && !out.contains("started mon.0"),
        "{out}"
    );
    assert!(out.contains("HEALTH_OK"), "{out}");
    assert_eq!(num_up(&c), 3);
    let out = ok(&cuttle_dir(&c, &["up"]), "cuttle up");
    assert!(out.contains("already up"), "{out}");

    let pid = c.pid("osd.1");
    let out = ok(&c.cuttle(&["stop", "osd.1"]), "cuttle stop");
    assert_eq!(out.trim(), format!("stopped osd.1 (pid {pid})"));
    assert!(!tools::process_alive(pid) && c.running("osd.1").is_none());
    assert!(!c.dir.join("osd.1.pid").exists());
    c.wait_until("osd.1 marked down", Duration::from_secs(10), || num_up(&c) == 2);
    assert_eq!(ok(&c.cuttle(&["stop", "osd.1"]), "cuttle stop").trim(), "osd.1 is not running");

    let out = ok(&c.cuttle(&["start", "osd.1"]), "cuttle start");
    let started = c.pid("osd.1");
    assert_eq!(out.trim(), format!("started osd.1 (pid {started})"));
    assert_eq!(num_up(&c), 3, "start returns once the OSD has booted");
    assert_eq!(
        ok(&c.cuttle(&["start", "osd.1"]), "start").trim(),
        format!("osd.1 is already running (pid {started})")
    );

    let out = ok(&c.cuttle(&["restart", "osd.1"]), "cuttle restart");
    let again = c.pid("osd.1");
    assert_ne!(again, started);
    assert_eq!(out, format!("stopped osd.1 (pid {started})\nstarted osd.1 (pid {again})\n"));
    assert_eq!(num_up(&c), 3);

    let mon = c.pid("mon.0");
    let out = ok(&c.cuttle(&["restart", "mon.0"]), "cuttle restart mon.0");
    assert!(out.starts_with(&format!("stopped mon.0 (pid {mon})\nstarted mon.0")), "{out}");
    c.wait_until("HEALTH_OK after the monitor restarts", Duration::from_secs(30), || {
        c.json(&["health"])["status"] == "HEALTH_OK"
    });

    // The daemon binary itself: without -f it returns once booted and the OSD runs on, detached.
    ok(&c.cuttle(&["stop", "osd.2"]), "cuttle stop osd.2");
    let data = c.dir.join("osd.2");
    let args = |fg: bool| {
        let mut cmd = Command::new(osd_bin());
        cmd.arg("--conf")
            .arg(c.conf())
            .arg("--data")
            .arg(&data)
            .arg("--pid-file")
            .arg(c.dir.join("osd.2.pid"));
        cmd.arg("--log-file").arg(c.dir.join("osd.2.log"));
        if fg {
            cmd.arg("-f");
        }
        cmd
    };
    let t = Instant::now();
    let o = run(&mut args(false));
    assert!(o.status.success(), "cuttle-osd: {}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(30), "detached in {:?}", t.elapsed());
    let detached = c.running("osd.2").expect("the detached OSD runs on");
    assert_eq!(num_up(&c), 3);
    ok(&c.cuttle(&["stop", "osd.2"]), "cuttle stop osd.2");
    assert!(!tools::process_alive(detached));
    // With -f the process we started is the daemon.
    let mut child =
        args(true).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    c.wait_until("the foreground OSD's pidfile", Duration::from_secs(30), || {
        c.running("osd.2") == Some(child.id())
    });
    assert!(child.try_wait().unwrap().is_none(), "-f stays in the foreground");
    ok(&c.cuttle(&["stop", "osd.2"]), "cuttle stop osd.2");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(20), "the foreground OSD did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&c.cuttle(&["start", "osd.2"]), "cuttle start osd.2");

    for (args, needle) in [
        (vec!["start", "osd.7"], "has no osd.7"),
        (vec!["stop", "osd.x"], "expected osd.N or mon.X"),
        (vec!["restart", "client.admin"], "expected osd.N or mon.X"),
    ] {
        let o = c.cuttle(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // A daemon that cannot start says why through the process that detached it.
    let o = run(Command::new(osd_bin())
        .arg("--conf")
        .arg(c.dir.join("none.toml"))
        .arg("--data")
        .arg(c.dir.join("x")));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("cuttle-osd: cannot read") && stderr(&o).contains("none.toml"),
        "{}",
        stderr(&o)
    );
    let o = run(Command::new(cuttle_bin()).args(["stop", "osd.0", "--dir"]).arg(c.dir.join("nowhere")));
    assert!(!o.status.success() && stderr(&o).contains("no cluster directory"), "{}", stderr(&o));
    assert_eq!(c.json(&["health"])["status"], "HEALTH_OK");
}

// Goal: the directory remembers the cluster's shape: after `cuttle up --osds 2` and `cuttle down`, a plain
// `cuttle up` brings back 2 OSDs (it used to wait 60 s for 3 and fail), `--osds 3` adds one to the running
// cluster, and `--osds 1` is refused (never silently ignored or removed). Method: the commands and `cuttle
// status`.
#[test]
fn cuttle_up_keeps_the_clusters_shape_and_adds_osds() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("shape", 2, FAST);
    ok(&cuttle_dir(&c, &["down"]), "cuttle down");
    let t = Instant::now();
    let out = ok(&cuttle_dir(&c, &["up", "--timeout", "30"]), "cuttle up");
    assert!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    assert!(
        out.contains("started mon.0") && out.contains("started osd.1") && out.contains("2 osds"),
        "{out}"
    );
    let st = c.json(&["status"]);
    assert_eq!((st["osdmap"]["num_osds"].as_u64(), st["osdmap"]["num_up_osds"].as_u64()), (Some(2), Some(2)));

    let out = ok(&cuttle_dir(&c, &["up", "--osds", "3"]), "cuttle up --osds 3");
    assert!(
        out.contains("started osd.2") && !out.contains("started osd.0") && out.contains("3 osds"),
        "{out}"
    );
    let st = c.json(&["status"]);
    assert_eq!(st["osdmap"]["num_up_osds"], 3);
    assert_eq!(st["osdmap"]["num_in_osds"], 3);
    assert_eq!(st["health"]["status"], "HEALTH_OK");
    assert!(c.dir.join("osd.2").join("whoami").exists());

    let o = cuttle_dir(&c, &["up", "--osds", "1"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("holds 3 OSDs") && stderr(&o).contains("never removes"), "{}", stderr(&o));
    assert_eq!(num_up(&c), 3, "nothing was stopped");
    ok(&cuttle_dir(&c, &["down"]), "cuttle down");
    let out = ok(&cuttle_dir(&c, &["up"]), "cuttle up");
    assert!(out.contains("3 osds"), "{out}");
}

// Goal: a pidfile whose pid now names another process (after a kill -9 the pid is free for reuse) is never
// trusted: `cuttle stop`, `cuttle down` and `cuttle up` say it is stale, remove it, and signal nothing.
// Method: osd.1 is stopped, then its pidfile is made to name (a) a `sleep` this test started, (b) osd.0,
// (c) the sleep with a start time it does not have; each process must survive, and osd.1 then starts.
#[test]
fn a_pidfile_naming_another_process_is_stale_and_never_signalled() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("pidfile", 2, FAST);
    let mut sleeper = Command::new("sleep").arg("120").spawn().expect("sleep");
    let sleep_pid = sleeper.id();
    ok(&c.cuttle(&["stop", "osd.1"]), "cuttle stop osd.1");
    let pidfile = c.dir.join("osd.1.pid");
    let osd0 = c.pid("osd.0");
    let osd0_start = tools::process_start_time(osd0).unwrap();
    let sleep_start = tools::process_start_time(sleep_pid).unwrap();
    let cases = [
        (format!("{sleep_pid}\n"), "is sleep, not cuttle-osd"),
        (format!("{osd0} {osd0_start}\n"), "another cuttle-osd"),
        (format!("{sleep_pid} {}\n", sleep_start + 1), "newer process"),
    ];
    for (content, why) in &cases {
        write_file(&pidfile, content.as_bytes());
        let o = c.cuttle(&["stop", "osd.1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim(), "osd.1 is not running");
        assert!(
            stderr(&o).contains("stale pidfile") && stderr(&o).contains(why),
            "{content}: {}",
            stderr(&o)
        );
        assert!(!pidfile.exists(), "the stale pidfile is removed");
        assert!(tools::process_alive(sleep_pid) && tools::process_alive(osd0), "nothing was signalled");
    }
    write_file(&pidfile, format!("{sleep_pid}\n").as_bytes());
    let out = ok(&cuttle_dir(&c, &["up"]), "cuttle up");
    assert!(out.contains("started osd.1"), "{out}");
    assert!(tools::process_alive(sleep_pid));
    ok(&c.cuttle(&["stop", "osd.1"]), "cuttle stop osd.1");
    write_file(&pidfile, format!("{sleep_pid}\n").as_bytes());
    let o = cuttle_dir(&c, &["down"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("osd.1: stale pidfile"), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        format!("stopped 2 daemons in {}", c.dir.canonicalize().unwrap().display())
    );
    assert!(tools::process_alive(sleep_pid), "cuttle down signalled the sleeper");
    assert!(!tools::process_alive(osd0), "osd.0 was stopped through its own pidfile");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

// Goal: restarting an OSD is reported as what it is. The cluster log says "osd.1 boot (restarted; was down
// ... after it failed)" after a kill -9, "... after it stopped" after `cuttle restart`, never "wrongly marked
// down"; and health is at worst HEALTH_WARN while PGs wait for the restarted OSD (no HEALTH_ERR "pgs
// inactive" for a couple of seconds at every restart). Method: a client polls health every 50 ms throughout;
// osd.1 is killed, marked down, started again, then restarted; the log is read at the end.
#[test]
fn a_restarted_osd_is_logged_as_restarted_and_health_stays_at_warn() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("restart", 3, FAST);
    let lib = lib_open(&c.conf());
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        let monc = Arc::clone(&lib.monc);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Acquire) {
                if let Ok(text) = monc.command(MonCommand::Health, Duration::from_secs(5)) {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if v["status"] != "HEALTH_OK" {
                        seen.push(v.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    c.signal("osd.1", "KILL");
    c.wait_until("osd.1 marked down", Duration::from_secs(30), || !osd_up(&lib, 1));
    // Writes while osd.1 is down: its PGs have objects to recover when it comes back, so they peer for a
    // while before its first report.
    let bench = ["-p", "rbd", "bench", "2", "write", "-b", "64K", "-t", "16", "--no-cleanup"];
    ok(&c.rados(&bench), "rados bench");
    ok(&c.cuttle(&["start", "osd.1"]), "cuttle start osd.1");
    c.wait_until("HEALTH_OK", Duration::from_secs(30), || c.json(&["health"])["status"] == "HEALTH_OK");
    ok(&c.cuttle(&["restart", "osd.1"]), "cuttle restart osd.1");
    c.wait_until("HEALTH_OK", Duration::from_secs(30), || c.json(&["health"])["status"] == "HEALTH_OK");
    stop.store(true, Ordering::Release);
    let seen = poller.join().unwrap();
    assert!(!seen.is_empty(), "the restarts were seen (OSD_DOWN at least)");
    assert!(seen.iter().all(|h| !h.contains("HEALTH_ERR")), "{seen:#?}");
    let log = ok(&c.cuttle(&["log", "200"]), "cuttle log");
    let boots: Vec<&str> = log.lines().filter(|l| l.contains("osd.1 boot")).collect();
    assert_eq!(boots.len(), 3, "{log}");
    assert!(
        boots[1].contains("osd.1 boot (restarted; was down ") && boots[1].ends_with(" after it failed)"),
        "{log}"
    );
    assert!(
        boots[2].contains("osd.1 boot (restarted; was down ") && boots[2].ends_with(" after it stopped)"),
        "{log}"
    );
    assert!(!log.contains("wrongly") && !log.contains("[ERR]"), "{log}");
}
