//! The OSD runtime: [`Osd::start`] wires the store, the shards, the messengers, the heartbeat service and the
//! MonClient together, registers and boots the OSD, and keeps it in step with the map; [`Osd::shutdown`]
//! leaves cleanly.
//!
//! Threads: the process-wide messenger [`WorkerPool`] (shared by the public, cluster, heartbeat and bootstrap
//! messengers), one thread per op shard, the heartbeat thread, and `osd-map`, which follows the map (hands it to
//! the shards, picks heartbeat peers, boots again when wrongly marked down) and reports PG stats to the
//! monitor. Map callbacks run on messenger workers and only wake `osd-map`.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerError, Policy, Refused,
    WorkerPool, WORKERS_MAX,
};
use parking_lot::Mutex;

use rados::config::{secs, Config};
use rados::ids::{Epoch, Fsid, OsdId, PgId};
use rados::map::{OsdAddrs, OsdMap};
use rados::monclient::{MonClient, MonClientError};
use rados::msg::{types, MonReply, MonRequest, OsdCommand, OsdCommandReply, OsdError, OsdOpRequest, PgStat};
use rados::placement::Placement;

use crate::bluestore::{BlueStore, BlueStoreOptions};
use crate::exec::OpLimits;
use crate::heartbeat::{HbReport, HeartbeatError, HeartbeatService, Peer};
use crate::proto::{self, PeerMsg};
use crate::shard::{
    reply_command, Shard, ShardEvent, ShardHandle, ShardShared, StallGuard, SubmitError, INLINE_BATCH_MAX,
    TICK,
};
use crate::store::{MemStore, ObjectStore};

