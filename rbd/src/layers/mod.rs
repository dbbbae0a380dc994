//! The image I/O layer stack: an image request passes from [`crate::image::Image`] through optional layers
//! (write-back [`cache`], [`readahead`]) down to object dispatch (the bottom layer in `image.rs`, which maps
//! extents to objects and drives the Objecter).
//!
//! Every layer implements [`Layer`]: requests are submitted with a completion callback that may run on any
//! thread (a messenger thread for the bottom layer), so layers never block in callbacks. Each layer is tested
//! on its own over an in-memory bottom layer (`fake` in the tests), with completions held back and released
//! in any order.

pub mod cache;
pub mod readahead;

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::image::Result;

pub use cache::{Cache, CacheOptions};
pub use readahead::{Readahead, ReadaheadOptions};

/// One image-level request, already checked against the image size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Bytes,
    },
    /// Afterwards the range reads as zeros (discard and write_zeroes).
    Discard {
        offset: u64,
        len: u64,
    },
}

impl Req {
    pub fn range(&self) -> (u64, u64) {
        match self {
            Req::Read { offset, len } | Req::Discard { offset, len } => (*offset, *len),
            Req::Write { offset, data } => (*offset, data.len() as u64),
        }
    }
}

/// Completion callback: the read's bytes, or empty bytes for writes and discards. Runs exactly once, maybe
/// on another thread; it must not block.
pub type Done = Box<dyn FnOnce(Result<Bytes>) + Send>;

/// A layer of the image I/O stack.
pub trait Layer: Send + Sync {
    /// Starts a request. May block for backpressure (a full queue, a cache over its dirty limit), never on
    /// the request's own completion. Object dispatch never blocks a submission made from one of its
    /// completion callbacks (see `dispatch.rs`); the cache's own waits (dirty limit, a discard behind an
    /// overlapping write-back) still can.
    fn submit(&self, req: Req, done: Done);
    /// Returns once every write acknowledged before the call is on the OSDs.
    fn flush(&self) -> Result<()>;
    /// Forgets clean cached data (after a resize, say). Dirty data is not touched.
    fn invalidate(&self) {}
}

/// A piece of an overlay: bytes, or a run of zeros (a discard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Data(Bytes),
    Zero(u64),
}

