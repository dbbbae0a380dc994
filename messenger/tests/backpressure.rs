//! Backpressure instead of drops: a dispatcher that is busy hands the message back and the messenger stops
//! reading; queues hold at their named bounds under floods.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use messenger::{Connection, Dispatcher, EntityName, EntityType, Message, Policy, Refused, WorkerPool};

/// Every wait in these tests fails the test after this long.
const T: Duration = Duration::from_secs(30);

fn seq_msg(i: u64) -> Message {
    Message::encode(MSG_REQUEST, &i).with_tid(i)
}

/// Says Busy `busy_times` times to every `busy_every`th message, and to every message while `gate` is closed;
/// records what it takes, in order.
struct Busy {
    fast: bool,
    busy_every: u64,
    busy_times: u64,
    gate_open: AtomicBool,
    tries: Mutex<HashMap<u64, u64>>,
    busy_answers: AtomicU64,
    taken: Mutex<Vec<u64>>,
}

impl Busy {
    fn new(fast: bool, busy_every: u64, busy_times: u64, gate_open: bool) -> Arc<Busy> {
        Arc::new(Busy {
            fast,
            busy_every,
            busy_times,
            gate_open: AtomicBool::new(gate_open),
            tries: Mutex::new(HashMap::new()),
            busy_answers: AtomicU64::new(0),
            taken: Mutex::new(Vec::new()),
        })
    }
}

impl Dispatcher for Busy {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        self.fast && m.msg_type == MSG_REQUEST
    }
    fn dispatch(&self, _conn: &Connection, m: Message) -> Result<(), Refused> {
        if m.msg_type != MSG_REQUEST {
            return Err(Refused::NotMine(m));
        }
        let i: u64 = m.decode().unwrap();
        let tries = {
            let mut t = self.tries.lock().unwrap();
            let e = t.entry(i).or_insert(0);
            *e += 1;
            *e
        };
        let busy = !self.gate_open.load(Ordering::Acquire)
            || (self.busy_every > 0 && i % self.busy_every == 0 && tries <= self.busy_times);
        if busy {
            self.busy_answers.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Busy(m));
        }
        self.taken.lock().unwrap().push(i);
        Ok(())
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A lossless client and a stateful server whose head dispatcher is `d`.
fn pair(pool: &Arc<WorkerPool>, d: Arc<Busy>) -> (Endpoint, Endpoint, Connection) {
    let server = endpoint(
        pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            fast: d.fast,
            policies: vec![(EntityType::Client, Policy::stateful_server())],
            ..Opts::default()
        },
    );
    server.msgr.add_dispatcher_head(d);
    let client = endpoint(
        pool,
        EntityName::client(1),
        Opts { policies: vec![(EntityType::Osd, Policy::lossless_client())], ..Opts::default() },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    (server, client, conn)
}

fn busy_messages_arrive_exactly_once_in_order(fast: bool) {
    const N: u64 = 300;
    const EVERY: u64 = 7;
    const TIMES: u64 = 5;
    let pool = WorkerPool::new(2).unwrap();
    let d = Busy::new(fast, EVERY, TIMES, true);
    let (server, _client, conn) = pair(&pool, Arc::clone(&d));
    // Mixed sizes: a large frame read across several reads followed by small ones read in the same read as its
    // end is how a message could be decoded before the one ahead of it reached its dispatcher.
    let big = Bytes::from(vec![0x22u8; 300 << 10]);
    for i in 1..=N {
        let m = if i % 10 == 3 { seq_msg(i).with_data(big.clone()) } else { seq_msg(i) };
        conn.send_message(m).unwrap();
    }
    wait_for("every message", || d.taken.lock().unwrap().len() as u64 >= N);
    std::thread::sleep(Duration::from_millis(20)); // time for a duplicate to show up, if there were one
    let taken = d.taken.lock().unwrap().clone();
    assert_eq!(taken, (1..=N).collect::<Vec<_>>(), "each message exactly once, in order");
    assert_eq!(d.busy_answers.load(Ordering::Relaxed), (N / EVERY) * TIMES, "Busy was said N times each");
    let tries = d.tries.lock().unwrap();
    for i in 1..=N {
        let want = if i % EVERY == 0 { TIMES + 1 } else { 1 };
        assert_eq!(tries[&i], want, "message {i} was offered {} times", tries[&i]);
    }
    assert_eq!(server.msgr.counters().dispatch_busy, (N / EVERY) * TIMES);
    assert_eq!(server.msgr.counters().faults, 0);
}

// Goal: a fast dispatcher that says Busy gets the same message again, before any later one, and nothing is
// lost or duplicated. Method: 300 messages on a lossless session, every tenth of 300 KiB; every 7th is refused
// 5 times before it is taken; the dispatcher records what it takes and how often each message was offered.
#[test]
fn fast_dispatcher_busy_then_accepting_gets_every_message_once_in_order() {
    init_tracing();
    busy_messages_arrive_exactly_once_in_order(true);
}

// Goal: the same on the queued dispatch thread. Method: as above with a dispatcher that is not fast.
#[test]
fn queued_dispatcher_busy_then_accepting_gets_every_message_once_in_order() {
    init_tracing();
    busy_messages_arrive_exactly_once_in_order(false);
}

// Goal: while a fast dispatcher is busy, the messenger stops reading the connection (the sender is pushed
// back by TCP), and once it takes messages again everything arrives exactly once, in order. Method: the
// dispatcher refuses everything until a gate opens; the client sends 64 messages of 1 MiB; once the
// server's bytes_in has stopped growing it must stay put for 300 ms with most of the data still unread and
// the client's messages unacknowledged; then the gate opens and every message arrives in order.
#[test]
fn busy_dispatcher_stops_reading_the_connection() {
    init_tracing();
    const N: u64 = 64;
    const MIB: usize = 1 << 20;
    let pool = WorkerPool::new(2).unwrap();
    let d = Busy::new(true, 0, 0, false);
    let (server, _client, conn) = pair(&pool, Arc::clone(&d));
    let payload = Bytes::from(vec![0x11u8; MIB]);
    for i in 1..=N {
        conn.send_message(seq_msg(i).with_data(payload.clone())).unwrap();
    }
    wait_for("the first Busy", || d.busy_answers.load(Ordering::Relaxed) > 0);
    // Reading stops at once; bytes already in flight settle in socket buffers.
    let mut last = server.msgr.counters().bytes_in;
    let deadline = Instant::now() + T;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = server.msgr.counters().bytes_in;
        if now == last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the server never stopped reading");
    }
    let busy_before = d.busy_answers.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let c = server.msgr.counters();
    assert_eq!(c.bytes_in, last, "the server read from a connection whose dispatcher is busy");
    assert!(c.bytes_in < (N as u64 * MIB as u64) / 2, "most of the data is still unread: {}", c.bytes_in);
    assert!(d.busy_answers.load(Ordering::Relaxed) > busy_before + 10, "the message was offered again");
    assert_eq!(c.msgs_in, 1, "nothing after the refused message was received");
    assert!(d.taken.lock().unwrap().is_empty());
    assert!(conn.unacked_messages() as u64 >= N - 1, "the client still holds its messages");
    d.gate_open.store(true, Ordering::Release);
    wait_for("every message", || d.taken.lock().unwrap().len() as u64 >= N);
    assert_eq!(*d.taken.lock().unwrap(), (1..=N).collect::<Vec<_>>());
    assert_eq!(server.msgr.counters().faults, 0);
}
