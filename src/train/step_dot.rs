//! The step of [`super`] for the dot comparator, with every gradient derived by hand instead of
//! by autograd: the same scores, masks and loss, then each product's two backward products
//! (`G·C` for the queries, `Gᵀ·Q` for the candidates) and the sums into the touched rows,
//! relations and biases.
//!
//! Why: on PyTorch-BigGraph's settings (1,000 edges, chunks of 50, 50 + 50 negatives a side, dim
//! 128) the six products of a step take about 2 ms on one core; autograd's graph, its
//! `index_select` backward (a `[rows, D]` zero fill and scatter per gather) and the leaf copies
//! took more than twice that again. Here each gather's backward is one `index_add_` into the
//! step's gradient of the unique rows.
//!
//! The step is autograd's to float precision (`step_tests.rs`); other comparators use autograd.

use tch::{Device, Kind, Tensor};

use super::{
    all_targets_mask, chunked, in_batch_columns, long, negative_mask, unchunked, Grads, Group,
    Leaves, Weights,
};
use crate::train::logistic_host::{logistic_side, SideIds, SideScores};
use crate::train::{loss_and_gradients, LossKind, TrainParams};

impl Weights {
    /// Backward of [`Weights::times`]: each triplet adds `weight · grad[row]` to its position of
    /// `into` (`[positions, D]`).
    fn add_transposed(&self, grad: &Tensor, into: &mut Tensor) {
        if self.0.is_empty() {
            return;
        }
        let device = grad.device();
        let r: Vec<i64> = self.0.iter().map(|t| t.0).collect();
        let c: Vec<i64> = self.0.iter().map(|t| t.1).collect();
        let w: Vec<f32> = self.0.iter().map(|t| t.2).collect();
        let w = Tensor::from_slice(&w).to_device(device).unsqueeze(1);
        let terms = grad.index_select(0, &long(&r, device)) * w;
        let _ = into.index_add_(0, &long(&c, device), &terms);
    }
}

/// Backward of in-batch scores `unchunked(Q_c · C_cᵀ)` (`[b, chunk]`) with their gradient `g`:
/// adds `grad Q` and `grad C` (both `[b, D]`) into `grad_q` and `grad_c`. When the chunks tile
/// the batch, the products accumulate into the gradients in place (one `baddbmm_` each: no
/// product to allocate and add afterwards).
fn in_batch_backward_into(
    g: &Tensor,
    q_c: &Tensor,
    c_c: &Tensor,
    grad_q: &mut Tensor,
    grad_c: &mut Tensor,
    b: i64,
) {
    let chunk = c_c.size()[1];
    let g_c = chunked(g, chunk);
    let d = q_c.size()[2];
    let g_t = g_c.transpose(1, 2);
    if b % chunk == 0 && grad_q.is_contiguous() && grad_c.is_contiguous() {
        let _ = grad_q.view([-1, chunk, d]).baddbmm_(&g_c, c_c);
        let _ = grad_c.view([-1, chunk, d]).baddbmm_(&g_t, q_c);
    } else {
        *grad_q += g_c.bmm(c_c).view([-1, d]).narrow(0, 0, b);
        *grad_c += g_t.bmm(q_c).view([-1, d]).narrow(0, 0, b);
    }
}

/// Per positive, the sum of the in-batch gradient of the columns that are its (`[b]`): the
/// backward of [`in_batch_columns`].
fn in_batch_column_sums(g: &Tensor, chunk: i64, b: i64) -> Tensor {
    chunked(g, chunk)
        .sum_dim_intlist(1, false, Kind::Float)
        .view([-1])
        .narrow(0, 0, b)
}

/// Backward of target candidates' scores `queries · candsᵀ (+ their biases)` with gradient `g`
/// (`[b, k]`): the candidates' rows and biases into `grads` (at `idx`), the queries' gradient
/// added into `grad_queries` in place.
#[allow(clippy::too_many_arguments)]
fn candidates_backward(
    grads: &mut Grads,
    leaves: &Leaves,
    table: usize,
    idx: &Tensor,
    cands: &Tensor,
    queries: &Tensor,
    g: &Tensor,
    grad_queries: &mut Tensor,
) {
    grads.rows_add(table, idx, &g.tr().mm(queries));
    grads.bias_add(
        leaves,
        table,
        idx,
        &g.sum_dim_intlist(0, false, Kind::Float),
    );
    let _ = grad_queries.addmm_(g, cands);
}

