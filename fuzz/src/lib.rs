//! Helpers shared by the fuzz targets.
//!
//! Raw bytes almost never decode as a postcard body, so each target also reaches its decoder through valid
//! encodings it builds itself ([`seeded`]): the fuzzer picks one and edits it, and so starts from the inside of
//! the format without a committed corpus.

/// The bytes a target decodes. Input `[mode, pick, edits...]`: an even `mode` feeds the rest of the input
/// as it is; an odd one takes `seeds[pick % len]` and applies the edits, four bytes each
/// (`[kind, at_lo, at_hi, value]`: kind % 4 = 0 xors `value` in at `at`, 1 inserts it before `at`, 2
/// removes the byte at `at`, 3 cuts the bytes from `at` on; `at` counts modulo the length).
pub fn seeded(data: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else { return Vec::new() };
    if mode & 1 == 0 || seeds.is_empty() {
        return rest.to_vec();
    }
    let Some((&pick, edits)) = rest.split_first() else { return Vec::new() };
    let mut out = seeds[usize::from(pick) % seeds.len()].clone();
    for e in edits.chunks_exact(4) {
        let at = usize::from(u16::from_le_bytes([e[1], e[2]]));
        match e[0] % 4 {
            0 if !out.is_empty() => {
                let i = at % out.len();
                out[i] ^= e[3];
            }
            1 => {
                let i = at % (out.len() + 1);
                out.insert(i, e[3]);
            }
            2 if !out.is_empty() => {
                let i = at % out.len();
                out.remove(i);
            }
            3 if !out.is_empty() => {
                let i = at % out.len();
                out.truncate(i);
            }
            _ => {}
        }
    }
    out
}

/// The postcard encoding of `value`, for seeds.
pub fn enc<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("in-memory encoding of a serde value cannot fail")
}

/// The fsid of every cluster the targets build.
pub const FSID: rados::Fsid = rados::Fsid([7; 16]);

/// The addresses of OSD `n` (IPv4 for even `n`, IPv6 for odd ones, so seeds cover both encodings).
pub fn addrs(n: u8) -> rados::map::OsdAddrs {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let ip = match n % 2 {
        0 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
        _ => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n))),
    };
    let at = |port: u16| SocketAddr::new(ip, port);
    rados::map::OsdAddrs { public: at(6800), cluster: at(6801), hb_front: at(6802), hb_back: at(6803) }
}

/// A small valid map and the incrementals that built it from the empty map: three OSDs on two hosts (two
/// up, one of them full), a pool of 8 PGs and one of 3, and an upmap exception.
pub fn small_cluster() -> (rados::map::OsdMap, Vec<rados::map::Incremental>) {
    use rados::map::{OsdChange, OsdInfo, OsdMap, Pool, WEIGHT_ONE};
    use rados::{OsdId, PgId, PoolId};

    let mut map = OsdMap::new(FSID);
    let mut incs = Vec::new();
    let mut step = |map: &mut OsdMap, f: &dyn Fn(&mut rados::map::Incremental)| {
        let mut inc = map.incremental();
        f(&mut inc);
        map.apply(&inc).expect("the small cluster's incrementals apply");
        incs.push(inc);
    };
    step(&mut map, &|inc| {
        for i in 0..3u8 {
            let host = format!("host{}", i % 2);
            let info = OsdInfo { addrs: None, up: false, in_: true, weight: WEIGHT_ONE, host };
            inc.new_osds.insert(OsdId(u32::from(i)), info);
        }
        inc.new_pools
            .insert(PoolId(1), Pool { id: PoolId(1), name: "rbd".into(), size: 2, min_size: 1, pg_num: 8 });
    });
    step(&mut map, &|inc| {
        for i in 0..2u8 {
            let change = OsdChange { up: Some(true), addrs: Some(addrs(i)), ..OsdChange::default() };
            inc.osd_changes.insert(OsdId(u32::from(i)), change);
        }
        inc.new_pools
            .insert(PoolId(2), Pool { id: PoolId(2), name: "p2".into(), size: 3, min_size: 2, pg_num: 3 });
    });
    step(&mut map, &|inc| {
        inc.new_pg_upmap_items.insert(PgId::new(PoolId(1), 3), vec![(OsdId(0), OsdId(2))]);
        inc.osd_changes.insert(OsdId(2), OsdChange { weight: Some(WEIGHT_ONE / 2), ..OsdChange::default() });
        inc.new_full_osds.insert(OsdId(1));
    });
    (map, incs)
}

