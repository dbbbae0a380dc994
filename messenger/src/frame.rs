//! The wire format: banner, frame preamble, segments, and the transmit queue. No IO.
//!
//! ```text
//! banner   : "cuttle1\n" | le64 supported features | le64 required features              (24 bytes)
//! preamble : u8 tag | u8 segment count | le16 flags (0) | 3 x le32 segment length
//!            | le32 reserved (0) | le32 crc32c(preamble bytes 0..20)                      (24 bytes)
//! segments : for each non-empty segment i in order: its bytes, then le32 crc32c(segment)
//! ```
//! The preamble is fixed-size and checksums itself, so a reader sizes the rest of the frame from one read and
//! rejects an oversized length before buffering anything. Each segment's crc follows it, so the header segment is
//! verified (and usable) before a large data segment is complete. See docs/wire.md for every field.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::sync::Mutex;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use memmap2::{MmapMut, MmapOptions};
use serde::{de::DeserializeOwned, Serialize};

use crate::crc::{self, CRC_BLOCK_BYTES};

pub const BANNER_MAGIC: [u8; 8] = *b"cuttle1\n";
pub const BANNER_BYTES: usize = 24;
/// Feature bits this build speaks. None are defined yet; a peer requiring one we lack is refused.
pub const FEATURES_SUPPORTED: u64 = 0;
pub const FEATURES_REQUIRED: u64 = 0;

pub const PREAMBLE_BYTES: usize = 24;
pub const SEGMENTS: usize = 3;
pub const CRC_BYTES: usize = 4;
/// Handshake and other control frames carry one small postcard segment.
pub const CONTROL_BYTES_MAX: u32 = 4096;
pub const MSG_HEADER_BYTES: usize = 32;
/// Fronts and data segments no larger than this are copied into the staging buffer so that small messages go
/// out as one contiguous iovec; larger ones are sent from their own `Bytes` without a copy.
pub const COPY_BYTES_MAX: usize = 16 * 1024;
/// The least the transmit staging buffer grows by.
const STAGING_CHUNK_BYTES: usize = 64 * 1024;
/// `writev` takes at most this many slices per call (Linux's IOV_MAX is 1024).
pub const IOV_MAX: usize = 256;

const _: () = assert!(PREAMBLE_BYTES == 1 + 1 + 2 + 4 * SEGMENTS + 4 + 4);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    ClientIdent = 1,
    ServerIdent = 2,
    SessionReconnect = 3,
    SessionReconnectOk = 4,
    SessionReset = 5,
    SessionRetry = 6,
    SessionRetryGlobal = 7,
    Wait = 8,
    Message = 9,
    Keepalive = 10,
    KeepaliveAck = 11,
    Ack = 12,
}

impl Tag {
    fn from_u8(v: u8) -> Option<Tag> {
        use Tag::*;
        Some(match v {
            1 => ClientIdent,
            2 => ServerIdent,
            3 => SessionReconnect,
            4 => SessionReconnectOk,
            5 => SessionReset,
            6 => SessionRetry,
            7 => SessionRetryGlobal,
            8 => Wait,
            9 => Message,
            10 => Keepalive,
            11 => KeepaliveAck,
            12 => Ack,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    #[error("bad banner magic {0:02x?}")]
    BadBanner([u8; 8]),
    #[error("peer requires features {0:#x} we do not support")]
    MissingFeatures(u64),
    #[error("preamble crc mismatch (got {got:#010x}, computed {computed:#010x})")]
    PreambleCrc { got: u32, computed: u32 },
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("malformed preamble: {0}")]
    BadPreamble(&'static str),
    #[error("segment {index} is {len} bytes, over the limit of {max} for a {tag:?} frame")]
    SegmentTooLong { tag: Tag, index: usize, len: u32, max: u32 },
    #[error("segment {index} crc mismatch")]
    SegmentCrc { index: usize },
    #[error("cannot decode {tag:?} payload: {why}")]
    BadPayload { tag: Tag, why: String },
}

/// Per-segment limits, from the messenger's config.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    pub front_bytes_max: u32,
    pub data_bytes_max: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { front_bytes_max: 16 << 20, data_bytes_max: 128 << 20 }
    }
}

pub fn encode_banner() -> [u8; BANNER_BYTES] {
    let mut b = [0u8; BANNER_BYTES];
    b[..8].copy_from_slice(&BANNER_MAGIC);
    b[8..16].copy_from_slice(&FEATURES_SUPPORTED.to_le_bytes());
    b[16..24].copy_from_slice(&FEATURES_REQUIRED.to_le_bytes());
    b
}

/// Checks a peer's banner; returns its supported features.
pub fn decode_banner(b: &[u8; BANNER_BYTES]) -> Result<u64, FrameError> {
    let magic: [u8; 8] = b[..8].try_into().expect("slice of 8");
    if magic != BANNER_MAGIC {
        return Err(FrameError::BadBanner(magic));
    }
    let supported = u64::from_le_bytes(b[8..16].try_into().expect("slice of 8"));
    let required = u64::from_le_bytes(b[16..24].try_into().expect("slice of 8"));
    let missing = required & !FEATURES_SUPPORTED;
    if missing != 0 {
        return Err(FrameError::MissingFeatures(missing));
    }
    Ok(supported)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub tag: Tag,
    pub lens: [u32; SEGMENTS],
}

impl Preamble {
    /// Bytes of the whole frame, preamble included.
    pub fn frame_bytes(&self) -> usize {
        self.segment_range(SEGMENTS - 1).end + CRC_BYTES * usize::from(self.lens[SEGMENTS - 1] > 0)
    }

