//! `tardigrade kv --raw ...`: the same commands over the native KV API
//! (`tardigrade.kvpb.KV/Batch`) on raw keys of the user keyspace, rather
//! than etcd's API. Each command is one batch; a scan that spans ranges is
//! cut per range by the node's DistSender.

use anyhow::{anyhow, bail, Result};
use proto::kvpb::{self, kv_client::KvClient, request_union::Value as Req, response_union::Value as Resp};

use crate::kv::{prefix_end, show, KvCmd};

fn one(r: Req) -> kvpb::BatchRequest {
    kvpb::BatchRequest {
        header: None,
        requests: vec![kvpb::RequestUnion { value: Some(r) }],
    }
}

fn ts(t: Option<proto::storage::Timestamp>) -> String {
    t.map_or_else(|| "-".into(), |t| format!("{}.{:010}", t.wall_nanos, t.logical))
}

fn print_rows(rows: &[kvpb::KeyValue]) {
    for kv in rows {
        println!("{}\t{}\t(at {})", show(&kv.key), show(&kv.value), ts(kv.timestamp));
    }
}

pub async fn run(cmd: KvCmd, host: &str) -> Result<()> {
    let mut c = KvClient::new(kv::admin::connect(host).await?);
    let (req, limit) = match &cmd {
        KvCmd::Put { key, value, .. } => (
            Req::Put(kvpb::PutRequest {
                key: key.clone().into_bytes(),
                value: value.clone().into_bytes(),
            }),
            0,
        ),
        KvCmd::Get { prefix: false, key, .. } => (
            Req::Get(kvpb::GetRequest {
                key: key.clone().into_bytes(),
            }),
            0,
        ),
        KvCmd::Get {
            prefix: true,
            key,
            limit,
            ..
        } => {
            let k = key.clone().into_bytes();
            (
                Req::Scan(kvpb::ScanRequest {
                    end_key: prefix_end(&k),
                    start_key: k,
                }),
                *limit,
            )
        }
        KvCmd::Del { key, prefix } => {
            let k = key.clone().into_bytes();
            if *prefix {
                (
                    Req::DeleteRange(kvpb::DeleteRangeRequest {
                        end_key: prefix_end(&k),
                        start_key: k,
                        return_keys: false,
                    }),
                    0,
                )
            } else {
                (Req::Delete(kvpb::DeleteRequest { key: k }), 0)
            }
        }
        KvCmd::Scan { start, end, limit } => (
            Req::Scan(kvpb::ScanRequest {
                start_key: start.clone().into_bytes(),
                end_key: end.clone().map_or_else(|| b"\xff\xff".to_vec(), String::into_bytes),
            }),
            *limit,
        ),
        KvCmd::Cas { key, expected, new } => (
            Req::ConditionalPut(kvpb::ConditionalPutRequest {
                key: key.clone().into_bytes(),
                value: new.clone().into_bytes(),
                exp_value: expected.clone().into_bytes(),
                exp_absent: false,
            }),
            0,
        ),
        KvCmd::Incr { key, by } => (
            Req::Increment(kvpb::IncrementRequest {
                key: key.clone().into_bytes(),
                increment: *by,
            }),
            0,
        ),
    };
    let mut batch = one(req);
    if limit > 0 {
        batch.header = Some(kvpb::Header {
            max_span_request_keys: limit,
            ..Default::default()
        });
    }
    let r = c
        .batch(batch)
        .await
        .map_err(|s| anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    if let Some(e) = r.error {
        if let Some(cf) = e.condition_failed {
            bail!(
                "not swapped: the current value is {}",
                if cf.exists {
                    format!("{:?}", show(&cf.actual_value))
                } else {
                    "absent".into()
                }
            );
        }
        bail!("{}", e.message);
    }
    let at = ts(r.timestamp);
    match r.responses.into_iter().next().and_then(|x| x.value) {
        Some(Resp::Get(g)) => {
            if let Some(kv) = g.kv {
                println!("{}\n{}", show(&kv.key), show(&kv.value));
            }
        }
        Some(Resp::Scan(s)) => {
            print_rows(&s.rows);
            if let Some(rs) = s.resume_span {
                println!("... more keys from {:?}", show(&rs.start_key));
            }
        }
        Some(Resp::DeleteRange(d)) => println!("{}", d.deleted),
        Some(Resp::Delete(_)) => println!("OK (at {at})"),
        Some(Resp::Increment(i)) => println!("{}", i.new_value),
        Some(_) => println!("OK (at {at})"),
        None => bail!("the node sent no answer"),
    }
    Ok(())
}
