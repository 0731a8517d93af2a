//! Ingest's live figures (`/v1/status` `ingest` and `kafka`) and the one event that records a
//! durable batch in the metrics, the status and the log together.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::debug;

use crate::telemetry as m;

/// Live ingest figures shared with the HTTP status endpoint.
#[derive(Debug, Default)]
pub struct IngestStatus {
    pub consumed: AtomicU64,
    /// Valid events sent on to the partition that owns their source.
    pub forwarded: AtomicU64,
    /// Forwarded events consumed from the routed topic (copies included).
    pub forwarded_in: AtomicU64,
    pub invalid: AtomicU64,
    pub appended: AtomicU64,
    pub duplicates: AtomicU64,
    /// Add events not stored because they name an erased node.
    pub erased_refused: AtomicU64,
    pub batches: AtomicU64,
    pub lag: AtomicU64,
    pub broker_up: AtomicBool,
    pub assigned_partitions: AtomicU64,
    /// Which engagements partitions this instance owns (what its publication covers), and the
    /// topic's partition count as the broker reported it when ingest started.
    pub ownership: Arc<crate::partition::Ownership>,
    /// Partitions consumed again from their start after their history changed.
    pub partition_resets: AtomicU64,
    /// Kafka timestamps of durable events, until a version covers them.
    pub freshness: Arc<crate::publish::Freshness>,
    /// What an empty store took from its changelog at start (`None`: a kept store, not read
    /// at start).
    pub restored: parking_lot::Mutex<Option<crate::changelog::Restored>>,
    /// What it took at assignments since (`/v1/status` `ingest.moved_in`).
    pub moved_in: parking_lot::Mutex<MovedIn>,
}

/// Partitions this instance was assigned, each brought up to its changelog before it was
/// consumed: what another instance stored while it owned them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MovedIn {
    /// Assignments received (a rebalance that gives this instance partitions).
    pub assignments: u64,
    /// Engagements partitions assigned, over all assignments.
    pub partitions: u64,
    /// What their changelog records added, summed.
    #[serde(flatten)]
    pub restored: crate::changelog::Restored,
}

/// A batch made durable: its events consumed, dead letters, edges appended, duplicates, nodes
/// created, and how long it took. [`StoreBatchWritten::emit`] is the only place these figures
/// are recorded, so the metrics, `/v1/status` and the log never disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StoreBatchWritten {
    pub consumed: u64,
    pub forwarded: u64,
    pub forwarded_in: u64,
    /// Forwarded events the store held already (a copy sent again after a crash).
    pub forwarded_copies: u64,
    pub invalid: u64,
    pub appended: u64,
    pub duplicate_event_ids: u64,
    pub redelivered: u64,
    pub new_nodes: u64,
    pub erased: u64,
    pub erased_refused: u64,
    pub seconds: f64,
}

impl StoreBatchWritten {
    pub(crate) fn emit(&self, status: &IngestStatus) {
        metrics::histogram!(m::BATCH_SECONDS).record(self.seconds);
        metrics::histogram!(m::BATCH_EVENTS).record(self.consumed as f64);
        metrics::counter!(m::EDGES_APPENDED).increment(self.appended);
        metrics::counter!(m::NODES_CREATED).increment(self.new_nodes);
        metrics::counter!(m::NODES_ERASED).increment(self.erased);
        metrics::counter!(m::ERASED_REFUSED).increment(self.erased_refused);
        status
            .erased_refused
            .fetch_add(self.erased_refused, Ordering::Relaxed);
        metrics::counter!(m::DUPLICATES, "kind" => "event_id").increment(self.duplicate_event_ids);
        metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(self.redelivered);
        metrics::counter!(m::DUPLICATES, "kind" => "forwarded_copy")
            .increment(self.forwarded_copies);
        metrics::counter!(m::FORWARDED).increment(self.forwarded);
        metrics::counter!(m::FORWARDED_IN).increment(self.forwarded_in);
        status.consumed.fetch_add(self.consumed, Ordering::Relaxed);
        status
            .forwarded
            .fetch_add(self.forwarded, Ordering::Relaxed);
        status
            .forwarded_in
            .fetch_add(self.forwarded_in, Ordering::Relaxed);
        status.invalid.fetch_add(self.invalid, Ordering::Relaxed);
        status.appended.fetch_add(self.appended, Ordering::Relaxed);
        status.duplicates.fetch_add(
            self.duplicate_event_ids + self.redelivered + self.forwarded_copies,
            Ordering::Relaxed,
        );
        status.batches.fetch_add(1, Ordering::Relaxed);
        debug!(
            consumed = self.consumed,
            appended = self.appended,
            invalid = self.invalid,
            ms = (self.seconds * 1000.0) as u64,
            "batch durable"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_batch_is_counted_once_in_the_status() {
        let status = IngestStatus::default();
        let batch = StoreBatchWritten {
            consumed: 10,
            forwarded: 2,
            forwarded_in: 3,
            forwarded_copies: 1,
            invalid: 2,
            appended: 6,
            duplicate_event_ids: 1,
            redelivered: 1,
            new_nodes: 3,
            erased: 0,
            erased_refused: 0,
            seconds: 0.01,
        };
        batch.emit(&status);
        batch.emit(&status);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(
            [
                get(&status.consumed),
                get(&status.invalid),
                get(&status.appended),
                get(&status.duplicates),
                get(&status.batches)
            ],
            [20, 4, 12, 6, 2]
        );
        assert_eq!([get(&status.forwarded), get(&status.forwarded_in)], [4, 6]);
    }
}
