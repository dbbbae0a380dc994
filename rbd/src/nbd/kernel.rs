//! Kernel NBD devices (`/dev/nbdN`) through the driver's generic netlink family `nbd` (Linux 4.12 and
//! later), as Ceph's rbd-nbd attaches them by default: [`connect`] hands the driver one end of a socket pair
//! whose other end the server serves ([`super::server::Server::attach`]), with the size and transmission
//! flags a handshake would have told it; [`disconnect`] detaches it. Both need `CAP_SYS_ADMIN`.
//!
//! The older ioctl interface (`NBD_SET_SOCK` and a thread blocked in `NBD_DO_IT`) is not offered: it
//! needs `unsafe` system calls, which this workspace forbids, and every kernel of the last years has the
//! netlink family. The messages are built and parsed here, byte by byte (`netlink(7)`, `genetlink`), on a
//! plain socket: no IO beyond one request and its replies, each wait bounded by [`REPLY_TIMEOUT`].

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Longest a request waits for the kernel's answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

const AF_NETLINK: i32 = 16;
const NETLINK_GENERIC: i32 = 16;
const NLMSG_HEADER_BYTES: usize = 16;
const GENL_HEADER_BYTES: usize = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);

/// The generic netlink controller, which names families.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// `linux/nbd-netlink.h`.
const NBD_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel has no NBD driver (no generic netlink family \"nbd\"; load it with `modprobe nbd`)")]
    NoDriver,
    #[error("{what} needs CAP_SYS_ADMIN (run as root)")]
    NotPermitted { what: &'static str },
    #[error("the kernel refused {what}: {source}")]
    Refused { what: &'static str, source: io::Error },
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// What the driver needs to serve a device: what a client learns in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectSpec {
    /// `Some(n)` for `/dev/nbdN`, `None` for the first free device.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// The device's logical block size (512 unless the caller knows better).
    pub block_size: u64,
    /// `NBD_FLAG_*` transmission flags.
    pub flags: u16,
    /// Fails requests that take longer (`None`: the kernel's default).
    pub timeout: Option<Duration>,
}

/// The device node of index `n`.
pub fn device_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{n}"))
}

/// The index in a device path `/dev/nbdN`.
pub fn parse_device(path: &str) -> Option<u32> {
    let n = path.strip_prefix("/dev/nbd")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// Whether the kernel has the NBD driver's netlink family: [`KernelError::NoDriver`] if not.
pub fn check_driver() -> Result<()> {
    Genl::open()?.family(NBD_FAMILY_NAME).map(|_| ())
}

/// Hands `socket` to a device as its connection to the server; returns the device's index. The caller may
/// close its copy of `socket` afterwards (the driver holds its own reference).
pub fn connect(spec: &ConnectSpec, socket: BorrowedFd<'_>) -> Result<u32> {
    let mut g = Genl::open()?;
    let family = g.family(NBD_FAMILY_NAME)?;
    let replies = g.request(
        family,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
        &connect_attrs(spec, socket),
        "NBD_CMD_CONNECT",
    )?;
    replies
        .iter()
        .find_map(|r| attr(r, NBD_ATTR_INDEX).and_then(|v| Some(u32::from_ne_bytes(v.try_into().ok()?))))
        .ok_or(KernelError::Malformed("NBD_CMD_CONNECT answered without the device index"))
}

/// Disconnects device `index`: the driver sends `NBD_CMD_DISC` on its socket and closes it.
pub fn disconnect(index: u32) -> Result<()> {
    let mut g = Genl::open()?;
    let family = g.family(NBD_FAMILY_NAME)?;
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NBD_ATTR_INDEX, &index.to_ne_bytes());
    g.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &attrs, "NBD_CMD_DISCONNECT").map(|_| ())
}

fn connect_attrs(spec: &ConnectSpec, socket: BorrowedFd<'_>) -> Vec<u8> {
    let mut a = Vec::new();
    if let Some(i) = spec.index {
        put_attr(&mut a, NBD_ATTR_INDEX, &i.to_ne_bytes());
    }
    put_attr(&mut a, NBD_ATTR_SIZE_BYTES, &spec.size_bytes.to_ne_bytes());
    put_attr(&mut a, NBD_ATTR_BLOCK_SIZE_BYTES, &spec.block_size.to_ne_bytes());
    if let Some(t) = spec.timeout {
        put_attr(&mut a, NBD_ATTR_TIMEOUT, &t.as_secs().max(1).to_ne_bytes());
    }
    put_attr(&mut a, NBD_ATTR_SERVER_FLAGS, &u64::from(spec.flags).to_ne_bytes());
    let fd = u32::try_from(socket.as_raw_fd()).expect("file descriptors are not negative");
    let mut item = Vec::new();
    put_attr(&mut item, NBD_SOCK_FD, &fd.to_ne_bytes());
    let mut sockets = Vec::new();
    put_attr(&mut sockets, NBD_SOCK_ITEM | NLA_F_NESTED, &item);
    put_attr(&mut a, NBD_ATTR_SOCKETS | NLA_F_NESTED, &sockets);
    a
}

