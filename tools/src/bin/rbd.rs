//! rbd: manage block images on a cuttle pool, shaped like Ceph's `rbd` tool.
//!
//!     rbd [--conf PATH] create --size 10G [--object-size 4M] [--stripe-unit 64K --stripe-count 4] POOL/IMAGE
//!     rbd ls [-l] [POOL] | info POOL/IMAGE | du POOL/IMAGE | rm POOL/IMAGE | rename SRC DST
//!     rbd resize --size N [--allow-shrink] POOL/IMAGE
//!     rbd import FILE|- POOL/IMAGE | export POOL/IMAGE FILE|-
//!     rbd bench --io-type read|write|readwrite [--io-size 4K] [--io-threads 16] [--io-total 1G]
//!               [--io-pattern seq|rand] POOL/IMAGE
//!     rbd map POOL/IMAGE [--socket PATH | --port N] [--read-only] | showmapped [--all] | unmap POOL/IMAGE|URI
//!
//! A size without a unit is in MiB, as Ceph's (`--size 10` is 10 MiB). An image spec without a pool means the
//! pool `-p` names, else `rbd`. `map` plays rbd-nbd's role without a kernel device: it
//! starts this binary again as a background NBD server (the hidden `nbd-serve` command) in its own process
//! group, with a pidfile, a log and a mapping record under the run directory ($CUTTLE_RBD_RUN_DIR, else
//! $XDG_RUNTIME_DIR/cuttle-rbd-nbd, else /tmp/cuttle-rbd-nbd), and prints the NBD URI. The run directory is
//! shared by every cluster on the machine, so a mapping is keyed by its cluster (fsid), pool id and image
//! id: `showmapped`, `unmap` and `map` see only the mappings of the cluster their config names
//! (`showmapped --all` lists every cluster's), and `unmap` refuses another cluster's mapping.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use rados::objecter::{ObjectOperation, RadosError};
use rbd::image::{AioCompletion, CreateOptions, Image, ImageInfo, ImageOptions, ObjecterBudget, Rbd};
use rbd::nbd::server::{ListenAddr, Server};
use serde::{Deserialize, Serialize};
use tools::{ClusterClient as Client, Format, ToolArgs};

const DEFAULT_POOL: &str = "rbd";
/// Bytes per request when importing and exporting.
const COPY_CHUNK_BYTES: u64 = 4 << 20;
/// Granularity of hole detection: all-zero blocks of this size are skipped on import and seeked over on
/// export.
const SPARSE_BLOCK_BYTES: usize = 64 << 10;
/// Requests in flight during import, export and du.
const COPY_DEPTH: usize = 8;
const STAT_DEPTH: usize = 64;
/// Most `--io-threads` bench accepts.
const BENCH_THREADS_MAX: usize = 1024;
/// How long `map` waits for the server to listen, and `unmap` for it to exit before SIGKILL.
const MAP_TIMEOUT: Duration = Duration::from_secs(30);
const UNMAP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(name = "rbd", about = "Manage cuttle block images and map them over NBD", version)]
struct Cli {
    #[command(flatten)]
    tool: ToolArgs,
    /// The pool of image specs that name none, and of `ls` (default: rbd).
    #[arg(short = 'p', long = "pool", global = true)]
    pool: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image.
    Create {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
        /// Image size: a number of MiB, or with a K/M/G/T suffix.
        #[arg(short = 's', long)]
        size: String,
        /// Object size, a power of two from 4K to 32M (default 4M).
        #[arg(long)]
        object_size: Option<String>,
        /// Bytes of one stripe unit (with --stripe-count; K/M suffixes).
        #[arg(long)]
        stripe_unit: Option<String>,
        /// Objects a stripe spans (with --stripe-unit).
        #[arg(long)]
        stripe_count: Option<u32>,
    },
    /// List the images of a pool (default: rbd).
    #[command(alias = "list")]
    Ls {
        /// The pool (else -p, else rbd).
        pool: Option<String>,
        /// One line per image with its size and format, as Ceph's `rbd ls -l`.
        #[arg(short = 'l', long)]
        long: bool,
    },
    /// Show an image's size, layout and id.
    Info {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
    },
    /// Provisioned and used bytes of an image (used: the sizes of its existing data objects).
    Du {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
    },
    /// Remove an image and its data.
    #[command(alias = "remove")]
    Rm {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
    },
    /// Rename an image within its pool.
    #[command(alias = "mv")]
    Rename {
        /// The image's spec now.
        src: String,
        /// Its new spec, in the same pool.
        dst: String,
    },
    /// Change an image's size.
    Resize {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
        /// The new size: a number of MiB, or with a K/M/G/T suffix.
        #[arg(short = 's', long)]
        size: String,
        /// Allow a smaller size (the data past it is lost).
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Create an image from FILE (`-`: stdin); all-zero blocks are not written.
    Import {
        /// The file to read (`-`: stdin).
        file: String,
        /// The new image: POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
    },
    /// Write an image to FILE (`-`: stdout); holes stay holes in a file.
    Export {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
        /// The file to write (`-`: stdout).
        file: String,
    },
    /// Measure image I/O.
    Bench {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
        /// What to do: read, write or readwrite.
        #[arg(long, value_enum)]
        io_type: IoType,
        /// Bytes per I/O (K/M suffixes).
        #[arg(long, default_value = "4K")]
        io_size: String,
        /// I/Os in flight at once.
        #[arg(long, default_value_t = 16)]
        io_threads: usize,
        /// Bytes to move in all (K/M/G suffixes).
        #[arg(long, default_value = "1G")]
        io_total: String,
        /// Where the I/Os go: seq or rand.
        #[arg(long, value_enum, default_value_t = IoPattern::Seq)]
        io_pattern: IoPattern,
        /// Percentage of reads in readwrite mode.
        #[arg(long, default_value_t = 50)]
        rw_mix_read: u32,
    },
    /// Serve an image over NBD in the background and print its URI.
    Map {
        /// POOL/IMAGE, or IMAGE in the default pool.
        spec: String,
        /// Unix socket path (default: IMAGE's socket in the run directory).
        #[arg(long, conflicts_with = "port")]
        socket: Option<PathBuf>,
        /// Listen on 127.0.0.1:PORT instead (0: any free port).
        #[arg(long)]
        port: Option<u16>,
        /// Serve the image read-only.
        #[arg(long)]
        read_only: bool,
        /// Also attach a kernel NBD device: /dev/nbdN, or `auto` for the first free one (needs the nbd
        /// kernel module and root); prints the device instead of the URI.
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
    },
    /// List this cluster's mapped images.
    Showmapped {
        /// List every cluster's mappings on this machine, each with its cluster's fsid.
        #[arg(long)]
        all: bool,
    },
    /// Stop the NBD server of a mapped image (by POOL/IMAGE, URI or /dev/nbdN), detaching its device.
    Unmap {
        /// POOL/IMAGE, the NBD URI or the device.
        target: String,
    },
    /// The background NBD server `map` starts.
    #[command(hide = true)]
    NbdServe {
        spec: String,
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        read_only: bool,
        #[arg(long)]
        device: Option<String>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum IoType {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Reads and writes, mixed by --rw-mix-read.
    Readwrite,
}

impl IoType {
    fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Readwrite => "readwrite",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum IoPattern {
    /// One offset after the other.
    Seq,
    /// Random offsets.
    Rand,
}

impl IoPattern {
    fn name(self) -> &'static str {
        match self {
            IoPattern::Seq => "seq",
            IoPattern::Rand => "rand",
        }
    }
}

fn main() {
    tools::quiet_on_broken_pipe();
    let cli = Cli::parse();
    if let Some(p) = &cli.pool {
        DEFAULT_POOL_ARG.set(p.clone()).expect("set once, here");
    }
    tools::exit_with("rbd", run(cli))
}

/// The pool `-p` named for specs without one, else `rbd`; set once in `main`, before any spec is parsed.
static DEFAULT_POOL_ARG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn default_pool() -> &'static str {
    DEFAULT_POOL_ARG.get().map_or(DEFAULT_POOL, String::as_str)
}

/// POOL/IMAGE or IMAGE (in the default pool).
fn parse_spec(spec: &str) -> Result<(String, String)> {
    let (pool, image) = match spec.split_once('/') {
        Some((p, i)) => (p, i),
        None => (default_pool(), spec),
    };
    if pool.is_empty() || image.is_empty() {
        bail!("bad image spec {spec:?}: expected POOL/IMAGE");
    }
    rbd::image::validate_name(image).map_err(|e| anyhow!("{e}"))?;
    Ok((pool.to_string(), image.to_string()))
}

fn size_arg(what: &str, s: &str) -> Result<u64> {
    tools::parse_size(s).with_context(|| format!("invalid {what} {s:?}"))
}

/// An image size as Ceph's rbd reads it: a bare number is MiB (`--size 10`), else a K/M/G/T suffix.
fn image_size_arg(what: &str, s: &str) -> Result<u64> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let mib: u64 = t.parse().with_context(|| format!("invalid {what} {s:?}: too large"))?;
        return mib.checked_mul(1 << 20).with_context(|| format!("invalid {what} {s:?}: too large"));
    }
    size_arg(what, s)
}

