//! A deterministic simulated disk: one power domain holding several files (a store's `block`, `db` and
//! `label`), for crash and fault tests.
//!
//! Model (durability.md §6.7):
//! - Every write, and every length change, since a file's last completed flush is *pending*: reads see it
//!   (it sits in the volatile cache), a power cut may lose it.
//! - [`SimDisk::power_cut`] decides, from a seed, the fate of each pending op of each file: it vanishes, it
//!   survives whole, or (a multi-sector write) only a random subset of its sectors survives, one sector
//!   being the unit of atomicity ([`SimDisk::new`]'s `sector_bytes`, 4 KiB or 512 B). Survivors land in a
//!   random order. Ops before a completed flush of their file are durable and are never reordered with later
//!   ones.
//! - Faults: the device dies at the k-th mutating IO (that IO and everything after fail with EIO, as after a
//!   power loss the machine is gone), a chosen write or flush fails with EIO (a failed flush persists
//!   nothing), reads of a range fail with EIO, a bit flips at rest.
//!
//! Everything is a function of the calls made and the seeds given: no clock, no hash-map order.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::device::{BlockDevice, Env};

/// splitmix64: a small seeded PRNG, enough for fault schedules.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant for tests).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
}

#[derive(Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct SimFile {
    /// What survives a power cut for sure.
    durable: Vec<u8>,
    /// What reads see: `durable` with `pending` applied.
    live: Vec<u8>,
    pending: Vec<Pending>,
    bytes_read: u64,
    /// Countdowns: the n-th next write / flush of this file fails with EIO.
    fail_write_in: Option<u64>,
    fail_flush_in: Option<u64>,
    /// Reads overlapping one of these ranges fail with EIO.
    bad_ranges: Vec<(u64, u64)>,
}

fn apply(image: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => image.resize(*len as usize, 0),
    }
}

#[derive(Debug)]
struct SimState {
    files: BTreeMap<String, SimFile>,
    sector_bytes: usize,
    /// Mutating IOs (writes, flushes, length changes) so far.
    io_count: u64,
    flush_count: u64,
    /// The mutating-IO number of every flush so far.
    flush_ios: Vec<u64>,
    /// The power goes at this mutating IO (1-based, counted by `io_count`): it and all later IO fail.
    die_at_io: Option<u64>,
    dead: bool,
    /// Reads of these files wait (to stage races), and how many are waiting.
    held_reads: std::collections::BTreeSet<String>,
    waiting_reads: u64,
}

/// The simulated disk. Cheap to clone: clones share the disk.
#[derive(Clone, Debug)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
    released: Arc<Condvar>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO: {what}"))
}

