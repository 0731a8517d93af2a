//! The plain classifier the measurements fit on a version's rows, and what it is scored by: a
//! logistic regression on standardised features, fitted once and frozen, so that what changes
//! between versions is the rows it reads, not the model.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Kind, Tensor};

use twhin_stream::store::GraphStore;

use crate::movielens::type_index;

/// The classifier's L2 penalty: a few hundred nodes in 128 dimensions overfit without it.
const L2_PENALTY: f64 = 0.1;

/// A logistic regression on standardised features, fitted by full-batch gradient descent with an
/// L2 penalty. Pure: tensors in, tensors out, deterministic for the same input.
pub struct LogisticRegression {
    mean: Tensor,
    std: Tensor,
    w: Tensor,
    b: f64,
}

impl LogisticRegression {
    /// Fit on `x [N, D]` and labels `y [N]` (0/1 floats).
    pub fn fit(x: &Tensor, y: &Tensor, l2: f64, iterations: usize, lr: f64) -> LogisticRegression {
        tch::no_grad(|| {
            let x = x.to_kind(Kind::Double);
            let y = y.to_kind(Kind::Double);
            let mean = x.mean_dim(0, false, Kind::Double);
            let std = x.std_dim(0, false, false).clamp_min(1e-8);
            let z = (&x - &mean) / &std;
            let n = z.size()[0] as f64;
            let mut w = Tensor::zeros([z.size()[1]], (Kind::Double, x.device()));
            let mut b = 0.0f64;
            for _ in 0..iterations {
                let p = (z.mv(&w) + b).sigmoid();
                let err = &p - &y;
                let grad_w = z.transpose(0, 1).mv(&err) / n + &w * l2;
                let grad_b = err.mean(Kind::Double).double_value(&[]);
                w -= grad_w * lr;
                b -= grad_b * lr;
            }
            LogisticRegression { mean, std, w, b }
        })
    }

    /// Predicted labels (0/1) of `x [N, D]`.
    pub fn predict(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.logits(x).gt(0.0).to_kind(Kind::Double))
    }

    /// Predicted probabilities of label 1 for `x [N, D]`.
    pub fn probabilities(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.logits(x).sigmoid())
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        let z = (x.to_kind(Kind::Double) - &self.mean) / &self.std;
        z.mv(&self.w) + self.b
    }
}

/// `(accuracy, balanced accuracy)` of predictions against labels (both 0/1, `[N]`).
pub fn accuracies(predicted: &Tensor, y: &Tensor) -> (f64, f64) {
    let y = y.to_kind(Kind::Double);
    let right = predicted.eq_tensor(&y).to_kind(Kind::Double);
    let accuracy = right.mean(Kind::Double).double_value(&[]);
    let recall = |class: f64| {
        let mask = y.eq(class).to_kind(Kind::Double);
        let n = mask.sum(Kind::Double).double_value(&[]);
        (n > 0.0).then(|| (&right * &mask).sum(Kind::Double).double_value(&[]) / n)
    };
    let recalls: Vec<f64> = [0.0, 1.0].into_iter().filter_map(recall).collect();
    let balanced = recalls.iter().sum::<f64>() / recalls.len().max(1) as f64;
    (accuracy, balanced)
}

/// The classifier fitted at version 1, the table it reads and the held-out `(index, label)`s.
pub type Frozen = (LogisticRegression, usize, Vec<(i64, f64)>);

/// The labelled nodes version 1 covers, split into the classifier's and the held-out ones:
/// `(type id, train [(dense index, label)], held-out [(dense index, label)])`.
type Split = (usize, Vec<(i64, f64)>, Vec<(i64, f64)>);

fn split_labelled(
    store: &GraphStore,
    t: usize,
    rows: i64,
    labelled: &[(String, f64)],
    holdout: f64,
    seed: u64,
) -> anyhow::Result<Split> {
    let mut present = Vec::new();
    for (node, y) in labelled {
        let id = node.split_once(':').map_or(node.as_str(), |(_, id)| id);
        if let Some(i) = store.node_index(t as u16, id)? {
            if (i as i64) < rows {
                present.push((i as i64, *y));
            }
        }
    }
    present.shuffle(&mut SmallRng::seed_from_u64(seed));
    let held = ((present.len() as f64) * holdout).round() as usize;
    let train = present.split_off(held);
    Ok((t, train, present))
}

pub fn features(table: &Tensor, nodes: &[(i64, f64)]) -> (Tensor, Tensor) {
    let idx: Vec<i64> = nodes.iter().map(|(i, _)| *i).collect();
    let y: Vec<f64> = nodes.iter().map(|(_, y)| *y).collect();
    (
        table.index_select(0, &Tensor::from_slice(&idx)),
        Tensor::from_slice(&y),
    )
}

/// The logistic regression fitted once on version 1's rows of the labelled nodes:
/// `(classifier, its fit accuracy, (nodes fitted, nodes held out, majority share))`.
pub fn fit_classifier(
    store: &GraphStore,
    tables: &[Tensor],
    node_type: &str,
    labelled: &[(String, f64)],
    holdout: f64,
    seed: u64,
) -> anyhow::Result<(Frozen, f64, (usize, usize, f64))> {
    let t = type_index(store, node_type)?;
    let (t, train, held) = split_labelled(store, t, tables[t].size()[0], labelled, holdout, seed)?;
    anyhow::ensure!(
        train.len() >= 20 && !held.is_empty(),
        "version 1 covers too few labelled {node_type} nodes ({} to fit, {} held out); raise --first-fraction",
        train.len(),
        held.len()
    );
    let (x, y) = features(&tables[t], &train);
    let model = LogisticRegression::fit(&x, &y, L2_PENALTY, 500, 0.5);
    let fit_accuracy = accuracies(&model.predict(&x), &y).0;
    let positives = held.iter().filter(|(_, y)| *y > 0.5).count() as f64;
    let share = positives / held.len() as f64;
    let info = (train.len(), held.len(), share.max(1.0 - share));
    Ok(((model, t, held), fit_accuracy, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_separates_a_separable_set_and_scores_golden_accuracies() {
        // Label = first coordinate > 0; the second coordinate is noise.
        let x = Tensor::from_slice(&[
            -2.0f32, 0.3, -1.0, -0.7, -0.5, 0.9, 0.5, -0.2, 1.0, 0.4, 2.0, -0.9,
        ])
        .view([6, 2]);
        let y = Tensor::from_slice(&[0.0f64, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let model = LogisticRegression::fit(&x, &y, 1e-3, 300, 0.5);
        let (acc, bal) = accuracies(&model.predict(&x), &y);
        assert_eq!((acc, bal), (1.0, 1.0));
        // A rotation of the inputs by 90 degrees breaks the frozen model (what drift does).
        let turned = x.matmul(&Tensor::from_slice(&[0.0f32, -1.0, 1.0, 0.0]).view([2, 2]));
        let (acc, _) = accuracies(&model.predict(&turned), &y);
        assert!(acc < 0.7, "{acc}");
        // Golden: 2 of 4 right, one per class of 3 + 1.
        let p = Tensor::from_slice(&[1.0f64, 0.0, 0.0, 0.0]);
        let t = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 0.0]);
        let (acc, bal) = accuracies(&p, &t);
        assert_eq!(acc, 0.5);
        assert!((bal - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
    }
}
