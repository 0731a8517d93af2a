//! One training step on a micro-batch of edges (DESIGN §4), and the parameters that shape it.
//!
//! Per relation group (edges with the same relation and endpoint types):
//! * the positive score `score(e_s + e_r, e_t)`;
//! * target-side negatives: the group's other targets (in-batch, one matrix product) plus
//!   `uniform_negatives` targets of the target type drawn once for the group;
//! * source-side negatives likewise;
//! * accidental positives among in-batch negatives are masked: another positive's target is a
//!   true target of this source when the two share their source (and vice versa).
//!
//! Gradients flow into leaf copies of only the unique rows the step touches; the updates are
//! applied with row-wise sparse Adagrad ([`crate::model::NodeTable::adagrad`]). A step whose loss
//! or gradients are not finite changes nothing and is reported as skipped.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::loss::{loss, LossKind};
use crate::model::Embeddings;
use crate::score::{score_pairs, score_sources, score_targets, translate, Comparator};
use crate::store::Edge;

/// The `[train]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub dim: i64,
    pub comparator: Comparator,
    pub loss: LossKind,
    /// Learning rate of the node tables.
    pub lr: f64,
    /// Learning rate of the relation vectors.
    pub relation_lr: f64,
    /// Uniform negatives per group and side.
    pub uniform_negatives: i64,
    /// Standard deviation of new rows' random initialisation.
    pub init_scale: f64,
    /// Edges per step.
    pub batch_size: usize,
    pub seed: u64,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub edges: usize,
    /// The loss or a gradient was not finite: nothing was updated.
    pub skipped: bool,
}

/// Rows of one node type used by a step: unique indices and where each use maps to.
#[derive(Default)]
struct RowSet {
    unique: Vec<i64>,
    position: HashMap<i64, i64>,
}

impl RowSet {
    fn add(&mut self, index: i64) -> i64 {
        let next = self.unique.len() as i64;
        *self.position.entry(index).or_insert_with(|| {
            self.unique.push(index);
            next
        })
    }
}

/// Indices (into per-type row sets) of one relation group.
struct Group {
    rel: i64,
    src_type: usize,
    dst_type: usize,
    src: Vec<i64>,
    dst: Vec<i64>,
    src_pos: Vec<i64>,
    dst_pos: Vec<i64>,
    uni_src: Vec<i64>,
    uni_dst: Vec<i64>,
    uni_src_pos: Vec<i64>,
    uni_dst_pos: Vec<i64>,
}

fn long(v: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(v).to_device(device)
}

/// `valid[i][j]`: candidate `j` may serve as a negative for positive `i`.
fn negative_mask(own: &[i64], other_side: &[i64], uniform: &[i64], device: Device) -> Tensor {
    let b = own.len();
    let mut valid = Vec::with_capacity(b * (b + uniform.len()));
    for i in 0..b {
        for j in 0..b {
            // Same node, or another positive sharing this one's other end: both true edges.
            valid.push(own[j] != own[i] && other_side[j] != other_side[i]);
        }
        for &u in uniform {
            valid.push(u != own[i]);
        }
    }
    Tensor::from_slice(&valid)
        .reshape([b as i64, (b + uniform.len()) as i64])
        .to_device(device)
}

/// Make sure every node a batch names has a row (new rows random for now).
pub fn ensure_rows(model: &mut Embeddings, edges: &[Edge], init_scale: f64) {
    let mut needed = vec![0i64; model.tables.len()];
    for e in edges {
        for n in [e.src, e.dst] {
            let t = n.node_type as usize;
            needed[t] = needed[t].max(n.index as i64 + 1);
        }
    }
    let device = model.device;
    let dim = model.dim;
    for (table, n) in model.tables.iter_mut().zip(needed) {
        table.grow(n, |count| {
            Tensor::randn([count, dim], (Kind::Float, device)) * init_scale
        });
    }
}

