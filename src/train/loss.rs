//! Losses over scores (docs/architecture.md §4). They only consume scores from [`crate::train`].
//!
//! `pos [B]` holds each positive's score, `neg [B, K]` its negatives' scores and `valid [B, K]`
//! (bool) which negatives count: accidental positives and a positive's own slot are masked out.

use tch::{Kind, Tensor};

use crate::config::LossKind;

/// Mean loss over the batch.
pub fn loss(kind: LossKind, pos: &Tensor, neg: &Tensor, valid: &Tensor) -> Tensor {
    loss_parts(kind, pos, &[(neg, valid)])
}

/// [`loss`] with each positive's negatives given in parts (`neg_i [B, K_i]`, `valid_i [B, K_i]`),
/// as if concatenated along the negatives: the trainer's in-batch and uniform negatives come from
/// different products, and concatenating them would copy both (forward and backward).
pub(super) fn loss_parts(kind: LossKind, pos: &Tensor, parts: &[(&Tensor, &Tensor)]) -> Tensor {
    match kind {
        LossKind::Logistic => {
            // −log σ(−x) = softplus(x)
            let mut neg_sum: Option<Tensor> = None;
            let mut count: Option<Tensor> = None;
            for (neg, valid) in parts {
                let weights = valid.to_kind(Kind::Float);
                let part = (neg.softplus() * &weights).sum_dim_intlist(1, false, Kind::Float);
                let n = weights.sum_dim_intlist(1, false, Kind::Float);
                neg_sum = Some(match neg_sum {
                    Some(s) => s + part,
                    None => part,
                });
                count = Some(match count {
                    Some(c) => c + n,
                    None => n,
                });
            }
            let pos_term = (-pos).softplus();
            match (neg_sum, count) {
                (Some(s), Some(c)) => (pos_term + s / c.clamp_min(1.0)).mean(Kind::Float),
                _ => pos_term.mean(Kind::Float),
            }
        }
        LossKind::Softmax => {
            // −log softmax₀ = logsumexp(pos, negatives…) − pos
            let mut terms = vec![pos.unsqueeze(1)];
            for (neg, valid) in parts {
                let masked = neg.masked_fill(&valid.logical_not(), f64::NEG_INFINITY);
                terms.push(masked.logsumexp([1], true));
            }
            (Tensor::cat(&terms, 1).logsumexp([1], false) - pos).mean(Kind::Float)
        }
    }
}

/// [`loss_parts`] with its gradient derived by hand: the value is the loss, and backward gives
/// `pos` and every part's scores exactly the gradient of [`loss_parts`], through one product
/// `Σ x · g` per input (`g` computed without a graph) instead of the loss's own chain of
/// element-wise operations over `[B, K]`, each of them kept for backward (on a softmax over
/// every movie that chain cost more than the score products).
pub(crate) fn loss_parts_fast(
    kind: LossKind,
    pos: &Tensor,
    parts: &[(&Tensor, &Tensor)],
) -> Tensor {
    let (value, grad_pos, grad_parts) = tch::no_grad(|| {
        let pos = pos.detach();
        let parts: Vec<(Tensor, &Tensor)> = parts.iter().map(|(n, v)| (n.detach(), *v)).collect();
        loss_and_gradients(kind, &pos, &parts)
    });
    let mut surrogate = (pos * &grad_pos).sum(Kind::Float);
    for ((neg, _), g) in parts.iter().zip(&grad_parts) {
        surrogate += (*neg * g).sum(Kind::Float);
    }
    &surrogate - surrogate.detach() + value
}

