//! A node's metrics: counters and latency histograms, rendered in Prometheus'
//! text format for the HTTP `/metrics` endpoint.
//!
//! Everything is lock-free atomics so that the raft loop and request handlers
//! can record without contending; nothing here does I/O.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (cumulative when rendered).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in micro-units (microseconds for latencies).
    sum_micro: AtomicU64,
}

/// Latency buckets in seconds, 50 us to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for counts (entries per fsync).
pub const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> f64 {
        self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cum = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count());
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum());
        let _ = writeln!(out, "{name}_count{braces} {}", self.count());
    }
}

/// The requests whose latency is measured.
pub const METHODS: &[&str] = &["range", "put", "delete_range", "txn", "compact", "kv_batch"];

/// Every metric of a node.
pub struct Metrics {
    pub raft_proposals: Counter,
    pub raft_proposals_dropped: Counter,
    pub raft_entries_committed: Counter,
    pub raft_fsyncs: Counter,
    pub raft_entries_persisted: Counter,
    pub raft_entries_per_fsync: Histogram,
    /// Ranges whose entries or hard state one synced write carried (group
    /// commit across ranges).
    pub raft_ranges_per_fsync: Histogram,
    /// Scheduler cycles that had work, and how long each took (ready,
    /// write, apply, send).
    pub scheduler_cycle_seconds: Histogram,
    /// How long each synced write of the log writer took.
    pub raft_sync_seconds: Histogram,
    /// Batches handed to the log writer (written there, not inline: work was
    /// waiting), by how many were in flight already.
    pub raft_writes_in_flight: Histogram,
    pub raft_messages_sent: Counter,
    /// Frames of raft messages handed to the transport (one per destination
    /// store per cycle that had messages for it).
    pub raft_frames_sent: Counter,
    pub raft_messages_received: Counter,
    pub raft_ticks: Counter,
    /// Replicas ticked (a quiesced range's are not).
    pub raft_replica_ticks: Counter,
    /// Replicas not ticked at the last tick (quiesced leaders and their
    /// fortified followers).
    pub ranges_quiescent: Gauge,
    /// Supports of other stores' epochs this store withdrew (or saw end).
    pub support_withdrawn: Counter,
    /// Store liveness messages sent (they are counted among the raft
    /// messages too: they ride the same frames).
    pub support_messages_sent: Counter,
    pub ranges: Gauge,
    pub applied_commands: Counter,
    pub snapshots_applied: Counter,
    /// Raft message streams opened to other stores (one per peer normally;
    /// more only when peers restart or the network breaks).
    pub raft_streams_opened: Counter,
    pub rejected_commands: Counter,
    /// Splits and merges this store's leaseholders carried out.
    pub splits: Counter,
    pub merges: Counter,
    pub txn: TxnMetrics,
    request_latency: Vec<Histogram>,
}

/// What the transaction layer counts on this node.
#[derive(Default)]
pub struct TxnMetrics {
    /// Commits that wrote a record (two phases) at a leaseholder here.
    pub commits: Counter,
    /// Commits in one raft command (no record, no intents).
    pub commits_one_phase: Counter,
    /// Transactions rolled back by their coordinator.
    pub rollbacks: Counter,
    /// Pushes sent by requests that met an intent here.
    pub pushes: Counter,
    /// Pushes (evaluated here) that aborted their pushee.
    pub pushes_aborted: Counter,
    /// Deadlocks this node's pushers found and broke.
    pub deadlocks: Counter,
    /// Intents resolved by requests that met them (their owner had finished).
    pub intents_resolved_by_conflict: Counter,
    /// Intents resolved in the background after a commit or abort.
    pub intents_resolved_async: Counter,
    /// Refreshes evaluated here, and how many failed.
    pub refreshes: Counter,
    pub refreshes_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            raft_proposals: Counter::default(),
            raft_proposals_dropped: Counter::default(),
            raft_entries_committed: Counter::default(),
            raft_fsyncs: Counter::default(),
            raft_entries_persisted: Counter::default(),
            raft_entries_per_fsync: Histogram::new(COUNT_BUCKETS),
            raft_ranges_per_fsync: Histogram::new(COUNT_BUCKETS),
            scheduler_cycle_seconds: Histogram::new(LATENCY_BUCKETS),
            raft_sync_seconds: Histogram::new(LATENCY_BUCKETS),
            raft_writes_in_flight: Histogram::new(COUNT_BUCKETS),
            raft_messages_sent: Counter::default(),
            raft_frames_sent: Counter::default(),
            raft_messages_received: Counter::default(),
            raft_ticks: Counter::default(),
            raft_replica_ticks: Counter::default(),
            ranges_quiescent: Gauge::default(),
            support_withdrawn: Counter::default(),
            support_messages_sent: Counter::default(),
            ranges: Gauge::default(),
            applied_commands: Counter::default(),
            snapshots_applied: Counter::default(),
            raft_streams_opened: Counter::default(),
            rejected_commands: Counter::default(),
            splits: Counter::default(),
            merges: Counter::default(),
            txn: TxnMetrics::default(),
            request_latency: METHODS.iter().map(|_| Histogram::new(LATENCY_BUCKETS)).collect(),
        }
    }
}

