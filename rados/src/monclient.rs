//! MonClient: keeps a program's view of the cluster map fresh and carries its requests to the monitor.
//!
//! Like GlusterFS's client fetching its volume spec from glusterd and reloading its graph when the spec changes
//! (seed 000), a MonClient subscribes to the map when it starts, applies every incremental the monitor pushes,
//! and calls its users' map callbacks so they reconfigure live (the Objecter re-targets ops, an OSD re-peers).
//! The mon session is lossy (as Ceph's): when it faults, the MonClient reconnects by itself, subscribes again
//! from the epoch it has, and resends the requests that were waiting for answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use messenger::{Connection, Dispatcher, EntityName, EntityType, Message, Messenger, Policy, Refused};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::ids::{Epoch, Fsid};
use crate::map::OsdMap;
use crate::msg::{types, LogEntry, MapUpdate, MonCommand, MonError, MonReply, MonRequest};

/// How often the MonClient checks its mon session and sends a keepalive.
const TICK: Duration = Duration::from_millis(200);
/// Map callbacks and log callbacks registered at most this many (they are part of a program's wiring, not data).
const CALLBACKS_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MonClientError {
    #[error("monitor at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The monitor's own words; they say what was refused.
    #[error(transparent)]
    Mon(#[from] MonError),
    #[error("unexpected reply from the monitor: {0:?}")]
    Unexpected(MonReply),
    #[error("monitor client is shut down")]
    ShutDown,
}

type MapCallback = Box<dyn Fn(&Arc<OsdMap>) + Send + Sync>;
type LogCallback = Box<dyn Fn(&LogEntry) + Send + Sync>;

struct Pending {
    req: MonRequest,
    reply: Sender<MonReply>,
}

/// A client of the monitor. Create it with [`MonClient::start`]; it registers itself as a dispatcher on the
/// messenger it is given.
pub struct MonClient {
    msgr: Arc<Messenger>,
    mon_addr: SocketAddr,
    conn: Mutex<Option<Connection>>,
    map: RwLock<Option<Arc<OsdMap>>>,
    map_changed: Condvar,
    map_lock: Mutex<()>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_tid: AtomicU64,
    want_log: AtomicBool,
    map_callbacks: RwLock<Vec<MapCallback>>,
    log_callbacks: RwLock<Vec<LogCallback>>,
    stopping: AtomicBool,
    ticker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for MonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MonClient({})", self.mon_addr)
    }
}

