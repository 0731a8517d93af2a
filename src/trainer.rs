//! The trainer actor (DESIGN §4): turns the store's new edges into better embeddings, on its own
//! thread (a one-thread `SyncArbiter`, so libtorch never blocks an async arbiter).
//!
//! Each step of [`TrainerCore::step`]:
//! 1. reads the next micro-batch of new edges from its cursor ([`GraphStore::edges_from`]); the
//!    batch size adapts to the backlog ([`next_batch_size`]);
//! 2. *tests* a sample of them first (prequential: the target ranked, filtered, against all nodes
//!    of its type, before any training on it) when both nodes already have rows;
//! 3. gives new nodes rows: warm-started from already-embedded neighbours ([`crate::warm`]) or
//!    random;
//! 4. mixes in `replay_ratio` edges per new edge drawn uniformly from the whole log and runs one
//!    [`train_step`];
//! 5. moves the cursor past the new edges — only now, so a checkpoint's cursor always means "every
//!    edge before this was trained into these tables".
//!
//! The actor runs steps back to back for at most `trainer.round_budget_ms` per [`TrainRound`]
//! message, then answers; the lifecycle (`app.rs`) keeps sending rounds and, when idle, waits
//! `trainer.idle_poll_ms`. Checkpoints are written every `trainer.checkpoint_interval_secs` and on
//! [`SaveCheckpoint`]; a restart resumes from the newest usable one ([`TrainerCore::open`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::align::Snapshot;
use crate::checkpoint::{schema_fingerprint, CheckpointError, Checkpoints};
use crate::config::{Config, TrainerConfig};
use crate::eval::{target_ranks, TargetQuery};
use crate::messages::{
    CommitVersion, PrepareVersion, RestoreCheckpoint, SaveCheckpoint, SetPull, TakeSnapshot,
    TrainRound,
};
use crate::model::Embeddings;
use crate::publish::{RowRecord, VersionMarker};
use crate::serving::{PublishedView, ServingView};
use crate::store::{Direction, Edge, GraphStore, StoreError};
use crate::telemetry as m;
use crate::train::{rows_needed, train_step_pulled, Pull, StepStats, TrainParams};

/// The persisted reference's file stem in `publish.path`.
pub const REFERENCE: &str = "reference";

/// Known targets looked up per prequential query for filtering.
const FILTER_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("trainer: reading the store: {0}")]
    Store(#[from] StoreError),
    #[error("trainer: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("trainer: the model was lost after an earlier failure")]
    Gone,
    #[error("trainer: {rows} rows hold non-finite values; not checkpointed")]
    NonFinite { rows: i64 },
    #[error("trainer: a step panicked at cursor {cursor}: {message}")]
    Panicked { cursor: u64, message: String },
    #[error("trainer: {0}")]
    Snapshot(#[from] crate::publish::SnapshotError),
    #[error(
        "trainer: checkpoint {version} in trainer.checkpoint_path = {path} is ahead of the store \
         at storage.path ({problem}): it belongs to another store; point trainer.checkpoint_path \
         elsewhere or remove it"
    )]
    ForeignCheckpoint {
        version: u64,
        path: String,
        problem: String,
    },
}

/// The next micro-batch size: double while the backlog is more than four batches (up to `max`),
/// halve back toward `base` once it is under half a batch.
pub fn next_batch_size(current: usize, backlog: u64, base: usize, max: usize) -> usize {
    let current = current.clamp(base, max);
    if backlog > 4 * current as u64 {
        (current * 2).min(max)
    } else if backlog < (current / 2) as u64 {
        (current / 2).max(base)
    } else {
        current
    }
}

/// Replayed edges for `fresh` new ones at `ratio` replayed per new edge.
fn replay_count(fresh: usize, ratio: f64) -> usize {
    (fresh as f64 * ratio).round() as usize
}

/// The stored targets of `(src, rel)` of type `dst_type` (for filtered ranking).
pub fn known_targets(
    store: &GraphStore,
    src: crate::store::NodeRef,
    rel: u16,
    dst_type: u16,
) -> Result<Vec<i64>, StoreError> {
    Ok(store
        .neighbors(src, Some(rel), Some(Direction::Out), FILTER_LIMIT)?
        .into_iter()
        .filter(|n| n.node.node_type == dst_type)
        .map(|n| n.node.index as i64)
        .collect())
}

/// The last `capacity` prequential ranks.
#[derive(Debug)]
pub struct RankWindow {
    ranks: VecDeque<f64>,
    capacity: usize,
    total: u64,
}

impl RankWindow {
    pub fn new(capacity: usize) -> RankWindow {
        RankWindow {
            ranks: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
            total: 0,
        }
    }

    pub fn extend(&mut self, ranks: impl IntoIterator<Item = f64>) {
        for r in ranks {
            if self.ranks.len() == self.capacity {
                self.ranks.pop_front();
            }
            self.ranks.push_back(r);
            self.total += 1;
        }
    }

