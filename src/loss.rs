//! Losses over scores (DESIGN §4). They only consume scores from [`crate::score`].
//!
//! `pos [B]` holds each positive's score, `neg [B, K]` its negatives' scores and `valid [B, K]`
//! (bool) which negatives count: accidental positives and a positive's own slot are masked out.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Logistic, positives and negatives balanced: each valid negative weighs 1/(its row's count).
    Logistic,
    /// Softmax cross-entropy of each positive against its valid negatives.
    Softmax,
}

/// Mean loss over the batch.
pub fn loss(kind: LossKind, pos: &Tensor, neg: &Tensor, valid: &Tensor) -> Tensor {
    match kind {
        LossKind::Logistic => {
            let pos_term = -pos.log_sigmoid();
            let weights = valid.to_kind(Kind::Float);
            let count = weights
                .sum_dim_intlist(1, false, Kind::Float)
                .clamp_min(1.0);
            let neg_term =
                (-(-neg).log_sigmoid() * &weights).sum_dim_intlist(1, false, Kind::Float) / count;
            (pos_term + neg_term).mean(Kind::Float)
        }
        LossKind::Softmax => {
            let masked = neg.masked_fill(&valid.logical_not(), f64::NEG_INFINITY);
            let logits = Tensor::cat(&[pos.unsqueeze(1), masked], 1);
            (-logits.log_softmax(1, Kind::Float).select(1, 0)).mean(Kind::Float)
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
