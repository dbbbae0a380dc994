//! msgr-bench: a messenger benchmark in the shape of Ceph's ceph_perf_msgr_server/client, on the public API.
//!
//!     msgr-bench server --addr 127.0.0.1:PORT [--workers N]
//!     msgr-bench client --addr 127.0.0.1:PORT --size BYTES --depth N --seconds S [--conns C] [--workers N] [--json]
//!
//! The server answers each message with a small reply. The client keeps `depth` messages in flight per
//! connection (each reply sends the next message, inline on the worker) and reports messages/s, MB/s of
//! payload sent, and the round-trip latency of every message (p50/p99).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use messenger::{
    Connection, Dispatcher, EntityName, EntityType, Message, Messenger, MessengerConfig, Policy, Refused,
    WorkerPool,
};
use parking_lot::Mutex;

const MSG_PING: u16 = 1;
const MSG_PONG: u16 = 2;

#[derive(Parser)]
#[command(name = "msgr-bench", about = "Benchmark cuttle's messenger on loopback")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer every message with a small reply.
    Server {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = messenger::WORKERS_DEFAULT)]
        workers: usize,
    },
    /// Keep DEPTH messages of SIZE bytes in flight per connection for SECONDS.
    Client {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        depth: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = messenger::WORKERS_DEFAULT)]
        workers: usize,
        #[arg(long)]
        json: bool,
    },
}

struct Responder;

impl Dispatcher for Responder {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        m.msg_type == MSG_PING
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        let reply = Message::new(MSG_PONG, Bytes::from_static(b"ok")).with_tid(m.tid);
        // A closed connection just means the client went away.
        let _ = conn.send_message(reply);
        Ok(())
    }
}

struct ClientState {
    sent_at: VecDeque<Instant>,
    latencies_ns: Vec<u64>,
    completed: u64,
    next_tid: u64,
}

struct Pinger {
    state: Mutex<ClientState>,
    payload: Bytes,
    running: Arc<AtomicBool>,
}

impl Pinger {
    fn send_one(&self, conn: &Connection, st: &mut ClientState) {
        st.next_tid += 1;
        st.sent_at.push_back(Instant::now());
        let m = Message::new(MSG_PING, Bytes::new()).with_tid(st.next_tid).with_data(self.payload.clone());
        if let Err(e) = conn.send_message(m) {
            eprintln!("send failed: {e}");
            self.running.store(false, Ordering::Relaxed);
        }
    }
}

impl Dispatcher for Pinger {
    fn can_fast_dispatch(&self, m: &Message) -> bool {
        m.msg_type == MSG_PONG
    }
    fn dispatch(&self, conn: &Connection, m: Message) -> Result<(), Refused> {
        let now = Instant::now();
        let mut st = self.state.lock();
        if let Some(t) = st.sent_at.pop_front() {
            st.latencies_ns.push((now - t).as_nanos() as u64);
            st.completed += 1;
        }
        drop(m);
        if self.running.load(Ordering::Relaxed) {
            self.send_one(conn, &mut st);
        }
        Ok(())
    }
}

fn nonce() -> u64 {
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ ((std::process::id() as u64) << 32)
}

fn bench_config() -> MessengerConfig {
    // Large messages at depth 64 need room in the dispatch throttle and the outgoing queue.
    MessengerConfig {
        dispatch_throttle_bytes: 1 << 30,
        outgoing_bytes_soft_max: 512 << 20,
        ..Default::default()
    }
}

fn server(addr: SocketAddr, workers: usize) -> Result<()> {
    let pool = WorkerPool::new(workers).context("starting workers")?;
    let m = Messenger::new(pool, EntityName::osd(0), nonce(), bench_config());
    m.set_policy(EntityType::Client, Policy::stateful_server());
    m.add_dispatcher_tail(Arc::new(Responder));
    let bound = m.bind(addr)?;
    m.start()?;
    m.ready();
    eprintln!("msgr-bench server listening on {bound}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
fn client(
    addr: SocketAddr,
    size: usize,
    depth: usize,
    seconds: f64,
    conns: usize,
    workers: usize,
    json: bool,
) -> Result<()> {
    if depth == 0 || conns == 0 || seconds <= 0.0 {
        bail!("--depth, --conns and --seconds must be positive");
    }
    let pool = WorkerPool::new(workers).context("starting workers")?;
    let payload = Bytes::from(vec![0x5au8; size]);
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for i in 0..conns {
        let m = Messenger::new(
            Arc::clone(&pool),
            EntityName::client(i as u64 + 1),
            nonce() + i as u64,
            bench_config(),
        );
        m.set_policy(EntityType::Osd, Policy::lossless_client());
        let p = Arc::new(Pinger {
            state: Mutex::new(ClientState {
                sent_at: VecDeque::with_capacity(depth),
                latencies_ns: Vec::with_capacity(1 << 20),
                completed: 0,
                next_tid: 0,
            }),
            payload: payload.clone(),
            running: Arc::clone(&running),
        });
        m.add_dispatcher_tail(p.clone());
        m.start()?;
        let conn = m.connect(EntityName::osd(0), addr)?;
        clients.push((m, conn, p));
    }
    // Warm up the connections with one round trip each before the clock starts.
    let start_wait = Instant::now();
    for (_, conn, p) in &clients {
        p.send_one(conn, &mut p.state.lock());
    }
    while clients.iter().any(|(_, _, p)| p.state.lock().completed == 0) {
        if start_wait.elapsed() > Duration::from_secs(10) {
            bail!("server at {addr} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for (_, _, p) in &clients {
        let mut st = p.state.lock();
        st.latencies_ns.clear();
        st.completed = 0;
    }
    let start = Instant::now();
    for (_, conn, p) in &clients {
        let mut st = p.state.lock();
        let inflight = st.sent_at.len();
        for _ in inflight..depth {
            p.send_one(conn, &mut st);
        }
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (mut completed, mut lat) = (0u64, Vec::new());
    for (_, _, p) in &clients {
        let mut st = p.state.lock();
        completed += st.completed;
        lat.append(&mut st.latencies_ns);
    }
    let elapsed = start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    lat.sort_unstable();
    let msgs_per_s = completed as f64 / elapsed;
    let mb_per_s = msgs_per_s * size as f64 / 1e6;
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "size": size, "depth": depth, "conns": conns, "seconds": elapsed,
                "msgs_per_s": msgs_per_s, "mb_per_s": mb_per_s, "lat_us_p50": p50, "lat_us_p99": p99,
            })
        );
    } else {
        println!("size {size} B, depth {depth}, conns {conns}, {elapsed:.1} s");
        println!("messages/s   {msgs_per_s:.0}");
        println!("MB/s         {mb_per_s:.1}");
        println!("latency p50  {p50:.1} us");
        println!("latency p99  {p99:.1} us");
    }
    for (m, _, _) in &clients {
        m.shutdown();
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Server { addr, workers } => server(addr, workers),
        Cmd::Client { addr, size, depth, seconds, conns, workers, json } => {
            client(addr, size, depth, seconds, conns, workers, json)
        }
    }
}