/// How often PG stats go to the monitor (and how soon after a PG changes state, at most this plus a tick).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);
/// The `osd-map` thread's tick.
const MAP_TICK: Duration = Duration::from_millis(100);
/// While the map says we are down, a boot is re-sent this often.
const BOOT_RETRY: Duration = Duration::from_secs(2);
/// Peer messages an OSD holds at once (receive throttle on the cluster messenger).
pub const PEER_MESSAGES_MAX: u64 = 4096;
/// Client messages held at once when `osd_client_message_cap` is 0 (unlimited is not an option for the
/// shard queues, which must be able to take every message the throttle lets through).
const CLIENT_MESSAGES_DEFAULT: u64 = 1024;
/// Room in each shard queue beyond the throttles, for maps and commands from our own threads.
const SHARD_QUEUE_SLACK: usize = 256;
/// Most op shards.
pub const SHARDS_MAX: usize = 64;
/// The longest `ms_async_spin_us` accepted: 10 ms of polling is already far past any round trip worth waiting for.
pub const SPIN_US_MAX: u64 = 10_000;
/// Shutdown waits this long for writes in flight to be acknowledged.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// Shutdown waits this long for the monitor to acknowledge the mark-down.
const MARK_ME_DOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// Our own threads wait this long to put a map into a full shard queue.
const SHARD_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an OSD could not start. Messages name what failed; the underlying error is the `source` (printed by
/// callers that walk the chain, such as anyhow's `{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum OsdStartError {
    #[error("mon_host is not set in the config")]
    NoMonHost,
    #[error("bad config: {0}")]
    Config(String),
    #[error("{}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("data directory {} is damaged: {why}", path.display())]
    DataDir { path: PathBuf, why: String },
    #[error("cannot reach the monitor at {addr}")]
    Mon { addr: SocketAddr, source: MonClientError },
    #[error("unexpected answer from the monitor at {addr}: {reply:?}")]
    MonReply { addr: SocketAddr, reply: MonReply },
    #[error("the monitor at {addr} belongs to cluster {theirs}, the config names {ours}")]
    WrongCluster { addr: SocketAddr, ours: Fsid, theirs: Fsid },
    #[error(transparent)]
    Messenger(#[from] MessengerError),
    #[error(transparent)]
    Heartbeat(#[from] HeartbeatError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

/// A running OSD.
pub struct Osd {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Inner {
    id: OsdId,
    uuid: [u8; 16],
    host: String,
    addrs: OsdAddrs,
    pool: Arc<WorkerPool>,
    public: Arc<Messenger>,
    cluster: Arc<Messenger>,
    hb: HeartbeatService,
    monc: Arc<MonClient>,
    store: Arc<dyn ObjectStore>,
    shards: Vec<Arc<ShardHandle>>,
    stats: Vec<Arc<Mutex<BTreeMap<PgId, PgStat>>>>,
    io: Arc<crate::shard::IoCounters>,
    writes_in_flight: Vec<Arc<AtomicUsize>>,
    flags: Arc<Flags>,
    guard: Arc<StallGuard>,
    heartbeat_min_peers: usize,
    stopped: AtomicBool,
}

/// State the messenger dispatchers and the heartbeat callback read.
#[derive(Debug, Default)]
struct Flags {
    /// Shutdown has begun: client ops are no longer taken.
    stopping: AtomicBool,
    /// The newest map does not show this OSD up at its addresses.
    down_in_map: AtomicBool,
    /// `osd-map` should exit.
    stop_threads: AtomicBool,
}

impl std::fmt::Debug for Osd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Osd({} public {})", self.inner.id, self.inner.addrs.public)
    }
}

/// A random-enough 64-bit value for nonces and uuids: std's per-process random hash keys (seeded from the
/// OS), mixed with the clock and the pid.
fn entropy() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(t);
    h.write_u32(std::process::id());
    h.finish()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OsdStartError + '_ {
    move |source| OsdStartError::Io { path: path.to_path_buf(), source }
}

/// Reads DATA/uuid, creating it on first start.
fn load_uuid(data_dir: &Path) -> Result<[u8; 16], OsdStartError> {
    let path = data_dir.join("uuid");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<Fsid>()
            .map(|f| f.0)
            .map_err(|e| OsdStartError::DataDir { path: path.clone(), why: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join("whoami").exists() {
                return Err(OsdStartError::DataDir { path, why: "whoami exists but uuid is missing".into() });
            }
            let mut uuid = [0u8; 16];
            uuid[..8].copy_from_slice(&entropy().to_le_bytes());
            uuid[8..].copy_from_slice(&entropy().rotate_left(17).to_le_bytes());
            // RFC 4122 version 4 (random) bits, so tools that parse it are happy.
            uuid[6] = (uuid[6] & 0x0f) | 0x40;
            uuid[8] = (uuid[8] & 0x3f) | 0x80;
            write_file(&path, &format!("{}\n", Fsid(uuid)))?;
            Ok(uuid)
        }
        Err(e) => Err(OsdStartError::Io { path, source: e }),
    }
}

/// BlueStore's options, from the config.
pub fn bluestore_options(cfg: &Config) -> BlueStoreOptions {
    BlueStoreOptions {
        bluestore_block_size: cfg.bluestore_block_size,
        bluestore_min_alloc_size: cfg.bluestore_min_alloc_size,
        bluestore_prefer_deferred_size: cfg.bluestore_prefer_deferred_size,
        bluestore_csum_type: cfg.bluestore_csum_type.clone(),
        bluestore_cache_size: cfg.bluestore_cache_size,
        bluestore_throttle_bytes: cfg.bluestore_throttle_bytes,
        bluestore_max_deferred_txc: cfg.bluestore_max_deferred_txc,
        bluestore_wal_max_bytes: cfg.bluestore_wal_max_bytes,
        bluestore_memtable_max_bytes: cfg.bluestore_memtable_max_bytes,
    }
}

/// Whether `data_dir` holds a BlueStore (its label is written last when one is made).
pub fn holds_bluestore(data_dir: &Path) -> bool {
    data_dir.join(crate::bluestore::LABEL_FILE).exists()
}

/// The store `osd_objectstore` names, in the OSD's data directory: a BlueStore is created there on the OSD's
/// first start and opened on every later one (same id, same data).
fn open_store(
    cfg: &Config,
    data_dir: &Path,
    id: OsdId,
    fsid: Option<Fsid>,
) -> Result<Arc<dyn ObjectStore>, OsdStartError> {
    let damaged = |why: String| OsdStartError::DataDir { path: data_dir.to_path_buf(), why };
    match cfg.osd_objectstore.as_str() {
        "memstore" => {
            if holds_bluestore(data_dir) {
                return Err(OsdStartError::Config(format!(
                    "osd_objectstore = memstore, but {} holds this OSD's BlueStore (its data would not be \
                     served); set osd_objectstore = bluestore",
                    data_dir.display()
                )));
            }
            Ok(Arc::new(MemStore::new()))
        }
        "bluestore" => {
            let opts = bluestore_options(cfg);
            if !holds_bluestore(data_dir) {
                BlueStore::mkfs(data_dir, &opts, id.0, fsid.map_or([0; 16], |f| f.0))
                    .map_err(|e| damaged(format!("creating the BlueStore: {e}")))?;
                tracing::info!(%id, block_bytes = opts.bluestore_block_size, "created a BlueStore");
            }
            let t = Instant::now();
            let store = BlueStore::open(data_dir, &opts)
                .map_err(|e| damaged(format!("opening the BlueStore: {e}")))?;
            tracing::info!(%id, mount_ms = t.elapsed().as_millis() as u64, "BlueStore mounted");
            Ok(Arc::new(store))
        }
        other => Err(OsdStartError::Config(format!(
            "osd_objectstore = {other:?}: \"bluestore\" (durable) or \"memstore\" (RAM only)"
        ))),
    }
}

/// Replaces a small file durably (see [`rados::fsutil::write_durably`]).
fn write_file(path: &Path, text: &str) -> Result<(), OsdStartError> {
    rados::fsutil::write_durably(path, text.as_bytes()).map_err(io_err(path))
}

fn load_whoami(data_dir: &Path) -> Result<Option<OsdId>, OsdStartError> {
    let path = data_dir.join("whoami");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map(|n| Some(OsdId(n)))
            .map_err(|e| OsdStartError::DataDir { path, why: format!("bad whoami: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OsdStartError::Io { path, source: e }),
    }
}

/// `ceph osd new`: asks the monitor for this uuid's id, on a short-lived messenger (the OSD's own messengers
/// are named after the id, which we do not know yet).
fn register(
    pool: &Arc<WorkerPool>,
    cfg: &Config,
    mon: SocketAddr,
    uuid: [u8; 16],
    host: &str,
    timeout: Duration,
) -> Result<OsdId, OsdStartError> {
    let nonce = entropy();
    let msgr =
        Arc::new(Messenger::new(Arc::clone(pool), EntityName::client(nonce >> 1), nonce, cfg.messenger()));
    msgr.start().map_err(OsdStartError::Thread)?;
    let monc = MonClient::start(Arc::clone(&msgr), mon, false);
    let r = monc.request(MonRequest::OsdNew { uuid, host: host.to_string() }, timeout);
    monc.shutdown();
    msgr.shutdown();
    msgr.wait();
    match r {
        Ok(MonReply::OsdId(id)) => Ok(id),
        Ok(reply) => Err(OsdStartError::MonReply { addr: mon, reply }),
        Err(source) => Err(OsdStartError::Mon { addr: mon, source }),
    }
}

impl Osd {
    /// Starts an OSD with its data in `data_dir` (created if missing): registers it with the monitor on first
    /// start, binds its messengers on `public_addr`, boots it, and serves until [`Osd::shutdown`]. Gives up
    /// with an error naming the monitor when it does not answer within `rados_mon_op_timeout`.
    pub fn start(cfg: &Config, data_dir: &Path, host: String) -> Result<Osd, OsdStartError> {
        let mon = cfg.mon_host.ok_or(OsdStartError::NoMonHost)?;
        if !(1..=WORKERS_MAX).contains(&cfg.ms_async_op_threads) {
            return Err(OsdStartError::Config(format!(
                "ms_async_op_threads = {} is outside 1..={WORKERS_MAX}",
                cfg.ms_async_op_threads
            )));
        }
        if cfg.ms_async_spin_us > SPIN_US_MAX {
            return Err(OsdStartError::Config(format!(
                "ms_async_spin_us = {} is above {SPIN_US_MAX}",
                cfg.ms_async_spin_us
            )));
        }
        if !(1..=SHARDS_MAX).contains(&cfg.osd_op_num_shards) {
            return Err(OsdStartError::Config(format!(
                "osd_op_num_shards = {} is outside 1..={SHARDS_MAX}",
                cfg.osd_op_num_shards
            )));
        }
        let fsid = match cfg.fsid.trim() {
            "" => None,
            s => Some(s.parse::<Fsid>().map_err(|e| OsdStartError::Config(e.to_string()))?),
        };
        let timeout = secs(cfg.rados_mon_op_timeout).max(Duration::from_secs(1));
        std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let uuid = load_uuid(data_dir)?;
        let pool =
            WorkerPool::with_spin(cfg.ms_async_op_threads, Duration::from_micros(cfg.ms_async_spin_us))
                .map_err(|e| OsdStartError::Io { path: PathBuf::from("(worker pool)"), source: e })?;
        let id = match load_whoami(data_dir)? {
            Some(id) => id,
            None => {
                let id = register(&pool, cfg, mon, uuid, &host, timeout)?;
                write_file(&data_dir.join("whoami"), &format!("{}\n", id.0))?;
                tracing::info!(%id, uuid = %Fsid(uuid), "registered with the monitor");
                id
            }
        };
        let name = EntityName::osd(u64::from(id.0));
        let nonce = entropy();
        let ip = cfg.public_addr;
        let flags = Arc::new(Flags::default());
        flags.down_in_map.store(true, Ordering::Release);
        let monc_cell: Arc<OnceLock<Arc<MonClient>>> = Arc::new(OnceLock::new());

        let report = {
            let flags = Arc::clone(&flags);
            let monc = Arc::clone(&monc_cell);
            Box::new(move |r: HbReport| {
                // An OSD the map calls down (or that is leaving) has no business accusing others: after a
                // freeze, its own silence is what the monitor saw.
                if flags.down_in_map.load(Ordering::Acquire) || flags.stopping.load(Ordering::Acquire) {
                    return;
                }
                let Some(monc) = monc.get() else { return };
                let req = match r {
                    HbReport::Failed { target, failed_for } => {
                        tracing::info!(%target, failed_ms = failed_for.as_millis() as u64, "reporting a silent peer");
                        MonRequest::OsdFailure {
                            reporter: id,
                            target,
                            failed_for_ms: failed_for.as_millis().min(u64::MAX as u128) as u64,
                            alive: false,
                        }
                    }
                    HbReport::Alive { target } => {
                        tracing::info!(%target, "peer answers again; cancelling its failure report");
                        MonRequest::OsdFailure { reporter: id, target, failed_for_ms: 0, alive: true }
                    }
                };
                monc.send_oneway(&req);
            })
        };
        let hb = HeartbeatService::start(Arc::clone(&pool), cfg, id, nonce ^ 0x6862, ip, report)?;

        // Shard queues: sized for everything the client and peer throttles let through at once.
        let client_cap = if cfg.osd_client_message_cap == 0 {
            CLIENT_MESSAGES_DEFAULT
        } else {
            cfg.osd_client_message_cap
        };
        let queue = client_cap as usize + PEER_MESSAGES_MAX as usize + SHARD_QUEUE_SLACK;
        let nshards = cfg.osd_op_num_shards;

        let cluster = Arc::new(Messenger::new(Arc::clone(&pool), name, nonce ^ 0x636c, cfg.messenger()));
        let store = open_store(cfg, data_dir, id, fsid)?;
        let guard =
            Arc::new(StallGuard::new(secs(cfg.osd_heartbeat_grace / 2.0).max(Duration::from_secs(3))));
        let (report_tx, report_rx) = crossbeam_channel::bounded::<()>(1);
        let stats: Vec<_> = (0..nshards).map(|_| Arc::new(Mutex::new(BTreeMap::new()))).collect();
        let in_flight: Vec<_> = (0..nshards).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let io = Arc::new(crate::shard::IoCounters::default());
        let limits = OpLimits::from_config(cfg);
        let shards: Vec<Arc<ShardHandle>> = (0..nshards)
            .map(|index| {
                let shard = Shard::new(ShardShared {
                    whoami: id,
                    index,
                    count: nshards,
                    store: Arc::clone(&store),
                    limits,
                    cluster: Arc::clone(&cluster),
                    stats: Arc::clone(&stats[index]),
                    io: Arc::clone(&io),
                    writes_in_flight: Arc::clone(&in_flight[index]),
                    report_now: report_tx.clone(),
                    guard: Arc::clone(&guard),
                    full_ratio: cfg.mon_osd_full_ratio,
                });
                Arc::new(ShardHandle::new(shard, queue, INLINE_BATCH_MAX))
            })
            .collect();
        // Each group commit rings every shard's doorbell (a flag: it needs no queue room and is never lost);
        // the shards' PGs then send what waited for durability. Weak: the store must not keep the shards alive.
        let weak: Vec<std::sync::Weak<ShardHandle>> = shards.iter().map(Arc::downgrade).collect();
        store.set_commit_notifier(Box::new(move |_| {
            for s in weak.iter().filter_map(std::sync::Weak::upgrade) {
                s.ring();
            }
        }));

        cluster.set_default_policy(Policy::stateless_server());
        cluster.set_policy(EntityType::Client, Policy::stateless_server());
        cluster.set_policy(EntityType::Osd, Policy::lossless_peer().with_throttle(PEER_MESSAGES_MAX, 0));
        cluster.add_dispatcher_tail(Arc::new(ClusterDispatcher { shards: shards.clone() }));
        let cluster_addr = cluster.bind(SocketAddr::new(ip, 0))?;

        let public = Arc::new(Messenger::new(Arc::clone(&pool), name, nonce, cfg.messenger()));
        public.set_default_policy(Policy::stateless_server());
        public.set_policy(
            EntityType::Client,
            Policy::stateless_server().with_throttle(client_cap, cfg.osd_client_message_size_cap),
        );
        public.set_policy(EntityType::Osd, Policy::stateless_server());
        public.add_dispatcher_tail(Arc::new(PublicDispatcher {
            shards: shards.clone(),
            flags: Arc::clone(&flags),
        }));
        let public_addr = public.bind(SocketAddr::new(ip, 0))?;
        let addrs = OsdAddrs {
            public: public_addr,
            cluster: cluster_addr,
            hb_front: hb.front_addr(),
            hb_back: hb.back_addr(),
        };

        for m in [&cluster, &public] {
            m.start().map_err(OsdStartError::Thread)?;
            m.ready();
        }
        // The MonClient sets its own policy for the monitor on the public messenger and adds itself first.
        let monc = MonClient::start(Arc::clone(&public), mon, false);
        monc_cell.set(Arc::clone(&monc)).expect("set once");

        let inner = Arc::new(Inner {
            id,
            uuid,
            host,
            addrs,
            pool,
            public: Arc::clone(&public),
            cluster: Arc::clone(&cluster),
            hb,
            monc: Arc::clone(&monc),
            store: Arc::clone(&store),
            shards: shards.clone(),
            stats: stats.clone(),
            io,
            writes_in_flight: in_flight.clone(),
            flags,
            guard: Arc::clone(&guard),
            heartbeat_min_peers: cfg.osd_heartbeat_min_peers,
            stopped: AtomicBool::new(false),
        });
        let osd = Osd { inner: Arc::clone(&inner), threads: Mutex::new(Vec::new()) };

        for (index, shard) in shards.into_iter().enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("osd-shard-{index}"))
                .spawn(move || {
                    // The shard thread runs what the workers queued for it: like them, it never waits for a
                    // peer's connection to drain (see `never_wait_on_this_thread`).
                    messenger::never_wait_on_this_thread();
                    shard.run(TICK)
                })
                .map_err(OsdStartError::Thread)?;
            osd.threads.lock().push(t);
        }

        let (wake_tx, wake_rx) = crossbeam_channel::bounded::<()>(1);
        monc.on_map(move |_| {
            // Runs on a messenger worker: only wake the map thread, which reads the newest map itself.
            let _ = wake_tx.try_send(());
        });
        let t = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("osd-map".into())
                .spawn(move || map_loop(inner, wake_rx, report_rx))
                .map_err(OsdStartError::Thread)?
        };
        osd.threads.lock().push(t);

        let first = match monc.wait_for_map(None, timeout) {
            Ok(m) => m,
            Err(source) => {
                osd.stop_everything();
                return Err(OsdStartError::Mon { addr: mon, source });
            }
        };
        if let Some(ours) = fsid {
            if first.fsid != ours {
                osd.stop_everything();
                return Err(OsdStartError::WrongCluster { addr: mon, ours, theirs: first.fsid });
            }
        }
        let boot = MonRequest::OsdBoot { osd: id, uuid, addrs, host: inner.host.clone() };
        match monc.request(boot, timeout) {
            Ok(MonReply::Ok) => {}
            Ok(reply) => {
                osd.stop_everything();
                return Err(OsdStartError::MonReply { addr: mon, reply });
            }
            Err(source) => {
                osd.stop_everything();
                return Err(OsdStartError::Mon { addr: mon, source });
            }
        }
        tracing::info!(%id, ?addrs, "booted");
        Ok(osd)
    }

    pub fn id(&self) -> OsdId {
        self.inner.id
    }

    pub fn addrs(&self) -> OsdAddrs {
        self.inner.addrs
    }

    /// Why the object store stopped committing (a device error), if it did: the OSD must stop, since nothing
    /// it acknowledges from now on could be made durable.
    pub fn store_failed(&self) -> Option<String> {
        self.inner.store.failed().map(|e| e.to_string())
    }

    /// The object store (tests look at what landed where).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    pub fn map(&self) -> Option<Arc<OsdMap>> {
        self.inner.monc.map()
    }

    /// Waits until the map shows this OSD up at its addresses.
    pub fn wait_until_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.inner.monc.map().is_some_and(|m| is_me_up(&m, self.inner.id, &self.inner.addrs)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Leaves cleanly: stops taking client ops, waits (bounded) for writes in flight, tells the monitor
    /// (`OsdMarkMeDown`, bounded wait), then stops every thread and messenger. Idempotent.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.flags.stopping.swap(true, Ordering::AcqRel) {
            return self.stop_everything();
        }
        tracing::info!(id = %inner.id, "shutting down");
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        loop {
            let n: usize = inner.writes_in_flight.iter().map(|a| a.load(Ordering::Relaxed)).sum();
            if n == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(writes = n, "writes still in flight at shutdown; leaving them to the peers");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match inner.monc.request(MonRequest::OsdMarkMeDown { osd: inner.id }, MARK_ME_DOWN_TIMEOUT) {
            Ok(_) => tracing::info!(id = %inner.id, "monitor marked us down"),
            Err(e) => tracing::warn!(id = %inner.id, "mark-me-down not acknowledged: {e}"),
        }
        self.stop_everything();
    }

    fn stop_everything(&self) {
        let inner = &self.inner;
        if inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.flags.stopping.store(true, Ordering::Release);
        inner.flags.stop_threads.store(true, Ordering::Release);
        for shard in &inner.shards {
            shard.stop();
        }
        for t in self.threads.lock().drain(..) {
            if t.join().is_err() {
                tracing::error!(id = %inner.id, "an OSD thread panicked");
            }
        }
        inner.hb.shutdown();
        inner.monc.shutdown();
        for m in [&inner.public, &inner.cluster] {
            m.shutdown();
            m.wait();
        }
        inner.pool.shutdown();
        // Whoever still holds the store (a PG of a shard), its files are closed cleanly now.
        inner.store.close();
        tracing::info!(id = %inner.id, "stopped");
    }
}

