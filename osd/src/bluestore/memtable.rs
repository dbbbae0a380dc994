//! The metadata rows committed batches changed that redb has not taken yet.
//!
//! A batch is durable once its WAL record is; its rows then wait here, in memory, and reads see them over
//! redb's. The commit thread *folds* them into redb, in one write transaction, only now and then: at a
//! checkpoint (durably), when they pass `bluestore_memtable_max_bytes`, and before fsck. So redb's B-tree
//! work (page copies, checksums, the commit) is paid once per fold for each row, not once per batch for
//! each row a batch touches: a hot row (the batch counter, a free-list group, a PG's usage, a busy object's
//! blob) is rewritten in memory, and redb sees it once.
//!
//! Rows are absolute values (as in the WAL), so a reader that sees a row both here and in redb (between a
//! fold's commit and the memtable being emptied) sees the same value twice.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::{ReadableTable, WriteTransaction};

use crate::store::StoreError;

use super::records::{TableId, WalOp};
use super::{Inner, BLOBS, FREELIST, META, OMAP, ONODES, PG_USAGE};

/// What a row costs in memory besides its key and value (the map's node share, the vectors' headers).
const ROW_OVERHEAD_BYTES: u64 = 64;

const TABLES: usize = 6;

/// Rows set (`Some`) or removed (`None`) since the last fold, per table.
#[derive(Debug, Default)]
pub(super) struct Memtable {
    tables: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; TABLES],
    bytes: u64,
}

fn cost(key: &[u8], value: &Option<Vec<u8>>) -> u64 {
    key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64) + ROW_OVERHEAD_BYTES
}

impl Memtable {
    /// Memory the rows take (approximately).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes a batch's row changes (its other ops, deferred writes and frees, are not rows).
    pub fn apply(&mut self, ops: Vec<WalOp>) {
        for op in ops {
            let (table, key, value) = match op {
                WalOp::Put { table, key, value } => (table, key, Some(value)),
                WalOp::Del { table, key } => (table, key, None),
                WalOp::Write(_) | WalOp::Free(_) => continue,
            };
            let key_len = key.len() as u64;
            self.bytes += cost(&key, &value);
            if let Some(old) = self.tables[table as usize].insert(key, value) {
                self.bytes -= key_len + old.map_or(0, |v| v.len() as u64) + ROW_OVERHEAD_BYTES;
            }
        }
    }

    pub fn clear(&mut self) {
        *self = Memtable::default();
    }

    /// The row's state here: `None` when the memtable does not know it (redb's stands), `Some(None)` when
    /// removed.
    pub fn get(&self, table: TableId, key: &[u8]) -> Option<Option<&[u8]>> {
        self.tables[table as usize].get(key).map(|v| v.as_deref())
    }

    /// The rows here within the bounds, in key order.
    pub fn range<'a>(
        &'a self,
        table: TableId,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        self.tables[table as usize].range::<[u8], _>((lo, hi)).map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// Every row, table by table.
    pub fn rows(&self) -> impl Iterator<Item = (TableId, &[u8], Option<&[u8]>)> {
        const IDS: [TableId; TABLES] = [
            TableId::Onodes,
            TableId::Blobs,
            TableId::Omap,
            TableId::Freelist,
            TableId::PgUsage,
            TableId::Meta,
        ];
        IDS.into_iter().flat_map(move |id| {
            self.tables[id as usize].iter().map(move |(k, v)| (id, k.as_slice(), v.as_deref()))
        })
    }
}

