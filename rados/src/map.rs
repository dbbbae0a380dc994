//! The OSD map: which OSDs exist, where they listen, whether they are up, in and full, and which pools exist.
//!
//! As in Ceph, every change makes a new epoch, exactly one greater than the last. The monitor publishes each
//! change as an [`Incremental`]; daemons and clients apply incrementals in order with [`OsdMap::apply`] and
//! fetch a full map only to catch up from nothing. Unlike Ceph there is no separate CRUSH map: the placement
//! hierarchy is fixed at root, host, OSD, and each OSD names its host in [`OsdInfo::host`] (see
//! `placement`).
//!
//! # Encoding
//!
//! [`OsdMap::encode`] and [`Incremental::encode`] produce one version byte ([`OsdMap::ENCODING_VERSION`],
//! [`Incremental::ENCODING_VERSION`]) followed by the postcard encoding of the struct, fields in declaration
//! order: integers as LEB128 varints, `bool` as one byte 0 or 1, `Option` as a byte 0 or 1 then the value,
//! strings and maps as a varint length then the items (maps in ascending key order), [`Fsid`] as 16 raw bytes,
//! a `SocketAddr` as a varint variant (0 = V4, 1 = V6) then the raw address bytes and the port as a varint
//! (a V6 scope id and flow info are not carried). Pinned test vectors at the bottom of this file fail if any of
//! that changes; a deliberate change must bump the version byte.
//!
//! Versions: 1 had no upmap exceptions; 2 appends [`OsdMap::pg_upmap_items`] to the map and
//! [`Incremental::new_pg_upmap_items`], [`Incremental::old_pg_upmap_items`] to the incremental (a tuple is
//! its fields in order, a `Vec` a varint length then the items); 3 appends [`OsdMap::full_osds`] to the map
//! and [`Incremental::new_full_osds`], [`Incremental::old_full_osds`] to the incremental (a set is a varint
//! length then the items in ascending order). Decoding reads all three, because the monitor's store holds
//! maps and incrementals written by older builds; a version 1 value decodes with no upmaps, versions 1 and 2
//! with no full OSDs. Encoding writes only the newest version: every daemon of a cluster runs the same build.
//!
//! Decoding checks the version, the size limit, that no bytes trail the value, and the same invariants
//! [`OsdMap::validate`] checks, so a decoded value is as trustworthy as one built locally.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, Fsid, OsdId, PgId, PoolId};

/// Weight 1.0 in the 16.16 fixed point of [`OsdInfo::weight`] (Ceph's `CEPH_OSD_IN`).
pub const WEIGHT_ONE: u32 = 0x1_0000;

/// Most replicas a pool may ask for (Ceph's practical ceiling; placement cost grows with it).
pub const POOL_SIZE_MAX: u8 = 10;
/// Most PGs a pool may have (Ceph's `mon_max_pool_pg_num`).
pub const POOL_PG_NUM_MAX: u32 = 65_536;
/// Longest pool name, in bytes of UTF-8.
pub const POOL_NAME_BYTES_MAX: usize = 255;
/// Longest host name, in bytes of UTF-8 (the DNS limit).
pub const HOST_NAME_BYTES_MAX: usize = 255;
/// Most OSDs in one map. Ceph's largest published clusters have ~10k OSDs.
pub const OSDS_MAX: usize = 16_384;
/// Most pools in one map.
pub const POOLS_MAX: usize = 4_096;
/// Most PGs with upmap exceptions in one map (and in one field of an incremental). Ceph has no such limit;
/// ours keeps a valid map within [`MAP_BYTES_MAX`]. The balancer stops adding exceptions at this count.
pub const PG_UPMAPS_MAX: usize = 16_384;
/// Largest encoded map or incremental (Ceph's `osd_map_message_max_bytes`). A full map that passes
/// [`OsdMap::validate`] always fits; see the compile-time check below.
pub const MAP_BYTES_MAX: usize = 10 << 20;

// Worst-case encoded sizes, from the postcard rules in the module doc: a u32 varint takes at most 5 bytes, a
// length varint below 2^14 at most 2, a V6 `SocketAddr` 1 + 16 + 3.
const SOCKET_ADDR_BYTES_MAX: usize = 1 + 16 + 3;
const OSD_ENTRY_BYTES_MAX: usize =
    5 + (1 + 4 * SOCKET_ADDR_BYTES_MAX) + 1 + 1 + 5 + (2 + HOST_NAME_BYTES_MAX);
const POOL_ENTRY_BYTES_MAX: usize = 5 + 5 + (2 + POOL_NAME_BYTES_MAX) + 1 + 1 + 5;
// PG id, item count, at most POOL_SIZE_MAX (from, to) pairs.
const UPMAP_ENTRY_BYTES_MAX: usize = 5 + 5 + 1 + POOL_SIZE_MAX as usize * (5 + 5);
const _: () = assert!(
    1 + 16
        + 5
        + 3
        + OSDS_MAX * OSD_ENTRY_BYTES_MAX
        + 3
        + POOLS_MAX * POOL_ENTRY_BYTES_MAX
        + 3
        + PG_UPMAPS_MAX * UPMAP_ENTRY_BYTES_MAX
        // The full OSDs: each one of the map's OSDs, so at most OSDS_MAX ids.
        + 3
        + OSDS_MAX * 5
        <= MAP_BYTES_MAX,
    "a valid OsdMap must always encode within MAP_BYTES_MAX"
);

/// The cluster map of OSDs and pools at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMap {
    /// The cluster this map belongs to.
    pub fsid: Fsid,
    /// The version of this map; 0 for the empty map before the first incremental.
    pub epoch: Epoch,
    /// Every OSD the cluster knows, booted or not.
    pub osds: BTreeMap<OsdId, OsdInfo>,
    /// Every pool, keyed by its own id.
    pub pools: BTreeMap<PoolId, Pool>,
    /// Ceph's `pg_upmap_items`: per PG, `(from, to)` pairs that placement applies after straw2, in order,
    /// replacing `from` with `to` where that is valid (see `placement::Placement::raw_osds`). The balancer
    /// (`balancer`) writes them to even out PGs per OSD; entries of a PG that no longer exists are dropped
    /// by [`OsdMap::apply`]. Every entry is [`valid_upmap_items`].
    pub pg_upmap_items: BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    /// Ceph's `CEPH_OSD_FULL` state: OSDs whose stores reached `mon_osd_full_ratio` when they last reported,
    /// as the monitor judged. A primary refuses writes that add data to a PG whose acting set holds one, so
    /// that no replica is sent a write it has no room for. Every entry is an OSD of [`OsdMap::osds`].
    pub full_osds: BTreeSet<OsdId>,
}

/// What the map says about one OSD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdInfo {
    /// Where the OSD listens. `None` until its first boot; kept (stale) while it is down, as Ceph does, so
    /// that "last seen at" stays visible.
    pub addrs: Option<OsdAddrs>,
    /// The OSD is running and reachable: it may serve I/O. A down OSD keeps its PGs until it is marked out.
    pub up: bool,
    /// The OSD takes part in placement. `in` is a Rust keyword, hence the underscore.
    #[serde(rename = "in")]
    pub in_: bool,
    /// Placement weight, 16.16 fixed point ([`WEIGHT_ONE`] = 1.0), usually proportional to capacity.
    /// 0 keeps the OSD out of placement even if it is in.
    pub weight: u32,
    /// The failure domain: placement puts the replicas of a PG on distinct hosts when it can.
    pub host: String,
}

/// The four endpoints of a booted OSD, as Ceph separates them: clients, replication, and the two heartbeat
/// networks (front shares the public network, back the cluster network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdAddrs {
    /// Clients and monitors connect here.
    pub public: SocketAddr,
    /// Peer OSDs replicate and recover here.
    pub cluster: SocketAddr,
    /// Heartbeats on the public network.
    pub hb_front: SocketAddr,
    /// Heartbeats on the cluster network.
    pub hb_back: SocketAddr,
}

/// A replicated pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The pool's id; equal to its key in [`OsdMap::pools`].
    pub id: PoolId,
    /// Unique among the map's pools.
    pub name: String,
    /// Replicas per object, 1..=[`POOL_SIZE_MAX`].
    pub size: u8,
    /// A PG serves I/O only with at least this many replicas up, 1..=`size`.
    pub min_size: u8,
    /// PGs in the pool, 1..=[`POOL_PG_NUM_MAX`]; need not be a power of two (see `placement::stable_mod`).
    pub pg_num: u32,
}

