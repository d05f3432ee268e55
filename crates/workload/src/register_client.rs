//! The register workload's operations over either client API: etcd's v3 KV
//! (Range, Put, a Txn compare-and-swap) or Tardigrade's native KV API (Get,
//! Put, ConditionalPut), and where each API's keys live. Native keys start
//! with two hex digits spread over `00`..`ff`, so that a keyspace split at
//! those digits spreads the registers and inserts over many ranges.

use std::collections::BTreeSet;
use std::time::Duration;

use proto::etcdserverpb::{
    compare, kv_client::KvClient as EtcdClient, request_op, Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use proto::kvpb::{
    self, kv_client::KvClient as NativeClient, request_union::Value as Req, response_union::Value as Resp,
};
use tonic::transport::Channel;

/// Which client API the workload speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Etcd,
    Native,
}

impl std::str::FromStr for Api {
    type Err = String;
    fn from_str(s: &str) -> Result<Api, String> {
        match s {
            "etcd" => Ok(Api::Etcd),
            "native" => Ok(Api::Native),
            o => Err(format!("unknown API {o:?} (etcd or native)")),
        }
    }
}

/// Spreads `n` over two hex digits (a multiplicative hash, so neighbours land apart).
fn spread(n: u64) -> String {
    format!("{:02x}", (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) & 0xff)
}

impl Api {
    /// The key of register `n` of a run.
    pub fn register_key(self, prefix: &str, n: u64) -> String {
        match self {
            Api::Etcd => format!("{prefix}register/{n}"),
            Api::Native => format!("{}/{prefix}register/{n}", spread(n)),
        }
    }

    /// The key of a unique insert.
    pub fn insert_key(self, prefix: &str, client: u64, counter: u64) -> String {
        match self {
            Api::Etcd => format!("{prefix}inserts/{client}/{counter}"),
            Api::Native => format!(
                "{}/{prefix}inserts/{client}/{counter}",
                spread(client.wrapping_mul(1_000_003) ^ counter)
            ),
        }
    }

    /// Whether `key` is an insert of the run with `prefix`.
    pub fn is_insert(self, prefix: &str, key: &str) -> bool {
        let tail = match self {
            Api::Etcd => key,
            Api::Native => key.get(3..).unwrap_or(""),
        };
        tail.starts_with(&format!("{prefix}inserts/"))
    }
}

/// A connection to one node.
pub enum RegClient {
    Etcd(EtcdClient<Channel>),
    Native(NativeClient<Channel>),
}

/// An operation's failure: the gRPC status (whether it may have applied is
/// `definitely_failed`'s call).
pub type OpError = tonic::Status;

