//! Shared plumbing for cuttle's binaries: daemon start-up (logging, pidfile, signals) and output helpers.
//! Binaries only: libraries never depend on this crate.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

/// Every cuttle program allocates through mimalloc: the OSDs' many short-lived small allocations (op
/// messages, transactions, object names) cost them 13 % less CPU per 4 KiB write than with glibc's malloc
/// (`rados bench` 4 KiB writes, alternating runs: 24.9-25.4 against 28.7-29.5 us per op and OSD). Built with
/// `no_thp`: mimalloc's default of asking for transparent huge pages made the same runs cost 38-40 us, since
/// this kind of VM charges a huge page's first touch far more than 512 small ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A program's connection to the cluster: a messenger on its own worker pool, a MonClient that already has
/// the map, and an Objecter. Shut down on drop.
pub struct ClusterClient {
    pub cfg: rados::config::Config,
    pub pool: Arc<messenger::WorkerPool>,
    pub msgr: Arc<messenger::Messenger>,
    pub monc: Arc<rados::monclient::MonClient>,
    pub objecter: Arc<rados::objecter::Objecter>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterClient({:?})", self.cfg.mon_host)
    }
}

impl ClusterClient {
    /// Connects and waits (up to `rados_mon_op_timeout`) for the first map; `conf_path` names the config in
    /// errors.
    pub fn connect(cfg: &rados::config::Config, conf_path: &Path) -> Result<ClusterClient> {
        use messenger::{EntityName, Messenger, WorkerPool};
        let mon = cfg.mon_host.with_context(|| format!("mon_host is not set in {}", conf_path.display()))?;
        let threads = cfg.ms_async_op_threads;
        if !(1..=messenger::WORKERS_MAX).contains(&threads) {
            bail!("ms_async_op_threads is {threads}: it must be 1 to {}", messenger::WORKERS_MAX);
        }
        let pool = WorkerPool::new(threads).context("starting the messenger workers")?;
        let name = EntityName::client(entropy() >> 16);
        let msgr =
            Arc::new(Messenger::new(Arc::clone(&pool), name, entropy().rotate_left(17), cfg.messenger()));
        msgr.start().context("starting the messenger")?;
        // Each client sets the policy it needs: lossy sessions to the monitor and to OSDs.
        let monc = rados::monclient::MonClient::start(Arc::clone(&msgr), mon, false);
        let objecter = rados::objecter::Objecter::new(Arc::clone(&msgr), Arc::clone(&monc), cfg);
        let client = ClusterClient { cfg: cfg.clone(), pool, msgr, monc, objecter };
        if client.monc.wait_for_map(None, rados::config::secs(cfg.rados_mon_op_timeout)).is_err() {
            bail!("cannot reach the monitor at {mon}");
        }
        Ok(client)
    }

    /// Stops the Objecter, the MonClient, the messenger and its workers (every thread joined). Idempotent.
    pub fn shutdown(&self) {
        self.objecter.shutdown();
        self.monc.shutdown();
        self.msgr.shutdown();
        self.msgr.wait();
        self.pool.shutdown();
    }
}

impl Drop for ClusterClient {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Ends a command-line tool: prints an error as `NAME: reason` and exits 1, else exits 0 (stdout flushed).
/// Makes a closed stdout (`cuttle osd dump | head`) end the tool quietly with 141 (128 + SIGPIPE, what a shell
/// reports for a C tool killed by the signal) instead of a panic and a backtrace. Rust ignores SIGPIPE, so a
/// write to a closed pipe fails, and `println!` turns that failure into a panic; this hook recognises that
/// one panic. Call first thing in `main`.
pub fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

pub fn exit_with(name: &str, r: Result<()>) -> ! {
    let code = match r {
        Ok(()) => 0,
        // A reader that went away (`rados ls | head`) is not an error to report: end as a C tool killed by
        // SIGPIPE would.
        Err(e) if is_broken_pipe(&e) => 141,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Whether an error is a write to a closed pipe (anywhere in its chain of causes).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A progress line on stderr, like Ceph's "Importing image: 45% complete...", drawn only when stderr is a
/// terminal and at most every 100 ms.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: Option<u64>,
    /// Counts things (`12000 objects...`) rather than bytes.
    counting: bool,
    enabled: bool,
    last: Option<std::time::Instant>,
    /// A line was drawn and not yet ended.
    drawn: bool,
}

impl Progress {
    /// Percent of `total` (bytes or items), or MiB so far when the total is unknown.
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        use std::io::IsTerminal;
        let enabled = std::io::stderr().is_terminal();
        Progress { label: label.to_string(), total, counting: false, enabled, last: None, drawn: false }
    }

    /// A count of objects with no known total (`Listing: 12000 objects...`); `finish` ends the line.
    pub fn counting(label: &str) -> Progress {
        let mut p = Progress::new(label, None);
        p.counting = true;
        p
    }

    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
    }