/// One side's loss over its in-batch and uniform candidates' scores (`[b, chunk]`, `[b, k]`),
/// and its gradients times `weight`: `(loss, grad pos [b], [grad in-batch, grad uniform])`.
/// The logistic loss on CPU runs in one pass over host memory ([`logistic_side`]); otherwise the
/// masks and the loss are tensor operations on the device.
fn sampled_side(
    p: &TrainParams,
    pos: &Tensor,
    mut in_batch: Tensor,
    mut uniform: Tensor,
    ids: &SideIds<'_>,
    chunk: i64,
    weight: f64,
) -> (f64, Tensor, Vec<Tensor>) {
    if p.loss == LossKind::Logistic {
        let pos_host = on_host(pos)
            .then(|| Vec::<f32>::try_from(pos).ok())
            .flatten();
        if let (Some(pos_host), Some(in_host), Some(uni_host)) = (
            pos_host.as_deref(),
            host_floats_mut(&mut in_batch),
            host_floats_mut(&mut uniform),
        ) {
            let side = SideScores {
                pos: pos_host,
                in_batch: in_host,
                uniform: uni_host,
                chunk: chunk as usize,
            };
            let (value, grad_pos) = logistic_side(side, ids, weight as f32);
            return (
                value,
                Tensor::from_slice(&grad_pos),
                vec![in_batch, uniform],
            );
        }
    }
    let device = pos.device();
    let (in_valid, uni_valid) = negative_mask(
        ids.own,
        ids.other,
        ids.rels,
        ids.uniform,
        chunk as usize,
        device,
    );
    scaled(
        loss_and_gradients(p.loss, pos, &[(in_batch, &in_valid), (uniform, &uni_valid)]),
        weight,
    )
}

/// [`loss_and_gradients`]'s `(loss, grad pos, grads of the parts)` with the gradients times
/// `weight` and the loss on the host.
fn scaled(
    (value, g_pos, g): (Tensor, Tensor, Vec<Tensor>),
    weight: f64,
) -> (f64, Tensor, Vec<Tensor>) {
    let g = g.iter().map(|x| x * weight).collect();
    (value.double_value(&[]), g_pos * weight, g)
}

/// The values of a contiguous float tensor in host memory, to write; `None` for any other.
fn host_floats_mut(t: &mut Tensor) -> Option<&mut [f32]> {
    if !on_host(t) {
        return None;
    }
    if t.numel() == 0 {
        return Some(&mut []);
    }
    // SAFETY: a contiguous CPU float tensor's storage holds `numel` f32 values from its data
    // pointer, alive while `t` is borrowed; the scores written here were made by this step and
    // no other handle to their storage is read while the slice lives.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) })
}

fn on_host(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

fn row_sums(x: &Tensor) -> Tensor {
    x.sum_dim_intlist(1, false, Kind::Float)
}

/// One group's loss (its mean over the group's edges) and, into `grads`, its gradients scaled by
/// `weight` (the group's share of the step's edges): the shared gathers and scores, the target
/// side's loss, the source side's, then the backward of both into the unique rows.
pub(super) fn group_loss_and_grads(
    g: &Group,
    leaves: &Leaves,
    p: &TrainParams,
    device: Device,
    weight: f64,
    grads: &mut Grads,
) -> f64 {
    let f = Forward::new(g, leaves, p, device);
    let dst = f.target_side(g, leaves, p, device, weight);
    let src = f.source_side(g, leaves, p, weight);
    let loss = dst.value + src.value;
    f.backward(g, leaves, grads, dst, src);
    loss
}

/// `x + add` (`x` when there is nothing to add).
fn with_bias(x: Tensor, add: Option<Tensor>) -> Tensor {
    match add {
        Some(add) => x + add,
        None => x,
    }
}

/// The step's leaf copy of table `t`'s touched rows.
fn rows(leaves: &Leaves, t: usize) -> &Tensor {
    &leaves.rows[t].as_ref().expect("rows added").1
}

/// What both sides' scores and the backward share: the group's gathers, `a = s + r`, and the
/// positive score `pos = a·t` (plus the target bias).
struct Forward<'a> {
    /// Positions of the sources, targets and uniform sources in the unique rows, and the
    /// relations, on the device.
    sp: Tensor,
    dp: Tensor,
    usp: Tensor,
    rel_idx: Tensor,
    b: i64,
    chunk: i64,
    s: Tensor,
    uni_s: Tensor,
    t: Tensor,
    r: Tensor,
    a: Tensor,
    bias: Option<&'a Tensor>,
    pos_bias: Option<Tensor>,
    pos: Tensor,
    a_c: Tensor,
    t_c: Tensor,
    s_c: Tensor,
}

/// The target side's candidates: every row of the type, or the uniform draws (in-batch ones are
/// the group's own targets); each with its positions and rows.
enum Candidates {
    All(Tensor, Tensor),
    Sampled(Tensor, Tensor),
}

/// One side's loss and its gradients (already scaled by the group's weight): of the positive
/// scores and of each part of the negatives.
struct Side<C> {
    value: f64,
    g_pos: Tensor,
    g: Vec<Tensor>,
    /// The target side's candidates, or the source side's query `q = e_t + h_r` with reverse
    /// relations.
    with: C,
}

