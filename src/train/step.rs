//! One training step on a micro-batch of edges (docs/architecture.md §4), and the parameters that shape it.
//!
//! Per group of edges with the same endpoint types (all relations between them: translation is
//! per row, so one matrix product scores them all):
//! * the positive score `score(e_s + e_r, e_t)`;
//! * target-side negatives: the group's other targets (in-batch, one matrix product) plus
//!   `uniform_negatives` targets of the target type drawn once for the group;
//! * source-side negatives likewise; with reverse relations
//!   ([`crate::train::ReverseRelations`], `train.reverse_relations`) each candidate source `c`
//!   scores `score(c, e_t + h_r)` and the source side has its own positive score
//!   `score(e_s, e_t + h_r)`, as PyTorch-BigGraph's dynamic relations score both directions;
//! * accidental positives among in-batch negatives are masked: another positive's target is a
//!   true target of this source when the two share their source and relation (and vice versa).
//!
//! Gradients reach only copies of the unique rows the step touches: for the dot comparator
//! derived by hand (`step_dot.rs`), for the others through autograd on leaf copies; the updates
//! are applied with row-wise sparse Adagrad ([`crate::train::NodeTable::adagrad`]). A step whose loss
//! or gradients are not finite changes nothing and is reported as skipped.

use std::collections::HashMap;

use rand::rngs::SmallRng;
use rand::Rng;
use tch::{Device, Kind, Tensor};

use crate::config::TrainParams;
use crate::store::{Edge, NodeRef};
use crate::train::loss_parts_fast as loss_parts;
use crate::train::{history_weights, History};
use crate::train::{score_pairs, score_sources, score_targets, translate, Comparator};
use crate::train::{Embeddings, NodeTable};

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
    rels: Vec<i64>,
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
    /// With every row of the target type as negatives ([`TrainParams::all_targets_up_to`]):
    /// their positions, in row order.
    all_dst_pos: Option<Vec<i64>>,
    /// Sources represented with their recent targets ([`History`]): `(edges, uniform)`, each
    /// the sparse weights of target-type rows (by position) added to a source's row.
    history: Option<(Weights, Weights)>,
}

/// A sparse `[rows, positions]` matrix as `(row, position, weight)` triplets.
#[derive(Default)]
struct Weights(Vec<(i64, i64, f32)>);

impl Weights {
    /// `[rows, D]`: each row the weighted sum of the `leaf` rows its triplets name. Gathered and
    /// added sparsely: its cost follows the triplets (`rows × history`), not `rows × leaf rows`
    /// as a dense product would (every movie is a leaf under a softmax over all of them).
    fn times(&self, rows: i64, leaf: &Tensor) -> Tensor {
        let device = leaf.device();
        let out = Tensor::zeros([rows, leaf.size()[1]], (leaf.kind(), device));
        if self.0.is_empty() {
            return out;
        }
        let r: Vec<i64> = self.0.iter().map(|t| t.0).collect();
        let c: Vec<i64> = self.0.iter().map(|t| t.1).collect();
        let w: Vec<f32> = self.0.iter().map(|t| t.2).collect();
        let w = Tensor::from_slice(&w).to_device(device).unsqueeze(1);
        let terms = leaf.index_select(0, &long(&c, device)) * w;
        out.index_add(0, &long(&r, device), &terms)
    }
}

fn long(v: &[i64], device: Device) -> Tensor {
    Tensor::from_slice(v).to_device(device)
}

