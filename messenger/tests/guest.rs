//! Guests: event sources of other protocols served on the worker pool's event loops.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use messenger::{Guest, GuestEvent, GuestHandle, WorkerPool};
use mio::{Interest, Registry, Token};

/// Echoes what it reads; a kick makes it send `K`. Records whether every call came on its own worker.
struct Echo {
    stream: mio::net::TcpStream,
    handle: GuestHandle,
    out: Vec<u8>,
    kicks: Arc<AtomicUsize>,
    off_worker_calls: Arc<AtomicUsize>,
    deregistered: Arc<AtomicBool>,
}

impl Guest for Echo {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.stream, token, Interest::READABLE | Interest::WRITABLE)
    }

    fn ready(&mut self, ev: GuestEvent) -> bool {
        if !self.handle.on_own_worker() {
            self.off_worker_calls.fetch_add(1, Ordering::Relaxed);
        }
        if ev.kicked {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            self.out.push(b'K');
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
        self.deregistered.store(true, Ordering::Release);
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn read_exact_timeout(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn guest_echo_socket_is_served_by_the_pool_and_kicked_from_another_thread() {
    // Goal: a guest's socket is served on a worker (readable and writable edges, data larger than the socket
    // buffers), a kick from another thread reaches it, every call runs on its own worker, and a guest that
    // says it is done is deregistered and dropped. Method: an echo guest over a real TCP socket; the test
    // thread is the peer.
    let pool = WorkerPool::new(2).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (accepted, _) = l.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    let kicks = Arc::new(AtomicUsize::new(0));
    let off_worker = Arc::new(AtomicUsize::new(0));
    let deregistered = Arc::new(AtomicBool::new(false));
    let (k, o, d) = (Arc::clone(&kicks), Arc::clone(&off_worker), Arc::clone(&deregistered));
    let h = pool.add_guest(move |handle| {
        Box::new(Echo {
            stream: mio::net::TcpStream::from_std(accepted),
            handle,
            out: Vec::new(),
            kicks: k,
            off_worker_calls: o,
            deregistered: d,
        })
    });
    assert!(!h.on_own_worker(), "the test thread is no worker");
    assert!(h.worker() < 2);

    peer.write_all(b"hello").unwrap();
    assert_eq!(read_exact_timeout(&mut peer, 5), b"hello");

    // 8 MiB through the echo while the peer writes it all first: the guest must stop at WouldBlock and
    // resume on the writable edge.
    let big: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut w = peer.try_clone().unwrap();
    let sent = big.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
    assert_eq!(read_exact_timeout(&mut peer, big.len()), big);
    writer.join().unwrap();

    // A kick from this thread reaches the guest; a burst of kicks merges into few calls.
    h.kick();
    assert_eq!(read_exact_timeout(&mut peer, 1), b"K");
    let before = kicks.load(Ordering::Relaxed);
    assert_eq!(before, 1);
    let kickers: Vec<_> = (0..4)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    h.kick();
                }
            })
        })
        .collect();
    for t in kickers {
        t.join().unwrap();
    }
    wait_until("the kicks to be served", || !matches!(kicks.load(Ordering::Relaxed), 1));
    let n = kicks.load(Ordering::Relaxed) - before;
    let got = read_exact_timeout(&mut peer, n);
    assert!(got.iter().all(|&b| b == b'K'));
    assert!((1..=4000).contains(&n), "{n} kick calls for 4000 kicks");
    assert_eq!(off_worker.load(Ordering::Relaxed), 0, "a guest call ran off its worker");

    // The peer closes: the guest says it is done and the worker lets go of it.
    drop(peer);
    wait_until("the guest to be dropped", || h.is_gone());
    assert!(deregistered.load(Ordering::Acquire));
    h.kick(); // a kick for a gone guest is a no-op
    pool.shutdown();
}

/// A guest whose registration fails.
struct Unregistrable;

impl Guest for Unregistrable {
    fn register(&mut self, _: &Registry, _: Token) -> io::Result<()> {
        Err(io::Error::other("no"))
    }
    fn ready(&mut self, _: GuestEvent) -> bool {
        panic!("never registered, never called")
    }
    fn deregister(&mut self, _: &Registry) {}
}

#[test]
fn a_guest_that_cannot_register_is_dropped() {
    // Goal: a failed registration drops the guest and its load charge. Method: a guest whose register
    // fails; kick it, then watch the pool's loads return to zero.
    let pool = WorkerPool::new(1).unwrap();
    let h = pool.add_guest(|_| Box::new(Unregistrable));
    wait_until("the guest to be dropped", || h.is_gone());
    h.kick();
    assert_eq!(pool.loads(), vec![0]);
    pool.shutdown();
}
