//! Cluster configuration: one flat table of options with Ceph's names where Ceph has the option, read from
//! `cuttle.toml`. Every option is documented with its default (`cuttle config help` prints [`OPTIONS`]).
//!
//! Discovery, for every daemon and tool: `--conf PATH`, then `$CUTTLE_CONF`, then `./cuttle-data/cuttle.toml`.
//! Durations are seconds (fractions allowed), sizes are bytes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where `cuttle up` puts a local cluster, and the last place config discovery looks.
pub const DEFAULT_DIR: &str = "cuttle-data";
pub const CONF_FILE: &str = "cuttle.toml";
pub const CONF_ENV: &str = "CUTTLE_CONF";

/// One documented option.
#[derive(Clone, Copy, Debug)]
pub struct OptionDoc {
    pub name: &'static str,
    /// The default as Rust source (`100 << 20`); [`OptionDoc::default_value`] is what a user reads.
    pub default: &'static str,
    pub help: &'static str,
    /// The option's Rust type, as written (see [`OptionDoc::expected`]).
    pub ty: &'static str,
}

impl OptionDoc {
    /// The default as a user writes and reads values: `100 MiB` for a byte count, `host`, `20.0`, `(none)`.
    pub fn default_value(&self) -> String {
        let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
        match defaults.get(self.name) {
            None => "(none)".to_string(),
            Some(toml::Value::String(s)) if s.is_empty() => "(none)".to_string(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(toml::Value::Integer(n)) if self.is_bytes() && *n >= 1024 => human_bytes(*n as u64),
            Some(v) => v.to_string(),
        }
    }

    /// Whether the option counts bytes (its name says so).
    fn is_bytes(&self) -> bool {
        (self.name.contains("bytes") || self.name.ends_with("_size") || self.name.ends_with("_dirty"))
            && matches!(self.ty, "u64" | "usize")
    }

    /// What a value must look like, in words.
    pub fn expected(&self) -> &'static str {
        match self.ty {
            "f64" => "a number",
            "u64" | "usize" if self.is_bytes() => "a whole number of bytes",
            "u8" => "a whole number from 0 to 255",
            "u32" => "a whole number from 0 to 4294967295",
            "u64" | "usize" => "a whole number",
            "bool" => "true or false",
            "String" => "text",
            "Option<SocketAddr>" => "an address, IP:PORT",
            "std::net::IpAddr" => "an IP address",
            _ => "a value of the option's type",
        }
    }
}

/// Bytes as powers of 1024 with a unit (`100 MiB`); whole numbers only, else bytes.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut shown = format!("{n} B");
    let mut v = n;
    for unit in UNITS {
        if v == 0 || !v.is_multiple_of(1024) {
            break;
        }
        v /= 1024;
        shown = format!("{v} {unit}");
    }
    shown
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown option {0:?} (see `cuttle config help`)")]
    UnknownOption(String),
    #[error("bad value {value:?} for {key}: {why}")]
    BadValue { key: String, value: String, why: String },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid cuttle config: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("no config found: pass --conf PATH, set {CONF_ENV}, or run `cuttle up` to create ./{DEFAULT_DIR}/{CONF_FILE}")]
    NotFound,
}

macro_rules! options {
    ($( #[doc = $doc:literal] $name:ident : $ty:ty = $default:expr; )*) => {
        /// Every option, with its default.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Config {
            $( #[doc = $doc] pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $name: $default, )* }
            }
        }

        /// The documentation of every option, in definition order.
        pub const OPTIONS: &[OptionDoc] = &[
            $( OptionDoc {
                name: stringify!($name),
                default: stringify!($default),
                help: $doc.trim_ascii(),
                ty: stringify!($ty),
            }, )*
        ];

        impl Config {
            /// Sets one option from its text form (as given to `--set KEY=VALUE`).
            pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
                match key {
                    $( stringify!($name) => { self.$name = parse_value(key, value)?; Ok(()) } )*
                    _ => Err(ConfigError::UnknownOption(key.to_string())),
                }
            }
        }
    };
}

