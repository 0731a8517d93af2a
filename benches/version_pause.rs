//! The cost of one version at scale: how long training pauses for it, and how long the rest of
//! its preparation takes (the rows selected against the published reference and encoded).
//!
//! One node table of `VERSION_NODES` rows (default 100,000; the figure is 1,000,000),
//! dimension `VERSION_DIM` (default 128), of which `VERSION_DIRTY` (default 0.01) are moved by an
//! Adagrad step between versions — what a short interval of training touches. The other types
//! of the default schema are empty. Rows are keyed by the nodes of a real store (one `follows`
//! edge per two users), so key lookups are measured too.
//!
//! Run with `VERSION_NODES=1000000 cargo bench --bench version_pause`. Prints one line per
//! figure (`pause_ms`, `prepare_ms`: medians over the versions measured) and criterion's own.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{Device, Kind, Tensor};

use twhin_stream::align::Aligner;
use twhin_stream::config::{Config, ValueFormat};
use twhin_stream::publish::{build_version, VersionRequest};
use twhin_stream::schema::{Event, NodeKey};
use twhin_stream::store::{AppendBatch, GraphStore, StoreOptions};
use twhin_stream::train::{Embeddings, TrainerCore};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    let store = GraphStore::open(dir.path(), &schema, &StoreOptions::default()).expect("store");
    let follows = schema
        .relations()
        .iter()
        .position(|r| r.name == "follows")
        .expect("follows") as u16;
    let user = |i: i64| NodeKey {
        node_type: 0,
        id: format!("u{i}"),
    };
    let started = Instant::now();
    let mut offset = 0i64;
    for chunk in (0..nodes / 2).collect::<Vec<_>>().chunks(20_000) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|&i| Event {
                src: user(2 * i),
                rel: follows,
                dst: user(2 * i + 1),
                ts: 1_732_190_400_000 + i as u64,
                weight: 1.0,
                event_id: None,
            })
            .collect();
        let n = events.len() as i64;
        store
            .append(&AppendBatch::from_events("bench", offset, events))
            .expect("append");
        offset += n;
    }
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

fn bench_version(c: &mut Criterion) {
    let nodes = env_or("VERSION_NODES", 100_000i64);
    let dim = env_or("VERSION_DIM", 128i64);
    let share = env_or("VERSION_DIRTY", 0.01f64);
    let versions = env_or("VERSION_ROUNDS", 5usize);
    let mut s = setup(nodes, dim, share);
    let format = ValueFormat::F32le;
    // The first version: every row (it becomes the reference and the anchor).
    let mut reference = s.core.state().params;
    let mut version = 1u64;
    let (mut pauses, mut prepares, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    let mut one = |s: &mut Setup| {
        train_a_little(&mut s.core, s.dirty);
        version += 1;
        // Today's path: all of it runs while training is paused.
        let started = Instant::now();
        let mut state = s.core.state();
        let copied = started.elapsed();
        let assessed = s.aligner.assess(version, &state.params, Some(&reference));
        let assessed_at = started.elapsed();
        if let Some(r) = &assessed.rotation {
            s.core.rotate(r);
            state.params = tch::no_grad(|| state.params.rotated(r));
        }
        let req = VersionRequest {
            version,
            epoch: 1,
            format,
            threshold: s.cfg.publish.row_threshold,
            comparator: s.cfg.train.comparator,
            align: Some(&assessed.figures),
        };
        let built = build_version(&s.store, &state, Some(&reference), &req).expect("build");
        let pause = started.elapsed();
        eprintln!(
            "version {version}: copy {:.0} ms, assess {:.0} ms, build {:.0} ms",
            copied.as_secs_f64() * 1e3,
            (assessed_at - copied).as_secs_f64() * 1e3,
            (pause - assessed_at).as_secs_f64() * 1e3
        );
        if let Some((prepared, view)) = built {
            rows.push(prepared.rows.len() as f64);
            reference = view.params();
        }
        (pause, Duration::ZERO)
    };
    // Criterion's ten samples only at small sizes (one version at 1M nodes takes seconds).
    let mut group = c.benchmark_group("version");
    group.sample_size(10);
    if nodes <= 200_000 { group.bench_function(format!("pause_and_prepare/{nodes}x{dim}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (pause, prepare) = one(&mut s);
                pauses.push(pause.as_secs_f64() * 1e3);
                prepares.push(prepare.as_secs_f64() * 1e3);
                total += pause + prepare;
            }
            total
        })
    }); }
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

criterion_group!(benches, bench_version);
criterion_main!(benches);
