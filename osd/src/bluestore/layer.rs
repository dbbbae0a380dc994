//! What queued transactions did to objects, held in memory until the commit thread has made it durable: a
//! *layer* per object over the state below it (the layer of the batch being committed, then what is on
//! disk).
//!
//! A layer states absolute facts, never increments: existence, size, version and the attributes are given
//! whole; data is "bytes at or past `data_limit` are not from below" plus pieces of bytes or zeros; the omap
//! is "cleared or not" plus keys set or removed. So applying a layer twice is the same as applying it once,
//! which is what lets a reader combine a layer with a disk state that may already contain it.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::store::Eversion;

/// A run of an object's data set by a layer.
#[derive(Clone, Debug)]
pub enum Piece {
    Data(Bytes),
    Zero(u64),
}

impl Piece {
    /// Never empty: a layer keeps no empty pieces.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> u64 {
        match self {
            Piece::Data(b) => b.len() as u64,
            Piece::Zero(n) => *n,
        }
    }

    /// `[from, to)` of the piece (offsets within it).
    fn slice(&self, from: u64, to: u64) -> Piece {
        assert!(from <= to && to <= self.len());
        match self {
            Piece::Data(b) => Piece::Data(b.slice(from as usize..to as usize)),
            Piece::Zero(_) => Piece::Zero(to - from),
        }
    }
}

/// One object's layer.
#[derive(Clone, Debug)]
pub struct ObjLayer {
    pub exists: bool,
    pub size: u64,
    pub version: Option<Eversion>,
    pub attrs: BTreeMap<String, Bytes>,
    /// Data at or past this offset does not come from below (reads zeros where no piece lies).
    pub data_limit: u64,
    /// Non-overlapping, non-empty, within `size`.
    pub pieces: BTreeMap<u64, Piece>,
    /// The omap below does not count.
    pub omap_cleared: bool,
    /// Keys set (`Some`) or removed (`None`).
    pub omap: BTreeMap<String, Option<Vec<u8>>>,
}

impl ObjLayer {
    /// A layer that changes nothing yet over an object below with these absolute facts.
    pub fn over(
        exists: bool,
        size: u64,
        version: Option<Eversion>,
        attrs: BTreeMap<String, Bytes>,
    ) -> ObjLayer {
        if !exists {
            return ObjLayer::absent();
        }
        ObjLayer {
            exists,
            size,
            version,
            attrs,
            data_limit: u64::MAX,
            pieces: BTreeMap::new(),
            omap_cleared: false,
            omap: BTreeMap::new(),
        }
    }

    /// An object that does not exist; nothing below counts.
    pub fn absent() -> ObjLayer {
        ObjLayer {
            exists: false,
            size: 0,
            version: None,
            attrs: BTreeMap::new(),
            data_limit: 0,
            pieces: BTreeMap::new(),
            omap_cleared: true,
            omap: BTreeMap::new(),
        }
    }

    /// Nothing below counts (a new, removed or re-created object).
    pub fn is_fresh(&self) -> bool {
        self.data_limit == 0 && self.omap_cleared
    }

    /// Creates the object, empty.
    pub fn create(&mut self) {
        *self = ObjLayer { exists: true, ..ObjLayer::absent() };
    }

    pub fn remove(&mut self) {
        *self = ObjLayer::absent();
    }

    pub fn write(&mut self, offset: u64, data: Bytes) {
        assert!(self.exists);
        let end = offset + data.len() as u64;
        if !data.is_empty() {
            self.put(offset, Piece::Data(data));
        }
        self.size = self.size.max(end);
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        assert!(self.exists);
        if len > 0 {
            self.put(offset, Piece::Zero(len));
        }
        self.size = self.size.max(offset + len);
    }

    pub fn truncate(&mut self, size: u64) {
        assert!(self.exists);
        if size < self.size {
            self.data_limit = self.data_limit.min(size);
            self.punch(size, u64::MAX);
        }
        self.size = size;
    }

