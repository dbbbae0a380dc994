//! The NBD server protocol (NetworkBlockDevice/nbd `doc/proto.md`), sans-IO.
//!
//! [`ServerSession`] is one connection: bytes in, [`Event`]s and reply bytes out. It implements the fixed
//! newstyle handshake (NBD_OPT_EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY; everything else is
//! answered NBD_REP_ERR_UNSUP) and the transmission phase (READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES
//! with FUA and NO_HOLE), with simple or structured replies and replies in any order.
//!
//! What it deliberately is not: it has no socket, thread, clock or TLS (the spec's NOTLS mode), does no
//! I/O against an image, and offers no metadata contexts (NBD_CMD_BLOCK_STATUS), NBD_CMD_CACHE or extended
//! headers. The shell that owns the sockets, [`server`] (one open image served on the messenger's worker
//! threads), and librbd do those.

mod error;
mod export;
pub mod kernel;
mod session;
pub mod wire;

pub use error::{CatalogError, CloseReason, NbdError, ProtocolError, ReplyError};
pub use export::{ExportCatalog, ExportInfo, STRING_BYTES_MAX};
pub use session::transmission_flags;
pub use session::{
    Event, RequestId, RequestKind, ServerSession, BLOCK_SIZE_MIN_BYTES, BLOCK_SIZE_PREFERRED_BYTES,
    INPUT_BUFFER_BYTES_MAX, OPTIONS_MAX, OPTION_DATA_BYTES_MAX, PAYLOAD_BYTES_MAX, REQUESTS_IN_FLIGHT_MAX,
    TRANSMIT_BACKLOG_BYTES_MAX,
};
pub mod server;
