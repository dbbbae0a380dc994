//! End-to-end tests of the `rbd` command line on a real local cluster.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn fails(c: &Cluster, args: &[&str], needle: &str) {
    let o = rbd(c, args);
    assert!(!o.status.success(), "rbd {args:?} should fail; printed {}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains(needle), "rbd {args:?}: expected {needle:?} in the error, got {e:?}");
}

fn json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let s = rbd_ok(c, &a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("rbd {args:?} printed bad JSON ({e}): {s}"))
}

/// A file with data, holes and a zero tail: 1 MiB of pattern, 5 MiB of hole, 300 KiB of pattern at an
/// unaligned offset, a hole to 9 MiB + 123 bytes.
fn holey_file(p: &Path) -> u64 {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(p).unwrap();
    let a: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 1) as u8).collect();
    f.write_all(&a).unwrap();
    f.seek(SeekFrom::Start((6 << 20) + 4097)).unwrap();
    let b: Vec<u8> = (0..300u32 << 10).map(|i| (i * 13 + 5) as u8 | 1).collect();
    f.write_all(&b).unwrap();
    let len = (9 << 20) + 123;
    f.set_len(len).unwrap();
    len
}

// Goal: every image command works through the CLI and mistakes fail clearly. Method: one 3-OSD cluster;
// create/ls/info/resize/rename/rm checked through --format json; a holey file imported, exported (to a
// file and to stdout) and compared byte for byte; du counts only written objects; bench prints the JSON
// keys; bad sizes, missing pools and images, existing images and shrinking without the flag all fail.
#[test]
fn rbd_cli_manages_images_on_a_real_cluster() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("rbd-cli", 3, &[]);
    let t0 = std::time::Instant::now();

    // --- create / ls / info
    rbd_ok(&c, &["create", "--size", "10G", "rbd/big"]);
    rbd_ok(
        &c,
        &[
            "create",
            "--size",
            "64M",
            "--object-size",
            "1M",
            "--stripe-unit",
            "64K",
            "--stripe-count",
            "4",
            "s",
        ],
    );
    assert_eq!(json(&c, &["ls"]), serde_json::json!(["big", "s"]));
    assert_eq!(rbd_ok(&c, &["ls", "rbd"]), "big\ns\n");
    let i = json(&c, &["info", "rbd/big"]);
    assert_eq!(i["size"], 10u64 << 30);
    assert_eq!(i["object_size"], 4 << 20);
    assert_eq!(i["objects"], 2560);
    let i = json(&c, &["info", "s"]);
    assert_eq!((i["stripe_unit"].as_u64(), i["stripe_count"].as_u64()), (Some(64 << 10), Some(4)));
    assert_eq!(i["order"], 20);
    assert!(rbd_ok(&c, &["info", "rbd/s"]).contains("stripe count: 4"));

    // --- mistakes
    fails(&c, &["create", "--size", "10X", "rbd/x"], "invalid --size");
    fails(&c, &["create", "--size", "1G", "rbd/big"], "already exists");
    fails(&c, &["create", "--size", "1G", "nopool/x"], "no such pool");
    fails(&c, &["info", "rbd/missing"], "no such image");
    fails(&c, &["ls", "nopool"], "no such pool");
    fails(&c, &["rm", "rbd/missing"], "no such image");
    fails(&c, &["create", "--size", "1G", "--object-size", "3M", "rbd/x"], "power of two");
    fails(&c, &["resize", "--size", "1G", "rbd/big"], "allow-shrink");
    fails(&c, &["map", "--device", "/dev/sda", "rbd/big"], "expected /dev/nbdN");
    if std::path::Path::new("/sys/module/nbd").exists() {
        eprintln!("SKIPPED: this host has the nbd driver, so `rbd map --device` would attach a device");
    } else {
        // No driver: said at once, by name, with nothing left running or recorded.
        fails(&c, &["map", "--device", "/dev/nbd0", "rbd/big"], "modprobe nbd");
        fails(&c, &["map", "--device", "auto", "rbd/big"], "no generic netlink family \"nbd\"");
        assert_eq!(json(&c, &["showmapped"]), serde_json::json!([]));
        fails(&c, &["unmap", "/dev/nbd3"], "modprobe nbd");
    }

    // --- resize / rename / rm
    rbd_ok(&c, &["resize", "--size", "20G", "rbd/big"]);
    assert_eq!(json(&c, &["info", "rbd/big"])["size"], 20u64 << 30);
    rbd_ok(&c, &["resize", "--size", "1G", "--allow-shrink", "rbd/big"]);
    assert_eq!(json(&c, &["info", "rbd/big"])["size"], 1u64 << 30);
    rbd_ok(&c, &["rename", "rbd/big", "rbd/small"]);
    assert_eq!(json(&c, &["ls"]), serde_json::json!(["s", "small"]));
    rbd_ok(&c, &["rm", "rbd/small"]);
    assert_eq!(json(&c, &["ls"]), serde_json::json!(["s"]));

    // --- import / export with holes, du
    let src = c.dir.join("holey.bin");
    let len = holey_file(&src);
    rbd_ok(&c, &["import", src.to_str().unwrap(), "rbd/img"]);
    assert_eq!(json(&c, &["info", "rbd/img"])["size"], len);
    let dst = c.dir.join("out.bin");
    rbd_ok(&c, &["export", "rbd/img", dst.to_str().unwrap()]);
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert!(a == b, "export differs from the imported file");
    // The hole in the middle stayed a hole in the exported file.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(blocks < 3 << 20, "export allocated {blocks} bytes for 1.3 MiB of data");
    let o = rbd(&c, &["export", "rbd/img", "-"]);
    assert!(o.status.success() && o.stdout == a, "export to stdout differs");
    let du = json(&c, &["du", "rbd/img"]);
    let used = du["images"][0]["used_size"].as_u64().unwrap();
    assert_eq!(du["images"][0]["provisioned_size"], len);
    // Objects 0 (1 MiB of data) and 1 (4097 + 300 KiB into it): zero blocks were never written.
    assert!(used > (1 << 20) && used <= 8 << 20, "used {used}");
    // Stdin import grows the image as data arrives.
    let o = run(Command::new("sh").arg("-c").arg(format!(
        "{} --conf {} import - rbd/fromstdin < {}",
        rbd_bin(),
        c.conf().display(),
        src.display()
    )));
    assert!(o.status.success(), "{}", stderr(&o));
    let dst2 = c.dir.join("out2.bin");
    rbd_ok(&c, &["export", "rbd/fromstdin", dst2.to_str().unwrap()]);
    assert!(std::fs::read(&dst2).unwrap() == a, "stdin import differs");

    // --- bench
    let b = json(
        &c,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-threads",
            "8",
            "--io-total",
            "2M",
            "--io-pattern",
            "rand",
            "rbd/s",
        ],
    );
    for k in ["ops_per_s", "bytes_per_s", "lat_us_avg", "lat_us_p99"] {
        assert!(b[k].as_f64().is_some_and(|v| v > 0.0), "bench JSON lacks {k}: {b}");
    }
    assert_eq!(b["ops"], 512);
    assert_eq!(b["rbd_cache"], true, "the cache is on by default: {b}");
    // The rbd_* options reach the image: the same bench with rbd_cache = false in the config runs uncached,
    // and an inconsistent cache config is refused before any I/O.
    let uncached = c.dir.join("uncached.toml");
    let conf = std::fs::read_to_string(c.conf()).unwrap();
    std::fs::write(&uncached, format!("{conf}\nrbd_cache = false\nobjecter_inflight_ops = 8\n")).unwrap();
    let o = run(Command::new(rbd_bin()).arg("--conf").arg(&uncached).args([
        "bench",
        "--io-type",
        "write",
        "--io-total",
        "64K",
        "--format",
        "json",
        "rbd/s",
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let u: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((u["rbd_cache"].as_bool(), u["queue_depth"].as_u64()), (Some(false), Some(8)), "{u}");
    let bad = c.dir.join("bad-cache.toml");
    std::fs::write(&bad, format!("{conf}\nrbd_cache_max_dirty = 1000\nrbd_cache_size = 10\n")).unwrap();
    let o =
        run(Command::new(rbd_bin()).arg("--conf").arg(&bad).args(["bench", "--io-type", "read", "rbd/s"]));
    assert!(!o.status.success() && stderr(&o).contains("rbd_cache_max_dirty"), "{}", stderr(&o));
    let plain = rbd_ok(&c, &["bench", "--io-type", "readwrite", "--io-total", "1M", "rbd/s"]);
    assert!(plain.contains("SEC       OPS   OPS/SEC   BYTES/SEC") && plain.contains("ops/sec:"), "{plain}");
    fails(&c, &["bench", "--io-type", "read", "--io-size", "0", "rbd/s"], "io-size");
    eprintln!("rbd cli checks took {:?} (cluster up {:?})", t0.elapsed(), c.up_took);
}
