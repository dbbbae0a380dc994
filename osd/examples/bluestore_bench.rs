use bytes::Bytes;
use osd::bluestore::*;
use osd::store::*;
use rados::ids::{PgId, PoolId};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("/tmp/bsbench".into()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let o = BlueStoreOptions { bluestore_block_size: 2 << 30, ..Default::default() };
    BlueStore::mkfs(&dir, &o, 0, [1; 16]).unwrap();
    let s = Arc::new(BlueStore::open(&dir, &o).unwrap());
    let pg = PgId::new(PoolId(1), 0);
    let objs = 64u64;
    let t0 = Instant::now();
    for i in 0..objs {
        let mut t = Transaction::new();
        t.write(ObjectId::new(pg, format!("rbd_data.{i}")), 0, Bytes::from(vec![1u8; 4 << 20]));
        s.apply(&t).unwrap();
    }
    println!("prefill 256 MiB: {:?}", t0.elapsed());
    for (label, fresh) in [("overwrite 4k", false), ("new objects 4k", true)] {
        let threads = 8;
        let per = 3000u64;
        let t0 = Instant::now();
        let hs: Vec<_> = (0..threads)
            .map(|th| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut x = 0x1234_5678u64 ^ th;
                    let mut inflight = std::collections::VecDeque::new();
                    for i in 0..per {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let mut t = Transaction::new();
                        let name =
                            if fresh { format!("new.{th}.{i}") } else { format!("rbd_data.{}", x % objs) };
                        let off = if fresh { 0 } else { (x >> 8) % 1024 * 4096 };
                        t.write(ObjectId::new(pg, name), off, Bytes::from(vec![2u8; 4096]));
                        let seq = loop {
                            match s.queue(&t) {
                                Ok(q) => break q,
                                Err(StoreError::Busy(_)) => std::thread::sleep(Duration::from_micros(100)),
                                Err(e) => panic!("{e}"),
                            }
                        };
                        inflight.push_back(seq);
                        if inflight.len() >= 16 {
                            let q = inflight.pop_front().unwrap();
                            s.wait_committed(q, Duration::from_secs(30)).unwrap();
                        }
                    }
                    while let Some(q) = inflight.pop_front() {
                        s.wait_committed(q, Duration::from_secs(30)).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let el = t0.elapsed();
        let n = threads * per;
        println!("{label}: {n} ops in {el:?} = {:.0} ops/s", n as f64 / el.as_secs_f64());
    }
    let t0 = Instant::now();
    let r = s.fsck(false).unwrap();
    println!("fsck {:?} clean={} {:?}", t0.elapsed(), r.is_clean(), r.errors.first());
    println!("{:?}", s.statfs());
}
