//! etcd's JSON gateway: the v3 API as HTTP/1.1 + JSON, on the client port
//! beside gRPC (see `client_port`), where etcd serves it and where clients
//! such as Patroni find it through `member list`'s client URLs.
//!
//! Each route decodes its body with protobuf's JSON mapping (either field
//! name form; 64-bit integers as strings or numbers; bytes as base64),
//! calls the same service code gRPC calls, and answers as etcd's gateway
//! does: original field names, default values left out, 64-bit integers
//! as strings, `{"error", "code", "message"}` with the HTTP status of the
//! gRPC code on failure, and streams (watch, keep-alive) as one
//! `{"result": ...}` object per message. Nothing here panics on a request.

use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use proto::etcdserverpb::{
    cluster_server::Cluster, kv_server::Kv, lease_server::Lease, maintenance_server::Maintenance,
    LeaseKeepAliveRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use crate::etcd_api::{EtcdApi, API_VERSION};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // Generated at build time from our own protos: a failure here is a
        // build defect, found by the first test that calls the gateway.
        DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap_or_default()
    })
}

/// A message type named in etcd's packages, e.g. `etcdserverpb.RangeRequest`.
trait Named: prost::Message + Default + Sized {
    const NAME: &'static str;
}

macro_rules! named {
    ($($t:ident),* $(,)?) => {
        $(impl Named for proto::etcdserverpb::$t {
            const NAME: &'static str = concat!("etcdserverpb.", stringify!($t));
        })*
    };
}

named!(
    RangeRequest,
    RangeResponse,
    PutRequest,
    PutResponse,
    DeleteRangeRequest,
    DeleteRangeResponse,
    TxnRequest,
    TxnResponse,
    CompactionRequest,
    CompactionResponse,
    LeaseGrantRequest,
    LeaseGrantResponse,
    LeaseRevokeRequest,
    LeaseRevokeResponse,
    LeaseKeepAliveRequest,
    LeaseKeepAliveResponse,
    LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
    LeaseLeasesRequest,
    LeaseLeasesResponse,
    StatusRequest,
    StatusResponse,
    MemberListRequest,
    MemberListResponse,
    WatchRequest,
    WatchResponse,
);

/// A body that is not a request of this type: etcd's gateway answers 400.
fn bad_body(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Decodes a JSON body (an empty body is an empty request).
fn decode<T: Named>(body: &[u8]) -> Result<T, Status> {
    let trimmed = body.iter().all(u8::is_ascii_whitespace);
    if trimmed {
        return Ok(T::default());
    }
    let desc = pool()
        .get_message_by_name(T::NAME)
        .ok_or_else(|| Status::internal(format!("no descriptor of {}", T::NAME)))?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let dynamic =
        DynamicMessage::deserialize_with_options(desc, &mut de, &DeserializeOptions::new().deny_unknown_fields(false))
            .map_err(bad_body)?;
    de.end().map_err(bad_body)?;
    T::decode(prost::Message::encode_to_vec(&dynamic).as_slice()).map_err(bad_body)
}

/// Encodes a message as etcd's gateway does.
fn encode_value<T: Named>(m: &T) -> Result<serde_json::Value, Status> {
    let desc = pool()
        .get_message_by_name(T::NAME)
        .ok_or_else(|| Status::internal(format!("no descriptor of {}", T::NAME)))?;
    let dynamic =
        DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).map_err(|e| Status::internal(e.to_string()))?;
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .map_err(|e| Status::internal(e.to_string()))
}

/// The HTTP status etcd's gateway (grpc-gateway v1) gives a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// A unary call's error, as etcd's gateway writes it.
fn error_response(s: &Status) -> Response {
    let body = serde_json::json!({
        "error": s.message(),
        "code": s.code() as i32,
        "message": s.message(),
    });
    json(http_status(s.code()), &body)
}

/// An error inside a stream, as etcd's gateway writes it.
fn stream_error(s: &Status) -> serde_json::Value {
    let http = http_status(s.code());
    serde_json::json!({"error": {
        "grpc_code": s.code() as i32,
        "http_code": http.as_u16(),
        "message": s.message(),
        "http_status": http.canonical_reason().unwrap_or(""),
    }})
}

async fn unary<Q, A, F, Fut>(api: EtcdApi, body: Bytes, call: F) -> Response
where
    Q: Named,
    A: Named,
    F: FnOnce(EtcdApi, Q) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<A>, Status>>,
{
    let req = match decode::<Q>(&body) {
        Ok(r) => r,
        Err(s) => return error_response(&s),
    };
    match call(api, req).await.and_then(|r| encode_value(r.get_ref())) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(s) => error_response(&s),
    }
}

macro_rules! route {
    ($trait:ident :: $method:ident) => {
        |State(api): State<EtcdApi>, body: Bytes| async move {
            unary(api, body, |api, req| async move {
                $trait::$method(&api, tonic::Request::new(req)).await
            })
            .await
        }
    };
}

