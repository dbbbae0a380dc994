//! Goal: no message body makes the monitor or a MonClient panic, and nothing a request makes the monitor
//! commit fails to encode (the monitor stops when it cannot persist a commit).
//! Method: decode a front, with `Message::decode` as `mon::service` and `rados::monclient` do, as one of the
//! four monitor message types (the first input byte picks it); the rest is raw or an edited valid encoding
//! ([`cuttle_fuzz::seeded`]). Whatever decodes must re-encode to the same value. A `MonRequest` then goes to
//! the monitor's state machine on a small cluster (with the service's subscription and tick), and every
//! effect must encode; a `MapUpdate` moves a client's map as `MonClient` does, and the map it moves to must
//! encode and place every PG.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use messenger::Message;
use mon::{Effect, MonOptions, MonState};
use rados::map::OsdMap;
use rados::msg::{
    types, LogEntry, LogLevel, MapUpdate, MonCommand, MonError, MonReply, MonRequest, PgStat, PingTime,
};
use rados::{Epoch, OsdId, PgId, PoolId};

use cuttle_fuzz::{addrs, enc, place_all, seeded, small_cluster};

const TYPES: [u16; 4] = [types::MON_REQUEST, types::MON_REPLY, types::MON_MAP, types::MON_LOG];

fn requests() -> Vec<MonRequest> {
    let pool_create =
        MonCommand::PoolCreate { name: "new".into(), size: Some(2), min_size: None, pg_num: Some(16) };
    let cmds = [
        MonCommand::Status,
        MonCommand::Health,
        MonCommand::HealthDetail,
        MonCommand::Versions,
        MonCommand::OsdTree,
        MonCommand::OsdDump,
        MonCommand::OsdDf,
        MonCommand::Df,
        MonCommand::OsdOut(OsdId(1)),
        MonCommand::OsdIn(OsdId(1)),
        MonCommand::OsdDown(OsdId(0)),
        pool_create,
        MonCommand::PoolLs,
        MonCommand::PoolRm { name: "p2".into(), confirm: true },
        MonCommand::OsdPingTimes,
        MonCommand::Log { n: 10 },
    ];
    let mut v = vec![
        MonRequest::Subscribe { have: Some(Epoch(1)), log: true },
        MonRequest::Subscribe { have: None, log: false },
        MonRequest::OsdNew { uuid: [9; 16], host: "host9".into() },
        MonRequest::OsdNew { uuid: [3; 16], host: "host1".into() },
        MonRequest::OsdBoot { osd: OsdId(2), uuid: [3; 16], addrs: addrs(2), host: "host0".into() },
        MonRequest::OsdFailure { reporter: OsdId(0), target: OsdId(1), failed_for_ms: 30_000, alive: false },
        MonRequest::OsdMarkMeDown { osd: OsdId(1) },
        MonRequest::OsdReport {
            osd: OsdId(0),
            epoch: Epoch(3),
            pgs: vec![PgStat {
                pgid: PgId::new(PoolId(1), 2),
                acting_up: 2,
                size: 2,
                min_size: 1,
                objects: 5,
                bytes: 4096,
            }],
            ping_times: vec![PingTime { peer: OsdId(1), front_us: Some(120), back_us: None }],
            statfs: rados::msg::OsdStatfs {
                total: 1 << 30,
                available: 1 << 29,
                allocated: 1 << 29,
                data_stored: 1 << 29,
                omap: 4096,
                meta: 1 << 20,
            },
            io: rados::msg::OsdIoStats { read_ops: 3, read_bytes: 4096, write_ops: 2, write_bytes: 8192 },
            version: rados::msg::daemon_version(),
        },
    ];
    v.extend(cmds.into_iter().map(MonRequest::Command));
    v
}

fn seeds(kind: usize) -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<[Vec<Vec<u8>>; 4]> = OnceLock::new();
    let all = SEEDS.get_or_init(|| {
        let (map, incs) = small_cluster();
        let replies = [
            MonReply::Ok,
            MonReply::OsdId(OsdId(3)),
            MonReply::Json("{\"health\":\"HEALTH_OK\"}".into()),
            MonReply::Error(MonError::NoSuchPool("x".into())),
            MonReply::Error(MonError::WrongFsid),
        ];
        let updates = [
            MapUpdate { full: Some(map.clone()), incrementals: Vec::new() },
            MapUpdate { full: None, incrementals: incs.clone() },
            MapUpdate { full: None, incrementals: incs[1..].to_vec() },
        ];
        let log = [
            LogEntry { seq: 1, stamp_ms: 1_000, level: LogLevel::Info, message: "osd.0 boot".into() },
            LogEntry { seq: u64::MAX, stamp_ms: 0, level: LogLevel::Error, message: String::new() },
        ];
        [
            requests().iter().map(enc).collect(),
            replies.iter().map(enc).collect(),
            updates.iter().map(enc).collect(),
            log.iter().map(enc).collect(),
        ]
    });
    &all[kind]
}

