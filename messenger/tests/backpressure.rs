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
            || (self.busy_every > 0 && i.is_multiple_of(self.busy_every) && tries <= self.busy_times);
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
    assert!(c.bytes_in < (N * MIB as u64) / 2, "most of the data is still unread: {}", c.bytes_in);
    assert!(d.busy_answers.load(Ordering::Relaxed) > busy_before + 10, "the message was offered again");
    assert_eq!(c.msgs_in, 1, "nothing after the refused message was received");
    assert!(d.taken.lock().unwrap().is_empty());
    assert!(conn.unacked_messages() as u64 >= N - 1, "the client still holds its messages");
    d.gate_open.store(true, Ordering::Release);
    wait_for("every message", || d.taken.lock().unwrap().len() as u64 >= N);
    assert_eq!(*d.taken.lock().unwrap(), (1..=N).collect::<Vec<_>>());
    assert_eq!(server.msgr.counters().faults, 0);
}

// Goal: a lossless connection holds at most its policy's send_bytes_max unacknowledged bytes; a sender (not a
// worker) at the bound waits up to send_timeout and is then refused with Timeout; everything accepted arrives
// exactly once, in order. Method: client bound 8 MiB, send_timeout 200 ms; the server's dispatcher is busy
// until a gate opens, so the server stops reading; the test sends 1 MiB messages until one is refused (at most
// 64); the refusal must be a Timeout after about 200 ms, the connection's outgoing bytes must never have
// exceeded 8 MiB; then the gate opens and every accepted message arrives.
#[test]
fn lossless_sender_waits_at_the_outgoing_bound_and_nothing_accepted_is_lost() {
    init_tracing();
    const BOUND: u64 = 8 << 20;
    const MIB: usize = 1 << 20;
    let pool = WorkerPool::new(2).unwrap();
    let d = Busy::new(true, 0, 0, false);
    let server = endpoint(
        &pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            policies: vec![(EntityType::Client, Policy::stateful_server())],
            ..Opts::default()
        },
    );
    server.msgr.add_dispatcher_head(Arc::clone(&d) as Arc<dyn Dispatcher>);
    let send_timeout = Duration::from_millis(200);
    let client = endpoint(
        &pool,
        EntityName::client(1),
        Opts {
            cfg: messenger::MessengerConfig { send_timeout, ..test_config() },
            policies: vec![(EntityType::Osd, Policy::lossless_client().with_send_bytes_max(BOUND))],
            ..Opts::default()
        },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    let payload = Bytes::from(vec![0x33u8; MIB]);
    let mut accepted = 0u64;
    let refused_after = loop {
        assert!(accepted < 64, "64 MiB accepted on a connection bounded at 8 MiB");
        let t0 = Instant::now();
        match conn.send_message(seq_msg(accepted + 1).with_data(payload.clone())) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert_eq!(e, messenger::SendError::Timeout(send_timeout));
                break t0.elapsed();
            }
        }
        assert!(conn.outgoing_bytes() <= BOUND, "holds {} bytes", conn.outgoing_bytes());
    };
    assert!(refused_after >= send_timeout, "refused after {refused_after:?}, without waiting");
    assert!(conn.outgoing_bytes_high_water() <= BOUND, "high water {}", conn.outgoing_bytes_high_water());
    d.gate_open.store(true, Ordering::Release);
    wait_for("every accepted message", || d.taken.lock().unwrap().len() as u64 >= accepted);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(*d.taken.lock().unwrap(), (1..=accepted).collect::<Vec<_>>());
    wait_for("the acks", || conn.outgoing_bytes() == 0);
}

/// Forwards every request it gets (fast, on a worker) to another OSD over a lossless connection, timing how
/// long each forward took.
struct Forwarder {
    to: Connection,
    slowest: Mutex<Duration>,
}

impl Dispatcher for Forwarder {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        m.msg_type == MSG_REQUEST
    }
    fn dispatch(&self, _conn: &Connection, m: Message) -> Result<(), Refused> {
        let t0 = Instant::now();
        let fwd = Message::new(MSG_REQUEST, m.front.clone()).with_tid(m.tid).with_data(m.data.clone());
        self.to.send_message(fwd).expect("a worker's send on a lossless connection never fails");
        let took = t0.elapsed();
        let mut s = self.slowest.lock().unwrap();
        *s = (*s).max(took);
        Ok(())
    }
}

