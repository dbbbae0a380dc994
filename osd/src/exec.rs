//! Executing one client op (a compound `OsdOp` list on one object) against the store, as Ceph's `do_osd_ops`.
//!
//! Execution never changes the store. It reads the object, runs the ops in order against an overlay of what the
//! earlier ops of the same request changed (so a read after a write in one request sees the write), checks
//! every limit, and produces the [`Transaction`] that makes the change, the per-op outputs, and the read bytes.
//! The first failing op fails the whole request and nothing is applied: a compound op is atomic.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use messenger::crc::CrcBytes;

use rados::ids::PgId;
use rados::msg::{OpOut, OsdError, OsdOp};

use crate::store::{Eversion, ObjectId, ObjectStat, ObjectStore, StoreError, Transaction};

/// Most ops in one request.
pub const OPS_PER_REQUEST_MAX: usize = 256;
/// Longest attribute name, bytes (Linux XATTR_NAME_MAX).
pub const ATTR_NAME_BYTES_MAX: usize = 255;
/// Largest attribute value, bytes (Linux XATTR_SIZE_MAX).
pub const ATTR_VALUE_BYTES_MAX: u64 = 64 << 10;
/// Longest omap key, bytes.
pub const OMAP_KEY_BYTES_MAX: usize = 4096;
/// Largest omap value, bytes.
pub const OMAP_VALUE_BYTES_MAX: usize = 1 << 20;
/// Most omap keys set, removed or fetched by one op, and most keys listed by one `OmapGetKeys`.
pub const OMAP_KEYS_PER_OP_MAX: usize = 10_000;

/// The size limits of `cuttle.toml` that ops are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpLimits {
    /// `osd_max_object_size`.
    pub max_object_size: u64,
    /// `osd_max_write_size`.
    pub max_write_size: u64,
    /// `osd_max_object_name_len`.
    pub max_object_name_len: usize,
}

impl OpLimits {
    pub fn from_config(cfg: &rados::config::Config) -> OpLimits {
        OpLimits {
            max_object_size: cfg.osd_max_object_size,
            max_write_size: cfg.osd_max_write_size,
            max_object_name_len: cfg.osd_max_object_name_len,
        }
    }

    /// Checks an object name from a client: not empty (the empty name is the PG's own metadata object), not
    /// longer than the limit.
    pub fn check_name(&self, name: &str) -> Result<(), OsdError> {
        if name.is_empty() {
            return Err(OsdError::Invalid("empty object name".into()));
        }
        if name.len() > self.max_object_name_len {
            return Err(OsdError::TooLarge(format!(
                "object name of {} bytes (osd_max_object_name_len is {})",
                name.len(),
                self.max_object_name_len
            )));
        }
        Ok(())
    }
}

/// A successful execution.
#[derive(Debug)]
pub struct Executed {
    /// One per op.
    pub outs: Vec<OpOut>,
    /// The bytes of every `OpOut::Data`, in op order, as the parts they were read in (the reply sends them
    /// back to back without joining them).
    pub data: Vec<CrcBytes>,
    /// The change (empty for a read-only request). Includes the object's new version when it exists after.
    pub txn: Transaction,
    /// Whether the object exists once `txn` is applied.
    pub exists_after: bool,
    /// The object's version before the request (`v`, 0 when absent).
    pub version_before: u64,
}

/// Whether a request changes anything (then it needs a version and replication).
pub fn is_write(ops: &[OsdOp]) -> bool {
    ops.iter().any(|op| op.is_write())
}

/// Whether every change `ops` make only frees space (deletes, truncates, zeroing, removing attributes or
/// keys): what a full OSD still takes, so that space can be freed.
pub fn frees_only(ops: &[OsdOp]) -> bool {
    ops.iter().all(|op| {
        !op.is_write()
            || matches!(
                op,
                OsdOp::Remove
                    | OsdOp::Truncate { .. }
                    | OsdOp::Zero { .. }
                    | OsdOp::RmXattr { .. }
                    | OsdOp::OmapRm { .. }
            )
    })
}

