//! Golden values for one training step.

use super::*;
use crate::config::{Comparator, LossKind};
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
        chunk_size: 64,
        init_scale: 0.1,
        batch_size: 64,
        seed: 1,
        all_targets_up_to: 0,
        history_types: Vec::new(),
        history_recent: 0,
        history_decay: 1.0,
        history_by_relation: false,
        bias_types: Vec::new(),
        reverse_relations: false,
        offline_workers: 1,
    }
}

/// Overwrites every parameter (rows, biases, relations, reverse operators) with uniform draws in
/// `±scale` from a seeded [`SmallRng`]. Tests run on several threads and torch's generator is one
/// per process, so `tch::manual_seed` followed by `randn` gives a test its own values only when
/// no other test draws in between: two models meant to start equal did not, once, in CI.
fn fill_seeded(model: &mut Embeddings, seed: u64, scale: f32) {
    use rand::Rng;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut fill = |t: &Tensor| {
        let values: Vec<f32> = (0..t.numel())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        let drawn = Tensor::from_slice(&values).reshape(t.size());
        let mut target = t.shallow_clone();
        target.copy_(&drawn);
    };
    for t in &model.tables {
        fill(&t.weights.narrow(0, 0, t.len()));
        fill(&t.bias.narrow(0, 0, t.len()));
    }
    fill(&model.relations);
    if let Some(reverse) = &model.reverse {
        fill(&reverse.relations);
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
    // Positives (s=1,r=0,t=10), (s=1,r=0,t=11), (s=2,r=0,t=12), (s=1,r=5,t=13): for row 0,
    // t=11 is a true target (same source and relation); t=13 is not (other relation).
    let m = negative_mask(
        &[10, 11, 12, 13],
        &[1, 1, 2, 1],
        &[0, 0, 0, 5],
        &[10, 99],
        4,
        Device::Cpu,
    );
    let m = Tensor::cat(&[m.0, m.1], 1);
    let got = Vec::<bool>::try_from(m.reshape([-1])).unwrap();
    #[rustfmt::skip]
        let want = vec![
            false, false, true, true, false, true, // row 0; uniform 10 is its own target
            false, false, true, true, true, true,
            true, true, false, true, true, true,
            true, true, true, false, true, true,
        ];
    assert_eq!(got, want);
    // In chunks of 3, rows 0-2 see positives 0-2 and row 3 sees itself and padding only.
    let m = negative_mask(
        &[10, 11, 12, 13],
        &[1, 1, 2, 1],
        &[0, 0, 0, 5],
        &[],
        3,
        Device::Cpu,
    );
    let m = Tensor::cat(&[m.0, m.1], 1);
    let got = Vec::<bool>::try_from(m.reshape([-1])).unwrap();
    #[rustfmt::skip]
        let want = vec![
            false, false, true,
            false, false, true,
            true, true, false,
            false, false, false,
        ];
    assert_eq!(got, want);
}

#[test]
fn all_targets_mask_excludes_own_and_same_source_relation_targets() {
    // Positives (s=1,r=0,t=0), (s=1,r=0,t=2), (s=2,r=0,t=1) over 3 targets.
    let m = all_targets_mask(&[0, 2, 1], &[1, 1, 2], &[0, 0, 0], 3);
    let got = Vec::<bool>::try_from(m.reshape([-1])).unwrap();
    #[rustfmt::skip]
        let want = vec![
            false, true, false,
            false, true, false,
            true, false, true,
        ];
    assert_eq!(got, want);
}

#[test]
fn golden_history_weights_leave_the_edge_target_out() {
    let unit = |v: &[i64]| v.iter().map(|&i| (i, 1.0)).collect::<Vec<_>>();
    assert_eq!(history_weights(&[], None), vec![]);
    assert_eq!(history_weights(&unit(&[7]), Some(7)), vec![]);
    let h = 1.0 / 2f32.sqrt();
    assert_eq!(
        history_weights(&unit(&[3, 7, 5]), Some(7)),
        vec![(3, h), (5, h)]
    );
    assert_eq!(history_weights(&unit(&[3, 7, 5, 9]), None)[0], (3, 0.5));
    // Raw weights 3 and 4 (norm 5): 0.6 and 0.8.
    assert_eq!(
        history_weights(&[(1, 3.0), (2, 4.0)], None),
        vec![(1, 0.6), (2, 0.8)]
    );
}

#[test]
fn a_history_source_trains_its_recent_targets_rows() {
    tch::manual_seed(1);
    let mut rng = SmallRng::seed_from_u64(1);
    let mut p = params();
    p.uniform_negatives = 0;
    let mut model = Embeddings::new(1, 1, p.dim, 0.1, Device::Cpu);
    ensure_rows(&mut model, &[edge(0, 0, 9)], p.init_scale);
    let before = model.tables[0].rows().copy();
    // Source 0 has recent targets 7 and 8; only its edge to 1 is trained.
    let history = |n: NodeRef, _t: usize| {
        if n.index == 0 {
            vec![(7, 1.0), (8, 1.0)]
        } else {
            vec![]
        }
    };
    let stats = train_step_with(
        &mut model,
        &[edge(0, 0, 1)],
        &p,
        &mut rng,
        None,
        Some(&history),
    );
    assert!(!stats.skipped);
    let moved = |i: i64| {
        (before.get(i) - model.tables[0].rows().get(i))
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    };
    assert!(moved(7) && moved(8), "history rows get gradients");
    assert!(moved(0) && moved(1) && !moved(5));
}

#[test]
fn golden_in_batch_bias_columns_follow_the_chunks() {
    // Five positives in chunks of 2: rows 0-1 see biases 1, 2; rows 2-3 see 3, 4; row 4
    // sees 5 and padding.
    let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]);
    let got = Vec::<f32>::try_from(in_batch_columns(&b, 2, 5).reshape([-1])).unwrap();
    assert_eq!(got, vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 5.0, 0.0]);
}

