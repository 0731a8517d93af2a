//! What the model answers for one `(source, relation)`: the score of every node of the target
//! type, with exactly the score the step trains and a version publishes (docs/architecture.md §4). Used by the
//! stream evaluation; prequential ranks ([`crate::train::target_ranks`]) rank with the same score.

use tch::{Device, Kind, Tensor};

use crate::train::{score_targets, translate, Comparator, Embeddings};

/// One query: the source's type and row (`None`: the source has no row yet, so it is scored as
/// a zero row), the relation, and the source's recent targets (rows of the target type) when it
/// is of a history type ([`crate::train::History`]; empty otherwise).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SourceQuery {
    pub src_type: usize,
    pub src: Option<i64>,
    pub rel: i64,
    pub history: Vec<(i64, f32)>,
}

/// Scores of every row of `dst_type` for each query (with the target bias when `dst_type`
/// carries one), on the CPU: `[b, rows + 1]`, the last
/// column being the score of a target without a row (a zero row), so a caller ranking over
/// nodes the model has not seen yet scores them as the model would.
pub(crate) fn all_target_scores(
    model: &Embeddings,
    cmp: Comparator,
    queries: &[SourceQuery],
    dst_type: usize,
) -> Tensor {
    let device = model.device;
    tch::no_grad(|| {
        let zero = Tensor::zeros([model.dim], (Kind::Float, device));
        let targets = model.tables[dst_type].rows();
        let src: Vec<Tensor> = queries
            .iter()
            .map(|q| {
                let row = match q.src {
                    Some(i) if i < model.tables[q.src_type].len() => {
                        model.tables[q.src_type].weights.get(i)
                    }
                    _ => zero.shallow_clone(),
                };
                crate::train::compose(&row, &targets, &q.history)
            })
            .collect();
        let rels: Vec<i64> = queries.iter().map(|q| q.rel).collect();
        let rel = model
            .relations
            .index_select(0, &Tensor::from_slice(&rels).to_device(device));
        let a = translate(&Tensor::stack(&src, 0), &rel);
        let candidates = Tensor::cat(&[model.tables[dst_type].rows(), zero.unsqueeze(0)], 0);
        let scores = score_targets(cmp, &a, &candidates);
        let scores = match model.target_bias(dst_type) {
            // A target without a row has no bias yet: 0.
            Some(b) => scores + Tensor::cat(&[b, zero.narrow(0, 0, 1)], 0).unsqueeze(0),
            None => scores,
        };
        scores.to_device(Device::Cpu)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_scores_with_a_rowless_source_and_target() {
        let mut model = Embeddings::new(2, 1, 2, 0.0, Device::Cpu);
        model
            .relations
            .copy_(&Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]));
        model.tables[0].grow(1, |_| Tensor::from_slice(&[0.0f32, 1.0]).view([1, 2]));
        model.tables[1].grow(2, |_| {
            Tensor::from_slice(&[2.0f32, 3.0, -1.0, 1.0]).view([2, 2])
        });
        let q = |src, history| SourceQuery {
            src_type: 0,
            src,
            rel: 0,
            history,
        };
        let queries = [
            q(Some(0), vec![]),
            q(None, vec![]),
            q(None, vec![(0, 1.0), (1, 1.0)]),
        ];
        let s = all_target_scores(&model, Comparator::Dot, &queries, 1);
        let got = Vec::<f32>::try_from(s.reshape([-1])).unwrap();
        // (0,1)+(1,0) = (1,1): 5, 0, and 0 for a rowless target; the rowless source is (1,0).
        // With the history {0, 1}: (1,0) + ((2,3) + (-1,1)) / √2.
        let h = 1.0 / 2f32.sqrt();
        let a = [1.0 + h, 4.0 * h];
        let want3 = [2.0 * a[0] + 3.0 * a[1], -a[0] + a[1], 0.0];
        assert_eq!(&got[..6], &[5.0, 0.0, 0.0, 2.0, -1.0, 0.0]);
        for (g, w) in got[6..].iter().zip(want3) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        // With target biases (0.5, -2): added to each row's score; a rowless target has none.
        model.tables[1].biased = true;
        model.tables[1]
            .biases()
            .copy_(&Tensor::from_slice(&[0.5f32, -2.0]));
        let s = all_target_scores(&model, Comparator::Dot, &queries[..1], 1);
        let got = Vec::<f32>::try_from(s.reshape([-1])).unwrap();
        assert_eq!(got, vec![5.5, -2.0, 0.0]);
    }
}