/// The gateway's routes, under `/v3` and the older `/v3beta` (which some
/// clients try first).
pub fn router(api: EtcdApi) -> Router {
    let mut r = Router::new()
        .route("/version", get(version))
        .route("/health", get(health).post(health));
    for p in ["/v3", "/v3beta"] {
        r = r
            .route(&format!("{p}/kv/range"), post(route!(Kv::range)))
            .route(&format!("{p}/kv/put"), post(route!(Kv::put)))
            .route(&format!("{p}/kv/deleterange"), post(route!(Kv::delete_range)))
            .route(&format!("{p}/kv/txn"), post(route!(Kv::txn)))
            .route(&format!("{p}/kv/compaction"), post(route!(Kv::compact)))
            .route(&format!("{p}/lease/grant"), post(route!(Lease::lease_grant)))
            .route(&format!("{p}/lease/revoke"), post(route!(Lease::lease_revoke)))
            .route(&format!("{p}/kv/lease/revoke"), post(route!(Lease::lease_revoke)))
            .route(
                &format!("{p}/lease/timetolive"),
                post(route!(Lease::lease_time_to_live)),
            )
            .route(
                &format!("{p}/kv/lease/timetolive"),
                post(route!(Lease::lease_time_to_live)),
            )
            .route(&format!("{p}/lease/leases"), post(route!(Lease::lease_leases)))
            .route(&format!("{p}/kv/lease/leases"), post(route!(Lease::lease_leases)))
            .route(&format!("{p}/lease/keepalive"), post(keep_alive))
            .route(&format!("{p}/watch"), post(watch))
            .route(&format!("{p}/maintenance/status"), post(route!(Maintenance::status)))
            .route(&format!("{p}/cluster/member/list"), post(route!(Cluster::member_list)));
    }
    r.fallback(not_found).with_state(api)
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "Not Found\n").into_response()
}

/// etcd's `/version`: the server and cluster versions (3.4 or later makes
/// clients choose the `/v3` API).
async fn version() -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({"etcdserver": API_VERSION, "etcdcluster": cluster_version()}),
    )
}

/// The cluster version etcd reports: major.minor.0.
fn cluster_version() -> String {
    let mut parts = API_VERSION.split('.');
    format!("{}.{}.0", parts.next().unwrap_or("3"), parts.next().unwrap_or("5"))
}

/// etcd's `/health`: `{"health":"true"}` when the node can serve.
async fn health(State(api): State<EtcdApi>) -> Response {
    match api.shared.health_problem() {
        None => json(StatusCode::OK, &serde_json::json!({"health": "true"})),
        Some(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"health": "false", "reason": why}),
        ),
    }
}

/// The JSON requests of a streaming call's body, one after another. A body
/// that does not parse gets UNKNOWN (HTTP 500), as from etcd's gateway,
/// whose stream handlers report a decode failure so.
fn requests<T: Named>(body: &[u8]) -> Result<Vec<T>, Status> {
    let mut out = Vec::new();
    let mut rest = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    for v in rest.by_ref() {
        let v = v.map_err(|e| Status::unknown(e.to_string()))?;
        out.push(decode::<T>(v.to_string().as_bytes()).map_err(|s| Status::unknown(s.message()))?);
    }
    Ok(out)
}

/// A streamed answer: one JSON object per line.
fn stream_body(rx: mpsc::Receiver<serde_json::Value>) -> Response {
    let lines = ReceiverStream::new(rx).map(|v| Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\n"))));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn result<T: Named>(m: &T) -> serde_json::Value {
    match encode_value(m) {
        Ok(v) => serde_json::json!({ "result": v }),
        Err(s) => stream_error(&s),
    }
}

/// `/v3/lease/keepalive`: answers each keep-alive of the body, then ends.
async fn keep_alive(State(api): State<EtcdApi>, body: Bytes) -> Response {
    let reqs = match requests::<LeaseKeepAliveRequest>(&body) {
        Ok(r) => r,
        Err(s) => return error_response(&s),
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for r in reqs {
            let v = match api.keep_alive_once(r.id).await {
                Ok(resp) => result(&resp),
                Err(s) => stream_error(&s),
            };
            let failed = v.get("error").is_some();
            if tx.send(v).await.is_err() || failed {
                return;
            }
        }
    });
    stream_body(rx)
}

/// `/v3/watch`: the watches the body creates, streamed until the client
/// goes away or they are all cancelled.
async fn watch(State(api): State<EtcdApi>, body: Bytes) -> Response {
    let reqs = match requests::<WatchRequest>(&body) {
        Ok(r) => r,
        Err(s) => return error_response(&s),
    };
    let creates = reqs
        .iter()
        .filter(|r| {
            matches!(
                r.request_union,
                Some(proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(_))
            )
        })
        .count();
    // The body's requests, then nothing more (the watches go on, as
    // etcd's do after a client closes its side).
    let inbound = tokio_stream::iter(reqs.into_iter().map(Ok)).chain(tokio_stream::pending());
    let answers = match api.watch_stream(Box::pin(inbound)) {
        Ok(a) => a,
        Err(s) => return error_response(&s),
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(forward_watch(answers, tx, creates));
    stream_body(rx)
}

/// Copies watch responses to the gateway stream; ends it once every watch
/// it created was cancelled (clients such as Patroni then start over).
async fn forward_watch(
    mut answers: mpsc::Receiver<Result<WatchResponse, Status>>,
    tx: mpsc::Sender<serde_json::Value>,
    mut live: usize,
) {
    while let Some(a) = answers.recv().await {
        let (v, end) = match a {
            Ok(r) => {
                if r.canceled {
                    live = live.saturating_sub(1);
                }
                (result(&r), r.canceled && live == 0)
            }
            Err(s) => (stream_error(&s), true),
        };
        if tx.send(v).await.is_err() || end {
            return;
        }
    }
}
