//! Raft messages between stores: the conversion between the raft crate's
//! messages and their wire form, and the `Transport` the scheduler hands its
//! outgoing messages to, grouped per destination store.
//!
//! The scheduler never blocks on the network: `Transport::send` only queues.
//! The gRPC implementation (one long-lived stream per pair of stores, snapshots
//! on their own RPC) lives with the server; tests may plug in their own.

use std::path::PathBuf;

use proto::transport::{
    entry, raft_msg, Append, AppendResponse, ConfState as PbConfState, Defortify, Entry as PbEntry, Fortify,
    FortifyResponse, Heartbeat, HeartbeatResponse, RaftMsg, ReadIndex, ReadIndexResponse, Snapshot as PbSnapshot,
    SnapshotMeta as PbSnapshotMeta, SupportRequest, SupportResponse, TimeoutNow, Vote, VoteResponse,
};
use raft::support::SupportMsg;
use raft::{ConfState, Entry, EntryPayload, Message, MessageBody, Snapshot, SnapshotMeta};

use crate::command::{conf_change_from_proto, conf_change_to_proto};

/// Where outgoing raft messages go.
pub trait Transport: Send + Sync {
    /// Queues messages for `to_store`; a store that cannot be reached is
    /// retried with backoff without holding up the others.
    fn send(&self, to_store: u64, msgs: Vec<RaftMsg>);
    /// Streams the snapshot in `dir` (the files a snapshot of the range was
    /// built into) followed by its raft message, then calls `done(ok)`.
    fn send_snapshot(
        &self,
        to_store: u64,
        msg: RaftMsg,
        meta: proto::storage::SnapshotMeta,
        dir: PathBuf,
        done: SnapshotDone,
    );
}

/// Reports the outcome of a snapshot send.
pub type SnapshotDone = Box<dyn FnOnce(bool) + Send>;

/// A transport for a store with no peers: every message is dropped.
pub struct NoTransport;

impl Transport for NoTransport {
    fn send(&self, _to_store: u64, _msgs: Vec<RaftMsg>) {}
    fn send_snapshot(
        &self,
        _to: u64,
        _msg: RaftMsg,
        _meta: proto::storage::SnapshotMeta,
        _dir: PathBuf,
        done: SnapshotDone,
    ) {
        done(false);
    }
}

fn conf_to_pb(c: &ConfState) -> PbConfState {
    PbConfState {
        voters: c.voters.clone(),
        voters_outgoing: c.voters_outgoing.clone(),
        learners: c.learners.clone(),
        learners_next: c.learners_next.clone(),
    }
}

fn conf_from_pb(c: &PbConfState) -> ConfState {
    ConfState {
        voters: c.voters.clone(),
        voters_outgoing: c.voters_outgoing.clone(),
        learners: c.learners.clone(),
        learners_next: c.learners_next.clone(),
    }
}

fn entry_to_pb(e: &Entry) -> PbEntry {
    let (kind, data, cc) = match &e.payload {
        EntryPayload::Empty => (entry::Kind::Empty, Vec::new(), None),
        EntryPayload::Normal(d) => (entry::Kind::Normal, d.clone(), None),
        EntryPayload::ConfChange(cc) => (entry::Kind::ConfChange, Vec::new(), Some(conf_change_to_proto(cc))),
    };
    PbEntry {
        term: e.term,
        index: e.index,
        kind: kind as i32,
        data,
        conf_change: cc,
    }
}

fn entry_from_pb(e: PbEntry) -> Result<Entry, String> {
    let payload = match entry::Kind::try_from(e.kind) {
        Ok(entry::Kind::Empty) => EntryPayload::Empty,
        Ok(entry::Kind::Normal) => EntryPayload::Normal(e.data),
        Ok(entry::Kind::ConfChange) => {
            let cc = e.conf_change.ok_or("conf change entry without a change")?;
            EntryPayload::ConfChange(conf_change_from_proto(&cc)?)
        }
        Err(_) => return Err(format!("unknown entry kind {}", e.kind)),
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        payload,
    })
}

pub fn snapshot_to_pb(s: &Snapshot) -> PbSnapshot {
    PbSnapshot {
        meta: Some(PbSnapshotMeta {
            index: s.meta.index,
            term: s.meta.term,
            conf_state: Some(conf_to_pb(&s.meta.conf_state)),
        }),
        data: s.data.clone(),
    }
}

fn snapshot_from_pb(s: PbSnapshot) -> Snapshot {
    let m = s.meta.unwrap_or_default();
    Snapshot {
        meta: SnapshotMeta {
            index: m.index,
            term: m.term,
            conf_state: conf_from_pb(&m.conf_state.unwrap_or_default()),
        },
        data: s.data,
    }
}