/// The difference between one map epoch and the next.
///
/// Applied in this order: `new_osds` are created, `osd_changes` are applied (they may touch OSDs created in
/// the same incremental), `removed_osds` are deleted, `new_pools` are created or replaced wholesale (a pool's
/// `pg_num` or `size` change is a replacement), `removed_pools` are deleted, `old_pg_upmap_items` are
/// removed, the upmaps of PGs that no longer exist (pool removed, seed beyond a new `pg_num`) are dropped,
/// `new_pg_upmap_items` are set, each for a PG that exists, then `old_full_osds` are cleared and
/// `new_full_osds` marked. A removed OSD leaves the full set with the map. An id may not be both created or
/// changed (marked or cleared full included) and removed in one incremental.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    /// Must match the map's.
    pub fsid: Fsid,
    /// The epoch the map has after applying this: the map's epoch plus one.
    pub epoch: Epoch,
    /// OSDs that did not exist before.
    pub new_osds: BTreeMap<OsdId, OsdInfo>,
    /// State changes of existing OSDs.
    pub osd_changes: BTreeMap<OsdId, OsdChange>,
    /// OSDs purged from the map.
    pub removed_osds: BTreeSet<OsdId>,
    /// Pools created or replaced.
    pub new_pools: BTreeMap<PoolId, Pool>,
    /// Pools deleted.
    pub removed_pools: BTreeSet<PoolId>,
    /// Upmap exceptions set or replaced wholesale (Ceph's `new_pg_upmap_items`).
    pub new_pg_upmap_items: BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    /// PGs whose upmap exceptions are removed (Ceph's `old_pg_upmap_items`); each must have some.
    pub old_pg_upmap_items: BTreeSet<PgId>,
    /// OSDs marked full; each must exist once the OSDs are created and removed (one already full stays so).
    pub new_full_osds: BTreeSet<OsdId>,
    /// OSDs no longer full; each must be full.
    pub old_full_osds: BTreeSet<OsdId>,
}

/// The fields of one OSD that an incremental changes; `None` leaves a field as it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdChange {
    /// Mark up (boot) or down (failure).
    pub up: Option<bool>,
    /// Mark in or out.
    #[serde(rename = "in")]
    pub in_: Option<bool>,
    /// New 16.16 weight.
    pub weight: Option<u32>,
    /// New addresses, set at boot. Addresses are never cleared, only replaced.
    pub addrs: Option<OsdAddrs>,
    /// New host (the OSD's disk moved).
    pub host: Option<String>,
}

/// A map or incremental that breaks an invariant, wherever it came from.
#[allow(missing_docs)] // The fields are the data of the variant's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMap {
    /// `pools` holds a pool under another pool's id.
    #[error("pool stored under id {key} says its id is {id}")]
    PoolKeyMismatch { key: PoolId, id: PoolId },
    /// `size` out of range.
    #[error("pool {pool}: size {size} not in 1..={POOL_SIZE_MAX}")]
    PoolSize { pool: PoolId, size: u8 },
    /// `min_size` out of range.
    #[error("pool {pool}: min_size {min_size} not in 1..={size} (size)")]
    PoolMinSize { pool: PoolId, min_size: u8, size: u8 },
    /// `pg_num` out of range.
    #[error("pool {pool}: pg_num {pg_num} not in 1..={POOL_PG_NUM_MAX}")]
    PoolPgNum { pool: PoolId, pg_num: u32 },
    /// Empty or overlong pool name.
    #[error("pool {pool}: name empty or longer than {POOL_NAME_BYTES_MAX} bytes")]
    PoolName { pool: PoolId },
    /// Two pools share a name, so lookups by name would be ambiguous.
    #[error("pools {first} and {second} are both named {name:?}")]
    PoolNameDuplicate { name: String, first: PoolId, second: PoolId },
    /// An up OSD must be reachable.
    #[error("{osd} is up but has no addresses")]
    UpWithoutAddrs { osd: OsdId },
    /// Empty or overlong host name.
    #[error("{osd}: host name empty or longer than {HOST_NAME_BYTES_MAX} bytes")]
    HostName { osd: OsdId },
    /// More OSDs than [`OSDS_MAX`] (in a map, or in one field of an incremental).
    #[error("{count} OSDs, more than {OSDS_MAX}")]
    TooManyOsds { count: usize },
    /// More pools than [`POOLS_MAX`] (in a map, or in one field of an incremental).
    #[error("{count} pools, more than {POOLS_MAX}")]
    TooManyPools { count: usize },
    /// An incremental both creates and removes an OSD.
    #[error("{osd} is both created and removed")]
    OsdCreatedAndRemoved { osd: OsdId },
    /// An incremental both changes and removes an OSD.
    #[error("{osd} is both changed and removed")]
    OsdChangedAndRemoved { osd: OsdId },
    /// An incremental both creates and removes a pool.
    #[error("pool {pool} is both created and removed")]
    PoolCreatedAndRemoved { pool: PoolId },
    /// More PGs with upmap exceptions than [`PG_UPMAPS_MAX`] (in a map, or in one field of an incremental).
    #[error("{count} PGs with upmap items, more than {PG_UPMAPS_MAX}")]
    TooManyUpmaps { count: usize },
    /// An upmap entry that is empty, longer than [`POOL_SIZE_MAX`], maps an OSD to itself, or names an OSD
    /// twice as `from` or twice as `to`.
    #[error("PG {pg}: malformed upmap items")]
    UpmapItems { pg: PgId },
    /// A map holds, or an incremental sets, upmap items for a PG its pools do not have.
    #[error("upmap items for PG {pg}, which does not exist")]
    UpmapUnknownPg { pg: PgId },
    /// An incremental both sets and removes a PG's upmap items.
    #[error("PG {pg}: upmap items both set and removed")]
    UpmapSetAndRemoved { pg: PgId },
    /// A map marks full an OSD it does not have.
    #[error("{osd} is marked full but does not exist")]
    FullUnknownOsd { osd: OsdId },
    /// An incremental both marks an OSD full and clears it.
    #[error("{osd} is both marked full and cleared")]
    FullSetAndCleared { osd: OsdId },
}

/// Why [`OsdMap::apply`] refused an incremental. The map is unchanged after any of these.
#[allow(missing_docs)] // The fields are the data of the variant's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The incremental belongs to another cluster.
    #[error("incremental for cluster {incremental} applied to map of cluster {map}")]
    FsidMismatch { map: Fsid, incremental: Fsid },
    /// The incremental does not produce the next epoch: a gap (we missed one) or a replay.
    #[error("incremental to {incremental} applied to map at {map}")]
    EpochNotNext { map: Epoch, incremental: Epoch },
    /// `new_osds` names an OSD the map already has.
    #[error("{0} created but already exists")]
    OsdExists(OsdId),
    /// `osd_changes`, `removed_osds` or `new_full_osds` names an OSD the map does not have.
    #[error("{0} changed or removed but does not exist")]
    UnknownOsd(OsdId),
    /// `old_full_osds` names an OSD that is not full.
    #[error("{0} cleared of full but is not full")]
    NotFull(OsdId),
    /// `removed_pools` names a pool the map does not have.
    #[error("pool {0} removed but does not exist")]
    UnknownPool(PoolId),
    /// `old_pg_upmap_items` names a PG that has no upmap items.
    #[error("upmap items of PG {0} removed but there are none")]
    UnknownUpmap(PgId),
    /// The incremental, or the map it would produce, breaks an invariant.
    #[error(transparent)]
    Invalid(#[from] InvalidMap),
}

