//! The write-back cache layer (the role of librbd's ObjectCacher with `rbd_cache_policy = writeback`, and
//! of GlusterFS's write-behind translator).
//!
//! - Writethrough until the first flush (`rbd_cache_writethrough_until_flush`): a guest that never flushes
//!   cannot be trusted to know about write-back, so until it flushes every write goes straight down and is
//!   acknowledged only when the OSDs have it.
//! - Afterwards writes are acknowledged once in the cache. Dirty data goes
//!   down when the cache holds more than `target_dirty_bytes`, when it is older than `max_dirty_age`, or on
//!   flush. Writers block while dirty plus in-flight bytes would exceed `max_dirty_bytes` (backpressure).
//! - Reads see the cache: the bottom's bytes with the in-flight write-backs and then the dirty data laid
//!   over them (read-your-writes), the overlay taken when the read starts.
//! - Discards (and write_zeroes) go through, as in librbd: they wait for overlapping write-backs in flight,
//!   drop the dirty bytes they supersede, and are acknowledged when the OSDs have them; while in flight they
//!   count as a write-back, so later write-backs of the range wait for them.
//! - Ordering: a write-back never overlaps another one in flight, so the OSDs can never apply an older
//!   write-back after a newer one even when completions are reordered.
//! - Flush is exact: each write gets a sequence number; an extent remembers the oldest write whose bytes it
//!   holds (also when a newer write replaced them, since the older write's effect is then only in the newer
//!   bytes). `flush` returns once no dirty or in-flight extent holds a write numbered at or below the last
//!   one acknowledged before it.
//! - A failed write-back drops the extent (its bytes are lost) and fails the next flush, as Ceph reports
//!   write-back errors on flush.
//!
//! The policy (what to write back at `now`) is [`CacheState::pick`], plain and clock-free; [`Cache`] wraps it
//! with a lock, condition variables and an optional flusher thread.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::{overlay, Done, ExtentMap, Layer, Req, Seg};
use crate::image::{RbdError, Result};

/// Cache settings; defaults are Ceph's `rbd_cache*` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// `rbd_cache`.
    pub enabled: bool,
    /// `rbd_cache_size`: with no clean-data caching here, only a bound on `max_dirty_bytes`.
    pub size_bytes: u64,
    /// `rbd_cache_max_dirty`: writers block above this.
    pub max_dirty_bytes: u64,
    /// `rbd_cache_target_dirty`: write-back starts above this.
    pub target_dirty_bytes: u64,
    /// `rbd_cache_max_dirty_age`.
    pub max_dirty_age: Duration,
    /// `rbd_cache_writethrough_until_flush`.
    pub writethrough_until_flush: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            enabled: true,
            size_bytes: 32 << 20,
            max_dirty_bytes: 24 << 20,
            target_dirty_bytes: 16 << 20,
            max_dirty_age: Duration::from_secs(1),
            writethrough_until_flush: true,
        }
    }
}

/// Write-backs in flight at once.
pub const WRITEBACKS_IN_FLIGHT_MAX: usize = 32;
/// Largest single write-back (adjacent dirty extents are merged up to this).
pub const WRITEBACK_BYTES_MAX: u64 = 4 << 20;
/// Longest a waiter sleeps before looking again (it also drives write-back itself when it wakes).
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// Per dirty extent: the oldest write whose effect it holds, and when it became dirty.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub seq: u64,
    pub since: Instant,
}

/// A write-back on its way down.
#[derive(Debug)]
pub struct Writeback {
    pub id: u64,
    pub offset: u64,
    pub seg: Seg,
    pub seq: u64,
}

/// The cache's state, clock-free.
#[derive(Debug)]
pub struct CacheState {
    opts: CacheOptions,
    dirty: ExtentMap<Meta>,
    inflight: Vec<Writeback>,
    /// Bytes a blocked writer needs below `max_dirty_bytes`: write-back makes room for them even when the
    /// dirty bytes are under the target.
    need_room: u64,
    inflight_bytes: u64,
    /// Sequence number of the last write accepted.
    seq: u64,
    /// Every extent holding a write at or below this goes down now (a flush is waiting for it).
    flush_seq: u64,
    /// False while writing through (before the first flush, or with `max_dirty_bytes` 0).
    writeback: bool,
    next_id: u64,
    error: Option<RbdError>,
    closed: bool,
}

impl CacheState {
    pub fn new(mut opts: CacheOptions) -> CacheState {
        opts.max_dirty_bytes = opts.max_dirty_bytes.min(opts.size_bytes);
        opts.target_dirty_bytes = opts.target_dirty_bytes.min(opts.max_dirty_bytes);
        let writeback = !opts.writethrough_until_flush && opts.max_dirty_bytes > 0;
        CacheState {
            opts,
            dirty: ExtentMap::default(),
            inflight: Vec::new(),
            inflight_bytes: 0,
            need_room: 0,
            seq: 0,
            flush_seq: 0,
            writeback,
            next_id: 0,
            error: None,
            closed: false,
        }
    }