    /// Where segment `index` lies in the frame (empty segments take no room, not even for a crc).
    pub fn segment_range(&self, index: usize) -> Range<usize> {
        let at = PREAMBLE_BYTES
            + self.lens[..index]
                .iter()
                .map(|&l| if l > 0 { l as usize + CRC_BYTES } else { 0 })
                .sum::<usize>();
        at..at + self.lens[index] as usize
    }

    /// Bytes of the segments alone (what a receive throttle charges).
    pub fn payload_bytes(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }

    fn encode(&self) -> [u8; PREAMBLE_BYTES] {
        let mut p = [0u8; PREAMBLE_BYTES];
        p[0] = self.tag as u8;
        p[1] = self.lens.iter().rposition(|&l| l > 0).map_or(0, |i| i + 1) as u8;
        for (i, l) in self.lens.iter().enumerate() {
            p[4 + 4 * i..8 + 4 * i].copy_from_slice(&l.to_le_bytes());
        }
        let crc = crc::crc32c(&p[..20]);
        p[20..24].copy_from_slice(&crc.to_le_bytes());
        p
    }

    /// Parses and validates a preamble against the limits: crc first (so garbage never reaches the length
    /// checks as if it were meant), then the tag, then each segment length for that tag.
    pub fn decode(p: &[u8; PREAMBLE_BYTES], limits: &FrameLimits) -> Result<Preamble, FrameError> {
        let got = u32::from_le_bytes(p[20..24].try_into().expect("slice of 4"));
        let computed = crc::crc32c(&p[..20]);
        if got != computed {
            return Err(FrameError::PreambleCrc { got, computed });
        }
        let tag = Tag::from_u8(p[0]).ok_or(FrameError::UnknownTag(p[0]))?;
        if p[2] != 0 || p[3] != 0 || p[16..20] != [0; 4] {
            return Err(FrameError::BadPreamble("reserved bytes are not zero"));
        }
        let mut lens = [0u32; SEGMENTS];
        for (i, l) in lens.iter_mut().enumerate() {
            *l = u32::from_le_bytes(p[4 + 4 * i..8 + 4 * i].try_into().expect("slice of 4"));
        }
        let count = lens.iter().rposition(|&l| l > 0).map_or(0, |i| i + 1);
        if p[1] as usize != count {
            return Err(FrameError::BadPreamble("segment count disagrees with the lengths"));
        }
        let max: [u32; SEGMENTS] = if tag == Tag::Message {
            if lens[0] as usize != MSG_HEADER_BYTES {
                return Err(FrameError::BadPreamble("message header segment has the wrong size"));
            }
            [MSG_HEADER_BYTES as u32, limits.front_bytes_max, limits.data_bytes_max]
        } else {
            [CONTROL_BYTES_MAX, 0, 0]
        };
        for (index, (&len, &max)) in lens.iter().zip(max.iter()).enumerate() {
            if len > max {
                return Err(FrameError::SegmentTooLong { tag, index, len, max });
            }
        }
        Ok(Preamble { tag, lens })
    }
}

/// A whole, verified frame. Segments are slices of the receive buffer: no copy was made.
#[derive(Clone, Debug)]
pub struct Frame {
    pub tag: Tag,
    pub segments: [Bytes; SEGMENTS],
    /// The crcs of the data segment's blocks ([`crate::crc::block_crcs`]) when it spans at least one whole
    /// block, computed while verifying it; empty otherwise.
    pub data_crcs: Vec<u32>,
}

impl Frame {
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        postcard::from_bytes(&self.segments[0])
            .map_err(|e| FrameError::BadPayload { tag: self.tag, why: e.to_string() })
    }
}

/// The least a receive buffer grows by.
const RX_CHUNK_BYTES: usize = 256 * 1024;

/// A frame at least this large is received into a buffer of its own, taken from [`RECYCLED`].
pub const LARGE_FRAME_BYTES: usize = 1 << 20;
/// Buffers of large frames wait in [`RECYCLED`] in sizes rounded up to this (frames of one kind, like 4 MiB
/// writes, differ by a few bytes of header; a buffer kept by its frame wastes at most this much).
const LARGE_CLASS_BYTES: usize = 64 << 10;
/// A large frame is read at most this much at a time, so that the blocks a read completes are still in the
/// CPU's cache when their crcs are computed.
const LARGE_READ_BYTES: usize = 256 << 10;
/// What [`RECYCLED`] keeps at most, per process.
const RECYCLED_BYTES_MAX: usize = 64 << 20;

