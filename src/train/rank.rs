//! Link-prediction evaluation: filtered MRR and Hits@k, ranking both sides of each held-out edge
//! against every node of the right type. Scores come from [`crate::train`].
//!
//! "Filtered": other known true answers (from every split) are removed from the ranking.
//! Ties count realistically: the rank is the mean of the optimistic and pessimistic ranks (the
//! expected rank under random tie-breaking), so a constant scorer gets no credit.

use std::collections::HashMap;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::train::Embeddings;
use crate::train::{score_sources, score_targets, translate, Comparator};

/// A held-out edge in model coordinates: (src type, src, rel, dst type, dst).
pub type Triple = (usize, i64, i64, usize, i64);

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RankMetrics {
    pub mrr: f64,
    #[serde(rename = "hits@1")]
    pub hits1: f64,
    #[serde(rename = "hits@3")]
    pub hits3: f64,
    #[serde(rename = "hits@10")]
    pub hits10: f64,
    /// Rankings made (two per edge).
    pub rankings: usize,
}

/// Accumulates realistic ranks.
#[derive(Default)]
pub struct RankSum {
    reciprocal: f64,
    hits: [f64; 3],
    n: usize,
}

impl RankSum {
    pub fn add(&mut self, rank: f64) {
        self.reciprocal += 1.0 / rank;
        for (h, k) in self.hits.iter_mut().zip([1.0, 3.0, 10.0]) {
            if rank <= k {
                *h += 1.0;
            }
        }
        self.n += 1;
    }

    pub fn metrics(&self) -> RankMetrics {
        let n = self.n.max(1) as f64;
        RankMetrics {
            mrr: self.reciprocal / n,
            hits1: self.hits[0] / n,
            hits3: self.hits[1] / n,
            hits10: self.hits[2] / n,
            rankings: self.n,
        }
    }
}

/// Realistic rank of each row's true score among `scores [B, N]` (filtered entries already at
/// −∞; the true entry is still in place).
pub(super) fn realistic_ranks(scores: &Tensor, truth: &Tensor) -> Vec<f64> {
    let t = truth.unsqueeze(1);
    let higher = scores.gt_tensor(&t).sum_dim_intlist(1, false, Kind::Double);
    let at_least = scores.ge_tensor(&t).sum_dim_intlist(1, false, Kind::Double);
    let rank = (higher + 1.0 + at_least) / 2.0;
    Vec::<f64>::try_from(rank.to_device(tch::Device::Cpu)).expect("f64 ranks")
}

/// Known true answers for filtering: (src, rel) → targets and (rel, dst) → sources.
#[derive(Default)]
pub(crate) struct Filter {
    targets: HashMap<(usize, i64, i64), Vec<i64>>,
    sources: HashMap<(i64, usize, i64), Vec<i64>>,
}

impl Filter {
    pub(crate) fn new<'a>(all: impl IntoIterator<Item = &'a Triple>) -> Filter {
        let mut f = Filter::default();
        for &(st, s, r, dt, d) in all {
            f.targets
                .entry((st, s, r))
                .or_default()
                .push(d + ((dt as i64) << 40));
            f.sources
                .entry((r, dt, d))
                .or_default()
                .push(s + ((st as i64) << 40));
        }
        f
    }
}

/// Set the other known answers of each row to −∞. `known` holds type-tagged indices.
fn filter_rows(scores: &mut Tensor, rows: &[(Option<&Vec<i64>>, usize, i64)]) {
    let n = scores.size()[1];
    let mut flat = Vec::new();
    for (i, (known, ty, truth)) in rows.iter().enumerate() {
        for &k in known.iter().flat_map(|v| v.iter()) {
            let (kt, ki) = ((k >> 40) as usize, k & ((1 << 40) - 1));
            if kt == *ty && ki != *truth && ki < n {
                flat.push(i as i64 * n + ki);
            }
        }
    }
    if !flat.is_empty() {
        let idx = Tensor::from_slice(&flat).to_device(scores.device());
        let _ = scores.view([-1]).index_fill_(0, &idx, f64::NEG_INFINITY);
    }
}