/// Why a map or incremental could not be encoded or decoded.
#[allow(missing_docs)] // The fields are the data of the variant's message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Input or output longer than [`MAP_BYTES_MAX`].
    #[error("{len} bytes, more than the limit of {MAP_BYTES_MAX}")]
    TooLarge { len: usize },
    /// No version byte.
    #[error("empty input")]
    Empty,
    /// Written by a build with another encoding.
    #[error("encoding version {got}, this build reads versions 1 to {supported}")]
    Version { got: u8, supported: u8 },
    /// The body is not a valid postcard encoding of the type.
    #[error("malformed body: {0}")]
    Postcard(#[from] postcard::Error),
    /// Bytes left over after the value: a framing bug on one side or the other.
    #[error("{0} bytes trail the encoded value")]
    TrailingBytes(usize),
    /// Well formed, but breaks an invariant.
    #[error(transparent)]
    Invalid(#[from] InvalidMap),
}

impl OsdMap {
    /// Version byte written before the body; bump it whenever the body's encoding changes.
    pub const ENCODING_VERSION: u8 = 3;

    /// The empty map at epoch 0, before the monitor has committed anything. The first incremental makes
    /// epoch 1.
    pub fn new(fsid: Fsid) -> OsdMap {
        OsdMap {
            fsid,
            epoch: Epoch(0),
            osds: BTreeMap::new(),
            pools: BTreeMap::new(),
            pg_upmap_items: BTreeMap::new(),
            full_osds: BTreeSet::new(),
        }
    }

    /// An empty incremental on top of this map, to be filled in by the monitor.
    pub fn incremental(&self) -> Incremental {
        // Reaching 2^32 epochs takes 136 years at one map change per second; if it happens anyway the map
        // cannot move forward and stopping loudly is the only safe option.
        let epoch = self.epoch.checked_next().expect("OsdMap epoch counter exhausted");
        Incremental::new(self.fsid, epoch)
    }

    /// Whether `osd` exists and is up.
    pub fn is_up(&self, osd: OsdId) -> bool {
        self.osds.get(&osd).is_some_and(|info| info.up)
    }

    /// Whether `osd` exists and is in.
    pub fn is_in(&self, osd: OsdId) -> bool {
        self.osds.get(&osd).is_some_and(|info| info.in_)
    }

    /// Whether `osd` is marked full (see [`OsdMap::full_osds`]).
    pub fn is_full(&self, osd: OsdId) -> bool {
        self.full_osds.contains(&osd)
    }

    /// Whether `pg` is a PG of one of the map's pools.
    pub fn pg_exists(&self, pg: PgId) -> bool {
        self.pools.get(&pg.pool).is_some_and(|pool| pg.seed < pool.pg_num)
    }

    /// The pool called `name`, if any. Linear in the number of pools; pools are few.
    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.values().find(|pool| pool.name == name)
    }

    /// Checks every invariant of a full map: limits, pool fields, unique pool names, up OSDs have addresses,
    /// well-formed upmap items of existing PGs, full OSDs that exist. Upmap items may name OSDs that are gone
    /// or out: placement ignores such items, and the balancer removes them.
    pub fn validate(&self) -> Result<(), InvalidMap> {
        if self.pg_upmap_items.len() > PG_UPMAPS_MAX {
            return Err(InvalidMap::TooManyUpmaps { count: self.pg_upmap_items.len() });
        }
        if self.osds.len() > OSDS_MAX {
            return Err(InvalidMap::TooManyOsds { count: self.osds.len() });
        }
        if self.pools.len() > POOLS_MAX {
            return Err(InvalidMap::TooManyPools { count: self.pools.len() });
        }
        for (&osd, info) in &self.osds {
            info.validate(osd)?;
        }
        if let Some(&osd) = self.full_osds.iter().find(|o| !self.osds.contains_key(o)) {
            return Err(InvalidMap::FullUnknownOsd { osd });
        }
        let mut names: BTreeMap<&str, PoolId> = BTreeMap::new();
        for (&key, pool) in &self.pools {
            pool.validate(key)?;
            if let Some(first) = names.insert(&pool.name, key) {
                return Err(InvalidMap::PoolNameDuplicate { name: pool.name.clone(), first, second: key });
            }
        }
        for (&pg, items) in &self.pg_upmap_items {
            if !valid_upmap_items(items) {
                return Err(InvalidMap::UpmapItems { pg });
            }
            if !self.pg_exists(pg) {
                return Err(InvalidMap::UpmapUnknownPg { pg });
            }
        }
        Ok(())
    }

    /// Moves this map to the next epoch. On error the map is unchanged.
    pub fn apply(&mut self, inc: &Incremental) -> Result<(), MapError> {
        if inc.fsid != self.fsid {
            return Err(MapError::FsidMismatch { map: self.fsid, incremental: inc.fsid });
        }
        if self.epoch.checked_next() != Some(inc.epoch) {
            return Err(MapError::EpochNotNext { map: self.epoch, incremental: inc.epoch });
        }
        inc.validate()?;

        // Build the next map aside so that a rejected incremental leaves `self` untouched. Maps are KiB to a
        // few MiB and change at most a few times a second, so the copy is cheap next to the network round
        // trip that delivered the incremental.
        let mut next = self.clone();
        for (&osd, info) in &inc.new_osds {
            if next.osds.insert(osd, info.clone()).is_some() {
                return Err(MapError::OsdExists(osd));
            }
        }
        for (&osd, change) in &inc.osd_changes {
            let info = next.osds.get_mut(&osd).ok_or(MapError::UnknownOsd(osd))?;
            change.apply_to(info);
        }
        for &osd in &inc.removed_osds {
            next.osds.remove(&osd).ok_or(MapError::UnknownOsd(osd))?;
            next.full_osds.remove(&osd);
        }
        for (&pool_id, pool) in &inc.new_pools {
            next.pools.insert(pool_id, pool.clone());
        }
        for &pool_id in &inc.removed_pools {
            next.pools.remove(&pool_id).ok_or(MapError::UnknownPool(pool_id))?;
        }
        for &pg in &inc.old_pg_upmap_items {
            next.pg_upmap_items.remove(&pg).ok_or(MapError::UnknownUpmap(pg))?;
        }
        // A removed pool takes its exceptions with it, and so does a PG that a smaller pg_num dropped (Ceph's
        // `clean_pg_upmaps` does the same, one epoch later).
        let pools = &next.pools;
        next.pg_upmap_items.retain(|pg, _| pools.get(&pg.pool).is_some_and(|pool| pg.seed < pool.pg_num));
        for (&pg, items) in &inc.new_pg_upmap_items {
            next.pg_upmap_items.insert(pg, items.clone());
        }
        for &osd in &inc.old_full_osds {
            if !next.full_osds.remove(&osd) {
                return Err(MapError::NotFull(osd));
            }
        }
        for &osd in &inc.new_full_osds {
            if !next.osds.contains_key(&osd) {
                return Err(MapError::UnknownOsd(osd));
            }
            next.full_osds.insert(osd);
        }
        next.epoch = inc.epoch;
        next.validate()?;

        *self = next;
        assert_eq!(self.epoch, inc.epoch);
        Ok(())
    }

    /// The wire and disk form: version byte, then postcard. Refuses a map that fails [`OsdMap::validate`],
    /// so that no peer ever has to reject what we sent.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        self.validate()?;
        encode_versioned(Self::ENCODING_VERSION, self)
    }

    /// The inverse of [`OsdMap::encode`], reading every version this build knows (see the module doc);
    /// the result has passed [`OsdMap::validate`].
    pub fn decode(bytes: &[u8]) -> Result<OsdMap, CodecError> {
        let map = match split_version(Self::ENCODING_VERSION, bytes)? {
            (1, body) => OsdMap::from(OsdMapV2::from(decode_body::<OsdMapV1>(body)?)),
            (2, body) => OsdMap::from(decode_body::<OsdMapV2>(body)?),
            (_, body) => decode_body::<OsdMap>(body)?,
        };
        map.validate()?;
        Ok(map)
    }
}

impl Incremental {
    /// Version byte written before the body; bump it whenever the body's encoding changes.
    pub const ENCODING_VERSION: u8 = 3;

    /// An incremental that changes nothing but the epoch.
    pub fn new(fsid: Fsid, epoch: Epoch) -> Incremental {
        Incremental {
            fsid,
            epoch,
            new_osds: BTreeMap::new(),
            osd_changes: BTreeMap::new(),
            removed_osds: BTreeSet::new(),
            new_pools: BTreeMap::new(),
            removed_pools: BTreeSet::new(),
            new_pg_upmap_items: BTreeMap::new(),
            old_pg_upmap_items: BTreeSet::new(),
            new_full_osds: BTreeSet::new(),
            old_full_osds: BTreeSet::new(),
        }
    }