    pub fn update(&mut self, done: u64) {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100)) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.drawn = true;
        match self.total {
            Some(t) if t > 0 => eprint!("\r{}: {}% complete...", self.label, done.min(t) * 100 / t),
            _ if self.counting => eprint!("\r{}: {done} objects...", self.label),
            _ => eprint!("\r{}: {} MiB...", self.label, done >> 20),
        }
    }

    pub fn finish(&mut self) {
        if self.enabled && self.counting {
            if self.drawn {
                eprintln!("done.");
            }
        } else if self.enabled {
            eprintln!("\r{}: 100% complete...done.", self.label);
        }
        self.drawn = false;
    }
}

impl Drop for Progress {
    /// A counting line left open (the work failed or moved on) is ended, so what follows starts on its own
    /// line.
    fn drop(&mut self) {
        if self.enabled && self.drawn {
            eprintln!();
        }
    }
}

/// Output format of reading commands (`--format`), Ceph's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Text for people.
    Plain,
    /// JSON on one line.
    Json,
    /// JSON, indented.
    JsonPretty,
}

impl Format {
    /// Either JSON format.
    pub fn is_json(self) -> bool {
        matches!(self, Format::Json | Format::JsonPretty)
    }

    /// `v` as this format's JSON text (no trailing newline).
    pub fn json_text<T: serde::Serialize + ?Sized>(self, v: &T) -> String {
        let r = if self == Format::JsonPretty {
            serde_json::to_string_pretty(v)
        } else {
            serde_json::to_string(v)
        };
        // A `Value` or a derived Serialize of plain data cannot fail to encode.
        r.expect("plain data encodes as JSON")
    }
}

/// The options every admin tool (`cuttle`, `rados`, `rbd`) takes, anywhere on its command line.
#[derive(Debug, clap::Args)]
pub struct ToolArgs {
    /// Config file (default: $CUTTLE_CONF, then ./cuttle-data/cuttle.toml).
    #[arg(short = 'c', long, global = true)]
    pub conf: Option<PathBuf>,
    /// Output format of reading commands.
    #[arg(short = 'f', long, global = true, value_enum, default_value_t = Format::Plain)]
    pub format: Format,
}

impl ToolArgs {
    /// The config `--conf` names, or the one discovery finds, and its path.
    pub fn config(&self) -> anyhow::Result<(rados::config::Config, PathBuf)> {
        rados::config::Config::discover(self.conf.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Whether the output is JSON (either JSON format).
    pub fn json(&self) -> bool {
        self.format.is_json()
    }
}

/// The command line every daemon shares.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Config file (else $CUTTLE_CONF, else ./cuttle-data/cuttle.toml).
    #[arg(long, value_name = "PATH")]
    pub conf: Option<PathBuf>,
    /// The daemon's data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Stay in the foreground and log to stderr (without it the daemon detaches once it serves).
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Append the log here (ignored with -f).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Write the process id here while running.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
}

/// What a daemon has once its config is read, its logging set up and its pidfile written.
#[derive(Debug)]
pub struct DaemonStart {
    pub cfg: rados::config::Config,
    pub conf_path: PathBuf,
    pub term: Arc<AtomicBool>,
    pub pid: Option<PidFile>,
}

impl DaemonArgs {
    /// Config discovery, logging, pidfile and the SIGTERM/SIGINT flag, in that order. `program` is the
    /// daemon's binary name, which its pidfile is checked against.
    pub fn start(&self, program: &str) -> Result<DaemonStart> {
        let (cfg, conf_path) = rados::config::Config::discover(self.conf.as_deref())?;
        init_logging(&cfg.log_level, self.foreground, self.log_file.as_deref())?;
        let owner = PidOwner::daemon(program, &self.data);
        let pid = self.pid_file.as_deref().map(|p| PidFile::create(p, &owner)).transpose()?;
        let term = termination_flag()?;
        Ok(DaemonStart { cfg, conf_path, term, pid })
    }

