//! Drift measures and the Procrustes alignment (docs/architecture.md §5), as pure functions of two row-aligned
//! tables: `current [N, D]` (the parameters now) and `reference [N, D]` (a published version or
//! the anchor), row `i` of both being the same node. The alignment actor owns the state; these
//! only compute.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How far `current` moved from `reference`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// Mean over rows of the cosine distance `1 − cos(current_i, reference_i)`.
    pub cosine_mean: f64,
    /// Its 99th percentile.
    pub cosine_p99: f64,
    /// `‖current − reference‖_F / ‖reference‖_F`.
    pub relative_l2: f64,
    /// Mean share of each sampled row's 10 nearest rows (by cosine) that are the same in both.
    pub knn_overlap: f64,
    pub rows: i64,
}

const EPS: f64 = 1e-12;

fn unit_rows(x: &Tensor) -> Tensor {
    let norms = x
        .square()
        .sum_dim_intlist(1, true, Kind::Float)
        .clamp_min(EPS)
        .sqrt();
    x / norms
}

/// Cosine distance of each row pair, `[N]`.
pub(super) fn cosine_distances(current: &Tensor, reference: &Tensor) -> Tensor {
    let cos = (unit_rows(current) * unit_rows(reference)).sum_dim_intlist(1, false, Kind::Float);
    1.0 - cos
}

/// `‖current − reference‖_F / ‖reference‖_F`.
pub(crate) fn relative_l2(current: &Tensor, reference: &Tensor) -> f64 {
    let num = (current - reference).square().sum(Kind::Double).sqrt();
    let den = reference.square().sum(Kind::Double).sqrt().clamp_min(EPS);
    (num / den).double_value(&[])
}

/// Mean overlap of the `k` nearest rows (cosine, the row itself excluded) of each row in
/// `sample` (indices), between the two tables.
pub(super) fn knn_overlap(current: &Tensor, reference: &Tensor, sample: &Tensor, k: i64) -> f64 {
    let n = current.size()[0];
    let k = k.min(n - 1);
    if k <= 0 || sample.numel() == 0 {
        return 1.0;
    }
    let top = |x: &Tensor| {
        let u = unit_rows(x);
        let sims = u.index_select(0, sample).matmul(&u.transpose(0, 1));
        // Exclude each sampled row itself.
        let sims = sims.scatter_value(1, &sample.unsqueeze(1), f64::NEG_INFINITY);
        sims.topk(k, 1, true, false).1
    };
    let (a, b) = (top(current), top(reference));
    // |A_i ∩ B_i| for each row: compare every pair of the two top-k lists.
    let same = a.unsqueeze(2).eq_tensor(&b.unsqueeze(1));
    let hits = same.sum(Kind::Double).double_value(&[]);
    hits / (sample.size()[0] * k) as f64
}

/// Every drift measure at once (`sample`: rows for the neighbour overlap).
pub fn drift(current: &Tensor, reference: &Tensor, sample: &Tensor) -> Drift {
    tch::no_grad(|| {
        let cos = cosine_distances(current, reference).to_kind(Kind::Double);
        let rows = cos.size()[0];
        let (cosine_mean, cosine_p99) = if rows == 0 {
            (0.0, 0.0)
        } else {
            (
                cos.mean(Kind::Double).double_value(&[]),
                cos.quantile_scalar(0.99, None, false, "linear")
                    .double_value(&[]),
            )
        };
        Drift {
            cosine_mean,
            cosine_p99,
            relative_l2: relative_l2(current, reference),
            knn_overlap: knn_overlap(current, reference, sample, 10),
            rows,
        }
    })
}

/// The orthogonal `R [D, D]` minimising `‖current · R − anchor‖_F` (orthogonal Procrustes:
/// `R = U Vᵀ` for `currentᵀ · anchor = U Σ Vᵀ`), and the relative residual
/// `‖current · R − anchor‖_F / ‖anchor‖_F`.
pub fn procrustes(current: &Tensor, anchor: &Tensor) -> (Tensor, f64) {
    tch::no_grad(|| {
        let m = current
            .to_kind(Kind::Double)
            .transpose(0, 1)
            .matmul(&anchor.to_kind(Kind::Double));
        let (u, _s, v) = m.svd(true, true);
        let r = u.matmul(&v.transpose(0, 1)).to_kind(current.kind());
        let residual = relative_l2(&current.matmul(&r), anchor);
        (r, residual)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn opts() -> (Kind, Device) {
        (Kind::Float, Device::Cpu)
    }

    #[test]
    fn golden_drift_of_small_tables() {
        // Row 0 unchanged, row 1 turned by 90°, row 2 scaled ×2 (same direction).
        let reference = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).view([3, 2]);
        let current = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0, 2.0, 2.0]).view([3, 2]);
        let d = Vec::<f32>::try_from(cosine_distances(&current, &reference)).unwrap();
        assert!((d[0]).abs() < 1e-6 && (d[1] - 1.0).abs() < 1e-6 && d[2].abs() < 1e-6);
        // ‖(0,0),(1,−1),(1,1)‖ = 2; ‖reference‖ = √4 = 2.
        assert!((relative_l2(&current, &reference) - 1.0).abs() < 1e-9);
        let all = drift(&current, &reference, &Tensor::from_slice(&[0i64, 1, 2]));
        assert!((all.cosine_mean - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(all.rows, 3);
    }

    #[test]
    fn identical_tables_have_no_drift_and_full_overlap() {
        tch::manual_seed(7);
        let x = Tensor::randn([50, 8], opts());
        let d = drift(
            &x,
            &x.copy(),
            &Tensor::arange(20, (Kind::Int64, Device::Cpu)),
        );
        assert!(d.cosine_mean.abs() < 1e-6 && d.cosine_p99.abs() < 1e-5);
        assert_eq!(d.relative_l2, 0.0);
        assert!((d.knn_overlap - 1.0).abs() < 1e-12);
    }

    #[test]
    fn neighbour_overlap_drops_when_rows_are_shuffled() {
        tch::manual_seed(8);
        let x = Tensor::randn([60, 8], opts());
        let shuffled = x.index_select(0, &Tensor::randperm(60, (Kind::Int64, Device::Cpu)));
        let sample = Tensor::arange(30, (Kind::Int64, Device::Cpu));
        assert!(knn_overlap(&x, &shuffled, &sample, 10) < 0.5);
    }

    #[test]
    fn procrustes_recovers_a_known_rotation() {
        tch::manual_seed(9);
        let anchor = Tensor::randn([200, 6], opts());
        // A random orthogonal matrix Q (QR of a Gaussian); current = anchor · Qᵀ, so R = Q.
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([6, 6], (Kind::Double, Device::Cpu)),
            "reduced",
        );
        let q = q.to_kind(Kind::Float);
        let current = anchor.matmul(&q.transpose(0, 1));
        assert!(
            drift(
                &current,
                &anchor,
                &Tensor::arange(10, (Kind::Int64, Device::Cpu))
            )
            .cosine_mean
                > 0.1
        );
        let (r, residual) = procrustes(&current, &anchor);
        assert!(residual < 1e-5, "residual {residual}");
        assert!(r.allclose(&q, 1e-4, 1e-4, false));
        let aligned = current.matmul(&r);
        assert!(relative_l2(&aligned, &anchor) < 1e-5);
    }
}
