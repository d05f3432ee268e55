//! `tardigrade`: the command line of Tardigrade.
//!
//! - `start-single-node`: run a one-node cluster (bootstraps itself the first
//!   time, restarts from its store afterwards);
//! - `kv put|get|del|scan|cas`: use the KV API (etcd's v3 API) of a node;
//! - `debug ranges`: each range of a node with its raft and MVCC state.
//!
//! Errors end the program with a message and a non-zero exit status.

mod kv;
mod nemesis_args;
mod raw_kv;
mod txn_workloads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tardigrade",
    version,
    about = "Tardigrade: a distributed SQL database that also speaks etcd's v3 API."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a single-node cluster in the foreground (Ctrl-C stops it).
    StartSingleNode {
        /// Directory of the store; created and bootstrapped if empty.
        #[arg(long)]
        store: PathBuf,
        /// Address of the gRPC API (etcd's v3 API and the admin API).
        #[arg(long, default_value = "127.0.0.1:2379")]
        listen_addr: SocketAddr,
        /// Address of the HTTP endpoints (/health, /metrics).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// The raft tick, in milliseconds.
        #[arg(long, default_value_t = 100)]
        tick_ms: u64,
        /// The minimum election timeout, in ticks.
        #[arg(long, default_value_t = 10)]
        election_ticks: u64,
        #[command(flatten)]
        ranges: RangeArgs,
    },
    /// Run a node of a multi-node cluster in the foreground (Ctrl-C stops it).
    /// A new node joins through --join (run `tardigrade init` once to create the
    /// cluster); a restarted node rejoins with the same flags.
    Start {
        /// Directory of the store.
        #[arg(long)]
        store: PathBuf,
        /// Address of the gRPC API (etcd's v3 API, admin, membership, raft).
        #[arg(long, default_value = "127.0.0.1:2379")]
        listen_addr: SocketAddr,
        /// The address other nodes reach this one at (default: --listen-addr).
        #[arg(long)]
        advertise_addr: Option<String>,
        /// Address of the HTTP endpoints (/health, /metrics).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// Addresses of nodes of the cluster, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        join: Vec<String>,
        /// The raft tick, in milliseconds.
        #[arg(long, default_value_t = 100)]
        tick_ms: u64,
        /// The minimum election timeout, in ticks.
        #[arg(long, default_value_t = 10)]
        election_ticks: u64,
        /// The maximum clock offset tolerated between nodes, in milliseconds.
        #[arg(long, default_value_t = 500)]
        max_offset_ms: u64,
        /// A replica truncates its raft log once it holds this many applied entries.
        #[arg(long, default_value_t = 10_000)]
        raft_log_truncation_threshold: u64,
        #[command(flatten)]
        ranges: RangeArgs,
    },
    /// Create a new cluster on a node started with `tardigrade start` (once).
    Init {
        /// The node to initialize (its --listen-addr).
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
        /// Keep trying this many seconds while the node does not answer
        /// (it may still be starting).
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
        /// Succeed if the cluster is already initialized (for an init step
        /// that runs at every start, as in docker-compose).
        #[arg(long)]
        ok_if_initialized: bool,
    },
    /// The nodes of a cluster.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Read and write keys through a node's etcd KV API, or with --raw its
    /// native KV API (raw keys of the user keyspace, split across ranges).
    Kv {
        #[command(subcommand)]
        cmd: kv::KvCmd,
        /// The node to talk to (its --listen-addr).
        #[arg(long, global = true, default_value = "127.0.0.1:2379")]
        host: String,
        /// Use the native KV API (tardigrade.kvpb.KV) instead of etcd's.
        #[arg(long, global = true)]
        raw: bool,
    },
    /// Generate load against a node (or any etcd v3 endpoint) and report latencies.
    Workload {
        #[command(subcommand)]
        cmd: WorkloadCmd,
    },
    /// Inspect a node.
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