/// Which candidates may serve as negatives: `(in_batch [b, chunk], uniform [b, K])`, column `j`
/// of `in_batch` being the `j`-th positive of `i`'s chunk (`i / chunk`). Built with tensor ops on
/// the device: it is `b × (chunk + K)` cells per side and step.
fn negative_mask(
    own: &[i64],
    other_side: &[i64],
    rels: &[i64],
    uniform: &[i64],
    chunk: usize,
    device: Device,
) -> (Tensor, Tensor) {
    let b = own.len() as i64;
    let c = chunk as i64;
    let n = (b + c - 1) / c;
    // Padding slots get a sentinel that matches nothing real, and are masked out explicitly.
    let padded = |v: &[i64]| {
        let mut p = v.to_vec();
        p.resize((n * c) as usize, -1);
        Tensor::from_slice(&p).to_device(device).view([n, c])
    };
    let (own_c, other_c, rel_c) = (padded(own), padded(other_side), padded(rels));
    let differ = |x: &Tensor| x.unsqueeze(2).ne_tensor(&x.unsqueeze(1));
    // Same node, or another positive sharing this one's relation and other end (a true edge):
    // neither is a negative; nor is padding.
    let real = own_c.ge(0).unsqueeze(1);
    let in_batch = differ(&own_c)
        .logical_and(&differ(&other_c).logical_or(&differ(&rel_c)))
        .logical_and(&real)
        .view([n * c, c])
        .narrow(0, 0, b);
    let own_t = Tensor::from_slice(own).to_device(device);
    let uni = Tensor::from_slice(uniform).to_device(device);
    let uniform_valid = uni.unsqueeze(0).ne_tensor(&own_t.unsqueeze(1));
    (in_batch, uniform_valid)
}

/// Which rows of the target type may serve as negatives when all `n` of them do: `[b, n]`, not a
/// positive's own target, nor another positive's target when the two share their source and
/// relation (a true edge).
fn all_targets_mask(dst: &[i64], src: &[i64], rels: &[i64], n: i64) -> Tensor {
    let b = dst.len();
    let mut targets: HashMap<(i64, i64), Vec<i64>> = HashMap::new();
    for i in 0..b {
        targets.entry((src[i], rels[i])).or_default().push(dst[i]);
    }
    let mut valid = vec![true; b * n as usize];
    for i in 0..b {
        for &d in &targets[&(src[i], rels[i])] {
            valid[i * n as usize + d as usize] = false;
        }
    }
    Tensor::from_slice(&valid).view([b as i64, n])
}

/// `[b, D]` → `[ceil(b / chunk), chunk, D]`, zero-padded.
fn chunked(x: &Tensor, chunk: i64) -> Tensor {
    let (b, d) = (x.size()[0], x.size()[1]);
    let n = (b + chunk - 1) / chunk;
    let pad = n * chunk - b;
    let x = if pad > 0 {
        Tensor::cat(
            &[
                x.shallow_clone(),
                Tensor::zeros([pad, d], (x.kind(), x.device())),
            ],
            0,
        )
    } else {
        x.shallow_clone()
    };
    x.view([n, chunk, d])
}

/// `[b]` per-positive values → `[b, chunk]`, column `j` of row `i` the value of the `j`-th
/// positive of `i`'s chunk (zero for padding), matching [`unchunked`] in-batch scores.
fn in_batch_columns(x: &Tensor, chunk: i64, b: i64) -> Tensor {
    let n = (b + chunk - 1) / chunk;
    let padded = Tensor::cat(
        &[
            x.shallow_clone(),
            Tensor::zeros([n * chunk - b], (x.kind(), x.device())),
        ],
        0,
    );
    padded
        .view([n, 1, chunk])
        .expand([n, chunk, chunk], false)
        .reshape([n * chunk, chunk])
        .narrow(0, 0, b)
}

/// `[n, chunk, chunk]` in-batch scores → `[b, chunk]` (padding rows dropped).
fn unchunked(x: &Tensor, b: i64) -> Tensor {
    let chunk = x.size()[2];
    x.view([-1, chunk]).narrow(0, 0, b)
}

/// Rows each table needs so that every node `edges` names has one.
pub(crate) fn rows_needed(model: &Embeddings, edges: &[Edge]) -> Vec<i64> {
    let mut needed: Vec<i64> = model.tables.iter().map(|t| t.len()).collect();
    for e in edges {
        for n in [e.src, e.dst] {
            let t = n.node_type as usize;
            needed[t] = needed[t].max(n.index as i64 + 1);
        }
    }
    needed
}