/// Sets or removes rows in a redb write transaction (a fold, and the WAL's replay at mount). An error is a
/// row that cannot be (a free-list key that is not 8 bytes, a meta key that is not UTF-8) or redb's.
pub(super) fn write_rows<'r>(
    tx: &WriteTransaction,
    rows: impl IntoIterator<Item = (TableId, &'r [u8], Option<&'r [u8]>)>,
) -> Result<(), String> {
    let e = |e: redb::Error| format!("metadata database: {e}");
    let mut bytes_tables = [
        tx.open_table(ONODES).map_err(|x| e(x.into()))?,
        tx.open_table(BLOBS).map_err(|x| e(x.into()))?,
        tx.open_table(OMAP).map_err(|x| e(x.into()))?,
        tx.open_table(PG_USAGE).map_err(|x| e(x.into()))?,
    ];
    let mut freelist = tx.open_table(FREELIST).map_err(|x| e(x.into()))?;
    let mut meta = tx.open_table(META).map_err(|x| e(x.into()))?;
    for (table, key, value) in rows {
        let r = match table {
            TableId::Freelist => {
                let k: [u8; 8] = key.try_into().map_err(|_| format!("a free-list key of {key:?}"))?;
                let k = u64::from_be_bytes(k);
                match value {
                    Some(v) => freelist.insert(k, v).map(drop),
                    None => freelist.remove(k).map(drop),
                }
            }
            TableId::Meta => {
                let k = std::str::from_utf8(key).map_err(|_| format!("a meta key of {key:?}"))?;
                match value {
                    Some(v) => meta.insert(k, v).map(drop),
                    None => meta.remove(k).map(drop),
                }
            }
            t => {
                let i = match t {
                    TableId::Onodes => 0,
                    TableId::Blobs => 1,
                    TableId::Omap => 2,
                    TableId::PgUsage => 3,
                    TableId::Freelist | TableId::Meta => unreachable!("handled above"),
                };
                match value {
                    Some(v) => bytes_tables[i].insert(key, v).map(drop),
                    None => bytes_tables[i].remove(key).map(drop),
                }
            }
        };
        r.map_err(|x| e(x.into()))?;
    }
    Ok(())
}

/// Visits the rows of `table` within the bounds as reads see them, the memtable's over redb's, in key order,
/// until `f` returns false.
pub(super) fn for_rows(
    mem: &Memtable,
    base: &impl ReadableTable<&'static [u8], &'static [u8]>,
    table: TableId,
    lo: Bound<&[u8]>,
    hi: Bound<&[u8]>,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut over = mem.range(table, lo, hi).peekable();
    let mut below = base.range::<&[u8]>((lo, hi)).map_err(Inner::db_err)?;
    let mut b = below.next().transpose().map_err(Inner::db_err)?;
    loop {
        let take_over = match (&b, over.peek()) {
            (None, None) => return Ok(()),
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((bk, _)), Some((ok, _))) => *ok <= bk.value(),
        };
        if take_over {
            let (k, v) = over.next().expect("peeked");
            if b.as_ref().is_some_and(|(bk, _)| bk.value() == k) {
                b = below.next().transpose().map_err(Inner::db_err)?;
            }
            if let Some(v) = v {
                if !f(k, v)? {
                    return Ok(());
                }
            }
        } else {
            let (k, v) = b.take().expect("checked");
            if !f(k.value(), v.value())? {
                return Ok(());
            }
            b = below.next().transpose().map_err(Inner::db_err)?;
        }
    }
}

/// The row `key` of `table` as reads see it, passed to `f`.
pub(super) fn get_row<T>(
    mem: &Memtable,
    base: &impl ReadableTable<&'static [u8], &'static [u8]>,
    table: TableId,
    key: &[u8],
    f: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>, StoreError> {
    match mem.get(table, key) {
        Some(v) => Ok(v.map(f)),
        None => Ok(base.get(key).map_err(Inner::db_err)?.map(|v| f(v.value()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_change_of_a_row_wins_and_the_bytes_follow() {
        let mut m = Memtable::default();
        let put =
            |k: &[u8], v: &[u8]| WalOp::Put { table: TableId::Blobs, key: k.to_vec(), value: v.to_vec() };
        m.apply(vec![put(b"a", b"1"), put(b"b", b"22"), put(b"a", b"333")]);
        assert_eq!(m.get(TableId::Blobs, b"a"), Some(Some(&b"333"[..])));
        assert_eq!(m.get(TableId::Onodes, b"a"), None, "tables are apart");
        assert_eq!(m.bytes(), (1 + 3 + ROW_OVERHEAD_BYTES) + (1 + 2 + ROW_OVERHEAD_BYTES));
        m.apply(vec![WalOp::Del { table: TableId::Blobs, key: b"b".to_vec() }]);
        assert_eq!(m.get(TableId::Blobs, b"b"), Some(None));
        assert_eq!(m.bytes(), (1 + 3 + ROW_OVERHEAD_BYTES) + (1 + ROW_OVERHEAD_BYTES));
        let all: Vec<_> = m.range(TableId::Blobs, Bound::Unbounded, Bound::Unbounded).collect();
        assert_eq!(all, vec![(&b"a"[..], Some(&b"333"[..])), (&b"b"[..], None)]);
        m.clear();
        assert!(m.rows().next().is_none());
        assert_eq!(m.bytes(), 0);
    }
}
