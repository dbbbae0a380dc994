//! The server side of one NBD connection, as a state machine that does no IO.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{CloseReason, NbdError, ProtocolError, ReplyError};
use super::export::{ExportCatalog, ExportInfo, STRING_BYTES_MAX};
use super::wire::*;

/// Requests handed to the shell and not yet answered. When reached, the session stops consuming input
/// (and [`ServerSession::wants_read`] turns false) until a reply frees a slot, so a client cannot make the
/// server queue unbounded work. The kernel client's default queue depth is 128.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 128;
/// Largest write payload accepted, and largest read answered with a simple reply: 2^25, the size the spec
/// says must never be treated as a denial of service, and the maximum we advertise in NBD_INFO_BLOCK_SIZE.
pub const PAYLOAD_BYTES_MAX: u32 = 32 << 20;
/// Block sizes advertised in NBD_INFO_BLOCK_SIZE: the spec's defaults. librbd handles unaligned I/O, so
/// the minimum is 1.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;
/// Largest option payload buffered: an export name at the string limit plus 4 KiB for the rest (info
/// requests). Larger options are skipped without buffering and answered with NBD_REP_ERR_TOO_BIG.
pub const OPTION_DATA_BYTES_MAX: u32 = STRING_BYTES_MAX as u32 + 4096;
/// Options accepted per session before the server calls it a denial of service and disconnects.
pub const OPTIONS_MAX: u32 = 256;
/// Reply bytes queued but not yet taken by [`ServerSession::poll_transmit`] beyond which the session stops
/// consuming input: a client that sends but never reads gets TCP backpressure, not server memory.
pub const TRANSMIT_BACKLOG_BYTES_MAX: usize = 64 << 20;
/// Buffered, unparsed input beyond which [`ServerSession::wants_read`] is false: one maximal write.
pub const INPUT_BUFFER_BYTES_MAX: usize = REQUEST_HEADER_BYTES + PAYLOAD_BYTES_MAX as usize;

/// Identifies one request handed to the shell, for [`ServerSession::reply`]. Unique within a session.
///
/// Not the client's cookie: clients SHOULD but need not keep cookies unique among requests in flight, and
/// the session must know which request (a read or not, which range) each reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// What the session wants the shell to know or do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Option haggling is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded): requests for this export
    /// follow. Emitted before any [`Event::Request`].
    ExportSelected { export: ExportInfo },
    /// Do this I/O, then call [`ServerSession::reply`] with `id`, in any order relative to other requests.
    Request { id: RequestId, cookie: u64, kind: RequestKind },
    /// The session is over: queue no more work, drain [`ServerSession::poll_transmit`] (it holds any final
    /// replies, such as the ACK of NBD_OPT_ABORT) and close the socket. After a client disconnect this comes
    /// only once every outstanding request has been replied to.
    Close { reason: CloseReason },
}

/// A validated request: within the export, allowed on it, and not empty. `fua` asks that the data be
/// durable before the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool, no_hole: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Greeting queued; waiting for the client's 32-bit flags.
    ClientFlags,
    /// Waiting for the next option header.
    Options,
    /// Discarding an option's data without buffering it, then sending `reply` (an error reply type).
    SkipOption {
        option: u32,
        remaining: u32,
        reply: u32,
        message: &'static str,
    },
    /// Parsing requests for the selected export.
    Transmission,
    /// Got NBD_CMD_DISC: ignoring input, waiting for outstanding replies.
    Draining,
    Closed,
}

/// What the session remembers of a request in flight, to shape its reply.
#[derive(Debug, Clone, Copy)]
struct Pending {
    cookie: u64,
    /// `Some((offset, len))` for reads: the reply carries data and, if structured, its offset.
    read: Option<(u64, u32)>,
}

/// The transmission flags (`NBD_FLAG_*`) a server offers for `export`, to a client that negotiated structured
/// replies or not.
pub fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if export.can_multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    // Every read is answered with a single chunk, so "don't fragment" is honoured for free; the spec forbids
    // advertising it without structured replies.
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// One NBD connection, server side, fixed newstyle handshake.
///
/// Sans-IO (STYLE.md §2): the shell feeds socket bytes to [`received`](Self::received), performs the I/O
/// of each [`Event::Request`], reports results with [`reply`](Self::reply), and writes out what
/// [`poll_transmit`](Self::poll_transmit) returns. The session reads no clock and touches no socket.
///
/// Shell contract: read from the socket only while [`wants_read`](Self::wants_read) is true, and in bounded
/// chunks (then buffered input stays below [`INPUT_BUFFER_BYTES_MAX`] plus one chunk); after every call,
/// drain `poll_event` and `poll_transmit`. Input is never trusted: malformed bytes end in an error reply or
/// an [`Event::Close`], never a panic.
#[derive(Debug)]
pub struct ServerSession {
    catalog: Arc<ExportCatalog>,
    phase: Phase,
    input: BytesMut,
    /// Client negotiated NBD_FLAG_C_NO_ZEROES.
    no_zeroes: bool,
    /// Client negotiated NBD_OPT_STRUCTURED_REPLY.
    structured: bool,
    options_seen: u32,
    /// The export chosen by NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
    selected: Option<ExportInfo>,
    next_request_id: u64,
    pending: HashMap<RequestId, Pending>,
    events: VecDeque<Event>,
    /// Whole chunks ready to send, in order; `out_small` (headers and other small replies, coalesced so
    /// the shell sees few chunks) always comes after them.
    out: VecDeque<Bytes>,
    out_small: BytesMut,
    out_bytes: usize,
}

impl ServerSession {
    /// A new connection. The greeting (NBDMAGIC, IHAVEOPT, handshake flags) is queued for transmit at once.
    pub fn new(catalog: Arc<ExportCatalog>) -> Self {
        let mut session = ServerSession::blank(catalog);
        let mut greeting = [0u8; GREETING_BYTES];
        let mut w = &mut greeting[..];
        w.put_u64(NBDMAGIC);
        w.put_u64(IHAVEOPT);
        w.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert!(w.is_empty());
        session.push_small(&greeting);
        session
    }

    fn blank(catalog: Arc<ExportCatalog>) -> Self {
        ServerSession {
            catalog,
            phase: Phase::ClientFlags,
            input: BytesMut::new(),
            no_zeroes: false,
            structured: false,
            options_seen: 0,
            selected: None,
            next_request_id: 0,
            pending: HashMap::new(),
            events: VecDeque::new(),
            out: VecDeque::new(),
            out_small: BytesMut::new(),
            out_bytes: 0,
        }
    }

    /// A connection whose handshake happened elsewhere: the kernel's NBD driver, handed one end of a socket
    /// pair (`rbd map --device`), speaks the transmission phase from its first byte, with simple replies and
    /// the flags it was given at connect ([`ServerSession::transmission_flags`]). Starts in transmission on
    /// `export`, which must be in `catalog`.
    pub fn preconnected(catalog: Arc<ExportCatalog>, export: &str) -> Option<Self> {
        let export = catalog.find(export.as_bytes())?.clone();
        let mut session = ServerSession::blank(catalog);
        session.enter_transmission(export);
        Some(session)
    }

    /// The transmission flags (`NBD_FLAG_*`) this session offers for its export, `None` before one is
    /// selected: what a client that skipped the handshake must be told another way.
    pub fn transmission_flags(&self) -> Option<u16> {
        self.selected.as_ref().map(|e| transmission_flags(e, self.structured))
    }