/// Make sure every node `edges` names has a row; new rows are random (see [`crate::train`] for
/// the warm start the trainer uses when it has the store).
pub fn ensure_rows(model: &mut Embeddings, edges: &[Edge], init_scale: f64) {
    let (dim, device) = (model.dim, model.device);
    let needed = rows_needed(model, edges);
    for (table, n) in model.tables.iter_mut().zip(needed) {
        table.grow(n, |count| {
            Tensor::randn([count, dim], (Kind::Float, device)) * init_scale
        });
    }
}

/// The drift control's L2 pull (docs/architecture.md §5), decoupled from the gradient: after each step, every
/// touched row the reference has is moved back toward its reference row,
/// `e ← ref + (e − ref) / (1 + lr · strength)`, and likewise the relation vectors (with
/// `relation_lr`). This is the proximal step of `strength/2 · ‖e − ref‖²`.
///
/// Why not a term in the loss: Adagrad normalises each row's step by its gradient history, so a
/// pull inside the gradient moves a row by about `lr` per coordinate whatever its strength, and
/// near the reference it overshoots — measured: a stronger in-loss pull *raised* drift between
/// versions. Decoupled (as AdamW decouples weight decay), the pull shrinks the deviation by a
/// fixed factor per step, so strength means what it says.
pub struct Pull<'a> {
    /// Per node type, the reference rows (on the model's device); a touched row beyond them (a
    /// node newer than the reference) is not pulled.
    pub tables: &'a [Tensor],
    pub relations: &'a Tensor,
    pub strength: f64,
    /// Per node type, rows not pulled (`[k]` Bool; rows past `k` are pulled): with several
    /// instances, the rows another owns, whose reference here is stale (their owner's
    /// published row replaces them instead).
    pub skip: Option<&'a [Tensor]>,
}

/// Apply the proximal pull to the rows a step touched (`leaves`: per type, the touched indices).
fn apply_pull(
    model: &mut Embeddings,
    pull: &Pull<'_>,
    touched: &[Option<Tensor>],
    p: &TrainParams,
) {
    tch::no_grad(|| {
        let keep = 1.0 / (1.0 + p.lr * pull.strength);
        for (t, ((table, idx), reference)) in
            (model.tables.iter_mut().zip(touched).zip(pull.tables)).enumerate()
        {
            let (Some(idx), n) = (idx, reference.size()[0]) else {
                continue;
            };
            let mut idx = idx.masked_select(&idx.lt(n));
            if let Some(skip) = pull.skip.and_then(|s| s.get(t)).filter(|s| s.numel() > 0) {
                let k = skip.size()[0];
                let skipped = skip
                    .index_select(0, &idx.clamp_max(k - 1))
                    .logical_and(&idx.lt(k));
                idx = idx.masked_select(&skipped.logical_not());
            }
            // A row whose reference is a placeholder's noise is its node's start, not drift.
            let idx = table.with_published_row(idx);
            if idx.numel() == 0 {
                continue;
            }
            let anchor = reference.index_select(0, &idx);
            let rows = table.weights.index_select(0, &idx);
            let pulled = &anchor + (rows - &anchor) * keep;
            let _ = table.weights.index_copy_(0, &idx, &pulled);
        }
        if pull.relations.size() == model.relations.size() {
            let keep = 1.0 / (1.0 + p.relation_lr * pull.strength);
            let pulled = pull.relations + (&model.relations - pull.relations) * keep;
            model.relations.copy_(&pulled);
        }
    })
}

/// What a step's gradients are shown to before the update ([`train_step_tapped`]): per table (its
/// index and its rows before the update), the touched rows (`[k]` Int64), their gradients
/// (`[k, D]`) and, for a biased table, their bias gradients (`[k]`). The gradient exchange takes
/// the rows another instance owns from it.
pub trait GradientTap {
    fn rows(
        &mut self,
        t: usize,
        table: &NodeTable,
        rows: &Tensor,
        grad: &Tensor,
        bias: Option<&Tensor>,
    );
}

