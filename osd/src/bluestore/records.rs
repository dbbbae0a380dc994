//! BlueStore's on-disk records: the keys and values of its redb tables and its label file. Byte layouts are
//! in `docs/bluestore.md`. Every value ends with the crc32c of the bytes before it; decoders check lengths
//! and the crc and return [`RecordError`] on anything else, never panic (fuzzed by
//! `fuzz/fuzz_targets/bluestore_records.rs`).

use std::collections::BTreeMap;

use bytes::Bytes;
use messenger::crc::crc32c;
use rados::ids::{Epoch, PgId, PoolId};

use crate::store::Eversion;

/// Checksum granularity: one crc32c per 4 KiB of object data, as Ceph's default `bluestore_csum_type` =
/// crc32c with a 4 KiB `csum_chunk_order`.
pub const CSUM_BLOCK_BYTES: u64 = 4096;
/// An object's data is mapped in blobs of this many bytes: one extent record per blob, so a small write
/// rewrites one small record (Ceph's `bluestore_max_blob_size`, 64 KiB).
pub const BLOB_BYTES: u64 = 64 << 10;
/// Allocation units one blob holds at most (the smallest allocation unit is a checksum block).
pub const SLOTS_MAX: usize = (BLOB_BYTES / CSUM_BLOCK_BYTES) as usize;
/// Attribute values and names are small; a bigger one in a record is damage.
pub const ATTR_BYTES_MAX: usize = 64 << 20;
/// Format byte of every record (bumped when a layout changes).
pub const RECORD_FORMAT: u8 = 1;
/// Allocation units per free-list record.
pub const FREELIST_GROUP_AUS: u64 = 1024;
const FREELIST_WORDS: usize = (FREELIST_GROUP_AUS / 64) as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{what}: truncated")]
    Truncated { what: &'static str },
    #[error("{what}: checksum mismatch")]
    BadCrc { what: &'static str },
    #[error("{what}: unknown format {format}")]
    Format { what: &'static str, format: u8 },
    #[error("{what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks the trailing crc and the format byte; reads what lies between.
    fn checked(buf: &'a [u8], what: &'static str) -> Result<Reader<'a>, RecordError> {
        if buf.len() < 5 {
            return Err(RecordError::Truncated { what });
        }
        let (body, tail) = buf.split_at(buf.len() - 4);
        let crc = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
        if crc32c(body) != crc {
            return Err(RecordError::BadCrc { what });
        }
        if body[0] != RECORD_FORMAT {
            return Err(RecordError::Format { what, format: body[0] });
        }
        Ok(Reader { buf: body, at: 1, what })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(RecordError::Truncated { what: self.what })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn string(&mut self, len: usize) -> Result<String, RecordError> {
        let b = self.take(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| RecordError::Invalid { what: self.what, why: "a name is not UTF-8".into() })
    }

    fn end(self) -> Result<(), RecordError> {
        if self.at != self.buf.len() {
            return Err(RecordError::Invalid {
                what: self.what,
                why: format!("{} bytes left over", self.buf.len() - self.at),
            });
        }
        Ok(())
    }
}

/// Starts a record: the format byte.
fn begin(capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(capacity + 5);
    v.push(RECORD_FORMAT);
    v
}

/// Ends a record: the crc32c of everything before.
fn seal(mut v: Vec<u8>) -> Vec<u8> {
    let crc = crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

// ---------------------------------------------------------------------------------------------------------------
// Keys.

/// The `onodes` key of an object: pool u32 BE, seed u32 BE, name hash u32 BE, name bytes. Byte order is the
/// listing order ([`crate::store::ListKey`]) within a PG, and a PG's objects are one key range.
pub fn onode_key(pg: PgId, hash: u32, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(12 + name.len());
    k.extend_from_slice(&pg_key(pg));
    k.extend_from_slice(&hash.to_be_bytes());
    k.extend_from_slice(name.as_bytes());
    k
}

/// The 8-byte prefix of a PG's onode keys, and the key of its `pg_usage` row.
pub fn pg_key(pg: PgId) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&pg.pool.0.to_be_bytes());
    k[4..].copy_from_slice(&pg.seed.to_be_bytes());
    k
}

pub fn decode_pg_key(k: &[u8]) -> Result<PgId, RecordError> {
    let what = "pg key";
    if k.len() < 8 {
        return Err(RecordError::Truncated { what });
    }
    let pool = u32::from_be_bytes(k[..4].try_into().expect("4 bytes"));
    let seed = u32::from_be_bytes(k[4..8].try_into().expect("4 bytes"));
    Ok(PgId { pool: PoolId(pool), seed })
}

/// `(pg, hash, name)` of an onode key.
pub fn decode_onode_key(k: &[u8]) -> Result<(PgId, u32, String), RecordError> {
    let what = "onode key";
    if k.len() < 12 {
        return Err(RecordError::Truncated { what });
    }
    let pg = decode_pg_key(k)?;
    let hash = u32::from_be_bytes(k[8..12].try_into().expect("4 bytes"));
    let name = String::from_utf8(k[12..].to_vec())
        .map_err(|_| RecordError::Invalid { what, why: "name is not UTF-8".into() })?;
    Ok((pg, hash, name))
}

/// The `blobs` key of blob `index` (object offset / [`BLOB_BYTES`]) of the object with node id `nid`.
pub fn blob_key(nid: u64, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&nid.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn decode_blob_key(k: &[u8]) -> Result<(u64, u64), RecordError> {
    let k: &[u8; 16] = k.try_into().map_err(|_| RecordError::Truncated { what: "blob key" })?;
    Ok((u64::from_be_bytes(k[..8].try_into().expect("8")), u64::from_be_bytes(k[8..].try_into().expect("8"))))
}

/// The `omap` key of `key` of the object with node id `nid`: nid u64 BE, then the key's bytes.
pub fn omap_key(nid: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&nid.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

pub fn decode_omap_key(k: &[u8]) -> Result<(u64, String), RecordError> {
    let what = "omap key";
    if k.len() < 8 {
        return Err(RecordError::Truncated { what });
    }
    let nid = u64::from_be_bytes(k[..8].try_into().expect("8"));
    let key = String::from_utf8(k[8..].to_vec())
        .map_err(|_| RecordError::Invalid { what, why: "key is not UTF-8".into() })?;
    Ok((nid, key))
}

// ---------------------------------------------------------------------------------------------------------------
// Values.

/// An object's metadata (Ceph's onode): everything but its data map and omap, which live in other tables
/// under its node id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Onode {
    /// Node id: the key prefix of the object's blobs and omap; never reused.
    pub nid: u64,
    pub size: u64,
    pub version: Option<Eversion>,
    pub attrs: BTreeMap<String, Bytes>,
}

impl Onode {
    pub fn encode(&self) -> Vec<u8> {
        let attr_bytes: usize = self.attrs.iter().map(|(k, v)| 6 + k.len() + v.len()).sum();
        let mut v = begin(32 + attr_bytes);
        v.extend_from_slice(&self.nid.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        let ver = self.version.unwrap_or_default();
        v.push(self.version.is_some() as u8);
        v.extend_from_slice(&ver.epoch.0.to_le_bytes());
        v.extend_from_slice(&ver.v.to_le_bytes());
        assert!(self.attrs.len() <= u16::MAX as usize, "attributes per object are bounded by the caller");
        v.extend_from_slice(&(self.attrs.len() as u16).to_le_bytes());
        for (k, val) in &self.attrs {
            assert!(k.len() <= u16::MAX as usize && val.len() <= ATTR_BYTES_MAX);
            v.extend_from_slice(&(k.len() as u16).to_le_bytes());
            v.extend_from_slice(k.as_bytes());
            v.extend_from_slice(&(val.len() as u32).to_le_bytes());
            v.extend_from_slice(val);
        }
        seal(v)
    }

    pub fn decode(buf: &[u8]) -> Result<Onode, RecordError> {
        let mut r = Reader::checked(buf, "onode")?;
        let nid = r.u64()?;
        let size = r.u64()?;
        let has_version = r.u8()?;
        let epoch = r.u32()?;
        let ver = r.u64()?;
        let version = match has_version {
            0 => None,
            1 => Some(Eversion { epoch: Epoch(epoch), v: ver }),
            b => return Err(RecordError::Invalid { what: "onode", why: format!("version flag {b}") }),
        };
        let n = r.u16()?;
        let mut attrs = BTreeMap::new();
        for _ in 0..n {
            let klen = r.u16()? as usize;
            let k = r.string(klen)?;
            let vlen = r.u32()? as usize;
            if vlen > ATTR_BYTES_MAX {
                return Err(RecordError::Invalid {
                    what: "onode",
                    why: format!("attribute of {vlen} bytes"),
                });
            }
            let val = Bytes::copy_from_slice(r.take(vlen)?);
            attrs.insert(k, val);
        }
        r.end()?;
        Ok(Onode { nid, size, version, attrs })
    }
}

/// One blob of an object: which of its allocation units hold data, where, and the crc32c of each 4 KiB of
/// them. A missing unit is a hole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// log2 of the allocation unit (fixed at mkfs; recorded so a record is self-describing).
    pub au_shift: u8,
    /// Per slot (`BLOB_BYTES >> au_shift` of them): the physical allocation unit, and one crc per checksum
    /// block of it.
    pub slots: Vec<Option<(u64, Vec<u32>)>>,
}

impl Blob {
    pub fn empty(au_shift: u8) -> Blob {
        Blob { au_shift, slots: vec![None; (BLOB_BYTES >> au_shift) as usize] }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    fn csums_per_slot(au_shift: u8) -> usize {
        ((1u64 << au_shift) / CSUM_BLOCK_BYTES) as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        let per = Self::csums_per_slot(self.au_shift);
        assert_eq!(self.slots.len(), (BLOB_BYTES >> self.au_shift) as usize);
        let mut v = begin(4 + self.slots.len() * (8 + 4 * per));
        v.push(self.au_shift);
        let mut present: u16 = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.is_some() {
                present |= 1 << i;
            }
        }
        v.extend_from_slice(&present.to_le_bytes());
        for (pau, csums) in self.slots.iter().flatten() {
            assert_eq!(csums.len(), per, "one crc per checksum block");
            v.extend_from_slice(&pau.to_le_bytes());
            for c in csums {
                v.extend_from_slice(&c.to_le_bytes());
            }
        }
        seal(v)
    }

    pub fn decode(buf: &[u8]) -> Result<Blob, RecordError> {
        let what = "blob";
        let mut r = Reader::checked(buf, what)?;
        let au_shift = r.u8()?;
        if !(12..=16).contains(&au_shift) {
            return Err(RecordError::Invalid { what, why: format!("allocation unit 2^{au_shift}") });
        }
        let nslots = (BLOB_BYTES >> au_shift) as usize;
        let present = r.u16()?;
        if nslots < 16 && present >> nslots != 0 {
            return Err(RecordError::Invalid { what, why: format!("slot bits {present:#x}") });
        }
        let per = Self::csums_per_slot(au_shift);
        let mut slots = vec![None; nslots];
        for (i, slot) in slots.iter_mut().enumerate() {
            if present & (1 << i) != 0 {
                let pau = r.u64()?;
                let csums = (0..per).map(|_| r.u32()).collect::<Result<Vec<u32>, _>>()?;
                *slot = Some((pau, csums));
            }
        }
        r.end()?;
        Ok(Blob { au_shift, slots })
    }
}

/// A deferred write: bytes to put at a device offset, in place, once the WAL record that holds them is
/// durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeferredWrite {
    pub offset: u64,
    pub data: Bytes,
}

/// Largest deferred write (one allocation unit is at most 64 KiB).
pub const DEFERRED_WRITE_BYTES_MAX: usize = BLOB_BYTES as usize;

/// The metadata tables, by their number in WAL records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableId {
    Onodes = 0,
    Blobs = 1,
    Omap = 2,
    /// Keys: the group number, u64 BE.
    Freelist = 3,
    PgUsage = 4,
    /// Keys: the UTF-8 name.
    Meta = 5,
}

