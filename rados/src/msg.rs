//! Message types and bodies shared by clients, monitors and OSDs. Bodies are postcard-encoded into a
//! message's front; bulk bytes (write payloads, read results) travel in its data segment, never through serde.
//! OSD-to-OSD messages (replication, heartbeats) belong to the `osd` crate and use the range 0x0300..0x03ff.

use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::{Epoch, OsdId, PgId, PoolId};
use crate::map::{Incremental, MapError, OsdAddrs, OsdMap};

/// Message type numbers (the messenger's `msg_type`).
pub mod types {
    /// Client/daemon to monitor: [`super::MonRequest`]; the reply is [`MON_REPLY`] with the same tid.
    pub const MON_REQUEST: u16 = 0x0100;
    /// Monitor to client: [`super::MonReply`].
    pub const MON_REPLY: u16 = 0x0101;
    /// Monitor to subscriber: [`super::MapUpdate`].
    pub const MON_MAP: u16 = 0x0102;
    /// Monitor to log subscriber: [`super::LogEntry`].
    pub const MON_LOG: u16 = 0x0103;
    /// Client to OSD: [`super::OsdOpRequest`], write payloads in the data segment.
    pub const OSD_OP: u16 = 0x0200;
    /// OSD to client: [`super::OsdOpReply`], read results in the data segment.
    pub const OSD_OP_REPLY: u16 = 0x0201;
    /// Anyone to an OSD: [`super::OsdCommand`]; the reply is [`OSD_COMMAND_REPLY`].
    pub const OSD_COMMAND: u16 = 0x0202;
    /// OSD to caller: [`super::OsdCommandReply`].
    pub const OSD_COMMAND_REPLY: u16 = 0x0203;
}

/// A request to the monitor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MonRequest {
    /// Send the map now and every change after it (from `have`, or a full map when `None` or too old); and,
    /// with `log`, every cluster log entry.
    Subscribe { have: Option<Epoch>, log: bool },
    /// Register a new OSD (`ceph osd new`): the same uuid always gets the same id.
    OsdNew { uuid: [u8; 16], host: String },
    /// An OSD is up at these addresses.
    OsdBoot { osd: OsdId, uuid: [u8; 16], addrs: OsdAddrs, host: String },
    /// The sender has not heard from `target` for `failed_for_ms` (`alive: true` cancels the report).
    OsdFailure { reporter: OsdId, target: OsdId, failed_for_ms: u64, alive: bool },
    /// The sender is shutting down cleanly.
    OsdMarkMeDown { osd: OsdId },
    /// The sender's view of the PGs it is primary for, its heartbeat round-trip times, its store's space, the
    /// client I/O it has served since it started and its version (`cuttle versions`).
    OsdReport {
        osd: OsdId,
        epoch: Epoch,
        pgs: Vec<PgStat>,
        ping_times: Vec<PingTime>,
        statfs: OsdStatfs,
        io: OsdIoStats,
        version: String,
    },
    /// An operator command.
    Command(MonCommand),
}

/// Operator commands (`cuttle ...`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MonCommand {
    Status,
    Health,
    OsdTree,
    OsdDump,
    OsdOut(OsdId),
    OsdIn(OsdId),
    OsdDown(OsdId),
    PoolCreate {
        name: String,
        size: Option<u8>,
        min_size: Option<u8>,
        pg_num: Option<u32>,
    },
    PoolLs,
    /// Needs `confirm` (the name given twice and the flag on the command line).
    PoolRm {
        name: String,
        confirm: bool,
    },
    /// The last heartbeat round-trip times every OSD reported.
    OsdPingTimes,
    /// The last `n` cluster log entries.
    Log {
        n: usize,
    },
    /// Space per OSD (`ceph osd df`).
    OsdDf,
    /// Space of the cluster and per pool (`ceph df`).
    Df,
    /// Health with the detail of each failing check (`ceph health detail`).
    HealthDetail,
    /// The version of every daemon, counted (`ceph versions`).
    Versions,
}

