//! Multi-interest users (the TwHIN paper's mixture of k-means clusters of what a user engaged
//! with; PinnerSage's idea): a user whose recent targets fall in several distinct regions of the
//! space is poorly served by one composed vector, which lands between them. Clustering the
//! recent targets' rows and composing one query per cluster ([`split_history`]), then merging
//! the per-interest scores as a mixture ([`mixture`]), lets each interest retrieve its own
//! neighbourhood.
//!
//! Pure functions: the clustering is spherical k-means (on unit rows, as the dot score compares
//! directions) from a deterministic farthest-point start at the most recent target, so the same
//! history always gives the same interests.

use tch::{Kind, Tensor};

use crate::config::MultiInterestConfig;

/// Interests' scores merged as a mixture: `scores [c, n]` (one row per interest, every item),
/// `shares [c]` (each interest's share of the history) → `[n]`, each item's
/// `log Σ_c π_c softmax(s_c)`. The model is trained with a softmax over every item, so each
/// interest's scores are its log-probabilities up to a constant, and the mixture is the
/// probability that one of the interests picks the item. One interest keeps its own order.
pub fn mixture(scores: &Tensor, shares: &Tensor) -> Tensor {
    (scores.log_softmax(1, tch::Kind::Float) + shares.log().unsqueeze(1))
        .logsumexp([0].as_slice(), false)
}

/// `history` (`(row of targets, raw weight)`, most recent first) split into interests
/// ([`split_history`] over the rows of `targets [rows, D]`, [`interest_count`] of them), each with
/// its share of the history's weight (`1 / c` each when the weights sum to 0). An empty history
/// has no interest.
pub fn interest_groups(
    history: &[(i64, f32)],
    targets: &Tensor,
    mi: &MultiInterestConfig,
) -> Vec<(Vec<(i64, f32)>, f32)> {
    if history.is_empty() {
        return Vec::new();
    }
    let k = interest_count(history.len(), mi.max_interests, mi.targets_per_interest);
    // Only the history's rows, not the whole table, leave libtorch.
    let rows: Vec<i64> = history.iter().map(|&(r, _)| r).collect();
    let vectors = targets
        .index_select(0, &Tensor::from_slice(&rows))
        .to_kind(Kind::Float)
        .reshape([-1]);
    let vectors = Vec::<f32>::try_from(vectors).expect("f32 rows");
    let dim = targets.size()[1] as usize;
    let groups = split_history(history, &vectors, dim, k, mi.iterations);
    let total: f32 = history.iter().map(|&(_, w)| w).sum();
    let c = groups.len() as f32;
    groups
        .into_iter()
        .map(|g| {
            let weight: f32 = g.iter().map(|&(_, w)| w).sum();
            let share = if total > 0.0 { weight / total } else { 1.0 / c };
            (g, share)
        })
        .collect()
}

/// How many interests a history of `n` targets gets: one per `per_interest` targets, at least
/// one, at most `max_interests`.
pub fn interest_count(n: usize, max_interests: usize, per_interest: usize) -> usize {
    (n / per_interest.max(1)).clamp(1, max_interests.max(1))
}

