//! SIGKILL a node during a stream of writes, restart it, and check that every
//! acknowledged write is there, revisions never go backwards, and nothing was
//! applied twice. Three kills, real processes on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, start_tardigrade_at};
use proto::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};

const CLIENTS: u64 = 8;

#[derive(Default, Clone)]
struct ClientLog {
    /// Writes acknowledged: i -> revision.
    acked: BTreeMap<u64, i64>,
    /// A write sent whose answer never came (it may or may not be applied).
    in_flight: Option<u64>,
}

async fn writer(addr: String, c: u64, start: u64, log: Arc<Mutex<ClientLog>>) {
    let Ok(mut kv) = KvClient::connect(format!("http://{addr}")).await else {
        return;
    };
    let mut i = start;
    loop {
        log.lock().unwrap().in_flight = Some(i);
        let req = PutRequest {
            key: format!("counter-{c}").into(),
            value: i.to_string().into(),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(2), kv.put(req)).await {
            Ok(Ok(r)) => {
                let rev = r.into_inner().header.map_or(0, |h| h.revision);
                let mut l = log.lock().unwrap();
                l.acked.insert(i, rev);
                l.in_flight = None;
            }
            _ => return, // the node is gone: the in-flight write stays unknown
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_nothing_applies_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let grpc = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..CLIENTS)
        .map(|_| Arc::new(Mutex::new(ClientLog::default())))
        .collect();
    // Writes whose answer was lost but which did apply, per client.
    let mut unknown_applied = vec![0i64; CLIENTS as usize];
    let mut max_rev = 0i64;
    let mut next_i = vec![0u64; CLIENTS as usize];
    for round in 0..4 {
        let mut node = start_tardigrade_at(&store, &grpc, &health);
        node.wait_healthy(Duration::from_secs(20));
        let mut kv = KvClient::connect(format!("http://{grpc}")).await.unwrap();
        let mut total_acked = 0;
        for c in 0..CLIENTS {
            let ci = c as usize;
            let l = logs[ci].lock().unwrap().clone();
            total_acked += l.acked.len();
            let r = kv
                .range(RangeRequest {
                    key: format!("counter-{c}").into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                r.header.unwrap().revision >= max_rev,
                "round {round}: the revision went backwards"
            );
            let Some(got) = r.kvs.first() else {
                assert!(
                    l.acked.is_empty(),
                    "round {round}: client {c} lost every acknowledged write"
                );
                next_i[ci] = l.in_flight.map_or(0, |f| f + 1);
                logs[ci].lock().unwrap().in_flight = None;
                continue;
            };
            let acked = l.acked.len() as i64;
            let known = acked + unknown_applied[ci];
            let maybe = l.in_flight.is_some() as i64;
            // Every put applies once: the key's version counts them.
            assert!(
                got.version >= known,
                "round {round}: client {c}: {known} writes known applied, version {}: an acknowledged write is lost",
                got.version
            );
            assert!(
                got.version <= known + maybe,
                "round {round}: client {c}: version {} above {known} known + {maybe} unknown: a write applied twice",
                got.version
            );
            unknown_applied[ci] += got.version - known;
            let v: u64 = String::from_utf8_lossy(&got.value).parse().unwrap();
            let last_acked = l.acked.keys().next_back().copied();
            assert!(
                Some(v) == last_acked || Some(v) == l.in_flight,
                "round {round}: client {c}: value {v} is neither the last acknowledged nor the unknown write"
            );
            assert!(
                got.mod_revision >= *l.acked.values().next_back().unwrap_or(&0),
                "round {round}: client {c}: revision moved back"
            );
            next_i[ci] = l.in_flight.map_or(v, |f| f.max(v)) + 1;
            logs[ci].lock().unwrap().in_flight = None;
        }
        max_rev = max_rev.max(
            logs.iter()
                .filter_map(|l| l.lock().unwrap().acked.values().copied().max())
                .max()
                .unwrap_or(0),
        );
        if round == 3 {
            assert!(total_acked > 50, "too few writes to test anything ({total_acked})");
            println!("3 SIGKILLs mid-stream; {total_acked} acknowledged writes all present, none applied twice; revisions never moved back");
            break;
        }
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| tokio::spawn(writer(grpc.clone(), c, next_i[c as usize], logs[c as usize].clone())))
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        node.kill9();
        for h in handles {
            let _ = h.await;
        }
    }
}