/// Rank each row's true candidate (`truth` holds its column) after filtering the row's other
/// known answers, and add the ranks to `sum`.
fn rank_side(
    sum: &mut RankSum,
    scores: Tensor,
    truth: &Tensor,
    known: Vec<(Option<&Vec<i64>>, usize, i64)>,
) {
    let mut scores = scores.to_kind(Kind::Double);
    let truth_scores = scores.gather(1, &truth.unsqueeze(1), false).squeeze_dim(1);
    filter_rows(&mut scores, &known);
    for rank in realistic_ranks(&scores, &truth_scores) {
        sum.add(rank);
    }
}

/// Filtered ranking of `triples`, both sides, in chunks of `chunk`.
pub(crate) fn evaluate(
    model: &Embeddings,
    cmp: Comparator,
    triples: &[Triple],
    filter: &Filter,
    chunk: usize,
) -> RankMetrics {
    let device = model.device;
    let mut sum = RankSum::default();
    tch::no_grad(|| {
        // Group by (src type, dst type) so each chunk ranks against one candidate table.
        let mut groups: HashMap<(usize, usize), Vec<&Triple>> = HashMap::new();
        for t in triples {
            groups.entry((t.0, t.3)).or_default().push(t);
        }
        for ((st, dt), group) in groups {
            let src_table = model.tables[st].rows();
            let dst_table = model.tables[dt].rows();
            for part in group.chunks(chunk.max(1)) {
                let idx = |f: fn(&Triple) -> i64| {
                    Tensor::from_slice(&part.iter().map(|t| f(t)).collect::<Vec<_>>())
                        .to_device(device)
                };
                let (s, r, d) = (idx(|t| t.1), idx(|t| t.2), idx(|t| t.4));
                let es = src_table.index_select(0, &s);
                let er = model.relations.index_select(0, &r);
                let ed = dst_table.index_select(0, &d);

                let mut tails = score_targets(cmp, &translate(&es, &er), &dst_table);
                if let Some(b) = model.target_bias(dt) {
                    // (Heads share their target, so its bias does not move their ranks.)
                    tails += b.unsqueeze(0);
                }
                let known = part
                    .iter()
                    .map(|t| (filter.targets.get(&(t.0, t.1, t.2)), dt, t.4));
                rank_side(&mut sum, tails, &d, known.collect());

                let heads = match &model.reverse {
                    // Against `e_t + h_r` (every comparator is symmetric).
                    Some(rev) => {
                        let q = &ed + rev.relations.index_select(0, &r);
                        score_targets(cmp, &q, &src_table)
                    }
                    None => score_sources(cmp, &src_table, &er, &ed),
                };
                let known = part
                    .iter()
                    .map(|t| (filter.sources.get(&(t.2, t.3, t.4)), st, t.1));
                rank_side(&mut sum, heads, &s, known.collect());
            }
        }
    });
    sum.metrics()
}

/// One target-side ranking query: where does `dst` rank among all rows of its type as the
/// target of `(src, rel)`? `known` lists other true targets (indices of `dst`'s type), filtered.
#[derive(Debug, Clone)]
pub struct TargetQuery {
    pub src_type: usize,
    pub src: i64,
    pub rel: i64,
    pub dst_type: usize,
    pub dst: i64,
    pub known: Vec<i64>,
    /// The source's recent targets (rows of `dst`'s type) when it is of a history type
    /// ([`crate::train::History`]): added to its row as the step adds them. Empty otherwise.
    pub history: Vec<(i64, f32)>,
}

