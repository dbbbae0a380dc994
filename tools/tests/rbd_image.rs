//! End-to-end librbd tests: images on a real local cluster (processes on 127.0.0.1), driven by the `rbd`
//! crate in this process. One cluster serves every check to keep the run short.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use rados::objecter::{IoCtx, RadosError};
use rbd::image::{header_object, id_object, CreateOptions, Image, Rbd, RbdError, FEATURE_STRIPINGV2};
use rbd::striper;

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn assert_same(image: &Image, model: &[u8], what: &str) {
    let got = image.read(0, model.len() as u64).unwrap();
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: image differs from the model first at byte {i}");
    }
    assert_eq!(got.len(), model.len(), "{what}");
}

fn absent(io: &IoCtx, oid: &str) -> bool {
    matches!(io.stat(oid), Err(RadosError::NotFound))
}

// Goal: the whole librbd image layer works against a real cluster: create/list/info/open, striped
// unaligned I/O equal to an in-memory model (sync and async, across object boundaries), zeros for
// unwritten ranges, discard/write_zeroes, resize grow and shrink (shrink needs the flag and trims objects),
// rename, remove deleting every data object, and header updates from two handles never lost.
// Method: one 3-OSD cluster; a striped image (stripe unit 64K, count 4, 1M objects) checked against a
// Vec<u8> model after each step, object existence checked with IoCtx::stat; two handles on one image race
// resizes, and a stale handle must see the fresh header.
#[test]
fn images_behave_like_an_in_memory_disk_on_a_real_cluster() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("rbd-image", 3, &[]);
    let lib = lib_open(&c.conf());
    let t0 = Instant::now();
    let rbd = Rbd::new(&lib.objecter, "rbd").unwrap();
    let io = rbd.ioctx().clone();

    // --- create / list / info / errors
    assert!(rbd.list().unwrap().is_empty(), "a fresh pool has no images");
    let striped = CreateOptions { order: Some(20), stripe_unit: Some(64 << 10), stripe_count: Some(4) };
    let size: u64 = 8 << 20;
    rbd.create("striped", size, striped).unwrap();
    rbd.create("plain", 16 << 20, CreateOptions::default()).unwrap();
    assert_eq!(rbd.list().unwrap(), vec!["plain".to_string(), "striped".to_string()]);
    let info = rbd.info("striped").unwrap();
    assert_eq!((info.size, info.order, info.object_size), (size, 20, 1 << 20));
    assert_eq!((info.stripe_unit, info.stripe_count, info.features), (64 << 10, 4, FEATURE_STRIPINGV2));
    assert_eq!(info.num_objs, 8);
    assert_eq!(info.block_name_prefix, format!("rbd_data.{}", info.id));
    let plain = rbd.info("plain").unwrap();
    assert_eq!((plain.order, plain.stripe_unit, plain.stripe_count, plain.features), (22, 4 << 20, 1, 0));
    assert!(matches!(rbd.create("striped", 1 << 20, CreateOptions::default()), Err(RbdError::Exists(_))));
    assert!(matches!(
        rbd.create("a/b", 1 << 20, CreateOptions::default()),
        Err(RbdError::InvalidName { .. })
    ));
    let bad = CreateOptions { order: Some(11), ..Default::default() };
    assert!(matches!(rbd.create("small", 1 << 20, bad), Err(RbdError::InvalidLayout(_))));
    assert!(absent(&io, &id_object("small")), "a refused create leaves nothing behind");
    assert!(matches!(rbd.open("missing"), Err(RbdError::NoSuchImage(_))));
    assert!(matches!(Rbd::new(&lib.objecter, "nopool"), Err(RbdError::NoSuchPool(_))));

    // --- I/O against a model
    let img = rbd.open("striped").unwrap();
    let id = img.id().to_string();
    let mut model = vec![0u8; size as usize];
    assert!(img.read(12_345, 300_000).unwrap().iter().all(|b| *b == 0), "unwritten ranges read as zeros");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for _ in 0..30 {
        let len = 1 + rng.below(300_000);
        let off = rng.below(size - len);
        let data = rng.bytes(len as usize);
        img.write(off, data.clone()).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    // Async writes on disjoint ranges, all in flight at once.
    let mut pending = Vec::new();
    for i in 0..16u64 {
        let off = i * (512 << 10) + 777 + rng.below(1000);
        let n = 200_000 + rng.below(100_000) as usize;
        let data = rng.bytes(n);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        pending.push(img.aio_write(off, Bytes::from(data)).unwrap());
    }
    for p in pending {
        p.wait_timeout(Duration::from_secs(20)).expect("aio write finishes").unwrap();
    }
    assert_same(&img, &model, "after writes");
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let len = 1 + rng.below(500_000);
            let off = rng.below(size - len);
            (off, len, img.aio_read(off, len).unwrap())
        })
        .collect();
    for (off, len, c) in reads {
        let got = c.wait_timeout(Duration::from_secs(20)).expect("aio read finishes").unwrap();
        assert!(got[..] == model[off as usize..(off + len) as usize], "aio read at {off}+{len}");
    }
    assert!(matches!(img.read(size - 10, 20), Err(RbdError::OutOfRange { .. })));
    assert!(matches!(img.write(size, vec![1u8]), Err(RbdError::OutOfRange { .. })));
    assert!(matches!(img.read(u64::MAX, 2), Err(RbdError::OutOfRange { .. })));
    img.flush().unwrap();

    // --- discard / write_zeroes
    for (off, len) in [(100_001u64, 70_000u64), (1_000_000, 2_500_000)] {
        img.discard(off, len).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
    }
    img.write_zeroes(5_000_000, 33_333).unwrap();
    model[5_000_000..5_033_333].fill(0);
    assert_same(&img, &model, "after discard");
    // The second object set ([4M, 8M): objects 4..=7) discarded whole: its objects are removed.
    img.discard(4 << 20, 4 << 20).unwrap();
    model[4 << 20..].fill(0);
    for n in 4..8 {
        assert!(absent(&io, &striper::object_name(&id, n)), "object {n} removed by a whole-object discard");
    }
    assert!(!absent(&io, &striper::object_name(&id, 0)), "object 0 still holds data");
    assert_same(&img, &model, "after whole-set discard");
    // Put data back into the second set for the shrink check.
    let data = rng.bytes(3 << 20);
    img.write(4 << 20, data.clone()).unwrap();
    model[4 << 20..(7 << 20)].copy_from_slice(&data);

    // --- resize
    assert!(matches!(img.resize(1 << 20, false), Err(RbdError::ShrinkNeedsFlag { .. })));
    img.resize(12 << 20, false).unwrap();
    assert_eq!((img.size(), rbd.info("striped").unwrap().size), (12 << 20, 12 << 20));
    model.resize(12 << 20, 0);
    assert_same(&img, &model, "after growing");
    let cut: u64 = (3 << 20) + 12_345;
    img.resize(cut, true).unwrap();
    model.truncate(cut as usize);
    assert_same(&img, &model, "after shrinking");
    for n in 4..8 {
        assert!(absent(&io, &striper::object_name(&id, n)), "object {n} past the cut removed");
    }
    // Growing again must show zeros past the old cut: the straddling objects were truncated.
    img.resize(8 << 20, false).unwrap();
    model.resize(8 << 20, 0);
    assert_same(&img, &model, "after shrink then grow");

    // --- rename: the open handle keeps working, the old name is gone
    rbd.rename("striped", "renamed").unwrap();
    assert_eq!(rbd.list().unwrap(), vec!["plain".to_string(), "renamed".to_string()]);
    assert!(matches!(rbd.open("striped"), Err(RbdError::NoSuchImage(_))));
    assert!(matches!(rbd.rename("renamed", "plain"), Err(RbdError::Exists(_))));
    assert_eq!(rbd.info("renamed").unwrap().id, id);
    assert_same(&img, &model, "after rename, through the old handle");
    let again = rbd.open("renamed").unwrap();
    assert_same(&again, &model, "after rename, through a new handle");
    drop(again);

    // --- concurrent header updates on "plain"
    let h1 = Arc::new(rbd.open("plain").unwrap());
    let h2 = Arc::new(rbd.open("plain").unwrap());
    h2.resize(32 << 20, false).unwrap();
    // h1 still believes 16M; growing "to 20M" is a shrink against the fresh header and must be refused.
    assert!(
        matches!(h1.resize(20 << 20, false), Err(RbdError::ShrinkNeedsFlag { from, .. }) if from == 32 << 20)
    );
    assert_eq!(h1.size(), 32 << 20, "the refused update still refreshed the handle");
    let racer = |h: Arc<Image>, base: u64| {
        std::thread::spawn(move || {
            for i in 0..15u64 {
                h.resize(base + i * 4096, true).unwrap();
            }
            base + 14 * 4096
        })
    };
    let (a, b) = (racer(Arc::clone(&h1), 40 << 20), racer(Arc::clone(&h2), 50 << 20));
    let (last_a, last_b) = (a.join().unwrap(), b.join().unwrap());
    h1.refresh().unwrap();
    h2.refresh().unwrap();
    let fin = rbd.info("plain").unwrap().size;
    assert!(fin == last_a || fin == last_b, "final size {fin} is one writer's last");
    assert_eq!((h1.size(), h2.size()), (fin, fin));

    // --- remove deletes every data object, the header and the id object
    img.close();
    let objs: Vec<String> = (0..8).map(|n| striper::object_name(&id, n)).collect();
    assert!(objs.iter().any(|o| !absent(&io, o)), "the image has data objects before remove");
    rbd.remove("renamed").unwrap();
    for o in &objs {
        assert!(absent(&io, o), "{o} removed");
    }
    assert!(absent(&io, &header_object(&id)) && absent(&io, &id_object("renamed")));
    assert_eq!(rbd.list().unwrap(), vec!["plain".to_string()]);
    assert!(matches!(rbd.remove("renamed"), Err(RbdError::NoSuchImage(_))));
    eprintln!("rbd image checks took {:?} (cluster up {:?})", t0.elapsed(), c.up_took);
}
