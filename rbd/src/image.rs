//! Images: Ceph's format 2 on top of the Objecter, and the image I/O path.
//!
//! Objects of one pool (names as Ceph's `rbd_types.h`):
//! - `rbd_directory`: omap `name_<name>` -> id and `id_<id>` -> name (Ceph's `dir_*` cls keys).
//! - `rbd_id.<name>`: the image id as its data.
//! - `rbd_header.<id>`: a postcard [`Header`] as its data (size, order, stripe unit and count, features,
//!   creation time). Every update is a read-modify-write guarded by `assert_version`, retried on
//!   `VersionMismatch`, so concurrent clients never lose each other's changes.
//! - `rbd_data.<id>.<object number, 16 hex>`: the data ([`striper::object_name`]).
//!
//! I/O: an image request is mapped by the [`Layout`] to object extents, grouped per object into one compound
//! op each, and handed to the image's object dispatch (`dispatch.rs`), which keeps at most `queue_depth`
//! object ops in flight for the whole image: it starts them on the caller's thread, or parks them in a
//! bounded FIFO that completions drain. Completions of object ops run on messenger threads and only copy
//! bytes (none for a read of one object extent) and count down; the image request's [`AioCompletion`] (or
//! the callback of an `aio_*_with` call) fires when its last object op has answered.
//!
//! Above object dispatch sit the layers of [`crate::layers`] (write-back cache, read-ahead), chosen by
//! [`ImageOptions`] at open.
//!
//! What it deliberately is not (yet): no watch/notify (a handle learns of another client's resize only through [`Image::refresh`]), no
//! snapshots, clones, exclusive lock or object map.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rados::config::{secs, Config};
use rados::objecter::{IoCtx, ObjectOperation, Objecter, OpReply, RadosError};
use serde::{Deserialize, Serialize};

use crate::dispatch::{
    Dispatch, Limits, ObjOp, ObjectSink, OnDone, CALLBACK_PARKED_OPS_MAX, PARKED_OPS_MAX, SUBMIT_WAIT_MAX,
};
use crate::layers::{Cache, CacheOptions, Done, Layer, Readahead, ReadaheadOptions, Req};
use crate::striper::{self, Layout, LayoutError, ObjectExtent};

/// The directory object of a pool (`RBD_DIRECTORY`).
pub const DIRECTORY_OBJECT: &str = "rbd_directory";
/// Prefix of the id objects (`RBD_ID_PREFIX`).
pub const ID_OBJECT_PREFIX: &str = "rbd_id.";
/// Prefix of the header objects (`RBD_HEADER_PREFIX`).
pub const HEADER_OBJECT_PREFIX: &str = "rbd_header.";
/// Longest image name. Ceph's `RBD_MAX_IMAGE_NAME_SIZE` is 96 for format 1; we keep it so that
/// `rbd_id.<name>` stays far below the OSD's object name limit.
pub const IMAGE_NAME_MAX: usize = 96;
/// Feature bit: fancy striping (stripe unit below object size or stripe count above 1), as Ceph.
pub const FEATURE_STRIPINGV2: u64 = 2;
/// Object ops in flight per image, as `rbd_concurrent_management_ops` for management and a typical NBD
/// queue depth for I/O.
pub const QUEUE_DEPTH_DEFAULT: usize = 32;
/// Steps per compound op: well below the OSD's 256 so one op never gets refused.
const STEPS_PER_OP_MAX: usize = 64;
/// Header read-modify-write attempts before giving up (each failure means another client won a race).
const HEADER_RETRIES_MAX: u32 = 100;
/// Directory pages when listing.
const LIST_PAGE: u32 = 512;
/// Pool object names per listing round trip when looking for an image's data objects.
const DATA_LIST_PAGE: usize = 1024;
/// Data objects removed between two progress reports.
const REMOVE_BATCH: usize = 256;

/// How a long image operation advances (for a progress line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Pool objects listed so far while looking for the image's data objects.
    Listed { objects: u64 },
    /// Data objects removed of those found.
    Removed { done: u64, total: u64 },
}
const DIR_NAME_KEY: &str = "name_";
const DIR_ID_KEY: &str = "id_";
/// Header blob format; bumped if [`Header`] changes shape.
const HEADER_FORMAT: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbdError {
    #[error("i/o at offset {offset} of {len} bytes is beyond the image size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no such image '{0}'")]
    NoSuchImage(String),
    #[error("no such pool '{0}'")]
    NoSuchPool(String),
    #[error("image '{0}' already exists")]
    Exists(String),
    #[error("shrinking from {from} to {to} bytes needs the allow-shrink flag")]
    ShrinkNeedsFlag { from: u64, to: u64 },
    #[error("invalid image name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("invalid layout: {0}")]
    InvalidLayout(#[from] LayoutError),
    #[error("corrupt image metadata in {object}: {why}")]
    Corrupt { object: String, why: String },
    #[error("the image handle is closed")]
    Closed,
    #[error("too many object ops queued ({parked_ops} parked; waited {waited_ms} ms for room)")]
    QueueFull { parked_ops: usize, waited_ms: u64 },
    #[error("bad value for option {option}: {why}")]
    BadOption { option: &'static str, why: String },
    #[error("rados: {0}")]
    Rados(RadosError),
}

impl From<RadosError> for RbdError {
    fn from(e: RadosError) -> Self {
        match e {
            RadosError::NoSuchPool(p) => RbdError::NoSuchPool(p),
            e => RbdError::Rados(e),
        }
    }
}

pub type Result<T, E = RbdError> = std::result::Result<T, E>;

/// The content of `rbd_header.<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u8,
    pub size: u64,
    pub order: u32,
    pub stripe_unit: u64,
    pub stripe_count: u32,
    pub features: u64,
    /// Seconds since the Unix epoch.
    pub created_unix_s: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a header always encodes")
    }

    /// Decodes and validates (the layout must be one [`Layout::new`] accepts).
    pub fn decode(object: &str, b: &[u8]) -> Result<Header> {
        let corrupt = |why: String| RbdError::Corrupt { object: object.to_string(), why };
        let h: Header = postcard::from_bytes(b).map_err(|e| corrupt(e.to_string()))?;
        if h.format != HEADER_FORMAT {
            return Err(corrupt(format!("header format {} (expected {HEADER_FORMAT})", h.format)));
        }
        h.layout().map_err(|e| corrupt(e.to_string()))?;
        Ok(h)
    }

    pub fn layout(&self) -> Result<Layout, LayoutError> {
        if !(striper::OBJECT_ORDER_MIN..=striper::OBJECT_ORDER_MAX).contains(&self.order) {
            return Err(LayoutError::ObjectOrderOutOfRange { order: self.order });
        }
        Layout::new(1u64 << self.order, self.stripe_unit, self.stripe_count)
    }
}

/// Layout options for [`Rbd::create`]; `None` takes Ceph's default (order 22, stripe unit = object size,
/// stripe count 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub order: Option<u32>,
    pub stripe_unit: Option<u64>,
    pub stripe_count: Option<u32>,
}

impl CreateOptions {
    pub fn layout(&self) -> Result<Layout> {
        let order = self.order.unwrap_or(striper::OBJECT_ORDER_DEFAULT);
        if !(striper::OBJECT_ORDER_MIN..=striper::OBJECT_ORDER_MAX).contains(&order) {
            return Err(LayoutError::ObjectOrderOutOfRange { order }.into());
        }
        let os = 1u64 << order;
        Ok(Layout::new(os, self.stripe_unit.unwrap_or(os), self.stripe_count.unwrap_or(1))?)
    }
}

/// What `rbd info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub order: u32,
    pub object_size: u64,
    pub stripe_unit: u64,
    pub stripe_count: u32,
    pub features: u64,
    pub created_unix_s: u64,
    /// Objects the image spans (not all need exist).
    pub num_objs: u64,
    /// `rbd_data.<id>`.
    pub block_name_prefix: String,
}

