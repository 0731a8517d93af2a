//! The user model, in one place: a source of a history type (`train.history_types`) is scored
//! as its own row plus the weighted sum of its recent targets' rows
//! (`e_s + Σ w_i e_i / √(Σ w_i²)`, FISM and SVD++'s user), optionally split into interests (the
//! TwHIN paper's mixture of k-means clusters of what a user engaged with; PinnerSage's idea).
//! The training step ([`History`], [`history_weights`], [`history_sum`]), the prequential and
//! offline ranks ([`compose`]), `/v1/neighbors` ([`composed_source`], [`interest_sources`]) and
//! `stream-eval` ([`interest_groups`], [`mixture`]) all build their queries from here, so what is
//! trained is what is measured and served.
//!
//! Interests: a user whose recent targets fall in several distinct regions of the space is poorly
//! served by one composed vector, which lands between them. Clustering the recent targets' rows
//! and composing one query per cluster ([`split_history`]), then merging the per-interest scores
//! as a mixture ([`mixture`]), lets each interest retrieve its own neighbourhood. The clustering
//! is spherical k-means (on unit rows, as the dot score compares directions) from a deterministic
//! farthest-point start at the most recent target, so the same history always gives the same
//! interests.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::config::MultiInterestConfig;
use crate::store::{Direction, GraphStore, NodeRef, StoreError};
use crate::train::TrainParams;

/// Known targets looked up per prequential query for filtering.
const FILTER_LIMIT: usize = 4096;

/// The stored targets of `(src, rel)` of type `dst_type` (for filtered ranking).
pub fn known_targets(
    store: &GraphStore,
    src: NodeRef,
    rel: u16,
    dst_type: u16,
) -> Result<Vec<i64>, StoreError> {
    Ok(store
        .neighbors(src, Some(rel), Some(Direction::Out), FILTER_LIMIT)?
        .into_iter()
        .filter(|n| n.node.node_type == dst_type)
        .map(|n| n.node.index as i64)
        .collect())
}

/// The `k` most recent targets of `src` of type `dst_type` (any relation) stored before
/// sequence number `before`, oldest first: the history of the user model
/// ([`crate::train::History`]).
pub(super) fn recent_targets(
    store: &GraphStore,
    src: NodeRef,
    dst_type: u16,
    k: usize,
    before: u64,
) -> Result<Vec<i64>, StoreError> {
    let mut out: Vec<(u64, i64)> = store
        .neighbors(src, None, Some(Direction::Out), usize::MAX)?
        .into_iter()
        .filter(|n| n.node.node_type == dst_type && n.seq < before)
        .map(|n| (n.seq, n.node.index as i64))
        .collect();
    out.sort_unstable();
    let start = out.len().saturating_sub(k);
    Ok(out[start..].iter().map(|&(_, i)| i).collect())
}

/// A source's recent targets (rows of a target type, oldest first) for the user model, each
/// with its raw weight (1 unless `train.history_decay` or `train.history_by_relation` say
/// otherwise): a source of a history type is scored as its row plus `Σ w_i e_i / √(Σ w_i²)`
/// over them (`Σ e_i / √n` with unit weights), so one engagement changes its score at once
/// (FISM, SVD++). The trainer answers from the store; `None` or an empty answer: the row alone.
pub type History<'a> = &'a dyn Fn(NodeRef, usize) -> Vec<(i64, f32)>;

/// The `(target row, weight)` pairs of one source's history, leaving `skip` out (an edge is not
/// explained by its own target), the weights normalised to unit norm.
pub(crate) fn history_weights(recent: &[(i64, f32)], skip: Option<i64>) -> Vec<(i64, f32)> {
    let kept: Vec<(i64, f32)> = recent
        .iter()
        .copied()
        .filter(|&(i, _)| Some(i) != skip)
        .collect();
    let norm = kept.iter().map(|&(_, w)| w * w).sum::<f32>().sqrt();
    if kept.is_empty() || norm <= 0.0 {
        return Vec::new();
    }
    kept.into_iter().map(|(i, w)| (i, w / norm)).collect()
}

/// The weighted sum `Σ w_i · rows[i]` of a history's normalised weights `[D]` (`None`: empty).
pub(super) fn history_sum(rows: &Tensor, weights: &[(i64, f32)]) -> Option<Tensor> {
    if weights.is_empty() {
        return None;
    }
    let device = rows.device();
    let idx: Vec<i64> = weights.iter().map(|w| w.0).collect();
    let w: Vec<f32> = weights.iter().map(|w| w.1).collect();
    let w = Tensor::from_slice(&w).to_device(device);
    Some(
        (rows.index_select(0, &Tensor::from_slice(&idx).to_device(device)) * w.unsqueeze(1))
            .sum_dim_intlist(0, false, Kind::Float),
    )
}

