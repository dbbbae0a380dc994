//! rados: object-level access to a pool, shaped like Ceph's `rados` tool.
//!
//!     rados [--conf PATH] -p POOL put OBJ FILE|-
//!     rados [--conf PATH] -p POOL get OBJ FILE|-
//!     rados [--conf PATH] -p POOL ls | rm OBJ... | stat OBJ
//!     rados [--conf PATH] -p POOL setxattr OBJ NAME VALUE | getxattr OBJ NAME | listxattr OBJ
//!     rados [--conf PATH] -p POOL listomapkeys OBJ | cleanup [--prefix PREFIX]
//!     rados [--conf PATH] df | lspools
//!     rados [--conf PATH] -p POOL bench SECONDS write|seq|rand [-b SIZE] [-t CONCURRENCY] [--no-cleanup]
//!                                                               [--format json]
//!
//! `bench write` leaves objects `benchmark_data_<host>_<pid>_object<N>` and a metadata object
//! (`benchmark_last_metadata`) so that `seq` and `rand` can read them back, as Ceph does; it deletes them at
//! the end unless `--no-cleanup` is given.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use rados::msg::MonCommand;
use rados::objecter::{Completion, IoCtx, RadosError};

/// Bytes per op when `put` and `get` move an object in pieces (Ceph's default op size).
const CHUNK_BYTES: u64 = 4 << 20;
/// Names per listing round trip.
const LIST_PAGE: usize = 1024;
/// Keys per omap listing round trip.
const OMAP_PAGE: u32 = 1024;
/// The object `bench write` describes its objects in.
const BENCH_METADATA: &str = "benchmark_last_metadata";
/// How the names of `bench write`'s objects start.
const BENCH_PREFIX: &str = "benchmark_data";
/// Most concurrent ops `bench -t` accepts.
const BENCH_CONCURRENCY_MAX: usize = 4096;
/// Most objects one `bench write` leaves (bounds the metadata and the cleanup).
const BENCH_OBJECTS_MAX: u64 = 100_000_000;
/// Removes in flight during `cleanup`.
const CLEANUP_DEPTH: usize = 64;
/// How long `df` waits for the monitor.
const MON_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "rados", about = "Read, write, list and benchmark the objects of a cuttle pool", version)]
struct Cli {
    #[command(flatten)]
    tool: ToolArgs,
    /// The pool to work on.
    #[arg(short = 'p', long = "pool", global = true)]
    pool: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

use tools::{ClusterClient as Client, Format, ToolArgs};

#[derive(Subcommand)]
enum Cmd {
    /// Write FILE (`-`: stdin) as object OBJ, replacing its content.
    Put {
        /// The object's name.
        obj: String,
        /// The file to read (`-`: stdin).
        file: String,
    },
    /// Read object OBJ into FILE (`-`: stdout).
    Get {
        /// The object's name.
        obj: String,
        /// The file to write (`-`: stdout).
        file: String,
    },
    /// List the pool's objects.
    Ls,
    /// Remove objects.
    Rm {
        /// The objects' names.
        #[arg(required = true)]
        objs: Vec<String>,
    },
    /// Print an object's size and version.
    Stat {
        /// The object's name.
        obj: String,
    },
    /// Set an extended attribute.
    Setxattr {
        /// The object's name.
        obj: String,
        /// The attribute's name.
        name: String,
        /// The attribute's value.
        value: String,
    },
    /// Print an extended attribute's value.
    Getxattr {
        /// The object's name.
        obj: String,
        /// The attribute's name.
        name: String,
    },
    /// List an object's extended attributes.
    Listxattr {
        /// The object's name.
        obj: String,
    },
    /// List an object's omap keys.
    Listomapkeys {
        /// The object's name.
        obj: String,
    },
    /// Space and objects per pool, and the cluster's totals.
    Df,
    /// List the pools.
    Lspools,
    /// Remove the objects a `bench write --no-cleanup` left (and its metadata object).
    Cleanup {
        /// Remove the objects whose names start with this instead.
        #[arg(long, default_value = BENCH_PREFIX)]
        prefix: String,
    },
    /// Measure write or read throughput and latency.
    Bench {
        /// How long to run, in seconds.
        seconds: u64,
        /// write: write new objects; seq, rand: read back what `write --no-cleanup` left.
        mode: BenchMode,
        /// Bytes per op and per object (K/M/G suffixes; default 4M).
        #[arg(short = 'b', long = "block-size")]
        block_size: Option<String>,
        /// Ops in flight at once.
        #[arg(short = 't', long = "concurrent-ios", default_value_t = 16)]
        concurrency: usize,
        /// Keep the objects `write` made (for `seq` and `rand`).
        #[arg(long)]
        no_cleanup: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchMode {
    Write,
    Seq,
    Rand,
}

fn main() {
    tools::quiet_on_broken_pipe();
    tools::exit_with("rados", run(Cli::parse()))
}

fn ioctx(client: &Client, pool: &str) -> Result<IoCtx> {
    client.objecter.ioctx(pool).with_context(|| format!("error opening pool {pool}"))
}

fn run(cli: Cli) -> Result<()> {
    // Validate what needs no cluster before connecting to one.
    let bench_size = match &cli.cmd {
        Cmd::Bench { seconds, block_size, concurrency, .. } => {
            if *seconds == 0 {
                bail!("bench needs a duration of at least 1 second");
            }
            if !(1..=BENCH_CONCURRENCY_MAX).contains(concurrency) {
                bail!("-t {concurrency}: concurrency must be 1 to {BENCH_CONCURRENCY_MAX}");
            }
            let b = match block_size {
                Some(s) => tools::parse_size(s).with_context(|| format!("invalid -b {s:?}"))?,
                None => 4 << 20,
            };
            if b == 0 {
                bail!("invalid -b: the block size must be at least 1 byte");
            }
            Some(b)
        }
        _ => None,
    };
    let needs_pool = !matches!(cli.cmd, Cmd::Df | Cmd::Lspools);
    let pool = match &cli.pool {
        Some(p) => p.clone(),
        None if needs_pool => bail!("no pool given: use -p POOL"),
        None => String::new(),
    };
    // The config error's message already names its cause; `{:#}` would print the cause twice.
    let (cfg, conf_path) = cli.tool.config()?;
    if let Some(b) = bench_size {
        let max = cfg.osd_max_write_size.min(cfg.osd_max_object_size);
        if b > max {
            bail!("invalid -b {b}: larger than osd_max_write_size / osd_max_object_size ({max} bytes)");
        }
    }
    let client = Client::connect(&cfg, &conf_path)?;
    match &cli.cmd {
        Cmd::Df => df(&client, cli.tool.format),
        Cmd::Lspools => lspools(&client, cli.tool.format),
        _ => dispatch(&cli, &client, &pool, bench_size),
    }
}

/// `rados df`: per pool its space and objects (from the monitor, which sums its OSDs' reports), then the
/// cluster's totals.
fn df(client: &Client, fmt: Format) -> Result<()> {
    let text = client.monc.command(MonCommand::Df, MON_TIMEOUT).context("asking the monitor for df")?;
    let v: serde_json::Value = serde_json::from_str(&text).context("the monitor sent malformed JSON")?;
    let mut out = std::io::stdout().lock();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let pools: Vec<serde_json::Value> = v["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let st = &p["stats"];
            let copies = n(st, "objects")
                * if n(st, "stored") > 0 { n(st, "bytes_used") / n(st, "stored") } else { 0 };
            serde_json::json!({
                "name": p["name"], "id": p["id"], "size_bytes": n(st, "bytes_used"),
                "size_kb": n(st, "bytes_used") / 1024, "num_objects": n(st, "objects"),
                "num_object_copies": copies, "stored_bytes": n(st, "stored"),
            })
        })
        .collect();
    let t = &v["stats"];
    let total_objects: u64 = pools.iter().map(|p| n(p, "num_objects")).sum();
    if fmt.is_json() {
        let v = serde_json::json!({
            "pools": pools,
            "total_objects": total_objects,
            "total_used": n(t, "total_used_raw_bytes") / 1024,
            "total_avail": n(t, "total_avail_bytes") / 1024,
            "total_space": n(t, "total_bytes") / 1024,
        });
        writeln!(out, "{}", fmt.json_text(&v))?;
        return Ok(());
    }
    writeln!(out, "{:<16} {:>10} {:>8} {:>8} {:>10}", "POOL_NAME", "USED", "OBJECTS", "COPIES", "STORED")?;
    for p in &pools {
        writeln!(
            out,
            "{:<16} {:>10} {:>8} {:>8} {:>10}",
            p["name"].as_str().unwrap_or("?"),
            tools::human_bytes(n(p, "size_bytes")),
            n(p, "num_objects"),
            n(p, "num_object_copies"),
            tools::human_bytes(n(p, "stored_bytes"))
        )?;
    }
    writeln!(out)?;
    writeln!(out, "total_objects    {total_objects}")?;
    writeln!(out, "total_used       {}", tools::human_bytes(n(t, "total_used_raw_bytes")))?;
    writeln!(out, "total_avail      {}", tools::human_bytes(n(t, "total_avail_bytes")))?;
    writeln!(out, "total_space      {}", tools::human_bytes(n(t, "total_bytes")))?;
    Ok(())
}

/// `rados lspools`: the pools of the current map, by id.
fn lspools(client: &Client, fmt: Format) -> Result<()> {
    let map = client.monc.map().context("no cluster map from the monitor")?;
    let names: Vec<&str> = map.pools.values().map(|p| p.name.as_str()).collect();
    let mut out = std::io::stdout().lock();
    if fmt.is_json() {
        writeln!(out, "{}", fmt.json_text(&names))?;
    } else {
        for n in names {
            writeln!(out, "{n}")?;
        }
    }
    Ok(())
}

/// An object name for messages: long names are cut (the limit is 2 KiB; nobody reads that in an error).
fn shown(obj: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    match obj.char_indices().nth(SHOWN_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &obj[..cut]),
        None => obj.to_string(),
    }
}

fn dispatch(cli: &Cli, client: &Client, pool: &str, bench_size: Option<u64>) -> Result<()> {
    let io = ioctx(client, pool)?;
    let fmt = cli.tool.format;
    let json = fmt.is_json();
    let mut out = std::io::stdout().lock();
    match &cli.cmd {
        Cmd::Put { obj, file } => {
            put(client, &io, obj, file).with_context(|| format!("error putting {pool}/{}", shown(obj)))
        }
        Cmd::Get { obj, file } => {
            get(&io, obj, file).with_context(|| format!("error getting {pool}/{}", shown(obj)))
        }
        Cmd::Ls => {
            let mut cursor = None;
            let mut all = Vec::new();
            loop {
                let (names, next) = io.list(cursor.as_ref(), LIST_PAGE).context("error listing the pool")?;
                if json {
                    all.extend(names);
                } else {
                    for n in names {
                        writeln!(out, "{n}")?;
                    }
                }
                match next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            if json {
                let v: Vec<serde_json::Value> =
                    all.into_iter().map(|n| serde_json::json!({"namespace": "", "name": n})).collect();
                writeln!(out, "{}", fmt.json_text(&v))?;
            }
            Ok(())
        }
        Cmd::Rm { objs } => {
            for obj in objs {
                io.remove(obj)
                    .map_err(|e| anyhow!("error removing object '{}' from pool '{pool}': {e}", shown(obj)))?;
            }
            Ok(())
        }
        Cmd::Stat { obj } => {
            let (size, version) =
                io.stat(obj).with_context(|| format!("error stat-ing {pool}/{}", shown(obj)))?;
            if json {
                let v = serde_json::json!({"pool": pool, "name": obj, "size": size, "version": version});
                writeln!(out, "{}", fmt.json_text(&v))?;
            } else {
                writeln!(out, "{pool}/{obj} version {version}, size {size}")?;
            }
            Ok(())
        }
        Cmd::Setxattr { obj, name, value } => io
            .setxattr(obj, name, Bytes::copy_from_slice(value.as_bytes()))
            .with_context(|| format!("error setting xattr {pool}/{}/{name}", shown(obj))),
        Cmd::Getxattr { obj, name } => {
            let v = io
                .getxattr(obj, name)
                .with_context(|| format!("error getting xattr {pool}/{}/{name}", shown(obj)))?;
            // As Ceph: the raw value, no newline added.
            out.write_all(&v)?;
            Ok(())
        }
        Cmd::Listxattr { obj } => {
            let names = io
                .listxattrs(obj)
                .with_context(|| format!("error listing xattrs of {pool}/{}", shown(obj)))?;
            if json {
                writeln!(out, "{}", fmt.json_text(&names))?;
            } else {
                for n in names {
                    writeln!(out, "{n}")?;
                }
            }
            Ok(())
        }
        Cmd::Cleanup { prefix } => {
            drop(out);
            cleanup(&io, prefix)
        }
        Cmd::Df | Cmd::Lspools => unreachable!("answered without a pool"),
        Cmd::Listomapkeys { obj } => {
            let mut after = String::new();
            loop {
                let keys = io
                    .omap_get_keys(obj, &after, OMAP_PAGE)
                    .with_context(|| format!("error getting omap keys {pool}/{}", shown(obj)))?;
                for k in &keys {
                    writeln!(out, "{k}")?;
                }
                match keys.last() {
                    Some(last) if keys.len() == OMAP_PAGE as usize => after = last.clone(),
                    _ => break,
                }
            }
            Ok(())
        }
        Cmd::Bench { seconds, mode, concurrency, no_cleanup, .. } => {
            drop(out);
            let size = bench_size.expect("validated in run");
            let b = Bench { io: &io, seconds: *seconds, size, concurrency: *concurrency, fmt };
            match mode {
                BenchMode::Write => b.write(*no_cleanup),
                BenchMode::Seq => b.read(false),
                BenchMode::Rand => b.read(true),
            }
        }
    }
}

/// `rados cleanup`: removes every object of the pool whose name starts with `prefix` (by default what
/// `bench write --no-cleanup` left), and the benchmark metadata object, `CLEANUP_DEPTH` removes at a time.
fn cleanup(io: &IoCtx, prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        bail!("--prefix must not be empty (that would remove every object of the pool)");
    }
    let mut cursor = None;
    let mut victims = Vec::new();
    loop {
        let (names, next) = io.list(cursor.as_ref(), LIST_PAGE).context("error listing the pool")?;
        victims.extend(names.into_iter().filter(|n| n.starts_with(prefix)));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let mut removed = 0u64;
    let mut inflight = std::collections::VecDeque::new();
    let wait = |c: Completion, removed: &mut u64| -> Result<()> {
        match c.wait() {
            Ok(_) => *removed += 1,
            // Someone else removed it first: it is gone either way.
            Err(RadosError::NotFound) => {}
            Err(e) => return Err(e).context("error removing a benchmark object"),
        }
        Ok(())
    };
    for name in &victims {
        if inflight.len() >= CLEANUP_DEPTH {
            wait(inflight.pop_front().expect("non-empty"), &mut removed)?;
        }
        inflight.push_back(io.aio_remove(name)?);
    }
    for c in inflight {
        wait(c, &mut removed)?;
    }
    match io.remove(BENCH_METADATA) {
        Ok(()) | Err(RadosError::NotFound) => {}
        Err(e) => return Err(e).context("error removing the benchmark metadata"),
    }
    println!("Removed {removed} objects");
    Ok(())
}

/// Reads FILE (or stdin), refusing more than the largest object.
fn read_input(file: &str, max: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let n = if file == "-" {
        std::io::stdin().lock().take(max + 1).read_to_end(&mut buf).context("reading stdin")?
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot open {file}"))?;
        f.take(max + 1).read_to_end(&mut buf).with_context(|| format!("reading {file}"))?
    };
    if n as u64 > max {
        bail!("the input is larger than osd_max_object_size ({max} bytes)");
    }
    Ok(buf)
}

fn put(client: &Client, io: &IoCtx, obj: &str, file: &str) -> Result<()> {
    let data = Bytes::from(read_input(file, client.cfg.osd_max_object_size)?);
    // One atomic write_full when it fits in a single op; otherwise in pieces, as Ceph's `rados put` does.
    let chunk = client.cfg.osd_max_write_size.max(1);
    if data.len() as u64 <= chunk {
        io.write_full(obj, data)?;
        return Ok(());
    }
    let chunk = CHUNK_BYTES.min(chunk) as usize;
    io.write_full(obj, data.slice(..chunk))?;
    let mut at = chunk;
    while at < data.len() {
        let end = (at + chunk).min(data.len());
        io.write(obj, at as u64, data.slice(at..end))?;
        at = end;
    }
    Ok(())
}

fn get(io: &IoCtx, obj: &str, file: &str) -> Result<()> {
    // Write to a temporary file and rename at the end, so that a failed get leaves no partial file.
    let mut sink: Box<dyn Write> = if file == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        let tmp = format!("{file}.rados-get.tmp");
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| format!("cannot create {tmp}"))?,
        ))
    };
    let result = (|| -> Result<()> {
        let mut at = 0u64;
        loop {
            let piece = io.read(obj, at, CHUNK_BYTES)?;
            sink.write_all(&piece)?;
            at += piece.len() as u64;
            if (piece.len() as u64) < CHUNK_BYTES {
                break;
            }
        }
        sink.flush()?;
        Ok(())
    })();
    drop(sink);
    if file != "-" {
        let tmp = format!("{file}.rados-get.tmp");
        match &result {
            Ok(()) => std::fs::rename(&tmp, file).with_context(|| format!("cannot write {file}"))?,
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    result
}

// -------------------------------------------------------------------------------------------------------------
// rados bench

struct Bench<'a> {
    io: &'a IoCtx,
    seconds: u64,
    size: u64,
    concurrency: usize,
    fmt: Format,
}