/// Appends one attribute (`struct nlattr`: length, type, payload padded to 4 bytes).
fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("attributes here are small");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The payload of the first attribute of type `ty` among `attrs`.
fn attr(attrs: &[u8], ty: u16) -> Option<&[u8]> {
    let mut rest = attrs;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let t = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            return None;
        }
        if t == ty {
            return Some(&rest[4..len]);
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    None
}

/// A whole netlink message: header, generic netlink header, attributes.
fn message(family: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HEADER_BYTES + GENL_HEADER_BYTES + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// What one datagram from the kernel says about request `seq`.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The attributes of each reply message of `family`, and whether the request's ack came with them.
    Replies { attrs: Vec<Vec<u8>>, acked: bool },
    /// The request failed with this errno.
    Failed(i32),
}

fn parse(buf: &[u8], family: u16, seq: u32) -> std::result::Result<Parsed, &'static str> {
    let mut attrs = Vec::new();
    let mut acked = false;
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.len() < NLMSG_HEADER_BYTES {
            return Err("a truncated message header");
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        let mseq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HEADER_BYTES || len > rest.len() {
            return Err("a message length out of bounds");
        }
        let body = &rest[NLMSG_HEADER_BYTES..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if mseq != seq {
            continue; // an answer to an earlier request on this socket
        }
        match ty {
            NLMSG_ERROR => {
                let code = body.get(..4).ok_or("a truncated error message")?;
                let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
                if code != 0 {
                    return Ok(Parsed::Failed(-code));
                }
                acked = true;
            }
            NLMSG_DONE => acked = true,
            t if t == family => {
                let a = body.get(GENL_HEADER_BYTES..).ok_or("a truncated generic netlink header")?;
                attrs.push(a.to_vec());
            }
            _ => {}
        }
    }
    Ok(Parsed::Replies { attrs, acked })
}

/// A generic netlink socket.
struct Genl {
    sock: Socket,
    seq: u32,
}

