//! Errors of the NBD session: what goes on the wire, why a connection closed, and shell misuse.

use super::session::RequestId;

/// An error the server reports to the client in a reply. The protocol restricts the error field to these
/// values (proto.md "Error values"); anything else a backend produces is mapped with [`NbdError::from_errno`].
///
/// `NBD_ENOTSUP` (95) is left out on purpose: the spec reserves it for `NBD_CMD_FLAG_FAST_ZERO`, which this
/// server does not advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NbdError {
    #[error("operation not permitted")]
    Perm,
    #[error("input/output error")]
    Io,
    #[error("cannot allocate memory")]
    NoMem,
    #[error("invalid argument")]
    Inval,
    #[error("no space left on device")]
    NoSpc,
    #[error("value too large")]
    Overflow,
    #[error("server is shutting down")]
    Shutdown,
}

// Linux errno values as librbd and librados return them (negated). Spelled out here rather than taken from
// libc because only these few matter and rbd must not grow a dependency for them.
const EPERM: i32 = 1;
const EIO: i32 = 5;
const ENOMEM: i32 = 12;
const EACCES: i32 = 13;
const EINVAL: i32 = 22;
const EFBIG: i32 = 27;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EOVERFLOW: i32 = 75;
const ESHUTDOWN: i32 = 108;
const EDQUOT: i32 = 122;

impl NbdError {
    /// The 32-bit value in a simple reply's error field or a structured error chunk.
    pub fn wire_value(self) -> u32 {
        match self {
            NbdError::Perm => EPERM as u32,
            NbdError::Io => EIO as u32,
            NbdError::NoMem => ENOMEM as u32,
            NbdError::Inval => EINVAL as u32,
            NbdError::NoSpc => ENOSPC as u32,
            NbdError::Overflow => EOVERFLOW as u32,
            NbdError::Shutdown => ESHUTDOWN as u32,
        }
    }

    /// Maps a Linux errno from librbd/librados (either sign; Ceph returns `-errno`) to an NBD error.
    ///
    /// Follows the spec's advice (EDQUOT and EFBIG become ENOSPC; read-only conditions become EPERM) and
    /// Ceph's conventions: `EBLOCKLISTED` is `ESHUTDOWN` in Ceph, and reporting it as `NBD_ESHUTDOWN` makes
    /// the client disconnect cleanly, which is right for a blocklisted client. Everything unrecognised
    /// (ETIMEDOUT, ENOENT, EBUSY...) is an I/O error, as the kernel's NBD client would report it anyway.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno.checked_abs().unwrap_or(i32::MAX) {
            EPERM | EACCES | EROFS => NbdError::Perm,
            ENOMEM => NbdError::NoMem,
            EINVAL => NbdError::Inval,
            ENOSPC | EDQUOT | EFBIG => NbdError::NoSpc,
            EOVERFLOW => NbdError::Overflow,
            ESHUTDOWN => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

/// Why a session ended. Carried by [`super::Event::Close`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT` during option haggling (a soft disconnect); the ACK is queued.
    #[error("client aborted option haggling")]
    ClientAbort,
    /// The client sent `NBD_CMD_DISC` and every outstanding reply has been queued.
    #[error("client disconnected")]
    ClientDisconnect,
    /// The client broke the protocol; the server hard-disconnects.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
}

/// A client protocol violation that the spec answers with a hard disconnect, or a limit past which this
/// server treats the client as a denial of service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("client flags {flags:#x} contain bits the server did not offer")]
    UnknownClientFlags { flags: u32 },
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    #[error("option magic {magic:#018x} is not IHAVEOPT")]
    BadOptionMagic { magic: u64 },
    #[error("more than {max} options during haggling")]
    TooManyOptions { max: u32 },
    #[error("NBD_OPT_EXPORT_NAME names an export of {len} bytes, over the {max}-byte string limit")]
    ExportNameTooLong { len: u32, max: usize },
    /// `NBD_OPT_EXPORT_NAME` cannot return an error, so an unknown name ends the session (spec: MUST).
    #[error("NBD_OPT_EXPORT_NAME names unknown export {name:?}")]
    UnknownExport { name: String },
    #[error("request magic {magic:#010x} is not NBD_REQUEST_MAGIC")]
    BadRequestMagic { magic: u32 },
    #[error("write payload of {len} bytes exceeds the {max}-byte maximum")]
    WritePayloadTooLarge { len: u32, max: u32 },
}

/// Misuse of [`super::ServerSession::reply`] by the shell. The session did nothing: the request is still in
/// flight and can be replied to again correctly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("no request {id:?} is in flight")]
    UnknownRequest { id: RequestId },
    #[error("read of {expected} bytes answered with {got} bytes")]
    ReadLengthMismatch { expected: u32, got: usize },
    #[error("read answered without data")]
    MissingReadData,
    #[error("a request that is not a read was answered with data")]
    UnexpectedData,
}

/// Why an export catalog was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("export name {name:?} is longer than {max} bytes")]
    NameTooLong { name: String, max: usize },
    #[error("export name {name:?} contains NUL")]
    NameHasNul { name: String },
    #[error("export {name:?} is listed twice")]
    DuplicateName { name: String },
    #[error("description of export {name:?} is longer than {max} bytes")]
    DescriptionTooLong { name: String, max: usize },
    #[error("description of export {name:?} contains NUL")]
    DescriptionHasNul { name: String },
}

// The wire values are the Linux errno values the spec chose (proto.md "Error values").
const _: () = assert!(EPERM == 1 && EIO == 5 && ENOMEM == 12 && EINVAL == 22);
const _: () = assert!(ENOSPC == 28 && EOVERFLOW == 75 && ESHUTDOWN == 108);
