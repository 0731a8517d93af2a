//! The recommenders a user would pick instead of the embeddings, streamed on the same events as
//! the model (docs/architecture.md §4, `stream-eval`): popularity so far per relation, and item-to-item
//! co-occurrence. Pure and incremental: score, then observe. Items are dense indices `0..n`.

/// How many of a user's most recent items the item-to-item recommender sums over.
pub(super) const KNN_RECENT: usize = 50;

/// Popularity so far: how often each item was the target of each relation.
#[derive(Debug, Clone)]
pub(crate) struct Popularity {
    counts: Vec<Vec<u32>>,
}

impl Popularity {
    pub(crate) fn new(relations: usize, items: usize) -> Popularity {
        Popularity {
            counts: vec![vec![0; items]; relations],
        }
    }

    /// Every item's count under relation slot `rel`.
    pub(crate) fn scores(&self, rel: usize) -> &[u32] {
        &self.counts[rel]
    }

    pub(crate) fn observe(&mut self, rel: usize, item: usize) {
        self.counts[rel][item] += 1;
    }
}

/// Streaming item-to-item co-occurrence: two items co-occur once for every user who engaged with
/// both (under any relation). An item's score for a user is the sum, over the user's last
/// [`KNN_RECENT`] items `i`, of `co(i, j) / sqrt(pop(i) · pop(j))`, `pop` counting the item's
/// engagements so far.
#[derive(Debug, Clone)]
pub(crate) struct ItemKnn {
    n: usize,
    /// `[n × n]`, symmetric.
    co: Vec<f32>,
    pop: Vec<u32>,
}

impl ItemKnn {
    pub(crate) fn new(items: usize) -> ItemKnn {
        ItemKnn {
            n: items,
            co: vec![0.0; items * items],
            pop: vec![0; items],
        }
    }

    /// Every item's score for a user whose items so far are `history` (oldest first) into `out`.
    pub(crate) fn scores(&self, history: &[usize], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.n, 0.0);
        let recent = &history[history.len().saturating_sub(KNN_RECENT)..];
        for &i in recent {
            let w = 1.0 / (self.pop[i].max(1) as f32).sqrt();
            let row = &self.co[i * self.n..(i + 1) * self.n];
            for (o, &c) in out.iter_mut().zip(row) {
                *o += c * w;
            }
        }
        for (o, &p) in out.iter_mut().zip(&self.pop) {
            *o = if p == 0 { 0.0 } else { *o / (p as f32).sqrt() };
        }
    }

    /// A user whose items so far are `history` engaged with `item`.
    pub(crate) fn observe(&mut self, history: &[usize], item: usize) {
        for &i in history {
            if i != item {
                self.co[i * self.n + item] += 1.0;
                self.co[item * self.n + i] += 1.0;
            }
        }
        self.pop[item] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popularity_counts_per_relation() {
        let mut p = Popularity::new(2, 3);
        p.observe(0, 1);
        p.observe(0, 1);
        p.observe(1, 2);
        assert_eq!(p.scores(0), &[0, 2, 0]);
        assert_eq!(p.scores(1), &[0, 0, 1]);
    }

    #[test]
    fn golden_item_knn_scores() {
        // User A: items 0, 1, 2. User B: items 0, 1. User C: item 3.
        let mut k = ItemKnn::new(4);
        let mut a = Vec::new();
        for item in [0, 1, 2] {
            k.observe(&a, item);
            a.push(item);
        }
        let mut b = Vec::new();
        for item in [0, 1] {
            k.observe(&b, item);
            b.push(item);
        }
        k.observe(&[], 3);
        // pop = [2, 2, 1, 1]; co(0,1) = 2, co(0,2) = co(1,2) = 1.
        let mut out = Vec::new();
        k.scores(&[0], &mut out);
        let want = [
            0.0,
            2.0 / (2.0f32 * 2.0).sqrt(),
            1.0 / (2.0f32 * 1.0).sqrt(),
            0.0,
        ];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?}");
        }
        // Summed over the history: item 2 from 0 and 1.
        k.scores(&[0, 1], &mut out);
        assert!((out[2] - 2.0 / 2.0f32.sqrt()).abs() < 1e-6, "{out:?}");
        // Only the last KNN_RECENT items count.
        let long: Vec<usize> = std::iter::once(0)
            .chain(std::iter::repeat_n(3, KNN_RECENT))
            .collect();
        k.scores(&long[1..], &mut out);
        assert_eq!(out[1], 0.0);
        k.scores(&long, &mut out);
        assert_eq!(out[1], 0.0, "item 0 fell out of the window");
        k.scores(&long[..KNN_RECENT], &mut out);
        assert!(out[1] > 0.0, "item 0 inside the window counts");
    }
}
