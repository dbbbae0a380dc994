//! Loopback tests of the messenger through its public API: real sockets on 127.0.0.1, real worker threads.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use messenger::{EntityName, EntityType, Message, Policy, WorkerPool};

const T: Duration = Duration::from_secs(20);

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
    client.msgr.shutdown();
    server.msgr.shutdown();
}