    /// `(mrr, hits@10)` over the window; `None` before the first rank.
    pub fn figures(&self) -> Option<(f64, f64)> {
        if self.ranks.is_empty() {
            return None;
        }
        let n = self.ranks.len() as f64;
        let mrr = self.ranks.iter().map(|r| 1.0 / r).sum::<f64>() / n;
        let hits = self.ranks.iter().filter(|&&r| r <= 10.0).count() as f64 / n;
        Some((mrr, hits))
    }

    /// Ranks in the window now.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// Ranks ever added.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// What one step did.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub new_edges: usize,
    pub replayed: usize,
    /// `None` when there was nothing to train.
    pub stats: Option<StepStats>,
    /// Edges left behind the cursor after the step.
    pub backlog: u64,
    pub batch_size: usize,
    pub seconds: f64,
    pub warm_rows: usize,
    pub random_rows: usize,
    /// Prequential ranks of the edges tested before the step.
    pub ranks: Vec<f64>,
    /// The relation of each rank (same order).
    pub rank_relations: Vec<u16>,
}

/// The trainer's state and logic, without the actor (used by the actor, the offline
/// `warm-start` measurement and the tests).
pub struct TrainerCore {
    pub model: Embeddings,
    params: TrainParams,
    opts: TrainerConfig,
    cursor: u64,
    batch: usize,
    rng: SmallRng,
    pub window: RankWindow,
    /// The same per relation: a stream mixes tasks of very different difficulty (a knowledge
    /// graph's edges and ratings), and one window over all of them hides which one moves.
    pub by_relation: BTreeMap<u16, RankWindow>,
    /// Per type and row: event time (ms) of the newest trained edge that touched it.
    row_ts: Vec<Vec<i64>>,
    /// What subscribers of the last acknowledged version hold (on the model's device): decides
    /// which rows moved, and is what the drift control pulls toward.
    reference: Option<Reference>,
    /// A prepared version's view, made the reference when its marker is acknowledged.
    pending: Option<Reference>,
    /// Strength of the L2 pull toward the reference (0: none), set by the alignment actor.
    pull: f64,
}

/// One published version's parameters as subscribers hold them.
pub struct Reference {
    pub version: u64,
    pub epoch: u64,
    pub tables: Vec<Tensor>,
    pub relations: Tensor,
}

impl Reference {
    fn to_cpu(&self) -> Snapshot {
        Snapshot {
            tables: self
                .tables
                .iter()
                .map(|t| t.to_device(Device::Cpu))
                .collect(),
            relations: self.relations.to_device(Device::Cpu),
        }
    }
}

impl TrainerCore {
    /// A fresh model, cursor 0.
    pub fn new(model: Embeddings, params: TrainParams, opts: TrainerConfig) -> TrainerCore {
        TrainerCore::resume(model, 0, params, opts)
    }

    /// Continue from `model` trained up to `cursor`.
    pub fn resume(
        model: Embeddings,
        cursor: u64,
        params: TrainParams,
        opts: TrainerConfig,
    ) -> TrainerCore {
        TrainerCore {
            row_ts: vec![Vec::new(); model.tables.len()],
            reference: None,
            pending: None,
            pull: 0.0,
            rng: SmallRng::seed_from_u64(params.seed ^ cursor),
            batch: params.batch_size,
            window: RankWindow::new(opts.prequential_window),
            by_relation: Default::default(),
            model,
            params,
            opts,
            cursor,
        }
    }

    /// Resume from the newest usable checkpoint in `trainer.checkpoint_path`, or start fresh.
    pub fn open(
        cfg: &Config,
        store: &GraphStore,
        device: Device,
    ) -> Result<TrainerCore, TrainerError> {
        let fingerprint = schema_fingerprint(store.stored_schema());
        let ckpts = Checkpoints::new(&cfg.trainer.checkpoint_path, cfg.trainer.checkpoint_keep);
        let (params, opts) = (cfg.train.clone(), cfg.trainer.clone());
        Ok(match ckpts.load(fingerprint, device)? {
            Some(r) => {
                let ahead = if r.meta.cursor > store.edge_count() {
                    Some(format!(
                        "cursor {} > {} stored edges",
                        r.meta.cursor,
                        store.edge_count()
                    ))
                } else {
                    r.meta
                        .rows
                        .iter()
                        .enumerate()
                        .find(|&(t, &n)| n > store.node_count(t as u16) as i64)
                        .map(|(t, n)| {
                            format!(
                                "{n} rows of type {t} > {} stored nodes",
                                store.node_count(t as u16)
                            )
                        })
                };
                if let Some(problem) = ahead {
                    return Err(TrainerError::ForeignCheckpoint {
                        version: r.meta.version,
                        path: cfg.trainer.checkpoint_path.display().to_string(),
                        problem,
                    });
                }
                info!(
                    version = r.meta.version,
                    cursor = r.meta.cursor,
                    path = %cfg.trainer.checkpoint_path.display(),
                    "trainer resumed from checkpoint"
                );
                TrainerCore::resume(r.model, r.meta.cursor, params, opts)
            }
            None => {
                tch::manual_seed(params.seed as i64);
                let model = Embeddings::for_schema(&cfg.schema(), &params, device);
                info!(path = %cfg.trainer.checkpoint_path.display(), "trainer starts a new model (no checkpoint)");
                TrainerCore::new(model, params, opts)
            }
        })
    }

