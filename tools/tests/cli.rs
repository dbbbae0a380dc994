//! End-to-end tests of `cuttle` and `rados` against a real local cluster (processes on 127.0.0.1).

mod common;

use std::time::Duration;

use common::*;

// Goal: `cuttle config help` documents every option with its default (clap's own `help` subcommand once
// shadowed it and printed usage instead). Method: plain and JSON output name every option of
// `rados::config::OPTIONS` with its default; no cluster needed.
#[test]
fn config_help_lists_every_option() {
    let out = std::process::Command::new(cuttle_bin()).args(["config", "help"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for o in rados::config::OPTIONS {
        assert!(
            text.lines().any(|l| l.starts_with(o.name) && l.contains(&o.default_value())),
            "{} missing:\n{text}",
            o.name
        );
    }
    let out = std::process::Command::new(cuttle_bin())
        .args(["config", "help", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), rados::config::OPTIONS.len());
    assert_eq!(v[0]["name"], rados::config::OPTIONS[0].name);
}

// Goal: a reader that goes away (`cuttle config help | head -1`) ends the tool quietly with 141, not with a
// panic and a backtrace. Method: the tool's stdout is a pipe whose read end is closed before it starts (so
// its first write fails however the two processes are scheduled).
#[test]
fn a_closed_stdout_ends_the_tool_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = std::process::Command::new(cuttle_bin())
        .args(["config", "help"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

// Goal: `cuttle up` on a fresh directory reaches HEALTH_OK with 3 OSDs up and in within 10 s, says so when run
// again, and `cuttle down` stops everything; the monitor's address is the one it bound itself (port 0, then
// published), and stays the cluster's across a restart. Method: run the commands; read `cuttle status
// --format json`, the config and the monitor's published address.
#[test]
fn cuttle_up_reaches_health_ok_and_down_stops_it() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("up", 3, &[]);
    assert!(c.up_took < Duration::from_secs(10), "cuttle up took {:?}", c.up_took);
    let st = c.json(&["status"]);
    assert_eq!(st["health"]["status"], "HEALTH_OK", "{st}");
    let mon_host = rados::config::Config::load(&c.conf()).unwrap().mon_host.expect("mon_host is set");
    assert_ne!(mon_host.port(), 0);
    let published = std::fs::read_to_string(c.dir.join("mon.0").join("addr")).unwrap();
    assert_eq!(published.trim(), mon_host.to_string(), "the config names the address the monitor bound");
    assert_eq!(st["osdmap"]["num_osds"], 3);
    assert_eq!(st["osdmap"]["num_up_osds"], 3);
    assert_eq!(st["osdmap"]["num_in_osds"], 3);
    assert!(st["osdmap"]["epoch"].as_u64().unwrap() > 1);
    let tree = c.json(&["osd", "tree"]);
    let osds: Vec<_> = tree["nodes"].as_array().unwrap().iter().filter(|n| n["type"] == "osd").collect();
    assert_eq!(osds.len(), 3);
    assert!(osds.iter().all(|n| n["status"] == "up"), "{tree}");
    let again = std::process::Command::new(cuttle_bin()).args(["up", "--dir"]).arg(&c.dir).output().unwrap();
    assert!(again.status.success());
    assert!(stdout(&again).contains("already up"), "{}", stdout(&again));
    let pools = c.json(&["pool", "ls"]);
    assert!(pools.to_string().contains("\"rbd\""), "{pools}");
    let down = std::process::Command::new(cuttle_bin()).args(["down", "--dir"]).arg(&c.dir).output().unwrap();
    assert!(down.status.success(), "{}", stderr(&down));
    for d in ["mon.0", "osd.0", "osd.1", "osd.2"] {
        assert!(!c.dir.join(format!("{d}.pid")).exists(), "{d} removed its pidfile on exit");
    }
    let up = std::process::Command::new(cuttle_bin()).args(["up", "--dir"]).arg(&c.dir).output().unwrap();
    assert!(up.status.success(), "{}", stderr(&up));
    let again = rados::config::Config::load(&c.conf()).unwrap().mon_host;
    assert_eq!(again, Some(mon_host), "a restarted cluster keeps its monitor address");
    assert_eq!(c.json(&["status"])["osdmap"]["num_up_osds"], 3);
}

// Goal: mistakes give clear errors and non-zero exits, never a crash. Method: bad commands against a live
// cluster, and against a broken config file; the daemons are still up afterwards.
#[test]
fn bad_input_gets_clear_errors() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("bad", 3, &[]);
    let tmp = c.dir.join("in.bin");
    write_file(&tmp, b"hello");
    let long_name = "x".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-p", "nosuchpool", "put", "obj", tmp.to_str().unwrap()], "nosuchpool"),
        (vec!["-p", "rbd", "get", "missing-object", "-"], "missing-object"),
        (vec!["-p", "rbd", "put", "", tmp.to_str().unwrap()], "name"),
        (vec!["-p", "rbd", "stat", &long_name], "name"),
        (vec!["-p", "rbd", "bench", "1", "write", "-b", "lots"], "size"),
    ];
    for (args, needle) in &cases {
        let out = c.rados(args);
        assert!(!out.status.success(), "rados {args:?} should fail");
        let err = stderr(&out).to_lowercase();
        assert!(err.contains(needle), "rados {args:?}: error should mention {needle:?}: {err}");
        assert!(!err.contains("panicked"), "rados {args:?} panicked: {err}");
    }
    let out = c.cuttle(&["osd", "map", "nosuchpool", "obj"]);
    assert!(!out.status.success() && stderr(&out).contains("nosuchpool"), "{}", stderr(&out));
    let out = c.cuttle(&["pool", "rm", "rbd"]);
    assert!(
        !out.status.success() && stderr(&out).contains("yes-i-really-really-mean-it"),
        "{}",
        stderr(&out)
    );
    let out = c.cuttle(&["pool", "create", ""]);
    assert!(!out.status.success(), "an empty pool name is refused");
    let broken = c.dir.join("broken.toml");
    write_file(&broken, b"osd_heartbeat_grace = \"soon\"\nmon_host = 12\n");
    let out = run(std::process::Command::new(cuttle_bin()).args(["status", "--conf"]).arg(&broken));
    assert!(!out.status.success() && stderr(&out).contains("broken.toml"), "{}", stderr(&out));
    let out = run(std::process::Command::new(cuttle_bin())
        .args(["up", "--dir"])
        .arg(c.dir.join("x"))
        .args(["--set", "no_such_option=1"]));
    assert!(!out.status.success() && stderr(&out).contains("no_such_option"), "{}", stderr(&out));
    // The cluster is unharmed.
    assert_eq!(c.json(&["health"])["status"], "HEALTH_OK");
}