impl SimDisk {
    /// An empty disk whose power cuts tear writes at `sector_bytes` (a power of two, at least 512).
    pub fn new(sector_bytes: usize) -> SimDisk {
        assert!(sector_bytes.is_power_of_two() && sector_bytes >= 512);
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                files: BTreeMap::new(),
                sector_bytes,
                io_count: 0,
                flush_count: 0,
                flush_ios: Vec::new(),
                die_at_io: None,
                dead: false,
                held_reads: Default::default(),
                waiting_reads: 0,
            })),
            released: Arc::new(Condvar::new()),
        }
    }

    /// Mutating IOs so far (writes, flushes, length changes, of every file).
    pub fn io_count(&self) -> u64 {
        self.state.lock().io_count
    }

    /// Flushes so far (of every file).
    pub fn flush_count(&self) -> u64 {
        self.state.lock().flush_count
    }

    /// The mutating-IO number (see [`SimDisk::io_count`]) of every flush so far: crash points.
    pub fn flush_ios(&self) -> Vec<u64> {
        self.state.lock().flush_ios.clone()
    }

    /// Writes and length changes, over all files, not yet made durable by a flush.
    pub fn files_pending(&self) -> usize {
        self.state.lock().files.values().map(|f| f.pending.len()).sum()
    }

    /// Bytes read from `name` so far.
    pub fn bytes_read(&self, name: &str) -> u64 {
        self.state.lock().files.get(name).map_or(0, |f| f.bytes_read)
    }

    /// The power goes at the mutating IO number `io` (as [`SimDisk::io_count`] counts): that IO and every
    /// later one fail with EIO and change nothing, until [`SimDisk::power_cut`].
    pub fn die_at_io(&self, io: u64) {
        self.state.lock().die_at_io = Some(io);
    }

    /// Whether the power is gone.
    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// The `n`-th next write to `name` (1 = the next one) fails with EIO and writes nothing.
    pub fn fail_write(&self, name: &str, n: u64) {
        self.state.lock().files.entry(name.to_string()).or_default().fail_write_in = Some(n);
    }

    /// The `n`-th next flush of `name` fails with EIO and persists nothing.
    pub fn fail_flush(&self, name: &str, n: u64) {
        self.state.lock().files.entry(name.to_string()).or_default().fail_flush_in = Some(n);
    }

    /// Reads of `name` that overlap `[from, to)` fail with EIO (a latent sector error).
    pub fn fail_reads(&self, name: &str, from: u64, to: u64) {
        self.state.lock().files.entry(name.to_string()).or_default().bad_ranges.push((from, to));
    }

    pub fn clear_read_faults(&self) {
        for f in self.state.lock().files.values_mut() {
            f.bad_ranges.clear();
        }
    }

    /// Reads of `name` wait from now until [`SimDisk::release_reads`] (to stage a race with a reader).
    pub fn hold_reads(&self, name: &str) {
        self.state.lock().held_reads.insert(name.to_string());
    }

    pub fn release_reads(&self, name: &str) {
        self.state.lock().held_reads.remove(name);
        self.released.notify_all();
    }

    /// Reads waiting because of [`SimDisk::hold_reads`].
    pub fn waiting_reads(&self) -> u64 {
        self.state.lock().waiting_reads
    }

    /// Flips one bit at rest (in the durable and the cached image).
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) {
        let mut st = self.state.lock();
        let f = st.files.get_mut(name).expect("flip_bit: no such file");
        for image in [&mut f.durable, &mut f.live] {
            if let Some(b) = image.get_mut(offset as usize) {
                *b ^= 1 << (bit % 8);
            }
        }
    }

    /// The power goes out now and comes back. Each pending op of each file vanishes, survives, or (a write of
    /// several sectors) survives in part; survivors land in an order drawn from `seed`. Then the disk works
    /// again (no fault is armed any more).
    pub fn power_cut(&self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let mut st = self.state.lock();
        let sector = st.sector_bytes;
        for f in st.files.values_mut() {
            let mut survivors: Vec<Pending> = Vec::new();
            for op in f.pending.drain(..) {
                match (op, rng.below(3)) {
                    (_, 0) => {}
                    (op, 1) => survivors.push(op),
                    (Pending::SetLen(n), _) => survivors.push(Pending::SetLen(n)),
                    (Pending::Write { offset, data }, _) => {
                        // Torn: sector by sector (sectors of the device, not of the write).
                        let mut at = 0usize;
                        while at < data.len() {
                            let abs = offset as usize + at;
                            let n = (sector - abs % sector).min(data.len() - at);
                            if rng.below(2) == 0 {
                                survivors.push(Pending::Write {
                                    offset: abs as u64,
                                    data: data[at..at + n].to_vec(),
                                });
                            }
                            at += n;
                        }
                    }
                }
            }
            for i in (1..survivors.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                survivors.swap(i, j);
            }
            for op in &survivors {
                apply(&mut f.durable, op);
            }
            f.live = f.durable.clone();
            f.fail_write_in = None;
            f.fail_flush_in = None;
            f.bad_ranges.clear();
        }
        st.dead = false;
        st.die_at_io = None;
    }

    /// Counts a mutating IO; fails it if the power is (or now goes) out.
    fn mutating_io(st: &mut SimState) -> io::Result<()> {
        if st.dead {
            return Err(eio("power lost"));
        }
        st.io_count += 1;
        if st.die_at_io.is_some_and(|k| st.io_count >= k) {
            st.dead = true;
            return Err(eio("power lost"));
        }
        Ok(())
    }

    /// A device over the file `name` of this disk.
    pub fn device(&self, name: &str) -> Arc<dyn BlockDevice> {
        self.state.lock().files.entry(name.to_string()).or_default();
        Arc::new(SimDevice { disk: self.clone(), name: name.to_string() })
    }
}

fn countdown(c: &mut Option<u64>) -> bool {
    match c {
        Some(1) => {
            *c = None;
            true
        }
        Some(n) => {
            *n -= 1;
            false
        }
        None => false,
    }
}

#[derive(Debug)]
struct SimDevice {
    disk: SimDisk,
    name: String,
}

impl SimDevice {
    fn with_file<T>(&self, f: impl FnOnce(&mut SimState) -> io::Result<T>) -> io::Result<T> {
        f(&mut self.disk.state.lock())
    }
}

