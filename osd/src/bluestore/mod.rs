//! BlueStore: a durable [`ObjectStore`] in the shape of Ceph's. Object data lives in one preallocated block
//! file (`block`) managed by an extent allocator; metadata (onodes, data maps with per-4 KiB crc32c, xattrs,
//! omap, the allocator's free list, PG usage) lives in redb (`db`); a write-ahead log (`wal`, `wal.rs`) is
//! where each batch becomes durable. Byte layouts and the crash-recovery argument: `docs/bluestore.md`.
//!
//! Write path. [`BlueStore::queue`] validates a transaction and applies it to an in-memory layer that reads
//! see at once (`layer.rs`), then returns its [`CommitSeq`] without touching the disk. One commit thread
//! takes every queued transaction as one batch and:
//! 1. works out the batch against the metadata: writes of at least `bluestore_prefer_deferred_size` that
//!    cover whole units go to freshly allocated units; smaller ones (to new or existing units) become
//!    deferred writes, whose bytes travel in the WAL record and go in place later,
//! 2. writes the fresh units, then one fdatasync of the block file (only if there were any),
//! 3. appends ONE WAL record (the batch's metadata rows, its deferred writes, the units it freed), then ONE
//!    fdatasync of the WAL: the batch is durable; its rows join the memtable (`memtable.rs`), which reads see
//!    over redb,
//! 4. now and then writes the deferred writes in place (no flush needed: the WAL still holds them) and, every
//!    `bluestore_wal_max_bytes` of log, checkpoints: block flush, the memtable into redb in one durable
//!    commit, log back to offset 0 (a memtable past `bluestore_memtable_max_bytes` goes into redb earlier, in
//!    a non-durable commit),
//! 5. releases the units the batch stopped referencing, advances [`BlueStore::committed`] and calls the
//!    commit notifier.
//!
//! A failed write, flush or commit puts the store in the failed state ([`BlueStore::failed`]): it cannot know
//! what reached the disk, so it acknowledges nothing more and refuses new transactions.
//!
//! What it deliberately is not (yet): compressing, caching object data (reads go to the block file; the
//! metadata cache is redb's page cache, bounded by `bluestore_cache_size`), or fast to mount after a crash
//! (redb repairs its own file then, which reads the whole metadata file, and the WAL is replayed; a clean
//! mount reads no object).

pub mod alloc;
pub mod device;
pub mod fsck;
pub mod layer;
mod memtable;
pub mod records;
pub mod simdisk;
pub mod wal;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use messenger::crc::crc32c;
use rados::ids::PgId;
use rados::placement::object_hash;

use crate::store::{
    Eversion, ListEntry, ObjectId, ObjectStat, ObjectStore, PgUsage, StoreError, Transaction, TxOp,
    TX_OPS_MAX,
};

use alloc::Allocator;
use device::{BlockDevice, DirEnv, Env, RedbBackend};
use layer::{ObjLayer, Piece};
use memtable::{for_rows, get_row, Memtable};
use records::{
    blob_key, decode_freelist, decode_pg_key, decode_u64, decode_usage, encode_freelist, encode_u64,
    encode_usage, omap_key, onode_key, pg_key, Blob, DeferredWrite, Label, Onode, TableId, WalOp, BLOB_BYTES,
    CSUM_BLOCK_BYTES, CSUM_TYPE_CRC32C,
};
use wal::WAL_FILE;

/// The position of a queued transaction: 1 for the first queued after open, then one more per transaction.
pub type CommitSeq = u64;

/// The block file's name in the store's directory.
pub const BLOCK_FILE: &str = "block";
/// redb's file.
pub const DB_FILE: &str = "db";
/// The label: written last by mkfs, so a directory with a label holds a complete store.
pub const LABEL_FILE: &str = "label";

pub(crate) const ONODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("onodes");
pub(crate) const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
pub(crate) const OMAP: TableDefinition<&[u8], &[u8]> = TableDefinition::new("omap");
pub(crate) const FREELIST: TableDefinition<u64, &[u8]> = TableDefinition::new("freelist");
pub(crate) const PG_USAGE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pg_usage");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_LABEL: &str = "label";
/// The highest node id ever given to an object.
const META_NID_MAX: &str = "nid_max";
/// The number of the last committed batch (deferred records are keyed by it).
const META_BATCH: &str = "batch";
/// Bytes of omap keys and values held.
const META_OMAP_BYTES: &str = "omap_bytes";

/// Bytes of deferred writes that may wait to be written in place (they are also held in memory, for reads).
/// Bytes of deferred writes waiting in memory beyond which they go in place whatever their batch count.
const DEFERRED_BYTES_MAX: u64 = 16 << 20;
/// What one queued op counts against `bluestore_throttle_bytes` besides its payload and omap pairs (its
/// share of the in-memory layer).
const OP_QUEUED_BYTES: u64 = 256;

/// BlueStore's options, by their Ceph names (the config table wiring is done elsewhere).
#[derive(Clone, Debug)]
pub struct BlueStoreOptions {
    /// Size of the block file, fixed at mkfs (sparse: space is used as data arrives).
    pub bluestore_block_size: u64,
    /// Allocation unit: a power of two from 4 KiB to 64 KiB, fixed at mkfs.
    pub bluestore_min_alloc_size: u64,
    /// A write that replaces a whole allocation unit of an existing object goes to new space when it is at
    /// least this long; shorter ones, and every partial-unit write, are deferred (redo record, then in place).
    pub bluestore_prefer_deferred_size: u64,
    /// Only "crc32c" (one per 4 KiB block).
    pub bluestore_csum_type: String,
    /// Memory for metadata caching (redb's page cache).
    pub bluestore_cache_size: u64,
    /// Bytes of transactions queued or being committed (payload, omap pairs, and a fixed cost per op);
    /// beyond it [`BlueStore::queue`] returns [`StoreError::Busy`] (Ceph's `bluestore_throttle_bytes`). A
    /// transaction larger than the bound alone is taken when nothing else is queued.
    pub bluestore_throttle_bytes: u64,
    /// Committed batches whose deferred writes may wait before they are written in place together.
    pub bluestore_max_deferred_txc: u64,
    /// WAL bytes after which the commit thread checkpoints (deferred writes in place, block flush, durable
    /// redb commit) and starts the log again: bounds the log, redb's unflushed pages and replay time.
    pub bluestore_wal_max_bytes: u64,
    /// Bytes of metadata rows the memtable (`memtable.rs`) may hold before redb takes them in a non-durable
    /// commit (not a Ceph option: RocksDB's memtable is sized by `bluestore_rocksdb_options`).
    pub bluestore_memtable_max_bytes: u64,
}

impl Default for BlueStoreOptions {
    fn default() -> Self {
        BlueStoreOptions {
            bluestore_block_size: 10 << 30,
            bluestore_min_alloc_size: 4096,
            bluestore_prefer_deferred_size: 64 << 10,
            bluestore_csum_type: "crc32c".to_string(),
            bluestore_cache_size: 256 << 20,
            bluestore_throttle_bytes: 64 << 20,
            bluestore_max_deferred_txc: 32,
            bluestore_wal_max_bytes: 128 << 20,
            bluestore_memtable_max_bytes: 32 << 20,
        }
    }
}

/// Why a store could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum BlueStoreError {
    #[error("{where_}: not a BlueStore ({why})")]
    NotAStore { where_: String, why: String },
    #[error("{where_}: a store already exists")]
    Exists { where_: String },
    #[error("invalid option: {0}")]
    Options(String),
    #[error("{where_}: {what}: {source}")]
    Io { where_: String, what: &'static str, source: std::io::Error },
    #[error("{where_}: metadata database: {why}")]
    Db { where_: String, why: String },
    #[error("{where_}: damaged: {why}")]
    Damaged { where_: String, why: String },
}

/// Space, for `cuttle osd df`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStatfs {
    /// Bytes of the block device.
    pub total: u64,
    /// Bytes of allocated units.
    pub allocated: u64,
    /// Logical bytes of object data (sum of object sizes).
    pub stored: u64,
    /// Bytes of omap keys and values (committed).
    pub omap: u64,
    /// Bytes of the metadata file.
    pub meta: u64,
    /// Bytes new data may still use (free units less what queued transactions reserved).
    pub available: u64,
}

/// What queued transactions changed, over the layers below.
#[derive(Debug, Default)]
struct Layer {
    objects: BTreeMap<Vec<u8>, Arc<ObjLayer>>,
    /// PGs removed whole (before any entry of theirs in `objects` was made).
    cleared: BTreeSet<PgId>,
    pgs: BTreeSet<PgId>,
    last_seq: CommitSeq,
    payload_bytes: u64,
    reserved_aus: u64,
}

impl Layer {
    fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.cleared.is_empty()
    }
}

/// Reads and queue() meet here.
#[derive(Debug, Default)]
struct Overlay {
    live: Layer,
    /// The batch the commit thread is making durable.
    inflight: Option<Arc<Layer>>,
    queued_seq: CommitSeq,
    /// Usage of every PG as reads see it.
    usage: BTreeMap<PgId, PgUsage>,
    /// Payload bytes in `live` and `inflight`.
    pending_bytes: u64,
    /// Units reserved by queued transactions for their new data.
    reserved_aus: u64,
    /// Free units (the allocator's count as of the last publish).
    free_aus: u64,
    failed: Option<StoreError>,
    paused: bool,
    stopping: bool,
}

type Notifier = Arc<dyn Fn(CommitSeq) + Send + Sync>;

struct Commits {
    committed: CommitSeq,
    failed: Option<StoreError>,
}

/// The commit thread's own state.
struct Committer {
    alloc: Allocator,
    /// Batches since deferred writes last went in place that made some, and their bytes (the writes
    /// themselves wait in [`Inner::deferred_cache`]).
    deferred_batches: u64,
    deferred_bytes: u64,
    wal: Arc<dyn BlockDevice>,
    /// Where the next WAL record goes: 0 right after a checkpoint.
    wal_at: u64,
    batch: u64,
    nid_max: u64,
    omap_bytes: u64,
}

