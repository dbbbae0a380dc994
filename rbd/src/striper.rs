//! Striping: where each byte of an image lives among its RADOS objects.
//!
//! This is Ceph's `Striper::file_to_extents` (src/osdc/Striper.cc) and its inverse. An image is cut into
//! *stripe units* of `su` bytes that are dealt round-robin across `stripe_count` (`sc`) objects; when each
//! of those objects holds `object_size / su` units, the next *object set* of `sc` objects begins. With the
//! default layout (`su` = object size, `sc` = 1) this degenerates to "object `n` holds bytes
//! `[n·os, (n+1)·os)`".
//!
//! ```text
//! su = 1 unit, sc = 3, os = 2 units:      object 0   object 1   object 2  | object 3 ...
//!                          object set 0:  unit 0     unit 1     unit 2    |
//!                                         unit 3     unit 4     unit 5    | unit 6 ...
//! ```
//!
//! Everything here is pure arithmetic on `u64`: no IO, no allocation beyond the returned vectors.
//! What it deliberately is not: it knows nothing about image size (callers clip), object existence or
//! the object map.

use std::fmt;

/// Smallest object order Ceph accepts (4 KiB objects): `rbd_types.h`, `rbd.yaml.in`.
pub const OBJECT_ORDER_MIN: u32 = 12;
/// Largest object order Ceph accepts (32 MiB objects).
pub const OBJECT_ORDER_MAX: u32 = 25;
/// Ceph's `rbd_default_order`: 4 MiB objects.
pub const OBJECT_ORDER_DEFAULT: u32 = 22;

/// Prefix of every format-2 data object (`RBD_DATA_PREFIX` in Ceph's `rbd_types.h`).
pub const DATA_OBJECT_PREFIX: &str = "rbd_data.";

/// How an image's bytes are spread over its data objects.
///
/// Invariants (checked by [`Layout::new`], so every value of this type satisfies them):
/// `object_size_bytes` is `2^order` with `order` in `OBJECT_ORDER_MIN..=OBJECT_ORDER_MAX`,
/// `stripe_unit_bytes > 0` divides `object_size_bytes`, and `stripe_count >= 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    object_size_bytes: u64,
    stripe_unit_bytes: u64,
    stripe_count: u32,
}

/// Why a [`Layout`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("object size {object_size_bytes} bytes is not a power of two")]
    ObjectSizeNotPowerOfTwo { object_size_bytes: u64 },
    #[error(
        "object order {order} is outside {OBJECT_ORDER_MIN} to {OBJECT_ORDER_MAX} (objects of {} KiB to {} MiB)",
        1u64 << (OBJECT_ORDER_MIN - 10),
        1u64 << (OBJECT_ORDER_MAX - 20)
    )]
    ObjectOrderOutOfRange { order: u32 },
    #[error("stripe unit must be at least one byte")]
    StripeUnitZero,
    #[error("stripe unit {stripe_unit_bytes} bytes does not divide object size {object_size_bytes} bytes")]
    StripeUnitNotFactor { stripe_unit_bytes: u64, object_size_bytes: u64 },
    #[error("stripe count must be at least 1")]
    StripeCountZero,
}

/// Why an extent could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("image extent at offset {offset} of {len} bytes ends past 2^64")]
    ImageExtentOverflow { offset: u64, len: u64 },
    #[error(
        "object extent at {offset_in_object} of {len} bytes exceeds the object size {object_size_bytes}"
    )]
    ObjectExtentOutOfBounds { offset_in_object: u64, len: u64, object_size_bytes: u64 },
    #[error("object {object_no} holds bytes beyond the largest image offset (2^64 - 1)")]
    ObjectBeyondImage { object_no: u64 },
}

/// One piece of an image extent, inside one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectExtent {
    pub object_no: u64,
    pub offset_in_object: u64,
    pub len: u64,
    /// Where this piece lives in the caller's buffer: its image offset minus the extent's start.
    pub buffer_offset: u64,
}

