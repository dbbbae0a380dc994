//! Object stores: where an OSD keeps its objects, and the transactions that change them.
//!
//! An object is addressed by its PG and its name ([`ObjectId`]): PGs are the unit of peering and recovery, so a
//! store keeps each PG's objects together (a durable store will give each PG its own key range), and listing
//! one PG's objects in order is cheap. That order is Ceph's: by the name's placement hash, then by the name
//! ([`ListKey`]). An object has a size and data (sparse: holes read as zeros), a
//! version ([`Eversion`], the PG version of its last write), attributes (small named values) and an omap
//! (ordered key/value pairs).
//!
//! Every change goes through a [`Transaction`]: an ordered list of [`TxOp`]s applied all or nothing. Write
//! payloads and attribute values are not part of the serde-encoded ops: they travel beside them as raw
//! [`Bytes`] (see [`Transaction::to_wire`]), so replication sends the client's bytes without copying them through
//! serde.
//!
//! [`MemStore`] keeps everything in memory, in PG-sharded maps. What it deliberately is not: durable. A
//! restarted OSD with a MemStore comes back empty and recovers its PGs from its peers.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
// foldhash rather than std's SipHash: hashing object names (and rehashing a PG's growing object table) was
// 3.5 % of an OSD's CPU on 4 KiB writes of new objects.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use messenger::crc::{CrcBytes, CRC_BLOCK_BYTES};
use parking_lot::{RwLock, RwLockWriteGuard};
use serde::{Deserialize, Serialize};

use rados::ids::{Epoch, PgId};
use rados::msg::OsdStatfs;

/// MemStore keeps object data in pieces that never cross a multiple of this many bytes (a chunk), so a small
/// write into a large object touches one piece and a rewrite copies into memory the store already has.
pub const CHUNK_BYTES: u64 = 64 << 10;
/// Pieces one chunk may be split into before MemStore copies them into one buffer (see [`write_chunks`]).
const PIECES_PER_CHUNK_MAX: usize = 16;
/// PG maps MemStore spreads its lock over.
const MEMSTORE_SHARDS: usize = 16;
/// Most ops in one transaction: a client op is at most a few dozen, a recovery copy a few per attribute.
pub const TX_OPS_MAX: usize = 65_536;
/// How long [`ObjectStore::apply`] waits for its commit.
pub const APPLY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// An object's address: its PG and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId {
    pub pg: PgId,
    pub name: String,
}

impl ObjectId {
    pub fn new(pg: PgId, name: impl Into<String>) -> ObjectId {
        ObjectId { pg, name: name.into() }
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{:?}", self.pg, self.name)
    }
}

/// A PG version, as Ceph's `eversion_t`: the epoch of the interval whose primary assigned it, then a counter
/// that grows by one per write in the PG. Ordered by epoch first, so a write made by a newer primary always
/// sorts after anything a deposed primary may have done at the same counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Eversion {
    pub epoch: Epoch,
    pub v: u64,
}

impl Eversion {
    /// Before any write.
    pub const ZERO: Eversion = Eversion { epoch: Epoch(0), v: 0 };
}

impl Default for Eversion {
    fn default() -> Self {
        Eversion::ZERO
    }
}

impl std::fmt::Display for Eversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}'{}", self.epoch.0, self.v)
    }
}

/// One change. Ops that carry a payload (`Write`, `SetAttr`) take the next `len` bytes of the transaction's
/// payload, in op order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxOp {
    /// Creates the object if it does not exist.
    Touch { oid: ObjectId },
    /// Writes payload bytes at `offset`, creating the object and extending it as needed.
    Write { oid: ObjectId, offset: u64, len: u64 },
    /// Makes a range read as zeros (extends the object if the range ends past it). The object must exist.
    Zero { oid: ObjectId, offset: u64, len: u64 },
    /// Sets the size: shrinking drops data, growing adds a hole. The object must exist.
    Truncate { oid: ObjectId, size: u64 },
    /// Removes the object with its data, attributes and omap. The object must exist.
    Remove { oid: ObjectId },
    /// Sets an attribute to the next `len` payload bytes. The object must exist.
    SetAttr { oid: ObjectId, name: String, len: u64 },
    /// Removes an attribute, which must exist, as must the object.
    RmAttr { oid: ObjectId, name: String },
    /// Sets omap keys. The object must exist.
    OmapSet { oid: ObjectId, pairs: Vec<(String, Vec<u8>)> },
    /// Removes omap keys (missing keys are fine). The object must exist.
    OmapRm { oid: ObjectId, keys: Vec<String> },
    /// Removes every omap key. The object must exist.
    OmapClear { oid: ObjectId },
    /// Records the object's version. The object must exist.
    SetVersion { oid: ObjectId, version: Eversion },
    /// Removes every object of a PG (a deleted pool).
    RemovePg { pg: PgId },
}

impl TxOp {
    fn payload_len(&self) -> Option<u64> {
        match self {
            TxOp::Write { len, .. } | TxOp::SetAttr { len, .. } => Some(*len),
            _ => None,
        }
    }

    /// The object the op changes; `None` for an op on a whole PG.
    pub fn oid(&self) -> Option<&ObjectId> {
        match self {
            TxOp::Touch { oid }
            | TxOp::Write { oid, .. }
            | TxOp::Zero { oid, .. }
            | TxOp::Truncate { oid, .. }
            | TxOp::Remove { oid }
            | TxOp::SetAttr { oid, .. }
            | TxOp::RmAttr { oid, .. }
            | TxOp::OmapSet { oid, .. }
            | TxOp::OmapRm { oid, .. }
            | TxOp::OmapClear { oid }
            | TxOp::SetVersion { oid, .. } => Some(oid),
            TxOp::RemovePg { .. } => None,
        }
    }

    /// The PG the op changes.
    pub fn pg(&self) -> PgId {
        match self {
            TxOp::RemovePg { pg } => *pg,
            op => op.oid().expect("every other op names an object").pg,
        }
    }
}

