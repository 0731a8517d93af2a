//! Offline mode on the same code: `train --dataset NAME --epochs N` loads the dataset's train
//! split into a fresh store and trains it with [`crate::train::train_step`]; `eval --dataset NAME`
//! ranks the test split with the saved model. Used to compare with batch trainers on their own
//! standard splits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Device, Tensor};
use tracing::info;

use crate::config::Config;
use crate::offline::{self, DataSource};
use crate::schema::{decode_event, Schema};
use crate::store::{AppendBatch, Edge, GraphStore, StoreOptions};
use crate::train::Embeddings;
use crate::train::{evaluate, Filter, RankMetrics, Triple};
use crate::train::{schema_fingerprint, Checkpoints};
use crate::train::{train_step, TrainParams};

/// Where offline runs keep their store and model: `<storage.path>/../offline/<dataset>/` (a
/// `--data` folder's name is its last component).
pub fn run_dir(cfg: &Config, dataset: impl Into<DataSource>) -> PathBuf {
    let base = cfg.storage.path.parent().unwrap_or(Path::new("."));
    base.join("offline").join(dataset.into().name())
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub dataset: String,
    pub edges: u64,
    pub epochs: usize,
    pub seconds: f64,
    /// Positive edges trained per second (steps only, not loading).
    pub edges_per_sec: f64,
    pub final_loss: f64,
    pub skipped_steps: u64,
    pub device: String,
}

/// Remove a folder left by an earlier run, if any.
pub(crate) fn clear_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("clearing {}", path.display()))?;
    }
    Ok(())
}

/// A store for an offline run: no Kafka, so no event-id deduplication.
pub fn open_offline_store(path: &Path, schema: &Schema) -> anyhow::Result<GraphStore> {
    let opts = StoreOptions {
        dedup_window_ms: 0,
        ..Default::default()
    };
    Ok(GraphStore::open(path, schema, &opts)?)
}

/// Load a split's rows as events, resolved by the schema (the replay path's decoder); a row the
/// schema refuses (an unknown relation or node type, a relation that does not connect its types)
/// is an error naming its file and line.
pub fn split_events(
    cfg: &Config,
    schema: &Schema,
    dataset: impl Into<DataSource>,
    split: &str,
) -> anyhow::Result<Vec<crate::schema::Event>> {
    let source = dataset.into();
    let limits = cfg.file_decode_limits();
    let name = source.name();
    let mut out = Vec::new();
    for file in offline::read_splits(&cfg.datasets.dir, &source, &[split.to_owned()])? {
        for (row, e) in file.rows.iter().zip(file.events(&name)) {
            let event =
                decode_event(schema, &limits, Some(e.payload().as_bytes()), 0).map_err(|err| {
                    anyhow::anyhow!("{}:{}: {}", file.path.display(), row.line, err.detail)
                })?;
            out.push(event);
        }
    }
    Ok(out)
}

/// The events of `splits` in replay order, each checked against the config's schema first (a
/// row it refuses is an error naming its file and line).
pub fn checked_replay_events(
    cfg: &Config,
    dataset: impl Into<DataSource>,
    splits: &[String],
) -> anyhow::Result<Vec<offline::ReplayEvent>> {
    let source = dataset.into();
    let (schema, limits, name) = (cfg.schema(), cfg.file_decode_limits(), source.name());
    let mut out = Vec::new();
    for file in offline::read_splits(&cfg.datasets.dir, &source, splits)? {
        for (row, e) in file.rows.iter().zip(file.events(&name)) {
            decode_event(&schema, &limits, Some(e.payload().as_bytes()), 0).map_err(|err| {
                anyhow::anyhow!("{}:{}: {}", file.path.display(), row.line, err.detail)
            })?;
            out.push(e);
        }
    }
    Ok(out)
}

