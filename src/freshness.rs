//! Event-to-publish latency (DESIGN §6): from an event's Kafka timestamp to the commit of the
//! first version prepared after the trainer trained its edge. Ingest records the timestamps of
//! each durable batch with the store's edge count after it; a committed version covers every
//! batch below the trainer cursor it was prepared at.
//!
//! Only this process's events count: edges ingested before a restart have no timestamps here.
//! A version carries the rows an event touched unless they moved less than
//! `publish.row_threshold`; then the subscribers' earlier row already stands for it, and the event
//! is counted at this version all the same.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::telemetry as m;

/// Timestamps waiting for a version, bounded so a stopped trainer cannot grow it without end.
const MAX_PENDING_EVENTS: usize = 2_000_000;
/// Latencies kept for the quantiles in `/v1/status`.
const WINDOW: usize = 100_000;

#[derive(Debug, Default)]
struct State {
    /// `(edge count after the batch, Kafka timestamps in ms)`, oldest first.
    pending: VecDeque<(u64, Vec<i64>)>,
    pending_events: usize,
    /// Recent latencies in seconds.
    recent: VecDeque<f64>,
    recorded: u64,
    dropped: u64,
}

/// Shared between ingest (writer of timestamps) and the publisher (at each commit).
#[derive(Debug, Default)]
pub struct Freshness {
    state: Mutex<State>,
}

/// Quantiles of the recent latencies (`/v1/status`, the demo summary).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FreshnessFigures {
    /// Events whose latency was recorded.
    pub events: u64,
    pub p50_secs: Option<f64>,
    pub p99_secs: Option<f64>,
    pub max_secs: Option<f64>,
    /// Timestamps dropped because too many waited for a version.
    pub dropped: u64,
}

impl Freshness {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch became durable; the store holds `edges_after` edges.
    pub fn ingested(&self, edges_after: u64, kafka_ts_ms: Vec<i64>) {
        if kafka_ts_ms.is_empty() {
            return;
        }
        let mut s = self.lock();
        s.pending_events += kafka_ts_ms.len();
        s.pending.push_back((edges_after, kafka_ts_ms));
        while s.pending_events > MAX_PENDING_EVENTS {
            let Some((_, old)) = s.pending.pop_front() else {
                break;
            };
            s.pending_events -= old.len();
            s.dropped += old.len() as u64;
        }
    }

    /// A version prepared at trainer cursor `cursor` was committed at `now_ms`: record the
    /// latency of every event it covers. Returns how many.
    pub fn published(&self, cursor: u64, now_ms: i64) -> usize {
        let mut s = self.lock();
        let mut count = 0;
        while s.pending.front().is_some_and(|(end, _)| *end <= cursor) {
            let (_, stamps) = s.pending.pop_front().expect("checked");
            s.pending_events -= stamps.len();
            for ts in stamps {
                let secs = (now_ms - ts).max(0) as f64 / 1000.0;
                metrics::histogram!(m::PUBLISH_FRESHNESS).record(secs);
                if s.recent.len() == WINDOW {
                    s.recent.pop_front();
                }
                s.recent.push_back(secs);
                count += 1;
            }
        }
        s.recorded += count as u64;
        count
    }

    pub fn figures(&self) -> FreshnessFigures {
        let s = self.lock();
        let mut sorted: Vec<f64> = s.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| {
            (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
        };
        FreshnessFigures {
            events: s.recorded,
            p50_secs: q(0.5),
            p99_secs: q(0.99),
            max_secs: sorted.last().copied(),
            dropped: s.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_covers_the_batches_below_its_cursor() {
        let f = Freshness::default();
        f.ingested(3, vec![1_000, 1_500, 2_000]);
        f.ingested(5, vec![4_000, 4_000]);
        f.ingested(6, vec![]);
        // Prepared at cursor 4: only the first batch (edges 0..3) is wholly trained.
        assert_eq!(f.published(4, 3_000), 3);
        let fig = f.figures();
        assert_eq!(fig.events, 3);
        assert_eq!(fig.p50_secs, Some(1.5));
        assert_eq!(fig.max_secs, Some(2.0));
        assert_eq!(f.published(5, 10_000), 2);
        assert_eq!(f.figures().max_secs, Some(6.0));
        assert_eq!(f.published(9, 20_000), 0);
    }

    #[test]
    fn no_versions_yet_means_no_figures() {
        let f = Freshness::default();
        let fig = f.figures();
        assert_eq!((fig.events, fig.p50_secs, fig.p99_secs), (0, None, None));
    }
}
