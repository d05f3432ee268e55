//! etcd's `Watch` service: one task per stream owns that stream's watchers
//! and feeds them from this node's replica of the etcd range.
//!
//! Every watcher has a cursor, the next revision it must see. Whenever the
//! replica applies more (`StoreHandle::etcd_applied`), the task reads the
//! history (`kvserver::etcd_history`) from each cursor up to the applied
//! revision, out of one engine snapshot, and sends what matches: so events
//! go out in revision order, each once, from any start revision the
//! history still holds. Nothing is buffered but the stream's own bounded
//! channel: a slow client only slows its own task, which reads from
//! storage where it left off when the client takes more; writes and other
//! streams never wait for it.
//!
//! A watch from a compacted revision is cancelled with the compaction
//! revision, as etcd does. Nothing here panics on a request.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kvserver::etcd_history;
use kvserver::keyspace::ETCD_RANGE_ID;
use prost::Message as _;
use proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch, ResponseHeader,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use proto::mvccpb::{event::EventType, Event};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status, Streaming};

use crate::etcd_api::EtcdApi;
use crate::Shared;

/// Revisions read per watcher per pass (etcd's `watchBatchMaxRevs`).
const MAX_REVS_PER_PASS: usize = 1000;
/// Responses queued for one stream before its task waits for the client.
const STREAM_BUFFER: usize = 128;

/// How often a watcher that asked for progress notifications gets one
/// when idle: etcd's default is 10 minutes; `TARDIGRADE_WATCH_PROGRESS_MS`
/// changes it (tests).
fn progress_interval() -> Duration {
    let ms = std::env::var("TARDIGRADE_WATCH_PROGRESS_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600_000u64);
    Duration::from_millis(ms.max(10))
}

/// What a client sends on a Watch stream (gRPC's, or the gateway's body).
pub type Inbound = Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchRequest, Status>> + Send>>;

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// One watcher of a stream.
#[derive(Debug)]
struct Watcher {
    key: Vec<u8>,
    /// Empty: only `key`; `[0]`: every key from `key` on.
    range_end: Vec<u8>,
    /// The next revision it must see.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// Sent something since the last progress notification.
    active: bool,
}

impl Watcher {
    fn matches(&self, e: &Event) -> bool {
        let put = e.r#type == EventType::Put as i32;
        if (put && self.no_put) || (!put && self.no_delete) {
            return false;
        }
        let Some(kv) = &e.kv else { return false };
        let k = kv.key.as_slice();
        if self.range_end.is_empty() {
            k == self.key.as_slice()
        } else if self.range_end == [0] {
            k >= self.key.as_slice()
        } else {
            k >= self.key.as_slice() && k < self.range_end.as_slice()
        }
    }
}

/// Why a watch is refused at creation (etcd's reasons).
fn check_create(c: &WatchCreateRequest) -> Result<(), &'static str> {
    let end = c.range_end.as_slice();
    if !end.is_empty() && end != [0] && c.key.as_slice() >= end {
        return Err("mvcc: watcher range is empty");
    }
    Ok(())
}

/// The state of one Watch stream.
struct StreamTask {
    shared: Arc<Shared>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
}

/// The stream ended (the client went away or the node cannot serve).
struct Ended;

impl StreamTask {
    fn store(&self) -> Result<kvserver::StoreHandle, Status> {
        let store = self.shared.store()?;
        if !store.has_range(ETCD_RANGE_ID) {
            return Err(Status::unavailable(
                "etcdserver: this node holds no replica of the etcd keyspace; watch through another node",
            ));
        }
        Ok(store)
    }

    fn header(&self, store: &kvserver::StoreHandle, rev: i64) -> ResponseHeader {
        let term = store.with_status(ETCD_RANGE_ID, |s| s.term).unwrap_or(0);
        self.shared.header(store, rev, term)
    }

    /// The store, or the stream ends with the reason it cannot be served.
    async fn store_or_end(&self) -> Result<kvserver::StoreHandle, Ended> {
        match self.store() {
            Ok(s) => Ok(s),
            Err(st) => Err(self.fail(st).await),
        }
    }