/// The loss of [`loss_parts`] and its gradients with respect to `pos [B]` and each part's
/// scores `[B, K_i]` (zero where not valid), computed without a graph.
pub(crate) fn loss_and_gradients(
    kind: LossKind,
    pos: &Tensor,
    parts: &[(Tensor, &Tensor)],
) -> (Tensor, Tensor, Vec<Tensor>) {
    let b = pos.size()[0].max(1) as f64;
    match kind {
        LossKind::Logistic => {
            let weights: Vec<Tensor> = parts.iter().map(|(_, v)| v.to_kind(Kind::Float)).collect();
            let mut value = (-pos).softplus();
            if !parts.is_empty() {
                let count = weights
                    .iter()
                    .map(|w| w.sum_dim_intlist(1, false, Kind::Float))
                    .reduce(|a, c| a + c)
                    .expect("parts")
                    .clamp_min(1.0);
                let per_row = (&count * b).reciprocal().unsqueeze(1);
                let mut grads = Vec::with_capacity(parts.len());
                let mut neg_sum = Tensor::zeros_like(pos);
                for ((neg, _), w) in parts.iter().zip(&weights) {
                    neg_sum += (neg.softplus() * w).sum_dim_intlist(1, false, Kind::Float);
                    grads.push(neg.sigmoid() * w * &per_row);
                }
                value += neg_sum / count;
                let grad_pos = (-pos).sigmoid() * (-1.0 / b);
                return (value.mean(Kind::Float), grad_pos, grads);
            }
            let grad_pos = (-pos).sigmoid() * (-1.0 / b);
            (value.mean(Kind::Float), grad_pos, Vec::new())
        }
        LossKind::Softmax => {
            let masked: Vec<Tensor> = parts
                .iter()
                .map(|(neg, valid)| neg.masked_fill(&valid.logical_not(), f64::NEG_INFINITY))
                .collect();
            let mut max = pos.shallow_clone();
            for m in &masked {
                if m.size()[1] > 0 {
                    max = max.maximum(&m.amax([1], false));
                }
            }
            let pos_exp = (pos - &max).exp();
            let mut total = pos_exp.copy();
            let mut exps = Vec::with_capacity(masked.len());
            for m in masked {
                let mut e = m - max.unsqueeze(1);
                let _ = e.exp_();
                total += e.sum_dim_intlist(1, false, Kind::Float);
                exps.push(e);
            }
            let value = (total.log() + &max - pos).mean(Kind::Float);
            let scale = (&total * b).reciprocal();
            let grad_pos = &pos_exp * &scale - 1.0 / b;
            let scale = scale.unsqueeze(1);
            for e in &mut exps {
                *e *= &scale;
            }
            (value, grad_pos, exps)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn golden_logistic_balances_and_masks_negatives() {
        let pos = Tensor::from_slice(&[2.0f32, -1.0]);
        let neg = Tensor::from_slice(&[0.5f32, -0.5, 9.0, 1.0, 1.0, 1.0]).reshape([2, 3]);
        // Row 0's third negative is an accidental positive: masked.
        let valid = Tensor::from_slice(&[true, true, false, true, true, true]).reshape([2, 3]);
        let got = loss(LossKind::Logistic, &pos, &neg, &valid).double_value(&[]);
        let row0 = -ln_sigmoid(2.0) - (ln_sigmoid(-0.5) + ln_sigmoid(0.5)) / 2.0;
        let row1 = -ln_sigmoid(-1.0) - ln_sigmoid(-1.0);
        assert!((got - (row0 + row1) / 2.0).abs() < 1e-5, "{got}");
    }

    #[test]
    fn parts_equal_the_concatenation() {
        tch::manual_seed(2);
        let opts = (Kind::Float, tch::Device::Cpu);
        let pos = Tensor::randn([4], opts);
        let (a, b) = (Tensor::randn([4, 3], opts), Tensor::randn([4, 5], opts));
        let (va, vb) = (
            Tensor::rand([4, 3], opts).gt(0.3),
            Tensor::rand([4, 5], opts).gt(0.3),
        );
        for kind in [LossKind::Logistic, LossKind::Softmax] {
            let whole = loss(
                kind,
                &pos,
                &Tensor::cat(&[&a, &b], 1),
                &Tensor::cat(&[&va, &vb], 1),
            );
            let parts = loss_parts(kind, &pos, &[(&a, &va), (&b, &vb)]);
            assert!(whole.allclose(&parts, 1e-5, 1e-6, false), "{kind:?}");
        }
    }

    #[test]
    fn a_row_with_every_negative_masked_has_finite_gradients() {
        let pos = Tensor::from_slice(&[0.5f32, 0.5]).set_requires_grad(true);
        let neg = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .reshape([2, 2])
            .set_requires_grad(true);
        let valid = Tensor::from_slice(&[false, false, true, false]).reshape([2, 2]);
        for kind in [LossKind::Logistic, LossKind::Softmax] {
            loss(kind, &pos, &neg, &valid).backward();
            for g in [pos.grad(), neg.grad()] {
                assert_eq!(g.isfinite().all().int64_value(&[]), 1, "{kind:?}");
            }
            let _ = pos.grad().zero_();
            let _ = neg.grad().zero_();
        }
    }

    /// The hand-derived gradient is autograd's, to float precision, for both losses, with masked
    /// negatives, a row with all of them masked and extreme scores.
    #[test]
    fn the_fast_loss_has_the_value_and_gradients_of_the_plain_one() {
        tch::manual_seed(5);
        let opts = (Kind::Float, tch::Device::Cpu);
        let pos = (Tensor::randn([6], opts) * 3.0).set_requires_grad(true);
        let a = (Tensor::randn([6, 4], opts) * 3.0).set_requires_grad(true);
        let b = (Tensor::randn([6, 7], opts) * 3.0).set_requires_grad(true);
        let va = Tensor::rand([6, 4], opts).gt(0.3);
        let vb = Tensor::rand([6, 7], opts).gt(0.2);
        let _ = va.get(2).fill_(0);
        let _ = vb.get(2).fill_(0);
        let _ = tch::no_grad(|| b.get(4).get(1).fill_(60.0));
        for kind in [LossKind::Logistic, LossKind::Softmax] {
            let mut grads = Vec::new();
            for fast in [false, true] {
                let parts = [(&a, &va), (&b, &vb)];
                let l = if fast {
                    loss_parts_fast(kind, &pos, &parts)
                } else {
                    loss_parts(kind, &pos, &parts)
                };
                l.backward();
                grads.push((
                    l.double_value(&[]),
                    [pos.grad().copy(), a.grad().copy(), b.grad().copy()],
                ));
                for x in [&pos, &a, &b] {
                    let _ = x.grad().zero_();
                }
            }
            let ((plain, g0), (fast, g1)) = (&grads[0], &grads[1]);
            assert!((plain - fast).abs() < 1e-5, "{kind:?}: {plain} vs {fast}");
            for (x, y) in g0.iter().zip(g1) {
                assert!(x.allclose(y, 1e-5, 1e-7, false), "{kind:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn golden_softmax() {
        let pos = Tensor::from_slice(&[1.0f32]);
        let neg = Tensor::from_slice(&[0.0f32, 100.0]).reshape([1, 2]);
        let valid = Tensor::from_slice(&[true, false]).reshape([1, 2]);
        let got = loss(LossKind::Softmax, &pos, &neg, &valid).double_value(&[]);
        let want = -(1f64.exp() / (1f64.exp() + 1.0)).ln();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn gradient_of_logistic_matches_hand_computation() {
        // d/ds [-ln σ(s)] = σ(s) − 1; d/dn [-(1/K) ln σ(−n)] = σ(n)/K
        let pos = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        let neg = Tensor::from_slice(&[0.0f32, 0.0])
            .reshape([1, 2])
            .set_requires_grad(true);
        let valid = Tensor::from_slice(&[true, true]).reshape([1, 2]);
        loss(LossKind::Logistic, &pos, &neg, &valid).backward();
        assert!((pos.grad().double_value(&[0]) + 0.5).abs() < 1e-6);
        assert!((neg.grad().double_value(&[0, 0]) - 0.25).abs() < 1e-6);
    }
}