/// One step on `edges` (see the module docs).
pub fn train_step(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
) -> StepStats {
    train_step_pulled(model, edges, p, rng, None)
}

/// [`train_step`] with an optional [`Pull`] toward a reference.
pub(super) fn train_step_pulled(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    pull: Option<&Pull<'_>>,
) -> StepStats {
    train_step_with(model, edges, p, rng, pull, None)
}

/// [`train_step_pulled`] with sources represented by their recent targets ([`History`]).
pub fn train_step_with(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    pull: Option<&Pull<'_>>,
    history: Option<History<'_>>,
) -> StepStats {
    train_step_tapped(model, edges, p, rng, pull, history, None)
}

/// [`train_step_with`], its finite gradients shown to `tap` (when given) before they are
/// applied.
pub fn train_step_tapped(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    pull: Option<&Pull<'_>>,
    history: Option<History<'_>>,
    tap: Option<&mut dyn GradientTap>,
) -> StepStats {
    let by_hand = p.comparator == Comparator::Dot;
    step_on(model, edges, p, rng, pull, history, by_hand, tap)
}

/// [`train_step_with`] on autograd whatever the comparator (the dot comparator's step derives its
/// gradients by hand): the reference the hand-derived step is tested and benched against.
pub fn train_step_autograd(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    pull: Option<&Pull<'_>>,
    history: Option<History<'_>>,
) -> StepStats {
    step_on(model, edges, p, rng, pull, history, false, None)
}

/// Groups → scores → loss → gradients (by hand, or by autograd) → update.
#[allow(clippy::too_many_arguments)]
fn step_on(
    model: &mut Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    pull: Option<&Pull<'_>>,
    history: Option<History<'_>>,
    by_hand: bool,
    tap: Option<&mut dyn GradientTap>,
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
    let (groups, rows) = edge_groups(model, edges, p, rng, history);
    let n = edges.len();
    let leaves = Leaves::of(model, &rows, !by_hand);
    if by_hand {
        let mut grads = Grads::zeros(&leaves);
        let mut loss = 0.0;
        for g in &groups {
            let weight = g.src.len() as f64 / n as f64;
            loss += weight * dot::group_loss_and_grads(g, &leaves, p, device, weight, &mut grads);
        }
        return apply(model, &leaves, loss, Some(grads), n, p, pull, tap);
    }
    let mut total = Tensor::zeros([], (Kind::Float, device));
    for g in &groups {
        total += group_loss(g, &leaves, p, device) * (g.src.len() as f64);
    }
    let total = total / n as f64;
    let loss = total.double_value(&[]);
    let grads = loss.is_finite().then(|| autograd(&leaves, &total));
    apply(model, &leaves, loss, grads, n, p, pull, tap)
}