    fn put(&mut self, offset: u64, piece: Piece) {
        self.punch(offset, offset + piece.len());
        self.pieces.insert(offset, piece);
    }

    /// Removes whatever pieces cover `[from, to)`, keeping their parts outside it.
    fn punch(&mut self, from: u64, to: u64) {
        if let Some((&start, p)) = self.pieces.range(..from).next_back() {
            let end = start + p.len();
            if end > from {
                let p = p.clone();
                self.pieces.insert(start, p.slice(0, from - start));
                if end > to {
                    self.pieces.insert(to, p.slice(to - start, end - start));
                }
            }
        }
        let inside: Vec<u64> = self.pieces.range(from..to).map(|(&k, _)| k).collect();
        for start in inside {
            let p = self.pieces.remove(&start).expect("just listed");
            let end = start + p.len();
            if end > to {
                self.pieces.insert(to, p.slice(to - start, end - start));
            }
        }
    }

    /// Applies this layer's data to `buf`, which holds the object's bytes from `offset` as the layers below
    /// have them.
    pub fn overlay(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        if self.data_limit < end {
            let from = self.data_limit.max(offset);
            buf[(from - offset) as usize..].fill(0);
        }
        let first = self.pieces.range(..offset).next_back().filter(|(&s, p)| s + p.len() > offset);
        for (&start, p) in first.into_iter().chain(self.pieces.range(offset..end)) {
            let from = start.max(offset);
            let to = (start + p.len()).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match p {
                Piece::Data(b) => dst.copy_from_slice(&b[(from - start) as usize..(to - start) as usize]),
                Piece::Zero(_) => dst.fill(0),
            }
        }
    }

    /// Pieces overlapping `[from, to)`, with their start offsets.
    pub fn pieces_in(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, &Piece)> {
        let first = self.pieces.range(..from).next_back().filter(move |(&s, p)| s + p.len() > from);
        first.into_iter().chain(self.pieces.range(from..to)).map(|(&s, p)| (s, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_behaves_like_a_byte_vector_and_applies_idempotently() {
        // Goal: pieces, zeros and truncates over a lower state give the bytes a plain vector would, and
        // applying the layer to a state that already has it changes nothing. Method: seeded random ops on a
        // layer over random lower bytes, checked against a model vector after each op.
        let mut seed = 0x9e37_79b9_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let lower: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut l = ObjLayer::over(true, lower.len() as u64, None, BTreeMap::new());
        let mut model = lower.clone();
        for i in 0..2000 {
            let off = next(6000);
            let len = next(700);
            match next(3) {
                0 => {
                    let data: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                    l.write(off, Bytes::from(data.clone()));
                    if model.len() < (off + len) as usize {
                        model.resize((off + len) as usize, 0);
                    }
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                1 => {
                    l.zero(off, len);
                    if model.len() < (off + len) as usize {
                        model.resize((off + len) as usize, 0);
                    }
                    model[off as usize..(off + len) as usize].fill(0);
                }
                _ => {
                    l.truncate(off);
                    model.resize(off as usize, 0);
                }
            }
            assert_eq!(l.size, model.len() as u64);
            let mut buf = vec![0u8; model.len()];
            let n = buf.len().min(lower.len());
            buf[..n].copy_from_slice(&lower[..n]);
            l.overlay(&mut buf, 0);
            assert_eq!(buf, model, "op {i}");
            let mut twice = buf.clone();
            l.overlay(&mut twice, 0);
            assert_eq!(twice, model, "op {i}: applying twice");
            let from = next(model.len() as u64 + 1);
            let mut part = buf[from as usize..].to_vec();
            let n = part.len().min(lower.len().saturating_sub(from as usize));
            if n > 0 {
                part[..n].copy_from_slice(&lower[from as usize..from as usize + n]);
            }
            part[n..].fill(0);
            l.overlay(&mut part, from);
            assert_eq!(part, &model[from as usize..], "op {i}: partial overlay from {from}");
        }
    }
}
