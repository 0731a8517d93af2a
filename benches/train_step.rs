//! Training-step throughput (positive edges/s) on the MovieLens-100k graph (users, movies,
//! knowledge-graph entities; the 176,631 edges of its train split) at PyTorch-BigGraph's settings
//! (`config/pbg-settings.toml`): dimension 128, dot comparator, a translation per relation and
//! direction (`train.reverse_relations`), logistic loss, 50 in-batch (chunks of 50) plus 50
//! uniform negatives per side, init 0.001, lr 0.1; batches of 1k, 16k and 64k edges. CPU always;
//! CUDA too when libtorch sees a GPU. Until issue 13 this group ran chunks of 256 plus 64 uniform
//! negatives with one translation per relation.
//!
//! A second group, `user_model/…`, times the step the daemon actually runs on MovieLens
//! (`config/movielens-100k.toml` as shipped: the two rating relations, every movie a negative
//! under a softmax, a per-movie bias, a user scored with the decayed sum of their last 50 movies)
//! on the rating edges in time order, each user's history being their ratings before the batch.
//!
//! Each step is timed twice: as the trainer runs it (`batch/N`: the dot comparator's gradients
//! derived by hand) and on autograd (`autograd/batch/N`, the step before that), in one run.
//!
//! Needs the dataset (`bash .ci/setup`). Run with `cargo bench --bench train_step`
//! (`TRAIN_STEP_ONLY=user_model` or `=pbg` for one group).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use tch::Device;

use twhin_stream::config::Config;
use twhin_stream::offline::{replay_events, Dataset};
use twhin_stream::schema::decode_event;
use twhin_stream::store::{Edge, NodeRef};
use twhin_stream::train::Comparator;
use twhin_stream::train::Embeddings;
use twhin_stream::train::LossKind;
use twhin_stream::train::{
    ensure_rows, train_step_autograd, train_step_with, weighted_recent, History, Pull, StepStats,
    TrainParams,
};

/// A step function: the trainer's (the dot comparator's gradients derived by hand), or autograd's.
type Step = fn(
    &mut Embeddings,
    &[Edge],
    &TrainParams,
    &mut SmallRng,
    Option<&Pull<'_>>,
    Option<History<'_>>,
) -> StepStats;

/// `(name prefix, step)`: the trainer's step, then autograd's (the same step before issue 13's
/// hand-derived gradients).
const STEPS: [(&str, Step); 2] = [("", train_step_with), ("autograd/", train_step_autograd)];

fn movielens_edges() -> (Config, Vec<Edge>) {
    let root = common::repo_root();
    let cfg = Config::load(Some(&root.join("config/movielens-100k.toml"))).expect("config");
    let schema = cfg.schema();
    let limits = cfg.file_decode_limits();
    let events = replay_events(
        &root.join(&cfg.datasets.dir),
        Dataset::MovieLens100k,
        &["train".into()],
    )
    .expect("MovieLens-100k is missing: run `bash .ci/setup`");
    let mut ids: HashMap<(u16, String), u32> = HashMap::new();
    let mut counts = vec![0u32; schema.node_types().len()];
    let mut node = |t: u16, id: &str| {
        let next = &mut counts[t as usize];
        let index = *ids.entry((t, id.to_owned())).or_insert_with(|| {
            *next += 1;
            *next - 1
        });
        NodeRef {
            node_type: t,
            index,
        }
    };
    let edges = events
        .iter()
        .map(|e| {
            let ev = decode_event(&schema, &limits, Some(e.payload().as_bytes()), 0)
                .expect("valid event");
            Edge {
                src: node(ev.src.node_type, &ev.src.id),
                rel: ev.rel,
                dst: node(ev.dst.node_type, &ev.dst.id),
                ts: ev.ts,
                weight: ev.weight,
            }
        })
        .collect();
    (cfg, edges)
}

fn only(group: &str) -> bool {
    std::env::var("TRAIN_STEP_ONLY").map_or(true, |g| g == group)
}

fn bench(c: &mut Criterion) {
    if only("pbg") {
        bench_pbg_settings(c);
    }
    if only("user_model") {
        bench_user_model(c);
    }
}

