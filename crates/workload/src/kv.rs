//! `kv`: N concurrent clients doing puts and gets over etcd's v3 KV API
//! (so the same requests drive Tardigrade and etcd) or Tardigrade's native
//! KV API (keys spread over the prefixes 0000..ffff, so over many ranges
//! once split there, as `workload splits` does), spread over the given hosts; for a duration or a number of
//! operations; with a progress line every second; reporting ops/s and
//! latency percentiles (hdrhistogram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proto::etcdserverpb::{kv_client::KvClient as EtcdClient, PutRequest, RangeRequest};
use proto::kvpb::{self, kv_client::KvClient as NativeClient, request_union::Value as Req};
use tonic::transport::Channel;

use crate::put::WorkloadError;
use crate::register_client::Api;

#[derive(Clone, Debug)]
pub struct KvConfig {
    /// host:port of each endpoint; client i uses host i mod n.
    pub hosts: Vec<String>,
    pub api: Api,
    pub concurrency: usize,
    /// Stop after this long, or after `max_ops` operations, whichever first.
    pub duration: Duration,
    pub max_ops: Option<u64>,
    /// Share of operations that are gets (0-100); the rest are puts.
    pub read_percent: u32,
    pub keys: u64,
    pub value_bytes: usize,
    pub seed: u64,
}

#[derive(Debug)]
pub struct KvReport {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency in microseconds, every operation.
    pub latency: Histogram<u64>,
}

impl KvReport {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

enum Client {
    Etcd(EtcdClient<Channel>),
    Native(NativeClient<Channel>),
}

/// The key of key number `n`.
fn key(api: Api, n: u64) -> Vec<u8> {
    match api {
        Api::Etcd => format!("workload/kv/{n:08}").into_bytes(),
        // Four hex digits from a multiplicative hash first: neighbours land
        // on different ranges once the keyspace is split at 0000..ffff
        // (`workload splits` splits there).
        Api::Native => format!(
            "{:04x}/workload/kv/{n:08}",
            (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48) & 0xffff
        )
        .into_bytes(),
    }
}

impl Client {
    async fn put(&mut self, k: Vec<u8>, v: Vec<u8>) -> Result<(), String> {
        match self {
            Client::Etcd(c) => c
                .put(PutRequest {
                    key: k,
                    value: v,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
            Client::Native(c) => native(c, Req::Put(kvpb::PutRequest { key: k, value: v })).await,
        }
    }

    async fn get(&mut self, k: Vec<u8>) -> Result<(), String> {
        match self {
            Client::Etcd(c) => c
                .range(RangeRequest {
                    key: k,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|s| s.message().to_string()),
            Client::Native(c) => native(c, Req::Get(kvpb::GetRequest { key: k })).await,
        }
    }
}

async fn native(c: &mut NativeClient<Channel>, r: Req) -> Result<(), String> {
    let resp = c
        .batch(kvpb::BatchRequest {
            header: None,
            requests: vec![kvpb::RequestUnion { value: Some(r) }],
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    match resp.error {
        Some(e) => Err(e.message),
        None => Ok(()),
    }
}

async fn connect(api: Api, host: &str) -> Result<Client, WorkloadError> {
    let ch = Channel::from_shared(format!("http://{host}"))
        .map_err(|e| WorkloadError::Connect(host.into(), e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| WorkloadError::Connect(host.into(), e.to_string()))?;
    Ok(match api {
        Api::Etcd => Client::Etcd(EtcdClient::new(ch)),
        Api::Native => Client::Native(NativeClient::new(ch)),
    })
}

/// Runs the workload; `progress` is called about every second with the
/// operations done so far and the time elapsed.
pub async fn run(cfg: KvConfig, progress: impl Fn(u64, Duration) + Send + 'static) -> Result<KvReport, WorkloadError> {
    if cfg.hosts.is_empty() {
        return Err(WorkloadError::Connect("".into(), "no hosts".into()));
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let value = vec![b'v'; cfg.value_bytes];
    let mut tasks = Vec::new();
    for i in 0..cfg.concurrency.max(1) {
        // One connection per client, as separate client processes would.
        let host = cfg.hosts[i % cfg.hosts.len()].clone();
        let mut client = connect(cfg.api, &host).await?;
        let value = value.clone();
        let cfg = cfg.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
            let (mut reads, mut writes, mut errors) = (0u64, 0u64, 0u64);
            let mut x = cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            loop {
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(max) = cfg.max_ops {
                    if done.fetch_add(1, Ordering::Relaxed) >= max {
                        break;
                    }
                } else {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = key(cfg.api, x % cfg.keys.max(1));
                let read = (x >> 40) % 100 < cfg.read_percent as u64;
                let t = Instant::now();
                let r = if read {
                    client.get(k).await
                } else {
                    client.put(k, value.clone()).await
                };
                match r {
                    Ok(()) => {
                        h.record(t.elapsed().as_micros().max(1) as u64).ok();
                        if read {
                            reads += 1;
                        } else {
                            writes += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, String>((h, reads, writes, errors))
        }));
    }
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                progress(done.load(Ordering::Relaxed), start.elapsed());
            }
        })
    };
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| WorkloadError::Histogram(e.to_string()))?;
    let (mut reads, mut writes, mut errors) = (0, 0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok((h, r, w, e))) => {
                latency.add(&h).map_err(|e| WorkloadError::Histogram(e.to_string()))?;
                reads += r;
                writes += w;
                errors += e;
            }
            Ok(Err(e)) => return Err(WorkloadError::Histogram(e)),
            Err(e) => return Err(WorkloadError::Histogram(e.to_string())),
        }
    }
    ticker.abort();
    Ok(KvReport {
        ops: reads + writes,
        reads,
        writes,
        errors,
        elapsed: start.elapsed(),
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_keys_spread_over_the_hex_prefixes() {
        let prefixes: std::collections::BTreeSet<Vec<u8>> =
            (0..1000).map(|n| key(Api::Native, n)[..2].to_vec()).collect();
        assert!(prefixes.len() > 200, "{} prefixes", prefixes.len());
        assert!(key(Api::Etcd, 7).starts_with(b"workload/kv/"));
    }
}
