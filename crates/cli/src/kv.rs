//! `tardigrade kv` and `tardigrade debug`: clients of a node's gRPC APIs.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use proto::admin::{admin_client::AdminClient, RangesRequest};
use proto::etcdserverpb::{
    compare, kv_client::KvClient, request_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};
use tonic::transport::Channel;

#[derive(Subcommand)]
pub enum KvCmd {
    /// Write VALUE at KEY.
    Put {
        key: String,
        value: String,
        /// Print the previous value too.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Read KEY (or every key starting with it, with --prefix).
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Read at this revision (a past state).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
    /// Delete KEY (or every key starting with it, with --prefix).
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// List keys in [START, END) (END omitted: to the end).
    Scan {
        start: String,
        end: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: i64,
    },
    /// Compare-and-swap: set KEY to NEW only if its value is EXPECTED.
    Cas { key: String, expected: String, new: String },
    /// Add BY to the integer at KEY (absent counts as 0); with --raw only.
    Incr {
        key: String,
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
}

async fn connect(host: &str) -> Result<Channel> {
    Ok(kv::admin::connect(host).await?)
}

pub fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

pub fn show(s: &[u8]) -> String {
    String::from_utf8_lossy(s).into_owned()
}

pub async fn run(cmd: KvCmd, host: &str, raw: bool) -> Result<()> {
    if raw {
        return crate::raw_kv::run(cmd, host).await;
    }
    let mut kv = KvClient::new(connect(host).await?);
    match cmd {
        KvCmd::Incr { .. } => bail!("incr is a native KV request: use tardigrade kv --raw incr"),
        KvCmd::Put { key, value, prev_kv } => {
            let r = kv
                .put(PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    prev_kv,
                    ..Default::default()
                })
                .await
                .context("put failed")?
                .into_inner();
            println!("OK (revision {})", r.header.map_or(0, |h| h.revision));
            if let Some(p) = r.prev_kv {
                println!("previous: {}", show(&p.value));
            }
        }
        KvCmd::Get {
            key,
            prefix,
            rev,
            limit,
        } => {
            let k = key.into_bytes();
            let range_end = if prefix { prefix_end(&k) } else { Vec::new() };
            let r = kv
                .range(RangeRequest {
                    key: k,
                    range_end,
                    revision: rev,
                    limit,
                    ..Default::default()
                })
                .await
                .context("get failed")?
                .into_inner();
            for kv in r.kvs {
                println!("{}\n{}", show(&kv.key), show(&kv.value));
            }
        }
        KvCmd::Del { key, prefix } => {
            let k = key.into_bytes();
            let range_end = if prefix { prefix_end(&k) } else { Vec::new() };
            let r = kv
                .delete_range(DeleteRangeRequest {
                    key: k,
                    range_end,
                    prev_kv: false,
                })
                .await
                .context("delete failed")?
                .into_inner();
            println!("{}", r.deleted);
        }
        KvCmd::Scan { start, end, limit } => {
            let range_end = end.map(String::into_bytes).unwrap_or_else(|| vec![0]);
            let r = kv
                .range(RangeRequest {
                    key: start.into_bytes(),
                    range_end,
                    limit,
                    ..Default::default()
                })
                .await
                .context("scan failed")?
                .into_inner();
            for kv in &r.kvs {
                println!(
                    "{}\t{}\t(mod revision {}, version {})",
                    show(&kv.key),
                    show(&kv.value),
                    kv.mod_revision,
                    kv.version
                );
            }
            if r.more {
                println!("... more keys ({} in the span)", r.count);
            }
        }
        KvCmd::Cas { key, expected, new } => {
            let k = key.into_bytes();
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Value as i32,
                    key: k.clone(),
                    target_union: Some(compare::TargetUnion::Value(expected.into_bytes())),
                    range_end: Vec::new(),
                }],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: k,
                        value: new.into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            };
            let r = kv.txn(txn).await.context("cas failed")?.into_inner();
            if r.succeeded {
                println!("OK (revision {})", r.header.map_or(0, |h| h.revision));
            } else {
                bail!("not swapped: the current value is not the expected one");
            }
        }
    }
    Ok(())
}