impl TableId {
    fn from_u8(b: u8) -> Option<TableId> {
        Some(match b {
            0 => TableId::Onodes,
            1 => TableId::Blobs,
            2 => TableId::Omap,
            3 => TableId::Freelist,
            4 => TableId::PgUsage,
            5 => TableId::Meta,
            _ => return None,
        })
    }
}

/// One change a batch makes, as its WAL record carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalOp {
    /// A metadata row set to a value.
    Put { table: TableId, key: Vec<u8>, value: Vec<u8> },
    /// A metadata row removed.
    Del { table: TableId, key: Vec<u8> },
    /// A deferred write (a whole allocation unit, at its offset).
    Write(DeferredWrite),
    /// An allocation unit the batch stopped referencing: an earlier record's write to it is void.
    Free(u64),
}

/// Largest metadata key or value in a WAL record (an omap value or an onode with its attributes).
const WAL_FIELD_BYTES_MAX: usize = 1 << 30;

/// A batch's WAL record body: `1` | seq u64 | count u32 | ops | crc u32. Ops: `1` table u8 key_len u32 key
/// value_len u32 value (put); `2` table u8 key_len u32 key (delete); `3` offset u64 len u32 bytes (deferred
/// write); `4` unit u64 (free).
pub fn encode_wal_record(seq: u64, ops: &[WalOp]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_wal_record_into(&mut v, seq, ops);
    v
}

