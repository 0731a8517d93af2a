//! The logistic loss of one side of a sampled step (docs/architecture.md §4) in one pass over host memory:
//! the masks of accidental positives decided from the ids as each score is read, `softplus` and
//! `σ` from one shared exponential, and each score overwritten by its gradient.
//!
//! Why: on PyTorch-BigGraph's settings a side's scores are `b × (chunk + uniform)` cells
//! (100 per positive), and the tensor form of the same loss ([`super::loss_and_gradients`] over
//! [`super::step`]'s masks) walks them about a dozen times — building three boolean masks, their
//! float copies, `softplus`, `σ`, the weighting — which cost more than the score products
//! themselves. Here each cell is read once and written once, in loops the compiler vectorises.
//!
//! Equal to the tensor form to float precision (tests below); used on CPU, the tensor form on
//! other devices.

/// Who the positives of a side and its uniform candidates are: a candidate is not a negative of
/// positive `i` when it is `i`'s own node (`own`), or, in-batch, when it is another positive
/// sharing `i`'s other end and relation (a true edge), or padding beyond the batch.
pub(super) struct SideIds<'a> {
    pub own: &'a [i64],
    pub other: &'a [i64],
    pub rels: &'a [i64],
    pub uniform: &'a [i64],
}

/// One side's scores: `pos [b]` the positives', `in_batch [b, chunk]` and `uniform [b, k]`
/// (row-major) their candidates', column `j` of `in_batch` being the `j`-th positive of `i`'s
/// chunk.
pub(super) struct SideScores<'a> {
    pub pos: &'a [f32],
    pub in_batch: &'a mut [f32],
    pub uniform: &'a mut [f32],
    pub chunk: usize,
}

/// Logistic loss of one side. Returns the loss — the mean over positives of `softplus(−pos) +
/// mean over valid negatives of softplus(neg)` — and the positives' gradients times `scale`; the
/// candidates' scores are replaced by their gradients times `scale` (zero where not a negative).
pub(super) fn logistic_side(
    side: SideScores<'_>,
    ids: &SideIds<'_>,
    scale: f32,
) -> (f64, Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { logistic_side_avx2(side, ids, scale) };
    }
    logistic_side_portable(side, ids, scale)
}

/// [`logistic_side`] compiled for AVX2, its candidates' cells eight at a time
/// ([`negatives_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn logistic_side_avx2(side: SideScores<'_>, ids: &SideIds<'_>, scale: f32) -> (f64, Vec<f32>) {
    logistic_side_with(side, ids, scale, |scores, valid, per_negative| {
        // SAFETY: this function is only entered on a CPU with AVX2.
        unsafe { negatives_avx2(scores, valid, per_negative) }
    })
}

fn logistic_side_portable(side: SideScores<'_>, ids: &SideIds<'_>, scale: f32) -> (f64, Vec<f32>) {
    logistic_side_with(side, ids, scale, negatives)
}

/// The side's loss with `negatives` summing (and replacing by their gradients) a row of
/// candidates' scores.
#[inline(always)]
fn logistic_side_with(
    side: SideScores<'_>,
    ids: &SideIds<'_>,
    scale: f32,
    negatives: impl Fn(&mut [f32], &[f32], f32) -> f32,
) -> (f64, Vec<f32>) {
    let SideScores {
        pos,
        in_batch,
        uniform,
        chunk,
    } = side;
    let b = pos.len();
    let k = ids.uniform.len();
    debug_assert_eq!(in_batch.len(), b * chunk);
    debug_assert_eq!(uniform.len(), b * k);
    let mut value = 0.0f64;
    let mut grad_pos = Vec::with_capacity(b);
    let (mut valid_in, mut valid_uni) = (vec![0.0f32; chunk], vec![0.0f32; k]);
    for i in 0..b {
        let start = i / chunk * chunk;
        let end = (start + chunk).min(b);
        let (own, other, rel) = (ids.own[i], ids.other[i], ids.rels[i]);
        // Non-short-circuit `&`/`|` and an integer count: branch-free loops that vectorise (a
        // float sum of the marks was a chain of dependent additions).
        let mut count = 0usize;
        let chunk_ids = ids.own[start..end]
            .iter()
            .zip(&ids.other[start..end])
            .zip(&ids.rels[start..end]);
        for (v, ((&o, &x), &r)) in valid_in.iter_mut().zip(chunk_ids) {
            let real = (o != own) & ((x != other) | (r != rel));
            count += real as usize;
            *v = if real { 1.0 } else { 0.0 };
        }
        // Padding beyond the batch (the last chunk's missing positives) is never a negative.
        valid_in[end - start..].fill(0.0);
        for (v, &u) in valid_uni.iter_mut().zip(ids.uniform) {
            let real = u != own;
            count += real as usize;
            *v = if real { 1.0 } else { 0.0 };
        }
        let count = (count as f32).max(1.0);
        let per_negative = scale / (count * b as f32);
        let row = &mut in_batch[i * chunk..(i + 1) * chunk];
        let in_sum = negatives(row, &valid_in, per_negative);
        let row_u = &mut uniform[i * k..(i + 1) * k];
        let uni_sum = negatives(row_u, &valid_uni, per_negative);
        let (softplus_neg, sigmoid) = softplus_and_sigmoid(-pos[i]);
        value += (softplus_neg + (in_sum + uni_sum) / count) as f64;
        grad_pos.push(-sigmoid * scale / b as f32);
    }
    (value / b.max(1) as f64, grad_pos)
}