/// The monitor's answer to a [`MonRequest`] (same tid).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MonReply {
    Ok,
    /// `OsdNew` answered.
    OsdId(OsdId),
    /// A command's result as JSON text (shaped like Ceph's `--format json`).
    Json(String),
    /// Typed refusal.
    Error(MonError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MonError {
    #[error("pool '{0}' does not exist")]
    NoSuchPool(String),
    #[error("pool '{0}' already exists with other settings")]
    PoolExists(String),
    #[error("no such osd {0}")]
    NoSuchOsd(OsdId),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("wrong cluster (fsid mismatch)")]
    WrongFsid,
}

/// Maps pushed to subscribers: incrementals from the subscriber's epoch, or a full map.
///
/// Decoding checks what [`OsdMap::decode`] and [`Incremental::decode`] check (`validate`), so that a map a
/// client installs from an update is as trustworthy as one from the monitor's store: the derived serde
/// decoding of the bare structs checks nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapUpdate {
    #[serde(deserialize_with = "valid_full_map")]
    pub full: Option<OsdMap>,
    #[serde(deserialize_with = "valid_incrementals")]
    pub incrementals: Vec<Incremental>,
}

fn valid_full_map<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OsdMap>, D::Error> {
    let full = Option::<OsdMap>::deserialize(d)?;
    if let Some(map) = &full {
        map.validate().map_err(serde::de::Error::custom)?;
    }
    Ok(full)
}

fn valid_incrementals<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Incremental>, D::Error> {
    let incrementals = Vec::<Incremental>::deserialize(d)?;
    for inc in &incrementals {
        inc.validate().map_err(serde::de::Error::custom)?;
    }
    Ok(incrementals)
}

/// An incremental of a [`MapUpdate`] that does not apply to the map before it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot apply incremental {epoch}: {source}")]
pub struct MapUpdateError {
    pub epoch: Epoch,
    #[source]
    pub source: MapError,
}

impl MapUpdate {
    /// The map a subscriber holding `cur` moves to: the full map when it is newer than `cur`, then every
    /// incremental past that applied in order (older ones are skipped). `None` when nothing is newer.
    pub fn newer_map(self, cur: Option<&OsdMap>) -> Result<Option<OsdMap>, MapUpdateError> {
        let mut next: Option<OsdMap> = None;
        if let Some(full) = self.full {
            if cur.is_none_or(|c| full.epoch > c.epoch) {
                next = Some(full);
            }
        }
        for inc in &self.incrementals {
            let Some(base) = next.as_ref().or(cur) else { break };
            if inc.epoch <= base.epoch {
                continue;
            }
            let mut m = base.clone();
            m.apply(inc).map_err(|source| MapUpdateError { epoch: inc.epoch, source })?;
            next = Some(m);
        }
        Ok(next)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

/// One cluster log line (`cuttle watch`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    /// Milliseconds since the Unix epoch, as the monitor's clock read it.
    pub stamp_ms: u64,
    pub level: LogLevel,
    pub message: String,
}

/// A PG's state as its primary reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgStat {
    pub pgid: PgId,
    /// Acting replicas that are up.
    pub acting_up: u8,
    pub size: u8,
    pub min_size: u8,
    pub objects: u64,
    pub bytes: u64,
}

/// Client ops an OSD answered as a primary since it started, and their bytes (Ceph's `op_r`, `op_w`,
/// `op_r_out_bytes`, `op_w_in_bytes`): counters that only grow, from which the monitor derives client I/O
/// rates (`cuttle status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdIoStats {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
}

/// Longest version string an OSD may report.
pub const VERSION_BYTES_MAX: usize = 64;

/// This build's version as a daemon reports it (`cuttle versions`), Ceph's shape: `cuttle version 0.1.0`.
pub fn daemon_version() -> String {
    format!("cuttle version {}", env!("CARGO_PKG_VERSION"))
}

/// What an OSD's store holds, in bytes (Ceph's `store_statfs_t`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdStatfs {
    /// The device's size; 0 for a store without one (MemStore lives in RAM and is never full).
    pub total: u64,
    pub available: u64,
    /// Bytes the allocator gave to object data.
    pub allocated: u64,
    /// Object data as written (before allocation rounding).
    pub data_stored: u64,
    /// Omap keys and values.
    pub omap: u64,
    /// The store's own metadata (its database file).
    pub meta: u64,
}