/// An ordered list of changes applied atomically by [`ObjectStore::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    ops: Vec<TxOp>,
    /// One piece per payload-carrying op, in op order; `payload[i].len()` equals that op's `len`. Pieces keep
    /// the block crcs their receipt computed, which stored chunks inherit.
    payload: Vec<CrcBytes>,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn ops(&self) -> &[TxOp] {
        &self.ops
    }

    /// The payload pieces, one per payload-carrying op (`Write`, `SetAttr`), in op order.
    pub fn payload(&self) -> &[CrcBytes] {
        &self.payload
    }

    /// Total payload bytes (write data and attribute values).
    pub fn payload_bytes(&self) -> u64 {
        self.payload.iter().map(|b| b.len() as u64).sum()
    }

    pub fn touch(&mut self, oid: ObjectId) {
        self.ops.push(TxOp::Touch { oid });
    }

    pub fn write(&mut self, oid: ObjectId, offset: u64, data: impl Into<CrcBytes>) {
        let data = data.into();
        self.ops.push(TxOp::Write { oid, offset, len: data.len() as u64 });
        self.payload.push(data);
    }

    pub fn zero(&mut self, oid: ObjectId, offset: u64, len: u64) {
        self.ops.push(TxOp::Zero { oid, offset, len });
    }

    pub fn truncate(&mut self, oid: ObjectId, size: u64) {
        self.ops.push(TxOp::Truncate { oid, size });
    }

    pub fn remove(&mut self, oid: ObjectId) {
        self.ops.push(TxOp::Remove { oid });
    }

    pub fn setattr(&mut self, oid: ObjectId, name: String, value: Bytes) {
        self.ops.push(TxOp::SetAttr { oid, name, len: value.len() as u64 });
        self.payload.push(value.into());
    }

    pub fn rmattr(&mut self, oid: ObjectId, name: String) {
        self.ops.push(TxOp::RmAttr { oid, name });
    }

    pub fn omap_set(&mut self, oid: ObjectId, pairs: Vec<(String, Vec<u8>)>) {
        self.ops.push(TxOp::OmapSet { oid, pairs });
    }

    pub fn omap_rm(&mut self, oid: ObjectId, keys: Vec<String>) {
        self.ops.push(TxOp::OmapRm { oid, keys });
    }

    pub fn omap_clear(&mut self, oid: ObjectId) {
        self.ops.push(TxOp::OmapClear { oid });
    }

    pub fn set_version(&mut self, oid: ObjectId, version: Eversion) {
        self.ops.push(TxOp::SetVersion { oid, version });
    }

    pub fn remove_pg(&mut self, pg: PgId) {
        self.ops.push(TxOp::RemovePg { pg });
    }

    /// Appends another transaction's ops after this one's.
    pub fn append(&mut self, other: Transaction) {
        self.ops.extend(other.ops);
        self.payload.extend(other.payload);
    }

    /// The wire form: the ops (for serde) and the payload as one buffer. A single payload piece (the common
    /// case: one client write) is passed by reference, without a copy.
    pub fn to_wire(&self) -> (Vec<TxOp>, CrcBytes) {
        let data = match self.payload.len() {
            0 => CrcBytes::default(),
            1 => self.payload[0].clone(),
            _ => {
                let mut b = BytesMut::with_capacity(self.payload_bytes() as usize);
                for p in &self.payload {
                    b.extend_from_slice(p);
                }
                b.freeze().into()
            }
        };
        (self.ops.clone(), data)
    }

    /// The inverse of [`Transaction::to_wire`]: splits `data` among the payload-carrying ops, which must use
    /// it exactly.
    pub fn from_wire(ops: Vec<TxOp>, data: CrcBytes) -> Result<Transaction, StoreError> {
        if ops.len() > TX_OPS_MAX {
            return Err(StoreError::Invalid(format!(
                "{} ops in one transaction (max {TX_OPS_MAX})",
                ops.len()
            )));
        }
        let mut payload = Vec::new();
        let mut at: u64 = 0;
        for op in &ops {
            if let Some(len) = op.payload_len() {
                let end = at.checked_add(len).filter(|&e| e <= data.len() as u64).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "payload of {} bytes is shorter than its ops need",
                        data.len()
                    ))
                })?;
                payload.push(data.slice(at as usize..end as usize));
                at = end;
            }
        }
        if at != data.len() as u64 {
            return Err(StoreError::Invalid(format!("{} payload bytes left over", data.len() as u64 - at)));
        }
        Ok(Transaction { ops, payload })
    }
}

/// Why a store operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} does not exist")]
    NotFound(ObjectId),
    #[error("object {oid} has no attribute {name:?}")]
    NoAttr { oid: ObjectId, name: String },
    #[error("invalid: {0}")]
    Invalid(String),
    /// A durable store's device failed (never from MemStore).
    #[error("i/o error: {0}")]
    Io(String),
    /// A durable store's device has no room for the transaction's new data (never from MemStore). Nothing
    /// of the transaction was applied; deletes and overwrites in place still work.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A durable store's commit queue is full (never from MemStore): the submitter retries after a commit.
    #[error("busy: {0}")]
    Busy(String),
}

/// Size and version of one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub version: Eversion,
}

/// One object of a PG listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub name: String,
    pub version: Eversion,
}

/// What a PG holds (for the monitor's PG stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgUsage {
    pub objects: u64,
    pub bytes: u64,
}

/// Where a transaction stands in a store's commit order: transactions are numbered as they are queued, from 1
/// (0 is before any), and a store makes them durable in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitSeq(pub u64);

/// Called by a store after each group commit with the newest committed sequence; it runs on the store's commit
/// thread and must not block.
pub type CommitNotifier = Box<dyn Fn(CommitSeq) + Send + Sync>;

