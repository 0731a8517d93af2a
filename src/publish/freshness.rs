//! Event-to-publish latency (docs/architecture.md §6): from an event's Kafka timestamp to the commit of the
//! first version prepared after the trainer trained its edge. Ingest records the timestamps of
//! each durable batch with the store's edge count after it; a committed version covers every
//! batch below the trainer cursor it was prepared at.
//!
//! Only this process's events count: edges ingested before a restart have no timestamps here.
//! A version carries the rows an event touched unless they moved less than
//! `publish.row_threshold`; then the subscribers' earlier row already stands for it, and the event
//! is counted at this version all the same.

use parking_lot::Mutex;
use std::collections::VecDeque;

use crate::telemetry as m;

/// Timestamps waiting for a version, bounded so a stopped trainer cannot grow it without end.
const MAX_PENDING_EVENTS: usize = 2_000_000;
/// Latencies kept for the quantiles in `/v1/status`.
const WINDOW: usize = 100_000;

/// One kind of latency: timestamps waiting for a version, and the recent latencies.
#[derive(Debug, Default)]
struct Track {
    /// `(edge count after the batch, Kafka timestamps in ms)`, oldest first.
    pending: VecDeque<(u64, Vec<i64>)>,
    pending_events: usize,
    /// Recent latencies in seconds.
    recent: VecDeque<f64>,
    recorded: u64,
    dropped: u64,
}

impl Track {
    fn ingested(&mut self, edges_after: u64, kafka_ts_ms: Vec<i64>) {
        if kafka_ts_ms.is_empty() {
            return;
        }
        self.pending_events += kafka_ts_ms.len();
        self.pending.push_back((edges_after, kafka_ts_ms));
        while self.pending_events > MAX_PENDING_EVENTS {
            let Some((_, old)) = self.pending.pop_front() else {
                break;
            };
            self.pending_events -= old.len();
            self.dropped += old.len() as u64;
        }
    }

    fn published(&mut self, cursor: u64, now_ms: i64, kind: &'static str) -> usize {
        let mut count = 0;
        while self.pending.front().is_some_and(|(end, _)| *end <= cursor) {
            let (_, stamps) = self.pending.pop_front().expect("checked");
            self.pending_events -= stamps.len();
            for ts in stamps {
                let secs = (now_ms - ts).max(0) as f64 / 1000.0;
                metrics::histogram!(m::PUBLISH_FRESHNESS, "events" => kind).record(secs);
                if self.recent.len() == WINDOW {
                    self.recent.pop_front();
                }
                self.recent.push_back(secs);
                count += 1;
            }
        }
        self.recorded += count as u64;
        count
    }

    fn figures(&self) -> LatencyFigures {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| {
            (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
        };
        LatencyFigures {
            events: self.recorded,
            p50_secs: q(0.5),
            p99_secs: q(0.99),
            max_secs: sorted.last().copied(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Every event.
    events: Track,
    /// Events that created a node (a user's first rating): how soon a new node has a row.
    new_nodes: Track,
}

/// Shared between ingest (writer of timestamps) and the publisher (at each commit).
#[derive(Debug, Default)]
pub struct Freshness {
    state: Mutex<State>,
}

/// Quantiles of the recent latencies (`/v1/status`, the demo summary).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FreshnessFigures {
    /// Every event.
    #[serde(flatten)]
    pub all: LatencyFigures,
    /// Timestamps dropped because too many waited for a version.
    pub dropped: u64,
    /// The events that created a node only: from a new node's first event to the first version
    /// carrying its row.
    pub new_nodes: LatencyFigures,
}

/// One kind of latency.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LatencyFigures {
    /// Events whose latency was recorded.
    pub events: u64,
    pub p50_secs: Option<f64>,
    pub p99_secs: Option<f64>,
    pub max_secs: Option<f64>,
}

impl Freshness {
    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A batch became durable; the store holds `edges_after` edges. `new_node_ts_ms`: the Kafka
    /// timestamps of the batch's events that created a node.
    pub fn ingested(&self, edges_after: u64, kafka_ts_ms: Vec<i64>, new_node_ts_ms: Vec<i64>) {
        let mut s = self.lock();
        s.events.ingested(edges_after, kafka_ts_ms);
        s.new_nodes.ingested(edges_after, new_node_ts_ms);
    }

    /// A version prepared at trainer cursor `cursor` was committed at `now_ms`: record the
    /// latency of every event it covers. Returns how many.
    pub fn published(&self, cursor: u64, now_ms: i64) -> usize {
        let mut s = self.lock();
        s.new_nodes.published(cursor, now_ms, "new_node");
        s.events.published(cursor, now_ms, "all")
    }

    pub fn figures(&self) -> FreshnessFigures {
        let s = self.lock();
        FreshnessFigures {
            all: s.events.figures(),
            dropped: s.events.dropped,
            new_nodes: s.new_nodes.figures(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_covers_the_batches_below_its_cursor() {
        let f = Freshness::default();
        f.ingested(3, vec![1_000, 1_500, 2_000], vec![1_000]);
        f.ingested(5, vec![4_000, 4_000], vec![]);
        f.ingested(6, vec![], vec![]);
        // Prepared at cursor 4: only the first batch (edges 0..3) is wholly trained.
        assert_eq!(f.published(4, 3_000), 3);
        let fig = f.figures();
        assert_eq!(fig.all.events, 3);
        assert_eq!(fig.all.p50_secs, Some(1.5));
        assert_eq!(fig.all.max_secs, Some(2.0));
        assert_eq!(fig.new_nodes.events, 1);
        assert_eq!(
            fig.new_nodes.p50_secs,
            Some(2.0),
            "the node-creating event at 1 s"
        );
        assert_eq!(f.published(5, 10_000), 2);
        assert_eq!(f.figures().all.max_secs, Some(6.0));
        assert_eq!(f.published(9, 20_000), 0);
    }

    #[test]
    fn no_versions_yet_means_no_figures() {
        let f = Freshness::default();
        let fig = f.figures();
        assert_eq!(
            (fig.all.events, fig.all.p50_secs, fig.all.p99_secs),
            (0, None, None)
        );
    }
}