/// Runs `ops` against object `name` of `pg`. `payload` is the request's data segment, consumed by the ops
/// that carry data in order. `version` is the PG version a write request will get (ignored for reads).
pub fn execute(
    store: &dyn ObjectStore,
    pg: PgId,
    name: &str,
    ops: &[OsdOp],
    payload: &CrcBytes,
    limits: &OpLimits,
    version: Eversion,
) -> Result<Executed, OsdError> {
    limits.check_name(name)?;
    if ops.is_empty() {
        return Err(OsdError::Invalid("request has no ops".into()));
    }
    if ops.len() > OPS_PER_REQUEST_MAX {
        return Err(OsdError::Invalid(format!(
            "{} ops in one request (max {OPS_PER_REQUEST_MAX})",
            ops.len()
        )));
    }
    let wanted = ops.iter().try_fold(0u64, |sum, op| sum.checked_add(op.payload_len()));
    if wanted != Some(payload.len() as u64) {
        return Err(OsdError::Invalid(format!(
            "ops need {} data bytes, request has {}",
            wanted.map_or("more than 2^64".to_string(), |w| w.to_string()),
            payload.len()
        )));
    }
    let base = match store.stat(pg, name) {
        Ok(st) => Some(st),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(OsdError::Io(e.to_string())),
    };
    let mut ctx = ObjCtx::new(store, ObjectId::new(pg, name), base, limits);
    let mut outs = Vec::with_capacity(ops.len());
    let mut data: Vec<CrcBytes> = Vec::new();
    let mut at: usize = 0;
    for op in ops {
        let take = |at: &mut usize, len: u64| -> CrcBytes {
            // The total was checked above, so every piece is within the payload.
            let piece = payload.slice(*at..*at + len as usize);
            *at += len as usize;
            piece
        };
        let out = match op {
            OsdOp::Read { offset, len } => {
                ctx.must_exist()?;
                let len = if *len == 0 { ctx.size.saturating_sub(*offset) } else { *len };
                let parts = ctx.read_parts(*offset, len)?;
                let n = parts.iter().map(|p| p.len() as u64).sum();
                data.extend(parts);
                OpOut::Data { len: n }
            }
            OsdOp::Stat => {
                ctx.must_exist()?;
                OpOut::Stat { size: ctx.size, version: ctx.version_before }
            }
            OsdOp::Write { offset, len } => {
                ctx.check_write(*offset, *len)?;
                ctx.write(*offset, take(&mut at, *len));
                OpOut::None
            }
            OsdOp::WriteFull { len } => {
                ctx.check_write(0, *len)?;
                let bytes = take(&mut at, *len);
                if ctx.exists {
                    ctx.truncate(0);
                }
                ctx.write(0, bytes);
                OpOut::None
            }
            OsdOp::Append { len } => {
                let offset = ctx.size;
                ctx.check_write(offset, *len)?;
                ctx.write(offset, take(&mut at, *len));
                OpOut::None
            }
            OsdOp::Zero { offset, len } => {
                offset.checked_add(*len).ok_or_else(|| OsdError::Invalid("zero range past 2^64".into()))?;
                // As Ceph: zeroing a missing object does nothing, and zeroing never extends an object.
                if ctx.exists && *offset < ctx.size && *len > 0 {
                    let len = (*len).min(ctx.size - offset);
                    ctx.zero(*offset, len);
                }
                OpOut::None
            }
            OsdOp::Truncate { size } => {
                if *size > limits.max_object_size {
                    return Err(too_large_object(*size, limits));
                }
                ctx.create();
                ctx.truncate(*size);
                OpOut::None
            }
            OsdOp::Create { exclusive } => {
                if ctx.exists && *exclusive {
                    return Err(OsdError::Exists);
                }
                ctx.create();
                OpOut::None
            }
            OsdOp::Remove => {
                ctx.must_exist()?;
                ctx.remove();
                OpOut::None
            }
            OsdOp::SetXattr { name, len } => {
                check_attr_name(name)?;
                if *len > ATTR_VALUE_BYTES_MAX {
                    return Err(OsdError::TooLarge(format!(
                        "attribute value of {len} bytes (max {ATTR_VALUE_BYTES_MAX})"
                    )));
                }
                let value = take(&mut at, *len);
                ctx.create();
                ctx.attrs.insert(name.clone(), Some(value.bytes().clone()));
                ctx.txn.setattr(ctx.oid.clone(), name.clone(), value.into_bytes());
                OpOut::None
            }
            OsdOp::GetXattr { name } => {
                ctx.must_exist()?;
                check_attr_name(name)?;
                let value = ctx.getattr(name)?.ok_or(OsdError::NoAttr)?;
                let n = value.len() as u64;
                data.push(value.into());
                OpOut::Data { len: n }
            }
            OsdOp::RmXattr { name } => {
                ctx.must_exist()?;
                check_attr_name(name)?;
                if ctx.getattr(name)?.is_none() {
                    return Err(OsdError::NoAttr);
                }
                ctx.attrs.insert(name.clone(), None);
                ctx.txn.rmattr(ctx.oid.clone(), name.clone());
                OpOut::None
            }
            OsdOp::OmapSet { keys } => {
                check_omap_count(keys.len())?;
                for (k, v) in keys {
                    check_omap_key(k)?;
                    if v.len() > OMAP_VALUE_BYTES_MAX {
                        return Err(OsdError::TooLarge(format!(
                            "omap value of {} bytes (max {OMAP_VALUE_BYTES_MAX})",
                            v.len()
                        )));
                    }
                }
                ctx.create();
                for (k, v) in keys {
                    ctx.omap.insert(k.clone(), Some(v.clone()));
                }
                ctx.txn.omap_set(ctx.oid.clone(), keys.clone());
                OpOut::None
            }
            OsdOp::OmapGet { keys } => {
                ctx.must_exist()?;
                check_omap_count(keys.len())?;
                OpOut::Pairs(ctx.omap_get(keys)?)
            }
            OsdOp::ListXattrs => {
                ctx.must_exist()?;
                OpOut::Keys(ctx.attr_names()?)
            }
            OsdOp::OmapGetKeys { after, max } => {
                ctx.must_exist()?;
                let max = (*max as usize).min(OMAP_KEYS_PER_OP_MAX);
                OpOut::Keys(ctx.omap_keys(after, max)?)
            }
            OsdOp::OmapRm { keys } => {
                ctx.must_exist()?;
                check_omap_count(keys.len())?;
                for k in keys {
                    check_omap_key(k)?;
                    ctx.omap.insert(k.clone(), None);
                }
                ctx.txn.omap_rm(ctx.oid.clone(), keys.clone());
                OpOut::None
            }
            OsdOp::AssertVersion { version } => {
                if *version != ctx.version_before {
                    return Err(OsdError::VersionMismatch { actual: ctx.version_before });
                }
                OpOut::None
            }
        };
        outs.push(out);
    }
    assert_eq!(at, payload.len(), "every payload byte was consumed");
    let exists_after = ctx.exists;
    let mut txn = ctx.txn;
    if is_write(ops) && exists_after {
        txn.set_version(ctx.oid, version);
    }
    Ok(Executed { outs, data, txn, exists_after, version_before: ctx.version_before })
}

