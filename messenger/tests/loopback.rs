//! Loopback tests of the messenger through its public API: real sockets on 127.0.0.1, real worker threads.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use messenger::{
    Connection, EntityName, EntityType, Message, MessengerConfig, Policy, SendError, WorkerPool,
};

const T: Duration = Duration::from_secs(30);

fn seq_msg(i: u64) -> Message {
    Message::encode(MSG_REQUEST, &i).with_tid(i)
}

/// A stateful server (osd.0, answering requests when `reply`) and a lossless client connected to it, both
/// failing every ~`inject`th socket operation (ms_inject_socket_failures).
fn lossless_pair_with_faults(
    pool: &Arc<WorkerPool>,
    inject: u64,
    reply: bool,
) -> (Endpoint, Endpoint, Connection) {
    let faulty = MessengerConfig { inject_socket_failures: inject, ..test_config() };
    let policies = vec![(EntityType::Client, Policy::stateful_server())];
    let server = endpoint(
        pool,
        EntityName::osd(0),
        Opts { bind: true, reply, cfg: faulty.clone(), policies, ..Opts::default() },
    );
    let policies = vec![(EntityType::Osd, Policy::lossless_client())];
    let client = endpoint(pool, EntityName::client(1), Opts { cfg: faulty, policies, ..Opts::default() });
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    (server, client, conn)
}

// Goal: a request gets its reply over a fresh connection. Method: one server, one client, fast dispatch.
#[test]
fn request_reply_round_trip() {
    init_tracing();
    let pool = WorkerPool::new(2).unwrap();
    let server = endpoint(&pool, EntityName::osd(0), Opts { bind: true, reply: true, ..Opts::default() });
    let client = endpoint(&pool, EntityName::client(1), Opts::default());
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    conn.send_message(Message::new(MSG_REQUEST, Bytes::from_static(b"hi")).with_tid(9)).unwrap();
    let (_, req) = server.msgs.recv_timeout(T).unwrap();
    assert_eq!(&req.front[..], b"hi");
    let (c, rep) = client.msgs.recv_timeout(T).unwrap();
    assert_eq!((rep.msg_type, rep.tid), (MSG_REPLY, 9));
    assert_eq!(c, conn);
    assert_eq!(server.msgr.counters().msgs_in, 1);
    assert!(matches!(client.events.recv_timeout(T).unwrap(), Event::Connect(_)));
}