impl Drop for Osd {
    fn drop(&mut self) {
        self.stop_everything();
    }
}

fn is_me_up(map: &OsdMap, me: OsdId, addrs: &OsdAddrs) -> bool {
    map.osds.get(&me).is_some_and(|i| i.up && i.addrs.as_ref() == Some(addrs))
}

/// The `osd-map` thread: follows the map and reports to the monitor.
fn map_loop(inner: Arc<Inner>, wake: Receiver<()>, report_now: Receiver<()>) {
    let mut prev: Option<Arc<OsdMap>> = None;
    let mut last_report = Instant::now();
    let mut report_due = false;
    let mut last_boot = Instant::now();
    let mut last_beat = Instant::now();
    while !inner.flags.stop_threads.load(Ordering::Acquire) {
        crossbeam_channel::select! {
            recv(wake) -> _ => {}
            recv(report_now) -> _ => report_due = true,
            default(MAP_TICK) => {}
        }
        let now = Instant::now();
        let epoch = prev.as_ref().map_or(Epoch(0), |m| m.epoch);
        inner.guard.check(last_beat, now, epoch);
        last_beat = now;
        if let Some(map) = inner.monc.map() {
            if prev.as_ref().is_none_or(|p| map.epoch > p.epoch) {
                handle_map(&inner, prev.as_deref(), &map);
                if inner.flags.down_in_map.load(Ordering::Acquire) {
                    // Boot again at once the first time we see ourselves down.
                    last_boot = now - BOOT_RETRY;
                }
                prev = Some(map);
            }
        }
        let stopping = inner.flags.stopping.load(Ordering::Acquire);
        if !stopping
            && inner.flags.down_in_map.load(Ordering::Acquire)
            && now.saturating_duration_since(last_boot) >= BOOT_RETRY
            && prev.as_ref().is_some_and(|m| m.osds.contains_key(&inner.id))
        {
            last_boot = now;
            tracing::info!(id = %inner.id, "the map says this OSD is down; booting again");
            let boot = MonRequest::OsdBoot {
                osd: inner.id,
                uuid: inner.uuid,
                addrs: inner.addrs,
                host: inner.host.clone(),
            };
            inner.monc.send_oneway(&boot);
        }
        if !stopping && (report_due || now.saturating_duration_since(last_report) >= REPORT_INTERVAL) {
            if let Some(map) = prev.as_ref().filter(|_| !inner.flags.down_in_map.load(Ordering::Acquire)) {
                report_due = false;
                last_report = now;
                send_report(&inner, map.epoch);
            }
        }
    }
}