/// The wire form of a raft message of `range_id`.
pub fn message_to_pb(range_id: u64, m: &Message) -> RaftMsg {
    use raft_msg::Body;
    let body = match &m.body {
        MessageBody::Append {
            log_term,
            index,
            entries,
            commit,
        } => Body::Append(Append {
            log_term: *log_term,
            index: *index,
            entries: entries.iter().map(entry_to_pb).collect(),
            commit: *commit,
        }),
        MessageBody::AppendResponse {
            index,
            reject,
            hint_index,
            hint_term,
        } => Body::AppendResponse(AppendResponse {
            index: *index,
            reject: *reject,
            hint_index: *hint_index,
            hint_term: *hint_term,
        }),
        MessageBody::Vote {
            pre,
            last_index,
            last_term,
            transfer,
        } => Body::Vote(Vote {
            pre: *pre,
            last_index: *last_index,
            last_term: *last_term,
            transfer: *transfer,
        }),
        MessageBody::VoteResponse { pre, reject } => Body::VoteResponse(VoteResponse {
            pre: *pre,
            reject: *reject,
        }),
        MessageBody::Heartbeat { commit, seq } => Body::Heartbeat(Heartbeat {
            commit: *commit,
            seq: *seq,
        }),
        MessageBody::HeartbeatResponse { seq, fortified } => Body::HeartbeatResponse(HeartbeatResponse {
            seq: *seq,
            fortified: *fortified,
        }),
        MessageBody::Fortify { epoch } => Body::Fortify(Fortify { epoch: *epoch }),
        MessageBody::FortifyResponse { epoch, incarnation } => Body::FortifyResponse(FortifyResponse {
            epoch: *epoch,
            incarnation: *incarnation,
        }),
        MessageBody::Defortify { term } => Body::Defortify(Defortify { term: *term }),
        MessageBody::Snapshot { snapshot } => Body::Snapshot(snapshot_to_pb(snapshot)),
        MessageBody::TimeoutNow => Body::TimeoutNow(TimeoutNow {}),
        MessageBody::ReadIndex { ctx } => Body::ReadIndex(ReadIndex { ctx: ctx.clone() }),
        MessageBody::ReadIndexResponse { ctx, index } => Body::ReadIndexResponse(ReadIndexResponse {
            ctx: ctx.clone(),
            index: *index,
        }),
    };
    RaftMsg {
        range_id,
        from: m.from,
        to: m.to,
        term: m.term,
        body: Some(body),
    }
}

/// A raft message from its wire form; malformed input is an error, not a panic.
pub fn message_from_pb(m: RaftMsg) -> Result<(u64, Message), String> {
    use raft_msg::Body;
    let body = match m.body.ok_or("raft message without a body")? {
        Body::Append(a) => MessageBody::Append {
            log_term: a.log_term,
            index: a.index,
            entries: a.entries.into_iter().map(entry_from_pb).collect::<Result<_, _>>()?,
            commit: a.commit,
        },
        Body::AppendResponse(r) => MessageBody::AppendResponse {
            index: r.index,
            reject: r.reject,
            hint_index: r.hint_index,
            hint_term: r.hint_term,
        },
        Body::Vote(v) => MessageBody::Vote {
            pre: v.pre,
            last_index: v.last_index,
            last_term: v.last_term,
            transfer: v.transfer,
        },
        Body::VoteResponse(v) => MessageBody::VoteResponse {
            pre: v.pre,
            reject: v.reject,
        },
        Body::Heartbeat(h) => MessageBody::Heartbeat {
            commit: h.commit,
            seq: h.seq,
        },
        Body::HeartbeatResponse(h) => MessageBody::HeartbeatResponse {
            seq: h.seq,
            fortified: h.fortified,
        },
        Body::Fortify(f) => MessageBody::Fortify { epoch: f.epoch },
        Body::FortifyResponse(f) => MessageBody::FortifyResponse {
            epoch: f.epoch,
            incarnation: f.incarnation,
        },
        Body::Defortify(d) => MessageBody::Defortify { term: d.term },
        Body::SupportRequest(_) | Body::SupportResponse(_) | Body::CoalescedHeartbeats(_) => {
            return Err("a store-level message is not one range's raft message".into())
        }
        Body::Snapshot(s) => MessageBody::Snapshot {
            snapshot: snapshot_from_pb(s),
        },
        Body::TimeoutNow(_) => MessageBody::TimeoutNow,
        Body::ReadIndex(r) => MessageBody::ReadIndex { ctx: r.ctx },
        Body::ReadIndexResponse(r) => MessageBody::ReadIndexResponse {
            ctx: r.ctx,
            index: r.index,
        },
    };
    // The entries of an append must be contiguous and follow its index.
    if let MessageBody::Append { index, entries, .. } = &body {
        for (k, e) in entries.iter().enumerate() {
            if e.index != index + 1 + k as u64 {
                return Err(format!(
                    "append after {index} carries entry {} at position {k}",
                    e.index
                ));
            }
        }
    }
    Ok((
        m.range_id,
        Message {
            from: m.from,
            to: m.to,
            term: m.term,
            body,
        },
    ))
}