// Goal: a worker thread that sends on a lossless connection at its outgoing bound never waits (no worker may
// wait for a socket to drain) and nothing is dropped, yet the bound still holds, to within one message: the
// lossy client whose message caused the overrun stops being read until the connection is back within its
// bound. Method: client -> proxy (lossy) -> sink (lossless, bound 2 MiB at the proxy); the proxy forwards each
// 1 MiB request inline on its worker; the sink is busy until a gate opens. The client sends 32 requests. Once
// the proxy has stopped reading, its connection to the sink must hold at most 2 MiB + one message, the
// overrun must be counted, no forward may have taken 100 ms, and the proxy must have read well under what the
// client sent; after the gate opens all 32 reach the sink in order.
#[test]
fn worker_overrunning_a_lossless_bound_holds_back_its_lossy_client() {
    init_tracing();
    const N: u64 = 32;
    const MIB: usize = 1 << 20;
    const BOUND: u64 = 2 << 20;
    let pool = WorkerPool::new(2).unwrap();
    let d = Busy::new(true, 0, 0, false);
    let sink = endpoint(
        &pool,
        EntityName::osd(1),
        Opts { bind: true, policies: vec![(EntityType::Osd, Policy::lossless_peer())], ..Opts::default() },
    );
    sink.msgr.add_dispatcher_head(Arc::clone(&d) as Arc<dyn Dispatcher>);
    let proxy = endpoint(
        &pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            policies: vec![
                (EntityType::Client, Policy::stateless_server()),
                (EntityType::Osd, Policy::lossless_peer().with_send_bytes_max(BOUND)),
            ],
            ..Opts::default()
        },
    );
    let to_sink = proxy.msgr.connect(EntityName::osd(1), addr(&sink)).unwrap();
    let fwd = Arc::new(Forwarder { to: to_sink.clone(), slowest: Mutex::new(Duration::ZERO) });
    proxy.msgr.add_dispatcher_head(Arc::clone(&fwd) as Arc<dyn Dispatcher>);
    let client = endpoint(
        &pool,
        EntityName::client(2),
        Opts { policies: vec![(EntityType::Osd, Policy::lossy_client())], ..Opts::default() },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&proxy)).unwrap();
    let payload = Bytes::from(vec![0x44u8; MIB]);
    for i in 1..=N {
        conn.send_message(seq_msg(i).with_data(payload.clone())).unwrap();
    }
    wait_for("an overrun", || proxy.msgr.counters().send_overruns > 0);
    let mut last = proxy.msgr.counters().bytes_in;
    let deadline = Instant::now() + T;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = proxy.msgr.counters().bytes_in;
        if now == last {
            break;
        }
        last = now;
        assert!(Instant::now() < deadline, "the proxy never stopped reading its client");
    }
    let high = to_sink.outgoing_bytes_high_water();
    assert!(high <= BOUND + MIB as u64 + 64, "the proxy held {high} bytes for the sink (bound {BOUND})");
    assert!(last < (N * MIB as u64) / 2, "the proxy read {last} bytes: it did not hold its client back");
    assert!(*fwd.slowest.lock().unwrap() < Duration::from_millis(100), "a forward waited on the worker");
    d.gate_open.store(true, Ordering::Release);
    wait_for("every forwarded message", || d.taken.lock().unwrap().len() as u64 >= N);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(*d.taken.lock().unwrap(), (1..=N).collect::<Vec<_>>());
    assert_eq!(proxy.msgr.counters().faults, 0);
}

// Goal: a thread marked with never_wait_on_this_thread (an OSD's shard thread, which runs what the workers
// queued) is never made to wait at a lossless connection's bound: its messages go over the bound, counted,
// and nothing is lost. Method: a lossless client bounded at 4 MiB, a server busy until a gate opens; a marked
// thread sends 16 messages of 1 MiB: none may take 100 ms, send_overruns must count the ones over the bound,
// and all 16 arrive in order once the gate opens.
#[test]
fn a_thread_that_must_not_wait_goes_over_a_lossless_bound() {
    init_tracing();
    const N: u64 = 16;
    const BOUND: u64 = 4 << 20;
    let pool = WorkerPool::new(2).unwrap();
    let d = Busy::new(true, 0, 0, false);
    let server = endpoint(
        &pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            policies: vec![(EntityType::Client, Policy::stateful_server())],
            ..Opts::default()
        },
    );
    server.msgr.add_dispatcher_head(Arc::clone(&d) as Arc<dyn Dispatcher>);
    let client = endpoint(
        &pool,
        EntityName::client(1),
        Opts {
            policies: vec![(EntityType::Osd, Policy::lossless_client().with_send_bytes_max(BOUND))],
            ..Opts::default()
        },
    );
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    let slowest = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            messenger::never_wait_on_this_thread();
            let payload = Bytes::from(vec![0x55u8; 1 << 20]);
            let mut slowest = Duration::ZERO;
            for i in 1..=N {
                let t0 = Instant::now();
                conn.send_message(seq_msg(i).with_data(payload.clone())).unwrap();
                slowest = slowest.max(t0.elapsed());
            }
            slowest
        })
        .join()
        .unwrap()
    };
    assert!(slowest < Duration::from_millis(100), "a send waited {slowest:?}");
    assert!(client.msgr.counters().send_overruns > 0, "the bound was overrun, and counted");
    d.gate_open.store(true, Ordering::Release);
    wait_for("every message", || d.taken.lock().unwrap().len() as u64 >= N);
    assert_eq!(*d.taken.lock().unwrap(), (1..=N).collect::<Vec<_>>());
}
