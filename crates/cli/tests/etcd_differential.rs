//! The same calls against real etcd (Debian's etcd-server, the anchor) and
//! against a Tardigrade node, through the `etcd-client` crate, a raw gRPC
//! client (for fields `etcd-client` cannot send) and `etcdctl`; the answers
//! must agree field by field, revisions compared by their order only (etcd's
//! revisions are dense, Tardigrade's are HLC nanoseconds).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{start_etcd, start_tardigrade};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use proto::etcdserverpb::{kv_client::KvClient, RangeRequest, RequestOp, TxnRequest};

/// Maps revisions to their order of first appearance, so dense and sparse
/// revision schemes compare equal when they order the same events the same way.
#[derive(Default)]
struct Revs(HashMap<i64, usize>);

impl Revs {
    fn r(&mut self, rev: i64) -> String {
        if rev == 0 {
            return "0".into();
        }
        let n = self.0.len();
        format!("R{}", self.0.entry(rev).or_insert(n))
    }
}

fn kv(revs: &mut Revs, kv: &etcd_client::KeyValue) -> String {
    format!(
        "{}={} c={} m={} v={}",
        String::from_utf8_lossy(kv.key()),
        String::from_utf8_lossy(kv.value()),
        revs.r(kv.create_revision()),
        revs.r(kv.mod_revision()),
        kv.version()
    )
}

fn err(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("ERR {:?} {}", s.code(), s.message()),
        other => format!("ERR {other}"),
    }
}

fn status(s: tonic::Status) -> String {
    format!("ERR {:?} {}", s.code(), s.message())
}

/// A header's revision and whether it names a member (ids differ between
/// the two servers, their presence must not).
fn header_rev(revs: &mut Revs, h: Option<&etcd_client::ResponseHeader>) -> String {
    match h {
        Some(h) => format!(
            "@{}{}",
            revs.r(h.revision()),
            if h.member_id() != 0 { "+member" } else { "" }
        ),
        None => "@none".into(),
    }
}

/// Each operation's answer inside a txn, with the revision its header carries.
fn txn_ops(revs: &mut Revs, t: &etcd_client::TxnResponse) -> Vec<String> {
    t.op_responses()
        .iter()
        .map(|o| match o {
            TxnOpResponse::Put(p) => format!("put {}", header_rev(revs, p.header())),
            TxnOpResponse::Get(g) => {
                let h = header_rev(revs, g.header());
                format!(
                    "get {h} {:?} more={}",
                    g.kvs().iter().map(|k| kv(revs, k)).collect::<Vec<_>>(),
                    g.more()
                )
            }
            TxnOpResponse::Delete(d) => format!("del {} {}", header_rev(revs, d.header()), d.deleted()),
            TxnOpResponse::Txn(t) => {
                let h = header_rev(revs, t.header());
                format!("txn {h} {:?}", txn_ops(revs, t))
            }
        })
        .collect()
}

