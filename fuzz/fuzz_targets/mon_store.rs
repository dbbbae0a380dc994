//! Goal: whatever the monitor's redb tables hold, the monitor restarting from them refuses it with an
//! error or restarts from a consistent state; it never panics.
//! Method: build the store's records (`mon::store::Records`: the meta values, the incrementals, the uuid
//! registry and the log rows) from the input, decode them with `Records::decode` as `Store::open` does,
//! and restore the monitor's state from them with `MonState::restore` as the service does; then answer the
//! read-only commands and a subscription and run a tick, whose effects must encode. The input is raw or an
//! edited encoding ([`cuttle_fuzz::seeded`]) of the records a short-lived real monitor persisted. (redb's
//! own pages are not fuzzed here: `mon::store` opens files with redb's integrity check, and its test
//! `damaged_bytes_never_panic` damages whole files.)
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mon::state::Persisted;
use mon::store::Records;
use mon::{Effect, MonOptions, MonState};
use rados::map::OsdInfo;
use rados::msg::{LogEntry, LogLevel, MonCommand, MonRequest};
use rados::{Epoch, OsdId};

use cuttle_fuzz::{addrs, FSID};

const TAGS: usize = 7;

/// Records as `[tag, len_lo, len_hi, bytes...]*`; tags as in [`records`].
fn encode(r: &Records) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |tag: u8, b: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&u16::try_from(b.len()).expect("a seed record under 64 KiB").to_le_bytes());
        out.extend_from_slice(b);
    };
    for (tag, v) in [(0, &r.format), (1, &r.fsid), (2, &r.osdmap), (3, &r.pool_id_max)] {
        if let Some(v) = v {
            put(tag, v);
        }
    }
    for (k, v) in &r.incrementals {
        put(4, &[&k.to_le_bytes()[..], v].concat());
    }
    for (k, v) in &r.uuids {
        put(5, &[&k.to_le_bytes()[..], &v.to_le_bytes()[..]].concat());
    }
    for (k, v) in &r.log {
        put(6, &[&k.to_le_bytes()[..], v].concat());
    }
    out
}

/// The inverse of [`encode`], as a redb table would hand the rows over: in key order, one per key (the last
/// one written wins).
fn records(mut b: &[u8]) -> Records {
    let mut r = Records::default();
    let mut incs = std::collections::BTreeMap::new();
    let mut uuids = std::collections::BTreeMap::new();
    let mut log = std::collections::BTreeMap::new();
    while let [tag, lo, hi, rest @ ..] = b {
        let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (v, tail) = rest.split_at(n);
        b = tail;
        match usize::from(*tag) % TAGS {
            0 => r.format = Some(v.to_vec()),
            1 => r.fsid = Some(v.to_vec()),
            2 => r.osdmap = Some(v.to_vec()),
            3 => r.pool_id_max = Some(v.to_vec()),
            4 if v.len() >= 4 => {
                incs.insert(u32::from_le_bytes(v[..4].try_into().expect("4 bytes")), v[4..].to_vec());
            }
            5 if v.len() >= 20 => {
                let k = u128::from_le_bytes(v[..16].try_into().expect("16 bytes"));
                uuids.insert(k, u32::from_le_bytes(v[16..20].try_into().expect("4 bytes")));
            }
            6 if v.len() >= 8 => {
                log.insert(u64::from_le_bytes(v[..8].try_into().expect("8 bytes")), v[8..].to_vec());
            }
            _ => {}
        }
    }
    r.incrementals = incs.into_iter().collect();
    r.uuids = uuids.into_iter().collect();
    r.log = log.into_iter().collect();
    r
}

fn opts() -> MonOptions {
    let cfg = rados::config::Config { fsid: FSID.to_string(), ..Default::default() };
    MonOptions::from_config(&cfg).expect("valid options")
}

/// What `Store::persist` writes for `effects` and the map after them, added to `r`.
fn persist(r: &mut Records, effects: &[Effect], s: &MonState) {
    for e in effects {
        match e {
            Effect::Register { uuid, osd } => r.uuids.push((u128::from_be_bytes(*uuid), osd.0)),
            Effect::Commit(inc) => r.incrementals.push((inc.epoch.0, inc.encode().expect("encodes"))),
            Effect::Log(entry) => r.log.push((entry.seq, postcard::to_stdvec(entry).expect("encodes"))),
        }
    }
    r.osdmap = Some(s.map().encode().expect("encodes"));
    let pool_id_max = s.map().pools.keys().map(|p| p.0).max().unwrap_or(0);
    r.pool_id_max = Some(pool_id_max.to_le_bytes().to_vec());
}

fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut r = Records {
            format: Some(mon::store::FORMAT_VERSION.to_le_bytes().to_vec()),
            fsid: Some(FSID.0.to_vec()),
            ..Records::default()
        };
        let mut seeds = vec![encode(&r)];
        let (mut s, effects) = MonState::create(opts(), 1_000);
        persist(&mut r, &effects, &s);
        seeds.push(encode(&r));
        let reqs = [
            MonRequest::OsdNew { uuid: [1; 16], host: "host0".into() },
            MonRequest::OsdNew { uuid: [2; 16], host: "host1".into() },
            MonRequest::OsdBoot { osd: OsdId(0), uuid: [1; 16], addrs: addrs(0), host: "host0".into() },
            MonRequest::OsdBoot { osd: OsdId(1), uuid: [2; 16], addrs: addrs(1), host: "host1".into() },
            MonRequest::Command(MonCommand::PoolCreate {
                name: "rbd".into(),
                size: Some(2),
                min_size: None,
                pg_num: Some(8),
            }),
            MonRequest::Command(MonCommand::PoolCreate {
                name: "gone".into(),
                size: None,
                min_size: None,
                pg_num: Some(2),
            }),
            MonRequest::Command(MonCommand::PoolRm { name: "gone".into(), confirm: true }),
        ];
        for req in reqs {
            let (_, effects) = s.handle(2_000, None, req);
            persist(&mut r, &effects, &s);
        }
        seeds.push(encode(&r));
        let effects = s.tick(1_000_000);
        persist(&mut r, &effects, &s);
        seeds.push(encode(&r));
        // At the edges of the id spaces: the last log sequence number, the last OSD id.
        let mut edge = r.clone();
        let last = LogEntry { seq: u64::MAX, stamp_ms: 0, level: LogLevel::Warn, message: "last".into() };
        edge.log.push((last.seq, postcard::to_stdvec(&last).expect("encodes")));
        seeds.push(encode(&edge));
        let mut edge = r.clone();
        let mut map = s.map().clone();
        let info = OsdInfo { addrs: None, up: false, in_: false, weight: 0, host: "edge".into() };
        map.osds.insert(OsdId(u32::MAX), info);
        edge.osdmap = Some(map.encode().expect("encodes"));
        seeds.push(encode(&edge));
        seeds
    })
}

fn check_effects(s: &MonState, effects: &[Effect]) {
    for e in effects {
        if let Effect::Commit(inc) = e {
            inc.encode().expect("a committed incremental encodes");
        }
    }
    s.map().encode().expect("the monitor's map encodes");
}

fuzz_target!(|data: &[u8]| {
    let r = records(&cuttle_fuzz::seeded(data, seeds()));
    let Ok(Some(p)) = r.decode(FSID) else { return };
    let p: Persisted = p;
    let now_ms = 5_000_000;
    let Ok(mut s) = MonState::restore(opts(), p, now_ms) else { return };
    // The read-only commands, which walk everything restored.
    let cmds = [
        MonCommand::Status,
        MonCommand::Health,
        MonCommand::OsdTree,
        MonCommand::OsdDump,
        MonCommand::PoolLs,
        MonCommand::OsdPingTimes,
        MonCommand::Log { n: 5 },
    ];
    for cmd in cmds {
        let (_reply, effects) = s.handle(now_ms, None, MonRequest::Command(cmd));
        check_effects(&s, &effects);
    }
    if let Some(u) = s.map_update_since(Some(Epoch(1))) {
        let m = u.newer_map(None).expect("the monitor's update applies");
        assert!(m.is_none_or(|m| &m == s.map()));
    }
    // A commit at the last epoch stops the monitor by design (`OsdMap::incremental`): not a decoding matter.
    if s.map().epoch.checked_next().and_then(|e| e.checked_next()).is_some() {
        let effects = s.tick(now_ms + 3_600_000);
        check_effects(&s, &effects);
    }
    let _ = s.health(now_ms);
});