/// When user ranges split by themselves.
#[derive(clap::Args, Clone, Copy)]
struct RangeArgs {
    /// Split a user range once its MVCC bytes (keys and values, every version) pass this.
    #[arg(long, default_value_t = 512 << 20)]
    range_max_bytes: u64,
    /// Split a user range serving more native-API requests per second than
    /// this for 5 s, at a key that halves its load (0: never by load).
    #[arg(long, default_value_t = 2500)]
    load_split_qps: u64,
    /// Merge neighbouring user ranges (on the same nodes) that are both
    /// smaller than this many MVCC bytes (0: never merge by themselves).
    #[arg(long, default_value_t = 0)]
    range_min_bytes: u64,
}

impl RangeArgs {
    fn apply(self, cfg: &mut server::NodeConfig) {
        cfg.range_max_bytes = self.range_max_bytes.max(1);
        cfg.load_split_qps = self.load_split_qps;
        cfg.range_min_bytes = self.range_min_bytes;
    }
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Each node: address, liveness, and per store its replicas, leases and bytes.
    Status {
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
    },
    /// Whether a node can serve (its HTTP `/health`): exits 0 if so, 1 with
    /// the reason otherwise. The health check of the container image.
    Health {
        /// The node's --http-addr.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: String,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum WorkloadCmd {
    /// Jepsen-style register clients (reads, writes, compare-and-swaps on a few
    /// keys, through different nodes), optionally with a nemesis; then checks
    /// the history for linearizability and every acknowledged insert.
    Register {
        /// host:port of each node's etcd API, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 6)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        keys: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        /// An operation not answered within this many milliseconds is unknown.
        #[arg(long, default_value_t = 2000)]
        op_timeout_ms: u64,
        #[command(flatten)]
        nemesis: nemesis_args::NemesisArgs,
        /// Also move the etcd range's lease to another node about every this
        /// many seconds (admin TransferLease); 0 never.
        #[arg(long, default_value_t = 0.0)]
        lease_transfers: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds the checker may take.
        #[arg(long, default_value_t = 30)]
        check_seconds: u64,
        /// The client API: `etcd` (etcd's KV) or `native` (Tardigrade's KV
        /// API, keys spread over the prefixes 00..ff so that splits there
        /// spread them over many ranges).
        #[arg(long, default_value = "etcd")]
        api: workload::register::Api,
    },
    /// Jepsen's bank test over transactions: transfers between accounts
    /// (each on its own range, leases on every node) and reads of every
    /// balance; every read and the final one must see the initial total.
    /// Exits non-zero when one does not.
    Bank(txn_workloads::BankArgs),
    /// etcd's watches, leases and a fenced lock recipe under load (and the
    /// nemesis): watchers must see every acknowledged write once and in
    /// order, leases kept alive in time must never expire, and no write of
    /// a lock holder that had lost the lock may apply.
    Coordination(txn_workloads::CoordArgs),
    /// Elle's list-append workload over transactions: reads and appends on
    /// a few keys, the history written in Elle's format and checked for
    /// serializability (`check-append`). Exits non-zero on an anomaly.
    Append(txn_workloads::AppendArgs),
    /// Checks a list-append history (JSON lines in Elle's format, `{"type":
    /// "invoke"|"ok"|"fail"|"info", "process": P, "value": [["append", k, v],
    /// ["r", k, [..]]]}`) for serializability: dependency cycles (G0, G1c,
    /// G-single, G2-item, the smallest of each), G1a, G1b, duplicated, lost
    /// and unknown elements. Exits 1 when it finds an anomaly.
    CheckAppend {
        /// The history file.
        history: std::path::PathBuf,
    },
    /// Makes many ranges by administrative splits, checks every node lists
    /// them and random writes across them succeed, then measures each idle
    /// node's raft messages, fsyncs and CPU per second.
    Splits {
        /// host:port of each node's gRPC API, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// host:port of each node's HTTP endpoint, same order.
        #[arg(long, value_delimiter = ',', required = true)]
        http_hosts: Vec<String>,
        /// Each node's pid, same order (for its CPU time; optional).
        #[arg(long, value_delimiter = ',')]
        pids: Vec<u32>,
        #[arg(long, default_value_t = 1000)]
        ranges: usize,
        #[arg(long, default_value_t = 2000)]
        writes: usize,
        /// Seconds of idle measured.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
    },
    /// Concurrent clients doing puts and gets (etcd's v3 API, so the same
    /// requests drive Tardigrade and etcd, or --api native), reporting ops/s
    /// and latency percentiles, with a progress line every second.
    Kv {
        /// host:port of each endpoint, comma-separated (clients spread over them).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
        hosts: Vec<String>,
        /// etcd (etcd's KV API) or native (Tardigrade's; keys spread over 00..ff).
        #[arg(long, default_value = "etcd")]
        api: workload::register::Api,
        /// Concurrent clients (each its own connection).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds to run (unless --max-ops is reached first).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Stop after this many operations.
        #[arg(long)]
        max_ops: Option<u64>,
        /// Percent of operations that are gets; the rest are puts.
        #[arg(long, default_value_t = 0)]
        read_percent: u32,
        /// Distinct keys.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        #[arg(long, default_value_t = 256)]
        value_bytes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Concurrent clients writing keys for a fixed time.
    Put {
        /// host:port of an etcd v3 endpoint (Tardigrade's --listen-addr, or etcd).
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
        #[arg(long, default_value_t = 1000)]
        keys_per_client: u64,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Every range on the node: span, replicas, raft leader, applied index, MVCC stats.
    Ranges {
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
        /// Only ranges overlapping [--start, --end) (bytes other than
        /// printable ASCII as \xNN, as the span column shows them).
        #[arg(long, default_value = "")]
        start: String,
        /// Empty: to the end of the keyspace.
        #[arg(long, default_value = "")]
        end: String,
        /// Only the summary line (how many ranges, leases, bytes).
        #[arg(long)]
        summary: bool,
    },
    /// Moves a range's lease (its raft leadership) to another node's replica,
    /// giving it up before the new leader can take over. Asks any node, then
    /// the leaseholder it names.
    TransferLease {
        /// The range, as `debug ranges` numbers it.
        #[arg(long)]
        range: u64,
        /// The node that should hold the lease.
        #[arg(long)]
        to_node: u64,
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
    },
    /// Merges the user range holding KEY with the range to its right (both
    /// on the same nodes); a merge that cannot complete is rolled back.
    Merge {
        /// A key of the left-hand range (\xNN for other bytes).
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
    },
    /// Splits the user range holding KEY at KEY (any node finds the range and
    /// asks its leaseholder). Only ranges of the user keyspace split.
    Split {
        /// The first key of the new right-hand range (\xNN for other bytes).
        #[arg(long)]
        key: String,
        #[arg(long, default_value = "127.0.0.1:2379")]
        host: String,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("tardigrade: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    // RUST_LOG as `level` or `target=level,...` (e.g. `info,kvserver=debug`);
    // `Targets` needs no regex engine, which keeps the build lean.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::StartSingleNode {
                store,
                listen_addr,
                http_addr,
                tick_ms,
                election_ticks,
                ranges,
            } => start_single_node(store, listen_addr, http_addr, tick_ms, election_ticks, ranges).await,
            Cmd::Start {
                store,
                listen_addr,
                advertise_addr,
                http_addr,
                join,
                tick_ms,
                election_ticks,
                max_offset_ms,
                raft_log_truncation_threshold,
                ranges,
            } => {
                if tick_ms == 0 || election_ticks < 2 {
                    anyhow::bail!("--tick-ms must be positive and --election-ticks at least 2");
                }
                let mut cfg = server::NodeConfig::new(&store);
                cfg.listen_addr = listen_addr;
                cfg.advertise_addr = advertise_addr;
                cfg.http_addr = http_addr;
                cfg.tick = Duration::from_millis(tick_ms);
                cfg.election_ticks = election_ticks;
                cfg.max_clock_offset = Duration::from_millis(max_offset_ms);
                cfg.log_truncation_threshold = raft_log_truncation_threshold.max(1);
                cfg.mode = server::Mode::Cluster { join };
                ranges.apply(&mut cfg);
                run_node(cfg, &store).await
            }
            Cmd::Init {
                host,
                wait_secs,
                ok_if_initialized,
            } => kv::init(&host, Duration::from_secs(wait_secs), ok_if_initialized).await,
            Cmd::Node {
                cmd: NodeCmd::Health { http_addr, timeout_ms },
            } => kv::node_health(&http_addr, Duration::from_millis(timeout_ms.max(1))).await,
            Cmd::Node {
                cmd: NodeCmd::Status { host },
            } => kv::node_status(&host).await,
            Cmd::Kv { cmd, host, raw } => kv::run(cmd, &host, raw).await,
            Cmd::Debug {
                cmd:
                    DebugCmd::Ranges {
                        host,
                        start,
                        end,
                        summary,
                    },
            } => kv::debug_ranges(&host, &kv::RangesView { start, end, summary }).await,
            Cmd::Debug {
                cmd: DebugCmd::TransferLease { range, to_node, host },
            } => kv::transfer_lease(&host, range, to_node).await,
            Cmd::Debug {
                cmd: DebugCmd::Split { key, host },
            } => kv::split(&host, &key).await,
            Cmd::Debug {
                cmd: DebugCmd::Merge { key, host },
            } => kv::merge(&host, &key).await,
            Cmd::Workload {
                cmd:
                    WorkloadCmd::Register {
                        hosts,
                        clients,
                        keys,
                        duration,
                        op_timeout_ms,
                        nemesis,
                        lease_transfers,
                        seed,
                        check_seconds,
                        api,
                    },
            } => {
                let nemesis_on = nemesis.nemesis;
                let cfg = workload::register::RegisterConfig {
                    endpoints: hosts.clone(),
                    api,
                    clients: clients.max(1),
                    keys: keys.max(1),
                    duration: Duration::from_secs(duration.max(1)),
                    op_timeout: Duration::from_millis(op_timeout_ms.max(10)),
                    seed,
                    nemesis: nemesis.config()?,
                    lease_transfers: (lease_transfers > 0.0)
                        .then(|| Duration::from_secs_f64(lease_transfers.max(0.05))),
                    check_budget: Duration::from_secs(check_seconds.max(1)),
                };
                eprintln!(
                    "register workload: {clients} clients on {keys} keys for {duration}s against {hosts:?}{}",
                    match (nemesis_on, lease_transfers > 0.0) {
                        (true, true) => " with the nemesis and lease transfers",
                        (true, false) => " with the nemesis",
                        (false, true) => " with lease transfers",
                        (false, false) => "",
                    }
                );
                let r = workload::register::run(cfg).await;
                txn_workloads::faults(&r.faults, &r.restarted_pids);
                print!("{}", r.check);
                println!("checked in {:.2}s", r.check_time.as_secs_f64());
                println!(
                    "inserts: {} acknowledged, {} lost; longest unavailability {:.2}s (from {:.1}s); longest operation {:.2}s",
                    r.inserts_acked,
                    r.inserts_lost.len(),
                    r.longest_unavailability.as_secs_f64(),
                    r.longest_unavailability_from.as_secs_f64(),
                    r.longest_operation.as_secs_f64()
                );
                for (why, n) in &r.unknown_causes {
                    println!("unknown outcomes: {n} x {why}");
                }
                if let Some((gap, from)) = r.longest_unavailability_after_partition {
                    println!(
                        "longest unavailability after a partition: {:.2}s (from {:.1}s)",
                        gap.as_secs_f64(),
                        from.as_secs_f64()
                    );
                }
                if !r.read_back {
                    anyhow::bail!(
                        "the cluster could not be read back after the run (every insert counts as lost): no node answered the final reads within 20 s"
                    );
                }
                if !r.ok() {
                    anyhow::bail!("the history is not what a linearizable store with no lost writes produces");
                }
                Ok(())
            }
            Cmd::Workload {
                cmd:
                    WorkloadCmd::Splits {
                        hosts,
                        http_hosts,
                        pids,
                        ranges,
                        writes,
                        idle_seconds,
                    },
            } => {
                if http_hosts.len() != hosts.len() {
                    anyhow::bail!("--http-hosts must name one endpoint per --hosts entry");
                }
                let cfg = workload::splits::SplitsConfig {
                    hosts,
                    http: http_hosts,
                    pids,
                    ranges,
                    writes,
                    idle: Duration::from_secs(idle_seconds.max(1)),
                };
                let r = workload::splits::run(cfg, |m| eprintln!("{m}")).await.map_err(anyhow::Error::msg)?;
                println!(
                    "{} ranges created by admin splits in {:.1}s ({:.1} ms each); listed per node: {:?}",
                    r.created,
                    r.create_time.as_secs_f64(),
                    r.create_time.as_secs_f64() * 1000.0 / r.created.max(1) as f64,
                    r.listed
                );
                println!(
                    "writes to random keys: {} ok, {} failed in {:.1}s",
                    r.writes_ok,
                    r.writes_failed,
                    r.write_time.as_secs_f64()
                );
                for n in &r.idle {
                    println!(
                        "idle {}: {:.0} raft messages/s in {:.0} frames/s, {:.1} fsyncs/s, CPU {}",
                        n.host,
                        n.messages_per_sec,
                        n.frames_per_sec,
                        n.fsyncs_per_sec,
                        n.cpu.map_or("not measured".into(), |c| format!("{:.0}% of a core", c * 100.0))
                    );
                }
                if r.writes_failed > 0 {
                    anyhow::bail!("{} writes failed", r.writes_failed);
                }
                Ok(())
            }
            Cmd::Workload {
                cmd:
                    WorkloadCmd::Kv {
                        hosts,
                        api,
                        concurrency,
                        duration,
                        max_ops,
                        read_percent,
                        keys,
                        value_bytes,
                        seed,
                    },
            } => {
                let cfg = workload::kv::KvConfig {
                    hosts,
                    api,
                    concurrency: concurrency.max(1),
                    duration: Duration::from_secs(duration.max(1)),
                    max_ops,
                    read_percent: read_percent.min(100),
                    keys: keys.max(1),
                    value_bytes,
                    seed,
                };
                eprintln!(
                    "kv workload: {concurrency} client(s), {read_percent}% reads, {value_bytes}-byte values, {keys} keys, over {:?}...",
                    cfg.hosts
                );
                let r = workload::kv::run(cfg, |n, t| {
                    eprintln!("  {:>6.1}s {n} ops ({:.0}/s)", t.as_secs_f64(), n as f64 / t.as_secs_f64().max(1e-9))
                })
                .await?;
                println!(
                    "ops {} (reads {}, writes {}) errors {} in {:.1}s: {:.0} ops/s; latency ms p50 {:.2} p95 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                    r.ops,
                    r.reads,
                    r.writes,
                    r.errors,
                    r.elapsed.as_secs_f64(),
                    r.per_second(),
                    r.quantile_ms(0.5),
                    r.quantile_ms(0.95),
                    r.quantile_ms(0.99),
                    r.quantile_ms(0.999),
                    r.latency.max() as f64 / 1000.0
                );
                Ok(())
            }
            Cmd::Workload {
                cmd: WorkloadCmd::Bank(a),
            } => txn_workloads::bank(a).await,
            Cmd::Workload {
                cmd: WorkloadCmd::Append(a),
            } => txn_workloads::append(a).await,
            Cmd::Workload {
                cmd: WorkloadCmd::Coordination(a),
            } => txn_workloads::coordination(a).await,
            Cmd::Workload {
                cmd: WorkloadCmd::CheckAppend { history },
            } => {
                let text = std::fs::read_to_string(&history)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", history.display()))?;
                let txns = workload::list_append::parse(&text)?;
                let report = workload::list_append::check(&txns);
                println!("{report}");
                if !report.valid() {
                    std::process::exit(1);
                }
                Ok(())
            }
            Cmd::Workload {
                cmd:
                    WorkloadCmd::Put {
                        host,
                        clients,
                        duration,
                        value_bytes,
                        keys_per_client,
                    },
            } => {
                let cfg = workload::put::PutConfig {
                    endpoint: host.clone(),
                    clients,
                    duration: Duration::from_secs(duration.max(1)),
                    value_bytes,
                    keys_per_client,
                };
                eprintln!("put workload: {clients} client(s) for {duration}s against {host}...");
                let r = workload::put::run(cfg).await?;
                println!(
                    "writes {} errors {} in {:.1}s: {:.0} writes/s; latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                    r.writes,
                    r.errors,
                    r.elapsed.as_secs_f64(),
                    r.per_second(),
                    r.quantile_ms(0.5),
                    r.quantile_ms(0.99),
                    r.latency.max() as f64 / 1000.0
                );
                Ok(())
            }
        }
    })
}

async fn start_single_node(
    store: PathBuf,
    listen: SocketAddr,
    http: SocketAddr,
    tick_ms: u64,
    election_ticks: u64,
    ranges: RangeArgs,
) -> Result<()> {
    if tick_ms == 0 || election_ticks < 2 {
        anyhow::bail!("--tick-ms must be positive and --election-ticks at least 2");
    }
    let mut cfg = server::NodeConfig::new(&store);
    cfg.listen_addr = listen;
    cfg.http_addr = http;
    cfg.tick = Duration::from_millis(tick_ms);
    cfg.election_ticks = election_ticks;
    ranges.apply(&mut cfg);
    run_node(cfg, &store).await
}

async fn run_node(cfg: server::NodeConfig, store: &std::path::Path) -> Result<()> {
    let single = matches!(cfg.mode, server::Mode::SingleNode);
    // SIGTERM too: `docker stop` sends it, and a container's first process
    // that does not handle it is killed after the grace period. Watched
    // before start-up, so one sent while the node starts is not lost.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let node = server::Node::start(cfg)
        .await
        .with_context(|| format!("cannot start a node on store {}", store.display()))?;
    let g = node.grpc_addr();
    let h = node.http_addr();
    if single {
        println!("Tardigrade single node is running (store {}).", store.display());
    } else {
        println!(
            "Tardigrade node is running (store {}); run `tardigrade init --host {}` once to create a new cluster.",
            store.display(),
            node.grpc_addr()
        );
    }
    println!("  etcd v3 API, native KV API and admin API: {g}");
    println!("  HTTP health and metrics:   http://{h}/health  http://{h}/metrics");
    println!("Try:");
    println!("  tardigrade kv put hello world --host {g}");
    println!("  tardigrade kv get hello --host {g}");
    println!("  etcdctl --endpoints={g} put hello world");
    println!("  etcdctl --endpoints={g} get hello");
    println!("  tardigrade kv --raw put apple red --host {g}     # the native KV API (user keyspace)");
    println!("  tardigrade debug split --key m --host {g}       # ranges split (and merge: debug merge)");
    println!("  tardigrade debug ranges --host {g}");
    println!("Press Ctrl-C to stop.");
    // Stop on Ctrl-C or SIGTERM, or when the node finds it cannot be part of the cluster.
    let fatal = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(p) = node.health_problem().filter(|p| p.contains("another cluster")) {
                return p;
            }
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
        _ = term.recv() => {}
        p = fatal => {
            node.shutdown().await;
            anyhow::bail!("{p}");
        }
    }
    println!("stopping...");
    node.shutdown().await;
    Ok(())
}