/// Edges grouped by their endpoint types, each with its negatives drawn and every row it uses
/// given a position among its table's touched rows.
fn edge_groups(
    model: &Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    rng: &mut SmallRng,
    history: Option<History<'_>>,
) -> (Vec<Group>, Vec<RowSet>) {
    let mut rows: Vec<RowSet> = (0..model.tables.len()).map(|_| RowSet::default()).collect();

    let mut by_group: HashMap<(u16, u16), Vec<&Edge>> = HashMap::new();
    for e in edges {
        by_group
            .entry((e.src.node_type, e.dst.node_type))
            .or_default()
            .push(e);
    }
    let mut keys: Vec<_> = by_group.keys().copied().collect();
    keys.sort_unstable();
    let mut groups = Vec::with_capacity(keys.len());
    for key in keys {
        let members = &by_group[&key];
        let (src_type, dst_type) = (key.0 as usize, key.1 as usize);
        let src: Vec<i64> = members.iter().map(|e| e.src.index as i64).collect();
        let dst: Vec<i64> = members.iter().map(|e| e.dst.index as i64).collect();
        let draw = |rng: &mut SmallRng, n: i64| -> Vec<i64> {
            (0..p.uniform_negatives)
                .map(|_| rng.random_range(0..n))
                .collect()
        };
        let uni_src = draw(rng, model.tables[src_type].len());
        let n_dst = model.tables[dst_type].len();
        let all_dst = p.all_targets_up_to > 0 && n_dst <= p.all_targets_up_to;
        let uni_dst = if all_dst {
            Vec::new()
        } else {
            draw(rng, n_dst)
        };
        let mut map =
            |t: usize, v: &[i64]| -> Vec<i64> { v.iter().map(|&i| rows[t].add(i)).collect() };
        let all_dst_pos = all_dst.then(|| map(dst_type, &(0..n_dst).collect::<Vec<_>>()));
        let (src_pos, dst_pos) = (map(src_type, &src), map(dst_type, &dst));
        let (uni_src_pos, uni_dst_pos) = (map(src_type, &uni_src), map(dst_type, &uni_dst));
        let history = history.map(|h| {
            let mut weights = |sources: &mut dyn Iterator<Item = (u32, Option<i64>)>| {
                let mut out = Weights::default();
                for (row, (index, skip)) in sources.enumerate() {
                    let node = NodeRef {
                        node_type: src_type as u16,
                        index,
                    };
                    let recent: Vec<(i64, f32)> = h(node, dst_type)
                        .into_iter()
                        .filter(|&(i, _)| i < n_dst)
                        .collect();
                    for (i, w) in history_weights(&recent, skip) {
                        out.0.push((row as i64, rows[dst_type].add(i), w));
                    }
                }
                out
            };
            let on_edges = weights(
                &mut members
                    .iter()
                    .map(|e| (e.src.index, Some(e.dst.index as i64))),
            );
            let on_uniform = weights(&mut uni_src.iter().map(|&i| (i as u32, None)));
            (on_edges, on_uniform)
        });
        groups.push(Group {
            history,
            all_dst_pos,
            rels: members.iter().map(|e| e.rel as i64).collect(),
            src_type,
            dst_type,
            src_pos,
            dst_pos,
            uni_src_pos,
            uni_dst_pos,
            src,
            dst,
            uni_src,
            uni_dst,
        });
    }
    (groups, rows)
}

/// Leaf copies of the rows a step touches (per table), of every relation vector, and of the
/// touched rows' biases where a table carries one: gradients flow into these only.
struct Leaves {
    rows: Vec<Option<(Tensor, Tensor)>>,
    relations: Tensor,
    /// The reverse relation operators, when the model has them.
    reverse: Option<Tensor>,
    biases: Vec<Option<Tensor>>,
}

impl Leaves {
    /// `track`: the copies are autograd leaves (else plain copies, for the hand-derived step).
    fn of(model: &Embeddings, rows: &[RowSet], track: bool) -> Leaves {
        let device = model.device;
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
                    .set_requires_grad(track);
                Some((idx, leaf))
            })
            .collect();
        let rel_leaf = model.relations.detach().set_requires_grad(track);
        // The touched rows' biases, for tables that carry one.
        let bias_leaves: Vec<Option<Tensor>> = leaves
            .iter()
            .zip(&model.tables)
            .map(|(l, table)| {
                let (idx, _) = l.as_ref().filter(|_| table.biased)?;
                Some(
                    table
                        .bias
                        .index_select(0, idx)
                        .detach()
                        .set_requires_grad(track),
                )
            })
            .collect();
        let reverse = model
            .reverse
            .as_ref()
            .map(|rev| rev.relations.detach().set_requires_grad(track));
        Leaves {
            rows: leaves,
            relations: rel_leaf,
            reverse,
            biases: bias_leaves,
        }
    }
}

