//! Scores: translation, then comparison (docs/architecture.md §4). Pure functions of tensors; the parameters
//! live in [`crate::train`], and losses ([`crate::train`]) only consume what these produce.
//!
//! The source is translated by the relation, `a = e_s + e_r`, then compared with the target:
//!
//! | comparator | score |
//! |------------|-------|
//! | `dot` (TwHIN, default) | `a · e_t` |
//! | `l2` (TransE)          | `−‖a − e_t‖` |
//! | `l1` (TransE, L1 norm) | `−‖a − e_t‖₁` |
//! | `cos`                  | `cos(a, e_t)` |
//!
//! Scoring many candidates at once is one matrix product (plus row norms), for targets
//! ([`score_targets`]) and for corrupted sources ([`score_sources`]), so negatives cost a GEMM
//! rather than a `[B, N, D]` broadcast. `l1` has no such identity and uses `cdist` (a
//! `[B, N, D]`-sized computation): it suits small knowledge graphs, not large streams. Both accept leading batch dimensions (`[C, B, D]` against
//! `[C, N, D]`), which scores every chunk of a batch with one batched product.

use tch::{Kind, Tensor};

use crate::config::Comparator;

/// Floor under squared distances and norms: keeps `sqrt` and divisions differentiable at 0.
const EPS: f64 = 1e-12;

/// `e_s + e_r`, row by row.
pub fn translate(src: &Tensor, rel: &Tensor) -> Tensor {
    src + rel
}

/// Score of each positive pair: `translated [B, D]`, `dst [B, D]` → `[B]`.
pub(crate) fn score_pairs(cmp: Comparator, translated: &Tensor, dst: &Tensor) -> Tensor {
    match cmp {
        Comparator::Dot => (translated * dst).sum_dim_intlist(1, false, Kind::Float),
        Comparator::L2 => -(translated - dst)
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            .clamp_min(EPS)
            .sqrt(),
        Comparator::L1 => -(translated - dst)
            .abs()
            .sum_dim_intlist(1, false, Kind::Float),
        Comparator::Cos => {
            let num = (translated * dst).sum_dim_intlist(1, false, Kind::Float);
            num / (sq_norms(translated).clamp_min(EPS).sqrt() * sq_norms(dst).clamp_min(EPS).sqrt())
        }
    }
}

/// Score every translated source against every candidate target:
/// `translated [.., B, D]`, `candidates [.., N, D]` → `[.., B, N]`.
pub fn score_targets(cmp: Comparator, translated: &Tensor, candidates: &Tensor) -> Tensor {
    let dots = || translated.matmul(&candidates.transpose(-2, -1));
    match cmp {
        Comparator::Dot => dots(),
        Comparator::L2 => neg_distance(&dots(), &sq_norms(translated), &sq_norms(candidates)),
        Comparator::L1 => -Tensor::cdist(translated, candidates, 1.0, None::<i64>),
        Comparator::Cos => {
            let a = sq_norms(translated).clamp_min(EPS).sqrt().unsqueeze(-1);
            let c = sq_norms(candidates).clamp_min(EPS).sqrt().unsqueeze(-2);
            dots() / (a * c)
        }
    }
}

/// Score every candidate source against each positive's relation and target:
/// `candidates [.., N, D]`, `rel [.., B, D]`, `dst [.., B, D]` → `[.., B, N]`, entry `(b, n)`
/// being `score(e_cand_n + e_rel_b, e_dst_b)`.
pub(crate) fn score_sources(
    cmp: Comparator,
    candidates: &Tensor,
    rel: &Tensor,
    dst: &Tensor,
) -> Tensor {
    let cand_t = candidates.transpose(-2, -1);
    match cmp {
        // ‖c + r − t‖₁ = ‖c − q‖₁ with q = t − r
        Comparator::L1 => -Tensor::cdist(&(dst - rel), candidates, 1.0, None::<i64>),
        // (c + r)·t = c·t + r·t
        Comparator::Dot => dst.matmul(&cand_t) + row_dots(rel, dst).unsqueeze(-1),
        // ‖c + r − t‖ = ‖c − q‖ with q = t − r
        Comparator::L2 => {
            let q = dst - rel;
            let dots = q.matmul(&cand_t);
            neg_distance(&dots, &sq_norms(&q), &sq_norms(candidates))
        }
        // cos(c + r, t) = (c·t + r·t) / (‖c + r‖ ‖t‖), ‖c + r‖² = ‖c‖² + 2 c·r + ‖r‖²
        Comparator::Cos => {
            let num = dst.matmul(&cand_t) + row_dots(rel, dst).unsqueeze(-1);
            let cr = rel.matmul(&cand_t);
            let sum_sq =
                sq_norms(candidates).unsqueeze(-2) + cr * 2.0 + sq_norms(rel).unsqueeze(-1);
            num / (sum_sq.clamp_min(EPS).sqrt() * sq_norms(dst).clamp_min(EPS).sqrt().unsqueeze(-1))
        }
    }
}

