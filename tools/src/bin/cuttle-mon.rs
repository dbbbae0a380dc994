//! cuttle-mon: the monitor daemon. It keeps the cluster map in `--data DIR` and serves it at the config's
//! `mon_host` until SIGTERM or SIGINT, then exits 0. Without `-f` it detaches: the command returns once the
//! monitor serves (exit 0), and the daemon runs on in its own process group, logging to `--log-file`. Any
//! start-up problem (no config, no fsid, no mon_host, the port in use, a damaged store)
//! is one line on stderr and a non-zero exit.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use mon::Monitor;

/// The file in the data directory that holds the address the monitor is bound to, once it serves.
const ADDR_FILE: &str = "addr";
/// How often the main thread looks at the termination flag and the monitor's health.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(name = "cuttle-mon", version, about = "cuttle's monitor daemon: keeps and serves the cluster map")]
struct Args {
    #[command(flatten)]
    daemon: tools::DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.daemon.detach("cuttle-mon") {
        return code;
    }
    tools::daemon_main("cuttle-mon", &args.daemon, || run(&args))
}

fn run(args: &Args) -> Result<()> {
    let tools::DaemonStart { cfg, conf_path, term, pid: _pid } = args.daemon.start("cuttle-mon")?;
    let mon = Monitor::start(&cfg, &args.daemon.data).with_context(|| {
        format!("starting the monitor (config {}, data {})", conf_path.display(), args.daemon.data.display())
    })?;
    // Published for whoever started us with port 0 in mon_host (`cuttle up` on a new cluster): the address
    // the monitor bound, not one a probe guessed was free.
    let addr_file = args.daemon.data.join(ADDR_FILE);
    rados::fsutil::write_durably(&addr_file, format!("{}\n", mon.addr()).as_bytes())
        .with_context(|| format!("writing {}", addr_file.display()))?;
    tracing::info!(addr = %mon.addr(), epoch = %mon.epoch(), conf = %conf_path.display(), "cuttle-mon running");
    tools::notify_ready();
    let failed = loop {
        if term.load(Ordering::Acquire) {
            break false;
        }
        if mon.is_failed() {
            break true;
        }
        std::thread::sleep(POLL);
    };
    mon.shutdown();
    if failed {
        bail!("the monitor's store failed; see the log");
    }
    tracing::info!("cuttle-mon stopped");
    Ok(())
}