/// A source's row as the model scores it against `dst_type` and the server serves it: `own` plus
/// the weighted sum of its recent targets' rows in `targets` (that type's `[rows, D]` table,
/// trained or published; targets beyond its rows left out). A source that is not of a history
/// type, or has no recent target there, is `own`.
pub fn composed_source(
    p: &TrainParams,
    store: &GraphStore,
    src: NodeRef,
    dst_type: usize,
    own: &Tensor,
    targets: &Tensor,
) -> Result<Tensor, StoreError> {
    let recent = served_history(p, store, src, dst_type, targets)?;
    Ok(compose(own, targets, &recent))
}

/// A source as its interests (`[http.multi_interest]`): its recent targets of `dst_type`
/// clustered ([`interest_groups`] over `targets`' rows), one query per interest composed as
/// [`composed_source`] composes the whole history: `([c, D] queries, [c] shares of the history's
/// weight)`. A source without recent targets (or of no history type) is its row, one share.
pub(crate) fn interest_sources(
    p: &TrainParams,
    mi: &MultiInterestConfig,
    store: &GraphStore,
    src: NodeRef,
    dst_type: usize,
    own: &Tensor,
    targets: &Tensor,
) -> Result<(Tensor, Tensor), StoreError> {
    let recent = served_history(p, store, src, dst_type, targets)?;
    if recent.is_empty() {
        return Ok((own.unsqueeze(0), Tensor::from_slice(&[1.0f32])));
    }
    let (queries, shares): (Vec<Tensor>, Vec<f32>) = interest_groups(&recent, targets, mi)
        .into_iter()
        .map(|(group, share)| (compose(own, targets, &group), share))
        .unzip();
    Ok((Tensor::stack(&queries, 0), Tensor::from_slice(&shares)))
}

/// The recent targets of `src` of `dst_type` that `targets` (a `[rows, D]` table) has rows for.
fn served_history(
    p: &TrainParams,
    store: &GraphStore,
    src: NodeRef,
    dst_type: usize,
    targets: &Tensor,
) -> Result<Vec<(i64, f32)>, StoreError> {
    let rows = if targets.dim() == 2 {
        targets.size()[0]
    } else {
        0
    };
    history_with_rows(p, store, src, dst_type, u64::MAX, rows)
}

/// [`history_targets`] stored before sequence number `before`, limited to the first `rows` rows
/// of the target type (the rows a model or a version has).
pub(crate) fn history_with_rows(
    p: &TrainParams,
    store: &GraphStore,
    src: NodeRef,
    dst_type: usize,
    before: u64,
    rows: i64,
) -> Result<Vec<(i64, f32)>, StoreError> {
    let mut recent = history_targets(p, store, src, dst_type, before)?;
    recent.retain(|&(i, _)| i < rows);
    Ok(recent)
}

/// `own` plus the weighted sum of `history`'s rows of `targets` (`own` alone without history):
/// the query the step trains, a rank scores and the server serves.
pub(crate) fn compose(own: &Tensor, targets: &Tensor, history: &[(i64, f32)]) -> Tensor {
    match history_sum(targets, &history_weights(history, None)) {
        Some(sum) => own + sum,
        None => own.shallow_clone(),
    }
}

/// The recent targets of `src` of `dst_type`, with their raw weights, when `src` is of a
/// history type (`train.history_types`); empty otherwise.
pub(crate) fn history_targets(
    p: &TrainParams,
    store: &GraphStore,
    src: NodeRef,
    dst_type: usize,
    before: u64,
) -> Result<Vec<(i64, f32)>, StoreError> {
    let types = &store.stored_schema().node_types;
    let on = types
        .get(src.node_type as usize)
        .is_some_and(|t| p.history_types.contains(t));
    if p.history_recent == 0 || !on {
        return Ok(Vec::new());
    }
    if p.history_decay == 1.0 && !p.history_by_relation {
        let recent = recent_targets(store, src, dst_type as u16, p.history_recent, before)?;
        return Ok(recent.into_iter().map(|i| (i, 1.0)).collect());
    }
    let targets: Vec<(u64, u16, i64)> = store
        .neighbors(src, None, Some(Direction::Out), usize::MAX)?
        .into_iter()
        .filter(|n| n.node.node_type == dst_type as u16 && n.seq < before)
        .map(|n| (n.seq, n.rel, n.node.index as i64))
        .collect();
    Ok(weighted_recent(
        targets,
        p.history_recent,
        p.history_decay,
        p.history_by_relation,
    ))
}