impl Seg {
    pub fn len(&self) -> u64 {
        match self {
            Seg::Data(b) => b.len() as u64,
            Seg::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The request that writes this piece at `offset` (a run of zeros is a discard).
    pub fn into_req(self, offset: u64) -> Req {
        match self {
            Seg::Data(data) => Req::Write { offset, data },
            Seg::Zero(len) => Req::Discard { offset, len },
        }
    }

    /// Bytes `[from, to)` of the segment.
    fn slice(&self, from: u64, to: u64) -> Seg {
        debug_assert!(from <= to && to <= self.len());
        match self {
            Seg::Data(b) => Seg::Data(b.slice(from as usize..to as usize)),
            Seg::Zero(_) => Seg::Zero(to - from),
        }
    }

    /// Copies the segment's bytes `[from, from + dst.len())` into `dst`.
    fn copy_to(&self, from: u64, dst: &mut [u8]) {
        match self {
            Seg::Data(b) => dst.copy_from_slice(&b[from as usize..from as usize + dst.len()]),
            Seg::Zero(_) => dst.fill(0),
        }
    }
}

/// Non-overlapping extents of the image, each a [`Seg`] with metadata `M`, keyed by offset.
#[derive(Debug, Clone)]
pub struct ExtentMap<M> {
    map: BTreeMap<u64, (Seg, M)>,
    bytes: u64,
}

impl<M: Clone> Default for ExtentMap<M> {
    fn default() -> Self {
        ExtentMap { map: BTreeMap::new(), bytes: 0 }
    }
}

impl<M: Clone> ExtentMap<M> {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &Seg, &M)> {
        self.map.iter().map(|(o, (s, m))| (*o, s, m))
    }

    /// The first extent starting at or after `offset`.
    pub fn next_from(&self, offset: u64) -> Option<(u64, &Seg, &M)> {
        self.map.range(offset..).next().map(|(o, (s, m))| (*o, s, m))
    }

    /// Removes and returns the parts of extents inside `[offset, offset + len)`, in offset order; the parts
    /// outside stay.
    pub fn remove_range(&mut self, offset: u64, len: u64) -> Vec<(u64, Seg, M)> {
        let end = offset + len;
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        // The extent starting before `offset` may reach into the range.
        let first = self.map.range(..offset).next_back().map(|(o, _)| *o);
        let keys: Vec<u64> = first.into_iter().chain(self.map.range(offset..end).map(|(o, _)| *o)).collect();
        for k in keys {
            let (seg, m) = self.map.remove(&k).expect("key just listed");
            let seg_end = k + seg.len();
            if seg_end <= offset {
                self.map.insert(k, (seg, m));
                continue;
            }
            self.bytes -= seg.len();
            let (a, b) = (offset.max(k), end.min(seg_end));
            if k < a {
                let head = seg.slice(0, a - k);
                self.bytes += head.len();
                self.map.insert(k, (head, m.clone()));
            }
            if b < seg_end {
                let tail = seg.slice(b - k, seg_end - k);
                self.bytes += tail.len();
                self.map.insert(b, (tail, m.clone()));
            }
            out.push((a, seg.slice(a - k, b - k), m));
        }
        out
    }

    /// Inserts a segment, replacing whatever it overlaps; returns the replaced parts.
    pub fn insert(&mut self, offset: u64, seg: Seg, m: M) -> Vec<(u64, Seg, M)> {
        let old = self.remove_range(offset, seg.len());
        if !seg.is_empty() {
            self.bytes += seg.len();
            self.map.insert(offset, (seg, m));
        }
        old
    }

    /// Copies of the parts inside `[offset, offset + len)`.
    pub fn overlapping(&self, offset: u64, len: u64) -> Vec<(u64, Seg)> {
        let end = offset + len;
        let first = self.map.range(..offset).next_back();
        first
            .into_iter()
            .chain(self.map.range(offset..end))
            .filter_map(|(k, (seg, _))| {
                let (a, b) = (offset.max(*k), end.min(k + seg.len()));
                (a < b).then(|| (a, seg.slice(a - k, b - k)))
            })
            .collect()
    }

    /// True if `[offset, offset + len)` is wholly held.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        let mut at = offset;
        for (a, s) in self.overlapping(offset, len) {
            if a != at {
                return false;
            }
            at += s.len();
        }
        at == offset + len
    }
}

