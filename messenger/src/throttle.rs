//! Counting throttles (messages and bytes) for backpressure, as Ceph's `Throttle`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Limits a number of messages and a number of bytes in use at once; 0 means unlimited. A single request larger
/// than the limit is admitted when nothing else is held, so oversized messages slow down but never deadlock.
#[derive(Debug)]
pub struct Throttle {
    name: &'static str,
    max_count: u64,
    max_bytes: u64,
    used: Mutex<(u64, u64)>,
    freed: Condvar,
    stalls: AtomicU64,
    high_water_bytes: AtomicU64,
}

impl Throttle {
    pub fn new(name: &'static str, max_count: u64, max_bytes: u64) -> Throttle {
        Throttle {
            name,
            max_count,
            max_bytes,
            used: Mutex::new((0, 0)),
            freed: Condvar::new(),
            stalls: AtomicU64::new(0),
            high_water_bytes: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn fits(&self, used: (u64, u64), count: u64, bytes: u64) -> bool {
        let count_ok = self.max_count == 0 || used.0 == 0 || used.0 + count <= self.max_count;
        let bytes_ok = self.max_bytes == 0 || used.1 == 0 || used.1 + bytes <= self.max_bytes;
        count_ok && bytes_ok
    }

    fn take_locked(&self, used: &mut (u64, u64), count: u64, bytes: u64) {
        used.0 += count;
        used.1 += bytes;
        self.high_water_bytes.fetch_max(used.1, Ordering::Relaxed);
    }

    /// Takes budget if it fits now; counts a stall when it does not.
    pub fn try_take(&self, count: u64, bytes: u64) -> bool {
        let mut used = self.used.lock();
        if self.fits(*used, count, bytes) {
            self.take_locked(&mut used, count, bytes);
            true
        } else {
            self.stalls.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Waits up to `timeout` for budget. Returns false on timeout.
    pub fn take_wait(&self, count: u64, bytes: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut used = self.used.lock();
        let mut stalled = false;
        while !self.fits(*used, count, bytes) {
            if !stalled {
                stalled = true;
                self.stalls.fetch_add(1, Ordering::Relaxed);
            }
            if self.freed.wait_until(&mut used, deadline).timed_out() && !self.fits(*used, count, bytes) {
                return false;
            }
        }
        self.take_locked(&mut used, count, bytes);
        true
    }

    /// Takes budget whether or not it fits: for a caller that must neither wait nor fail (a worker thread
    /// queueing on a lossless connection). Returns whether it fitted.
    pub fn take_over(&self, count: u64, bytes: u64) -> bool {
        let mut used = self.used.lock();
        let fitted = self.fits(*used, count, bytes);
        if !fitted {
            self.stalls.fetch_add(1, Ordering::Relaxed);
        }
        self.take_locked(&mut used, count, bytes);
        fitted
    }

    /// The byte limit (0 = unlimited).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn put(&self, count: u64, bytes: u64) {
        let mut used = self.used.lock();
        assert!(used.0 >= count && used.1 >= bytes, "throttle {}: returning more than was taken", self.name);
        used.0 -= count;
        used.1 -= bytes;
        drop(used);
        self.freed.notify_all();
    }

    /// (messages, bytes) currently held.
    pub fn in_use(&self) -> (u64, u64) {
        *self.used.lock()
    }

    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// The most bytes ever held at once.
    pub fn high_water_bytes(&self) -> u64 {
        self.high_water_bytes.load(Ordering::Relaxed)
    }
}

/// Budget taken from one or two throttles for one received message; given back when dropped (when the upper
/// layer is done with the message).
#[derive(Debug)]
pub struct ThrottleGrant {
    parts: Vec<Arc<Throttle>>,
    count: u64,
    bytes: u64,
}

impl ThrottleGrant {
    /// Takes `count`/`bytes` from every throttle in `throttles`, or nothing if one of them is full.
    pub fn try_take(throttles: &[&Arc<Throttle>], count: u64, bytes: u64) -> Option<ThrottleGrant> {
        let mut parts: Vec<Arc<Throttle>> = Vec::with_capacity(throttles.len());
        for t in throttles {
            if !t.try_take(count, bytes) {
                for p in &parts {
                    p.put(count, bytes);
                }
                return None;
            }
            parts.push(Arc::clone(t));
        }
        Some(ThrottleGrant { parts, count, bytes })
    }
}

impl Drop for ThrottleGrant {
    fn drop(&mut self) {
        for p in &self.parts {
            p.put(self.count, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_bytes_but_admits_one_oversized() {
        let t = Throttle::new("t", 2, 100);
        assert!(t.try_take(1, 60));
        assert!(!t.try_take(1, 60), "bytes over");
        assert!(t.try_take(1, 40));
        assert!(!t.try_take(1, 0), "count over");
        t.put(2, 100);
        assert!(t.try_take(1, 1000), "oversized admitted when empty");
        assert_eq!(t.stalls(), 2);
    }

    #[test]
    fn grants_return_budget_on_drop_and_take_all_or_nothing() {
        let a = Arc::new(Throttle::new("a", 0, 10));
        let b = Arc::new(Throttle::new("b", 0, 5));
        let g = ThrottleGrant::try_take(&[&a, &b], 1, 5).unwrap();
        assert!(ThrottleGrant::try_take(&[&a, &b], 1, 5).is_none());
        assert_eq!(a.in_use(), (1, 5), "the failed attempt gave back what it took from a");
        drop(g);
        assert_eq!(a.in_use(), (0, 0));
        assert_eq!(b.in_use(), (0, 0));
    }

    #[test]
    fn take_wait_times_out_and_wakes_on_put() {
        let t = Arc::new(Throttle::new("t", 1, 0));
        assert!(t.try_take(1, 0));
        assert!(!t.take_wait(1, 0, Duration::from_millis(20)));
        let t2 = Arc::clone(&t);
        let h = std::thread::spawn(move || t2.take_wait(1, 0, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        t.put(1, 0);
        assert!(h.join().unwrap());
    }
}
