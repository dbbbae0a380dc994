//! End-to-end tests of `rbd map` / `showmapped` / `unmap`: the NBD server process driven by real Debian NBD
//! clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and by a minimal NBD client written here, checked against
//! librbd in this process. A check whose client tool is missing is skipped with a printed reason.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use rbd::image::{ImageOptions, Rbd};

fn map(c: &Cluster, args: &[&str]) -> String {
    let mut a = vec!["map"];
    a.extend(args);
    rbd_ok(c, &a).trim().to_string()
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

fn tool(args: &[&str]) -> Output {
    let o = run(Command::new(args[0]).args(&args[1..]));
    assert!(o.status.success(), "{args:?} failed: {}{}", stdout(&o), stderr(&o));
    o
}

fn socket_of(uri: &str) -> String {
    uri.split_once("socket=").expect("a unix URI").1.to_string()
}

fn mapped_pid(c: &Cluster, image: &str) -> u32 {
    let o = rbd_ok(c, &["showmapped", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o).unwrap();
    v.as_array().unwrap().iter().find(|m| m["image"] == image).expect("mapped")["pid"].as_u64().unwrap()
        as u32
}

/// A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) over a unix socket.
struct Nbd {
    s: UnixStream,
    size: u64,
    flags: u16,
}

const REQ_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

impl Nbd {
    fn connect(path: &str, export: &str) -> Nbd {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        let mut o = Vec::new();
        o.extend_from_slice(b"IHAVEOPT");
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&(export.len() as u32).to_be_bytes());
        o.extend_from_slice(export.as_bytes());
        s.write_all(&o).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        Nbd {
            s,
            size: u64::from_be_bytes(r[..8].try_into().unwrap()),
            flags: u16::from_be_bytes([r[8], r[9]]),
        }
    }

    fn send(&mut self, ty: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> std::io::Result<()> {
        self.send_flags(ty, 0, cookie, offset, len, data)
    }

    fn send_flags(
        &mut self,
        ty: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// (cookie, error); `read_len` bytes of data follow a successful read reply.
    fn reply(&mut self, read_len: Option<usize>) -> std::io::Result<(u64, u32, Vec<u8>)> {
        self.reply_by(|_| read_len)
    }

    /// [`Nbd::reply`] for replies out of order: the data length is looked up by the reply's cookie.
    fn reply_by(&mut self, read_len: impl Fn(u64) -> Option<usize>) -> std::io::Result<(u64, u32, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), REPLY_MAGIC);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..].try_into().unwrap());
        let mut data = vec![0u8; if err == 0 { read_len(cookie).unwrap_or(0) } else { 0 }];
        self.s.read_exact(&mut data)?;
        Ok((cookie, err, data))
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.send(CMD_WRITE, 7, offset, data.len() as u32, data).unwrap();
        assert_eq!(self.reply(None).unwrap().1, 0);
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.send(CMD_READ, 8, offset, len, &[]).unwrap();
        let (_, err, d) = self.reply(Some(len as usize)).unwrap();
        assert_eq!(err, 0);
        d
    }
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// Goal: real NBD clients see the right export and move data through it exactly; NBD and librbd see the
// same bytes; bad input on one connection does not hurt another. Method: one 3-OSD cluster, images mapped
// with `rbd map` on unix sockets and TCP; nbdinfo --json flags and size; a 256 MiB random file through
// nbdcopy in and out (cmp); qemu-img convert equal to `rbd export`; qemu-io unaligned write-then-verify;
// writes through NBD read back with Image::read and the other way round; garbage bytes closed while a
// second client keeps working; read-only maps refuse writes.
#[test]
fn nbd_map_serves_real_clients() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("nbd", 3, &[]);
    let t0 = Instant::now();
    let lib = lib_open(&c.conf());
    let rbdlib = Rbd::new(&lib.objecter, "rbd").unwrap();
    const SIZE: u64 = 256 << 20;
    rbd_ok(&c, &["create", "--size", "256M", "rbd/disk"]);
    let uri = map(&c, &["rbd/disk"]);
    assert!(uri.starts_with("nbd+unix:///disk?socket="), "{uri}");
    let sock = socket_of(&uri);
    let m = rbd_ok(&c, &["showmapped"]);
    assert!(m.contains("disk") && m.contains(&uri), "{m}");

    // --- nbdinfo
    if have("nbdinfo") {
        let o = tool(&["nbdinfo", "--json", &uri]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let e = &v["exports"][0];
        assert_eq!(e["export-name"], "disk");
        assert_eq!(e["export-size"], SIZE);
        for (k, want) in [
            ("is_read_only", false),
            ("can_flush", true),
            ("can_fua", true),
            ("can_trim", true),
            ("can_zero", true),
            ("can_multi_conn", true),
        ] {
            assert_eq!(e[k], want, "nbdinfo {k}: {e}");
        }
    }

    // --- nbdcopy 256 MiB in and out
    if have("nbdcopy") {
        let src = c.dir.join("random.bin");
        write_file(&src, &pattern(42, SIZE as usize));
        let t = Instant::now();
        tool(&["nbdcopy", src.to_str().unwrap(), &uri]);
        let back = c.dir.join("back.bin");
        tool(&["nbdcopy", &uri, back.to_str().unwrap()]);
        eprintln!("nbdcopy 256 MiB in and out took {:?}", t.elapsed());
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "nbdcopy round trip differs");
        let _ = std::fs::remove_file(&back);
    }

    // --- qemu-io at unaligned offsets, then librbd sees it
    if have("qemu-io") {
        tool(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4097 12345",
            "-c",
            "read -P 0xab 4097 12345",
            &uri,
        ]);
        tool(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 4194000 9000",
            "-c",
            "read -P 0x3c 4194000 9000",
            &uri,
        ]);
        let img = rbdlib.open_with("disk", ImageOptions::uncached()).unwrap();
        assert!(
            img.read(4097, 12345).unwrap().iter().all(|&b| b == 0xab),
            "librbd does not see the NBD write"
        );
        assert!(img.read(4194000, 9000).unwrap().iter().all(|&b| b == 0x3c));
        // And the other way: librbd writes, NBD reads.
        img.write(100_000_001, vec![0x77u8; 7777]).unwrap();
        img.flush().unwrap();
        img.close();
        tool(&["qemu-io", "-f", "raw", "-c", "read -P 0x77 100000001 7777", &uri]);
    }

    // --- qemu-img convert equals rbd export
    if have("qemu-img") {
        let q = c.dir.join("q.raw");
        let e = c.dir.join("e.raw");
        tool(&["qemu-img", "convert", "-O", "raw", &uri, q.to_str().unwrap()]);
        rbd_ok(&c, &["export", "rbd/disk", e.to_str().unwrap()]);
        assert!(
            std::fs::read(&q).unwrap() == std::fs::read(&e).unwrap(),
            "qemu-img convert differs from rbd export"
        );
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&e);
    }

    // --- garbage on one connection, another keeps working
    let mut good = Nbd::connect(&sock, "disk");
    assert_eq!(good.size, SIZE);
    let mut bad = UnixStream::connect(&sock).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = bad.write_all(&pattern(7, 4096));
    let mut sink = Vec::new();
    let _ = bad.read_to_end(&mut sink); // EOF (or a reset) rather than the timeout
    assert!(sink.len() < 4096, "the server answered garbage with {} bytes", sink.len());
    // A client that completes the handshake and then sends a bad request magic is closed too.
    let mut bad2 = Nbd::connect(&sock, "disk");
    bad2.s.write_all(&[0xde; 28]).unwrap();
    let mut rest = Vec::new();
    let _ = bad2.s.read_to_end(&mut rest);
    // An out-of-range read gets an error reply, and the connection stays usable.
    good.send(CMD_READ, 1, SIZE - 10, 100, &[]).unwrap();
    assert_ne!(good.reply(None).unwrap().1, 0, "an out-of-range read must fail");
    let d = pattern(9, 70_000);
    good.write(12_345_678, &d);
    assert_eq!(good.read(12_345_678, 70_000), d);
    good.send(CMD_FLUSH, 2, 0, 0, &[]).unwrap();
    assert_eq!(good.reply(None).unwrap().1, 0);
    drop(good);

    // --- read-only over TCP
    rbd_ok(&c, &["create", "--size", "8M", "rbd/ro"]);
    let ro = map(&c, &["rbd/ro", "--port", "0", "--read-only"]);
    assert!(ro.starts_with("nbd://127.0.0.1:") && ro.ends_with("/ro"), "{ro}");
    if have("nbdinfo") {
        let v: serde_json::Value = serde_json::from_slice(&tool(&["nbdinfo", "--json", &ro]).stdout).unwrap();
        assert_eq!(v["exports"][0]["is_read_only"], true);
    }
    if have("qemu-io") {
        let o = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 512", &ro]));
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !o.status.success() || text.contains("Operation not permitted") || text.contains("read-only"),
            "{text}"
        );
        tool(&["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4096", &ro]);
    }
    let m = rbd(&c, &["map", "rbd/ro"]);
    assert!(!m.status.success() && stderr(&m).contains("already mapped"), "{}", stderr(&m));
    rbd_ok(&c, &["unmap", &ro]);
    rbd_ok(&c, &["unmap", "rbd/disk"]);
    assert_eq!(rbd_ok(&c, &["showmapped", "--format", "json"]).trim(), "[]");
    assert!(!Path::new(&sock).exists(), "unmap leaves the socket behind");
    let o = rbd(&c, &["unmap", "rbd/disk"]);
    assert!(!o.status.success() && stderr(&o).contains("not mapped"));
    eprintln!("nbd checks took {:?} (cluster up {:?})", t0.elapsed(), c.up_took);
}

