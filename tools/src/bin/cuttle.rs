//! `cuttle`: cluster administration. `cuttle up` starts a local cluster (a monitor and N OSDs on 127.0.0.1,
//! everything under one directory); the other commands talk to the monitor, like `ceph`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use messenger::{EntityName, Messenger, WorkerPool};
use rados::config::{Config, CONF_FILE, DEFAULT_DIR, OPTIONS};
use rados::monclient::MonClient;
use rados::msg::{LogLevel, MonCommand};
use rados::placement::{object_to_pg, Placement};
use rados::OsdId;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "cuttle", about = "Administer a cuttle cluster", version)]
struct Cli {
    #[command(flatten)]
    tool: ToolArgs,
    /// Cluster status (`cuttle -s`, as `ceph -s`).
    #[arg(short = 's', long = "status")]
    status: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

use tools::{Format, ToolArgs};

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster: a monitor and N OSDs on 127.0.0.1, data under DIR; returns at HEALTH_OK. On an
    /// existing cluster, starts whichever of its daemons are not running.
    Up {
        /// The cluster's directory: data, logs, pidfiles and cuttle.toml.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// OSDs the cluster should have (default: 3 for a new cluster, else as many as DIR holds); more than
        /// DIR holds adds OSDs, fewer is refused.
        #[arg(long)]
        osds: Option<u32>,
        /// Write a config option into cuttle.toml (repeatable), e.g. --set osd_heartbeat_grace=3.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Give up waiting for HEALTH_OK after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Stop the cluster started by `cuttle up` in DIR.
    Down {
        /// The cluster's directory.
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Start one daemon of the local cluster (osd.N or mon.X), like `systemctl start ceph-osd@N`.
    Start(DaemonCmd),
    /// Stop one daemon of the local cluster; it tells the monitor it is going.
    Stop(DaemonCmd),
    /// Stop and start one daemon of the local cluster.
    Restart(DaemonCmd),
    /// Cluster status.
    Status,
    /// Health, with reasons (`health detail`: each affected OSD and PG).
    Health {
        #[command(subcommand)]
        detail: Option<HealthCmd>,
    },
    /// How many daemons run each version.
    Versions,
    /// Space used and available, for the cluster and per pool (like `ceph df`).
    Df,
    /// OSD commands.
    Osd {
        #[command(subcommand)]
        cmd: OsdCmd,
    },
    /// Pool commands.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Follow the cluster log.
    Watch,
    /// The last N cluster log entries.
    Log {
        /// How many entries.
        #[arg(default_value_t = 20)]
        n: usize,
    },
    /// Configuration.
    // Without this, clap's own `help` subcommand shadows `config help` (it printed clap's usage instead of the
    // options).
    // clap leaves a subcommand named `help` out of the Commands section, so it is listed here by hand.
    #[command(
        disable_help_subcommand = true,
        override_usage = "cuttle config [OPTIONS] <COMMAND>",
        after_help = "Commands:\n  help  Every option with its default and meaning"
    )]
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(clap::Args)]
struct DaemonCmd {
    /// osd.N or mon.X
    daemon: String,
    /// The cluster's directory (default: the directory of --conf, else ./cuttle-data).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum OsdCmd {
    /// The OSD hierarchy with up/down status.
    Tree,
    /// The OSD map.
    Dump,
    /// Where an object lives: its PG and its up and acting OSDs.
    Map {
        /// The pool.
        pool: String,
        /// The object's name.
        object: String,
    },
    /// Mark an OSD out (its data moves elsewhere).
    Out {
        /// The OSD: 2 or osd.2.
        #[arg(value_parser = parse_osd_id)]
        id: OsdId,
    },
    /// Mark an OSD in.
    In {
        /// The OSD: 2 or osd.2.
        #[arg(value_parser = parse_osd_id)]
        id: OsdId,
    },
    /// Mark an OSD down (it will boot again if it is alive).
    Down {
        /// The OSD: 2 or osd.2.
        #[arg(value_parser = parse_osd_id)]
        id: OsdId,
    },
    /// Heartbeat round-trip times, front and back, as each OSD last reported them.
    PingTimes,
    /// Space per OSD: size, raw use, data, omap, meta, available, %use, PGs (like `ceph osd df`).
    Df,
}

#[derive(Subcommand)]
enum HealthCmd {
    /// Each failing check with the OSDs and PGs it concerns.
    Detail,
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Create a replicated pool.
    Create {
        /// The pool's name.
        name: String,
        /// Replicas per object (default: osd_pool_default_size).
        #[arg(long)]
        size: Option<u8>,
        /// Replicas needed to serve I/O (default: size - size/2).
        #[arg(long)]
        min_size: Option<u8>,
        /// Placement groups (default: osd_pool_default_pg_num).
        #[arg(long)]
        pg_num: Option<u32>,
    },
    /// List the pools.
    Ls,
    /// Delete a pool: give its name twice and --yes-i-really-really-mean-it.
    Rm {
        /// The pool's name.
        name: String,
        /// The pool's name again.
        name_again: Option<String>,
        /// Confirms that the pool's data is to be destroyed.
        #[arg(long = "yes-i-really-really-mean-it")]
        confirm: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Every option with its default and meaning.
    Help,
}

/// An OSD id as Ceph takes it: `2` or `osd.2`.
fn parse_osd_id(s: &str) -> Result<OsdId, String> {
    let n = s.strip_prefix("osd.").unwrap_or(s);
    n.parse::<u32>().map(OsdId).map_err(|_| format!("expected an OSD id such as 2 or osd.2, not {s:?}"))
}

const MON_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the cluster: a small messenger and a MonClient.
struct Client {
    cfg: Config,
    monc: Arc<MonClient>,
    msgr: Arc<Messenger>,
    pool: Arc<WorkerPool>,
}

impl Client {
    fn connect(conf: Option<&Path>) -> Result<Client> {
        let (cfg, path) = Config::discover(conf)?;
        Client::with_config(cfg).with_context(|| format!("using {}", path.display()))
    }