fn parse(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn evaluated_error(e: kvpb::Error) -> OpError {
    // Refused at evaluation: nothing applied.
    tonic::Status::failed_precondition(e.message)
}

impl RegClient {
    pub async fn connect(api: Api, addr: &str, timeout: Duration) -> Option<RegClient> {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .ok()?;
        Some(match api {
            Api::Etcd => RegClient::Etcd(EtcdClient::new(ch)),
            Api::Native => RegClient::Native(NativeClient::new(ch)),
        })
    }

    async fn native(c: &mut NativeClient<Channel>, reqs: Vec<Req>, limit: i64) -> Result<kvpb::BatchResponse, OpError> {
        let r = c
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
            .await?
            .into_inner();
        Ok(r)
    }

    pub async fn put(&mut self, key: &str, value: &str) -> Result<(), OpError> {
        match self {
            RegClient::Etcd(c) => c
                .put(PutRequest {
                    key: key.into(),
                    value: value.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            RegClient::Native(c) => {
                let r = Self::native(
                    c,
                    vec![Req::Put(kvpb::PutRequest {
                        key: key.into(),
                        value: value.into(),
                    })],
                    0,
                )
                .await?;
                r.error.map_or(Ok(()), |e| Err(evaluated_error(e)))
            }
        }
    }

    pub async fn get(&mut self, key: &str) -> Result<Option<u64>, OpError> {
        match self {
            RegClient::Etcd(c) => c
                .range(RangeRequest {
                    key: key.into(),
                    ..Default::default()
                })
                .await
                .map(|x| x.into_inner().kvs.first().and_then(|kv| parse(&kv.value))),
            RegClient::Native(c) => {
                let r = Self::native(c, vec![Req::Get(kvpb::GetRequest { key: key.into() })], 0).await?;
                if let Some(e) = r.error {
                    return Err(evaluated_error(e));
                }
                match r.responses.into_iter().next().and_then(|x| x.value) {
                    Some(Resp::Get(g)) => Ok(g.kv.and_then(|kv| parse(&kv.value))),
                    other => Err(tonic::Status::internal(format!("unexpected answer {other:?}"))),
                }
            }
        }
    }

    /// Sets `key` to `new` if it holds `expect`: whether it did.
    pub async fn cas(&mut self, key: &str, expect: u64, new: u64) -> Result<bool, OpError> {
        match self {
            RegClient::Etcd(c) => {
                let txn = TxnRequest {
                    compare: vec![Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Value as i32,
                        key: key.into(),
                        target_union: Some(compare::TargetUnion::Value(expect.to_string().into())),
                        range_end: vec![],
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key.into(),
                            value: new.to_string().into(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                c.txn(txn).await.map(|x| x.into_inner().succeeded)
            }
            RegClient::Native(c) => {
                let r = Self::native(
                    c,
                    vec![Req::ConditionalPut(kvpb::ConditionalPutRequest {
                        key: key.into(),
                        value: new.to_string().into(),
                        exp_value: expect.to_string().into(),
                        exp_absent: false,
                    })],
                    0,
                )
                .await?;
                match r.error {
                    None => Ok(true),
                    Some(e) if e.condition_failed.is_some() => Ok(false),
                    Some(e) => Err(evaluated_error(e)),
                }
            }
        }
    }

    /// Every insert key of the run with `prefix`, read in pages; `None` if
    /// any page fails.
    pub async fn read_inserts(&mut self, api: Api, prefix: &str) -> Option<BTreeSet<String>> {
        const PAGE: i64 = 5000;
        let (mut from, end) = match api {
            Api::Etcd => (
                format!("{prefix}inserts/").into_bytes(),
                format!("{prefix}inserts0").into_bytes(),
            ),
            Api::Native => (b"00".to_vec(), b"ff0".to_vec()),
        };
        let mut keys = BTreeSet::new();
        loop {
            let (page, next): (Vec<Vec<u8>>, Option<Vec<u8>>) = match self {
                RegClient::Etcd(c) => {
                    let r = c
                        .range(RangeRequest {
                            key: from.clone(),
                            range_end: end.clone(),
                            keys_only: true,
                            limit: PAGE,
                            ..Default::default()
                        })
                        .await
                        .ok()?
                        .into_inner();
                    if r.more && r.kvs.is_empty() {
                        return None; // "more" with nothing: not a read to conclude from
                    }
                    let ks: Vec<Vec<u8>> = r.kvs.into_iter().map(|kv| kv.key).collect();
                    let next = match ks.last() {
                        Some(k) if r.more => {
                            let mut k = k.clone();
                            k.push(0);
                            Some(k)
                        }
                        _ => None,
                    };
                    (ks, next)
                }
                RegClient::Native(c) => {
                    let r = Self::native(
                        c,
                        vec![Req::Scan(kvpb::ScanRequest {
                            start_key: from.clone(),
                            end_key: end.clone(),
                        })],
                        PAGE,
                    )
                    .await
                    .ok()?;
                    if r.error.is_some() {
                        return None;
                    }
                    let Some(Resp::Scan(s)) = r.responses.into_iter().next().and_then(|x| x.value) else {
                        return None;
                    };
                    if s.rows.is_empty() && s.resume_span.is_some() {
                        return None;
                    }
                    (
                        s.rows.into_iter().map(|kv| kv.key).collect(),
                        s.resume_span.map(|rs| rs.start_key),
                    )
                }
            };
            keys.extend(
                page.into_iter()
                    .map(|k| String::from_utf8_lossy(&k).into_owned())
                    .filter(|k| api.is_insert(prefix, k)),
            );
            match next {
                Some(n) => from = n,
                None => return Some(keys),
            }
        }
    }
}
