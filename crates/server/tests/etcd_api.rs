//! etcd's KV API on an in-process single node, over real loopback gRPC:
//! semantics, etcd's errors on bad input, revisions across a restart, and
//! concurrent compare-and-swap.

use std::time::Duration;

use proto::etcdserverpb::{
    compare, kv_client::KvClient, range_request, request_op, response_op, CompactionRequest, Compare,
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use server::{Node, NodeConfig};
use tonic::transport::Channel;
use tonic::Code;

async fn start(dir: &std::path::Path) -> Node {
    let mut cfg = NodeConfig::new(dir);
    cfg.listen_addr = ([127, 0, 0, 1], 0).into();
    cfg.http_addr = ([127, 0, 0, 1], 0).into();
    cfg.tick = Duration::from_millis(20);
    Node::start(cfg).await.expect("node starts")
}

async fn client(node: &Node) -> KvClient<Channel> {
    let c = KvClient::connect(format!("http://{}", node.grpc_addr()))
        .await
        .expect("connect");
    c.max_decoding_message_size(8 << 20).max_encoding_message_size(8 << 20)
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

fn get(k: &str) -> RangeRequest {
    RangeRequest {
        key: k.into(),
        ..Default::default()
    }
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put(k, v))),
    }
}

fn value_eq(k: &str, v: &str) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Value as i32,
        key: k.into(),
        target_union: Some(compare::TargetUnion::Value(v.into())),
        range_end: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_semantics_match_etcds() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let mut kv = client(&node).await;

    let r1 = kv
        .put(put("a", "1"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let p = kv
        .put(PutRequest {
            prev_kv: true,
            ..put("a", "2")
        })
        .await
        .unwrap()
        .into_inner();
    let r2 = p.header.unwrap().revision;
    assert!(r2 > r1, "revisions strictly increase");
    assert_eq!(p.prev_kv.unwrap().value, b"1");
    kv.put(put("ab", "x")).await.unwrap();
    kv.put(put("b", "y")).await.unwrap();

    let g = kv.range(get("a")).await.unwrap().into_inner();
    let a = &g.kvs[0];
    assert_eq!(
        (a.value.as_slice(), a.version, a.create_revision, a.mod_revision),
        (&b"2"[..], 2, r1, r2)
    );
    // Past revision: an MVCC read.
    let old = kv
        .range(RangeRequest {
            revision: r1,
            ..get("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs[0].value, b"1");
    assert_eq!(
        old.header.unwrap().revision,
        g.header.unwrap().revision,
        "header.revision is the current revision"
    );
    // Prefix, limit, count, keys_only, count_only, sort.
    let pre = kv
        .range(RangeRequest {
            key: "a".into(),
            range_end: "b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pre.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"ab".to_vec()]
    );
    let lim = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((lim.kvs.len(), lim.more, lim.count), (2, true, 3));
    let ko = kv
        .range(RangeRequest {
            keys_only: true,
            ..get("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ko.kvs[0].value.is_empty());
    let co = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((co.kvs.len(), co.count), (0, 3));
    let sorted = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            sort_order: range_request::SortOrder::Descend as i32,
            sort_target: range_request::SortTarget::Mod as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sorted.kvs[0].key, b"b", "newest modification first");
    // A range end at or below the key is empty, not an error.
    let empty = kv
        .range(RangeRequest {
            key: "b".into(),
            range_end: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.kvs.is_empty());

    // Txn: compare on value, version, create and mod revision.
    let t = kv
        .txn(TxnRequest {
            compare: vec![value_eq("a", "2")],
            success: vec![op_put("a", "3")],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.succeeded);
    let t = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Greater as i32,
                target: compare::CompareTarget::Version as i32,
                key: "a".into(),
                target_union: Some(compare::TargetUnion::Version(5)),
                range_end: vec![],
            }],
            success: vec![op_put("a", "no")],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(get("a"))),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.succeeded);
    match &t.responses[0].response {
        Some(response_op::Response::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b"3"),
        other => panic!("expected a range response, got {other:?}"),
    }
    let create_rev = kv.range(get("b")).await.unwrap().into_inner().kvs[0].create_revision;
    let t = kv
        .txn(TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: "b".into(),
                target_union: Some(compare::TargetUnion::CreateRevision(create_rev)),
                range_end: vec![],
            }],
            success: vec![op_put("b", "z")],
            failure: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t.succeeded);

    // Delete with prev_kv; deleting nothing changes no revision.
    let before = kv.range(get("zz")).await.unwrap().into_inner().header.unwrap().revision;
    let d = kv
        .delete_range(DeleteRangeRequest {
            key: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.deleted, d.header.unwrap().revision), (0, before));
    let d = kv
        .delete_range(DeleteRangeRequest {
            key: "a".into(),
            range_end: "b".into(),
            prev_kv: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 2);
    assert_eq!(d.prev_kvs.len(), 2);
    assert!(kv.range(get("a")).await.unwrap().into_inner().kvs.is_empty());
    let recreated = kv
        .put(put("a", "again"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let a = kv.range(get("a")).await.unwrap().into_inner().kvs[0].clone();
    assert_eq!(
        (a.version, a.create_revision),
        (1, recreated),
        "a deleted key starts over"
    );

    // Compact: reads below are refused, at and above still work.
    let now = kv.range(get("a")).await.unwrap().into_inner().header.unwrap().revision;
    kv.compact(CompactionRequest {
        revision: r2,
        physical: false,
    })
    .await
    .unwrap();
    let e = kv
        .range(RangeRequest {
            revision: r1,
            ..get("a")
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    assert!(kv
        .range(RangeRequest {
            revision: now,
            ..get("a")
        })
        .await
        .is_ok());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_etcds_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let mut kv = client(&node).await;
    #[track_caller]
    fn check(r: Result<tonic::Response<()>, tonic::Status>, code: Code, msg: &str) {
        let e = r.map(|_| ()).expect_err(msg);
        assert_eq!((e.code(), e.message()), (code, msg));
    }
    let empty = kv.put(put("", "v")).await.map(|_| tonic::Response::new(()));
    check(empty, Code::InvalidArgument, "etcdserver: key is not provided");
    let e = kv.range(get("")).await.map(|_| tonic::Response::new(()));
    check(e, Code::InvalidArgument, "etcdserver: key is not provided");
    let e = kv
        .delete_range(DeleteRangeRequest::default())
        .await
        .map(|_| tonic::Response::new(()));
    check(e, Code::InvalidArgument, "etcdserver: key is not provided");
    let big = vec![b'x'; 2 << 20];
    let e = kv
        .put(PutRequest {
            key: "k".into(),
            value: big,
            ..Default::default()
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(e, Code::InvalidArgument, "etcdserver: request is too large");
    let many: Vec<RequestOp> = (0..129).map(|i| op_put(&format!("k{i}"), "v")).collect();
    let e = kv
        .txn(TxnRequest {
            compare: vec![],
            success: many,
            failure: vec![],
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(
        e,
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    let dup = vec![op_put("d", "1"), op_put("d", "2")];
    let e = kv
        .txn(TxnRequest {
            compare: vec![],
            success: dup,
            failure: vec![],
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(
        e,
        Code::InvalidArgument,
        "etcdserver: duplicate key given in txn request",
    );
    let e = kv
        .range(RangeRequest {
            revision: i64::MAX,
            ..get("a")
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(
        e,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    let e = kv
        .put(PutRequest {
            lease: 42,
            ..put("l", "v")
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(e, Code::NotFound, "etcdserver: requested lease not found");
    let e = kv
        .txn(TxnRequest {
            compare: vec![],
            success: vec![RequestOp { request: None }],
            failure: vec![],
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(e, Code::InvalidArgument, "etcdserver: key not found");
    // etcd accepts an unknown sort order and target (and sorts nothing): so do we.
    kv.put(put("a", "1")).await.unwrap();
    let r = kv
        .range(RangeRequest {
            sort_order: 7,
            sort_target: 9,
            ..get("a")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs.len(), 1);
    let e = kv
        .compact(CompactionRequest {
            revision: i64::MAX,
            physical: false,
        })
        .await
        .map(|_| tonic::Response::new(()));
    check(
        e,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    // Still serving.
    kv.put(put("ok", "yes")).await.unwrap();
    assert_eq!(kv.range(get("ok")).await.unwrap().into_inner().kvs[0].value, b"yes");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_never_go_backwards_and_data_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut last = 0;
    for round in 0..3 {
        let node = start(dir.path()).await;
        let mut kv = client(&node).await;
        if round > 0 {
            let r = kv.range(get(&format!("k{}", round - 1))).await.unwrap().into_inner();
            assert_eq!(
                r.kvs[0].value,
                format!("v{}", round - 1).into_bytes(),
                "written before the restart"
            );
            assert!(
                r.header.unwrap().revision >= last,
                "the current revision never moves back"
            );
        }
        for i in 0..20 {
            let rev = kv
                .put(put(&format!("k{round}"), &format!("v{round}")))
                .await
                .unwrap()
                .into_inner()
                .header
                .unwrap()
                .revision;
            assert!(rev > last, "round {round} write {i}: revision {rev} not above {last}");
            last = rev;
        }
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_compare_and_swaps_never_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let mut kv = client(&node).await;
    kv.put(put("counter", "0")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut kv = client(&node).await;
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..10 {
                let cur = kv.range(get("counter")).await.unwrap().into_inner().kvs[0]
                    .value
                    .clone();
                let n: u64 = String::from_utf8_lossy(&cur).parse().unwrap();
                let t = kv
                    .txn(TxnRequest {
                        compare: vec![value_eq("counter", &n.to_string())],
                        success: vec![op_put("counter", &(n + 1).to_string())],
                        failure: vec![],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if t.succeeded {
                    wins += 1;
                }
            }
            wins
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap();
    }
    let v = kv.range(get("counter")).await.unwrap().into_inner().kvs[0].clone();
    let n: u64 = String::from_utf8_lossy(&v.value).parse().unwrap();
    assert_eq!(n, wins, "final value equals the successful compare-and-swaps");
    assert_eq!(v.version as u64, wins + 1);
    assert!(wins >= 10, "some swaps won ({wins})");
    node.shutdown().await;
}
