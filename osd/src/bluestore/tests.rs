//! BlueStore against MemStore (the oracle), with and without power cuts, on the simulated disk.
//!
//! Every test is seeded. A failing seed is printed; `BLUESTORE_SEED=N` runs that seed alone, and
//! `BLUESTORE_SEEDS=N` runs N seeds where the default run takes a few:
//!
//! ```text
//! BLUESTORE_SEEDS=500 cargo test -p osd --lib bluestore -- --nocapture
//! BLUESTORE_SEED=1234 cargo test -p osd --lib bluestore::tests::random_power_cuts
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rados::ids::{Epoch, PgId, PoolId};

use super::simdisk::{SimDisk, SplitMix64};
use super::*;
use crate::store::{MemStore, ObjectStore, PgUsage, StoreError, Transaction};

/// Longest any test waits for a commit: a stuck commit thread fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(20);

fn opts(block_bytes: u64) -> BlueStoreOptions {
    BlueStoreOptions {
        bluestore_block_size: block_bytes,
        bluestore_cache_size: 4 << 20,
        ..BlueStoreOptions::default()
    }
}

fn env_of(disk: &SimDisk) -> Arc<dyn Env> {
    Arc::new(disk.clone())
}

fn mkfs_open(disk: &SimDisk, o: &BlueStoreOptions) -> BlueStore {
    BlueStore::mkfs_in(env_of(disk), o, 0, [7; 16]).expect("mkfs");
    BlueStore::open_in(env_of(disk), o).expect("open")
}

/// The seeds to run: `BLUESTORE_SEED` alone, else `BLUESTORE_SEEDS` (or `default`) from `base`.
fn seeds(base: u64, default: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("BLUESTORE_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("BLUESTORE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    (0..n).map(|i| base + i).collect()
}

/// Runs `f` for each seed; on failure prints the seed and how to replay it.
fn for_seeds(test: &str, base: u64, default: u64, f: impl Fn(u64) -> Result<(), String>) {
    for seed in seeds(base, default) {
        if let Err(e) = f(seed) {
            panic!("{test}: seed {seed} failed: {e}\nreplay: BLUESTORE_SEED={seed} cargo test -p osd --lib bluestore::tests::{test}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Full state, compared field by field.

#[derive(Debug, PartialEq)]
struct ObjState {
    size: u64,
    version: Eversion,
    data: Vec<u8>,
    attrs: Vec<(String, Bytes)>,
    omap: Vec<(String, Vec<u8>)>,
    omap_some: Vec<(String, Vec<u8>)>,
    /// Reads at odd offsets and lengths.
    parts: Vec<Vec<u8>>,
}

#[derive(Debug, PartialEq)]
struct State {
    pgs: Vec<PgId>,
    usage: Vec<(PgId, PgUsage)>,
    objects: BTreeMap<(PgId, String), ObjState>,
    listed: Vec<(PgId, Vec<(String, Eversion)>)>,
}

fn snapshot(s: &dyn ObjectStore, pgs_to_check: &[PgId]) -> Result<State, StoreError> {
    let pgs = s.list_pgs();
    let mut objects = BTreeMap::new();
    let mut listed = Vec::new();
    for &pg in pgs_to_check {
        // Paginated with a small page, so the cursor logic is exercised.
        let mut names = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.list(pg, after.as_deref(), 3);
            if page.is_empty() {
                break;
            }
            after = Some(page.last().expect("non-empty").name.clone());
            names.extend(page.into_iter().map(|e| (e.name, e.version)));
        }
        for (name, _) in &names {
            let st = s.stat(pg, name)?;
            let data = s.read(pg, name, 0, u64::MAX)?.to_vec();
            let parts = [(4095, 8194), (st.size / 3, 70_001), (st.size.saturating_sub(5), 100), (65_535, 2)]
                .iter()
                .map(|&(off, len)| s.read(pg, name, off, len).map(|b| b.to_vec()))
                .collect::<Result<Vec<_>, _>>()?;
            let mut omap = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = s.omap_list(pg, name, after.as_deref(), 2)?;
                if page.is_empty() {
                    break;
                }
                after = Some(page.last().expect("non-empty").0.clone());
                omap.extend(page);
            }
            let keys: Vec<String> = ["k1", "k3", "k1", "zz"].iter().map(|k| k.to_string()).collect();
            objects.insert(
                (pg, name.clone()),
                ObjState {
                    size: st.size,
                    version: st.version,
                    data,
                    attrs: s.getattrs(pg, name)?,
                    omap,
                    omap_some: s.omap_get(pg, name, &keys)?,
                    parts,
                },
            );
        }
        listed.push((pg, names));
    }
    let usage = pgs_to_check.iter().map(|&pg| (pg, s.pg_usage(pg))).collect();
    Ok(State { pgs, usage, objects, listed })
}

/// The first difference between two states, in words.
fn diff(a: &State, b: &State) -> Option<String> {
    if a.pgs != b.pgs {
        return Some(format!("list_pgs {:?} vs {:?}", a.pgs, b.pgs));
    }
    if a.listed != b.listed {
        return Some(format!("listing {:?} vs {:?}", a.listed, b.listed));
    }
    for (k, x) in &a.objects {
        let y = &b.objects[k];
        if x.size != y.size || x.version != y.version {
            return Some(format!("{k:?}: size/version {}/{} vs {}/{}", x.size, x.version, y.size, y.version));
        }
        if x.data != y.data || x.parts != y.parts {
            let at = x.data.iter().zip(&y.data).position(|(p, q)| p != q);
            return Some(format!("{k:?}: data differs (first at {at:?})"));
        }
        if x.attrs != y.attrs {
            return Some(format!("{k:?}: attrs {:?} vs {:?}", x.attrs, y.attrs));
        }
        if x.omap != y.omap || x.omap_some != y.omap_some {
            return Some(format!("{k:?}: omap {:?} vs {:?}", x.omap, y.omap));
        }
    }
    if a.usage != b.usage {
        return Some(format!("pg usage {:?} vs {:?}", a.usage, b.usage));
    }
    None
}

// ---------------------------------------------------------------------------------------------------------------
// Random transactions.

fn pgs() -> Vec<PgId> {
    vec![PgId::new(PoolId(1), 0), PgId::new(PoolId(1), 5), PgId::new(PoolId(2), 3)]
}

struct Gen {
    rng: SplitMix64,
    /// Offsets stay below this, so objects stay small enough for a small device.
    span: u64,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen { rng: SplitMix64::new(seed ^ 0x5eed), span: 192 << 10 }
    }

    fn data(&mut self, len: u64) -> Bytes {
        let tag = self.rng.next_u64() as u8 | 1;
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(tag) ^ (i >> 8) as u8)
                .collect::<Vec<u8>>(),
        )
    }

    fn oid(&mut self) -> ObjectId {
        let pgs = pgs();
        let pg = pgs[(self.rng.below(10) / 4) as usize];
        ObjectId::new(pg, format!("obj{}", self.rng.below(5)))
    }

    fn txn(&mut self) -> Transaction {
        let mut t = Transaction::new();
        let n = 1 + self.rng.below(3);
        for _ in 0..n {
            let oid = self.oid();
            let r = self.rng.below(100);
            let span = self.span;
            match r {
                0..=39 => {
                    let (off, len) = match self.rng.below(4) {
                        0 => (self.rng.below(span), 1 + self.rng.below(300)),
                        1 => (self.rng.below(span / 4096) * 4096, 4096),
                        2 => (self.rng.below(3) * (64 << 10), (64 << 10) * (1 + self.rng.below(2))),
                        _ => (self.rng.below(span), 1 + self.rng.below(40 << 10)),
                    };
                    let d = self.data(len);
                    t.write(oid, off, d);
                }
                40..=47 => t.zero(oid, self.rng.below(span), self.rng.below(70 << 10)),
                48..=55 => t.truncate(oid, self.rng.below(span)),
                56..=60 => t.remove(oid),
                61..=64 => t.touch(oid),
                65..=72 => {
                    let name = ["a", "b", "_"][self.rng.below(3) as usize].to_string();
                    let len = self.rng.below(40);
                    let d = self.data(len);
                    t.setattr(oid, name, d);
                }
                73..=77 => t.rmattr(oid, ["a", "b", "_"][self.rng.below(3) as usize].to_string()),
                78..=85 => {
                    let pairs = (0..1 + self.rng.below(3))
                        .map(|_| {
                            let len = self.rng.below(20) as usize;
                            (format!("k{}", self.rng.below(6)), vec![self.rng.next_u64() as u8; len])
                        })
                        .collect();
                    t.omap_set(oid, pairs)
                }
                86..=89 => t.omap_rm(oid, vec![format!("k{}", self.rng.below(6)), "nope".into()]),
                90..=91 => t.omap_clear(oid),
                92..=98 => t.set_version(
                    oid,
                    Eversion { epoch: Epoch(1 + self.rng.below(3) as u32), v: self.rng.below(1000) },
                ),
                _ => t.remove_pg(pgs()[self.rng.below(3) as usize]),
            }
        }
        t
    }
}