/// A monitor with the small cluster's OSDs registered and booted and its pools created, through requests.
fn monitor(now_ms: u64) -> MonState {
    let cfg = rados::config::Config { fsid: cuttle_fuzz::FSID.to_string(), ..Default::default() };
    let opts = MonOptions::from_config(&cfg).expect("valid options");
    let (mut s, _) = MonState::create(opts, now_ms);
    let setup = [
        MonRequest::OsdNew { uuid: [1; 16], host: "host0".into() },
        MonRequest::OsdNew { uuid: [2; 16], host: "host1".into() },
        MonRequest::OsdNew { uuid: [3; 16], host: "host0".into() },
        MonRequest::OsdBoot { osd: OsdId(0), uuid: [1; 16], addrs: addrs(0), host: "host0".into() },
        MonRequest::OsdBoot { osd: OsdId(1), uuid: [2; 16], addrs: addrs(1), host: "host1".into() },
        MonRequest::Command(MonCommand::PoolCreate {
            name: "rbd".into(),
            size: Some(2),
            min_size: None,
            pg_num: Some(8),
        }),
        MonRequest::Command(MonCommand::PoolCreate {
            name: "p2".into(),
            size: Some(3),
            min_size: None,
            pg_num: Some(3),
        }),
    ];
    for req in setup {
        let (reply, _) = s.handle(now_ms, None, req);
        assert!(!matches!(reply, MonReply::Error(_)), "setup request refused: {reply:?}");
    }
    s
}

/// What the service does before publishing effects: persist them, which encodes each commit and the map.
fn check_effects(s: &MonState, effects: &[Effect]) {
    for e in effects {
        match e {
            Effect::Commit(inc) => {
                inc.encode().expect("a committed incremental encodes");
            }
            Effect::Log(entry) => {
                postcard::to_stdvec(entry).expect("a log entry encodes");
            }
            Effect::Register { .. } => {}
        }
    }
    s.map().encode().expect("the monitor's map encodes");
}

fn round_trip<T>(msg_type: u16, value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let again: T = Message::encode(msg_type, value).decode().expect("a decoded body re-encodes");
    assert_eq!(&again, value);
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let kind = usize::from(control) % TYPES.len();
    let msg = Message::new(TYPES[kind], Bytes::from(seeded(rest, seeds(kind))));
    let now_ms = 100_000;
    match TYPES[kind] {
        types::MON_REQUEST => {
            let Ok(req) = msg.decode::<MonRequest>() else { return };
            round_trip(msg.msg_type, &req);
            let mut s = monitor(now_ms);
            // As the service: the sender's OSD id when its messenger calls itself osd.N.
            let from_osd = match (control >> 2) % 4 {
                3 => None,
                n => Some(OsdId(u32::from(n))),
            };
            if let MonRequest::Subscribe { have, .. } = req {
                if let Some(u) = s.map_update_since(have) {
                    // Incrementals need the subscriber's map; a full map stands alone.
                    if u.full.is_some() {
                        let m = u.newer_map(None).expect("a full map applies").expect("a map");
                        assert_eq!(&m, s.map());
                    }
                }
                return;
            }
            let (_reply, effects) = s.handle(now_ms, from_osd, req);
            check_effects(&s, &effects);
            let effects = s.tick(now_ms + 3_600_000);
            check_effects(&s, &effects);
            let _ = s.health(now_ms + 3_600_000);
            place_all(s.map());
        }
        types::MON_REPLY => {
            let Ok(reply) = msg.decode::<MonReply>() else { return };
            round_trip(msg.msg_type, &reply);
        }
        types::MON_MAP => {
            let Ok(update) = msg.decode::<MapUpdate>() else { return };
            round_trip(msg.msg_type, &update);
            // A client that has the first epoch of the small cluster, or none.
            let (_, incs) = small_cluster();
            let mut cur = OsdMap::new(cuttle_fuzz::FSID);
            cur.apply(&incs[0]).expect("the first epoch applies");
            let cur = (control & 4 != 0).then_some(cur);
            if let Ok(Some(next)) = update.newer_map(cur.as_ref()) {
                next.encode().expect("a map a client moves to is valid");
                place_all(&next);
            }
        }
        _ => {
            let Ok(entry) = msg.decode::<LogEntry>() else { return };
            round_trip(msg.msg_type, &entry);
        }
    }
});