impl<'a> Forward<'a> {
    fn new(g: &Group, leaves: &'a Leaves, p: &TrainParams, device: Device) -> Forward<'a> {
        let b = g.src.len() as i64;
        let chunk = (p.chunk_size as i64).min(b);
        let (sp, dp) = (long(&g.src_pos, device), long(&g.dst_pos, device));
        let (usp, rel_idx) = (long(&g.uni_src_pos, device), long(&g.rels, device));
        let mut s = rows(leaves, g.src_type).index_select(0, &sp);
        let mut uni_s = rows(leaves, g.src_type).index_select(0, &usp);
        if let Some((on_edges, on_uniform)) = &g.history {
            let items = rows(leaves, g.dst_type);
            s += on_edges.times(b, items);
            uni_s += on_uniform.times(g.uni_src.len() as i64, items);
        }
        let t = rows(leaves, g.dst_type).index_select(0, &dp);
        let r = leaves.relations.index_select(0, &rel_idx);
        let a = &s + &r;
        let bias = leaves.biases[g.dst_type].as_ref();
        let pos_bias = bias.map(|l| l.index_select(0, &dp));
        let pos = with_bias(
            row_sums(&(&a * &t)),
            pos_bias.as_ref().map(Tensor::shallow_clone),
        );
        let (a_c, t_c, s_c) = (chunked(&a, chunk), chunked(&t, chunk), chunked(&s, chunk));
        Forward {
            sp,
            dp,
            usp,
            rel_idx,
            b,
            chunk,
            s,
            uni_s,
            t,
            r,
            a,
            bias,
            pos_bias,
            pos,
            a_c,
            t_c,
            s_c,
        }
    }

    /// Target-side candidates: every row of the type, or in-batch and uniform.
    fn target_side(
        &self,
        g: &Group,
        leaves: &Leaves,
        p: &TrainParams,
        device: Device,
        weight: f64,
    ) -> Side<Candidates> {
        let (a, bias, b, chunk) = (&self.a, self.bias, self.b, self.chunk);
        let (with, (value, g_pos, grads)) = match &g.all_dst_pos {
            Some(all) => {
                let idx = long(all, device);
                let c = rows(leaves, g.dst_type).index_select(0, &idx);
                let scores = with_bias(
                    a.mm(&c.tr()),
                    bias.map(|l| l.index_select(0, &idx).unsqueeze(0)),
                );
                let valid = all_targets_mask(&g.dst, &g.src, &g.rels, all.len() as i64);
                let side =
                    loss_and_gradients(p.loss, &self.pos, &[(scores, &valid.to_device(device))]);
                (Candidates::All(idx, c), scaled(side, weight))
            }
            None => {
                let idx = long(&g.uni_dst_pos, device);
                let u = rows(leaves, g.dst_type).index_select(0, &idx);
                let in_batch = with_bias(
                    unchunked(&self.a_c.bmm(&self.t_c.transpose(1, 2)), b),
                    (self.pos_bias.as_ref()).map(|x| in_batch_columns(x, chunk, b)),
                );
                let uniform = with_bias(
                    a.mm(&u.tr()),
                    bias.map(|l| l.index_select(0, &idx).unsqueeze(0)),
                );
                let ids = SideIds {
                    own: &g.dst,
                    other: &g.src,
                    rels: &g.rels,
                    uniform: &g.uni_dst,
                };
                let side = sampled_side(p, &self.pos, in_batch, uniform, &ids, chunk, weight);
                (Candidates::Sampled(idx, u), side)
            }
        };
        Side {
            value,
            g_pos,
            g: grads,
            with,
        }
    }

    /// Source side: against `q = e_t + h_r` with reverse relations, else `(c + e_r)·e_t`.
    fn source_side(
        &self,
        g: &Group,
        leaves: &Leaves,
        p: &TrainParams,
        weight: f64,
    ) -> Side<Option<Tensor>> {
        let (t, s, b, chunk) = (&self.t, &self.s, self.b, self.chunk);
        let q = (leaves.reverse.as_ref()).map(|rev| t + rev.index_select(0, &self.rel_idx));
        let own_bias = self.pos_bias.as_ref().map(|x| x.unsqueeze(1));
        let (src_pos, src_in_batch, src_uniform) = match &q {
            Some(q) => (
                with_bias(
                    row_sums(&(q * s)),
                    self.pos_bias.as_ref().map(Tensor::shallow_clone),
                ),
                unchunked(&chunked(q, chunk).bmm(&self.s_c.transpose(1, 2)), b),
                q.mm(&self.uni_s.tr()),
            ),
            None => {
                let rt = row_sums(&(&self.r * t)).unsqueeze(1);
                (
                    self.pos.shallow_clone(),
                    unchunked(&self.t_c.bmm(&self.s_c.transpose(1, 2)), b) + &rt,
                    t.mm(&self.uni_s.tr()) + rt,
                )
            }
        };
        let src_in_batch = with_bias(src_in_batch, own_bias.as_ref().map(Tensor::shallow_clone));
        let src_uniform = with_bias(src_uniform, own_bias);
        let ids = SideIds {
            own: &g.src,
            other: &g.dst,
            rels: &g.rels,
            uniform: &g.uni_src,
        };
        let (value, g_pos, grads) =
            sampled_side(p, &src_pos, src_in_batch, src_uniform, &ids, chunk, weight);
        Side {
            value,
            g_pos,
            g: grads,
            with: q,
        }
    }

    /// Every gradient of both sides (already scaled by the group's weight) back through the
    /// scores and gathers, into the unique rows, relations and biases.
    fn backward(
        self,
        g: &Group,
        leaves: &Leaves,
        grads: &mut Grads,
        dst: Side<Candidates>,
        src: Side<Option<Tensor>>,
    ) {
        let Forward {
            sp,
            dp,
            usp,
            rel_idx,
            b,
            chunk,
            s,
            uni_s,
            t,
            r,
            a,
            a_c,
            t_c,
            s_c,
            ..
        } = self;
        let q = src.with;
        let (src_g_in, src_g_uni, src_g_pos) = (&src.g[0], &src.g[1], src.g_pos);

        // Target side: pos = a·t, candidates' scores a·cᵀ. Without reverse relations the source
        // side's positive score is `pos` itself, so its gradient joins the target side's here.
        let pos_g = match &q {
            Some(_) => dst.g_pos,
            None => dst.g_pos + &src_g_pos,
        };
        let mut grad_a = &t * pos_g.unsqueeze(1);
        let mut grad_t = &a * pos_g.unsqueeze(1);
        let mut grad_pos_bias = pos_g;
        match &dst.with {
            Candidates::All(idx, c) => {
                let (table, g0) = (g.dst_type, &dst.g[0]);
                candidates_backward(grads, leaves, table, idx, c, &a, g0, &mut grad_a);
            }
            Candidates::Sampled(idx, u) => {
                in_batch_backward_into(&dst.g[0], &a_c, &t_c, &mut grad_a, &mut grad_t, b);
                let (table, g1) = (g.dst_type, &dst.g[1]);
                candidates_backward(grads, leaves, table, idx, u, &a, g1, &mut grad_a);
                grad_pos_bias += in_batch_column_sums(&dst.g[0], chunk, b);
            }
        }
        // (Two tensors: each is added to in place below.)
        let mut grad_s = grad_a.copy();
        let mut grad_r = grad_a;

        // Source side: candidates `s_c` and `uni_s` against the query `q` (or `t`).
        let query = q.as_ref().unwrap_or(&t);
        let own_bias_grad = row_sums(src_g_in) + row_sums(src_g_uni);
        grad_pos_bias += &own_bias_grad;
        let mut grad_query = match &q {
            Some(_) => &s * src_g_pos.unsqueeze(1),
            // The relation term `r·t`, the same for every candidate source, carries the
            // candidates' row sums.
            None => &r * own_bias_grad.unsqueeze(1),
        };
        let query_c = chunked(query, chunk);
        in_batch_backward_into(src_g_in, &query_c, &s_c, &mut grad_query, &mut grad_s, b);
        let _ = grad_query.addmm_(src_g_uni, &uni_s);
        let grad_uni_s = src_g_uni.tr().mm(query);
        match &q {
            Some(q) => {
                let _ = grad_s.addcmul_(q, &src_g_pos.unsqueeze(1));
                grad_pos_bias += &src_g_pos;
                let rev = grads.reverse.as_mut().expect("reverse relations");
                let _ = rev.index_add_(0, &rel_idx, &grad_query);
            }
            None => {
                let _ = grad_r.addcmul_(&t, &own_bias_grad.unsqueeze(1));
            }
        }
        grad_t += grad_query;

        // Into the unique rows: gathers' backward, the history's, relations and biases.
        grads.rows_add(g.src_type, &sp, &grad_s);
        grads.rows_add(g.src_type, &usp, &grad_uni_s);
        grads.rows_add(g.dst_type, &dp, &grad_t);
        if let Some((on_edges, on_uniform)) = &g.history {
            let items = grads.rows[g.dst_type].as_mut().expect("rows added");
            on_edges.add_transposed(&grad_s, items);
            on_uniform.add_transposed(&grad_uni_s, items);
        }
        let _ = grads.relations.index_add_(0, &rel_idx, &grad_r);
        grads.bias_add(leaves, g.dst_type, &dp, &grad_pos_bias);
    }
}
