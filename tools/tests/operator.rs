//! The operator's day (issue 18): the commands and flags a Ceph user reaches for, and the messages they read,
//! checked end to end against the real binaries. One cluster serves every check that needs one.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn cuttle_mon_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cuttle-mon")
}

fn cuttle_osd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cuttle-osd")
}

/// No Rust syntax and no Debug output in what a user reads.
fn assert_no_rust(what: &str, text: &str) {
    for rust in ["..=", "Some(", "None", "OsdId(", "EntityName {", "<<", "to_string()", "ty: Client"] {
        assert!(!text.contains(rust), "{what} shows Rust ({rust}): {text}");
    }
}

/// The argument lines of one `--help` page that have no description: lines in the Arguments and Options
/// sections that name an argument and say nothing after it.
fn undescribed(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_args = false;
    let lines: Vec<&str> = help.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_args = *line == "Arguments:" || *line == "Options:";
            continue;
        }
        if !in_args || !line.starts_with("  ") || line.starts_with("   ") {
            continue;
        }
        // `  -p, --pool <POOL>  The pool...` (clap puts two spaces between the name and its description), or
        // the description on the next line, indented further (clap's long help).
        let inline = line.trim().contains("  ");
        let next_line = lines.get(i + 1).is_some_and(|n| n.starts_with("      ") && !n.trim().is_empty());
        if !inline && !next_line {
            out.push(line.trim().to_string());
        }
    }
    out
}

/// The subcommands a `--help` page lists.
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_cmds = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_cmds = line == "Commands:";
            continue;
        }
        if in_cmds && line.starts_with("  ") && !line.starts_with("   ") {
            let name = line.split_whitespace().next().unwrap_or("");
            if name != "help" {
                out.push(name.to_string());
            }
        }
    }
    out
}

fn help_of(bin: &str, path: &[String]) -> String {
    let out = run(Command::new(bin).args(path).arg("--help"));
    assert!(out.status.success(), "{bin} {path:?} --help: {}", stderr(&out));
    stdout(&out)
}

// Goal: every argument of every command of cuttle, rados and rbd has a description in `--help`, and
// `cuttle config --help` lists `help`. Method: walk each tool's `--help` pages through their Commands lists
// and look for argument lines with nothing after the name.
#[test]
fn every_argument_has_a_description() {
    let mut missing = Vec::new();
    for bin in [cuttle_bin(), rados_bin(), rbd_bin()] {
        let mut todo: Vec<Vec<String>> = vec![vec![]];
        let mut pages = 0;
        while let Some(path) = todo.pop() {
            let help = help_of(bin, &path);
            pages += 1;
            for arg in undescribed(&help) {
                missing.push(format!("{bin} {} {arg}", path.join(" ")));
            }
            for sub in subcommands(&help) {
                let mut p = path.clone();
                p.push(sub);
                todo.push(p);
            }
        }
        assert!(pages > 5, "{bin}: only {pages} help pages found");
    }
    assert!(missing.is_empty(), "arguments without a description:\n{}", missing.join("\n"));
    let config = help_of(cuttle_bin(), &["config".to_string()]);
    assert!(subcommands(&config).contains(&"help".to_string()) || config.contains("\n  help "), "{config}");
}

