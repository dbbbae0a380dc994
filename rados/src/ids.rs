//! Identifiers shared by every cuttle component.
//!
//! Each is a newtype, not an alias, so an `OsdId` cannot be passed where a `PoolId` is expected. All of them
//! are `Copy`, ordered (maps keyed by them iterate deterministically) and serialised by serde as their inner
//! integers, so postcard encodes them as plain varints (`Fsid` as 16 raw bytes).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An object storage daemon, `osd.N` in Ceph's notation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OsdId(pub u32);

/// A pool: a namespace of objects with its own replication and PG count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolId(pub u32);

/// A placement group: the pool plus the PG's index ("seed", Ceph's `ps`) in `0..pool.pg_num`.
///
/// Displayed as Ceph does, pool in decimal and seed in hex: `1.1f`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PgId {
    /// The pool the PG belongs to.
    pub pool: PoolId,
    /// The PG's index within its pool.
    pub seed: u32,
}

/// A version of a cluster map. Every change to the `OsdMap` makes a new epoch, exactly one greater.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u32);

/// The cluster's identity. Every map and every message carries it, so that daemons of two clusters that
/// share a network (or a stale config file) refuse to talk instead of corrupting each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fsid(pub [u8; 16]);

/// Why a string did not parse as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    /// A PG id must look like `<pool decimal>.<seed hex>`, e.g. `1.1f`.
    #[error("invalid PG id {0:?}: expected <pool>.<seed in hex>, e.g. 1.1f")]
    PgId(String),
    /// An fsid must look like a UUID: 32 hex digits in groups of 8-4-4-4-12.
    #[error("invalid fsid {0:?}: expected 8-4-4-4-12 hex digits")]
    Fsid(String),
}

impl Epoch {
    /// The epoch that follows this one, or `None` if the counter is exhausted.
    pub const fn checked_next(self) -> Option<Epoch> {
        match self.0.checked_add(1) {
            Some(next) => Some(Epoch(next)),
            None => None,
        }
    }
}

impl PgId {
    /// Convenience constructor.
    pub const fn new(pool: PoolId, seed: u32) -> PgId {
        PgId { pool, seed }
    }
}

impl fmt::Display for OsdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "osd.{}", self.0)
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for PgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.pool, self.seed)
    }
}

impl fmt::Display for Epoch {
    /// `e42`, as in Ceph's "osdmap e42".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

impl fmt::Display for Fsid {
    /// UUID layout: `01234567-89ab-cdef-0123-456789abcdef`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for PgId {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<PgId, IdParseError> {
        let err = || IdParseError::PgId(s.to_owned());
        let (pool, seed) = s.split_once('.').ok_or_else(err)?;
        // `from_str_radix` accepts a leading '+', which no printer of ours emits; reject it so that parsing
        // and Display are inverses.
        if !pool.bytes().all(|b| b.is_ascii_digit()) || !seed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let pool = pool.parse::<u32>().map_err(|_| err())?;
        let seed = u32::from_str_radix(seed, 16).map_err(|_| err())?;
        Ok(PgId { pool: PoolId(pool), seed })
    }
}

impl FromStr for Fsid {
    type Err = IdParseError;

    fn from_str(s: &str) -> Result<Fsid, IdParseError> {
        let err = || IdParseError::Fsid(s.to_owned());
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(err());
        }
        let digits: Vec<u8> = groups.concat().into_bytes();
        let mut bytes = [0u8; 16];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(err)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(err)?;
            // Both digits are < 16, so the value fits a byte.
            *byte = (hi * 16 + lo) as u8;
        }
        Ok(Fsid(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn display_matches_ceph_notation() {
        assert_eq!(OsdId(7).to_string(), "osd.7");
        assert_eq!(PoolId(3).to_string(), "3");
        assert_eq!(PgId::new(PoolId(1), 0x1f).to_string(), "1.1f");
        assert_eq!(PgId::new(PoolId(12), 0).to_string(), "12.0");
        assert_eq!(Epoch(42).to_string(), "e42");
        let fsid = Fsid([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
        ]);
        assert_eq!(fsid.to_string(), "01234567-89ab-cdef-0123-456789abcdef");
    }

    #[test]
    fn pg_id_parse_rejects_malformed() {
        for bad in
            ["", "1", "1.", ".1", "1.1g", "x.1", "+1.1", "1.+1", "1.1.1", "4294967296.0", "1.100000000"]
        {
            assert!(bad.parse::<PgId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!("1.1F".parse::<PgId>(), Ok(PgId::new(PoolId(1), 0x1f)));
    }

    #[test]
    fn fsid_parse_rejects_malformed() {
        for bad in [
            "",
            "01234567-89ab-cdef-0123-456789abcde",
            "01234567-89ab-cdef-0123-456789abcdeg",
            "0123456789ab-cdef-0123-456789abcdef",
            "01234567-89ab-cdef-0123-456789abcdef-",
            "0123456-789ab-cdef-0123-456789abcdef",
        ] {
            assert!(bad.parse::<Fsid>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn epoch_next_stops_at_the_end() {
        assert_eq!(Epoch(0).checked_next(), Some(Epoch(1)));
        assert_eq!(Epoch(u32::MAX).checked_next(), None);
    }

    proptest! {
        #[test]
        fn pg_id_display_parse_roundtrip(pool: u32, seed: u32) {
            let pg = PgId::new(PoolId(pool), seed);
            prop_assert_eq!(pg.to_string().parse::<PgId>(), Ok(pg));
        }

        #[test]
        fn fsid_display_parse_roundtrip(bytes: [u8; 16]) {
            let fsid = Fsid(bytes);
            prop_assert_eq!(fsid.to_string().parse::<Fsid>(), Ok(fsid));
        }
    }
}
