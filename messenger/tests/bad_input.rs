//! Loopback tests with a misbehaving peer: a raw `std::net::TcpStream` sends garbage, wrong banners, oversized,
//! truncated, corrupt or unknown frames, says nothing, or stops reading, against a real server `Messenger` on
//! 127.0.0.1. Each test checks that the server closes that socket (seen from the raw socket, which never waits
//! without a timeout, and from the `faults` counter), that a well-behaved client still gets its reply afterwards,
//! and, where a peer could make it grow, that memory stays bounded.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use messenger::frame::{self, Tag, TxQueue, CONTROL_BYTES_MAX, MSG_HEADER_BYTES, PREAMBLE_BYTES};
use messenger::session::ClientIdent;
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerConfig, Policy, Refused,
    WorkerPool,
};

/// Every wait in these tests is bounded by this.
const T: Duration = Duration::from_secs(10);
/// A bad frame must get its socket closed this quickly: well under the handshake timeout the servers use, so a
/// close seen in time was caused by the frame check, not by a timer.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);
const MIB: u64 = 1 << 20;

/// The servers' handshake timeout, unless a test is about that timeout.
fn config() -> MessengerConfig {
    MessengerConfig { connect_timeout: Duration::from_secs(10), ..test_config() }
}

fn server(pool: &Arc<WorkerPool>, cfg: MessengerConfig) -> Endpoint {
    capture_logs();
    endpoint(pool, EntityName::osd(0), Opts { bind: true, reply: true, cfg, ..Opts::default() })
}

/// (b) of every test: a well-behaved client connects after the bad peer and gets its reply.
fn normal_client_gets_a_reply(pool: &Arc<WorkerPool>, server: &Endpoint) {
    let client = endpoint(pool, EntityName::client(1), Opts::default());
    let conn = client.msgr.connect(EntityName::osd(0), addr(server)).unwrap();
    conn.send_message(Message::new(MSG_REQUEST, Bytes::from_static(b"hi")).with_tid(42)).unwrap();
    let (_, rep) = client.msgs.recv_timeout(T).expect("the normal client gets its reply");
    assert_eq!((rep.msg_type, rep.tid), (MSG_REPLY, 42));
    client.msgr.shutdown();
}

/// Waits until the server has counted exactly `want` faults.
fn wait_faults(msgr: &Messenger, want: u64) {
    let deadline = Instant::now() + T;
    while msgr.counters().faults < want {
        assert!(Instant::now() < deadline, "faults stayed at {} (want {want})", msgr.counters().faults);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(msgr.counters().faults, want, "one fault per bad peer");
}

// ---- the raw peer ----

fn raw(server: &Endpoint) -> TcpStream {
    let s = TcpStream::connect(addr(server)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    s
}

#[derive(Debug, PartialEq, Eq)]
enum Closed {
    /// A FIN: the server read everything we sent and closed.
    Eof,
    /// A reset: the server closed with our bytes unread (or we wrote after it closed).
    Reset,
}

/// Reads and discards what the server sends until it closes the socket; panics if that takes longer than
/// `within`. Returns how the socket ended and when.
fn wait_closed(s: &mut TcpStream, within: Duration) -> (Closed, Duration) {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (Closed::Eof, start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (Closed::Reset, start.elapsed()),
        }
        assert!(start.elapsed() < within, "the server kept the socket open for {within:?}");
    }
}

/// A preamble built by hand from frame.rs's layout, with a correct crc.
fn preamble(tag: u8, lens: [u32; 3]) -> [u8; PREAMBLE_BYTES] {
    let mut p = [0u8; PREAMBLE_BYTES];
    p[0] = tag;
    p[1] = lens.iter().rposition(|&l| l > 0).map_or(0, |i| i + 1) as u8;
    for (i, l) in lens.iter().enumerate() {
        p[4 + 4 * i..8 + 4 * i].copy_from_slice(&l.to_le_bytes());
    }
    let crc = crc32c::crc32c(&p[..20]);
    p[20..24].copy_from_slice(&crc.to_le_bytes());
    p
}

fn ident_frame(num: u64) -> Vec<u8> {
    let ci = ClientIdent { name: EntityName::client(num), addr: None, nonce: num, cookie: 1, global_seq: 1 };
    let mut tx = TxQueue::new();
    tx.push_control(Tag::ClientIdent, &ci);
    tx.take_all()
}

/// message.rs's header layout: u16 type, u8 priority, u8 0, u32 0, u64 seq, u64 ack_seq, u64 tid.
fn msg_header(seq: u64, tid: u64) -> [u8; MSG_HEADER_BYTES] {
    let mut h = [0u8; MSG_HEADER_BYTES];
    h[0..2].copy_from_slice(&MSG_REQUEST.to_le_bytes());
    h[2] = 127;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&tid.to_le_bytes());
    h
}

