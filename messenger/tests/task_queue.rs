//! A worker's task queue is bounded by construction (`TASK_QUEUE_MAX`): threads that are not workers wait for
//! room, workers never wait (they keep what does not fit and post it later), a connection has at most one Kick
//! queued, and no task is lost.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use crossbeam_channel::{Receiver, Sender};
use messenger::{
    EntityName, EntityType, Guest, GuestEvent, GuestHandle, Message, Policy, WorkerPool, TASK_QUEUE_MAX,
};
use mio::{Registry, Token};

/// Every wait in these tests fails the test after this long.
const T: Duration = Duration::from_secs(30);

/// What the probes share: per-probe counters, which probe blocks its worker when kicked (until `gate` gets a
/// message) and which one kicks `targets` when kicked.
struct Ctl {
    registered: AtomicU64,
    kicks: Vec<AtomicU64>,
    block_idx: AtomicUsize,
    gate: Mutex<Option<Receiver<()>>>,
    poster_idx: AtomicUsize,
    targets: Mutex<Vec<GuestHandle>>,
    poster_took: Mutex<Option<Duration>>,
}

impl Ctl {
    fn new(n: usize) -> (Arc<Ctl>, Sender<()>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let ctl = Arc::new(Ctl {
            registered: AtomicU64::new(0),
            kicks: (0..n).map(|_| AtomicU64::new(0)).collect(),
            block_idx: AtomicUsize::new(usize::MAX),
            gate: Mutex::new(Some(rx)),
            poster_idx: AtomicUsize::new(usize::MAX),
            targets: Mutex::new(Vec::new()),
            poster_took: Mutex::new(None),
        });
        (ctl, tx)
    }
}

/// A guest without a source, driven only by kicks.
struct Probe {
    idx: usize,
    ctl: Arc<Ctl>,
}

