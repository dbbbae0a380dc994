//! The read-ahead layer (librbd's readahead, GlusterFS's read-ahead translator).
//!
//! Policy, with Ceph's defaults: after `trigger_requests` reads in a row that each start where the previous
//! one ended, prefetch the window after the read; the window starts at twice the read's size and doubles on
//! every further prefetch up to `max_bytes`. A new prefetch starts when less than half a window is left
//! ahead of the reader. Once `disable_after_bytes` have been read through the image, read-ahead switches
//! off for good (as Ceph: by then the guest's own page cache does its read-ahead). A non-sequential read
//! resets the pattern.
//!
//! Prefetched bytes are clean copies and must never be served stale: a write or discard removes the range
//! when it starts and again when it completes (a prefetch may have read the old bytes meanwhile), and a
//! prefetch that answers after any write started or completed since it was issued is dropped.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{overlay, Done, ExtentMap, Layer, Req, Seg};
use crate::image::Result;

/// Read-ahead settings; defaults are Ceph's `rbd_readahead_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadaheadOptions {
    pub enabled: bool,
    /// `rbd_readahead_trigger_requests`.
    pub trigger_requests: u32,
    /// `rbd_readahead_max_bytes`.
    pub max_bytes: u64,
    /// `rbd_readahead_disable_after_bytes` (0: never disable).
    pub disable_after_bytes: u64,
}

impl Default for ReadaheadOptions {
    fn default() -> Self {
        ReadaheadOptions {
            enabled: true,
            trigger_requests: 10,
            max_bytes: 512 << 10,
            disable_after_bytes: 50 << 20,
        }
    }
}

#[derive(Debug, Default)]
struct St {
    /// Where a sequential read would start.
    next_expected: u64,
    /// Sequential reads in a row.
    run: u32,
    window: u64,
    buf: ExtentMap<()>,
    /// End of what has been prefetched (or is being prefetched).
    prefetched_end: u64,
    inflight: bool,
    /// Bumped when a write or discard starts or completes.
    gen: u64,
    read_total: u64,
    disabled: bool,
    /// Statistics for tests and debugging.
    prefetches: u64,
    hits: u64,
}

/// The read-ahead layer over a lower layer; `size` tells the image size (prefetches stop at the end).
pub struct Readahead {
    opts: ReadaheadOptions,
    st: Arc<Mutex<St>>,
    lower: Arc<dyn Layer>,
    size: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for Readahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Readahead({:?})", self.opts)
    }
}

impl Readahead {
    pub fn new(
        opts: ReadaheadOptions,
        lower: Arc<dyn Layer>,
        size: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Readahead { opts, st: Arc::new(Mutex::new(St::default())), lower, size }
    }

    /// (prefetches issued, reads served from prefetched data).
    pub fn stats(&self) -> (u64, u64) {
        let s = self.st.lock();
        (s.prefetches, s.hits)
    }

    /// Bytes prefetched and held.
    pub fn held_bytes(&self) -> u64 {
        self.st.lock().buf.bytes()
    }

    fn read(&self, offset: u64, len: u64, done: Done) {
        let end = offset + len;
        let mut s = self.st.lock();
        s.read_total = s.read_total.saturating_add(len);
        if self.opts.disable_after_bytes > 0 && s.read_total > self.opts.disable_after_bytes && !s.disabled {
            s.disabled = true;
            s.buf = ExtentMap::default();
        }
        if offset == s.next_expected && len > 0 {
            s.run = s.run.saturating_add(1);
        } else {
            s.run = 1;
            s.window = 0;
            s.prefetched_end = 0;
        }
        s.next_expected = end;
        let hit = s.buf.covers(offset, len).then(|| {
            let mut b = vec![0; len as usize];
            overlay(&mut b, offset, &s.buf.overlapping(offset, len));
            Bytes::from(b)
        });
        if hit.is_some() {
            s.hits += 1;
        }
        // What the reader has passed is not needed again by a sequential reader.
        if offset > 0 {
            s.buf.remove_range(0, offset);
        }
        let prefetch = self.plan(&mut s, end, len);
        drop(s);
        if let Some((at, n, gen)) = prefetch {
            let st = Arc::clone(&self.st);
            let cap = 2 * self.opts.max_bytes;
            self.lower.submit(
                Req::Read { offset: at, len: n },
                Box::new(move |r| {
                    let mut s = st.lock();
                    s.inflight = false;
                    if let Ok(b) = r {
                        if s.gen == gen && !s.disabled && b.len() as u64 == n {
                            s.buf.insert(at, Seg::Data(b), ());
                            // Bounded: drop the lowest bytes beyond twice the window.
                            while s.buf.bytes() > cap {
                                let Some((o, seg, _)) = s.buf.iter().next().map(|(o, g, m)| (o, g.len(), *m))
                                else {
                                    break;
                                };
                                s.buf.remove_range(o, seg);
                            }
                        }
                    }
                }),
            );
        }
        match hit {
            Some(b) => done(Ok(b)),
            None => self.lower.submit(Req::Read { offset, len }, done),
        }
    }

    /// The prefetch to start after a read ending at `end`, if any: (offset, len, generation).
    fn plan(&self, s: &mut St, end: u64, read_len: u64) -> Option<(u64, u64, u64)> {
        if !self.opts.enabled || s.disabled || s.inflight || s.run < self.opts.trigger_requests.max(1) {
            return None;
        }
        let from = s.prefetched_end.max(end);
        let ahead = from - end;
        if s.window > 0 && ahead >= s.window / 2 {
            return None;
        }
        s.window =
            if s.window == 0 { (2 * read_len).max(4096) } else { 2 * s.window }.min(self.opts.max_bytes);
        let size = (self.size)();
        if from >= size || s.window == 0 {
            return None;
        }
        let n = s.window.min(size - from);
        s.inflight = true;
        s.prefetched_end = from + n;
        s.prefetches += 1;
        Some((from, n, s.gen))
    }
}