struct Inner {
    label: Label,
    env: Arc<dyn Env>,
    /// `None` once [`BlueStore::close`] closed it.
    db: RwLock<Option<Database>>,
    /// Set when the store fails: redb then writes nothing more (see [`RedbBackend`]).
    db_fence: Arc<std::sync::atomic::AtomicBool>,
    block: Arc<dyn BlockDevice>,
    db_dev: Arc<dyn BlockDevice>,
    opts: BlueStoreOptions,
    au: u64,
    au_shift: u8,
    /// Held shared by every read for its whole duration (and by `queue` while it looks objects up),
    /// exclusively by the commit thread while it takes a batch and while it publishes one: so no unit a
    /// reader may be reading is reused under it, and what a reader sees of the committed metadata (the
    /// memtable over redb) does not change under it. The memtable lives inside: reads reach it only this way.
    gate: RwLock<Memtable>,
    overlay: Mutex<Overlay>,
    work: Condvar,
    /// Contents of units whose deferred write may not be on the block device yet: reads take them from here.
    /// Written only by the commit thread; an entry leaves at the publish after its write went in place.
    deferred_cache: RwLock<HashMap<u64, Bytes>>,
    commits: Mutex<Commits>,
    committed_cv: Condvar,
    notifier: RwLock<Option<Notifier>>,
    committer: Mutex<Committer>,
    omap_bytes: AtomicU64,
}

/// A durable object store. See the module documentation.
pub struct BlueStore {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BlueStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlueStore").field("where", &self.inner.env.describe()).finish()
    }
}

enum ReplayError {
    Io(&'static str, std::io::Error),
    Damaged(String),
}

/// Mount: brings redb up to the last batch the WAL holds. The records after redb's last durable batch are
/// applied in order in one write transaction (rows are absolute, so applying one twice changes nothing);
/// their deferred writes go in place, except those to a unit a later record freed (it may hold newer data
/// now), then the block file is flushed and the transaction committed durably. Returns the records applied.
fn replay_wal(
    db: &Database,
    wal: &Arc<dyn BlockDevice>,
    block: &Arc<dyn BlockDevice>,
    au: u64,
    block_bytes: u64,
) -> Result<usize, ReplayError> {
    let db_err = |e: &dyn std::fmt::Display| ReplayError::Damaged(format!("metadata database: {e}"));
    let batch = {
        let rtx = db.begin_read().map_err(|e| db_err(&e))?;
        let meta = rtx.open_table(META).map_err(|e| db_err(&e))?;
        let v = meta.get(META_BATCH).map_err(|e| db_err(&e))?;
        let v = v.ok_or_else(|| ReplayError::Damaged("no batch in meta".into()))?;
        decode_u64(v.value()).map_err(|e| ReplayError::Damaged(e.to_string()))?
    };
    let records = wal::read_log(wal, batch + 1).map_err(|e| ReplayError::Io("wal read", e))?;
    if records.is_empty() {
        return Ok(0);
    }
    let tx = db.begin_write().map_err(|e| db_err(&e))?;
    let mut writes: BTreeMap<u64, Bytes> = BTreeMap::new();
    for rec in &records {
        for op in &rec.ops {
            match op {
                WalOp::Write(w) => {
                    if w.offset % au != 0 || w.data.len() as u64 != au || w.offset + au > block_bytes {
                        return Err(ReplayError::Damaged(format!(
                            "WAL record {}: a deferred write at {} of {} bytes",
                            rec.seq,
                            w.offset,
                            w.data.len()
                        )));
                    }
                    writes.insert(w.offset / au, w.data.clone());
                }
                WalOp::Free(unit) => {
                    writes.remove(unit);
                }
                WalOp::Put { .. } | WalOp::Del { .. } => {}
            }
        }
        let rows = rec.ops.iter().filter_map(|op| match op {
            WalOp::Put { table, key, value } => Some((*table, key.as_slice(), Some(value.as_slice()))),
            WalOp::Del { table, key } => Some((*table, key.as_slice(), None)),
            WalOp::Write(_) | WalOp::Free(_) => None,
        });
        memtable::write_rows(&tx, rows)
            .map_err(|e| ReplayError::Damaged(format!("WAL record {}: {e}", rec.seq)))?;
    }
    for (unit, data) in &writes {
        block.write_at(unit * au, data).map_err(|e| ReplayError::Io("deferred replay", e))?;
    }
    block.flush().map_err(|e| ReplayError::Io("deferred replay flush", e))?;
    tx.commit().map_err(|e| db_err(&e))?;
    Ok(records.len())
}

fn io_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

fn check_options(opts: &BlueStoreOptions) -> Result<u8, BlueStoreError> {
    let au = opts.bluestore_min_alloc_size;
    if !au.is_power_of_two() || !(CSUM_BLOCK_BYTES..=BLOB_BYTES).contains(&au) {
        return Err(BlueStoreError::Options(format!(
            "bluestore_min_alloc_size {au}: must be a power of two from {CSUM_BLOCK_BYTES} to {BLOB_BYTES}"
        )));
    }
    if opts.bluestore_csum_type != "crc32c" {
        return Err(BlueStoreError::Options(format!(
            "bluestore_csum_type {:?}: only crc32c is supported",
            opts.bluestore_csum_type
        )));
    }
    if opts.bluestore_wal_max_bytes < wal::WAL_ALIGN {
        return Err(BlueStoreError::Options(format!(
            "bluestore_wal_max_bytes {}: at least {}",
            opts.bluestore_wal_max_bytes,
            wal::WAL_ALIGN
        )));
    }
    if opts.bluestore_max_deferred_txc == 0 {
        return Err(BlueStoreError::Options("bluestore_max_deferred_txc 0: at least 1".into()));
    }
    if opts.bluestore_block_size < au * 16 {
        return Err(BlueStoreError::Options(format!(
            "bluestore_block_size {}: at least 16 allocation units",
            opts.bluestore_block_size
        )));
    }
    Ok(au.trailing_zeros() as u8)
}

impl BlueStore {
    /// Creates a store in directory `dir` (which must exist and hold no store).
    pub fn mkfs(
        dir: &Path,
        opts: &BlueStoreOptions,
        osd_id: u32,
        fsid: [u8; 16],
    ) -> Result<(), BlueStoreError> {
        Self::mkfs_in(Arc::new(DirEnv::new(dir)), opts, osd_id, fsid)
    }

    /// Opens the store in directory `dir`.
    pub fn open(dir: &Path, opts: &BlueStoreOptions) -> Result<BlueStore, BlueStoreError> {
        Self::open_in(Arc::new(DirEnv::new(dir)), opts)
    }

    /// [`BlueStore::mkfs`] in any [`Env`] (the simulated disk in tests).
    pub fn mkfs_in(
        env: Arc<dyn Env>,
        opts: &BlueStoreOptions,
        osd_id: u32,
        fsid: [u8; 16],
    ) -> Result<(), BlueStoreError> {
        let where_ = env.describe();
        check_options(opts)?;
        let io = |what: &'static str| {
            let where_ = where_.clone();
            move |source| BlueStoreError::Io { where_, what, source }
        };
        if env.exists(LABEL_FILE).map_err(io("label"))? {
            return Err(BlueStoreError::Exists { where_ });
        }
        let label = Label {
            fsid,
            osd_id,
            block_bytes: opts.bluestore_block_size,
            min_alloc_bytes: opts.bluestore_min_alloc_size as u32,
            csum_type: CSUM_TYPE_CRC32C,
        };
        let block = env.open(BLOCK_FILE, true).map_err(io("block file"))?;
        block.set_len(opts.bluestore_block_size).map_err(io("block file size"))?;
        block.flush().map_err(io("block file flush"))?;
        let wal = env.open(WAL_FILE, true).map_err(io("wal file"))?;
        wal.set_len(0).map_err(io("wal file"))?;
        wal.flush().map_err(io("wal file flush"))?;
        let db_dev = env.open(DB_FILE, true).map_err(io("db file"))?;
        // A db left by an mkfs that crashed before its label is started over.
        db_dev.set_len(0).map_err(io("db file"))?;
        let db_err =
            |e: &dyn std::fmt::Display| BlueStoreError::Db { where_: where_.clone(), why: e.to_string() };
        let db = redb::Builder::new()
            .set_cache_size(16 << 20)
            .create_with_backend(RedbBackend::new(db_dev))
            .map_err(|e| db_err(&e))?;
        let tx = db.begin_write().map_err(|e| db_err(&e))?;
        {
            for t in [ONODES, BLOBS, OMAP, PG_USAGE] {
                tx.open_table(t).map_err(|e| db_err(&e))?;
            }
            tx.open_table(FREELIST).map_err(|e| db_err(&e))?;
            let mut meta = tx.open_table(META).map_err(|e| db_err(&e))?;
            meta.insert(META_LABEL, label.encode().as_slice()).map_err(|e| db_err(&e))?;
            for k in [META_NID_MAX, META_BATCH, META_OMAP_BYTES] {
                meta.insert(k, encode_u64(0).as_slice()).map_err(|e| db_err(&e))?;
            }
        }
        tx.commit().map_err(|e| db_err(&e))?;
        drop(db);
        env.write_durable(LABEL_FILE, &label.encode()).map_err(io("label"))?;
        Ok(())
    }