impl BlockDevice for SimDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        {
            let mut st = self.disk.state.lock();
            if st.held_reads.contains(&self.name) {
                st.waiting_reads += 1;
                while st.held_reads.contains(&self.name) {
                    self.disk.released.wait(&mut st);
                }
                st.waiting_reads -= 1;
            }
        }
        self.with_file(|st| {
            if st.dead {
                return Err(eio("power lost"));
            }
            let f = st.files.get_mut(&self.name).expect("created by device()");
            let end = offset + buf.len() as u64;
            if f.bad_ranges.iter().any(|&(a, b)| offset < b && a < end) {
                return Err(eio("latent sector error"));
            }
            if end > f.live.len() as u64 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
            }
            buf.copy_from_slice(&f.live[offset as usize..end as usize]);
            f.bytes_read += buf.len() as u64;
            Ok(())
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with_file(|st| {
            SimDisk::mutating_io(st)?;
            let f = st.files.get_mut(&self.name).expect("created by device()");
            if countdown(&mut f.fail_write_in) {
                return Err(eio("write failed"));
            }
            let op = Pending::Write { offset, data: data.to_vec() };
            apply(&mut f.live, &op);
            f.pending.push(op);
            Ok(())
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.with_file(|st| {
            SimDisk::mutating_io(st)?;
            st.flush_count += 1;
            let n = st.io_count;
            st.flush_ios.push(n);
            let f = st.files.get_mut(&self.name).expect("created by device()");
            if countdown(&mut f.fail_flush_in) {
                return Err(eio("flush failed"));
            }
            for op in std::mem::take(&mut f.pending) {
                apply(&mut f.durable, &op);
            }
            debug_assert!(f.durable == f.live);
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with_file(|st| {
            if st.dead {
                return Err(eio("power lost"));
            }
            Ok(st.files[&self.name].live.len() as u64)
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with_file(|st| {
            SimDisk::mutating_io(st)?;
            let f = st.files.get_mut(&self.name).expect("created by device()");
            let op = Pending::SetLen(len);
            apply(&mut f.live, &op);
            f.pending.push(op);
            Ok(())
        })
    }
}

impl Env for SimDisk {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BlockDevice>> {
        if !create && !self.exists(name)? {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("no file {name}")));
        }
        Ok(self.device(name))
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.state.lock().files.contains_key(name))
    }

    /// Atomic and durable at once (the tmp + fsync + rename + fsync-dir sequence of a real directory).
    fn write_durable(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock();
        SimDisk::mutating_io(&mut st)?;
        let f = st.files.entry(name.to_string()).or_default();
        f.durable = data.to_vec();
        f.live = data.to_vec();
        f.pending.clear();
        Ok(())
    }

    fn read_file(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let st = self.state.lock();
        if st.dead {
            return Err(eio("power lost"));
        }
        Ok(st.files.get(name).map(|f| f.live.clone()))
    }

    fn describe(&self) -> String {
        "simulated disk".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_may_vanish_or_tear_flushed_ones_stay() {
        // Goal: the power-cut model. Method: a flushed write, then an unflushed 8-sector write; over many
        // seeds the flushed bytes always survive and the unflushed ones come back whole, torn at sector
        // boundaries, or not at all; the same seed gives the same image.
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let disk = SimDisk::new(512);
            let d = disk.device("f");
            d.write_at(0, &[1u8; 4096]).unwrap();
            d.flush().unwrap();
            d.write_at(0, &[2u8; 4096]).unwrap();
            assert_eq!(d.len().unwrap(), 4096);
            disk.power_cut(seed);
            let mut buf = vec![0u8; 4096];
            d.read_at(0, &mut buf).unwrap();
            let sectors: Vec<u8> = buf
                .chunks(512)
                .map(|s| {
                    assert!(s.iter().all(|&b| b == s[0]), "a sector is atomic");
                    s[0]
                })
                .collect();
            assert!(sectors.iter().all(|&s| s == 1 || s == 2));
            outcomes.insert(sectors.clone());
            let again = SimDisk::new(512);
            let d2 = again.device("f");
            d2.write_at(0, &[1u8; 4096]).unwrap();
            d2.flush().unwrap();
            d2.write_at(0, &[2u8; 4096]).unwrap();
            again.power_cut(seed);
            let mut buf2 = vec![0u8; 4096];
            d2.read_at(0, &mut buf2).unwrap();
            assert_eq!(buf, buf2, "seed {seed} replays");
        }
        assert!(outcomes.contains(&vec![1; 8]) && outcomes.contains(&vec![2; 8]));
        assert!(outcomes.len() > 3, "some writes tear: {outcomes:?}");
    }

    #[test]
    fn faults_fire_where_armed() {
        // Goal: the fault switches. Method: arm each and watch the next IO.
        let disk = SimDisk::new(4096);
        let d = disk.device("f");
        d.write_at(0, &[7u8; 8192]).unwrap();
        disk.fail_write("f", 1);
        assert!(d.write_at(0, &[1]).is_err());
        disk.fail_flush("f", 1);
        assert!(d.flush().is_err());
        d.flush().unwrap();
        disk.fail_reads("f", 4096, 4097);
        let mut b = [0u8; 10];
        d.read_at(0, &mut b).unwrap();
        assert!(d.read_at(4090, &mut b).is_err());
        disk.clear_read_faults();
        disk.flip_bit("f", 1, 0);
        d.read_at(0, &mut b).unwrap();
        assert_eq!(b[1], 6);
        let n = disk.io_count();
        disk.die_at_io(n + 2);
        d.write_at(0, &[1]).unwrap();
        assert!(d.write_at(0, &[1]).is_err());
        assert!(disk.is_dead() && d.flush().is_err());
    }
}