/// One piece of an object range, in image coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageExtent {
    pub image_offset: u64,
    pub offset_in_object: u64,
    pub len: u64,
}

impl Layout {
    /// A validated layout. Ceph's rules (librbd `CreateRequest::validate_layout`): the stripe unit is a
    /// factor of the object size, and the object size is one of the allowed powers of two.
    pub fn new(
        object_size_bytes: u64,
        stripe_unit_bytes: u64,
        stripe_count: u32,
    ) -> Result<Self, LayoutError> {
        if !object_size_bytes.is_power_of_two() {
            return Err(LayoutError::ObjectSizeNotPowerOfTwo { object_size_bytes });
        }
        let order = object_size_bytes.trailing_zeros();
        if !(OBJECT_ORDER_MIN..=OBJECT_ORDER_MAX).contains(&order) {
            return Err(LayoutError::ObjectOrderOutOfRange { order });
        }
        if stripe_unit_bytes == 0 {
            return Err(LayoutError::StripeUnitZero);
        }
        if !object_size_bytes.is_multiple_of(stripe_unit_bytes) {
            return Err(LayoutError::StripeUnitNotFactor { stripe_unit_bytes, object_size_bytes });
        }
        if stripe_count == 0 {
            return Err(LayoutError::StripeCountZero);
        }
        Ok(Layout { object_size_bytes, stripe_unit_bytes, stripe_count })
    }

    /// The layout Ceph uses without the STRIPINGV2 feature: one stripe unit per object, one object per set.
    pub fn from_order(order: u32) -> Result<Self, LayoutError> {
        if !(OBJECT_ORDER_MIN..=OBJECT_ORDER_MAX).contains(&order) {
            return Err(LayoutError::ObjectOrderOutOfRange { order });
        }
        let object_size_bytes = 1u64 << order;
        Layout::new(object_size_bytes, object_size_bytes, 1)
    }

    pub fn object_size_bytes(&self) -> u64 {
        self.object_size_bytes
    }

    pub fn stripe_unit_bytes(&self) -> u64 {
        self.stripe_unit_bytes
    }

    pub fn stripe_count(&self) -> u32 {
        self.stripe_count
    }

    /// `log2(object_size_bytes)`, Ceph's "order".
    pub fn order(&self) -> u32 {
        self.object_size_bytes.trailing_zeros()
    }

    /// Stripe units per object: the number of rows in an object set.
    pub fn stripes_per_object(&self) -> u64 {
        self.object_size_bytes / self.stripe_unit_bytes
    }

    /// Bytes in one object set (`object_size · stripe_count`, Ceph's "period"). At most 2^25 · (2^32 - 1),
    /// so it always fits in a `u64`.
    pub fn object_set_bytes(&self) -> u64 {
        self.object_size_bytes * u64::from(self.stripe_count)
    }

    /// Where the image byte at `offset` lives: `(object number, offset in object)`.
    ///
    /// Ceph's formula, term for term. None of the products overflow: `object_no <= offset / os + sc`.
    pub fn locate(&self, offset: u64) -> (u64, u64) {
        let su = self.stripe_unit_bytes;
        let sc = u64::from(self.stripe_count);
        let block_no = offset / su;
        let stripe_no = block_no / sc;
        let stripe_pos = block_no % sc;
        let object_set_no = stripe_no / self.stripes_per_object();
        let object_no = object_set_no * sc + stripe_pos;
        let offset_in_object = (stripe_no % self.stripes_per_object()) * su + offset % su;
        (object_no, offset_in_object)
    }

