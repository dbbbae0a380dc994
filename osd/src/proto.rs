//! OSD-to-OSD messages for replication and peering (types 0x0300..0x031f; heartbeats use 0x0320..).
//!
//! Every message names its PG and the epoch of the interval it belongs to (`epoch`: the map epoch at which
//! the PG's acting set last changed, as seen by the primary). A receiver whose map is older than that epoch
//! waits for the newer map first; a receiver in a later interval drops it. Peering messages also carry the
//! primary's peering `round`, so answers to an abandoned round in the same interval are recognised.
//!
//! Bulk bytes (a replicated transaction's payload, an object's data during recovery) travel in the message's
//! data segment, never through serde.

use messenger::crc::CrcBytes;
use messenger::Message;
use serde::{Deserialize, Serialize};

use rados::ids::{Epoch, PgId};
use rados::msg::{OpOut, ReqId};

use crate::store::{Eversion, TxOp};

pub mod types {
    /// Primary to replica: apply this transaction ([`super::RepOp`]; payload in the data segment).
    pub const REP_OP: u16 = 0x0300;
    /// Replica to primary: applied ([`super::RepOpReply`]).
    pub const REP_OP_REPLY: u16 = 0x0301;
    /// Primary to peer: describe your copy of the PG ([`super::PgQuery`]).
    pub const PG_QUERY: u16 = 0x0302;
    /// Peer to primary: one page of its PG summary ([`super::PgInfo`]).
    pub const PG_INFO: u16 = 0x0303;
    /// Primary to the authoritative peer: send me this object ([`super::PgPull`]).
    pub const PG_PULL: u16 = 0x0304;
    /// Authoritative peer to primary: the object ([`super::PgPush`]; data in the data segment).
    pub const PG_PULL_REPLY: u16 = 0x0305;
    /// Primary to replica: replace your copy with this one ([`super::PgPush`]).
    pub const PG_PUSH: u16 = 0x0306;
    /// Replica to primary: replaced ([`super::PgPushReply`]).
    pub const PG_PUSH_REPLY: u16 = 0x0307;
    /// Primary to replica: peering is done, take the PG metadata and accept writes ([`super::PgActivate`]).
    pub const PG_ACTIVATE: u16 = 0x0308;
    /// Replica to primary: your message belongs to an interval I consider over ([`super::PgNewInterval`]).
    pub const PG_NEW_INTERVAL: u16 = 0x0309;
    /// The lowest and highest type of this module.
    pub const FIRST: u16 = REP_OP;
    pub const LAST: u16 = 0x031f;
}

