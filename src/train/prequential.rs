//! Prequential (test-then-train) figures: each sampled edge ranked before the step trains on it,
//! its target filtered by what the source already has.

use std::collections::VecDeque;

/// The last `capacity` prequential ranks, and sums over every rank since the process started.
#[derive(Debug)]
pub struct RankWindow {
    ranks: VecDeque<f64>,
    capacity: usize,
    total: u64,
    totals: RankTotals,
}

/// Sums over every rank added: a figure over any stretch of a stream is the difference of two
/// readings (`benches/scale_out.sh` takes the last 80% of the synthetic stream this way).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RankTotals {
    pub ranked: u64,
    /// Ranks of at most 10.
    pub hits10: u64,
    /// The sum of 1 / rank.
    pub reciprocal_ranks: f64,
}

impl RankWindow {
    pub fn new(capacity: usize) -> RankWindow {
        RankWindow {
            ranks: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
            total: 0,
            totals: RankTotals::default(),
        }
    }

    pub fn extend(&mut self, ranks: impl IntoIterator<Item = f64>) {
        for r in ranks {
            if self.ranks.len() == self.capacity {
                self.ranks.pop_front();
            }
            self.ranks.push_back(r);
            self.total += 1;
            self.totals.ranked += 1;
            self.totals.hits10 += u64::from(r <= 10.0);
            self.totals.reciprocal_ranks += 1.0 / r;
        }
    }

    /// `(mrr, hits@10)` over the window; `None` before the first rank.
    pub fn figures(&self) -> Option<(f64, f64)> {
        if self.ranks.is_empty() {
            return None;
        }
        let n = self.ranks.len() as f64;
        let mrr = self.ranks.iter().map(|r| 1.0 / r).sum::<f64>() / n;
        let hits = self.ranks.iter().filter(|&&r| r <= 10.0).count() as f64 / n;
        Some((mrr, hits))
    }

    /// Ranks in the window now.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// Ranks ever added.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn totals(&self) -> RankTotals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_window_keeps_the_newest() {
        let mut w = RankWindow::new(3);
        assert_eq!(w.figures(), None);
        w.extend([100.0, 1.0, 2.0, 20.0]);
        let (mrr, hits) = w.figures().unwrap();
        assert!((mrr - (1.0 + 0.5 + 0.05) / 3.0).abs() < 1e-12);
        assert!((hits - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(w.total(), 4);
        let t = w.totals();
        assert_eq!((t.ranked, t.hits10), (4, 2));
        assert!((t.reciprocal_ranks - (0.01 + 1.0 + 0.5 + 0.05)).abs() < 1e-12);
    }
}