/// Copies `pieces` (image offsets) over `buf`, which holds the image bytes from `buf_offset`.
pub fn overlay(buf: &mut [u8], buf_offset: u64, pieces: &[(u64, Seg)]) {
    let buf_end = buf_offset + buf.len() as u64;
    for (off, seg) in pieces {
        let (a, b) = ((*off).max(buf_offset), (off + seg.len()).min(buf_end));
        if a < b {
            seg.copy_to(a - off, &mut buf[(a - buf_offset) as usize..(b - buf_offset) as usize]);
        }
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory bottom layer. Requests apply when completed: at once, or (with `hold`) when the test
    //! releases them, in any order, so tests can model slow and reordered OSD completions.
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    pub struct FakeState {
        pub data: Vec<u8>,
        pub hold: bool,
        /// Writes and discards fail (and change nothing) while set.
        pub fail_writes: bool,
        pub held: Vec<(Req, Done)>,
        pub log: Vec<Req>,
    }

    pub struct Fake(pub Mutex<FakeState>);

    impl Fake {
        pub fn new(size: usize) -> std::sync::Arc<Fake> {
            std::sync::Arc::new(Fake(Mutex::new(FakeState { data: vec![0; size], ..Default::default() })))
        }

        pub fn set_hold(&self, hold: bool) {
            self.0.lock().hold = hold;
        }

        pub fn held(&self) -> usize {
            self.0.lock().held.len()
        }

        /// Completes held request `i` (index into the current held list).
        pub fn release(&self, i: usize) {
            let (req, done) = self.0.lock().held.remove(i);
            let r = self.apply(&req);
            done(r);
        }

        /// Completes every request held now, last first (reordered). What the completions send meanwhile
        /// (on this thread or another) stays held: whether it was sent before or after the last release is
        /// the scheduler's choice, and a test must not depend on it.
        pub fn release_all_reversed(&self) {
            for i in (0..self.held()).rev() {
                self.release(i);
            }
        }

        pub fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
            self.0.lock().data[offset as usize..(offset + len) as usize].to_vec()
        }

        pub fn writes(&self) -> usize {
            self.0.lock().log.iter().filter(|r| !matches!(r, Req::Read { .. })).count()
        }

        pub fn reads(&self) -> usize {
            self.0.lock().log.iter().filter(|r| matches!(r, Req::Read { .. })).count()
        }

        fn apply(&self, req: &Req) -> Result<Bytes> {
            let mut g = self.0.lock();
            if g.fail_writes && !matches!(req, Req::Read { .. }) {
                return Err(crate::image::RbdError::Closed);
            }
            match req {
                Req::Read { offset, len } => {
                    Ok(Bytes::copy_from_slice(&g.data[*offset as usize..(offset + len) as usize]))
                }
                Req::Write { offset, data } => {
                    g.data[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                    Ok(Bytes::new())
                }
                Req::Discard { offset, len } => {
                    g.data[*offset as usize..(offset + len) as usize].fill(0);
                    Ok(Bytes::new())
                }
            }
        }
    }

    impl Layer for Fake {
        fn submit(&self, req: Req, done: Done) {
            let hold = {
                let mut g = self.0.lock();
                g.log.push(req.clone());
                g.hold
            };
            if hold {
                self.0.lock().held.push((req, done));
            } else {
                let r = self.apply(&req);
                done(r);
            }
        }

        fn flush(&self) -> Result<()> {
            Ok(())
        }
    }

    /// Submits and waits (the fake answers at once unless holding).
    pub fn call(l: &dyn Layer, req: Req) -> Result<Bytes> {
        let (tx, rx) = std::sync::mpsc::channel();
        l.submit(req, Box::new(move |r| drop(tx.send(r))));
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("request answered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_map_splits_replaces_and_overlays_like_a_byte_array() {
        // Goal: ExtentMap behaves as a sparse byte array. Method: random inserts (data and zeros) and range
        // removals mirrored on a Vec<Option<u8>> model; compare overlays, coverage and byte counts.
        let mut m: ExtentMap<u32> = ExtentMap::default();
        let mut model: Vec<Option<u8>> = vec![None; 256];
        let mut x: u64 = 7;
        let mut rnd = |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for step in 0..2000u32 {
            let off = rnd(200);
            let len = 1 + rnd(56);
            match rnd(3) {
                0 => {
                    let b: Vec<u8> = (0..len).map(|i| (step as u64 + i) as u8 | 1).collect();
                    m.insert(off, Seg::Data(Bytes::from(b.clone())), step);
                    for i in 0..len {
                        model[(off + i) as usize] = Some(b[i as usize]);
                    }
                }
                1 => {
                    m.insert(off, Seg::Zero(len), step);
                    for i in 0..len {
                        model[(off + i) as usize] = Some(0);
                    }
                }
                _ => {
                    m.remove_range(off, len);
                    for i in 0..len {
                        model[(off + i) as usize] = None;
                    }
                }
            }
            let mut buf = vec![0xEE; 256];
            overlay(&mut buf, 0, &m.overlapping(0, 256));
            for i in 0..256 {
                assert_eq!(buf[i], model[i].unwrap_or(0xEE), "step {step} byte {i}");
            }
            assert_eq!(m.bytes(), model.iter().filter(|b| b.is_some()).count() as u64);
            let (o, l) = (rnd(200), 1 + rnd(56));
            let full = (o..o + l).all(|i| model[i as usize].is_some());
            assert_eq!(m.covers(o, l), full);
        }
    }
}