    /// Store sequence number of the next edge to train.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// One step on the next micro-batch (see the module docs). Does nothing when the cursor is
    /// at the end of the log.
    pub fn step(&mut self, store: &GraphStore) -> Result<StepReport, StoreError> {
        let started = Instant::now();
        let backlog = store.edge_count().saturating_sub(self.cursor);
        self.batch = next_batch_size(
            self.batch,
            backlog,
            self.params.batch_size,
            self.opts.max_batch_size,
        );
        let mut report = StepReport {
            backlog,
            batch_size: self.batch,
            ..Default::default()
        };
        if backlog == 0 {
            return Ok(report);
        }
        let read = store.edges_from(self.cursor, self.batch)?;
        let Some(&(last_seq, _)) = read.last() else {
            return Ok(report);
        };
        let fresh: Vec<Edge> = read.into_iter().map(|(_, e)| e).collect();
        (report.ranks, report.rank_relations) = self.prequential(store, &fresh)?;
        (report.warm_rows, report.random_rows) = self.add_rows(store, &fresh)?;
        let replay = replay_count(fresh.len(), self.opts.replay_ratio);
        let mut edges = fresh;
        report.new_edges = edges.len();
        edges.extend(store.sample_edges(&mut self.rng, replay)?);
        report.replayed = edges.len() - report.new_edges;
        let pull = self.reference.as_ref().map(|r| Pull {
            tables: &r.tables,
            relations: &r.relations,
            strength: self.pull,
        });
        report.stats = Some(train_step_pulled(
            &mut self.model,
            &edges,
            &self.params,
            &mut self.rng,
            pull.as_ref(),
        ));
        for e in &edges[..report.new_edges] {
            for n in [e.src, e.dst] {
                let ts = &mut self.row_ts[n.node_type as usize];
                let i = n.index as usize;
                if ts.len() <= i {
                    ts.resize(i + 1, 0);
                }
                ts[i] = ts[i].max(e.ts as i64);
            }
        }
        self.cursor = last_seq + 1;
        self.window.extend(report.ranks.iter().copied());
        for (&rank, &rel) in report.ranks.iter().zip(&report.rank_relations) {
            let capacity = self.opts.prequential_window;
            self.by_relation
                .entry(rel)
                .or_insert_with(|| RankWindow::new(capacity))
                .extend([rank]);
        }
        report.backlog = store.edge_count().saturating_sub(self.cursor);
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Rank a sample of `fresh` (edges between nodes that already have rows) before training:
    /// `(ranks, their relations)`.
    fn prequential(
        &mut self,
        store: &GraphStore,
        fresh: &[Edge],
    ) -> Result<(Vec<f64>, Vec<u16>), StoreError> {
        let has_row = |n: crate::store::NodeRef| {
            (n.index as i64) < self.model.tables[n.node_type as usize].len()
        };
        let eligible: Vec<&Edge> = fresh
            .iter()
            .filter(|e| has_row(e.src) && has_row(e.dst))
            .collect();
        let k = self.opts.prequential_per_step.min(eligible.len());
        if k == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut queries = Vec::with_capacity(k);
        let mut relations = Vec::with_capacity(k);
        for i in sample(&mut self.rng, eligible.len(), k) {
            let e = eligible[i];
            relations.push(e.rel);
            let known = known_targets(store, e.src, e.rel, e.dst.node_type)?;
            queries.push(TargetQuery {
                src_type: e.src.node_type as usize,
                src: e.src.index as i64,
                rel: e.rel as i64,
                dst_type: e.dst.node_type as usize,
                dst: e.dst.index as i64,
                known,
            });
        }
        Ok((
            target_ranks(&self.model, self.params.comparator, &queries),
            relations,
        ))
    }

    /// Rows for the nodes `edges` name that have none yet: `(warm-started, random)` counts.
    fn add_rows(
        &mut self,
        store: &GraphStore,
        edges: &[Edge],
    ) -> Result<(usize, usize), StoreError> {
        let (dim, device, scale) = (self.model.dim, self.model.device, self.params.init_scale);
        let (mut warm, mut random) = (0, 0);
        for (t, n) in rows_needed(&self.model, edges).into_iter().enumerate() {
            let start = self.model.tables[t].len();
            if n <= start {
                continue;
            }
            let rows = if self.opts.warm_start {
                warm += (n - start) as usize;
                crate::warm::warm_rows(
                    &self.model,
                    store,
                    t as u16,
                    start,
                    n - start,
                    scale,
                    self.opts.warm_start_shrinkage,
                )?
            } else {
                random += (n - start) as usize;
                Tensor::randn([n - start, dim], (Kind::Float, device)) * scale
            };
            self.model.tables[t].grow(n, |_| rows);
        }
        Ok((warm, random))
    }

    /// The current parameters and the reference, copied to the CPU (for the alignment actor).
    pub fn snapshot(&self) -> (Snapshot, Option<Snapshot>) {
        let current = Snapshot {
            tables: self
                .model
                .tables
                .iter()
                .map(|t| t.rows().to_device(Device::Cpu).copy())
                .collect(),
            relations: self.model.relations.to_device(Device::Cpu).copy(),
        };
        (current, self.reference.as_ref().map(Reference::to_cpu))
    }

    /// Rotate every row and relation vector by the orthogonal `r [D, D]` (Procrustes onto the
    /// anchor). Dot, L2 and cosine scores are unchanged; row-wise Adagrad state is a norm, so it
    /// stays valid too.
    pub fn rotate(&mut self, r: &Tensor) {
        tch::no_grad(|| {
            let r = r.to_device(self.model.device);
            for table in &mut self.model.tables {
                let mut rows = table.rows();
                let turned = rows.matmul(&r);
                rows.copy_(&turned);
            }
            let turned = self.model.relations.matmul(&r);
            self.model.relations.copy_(&turned);
        })
    }

    /// Adopt `reference` (a published version read back from disk at start).
    pub fn set_reference(&mut self, version: u64, s: Snapshot) {
        let device = self.model.device;
        self.reference = Some(Reference {
            version,
            epoch: 0,
            tables: s.tables.iter().map(|t| t.to_device(device)).collect(),
            relations: s.relations.to_device(device),
        });
    }

    /// Strength of the pull toward the reference from now on.
    pub fn set_pull(&mut self, strength: f64) {
        self.pull = strength;
    }

    pub fn reference_version(&self) -> Option<u64> {
        self.reference.as_ref().map(|r| r.version)
    }

    /// The rows version `version` carries (see [`crate::publish::rows_to_publish`]), encoded,
    /// with its marker; `None` when no node row moved since the reference. First applies the
    /// alignment's rotation, if any. The view subscribers will hold (the reference with the moved
    /// rows replaced) becomes the reference in [`TrainerCore::commit_version`].
    pub fn prepare_version(
        &mut self,
        store: &GraphStore,
        req: &PrepareVersion,
    ) -> Result<Option<PreparedVersion>, StoreError> {
        if let Some(r) = &req.rotation {
            self.rotate(r);
        }
        let schema = store.stored_schema();
        let mut rows = Vec::new();
        let mut newest = 0i64;
        let dim = self.model.dim as usize;
        let mut view = Vec::with_capacity(self.model.tables.len());
        for (t, table) in self.model.tables.iter().enumerate() {
            let current = table.rows();
            let reference = match &self.reference {
                Some(r) => r.tables[t].shallow_clone(),
                None => Tensor::zeros([0, self.model.dim], (Kind::Float, current.device())),
            };
            let moved = crate::publish::rows_to_publish(&current, &reference, req.threshold);
            let n_ref = reference.size()[0].min(current.size()[0]);
            let mut published = Tensor::cat(
                &[
                    reference.narrow(0, 0, n_ref),
                    current.narrow(0, n_ref, current.size()[0] - n_ref),
                ],
                0,
            );
            if moved.is_empty() {
                view.push(published);
                continue;
            }
            let idx = Tensor::from_slice(&moved).to_device(current.device());
            let picked = current.index_select(0, &idx);
            let _ = published.index_copy_(0, &idx, &picked);
            view.push(published);
            let values = Vec::<f32>::try_from(picked.to_device(Device::Cpu).reshape([-1]))
                .expect("f32 rows");
            for (k, &i) in moved.iter().enumerate() {
                let node = crate::store::NodeRef {
                    node_type: t as u16,
                    index: i as u32,
                };
                let Some(id) = store.node_id(node)? else {
                    continue;
                };
                let ts = self.row_ts[t].get(i as usize).copied().unwrap_or(0);
                newest = newest.max(ts);
                let record = RowRecord {
                    version: req.version,
                    epoch: req.epoch,
                    ts,
                    vector: values[k * dim..(k + 1) * dim].to_vec(),
                };
                rows.push((
                    format!("{}:{id}", schema.node_types[t]),
                    record.encode(req.format),
                ));
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let relations = self.model.relations.copy();
        let values =
            Vec::<f32>::try_from(relations.to_device(Device::Cpu).reshape([-1])).expect("f32");
        for (r, (name, _, _)) in schema.relations.iter().enumerate() {
            let record = RowRecord {
                version: req.version,
                epoch: req.epoch,
                ts: newest,
                vector: values[r * dim..(r + 1) * dim].to_vec(),
            };
            rows.push((format!("relation:{name}"), record.encode(req.format)));
        }
        self.pending = Some(Reference {
            version: req.version,
            epoch: req.epoch,
            tables: view,
            relations,
        });
        let marker = VersionMarker {
            version: req.version,
            epoch: req.epoch,
            rows: rows.len() as u64,
            align: req.align.clone(),
        };
        Ok(Some(PreparedVersion {
            rows,
            marker,
            newest_ts: newest,
            cursor: self.cursor,
        }))
    }

    /// Version `version`'s marker was acknowledged: its view becomes the reference. Returns it
    /// (on the CPU) for the anchor, the persisted reference and the serving API.
    pub fn commit_version(&mut self, version: u64) -> Option<PublishedView> {
        let pending = self.pending.take().filter(|p| p.version == version)?;
        let cpu = pending.to_cpu();
        let view = PublishedView {
            version,
            epoch: pending.epoch,
            comparator: self.params.comparator,
            tables: cpu.tables,
            relations: cpu.relations,
            row_ts: self.row_ts.clone(),
        };
        self.reference = Some(pending);
        Some(view)
    }

    /// The publisher's decisions without Kafka, for offline measurements and tests: `aligner`
    /// assesses the parameters; a held version only raises the pull (there is no checkpoint to
    /// go back to here, unlike the daemon); otherwise the rotation is applied, the rows are
    /// prepared, the version committed as the new reference and adopted by `aligner`, whose
    /// pull the trainer takes for the next interval.
    pub fn publish_in_process(
        &mut self,
        aligner: &mut crate::align::Aligner,
        store: &GraphStore,
        version: u64,
        format: crate::publish::ValueFormat,
        threshold: f64,
    ) -> Result<InProcessVersion, TrainerError> {
        let (current, reference) = self.snapshot();
        let assessed = aligner.assess(version, &current, reference.as_ref());
        if let Some(hold) = assessed.hold {
            self.set_pull(assessed.pull);
            return Ok(InProcessVersion::Held(hold));
        }
        let req = PrepareVersion {
            version,
            epoch: 1,
            format,
            threshold,
            rotation: assessed.rotation,
            align: Some(assessed.figures.clone()),
        };
        let Some(prepared) = self.prepare_version(store, &req)? else {
            return Ok(InProcessVersion::Unchanged);
        };
        let view = self
            .commit_version(version)
            .expect("the version just prepared is pending");
        let published = Snapshot {
            tables: view.tables.iter().map(Tensor::shallow_clone).collect(),
            relations: view.relations.shallow_clone(),
        };
        let pull = match aligner.adopt(version, &assessed.figures, published) {
            Ok(pull) => pull,
            Err(crate::align::AlignError::Snapshot(e)) => return Err(e.into()),
        };
        self.set_pull(pull);
        Ok(InProcessVersion::Committed {
            prepared,
            view,
            figures: assessed.figures,
        })
    }

    /// Go back to the newest usable checkpoint in `ckpts` (a fresh model when there is none),
    /// keeping the reference and the pull. Returns the checkpoint's version (0: fresh).
    pub fn restore(
        &mut self,
        ckpts: &Checkpoints,
        fingerprint: u32,
    ) -> Result<u64, CheckpointError> {
        let device = self.model.device;
        let (model, cursor, version) = match ckpts.load(fingerprint, device)? {
            Some(r) => (r.model, r.meta.cursor, r.meta.version),
            None => (
                Embeddings::new(
                    self.model.tables.len(),
                    self.model.relations.size()[0],
                    self.params.dim,
                    self.params.init_scale,
                    device,
                ),
                0,
                0,
            ),
        };
        self.model = model;
        self.cursor = cursor;
        self.pending = None;
        Ok(version)
    }

    /// Save a checkpoint at the current cursor; returns its version. Refuses non-finite
    /// parameters, so the newest checkpoint is always one a held version can go back to.
    pub fn checkpoint(&self, ckpts: &Checkpoints, fingerprint: u32) -> Result<u64, TrainerError> {
        let rows = tch::no_grad(|| {
            crate::align::non_finite_rows(&Snapshot {
                tables: self.model.tables.iter().map(|t| t.rows()).collect(),
                relations: self.model.relations.shallow_clone(),
            })
        });
        if rows > 0 {
            return Err(TrainerError::NonFinite { rows });
        }
        Ok(ckpts.save(&self.model, self.cursor, fingerprint)?)
    }
}

/// Live trainer figures shared with `/v1/status` (floats stored as bits).
#[derive(Debug, Default)]
pub struct TrainerStatus {
    pub steps: AtomicU64,
    pub skipped_steps: AtomicU64,
    pub edges_new: AtomicU64,
    pub edges_replayed: AtomicU64,
    pub cursor: AtomicU64,
    pub backlog: AtomicU64,
    pub batch_size: AtomicU64,
    loss_bits: AtomicU64,
    preq_mrr_bits: AtomicU64,
    preq_hits10_bits: AtomicU64,
    pub preq_ranked: AtomicU64,
    pub checkpoint_version: AtomicU64,
    /// Restarts by the supervisor after failed rounds.
    pub restarts: AtomicU64,
    /// Relation name → its prequential figures.
    by_relation: std::sync::Mutex<BTreeMap<String, RelationPrequential>>,
}

/// The `trainer` part of `/v1/status`.
#[derive(Debug, Serialize)]
pub struct TrainerFigures {
    pub steps: u64,
    pub skipped_steps: u64,
    pub edges_trained: u64,
    pub edges_replayed: u64,
    pub cursor: u64,
    pub backlog: u64,
    pub batch_size: u64,
    pub loss: Option<f64>,
    pub prequential: PrequentialFigures,
    /// Newest checkpoint written by this process (0: none yet).
    pub checkpoint_version: u64,
    pub restarts: u64,
}

#[derive(Debug, Serialize)]
pub struct PrequentialFigures {
    pub ranked: u64,
    pub mrr: Option<f64>,
    #[serde(rename = "hits@10")]
    pub hits10: Option<f64>,
    /// Per relation, over the last `trainer.prequential_window` ranks of each.
    pub by_relation: BTreeMap<String, RelationPrequential>,
}

/// One relation's prequential figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RelationPrequential {
    pub ranked: u64,
    pub mrr: f64,
    #[serde(rename = "hits@10")]
    pub hits10: f64,
}

fn load_f64(a: &AtomicU64) -> Option<f64> {
    let v = f64::from_bits(a.load(Ordering::Relaxed));
    (!v.is_nan()).then_some(v)
}

impl TrainerStatus {
    pub fn new() -> TrainerStatus {
        let s = TrainerStatus::default();
        for a in [&s.loss_bits, &s.preq_mrr_bits, &s.preq_hits10_bits] {
            a.store(f64::NAN.to_bits(), Ordering::Relaxed);
        }
        s
    }

    pub fn figures(&self) -> TrainerFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TrainerFigures {
            steps: get(&self.steps),
            skipped_steps: get(&self.skipped_steps),
            edges_trained: get(&self.edges_new),
            edges_replayed: get(&self.edges_replayed),
            cursor: get(&self.cursor),
            backlog: get(&self.backlog),
            batch_size: get(&self.batch_size),
            loss: load_f64(&self.loss_bits),
            prequential: PrequentialFigures {
                ranked: get(&self.preq_ranked),
                mrr: load_f64(&self.preq_mrr_bits),
                hits10: load_f64(&self.preq_hits10_bits),
                by_relation: self
                    .by_relation
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            },
            checkpoint_version: get(&self.checkpoint_version),
            restarts: get(&self.restarts),
        }
    }

    /// Record a step in the status and the metrics.
    fn record(&self, r: &StepReport, core: &TrainerCore, relation_names: &[String]) {
        self.cursor.store(core.cursor(), Ordering::Relaxed);
        self.backlog.store(r.backlog, Ordering::Relaxed);
        self.batch_size
            .store(r.batch_size as u64, Ordering::Relaxed);
        metrics::gauge!(m::TRAIN_BACKLOG).set(r.backlog as f64);
        metrics::gauge!(m::TRAIN_BATCH_EDGES).set(r.batch_size as f64);
        let Some(stats) = r.stats else { return };
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.edges_new
            .fetch_add(r.new_edges as u64, Ordering::Relaxed);
        self.edges_replayed
            .fetch_add(r.replayed as u64, Ordering::Relaxed);
        metrics::counter!(m::TRAIN_STEPS).increment(1);
        metrics::counter!(m::TRAIN_EDGES, "kind" => "new").increment(r.new_edges as u64);
        metrics::counter!(m::TRAIN_EDGES, "kind" => "replay").increment(r.replayed as u64);
        metrics::histogram!(m::TRAIN_STEP_SECONDS).record(r.seconds);
        metrics::counter!(m::TRAIN_ROWS, "init" => "warm").increment(r.warm_rows as u64);
        metrics::counter!(m::TRAIN_ROWS, "init" => "random").increment(r.random_rows as u64);
        if stats.skipped {
            self.skipped_steps.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::TRAIN_SKIPPED).increment(1);
            warn!(
                loss = stats.loss,
                edges = stats.edges,
                cursor = core.cursor(),
                "training step skipped: loss or gradients not finite"
            );
        } else {
            self.loss_bits
                .store(stats.loss.to_bits(), Ordering::Relaxed);
            metrics::gauge!(m::TRAIN_LOSS).set(stats.loss);
        }
        if !r.ranks.is_empty() {
            self.preq_ranked
                .store(core.window.total(), Ordering::Relaxed);
            metrics::counter!(m::PREQ_RANKED).increment(r.ranks.len() as u64);
            if let Some((mrr, hits)) = core.window.figures() {
                self.preq_mrr_bits.store(mrr.to_bits(), Ordering::Relaxed);
                self.preq_hits10_bits
                    .store(hits.to_bits(), Ordering::Relaxed);
                metrics::gauge!(m::PREQ_MRR).set(mrr);
                metrics::gauge!(m::PREQ_HITS10).set(hits);
            }
            let mut by_relation = self.by_relation.lock().unwrap_or_else(|p| p.into_inner());
            for rel in r
                .rank_relations
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
            {
                let (Some(window), Some(name)) =
                    (core.by_relation.get(rel), relation_names.get(*rel as usize))
                else {
                    continue;
                };
                if let Some((mrr, hits10)) = window.figures() {
                    metrics::gauge!(m::PREQ_RELATION_HITS10, "relation" => name.clone())
                        .set(hits10);
                    by_relation.insert(
                        name.clone(),
                        RelationPrequential {
                            ranked: window.total(),
                            mrr,
                            hits10,
                        },
                    );
                }
            }
        }
    }
}