/// [`encode_wal_record`] appended to `v` (after a frame header, without copying the body again).
pub fn encode_wal_record_into(v: &mut Vec<u8>, seq: u64, ops: &[WalOp]) {
    let bytes: usize = ops
        .iter()
        .map(|op| match op {
            WalOp::Put { key, value, .. } => 10 + key.len() + value.len(),
            WalOp::Del { key, .. } => 6 + key.len(),
            WalOp::Write(w) => 13 + w.data.len(),
            WalOp::Free(_) => 9,
        })
        .sum();
    let start = v.len();
    v.reserve(17 + bytes);
    v.push(RECORD_FORMAT);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match op {
            WalOp::Put { table, key, value } => {
                v.push(1);
                v.push(*table as u8);
                v.extend_from_slice(&(key.len() as u32).to_le_bytes());
                v.extend_from_slice(key);
                v.extend_from_slice(&(value.len() as u32).to_le_bytes());
                v.extend_from_slice(value);
            }
            WalOp::Del { table, key } => {
                v.push(2);
                v.push(*table as u8);
                v.extend_from_slice(&(key.len() as u32).to_le_bytes());
                v.extend_from_slice(key);
            }
            WalOp::Write(w) => {
                assert!(w.data.len() <= DEFERRED_WRITE_BYTES_MAX);
                v.push(3);
                v.extend_from_slice(&w.offset.to_le_bytes());
                v.extend_from_slice(&(w.data.len() as u32).to_le_bytes());
                v.extend_from_slice(&w.data);
            }
            WalOp::Free(unit) => {
                v.push(4);
                v.extend_from_slice(&unit.to_le_bytes());
            }
        }
    }
    let crc = crc32c(&v[start..]);
    v.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes a WAL record body: its batch number and ops.