/// Where an OSD keeps its objects. Implementations are shared by the op threads: every method takes `&self`.
///
/// Changes are asynchronous, as BlueStore's `queue_transactions`: [`ObjectStore::queue`] applies a transaction
/// to what reads see at once and returns its [`CommitSeq`]; it is durable once [`ObjectStore::committed`] has
/// reached that number. Whoever acknowledges a change to anyone else (a client reply, a replica's answer to its
/// primary) waits for that, so an acknowledged write survives a crash; readers of changes not yet durable are
/// the caller's to hold back (a PG holds reads of objects with writes in flight).
pub trait ObjectStore: Send + Sync {
    /// Applies every op of `txn` in order, or none of them (an error changes nothing), to what reads see, and
    /// queues it to be made durable. Never waits for the disk: messenger threads call it.
    fn queue(&self, txn: &Transaction) -> Result<CommitSeq, StoreError>;
    /// Every transaction queued up to and including this one is durable.
    fn committed(&self) -> CommitSeq;
    /// Sets who hears of each group commit. A store that is durable as soon as it is queued (MemStore, whose
    /// durability is the process's life) never calls it.
    fn set_commit_notifier(&self, _f: CommitNotifier) {}
    /// Why the store stopped committing (a device error: nothing queued since may be acknowledged), if it did.
    fn failed(&self) -> Option<StoreError> {
        None
    }
    /// Makes everything queued durable and lets go of the store's files (the daemon calls it as it stops,
    /// after its threads). Afterwards the store refuses work. MemStore has nothing to close.
    fn close(&self) {}
    /// Waits up to `timeout` for `seq` to be durable. For tools, tests and start-up; never on a messenger
    /// thread.
    fn wait_committed(&self, seq: CommitSeq, timeout: std::time::Duration) -> Result<(), StoreError> {
        let deadline = std::time::Instant::now() + timeout;
        while self.committed() < seq {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Io(format!("commit {} not durable within {timeout:?}", seq.0)));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
    /// Queues `txn` and waits until it is durable: [`ObjectStore::queue`] plus [`ObjectStore::wait_committed`],
    /// for tools and tests. The OSD's op path never calls it.
    fn apply(&self, txn: &Transaction) -> Result<(), StoreError> {
        let seq = self.queue(txn)?;
        self.wait_committed(seq, APPLY_WAIT_MAX)
    }
    fn stat(&self, pg: PgId, name: &str) -> Result<ObjectStat, StoreError>;
    /// The bytes of `[offset, offset + len)` that lie within the object (fewer at its end; holes read as
    /// zeros).
    fn read(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Bytes, StoreError>;
    /// The same bytes as [`ObjectStore::read`], as a sequence of buffers that a store may hand out without
    /// copying them together (a reply sends them back to back).
    /// Parts carry the crcs a store knows of them.
    fn read_parts(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Vec<CrcBytes>, StoreError> {
        self.read(pg, name, offset, len).map(|b| vec![b.into()])
    }
    fn getattr(&self, pg: PgId, name: &str, attr: &str) -> Result<Bytes, StoreError>;
    fn getattrs(&self, pg: PgId, name: &str) -> Result<Vec<(String, Bytes)>, StoreError>;
    /// The values of those `keys` that are set, in key order.
    fn omap_get(&self, pg: PgId, name: &str, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Up to `max` pairs with keys after `after` (from the first with `None`), in key order.
    fn omap_list(
        &self,
        pg: PgId,
        name: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Up to `max` objects of `pg` that come after the one named `after` (from the first with `None`), in
    /// [`ListKey`] order. `after` need not exist. An unknown PG lists as empty.
    fn list(&self, pg: PgId, after: Option<&str>, max: usize) -> Vec<ListEntry>;
    /// Every PG that holds at least one object.
    fn list_pgs(&self) -> Vec<PgId>;
    fn pg_usage(&self, pg: PgId) -> PgUsage;
    /// Space: the device's size and what is used of it (reported to the monitor, `cuttle osd df`).
    fn statfs(&self) -> OsdStatfs;
}

// ---------------------------------------------------------------------------------------------------------------
// MemStore.

#[derive(Clone, Debug, Default)]
struct MemObject {
    size: u64,
    version: Option<Eversion>,
    /// Data by object offset: pieces that do not overlap and do not cross a multiple of `CHUNK_BYTES`;
    /// what no piece covers is a hole and reads as zeros. Usually one piece per chunk, starting at it.
    pieces: BTreeMap<u64, Piece>,
    attrs: BTreeMap<String, Bytes>,
    omap: BTreeMap<String, Vec<u8>>,
}

/// Stored bytes, with their crc32c when known: inherited from the received block a whole chunk was written
/// from, so that reading it back sends it without reading it for a checksum again.
#[derive(Clone, Debug)]
struct Piece {
    bytes: Bytes,
    crc: Option<u32>,
}

impl Piece {
    fn new(bytes: Bytes) -> Piece {
        Piece { bytes, crc: None }
    }

    fn end(&self, start: u64) -> u64 {
        start + self.bytes.len() as u64
    }
}

const _: () = assert!(CHUNK_BYTES as usize == CRC_BLOCK_BYTES, "chunks inherit the crcs of received blocks");

/// Where an object sits in its PG's listing: by the placement hash of its name, then by its name, as Ceph
/// orders a PG's objects (`hobject_t`). Every store lists in this order, so a listing cursor (the last name
/// seen) means the same on any replica. Comparing hashes first also spares an index the byte-by-byte
/// comparison of long shared prefixes (`benchmark_data_<host>_<pid>_object<N>`, `rbd_data.<id>.<N>`): with
/// the index in name order, those `memcmp`s were 1.3 % of an OSD's CPU on 4 KiB writes of new objects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListKey {
    pub hash: u32,
    pub name: String,
}

impl ListKey {
    pub fn new(name: &str) -> ListKey {
        ListKey { hash: rados::placement::object_hash(name.as_bytes()), name: name.to_owned() }
    }
}

/// One PG's objects: found by name (every op looks its object up), listed from a separate index kept in
/// step.
#[derive(Debug, Default)]
struct MemPg {
    objects: HashMap<String, MemObject>,
    index: BTreeSet<ListKey>,
    /// The sum of its objects' sizes. Wider than a size: sizes are logical (objects are sparse, and a replica
    /// takes whatever size its primary sets), so two objects may already add up past 2^64.
    bytes: u128,
}

impl MemPg {
    /// The object, created empty if it does not exist.
    fn entry(&mut self, name: &str) -> &mut MemObject {
        if !self.objects.contains_key(name) {
            self.index.insert(ListKey::new(name));
            self.objects.insert(name.to_owned(), MemObject::default());
        }
        self.objects.get_mut(name).expect("just made sure it exists")
    }

    fn remove(&mut self, name: &str) -> Option<MemObject> {
        let removed = self.objects.remove(name)?;
        self.index.remove(&ListKey::new(name));
        Some(removed)
    }
}

type Shard = HashMap<PgId, MemPg>;

/// Everything in memory. Locks are per shard of PGs, so op threads working on different PGs rarely meet.
#[derive(Debug)]
pub struct MemStore {
    shards: Vec<RwLock<Shard>>,
    /// Transactions applied so far (each is committed as soon as it is numbered).
    seq: AtomicU64,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

/// What the validation pass knows about one object while it walks a transaction.
#[derive(Default)]
struct Shadow {
    exists: bool,
    /// The stored object no longer counts (removed or re-created in this transaction): attributes are known
    /// only from `attrs`.
    fresh: bool,
    attrs: HashMap<String, bool>,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore {
            shards: (0..MEMSTORE_SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            seq: AtomicU64::new(0),
        }
    }

    /// Applies every op of `txn` in order, or none of them.
    fn apply_now(&self, txn: &Transaction) -> Result<(), StoreError> {
        if txn.ops.len() > TX_OPS_MAX {
            return Err(StoreError::Invalid(format!("{} ops in one transaction", txn.ops.len())));
        }
        let mut idx: Vec<usize> = txn.ops.iter().map(|op| Self::shard_of(op.pg())).collect();
        idx.sort_unstable();
        idx.dedup();
        // Locks are always taken in shard order, so two transactions never wait on each other in a cycle.
        let mut guards: HashMap<usize, RwLockWriteGuard<'_, Shard>> =
            idx.iter().map(|&i| (i, self.shards[i].write())).collect();
        Self::validate(txn, &guards)?;
        let mut payload = txn.payload.iter();
        for op in &txn.ops {
            let shard = guards.get_mut(&Self::shard_of(op.pg())).expect("locked above");
            Self::apply_op(shard, op, &mut payload);
        }
        assert!(payload.next().is_none(), "every payload piece belongs to an op");
        Ok(())
    }

    fn shard_of(pg: PgId) -> usize {
        use std::hash::BuildHasher;
        (foldhash::fast::FixedState::default().hash_one(pg) % MEMSTORE_SHARDS as u64) as usize
    }

    fn with_object<T>(
        &self,
        pg: PgId,
        name: &str,
        f: impl FnOnce(&MemObject) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let shard = self.shards[Self::shard_of(pg)].read();
        match shard.get(&pg).and_then(|p| p.objects.get(name)) {
            Some(o) => f(o),
            None => Err(StoreError::NotFound(ObjectId::new(pg, name))),
        }
    }

    /// Checks that every op of `txn` can apply, in order, without changing anything.
    fn validate(
        txn: &Transaction,
        guards: &HashMap<usize, RwLockWriteGuard<'_, Shard>>,
    ) -> Result<(), StoreError> {
        let mut shadows: HashMap<&ObjectId, Shadow> = HashMap::new();
        let mut cleared: HashSet<PgId> = HashSet::new();
        let stored = |oid: &ObjectId| -> Option<&MemObject> {
            guards[&Self::shard_of(oid.pg)].get(&oid.pg).and_then(|p| p.objects.get(&oid.name))
        };
        for op in &txn.ops {
            if let TxOp::RemovePg { pg } = op {
                cleared.insert(*pg);
                shadows.retain(|oid, _| oid.pg != *pg);
                continue;
            }
            let oid = op.oid().expect("RemovePg is handled above");
            let shadow = shadows.entry(oid).or_insert_with(|| {
                let exists = !cleared.contains(&oid.pg) && stored(oid).is_some();
                Shadow { exists, fresh: !exists, attrs: HashMap::new() }
            });
            let must_exist =
                |s: &Shadow| if s.exists { Ok(()) } else { Err(StoreError::NotFound(oid.clone())) };
            match op {
                TxOp::Touch { .. } => {
                    if !shadow.exists {
                        shadow.exists = true;
                        shadow.fresh = true;
                        shadow.attrs.clear();
                    }
                }
                TxOp::Write { offset, len, .. } => {
                    offset.checked_add(*len).ok_or_else(|| StoreError::Invalid("write past 2^64".into()))?;
                    if !shadow.exists {
                        shadow.exists = true;
                        shadow.fresh = true;
                        shadow.attrs.clear();
                    }
                }
                TxOp::Zero { offset, len, .. } => {
                    must_exist(shadow)?;
                    offset.checked_add(*len).ok_or_else(|| StoreError::Invalid("zero past 2^64".into()))?;
                }
                TxOp::Remove { .. } => {
                    must_exist(shadow)?;
                    shadow.exists = false;
                    shadow.fresh = true;
                    shadow.attrs.clear();
                }
                TxOp::SetAttr { name, .. } => {
                    must_exist(shadow)?;
                    shadow.attrs.insert(name.clone(), true);
                }
                TxOp::RmAttr { name, .. } => {
                    must_exist(shadow)?;
                    let present = match shadow.attrs.get(name.as_str()) {
                        Some(&p) => p,
                        None => !shadow.fresh && stored(oid).is_some_and(|o| o.attrs.contains_key(name)),
                    };
                    if !present {
                        return Err(StoreError::NoAttr { oid: oid.clone(), name: name.clone() });
                    }
                    shadow.attrs.insert(name.clone(), false);
                }
                TxOp::Truncate { .. }
                | TxOp::OmapSet { .. }
                | TxOp::OmapRm { .. }
                | TxOp::OmapClear { .. }
                | TxOp::SetVersion { .. } => must_exist(shadow)?,
                TxOp::RemovePg { .. } => unreachable!("handled above"),
            }
        }
        Ok(())
    }

    /// Applies one op that validation has accepted.
    fn apply_op(shard: &mut Shard, op: &TxOp, payload: &mut std::slice::Iter<'_, CrcBytes>) {
        if let TxOp::RemovePg { pg } = op {
            shard.remove(pg);
            return;
        }
        let pg = op.pg();
        let mpg = shard.entry(pg).or_default();
        let invariant = "validated: the object exists";
        match op {
            TxOp::Touch { oid } => {
                mpg.entry(&oid.name);
            }
            TxOp::Write { oid, offset, len } => {
                let data = payload.next().expect("validated: one payload piece per write");
                assert_eq!(data.len() as u64, *len);
                let o = mpg.entry(&oid.name);
                let before = o.size;
                write_chunks(o, *offset, data);
                o.size = o.size.max(offset + len);
                let after = o.size;
                mpg.bytes = mpg.bytes + u128::from(after) - u128::from(before);
            }
            TxOp::Zero { oid, offset, len } => {
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                let before = o.size;
                zero_chunks(o, *offset, *len);
                o.size = o.size.max(offset + len);
                mpg.bytes = mpg.bytes + u128::from(o.size) - u128::from(before);
            }
            TxOp::Truncate { oid, size } => {
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                let before = o.size;
                truncate_chunks(o, *size);
                o.size = *size;
                mpg.bytes = mpg.bytes - u128::from(before) + u128::from(o.size);
            }
            TxOp::Remove { oid } => {
                let o = mpg.remove(&oid.name).expect(invariant);
                mpg.bytes -= u128::from(o.size);
            }
            TxOp::SetAttr { oid, name, len } => {
                let value = payload.next().expect("validated: one payload piece per setattr");
                assert_eq!(value.len() as u64, *len);
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                // Copied: an attribute is small and may outlive the message buffer it arrived in by far.
                o.attrs.insert(name.clone(), Bytes::copy_from_slice(value));
            }
            TxOp::RmAttr { oid, name } => {
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                let had = o.attrs.remove(name);
                assert!(had.is_some(), "validated: the attribute exists");
            }
            TxOp::OmapSet { oid, pairs } => {
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                for (k, v) in pairs {
                    o.omap.insert(k.clone(), v.clone());
                }
            }
            TxOp::OmapRm { oid, keys } => {
                let o = mpg.objects.get_mut(&oid.name).expect(invariant);
                for k in keys {
                    o.omap.remove(k);
                }
            }
            TxOp::OmapClear { oid } => {
                mpg.objects.get_mut(&oid.name).expect(invariant).omap.clear();
            }
            TxOp::SetVersion { oid, version } => {
                mpg.objects.get_mut(&oid.name).expect(invariant).version = Some(*version);
            }
            TxOp::RemovePg { .. } => unreachable!("handled above"),
        }
        if mpg.objects.is_empty() {
            assert_eq!(mpg.bytes, 0, "an empty PG holds no bytes");
            shard.remove(&pg);
        }
    }
}

/// Stores `data`, chunk by chunk. A chunk written whole takes `data`'s bytes as they are (no copy) and keeps
/// the crc of the block it came from. A part of a chunk is copied: into the piece it falls in or extends,
/// in place, when the store alone holds that piece's buffer; else into a piece of its own, next to what is
/// left of the pieces it overlaps (slices of them, no copy). So a 4 KiB write into a chunk that a 4 MiB
/// write left in a shared receive buffer costs 4 KiB of new memory, not a copy of the whole chunk: that copy
/// and its 16 fresh pages made the first small write into each chunk cost 2.5x as much OSD CPU (`rbd bench`
/// 4 KiB random writes over an image just written with 4 MiB writes). A chunk split into more than
/// [`PIECES_PER_CHUNK_MAX`] pieces is copied into one buffer.
fn write_chunks(o: &mut MemObject, offset: u64, data: &CrcBytes) {
    let crcs = data.block_crcs();
    let mut pos = offset;
    let mut at: usize = 0;
    while at < data.len() {
        let chunk = pos - pos % CHUNK_BYTES;
        let within = (pos - chunk) as usize;
        let n = (CHUNK_BYTES as usize - within).min(data.len() - at);
        let stop = pos + n as u64;
        // `data[at..at + n]` is block `at / CHUNK_BYTES` of `data` exactly when it starts on a block boundary
        // of both and fills the chunk it leaves behind.
        let block_crc = match crcs {
            Some(crcs) if within == 0 && at.is_multiple_of(CRC_BLOCK_BYTES) => {
                Some(crcs[at / CRC_BLOCK_BYTES])
            }
            _ => None,
        };
        if n == CHUNK_BYTES as usize {
            // A whole chunk keeps the received bytes: they are already in memory the kernel faulted in for
            // them, and a copy costs a pass over them plus, on a first write, as many page faults again.
            // Measured on 4 MiB writes: `rados bench` OSD CPU per op -7 %, `rbd bench` sequential rewrites 865
            // -> 910 MB/s (the receive buffer a rewrite releases goes back to the messenger's pool for the
            // next one). A buffer stays alive while any piece taken from it does (like Ceph's MemStore keeping
            // its bufferptrs).
            punch(o, pos, stop);
            o.pieces.insert(pos, Piece { bytes: data.bytes().slice(at..at + n), crc: block_crc });
        } else {
            let src = &data[at..at + n];
            if !write_in_place(o, pos, src) {
                punch(o, pos, stop);
                let mut b = BytesMut::with_capacity(n);
                b.extend_from_slice(src);
                // A piece that starts a chunk and is shorter than one is `data`'s last block, whose crc it is.
                o.pieces.insert(pos, Piece { bytes: b.freeze(), crc: block_crc });
                bound_pieces(o, chunk);
            }
        }
        pos = stop;
        at += n;
    }
}

/// Writes `src` at `pos` into the piece that holds `pos` or ends right at it, if that piece's buffer is the
/// store's alone and no other piece starts where `src` goes (the range lies within one chunk). Rewrites and
/// appends then reuse memory the store already has: no allocation, no fresh pages.
fn write_in_place(o: &mut MemObject, pos: u64, src: &[u8]) -> bool {
    let stop = pos + src.len() as u64;
    let Some((&start, p)) = o.pieces.range(..=pos).next_back() else { return false };
    if p.end(start) < pos || (pos - pos % CHUNK_BYTES) != (start - start % CHUNK_BYTES) {
        return false;
    }
    if o.pieces.range(pos + 1..stop).next().is_some() {
        return false;
    }
    let p = o.pieces.get_mut(&start).expect("just found");
    let mut b = match std::mem::take(&mut p.bytes).try_into_mut() {
        Ok(b) => b,
        Err(shared) => {
            p.bytes = shared;
            return false;
        }
    };
    let within = (pos - start) as usize;
    let overlap = b.len().min(within + src.len()) - within;
    b[within..within + overlap].copy_from_slice(&src[..overlap]);
    b.extend_from_slice(&src[overlap..]);
    *p = Piece::new(b.freeze());
    true
}

/// Makes `[from, to)` a hole: pieces within it go, pieces across its ends keep what lies outside (slices,
/// no copy).
fn punch(o: &mut MemObject, from: u64, to: u64) {
    if from >= to {
        return;
    }
    if let Some((&start, p)) = o.pieces.range_mut(..from).next_back() {
        let end = p.end(start);
        if end > from {
            if end > to {
                let right = p.bytes.slice((to - start) as usize..);
                o.pieces.insert(to, Piece::new(right));
            }
            let p = o.pieces.get_mut(&start).expect("just found");
            p.bytes.truncate((from - start) as usize);
            p.crc = None;
        }
    }
    while let Some((&start, _)) = o.pieces.range(from..to).next() {
        let p = o.pieces.remove(&start).expect("just found");
        let end = p.end(start);
        if end > to {
            o.pieces.insert(to, Piece::new(p.bytes.slice((to - start) as usize..)));
        }
    }
}

/// The offsets of the chunk at `chunk`. Inclusive: the last chunk of the offset space ends at 2^64, which a
/// `u64` cannot hold (a replica applies what its primary sends, and a write may end at `u64::MAX`).
fn chunk_range(chunk: u64) -> std::ops::RangeInclusive<u64> {
    assert_eq!(chunk % CHUNK_BYTES, 0);
    chunk..=chunk + (CHUNK_BYTES - 1)
}

/// Copies the pieces of the chunk at `chunk` into one buffer if it has more than [`PIECES_PER_CHUNK_MAX`].
fn bound_pieces(o: &mut MemObject, chunk: u64) {
    if o.pieces.range(chunk_range(chunk)).count() > PIECES_PER_CHUNK_MAX {
        consolidate(o, chunk);
    }
}

/// Copies the pieces of the chunk at `chunk` into one buffer (holes between them as zeros).
fn consolidate(o: &mut MemObject, chunk: u64) {
    let pieces: Vec<(u64, Piece)> = {
        let keys: Vec<u64> = o.pieces.range(chunk_range(chunk)).map(|(&k, _)| k).collect();
        keys.into_iter().map(|k| (k, o.pieces.remove(&k).expect("just listed"))).collect()
    };
    let Some(end) = pieces.last().map(|(k, p)| p.end(*k)) else { return };
    let mut b = BytesMut::zeroed((end - chunk) as usize);
    for (k, p) in &pieces {
        let at = (k - chunk) as usize;
        b[at..at + p.bytes.len()].copy_from_slice(&p.bytes);
    }
    o.pieces.insert(chunk, Piece::new(b.freeze()));
}

fn zero_chunks(o: &mut MemObject, offset: u64, len: u64) {
    punch(o, offset, offset + len);
    // A hole inside a piece splits it in two: bound the chunks at the hole's ends.
    if len > 0 {
        bound_pieces(o, offset - offset % CHUNK_BYTES);
        let last = offset + len - 1;
        bound_pieces(o, last - last % CHUNK_BYTES);
    }
}

fn truncate_chunks(o: &mut MemObject, size: u64) {
    let _ = o.pieces.split_off(&size);
    if let Some((&start, p)) = o.pieces.range_mut(..size).next_back() {
        if p.end(start) > size {
            p.bytes.truncate((size - start) as usize);
            p.crc = None;
        }
    }
}

/// The bytes of `[offset, end)` of an object (`end` within its size), from its chunks.
/// `[offset, end)` of `o` in one buffer: a slice of its chunk when it lies in one, else a copy.
fn read_chunks(o: &MemObject, offset: u64, end: u64) -> Bytes {
    join(read_chunk_parts(o, offset, end))
}

/// Parts joined into one buffer, without a copy when there is just one.
fn join(parts: Vec<CrcBytes>) -> Bytes {
    match <[CrcBytes; 1]>::try_from(parts) {
        Ok([one]) => one.into_bytes(),
        Err(parts) => parts.iter().map(|p| &p[..]).collect::<Vec<_>>().concat().into(),
    }
}

/// Zeros that holes are read from without allocating.
static ZEROS: [u8; CHUNK_BYTES as usize] = [0; CHUNK_BYTES as usize];

/// `[offset, end)` of `o` as slices of its chunks, with holes as slices of [`ZEROS`]: no copy, no allocation
/// of the data. Whole chunks (and whole chunks of zeros) come with their crc.
fn read_chunk_parts(o: &MemObject, offset: u64, end: u64) -> Vec<CrcBytes> {
    assert!(offset <= end && end <= o.size);
    static ZEROS_CRC: OnceLock<u32> = OnceLock::new();
    let zeros = |parts: &mut Vec<CrcBytes>, mut n: u64| {
        while n > 0 {
            let k = n.min(CHUNK_BYTES);
            let z = Bytes::from_static(&ZEROS[..k as usize]);
            parts.push(match k == CHUNK_BYTES {
                true => CrcBytes::with_block_crcs(
                    z,
                    vec![*ZEROS_CRC.get_or_init(|| CrcBytes::new(Bytes::from_static(&ZEROS)).crc())],
                ),
                false => CrcBytes::new(z),
            });
            n -= k;
        }
    };
    let mut parts = Vec::new();
    if offset == end {
        return parts;
    }
    let mut at = offset;
    let before = o.pieces.range(..offset).next_back().filter(|(&start, p)| p.end(start) > offset);
    for (&start, p) in before.into_iter().chain(o.pieces.range(offset..end)) {
        let from = offset.max(start);
        let to = end.min(p.end(start));
        zeros(&mut parts, from - at);
        let piece = p.bytes.slice((from - start) as usize..(to - start) as usize);
        parts.push(match p.crc {
            Some(crc) if piece.len() == p.bytes.len() => CrcBytes::with_block_crcs(piece, vec![crc]),
            _ => CrcBytes::new(piece),
        });
        at = to;
    }
    zeros(&mut parts, end - at);
    parts
}

impl ObjectStore for MemStore {
    fn queue(&self, txn: &Transaction) -> Result<CommitSeq, StoreError> {
        self.apply_now(txn)?;
        // Durable as far as a MemStore ever is: numbered after it applied, so the number is committed at once.
        Ok(CommitSeq(self.seq.fetch_add(1, Ordering::AcqRel) + 1))
    }

    fn committed(&self) -> CommitSeq {
        CommitSeq(self.seq.load(Ordering::Acquire))
    }

    fn stat(&self, pg: PgId, name: &str) -> Result<ObjectStat, StoreError> {
        self.with_object(pg, name, |o| {
            Ok(ObjectStat { size: o.size, version: o.version.unwrap_or(Eversion::ZERO) })
        })
    }

    fn read(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.with_object(pg, name, |o| {
            let end = offset.saturating_add(len).min(o.size);
            if offset >= end {
                return Ok(Bytes::new());
            }
            Ok(read_chunks(o, offset, end))
        })
    }

    fn read_parts(&self, pg: PgId, name: &str, offset: u64, len: u64) -> Result<Vec<CrcBytes>, StoreError> {
        self.with_object(pg, name, |o| {
            let end = offset.saturating_add(len).min(o.size);
            Ok(read_chunk_parts(o, offset.min(end), end))
        })
    }

    fn getattr(&self, pg: PgId, name: &str, attr: &str) -> Result<Bytes, StoreError> {
        self.with_object(pg, name, |o| {
            o.attrs
                .get(attr)
                .cloned()
                .ok_or_else(|| StoreError::NoAttr { oid: ObjectId::new(pg, name), name: attr.to_string() })
        })
    }

    fn getattrs(&self, pg: PgId, name: &str) -> Result<Vec<(String, Bytes)>, StoreError> {
        self.with_object(pg, name, |o| Ok(o.attrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }

    fn omap_get(&self, pg: PgId, name: &str, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_object(pg, name, |o| {
            let mut out: Vec<(String, Vec<u8>)> =
                keys.iter().filter_map(|k| o.omap.get(k).map(|v| (k.clone(), v.clone()))).collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out.dedup_by(|a, b| a.0 == b.0);
            Ok(out)
        })
    }

    fn omap_list(
        &self,
        pg: PgId,
        name: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        use std::ops::Bound;
        self.with_object(pg, name, |o| {
            let lower = match after {
                Some(a) => Bound::Excluded(a.to_string()),
                None => Bound::Unbounded,
            };
            Ok(o.omap
                .range((lower, Bound::Unbounded))
                .take(max)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        })
    }

    fn list(&self, pg: PgId, after: Option<&str>, max: usize) -> Vec<ListEntry> {
        use std::ops::Bound;
        let shard = self.shards[Self::shard_of(pg)].read();
        let Some(mpg) = shard.get(&pg) else { return Vec::new() };
        let lower = match after {
            Some(a) => Bound::Excluded(ListKey::new(a)),
            None => Bound::Unbounded,
        };
        mpg.index
            .range((lower, Bound::Unbounded))
            .take(max)
            .map(|k| {
                let version = mpg.objects.get(&k.name).and_then(|o| o.version).unwrap_or(Eversion::ZERO);
                ListEntry { name: k.name.clone(), version }
            })
            .collect()
    }

    fn list_pgs(&self) -> Vec<PgId> {
        let mut pgs: Vec<PgId> =
            self.shards.iter().flat_map(|s| s.read().keys().copied().collect::<Vec<_>>()).collect();
        pgs.sort_unstable();
        pgs
    }

    fn pg_usage(&self, pg: PgId) -> PgUsage {
        let shard = self.shards[Self::shard_of(pg)].read();
        shard
            .get(&pg)
            // Saturating: the monitor's stats need no more than "a lot" for a PG of sparse giants.
            .map_or(PgUsage::default(), |p| PgUsage {
                objects: p.objects.len() as u64,
                bytes: u64::try_from(p.bytes).unwrap_or(u64::MAX),
            })
    }

    /// A MemStore has no device: its size is 0 (never full); data is what its PGs hold. Omap bytes are not
    /// counted (it would take a walk over every object).
    fn statfs(&self) -> OsdStatfs {
        let data: u128 = self.shards.iter().map(|s| s.read().values().map(|p| p.bytes).sum::<u128>()).sum();
        let data = u64::try_from(data).unwrap_or(u64::MAX);
        OsdStatfs { allocated: data, data_stored: data, ..OsdStatfs::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use messenger::crc::block_crcs;
    use rados::ids::PoolId;

    fn pg() -> PgId {
        PgId::new(PoolId(1), 7)
    }

    fn oid(name: &str) -> ObjectId {
        ObjectId::new(pg(), name)
    }

    fn read_all(s: &MemStore, name: &str) -> Vec<u8> {
        s.read(pg(), name, 0, u64::MAX).unwrap().to_vec()
    }

    #[test]
    fn writes_reads_holes_and_truncate_follow_a_model() {
        // Goal: MemStore's chunked data behaves like a plain byte vector. Method: a scripted mix of writes,
        // zeros and truncates across chunk boundaries, checked against a Vec<u8> model after each step.
        let s = MemStore::new();
        let mut model: Vec<u8> = Vec::new();
        let c = CHUNK_BYTES;
        let steps: Vec<(&str, u64, u64)> = vec![
            ("w", 10, 100),
            ("w", c - 5, 20),
            ("w", 3 * c, c),
            ("z", c - 2, 4),
            ("t", 2 * c + 7, 0),
            ("w", 2 * c, 3),
            ("z", 0, 5),
            ("t", 5 * c + 1, 0),
            ("w", 0, 2 * c + 9),
            ("w", c + 3, 5),
            ("w", 3 * c, 2 * c),
            ("w", 4 * c, 7),
            ("z", 3 * c, c),
            ("t", 3, 0),
            ("z", 1, 10),
        ];
        let mut held: Option<(Vec<CrcBytes>, Vec<u8>)> = None;
        let mut crcs_known = 0;
        for (i, (kind, off, len)) in steps.into_iter().enumerate() {
            // What an earlier read handed out never changes, even though later writes update chunks in place.
            if let Some((parts, then)) = held.take() {
                assert_eq!(parts.concat(), then, "step {i}: a read in flight saw a later write");
            }
            let mut t = Transaction::new();
            match kind {
                "w" => {
                    let data: Vec<u8> = (0..len).map(|j| (i as u64 * 31 + j) as u8 | 1).collect();
                    let end = (off + len) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                    // As a received message brings it: with its block crcs, which whole chunks inherit.
                    t.write(oid("a"), off, CrcBytes::computed(Bytes::from(data)));
                }
                "z" => {
                    let end = (off + len) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].fill(0);
                    t.zero(oid("a"), off, len);
                }
                _ => {
                    model.resize(off as usize, 0);
                    t.truncate(oid("a"), off);
                }
            }
            s.apply(&t).unwrap();
            assert_eq!(read_all(&s, "a"), model, "step {i} ({kind} {off} {len})");
            // The same bytes as parts, whole and from odd offsets across chunk and hole boundaries.
            for (off, len) in [(0, model.len() as u64), (1, c + 3), (c - 1, 2 * c), (2 * c + 5, 10 * c)] {
                let parts = s.read_parts(pg(), "a", off, len).unwrap();
                let from = (off as usize).min(model.len());
                let to = ((off + len) as usize).min(model.len());
                assert_eq!(parts.concat(), &model[from..to], "step {i}: parts of {off}+{len}");
                assert!(parts.iter().all(|p| !p.is_empty()), "no empty parts");
                for p in parts.iter().filter_map(|p| Some((p, p.block_crcs()?))) {
                    assert_eq!(
                        p.1,
                        &block_crcs(p.0)[..],
                        "step {i}: a stored crc no longer matches its chunk"
                    );
                    crcs_known += 1;
                }
            }
            if i % 2 == 0 {
                held = Some((s.read_parts(pg(), "a", 0, u64::MAX).unwrap(), model.clone()));
            }
            assert_eq!(s.stat(pg(), "a").unwrap().size, model.len() as u64);
            assert_eq!(s.pg_usage(pg()), PgUsage { objects: 1, bytes: model.len() as u64 });
        }
        assert!(crcs_known > 10, "whole chunks written whole keep their crcs");
        // Partial reads at odd offsets, and past the end.
        for (off, len) in [(0u64, 1u64), (2, 7), (5, 100), (9, 1000)] {
            let got = s.read(pg(), "a", off, len).unwrap();
            let from = (off as usize).min(model.len());
            let to = ((off + len) as usize).min(model.len());
            assert_eq!(&got[..], &model[from..to]);
        }
    }

    #[test]
    fn rewriting_part_of_a_chunk_nobody_holds_reuses_its_memory() {
        // Goal: partial overwrites do not allocate (fresh pages are what rewriting costs most on a VM). Method:
        // write a chunk, rewrite parts of it, and check the chunk still lives at the same address; then hold a
        // read and check the rewrite goes elsewhere and leaves the held bytes alone.
        let s = MemStore::new();
        let c = CHUNK_BYTES as usize;
        let write = |off: u64, v: u8, len: usize| {
            let mut t = Transaction::new();
            t.write(oid("a"), off, Bytes::from(vec![v; len]));
            s.apply(&t).unwrap();
        };
        let addr = || s.read_parts(pg(), "a", 0, c as u64).unwrap()[0].as_ptr();
        write(0, 1, c);
        write(1, 2, c - 1);
        let first = addr();
        write(10, 3, 50);
        write(0, 3, 10);
        write(60, 3, c - 60);
        assert_eq!(addr(), first, "partial rewrites in place");
        let held = s.read_parts(pg(), "a", 0, c as u64).unwrap();
        write(0, 4, 8);
        assert_ne!(addr(), first, "a held chunk is copied, not changed");
        assert!(held[0].iter().all(|&b| b == 3));
        assert_eq!(&s.read(pg(), "a", 0, 9).unwrap()[..], &[4, 4, 4, 4, 4, 4, 4, 4, 3]);
    }

    #[test]
    fn a_failing_op_leaves_nothing_applied() {
        // Goal: transactions are all or nothing. Method: a transaction whose last op fails (missing object,
        // missing attribute) after earlier ops that would succeed; the store must be unchanged.
        let s = MemStore::new();
        let mut t = Transaction::new();
        t.write(oid("a"), 0, Bytes::from_static(b"hello"));
        t.setattr(oid("a"), "k".into(), Bytes::from_static(b"v"));
        s.apply(&t).unwrap();

        let mut t = Transaction::new();
        t.write(oid("a"), 0, Bytes::from_static(b"HELLO world"));
        t.touch(oid("b"));
        t.omap_set(oid("b"), vec![("x".into(), b"1".to_vec())]);
        t.rmattr(oid("a"), "k".into());
        t.remove(oid("c"));
        assert_eq!(s.apply(&t), Err(StoreError::NotFound(oid("c"))));
        assert_eq!(read_all(&s, "a"), b"hello");
        assert!(s.stat(pg(), "b").is_err());
        assert_eq!(s.getattr(pg(), "a", "k").unwrap(), Bytes::from_static(b"v"));

        let mut t = Transaction::new();
        t.rmattr(oid("a"), "k".into());
        t.rmattr(oid("a"), "k".into());
        assert!(matches!(s.apply(&t), Err(StoreError::NoAttr { .. })));
        assert_eq!(s.getattr(pg(), "a", "k").unwrap(), Bytes::from_static(b"v"));

        // Removed then re-created in one transaction: the old attributes are gone for the checks too.
        let mut t = Transaction::new();
        t.remove(oid("a"));
        t.touch(oid("a"));
        t.rmattr(oid("a"), "k".into());
        assert!(matches!(s.apply(&t), Err(StoreError::NoAttr { .. })));
        assert_eq!(read_all(&s, "a"), b"hello");
    }

    #[test]
    fn attrs_omap_versions_and_listing() {
        // Goal: metadata ops and paginated listing. Method: build a few objects, read everything back.
        let s = MemStore::new();
        let mut t = Transaction::new();
        for name in ["c", "a", "b", "d"] {
            t.touch(oid(name));
            t.set_version(oid(name), Eversion { epoch: Epoch(3), v: name.as_bytes()[0] as u64 });
        }
        t.omap_set(oid("a"), vec![("k2".into(), b"2".to_vec()), ("k1".into(), b"1".to_vec())]);
        t.omap_set(oid("a"), vec![("k3".into(), b"3".to_vec())]);
        t.omap_rm(oid("a"), vec!["k2".into(), "nope".into()]);
        t.setattr(oid("b"), "x".into(), Bytes::from_static(b"xv"));
        s.apply(&t).unwrap();

        assert_eq!(s.stat(pg(), "b").unwrap().version, Eversion { epoch: Epoch(3), v: b'b' as u64 });
        assert_eq!(
            s.omap_get(pg(), "a", &["k3".into(), "k1".into(), "k2".into()]).unwrap(),
            vec![("k1".to_string(), b"1".to_vec()), ("k3".to_string(), b"3".to_vec())]
        );
        assert_eq!(s.omap_list(pg(), "a", Some("k1"), 10).unwrap(), vec![("k3".to_string(), b"3".to_vec())]);
        assert_eq!(s.getattrs(pg(), "b").unwrap(), vec![("x".to_string(), Bytes::from_static(b"xv"))]);
        assert!(matches!(s.getattr(pg(), "b", "y"), Err(StoreError::NoAttr { .. })));

        let names = |after: Option<&str>, max| -> Vec<String> {
            s.list(pg(), after, max).into_iter().map(|e| e.name).collect()
        };
        // Listed by name hash, then name: rjenkins gives "a" 0x29eec818, "d" 0x322f4a94, "c" 0x4fa4bedb,
        // "b" 0x54aca597.
        assert_eq!(names(None, 3), ["a", "d", "c"]);
        assert_eq!(names(Some("c"), 3), ["b"]);
        assert!(names(Some("b"), 3).is_empty());
        // A cursor need not exist: "z" (0x433ac680) sits between "d" and "c".
        assert_eq!(names(Some("z"), 10), ["c", "b"]);
        assert!(s.list(PgId::new(PoolId(9), 0), None, 10).is_empty());
        assert_eq!(s.list_pgs(), vec![pg()]);

        let mut t = Transaction::new();
        t.omap_clear(oid("a"));
        t.remove_pg(PgId::new(PoolId(9), 0));
        s.apply(&t).unwrap();
        assert!(s.omap_list(pg(), "a", None, 10).unwrap().is_empty());
        let mut t = Transaction::new();
        t.remove_pg(pg());
        s.apply(&t).unwrap();
        assert!(s.list_pgs().is_empty());
        assert_eq!(s.pg_usage(pg()), PgUsage::default());
    }

    #[test]
    fn wire_form_round_trips_and_rejects_bad_payloads() {
        // Goal: the ops/payload split survives the wire and a mismatched payload is refused. Method: encode,
        // decode, compare; then decode with too few and too many payload bytes.
        let mut t = Transaction::new();
        t.write(oid("a"), 4, Bytes::from_static(b"abc"));
        t.setattr(oid("a"), "n".into(), Bytes::from_static(b"vv"));
        t.write(oid("a"), 0, Bytes::from_static(b"z"));
        let (ops, data) = t.to_wire();
        assert_eq!(&data[..], b"abcvvz");
        let bytes = postcard::to_stdvec(&ops).unwrap();
        let ops2: Vec<TxOp> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(Transaction::from_wire(ops2.clone(), data.clone()).unwrap(), t);
        assert!(Transaction::from_wire(ops2.clone(), data.slice(0..5)).is_err());
        let mut longer = BytesMut::from(&data[..]);
        longer.extend_from_slice(b"!");
        assert!(Transaction::from_wire(ops2, longer.freeze().into()).is_err());

        // One payload piece goes by reference.
        let mut t = Transaction::new();
        let big = Bytes::from(vec![7u8; 1000]);
        t.write(oid("a"), 0, big.clone());
        assert_eq!(t.to_wire().1.as_ptr(), big.as_ptr());
    }

    #[test]
    fn writes_in_the_last_chunk_of_the_offset_space_apply() {
        // Found by the store_txn fuzz target: a write ending just below 2^64 (which validation accepts, and a
        // replica applies whatever its primary sends) overflowed computing where its chunk ends, and the
        // sizes of two such objects overflowed the PG's byte count. The fuzzer's transaction, as postcard
        // ops and 6 payload bytes with their crcs:
        let ops: Vec<TxOp> = postcard::from_bytes(&[
            6, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 11, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 6,
            255, 254, 254, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 251, 255, 255, 255, 255, 255, 255, 255, 255, 1, 1,
            0, 0, 0, 248, 60, 248,
        ])
        .unwrap();
        let t = Transaction::from_wire(ops, CrcBytes::computed(Bytes::from_static(b"abcdef"))).unwrap();
        let s = MemStore::new();
        s.apply(&t).unwrap();
        let fuzzed = PgId::new(PoolId(1), 1);
        let sizes: u128 =
            s.list(fuzzed, None, 10).iter().map(|e| u128::from(s.stat(fuzzed, &e.name).unwrap().size)).sum();
        assert_eq!(u128::from(s.pg_usage(fuzzed).bytes), sizes.min(u128::from(u64::MAX)));

        // The plain case: three bytes ending at u64::MAX, then a zero and a write beside them in that chunk.
        let end = u64::MAX - 3;
        let mut t = Transaction::new();
        t.write(oid("end"), end, Bytes::from_static(b"abc"));
        t.zero(oid("end"), end - 10, 5);
        t.write(oid("end"), end - 2, Bytes::from_static(b"z"));
        s.apply(&t).unwrap();
        assert_eq!(s.stat(pg(), "end").unwrap().size, u64::MAX);
        let mut t = Transaction::new();
        t.truncate(oid("big"), u64::MAX);
        t.touch(oid("big"));
        assert!(s.apply(&t).is_err(), "truncate before touch");
        let mut t = Transaction::new();
        t.touch(oid("big"));
        t.truncate(oid("big"), u64::MAX);
        s.apply(&t).unwrap();
        assert_eq!(s.pg_usage(pg()).bytes, u64::MAX, "two objects of 2^64 - 1 bytes saturate the PG's count");
        let mut t = Transaction::new();
        t.remove(oid("big"));
        s.apply(&t).unwrap();
        assert_eq!(s.pg_usage(pg()).bytes, u64::MAX, "and removing one leaves the other's size exactly");
        assert_eq!(&s.read(pg(), "end", end - 2, 10).unwrap()[..], b"z\0abc");
        check_pieces(&s, "end");
    }

    /// The piece layout's invariants: pieces are non-empty, do not overlap, do not cross a chunk boundary, lie
    /// within the object, and no chunk holds more than `PIECES_PER_CHUNK_MAX`.
    fn check_pieces(s: &MemStore, name: &str) {
        let shard = s.shards[MemStore::shard_of(pg())].read();
        let o = &shard[&pg()].objects[name];
        let mut prev_end = 0;
        let mut per_chunk: BTreeMap<u64, usize> = BTreeMap::new();
        for (&start, p) in &o.pieces {
            let end = p.end(start);
            assert!(start < end, "empty piece at {start}");
            assert!(start >= prev_end, "piece at {start} overlaps the one before");
            assert_eq!(start / CHUNK_BYTES, (end - 1) / CHUNK_BYTES, "piece {start}..{end} crosses a chunk");
            assert!(end <= o.size, "piece {start}..{end} past the size {}", o.size);
            *per_chunk.entry(start / CHUNK_BYTES).or_default() += 1;
            prev_end = end;
        }
        assert!(per_chunk.values().all(|&n| n <= PIECES_PER_CHUNK_MAX), "{per_chunk:?}");
    }

    #[test]
    fn random_writes_zeros_and_truncates_follow_a_model() {
        // Goal: the piece layout behaves like a plain byte vector under any mix of ops, and reads handed out
        // earlier never change. Method: 3000 seeded random ops (small, unaligned, whole-chunk and multi-chunk
        // writes as received messages bring them, zeros, truncates) on a 6-chunk object, checked against a
        // Vec<u8> after each op: whole and partial reads, stored crcs, the layout's invariants, held reads.
        let s = MemStore::new();
        let c = CHUNK_BYTES;
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut held: Vec<(Vec<CrcBytes>, Vec<u8>)> = Vec::new();
        for i in 0..3000u64 {
            let mut t = Transaction::new();
            let kind = next(10);
            let (off, len) = match next(4) {
                0 => (next(6) * c + next(16) * 4096, 4096),
                1 => (next(6 * c), 1 + next(3 * c)),
                2 => (next(6) * c, c * (1 + next(2))),
                _ => (next(6 * c), 1 + next(300)),
            };
            if kind < 7 {
                let data: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8 | 1).collect();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                t.write(oid("a"), off, CrcBytes::computed(Bytes::from(data)));
            } else if kind < 9 {
                if model.is_empty() {
                    continue;
                }
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].fill(0);
                t.zero(oid("a"), off, len);
            } else {
                let size = next(6 * c);
                if model.is_empty() {
                    continue;
                }
                model.resize(size as usize, 0);
                t.truncate(oid("a"), size);
            }
            s.apply(&t).unwrap();
            check_pieces(&s, "a");
            assert_eq!(read_all(&s, "a"), model, "op {i}");
            let (off, len) = (next(model.len() as u64 + 1), next(2 * c));
            let parts = s.read_parts(pg(), "a", off, len).unwrap();
            let to = ((off + len) as usize).min(model.len());
            assert_eq!(parts.concat(), &model[off as usize..to], "op {i}: parts of {off}+{len}");
            for p in parts.iter().filter_map(|p| Some((p, p.block_crcs()?))) {
                assert_eq!(p.1, &block_crcs(p.0)[..], "op {i}: a stored crc no longer matches its piece");
            }
            if i % 50 == 0 {
                held.push((s.read_parts(pg(), "a", 0, u64::MAX).unwrap(), model.clone()));
            }
        }
        for (parts, then) in held {
            assert_eq!(parts.concat(), then, "a read handed out earlier changed");
        }
    }

    #[test]
    fn a_small_write_into_a_chunk_written_whole_copies_only_itself() {
        // Goal: a 4 KiB write into a chunk that a large write left in its (shared) received buffer takes 4 KiB
        // of new memory, not a copy of the chunk. Method: write 4 chunks from one buffer, overwrite 4 KiB in
        // the middle of the second, and check that the rest of that chunk is still read from the first
        // buffer, and the new bytes from elsewhere.
        let s = MemStore::new();
        let c = CHUNK_BYTES as usize;
        let first = Bytes::from(vec![1u8; 4 * c]);
        let mut t = Transaction::new();
        t.write(oid("img"), 0, first.clone());
        s.apply(&t).unwrap();
        let mut t = Transaction::new();
        t.write(oid("img"), (c + 8192) as u64, Bytes::from(vec![2u8; 4096]));
        s.apply(&t).unwrap();
        let parts = s.read_parts(pg(), "img", c as u64, c as u64).unwrap();
        let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
        assert_eq!(lens, [8192, 4096, c - 12288], "the chunk is split, not copied");
        assert_eq!(parts[0].as_ptr(), first[c..].as_ptr(), "left of the write: the first buffer");
        assert_eq!(parts[2].as_ptr(), first[c + 12288..].as_ptr(), "right of it: the first buffer");
        assert!(parts[1].iter().all(|&b| b == 2));
        assert!(!first[c..].as_ptr_range().contains(&parts[1].as_ptr()), "the new bytes live elsewhere");
        check_pieces(&s, "img");

        // Many small writes into one chunk whose buffer a read holds: split up to the limit, then copied
        // into one buffer.
        let mut model = s.read(pg(), "img", 0, u64::MAX).unwrap().to_vec();
        let held = s.read_parts(pg(), "img", 0, u64::MAX).unwrap();
        for k in 0..40u64 {
            let off = 2 * c as u64 + k * 1500;
            let mut t = Transaction::new();
            t.write(oid("img"), off, Bytes::from(vec![3u8; 100]));
            s.apply(&t).unwrap();
            model[off as usize..off as usize + 100].fill(3);
            check_pieces(&s, "img");
        }
        assert_eq!(s.read(pg(), "img", 0, u64::MAX).unwrap(), model);
        assert!(held.concat().iter().all(|&b| b != 3), "the held read is unchanged");

        // Holes punched inside pieces split them too: bounded the same way.
        for k in 0..40u64 {
            let off = 3 * c as u64 + 7 + k * 1500;
            let mut t = Transaction::new();
            t.zero(oid("img"), off, 10);
            s.apply(&t).unwrap();
            model[off as usize..off as usize + 10].fill(0);
            check_pieces(&s, "img");
        }
        assert_eq!(s.read(pg(), "img", 0, u64::MAX).unwrap(), model);
    }

    #[test]
    fn only_whole_chunk_writes_keep_the_written_buffer() {
        // Goal: writes of whole chunks keep the received bytes (no copy); writes of parts of chunks copy and
        // release their buffer (a slice of the messenger's receive buffer) once applied, so the messenger can
        // reuse it. Method: check who else holds the written buffers after apply.
        let s = MemStore::new();
        let c = CHUNK_BYTES as usize;
        let apply = |name: &str, off: u64, data: &Bytes| {
            let mut t = Transaction::new();
            t.write(oid(name), off, data.clone());
            s.apply(&t).unwrap();
        };
        let first = Bytes::from(vec![9u8; 2 * c]);
        apply("big", 0, &first);
        assert!(!first.is_unique(), "new whole chunks keep the written bytes");
        assert_eq!(s.read(pg(), "big", CHUNK_BYTES, CHUNK_BYTES).unwrap().as_ptr(), first[c..].as_ptr());
        let rewrite = Bytes::from(vec![8u8; 2 * c]);
        apply("big", 0, &rewrite);
        assert!(!rewrite.is_unique(), "a whole-chunk rewrite keeps the new bytes");
        assert!(first.is_unique(), "and the first buffer is released once no chunk uses it");
        assert!(s.read(pg(), "big", 0, 2 * CHUNK_BYTES).unwrap().iter().all(|&b| b == 8));
        for (name, off, len, kept) in
            [("part", 0, c / 2, false), ("unaligned", 5, c, false), ("tail", 0, c + 1, true)]
        {
            let data = Bytes::from(vec![7u8; len]);
            apply(name, off, &data);
            assert_eq!(!data.is_unique(), kept, "{name}: only whole new chunks are kept");
            assert!(s.read(pg(), name, off, len as u64).unwrap().iter().all(|&b| b == 7), "{name}");
        }
    }
}