/// A version ready to produce: `(key, payload)` rows, then the marker.
#[derive(Debug, Clone)]
pub struct PreparedVersion {
    pub rows: Vec<(String, Vec<u8>)>,
    pub marker: VersionMarker,
    /// Event time (ms) of the newest event the version reflects.
    pub newest_ts: i64,
    /// Every stored edge before this sequence number was trained into the version.
    pub cursor: u64,
}

/// What [`TrainerCore::publish_in_process`] did.
// Returned once per version and matched at once, never stored: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum InProcessVersion {
    /// The drift gate held it back.
    Held(crate::align::Hold),
    /// No node row moved since the reference: nothing to publish.
    Unchanged,
    Committed {
        prepared: PreparedVersion,
        /// What subscribers now hold (also the new reference).
        view: PublishedView,
        figures: crate::align::AlignFigures,
    },
}

/// What a [`TrainRound`] did.
#[derive(Debug, Clone, Copy)]
pub struct RoundOutcome {
    pub steps: usize,
    /// The cursor reached the end of the log: wait before the next round.
    pub idle: bool,
}

/// The actor around [`TrainerCore`].
pub struct TrainerActor {
    /// Taken out of the shared slot by the first actor the arbiter makes.
    slot: Arc<Mutex<Option<TrainerCore>>>,
    core: Option<TrainerCore>,
    store: Arc<GraphStore>,
    ckpts: Checkpoints,
    fingerprint: u32,
    status: Arc<TrainerStatus>,
    budget: Duration,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    /// Where the published reference is persisted (`publish.path`).
    publish_dir: std::path::PathBuf,
    serving: ServingView,
    cfg: Config,
    device: Device,
    /// Relation names by id, for the per-relation figures.
    relation_names: Vec<String>,
}