#[test]
fn golden_step_of_a_target_bias() {
    // One positive 0 -> 1 over two targets, dim 1 with zero rows and relation: every score
    // is its bias (all zero), so the softmax over {1 (positive), 0} gives the positive
    // gradient -(1 - 1/2) = -0.5 and the negative +0.5; Adagrad's first element-wise step
    // is lr · sign: +0.1 and -0.1. The row-less source side adds the same bias to each
    // candidate source, which moves nothing.
    let mut rng = SmallRng::seed_from_u64(0);
    let mut p = params();
    p.dim = 1;
    p.loss = LossKind::Softmax;
    p.uniform_negatives = 0;
    p.all_targets_up_to = 10;
    let mut model = Embeddings::new(2, 1, 1, 0.0, Device::Cpu);
    model.tables[1].biased = true;
    model.tables[0].grow(1, |n| Tensor::zeros([n, 1], (Kind::Float, Device::Cpu)));
    model.tables[1].grow(2, |n| Tensor::zeros([n, 1], (Kind::Float, Device::Cpu)));
    let mut e = edge(0, 0, 1);
    e.dst.node_type = 1;
    let stats = train_step(&mut model, &[e], &p, &mut rng);
    assert!(!stats.skipped);
    let b = Vec::<f32>::try_from(model.tables[1].biases()).unwrap();
    assert!(
        (b[0] + 0.1).abs() < 1e-6 && (b[1] - 0.1).abs() < 1e-6,
        "{b:?}"
    );
    assert_eq!(
        Vec::<f32>::try_from(model.tables[0].biases()).unwrap(),
        vec![0.0],
        "an unbiased table keeps zeros"
    );
}