// Goal: `--version` works on every tool. Method: run each binary with it.
#[test]
fn every_tool_has_a_version() {
    for (bin, name) in [
        (cuttle_bin(), "cuttle"),
        (rados_bin(), "rados"),
        (rbd_bin(), "rbd"),
        (cuttle_mon_bin(), "cuttle-mon"),
        (cuttle_osd_bin(), "cuttle-osd"),
    ] {
        let out = run(Command::new(bin).arg("--version"));
        assert!(out.status.success(), "{name} --version: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}

// Goal: `cuttle config help` shows defaults as values (`100 MiB`, `host`), not Rust source; `--set` with a
// value of the wrong type names the option and the type it wants. Method: read the table; run `cuttle up`
// with a bad value into a fresh directory (it fails before starting anything).
#[test]
fn config_shows_values_and_names_bad_ones() {
    let out = run(Command::new(cuttle_bin()).args(["config", "help"]));
    let text = stdout(&out);
    let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or("").to_string();
    assert!(
        line("ms_dispatch_throttle_bytes ").contains(" 100 MiB "),
        "{}",
        line("ms_dispatch_throttle_bytes ")
    );
    assert!(line("mon_osd_reporter_subtree_level ").contains(" host "), "{text}");
    assert_no_rust("config help", &text.replace("(none)", ""));
    for l in text.lines() {
        // The name and default columns (the help after them may quote values).
        let columns: String = l.chars().take(57).collect();
        assert!(!columns.contains('"'), "a default shown as a Rust string: {l}");
    }
    let dir = scratch_dir("badset");
    let out = run(Command::new(cuttle_bin())
        .args(["up", "--dir"])
        .arg(&dir)
        .args(["--set", "osd_heartbeat_grace=abc"]));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("osd_heartbeat_grace") && err.contains("expected a number"), "{err}");
}

/// `rbd --conf <c> ARGS` without a 60 s bound's panic hiding how long it took.
fn timed_rbd(c: &Cluster, args: &[&str]) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let o = rbd(c, args);
    (o, t.elapsed())
}

fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}{}", stdout(o), stderr(o));
    stdout(o)
}

fn fails(o: &std::process::Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} should fail: {}", stdout(o));
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    assert_no_rust(what, &err);
    err
}

// Goal: on one live cluster, each command and message of the operator's day as a Ceph user expects it.
// Method: run the CLI as a user would and check what it prints; every wait polls with a deadline.
#[test]
fn the_operators_day() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("opday", 3, &[]);
    status_shows_mon_objects_usage_and_client_io(&c);
    formats_and_plain_output(&c);
    osd_ids_health_detail_and_versions(&c);
    monitor_errors_read_plainly(&c);
    rados_commands(&c);
    rbd_commands(&c);
    sparse_images_are_walked_by_listing(&c);
    the_monitor_log_is_not_client_disconnects(&c);
}