    /// Ends the stream with `st`.
    async fn fail(&self, st: Status) -> Ended {
        let _ = self.out.send(Err(st)).await;
        Ended
    }

    async fn send(&self, r: WatchResponse) -> Result<(), Ended> {
        self.out.send(Ok(r)).await.map_err(|_| Ended)
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Ended> {
        let store = self.store_or_end().await?;
        let snap = store.engine().snapshot();
        let state = match store.rev_state(&snap) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(Status::internal(e.to_string())).await),
        };
        let header = Some(self.header(&store, state.rev));
        // A refused watch is created and cancelled at once, id -1, as etcd does.
        let refuse = |why: &str| WatchResponse {
            header,
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: why.into(),
            ..Default::default()
        };
        if let Err(why) = check_create(&c) {
            return self.send(refuse(why)).await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .send(refuse("mvcc: duplicate watch ID provided on the WatchStream"))
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let next = if c.start_revision > 0 {
            c.start_revision
        } else {
            state.rev + 1
        };
        self.send(WatchResponse {
            header,
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        if next < state.compact_rev {
            return self
                .send(WatchResponse {
                    // etcd's answer carries no revision here.
                    header: Some(self.header(&store, 0)),
                    watch_id: id,
                    canceled: true,
                    compact_revision: state.compact_rev,
                    ..Default::default()
                })
                .await;
        }
        self.watchers.insert(
            id,
            Watcher {
                key: c.key,
                range_end: c.range_end,
                next,
                prev_kv: c.prev_kv,
                no_put: c.filters.contains(&(FilterType::Noput as i32)),
                no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
                progress_notify: c.progress_notify,
                fragment: c.fragment,
                active: false,
            },
        );
        self.catch_up().await
    }

    /// Sends every watcher what the replica applied past its cursor.
    async fn catch_up(&mut self) -> Result<(), Ended> {
        if self.watchers.is_empty() {
            return Ok(());
        }
        let store = self.store_or_end().await?;
        loop {
            let snap = store.engine().snapshot();
            let state = match store.rev_state(&snap) {
                Ok(s) => s,
                Err(e) => return Err(self.fail(Status::internal(e.to_string())).await),
            };
            // Watchers grouped by cursor: the history is read once per group.
            let mut groups: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for (id, w) in &self.watchers {
                if w.next <= state.rev {
                    groups.entry(w.next).or_default().push(*id);
                }
            }
            if groups.is_empty() {
                return Ok(());
            }
            let header = Some(self.header(&store, state.rev));
            let mut more = false;
            for (from, ids) in groups {
                if from < state.compact_rev {
                    // Compacted under a watcher that fell behind.
                    for id in ids {
                        self.watchers.remove(&id);
                        self.send(WatchResponse {
                            header: Some(self.header(&store, 0)),
                            watch_id: id,
                            canceled: true,
                            compact_revision: state.compact_rev,
                            ..Default::default()
                        })
                        .await?;
                    }
                    continue;
                }
                let prev = ids.iter().any(|id| self.watchers.get(id).is_some_and(|w| w.prev_kv));
                let revs = match etcd_history::read(&snap, from, state.rev, MAX_REVS_PER_PASS, prev) {
                    Ok(r) => r,
                    Err(e) => return Err(self.fail(Status::internal(e.to_string())).await),
                };
                let upto = if revs.len() >= MAX_REVS_PER_PASS {
                    more = true;
                    revs.last().map_or(state.rev, |r| r.rev)
                } else {
                    state.rev
                };
                for id in ids {
                    let Some(w) = self.watchers.get_mut(&id) else { continue };
                    let events: Vec<Event> = revs
                        .iter()
                        .flat_map(|r| r.events.iter())
                        .filter(|e| w.matches(e))
                        .map(|e| {
                            let mut e = e.clone();
                            if !w.prev_kv {
                                e.prev_kv = None;
                            }
                            e
                        })
                        .collect();
                    w.next = upto + 1;
                    if events.is_empty() {
                        continue;
                    }
                    w.active = true;
                    let fragment = w.fragment;
                    for r in responses(header, id, events, fragment) {
                        self.send(r).await?;
                    }
                }
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Tells idle watchers that asked for it how far they are.
    async fn progress_notify(&mut self) -> Result<(), Ended> {
        let Ok(store) = self.store() else { return Ok(()) };
        let mut due = Vec::new();
        for (id, w) in self.watchers.iter_mut() {
            if w.progress_notify && !std::mem::take(&mut w.active) {
                due.push((*id, w.next - 1));
            }
        }
        for (id, rev) in due {
            let header = Some(self.header(&store, rev));
            self.send(WatchResponse {
                header,
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    /// A progress request: the revision every watcher of the stream has
    /// seen everything up to.
    async fn progress(&mut self) -> Result<(), Ended> {
        let store = self.store_or_end().await?;
        let snap = store.engine().snapshot();
        let rev = store.rev_state(&snap).map(|s| s.rev).unwrap_or(0);
        let seen = self.watchers.values().map(|w| w.next - 1).min().unwrap_or(rev).min(rev);
        let header = Some(self.header(&store, seen));
        self.send(WatchResponse {
            header,
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    async fn run(mut self, mut inbound: Inbound) {
        let Ok(store) = self.shared.store() else {
            let _ = self.out.send(Err(Status::unavailable("etcdserver: not ready"))).await;
            return;
        };
        let mut applied = store.etcd_applied();
        let mut progress = tokio::time::interval(progress_interval());
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.tick().await;
        loop {
            let step = tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(m)) => self.request(m).await,
                    // The client closed its side: its watches go on, as
                    // etcd's do.
                    None => {
                        inbound = Box::pin(tokio_stream::pending());
                        Ok(())
                    }
                    Some(Err(_)) => Err(Ended),
                },
                changed = applied.changed() => match changed {
                    Ok(()) => self.catch_up().await,
                    Err(_) => Err(Ended),
                },
                _ = progress.tick() => self.progress_notify().await,
                _ = self.out.closed() => Err(Ended),
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn request(&mut self, m: WatchRequest) -> Result<(), Ended> {
        match m.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    let store = self.shared.store().ok();
                    let header = store.map(|s| self.header(&s, 0));
                    self.send(WatchResponse {
                        header,
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
            None => Ok(()),
        }
    }
}

/// The responses carrying `events` for watcher `id`: one, or fragments of
/// at most etcd's request size each if the watcher accepts fragments.
fn responses(header: Option<ResponseHeader>, id: i64, events: Vec<Event>, fragment: bool) -> Vec<WatchResponse> {
    let whole = WatchResponse {
        header,
        watch_id: id,
        events,
        ..Default::default()
    };
    let limit = kvserver::etcd::MAX_REQUEST_BYTES;
    if whole.encoded_len() <= limit.min(SPLIT_BYTES) {
        return vec![whole];
    }
    if !fragment {
        return split_at_revisions(whole);
    }
    let mut out = Vec::new();
    let mut cur = WatchResponse {
        header,
        watch_id: id,
        fragment: true,
        ..Default::default()
    };
    let mut size = 0;
    for e in whole.events {
        let n = e.encoded_len() + 8;
        if size + n > limit && !cur.events.is_empty() {
            let next = WatchResponse {
                header,
                watch_id: id,
                fragment: true,
                ..Default::default()
            };
            out.push(std::mem::replace(&mut cur, next));
            size = 0;
        }
        size += n;
        cur.events.push(e);
    }
    cur.fragment = false;
    out.push(cur);
    out
}

/// Catch-up responses are cut at revision boundaries once they pass this
/// size, so that no client's message limit (gRPC's default is 4 MiB) is
/// met by a watcher that fell behind; one revision is never cut.
const SPLIT_BYTES: usize = 1 << 20;

/// `whole` as responses of whole revisions, each at most `SPLIT_BYTES`
/// unless one revision alone is larger.
fn split_at_revisions(whole: WatchResponse) -> Vec<WatchResponse> {
    let empty = WatchResponse {
        events: Vec::new(),
        ..whole.clone()
    };
    let rev_of = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let mut out = Vec::new();
    let mut cur = empty.clone();
    let mut size = 0;
    for e in whole.events {
        let n = e.encoded_len() + 8;
        let new_rev = cur.events.last().is_some_and(|last| rev_of(last) != rev_of(&e));
        if new_rev && size + n > SPLIT_BYTES {
            out.push(std::mem::replace(&mut cur, empty.clone()));
            size = 0;
        }
        size += n;
        cur.events.push(e);
    }
    out.push(cur);
    out
}

#[tonic::async_trait]
impl Watch for EtcdApi {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self.watch_stream(Box::pin(req.into_inner()))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl EtcdApi {
    /// Serves one Watch stream: its answers, until the client goes away.
    pub fn watch_stream(&self, inbound: Inbound) -> Result<mpsc::Receiver<Result<WatchResponse, Status>>, Status> {
        self.shared.store()?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let task = StreamTask {
            shared: self.shared.clone(),
            out: tx,
            watchers: BTreeMap::new(),
            next_id: 0,
        };
        tokio::spawn(task.run(inbound));
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::mvccpb::KeyValue;

    fn ev(key: &str, put: bool, size: usize) -> Event {
        Event {
            r#type: if put { EventType::Put } else { EventType::Delete } as i32,
            kv: Some(KeyValue {
                key: key.into(),
                value: vec![b'x'; size],
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    #[test]
    fn filters_and_ranges_select_events() {
        let w = |key: &str, end: &str, no_put, no_delete| Watcher {
            key: key.into(),
            range_end: end.into(),
            next: 1,
            prev_kv: false,
            no_put,
            no_delete,
            progress_notify: false,
            fragment: false,
            active: false,
        };
        assert!(w("a", "", false, false).matches(&ev("a", true, 0)));
        assert!(!w("a", "", false, false).matches(&ev("ab", true, 0)));
        assert!(w("a", "b", false, false).matches(&ev("ab", true, 0)));
        assert!(!w("a", "b", false, false).matches(&ev("b", true, 0)));
        assert!(w("a", "\0", false, false).matches(&ev("zz", true, 0)));
        assert!(!w("a", "\0", true, false).matches(&ev("a", true, 0)));
        assert!(w("a", "\0", true, false).matches(&ev("a", false, 0)));
        assert!(!w("a", "\0", false, true).matches(&ev("a", false, 0)));
        assert_eq!(
            check_create(&WatchCreateRequest {
                key: b"b".to_vec(),
                range_end: b"a".to_vec(),
                ..Default::default()
            }),
            Err("mvcc: watcher range is empty")
        );
        assert!(check_create(&WatchCreateRequest {
            key: b"a".to_vec(),
            range_end: vec![0],
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn big_responses_are_cut_at_revisions_or_fragmented_when_asked() {
        let events: Vec<Event> = (0..5).map(|i| ev(&format!("k{i}"), true, 600 * 1024)).collect();
        // Unfragmented: cut at revision boundaries only.
        let mut same_rev = events.clone();
        for e in &mut same_rev {
            e.kv.as_mut().unwrap().mod_revision = 7;
        }
        assert_eq!(responses(None, 1, same_rev, false).len(), 1);
        let mut distinct = events.clone();
        for (i, e) in distinct.iter_mut().enumerate() {
            e.kv.as_mut().unwrap().mod_revision = 7 + i as i64;
        }
        let parts = responses(None, 1, distinct, false);
        assert!(parts.len() >= 3, "{} parts", parts.len());
        assert!(parts.iter().all(|r| !r.fragment && r.encoded_len() <= 2 * SPLIT_BYTES));
        assert_eq!(parts.iter().map(|r| r.events.len()).sum::<usize>(), 5);
        let parts = responses(None, 1, events, true);
        assert!(parts.len() >= 2, "{} parts", parts.len());
        assert!(parts[..parts.len() - 1].iter().all(|r| r.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert_eq!(parts.iter().map(|r| r.events.len()).sum::<usize>(), 5);
        assert!(parts
            .iter()
            .all(|r| r.encoded_len() <= kvserver::etcd::MAX_REQUEST_BYTES + 700 * 1024));
    }
}
