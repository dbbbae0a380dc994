//! Goal: shutdown leaves no thread behind. Method: in its own test binary (so no other test's threads are
//! counted), count this process's threads before a pool and two messengers exist, run traffic, shut the
//! messengers down, wait, shut the pool down, and count again.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use messenger::{EntityName, Message, WorkerPool};

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").expect("procfs").count()
}

#[test]
fn shutdown_and_wait_join_every_thread() {
    let before = thread_count();
    let pool = WorkerPool::new(3).unwrap();
    let server =
        endpoint(&pool, EntityName::osd(0), Opts { bind: true, reply: true, fast: false, ..Opts::default() });
    let client = endpoint(&pool, EntityName::client(1), Opts::default());
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    for i in 0..100 {
        conn.send_message(Message::new(MSG_REQUEST, Bytes::from_static(b"x")).with_tid(i)).unwrap();
    }
    for _ in 0..100 {
        client.msgs.recv_timeout(Duration::from_secs(20)).unwrap();
    }
    assert_eq!(thread_count(), before + 3 + 2, "3 workers and 2 dispatch threads");
    for e in [&client, &server] {
        e.msgr.shutdown();
        e.msgr.wait();
    }
    assert!(conn.is_closed(), "shutdown closed the sessions");
    pool.shutdown();
    assert_eq!(thread_count(), before, "every thread was joined");
}