impl MonClient {
    /// Starts a MonClient on `msgr` (which must have been `start`ed) and subscribes to the map (and the
    /// cluster log with `log`). Does not wait for the first map: see [`MonClient::wait_for_map`].
    pub fn start(msgr: Arc<Messenger>, mon_addr: SocketAddr, log: bool) -> Arc<MonClient> {
        msgr.set_policy(EntityType::Mon, Policy::lossy_client());
        let mc = Arc::new(MonClient {
            msgr: Arc::clone(&msgr),
            mon_addr,
            conn: Mutex::new(None),
            map: RwLock::new(None),
            map_changed: Condvar::new(),
            map_lock: Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            next_tid: AtomicU64::new(1),
            want_log: AtomicBool::new(log),
            map_callbacks: RwLock::new(Vec::new()),
            log_callbacks: RwLock::new(Vec::new()),
            stopping: AtomicBool::new(false),
            ticker: Mutex::new(None),
        });
        msgr.add_dispatcher_head(Arc::new(MonDispatcher(Arc::downgrade(&mc))));
        mc.reconnect();
        let weak = Arc::downgrade(&mc);
        let t = std::thread::Builder::new()
            .name("monc-tick".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(mc) = weak.upgrade() else { return };
                if mc.stopping.load(Ordering::Acquire) {
                    return;
                }
                mc.tick();
            })
            .expect("spawning the monclient tick thread");
        *mc.ticker.lock() = Some(t);
        mc
    }

    pub fn mon_addr(&self) -> SocketAddr {
        self.mon_addr
    }

    /// The newest map, if one has arrived.
    pub fn map(&self) -> Option<Arc<OsdMap>> {
        self.map.read().clone()
    }

    pub fn fsid(&self) -> Option<Fsid> {
        self.map().map(|m| m.fsid)
    }

    /// Waits until the map is at least at `min` (or any map, with `None`).
    pub fn wait_for_map(&self, min: Option<Epoch>, timeout: Duration) -> Result<Arc<OsdMap>, MonClientError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.map_lock.lock();
        loop {
            if let Some(m) = self.map() {
                if min.is_none_or(|e| m.epoch >= e) {
                    return Ok(m);
                }
            }
            if self.stopping.load(Ordering::Acquire) {
                return Err(MonClientError::ShutDown);
            }
            if self.map_changed.wait_until(&mut g, deadline).timed_out() {
                return Err(MonClientError::Timeout { addr: self.mon_addr, timeout });
            }
        }
    }

    /// Called (on a messenger worker: be quick) with every new map.
    /// Maps newer than the one current at registration only: read [`MonClient::map`] after registering for
    /// the current one.
    pub fn on_map(&self, f: impl Fn(&Arc<OsdMap>) + Send + Sync + 'static) {
        let mut cbs = self.map_callbacks.write();
        assert!(cbs.len() < CALLBACKS_MAX, "too many map callbacks");
        // Read under the callbacks' lock: a map published after this read is handed to the callbacks after
        // this registration, so none is missed, and the one current now is not handed over again.
        let seen = self.map().map_or(Epoch(0), |m| m.epoch);
        cbs.push(Box::new(move |m: &Arc<OsdMap>| {
            if m.epoch > seen {
                f(m)
            }
        }));
    }

    /// Called with every cluster log entry (subscribes to the log if not yet).
    pub fn on_log(&self, f: impl Fn(&LogEntry) + Send + Sync + 'static) {
        {
            let mut cbs = self.log_callbacks.write();
            assert!(cbs.len() < CALLBACKS_MAX, "too many log callbacks");
            cbs.push(Box::new(f));
        }
        if !self.want_log.swap(true, Ordering::AcqRel) {
            self.subscribe();
        }
    }

    /// Sends a request and waits for its reply. Requests are resent after a reconnect, so they must be
    /// idempotent at the monitor (they are: OsdNew by uuid, OsdBoot by id, commands by their effect).
    pub fn request(&self, req: MonRequest, timeout: Duration) -> Result<MonReply, MonClientError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(MonClientError::ShutDown);
        }
        let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (Sender<MonReply>, Receiver<MonReply>) = crossbeam_channel::bounded(1);
        self.pending.lock().insert(tid, Pending { req: req.clone(), reply: tx });
        self.send(tid, &req);
        let r = rx.recv_timeout(timeout);
        self.pending.lock().remove(&tid);
        match r {
            Ok(MonReply::Error(e)) => Err(MonClientError::Mon(e)),
            Ok(reply) => Ok(reply),
            Err(_) => Err(MonClientError::Timeout { addr: self.mon_addr, timeout }),
        }
    }

    /// Sends without waiting for an answer (failure reports, PG stats).
    pub fn send_oneway(&self, req: &MonRequest) {
        let tid = self.next_tid.fetch_add(1, Ordering::Relaxed);
        self.send(tid, req);
    }

    /// Runs an operator command; returns its JSON text.
    pub fn command(&self, cmd: MonCommand, timeout: Duration) -> Result<String, MonClientError> {
        match self.request(MonRequest::Command(cmd), timeout)? {
            MonReply::Json(j) => Ok(j),
            MonReply::Ok => Ok("{}".into()),
            other => Err(MonClientError::Unexpected(other)),
        }
    }

    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().take() {
            c.mark_down();
        }
        self.map_changed.notify_all();
        if let Some(t) = self.ticker.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }

    fn send(&self, tid: u64, req: &MonRequest) {
        let conn = self.conn.lock().clone();
        if let Some(c) = conn {
            // A closed connection is noticed by the tick, which reconnects and resends what is pending.
            let _ = c.send_message(Message::encode(types::MON_REQUEST, req).with_tid(tid));
        }
    }

    fn subscribe(&self) {
        let have = self.map().map(|m| m.epoch);
        let req = MonRequest::Subscribe { have, log: self.want_log.load(Ordering::Acquire) };
        self.send_oneway(&req);
    }

    fn reconnect(&self) {
        match self.msgr.connect(EntityName::mon(0), self.mon_addr) {
            Ok(c) => {
                *self.conn.lock() = Some(c);
                self.subscribe();
                let pending: Vec<(u64, MonRequest)> =
                    self.pending.lock().iter().map(|(t, p)| (*t, p.req.clone())).collect();
                for (tid, req) in pending {
                    self.send(tid, &req);
                }
            }
            Err(e) => tracing::warn!("cannot connect to the monitor at {}: {e}", self.mon_addr),
        }
    }

    fn tick(&self) {
        let closed = self.conn.lock().as_ref().is_none_or(|c| c.is_closed());
        if closed {
            tracing::debug!(mon = %self.mon_addr, "mon session closed; reconnecting");
            self.reconnect();
        }
    }

    fn handle_map(&self, u: MapUpdate) {
        let mut changed = None;
        {
            let mut cur = self.map.write();
            match u.newer_map(cur.as_deref()) {
                Ok(Some(n)) => {
                    let n = Arc::new(n);
                    *cur = Some(Arc::clone(&n));
                    changed = Some(n);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}; asking for a full map");
                    drop(cur);
                    self.send_oneway(&MonRequest::Subscribe {
                        have: None,
                        log: self.want_log.load(Ordering::Acquire),
                    });
                    return;
                }
            }
        }
        if let Some(m) = changed {
            // Users reconfigure first, then waiters wake: whoever returns from `wait_for_map` and registers a
            // callback then is not called back with the map it has just seen.
            for cb in self.map_callbacks.read().iter() {
                cb(&m);
            }
            let _g = self.map_lock.lock();
            self.map_changed.notify_all();
        }
    }
}

impl Drop for MonClient {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// The dispatcher half, holding the MonClient weakly so that dropping the MonClient ends it.
struct MonDispatcher(Weak<MonClient>);

impl Dispatcher for MonDispatcher {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        matches!(m.msg_type, types::MON_REPLY | types::MON_MAP | types::MON_LOG)
    }

    fn dispatch(&self, _conn: &Connection, m: Message) -> Result<(), Refused> {
        let Some(mc) = self.0.upgrade() else { return Err(Refused::NotMine(m)) };
        match m.msg_type {
            types::MON_REPLY => match m.decode::<MonReply>() {
                Ok(r) => {
                    if let Some(p) = mc.pending.lock().remove(&m.tid) {
                        let _ = p.reply.try_send(r);
                    }
                }
                Err(e) => tracing::warn!("bad reply from the monitor: {e}"),
            },
            types::MON_MAP => match m.decode::<MapUpdate>() {
                Ok(u) => mc.handle_map(u),
                Err(e) => tracing::warn!("bad map from the monitor: {e}"),
            },
            types::MON_LOG => match m.decode::<LogEntry>() {
                Ok(e) => {
                    for cb in mc.log_callbacks.read().iter() {
                        cb(&e);
                    }
                }
                Err(e) => tracing::warn!("bad log entry from the monitor: {e}"),
            },
            _ => return Err(Refused::NotMine(m)),
        }
        Ok(())
    }
}
