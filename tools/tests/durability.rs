//! End-to-end durability: data written to a local cluster survives `cuttle down` and `cuttle up`, and an OSD
//! whose store fills refuses writes clearly and takes them again once space is freed.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rados::objecter::RadosError;

fn cuttle_dir(c: &Cluster, verb: &str) {
    let out = run(Command::new(cuttle_bin()).arg(verb).arg("--dir").arg(&c.dir));
    assert!(out.status.success(), "cuttle {verb}: {}{}", stdout(&out), stderr(&out));
}

// Goal: a cluster stopped and started again on the same directory brings back every object and image,
// byte-identical. Method: objects put with `rados` (small, 4 MiB, and one with attributes and omap through the
// library) and an image imported with `rbd import`; `cuttle down`, `cuttle up` (no OSD replays its WAL: the
// stop closed every store cleanly); everything read back and compared, and the cluster takes writes again.
#[test]
fn down_and_up_brings_back_every_object_and_image() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("restart", 3, &[]);
    let small = b"hello, durable world".to_vec();
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let image: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    let (small_f, big_f, image_f) = (c.dir.join("small"), c.dir.join("big"), c.dir.join("image"));
    write_file(&small_f, &small);
    write_file(&big_f, &big);
    write_file(&image_f, &image);
    for (name, f) in [("small", &small_f), ("big", &big_f)] {
        let out = c.rados(&["-p", "rbd", "put", name, f.to_str().unwrap()]);
        assert!(out.status.success(), "put {name}: {}", stderr(&out));
    }
    {
        let lib = lib_open(&c.conf());
        let io = lib.objecter.ioctx("rbd").unwrap();
        io.write_full("meta", b"m".to_vec()).unwrap();
        io.setxattr("meta", "colour", b"blue".to_vec()).unwrap();
        io.omap_set("meta", vec![("k1".into(), b"v1".to_vec()), ("k2".into(), b"v2".to_vec())]).unwrap();
    }
    rbd_ok(&c, &["import", image_f.to_str().unwrap(), "rbd/disk"]);

    cuttle_dir(&c, "down");
    cuttle_dir(&c, "up");
    // A clean stop checkpointed and closed every store: the restart replayed no WAL record.
    for osd in 0..3 {
        let log = std::fs::read_to_string(c.dir.join(format!("osd.{osd}.log"))).unwrap_or_default();
        assert!(log.contains("BlueStore mounted"), "osd.{osd} log: {log}");
        assert!(!log.contains("replayed"), "osd.{osd} replayed its WAL after a clean stop: {log}");
    }

    for (name, want) in [("small", &small), ("big", &big)] {
        let back = c.dir.join(format!("{name}.back"));
        let out = c.rados(&["-p", "rbd", "get", name, back.to_str().unwrap()]);
        assert!(out.status.success(), "get {name} after the restart: {}", stderr(&out));
        assert!(std::fs::read(&back).unwrap() == *want, "{name} differs after the restart");
    }
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    assert_eq!(io.getxattr("meta", "colour").unwrap(), b"blue".to_vec());
    assert_eq!(io.omap_get_keys("meta", "", 10).unwrap(), ["k1", "k2"]);
    let back = c.dir.join("image.back");
    rbd_ok(&c, &["export", "rbd/disk", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == image, "the image differs after the restart");
    io.write_full("after", b"new".to_vec()).unwrap();
    assert_eq!(io.read("after", 0, 0).unwrap(), b"new".to_vec());
}

// Goal: an OSD whose store fills refuses writes with a clear error (ENOSPC), the monitor says which OSD is
// full (HEALTH_ERR), reads and deletes still work, nothing crashes, and writes resume once space is freed.
// Method: three OSDs with 48 MiB block files; 1 MiB objects written until a write fails; check the error,
// health, a read, the daemons; delete half the objects; writes succeed again and health clears.
#[test]
fn a_full_osd_refuses_writes_clearly_and_takes_them_again_after_deletes() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("full", 3, &["bluestore_block_size=50331648"]);
    let lib = lib_open(&c.conf());
    let io = lib.objecter.ioctx("rbd").unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut written = 0;
    let err = loop {
        assert!(written < 200, "48 MiB OSDs took {written} MiB without refusing");
        match io.write_full(&format!("fill-{written}"), chunk.clone()) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, RadosError::NoSpace(_)), "a full OSD's error is ENOSPC, got {err:?}");
    assert!(written >= 30, "refused after only {written} MiB");
    c.wait_until("HEALTH_ERR naming the full OSDs", Duration::from_secs(30), || {
        let h = c.json(&["health"]);
        h["status"] == "HEALTH_ERR" && h.to_string().contains("OSD_FULL")
    });
    assert_eq!(io.read("fill-0", 0, 0).unwrap(), chunk, "reads still work");
    for d in ["osd.0", "osd.1", "osd.2"] {
        assert!(tools::process_alive(c.pid(d)), "{d} is still running");
    }
    for i in 0..written / 2 {
        io.remove(&format!("fill-{i}"))
            .unwrap_or_else(|e| panic!("deleting fill-{i} on a full cluster: {e}"));
    }
    c.wait_until("writes resume", Duration::from_secs(30), || {
        io.write_full("after-full", chunk.clone()).is_ok()
    });
    c.wait_until("health clears", Duration::from_secs(30), || c.json(&["health"])["status"] != "HEALTH_ERR");
    let df = c.json(&["osd", "df"]);
    assert!(df["nodes"][0]["kb"].as_u64().unwrap() == 48 << 10, "{df}");
}