/// Runs the scripted calls against the server at `addr`; returns the transcript.
async fn script(addr: &str) -> Vec<String> {
    let mut c = Client::connect([addr], None).await.expect("etcd-client connects");
    let mut raw = KvClient::connect(format!("http://{addr}"))
        .await
        .expect("raw client connects");
    let mut revs = Revs::default();
    let mut out: Vec<String> = Vec::new();
    let mut rec = |s: String| out.push(s);

    let r1 = c.put("a", "1", None).await.unwrap().header().unwrap().revision();
    rec(format!("put a=1 -> {}", revs.r(r1)));
    let p = c.put("a", "2", Some(PutOptions::new().with_prev_key())).await.unwrap();
    let prev = p.prev_key().map(|k| kv(&mut revs, k));
    rec(format!(
        "put a=2 prev -> {} prev={prev:?}",
        revs.r(p.header().unwrap().revision())
    ));
    for (k, v) in [("ab", "x"), ("b", "y"), ("c", "z")] {
        let r = c.put(k, v, None).await.unwrap().header().unwrap().revision();
        rec(format!("put {k}={v} -> {}", revs.r(r)));
    }
    let r_c = c.get("c", None).await.unwrap().kvs()[0].mod_revision();
    let gets: Vec<(&str, &str, GetOptions)> = vec![
        ("get a", "a", GetOptions::new()),
        ("get a prefix", "a", GetOptions::new().with_prefix()),
        ("get all limit 2", "", GetOptions::new().with_all_keys().with_limit(2)),
        (
            "get all keys only",
            "",
            GetOptions::new().with_all_keys().with_keys_only(),
        ),
        (
            "get all count only",
            "",
            GetOptions::new().with_all_keys().with_count_only(),
        ),
        (
            "get all count only limit 1",
            "",
            GetOptions::new().with_all_keys().with_count_only().with_limit(1),
        ),
        (
            "get all by mod desc",
            "",
            GetOptions::new()
                .with_all_keys()
                .with_sort(SortTarget::Mod, SortOrder::Descend),
        ),
        (
            "get all by value asc",
            "",
            GetOptions::new()
                .with_all_keys()
                .with_sort(SortTarget::Value, SortOrder::Ascend),
        ),
        (
            "get all by key desc",
            "",
            GetOptions::new()
                .with_all_keys()
                .with_sort(SortTarget::Key, SortOrder::Descend),
        ),
        ("get a at first revision", "a", GetOptions::new().with_revision(r1)),
        ("get [b, a)", "b", GetOptions::new().with_range("a")),
        ("get missing", "nope", GetOptions::new()),
    ];
    for (what, key, opts) in gets {
        let r = c.get(key, Some(opts)).await;
        rec(match r {
            Ok(g) => {
                let kvs: Vec<String> = g.kvs().iter().map(|k| kv(&mut revs, k)).collect();
                format!(
                    "{what} -> rev={} count={} more={} {kvs:?}",
                    revs.r(g.header().unwrap().revision()),
                    g.count(),
                    g.more()
                )
            }
            Err(e) => format!("{what} -> {}", err(e)),
        });
    }
    let d = c
        .delete("ab", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    let prevs: Vec<String> = d.prev_kvs().iter().map(|k| kv(&mut revs, k)).collect();
    rec(format!(
        "del ab -> {} deleted={} {prevs:?}",
        revs.r(d.header().unwrap().revision()),
        d.deleted()
    ));
    let d = c.delete("zz", None).await.unwrap();
    rec(format!(
        "del zz -> {} deleted={}",
        revs.r(d.header().unwrap().revision()),
        d.deleted()
    ));

    let b_create = c.get("b", None).await.unwrap().kvs()[0].create_revision();
    let head = c.get("a", None).await.unwrap().header().unwrap().revision();
    let txns = vec![
        (
            "txn value a==2",
            Txn::new()
                .when([Compare::value("a", CompareOp::Equal, "2")])
                .and_then([TxnOp::put("a", "3", None)]),
        ),
        (
            "txn version a>5",
            Txn::new()
                .when([Compare::version("a", CompareOp::Greater, 5)])
                .and_then([TxnOp::put("a", "no", None)])
                .or_else([TxnOp::get("a", None), TxnOp::put("e", "else", None)]),
        ),
        (
            "txn create b",
            Txn::new()
                .when([Compare::create_revision("b", CompareOp::Equal, b_create)])
                .and_then([TxnOp::put("b", "y2", None)]),
        ),
        (
            "txn mod c<head",
            Txn::new()
                .when([Compare::mod_revision("c", CompareOp::Less, head)])
                .and_then([TxnOp::delete("c", None)]),
        ),
        (
            "txn value missing!=x",
            Txn::new()
                .when([Compare::value("missing", CompareOp::NotEqual, "x")])
                .and_then([TxnOp::put("m", "1", None)]),
        ),
        (
            "txn version missing==0",
            Txn::new()
                .when([Compare::version("missing", CompareOp::Equal, 0)])
                .and_then([TxnOp::put("m0", "1", None)]),
        ),
        (
            "txn get, put, get, del nothing, del",
            Txn::new().and_then([
                TxnOp::get("a", None),
                TxnOp::put("a", "4", None),
                TxnOp::get("a", None),
                TxnOp::delete("nothing-here", None),
                TxnOp::delete("m0", None),
            ]),
        ),
        (
            "txn read-only get",
            Txn::new().and_then([TxnOp::get("a", None), TxnOp::delete("nothing-here", None)]),
        ),
        (
            "txn get at first revision",
            Txn::new().and_then([TxnOp::get("a", Some(GetOptions::new().with_revision(r1)))]),
        ),
        (
            "txn nested",
            Txn::new().and_then([
                TxnOp::put("n1", "1", None),
                TxnOp::txn(Txn::new().and_then([TxnOp::get("a", None), TxnOp::put("n2", "2", None)])),
            ]),
        ),
        (
            "txn put and nested put of one key",
            Txn::new().and_then([
                TxnOp::put("dup", "1", None),
                TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "2", None)])),
            ]),
        ),
        (
            "txn delete and nested put of one key",
            Txn::new().and_then([
                TxnOp::delete("dup", None),
                TxnOp::txn(Txn::new().or_else([TxnOp::put("dup", "2", None)])),
            ]),
        ),
        (
            "txn two nested puts of one key",
            Txn::new().and_then([
                TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "1", None)])),
                TxnOp::txn(Txn::new().and_then([TxnOp::put("dup", "2", None)])),
            ]),
        ),
        (
            "txn nested puts of one key on both branches",
            Txn::new().and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::version("dup", CompareOp::Equal, 0)])
                    .and_then([TxnOp::put("dup", "then", None)])
                    .or_else([TxnOp::put("dup", "else", None)]),
            )]),
        ),
    ];
    for (what, t) in txns {
        let r = c.txn(t).await;
        rec(match r {
            Ok(t) => {
                let ops = txn_ops(&mut revs, &t);
                format!(
                    "{what} -> {} succeeded={} {ops:?}",
                    revs.r(t.header().unwrap().revision()),
                    t.succeeded()
                )
            }
            Err(e) => format!("{what} -> {}", err(e)),
        });
    }
    let all = c.get("", Some(GetOptions::new().with_all_keys())).await.unwrap();
    let kvs: Vec<String> = all.kvs().iter().map(|k| kv(&mut revs, k)).collect();
    rec(format!("get all -> {kvs:?}"));

    // Compaction: reads below it are refused.
    let cur = all.header().unwrap().revision();
    rec(format!(
        "compact c -> {:?}",
        c.compact(r_c, None).await.map(|_| ()).map_err(err)
    ));
    rec(format!(
        "get a at first revision -> {:?}",
        c.get("a", Some(GetOptions::new().with_revision(r1)))
            .await
            .map(|_| ())
            .map_err(err)
    ));
    rec(format!(
        "get a at future revision -> {:?}",
        c.get("a", Some(GetOptions::new().with_revision(cur + 1)))
            .await
            .map(|_| ())
            .map_err(err)
    ));
    let t = Txn::new().and_then([TxnOp::get("a", Some(GetOptions::new().with_revision(r1)))]);
    rec(format!(
        "txn get at a compacted revision -> {:?}",
        c.txn(t).await.map(|t| t.succeeded()).map_err(err)
    ));
    let t = Txn::new().and_then([TxnOp::get("a", Some(GetOptions::new().with_revision(cur + 1000)))]);
    rec(format!(
        "txn get at a future revision -> {:?}",
        c.txn(t).await.map(|t| t.succeeded()).map_err(err)
    ));
    rec(format!(
        "compact again -> {:?}",
        c.compact(r_c, None).await.map(|_| ()).map_err(err)
    ));
    rec(format!(
        "compact future -> {:?}",
        c.compact(cur + 1000, None).await.map(|_| ()).map_err(err)
    ));

    // Bad input.
    rec(format!(
        "put empty key -> {:?}",
        c.put("", "v", None).await.map(|_| ()).map_err(err)
    ));
    rec(format!(
        "get empty key -> {:?}",
        c.get("", None).await.map(|_| ()).map_err(err)
    ));
    rec(format!(
        "del empty key -> {:?}",
        c.delete("", None).await.map(|_| ()).map_err(err)
    ));
    let big = vec![b'x'; 1_600_000];
    rec(format!(
        "put 1.6 MB -> {:?}",
        c.put("big", big, None).await.map(|_| ()).map_err(err)
    ));
    let many: Vec<TxnOp> = (0..129).map(|i| TxnOp::put(format!("k{i}"), "v", None)).collect();
    rec(format!(
        "txn 129 ops -> {:?}",
        c.txn(Txn::new().and_then(many)).await.map(|_| ()).map_err(err)
    ));
    let dup = [TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)];
    rec(format!(
        "txn duplicate key -> {:?}",
        c.txn(Txn::new().and_then(dup)).await.map(|_| ()).map_err(err)
    ));
    rec(format!(
        "put with lease -> {:?}",
        c.put("l", "v", Some(PutOptions::new().with_lease(42)))
            .await
            .map(|_| ())
            .map_err(err)
    ));
    let bad_sort = RangeRequest {
        key: b"a".to_vec(),
        sort_order: 7,
        ..Default::default()
    };
    rec(format!(
        "range bad sort order -> {:?}",
        raw.range(bad_sort)
            .await
            .map(|r| r.into_inner().kvs.len())
            .map_err(status)
    ));
    let empty_op = TxnRequest {
        compare: vec![],
        success: vec![RequestOp { request: None }],
        failure: vec![],
    };
    rec(format!(
        "txn empty op -> {:?}",
        raw.txn(empty_op)
            .await
            .map(|r| r.into_inner().succeeded)
            .map_err(status)
    ));
    // Still serving.
    let ok = c.put("after", "bad input", None).await.map(|_| ()).map_err(err);
    rec(format!("put after bad input -> {ok:?}"));
    out
}

