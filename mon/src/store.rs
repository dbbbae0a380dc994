//! The monitor's store: one redb file, `DATA/mon.redb`.
//!
//! Tables (all values little-endian or in the versioned encodings of `rados::map`):
//! - `meta` (`&str` -> bytes): `format` = [`FORMAT_VERSION`] as u32 LE; `fsid` = 16 raw bytes; `osdmap` =
//!   the full map of the latest epoch (`OsdMap::encode`); `pool_id_max` = u32 LE, the highest pool id ever
//!   used (removed pools' ids are never reused).
//! - `incrementals` (u32 epoch -> `Incremental::encode`): the last [`INCREMENTALS_KEPT`] epochs.
//! - `uuids` (u128, the uuid's bytes big-endian -> u32 OSD id): the `osd new` registry.
//! - `log` (u64 seq -> postcard `LogEntry`): the last [`LOG_ENTRIES_MAX`] cluster log entries.
//!
//! Recovery argument: every [`Store::persist`] is one redb write transaction committed with redb's default
//! durability (fsync before `commit` returns), so after a crash the file holds either all of one call's
//! effects (the full map, its incrementals, registrations and log entries agree) or none of them. The service
//! publishes an epoch only after `persist` returned, so no OSD or client ever saw an epoch the store lacks.
//! A store whose first commit never happened (crash during creation) is treated as new.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use rados::map::{Incremental, OsdMap};
use rados::msg::LogEntry;
use rados::{Epoch, Fsid, OsdId};

use crate::state::{Effect, Persisted, INCREMENTALS_KEPT, LOG_ENTRIES_MAX};

/// The store file inside the monitor's data directory.
pub const STORE_FILE: &str = "mon.redb";
/// Bump when the layout above changes; an older or newer store is refused, never guessed at.
pub const FORMAT_VERSION: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const INCREMENTALS: TableDefinition<u32, &[u8]> = TableDefinition::new("incrementals");
const UUIDS: TableDefinition<u128, u32> = TableDefinition::new("uuids");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

const KEY_FORMAT: &str = "format";
const KEY_FSID: &str = "fsid";
const KEY_OSDMAP: &str = "osdmap";
const KEY_POOL_ID_MAX: &str = "pool_id_max";

/// The store is small (maps of a few KiB to MiB); its page cache need not be redb's 1 GiB default.
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the monitor data directory {path}: {error}")]
    Dir { path: PathBuf, error: std::io::Error },
    #[error("{path} is in use by another monitor process")]
    InUse { path: PathBuf },
    #[error("{path} is not a monitor store or is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("{path} is not a cuttle monitor store (it has tables but no format record)")]
    NotAStore { path: PathBuf },
    #[error("{path} is a monitor store of format version {found}; this build reads version {expected}")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("{path} belongs to cluster {store}, but the config names cluster {config}")]
    FsidMismatch { path: PathBuf, store: Fsid, config: Fsid },
    #[error("{path}: corrupt {what}: {why}")]
    Corrupt { path: PathBuf, what: &'static str, why: String },
    #[error("{path}: {error}")]
    Db { path: PathBuf, error: Box<redb::Error> },
}