/// Places every PG of every pool of `map`, as clients and OSDs do with each new map.
pub fn place_all(map: &rados::map::OsdMap) {
    let placement = rados::placement::Placement::new(map);
    for pool in map.pools.values() {
        for seed in 0..pool.pg_num.min(64) {
            let pg = rados::PgId::new(pool.id, seed);
            let ua = placement.up_acting(pg).expect("a PG of the map places");
            assert!(ua.acting.len() <= usize::from(pool.size));
        }
        let pg = rados::placement::object_to_pg(pool, b"rbd_header.1");
        assert!(map.pg_exists(pg));
    }
}

/// A MemStore holding a few objects of PG 1.0 (`obj`: data in two chunks with a hole between, attributes,
/// omap; `empty`: no data) and one of PG 1.1.
pub fn populated_store() -> osd::store::MemStore {
    use osd::store::{Eversion, MemStore, ObjectId, ObjectStore, Transaction};
    use rados::{Epoch, PgId, PoolId};

    let store = MemStore::new();
    let pg = PgId::new(PoolId(1), 0);
    let obj = ObjectId::new(pg, "obj");
    let mut t = Transaction::new();
    t.write(obj.clone(), 0, bytes::Bytes::from(vec![1u8; 100]));
    t.write(obj.clone(), 70_000, bytes::Bytes::from(vec![2u8; 50]));
    t.setattr(obj.clone(), "_".into(), bytes::Bytes::from_static(b"attr"));
    t.omap_set(obj.clone(), vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]);
    t.set_version(obj, Eversion { epoch: Epoch(2), v: 5 });
    t.touch(ObjectId::new(pg, "empty"));
    t.write(ObjectId::new(PgId::new(PoolId(1), 1), "other"), 10, bytes::Bytes::from_static(b"xyz"));
    store.apply(&t).expect("the seed transaction applies");
    store
}

/// `n` bytes of a recognisable pattern, for data segments.
pub fn pattern(n: usize) -> bytes::Bytes {
    (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}

/// Everything `store` holds that a client or a peer can see, with at most the first 256 KiB of each object's
/// data: to compare a store before and after a refused transaction, and to check that each object reads
/// back at its size and that PG usage adds up.
pub fn snapshot(store: &osd::store::MemStore) -> Vec<String> {
    use osd::store::ObjectStore;
    let mut out = Vec::new();
    for pg in store.list_pgs() {
        let mut bytes = 0u128;
        let objects = store.list(pg, None, usize::MAX);
        for e in &objects {
            let st = store.stat(pg, &e.name).expect("a listed object exists");
            assert_eq!(st.version, e.version);
            bytes += u128::from(st.size);
            let n = st.size.min(256 << 10);
            let data = store.read(pg, &e.name, 0, n).expect("a listed object reads");
            assert_eq!(data.len() as u64, n, "an object reads back at its size");
            let parts = store.read_parts(pg, &e.name, 0, n).expect("a listed object reads");
            assert_eq!(parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u8>>(), data.to_vec());
            let attrs = store.getattrs(pg, &e.name).expect("a listed object has attributes");
            let omap = store.omap_list(pg, &e.name, None, usize::MAX).expect("a listed object has an omap");
            out.push(format!("{pg} {:?} {st:?} {:08x} {attrs:?} {omap:?}", e.name, crc32c::crc32c(&data)));
        }
        let usage = store.pg_usage(pg);
        assert_eq!(usage.objects, objects.len() as u64);
        assert_eq!(u128::from(usage.bytes), bytes.min(u128::from(u64::MAX)), "PG usage adds up (saturating)");
    }
    out
}
