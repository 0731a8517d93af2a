//! The cost of one version at scale: how long training pauses for it, and how long the rest of
//! its preparation takes (the rows selected against the published reference and encoded).
//!
//! One node table of `VERSION_NODES` rows (default 100,000; the figure is 1,000,000),
//! dimension `VERSION_DIM` (default 128), of which `VERSION_DIRTY` (default 0.01) are moved by an
//! Adagrad step between versions — what a short interval of training touches. The other types
//! of the default schema are empty. Rows are keyed by the nodes of a real store (one `follows`
//! edge per two users), so key lookups are measured too.
//!
//! A version as the daemon prepares it ([`twhin_stream::publish::Publication`]): training pauses
//! only for [`TrainerCore::take_delta`] (the rows written since the previous version, the drift
//! samples); the assessment on `align.drift_sample` rows, the rows selected against the
//! reference and encoded (f32le), and the new view come after, while training runs (`prepare`).
//! Before this path (commit "benches/version_pause: ..."), all of it ran paused: copy the whole
//! table, drift over every shared row, build; at 1M nodes that paused training ~22 s per version
//! on the 2-core machine.
//!
//! Run with `VERSION_NODES=1000000 cargo bench --bench version_pause`. Prints one line per
//! version (the parts) and a summary (`pause_ms`, `prepare_ms`: medians over `VERSION_ROUNDS`
//! versions), plus criterion's own figure at small sizes.

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{Device, Kind, Tensor};

use common::{env_or, store_with_users};
use twhin_stream::align::{AlignFigures, Aligner, Candidate};
use twhin_stream::config::{Config, ValueFormat};
use twhin_stream::publish::{build_delta_version, Scope, VersionRequest};
use twhin_stream::store::GraphStore;
use twhin_stream::train::{DeltaRequest, Embeddings, Snapshot, TrainerCore};

struct Setup {
    cfg: Config,
    store: GraphStore,
    core: TrainerCore,
    aligner: Aligner,
    dirty: i64,
    _dir: tempfile::TempDir,
}

/// A store whose type 0 (`user`) holds `nodes` nodes, and a model with a row for each.
fn setup(nodes: i64, dim: i64, dirty_share: f64) -> Setup {
    let mut cfg = Config::load(None).expect("default config");
    cfg.train.dim = dim;
    let schema = cfg.schema();
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let store = store_with_users(&cfg, dir.path(), nodes);
    eprintln!(
        "store: {} users in {:.1} s",
        store.node_count(0),
        started.elapsed().as_secs_f64()
    );
    tch::manual_seed(1);
    let mut model = Embeddings::for_schema(&schema, &cfg.train, Device::Cpu);
    model.tables[0].grow(nodes, |n| {
        Tensor::randn([n, dim], (Kind::Float, Device::Cpu)) * 0.1
    });
    let core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
    let aligner = Aligner::new(cfg.align.clone(), true, None, Default::default()).expect("aligner");
    Setup {
        dirty: ((nodes as f64) * dirty_share).max(1.0) as i64,
        cfg,
        store,
        core,
        aligner,
        _dir: dir,
    }
}