fn send_report(inner: &Inner, epoch: Epoch) {
    let pgs: Vec<PgStat> =
        inner.stats.iter().flat_map(|s| s.lock().values().cloned().collect::<Vec<_>>()).collect();
    let req = MonRequest::OsdReport {
        osd: inner.id,
        epoch,
        pgs,
        ping_times: inner.hb.ping_times(),
        statfs: inner.store.statfs(),
        io: inner.io.snapshot(),
        version: rados::msg::daemon_version(),
    };
    inner.monc.send_oneway(&req);
}

fn handle_map(inner: &Inner, prev: Option<&OsdMap>, map: &Arc<OsdMap>) {
    let me = inner.id;
    let up = is_me_up(map, me, &inner.addrs);
    let was_down = inner.flags.down_in_map.swap(!up, Ordering::AcqRel);
    let stopping = inner.flags.stopping.load(Ordering::Acquire);
    if up && was_down {
        tracing::info!(%me, epoch = %map.epoch, "the map shows this OSD up");
    } else if !up && !was_down && stopping {
        tracing::info!(%me, epoch = %map.epoch, "the map shows this OSD down, as asked");
    } else if !up && !was_down {
        tracing::warn!(%me, epoch = %map.epoch, "the map shows this OSD down");
    }
    for shard in &inner.shards {
        match shard.submit_timeout(ShardEvent::Map(Arc::clone(map)), SHARD_SEND_TIMEOUT) {
            Ok(()) => {}
            Err(SubmitError::Stopped) => return, // shutting down
            Err(SubmitError::Full(_)) => {
                tracing::error!(epoch = %map.epoch, "a shard did not take the new map within {SHARD_SEND_TIMEOUT:?}")
            }
        }
    }
    // Sessions to OSDs that went down or moved are dropped: whatever was queued on them belonged to an
    // interval that is over, and a peer at new addresses is a new process.
    if let Some(prev) = prev {
        for (osd, old) in &prev.osds {
            let Some(old_addrs) = old.addrs.filter(|_| old.up) else { continue };
            let now_same = map.osds.get(osd).is_some_and(|i| i.up && i.addrs == Some(old_addrs));
            if !now_same && *osd != me {
                tracing::debug!(%osd, "dropping cluster session to a peer that went down or moved");
                inner.cluster.mark_down(old_addrs.cluster);
            }
        }
    }
    inner.hb.set_peers(map.epoch, heartbeat_peers(map, me, inner.heartbeat_min_peers));
}

