//! Heartbeats between real services on 127.0.0.1: RTTs on both networks, failure of a stopped peer, and the
//! cancellation once it comes back at new addresses.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use messenger::WorkerPool;
use osd::heartbeat::{HbReport, HeartbeatService, Peer};
use rados::config::Config;
use rados::ids::{Epoch, OsdId};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn config() -> Config {
    Config { osd_heartbeat_interval: 0.2, osd_heartbeat_grace: 1.0, ..Config::default() }
}

fn start(pool: &Arc<WorkerPool>, me: u32, nonce: u64) -> (HeartbeatService, Receiver<(Instant, HbReport)>) {
    let (tx, rx) = crossbeam_channel::bounded(1024);
    let report = Box::new(move |r: HbReport| {
        let _ = tx.try_send((Instant::now(), r));
    });
    let hb = HeartbeatService::start(Arc::clone(pool), &config(), OsdId(me), nonce, LOCALHOST, report)
        .expect("heartbeat service starts");
    (hb, rx)
}

fn peer_of(osd: u32, hb: &HeartbeatService) -> Peer {
    Peer { osd: OsdId(osd), front: hb.front_addr(), back: hb.back_addr() }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first report for `target` matching `want`, skipping others; panics after `timeout`.
fn next_report(
    rx: &Receiver<(Instant, HbReport)>,
    timeout: Duration,
    want: impl Fn(&HbReport) -> bool,
) -> (Instant, HbReport) {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, r)) if want(&r) => return (t, r),
            Ok(_) => {}
            Err(_) => panic!("no matching report within {timeout:?}"),
        }
    }
}

#[test]
fn loopback_rtts_failure_and_recovery() {
    // Goal: two heartbeat services measure RTTs on both networks; when one stops, the other reports it failed
    // within grace + one interval (plus slack for a loaded machine) with failed_for ≥ grace; when it comes back
    // at new addresses, the survivor withdraws the report. Method: services for osd.1 and osd.2 on one worker
    // pool, interval 0.2 s and grace 1 s; shut osd.2 down, start a new osd.2, hand osd.1 its new addresses.
    let pool = WorkerPool::new(2).expect("worker pool");
    let (a, a_reports) = start(&pool, 1, 0x1111);
    let (b, _b_reports) = start(&pool, 2, 0x2222);
    assert_ne!(a.front_addr(), a.back_addr());
    a.set_peers(Epoch(1), vec![peer_of(2, &b), peer_of(1, &a)]);
    b.set_peers(Epoch(1), vec![peer_of(1, &a)]);

    let measured = |hb: &HeartbeatService, peer: u32| {
        hb.ping_times().iter().any(|p| p.peer == OsdId(peer) && p.front_us.is_some() && p.back_us.is_some())
    };
    wait_for("RTTs on both networks", Duration::from_secs(2), || measured(&a, 2) && measured(&b, 1));
    let pt = a.ping_times();
    assert_eq!(pt.len(), 1, "ourselves is not a peer: {pt:?}");
    assert!(
        pt[0].front_us.is_some_and(|us| us < 1_000_000) && pt[0].back_us.is_some_and(|us| us < 1_000_000)
    );
    assert!(a_reports.try_recv().is_err(), "a healthy peer is not reported");

    let stopped = Instant::now();
    b.shutdown();
    drop(b);
    let grace = Duration::from_secs(1);
    let (at, r) = next_report(&a_reports, Duration::from_secs(4), |r| matches!(r, HbReport::Failed { .. }));
    let HbReport::Failed { target, failed_for } = r else { unreachable!() };
    assert_eq!(target, OsdId(2));
    assert!(failed_for >= grace, "{failed_for:?}");
    // The last answered ping was at most one round (< 0.5 s here) before the stop, the first unanswered one at
    // most a round after it: the report is due at most grace + one round after the stop.
    let took = at - stopped;
    eprintln!("osd.2 reported {took:?} after it stopped, failed_for {failed_for:?}");
    assert!(
        took <= grace + Duration::from_millis(300) + Duration::from_millis(700),
        "reported after {took:?}"
    );

    let (b2, _b2_reports) = start(&pool, 2, 0x3333);
    a.set_peers(Epoch(2), vec![peer_of(2, &b2)]);
    let (_, r) = next_report(&a_reports, Duration::from_secs(2), |r| matches!(r, HbReport::Alive { .. }));
    assert_eq!(r, HbReport::Alive { target: OsdId(2) });

    a.shutdown();
    b2.shutdown();
}

#[test]
fn hung_peer_is_reported_and_garbage_on_heartbeat_ports_is_harmless() {
    // Goal: a peer whose kernel accepts connections but whose process never answers (SIGSTOP) is reported
    // after the grace like a dead one, and garbage bytes sent to our heartbeat ports neither crash the service
    // nor stop it answering. Method: osd.3's heartbeat addresses are listening sockets nobody accepts on;
    // osd.1 pings them and osd.2; raw garbage goes to osd.2's front and back ports meanwhile.
    use std::io::Write;
    let pool = WorkerPool::new(2).expect("worker pool");
    let (a, a_reports) = start(&pool, 1, 0x4444);
    let (b, _b_reports) = start(&pool, 2, 0x5555);
    let hung_front = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let hung_back = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let hung = Peer {
        osd: OsdId(3),
        front: hung_front.local_addr().expect("addr"),
        back: hung_back.local_addr().expect("addr"),
    };
    let started = Instant::now();
    a.set_peers(Epoch(1), vec![peer_of(2, &b), hung]);
    for addr in [b.front_addr(), b.back_addr()] {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let _ = s.write_all(&[0xa5; 4096]);
    }
    let (at, r) = next_report(&a_reports, Duration::from_secs(4), |_| true);
    assert!(
        matches!(r, HbReport::Failed { target: OsdId(3), failed_for } if failed_for >= Duration::from_secs(1))
    );
    let took = at - started;
    assert!(took <= Duration::from_millis(2000), "reported after {took:?}");
    let pt = a.ping_times();
    assert!(pt.iter().any(|p| p.peer == OsdId(2) && p.front_us.is_some() && p.back_us.is_some()), "{pt:?}");
    assert!(pt.iter().any(|p| p.peer == OsdId(3) && p.front_us.is_none() && p.back_us.is_none()), "{pt:?}");
    // osd.2 never became suspect.
    while let Ok((_, r)) = a_reports.try_recv() {
        assert!(matches!(r, HbReport::Failed { target: OsdId(3), .. }), "{r:?}");
    }
    a.shutdown();
    b.shutdown();
}

#[test]
fn bad_interval_or_grace_is_a_typed_error() {
    // Goal: nonsensical heartbeat settings from cuttle.toml are refused with an error, never a panic or a
    // spinning thread. Method: start with zero, negative, NaN, infinite and huge values.
    let pool = WorkerPool::new(1).expect("worker pool");
    for (interval, grace) in [(0.0, 1.0), (-1.0, 1.0), (f64::NAN, 1.0), (1.0, f64::INFINITY), (1e300, 1.0)] {
        let cfg =
            Config { osd_heartbeat_interval: interval, osd_heartbeat_grace: grace, ..Config::default() };
        let r = HeartbeatService::start(Arc::clone(&pool), &cfg, OsdId(1), 1, LOCALHOST, Box::new(|_| {}));
        assert!(
            matches!(r, Err(osd::heartbeat::HeartbeatError::Config(_))),
            "interval {interval} grace {grace}: {r:?}"
        );
    }
}