/// What training does between two versions: an Adagrad step on `n` random rows of type 0.
fn train_a_little(core: &mut TrainerCore, n: i64) {
    let rows = core.model.tables[0].len();
    let idx = Tensor::randperm(rows, (Kind::Int64, Device::Cpu)).narrow(0, 0, n);
    let dim = core.model.dim;
    let grad = Tensor::randn([n, dim], (Kind::Float, Device::Cpu));
    core.model.tables[0].adagrad(&idx, &grad, 0.1);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Rows per type of a snapshot's tables.
fn lens(s: &Snapshot) -> Vec<i64> {
    s.tables.iter().map(|t| t.size()[0]).collect()
}

fn bench_version(c: &mut Criterion) {
    let nodes = env_or("VERSION_NODES", 100_000i64);
    let dim = env_or("VERSION_DIM", 128i64);
    let share = env_or("VERSION_DIRTY", 0.01f64);
    let versions = env_or("VERSION_ROUNDS", 5usize);
    let mut s = setup(nodes, dim, share);
    let format = ValueFormat::F32le;
    // The daemon's scope when one instance owns every partition of the default topics.
    let scope = Scope::whole(8);
    // The first version: every row (it becomes the reference and the anchor).
    let first = s.core.take_delta(&DeltaRequest {
        full: true,
        samples: Vec::new(),
        ..Default::default()
    });
    let update_req = |version: u64| VersionRequest {
        version,
        epoch: 1,
        format,
        threshold: s.cfg.publish.row_threshold,
        comparator: s.cfg.train.comparator,
        align: None,
        tombstones: &[],
        every_row: false,
        reference_biases: &[],
        builds_on: None,
        retried_rows: &[],
        scope: &scope,
    };
    let (_, update) = build_delta_version(&s.store, &first, None, &update_req(1))
        .expect("build")
        .expect("rows");
    let mut reference = Snapshot {
        tables: update.apply(None).expect("view"),
        relations: first.relations.shallow_clone(),
    };
    s.aligner
        .adopt(1, &first_figures(), reference.shallow_clone(), &[])
        .expect("anchor");
    drop(first);
    let mut version = 1u64;
    let (threshold, comparator) = (s.cfg.publish.row_threshold, s.cfg.train.comparator);
    let (mut pauses, mut prepares, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut one = |s: &mut Setup| {
        train_a_little(&mut s.core, s.dirty);
        version += 1;
        let plan = s.aligner.plan(version, Some(&lens(&reference)));
        // What the publication pauses training for: the changed rows and the samples copied.
        let started = Instant::now();
        let mut delta = s.core.take_delta(&DeltaRequest {
            full: false,
            samples: vec![plan.previous, plan.anchor],
            ..Default::default()
        });
        let pause = started.elapsed();
        // The rest, on the publication's thread while training runs: the assessment, the rows
        // selected and encoded, the new view.
        let started = Instant::now();
        let candidate = Candidate::of_delta(&mut delta);
        let assessed = s.aligner.assess(version, &candidate, Some(&reference));
        assert!(assessed.hold.is_none() && assessed.rotation.is_none());
        let req = VersionRequest {
            version,
            epoch: 1,
            format,
            threshold,
            comparator,
            align: Some(&assessed.figures),
            tombstones: &[],
            every_row: false,
            reference_biases: &[],
            builds_on: None,
            retried_rows: &[],
            scope: &scope,
        };
        let assessed_at = started.elapsed();
        let built = build_delta_version(&s.store, &delta, Some(&reference), &req).expect("build");
        let built_at = started.elapsed();
        if let Some((prepared, update)) = built {
            rows.push(prepared.rows.len() as f64);
            reference = Snapshot {
                tables: update.apply(Some(&reference)).expect("view"),
                relations: delta.relations.shallow_clone(),
            };
        }
        let prepare = started.elapsed();
        eprintln!(
            "version {version}: pause {:.1} ms ({} rows taken); assess {:.1} ms, build {:.1} ms, view {:.1} ms",
            pause.as_secs_f64() * 1e3,
            delta.changed_rows(),
            assessed_at.as_secs_f64() * 1e3,
            (built_at - assessed_at).as_secs_f64() * 1e3,
            (prepare - built_at).as_secs_f64() * 1e3,
        );
        (pause, prepare)
    };
    // Criterion's ten samples only at small sizes (one version at 1M nodes takes seconds).
    let mut group = c.benchmark_group("version");
    group.sample_size(10);
    if nodes <= 200_000 {
        group.bench_function(format!("pause_and_prepare/{nodes}x{dim}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (pause, prepare) = one(&mut s);
                    total += pause + prepare;
                }
                total
            })
        });
    }
    group.finish();
    for _ in 0..versions {
        let (pause, prepare) = one(&mut s);
        pauses.push(pause.as_secs_f64() * 1e3);
        prepares.push(prepare.as_secs_f64() * 1e3);
    }
    println!(
        "version_pause nodes={nodes} dim={dim} dirty={share} pause_ms={:.1} prepare_ms={:.1} rows={:.0}",
        median(pauses),
        median(prepares),
        median(rows)
    );
}

fn first_figures() -> AlignFigures {
    AlignFigures {
        control: true,
        previous: None,
        anchor: None,
        procrustes_residual: None,
        pull: 1.0,
    }
}

criterion_group!(benches, bench_version);
criterion_main!(benches);