    /// Maps the image extent `[offset, offset + len)` to object extents.
    ///
    /// Ordering: pieces come in increasing image offset, so `buffer_offset` starts at 0, strictly increases,
    /// and each piece starts where the previous one ended; together they tile `[0, len)` exactly once.
    /// Consecutive pieces in the same object are merged when they are contiguous in both the object and
    /// the buffer (always the case with `stripe_count == 1`). Unlike Ceph, which groups pieces per object
    /// with a buffer-extent list, one object may appear in several non-adjacent pieces when
    /// `stripe_count > 1`; callers that issue one op per object group them themselves.
    pub fn map_extent(&self, offset: u64, len: u64) -> Result<Vec<ObjectExtent>, ExtentError> {
        if offset.checked_add(len).is_none() {
            return Err(ExtentError::ImageExtentOverflow { offset, len });
        }
        let su = self.stripe_unit_bytes;
        let mut pieces: Vec<ObjectExtent> = Vec::new();
        let mut cursor = offset;
        let mut left = len;
        while left > 0 {
            let (object_no, offset_in_object) = self.locate(cursor);
            // With one object per set, the rest of the object is contiguous in the image, so take it in one
            // step instead of one stripe unit at a time (a 4 MiB object with 4 KiB units is 1024 steps).
            let room = if self.stripe_count == 1 {
                self.object_size_bytes - offset_in_object
            } else {
                su - cursor % su
            };
            let piece_len = left.min(room);
            let buffer_offset = cursor - offset;
            match pieces.last_mut() {
                Some(last)
                    if last.object_no == object_no
                        && last.offset_in_object + last.len == offset_in_object
                        && last.buffer_offset + last.len == buffer_offset =>
                {
                    last.len += piece_len;
                }
                _ => pieces.push(ObjectExtent { object_no, offset_in_object, len: piece_len, buffer_offset }),
            }
            cursor += piece_len;
            left -= piece_len;
        }
        Ok(pieces)
    }

    /// Maps the object range `[offset_in_object, offset_in_object + len)` of `object_no` back to the image
    /// extents it stores, in increasing image offset (which is also increasing offset in the object).
    /// Contiguous pieces are merged. Callers clip the result to the image size themselves; an object past
    /// the end of the image still has a well-defined place in the (unbounded) address space.
    pub fn object_to_image_extents(
        &self,
        object_no: u64,
        offset_in_object: u64,
        len: u64,
    ) -> Result<Vec<ImageExtent>, ExtentError> {
        let out_of_bounds = ExtentError::ObjectExtentOutOfBounds {
            offset_in_object,
            len,
            object_size_bytes: self.object_size_bytes,
        };
        let end = offset_in_object.checked_add(len).ok_or(out_of_bounds.clone())?;
        if end > self.object_size_bytes {
            return Err(out_of_bounds);
        }
        let su = self.stripe_unit_bytes;
        let sc = u64::from(self.stripe_count);
        let object_set_no = object_no / sc;
        let stripe_pos = object_no % sc;
        let beyond = ExtentError::ObjectBeyondImage { object_no };
        // Image offset of byte `off` of this object, with every step checked: huge object numbers name
        // bytes past 2^64.
        let image_offset_of = |off: u64| -> Option<u64> {
            let stripe_no = object_set_no.checked_mul(self.stripes_per_object())?.checked_add(off / su)?;
            let block_no = stripe_no.checked_mul(sc)?.checked_add(stripe_pos)?;
            block_no.checked_mul(su)?.checked_add(off % su)
        };
        let mut pieces: Vec<ImageExtent> = Vec::new();
        let mut cursor = offset_in_object;
        while cursor < end {
            let image_offset = image_offset_of(cursor).ok_or(beyond.clone())?;
            // Same shortcut as map_extent: with one object per set the object is one contiguous run.
            let room = if self.stripe_count == 1 { end - cursor } else { su - cursor % su };
            let piece_len = (end - cursor).min(room);
            // The piece's last byte must be addressable too.
            image_offset.checked_add(piece_len - 1).ok_or(beyond.clone())?;
            match pieces.last_mut() {
                Some(last) if last.image_offset + last.len == image_offset => last.len += piece_len,
                _ => pieces.push(ImageExtent { image_offset, offset_in_object: cursor, len: piece_len }),
            }
            cursor += piece_len;
        }
        Ok(pieces)
    }