/// Train from scratch on the train split; saves the model in [`run_dir`].
pub fn train(
    cfg: &Config,
    dataset: impl Into<DataSource>,
    epochs: usize,
    device: Device,
) -> anyhow::Result<TrainReport> {
    let dataset = dataset.into();
    let dir = run_dir(cfg, &dataset);
    let store_dir = dir.join("store");
    // A fresh store starts a fresh model: its old checkpoints index another store.
    clear_dir(&store_dir)?;
    clear_dir(&dir.join("checkpoints"))?;
    std::fs::create_dir_all(&dir)?;
    let schema = cfg.schema();
    let store = open_offline_store(&store_dir, &schema)?;
    let events = split_events(cfg, &schema, &dataset, "train")?;
    let batch = AppendBatch::from_events(&format!("offline:{dataset}"), 0, events);
    store.append(&batch)?;
    let mut edges: Vec<_> = store
        .edges_from(0, usize::MAX)?
        .into_iter()
        .map(|(_, e)| e)
        .collect();

    let p = &cfg.train;
    tch::manual_seed(p.seed as i64);
    let mut rng = SmallRng::seed_from_u64(p.seed);
    let mut model = Embeddings::for_schema(&schema, p, device);
    // Every stored node gets a row before training (the offline graph is fully known).
    for (t, table) in model.tables.iter_mut().enumerate() {
        let n = store.node_count(t as u16) as i64;
        table.grow(n, |count| {
            Tensor::randn([count, p.dim], (tch::Kind::Float, device)) * p.init_scale
        });
    }
    let started = Instant::now();
    let (mut last_loss, mut skipped) = (f64::NAN, 0u64);
    for epoch in 0..epochs {
        edges.shuffle(&mut rng);
        let (sum, n, epoch_skipped) = if p.offline_workers > 1 {
            hogwild_epoch(&model, &edges, p, epoch as u64)
        } else {
            batches_of(&mut model, edges.chunks(p.batch_size), p, &mut rng)
        };
        skipped += epoch_skipped;
        last_loss = sum / n.max(1) as f64;
        if epoch == 0 || (epoch + 1) % 10 == 0 || epoch + 1 == epochs {
            info!(epoch = epoch + 1, loss = last_loss, "epoch");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let fingerprint = schema_fingerprint(store.stored_schema());
    Checkpoints::new(&dir.join("checkpoints"), 2).save(&model, store.edge_count(), fingerprint)?;
    Ok(TrainReport {
        dataset: dataset.name(),
        edges: edges.len() as u64,
        epochs,
        seconds,
        edges_per_sec: (edges.len() * epochs) as f64 / seconds.max(1e-9),
        final_loss: last_loss,
        skipped_steps: skipped,
        device: format!("{device:?}"),
    })
}

/// Steps on `batches`: `(Σ loss · edges, edges, skipped steps)`.
fn batches_of<'a>(
    model: &mut Embeddings,
    batches: impl Iterator<Item = &'a [Edge]>,
    p: &TrainParams,
    rng: &mut SmallRng,
) -> (f64, usize, u64) {
    let (mut sum, mut n, mut skipped) = (0.0, 0usize, 0u64);
    for batch in batches {
        let s = train_step(model, batch, p, rng);
        if s.skipped {
            skipped += 1;
        } else {
            sum += s.loss * s.edges as f64;
            n += s.edges;
        }
    }
    (sum, n, skipped)
}

/// One epoch on `train.offline_workers` threads, batch `i` on worker `i mod workers`, each
/// stepping through its own handle on the shared tables ([`Embeddings::share`]) with one
/// libtorch thread and its own draws.
fn hogwild_epoch(
    model: &Embeddings,
    edges: &[Edge],
    p: &TrainParams,
    epoch: u64,
) -> (f64, usize, u64) {
    let workers = p.offline_workers;
    let batches: Vec<&[Edge]> = edges.chunks(p.batch_size).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let mut share = model.share();
                let mine = batches.iter().skip(w).step_by(workers).copied();
                let seed = p.seed
                    ^ (epoch * workers as u64 + w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                scope.spawn(move || {
                    // libtorch's intra-op pool is per thread here: one each, as PBG's workers.
                    tch::set_num_threads(1);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    batches_of(&mut share, mine, p, &mut rng)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .fold((0.0, 0, 0), |acc, r| {
                (acc.0 + r.0, acc.1 + r.1, acc.2 + r.2)
            })
    })
}

/// What `eval` prints: the ranking metrics and the held-out edges it could not rank.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub dataset: String,
    pub split: String,
    #[serde(flatten)]
    pub metrics: RankMetrics,
    /// Held-out edges with a node the train split never saw (not ranked; see warm start).
    pub skipped_unseen: usize,
}

/// Filtered ranking of a split (`valid` or `test`) with the model `train` saved.
pub fn eval(
    cfg: &Config,
    dataset: impl Into<DataSource>,
    split: &str,
    device: Device,
) -> anyhow::Result<EvalReport> {
    let dataset = dataset.into();
    let dir = run_dir(cfg, &dataset);
    let schema = cfg.schema();
    let store = GraphStore::open(&dir.join("store"), &schema, &StoreOptions::default())?;
    let fingerprint = schema_fingerprint(store.stored_schema());
    let model = Checkpoints::new(&dir.join("checkpoints"), 2)
        .load(fingerprint, device)?
        .with_context(|| {
            format!(
                "no model in {}: run `twhin-stream train` on {dataset} first",
                dir.display()
            )
        })?
        .model;
    // Events whose nodes are all known, in model coordinates; the others are only counted.
    let resolve = |events: Vec<crate::schema::Event>| -> anyhow::Result<(Vec<Triple>, usize)> {
        let (mut known, mut unseen) = (Vec::new(), 0);
        for e in events {
            let s = store.node_index(e.src.node_type, &e.src.id)?;
            let d = store.node_index(e.dst.node_type, &e.dst.id)?;
            match (s, d) {
                (Some(s), Some(d)) => known.push((
                    e.src.node_type as usize,
                    s as i64,
                    e.rel as i64,
                    e.dst.node_type as usize,
                    d as i64,
                )),
                _ => unseen += 1,
            }
        }
        Ok((known, unseen))
    };
    let mut all = Vec::new();
    let (mut target, mut skipped_unseen) = (Vec::new(), 0);
    for s in ["train", "valid", "test"] {
        let (triples, unseen) = resolve(split_events(cfg, &schema, &dataset, s)?)?;
        if s == split {
            target = triples.clone();
            skipped_unseen = unseen;
        }
        all.extend(triples);
    }
    let filter = Filter::new(&all);
    Ok(EvalReport {
        dataset: dataset.name(),
        split: split.into(),
        metrics: evaluate(&model, cfg.train.comparator, &target, &filter, 256),
        skipped_unseen,
    })
}

/// The start of a streamed run through the daemon's trainer: a fresh store in `dir`, the
/// `splits` of `dataset` as events in order, and a fresh trainer with `opts` (seeded by
/// `train.seed`).
pub fn stream_start(
    cfg: &Config,
    dataset: impl Into<DataSource>,
    splits: &[&str],
    dir: &Path,
    opts: crate::config::TrainerConfig,
    device: Device,
) -> anyhow::Result<(
    GraphStore,
    Vec<crate::schema::Event>,
    crate::train::TrainerCore,
)> {
    clear_dir(dir)?;
    let schema = cfg.schema();
    let store = open_offline_store(dir, &schema)?;
    let dataset = dataset.into();
    let mut events = Vec::new();
    for split in splits {
        events.extend(split_events(cfg, &schema, &dataset, split)?);
    }
    let p = &cfg.train;
    tch::manual_seed(p.seed as i64);
    let core =
        crate::train::TrainerCore::new(Embeddings::for_schema(&schema, p, device), p.clone(), opts);
    Ok((store, events, core))
}

/// Append `events` to `store` in batches of `batch`, as consumed from `source` from
/// `first_offset` on (each batch's offsets written with its edges, as ingest writes them).
pub fn append_events(
    store: &GraphStore,
    source: &str,
    events: &[crate::schema::Event],
    batch: usize,
    first_offset: i64,
) -> anyhow::Result<()> {
    let mut offset = first_offset;
    for chunk in events.chunks(batch.max(1)) {
        store.append(&AppendBatch::from_events(
            source,
            offset,
            chunk.iter().cloned(),
        ))?;
        offset += chunk.len() as i64;
    }
    Ok(())
}

/// The daemon's streaming step until the trainer has caught up with the log.
pub fn drain(core: &mut crate::train::TrainerCore, store: &GraphStore) -> anyhow::Result<()> {
    while core.step(store)?.stats.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NodeRef;

    /// Two workers train every batch of the epoch, and their updates land in the one model they
    /// share: a loss that falls over epochs and rows that moved in the caller's tables.
    #[test]
    fn hogwild_workers_train_every_batch_into_the_shared_tables() {
        let mut p = Config::load(None).expect("defaults").train;
        (p.dim, p.batch_size, p.chunk_size, p.uniform_negatives) = (8, 16, 8, 4);
        (p.offline_workers, p.lr) = (2, 0.2);
        let node = |index: u32| NodeRef {
            node_type: 0,
            index,
        };
        let edges: Vec<Edge> = (0..96u32)
            .map(|i| Edge {
                src: node(i % 12),
                rel: 0,
                dst: node(12 + (i % 12 + i / 12) % 6),
                ts: 0,
                weight: 1.0,
            })
            .collect();
        tch::manual_seed(3);
        let mut model = Embeddings::new(1, 1, p.dim, 0.1, Device::Cpu);
        crate::train::ensure_rows(&mut model, &edges, 0.1);
        let before = model.tables[0].rows().copy();
        let mut losses = Vec::new();
        for epoch in 0..30 {
            let (sum, n, skipped) = hogwild_epoch(&model, &edges, &p, epoch);
            assert_eq!((n, skipped), (edges.len(), 0), "epoch {epoch}");
            losses.push(sum / n as f64);
        }
        let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
        assert!(
            mean(&losses[25..]) < 0.95 * mean(&losses[..5]),
            "{losses:?}"
        );
        let moved = (model.tables[0].rows() - before)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            moved > 0.01,
            "the caller's tables hold the workers' updates: {moved}"
        );
    }
}