    fn with_config(cfg: Config) -> Result<Client> {
        let mon = cfg.mon_host.ok_or_else(|| anyhow!("mon_host is not set in the config"))?;
        let pool = WorkerPool::new(1).context("starting the messenger")?;
        let msgr = Arc::new(Messenger::new(
            Arc::clone(&pool),
            EntityName::client(tools::entropy() >> 16),
            tools::entropy(),
            cfg.messenger(),
        ));
        msgr.start()?;
        let monc = MonClient::start(Arc::clone(&msgr), mon, false);
        Ok(Client { cfg, monc, msgr, pool })
    }

    fn mon_addr(&self) -> SocketAddr {
        self.monc.mon_addr()
    }

    fn command(&self, cmd: MonCommand) -> Result<Value> {
        let text = self.monc.command(cmd, MON_TIMEOUT).map_err(|e| match e {
            rados::monclient::MonClientError::Timeout { .. } => {
                anyhow!(
                    "cannot reach the monitor at {} (is the cluster up? try `cuttle up`)",
                    self.mon_addr()
                )
            }
            e => anyhow!(e),
        })?;
        serde_json::from_str(&text).with_context(|| format!("the monitor sent malformed JSON: {text}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.monc.shutdown();
        self.msgr.shutdown();
        self.msgr.wait();
        self.pool.shutdown();
    }
}

fn main() {
    tools::quiet_on_broken_pipe();
    tools::exit_with("cuttle", run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    let conf = cli.tool.conf.as_deref();
    let fmt = cli.tool.format;
    let cmd = match (cli.cmd, cli.status) {
        (Some(cmd), _) => cmd,
        (None, true) => Cmd::Status,
        (None, false) => {
            use clap::CommandFactory;
            Cli::command().print_help()?;
            bail!("no command given");
        }
    };
    match cmd {
        Cmd::Up { dir, osds, set, timeout } => up(&dir, osds, &set, Duration::from_secs(timeout)),
        Cmd::Down { dir } => down(&dir),
        Cmd::Start(d) => {
            let (local, name) = daemon_target(&d, conf)?;
            local.start_one(&name)
        }
        Cmd::Stop(d) => {
            let (local, name) = daemon_target(&d, conf)?;
            local.stop_one(&name)
        }
        Cmd::Restart(d) => {
            let (local, name) = daemon_target(&d, conf)?;
            local.stop_one(&name)?;
            local.start_one(&name)
        }
        Cmd::Config { cmd: ConfigCmd::Help } => {
            if fmt.is_json() {
                let v: Vec<Value> = OPTIONS
                    .iter()
                    .map(|o| json!({"name": o.name, "default": o.default_value(), "help": o.help}))
                    .collect();
                println!("{}", fmt.json_text(&v));
            } else {
                for o in OPTIONS {
                    println!("{:<34} {:<22} {}", o.name, o.default_value(), o.help);
                }
            }
            Ok(())
        }
        cmd => {
            let c = Client::connect(conf)?;
            client_command(&c, cmd, fmt)
        }
    }
}

fn client_command(c: &Client, cmd: Cmd, fmt: Format) -> Result<()> {
    let out = |v: &Value, plain: &dyn Fn(&Value) -> String| {
        if fmt.is_json() {
            println!("{}", fmt.json_text(v));
        } else {
            print!("{}", plain(v));
        }
    };
    match cmd {
        Cmd::Status => out(&c.command(MonCommand::Status)?, &plain_status),
        Cmd::Health { detail: None } => out(&c.command(MonCommand::Health)?, &plain_health),
        Cmd::Health { detail: Some(HealthCmd::Detail) } => {
            out(&c.command(MonCommand::HealthDetail)?, &plain_health_detail)
        }
        Cmd::Versions => out(&c.command(MonCommand::Versions)?, &|v| fmt_pretty(v)),
        Cmd::Osd { cmd: OsdCmd::Tree } => out(&c.command(MonCommand::OsdTree)?, &plain_tree),
        Cmd::Osd { cmd: OsdCmd::Dump } => out(&c.command(MonCommand::OsdDump)?, &plain_osd_dump),
        Cmd::Osd { cmd: OsdCmd::PingTimes } => out(&c.command(MonCommand::OsdPingTimes)?, &plain_ping_times),
        Cmd::Osd { cmd: OsdCmd::Df } => out(&c.command(MonCommand::OsdDf)?, &plain_osd_df),
        Cmd::Df => out(&c.command(MonCommand::Df)?, &plain_df),
        Cmd::Osd { cmd: OsdCmd::Map { pool, object } } => out(&osd_map(c, &pool, &object)?, &plain_osd_map),
        Cmd::Osd { cmd: OsdCmd::Out { id } } => {
            done(c.command(MonCommand::OsdOut(id))?, &format!("marked out {id}"))
        }
        Cmd::Osd { cmd: OsdCmd::In { id } } => {
            done(c.command(MonCommand::OsdIn(id))?, &format!("marked in {id}"))
        }
        Cmd::Osd { cmd: OsdCmd::Down { id } } => {
            done(c.command(MonCommand::OsdDown(id))?, &format!("marked down {id}"))
        }
        Cmd::Pool { cmd: PoolCmd::Create { name, size, min_size, pg_num } } => {
            let v = c.command(MonCommand::PoolCreate { name: name.clone(), size, min_size, pg_num })?;
            done(v, &format!("pool '{name}' created"))
        }
        Cmd::Pool { cmd: PoolCmd::Ls } => out(&c.command(MonCommand::PoolLs)?, &plain_pool_ls),
        Cmd::Pool { cmd: PoolCmd::Rm { name, name_again, confirm } } => {
            if name_again.as_deref() != Some(name.as_str()) || !confirm {
                bail!(
                    "deleting pool '{name}' destroys its data: run `cuttle pool rm {name} {name} --yes-i-really-really-mean-it`"
                );
            }
            done(
                c.command(MonCommand::PoolRm { name: name.clone(), confirm })?,
                &format!("pool '{name}' removed"),
            )
        }
        Cmd::Log { n } => out(&c.command(MonCommand::Log { n })?, &plain_log),
        Cmd::Watch => watch(c, fmt)?,
        Cmd::Up { .. }
        | Cmd::Down { .. }
        | Cmd::Start(_)
        | Cmd::Stop(_)
        | Cmd::Restart(_)
        | Cmd::Config { .. } => unreachable!("handled without a client"),
    }
    Ok(())
}

/// What a changing command says: the monitor's own words when it sent some (`pool 'x' already exists`,
/// `osd.2 is already out.`), else `fallback`.
fn done(v: Value, fallback: &str) {
    match v["message"].as_str() {
        Some(m) => println!("{m}"),
        None => println!("{fallback}"),
    }
}

fn fmt_pretty(v: &Value) -> String {
    format!("{}\n", Format::JsonPretty.json_text(v))
}

/// `ceph health detail`: the summary line, then each check with its detail lines.
fn plain_health_detail(v: &Value) -> String {
    let checks = v["checks"].as_object();
    let summaries: Vec<&str> =
        checks.into_iter().flatten().filter_map(|(_, c)| c["summary"]["message"].as_str()).collect();
    let status = v["status"].as_str().unwrap_or("HEALTH_UNKNOWN");
    let mut s = if summaries.is_empty() {
        format!("{status}\n")
    } else {
        format!("{status} {}\n", summaries.join("; "))
    };
    for (code, c) in checks.into_iter().flatten() {
        let sev = match c["severity"].as_str() {
            Some("HEALTH_ERR") => "ERR",
            _ => "WRN",
        };
        s.push_str(&format!("[{sev}] {code}: {}\n", c["summary"]["message"].as_str().unwrap_or("")));
        for d in c["detail"].as_array().into_iter().flatten() {
            s.push_str(&format!("    {}\n", d["message"].as_str().unwrap_or("")));
        }
    }
    s
}

/// `ceph osd dump` in plain format: the map's epoch and fsid, a line per pool, per OSD and per upmap item.
fn plain_osd_dump(v: &Value) -> String {
    let mut s = format!("epoch {}\nfsid {}\n", v["epoch"], v["fsid"].as_str().unwrap_or("?"));
    for p in v["pools"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "pool {} '{}' replicated size {} min_size {} pg_num {} pgp_num {}\n",
            p["pool"],
            p["pool_name"].as_str().unwrap_or("?"),
            p["size"],
            p["min_size"],
            p["pg_num"],
            p["pg_placement_num"]
        ));
    }
    s.push_str(&format!("max_osd {}\n", v["max_osd"]));
    for o in v["osds"].as_array().into_iter().flatten() {
        let word = |k: &str, yes: &'static str, no: &'static str| if o[k] == 1 { yes } else { no };
        let addr = |k: &str| o[k].as_str().unwrap_or("-").to_string();
        s.push_str(&format!(
            "osd.{} {:<4} {:<3} weight {} host {} public {} cluster {} hb_back {} hb_front {} {} {}\n",
            o["osd"],
            word("up", "up", "down"),
            word("in", "in", "out"),
            o["weight"],
            o["host"].as_str().unwrap_or("?"),
            addr("public_addr"),
            addr("cluster_addr"),
            addr("heartbeat_back_addr"),
            addr("heartbeat_front_addr"),
            o["state"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(","),
            o["uuid"].as_str().unwrap_or("")
        ));
    }
    for u in v["pg_upmap_items"].as_array().into_iter().flatten() {
        let pairs: Vec<String> = u["mappings"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!("{},{}", m["from"], m["to"]))
            .collect();
        s.push_str(&format!("pg_upmap_items {} [{}]\n", u["pgid"].as_str().unwrap_or("?"), pairs.join(",")));
    }
    s
}

fn plain_health(v: &Value) -> String {
    let mut s = format!("{}\n", v["status"].as_str().unwrap_or("HEALTH_UNKNOWN"));
    // Ceph's shape: checks keyed by code, each with a severity and a summary message.
    if let Some(checks) = v["checks"].as_object() {
        for (code, c) in checks {
            let msg = c["summary"]["message"].as_str().unwrap_or("");
            s.push_str(&format!("    [{}] {code}: {msg}\n", c["severity"].as_str().unwrap_or("?")));
        }
    }
    s
}

fn plain_status(v: &Value) -> String {
    let m = &v["osdmap"];
    let mut s = String::new();
    s.push_str("  cluster:\n");
    s.push_str(&format!("    id:     {}\n", v["fsid"].as_str().unwrap_or("?")));
    s.push_str(&format!("    health: {}", plain_health(&v["health"]).replace('\n', "\n        ")));
    s = s.trim_end().to_string();
    s.push_str("\n\n  services:\n");
    let quorum: Vec<String> = v["quorum_names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    s.push_str(&format!(
        "    mon: {} daemons, quorum {} (age {})\n",
        v["monmap"]["num_mons"],
        quorum.join(","),
        fmt_age(v["quorum_age"].as_u64().unwrap_or(0))
    ));
    s.push_str(&format!(
        "    osd: {} osds: {} up, {} in (epoch e{})\n",
        m["num_osds"], m["num_up_osds"], m["num_in_osds"], m["epoch"]
    ));
    if let Some(pg) = v.get("pgmap") {
        let n = |k: &str| pg[k].as_u64().unwrap_or(0);
        s.push_str("\n  data:\n");
        s.push_str(&format!("    pools:   {} pools, {} pgs\n", pg["num_pools"], pg["num_pgs"]));
        s.push_str(&format!(
            "    objects: {} objects, {}\n",
            n("num_objects"),
            tools::human_bytes(n("data_bytes"))
        ));
        s.push_str(&format!(
            "    usage:   {} used, {} / {} avail\n",
            tools::human_bytes(n("bytes_used")),
            tools::human_bytes(n("bytes_avail")),
            tools::human_bytes(n("bytes_total"))
        ));
        if let Some(states) = pg["pgs_by_state"].as_array() {
            let mut first = true;
            for st in states {
                s.push_str(&format!(
                    "    {} {} {}\n",
                    if first { "pgs:    " } else { "        " },
                    st["count"],
                    st["state_name"].as_str().unwrap_or("?")
                ));
                first = false;
            }
        }
        s.push_str("\n  io:\n");
        s.push_str(&format!(
            "    client:   {}/s rd, {}/s wr, {} op/s rd, {} op/s wr\n",
            tools::human_bytes(n("read_bytes_sec")),
            tools::human_bytes(n("write_bytes_sec")),
            n("read_op_per_sec"),
            n("write_op_per_sec")
        ));
    }
    s
}

fn plain_osd_df(v: &Value) -> String {
    let kib = |n: &Value, k: &str| tools::human_bytes(n[k].as_u64().unwrap_or(0).saturating_mul(1024));
    let mut s = format!(
        "{:<4} {:<7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>4} {}\n",
        "ID", "WEIGHT", "SIZE", "RAW USE", "DATA", "OMAP", "META", "AVAIL", "%USE", "PGS", "STATUS"
    );
    for n in v["nodes"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:<4} {:<7.3} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6.2} {:>4} {}\n",
            n["id"].to_string(),
            n["crush_weight"].as_f64().unwrap_or(0.0),
            kib(n, "kb"),
            kib(n, "kb_used"),
            kib(n, "kb_used_data"),
            kib(n, "kb_used_omap"),
            kib(n, "kb_used_meta"),
            kib(n, "kb_avail"),
            n["utilization"].as_f64().unwrap_or(0.0),
            n["pgs"].as_u64().unwrap_or(0),
            n["status"].as_str().unwrap_or("")
        ));
    }
    let t = &v["summary"];
    s.push_str(&format!(
        "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6.2}\n",
        "TOTAL",
        kib(t, "total_kb"),
        kib(t, "total_kb_used"),
        kib(t, "total_kb_used_data"),
        kib(t, "total_kb_used_omap"),
        kib(t, "total_kb_used_meta"),
        kib(t, "total_kb_avail"),
        t["average_utilization"].as_f64().unwrap_or(0.0)
    ));
    s
}