pub fn decode_wal_record(buf: &[u8]) -> Result<(u64, Vec<WalOp>), RecordError> {
    let what = "WAL record";
    let mut r = Reader::checked(buf, what)?;
    let seq = r.u64()?;
    let n = r.u32()? as usize;
    // Each op takes at least 9 bytes: a count beyond that is damage, not an allocation to attempt.
    if n > buf.len() / 9 {
        return Err(RecordError::Invalid { what, why: format!("{n} ops in {} bytes", buf.len()) });
    }
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let op = match r.u8()? {
            tag @ (1 | 2) => {
                let t = r.u8()?;
                let table = TableId::from_u8(t)
                    .ok_or_else(|| RecordError::Invalid { what, why: format!("table {t}") })?;
                let field = |r: &mut Reader| -> Result<Vec<u8>, RecordError> {
                    let len = r.u32()? as usize;
                    if len > WAL_FIELD_BYTES_MAX {
                        return Err(RecordError::Invalid { what, why: format!("a field of {len} bytes") });
                    }
                    Ok(r.take(len)?.to_vec())
                };
                let key = field(&mut r)?;
                if tag == 1 {
                    WalOp::Put { table, key, value: field(&mut r)? }
                } else {
                    WalOp::Del { table, key }
                }
            }
            3 => {
                let offset = r.u64()?;
                let len = r.u32()? as usize;
                if len > DEFERRED_WRITE_BYTES_MAX {
                    return Err(RecordError::Invalid { what, why: format!("write of {len} bytes") });
                }
                WalOp::Write(DeferredWrite { offset, data: Bytes::copy_from_slice(r.take(len)?) })
            }
            4 => WalOp::Free(r.u64()?),
            tag => return Err(RecordError::Invalid { what, why: format!("op tag {tag}") }),
        };
        ops.push(op);
    }
    r.end()?;
    Ok((seq, ops))
}