impl TrainerActor {
    pub fn new(
        cfg: &Config,
        slot: Arc<Mutex<Option<TrainerCore>>>,
        store: Arc<GraphStore>,
        status: Arc<TrainerStatus>,
        serving: ServingView,
        device: Device,
    ) -> TrainerActor {
        let core = slot.lock().map(|mut s| s.take()).unwrap_or(None);
        if let Some(c) = &core {
            status.cursor.store(c.cursor(), Ordering::Relaxed);
        }
        TrainerActor {
            slot,
            core,
            relation_names: store
                .stored_schema()
                .relations
                .iter()
                .map(|(name, _, _)| name.clone())
                .collect(),
            fingerprint: schema_fingerprint(store.stored_schema()),
            store,
            ckpts: Checkpoints::new(&cfg.trainer.checkpoint_path, cfg.trainer.checkpoint_keep),
            status,
            budget: Duration::from_millis(cfg.trainer.round_budget_ms),
            checkpoint_every: Duration::from_secs(cfg.trainer.checkpoint_interval_secs),
            last_checkpoint: Instant::now(),
            publish_dir: cfg.publish.path.clone(),
            serving,
            cfg: cfg.clone(),
            device,
        }
    }

    fn save(&mut self) -> Result<u64, TrainerError> {
        let core = self.core.as_ref().ok_or(TrainerError::Gone)?;
        let version = core.checkpoint(&self.ckpts, self.fingerprint)?;
        self.last_checkpoint = Instant::now();
        self.status
            .checkpoint_version
            .store(version, Ordering::Relaxed);
        metrics::counter!(m::TRAIN_CHECKPOINTS).increment(1);
        info!(version, cursor = core.cursor(), "checkpoint written");
        Ok(version)
    }
}