impl OsdStatfs {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    /// The used share of the device; `None` for a store without a size.
    pub fn used_ratio(&self) -> Option<f64> {
        (self.total > 0).then(|| self.used() as f64 / self.total as f64)
    }
}

/// A heartbeat round-trip time, front and back, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingTime {
    pub peer: OsdId,
    pub front_us: Option<u64>,
    pub back_us: Option<u64>,
}

/// Identifies a client request across resends: the same reqid is never applied twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReqId {
    /// The client's entity number and its messenger nonce: unique per client instance.
    pub client: u64,
    pub nonce: u64,
    pub tid: u64,
}

/// One step of an op on one object. Lengths of write payloads refer to consecutive pieces of the message's
/// data segment, in op order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsdOp {
    /// Length 0 reads to the end.
    Read {
        offset: u64,
        len: u64,
    },
    Stat,
    Write {
        offset: u64,
        len: u64,
    },
    WriteFull {
        len: u64,
    },
    Append {
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Truncate {
        size: u64,
    },
    Create {
        exclusive: bool,
    },
    Remove,
    SetXattr {
        name: String,
        len: u64,
    },
    GetXattr {
        name: String,
    },
    RmXattr {
        name: String,
    },
    OmapSet {
        keys: Vec<(String, Vec<u8>)>,
    },
    OmapGet {
        keys: Vec<String>,
    },
    /// Keys after `after`, at most `max`.
    OmapGetKeys {
        after: String,
        max: u32,
    },
    OmapRm {
        keys: Vec<String>,
    },
    /// Fails the whole op with `VersionMismatch` unless the object's version is exactly this (0: absent).
    AssertVersion {
        version: u64,
    },
    /// The names of the object's attributes, in order (Ceph's `getxattrs`, without the values).
    ListXattrs,
}

impl OsdOp {
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            OsdOp::Read { .. }
                | OsdOp::Stat
                | OsdOp::GetXattr { .. }
                | OsdOp::ListXattrs
                | OsdOp::OmapGet { .. }
                | OsdOp::OmapGetKeys { .. }
                | OsdOp::AssertVersion { .. }
        )
    }

    /// Bytes of the data segment this op consumes.
    pub fn payload_len(&self) -> u64 {
        match self {
            OsdOp::Write { len, .. } | OsdOp::WriteFull { len } | OsdOp::Append { len } => *len,
            OsdOp::SetXattr { len, .. } => *len,
            _ => 0,
        }
    }
}

/// A client op on one object, sent to the PG's primary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OsdOpRequest {
    pub reqid: ReqId,
    pub pgid: PgId,
    pub oid: String,
    /// The client's map epoch: an OSD with an older map waits for the newer one; a client with an older
    /// map is answered `Misdirected` when the OSD is not the primary.
    pub epoch: Epoch,
    pub ops: Vec<OsdOp>,
}

/// Pool listing: a separate request type because it is per PG, not per object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgListRequest {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub after: Option<String>,
    pub max: u32,
}

/// The outcome of each op, in order; read bytes are in the reply's data segment, in op order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOut {
    None,
    /// Bytes of the data segment holding this op's output.
    Data {
        len: u64,
    },
    Stat {
        size: u64,
        version: u64,
    },
    Keys(Vec<String>),
    Pairs(Vec<(String, Vec<u8>)>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OsdOpReply {
    pub tid: u64,
    pub epoch: Epoch,
    pub result: Result<(), OsdError>,
    /// The object's version after the op (writes) or as read.
    pub version: u64,
    pub outs: Vec<OpOut>,
}

/// Typed op errors (errno-like).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OsdError {
    #[error("object not found")]
    NotFound,
    #[error("object already exists")]
    Exists,
    #[error("no such attribute")]
    NoAttr,
    #[error("version mismatch: object is at {actual}")]
    VersionMismatch { actual: u64 },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("not the primary for this pg at epoch {0}")]
    Misdirected(Epoch),
    #[error("no such pool {0}")]
    NoSuchPool(PoolId),
    #[error("i/o error: {0}")]
    Io(String),
    /// An OSD of the PG has no room for the write: its store is full, or past `mon_osd_full_ratio` (ENOSPC).
    #[error("no space left: {0}")]
    NoSpace(String),
}