/// What `bench write` leaves for `seq` and `rand`: `prefix=...`, `objects=N`, `object_size=S` lines.
#[derive(Debug, PartialEq)]
struct Metadata {
    prefix: String,
    objects: u64,
    object_size: u64,
}

impl Metadata {
    fn encode(&self) -> String {
        format!("prefix={}\nobjects={}\nobject_size={}\n", self.prefix, self.objects, self.object_size)
    }

    fn decode(s: &str) -> Result<Metadata> {
        let field = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                .ok_or_else(|| anyhow!("benchmark metadata has no {k}"))
        };
        let m = Metadata {
            prefix: field("prefix")?.to_string(),
            objects: field("objects")?.parse().context("benchmark metadata: bad objects")?,
            object_size: field("object_size")?.parse().context("benchmark metadata: bad object_size")?,
        };
        if m.objects > BENCH_OBJECTS_MAX {
            bail!("benchmark metadata names {} objects, more than {BENCH_OBJECTS_MAX}", m.objects);
        }
        Ok(m)
    }
}

fn object_name(prefix: &str, n: u64) -> String {
    format!("{prefix}_object{n}")
}

/// One finished op: its slot, how long it took, and whether it worked.
type Finished = (usize, Duration, Result<usize, RadosError>);

/// How `Bench::run` runs.
#[derive(Clone, Copy)]
struct RunOpts {
    /// Bytes each op moves (for bandwidth).
    op_size: u64,
    /// No progress lines.
    quiet: bool,
    /// An op on a missing object counts as done (cleanup).
    missing_ok: bool,
}