    /// Bytes read from the socket. Parses as far as the limits allow; input after the session closed or
    /// after NBD_CMD_DISC is dropped (the client must send nothing more).
    pub fn received(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::Draining | Phase::Closed) {
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// Whether the shell should read more from the socket now.
    pub fn wants_read(&self) -> bool {
        self.can_consume() && self.input.len() < INPUT_BUFFER_BYTES_MAX
    }

    /// The next event, in the order they happened.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next chunk to write to the socket. Read data comes back as the very `Bytes` passed to
    /// [`reply`](Self::reply), after its own header chunk, so the payload is never copied.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let chunk = match self.out.pop_front() {
            Some(chunk) => chunk,
            None if !self.out_small.is_empty() => self.out_small.split().freeze(),
            None => return None,
        };
        assert!(chunk.len() <= self.out_bytes);
        self.out_bytes -= chunk.len();
        // Draining may have lifted the backlog limit on buffered input.
        self.process();
        Some(chunk)
    }

    /// Answers request `id`: `Ok(Some(data))` for a read (exactly the requested length), `Ok(None)` for
    /// anything else, `Err` to report an error. Replies may come in any order. After the session closed,
    /// replies are accepted and dropped.
    pub fn reply(
        &mut self,
        id: RequestId,
        result: Result<Option<Bytes>, NbdError>,
    ) -> Result<(), ReplyError> {
        let Some(pending) = self.pending.get(&id).copied() else {
            return Err(ReplyError::UnknownRequest { id });
        };
        match (pending.read, &result) {
            (Some((_, len)), Ok(Some(data))) if data.len() != len as usize => {
                return Err(ReplyError::ReadLengthMismatch { expected: len, got: data.len() });
            }
            (Some(_), Ok(None)) => return Err(ReplyError::MissingReadData),
            (None, Ok(Some(_))) => return Err(ReplyError::UnexpectedData),
            _ => {}
        }
        self.pending.remove(&id);
        if self.phase != Phase::Closed {
            match result {
                Ok(data) => self.send_success(pending.cookie, pending.read.map(|(offset, _)| offset), data),
                Err(error) => self.send_error(pending.cookie, error, &error.to_string()),
            }
        }
        if self.phase == Phase::Draining && self.pending.is_empty() {
            self.close(CloseReason::ClientDisconnect);
        }
        // A free slot may let buffered requests through.
        self.process();
        Ok(())
    }

    /// Requests handed out and not yet replied to.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Queued reply bytes not yet taken by `poll_transmit`.
    pub fn transmit_backlog_bytes(&self) -> usize {
        self.out_bytes
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    fn can_consume(&self) -> bool {
        let phase_reads = matches!(
            self.phase,
            Phase::ClientFlags | Phase::Options | Phase::SkipOption { .. } | Phase::Transmission
        );
        phase_reads
            && self.pending.len() < REQUESTS_IN_FLIGHT_MAX
            && self.out_bytes < TRANSMIT_BACKLOG_BYTES_MAX
    }

    /// Parses buffered input until it runs out or a limit stops it.
    fn process(&mut self) {
        while self.can_consume() {
            let progressed = match self.phase {
                Phase::ClientFlags => self.on_client_flags(),
                Phase::Options => self.on_option(),
                Phase::SkipOption { option, remaining, reply, message } => {
                    self.on_skip(option, remaining, reply, message)
                }
                Phase::Transmission => self.on_request(),
                Phase::Draining | Phase::Closed => false,
            };
            if !progressed {
                break;
            }
        }
        // Every event is a request holding a slot, plus at most one ExportSelected and one Close.
        assert!(self.events.len() <= REQUESTS_IN_FLIGHT_MAX + 2);
    }

    fn close(&mut self, reason: CloseReason) {
        assert!(self.phase != Phase::Closed, "closed twice");
        self.phase = Phase::Closed;
        self.input = BytesMut::new();
        self.events.push_back(Event::Close { reason });
    }

    fn protocol_error(&mut self, error: ProtocolError) -> bool {
        self.close(CloseReason::Protocol(error));
        true
    }

    // Handshake.

    fn on_client_flags(&mut self) -> bool {
        if self.input.len() < CLIENT_FLAGS_BYTES {
            return false;
        }
        let flags = self.input.get_u32();
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return self.protocol_error(ProtocolError::UnknownClientFlags { flags });
        }
        // Plain newstyle clients could only send NBD_OPT_EXPORT_NAME; every client in use today sets the
        // fixed-newstyle bit, and refusing the rest keeps one haggling code path.
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return self.protocol_error(ProtocolError::NotFixedNewstyle);
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
        true
    }

    fn on_option(&mut self) -> bool {
        let Some(header) = self.input.get(..OPTION_HEADER_BYTES) else {
            return false;
        };
        let mut header = header;
        let magic = header.get_u64();
        let option = header.get_u32();
        let len = header.get_u32();
        if magic != IHAVEOPT {
            return self.protocol_error(ProtocolError::BadOptionMagic { magic });
        }
        if self.options_seen == OPTIONS_MAX {
            return self.protocol_error(ProtocolError::TooManyOptions { max: OPTIONS_MAX });
        }
        match option {
            OPT_ABORT => {
                // Data is ignored (spec: SHOULD ignore rather than reject), and never waited for.
                self.consume_option_header();
                self.send_option_reply(option, REP_ACK, &[]);
                self.close(CloseReason::ClientAbort);
                true
            }
            OPT_EXPORT_NAME => {
                if len as usize > STRING_BYTES_MAX {
                    return self
                        .protocol_error(ProtocolError::ExportNameTooLong { len, max: STRING_BYTES_MAX });
                }
                let Some(name) = self.take_option_data(len) else {
                    return false;
                };
                self.on_export_name(&name);
                true
            }
            OPT_LIST | OPT_STRUCTURED_REPLY if len != 0 => {
                self.consume_option_header();
                self.skip_option(option, len, REP_ERR_INVALID, "this option takes no data");
                true
            }
            OPT_LIST => {
                self.consume_option_header();
                self.on_list();
                true
            }
            OPT_STRUCTURED_REPLY => {
                self.consume_option_header();
                // Repeating it is harmless, so a repeat is acknowledged rather than failed.
                self.structured = true;
                self.send_option_reply(option, REP_ACK, &[]);
                true
            }
            OPT_INFO | OPT_GO if len > OPTION_DATA_BYTES_MAX => {
                self.consume_option_header();
                self.skip_option(option, len, REP_ERR_TOO_BIG, "option data too large");
                true
            }
            OPT_INFO | OPT_GO => {
                let Some(data) = self.take_option_data(len) else {
                    return false;
                };
                self.on_info_or_go(option, &data);
                true
            }
            _ => {
                // Includes NBD_OPT_STARTTLS: this server runs in the spec's NOTLS mode.
                self.consume_option_header();
                self.skip_option(option, len, REP_ERR_UNSUP, "option not supported");
                true
            }
        }
    }

    fn consume_option_header(&mut self) {
        assert!(self.input.len() >= OPTION_HEADER_BYTES);
        self.input.advance(OPTION_HEADER_BYTES);
        self.options_seen += 1;
    }

    /// The option's data once all of it is buffered (consuming the header too), else `None`.
    fn take_option_data(&mut self, len: u32) -> Option<Bytes> {
        assert!(len <= OPTION_DATA_BYTES_MAX);
        if self.input.len() < OPTION_HEADER_BYTES + len as usize {
            return None;
        }
        self.consume_option_header();
        Some(self.input.split_to(len as usize).freeze())
    }

    fn skip_option(&mut self, option: u32, len: u32, reply: u32, message: &'static str) {
        self.phase = Phase::SkipOption { option, remaining: len, reply, message };
    }

    fn on_skip(&mut self, option: u32, remaining: u32, reply: u32, message: &'static str) -> bool {
        let n = (remaining as usize).min(self.input.len());
        self.input.advance(n);
        let remaining = remaining - n as u32;
        if remaining > 0 {
            self.phase = Phase::SkipOption { option, remaining, reply, message };
            return n > 0;
        }
        self.send_option_reply(option, reply, message.as_bytes());
        self.phase = Phase::Options;
        true
    }

    fn on_export_name(&mut self, name: &[u8]) {
        let Some(export) = self.catalog.find(name).cloned() else {
            let name = String::from_utf8_lossy(name).into_owned();
            self.close(CloseReason::Protocol(ProtocolError::UnknownExport { name }));
            return;
        };
        let mut reply = [0u8; EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES];
        let mut w = &mut reply[..];
        w.put_u64(export.size_bytes);
        w.put_u16(transmission_flags(&export, self.structured));
        let len = if self.no_zeroes { EXPORT_NAME_REPLY_BYTES } else { reply.len() };
        self.push_small(&reply[..len]);
        self.enter_transmission(export);
    }

    fn on_list(&mut self) {
        let catalog = Arc::clone(&self.catalog);
        for export in catalog.exports() {
            let mut data = Vec::with_capacity(4 + export.name.len() + export.description.len());
            data.put_u32(export.name.len() as u32);
            data.put_slice(export.name.as_bytes());
            // The spec allows human-readable details after the name; the description is exactly that.
            data.put_slice(export.description.as_bytes());
            self.send_option_reply(OPT_LIST, REP_SERVER, &data);
        }
        self.send_option_reply(OPT_LIST, REP_ACK, &[]);
    }

    /// NBD_OPT_INFO and NBD_OPT_GO share a format: u32 name length, name, u16 count, count × u16 info types.
    fn on_info_or_go(&mut self, option: u32, data: &[u8]) {
        let Some((name, info_requests)) = parse_info_request(data) else {
            self.send_option_reply(option, REP_ERR_INVALID, b"malformed request");
            return;
        };
        if name.len() > STRING_BYTES_MAX {
            self.send_option_reply(option, REP_ERR_INVALID, b"export name too long");
            return;
        }
        let Some(export) = self.catalog.find(name).cloned() else {
            self.send_option_reply(option, REP_ERR_UNKNOWN, b"unknown export");
            return;
        };
        let wants =
            |info: u16| info_requests.chunks_exact(2).any(|c| u16::from_be_bytes([c[0], c[1]]) == info);

        // NBD_INFO_EXPORT is mandatory before an ACK; the others only when asked for.
        let mut info = [0u8; INFO_EXPORT_BYTES];
        let mut w = &mut info[..];
        w.put_u16(INFO_EXPORT);
        w.put_u64(export.size_bytes);
        w.put_u16(transmission_flags(&export, self.structured));
        self.send_option_reply(option, REP_INFO, &info);
        if wants(INFO_NAME) {
            self.send_option_reply(option, REP_INFO, &info_string(INFO_NAME, &export.name));
        }
        if wants(INFO_DESCRIPTION) && !export.description.is_empty() {
            self.send_option_reply(option, REP_INFO, &info_string(INFO_DESCRIPTION, &export.description));
        }
        if wants(INFO_BLOCK_SIZE) {
            let mut info = [0u8; INFO_BLOCK_SIZE_BYTES];
            let mut w = &mut info[..];
            w.put_u16(INFO_BLOCK_SIZE);
            w.put_u32(BLOCK_SIZE_MIN_BYTES);
            w.put_u32(BLOCK_SIZE_PREFERRED_BYTES);
            w.put_u32(PAYLOAD_BYTES_MAX);
            self.send_option_reply(option, REP_INFO, &info);
        }
        self.send_option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.enter_transmission(export);
        }
    }

    fn enter_transmission(&mut self, export: ExportInfo) {
        assert!(self.selected.is_none());
        self.events.push_back(Event::ExportSelected { export: export.clone() });
        self.selected = Some(export);
        self.phase = Phase::Transmission;
    }

    // Transmission.

    fn on_request(&mut self) -> bool {
        let Some(header) = self.input.get(..REQUEST_HEADER_BYTES) else {
            return false;
        };
        let mut header = header;
        let magic = header.get_u32();
        let flags = header.get_u16();
        let command = header.get_u16();
        let cookie = header.get_u64();
        let offset = header.get_u64();
        let len = header.get_u32();
        if magic != REQUEST_MAGIC {
            return self.protocol_error(ProtocolError::BadRequestMagic { magic });
        }
        let payload_len = if command == CMD_WRITE { len } else { 0 };
        // A payload this large cannot be skipped cheaply; the spec lets a server treat anything over 2^25
        // as a denial of service.
        if payload_len > PAYLOAD_BYTES_MAX {
            return self.protocol_error(ProtocolError::WritePayloadTooLarge { len, max: PAYLOAD_BYTES_MAX });
        }
        if self.input.len() < REQUEST_HEADER_BYTES + payload_len as usize {
            return false;
        }
        self.input.advance(REQUEST_HEADER_BYTES);
        // Consumed even when the request is refused below, to stay in step with the client.
        let payload = self.input.split_to(payload_len as usize).freeze();

        if command == CMD_DISC {
            // Flags, offset and length of a disconnect are ignored: the answer is the same.
            self.phase = Phase::Draining;
            self.input = BytesMut::new();
            if self.pending.is_empty() {
                self.close(CloseReason::ClientDisconnect);
            }
            return true;
        }
        let is_read = command == CMD_READ;
        match self.validate(flags, command, offset, len) {
            Err((error, message)) => self.send_error(cookie, error, message),
            // Zero-length I/O is unspecified but must not disconnect; it has nothing to do, so it succeeds
            // here without bothering the shell (a FUA on it has no data to make durable).
            Ok(()) if len == 0 && command != CMD_FLUSH => {
                self.send_success(cookie, is_read.then_some(offset), is_read.then(Bytes::new))
            }
            Ok(()) => {
                let fua = flags & CMD_FLAG_FUA != 0;
                let kind = match command {
                    CMD_READ => RequestKind::Read { offset, len },
                    CMD_WRITE => RequestKind::Write { offset, data: payload, fua },
                    CMD_FLUSH => RequestKind::Flush,
                    CMD_TRIM => RequestKind::Trim { offset, len, fua },
                    CMD_WRITE_ZEROES => {
                        RequestKind::WriteZeroes { offset, len, fua, no_hole: flags & CMD_FLAG_NO_HOLE != 0 }
                    }
                    _ => unreachable!("validate refuses unknown commands"),
                };
                let id = RequestId(self.next_request_id);
                self.next_request_id += 1;
                let read = is_read.then_some((offset, len));
                let previous = self.pending.insert(id, Pending { cookie, read });
                assert!(previous.is_none());
                self.events.push_back(Event::Request { id, cookie, kind });
            }
        }
        true
    }

    /// Checks a request against the export, in the spec's order of preference: bad flags and unknown
    /// commands are EINVAL; writes to a read-only export EPERM; writes past the end ENOSPC, reads and trims
    /// past the end EINVAL.
    fn validate(
        &self,
        flags: u16,
        command: u16,
        offset: u64,
        len: u32,
    ) -> Result<(), (NbdError, &'static str)> {
        let Some(export) = &self.selected else {
            unreachable!("requests are parsed only in transmission");
        };
        // FUA is valid on every command once advertised (and ignored where nothing is written).
        let allowed_flags = match command {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => return Err((NbdError::Inval, "unknown command")),
        };
        if flags & !allowed_flags != 0 {
            return Err((NbdError::Inval, "command flags not supported for this command"));
        }
        let writes = matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && export.read_only {
            return Err((NbdError::Perm, "export is read-only"));
        }
        if command == CMD_FLUSH {
            return if offset == 0 && len == 0 {
                Ok(())
            } else {
                Err((NbdError::Inval, "flush offset and length must be zero"))
            };
        }
        if command == CMD_READ && len > PAYLOAD_BYTES_MAX {
            // With structured replies the spec names EOVERFLOW for reads the server will not fragment.
            let error = if self.structured { NbdError::Overflow } else { NbdError::Inval };
            return Err((error, "read longer than the maximum payload"));
        }
        let in_bounds = offset.checked_add(u64::from(len)).is_some_and(|end| end <= export.size_bytes);
        if !in_bounds {
            return Err(if matches!(command, CMD_WRITE | CMD_WRITE_ZEROES) {
                (NbdError::NoSpc, "write past the end of the export")
            } else {
                (NbdError::Inval, "request past the end of the export")
            });
        }
        Ok(())
    }

    // Output.

    fn push_small(&mut self, bytes: &[u8]) {
        self.out_small.extend_from_slice(bytes);
        self.out_bytes += bytes.len();
    }

    fn push_chunk(&mut self, chunk: Bytes) {
        if !self.out_small.is_empty() {
            self.out.push_back(self.out_small.split().freeze());
        }
        self.out_bytes += chunk.len();
        self.out.push_back(chunk);
    }

    fn send_option_reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        let mut header = [0u8; OPTION_REPLY_HEADER_BYTES];
        let mut w = &mut header[..];
        w.put_u64(OPTION_REPLY_MAGIC);
        w.put_u32(option);
        w.put_u32(reply);
        w.put_u32(u32::try_from(data.len()).expect("option replies are at most a few KiB"));
        self.push_small(&header);
        self.push_small(data);
    }

    /// `read_offset` is `Some` for reads; `data` is `Some` exactly for reads.
    fn send_success(&mut self, cookie: u64, read_offset: Option<u64>, data: Option<Bytes>) {
        assert_eq!(read_offset.is_some(), data.is_some());
        let data = data.filter(|d| !d.is_empty());
        if !self.structured {
            let mut reply = [0u8; SIMPLE_REPLY_BYTES];
            let mut w = &mut reply[..];
            w.put_u32(SIMPLE_REPLY_MAGIC);
            w.put_u32(0);
            w.put_u64(cookie);
            self.push_small(&reply);
            if let Some(data) = data {
                self.push_chunk(data);
            }
            return;
        }
        match (read_offset, data) {
            (Some(offset), Some(data)) => {
                // One OFFSET_DATA chunk marked DONE: the data is complete in hand, so no later error can
                // arise while sending it.
                let len = u32::try_from(8 + data.len()).expect("reads are at most PAYLOAD_BYTES_MAX");
                let mut header = [0u8; STRUCTURED_REPLY_HEADER_BYTES + 8];
                let mut w = &mut header[..];
                put_structured_header(&mut w, REPLY_TYPE_OFFSET_DATA, cookie, len);
                w.put_u64(offset);
                self.push_small(&header);
                self.push_chunk(data);
            }
            // Everything else, including an empty read (a data chunk must describe at least one byte).
            _ => {
                let mut header = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
                put_structured_header(&mut &mut header[..], REPLY_TYPE_NONE, cookie, 0);
                self.push_small(&header);
            }
        }
    }

    /// Simple error replies carry no data even for reads; a structured error chunk (marked DONE) is valid
    /// for every command, so neither depends on the request type.
    fn send_error(&mut self, cookie: u64, error: NbdError, message: &str) {
        if !self.structured {
            let mut reply = [0u8; SIMPLE_REPLY_BYTES];
            let mut w = &mut reply[..];
            w.put_u32(SIMPLE_REPLY_MAGIC);
            w.put_u32(error.wire_value());
            w.put_u64(cookie);
            self.push_small(&reply);
            return;
        }
        let message = &message.as_bytes()[..message.len().min(STRING_BYTES_MAX)];
        let mut header = [0u8; STRUCTURED_REPLY_HEADER_BYTES + 4 + 2];
        let mut w = &mut header[..];
        put_structured_header(&mut w, REPLY_TYPE_ERROR, cookie, (4 + 2 + message.len()) as u32);
        w.put_u32(error.wire_value());
        w.put_u16(message.len() as u16);
        self.push_small(&header);
        self.push_small(message);
    }
}