/// Packs the heartbeats and heartbeat answers among `msgs` (the wire forms
/// of one frame) into one message of range 0; the others stay as they are.
pub fn coalesce_heartbeats(msgs: &mut Vec<RaftMsg>) {
    use proto::transport::{CoalescedHeartbeats, PackedHeartbeat, PackedHeartbeatResponse};
    use raft_msg::Body;
    let mut packed = CoalescedHeartbeats::default();
    msgs.retain(|m| match &m.body {
        Some(Body::Heartbeat(h)) => {
            packed.heartbeats.push(PackedHeartbeat {
                range_id: m.range_id,
                from: m.from,
                to: m.to,
                term: m.term,
                commit: h.commit,
                seq: h.seq,
            });
            false
        }
        Some(Body::HeartbeatResponse(h)) => {
            packed.responses.push(PackedHeartbeatResponse {
                range_id: m.range_id,
                from: m.from,
                to: m.to,
                term: m.term,
                seq: h.seq,
                fortified: h.fortified,
            });
            false
        }
        _ => true,
    });
    if packed.heartbeats.len() + packed.responses.len() > 1 {
        msgs.push(RaftMsg {
            range_id: 0,
            body: Some(Body::CoalescedHeartbeats(packed)),
            ..Default::default()
        });
    } else {
        // One alone travels as it is.
        msgs.extend(uncoalesce_heartbeats(packed));
    }
}

/// The per-range messages a coalesced heartbeat message carries.
pub fn uncoalesce_heartbeats(c: proto::transport::CoalescedHeartbeats) -> Vec<RaftMsg> {
    use raft_msg::Body;
    let hbs = c.heartbeats.into_iter().map(|h| RaftMsg {
        range_id: h.range_id,
        from: h.from,
        to: h.to,
        term: h.term,
        body: Some(Body::Heartbeat(Heartbeat {
            commit: h.commit,
            seq: h.seq,
        })),
    });
    let resps = c.responses.into_iter().map(|h| RaftMsg {
        range_id: h.range_id,
        from: h.from,
        to: h.to,
        term: h.term,
        body: Some(Body::HeartbeatResponse(HeartbeatResponse {
            seq: h.seq,
            fortified: h.fortified,
        })),
    });
    hbs.chain(resps).filter(|m| m.range_id != 0).collect()
}

/// The wire form of a store liveness message: range 0, store ids.
pub fn support_to_pb(m: &SupportMsg) -> RaftMsg {
    use raft_msg::Body;
    let body = match *m {
        SupportMsg::Request { epoch, sent_at, .. } => Body::SupportRequest(SupportRequest { epoch, sent_at }),
        SupportMsg::Response {
            epoch,
            granted,
            sent_at,
            incarnation,
            ..
        } => Body::SupportResponse(SupportResponse {
            epoch,
            granted,
            sent_at,
            incarnation,
        }),
    };
    RaftMsg {
        range_id: 0,
        from: m.from(),
        to: m.to(),
        term: 0,
        body: Some(body),
    }
}