fn too_large_object(end: u64, limits: &OpLimits) -> OsdError {
    OsdError::TooLarge(format!(
        "object would be {end} bytes (osd_max_object_size is {})",
        limits.max_object_size
    ))
}

fn check_attr_name(name: &str) -> Result<(), OsdError> {
    if name.is_empty() {
        return Err(OsdError::Invalid("empty attribute name".into()));
    }
    if name.len() > ATTR_NAME_BYTES_MAX {
        return Err(OsdError::TooLarge(format!(
            "attribute name of {} bytes (max {ATTR_NAME_BYTES_MAX})",
            name.len()
        )));
    }
    Ok(())
}

fn check_omap_key(key: &str) -> Result<(), OsdError> {
    if key.len() > OMAP_KEY_BYTES_MAX {
        return Err(OsdError::TooLarge(format!(
            "omap key of {} bytes (max {OMAP_KEY_BYTES_MAX})",
            key.len()
        )));
    }
    Ok(())
}

fn check_omap_count(n: usize) -> Result<(), OsdError> {
    if n > OMAP_KEYS_PER_OP_MAX {
        return Err(OsdError::TooLarge(format!("{n} omap keys in one op (max {OMAP_KEYS_PER_OP_MAX})")));
    }
    Ok(())
}

/// How a store's refusal reaches the client.
pub fn store_err(e: StoreError) -> OsdError {
    match e {
        StoreError::NotFound(_) => OsdError::NotFound,
        StoreError::NoAttr { .. } => OsdError::NoAttr,
        StoreError::NoSpace(s) => OsdError::NoSpace(s),
        other => OsdError::Io(other.to_string()),
    }
}

