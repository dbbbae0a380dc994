//! cuttle-osd: the object storage daemon. It keeps its identity (uuid, id) in `--data DIR`, registers with the
//! monitor on first start, boots, and serves objects until SIGTERM or SIGINT; then it tells the monitor, lets
//! writes in flight finish, and exits 0. It does not daemonize itself: `cuttle up` starts it in the background.
//! Any start-up problem (no config, no mon_host, a monitor that does not answer within
//! `rados_mon_op_timeout`, a damaged data directory) is one line on stderr and a non-zero exit.

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    tools::daemon_main("cuttle-osd", &args.daemon, || run(&args))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn run(args: &Args) -> Result<()> {
    let tools::DaemonStart { cfg, conf_path, term, pid: _pid } = args.daemon.start()?;
    let host = args.host.clone().unwrap_or_else(hostname);
    let osd = Osd::start(&cfg, &args.daemon.data, host).with_context(|| {
        format!("starting the OSD (config {}, data {})", conf_path.display(), args.daemon.data.display())
    })?;
    tracing::info!(id = %osd.id(), addrs = ?osd.addrs(), conf = %conf_path.display(), "cuttle-osd running");
    while !term.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
    }
    osd.shutdown();
    tracing::info!("cuttle-osd stopped");
    Ok(())
}