/// One watch response, revisions by order.
fn watch_resp(revs: &mut Revs, r: &etcd_client::WatchResponse) -> String {
    let events: Vec<String> = r
        .events()
        .iter()
        .map(|e| {
            let prev = e.prev_kv().map(|p| kv(revs, p));
            let this = e.kv().map(|k| match e.event_type() {
                etcd_client::EventType::Put => kv(revs, k),
                etcd_client::EventType::Delete => {
                    format!("{} m={}", String::from_utf8_lossy(k.key()), revs.r(k.mod_revision()))
                }
            });
            format!("{:?} {this:?} prev={prev:?}", e.event_type())
        })
        .collect();
    format!(
        "created={} canceled={} compact={} reason={:?} events={events:?}",
        r.created(),
        r.canceled(),
        revs.r(r.compact_revision()),
        r.cancel_reason()
    )
}

/// Reads watch responses until `n` events came (or 3 s passed).
async fn watch_until(revs: &mut Revs, s: &mut etcd_client::WatchStream, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while seen < n || out.is_empty() {
        match tokio::time::timeout_at(deadline, s.message()).await {
            Ok(Ok(Some(r))) => {
                seen += r.events().len();
                out.push(watch_resp(revs, &r));
                if r.canceled() {
                    break;
                }
            }
            Ok(Ok(None)) => {
                out.push("stream ended".into());
                break;
            }
            Ok(Err(e)) => {
                out.push(err(e));
                break;
            }
            Err(_) => {
                out.push(format!("timed out after {seen} events"));
                break;
            }
        }
    }
    out
}