/// Buffers of large frames that nobody uses any more, for the next large frames. A large frame's bytes usually
/// outlive the receive (an OSD keeps written chunks as they arrived), so its buffer cannot be the session's
/// ongoing receive buffer; a fresh allocation for each would be zeroed first and fault in its pages (the
/// allocator maps and unmaps buffers this large): together 14 % of an OSD's CPU on 4 MiB rewrites.
static RECYCLED: Mutex<Vec<MmapMut>> = Mutex::new(Vec::new());

/// An anonymous mapping that goes back to [`RECYCLED`] when dropped, if the pool has room for it.
struct RecycledMap(Option<MmapMut>);

impl RecycledMap {
    /// `len` bytes, recycled if a mapping of that length is free. A new mapping has all its pages mapped at once
    /// (`MAP_POPULATE`): a new object's data needs fresh pages whatever we do, and one populating `mmap` costs
    /// 13 % less of an OSD's CPU than the kernel faulting the same pages in one by one while it copies a frame
    /// into them (`rbd bench` 4 MiB writes to a new image, measured on this kind of VM).
    fn take(len: usize) -> RecycledMap {
        let recycled = {
            let mut free = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
            free.iter().position(|b| b.len() == len).map(|i| free.swap_remove(i))
        };
        RecycledMap(Some(recycled.unwrap_or_else(|| {
            MmapOptions::new().len(len).populate().map_anon().expect("no memory for a receive buffer")
        })))
    }
}

impl std::ops::Deref for RecycledMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for RecycledMap {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for RecycledMap {
    fn drop(&mut self) {
        let Some(map) = self.0.take() else { return };
        let mut free = RECYCLED.lock().unwrap_or_else(|e| e.into_inner());
        // A few dozen buffers at most: summing them is cheaper than keeping a count in step.
        if free.iter().map(|b| b.len()).sum::<usize>() + map.len() <= RECYCLED_BYTES_MAX {
            free.push(map);
        }
    }
}

/// A large frame's buffer; back to [`RECYCLED`] when the last `Bytes` over it is dropped.
struct LargeBuf {
    buf: RecycledMap,
    /// The frame's length (`buf` may be longer: sizes are rounded up to a class).
    len: usize,
    /// Bytes received so far, at the front.
    got: usize,
    /// Where the frame's data segment lies in `buf`.
    data: Range<usize>,
    /// The crcs of the data segment's blocks received so far ([`crc::block_crcs`]), each computed right after
    /// the read that completed it, while the block is still in the CPU's cache (decoding the frame would read
    /// it again from memory after the whole frame has arrived).
    crcs: Vec<u32>,
}

impl LargeBuf {
    /// A buffer for a frame of `len` bytes, recycled if one of its size class is free. Its bytes are initialised
    /// (zeroed when new, stale when recycled), so the shell reads into it without `unsafe`.
    fn take(len: usize) -> LargeBuf {
        LargeBuf {
            buf: RecycledMap::take(len.next_multiple_of(LARGE_CLASS_BYTES)),
            len,
            got: 0,
            data: 0..0,
            crcs: Vec::new(),
        }
    }

    /// Starts the frame with its first `prefix` bytes: when they hold its preamble, the data segment's block
    /// crcs are computed as the blocks arrive.
    fn start(&mut self, prefix: &[u8]) {
        self.buf[..prefix.len()].copy_from_slice(prefix);
        self.got = prefix.len();
        let unlimited = FrameLimits { front_bytes_max: u32::MAX, data_bytes_max: u32::MAX };
        if let Ok(Some(p)) = peek_preamble(prefix, &unlimited) {
            self.data = p.segment_range(SEGMENTS - 1);
        }
        self.advance_crcs();
    }

    /// Computes the crcs of the data blocks that the bytes received so far complete.
    fn advance_crcs(&mut self) {
        if self.data.len() < CRC_BLOCK_BYTES {
            return;
        }
        while self.crcs.len() < self.data.len().div_ceil(CRC_BLOCK_BYTES) {
            let start = self.data.start + self.crcs.len() * CRC_BLOCK_BYTES;
            let end = (start + CRC_BLOCK_BYTES).min(self.data.end);
            if end > self.got {
                break;
            }
            self.crcs.push(crc::crc32c(&self.buf[start..end]));
        }
    }
}

impl AsRef<[u8]> for LargeBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.got]
    }
}

impl std::fmt::Debug for LargeBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LargeBuf").field("len", &self.len).field("got", &self.got).finish_non_exhaustive()
    }
}