/// Realistic ranks of `queries` against the current tables (prequential evaluation), in the
/// order given, each against the rows nodes hold ([`crate::train::NodeTable::holds`]). Every
/// query's source and target must be held.
pub fn target_ranks(model: &Embeddings, cmp: Comparator, queries: &[TargetQuery]) -> Vec<f64> {
    let device = model.device;
    let mut ranks = vec![0.0; queries.len()];
    let mut by_type: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, q) in queries.iter().enumerate() {
        by_type.entry(q.dst_type).or_default().push(i);
    }
    tch::no_grad(|| {
        for (dt, members) in by_type {
            let targets = model.tables[dt].rows();
            let src_rows: Vec<Tensor> = members
                .iter()
                .map(|&i| {
                    let q = &queries[i];
                    let row = model.tables[q.src_type].weights.get(q.src);
                    crate::train::compose(&row, &targets, &q.history)
                })
                .collect();
            let idx = |f: &dyn Fn(&TargetQuery) -> i64| {
                let v: Vec<i64> = members.iter().map(|&i| f(&queries[i])).collect();
                Tensor::from_slice(&v).to_device(device)
            };
            let rel = model.relations.index_select(0, &idx(&|q| q.rel));
            let candidates = model.tables[dt].rows();
            let mut scores = score_targets(
                cmp,
                &translate(&Tensor::stack(&src_rows, 0), &rel),
                &candidates,
            );
            if let Some(b) = model.target_bias(dt) {
                scores += b.unsqueeze(0);
            }
            let mut scores = scores.to_kind(Kind::Double);
            if model.tables[dt].has_placeholders() {
                // Rows no node holds yet are no candidates (one trainer would not have them).
                let reached = model.tables[dt].placeholder_indices();
                let _ = scores.index_fill_(1, &reached, f64::NEG_INFINITY);
            }
            let truth_col = idx(&|q| q.dst).unsqueeze(1);
            let truth = scores.gather(1, &truth_col, false).squeeze_dim(1);
            let n = scores.size()[1];
            let flat: Vec<i64> = members
                .iter()
                .enumerate()
                .flat_map(|(row, &i)| {
                    let q = &queries[i];
                    q.known
                        .iter()
                        .filter(move |&&k| k != q.dst && k < n)
                        .map(move |&k| row as i64 * n + k)
                })
                .collect();
            if !flat.is_empty() {
                let at = Tensor::from_slice(&flat).to_device(device);
                let _ = scores.view([-1]).index_fill_(0, &at, f64::NEG_INFINITY);
            }
            for (&i, r) in members.iter().zip(realistic_ranks(&scores, &truth)) {
                ranks[i] = r;
            }
        }
    });
    ranks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_count_realistically() {
        let scores =
            Tensor::from_slice(&[1.0f64, 1.0, 1.0, 1.0, 0.5, 2.0, 0.5, 0.1]).reshape([2, 4]);
        let truth = Tensor::from_slice(&[1.0f64, 0.5]);
        // Row 0: all tied → (1 + 4) / 2 = 2.5. Row 1: one higher, one tie → (2 + 3) / 2 = 2.5.
        assert_eq!(realistic_ranks(&scores, &truth), vec![2.5, 2.5]);
    }

    #[test]
    fn filtering_removes_other_true_answers_but_not_the_truth() {
        let mut scores = Tensor::from_slice(&[3.0f64, 2.0, 1.0]).reshape([1, 3]);
        let known = vec![0i64, 2];
        filter_rows(&mut scores, &[(Some(&known), 0, 2)]);
        let got = Vec::<f64>::try_from(scores.reshape([-1])).unwrap();
        assert_eq!(got, vec![f64::NEG_INFINITY, 2.0, 1.0]);
        assert_eq!(
            realistic_ranks(&scores, &Tensor::from_slice(&[1.0f64])),
            vec![2.0]
        );
    }

    #[test]
    fn target_ranks_filter_known_targets_and_keep_query_order() {
        let mut model = Embeddings::new(1, 1, 1, 0.0, tch::Device::Cpu);
        // One dimension, zero relation, dot score = e_s · e_t: with e_s = 1 the targets rank by
        // their value, 4 > 3 > 2 > 1.
        model.tables[0].grow(4, |_| {
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([4, 1])
        });
        let q = |dst: i64, known: Vec<i64>| TargetQuery {
            src_type: 0,
            src: 0,
            rel: 0,
            dst_type: 0,
            dst,
            known,
            history: vec![],
        };
        let ranks = target_ranks(
            &model,
            Comparator::Dot,
            &[q(1, vec![]), q(1, vec![3, 2, 1]), q(3, vec![])],
        );
        assert_eq!(ranks, vec![3.0, 1.0, 1.0]);
    }

    #[test]
    fn metrics_average_both_sides() {
        let mut s = RankSum::default();
        for r in [1.0, 2.0, 4.0, 20.0] {
            s.add(r);
        }
        let m = s.metrics();
        assert!((m.mrr - (1.0 + 0.5 + 0.25 + 0.05) / 4.0).abs() < 1e-12);
        assert_eq!(
            (m.hits1, m.hits3, m.hits10, m.rankings),
            (0.25, 0.5, 0.75, 4)
        );
    }
}