// Goal: `rbd unmap` during I/O loses nothing acknowledged to a flush, and kill -9 of the map process leaves
// the image mappable and its flushed data intact. Method: our NBD client pipelines rounds of 16 x 64 KiB
// writes plus a flush; after a few rounds `rbd unmap` runs concurrently; every round whose flush was
// acknowledged must read back through librbd. Then map again, write and flush, kill -9 the server,
// showmapped cleans up, map again and read the data back through NBD; then `cuttle down`, `cuttle up`, and read
// it all back through NBD again.
#[test]
fn nbd_unmap_and_kill_keep_flushed_data() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("nbd-stop", 3, &[]);
    let t0 = Instant::now();
    rbd_ok(&c, &["create", "--size", "64M", "rbd/d"]);
    let uri = map(&c, &["rbd/d"]);
    let sock = socket_of(&uri);
    const BLOCK: usize = 64 << 10;
    const PER_ROUND: usize = 16;
    let mut cl = Nbd::connect(&sock, "d");
    let mut acked_rounds = 0usize;
    let mut unmapper = None;
    'rounds: for round in 0..(64 << 20) / (BLOCK * PER_ROUND) {
        if round == 4 {
            let (conf, run_dir) = (c.conf(), c.dir.join("run"));
            unmapper = Some(std::thread::spawn(move || {
                run(Command::new(rbd_bin())
                    .arg("--conf")
                    .arg(conf)
                    .env("CUTTLE_RBD_RUN_DIR", run_dir)
                    .args(["unmap", "rbd/d"]))
            }));
        }
        for i in 0..PER_ROUND {
            let n = round * PER_ROUND + i;
            if cl
                .send(CMD_WRITE, n as u64, (n * BLOCK) as u64, BLOCK as u32, &pattern(n as u64 + 1, BLOCK))
                .is_err()
            {
                break 'rounds;
            }
        }
        if cl.send(CMD_FLUSH, u64::MAX, 0, 0, &[]).is_err() {
            break;
        }
        for _ in 0..=PER_ROUND {
            match cl.reply(None) {
                Ok((cookie, err, _)) => {
                    if err != 0 {
                        break 'rounds;
                    }
                    if cookie == u64::MAX {
                        acked_rounds = round + 1;
                    }
                }
                Err(_) => break 'rounds,
            }
        }
    }
    let out = unmapper.expect("unmap started").join().unwrap();
    assert!(out.status.success(), "unmap: {}", stderr(&out));
    assert!(acked_rounds >= 4, "only {acked_rounds} rounds acknowledged before unmap");
    eprintln!("{acked_rounds} rounds acknowledged to a flush before the server stopped");
    {
        let lib = lib_open(&c.conf());
        let img = Rbd::new(&lib.objecter, "rbd").unwrap().open_with("d", ImageOptions::uncached()).unwrap();
        for n in 0..acked_rounds * PER_ROUND {
            let got = img.read((n * BLOCK) as u64, BLOCK as u64).unwrap();
            assert!(got[..] == pattern(n as u64 + 1, BLOCK)[..], "flushed block {n} was lost");
        }
        img.close();
    }

    // --- kill -9, then map again
    let uri = map(&c, &["rbd/d"]);
    let mut cl = Nbd::connect(&socket_of(&uri), "d");
    let d = pattern(1234, 100_000);
    cl.write(5_000_001, &d);
    cl.send(CMD_FLUSH, 3, 0, 0, &[]).unwrap();
    assert_eq!(cl.reply(None).unwrap().1, 0);
    drop(cl);
    let pid = mapped_pid(&c, "d");
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let t = Instant::now();
    while tools::process_alive(pid) {
        assert!(t.elapsed() < Duration::from_secs(10), "kill -9 did not end the server");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rbd_ok(&c, &["showmapped", "--format", "json"]).trim(), "[]", "a dead server is still listed");
    let uri = map(&c, &["rbd/d"]);
    let mut cl = Nbd::connect(&socket_of(&uri), "d");
    assert_eq!(cl.read(5_000_001, 100_000), d, "flushed data lost by kill -9");
    assert_ne!(cl.flags & 1, 0, "HAS_FLAGS");
    drop(cl);
    rbd_ok(&c, &["unmap", &uri]);

    // --- what was written through NBD survives `cuttle down` and `cuttle up`
    for verb in ["down", "up"] {
        let out = run(Command::new(cuttle_bin()).arg(verb).arg("--dir").arg(&c.dir));
        assert!(out.status.success(), "cuttle {verb}: {}", stderr(&out));
    }
    let uri = map(&c, &["rbd/d"]);
    let mut cl = Nbd::connect(&socket_of(&uri), "d");
    assert_eq!(cl.read(5_000_001, 100_000), d, "data written through NBD lost across a cluster restart");
    let overwritten = |n: usize| n * BLOCK < 5_100_001 && (n + 1) * BLOCK > 5_000_001;
    for n in (0..acked_rounds * PER_ROUND).step_by(7).filter(|&n| !overwritten(n)) {
        let got = cl.read((n * BLOCK) as u64, BLOCK as u32);
        assert!(got[..] == pattern(n as u64 + 1, BLOCK)[..], "block {n} lost across a cluster restart");
    }
    drop(cl);
    rbd_ok(&c, &["unmap", &uri]);
    eprintln!("unmap/kill/restart checks took {:?} (cluster up {:?})", t0.elapsed(), c.up_took);
}

