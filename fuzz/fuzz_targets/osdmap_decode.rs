//! Feeds arbitrary bytes to the cluster map decoders (`OsdMap::decode`, `Incremental::decode`): maps arrive
//! from the monitor's store and over the wire. They must never panic; whatever decodes must re-encode to
//! bytes that decode to the same value, and an incremental that decodes is applied to the map that decoded
//! (when both did) without panicking: `apply` checks it and refuses what does not fit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rados::map::{Incremental, OsdMap};

fuzz_target!(|data: &[u8]| {
    // [split byte, ...]: the first `split` bytes (of the rest) are a map, the remainder an incremental.
    let Some((&split, rest)) = data.split_first() else { return };
    let (a, b) = rest.split_at((split as usize).min(rest.len()));
    let map = OsdMap::decode(a).ok();
    if let Some(m) = &map {
        let bytes = m.encode().expect("a decoded map encodes");
        let again = OsdMap::decode(&bytes).expect("a decoded map re-encodes to a valid map");
        assert_eq!(&again, m);
    }
    for bytes in [a, b] {
        if let Ok(inc) = Incremental::decode(bytes) {
            let enc = inc.encode().expect("a decoded incremental encodes");
            let again = Incremental::decode(&enc).expect("a decoded incremental re-encodes");
            assert_eq!(again, inc);
            if let Some(m) = &map {
                let mut m = m.clone();
                let _ = m.apply(&inc);
            }
        }
    }
});