    pub fn options(&self) -> &CacheOptions {
        &self.opts
    }

    /// Dirty bytes not yet sent down.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.bytes()
    }

    pub fn is_writeback(&self) -> bool {
        self.writeback
    }

    /// Dirty plus in-flight bytes: what counts against `max_dirty_bytes`.
    pub fn held_bytes(&self) -> u64 {
        self.dirty.bytes() + self.inflight_bytes
    }

    /// True if a write of `len` bytes must wait (a write larger than the limit waits for an empty cache).
    fn must_wait(&self, len: u64) -> bool {
        let held = self.held_bytes();
        held > 0 && held + len > self.opts.max_dirty_bytes
    }

    fn overlaps_inflight(&self, offset: u64, len: u64) -> bool {
        self.inflight.iter().any(|w| w.offset < offset + len && offset < w.offset + w.seg.len())
    }

    /// Takes a write (or a discard as zeros) into the cache.
    fn accept(&mut self, offset: u64, seg: Seg, now: Instant) {
        self.seq += 1;
        let len = seg.len();
        let replaced = self.dirty.insert(offset, seg, Meta { seq: self.seq, since: now });
        // The replaced writes' effect now lives in the new bytes: carry their numbers and age along.
        if let Some(oldest) = replaced.iter().map(|(_, _, m)| *m).min_by_key(|m| m.seq) {
            let mine = self.dirty.remove_range(offset, len);
            for (o, s, _) in mine {
                self.dirty.insert(o, s, oldest);
            }
        }
    }

    /// The write-backs to start at `now`: extents a flush waits for, extents older than the max age, and the
    /// oldest extents while over the target; never overlapping one in flight, at most
    /// [`WRITEBACKS_IN_FLIGHT_MAX`] in flight. Adjacent extents merge up to [`WRITEBACK_BYTES_MAX`].
    pub fn pick(&mut self, now: Instant) -> Vec<(u64, u64, Seg)> {
        let mut out = Vec::new();
        // Once over the target, go an eighth below it, so that writers do not start a write-back (and
        // this scan) on every write.
        let target = self.opts.target_dirty_bytes;
        let over_target =
            if self.dirty.bytes() > target { self.dirty.bytes() - (target - target / 8) } else { 0 };
        let over_max = (self.held_bytes() + self.need_room).saturating_sub(self.opts.max_dirty_bytes);
        let mut over = over_target.max(over_max);
        let mut by_age: Vec<(u64, u64, Meta)> = self.dirty.iter().map(|(o, s, m)| (o, s.len(), *m)).collect();
        // Oldest first matters only when making room; flushes and aged data go in offset order, which also
        // merges neighbours best.
        if over > 0 {
            by_age.sort_by_key(|(o, _, m)| (m.since, *o));
        }
        for (offset, len, m) in by_age {
            if self.inflight.len() >= WRITEBACKS_IN_FLIGHT_MAX {
                break;
            }
            let due = m.seq <= self.flush_seq
                || now.saturating_duration_since(m.since) >= self.opts.max_dirty_age
                || over > 0;
            if !due || self.overlaps_inflight(offset, len) {
                continue;
            }
            // Still dirty as listed (an earlier merge in this pass may have taken it).
            if !self.dirty.covers(offset, len) {
                continue;
            }
            let (start, pieces) = self.take_run(offset, len);
            let seg = concat(&pieces);
            let seq = pieces.iter().map(|(_, _, m)| m.seq).min().expect("non-empty run");
            over = over.saturating_sub(seg.len());
            self.next_id += 1;
            self.inflight_bytes += data_len(&seg);
            self.inflight.push(Writeback { id: self.next_id, offset: start, seg: seg.clone(), seq });
            out.push((self.next_id, start, seg));
        }
        out
    }

    /// Removes the extent at `[offset, offset + len)` and its same-kind neighbours that follow, up to
    /// [`WRITEBACK_BYTES_MAX`], skipping anything overlapping a write-back in flight.
    fn take_run(&mut self, offset: u64, len: u64) -> (u64, Vec<(u64, Seg, Meta)>) {
        let mut pieces = self.dirty.remove_range(offset, len);
        let zero = matches!(pieces[0].1, Seg::Zero(_));
        let mut end = offset + len;
        loop {
            let next = self.dirty.next_from(end).map(|(o, s, _)| (o, s.len(), s.clone()));
            let Some((o, l, s)) = next else { break };
            if o != end
                || matches!(s, Seg::Zero(_)) != zero
                || end + l - offset > WRITEBACK_BYTES_MAX
                || self.overlaps_inflight(o, l)
            {
                break;
            }
            pieces.extend(self.dirty.remove_range(o, l));
            end += l;
        }
        (offset, pieces)
    }

    /// Starts a discard going through: supersedes the dirty bytes of the range and registers it in flight.
    /// The caller has waited until no write-back in flight overlaps.
    fn start_discard(&mut self, offset: u64, len: u64) -> u64 {
        debug_assert!(!self.overlaps_inflight(offset, len));
        self.seq += 1;
        let removed = self.dirty.remove_range(offset, len);
        let seq = removed.iter().map(|(_, _, m)| m.seq).min().unwrap_or(self.seq).min(self.seq);
        self.next_id += 1;
        self.inflight.push(Writeback { id: self.next_id, offset, seg: Seg::Zero(len), seq });
        self.next_id
    }

    /// A write-back answered.
    fn finished(&mut self, id: u64, r: Result<()>) {
        let i = self.inflight.iter().position(|w| w.id == id).expect("a write-back finishes once");
        let w = self.inflight.swap_remove(i);
        self.inflight_bytes -= data_len(&w.seg);
        if let Err(e) = r {
            tracing::warn!(offset = w.offset, len = w.seg.len(), error = %e, "rbd cache write-back failed");
            self.error.get_or_insert(e);
        }
    }

    /// True once nothing dirty or in flight holds a write numbered `seq` or lower.
    pub fn flushed_through(&self, seq: u64) -> bool {
        self.dirty.iter().all(|(_, _, m)| m.seq > seq) && self.inflight.iter().all(|w| w.seq > seq)
    }

    /// The overlay a read of `[offset, offset + len)` lays over the bottom's bytes, in application order.
    fn read_overlay(&self, offset: u64, len: u64) -> Vec<(u64, Seg)> {
        let end = offset + len;
        let mut v: Vec<(u64, Seg)> = Vec::new();
        for w in &self.inflight {
            let (a, b) = (offset.max(w.offset), end.min(w.offset + w.seg.len()));
            if a < b {
                v.push((a, w.seg.slice(a - w.offset, b - w.offset)));
            }
        }
        v.extend(self.dirty.overlapping(offset, len));
        v
    }
}