/// A store liveness message from its wire form (`None`: not one).
pub fn support_from_pb(m: &RaftMsg) -> Option<SupportMsg> {
    use raft_msg::Body;
    match m.body.as_ref()? {
        Body::SupportRequest(r) => Some(SupportMsg::Request {
            from: m.from,
            to: m.to,
            epoch: r.epoch,
            sent_at: r.sent_at,
        }),
        Body::SupportResponse(r) => Some(SupportMsg::Response {
            from: m.from,
            to: m.to,
            epoch: r.epoch,
            granted: r.granted,
            sent_at: r.sent_at,
            incarnation: r.incarnation,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::{ConfChange, ConfChangeKind, ConfChangeSingle};

    #[test]
    fn every_message_round_trips_and_garbage_is_refused() {
        let entries = vec![
            Entry {
                term: 2,
                index: 6,
                payload: EntryPayload::Empty,
            },
            Entry {
                term: 2,
                index: 7,
                payload: EntryPayload::Normal(b"x".to_vec()),
            },
            Entry {
                term: 2,
                index: 8,
                payload: EntryPayload::ConfChange(ConfChange {
                    changes: vec![ConfChangeSingle {
                        kind: ConfChangeKind::AddLearner,
                        node: 4,
                    }],
                    context: b"d".to_vec(),
                }),
            },
        ];
        let bodies = vec![
            MessageBody::Append {
                log_term: 1,
                index: 5,
                entries,
                commit: 4,
            },
            MessageBody::AppendResponse {
                index: 9,
                reject: true,
                hint_index: 3,
                hint_term: 1,
            },
            MessageBody::Vote {
                pre: true,
                last_index: 3,
                last_term: 2,
                transfer: false,
            },
            MessageBody::VoteResponse {
                pre: false,
                reject: true,
            },
            MessageBody::Heartbeat { commit: 3, seq: 9 },
            MessageBody::HeartbeatResponse {
                seq: 9,
                fortified: true,
            },
            MessageBody::Fortify { epoch: 1 << 32 },
            MessageBody::FortifyResponse {
                epoch: 1 << 32,
                incarnation: 2,
            },
            MessageBody::Defortify { term: 4 },
            MessageBody::Snapshot {
                snapshot: Snapshot {
                    meta: SnapshotMeta {
                        index: 10,
                        term: 3,
                        conf_state: ConfState::with_voters(&[1, 2, 3]),
                    },
                    data: b"snap".to_vec(),
                },
            },
            MessageBody::TimeoutNow,
            MessageBody::ReadIndex { ctx: b"c".to_vec() },
            MessageBody::ReadIndexResponse {
                ctx: b"c".to_vec(),
                index: 4,
            },
        ];
        for body in bodies {
            let m = Message {
                from: 1,
                to: 2,
                term: 3,
                body,
            };
            let (r, back) = message_from_pb(message_to_pb(7, &m)).unwrap();
            assert_eq!((r, back), (7, m));
        }
        // Heartbeats of many ranges pack into one message and come back
        // unchanged, the other messages untouched.
        let hb = |range_id, commit| {
            message_to_pb(
                range_id,
                &Message {
                    from: 1,
                    to: 2,
                    term: 3,
                    body: MessageBody::Heartbeat { commit, seq: 9 },
                },
            )
        };
        let resp = message_to_pb(
            8,
            &Message {
                from: 2,
                to: 1,
                term: 3,
                body: MessageBody::HeartbeatResponse {
                    seq: 9,
                    fortified: false,
                },
            },
        );
        let vote = message_to_pb(
            5,
            &Message {
                from: 1,
                to: 2,
                term: 3,
                body: MessageBody::TimeoutNow,
            },
        );
        let original = vec![hb(4, 10), vote.clone(), hb(6, 0), resp.clone()];
        let mut frame = original.clone();
        coalesce_heartbeats(&mut frame);
        assert_eq!(frame.len(), 2, "the three heartbeats are one message");
        assert_eq!(frame[0], vote);
        let Some(raft_msg::Body::CoalescedHeartbeats(c)) = frame[1].body.clone() else {
            panic!("not coalesced: {frame:?}");
        };
        assert_eq!(uncoalesce_heartbeats(c), vec![hb(4, 10), hb(6, 0), resp]);
        let mut one = vec![hb(4, 10)];
        coalesce_heartbeats(&mut one);
        assert_eq!(one, vec![hb(4, 10)], "one heartbeat alone is not packed");
        for m in [
            SupportMsg::Request {
                from: 1,
                to: 2,
                epoch: 5,
                sent_at: 77,
            },
            SupportMsg::Response {
                from: 2,
                to: 1,
                epoch: 5,
                granted: true,
                sent_at: 77,
                incarnation: 3,
            },
        ] {
            let pb = support_to_pb(&m);
            assert_eq!(pb.range_id, 0);
            assert_eq!(support_from_pb(&pb), Some(m));
            assert!(message_from_pb(pb).is_err(), "not a raft message");
        }
        assert!(message_from_pb(RaftMsg {
            range_id: 1,
            from: 1,
            to: 2,
            term: 1,
            body: None
        })
        .is_err());
        let gap = Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                log_term: 1,
                index: 5,
                entries: vec![Entry {
                    term: 1,
                    index: 9,
                    payload: EntryPayload::Empty,
                }],
                commit: 0,
            },
        };
        assert!(message_from_pb(message_to_pb(1, &gap)).is_err());
    }
}
