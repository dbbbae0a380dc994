//! Feeds arbitrary bytes to BlueStore's on-disk record decoders (onodes, blobs with their checksums,
//! WAL records (metadata rows, deferred writes, frees), free-list groups, PG usage rows, the label, and the table keys): they read
//! what a crash, a bad disk or a bug left in the metadata file, and must return errors, never panic. Whatever
//! decodes must re-encode to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use osd::bluestore::records::{
    decode_blob_key, decode_freelist, decode_omap_key, decode_onode_key, decode_usage, decode_wal_record,
    encode_freelist, encode_usage, encode_wal_record, Blob, Label, Onode,
};

fuzz_target!(|data: &[u8]| {
    // [kind, ...]: the low 3 bits of the first byte pick the decoder, the rest is the record. With bit 3 set
    // the record's trailing crc32c is made right first, so the fuzzer gets past the checksum into the fields.
    let Some((&kind, rest)) = data.split_first() else { return };
    let mut owned = rest.to_vec();
    if kind & 8 != 0 && owned.len() >= 4 {
        let n = owned.len() - 4;
        let crc = crc32c::crc32c(&owned[..n]);
        owned[n..].copy_from_slice(&crc.to_le_bytes());
    }
    let rec = owned.as_slice();
    match kind % 8 {
        0 => {
            if let Ok(o) = Onode::decode(rec) {
                assert_eq!(Onode::decode(&o.encode()).expect("re-encoded onode"), o);
            }
        }
        1 => {
            if let Ok(b) = Blob::decode(rec) {
                assert_eq!(Blob::decode(&b.encode()).expect("re-encoded blob"), b);
            }
        }
        2 => {
            if let Ok((seq, ops)) = decode_wal_record(rec) {
                let again = decode_wal_record(&encode_wal_record(seq, &ops)).expect("re-encoded WAL record");
                assert_eq!(again, (seq, ops));
            }
        }
        3 => {
            if let Ok(w) = decode_freelist(rec) {
                assert_eq!(decode_freelist(&encode_freelist(&w)).expect("re-encoded free-list group"), w);
            }
        }
        4 => {
            if let Ok((o, b)) = decode_usage(rec) {
                assert_eq!(decode_usage(&encode_usage(o, b)).expect("re-encoded usage"), (o, b));
            }
        }
        5 => {
            if let Ok(l) = Label::decode(rec) {
                assert_eq!(Label::decode(&l.encode()).expect("re-encoded label"), l);
            }
        }
        6 => {
            let _ = decode_onode_key(rec);
        }
        _ => {
            let _ = decode_omap_key(rec);
            let _ = decode_blob_key(rec);
        }
    }
});