fn plain_df(v: &Value) -> String {
    let b = |n: &Value, k: &str| tools::human_bytes(n[k].as_u64().unwrap_or(0));
    let st = &v["stats"];
    let mut s = String::from("--- RAW STORAGE ---\n");
    s.push_str(&format!("{:>10} {:>10} {:>10} {:>9}\n", "SIZE", "AVAIL", "RAW USED", "%RAW USED"));
    s.push_str(&format!(
        "{:>10} {:>10} {:>10} {:>9.2}\n",
        b(st, "total_bytes"),
        b(st, "total_avail_bytes"),
        b(st, "total_used_raw_bytes"),
        st["total_used_raw_ratio"].as_f64().unwrap_or(0.0) * 100.0
    ));
    s.push_str("\n--- POOLS ---\n");
    s.push_str(&format!(
        "{:<16} {:>4} {:>10} {:>8} {:>10} {:>6} {:>10}\n",
        "POOL", "ID", "STORED", "OBJECTS", "USED", "%USED", "MAX AVAIL"
    ));
    for p in v["pools"].as_array().into_iter().flatten() {
        let ps = &p["stats"];
        s.push_str(&format!(
            "{:<16} {:>4} {:>10} {:>8} {:>10} {:>6.2} {:>10}\n",
            p["name"].as_str().unwrap_or("?"),
            p["id"].to_string(),
            b(ps, "stored"),
            ps["objects"].as_u64().unwrap_or(0),
            b(ps, "bytes_used"),
            ps["percent_used"].as_f64().unwrap_or(0.0) * 100.0,
            b(ps, "max_avail")
        ));
    }
    s
}