fn rbd_pool(client: &Client, pool: &str) -> Result<Rbd> {
    Ok(Rbd::new(&client.objecter, pool)
        .map_err(|e| anyhow!("error opening pool {pool}: {e}"))?
        .with_objecter_budget(ObjecterBudget::from_config(&client.cfg)))
}

/// Opens an image with the cache and read-ahead the config's `rbd_cache*` and `rbd_readahead_*` options
/// ask for.
fn open_image(client: &Client, pool: &str, image: &str) -> Result<(Rbd, Image)> {
    let rbd = rbd_pool(client, pool)?;
    let img = rbd
        .open_with(image, image_options(client)?)
        .map_err(|e| anyhow!("error opening image {pool}/{image}: {e}"))?;
    Ok((rbd, img))
}

fn image_options(client: &Client) -> Result<ImageOptions> {
    ImageOptions::from_config(&client.cfg).map_err(|e| anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<()> {
    // Commands that need no cluster, and argument checks that should fail before connecting.
    match &cli.cmd {
        Cmd::Showmapped { all } => return showmapped(&cli, *all),
        Cmd::Unmap { target } => return unmap(&cli, target),
        Cmd::Map { spec, socket, port, read_only, device } => {
            return map(&cli, spec, socket.as_deref(), *port, *read_only, device.as_deref())
        }
        _ => {}
    }
    let (cfg, conf_path) = cli.tool.config()?;
    let pre = precheck(&cli.cmd)?;
    if let Cmd::NbdServe { .. } = &cli.cmd {
        tools::init_logging(
            &cfg.log_level,
            false,
            std::env::var_os("CUTTLE_RBD_LOG").map(PathBuf::from).as_deref(),
        )?;
    }
    let client = Client::connect(&cfg, &conf_path)?;
    dispatch(&cli, &client, pre)
}

/// Values parsed before connecting.
#[derive(Default)]
struct Pre {
    size: u64,
    opts: CreateOptions,
    io_size: u64,
    io_total: u64,
}

fn precheck(cmd: &Cmd) -> Result<Pre> {
    let mut p = Pre::default();
    match cmd {
        Cmd::Create { spec, size, object_size, stripe_unit, stripe_count } => {
            parse_spec(spec)?;
            p.size = image_size_arg("--size", size)?;
            if let Some(os) = object_size {
                let b = size_arg("--object-size", os)?;
                if !b.is_power_of_two() {
                    bail!("invalid --object-size {os:?}: must be a power of two (4K to 32M)");
                }
                p.opts.order = Some(b.trailing_zeros());
            }
            if let Some(su) = stripe_unit {
                p.opts.stripe_unit = Some(size_arg("--stripe-unit", su)?);
            }
            p.opts.stripe_count = *stripe_count;
            if p.opts.stripe_unit.is_some() != p.opts.stripe_count.is_some() {
                bail!("--stripe-unit and --stripe-count go together");
            }
            p.opts.layout().map_err(|e| anyhow!("{e}"))?;
        }
        Cmd::Resize { spec, size, .. } => {
            parse_spec(spec)?;
            p.size = image_size_arg("--size", size)?;
        }
        Cmd::Bench { spec, io_size, io_threads, io_total, rw_mix_read, .. } => {
            parse_spec(spec)?;
            p.io_size = size_arg("--io-size", io_size)?;
            p.io_total = size_arg("--io-total", io_total)?;
            if p.io_size == 0 || p.io_size > 32 << 20 {
                bail!("invalid --io-size {io_size:?}: must be 1 byte to 32M");
            }
            if !(1..=BENCH_THREADS_MAX).contains(io_threads) {
                bail!("--io-threads {io_threads}: must be 1 to {BENCH_THREADS_MAX}");
            }
            if *rw_mix_read > 100 {
                bail!("--rw-mix-read {rw_mix_read}: must be 0 to 100");
            }
        }
        Cmd::Info { spec } | Cmd::Du { spec } | Cmd::Rm { spec } | Cmd::Export { spec, .. } => {
            parse_spec(spec)?;
        }
        Cmd::Import { spec, file } => {
            parse_spec(spec)?;
            if file != "-" && !Path::new(file).is_file() {
                bail!("cannot import {file}: no such file");
            }
        }
        Cmd::Rename { src, dst } => {
            let (a, _) = parse_spec(src)?;
            let (b, _) = parse_spec(dst)?;
            if a != b {
                bail!("rename within one pool only ({a} vs {b})");
            }
        }
        _ => {}
    }
    Ok(p)
}

fn dispatch(cli: &Cli, client: &Client, pre: Pre) -> Result<()> {
    let fmt = cli.tool.format;
    let json = fmt.is_json();
    match &cli.cmd {
        Cmd::Create { spec, .. } => {
            let (pool, image) = parse_spec(spec)?;
            rbd_pool(client, &pool)?
                .create(&image, pre.size, pre.opts)
                .map_err(|e| anyhow!("error creating {pool}/{image}: {e}"))?;
        }
        Cmd::Ls { pool, long } => {
            let pool = pool.as_deref().unwrap_or(default_pool());
            let rbd = rbd_pool(client, pool)?;
            let mut names = rbd.list().map_err(|e| anyhow!("error listing {pool}: {e}"))?;
            names.sort();
            if *long {
                ls_long(&rbd, pool, &names, fmt)?;
            } else if json {
                println!("{}", fmt.json_text(&names));
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
        Cmd::Info { spec } => {
            let (pool, image) = parse_spec(spec)?;
            let info = rbd_pool(client, &pool)?
                .info(&image)
                .map_err(|e| anyhow!("error opening {pool}/{image}: {e}"))?;
            print_info(&info, fmt)?;
        }
        Cmd::Du { spec } => {
            let (pool, image) = parse_spec(spec)?;
            du(client, &pool, &image, fmt)?;
        }
        Cmd::Rm { spec } => {
            let (pool, image) = parse_spec(spec)?;
            let fsid = client.cfg.fsid.trim();
            if let Some(m) =
                mappings()?.into_iter().find(|m| m.fsid == fsid && m.pool == pool && m.image == image)
            {
                bail!("{pool}/{image} is mapped (pid {}, {}): unmap it first", m.pid, m.uri);
            }
            let mut listing = tools::Progress::counting("Finding the image's objects");
            let mut removing = tools::Progress::new("Removing image", None);
            rbd_pool(client, &pool)?
                .remove_with(&image, &mut |p| match p {
                    rbd::image::Progress::Listed { objects } => listing.update(objects),
                    rbd::image::Progress::Removed { done, total } => {
                        listing.finish();
                        removing.set_total(total);
                        removing.update(done);
                    }
                })
                .map_err(|e| anyhow!("error removing {pool}/{image}: {e}"))?;
            removing.finish();
        }
        Cmd::Rename { src, dst } => {
            let (pool, a) = parse_spec(src)?;
            let (_, b) = parse_spec(dst)?;
            rbd_pool(client, &pool)?
                .rename(&a, &b)
                .map_err(|e| anyhow!("error renaming {src} to {dst}: {e}"))?;
        }
        Cmd::Resize { spec, allow_shrink, .. } => {
            let (pool, image) = parse_spec(spec)?;
            let (_, img) = open_image(client, &pool, &image)?;
            img.resize(pre.size, *allow_shrink).map_err(|e| anyhow!("error resizing {pool}/{image}: {e}"))?;
            img.close();
        }
        Cmd::Import { file, spec } => {
            let (pool, image) = parse_spec(spec)?;
            import(client, file, &pool, &image)?;
        }
        Cmd::Export { spec, file } => {
            let (pool, image) = parse_spec(spec)?;
            export(client, &pool, &image, file)?;
        }
        Cmd::Bench { spec, io_type, io_threads, io_pattern, rw_mix_read, .. } => {
            let (pool, image) = parse_spec(spec)?;
            let (_, img) = open_image(client, &pool, &image)?;
            let img = Arc::new(img);
            let b = BenchArgs {
                io_type: *io_type,
                io_size: pre.io_size,
                threads: *io_threads,
                total: pre.io_total,
                pattern: *io_pattern,
                rw_mix_read: *rw_mix_read,
            };
            let r = bench(Arc::clone(&img), &b, fmt);
            img.close();
            r?;
        }
        Cmd::NbdServe { spec, socket, port, read_only, device } => {
            let (pool, image) = parse_spec(spec)?;
            let device = device.as_deref().map(device_index).transpose()?;
            nbd_serve(client, &pool, &image, socket.clone(), *port, *read_only, device)?;
        }
        Cmd::Map { .. } | Cmd::Showmapped { .. } | Cmd::Unmap { .. } => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

/// `rbd ls -l`: name, size, parent, format, protection and lock of each image (Ceph's columns; cuttle has
/// no clones, snapshots or locks, so those columns are empty).
fn ls_long(rbd: &Rbd, pool: &str, names: &[String], fmt: Format) -> Result<()> {
    let mut rows = Vec::new();
    for n in names {
        match rbd.info(n) {
            Ok(i) => rows.push(i),
            // Removed between the listing and now.
            Err(rbd::image::RbdError::NoSuchImage(_)) => {}
            Err(e) => bail!("error opening {pool}/{n}: {e}"),
        }
    }
    if fmt.is_json() {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|i| serde_json::json!({"image": i.name, "id": i.id, "size": i.size, "format": 2}))
            .collect();
        println!("{}", fmt.json_text(&v));
        return Ok(());
    }
    let width = rows.iter().map(|i| i.name.len()).max().unwrap_or(0).max(4);
    println!("{:<width$}  {:>9}  {:<6}  {:<3}  {:<4}  LOCK", "NAME", "SIZE", "PARENT", "FMT", "PROT");
    for i in &rows {
        println!("{:<width$}  {:>9}  {:<6}  {:<3}  {:<4}", i.name, tools::human_bytes(i.size), "", 2, "");
    }
    Ok(())
}

fn print_info(i: &ImageInfo, fmt: Format) -> Result<()> {
    if fmt.is_json() {
        let v = serde_json::json!({
            "name": i.name, "id": i.id, "size": i.size, "objects": i.num_objs, "order": i.order,
            "object_size": i.object_size, "block_name_prefix": i.block_name_prefix, "format": 2,
            "features": i.features, "stripe_unit": i.stripe_unit, "stripe_count": i.stripe_count,
            "create_timestamp": i.created_unix_s,
        });
        println!("{}", fmt.json_text(&v));
        return Ok(());
    }
    println!("rbd image '{}':", i.name);
    println!("\tsize {} in {} objects", tools::human_bytes(i.size), i.num_objs);
    println!("\torder {} ({} objects)", i.order, tools::human_bytes(i.object_size));
    println!("\tid: {}", i.id);
    println!("\tblock_name_prefix: {}", i.block_name_prefix);
    println!("\tformat: 2");
    println!("\tfeatures: {:#x}", i.features);
    if i.stripe_unit != i.object_size || i.stripe_count != 1 {
        println!("\tstripe unit: {}", tools::human_bytes(i.stripe_unit));
        println!("\tstripe count: {}", i.stripe_count);
    }
    println!("\tcreate_timestamp: {}", i.created_unix_s);
    Ok(())
}

/// `rbd du`: the image's size and the bytes of its data objects that exist. The objects are found by
/// listing the pool (`Rbd::data_objects`), not by trying every object the image could have.
fn du(client: &Client, pool: &str, image: &str, fmt: Format) -> Result<()> {
    let rbd = rbd_pool(client, pool)?;
    let info = rbd.info(image).map_err(|e| anyhow!("error opening {pool}/{image}: {e}"))?;
    let io = rbd.ioctx();
    let mut listing = tools::Progress::counting("Finding the image's objects");
    let objects = rbd
        .data_objects(&info.id, &mut |p| {
            if let rbd::image::Progress::Listed { objects } = p {
                listing.update(objects)
            }
        })
        .map_err(|e| anyhow!("error listing the objects of {pool}/{image}: {e}"))?;
    listing.finish();
    let mut progress = tools::Progress::new("Calculating image usage", Some(objects.len() as u64));
    let mut used = 0u64;
    let mut done = 0u64;
    let mut inflight = VecDeque::new();
    let mut collect = |c: rados::objecter::Completion| -> Result<()> {
        match c.wait() {
            Ok(r) => used += r.stat(0)?.0,
            Err(RadosError::NotFound) => {}
            Err(e) => bail!("stat: {e}"),
        }
        done += 1;
        progress.update(done);
        Ok(())
    };
    // Objects past the image's end (left by a shrink that was cut short) are not the image's data.
    for n in objects.into_iter().filter(|&n| n < info.num_objs) {
        let oid = rbd::striper::object_name(&info.id, n);
        inflight.push_back(io.aio_operate(&oid, ObjectOperation::new().stat())?);
        if inflight.len() >= STAT_DEPTH {
            collect(inflight.pop_front().expect("non-empty"))?;
        }
    }
    for c in inflight {
        collect(c)?;
    }
    progress.finish();
    if fmt.is_json() {
        let v = serde_json::json!({"images": [{"name": image, "provisioned_size": info.size, "used_size": used}]});
        println!("{}", fmt.json_text(&v));
    } else {
        println!("{:<20} {:>12} {:>12}", "NAME", "PROVISIONED", "USED");
        println!("{:<20} {:>12} {:>12}", image, tools::human_bytes(info.size), tools::human_bytes(used));
    }
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Non-zero runs of `buf` (at `SPARSE_BLOCK_BYTES` granularity) as (start, end).
fn data_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(SPARSE_BLOCK_BYTES).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let s = i * SPARSE_BLOCK_BYTES;
        let e = s + block.len();
        match runs.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => runs.push((s, e)),
        }
    }
    runs
}

fn wait_oldest(q: &mut VecDeque<AioCompletion<()>>) -> Result<()> {
    if let Some(c) = q.pop_front() {
        c.wait().map_err(|e| anyhow!("write: {e}"))?;
    }
    Ok(())
}

fn import(client: &Client, file: &str, pool: &str, image: &str) -> Result<()> {
    let rbd = rbd_pool(client, pool)?;
    let (mut input, size): (Box<dyn Read>, Option<u64>) = if file == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {file}"))?;
        let len = f.metadata()?.len();
        (Box::new(f), Some(len))
    };
    rbd.create(image, size.unwrap_or(0), CreateOptions::default())
        .map_err(|e| anyhow!("error creating {pool}/{image}: {e}"))?;
    let img = rbd
        .open_with(image, image_options(client)?)
        .map_err(|e| anyhow!("error opening {pool}/{image}: {e}"))?;
    let r = (|| -> Result<()> {
        let mut progress = tools::Progress::new("Importing image", size);
        let mut offset = 0u64;
        let mut q = VecDeque::new();
        loop {
            let mut buf = vec![0u8; COPY_CHUNK_BYTES as usize];
            let n = read_full(&mut input, &mut buf).with_context(|| format!("reading {file}"))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if size.is_none() {
                // A stream's length is known only as it arrives: grow the image with it.
                img.resize(offset + n as u64, false).map_err(|e| anyhow!("growing the image: {e}"))?;
            }
            let data = Bytes::from(buf);
            for (s, e) in data_runs(&data) {
                q.push_back(img.aio_write(offset + s as u64, data.slice(s..e)).map_err(|e| anyhow!("{e}"))?);
                while q.len() > COPY_DEPTH {
                    wait_oldest(&mut q)?;
                }
            }
            offset += n as u64;
            progress.update(offset);
        }
        while !q.is_empty() {
            wait_oldest(&mut q)?;
        }
        img.flush().map_err(|e| anyhow!("flush: {e}"))?;
        progress.finish();
        Ok(())
    })();
    img.close();
    r.with_context(|| format!("importing {file} into {pool}/{image}"))
}

fn export(client: &Client, pool: &str, image: &str, file: &str) -> Result<()> {
    let (_, img) = open_image(client, pool, image)?;
    let size = img.size();
    let r = (|| -> Result<()> {
        let mut out: Box<dyn Write> = if file == "-" {
            Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
        } else {
            Box::new(std::fs::File::create(file).with_context(|| format!("creating {file}"))?)
        };
        // A file can have holes; seek needs the File itself, so keep a second handle.
        let mut seekable =
            if file == "-" { None } else { Some(std::fs::OpenOptions::new().write(true).open(file)?) };
        let mut q: VecDeque<(u64, AioCompletion<Bytes>)> = VecDeque::new();
        let mut progress = tools::Progress::new("Exporting image", Some(size));
        let mut next = 0u64;
        let mut pos = 0u64;
        loop {
            while q.len() < COPY_DEPTH && next < size {
                let len = COPY_CHUNK_BYTES.min(size - next);
                q.push_back((next, img.aio_read(next, len).map_err(|e| anyhow!("{e}"))?));
                next += len;
            }
            let Some((off, c)) = q.pop_front() else { break };
            let data = c.wait().map_err(|e| anyhow!("read at {off}: {e}"))?;
            progress.update(off + data.len() as u64);
            match seekable.as_mut() {
                None => out.write_all(&data)?,
                Some(f) => {
                    for (s, e) in data_runs(&data) {
                        f.seek(SeekFrom::Start(off + s as u64))?;
                        f.write_all(&data[s..e])?;
                    }
                    pos = off + data.len() as u64;
                }
            }
        }
        match seekable.as_mut() {
            // The tail may be a hole: the length makes it part of the file.
            Some(f) => f.set_len(pos.max(size))?,
            None => out.flush()?,
        }
        progress.finish();
        Ok(())
    })();
    img.close();
    r.with_context(|| format!("exporting {pool}/{image} to {file}"))
}

struct BenchArgs {
    io_type: IoType,
    io_size: u64,
    threads: usize,
    total: u64,
    pattern: IoPattern,
    rw_mix_read: u32,
}

/// One `rbd bench` run, driven by completions: `--io-threads` ops are started, and each completion (on a
/// messenger thread) records its latency and starts the next op, so no bench thread is woken per op (Ceph's
/// `rbd bench` likewise keeps `io_threads` aio ops in flight from one thread).
struct BenchRun {
    img: Arc<Image>,
    io_size: u64,
    slots: u64,
    total_ops: u64,
    pattern: IoPattern,
    io_type: IoType,
    rw_mix_read: u32,
    seed: u64,
    payload: Bytes,
    next: AtomicU64,
    done_ops: AtomicU64,
    /// Chains of ops still running (one per `--io-threads`); the run is over when it reaches 0.
    chains: AtomicU64,
    failed: AtomicBool,
    first_err: parking_lot::Mutex<Option<String>>,
    lats: parking_lot::Mutex<Vec<u32>>,
    /// Chains handed back to the main thread: a completion that ran inside its own submission (a cache hit)
    /// would otherwise start the next op recursively.
    deferred: crossbeam_channel::Sender<()>,
}

thread_local! {
    static BENCH_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl BenchRun {
    /// Starts the next op of one chain, or ends the chain.
    fn issue(self: &Arc<Self>) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.total_ops || self.failed.load(Ordering::Relaxed) {
            self.chains.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // splitmix64 of the op number: every op gets its own random slot, whichever thread starts it.
        let r = messenger::util::mix64(self.seed.wrapping_add(i.wrapping_mul(messenger::util::GOLDEN_GAMMA)));
        let slot = match self.pattern {
            IoPattern::Seq => i % self.slots,
            IoPattern::Rand => r % self.slots,
        };
        let read = match self.io_type {
            IoType::Read => true,
            IoType::Write => false,
            IoType::Readwrite => (r >> 32) % 100 < u64::from(self.rw_mix_read),
        };
        let t0 = Instant::now();
        let me = Arc::clone(self);
        let offset = slot * self.io_size;
        let started = if read {
            self.img.aio_read_with(offset, self.io_size, move |r| me.finish(t0, r.map(|_| ())))
        } else {
            self.img.aio_write_with(offset, self.payload.clone(), move |r| me.finish(t0, r))
        };
        if let Err(e) = started {
            self.fail(e.to_string());
            self.chains.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn finish(self: &Arc<Self>, t0: Instant, r: rbd::image::Result<()>) {
        match r {
            Ok(()) => {
                self.lats.lock().push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                self.done_ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(e.to_string()),
        }
        let depth = BENCH_DEPTH.with(|d| d.get());
        if depth >= 8 {
            // Completed inside a submission several times over: let the main thread continue this chain.
            if self.deferred.send(()).is_err() {
                self.chains.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        }
        BENCH_DEPTH.with(|d| d.set(depth + 1));
        self.issue();
        BENCH_DEPTH.with(|d| d.set(depth));
    }

    fn fail(&self, e: String) {
        self.failed.store(true, Ordering::Relaxed);
        self.first_err.lock().get_or_insert(e);
    }
}

fn bench(img: Arc<Image>, b: &BenchArgs, fmt: Format) -> Result<()> {
    let json = fmt.is_json();
    let size = img.size();
    if size < b.io_size {
        bail!("the image ({size} bytes) is smaller than --io-size ({})", b.io_size);
    }
    let total_ops = b.total.div_ceil(b.io_size).max(1);
    if !json {
        let pattern = if b.pattern == IoPattern::Seq { "sequential" } else { "random" };
        println!(
            "bench  type {} io_size {} io_threads {} bytes {} pattern {pattern}",
            b.io_type.name(),
            b.io_size,
            b.threads,
            total_ops * b.io_size
        );
        println!("  SEC       OPS   OPS/SEC   BYTES/SEC");
    }
    let (deferred, deferred_rx) = crossbeam_channel::unbounded();
    let run = Arc::new(BenchRun {
        img: Arc::clone(&img),
        io_size: b.io_size,
        slots: size / b.io_size,
        total_ops,
        pattern: b.pattern,
        io_type: b.io_type,
        rw_mix_read: b.rw_mix_read,
        seed: tools::entropy(),
        payload: Bytes::from(vec![0x5au8; b.io_size as usize]),
        next: AtomicU64::new(0),
        done_ops: AtomicU64::new(0),
        chains: AtomicU64::new(b.threads as u64),
        failed: AtomicBool::new(false),
        first_err: parking_lot::Mutex::new(None),
        lats: parking_lot::Mutex::new(Vec::with_capacity(total_ops.min(1 << 24) as usize)),
        deferred,
    });
    let start = Instant::now();
    for _ in 0..b.threads {
        run.issue();
    }
    // Per-second progress, like Ceph's; continues chains handed back by completions.
    let mut sec = 1u64;
    let mut last_ops = 0u64;
    while run.chains.load(Ordering::Acquire) > 0 {
        if deferred_rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            run.issue();
        }
        if start.elapsed() >= Duration::from_secs(sec) {
            let ops = run.done_ops.load(Ordering::Relaxed);
            if !json {
                let rate = (ops - last_ops) as f64;
                println!(
                    "{sec:>5} {ops:>9} {rate:>9.2} {:>11}/s",
                    tools::human_bytes((rate as u64) * b.io_size)
                );
            }
            last_ops = ops;
            sec += 1;
        }
    }
    let first_err = run.first_err.lock().take();
    let mut lats = std::mem::take(&mut *run.lats.lock());
    if let Some(e) = first_err {
        bail!("bench I/O failed: {e}");
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let ops = lats.len() as u64;
    lats.sort_unstable();
    let avg = lats.iter().map(|&l| l as f64).sum::<f64>() / (ops.max(1) as f64);
    let p99 =
        lats.get(((ops as f64 * 0.99) as usize).min(lats.len().saturating_sub(1))).copied().unwrap_or(0);
    let ops_per_s = ops as f64 / elapsed;
    let bytes_per_s = ops_per_s * b.io_size as f64;
    if json {
        let v = serde_json::json!({
                "io_type": b.io_type.name(), "io_size": b.io_size,
                "io_threads": b.threads, "io_pattern": b.pattern.name(),
                "ops": ops, "elapsed_s": elapsed, "ops_per_s": ops_per_s, "bytes_per_s": bytes_per_s,
                "lat_us_avg": avg, "lat_us_p99": p99,
                "rbd_cache": img.options().cache.enabled, "queue_depth": img.queue_depth(),
        });
        println!("{}", fmt.json_text(&v));
    } else {
        println!(
            "elapsed: {:.0}   ops: {ops}   ops/sec: {ops_per_s:.2}   bytes/sec: {}/s",
            elapsed,
            tools::human_bytes(bytes_per_s as u64)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// map / showmapped / unmap

/// What `map` records for `showmapped` and `unmap` (`<fsid>.<pool id>.<image id>.json` in the run
/// directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mapping {
    /// The cluster the image belongs to. Empty in records written before mappings were keyed by cluster:
    /// those belong to no cluster, and only `showmapped --all` lists them.
    #[serde(default)]
    fsid: String,
    pool: String,
    image: String,
    #[serde(default)]
    pool_id: u32,
    #[serde(default)]
    image_id: String,
    pid: u32,
    /// The server's start time (`/proc/PID/stat` field 22): with the pid, names the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_time: Option<u64>,
    uri: String,
    read_only: bool,
    /// The kernel device attached, `/dev/nbdN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

impl Mapping {
    fn key(&self) -> MappingKey {
        MappingKey { fsid: self.fsid.clone(), pool_id: self.pool_id, image_id: self.image_id.clone() }
    }

    /// The server is alive and is the one this record was written for (not a process that took its pid).
    fn server_alive(&self) -> bool {
        tools::process_is(tools::PidRecord { pid: self.pid, start_time: self.start_time }, &server_owner())
            .is_ok()
    }
}

/// What names a mapping on this machine: its cluster, pool and image (by id: a renamed image is the same
/// image, and another cluster's image of the same name is not).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MappingKey {
    fsid: String,
    pool_id: u32,
    image_id: String,
}

impl MappingKey {
    /// The key of `pool`/`image_id` in the client's cluster.
    fn new(client: &Client, pool: &str, image_id: &str) -> Result<MappingKey> {
        let fsid = client.cfg.fsid.trim().to_string();
        // Both become file names: only what a uuid and an image id are made of.
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !plain(&fsid) {
            bail!("the config's fsid {fsid:?} is not a cluster id (run `cuttle up` to create a cluster)");
        }
        if !plain(image_id) {
            bail!("image {pool} has an unusable id {image_id:?}");
        }
        let map = client.monc.map().ok_or_else(|| anyhow!("no cluster map"))?;
        let pool_id = map.pool_by_name(pool).ok_or_else(|| anyhow!("pool {pool} does not exist"))?.id.0;
        Ok(MappingKey { fsid, pool_id, image_id: image_id.to_string() })
    }

    fn file(&self, ext: &str) -> PathBuf {
        run_dir().join(format!("{}.{}.{}.{ext}", self.fsid, self.pool_id, self.image_id))
    }

    /// Removes every file of the mapping: record, pidfile, socket and log.
    fn remove_files(&self) {
        for ext in ["json", "pid", "sock", "log"] {
            let _ = std::fs::remove_file(self.file(ext));
        }
    }
}

/// The process an NBD server's pidfile and record are for.
fn server_owner() -> tools::PidOwner {
    tools::PidOwner { program: "rbd".into(), arg: "nbd-serve".into() }
}

fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CUTTLE_RBD_RUN_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("cuttle-rbd-nbd"),
        _ => PathBuf::from("/tmp/cuttle-rbd-nbd"),
    }
}

/// Live mappings of every cluster on this machine; records of dead servers (kill -9) are cleaned on the way,
/// with their logs.
fn mappings() -> Result<Vec<Mapping>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_dir()) else { return Ok(out) };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        let Ok(m) = serde_json::from_str::<Mapping>(&text) else {
            let _ = std::fs::remove_file(&p);
            continue;
        };
        if m.server_alive() {
            out.push(m);
        } else if m.fsid.is_empty() {
            let _ = std::fs::remove_file(&p);
        } else {
            m.key().remove_files();
        }
    }
    out.sort_by(|a, b| (&a.fsid, &a.pool, &a.image).cmp(&(&b.fsid, &b.pool, &b.image)));
    Ok(out)
}

/// The fsid of the cluster the tool's config names.
fn config_fsid(cli: &Cli) -> Result<String> {
    let (cfg, path) = cli.tool.config()?;
    let fsid = cfg.fsid.trim().to_string();
    if fsid.is_empty() {
        bail!("{} names no cluster (no fsid)", path.display());
    }
    Ok(fsid)
}

/// `--device`'s value: `auto` for the first free device, else `/dev/nbdN`.
fn device_index(arg: &str) -> Result<Option<u32>> {
    if arg == "auto" {
        return Ok(None);
    }
    match rbd::nbd::kernel::parse_device(arg) {
        Some(n) => Ok(Some(n)),
        None => bail!("--device {arg}: expected /dev/nbdN, or auto for the first free device"),
    }
}

fn map(
    cli: &Cli,
    spec: &str,
    socket: Option<&Path>,
    port: Option<u16>,
    read_only: bool,
    device: Option<&str>,
) -> Result<()> {
    let (pool, image) = parse_spec(spec)?;
    if let Some(d) = device {
        let index = device_index(d)?;
        // Before anything starts: a host without the driver (or a user without the right) hears it at once.
        rbd::nbd::kernel::check_driver().map_err(|e| anyhow!("--device: {e}"))?;
        if let Some(n) = index {
            let path = rbd::nbd::kernel::device_path(n).display().to_string();
            if let Some(m) = mappings()?.into_iter().find(|m| m.device.as_deref() == Some(path.as_str())) {
                bail!("{path} is already attached to {}/{} (pid {})", m.pool, m.image, m.pid);
            }
        }
    }
    let (cfg, conf_path) = cli.tool.config()?;
    let conf_path = std::fs::canonicalize(&conf_path).unwrap_or(conf_path);
    // Which image this is, by id, in which cluster: the mapping's key.
    let key = {
        let client = Client::connect(&cfg, &conf_path)?;
        let id = rbd_pool(&client, &pool)?
            .image_id(&image)
            .map_err(|e| anyhow!("error opening image {pool}/{image}: {e}"))?;
        MappingKey::new(&client, &pool, &id)?
    };
    let dir = run_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(m) = mappings()?.into_iter().find(|m| m.key() == key) {
        bail!("{pool}/{image} is already mapped (pid {}): {}", m.pid, m.uri);
    }
    let log = key.file("log");
    let _ = std::fs::remove_file(key.file("json"));
    let exe = std::env::current_exe().context("finding the rbd binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--conf").arg(&conf_path).arg("nbd-serve").arg(format!("{pool}/{image}"));
    match (socket, port) {
        (Some(s), _) => {
            let s = if s.is_absolute() { s.to_path_buf() } else { std::env::current_dir()?.join(s) };
            cmd.arg("--socket").arg(s);
        }
        (None, Some(p)) => {
            cmd.arg("--port").arg(p.to_string());
        }
        (None, None) => {}
    }
    if read_only {
        cmd.arg("--read-only");
    }
    if let Some(d) = device {
        cmd.arg("--device").arg(d);
    }
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .env("CUTTLE_RBD_RUN_DIR", &dir)
        .env("CUTTLE_RBD_LOG", &log)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(logf)
        .process_group(0)
        .spawn()
        .context("starting the NBD server")?;
    let pid = child.id();
    let t = Instant::now();
    loop {
        if let Some(m) = mappings()?.into_iter().find(|m| m.pid == pid) {
            println!("{}", m.device.as_ref().unwrap_or(&m.uri));
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // The server's own error line (`rbd: ...`, from `exit_with`) says why; the log lines around it
            // are the messenger's and stay in the log.
            if let Some(why) = text.lines().rev().find_map(|l| l.strip_prefix("rbd: ")) {
                bail!("{why}");
            }
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let _ = std::fs::remove_file(&log);
            bail!("the NBD server for {pool}/{image} exited ({st}):\n{}", tail.join("\n"));
        }
        if t.elapsed() > MAP_TIMEOUT {
            let _ = child.kill();
            bail!(
                "the NBD server for {pool}/{image} did not start within {MAP_TIMEOUT:?} (log: {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nbd_serve(
    client: &Client,
    pool: &str,
    image: &str,
    socket: Option<PathBuf>,
    port: Option<u16>,
    read_only: bool,
    device: Option<Option<u32>>,
) -> Result<()> {
    let stop = tools::termination_flag()?;
    let (_, img) = open_image(client, pool, image)?;
    let key = MappingKey::new(client, pool, img.id())?;
    // The pidfile is the lock on the mapping: a second server for the same image of the same cluster refuses
    // to start.
    let _pid = tools::PidFile::create(&key.file("pid"), &server_owner())?;
    let img = Arc::new(img);
    let addr = match (socket, port) {
        (Some(s), _) => ListenAddr::Unix(s),
        (None, Some(p)) => ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], p))),
        (None, None) => ListenAddr::Unix(key.file("sock")),
    };
    // Served on the client's messenger workers: requests and the OSD traffic they cause share threads.
    let server = Server::bind(Arc::clone(&img), image, &addr, read_only, Arc::clone(&client.pool))
        .map_err(|e| anyhow!("{e}"))?;
    let attached = match device {
        Some(index) => Some(attach_device(&server, &img, index)?),
        None => None,
    };
    let me = tools::PidRecord::current();
    let m = Mapping {
        fsid: client.cfg.fsid.trim().to_string(),
        pool: pool.into(),
        image: image.into(),
        pool_id: key.pool_id,
        image_id: img.id().to_string(),
        pid: me.pid,
        start_time: me.start_time,
        uri: server.local_addr().uri(image),
        read_only,
        device: attached.as_ref().map(|(n, _)| rbd::nbd::kernel::device_path(*n).display().to_string()),
    };
    // Written whole then renamed, so a reader never sees half a record.
    let rec = key.file("json");
    let tmp = rec.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&m)?)?;
    std::fs::rename(&tmp, &rec)?;
    tracing::info!(uri = %m.uri, device = ?m.device, "serving");
    let r = match attached {
        None => server.run(&stop),
        Some((index, conn)) => {
            // The device goes first: the driver sends NBD_CMD_DISC after what it has in flight, then the
            // server drains as for any stop. A device detached from elsewhere ends the mapping too.
            let server_stop = Arc::new(AtomicBool::new(false));
            let (stop, server_stop2) = (Arc::clone(&stop), Arc::clone(&server_stop));
            let watcher = std::thread::Builder::new().name("nbd-device".into()).spawn(move || {
                while !stop.load(Ordering::Acquire) && conn.is_open() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if conn.is_open() {
                    if let Err(e) = rbd::nbd::kernel::disconnect(index) {
                        tracing::error!("detaching /dev/nbd{index}: {e}");
                    }
                    let t = Instant::now();
                    while conn.is_open() && t.elapsed() < UNMAP_TIMEOUT {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                } else {
                    tracing::info!("/dev/nbd{index} was detached; stopping");
                }
                server_stop2.store(true, Ordering::Release);
            })?;
            let r = server.run(&server_stop);
            let _ = watcher.join();
            r
        }
    };
    let _ = std::fs::remove_file(&rec);
    img.flush().map_err(|e| anyhow!("final flush: {e}"))?;
    img.close();
    tracing::info!("stopped");
    r.map_err(|e| anyhow!("{e}"))
}

/// Hands one end of a socket pair to a kernel NBD device and serves the other: `index`'s device, or the
/// first free one. Returns the device's index and the connection.
fn attach_device(
    server: &Server,
    img: &Image,
    index: Option<u32>,
) -> Result<(u32, rbd::nbd::server::Attached)> {
    use std::os::fd::AsFd;
    let (ours, kernels) = std::os::unix::net::UnixStream::pair().context("creating a socket pair")?;
    let conn = server.attach(ours).map_err(|e| anyhow!("{e}"))?;
    let spec = rbd::nbd::kernel::ConnectSpec {
        index,
        size_bytes: img.size(),
        block_size: 512,
        flags: server.transmission_flags(),
        timeout: None,
    };
    let n =
        rbd::nbd::kernel::connect(&spec, kernels.as_fd()).map_err(|e| anyhow!("attaching a device: {e}"))?;
    Ok((n, conn))
}

fn showmapped(cli: &Cli, all: bool) -> Result<()> {
    let mut ms = mappings()?;
    if !all {
        let fsid = config_fsid(cli)?;
        ms.retain(|m| m.fsid == fsid);
    }
    if cli.tool.format.is_json() {
        println!("{}", cli.tool.format.json_text(&ms));
        return Ok(());
    }
    let cluster = |m: &Mapping| if m.fsid.is_empty() { "-".to_string() } else { m.fsid.clone() };
    if all {
        print!("{:<37} ", "CLUSTER");
    }
    println!("{:<8} {:<10} {:<20} {:<4} {:<11} URI", "PID", "POOL", "IMAGE", "RO", "DEVICE");
    for m in ms {
        if all {
            print!("{:<37} ", cluster(&m));
        }
        println!(
            "{:<8} {:<10} {:<20} {:<4} {:<11} {}",
            m.pid,
            m.pool,
            m.image,
            if m.read_only { "yes" } else { "no" },
            m.device.as_deref().unwrap_or("-"),
            m.uri
        );
    }
    Ok(())
}

fn unmap(cli: &Cli, target: &str) -> Result<()> {
    let fsid = config_fsid(cli)?;
    let ms = mappings()?;
    let matching: Vec<Mapping> = if target.starts_with("nbd") {
        ms.into_iter().filter(|m| m.uri == target).collect()
    } else if target.starts_with("/dev/") {
        ms.into_iter().filter(|m| m.device.as_deref() == Some(target)).collect()
    } else {
        let (pool, image) = parse_spec(target)?;
        ms.into_iter().filter(|m| m.pool == pool && m.image == image).collect()
    };
    let (ours, theirs): (Vec<Mapping>, Vec<Mapping>) = matching.into_iter().partition(|m| m.fsid == fsid);
    let Some(m) = ours.into_iter().next() else {
        if let Some(o) = theirs.first() {
            let whose = if o.fsid.is_empty() {
                "no known cluster".to_string()
            } else {
                format!("cluster {}", o.fsid)
            };
            bail!(
                "{target} is not mapped from this cluster ({fsid}); the mapping (pid {}) belongs to {whose}: \
                 unmap it with that cluster's --conf",
                o.pid
            );
        }
        // A device whose server died (kill -9) stays attached to a dead socket until it is disconnected.
        if let Some(n) = rbd::nbd::kernel::parse_device(target) {
            return rbd::nbd::kernel::disconnect(n).map_err(|e| anyhow!("{target} is not mapped here: {e}"));
        }
        bail!("{target} is not mapped")
    };
    let rec = tools::PidRecord { pid: m.pid, start_time: m.start_time };
    // Every signal goes to the server this record names, checked just before: never to a process that took
    // its pid.
    let kill = |sig: &str| -> Result<()> {
        if m.server_alive() {
            std::process::Command::new("kill")
                .args([sig, &m.pid.to_string()])
                .status()
                .context("running kill")?;
        }
        Ok(())
    };
    kill("-TERM")?;
    let t = Instant::now();
    while tools::process_is(rec, &server_owner()).is_ok() {
        if t.elapsed() > UNMAP_TIMEOUT {
            eprintln!(
                "rbd: warning: the NBD server (pid {}) did not exit within {UNMAP_TIMEOUT:?}; killing it",
                m.pid
            );
            kill("-KILL")?;
            std::thread::sleep(Duration::from_millis(100));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    m.key().remove_files();
    Ok(())
}