/// A data change made earlier in the same request, replayed over stored bytes by reads.
enum DataOp {
    Write(u64, Bytes),
    Zero(u64, u64),
    /// Everything from this offset on reads as zeros (a shrink, possibly followed by growth).
    Truncate(u64),
}

/// The object as the ops so far have left it.
struct ObjCtx<'a> {
    store: &'a dyn ObjectStore,
    oid: ObjectId,
    limits: &'a OpLimits,
    version_before: u64,
    /// The stored object still underlies this view (it was not removed by an earlier op).
    base_valid: bool,
    exists: bool,
    size: u64,
    data_ops: Vec<DataOp>,
    /// Attribute and omap changes (`None`: removed) over the stored ones.
    attrs: BTreeMap<String, Option<Bytes>>,
    omap: BTreeMap<String, Option<Vec<u8>>>,
    txn: Transaction,
}

impl<'a> ObjCtx<'a> {
    fn new(
        store: &'a dyn ObjectStore,
        oid: ObjectId,
        base: Option<ObjectStat>,
        limits: &'a OpLimits,
    ) -> Self {
        ObjCtx {
            store,
            oid,
            limits,
            version_before: base.map_or(0, |b| b.version.v),
            base_valid: base.is_some(),
            exists: base.is_some(),
            size: base.map_or(0, |b| b.size),
            data_ops: Vec::new(),
            attrs: BTreeMap::new(),
            omap: BTreeMap::new(),
            txn: Transaction::new(),
        }
    }