fn plain_tree(v: &Value) -> String {
    let mut s = format!("{:<4} {:<6} {:<20} {:<7} {}\n", "ID", "WEIGHT", "TYPE NAME", "STATUS", "REWEIGHT");
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let by_id = |id: &Value| nodes.iter().find(|n| &n["id"] == id).cloned();
    fn walk(n: &Value, depth: usize, by_id: &dyn Fn(&Value) -> Option<Value>, s: &mut String) {
        let name = format!(
            "{}{} {}",
            "    ".repeat(depth),
            n["type"].as_str().unwrap_or("?"),
            n["name"].as_str().unwrap_or("?")
        );
        let status = n["status"].as_str().unwrap_or("");
        let weight = n["crush_weight"].as_f64().map(|w| format!("{w:.3}")).unwrap_or_default();
        let reweight = n["reweight"].as_f64().map(|w| format!("{w:.3}")).unwrap_or_default();
        s.push_str(&format!(
            "{:<4} {:<6} {:<20} {:<7} {}\n",
            n["id"].to_string(),
            weight,
            name,
            status,
            reweight
        ));
        for c in n["children"].as_array().into_iter().flatten() {
            if let Some(child) = by_id(c) {
                walk(&child, depth + 1, by_id, s);
            }
        }
    }
    let roots: Vec<&Value> = nodes.iter().filter(|n| n["type"] == "root").collect();
    if roots.is_empty() {
        for n in &nodes {
            walk(n, 0, &by_id, &mut s);
        }
    }
    for r in roots {
        walk(r, 0, &by_id, &mut s);
    }
    s
}

