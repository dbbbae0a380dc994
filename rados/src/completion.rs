//! A one-shot result slot: where an asynchronous operation's outcome lands, for a waiter or a callback.
//! The Objecter's [`crate::objecter::Completion`] and librbd's `AioCompletion` are handles on one.

use std::time::Instant;

use parking_lot::{Condvar, Mutex};

/// Called with the outcome, on the thread that completes the operation.
pub type Callback<T> = Box<dyn FnOnce(T) + Send>;

/// Holds an outcome until it is taken, or hands it to a callback set before it arrived.
pub struct Slot<T> {
    state: Mutex<SlotState<T>>,
    cv: Condvar,
}

struct SlotState<T> {
    /// Set once the operation has completed, whether its outcome waits here or went to the callback.
    done: bool,
    result: Option<T>,
    callback: Option<Callback<T>>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            state: Mutex::new(SlotState { done: false, result: None, callback: None }),
            cv: Condvar::new(),
        }
    }
}

impl<T> Slot<T> {
    /// Delivers the outcome: to the callback if one is set (outside the lock: it may do anything that does
    /// not block), else to whoever waits or takes it.
    pub fn complete(&self, r: T) {
        let cb = {
            let mut g = self.state.lock();
            assert!(!g.done, "an operation completes once");
            g.done = true;
            match g.callback.take() {
                Some(cb) => cb,
                None => {
                    g.result = Some(r);
                    self.cv.notify_all();
                    return;
                }
            }
        };
        cb(r);
    }

    pub fn is_done(&self) -> bool {
        self.state.lock().done
    }

    /// Hands the outcome to `f`: at once (on this thread) if it is here, else on the thread that completes
    /// the operation. One callback per slot, and not after the outcome was taken.
    pub fn on_complete(&self, f: impl FnOnce(T) + Send + 'static) {
        let r = {
            let mut g = self.state.lock();
            assert!(g.callback.is_none(), "one callback per completion");
            if !g.done {
                g.callback = Some(Box::new(f));
                return;
            }
            g.result.take().expect("an outcome is taken once")
        };
        f(r);
    }

    /// Waits for the outcome and takes it; `None` if `deadline` passed first (the outcome stays to come).
    pub fn take_until(&self, deadline: Option<Instant>) -> Option<T> {
        let mut g = self.state.lock();
        loop {
            if let Some(r) = g.result.take() {
                return Some(r);
            }
            assert!(!(g.done && g.callback.is_none()), "an outcome is taken once");
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut g, d).timed_out() {
                        return g.result.take();
                    }
                }
                None => self.cv.wait(&mut g),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_waiter_gets_the_outcome_and_a_deadline_ends_the_wait() {
        let s = Arc::new(Slot::default());
        assert_eq!(s.take_until(Some(Instant::now() + Duration::from_millis(5))), None);
        let s2 = Arc::clone(&s);
        let t = std::thread::spawn(move || s2.take_until(Some(Instant::now() + Duration::from_secs(10))));
        s.complete(7);
        assert_eq!(t.join().unwrap(), Some(7));
        assert!(s.is_done());
    }

    #[test]
    fn a_callback_runs_once_whether_set_before_or_after_the_outcome() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let before = Slot::default();
        let g = Arc::clone(&got);
        before.on_complete(move |v| g.lock().push(v));
        before.complete(1);
        let after = Slot::default();
        after.complete(2);
        let g = Arc::clone(&got);
        after.on_complete(move |v| g.lock().push(v));
        assert_eq!(*got.lock(), [1, 2]);
    }
}