/// Sends `reqs` (type, flags, cookie, offset, length, data) back to back from another thread while this one
/// reads the replies, as a pipelining client does; returns the replies in arrival order with their read data.
fn pipeline(cl: &mut Nbd, reqs: Vec<(u16, u16, u64, u64, u32, Vec<u8>)>) -> Vec<(u64, u32, Vec<u8>)> {
    let reads: std::collections::HashMap<u64, usize> =
        reqs.iter().filter(|r| r.0 == CMD_READ).map(|r| (r.2, r.4 as usize)).collect();
    let n = reqs.len();
    let mut w = Nbd { s: cl.s.try_clone().unwrap(), size: cl.size, flags: cl.flags };
    let sender = std::thread::spawn(move || {
        for (ty, flags, cookie, offset, len, data) in reqs {
            w.send_flags(ty, flags, cookie, offset, len, &data).unwrap();
        }
    });
    let out = (0..n).map(|_| cl.reply_by(|cookie| reads.get(&cookie).copied()).unwrap()).collect();
    sender.join().unwrap();
    out
}

const FLAG_FUA: u16 = 1;

// Goal: one connection that pipelines far past the server's limits gets every answer right, before and after
// the first flush turns the image's write-back cache on (writes start on the messenger worker before it, on
// the submit thread after it). Method: 1000 pipelined 4 KiB writes (past the 128 requests in flight a
// session takes) then 1000 reads, checked by cookie; 64 pipelined 4 MiB FUA writes (FUA flushes); 64 pipelined
// 32 MiB reads (unaligned, so 9 stripe units each: past the server's budget of 512 outstanding object ops,
// so some wait on the submit thread) checked against the FUA data; then 1000 writes and reads again, now
// through the cache.
#[test]
fn nbd_pipelines_past_its_limits_before_and_after_a_flush() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("nbd-pipe", 3, &[]);
    rbd_ok(&c, &["create", "--size", "512M", "rbd/p"]);
    let uri = map(&c, &["rbd/p"]);
    let mut cl = Nbd::connect(&socket_of(&uri), "p");
    cl.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let small = |base: u64, seed: u64| {
        let mut cl_reqs = Vec::new();
        for i in 0..1000u64 {
            cl_reqs.push((CMD_WRITE, 0, i, base + i * 4096, 4096, pattern(seed + i, 4096)));
        }
        cl_reqs
    };
    let check_small = |cl: &mut Nbd, base: u64, seed: u64| {
        for (cookie, err, _) in pipeline(cl, small(base, seed)) {
            assert_eq!(err, 0, "write {cookie}");
        }
        let reads = (0..1000u64).map(|i| (CMD_READ, 0, i, base + i * 4096, 4096, Vec::new())).collect();
        let replies = pipeline(cl, reads);
        let cookies: std::collections::BTreeSet<u64> = replies.iter().map(|r| r.0).collect();
        assert_eq!(cookies.len(), 1000, "every request answered once");
        for (cookie, err, data) in replies {
            assert_eq!(err, 0, "read {cookie}");
            assert!(data == pattern(seed + cookie, 4096), "read {cookie} returned other bytes");
        }
    };
    check_small(&mut cl, 0, 1);

    const BIG: u64 = 4 << 20;
    let fua = (0..64u64)
        .map(|i| {
            (CMD_WRITE, FLAG_FUA, 100 + i, 64 * BIG + i * BIG, BIG as u32, pattern(5000 + i, BIG as usize))
        })
        .collect();
    for (cookie, err, _) in pipeline(&mut cl, fua) {
        assert_eq!(err, 0, "FUA write {cookie}");
    }

    // Unaligned by 1234 bytes, each read touches 9 stripe units: 64 of them cost 576 > 512.
    const HUGE: u64 = 32 << 20;
    let written: Vec<u8> = (0..64u64).flat_map(|i| pattern(5000 + i, BIG as usize)).collect();
    let start = |cookie: u64| (cookie - 1000) % 7 * HUGE + 1234;
    let reads = (0..64u64)
        .map(|i| (CMD_READ, 0, 1000 + i, 64 * BIG + start(1000 + i), HUGE as u32, Vec::new()))
        .collect();
    for (cookie, err, data) in pipeline(&mut cl, reads) {
        assert_eq!(err, 0, "32 MiB read {cookie}");
        let at = start(cookie) as usize;
        assert!(data[..] == written[at..at + HUGE as usize], "32 MiB read {cookie} returned other bytes");
    }

    check_small(&mut cl, 400 << 20, 100_000);
    cl.send(CMD_FLUSH, 9, 0, 0, &[]).unwrap();
    assert_eq!(cl.reply(None).unwrap().1, 0);
    drop(cl);
    rbd_ok(&c, &["unmap", &uri]);
}