/// A receive buffer that the shell reads into without `unsafe`: its spare room is zero-initialised once, when it
/// is allocated, and then reused, so reading a frame in small pieces does not zero it again and again. Frames
/// are split off the front as `Bytes` that share the allocation (no copy). A large frame is received into a
/// recycled buffer of its own instead ([`LARGE_FRAME_BYTES`]).
#[derive(Debug, Default)]
pub struct RxBuf {
    /// Initialised bytes; `[..filled]` holds data received and not yet consumed.
    buf: BytesMut,
    filled: usize,
    /// The large frame being received; `buf` holds nothing received meanwhile.
    large: Option<LargeBuf>,
}

impl RxBuf {
    pub fn new() -> RxBuf {
        RxBuf::default()
    }

    pub fn len(&self) -> usize {
        self.data().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn data(&self) -> &[u8] {
        match &self.large {
            Some(l) => l.as_ref(),
            None => &self.buf[..self.filled],
        }
    }

    /// Reads once from `r` into room for `want` more bytes; returns the bytes read and the room offered. The
    /// caller asks for the rest of the frame whose beginning the buffer holds ([`Session::read_hint`]), so a
    /// `want` of [`LARGE_FRAME_BYTES`] or more starts receiving that frame into a buffer of its own.
    ///
    /// [`Session::read_hint`]: crate::session::Session::read_hint
    pub fn read_from(&mut self, r: &mut impl std::io::Read, want: usize) -> std::io::Result<(usize, usize)> {
        if self.large.is_none() && want >= LARGE_FRAME_BYTES {
            let mut l = LargeBuf::take(self.filled + want);
            l.start(&self.buf[..self.filled]);
            self.filled = 0;
            self.large = Some(l);
        }
        match &mut self.large {
            Some(l) => {
                let end = l.len.min(l.got + LARGE_READ_BYTES);
                let room = &mut l.buf[l.got..end];
                let offered = room.len();
                let n = r.read(room)?;
                l.got += n;
                l.advance_crcs();
                Ok((n, offered))
            }
            None => {
                let room = self.spare(want);
                let offered = room.len();
                let n = r.read(room)?;
                self.filled += n;
                Ok((n, offered))
            }
        }
    }

    /// Room for at least `want` more bytes (possibly more, already initialised).
    fn spare(&mut self, want: usize) -> &mut [u8] {
        if self.buf.len() < self.filled + want {
            // Drop the stale tail, then grow. `try_reclaim` takes the whole allocation back when every frame
            // split from it has been dropped (the common case), so steady traffic reuses one buffer instead of
            // faulting in fresh pages; only the new room is zeroed.
            self.buf.truncate(self.filled);
            let room = want.max(RX_CHUNK_BYTES);
            if self.buf.try_reclaim(room) {
                let cap = self.buf.capacity();
                self.buf.resize(cap, 0);
            } else {
                // Frames still hold the old allocation. A zeroed allocation of fresh memory is not written
                // again (the allocator knows the OS zeroed it), so no pass touches the new room before the
                // kernel copies data into it.
                let mut fresh = vec![0u8; self.filled + room];
                fresh[..self.filled].copy_from_slice(&self.buf);
                self.buf = BytesMut::from(Bytes::from(fresh));
            }
        }
        &mut self.buf[self.filled..]
    }

    /// Appends bytes that arrived some other way (a handshake's leftovers, tests).
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        assert!(self.large.is_none(), "a large frame is received by read_from alone");
        self.spare(b.len())[..b.len()].copy_from_slice(b);
        self.filled += b.len();
    }

    /// The crcs of the data blocks of a large frame computed while it arrived (see `LargeBuf::crcs`).
    fn take_data_crcs(&mut self) -> Vec<u32> {
        self.large.as_mut().map(|l| std::mem::take(&mut l.crcs)).unwrap_or_default()
    }

    /// The first `n` received bytes. A large frame is split off whole.
    pub fn split_to(&mut self, n: usize) -> Bytes {
        assert!(n <= self.len(), "split past the received data");
        match self.large.take() {
            Some(l) => {
                assert!(n == l.got && n == l.len, "a large frame is consumed whole");
                Bytes::from_owner(l)
            }
            None => {
                self.filled -= n;
                self.buf.split_to(n).freeze()
            }
        }
    }

    pub fn clear(&mut self) {
        self.filled = 0;
        self.large = None;
    }
}

impl From<&[u8]> for RxBuf {
    fn from(b: &[u8]) -> RxBuf {
        let mut r = RxBuf::new();
        r.extend_from_slice(b);
        r
    }
}

