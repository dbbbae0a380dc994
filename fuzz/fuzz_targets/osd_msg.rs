//! Goal: no client op, op reply or admin command body makes an OSD or a client panic, and every op the OSD
//! executes yields a transaction its store applies.
//! Method: decode a front with `Message::decode`, as the OSD's and the Objecter's dispatchers do, as one of
//! the four OSD client message types (picked by the first input byte), with a data segment of the length the
//! second byte gives; the front is raw or an edited valid encoding ([`cuttle_fuzz::seeded`]). Whatever
//! decodes must re-encode to the same value. An `OsdOpRequest` is then executed against a store holding a
//! few objects (`osd::exec::execute`, as the PG does) and the resulting transaction applied; an `OsdOpReply`
//! has its data segment split among its outputs as the Objecter does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use messenger::crc::CrcBytes;
use messenger::Message;
use osd::exec::{execute, OpLimits};
use osd::store::{Eversion, ObjectStore};
use rados::msg::{
    types, OpOut, OsdCommand, OsdCommandReply, OsdError, OsdOp, OsdOpReply, OsdOpRequest, PgListRequest,
    ReqId,
};
use rados::{Epoch, PgId, PoolId};

use cuttle_fuzz::{enc, pattern, populated_store, seeded};

const TYPES: [u16; 4] = [types::OSD_OP, types::OSD_OP_REPLY, types::OSD_COMMAND, types::OSD_COMMAND_REPLY];

fn ops_requests() -> Vec<OsdOpRequest> {
    let pgid = PgId::new(PoolId(1), 0);
    let req = |oid: &str, ops: Vec<OsdOp>| OsdOpRequest {
        reqid: ReqId { client: 4100, nonce: 1, tid: 7 },
        pgid,
        oid: oid.into(),
        epoch: Epoch(3),
        ops,
    };
    vec![
        req("obj", vec![OsdOp::Read { offset: 0, len: 0 }, OsdOp::Stat]),
        req("obj", vec![OsdOp::AssertVersion { version: 5 }, OsdOp::Write { offset: 65_530, len: 12 }]),
        req(
            "new",
            vec![OsdOp::Create { exclusive: true }, OsdOp::WriteFull { len: 8 }, OsdOp::Append { len: 4 }],
        ),
        req("obj", vec![OsdOp::Zero { offset: 50, len: 70_000 }, OsdOp::Truncate { size: 60 }]),
        req("obj", vec![OsdOp::SetXattr { name: "x".into(), len: 3 }, OsdOp::GetXattr { name: "_".into() }]),
        req("obj", vec![OsdOp::ListXattrs, OsdOp::RmXattr { name: "_".into() }, OsdOp::Remove]),
        req(
            "obj",
            vec![
                OsdOp::OmapSet { keys: vec![("c".into(), b"3".to_vec())] },
                OsdOp::OmapGet { keys: vec!["a".into(), "c".into()] },
                OsdOp::OmapGetKeys { after: "a".into(), max: 10 },
                OsdOp::OmapRm { keys: vec!["b".into()] },
                OsdOp::Read { offset: 60_000, len: 20_000 },
            ],
        ),
    ]
}

fn seeds(kind: usize) -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<[Vec<Vec<u8>>; 4]> = OnceLock::new();
    let all = SEEDS.get_or_init(|| {
        let replies = [
            OsdOpReply { tid: 7, epoch: Epoch(3), result: Ok(()), version: 6, outs: vec![OpOut::None] },
            OsdOpReply {
                tid: 8,
                epoch: Epoch(3),
                result: Ok(()),
                version: 6,
                outs: vec![
                    OpOut::Data { len: 10 },
                    OpOut::Stat { size: 10, version: 6 },
                    OpOut::Keys(vec!["a".into()]),
                    OpOut::Pairs(vec![("a".into(), b"1".to_vec())]),
                    OpOut::Data { len: 5 },
                ],
            },
            OsdOpReply {
                tid: 9,
                epoch: Epoch(4),
                result: Err(OsdError::VersionMismatch { actual: 3 }),
                version: 3,
                outs: vec![],
            },
            OsdOpReply {
                tid: 9,
                epoch: Epoch(4),
                result: Err(OsdError::Misdirected(Epoch(5))),
                version: 0,
                outs: vec![],
            },
        ];
        let cmds = [
            OsdCommand::ListObjects { pgid: PgId::new(PoolId(1), 0) },
            OsdCommand::PgList(PgListRequest {
                pgid: PgId::new(PoolId(1), 1),
                epoch: Epoch(3),
                after: Some("a".into()),
                max: 100,
            }),
        ];
        let cmd_replies = [
            OsdCommandReply { result: Ok(vec!["a".into(), "b".into()]), next: Some("b".into()) },
            OsdCommandReply { result: Err(OsdError::NoSuchPool(PoolId(9))), next: None },
        ];
        [
            ops_requests().iter().map(enc).collect(),
            replies.iter().map(enc).collect(),
            cmds.iter().map(enc).collect(),
            cmd_replies.iter().map(enc).collect(),
        ]
    });
    &all[kind]
}

fn round_trip<T>(msg_type: u16, value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again: T = Message::encode(msg_type, value).decode().expect("a decoded body re-encodes");
    assert_eq!(&again, value);
}

fuzz_target!(|data: &[u8]| {
    let [control, data_len, rest @ ..] = data else { return };
    let kind = usize::from(*control) % TYPES.len();
    let msg = Message::new(TYPES[kind], seeded(rest, seeds(kind)).into())
        .with_data(pattern(usize::from(*data_len)));
    match TYPES[kind] {
        types::OSD_OP => {
            let Ok(req) = msg.decode::<OsdOpRequest>() else { return };
            round_trip(msg.msg_type, &req);
            let store = populated_store();
            // Small limits, so that the fuzzer reaches them.
            let limits =
                OpLimits { max_object_size: 1 << 20, max_write_size: 1 << 16, max_object_name_len: 64 };
            let version = Eversion { epoch: Epoch(3), v: 6 };
            let payload = CrcBytes::new(msg.data.clone());
            let Ok(ex) = execute(&store, req.pgid, &req.oid, &req.ops, &payload, &limits, version) else {
                return;
            };
            assert_eq!(ex.outs.len(), req.ops.len());
            let data_bytes: u64 = ex.data.iter().map(|d| d.len() as u64).sum();
            let out_bytes: u64 =
                ex.outs.iter().map(|o| if let OpOut::Data { len } = o { *len } else { 0 }).sum();
            assert_eq!(data_bytes, out_bytes, "the outputs account for every data byte");
            store.apply(&ex.txn).expect("an executed op's transaction applies");
            if ex.exists_after {
                let st = store.stat(req.pgid, &req.oid).expect("the object exists after");
                assert!(st.size <= limits.max_object_size);
                assert_eq!(store.read(req.pgid, &req.oid, 0, st.size).expect("reads").len() as u64, st.size);
            }
        }
        types::OSD_OP_REPLY => {
            let Ok(reply) = msg.decode::<OsdOpReply>() else { return };
            round_trip(msg.msg_type, &reply);
            let _ = rados::objecter::split_outs(reply.outs, msg.data.clone());
        }
        types::OSD_COMMAND => {
            let Ok(cmd) = msg.decode::<OsdCommand>() else { return };
            round_trip(msg.msg_type, &cmd);
        }
        _ => {
            let Ok(reply) = msg.decode::<OsdCommandReply>() else { return };
            round_trip(msg.msg_type, &reply);
        }
    }
});