/// One step on `edges` (see the module docs).
pub fn train_step(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
) -> StepStats {
    if edges.is_empty() {
        return StepStats {
            loss: 0.0,
            edges: 0,
            skipped: false,
        };
    }
    ensure_rows(model, edges, p.init_scale);
    let device = model.device;
    let mut rows: Vec<RowSet> = (0..model.tables.len()).map(|_| RowSet::default()).collect();

    let mut by_group: HashMap<(u16, u16, u16), Vec<&Edge>> = HashMap::new();
    for e in edges {
        by_group
            .entry((e.rel, e.src.node_type, e.dst.node_type))
            .or_default()
            .push(e);
    }
    let mut keys: Vec<_> = by_group.keys().copied().collect();
    keys.sort_unstable();
    let mut groups = Vec::with_capacity(keys.len());
    for key in keys {
        let members = &by_group[&key];
        let (src_type, dst_type) = (key.1 as usize, key.2 as usize);
        let src: Vec<i64> = members.iter().map(|e| e.src.index as i64).collect();
        let dst: Vec<i64> = members.iter().map(|e| e.dst.index as i64).collect();
        let draw = |rng: &mut SmallRng, n: i64| -> Vec<i64> {
            (0..p.uniform_negatives)
                .map(|_| rng.random_range(0..n))
                .collect()
        };
        let uni_src = draw(rng, model.tables[src_type].len());
        let uni_dst = draw(rng, model.tables[dst_type].len());
        let mut map =
            |t: usize, v: &[i64]| -> Vec<i64> { v.iter().map(|&i| rows[t].add(i)).collect() };
        groups.push(Group {
            rel: key.0 as i64,
            src_type,
            dst_type,
            src_pos: map(src_type, &src),
            dst_pos: map(dst_type, &dst),
            uni_src_pos: map(src_type, &uni_src),
            uni_dst_pos: map(dst_type, &uni_dst),
            src,
            dst,
            uni_src,
            uni_dst,
        });
    }

    // Leaves: the touched rows of each table, and all relation vectors.
    let leaves: Vec<Option<(Tensor, Tensor)>> = rows
        .iter()
        .enumerate()
        .map(|(t, set)| {
            if set.unique.is_empty() {
                return None;
            }
            let idx = long(&set.unique, device);
            let leaf = model.tables[t]
                .weights
                .index_select(0, &idx)
                .detach()
                .set_requires_grad(true);
            Some((idx, leaf))
        })
        .collect();
    let rel_leaf = model.relations.detach().set_requires_grad(true);

    let mut total = Tensor::zeros([], (Kind::Float, device));
    for g in &groups {
        let table = |t: usize, pos: &[i64]| {
            leaves[t]
                .as_ref()
                .expect("rows added")
                .1
                .index_select(0, &long(pos, device))
        };
        let s = table(g.src_type, &g.src_pos);
        let t = table(g.dst_type, &g.dst_pos);
        let b = g.src.len() as i64;
        let r = rel_leaf
            .get(g.rel)
            .unsqueeze(0)
            .expand([b, model.dim], false);
        let a = translate(&s, &r);
        let pos = score_pairs(p.comparator, &a, &t);

        let dst_cands = Tensor::cat(&[t.shallow_clone(), table(g.dst_type, &g.uni_dst_pos)], 0);
        let neg_dst = score_targets(p.comparator, &a, &dst_cands);
        let valid_dst = negative_mask(&g.dst, &g.src, &g.uni_dst, device);

        let src_cands = Tensor::cat(&[s.shallow_clone(), table(g.src_type, &g.uni_src_pos)], 0);
        let neg_src = score_sources(p.comparator, &src_cands, &r, &t);
        let valid_src = negative_mask(&g.src, &g.dst, &g.uni_src, device);

        let group_loss =
            loss(p.loss, &pos, &neg_dst, &valid_dst) + loss(p.loss, &pos, &neg_src, &valid_src);
        total += group_loss * (b as f64);
    }
    let total = total / edges.len() as f64;
    let loss_value = total.double_value(&[]);
    if !loss_value.is_finite() {
        return StepStats {
            loss: loss_value,
            edges: edges.len(),
            skipped: true,
        };
    }
    total.backward();
    let grads: Vec<Option<Tensor>> = leaves
        .iter()
        .map(|l| l.as_ref().map(|(_, leaf)| leaf.grad()))
        .collect();
    let rel_grad = rel_leaf.grad();
    let finite = grads
        .iter()
        .flatten()
        .chain(std::iter::once(&rel_grad))
        .all(|g| g.isfinite().all().int64_value(&[]) == 1);
    if !finite {
        return StepStats {
            loss: loss_value,
            edges: edges.len(),
            skipped: true,
        };
    }
    for (t, (leaf, grad)) in leaves.iter().zip(grads).enumerate() {
        if let (Some((idx, _)), Some(grad)) = (leaf, grad) {
            model.tables[t].adagrad(idx, &grad, p.lr);
        }
    }
    model.adagrad_relations(&rel_grad, p.relation_lr);
    StepStats {
        loss: loss_value,
        edges: edges.len(),
        skipped: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NodeRef;
    use rand::SeedableRng;

    fn params() -> TrainParams {
        TrainParams {
            dim: 16,
            comparator: Comparator::Dot,
            loss: LossKind::Logistic,
            lr: 0.1,
            relation_lr: 0.1,
            uniform_negatives: 8,
            init_scale: 0.1,
            batch_size: 64,
            seed: 1,
        }
    }

    fn edge(s: u32, r: u16, t: u32) -> Edge {
        Edge {
            src: NodeRef {
                node_type: 0,
                index: s,
            },
            rel: r,
            dst: NodeRef {
                node_type: 0,
                index: t,
            },
            ts: 0,
            weight: 1.0,
        }
    }

    #[test]
    fn mask_excludes_self_and_in_batch_accidental_positives() {
        // Positives (s=1,t=10), (s=1,t=11), (s=2,t=12): for row 0, t=11 shares its source.
        let m = negative_mask(&[10, 11, 12], &[1, 1, 2], &[10, 99], Device::Cpu);
        let got = Vec::<bool>::try_from(m.reshape([-1])).unwrap();
        assert_eq!(
            got,
            vec![
                false, false, true, false,
                true, // row 0: self, accidental, ok; uniform 10 == own
                false, false, true, true, true, //
                true, true, false, true, true,
            ]
        );
    }

    #[test]
    fn only_touched_rows_move_and_loss_decreases() {
        tch::manual_seed(0);
        let mut rng = SmallRng::seed_from_u64(0);
        let mut p = params();
        p.uniform_negatives = 0; // keep untouched rows untouched
        let mut model = Embeddings::new(1, 2, p.dim, 0.1, Device::Cpu);
        let edges = vec![edge(0, 0, 1), edge(2, 0, 3), edge(4, 1, 5)];
        ensure_rows(&mut model, &[edge(0, 0, 9)], p.init_scale);
        let before = model.tables[0].rows().copy();
        let first = train_step(&mut model, &edges, &p, &mut rng);
        assert!(!first.skipped);
        let after = model.tables[0].rows();
        let moved: Vec<i64> = (0..10)
            .filter(|&i| {
                (before.get(i) - after.get(i))
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[])
                    > 0.0
            })
            .collect();
        assert_eq!(moved, vec![0, 1, 2, 3, 4, 5]);
        let mut last = first.loss;
        for _ in 0..50 {
            last = train_step(&mut model, &edges, &p, &mut rng).loss;
        }
        assert!(last < first.loss * 0.5, "loss {} -> {last}", first.loss);
    }

    #[test]
    fn a_non_finite_step_changes_nothing() {
        let mut rng = SmallRng::seed_from_u64(0);
        let p = params();
        let mut model = Embeddings::new(1, 1, p.dim, 0.1, Device::Cpu);
        ensure_rows(&mut model, &[edge(0, 0, 3)], p.init_scale);
        let _ = model.tables[0].weights.get(0).fill_(f64::NAN);
        let before = model.relations.copy();
        let stats = train_step(&mut model, &[edge(0, 0, 1), edge(2, 0, 3)], &p, &mut rng);
        assert!(stats.skipped);
        assert!(before.equal(&model.relations));
    }
}