/// One group's loss: positives against target-side and source-side negatives.
fn group_loss(g: &Group, leaves: &Leaves, p: &TrainParams, device: Device) -> Tensor {
    let x = Gathered::new(g, leaves, p, device);
    let dst_parts = x.target_parts(g, leaves, p, device);
    let dst_refs: Vec<(&Tensor, &Tensor)> = dst_parts.iter().map(|(s, v)| (s, v)).collect();
    let (src_pos, src_in_batch, src_uniform) = x.source_scores(g, leaves, p, device);
    let (src_in_valid, src_uni_valid) = negative_mask(
        &g.src,
        &g.dst,
        &g.rels,
        &g.uni_src,
        x.chunk as usize,
        device,
    );

    loss_parts(p.loss, &x.pos, &dst_refs)
        + loss_parts(
            p.loss,
            &src_pos,
            &[
                (&src_in_batch, &src_in_valid),
                (&src_uniform, &src_uni_valid),
            ],
        )
}

/// `x + add` (`x` when there is nothing to add).
fn plus(x: Tensor, add: Option<Tensor>) -> Tensor {
    match add {
        Some(add) => x + add,
        None => x,
    }
}

/// Table `t`'s leaf rows at `pos` (positions in the step's unique rows).
fn leaf_rows(leaves: &Leaves, t: usize, pos: &[i64], device: Device) -> Tensor {
    leaves.rows[t]
        .as_ref()
        .expect("rows added")
        .1
        .index_select(0, &long(pos, device))
}

/// A group's gathered rows and positive scores, which both sides' negatives score against.
struct Gathered {
    b: i64,
    chunk: i64,
    s: Tensor,
    uni_s: Tensor,
    t: Tensor,
    r: Tensor,
    a: Tensor,
    /// The target bias of each positive's target `[b]`.
    pos_bias: Option<Tensor>,
    pos: Tensor,
    a_c: Tensor,
    s_c: Tensor,
    r_c: Tensor,
    t_c: Tensor,
}

impl Gathered {
    fn new(g: &Group, leaves: &Leaves, p: &TrainParams, device: Device) -> Gathered {
        let b = g.src.len() as i64;
        let mut s = leaf_rows(leaves, g.src_type, &g.src_pos, device);
        let mut uni_s = leaf_rows(leaves, g.src_type, &g.uni_src_pos, device);
        if let Some((on_edges, on_uniform)) = &g.history {
            let items = &leaves.rows[g.dst_type].as_ref().expect("rows added").1;
            s = &s + on_edges.times(b, items);
            uni_s = &uni_s + on_uniform.times(g.uni_src.len() as i64, items);
        }
        let t = leaf_rows(leaves, g.dst_type, &g.dst_pos, device);
        let r = leaves.relations.index_select(0, &long(&g.rels, device));
        let a = translate(&s, &r);
        let chunk = (p.chunk_size as i64).min(b);
        let pos_bias = bias_of(leaves, g.dst_type, &g.dst_pos, device);
        let pos = plus(
            score_pairs(p.comparator, &a, &t),
            pos_bias.as_ref().map(Tensor::shallow_clone),
        );
        let (a_c, s_c, r_c, t_c) = (
            chunked(&a, chunk),
            chunked(&s, chunk),
            chunked(&r, chunk),
            chunked(&t, chunk),
        );
        Gathered {
            b,
            chunk,
            s,
            uni_s,
            t,
            r,
            a,
            pos_bias,
            pos,
            a_c,
            s_c,
            r_c,
            t_c,
        }
    }

