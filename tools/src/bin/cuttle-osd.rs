//! cuttle-osd: the object storage daemon. It keeps its identity (uuid, id) in `--data DIR`, registers with the
//! monitor on first start, boots, and serves objects until SIGTERM or SIGINT; then it tells the monitor, lets
//! writes in flight finish, and exits 0. Without `-f` it detaches: the command returns once the OSD has
//! booted (exit 0), and the daemon runs on in its own process group, logging to `--log-file`. Any start-up
//! problem (no config, no mon_host, a monitor that does not answer within
//! `rados_mon_op_timeout`, a damaged data directory) is one line on stderr and a non-zero exit. If its object
//! store fails (a device error: nothing acknowledged after it could be made durable), it exits non-zero.
//!
//! `cuttle-osd --fsck --data DIR [--deep]` checks a stopped OSD's BlueStore instead (Ceph's
//! `ceph-bluestore-tool fsck`): metadata against the allocator, and with `--deep` every checksum. It prints a
//! report and exits 0 when the store is consistent, 1 with each inconsistency otherwise.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use osd::daemon::Osd;

/// How often the main thread looks at the termination flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(name = "cuttle-osd", version, about = "cuttle's object storage daemon")]
struct Args {
    #[command(flatten)]
    daemon: tools::DaemonArgs,
    /// The failure domain this OSD reports (default: this machine's host name).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Check the BlueStore in --data (the OSD must be stopped) instead of running.
    #[arg(long)]
    fsck: bool,
    /// With --fsck: also read every object and verify every checksum.
    #[arg(long, requires = "fsck")]
    deep: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.fsck {
        return match fsck(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("cuttle-osd --fsck: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(code) = args.daemon.detach("cuttle-osd") {
        return code;
    }
    tools::daemon_main("cuttle-osd", &args.daemon, || run(&args))
}

/// Checks the store; true when it is consistent.
fn fsck(args: &Args) -> Result<bool> {
    let dir = &args.daemon.data;
    if !osd::daemon::holds_bluestore(dir) {
        anyhow::bail!("{} holds no BlueStore", dir.display());
    }
    // Options fixed at creation come from the store itself; the config (if any) only sizes caches.
    let cfg =
        rados::config::Config::discover(args.daemon.conf.as_deref()).map(|(c, _)| c).unwrap_or_default();
    let store = osd::bluestore::BlueStore::open(dir, &osd::daemon::bluestore_options(&cfg))
        .with_context(|| format!("opening {} (is the OSD still running?)", dir.display()))?;
    let t = std::time::Instant::now();
    let r = store.fsck(args.deep).context("fsck")?;
    println!(
        "fsck{} of {}: {} objects, {} blobs, {} units referenced, {} allocated, {} deferred writes, {} blocks verified, {:.1} s",
        if args.deep { " --deep" } else { "" },
        dir.display(),
        r.objects,
        r.blobs,
        r.referenced_units,
        r.allocated_units,
        r.deferred_writes,
        r.blocks_verified,
        t.elapsed().as_secs_f64()
    );
    for e in &r.errors {
        println!("error: {e}");
    }
    if r.is_clean() {
        println!("clean");
    } else {
        println!("{} inconsistencies", r.errors_total);
    }
    Ok(r.is_clean())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn run(args: &Args) -> Result<()> {
    let tools::DaemonStart { cfg, conf_path, term, pid: _pid } = args.daemon.start("cuttle-osd")?;
    let host = args.host.clone().unwrap_or_else(hostname);
    let osd = Osd::start(&cfg, &args.daemon.data, host).with_context(|| {
        format!("starting the OSD (config {}, data {})", conf_path.display(), args.daemon.data.display())
    })?;
    tracing::info!(id = %osd.id(), addrs = ?osd.addrs(), conf = %conf_path.display(), "cuttle-osd running");
    tools::notify_ready();
    let failed = loop {
        if term.load(Ordering::Acquire) {
            break None;
        }
        if let Some(e) = osd.store_failed() {
            break Some(e);
        }
        std::thread::sleep(POLL);
    };
    osd.shutdown();
    if let Some(e) = failed {
        anyhow::bail!("the object store failed ({e}); the OSD stopped");
    }
    tracing::info!("cuttle-osd stopped");
    Ok(())
}
