//! Shared plumbing for cuttle's binaries: daemon start-up (logging, pidfile, signals) and output helpers.
//! Binaries only: libraries never depend on this crate.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

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

/// A pidfile that is removed when dropped. Refuses to start if the file names a live process.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile> {
        if let Some(pid) = read_pid(path) {
            if process_alive(pid) {
                bail!("{} names running process {pid}: is this daemon already running?", path.display());
            }
        }
        let mut f =
            std::fs::File::create(path).with_context(|| format!("creating pidfile {}", path.display()))?;
        writeln!(f, "{}", std::process::id())?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // Field 3 is the state; a zombie ("Z") has exited.
            let state = s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
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
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ ((std::process::id() as u64) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        let p = std::env::temp_dir().join(format!("cuttle-pid-{}", std::process::id()));
        let f = PidFile::create(&p).unwrap();
        assert!(PidFile::create(&p).is_err(), "our own pid is alive");
        drop(f);
        assert!(!p.exists());
        std::fs::write(&p, "999999999\n").unwrap();
        let f = PidFile::create(&p).unwrap();
        drop(f);
    }
}