/// Admin requests sent straight to an OSD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OsdCommand {
    /// Which objects of this PG the OSD holds (for tests and `cuttle osd ls-objects`).
    ListObjects { pgid: PgId },
    /// PG listing for `rados ls`.
    PgList(PgListRequest),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OsdCommandReply {
    pub result: Result<Vec<String>, OsdError>,
    /// For listings: where the next page starts, if there is one.
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_through_postcard() {
        let r = OsdOpRequest {
            reqid: ReqId { client: 4121, nonce: 7, tid: 9 },
            pgid: PgId::new(PoolId(1), 0x1f),
            oid: "rbd_data.1.0000000000000000".into(),
            epoch: Epoch(12),
            ops: vec![OsdOp::AssertVersion { version: 3 }, OsdOp::Write { offset: 4096, len: 512 }],
        };
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(postcard::from_bytes::<OsdOpRequest>(&bytes).unwrap(), r);
        let m = MonRequest::Command(MonCommand::PoolCreate {
            name: "rbd".into(),
            size: Some(3),
            min_size: None,
            pg_num: Some(32),
        });
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<MonRequest>(&bytes).unwrap(), m);
    }

    #[test]
    fn map_update_with_an_invalid_full_map_is_refused() {
        // Found by the mon_msg fuzz target: a MON_MAP body whose full map has upmap items for PG 1.66 of a
        // pool of 8 PGs decoded, and MonClient installed the invalid map. The input, re-encoded: one OSD,
        // pool 1 with 8 PGs, upmap items for PG 1.66 (seed 102), no full OSDs, no incrementals.
        let front: &[u8] = &[
            1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 3, 1, 0, 0, 0, 1, 128, 128, 4, 5, 104, 111,
            115, 116, 48, 1, 1, 1, 3, 114, 98, 100, 2, 1, 8, 1, 1, 102, 1, 0, 2, 0, 0,
        ];
        let bad: MapUpdate = postcard::from_bytes::<MapUpdateUnchecked>(front).unwrap().into();
        assert!(bad.full.as_ref().unwrap().validate().is_err(), "the input holds an invalid map");
        assert!(postcard::from_bytes::<MapUpdate>(front).is_err());

        // An invalid incremental (a pool of 0 PGs) is refused as well; valid updates still decode.
        let mut inc = OsdMap::new(crate::Fsid([7; 16])).incremental();
        let pool = crate::map::Pool { id: PoolId(1), name: "p".into(), size: 1, min_size: 1, pg_num: 0 };
        inc.new_pools.insert(PoolId(1), pool);
        let bytes = postcard::to_stdvec(&MapUpdate { full: None, incrementals: vec![inc] }).unwrap();
        assert!(postcard::from_bytes::<MapUpdate>(&bytes).is_err());
        let good = MapUpdate { full: Some(OsdMap::new(crate::Fsid([7; 16]))), incrementals: Vec::new() };
        let bytes = postcard::to_stdvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<MapUpdate>(&bytes).unwrap(), good);
    }

    /// [`MapUpdate`] as decoded before it checked its maps.
    #[derive(Deserialize)]
    struct MapUpdateUnchecked {
        full: Option<OsdMap>,
        incrementals: Vec<Incremental>,
    }

    impl From<MapUpdateUnchecked> for MapUpdate {
        fn from(u: MapUpdateUnchecked) -> MapUpdate {
            MapUpdate { full: u.full, incrementals: u.incrementals }
        }
    }

    #[test]
    fn write_ops_are_classified() {
        assert!(OsdOp::Write { offset: 0, len: 1 }.is_write());
        assert!(OsdOp::OmapRm { keys: vec![] }.is_write());
        assert!(!OsdOp::Read { offset: 0, len: 0 }.is_write());
        assert!(!OsdOp::AssertVersion { version: 1 }.is_write());
        assert_eq!(OsdOp::SetXattr { name: "a".into(), len: 5 }.payload_len(), 5);
    }
}