impl Actor for TrainerActor {
    type Context = SyncContext<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        // Hand the model back so a restarted actor continues with it.
        if let (Some(core), Ok(mut slot)) = (self.core.take(), self.slot.lock()) {
            *slot = Some(core);
        }
    }
}

impl Handler<TrainRound> for TrainerActor {
    type Result = Result<RoundOutcome, TrainerError>;

    fn handle(&mut self, _: TrainRound, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let mut steps = 0;
        let idle = loop {
            let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
            let cursor = core.cursor();
            let stepped =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step(&self.store)));
            let report = match stepped {
                Ok(r) => r?,
                Err(panic) => {
                    // The tables may be half-updated: drop them; the supervisor restores.
                    self.core = None;
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    return Err(TrainerError::Panicked { cursor, message });
                }
            };
            let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
            self.status.record(&report, core, &self.relation_names);
            if report.stats.is_none() {
                break true;
            }
            steps += 1;
            if started.elapsed() >= self.budget {
                break false;
            }
        };
        if steps > 0 && self.last_checkpoint.elapsed() >= self.checkpoint_every {
            self.save()?;
        }
        Ok(RoundOutcome { steps, idle })
    }
}

impl Handler<PrepareVersion> for TrainerActor {
    type Result = Result<Option<PreparedVersion>, TrainerError>;