/// Checks an image name: 1..=96 bytes, no '/', '@' (the CLI's pool and snapshot separators), no control
/// characters.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why| Err(RbdError::InvalidName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > IMAGE_NAME_MAX {
        return bad("longer than 96 bytes");
    }
    if name.contains(['/', '@']) {
        return bad("contains '/' or '@'");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    Ok(())
}

pub fn id_object(name: &str) -> String {
    format!("{ID_OBJECT_PREFIX}{name}")
}

pub fn header_object(id: &str) -> String {
    format!("{HEADER_OBJECT_PREFIX}{id}")
}

/// A fresh image id: 16 hex digits from the clock, the process and a counter (Ceph uses the client's
/// global id and a random number; uniqueness within a pool is what matters, and the directory update
/// refuses a clash).
fn new_image_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let mix = t ^ (u64::from(std::process::id()) << 40) ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(20);
    // A cheap avalanche so that ids made close in time do not share long prefixes.
    let mut x = mix.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    format!("{x:016x}")
}

fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn ignore_not_found(r: Result<OpReply, RadosError>) -> Result<(), RadosError> {
    match r {
        Ok(_) | Err(RadosError::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs `ops` with at most `depth` in flight (management paths: remove, shrink).
fn run_bounded(
    io: &IoCtx,
    ops: impl IntoIterator<Item = (String, ObjectOperation)>,
    depth: usize,
) -> Result<()> {
    let mut inflight = std::collections::VecDeque::new();
    let mut first_err = None;
    for (oid, op) in ops {
        if inflight.len() >= depth.max(1) {
            let c: rados::objecter::Completion = inflight.pop_front().expect("non-empty");
            if let Err(e) = ignore_not_found(c.wait()) {
                first_err.get_or_insert(e);
            }
        }
        match io.aio_operate(&oid, op) {
            Ok(c) => inflight.push_back(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for c in inflight {
        if let Err(e) = ignore_not_found(c.wait()) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), |e| Err(e.into()))
}

/// The ops that cut the image's data at `new_size` (it was `old_size`): objects wholly beyond are removed,
/// the one object per column that straddles the cut is truncated. Bytes of one object lie in increasing
/// image order, so what is beyond the cut in an object is always a suffix of it.
fn trim_ops(id: &str, layout: &Layout, old_size: u64, new_size: u64) -> Vec<(String, ObjectOperation)> {
    if new_size >= old_size {
        return Vec::new();
    }
    let set_bytes = layout.object_set_bytes();
    let sc = u64::from(layout.stripe_count());
    let set_of_cut = new_size / set_bytes;
    let set_end = ((set_of_cut + 1) * set_bytes).min(old_size);
    // Lowest in-object offset beyond the cut, per object of the set holding the cut.
    let mut cut_at: BTreeMap<u64, u64> = BTreeMap::new();
    if set_end > new_size {
        for e in layout.map_extent(new_size, set_end - new_size).expect("within the image") {
            let v = cut_at.entry(e.object_no).or_insert(e.offset_in_object);
            *v = (*v).min(e.offset_in_object);
        }
    }
    let mut ops = Vec::new();
    for (object_no, off) in cut_at {
        let op = if off == 0 {
            ObjectOperation::new().remove()
        } else {
            // The stat guard fails the op on an absent object, so truncate never creates one.
            ObjectOperation::new().stat().truncate(off)
        };
        ops.push((striper::object_name(id, object_no), op));
    }
    for object_no in (set_of_cut + 1) * sc..layout.object_count(old_size) {
        ops.push((striper::object_name(id, object_no), ObjectOperation::new().remove()));
    }
    ops
}

/// Image management on one pool.
#[derive(Clone, Debug)]
pub struct Rbd {
    io: IoCtx,
    queue_depth: usize,
    objecter: ObjecterBudget,
}

impl Rbd {
    /// Fails with [`RbdError::NoSuchPool`] if the pool does not exist.
    pub fn new(objecter: &Arc<Objecter>, pool: &str) -> Result<Rbd> {
        Ok(Rbd {
            io: objecter.ioctx(pool)?,
            queue_depth: QUEUE_DEPTH_DEFAULT,
            objecter: ObjecterBudget::default(),
        })
    }

    /// The in-flight budget of the Objecter under this handle (default: the config defaults); images
    /// opened from here keep their own budget within it (see [`ObjecterBudget`]).
    pub fn with_objecter_budget(mut self, budget: ObjecterBudget) -> Rbd {
        self.objecter = budget;
        self
    }

    /// Object ops in flight per image request or management call (at least 1).
    pub fn with_queue_depth(mut self, depth: usize) -> Rbd {
        self.queue_depth = depth.max(1);
        self
    }

    pub fn ioctx(&self) -> &IoCtx {
        &self.io
    }

    /// Read-modify-write of the directory, guarded by its version. `f` sees the current pairs of the keys
    /// asked for and returns the op to apply (or an error to stop).
    fn update_directory(
        &self,
        keys: &[String],
        f: impl Fn(&BTreeMap<String, Vec<u8>>, ObjectOperation) -> Result<ObjectOperation>,
    ) -> Result<()> {
        for _ in 0..HEADER_RETRIES_MAX {
            let (version, pairs) =
                match self.io.operate(DIRECTORY_OBJECT, ObjectOperation::new().omap_get(keys.to_vec())) {
                    Ok(r) => (r.version, r.pairs(0)?),
                    Err(RadosError::NotFound) => (0, BTreeMap::new()),
                    Err(e) => return Err(e.into()),
                };
            let op = f(&pairs, ObjectOperation::new().assert_version(version))?;
            match self.io.operate(DIRECTORY_OBJECT, op) {
                Ok(_) => return Ok(()),
                Err(RadosError::VersionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RbdError::Rados(RadosError::Invalid("rbd_directory kept changing under us".into())))
    }

    /// Creates an image of `size` bytes.
    pub fn create(&self, name: &str, size: u64, opts: CreateOptions) -> Result<()> {
        validate_name(name)?;
        let layout = opts.layout()?;
        let id = new_image_id();
        // The id object first, exclusively: it is what makes the name taken.
        match self.io.operate(&id_object(name), ObjectOperation::new().create(true).write_full(id.clone())) {
            Ok(_) => {}
            Err(RadosError::Exists) => return Err(RbdError::Exists(name.to_string())),
            Err(e) => return Err(e.into()),
        }
        let fancy = layout.stripe_count() > 1 || layout.stripe_unit_bytes() != layout.object_size_bytes();
        let header = Header {
            format: HEADER_FORMAT,
            size,
            order: layout.order(),
            stripe_unit: layout.stripe_unit_bytes(),
            stripe_count: layout.stripe_count(),
            features: if fancy { FEATURE_STRIPINGV2 } else { 0 },
            created_unix_s: now_unix_s(),
        };
        let r = self
            .io
            .operate(&header_object(&id), ObjectOperation::new().create(true).write_full(header.encode()))
            .map_err(RbdError::from)
            .and_then(|_| {
                let name_key = format!("{DIR_NAME_KEY}{name}");
                let id_key = format!("{DIR_ID_KEY}{id}");
                self.update_directory(std::slice::from_ref(&name_key), |pairs, op| {
                    if pairs.contains_key(&name_key) {
                        return Err(RbdError::Exists(name.to_string()));
                    }
                    Ok(op.omap_set([
                        (name_key.clone(), id.clone().into_bytes()),
                        (id_key.clone(), name.into()),
                    ]))
                })
            });
        if let Err(e) = r {
            // Undo what this call made, so that a failed create leaves the name free.
            let _ = self.io.remove(&header_object(&id));
            let _ = self.io.remove(&id_object(name));
            return Err(e);
        }
        Ok(())
    }

    /// The image's id, from `rbd_id.<name>`.
    pub fn image_id(&self, name: &str) -> Result<String> {
        validate_name(name)?;
        match self.io.read(&id_object(name), 0, 0) {
            Ok(b) => String::from_utf8(b.to_vec())
                .map_err(|_| RbdError::Corrupt { object: id_object(name), why: "id is not UTF-8".into() }),
            Err(RadosError::NotFound) => Err(RbdError::NoSuchImage(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    fn read_header(&self, id: &str, name: &str) -> Result<(Header, u64)> {
        let oid = header_object(id);
        match self.io.operate(&oid, ObjectOperation::new().read(0, 0)) {
            Ok(r) => Ok((Header::decode(&oid, &r.data(0)?)?, r.version)),
            Err(RadosError::NotFound) => Err(RbdError::NoSuchImage(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Image names, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut after = String::new();
        loop {
            let keys = match self.io.omap_get_keys(DIRECTORY_OBJECT, &after, LIST_PAGE) {
                Ok(k) => k,
                Err(RadosError::NotFound) => return Ok(names),
                Err(e) => return Err(e.into()),
            };
            let Some(last) = keys.last().cloned() else { return Ok(names) };
            names.extend(keys.iter().filter_map(|k| k.strip_prefix(DIR_NAME_KEY)).map(str::to_string));
            if keys.len() < LIST_PAGE as usize {
                return Ok(names);
            }
            after = last;
        }
    }

    /// Opens with Ceph's default layers (cache in writethrough-until-flush mode, read-ahead).
    pub fn open(&self, name: &str) -> Result<Image> {
        self.open_with(name, ImageOptions::default())
    }

    /// Opens with the given I/O layers.
    pub fn open_with(&self, name: &str, opts: ImageOptions) -> Result<Image> {
        let id = self.image_id(name)?;
        let (header, version) = self.read_header(&id, name)?;
        let limits = self.objecter.dispatch_limits(self.queue_depth);
        Image::start(self.io.clone(), name.to_string(), id, header, version, limits, opts)
    }

    pub fn info(&self, name: &str) -> Result<ImageInfo> {
        let id = self.image_id(name)?;
        let (header, _) = self.read_header(&id, name)?;
        Ok(info_of(name, &id, &header))
    }

    /// Removes an image: its data objects (in parallel, `queue_depth` at a time), header, id object and
    /// directory entries.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.remove_with(name, &mut |_| {})
    }

    /// [`Rbd::remove`], telling `progress` how the listing and the removal advance. The data objects
    /// removed are the ones that exist, found by listing the pool ([`Rbd::data_objects`]): a sparse 9999 TiB
    /// image costs what its written objects and the pool's listing cost, not 2.6 billion removes.
    pub fn remove_with(&self, name: &str, progress: &mut dyn FnMut(Progress)) -> Result<()> {
        let id = self.image_id(name)?;
        // A create that died half-way has no header, but may have data objects: they go too.
        let objects = self.data_objects(&id, progress)?;
        let total = objects.len() as u64;
        let mut done = 0u64;
        for chunk in objects.chunks(REMOVE_BATCH) {
            let ops = chunk.iter().map(|&n| (striper::object_name(&id, n), ObjectOperation::new().remove()));
            run_bounded(&self.io, ops, self.queue_depth)?;
            done += chunk.len() as u64;
            progress(Progress::Removed { done, total });
        }
        match self.read_header(&id, name) {
            Ok(_) => ignore_not_found(self.io.operate(&header_object(&id), ObjectOperation::new().remove()))?,
            Err(RbdError::NoSuchImage(_)) => {}
            Err(e) => return Err(e),
        }
        let name_key = format!("{DIR_NAME_KEY}{name}");
        let id_key = format!("{DIR_ID_KEY}{id}");
        self.update_directory(std::slice::from_ref(&name_key), |_, op| {
            Ok(op.omap_rm([name_key.clone(), id_key.clone()]))
        })?;
        ignore_not_found(self.io.operate(&id_object(name), ObjectOperation::new().remove()))?;
        Ok(())
    }

    /// The numbers of the data objects image `id` has, in order: the pool's objects named with the image's
    /// data prefix (`rbd_data.<id>.`), found by listing the pool a page at a time. This is the work Ceph's
    /// object map saves: without one, finding the written objects of a large sparse image by trying each
    /// possible object costs one op per object the image could have.
    pub fn data_objects(&self, id: &str, progress: &mut dyn FnMut(Progress)) -> Result<Vec<u64>> {
        let mut found = Vec::new();
        let mut cursor = None;
        let mut listed = 0u64;
        loop {
            let (names, next) = self.io.list(cursor.as_ref(), DATA_LIST_PAGE)?;
            listed += names.len() as u64;
            found.extend(
                names
                    .iter()
                    .filter_map(|n| striper::parse_object_name(n))
                    .filter(|(i, _)| *i == id)
                    .map(|(_, n)| n),
            );
            progress(Progress::Listed { objects: listed });
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }

    /// Renames an image; open handles keep working (they address it by id).
    pub fn rename(&self, src: &str, dst: &str) -> Result<()> {
        validate_name(dst)?;
        let id = self.image_id(src)?;
        match self.io.operate(&id_object(dst), ObjectOperation::new().create(true).write_full(id.clone())) {
            Ok(_) => {}
            Err(RadosError::Exists) => return Err(RbdError::Exists(dst.to_string())),
            Err(e) => return Err(e.into()),
        }
        let src_key = format!("{DIR_NAME_KEY}{src}");
        let dst_key = format!("{DIR_NAME_KEY}{dst}");
        let id_key = format!("{DIR_ID_KEY}{id}");
        let r = self.update_directory(&[src_key.clone(), dst_key.clone()], |pairs, op| {
            if pairs.contains_key(&dst_key) {
                return Err(RbdError::Exists(dst.to_string()));
            }
            if !pairs.contains_key(&src_key) {
                return Err(RbdError::NoSuchImage(src.to_string()));
            }
            Ok(op
                .omap_rm([src_key.clone()])
                .omap_set([(dst_key.clone(), id.clone().into_bytes()), (id_key.clone(), dst.into())]))
        });
        if let Err(e) = r {
            let _ = self.io.remove(&id_object(dst));
            return Err(e);
        }
        ignore_not_found(self.io.operate(&id_object(src), ObjectOperation::new().remove()))?;
        Ok(())
    }
}

fn info_of(name: &str, id: &str, h: &Header) -> ImageInfo {
    let layout = h.layout().expect("decode checked the layout");
    ImageInfo {
        name: name.to_string(),
        id: id.to_string(),
        size: h.size,
        order: h.order,
        object_size: layout.object_size_bytes(),
        stripe_unit: h.stripe_unit,
        stripe_count: h.stripe_count,
        features: h.features,
        created_unix_s: h.created_unix_s,
        num_objs: layout.object_count(h.size),
        block_name_prefix: format!("{}{id}", striper::DATA_OBJECT_PREFIX),
    }
}

/// Groups object extents per object (first-appearance order) and chunks them into ops of at most
/// [`STEPS_PER_OP_MAX`] steps.
fn group_extents(extents: Vec<ObjectExtent>) -> Vec<(u64, Vec<ObjectExtent>)> {
    // The common request (4K inside one object) is one extent: no map, and the striper's vector is reused.
    if let [e] = extents.as_slice() {
        return vec![(e.object_no, extents)];
    }
    let mut order: Vec<u64> = Vec::new();
    let mut per: BTreeMap<u64, Vec<ObjectExtent>> = BTreeMap::new();
    for e in extents {
        per.entry(e.object_no)
            .or_insert_with(|| {
                order.push(e.object_no);
                Vec::new()
            })
            .push(e);
    }
    let mut out = Vec::new();
    for n in order {
        let v = per.remove(&n).expect("grouped");
        for chunk in v.chunks(STEPS_PER_OP_MAX) {
            out.push((n, chunk.to_vec()));
        }
    }
    out
}

/// Object ops for discarding the extents of one object: the whole object -> remove; otherwise zero the
/// pieces, truncating instead when a piece runs to the object's end (behind a stat guard, so absent
/// objects are not created).
fn discard_op(object_size: u64, pieces: &[ObjectExtent]) -> ObjectOperation {
    let covered: u64 = pieces.iter().map(|p| p.len).sum();
    if covered == object_size {
        return ObjectOperation::new().remove();
    }
    let mut op = ObjectOperation::new().stat();
    for p in pieces {
        op = if p.offset_in_object + p.len == object_size {
            op.truncate(p.offset_in_object)
        } else {
            op.zero(p.offset_in_object, p.len)
        };
    }
    op
}

/// The outcome of an asynchronous image request.
pub struct AioCompletion<T>(Arc<CompletionSlot<T>>);

impl<T> std::fmt::Debug for AioCompletion<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AioCompletion(done: {})", self.is_done())
    }
}

type CompletionSlot<T> = rados::completion::Slot<Result<T>>;

impl<T> AioCompletion<T> {
    fn new() -> (AioCompletion<T>, Arc<CompletionSlot<T>>) {
        let s = Arc::new(CompletionSlot::default());
        (AioCompletion(Arc::clone(&s)), s)
    }

    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }

    /// Hands the outcome to `f` instead of a waiter: at once (on this thread) if the request is already
    /// done, else on the thread that completes it (an Objecter callback thread), so `f` must not block.
    pub fn on_complete(self, f: impl FnOnce(Result<T>) + Send + 'static) {
        self.0.on_complete(f)
    }

    /// Waits for the outcome. Every object op ends (answer, its own timeout, or Objecter shutdown), so
    /// this ends too.
    pub fn wait(self) -> Result<T> {
        self.0.take_until(None).expect("waiting without a deadline ends with a result")
    }

    /// Waits at most `timeout`; gives the completion back if the request is still in flight.
    pub fn wait_timeout(self, timeout: Duration) -> std::result::Result<Result<T>, AioCompletion<T>> {
        match self.0.take_until(Some(Instant::now() + timeout)) {
            Some(r) => Ok(r),
            None => Err(self),
        }
    }
}

struct Shared {
    header: Header,
    version: u64,
    layout: Layout,
}

/// The bottom layer: maps image extents to per-object compound ops and hands them to the image's
/// [`Dispatch`] (its in-flight budget and FIFO; see `dispatch.rs`).
pub(crate) struct ObjectDispatch<S> {
    id: String,
    shared: Arc<Mutex<Shared>>,
    dispatch: Arc<Dispatch<S>>,
}

impl<S: ObjectSink> ObjectDispatch<S> {
    fn read_ops(&self, layout: &Layout, offset: u64, len: u64) -> Vec<ObjOp> {
        let extents = layout.map_extent(offset, len).expect("checked against the size");
        group_extents(extents)
            .into_iter()
            .map(|(n, pieces)| {
                let op =
                    pieces.iter().fold(ObjectOperation::new(), |op, p| op.read(p.offset_in_object, p.len));
                let bytes = pieces.iter().map(|p| p.len).sum();
                ObjOp { oid: striper::object_name(&self.id, n), op, bytes, on_done: OnDone::Read(pieces) }
            })
            .collect()
    }

    fn write_ops(&self, layout: &Layout, offset: u64, data: &Bytes) -> Vec<ObjOp> {
        let extents = layout.map_extent(offset, data.len() as u64).expect("checked against the size");
        group_extents(extents)
            .into_iter()
            .map(|(n, pieces)| {
                let op = pieces.iter().fold(ObjectOperation::new(), |op, p| {
                    let at = p.buffer_offset as usize;
                    op.write(p.offset_in_object, data.slice(at..at + p.len as usize))
                });
                let bytes = pieces.iter().map(|p| p.len).sum();
                ObjOp { oid: striper::object_name(&self.id, n), op, bytes, on_done: OnDone::Write }
            })
            .collect()
    }

    fn discard_ops(&self, layout: &Layout, offset: u64, len: u64) -> Vec<ObjOp> {
        let extents = layout.map_extent(offset, len).expect("checked against the size");
        let os = layout.object_size_bytes();
        // Whole-object detection needs all of an object's pieces together, so group without chunking
        // first and only then split the zero/truncate steps.
        let mut per: BTreeMap<u64, Vec<ObjectExtent>> = BTreeMap::new();
        for e in extents {
            per.entry(e.object_no).or_default().push(e);
        }
        let mut ops = Vec::new();
        for (n, pieces) in per {
            let whole = pieces.iter().map(|p| p.len).sum::<u64>() == os;
            let chunks: Vec<&[ObjectExtent]> =
                if whole { vec![&pieces[..]] } else { pieces.chunks(STEPS_PER_OP_MAX - 1).collect() };
            for c in chunks {
                ops.push(ObjOp {
                    oid: striper::object_name(&self.id, n),
                    op: discard_op(os, c),
                    // Removes, zeros and truncates carry no payload: the Objecter charges them nothing.
                    bytes: 0,
                    on_done: OnDone::AbsentOk,
                });
            }
        }
        ops
    }
}

impl<S: ObjectSink> Layer for ObjectDispatch<S> {
    fn submit(&self, req: Req, done: Done) {
        let layout = {
            let s = self.shared.lock();
            let (offset, len) = req.range();
            // Upper layers checked the range when the request arrived; a shrink since then (write-back of
            // data cut off by a resize) must not recreate objects past the end.
            if offset.checked_add(len).is_none_or(|end| end > s.header.size) {
                let size = s.header.size;
                drop(s);
                return done(Err(RbdError::OutOfRange { offset, len, size }));
            }
            s.layout
        };
        match req {
            Req::Read { offset, len } => {
                let ops = self.read_ops(&layout, offset, len);
                self.dispatch.submit(ops, len as usize, done)
            }
            Req::Write { offset, data } => {
                let ops = self.write_ops(&layout, offset, &data);
                self.dispatch.submit(ops, 0, done)
            }
            Req::Discard { offset, len } => {
                let ops = self.discard_ops(&layout, offset, len);
                self.dispatch.submit(ops, 0, done)
            }
        }
    }

    /// Every write is acknowledged only once the OSDs committed it: nothing to do here.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// How an image is opened: its I/O layers. Defaults are Ceph's: cache on (writethrough until the first
/// flush), read-ahead on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageOptions {
    pub cache: CacheOptions,
    pub readahead: ReadaheadOptions,
}

/// The Objecter's in-flight budget (`objecter_inflight_ops`, `objecter_inflight_op_bytes`).
///
/// Object dispatch starts parked ops from messenger threads, where `aio_operate` must not wait for room
/// in the Objecter's budget. It cannot wait while this image's own budget (queue depth, and these bytes) is
/// within the Objecter's and the image is the Objecter's only user, which is how the `rbd` tool and the NBD
/// server run. Images sharing an Objecter with other busy users should leave it headroom (a lower queue
/// depth): the Objecter then waits, bounded by its own timeout, but on a messenger thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjecterBudget {
    pub ops_max: usize,
    pub bytes_max: u64,
}

impl Default for ObjecterBudget {
    fn default() -> Self {
        ObjecterBudget::from_config(&Config::default())
    }
}

impl ObjecterBudget {
    /// The budget an Objecter built from `c` has.
    pub fn from_config(c: &Config) -> ObjecterBudget {
        ObjecterBudget { ops_max: c.objecter_inflight_ops.max(1), bytes_max: c.objecter_inflight_op_bytes }
    }

    /// The object dispatch budget of an image with queue depth `depth`: within this one.
    fn dispatch_limits(&self, depth: usize) -> Limits {
        Limits {
            depth: depth.min(self.ops_max).max(1),
            bytes_max: self.bytes_max,
            parked_max: PARKED_OPS_MAX,
            callback_parked_max: CALLBACK_PARKED_OPS_MAX,
            wait_max: SUBMIT_WAIT_MAX,
        }
    }
}

impl ImageOptions {
    /// No cache and no read-ahead: every call goes straight to object dispatch.
    pub fn uncached() -> ImageOptions {
        ImageOptions {
            cache: CacheOptions { enabled: false, ..Default::default() },
            readahead: ReadaheadOptions { enabled: false, ..Default::default() },
        }
    }

    /// The options the config's `rbd_cache*` and `rbd_readahead_*` give. Refuses
    /// Ceph's constraints broken: `rbd_cache_max_dirty <= rbd_cache_size`, and with a write-back cache
    /// `rbd_cache_target_dirty <= rbd_cache_max_dirty`.
    pub fn from_config(c: &Config) -> Result<ImageOptions> {
        let bad = |option: &'static str, why: String| Err(RbdError::BadOption { option, why });
        if c.rbd_cache_max_dirty > c.rbd_cache_size {
            return bad(
                "rbd_cache_max_dirty",
                format!("{} is above rbd_cache_size {}", c.rbd_cache_max_dirty, c.rbd_cache_size),
            );
        }
        if c.rbd_cache_max_dirty > 0 && c.rbd_cache_target_dirty > c.rbd_cache_max_dirty {
            return bad(
                "rbd_cache_target_dirty",
                format!(
                    "{} is above rbd_cache_max_dirty {}",
                    c.rbd_cache_target_dirty, c.rbd_cache_max_dirty
                ),
            );
        }
        Ok(ImageOptions {
            cache: CacheOptions {
                enabled: c.rbd_cache,
                size_bytes: c.rbd_cache_size,
                max_dirty_bytes: c.rbd_cache_max_dirty,
                target_dirty_bytes: c.rbd_cache_target_dirty,
                max_dirty_age: secs(c.rbd_cache_max_dirty_age),
                writethrough_until_flush: c.rbd_cache_writethrough_until_flush,
            },
            readahead: ReadaheadOptions {
                // As Ceph: a zero window turns read-ahead off.
                enabled: c.rbd_readahead_max_bytes > 0,
                trigger_requests: c.rbd_readahead_trigger_requests,
                max_bytes: c.rbd_readahead_max_bytes,
                disable_after_bytes: c.rbd_readahead_disable_after_bytes,
            },
        })
    }
}

/// An open image. I/O calls may come from many threads at once.
///
/// The I/O stack, top down: write-back [`Cache`] (optional) -> [`Readahead`] (optional) -> object dispatch.
pub struct Image {
    io: IoCtx,
    name: Mutex<String>,
    id: String,
    shared: Arc<Mutex<Shared>>,
    queue_depth: usize,
    dispatch: Arc<Dispatch<IoCtx>>,
    cache: Option<Arc<Cache>>,
    top: Arc<dyn Layer>,
    opts: ImageOptions,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({:?} id {})", self.name.lock(), self.id)
    }
}

/// An image's layers: the top of the stack, and the cache if there is one.
type Stack = (Arc<dyn Layer>, Option<Arc<Cache>>);

/// The layer stack over object dispatch, as [`ImageOptions`] ask.
fn build_stack<S: ObjectSink>(od: Arc<ObjectDispatch<S>>, opts: &ImageOptions) -> Result<Stack> {
    let shared = Arc::clone(&od.shared);
    let id = od.id.clone();
    let mut top: Arc<dyn Layer> = od;
    if opts.readahead.enabled {
        top = Arc::new(Readahead::new(opts.readahead, top, Box::new(move || shared.lock().header.size)));
    }
    let mut cache = None;
    if opts.cache.enabled {
        let c = Arc::new(Cache::start(opts.cache, Arc::clone(&top), &id)?);
        top = Arc::clone(&c) as Arc<dyn Layer>;
        cache = Some(c);
    }
    Ok((top, cache))
}

impl Image {
    fn start(
        io: IoCtx,
        name: String,
        id: String,
        header: Header,
        version: u64,
        limits: Limits,
        opts: ImageOptions,
    ) -> Result<Image> {
        let layout = header.layout()?;
        let dispatch = Dispatch::new(io.clone(), limits);
        let shared = Arc::new(Mutex::new(Shared { header, version, layout }));
        let od = Arc::new(ObjectDispatch {
            id: id.clone(),
            shared: Arc::clone(&shared),
            dispatch: Arc::clone(&dispatch),
        });
        let (top, cache) = build_stack(od, &opts)?;
        Ok(Image {
            io,
            name: Mutex::new(name),
            id,
            shared,
            queue_depth: limits.depth,
            dispatch,
            cache,
            top,
            opts,
        })
    }

    /// The options the image was opened with.
    pub fn options(&self) -> &ImageOptions {
        &self.opts
    }

    /// Object ops in flight at most (the queue depth, within the Objecter's budget).
    pub fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn size(&self) -> u64 {
        self.shared.lock().header.size
    }

    pub fn layout(&self) -> Layout {
        self.shared.lock().layout
    }

    pub fn info(&self) -> ImageInfo {
        info_of(&self.name.lock(), &self.id, &self.shared.lock().header)
    }

    /// Re-reads the header (another client may have resized the image).
    pub fn refresh(&self) -> Result<()> {
        let (h, v) = self.read_header()?;
        let mut s = self.shared.lock();
        s.layout = h.layout()?;
        s.header = h;
        s.version = v;
        drop(s);
        self.top.invalidate();
        Ok(())
    }

    fn read_header(&self) -> Result<(Header, u64)> {
        let oid = header_object(&self.id);
        match self.io.operate(&oid, ObjectOperation::new().read(0, 0)) {
            Ok(r) => Ok((Header::decode(&oid, &r.data(0)?)?, r.version)),
            Err(RadosError::NotFound) => Err(RbdError::NoSuchImage(self.name.lock().clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// Read-modify-write of the header against its current version, retried when another client got there
    /// first. `f` returns the new header, or `None` to leave it. Returns (old, new).
    fn update_header(&self, f: impl Fn(&Header) -> Result<Option<Header>>) -> Result<(Header, Header)> {
        for _ in 0..HEADER_RETRIES_MAX {
            let (old, version) = self.read_header()?;
            // Whatever `f` decides, the handle now knows the fresh header.
            self.install(old.clone(), version);
            let Some(new) = f(&old)? else { return Ok((old.clone(), old)) };
            let op = ObjectOperation::new().assert_version(version).write_full(new.encode());
            match self.io.operate(&header_object(&self.id), op) {
                Ok(r) => {
                    self.install(new.clone(), r.version);
                    return Ok((old, new));
                }
                Err(RadosError::VersionMismatch { actual }) => {
                    tracing::debug!(image = %self.id, version, actual, "header changed under us; retrying");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(RbdError::Rados(RadosError::Invalid("the image header kept changing under us".into())))
    }

    fn install(&self, h: Header, version: u64) {
        let mut s = self.shared.lock();
        if version >= s.version {
            s.layout = h.layout().expect("validated");
            s.header = h;
            s.version = version;
        }
    }

    /// Sets the size. Growing only updates the header; shrinking needs `allow_shrink` and then removes or
    /// truncates the data beyond the new end (after the header commits, so the cut bytes are never visible
    /// as part of the image while being cut). The cache is flushed first (as librbd does), so no dirty
    /// bytes past the new end are left to write back.
    pub fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.top.flush()?;
        let (old, new) = self.update_header(|h| {
            if new_size == h.size {
                return Ok(None);
            }
            if new_size < h.size && !allow_shrink {
                return Err(RbdError::ShrinkNeedsFlag { from: h.size, to: new_size });
            }
            Ok(Some(Header { size: new_size, ..h.clone() }))
        })?;
        self.top.invalidate();
        let layout = new.layout()?;
        run_bounded(&self.io, trim_ops(&self.id, &layout, old.size, new.size), self.queue_depth)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let s = self.shared.lock();
        match offset.checked_add(len) {
            Some(end) if end <= s.header.size => Ok(()),
            _ => Err(RbdError::OutOfRange { offset, len, size: s.header.size }),
        }
    }

    /// Starts a request whose outcome goes to `done`, on the thread that completes it.
    fn submit_with(&self, req: Req, done: Done) -> Result<()> {
        self.admit(&req)?;
        self.top.submit(req, done);
        Ok(())
    }

    /// Refuses a request out of the image's range or on a closed image, before anything starts.
    fn admit(&self, req: &Req) -> Result<()> {
        let (offset, len) = req.range();
        self.check_range(offset, len)?;
        if self.dispatch.is_closed() {
            return Err(RbdError::Closed);
        }
        Ok(())
    }

    fn submit<T: Send + 'static>(
        &self,
        req: Req,
        map: impl FnOnce(Bytes) -> T + Send + 'static,
    ) -> Result<AioCompletion<T>> {
        let (c, slot) = AioCompletion::new();
        self.submit_with(req, Box::new(move |r| slot.complete(r.map(map))))?;
        Ok(c)
    }

    /// [`Image::aio_read`] with the outcome handed to `f` instead of an [`AioCompletion`]: no completion
    /// slot to allocate and lock per request (the NBD server's path). `f` runs exactly once, on the thread
    /// that completes the request (a messenger thread, or this one when it completes at once), so it must
    /// not block. On `Err` nothing was started and `f` is dropped unrun.
    pub fn aio_read_with(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(Result<Bytes>) + Send + 'static,
    ) -> Result<()> {
        self.submit_with(Req::Read { offset, len }, Box::new(f))
    }

    /// [`Image::aio_write`] with the outcome handed to `f` (see [`Image::aio_read_with`]).
    pub fn aio_write_with(
        &self,
        offset: u64,
        data: Bytes,
        f: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.submit_with(Req::Write { offset, data }, Box::new(move |r| f(r.map(|_| ()))))
    }

    /// [`Image::aio_write_with`] for a caller that must not wait (an event loop): `Ok(Some(data))` hands the
    /// write back unstarted, with `f` dropped unrun, when starting it would wait in the write-back cache (over
    /// its dirty limit); the caller then submits it where waiting is allowed. Without a cache, or while the
    /// cache writes through, it always starts. Object dispatch's own wait (its parked ops full) is the
    /// caller's to avoid by bounding what it has outstanding.
    pub fn try_aio_write_with(
        &self,
        offset: u64,
        data: Bytes,
        f: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<Option<Bytes>> {
        let req = Req::Write { offset, data };
        match self.try_submit_with(req, Box::new(move |r| f(r.map(|_| ()))))? {
            Some(Req::Write { data, .. }) => Ok(Some(data)),
            Some(_) => unreachable!("the cache hands back the request it was given"),
            None => Ok(None),
        }
    }

    /// [`Image::aio_discard_with`] for a caller that must not wait: `Ok(false)` hands it back unstarted, with
    /// `f` dropped unrun, when it would wait for an overlapping write-back (see [`Image::try_aio_write_with`]).
    pub fn try_aio_discard_with(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<bool> {
        let req = Req::Discard { offset, len };
        Ok(self.try_submit_with(req, Box::new(move |r| f(r.map(|_| ()))))?.is_none())
    }

    /// Starts `req` unless the cache would make it wait; `Some(req)` hands it back (its callback dropped).
    fn try_submit_with(&self, req: Req, done: Done) -> Result<Option<Req>> {
        self.admit(&req)?;
        match &self.cache {
            Some(c) => Ok(c.try_submit(req, done).err().map(|(req, _unrun)| req)),
            None => {
                self.top.submit(req, done);
                Ok(None)
            }
        }
    }

    /// [`Image::aio_discard`] with the outcome handed to `f` (see [`Image::aio_read_with`]).
    pub fn aio_discard_with(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.submit_with(Req::Discard { offset, len }, Box::new(move |r| f(r.map(|_| ()))))
    }

    /// Reads `len` bytes at `offset`; never-written ranges read as zeros.
    pub fn aio_read(&self, offset: u64, len: u64) -> Result<AioCompletion<Bytes>> {
        self.submit(Req::Read { offset, len }, |b| b)
    }

    /// Writes `data` at `offset`; each object's share is one atomic compound op. With the cache in
    /// write-back mode (after the first flush), completes once the data is in the cache.
    pub fn aio_write(&self, offset: u64, data: Bytes) -> Result<AioCompletion<()>> {
        self.submit(Req::Write { offset, data }, |_| ())
    }

    /// Discards `[offset, offset + len)`: whole objects are removed, partial pieces zeroed (or truncated at
    /// an object's end). Afterwards the range reads as zeros. Discards go through the cache to the OSDs.
    pub fn aio_discard(&self, offset: u64, len: u64) -> Result<AioCompletion<()>> {
        self.submit(Req::Discard { offset, len }, |_| ())
    }

    pub fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.aio_read(offset, len)?.wait()
    }

    pub fn write(&self, offset: u64, data: impl Into<Bytes>) -> Result<()> {
        self.aio_write(offset, data.into())?.wait()
    }

    /// A write that returns only once it (and every write acknowledged before it) is on the OSDs: NBD's
    /// FUA. Implemented as write then flush.
    pub fn write_fua(&self, offset: u64, data: impl Into<Bytes>) -> Result<()> {
        self.write(offset, data)?;
        self.flush()
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.aio_discard(offset, len)?.wait()
    }

    /// Makes the range read as zeros. Without snapshots or a parent image, discard already guarantees
    /// zeros (absent objects read as zeros), so this is discard.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// Returns once every write acknowledged before the call is on the OSDs (the cache is drained of
    /// them). Also switches the cache from writethrough to write-back, as Ceph does on the first flush.
    pub fn flush(&self) -> Result<()> {
        self.top.flush()
    }

    /// The cache's dirty plus in-flight write-back bytes (0 without a cache).
    pub fn cache_dirty_bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.state().held_bytes())
    }

    /// Flushes the cache, refuses further requests and waits (bounded) until every object op parked for
    /// budget has been started; ops still parked then fail with [`RbdError::Closed`]. Requests already
    /// started still complete. Later calls fail with [`RbdError::Closed`]. From a completion callback it
    /// does not wait for parked ops (they still start as budget frees up).
    pub fn close(&self) {
        if let Some(c) = &self.cache {
            if let Err(e) = c.close() {
                tracing::error!(image = %self.id, error = %e, "flushing the cache on close failed");
            }
        }
        self.dispatch.close();
    }

    /// Stops the handle as a crash would: dirty cached data is dropped, not written back (for tests of
    /// what survives a crash). Writes already acknowledged to a flush are on the OSDs regardless.
    pub fn abandon(&self) {
        if let Some(c) = &self.cache {
            c.abandon();
        }
        self.close();
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_garbage_is_refused() {
        // Goal: the header blob decodes to what was encoded, and bad blobs give Corrupt. Method: encode a
        // striped header, decode; decode garbage, a wrong format and an invalid layout.
        let h = Header {
            format: HEADER_FORMAT,
            size: 10 << 30,
            order: 20,
            stripe_unit: 64 << 10,
            stripe_count: 4,
            features: FEATURE_STRIPINGV2,
            created_unix_s: 1_700_000_000,
        };
        assert_eq!(Header::decode("h", &h.encode()).unwrap(), h);
        assert!(matches!(Header::decode("h", b"\xff\xff"), Err(RbdError::Corrupt { .. })));
        let bad_fmt = Header { format: 9, ..h.clone() };
        assert!(matches!(Header::decode("h", &bad_fmt.encode()), Err(RbdError::Corrupt { .. })));
        let bad_layout = Header { stripe_unit: 3000, ..h.clone() };
        assert!(matches!(Header::decode("h", &bad_layout.encode()), Err(RbdError::Corrupt { .. })));
        let bad_order = Header { order: 40, ..h };
        assert!(matches!(Header::decode("h", &bad_order.encode()), Err(RbdError::Corrupt { .. })));
    }

    #[test]
    fn names_are_validated() {
        // Goal: only names Ceph's CLI could address are accepted. Method: one good and each bad kind.
        assert!(validate_name("vm-disk_1.img").is_ok());
        for bad in ["", "a/b", "a@snap", "tab\there", &"x".repeat(97)] {
            assert!(matches!(validate_name(bad), Err(RbdError::InvalidName { .. })), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(96)).is_ok());
    }

    #[test]
    fn create_options_apply_ceph_defaults_and_limits() {
        // Goal: default layout is 4 MiB objects unstriped; orders outside 12..=25 and bad stripe units are
        // refused. Method: build layouts from options.
        let l = CreateOptions::default().layout().unwrap();
        assert_eq!((l.object_size_bytes(), l.stripe_unit_bytes(), l.stripe_count()), (4 << 20, 4 << 20, 1));
        for order in [11, 26] {
            let o = CreateOptions { order: Some(order), ..Default::default() };
            assert!(matches!(o.layout(), Err(RbdError::InvalidLayout(_))));
        }
        let o = CreateOptions { order: Some(20), stripe_unit: Some(3 << 10), stripe_count: Some(4) };
        assert!(matches!(o.layout(), Err(RbdError::InvalidLayout(_))));
    }

    #[test]
    fn trim_removes_objects_past_the_cut_and_truncates_the_straddling_ones() {
        // Goal: shrink planning matches a brute-force model. Method: su 64K, sc 4, os 1M; for several cuts,
        // compute for every object the lowest in-object offset whose image byte is >= the cut (by walking
        // every stripe unit) and compare with the planned remove/truncate ops.
        let layout = Layout::new(1 << 20, 64 << 10, 4).unwrap();
        let old = 10 << 20;
        for new in [0u64, 1, 65_536, 100_000, (4 << 20) + 3, 5 << 20, old - 1] {
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let su = layout.stripe_unit_bytes();
            let mut off = 0;
            while off < old {
                let (o, in_obj) = layout.locate(off);
                let unit_end = off + su;
                if unit_end > new {
                    let first = off.max(new);
                    let v = model.entry(o).or_insert(u64::MAX);
                    *v = (*v).min(in_obj + (first - off));
                }
                off = unit_end;
            }
            let plan = trim_ops("id", &layout, old, new);
            let mut got: BTreeMap<u64, u64> = BTreeMap::new();
            for (oid, op) in &plan {
                let (_, n) = striper::parse_object_name(oid).unwrap();
                let cut = match op.ops().last().unwrap() {
                    rados::msg::OsdOp::Remove => 0,
                    rados::msg::OsdOp::Truncate { size } => *size,
                    o => panic!("unexpected {o:?}"),
                };
                assert!(got.insert(n, cut).is_none(), "object {n} planned twice");
            }
            assert_eq!(got, model, "cut at {new}");
        }
        assert!(trim_ops("id", &layout, 100, 200).is_empty());
    }

    #[test]
    fn discard_plans_remove_whole_objects_and_zero_or_truncate_parts() {
        // Goal: discard picks remove / truncate / zero as Ceph does. Method: plan ops for pieces of a 1 MiB
        // object and look at the steps.
        use rados::msg::OsdOp;
        let os = 1 << 20;
        let piece = |off, len| ObjectExtent { object_no: 0, offset_in_object: off, len, buffer_offset: 0 };
        assert!(matches!(discard_op(os, &[piece(0, os)]).ops(), [OsdOp::Remove]));
        assert!(matches!(discard_op(os, &[piece(0, os / 2), piece(os / 2, os / 2)]).ops(), [OsdOp::Remove]));
        assert!(matches!(
            discard_op(os, &[piece(4096, os - 4096)]).ops(),
            [OsdOp::Stat, OsdOp::Truncate { size: 4096 }]
        ));
        assert!(matches!(
            discard_op(os, &[piece(10, 20)]).ops(),
            [OsdOp::Stat, OsdOp::Zero { offset: 10, len: 20 }]
        ));
    }

    #[test]
    fn grouping_keeps_every_piece_once_per_object_in_bounded_ops() {
        // Goal: a large striped extent groups into per-object ops of at most STEPS_PER_OP_MAX steps that
        // together hold every piece exactly once. Method: 4K stripe unit, 1M objects, a 40 MiB extent.
        let layout = Layout::new(1 << 20, 4096, 2).unwrap();
        let ext = layout.map_extent(12_345, 40 << 20).unwrap();
        let groups = group_extents(ext.clone());
        let mut seen: Vec<ObjectExtent> = Vec::new();
        for (n, pieces) in &groups {
            assert!(pieces.len() <= STEPS_PER_OP_MAX);
            assert!(pieces.iter().all(|p| p.object_no == *n));
            seen.extend(pieces);
        }
        seen.sort_by_key(|p| p.buffer_offset);
        assert_eq!(seen, ext);
    }

    #[test]
    fn ids_are_16_hex_digits_and_distinct() {
        // Goal: ids fit the data object name scheme and do not repeat. Method: make 1000.
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_image_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|i| i.len() == 16 && i.bytes().all(|b| b.is_ascii_hexdigit())));
    }

    #[test]
    fn on_complete_runs_once_whether_registered_before_or_after_completion() {
        // Goal: the callback gets the result exactly once in both orders, and wait/is_done still work.
        // Method: register before completing, complete after registering, and wait on a third completion.
        let (c, slot) = AioCompletion::<u32>::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = tx.clone();
        c.on_complete(move |r| t.send(r.unwrap()).unwrap());
        assert!(rx.try_recv().is_err());
        slot.complete(Ok(7));
        assert_eq!(rx.try_recv().unwrap(), 7);

        let (c, slot) = AioCompletion::<u32>::new();
        slot.complete(Err(RbdError::Closed));
        assert!(c.is_done());
        c.on_complete(move |r| tx.send(if r.is_err() { 1 } else { 0 }).unwrap());
        assert_eq!(rx.try_recv().unwrap(), 1);
        assert!(rx.try_recv().is_err());

        let (c, slot) = AioCompletion::<u32>::new();
        assert!(!c.is_done());
        let c = c.wait_timeout(Duration::from_millis(1)).unwrap_err();
        std::thread::spawn(move || slot.complete(Ok(3)));
        assert_eq!(c.wait().unwrap(), 3);
    }

    /// Object dispatch over a fake sink, with the layers `opts` ask for, on an image of `size` bytes.
    fn stack_over_fake(
        layout: Layout,
        size: u64,
        limits: Limits,
        hold: bool,
        opts: &ImageOptions,
    ) -> (Arc<Dispatch<crate::dispatch::fake::FakeSink>>, Stack) {
        let header = Header {
            format: HEADER_FORMAT,
            size,
            order: layout.order(),
            stripe_unit: layout.stripe_unit_bytes(),
            stripe_count: layout.stripe_count(),
            features: 0,
            created_unix_s: 0,
        };
        let d = Dispatch::new(crate::dispatch::fake::FakeSink::new(hold), limits);
        let od = Arc::new(ObjectDispatch {
            id: "img".into(),
            shared: Arc::new(Mutex::new(Shared { header, version: 1, layout })),
            dispatch: Arc::clone(&d),
        });
        (d, build_stack(od, opts).unwrap())
    }

    fn call(l: &dyn Layer, req: Req) -> Result<Bytes> {
        crate::layers::fake::call(l, req)
    }

    #[test]
    fn object_dispatch_maps_reads_to_objects_and_assembles_striped_ones() {
        // Goal: the bottom layer reads through the sink: a 4K read is one op on the right object, a read
        // spanning two objects is assembled in image order, a read past the end is refused. Method: 4K
        // stripe unit over 2 objects of 64K; the fake answers each object's reads with its object number.
        let layout = Layout::new(64 << 10, 4096, 2).unwrap();
        let limits = ObjecterBudget::default().dispatch_limits(8);
        let (d, (top, cache)) = stack_over_fake(layout, 1 << 20, limits, false, &ImageOptions::uncached());
        assert!(cache.is_none());
        d.sink().0.lock().answer = Box::new(|oid, ops| {
            let (_, n) = striper::parse_object_name(oid).unwrap();
            let outs = ops
                .iter()
                .map(|o| match o {
                    rados::msg::OsdOp::Read { len, .. } => {
                        rados::objecter::OpOutput::Data(Bytes::from(vec![n as u8 + 1; *len as usize]))
                    }
                    _ => rados::objecter::OpOutput::None,
                })
                .collect();
            Ok(OpReply { version: 1, outs })
        });
        assert_eq!(call(&*top, Req::Read { offset: 4096, len: 4096 }).unwrap(), vec![2; 4096]);
        assert_eq!(d.sink().started(), [striper::object_name("img", 1)]);
        let got = call(&*top, Req::Read { offset: 2048, len: 4096 }).unwrap();
        assert_eq!(&got[..2048], &[1; 2048]);
        assert_eq!(&got[2048..], &[2; 2048]);
        assert!(matches!(
            call(&*top, Req::Read { offset: 1 << 20, len: 1 }),
            Err(RbdError::OutOfRange { .. })
        ));
    }

    #[test]
    fn cache_write_back_started_from_a_completion_callback_progresses_with_the_fifo_full() {
        // Goal: a layer that submits from inside a completion callback (the cache writing back a write that
        // a read's callback made) never blocks the completing thread, even with the FIFO full, and its
        // write-back reaches the sink. Method: depth 1, parked_max 2; a write-back cache whose target is 0
        // (every cached write goes down at once); three reads fill depth and FIFO; the first read's callback
        // writes; answering that read must return promptly.
        let layout = Layout::new(1 << 20, 1 << 20, 1).unwrap();
        let opts = ImageOptions {
            cache: CacheOptions {
                writethrough_until_flush: false,
                target_dirty_bytes: 0,
                max_dirty_age: Duration::from_secs(3600),
                ..CacheOptions::default()
            },
            readahead: ReadaheadOptions { enabled: false, ..Default::default() },
        };
        let limits = Limits {
            parked_max: 2,
            callback_parked_max: 2,
            wait_max: Duration::from_secs(60),
            ..ObjecterBudget::default().dispatch_limits(1)
        };
        let (d, (top, cache)) = stack_over_fake(layout, 4 << 20, limits, true, &opts);
        assert!(cache.is_some());
        let (tx, rx) = std::sync::mpsc::channel();
        let (top2, d2) = (Arc::clone(&top), Arc::clone(&d));
        let tx2 = tx.clone();
        top.submit(
            Req::Read { offset: 0, len: 4096 },
            Box::new(move |r| {
                assert!(r.is_ok());
                // The second read started when this one answered: fill the FIFO again first.
                let tx4 = tx2.clone();
                top2.submit(
                    Req::Read { offset: 2 << 20, len: 4096 },
                    Box::new(move |r| {
                        let _ = tx4.send(("read", r.is_ok()));
                    }),
                );
                assert_eq!(d2.stats().parked, 2, "the FIFO is full when the cache writes back");
                let tx3 = tx2.clone();
                top2.submit(
                    Req::Write { offset: 3 << 20, data: Bytes::from(vec![9; 4096]) },
                    Box::new(move |r| {
                        let _ = tx3.send(("write", r.is_ok()));
                    }),
                );
            }),
        );
        for i in 1..3u64 {
            let tx = tx.clone();
            top.submit(
                Req::Read { offset: i << 20, len: 4096 },
                Box::new(move |r| {
                    let _ = tx.send(("read", r.is_ok()));
                }),
            );
        }
        assert_eq!(d.stats().parked, 2, "the FIFO is full");
        let (tx_done, rx_done) = std::sync::mpsc::channel();
        let d2 = Arc::clone(&d);
        std::thread::spawn(move || {
            d2.sink().release(0);
            let _ = tx_done.send(());
        });
        rx_done.recv_timeout(Duration::from_secs(5)).expect("the completing thread never blocks");
        // The write is acknowledged from the cache; its write-back is parked behind the reads.
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), ("write", true));
        assert_eq!(d.stats().parked, 3, "the write-back took the callback room");
        d.sink().release_all();
        let oids = d.sink().started();
        let names: Vec<String> = [0, 1, 2, 2, 3].iter().map(|n| striper::object_name("img", *n)).collect();
        assert_eq!(oids, names, "three reads, the callback's read, then the write-back");
        assert_eq!(cache.unwrap().state().held_bytes(), 0, "the write-back answered");
    }

    #[test]
    fn image_options_come_from_the_config_with_the_layer_defaults() {
        // Goal: the config's defaults are the layers' defaults, its values reach the layer stack, and
        // Ceph's constraints between the cache sizes are enforced. Method: default config, then
        // rbd_cache=false and rbd_readahead_max_bytes=0 (an uncached stack), then broken constraints.
        let c = Config::default();
        let o = ImageOptions::from_config(&c).unwrap();
        assert_eq!(o, ImageOptions::default());
        let mut c = Config::default();
        c.set("rbd_cache", "false").unwrap();
        c.set("rbd_readahead_max_bytes", "0").unwrap();
        c.set("rbd_cache_max_dirty_age", "2.5").unwrap();
        c.set("objecter_inflight_ops", "16").unwrap();
        let o = ImageOptions::from_config(&c).unwrap();
        assert!(!o.cache.enabled && !o.readahead.enabled);
        assert_eq!(o.cache.max_dirty_age, Duration::from_millis(2500));
        let budget = ObjecterBudget::from_config(&c);
        assert_eq!(
            budget.dispatch_limits(32).depth,
            16,
            "the queue depth stays within the Objecter's budget"
        );
        let layout = Layout::new(1 << 22, 1 << 22, 1).unwrap();
        let (_, (_, cache)) = stack_over_fake(layout, 1 << 22, budget.dispatch_limits(4), false, &o);
        assert!(cache.is_none(), "rbd_cache=false gives an uncached image");
        let mut c = Config::default();
        c.set("rbd_cache_max_dirty", &(64u64 << 20).to_string()).unwrap();
        assert!(matches!(
            ImageOptions::from_config(&c),
            Err(RbdError::BadOption { option: "rbd_cache_max_dirty", .. })
        ));
        let mut c = Config::default();
        c.set("rbd_cache_target_dirty", &(30u64 << 20).to_string()).unwrap();
        assert!(matches!(
            ImageOptions::from_config(&c),
            Err(RbdError::BadOption { option: "rbd_cache_target_dirty", .. })
        ));
        c.set("rbd_cache_max_dirty", "0").unwrap();
        assert!(ImageOptions::from_config(&c).is_ok(), "writethrough ignores the target");
    }
}