    /// Without `-f`, runs this program again as a detached child (its own process group, stdin and stdout
    /// away from the terminal, stderr into the log file) and waits until the child says it serves or fails;
    /// returns the exit code this, the starting process, ends with. With `-f`, or in the child, returns
    /// `None`: go on and run the daemon here.
    pub fn detach(&self, program: &str) -> Option<ExitCode> {
        if self.foreground || std::env::var_os(DETACHED_ENV).is_some() {
            return None;
        }
        Some(match detach_and_wait(program, self.log_file.as_deref()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("{program}: {e:#}");
                ExitCode::FAILURE
            }
        })
    }
}

/// Set in a detached daemon's environment: its stdout is a pipe to the process that started it, which
/// waits for [`READY_LINE`] or an error line.
const DETACHED_ENV: &str = "CUTTLE_DAEMON_DETACHED";
const READY_LINE: &str = "ready";
const ERROR_PREFIX: &str = "error: ";
/// How long the starting process waits for a detached daemon to serve. A daemon's own start-up waits are
/// bounded (the monitor's by `rados_mon_op_timeout`, 30 s by default), so this is a net, not a schedule.
pub const DAEMON_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn detach_and_wait(program: &str, log_file: Option<&Path>) -> Result<ExitCode> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating this program")?;
    let stderr = match log_file {
        Some(p) => std::process::Stdio::from(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening log file {}", p.display()))?,
        ),
        None => std::process::Stdio::null(),
    };
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        // Its own process group: a Ctrl-C in the shell that started it does not reach the daemon.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program} in the background"))?;
    let out = child.stdout.take().context("the daemon's stdout pipe")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let ready = line == READY_LINE;
            if tx.send(Some(line)).is_err() || ready {
                return;
            }
        }
        let _ = tx.send(None);
    });
    let deadline = std::time::Instant::now() + DAEMON_READY_TIMEOUT;
    let mut errors = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(line)) if line == READY_LINE => return Ok(ExitCode::SUCCESS),
            Ok(Some(line)) => errors.push(line.strip_prefix(ERROR_PREFIX).unwrap_or(&line).to_string()),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "the daemon (pid {}) did not report that it serves within {} s; it may still be starting{}",
                child.id(),
                DAEMON_READY_TIMEOUT.as_secs(),
                log_file.map(|p| format!(" (log: {})", p.display())).unwrap_or_default()
            ),
        }
    }
    // The pipe closed without "ready": the daemon exited (its error lines say why).
    let status = child.wait().context("waiting for the daemon")?;
    if errors.is_empty() {
        bail!(
            "the daemon exited before it served ({status}){}",
            log_file.map(|p| format!("; see {}", p.display())).unwrap_or_default()
        );
    }
    for e in &errors {
        eprintln!("{program}: {e}");
    }
    Ok(ExitCode::FAILURE)
}

/// Tells the process that detached this daemon that it now serves (nothing when in the foreground).
pub fn notify_ready() {
    if std::env::var_os(DETACHED_ENV).is_some() {
        let mut out = std::io::stdout().lock();
        // The starter may be gone (killed): nothing to tell then.
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
    }
}

fn notify_error(e: &anyhow::Error) {
    if std::env::var_os(DETACHED_ENV).is_some() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{ERROR_PREFIX}{e:#}");
        let _ = out.flush();
    }
}