/// Leases and watches: the same calls against both servers.
async fn lease_watch_script(addr: &str) -> Vec<String> {
    use etcd_client::{LeaseGrantOptions, LeaseTimeToLiveOptions, WatchFilterType, WatchOptions};
    let mut c = Client::connect([addr], None).await.expect("etcd-client connects");
    let mut revs = Revs::default();
    let mut out: Vec<String> = Vec::new();

    // Leases: grants, errors, keys attached, keep-alive, time to live.
    let g = |r: Result<etcd_client::LeaseGrantResponse, etcd_client::Error>| {
        r.map(|g| format!("id={} ttl={}", g.id(), g.ttl())).map_err(err)
    };
    out.push(format!(
        "grant 1000 ttl 60 -> {:?}",
        g(c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(1000))).await)
    ));
    out.push(format!(
        "grant 1000 again -> {:?}",
        g(c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(1000))).await)
    ));
    out.push(format!(
        "grant 1001 ttl 1 -> {:?}",
        g(c.lease_grant(1, Some(LeaseGrantOptions::new().with_id(1001))).await)
    ));
    out.push(format!(
        "grant ttl too large -> {:?}",
        g(
            c.lease_grant(9_000_000_001, Some(LeaseGrantOptions::new().with_id(1002)))
                .await
        )
    ));
    let auto = c
        .lease_grant(30, None)
        .await
        .map(|g| (g.id() > 0, g.ttl()))
        .map_err(err);
    out.push(format!("grant with no id -> {auto:?}"));
    for k in ["l1", "l2"] {
        let r = c
            .put(k, "v", Some(PutOptions::new().with_lease(1000)))
            .await
            .map(|p| revs.r(p.header().unwrap().revision()))
            .map_err(err);
        out.push(format!("put {k} lease 1000 -> {r:?}"));
    }
    let r = c
        .put("l3", "v", Some(PutOptions::new().with_lease(4242)))
        .await
        .map(|_| ())
        .map_err(err);
    out.push(format!("put with unknown lease -> {r:?}"));
    let got = c.get("l1", None).await.unwrap();
    out.push(format!("get l1 -> lease={}", got.kvs()[0].lease()));
    let t = c
        .lease_time_to_live(1000, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .map_err(err)
        .map(|t| {
            // etcd lists them in no particular order (a Go map's).
            let mut keys: Vec<String> = t
                .keys()
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            keys.sort();
            format!(
                "ttl in [58,60]={} granted={} keys={keys:?}",
                (58..=60).contains(&t.ttl()),
                t.granted_ttl()
            )
        });
    out.push(format!("timetolive 1000 -> {t:?}"));
    let t = c
        .lease_time_to_live(4242, None)
        .await
        .map(|t| (t.ttl(), t.granted_ttl()))
        .map_err(err);
    out.push(format!("timetolive unknown -> {t:?}"));
    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .filter(|&id| id < 2000)
        .collect();
    ids.sort();
    out.push(format!("leases -> {ids:?}"));
    let (mut keeper, mut stream) = c.lease_keep_alive(1000).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let k = stream
        .message()
        .await
        .map(|m| m.map(|m| (m.id(), m.ttl())))
        .map_err(err);
    out.push(format!("keep-alive 1000 -> {k:?}"));
    // etcd-client opens the stream with a first keep-alive and reports an
    // answer of TTL 0 (unknown lease) as an error.
    let k = c.lease_keep_alive(4242).await.map(|_| ()).map_err(err);
    out.push(format!("keep-alive unknown -> {k:?}"));

    // A watch from now on the lease's keys sees the revoke's deletes, in
    // one revision.
    let mut w = c
        .watch("l", Some(WatchOptions::new().with_prefix().with_prev_key()))
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 0).await);
    let r = c
        .lease_revoke(1000)
        .await
        .map(|r| revs.r(r.header().unwrap().revision()))
        .map_err(err);
    out.push(format!("revoke 1000 -> {r:?}"));
    out.extend(watch_until(&mut revs, &mut w, 2).await);
    let r = c.lease_revoke(1000).await.map(|_| ()).map_err(err);
    out.push(format!("revoke 1000 again -> {r:?}"));
    out.push(format!(
        "get l prefix after revoke -> {}",
        c.get("l", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .kvs()
            .len()
    ));

    // Expiry deletes the keys (and a watcher sees it).
    c.put("e1", "v", Some(PutOptions::new().with_lease(1001)))
        .await
        .unwrap();
    let mut w = c.watch("e1", None).await.unwrap();
    out.extend(watch_until(&mut revs, &mut w, 0).await);
    let t0 = std::time::Instant::now();
    out.extend(watch_until(&mut revs, &mut w, 1).await);
    out.push(format!(
        "expired within 4 s -> {}",
        t0.elapsed() < Duration::from_secs(4)
    ));
    out.push(format!(
        "get e1 after expiry -> {}",
        c.get("e1", None).await.unwrap().kvs().len()
    ));
    let t = c.lease_time_to_live(1001, None).await.map(|t| t.ttl()).map_err(err);
    out.push(format!("timetolive expired -> {t:?}"));

    // History: a watch from a past revision, with filters and prev_kv.
    let first = c.put("w/a", "1", None).await.unwrap().header().unwrap().revision();
    out.push(format!("put w/a=1 -> {}", revs.r(first)));
    c.put("w/b", "1", None).await.unwrap();
    c.put("w/a", "2", None).await.unwrap();
    c.delete("w/b", None).await.unwrap();
    let last = c.put("w/c", "1", None).await.unwrap().header().unwrap().revision();
    let mut w = c
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(first)))
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 5).await);
    let mut w = c
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(first)
                    .with_prev_key()
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 1).await);
    let mut w = c
        .watch(
            "w/a",
            Some(
                WatchOptions::new()
                    .with_start_revision(first)
                    .with_filters([WatchFilterType::NoDelete]),
            ),
        )
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 2).await);
    // Live events after catching up.
    c.put("w/d", "live", None).await.unwrap();
    out.extend(watch_until(&mut revs, &mut w, 0).await);
    let mut w = c
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(last)))
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 2).await);
    // Bad ranges: inverted.
    let mut w = c.watch("z", Some(WatchOptions::new().with_range("a"))).await.unwrap();
    out.extend(watch_until(&mut revs, &mut w, 0).await);
    // Compaction: a watch from before it is cancelled with its revision.
    let r = c.compact(last, None).await.map(|_| ()).map_err(err);
    out.push(format!("compact to put w/c -> {r:?}"));
    let mut w = c
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(first)))
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 1).await);
    let mut w = c
        .watch("w/", Some(WatchOptions::new().with_prefix().with_start_revision(last)))
        .await
        .unwrap();
    out.extend(watch_until(&mut revs, &mut w, 2).await);
    out
}