/// Bytes that count against the dirty limits (a discard in flight holds no memory).
fn data_len(s: &Seg) -> u64 {
    match s {
        Seg::Data(b) => b.len() as u64,
        Seg::Zero(_) => 0,
    }
}

fn concat(pieces: &[(u64, Seg, Meta)]) -> Seg {
    if let Seg::Zero(_) = pieces[0].1 {
        return Seg::Zero(pieces.iter().map(|(_, s, _)| s.len()).sum());
    }
    if pieces.len() == 1 {
        return pieces[0].1.clone();
    }
    let mut v = Vec::with_capacity(pieces.iter().map(|(_, s, _)| s.len() as usize).sum());
    for (_, s, _) in pieces {
        if let Seg::Data(b) = s {
            v.extend_from_slice(b);
        }
    }
    Seg::Data(Bytes::from(v))
}

struct Inner {
    st: Mutex<CacheState>,
    /// Signalled when write-backs finish, flushes start, or the cache closes.
    cv: Condvar,
    lower: Arc<dyn Layer>,
}

/// The write-back cache over a lower layer.
pub struct Cache {
    inner: Arc<Inner>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.st.lock();
        write!(f, "Cache(dirty {} in flight {})", s.dirty.bytes(), s.inflight_bytes)
    }
}

impl Cache {
    /// A cache with no flusher thread: write-back then happens only when writers or flushes drive it (tests
    /// use this and [`Cache::poll`] with their own clock).
    pub fn new(opts: CacheOptions, lower: Arc<dyn Layer>) -> Cache {
        Cache {
            inner: Arc::new(Inner { st: Mutex::new(CacheState::new(opts)), cv: Condvar::new(), lower }),
            flusher: Mutex::new(None),
        }
    }

    /// A cache with a flusher thread that writes back aged or over-target data.
    pub fn start(opts: CacheOptions, lower: Arc<dyn Layer>, name: &str) -> Result<Cache> {
        let c = Cache::new(opts, lower);
        let inner = Arc::clone(&c.inner);
        let tick = (opts.max_dirty_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        let h = std::thread::Builder::new()
            .name(format!("rbd-cache-{name}"))
            .spawn(move || loop {
                {
                    let mut g = inner.st.lock();
                    if g.closed {
                        return;
                    }
                    inner.cv.wait_for(&mut g, tick);
                    if g.closed {
                        return;
                    }
                }
                poll_inner(&inner, Instant::now());
            })
            .map_err(|e| {
                RbdError::Rados(rados::objecter::RadosError::Io(format!("spawning the flusher: {e}")))
            })?;
        *c.flusher.lock() = Some(h);
        Ok(c)
    }

    /// Starts the write-backs due at `now`; returns how many.
    pub fn poll(&self, now: Instant) -> usize {
        poll_inner(&self.inner, now)
    }

    pub fn state(&self) -> parking_lot::MutexGuard<'_, CacheState> {
        self.inner.st.lock()
    }

