//! `tardigrade workload bank`, `append` and `coordination`: the
//! workloads with a checker and a verdict, as commands.

use std::time::Duration;

use anyhow::bail;

#[derive(clap::Args)]
pub struct Common {
    /// host:port of each node's gRPC API, comma-separated (clients spread
    /// over them).
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// host:port of each node's HTTP endpoint, comma-separated (for the
    /// transaction counters printed at the end; optional).
    #[arg(long, value_delimiter = ',')]
    http_hosts: Vec<String>,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Do not split the keyspace (by default every key gets its own range,
    /// with leases spread over the nodes).
    #[arg(long)]
    no_split: bool,
    #[command(flatten)]
    nemesis: crate::nemesis_args::NemesisArgs,
}

#[derive(clap::Args)]
pub struct BankArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 30)]
    accounts: usize,
    #[arg(long, default_value_t = 100)]
    initial_balance: i64,
    /// Percent of transactions that read every balance.
    #[arg(long, default_value_t = 20)]
    read_percent: u32,
}

#[derive(clap::Args)]
pub struct AppendArgs {
    #[command(flatten)]
    common: Common,
    /// Keys (lists).
    #[arg(long, default_value_t = 10)]
    keys: usize,
    /// Micro-operations per transaction: 1 to this many.
    #[arg(long, default_value_t = 4)]
    max_ops: usize,
    /// Write the history (Elle's JSON lines) here.
    #[arg(long)]
    history: Option<std::path::PathBuf>,
}

/// Prints what the nemesis did, and the processes it left running.
pub(crate) fn faults(faults: &[String], restarted: &[u32]) {
    for f in faults {
        println!("nemesis: {f}");
    }
    if !restarted.is_empty() {
        let pids: Vec<String> = restarted.iter().map(|p| p.to_string()).collect();
        println!("restarted pids: {}", pids.join(","));
    }
}

fn counters(metrics: &[(String, u64)]) {
    if metrics.is_empty() {
        return;
    }
    let parts: Vec<String> = metrics.iter().map(|(n, v)| format!("{n} {v}")).collect();
    println!("transaction counters (all nodes): {}", parts.join(", "));
}

pub async fn bank(a: BankArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let cfg = workload::bank::BankConfig {
        hosts: c.hosts.clone(),
        http: c.http_hosts.clone(),
        accounts: a.accounts.max(2),
        initial_balance: a.initial_balance,
        clients: c.clients.max(1),
        duration: Duration::from_secs(c.duration.max(1)),
        read_percent: a.read_percent.min(100),
        split: !c.no_split,
        seed: c.seed,
        nemesis: c.nemesis.config()?,
    };
    eprintln!(
        "bank workload: {} accounts, {} clients for {}s against {:?}{}",
        cfg.accounts,
        cfg.clients,
        c.duration,
        c.hosts,
        if c.nemesis.nemesis { " with the nemesis" } else { "" }
    );
    let r = workload::bank::run(cfg, |m| eprintln!("{m}"))
        .await
        .map_err(anyhow::Error::msg)?;
    faults(&r.faults, &r.restarted_pids);
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let attempts = r.transfers_ok + r.transfers_failed + r.transfers_unknown + r.reads_ok + r.reads_failed;
    println!(
        "transfers: {} committed ({:.1}/s), {} failed, {} unknown; reads of every balance: {} ok, {} failed; {} retries ({:.1}% of transactions), {} refreshes",
        r.transfers_ok,
        r.transfers_ok as f64 / secs,
        r.transfers_failed,
        r.transfers_unknown,
        r.reads_ok,
        r.reads_failed,
        r.retries,
        100.0 * r.retries as f64 / (attempts + r.retries).max(1) as f64,
        r.refreshes
    );
    counters(&r.metrics);
    for (m, n) in r.errors.iter().take(5) {
        println!("failed {n} times: {m}");
    }
    for b in r.bad_reads.iter().take(10) {
        println!("BAD READ: {b}");
    }
    if let Some(at) = r.first_bad_at {
        println!("first bad read {:.1}s into the load", at.as_secs_f64());
    }
    match r.final_total {
        Some(t) => println!("final total {t} (expected {})", r.expected_total),
        None => println!("final total: no node answered the final read"),
    }
    if !r.ok() {
        bail!(
            "the bank is not consistent: {} bad reads, final total {:?} (expected {})",
            r.bad_reads.len(),
            r.final_total,
            r.expected_total
        );
    }
    println!("bank: consistent");
    Ok(())
}

