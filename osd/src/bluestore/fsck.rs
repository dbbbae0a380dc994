//! fsck: the committed metadata checked against itself and against the allocator.
//!
//! Checks: every record decodes; every unit an object references lies on the device, is allocated in the
//! persisted free list, and belongs to one object only; no allocated unit is unreferenced (no leak:
//! allocated == referenced, since a batch's frees are in the free list of its own commit); blobs lie within
//! their object's size and belong to an existing object, as do omap rows; the in-memory allocator agrees
//! with the persisted free list; PG usage rows equal the sums over the onodes; deferred writes waiting to go
//! in place write whole units that an object references. With `deep`, every 4 KiB of every referenced unit is read
//! and checked against its crc32c.

use std::collections::{BTreeMap, BTreeSet};

use redb::ReadableTable;

use crate::store::{PgUsage, StoreError};

use super::records::{
    decode_blob_key, decode_freelist, decode_omap_key, decode_onode_key, decode_pg_key, decode_usage, Blob,
    Onode, BLOB_BYTES, FREELIST_GROUP_AUS,
};
use super::{Inner, BLOBS, FREELIST, OMAP, ONODES, PG_USAGE};

/// Inconsistencies listed beyond this many are only counted.
const ERRORS_LISTED_MAX: usize = 1000;

/// What fsck found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsckReport {
    pub objects: u64,
    pub blobs: u64,
    pub referenced_units: u64,
    pub allocated_units: u64,
    pub deferred_writes: u64,
    /// Checksum blocks verified (deep only).
    pub blocks_verified: u64,
    /// Each inconsistency, in words (the first [`ERRORS_LISTED_MAX`]).
    pub errors: Vec<String>,
    pub errors_total: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors_total == 0
    }

    fn error(&mut self, e: String) {
        self.errors_total += 1;
        if self.errors.len() < ERRORS_LISTED_MAX {
            self.errors.push(e);
        }
    }
}