    fn handle(&mut self, req: PrepareVersion, _: &mut Self::Context) -> Self::Result {
        let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
        Ok(core.prepare_version(&self.store, &req)?)
    }
}

impl Handler<CommitVersion> for TrainerActor {
    type Result = Result<Option<Snapshot>, TrainerError>;

    fn handle(&mut self, msg: CommitVersion, _: &mut Self::Context) -> Self::Result {
        let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
        let Some(view) = core.commit_version(msg.0) else {
            return Ok(None);
        };
        let snapshot = Snapshot {
            tables: view.tables.iter().map(Tensor::shallow_clone).collect(),
            relations: view.relations.shallow_clone(),
        };
        crate::publish::save_snapshot(&self.publish_dir, REFERENCE, msg.0, &snapshot)?;
        self.serving.publish(view);
        Ok(Some(snapshot))
    }
}

impl Handler<TakeSnapshot> for TrainerActor {
    type Result = Result<(Snapshot, Option<Snapshot>), TrainerError>;

    fn handle(&mut self, _: TakeSnapshot, _: &mut Self::Context) -> Self::Result {
        Ok(self.core.as_ref().ok_or(TrainerError::Gone)?.snapshot())
    }
}

impl Handler<SetPull> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: SetPull, _: &mut Self::Context) {
        if let Some(core) = self.core.as_mut() {
            core.set_pull(msg.0);
        }
    }
}