    /// Write + flush of everything acknowledged so far (FUA).
    pub fn write_fua(&self, offset: u64, data: Bytes) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(Req::Write { offset, data }, Box::new(move |r| drop(tx.send(r))));
        rx.recv().map_err(|_| RbdError::Closed)??;
        self.flush()
    }

    /// Flushes and stops the flusher thread. Later writes are refused.
    pub fn close(&self) -> Result<()> {
        let r = self.flush();
        self.inner.st.lock().closed = true;
        self.inner.cv.notify_all();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        r
    }

    /// Drops dirty data without writing it back and refuses further I/O, as a crash would.
    pub fn abandon(&self) {
        let mut g = self.inner.st.lock();
        g.closed = true;
        g.dirty = ExtentMap::default();
        drop(g);
        self.inner.cv.notify_all();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
    }

    /// With `nowait`, a write that would wait for room is handed back instead (see [`Cache::try_submit`]).
    fn submit_write(&self, offset: u64, seg: Seg, done: Done, nowait: bool) -> Handed {
        let len = seg.len();
        let mut g = self.inner.st.lock();
        if g.closed {
            drop(g);
            done(Err(RbdError::Closed));
            return Ok(());
        }
        if !g.writeback {
            drop(g);
            self.inner.lower.submit(seg.into_req(offset), done);
            return Ok(());
        }
        if nowait && g.must_wait(len) {
            drop(g);
            // Make room meanwhile, as a waiting writer would.
            poll_inner(&self.inner, Instant::now());
            return Err((seg.into_req(offset), done));
        }
        // Backpressure: drive write-back ourselves, then wait for some to finish.
        while g.must_wait(len) && !g.closed {
            g.need_room = g.need_room.max(len);
            drop(g);
            poll_inner(&self.inner, Instant::now());
            g = self.inner.st.lock();
            if g.must_wait(len) {
                self.inner.cv.wait_for(&mut g, WAIT_SLICE);
            }
        }
        if g.closed {
            drop(g);
            done(Err(RbdError::Closed));
            return Ok(());
        }
        g.need_room = 0;
        g.accept(offset, seg, Instant::now());
        let over = g.dirty.bytes() > g.opts.target_dirty_bytes;
        drop(g);
        if over {
            poll_inner(&self.inner, Instant::now());
        }
        done(Ok(Bytes::new()));
        Ok(())
    }
}

impl Cache {
    /// [`Layer::submit`] for a write or discard from a thread that must not wait (an event loop): starts it
    /// unless that would wait here (the cache is write-back and over its dirty limit, or a discard overlaps a
    /// write-back in flight), in which case `req` and `done` come back untouched. Decided under the lock that
    /// `submit` waits under. Below the cache nothing waits on a write but object dispatch's full queue,
    /// which callers bound themselves. A read never waits here and always starts.
    pub fn try_submit(&self, req: Req, done: Done) -> Handed {
        match req {
            Req::Write { offset, data } => self.submit_write(offset, Seg::Data(data), done, true),
            Req::Discard { offset, len } => self.submit_discard(offset, len, done, true),
            req @ Req::Read { .. } => {
                self.submit(req, done);
                Ok(())
            }
        }
    }

    fn submit_discard(&self, offset: u64, len: u64, done: Done, nowait: bool) -> Handed {
        let mut g = self.inner.st.lock();
        if g.closed {
            drop(g);
            done(Err(RbdError::Closed));
            return Ok(());
        }
        if !g.writeback {
            drop(g);
            self.inner.lower.submit(Req::Discard { offset, len }, done);
            return Ok(());
        }
        if nowait && g.overlaps_inflight(offset, len) {
            return Err((Req::Discard { offset, len }, done));
        }
        while g.overlaps_inflight(offset, len) {
            self.inner.cv.wait_for(&mut g, WAIT_SLICE);
        }
        let id = g.start_discard(offset, len);
        drop(g);
        let inner = Arc::clone(&self.inner);
        self.inner.lower.submit(
            Req::Discard { offset, len },
            Box::new(move |r| {
                // The discard's own error goes to its caller, not to a later flush.
                inner.st.lock().finished(id, Ok(()));
                inner.cv.notify_all();
                done(r);
            }),
        );
        Ok(())
    }
}

/// `Err` hands a request back unstarted, with its callback unrun (only ever with `nowait`).
type Handed = std::result::Result<(), (Req, Done)>;

fn poll_inner(inner: &Arc<Inner>, now: Instant) -> usize {
    let picked = inner.st.lock().pick(now);
    let n = picked.len();
    for (id, offset, seg) in picked {
        let req = seg.into_req(offset);
        let inner2 = Arc::clone(inner);
        inner.lower.submit(
            req,
            Box::new(move |r| {
                inner2.st.lock().finished(id, r.map(|_| ()));
                inner2.cv.notify_all();
            }),
        );
    }
    n
}