    /// [`BlueStore::open`] in any [`Env`].
    pub fn open_in(env: Arc<dyn Env>, opts: &BlueStoreOptions) -> Result<BlueStore, BlueStoreError> {
        let where_ = env.describe();
        let au_shift = check_options(opts)?;
        let io = |what: &'static str| {
            let where_ = where_.clone();
            move |source| BlueStoreError::Io { where_, what, source }
        };
        let not_a_store =
            |why: &str| BlueStoreError::NotAStore { where_: where_.clone(), why: why.to_string() };
        let label_bytes =
            env.read_file(LABEL_FILE).map_err(io("label"))?.ok_or_else(|| not_a_store("no label"))?;
        let label = Label::decode(&label_bytes).map_err(|e| not_a_store(&e.to_string()))?;
        if label.min_alloc_bytes as u64 != opts.bluestore_min_alloc_size {
            // Fixed at mkfs: the store's own value wins, as in Ceph; the option only says what mkfs uses.
            tracing::info!(
                "bluestore_min_alloc_size {} ignored: the store was made with {}",
                opts.bluestore_min_alloc_size,
                label.min_alloc_bytes
            );
        }
        let mut opts = opts.clone();
        opts.bluestore_min_alloc_size = label.min_alloc_bytes as u64;
        opts.bluestore_block_size = label.block_bytes;
        let au_shift = if opts.bluestore_min_alloc_size.is_power_of_two() {
            opts.bluestore_min_alloc_size.trailing_zeros() as u8
        } else {
            au_shift
        };
        check_options(&opts)?;
        let block = env.open(BLOCK_FILE, false).map_err(io("block file"))?;
        let block_len = block.len().map_err(io("block file size"))?;
        if block_len < label.block_bytes {
            return Err(BlueStoreError::Damaged {
                where_: where_.clone(),
                why: format!("block file of {block_len} bytes, the label says {}", label.block_bytes),
            });
        }
        let db_dev = env.open(DB_FILE, false).map_err(io("db file"))?;
        let db_err =
            |e: &dyn std::fmt::Display| BlueStoreError::Db { where_: where_.clone(), why: e.to_string() };
        let backend = RedbBackend::new(db_dev.clone());
        let db_fence = backend.fenced.clone();
        let db = redb::Builder::new()
            .set_cache_size(opts.bluestore_cache_size as usize)
            .create_with_backend(backend)
            .map_err(|e| db_err(&e))?;
        let damaged = |why: String| BlueStoreError::Damaged { where_: where_.clone(), why };
        let au = 1u64 << au_shift;
        let wal = env.open(WAL_FILE, false).map_err(io("wal file"))?;
        let replayed = replay_wal(&db, &wal, &block, au, label.block_bytes).map_err(|e| match e {
            ReplayError::Io(what, source) => BlueStoreError::Io { where_: where_.clone(), what, source },
            ReplayError::Damaged(why) => damaged(why),
        })?;
        if replayed > 0 {
            tracing::info!("bluestore {where_}: replayed {replayed} WAL records");
        }
        let total_aus = label.block_bytes / au;
        let mut alloc = Allocator::new(total_aus);
        let mut usage = BTreeMap::new();
        let (nid_max, batch, omap_bytes) = {
            let rtx = db.begin_read().map_err(|e| db_err(&e))?;
            let meta = rtx.open_table(META).map_err(|e| db_err(&e))?;
            let get = |k: &str| -> Result<Vec<u8>, BlueStoreError> {
                Ok(meta
                    .get(k)
                    .map_err(|e| db_err(&e))?
                    .ok_or_else(|| damaged(format!("no {k} in meta")))?
                    .value()
                    .to_vec())
            };
            if Label::decode(&get(META_LABEL)?).map_err(|e| damaged(e.to_string()))? != label {
                return Err(damaged("the label file and the database belong to different stores".into()));
            }
            let num = |k: &str| -> Result<u64, BlueStoreError> {
                decode_u64(&get(k)?).map_err(|e| damaged(e.to_string()))
            };
            let (nid_max, batch, omap_bytes) = (num(META_NID_MAX)?, num(META_BATCH)?, num(META_OMAP_BYTES)?);
            // The free list: one row per group ever touched.
            for row in rtx.open_table(FREELIST).map_err(|e| db_err(&e))?.iter().map_err(|e| db_err(&e))? {
                let (k, v) = row.map_err(|e| db_err(&e))?;
                let words = decode_freelist(v.value()).map_err(|e| damaged(e.to_string()))?;
                if !alloc.load_group_raw(k.value(), &words) {
                    return Err(damaged(format!("free-list group {} past the device", k.value())));
                }
            }
            alloc.recount();
            for row in rtx.open_table(PG_USAGE).map_err(|e| db_err(&e))?.iter().map_err(|e| db_err(&e))? {
                let (k, v) = row.map_err(|e| db_err(&e))?;
                let pg = decode_pg_key(k.value()).map_err(|e| damaged(e.to_string()))?;
                let (objects, bytes) = decode_usage(v.value()).map_err(|e| damaged(e.to_string()))?;
                usage.insert(pg, PgUsage { objects, bytes });
            }
            (nid_max, batch, omap_bytes)
        };
        let free_aus = alloc.free_aus();
        let inner = Arc::new(Inner {
            label,
            env,
            db: RwLock::new(Some(db)),
            db_fence,
            block,
            db_dev,
            au,
            au_shift,
            opts,
            gate: RwLock::new(Memtable::default()),
            overlay: Mutex::new(Overlay { usage, free_aus, ..Overlay::default() }),
            work: Condvar::new(),
            deferred_cache: RwLock::new(HashMap::new()),
            commits: Mutex::new(Commits { committed: 0, failed: None }),
            committed_cv: Condvar::new(),
            notifier: RwLock::new(None),
            committer: Mutex::new(Committer {
                alloc,
                deferred_batches: 0,
                deferred_bytes: 0,
                wal,
                wal_at: 0,
                batch,
                nid_max,
                omap_bytes,
            }),
            omap_bytes: AtomicU64::new(omap_bytes),
        });
        let worker = inner.clone();
        let thread = std::thread::Builder::new()
            .name("bstore_kv_sync".into())
            .spawn(move || worker.commit_loop())
            .map_err(io("commit thread"))?;
        Ok(BlueStore { inner, thread: Mutex::new(Some(thread)) })
    }

    /// Validates `txn` and applies it to what reads see, all or nothing, and queues it for the commit thread.
    /// Never waits for the disk (it may read metadata to validate). Errors: as [`crate::store::MemStore`] for
    /// invalid transactions; [`StoreError::NoSpace`] when its new data may not fit; [`StoreError::Busy`] when
    /// `bluestore_throttle_bytes` of payload are already queued (retry after a commit); the failure once the
    /// store has failed. On any error nothing changed.
    pub fn queue(&self, txn: &Transaction) -> Result<CommitSeq, StoreError> {
        self.inner.queue(txn)
    }

    /// The store's identity and geometry (fsid, OSD id, block size, allocation unit), fixed at mkfs.
    pub fn label(&self) -> &Label {
        &self.inner.label
    }

    /// The highest sequence number such that it and every earlier one are durable.
    pub fn committed(&self) -> CommitSeq {
        self.inner.commits.lock().committed
    }

    /// Called from the commit thread after each batch is durable, with the new [`BlueStore::committed`]. It
    /// must not block.
    pub fn set_commit_notifier(&self, f: Box<dyn Fn(CommitSeq) + Send + Sync>) {
        *self.inner.notifier.write() = Some(Arc::from(f));
    }

    /// Waits until `seq` is durable; fails if the store failed first or `timeout` passed.
    pub fn wait_committed(&self, seq: CommitSeq, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let mut c = self.inner.commits.lock();
        loop {
            if c.committed >= seq {
                return Ok(());
            }
            if let Some(e) = &c.failed {
                return Err(e.clone());
            }
            if self.inner.committed_cv.wait_until(&mut c, deadline).timed_out() {
                return Err(StoreError::Io(format!("commit {seq} not durable after {timeout:?}")));
            }
        }
    }

    /// The error that stopped the store, if it failed.
    pub fn failed(&self) -> Option<StoreError> {
        self.inner.commits.lock().failed.clone()
    }

    /// Holds the commit thread between batches (true) or lets it go on (false). For tests and tools that
    /// want to choose how transactions group into commits.
    pub fn pause_commits(&self, paused: bool) {
        self.inner.overlay.lock().paused = paused;
        self.inner.work.notify_all();
    }

    /// Space, for `cuttle osd df`.
    pub fn statfs(&self) -> StoreStatfs {
        let ov = self.inner.overlay.lock();
        let total_aus = self.inner.opts.bluestore_block_size / self.inner.au;
        StoreStatfs {
            total: total_aus * self.inner.au,
            allocated: (total_aus - ov.free_aus) * self.inner.au,
            stored: ov.usage.values().map(|u| u.bytes).sum(),
            omap: self.inner.omap_bytes.load(Ordering::Relaxed),
            meta: self.inner.db_dev.len().unwrap_or(0),
            available: ov.free_aus.saturating_sub(ov.reserved_aus) * self.inner.au,
        }
    }

    /// Checks the metadata against the allocator, and with `deep` every checksum of every object. Waits for
    /// the commit in progress and holds the next one off while it runs.
    pub fn fsck(&self, deep: bool) -> Result<fsck::FsckReport, StoreError> {
        fsck::run(&self.inner, deep)
    }

    /// Commits what is queued, checkpoints (so the next mount replays nothing), stops the commit thread and
    /// closes redb cleanly (so the next mount does not repair it). Later calls change nothing; afterwards
    /// `queue` and reads fail. The OSD calls it when it stops, whoever still holds the store; dropping the
    /// store calls it too.
    pub fn close(&self) {
        {
            let mut ov = self.inner.overlay.lock();
            ov.stopping = true;
        }
        self.inner.work.notify_all();
        if let Some(t) = self.thread.lock().take() {
            if t.join().is_err() {
                tracing::error!("bluestore commit thread panicked");
            }
        }
        // A failed store's redb is fenced: closing it writes nothing, and the next mount replays the WAL.
        drop(self.inner.db.write().take());
    }
}

impl Drop for BlueStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// What a reader sees of one object: the layers over it (bottom first) and, when they let it through, its
/// committed onode.
struct View {
    layers: Vec<Arc<ObjLayer>>,
    base: Option<Onode>,
    exists: bool,
    size: u64,
    version: Option<Eversion>,
}

impl Inner {
    fn fail(&self, e: StoreError) {
        tracing::error!("bluestore failed: {e}");
        self.db_fence.store(true, Ordering::SeqCst);
        self.overlay.lock().failed.get_or_insert(e.clone());
        self.commits.lock().failed.get_or_insert(e);
        self.committed_cv.notify_all();
    }

