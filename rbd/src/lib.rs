//! rbd: cuttle's librbd, block images on top of RADOS, and the NBD protocol that exposes them.
//!
//! The crate holds the image format (format-2 naming, header metadata), striping, the image I/O path
//! and an async API for clients such as the `rbd` tool and an NBD server:
//!
//! - [`image`]: `Rbd` (create, open, list, info, remove, rename on one pool) and `Image` (read, write,
//!   discard, write_zeroes, resize, flush and their `aio_*` forms), Ceph format 2 on the Objecter. Header
//!   updates are read-modify-writes guarded by `assert_version`.
//! - [`layers`]: the image I/O layers (write-back cache, read-ahead) between `Image` and object dispatch.
//! - [`striper`]: Ceph's striping formula (image extent to object extents and back, object counts) and data
//!   object naming (`rbd_data.<id>.<016x>`).
//! - [`nbd`]: the NBD server protocol as a sans-IO state machine ([`nbd::ServerSession`]): fixed newstyle
//!   handshake, simple and structured replies, out-of-order completion, bounded in-flight work; and
//!   [`nbd::server`], the thin mio shell that serves an `Image` over it (what `rbd map` runs).
//!
//! What it deliberately is not: `striper` and the NBD protocol core hold no sockets, threads or clocks
//! (STYLE.md §2); `nbd::server` is the only socket code here. `image` and `layers` drive the Objecter; the
//! only thread they own is a cached image's flusher. Object dispatch (`dispatch`) has no thread: object ops
//! start on the submitter's thread, or on the messenger thread whose completion freed budget. Like every
//! client of the cluster, rbd never imports mon or osd.

mod dispatch;
pub mod image;
pub mod layers;
pub mod nbd;
pub mod striper;