impl Layer for Cache {
    fn submit(&self, req: Req, done: Done) {
        match req {
            Req::Write { offset, data } => {
                let started = self.submit_write(offset, Seg::Data(data), done, false);
                debug_assert!(started.is_ok(), "only a nowait submission is handed back");
            }
            Req::Discard { offset, len } => {
                let started = self.submit_discard(offset, len, done, false);
                debug_assert!(started.is_ok(), "only a nowait submission is handed back");
            }
            Req::Read { offset, len } => {
                let ov = self.inner.st.lock().read_overlay(offset, len);
                if ov.is_empty() {
                    return self.inner.lower.submit(Req::Read { offset, len }, done);
                }
                // Wholly dirty: no need to go down.
                let mut full = ExtentMap::<()>::default();
                for (o, s) in &ov {
                    full.insert(*o, s.clone(), ());
                }
                if full.covers(offset, len) {
                    let mut buf = vec![0; len as usize];
                    overlay(&mut buf, offset, &ov);
                    return done(Ok(Bytes::from(buf)));
                }
                self.inner.lower.submit(
                    Req::Read { offset, len },
                    Box::new(move |r| {
                        done(r.map(|b| {
                            let mut buf = b.to_vec();
                            buf.resize(len as usize, 0);
                            overlay(&mut buf, offset, &ov);
                            Bytes::from(buf)
                        }))
                    }),
                );
            }
        }
    }

    fn flush(&self) -> Result<()> {
        let mut g = self.inner.st.lock();
        let target = g.seq;
        g.flush_seq = g.flush_seq.max(target);
        // From the first flush on, the guest knows about flushes: write back from now.
        if g.opts.max_dirty_bytes > 0 {
            g.writeback = true;
        }
        while !g.flushed_through(target) {
            drop(g);
            poll_inner(&self.inner, Instant::now());
            g = self.inner.st.lock();
            if !g.flushed_through(target) {
                self.inner.cv.wait_for(&mut g, WAIT_SLICE);
            }
        }
        let err = g.error.take();
        drop(g);
        self.inner.lower.flush()?;
        err.map_or(Ok(()), Err)
    }

    fn invalidate(&self) {
        self.inner.lower.invalidate();
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.inner.st.lock().closed = true;
        self.inner.cv.notify_all();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::fake::{call, Fake};

    const K4: u64 = 4096;

    fn opts(max: u64, target: u64) -> CacheOptions {
        CacheOptions {
            enabled: true,
            size_bytes: 1 << 30,
            max_dirty_bytes: max,
            target_dirty_bytes: target,
            max_dirty_age: Duration::from_secs(3600),
            writethrough_until_flush: true,
        }
    }

    fn w(c: &Cache, offset: u64, byte: u8, len: u64) {
        call(c, Req::Write { offset, data: Bytes::from(vec![byte; len as usize]) }).unwrap();
    }

    fn r(c: &Cache, offset: u64, len: u64) -> Vec<u8> {
        call(c, Req::Read { offset, len }).unwrap().to_vec()
    }

    /// Waits (bounded) for `cond`, polling.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn writes_go_through_until_the_first_flush_then_stay_in_the_cache() {
        // Goal: writethrough until flush, then write-back with read-your-writes. Method: write before and
        // after a flush and look at what the fake bottom holds.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(1 << 20, 1 << 19), f.clone());
        w(&c, 0, 1, K4);
        assert_eq!(f.bytes(0, K4), vec![1; K4 as usize], "writethrough before any flush");
        assert!(!c.state().is_writeback());
        c.flush().unwrap();
        assert!(c.state().is_writeback());
        w(&c, 100, 2, 10);
        assert_eq!(f.writes(), 1, "the second write stays in the cache");
        assert_eq!(f.bytes(100, 10), vec![1; 10]);
        // Read-your-writes: cached bytes over the bottom's, both for a wholly dirty and a mixed range.
        assert_eq!(r(&c, 100, 10), vec![2; 10]);
        let got = r(&c, 90, 30);
        assert_eq!(&got[..10], &[1; 10]);
        assert_eq!(&got[10..20], &[2; 10]);
        assert_eq!(&got[20..], &[1; 10]);
        c.flush().unwrap();
        assert_eq!(f.bytes(100, 10), vec![2; 10]);
        assert_eq!(c.state().held_bytes(), 0);
    }

    #[test]
    fn dirty_data_is_written_back_when_older_than_the_max_age() {
        // Goal: age-driven write-back, deterministic. Method: no flusher thread; poll with a fake `now`
        // before and after max_dirty_age.
        let f = Fake::new(1 << 20);
        let c = Cache::new(
            CacheOptions { max_dirty_age: Duration::from_secs(1), ..opts(1 << 20, 1 << 19) },
            f.clone(),
        );
        c.flush().unwrap();
        let t0 = Instant::now();
        w(&c, 0, 7, K4);
        assert_eq!(c.poll(t0 + Duration::from_millis(500)), 0, "young data stays");
        assert_eq!(f.writes(), 0);
        assert_eq!(c.poll(t0 + Duration::from_millis(1500)), 1, "old data goes down");
        assert_eq!(f.bytes(0, K4), vec![7; K4 as usize]);
        assert_eq!(c.state().held_bytes(), 0);
    }