/// Lanes of the sums in [`negatives`]: a float sum in one accumulator is a chain the compiler
/// may not reorder (so not vectorise); eight accumulators are one vector.
const LANES: usize = 8;

/// Over one row of candidates' scores and their validity (1 or 0): the sum of `softplus` of the
/// valid ones; each score is replaced by its gradient, `σ(score) · valid · per_negative`.
///
/// `Σ softplus(x) = Σ max(x, 0) + ln Π (1 + e^{−|x|})`: one logarithm a lane and block instead
/// of one a score. Each factor is at most 2 and a lane takes 64 of them a block, so its product
/// stays below 2⁶⁴, far inside f32's range.
#[inline(always)]
fn negatives(scores: &mut [f32], valid: &[f32], per_negative: f32) -> f32 {
    const BLOCK: usize = LANES * 64;
    let mut total = 0.0f32;
    for (scores, valid) in scores.chunks_mut(BLOCK).zip(valid.chunks(BLOCK)) {
        let (mut linear, mut product) = ([0.0f32; LANES], [1.0f32; LANES]);
        let mut lane = |x: &mut f32, v: f32, l: usize| {
            negative_lane(x, v, per_negative, &mut linear[l], &mut product[l]);
        };
        let mut xs = scores.chunks_exact_mut(LANES);
        let mut vs = valid.chunks_exact(LANES);
        for (x, v) in (&mut xs).zip(&mut vs) {
            for l in 0..LANES {
                lane(&mut x[l], v[l], l);
            }
        }
        for (l, (x, &v)) in xs
            .into_remainder()
            .iter_mut()
            .zip(vs.remainder())
            .enumerate()
        {
            lane(x, v, l);
        }
        total += linear.iter().sum::<f32>() + ln_of_products(&product, scores.len());
    }
    total
}

/// `Σ ln p` over a block's lane products: the logarithm of their product when the block has at
/// most 120 cells (each factor is at most 2, so the product stays below 2¹²⁰, inside f32's
/// range), else one logarithm a lane. A row of 50 candidates (PyTorch-BigGraph's chunks) then
/// takes one `ln` instead of eight.
#[inline(always)]
fn ln_of_products(products: &[f32; LANES], cells: usize) -> f32 {
    if cells <= 120 {
        products.iter().product::<f32>().ln()
    } else {
        products.iter().map(|p| p.ln()).sum()
    }
}

/// One cell of [`negatives`]: its lane's sums, and the score replaced by its gradient.
#[inline(always)]
fn negative_lane(x: &mut f32, v: f32, per_negative: f32, linear: &mut f32, product: &mut f32) {
    let u = exp_non_positive(-x.abs());
    let inv = 1.0 / (1.0 + u);
    let sigmoid = if *x >= 0.0 { inv } else { u * inv };
    *linear += x.max(0.0) * v;
    *product *= 1.0 + u * v;
    *x = sigmoid * (v * per_negative);
}