/// A free-list record: one bit per allocation unit of a group of [`FREELIST_GROUP_AUS`], 1 = allocated.
pub fn encode_freelist(words: &[u64]) -> Vec<u8> {
    assert_eq!(words.len(), FREELIST_WORDS);
    let mut v = begin(FREELIST_WORDS * 8);
    for w in words {
        v.extend_from_slice(&w.to_le_bytes());
    }
    seal(v)
}

pub fn decode_freelist(buf: &[u8]) -> Result<Vec<u64>, RecordError> {
    let mut r = Reader::checked(buf, "free-list record")?;
    let words = (0..FREELIST_WORDS).map(|_| r.u64()).collect::<Result<Vec<u64>, _>>()?;
    r.end()?;
    Ok(words)
}

/// A `pg_usage` row: objects and bytes of one PG.
pub fn encode_usage(objects: u64, bytes: u64) -> Vec<u8> {
    let mut v = begin(16);
    v.extend_from_slice(&objects.to_le_bytes());
    v.extend_from_slice(&bytes.to_le_bytes());
    seal(v)
}

pub fn decode_usage(buf: &[u8]) -> Result<(u64, u64), RecordError> {
    let mut r = Reader::checked(buf, "pg usage")?;
    let out = (r.u64()?, r.u64()?);
    r.end()?;
    Ok(out)
}

/// A u64 counter in the `meta` table.
pub fn encode_u64(n: u64) -> Vec<u8> {
    let mut v = begin(8);
    v.extend_from_slice(&n.to_le_bytes());
    seal(v)
}

pub fn decode_u64(buf: &[u8]) -> Result<u64, RecordError> {
    let mut r = Reader::checked(buf, "counter")?;
    let n = r.u64()?;
    r.end()?;
    Ok(n)
}

/// Magic at the start of the label: a directory whose `label` lacks it is not a BlueStore.
pub const LABEL_MAGIC: &[u8; 8] = b"CTLBSTOR";
/// The csum type the label records: 1 = crc32c (the only one).
pub const CSUM_TYPE_CRC32C: u8 = 1;

/// The store's identity and geometry, fixed at mkfs: in the `label` file and in the `meta` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    pub fsid: [u8; 16],
    pub osd_id: u32,
    pub block_bytes: u64,
    pub min_alloc_bytes: u32,
    pub csum_type: u8,
}

impl Label {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(LABEL_MAGIC);
        v.push(RECORD_FORMAT);
        v.extend_from_slice(&self.fsid);
        v.extend_from_slice(&self.osd_id.to_le_bytes());
        v.extend_from_slice(&self.block_bytes.to_le_bytes());
        v.extend_from_slice(&self.min_alloc_bytes.to_le_bytes());
        v.push(self.csum_type);
        seal(v)
    }

    pub fn decode(buf: &[u8]) -> Result<Label, RecordError> {
        let what = "label";
        if buf.len() < LABEL_MAGIC.len() || &buf[..8] != LABEL_MAGIC {
            return Err(RecordError::Invalid { what, why: "not a cuttle BlueStore label".into() });
        }
        let body = &buf[8..];
        if body.len() < 5 {
            return Err(RecordError::Truncated { what });
        }
        // The crc covers the magic too.
        let (all, tail) = buf.split_at(buf.len() - 4);
        if crc32c(all) != u32::from_le_bytes(tail.try_into().expect("4 bytes")) {
            return Err(RecordError::BadCrc { what });
        }
        let mut r = Reader { buf: all, at: 8, what };
        let format = r.u8()?;
        if format != RECORD_FORMAT {
            return Err(RecordError::Format { what, format });
        }
        let fsid: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
        let label = Label {
            fsid,
            osd_id: r.u32()?,
            block_bytes: r.u64()?,
            min_alloc_bytes: r.u32()?,
            csum_type: r.u8()?,
        };
        r.end()?;
        Ok(label)
    }
}