    #[test]
    fn the_flusher_thread_writes_back_aged_data() {
        // Goal: the background flusher bounds dirty age without anyone flushing. Method: 20 ms max age;
        // wait (bounded) for the bottom to hold the write.
        let f = Fake::new(1 << 20);
        let o = CacheOptions { max_dirty_age: Duration::from_millis(20), ..opts(1 << 20, 1 << 19) };
        let c = Cache::start(o, f.clone(), "t").unwrap();
        c.flush().unwrap();
        w(&c, 4096, 3, 100);
        eventually("aged write-back", || f.bytes(4096, 100) == vec![3; 100]);
        c.close().unwrap();
        assert!(call(&c, Req::Write { offset: 0, data: Bytes::from_static(b"x") }).is_err(), "closed");
    }

    #[test]
    fn dirty_data_over_the_target_is_written_back_oldest_first() {
        // Goal: write-back starts above target_dirty, oldest first, and goes an eighth below the target.
        // Method: target 8K; three 4K writes at separate offsets; the two oldest go down (12K -> 4K <= 7K),
        // the newest stays.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(64 * K4, 2 * K4), f.clone());
        c.flush().unwrap();
        w(&c, 0, 1, K4);
        w(&c, 10 * K4, 2, K4);
        assert_eq!(f.writes(), 0, "at the target: nothing goes down");
        w(&c, 20 * K4, 3, K4);
        assert_eq!(f.writes(), 2);
        assert_eq!(f.bytes(0, K4), vec![1; K4 as usize], "the oldest went down");
        assert_eq!(f.bytes(10 * K4, K4), vec![2; K4 as usize]);
        assert_eq!(f.bytes(20 * K4, K4), vec![0; K4 as usize], "the newest stays");
        assert_eq!(c.state().dirty_bytes(), K4);
    }

