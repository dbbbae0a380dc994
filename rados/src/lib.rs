//! rados: the protocol library that every cuttle component shares.
//!
//! What it is, so far: the pure, IO-free core that clients, monitors and OSDs must agree on bit for bit.
//! - [`ids`]: newtype identifiers (`OsdId`, `PoolId`, `PgId`, `Epoch`, `Fsid`), re-exported at the root;
//! - [`map`]: the `OsdMap`, its `Incremental` changes, and their versioned postcard encoding;
//! - [`placement`]: object name to PG to an ordered set of OSDs (rjenkins hash, stable mod, straw2 with
//!   hosts as the failure domain, then the map's upmap exceptions);
//! - [`balancer`]: the upmap exceptions that even out PGs per OSD (Ceph's upmap balancer), a pure function
//!   of the map that the monitor runs.
//!
//! - [`msg`]: the messages clients, monitors and OSDs exchange (bodies postcard-encoded, bulk data raw);
//! - [`config`]: `cuttle.toml`, every option documented, Ceph's names;
//! - [`monclient`]: keeps a program's map fresh through a subscription and carries its monitor requests;
//! - [`objecter`]: the client library (librados): pools, object ops to each PG's primary, resends, listing.
//!
//! What it deliberately is not:
//! - ids, maps and placement do no IO: nothing there reads a clock or draws an unseeded random number, so the
//!   same map gives the same placement everywhere. The clients (MonClient, Objecter) run on the `messenger`;
//! - not the monitor's policy: which OSD to mark down or out, and when, belongs to `mon`; this crate only
//!   defines the map and how a change applies to it;
//! - not CRUSH: the hierarchy is fixed at root, host, OSD, and there are no rules, device classes or
//!   erasure-coded pools.
//!
//! ```
//! use rados::map::{OsdInfo, OsdMap, Pool, WEIGHT_ONE};
//! use rados::placement::{object_to_pg, Placement};
//! use rados::{Fsid, OsdId, PoolId};
//!
//! // The monitor's first epoch: four OSDs on four hosts (not booted yet) and a pool.
//! let mut map = OsdMap::new(Fsid([1; 16]));
//! let mut inc = map.incremental();
//! for i in 0..4 {
//!     let host = format!("host{i}");
//!     inc.new_osds.insert(OsdId(i), OsdInfo { addrs: None, up: false, in_: true, weight: WEIGHT_ONE, host });
//! }
//! let pool = Pool { id: PoolId(1), name: "rbd".into(), size: 3, min_size: 2, pg_num: 64 };
//! inc.new_pools.insert(PoolId(1), pool);
//! map.apply(&inc)?;
//!
//! // A client, from the same epoch, finds where an object lives.
//! let pg = object_to_pg(&map.pools[&PoolId(1)], b"rbd_header.1234");
//! let placement = Placement::new(&map);
//! assert_eq!(placement.raw_osds(pg)?.len(), 3);
//! assert_eq!(placement.up_acting(pg)?.primary, None, "no OSD is up yet");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod balancer;
pub mod completion;
pub mod config;
pub mod fsutil;
pub mod ids;
pub mod map;
pub mod monclient;
pub mod msg;
pub mod objecter;
pub mod placement;

pub use ids::{Epoch, Fsid, IdParseError, OsdId, PgId, PoolId};
