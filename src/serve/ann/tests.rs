//! The indexes against exact scoring, and their updates.

use super::*;
use crate::config::AnnQuantization;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

fn config(min_rows: usize) -> AnnConfig {
    AnnConfig {
        enabled: true,
        min_rows,
        connectivity: 16,
        expansion_add: 64,
        expansion_search: 64,
        oversample: 5,
        search_threads: 2,
        build_threads: 2,
        quantization: AnnQuantization::F16,
        reindex_threshold: 0.0,
        updater_nice: 0,
    }
}

/// `n` rows of dimension `dim` around `n / 100` community centres, with spread norms (the
/// shape of trained embeddings of the synthetic workload).
fn clustered(rng: &mut SmallRng, n: usize, dim: usize) -> Vec<f32> {
    let centres: Vec<Vec<f32>> = (0..(n / 100).max(2))
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let scale = rng.random_range(0.5..1.5f32);
        let c = &centres[i % centres.len()];
        out.extend(c.iter().map(|x| scale * (x + rng.random_range(-0.5..0.5))));
    }
    out
}

fn table(flat: &[f32], dim: usize) -> Tensor {
    Tensor::from_slice(flat).reshape([(flat.len() / dim) as i64, dim as i64])
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The exact top `k` rows by `q · row + bias`.
fn exact_top(flat: &[f32], dim: usize, bias: Option<&[f32]>, q: &[f32], k: usize) -> Vec<i64> {
    let mut s: Vec<(f32, i64)> = flat
        .chunks(dim)
        .enumerate()
        .map(|(i, r)| (dot(q, r) + bias.map_or(0.0, |b| b[i]), i as i64))
        .collect();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    s.into_iter().take(k).map(|(_, i)| i).collect()
}

/// The index's candidates re-scored exactly, best `k`.
fn ann_top(
    ann: &AnnIndexes,
    flat: &[f32],
    dim: usize,
    bias: Option<&[f32]>,
    q: &[f32],
    k: usize,
) -> Vec<i64> {
    let found = ann
        .search(0, Comparator::Dot, bias.is_some(), q, k * 5, |_| true)
        .expect("an index")
        .unwrap();
    let mut s: Vec<(f32, i64)> = found
        .rows
        .iter()
        .map(|&i| {
            let r = &flat[i as usize * dim..(i as usize + 1) * dim];
            (dot(q, r) + bias.map_or(0.0, |b| b[i as usize]), i)
        })
        .collect();
    s.sort_by(|a, b| b.0.total_cmp(&a.0));
    s.into_iter().take(k).map(|(_, i)| i).collect()
}

fn recall(want: &[i64], got: &[i64]) -> f64 {
    want.iter().filter(|i| got.contains(i)).count() as f64 / want.len() as f64
}

#[test]
fn reductions_keep_the_score_order() {
    let mut rng = SmallRng::seed_from_u64(3);
    let dim = 8;
    for _ in 0..100 {
        let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
        let t: Vec<f32> = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
        let b: f32 = rng.random_range(-1.0..1.0);
        let mut item = Vec::new();
        // dot with a bias: the graph's inner product is the score itself.
        let r = Reduction::of(Comparator::Dot, true).unwrap();
        r.item(&t, Some(b), &mut item);
        assert!((dot(&r.query(&q), &item) - (dot(&q, &t) + b)).abs() < 1e-4);
        // cos: the inner product of unit vectors (plus the bias).
        let r = Reduction::of(Comparator::Cos, true).unwrap();
        r.item(&t, Some(b), &mut item);
        let norm = |v: &[f32]| dot(v, v).sqrt();
        let cos = dot(&q, &t) / (norm(&q) * norm(&t));
        assert!((dot(&r.query(&q), &item) - (cos + b)).abs() < 1e-4);
    }
    assert_eq!(Reduction::of(Comparator::L2, false), Some(Reduction::L2));
    assert_eq!(Reduction::of(Comparator::L2, true), None);
    assert_eq!(Reduction::of(Comparator::L1, false), None);
}

#[test]
fn the_index_finds_the_exact_top_ten() {
    let mut rng = SmallRng::seed_from_u64(11);
    let (n, dim) = (4000, 16);
    let flat = clustered(&mut rng, n, dim);
    let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
    let ann = AnnIndexes::start(config(1000), None).unwrap();
    let b = Tensor::from_slice(&bias);
    ann.submit(
        1,
        Comparator::Dot,
        &[table(&flat, dim)],
        &[Some(b)],
        None,
        None,
    );
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    assert_eq!(ann.figures().last_error, None);
    let mut total = 0.0;
    for _ in 0..50 {
        let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let want = exact_top(&flat, dim, Some(&bias), &q, 10);
        total += recall(&want, &ann_top(&ann, &flat, dim, Some(&bias), &q, 10));
    }
    assert!(total / 50.0 >= 0.95, "recall@10 {}", total / 50.0);
    let f = ann.figures();
    assert_eq!((f.builds, f.updates), (1, 0));
    assert_eq!(f.types[0].rows, n as u64);
    assert!(f.types[0].memory_bytes > 0);
}

#[test]
fn versions_replace_moved_rows_and_add_new_ones_without_a_rebuild() {
    let mut rng = SmallRng::seed_from_u64(5);
    let (n, dim) = (3000, 8);
    let mut flat = clustered(&mut rng, n, dim);
    let ann = AnnIndexes::start(config(1000), None).unwrap();
    ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    // Version 2: row 17 turns to a direction nothing else has, and 10 rows are new.
    let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    flat[17 * dim..18 * dim].copy_from_slice(&[50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    flat.extend(clustered(&mut rng, 10, dim));
    flat[(n + 3) * dim] = 40.0;
    apply_version(&ann, 2, &flat, dim, &[17, 3000, 3001, 3002, 3003]);
    let top = ann_top(&ann, &flat, dim, None, &q, 2);
    assert_eq!(top, vec![17, n as i64 + 3]);
    let f = ann.figures();
    assert_eq!((f.builds, f.updates), (1, 1));
    // The changed rows and every row past those indexed (the new ones).
    assert_eq!(f.last_update_rows, 11);
    assert_eq!((f.types[0].version, f.types[0].rows), (2, n as u64 + 10));
    // Filtered: row 17 left out, the new row comes first.
    let found = ann
        .search(0, Comparator::Dot, false, &q, 5, |k| k != 17)
        .unwrap()
        .unwrap();
    assert!(found.rows.contains(&(n as i64 + 3)) && !found.rows.contains(&17));
    assert_eq!(found.index_version, 2);
    // A version without its changes recorded is indexed anew.
    ann.submit(3, Comparator::Dot, &[table(&flat, dim)], &[], None, None);
    assert!(ann.wait_for(3, Duration::from_secs(60)));
    assert_eq!(ann.figures().builds, 2);
}

#[test]
fn a_row_is_replaced_once_it_moved_past_the_threshold_from_the_copy_held() {
    let mut rng = SmallRng::seed_from_u64(19);
    let (n, dim) = (2000, 8);
    let mut flat = clustered(&mut rng, n, dim);
    let ann = AnnIndexes::start(
        AnnConfig {
            reindex_threshold: 0.1,
            ..config(1000)
        },
        None,
    )
    .unwrap();
    ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    let scale = |flat: &mut [f32], row: usize, by: f32| {
        for x in &mut flat[row * dim..(row + 1) * dim] {
            *x *= by;
        }
    };
    // Rows 0..10 move 6% (kept), row 10 moves 20% (replaced), row 11 does not move (kept).
    for row in 0..10 {
        scale(&mut flat, row, 1.06);
    }
    scale(&mut flat, 10, 1.2);
    apply_version(&ann, 2, &flat, dim, &(0..12).collect::<Vec<_>>());
    let f = ann.figures();
    assert_eq!(
        (f.rows_updated, f.rows_kept, f.last_update_rows),
        (1, 11, 1)
    );
    // Another 6% on rows 0..10: 12.4% from the copy held, so they are replaced now (a row that
    // creeps a little each version is not held back for ever).
    for row in 0..10 {
        scale(&mut flat, row, 1.06);
    }
    apply_version(&ann, 3, &flat, dim, &(0..10).collect::<Vec<_>>());
    let f = ann.figures();
    assert_eq!((f.rows_updated, f.rows_kept), (11, 11));
    // A row turned towards a direction nothing else has is found there.
    flat[17 * dim..18 * dim].copy_from_slice(&[50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    apply_version(&ann, 4, &flat, dim, &[17]);
    let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    assert_eq!(ann_top(&ann, &flat, dim, None, &q, 1), vec![17]);
}

#[test]
fn the_updater_runs_at_the_configured_nice_value() {
    let ann = AnnIndexes::start(
        AnnConfig {
            updater_nice: 7,
            ..config(1000)
        },
        None,
    )
    .unwrap();
    // The updater has started once it has indexed a version.
    let mut rng = SmallRng::seed_from_u64(23);
    let flat = clustered(&mut rng, 1200, 4);
    ann.submit(1, Comparator::Dot, &[table(&flat, 4)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    // Field 19 of a thread's stat is its nice value (counted after the name's closing paren).
    let nices: Vec<i64> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            (comm.trim() == "ann-index").then_some(())?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        nices.contains(&7),
        "ann-index threads' nice values: {nices:?}"
    );
}

#[test]
fn relative_change_golden_values() {
    use super::type_index::relative_change;
    assert_eq!(relative_change(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
    assert!((relative_change(&[3.0, 4.0], &[0.0, 5.0]) - 10f64.sqrt() / 5.0).abs() < 1e-12);
    assert!((relative_change(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
    assert_eq!(relative_change(&[1.0], &[0.0]), f64::INFINITY);
    assert_eq!(relative_change(&[0.0], &[0.0]), 0.0);
}

#[test]
fn searches_during_updates_name_only_indexed_rows() {
    let mut rng = SmallRng::seed_from_u64(13);
    let (n, dim) = (2000, 8);
    let mut flat = clustered(&mut rng, n, dim);
    let ann = AnnIndexes::start(config(1000), None).unwrap();
    ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for c in 0..2u64 {
            let (ann, done) = (&ann, &done);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(100 + c);
                while !done.load(Ordering::Relaxed) {
                    let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let found = ann
                        .search(0, Comparator::Dot, false, &q, 50, |_| true)
                        .unwrap()
                        .unwrap();
                    assert!(found.rows.iter().all(|&r| (0..n as i64).contains(&r)));
                    assert!(found.rows.windows(2).all(|w| w[0] < w[1]));
                }
            });
        }
        // Ten versions, each replacing half the rows, while the two threads search.
        for v in 2..12u64 {
            let changed: Vec<i64> = (0..n as i64).filter(|i| (i + v as i64) % 2 == 0).collect();
            for &i in &changed {
                for x in &mut flat[i as usize * dim..(i as usize + 1) * dim] {
                    *x += rng.random_range(-0.1..0.1);
                }
            }
            apply_version(&ann, v, &flat, dim, &changed);
        }
        done.store(true, Ordering::Relaxed);
    });
    let f = ann.figures();
    assert_eq!((f.builds, f.failures, f.types[0].version), (1, 0, 11));
}

/// Version `v` of the rows `flat` with `changed` rows, submitted and waited for.
fn apply_version(ann: &AnnIndexes, v: u64, flat: &[f32], dim: usize, changed: &[i64]) {
    let changed = Tensor::from_slice(changed);
    ann.submit(
        v,
        Comparator::Dot,
        &[table(flat, dim)],
        &[],
        Some(&[changed]),
        None,
    );
    assert!(ann.wait_for(v, Duration::from_secs(60)));
}

/// `/v1/status` asks for the figures while the updater inserts and grows the index: the
/// daemon once died of it (usearch's memory figure walks every node, unlocked).
#[test]
fn figures_are_safe_while_the_index_grows() {
    let mut rng = SmallRng::seed_from_u64(17);
    let dim = 8;
    let mut flat = clustered(&mut rng, 1500, dim);
    let ann = AnnIndexes::start(config(1000), None).unwrap();
    ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let (ann, done) = (&ann, &done);
        s.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let f = ann.figures();
                assert!(f.types.iter().all(|t| t.memory_bytes > 0));
            }
        });
        // Fifteen versions, each adding a fifth more rows (the capacity doubles on the way).
        for v in 2..17u64 {
            let n = flat.len() / dim;
            flat.extend(clustered(&mut rng, n / 5, dim));
            apply_version(ann, v, &flat, dim, &[0, 1, 2]);
        }
        done.store(true, Ordering::Relaxed);
    });
    let f = ann.figures();
    assert_eq!((f.builds, f.failures, f.types[0].version), (1, 0, 16));
}

#[test]
fn small_types_and_l1_have_no_index() {
    let mut rng = SmallRng::seed_from_u64(9);
    let flat = clustered(&mut rng, 500, 4);
    let ann = AnnIndexes::start(config(1000), None).unwrap();
    ann.submit(1, Comparator::Dot, &[table(&flat, 4)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    assert!(ann
        .search(0, Comparator::Dot, false, &[1.0; 4], 5, |_| true)
        .is_none());
    let ann = AnnIndexes::start(config(100), None).unwrap();
    ann.submit(1, Comparator::L1, &[table(&flat, 4)], &[], None, None);
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    assert!(ann.figures().types.is_empty());
    // An index built for dot is not used to answer for another comparator.
    ann.submit(2, Comparator::Dot, &[table(&flat, 4)], &[], None, None);
    assert!(ann.wait_for(2, Duration::from_secs(60)));
    assert!(ann
        .search(0, Comparator::Cos, false, &[1.0; 4], 5, |_| true)
        .is_none());
    assert!(ann
        .search(0, Comparator::Dot, false, &[1.0; 4], 5, |_| true)
        .is_some());
}

#[test]
fn versions_waiting_together_carry_the_changes_of_both() {
    let sub = |version, changed: Option<Vec<Vec<i64>>>| Submitted {
        version,
        comparator: Comparator::Dot,
        tables: Vec::new(),
        biases: Vec::new(),
        changed,
        scope: None,
    };
    let merged = sub(1, Some(vec![vec![1, 2], vec![]]))
        .followed_by(sub(2, Some(vec![vec![2, 5], vec![7], vec![9]])));
    assert_eq!(merged.version, 2);
    assert_eq!(
        merged.changed,
        Some(vec![vec![1, 2, 2, 5], vec![7], vec![9]])
    );
    assert_eq!(sub(1, None).followed_by(sub(2, Some(vec![]))).changed, None);
    assert_eq!(sub(1, Some(vec![])).followed_by(sub(2, None)).changed, None);
}

/// Rows of partition `row % 3` (of 3), counting how many lookups were asked for.
#[derive(Default)]
struct ModuloPartitions {
    looked_up: std::sync::atomic::AtomicUsize,
}

impl crate::partition::NodePartitions for ModuloPartitions {
    fn partitions_of(&self, _t: TypeId, from: u32, to: u32, partitions: u32) -> Vec<Option<i32>> {
        self.looked_up
            .fetch_add((to - from) as usize, std::sync::atomic::Ordering::Relaxed);
        (from..to).map(|i| Some((i % partitions) as i32)).collect()
    }
}

/// With several instances a version covers some partitions: the index holds their rows only,
/// says so with every search, takes only their new and changed rows, looks each row's partition
/// up once, and is built again for a version that covers other partitions.
#[test]
fn an_index_holds_the_rows_of_the_partitions_its_version_covers() {
    use crate::partition::Owned;
    let mut rng = SmallRng::seed_from_u64(23);
    let (n, dim) = (3000, 8);
    let mut flat = clustered(&mut rng, n, dim);
    let rows_of = Arc::new(ModuloPartitions::default());
    let ann = AnnIndexes::start(config(1000), Some(rows_of.clone())).unwrap();
    let scope = |partitions: Vec<i32>| {
        Scope::owned(
            3,
            &Owned {
                generation: 1,
                partitions,
            },
        )
    };
    let (mine, mine_too) = (scope(vec![1]), scope(vec![0, 2]));
    ann.submit(
        1,
        Comparator::Dot,
        &[table(&flat, dim)],
        &[],
        None,
        Some(&mine),
    );
    assert!(ann.wait_for(1, Duration::from_secs(60)));
    let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
    let found = ann
        .search(0, Comparator::Dot, false, &q, 50, |_| true)
        .unwrap()
        .unwrap();
    assert_eq!(found.covered, Some((vec![1], 3)));
    assert!(!found.rows.is_empty());
    assert!(found.rows.iter().all(|r| r % 3 == 1), "{:?}", found.rows);
    let f = ann.figures();
    assert_eq!(
        (f.types[0].rows, &f.types[0].partitions),
        (1000, &Some(vec![1]))
    );
    // Version 2: rows 16 (partition 1) and 17 (partition 2) turn to a direction nothing else
    // has, and 10 rows are new (3000..3010: partitions 0, 1, 2, ...).
    for row in [16, 17] {
        flat[row * dim..(row + 1) * dim]
            .copy_from_slice(&[50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
    flat.extend(clustered(&mut rng, 10, dim));
    let changed = Tensor::from_slice(&[16i64, 17]);
    ann.submit(
        2,
        Comparator::Dot,
        &[table(&flat, dim)],
        &[],
        Some(&[changed]),
        Some(&mine),
    );
    assert!(ann.wait_for(2, Duration::from_secs(60)));
    let f = ann.figures();
    assert_eq!((f.builds, f.updates), (1, 1));
    // Row 16, and the new rows of partition 1: 3001, 3004, 3007.
    assert_eq!((f.last_update_rows, f.types[0].rows), (4, 1003));
    let top = ann
        .search(0, Comparator::Dot, false, &q, 5, |_| true)
        .unwrap()
        .unwrap();
    assert!(top.rows.contains(&16) && !top.rows.contains(&17));
    assert_eq!(
        rows_of.looked_up.load(std::sync::atomic::Ordering::Relaxed),
        n + 10,
        "each row looked up once"
    );
    // The partitions change hands: built again, for the others.
    ann.submit(
        3,
        Comparator::Dot,
        &[table(&flat, dim)],
        &[],
        Some(&[Tensor::from_slice::<i64>(&[])]),
        Some(&mine_too),
    );
    assert!(ann.wait_for(3, Duration::from_secs(60)));
    let f = ann.figures();
    assert_eq!((f.builds, f.types[0].rows), (2, 2007));
    let top = ann
        .search(0, Comparator::Dot, false, &q, 5, |_| true)
        .unwrap()
        .unwrap();
    assert_eq!(top.covered, Some((vec![0, 2], 3)));
    assert!(top.rows.contains(&17) && !top.rows.contains(&16));
    // Every partition: every row, as one instance indexes.
    ann.submit(
        4,
        Comparator::Dot,
        &[table(&flat, dim)],
        &[],
        Some(&[Tensor::from_slice::<i64>(&[])]),
        Some(&Scope::whole(3)),
    );
    assert!(ann.wait_for(4, Duration::from_secs(60)));
    let f = ann.figures();
    assert_eq!(
        (f.builds, f.types[0].rows, &f.types[0].partitions),
        (3, 3010, &None)
    );
}
