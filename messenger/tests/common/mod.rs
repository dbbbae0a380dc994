//! Shared helpers for the loopback tests: a collecting dispatcher and messenger builders.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerConfig, Policy, Refused,
    WorkerPool,
};

pub const MSG_REQUEST: u16 = 1;
pub const MSG_REPLY: u16 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connect(u64),
    Reset(u64),
    RemoteReset(u64),
}

/// Records every message and event; optionally answers requests with a small reply, and optionally sleeps per
/// message (a slow dispatcher).
pub struct Collector {
    pub msgs: Sender<(Connection, Message)>,
    pub events: Sender<Event>,
    pub fast: bool,
    pub reply: bool,
    pub delay: Option<Duration>,
}

impl Dispatcher for Collector {
    fn can_fast_dispatch(&self, _m: &Message) -> bool {
        self.fast
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        if self.reply && m.msg_type == MSG_REQUEST {
            let r = Message::new(MSG_REPLY, bytes::Bytes::from_static(b"ok")).with_tid(m.tid);
            let _ = conn.send_message(r);
        }
        let _ = self.msgs.send((conn.clone(), m));
        Ok(())
    }
    fn handle_connect(&self, c: &Connection) {
        let _ = self.events.send(Event::Connect(c.id()));
    }
    fn handle_reset(&self, c: &Connection) {
        let _ = self.events.send(Event::Reset(c.id()));
    }
    fn handle_remote_reset(&self, c: &Connection) {
        let _ = self.events.send(Event::RemoteReset(c.id()));
    }
}

pub struct Endpoint {
    pub msgr: Messenger,
    pub msgs: Receiver<(Connection, Message)>,
    pub events: Receiver<Event>,
}

pub struct Opts {
    pub fast: bool,
    pub reply: bool,
    pub delay: Option<Duration>,
    pub cfg: MessengerConfig,
    pub policies: Vec<(EntityType, Policy)>,
    pub bind: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { fast: true, reply: false, delay: None, cfg: test_config(), policies: Vec::new(), bind: false }
    }
}

pub fn test_config() -> MessengerConfig {
    MessengerConfig {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
        ..MessengerConfig::default()
    }
}

static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn endpoint(pool: &Arc<WorkerPool>, name: EntityName, o: Opts) -> Endpoint {
    let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) ^ (std::process::id() as u64) << 32;
    let msgr = Messenger::new(Arc::clone(pool), name, nonce, o.cfg);
    for (t, p) in o.policies {
        msgr.set_policy(t, p);
    }
    let (mtx, msgs) = crossbeam_channel::unbounded();
    let (etx, events) = crossbeam_channel::unbounded();
    msgr.add_dispatcher_tail(Arc::new(Collector {
        msgs: mtx,
        events: etx,
        fast: o.fast,
        reply: o.reply,
        delay: o.delay,
    }));
    if o.bind {
        msgr.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    }
    msgr.start().unwrap();
    msgr.ready();
    Endpoint { msgr, msgs, events }
}

pub fn addr(e: &Endpoint) -> SocketAddr {
    e.msgr.my_addr().unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