/// The open store. Dropping it closes the file (and releases redb's lock on it).
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` for cluster `fsid`. Returns what it holds, or `None` for a new
    /// store (the caller then creates the cluster's first epoch and persists it).
    pub fn open(dir: &Path, fsid: Fsid) -> Result<(Store, Option<Persisted>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|error| StoreError::Dir { path: dir.into(), error })?;
        let path = dir.join(STORE_FILE);
        let damaged = |why: String| StoreError::Damaged { path: path.clone(), why };
        // redb documents that a plain open trusts the file and may panic on one corrupted outside redb; the
        // integrity check turns that into an error. The catch_unwind is a second net for a redb debug
        // assertion on a garbage file: a bad file must be a message, not a crash.
        let opened = std::panic::catch_unwind(|| {
            Database::builder().set_check_integrity_on_open(true).set_cache_size(CACHE_BYTES).create(&path)
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => return Err(StoreError::InUse { path }),
            Ok(Err(e)) => return Err(damaged(e.to_string())),
            Err(_) => return Err(damaged("the storage engine failed on it".into())),
        };
        let store = Store { db, path };
        let persisted = store.load(fsid)?;
        Ok((store, persisted))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the effects of one state-machine call durable, in one transaction: registrations, incrementals
    /// (trimmed to the last [`INCREMENTALS_KEPT`]), the full `map` (the state's map after them) when any
    /// epoch was committed, and log entries (trimmed to the last [`LOG_ENTRIES_MAX`]).
    pub fn persist(&mut self, effects: &[Effect], map: &OsdMap) -> Result<(), StoreError> {
        if effects.is_empty() {
            return Ok(());
        }
        let last_epoch = effects.iter().rev().find_map(|e| match e {
            Effect::Commit(inc) => Some(inc.epoch),
            _ => None,
        });
        if let Some(e) = last_epoch {
            assert_eq!(e, map.epoch, "persist: the map is not the one the last commit produced");
        }
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            let mut incs = txn.open_table(INCREMENTALS).map_err(|e| self.db_err(e))?;
            let mut uuids = txn.open_table(UUIDS).map_err(|e| self.db_err(e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.db_err(e))?;
            let mut pool_id_max = match meta.get(KEY_POOL_ID_MAX).map_err(|e| self.db_err(e))? {
                Some(v) => le_u32(v.value()).unwrap_or(0),
                None => 0,
            };
            let mut last_seq = None;
            for effect in effects {
                match effect {
                    Effect::Register { uuid, osd } => {
                        uuids.insert(u128::from_be_bytes(*uuid), osd.0).map_err(|e| self.db_err(e))?;
                    }
                    Effect::Commit(inc) => {
                        let bytes = inc.encode().map_err(|e| self.corrupt("incremental", e))?;
                        incs.insert(inc.epoch.0, bytes.as_slice()).map_err(|e| self.db_err(e))?;
                        if let Some(max) = inc.new_pools.keys().map(|p| p.0).max() {
                            pool_id_max = pool_id_max.max(max);
                        }
                    }
                    Effect::Log(entry) => {
                        let bytes = postcard::to_stdvec(entry).map_err(|e| self.corrupt("log entry", e))?;
                        log.insert(entry.seq, bytes.as_slice()).map_err(|e| self.db_err(e))?;
                        last_seq = Some(entry.seq);
                    }
                }
            }
            if let Some(epoch) = last_epoch {
                let bytes = map.encode().map_err(|e| self.corrupt("map", e))?;
                meta.insert(KEY_OSDMAP, bytes.as_slice()).map_err(|e| self.db_err(e))?;
                meta.insert(KEY_POOL_ID_MAX, pool_id_max.to_le_bytes().as_slice())
                    .map_err(|e| self.db_err(e))?;
                let keep_from = epoch.0.saturating_sub(INCREMENTALS_KEPT as u32 - 1);
                incs.retain_in(..keep_from, |_, _| false).map_err(|e| self.db_err(e))?;
            }
            if let Some(seq) = last_seq {
                let keep_from = seq.saturating_sub(LOG_ENTRIES_MAX as u64 - 1);
                log.retain_in(..keep_from, |_, _| false).map_err(|e| self.db_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Reads the whole store; `None` if it holds no committed epoch yet (then records format and fsid).
    fn load(&self, fsid: Fsid) -> Result<Option<Persisted>, StoreError> {
        let path = &self.path;
        let read = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let tables: Vec<String> =
            read.list_tables().map_err(|e| self.db_err(e))?.map(|t| t.name().to_string()).collect();
        if tables.is_empty() {
            drop(read);
            self.initialise(fsid)?;
            return Ok(None);
        }
        if !tables.iter().any(|t| t == META.name()) {
            return Err(StoreError::NotAStore { path: path.clone() });
        }
        let meta = read.open_table(META).map_err(|e| self.db_err(e))?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(key).map_err(|e| self.db_err(e))?.map(|v| v.value().to_vec()))
        };
        let mut records = Records {
            format: get(KEY_FORMAT)?,
            fsid: get(KEY_FSID)?,
            osdmap: get(KEY_OSDMAP)?,
            pool_id_max: get(KEY_POOL_ID_MAX)?,
            ..Records::default()
        };
        // The meta records first: a store of another format may lay its other tables out differently.
        records.check_meta(fsid).map_err(|e| self.record_err(e, fsid))?;
        if records.osdmap.is_none() {
            // Created, but the first epoch was never committed: start over.
            return Ok(None);
        }
        if tables.iter().any(|t| t == INCREMENTALS.name()) {
            let t = read.open_table(INCREMENTALS).map_err(|e| self.db_err(e))?;
            for row in t.iter().map_err(|e| self.db_err(e))? {
                let (k, v) = row.map_err(|e| self.db_err(e))?;
                records.incrementals.push((k.value(), v.value().to_vec()));
            }
        }
        if tables.iter().any(|t| t == UUIDS.name()) {
            let t = read.open_table(UUIDS).map_err(|e| self.db_err(e))?;
            for row in t.iter().map_err(|e| self.db_err(e))? {
                let (k, v) = row.map_err(|e| self.db_err(e))?;
                records.uuids.push((k.value(), v.value()));
            }
        }
        if tables.iter().any(|t| t == LOG.name()) {
            let t = read.open_table(LOG).map_err(|e| self.db_err(e))?;
            for row in t.iter().map_err(|e| self.db_err(e))? {
                let (k, v) = row.map_err(|e| self.db_err(e))?;
                records.log.push((k.value(), v.value().to_vec()));
            }
        }
        records.decode(fsid).map_err(|e| self.record_err(e, fsid))
    }

    fn initialise(&self, fsid: Fsid) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_err(e))?;
            meta.insert(KEY_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice()).map_err(|e| self.db_err(e))?;
            meta.insert(KEY_FSID, fsid.0.as_slice()).map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db { path: self.path.clone(), error: Box::new(e.into()) }
    }

    fn corrupt(&self, what: &'static str, why: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), what, why: why.to_string() }
    }

    /// `e` with the path, for the store opened for cluster `fsid`.
    fn record_err(&self, e: RecordError, fsid: Fsid) -> StoreError {
        let path = self.path.clone();
        match e {
            RecordError::NotAStore => StoreError::NotAStore { path },
            RecordError::Version { found } => StoreError::Version { path, found, expected: FORMAT_VERSION },
            RecordError::FsidMismatch { store } => StoreError::FsidMismatch { path, store, config: fsid },
            RecordError::Corrupt { what, why } => StoreError::Corrupt { path, what, why },
        }
    }
}

/// The store's records as its tables hold them, before decoding: what [`Store::open`] reads from the file
/// and decodes with [`Records::decode`]. Public (hidden) for the `mon_store` fuzz target, which decodes
/// arbitrary records without a file.
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct Records {
    pub format: Option<Vec<u8>>,
    pub fsid: Option<Vec<u8>>,
    pub osdmap: Option<Vec<u8>>,
    pub pool_id_max: Option<Vec<u8>>,
    /// `(epoch key, value)` in key order, as the table iterates.
    pub incrementals: Vec<(u32, Vec<u8>)>,
    pub uuids: Vec<(u128, u32)>,
    pub log: Vec<(u64, Vec<u8>)>,
}

/// Why [`Records`] do not decode; [`Store::open`] adds the path.
#[doc(hidden)]
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("no format record")]
    NotAStore,
    #[error("format version {found}")]
    Version { found: u32 },
    #[error("store of cluster {store}")]
    FsidMismatch { store: Fsid },
    #[error("corrupt {what}: {why}")]
    Corrupt { what: &'static str, why: String },
}

fn corrupt(what: &'static str, why: impl std::fmt::Display) -> RecordError {
    RecordError::Corrupt { what, why: why.to_string() }
}

impl Records {
    /// Checks the format record and that the store belongs to cluster `fsid`.
    pub fn check_meta(&self, fsid: Fsid) -> Result<(), RecordError> {
        let Some(format) = &self.format else { return Err(RecordError::NotAStore) };
        let format = le_u32(format).ok_or_else(|| corrupt("format record", "not 4 bytes"))?;
        if format != FORMAT_VERSION {
            return Err(RecordError::Version { found: format });
        }
        let stored_fsid = self.fsid.as_ref().ok_or_else(|| corrupt("fsid", "missing"))?;
        let stored_fsid: [u8; 16] =
            stored_fsid.as_slice().try_into().map_err(|_| corrupt("fsid", "not 16 bytes"))?;
        if Fsid(stored_fsid) != fsid {
            return Err(RecordError::FsidMismatch { store: Fsid(stored_fsid) });
        }
        Ok(())
    }

    /// What the records hold for cluster `fsid`; `None` when no epoch was ever committed.
    pub fn decode(self, fsid: Fsid) -> Result<Option<Persisted>, RecordError> {
        self.check_meta(fsid)?;
        let Some(map) = self.osdmap else { return Ok(None) };
        let map = OsdMap::decode(&map).map_err(|e| corrupt("map", e))?;
        if map.fsid != fsid {
            return Err(corrupt("map", format!("map of cluster {} in the store of {fsid}", map.fsid)));
        }
        let pool_id_max = match self.pool_id_max {
            Some(v) => le_u32(&v).ok_or_else(|| corrupt("pool_id_max", "not 4 bytes"))?,
            None => 0,
        };
        let mut incrementals = Vec::new();
        for (k, v) in self.incrementals {
            let inc = Incremental::decode(&v).map_err(|e| corrupt("incremental", e))?;
            if inc.epoch != Epoch(k) {
                return Err(corrupt("incremental", format!("{} stored under e{k}", inc.epoch)));
            }
            incrementals.push(inc);
        }
        let uuids = self.uuids.into_iter().map(|(k, v)| (k.to_be_bytes(), OsdId(v))).collect();
        let mut log: Vec<LogEntry> = Vec::new();
        for (k, v) in self.log {
            let entry: LogEntry = postcard::from_bytes(&v).map_err(|e| corrupt("log entry", e))?;
            if entry.seq != k {
                return Err(corrupt("log entry", format!("seq {} stored under {k}", entry.seq)));
            }
            log.push(entry);
        }
        Ok(Some(Persisted { map, incrementals, uuids, pool_id_max, log }))
    }
}

fn le_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rados::config::Config;
    use rados::msg::{MonCommand, MonRequest};

    use crate::state::{MonOptions, MonState};

    const FSID: &str = "01234567-89ab-cdef-0123-456789abcdef";

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cuttle-mon-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn opts() -> MonOptions {
        MonOptions::from_config(&Config { fsid: FSID.into(), ..Config::default() }).unwrap()
    }

    fn fsid() -> Fsid {
        FSID.parse().unwrap()
    }

    /// Runs a request and persists its effects, as the service does.
    fn run(store: &mut Store, s: &mut MonState, now: u64, req: MonRequest) {
        let (_, effects) = s.handle(now, None, req);
        store.persist(&effects, s.map()).unwrap();
    }

    #[test]
    fn committed_state_survives_reopen() {
        // Goal: what was persisted comes back: map, incrementals, uuid registry, pool id high-water mark,
        // log. Method: create a cluster, register OSDs, create and remove pools, reopen, restore, compare.
        let dir = scratch("reopen");
        let (mut store, p) = Store::open(&dir, fsid()).unwrap();
        assert!(p.is_none(), "a new store");
        let (mut s, effects) = MonState::create(opts(), 1000);
        store.persist(&effects, s.map()).unwrap();
        for i in 0..3u8 {
            run(&mut store, &mut s, 2000, MonRequest::OsdNew { uuid: [i + 1; 16], host: format!("h{i}") });
        }
        let create = |name: &str| MonCommand::PoolCreate {
            name: name.into(),
            size: None,
            min_size: None,
            pg_num: Some(8),
        };
        run(&mut store, &mut s, 3000, MonRequest::Command(create("a")));
        run(&mut store, &mut s, 3000, MonRequest::Command(create("b")));
        run(
            &mut store,
            &mut s,
            3000,
            MonRequest::Command(MonCommand::PoolRm { name: "b".into(), confirm: true }),
        );
        drop(store);

        let (_store, p) = Store::open(&dir, fsid()).unwrap();
        let p = p.expect("a store with epochs");
        assert_eq!(&p.map, s.map());
        assert_eq!(p.incrementals.len(), s.map().epoch.0 as usize);
        assert_eq!(p.incrementals.last().map(|i| i.epoch), Some(s.map().epoch));
        assert_eq!(p.uuids.len(), 3);
        assert_eq!(p.uuids[&[2; 16]], OsdId(1));
        assert_eq!(p.pool_id_max, 2, "the removed pool's id stays used");
        let logged: Vec<u64> = s.log_entries().map(|e| e.seq).collect();
        assert_eq!(p.log.iter().map(|e| e.seq).collect::<Vec<_>>(), logged);
        let r = MonState::restore(opts(), p, 5000).unwrap();
        assert_eq!(r.map(), s.map());
        assert_eq!(r.osd_by_uuid(&[3; 16]), Some(OsdId(2)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn history_and_log_are_trimmed_on_disk() {
        // Goal: the store keeps at most INCREMENTALS_KEPT incrementals and LOG_ENTRIES_MAX log entries.
        // Method: more epochs than that (osd in/out flips), reopen, count.
        let dir = scratch("trim");
        let (mut store, _) = Store::open(&dir, fsid()).unwrap();
        let (mut s, effects) = MonState::create(opts(), 1000);
        store.persist(&effects, s.map()).unwrap();
        run(&mut store, &mut s, 1000, MonRequest::OsdNew { uuid: [1; 16], host: "h".into() });
        for _ in 0..(LOG_ENTRIES_MAX / 2 + 10) {
            run(&mut store, &mut s, 1000, MonRequest::Command(MonCommand::OsdIn(OsdId(0))));
            run(&mut store, &mut s, 1000, MonRequest::Command(MonCommand::OsdOut(OsdId(0))));
        }
        drop(store);
        let (_store, p) = Store::open(&dir, fsid()).unwrap();
        let p = p.unwrap();
        assert_eq!(p.incrementals.len(), INCREMENTALS_KEPT);
        assert_eq!(p.log.len(), LOG_ENTRIES_MAX);
        assert_eq!(p.log.last().map(|e| e.seq), s.log_entries().last().map(|e| e.seq));
        assert!(MonState::restore(opts(), p, 2000).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_store_files_are_typed_errors() {
        // Goal: garbage, another cluster's store, a store of another format version, a foreign redb file and
        // a store already open are clear errors, never panics. Method: make each and open it.
        let dir = scratch("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(STORE_FILE);

        for garbage in [vec![0x42u8; 10_000], b"not a database at all".to_vec(), vec![0u8; 4096]] {
            std::fs::write(&path, &garbage).unwrap();
            let e = Store::open(&dir, fsid()).unwrap_err();
            assert!(matches!(e, StoreError::Damaged { .. }), "{e}");
            assert!(e.to_string().contains("not a monitor store or is damaged"), "{e}");
        }

        std::fs::remove_file(&path).unwrap();
        let (store, _) = Store::open(&dir, fsid()).unwrap();
        assert!(matches!(Store::open(&dir, fsid()), Err(StoreError::InUse { .. })));
        drop(store);
        let other: Fsid = "11111111-2222-3333-4444-555555555555".parse().unwrap();
        assert!(matches!(Store::open(&dir, other), Err(StoreError::FsidMismatch { .. })));

        // Another format version.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(KEY_FORMAT, 99u32.to_le_bytes().as_slice()).unwrap();
            txn.commit().unwrap();
        }
        let e = Store::open(&dir, fsid()).unwrap_err();
        assert!(matches!(e, StoreError::Version { found: 99, expected: FORMAT_VERSION, .. }), "{e}");

        // A redb file that is not ours.
        std::fs::remove_file(&path).unwrap();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let t: TableDefinition<u64, u64> = TableDefinition::new("something_else");
            txn.open_table(t).unwrap().insert(1, 2).unwrap();
            txn.commit().unwrap();
        }
        assert!(matches!(Store::open(&dir, fsid()), Err(StoreError::NotAStore { .. })));

        // A damaged map record.
        std::fs::remove_file(&path).unwrap();
        {
            let (mut store, _) = Store::open(&dir, fsid()).unwrap();
            let (s, effects) = MonState::create(opts(), 1000);
            store.persist(&effects, s.map()).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(KEY_OSDMAP, [1u8, 2, 3].as_slice()).unwrap();
            txn.commit().unwrap();
        }
        let e = Store::open(&dir, fsid()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { what: "map", .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_created_but_never_committed_starts_over() {
        // Goal: a crash between creating the store and its first commit does not brick the monitor. Method:
        // open (which records format and fsid) without persisting anything, reopen.
        let dir = scratch("fresh");
        drop(Store::open(&dir, fsid()).unwrap());
        let (_store, p) = Store::open(&dir, fsid()).unwrap();
        assert!(p.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn damaged_bytes_never_panic() {
        // Goal: a store file damaged anywhere opens with an error or (damage in unused space) with valid
        // contents, and never brings the monitor down with a panic. Method: build a store, then overwrite
        // 64 bytes at offsets across the file, one copy at a time.
        let dir = std::env::temp_dir().join(format!("cuttle-mon-store-damage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Config { fsid: "01234567-89ab-cdef-0123-456789abcdef".into(), ..Config::default() };
        let opts = MonOptions::from_config(&cfg).unwrap();
        let fsid = opts.fsid;
        {
            let (mut store, _) = Store::open(&dir, fsid).unwrap();
            let (mut s, effects) = MonState::create(opts.clone(), 1000);
            store.persist(&effects, s.map()).unwrap();
            for i in 0..4u8 {
                let (_, e) = s.handle(1000, None, MonRequest::OsdNew { uuid: [i + 1; 16], host: "h".into() });
                store.persist(&e, s.map()).unwrap();
            }
            let cmd = MonCommand::PoolCreate { name: "rbd".into(), size: None, min_size: None, pg_num: None };
            let (_, e) = s.handle(1000, None, MonRequest::Command(cmd));
            store.persist(&e, s.map()).unwrap();
        }
        let good = std::fs::read(dir.join(STORE_FILE)).unwrap();
        let copy = dir.join("copy");
        let (mut errors, mut oks) = (0, 0);
        for offset in (0..good.len().saturating_sub(64)).step_by(good.len() / 97 + 1) {
            let mut bad = good.clone();
            for b in &mut bad[offset..offset + 64] {
                *b ^= 0x5a;
            }
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy).unwrap();
            std::fs::write(copy.join(STORE_FILE), &bad).unwrap();
            match Store::open(&copy, fsid) {
                Ok((_, p)) => {
                    oks += 1;
                    if let Some(p) = p {
                        let _ = MonState::restore(opts.clone(), p, 2000);
                    }
                }
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 0, "some damage must be detected ({oks} opened)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