/// A remembered reply to a completed write, for answering a resent request without applying it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DupEntry {
    pub reqid: ReqId,
    /// The object version the write produced (what the client was told).
    pub version: u64,
    /// The op outputs; read outputs inside a write request are kept as empty data.
    pub outs: Vec<OpOut>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepOp {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub version: Eversion,
    pub reqid: ReqId,
    /// The transaction's ops; its payload is the message's data segment.
    pub ops: Vec<TxOp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepOpReply {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub version: Eversion,
    /// `Err` when the replica could not apply it (its copy diverged): the primary peers again.
    pub result: Result<(), String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgQuery {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    /// Objects after this name (paging); `None` for the first page, which also carries the metadata.
    pub after: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgInfo {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    /// The version of the last write this peer applied to the PG.
    pub last_update: Eversion,
    /// First page only: the peer's remembered replies.
    pub dups: Vec<DupEntry>,
    /// Objects and their versions, in the store's listing order ([`crate::store::ListKey`]).
    pub objects: Vec<(String, Eversion)>,
    /// Where the next page starts, if there is one.
    pub next: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgPull {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    pub name: String,
}

/// A whole object, without its data (which is the message's data segment).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectCopy {
    pub version: Eversion,
    pub size: u64,
    pub attrs: Vec<(String, Vec<u8>)>,
    pub omap: Vec<(String, Vec<u8>)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgPush {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    pub name: String,
    /// `None`: the object does not exist (the receiver removes its copy).
    pub copy: Option<ObjectCopy>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgPushReply {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgActivate {
    pub pgid: PgId,
    pub epoch: Epoch,
    pub round: u32,
    pub last_update: Eversion,
    pub dups: Vec<DupEntry>,
}

/// A replica saw the PG's interval change (say, its own down and up epochs) where the primary, whose MonClient
/// handed it only the newest of several maps, saw none; the primary peers again from `epoch`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgNewInterval {
    pub pgid: PgId,
    /// The epoch at which the replica's current interval began.
    pub epoch: Epoch,
}

/// Any replication or peering message, decoded, with its data segment where it has one.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerMsg {
    RepOp(RepOp, CrcBytes),
    RepOpReply(RepOpReply),
    Query(PgQuery),
    Info(PgInfo),
    Pull(PgPull),
    PullReply(PgPush, CrcBytes),
    Push(PgPush, CrcBytes),
    PushReply(PgPushReply),
    Activate(PgActivate),
    NewInterval(PgNewInterval),
}

#[derive(Debug, thiserror::Error)]
pub enum PeerMsgError {
    #[error("message type {0:#06x} is not a peer message")]
    UnknownType(u16),
    #[error(transparent)]
    Decode(#[from] messenger::message::DecodeError),
    #[error("message type {0:#06x} carries {1} data bytes it should not have")]
    UnexpectedData(u16, usize),
}

impl PeerMsg {
    pub fn pgid(&self) -> PgId {
        match self {
            PeerMsg::RepOp(m, _) => m.pgid,
            PeerMsg::RepOpReply(m) => m.pgid,
            PeerMsg::Query(m) => m.pgid,
            PeerMsg::Info(m) => m.pgid,
            PeerMsg::Pull(m) => m.pgid,
            PeerMsg::PullReply(m, _) | PeerMsg::Push(m, _) => m.pgid,
            PeerMsg::PushReply(m) => m.pgid,
            PeerMsg::Activate(m) => m.pgid,
            PeerMsg::NewInterval(m) => m.pgid,
        }
    }

    /// The interval the message belongs to.
    pub fn epoch(&self) -> Epoch {
        match self {
            PeerMsg::RepOp(m, _) => m.epoch,
            PeerMsg::RepOpReply(m) => m.epoch,
            PeerMsg::Query(m) => m.epoch,
            PeerMsg::Info(m) => m.epoch,
            PeerMsg::Pull(m) => m.epoch,
            PeerMsg::PullReply(m, _) | PeerMsg::Push(m, _) => m.epoch,
            PeerMsg::PushReply(m) => m.epoch,
            PeerMsg::Activate(m) => m.epoch,
            PeerMsg::NewInterval(m) => m.epoch,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::RepOp(..) => "rep_op",
            PeerMsg::RepOpReply(_) => "rep_op_reply",
            PeerMsg::Query(_) => "pg_query",
            PeerMsg::Info(_) => "pg_info",
            PeerMsg::Pull(_) => "pg_pull",
            PeerMsg::PullReply(..) => "pg_pull_reply",
            PeerMsg::Push(..) => "pg_push",
            PeerMsg::PushReply(_) => "pg_push_reply",
            PeerMsg::Activate(_) => "pg_activate",
            PeerMsg::NewInterval(_) => "pg_new_interval",
        }
    }

    pub fn encode(&self) -> Message {
        use types::*;
        match self {
            PeerMsg::RepOp(m, d) => Message::encode(REP_OP, m).with_crc_data(d.clone()),
            PeerMsg::RepOpReply(m) => Message::encode(REP_OP_REPLY, m),
            PeerMsg::Query(m) => Message::encode(PG_QUERY, m),
            PeerMsg::Info(m) => Message::encode(PG_INFO, m),
            PeerMsg::Pull(m) => Message::encode(PG_PULL, m),
            PeerMsg::PullReply(m, d) => Message::encode(PG_PULL_REPLY, m).with_crc_data(d.clone()),
            PeerMsg::Push(m, d) => Message::encode(PG_PUSH, m).with_crc_data(d.clone()),
            PeerMsg::PushReply(m) => Message::encode(PG_PUSH_REPLY, m),
            PeerMsg::Activate(m) => Message::encode(PG_ACTIVATE, m),
            PeerMsg::NewInterval(m) => Message::encode(PG_NEW_INTERVAL, m),
        }
    }

    pub fn decode(msg: &Message) -> Result<PeerMsg, PeerMsgError> {
        use types::*;
        let no_data = |m: PeerMsg| {
            if msg.data.is_empty() {
                Ok(m)
            } else {
                Err(PeerMsgError::UnexpectedData(msg.msg_type, msg.data.len()))
            }
        };
        match msg.msg_type {
            REP_OP => Ok(PeerMsg::RepOp(msg.decode()?, msg.crc_data())),
            REP_OP_REPLY => no_data(PeerMsg::RepOpReply(msg.decode()?)),
            PG_QUERY => no_data(PeerMsg::Query(msg.decode()?)),
            PG_INFO => no_data(PeerMsg::Info(msg.decode()?)),
            PG_PULL => no_data(PeerMsg::Pull(msg.decode()?)),
            PG_PULL_REPLY => Ok(PeerMsg::PullReply(msg.decode()?, msg.crc_data())),
            PG_PUSH => Ok(PeerMsg::Push(msg.decode()?, msg.crc_data())),
            PG_PUSH_REPLY => no_data(PeerMsg::PushReply(msg.decode()?)),
            PG_ACTIVATE => no_data(PeerMsg::Activate(msg.decode()?)),
            PG_NEW_INTERVAL => no_data(PeerMsg::NewInterval(msg.decode()?)),
            other => Err(PeerMsgError::UnknownType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use rados::ids::PoolId;

    use crate::store::ObjectId;

    #[test]
    fn peer_messages_round_trip_and_garbage_is_refused() {
        // Goal: every peer message survives encode/decode; junk gives a typed error. Method: round trips of
        // one of each, then truncated bodies and unknown types.
        let pgid = PgId::new(PoolId(2), 5);
        let e = Epoch(9);
        let ver = Eversion { epoch: e, v: 4 };
        let reqid = ReqId { client: 1, nonce: 2, tid: 3 };
        let copy =
            ObjectCopy { version: ver, size: 3, attrs: vec![("a".into(), b"v".to_vec())], omap: vec![] };
        let all = vec![
            PeerMsg::RepOp(
                RepOp {
                    pgid,
                    epoch: e,
                    version: ver,
                    reqid,
                    ops: vec![TxOp::Write { oid: ObjectId::new(pgid, "o"), offset: 0, len: 3 }],
                },
                Bytes::from_static(b"abc").into(),
            ),
            PeerMsg::RepOpReply(RepOpReply { pgid, epoch: e, version: ver, result: Err("x".into()) }),
            PeerMsg::Query(PgQuery { pgid, epoch: e, round: 1, after: Some("k".into()) }),
            PeerMsg::Info(PgInfo {
                pgid,
                epoch: e,
                round: 1,
                last_update: ver,
                dups: vec![DupEntry { reqid, version: 4, outs: vec![OpOut::None] }],
                objects: vec![("o".into(), ver)],
                next: None,
            }),
            PeerMsg::Pull(PgPull { pgid, epoch: e, round: 1, name: "o".into() }),
            PeerMsg::PullReply(
                PgPush { pgid, epoch: e, round: 1, name: "o".into(), copy: Some(copy.clone()) },
                Bytes::from_static(b"abc").into(),
            ),
            PeerMsg::Push(
                PgPush { pgid, epoch: e, round: 1, name: "o".into(), copy: None },
                CrcBytes::default(),
            ),
            PeerMsg::PushReply(PgPushReply { pgid, epoch: e, round: 1, name: "o".into() }),
            PeerMsg::Activate(PgActivate { pgid, epoch: e, round: 1, last_update: ver, dups: vec![] }),
            PeerMsg::NewInterval(PgNewInterval { pgid, epoch: e }),
        ];
        for m in all {
            let wire = m.encode();
            assert_eq!(PeerMsg::decode(&wire).unwrap(), m);
            assert_eq!(m.pgid(), pgid);
            assert_eq!(m.epoch(), e);
            let mut cut = Message::new(wire.msg_type, wire.front.slice(..wire.front.len() / 2));
            cut.data = wire.data.clone();
            assert!(PeerMsg::decode(&cut).is_err(), "{} cut in half", m.kind());
        }
        assert!(matches!(
            PeerMsg::decode(&Message::new(0x0399, Bytes::new())),
            Err(PeerMsgError::UnknownType(0x0399))
        ));
        let q = PeerMsg::Query(PgQuery { pgid, epoch: e, round: 1, after: None }).encode();
        assert!(matches!(
            PeerMsg::decode(&q.with_data(Bytes::from_static(b"x"))),
            Err(PeerMsgError::UnexpectedData(..))
        ));
    }
}
