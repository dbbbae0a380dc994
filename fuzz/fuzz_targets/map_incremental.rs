//! Goal: an incremental from the wire or the monitor's store, applied to a valid map, either is refused
//! (leaving the map unchanged) or yields a valid map; it never panics.
//! Method: decode with `Incremental::decode` (raw bytes or an edited valid encoding,
//! [`cuttle_fuzz::seeded`]); what decodes must re-encode to the same value. Apply it with `OsdMap::apply`
//! to one of the epochs of a small cluster (the first input byte picks which, and whether the incremental's
//! fsid and epoch are first set to follow it, so that apply gets past those checks). An accepted result
//! must encode, decode to itself and place every PG.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rados::map::{Incremental, OsdChange, OsdInfo, OsdMap, Pool};
use rados::{OsdId, PgId, PoolId};

use cuttle_fuzz::{addrs, place_all, seeded, small_cluster};

/// The small cluster's maps, epochs 0 to 4, and the incrementals between them.
fn history() -> &'static (Vec<OsdMap>, Vec<Incremental>) {
    static HISTORY: OnceLock<(Vec<OsdMap>, Vec<Incremental>)> = OnceLock::new();
    HISTORY.get_or_init(|| {
        let (map, mut incs) = small_cluster();
        // One more epoch that removes and creates a bit of everything.
        let mut inc = map.incremental();
        inc.removed_osds.insert(OsdId(2));
        let info = OsdInfo { addrs: Some(addrs(3)), up: true, in_: true, weight: 1, host: "host3".into() };
        inc.new_osds.insert(OsdId(7), info);
        inc.osd_changes
            .insert(OsdId(0), OsdChange { in_: Some(false), host: Some("h".into()), ..OsdChange::default() });
        inc.removed_pools.insert(PoolId(2));
        inc.new_pools.insert(
            PoolId(3),
            Pool { id: PoolId(3), name: "p3".into(), size: 1, min_size: 1, pg_num: 65_536 },
        );
        inc.old_pg_upmap_items.insert(PgId::new(PoolId(1), 3));
        inc.new_pg_upmap_items
            .insert(PgId::new(PoolId(1), 7), vec![(OsdId(0), OsdId(7)), (OsdId(1), OsdId(0))]);
        inc.old_full_osds.insert(OsdId(1));
        inc.new_full_osds.insert(OsdId(7));
        incs.push(inc);
        let mut maps = vec![OsdMap::new(cuttle_fuzz::FSID)];
        for inc in &incs {
            let mut m = maps.last().expect("starts with one").clone();
            m.apply(inc).expect("the history applies");
            maps.push(m);
        }
        (maps, incs)
    })
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        history().1.iter().map(|i| i.encode().expect("a valid incremental encodes")).collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let Ok(mut inc) = Incremental::decode(&seeded(rest, seeds())) else { return };
    let again =
        Incremental::decode(&inc.encode().expect("a decoded incremental encodes")).expect("re-decodes");
    assert_eq!(again, inc);
    let maps = &history().0;
    let map = &maps[usize::from(control >> 1) % maps.len()];
    if control & 1 == 1 {
        inc.fsid = map.fsid;
        inc.epoch = map.epoch.checked_next().expect("a small epoch");
    }
    let mut next = map.clone();
    match next.apply(&inc) {
        Ok(()) => {
            assert_eq!(next.epoch, inc.epoch);
            let bytes = next.encode().expect("an applied map is valid");
            assert_eq!(OsdMap::decode(&bytes).expect("an applied map decodes"), next);
            place_all(&next);
        }
        Err(_) => assert_eq!(&next, map, "a refused incremental leaves the map unchanged"),
    }
});
