//! The write-ahead log (`wal` file): where a batch becomes durable. Each batch appends one record (its
//! metadata rows, its deferred writes' bytes, the units it freed) and the commit thread flushes the file once;
//! redb takes the same rows in a non-durable commit, and is made durable only at a checkpoint, after which
//! the log starts again at offset 0. Framing, per record: magic u32 | body length u32 | body (a
//! [`records::encode_wal_record`]) | zeros up to the next 4 KiB, so a record never shares a sector with the
//! one before it and a torn append cannot damage a record already acknowledged.
//!
//! Reading back (at mount): from offset 0, records whose body decodes and whose batch number is the next one
//! expected; the first that is not ends the log. That is sound because the record of the batch after a
//! checkpoint is always written at offset 0 and batch numbers only grow: anything else the file holds (records
//! of earlier laps, a torn append) has a smaller number or a bad checksum.

use std::io;
use std::sync::Arc;

use super::device::BlockDevice;
use super::records::{self, RecordError, WalOp};

/// The WAL file's name in a store's directory.
pub const WAL_FILE: &str = "wal";
const MAGIC: u32 = 0x4c57_5443; // "CTWL"
/// Records start at multiples of this.
pub const WAL_ALIGN: u64 = 4096;
/// A record body longer than this is damage (a batch is bounded by `bluestore_throttle_bytes`).
const BODY_BYTES_MAX: u64 = 1 << 31;

/// Batch `seq`'s record framed for the file: header, body (encoded in place), padding.
pub fn record(seq: u64, ops: &[WalOp]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    records::encode_wal_record_into(&mut v, seq, ops);
    let body_len = (v.len() - 8) as u32;
    v[4..8].copy_from_slice(&body_len.to_le_bytes());
    v.resize((v.len() as u64).next_multiple_of(WAL_ALIGN) as usize, 0);
    v
}

/// A record read back.
#[derive(Debug)]
pub struct Record {
    pub seq: u64,
    pub ops: Vec<WalOp>,
}

/// Reads the log from offset 0: the records of batches `first`, `first + 1`, ... until one is missing.
/// Device errors are errors; a record that does not decode ends the log.
pub fn read_log(dev: &Arc<dyn BlockDevice>, first: u64) -> io::Result<Vec<Record>> {
    let len = dev.len()?;
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut want = first;
    while at + 8 <= len {
        let mut head = [0u8; 8];
        dev.read_at(at, &mut head)?;
        let magic = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let body_len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as u64;
        if magic != MAGIC || body_len > BODY_BYTES_MAX || at + 8 + body_len > len {
            break;
        }
        let mut body = vec![0u8; body_len as usize];
        dev.read_at(at + 8, &mut body)?;
        match records::decode_wal_record(&body) {
            Ok((seq, ops)) if seq == want => out.push(Record { seq, ops }),
            Ok(_) | Err(RecordError::BadCrc { .. } | RecordError::Truncated { .. }) => break,
            Err(e) => {
                // A record with a good checksum and a bad field is not a torn append: it was written so.
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("WAL at {at}: {e}")));
            }
        }
        at += (8 + body_len).next_multiple_of(WAL_ALIGN);
        want += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::records::{DeferredWrite, TableId};
    use super::super::simdisk::SimDisk;
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_log_ends_at_the_first_missing_or_stale_record() {
        // Goal: reading back stops at a torn record, at a stale one of an earlier lap, and at the file's end,
        // and returns every record before. Method: frame records into a simulated file, damage, read.
        let disk = SimDisk::new(512);
        let dev = disk.device(WAL_FILE);
        let ops = |n: u8| {
            vec![
                WalOp::Put { table: TableId::Meta, key: b"batch".to_vec(), value: vec![n; 3] },
                WalOp::Write(DeferredWrite { offset: 4096 * n as u64, data: Bytes::from(vec![n; 4096]) }),
            ]
        };
        let mut at = 0;
        let mut ends = Vec::new();
        for seq in 10..14u64 {
            let f = record(seq, &ops(seq as u8));
            dev.write_at(at, &f).unwrap();
            at += f.len() as u64;
            ends.push(at);
        }
        assert_eq!(
            read_log(&dev, 10).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![10, 11, 12, 13]
        );
        assert_eq!(read_log(&dev, 10).unwrap()[2].ops, ops(12));
        // A new lap: batch 20 at offset 0 over 10; 11.. are stale.
        dev.write_at(0, &record(20, &ops(20))).unwrap();
        assert_eq!(read_log(&dev, 20).unwrap().len(), 1);
        assert!(read_log(&dev, 21).unwrap().is_empty());
        // A torn record 21 (one flipped byte in its body) ends the log after 20.
        let f21 = record(21, &ops(21));
        let mut torn = f21.clone();
        torn[100] ^= 1;
        dev.write_at(ends[0], &torn).unwrap();
        assert_eq!(read_log(&dev, 20).unwrap().len(), 1);
        dev.write_at(ends[0], &f21).unwrap();
        assert_eq!(read_log(&dev, 20).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), vec![20, 21]);
    }
}
