//! Goal: no replication or peering message from another OSD makes an OSD panic.
//! Method: decode a message with `PeerMsg::decode`, as the OSD's cluster dispatcher does, as one of the ten
//! peer message types (picked by the first input byte) with a data segment of a length the input gives; the
//! front is raw or an edited valid encoding ([`cuttle_fuzz::seeded`]). What decodes must re-encode to the
//! same message. Then what a PG does with it, on a store holding a few objects: a `RepOp`'s transaction is
//! rebuilt with `Transaction::from_wire`, checked to stay in its PG and applied; a pushed or pulled object
//! copy becomes a transaction with `copy_txn` and is applied; an activation's metadata is written with
//! `meta_replace_txn`; and the PG's metadata is read back with `load_meta`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use messenger::crc::CrcBytes;
use messenger::Message;
use osd::pg::{copy_txn, load_meta, meta_replace_txn, op_in_pg};
use osd::proto::{
    DupEntry, ObjectCopy, PeerMsg, PgActivate, PgInfo, PgNewInterval, PgPull, PgPush, PgPushReply, PgQuery,
    RepOp, RepOpReply,
};
use osd::store::{Eversion, ObjectId, ObjectStore, Transaction};
use rados::msg::{OpOut, ReqId};
use rados::{Epoch, PgId, PoolId};

use cuttle_fuzz::{pattern, populated_store, seeded, snapshot};

fn messages() -> Vec<PeerMsg> {
    let pgid = PgId::new(PoolId(1), 0);
    let e = Epoch(3);
    let ver = Eversion { epoch: e, v: 6 };
    let reqid = ReqId { client: 4100, nonce: 1, tid: 7 };
    let dup = DupEntry { reqid, version: 6, outs: vec![OpOut::None, OpOut::Data { len: 0 }] };
    let copy = ObjectCopy {
        version: ver,
        size: 16,
        attrs: vec![("_".into(), b"attr".to_vec())],
        omap: vec![("k".into(), b"v".to_vec())],
    };
    let mut t = Transaction::new();
    t.write(ObjectId::new(pgid, "obj"), 10, pattern(16));
    t.set_version(ObjectId::new(pgid, "obj"), ver);
    let (ops, payload) = t.to_wire();
    vec![
        PeerMsg::RepOp(RepOp { pgid, epoch: e, version: ver, reqid, ops }, payload),
        PeerMsg::RepOpReply(RepOpReply { pgid, epoch: e, version: ver, result: Err("diverged".into()) }),
        PeerMsg::Query(PgQuery { pgid, epoch: e, round: 1, after: Some("a".into()) }),
        PeerMsg::Info(PgInfo {
            pgid,
            epoch: e,
            round: 1,
            last_update: ver,
            dups: vec![dup.clone()],
            objects: vec![("obj".into(), ver)],
            next: Some("obj".into()),
        }),
        PeerMsg::Pull(PgPull { pgid, epoch: e, round: 1, name: "obj".into() }),
        PeerMsg::PullReply(
            PgPush { pgid, epoch: e, round: 1, name: "obj".into(), copy: Some(copy.clone()) },
            pattern(16).into(),
        ),
        PeerMsg::Push(
            PgPush { pgid, epoch: e, round: 1, name: "obj".into(), copy: None },
            CrcBytes::default(),
        ),
        PeerMsg::PushReply(PgPushReply { pgid, epoch: e, round: 1, name: "obj".into() }),
        PeerMsg::Activate(PgActivate { pgid, epoch: e, round: 1, last_update: ver, dups: vec![dup] }),
        PeerMsg::NewInterval(PgNewInterval { pgid, epoch: e }),
    ]
}

/// Per message type (in `messages` order), the fronts of its seeds.
fn seeds() -> &'static [(u16, Vec<Vec<u8>>)] {
    static SEEDS: OnceLock<Vec<(u16, Vec<Vec<u8>>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        messages()
            .iter()
            .map(|m| {
                let wire = m.encode();
                (wire.msg_type, vec![wire.front.to_vec()])
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    // [control, data length, ...front]: control picks the type (an unknown one past the ten), bit 7 a data
    // segment with known block crcs (as received) and 512 times as long.
    let [control, len, rest @ ..] = data else { return };
    let kind = usize::from(control & 0x7f) % 11;
    let (msg_type, front) = match seeds().get(kind) {
        Some((t, s)) => (*t, seeded(rest, s)),
        None => (0x0300 + u16::from(*control), rest.to_vec()),
    };
    let data = match control & 0x80 {
        0 => CrcBytes::new(pattern(usize::from(*len))),
        _ => CrcBytes::computed(pattern(usize::from(*len) * 512)),
    };
    let msg = Message::new(msg_type, front.into()).with_crc_data(data);
    let Ok(peer) = PeerMsg::decode(&msg) else { return };
    assert_eq!(PeerMsg::decode(&peer.encode()).expect("a decoded message re-encodes"), peer);
    let store = populated_store();
    let pgid = peer.pgid();
    let applied = match peer {
        PeerMsg::RepOp(m, data) => Transaction::from_wire(m.ops, data)
            .ok()
            .filter(|t| t.ops().iter().all(|op| op_in_pg(op, pgid)))
            .map(|t| store.apply(&t)),
        PeerMsg::PullReply(m, data) | PeerMsg::Push(m, data) => {
            let exists = store.stat(pgid, &m.name).is_ok();
            copy_txn(pgid, &m.name, exists, m.copy.as_ref(), data).ok().map(|t| store.apply(&t))
        }
        PeerMsg::Activate(m) => Some(store.apply(&meta_replace_txn(pgid, m.last_update, &m.dups))),
        _ => None,
    };
    if applied.is_some() {
        snapshot(&store);
        let _ = load_meta(&store, pgid);
    }
});