/// Counts and latencies as the bench runs.
struct Stats {
    start: Instant,
    op_size: u64,
    latencies: Vec<f64>,
    /// Completion times since `start`, in seconds.
    done_at: Vec<f64>,
    bytes: u64,
}

impl Stats {
    fn new(op_size: u64) -> Stats {
        Stats { start: Instant::now(), op_size, latencies: Vec::new(), done_at: Vec::new(), bytes: 0 }
    }

    fn record(&mut self, lat: Duration, bytes: usize) {
        self.latencies.push(lat.as_secs_f64());
        self.done_at.push(self.start.elapsed().as_secs_f64());
        self.bytes += bytes as u64;
    }
}

/// A progress line per second, like Ceph's.
struct Progress {
    json: bool,
    next_s: u64,
    last_finished: usize,
}

impl Progress {
    fn new(json: bool) -> Progress {
        if !json {
            println!("  sec Cur ops   started  finished  avg MB/s  cur MB/s last lat(s)  avg lat(s)");
        }
        Progress { json, next_s: 1, last_finished: 0 }
    }

    fn maybe_print(&mut self, s: &Stats, in_flight: usize, started: usize) {
        let elapsed = s.start.elapsed().as_secs_f64();
        if self.json || elapsed < self.next_s as f64 {
            return;
        }
        let finished = s.latencies.len();
        let mib = (1u64 << 20) as f64;
        let avg_mb = finished as f64 * s.op_size as f64 / mib / elapsed;
        let cur_mb = (finished - self.last_finished) as f64 * s.op_size as f64 / mib;
        let last = s.latencies.last().copied().unwrap_or(0.0);
        let avg = if finished > 0 { s.latencies.iter().sum::<f64>() / finished as f64 } else { 0.0 };
        println!(
            "{:>5} {:>7} {:>9} {:>9} {:>9.3} {:>9.3} {:>10.6} {:>11.6}",
            self.next_s - 1,
            in_flight,
            started,
            finished,
            avg_mb,
            cur_mb,
            last,
            avg
        );
        self.last_finished = finished;
        self.next_s = elapsed as u64 + 1;
    }
}