/// Decodes one frame from the front of `rx` if it is complete; `Ok(None)` means more bytes are needed.
pub fn decode_frame(rx: &mut RxBuf, limits: &FrameLimits) -> Result<Option<Frame>, FrameError> {
    let Some(pre) = peek_preamble(rx.data(), limits)? else { return Ok(None) };
    let total = pre.frame_bytes();
    if rx.len() < total {
        return Ok(None);
    }
    let mut early_crcs = rx.take_data_crcs();
    let mut buf = rx.split_to(total);
    buf.advance(PREAMBLE_BYTES);
    let mut segments: [Bytes; SEGMENTS] = Default::default();
    let mut data_crcs = Vec::new();
    for (index, &len) in pre.lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let seg = buf.split_to(len as usize);
        let crc = buf.get_u32_le();
        // A large data segment is verified block by block, and the block crcs are kept for whoever sends or
        // stores these bytes next (crate::crc); the combining costs a few ns per 64 KiB.
        let computed = if index == SEGMENTS - 1 && seg.len() >= CRC_BLOCK_BYTES {
            data_crcs = if early_crcs.len() == seg.len().div_ceil(CRC_BLOCK_BYTES) {
                std::mem::take(&mut early_crcs)
            } else {
                crc::block_crcs(&seg)
            };
            crc::crc_of_blocks(&data_crcs, seg.len())
        } else {
            crc::crc32c(&seg)
        };
        if computed != crc {
            return Err(FrameError::SegmentCrc { index });
        }
        segments[index] = seg;
    }
    assert!(buf.is_empty(), "frame_bytes() covers every byte of the frame");
    Ok(Some(Frame { tag: pre.tag, segments, data_crcs }))
}

/// The preamble at the front of `rx`, if 24 bytes have arrived.
pub fn peek_preamble(rx: &[u8], limits: &FrameLimits) -> Result<Option<Preamble>, FrameError> {
    if rx.len() < PREAMBLE_BYTES {
        return Ok(None);
    }
    Preamble::decode(rx[..PREAMBLE_BYTES].try_into().expect("length checked"), limits).map(Some)
}

/// Bytes waiting to be written, as a list of chunks: small pieces are gathered into a staging buffer, large
/// segments stay in their own `Bytes`. The shell writes them with one `writev` per batch.
#[derive(Debug, Default)]
pub struct TxQueue {
    chunks: VecDeque<Bytes>,
    staging: BytesMut,
    queued_bytes: usize,
    /// Bytes that ever left the queue (written, taken or cleared): with `queued_bytes`, a position in the stream
    /// of everything ever queued, by which a sender knows when a frame it queued has left.
    gone_bytes: u64,
}

impl TxQueue {
    pub fn new() -> TxQueue {
        TxQueue::default()
    }