/// Initializes the cluster through `host`. Waits up to `wait` for the node to
/// answer (it may still be starting, as in a container); with
/// `ok_if_initialized`, a cluster that already exists is success, so a
/// one-shot init service can run at every start.
pub async fn init(host: &str, wait: std::time::Duration, ok_if_initialized: bool) -> Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let attempt = async {
            let mut m = proto::cluster::membership_client::MembershipClient::new(connect(host).await?);
            m.init(proto::cluster::InitRequest {}).await.map_err(anyhow::Error::new)
        };
        let err = match attempt.await {
            Ok(r) => {
                println!("cluster {} initialized", r.into_inner().cluster_id);
                return Ok(());
            }
            Err(e) => e,
        };
        if let Some(s) = err.downcast_ref::<tonic::Status>() {
            if s.code() == tonic::Code::AlreadyExists {
                if ok_if_initialized {
                    println!("{}: nothing to do", s.message());
                    return Ok(());
                }
                bail!("init failed: {}", s.message());
            }
            if s.code() != tonic::Code::Unavailable {
                bail!("init failed: {}", s.message());
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(err.context(format!("init failed: {host} does not answer")));
        }
        eprintln!("waiting for {host} to answer: {err:#}");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Asks a node's HTTP endpoint whether it can serve (`GET /health`): the
/// health check of containers, whose image has no shell or curl. Prints the
/// answer; fails unless it is 200.
pub async fn node_health(http_addr: &str, timeout: std::time::Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(http_addr)
            .await
            .with_context(|| format!("cannot reach {http_addr}"))?;
        s.write_all(format!("GET /health HTTP/1.0\r\nHost: {http_addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(64 << 10).read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let answer = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| anyhow::anyhow!("{http_addr} did not answer within {timeout:?}"))??;
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    println!("{body}");
    if status != "200" {
        bail!("{http_addr} is not healthy (HTTP {status})");
    }
    Ok(())
}

pub async fn node_status(host: &str) -> Result<()> {
    let mut admin = AdminClient::new(connect(host).await?);
    let r = admin
        .nodes(proto::admin::NodesStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("node status failed: {}", s.message()))?
        .into_inner();
    println!("cluster {} (as seen by node {})", r.cluster_id, r.node_id);
    println!(
        "{:<5} {:<22} {:<6} {:>6} {:>11} {:>9} {:>7} {:>12}",
        "node", "address", "live", "epoch", "expires in", "replicas", "leases", "live bytes"
    );
    for n in r.nodes {
        // Per-store figures come from each node itself.
        let (replicas, leases, bytes) = match connect(&n.addr).await {
            Ok(ch) => match AdminClient::new(ch).ranges(RangesRequest {}).await {
                Ok(rr) => {
                    let rr = rr.into_inner();
                    let leases = rr.ranges.iter().filter(|x| x.lease_valid).count();
                    let bytes: i64 = rr.ranges.iter().map(|x| x.stats.map_or(0, |s| s.live_bytes)).sum();
                    (rr.ranges.len().to_string(), leases.to_string(), bytes.to_string())
                }
                Err(_) => ("?".into(), "?".into(), "?".into()),
            },
            Err(_) => ("?".into(), "?".into(), "?".into()),
        };
        println!(
            "{:<5} {:<22} {:<6} {:>6} {:>11} {:>9} {:>7} {:>12}",
            n.node_id,
            n.addr,
            if n.live { "live" } else { "dead" },
            if n.liveness_epoch == 0 {
                "-".to_string()
            } else {
                n.liveness_epoch.to_string()
            },
            if n.liveness_epoch == 0 {
                "-".to_string()
            } else {
                format!("{:.1}s", n.liveness_expires_in_ms as f64 / 1000.0)
            },
            replicas,
            leases,
            bytes
        );
    }
    Ok(())
}

/// Which ranges `debug ranges` shows and how.
pub struct RangesView {
    /// Only ranges overlapping `[start, end)` (keys as `debug ranges` prints
    /// them, `\xNN` for other bytes; an empty end is the end of the keyspace).
    pub start: String,
    pub end: String,
    /// Only the closing summary line.
    pub summary: bool,
}

/// A key as `show_key` prints it: printable bytes as they are, others `\xNN`.
pub fn parse_key(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = s
                .get(i + 2..i + 4)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .with_context(|| format!("bad escape at byte {i}: \\x needs two hex digits"))?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad escape \\x{hex}"))?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

pub async fn split(host: &str, key: &str) -> Result<()> {
    let key = parse_key(key)?;
    let mut admin = AdminClient::new(connect(host).await?);
    let r = admin
        .split(proto::admin::SplitRequest { split_key: key })
        .await
        .map_err(|s| anyhow::anyhow!("split failed: {}", s.message()))?
        .into_inner();
    let (Some(l), Some(r)) = (r.left, r.right) else {
        bail!("the node answered without the two ranges");
    };
    println!(
        "split: range {} [{}, {}) and range {} [{}, {})",
        l.range_id,
        show_key(&l.start_key),
        show_key(&l.end_key),
        r.range_id,
        show_key(&r.start_key),
        show_key(&r.end_key)
    );
    Ok(())
}

pub async fn merge(host: &str, key: &str) -> Result<()> {
    let key = parse_key(key)?;
    let mut admin = AdminClient::new(connect(host).await?);
    let r = admin
        .merge(proto::admin::MergeRequest { key })
        .await
        .map_err(|s| anyhow::anyhow!("merge failed: {}", s.message()))?
        .into_inner();
    let d = r.merged.context("the node answered without the merged range")?;
    println!(
        "merged: range {} [{}, {})",
        d.range_id,
        show_key(&d.start_key),
        show_key(&d.end_key)
    );
    Ok(())
}

pub async fn debug_ranges(host: &str, view: &RangesView) -> Result<()> {
    let (start, end) = (parse_key(&view.start)?, parse_key(&view.end)?);
    let mut admin = AdminClient::new(connect(host).await?);
    let r = admin
        .ranges(RangesRequest {})
        .await
        .context("ranges failed")?
        .into_inner();
    let total = r.ranges.len();
    let shown: Vec<_> = r
        .ranges
        .into_iter()
        .filter(|info| {
            let d = info.descriptor.clone().unwrap_or_default();
            (d.end_key.is_empty() || start < d.end_key) && (end.is_empty() || d.start_key < end)
        })
        .collect();
    let leases = shown.iter().filter(|i| i.lease_valid).count();
    let bytes: i64 = shown.iter().map(|i| i.stats.map_or(0, |s| s.live_bytes)).sum();
    let summary = format!(
        "{} of {total} ranges on node {} shown; {leases} leases held here; {bytes} live bytes",
        shown.len(),
        r.node_id
    );
    if view.summary {
        println!("{summary}");
        return Ok(());
    }
    println!("node {}", r.node_id);
    println!(
        "{:<6} {:<8} {:<22} {:<10} {:<7} {:<6} {:<9} {:<9} {:>8} {:>10} {:>7}",
        "range", "name", "span", "replicas", "leader", "term", "commit", "applied", "keys", "live bytes", "lease"
    );
    for info in shown {
        let d = info.descriptor.unwrap_or_default();
        let st = info.stats.unwrap_or_default();
        let replicas: Vec<String> = d
            .replicas
            .iter()
            .map(|x| {
                use proto::storage::replica_descriptor::Type;
                let kind = match Type::try_from(x.r#type) {
                    Ok(Type::Voter) => "",
                    Ok(Type::Learner) => "(learner)",
                    Ok(Type::VoterIncoming) => "(incoming)",
                    Ok(Type::VoterOutgoing) => "(outgoing)",
                    Err(_) => "(?)",
                };
                format!("n{}{kind}", x.node_id)
            })
            .collect();
        println!(
            "{:<6} {:<8} {:<22} {:<10} {:<7} {:<6} {:<9} {:<9} {:>8} {:>10} {:>7}",
            d.range_id,
            info.name,
            format!("[{}, {})", show_key(&d.start_key), show_key(&d.end_key)),
            replicas.join(","),
            info.raft_leader,
            info.raft_term,
            info.commit_index,
            info.applied_index,
            st.key_count,
            st.live_bytes,
            if info.lease_valid { "valid" } else { "-" }
        );
    }
    println!("{summary}");
    Ok(())
}

fn show_key(k: &[u8]) -> String {
    k.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// `debug transfer-lease`: finds the range's leaseholder through `host`,
/// asks it to move the lease to `to_node`, and says where the lease is now.
pub async fn transfer_lease(host: &str, range: u64, to_node: u64) -> Result<()> {
    let (from, to) = kv::admin::transfer_lease(host, range, to_node).await?;
    if from == to {
        println!("range {range}: node {to} holds the lease already");
    } else {
        println!("range {range}: lease moved from node {from} to node {to}");
    }
    Ok(())
}