fn row_dots(a: &Tensor, b: &Tensor) -> Tensor {
    (a * b).sum_dim_intlist(-1, false, Kind::Float)
}

fn sq_norms(x: &Tensor) -> Tensor {
    x.square().sum_dim_intlist(-1, false, Kind::Float)
}

/// `−sqrt(‖a‖² + ‖c‖² − 2 a·c)` from the products already computed.
fn neg_distance(dots: &Tensor, a_sq: &Tensor, c_sq: &Tensor) -> Tensor {
    -(a_sq.unsqueeze(-1) + c_sq.unsqueeze(-2) - dots * 2.0)
        .clamp_min(EPS)
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len() as i64;
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).reshape([rows.len() as i64, d])
    }

    fn values(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(x.reshape([-1])).unwrap()
    }

    fn close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    }

    // s = (1, 2), r = (0.5, -1) → a = (1.5, 1); t = (2, 0).
    fn fixture() -> (Tensor, Tensor, Tensor) {
        (t(&[&[1.0, 2.0]]), t(&[&[0.5, -1.0]]), t(&[&[2.0, 0.0]]))
    }

    #[test]
    fn golden_pair_scores() {
        let (s, r, d) = fixture();
        let a = translate(&s, &r);
        close(&values(&score_pairs(Comparator::Dot, &a, &d)), &[3.0]);
        // ‖(1.5, 1) − (2, 0)‖ = ‖(−0.5, 1)‖ = √1.25
        close(
            &values(&score_pairs(Comparator::L2, &a, &d)),
            &[-(1.25f32).sqrt()],
        );
        // |−0.5| + |1|
        close(&values(&score_pairs(Comparator::L1, &a, &d)), &[-1.5]);
        // 3 / (√3.25 · 2)
        close(
            &values(&score_pairs(Comparator::Cos, &a, &d)),
            &[3.0 / ((3.25f32).sqrt() * 2.0)],
        );
    }

    #[test]
    fn matrix_forms_agree_with_pairwise_scores() {
        tch::manual_seed(3);
        let (b, n, dim) = (4, 5, 3);
        let src = Tensor::randn([b, dim], (Kind::Float, tch::Device::Cpu));
        let rel = Tensor::randn([b, dim], (Kind::Float, tch::Device::Cpu));
        let dst = Tensor::randn([b, dim], (Kind::Float, tch::Device::Cpu));
        let cand = Tensor::randn([n, dim], (Kind::Float, tch::Device::Cpu));
        for cmp in [
            Comparator::Dot,
            Comparator::L2,
            Comparator::L1,
            Comparator::Cos,
        ] {
            let a = translate(&src, &rel);
            let targets = score_targets(cmp, &a, &cand);
            let sources = score_sources(cmp, &cand, &rel, &dst);
            assert_eq!(targets.size(), vec![b, n]);
            assert_eq!(sources.size(), vec![b, n]);
            for i in 0..b {
                for j in 0..n {
                    let c = cand.get(j).unsqueeze(0);
                    let want_t = score_pairs(cmp, &a.get(i).unsqueeze(0), &c).double_value(&[0]);
                    let want_s = score_pairs(
                        cmp,
                        &translate(&c, &rel.get(i).unsqueeze(0)),
                        &dst.get(i).unsqueeze(0),
                    )
                    .double_value(&[0]);
                    assert!(
                        (targets.double_value(&[i, j]) - want_t).abs() < 1e-4,
                        "{cmp:?} targets"
                    );
                    assert!(
                        (sources.double_value(&[i, j]) - want_s).abs() < 1e-4,
                        "{cmp:?} sources"
                    );
                }
            }
        }
    }

    #[test]
    fn batched_chunks_agree_with_separate_products() {
        tch::manual_seed(4);
        let opts = (Kind::Float, tch::Device::Cpu);
        let (a, r, t, c) = (
            Tensor::randn([3, 4, 5], opts),
            Tensor::randn([3, 4, 5], opts),
            Tensor::randn([3, 4, 5], opts),
            Tensor::randn([3, 6, 5], opts),
        );
        for cmp in [
            Comparator::Dot,
            Comparator::L2,
            Comparator::L1,
            Comparator::Cos,
        ] {
            let tb = score_targets(cmp, &a, &c);
            let sb = score_sources(cmp, &c, &r, &t);
            for k in 0..3 {
                let ts = score_targets(cmp, &a.get(k), &c.get(k));
                let ss = score_sources(cmp, &c.get(k), &r.get(k), &t.get(k));
                assert!(tb.get(k).allclose(&ts, 1e-5, 1e-5, false), "{cmp:?}");
                assert!(sb.get(k).allclose(&ss, 1e-5, 1e-5, false), "{cmp:?}");
            }
        }
    }

    #[test]
    fn l2_is_differentiable_at_zero_distance() {
        let a = t(&[&[1.0, 1.0]]).set_requires_grad(true);
        let s = score_pairs(Comparator::L2, &a, &t(&[&[1.0, 1.0]]));
        s.sum(Kind::Float).backward();
        assert!(values(&a.grad()).iter().all(|g| g.is_finite()));
    }
}