/// Runs a daemon's body; a failure is one line on stderr (and in the log, when logging to a file) and a
/// non-zero exit.
pub fn daemon_main(name: &str, args: &DaemonArgs, body: impl FnOnce() -> Result<()>) -> ExitCode {
    let logs_to_file = !args.foreground && args.log_file.is_some();
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if logs_to_file {
                tracing::error!("{e:#}");
            }
            notify_error(&e);
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (`foreground`) or appends to `log_file`, filtered by `level` (tracing-subscriber syntax;
/// `RUST_LOG` overrides it).
pub fn init_logging(level: &str, foreground: bool, log_file: Option<&Path>) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .with_context(|| format!("bad log_level {level:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    match (foreground, log_file) {
        (false, Some(path)) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log file {}", path.display()))?;
            builder.with_ansi(false).with_writer(std::sync::Mutex::new(f)).init();
        }
        _ => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// Which process a pidfile is for: the program's file name, and an argument its command line must hold
/// (a daemon's data directory, an NBD server's image). A pid alone names no process for long: after a
/// kill -9 or a reboot the same number may belong to anything, and signalling it would hit a stranger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PidOwner {
    pub program: String,
    pub arg: String,
}

impl PidOwner {
    /// A daemon (`cuttle-osd`, `cuttle-mon`) with its `--data` directory (compared as an absolute path).
    pub fn daemon(program: &str, data: &Path) -> PidOwner {
        let data = std::fs::canonicalize(data).unwrap_or_else(|_| absolute(data));
        PidOwner { program: program.to_string(), arg: data.display().to_string() }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// What a pidfile says: the pid, and the process's start time (clock ticks after boot, field 22 of
/// `/proc/PID/stat`) when it was written by this version. The pair names one process: pids are reused,
/// (pid, start time) pairs are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PidRecord {
    pub pid: u32,
    pub start_time: Option<u64>,
}

impl PidRecord {
    /// This process.
    pub fn current() -> PidRecord {
        let pid = std::process::id();
        PidRecord { pid, start_time: process_start_time(pid) }
    }

    fn encode(&self) -> String {
        match self.start_time {
            Some(t) => format!("{} {t}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }
}

/// A pidfile read against the process it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PidStatus {
    /// No pidfile.
    Absent,
    /// The pidfile names a live process that is the daemon it was written for.
    Running(u32),
    /// The pidfile names no live process, or one that is not that daemon: it must not be signalled.
    Stale { pid: Option<u32>, why: String },
}

/// Reads the pidfile at `path` and checks the process it names against `owner`: alive, started when the
/// pidfile says (if it says), running `owner.program` with `owner.arg` on its command line.
pub fn check_pidfile(path: &Path, owner: &PidOwner) -> PidStatus {
    let Ok(text) = std::fs::read_to_string(path) else { return PidStatus::Absent };
    let Some(rec) = parse_pid_record(&text) else {
        return PidStatus::Stale { pid: None, why: format!("{} does not hold a pid", path.display()) };
    };
    match process_is(rec, owner) {
        Ok(()) => PidStatus::Running(rec.pid),
        Err(why) => PidStatus::Stale { pid: Some(rec.pid), why },
    }
}

/// Whether the process `rec` names is alive and is `owner`; else why not.
pub fn process_is(rec: PidRecord, owner: &PidOwner) -> std::result::Result<(), String> {
    let pid = rec.pid;
    if !process_alive(pid) {
        return Err(format!("process {pid} is not running"));
    }
    if let Some(t) = rec.start_time {
        if process_start_time(pid) != Some(t) {
            return Err(format!("process {pid} is a newer process than the one the pidfile was written for"));
        }
    }
    let argv = process_cmdline(pid).ok_or_else(|| format!("process {pid} is gone"))?;
    let program =
        argv.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().to_string());
    if program.as_deref() != Some(owner.program.as_str()) {
        return Err(format!("process {pid} is {}, not {}", program.unwrap_or_default(), owner.program));
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let holds = argv.iter().skip(1).any(|a| {
        if *a == owner.arg {
            return true;
        }
        // A relative path on its command line is relative to its working directory.
        let p = match &cwd {
            Some(cwd) if Path::new(a).is_relative() => cwd.join(a),
            _ => PathBuf::from(a),
        };
        std::fs::canonicalize(&p).is_ok_and(|p| p.display().to_string() == owner.arg)
    });
    if !holds {
        return Err(format!("process {pid} is another {} (not for {})", owner.program, owner.arg));
    }
    Ok(())
}

fn parse_pid_record(text: &str) -> Option<PidRecord> {
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    if pid == 0 {
        return None;
    }
    let start_time = match it.next() {
        Some(t) => Some(t.parse().ok()?),
        None => None,
    };
    Some(PidRecord { pid, start_time })
}

/// Field `n` (numbered from 1, as proc(5) does; 3 or later) of `/proc/PID/stat`.
fn proc_stat_field(pid: u32, n: usize) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    s.rsplit_once(')')?.1.split_whitespace().nth(n - 3).map(str::to_string)
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks after boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    proc_stat_field(pid, 22)?.parse().ok()
}

fn process_cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// A pidfile that is removed when dropped. Refuses to start if the file names a live process that is this
/// daemon; a pidfile left by a dead process, or naming a process that is something else now, is replaced.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(path: &Path, owner: &PidOwner) -> Result<PidFile> {
        match check_pidfile(path, owner) {
            PidStatus::Running(pid) => {
                bail!("{} names running process {pid}: is this daemon already running?", path.display())
            }
            PidStatus::Stale { why, .. } => {
                tracing::warn!("replacing stale pidfile {}: {why}", path.display())
            }
            PidStatus::Absent => {}
        }
        rados::fsutil::write_durably(path, PidRecord::current().encode().as_bytes())
            .with_context(|| format!("writing pidfile {}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only our own: a pidfile another instance wrote since is not ours to remove.
        let ours = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|t| parse_pid_record(&t))
            .is_some_and(|r| r.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The pid a pidfile holds (its first word), whatever process that is now.
pub fn read_pid(path: &Path) -> Option<u32> {
    parse_pid_record(&std::fs::read_to_string(path).ok()?).map(|r| r.pid)
}

/// The whole record a pidfile holds.
pub fn read_pid_record(path: &Path) -> Option<PidRecord> {
    parse_pid_record(&std::fs::read_to_string(path).ok()?)
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    // Field 3 is the state; a zombie ("Z") has exited.
    proc_stat_field(pid, 3).is_some_and(|state| state != "Z")
}

/// Set when SIGTERM or SIGINT arrives.
pub fn termination_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&flag)).context("installing a signal handler")?;
    }
    Ok(flag)
}

/// Sleeps in short steps until the flag is set.
pub fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A random-enough 64-bit value for messenger nonces and uuids, from the clock and the pid (no RNG crate).
pub fn entropy() -> u64 {
    messenger::util::entropy()
}

/// Bytes as Ceph prints them: B, KiB, MiB, GiB, TiB (whole numbers without a fraction).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses sizes with K/M/G/T suffixes (powers of 1024; a trailing "B" or "iB" is accepted).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c @ ('K' | 'k' | 'M' | 'm' | 'G' | 'g' | 'T' | 't')) => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 1 << 40,
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad size {s:?}: expected a number with an optional K/M/G/T suffix"))?;
    n.checked_mul(mult).with_context(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        for bad in ["", "x", "4X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pidfile_refuses_a_live_owner_and_cleans_up() {
        // Goal: a pidfile naming its live daemon refuses a second instance; one left by a dead process is
        // replaced, and the file goes when its owner stops. Method: a `sleep` child plays the daemon.
        let p = std::env::temp_dir().join(format!("cuttle-pid-{}", std::process::id()));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let owner = PidOwner { program: "sleep".into(), arg: "30".into() };
        let rec = PidRecord { pid: child.id(), start_time: process_start_time(child.id()) };
        std::fs::write(&p, rec.encode()).unwrap();
        // Until the child has exec'd, its command line is still this test's: wait for it (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while check_pidfile(&p, &owner) != PidStatus::Running(child.id()) {
            assert!(std::time::Instant::now() < deadline, "the child never showed as `sleep 30`");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = PidFile::create(&p, &owner).unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(check_pidfile(&p, &owner), PidStatus::Stale { .. }));
        let f = PidFile::create(&p, &owner).unwrap();
        assert_eq!(read_pid_record(&p), Some(PidRecord::current()));
        drop(f);
        assert!(!p.exists());
    }

    #[test]
    fn a_pidfile_naming_another_process_is_stale() {
        // Goal: a pid reused by another process, or by another program, is never taken for the daemon.
        // Method: pidfiles naming this process with a wrong start time, and for another program.
        let p = std::env::temp_dir().join(format!("cuttle-pid-stale-{}", std::process::id()));
        let me = PidRecord::current();
        assert!(me.start_time.is_some(), "/proc/self/stat field 22 parses");
        std::fs::write(&p, format!("{} {}\n", me.pid, me.start_time.unwrap() + 1)).unwrap();
        let owner = PidOwner { program: "cuttle-osd".into(), arg: "/nowhere/osd.1".into() };
        assert!(matches!(check_pidfile(&p, &owner), PidStatus::Stale { pid: Some(_), .. }));
        std::fs::write(&p, me.encode()).unwrap();
        let PidStatus::Stale { why, .. } = check_pidfile(&p, &owner) else { panic!("not cuttle-osd") };
        assert!(why.contains("not cuttle-osd"), "{why}");
        std::fs::write(&p, "garbage\n").unwrap();
        assert!(matches!(check_pidfile(&p, &owner), PidStatus::Stale { pid: None, .. }));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(check_pidfile(&p, &owner), PidStatus::Absent);
    }
}