impl Bench<'_> {
    fn write(&self, no_cleanup: bool) -> Result<()> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let prefix = format!("benchmark_data_{host}_{}", std::process::id());
        if !self.fmt.is_json() {
            println!("hints = 1");
            println!(
                "Maintaining {} concurrent writes of {} bytes to objects of size {} for up to {} seconds or 0 objects",
                self.concurrency, self.size, self.size, self.seconds
            );
            println!("Object prefix: {prefix}");
        }
        // Every write sends the same buffer: no copy per op, and bench measures the cluster, not memcpy.
        let payload = Bytes::from(vec![b'c'; self.size as usize]);
        let deadline = Instant::now() + Duration::from_secs(self.seconds);
        let mut next = 0u64;
        let opts = RunOpts { op_size: self.size, quiet: false, missing_ok: false };
        let stats = self.run(deadline, opts, |_| {
            if next >= BENCH_OBJECTS_MAX {
                return None;
            }
            let name = object_name(&prefix, next);
            next += 1;
            Some((self.io.aio_write_full(&name, payload.clone()), self.size as usize))
        })?;
        let objects = next;
        let meta = Metadata { prefix: prefix.clone(), objects, object_size: self.size };
        self.io
            .write_full(BENCH_METADATA, meta.encode().into_bytes())
            .context("writing the benchmark metadata")?;
        self.report(&stats, "writes", "Write")?;
        if !no_cleanup {
            if !self.fmt.is_json() {
                println!("Cleaning up (deleting benchmark objects)");
            }
            let t = Instant::now();
            self.cleanup(&prefix, objects)?;
            if !self.fmt.is_json() {
                println!("Removed {objects} objects");
                println!("Clean up completed and total clean up time :{:.6}", t.elapsed().as_secs_f64());
            }
        }
        Ok(())
    }

    fn read(&self, random: bool) -> Result<()> {
        let meta = match self.io.read(BENCH_METADATA, 0, 0) {
            Ok(b) => Metadata::decode(&String::from_utf8_lossy(&b))?,
            Err(RadosError::NotFound) => bail!(
                "no benchmark data in pool {}: run `rados -p {} bench SECONDS write --no-cleanup` first",
                self.io.pool_name(),
                self.io.pool_name()
            ),
            Err(e) => return Err(e).context("reading the benchmark metadata"),
        };
        if meta.objects == 0 {
            bail!("the last `bench write` left no objects");
        }
        let deadline = Instant::now() + Duration::from_secs(self.seconds);
        let mut next = 0u64;
        let mut rng = tools::entropy() | 1;
        let size = meta.object_size;
        let opts = RunOpts { op_size: size, quiet: false, missing_ok: false };
        let stats = self.run(deadline, opts, |_| {
            let n = if random {
                // xorshift64: cheap and good enough to pick objects.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % meta.objects
            } else {
                if next >= meta.objects {
                    return None; // seq reads each object once.
                }
                next += 1;
                next - 1
            };
            Some((self.io.aio_read(&object_name(&meta.prefix, n), 0, size), size as usize))
        })?;
        self.report(&stats, "reads", "Read")
    }

    /// Keeps `concurrency` ops in flight until `deadline` (or until `submit` has no more), then waits for
    /// the last ones. `submit` starts an op and says how many bytes it should move.
    fn run(
        &self,
        deadline: Instant,
        opts: RunOpts,
        mut submit: impl FnMut(usize) -> Option<(Result<Completion, RadosError>, usize)>,
    ) -> Result<Stats> {
        let mut stats = Stats::new(opts.op_size);
        let mut progress = Progress::new(self.fmt.is_json() || opts.quiet);
        // At most `concurrency` completions are outstanding, so the callbacks never block on this channel.
        let (tx, rx) = crossbeam_channel::bounded::<Finished>(self.concurrency);
        let mut in_flight = 0usize;
        let mut started = 0usize;
        let mut exhausted = false;
        let mut first_error = None;
        let mut start_one = |slot: usize, in_flight: &mut usize, exhausted: &mut bool| -> Result<()> {
            // From before the submission: an op can complete before `aio_*` returns.
            let t0 = Instant::now();
            let Some((comp, want)) = submit(slot) else {
                *exhausted = true;
                return Ok(());
            };
            let comp = comp?;
            let tx = tx.clone();
            let missing_ok = opts.missing_ok;
            comp.on_complete(move |r| {
                let r = match r {
                    Err(RadosError::NotFound) if missing_ok => Ok(None),
                    r => r.map(Some),
                };
                let r = r.and_then(|reply| match reply.as_ref().and_then(|r| r.outs.first()) {
                    Some(rados::objecter::OpOutput::Data(d)) if d.len() != want => {
                        Err(RadosError::Protocol(format!("read {} bytes, expected {want}", d.len())))
                    }
                    _ => Ok(want),
                });
                let _ = tx.send((slot, t0.elapsed(), r));
            });
            *in_flight += 1;
            Ok(())
        };
        for slot in 0..self.concurrency {
            start_one(slot, &mut in_flight, &mut exhausted)?;
            if exhausted {
                break;
            }
            started += 1;
        }
        while in_flight > 0 {
            progress.maybe_print(&stats, in_flight, started);
            let Ok((slot, lat, r)) = rx.recv_timeout(Duration::from_millis(100)) else { continue };
            in_flight -= 1;
            match r {
                Ok(bytes) => stats.record(lat, bytes),
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            }
            if first_error.is_none() && !exhausted && Instant::now() < deadline {
                start_one(slot, &mut in_flight, &mut exhausted)?;
                if !exhausted {
                    started += 1;
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e).context("a benchmark op failed");
        }
        Ok(stats)
    }

    fn cleanup(&self, prefix: &str, objects: u64) -> Result<()> {
        let mut next = 0u64;
        // An object that a previous cleanup already removed is fine.
        let opts = RunOpts { op_size: 0, quiet: true, missing_ok: true };
        self.run(Instant::now() + Duration::from_secs(24 * 3600), opts, |_| {
            if next >= objects {
                return None;
            }
            next += 1;
            Some((self.io.aio_remove(&object_name(prefix, next - 1)), 0))
        })?;
        match self.io.remove(BENCH_METADATA) {
            Ok(()) | Err(RadosError::NotFound) => Ok(()),
            Err(e) => Err(e).context("removing the benchmark metadata"),
        }
    }

    fn report(&self, s: &Stats, made: &str, size_label: &str) -> Result<()> {
        let total = s.start.elapsed().as_secs_f64().max(1e-9);
        let ops = s.latencies.len();
        let mib = (1u64 << 20) as f64;
        let bw = s.bytes as f64 / mib / total;
        let iops = ops as f64 / total;
        // Per-second samples over the whole seconds of the run, as Ceph takes them.
        let whole = total.floor() as usize;
        let mut per_s = vec![0u64; whole.max(1)];
        for &t in &s.done_at {
            let i = t.floor() as usize;
            if i < per_s.len() {
                per_s[i] += 1;
            }
        }
        if whole == 0 {
            per_s[0] = ops as u64;
        }
        let iops_samples: Vec<f64> = per_s.iter().map(|&n| n as f64).collect();
        let bw_samples: Vec<f64> = iops_samples.iter().map(|n| n * s.op_size as f64 / mib).collect();
        let (lat_avg, lat_sd) = mean_stddev(&s.latencies);
        let lat_max = s.latencies.iter().copied().fold(0.0, f64::max);
        let lat_min = s.latencies.iter().copied().fold(f64::INFINITY, f64::min);
        let lat_min = if lat_min.is_finite() { lat_min } else { 0.0 };
        let (_, bw_sd) = mean_stddev(&bw_samples);
        let (_, iops_sd) = mean_stddev(&iops_samples);
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        if self.fmt.is_json() {
            let v = serde_json::json!({
                "total_time_run": total,
                "total_ops": ops,
                "op_size": s.op_size,
                "object_size": s.op_size,
                "bandwidth_mb_per_s": bw,
                "bandwidth_mb_per_s_stddev": bw_sd,
                "bandwidth_mb_per_s_max": max(&bw_samples),
                "bandwidth_mb_per_s_min": min(&bw_samples),
                "iops": iops,
                "iops_stddev": iops_sd,
                "iops_max": max(&iops_samples),
                "iops_min": min(&iops_samples),
                "lat_s_avg": lat_avg,
                "lat_s_stddev": lat_sd,
                "lat_s_max": lat_max,
                "lat_s_min": lat_min,
            });
            println!("{}", self.fmt.json_text(&v));
            return Ok(());
        }
        let mut o = std::io::stdout().lock();
        writeln!(o, "Total time run:         {total:.4}")?;
        writeln!(o, "{:<24}{ops}", format!("Total {made} made:"))?;
        writeln!(o, "{:<24}{}", format!("{size_label} size:"), s.op_size)?;
        writeln!(o, "Object size:            {}", s.op_size)?;
        writeln!(o, "Bandwidth (MB/sec):     {bw:.3}")?;
        writeln!(o, "Stddev Bandwidth:       {bw_sd:.4}")?;
        writeln!(o, "Max bandwidth (MB/sec): {:.3}", max(&bw_samples))?;
        writeln!(o, "Min bandwidth (MB/sec): {:.3}", min(&bw_samples))?;
        writeln!(o, "Average IOPS:           {}", iops.round() as u64)?;
        writeln!(o, "Stddev IOPS:            {iops_sd:.4}")?;
        writeln!(o, "Max IOPS:               {}", max(&iops_samples) as u64)?;
        writeln!(o, "Min IOPS:               {}", min(&iops_samples) as u64)?;
        writeln!(o, "Average Latency(s):     {lat_avg:.6}")?;
        writeln!(o, "Stddev Latency(s):      {lat_sd:.6}")?;
        writeln!(o, "Max latency(s):         {lat_max:.6}")?;
        writeln!(o, "Min latency(s):         {lat_min:.6}")?;
        Ok(())
    }
}