/// One JSON gateway call: the status and the body with revisions by order
/// and ids that differ between servers blanked.
fn gateway_call(revs: &mut Revs, addr: &str, path: &str, body: &str) -> String {
    gateway_call_raw(revs, addr, path, body).0
}

/// `gateway_call`, also giving the first answer as it came (unnormalized).
fn gateway_call_raw(revs: &mut Revs, addr: &str, path: &str, body: &str) -> (String, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the client port");
    // A watch streams until the client goes: take what came in a second.
    let wait = if path.ends_with("/watch") { 1 } else { 5 };
    s.set_read_timeout(Some(Duration::from_secs(wait))).unwrap();
    let method = if body.is_empty() { "GET" } else { "POST" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split_whitespace().nth(1).unwrap_or("?").to_string();
    let chunked = text.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let mut payload = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    if chunked {
        // Drop the chunk sizes: keep the JSON lines.
        payload = payload
            .lines()
            .filter(|l| l.trim_start().starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n");
    }
    let malformed = !body.is_empty() && serde_json::from_str::<serde_json::Value>(body).is_err();
    let mut parts = Vec::new();
    let mut first = serde_json::Value::Null;
    for v in serde_json::Deserializer::from_str(&payload).into_iter::<serde_json::Value>() {
        match v {
            Ok(mut v) => {
                if first.is_null() {
                    first = v.clone();
                }
                normalize(revs, &mut v);
                if malformed {
                    // Go's JSON parser and ours word a syntax error each
                    // their own way: the status and code must agree.
                    for k in ["error", "message"] {
                        if let Some(x) = v.get_mut(k).filter(|x| x.is_string()) {
                            *x = serde_json::Value::String("<the parser's message>".into());
                        }
                    }
                }
                parts.push(v.to_string());
            }
            Err(_) => {
                parts.push(format!("not JSON: {payload:?}"));
                break;
            }
        }
    }
    (format!("{path} {body} -> {code} {}", parts.join(" ")), first)
}

fn normalize(revs: &mut Revs, v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match k.as_str() {
                    "revision" | "mod_revision" | "create_revision" | "compact_revision" => {
                        let n = x.as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                        *x = Value::String(revs.r(n));
                    }
                    "cluster_id" | "member_id" | "raft_term" | "raftIndex" | "raftTerm" | "raftAppliedIndex"
                    | "dbSize" | "dbSizeInUse" | "leader" | "version" | "ID" | "name" | "peerURLs" | "clientURLs"
                    | "etcdserver" | "etcdcluster" => *x = Value::String("*".into()),
                    _ => normalize(revs, x),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| normalize(revs, x)),
        _ => {}
    }
}

/// The JSON gateway: the same requests against both servers' client ports.
fn gateway_script(addr: &str) -> Vec<String> {
    let mut revs = Revs::default();
    let b = |s: &str| {
        use std::fmt::Write;
        // base64 of a short ASCII string
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bytes = s.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.len();
            let v = (chunk[0] as u32) << 16
                | (*chunk.get(1).unwrap_or(&0) as u32) << 8
                | *chunk.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= n {
                    out.push(T[(v >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        let mut q = String::new();
        let _ = write!(q, "\"{out}\"");
        q
    };
    let calls: Vec<(&str, String)> = vec![
        ("/version", String::new()),
        ("/health", String::new()),
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{}}}", b("g1"), b("v1"))),
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{},\"prev_kv\":true}}", b("g1"), b("v2"))),
        ("/v3/kv/range", format!("{{\"key\":{}}}", b("g1"))),
        ("/v3/kv/range", format!("{{\"key\":{},\"range_end\":{}}}", b("g"), b("h"))),
        ("/v3/kv/range", format!("{{\"key\":{},\"serializable\":true}}", b("missing"))),
        ("/v3/kv/range", "{}".into()),
        ("/v3/kv/range", "{not json".into()),
        (
            "/v3/kv/txn",
            format!(
                "{{\"compare\":[{{\"target\":\"CREATE\",\"create_revision\":0,\"key\":{}}}],\"success\":[{{\"request_put\":{{\"key\":{},\"value\":{}}}}}]}}",
                b("g1"),
                b("g1"),
                b("x")
            ),
        ),
        (
            "/v3/kv/txn",
            format!(
                "{{\"compare\":[{{\"target\":\"CREATE\",\"create_revision\":\"0\",\"key\":{}}}],\"success\":[{{\"request_put\":{{\"key\":{},\"value\":{}}}}}]}}",
                b("g2"),
                b("g2"),
                b("y")
            ),
        ),
        ("/v3/lease/grant", "{\"TTL\":30,\"ID\":77}".into()),
        ("/v3/lease/grant", "{\"TTL\":\"30\",\"ID\":\"77\"}".into()),
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{},\"lease\":\"77\"}}", b("g3"), b("v"))),
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{},\"lease\":\"78\"}}", b("g4"), b("v"))),
        ("/v3/lease/keepalive", "{\"ID\":77}".into()),
        ("/v3/lease/keepalive", "{\"ID\":78}".into()),
        ("/v3/lease/timetolive", "{\"ID\":78}".into()),
        ("/v3/lease/revoke", "{\"ID\":77}".into()),
        ("/v3/lease/revoke", "{\"ID\":77}".into()),
        ("/v3/kv/deleterange", format!("{{\"key\":{},\"range_end\":{}}}", b("g"), b("h"))),
        ("/v3/cluster/member/list", "{}".into()),
        ("/v3/maintenance/status", "{}".into()),
        ("/v3/kv/nothing", "{}".into()),
    ];
    let mut out: Vec<String> = calls
        .iter()
        .map(|(path, body)| gateway_call(&mut revs, addr, path, body))
        .collect();
    // Watches through the gateway: from a past revision (with prev_kv and
    // a filter), and from a compacted one.
    let (line, first) = gateway_call_raw(
        &mut revs,
        addr,
        "/v3/kv/put",
        &format!("{{\"key\":{},\"value\":{}}}", b("gw/a"), b("1")),
    );
    out.push(line);
    let from = first["header"]["revision"].as_str().unwrap_or("0").to_string();
    for (path, body) in [
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{}}}", b("gw/a"), b("2"))),
        ("/v3/kv/put", format!("{{\"key\":{},\"value\":{}}}", b("gw/b"), b("1"))),
        ("/v3/kv/deleterange", format!("{{\"key\":{}}}", b("gw/a"))),
        (
            "/v3/watch",
            format!("{{\"create_request\":{{\"key\":{},\"range_end\":{},\"start_revision\":\"{from}\"}}}}", b("gw/"), b("gw0")),
        ),
        (
            "/v3/watch",
            format!(
                "{{\"create_request\":{{\"key\":{},\"range_end\":{},\"start_revision\":{from},\"prev_kv\":true,\"filters\":[\"NOPUT\"]}}}}",
                b("gw/"),
                b("gw0")
            ),
        ),
        ("/v3/watch", format!("{{\"create_request\":{{\"key\":{},\"start_revision\":\"1\"}}}}", b("gw/a"))),
        ("/v3/watch", format!("{{\"create_request\":{{\"key\":{},\"range_end\":{}}}}}", b("z"), b("a"))),
        ("/v3/lease/keepalive", "not json".into()),
        ("/v3/watch", "{not json".into()),
    ] {
        // The start revision differs between the servers: not the answers.
        let line = gateway_call(&mut revs, addr, path, &body)
            .replace(&format!("\"start_revision\":\"{from}\""), "\"start_revision\":\"FROM\"")
            .replace(&format!("\"start_revision\":{from}"), "\"start_revision\":FROM");
        out.push(line);
    }
    out
}