    /// The target side's negatives and their masks: every row of the type, or in-batch (per
    /// chunk, one batched product) and uniform.
    fn target_parts(
        &self,
        g: &Group,
        leaves: &Leaves,
        p: &TrainParams,
        device: Device,
    ) -> Vec<(Tensor, Tensor)> {
        let (a, b, chunk) = (&self.a, self.b, self.chunk);
        let bias = |pos: &[i64]| bias_of(leaves, g.dst_type, pos, device);
        match &g.all_dst_pos {
            Some(all) => {
                let scores = plus(
                    score_targets(p.comparator, a, &leaf_rows(leaves, g.dst_type, all, device)),
                    bias(all).map(|x| x.unsqueeze(0)),
                );
                let valid = all_targets_mask(&g.dst, &g.src, &g.rels, all.len() as i64);
                vec![(scores, valid.to_device(device))]
            }
            None => {
                let in_batch = plus(
                    unchunked(&score_targets(p.comparator, &self.a_c, &self.t_c), b),
                    (self.pos_bias.as_ref()).map(|x| in_batch_columns(x, chunk, b)),
                );
                let uniform_rows = leaf_rows(leaves, g.dst_type, &g.uni_dst_pos, device);
                let uniform = plus(
                    score_targets(p.comparator, a, &uniform_rows),
                    bias(&g.uni_dst_pos).map(|x| x.unsqueeze(0)),
                );
                let (in_valid, uni_valid) =
                    negative_mask(&g.dst, &g.src, &g.rels, &g.uni_dst, chunk as usize, device);
                vec![(in_batch, in_valid), (uniform, uni_valid)]
            }
        }
    }

    /// The source side's `(positive, in-batch, uniform)` scores: against `e_t + h_r` with
    /// reverse relations (every comparator is symmetric, so candidates take the target's place
    /// in the product), else as `c + e_r`. (The target's bias is the same for every candidate
    /// source.)
    fn source_scores(
        &self,
        g: &Group,
        leaves: &Leaves,
        p: &TrainParams,
        device: Device,
    ) -> (Tensor, Tensor, Tensor) {
        let (s, t, b, chunk) = (&self.s, &self.t, self.b, self.chunk);
        let own_bias = self.pos_bias.as_ref().map(|x| x.unsqueeze(1));
        let (src_pos, src_in_batch, src_uniform) = match leaves.reverse.as_ref() {
            Some(rev) => {
                let q = t + rev.index_select(0, &long(&g.rels, device));
                let src_pos = plus(
                    score_pairs(p.comparator, &q, s),
                    self.pos_bias.as_ref().map(Tensor::shallow_clone),
                );
                let in_batch = score_targets(p.comparator, &chunked(&q, chunk), &self.s_c);
                let uniform = score_targets(p.comparator, &q, &self.uni_s);
                (src_pos, unchunked(&in_batch, b), uniform)
            }
            None => (
                self.pos.shallow_clone(),
                unchunked(
                    &score_sources(p.comparator, &self.s_c, &self.r_c, &self.t_c),
                    b,
                ),
                score_sources(p.comparator, &self.uni_s, &self.r, t),
            ),
        };
        let src_in_batch = plus(src_in_batch, own_bias.as_ref().map(Tensor::shallow_clone));
        let src_uniform = plus(src_uniform, own_bias);
        (src_pos, src_in_batch, src_uniform)
    }
}

/// The target biases of table `t`'s rows at `pos`, when the type carries one.
fn bias_of(leaves: &Leaves, t: usize, pos: &[i64], device: Device) -> Option<Tensor> {
    (leaves.biases[t].as_ref()).map(|l| l.index_select(0, &long(pos, device)))
}

/// Gradients of a step's loss: per table the touched rows' (`[unique, D]`, in [`Leaves`] order),
/// the relations', the reverse operators' and the touched biases' (`None`: nothing reached them).
struct Grads {
    rows: Vec<Option<Tensor>>,
    relations: Tensor,
    reverse: Option<Tensor>,
    biases: Vec<Option<Tensor>>,
}

impl Grads {
    fn zeros(leaves: &Leaves) -> Grads {
        Grads {
            rows: leaves
                .rows
                .iter()
                .map(|l| l.as_ref().map(|(_, leaf)| leaf.zeros_like()))
                .collect(),
            relations: leaves.relations.zeros_like(),
            reverse: leaves.reverse.as_ref().map(Tensor::zeros_like),
            biases: leaves.biases.iter().map(|_| None).collect(),
        }
    }

    fn rows_add(&mut self, table: usize, positions: &Tensor, grad: &Tensor) {
        let rows = self.rows[table].as_mut().expect("rows added");
        let _ = rows.index_add_(0, positions, grad);
    }