pub async fn append(a: AppendArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let cfg = workload::append::AppendConfig {
        hosts: c.hosts.clone(),
        http: c.http_hosts.clone(),
        keys: a.keys.max(1),
        clients: c.clients.max(1),
        duration: Duration::from_secs(c.duration.max(1)),
        max_ops: a.max_ops.max(1),
        split: !c.no_split,
        seed: c.seed,
        nemesis: c.nemesis.config()?,
    };
    eprintln!(
        "append workload: {} keys, {} clients for {}s against {:?}{}",
        cfg.keys,
        cfg.clients,
        c.duration,
        c.hosts,
        if c.nemesis.nemesis { " with the nemesis" } else { "" }
    );
    let r = workload::append::run(cfg, |m| eprintln!("{m}"))
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(p) = &a.history {
        std::fs::write(p, format!("{}\n", r.history))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
    }
    faults(&r.faults, &r.restarted_pids);
    println!(
        "transactions: {} ok ({:.1}/s), {} failed, {} unknown, {} retries",
        r.ok,
        r.ok as f64 / r.elapsed.as_secs_f64().max(1e-9),
        r.failed,
        r.unknown,
        r.retries
    );
    counters(&r.metrics);
    if let Some(check) = &r.check {
        println!("{check}");
    }
    if !r.valid() {
        bail!("the history is not serializable (see above)");
    }
    println!("append: serializable");
    Ok(())
}

#[derive(clap::Args)]
pub struct CoordArgs {
    /// host:port of each node's etcd API, comma-separated (clients spread
    /// over them).
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Clients putting the values the watchers must see.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// Leases kept alive (and checked never to expire while kept in time).
    #[arg(long, default_value_t = 3)]
    leases: usize,
    /// Clients taking the lock in turn and writing under it.
    #[arg(long, default_value_t = 3)]
    lockers: usize,
    /// TTL in seconds of the leases and of the lockers' sessions.
    #[arg(long, default_value_t = 4)]
    lease_ttl: i64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keys of the run start with this (default: one of its own).
    #[arg(long)]
    prefix: Option<String>,
    #[command(flatten)]
    nemesis: crate::nemesis_args::NemesisArgs,
}

pub async fn coordination(a: CoordArgs) -> anyhow::Result<()> {
    let prefix = a.prefix.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("coord-{t}/")
    });
    let cfg = workload::coordination::CoordConfig {
        hosts: a.hosts.clone(),
        duration: Duration::from_secs(a.duration.max(1)),
        writers: a.writers.max(1),
        watchers: a.watchers.max(1),
        leases: a.leases,
        lockers: a.lockers,
        lease_ttl: a.lease_ttl.max(2),
        seed: a.seed,
        prefix,
        nemesis: a.nemesis.config()?,
    };
    eprintln!(
        "coordination workload: {} writers, {} watchers, {} leases, {} lockers for {}s against {:?}{}",
        cfg.writers,
        cfg.watchers,
        cfg.leases,
        cfg.lockers,
        a.duration,
        a.hosts,
        if a.nemesis.nemesis { " with the nemesis" } else { "" }
    );
    let r = workload::coordination::run(cfg, |m| eprintln!("{m}"))
        .await
        .map_err(anyhow::Error::msg)?;
    faults(&r.faults, &r.restarted_pids);
    println!(
        "watches: {} writes acknowledged, {} unknown; events seen per watcher {:?}; {} resumes",
        r.writes_ok, r.writes_unknown, r.watch_events, r.watch_resumes
    );
    println!(
        "leases: {} keep-alives answered; {} leases expired after keep-alives came late",
        r.keepalives_ok, r.leases_expired_excused
    );
    println!(
        "locks: {} taken; guarded writes {} acknowledged, {} refused by their fence, {} applied",
        r.locks_taken, r.guarded_ok, r.guarded_refused, r.guarded_applied
    );
    for p in r
        .watch_problems
        .iter()
        .chain(&r.lease_problems)
        .chain(&r.fencing_problems)
        .take(20)
    {
        println!("PROBLEM: {p}");
    }
    if !r.ok() {
        bail!(
            "coordination checks failed: {} watch, {} lease, {} fencing problems",
            r.watch_problems.len(),
            r.lease_problems.len(),
            r.fencing_problems.len()
        );
    }
    println!("coordination: every watch complete and in order, no lease expired while kept alive, every guarded write fenced");
    Ok(())
}