fn etcdctl(addr: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={addr}"))
        .args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("etcdctl runs");
    if let Some(input) = stdin {
        child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let o = child.wait_with_output().expect("etcdctl output");
    format!(
        "$ etcdctl {} -> exit {:?}\n{}{}",
        args.join(" "),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| !l.contains("{\"level\""))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    )
}

fn etcdctl_script(addr: &str) -> Vec<String> {
    vec![
        etcdctl(addr, &["put", "x1", "v1"], None),
        etcdctl(addr, &["put", "x2", "v2", "--prev-kv"], None),
        etcdctl(addr, &["put", "x2", "v3", "--prev-kv"], None),
        etcdctl(addr, &["get", "x1"], None),
        etcdctl(addr, &["get", "x", "--prefix"], None),
        etcdctl(addr, &["get", "", "--prefix", "--keys-only"], None),
        etcdctl(addr, &["get", "x", "--prefix", "--limit=1"], None),
        etcdctl(
            addr,
            &["txn"],
            Some("value(\"x1\") = \"v1\"\n\nput x1 swapped\n\nput x1 failed\n\n"),
        ),
        etcdctl(addr, &["get", "x1"], None),
        etcdctl(addr, &["del", "x", "--prefix"], None),
        etcdctl(addr, &["get", "x", "--prefix"], None),
        etcdctl(addr, &["put", "", "v"], None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tardigrade_answers_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut etcd) = start_etcd(dir.path()) else {
        println!("SKIPPED: etcd is not installed (`scripts/setup.sh test` installs Debian's etcd-server)");
        return;
    };
    etcd.wait_healthy(Duration::from_secs(30));
    let mut node = start_tardigrade(&dir.path().join("tardigrade"));
    node.wait_healthy(Duration::from_secs(30));

    let want = script(&etcd.grpc).await;
    let got = script(&node.grpc).await;
    let mut diffs = Vec::new();
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if w != g {
            diffs.push(format!("step {i}:\n  etcd:       {w}\n  tardigrade: {g}"));
        }
    }
    assert_eq!(want.len(), got.len());
    let want = lease_watch_script(&etcd.grpc).await;
    let got = lease_watch_script(&node.grpc).await;
    assert_eq!(
        want.len(),
        got.len(),
        "lease and watch transcripts:\n{want:#?}\n{got:#?}"
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        if w != g {
            diffs.push(format!("lease/watch step {i}:\n  etcd:       {w}\n  tardigrade: {g}"));
        }
    }
    let lease_watch_steps = want.len();
    let want = gateway_script(&etcd.grpc);
    let got = gateway_script(&node.grpc);
    for (w, g) in want.iter().zip(&got) {
        if w != g {
            diffs.push(format!("gateway:\n  etcd:       {w}\n  tardigrade: {g}"));
        }
    }
    let gateway_steps = want.len();
    let have_etcdctl = Path::new("/usr/bin/etcdctl").exists();
    if have_etcdctl {
        let want = etcdctl_script(&etcd.grpc);
        let got = etcdctl_script(&node.grpc);
        for (w, g) in want.iter().zip(&got) {
            if w != g {
                diffs.push(format!("etcdctl:\n--- etcd\n{w}--- tardigrade\n{g}"));
            }
        }
    } else {
        println!("etcdctl not installed: its half of the comparison is skipped");
    }
    assert!(
        diffs.is_empty(),
        "{} differences from etcd:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    println!(
        "etcd-client KV calls, {lease_watch_steps} lease and watch steps, {gateway_steps} gateway calls and {} etcdctl commands answered as etcd answers them",
        if have_etcdctl { 12 } else { 0 }
    );
}
