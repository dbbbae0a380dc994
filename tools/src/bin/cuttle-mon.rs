//! cuttle-mon: the monitor daemon. It keeps the cluster map in `--data DIR` and serves it at the config's
//! `mon_host` until SIGTERM or SIGINT, then exits 0. It does not daemonize itself: `cuttle up` starts it in
//! the background. Any start-up problem (no config, no fsid, no mon_host, the port in use, a damaged store)
//! is one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use mon::Monitor;
use rados::config::Config;

/// How often the main thread looks at the termination flag and the monitor's health.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(name = "cuttle-mon", version, about = "cuttle's monitor daemon: keeps and serves the cluster map")]
struct Args {
    /// Config file (else $CUTTLE_CONF, else ./cuttle-data/cuttle.toml).
    #[arg(long, value_name = "PATH")]
    conf: Option<PathBuf>,
    /// The monitor's data directory (created if missing; holds mon.redb).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Stay in the foreground and log to stderr.
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Append the log here (ignored with -f).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Write the process id here while running.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // With a log file the reason goes there too; otherwise the log is stderr already.
    let logs_to_file = !args.foreground && args.log_file.is_some();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if logs_to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("cuttle-mon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let (cfg, conf_path) = Config::discover(args.conf.as_deref())?;
    tools::init_logging(&cfg.log_level, args.foreground, args.log_file.as_deref())?;
    let _pid = args.pid_file.as_deref().map(tools::PidFile::create).transpose()?;
    let term = tools::termination_flag()?;
    let mon = Monitor::start(&cfg, &args.data).with_context(|| {
        format!("starting the monitor (config {}, data {})", conf_path.display(), args.data.display())
    })?;
    tracing::info!(addr = %mon.addr(), epoch = %mon.epoch(), conf = %conf_path.display(), "cuttle-mon running");
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
