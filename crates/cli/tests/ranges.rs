//! Ranges that split, over the native KV API, on three-node clusters of real
//! processes: meta lookups from nodes with no replica, stale range caches
//! corrected without a client error, administrative splits and their bad
//! input, automatic splits by size and by load.

mod common;

use std::time::Duration;

use common::cluster::*;
use common::{http_get, tardigrade};
use proto::kvpb::{self, kv_client::KvClient, request_union::Value as Req, response_union::Value as Resp};

async fn native(addr: &str) -> KvClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");
    KvClient::new(ch)
}

async fn batch(addr: &str, reqs: Vec<Req>, limit: i64) -> Result<kvpb::BatchResponse, String> {
    let r = native(addr)
        .await
        .batch(kvpb::BatchRequest {
            header: Some(kvpb::Header {
                max_span_request_keys: limit,
                ..Default::default()
            }),
            requests: reqs
                .into_iter()
                .map(|v| kvpb::RequestUnion { value: Some(v) })
                .collect(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match r.error {
        Some(e) => Err(e.message),
        None => Ok(r),
    }
}

fn put(k: &str, v: &str) -> Req {
    Req::Put(kvpb::PutRequest {
        key: k.into(),
        value: v.into(),
    })
}

fn scan(s: &str, e: &str) -> Req {
    Req::Scan(kvpb::ScanRequest {
        start_key: s.into(),
        end_key: e.into(),
    })
}

fn scanned(r: &kvpb::BatchResponse, i: usize) -> (Vec<String>, Option<String>) {
    match r.responses[i].value.as_ref() {
        Some(Resp::Scan(s)) => (
            s.rows
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect(),
            s.resume_span
                .as_ref()
                .map(|rs| String::from_utf8_lossy(&rs.start_key).into_owned()),
        ),
        other => panic!("not a scan: {other:?}"),
    }
}

fn metric(http: &str, name: &str) -> u64 {
    let (_, body) = http_get(http, "/metrics").expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn user_ranges(c: &Cluster, i: usize) -> Vec<proto::storage::RangeDescriptor> {
    let mut ds: Vec<_> = c
        .ranges(i)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.descriptor)
        .filter(|d| d.start_key.as_slice() >= b"\x11".as_slice())
        .collect();
    ds.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    ds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_kv_across_admin_splits_through_any_node() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let (a, b, z) = (&c.nodes[0].grpc, &c.nodes[1].grpc, &c.nodes[2].grpc);
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
    let puts = keys.iter().map(|k| put(k, &format!("v-{k}"))).collect();
    batch(a, puts, 0).await.expect("100 puts in one batch");
    // Node 1's cache holds the one user range now.
    let r = batch(a, vec![scan("k", "l")], 0).await.unwrap();
    assert_eq!(scanned(&r, 0).0.len(), 100);

    // Four splits, asked of node 2.
    for k in ["k020", "k040", "k060", "k080"] {
        let (code, out, err) = tardigrade(&["debug", "split", "--key", k, "--host", b]);
        assert_eq!(code, 0, "split at {k}: {out}{err}");
        assert!(out.contains("split: range"), "{out}");
    }
    wait(
        "five user ranges on every node, replicated",
        10 * ELECTION * 4,
        || async {
            for i in 0..3 {
                let ds = user_ranges(&c, i).await;
                if ds.len() != 5 || ds.iter().any(|d| d.replicas.len() != 3) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let ds = user_ranges(&c, 0).await;
    let bounds: Vec<&[u8]> = ds.iter().map(|d| d.start_key.as_slice()).collect();
    assert_eq!(bounds, [&b"\x11"[..], b"k020", b"k040", b"k060", b"k080"]);
    for w in ds.windows(2) {
        assert_eq!(w[0].end_key, w[1].start_key, "the halves tile the keyspace");
    }

    // Node 1's cache is stale (one range): corrected without an error.
    let before = metric(&c.nodes[0].http, "tardigrade_range_cache_corrections_total");
    let r = batch(a, vec![scan("k", "l"), put("k050", "new")], 0)
        .await
        .expect("a stale cache is corrected");
    assert_eq!(scanned(&r, 0).0, keys);
    assert!(metric(&c.nodes[0].http, "tardigrade_range_cache_corrections_total") > before);
    // Node 3 never sent a native request: meta lookups find every range.
    let r = batch(z, vec![scan("k", "l")], 0).await.unwrap();
    assert_eq!(scanned(&r, 0).0, keys);
    assert!(metric(&c.nodes[2].http, "tardigrade_range_cache_misses_total") >= 1);
    // A limit across ranges stops with a resume key.
    let r = batch(z, vec![scan("k", "l")], 30).await.unwrap();
    let (got, resume) = scanned(&r, 0);
    assert_eq!(got, keys[..30]);
    assert_eq!(resume.as_deref(), Some("k030"));
    // Writes to every range, through every node; the value just written is read.
    for (i, node) in [a, b, z].into_iter().enumerate() {
        for k in ["k001", "k025", "k045", "k065", "k099"] {
            let v = format!("n{i}");
            batch(node, vec![put(k, &v)], 0).await.expect("write");
            let r = batch(node, vec![Req::Get(kvpb::GetRequest { key: k.into() })], 0)
                .await
                .unwrap();
            match r.responses[0].value.as_ref() {
                Some(Resp::Get(g)) => assert_eq!(g.kv.as_ref().map(|kv| kv.value.clone()), Some(v.into_bytes())),
                other => panic!("{other:?}"),
            }
        }
    }
    // The meta records name every range (a lookup from any node agrees).
    assert!(
        metric(&c.nodes[1].http, "tardigrade_range_splits_total")
            + metric(&c.nodes[0].http, "tardigrade_range_splits_total")
            + metric(&c.nodes[2].http, "tardigrade_range_splits_total")
            >= 4
    );

    // Bad input: a boundary, the etcd or system keyspace, past the end.
    for (k, want) in [
        ("k040", "already a range boundary"),
        ("\\x10foo", "outside the user keyspace"),
        ("\\x01", "outside the user keyspace"),
        ("\\xff\\xff", "outside the user keyspace"),
    ] {
        let (code, out, err) = tardigrade(&["debug", "split", "--key", k, "--host", a]);
        assert_ne!(code, 0, "split at {k} must fail: {out}");
        assert!(err.contains(want), "split at {k}: {err}");
    }
    // The native API refuses keys outside the user keyspace.
    let err = batch(a, vec![put("\x10etcd", "x")], 0).await.unwrap_err();
    assert!(err.contains("outside the user keyspace"), "{err}");
}