impl Handler<RestoreCheckpoint> for TrainerActor {
    type Result = Result<(u64, u64), TrainerError>;

    fn handle(&mut self, _: RestoreCheckpoint, _: &mut Self::Context) -> Self::Result {
        let version = match self.core.as_mut() {
            Some(core) => core.restore(&self.ckpts, self.fingerprint)?,
            None => {
                // Lost after a panic: reopen from disk, reference included.
                let mut core = TrainerCore::open(&self.cfg, &self.store, self.device)?;
                if let Some((meta, s)) =
                    crate::publish::load_snapshot(&self.publish_dir, REFERENCE)?
                {
                    core.set_reference(meta.version, s);
                }
                self.core = Some(core);
                self.status.checkpoint_version.load(Ordering::Relaxed)
            }
        };
        let core = self.core.as_ref().ok_or(TrainerError::Gone)?;
        self.status.cursor.store(core.cursor(), Ordering::Relaxed);
        info!(
            checkpoint = version,
            cursor = core.cursor(),
            "trainer restored from checkpoint"
        );
        Ok((version, core.cursor()))
    }
}

impl Handler<SaveCheckpoint> for TrainerActor {
    type Result = Result<u64, TrainerError>;

    fn handle(&mut self, _: SaveCheckpoint, _: &mut Self::Context) -> Self::Result {
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_grows_under_a_backlog_and_shrinks_back() {
        assert_eq!(next_batch_size(1000, 100_000, 1000, 16_000), 2000);
        assert_eq!(next_batch_size(8000, 100_000, 1000, 16_000), 16_000);
        assert_eq!(next_batch_size(16_000, 1_000_000, 1000, 16_000), 16_000);
        assert_eq!(next_batch_size(4000, 3000, 1000, 16_000), 4000);
        assert_eq!(next_batch_size(4000, 100, 1000, 16_000), 2000);
        assert_eq!(next_batch_size(1000, 0, 1000, 16_000), 1000);
    }

    #[test]
    fn replay_count_rounds_the_ratio() {
        assert_eq!(replay_count(1000, 1.0), 1000);
        assert_eq!(replay_count(3, 0.5), 2);
        assert_eq!(replay_count(10, 0.0), 0);
    }

    #[test]
    fn rank_window_keeps_the_newest() {
        let mut w = RankWindow::new(3);
        assert_eq!(w.figures(), None);
        w.extend([100.0, 1.0, 2.0, 20.0]);
        let (mrr, hits) = w.figures().unwrap();
        assert!((mrr - (1.0 + 0.5 + 0.05) / 3.0).abs() < 1e-12);
        assert!((hits - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(w.total(), 4);
    }
}