// Goal: the server side of `rbd map --device`, which this host cannot run with a kernel (no nbd module): a
// socket attached to the server is served from its first byte in the kernel's dialect (no handshake, simple
// replies), reads back what librbd wrote and the other way round, and closes on NBD_CMD_DISC.
// Method: an in-process image and server on a 3-OSD cluster; one end of a socket pair attached, the other
// driven with raw NBD requests.
#[test]
fn an_attached_socket_is_served_as_the_kernel_speaks() {
    use rbd::image::CreateOptions;
    use rbd::nbd::server::{ListenAddr, Server};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::up("nbd-attach", 3, &[]);
    let lib = lib_open(&c.conf());
    let rbd = Rbd::new(&lib.objecter, "rbd").unwrap();
    rbd.create("k", 16 << 20, CreateOptions::default()).unwrap();
    let img = Arc::new(rbd.open("k").unwrap());
    img.write(8192, pattern(1, 4096)).unwrap();
    let dir = scratch_dir("nbd-attach-sock");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("k.sock");
    let server =
        Server::bind(Arc::clone(&img), "k", &ListenAddr::Unix(sock), false, Arc::clone(&lib.pool)).unwrap();
    let flags = server.transmission_flags();
    assert_eq!(flags & 0x1, 0x1, "NBD_FLAG_HAS_FLAGS");
    assert_eq!(flags & 0x2, 0, "not read-only");
    let (mine, theirs) = UnixStream::pair().unwrap();
    let attached = server.attach(theirs).unwrap();
    assert!(attached.is_open());
    let mut cl = Nbd { s: mine, size: img.size(), flags };
    cl.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(cl.read(8192, 4096), pattern(1, 4096), "librbd's bytes, over the attached socket");
    cl.write(0, &pattern(2, 4096));
    cl.send(CMD_FLUSH, 9, 0, 0, &[]).unwrap();
    assert_eq!(cl.reply(None).unwrap(), (9, 0, vec![]));
    assert_eq!(img.read(0, 4096).unwrap(), pattern(2, 4096), "the socket's bytes, through librbd");
    cl.send(2, 10, 0, 0, &[]).unwrap(); // NBD_CMD_DISC
    let t = Instant::now();
    while attached.is_open() {
        assert!(t.elapsed() < Duration::from_secs(10), "the connection did not close after NBD_CMD_DISC");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rest = Vec::new();
    assert_eq!(cl.s.read_to_end(&mut rest).unwrap(), 0, "closed, with nothing more sent");
    let stop = AtomicBool::new(true);
    server.run(&stop).unwrap();
    img.close();
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `rbd --conf <c> ARGS` with the given run directory (shared by the clusters of one test).
fn rbd_run(c: &Cluster, run_dir: &Path, args: &[&str]) -> Output {
    run(Command::new(rbd_bin()).arg("--conf").arg(c.conf()).env("CUTTLE_RBD_RUN_DIR", run_dir).args(args))
}

/// Unmaps whatever a test left mapped in its clusters, also when it fails, then removes the run directory
/// (kept, like the clusters', when the test failed).
struct Unmapper<'a>(Vec<(&'a Cluster, &'a Path)>);

impl Drop for Unmapper<'_> {
    fn drop(&mut self) {
        for (c, dir) in &self.0 {
            let _ = rbd_run(c, dir, &["unmap", "rbd/disk"]);
        }
        if !std::thread::panicking() {
            for (_, dir) in &self.0 {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

// Goal: NBD mappings belong to their cluster. Two clusters on one machine share the run directory: each can
// map its own `rbd/disk` (no "already mapped" because the other has an image of that name), `showmapped`
// lists only the config's cluster (`--all` lists both, with their fsids), `unmap` refuses another cluster's
// mapping (by name or URI) and leaves it serving, and unmapping removes the mapping's files, its log too.
// Method: two one-OSD clusters, `rbd map`/`showmapped`/`unmap` with each cluster's --conf; the servers are
// checked alive or gone, and the run directory's files counted. No NBD client needed.
#[test]
fn nbd_mappings_belong_to_their_cluster() {
    let _g = CLUSTER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let a = Cluster::up("nbd-a", 1, &[]);
    let b = Cluster::up("nbd-b", 1, &[]);
    let run_dir = scratch_dir("nbd-run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let _unmap = Unmapper(vec![(&a, &run_dir), (&b, &run_dir)]);
    let fsid = |c: &Cluster| rados::config::Config::load(&c.conf()).unwrap().fsid;
    let (fa, fb) = (fsid(&a), fsid(&b));
    assert_ne!(fa, fb);
    let ok = |c: &Cluster, args: &[&str]| {
        let o = rbd_run(c, &run_dir, args);
        assert!(o.status.success(), "rbd {args:?}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    ok(&a, &["create", "--size", "16M", "rbd/disk"]);
    ok(&b, &["create", "--size", "16M", "rbd/disk"]);
    let uri_a = ok(&a, &["map", "rbd/disk"]).trim().to_string();
    let uri_b = ok(&b, &["map", "rbd/disk"]).trim().to_string();
    assert_ne!(uri_a, uri_b);
    let o = rbd_run(&b, &run_dir, &["map", "rbd/disk"]);
    assert!(!o.status.success() && stderr(&o).contains("already mapped"), "{}", stderr(&o));

    let listed = |c: &Cluster, all: bool| -> Vec<serde_json::Value> {
        let mut args = vec!["showmapped", "--format", "json"];
        if all {
            args.push("--all");
        }
        serde_json::from_str::<serde_json::Value>(&ok(c, &args)).unwrap().as_array().unwrap().clone()
    };
    let (la, lb) = (listed(&a, false), listed(&b, false));
    assert_eq!((la.len(), lb.len()), (1, 1), "{la:?} {lb:?}");
    assert_eq!((la[0]["fsid"].as_str(), la[0]["uri"].as_str()), (Some(fa.as_str()), Some(uri_a.as_str())));
    assert_eq!((lb[0]["fsid"].as_str(), lb[0]["uri"].as_str()), (Some(fb.as_str()), Some(uri_b.as_str())));
    let pid_a = la[0]["pid"].as_u64().unwrap() as u32;
    let pid_b = lb[0]["pid"].as_u64().unwrap() as u32;
    assert_eq!(listed(&b, true).len(), 2);
    let plain = ok(&a, &["showmapped", "--all"]);
    assert!(plain.starts_with("CLUSTER") && plain.contains(&fa) && plain.contains(&fb), "{plain}");
    let plain = ok(&a, &["showmapped"]);
    assert!(plain.contains(&uri_a) && !plain.contains(&uri_b), "{plain}");

    ok(&b, &["unmap", "rbd/disk"]);
    let t = Instant::now();
    while tools::process_alive(pid_b) {
        assert!(t.elapsed() < Duration::from_secs(30), "B's server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(tools::process_alive(pid_a), "unmapping B's image stopped A's server");
    for target in ["rbd/disk", uri_a.as_str()] {
        let o = rbd_run(&b, &run_dir, &["unmap", target]);
        assert!(!o.status.success(), "B unmapped A's {target}");
        assert!(
            stderr(&o).contains("not mapped from this cluster") && stderr(&o).contains(&fa),
            "{}",
            stderr(&o)
        );
        assert!(tools::process_alive(pid_a), "B's unmap of {target} stopped A's server");
    }
    let files = |f: &str| -> Vec<String> {
        std::fs::read_dir(&run_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(f))
            .collect()
    };
    assert!(files(&fb).is_empty(), "B's mapping left {:?}", files(&fb));
    let mut exts: Vec<String> =
        files(&fa).iter().map(|n| n.rsplit('.').next().unwrap().to_string()).collect();
    exts.sort();
    assert_eq!(exts, ["json", "log", "pid", "sock"]);
    ok(&a, &["unmap", "rbd/disk"]);
    assert!(!tools::process_alive(pid_a));
    assert!(files(&fa).is_empty(), "A's mapping left {:?}", files(&fa));
    let o = rbd_run(&a, &run_dir, &["unmap", "rbd/disk"]);
    assert!(!o.status.success() && stderr(&o).contains("rbd/disk is not mapped"), "{}", stderr(&o));
}
