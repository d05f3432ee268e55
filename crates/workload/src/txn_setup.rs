//! What the transaction workloads (`bank`, `append`) share: splitting
//! their keyspace into ranges whose leases sit on every node, connecting
//! clients, and reading the transaction counters of the nodes' `/metrics`.
//!
//! It talks to the cluster only through its public APIs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use proto::admin::{admin_client::AdminClient, SplitRequest};
use proto::kvpb::kv_client::KvClient;
use tonic::transport::Channel;

/// A native KV client of `host`, with the timeouts every workload uses.
pub async fn client(host: &str) -> Result<KvClient<Channel>, String> {
    let ch = Channel::from_shared(format!("http://{host}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect_lazy();
    Ok(KvClient::new(ch))
}

/// Splits at every key of `keys` (through the hosts in turn; a key already
/// a boundary is fine), then moves the lease of the range starting at the
/// i-th key to the i-th voter of it (so leases sit on every node). Returns
/// how many leases moved.
pub async fn split_and_spread(hosts: &[String], keys: &[Vec<u8>], progress: &dyn Fn(&str)) -> Result<usize, String> {
    let mut ranges = Vec::new();
    for (n, key) in keys.iter().enumerate().rev() {
        let mut last = String::new();
        let mut range = None;
        for attempt in 0..40 {
            let host = &hosts[(n + attempt) % hosts.len()];
            let Ok(ch) = kv::admin::connect(host).await else {
                continue;
            };
            match AdminClient::new(ch)
                .split(SplitRequest { split_key: key.clone() })
                .await
            {
                Ok(r) => {
                    range = r.into_inner().right.map(|d| d.range_id);
                    break;
                }
                Err(s) if s.message().contains("already a range boundary") => {
                    range = Some(0);
                    break;
                }
                Err(s) => last = s.message().to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match range {
            Some(r) => ranges.push((n, r)),
            None => return Err(format!("split at {key:?} failed: {last}")),
        }
    }
    progress(&format!("{} ranges split off; spreading their leases", ranges.len()));
    let mut moved = 0;
    for (n, range) in ranges {
        if range == 0 {
            continue;
        }
        for attempt in 0..10 {
            let host = &hosts[(n + attempt) % hosts.len()];
            let Ok(lease) = kv::admin::find_lease(host, range).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut voters = lease.voter_nodes.clone();
            voters.sort_unstable();
            let Some(&to) = voters.get(n % voters.len().max(1)) else {
                break;
            };
            if to == lease.leaseholder_node {
                break;
            }
            if kv::admin::transfer_lease(host, range, to).await.is_ok() {
                moved += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(moved)
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The transaction counters (`tardigrade_txn_*`), summed over the nodes'
/// HTTP endpoints, by name (without the prefix and `_total`).
pub fn txn_metrics(http: &[String]) -> Vec<(String, u64)> {
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    for h in http {
        let Some(body) = http_get(h, "/metrics") else { continue };
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("tardigrade_txn_") else {
                continue;
            };
            let mut it = rest.split_whitespace();
            let (Some(name), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let name = name.trim_end_matches("_total").to_string();
            *sums.entry(name).or_default() += v.parse::<u64>().unwrap_or(0);
        }
    }
    sums.into_iter().collect()
}
