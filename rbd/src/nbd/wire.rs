//! NBD wire constants and fixed sizes, as in NetworkBlockDevice/nbd `doc/proto.md`.
//!
//! NBD is an external protocol: every integer on its wire is big-endian (network byte order), unlike
//! cuttle's own little-endian formats.

// Handshake.
/// `NBDMAGIC`, the first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows NBDMAGIC in the greeting and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option reply types. Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types inside NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bits, per export).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Fixed sizes, spelled out field by field so a wrong constant fails to compile.
/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Client flags.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Reply to NBD_OPT_EXPORT_NAME without the zero padding: size, transmission flags.
pub const EXPORT_NAME_REPLY_BYTES: usize = 8 + 2;
/// Reserved zeroes after an NBD_OPT_EXPORT_NAME reply unless the client negotiated NO_ZEROES.
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Request header: magic, command flags, type, cookie, offset, length.
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
/// Simple reply: magic, error, cookie.
pub const SIMPLE_REPLY_BYTES: usize = 4 + 4 + 8;
/// Structured reply chunk header: magic, flags, type, cookie, payload length.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 4;
/// NBD_INFO_EXPORT payload: type, size, transmission flags.
pub const INFO_EXPORT_BYTES: usize = 2 + 8 + 2;
/// NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_BYTES: usize = 2 + 4 + 4 + 4;

const _: () = assert!(GREETING_BYTES == 18);
const _: () = assert!(OPTION_HEADER_BYTES == 16);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 20);
const _: () = assert!(REQUEST_HEADER_BYTES == 28);
const _: () = assert!(SIMPLE_REPLY_BYTES == 16);
const _: () = assert!(STRUCTURED_REPLY_HEADER_BYTES == 20);
const _: () = assert!(INFO_EXPORT_BYTES == 12);
const _: () = assert!(INFO_BLOCK_SIZE_BYTES == 14);
