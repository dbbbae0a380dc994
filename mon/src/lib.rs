//! mon: cuttle's monitor, the keeper of the OSD map.
//!
//! - [`state`]: [`MonState`], the sans-IO state machine: OSD registration and boot, failure reports and the
//!   grace, down/out timers, pools, health, the cluster log, and what each subscriber lacks. No clock, no IO:
//!   time comes in as `now_ms`, decisions come out as [`Effect`]s (commits and log entries).
//! - [`store`]: the redb file that makes commits durable (fsid, the latest full map, recent incrementals, the
//!   uuid registry, the pool id high-water mark, the cluster log).
//! - [`service`]: [`Monitor`], the runtime: its own worker pool and messenger `mon.0`, the dispatch of
//!   monitor requests, subscriptions, and a tick thread.
//!
//! What it deliberately is not (yet): a quorum. There is one monitor; its commits are the entries a future
//! Paxos/Raft layer would replicate, which is why every decision lives in [`MonState`] and the service only
//! persists and publishes them. The monitor never imports `osd`: it knows OSDs only through the messages in
//! `rados::msg`.
//!
//! Architecture Invariant: a committed epoch is durable (a redb commit) before anyone is sent it, and before
//! the request that caused it is answered.

pub mod service;
pub mod state;
pub mod store;

pub use service::{Monitor, MonitorError};
pub use state::{Effect, MonOptions, MonState};
pub use store::{Store, StoreError};
