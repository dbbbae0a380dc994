//! Run-inline-or-queue: the mechanism behind the op shards ([`crate::shard`]).
//!
//! A [`Runner`] owns some state that one thread at a time may change (a shard's PGs). Events for it run on the
//! thread that submits them (a messenger worker) whenever no other thread is inside the runner; otherwise they
//! wait in a bounded queue for whoever holds the runner, which runs them before letting go. The runner's own
//! thread ([`InlineQueue::run`]) ticks it and takes over a backlog that an inline runner left after
//! `batch` events, so that a messenger worker gets back to its sockets. On the common path an event costs
//! no thread hand-off at all.
//!
//! Two properties, tested below: no event is stranded, and the events of one submitting thread run in the
//! order it submitted them (one FIFO, popped only by the runner's holder). The first holds by one rule that
//! every path follows: an event is queued before `try_lock`, and *whoever lets go of the runner looks at the
//! queue again afterwards* (the inline submitter, the runner's own thread, [`InlineQueue::with`]) and, if it
//! is not empty, takes the runner again or hands it to the runner's thread. So a submitter that found the
//! runner busy may leave: the holder at that moment will find its event. A full queue is only ever
//! transient for the same reason; a submitter that finds it full first tries to run it itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

/// State driven by an [`InlineQueue`].
pub trait Runner: Send {
    type Event: Send;
    /// Starts a run of events, at `now`.
    fn begin(&mut self, now: Instant);
    fn handle(&mut self, now: Instant, ev: Self::Event);
    /// Ends a run of events (the runner is still held).
    fn end(&mut self) {}
    /// Someone rang the doorbell ([`InlineQueue::ring`]) since the last call: a notice that carries no event
    /// and needs no room in the queue (an object store's commits, say).
    fn doorbell(&mut self, _now: Instant) {}
    /// The runner's own thread had a turn at `now` (after running any backlog); `tick` says whether its
    /// periodic tick is due.
    fn turn(&mut self, now: Instant, tick: bool);
}

/// Why an event was not taken.
#[derive(Debug)]
pub enum SubmitError<E> {
    /// The queue is full; the event comes back.
    Full(Box<E>),
    /// The runner has stopped.
    Stopped,
}

/// A [`Runner`] behind its queue. Cheap to share across threads (behind an `Arc`).
pub struct InlineQueue<R: Runner> {
    queue: Mutex<VecDeque<R::Event>>,
    cap: usize,
    batch: usize,
    runner: Mutex<R>,
    /// Wakes the runner's thread: to take over a backlog, or to stop.
    wake: Sender<()>,
    wake_rx: Receiver<()>,
    /// The doorbell: set by [`InlineQueue::ring`], cleared by whoever answers it.
    rung: AtomicBool,
    stopped: AtomicBool,
}

impl<R: Runner> InlineQueue<R> {
    /// A queue of at most `cap` events; a submitting thread runs at most `batch` of them in one go.
    pub fn new(runner: R, cap: usize, batch: usize) -> InlineQueue<R> {
        assert!(cap > 0 && batch > 0);
        let (wake, wake_rx) = crossbeam_channel::bounded(1);
        InlineQueue {
            queue: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
            cap,
            batch,
            runner: Mutex::new(runner),
            wake,
            wake_rx,
            rung: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }
    }

