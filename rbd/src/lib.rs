//! rbd: cuttle's librbd, block images on top of RADOS, and the NBD protocol that exposes them.
//!
//! The crate will hold the image format (format-2 naming, header metadata), striping, the image I/O layers
//! and an async API for clients such as the `rbd` tool and an NBD server. What is here now are its two
//! pure, IO-free foundations:
//!
//! - [`striper`]: Ceph's striping formula (image extent to object extents and back, object counts) and data
//!   object naming (`rbd_data.<id>.<016x>`).
//! - [`nbd`]: the NBD server protocol as a sans-IO state machine ([`nbd::ServerSession`]): fixed newstyle
//!   handshake, simple and structured replies, out-of-order completion, bounded in-flight work.
//!
//! What it deliberately is not: no sockets, threads or clocks live here (STYLE.md §2); the shells in
//! tools/ move the bytes. Like every client of the cluster, rbd never imports mon or osd.

pub mod nbd;
pub mod striper;
