//! End-to-end tests of librbd's I/O layers (write-back cache, read-ahead) on a real local cluster, driven by
//! the `rbd` crate in this process.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use rbd::image::{CreateOptions, ImageOptions, Rbd};
use rbd::layers::{CacheOptions, ReadaheadOptions};

fn pattern(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

// Goal: the layers keep librbd's contract on a real cluster: writes through a write-back cache are
// readable (read-your-writes) at once and by another, uncached handle after a flush; write_fua is durable at
// once; data a flush acknowledged survives a handle that dies without closing (dirty data may be lost);
// sequential reads through read-ahead return the right bytes, also right after a write.
// Method: one 3-OSD cluster, a 16 MiB striped image; a cached handle (write-back after the first flush, a
// long max age so nothing goes down on its own) and an uncached handle compare bytes.
#[test]
fn cached_writes_reach_the_osds_exactly_at_flush_and_survive_a_crash() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("rbd-layers", 3, &[]);
    let lib = lib_open(&c.conf());
    let rbd = Rbd::new(&lib.objecter, "rbd").unwrap();
    let striped = CreateOptions { order: Some(20), stripe_unit: Some(64 << 10), stripe_count: Some(2) };
    rbd.create("cached", 16 << 20, striped).unwrap();
    let slow_cache = ImageOptions {
        cache: CacheOptions { max_dirty_age: Duration::from_secs(3600), ..Default::default() },
        readahead: ReadaheadOptions { trigger_requests: 3, ..Default::default() },
    };
    let cached = rbd.open_with("cached", slow_cache).unwrap();
    let plain = rbd.open_with("cached", ImageOptions::uncached()).unwrap();

    // Writethrough until the first flush: visible to the other handle at once.
    let a = pattern(1, 100_000);
    cached.write(12_345, a.clone()).unwrap();
    assert_eq!(plain.read(12_345, a.len() as u64).unwrap()[..], a[..]);
    assert_eq!(cached.cache_dirty_bytes(), 0);

    // Write-back after the flush: in the cache only, yet read back by the same handle.
    cached.flush().unwrap();
    let b = pattern(2, 300_000);
    cached.write(1_000_000, b.clone()).unwrap();
    assert!(cached.cache_dirty_bytes() > 0, "held in the cache");
    assert_eq!(cached.read(1_000_000, b.len() as u64).unwrap()[..], b[..], "read-your-writes");
    let merged = cached.read(900_000, 500_000).unwrap();
    assert_eq!(&merged[100_000..400_000], &b[..]);
    assert!(plain.read(1_000_000, 1000).unwrap().iter().all(|&x| x == 0), "not yet on the OSDs");
    cached.flush().unwrap();
    assert_eq!(cached.cache_dirty_bytes(), 0);
    assert_eq!(plain.read(1_000_000, b.len() as u64).unwrap()[..], b[..], "on the OSDs after flush");

    // FUA: durable when it returns.
    let f = pattern(3, 5000);
    cached.write_fua(5 << 20, f.clone()).unwrap();
    assert_eq!(plain.read(5 << 20, f.len() as u64).unwrap()[..], f[..]);

    // Many async writes, then a flush: all of them on the OSDs.
    let mut cs = Vec::new();
    for i in 0..64u64 {
        cs.push(cached.aio_write((8 << 20) + i * 4096, Bytes::from(pattern(i as u8, 4096))).unwrap());
    }
    for c in cs {
        c.wait_timeout(Duration::from_secs(20)).expect("acknowledged").unwrap();
    }
    cached.flush().unwrap();
    let got = plain.read(8 << 20, 64 * 4096).unwrap();
    for i in 0..64usize {
        assert_eq!(&got[i * 4096..(i + 1) * 4096], &pattern(i as u8, 4096)[..], "block {i}");
    }

    // Discard through the cache: zeros for both handles at once.
    cached.write(1_000_000, pattern(4, 8192)).unwrap();
    cached.discard(1_000_000, 8192).unwrap();
    assert!(cached.read(1_000_000, 8192).unwrap().iter().all(|&x| x == 0));
    cached.flush().unwrap();
    assert!(plain.read(1_000_000, 8192).unwrap().iter().all(|&x| x == 0), "no resurrected bytes");

    // Sequential reads through read-ahead, with a write landing in the prefetched window.
    let seq = pattern(5, 1 << 20);
    plain.write(10 << 20, seq.clone()).unwrap();
    let mut model = seq.clone();
    for i in 0..64u64 {
        if i == 20 {
            let w = pattern(6, 4096);
            cached.write((10 << 20) + 30 * 4096, w.clone()).unwrap();
            model[30 * 4096..31 * 4096].copy_from_slice(&w);
        }
        let got = cached.read((10 << 20) + i * 4096, 4096).unwrap();
        assert_eq!(&got[..], &model[i as usize * 4096..(i as usize + 1) * 4096], "sequential read {i}");
    }

    // Crash: flushed data survives a handle abandoned with dirty data; the dirty data may be lost.
    let durable = pattern(7, 4096);
    cached.write(2 << 20, durable.clone()).unwrap();
    cached.flush().unwrap();
    cached.write(2 << 20, pattern(8, 4096)).unwrap();
    cached.abandon();
    drop(cached);
    let fresh = rbd.open("cached").unwrap();
    assert_eq!(fresh.read(2 << 20, 4096).unwrap()[..], durable[..], "the flushed version is on the OSDs");
    drop(fresh);

    // Close flushes: dirty data written before close is on the OSDs afterwards.
    let closing = rbd.open_with("cached", slow_cache).unwrap();
    closing.flush().unwrap();
    let last = pattern(9, 4096);
    closing.write(3 << 20, last.clone()).unwrap();
    assert!(closing.cache_dirty_bytes() > 0);
    closing.close();
    assert_eq!(plain.read(3 << 20, 4096).unwrap()[..], last[..]);
    assert!(closing.read(0, 1).is_err(), "a closed handle refuses I/O");
}