    /// Checks what can be checked without the map it applies to: limits, the fields of new OSDs and
    /// pools, and that no id is both created or changed and removed, nor an OSD both marked full and cleared.
    /// [`OsdMap::apply`] checks the rest.
    pub fn validate(&self) -> Result<(), InvalidMap> {
        for count in [
            self.new_osds.len(),
            self.osd_changes.len(),
            self.removed_osds.len(),
            self.new_full_osds.len(),
            self.old_full_osds.len(),
        ] {
            if count > OSDS_MAX {
                return Err(InvalidMap::TooManyOsds { count });
            }
        }
        for count in [self.new_pools.len(), self.removed_pools.len()] {
            if count > POOLS_MAX {
                return Err(InvalidMap::TooManyPools { count });
            }
        }
        for (&osd, info) in &self.new_osds {
            // An OSD created up but without addresses may still get them from `osd_changes`; the full-map
            // check after applying catches it if not.
            if !valid_host(&info.host) {
                return Err(InvalidMap::HostName { osd });
            }
            if self.removed_osds.contains(&osd) {
                return Err(InvalidMap::OsdCreatedAndRemoved { osd });
            }
        }
        for (&osd, change) in &self.osd_changes {
            if change.host.as_deref().is_some_and(|host| !valid_host(host)) {
                return Err(InvalidMap::HostName { osd });
            }
            if self.removed_osds.contains(&osd) {
                return Err(InvalidMap::OsdChangedAndRemoved { osd });
            }
        }
        for &osd in self.new_full_osds.iter().chain(&self.old_full_osds) {
            if self.removed_osds.contains(&osd) {
                return Err(InvalidMap::OsdChangedAndRemoved { osd });
            }
        }
        if let Some(&osd) = self.new_full_osds.intersection(&self.old_full_osds).next() {
            return Err(InvalidMap::FullSetAndCleared { osd });
        }
        for (&key, pool) in &self.new_pools {
            pool.validate(key)?;
            if self.removed_pools.contains(&key) {
                return Err(InvalidMap::PoolCreatedAndRemoved { pool: key });
            }
        }
        for count in [self.new_pg_upmap_items.len(), self.old_pg_upmap_items.len()] {
            if count > PG_UPMAPS_MAX {
                return Err(InvalidMap::TooManyUpmaps { count });
            }
        }
        for (&pg, items) in &self.new_pg_upmap_items {
            if !valid_upmap_items(items) {
                return Err(InvalidMap::UpmapItems { pg });
            }
            if self.old_pg_upmap_items.contains(&pg) {
                return Err(InvalidMap::UpmapSetAndRemoved { pg });
            }
        }
        Ok(())
    }

    /// Whether this incremental changes anything at all.
    pub fn is_empty(&self) -> bool {
        self.new_osds.is_empty()
            && self.osd_changes.is_empty()
            && self.removed_osds.is_empty()
            && self.new_pools.is_empty()
            && self.removed_pools.is_empty()
            && self.new_pg_upmap_items.is_empty()
            && self.old_pg_upmap_items.is_empty()
            && self.new_full_osds.is_empty()
            && self.old_full_osds.is_empty()
    }

    /// The wire and disk form: version byte, then postcard. Refuses an incremental that fails
    /// [`Incremental::validate`].
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        self.validate()?;
        encode_versioned(Self::ENCODING_VERSION, self)
    }

    /// The inverse of [`Incremental::encode`], reading every version this build knows (see the module
    /// doc); the result has passed [`Incremental::validate`].
    pub fn decode(bytes: &[u8]) -> Result<Incremental, CodecError> {
        let inc = match split_version(Self::ENCODING_VERSION, bytes)? {
            (1, body) => Incremental::from(IncrementalV2::from(decode_body::<IncrementalV1>(body)?)),
            (2, body) => Incremental::from(decode_body::<IncrementalV2>(body)?),
            (_, body) => decode_body::<Incremental>(body)?,
        };
        inc.validate()?;
        Ok(inc)
    }
}

impl OsdInfo {
    fn validate(&self, osd: OsdId) -> Result<(), InvalidMap> {
        if self.up && self.addrs.is_none() {
            return Err(InvalidMap::UpWithoutAddrs { osd });
        }
        if !valid_host(&self.host) {
            return Err(InvalidMap::HostName { osd });
        }
        Ok(())
    }
}

impl OsdChange {
    fn apply_to(&self, info: &mut OsdInfo) {
        if let Some(up) = self.up {
            info.up = up;
        }
        if let Some(in_) = self.in_ {
            info.in_ = in_;
        }
        if let Some(weight) = self.weight {
            info.weight = weight;
        }
        if let Some(addrs) = self.addrs {
            info.addrs = Some(addrs);
        }
        if let Some(host) = &self.host {
            info.host.clone_from(host);
        }
    }
}

impl Pool {
    /// Ceph's `pg_num_mask`: all ones, covering `pg_num - 1`. The `bmask` argument of
    /// `placement::stable_mod`.
    pub fn pg_num_mask(&self) -> u32 {
        // `checked_shr` is `None` exactly when pg_num is 0 or 1 (shift by 32), where the mask is 0.
        u32::MAX.checked_shr(self.pg_num.saturating_sub(1).leading_zeros()).unwrap_or(0)
    }