fn plain_pool_ls(v: &Value) -> String {
    let mut s = String::new();
    for p in v.as_array().into_iter().flatten() {
        s.push_str(&format!("{}\n", p["pool_name"].as_str().unwrap_or("?")));
    }
    s
}

fn plain_ping_times(v: &Value) -> String {
    let mut s = format!("{:<8} {:<8} {:<9} {:>10}  {}\n", "FROM", "TO", "INTERFACE", "LAST(ms)", "UPDATED");
    for e in v["entries"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "osd.{:<4} osd.{:<4} {:<9} {:>10.3}  {}{}\n",
            e["from osd"].to_string(),
            e["to osd"].to_string(),
            e["interface"].as_str().unwrap_or("?"),
            e["last"].as_f64().unwrap_or(0.0),
            e["last update"].as_str().unwrap_or(""),
            if e["stale"] == true { " (stale)" } else { "" }
        ));
    }
    s
}

/// An age as Ceph shows it: `42s`, `5m`, `3h`, `2d`.
fn fmt_age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn plain_log(v: &Value) -> String {
    let mut s = String::new();
    // The monitor answers with the entries themselves, oldest first.
    for e in v.as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{} {} {} {}\n",
            e["stamp"].as_str().unwrap_or(""),
            e["name"].as_str().unwrap_or(""),
            e["priority"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("")
        ));
    }
    s
}

fn osd_map(c: &Client, pool: &str, object: &str) -> Result<Value> {
    let map = c.monc.wait_for_map(None, MON_TIMEOUT).map_err(|_| {
        anyhow!("cannot reach the monitor at {} (is the cluster up? try `cuttle up`)", c.mon_addr())
    })?;
    let p = map.pool_by_name(pool).ok_or_else(|| anyhow!("pool '{pool}' does not exist"))?;
    if object.is_empty() || object.len() > c.cfg.osd_max_object_name_len {
        bail!("object names must be 1 to {} bytes", c.cfg.osd_max_object_name_len);
    }
    let pg = object_to_pg(p, object.as_bytes());
    let ua = Placement::new(&map).up_acting(pg)?;
    let ids = |v: &[OsdId]| v.iter().map(|o| o.0).collect::<Vec<_>>();
    Ok(json!({
        "epoch": map.epoch.0,
        "pool": pool,
        "pool_id": p.id.0,
        "objname": object,
        "raw_pgid": format!("{}.{:08x}", p.id.0, rados::placement::object_hash(object.as_bytes())),
        "pgid": pg.to_string(),
        "up": ids(&ua.up),
        "up_primary": ua.primary.map_or(-1, |o| o.0 as i64),
        "acting": ids(&ua.acting),
        "acting_primary": ua.primary.map_or(-1, |o| o.0 as i64),
    }))
}

fn plain_osd_map(v: &Value) -> String {
    format!(
        "osdmap e{} pool '{}' ({}) object '{}' -> pg {} ({}) -> up ({}, p{}) acting ({}, p{})\n",
        v["epoch"],
        v["pool"].as_str().unwrap_or(""),
        v["pool_id"],
        v["objname"].as_str().unwrap_or(""),
        v["raw_pgid"].as_str().unwrap_or(""),
        v["pgid"].as_str().unwrap_or(""),
        v["up"],
        v["up_primary"],
        v["acting"],
        v["acting_primary"]
    )
}

