//! A local cluster for end-to-end tests: `cuttle up` into a fresh directory, `cuttle down` on drop. Real
//! processes on 127.0.0.1, free ports only. Tests that start a cluster take CLUSTER_LOCK so that only one
//! cluster runs at a time on the 2-core CI machine.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rados::config::Config;
use rados::OsdId;

pub static CLUSTER_LOCK: Mutex<()> = Mutex::new(());

pub fn cuttle_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cuttle")
}

pub fn rados_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rados")
}

pub struct Cluster {
    pub dir: PathBuf,
    pub up_took: Duration,
}

pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("cuttle-e2e-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

impl Cluster {
    /// `cuttle up` with short heartbeat settings unless `sets` overrides them.
    pub fn up(tag: &str, osds: u32, sets: &[&str]) -> Cluster {
        let dir = scratch_dir(tag);
        Cluster::up_in(dir, osds, sets)
    }

    /// [`Cluster::up`] in a directory of the caller's choosing.
    pub fn up_in(dir: PathBuf, osds: u32, sets: &[&str]) -> Cluster {
        let mut args: Vec<String> =
            vec!["up".into(), "--dir".into(), dir.display().to_string(), "--osds".into(), osds.to_string()];
        for s in sets {
            args.push("--set".into());
            args.push(s.to_string());
        }
        let t = Instant::now();
        let out = Command::new(cuttle_bin()).args(&args).output().expect("running cuttle up");
        let up_took = t.elapsed();
        let c = Cluster { dir, up_took };
        if !out.status.success() {
            let logs = c.logs();
            panic!(
                "cuttle up failed: {}\n{}\n--- logs ---\n{logs}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("cuttle.toml")
    }

    /// Runs `cuttle ARGS --conf <this cluster>`.
    pub fn cuttle(&self, args: &[&str]) -> Output {
        run(Command::new(cuttle_bin()).args(args).arg("--conf").arg(self.conf()))
    }

    /// Runs `rados --conf <this cluster> ARGS`.
    pub fn rados(&self, args: &[&str]) -> Output {
        run(Command::new(rados_bin()).arg("--conf").arg(self.conf()).args(args))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.cuttle(&a);
        assert!(out.status.success(), "cuttle {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("cuttle {args:?} printed bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// The pid of a running daemon of this cluster (checked: the pidfile's process is that daemon).
    pub fn pid(&self, daemon: &str) -> u32 {
        self.running(daemon).unwrap_or_else(|| panic!("{daemon} is not running\n{}", self.logs()))
    }

    /// The daemon's pid if its pidfile names a live process that is that daemon (never a reused pid).
    pub fn running(&self, daemon: &str) -> Option<u32> {
        let program = if daemon.starts_with("mon") { "cuttle-mon" } else { "cuttle-osd" };
        let owner = tools::PidOwner::daemon(program, &self.dir.join(daemon));
        match tools::check_pidfile(&self.dir.join(format!("{daemon}.pid")), &owner) {
            tools::PidStatus::Running(pid) => Some(pid),
            _ => None,
        }
    }

    pub fn signal(&self, daemon: &str, sig: &str) {
        let pid = self.pid(daemon);
        let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("kill");
        assert!(st.success(), "kill -{sig} {daemon} ({pid})");
    }

    /// Polls `cond` every 50 ms until it holds or `timeout` passes; returns how long it took.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
        let t = Instant::now();
        while !cond() {
            if t.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}\n--- logs ---\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        t.elapsed()
    }

    /// The tail of every daemon log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                s.push_str(&format!("== {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(cuttle_bin())
            .args(["down", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Anything still alive (a SIGSTOPped daemon ignores TERM) is killed: only processes that are this
        // cluster's daemons, never whatever took a dead daemon's pid.
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(daemon) = name.strip_suffix(".pid") {
                if let Some(pid) = self.running(daemon) {
                    let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                }
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a command with a 60 s bound (output is drained while it runs, so large outputs cannot block it).
pub fn run(cmd: &mut Command) -> Output {
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("collecting output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("command did not finish within 60 s: {cmd:?}");
        }
    }
}

pub fn rbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_rbd")
}

/// Runs `rbd --conf <c> ARGS`, with `rbd map`'s run directory inside the cluster's.
pub fn rbd(c: &Cluster, args: &[&str]) -> Output {
    run(Command::new(rbd_bin())
        .arg("--conf")
        .arg(c.conf())
        .env("CUTTLE_RBD_RUN_DIR", c.dir.join("run"))
        .args(args))
}

/// [`rbd`], asserting success; its stdout.
pub fn rbd_ok(c: &Cluster, args: &[&str]) -> String {
    let o = rbd(c, args);
    assert!(o.status.success(), "rbd {args:?} failed: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn write_file(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

/// A cluster client in this process (what librbd and rados use), for this cluster's config.
pub fn lib_open(conf: &Path) -> tools::ClusterClient {
    let cfg = Config::load(conf).unwrap();
    tools::ClusterClient::connect(&cfg, conf).unwrap()
}

/// Whether the client's current map says `osd` is up.
pub fn osd_up(lib: &tools::ClusterClient, osd: u32) -> bool {
    lib.monc.map().is_some_and(|m| m.is_up(OsdId(osd)))
}