    fn bias_add(&mut self, leaves: &Leaves, table: usize, positions: &Tensor, grad: &Tensor) {
        let Some(leaf) = leaves.biases[table].as_ref() else {
            return;
        };
        let _ = self.biases[table]
            .get_or_insert_with(|| leaf.zeros_like())
            .index_add_(0, positions, grad);
    }
}

/// Autograd's gradients of `total` with respect to the leaves.
fn autograd(leaves: &Leaves, total: &Tensor) -> Grads {
    total.backward();
    // (A bias whose rows were only sources in this step has no gradient.)
    Grads {
        rows: leaves
            .rows
            .iter()
            .map(|l| l.as_ref().map(|(_, leaf)| leaf.grad()))
            .collect(),
        relations: leaves.relations.grad(),
        reverse: leaves
            .reverse
            .as_ref()
            .map(Tensor::grad)
            .filter(Tensor::defined),
        biases: leaves
            .biases
            .iter()
            .map(|l| l.as_ref().map(Tensor::grad).filter(Tensor::defined))
            .collect(),
    }
}

/// When the loss and every gradient are finite, the Adagrad updates and the pull toward the
/// reference (`grads` is `None` when the loss was not finite), the gradients shown to `tap` first.
#[allow(clippy::too_many_arguments)]
fn apply(
    model: &mut Embeddings,
    leaves: &Leaves,
    loss: f64,
    grads: Option<Grads>,
    n_edges: usize,
    p: &TrainParams,
    pull: Option<&Pull<'_>>,
    tap: Option<&mut dyn GradientTap>,
) -> StepStats {
    let skipped = StepStats {
        loss,
        edges: n_edges,
        skipped: true,
    };
    let Some(grads) = grads.filter(|_| loss.is_finite()) else {
        return skipped;
    };
    let finite = grads
        .rows
        .iter()
        .flatten()
        .chain(grads.biases.iter().flatten())
        .chain(std::iter::once(&grads.relations))
        .chain(grads.reverse.iter())
        // One sum per gradient: a NaN or infinity anywhere makes it non-finite (a bool tensor
        // per gradient and its reduction cost more than the check is worth).
        .all(|g| g.sum(Kind::Float).double_value(&[]).is_finite());
    if !finite {
        return skipped;
    }
    let leaves = &leaves.rows;
    if let Some(tap) = tap {
        for (t, (leaf, grad)) in leaves.iter().zip(&grads.rows).enumerate() {
            if let (Some((idx, _)), Some(grad)) = (leaf, grad) {
                tap.rows(t, &model.tables[t], idx, grad, grads.biases[t].as_ref());
            }
        }
    }
    for (t, (leaf, grad)) in leaves.iter().zip(&grads.rows).enumerate() {
        if let (Some((idx, _)), Some(grad)) = (leaf, grad) {
            model.tables[t].adagrad(idx, grad, p.lr);
        }
    }
    for (t, (leaf, grad)) in leaves.iter().zip(&grads.biases).enumerate() {
        if let (Some((idx, _)), Some(grad)) = (leaf, grad) {
            model.tables[t].adagrad_bias(idx, grad, p.lr);
        }
    }
    model.adagrad_relations(&grads.relations, p.relation_lr);
    if let Some(grad) = &grads.reverse {
        model.adagrad_reverse(grad, p.relation_lr);
    }
    if let Some(pull) = pull.filter(|pull| pull.strength > 0.0) {
        let touched: Vec<Option<Tensor>> = leaves
            .iter()
            .map(|l| l.as_ref().map(|(idx, _)| idx.shallow_clone()))
            .collect();
        apply_pull(model, pull, &touched, p);
    }
    StepStats {
        loss,
        edges: n_edges,
        skipped: false,
    }
}

#[path = "step_dot.rs"]
mod dot;

#[cfg(test)]
#[path = "step_tests.rs"]
mod tests;