    /// How many objects an image of `image_size_bytes` spans: one more than the highest object number
    /// holding any of its bytes (Ceph's `Striper::get_num_objects`). Object numbers below it may still be
    /// absent in RADOS (never written), but none above it can hold image data.
    pub fn object_count(&self, image_size_bytes: u64) -> u64 {
        let sc = u64::from(self.stripe_count);
        let set_bytes = self.object_set_bytes();
        let sets = image_size_bytes.div_ceil(set_bytes);
        let tail_bytes = image_size_bytes % set_bytes;
        // A partial last set whose first row is itself partial leaves its last objects untouched.
        let untouched_in_last_set = if tail_bytes > 0 && tail_bytes < sc * self.stripe_unit_bytes {
            sc - tail_bytes.div_ceil(self.stripe_unit_bytes)
        } else {
            0
        };
        sets * sc - untouched_in_last_set
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "object_size={} stripe_unit={} stripe_count={}",
            self.object_size_bytes, self.stripe_unit_bytes, self.stripe_count
        )
    }
}

/// The RADOS name of a format-2 data object: `rbd_data.<image id>.<object number as 16 lowercase hex>`
/// (librbd `util::data_object_name`, format string `%016llx`).
pub fn object_name(image_id: &str, object_no: u64) -> String {
    format!("{DATA_OBJECT_PREFIX}{image_id}.{object_no:016x}")
}