/// A history from `(seq, relation, target row)` triples: the `n` most recent (per relation when
/// `by_relation`), oldest first, the `k`-th newest weighing `decay^k`; per relation, each
/// relation's weights scaled to unit norm, so each relation counts alike however many targets
/// it holds.
pub fn weighted_recent(
    mut targets: Vec<(u64, u16, i64)>,
    n: usize,
    decay: f64,
    by_relation: bool,
) -> Vec<(i64, f32)> {
    targets.sort_unstable();
    let mut out: Vec<(u64, i64, f32)> = Vec::new();
    let mut groups: BTreeMap<u16, Vec<(u64, i64)>> = BTreeMap::new();
    for &(seq, rel, i) in &targets {
        groups
            .entry(if by_relation { rel } else { 0 })
            .or_default()
            .push((seq, i));
    }
    for group in groups.values() {
        let kept = &group[group.len().saturating_sub(n)..];
        let raw: Vec<f64> = (0..kept.len())
            .map(|k| decay.powi((kept.len() - 1 - k) as i32))
            .collect();
        let scale = if by_relation {
            raw.iter().map(|w| w * w).sum::<f64>().sqrt().max(1e-12)
        } else {
            1.0
        };
        for (&(seq, i), w) in kept.iter().zip(raw) {
            out.push((seq, i, (w / scale) as f32));
        }
    }
    out.sort_unstable_by_key(|t| t.0);
    out.into_iter().map(|(_, i, w)| (i, w)).collect()
}

/// Interests' scores merged as a mixture: `scores [c, n]` (one row per interest, every item),
/// `shares [c]` (each interest's share of the history) → `[n]`, each item's
/// `log Σ_c π_c softmax(s_c)`. The model is trained with a softmax over every item, so each
/// interest's scores are its log-probabilities up to a constant, and the mixture is the
/// probability that one of the interests picks the item. One interest keeps its own order.
pub(crate) fn mixture(scores: &Tensor, shares: &Tensor) -> Tensor {
    (scores.log_softmax(1, tch::Kind::Float) + shares.log().unsqueeze(1))
        .logsumexp([0].as_slice(), false)
}

/// `history` (`(row of targets, raw weight)`, most recent first) split into interests
/// ([`split_history`] over the rows of `targets [rows, D]`, [`interest_count`] of them), each with
/// its share of the history's weight (`1 / c` each when the weights sum to 0). An empty history
/// has no interest.
pub(crate) fn interest_groups(
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
pub(super) fn interest_count(n: usize, max_interests: usize, per_interest: usize) -> usize {
    (n / per_interest.max(1)).clamp(1, max_interests.max(1))
}

/// Splits `history` (`(row, raw weight)`, most recent first, as [`super::history_targets`] gives
/// it) into at most `k` interests by spherical k-means over the targets' vectors (`vectors`:
/// one of `dim` values per history entry, in its order, flattened); each interest keeps its
/// members' raw weights (the composition renormalises them within the interest). Interests come out largest first (ties:
/// the one holding the more recent target first); none is empty.
pub(super) fn split_history(
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

    #[test]
    fn golden_weighted_recent() {
        // (seq, relation, row): relation 0 holds rows 1, 2, 3; relation 1 holds row 9.
        let t = vec![(4, 0, 3), (1, 0, 1), (3, 1, 9), (2, 0, 2)];
        // The 2 most recent overall, unit weights, oldest first.
        assert_eq!(
            weighted_recent(t.clone(), 2, 1.0, false),
            vec![(9, 1.0), (3, 1.0)]
        );
        // Decay 0.5: the newest weighs 1, the one before 0.5, then 0.25.
        assert_eq!(
            weighted_recent(t.clone(), 3, 0.5, false),
            vec![(2, 0.25), (9, 0.5), (3, 1.0)]
        );
        // Per relation, 2 each, each relation's weights of unit norm: (0.5, 1) / √1.25 and 1.
        let s = 1.25f64.sqrt();
        assert_eq!(
            weighted_recent(t, 2, 0.5, true),
            vec![(2, (0.5 / s) as f32), (9, 1.0), (3, (1.0 / s) as f32)]
        );
    }
}