impl Metrics {
    /// The latency histogram of `method` (one of [`METHODS`]).
    pub fn request_latency(&self, method: &str) -> Option<&Histogram> {
        METHODS
            .iter()
            .position(|&m| m == method)
            .map(|i| &self.request_latency[i])
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 19] = [
            (
                "tardigrade_store_liveness_messages_sent_total",
                "Store liveness requests and answers sent (also counted as raft messages).",
                &self.support_messages_sent,
            ),
            (
                "tardigrade_raft_replica_ticks_total",
                "Replica ticks (quiesced ranges take none).",
                &self.raft_replica_ticks,
            ),
            (
                "tardigrade_store_support_withdrawn_total",
                "Supports of other stores' epochs withdrawn by this store.",
                &self.support_withdrawn,
            ),
            (
                "tardigrade_raft_frames_sent_total",
                "Frames of raft messages sent (one per destination store per scheduler cycle).",
                &self.raft_frames_sent,
            ),
            (
                "tardigrade_range_splits_total",
                "Splits carried out by this node's leaseholders.",
                &self.splits,
            ),
            (
                "tardigrade_range_merges_total",
                "Merges carried out by this node's leaseholders.",
                &self.merges,
            ),
            (
                "tardigrade_raft_streams_opened_total",
                "Raft message streams opened to other stores.",
                &self.raft_streams_opened,
            ),
            (
                "tardigrade_snapshots_applied_total",
                "Raft snapshots installed on this store.",
                &self.snapshots_applied,
            ),
            (
                "tardigrade_raft_proposals_total",
                "Commands proposed to raft.",
                &self.raft_proposals,
            ),
            (
                "tardigrade_raft_proposals_dropped_total",
                "Proposals refused (not leader) or lost.",
                &self.raft_proposals_dropped,
            ),
            (
                "tardigrade_raft_entries_committed_total",
                "Raft entries committed and applied.",
                &self.raft_entries_committed,
            ),
            (
                "tardigrade_raft_fsyncs_total",
                "Synced writes of raft state (one per scheduler cycle with work).",
                &self.raft_fsyncs,
            ),
            (
                "tardigrade_raft_entries_persisted_total",
                "Raft entries written by those syncs.",
                &self.raft_entries_persisted,
            ),
            (
                "tardigrade_raft_messages_sent_total",
                "Raft messages sent to other stores.",
                &self.raft_messages_sent,
            ),
            (
                "tardigrade_raft_messages_received_total",
                "Raft messages received from other stores.",
                &self.raft_messages_received,
            ),
            (
                "tardigrade_raft_ticks_total",
                "Store-level raft ticks.",
                &self.raft_ticks,
            ),
            (
                "tardigrade_applied_commands_total",
                "Commands applied to the state machine.",
                &self.applied_commands,
            ),
            (
                "tardigrade_rejected_commands_total",
                "Commands refused at apply (duplicate or reordered).",
                &self.rejected_commands,
            ),
            (
                "tardigrade_raft_messages_dropped_total",
                "Raft messages to unknown destinations.",
                &Counter::default(),
            ),
        ];
        let t = &self.txn;
        let txn_counters: [(&str, &str, &Counter); 10] = [
            (
                "tardigrade_txn_commits_total",
                "Transaction commits that wrote a record (two phases).",
                &t.commits,
            ),
            (
                "tardigrade_txn_commits_one_phase_total",
                "Transaction commits in one raft command (1PC).",
                &t.commits_one_phase,
            ),
            (
                "tardigrade_txn_rollbacks_total",
                "Transactions rolled back by their coordinator.",
                &t.rollbacks,
            ),
            (
                "tardigrade_txn_pushes_total",
                "Pushes of transactions whose intents were in the way.",
                &t.pushes,
            ),
            (
                "tardigrade_txn_pushes_aborted_total",
                "Pushes that aborted their pushee (expired, or a deadlock's victim).",
                &t.pushes_aborted,
            ),
            (
                "tardigrade_txn_deadlocks_total",
                "Deadlocks among waiting transactions found and broken.",
                &t.deadlocks,
            ),
            (
                "tardigrade_txn_intents_resolved_by_conflict_total",
                "Intents of finished transactions resolved by the requests that met them.",
                &t.intents_resolved_by_conflict,
            ),
            (
                "tardigrade_txn_intents_resolved_async_total",
                "Intents resolved in the background after their transaction finished.",
                &t.intents_resolved_async,
            ),
            (
                "tardigrade_txn_refreshes_total",
                "Read refreshes evaluated.",
                &t.refreshes,
            ),
            (
                "tardigrade_txn_refreshes_failed_total",
                "Read refreshes that found a newer write.",
                &t.refreshes_failed,
            ),
        ];
        for (name, help, c) in counters.into_iter().chain(txn_counters) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
        }
        let _ = writeln!(
            out,
            "# HELP tardigrade_ranges Ranges with a replica on this node.\n# TYPE tardigrade_ranges gauge\ntardigrade_ranges {}",
            self.ranges.get()
        );
        let _ = writeln!(
            out,
            "# HELP tardigrade_ranges_quiescent Replicas not ticked at the last tick (quiesced).\n# TYPE tardigrade_ranges_quiescent gauge\ntardigrade_ranges_quiescent {}",
            self.ranges_quiescent.get()
        );
        let _ = writeln!(
            out,
            "# HELP tardigrade_raft_entries_per_fsync Raft entries made durable per sync.\n# TYPE tardigrade_raft_entries_per_fsync histogram"
        );
        self.raft_entries_per_fsync
            .render(&mut out, "tardigrade_raft_entries_per_fsync", "");
        let _ = writeln!(
            out,
            "# HELP tardigrade_raft_ranges_per_fsync Ranges whose raft state one synced write carried.\n# TYPE tardigrade_raft_ranges_per_fsync histogram"
        );
        self.raft_ranges_per_fsync
            .render(&mut out, "tardigrade_raft_ranges_per_fsync", "");
        let _ = writeln!(
            out,
            "# HELP tardigrade_scheduler_cycle_seconds Scheduler cycles with work: ready, write, apply and send.\n# TYPE tardigrade_scheduler_cycle_seconds histogram"
        );
        self.scheduler_cycle_seconds
            .render(&mut out, "tardigrade_scheduler_cycle_seconds", "");
        let _ = writeln!(
            out,
            "# HELP tardigrade_raft_sync_seconds Synced writes of the raft log writer.\n# TYPE tardigrade_raft_sync_seconds histogram"
        );
        self.raft_sync_seconds
            .render(&mut out, "tardigrade_raft_sync_seconds", "");
        let _ = writeln!(
            out,
            "# HELP tardigrade_raft_writes_in_flight Batches handed to the log writer while work waited, by how many were in flight already.\n# TYPE tardigrade_raft_writes_in_flight histogram"
        );
        self.raft_writes_in_flight
            .render(&mut out, "tardigrade_raft_writes_in_flight", "");
        let _ = writeln!(
            out,
            "# HELP tardigrade_request_duration_seconds Latency of etcd API requests.\n# TYPE tardigrade_request_duration_seconds histogram"
        );
        for (m, h) in METHODS.iter().zip(&self.request_latency) {
            h.render(
                &mut out,
                "tardigrade_request_duration_seconds",
                &format!("method=\"{m}\""),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.raft_fsyncs.add(3);
        m.raft_entries_per_fsync.observe(5.0);
        m.raft_entries_per_fsync.observe(1.0);
        let text = m.render();
        assert!(text.contains("tardigrade_raft_fsyncs_total 3"));
        assert!(text.contains("tardigrade_raft_entries_per_fsync_bucket{le=\"1\"} 1"));
        assert!(text.contains("tardigrade_raft_entries_per_fsync_bucket{le=\"8\"} 2"));
        assert!(text.contains("tardigrade_raft_entries_per_fsync_count 2"));
        assert!(m.request_latency("put").is_some());
        assert!(m.request_latency("nope").is_none());
    }
}