options! {
    /// The cluster's id; written by `cuttle up`.
    fsid: String = String::new();
    /// Address of the monitor (host:port).
    mon_host: Option<SocketAddr> = None;
    /// IP address daemons bind their public, cluster and heartbeat messengers to (ports are picked freely).
    public_addr: std::net::IpAddr = std::net::IpAddr::from([127, 0, 0, 1]);
    /// Messenger worker threads per process.
    ms_async_op_threads: usize = 3;
    /// Microseconds an OSD's messenger worker polls without sleeping (yielding between polls) after handling events while a peer OSD owes it an answer; on VMs a sleep and wake-up cost more than the wait (0 = always sleep; at most 10000).
    ms_async_spin_us: u64 = 30;
    /// Fail every Nth socket read or write (fault injection; 0 = off).
    ms_inject_socket_failures: u64 = 0;
    /// Bytes of received messages held by dispatch, per messenger.
    ms_dispatch_throttle_bytes: u64 = 100 << 20;
    /// First reconnect backoff, seconds (doubles up to ms_max_backoff).
    ms_initial_backoff: f64 = 0.2;
    /// Longest reconnect backoff, seconds.
    ms_max_backoff: f64 = 15.0;
    /// A messenger handshake must complete within this, seconds.
    ms_connection_ready_timeout: f64 = 10.0;
    /// A connection that receives nothing (keepalives included) for this long is faulted, seconds.
    ms_connection_idle_timeout: f64 = 60.0;
    /// Seconds between heartbeat rounds (jittered, as Ceph: 0.5 s + up to 90% of the interval).
    osd_heartbeat_interval: f64 = 6.0;
    /// A peer silent this long on either heartbeat network is reported down, seconds.
    osd_heartbeat_grace: f64 = 20.0;
    /// Heartbeat peers per OSD besides PG peers (neighbours by id).
    osd_heartbeat_min_peers: usize = 10;
    /// Distinct reporting hosts needed to mark an OSD down (capped by the other up OSDs).
    mon_osd_min_down_reporters: usize = 2;
    /// Failure domain that counts as one reporter: "host" or "osd".
    mon_osd_reporter_subtree_level: String = "host".to_string();
    /// An OSD down this long is marked out, seconds.
    mon_osd_down_out_interval: f64 = 600.0;
    /// PGs inactive or unknown this long are stuck: PG_AVAILABILITY turns from HEALTH_WARN (PGs peering after an OSD restarts) into HEALTH_ERR, seconds.
    mon_pg_stuck_threshold: f64 = 60.0;
    /// The upmap balancer evens out PGs per OSD in each epoch that changes placement (Ceph: `ceph balancer on`, upmap mode); false leaves straw2 and the upmaps already made.
    mon_balancer_active: bool = true;
    /// Replicas for new pools.
    osd_pool_default_size: u8 = 3;
    /// Replicas needed to serve I/O for new pools; 0 means size - size/2.
    osd_pool_default_min_size: u8 = 0;
    /// Placement groups for new pools.
    osd_pool_default_pg_num: u32 = 32;
    /// Op queue shards per OSD (PG mod shards); each shard has its own thread.
    osd_op_num_shards: usize = 4;
    /// Client messages an OSD holds at once (receive throttle).
    osd_client_message_cap: u64 = 256;
    /// Client message bytes an OSD holds at once (receive throttle).
    osd_client_message_size_cap: u64 = 500 << 20;
    /// Largest object, bytes.
    osd_max_object_size: u64 = 128 << 20;
    /// Longest object name, bytes.
    osd_max_object_name_len: usize = 2048;
    /// Largest single write, bytes.
    osd_max_write_size: u64 = 90 << 20;
    /// The OSD's object store: "bluestore" (durable: a block file and a metadata database in the OSD's data directory) or "memstore" (RAM only; its data is gone when the OSD stops).
    osd_objectstore: String = "bluestore".to_string();
    /// Size of BlueStore's block file, bytes, fixed when the OSD is created (a sparse file: space is used as data arrives).
    bluestore_block_size: u64 = 10 << 30;
    /// BlueStore's allocation unit, bytes: a power of two from 4096 to 65536, fixed when the OSD is created.
    bluestore_min_alloc_size: u64 = 4096;
    /// Overwrites of existing data shorter than this (and every write of part of an allocation unit) are deferred: written to the metadata database as a redo record with the commit, then in place; longer ones go to new space, bytes.
    bluestore_prefer_deferred_size: u64 = 65536;
    /// Checksum of stored data, one per 4 KiB block, verified on every read (only "crc32c").
    bluestore_csum_type: String = "crc32c".to_string();
    /// Memory BlueStore's metadata database may cache, bytes.
    bluestore_cache_size: u64 = 256 << 20;
    /// Bytes of writes queued for the commit thread at once; beyond it a write waits (the shard retries).
    bluestore_throttle_bytes: u64 = 64 << 20;
    /// Committed batches whose deferred (small in-place) writes may wait to be written together.
    bluestore_max_deferred_txc: u64 = 32;
    /// WAL bytes between checkpoints (block flush, durable metadata commit): bounds log, unflushed metadata, replay.
    bluestore_wal_max_bytes: u64 = 128 << 20;
    /// Bytes of metadata rows BlueStore keeps in memory, over its database, before the database takes them.
    bluestore_memtable_max_bytes: u64 = 32 << 20;
    /// An OSD this full (used / size of its store) is reported near full: HEALTH_WARN.
    mon_osd_nearfull_ratio: f64 = 0.85;
    /// An OSD this full takes no backfill (reported as HEALTH_WARN).
    mon_osd_backfillfull_ratio: f64 = 0.90;
    /// An OSD this full is marked full in the map: writes to its PGs fail with ENOSPC (reads, deletes work): HEALTH_ERR.
    mon_osd_full_ratio: f64 = 0.95;
    /// Ops a client keeps in flight at once.
    objecter_inflight_ops: usize = 1024;
    /// Bytes a client keeps in flight at once.
    objecter_inflight_op_bytes: u64 = 100 << 20;
    /// A client op that gets no answer this long fails with a timeout, seconds (0 = wait forever).
    rados_osd_op_timeout: f64 = 0.0;
    /// A monitor request that gets no answer this long fails, seconds.
    rados_mon_op_timeout: f64 = 30.0;
    /// Seconds between a client's keepalives to the monitor.
    mon_client_ping_interval: f64 = 10.0;
    /// Open images with librbd's write-back cache (writethrough until the first flush, see below).
    rbd_cache: bool = true;
    /// Cache size, bytes; it bounds rbd_cache_max_dirty (no clean data is cached).
    rbd_cache_size: u64 = 32 << 20;
    /// Writers block above this many dirty plus in-flight write-back bytes (0 = writethrough; <= rbd_cache_size).
    rbd_cache_max_dirty: u64 = 24 << 20;
    /// Write-back starts when dirty bytes exceed this, bytes (at most rbd_cache_max_dirty).
    rbd_cache_target_dirty: u64 = 16 << 20;
    /// Dirty data older than this is written back, seconds.
    rbd_cache_max_dirty_age: f64 = 1.0;
    /// Write through until the guest's first flush (a guest that never flushes may not expect write-back).
    rbd_cache_writethrough_until_flush: bool = true;
    /// Largest read-ahead window, bytes (0 = no read-ahead).
    rbd_readahead_max_bytes: u64 = 512 << 10;
    /// Sequential reads in a row before read-ahead starts.
    rbd_readahead_trigger_requests: u32 = 10;
    /// Read-ahead switches off for an open image after this many bytes read through it (0 = never).
    rbd_readahead_disable_after_bytes: u64 = 50 << 20;
    /// Log filter for daemons (tracing-subscriber syntax, e.g. "info" or "messenger=debug,info").
    log_level: String = "info".to_string();
}