fn request_frame(seq: u64, front: &Bytes) -> Vec<u8> {
    let mut tx = TxQueue::new();
    tx.push_frame(Tag::Message, &msg_header(seq, seq), front, &Bytes::new());
    tx.take_all()
}

/// Opens a session by hand: our banner and a ClientIdent as peer `client.num`, then the server's banner and
/// ServerIdent.
fn handshake(server: &Endpoint, num: u64) -> TcpStream {
    let mut s = raw(server);
    s.set_read_timeout(Some(T)).unwrap();
    let mut hello = frame::encode_banner().to_vec();
    hello.extend(ident_frame(num));
    s.write_all(&hello).unwrap();
    let mut banner = [0u8; frame::BANNER_BYTES];
    s.read_exact(&mut banner).unwrap();
    frame::decode_banner(&banner).unwrap();
    let mut pre = [0u8; PREAMBLE_BYTES];
    s.read_exact(&mut pre).unwrap();
    assert_eq!(pre[0], Tag::ServerIdent as u8);
    let len = u32::from_le_bytes(pre[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len + frame::CRC_BYTES];
    s.read_exact(&mut rest).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

// ---- process memory and logs ----

/// A field of /proc/self/status in bytes (VmRSS: resident now; VmHWM: the most ever resident).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    let kib: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

/// Close reasons are only logged, so the tests read them from the log: every `messenger` event at info and
/// above goes into this buffer (one subscriber for the whole test binary).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("messenger=info"))
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .try_init();
}

fn log_lines_with(needles: &[&str]) -> Vec<String> {
    let log = LOG.lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

// ---- the tests ----

// Goal: bytes that are not a banner close the socket at once. Method: two raw peers send 24 bytes of garbage
// and 4 KiB of garbage instead of the banner.
#[test]
fn garbage_instead_of_a_banner_is_refused() {
    let pool = WorkerPool::new(2).unwrap();
    let server = server(&pool, config());
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for (i, len) in [frame::BANNER_BYTES, garbage.len()].into_iter().enumerate() {
        let mut s = raw(&server);
        s.write_all(&garbage[..len]).unwrap();
        let (how, after) = wait_closed(&mut s, CLOSE_WITHIN);
        assert!(how == Closed::Eof || len > frame::BANNER_BYTES, "{how:?} after {after:?}");
        wait_faults(&server.msgr, i as u64 + 1);
    }
    assert_eq!(server.msgr.counters().msgs_in, 0);
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: a banner with the wrong magic, and one requiring a feature we lack, are refused. Method: a raw peer
// sends each as its whole first 24 bytes (a ClientIdent follows the feature one, and must not be looked at).
#[test]
fn wrong_banner_and_unknown_required_feature_are_refused() {
    let pool = WorkerPool::new(2).unwrap();
    let server = server(&pool, config());
    let mut wrong_magic = frame::encode_banner();
    wrong_magic[..8].copy_from_slice(b"ceph v2\n");
    let mut needs_feature = frame::encode_banner();
    needs_feature[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
    assert!(frame::decode_banner(&needs_feature).is_err(), "bit 63 is not a feature we support");
    let mut needs_feature_then_ident = needs_feature.to_vec();
    needs_feature_then_ident.extend(ident_frame(1001));
    for (i, hello) in [wrong_magic.to_vec(), needs_feature_then_ident].into_iter().enumerate() {
        let mut s = raw(&server);
        s.write_all(&hello).unwrap();
        wait_closed(&mut s, CLOSE_WITHIN);
        wait_faults(&server.msgr, i as u64 + 1);
    }
    assert!(server.msgr.counters().msgs_in == 0 && server.events.try_recv().is_err(), "no session opened");
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: an oversized or misplaced frame is refused from its preamble alone, without waiting for the bytes it
// announces. Method: after a valid banner, a raw peer sends only a preamble: a ClientIdent of
// CONTROL_BYTES_MAX + 1 bytes (correct crc, so the length check is what rejects it), then, on a second socket,
// a Message of a legal 16 MiB before any ident; on a third, after a real handshake, a Message whose front is
// one byte over the limit. Each socket must close within 2 s while the handshake timeout is 10 s.
#[test]
fn oversized_or_early_frames_are_refused_from_the_preamble() {
    let pool = WorkerPool::new(2).unwrap();
    let cfg = config();
    let front_max = cfg.limits.front_bytes_max;
    let server = server(&pool, cfg);
    let hdr = MSG_HEADER_BYTES as u32;
    let early = [
        preamble(Tag::ClientIdent as u8, [CONTROL_BYTES_MAX + 1, 0, 0]),
        preamble(Tag::Message as u8, [hdr, front_max, 0]),
    ];
    for (i, pre) in early.into_iter().enumerate() {
        let mut s = raw(&server);
        let mut hello = frame::encode_banner().to_vec();
        hello.extend(pre);
        s.write_all(&hello).unwrap();
        let (how, after) = wait_closed(&mut s, CLOSE_WITHIN);
        assert_eq!(how, Closed::Eof, "the server read all we sent, then closed (after {after:?})");
        wait_faults(&server.msgr, i as u64 + 1);
    }
    let mut s = handshake(&server, 1002);
    s.write_all(&preamble(Tag::Message as u8, [hdr, front_max + 1, 0])).unwrap();
    wait_closed(&mut s, CLOSE_WITHIN);
    wait_faults(&server.msgr, 3);
    assert_eq!(server.msgr.counters().msgs_in, 0);
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: a peer that hangs up in the middle of a frame is closed cleanly, during the handshake and after it.
// Method: a raw peer sends the banner and half a ClientIdent, another completes the handshake and sends half a
// Message; each then shuts down its write half. The server must read to the end and close (a FIN, not a reset),
// without panicking.
#[test]
fn truncated_frame_then_half_close_is_closed_cleanly() {
    let pool = WorkerPool::new(2).unwrap();
    let server = server(&pool, config());
    let mut hello = frame::encode_banner().to_vec();
    let ident = ident_frame(1003);
    hello.extend(&ident[..ident.len() / 2]);
    let mut s = raw(&server);
    s.write_all(&hello).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(wait_closed(&mut s, CLOSE_WITHIN).0, Closed::Eof);
    wait_faults(&server.msgr, 1);

    let mut s = handshake(&server, 1004);
    let req = request_frame(1, &Bytes::from(vec![7u8; 1000]));
    s.write_all(&req[..req.len() - 100]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(wait_closed(&mut s, CLOSE_WITHIN).0, Closed::Eof);
    wait_faults(&server.msgr, 2);
    assert_eq!(server.msgr.counters().msgs_in, 0, "half a message is never delivered");
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: corrupted checksums close the socket. Method: a raw peer sends a ClientIdent whose preamble crc is off
// by one bit; another a ClientIdent whose segment crc is wrong; a third completes the handshake and sends a
// Message whose front segment crc is wrong.
#[test]
fn bad_preamble_crc_and_bad_segment_crc_are_refused() {
    let pool = WorkerPool::new(2).unwrap();
    let server = server(&pool, config());
    let mut bad_preamble = ident_frame(1005);
    bad_preamble[20] ^= 1;
    let mut bad_segment = ident_frame(1006);
    let last = bad_segment.len() - 1;
    bad_segment[last] ^= 0xff;
    for (i, f) in [bad_preamble, bad_segment].into_iter().enumerate() {
        let mut s = raw(&server);
        let mut hello = frame::encode_banner().to_vec();
        hello.extend(f);
        s.write_all(&hello).unwrap();
        wait_closed(&mut s, CLOSE_WITHIN);
        wait_faults(&server.msgr, i as u64 + 1);
    }
    let mut s = handshake(&server, 1007);
    let mut req = request_frame(1, &Bytes::from_static(b"front"));
    let last = req.len() - 1;
    req[last] ^= 0xff;
    s.write_all(&req).unwrap();
    wait_closed(&mut s, CLOSE_WITHIN);
    wait_faults(&server.msgr, 3);
    assert_eq!(server.msgr.counters().msgs_in, 0, "a corrupt message is never delivered");
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: a frame tag we do not know closes the socket, before and after the handshake. Method: a raw peer sends
// a banner and a frame with tag 200 (correct preamble and segment crcs); another completes the handshake and
// sends a frame with tag 13, one past the last tag.
#[test]
fn unknown_frame_tag_is_refused() {
    let pool = WorkerPool::new(2).unwrap();
    let server = server(&pool, config());
    let unknown = |tag: u8| {
        let mut f = preamble(tag, [4, 0, 0]).to_vec();
        f.extend(b"junk");
        f.extend(crc32c::crc32c(b"junk").to_le_bytes());
        f
    };
    let mut s = raw(&server);
    let mut hello = frame::encode_banner().to_vec();
    hello.extend(unknown(200));
    s.write_all(&hello).unwrap();
    wait_closed(&mut s, CLOSE_WITHIN);
    wait_faults(&server.msgr, 1);
    let mut s = handshake(&server, 1008);
    s.write_all(&unknown(Tag::Ack as u8 + 1)).unwrap();
    wait_closed(&mut s, CLOSE_WITHIN);
    wait_faults(&server.msgr, 2);
    normal_client_gets_a_reply(&pool, &server);
}

// Goal: a peer that connects and never completes the handshake is dropped by the handshake timeout. Method:
// with connect_timeout 300 ms, one raw peer says nothing and another sends only a banner; both sockets must be
// closed after 300 ms and within 2 s.
#[test]
fn silent_peer_is_closed_by_the_handshake_timeout() {
    let pool = WorkerPool::new(2).unwrap();
    let timeout = Duration::from_millis(300);
    let server = server(&pool, MessengerConfig { connect_timeout: timeout, ..test_config() });
    let connected_at = Instant::now();
    let mut silent = raw(&server);
    let mut banner_only = raw(&server);
    banner_only.write_all(&frame::encode_banner()).unwrap();
    for s in [&mut silent, &mut banner_only] {
        let (how, _) = wait_closed(s, Duration::from_secs(2));
        let after = connected_at.elapsed();
        assert_eq!(how, Closed::Eof);
        assert!(after >= timeout, "closed after {after:?}, before the handshake timeout");
    }
    wait_faults(&server.msgr, 2);
    normal_client_gets_a_reply(&pool, &server);
}

/// Answers every request with a reply carrying its own freshly written `reply_bytes`, as an OSD answers reads.
struct BigReplier {
    reply_bytes: usize,
    served: AtomicU64,
    first_conn: Mutex<Option<Connection>>,
}

impl Dispatcher for BigReplier {
    fn can_fast_dispatch(&self, _m: &Message) -> bool {
        true
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        if m.msg_type != MSG_REQUEST {
            return Err(Refused::NotMine(m));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        self.first_conn.lock().unwrap().get_or_insert_with(|| conn.clone());
        let data = Bytes::from(vec![0x5a; self.reply_bytes]);
        let _ = conn
            .send_message(Message::new(MSG_REPLY, Bytes::from_static(b"ok")).with_tid(m.tid).with_data(data));
        Ok(())
    }
}

// Goal: a peer that sends requests but never reads the replies is throttled, then dropped as not reading, with
// the server's memory bounded. Method: outgoing_bytes_soft_max 1 MiB, idle_timeout 1 s, a fast dispatcher
// answering each request with a fresh 64 KiB reply; a raw peer handshakes and writes 100-byte requests
// (a 640x amplification), never reading, until the server closes the socket. Its writes must block (the server
// stopped reading: it read less than was sent), the close must come about 1 s later with "peer stopped
// reading", and RSS must stay within 200 MiB of the start; then a normal client still gets its reply.
#[test]
fn peer_that_stops_reading_is_throttled_then_dropped() {
    const REPLY_BYTES: usize = 64 << 10;
    const GROWTH_MAX: u64 = 200 * MIB;
    let pool = WorkerPool::new(2).unwrap();
    let idle = Duration::from_secs(1);
    let cfg = MessengerConfig {
        outgoing_bytes_soft_max: MIB as usize,
        idle_timeout: idle,
        keepalive_interval: None,
        ..config()
    };
    let server = server(&pool, cfg);
    server.msgr.set_policy(EntityType::Client, Policy::stateless_server());
    let replier = Arc::new(BigReplier {
        reply_bytes: REPLY_BYTES,
        served: AtomicU64::new(0),
        first_conn: Mutex::new(None),
    });
    server.msgr.add_dispatcher_head(Arc::clone(&replier) as Arc<dyn Dispatcher>);
    let rss_before = proc_status_bytes("VmRSS:");

    let mut s = handshake(&server, 1009);
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let front = Bytes::from(vec![1u8; 100]);
    let (mut seq, mut written) = (0u64, 0u64);
    let (mut batch, mut sent) = (Vec::new(), 0);
    let mut blocked_at = None;
    let deadline = Instant::now() + T;
    // Write, never reading, until the server gives up on us. A write that times out (or comes back short, which
    // is how a timeout after partial progress shows) is the throttle engaging; the rest of that batch is retried,
    // so the stream stays whole even if the stall was only a slow moment.
    while server.msgr.counters().faults == 0 {
        if sent == batch.len() {
            batch.clear();
            sent = 0;
            for _ in 0..64 {
                seq += 1;
                batch.extend(request_frame(seq, &front));
            }
        }
        match s.write(&batch[sent..]) {
            Ok(n) => {
                written += n as u64;
                sent += n;
                if sent < batch.len() {
                    blocked_at.get_or_insert_with(Instant::now);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                blocked_at.get_or_insert_with(Instant::now);
            }
            Err(_) => break, // the server closed the socket: the checks below say whether it was right to
        }
        let grown = proc_status_bytes("VmRSS:").saturating_sub(rss_before);
        assert!(grown < GROWTH_MAX, "RSS grew {} MiB while the peer wrote {seq} requests", grown / MIB);
        assert!(
            Instant::now() < deadline,
            "not closed: {seq} requests written, blocked since {blocked_at:?}"
        );
    }
    wait_faults(&server.msgr, 1);
    let blocked_at = blocked_at.expect("the peer's writes blocked before the server closed the socket");
    let closed_after = blocked_at.elapsed();
    let c = server.msgr.counters();
    let served = replier.served.load(Ordering::Relaxed);
    assert!(c.bytes_in < written, "the server stopped reading: it read {} of {written} bytes", c.bytes_in);
    assert!(served < seq, "requests were left unread: {served} of {seq} served");
    assert!(closed_after < idle + CLOSE_WITHIN, "closed {closed_after:?} after the throttle engaged");
    let peer = "peer=client.1009 ";
    let lines = log_lines_with(&["closing socket", peer]);
    assert!(
        lines.iter().any(|l| l.contains("reason=peer stopped reading")),
        "closed for the wrong reason: {lines:?}"
    );
    let conn = replier.first_conn.lock().unwrap().clone().expect("the peer's requests were served");
    let deadline = Instant::now() + T;
    while !conn.is_closed() {
        assert!(Instant::now() < deadline, "the lossy session did not end with its socket");
        std::thread::sleep(Duration::from_millis(2));
    }
    let hwm = proc_status_bytes("VmHWM:");
    let peak_growth = hwm.saturating_sub(rss_before);
    assert!(peak_growth < GROWTH_MAX, "peak RSS grew {} MiB", peak_growth / MIB);
    eprintln!(
        "not-reading peer: {seq} requests written, {served} served, closed {closed_after:?} after blocking, \
         peak RSS +{} MiB",
        peak_growth / MIB
    );
    wait_closed(&mut s, CLOSE_WITHIN);

    normal_client_gets_a_reply(&pool, &server);
}

// Goal: a lossy session's outgoing bytes are bounded in bytes, not only by the idle timeout: a peer that asks
// for replies and never reads them is cut off once the replies waiting for it reach the policy's
// send_bytes_max, and never more than that is held for it. Method: send_bytes_max 4 MiB, with
// outgoing_bytes_soft_max (256 MiB) and idle_timeout (60 s) too large to act first; a fast dispatcher answers
// each 100-byte request with a fresh 64 KiB reply; a raw peer handshakes and writes requests, never reading,
// until the server closes the socket. The close must come within 10 s (long before the idle timeout) from the
// bound (send_backlog_faults, the log's reason), and the connection's high water of outgoing bytes must be at
// most 4 MiB.
#[test]
fn peer_that_never_reads_is_faulted_at_the_outgoing_bound() {
    const REPLY_BYTES: usize = 64 << 10;
    const BOUND: u64 = 4 * MIB;
    let pool = WorkerPool::new(2).unwrap();
    let cfg = MessengerConfig {
        outgoing_bytes_soft_max: 256 << 20,
        idle_timeout: Duration::from_secs(60),
        keepalive_interval: None,
        ..config()
    };
    let server = server(&pool, cfg);
    server.msgr.set_policy(EntityType::Client, Policy::stateless_server().with_send_bytes_max(BOUND));
    let replier = Arc::new(BigReplier {
        reply_bytes: REPLY_BYTES,
        served: AtomicU64::new(0),
        first_conn: Mutex::new(None),
    });
    server.msgr.add_dispatcher_head(Arc::clone(&replier) as Arc<dyn Dispatcher>);

    let mut s = handshake(&server, 1013);
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let front = Bytes::from(vec![1u8; 100]);
    let mut seq = 0u64;
    let deadline = Instant::now() + T;
    while server.msgr.counters().send_backlog_faults == 0 {
        let mut batch = Vec::new();
        for _ in 0..16 {
            seq += 1;
            batch.extend(request_frame(seq, &front));
        }
        match s.write_all(&batch) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                panic!("the server stopped reading (its backlog soft max) before the outgoing bound cut the peer off")
            }
            Err(_) => break, // closed: the checks below say why
        }
        assert!(Instant::now() < deadline, "not cut off after {seq} requests");
        std::thread::sleep(Duration::from_millis(1));
    }
    wait_faults(&server.msgr, 1);
    assert!(server.msgr.counters().send_backlog_faults >= 1);
    let conn = replier.first_conn.lock().unwrap().clone().expect("the peer's requests were served");
    let high = conn.outgoing_bytes_high_water();
    assert!(high <= BOUND, "held {high} bytes for the peer, over the bound {BOUND}");
    assert!(high > BOUND - REPLY_BYTES as u64, "the bound was reached: high water {high}");
    let lines = log_lines_with(&["closing socket", "peer=client.1013 "]);
    assert!(
        lines.iter().any(|l| l.contains("reason=peer left more unread than the outgoing bound")),
        "closed for the wrong reason: {lines:?}"
    );
    let deadline = Instant::now() + T;
    while !conn.is_closed() {
        assert!(Instant::now() < deadline, "the lossy session did not end");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(conn.outgoing_bytes(), 0, "a faulted lossy session gives back what it held");
    wait_closed(&mut s, CLOSE_WITHIN);
    normal_client_gets_a_reply(&pool, &server);
}