/// Mean and sample standard deviation (0 for fewer than two values).
fn mean_stddev(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_metadata_round_trips_and_rejects_garbage() {
        // Goal: what `bench write` leaves, `seq`/`rand` read back; a damaged metadata object is an error.
        let m = Metadata { prefix: "benchmark_data_h_1".into(), objects: 42, object_size: 4096 };
        assert_eq!(Metadata::decode(&m.encode()).unwrap(), m);
        assert!(Metadata::decode("prefix=x\nobjects=many\nobject_size=1\n").is_err());
        assert!(Metadata::decode("prefix=x\n").is_err());
        assert!(Metadata::decode("prefix=x\nobjects=999999999999\nobject_size=1\n").is_err());
    }

    #[test]
    fn mean_and_stddev() {
        // Goal: the summary's statistics are the sample mean and standard deviation.
        assert_eq!(mean_stddev(&[]), (0.0, 0.0));
        assert_eq!(mean_stddev(&[3.0]), (3.0, 0.0));
        let (m, sd) = mean_stddev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((sd - 2.138).abs() < 1e-3);
    }

    #[test]
    fn command_lines_parse_like_cephs() {
        // Goal: the Ceph spellings parse, with -p anywhere. Method: clap on sample command lines.
        let c = Cli::try_parse_from(["rados", "-p", "rbd", "bench", "10", "write", "-b", "4K", "-t", "16"])
            .unwrap();
        assert!(matches!(c.cmd, Cmd::Bench { seconds: 10, mode: BenchMode::Write, concurrency: 16, .. }));
        let c = Cli::try_parse_from(["rados", "put", "obj", "-", "--pool", "rbd"]).unwrap();
        assert_eq!(c.pool.as_deref(), Some("rbd"));
        let c = Cli::try_parse_from(["rados", "-p", "rbd", "bench", "5", "seq", "--format", "json"]).unwrap();
        assert!(c.tool.format == Format::Json);
        assert!(Cli::try_parse_from(["rados", "-p", "rbd", "bench", "5", "sideways"]).is_err());
        assert!(Cli::try_parse_from(["rados", "-p", "rbd", "rm"]).is_err());
    }
}
