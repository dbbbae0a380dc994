//! Goal: no transaction a peer sends makes an OSD's store panic, break its invariants, or half-apply.
//! Method: decode a list of `TxOp`s with postcard (as the ops of a replicated write arrive), split a data
//! segment among them with `Transaction::from_wire`, and apply the transaction to a MemStore (fresh, or
//! holding a few objects). The ops are raw bytes or an edited valid encoding ([`cuttle_fuzz::seeded`]).
//! Applied or refused, the store must then read back consistently ([`cuttle_fuzz::snapshot`]); refused, it
//! must be exactly as before.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use messenger::crc::CrcBytes;
use osd::store::{Eversion, MemStore, ObjectId, ObjectStore, Transaction, TxOp};
use rados::{Epoch, PgId, PoolId};

use cuttle_fuzz::{enc, pattern, populated_store, seeded, snapshot};

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let pg = PgId::new(PoolId(1), 0);
        let obj = ObjectId::new(pg, "obj");
        let new = ObjectId::new(pg, "new");
        let mut txns = Vec::new();
        let mut t = Transaction::new();
        t.write(new.clone(), 4, pattern(16));
        t.setattr(new.clone(), "_".into(), pattern(3));
        t.set_version(new.clone(), Eversion { epoch: Epoch(3), v: 6 });
        txns.push(t);
        let mut t = Transaction::new();
        t.zero(obj.clone(), 50, 70_000);
        t.truncate(obj.clone(), 65_600);
        t.write(obj.clone(), 65_530, pattern(12));
        t.rmattr(obj.clone(), "_".into());
        txns.push(t);
        let mut t = Transaction::new();
        t.omap_set(obj.clone(), vec![("c".into(), b"3".to_vec())]);
        t.omap_rm(obj.clone(), vec!["a".into()]);
        t.omap_clear(obj.clone());
        t.remove(obj.clone());
        t.touch(obj.clone());
        txns.push(t);
        let mut t = Transaction::new();
        t.remove_pg(PgId::new(PoolId(1), 1));
        t.write(ObjectId::new(PgId::new(PoolId(2), 0), "x"), 1 << 40, pattern(1));
        txns.push(t);
        txns.iter().map(|t| enc(&t.to_wire().0)).collect()
    })
}

fuzz_target!(|data: &[u8]| {
    // [control, data length (2 bytes), ...ops]: control bit 0 picks the populated store, bit 1 a data
    // segment whose block crcs are known (as received), bits 2..=3 scale the data length.
    let [control, len_lo, len_hi, rest @ ..] = data else { return };
    let len = usize::from(u16::from_le_bytes([*len_lo, *len_hi])) >> (2 * ((control >> 2) & 3));
    let Ok(ops) = postcard::from_bytes::<Vec<TxOp>>(&seeded(rest, seeds())) else { return };
    let payload = match control & 2 {
        0 => CrcBytes::new(pattern(len)),
        _ => CrcBytes::computed(pattern(len)),
    };
    let Ok(txn) = Transaction::from_wire(ops.clone(), payload.clone()) else { return };
    assert_eq!(txn.ops(), &ops[..]);
    assert_eq!(txn.payload_bytes(), len as u64);
    let (ops_again, payload_again) = txn.to_wire();
    assert_eq!(ops_again, ops);
    assert_eq!(payload_again, payload);
    let store = if control & 1 == 0 { MemStore::new() } else { populated_store() };
    let before = snapshot(&store);
    match store.apply(&txn) {
        Ok(()) => {
            snapshot(&store);
        }
        Err(_) => assert_eq!(snapshot(&store), before, "a refused transaction changes nothing"),
    }
});