    fn must_exist(&self) -> Result<(), OsdError> {
        if self.exists {
            Ok(())
        } else {
            Err(OsdError::NotFound)
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), OsdError> {
        if len > self.limits.max_write_size {
            return Err(OsdError::TooLarge(format!(
                "write of {len} bytes (osd_max_write_size is {})",
                self.limits.max_write_size
            )));
        }
        let end = offset.checked_add(len).ok_or_else(|| OsdError::Invalid("write range past 2^64".into()))?;
        if end > self.limits.max_object_size {
            return Err(too_large_object(end, self.limits));
        }
        Ok(())
    }

    fn create(&mut self) {
        if !self.exists {
            self.exists = true;
            self.size = 0;
            self.txn.touch(self.oid.clone());
        }
    }

    fn write(&mut self, offset: u64, bytes: CrcBytes) {
        self.create();
        let len = bytes.len() as u64;
        if len > 0 {
            self.size = self.size.max(offset + len);
            self.data_ops.push(DataOp::Write(offset, bytes.bytes().clone()));
            self.txn.write(self.oid.clone(), offset, bytes);
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        assert!(self.exists && offset + len <= self.size, "zero is clipped to the object");
        self.data_ops.push(DataOp::Zero(offset, len));
        self.txn.zero(self.oid.clone(), offset, len);
    }

    fn truncate(&mut self, size: u64) {
        assert!(self.exists);
        if size < self.size {
            self.data_ops.push(DataOp::Truncate(size));
        }
        self.size = size;
        self.txn.truncate(self.oid.clone(), size);
    }

    fn remove(&mut self) {
        assert!(self.exists);
        self.txn.remove(self.oid.clone());
        self.exists = false;
        self.base_valid = false;
        self.size = 0;
        self.data_ops.clear();
        self.attrs.clear();
        self.omap.clear();
    }

    /// `[offset, offset + len)` clipped to the current size, as the ops so far left it.
    /// Like [`ObjCtx::read`], as the store's own buffers where nothing in this request changed them.
    fn read_parts(&self, offset: u64, len: u64) -> Result<Vec<CrcBytes>, OsdError> {
        let end = offset.saturating_add(len).min(self.size);
        if self.data_ops.is_empty() && self.base_valid && offset < end {
            let parts = self
                .store
                .read_parts(self.oid.pg, &self.oid.name, offset, end - offset)
                .map_err(store_err)?;
            if parts.iter().map(|p| p.len() as u64).sum::<u64>() == end - offset {
                return Ok(parts);
            }
        }
        Ok(vec![self.read(offset, len)?.into()])
    }

    fn read(&self, offset: u64, len: u64) -> Result<Bytes, OsdError> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let n = (end - offset) as usize;
        let base = if self.base_valid {
            self.store.read(self.oid.pg, &self.oid.name, offset, end - offset).map_err(store_err)?
        } else {
            Bytes::new()
        };
        if self.data_ops.is_empty() && base.len() == n {
            return Ok(base);
        }
        let mut buf = BytesMut::zeroed(n);
        buf[..base.len()].copy_from_slice(&base);
        for op in &self.data_ops {
            let (from, to) = match op {
                DataOp::Write(o, _) | DataOp::Zero(o, _) => {
                    let l = match op {
                        DataOp::Write(_, b) => b.len() as u64,
                        DataOp::Zero(_, l) => *l,
                        DataOp::Truncate(_) => unreachable!(),
                    };
                    ((*o).max(offset), (o + l).min(end))
                }
                DataOp::Truncate(s) => ((*s).max(offset), end),
            };
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match op {
                DataOp::Write(o, b) => dst.copy_from_slice(&b[(from - o) as usize..(to - o) as usize]),
                DataOp::Zero(..) | DataOp::Truncate(_) => dst.fill(0),
            }
        }
        Ok(buf.freeze())
    }

    fn getattr(&self, name: &str) -> Result<Option<Bytes>, OsdError> {
        if let Some(v) = self.attrs.get(name) {
            return Ok(v.clone());
        }
        if !self.base_valid {
            return Ok(None);
        }
        match self.store.getattr(self.oid.pg, &self.oid.name, name) {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NoAttr { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    fn omap_get(&self, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, OsdError> {
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        if self.base_valid {
            let from_store: Vec<String> =
                keys.iter().filter(|k| !self.omap.contains_key(*k)).cloned().collect();
            for (k, v) in self.store.omap_get(self.oid.pg, &self.oid.name, &from_store).map_err(store_err)? {
                out.insert(k, v);
            }
        }
        for k in keys {
            if let Some(Some(v)) = self.omap.get(k) {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The object's attribute names: the stored ones with this request's changes over them.
    fn attr_names(&self) -> Result<Vec<String>, OsdError> {
        let mut names: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        if self.base_valid {
            match self.store.getattrs(self.oid.pg, &self.oid.name) {
                Ok(attrs) => names.extend(attrs.into_iter().map(|(k, _)| k)),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        for (k, v) in &self.attrs {
            match v {
                Some(_) => names.insert(k.clone()),
                None => names.remove(k),
            };
        }
        Ok(names.into_iter().collect())
    }

    fn omap_keys(&self, after: &str, max: usize) -> Result<Vec<String>, OsdError> {
        use std::ops::Bound;
        let mut keys: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        if self.base_valid {
            // Fetch enough stored keys that removals made earlier in this request cannot leave us short.
            let removed = self.omap.values().filter(|v| v.is_none()).count();
            let from = if after.is_empty() { None } else { Some(after) };
            for (k, _) in
                self.store.omap_list(self.oid.pg, &self.oid.name, from, max + removed).map_err(store_err)?
            {
                keys.insert(k);
            }
        }
        for (k, v) in self.omap.range::<str, _>((Bound::Excluded(after), Bound::Unbounded)) {
            match v {
                Some(_) => keys.insert(k.clone()),
                None => keys.remove(k),
            };
        }
        Ok(keys.into_iter().filter(|k| k.as_str() > after).take(max).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rados::ids::{Epoch, PoolId};

    use crate::store::MemStore;

    const LIMITS: OpLimits =
        OpLimits { max_object_size: 1 << 20, max_write_size: 1 << 16, max_object_name_len: 16 };

    fn pg() -> PgId {
        PgId::new(PoolId(1), 0)
    }

    fn ver(v: u64) -> Eversion {
        Eversion { epoch: Epoch(1), v }
    }

    /// Executes and applies; returns the outcome.
    fn run(s: &MemStore, name: &str, ops: Vec<OsdOp>, payload: &[u8], v: u64) -> Result<Executed, OsdError> {
        let ex = execute(s, pg(), name, &ops, &Bytes::copy_from_slice(payload).into(), &LIMITS, ver(v))?;
        s.apply(&ex.txn).unwrap();
        Ok(ex)
    }

    fn check_err(s: &MemStore, name: &str, ops: Vec<OsdOp>, payload: &[u8], want: fn(&OsdError) -> bool) {
        let before: Vec<_> = s.list(pg(), None, 100);
        match execute(s, pg(), name, &ops, &Bytes::copy_from_slice(payload).into(), &LIMITS, ver(99)) {
            Ok(ex) => panic!("{ops:?} succeeded: {:?}", ex.outs),
            Err(e) => assert!(want(&e), "{ops:?}: unexpected {e:?}"),
        }
        assert_eq!(s.list(pg(), None, 100), before, "a failed op changes nothing");
    }

    #[test]
    fn every_op_works_and_versions_follow_writes() {
        // Goal: each op's effect and output, and the version rule (object version = version of its last
        // write). Method: a sequence of requests on one object, checking outputs and the stored state.
        let s = MemStore::new();
        let ex = run(&s, "o", vec![OsdOp::Write { offset: 2, len: 3 }], b"abc", 1).unwrap();
        assert_eq!(ex.outs, vec![OpOut::None]);
        assert_eq!(s.stat(pg(), "o").unwrap().version, ver(1));
        let ex = run(&s, "o", vec![OsdOp::Read { offset: 0, len: 0 }, OsdOp::Stat], b"", 0).unwrap();
        assert_eq!(ex.outs, vec![OpOut::Data { len: 5 }, OpOut::Stat { size: 5, version: 1 }]);
        assert_eq!(&ex.data.concat()[..], b"\0\0abc");
        assert!(ex.txn.is_empty(), "reads change nothing");

        run(&s, "o", vec![OsdOp::Append { len: 2 }], b"de", 2).unwrap();
        run(&s, "o", vec![OsdOp::Zero { offset: 3, len: 100 }], b"", 3).unwrap();
        let ex = run(&s, "o", vec![OsdOp::Read { offset: 0, len: 0 }], b"", 0).unwrap();
        assert_eq!(&ex.data.concat()[..], b"\0\0a\0\0\0\0", "zero is clipped to the object");
        run(&s, "o", vec![OsdOp::WriteFull { len: 4 }], b"wxyz", 4).unwrap();
        run(&s, "o", vec![OsdOp::Truncate { size: 2 }], b"", 5).unwrap();
        let ex = run(&s, "o", vec![OsdOp::Read { offset: 1, len: 10 }, OsdOp::Stat], b"", 0).unwrap();
        assert_eq!(&ex.data.concat()[..], b"x");
        assert_eq!(ex.outs[1], OpOut::Stat { size: 2, version: 5 });

        run(&s, "o", vec![OsdOp::SetXattr { name: "a".into(), len: 2 }], b"av", 6).unwrap();
        let ex = run(&s, "o", vec![OsdOp::GetXattr { name: "a".into() }], b"", 0).unwrap();
        assert_eq!(&ex.data.concat()[..], b"av");
        run(&s, "o", vec![OsdOp::RmXattr { name: "a".into() }], b"", 7).unwrap();
        check_err(&s, "o", vec![OsdOp::GetXattr { name: "a".into() }], b"", |e| *e == OsdError::NoAttr);
        check_err(&s, "o", vec![OsdOp::RmXattr { name: "a".into() }], b"", |e| *e == OsdError::NoAttr);

        let kv = |k: &str, v: &str| (k.to_string(), v.as_bytes().to_vec());
        run(
            &s,
            "o",
            vec![OsdOp::OmapSet { keys: vec![kv("k1", "1"), kv("k2", "2"), kv("k3", "3")] }],
            b"",
            8,
        )
        .unwrap();
        run(&s, "o", vec![OsdOp::OmapRm { keys: vec!["k2".into()] }], b"", 9).unwrap();
        let ex = run(
            &s,
            "o",
            vec![
                OsdOp::OmapGet { keys: vec!["k1".into(), "k2".into()] },
                OsdOp::OmapGetKeys { after: String::new(), max: 10 },
                OsdOp::OmapGetKeys { after: "k1".into(), max: 10 },
            ],
            b"",
            0,
        )
        .unwrap();
        assert_eq!(
            ex.outs,
            vec![
                OpOut::Pairs(vec![kv("k1", "1")]),
                OpOut::Keys(vec!["k1".into(), "k3".into()]),
                OpOut::Keys(vec!["k3".into()])
            ]
        );

        check_err(&s, "o", vec![OsdOp::Create { exclusive: true }], b"", |e| *e == OsdError::Exists);
        run(&s, "o", vec![OsdOp::Create { exclusive: false }], b"", 10).unwrap();
        run(&s, "o", vec![OsdOp::AssertVersion { version: 10 }, OsdOp::Remove], b"", 11).unwrap();
        assert!(s.stat(pg(), "o").is_err());
        check_err(&s, "o", vec![OsdOp::Remove], b"", |e| *e == OsdError::NotFound);
        // Zero on a missing object does nothing (as Ceph), and creates nothing.
        let ex = run(&s, "o", vec![OsdOp::Zero { offset: 0, len: 10 }], b"", 12).unwrap();
        assert!(!ex.exists_after);
        assert!(s.stat(pg(), "o").is_err());
        run(&s, "t", vec![OsdOp::Truncate { size: 9 }], b"", 13).unwrap();
        assert_eq!(s.stat(pg(), "t").unwrap().size, 9, "truncate creates, as Ceph");
    }

    #[test]
    fn every_error_is_typed_and_leaves_the_object_alone() {
        // Goal: each failure mode gives its typed error and applies nothing. Method: one bad request per case
        // against an existing object and a missing one.
        let s = MemStore::new();
        run(&s, "o", vec![OsdOp::Write { offset: 0, len: 3 }], b"abc", 1).unwrap();
        let missing = [
            OsdOp::Read { offset: 0, len: 1 },
            OsdOp::Stat,
            OsdOp::Remove,
            OsdOp::GetXattr { name: "a".into() },
            OsdOp::RmXattr { name: "a".into() },
            OsdOp::OmapGet { keys: vec![] },
            OsdOp::OmapGetKeys { after: String::new(), max: 1 },
            OsdOp::OmapRm { keys: vec![] },
        ];
        for op in missing {
            check_err(&s, "nope", vec![op], b"", |e| *e == OsdError::NotFound);
        }
        check_err(&s, "o", vec![OsdOp::AssertVersion { version: 7 }], b"", |e| {
            *e == OsdError::VersionMismatch { actual: 1 }
        });
        check_err(&s, "nope", vec![OsdOp::AssertVersion { version: 1 }], b"", |e| {
            *e == OsdError::VersionMismatch { actual: 0 }
        });
        let big = vec![0u8; (LIMITS.max_write_size + 1) as usize];
        check_err(&s, "o", vec![OsdOp::Write { offset: 0, len: big.len() as u64 }], &big, |e| {
            matches!(e, OsdError::TooLarge(_))
        });
        check_err(&s, "o", vec![OsdOp::Write { offset: LIMITS.max_object_size, len: 1 }], b"x", |e| {
            matches!(e, OsdError::TooLarge(_))
        });
        check_err(&s, "o", vec![OsdOp::Truncate { size: LIMITS.max_object_size + 1 }], b"", |e| {
            matches!(e, OsdError::TooLarge(_))
        });
        check_err(&s, "o", vec![OsdOp::Write { offset: u64::MAX, len: 1 }], b"x", |e| {
            matches!(e, OsdError::Invalid(_) | OsdError::TooLarge(_))
        });
        check_err(&s, "o", vec![OsdOp::Write { offset: 0, len: 3 }], b"ab", |e| {
            matches!(e, OsdError::Invalid(_))
        });
        check_err(&s, "o", vec![OsdOp::Write { offset: 0, len: 1 }], b"ab", |e| {
            matches!(e, OsdError::Invalid(_))
        });
        check_err(&s, "o", vec![], b"", |e| matches!(e, OsdError::Invalid(_)));
        check_err(&s, "", vec![OsdOp::Stat], b"", |e| matches!(e, OsdError::Invalid(_)));
        check_err(&s, &"n".repeat(17), vec![OsdOp::Stat], b"", |e| matches!(e, OsdError::TooLarge(_)));
        check_err(&s, "o", vec![OsdOp::SetXattr { name: String::new(), len: 0 }], b"", |e| {
            matches!(e, OsdError::Invalid(_))
        });
        check_err(&s, "o", vec![OsdOp::SetXattr { name: "a".repeat(256), len: 0 }], b"", |e| {
            matches!(e, OsdError::TooLarge(_))
        });
        check_err(&s, "o", vec![OsdOp::OmapSet { keys: vec![("k".repeat(5000), vec![])] }], b"", |e| {
            matches!(e, OsdError::TooLarge(_))
        });
        // A compound op fails as a whole: the write before the failing assert is not applied.
        check_err(
            &s,
            "o",
            vec![OsdOp::Write { offset: 0, len: 3 }, OsdOp::AssertVersion { version: 5 }],
            b"XYZ",
            |e| matches!(e, OsdError::VersionMismatch { .. }),
        );
        check_err(
            &s,
            "new",
            vec![OsdOp::Create { exclusive: false }, OsdOp::Stat, OsdOp::Remove, OsdOp::Remove],
            b"",
            |e| *e == OsdError::NotFound,
        );
        let ex = run(&s, "o", vec![OsdOp::Read { offset: 0, len: 0 }], b"", 0).unwrap();
        assert_eq!(&ex.data.concat()[..], b"abc");
    }

    #[test]
    fn reads_inside_a_request_see_its_earlier_writes() {
        // Goal: ops run in order against the object as the earlier ops of the same request left it. Method:
        // write, truncate, re-grow, remove and re-create inside single requests and read in between.
        let s = MemStore::new();
        run(&s, "o", vec![OsdOp::Write { offset: 0, len: 6 }], b"abcdef", 1).unwrap();
        let ex = run(
            &s,
            "o",
            vec![
                OsdOp::Write { offset: 4, len: 4 },
                OsdOp::Read { offset: 0, len: 0 },
                OsdOp::Truncate { size: 2 },
                OsdOp::Write { offset: 5, len: 1 },
                OsdOp::Read { offset: 0, len: 0 },
                OsdOp::SetXattr { name: "x".into(), len: 1 },
                OsdOp::GetXattr { name: "x".into() },
                OsdOp::OmapSet { keys: vec![("a".into(), b"1".to_vec())] },
                OsdOp::OmapGetKeys { after: String::new(), max: 5 },
            ],
            b"WXYZ!v",
            2,
        )
        .unwrap();
        assert_eq!(
            ex.outs,
            vec![
                OpOut::None,
                OpOut::Data { len: 8 },
                OpOut::None,
                OpOut::None,
                OpOut::Data { len: 6 },
                OpOut::None,
                OpOut::Data { len: 1 },
                OpOut::None,
                OpOut::Keys(vec!["a".into()]),
            ]
        );
        assert_eq!(&ex.data.concat()[..], b"abcdWXYZab\0\0\0!v");
        let stored = run(&s, "o", vec![OsdOp::Read { offset: 0, len: 0 }], b"", 0).unwrap();
        assert_eq!(&stored.data.concat()[..], b"ab\0\0\0!");

        let ex = run(
            &s,
            "o",
            vec![
                OsdOp::Remove,
                OsdOp::Create { exclusive: true },
                OsdOp::Read { offset: 0, len: 0 },
                OsdOp::OmapGetKeys { after: String::new(), max: 5 },
            ],
            b"",
            3,
        )
        .unwrap();
        assert_eq!(ex.outs[2], OpOut::Data { len: 0 });
        assert_eq!(ex.outs[3], OpOut::Keys(vec![]));
        assert!(s.getattrs(pg(), "o").unwrap().is_empty(), "re-created object has no attributes");
        assert_eq!(s.stat(pg(), "o").unwrap(), ObjectStat { size: 0, version: ver(3) });
    }
}