    /// Runs `f` on the open database (an error once [`BlueStore::close`] closed it).
    fn with_db<T, E: std::fmt::Display>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        let db = self.db.read();
        f(db.as_ref().ok_or_else(|| StoreError::Io("the store is closed".into()))?).map_err(Self::db_err)
    }

    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        self.with_db(|db| db.begin_read())
    }

    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        self.with_db(|db| db.begin_write())
    }

    fn db_err(e: impl std::fmt::Display) -> StoreError {
        StoreError::Io(format!("metadata database: {e}"))
    }

    fn base_onode(mem: &Memtable, rtx: &ReadTransaction, key: &[u8]) -> Result<Option<Onode>, StoreError> {
        let t = rtx.open_table(ONODES).map_err(Self::db_err)?;
        let v = get_row(mem, &t, TableId::Onodes, key, Onode::decode).map_err(Self::db_err)?;
        v.transpose().map_err(|e| StoreError::Io(format!("onode: {e}")))
    }

    /// The layers over an object (top first, as found), and whether the committed state shows through.
    fn layers_of(ov: &Overlay, key: &[u8], pg: PgId) -> (Vec<Arc<ObjLayer>>, bool) {
        let mut layers = Vec::new();
        for layer in std::iter::once(&ov.live).chain(ov.inflight.as_deref()) {
            match layer.objects.get(key) {
                Some(e) => {
                    layers.push(e.clone());
                    if e.is_fresh() {
                        return (layers, false);
                    }
                }
                None if layer.cleared.contains(&pg) => return (layers, false),
                None => {}
            }
        }
        (layers, true)
    }

    /// Resolves an object for a reader (who holds the gate).
    fn view(&self, mem: &Memtable, rtx: &ReadTransaction, pg: PgId, name: &str) -> Result<View, StoreError> {
        let key = onode_key(pg, object_hash(name.as_bytes()), name);
        let (mut layers, base_visible) = Self::layers_of(&self.overlay.lock(), &key, pg);
        let base = if base_visible { Self::base_onode(mem, rtx, &key)? } else { None };
        let (exists, size, version) = match (layers.first(), &base) {
            (Some(top), _) => (top.exists, top.size, top.version),
            (None, Some(b)) => (true, b.size, b.version),
            (None, None) => (false, 0, None),
        };
        if !exists {
            return Err(StoreError::NotFound(ObjectId::new(pg, name)));
        }
        layers.reverse();
        Ok(View { layers, base, exists, size, version })
    }

    fn attrs_of(view: &View) -> &BTreeMap<String, Bytes> {
        static EMPTY: BTreeMap<String, Bytes> = BTreeMap::new();
        match (view.layers.last(), &view.base) {
            (Some(top), _) => &top.attrs,
            (None, Some(b)) => &b.attrs,
            (None, None) => &EMPTY,
        }
    }

    /// The bytes of physical unit `pau`, from the deferred cache or the device, checked against `csums`.
    fn read_unit(
        &self,
        pau: u64,
        csums: &[u32],
        from: u64,
        to: u64,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        assert!(from < to && to <= self.au && out.len() as u64 == to - from);
        if let Some(data) = self.deferred_cache.read().get(&pau) {
            out.copy_from_slice(&data[from as usize..to as usize]);
            return Ok(());
        }
        // Whole checksum blocks: a crc covers 4 KiB.
        let b0 = from / CSUM_BLOCK_BYTES;
        let b1 = to.div_ceil(CSUM_BLOCK_BYTES);
        let mut buf = vec![0u8; ((b1 - b0) * CSUM_BLOCK_BYTES) as usize];
        let at = pau * self.au + b0 * CSUM_BLOCK_BYTES;
        self.block.read_at(at, &mut buf).map_err(|e| io_err(&format!("block read at {at}"), e))?;
        verify_blocks(at, &buf, &csums[b0 as usize..b1 as usize])?;
        let skip = (from - b0 * CSUM_BLOCK_BYTES) as usize;
        out.copy_from_slice(&buf[skip..skip + out.len()]);
        Ok(())
    }

    /// Reads the part of `run` within `[offset, end)` into `buf` (object bytes from `offset`): one device
    /// read of whole checksum blocks, each verified.
    fn read_run(&self, run: &Run, offset: u64, end: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        assert_eq!(run.csums.len() as u64 * CSUM_BLOCK_BYTES, run.units * self.au, "one crc per 4 KiB");
        let from = run.obj.max(offset);
        let to = (run.obj + run.units * self.au).min(end);
        assert!(from < to, "a run is read only where it overlaps the read");
        let b0 = (from - run.obj) / CSUM_BLOCK_BYTES;
        let b1 = (to - run.obj).div_ceil(CSUM_BLOCK_BYTES);
        let at = run.pau * self.au + b0 * CSUM_BLOCK_BYTES;
        let csums = &run.csums[b0 as usize..b1 as usize];
        let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
        if (from - run.obj).is_multiple_of(CSUM_BLOCK_BYTES)
            && dst.len() as u64 == (b1 - b0) * CSUM_BLOCK_BYTES
        {
            // Whole blocks: straight into the caller's buffer.
            self.block.read_at(at, dst).map_err(|e| io_err(&format!("block read at {at}"), e))?;
            return verify_blocks(at, dst, csums);
        }
        let mut tmp = vec![0u8; ((b1 - b0) * CSUM_BLOCK_BYTES) as usize];
        self.block.read_at(at, &mut tmp).map_err(|e| io_err(&format!("block read at {at}"), e))?;
        verify_blocks(at, &tmp, csums)?;
        let skip = (from - run.obj - b0 * CSUM_BLOCK_BYTES) as usize;
        dst.copy_from_slice(&tmp[skip..skip + dst.len()]);
        Ok(())
    }

    /// Fills `buf` (object bytes from `offset`) from the committed data map of object `nid` of `size`.
    fn read_base(
        &self,
        mem: &Memtable,
        rtx: &ReadTransaction,
        nid: u64,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let end = (offset + buf.len() as u64).min(size);
        if offset >= end {
            return Ok(());
        }
        let blobs = rtx.open_table(BLOBS).map_err(Self::db_err)?;
        let lo = blob_key(nid, offset / BLOB_BYTES);
        let hi = blob_key(nid, (end - 1) / BLOB_BYTES);
        // Units contiguous in the object and on the device are read together.
        let mut run: Option<Run> = None;
        let bounds = (Bound::Included(lo.as_slice()), Bound::Included(hi.as_slice()));
        for_rows(mem, &blobs, TableId::Blobs, bounds.0, bounds.1, |k, v| -> Result<bool, StoreError> {
            let (_, index) = records::decode_blob_key(k).map_err(|e| StoreError::Io(e.to_string()))?;
            let blob = Blob::decode(v).map_err(|e| StoreError::Io(format!("blob: {e}")))?;
            for (slot, s) in blob.slots.iter().enumerate() {
                let Some((pau, csums)) = s else { continue };
                let u0 = index * BLOB_BYTES + slot as u64 * self.au;
                if u0 + self.au <= offset || u0 >= end {
                    continue;
                }
                if self.deferred_cache.read().contains_key(pau) {
                    if let Some(r) = run.take() {
                        self.read_run(&r, offset, end, buf)?;
                    }
                    let (from, to) = (u0.max(offset), (u0 + self.au).min(end));
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    self.read_unit(*pau, csums, from - u0, to - u0, dst)?;
                    continue;
                }
                match &mut run {
                    Some(r)
                        if r.obj + r.units * self.au == u0
                            && r.pau + r.units == *pau
                            && r.units * self.au < RUN_BYTES_MAX =>
                    {
                        r.units += 1;
                        r.csums.extend_from_slice(csums);
                    }
                    _ => {
                        if let Some(r) = run.take() {
                            self.read_run(&r, offset, end, buf)?;
                        }
                        run = Some(Run { obj: u0, pau: *pau, units: 1, csums: csums.clone() });
                    }
                }
            }
            Ok(true)
        })?;
        if let Some(r) = run.take() {
            self.read_run(&r, offset, end, buf)?;
        }
        Ok(())
    }

    fn read(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let mem = self.gate.read();
        let rtx = self.begin_read()?;
        let view = self.view(&mem, &rtx, pg, name)?;
        let end = offset.saturating_add(len).min(view.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        if let Some(b) = &view.base {
            self.read_base(&mem, &rtx, b.nid, b.size, offset, &mut buf)?;
        }
        for l in &view.layers {
            l.overlay(&mut buf, offset);
        }
        Ok(Bytes::from(buf))
    }

    /// The omap pairs after `after`, up to `max`, as reads see them.
    fn omap_range(
        &self,
        pg: PgId,
        name: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mem = self.gate.read();
        let rtx = self.begin_read()?;
        let view = self.view(&mem, &rtx, pg, name)?;
        // The layers' changes, lowest first; a clear hides everything below it.
        let mut base_visible = view.base.is_some();
        let mut deltas: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for l in &view.layers {
            if l.omap_cleared {
                base_visible = false;
                deltas.clear();
            }
            let lower = match after {
                Some(a) => Bound::Excluded(a.to_string()),
                None => Bound::Unbounded,
            };
            for (k, v) in l.omap.range((lower, Bound::Unbounded)) {
                deltas.insert(k.clone(), v.clone());
            }
        }
        // The committed pairs that may show: enough of them that `max` survive the layers' removals.
        let mut base_rows: Vec<(String, Vec<u8>)> = Vec::new();
        if let (Some(b), true) = (&view.base, base_visible) {
            let lo = match after {
                Some(a) => {
                    let mut k = omap_key(b.nid, a);
                    k.push(0);
                    k
                }
                None => omap_key(b.nid, ""),
            };
            let hi = (b.nid + 1).to_be_bytes();
            let want = max.saturating_add(deltas.len());
            let table = rtx.open_table(OMAP).map_err(Self::db_err)?;
            let bounds = (Bound::Included(lo.as_slice()), Bound::Excluded(hi.as_slice()));
            for_rows(&mem, &table, TableId::Omap, bounds.0, bounds.1, |k, v| {
                let (_, key) = records::decode_omap_key(k).map_err(|e| StoreError::Io(e.to_string()))?;
                base_rows.push((key, v.to_vec()));
                Ok(base_rows.len() < want)
            })?;
        }
        let mut base_rows = base_rows.into_iter();
        let next_base = || -> Result<Option<(String, Vec<u8>)>, StoreError> { Ok(base_rows.next()) };
        merge_over_base(next_base, deltas, max, |k, v| (k, v), |k, v| v.map(|v| (k, v)))
    }

    fn list(&self, pg: PgId, after: Option<&str>, max: usize) -> Result<Vec<ListEntry>, StoreError> {
        let mem = self.gate.read();
        let rtx = self.begin_read()?;
        let prefix = pg_key(pg);
        let lo = match after {
            Some(a) => Bound::Excluded(onode_key(pg, object_hash(a.as_bytes()), a)),
            None => Bound::Included(prefix.to_vec()),
        };
        let hi = prefix_end(&prefix);
        // The layers' entries in range, the upper layer's winning; and whether the committed ones show.
        let (entries, base_visible) = {
            let ov = self.overlay.lock();
            let mut entries: BTreeMap<Vec<u8>, Arc<ObjLayer>> = BTreeMap::new();
            let mut base_visible = true;
            let layers: Vec<&Layer> = std::iter::once(&ov.live).chain(ov.inflight.as_deref()).collect();
            for layer in layers {
                for (k, e) in layer.objects.range((lo.clone(), Bound::Excluded(hi.clone()))) {
                    entries.entry(k.clone()).or_insert_with(|| e.clone());
                }
                if layer.cleared.contains(&pg) {
                    base_visible = false;
                    break;
                }
            }
            (entries, base_visible)
        };
        // The committed entries that may show: enough of them that `max` survive the layers' removals.
        let mut rows: Vec<OnodeRow> = Vec::new();
        if base_visible {
            let lo_ref: Bound<&[u8]> = match &lo {
                Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
                Bound::Included(k) => Bound::Included(k.as_slice()),
                Bound::Unbounded => Bound::Unbounded,
            };
            let want = max.saturating_add(entries.len());
            let table = rtx.open_table(ONODES).map_err(Self::db_err)?;
            for_rows(&mem, &table, TableId::Onodes, lo_ref, Bound::Excluded(hi.as_slice()), |k, v| {
                let o = Onode::decode(v).map_err(|e| StoreError::Io(format!("onode: {e}")))?;
                rows.push((k.to_vec(), o.version));
                Ok(rows.len() < want)
            })?;
        }
        let mut rows = rows.into_iter();
        let next_base = || -> Result<Option<OnodeRow>, StoreError> { Ok(rows.next()) };
        let entry = |k: &[u8], version: Option<Eversion>| ListEntry {
            name: String::from_utf8_lossy(&k[12..]).into_owned(),
            version: version.unwrap_or(Eversion::ZERO),
        };
        merge_over_base(
            next_base,
            entries,
            max,
            |k, v| entry(&k, v),
            |k, l: Arc<ObjLayer>| l.exists.then(|| entry(&k, l.version)),
        )
    }

    // -----------------------------------------------------------------------------------------------------------
    // queue()

    /// The current state of an object as a fresh live-layer entry (for an object the live layer lacks).
    fn entry_below_live(
        &self,
        mem: &Memtable,
        ov: &Overlay,
        rtx: &mut Option<ReadTransaction>,
        key: &[u8],
        pg: PgId,
    ) -> Result<ObjLayer, StoreError> {
        if ov.live.cleared.contains(&pg) {
            return Ok(ObjLayer::absent());
        }
        if let Some(inflight) = &ov.inflight {
            if let Some(e) = inflight.objects.get(key) {
                return Ok(ObjLayer::over(e.exists, e.size, e.version, e.attrs.clone()));
            }
            if inflight.cleared.contains(&pg) {
                return Ok(ObjLayer::absent());
            }
        }
        if rtx.is_none() {
            *rtx = Some(self.begin_read()?);
        }
        let rtx = rtx.as_ref().expect("just opened");
        Ok(match Self::base_onode(mem, rtx, key)? {
            Some(o) => ObjLayer::over(true, o.size, o.version, o.attrs),
            None => ObjLayer::absent(),
        })
    }

    fn queue(&self, txn: &Transaction) -> Result<CommitSeq, StoreError> {
        let ops = txn.ops();
        if ops.len() > TX_OPS_MAX {
            return Err(StoreError::Invalid(format!(
                "{} ops in one transaction (max {TX_OPS_MAX})",
                ops.len()
            )));
        }
        // What the transaction holds in memory until committed: payload, omap pairs, and a fixed cost per op
        // (so metadata-only transactions are bounded too).
        let payload_bytes = txn.payload_bytes()
            + ops
                .iter()
                .map(|op| match op {
                    TxOp::OmapSet { pairs, .. } => {
                        pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
                    }
                    TxOp::OmapRm { keys, .. } => keys.iter().map(|k| k.len() as u64).sum(),
                    _ => 0,
                })
                .sum::<u64>()
            + ops.len() as u64 * OP_QUEUED_BYTES;
        // The gate first (the lock order everywhere: gate, then overlay).
        let mem = self.gate.read();
        let mut guard = self.overlay.lock();
        let ov = &mut *guard;
        if let Some(e) = &ov.failed {
            return Err(e.clone());
        }
        if ov.stopping {
            return Err(StoreError::Io("the store is closed".into()));
        }
        if ov.pending_bytes > 0 && ov.pending_bytes + payload_bytes > self.opts.bluestore_throttle_bytes {
            return Err(StoreError::Busy(format!(
                "{} bytes queued (bluestore_throttle_bytes {})",
                ov.pending_bytes, self.opts.bluestore_throttle_bytes
            )));
        }
        // Pass 1: validate, on a shadow of each object (the transaction's view), without changing anything.
        // Objects the live layer lacks are looked up once and kept for pass 2.
        let mut rtx = None;
        let mut loaded: HashMap<Vec<u8>, ObjLayer> = HashMap::new();
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(ops.len());
        let mut shadows: HashMap<Vec<u8>, (bool, BTreeMap<String, bool>, bool)> = HashMap::new();
        let mut cleared: BTreeSet<PgId> = BTreeSet::new();
        let mut needed_aus: u64 = 0;
        for op in ops {
            let oid = match op {
                TxOp::RemovePg { pg } => {
                    cleared.insert(*pg);
                    shadows.retain(|k, _| k[..8] != pg_key(*pg));
                    keys.push(Vec::new());
                    continue;
                }
                op => op.oid().expect("every op but RemovePg names an object"),
            };
            let key = onode_key(oid.pg, object_hash(oid.name.as_bytes()), &oid.name);
            if !shadows.contains_key(&key) {
                // (exists, attrs known: name -> present, fresh: stored attrs no longer count)
                let exists = if cleared.contains(&oid.pg) {
                    false
                } else if let Some(e) = ov.live.objects.get(&key) {
                    e.exists
                } else {
                    if !loaded.contains_key(&key) {
                        let e = self.entry_below_live(&mem, ov, &mut rtx, &key, oid.pg)?;
                        loaded.insert(key.clone(), e);
                    }
                    loaded[&key].exists
                };
                shadows.insert(key.clone(), (exists, BTreeMap::new(), !exists));
            }
            let stored_attr = |name: &str| -> bool {
                match ov.live.objects.get(&key) {
                    Some(e) => e.attrs.contains_key(name),
                    None => loaded.get(&key).is_some_and(|e| e.attrs.contains_key(name)),
                }
            };
            let shadow = shadows.get_mut(&key).expect("inserted above");
            let must_exist = |s: &(bool, BTreeMap<String, bool>, bool)| {
                if s.0 {
                    Ok(())
                } else {
                    Err(StoreError::NotFound(oid.clone()))
                }
            };
            match op {
                TxOp::Touch { .. } | TxOp::Write { .. } => {
                    if let TxOp::Write { offset, len, .. } = op {
                        let end = offset
                            .checked_add(*len)
                            .ok_or_else(|| StoreError::Invalid("write past 2^64".into()))?;
                        if *len > 0 {
                            needed_aus += end.div_ceil(self.au) - offset / self.au;
                        }
                    }
                    if !shadow.0 {
                        *shadow = (true, BTreeMap::new(), true);
                    }
                }
                TxOp::Zero { offset, len, .. } => {
                    must_exist(shadow)?;
                    offset.checked_add(*len).ok_or_else(|| StoreError::Invalid("zero past 2^64".into()))?;
                }
                TxOp::Remove { .. } => {
                    must_exist(shadow)?;
                    *shadow = (false, BTreeMap::new(), true);
                }
                TxOp::SetAttr { name, .. } => {
                    must_exist(shadow)?;
                    shadow.1.insert(name.clone(), true);
                }
                TxOp::RmAttr { name, .. } => {
                    must_exist(shadow)?;
                    let present = match shadow.1.get(name) {
                        Some(&p) => p,
                        None => !shadow.2 && stored_attr(name),
                    };
                    if !present {
                        return Err(StoreError::NoAttr { oid: oid.clone(), name: name.clone() });
                    }
                    shadow.1.insert(name.clone(), false);
                }
                TxOp::Truncate { .. }
                | TxOp::OmapSet { .. }
                | TxOp::OmapRm { .. }
                | TxOp::OmapClear { .. }
                | TxOp::SetVersion { .. } => must_exist(shadow)?,
                TxOp::RemovePg { .. } => unreachable!("handled above"),
            }
            keys.push(key);
        }
        if needed_aus > 0 && ov.reserved_aus + needed_aus > ov.free_aus {
            return Err(StoreError::NoSpace(format!(
                "{needed_aus} allocation units wanted, {} free and not reserved",
                ov.free_aus.saturating_sub(ov.reserved_aus)
            )));
        }
        drop(rtx);

        // Pass 2: apply to the live layer. Nothing below can fail.
        let mut before: BTreeMap<Vec<u8>, (bool, u64)> = BTreeMap::new();
        let mut cleared_now: BTreeSet<PgId> = BTreeSet::new();
        let mut payload = txn.payload().iter();
        for (op, key) in ops.iter().zip(&keys) {
            if let TxOp::RemovePg { pg } = op {
                let prefix = pg_key(*pg);
                let doomed: Vec<Vec<u8>> = ov
                    .live
                    .objects
                    .range(prefix.to_vec()..prefix_end(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in doomed {
                    ov.live.objects.remove(&k);
                }
                ov.live.cleared.insert(*pg);
                ov.live.pgs.insert(*pg);
                cleared_now.insert(*pg);
                before.retain(|k, _| k[..8] != prefix);
                continue;
            }
            let pg = op.pg();
            let entry = match ov.live.objects.entry(key.clone()) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let e = match loaded.remove(key) {
                        Some(e) if !ov.live.cleared.contains(&pg) => e,
                        _ => ObjLayer::absent(),
                    };
                    v.insert(Arc::new(e))
                }
            };
            before.entry(key.clone()).or_insert((entry.exists, entry.size));
            ov.live.pgs.insert(pg);
            let e = Arc::make_mut(entry);
            match op {
                TxOp::Touch { .. } => {
                    if !e.exists {
                        e.create();
                    }
                }
                TxOp::Write { offset, .. } => {
                    let data = payload.next().expect("validated: one payload piece per write");
                    if !e.exists {
                        e.create();
                    }
                    e.write(*offset, data.bytes().clone());
                }
                TxOp::Zero { offset, len, .. } => e.zero(*offset, *len),
                TxOp::Truncate { size, .. } => e.truncate(*size),
                TxOp::Remove { .. } => e.remove(),
                TxOp::SetAttr { name, .. } => {
                    let v = payload.next().expect("validated: one payload piece per setattr");
                    e.attrs.insert(name.clone(), Bytes::copy_from_slice(v));
                }
                TxOp::RmAttr { name, .. } => {
                    let had = e.attrs.remove(name);
                    assert!(had.is_some(), "validated: the attribute exists");
                }
                TxOp::OmapSet { pairs, .. } => {
                    for (k, v) in pairs {
                        e.omap.insert(k.clone(), Some(v.clone()));
                    }
                }
                TxOp::OmapRm { keys, .. } => {
                    for k in keys {
                        if e.omap_cleared {
                            e.omap.remove(k);
                        } else {
                            e.omap.insert(k.clone(), None);
                        }
                    }
                }
                TxOp::OmapClear { .. } => {
                    e.omap_cleared = true;
                    e.omap.clear();
                }
                TxOp::SetVersion { version, .. } => e.version = Some(*version),
                TxOp::RemovePg { .. } => unreachable!("handled above"),
            }
        }
        assert!(payload.next().is_none(), "every payload piece belongs to an op");
        // PG usage as reads see it.
        for pg in &cleared_now {
            let prefix = pg_key(*pg);
            let mut u = PgUsage::default();
            for (_, e) in ov.live.objects.range(prefix.to_vec()..prefix_end(&prefix)) {
                if e.exists {
                    u.objects += 1;
                    u.bytes += e.size;
                }
            }
            set_usage(&mut ov.usage, *pg, u);
        }
        for (key, (was, old_size)) in before {
            let pg = decode_pg_key(&key).expect("our own key");
            if cleared_now.contains(&pg) {
                continue;
            }
            let e = &ov.live.objects[&key];
            let mut u = ov.usage.get(&pg).copied().unwrap_or_default();
            u.objects = u.objects + e.exists as u64 - was as u64;
            u.bytes = u.bytes + if e.exists { e.size } else { 0 } - if was { old_size } else { 0 };
            set_usage(&mut ov.usage, pg, u);
        }
        ov.queued_seq += 1;
        let seq = ov.queued_seq;
        ov.live.last_seq = seq;
        ov.live.payload_bytes += payload_bytes;
        ov.live.reserved_aus += needed_aus;
        ov.pending_bytes += payload_bytes;
        ov.reserved_aus += needed_aus;
        drop(guard);
        drop(mem);
        self.work.notify_one();
        Ok(seq)
    }

    // -----------------------------------------------------------------------------------------------------------
    // The commit thread.

    /// Runs batches until the store stops (then it commits what is queued and retires the last deferred
    /// writes, so a clean mount replays nothing) or fails.
    fn commit_loop(self: Arc<Self>) {
        loop {
            let idle_stop = {
                let mut ov = self.overlay.lock();
                loop {
                    if ov.failed.is_some() {
                        return;
                    }
                    if !ov.live.is_empty() && (!ov.paused || ov.stopping) {
                        break false;
                    }
                    if ov.stopping {
                        break true;
                    }
                    self.work.wait(&mut ov);
                }
            };
            if idle_stop && self.committer.lock().wal_at == 0 {
                return;
            }
            // A panic (a broken invariant) fails the store like an IO error: waiters learn of it instead of
            // timing out, and nothing more is acknowledged.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch()));
            let r = r.unwrap_or_else(|_| Err(StoreError::Io("the commit thread panicked".into())));
            if let Err(e) = r {
                self.fail(e);
                return;
            }
        }
    }

    /// One batch: everything queued (possibly nothing, at shutdown, to checkpoint).
    fn run_batch(&self) -> Result<(), StoreError> {
        let mut c = self.committer.lock();
        let c = &mut *c;
        let (layer, usage, stopping) = {
            let _gate = self.gate.write();
            let mut ov = self.overlay.lock();
            let layer = Arc::new(std::mem::take(&mut ov.live));
            // Every transaction of the batch is in `usage` as it stands now: the batch is all that is queued.
            let usage: Vec<(PgId, PgUsage)> =
                layer.pgs.iter().map(|pg| (*pg, ov.usage.get(pg).copied().unwrap_or_default())).collect();
            ov.inflight = Some(layer.clone());
            (layer, usage, ov.stopping)
        };
        assert!(!layer.is_empty() || c.wal_at > 0, "a batch has work");
        let mut plan = Plan::default();
        if !layer.is_empty() {
            c.batch += 1;
            // 1. Work out the batch, against the committed metadata (the memtable over redb).
            {
                let mem = self.gate.read();
                let rtx = self.begin_read()?;
                self.materialize(c, &mem, &rtx, &layer, &usage, &mut plan)?;
            }
            // 2. Fresh units, then one flush: they are durable before the record that points at them.
            self.write_fresh(&mut plan.fresh)?;
            // 3. The record, then one flush: the batch is durable.
            if !plan.deferred.is_empty() {
                c.deferred_batches += 1;
                c.deferred_bytes += plan.deferred.iter().map(|w| w.data.len() as u64).sum::<u64>();
            }
            self.log_rows(c, &mut plan);
            let rec = wal::record(c.batch, &plan.rows);
            c.wal.write_at(c.wal_at, &rec).map_err(|e| io_err("wal write", e))?;
            c.wal.flush().map_err(|e| io_err("wal flush", e))?;
            c.wal_at += rec.len() as u64;
        }
        // 4. Deferred writes in place, now and then; a checkpoint when the log is long or the store stops.
        let checkpoint = c.wal_at > 0 && (stopping || c.wal_at >= self.opts.bluestore_wal_max_bytes);
        let mut retired = Vec::new();
        if c.deferred_batches > 0
            && (checkpoint
                || c.deferred_batches >= self.opts.bluestore_max_deferred_txc
                || c.deferred_bytes >= DEFERRED_BYTES_MAX)
        {
            // A barrier: a reader that began before a unit's cache entry existed may still be reading the
            // unit's old bytes from the device; every reader from here on finds the entry and reads that.
            drop(self.gate.write());
            let cache = self.deferred_cache.read();
            for (pau, data) in cache.iter() {
                // A unit this batch freed keeps its old bytes (readers of the old state may read them) and
                // its pending write is void.
                if !plan.frees.contains(pau) {
                    self.block.write_at(pau * self.au, data).map_err(|e| io_err("deferred write", e))?;
                    retired.push(*pau);
                }
            }
            c.deferred_batches = 0;
            c.deferred_bytes = 0;
        }
        // 5. redb takes the memtable and this batch's rows: durably at a checkpoint (after the block flush that
        // puts every deferred write of the log on the device), non-durably when the memtable is large.
        let fold = checkpoint || self.gate.read().bytes() >= self.opts.bluestore_memtable_max_bytes;
        if checkpoint {
            self.block.flush().map_err(|e| io_err("block flush", e))?;
        }
        if fold {
            self.fold(c, &plan.rows, checkpoint)?;
        }
        if checkpoint {
            c.wal_at = 0;
        }
        // 6. Publish.
        self.omap_bytes.store(c.omap_bytes, Ordering::Relaxed);
        self.publish(c, &layer, plan.rows, fold, retired, plan.frees);
        Ok(())
    }

    /// Hands the memtable and `rows` (a batch's, not in the memtable yet) to redb in one write transaction,
    /// durable (a checkpoint) or not. The caller empties the memtable afterwards, under the gate.
    fn fold(&self, c: &Committer, rows: &[WalOp], durable: bool) -> Result<(), StoreError> {
        let mut tx = self.begin_write()?;
        {
            let mem = self.gate.read();
            let batch = encode_u64(c.batch);
            let rows = mem
                .rows()
                .chain(rows.iter().filter_map(|op| match op {
                    WalOp::Put { table, key, value } => {
                        Some((*table, key.as_slice(), Some(value.as_slice())))
                    }
                    WalOp::Del { table, key } => Some((*table, key.as_slice(), None)),
                    WalOp::Write(_) | WalOp::Free(_) => None,
                }))
                // Always a row (a durable commit must not be empty, whatever redb does with one).
                .chain([(TableId::Meta, META_BATCH.as_bytes(), Some(batch.as_slice()))]);
            memtable::write_rows(&tx, rows).map_err(StoreError::Io)?;
        }
        let durability = if durable { Durability::Immediate } else { Durability::None };
        tx.set_durability(durability).map_err(Self::db_err)?;
        tx.commit().map_err(Self::db_err)
    }

    /// Writes a batch's fresh units, runs of neighbours (up to [`FRESH_WRITE_BYTES_MAX`]) as one write, then
    /// flushes the block file.
    fn write_fresh(&self, fresh: &mut [(u64, Vec<u8>)]) -> Result<(), StoreError> {
        if fresh.is_empty() {
            return Ok(());
        }
        fresh.sort_by_key(|(pau, _)| *pau);
        let run_max = (FRESH_WRITE_BYTES_MAX / self.au).max(1) as usize;
        let mut i = 0;
        while i < fresh.len() {
            let mut j = i + 1;
            while j < fresh.len() && fresh[j].0 == fresh[j - 1].0 + 1 && j - i < run_max {
                j += 1;
            }
            let at = fresh[i].0 * self.au;
            if j - i == 1 {
                self.block.write_at(at, &fresh[i].1).map_err(|e| io_err("block write", e))?;
            } else {
                let mut joined = Vec::with_capacity((j - i) * self.au as usize);
                for (_, b) in &fresh[i..j] {
                    joined.extend_from_slice(b);
                }
                self.block.write_at(at, &joined).map_err(|e| io_err("block write", e))?;
            }
            i = j;
        }
        self.block.flush().map_err(|e| io_err("block flush", e))
    }

    /// Puts the rest of a batch's changes in its record: free-list groups (units taken, and this batch's frees
    /// already cleared), counters, then the deferred writes and the frees.
    fn log_rows(&self, c: &mut Committer, plan: &mut Plan) {
        let mut groups = c.alloc.take_dirty();
        groups.extend(plan.frees.iter().map(|au| au / records::FREELIST_GROUP_AUS));
        for g in groups {
            let v = encode_freelist(&c.alloc.group_words(g, &plan.frees));
            plan.rows.push(WalOp::Put { table: TableId::Freelist, key: g.to_be_bytes().to_vec(), value: v });
        }
        for (k, v) in [(META_BATCH, c.batch), (META_NID_MAX, c.nid_max), (META_OMAP_BYTES, c.omap_bytes)] {
            let v = encode_u64(v);
            plan.rows.push(WalOp::Put { table: TableId::Meta, key: k.as_bytes().to_vec(), value: v });
        }
        plan.rows.extend(plan.deferred.drain(..).map(WalOp::Write));
        plan.rows.extend(plan.frees.iter().map(|u| WalOp::Free(*u)));
    }

    /// Makes a committed batch the state below the live layer: its rows join the memtable (or, when redb took
    /// them in a fold, the memtable empties), drops its layer, returns the units it freed, forgets the cache
    /// entries of units written in place or freed, reports the commit.
    fn publish(
        &self,
        c: &mut Committer,
        layer: &Layer,
        rows: Vec<WalOp>,
        folded: bool,
        retired: Vec<u64>,
        frees: BTreeSet<u64>,
    ) {
        {
            let mut mem = self.gate.write();
            if folded {
                mem.clear();
            } else {
                mem.apply(rows);
            }
            for au in &frees {
                c.alloc.release(*au);
            }
            // The releases are in the free list already (written with the frees applied).
            let _ = c.alloc.take_dirty();
            let mut cache = self.deferred_cache.write();
            for pau in retired.iter().chain(&frees) {
                cache.remove(pau);
            }
            drop(cache);
            let mut ov = self.overlay.lock();
            ov.inflight = None;
            assert!(ov.pending_bytes >= layer.payload_bytes && ov.reserved_aus >= layer.reserved_aus);
            ov.pending_bytes -= layer.payload_bytes;
            ov.reserved_aus -= layer.reserved_aus;
            ov.free_aus = c.alloc.free_aus();
        }
        if layer.last_seq == 0 {
            return;
        }
        {
            let mut cm = self.commits.lock();
            assert!(layer.last_seq > cm.committed, "commits advance");
            cm.committed = layer.last_seq;
        }
        self.committed_cv.notify_all();
        let notifier = self.notifier.read().clone();
        if let Some(n) = notifier {
            n(layer.last_seq);
        }
    }
}