    fn validate(&self, key: PoolId) -> Result<(), InvalidMap> {
        let pool = key;
        if self.id != key {
            return Err(InvalidMap::PoolKeyMismatch { key, id: self.id });
        }
        if self.size == 0 || self.size > POOL_SIZE_MAX {
            return Err(InvalidMap::PoolSize { pool, size: self.size });
        }
        if self.min_size == 0 || self.min_size > self.size {
            return Err(InvalidMap::PoolMinSize { pool, min_size: self.min_size, size: self.size });
        }
        if self.pg_num == 0 || self.pg_num > POOL_PG_NUM_MAX {
            return Err(InvalidMap::PoolPgNum { pool, pg_num: self.pg_num });
        }
        if self.name.is_empty() || self.name.len() > POOL_NAME_BYTES_MAX {
            return Err(InvalidMap::PoolName { pool });
        }
        Ok(())
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty() && host.len() <= HOST_NAME_BYTES_MAX
}

/// Whether `items` is a well-formed upmap entry: 1 to [`POOL_SIZE_MAX`] pairs, none mapping an OSD to
/// itself, no OSD twice as `from`, none twice as `to`. Placement relies on nothing more; whether an item
/// takes effect depends on the PG's set at the epoch.
pub fn valid_upmap_items(items: &[(OsdId, OsdId)]) -> bool {
    let distinct = |pick: fn(&(OsdId, OsdId)) -> OsdId| {
        items.iter().map(pick).collect::<BTreeSet<OsdId>>().len() == items.len()
    };
    !items.is_empty()
        && items.len() <= usize::from(POOL_SIZE_MAX)
        && items.iter().all(|(from, to)| from != to)
        && distinct(|item| item.0)
        && distinct(|item| item.1)
}

/// The body of a version 1 map: version 2 without upmaps. Kept to read old stores.
#[derive(Deserialize)]
struct OsdMapV1 {
    fsid: Fsid,
    epoch: Epoch,
    osds: BTreeMap<OsdId, OsdInfo>,
    pools: BTreeMap<PoolId, Pool>,
}

impl From<OsdMapV1> for OsdMapV2 {
    fn from(v1: OsdMapV1) -> OsdMapV2 {
        let OsdMapV1 { fsid, epoch, osds, pools } = v1;
        OsdMapV2 { fsid, epoch, osds, pools, pg_upmap_items: BTreeMap::new() }
    }
}

/// The body of a version 2 map: version 3 without full OSDs. Kept to read old stores.
#[derive(Deserialize)]
struct OsdMapV2 {
    fsid: Fsid,
    epoch: Epoch,
    osds: BTreeMap<OsdId, OsdInfo>,
    pools: BTreeMap<PoolId, Pool>,
    pg_upmap_items: BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
}

impl From<OsdMapV2> for OsdMap {
    fn from(v2: OsdMapV2) -> OsdMap {
        let OsdMapV2 { fsid, epoch, osds, pools, pg_upmap_items } = v2;
        OsdMap { fsid, epoch, osds, pools, pg_upmap_items, full_osds: BTreeSet::new() }
    }
}

/// The body of a version 1 incremental: version 2 without upmap changes. Kept to read old stores.
#[derive(Deserialize)]
struct IncrementalV1 {
    fsid: Fsid,
    epoch: Epoch,
    new_osds: BTreeMap<OsdId, OsdInfo>,
    osd_changes: BTreeMap<OsdId, OsdChange>,
    removed_osds: BTreeSet<OsdId>,
    new_pools: BTreeMap<PoolId, Pool>,
    removed_pools: BTreeSet<PoolId>,
}

impl From<IncrementalV1> for IncrementalV2 {
    fn from(v1: IncrementalV1) -> IncrementalV2 {
        let IncrementalV1 { fsid, epoch, new_osds, osd_changes, removed_osds, new_pools, removed_pools } = v1;
        IncrementalV2 {
            fsid,
            epoch,
            new_osds,
            osd_changes,
            removed_osds,
            new_pools,
            removed_pools,
            new_pg_upmap_items: BTreeMap::new(),
            old_pg_upmap_items: BTreeSet::new(),
        }
    }
}

/// The body of a version 2 incremental: version 3 without full OSD changes. Kept to read old stores.
#[derive(Deserialize)]
struct IncrementalV2 {
    fsid: Fsid,
    epoch: Epoch,
    new_osds: BTreeMap<OsdId, OsdInfo>,
    osd_changes: BTreeMap<OsdId, OsdChange>,
    removed_osds: BTreeSet<OsdId>,
    new_pools: BTreeMap<PoolId, Pool>,
    removed_pools: BTreeSet<PoolId>,
    new_pg_upmap_items: BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    old_pg_upmap_items: BTreeSet<PgId>,
}

impl From<IncrementalV2> for Incremental {
    fn from(v2: IncrementalV2) -> Incremental {
        let IncrementalV2 {
            fsid,
            epoch,
            new_osds,
            osd_changes,
            removed_osds,
            new_pools,
            removed_pools,
            new_pg_upmap_items,
            old_pg_upmap_items,
        } = v2;
        Incremental {
            fsid,
            epoch,
            new_osds,
            osd_changes,
            removed_osds,
            new_pools,
            removed_pools,
            new_pg_upmap_items,
            old_pg_upmap_items,
            new_full_osds: BTreeSet::new(),
            old_full_osds: BTreeSet::new(),
        }
    }
}

fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = postcard::to_extend(value, vec![version])?;
    if bytes.len() > MAP_BYTES_MAX {
        return Err(CodecError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// The version byte, checked to be in `1..=newest`, and the body after it.
fn split_version(newest: u8, bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    // Check the length before parsing: postcard allocates strings and maps as it reads them.
    if bytes.len() > MAP_BYTES_MAX {
        return Err(CodecError::TooLarge { len: bytes.len() });
    }
    let (&got, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if !(1..=newest).contains(&got) {
        return Err(CodecError::Version { got, supported: newest });
    }
    Ok((got, body))
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes::<T>(body)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

    use proptest::prelude::*;

    const FSID: Fsid = Fsid([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);

    fn addrs_v4(last: u8, base_port: u16) -> OsdAddrs {
        let at = |port| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), port));
        OsdAddrs {
            public: at(base_port),
            cluster: at(base_port + 1),
            hb_front: at(base_port + 2),
            hb_back: at(base_port + 3),
        }
    }

    fn pool(id: u32, name: &str, pg_num: u32) -> Pool {
        Pool { id: PoolId(id), name: name.to_owned(), size: 3, min_size: 2, pg_num }
    }

    /// The fixed map of the pinned vectors: one booted OSD, one never booted, one pool.
    fn pinned_map() -> OsdMap {
        let mut map = OsdMap::new(FSID);
        map.epoch = Epoch(7);
        map.osds.insert(
            OsdId(0),
            OsdInfo {
                addrs: Some(addrs_v4(1, 6800)),
                up: true,
                in_: true,
                weight: WEIGHT_ONE,
                host: "a".to_owned(),
            },
        );
        map.osds.insert(
            OsdId(1),
            OsdInfo { addrs: None, up: false, in_: false, weight: WEIGHT_ONE / 2, host: "b".to_owned() },
        );
        map.pools.insert(PoolId(1), pool(1, "rbd", 32));
        map
    }

    /// The incremental of the pinned vectors: osd.1 boots on IPv6, osd.2 is created, pool 1 grows to 48
    /// PGs, pool 2 is created.
    fn pinned_incremental() -> Incremental {
        let v6 = |port| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0));
        let mut inc = Incremental::new(FSID, Epoch(8));
        inc.osd_changes.insert(
            OsdId(1),
            OsdChange {
                up: Some(true),
                in_: Some(true),
                addrs: Some(OsdAddrs {
                    public: v6(6800),
                    cluster: v6(6801),
                    hb_front: v6(6802),
                    hb_back: v6(6803),
                }),
                ..OsdChange::default()
            },
        );
        inc.new_osds.insert(
            OsdId(2),
            OsdInfo { addrs: None, up: false, in_: true, weight: 3 * WEIGHT_ONE, host: "c".to_owned() },
        );
        inc.new_pools.insert(PoolId(1), pool(1, "rbd", 48));
        inc.new_pools.insert(PoolId(2), pool(2, "data", 8));
        inc
    }

    /// The pinned map with upmap items, as version 2 carries them.
    fn pinned_map_v2() -> OsdMap {
        let mut map = pinned_map();
        map.pg_upmap_items.insert(PgId::new(PoolId(1), 5), vec![(OsdId(0), OsdId(1))]);
        map
    }

    /// The pinned incremental with upmap changes: PG 1.5's items go, PG 1.2f (beyond the old pg_num of
    /// 32, within the new 48) gets two.
    fn pinned_incremental_v2() -> Incremental {
        let mut inc = pinned_incremental();
        inc.old_pg_upmap_items.insert(PgId::new(PoolId(1), 5));
        inc.new_pg_upmap_items
            .insert(PgId::new(PoolId(1), 0x2f), vec![(OsdId(0), OsdId(2)), (OsdId(1), OsdId(0))]);
        inc
    }

    /// The version 2 map with osd.0 full, as version 3 carries it.
    fn pinned_map_v3() -> OsdMap {
        let mut map = pinned_map_v2();
        map.full_osds.insert(OsdId(0));
        map
    }

    /// The version 2 incremental that also marks osd.2 (created by it) full and clears osd.0.
    fn pinned_incremental_v3() -> Incremental {
        let mut inc = pinned_incremental_v2();
        inc.new_full_osds.insert(OsdId(2));
        inc.old_full_osds.insert(OsdId(0));
        inc
    }