fn put_structured_header(w: &mut &mut [u8], reply_type: u16, cookie: u64, len: u32) {
    w.put_u32(STRUCTURED_REPLY_MAGIC);
    w.put_u16(REPLY_FLAG_DONE);
    w.put_u16(reply_type);
    w.put_u64(cookie);
    w.put_u32(len);
}

/// `(name, info request bytes)` of an NBD_OPT_INFO/GO payload, or `None` if the lengths disagree.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (name_len, rest) = data.split_first_chunk::<4>()?;
    let name_len = u32::from_be_bytes(*name_len) as usize;
    if name_len > rest.len() {
        return None;
    }
    let (name, rest) = rest.split_at(name_len);
    let (count, requests) = rest.split_first_chunk::<2>()?;
    let count = u16::from_be_bytes(*count) as usize;
    (requests.len() == 2 * count).then_some((name, requests))
}

fn info_string(info: u16, text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + text.len());
    data.put_u16(info);
    data.put_slice(text.as_bytes());
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    use crate::nbd::CatalogError;

    const DISK_BYTES: u64 = 1 << 20;
    const RO_BYTES: u64 = 64 << 10;
    const BIG_BYTES: u64 = 8 << 30;

    fn catalog() -> Arc<ExportCatalog> {
        let export = |name: &str, size_bytes, read_only, can_multi_conn, description: &str| ExportInfo {
            name: name.to_string(),
            size_bytes,
            read_only,
            can_multi_conn,
            description: description.to_string(),
        };
        Arc::new(
            ExportCatalog::new(vec![
                export("disk", DISK_BYTES, false, false, "scratch disk"),
                export("ro", RO_BYTES, true, true, ""),
                export("big", BIG_BYTES, false, true, ""),
            ])
            .unwrap(),
        )
    }

    // Client-side encoders.

    fn option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u64(IHAVEOPT);
        out.put_u32(option);
        out.put_u32(data.len() as u32);
        out.put_slice(data);
        out
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32(name.len() as u32);
        out.put_slice(name.as_bytes());
        out.put_u16(infos.len() as u16);
        for &info in infos {
            out.put_u16(info);
        }
        out
    }

    fn request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(flags);
        out.put_u16(command);
        out.put_u64(cookie);
        out.put_u64(offset);
        out.put_u32(len);
        out
    }

    fn write_request(flags: u16, cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = request(flags, CMD_WRITE, cookie, offset, payload.len() as u32);
        out.extend_from_slice(payload);
        out
    }

    // Server-output decoders; each consumes one message from the front of `r`.

    fn drain(s: &mut ServerSession) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = s.poll_transmit() {
            out.extend_from_slice(&chunk);
        }
        assert_eq!(s.transmit_backlog_bytes(), 0);
        out
    }

    fn events(s: &mut ServerSession) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn option_reply(r: &mut &[u8]) -> (u32, u32, Vec<u8>) {
        assert_eq!(r.get_u64(), OPTION_REPLY_MAGIC);
        let option = r.get_u32();
        let reply = r.get_u32();
        let len = r.get_u32() as usize;
        let data = r[..len].to_vec();
        r.advance(len);
        (option, reply, data)
    }

    fn simple_reply(r: &mut &[u8]) -> (u32, u64) {
        assert_eq!(r.get_u32(), SIMPLE_REPLY_MAGIC);
        let error = r.get_u32();
        (error, r.get_u64())
    }

    /// `(flags, type, cookie, payload)` of one structured chunk.
    fn structured_chunk(r: &mut &[u8]) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(r.get_u32(), STRUCTURED_REPLY_MAGIC);
        let flags = r.get_u16();
        let reply_type = r.get_u16();
        let cookie = r.get_u64();
        let len = r.get_u32() as usize;
        let payload = r[..len].to_vec();
        r.advance(len);
        (flags, reply_type, cookie, payload)
    }

    fn close_reason(s: &mut ServerSession) -> CloseReason {
        match events(s).pop() {
            Some(Event::Close { reason }) => reason,
            other => panic!("expected Close, got {other:?}"),
        }
    }

    fn requests(s: &mut ServerSession) -> Vec<(RequestId, u64, RequestKind)> {
        events(s)
            .into_iter()
            .map(|e| match e {
                Event::Request { id, cookie, kind } => (id, cookie, kind),
                other => panic!("expected a request, got {other:?}"),
            })
            .collect()
    }

    /// A session past the greeting and client flags, in option haggling.
    fn haggling(client_flags: u32) -> ServerSession {
        let mut s = ServerSession::new(catalog());
        let greeting = drain(&mut s);
        let mut r = &greeting[..];
        assert_eq!(r.get_u64(), NBDMAGIC);
        assert_eq!(r.get_u64(), IHAVEOPT);
        assert_eq!(r.get_u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert!(r.is_empty());
        s.received(&client_flags.to_be_bytes());
        assert!(events(&mut s).is_empty());
        assert!(s.wants_read());
        s
    }

    /// A session in transmission on `name` via NBD_OPT_GO, with structured replies if asked.
    fn transmitting(name: &str, structured: bool) -> ServerSession {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            s.received(&option(OPT_STRUCTURED_REPLY, &[]));
        }
        s.received(&option(OPT_GO, &info_data(name, &[])));
        let out = drain(&mut s);
        let mut r = &out[..];
        if structured {
            assert_eq!(option_reply(&mut r), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        }
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r), (OPT_GO, REP_ACK, vec![]));
        assert!(r.is_empty());
        assert!(matches!(&events(&mut s)[..], [Event::ExportSelected { export }] if export.name == name));
        s
    }

    #[test]
    fn go_reports_export_info_and_enters_transmission() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 77])));
        let out = drain(&mut s);
        let mut r = &out[..];

        let (opt, reply, data) = option_reply(&mut r);
        assert_eq!((opt, reply), (OPT_GO, REP_INFO));
        let mut d = &data[..];
        assert_eq!(d.get_u16(), INFO_EXPORT);
        assert_eq!(d.get_u64(), DISK_BYTES);
        let flags =
            FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        assert_eq!(d.get_u16(), flags);
        assert!(d.is_empty());

        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"disk");
        assert_eq!(option_reply(&mut r), (OPT_GO, REP_INFO, name));
        let mut description = INFO_DESCRIPTION.to_be_bytes().to_vec();
        description.extend_from_slice(b"scratch disk");
        assert_eq!(option_reply(&mut r), (OPT_GO, REP_INFO, description));

        let (_, reply, data) = option_reply(&mut r);
        assert_eq!(reply, REP_INFO);
        let mut d = &data[..];
        assert_eq!(d.get_u16(), INFO_BLOCK_SIZE);
        assert_eq!((d.get_u32(), d.get_u32(), d.get_u32()), (1, 4096, 32 << 20));
        assert_eq!(option_reply(&mut r), (OPT_GO, REP_ACK, vec![]));
        assert!(r.is_empty(), "GO never sends the 124 zero bytes");

        let events = events(&mut s);
        assert!(matches!(&events[..], [Event::ExportSelected { export }] if export.name == "disk"));
        s.received(&request(0, CMD_READ, 7, 0, 512));
        assert!(matches!(&requests(&mut s)[..], [(_, 7, RequestKind::Read { offset: 0, len: 512 })]));
    }

    #[test]
    fn export_name_replies_with_zeroes_unless_no_zeroes() {
        for no_zeroes in [false, true] {
            let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
            let mut s = haggling(flags);
            s.received(&option(OPT_EXPORT_NAME, b"ro"));
            let out = drain(&mut s);
            let mut r = &out[..];
            assert_eq!(r.get_u64(), RO_BYTES);
            let flags =
                FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
            assert_eq!(r.get_u16(), flags);
            let zeroes = if no_zeroes { 0 } else { 124 };
            assert_eq!(r, &vec![0u8; zeroes][..]);
            assert!(matches!(&events(&mut s)[..], [Event::ExportSelected { export }] if export.name == "ro"));
        }
    }

    #[test]
    fn empty_export_name_selects_the_default_export() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        s.received(&option(OPT_EXPORT_NAME, b""));
        assert_eq!(&drain(&mut s)[..8], &DISK_BYTES.to_be_bytes());
        assert!(matches!(&events(&mut s)[..], [Event::ExportSelected { export }] if export.name == "disk"));
    }

    #[test]
    fn export_name_for_unknown_export_closes() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_EXPORT_NAME, b"nope"));
        assert!(drain(&mut s).is_empty(), "EXPORT_NAME has no error reply");
        assert_eq!(close_reason(&mut s), ProtocolError::UnknownExport { name: "nope".into() }.into());
        assert!(s.is_closed());
        assert!(!s.wants_read());
    }

    #[test]
    fn export_name_longer_than_a_string_closes_without_buffering() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_EXPORT_NAME, &[b'a'; 4097])[..OPTION_HEADER_BYTES]);
        assert_eq!(close_reason(&mut s), ProtocolError::ExportNameTooLong { len: 4097, max: 4096 }.into());
    }

    #[test]
    fn list_returns_every_export_then_ack() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_LIST, &[]));
        let out = drain(&mut s);
        let mut r = &out[..];
        for (name, description) in [("disk", "scratch disk"), ("ro", ""), ("big", "")] {
            let (opt, reply, data) = option_reply(&mut r);
            assert_eq!((opt, reply), (OPT_LIST, REP_SERVER));
            let mut d = &data[..];
            let name_len = d.get_u32() as usize;
            assert_eq!(&d[..name_len], name.as_bytes());
            assert_eq!(&d[name_len..], description.as_bytes());
        }
        assert_eq!(option_reply(&mut r), (OPT_LIST, REP_ACK, vec![]));
        assert!(r.is_empty());
        assert!(events(&mut s).is_empty(), "LIST stays in haggling");
    }

    #[test]
    fn list_and_structured_reply_with_data_are_invalid() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_LIST, b"xyz"));
        s.received(&option(OPT_STRUCTURED_REPLY, b"x"));
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r).1, REP_ERR_INVALID);
        assert_eq!(option_reply(&mut r).1, REP_ERR_INVALID);
        assert!(r.is_empty());
        // Structured replies were not enabled by the invalid request.
        s.received(&option(OPT_GO, &info_data("disk", &[])));
        drain(&mut s);
        events(&mut s);
        s.received(&request(0, CMD_FLUSH, 1, 0, 0));
        let (id, _, _) = requests(&mut s)[0].clone();
        s.reply(id, Ok(None)).unwrap();
        assert_eq!(simple_reply(&mut &drain(&mut s)[..]), (0, 1));
    }

    #[test]
    fn info_then_go() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_INFO, &info_data("big", &[])));
        let out = drain(&mut s);
        let mut r = &out[..];
        let (opt, reply, data) = option_reply(&mut r);
        assert_eq!((opt, reply), (OPT_INFO, REP_INFO));
        assert_eq!(&data[2..10], &BIG_BYTES.to_be_bytes());
        assert_eq!(option_reply(&mut r), (OPT_INFO, REP_ACK, vec![]));
        assert!(r.is_empty());
        assert!(events(&mut s).is_empty(), "INFO stays in haggling");

        s.received(&option(OPT_GO, &info_data("big", &[])));
        let out = drain(&mut s);
        let mut r = &out[..];
        let (opt, reply, go_data) = option_reply(&mut r);
        assert_eq!((opt, reply, go_data), (OPT_GO, REP_INFO, data), "same answer for the same question");
        assert_eq!(option_reply(&mut r), (OPT_GO, REP_ACK, vec![]));
        assert_eq!(events(&mut s).len(), 1);
    }

    #[test]
    fn info_and_go_for_unknown_export_fail_and_haggling_continues() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        s.received(&option(OPT_INFO, &info_data("nope", &[INFO_BLOCK_SIZE])));
        s.received(&option(OPT_GO, &info_data("nope", &[])));
        s.received(&option(OPT_GO, &info_data("disk", &[])));
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r).1, REP_ERR_UNKNOWN);
        assert_eq!(option_reply(&mut r).1, REP_ERR_UNKNOWN);
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert!(r.is_empty());
        assert_eq!(events(&mut s).len(), 1);
    }

    #[test]
    fn malformed_info_requests_are_invalid() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        let mut name_too_long = info_data("disk", &[]);
        name_too_long[3] = 200;
        let mut odd_count = info_data("disk", &[INFO_NAME]);
        odd_count.push(0);
        for data in [vec![], vec![0, 0, 0], name_too_long, odd_count] {
            s.received(&option(OPT_INFO, &data));
            let out = drain(&mut s);
            let mut r = &out[..];
            assert_eq!(option_reply(&mut r).1, REP_ERR_INVALID, "{data:?}");
            assert!(r.is_empty());
        }
    }

    #[test]
    fn abort_acks_then_closes() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        let mut input = option(OPT_ABORT, &[]);
        input.extend_from_slice(&option(OPT_LIST, &[]));
        s.received(&input);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r), (OPT_ABORT, REP_ACK, vec![]));
        assert!(r.is_empty(), "nothing after the abort is processed");
        assert_eq!(close_reason(&mut s), CloseReason::ClientAbort);
        s.received(&option(OPT_LIST, &[]));
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn unknown_options_are_unsupported_and_skipped_even_when_huge() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        // STARTTLS (no TLS here), a meta-context option, and a 100 KiB unknown option sent in pieces: the
        // data is discarded as it arrives, never buffered.
        s.received(&option(OPT_STARTTLS, &[]));
        s.received(&option(10, &[1, 2, 3]));
        let huge = option(1000, &vec![0xab; 100 << 10]);
        for piece in huge.chunks(4096) {
            s.received(piece);
            assert!(s.input.len() < 4096 + OPTION_HEADER_BYTES);
        }
        s.received(&option(OPT_LIST, &[]));
        let out = drain(&mut s);
        let mut r = &out[..];
        let (opt, reply, message) = option_reply(&mut r);
        assert_eq!((opt, reply), (OPT_STARTTLS, REP_ERR_UNSUP));
        assert_eq!(message, b"option not supported");
        assert_eq!(option_reply(&mut r).0, 10);
        let (opt, reply, _) = option_reply(&mut r);
        assert_eq!((opt, reply), (1000, REP_ERR_UNSUP));
        for _ in 0..3 {
            assert_eq!(option_reply(&mut r).1, REP_SERVER);
        }
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert!(r.is_empty());
    }

    #[test]
    fn oversized_go_is_too_big_and_skipped() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        let mut data = info_data("disk", &[]);
        data.resize(OPTION_DATA_BYTES_MAX as usize + 1, 0);
        s.received(&option(OPT_GO, &data));
        s.received(&option(OPT_GO, &info_data("disk", &[])));
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r).1, REP_ERR_TOO_BIG);
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert_eq!(events(&mut s).len(), 1);
    }

    #[test]
    fn too_many_options_close() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        for _ in 0..OPTIONS_MAX {
            s.received(&option(OPT_STRUCTURED_REPLY, &[]));
        }
        assert!(events(&mut s).is_empty());
        s.received(&option(OPT_STRUCTURED_REPLY, &[]));
        assert_eq!(close_reason(&mut s), ProtocolError::TooManyOptions { max: OPTIONS_MAX }.into());
    }

    #[test]
    fn bad_client_flags_close() {
        let mut s = ServerSession::new(catalog());
        s.received(&(FLAG_C_FIXED_NEWSTYLE | 4).to_be_bytes());
        assert_eq!(close_reason(&mut s), ProtocolError::UnknownClientFlags { flags: 5 }.into());
        let mut s = ServerSession::new(catalog());
        s.received(&0u32.to_be_bytes());
        assert_eq!(close_reason(&mut s), ProtocolError::NotFixedNewstyle.into());
    }

    #[test]
    fn bad_option_magic_closes() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE);
        let mut input = option(OPT_LIST, &[]);
        input[0] ^= 1;
        s.received(&input);
        assert!(drain(&mut s).is_empty());
        let magic = IHAVEOPT ^ (1 << 56);
        assert_eq!(close_reason(&mut s), ProtocolError::BadOptionMagic { magic }.into());
    }

    #[test]
    fn bad_request_magic_closes() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, CMD_READ, 1, 0, 512);
        input[3] = 0;
        s.received(&input);
        assert_eq!(close_reason(&mut s), ProtocolError::BadRequestMagic { magic: 0x2560_9500 }.into());
    }

    #[test]
    fn a_preconnected_session_serves_from_its_first_byte_with_simple_replies() {
        // Goal: the kernel's dialect (`rbd map --device`): no greeting, no options, requests at once, simple
        // replies, and the flags the kernel must be given at connect. Method: a write and a read on "disk" and
        // a write refused on "ro", checked byte by byte; an unknown export has no such session.
        let mut s = ServerSession::preconnected(catalog(), "disk").unwrap();
        assert!(matches!(&events(&mut s)[..], [Event::ExportSelected { export }] if export.name == "disk"));
        assert!(drain(&mut s).is_empty(), "no greeting");
        let flags = s.transmission_flags().unwrap();
        assert_eq!(flags & (FLAG_SEND_FLUSH | FLAG_SEND_TRIM), FLAG_SEND_FLUSH | FLAG_SEND_TRIM);
        assert_eq!(
            flags & (FLAG_READ_ONLY | FLAG_SEND_DF),
            0,
            "writable, and no DF without structured replies"
        );
        let mut input = request(0, CMD_WRITE, 7, 512, 4);
        input.extend_from_slice(b"wxyz");
        input.extend(request(0, CMD_READ, 8, 0, 4));
        s.received(&input);
        let reqs = requests(&mut s);
        assert_eq!(reqs.len(), 2);
        s.reply(reqs[1].0, Ok(Some(Bytes::from_static(b"abcd")))).unwrap();
        s.reply(reqs[0].0, Ok(None)).unwrap();
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(simple_reply(&mut r), (0, 8));
        assert_eq!(&r[..4], b"abcd");
        r = &r[4..];
        assert_eq!(simple_reply(&mut r), (0, 7));
        assert!(r.is_empty());

        let mut ro = ServerSession::preconnected(catalog(), "ro").unwrap();
        assert_ne!(ro.transmission_flags().unwrap() & FLAG_READ_ONLY, 0);
        let mut input = request(0, CMD_WRITE, 9, 0, 1);
        input.push(0);
        ro.received(&input);
        let _ = events(&mut ro);
        assert_eq!(simple_reply(&mut &drain(&mut ro)[..]), (1, 9), "EPERM");
        assert!(ServerSession::preconnected(catalog(), "nope").is_none());
    }

    #[test]
    fn structured_replies_shape_reads_others_and_errors() {
        let mut s = transmitting("disk", true);
        s.received(&request(CMD_FLAG_DF, CMD_READ, 11, 4096, 8));
        s.received(&request(0, CMD_FLUSH, 12, 0, 0));
        s.received(&request(0, CMD_READ, 13, 0, 4));
        let reqs = requests(&mut s);
        assert_eq!(reqs.len(), 3);
        s.reply(reqs[0].0, Ok(Some(Bytes::from_static(b"abcdefgh")))).unwrap();
        s.reply(reqs[1].0, Ok(None)).unwrap();
        s.reply(reqs[2].0, Err(NbdError::Io)).unwrap();

        let out = drain(&mut s);
        let mut r = &out[..];
        let (flags, reply_type, cookie, payload) = structured_chunk(&mut r);
        assert_eq!((flags, reply_type, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 11));
        assert_eq!(&payload[..8], &4096u64.to_be_bytes());
        assert_eq!(&payload[8..], b"abcdefgh");
        assert_eq!(structured_chunk(&mut r), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 12, vec![]));
        let (flags, reply_type, cookie, payload) = structured_chunk(&mut r);
        assert_eq!((flags, reply_type, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 13));
        let mut p = &payload[..];
        assert_eq!(p.get_u32(), 5);
        let message_len = p.get_u16() as usize;
        assert_eq!(p, b"input/output error");
        assert_eq!(message_len, p.len());
        assert!(r.is_empty());
    }

    #[test]
    fn read_data_is_sent_without_copying() {
        let mut s = transmitting("disk", false);
        s.received(&request(0, CMD_READ, 1, 0, 4));
        let (id, _, _) = requests(&mut s)[0].clone();
        let data = Bytes::from(vec![1, 2, 3, 4]);
        s.reply(id, Ok(Some(data.clone()))).unwrap();
        let header = s.poll_transmit().unwrap();
        assert_eq!(simple_reply(&mut &header[..]), (0, 1));
        let payload = s.poll_transmit().unwrap();
        assert_eq!(payload.as_ptr(), data.as_ptr(), "the reply's own buffer");
        assert!(s.poll_transmit().is_none());
    }

    #[test]
    fn transmission_flags_advertise_df_only_with_structured_replies() {
        let mut s = haggling(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        s.received(&option(OPT_STRUCTURED_REPLY, &[]));
        s.received(&option(OPT_EXPORT_NAME, b"big"));
        let out = drain(&mut s);
        let flags = u16::from_be_bytes([out[out.len() - 2], out[out.len() - 1]]);
        let expected = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_DF;
        assert_eq!(flags, expected);
    }

    #[test]
    fn out_of_range_requests_fail_and_writes_keep_the_stream_in_step() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, CMD_READ, 1, DISK_BYTES - 511, 512);
        input.extend(request(0, CMD_READ, 2, u64::MAX, 1));
        input.extend(write_request(0, 3, DISK_BYTES, b"past the end"));
        input.extend(request(0, CMD_TRIM, 4, DISK_BYTES, 1));
        input.extend(request(0, CMD_WRITE_ZEROES, 5, u64::MAX - 1, 4));
        input.extend(request(0, CMD_READ, 6, DISK_BYTES - 512, 512));
        s.received(&input);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(simple_reply(&mut r), (22, 1));
        assert_eq!(simple_reply(&mut r), (22, 2));
        assert_eq!(simple_reply(&mut r), (28, 3), "writes past the end are ENOSPC");
        assert_eq!(simple_reply(&mut r), (22, 4));
        assert_eq!(simple_reply(&mut r), (28, 5));
        assert!(r.is_empty());
        assert!(
            matches!(&requests(&mut s)[..], [(_, 6, RequestKind::Read { offset, len: 512 })] if *offset == DISK_BYTES - 512)
        );
    }

    #[test]
    fn structured_out_of_range_read_is_an_error_chunk() {
        let mut s = transmitting("disk", true);
        s.received(&request(0, CMD_READ, 9, DISK_BYTES, 1));
        let out = drain(&mut s);
        let (flags, reply_type, cookie, payload) = structured_chunk(&mut &out[..]);
        assert_eq!((flags, reply_type, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9));
        assert_eq!(&payload[..4], &22u32.to_be_bytes());
    }

    #[test]
    fn writes_on_a_read_only_export_are_eperm() {
        let mut s = transmitting("ro", false);
        let mut input = write_request(CMD_FLAG_FUA, 1, 0, &[7; 4096]);
        input.extend(request(0, CMD_TRIM, 2, 0, 4096));
        input.extend(request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 0, 4096));
        input.extend(request(CMD_FLAG_FUA, CMD_READ, 4, 0, 4096));
        input.extend(request(0, CMD_FLUSH, 5, 0, 0));
        s.received(&input);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(simple_reply(&mut r), (1, 1));
        assert_eq!(simple_reply(&mut r), (1, 2));
        assert_eq!(simple_reply(&mut r), (1, 3));
        assert!(r.is_empty());
        let reqs = requests(&mut s);
        assert!(matches!(reqs[0].2, RequestKind::Read { offset: 0, len: 4096 }), "FUA on a read is ignored");
        assert_eq!(reqs[1].2, RequestKind::Flush);
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, 5, 1, 0, 512); // NBD_CMD_CACHE, not advertised
        input.extend(request(0, 7, 2, 0, 512)); // NBD_CMD_BLOCK_STATUS without metadata contexts
        input.extend(request(0, 0xffff, 3, 0, 0));
        input.extend(write_request(CMD_FLAG_NO_HOLE, 4, 0, b"data")); // NO_HOLE is for WRITE_ZEROES
        input.extend(request(CMD_FLAG_DF, CMD_READ, 5, 0, 512)); // DF needs structured replies
        input.extend(request(1 << 4, CMD_WRITE_ZEROES, 6, 0, 512)); // FAST_ZERO not advertised
        input.extend(request(0, CMD_FLUSH, 7, 0, 512)); // flush length is reserved
        input.extend(request(0, CMD_READ, 8, 0, 512));
        s.received(&input);
        let out = drain(&mut s);
        let mut r = &out[..];
        for cookie in 1..=7 {
            assert_eq!(simple_reply(&mut r), (22, cookie));
        }
        assert!(r.is_empty());
        assert_eq!(requests(&mut s).len(), 1);
    }

    #[test]
    fn request_kinds_carry_flags_and_payload() {
        let mut s = transmitting("disk", false);
        let mut input = write_request(CMD_FLAG_FUA, 1, 512, b"hello");
        input.extend(request(CMD_FLAG_FUA, CMD_TRIM, 2, 0, 4096));
        input.extend(request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 3, 8192, 4096));
        input.extend(request(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, 1));
        s.received(&input);
        let kinds: Vec<RequestKind> = requests(&mut s).into_iter().map(|(_, _, k)| k).collect();
        assert_eq!(
            kinds,
            vec![
                RequestKind::Write { offset: 512, data: Bytes::from_static(b"hello"), fua: true },
                RequestKind::Trim { offset: 0, len: 4096, fua: true },
                RequestKind::WriteZeroes { offset: 8192, len: 4096, fua: false, no_hole: true },
                RequestKind::WriteZeroes { offset: 0, len: 1, fua: true, no_hole: true },
            ]
        );
    }

    #[test]
    fn zero_length_requests_succeed_without_reaching_the_shell() {
        for structured in [false, true] {
            let mut s = transmitting("disk", structured);
            let mut input = request(0, CMD_READ, 1, DISK_BYTES, 0);
            input.extend(write_request(CMD_FLAG_FUA, 2, 0, b""));
            input.extend(request(0, CMD_TRIM, 3, 0, 0));
            input.extend(request(0, CMD_WRITE_ZEROES, 4, 0, 0));
            input.extend(request(0, CMD_READ, 5, DISK_BYTES + 1, 0));
            s.received(&input);
            assert!(events(&mut s).is_empty());
            let out = drain(&mut s);
            let mut r = &out[..];
            for cookie in 1..=4 {
                if structured {
                    assert_eq!(structured_chunk(&mut r), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, vec![]));
                } else {
                    assert_eq!(simple_reply(&mut r), (0, cookie));
                }
            }
            // Even an empty read must start inside the export.
            if structured {
                assert_eq!(structured_chunk(&mut r).1, REPLY_TYPE_ERROR);
            } else {
                assert_eq!(simple_reply(&mut r), (22, 5));
            }
            assert!(r.is_empty());
        }
    }

    #[test]
    fn reads_over_the_payload_maximum_fail_and_huge_writes_close() {
        let mut s = transmitting("big", false);
        s.received(&request(0, CMD_READ, 1, 0, PAYLOAD_BYTES_MAX + 1));
        assert_eq!(simple_reply(&mut &drain(&mut s)[..]), (22, 1));
        let mut s = transmitting("big", true);
        s.received(&request(0, CMD_READ, 1, 0, PAYLOAD_BYTES_MAX + 1));
        assert_eq!(&structured_chunk(&mut &drain(&mut s)[..]).3[..4], &75u32.to_be_bytes());
        // Trims and zeroing carry no payload, so any length within the export is fine.
        s.received(&request(0, CMD_TRIM, 2, 0, u32::MAX));
        assert_eq!(requests(&mut s).len(), 1);

        s.received(&request(0, CMD_WRITE, 3, 0, PAYLOAD_BYTES_MAX + 1));
        let max = PAYLOAD_BYTES_MAX;
        assert_eq!(close_reason(&mut s), ProtocolError::WritePayloadTooLarge { len: max + 1, max }.into());
    }

    #[test]
    fn input_delivered_one_byte_at_a_time() {
        let mut s = ServerSession::new(catalog());
        drain(&mut s);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_INFO, &info_data("disk", &[INFO_NAME])));
        input.extend(option(OPT_GO, &info_data("disk", &[])));
        input.extend(write_request(0, 1, 100, b"one byte at a time"));
        input.extend(request(0, CMD_READ, 2, 100, 18));
        input.extend(request(0, CMD_DISC, 3, 0, 0));
        let mut seen = Vec::new();
        for byte in &input {
            s.received(std::slice::from_ref(byte));
            seen.extend(events(&mut s));
        }
        assert!(matches!(seen[0], Event::ExportSelected { .. }));
        let Event::Request { id: write, kind: RequestKind::Write { data, .. }, .. } = &seen[1] else {
            panic!("{seen:?}");
        };
        assert_eq!(&data[..], b"one byte at a time");
        let Event::Request { id: read, kind: RequestKind::Read { offset: 100, len: 18 }, .. } = &seen[2]
        else {
            panic!("{seen:?}");
        };
        assert_eq!(seen.len(), 3, "DISC waits for the replies");
        let (write, read) = (*write, *read);
        s.reply(write, Ok(None)).unwrap();
        s.reply(read, Ok(Some(data.clone()))).unwrap();
        assert_eq!(close_reason(&mut s), CloseReason::ClientDisconnect);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert_eq!(option_reply(&mut r).1, REP_INFO);
        assert_eq!(option_reply(&mut r).1, REP_ACK);
        assert_eq!(structured_chunk(&mut r).1, REPLY_TYPE_NONE);
        assert_eq!(&structured_chunk(&mut r).3[8..], b"one byte at a time");
        assert!(r.is_empty());
    }

    #[test]
    fn replies_may_come_in_any_order_and_duplicate_cookies_stay_apart() {
        let mut s = transmitting("disk", false);
        let mut input = Vec::new();
        for (i, cookie) in [10u64, 20, 30, 10].into_iter().enumerate() {
            input.extend(request(0, CMD_READ, cookie, i as u64 * 512, 4));
        }
        s.received(&input);
        let reqs = requests(&mut s);
        assert_eq!(s.in_flight(), 4);
        for &i in &[2usize, 0, 3, 1] {
            s.reply(reqs[i].0, Ok(Some(Bytes::from(vec![i as u8; 4])))).unwrap();
        }
        assert_eq!(s.in_flight(), 0);
        let out = drain(&mut s);
        let mut r = &out[..];
        for (cookie, fill) in [(30, 2), (10, 0), (10, 3), (20, 1)] {
            assert_eq!(simple_reply(&mut r), (0, cookie));
            assert_eq!(&r[..4], &[fill; 4]);
            r.advance(4);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn in_flight_limit_stops_consuming_until_a_reply() {
        let mut s = transmitting("disk", false);
        let mut input = Vec::new();
        for cookie in 0..REQUESTS_IN_FLIGHT_MAX as u64 + 10 {
            input.extend(request(0, CMD_FLUSH, cookie, 0, 0));
        }
        s.received(&input);
        let reqs = requests(&mut s);
        assert_eq!(reqs.len(), REQUESTS_IN_FLIGHT_MAX);
        assert!(!s.wants_read());
        assert_eq!(s.input.len(), 10 * REQUEST_HEADER_BYTES, "the rest stays buffered");

        s.reply(reqs[5].0, Ok(None)).unwrap();
        let more = requests(&mut s);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].1, REQUESTS_IN_FLIGHT_MAX as u64);
        assert!(!s.wants_read());
        for (id, _, _) in reqs.iter().chain(&more).filter(|r| r.0 != reqs[5].0) {
            s.reply(*id, Ok(None)).unwrap();
        }
        assert_eq!(requests(&mut s).len(), 9);
        assert!(s.wants_read());
    }

    #[test]
    fn transmit_backlog_limit_stops_consuming_until_drained() {
        let mut s = transmitting("big", false);
        let mut input = Vec::new();
        for cookie in 0..3 {
            input.extend(request(0, CMD_READ, cookie, 0, PAYLOAD_BYTES_MAX));
        }
        s.received(&input);
        let reqs = requests(&mut s);
        let data = Bytes::from(vec![0u8; PAYLOAD_BYTES_MAX as usize]);
        s.reply(reqs[0].0, Ok(Some(data.clone()))).unwrap();
        s.reply(reqs[1].0, Ok(Some(data.clone()))).unwrap();
        assert!(s.transmit_backlog_bytes() >= TRANSMIT_BACKLOG_BYTES_MAX);
        assert!(!s.wants_read());
        s.received(&request(0, CMD_FLUSH, 9, 0, 0));
        assert!(events(&mut s).is_empty(), "input waits while the client does not read");
        while s.transmit_backlog_bytes() >= TRANSMIT_BACKLOG_BYTES_MAX {
            s.poll_transmit().unwrap();
        }
        assert!(matches!(&requests(&mut s)[..], [(_, 9, RequestKind::Flush)]));
        assert!(s.wants_read());
    }

    #[test]
    fn disc_drains_outstanding_replies_then_closes() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, CMD_READ, 1, 0, 4);
        input.extend(request(0, CMD_DISC, 2, 0, 0));
        input.extend(request(0, CMD_READ, 3, 0, 4)); // must be ignored
        s.received(&input);
        let reqs = requests(&mut s);
        assert_eq!(reqs.len(), 1);
        assert!(!s.wants_read());
        s.received(&request(0, CMD_READ, 4, 0, 4));
        assert!(events(&mut s).is_empty());
        s.reply(reqs[0].0, Ok(Some(Bytes::from_static(b"last")))).unwrap();
        assert_eq!(close_reason(&mut s), CloseReason::ClientDisconnect);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(simple_reply(&mut r), (0, 1));
        assert_eq!(r, b"last");
    }

    #[test]
    fn disc_with_nothing_outstanding_closes_at_once() {
        let mut s = transmitting("disk", true);
        s.received(&request(0, CMD_DISC, 0, 0, 0));
        assert_eq!(close_reason(&mut s), CloseReason::ClientDisconnect);
        assert!(drain(&mut s).is_empty(), "no reply to DISC");
    }

    #[test]
    fn reply_misuse_is_refused_and_changes_nothing() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, CMD_READ, 1, 0, 4);
        input.extend(request(0, CMD_FLUSH, 2, 0, 0));
        s.received(&input);
        let reqs = requests(&mut s);
        let (read, flush) = (reqs[0].0, reqs[1].0);
        assert_eq!(s.reply(RequestId(99), Ok(None)), Err(ReplyError::UnknownRequest { id: RequestId(99) }));
        assert_eq!(
            s.reply(read, Ok(Some(Bytes::from_static(b"abc")))),
            Err(ReplyError::ReadLengthMismatch { expected: 4, got: 3 })
        );
        assert_eq!(s.reply(read, Ok(None)), Err(ReplyError::MissingReadData));
        assert_eq!(s.reply(flush, Ok(Some(Bytes::new()))), Err(ReplyError::UnexpectedData));
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.in_flight(), 2);
        s.reply(flush, Ok(None)).unwrap();
        assert_eq!(s.reply(flush, Ok(None)), Err(ReplyError::UnknownRequest { id: flush }));
        s.reply(read, Err(NbdError::from_errno(-110))).unwrap();
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(simple_reply(&mut r), (0, 2));
        assert_eq!(simple_reply(&mut r), (5, 1), "error replies to reads carry no data");
        assert!(r.is_empty());
    }

    #[test]
    fn replies_after_a_hard_close_are_dropped() {
        let mut s = transmitting("disk", false);
        let mut input = request(0, CMD_FLUSH, 1, 0, 0);
        input.extend(b"garbage that is not a request header".iter());
        s.received(&input);
        let evs = events(&mut s);
        let Event::Request { id, .. } = evs[0] else { panic!("{evs:?}") };
        assert!(matches!(evs[1], Event::Close { .. }));
        s.reply(id, Ok(None)).unwrap();
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn errno_mapping() {
        let cases = [
            (-1, NbdError::Perm),
            (-13, NbdError::Perm),
            (-30, NbdError::Perm),
            (5, NbdError::Io),
            (-12, NbdError::NoMem),
            (-22, NbdError::Inval),
            (-28, NbdError::NoSpc),
            (-122, NbdError::NoSpc),
            (-27, NbdError::NoSpc),
            (-75, NbdError::Overflow),
            (-108, NbdError::Shutdown),
            (-110, NbdError::Io),
            (-95, NbdError::Io),
            (i32::MIN, NbdError::Io),
            (0, NbdError::Io),
        ];
        for (errno, expected) in cases {
            assert_eq!(NbdError::from_errno(errno), expected, "errno {errno}");
        }
        let wire: Vec<u32> = [
            NbdError::Perm,
            NbdError::Io,
            NbdError::NoMem,
            NbdError::Inval,
            NbdError::NoSpc,
            NbdError::Overflow,
            NbdError::Shutdown,
        ]
        .iter()
        .map(|e| e.wire_value())
        .collect();
        assert_eq!(wire, vec![1, 5, 12, 22, 28, 75, 108]);
    }

    #[test]
    fn catalog_validation() {
        let export = |name: &str, description: &str| ExportInfo {
            name: name.into(),
            size_bytes: 0,
            read_only: false,
            can_multi_conn: false,
            description: description.into(),
        };
        let long = "x".repeat(4097);
        assert!(matches!(ExportCatalog::new(vec![export(&long, "")]), Err(CatalogError::NameTooLong { .. })));
        assert!(matches!(ExportCatalog::new(vec![export("a\0b", "")]), Err(CatalogError::NameHasNul { .. })));
        assert!(matches!(
            ExportCatalog::new(vec![export("a", &long)]),
            Err(CatalogError::DescriptionTooLong { .. })
        ));
        assert!(matches!(
            ExportCatalog::new(vec![export("a", "\0")]),
            Err(CatalogError::DescriptionHasNul { .. })
        ));
        assert_eq!(
            ExportCatalog::new(vec![export("a", ""), export("b", ""), export("a", "")]),
            Err(CatalogError::DuplicateName { name: "a".into() })
        );
        let named_empty = ExportCatalog::new(vec![export("a", ""), export("", "the empty one")]).unwrap();
        assert_eq!(named_empty.find(b"").unwrap().description, "the empty one");
        assert!(ExportCatalog::new(vec![]).unwrap().find(b"").is_none());
    }

    #[test]
    fn go_on_an_empty_catalog_is_unknown() {
        let mut s = ServerSession::new(Arc::new(ExportCatalog::new(vec![]).unwrap()));
        drain(&mut s);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        input.extend(option(OPT_GO, &info_data("", &[])));
        input.extend(option(OPT_LIST, &[]));
        s.received(&input);
        let out = drain(&mut s);
        let mut r = &out[..];
        assert_eq!(option_reply(&mut r).1, REP_ERR_UNKNOWN);
        assert_eq!(option_reply(&mut r), (OPT_LIST, REP_ACK, vec![]));
    }

    /// A whole conversation: handshake, writes, reads, and the replies in request order.
    fn script() -> Vec<u8> {
        let mut input = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        input.extend(option(OPT_LIST, &[]));
        input.extend(option(99, &[1; 300]));
        input.extend(option(OPT_STRUCTURED_REPLY, &[]));
        input.extend(option(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE])));
        for i in 0..20u64 {
            input.extend(write_request(0, i, i * 1000, &vec![i as u8; 700 + i as usize]));
            input.extend(request(0, CMD_READ, 100 + i, i * 333, 1 + i as u32 * 10));
            input.extend(request(0, CMD_TRIM, 200 + i, DISK_BYTES - 4 * i, 2 * i as u32));
        }
        input.extend(request(0, CMD_DISC, 0, 0, 0));
        input
    }

    /// Delivers `input` in pieces cut at `cuts`, then answers every request in the order it appeared
    /// (answering at the end keeps the output independent of where the cuts fall: replies the session
    /// makes itself always come first). Returns everything transmitted and every event.
    fn run_chunked(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<Event>) {
        let mut s = ServerSession::new(catalog());
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        let mut seen = Vec::new();
        for cut in cuts {
            s.received(&input[at..cut]);
            at = cut;
            seen.extend(std::iter::from_fn(|| s.poll_event()));
        }
        for event in seen.clone() {
            if let Event::Request { id, kind, .. } = event {
                let data = match kind {
                    RequestKind::Read { len, .. } => Some(Bytes::from(vec![0x5a; len as usize])),
                    _ => None,
                };
                s.reply(id, Ok(data)).unwrap();
                seen.extend(std::iter::from_fn(|| s.poll_event()));
            }
        }
        let out = std::iter::from_fn(|| s.poll_transmit()).flat_map(|c| c.to_vec()).collect();
        (out, seen)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn chunking_does_not_change_the_conversation(cuts in prop::collection::vec(any::<usize>(), 0..40)) {
            let input = script();
            let (whole_out, whole_events) = run_chunked(&input, &[]);
            let closed = matches!(whole_events.last(), Some(Event::Close { reason: CloseReason::ClientDisconnect }));
            prop_assert!(closed, "the script ends with a clean disconnect");
            prop_assert_eq!(whole_events.len(), 2 + 20 + 20 + 19, "trim of length 0 is answered inline");
            let (out, events) = run_chunked(&input, &cuts);
            // Compared without printing: the streams are kilobytes long.
            prop_assert!(out == whole_out, "output differs");
            prop_assert!(events == whole_events, "events differ");
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            prefix_go in any::<bool>(),
            garbage in prop::collection::vec(any::<u8>(), 0..2048),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut input = Vec::new();
            if prefix_go {
                input.extend(FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                input.extend(option(OPT_GO, &info_data("disk", &[])));
            }
            input.extend(garbage);
            run_chunked(&input, &cuts);
        }
    }
}