/// The inverse of [`object_name`]: `(image id, object number)`, or `None` if `name` is not a data object
/// name in exactly that form (16 lowercase hex digits; format 1's 12-digit names are not accepted).
pub fn parse_object_name(name: &str) -> Option<(&str, u64)> {
    let rest = name.strip_prefix(DATA_OBJECT_PREFIX)?;
    let (image_id, number) = rest.rsplit_once('.')?;
    let is_lower_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
    if image_id.is_empty() || number.len() != 16 || !number.bytes().all(is_lower_hex) {
        return None;
    }
    let object_no = u64::from_str_radix(number, 16).ok()?;
    Some((image_id, object_no))
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn layout(os: u64, su: u64, sc: u32) -> Layout {
        Layout::new(os, su, sc).expect("test layouts are valid")
    }

    /// Independent reference: simulate Ceph's dealing of stripe units, walking the image one unit at a time
    /// through (object set, row, column). Returns, per image byte in `[0, len)`, its (object, offset).
    fn simulate(layout: &Layout, len: u64) -> Vec<(u64, u64)> {
        let su = layout.stripe_unit_bytes();
        let sc = u64::from(layout.stripe_count());
        let rows = layout.stripes_per_object();
        let mut out = Vec::with_capacity(len as usize);
        let (mut set, mut row, mut column) = (0u64, 0u64, 0u64);
        while (out.len() as u64) < len {
            for byte in 0..su {
                if out.len() as u64 == len {
                    break;
                }
                out.push((set * sc + column, row * su + byte));
            }
            column += 1;
            if column == sc {
                column = 0;
                row += 1;
                if row == rows {
                    row = 0;
                    set += 1;
                }
            }
        }
        out
    }

    /// Checks `pieces` against the per-byte reference for the extent `[offset, offset + len)`.
    fn check_pieces(layout: &Layout, offset: u64, len: u64, pieces: &[ObjectExtent]) {
        let mut expected_buffer_offset = 0;
        for (i, piece) in pieces.iter().enumerate() {
            assert!(piece.len > 0, "empty piece {piece:?}");
            assert_eq!(piece.buffer_offset, expected_buffer_offset, "pieces out of order or overlapping");
            assert!(piece.offset_in_object + piece.len <= layout.object_size_bytes());
            for k in 0..piece.len {
                let image_byte = offset + piece.buffer_offset + k;
                assert_eq!(
                    layout.locate(image_byte),
                    (piece.object_no, piece.offset_in_object + k),
                    "byte {image_byte} of piece {i} ({layout})"
                );
            }
            if let Some(prev) = i.checked_sub(1).map(|j| pieces[j]) {
                let mergeable = prev.object_no == piece.object_no
                    && prev.offset_in_object + prev.len == piece.offset_in_object;
                assert!(!mergeable, "unmerged neighbours {prev:?} {piece:?}");
            }
            expected_buffer_offset += piece.len;
        }
        assert_eq!(expected_buffer_offset, len, "pieces do not cover the extent");
    }

    #[test]
    fn default_layout_is_one_object_per_object_size() {
        let l = Layout::from_order(OBJECT_ORDER_DEFAULT).unwrap();
        let mib4 = 4 << 20;
        assert_eq!(
            l.map_extent(mib4 - 10, 20).unwrap(),
            vec![
                ObjectExtent { object_no: 0, offset_in_object: mib4 - 10, len: 10, buffer_offset: 0 },
                ObjectExtent { object_no: 1, offset_in_object: 0, len: 10, buffer_offset: 10 },
            ]
        );
        assert_eq!(l.object_count(0), 0);
        assert_eq!(l.object_count(1), 1);
        assert_eq!(l.object_count(mib4), 1);
        assert_eq!(l.object_count(mib4 + 1), 2);
    }

    #[test]
    fn fancy_striping_matches_ceph_worked_example() {
        // su = 4 KiB, sc = 3, os = 8 KiB: units 0,1,2 go to objects 0,1,2 at offset 0; units 3,4,5 at 4 KiB;
        // unit 6 starts object set 1 (objects 3,4,5).
        let k = 4096;
        let l = layout(2 * k, k, 3);
        let pieces = l.map_extent(k / 2, 6 * k + 1).unwrap();
        let expect =
            [(0, k / 2, k / 2), (1, 0, k), (2, 0, k), (0, k, k), (1, k, k), (2, k, k), (3, 0, k / 2 + 1)];
        let mut buffer_offset = 0;
        assert_eq!(pieces.len(), expect.len());
        for (piece, (object_no, offset_in_object, len)) in pieces.iter().zip(expect) {
            assert_eq!(*piece, ObjectExtent { object_no, offset_in_object, len, buffer_offset });
            buffer_offset += len;
        }
        assert_eq!(l.object_count(6 * k), 3);
        assert_eq!(l.object_count(6 * k + 1), 4);
        assert_eq!(l.object_count(7 * k), 4);
        assert_eq!(l.object_count(8 * k + 1), 6, "row 0 of set 1 is full, row 1 starts on object 3");
    }

    #[test]
    fn stripe_count_one_merges_units_into_one_piece_per_object() {
        let l = layout(1 << 16, 4096, 1);
        let pieces = l.map_extent(100, 3 << 16).unwrap();
        assert_eq!(pieces.len(), 4);
        assert_eq!(
            pieces[0],
            ObjectExtent { object_no: 0, offset_in_object: 100, len: (1 << 16) - 100, buffer_offset: 0 }
        );
        assert_eq!(pieces[3].len, 100);
    }

    #[test]
    fn zero_length_extent_maps_to_nothing() {
        assert!(layout(4096, 4096, 1).map_extent(12345, 0).unwrap().is_empty());
        assert!(layout(4096, 4096, 1).object_to_image_extents(3, 4096, 0).unwrap().is_empty());
    }

    #[test]
    fn extent_ending_past_u64_is_refused() {
        let l = layout(4096, 4096, 1);
        assert_eq!(
            l.map_extent(u64::MAX, 1),
            Err(ExtentError::ImageExtentOverflow { offset: u64::MAX, len: 1 })
        );
        // The very last byte of the address space is fine.
        assert_eq!(l.map_extent(u64::MAX - 1, 1).unwrap().len(), 1);
        assert_eq!(l.object_count(u64::MAX), u64::MAX / 4096 + 1);
    }

    #[test]
    fn object_ranges_out_of_bounds_are_refused() {
        let l = layout(8192, 4096, 2);
        assert!(matches!(
            l.object_to_image_extents(0, 4096, 4097),
            Err(ExtentError::ObjectExtentOutOfBounds { .. })
        ));
        assert!(matches!(
            l.object_to_image_extents(0, u64::MAX, 2),
            Err(ExtentError::ObjectExtentOutOfBounds { .. })
        ));
        assert_eq!(
            l.object_to_image_extents(u64::MAX, 0, 1),
            Err(ExtentError::ObjectBeyondImage { object_no: u64::MAX })
        );
    }

    #[test]
    fn layout_validation() {
        assert_eq!(
            Layout::new(3 << 12, 4096, 1),
            Err(LayoutError::ObjectSizeNotPowerOfTwo { object_size_bytes: 3 << 12 })
        );
        assert_eq!(Layout::new(2048, 2048, 1), Err(LayoutError::ObjectOrderOutOfRange { order: 11 }));
        assert_eq!(Layout::new(1 << 26, 4096, 1), Err(LayoutError::ObjectOrderOutOfRange { order: 26 }));
        assert_eq!(
            Layout::new(0, 4096, 1),
            Err(LayoutError::ObjectSizeNotPowerOfTwo { object_size_bytes: 0 })
        );
        assert_eq!(Layout::new(4096, 0, 1), Err(LayoutError::StripeUnitZero));
        assert_eq!(
            Layout::new(4096, 3000, 1),
            Err(LayoutError::StripeUnitNotFactor { stripe_unit_bytes: 3000, object_size_bytes: 4096 })
        );
        assert_eq!(
            Layout::new(4096, 8192, 1),
            Err(LayoutError::StripeUnitNotFactor { stripe_unit_bytes: 8192, object_size_bytes: 4096 })
        );
        assert_eq!(Layout::new(4096, 4096, 0), Err(LayoutError::StripeCountZero));
        assert_eq!(Layout::from_order(26), Err(LayoutError::ObjectOrderOutOfRange { order: 26 }));
        let max = Layout::new(1 << 25, 1, u32::MAX).unwrap();
        assert_eq!(max.object_set_bytes(), (1u64 << 25) * u64::from(u32::MAX));
        assert_eq!(max.order(), 25);
    }

    #[test]
    fn object_names() {
        assert_eq!(object_name("10226b8b4567", 0), "rbd_data.10226b8b4567.0000000000000000");
        assert_eq!(object_name("abc", 0xdead_beef), "rbd_data.abc.00000000deadbeef");
        assert_eq!(object_name("abc", u64::MAX), "rbd_data.abc.ffffffffffffffff");
        assert_eq!(parse_object_name("rbd_data.abc.00000000deadbeef"), Some(("abc", 0xdead_beef)));
        assert_eq!(parse_object_name("rbd_data.abc.00000000DEADBEEF"), None);
        assert_eq!(parse_object_name("rbd_data.abc.000000deadbeef"), None, "format 1 width");
        assert_eq!(parse_object_name("rbd_data..0000000000000000"), None);
        assert_eq!(parse_object_name("rbd_header.abc"), None);
        assert_eq!(parse_object_name("rbd_data.abc.+000000000000001"), None);
    }

    #[test]
    fn simulation_is_a_bijection_onto_whole_object_sets() {
        // Every (object, offset) of the first few object sets is hit exactly once, for small layouts where a
        // per-byte walk is cheap (4 KiB objects, units down to 512 bytes).
        for su in [512, 1024, 2048, 4096] {
            for sc in 1..=5u32 {
                let l = layout(4096, su, sc);
                let sets = 3;
                let len = sets * l.object_set_bytes();
                let mut seen = vec![false; len as usize];
                for (byte, (object_no, off)) in simulate(&l, len).into_iter().enumerate() {
                    assert_eq!(l.locate(byte as u64), (object_no, off), "{l} byte {byte}");
                    let slot = (object_no * 4096 + off) as usize;
                    assert!(!seen[slot], "{l}: ({object_no}, {off}) hit twice");
                    seen[slot] = true;
                }
                assert!(seen.iter().all(|&s| s));
                assert_eq!(l.object_count(len), sets * u64::from(sc));
            }
        }
    }

    /// Random layouts: object order 12..=22, stripe unit a power of two from 4 KiB to the object size,
    /// stripe count 1..=8.
    fn layouts() -> impl Strategy<Value = Layout> {
        (12u32..=22, 1u32..=8).prop_flat_map(|(order, sc)| {
            (12u32..=order).prop_map(move |su_order| layout(1 << order, 1 << su_order, sc))
        })
    }

    /// An extent somewhere in the first few object sets, biased towards stripe-unit boundaries, at most
    /// 1 MiB long so the per-byte check stays fast in a debug build.
    fn extents(l: Layout) -> impl Strategy<Value = (u64, u64)> {
        let su = l.stripe_unit_bytes();
        let span = 4 * l.object_set_bytes();
        let anywhere = 0..span;
        let near_boundary = (0..span / su, 0..64u64, any::<bool>()).prop_map(move |(unit, delta, before)| {
            if before {
                (unit * su).saturating_sub(delta)
            } else {
                unit * su + delta
            }
        });
        let max_len = (3 * su * u64::from(l.stripe_count())).min(1 << 20);
        (prop_oneof![anywhere, near_boundary], prop_oneof![0..=max_len, 0..=64u64])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn map_extent_matches_per_byte_formula((l, (offset, len)) in layouts().prop_flat_map(|l| (Just(l), extents(l)))) {
            let pieces = l.map_extent(offset, len).unwrap();
            check_pieces(&l, offset, len, &pieces);
        }

        #[test]
        fn locate_matches_simulation_on_small_layouts(su_order in 9u32..=12, sc in 1u32..=8, sets in 1u64..=3) {
            let l = layout(4096, 1 << su_order, sc);
            let len = sets * l.object_set_bytes();
            for (byte, expected) in simulate(&l, len).into_iter().enumerate() {
                prop_assert_eq!(l.locate(byte as u64), expected);
            }
        }

        #[test]
        fn object_to_image_extents_inverts_map_extent(
            (l, object_no, off, len) in layouts().prop_flat_map(|l| {
                let os = l.object_size_bytes();
                (Just(l), 0..4 * u64::from(l.stripe_count()) + 3, 0..os)
                    .prop_flat_map(move |(l, object_no, off)| (Just(l), Just(object_no), Just(off), 0..=(os - off).min(1 << 18)))
            })
        ) {
            let back = l.object_to_image_extents(object_no, off, len).unwrap();
            let mut cursor = off;
            for extent in &back {
                prop_assert_eq!(extent.offset_in_object, cursor);
                for k in [0, extent.len / 2, extent.len - 1] {
                    prop_assert_eq!(l.locate(extent.image_offset + k), (object_no, cursor + k));
                }
                // Forward again: one piece, exactly this object range.
                let forward = l.map_extent(extent.image_offset, extent.len).unwrap();
                prop_assert_eq!(forward, vec![ObjectExtent { object_no, offset_in_object: cursor, len: extent.len, buffer_offset: 0 }]);
                cursor += extent.len;
            }
            prop_assert_eq!(cursor, off + len);
            for pair in back.windows(2) {
                prop_assert!(pair[0].image_offset + pair[0].len < pair[1].image_offset, "unmerged or unordered");
            }
        }

        #[test]
        fn object_count_is_one_past_the_highest_object_touched(
            (l, size) in layouts().prop_flat_map(|l| (Just(l), 0..=3 * l.object_set_bytes() + 1))
        ) {
            // Reference: the highest object any stripe unit of the image touches. Checking the first byte of
            // each unit (and the last image byte) is enough, since a unit never spans two objects.
            let su = l.stripe_unit_bytes();
            let mut highest: Option<u64> = None;
            for unit in 0..size.div_ceil(su) {
                let object_no = l.locate(unit * su).0;
                highest = Some(highest.map_or(object_no, |h| h.max(object_no)));
            }
            prop_assert_eq!(l.object_count(size), highest.map_or(0, |h| h + 1));
        }
    }
}