fn watch(c: &Client, fmt: Format) -> Result<()> {
    let (tx, rx) = crossbeam_channel::bounded(1024);
    c.monc.on_log(move |e| {
        // A slow terminal must not stall the messenger: drop lines rather than block.
        let _ = tx.try_send(e.clone());
    });
    c.monc.wait_for_map(None, MON_TIMEOUT).map_err(|_| {
        anyhow!("cannot reach the monitor at {} (is the cluster up? try `cuttle up`)", c.mon_addr())
    })?;
    let stop = tools::termination_flag()?;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        if let Ok(e) = rx.recv_timeout(Duration::from_millis(200)) {
            let level = match e.level {
                LogLevel::Info => "INF",
                LogLevel::Warn => "WRN",
                LogLevel::Error => "ERR",
            };
            if fmt.is_json() {
                let v = json!({"seq": e.seq, "stamp_ms": e.stamp_ms, "level": level, "message": e.message});
                println!("{}", fmt.json_text(&v));
            } else {
                println!("{} [{level}] {}", fmt_stamp(e.stamp_ms), e.message);
            }
        }
    }
    Ok(())
}

fn fmt_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", ms % 1000)
}

// ---- cuttle up / down / start / stop / restart ----
//
// A local cluster is a directory: `cuttle.toml`, and per daemon a data directory (`mon.0/`, `osd.N/`), a
// log (`NAME.log`) and, while it runs, a pidfile (`NAME.pid`: pid and process start time). The data
// directories are the record of what the cluster holds: `cuttle up` starts every daemon they name that is
// not running, and `--osds N` only ever adds to them.

/// Most OSDs `cuttle up` runs in one directory.
const LOCAL_OSDS_MAX: u32 = 64;
/// How long `cuttle stop` and `cuttle down` wait for a daemon to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long starting one daemon may take: it detaches once it serves (an OSD once it has booted), and its
/// own waits are bounded (the detaching side gives up after `DAEMON_READY_TIMEOUT`).
const START_TIMEOUT: Duration = Duration::from_secs(tools::DAEMON_READY_TIMEOUT.as_secs() + 10);

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the cuttle binary")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!("{} not found next to {} (build the workspace: cargo build --release)", name, exe.display());
    }
    Ok(p)
}

/// A daemon of a local cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Daemon {
    Mon(String),
    Osd(u32),
}

impl Daemon {
    fn parse(s: &str) -> Result<Daemon> {
        let bad = || anyhow!("expected osd.N or mon.X, got {s:?}");
        let (kind, id) = s.split_once('.').ok_or_else(bad)?;
        match kind {
            "osd" => Ok(Daemon::Osd(id.parse().map_err(|_| bad())?)),
            "mon" if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Ok(Daemon::Mon(id.to_string()))
            }
            _ => Err(bad()),
        }
    }

    fn program(&self) -> &'static str {
        match self {
            Daemon::Mon(_) => "cuttle-mon",
            Daemon::Osd(_) => "cuttle-osd",
        }
    }
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Daemon::Mon(id) => write!(f, "mon.{id}"),
            Daemon::Osd(id) => write!(f, "osd.{id}"),
        }
    }
}

/// The directory of a local cluster.
struct Local {
    /// Absolute, so that what the daemons' command lines name is what later checks compare against.
    dir: PathBuf,
}