/// Decodes any value of any table (the fuzz target's entry point): `table` picks the decoder.
pub fn decode_any(table: u8, buf: &[u8]) -> Result<(), RecordError> {
    match table % 8 {
        0 => Onode::decode(buf).map(drop),
        1 => Blob::decode(buf).map(drop),
        2 => decode_wal_record(buf).map(drop),
        3 => decode_freelist(buf).map(drop),
        4 => decode_usage(buf).map(drop),
        5 => Label::decode(buf).map(drop),
        6 => decode_onode_key(buf).map(drop),
        _ => decode_omap_key(buf).and(decode_blob_key(buf).map(drop)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        // Goal: every record decodes to what was encoded, and any flipped bit or cut is an error, not a
        // panic or a wrong value. Method: encode samples, flip each bit / cut each length, decode.
        let mut attrs = BTreeMap::new();
        attrs.insert("_".to_string(), Bytes::from_static(b"oi"));
        attrs.insert("snapset".to_string(), Bytes::from(vec![9u8; 100]));
        let onode = Onode { nid: 7, size: 12345, version: Some(Eversion { epoch: Epoch(3), v: 9 }), attrs };
        let mut blob = Blob::empty(12);
        blob.slots[3] = Some((99, vec![0xdead_beef]));
        blob.slots[15] = Some((1 << 40, vec![1]));
        let wal = vec![
            WalOp::Put { table: TableId::Blobs, key: vec![1, 2], value: vec![3; 40] },
            WalOp::Del { table: TableId::Meta, key: b"batch".to_vec() },
            WalOp::Write(DeferredWrite { offset: 4096, data: Bytes::from(vec![1u8; 4096]) }),
            WalOp::Write(DeferredWrite { offset: 0, data: Bytes::new() }),
            WalOp::Free(77),
        ];
        let label =
            Label { fsid: [5; 16], osd_id: 3, block_bytes: 1 << 30, min_alloc_bytes: 4096, csum_type: 1 };
        let words: Vec<u64> = (0..FREELIST_WORDS as u64).map(|i| i * 0x1234_5678_9abc).collect();
        assert_eq!(Onode::decode(&onode.encode()).unwrap(), onode);
        assert_eq!(Blob::decode(&blob.encode()).unwrap(), blob);
        assert_eq!(decode_wal_record(&encode_wal_record(9, &wal)).unwrap(), (9, wal.clone()));
        assert_eq!(Label::decode(&label.encode()).unwrap(), label);
        assert_eq!(decode_freelist(&encode_freelist(&words)).unwrap(), words);
        assert_eq!(decode_usage(&encode_usage(4, 5)).unwrap(), (4, 5));
        assert_eq!(decode_u64(&encode_u64(77)).unwrap(), 77);
        let pg = PgId { pool: PoolId(2), seed: 0x1f };
        assert_eq!(decode_onode_key(&onode_key(pg, 0xabcd, "obj")).unwrap(), (pg, 0xabcd, "obj".into()));

        let samples: Vec<(u8, Vec<u8>)> = vec![
            (0, onode.encode()),
            (1, blob.encode()),
            (2, encode_wal_record(3, &wal)),
            (3, encode_freelist(&words)),
            (4, encode_usage(1, 2)),
            (5, label.encode()),
        ];
        for (t, good) in samples {
            decode_any(t, &good).unwrap();
            for bit in 0..good.len() * 8 {
                let mut bad = good.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(decode_any(t, &bad).is_err(), "table {t}: flipped bit {bit} went unnoticed");
            }
            for cut in 0..good.len() {
                assert!(decode_any(t, &good[..cut]).is_err(), "table {t}: cut at {cut} went unnoticed");
            }
        }
    }
}
