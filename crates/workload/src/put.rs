//! `put`: N concurrent clients each writing keys through etcd's KV API, for a
//! fixed duration; reports throughput and latency percentiles. Works against
//! any etcd v3 endpoint (Tardigrade or etcd itself), so the two can be compared
//! in the same run.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proto::etcdserverpb::{kv_client::KvClient, PutRequest};

#[derive(Clone, Debug)]
pub struct PutConfig {
    /// host:port of an etcd v3 endpoint.
    pub endpoint: String,
    pub clients: usize,
    pub duration: Duration,
    pub value_bytes: usize,
    /// Distinct keys per client (keys are reused round-robin).
    pub keys_per_client: u64,
}

#[derive(Debug)]
pub struct PutReport {
    pub writes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
}

impl PutReport {
    pub fn per_second(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64()
    }
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("histogram: {0}")]
    Histogram(String),
}

/// Runs the workload; returns when `duration` has passed.
pub async fn run(cfg: PutConfig) -> Result<PutReport, WorkloadError> {
    let url = format!("http://{}", cfg.endpoint);
    let mut clients = Vec::new();
    for _ in 0..cfg.clients.max(1) {
        let c = KvClient::connect(url.clone())
            .await
            .map_err(|e| WorkloadError::Connect(cfg.endpoint.clone(), e.to_string()))?;
        clients.push(c);
    }
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let value = vec![b'v'; cfg.value_bytes];
    let mut tasks = Vec::new();
    for (i, mut kv) in clients.into_iter().enumerate() {
        let value = value.clone();
        let keys = cfg.keys_per_client.max(1);
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
            let (mut n, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let key = format!("workload/put/{i}/{}", n % keys).into_bytes();
                let t = Instant::now();
                match kv
                    .put(PutRequest {
                        key,
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => {
                        h.record(t.elapsed().as_micros().max(1) as u64).ok();
                        n += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, String>((h, n, errors))
        }));
    }
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| WorkloadError::Histogram(e.to_string()))?;
    let (mut writes, mut errors) = (0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok((h, n, e))) => {
                latency.add(&h).map_err(|e| WorkloadError::Histogram(e.to_string()))?;
                writes += n;
                errors += e;
            }
            Ok(Err(e)) => return Err(WorkloadError::Histogram(e)),
            Err(e) => return Err(WorkloadError::Histogram(e.to_string())),
        }
    }
    Ok(PutReport {
        writes,
        errors,
        elapsed: start.elapsed(),
        latency,
    })
}