fn status_shows_mon_objects_usage_and_client_io(c: &Cluster) {
    // Writes for long enough that two OSD reports (every 2 s) see them.
    let mut bench = Command::new(rados_bin())
        .arg("--conf")
        .arg(c.conf())
        .args(["-p", "rbd", "bench", "8", "write", "-b", "4K", "-t", "4", "--no-cleanup"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rados bench");
    let mut seen = Value::Null;
    c.wait_until("client write rates in status", Duration::from_secs(30), || {
        seen = c.json(&["status"]);
        seen["pgmap"]["write_op_per_sec"].as_u64().unwrap_or(0) > 0
    });
    assert!(seen["pgmap"]["write_bytes_sec"].as_u64().unwrap() > 0, "{seen}");
    let plain = ok(&c.cuttle(&["-s"]), "cuttle -s");
    assert_eq!(plain.lines().next(), Some("  cluster:"), "{plain}");
    assert!(plain.contains("    mon: 1 daemons, quorum 0 (age "), "{plain}");
    assert!(plain.contains("    osd: 3 osds: 3 up, 3 in"), "{plain}");
    assert!(plain.contains("    objects: ") && plain.contains(" objects, "), "{plain}");
    assert!(
        plain.contains("    usage:   ") && plain.contains(" used, ") && plain.contains(" avail"),
        "{plain}"
    );
    let io =
        plain.lines().find(|l| l.trim_start().starts_with("client:")).unwrap_or_else(|| panic!("{plain}"));
    assert!(io.contains("/s rd") && io.contains("/s wr") && io.contains("op/s wr"), "{io}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while bench.try_wait().expect("waiting for rados bench").is_none() {
        assert!(Instant::now() < deadline, "rados bench did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = bench.wait_with_output().unwrap();
    assert!(out.status.success(), "rados bench: {}", stderr(&out));
}

fn formats_and_plain_output(c: &Cluster) {
    let pretty = ok(&c.cuttle(&["status", "--format", "json-pretty"]), "status json-pretty");
    let v: Value = serde_json::from_str(&pretty).expect("json-pretty is JSON");
    assert!(v["fsid"].is_string() && pretty.contains("\n  \"fsid\""), "{pretty}");
    let one_line = ok(&c.cuttle(&["status", "--format", "json"]), "status json");
    assert_eq!(one_line.trim().lines().count(), 1);
    let pools = ok(&c.rados(&["lspools", "--format", "json-pretty"]), "rados lspools json-pretty");
    assert_eq!(serde_json::from_str::<Value>(&pools).unwrap(), serde_json::json!(["rbd"]));
    // osd dump in plain format is not JSON.
    let dump = ok(&c.cuttle(&["osd", "dump"]), "osd dump");
    assert!(dump.starts_with("epoch "), "{dump}");
    assert!(dump.contains("pool 1 'rbd' replicated size 3 min_size 2 pg_num 32"), "{dump}");
    assert!(dump.lines().any(|l| l.starts_with("osd.0 up   in")), "{dump}");
    assert!(!dump.contains('{'), "{dump}");
    // cuttle log prints the entries.
    let log = ok(&c.cuttle(&["log"]), "cuttle log");
    assert!(log.lines().count() >= 3, "{log}");
    assert!(log.contains("created cluster") && log.contains("[INF]"), "{log}");
    let log2 = ok(&c.cuttle(&["log", "2"]), "cuttle log 2");
    assert_eq!(log2.lines().count(), 2, "{log2}");
}

fn osd_ids_health_detail_and_versions(c: &Cluster) {
    // Ceph takes both spellings.
    let out = ok(&c.cuttle(&["osd", "out", "osd.2"]), "osd out osd.2");
    assert_eq!(out.trim(), "marked out osd.2.");
    let out = ok(&c.cuttle(&["osd", "out", "2"]), "osd out 2");
    assert_eq!(out.trim(), "osd.2 is already out.");
    let err = fails(&c.cuttle(&["osd", "out", "osd.x"]), "osd out osd.x");
    assert!(err.contains("osd.x"), "{err}");
    // Out of 3 OSDs for 3 replicas: the PGs are undersized; detail names them.
    let mut detail = String::new();
    c.wait_until("PG_DEGRADED in health detail", Duration::from_secs(30), || {
        detail = stdout(&c.cuttle(&["health", "detail"]));
        detail.contains("[WRN] PG_DEGRADED: ") && detail.contains("\n    pg 1.")
    });
    assert!(detail.starts_with("HEALTH_WARN Degraded data redundancy: "), "{detail}");
    assert!(
        detail.lines().any(|l| l.starts_with("    pg 1.") && l.contains(" is active+undersized")),
        "{detail}"
    );
    let j = c.json(&["health", "detail"]);
    assert!(j["checks"]["PG_DEGRADED"]["detail"][0]["message"].as_str().unwrap().starts_with("pg 1."), "{j}");
    let plain = ok(&c.cuttle(&["health"]), "health");
    assert!(!plain.contains("    pg 1."), "plain health has no detail: {plain}");
    ok(&c.cuttle(&["osd", "in", "osd.2"]), "osd in osd.2");
    c.wait_until("HEALTH_OK again", Duration::from_secs(30), || c.json(&["health"])["status"] == "HEALTH_OK");
    // versions: the monitor and the three OSDs, one version.
    let version = format!("cuttle version {}", env!("CARGO_PKG_VERSION"));
    let mut v = Value::Null;
    c.wait_until("every OSD in versions", Duration::from_secs(20), || {
        v = c.json(&["versions"]);
        v["osd"][&version] == 3
    });
    assert_eq!(v["mon"][&version], 1, "{v}");
    assert_eq!(v["overall"][&version], 4, "{v}");
    let plain = ok(&c.cuttle(&["versions"]), "versions");
    assert!(plain.contains(&format!("\"{version}\": 3")), "{plain}");
}

fn monitor_errors_read_plainly(c: &Cluster) {
    let err = fails(&c.cuttle(&["pool", "rm", "p5", "p5", "--yes-i-really-really-mean-it"]), "pool rm p5");
    assert_eq!(err.trim(), "cuttle: pool 'p5' does not exist");
    let err = fails(&c.cuttle(&["pool", "create", "p0", "--pg-num", "0"]), "pool create --pg-num 0");
    assert!(err.contains("pg_num 0") && err.contains("1 to 65536"), "{err}");
    ok(&c.cuttle(&["pool", "create", "p2", "--pg-num", "8"]), "pool create p2");
    let again = ok(&c.cuttle(&["pool", "create", "p2", "--pg-num", "8"]), "pool create p2 again");
    assert_eq!(again.trim(), "pool 'p2' already exists");
    let first = ok(&c.cuttle(&["pool", "create", "p3", "--pg-num", "8"]), "pool create p3");
    assert!(first.contains("pool 'p3' created"), "{first}");
}

fn rados_commands(c: &Cluster) {
    // What `bench --no-cleanup` left is there until `cleanup`.
    let ls = ok(&c.rados(&["-p", "rbd", "ls"]), "rados ls");
    let left = ls.lines().filter(|l| l.starts_with("benchmark_data")).count();
    assert!(left > 0, "bench --no-cleanup left objects: {ls}");
    // `rados ls | head`: a reader that goes away ends the listing quietly.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(rados_bin())
        .arg("--conf")
        .arg(c.conf())
        .args(["-p", "rbd", "ls"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert_eq!(stderr(&out), "", "no Broken pipe error");
    // df
    let df = ok(&c.rados(&["df"]), "rados df");
    assert!(df.starts_with("POOL_NAME "), "{df}");
    let rbd_line = df.lines().find(|l| l.starts_with("rbd ")).unwrap_or_else(|| panic!("{df}"));
    assert!(rbd_line.split_whitespace().any(|w| w.parse::<usize>().is_ok_and(|n| n > 0)), "{df}");
    assert!(df.contains("\ntotal_objects ") && df.contains("\ntotal_space "), "{df}");
    let j: Value = serde_json::from_str(&ok(&c.rados(&["df", "--format", "json"]), "rados df json")).unwrap();
    assert!(j["pools"].as_array().unwrap().iter().any(|p| p["name"] == "rbd"), "{j}");
    // lspools
    let pools = ok(&c.rados(&["lspools"]), "rados lspools");
    assert_eq!(pools, "rbd\np2\np3\n");
    // listxattr
    let tmp = c.dir.join("x.bin");
    write_file(&tmp, b"x");
    ok(&c.rados(&["-p", "rbd", "put", "xo", tmp.to_str().unwrap()]), "rados put");
    ok(&c.rados(&["-p", "rbd", "setxattr", "xo", "user.b", "2"]), "setxattr");
    ok(&c.rados(&["-p", "rbd", "setxattr", "xo", "user.a", "1"]), "setxattr");
    assert_eq!(ok(&c.rados(&["-p", "rbd", "listxattr", "xo"]), "listxattr"), "user.a\nuser.b\n");
    let err = fails(&c.rados(&["-p", "rbd", "listxattr", "nosuch"]), "listxattr nosuch");
    assert!(err.contains("nosuch"), "{err}");
    // rm names the pool and the object plainly.
    let err = fails(&c.rados(&["-p", "rbd", "rm", "nosuch"]), "rados rm nosuch");
    assert_eq!(err.trim(), "rados: error removing object 'nosuch' from pool 'rbd': object not found");
    // cleanup removes what bench left, and only that.
    let out = ok(&c.rados(&["-p", "rbd", "cleanup"]), "rados cleanup");
    assert_eq!(out.trim(), format!("Removed {left} objects"));
    let ls = ok(&c.rados(&["-p", "rbd", "ls"]), "rados ls");
    assert!(!ls.contains("benchmark_"), "{ls}");
    assert!(ls.contains("xo"), "cleanup kept other objects: {ls}");
    assert!(fails(&c.rados(&["-p", "rbd", "bench", "1", "seq"]), "bench seq").contains("no benchmark data"));
}

fn rbd_commands(c: &Cluster) {
    // A bare size is MiB, as Ceph's.
    ok(&rbd(c, &["create", "--size", "10", "ten"]), "create --size 10");
    let info: Value =
        serde_json::from_str(&ok(&rbd(c, &["info", "ten", "--format", "json"]), "info")).unwrap();
    assert_eq!(info["size"], 10 << 20);
    ok(&rbd(c, &["create", "--size", "1G", "onegig"]), "create --size 1G");
    let long = ok(&rbd(c, &["ls", "-l"]), "ls -l");
    let mut lines = long.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("NAME ") && header.contains("SIZE") && header.contains("FMT"), "{long}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, vec![vec!["onegig", "1", "GiB", "2"], vec!["ten", "10", "MiB", "2"]], "{long}");
    // -p names the pool of specs without one, and of ls.
    ok(&rbd(c, &["-p", "p2", "create", "--size", "4", "inp2"]), "-p p2 create");
    assert_eq!(ok(&rbd(c, &["-p", "p2", "ls"]), "-p p2 ls"), "inp2\n");
    assert_eq!(ok(&rbd(c, &["ls", "p2"]), "ls p2"), "inp2\n");
    let info: Value =
        serde_json::from_str(&ok(&rbd(c, &["info", "p2/inp2", "--format", "json-pretty"]), "info p2/inp2"))
            .unwrap();
    assert_eq!(info["size"], 4 << 20);
    assert!(!ok(&rbd(c, &["ls"]), "ls").contains("inp2"));
    // Errors in words.
    let err =
        fails(&rbd(c, &["create", "--size", "1", "--object-size", "64M", "big-objects"]), "object size 64M");
    assert!(err.contains("object order 26") && err.contains("4 KiB to 32 MiB"), "{err}");
    let err = fails(&rbd(c, &["map", "rbd/nosuch"]), "map rbd/nosuch");
    assert!(err.contains("nosuch"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line, no messenger log: {err}");
    assert!(!err.contains("INFO"), "{err}");
}

fn sparse_images_are_walked_by_listing(c: &Cluster) {
    // A 9999 TiB image could have 2.6 billion objects; du and rm must cost what it has.
    ok(&rbd(c, &["create", "--size", "9999T", "huge"]), "create 9999T");
    ok(
        &rbd(c, &["bench", "--io-type", "write", "--io-size", "4K", "--io-total", "8K", "huge"]),
        "bench writes 8 KiB",
    );
    let (o, took) = timed_rbd(c, &["du", "huge"]);
    let du = ok(&o, "du huge");
    assert!(took < Duration::from_secs(20), "du took {took:?}");
    let row: Vec<&str> = du.lines().nth(1).unwrap_or("").split_whitespace().collect();
    assert_eq!(row, vec!["huge", "9999", "TiB", "8", "KiB"], "{du}");
    let (o, took) = timed_rbd(c, &["rm", "huge"]);
    ok(&o, "rm huge");
    assert!(took < Duration::from_secs(20), "rm took {took:?}");
    let ls = ok(&c.rados(&["-p", "rbd", "ls"]), "rados ls");
    let info = ok(&rbd(c, &["ls"]), "ls");
    assert!(!info.contains("huge"), "{info}");
    let data = ls.lines().filter(|l| l.starts_with("rbd_data.")).count();
    assert_eq!(data, 0, "rm left data objects: {ls}");
}

fn the_monitor_log_is_not_client_disconnects(c: &Cluster) {
    let log = std::fs::read_to_string(c.dir.join("mon.0.log")).unwrap();
    let lines = log.lines().count();
    let closing = log.lines().filter(|l| l.contains("closing socket")).count();
    assert!(lines > 10, "{log}");
    assert!(closing * 10 < lines, "{closing} of {lines} lines are closing sockets:\n{log}");
    assert!(!log.lines().any(|l| l.contains("closing socket") && l.contains("peer=client.")), "{log}");
    for f in ["mon.0.log", "osd.0.log", "osd.1.log", "osd.2.log"] {
        let text = std::fs::read_to_string(c.dir.join(f)).unwrap();
        assert!(!text.contains("EntityName {"), "{f}: {text}");
        assert!(!text.contains("Some([OsdId("), "{f}: {text}");
    }
}