/// PG peers plus neighbours by id (the next and previous up OSDs, then onwards) up to `min_peers`, as
/// Ceph's `maybe_update_heartbeat_peers`. Only up OSDs with addresses.
pub fn heartbeat_peers(map: &OsdMap, me: OsdId, min_peers: usize) -> Vec<Peer> {
    let placement = Placement::new(map);
    let mut want: BTreeSet<OsdId> = BTreeSet::new();
    for pool in map.pools.values() {
        for seed in 0..pool.pg_num {
            if let Ok(ua) = placement.up_acting(PgId::new(pool.id, seed)) {
                if ua.acting.contains(&me) {
                    want.extend(ua.acting.iter().copied().filter(|&o| o != me));
                }
            }
        }
    }
    let up: Vec<OsdId> =
        map.osds.iter().filter(|(o, i)| **o != me && i.up && i.addrs.is_some()).map(|(o, _)| *o).collect();
    if !up.is_empty() {
        // Walk outwards from our id: next, previous, next but one, ...
        let after = up.partition_point(|&o| o < me);
        let n = up.len();
        let mut k = 0;
        while (want.len() < min_peers || k < 2) && k < 2 * n {
            let idx = if k % 2 == 0 { (after + k / 2) % n } else { (after + n - 1 - k / 2) % n };
            want.insert(up[idx]);
            k += 1;
        }
    }
    want.into_iter()
        .filter_map(|o| {
            let i = map.osds.get(&o)?;
            let a = i.addrs.filter(|_| i.up)?;
            Some(Peer { osd: o, front: a.hb_front, back: a.hb_back })
        })
        .collect()
}