impl Genl {
    fn open() -> Result<Genl> {
        let sock = Socket::new(Domain::from(AF_NETLINK), Type::DGRAM, Some(Protocol::from(NETLINK_GENERIC)))?;
        sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Genl { sock, seq: 0 })
    }

    /// The id of the family `name`.
    fn family(&mut self, name: &str) -> Result<u16> {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, format!("{name}\0").as_bytes());
        let replies = match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &attrs, "CTRL_CMD_GETFAMILY") {
            Err(KernelError::Refused { source, .. }) if source.raw_os_error() == Some(2) => {
                return Err(KernelError::NoDriver)
            }
            r => r?,
        };
        replies
            .iter()
            .find_map(|r| {
                attr(r, CTRL_ATTR_FAMILY_ID).and_then(|v| Some(u16::from_ne_bytes(v.try_into().ok()?)))
            })
            .ok_or(KernelError::Malformed("CTRL_CMD_GETFAMILY answered without the family id"))
    }

    /// Sends one request (unicast to the kernel: an unconnected netlink socket's default destination) and
    /// collects the attributes of its replies until its ack.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[u8],
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        self.sock.send(&message(family, self.seq, cmd, version, attrs))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match (&self.sock).read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(KernelError::Refused { what, source: io::Error::new(e.kind(), "no answer") })
                }
                Err(e) => return Err(e.into()),
            };
            match parse(&buf[..n], family, self.seq).map_err(KernelError::Malformed)? {
                Parsed::Failed(1) => return Err(KernelError::NotPermitted { what }),
                Parsed::Failed(errno) => {
                    return Err(KernelError::Refused { what, source: io::Error::from_raw_os_error(errno) })
                }
                Parsed::Replies { attrs, acked } => {
                    out.extend(attrs);
                    if acked {
                        return Ok(out);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_parse_and_print() {
        assert_eq!(parse_device("/dev/nbd0"), Some(0));
        assert_eq!(parse_device("/dev/nbd15"), Some(15));
        for bad in
            ["/dev/nbd", "/dev/nbd01", "/dev/nbdx", "nbd0", "/dev/nbd-1", "/dev/sda", "/dev/nbd99999999999"]
        {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
        assert_eq!(device_path(3), PathBuf::from("/dev/nbd3"));
    }

    #[test]
    fn connect_request_lays_out_nested_attributes() {
        // Goal: the CONNECT request is what nbd-netlink.h describes: u32 index, u64 sizes and flags, and the
        // socket as SOCKETS { ITEM { FD } }, both nested, each attribute padded to 4 bytes. Method: decode
        // the encoded attributes by hand.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let spec = ConnectSpec {
            index: Some(3),
            size_bytes: 1 << 30,
            block_size: 512,
            flags: 0x1 | 0x4,
            timeout: Some(Duration::from_secs(30)),
        };
        use std::os::fd::AsFd;
        let attrs = connect_attrs(&spec, a.as_fd());
        let u64_of = |ty| u64::from_ne_bytes(attr(&attrs, ty).unwrap().try_into().unwrap());
        assert_eq!(attr(&attrs, NBD_ATTR_INDEX).unwrap(), 3u32.to_ne_bytes());
        assert_eq!(u64_of(NBD_ATTR_SIZE_BYTES), 1 << 30);
        assert_eq!(u64_of(NBD_ATTR_BLOCK_SIZE_BYTES), 512);
        assert_eq!(u64_of(NBD_ATTR_TIMEOUT), 30);
        assert_eq!(u64_of(NBD_ATTR_SERVER_FLAGS), 0x5);
        let sockets = attr(&attrs, NBD_ATTR_SOCKETS).unwrap();
        let item = attr(sockets, NBD_SOCK_ITEM).unwrap();
        assert_eq!(attr(item, NBD_SOCK_FD).unwrap(), (a.as_raw_fd() as u32).to_ne_bytes());
        // The nested flag is set on the wire, and every attribute starts 4-aligned.
        let mut rest = &attrs[..];
        let mut types = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
            types.push(u16::from_ne_bytes([rest[2], rest[3]]));
            rest = &rest[len.next_multiple_of(4)..];
        }
        assert_eq!(
            types,
            [1, 2, 3, 4, 5, 7 | NLA_F_NESTED],
            "index, size, block size, timeout, flags, sockets"
        );
        let m = message(0x1234, 9, NBD_CMD_CONNECT, 1, &attrs);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
    }

    #[test]
    fn replies_parse_into_attributes_acks_and_errors() {
        let msg = |ty: u16, seq: u32, body: &[u8]| {
            let mut m = Vec::new();
            m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(body);
            m
        };
        let mut reply_body = vec![NBD_CMD_CONNECT, 1, 0, 0];
        put_attr(&mut reply_body, NBD_ATTR_INDEX, &5u32.to_ne_bytes());
        let mut buf = msg(0x20, 7, &reply_body);
        buf.extend(msg(NLMSG_ERROR, 7, &0i32.to_ne_bytes()));
        let Parsed::Replies { attrs, acked } = parse(&buf, 0x20, 7).unwrap() else { panic!() };
        assert!(acked);
        assert_eq!(attr(&attrs[0], NBD_ATTR_INDEX).unwrap(), 5u32.to_ne_bytes());
        // Another request's answer is skipped; an error carries its errno.
        assert_eq!(parse(&buf, 0x20, 8).unwrap(), Parsed::Replies { attrs: vec![], acked: false });
        assert_eq!(
            parse(&msg(NLMSG_ERROR, 7, &(-16i32).to_ne_bytes()), 0x20, 7).unwrap(),
            Parsed::Failed(16)
        );
        // Garbage is refused, not trusted.
        assert!(parse(&buf[..10], 0x20, 7).is_err());
        let mut bad = msg(0x20, 7, &[]);
        bad[0] = 200;
        assert!(parse(&bad, 0x20, 7).is_err());
        assert!(parse(&msg(NLMSG_ERROR, 7, &[1]), 0x20, 7).is_err());
        assert_eq!(attr(&[8, 0, 1, 0, 1, 2], 1), None, "an attribute longer than its buffer");
    }

    #[test]
    fn the_kernel_answers_family_lookups() {
        // Goal: the socket plumbing works against this machine's kernel. Method: the controller names itself;
        // the nbd family exists exactly when the nbd module is loaded.
        let mut g = Genl::open().unwrap();
        assert_eq!(g.family("nlctrl").unwrap(), GENL_ID_CTRL);
        let loaded = std::path::Path::new("/sys/module/nbd").exists();
        match check_driver() {
            Ok(()) => assert!(loaded, "the nbd family without the module"),
            Err(KernelError::NoDriver) => assert!(!loaded, "the module without the nbd family"),
            Err(e) => panic!("{e}"),
        }
    }
}