/// Splits `history` (`(row, raw weight)`, most recent first, as [`super::history_targets`] gives
/// it) into at most `k` interests by spherical k-means over the targets' vectors (`vectors`:
/// one of `dim` values per history entry, in its order, flattened); each interest keeps its
/// members' raw weights (the composition renormalises them within the interest). Interests come out largest first (ties:
/// the one holding the more recent target first); none is empty.
pub fn split_history(
    history: &[(i64, f32)],
    vectors: &[f32],
    dim: usize,
    k: usize,
    iterations: usize,
) -> Vec<Vec<(i64, f32)>> {
    let n = history.len();
    if n == 0 {
        return Vec::new();
    }
    debug_assert!(vectors.len() >= n * dim, "one vector per history entry");
    let k = k.clamp(1, n);
    if k == 1 {
        return vec![history.to_vec()];
    }
    let unit: Vec<Vec<f32>> = vectors
        .chunks_exact(dim)
        .take(n)
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter().map(|x| x / norm).collect()
        })
        .collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // Farthest-point start: the most recent target, then each next the one least similar to
    // every centre chosen so far.
    let mut centres: Vec<Vec<f32>> = vec![unit[0].clone()];
    while centres.len() < k {
        let far = (0..n)
            .map(|i| {
                let best = centres
                    .iter()
                    .map(|c| dot(&unit[i], c))
                    .fold(f32::NEG_INFINITY, f32::max);
                (i, best)
            })
            .fold(
                (0, f32::INFINITY),
                |acc, (i, s)| if s < acc.1 { (i, s) } else { acc },
            );
        centres.push(unit[far.0].clone());
    }
    let mut assigned = vec![0usize; n];
    for _ in 0..iterations.max(1) {
        let mut changed = false;
        for (i, u) in unit.iter().enumerate() {
            let best = (0..k)
                .map(|c| (c, dot(u, &centres[c])))
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (c, s)| if s > acc.1 { (c, s) } else { acc },
                )
                .0;
            changed |= best != assigned[i];
            assigned[i] = best;
        }
        for (c, centre) in centres.iter_mut().enumerate() {
            let mut sum = vec![0.0f32; dim];
            for (_, u) in unit.iter().enumerate().filter(|(i, _)| assigned[*i] == c) {
                for (s, x) in sum.iter_mut().zip(u) {
                    *s += x;
                }
            }
            let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                *centre = sum.iter().map(|x| x / norm).collect();
            }
        }
        if !changed {
            break;
        }
    }
    let mut groups: Vec<Vec<(i64, f32)>> = vec![Vec::new(); k];
    for (i, &c) in assigned.iter().enumerate() {
        groups[c].push(history[i]);
    }
    // Members keep the history's order, so a group's first member is its most recent target.
    let first: Vec<usize> = (0..k)
        .map(|c| assigned.iter().position(|&a| a == c).unwrap_or(n))
        .collect();
    let mut order: Vec<usize> = (0..k).filter(|&c| !groups[c].is_empty()).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(groups[c].len()), first[c]));
    order
        .into_iter()
        .map(|c| std::mem::take(&mut groups[c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_history_size() {
        assert_eq!(interest_count(0, 4, 10), 1);
        assert_eq!(interest_count(9, 4, 10), 1);
        assert_eq!(interest_count(25, 4, 10), 2);
        assert_eq!(interest_count(50, 4, 10), 4);
        assert_eq!(interest_count(50, 1, 10), 1);
    }

    /// Two directions, interleaved in time: two interests, each holding one direction's rows.
    #[test]
    fn golden_two_interests_from_an_interleaved_history() {
        let dim = 3;
        // Rows 0..6: even rows near x, odd rows near y (unnormalised lengths differ).
        let rows: Vec<f32> = (0..6)
            .flat_map(|i| {
                let s = 1.0 + i as f32;
                if i % 2 == 0 {
                    [s, 0.1 * s, 0.0]
                } else {
                    [0.0, s, 0.2 * s]
                }
            })
            .collect();
        let history: Vec<(i64, f32)> = (0..6).map(|i| (i as i64, 1.0 - 0.1 * i as f32)).collect();
        let groups = split_history(&history, &rows, dim, 2, 10);
        assert_eq!(
            groups,
            vec![
                vec![(0, 1.0), (2, 0.8), (4, 0.6)],
                vec![(1, 0.9), (3, 0.7), (5, 0.5)],
            ]
        );
        // One interest asked for: the history as it is.
        assert_eq!(
            split_history(&history, &rows, dim, 1, 10),
            vec![history.clone()]
        );
        // More interests than targets: at most one per target, none empty.
        let three = split_history(&history[..2], &rows, dim, 3, 10);
        assert_eq!(three.len(), 2);
        assert!(split_history(&[], &rows, dim, 3, 10).is_empty());
    }

    #[test]
    fn every_target_lands_in_exactly_one_interest() {
        let dim = 4;
        let rows: Vec<f32> = (0..40).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let history: Vec<(i64, f32)> = (0..10).map(|i| (i, 1.0)).collect();
        let groups = split_history(&history, &rows, dim, 3, 20);
        let mut all: Vec<i64> = groups.iter().flatten().map(|&(r, _)| r).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(groups.windows(2).all(|w| w[0].len() >= w[1].len()));
    }
}