/// [`negatives`] in AVX2 registers, the same operations in the same order lane by lane, so the
/// results are bit-identical (a test holds them so).
///
/// Why by hand: written as scalar lanes, the compiler kept `negatives`' accumulators on the stack
/// and ran every cell through scalar instructions (`vmulss`, `vcmpnless`): with the AVX2 copy of
/// the loss at 22% of offline training's profile on PyTorch-BigGraph's settings.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn negatives_avx2(scores: &mut [f32], valid: &[f32], per_negative: f32) -> f32 {
    use std::arch::x86_64::*;
    const BLOCK: usize = LANES * 64;
    let zero = _mm256_setzero_ps();
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let per = _mm256_set1_ps(per_negative);
    let mut total = 0.0f32;
    for (scores, valid) in scores.chunks_mut(BLOCK).zip(valid.chunks(BLOCK)) {
        let (mut linear, mut product) = (zero, one);
        let whole = scores.len() / LANES * LANES;
        for at in (0..whole).step_by(LANES) {
            // SAFETY: `at + LANES <= whole <= len` for both slices (zipped chunks of one size).
            let (x, v) = unsafe {
                (
                    _mm256_loadu_ps(scores.as_ptr().add(at)),
                    _mm256_loadu_ps(valid.as_ptr().add(at)),
                )
            };
            let u = exp_non_positive_avx2(_mm256_or_ps(x, sign)); // −|x|
            let inv = _mm256_div_ps(one, _mm256_add_ps(one, u));
            let non_negative = _mm256_cmp_ps::<_CMP_GE_OQ>(x, zero);
            let sigmoid = _mm256_blendv_ps(_mm256_mul_ps(u, inv), inv, non_negative);
            linear = _mm256_add_ps(linear, _mm256_mul_ps(_mm256_max_ps(x, zero), v));
            product = _mm256_mul_ps(product, _mm256_add_ps(one, _mm256_mul_ps(u, v)));
            let grad = _mm256_mul_ps(sigmoid, _mm256_mul_ps(v, per));
            // SAFETY: as the loads above.
            unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(at), grad) };
        }
        let (mut linear_lanes, mut product_lanes) = ([0.0f32; LANES], [0.0f32; LANES]);
        // SAFETY: each array holds LANES floats.
        unsafe {
            _mm256_storeu_ps(linear_lanes.as_mut_ptr(), linear);
            _mm256_storeu_ps(product_lanes.as_mut_ptr(), product);
        }
        let rest = scores[whole..].iter_mut().zip(&valid[whole..]);
        for (l, (x, &v)) in rest.enumerate() {
            negative_lane(
                x,
                v,
                per_negative,
                &mut linear_lanes[l],
                &mut product_lanes[l],
            );
        }
        total += linear_lanes.iter().sum::<f32>() + ln_of_products(&product_lanes, scores.len());
    }
    total
}

/// [`exp_non_positive`] on eight lanes, operation for operation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_non_positive_avx2(y: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = _mm256_set1_ps;
    let y = _mm256_max_ps(y, set(-87.0));
    let shifted = _mm256_add_ps(_mm256_mul_ps(y, set(std::f32::consts::LOG2_E)), set(ROUND));
    let n = _mm256_sub_ps(shifted, set(ROUND));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(y, _mm256_mul_ps(n, set(LN2_HIGH))),
        _mm256_mul_ps(n, set(LN2_LOW)),
    );
    let mut p = set(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), set(*c));
    }
    let r2 = _mm256_mul_ps(_mm256_mul_ps(p, r), r);
    let e_r = _mm256_add_ps(_mm256_add_ps(r2, r), set(1.0));
    let n_int = _mm256_sub_epi32(
        _mm256_castps_si256(shifted),
        _mm256_set1_epi32(ROUND.to_bits() as i32),
    );
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)));
    _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n))
}

/// `(softplus(x), σ(x))` from one exponential `u = e^{−|x|}`: `softplus(x) = max(x, 0) +
/// ln(1 + u)`, `σ(x) = 1 / (1 + u)` for `x ≥ 0`, `u / (1 + u)` below. Branch-free, so that a loop
/// of it vectorises; within 2e-7 relative of the exact functions.
#[inline(always)]
fn softplus_and_sigmoid(x: f32) -> (f32, f32) {
    let u = exp_non_positive(-x.abs());
    let inv = 1.0 / (1.0 + u);
    let sigmoid = if x >= 0.0 { inv } else { u * inv };
    (x.max(0.0) + ln_1p_unit(u), sigmoid)
}