/// Client ops and commands from the public network: decoded on the messenger worker and handed to their
/// shard (fast dispatch); when the shard cannot take one now, handed back as Busy (the messenger stops reading
/// that client and offers it again).
struct PublicDispatcher {
    shards: Vec<Arc<ShardHandle>>,
    flags: Arc<Flags>,
}

impl PublicDispatcher {
    fn shard(&self, pgid: PgId) -> &ShardHandle {
        &self.shards[pgid.seed as usize % self.shards.len()]
    }
}

impl Dispatcher for PublicDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        matches!(m.msg_type, types::OSD_OP | types::OSD_COMMAND)
    }

    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        match m.msg_type {
            types::OSD_OP => {
                let req: OsdOpRequest = match m.decode() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(peer = %messenger::entity::shown_peer(conn.peer_name()), "undecodable op: {e}");
                        let reply = rados::msg::OsdOpReply {
                            tid: m.tid,
                            epoch: Epoch(0),
                            result: Err(OsdError::Invalid("cannot decode the request".into())),
                            version: 0,
                            outs: Vec::new(),
                        };
                        let _ =
                            conn.send_message(Message::encode(types::OSD_OP_REPLY, &reply).with_tid(m.tid));
                        return Ok(());
                    }
                };
                if self.flags.stopping.load(Ordering::Acquire) {
                    // Not answered: the client resends to the new primary once the map moves the PG.
                    return Ok(());
                }
                match self.shard(req.pgid).try_submit(ShardEvent::Op { conn: conn.clone(), msg: m, req }) {
                    Ok(()) => {}
                    // The shard's queue is full: the messenger keeps the op, stops reading this client and
                    // offers it again shortly (an overloaded OSD slows its clients down; it does not fail ops).
                    Err(SubmitError::Full(ev)) => {
                        let ShardEvent::Op { msg, .. } = *ev else { unreachable!("we queued an op") };
                        return Err(Refused::Busy(msg));
                    }
                    Err(SubmitError::Stopped) => {} // shutting down
                }
            }
            types::OSD_COMMAND => {
                let cmd: OsdCommand = match m.decode() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(peer = %messenger::entity::shown_peer(conn.peer_name()), "undecodable command: {e}");
                        let reply = OsdCommandReply {
                            result: Err(OsdError::Invalid("cannot decode the command".into())),
                            next: None,
                        };
                        reply_command(conn, m.tid, reply);
                        return Ok(());
                    }
                };
                // A command that cannot be queued waits (Busy) like an op: it must never go unanswered.
                let busy = match cmd {
                    OsdCommand::ListObjects { pgid } => {
                        let ev = ShardEvent::ListObjects { conn: conn.clone(), tid: m.tid, pgid };
                        match self.shard(pgid).try_submit(ev) {
                            Err(SubmitError::Full(_)) => Some(m),
                            Ok(()) | Err(SubmitError::Stopped) => None,
                        }
                    }
                    OsdCommand::PgList(req) => {
                        let shard = self.shard(req.pgid);
                        match shard.try_submit(ShardEvent::List { conn: conn.clone(), msg: m, req }) {
                            Err(SubmitError::Full(ev)) => {
                                let ShardEvent::List { msg, .. } = *ev else {
                                    unreachable!("we queued a listing")
                                };
                                Some(msg)
                            }
                            Ok(()) | Err(SubmitError::Stopped) => None,
                        }
                    }
                };
                if let Some(m) = busy {
                    return Err(Refused::Busy(m));
                }
            }
            _ => return Err(Refused::NotMine(m)),
        }
        Ok(())
    }
}