#[test]
fn chunking_pads_and_unpads() {
    let x = Tensor::arange(10, (Kind::Float, Device::Cpu)).view([5, 2]);
    let c = chunked(&x, 2);
    assert_eq!(c.size(), vec![3, 2, 2]);
    let scores = c.matmul(&c.transpose(-2, -1));
    assert_eq!(unchunked(&scores, 5).size(), vec![5, 2]);
    // Row 4 (alone in the last chunk) sees itself, then a zero pad.
    assert_eq!(unchunked(&scores, 5).double_value(&[4, 1]), 0.0);
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
fn the_pull_holds_rows_near_the_reference_in_proportion_to_its_strength() {
    let p = params();
    let edges = vec![edge(0, 0, 1), edge(2, 0, 3), edge(4, 1, 5), edge(1, 1, 2)];
    let moved_after_skipping = |strength: f64, skip: Option<i64>| {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut model = Embeddings::new(1, 2, p.dim, 0.1, Device::Cpu);
        ensure_rows(&mut model, &edges, p.init_scale);
        fill_seeded(&mut model, 3, 0.17);
        // Row 5 is newer than the reference: it is trained but never pulled.
        let tables = [model.tables[0].rows().narrow(0, 0, 5).copy()];
        let relations = model.relations.copy();
        let mask = skip.map(|row| {
            let m = Tensor::zeros([3], (Kind::Bool, Device::Cpu));
            let _ = m.get(row).fill_(1);
            [m]
        });
        let pull = Pull {
            skip: mask.as_ref().map(|m| &m[..]),
            tables: &tables,
            relations: &relations,
            strength,
        };
        for _ in 0..30 {
            let stats = train_step_pulled(&mut model, &edges, &p, &mut rng, Some(&pull));
            assert!(!stats.skipped);
        }
        let now = model.tables[0].rows().narrow(0, 0, 5);
        let moved = (&now - &tables[0]).norm_scalaropt_dim(2, [1], false);
        Vec::<f64>::try_from(moved.to_kind(Kind::Double)).unwrap()
    };
    let moved_after = |strength: f64| moved_after_skipping(strength, None).iter().sum::<f64>();
    // A row the pull skips (owned by another instance) moves as if unpulled; the rest, and
    // rows past the mask's end, are held.
    let (skipping, unpulled) = (
        moved_after_skipping(1000.0, Some(1)),
        moved_after_skipping(0.0, None),
    );
    let pulled = moved_after_skipping(1000.0, None);
    assert!(skipping[1] > 10.0 * pulled[1], "{skipping:?} {pulled:?}");
    assert!(
        skipping[3] < unpulled[3] * 0.25,
        "{skipping:?} {unpulled:?}"
    );
    let free = moved_after(0.0);
    let held = moved_after(50.0);
    assert!(free > 0.05, "unpulled rows should move: {free}");
    assert!(held < free * 0.25, "pulled {held} vs free {free}");
    // Monotonic in the strength (an in-loss pull under Adagrad was not: it overshot).
    let (weak, strong) = (moved_after(1.0), moved_after(1000.0));
    assert!(
        strong < held && held < weak && weak < free,
        "{strong} {held} {weak} {free}"
    );
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

/// Sources `i` (relation 0) and `10 + i` (relation 1) of the same target `20 + i`: with the dot
/// comparator and one vector per relation, `(c + e_r)·e_t` ranks the candidate sources of
/// `(?, r, t)` by `c·e_t` whatever `r`, so one of the two queries of each target ranks its
/// source second at best (or both tie at 1.5): filtered MRR over both sides at most
/// (1 + 0.75) / 2. PyTorch-BigGraph's reverse operators (`e_t + h_r`) separate them.
#[test]
fn reverse_relations_let_the_dot_comparator_rank_sources_by_relation() {
    let edges: Vec<Edge> = (0..10)
        .flat_map(|i| [edge(i, 0, 20 + i), edge(10 + i, 1, 20 + i)])
        .collect();
    let triples: Vec<crate::train::Triple> = edges
        .iter()
        .map(|e| (0, e.src.index as i64, e.rel as i64, 0, e.dst.index as i64))
        .collect();
    let filter = crate::train::Filter::new(&triples);
    let mrr = |reverse: bool| {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut p = params();
        p.reverse_relations = reverse;
        (p.lr, p.relation_lr) = (0.5, 0.5);
        let mut model = Embeddings::new(1, 2, p.dim, p.init_scale, Device::Cpu);
        if reverse {
            model.add_reverse_relations(p.init_scale);
        }
        ensure_rows(&mut model, &edges, p.init_scale);
        fill_seeded(&mut model, 7, 0.17);
        for _ in 0..300 {
            assert!(!train_step(&mut model, &edges, &p, &mut rng).skipped);
        }
        crate::train::evaluate(&model, p.comparator, &triples, &filter, 64).mrr
    };
    let (shared, reverse) = (mrr(false), mrr(true));
    assert!(shared <= 0.875 + 1e-6, "one vector per relation: {shared}");
    assert!(reverse > 0.95, "reverse relations: {reverse}");
}

/// With reverse relations, the source side of a step scores candidates against `e_t + h_r`:
/// one positive 0 → 1 at dim 1, rows 0 and 1 at 1, e_r = 0 and h_r = 1; no negatives but the
/// positive's own (masked): each side's loss is softplus(−pos) only, the target side's pos
/// (e_0 + e_r)·e_1 = 1, the source side's e_0·(e_1 + h_r) = 2. So h_r's gradient is
/// −σ(−2)·e_0 and e_r's −σ(−1)·e_1: both move up by relation_lr on Adagrad's first step, and
/// the loss is softplus(−1) + softplus(−2).
#[test]
fn golden_step_with_a_reverse_relation() {
    let mut rng = SmallRng::seed_from_u64(0);
    let mut p = params();
    p.dim = 1;
    p.uniform_negatives = 0;
    let ones = |n: i64| Tensor::ones([n, 1], (Kind::Float, Device::Cpu));
    let mut model = Embeddings::new(1, 1, 1, 0.0, Device::Cpu);
    model.add_reverse_relations(0.0);
    let rev = model.reverse.as_mut().unwrap();
    let _ = rev.relations.fill_(1.0);
    model.tables[0].grow(2, ones);
    let stats = train_step(&mut model, &[edge(0, 0, 1)], &p, &mut rng);
    assert!(!stats.skipped);
    let softplus = |x: f64| (1.0 + x.exp()).ln();
    let want = softplus(-1.0) + softplus(-2.0);
    assert!((stats.loss - want).abs() < 1e-5, "{} vs {want}", stats.loss);
    let r = model.relations.double_value(&[0, 0]);
    let h = model
        .reverse
        .as_ref()
        .unwrap()
        .relations
        .double_value(&[0, 0]);
    assert!((r - 0.1).abs() < 1e-6 && (h - 1.1).abs() < 1e-6, "{r} {h}");
}

/// The dot comparator's hand-derived step moves every row, relation, reverse operator and bias
/// exactly as autograd's step does, from the same state and the same draws: both losses, with
/// and without reverse relations, target biases, a history, every target as negatives, several
/// endpoint-type groups, chunks that do and do not divide the batch, and repeated rows.
#[test]
fn the_hand_derived_dot_step_is_autograds() {
    let typed = |s: u32, r: u16, t: u32, dst_type: u16| {
        let mut e = edge(s, r, t);
        e.dst.node_type = dst_type;
        e
    };
    // Type 0 → type 0 (relations 0, 1) and type 0 → type 1 (relation 2); sources repeat.
    let mut edges: Vec<Edge> = (0..37u32)
        .map(|i| typed(i % 13, (i % 2) as u16, (i * 7 + 3) % 29, 0))
        .collect();
    edges.extend((0..23u32).map(|i| typed(i % 11, 2, (i * 5) % 17, 1)));
    // Groups of 32 and 16 edges: chunks of 8 tile them, and the in-batch backward accumulates
    // into the gradients in place.
    let tiled: Vec<Edge> = edges[..32].iter().chain(&edges[37..53]).copied().collect();
    let history = |n: NodeRef, _t: usize| -> Vec<(i64, f32)> {
        (0..(n.index % 4) as i64)
            .map(|k| ((n.index as i64 * 3 + k) % 17, 1.0 + k as f32))
            .collect()
    };
    let cases = [
        (LossKind::Logistic, false, false, false, 0),
        (LossKind::Logistic, true, false, false, 0),
        (LossKind::Softmax, false, true, false, 0),
        (LossKind::Softmax, true, true, true, 0),
        (LossKind::Logistic, true, true, true, 0),
        (LossKind::Softmax, false, true, true, 20),
        (LossKind::Logistic, true, false, false, 20),
    ];
    for (edges, (loss, reverse, biased, with_history, all_up_to)) in [&edges, &tiled]
        .into_iter()
        .flat_map(|edges| cases.iter().map(move |case| (edges, *case)))
    {
        let mut p = params();
        (p.loss, p.reverse_relations, p.all_targets_up_to) = (loss, reverse, all_up_to);
        (p.chunk_size, p.uniform_negatives, p.dim) = (8, 5, 6);
        let fresh = || {
            let mut m = Embeddings::new(2, 3, p.dim, 0.3, Device::Cpu);
            if reverse {
                m.add_reverse_relations(0.3);
            }
            m.tables[1].biased = biased;
            m.tables[0].biased = biased;
            ensure_rows(&mut m, edges, 0.3);
            fill_seeded(&mut m, 11, 0.5);
            m
        };
        let (mut by_hand, mut reference) = (fresh(), fresh());
        let h: Option<History<'_>> = with_history.then_some(&history as History<'_>);
        for step in 0..3u64 {
            let a = train_step_with(
                &mut by_hand,
                edges,
                &p,
                &mut SmallRng::seed_from_u64(step),
                None,
                h,
            );
            let b = train_step_autograd(
                &mut reference,
                edges,
                &p,
                &mut SmallRng::seed_from_u64(step),
                None,
                h,
            );
            let case = format!("{loss:?} reverse={reverse} bias={biased} history={with_history} all={all_up_to} step {step}");
            assert!(!a.skipped && !b.skipped, "{case}");
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * b.loss.abs().max(1.0),
                "{case}: loss {} vs {}",
                a.loss,
                b.loss
            );
            let close = |x: &Tensor, y: &Tensor, what: &str| {
                let diff = (x - y).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{case}: {what} differs by {diff}");
            };
            for (t, (x, y)) in by_hand.tables.iter().zip(&reference.tables).enumerate() {
                close(&x.rows(), &y.rows(), &format!("table {t} rows"));
                close(
                    &x.state.narrow(0, 0, x.len()),
                    &y.state.narrow(0, 0, y.len()),
                    &format!("table {t} state"),
                );
                close(&x.biases(), &y.biases(), &format!("table {t} biases"));
            }
            close(&by_hand.relations, &reference.relations, "relations");
            if reverse {
                let rev = |m: &Embeddings| m.reverse.as_ref().unwrap().relations.shallow_clone();
                close(&rev(&by_hand), &rev(&reference), "reverse relations");
            }
        }
    }
}