    #[test]
    fn writers_block_at_max_dirty_until_write_backs_finish() {
        // Goal: backpressure. Method: a bottom that holds completions; max 16K, target 8K; fill to the max,
        // then a fifth 4K write must block until one write-back is released.
        let f = Fake::new(1 << 20);
        f.set_hold(true);
        let c = Arc::new(Cache::new(opts(4 * K4, 2 * K4), f.clone()));
        c.flush().unwrap();
        for i in 0..4 {
            w(&c, i * 2 * K4, i as u8 + 1, K4);
        }
        assert_eq!(c.state().held_bytes(), 4 * K4);
        assert_eq!(f.held(), 2, "two write-backs in flight, two dirty");
        let c2 = Arc::clone(&c);
        let t = std::thread::spawn(move || w(&c2, 100 * K4, 9, K4));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "the writer is held back at max dirty");
        f.release(0);
        eventually("the writer to proceed", || t.is_finished());
        t.join().unwrap();
        assert!(c.state().held_bytes() <= 4 * K4);
        f.set_hold(false);
        f.release_all_reversed();
        c.flush().unwrap();
        assert_eq!(f.bytes(100 * K4, K4), vec![9; K4 as usize]);
    }

    #[test]
    fn try_submit_hands_back_what_would_wait_and_starts_the_rest() {
        // Goal: an event loop can submit without ever waiting: what would wait comes back unstarted, with its
        // callback unrun; everything else starts. Method: the setup above (held bottom, max 16K, target 8K).
        // Writethrough (before a flush): a write starts at once. Write-back at max dirty: a 4K write and a
        // discard overlapping a write-back in flight come back; a read starts; after one write-back is
        // released the same write starts.
        let f = Fake::new(1 << 20);
        f.set_hold(true);
        let c = Arc::new(Cache::new(opts(4 * K4, 2 * K4), f.clone()));
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = |ran: &Arc<std::sync::atomic::AtomicUsize>| -> Done {
            let ran = Arc::clone(ran);
            Box::new(move |_| {
                ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let write = |at: u64| Req::Write { offset: at, data: Bytes::from(vec![9u8; K4 as usize]) };
        assert!(c.try_submit(write(200 * K4), counted(&ran)).is_ok(), "writethrough: starts");
        assert_eq!(f.held(), 1, "passed straight down");
        f.release_all_reversed();
        f.set_hold(true);
        c.flush().unwrap();
        for i in 0..4 {
            w(&c, i * 2 * K4, i as u8 + 1, K4);
        }
        assert_eq!(f.held(), 2, "two write-backs in flight, two dirty: at max");
        let ran_before = ran.load(std::sync::atomic::Ordering::SeqCst);
        let (req, _) =
            c.try_submit(write(100 * K4), counted(&ran)).expect_err("a write at max dirty comes back");
        assert!(matches!(req, Req::Write { offset, .. } if offset == 100 * K4));
        let back = c.try_submit(Req::Discard { offset: 0, len: K4 }, counted(&ran));
        assert!(back.is_err(), "a discard over a write-back in flight comes back");
        assert_eq!(
            ran.load(std::sync::atomic::Ordering::SeqCst),
            ran_before,
            "callbacks of handed-back requests never run"
        );
        assert!(c.try_submit(Req::Read { offset: 150 * K4, len: K4 }, counted(&ran)).is_ok(), "reads start");
        f.release(0);
        eventually("room for one more write", || c.state().held_bytes() < 4 * K4);
        assert!(c.try_submit(write(100 * K4), counted(&ran)).is_ok());
        f.set_hold(false);
        f.release_all_reversed();
        c.flush().unwrap();
        assert_eq!(f.bytes(100 * K4, K4), vec![9; K4 as usize]);
    }

    #[test]
    fn a_large_write_makes_room_even_below_the_target() {
        // Goal: no stall when a write needs more room than max - target while dirty sits at the target.
        // Method: max 16K, target 12K, no age write-back; 12K dirty, then an 8K write must push data down
        // by itself (no flusher thread) and complete.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(4 * K4, 3 * K4), f.clone());
        c.flush().unwrap();
        for i in 0..3 {
            w(&c, i * 2 * K4, 1, K4);
        }
        assert_eq!(f.writes(), 0);
        w(&c, 100 * K4, 2, 2 * K4);
        assert!(f.writes() >= 1, "room was made");
        assert!(c.state().held_bytes() <= 4 * K4);
    }

    #[test]
    fn flush_waits_for_every_acknowledged_write_despite_slow_reordered_completions() {
        // Goal: flush is exact and overlapping write-backs never race. Method: a held bottom; v1 of a block
        // goes down (held), v2 overwrites it in the cache, plus other blocks; a flush must not return until
        // every write-back answered (released last-first), must never have two write-backs of the block in
        // flight, and the bottom ends with v2.
        let f = Fake::new(1 << 20);
        let c = Arc::new(Cache::new(opts(1 << 20, 1 << 19), f.clone()));
        c.flush().unwrap();
        f.set_hold(true);
        w(&c, 0, 1, K4);
        assert_eq!(c.poll(Instant::now() + Duration::from_secs(7200)), 1, "v1 in flight");
        w(&c, 0, 2, K4);
        w(&c, 8 * K4, 3, K4);
        w(&c, 16 * K4, 4, 2 * K4);
        let c2 = Arc::clone(&c);
        let fl = std::thread::spawn(move || c2.flush());
        // The two other blocks go down; v2 must wait for v1.
        eventually("two more write-backs", || f.held() == 3);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(f.held(), 3, "v2 not sent while v1 is in flight");
        assert!(!fl.is_finished());
        assert_eq!(r(&c, 0, K4), vec![2; K4 as usize], "reads see v2 meanwhile");
        f.release_all_reversed(); // the later blocks answer first, then v1
        eventually("v2 to go down", || f.held() == 1);
        assert!(!fl.is_finished(), "flush still waits for v2");
        f.release(0);
        fl.join().unwrap().unwrap();
        assert_eq!(f.bytes(0, K4), vec![2; K4 as usize]);
        assert_eq!(f.bytes(8 * K4, K4), vec![3; K4 as usize]);
        assert_eq!(f.bytes(16 * K4, 2 * K4), vec![4; 2 * K4 as usize]);
        assert_eq!(c.state().held_bytes(), 0);
    }

    #[test]
    fn a_flush_covers_writes_whose_bytes_were_replaced_after_it_started() {
        // Goal: a write acknowledged before a flush is durable when the flush returns even if a later write
        // replaced its bytes in the cache meanwhile. Method: the replacing extent inherits the older
        // sequence number, so the flush's completion condition holds only once it is down.
        let mut st = CacheState::new(opts(1 << 20, 1 << 19));
        st.writeback = true;
        let now = Instant::now();
        st.accept(0, Seg::Data(Bytes::from(vec![1; 10])), now);
        let target = st.seq;
        st.accept(5, Seg::Data(Bytes::from(vec![2; 10])), now);
        assert!(!st.flushed_through(target));
        st.flush_seq = target;
        let picked = st.pick(now);
        assert_eq!(picked.len(), 1, "both extents merge into one write-back, both due");
        assert!(!st.flushed_through(target));
        st.finished(picked[0].0, Ok(()));
        assert!(st.flushed_through(target));
    }

    #[test]
    fn discards_go_through_and_supersede_dirty_bytes() {
        // Goal: a discard reaches the bottom before it is acknowledged and drops cached data in its range,
        // so neither a read nor a later flush resurrects the old bytes. Method: cache data, discard part.
        let f = Fake::new(1 << 20);
        f.0.lock().data[..3 * K4 as usize].fill(5);
        let c = Cache::new(opts(1 << 20, 1 << 19), f.clone());
        c.flush().unwrap();
        w(&c, 0, 6, 3 * K4);
        call(&c, Req::Discard { offset: K4, len: K4 }).unwrap();
        assert_eq!(f.bytes(K4, K4), vec![0; K4 as usize], "the discard is on the bottom");
        let got = r(&c, 0, 3 * K4);
        assert_eq!(&got[..K4 as usize], &[6; K4 as usize]);
        assert_eq!(&got[K4 as usize..2 * K4 as usize], &[0; K4 as usize]);
        c.flush().unwrap();
        assert_eq!(f.bytes(K4, K4), vec![0; K4 as usize]);
        assert_eq!(f.bytes(2 * K4, K4), vec![6; K4 as usize]);
    }

    #[test]
    fn write_fua_is_on_the_bottom_when_it_returns() {
        // Goal: FUA semantics in write-back mode. Method: write_fua after a flush; the bottom has it.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(1 << 20, 1 << 19), f.clone());
        c.flush().unwrap();
        w(&c, 0, 1, 10);
        c.write_fua(K4, Bytes::from(vec![2; 10])).unwrap();
        assert_eq!(f.bytes(K4, 10), vec![2; 10]);
        assert_eq!(f.bytes(0, 10), vec![1; 10], "earlier acknowledged writes too");
    }

    #[test]
    fn a_failed_write_back_fails_the_next_flush_only() {
        // Goal: write-back errors are not swallowed: the next flush reports them, later flushes are clean.
        // Method: a bottom that fails writes while a cached write goes down.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(1 << 20, 1 << 19), f.clone());
        c.flush().unwrap();
        w(&c, 0, 1, 10);
        f.0.lock().fail_writes = true;
        assert!(c.flush().is_err());
        f.0.lock().fail_writes = false;
        c.flush().unwrap();
        w(&c, 0, 2, 10);
        c.flush().unwrap();
        assert_eq!(f.bytes(0, 10), vec![2; 10]);
    }

    #[test]
    fn random_ops_with_reordered_completions_match_a_byte_array() {
        // Goal: read-your-writes, discard and flush stay exact under any completion order. Method: seeded
        // random writes, discards, reads and flushes over a holding bottom that answers write-backs in random
        // order; reads and the bottom after each flush are compared with a Vec<u8> model.
        let size = 64 * K4;
        let f = Fake::new(size as usize);
        let c = Arc::new(Cache::new(opts(1 << 20, 2 * K4), f.clone()));
        c.flush().unwrap();
        f.set_hold(true);
        let mut model = vec![0u8; size as usize];
        let mut x: u64 = 0x9E37_79B9;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for step in 0..400u32 {
            let off = rnd(size - 1);
            let len = 1 + rnd((size - off).min(3 * K4));
            match rnd(10) {
                0..=3 => {
                    let b = (step % 251) as u8 + 1;
                    model[off as usize..(off + len) as usize].fill(b);
                    w(&c, off, b, len);
                }
                4..=5 => {
                    if f.held() > 0 {
                        let i = rnd(f.held() as u64) as usize;
                        f.release(i);
                    }
                }
                6..=7 => {
                    f.set_hold(false);
                    assert_eq!(r(&c, off, len), model[off as usize..(off + len) as usize], "step {step}");
                    f.set_hold(true);
                }
                8 => {
                    // A discard waits for overlapping write-backs: let them all answer first.
                    while f.held() > 0 {
                        let i = rnd(f.held() as u64) as usize;
                        f.release(i);
                    }
                    f.set_hold(false);
                    call(&*c, Req::Discard { offset: off, len }).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                    f.set_hold(true);
                }
                _ => {
                    let c2 = Arc::clone(&c);
                    let fl = std::thread::spawn(move || c2.flush());
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !fl.is_finished() {
                        assert!(Instant::now() < deadline, "flush never returned");
                        if f.held() > 0 {
                            let i = rnd(f.held() as u64) as usize;
                            f.release(i);
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    fl.join().unwrap().unwrap();
                    assert_eq!(f.bytes(0, size), model, "bottom after flush at step {step}");
                }
            }
        }
    }

    #[test]
    fn abandon_drops_dirty_data_but_flushed_data_stays() {
        // Goal: the crash model: what a flush acknowledged is on the bottom; dirty bytes may be lost.
        // Method: write, flush, write again, abandon.
        let f = Fake::new(1 << 20);
        let c = Cache::new(opts(1 << 20, 1 << 19), f.clone());
        c.flush().unwrap();
        w(&c, 0, 1, 10);
        c.flush().unwrap();
        w(&c, 0, 2, 10);
        c.abandon();
        assert_eq!(f.bytes(0, 10), vec![1; 10]);
    }
}