    pub fn is_empty(&self) -> bool {
        self.queued_bytes == 0
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Bytes that ever left the queue: written, taken or cleared.
    pub fn gone_bytes(&self) -> u64 {
        self.gone_bytes
    }

    /// The stream position just past everything queued so far.
    pub fn end_position(&self) -> u64 {
        self.gone_bytes + self.queued_bytes as u64
    }

    pub fn push_raw(&mut self, b: &[u8]) {
        if self.staging.capacity() - self.staging.len() < b.len() {
            // Reclaims the staging allocation once the chunks sealed from it have been written and dropped.
            self.staging.reserve(b.len().max(STAGING_CHUNK_BYTES));
        }
        self.staging.extend_from_slice(b);
        self.queued_bytes += b.len();
    }

    fn push_bytes(&mut self, b: &Bytes) {
        if b.len() <= COPY_BYTES_MAX {
            self.push_raw(b);
        } else {
            self.seal_staging();
            self.chunks.push_back(b.clone());
            self.queued_bytes += b.len();
        }
    }

    fn seal_staging(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Appends one frame. `segments[0]` is always small (header or control payload).
    pub fn push_frame(&mut self, tag: Tag, seg0: &[u8], front: &Bytes, data: &Bytes) {
        self.push_frame_parts(tag, seg0, front, std::iter::once((data, &[][..])));
    }

    /// Appends one frame whose data segment is given in parts, each with the crcs of its blocks when known
    /// (empty when not; see [`crate::crc`]): they are queued one after the other (large ones without a copy)
    /// and share one crc, so the receiver sees one ordinary segment. Known block crcs are combined instead of
    /// reading the bytes again.
    pub fn push_frame_parts<'a, I>(&mut self, tag: Tag, seg0: &[u8], front: &Bytes, data: I)
    where
        I: Iterator<Item = (&'a Bytes, &'a [u32])> + Clone,
    {
        let data_len: usize = data.clone().map(|(p, _)| p.len()).sum();
        let lens = [seg0.len() as u32, front.len() as u32, data_len as u32];
        self.push_raw(&Preamble { tag, lens }.encode());
        if !seg0.is_empty() {
            self.push_raw(seg0);
            self.push_raw(&crc::crc32c(seg0).to_le_bytes());
        }
        if !front.is_empty() {
            self.push_bytes(front);
            self.push_raw(&crc::crc32c(front).to_le_bytes());
        }
        if data_len > 0 {
            let mut crc = 0;
            for (part, crcs) in data.clone().filter(|(p, _)| !p.is_empty()) {
                self.push_bytes(part);
                let part_crc =
                    if crcs.is_empty() { crc::crc32c(part) } else { crc::crc_of_blocks(crcs, part.len()) };
                crc = crc::crc32c_combine(crc, part_crc, part.len());
            }
            // A known crc that does not match its bytes would make the receiver drop the connection on every
            // resend; every debug build (all the tests) checks the ones given here.
            debug_assert_eq!(
                crc,
                data.fold(0, |c, (p, _)| crc::crc32c_combine(c, crc::crc32c(p), p.len())),
                "a data part's block crcs do not match its bytes"
            );
            self.push_raw(&crc.to_le_bytes());
        }
    }

    pub fn push_control<T: Serialize>(&mut self, tag: Tag, payload: &T) {
        assert!(tag != Tag::Message);
        let seg0 = postcard::to_stdvec(payload).expect("control payloads always encode");
        assert!(seg0.len() <= CONTROL_BYTES_MAX as usize, "control payload over the limit");
        self.push_frame(tag, &seg0, &Bytes::new(), &Bytes::new());
    }

    /// Fills `out` with the chunks to write next; returns how many slices were filled.
    pub fn io_slices<'a>(&'a mut self, out: &mut [IoSlice<'a>]) -> usize {
        self.seal_staging();
        let mut n = 0;
        for (slot, chunk) in out.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        assert!(n <= self.queued_bytes);
        self.queued_bytes -= n;
        self.gone_bytes += n as u64;
        while n > 0 {
            let front = self.chunks.front_mut().expect("advance within queued bytes");
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Everything queued, as one buffer (tests and the in-memory simulator).
    pub fn take_all(&mut self) -> Vec<u8> {
        self.seal_staging();
        let mut v = Vec::with_capacity(self.queued_bytes);
        for c in self.chunks.drain(..) {
            v.put_slice(&c);
        }
        self.gone_bytes += self.queued_bytes as u64;
        self.queued_bytes = 0;
        v
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
        self.staging.clear();
        self.gone_bytes += self.queued_bytes as u64;
        self.queued_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_frame(tag: Tag, seg0: &[u8], front: &[u8], data: &[u8]) -> Vec<u8> {
        let mut tx = TxQueue::new();
        tx.push_frame(tag, seg0, &Bytes::copy_from_slice(front), &Bytes::copy_from_slice(data));
        tx.take_all()
    }

    fn decode_all(wire: &[u8]) -> Result<Option<Frame>, FrameError> {
        let mut rx = RxBuf::from(wire);
        decode_frame(&mut rx, &FrameLimits::default())
    }

    #[test]
    fn banner_round_trips_and_rejects_garbage() {
        assert_eq!(decode_banner(&encode_banner()), Ok(FEATURES_SUPPORTED));
        let mut b = encode_banner();
        b[0] = b'X';
        assert!(matches!(decode_banner(&b), Err(FrameError::BadBanner(_))));
        let mut b = encode_banner();
        b[16] = 0x80;
        assert_eq!(decode_banner(&b), Err(FrameError::MissingFeatures(0x80)));
    }

    #[test]
    fn pinned_preamble_layout() {
        // A Keepalive frame with a 3-byte payload: the bytes below are the wire format; changing them breaks
        // every deployed peer.
        let wire = one_frame(Tag::Keepalive, &[1, 2, 3], &[], &[]);
        let pre = &wire[..PREAMBLE_BYTES];
        assert_eq!(&pre[..20], &[10, 1, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(wire.len(), PREAMBLE_BYTES + 3 + 4);
        assert_eq!(&wire[24..27], &[1, 2, 3]);
    }

    proptest! {
        /// A data segment sent in parts is, on the wire, exactly the frame of the parts joined together.
        #[test]
        fn data_in_parts_is_the_same_frame_as_data_joined(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20_000), 0..6),
        ) {
            let joined: Vec<u8> = parts.concat();
            let parts: Vec<Bytes> = parts.into_iter().map(Bytes::from).collect();
            let mut tx = TxQueue::new();
            tx.push_frame_parts(Tag::Message, &[9; MSG_HEADER_BYTES], &Bytes::from_static(b"f"), parts.iter().map(|p| (p, &[][..])));
            let wire = tx.take_all();
            prop_assert_eq!(&wire, &one_frame(Tag::Message, &[9; MSG_HEADER_BYTES], b"f", &joined));
            let f = decode_all(&wire).unwrap().unwrap();
            prop_assert_eq!(&f.segments[2][..], &joined[..]);
        }
    }

    #[test]
    fn message_frame_round_trips_without_copying_data() {
        let data = vec![7u8; 100_000];
        let wire = one_frame(Tag::Message, &[9; MSG_HEADER_BYTES], b"front", &data);
        let f = decode_all(&wire).unwrap().unwrap();
        assert_eq!(f.tag, Tag::Message);
        assert_eq!(&f.segments[0][..], &[9; MSG_HEADER_BYTES]);
        assert_eq!(&f.segments[1][..], b"front");
        assert_eq!(&f.segments[2][..], &data[..]);
    }

    #[test]
    fn truncated_frames_wait_for_more() {
        let wire = one_frame(Tag::Message, &[0; MSG_HEADER_BYTES], b"abc", b"defg");
        for cut in 0..wire.len() {
            assert!(decode_all(&wire[..cut]).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn bad_preamble_crc_is_rejected() {
        let mut wire = one_frame(Tag::Ack, &[1], &[], &[]);
        wire[4] ^= 1;
        assert!(matches!(decode_all(&wire), Err(FrameError::PreambleCrc { .. })));
    }

    #[test]
    fn bad_segment_crc_is_rejected() {
        let mut wire = one_frame(Tag::Message, &[0; MSG_HEADER_BYTES], b"abc", b"defg");
        let last = wire.len() - 6;
        wire[last] ^= 0xff;
        assert_eq!(decode_all(&wire).unwrap_err(), FrameError::SegmentCrc { index: 2 });
    }

    #[test]
    fn unknown_tag_is_rejected() {
        let mut wire = one_frame(Tag::Ack, &[1], &[], &[]);
        wire[0] = 200;
        let crc = crc32c::crc32c(&wire[..20]);
        wire[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_all(&wire).unwrap_err(), FrameError::UnknownTag(200));
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_preamble_alone() {
        let limits = FrameLimits { front_bytes_max: 10, data_bytes_max: 1000 };
        let pre = Preamble { tag: Tag::Message, lens: [MSG_HEADER_BYTES as u32, 11, 0] }.encode();
        assert!(matches!(Preamble::decode(&pre, &limits), Err(FrameError::SegmentTooLong { index: 1, .. })));
        let pre = Preamble { tag: Tag::Ack, lens: [CONTROL_BYTES_MAX + 1, 0, 0] }.encode();
        assert!(matches!(Preamble::decode(&pre, &limits), Err(FrameError::SegmentTooLong { index: 0, .. })));
        let pre = Preamble { tag: Tag::Ack, lens: [1, 1, 0] }.encode();
        assert!(matches!(Preamble::decode(&pre, &limits), Err(FrameError::SegmentTooLong { index: 1, .. })));
        let pre = Preamble { tag: Tag::Message, lens: [3, 0, 0] }.encode();
        assert!(matches!(Preamble::decode(&pre, &limits), Err(FrameError::BadPreamble(_))));
    }

    #[test]
    fn data_sent_with_known_block_crcs_arrives_verified_with_its_block_crcs() {
        use crate::crc::{block_crcs, CrcBytes};
        let data: Bytes = (0..3 * CRC_BLOCK_BYTES + 10).map(|i| (i * 7) as u8).collect::<Vec<u8>>().into();
        // Known, unknown and known again: the sender combines what it knows and reads the rest.
        let parts = [
            CrcBytes::computed(data.slice(..CRC_BLOCK_BYTES)),
            CrcBytes::new(data.slice(CRC_BLOCK_BYTES..CRC_BLOCK_BYTES + 5)),
            CrcBytes::computed(data.slice(CRC_BLOCK_BYTES + 5..)),
        ];
        let mut tx = TxQueue::new();
        let seg0 = [0; MSG_HEADER_BYTES];
        tx.push_frame_parts(
            Tag::Message,
            &seg0,
            &Bytes::new(),
            parts.iter().map(|p| (p.bytes(), p.raw_crcs())),
        );
        let f = decode_all(&tx.take_all()).unwrap().unwrap();
        assert_eq!(f.segments[2], data);
        assert_eq!(
            f.data_crcs,
            block_crcs(&data),
            "the receiver keeps the crcs it verified the segment with"
        );
        let small = decode_all(&one_frame(Tag::Message, &seg0, b"", &[1; 100])).unwrap().unwrap();
        assert!(small.data_crcs.is_empty(), "no block crcs for less than a block");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "block crcs do not match")]
    fn a_wrong_known_crc_is_caught_before_it_is_sent() {
        use crate::crc::CrcBytes;
        let data = Bytes::from(vec![5u8; CRC_BLOCK_BYTES]);
        let wrong = CrcBytes::with_block_crcs(data, vec![0xdead_beef]);
        let mut tx = TxQueue::new();
        tx.push_frame_parts(
            Tag::Message,
            &[0; MSG_HEADER_BYTES],
            &Bytes::new(),
            std::iter::once((wrong.bytes(), wrong.raw_crcs())),
        );
    }

    /// A reader that hands out at most `step` bytes per read, like a socket receiving a stream in pieces.
    struct Trickle<'a>(&'a [u8], usize);

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Receives `wire` the way a session does (asking for the rest of the current frame) and decodes it.
    fn receive(rx: &mut RxBuf, wire: &[u8], step: usize) -> Vec<Frame> {
        let limits = FrameLimits::default();
        let mut r = Trickle(wire, step);
        let mut frames = Vec::new();
        loop {
            while let Some(f) = decode_frame(rx, &limits).unwrap() {
                frames.push(f);
            }
            let rest = peek_preamble(rx.data(), &limits).unwrap().map_or(0, |p| p.frame_bytes() - rx.len());
            if rx.read_from(&mut r, rest.max(64 << 10)).unwrap().0 == 0 {
                return frames;
            }
        }
    }

    #[test]
    fn rx_buf_keeps_unconsumed_data_across_growth() {
        let mut rx = RxBuf::from(&b"abc"[..]);
        assert_eq!(rx.split_to(1).as_ref(), b"a");
        assert_eq!(rx.read_from(&mut &b"de"[..], 1000).unwrap(), (2, rx.spare(0).len() + 2));
        assert_eq!(rx.data(), b"bcde");
        rx.clear();
        assert!(rx.is_empty());
    }

    #[test]
    fn rx_buf_grows_past_frames_still_held_and_reuses_its_room_once_they_are_dropped() {
        let mut rx = RxBuf::new();
        rx.extend_from_slice(&[7u8; 100]);
        let held = rx.split_to(60);
        let (n, offered) = rx.read_from(&mut &b"xyz"[..], RX_CHUNK_BYTES * 2).unwrap();
        assert_eq!(n, 3);
        assert!(offered >= RX_CHUNK_BYTES * 2);
        assert_eq!(&rx.data()[..40], &[7u8; 40][..], "received bytes move with the buffer");
        assert_eq!(&rx.data()[40..], b"xyz");
        assert_eq!(&held[..], &[7u8; 60][..], "a frame already split off keeps its bytes");
        let start = rx.data().as_ptr();
        drop(held);
        drop(rx.split_to(43));
        let past_the_tail = rx.spare(0).len() + 1;
        assert_eq!(rx.spare(past_the_tail).as_ptr(), start, "nothing holds the room: it is reused");
    }

    #[test]
    fn a_large_frame_arrives_in_a_buffer_of_its_own_which_is_recycled_once_dropped() {
        // 7 MiB of data: a size class no other test here uses, since the recycled buffers are process-wide.
        let data: Bytes =
            (0..7 * LARGE_FRAME_BYTES - 500).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        let seg0 = [3u8; MSG_HEADER_BYTES];
        let mut tx = TxQueue::new();
        tx.push_frame(Tag::Message, &seg0, &Bytes::from_static(b"front"), &data);
        tx.push_frame(Tag::Message, &seg0, &Bytes::new(), &Bytes::from_static(b"small"));
        tx.push_frame(Tag::Message, &seg0, &Bytes::new(), &data);
        let wire = tx.take_all();
        let mut rx = RxBuf::new();
        let frames = receive(&mut rx, &wire, 100_000);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].segments[2], data);
        assert_eq!(&frames[0].segments[1][..], b"front");
        assert_eq!(&frames[1].segments[2][..], b"small", "a small frame after a large one");
        assert_eq!(frames[2].segments[2], data);
        assert_eq!(frames[0].data_crcs, crc::block_crcs(&data), "block crcs computed as the blocks arrived");
        assert!(rx.is_empty());
        let first = frames[0].segments[2].as_ptr();
        assert_ne!(first, frames[2].segments[2].as_ptr(), "the first is still held: the second got another");
        drop(frames);
        let again = receive(&mut rx, &wire, 1 << 20);
        assert_eq!(again[0].segments[2], data);
        let reused = [again[0].segments[2].as_ptr(), again[2].segments[2].as_ptr()];
        assert!(reused.contains(&first), "a dropped large frame's buffer is taken again");
    }

    #[test]
    fn tx_queue_advances_across_chunks() {
        let mut tx = TxQueue::new();
        let big = Bytes::from(vec![1u8; COPY_BYTES_MAX + 1]);
        tx.push_frame(Tag::Message, &[0; MSG_HEADER_BYTES], &Bytes::new(), &big);
        tx.push_control(Tag::Ack, &5u64);
        let total = tx.queued_bytes();
        let mut slices = [IoSlice::new(&[]); IOV_MAX];
        let n = tx.io_slices(&mut slices);
        assert_eq!(n, 3, "header, big data, crc + ack");
        let sum: usize = slices[..n].iter().map(|s| s.len()).sum();
        assert_eq!(sum, total);
        tx.advance(10);
        tx.advance(PREAMBLE_BYTES + MSG_HEADER_BYTES + 4 - 10 + 5);
        assert_eq!(tx.queued_bytes(), total - (PREAMBLE_BYTES + MSG_HEADER_BYTES + 4 + 5));
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_all(&bytes);
        }

        #[test]
        fn frames_round_trip(front in proptest::collection::vec(any::<u8>(), 0..300),
                             data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let wire = one_frame(Tag::Message, &[3; MSG_HEADER_BYTES], &front, &data);
            let f = decode_all(&wire).unwrap().unwrap();
            prop_assert_eq!(&f.segments[1][..], &front[..]);
            prop_assert_eq!(&f.segments[2][..], &data[..]);
        }
    }
}
