//! cuttle-osd: the object storage daemon. It keeps its identity (uuid, id) in `--data DIR`, registers with the
//! monitor on first start, boots, and serves objects until SIGTERM or SIGINT; then it tells the monitor, lets
//! writes in flight finish, and exits 0. It does not daemonize itself: `cuttle up` starts it in the background.
//! Any start-up problem (no config, no mon_host, a monitor that does not answer within
//! `rados_mon_op_timeout`, a damaged data directory) is one line on stderr and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use osd::daemon::Osd;
use rados::config::Config;

/// How often the main thread looks at the termination flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(name = "cuttle-osd", version, about = "cuttle's object storage daemon")]
struct Args {
    /// Config file (else $CUTTLE_CONF, else ./cuttle-data/cuttle.toml).
    #[arg(long, value_name = "PATH")]
    conf: Option<PathBuf>,
    /// The OSD's data directory (created if missing; holds its uuid and id).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The failure domain this OSD reports (default: this machine's host name).
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
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
    let logs_to_file = !args.foreground && args.log_file.is_some();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if logs_to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("cuttle-osd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn run(args: Args) -> Result<()> {
    let (cfg, conf_path) = Config::discover(args.conf.as_deref())?;
    tools::init_logging(&cfg.log_level, args.foreground, args.log_file.as_deref())?;
    let _pid = args.pid_file.as_deref().map(tools::PidFile::create).transpose()?;
    let term = tools::termination_flag()?;
    let host = args.host.unwrap_or_else(hostname);
    let osd = Osd::start(&cfg, &args.data, host).with_context(|| {
        format!("starting the OSD (config {}, data {})", conf_path.display(), args.data.display())
    })?;
    tracing::info!(id = %osd.id(), addrs = ?osd.addrs(), conf = %conf_path.display(), "cuttle-osd running");
    while !term.load(Ordering::Acquire) {
        std::thread::sleep(POLL);
    }
    osd.shutdown();
    tracing::info!("cuttle-osd stopped");
    Ok(())
}