impl Local {
    fn new(dir: &Path) -> Result<Local> {
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("no cluster directory at {}", dir.display()))?;
        Ok(Local { dir })
    }

    fn data(&self, d: &Daemon) -> PathBuf {
        self.dir.join(d.to_string())
    }

    fn pidfile(&self, d: &Daemon) -> PathBuf {
        self.dir.join(format!("{d}.pid"))
    }

    fn log(&self, d: &Daemon) -> PathBuf {
        self.dir.join(format!("{d}.log"))
    }

    fn conf(&self) -> PathBuf {
        self.dir.join(CONF_FILE)
    }

    /// The daemons the directory holds data for (the monitor first, then OSDs by id).
    fn members(&self) -> Vec<Daemon> {
        let mut out: Vec<Daemon> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().and_then(|n| Daemon::parse(n).ok()))
            .collect();
        out.sort();
        out
    }

    fn osds(&self) -> Vec<u32> {
        self.members()
            .into_iter()
            .filter_map(|d| if let Daemon::Osd(n) = d { Some(n) } else { None })
            .collect()
    }

    /// The pid of the daemon if it runs. A pidfile that names no live process, or a process that is not this
    /// daemon (its pid reused after a kill -9), is stale: said on stderr and removed, never signalled.
    fn running(&self, d: &Daemon) -> Option<u32> {
        let path = self.pidfile(d);
        match tools::check_pidfile(&path, &tools::PidOwner::daemon(d.program(), &self.data(d))) {
            tools::PidStatus::Running(pid) => Some(pid),
            tools::PidStatus::Absent => None,
            tools::PidStatus::Stale { why, .. } => {
                eprintln!("{d}: stale pidfile {} ({why}); removed it", path.display());
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Starts the daemon (its binary detaches once it serves: an OSD once it has booted) and returns its
    /// pid.
    fn start(&self, d: &Daemon) -> Result<u32> {
        let bin = sibling_binary(d.program())?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--conf")
            .arg(self.conf())
            .arg("--data")
            .arg(self.data(d))
            .arg("--log-file")
            .arg(self.log(d))
            .arg("--pid-file")
            .arg(self.pidfile(d))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t.elapsed() > START_TIMEOUT {
                // Our own child, the process that waits for the daemon to serve (not the daemon).
                let _ = child.kill();
                let _ = child.wait();
                bail!("{d} did not start within {START_TIMEOUT:?}; see {}", self.log(d).display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        if !status.success() {
            let why = err.trim();
            let why = if why.is_empty() { format!("exit status {status}") } else { why.to_string() };
            bail!("{d} did not start: {why}\n(log: {})", self.log(d).display());
        }
        self.running(d)
            .ok_or_else(|| anyhow!("{d} started but wrote no pidfile; see {}", self.log(d).display()))
    }

    /// Stops the daemon if it runs (SIGTERM, then SIGKILL after `STOP_TIMEOUT`); its pid if it ran.
    fn stop(&self, d: &Daemon) -> Option<u32> {
        let pid = self.running(d)?;
        let owner = tools::PidOwner::daemon(d.program(), &self.data(d));
        let rec = tools::read_pid_record(&self.pidfile(d)).filter(|r| r.pid == pid)?;
        signal(pid, "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        while tools::process_is(rec, &owner).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Checked again right before: only the same process, never whatever took its pid since.
        if tools::process_is(rec, &owner).is_ok() {
            eprintln!("{d} (pid {pid}) did not stop within {STOP_TIMEOUT:?}; killing it");
            signal(pid, "KILL");
        }
        // A killed daemon leaves its pidfile behind.
        if tools::read_pid(&self.pidfile(d)) == Some(pid) {
            let _ = std::fs::remove_file(self.pidfile(d));
        }
        Some(pid)
    }

    fn check_member(&self, d: &Daemon) -> Result<()> {
        if !self.conf().exists() {
            bail!(
                "{} holds no cluster (no {CONF_FILE}); `cuttle up --dir {}` creates one",
                self.dir.display(),
                self.dir.display()
            );
        }
        if !self.data(d).is_dir() {
            let have: Vec<String> = self.members().iter().map(Daemon::to_string).collect();
            bail!(
                "{} has no {d} (it holds {}); `cuttle up --osds N` adds OSDs",
                self.dir.display(),
                if have.is_empty() { "no daemons".to_string() } else { have.join(", ") }
            );
        }
        Ok(())
    }

    fn start_one(&self, d: &Daemon) -> Result<()> {
        self.check_member(d)?;
        if let Some(pid) = self.running(d) {
            println!("{d} is already running (pid {pid})");
            return Ok(());
        }
        if let Daemon::Osd(_) = d {
            let mon = self.members().into_iter().find(|m| matches!(m, Daemon::Mon(_)));
            if let Some(mon) = mon.filter(|m| self.running(m).is_none()) {
                bail!("{mon} is not running: an OSD boots through it (`cuttle start {mon}` or `cuttle up`)");
            }
        }
        let pid = self.start(d)?;
        println!("started {d} (pid {pid})");
        Ok(())
    }

    fn stop_one(&self, d: &Daemon) -> Result<()> {
        self.check_member(d)?;
        match self.stop(d) {
            Some(pid) => println!("stopped {d} (pid {pid})"),
            None => println!("{d} is not running"),
        }
        Ok(())
    }
}

/// The local cluster and daemon a `start`/`stop`/`restart` names.
fn daemon_target(cmd: &DaemonCmd, conf: Option<&Path>) -> Result<(Local, Daemon)> {
    let d = Daemon::parse(&cmd.daemon)?;
    let dir = match (&cmd.dir, conf) {
        (Some(dir), _) => dir.clone(),
        (None, Some(conf)) => {
            conf.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
        }
        (None, None) => PathBuf::from(DEFAULT_DIR),
    };
    Ok((Local::new(&dir)?, d))
}

fn up(dir: &Path, osds: Option<u32>, set: &[String], timeout: Duration) -> Result<()> {
    if osds.is_some_and(|n| n == 0 || n > LOCAL_OSDS_MAX) {
        bail!("--osds must be between 1 and {LOCAL_OSDS_MAX}");
    }
    let mut pairs = Vec::new();
    for kv in set {
        let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--set wants KEY=VALUE, got {kv:?}"))?;
        pairs.push((k.trim().to_string(), v.trim().to_string()));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let local = Local::new(dir)?;
    let dir = local.dir.as_path();
    let conf = local.conf();
    let mon = Daemon::Mon("0".into());
    // What the cluster holds, and what it should: never fewer OSDs than it has.
    let have = local.osds();
    let want = match osds {
        Some(n) if (n as usize) < have.len() => bail!(
            "{} holds {} OSDs; `cuttle up` never removes OSDs (asked for --osds {n})",
            dir.display(),
            have.len()
        ),
        Some(n) => n as usize,
        None if have.is_empty() => 3,
        None => have.len(),
    };
    let mut targets: Vec<Daemon> = have.iter().map(|&n| Daemon::Osd(n)).collect();
    let mut next = have.iter().max().map_or(0, |m| m + 1);
    while targets.len() < want {
        targets.push(Daemon::Osd(next));
        next += 1;
    }
    let running: Vec<(Daemon, u32)> = std::iter::once(mon.clone())
        .chain(targets.iter().cloned())
        .filter_map(|d| local.running(&d).map(|p| (d, p)))
        .collect();
    if !pairs.is_empty() && !running.is_empty() {
        let names: Vec<String> = running.iter().map(|(d, _)| d.to_string()).collect();
        bail!(
            "cluster in {} is running ({}): `cuttle down` before changing its config",
            dir.display(),
            names.join(", ")
        );
    }
    if running.len() == targets.len() + 1 {
        println!(
            "cluster already up in {} (mon.0 and {} osds running); `cuttle down --dir {}` stops it",
            dir.display(),
            targets.len(),
            dir.display()
        );
        return Ok(());
    }
    let existing = if conf.exists() { Some(Config::load(&conf)?) } else { None };
    let mut base = Vec::new();
    if existing.as_ref().is_none_or(|c| c.fsid.is_empty()) {
        base.push(("fsid".to_string(), new_fsid()));
    }
    // A new cluster's monitor binds port 0 itself and publishes what it got (no probe socket that something
    // else could take before the monitor binds); that address then stays the cluster's.
    if existing.as_ref().is_none_or(|c| c.mon_host.is_none()) {
        base.push(("mon_host".to_string(), "127.0.0.1:0".to_string()));
    }
    if existing.is_none() {
        // All OSDs of a local cluster share this host: count each OSD as its own reporter.
        base.push(("mon_osd_reporter_subtree_level".to_string(), "osd".to_string()));
        // Every daemon of a local cluster shares this machine's CPUs: size each one's messenger worker pool to
        // its share (at least 1, at most Ceph's default 3) instead of running 3 event loops per daemon on a
        // laptop. Fewer loops means fewer thread wake-ups per op, which is most of an OSD's CPU cost.
        if !pairs.iter().any(|(k, _)| k == "ms_async_op_threads") {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = (cpus / (want + 1)).clamp(1, 3);
            base.push(("ms_async_op_threads".to_string(), threads.to_string()));
        }
    }
    base.extend(pairs);
    if !base.is_empty() {
        Config::write_options(&conf, &base)?;
    }
    let mut cfg = Config::load(&conf)?;
    let started = Instant::now();
    let mut began = Vec::new();
    if local.running(&mon).is_none() {
        let addr_file = local.data(&mon).join("addr");
        match std::fs::remove_file(&addr_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing the stale {}", addr_file.display()))
            }
            _ => {}
        }
        let pid = local.start(&mon)?;
        println!("started {mon} (pid {pid})");
        began.push(mon.clone());
        // The monitor detached once it served, after publishing the address it bound.
        let text = std::fs::read_to_string(&addr_file).with_context(|| {
            format!("the monitor published no address; see {}", local.log(&mon).display())
        })?;
        let mon_addr: SocketAddr =
            text.trim().parse().with_context(|| format!("bad address in {}", addr_file.display()))?;
        if cfg.mon_host.is_none_or(|a| a.port() == 0) {
            Config::write_options(&conf, &[("mon_host".to_string(), mon_addr.to_string())])?;
            cfg = Config::load(&conf)?;
        }
    }
    let client = Client::with_config(cfg.clone())?;
    if client.monc.wait_for_map(None, Duration::from_secs(10)).is_err() {
        bail!("the monitor did not come up at {}; see {}", client.mon_addr(), local.log(&mon).display());
    }
    // One at a time, each booted before the next starts: the monitor hands out ids in registration order,
    // and osd.N's directory should hold osd.N.
    for d in &targets {
        if local.running(d).is_none() {
            let pid = local.start(d)?;
            println!("started {d} (pid {pid})");
            began.push(d.clone());
        }
    }
    let n = targets.len() as u64;
    let size = 3.min(n) as u8;
    let pools = client.command(MonCommand::PoolLs)?;
    let rbd = pools.as_array().into_iter().flatten().find(|p| p["pool_name"] == "rbd").cloned();
    let size = match rbd {
        Some(p) => p["size"].as_u64().map_or(size, |s| s as u8),
        None => {
            client.command(MonCommand::PoolCreate {
                name: "rbd".into(),
                size: Some(size),
                min_size: None,
                pg_num: Some(32),
            })?;
            size
        }
    };
    let deadline = started + timeout;
    loop {
        let h = client.command(MonCommand::Health)?;
        let st = client.command(MonCommand::Status)?;
        let m = &st["osdmap"];
        if h["status"] == "HEALTH_OK"
            && m["num_up_osds"].as_u64() >= Some(n)
            && m["num_in_osds"].as_u64() >= Some(n)
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "cluster did not reach HEALTH_OK within {timeout:?}; last health:\n{}logs are in {}",
                plain_health(&h),
                dir.display()
            );
        }
        for d in &targets {
            if local.running(d).is_none() {
                bail!("{d} exited; see {}", local.log(d).display());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "cluster up in {} ({:.1} s): mon.0 at {}, {n} osds, pool 'rbd' (size {size}); HEALTH_OK",
        dir.display(),
        started.elapsed().as_secs_f64(),
        client.mon_addr()
    );
    println!("config: {}   stop it with: cuttle down --dir {}", conf.display(), dir.display());
    Ok(())
}

fn new_fsid() -> String {
    let a = tools::entropy();
    let b = tools::entropy().rotate_left(17) ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let h = format!("{a:016x}{b:016x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn down(dir: &Path) -> Result<()> {
    if !dir.exists() {
        bail!("no cluster directory at {}", dir.display());
    }
    let local = Local::new(dir)?;
    // OSDs first (they tell the monitor they are going), then the monitor.
    let mut names = local.members();
    names.sort_by_key(|d| matches!(d, Daemon::Mon(_)));
    let mut stopped = 0;
    for d in &names {
        if local.stop(d).is_some() {
            stopped += 1;
        }
    }
    if stopped == 0 {
        println!("no daemons running in {}", local.dir.display());
    } else {
        println!("stopped {stopped} daemons in {}", local.dir.display());
    }
    Ok(())
}