impl Layer for Readahead {
    fn submit(&self, req: Req, done: Done) {
        match req {
            Req::Read { offset, len } => self.read(offset, len, done),
            req => {
                let (offset, len) = req.range();
                {
                    let mut s = self.st.lock();
                    s.gen += 1;
                    s.buf.remove_range(offset, len);
                }
                let st = Arc::clone(&self.st);
                self.lower.submit(
                    req,
                    Box::new(move |r| {
                        {
                            let mut s = st.lock();
                            s.gen += 1;
                            s.buf.remove_range(offset, len);
                        }
                        done(r)
                    }),
                );
            }
        }
    }

    fn flush(&self) -> Result<()> {
        self.lower.flush()
    }

    fn invalidate(&self) {
        {
            let mut s = self.st.lock();
            s.gen += 1;
            s.buf = ExtentMap::default();
            s.prefetched_end = 0;
        }
        self.lower.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::fake::{call, Fake};

    const K4: u64 = 4096;

    fn ra(f: &Arc<Fake>, trigger: u32, disable_after: u64) -> Readahead {
        let o = ReadaheadOptions {
            enabled: true,
            trigger_requests: trigger,
            max_bytes: 64 << 10,
            disable_after_bytes: disable_after,
        };
        Readahead::new(o, f.clone(), Box::new(|| 1 << 20))
    }

    fn fill(f: &Fake) {
        for (i, b) in f.0.lock().data.iter_mut().enumerate() {
            *b = (i / 7) as u8;
        }
    }

    #[test]
    fn sequential_reads_trigger_prefetch_and_later_reads_hit_it() {
        // Goal: read-ahead starts after N sequential reads and serves the following ones. Method: trigger
        // 3, 4K reads in order; count bottom reads and check every byte.
        let f = Fake::new(1 << 20);
        fill(&f);
        let r = ra(&f, 3, 0);
        for i in 0..2 {
            call(&r, Req::Read { offset: i * K4, len: K4 }).unwrap();
        }
        assert_eq!(r.stats(), (0, 0), "not yet");
        for i in 2..40 {
            let got = call(&r, Req::Read { offset: i * K4, len: K4 }).unwrap();
            assert_eq!(got.to_vec(), f.bytes(i * K4, K4), "read {i}");
        }
        let (prefetches, hits) = r.stats();
        assert!(prefetches >= 2, "the window keeps moving: {prefetches}");
        assert!(hits >= 30, "most reads served from prefetched data: {hits}");
        assert!(r.held_bytes() <= 2 * (64 << 10));
    }

    #[test]
    fn random_reads_never_prefetch() {
        // Goal: no read-ahead without a sequential pattern. Method: strided and backwards reads.
        let f = Fake::new(1 << 20);
        let r = ra(&f, 3, 0);
        for i in 0..50u64 {
            let off = (i * 37 % 200) * K4;
            call(&r, Req::Read { offset: off, len: K4 }).unwrap();
        }
        assert_eq!(r.stats(), (0, 0));
        assert_eq!(f.reads(), 50);
    }

    #[test]
    fn writes_invalidate_prefetched_data() {
        // Goal: never stale after a write, also when the prefetch answered with old bytes after the write
        // started. Method: (1) prefetch, write into it, read back; (2) hold the bottom: a prefetch and a
        // write are in flight, the prefetch answers (old bytes) before the write; the read must see the new
        // bytes.
        let f = Fake::new(1 << 20);
        let r = ra(&f, 2, 0);
        for i in 0..3 {
            call(&r, Req::Read { offset: i * K4, len: K4 }).unwrap();
        }
        assert!(r.held_bytes() > 0);
        call(&r, Req::Write { offset: 3 * K4 + 10, data: Bytes::from(vec![9; 20]) }).unwrap();
        let got = call(&r, Req::Read { offset: 3 * K4, len: K4 }).unwrap();
        assert_eq!(&got[10..30], &[9; 20]);

        let f = Fake::new(1 << 20);
        let r = Arc::new(ra(&f, 2, 0));
        call(&*r, Req::Read { offset: 0, len: K4 }).unwrap();
        f.set_hold(true);
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || call(&*r2, Req::Read { offset: K4, len: K4 }).unwrap());
        // Held: the prefetch and the read itself.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while f.held() < 2 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        r.submit(
            Req::Write { offset: 2 * K4, data: Bytes::from(vec![7; K4 as usize]) },
            Box::new(move |x| drop(tx.send(x))),
        );
        f.release(0); // the prefetch answers with the old (zero) bytes
        f.release(0); // the read
        t.join().unwrap();
        f.release(0); // the write
        rx.recv().unwrap().unwrap();
        f.set_hold(false);
        let got = call(&*r, Req::Read { offset: 2 * K4, len: K4 }).unwrap();
        assert_eq!(got.to_vec(), vec![7; K4 as usize]);
    }

    #[test]
    fn read_ahead_switches_off_after_the_byte_limit() {
        // Goal: rbd_readahead_disable_after_bytes. Method: limit 64K; sequential 4K reads past it stop
        // prefetching.
        let f = Fake::new(1 << 20);
        let r = ra(&f, 2, 64 << 10);
        for i in 0..16 {
            call(&r, Req::Read { offset: i * K4, len: K4 }).unwrap();
        }
        let (p, _) = r.stats();
        for i in 16..64 {
            call(&r, Req::Read { offset: i * K4, len: K4 }).unwrap();
        }
        assert_eq!(r.stats().0, p, "no prefetch after the limit");
        assert_eq!(r.held_bytes(), 0);
    }
}
