//! A rough BlueStore throughput check on a real file: prefill 64 objects of 4 MiB, then 4 KiB writes from 8
//! submitters with 16 transactions in flight each: overwrites of the prefilled objects (deferred writes), then
//! new 4 KiB objects (new units); then whole-object reads.
//!
//! ```text
//! cargo run -p osd --example bluestore_bench -- /path/to/scratch/dir
//! ```
//!
//! The directory is wiped and reused. Numbers on a shared machine are noisy: compare runs side by side.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use osd::bluestore::{BlueStore, BlueStoreOptions};
use osd::store::{ObjectId, ObjectStore, StoreError, Transaction};
use rados::ids::{PgId, PoolId};

const OBJECTS: u64 = 64;
const SUBMITTERS: u64 = 8;
const OPS_PER_SUBMITTER: u64 = 3000;
const IN_FLIGHT: usize = 16;

fn main() {
    let dir =
        std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "/tmp/bluestore-bench".into()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let o = BlueStoreOptions { bluestore_block_size: 2 << 30, ..Default::default() };
    BlueStore::mkfs(&dir, &o, 0, [1; 16]).expect("mkfs");
    let s = Arc::new(BlueStore::open(&dir, &o).expect("open"));
    let pg = PgId::new(PoolId(1), 0);
    let t0 = Instant::now();
    for i in 0..OBJECTS {
        let mut t = Transaction::new();
        t.write(ObjectId::new(pg, format!("rbd_data.{i}")), 0, Bytes::from(vec![1u8; 4 << 20]));
        s.apply(&t).expect("prefill");
    }
    println!("prefill {} MiB: {:?}", OBJECTS * 4, t0.elapsed());
    for (label, fresh) in [("4 KiB overwrites", false), ("4 KiB new objects", true)] {
        let t0 = Instant::now();
        let submitters: Vec<_> = (0..SUBMITTERS)
            .map(|th| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut x = 0x1234_5678u64 ^ th;
                    let mut in_flight = VecDeque::new();
                    for i in 0..OPS_PER_SUBMITTER {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (name, off) = match fresh {
                            true => (format!("new.{th}.{i}"), 0),
                            false => (format!("rbd_data.{}", x % OBJECTS), (x >> 8) % 1024 * 4096),
                        };
                        let mut t = Transaction::new();
                        t.write(ObjectId::new(pg, name), off, Bytes::from(vec![2u8; 4096]));
                        let seq = loop {
                            match s.queue(&t) {
                                Ok(q) => break q,
                                Err(StoreError::Busy(_)) => std::thread::sleep(Duration::from_micros(100)),
                                Err(e) => panic!("queue: {e}"),
                            }
                        };
                        in_flight.push_back(seq);
                        if in_flight.len() >= IN_FLIGHT {
                            let q = in_flight.pop_front().expect("non-empty");
                            s.wait_committed(q, Duration::from_secs(30)).expect("commit");
                        }
                    }
                    while let Some(q) = in_flight.pop_front() {
                        s.wait_committed(q, Duration::from_secs(30)).expect("commit");
                    }
                })
            })
            .collect();
        for h in submitters {
            h.join().expect("submitter");
        }
        let el = t0.elapsed();
        let n = SUBMITTERS * OPS_PER_SUBMITTER;
        println!("{label}: {n} in {el:?} = {:.0} ops/s", n as f64 / el.as_secs_f64());
    }
    let t0 = Instant::now();
    let mut bytes = 0;
    for i in 0..OBJECTS {
        bytes += s.read(pg, &format!("rbd_data.{i}"), 0, u64::MAX).expect("read").len();
    }
    let el = t0.elapsed();
    println!(
        "whole-object reads: {} MiB in {el:?} = {:.0} MiB/s",
        bytes >> 20,
        (bytes >> 20) as f64 / el.as_secs_f64()
    );
    let t0 = Instant::now();
    let r = s.fsck(false).expect("fsck");
    println!("fsck: {:?}, clean: {}", t0.elapsed(), r.is_clean());
    println!("{:?}", s.statfs());
}