pub(super) fn run(inner: &Inner, deep: bool) -> Result<FsckReport, StoreError> {
    // No batch runs meanwhile: the committed state, the allocator and the deferred cache agree.
    let committer = inner.committer.lock();
    // Everything committed into redb (non-durably: the WAL stays the record), so redb alone is the state.
    inner.fold(&committer, &[], false)?;
    inner.gate.write().clear();
    let db = |e: redb::Error| StoreError::Io(format!("metadata database: {e}"));
    let rtx = inner.begin_read()?;
    let mut r = FsckReport::default();
    let au = inner.au;
    let total_aus = inner.opts.bluestore_block_size / au;

    // Objects and their data.
    let mut owner: BTreeMap<u64, u64> = BTreeMap::new(); // unit -> nid
    let mut csums_of: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut sizes: BTreeMap<u64, u64> = BTreeMap::new(); // nid -> size
    let mut usage: BTreeMap<rados::ids::PgId, PgUsage> = BTreeMap::new();
    let onodes = rtx.open_table(ONODES).map_err(|e| db(e.into()))?;
    for row in onodes.iter().map_err(|e| db(e.into()))? {
        let (k, v) = row.map_err(|e| db(e.into()))?;
        r.objects += 1;
        let (pg, hash, name) = match decode_onode_key(k.value()) {
            Ok(x) => x,
            Err(e) => {
                r.error(format!("onode key {:?}: {e}", k.value()));
                continue;
            }
        };
        if rados::placement::object_hash(name.as_bytes()) != hash {
            r.error(format!("object {pg}/{name:?}: key hash {hash:#x} is not the name's"));
        }
        match Onode::decode(v.value()) {
            Ok(o) => {
                if sizes.insert(o.nid, o.size).is_some() {
                    r.error(format!("object {pg}/{name:?}: node id {} used twice", o.nid));
                }
                let u = usage.entry(pg).or_default();
                u.objects += 1;
                u.bytes += o.size;
            }
            Err(e) => r.error(format!("object {pg}/{name:?}: {e}")),
        }
    }
    let blobs = rtx.open_table(BLOBS).map_err(|e| db(e.into()))?;
    for row in blobs.iter().map_err(|e| db(e.into()))? {
        let (k, v) = row.map_err(|e| db(e.into()))?;
        r.blobs += 1;
        let Ok((nid, index)) = decode_blob_key(k.value()) else {
            r.error(format!("blob key {:?} malformed", k.value()));
            continue;
        };
        let blob = match Blob::decode(v.value()) {
            Ok(b) => b,
            Err(e) => {
                r.error(format!("blob {nid}:{index}: {e}"));
                continue;
            }
        };
        if blob.au_shift != inner.au_shift {
            r.error(format!(
                "blob {nid}:{index}: allocation unit 2^{} on a 2^{} store",
                blob.au_shift, inner.au_shift
            ));
            continue;
        }
        match sizes.get(&nid) {
            None => r.error(format!("blob {nid}:{index} belongs to no object")),
            Some(&size) if index * BLOB_BYTES >= size => {
                r.error(format!("blob {nid}:{index} lies past its object's size {size}"))
            }
            Some(_) => {}
        }
        if blob.is_empty() {
            r.error(format!("blob {nid}:{index} is empty (should have been deleted)"));
        }
        for (slot, (pau, csums)) in blob.slots.iter().enumerate().filter_map(|(i, s)| Some((i, s.as_ref()?)))
        {
            r.referenced_units += 1;
            if *pau >= total_aus {
                r.error(format!(
                    "blob {nid}:{index} slot {slot}: unit {pau} past the device ({total_aus} units)"
                ));
                continue;
            }
            if let Some(other) = owner.insert(*pau, nid) {
                r.error(format!("unit {pau} referenced by objects {other} and {nid}"));
            }
            csums_of.insert(*pau, csums.clone());
        }
    }
    let omap = rtx.open_table(OMAP).map_err(|e| db(e.into()))?;
    let mut omap_orphans = BTreeSet::new();
    for row in omap.iter().map_err(|e| db(e.into()))? {
        let (k, _) = row.map_err(|e| db(e.into()))?;
        match decode_omap_key(k.value()) {
            Ok((nid, _)) if !sizes.contains_key(&nid) => {
                omap_orphans.insert(nid);
            }
            Ok(_) => {}
            Err(e) => r.error(format!("omap key: {e}")),
        }
    }
    for nid in omap_orphans {
        r.error(format!("omap rows of node {nid}, which no object has"));
    }

    // The persisted free list against the references and the allocator in memory.
    let mut persisted: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for row in rtx.open_table(FREELIST).map_err(|e| db(e.into()))?.iter().map_err(|e| db(e.into()))? {
        let (k, v) = row.map_err(|e| db(e.into()))?;
        match decode_freelist(v.value()) {
            Ok(w) => {
                persisted.insert(k.value(), w);
            }
            Err(e) => r.error(format!("free-list group {}: {e}", k.value())),
        }
    }
    let allocated = |au: u64| -> bool {
        let g = au / FREELIST_GROUP_AUS;
        let i = au % FREELIST_GROUP_AUS;
        persisted.get(&g).is_some_and(|w| w[(i / 64) as usize] & (1 << (i % 64)) != 0)
    };
    let mut leaks = 0u64;
    for au in 0..total_aus {
        let a = allocated(au);
        r.allocated_units += a as u64;
        match (a, owner.contains_key(&au)) {
            (true, false) => {
                leaks += 1;
                if leaks <= 16 {
                    r.error(format!("unit {au} allocated but referenced by no object (leaked)"));
                }
            }
            (false, true) => r.error(format!("unit {au} referenced by object {} but free", owner[&au])),
            _ => {}
        }
        if a != committer.alloc.is_allocated(au) {
            r.error(format!("unit {au}: allocator in memory says allocated={}, free list says {a}", !a));
        }
    }
    if leaks > 16 {
        r.error(format!("{} more leaked units", leaks - 16));
    }

    // PG usage.
    let mut rows: BTreeMap<rados::ids::PgId, PgUsage> = BTreeMap::new();
    for row in rtx.open_table(PG_USAGE).map_err(|e| db(e.into()))?.iter().map_err(|e| db(e.into()))? {
        let (k, v) = row.map_err(|e| db(e.into()))?;
        match (decode_pg_key(k.value()), decode_usage(v.value())) {
            (Ok(pg), Ok((objects, bytes))) => {
                rows.insert(pg, PgUsage { objects, bytes });
            }
            (Err(e), _) | (_, Err(e)) => r.error(format!("pg usage row: {e}")),
        }
    }
    if rows != usage {
        r.error(format!("pg usage rows {rows:?} differ from the objects' sums {usage:?}"));
    }

    // Deferred writes waiting to go in place: each is a whole unit some object references.
    for (pau, data) in inner.deferred_cache.read().iter() {
        r.deferred_writes += 1;
        if data.len() as u64 != au || !owner.contains_key(pau) {
            r.error(format!(
                "deferred write to unit {pau} of {} bytes is not a whole referenced unit",
                data.len()
            ));
        }
    }
    if deep {
        let mut buf = vec![0u8; au as usize];
        for (pau, csums) in &csums_of {
            match inner.read_unit(*pau, csums, 0, au, &mut buf) {
                Ok(()) => r.blocks_verified += csums.len() as u64,
                Err(e) => r.error(format!("unit {pau} of object {}: {e}", owner[pau])),
            }
        }
    }
    drop(committer);
    Ok(r)
}