    /// Takes an event without blocking and, if no other thread is inside the runner, runs it (and whatever
    /// queued before it) on this thread.
    pub fn try_submit(&self, ev: R::Event) -> Result<(), SubmitError<R::Event>> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        for attempt in 0..2 {
            {
                let mut q = self.queue.lock();
                if q.len() < self.cap {
                    q.push_back(ev);
                    break;
                }
                if attempt == 1 {
                    return Err(SubmitError::Full(Box::new(ev)));
                }
            }
            // Full: make room by running the queue if no other thread is inside the runner; if one is, it
            // looks at the queue again when it lets go, so the queue drains either way.
            self.run_inline();
        }
        self.run_inline();
        Ok(())
    }

    /// Like [`InlineQueue::try_submit`], but waits up to `timeout` for room; for the daemon's own threads.
    pub fn submit_timeout(&self, mut ev: R::Event, timeout: Duration) -> Result<(), SubmitError<R::Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_submit(ev) {
                Err(SubmitError::Full(back)) if Instant::now() < deadline => {
                    ev = *back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                r => return r,
            }
        }
    }

    /// Rings the doorbell: the runner's [`Runner::doorbell`] runs soon, on this thread if no other is inside
    /// the runner, else on the thread that is (it looks again when it lets go). Never fails and never waits:
    /// however often it rings before it is answered, it is one flag.
    pub fn ring(&self) {
        self.rung.store(true, Ordering::SeqCst);
        // Pairs with the fence in `has_work`: either the holder letting go sees the flag, or we see the
        // runner free.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.run_inline();
    }

    /// Whether there is anything to run: queued events or the doorbell.
    fn has_work(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.rung.load(Ordering::SeqCst) || !self.queue.lock().is_empty()
    }

    /// Runs the queue on this thread if no other thread is inside the runner: at most `batch` events, then the
    /// runner's thread takes over the rest.
    fn run_inline(&self) {
        loop {
            let Some(mut runner) = self.runner.try_lock() else { return };
            let empty = self.drain(&mut runner, self.batch);
            drop(runner);
            if !empty {
                self.hand_over();
                return;
            }
            // Let go, then look again: an event queued while we held the runner was left for us.
            if !self.has_work() {
                return;
            }
        }
    }

    /// Wakes the runner's thread to run the queue. Its wake channel holds one token: if one is already there,
    /// the thread has yet to look at the queue, and will.
    fn hand_over(&self) {
        let _ = self.wake.try_send(());
    }

    /// Runs queued events, at most `budget`; returns whether the queue was left empty.
    fn drain(&self, runner: &mut R, budget: usize) -> bool {
        let now = Instant::now();
        runner.begin(now);
        if self.rung.swap(false, Ordering::SeqCst) {
            runner.doorbell(now);
        }
        let mut ran = 0;
        while ran < budget {
            let Some(ev) = self.queue.lock().pop_front() else { break };
            runner.handle(now, ev);
            ran += 1;
        }
        let empty = self.queue.lock().is_empty();
        runner.end();
        empty
    }

    /// Stops the runner's thread; events submitted afterwards are refused.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
    }

    /// The runner's thread: runs any backlog when woken and gives the runner a turn, with a tick every
    /// `tick`; until stopped.
    pub fn run(&self, tick: Duration) {
        let mut next_tick = Instant::now() + tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Disconnected) = self.wake_rx.recv_timeout(wait) {
                break;
            }
            loop {
                if self.stopped.load(Ordering::Acquire) {
                    return;
                }
                let mut runner = self.runner.lock();
                let now = Instant::now();
                self.drain(&mut runner, usize::MAX);
                let due = now >= next_tick;
                if due {
                    next_tick = now + tick;
                }
                runner.turn(now, due);
                drop(runner);
                // Let go, then look again: a submitter that found the runner busy (during `turn`, say) left its
                // event for us, and nobody else may come to run it.
                if !self.has_work() {
                    break;
                }
            }
        }
    }

    /// Runs `f` on the runner, waiting for it to be free (not for the hot path).
    pub fn with<T>(&self, f: impl FnOnce(&mut R) -> T) -> T {
        let out = f(&mut self.runner.lock());
        // Let go, then look again (see the module's rule): events queued meanwhile go to the runner's thread.
        if self.has_work() {
            self.hand_over();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records what it ran: (producer, sequence number, thread that ran it).
    struct Recorder {
        seen: Vec<(usize, u64)>,
        ran_on_runner_thread: u64,
        runner_thread: Option<std::thread::ThreadId>,
        slow_every: u64,
        slow_end: bool,
        /// When set, `turn` says it has begun and waits to be let go (see [`Gate`]).
        turn_gate: Option<Gate>,
        doorbells: u64,
    }

    /// Holds the runner's thread inside `turn` until the test lets it go.
    struct Gate {
        entered: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }

    impl Runner for Recorder {
        type Event = (usize, u64);
        fn begin(&mut self, _now: Instant) {}
        fn handle(&mut self, _now: Instant, ev: (usize, u64)) {
            if Some(std::thread::current().id()) == self.runner_thread {
                self.ran_on_runner_thread += 1;
            }
            if self.slow_every > 0 && ev.1.is_multiple_of(self.slow_every) {
                // Hold the runner a while so that other submitters find it busy and queue.
                std::thread::sleep(Duration::from_micros(200));
            }
            self.seen.push(ev);
        }
        fn end(&mut self) {
            if self.slow_end {
                // Widen the window between the last look at the queue and the unlock, where an event
                // submitted by another thread is seen only by the look after the unlock.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        fn doorbell(&mut self, _now: Instant) {
            self.doorbells += 1;
        }
        fn turn(&mut self, _now: Instant, _tick: bool) {
            if let Some(g) = self.turn_gate.take() {
                g.entered.send(()).unwrap();
                // Bounded: a test that never lets go fails on its own deadline, not here.
                let _ = g.release.recv_timeout(Duration::from_secs(10));
            }
        }
    }

    /// A queue around a [`Recorder`] and its runner thread (tick an hour away), started and ready.
    fn start(
        cap: usize,
        batch: usize,
        slow_every: u64,
        slow_end: bool,
    ) -> (Arc<InlineQueue<Recorder>>, std::thread::JoinHandle<()>) {
        let r = Recorder {
            seen: Vec::new(),
            ran_on_runner_thread: 0,
            runner_thread: None,
            slow_every,
            slow_end,
            turn_gate: None,
            doorbells: 0,
        };
        let q = Arc::new(InlineQueue::new(r, cap, batch));
        let t = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                q.with(|r| r.runner_thread = Some(std::thread::current().id()));
                q.run(Duration::from_secs(3600));
            })
        };
        while q.with(|r| r.runner_thread.is_none()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        (q, t)
    }

    /// Each producer submits `per` events, retrying while the queue is full; fails the test if they are not all
    /// taken within `deadline` (a queue that stays full is a stranded queue).
    fn run_producers(q: &Arc<InlineQueue<Recorder>>, producers: usize, per: u64, deadline: Duration) {
        let give_up = Instant::now() + deadline;
        std::thread::scope(|s| {
            for p in 0..producers {
                let q = Arc::clone(q);
                s.spawn(move || {
                    for i in 0..per {
                        let mut ev = (p, i);
                        loop {
                            match q.try_submit(ev) {
                                Ok(()) => break,
                                Err(SubmitError::Full(back)) => {
                                    assert!(
                                        Instant::now() < give_up,
                                        "producer {p}: the queue stayed full for {deadline:?} at event {i}"
                                    );
                                    ev = *back;
                                    std::thread::yield_now();
                                }
                                Err(SubmitError::Stopped) => panic!("stopped"),
                            }
                        }
                    }
                });
            }
        });
    }

    /// Waits up to `deadline` for `n` events to have run.
    fn wait_seen(q: &InlineQueue<Recorder>, n: usize, deadline: Duration) -> Result<(), String> {
        let give_up = Instant::now() + deadline;
        loop {
            let seen = q.with(|r| r.seen.len());
            if seen >= n {
                return Ok(());
            }
            if Instant::now() > give_up {
                return Err(format!("events stranded: {seen} of {n} ran within {deadline:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn nothing_is_stranded_and_each_submitter_keeps_its_order() {
        // Goal: with many threads submitting at once, every event runs without waiting for a tick, and the
        // events of one thread run in its order. Method: 4 producers x 20k events into a small queue (so it
        // fills), a runner that is sometimes slow, a runner thread whose tick is an hour away; after the
        // producers finish, everything must have run within a second.
        let (q, t) = start(64, 8, 997, false);
        let (producers, per) = (4, 20_000u64);
        run_producers(&q, producers, per, Duration::from_secs(30));
        wait_seen(&q, producers * per as usize, Duration::from_secs(1)).unwrap();
        q.stop();
        t.join().unwrap();
        q.with(|r| {
            let mut next = vec![0u64; producers];
            for &(p, i) in &r.seen {
                assert_eq!(i, next[p], "producer {p}'s events out of order");
                next[p] += 1;
            }
            assert!(next.iter().all(|&n| n == per));
        });
    }

    #[test]
    fn the_last_event_of_a_burst_is_not_stranded() {
        // Goal: the event that arrives while another thread is finishing its run is still run, without a tick.
        // Method: rounds of 4 threads submitting one event each at the same moment (a barrier), with no
        // later submission to rescue a stranded one; every round must complete within 200 ms.
        let (q, t) = start(16, 8, 0, true);
        let threads = 4;
        let rounds = 2000u64;
        let barrier = std::sync::Barrier::new(threads + 1);
        let mut stranded = None;
        std::thread::scope(|s| {
            for p in 0..threads {
                let (q, barrier) = (Arc::clone(&q), &barrier);
                s.spawn(move || {
                    for r in 0..rounds {
                        barrier.wait();
                        q.try_submit((p, r)).unwrap();
                        barrier.wait();
                    }
                });
            }
            for r in 0..rounds {
                barrier.wait();
                barrier.wait();
                let want = (r as usize + 1) * threads;
                let deadline = Instant::now() + Duration::from_millis(200);
                while stranded.is_none() && q.with(|x| x.seen.len()) < want {
                    if Instant::now() > deadline {
                        // Not a panic here: the submitters would wait at the barrier forever.
                        stranded = Some(r);
                    }
                    std::thread::yield_now();
                }
            }
        });
        q.stop();
        t.join().unwrap();
        assert_eq!(stranded, None, "an event was stranded in that round");
    }

    #[test]
    fn an_event_queued_while_the_runner_thread_takes_its_turn_is_run_when_it_lets_go() {
        // Goal: the runner's own thread looks at the queue again after it lets go of the runner (the hang of
        // the old code: it went back to sleep towards a tick an hour away). Method: with batch 1, a backlog
        // goes to the runner's thread; hold that thread inside `turn`, submit one event (the submitter finds
        // the runner busy and leaves), let the thread go: the event must run within a second.
        let (q, t) = start(16, 1, 0, false);
        let (entered_tx, entered) = crossbeam_channel::bounded(1);
        let (release, release_rx) = crossbeam_channel::bounded(1);
        q.with(|r| r.turn_gate = Some(Gate { entered: entered_tx, release: release_rx }));
        q.with(|_| {
            q.try_submit((0, 0)).unwrap();
            q.try_submit((0, 1)).unwrap();
        });
        q.try_submit((0, 2)).unwrap();
        entered.recv_timeout(Duration::from_secs(5)).expect("the runner's thread never took its turn");
        q.try_submit((1, 0)).unwrap();
        release.send(()).unwrap();
        let result = wait_seen(&q, 4, Duration::from_secs(1));
        q.stop();
        t.join().unwrap();
        result.unwrap();
    }

    #[test]
    fn events_queued_while_with_holds_the_runner_run_after_it_lets_go() {
        // Goal: `with` follows the same rule as every holder. Method: queue events (up to a full queue) while
        // `with` holds the runner; with no later submission and the tick an hour away, they must all run
        // within a second of `with` returning, and the queue must take events again.
        let (q, t) = start(4, 8, 0, false);
        q.with(|_| {
            for i in 0..4 {
                q.try_submit((0, i)).unwrap();
            }
            assert!(matches!(q.try_submit((0, 4)), Err(SubmitError::Full(_))), "a cap of 4 holds 4");
        });
        let result = wait_seen(&q, 4, Duration::from_secs(1));
        q.try_submit((0, 4)).unwrap();
        q.stop();
        t.join().unwrap();
        result.unwrap();
    }

    #[test]
    fn a_doorbell_rung_while_the_runner_is_busy_is_answered_when_it_lets_go() {
        // Goal: a ring is never lost, whoever holds the runner, and costs no queue room. Method: ring with the
        // runner idle (answered on the ringing thread before `ring` returns); hold the runner's thread inside
        // `turn` and ring twice (one flag), with a full queue behind it: answered once, within a second, after
        // the thread lets go.
        let (q, t) = start(2, 1, 0, false);
        q.ring();
        assert_eq!(q.with(|r| r.doorbells), 1, "an idle runner answers on the ringing thread");
        let (entered_tx, entered) = crossbeam_channel::bounded(1);
        let (release, release_rx) = crossbeam_channel::bounded(1);
        q.with(|r| r.turn_gate = Some(Gate { entered: entered_tx, release: release_rx }));
        q.with(|_| {
            q.try_submit((0, 0)).unwrap();
            q.try_submit((0, 1)).unwrap();
        });
        entered.recv_timeout(Duration::from_secs(5)).expect("the runner's thread never took its turn");
        q.ring();
        q.ring();
        release.send(()).unwrap();
        let give_up = Instant::now() + Duration::from_secs(1);
        while q.with(|r| r.doorbells) < 2 {
            assert!(Instant::now() < give_up, "the doorbell rung during `turn` was not answered");
            std::thread::sleep(Duration::from_millis(1));
        }
        q.stop();
        t.join().unwrap();
        assert_eq!(q.with(|r| r.doorbells), 2, "two rings before an answer are one");
    }

    #[test]
    fn an_idle_runner_runs_the_event_on_the_submitting_thread() {
        // Goal: the common path costs no hand-off. Method: submit one event at a time with no contention and
        // check none of them ran on the runner's thread.
        let (q, t) = start(16, 8, 0, false);
        for i in 0..1000 {
            q.try_submit((0, i)).unwrap();
            assert_eq!(q.with(|r| r.seen.len()), i as usize + 1, "ran before try_submit returned");
        }
        assert_eq!(q.with(|r| r.ran_on_runner_thread), 0);
        q.stop();
        t.join().unwrap();
        assert!(matches!(q.try_submit((0, 0)), Err(SubmitError::Stopped)));
    }

    #[test]
    fn a_backlog_beyond_the_batch_is_taken_over_by_the_runner_thread() {
        // Goal: a submitting thread runs at most `batch` events, the runner thread the rest. Method: hold the
        // runner, queue 50 events, release it and submit one more: the submitter runs at most 2 (batch), the
        // runner thread the rest.
        let (q, t) = start(100, 2, 0, false);
        q.with(|_| {
            for i in 0..50 {
                q.try_submit((0, i)).unwrap();
            }
        });
        q.try_submit((0, 50)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while q.with(|r| r.seen.len()) < 51 {
            assert!(Instant::now() < deadline, "backlog not taken over");
            std::thread::sleep(Duration::from_millis(1));
        }
        // `with` itself hands its backlog to the runner's thread, which may take the 51st too.
        assert!(q.with(|r| r.ran_on_runner_thread) >= 49, "the submitter ran more than its batch");
        q.stop();
        t.join().unwrap();
    }
}