/// Longest duration an option may mean; larger, infinite or NaN values are clamped to it (never a panic).
pub const DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// Seconds as a `Duration` (config durations are f64 seconds, as in Ceph); negative and NaN mean zero.
pub fn secs(s: f64) -> Duration {
    if s.is_nan() || s <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(s).map_or(DURATION_MAX, |d| d.min(DURATION_MAX))
}

fn parse_value<T: DeserializeOwned>(key: &str, value: &str) -> Result<T, ConfigError> {
    #[derive(Deserialize)]
    struct W<T> {
        v: T,
    }
    let expected =
        OPTIONS.iter().find(|o| o.name == key).map_or("a value of the option's type", |o| o.expected());
    // The parser's own words name Rust types (`expected f64`): say what the option wants instead.
    let bad = |_: String| ConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        why: format!("expected {expected}"),
    };
    // As TOML first (numbers, booleans, quoted strings); then as a bare string.
    match toml::from_str::<W<T>>(&format!("v = {value}")) {
        Ok(w) => Ok(w.v),
        Err(first) => toml::from_str::<W<T>>(&format!("v = {}", toml_quote(value)))
            .map(|w| w.v)
            .map_err(|_| bad(first.message().to_string())),
    }
}

fn toml_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.into(), why: e.message().to_string() })
    }

    /// `--conf PATH`, then `$CUTTLE_CONF`, then `./cuttle-data/cuttle.toml`.
    pub fn discover(conf: Option<&Path>) -> Result<(Config, PathBuf), ConfigError> {
        let path = match conf {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os(CONF_ENV) {
                Some(p) => PathBuf::from(p),
                None => {
                    let p = Path::new(DEFAULT_DIR).join(CONF_FILE);
                    if !p.exists() {
                        return Err(ConfigError::NotFound);
                    }
                    p
                }
            },
        };
        Ok((Config::load(&path)?, path))
    }

    /// Writes `key = value` pairs into the file at `path` (created if missing), validating each against its
    /// option first; other lines of the file are kept.
    pub fn write_options(path: &Path, pairs: &[(String, String)]) -> Result<(), ConfigError> {
        let mut table: toml::Table = if path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.into(), source })?;
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse { path: path.into(), why: e.to_string() })?
        } else {
            toml::Table::new()
        };
        let mut check = Config::default();
        for (k, v) in pairs {
            check.set(k, v)?;
            // Store the typed value, as the struct serialises it.
            let typed = toml::Table::try_from(&check).map_err(|e| ConfigError::BadValue {
                key: k.clone(),
                value: v.clone(),
                why: e.to_string(),
            })?;
            match typed.get(k) {
                Some(val) => table.insert(k.clone(), val.clone()),
                None => table.remove(k), // an Option set to none
            };
        }
        let text = toml::to_string(&table)
            .map_err(|e| ConfigError::Parse { path: path.into(), why: e.to_string() })?;
        // Validate the whole file before replacing it.
        toml::from_str::<Config>(&text)
            .map_err(|e| ConfigError::Parse { path: path.into(), why: e.to_string() })?;
        crate::fsutil::write_durably(path, text.as_bytes())
            .map_err(|source| ConfigError::Write { path: path.into(), source })
    }

    /// min_size for a new pool of `size` replicas: the configured one, or size - size/2.
    pub fn default_min_size(&self, size: u8) -> u8 {
        match self.osd_pool_default_min_size {
            0 => size - size / 2,
            m => m.min(size),
        }
    }

    /// The messenger configuration these options describe.
    pub fn messenger(&self) -> messenger::MessengerConfig {
        messenger::MessengerConfig {
            connect_timeout: secs(self.ms_connection_ready_timeout),
            idle_timeout: secs(self.ms_connection_idle_timeout),
            initial_backoff: secs(self.ms_initial_backoff),
            max_backoff: secs(self.ms_max_backoff),
            dispatch_throttle_bytes: self.ms_dispatch_throttle_bytes,
            inject_socket_failures: self.ms_inject_socket_failures,
            ..messenger::MessengerConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_parses_typed_values_and_rejects_unknown_keys() {
        let mut c = Config::default();
        c.set("osd_heartbeat_grace", "3").unwrap();
        assert_eq!(c.osd_heartbeat_grace, 3.0);
        c.set("mon_host", "127.0.0.1:6789").unwrap();
        assert_eq!(c.mon_host, Some("127.0.0.1:6789".parse().unwrap()));
        c.set("log_level", "debug").unwrap();
        assert_eq!(c.log_level, "debug");
        assert!(matches!(c.set("no_such_option", "1"), Err(ConfigError::UnknownOption(_))));
        assert!(matches!(c.set("osd_pool_default_size", "many"), Err(ConfigError::BadValue { .. })));
        assert!(matches!(c.set("osd_pool_default_size", "300"), Err(ConfigError::BadValue { .. })));
    }

    #[test]
    fn defaults_and_bad_values_read_as_values_not_rust() {
        let shown = |name: &str| OPTIONS.iter().find(|o| o.name == name).unwrap().default_value();
        assert_eq!(shown("ms_dispatch_throttle_bytes"), "100 MiB");
        assert_eq!(shown("bluestore_block_size"), "10 GiB");
        assert_eq!(shown("bluestore_min_alloc_size"), "4 KiB");
        assert_eq!(shown("mon_osd_reporter_subtree_level"), "host");
        assert_eq!(shown("osd_heartbeat_grace"), "20.0");
        assert_eq!(shown("osd_pool_default_size"), "3");
        assert_eq!(shown("public_addr"), "127.0.0.1");
        assert_eq!(shown("mon_host"), "(none)");
        let e = Config::default().set("osd_heartbeat_grace", "abc").unwrap_err().to_string();
        assert_eq!(e, "bad value \"abc\" for osd_heartbeat_grace: expected a number");
        let e = Config::default().set("osd_pool_default_size", "300").unwrap_err().to_string();
        assert!(e.contains("osd_pool_default_size") && e.contains("0 to 255"), "{e}");
    }

    #[test]
    fn write_options_round_trips_and_keeps_other_keys() {
        let dir = std::env::temp_dir().join(format!("cuttle-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("cuttle.toml");
        std::fs::write(&p, "fsid = \"abc\"\n").unwrap();
        Config::write_options(&p, &[("osd_heartbeat_interval".into(), "1".into())]).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.fsid, "abc");
        assert_eq!(c.osd_heartbeat_interval, 1.0);
        assert!(Config::write_options(&p, &[("bogus".into(), "1".into())]).is_err());
        std::fs::write(&p, "osd_heartbeat_interval = \"soon\"\n").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_never_panic() {
        assert_eq!(secs(1.5), Duration::from_millis(1500));
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::NAN), Duration::ZERO);
        assert_eq!(secs(f64::INFINITY), DURATION_MAX);
        assert_eq!(secs(1e30), DURATION_MAX);
    }

    #[test]
    fn every_option_is_documented() {
        for o in OPTIONS {
            assert!(!o.help.is_empty(), "{} has no help", o.name);
            let shown = o.default_value();
            // No Rust source: no shifts, no constructors, no quotes.
            for rust in ["<<", "::", "(", "\"", "to_string"] {
                assert!(!shown.contains(rust) || shown == "(none)", "{}: default shown as {shown}", o.name);
            }
            assert!(!o.expected().contains("type"), "{} ({}) has no words for its type", o.name, o.ty);
        }
        assert!(OPTIONS.iter().any(|o| o.name == "osd_heartbeat_grace" && o.default == "20.0"));
    }

    #[test]
    fn rbd_options_have_cephs_names_and_are_typed() {
        // Goal: librbd's options are settable under Ceph's names and refuse values of the wrong type.
        // Method: set each kind, then bad values.
        let mut c = Config::default();
        assert!(c.rbd_cache && c.rbd_cache_writethrough_until_flush);
        assert_eq!(
            (c.rbd_cache_size, c.rbd_cache_max_dirty, c.rbd_cache_target_dirty),
            (32 << 20, 24 << 20, 16 << 20)
        );
        c.set("rbd_cache", "false").unwrap();
        c.set("rbd_cache_max_dirty_age", "0.5").unwrap();
        c.set("rbd_readahead_trigger_requests", "4").unwrap();
        c.set("rbd_readahead_disable_after_bytes", "0").unwrap();
        assert!(!c.rbd_cache);
        assert_eq!(c.rbd_cache_max_dirty_age, 0.5);
        assert_eq!((c.rbd_readahead_trigger_requests, c.rbd_readahead_disable_after_bytes), (4, 0));
        assert!(matches!(c.set("rbd_cache", "maybe"), Err(ConfigError::BadValue { .. })));
        assert!(matches!(c.set("rbd_cache_size", "-1"), Err(ConfigError::BadValue { .. })));
        for name in [
            "rbd_cache",
            "rbd_cache_size",
            "rbd_cache_max_dirty",
            "rbd_cache_target_dirty",
            "rbd_cache_max_dirty_age",
            "rbd_cache_writethrough_until_flush",
            "rbd_readahead_max_bytes",
            "rbd_readahead_trigger_requests",
            "rbd_readahead_disable_after_bytes",
        ] {
            assert!(OPTIONS.iter().any(|o| o.name == name), "{name} is not in OPTIONS");
        }
    }
}
