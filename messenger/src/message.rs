//! Messages: a type, a priority, a small postcard-encoded front and a raw data segment.

use std::fmt;

use bytes::{Buf, BufMut, Bytes};
use serde::{de::DeserializeOwned, Serialize};

use crate::crc::CrcBytes;
use crate::frame::MSG_HEADER_BYTES;
use crate::throttle::ThrottleGrant;

/// Priorities as Ceph's CEPH_MSG_PRIO_*: higher is dispatched first by the queued dispatcher.
pub const PRIO_LOW: u8 = 64;
pub const PRIO_DEFAULT: u8 = 127;
pub const PRIO_HIGH: u8 = 196;

/// One message. `front` holds the encoded body (postcard); `data` holds bulk bytes that never pass through
/// serde and are not copied on the way through the messenger.
pub struct Message {
    pub msg_type: u16,
    pub priority: u8,
    /// Request id chosen by the sender's upper layer; the messenger only carries it.
    pub tid: u64,
    pub front: Bytes,
    /// The data segment as received, or its first part when sent from parts ([`Message::with_data_parts`]).
    pub data: Bytes,
    /// The crcs of `data`'s blocks ([`crate::crc`]) when known: computed by the receiver while verifying the
    /// frame, or given by the sender so that it need not read the bytes again. Empty when unknown.
    pub(crate) data_crcs: Vec<u32>,
    /// Further parts of the data segment, sent right after `data` without being copied together (a read
    /// answered from several stored buffers). The receiver gets them as one contiguous `data`; always empty
    /// on received messages.
    pub(crate) data_more: Vec<CrcBytes>,
    /// Session sequence number: assigned when first sent, kept across resends, set on receipt.
    pub seq: u64,
    /// Receive-side throttle budget held while the upper layer owns the message; returned on drop.
    pub(crate) grant: Option<ThrottleGrant>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot decode message type {msg_type} body: {source}")]
pub struct DecodeError {
    pub msg_type: u16,
    #[source]
    pub source: postcard::Error,
}

impl Message {
    pub fn new(msg_type: u16, front: Bytes) -> Message {
        Message {
            msg_type,
            priority: PRIO_DEFAULT,
            tid: 0,
            front,
            data: Bytes::new(),
            data_crcs: Vec::new(),
            data_more: Vec::new(),
            seq: 0,
            grant: None,
        }
    }

    /// A message whose front is `body` encoded with postcard.
    pub fn encode<T: Serialize>(msg_type: u16, body: &T) -> Message {
        let front = postcard::to_stdvec(body).expect("in-memory encoding of a serde value cannot fail");
        Message::new(msg_type, Bytes::from(front))
    }

    pub fn with_data(self, data: Bytes) -> Message {
        self.with_crc_data(CrcBytes::new(data))
    }

    /// The data segment with the crcs of its blocks where known: sending it combines them instead of
    /// computing the segment's crc from the bytes.
    pub fn with_crc_data(mut self, data: CrcBytes) -> Message {
        (self.data, self.data_crcs) = data.into_parts();
        self.data_more = Vec::new();
        self
    }

    /// The data segment as a sequence of buffers, written out back to back without copying them together.
    pub fn with_data_parts(self, parts: Vec<CrcBytes>) -> Message {
        let mut parts = parts.into_iter().filter(|p| !p.is_empty());
        let mut m = self.with_crc_data(parts.next().unwrap_or_default());
        m.data_more = parts.collect();
        m
    }

    /// The (received) data segment with the crcs of its blocks, when the receiver computed them.
    pub fn crc_data(&self) -> CrcBytes {
        match self.data_crcs.is_empty() {
            true => CrcBytes::new(self.data.clone()),
            false => CrcBytes::with_block_crcs(self.data.clone(), self.data_crcs.clone()),
        }
    }

    /// Every part of the data segment in order (one part for a received message), each with its block crcs
    /// (empty when unknown).
    pub(crate) fn data_parts(&self) -> impl Iterator<Item = (&Bytes, &[u32])> + Clone {
        std::iter::once((&self.data, &self.data_crcs[..]))
            .chain(self.data_more.iter().map(|p| (p.bytes(), p.raw_crcs())))
    }

    /// Length of the data segment, over all its parts.
    pub fn data_len(&self) -> usize {
        self.data.len() + self.data_more.iter().map(|p| p.len()).sum::<usize>()
    }

    pub fn with_tid(mut self, tid: u64) -> Message {
        self.tid = tid;
        self
    }

    pub fn with_priority(mut self, priority: u8) -> Message {
        self.priority = priority;
        self
    }

    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        postcard::from_bytes(&self.front).map_err(|source| DecodeError { msg_type: self.msg_type, source })
    }

    /// Front plus data: what throttles charge.
    pub fn payload_bytes(&self) -> usize {
        self.front.len() + self.data_len()
    }

    pub(crate) fn encode_header(&self, ack_seq: u64) -> [u8; MSG_HEADER_BYTES] {
        let mut h = [0u8; MSG_HEADER_BYTES];
        let mut w = &mut h[..];
        w.put_u16_le(self.msg_type);
        w.put_u8(self.priority);
        w.put_u8(0);
        w.put_u32_le(0);
        w.put_u64_le(self.seq);
        w.put_u64_le(ack_seq);
        w.put_u64_le(self.tid);
        h
    }
}

/// The decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MsgHeader {
    pub msg_type: u16,
    pub priority: u8,
    pub seq: u64,
    pub ack_seq: u64,
    pub tid: u64,
}

impl MsgHeader {
    pub fn decode(mut b: &[u8]) -> Option<MsgHeader> {
        if b.len() != MSG_HEADER_BYTES {
            return None;
        }
        let msg_type = b.get_u16_le();
        let priority = b.get_u8();
        let flags = b.get_u8();
        let reserved = b.get_u32_le();
        if flags != 0 || reserved != 0 {
            return None;
        }
        Some(MsgHeader {
            msg_type,
            priority,
            seq: b.get_u64_le(),
            ack_seq: b.get_u64_le(),
            tid: b.get_u64_le(),
        })
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.msg_type)
            .field("prio", &self.priority)
            .field("tid", &self.tid)
            .field("seq", &self.seq)
            .field("front_bytes", &self.front.len())
            .field("data_bytes", &self.data_len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut m = Message::new(42, Bytes::from_static(b"x")).with_tid(7).with_priority(PRIO_HIGH);
        m.seq = 99;
        let h = MsgHeader::decode(&m.encode_header(12)).unwrap();
        assert_eq!(h, MsgHeader { msg_type: 42, priority: PRIO_HIGH, seq: 99, ack_seq: 12, tid: 7 });
    }

    #[test]
    fn bodies_round_trip_through_postcard() {
        let m = Message::encode(1, &("hello".to_string(), 5u32));
        let (s, n): (String, u32) = m.decode().unwrap();
        assert_eq!((s.as_str(), n), ("hello", 5));
        assert!(Message::new(1, Bytes::from_static(&[0xff])).decode::<String>().is_err());
    }
}