impl Guest for Probe {
    fn register(&mut self, _registry: &Registry, _token: Token) -> io::Result<()> {
        self.ctl.registered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn ready(&mut self, ev: GuestEvent) -> bool {
        if !ev.kicked {
            return true;
        }
        self.ctl.kicks[self.idx].fetch_add(1, Ordering::Relaxed);
        if self.idx == self.ctl.block_idx.load(Ordering::Acquire) {
            let gate = self.ctl.gate.lock().unwrap().take().expect("the blocker is kicked once");
            // A worker blocked past the deadline fails the test (the probe's kicks never arrive), never hangs it.
            let _ = gate.recv_timeout(T);
        }
        if self.idx == self.ctl.poster_idx.load(Ordering::Acquire) {
            let t0 = Instant::now();
            for h in self.ctl.targets.lock().unwrap().iter() {
                h.kick();
            }
            *self.ctl.poster_took.lock().unwrap() = Some(t0.elapsed());
        }
        true
    }
    fn deregister(&mut self, _registry: &Registry) {}
}

fn add_probes(pool: &WorkerPool, ctl: &Arc<Ctl>, range: std::ops::Range<usize>) -> Vec<GuestHandle> {
    range.map(|idx| pool.add_guest(|_| Box::new(Probe { idx, ctl: Arc::clone(ctl) }))).collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Blocks `pool`'s worker that serves probe `blocker` until the returned sender is used.
fn block_worker(ctl: &Arc<Ctl>, handles: &[GuestHandle], blocker: usize) {
    ctl.block_idx.store(blocker, Ordering::Release);
    handles[blocker].kick();
    wait_for("the worker to block", || ctl.kicks[blocker].load(Ordering::Relaxed) == 1);
}

// Goal: a worker's task queue never holds more than TASK_QUEUE_MAX tasks: a thread that is not a worker waits
// for room instead of growing it, and no task is lost. Method: one worker, blocked inside a probe guest's kick;
// another thread adds TASK_QUEUE_MAX + 100 guests (one AddGuest task each). For 300 ms the queue must reach the
// bound and never pass it while the adding thread has not finished; once the worker is released every guest is
// registered.
#[test]
fn a_full_task_queue_makes_other_threads_wait_and_loses_nothing() {
    const EXTRA: usize = 100;
    let pool = WorkerPool::new(1).unwrap();
    let n = 1 + TASK_QUEUE_MAX + EXTRA;
    let (ctl, gate) = Ctl::new(n);
    let first = add_probes(&pool, &ctl, 0..1);
    wait_for("the first probe", || ctl.registered.load(Ordering::Relaxed) == 1);
    block_worker(&ctl, &first, 0);
    let done = Arc::new(AtomicBool::new(false));
    let adder = {
        let (pool, ctl, done) = (Arc::clone(&pool), Arc::clone(&ctl), Arc::clone(&done));
        std::thread::spawn(move || {
            let h = add_probes(&pool, &ctl, 1..n);
            done.store(true, Ordering::Release);
            h
        })
    };
    let until = Instant::now() + Duration::from_millis(300);
    let mut most = 0;
    while Instant::now() < until {
        let q = pool.queued_tasks()[0];
        assert!(q <= TASK_QUEUE_MAX, "{q} tasks queued, over the bound {TASK_QUEUE_MAX}");
        most = most.max(q);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(most, TASK_QUEUE_MAX, "the flood filled the queue");
    assert!(!done.load(Ordering::Acquire), "the adding thread finished although the queue was full");
    gate.send(()).unwrap();
    let handles = adder.join().unwrap();
    assert_eq!(handles.len(), n - 1);
    wait_for("every guest registered", || ctl.registered.load(Ordering::Relaxed) == n as u64);
    pool.shutdown();
}

// Goal: a worker never waits for room in a task queue (it might be waiting for a worker that waits for it) and
// loses none of the tasks it could not post. Method: two workers; worker 1 is blocked inside a probe's kick;
// a probe on worker 0, when kicked, kicks every probe on worker 1 (over 1.4 x TASK_QUEUE_MAX distinct guests,
// one KickGuest each). The kicking must return at once, worker 1's queue must stay within the bound, and
// worker 0 must go on serving its own guests; once worker 1 is released every target is kicked exactly once.
#[test]
fn a_worker_never_waits_on_a_full_task_queue_and_loses_nothing() {
    let pool = WorkerPool::new(2).unwrap();
    let n = 3 * TASK_QUEUE_MAX + 20;
    let (ctl, gate) = Ctl::new(n);
    let handles = add_probes(&pool, &ctl, 0..n);
    wait_for("every probe registered", || ctl.registered.load(Ordering::Relaxed) == n as u64);
    let hs = &handles;
    let on = |w: usize| (0..n).filter(move |&i| hs[i].worker() == w);
    let mut on0 = on(0);
    let (poster, other0) = (on0.next().unwrap(), on0.next().unwrap());
    let mut on1 = on(1);
    let blocker = on1.next().unwrap();
    let targets: Vec<usize> = on1.collect();
    assert!(targets.len() > TASK_QUEUE_MAX * 14 / 10, "{} targets on worker 1", targets.len());
    *ctl.targets.lock().unwrap() = targets.iter().map(|&i| handles[i].clone()).collect();
    block_worker(&ctl, &handles, blocker);

    ctl.poster_idx.store(poster, Ordering::Release);
    handles[poster].kick();
    wait_for("the poster's kicks", || ctl.poster_took.lock().unwrap().is_some());
    let took = ctl.poster_took.lock().unwrap().unwrap();
    assert!(took < Duration::from_millis(100), "a worker waited {took:?} to post");
    handles[other0].kick();
    wait_for("worker 0 to serve another guest", || ctl.kicks[other0].load(Ordering::Relaxed) == 1);
    let q = pool.queued_tasks()[1];
    assert!(q <= TASK_QUEUE_MAX, "{q} tasks queued on worker 1");
    assert!(targets.iter().all(|&i| ctl.kicks[i].load(Ordering::Relaxed) == 0), "worker 1 is blocked");

    gate.send(()).unwrap();
    wait_for("every target kicked", || targets.iter().all(|&i| ctl.kicks[i].load(Ordering::Relaxed) >= 1));
    std::thread::sleep(Duration::from_millis(20));
    for &i in &targets {
        assert_eq!(ctl.kicks[i].load(Ordering::Relaxed), 1, "probe {i} kicked once");
    }
    pool.shutdown();
}

// Goal: however many messages are sent on a connection while its worker is busy, its worker's queue holds at
// most one Kick for it, and every message still goes out, in order. Method: the client's only worker is
// blocked inside a probe's kick while another thread sends 5000 messages on an established connection; the
// sends must all return while the worker is blocked, with at most one task queued; once released the server
// gets all 5000 in order.
#[test]
fn sends_on_a_connection_queue_at_most_one_kick() {
    init_tracing();
    const N: u64 = 5000;
    let client_pool = WorkerPool::new(1).unwrap();
    let server_pool = WorkerPool::new(1).unwrap();
    let server = endpoint(
        &server_pool,
        EntityName::osd(0),
        Opts {
            bind: true,
            policies: vec![(EntityType::Client, Policy::stateful_server())],
            ..Opts::default()
        },
    );
    let client = endpoint(
        &client_pool,
        EntityName::client(1),
        Opts { policies: vec![(EntityType::Osd, Policy::lossless_client())], ..Opts::default() },
    );
    let msg = |i: u64| Message::encode(MSG_REQUEST, &i).with_tid(i);
    let conn = client.msgr.connect(EntityName::osd(0), addr(&server)).unwrap();
    conn.send_message(msg(0)).unwrap();
    let (_, m) = server.msgs.recv_timeout(T).unwrap();
    assert_eq!(m.decode::<u64>().unwrap(), 0);

    let (ctl, gate) = Ctl::new(1);
    let probe = add_probes(&client_pool, &ctl, 0..1);
    wait_for("the probe", || ctl.registered.load(Ordering::Relaxed) == 1);
    block_worker(&ctl, &probe, 0);
    let sender = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            for i in 1..=N {
                conn.send_message(msg(i)).unwrap();
            }
        })
    };
    let deadline = Instant::now() + T;
    while !sender.is_finished() {
        let q = client_pool.queued_tasks()[0];
        assert!(q <= 1, "{q} tasks queued for one connection");
        assert!(Instant::now() < deadline, "the sends did not return while the worker was blocked");
        std::thread::yield_now();
    }
    sender.join().unwrap();
    assert!(client_pool.queued_tasks()[0] <= 1);
    gate.send(()).unwrap();
    for want in 1..=N {
        let (_, m) = server.msgs.recv_timeout(T).expect("every message arrives");
        assert_eq!(m.decode::<u64>().unwrap(), want);
    }
}