/// Fresh units are written at most this many bytes at a time. The page cache builds a folio per write up to
/// the write's size, and a later 4 KiB write into a large folio costs the kernel time in proportion to the
/// folio (ext4 walks its buffer heads): measured, 2 MiB folios left by 4 MiB writes made 4 KiB overwrites
/// spend a quarter of an OSD's CPU in `ext4_block_write_begin`.
const FRESH_WRITE_BYTES_MAX: u64 = 64 << 10;

/// A device read is at most this long (a run of units contiguous in the object and on the device).
const RUN_BYTES_MAX: u64 = 1 << 20;

/// Units of an object contiguous in the object and on the device, with their checksums.
struct Run {
    /// Object offset of the first unit.
    obj: u64,
    pau: u64,
    units: u64,
    csums: Vec<u32>,
}

/// Checks each 4 KiB block of `data` (read from device offset `at`) against its crc32c.
fn verify_blocks(at: u64, data: &[u8], csums: &[u32]) -> Result<(), StoreError> {
    assert_eq!(data.len() as u64, csums.len() as u64 * CSUM_BLOCK_BYTES);
    for (i, (block, &want)) in data.chunks(CSUM_BLOCK_BYTES as usize).zip(csums).enumerate() {
        let got = crc32c(block);
        if got != want {
            return Err(StoreError::Io(format!(
                "checksum mismatch at block offset {}: crc32c {got:#010x}, expected {want:#010x}",
                at + i as u64 * CSUM_BLOCK_BYTES
            )));
        }
    }
    Ok(())
}