/// Queues `t` on the store and applies it to the oracle; both must agree on validity. `Ok(false)` when the
/// store refused it for space (the oracle is then left alone); `Err` when the store failed.
/// `base`: transactions accepted before this store was opened (sequence numbers count from 1 per open).
fn submit(
    store: &BlueStore,
    oracle: &MemStore,
    t: &Transaction,
    accepted: &mut Vec<Transaction>,
    base: usize,
) -> Result<bool, String> {
    match store.queue(t) {
        Ok(seq) => {
            oracle.apply(t).map_err(|e| format!("the store took a transaction the oracle refused: {e}"))?;
            accepted.push(t.clone());
            if seq != (accepted.len() - base) as u64 {
                return Err(format!("seq {seq} for the {}th accepted transaction", accepted.len()));
            }
            Ok(true)
        }
        Err(StoreError::NoSpace(_)) => Ok(false),
        Err(e @ (StoreError::Io(_) | StoreError::Busy(_))) => Err(format!("store: {e}")),
        Err(e) => match oracle.apply(t) {
            Err(o) if o == e => Ok(false),
            other => Err(format!("store refused with {e}, oracle said {other:?}")),
        },
    }
}

fn check_fsck(store: &BlueStore, deep: bool) -> Result<(), String> {
    let r = store.fsck(deep).map_err(|e| format!("fsck: {e}"))?;
    if !r.is_clean() {
        return Err(format!("fsck: {:?}", r.errors));
    }
    Ok(())
}

/// The oracle fed `accepted[..k]`, for the smallest `k >= from` whose state equals `state`.
fn matching_prefix(accepted: &[Transaction], from: usize, state: &State) -> Result<usize, String> {
    let oracle = MemStore::new();
    for t in &accepted[..from] {
        oracle.apply(t).expect("accepted before");
    }
    let mut last = String::new();
    for k in from..=accepted.len() {
        if k > from {
            oracle.apply(&accepted[k - 1]).expect("accepted before");
        }
        let o = snapshot(&oracle, &pgs()).expect("memstore reads");
        match diff(&o, state) {
            None => return Ok(k),
            Some(d) => last = format!("prefix {k}: {d}"),
        }
    }
    Err(format!("no prefix in {from}..={} matches; last: {last}", accepted.len()))
}