/// The shipped MovieLens step on its rating edges (see the module docs).
fn bench_user_model(c: &mut Criterion) {
    let (cfg, mut edges) = movielens_edges();
    let schema = cfg.schema();
    let trained: Vec<u16> = cfg
        .trainer
        .train_relations
        .iter()
        .filter_map(|r| schema.rel_id(r))
        .collect();
    edges.retain(|e| trained.contains(&e.rel));
    edges.sort_by_key(|e| e.ts);
    let params = cfg.train.clone();
    tch::set_num_threads(cfg.torch.threads);
    let batch = 1_000usize;
    let mut group = c.benchmark_group("user_model/Cpu");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    for (prefix, step) in STEPS {
        tch::manual_seed(7);
        let mut model = Embeddings::for_schema(&schema, &params, Device::Cpu);
        model.set_biased(schema.node_types(), &params.bias_types);
        ensure_rows(&mut model, &edges, params.init_scale);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut at = 0usize;
        group.throughput(Throughput::Elements(batch as u64));
        // Each user's movies rated before the batch, as the trainer reads them from the store
        // (seq = position in the stream), kept up to date outside the timed step.
        let mut seen: HashMap<u32, Vec<(u64, u16, i64)>> = HashMap::new();
        group.bench_function(format!("{prefix}batch/{batch}"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if at + batch > edges.len() {
                        at = 0;
                        seen.clear();
                    }
                    let lookup = |n: NodeRef, _dst_type: usize| {
                        seen.get(&n.index).map_or_else(Vec::new, |t| {
                            weighted_recent(
                                t.clone(),
                                params.history_recent,
                                params.history_decay,
                                params.history_by_relation,
                            )
                        })
                    };
                    let history: History<'_> = &lookup;
                    let started = std::time::Instant::now();
                    let stats = step(
                        &mut model,
                        &edges[at..at + batch],
                        &params,
                        &mut rng,
                        None,
                        Some(history),
                    );
                    timed += started.elapsed();
                    assert!(!stats.skipped);
                    for (i, e) in edges[at..at + batch].iter().enumerate() {
                        seen.entry(e.src.index).or_default().push((
                            (at + i) as u64,
                            e.rel,
                            e.dst.index as i64,
                        ));
                    }
                    at += batch;
                }
                timed
            })
        });
    }
    group.finish();
}

/// PyTorch-BigGraph's settings on every edge of the train split.
fn bench_pbg_settings(c: &mut Criterion) {
    let (cfg, edges) = movielens_edges();
    let schema = cfg.schema();
    let params = TrainParams {
        dim: 128,
        comparator: Comparator::Dot,
        loss: LossKind::Logistic,
        lr: 0.1,
        relation_lr: 0.1,
        uniform_negatives: 50,
        chunk_size: 50,
        init_scale: 0.001,
        batch_size: 1000,
        seed: 7,
        all_targets_up_to: 0,
        history_types: Vec::new(),
        history_recent: 0,
        history_decay: 1.0,
        history_by_relation: false,
        bias_types: Vec::new(),
        reverse_relations: true,
        offline_workers: 1,
    };
    tch::set_num_threads(cfg.torch.threads);
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    for device in devices {
        let mut group = c.benchmark_group(format!("train_step/{device:?}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .measurement_time(Duration::from_secs(8));
        for (batch, (prefix, step)) in [1_000usize, 16_000, 64_000]
            .into_iter()
            .flat_map(|batch| STEPS.map(|s| (batch, s)))
        {
            tch::manual_seed(7);
            let mut model = Embeddings::for_schema(&schema, &params, device);
            ensure_rows(&mut model, &edges, params.init_scale);
            let mut rng = SmallRng::seed_from_u64(7);
            let mut at = 0usize;
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(format!("{prefix}batch/{batch}"), |b| {
                b.iter(|| {
                    if at + batch > edges.len() {
                        at = 0;
                    }
                    let stats = step(
                        &mut model,
                        &edges[at..at + batch],
                        &params,
                        &mut rng,
                        None,
                        None,
                    );
                    at += batch;
                    assert!(!stats.skipped);
                    stats.loss
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