/// Replication and peering messages from other OSDs, handed to their shard on the messenger worker.
struct ClusterDispatcher {
    shards: Vec<Arc<ShardHandle>>,
}

impl Dispatcher for ClusterDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        (proto::types::FIRST..=proto::types::LAST).contains(&m.msg_type)
    }

    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        if !(proto::types::FIRST..=proto::types::LAST).contains(&m.msg_type) {
            return Err(Refused::NotMine(m));
        }
        let from = match conn.peer_name() {
            Some(n) if n.ty == EntityType::Osd => match u32::try_from(n.num) {
                Ok(id) => OsdId(id),
                Err(_) => return Ok(()),
            },
            other => {
                tracing::warn!(peer = ?other, "replication message from a non-OSD; dropped");
                return Ok(());
            }
        };
        let peer = match PeerMsg::decode(&m) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%from, "undecodable peer message: {e}");
                return Ok(());
            }
        };
        let shard = &self.shards[peer.pgid().seed as usize % self.shards.len()];
        match shard.try_submit(ShardEvent::Peer { from, peer, msg: m }) {
            // A lossless session's message is never dropped: when the shard's queue is full the messenger keeps
            // it, stops reading this peer and offers it again shortly.
            Err(SubmitError::Full(ev)) => {
                let ShardEvent::Peer { msg, .. } = *ev else { unreachable!("we queued a peer message") };
                Err(Refused::Busy(msg))
            }
            Ok(()) | Err(SubmitError::Stopped) => Ok(()),
        }
    }

    fn handle_reset(&self, conn: &Connection) {
        self.reset(conn);
    }

    fn handle_remote_reset(&self, conn: &Connection) {
        self.reset(conn);
    }
}