    // Pinned encodings. If one of these tests fails, the wire and disk format changed: either revert the
    // change or bump ENCODING_VERSION and update the literal deliberately. Each version is the body of the
    // one before followed by its new fields, so its vectors are built from version 1's.
    const PINNED_MAP_V3_FULL_HEX: &str = concat!(
        "01", // 1 full OSD
        "00", //   osd.0
    );
    const PINNED_INCREMENTAL_V3_FULL_HEX: &str = concat!(
        "01", // 1 OSD marked full
        "02", //   osd.2
        "01", // 1 OSD cleared
        "00", //   osd.0
    );
    const PINNED_MAP_V2_UPMAPS_HEX: &str = concat!(
        "01",   // 1 PG with upmap items
        "0105", //   PG 1.5
        "01",   //   1 item
        "0001", //     osd.0 -> osd.1
    );
    const PINNED_INCREMENTAL_V2_UPMAPS_HEX: &str = concat!(
        "01",   // 1 PG with new upmap items
        "012f", //   PG 1.2f
        "02",   //   2 items
        "0002", //     osd.0 -> osd.2
        "0100", //     osd.1 -> osd.0
        "01",   // 1 PG with upmap items removed
        "0105", //   PG 1.5
    );
    const PINNED_MAP_V1_HEX: &str = concat!(
        "01",                               // encoding version
        "000102030405060708090a0b0c0d0e0f", // fsid
        "07",                               // epoch 7
        "02",                               // 2 OSDs
        "00",                               // osd.0
        "01",                               //   addrs: Some
        "000a0000019035",                   //     public: V4, 10.0.0.1, port 6800
        "000a0000019135",                   //     cluster: port 6801
        "000a0000019235",                   //     hb_front: port 6802
        "000a0000019335",                   //     hb_back: port 6803
        "0101",                             //   up, in
        "808004",                           //   weight 0x10000
        "0161",                             //   host "a"
        "01",                               // osd.1
        "00",                               //   addrs: None
        "0000",                             //   down, out
        "808002",                           //   weight 0x8000
        "0162",                             //   host "b"
        "01",                               // 1 pool
        "0101",                             //   key 1, id 1
        "03726264",                         //   name "rbd"
        "030220",                           //   size 3, min_size 2, pg_num 32
    );
    const PINNED_INCREMENTAL_V1_HEX: &str = concat!(
        "01",                                     // encoding version
        "000102030405060708090a0b0c0d0e0f",       // fsid
        "08",                                     // epoch 8
        "01",                                     // 1 new OSD
        "02",                                     //   osd.2
        "000001",                                 //   addrs: None, down, in
        "80800c",                                 //   weight 0x30000
        "0163",                                   //   host "c"
        "01",                                     // 1 OSD change
        "01",                                     //   osd.1
        "0101",                                   //   up: Some(true)
        "0101",                                   //   in: Some(true)
        "00",                                     //   weight: None
        "01",                                     //   addrs: Some
        "01000000000000000000000000000000019035", //     public: V6, ::1, port 6800
        "01000000000000000000000000000000019135", //     cluster: port 6801
        "01000000000000000000000000000000019235", //     hb_front: port 6802
        "01000000000000000000000000000000019335", //     hb_back: port 6803
        "00",                                     //   host: None
        "00",                                     // 0 removed OSDs
        "02",                                     // 2 new pools
        "0101",                                   //   key 1, id 1
        "03726264",                               //   name "rbd"
        "030230",                                 //   size 3, min_size 2, pg_num 48
        "0202",                                   //   key 2, id 2
        "0464617461",                             //   name "data"
        "030208",                                 //   size 3, min_size 2, pg_num 8
        "00",                                     // 0 removed pools
    );

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2));
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn pinned_map_encoding() {
        let expected =
            format!("03{}{PINNED_MAP_V2_UPMAPS_HEX}{PINNED_MAP_V3_FULL_HEX}", &PINNED_MAP_V1_HEX[2..]);
        let map = pinned_map_v3();
        assert_eq!(hex(&map.encode().unwrap()), expected);
        assert_eq!(OsdMap::decode(&unhex(&expected)).unwrap(), map);
        // Without upmaps or full OSDs, each field is one byte: its empty length.
        let expected = format!("03{}0000", &PINNED_MAP_V1_HEX[2..]);
        assert_eq!(hex(&pinned_map().encode().unwrap()), expected);
    }

    #[test]
    fn pinned_incremental_encoding() {
        let expected = format!(
            "03{}{PINNED_INCREMENTAL_V2_UPMAPS_HEX}{PINNED_INCREMENTAL_V3_FULL_HEX}",
            &PINNED_INCREMENTAL_V1_HEX[2..]
        );
        let inc = pinned_incremental_v3();
        assert_eq!(hex(&inc.encode().unwrap()), expected);
        assert_eq!(Incremental::decode(&unhex(&expected)).unwrap(), inc);
    }

    /// A monitor store written before upmaps existed still opens: version 1 decodes, with no upmaps.
    #[test]
    fn version_1_still_decodes() {
        assert_eq!(OsdMap::decode(&unhex(PINNED_MAP_V1_HEX)).unwrap(), pinned_map());
        assert_eq!(Incremental::decode(&unhex(PINNED_INCREMENTAL_V1_HEX)).unwrap(), pinned_incremental());
        // A version 1 body with bytes after it is not mistaken for version 2.
        let v1_with_upmaps = format!("{PINNED_MAP_V1_HEX}{PINNED_MAP_V2_UPMAPS_HEX}");
        assert!(matches!(OsdMap::decode(&unhex(&v1_with_upmaps)), Err(CodecError::TrailingBytes(6))));
    }

    /// A monitor store written before full OSDs were in the map still opens: version 2 decodes, with none.
    #[test]
    fn version_2_still_decodes() {
        let map = format!("02{}{PINNED_MAP_V2_UPMAPS_HEX}", &PINNED_MAP_V1_HEX[2..]);
        assert_eq!(OsdMap::decode(&unhex(&map)).unwrap(), pinned_map_v2());
        let inc = format!("02{}{PINNED_INCREMENTAL_V2_UPMAPS_HEX}", &PINNED_INCREMENTAL_V1_HEX[2..]);
        assert_eq!(Incremental::decode(&unhex(&inc)).unwrap(), pinned_incremental_v2());
        // A version 2 body with bytes after it is not mistaken for version 3.
        let v2_with_full = format!("{map}{PINNED_MAP_V3_FULL_HEX}");
        assert!(matches!(OsdMap::decode(&unhex(&v2_with_full)), Err(CodecError::TrailingBytes(2))));
    }

    #[test]
    fn apply_pinned_incremental_with_upmaps_and_full_osds() {
        let mut map = pinned_map_v3();
        map.apply(&pinned_incremental_v3()).unwrap();
        let items: Vec<(PgId, Vec<(OsdId, OsdId)>)> =
            map.pg_upmap_items.iter().map(|(pg, items)| (*pg, items.clone())).collect();
        assert_eq!(items, [(PgId::new(PoolId(1), 0x2f), vec![(OsdId(0), OsdId(2)), (OsdId(1), OsdId(0))])]);
        assert!(map.is_full(OsdId(2)) && !map.is_full(OsdId(0)));
        assert_eq!(map.full_osds.len(), 1);
    }

    #[test]
    fn full_osds_exist_and_leave_the_map_with_their_osd() {
        let mut map = pinned_map_v3();
        map.full_osds.insert(OsdId(9));
        assert_eq!(map.validate(), Err(InvalidMap::FullUnknownOsd { osd: OsdId(9) }));
        assert!(matches!(map.encode(), Err(CodecError::Invalid(InvalidMap::FullUnknownOsd { .. }))));

        let mut map = pinned_map_v3();
        let mut inc = map.incremental();
        inc.removed_osds.insert(OsdId(0));
        map.apply(&inc).unwrap();
        assert!(map.full_osds.is_empty(), "a removed OSD is no longer full");
        map.validate().unwrap();
    }

    #[test]
    fn removing_or_shrinking_a_pool_drops_its_upmaps() {
        let mut map = pinned_map();
        map.pools.insert(PoolId(2), pool(2, "data", 8));
        for pg in [PgId::new(PoolId(1), 3), PgId::new(PoolId(1), 31), PgId::new(PoolId(2), 7)] {
            map.pg_upmap_items.insert(pg, vec![(OsdId(0), OsdId(1))]);
        }
        map.validate().unwrap();

        let mut removed = map.clone();
        let mut inc = removed.incremental();
        inc.removed_pools.insert(PoolId(2));
        removed.apply(&inc).unwrap();
        let pgs: Vec<PgId> = removed.pg_upmap_items.keys().copied().collect();
        assert_eq!(pgs, [PgId::new(PoolId(1), 3), PgId::new(PoolId(1), 31)]);

        let mut shrunk = map.clone();
        let mut inc = shrunk.incremental();
        inc.new_pools.insert(PoolId(1), pool(1, "rbd", 16));
        shrunk.apply(&inc).unwrap();
        let pgs: Vec<PgId> = shrunk.pg_upmap_items.keys().copied().collect();
        assert_eq!(pgs, [PgId::new(PoolId(1), 3), PgId::new(PoolId(2), 7)]);

        // Setting items for a PG that does not exist (any more) is refused, atomically.
        let mut copy = map.clone();
        let mut inc = copy.incremental();
        inc.removed_pools.insert(PoolId(2));
        inc.new_pg_upmap_items.insert(PgId::new(PoolId(2), 0), vec![(OsdId(0), OsdId(1))]);
        assert_eq!(copy.apply(&inc), Err(InvalidMap::UpmapUnknownPg { pg: PgId::new(PoolId(2), 0) }.into()));
        assert_eq!(copy, map);
    }

    #[test]
    fn upmap_items_validation() {
        let (a, b, c) = (OsdId(1), OsdId(2), OsdId(3));
        assert!(valid_upmap_items(&[(a, b)]));
        assert!(valid_upmap_items(&[(a, b), (b, c)]), "a chain is well formed; placement decides");
        assert!(!valid_upmap_items(&[]));
        assert!(!valid_upmap_items(&[(a, a)]));
        assert!(!valid_upmap_items(&[(a, b), (a, c)]));
        assert!(!valid_upmap_items(&[(a, c), (b, c)]));
        let long: Vec<(OsdId, OsdId)> =
            (0..=u32::from(POOL_SIZE_MAX)).map(|i| (OsdId(i), OsdId(100 + i))).collect();
        assert!(!valid_upmap_items(&long));
        assert!(valid_upmap_items(&long[1..]));

        let mut map = pinned_map();
        map.pg_upmap_items.insert(PgId::new(PoolId(1), 0), vec![(a, a)]);
        assert_eq!(map.encode().unwrap_err().to_string(), "PG 1.0: malformed upmap items");
        let mut inc = pinned_incremental();
        let pg = PgId::new(PoolId(1), 0);
        inc.new_pg_upmap_items.insert(pg, vec![(a, b)]);
        inc.old_pg_upmap_items.insert(pg);
        assert_eq!(inc.validate(), Err(InvalidMap::UpmapSetAndRemoved { pg }));
        let mut copy = pinned_map();
        let mut inc = pinned_incremental();
        inc.old_pg_upmap_items.insert(pg);
        assert_eq!(copy.apply(&inc), Err(MapError::UnknownUpmap(pg)));
    }

    #[test]
    fn apply_pinned_incremental() {
        let mut map = pinned_map();
        map.apply(&pinned_incremental()).unwrap();
        assert_eq!(map.epoch, Epoch(8));
        assert!(map.is_up(OsdId(1)) && map.is_in(OsdId(1)));
        assert_eq!(map.osds[&OsdId(1)].weight, WEIGHT_ONE / 2, "untouched fields stay");
        assert!(!map.is_up(OsdId(2)) && map.is_in(OsdId(2)));
        assert_eq!(map.pools[&PoolId(1)].pg_num, 48);
        assert_eq!(map.pool_by_name("data").map(|p| p.id), Some(PoolId(2)));
    }

    #[test]
    fn apply_rejects_wrong_fsid_and_epoch_and_leaves_map_unchanged() {
        let map = pinned_map();
        let check = |inc: &Incremental, expected: MapError| {
            let mut copy = map.clone();
            assert_eq!(copy.apply(inc), Err(expected));
            assert_eq!(copy, map);
        };

        let mut inc = pinned_incremental();
        inc.fsid = Fsid([0xff; 16]);
        check(&inc, MapError::FsidMismatch { map: FSID, incremental: Fsid([0xff; 16]) });

        for epoch in [7, 9, 0] {
            let mut inc = pinned_incremental();
            inc.epoch = Epoch(epoch);
            check(&inc, MapError::EpochNotNext { map: Epoch(7), incremental: Epoch(epoch) });
        }

        let mut at_end = map.clone();
        at_end.epoch = Epoch(u32::MAX);
        let mut inc = pinned_incremental();
        inc.epoch = Epoch(0);
        assert_eq!(
            at_end.apply(&inc),
            Err(MapError::EpochNotNext { map: Epoch(u32::MAX), incremental: Epoch(0) })
        );
    }

    #[test]
    fn apply_rejects_inconsistent_incrementals_atomically() {
        let map = pinned_map();
        let check = |edit: &dyn Fn(&mut Incremental), expected: MapError| {
            let mut inc = pinned_incremental();
            edit(&mut inc);
            let mut copy = map.clone();
            assert_eq!(copy.apply(&inc), Err(expected));
            assert_eq!(copy, map, "a rejected incremental must not change the map");
        };
        let info = pinned_map().osds[&OsdId(0)].clone();

        check(
            &|inc| {
                inc.new_osds.insert(OsdId(0), info.clone());
            },
            MapError::OsdExists(OsdId(0)),
        );
        check(
            &|inc| {
                inc.osd_changes.insert(OsdId(9), OsdChange::default());
            },
            MapError::UnknownOsd(OsdId(9)),
        );
        check(
            &|inc| {
                inc.removed_osds.insert(OsdId(9));
            },
            MapError::UnknownOsd(OsdId(9)),
        );
        check(
            &|inc| {
                inc.removed_pools.insert(PoolId(9));
            },
            MapError::UnknownPool(PoolId(9)),
        );
        check(
            &|inc| {
                inc.removed_osds.insert(OsdId(2));
            },
            InvalidMap::OsdCreatedAndRemoved { osd: OsdId(2) }.into(),
        );
        check(
            &|inc| {
                inc.removed_osds.insert(OsdId(1));
            },
            InvalidMap::OsdChangedAndRemoved { osd: OsdId(1) }.into(),
        );
        check(
            &|inc| {
                inc.removed_pools.insert(PoolId(2));
            },
            InvalidMap::PoolCreatedAndRemoved { pool: PoolId(2) }.into(),
        );
        check(
            &|inc| {
                inc.new_pools.insert(PoolId(3), pool(3, "rbd", 8));
            },
            InvalidMap::PoolNameDuplicate { name: "rbd".to_owned(), first: PoolId(1), second: PoolId(3) }
                .into(),
        );
        check(
            &|inc| {
                inc.osd_changes.insert(OsdId(2), OsdChange { up: Some(true), ..OsdChange::default() });
            },
            InvalidMap::UpWithoutAddrs { osd: OsdId(2) }.into(),
        );
        check(
            &|inc| {
                inc.new_pools.insert(PoolId(4), pool(5, "x", 8));
            },
            InvalidMap::PoolKeyMismatch { key: PoolId(4), id: PoolId(5) }.into(),
        );
        check(
            &|inc| {
                inc.new_full_osds.insert(OsdId(9));
            },
            MapError::UnknownOsd(OsdId(9)),
        );
        check(
            &|inc| {
                inc.old_full_osds.insert(OsdId(0));
            },
            MapError::NotFull(OsdId(0)),
        );
        check(
            &|inc| {
                inc.removed_osds.insert(OsdId(0));
                inc.new_full_osds.insert(OsdId(0));
            },
            InvalidMap::OsdChangedAndRemoved { osd: OsdId(0) }.into(),
        );
        check(
            &|inc| {
                inc.new_full_osds.insert(OsdId(0));
                inc.old_full_osds.insert(OsdId(0));
            },
            InvalidMap::FullSetAndCleared { osd: OsdId(0) }.into(),
        );
    }

    #[test]
    fn pool_validation_bounds() {
        let check = |edit: &dyn Fn(&mut Pool), ok: bool| {
            let mut p = pool(1, "p", 8);
            edit(&mut p);
            assert_eq!(p.validate(PoolId(1)).is_ok(), ok, "{p:?}");
        };
        check(&|_| {}, true);
        check(&|p| p.size = 0, false);
        check(&|p| (p.size, p.min_size) = (POOL_SIZE_MAX, 1), true);
        check(&|p| p.size = POOL_SIZE_MAX + 1, false);
        check(&|p| p.min_size = 0, false);
        check(&|p| p.min_size = 4, false);
        check(&|p| p.pg_num = 0, false);
        check(&|p| p.pg_num = POOL_PG_NUM_MAX, true);
        check(&|p| p.pg_num = POOL_PG_NUM_MAX + 1, false);
        check(&|p| p.name = String::new(), false);
        check(&|p| p.name = "x".repeat(POOL_NAME_BYTES_MAX), true);
        check(&|p| p.name = "x".repeat(POOL_NAME_BYTES_MAX + 1), false);
    }

    #[test]
    fn pg_num_mask_covers_pg_num() {
        let check = |pg_num, mask| assert_eq!(pool(1, "p", pg_num).pg_num_mask(), mask, "pg_num {pg_num}");
        check(1, 0);
        check(2, 1);
        check(3, 3);
        check(8, 7);
        check(12, 15);
        check(16, 15);
        check(17, 31);
        check(POOL_PG_NUM_MAX, 0xffff);
        check(0, 0);
    }

    #[test]
    fn decode_rejects_framing_errors() {
        let bytes = pinned_map().encode().unwrap();
        assert!(matches!(OsdMap::decode(&[]), Err(CodecError::Empty)));
        for version in [0, 4, 0xff] {
            let mut wrong_version = bytes.clone();
            wrong_version[0] = version;
            assert!(matches!(
                OsdMap::decode(&wrong_version),
                Err(CodecError::Version { got, supported: 3 }) if got == version
            ));
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(OsdMap::decode(&trailing), Err(CodecError::TrailingBytes(1))));
        for len in 1..bytes.len() {
            assert!(OsdMap::decode(&bytes[..len]).is_err(), "truncated to {len} bytes decoded");
        }
        assert!(matches!(
            OsdMap::decode(&vec![1; MAP_BYTES_MAX + 1]),
            Err(CodecError::TooLarge { len }) if len == MAP_BYTES_MAX + 1
        ));
    }

    #[test]
    fn decode_rejects_invalid_map_and_encode_refuses_it() {
        let mut map = pinned_map();
        map.pools.get_mut(&PoolId(1)).unwrap().pg_num = 0;
        let invalid = InvalidMap::PoolPgNum { pool: PoolId(1), pg_num: 0 };
        assert!(matches!(map.encode(), Err(CodecError::Invalid(ref e)) if *e == invalid));
        // Bypass encode's check to build the bytes a buggy or hostile peer could send.
        let bytes = encode_versioned(OsdMap::ENCODING_VERSION, &map).unwrap();
        assert!(matches!(OsdMap::decode(&bytes), Err(CodecError::Invalid(ref e)) if *e == invalid));
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            // serde carries neither flow info nor scope id, so generate addresses without them.
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn osd_addrs() -> impl Strategy<Value = OsdAddrs> {
        (socket_addr(), socket_addr(), socket_addr(), socket_addr())
            .prop_map(|(public, cluster, hb_front, hb_back)| OsdAddrs { public, cluster, hb_front, hb_back })
    }

    fn osd_info() -> impl Strategy<Value = OsdInfo> {
        (proptest::option::of(osd_addrs()), any::<bool>(), any::<bool>(), any::<u32>(), "[a-z0-9.-]{1,20}")
            .prop_map(|(addrs, up, in_, weight, host)| OsdInfo {
                up: up && addrs.is_some(),
                addrs,
                in_,
                weight,
                host,
            })
    }

    fn pool_strategy() -> impl Strategy<Value = Pool> {
        (0u32..64, "[a-z]{1,12}", 1..=POOL_SIZE_MAX, 1..=POOL_PG_NUM_MAX).prop_flat_map(
            |(id, name, size, pg_num)| {
                (1..=size).prop_map(move |min_size| Pool {
                    id: PoolId(id),
                    name: format!("{name}{id}"),
                    size,
                    min_size,
                    pg_num,
                })
            },
        )
    }

    fn osd_map() -> impl Strategy<Value = OsdMap> {
        (
            any::<[u8; 16]>(),
            any::<u32>(),
            proptest::collection::btree_map(any::<u32>().prop_map(OsdId), osd_info(), 0..12),
            proptest::collection::vec(pool_strategy(), 0..6),
            proptest::collection::vec((any::<u32>(), any::<u32>(), upmap_items()), 0..6),
            any::<u16>(),
        )
            .prop_map(|(fsid, epoch, osds, pools, upmaps, full_mask)| {
                let pools: BTreeMap<PoolId, Pool> = pools.into_iter().map(|p| (p.id, p)).collect();
                // Upmaps only for PGs that exist: pick a pool and a seed within it.
                let list: Vec<&Pool> = pools.values().collect();
                let pg_upmap_items = if list.is_empty() {
                    BTreeMap::new()
                } else {
                    upmaps
                        .into_iter()
                        .map(|(which, seed, items)| {
                            let pool = list[which as usize % list.len()];
                            (PgId::new(pool.id, seed % pool.pg_num), items)
                        })
                        .collect()
                };
                // Full OSDs only among those that exist: bit i of the mask marks the i-th.
                let full_osds = osds
                    .keys()
                    .enumerate()
                    .filter(|(i, _)| (full_mask >> i) & 1 == 1)
                    .map(|(_, &o)| o)
                    .collect();
                OsdMap { fsid: Fsid(fsid), epoch: Epoch(epoch), osds, pools, pg_upmap_items, full_osds }
            })
    }

    /// Well-formed upmap items: distinct sources below 32, distinct targets from 32.
    fn upmap_items() -> impl Strategy<Value = Vec<(OsdId, OsdId)>> {
        (
            proptest::collection::btree_set(0u32..32, 1..=usize::from(POOL_SIZE_MAX)),
            proptest::collection::btree_set(32u32..64, usize::from(POOL_SIZE_MAX)),
        )
            .prop_map(|(from, to)| from.into_iter().zip(to).map(|(f, t)| (OsdId(f), OsdId(t))).collect())
    }

    fn osd_change() -> impl Strategy<Value = OsdChange> {
        (
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(osd_addrs()),
            proptest::option::of("[a-z]{1,8}"),
        )
            .prop_map(|(up, in_, weight, addrs, host)| OsdChange { up, in_, weight, addrs, host })
    }

    fn incremental() -> impl Strategy<Value = Incremental> {
        (
            any::<[u8; 16]>(),
            any::<u32>(),
            proptest::collection::btree_map((0u32..32).prop_map(OsdId), osd_info(), 0..4),
            proptest::collection::btree_map((32u32..64).prop_map(OsdId), osd_change(), 0..4),
            proptest::collection::btree_set((64u32..96).prop_map(OsdId), 0..4),
            proptest::collection::vec(pool_strategy(), 0..3),
            proptest::collection::btree_set((64u32..96).prop_map(PoolId), 0..3),
            proptest::collection::btree_map(
                (0u32..4, 0u32..64).prop_map(|(p, s)| PgId::new(PoolId(p), s)),
                upmap_items(),
                0..4,
            ),
            proptest::collection::btree_set(
                (4u32..8, 0u32..64).prop_map(|(p, s)| PgId::new(PoolId(p), s)),
                0..4,
            ),
            proptest::collection::btree_set((96u32..128).prop_map(OsdId), 0..4),
            proptest::collection::btree_set((128u32..160).prop_map(OsdId), 0..4),
        )
            .prop_map(
                |(
                    fsid,
                    epoch,
                    new_osds,
                    osd_changes,
                    removed_osds,
                    pools,
                    removed_pools,
                    new_pg_upmap_items,
                    old_pg_upmap_items,
                    new_full_osds,
                    old_full_osds,
                )| {
                    Incremental {
                        fsid: Fsid(fsid),
                        epoch: Epoch(epoch),
                        new_osds,
                        osd_changes,
                        removed_osds,
                        new_pools: pools.into_iter().map(|p| (p.id, p)).collect(),
                        removed_pools,
                        new_pg_upmap_items,
                        old_pg_upmap_items,
                        new_full_osds,
                        old_full_osds,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn map_roundtrips(map in osd_map()) {
            let bytes = map.encode().unwrap();
            prop_assert_eq!(OsdMap::decode(&bytes).unwrap(), map);
        }

        #[test]
        fn incremental_roundtrips(inc in incremental()) {
            let bytes = inc.encode().unwrap();
            prop_assert_eq!(Incremental::decode(&bytes).unwrap(), inc);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = OsdMap::decode(&bytes);
            let _ = Incremental::decode(&bytes);
        }

        /// Applying a sequence of incrementals one by one gives the same map as applying them to a decoded
        /// copy: what a client that restarts from a stored map sees.
        #[test]
        fn apply_then_roundtrip_agrees(weights in proptest::collection::vec(any::<u32>(), 1..8)) {
            let mut map = pinned_map();
            for weight in weights {
                let mut inc = map.incremental();
                inc.osd_changes.insert(OsdId(0), OsdChange { weight: Some(weight), ..OsdChange::default() });
                let mut copy = OsdMap::decode(&map.encode().unwrap()).unwrap();
                let inc = Incremental::decode(&inc.encode().unwrap()).unwrap();
                map.apply(&inc).unwrap();
                copy.apply(&inc).unwrap();
                prop_assert_eq!(&copy, &map);
                prop_assert_eq!(map.osds[&OsdId(0)].weight, weight);
            }
        }
    }
}