/// An onode key and the version of its object, as listings read them.
type OnodeRow = (Vec<u8>, Option<Eversion>);

/// Merges committed rows (from `next_base`, in key order) with a layer's entries (in key order; an entry wins
/// over a committed row of the same key) into at most `max` results. `from_layer` returns `None` for an entry
/// that hides its key (a removed object, a removed omap key).
fn merge_over_base<K: Ord, B, L, T>(
    mut next_base: impl FnMut() -> Result<Option<(K, B)>, StoreError>,
    layer: impl IntoIterator<Item = (K, L)>,
    max: usize,
    from_base: impl Fn(K, B) -> T,
    from_layer: impl Fn(K, L) -> Option<T>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    let mut layer = layer.into_iter().peekable();
    let mut b = next_base()?;
    while out.len() < max {
        let take_layer = match (&b, layer.peek()) {
            (None, None) => break,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((bk, _)), Some((lk, _))) => lk <= bk,
        };
        if take_layer {
            let (k, l) = layer.next().expect("peeked");
            if b.as_ref().is_some_and(|(bk, _)| *bk == k) {
                b = next_base()?;
            }
            out.extend(from_layer(k, l));
        } else {
            let (k, v) = b.take().expect("checked");
            out.push(from_base(k, v));
            b = next_base()?;
        }
    }
    Ok(out)
}