// Goal: exactly-once, in-order delivery over a lossless session across many socket faults, both ways. Method:
// 100 000 requests from a lossless client to a stateful server that answers each one, with every ~200th socket
// operation failing on both sides (ms_inject_socket_failures); the client keeps at most 64 requests unanswered
// (so the traffic is made of many small reads and writes, as a real client's is, without making the test a
// measure of thread wake-up latency: on a busy machine a window of 8 took 18 times its quiet time); the server
// checks each request body is the next number and the client checks each reply's tid is the next number.
#[test]
fn lossless_delivery_is_exactly_once_and_in_order_across_injected_faults() {
    init_tracing();
    const N: u64 = 100_000;
    const WINDOW: u64 = 64;
    let pool = WorkerPool::new(3).unwrap();
    let (server, client, conn) = lossless_pair_with_faults(&pool, 200, true);
    let replies = client.msgs.clone();
    let sender = std::thread::spawn(move || {
        let mut answered = 0u64;
        let take_reply = |answered: &mut u64| {
            let (_, m) = replies.recv_timeout(Duration::from_secs(60)).expect("replies keep coming");
            assert_eq!(m.msg_type, MSG_REPLY);
            assert_eq!(m.tid, *answered + 1, "replies out of order or duplicated");
            *answered += 1;
        };
        for i in 1..=N {
            while i - answered > WINDOW {
                take_reply(&mut answered);
            }
            conn.send_message(seq_msg(i)).unwrap();
        }
        while answered < N {
            take_reply(&mut answered);
        }
        conn
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    for want in 1..=N {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, m) = server.msgs.recv_timeout(left).unwrap_or_else(|_| panic!("stalled waiting for {want}"));
        let got: u64 = m.decode().unwrap();
        assert_eq!(got, want, "out of order or duplicated");
    }
    let conn = sender.join().unwrap();
    assert!(server.msgs.recv_timeout(Duration::from_millis(200)).is_err(), "nothing after the last message");
    let (c, s) = (client.msgr.counters(), server.msgr.counters());
    assert!(c.injected_faults + s.injected_faults >= 20, "faults were injected: {c:?} {s:?}");
    assert!(c.reconnects >= 10, "the session reconnected after faults: {c:?}");
    assert!(c.resent + s.resent > 0, "unacknowledged messages were resent: {c:?} {s:?}");
    assert!(!conn.is_closed());
    assert_eq!(c.remote_resets + s.remote_resets, 0);
}

// Goal: large messages (received into buffers of their own, with block crcs computed as they arrive) survive
// socket faults in the middle of a frame, both ways; a sender's known crcs are honoured; and a client with far
// more queued than `outgoing_bytes_soft_max` keeps reading its replies (when both sides of a session held back
// for their own backlog, each waited for the other to read first: a deadlock). Method: 150 requests of 1-3 MiB
// sent at once from a lossless client, each answered with a reply of 1-3 MiB, every ~200th socket operation
// failing on both sides; half are sent with their block crcs known. Both sides check every byte, the order, and
// that the block crcs they got match the bytes.
#[test]
fn large_messages_arrive_whole_and_in_order_across_injected_faults() {
    use messenger::crc::{block_crcs, CrcBytes};
    init_tracing();
    const N: u64 = 150;
    let pattern: Bytes =
        (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>().into();
    let piece = |i: u64| {
        let len = (1 << 20) + (i as usize * 13_577) % (2 << 20);
        let at = (i as usize * 65_536) % (pattern.len() - len);
        pattern.slice(at..at + len)
    };
    let pool = WorkerPool::new(2).unwrap();
    let (server, client, conn) = lossless_pair_with_faults(&pool, 200, false);
    let with_piece = |m: Message, i: u64| match i % 2 {
        0 => m.with_crc_data(CrcBytes::computed(piece(i))),
        _ => m.with_data(piece(i)),
    };
    let check = |m: &Message, i: u64| {
        assert_eq!(m.decode::<u64>().unwrap(), i, "out of order or duplicated");
        assert!(m.data == piece(i), "message {i}: {} bytes arrived, not the ones sent", m.data.len());
        assert_eq!(m.crc_data().block_crcs(), Some(&block_crcs(&m.data)[..]), "message {i}: block crcs");
    };
    for i in 1..=N {
        conn.send_message(with_piece(seq_msg(i), i)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let left = || deadline.saturating_duration_since(Instant::now());
    std::thread::scope(|scope| {
        // Replies are checked and dropped as they come: a received message holds its share of the dispatch
        // throttle, and a client holding them all would (rightly) stop reading.
        scope.spawn(|| {
            for want in 1..=N {
                let (_, m) = client.msgs.recv_timeout(left()).unwrap_or_else(|_| panic!("no reply {want}"));
                assert_eq!(m.tid, want);
                check(&m, N + want);
            }
        });
        for want in 1..=N {
            let (from, m) = server.msgs.recv_timeout(left()).unwrap_or_else(|_| panic!("no request {want}"));
            check(&m, want);
            let reply = Message::encode(MSG_REPLY, &(N + want)).with_tid(want);
            from.send_message(with_piece(reply, N + want)).unwrap();
        }
    });
    let c = client.msgr.counters();
    let s = server.msgr.counters();
    assert!(c.injected_faults + s.injected_faults >= 10, "faults were injected: {c:?} {s:?}");
    assert_eq!(c.remote_resets + s.remote_resets, 0);
}

// Goal: 1000 concurrent connections work and spread over the workers. Method: 1000 client messengers on one
// shared 3-worker pool each connect to one server and get a reply; then count sockets per worker.
#[test]
fn a_thousand_concurrent_connections_spread_over_the_workers() {
    init_tracing();
    const N: usize = 1000;
    let pool = WorkerPool::new(3).unwrap();
    let server = endpoint(&pool, EntityName::osd(0), Opts { bind: true, reply: true, ..Opts::default() });
    let (tx, replies) = crossbeam_channel::unbounded();
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let m = messenger::Messenger::new(
            Arc::clone(&pool),
            EntityName::client(i as u64),
            i as u64 + 1,
            test_config(),
        );
        let (etx, _erx) = crossbeam_channel::unbounded();
        m.add_dispatcher_tail(Arc::new(Collector {
            msgs: tx.clone(),
            events: etx,
            fast: true,
            reply: false,
            delay: None,
        }));
        let c = m.connect(EntityName::osd(0), addr(&server)).unwrap();
        c.send_message(seq_msg(i as u64)).unwrap();
        clients.push((m, c));
    }
    let mut seen = HashSet::new();
    for _ in 0..N {
        let (c, m) = replies.recv_timeout(T).expect("every client gets its reply");
        assert_eq!(m.msg_type, MSG_REPLY);
        seen.insert(c.id() ^ (m.tid << 20));
    }
    assert_eq!(seen.len(), N);
    let loads = pool.loads();
    let total: usize = loads.iter().sum();
    assert!(total >= 2 * N, "both ends of every connection are live: {loads:?}");
    for l in &loads {
        assert!((*l as f64) > total as f64 / 3.0 * 0.8, "sockets spread over workers: {loads:?}");
    }
    assert_eq!(server.msgr.counters().accepts, N as u64);
    for (m, _) in &clients {
        m.shutdown();
    }
}

// Goal: a lossy session ends on a fault and both sides are told. Method: lossy client, stateless server; the
// server marks the connection down; the client gets handle_reset and its old connection refuses sends; a new
// connect works.
#[test]
fn lossy_fault_drops_the_session_and_notifies_reset() {
    init_tracing();
    let pool = WorkerPool::new(2).unwrap();
    let server = endpoint(
        &pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            reply: true,
            policies: vec![(EntityType::Client, Policy::stateless_server())],
            ..Opts::default()
        },
    );
    let client = endpoint(
        &pool,
        EntityName::client(1),
        Opts { policies: vec![(EntityType::Osd, Policy::lossy_client())], ..Opts::default() },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    conn.send_message(seq_msg(1)).unwrap();
    let (server_conn, _) = server.msgs.recv_timeout(T).unwrap();
    client.msgs.recv_timeout(T).unwrap();
    server_conn.mark_down();
    let deadline = Instant::now() + T;
    loop {
        match client.events.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap() {
            Event::Reset(id) if id == conn.id() => break,
            _ => {}
        }
    }
    assert!(conn.is_closed());
    assert_eq!(conn.send_message(seq_msg(2)), Err(SendError::Closed));
    assert_eq!(client.msgr.counters().resets, 1);
    let again = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    assert_ne!(again, conn);
    again.send_message(seq_msg(3)).unwrap();
    let (_, m) = server.msgs.recv_timeout(T).unwrap();
    assert_eq!(m.decode::<u64>().unwrap(), 3);
}

// Goal: a peer restarted mid-stream is detected and reported, and traffic resumes with the new instance.
// Method: a lossless client streams to a stateful server; the server messenger is shut down and a new one bound
// to the same address; the client's reconnect gets SessionReset, so it reports handle_remote_reset, and later
// messages reach the new server.
#[test]
fn restarted_peer_is_detected_as_a_remote_reset() {
    init_tracing();
    let pool = WorkerPool::new(2).unwrap();
    let opts = || Opts {
        bind: false,
        policies: vec![(EntityType::Client, Policy::stateful_server())],
        ..Opts::default()
    };
    let server = endpoint(&pool, EntityName::osd(0), Opts { bind: true, ..opts() });
    let server_addr = addr(&server);
    let client = endpoint(
        &pool,
        EntityName::client(1),
        Opts { policies: vec![(EntityType::Osd, Policy::lossless_client())], ..Opts::default() },
    );
    let conn = client.msgr.connect(EntityName::osd(0), server_addr).unwrap();
    for i in 1..=100 {
        conn.send_message(seq_msg(i)).unwrap();
    }
    for _ in 1..=100 {
        server.msgs.recv_timeout(T).unwrap();
    }
    server.msgr.shutdown();
    server.msgr.wait();
    drop(server);
    let server2 = endpoint(&pool, EntityName::osd(0), opts());
    server2.msgr.bind(server_addr).unwrap();
    server2.msgr.ready();
    // The client notices when it next talks: a keepalive or a message hits the dead socket, it reconnects.
    let deadline = Instant::now() + T;
    let mut i = 1000;
    loop {
        i += 1;
        conn.send_message(seq_msg(i)).unwrap();
        if let Ok(Event::RemoteReset(id)) = client.events.recv_timeout(Duration::from_millis(50)) {
            assert_eq!(id, conn.id());
            break;
        }
        assert!(Instant::now() < deadline, "no remote reset reported");
    }
    assert_eq!(client.msgr.counters().remote_resets, 1);
    conn.send_message(seq_msg(5000)).unwrap();
    let deadline = Instant::now() + T;
    loop {
        let (_, m) = server2.msgs.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap();
        if m.decode::<u64>().unwrap() == 5000 {
            break;
        }
    }
}

// Goal: a slow dispatcher flooded with 4 MiB messages bounds memory on both sides. Method: the server's client
// policy throttles to 4 messages / 16 MiB and its dispatcher sleeps 20 ms per message (queued dispatch); the
// client's send throttle is 24 MiB. 40 messages go through in order; neither throttle's high-water mark exceeds
// its limit by more than one message.
#[test]
fn slow_dispatcher_under_a_flood_of_4mib_messages_stays_within_the_throttles() {
    init_tracing();
    const MIB4: usize = 4 << 20;
    const N: u64 = 40;
    let pool = WorkerPool::new(2).unwrap();
    let server = endpoint(
        &pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            fast: false,
            delay: Some(Duration::from_millis(20)),
            cfg: MessengerConfig { dispatch_throttle_bytes: 16 << 20, ..test_config() },
            policies: vec![(EntityType::Client, Policy::stateful_server().with_throttle(4, 16 << 20))],
            ..Opts::default()
        },
    );
    let client = endpoint(
        &pool,
        EntityName::client(1),
        Opts {
            policies: vec![(EntityType::Osd, Policy::lossless_client().with_send_bytes_max(24 << 20))],
            ..Opts::default()
        },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    let payload = Bytes::from(vec![0xabu8; MIB4]);
    let sender = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            for i in 1..=N {
                conn.send_message(seq_msg(i).with_data(payload.clone())).unwrap();
                assert!(conn.unacked_messages() <= 7, "send throttle bounds what is queued");
            }
        })
    };
    for want in 1..=N {
        let (_, m) = server.msgs.recv_timeout(T).unwrap();
        assert_eq!(m.decode::<u64>().unwrap(), want);
        assert_eq!(m.data.len(), MIB4);
        let (_, high) = server.msgr.dispatch_throttle_usage();
        assert!(high <= (16 << 20) + MIB4 as u64 + 64, "dispatch throttle high water {high}");
    }
    sender.join().unwrap();
    assert!(server.msgr.counters().throttle_stalls > 0, "the receiver actually stalled on its throttle");
}