/// One run of the workload of `seed`, in groups (paused while queued, then committed), optionally with the
/// power going at mutating IO `die_at`; then power cut, remount, and the checks. Returns the disk.
///
/// With `recovery_die`, the power also goes that many mutating IOs into the first remount (during deferred
/// replay, redb's repair, or the remount's own shutdown), and the store is remounted once more.
fn crash_run(
    seed: u64,
    sector: usize,
    txns: usize,
    die_at: Option<u64>,
    recovery_die: Option<u64>,
) -> Result<SimDisk, String> {
    let disk = SimDisk::new(sector);
    let o = BlueStoreOptions {
        bluestore_max_deferred_txc: [1, 3, 32][((seed / 2 + seed) % 3) as usize],
        bluestore_min_alloc_size: [4096, 4096, 16384, 65536][((seed / 3) % 4) as usize],
        // Checkpoints every few batches, or none before the shutdown.
        bluestore_wal_max_bytes: [16 << 10, 128 << 10, 32 << 20][((seed / 5) % 3) as usize],
        // The memtable folded into redb after every batch, now and then, or only at checkpoints.
        bluestore_memtable_max_bytes: [0, 4 << 10, 32 << 20][((seed / 7) % 3) as usize],
        ..opts(16 << 20)
    };
    let store = mkfs_open(&disk, &o);
    if let Some(io) = die_at {
        disk.die_at_io(io);
    }
    let mut gen = Gen::new(seed);
    let mut rng = SplitMix64::new(seed);
    let live = MemStore::new();
    let mut accepted = Vec::new();
    let mut acked_seen = 0;
    let notified = Arc::new(AtomicU64::new(0));
    let n2 = notified.clone();
    store.set_commit_notifier(Box::new(move |seq| {
        let before = n2.swap(seq, Ordering::SeqCst);
        assert!(seq > before, "notified seqs grow");
    }));
    let mut done = 0;
    'outer: while done < txns {
        store.pause_commits(true);
        for _ in 0..1 + rng.below(5) {
            let t = gen.txn();
            done += 1;
            match submit(&store, &live, &t, &mut accepted, 0) {
                Ok(_) => {}
                Err(e) if die_at.is_some() => {
                    let _ = e;
                    break 'outer;
                }
                Err(e) => return Err(e),
            }
        }
        store.pause_commits(false);
        match store.wait_committed(accepted.len() as u64, WAIT) {
            Ok(()) => acked_seen = store.committed(),
            Err(e) if die_at.is_some() && disk.is_dead() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
    let acked = store.committed().max(acked_seen);
    if notified.load(Ordering::SeqCst) > acked {
        return Err("notified a seq beyond committed".into());
    }
    if die_at.is_none() {
        let s = snapshot(&store, &pgs()).map_err(|e| e.to_string())?;
        let o = snapshot(&live, &pgs()).map_err(|e| e.to_string())?;
        if let Some(d) = diff(&o, &s) {
            return Err(format!("before the power cut: {d}"));
        }
    }
    drop(store);
    disk.power_cut(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if let Some(k) = recovery_die {
        disk.die_at_io(disk.io_count() + k);
        // The remount fails or succeeds depending on where the power goes; either way it goes.
        drop(BlueStore::open_in(env_of(&disk), &o));
        disk.power_cut(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    }
    let store = BlueStore::open_in(env_of(&disk), &o).map_err(|e| format!("remount: {e}"))?;
    check_fsck(&store, true)?;
    let state = snapshot(&store, &pgs()).map_err(|e| format!("read after remount: {e}"))?;
    let k = matching_prefix(&accepted, acked as usize, &state)?;
    if die_at.is_none() && k != accepted.len() {
        return Err(format!("a clean shutdown lost transactions: {k} of {}", accepted.len()));
    }
    // The store works on after recovery.
    let mut t = Transaction::new();
    t.write(ObjectId::new(pgs()[0], "after"), 5, Bytes::from_static(b"still here"));
    store.apply(&t).map_err(|e| format!("write after recovery: {e}"))?;
    check_fsck(&store, false)?;
    Ok(disk)
}

#[test]
fn power_cut_at_every_flush_keeps_a_committed_prefix() {
    // Goal: whatever the flush a power cut hits, the remounted store holds exactly the oracle fed some prefix
    // of the accepted transactions that includes every reported commit, fsck is clean and no space leaks.
    // Method: a probe run records the mutating-IO number of every flush of a seeded workload (mkfs, mount,
    // commits, shutdown); then the power goes at each flush (it fails) and right after it (it completed),
    // with torn and reordered pending writes, on 512 B and 4 KiB sectors.
    for_seeds("power_cut_at_every_flush_keeps_a_committed_prefix", 100, 2, |seed| {
        let sector = if seed % 2 == 0 { 512 } else { 4096 };
        let probe = crash_run(seed, sector, 24, None, None)?;
        let flushes = probe.flush_ios();
        // A seed replays exactly: the same IOs, so the same crash points.
        let again = crash_run(seed, sector, 24, None, None)?;
        if (again.flush_ios(), again.io_count()) != (flushes.clone(), probe.io_count()) {
            return Err("two runs of one seed did different IO".into());
        }
        for &f in &flushes {
            for die in [f, f + 1] {
                crash_run(seed, sector, 24, Some(die), None)
                    .map_err(|e| format!("power cut at io {die}: {e}"))?;
            }
        }
        Ok(())
    });
}

#[test]
fn random_power_cuts_keep_a_committed_prefix() {
    // Goal: as above, at arbitrary IOs (mid-commit, between a batch's data writes, during the in-place
    // writes of deferred batches), and again during the recovery (deferred replay at mount, redb's repair).
    // Method: per seed, a probe counts the workload's mutating IOs; then power cuts at seeded random IO
    // numbers within it, one of them followed by a second cut a few IOs into the remount.
    for_seeds("random_power_cuts_keep_a_committed_prefix", 1000, 12, |seed| {
        let sector = if seed % 3 == 0 { 4096 } else { 512 };
        let probe = crash_run(seed, sector, 40, None, None)?;
        let total = probe.io_count();
        let mut rng = SplitMix64::new(seed);
        for i in 0..3 {
            let die = 1 + rng.below(total);
            // One run in three also loses power during its recovery.
            let again = (i == 2).then(|| 1 + rng.below(12));
            crash_run(seed, sector, 40, Some(die), again)
                .map_err(|e| format!("power cut at io {die}, then {again:?} ios into the remount: {e}"))?;
        }
        Ok(())
    });
}

#[test]
fn random_transactions_match_memstore() {
    // Goal: reads see exactly what MemStore shows for the same transactions, whether queued, in flight or
    // committed, and across a clean remount. Method: seeded random transactions in random groups; while a
    // group is queued and not committed, and after it commits, the full states are compared (listing,
    // stat, whole reads, attrs, omap); a remount every 100 transactions; fsck deep at the end.
    for_seeds("random_transactions_match_memstore", 7, 3, |seed| {
        let disk = SimDisk::new(4096);
        let o = BlueStoreOptions {
            bluestore_max_deferred_txc: 1 + seed % 4,
            bluestore_min_alloc_size: [4096, 16384, 65536][(seed % 3) as usize],
            bluestore_wal_max_bytes: [8 << 10, 32 << 20][(seed % 2) as usize],
            // Reads over a memtable folded every batch, now and then, or only at checkpoints.
            bluestore_memtable_max_bytes: [0, 16 << 10, 32 << 20][((seed / 2) % 3) as usize],
            ..opts(32 << 20)
        };
        let mut store = mkfs_open(&disk, &o);
        let oracle = MemStore::new();
        let mut gen = Gen::new(seed);
        let mut rng = SplitMix64::new(seed ^ 1);
        let mut accepted = Vec::new();
        let mut base = 0;
        for round in 0..60 {
            store.pause_commits(true);
            for _ in 0..1 + rng.below(6) {
                let t = gen.txn();
                submit(&store, &oracle, &t, &mut accepted, base)?;
            }
            if round % 3 == 0 {
                let a = snapshot(&oracle, &pgs()).expect("memstore");
                let b = snapshot(&store, &pgs()).map_err(|e| e.to_string())?;
                if let Some(d) = diff(&a, &b) {
                    return Err(format!("round {round}, queued: {d}"));
                }
            }
            store.pause_commits(false);
            store.wait_committed((accepted.len() - base) as u64, WAIT).map_err(|e| e.to_string())?;
            let a = snapshot(&oracle, &pgs()).expect("memstore");
            let b = snapshot(&store, &pgs()).map_err(|e| e.to_string())?;
            if let Some(d) = diff(&a, &b) {
                return Err(format!("round {round}, committed: {d}"));
            }
            if round % 20 == 19 {
                check_fsck(&store, false)?;
                drop(store);
                store = BlueStore::open_in(env_of(&disk), &o).map_err(|e| e.to_string())?;
                base = accepted.len();
                let b = snapshot(&store, &pgs()).map_err(|e| e.to_string())?;
                if let Some(d) = diff(&a, &b) {
                    return Err(format!("round {round}, remounted: {d}"));
                }
            }
        }
        check_fsck(&store, true)
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Faults.

fn oid(name: &str) -> ObjectId {
    ObjectId::new(pgs()[0], name)
}

fn write_txn(name: &str, off: u64, data: &[u8]) -> Transaction {
    let mut t = Transaction::new();
    t.write(oid(name), off, Bytes::copy_from_slice(data));
    t
}

#[test]
fn a_flipped_bit_at_rest_is_an_error_never_data() {
    // Goal: silent corruption of stored data is caught on read (EIO) and by deep fsck, and other data still
    // reads. Method: write two objects, close cleanly, flip one bit of the first one's unit in the block file,
    // reopen, read both.
    let disk = SimDisk::new(4096);
    let o = opts(8 << 20);
    let store = mkfs_open(&disk, &o);
    store.apply(&write_txn("a", 0, &[0x11; 8192])).unwrap();
    store.apply(&write_txn("b", 0, &[0x22; 4096])).unwrap();
    drop(store);
    // "a" was the first data written: units 0 and 1.
    disk.flip_bit(BLOCK_FILE, 4096 + 100, 3);
    let store = BlueStore::open_in(env_of(&disk), &o).unwrap();
    match store.read(pgs()[0], "a", 0, 8192) {
        Err(StoreError::Io(m)) => assert!(m.contains("checksum mismatch"), "{m}"),
        other => panic!("a flipped bit must be EIO, got {other:?}"),
    }
    assert_eq!(store.read(pgs()[0], "a", 0, 4096).unwrap(), vec![0x11; 4096], "the intact block reads");
    assert_eq!(store.read(pgs()[0], "b", 0, 4096).unwrap(), vec![0x22; 4096]);
    let r = store.fsck(true).unwrap();
    assert_eq!(r.errors_total, 1, "{:?}", r.errors);
    assert!(r.errors[0].contains("checksum mismatch"));
    assert!(store.fsck(false).unwrap().is_clean(), "a shallow fsck does not read data");
}

#[test]
fn device_errors_are_reported_and_a_failed_flush_stops_the_store() {
    // Goal: EIO on read is returned as an error; EIO on a data write, a failed block flush, a failed WAL
    // write or flush and a failed metadata write or flush (at a checkpoint) each put the store in the failed
    // state, in which nothing after the failure is reported committed and every later queue() fails. Method:
    // inject each fault into a fresh store and watch: a 4 KiB write goes to the WAL only, a 64 KiB one to the
    // block file first; with a one-page WAL every batch checkpoints.
    let every_batch_checkpoints = BlueStoreOptions { bluestore_wal_max_bytes: 4096, ..opts(8 << 20) };
    for (file, what, len, o) in [
        (wal::WAL_FILE, "write", 4096, opts(8 << 20)),
        (wal::WAL_FILE, "flush", 4096, opts(8 << 20)),
        (BLOCK_FILE, "write", 64 << 10, opts(8 << 20)),
        (BLOCK_FILE, "flush", 64 << 10, opts(8 << 20)),
        (DB_FILE, "flush", 4096, every_batch_checkpoints.clone()),
        (DB_FILE, "write", 4096, every_batch_checkpoints.clone()),
    ] {
        let disk = SimDisk::new(4096);
        let store = mkfs_open(&disk, &o);
        store.apply(&write_txn("a", 0, &[1; 4096])).unwrap();
        let before = store.committed();
        match what {
            "write" => disk.fail_write(file, 1),
            _ => disk.fail_flush(file, 1),
        }
        let seq = store.queue(&write_txn("b", 0, &vec![2; len])).unwrap();
        let err = store.wait_committed(seq, WAIT).expect_err("the commit fails");
        assert!(matches!(err, StoreError::Io(_)), "{file} {what}: {err}");
        assert!(store.failed().is_some(), "{file} {what}");
        // A failed checkpoint comes after the batch's record was durable; otherwise nothing is committed.
        if file != DB_FILE {
            assert_eq!(store.committed(), before, "{file} {what}: nothing after the failure is committed");
        }
        assert!(store.queue(&write_txn("c", 0, &[3; 10])).is_err(), "{file} {what}: queue after failure");
        // Reads still serve what was queued.
        assert_eq!(store.read(pgs()[0], "b", 0, len as u64).unwrap(), vec![2; len]);
        drop(store);
        disk.power_cut(1);
        let store = BlueStore::open_in(env_of(&disk), &o).unwrap();
        assert_eq!(
            store.read(pgs()[0], "a", 0, 4096).unwrap_or_else(|e| panic!("{file} {what}: {e}")),
            vec![1; 4096],
            "{file} {what}"
        );
        check_fsck(&store, true).unwrap();
    }
    // EIO on read (of a unit written directly: a deferred one is served from memory until it is in place).
    let disk = SimDisk::new(4096);
    let store = mkfs_open(&disk, &opts(8 << 20));
    store.apply(&write_txn("a", 0, &[1; 64 << 10])).unwrap();
    disk.fail_reads(BLOCK_FILE, 0, 4096);
    assert!(matches!(store.read(pgs()[0], "a", 0, 10), Err(StoreError::Io(_))));
    disk.clear_read_faults();
    assert_eq!(store.read(pgs()[0], "a", 0, 3).unwrap(), vec![1; 3]);
}

#[test]
fn a_full_device_refuses_new_data_and_recovers_after_deletes() {
    // Goal: ENOSPC is NoSpace with nothing applied, the store stays consistent, deletes work and free space,
    // and writes resume. Method: fill a 64-unit device with 64 KiB objects until refused; check state against
    // the oracle, fsck; delete two objects; write again.
    let disk = SimDisk::new(4096);
    let o = opts(256 << 10);
    let store = mkfs_open(&disk, &o);
    let oracle = MemStore::new();
    let mut accepted = Vec::new();
    let mut n = 0;
    let refused = loop {
        let mut t = write_txn(&format!("o{n}"), 0, &[n as u8; 64 << 10]);
        t.setattr(oid(&format!("o{n}")), "x".into(), Bytes::from_static(b"y"));
        match store.queue(&t) {
            Ok(_) => {
                oracle.apply(&t).unwrap();
                accepted.push(t);
                n += 1;
            }
            Err(e) => break e,
        }
        assert!(n <= 4, "a 256 KiB device holds four 64 KiB objects");
    };
    assert!(matches!(refused, StoreError::NoSpace(_)), "{refused}");
    assert_eq!(n, 4);
    store.wait_committed(n, WAIT).unwrap();
    assert!(store.stat(pgs()[0], &format!("o{n}")).is_err(), "nothing of the refused transaction applied");
    assert_eq!(store.statfs().available, 0);
    // Overwrites in place need no new space... but are reserved conservatively: a small overwrite is refused
    // too when nothing is free. Metadata changes are not.
    let mut t = Transaction::new();
    t.setattr(oid("o0"), "z".into(), Bytes::from_static(b"1"));
    t.omap_set(oid("o0"), vec![("k".into(), b"v".to_vec())]);
    store.apply(&t).unwrap();
    oracle.apply(&t).unwrap();
    let a = snapshot(&oracle, &pgs()).unwrap();
    assert_eq!(diff(&a, &snapshot(&store, &pgs()).unwrap()), None);
    check_fsck(&store, true).unwrap();
    let mut t = Transaction::new();
    t.remove(oid("o1"));
    t.remove(oid("o2"));
    store.apply(&t).unwrap();
    oracle.apply(&t).unwrap();
    assert_eq!(store.statfs().available, 128 << 10);
    let t = write_txn("again", 0, &[9; 128 << 10]);
    store.apply(&t).unwrap();
    oracle.apply(&t).unwrap();
    assert_eq!(diff(&snapshot(&oracle, &pgs()).unwrap(), &snapshot(&store, &pgs()).unwrap()), None);
    check_fsck(&store, true).unwrap();
}

#[test]
fn mount_reads_no_objects() {
    // Goal: a clean mount does not scan the objects: what it reads does not grow with the data held. Method:
    // two stores, one with 20 objects and one with 2000 (same device); count the bytes a mount reads from the
    // simulated db and block files, less what a bare redb open of the same file reads (in debug builds redb's
    // open walks every page to check its allocator, `mark_allocated_page_for_debug`; release builds do not).
    let mount_reads = |objects: usize| -> (u64, u64) {
        let disk = SimDisk::new(4096);
        let o = opts(64 << 20);
        let store = mkfs_open(&disk, &o);
        for chunk in (0..objects).collect::<Vec<_>>().chunks(100) {
            let mut t = Transaction::new();
            for i in chunk {
                let name = format!("object-with-a-longish-name-{i}");
                t.write(ObjectId::new(pgs()[i % 3], name.clone()), 0, Bytes::from(vec![*i as u8; 4096]));
                t.omap_set(ObjectId::new(pgs()[i % 3], name), vec![("k".into(), vec![1; 100])]);
            }
            store.apply(&t).unwrap();
        }
        drop(store);
        let db0 = disk.bytes_read(DB_FILE);
        drop(
            redb::Builder::new().create_with_backend(device::RedbBackend::new(disk.device(DB_FILE))).unwrap(),
        );
        let bare = disk.bytes_read(DB_FILE) - db0;
        let (db0, block0) = (disk.bytes_read(DB_FILE), disk.bytes_read(BLOCK_FILE));
        let store = BlueStore::open_in(env_of(&disk), &o).unwrap();
        let reads = (disk.bytes_read(DB_FILE) - db0 - bare, disk.bytes_read(BLOCK_FILE) - block0);
        assert_eq!(store.pg_usage(pgs()[0]).objects, objects.div_ceil(3) as u64);
        reads
    };
    let small = mount_reads(20);
    let big = mount_reads(2000);
    assert_eq!((small.1, big.1), (0, 0), "a mount reads no data");
    // The tables a mount reads (free list, PG usage, deferred, meta) are a few pages either way; the 2000
    // onodes, blobs and omap rows are hundreds.
    assert!(
        big.0 <= small.0 + 4 * 4096,
        "mount read {} db bytes with 2000 objects, {} with 20",
        big.0,
        small.0
    );
    assert!(big.0 <= 16 * 4096, "mount read {} db bytes", big.0);
}

#[test]
fn options_are_checked_and_a_foreign_directory_is_refused() {
    // Goal: bad options and directories that are not BlueStores fail clearly. Method: try each.
    let disk = SimDisk::new(4096);
    let bad = BlueStoreOptions { bluestore_csum_type: "xxhash64".into(), ..opts(8 << 20) };
    assert!(matches!(BlueStore::mkfs_in(env_of(&disk), &bad, 0, [0; 16]), Err(BlueStoreError::Options(_))));
    let bad = BlueStoreOptions { bluestore_min_alloc_size: 3000, ..opts(8 << 20) };
    assert!(matches!(BlueStore::mkfs_in(env_of(&disk), &bad, 0, [0; 16]), Err(BlueStoreError::Options(_))));
    assert!(matches!(
        BlueStore::open_in(env_of(&disk), &opts(8 << 20)),
        Err(BlueStoreError::NotAStore { .. })
    ));
    disk.write_durable(LABEL_FILE, b"mon store, not ours").unwrap();
    assert!(matches!(
        BlueStore::open_in(env_of(&disk), &opts(8 << 20)),
        Err(BlueStoreError::NotAStore { .. })
    ));
    let disk = SimDisk::new(4096);
    drop(mkfs_open(&disk, &opts(8 << 20)));
    assert!(matches!(
        BlueStore::mkfs_in(env_of(&disk), &opts(8 << 20), 0, [0; 16]),
        Err(BlueStoreError::Exists { .. })
    ));

    // And on a real directory.
    let dir = std::env::temp_dir().join(format!("cuttle-bluestore-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(matches!(BlueStore::open(&dir, &opts(8 << 20)), Err(BlueStoreError::NotAStore { .. })));
    BlueStore::mkfs(&dir, &opts(8 << 20), 3, [1; 16]).unwrap();
    let store = BlueStore::open(&dir, &opts(8 << 20)).unwrap();
    assert_eq!((store.label().osd_id, store.label().fsid, store.label().block_bytes), (3, [1; 16], 8 << 20));
    assert!(
        matches!(BlueStore::open(&dir, &opts(8 << 20)), Err(BlueStoreError::Io { .. })),
        "a store open in another process (here: another handle) is refused"
    );
    store.apply(&write_txn("real", 3, b"on a real file")).unwrap();
    drop(store);
    let store = BlueStore::open(&dir, &opts(8 << 20)).unwrap();
    assert_eq!(&store.read(pgs()[0], "real", 0, 100).unwrap()[..], b"\0\0\0on a real file");
    assert!(store.fsck(true).unwrap().is_clean());
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn small_writes_are_deferred_and_large_ones_take_new_space() {
    // Goal: the write strategies. A small write, to a new unit or over an existing one, is deferred: its bytes
    // travel in the batch's WAL record and wait in memory to go in place (an overwrite keeps the unit's
    // place); a whole-unit write of at least bluestore_prefer_deferred_size takes new units, written directly,
    // and frees the old ones in the same commit. Method: watch statfs, the deferred writes waiting and the
    // WAL's length; remount and compare.
    let disk = SimDisk::new(4096);
    let o = BlueStoreOptions { bluestore_max_deferred_txc: 32, ..opts(8 << 20) };
    let store = mkfs_open(&disk, &o);
    let waiting = |s: &BlueStore| s.inner.deferred_cache.read().len();
    let wal_at = |s: &BlueStore| s.inner.committer.lock().wal_at;
    store.apply(&write_txn("a", 0, &[1; 128 << 10])).unwrap();
    let used = store.statfs().allocated;
    assert_eq!(used, 128 << 10);
    assert_eq!(waiting(&store), 0, "a large write is written directly");
    let after_large = wal_at(&store);
    assert!(after_large <= 8192, "the large write's record holds no data: {after_large} bytes");
    store.apply(&write_txn("a", 8192, &[2; 4096])).unwrap();
    assert_eq!(store.statfs().allocated, used, "a small overwrite takes no new space");
    assert_eq!(waiting(&store), 1);
    assert!(wal_at(&store) - after_large >= 4096, "the overwrite's bytes are in the log");
    store.apply(&write_txn("b", 0, &[4; 4096])).unwrap();
    assert_eq!(store.statfs().allocated, used + 4096, "a small write to a new unit takes one unit");
    assert_eq!(waiting(&store), 2, "and is deferred too");
    store.apply(&write_txn("a", 0, &[3; 128 << 10])).unwrap();
    assert_eq!(
        store.statfs().allocated,
        used + 4096,
        "the old units were freed when the new ones were taken"
    );
    assert_eq!(waiting(&store), 1, "the freed unit's deferred write is void");
    assert_eq!(store.read(pgs()[0], "a", 0, 128 << 10).unwrap(), vec![3; 128 << 10]);
    assert_eq!(store.read(pgs()[0], "b", 0, 4096).unwrap(), vec![4; 4096]);
    check_fsck(&store, true).unwrap();
    drop(store);
    assert_eq!(disk.files_pending(), 0, "a clean shutdown leaves nothing unflushed");
    let store = BlueStore::open_in(env_of(&disk), &o).unwrap();
    assert_eq!(waiting(&store), 0, "the shutdown's checkpoint wrote them in place");
    assert_eq!(store.read(pgs()[0], "a", 0, 128 << 10).unwrap(), vec![3; 128 << 10]);
    assert_eq!(store.read(pgs()[0], "b", 0, 4096).unwrap(), vec![4; 4096]);
    check_fsck(&store, true).unwrap();
}

#[test]
fn readers_never_see_a_torn_or_reused_unit_while_commits_run() {
    // Goal: reads concurrent with queueing and committing see whole transactions, never bytes of a unit that
    // was freed and reused, never a checksum error from racing a deferred write. Method: a writer rewrites
    // objects whole with one byte value per transaction (64 KiB objects take new units and free the old;
    // 16 KiB objects are rewritten in place through deferred writes), with commits running freely; reader
    // threads read them all the time and check that each read is one value throughout.
    let disk = SimDisk::new(4096);
    let o = BlueStoreOptions { bluestore_max_deferred_txc: 2, ..opts(8 << 20) };
    let store = Arc::new(mkfs_open(&disk, &o));
    let sizes = [64usize << 10, 16 << 10, 64 << 10, 16 << 10];
    let mut t = Transaction::new();
    for (i, &n) in sizes.iter().enumerate() {
        t.write(oid(&format!("o{i}")), 0, Bytes::from(vec![1u8; n]));
    }
    store.apply(&t).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) || reads < 100 {
                    for (i, &n) in sizes.iter().enumerate() {
                        let b = store.read(pgs()[0], &format!("o{i}"), 0, u64::MAX).expect("read");
                        assert_eq!(b.len(), n, "reader {r}: o{i} size");
                        assert!(b.iter().all(|&x| x == b[0]), "reader {r}: o{i} mixes {} and others", b[0]);
                        reads += 1;
                    }
                }
                reads
            })
        })
        .collect();
    let mut last = 0;
    for v in 2..600u32 {
        let mut t = Transaction::new();
        let i = (v as usize) % sizes.len();
        t.write(oid(&format!("o{i}")), 0, Bytes::from(vec![v as u8; sizes[i]]));
        last = store.queue(&t).unwrap();
        if v % 16 == 0 {
            store.wait_committed(last, WAIT).unwrap();
        }
    }
    store.wait_committed(last, WAIT).unwrap();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader") >= 100);
    }
    check_fsck(&store, true).unwrap();
}

#[test]
fn a_full_queue_is_busy_and_statfs_adds_up() {
    // Goal: the queue bound holds (Busy, nothing applied) and frees up with commits; statfs reports what is
    // stored. Method: a 64 KiB throttle with commits paused; then resume and queue again.
    let disk = SimDisk::new(4096);
    let o = BlueStoreOptions { bluestore_throttle_bytes: 64 << 10, ..opts(8 << 20) };
    let store = mkfs_open(&disk, &o);
    store.pause_commits(true);
    store.queue(&write_txn("a", 0, &[1; 40 << 10])).unwrap();
    let seq = store.queue(&write_txn("b", 0, &[2; 20 << 10])).unwrap();
    let mut small = Transaction::new();
    small.omap_set(oid("b"), vec![("k".into(), vec![0; 4 << 10])]);
    assert!(matches!(store.queue(&small), Err(StoreError::Busy(_))), "omap pairs count too");
    let busy = store.queue(&write_txn("c", 0, &[3; 20 << 10])).expect_err("over the bound");
    assert!(matches!(busy, StoreError::Busy(_)), "{busy}");
    assert!(store.stat(pgs()[0], "c").is_err(), "nothing of a refused transaction applied");
    store.pause_commits(false);
    store.wait_committed(seq, WAIT).unwrap();
    let seq = store.queue(&write_txn("c", 0, &[3; 20 << 10])).unwrap();
    let mut t = Transaction::new();
    t.omap_set(oid("c"), vec![("key".into(), vec![0; 10])]);
    let seq2 = store.queue(&t).unwrap();
    assert_eq!(seq2, seq + 1);
    store.wait_committed(seq2, WAIT).unwrap();
    let s = store.statfs();
    assert_eq!(s.total, 8 << 20);
    assert_eq!(s.stored, 80 << 10);
    assert_eq!(s.allocated, 80 << 10);
    assert_eq!(s.available, (8 << 20) - (80 << 10));
    assert_eq!(s.omap, 13);
    assert!(s.meta > 0);
}

#[test]
fn a_unit_is_not_released_while_a_reader_may_be_reading_it() {
    // Goal: the units a batch frees return to the allocator only when no read that may have found them in
    // the metadata is still running (else a reused unit could be read under an old checksum). Method: stall
    // a reader inside its data read of an object (the simulated disk holds block reads), rewrite the object
    // whole (new units; the old ones are freed), and check that the commit is not reported while the reader
    // is inside; release it: it reads the old bytes, whole; then the commit completes.
    let disk = SimDisk::new(4096);
    let store = Arc::new(mkfs_open(&disk, &opts(8 << 20)));
    store.apply(&write_txn("a", 0, &[1; 64 << 10])).unwrap();
    disk.hold_reads(BLOCK_FILE);
    let reader = {
        let store = store.clone();
        std::thread::spawn(move || store.read(pgs()[0], "a", 0, u64::MAX))
    };
    let deadline = std::time::Instant::now() + WAIT;
    while disk.waiting_reads() == 0 {
        assert!(std::time::Instant::now() < deadline, "the reader never reached the disk");
        std::thread::sleep(Duration::from_millis(1));
    }
    let seq = store.queue(&write_txn("a", 0, &[2; 64 << 10])).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(store.committed() < seq, "a batch that frees units waited for the reader inside them");
    disk.release_reads(BLOCK_FILE);
    let old = reader.join().unwrap().expect("the stalled read");
    assert_eq!(old, vec![1u8; 64 << 10]);
    store.wait_committed(seq, WAIT).unwrap();
    assert_eq!(store.read(pgs()[0], "a", 0, u64::MAX).unwrap(), vec![2u8; 64 << 10]);
    check_fsck(&store, true).unwrap();
}

#[test]
fn power_cut_during_deferred_replay_loses_nothing() {
    // Goal: the redo records of deferred writes survive until their replay is durable, whatever the power
    // does during the replay. Method: three committed small overwrites wait as deferred records; the power
    // goes at the block flush of the shutdown that writes them in place (so those writes tear or vanish);
    // then, for every k, the power goes again k IOs into the remount that replays them; a third mount must
    // read every committed byte.
    for sector in [512, 4096] {
        let o = BlueStoreOptions { bluestore_max_deferred_txc: 32, ..opts(8 << 20) };
        let setup = || {
            let disk = SimDisk::new(sector);
            let store = mkfs_open(&disk, &o);
            store.apply(&write_txn("a", 0, &[1; 64 << 10])).unwrap();
            for v in 2..5u8 {
                store.apply(&write_txn("a", v as u64 * 4096, &[v; 4096])).unwrap();
            }
            (disk, store)
        };
        let mut want = vec![1u8; 64 << 10];
        for v in 2..5usize {
            want[v * 4096..(v + 1) * 4096].fill(v as u8);
        }
        // Probe: the shutdown's first flush is the block flush after the in-place writes.
        let (disk, store) = setup();
        let before = disk.flush_ios().len();
        drop(store);
        let shutdown_flush = disk.flush_ios()[before];
        let mut replay_ios = 0;
        for k in 1..=40u64 {
            let (disk, store) = setup();
            disk.die_at_io(shutdown_flush);
            drop(store);
            disk.power_cut(k);
            let start = disk.io_count();
            disk.die_at_io(start + k);
            drop(BlueStore::open_in(env_of(&disk), &o));
            let reached_end = !disk.is_dead();
            disk.power_cut(k * 7919);
            let store = BlueStore::open_in(env_of(&disk), &o)
                .unwrap_or_else(|e| panic!("sector {sector}, k {k}: {e}"));
            assert_eq!(store.read(pgs()[0], "a", 0, u64::MAX).unwrap(), want, "sector {sector}, k {k}");
            check_fsck(&store, true).unwrap_or_else(|e| panic!("sector {sector}, k {k}: {e}"));
            if reached_end {
                replay_ios = k;
                break;
            }
        }
        assert!(replay_ios > 3, "the remount's replay and shutdown were cut at every IO ({replay_ios})");
    }
}

#[test]
fn replay_never_writes_a_freed_unit_that_was_reused() {
    // Goal: a deferred write whose unit a later batch freed is void at replay: the unit may hold a later
    // batch's directly written data by then. Method: a 4 KiB write to a new unit (deferred), the object's
    // removal (frees the unit), then a 64 KiB write that takes the same unit directly; the power goes before
    // any checkpoint; the remount replays all three records and must read the 64 KiB intact.
    for sector in [512, 4096] {
        let disk = SimDisk::new(sector);
        // 16 units: b's 16 must include a's.
        let o = opts(64 << 10);
        let store = mkfs_open(&disk, &o);
        store.apply(&write_txn("a", 0, &[1; 4096])).unwrap();
        let mut t = Transaction::new();
        t.remove(oid("a"));
        store.apply(&t).unwrap();
        store.apply(&write_txn("b", 0, &[2; 64 << 10])).unwrap();
        assert_eq!(store.statfs().allocated, 64 << 10, "b took the freed unit back");
        // No checkpoint: the power goes with the next IO (the shutdown's).
        disk.die_at_io(disk.io_count());
        drop(store);
        disk.power_cut(sector as u64);
        let store = BlueStore::open_in(env_of(&disk), &o).unwrap();
        assert_eq!(store.read(pgs()[0], "b", 0, u64::MAX).unwrap(), vec![2; 64 << 10], "sector {sector}");
        assert!(store.stat(pgs()[0], "a").is_err());
        check_fsck(&store, true).unwrap();
    }
}