fn set_usage(usage: &mut BTreeMap<PgId, PgUsage>, pg: PgId, u: PgUsage) {
    if u.objects == 0 {
        assert_eq!(u.bytes, 0, "an empty PG holds no bytes");
        usage.remove(&pg);
    } else {
        usage.insert(pg, u);
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last < 0xff {
            k.push(last + 1);
            return k;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// What a batch writes besides metadata.
#[derive(Default)]
struct Plan {
    /// Whole new units: (physical unit, bytes).
    fresh: Vec<(u64, Vec<u8>)>,
    deferred: Vec<DeferredWrite>,
    /// Units the batch stopped referencing.
    frees: BTreeSet<u64>,
    /// The metadata rows it changes, in order: its WAL record.
    rows: Vec<WalOp>,
}

fn put_row(rows: &mut Vec<WalOp>, table: TableId, key: &[u8], value: Vec<u8>) {
    rows.push(WalOp::Put { table, key: key.to_vec(), value });
}

fn del_row(rows: &mut Vec<WalOp>, table: TableId, key: &[u8]) {
    rows.push(WalOp::Del { table, key: key.to_vec() });
}

/// A committed table of byte keys and values, read with the memtable over it.
type MetaTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

impl Inner {
    /// Works a batch's layer out against the committed metadata (`mem` over `rtx`): the rows it changes and
    /// the data writes it plans. Reads each row at most once, so it needs no view of its own changes.
    fn materialize(
        &self,
        c: &mut Committer,
        mem: &Memtable,
        rtx: &ReadTransaction,
        layer: &Layer,
        usage: &[(PgId, PgUsage)],
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let onodes = rtx.open_table(ONODES).map_err(Self::db_err)?;
        let blobs = rtx.open_table(BLOBS).map_err(Self::db_err)?;
        let omap = rtx.open_table(OMAP).map_err(Self::db_err)?;
        let dmg = |e: records::RecordError| StoreError::Io(format!("metadata damaged: {e}"));
        // Whole PGs first: their entries in the layer all came after the removal.
        for pg in &layer.cleared {
            let prefix = pg_key(*pg);
            let end = prefix_end(&prefix);
            let mut doomed = Vec::new();
            let bounds = (Bound::Included(prefix.as_slice()), Bound::Excluded(end.as_slice()));
            for_rows(mem, &onodes, TableId::Onodes, bounds.0, bounds.1, |k, v| {
                doomed.push((k.to_vec(), Onode::decode(v).map_err(dmg)?.nid));
                Ok(true)
            })?;
            for (k, nid) in doomed {
                self.delete_object_data(c, mem, &blobs, &omap, nid, plan)?;
                del_row(&mut plan.rows, TableId::Onodes, &k);
            }
        }
        for (key, e) in &layer.objects {
            let pg = decode_pg_key(key).expect("our own key");
            let base = if layer.cleared.contains(&pg) {
                None
            } else {
                get_row(mem, &onodes, TableId::Onodes, key, Onode::decode)?.transpose().map_err(dmg)?
            };
            if !e.exists {
                if let Some(b) = base {
                    self.delete_object_data(c, mem, &blobs, &omap, b.nid, plan)?;
                    del_row(&mut plan.rows, TableId::Onodes, key);
                }
                continue;
            }
            let had_base = base.is_some();
            let (mut onode, old_size) = match base {
                Some(b) => {
                    let s = b.size;
                    (b, s)
                }
                None => {
                    c.nid_max += 1;
                    (Onode { nid: c.nid_max, ..Onode::default() }, 0)
                }
            };
            self.materialize_data(c, mem, &blobs, onode.nid, old_size, e, plan)?;
            if e.omap_cleared && had_base {
                self.delete_omap(c, mem, &omap, onode.nid, plan)?;
            }
            for (k, v) in &e.omap {
                let key = omap_key(onode.nid, k);
                // A new object, or one whose omap was just cleared, has no pair to replace.
                let old = if e.omap_cleared || !had_base {
                    None
                } else {
                    get_row(mem, &omap, TableId::Omap, &key, |v| v.len())?
                };
                match v {
                    Some(v) => {
                        c.omap_bytes += (k.len() + v.len()) as u64;
                        put_row(&mut plan.rows, TableId::Omap, &key, v.clone());
                    }
                    None => del_row(&mut plan.rows, TableId::Omap, &key),
                }
                if let Some(n) = old {
                    c.omap_bytes -= (k.len() + n) as u64;
                }
            }
            // A data-only change (the common small overwrite) leaves the onode as it is: not rewritten.
            if !had_base || onode.size != e.size || onode.version != e.version || onode.attrs != e.attrs {
                onode.size = e.size;
                onode.version = e.version;
                onode.attrs = e.attrs.clone();
                put_row(&mut plan.rows, TableId::Onodes, key, onode.encode());
            }
        }
        for (pg, u) in usage {
            let k = pg_key(*pg);
            if u.objects == 0 {
                del_row(&mut plan.rows, TableId::PgUsage, &k);
            } else {
                put_row(&mut plan.rows, TableId::PgUsage, &k, encode_usage(u.objects, u.bytes));
            }
        }
        Ok(())
    }

    fn delete_omap(
        &self,
        c: &mut Committer,
        mem: &Memtable,
        omap: &MetaTable,
        nid: u64,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let lo = nid.to_be_bytes();
        let hi = (nid + 1).to_be_bytes();
        let mut removed = 0u64;
        let bounds = (Bound::Included(lo.as_slice()), Bound::Excluded(hi.as_slice()));
        for_rows(mem, omap, TableId::Omap, bounds.0, bounds.1, |k, v| {
            removed += (k.len() - 8 + v.len()) as u64;
            del_row(&mut plan.rows, TableId::Omap, k);
            Ok(true)
        })?;
        c.omap_bytes -= removed;
        Ok(())
    }

    /// Drops an object's data map (freeing its units) and omap.
    fn delete_object_data(
        &self,
        c: &mut Committer,
        mem: &Memtable,
        blobs: &MetaTable,
        omap: &MetaTable,
        nid: u64,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let lo = blob_key(nid, 0);
        let hi = blob_key(nid, u64::MAX);
        let bounds = (Bound::Included(lo.as_slice()), Bound::Included(hi.as_slice()));
        for_rows(mem, blobs, TableId::Blobs, bounds.0, bounds.1, |k, v| {
            let blob = Blob::decode(v).map_err(|e| StoreError::Io(format!("metadata damaged: {e}")))?;
            for (pau, _) in blob.slots.iter().flatten() {
                self.free_unit(plan, *pau);
            }
            del_row(&mut plan.rows, TableId::Blobs, k);
            Ok(true)
        })?;
        self.delete_omap(c, mem, omap, nid, plan)
    }

    fn free_unit(&self, plan: &mut Plan, pau: u64) {
        let fresh = plan.frees.insert(pau);
        assert!(fresh, "unit {pau} freed twice in one batch");
    }

    /// Applies one object's data changes: frees what lies past its data limit or under whole zeroed units,
    /// rewrites the units its pieces touch (new units for new data and large whole-unit writes, deferred
    /// writes in place for the rest).
    fn materialize_data(
        &self,
        c: &mut Committer,
        mem: &Memtable,
        blobs: &MetaTable,
        nid: u64,
        old_size: u64,
        e: &ObjLayer,
        plan: &mut Plan,
    ) -> Result<(), StoreError> {
        let au = self.au;
        let limit = e.data_limit.min(old_size);
        // The units to look at: those with a piece, those at a zero's or the limit's ends, and every existing
        // unit past the limit or inside a zero.
        let mut units: BTreeSet<u64> = BTreeSet::new();
        for (&start, p) in &e.pieces {
            let end = start + p.len();
            match p {
                Piece::Data(_) => units.extend(start / au..end.div_ceil(au)),
                Piece::Zero(_) => {
                    units.insert(start / au);
                    units.insert((end - 1) / au);
                }
            }
        }
        if limit < old_size {
            units.insert(limit / au);
        }
        let mut loaded: BTreeMap<u64, Blob> = BTreeMap::new();
        let dmg = |e: records::RecordError| StoreError::Io(format!("metadata damaged: {e}"));
        // Existing blobs in the ranges that may drop units: past the limit, and under zeros.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        if limit < old_size {
            ranges.push((limit, old_size));
        }
        for (&start, p) in &e.pieces {
            if let Piece::Zero(n) = p {
                if start < old_size.min(limit) {
                    ranges.push((start, (start + n).min(old_size)));
                }
            }
        }
        for (from, to) in ranges {
            let lo = blob_key(nid, from / BLOB_BYTES);
            let hi = blob_key(nid, (to - 1) / BLOB_BYTES);
            let bounds = (Bound::Included(lo.as_slice()), Bound::Included(hi.as_slice()));
            for_rows(mem, blobs, TableId::Blobs, bounds.0, bounds.1, |k, v| {
                let (_, index) = records::decode_blob_key(k).map_err(dmg)?;
                let blob = Blob::decode(v).map_err(dmg)?;
                for (slot, s) in blob.slots.iter().enumerate() {
                    let u = index * (BLOB_BYTES / au) + slot as u64;
                    if s.is_some() && u * au + au > from && u * au < to {
                        units.insert(u);
                    }
                }
                loaded.insert(index, blob);
                Ok(true)
            })?;
        }
        let per_blob = BLOB_BYTES / au;
        for u in units {
            let index = u / per_blob;
            let slot = (u % per_blob) as usize;
            if let std::collections::btree_map::Entry::Vacant(v) = loaded.entry(index) {
                let blob = match get_row(mem, blobs, TableId::Blobs, &blob_key(nid, index), Blob::decode)? {
                    Some(b) => b.map_err(dmg)?,
                    None => Blob::empty(self.au_shift),
                };
                v.insert(blob);
            }
            let blob = loaded.get_mut(&index).expect("loaded above");
            let u0 = u * au;
            let existing = blob.slots[slot].clone();
            // Bytes of the unit that come from below: before the limit, if the unit exists.
            let below_to = limit.saturating_sub(u0).min(au);
            // Coverage by pieces, and whether any data lands.
            let mut covered = 0u64;
            let mut data = false;
            let mut big_whole = false;
            for (s, p) in e.pieces_in(u0, u0 + au) {
                covered += (s + p.len()).min(u0 + au) - s.max(u0);
                if let Piece::Data(b) = p {
                    data = true;
                    if s <= u0
                        && s + p.len() >= u0 + au
                        && b.len() as u64 >= self.opts.bluestore_prefer_deferred_size
                    {
                        big_whole = true;
                    }
                }
            }
            let keeps_below = existing.is_some() && below_to > 0 && covered < au;
            if !data && !keeps_below {
                // A hole now.
                if let Some((pau, _)) = existing {
                    self.free_unit(plan, pau);
                    blob.slots[slot] = None;
                }
                continue;
            }
            let mut buf = vec![0u8; au as usize];
            if keeps_below {
                let (pau, csums) = existing.as_ref().expect("checked");
                self.read_unit(*pau, csums, 0, below_to, &mut buf[..below_to as usize])?;
            }
            e.overlay(&mut buf, u0);
            // Bytes past the object's end stay zero (a later extension reads them as a hole).
            if e.size < u0 + au {
                buf[e.size.saturating_sub(u0) as usize..].fill(0);
            }
            assert!(u0 < e.size, "a unit with data lies within the object");
            let csums: Vec<u32> = buf.chunks(CSUM_BLOCK_BYTES as usize).map(crc32c).collect();
            // A large write of a whole unit goes to new space (when there is space): written once, directly.
            // Anything smaller is a deferred write, to a new unit or in place: its bytes go in the WAL record
            // (one flush for the batch), and in place later.
            let (pau, direct) = match &existing {
                None => {
                    let pau = c.alloc.allocate();
                    (
                        pau.ok_or_else(|| {
                            StoreError::NoSpace("allocator empty despite reservations".into())
                        })?,
                        big_whole,
                    )
                }
                Some((old, _)) => match big_whole.then(|| c.alloc.allocate()).flatten() {
                    Some(pau) => {
                        self.free_unit(plan, *old);
                        (pau, true)
                    }
                    None => (*old, false),
                },
            };
            if direct {
                plan.fresh.push((pau, buf));
            } else {
                let data = Bytes::from(buf);
                self.deferred_cache.write().insert(pau, data.clone());
                plan.deferred.push(DeferredWrite { offset: pau * au, data });
            }
            blob.slots[slot] = Some((pau, csums));
        }
        for (index, blob) in loaded {
            let k = blob_key(nid, index);
            if blob.is_empty() {
                del_row(&mut plan.rows, TableId::Blobs, &k);
            } else {
                put_row(&mut plan.rows, TableId::Blobs, &k, blob.encode());
            }
        }
        Ok(())
    }
}

impl ObjectStore for BlueStore {
    fn queue(&self, txn: &Transaction) -> Result<crate::store::CommitSeq, StoreError> {
        BlueStore::queue(self, txn).map(crate::store::CommitSeq)
    }

    fn committed(&self) -> crate::store::CommitSeq {
        crate::store::CommitSeq(BlueStore::committed(self))
    }

    fn set_commit_notifier(&self, f: crate::store::CommitNotifier) {
        BlueStore::set_commit_notifier(self, Box::new(move |seq| f(crate::store::CommitSeq(seq))));
    }

    fn failed(&self) -> Option<StoreError> {
        BlueStore::failed(self)
    }

    fn close(&self) {
        BlueStore::close(self)
    }

    fn wait_committed(&self, seq: crate::store::CommitSeq, timeout: Duration) -> Result<(), StoreError> {
        BlueStore::wait_committed(self, seq.0, timeout)
    }

    fn statfs(&self) -> rados::msg::OsdStatfs {
        let s = BlueStore::statfs(self);
        rados::msg::OsdStatfs {
            total: s.total,
            available: s.available,
            allocated: s.allocated,
            data_stored: s.stored,
            omap: s.omap,
            meta: s.meta,
        }
    }

    fn stat(&self, pg: PgId, name: &str) -> Result<ObjectStat, StoreError> {
        let mem = self.inner.gate.read();
        let rtx = self.inner.begin_read()?;
        let v = self.inner.view(&mem, &rtx, pg, name)?;
        assert!(v.exists);
        Ok(ObjectStat { size: v.size, version: v.version.unwrap_or(Eversion::ZERO) })
    }

    fn read(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.inner.read(pg, name, offset, len)
    }

    fn getattr(&self, pg: PgId, name: &str, attr: &str) -> Result<Bytes, StoreError> {
        let mem = self.inner.gate.read();
        let rtx = self.inner.begin_read()?;
        let v = self.inner.view(&mem, &rtx, pg, name)?;
        Inner::attrs_of(&v)
            .get(attr)
            .cloned()
            .ok_or_else(|| StoreError::NoAttr { oid: ObjectId::new(pg, name), name: attr.to_string() })
    }

    fn getattrs(&self, pg: PgId, name: &str) -> Result<Vec<(String, Bytes)>, StoreError> {
        let mem = self.inner.gate.read();
        let rtx = self.inner.begin_read()?;
        let v = self.inner.view(&mem, &rtx, pg, name)?;
        Ok(Inner::attrs_of(&v).iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn omap_get(&self, pg: PgId, name: &str, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut wanted: Vec<&String> = keys.iter().collect();
        wanted.sort();
        wanted.dedup();
        let mut out = Vec::new();
        // Each key is a one-pair range read: at most a few dozen keys per op.
        for k in wanted {
            if let Some(p) = self.inner.omap_one(pg, name, k)? {
                out.push(p);
            }
        }
        if keys.is_empty() {
            // Still report a missing object.
            let _ = self.stat(pg, name)?;
        }
        Ok(out)
    }

    fn omap_list(
        &self,
        pg: PgId,
        name: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.omap_range(pg, name, after, max)
    }

    fn list(&self, pg: PgId, after: Option<&str>, max: usize) -> Vec<ListEntry> {
        match self.inner.list(pg, after, max) {
            Ok(l) => l,
            Err(e) => {
                // The trait's listing cannot fail; a damaged or failing metadata device lists what it could
                // not read as absent, and says so.
                tracing::error!("bluestore list of {pg}: {e}");
                Vec::new()
            }
        }
    }

    fn list_pgs(&self) -> Vec<PgId> {
        self.inner.overlay.lock().usage.keys().copied().collect()
    }

    fn pg_usage(&self, pg: PgId) -> PgUsage {
        self.inner.overlay.lock().usage.get(&pg).copied().unwrap_or_default()
    }
}

impl Inner {
    /// The pair with key `key`, if set.
    fn omap_one(&self, pg: PgId, name: &str, key: &str) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let mem = self.gate.read();
        let rtx = self.begin_read()?;
        let view = self.view(&mem, &rtx, pg, name)?;
        for l in view.layers.iter().rev() {
            if let Some(v) = l.omap.get(key) {
                return Ok(v.clone().map(|v| (key.to_string(), v)));
            }
            if l.omap_cleared {
                return Ok(None);
            }
        }
        let Some(b) = &view.base else { return Ok(None) };
        let t = rtx.open_table(OMAP).map_err(Self::db_err)?;
        get_row(&mem, &t, TableId::Omap, &omap_key(b.nid, key), |v| (key.to_string(), v.to_vec()))
    }
}
