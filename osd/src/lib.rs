//! osd: cuttle's object storage daemon, as a library (the `cuttle-osd` binary is a thin shell around
//! [`daemon::Osd`]).
//!
//! - [`store`]: the [`store::ObjectStore`] trait, transactions applied all or nothing, and [`store::MemStore`].
//! - [`bluestore`]: the durable store: data in a block file with an allocator, metadata in redb, group commit.
//! - [`exec`]: one client op (a compound list of `OsdOp`s on one object) executed against the store.
//! - [`pg`]: a placement group as a sans-IO state machine: primary-copy replication, duplicate suppression,
//!   peering and whole-object recovery.
//! - [`proto`]: the OSD-to-OSD replication and peering messages.
//! - [`shard`]: the sharded op queue: one thread per shard runs its PGs, so a slow PG stalls only its shard.
//! - [`heartbeat`]: OSD-to-OSD failure detection on the front and back networks.
//! - [`daemon`]: the runtime: messengers, the monitor client, boot, map handling, reports, shutdown.
//!
//! What it deliberately is not (yet): durable (MemStore only), a PG-log-based recovery (peering compares
//! per-object versions and copies whole objects), or Ceph's past-intervals bookkeeping (see [`pg`]).

pub mod bluestore;
pub mod daemon;
pub mod exec;
pub mod heartbeat;
pub mod inline;
pub mod pg;
pub mod proto;
pub mod shard;
pub mod store;