impl ClusterDispatcher {
    /// A session with a peer OSD lost what was queued on it: every shard's PGs with that peer re-peer.
    /// Runs on the messenger's dispatch thread, which may wait for room in a shard queue.
    fn reset(&self, conn: &Connection) {
        let Some(n) = conn.peer_name().filter(|n| n.ty == EntityType::Osd) else { return };
        let Ok(id) = u32::try_from(n.num) else { return };
        tracing::info!(peer = %OsdId(id), "cluster session reset");
        for shard in &self.shards {
            let _ = shard.submit_timeout(ShardEvent::PeerReset(OsdId(id)), SHARD_SEND_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rados::map::{OsdInfo, Pool, WEIGHT_ONE};
    use rados::{Fsid, PoolId};

    fn map_with(n: u32, up: &[u32]) -> OsdMap {
        let mut map = OsdMap::new(Fsid([1; 16]));
        let mut inc = map.incremental();
        for i in 0..n {
            let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            let base = 10_000 + 10 * i as u16;
            let addrs = OsdAddrs {
                public: a(base),
                cluster: a(base + 1),
                hb_front: a(base + 2),
                hb_back: a(base + 3),
            };
            inc.new_osds.insert(
                OsdId(i),
                OsdInfo {
                    addrs: Some(addrs),
                    up: up.contains(&i),
                    in_: true,
                    weight: WEIGHT_ONE,
                    host: "h".into(),
                },
            );
        }
        inc.new_pools
            .insert(PoolId(1), Pool { id: PoolId(1), name: "p".into(), size: 2, min_size: 1, pg_num: 4 });
        map.apply(&inc).unwrap();
        map
    }

    #[test]
    fn heartbeat_peers_are_pg_peers_and_neighbours() {
        // Goal: peer selection covers PG peers and the next/previous up OSDs, and only up ones. Method: a map
        // of 8 OSDs with two down; check that neighbours wrap around and down OSDs are never chosen.
        let map = map_with(8, &[0, 1, 2, 4, 5, 7]);
        let peers: Vec<u32> = heartbeat_peers(&map, OsdId(7), 2).iter().map(|p| p.osd.0).collect();
        assert!(peers.contains(&0), "next up OSD after 7 wraps to 0: {peers:?}");
        assert!(peers.contains(&5), "previous up OSD: {peers:?}");
        assert!(!peers.contains(&3) && !peers.contains(&6) && !peers.contains(&7));
        let all: Vec<u32> = heartbeat_peers(&map, OsdId(2), 100).iter().map(|p| p.osd.0).collect();
        assert_eq!(all, vec![0, 1, 4, 5, 7], "min_peers above the cluster size takes every up OSD");
        let p = heartbeat_peers(&map, OsdId(2), 0);
        assert!(p.iter().all(|p| p.front.port() % 10 == 2 && p.back.port() % 10 == 3));
    }

    #[test]
    fn a_full_shard_queue_hands_ops_commands_and_peer_messages_back_as_busy() {
        // Goal: where a shard's queue is full, the dispatchers hand the message back as Busy (the messenger keeps
        // it, stops reading that connection and offers it again) instead of answering "osd is overloaded" or
        // dropping a peer's message, and a command waits likewise. Method: one shard with a queue of one event
        // whose runner this thread holds, so one event waits and every further one finds the queue full; an op,
        // both commands and a peer message are dispatched directly and must each come back as Busy with the
        // original message (type, tid and body unchanged), with nothing sent on the connection.
        use rados::msg::{PgListRequest, ReqId};
        use rados::PoolId;

        let pool = WorkerPool::new(1).unwrap();
        let cluster = Arc::new(Messenger::new(
            Arc::clone(&pool),
            EntityName::osd(0),
            1,
            messenger::MessengerConfig::default(),
        ));
        let sh = ShardShared {
            whoami: OsdId(0),
            index: 0,
            count: 1,
            store: Arc::new(MemStore::new()),
            limits: OpLimits::from_config(&Config::default()),
            cluster: Arc::clone(&cluster),
            stats: Arc::new(Mutex::new(BTreeMap::new())),
            io: Arc::new(crate::shard::IoCounters::default()),
            writes_in_flight: Arc::new(AtomicUsize::new(0)),
            report_now: crossbeam_channel::bounded(1).0,
            guard: Arc::new(StallGuard::new(Duration::from_secs(3))),
            full_ratio: 0.95,
        };
        let shards = vec![Arc::new(ShardHandle::new(Shard::new(sh), 1, 1))];
        let flags = Arc::new(Flags {
            stopping: AtomicBool::new(false),
            down_in_map: AtomicBool::new(false),
            stop_threads: AtomicBool::new(false),
        });
        let public = PublicDispatcher { shards: shards.clone(), flags };
        let peers = ClusterDispatcher { shards: shards.clone() };
        // A peer OSD's connection (never established: nothing may be sent on it anyway).
        let conn = cluster.connect(EntityName::osd(1), SocketAddr::from(([127, 0, 0, 1], 1))).unwrap();
        let pgid = PgId::new(PoolId(1), 0);
        let op = OsdOpRequest {
            reqid: ReqId { client: 9, nonce: 2, tid: 7 },
            pgid,
            oid: "o".into(),
            epoch: Epoch(1),
            ops: Vec::new(),
        };
        let list = PgListRequest { pgid, epoch: Epoch(1), after: None, max: 10 };
        let query = proto::PgQuery { pgid, epoch: Epoch(1), round: 1, after: None };
        shards[0].with(|_| {
            shards[0].try_submit(ShardEvent::PeerReset(OsdId(5))).expect("the one free slot");
            let cases: Vec<(&dyn Dispatcher, Message)> = vec![
                (&public, Message::encode(types::OSD_OP, &op).with_tid(7)),
                (&public, Message::encode(types::OSD_COMMAND, &OsdCommand::PgList(list.clone())).with_tid(8)),
                (&public, Message::encode(types::OSD_COMMAND, &OsdCommand::ListObjects { pgid }).with_tid(9)),
                (&peers, PeerMsg::Query(query.clone()).encode().with_tid(10)),
            ];
            for (d, m) in cases {
                let (ty, tid, front) = (m.msg_type, m.tid, m.front.clone());
                match d.dispatch(&conn, m) {
                    Err(Refused::Busy(back)) => {
                        assert_eq!(
                            (back.msg_type, back.tid, back.front),
                            (ty, tid, front),
                            "the original message"
                        )
                    }
                    other => panic!("message type {ty:#06x} on a full shard: {other:?}"),
                }
            }
        });
        assert_eq!(conn.outgoing_bytes(), 0, "nothing was answered");
        assert_eq!(cluster.counters().msgs_out, 0, "nothing was answered");
        for s in &shards {
            s.stop();
        }
        cluster.shutdown();
    }

    #[test]
    fn uuid_and_whoami_files() {
        // Goal: the data directory keeps the OSD's identity and refuses damage. Method: create, reload,
        // corrupt.
        let dir = std::env::temp_dir().join(format!("cuttle-osd-ident-{}-{}", std::process::id(), entropy()));
        std::fs::create_dir_all(&dir).unwrap();
        let u = load_uuid(&dir).unwrap();
        assert_eq!(load_uuid(&dir).unwrap(), u, "the uuid is stable");
        assert_eq!(load_whoami(&dir).unwrap(), None);
        write_file(&dir.join("whoami"), "3\n").unwrap();
        assert_eq!(load_whoami(&dir).unwrap(), Some(OsdId(3)));
        std::fs::write(dir.join("whoami"), "x").unwrap();
        assert!(matches!(load_whoami(&dir), Err(OsdStartError::DataDir { .. })));
        std::fs::write(dir.join("uuid"), "not a uuid").unwrap();
        assert!(matches!(load_uuid(&dir), Err(OsdStartError::DataDir { .. })));
        std::fs::remove_file(dir.join("uuid")).unwrap();
        assert!(matches!(load_uuid(&dir), Err(OsdStartError::DataDir { .. })), "whoami without uuid");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