/// `e^y` for `y ≤ 0` (below −87 it is taken as −87: `e^{−87}` is below every gradient that
/// matters and above f32's smallest normal). Cephes' `expf`: `y = n ln 2 + r`, `|r| ≤ ln 2 / 2`,
/// a degree-6 polynomial for `e^r`, and `2^n` built from its exponent bits; `n` is rounded with
/// the 1.5·2²³ trick, which needs no `floor` (a library call without SSE4.1).
#[inline(always)]
fn exp_non_positive(y: f32) -> f32 {
    let y = y.max(-87.0);
    let shifted = y * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = y - n * LN2_HIGH - n * LN2_LOW;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    e_r * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// 1.5 · 2²³: adding it to a float of magnitude below 2²² rounds it to an integer.
const ROUND: f32 = 12_582_912.0;
/// ln 2 in two parts (Cephes): `n · LN2_HIGH` is exact for the `n` that occur.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `(e^r − 1 − r) / r²`, highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `ln(1 + u)` for `u ∈ [0, 1]`: `2 atanh(t)` with `t = u / (2 + u) ≤ 1/3`, by its series to
/// `t¹³` (the next term is below 2e-8 of the sum).
#[inline(always)]
fn ln_1p_unit(u: f32) -> f32 {
    let t = u / (2.0 + u);
    let t2 = t * t;
    let series = 1.0
        + t2 * (1.0 / 3.0
            + t2 * (1.0 / 5.0
                + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0 + t2 * (1.0 / 11.0 + t2 / 13.0)))));
    2.0 * t * series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_functions_are_the_exact_ones_to_float_precision() {
        for i in -4000..=4000 {
            let x32 = i as f32 / 40.0; // −100 … 100
            let (softplus, sigmoid) = softplus_and_sigmoid(x32);
            let x = x32 as f64;
            let want_sp = x.max(0.0) + (-x.abs()).exp().ln_1p();
            let want_sig = 1.0 / (1.0 + (-x).exp());
            let floor = if x < -87.0 { 1e-37 } else { 0.0 };
            assert!(
                (softplus as f64 - want_sp).abs() <= 2e-7 * want_sp + floor,
                "softplus({x}): {softplus} vs {want_sp}"
            );
            assert!(
                (sigmoid as f64 - want_sig).abs() <= 2e-7 * want_sig + floor,
                "sigmoid({x}): {sigmoid} vs {want_sig}"
            );
        }
    }

    /// The AVX2 copy of a row's loss is the portable one bit for bit, whole vectors and the
    /// remainder lanes, across blocks, with masked cells and extreme scores.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_row_is_the_portable_row_bit_for_bit() {
        // Not skipped without AVX2: a pass would then claim a path that never ran. On such a CPU
        // the AVX2 path is never taken, and `--skip the_avx2_row` is the honest way to say so.
        assert!(
            std::arch::is_x86_feature_detected!("avx2"),
            "this CPU has no AVX2: the path under test cannot run here (--skip the_avx2_row)"
        );
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for n in [0usize, 1, 7, 8, 9, 50, 100, 511, 512, 513, 1500] {
            let scores: Vec<f32> = (0..n)
                .map(|i| match i % 13 {
                    0 => 120.0,
                    1 => -120.0,
                    _ => rng.random_range(-30.0f32..30.0),
                })
                .collect();
            let valid: Vec<f32> = (0..n)
                .map(|_| if rng.random_bool(0.8) { 1.0 } else { 0.0 })
                .collect();
            let (mut a, mut b) = (scores.clone(), scores);
            let sum_portable = negatives(&mut a, &valid, 0.01);
            // SAFETY: AVX2 is present (checked above).
            let sum_avx2 = unsafe { negatives_avx2(&mut b, &valid, 0.01) };
            assert_eq!(sum_portable.to_bits(), sum_avx2.to_bits(), "sum, n = {n}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "gradients, n = {n}");
        }
    }

    /// A row of thousands of candidates (several blocks of products) has the exact loss.
    #[test]
    fn a_long_row_keeps_its_loss_finite_and_exact() {
        let n = 5_000;
        let mut scores: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 8.0 - 6.0).collect();
        let want: f64 = scores.iter().map(|&x| (1.0 + (x as f64).exp()).ln()).sum();
        let got = negatives(&mut scores, &vec![1.0; n], 1.0) as f64;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }

    #[test]
    fn golden_side_masks_accidental_positives_and_own_nodes() {
        // Two positives in one chunk of 2 with the same other end and relation: each other's
        // true edge, so the in-batch cells are all masked; uniform candidate 7 is row 0's own node.
        let pos = [1.0f32, -2.0];
        let mut in_batch = [0.5f32, 0.25, -0.5, 3.0];
        let mut uniform = [0.0f32, 2.0, -1.0, 1.0];
        let ids = SideIds {
            own: &[7, 8],
            other: &[1, 1],
            rels: &[0, 0],
            uniform: &[7, 3],
        };
        let side = SideScores {
            pos: &pos,
            in_batch: &mut in_batch,
            uniform: &mut uniform,
            chunk: 2,
        };
        let (value, grad_pos) = logistic_side(side, &ids, 1.0);
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let row0 = sp(-1.0) + sp(2.0);
        let row1 = sp(2.0) + (sp(-1.0) + sp(1.0)) / 2.0;
        assert!((value - (row0 + row1) / 2.0).abs() < 1e-6, "{value}");
        assert_eq!(in_batch, [0.0; 4]);
        let want = [0.0, sig(2.0) / 2.0, sig(-1.0) / 4.0, sig(1.0) / 4.0];
        for (g, w) in uniform.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{uniform:?} vs {want:?}");
        }
        assert!((grad_pos[0] as f64 + sig(-1.0) / 2.0).abs() < 1e-7);
        assert!((grad_pos[1] as f64 + sig(2.0) / 2.0).abs() < 1e-7);
    }
}
