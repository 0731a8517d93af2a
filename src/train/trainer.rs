//! The trainer's state and logic without the actor ([`TrainerCore`]: used by the actor, the
//! offline measurements and the tests).
//!
//! Each step of [`TrainerCore::step`]:
//! 0. with the gradient exchange, applies the window parts other instances sent for the rows
//!    this one owns, and copies their published rows over its copies of rows they own
//!    ([`ForeignRows`]);
//! 1. reads the next micro-batch of new edges from its cursor ([`GraphStore::edges_from`]); the
//!    batch size adapts to the backlog ([`next_batch_size`]); with several instances, only those
//!    whose source this instance owns ([`OwnedSources`]);
//! 2. *tests* a sample of them first (prequential: the target ranked, filtered, against all nodes
//!    of its type, before any training on it) when both nodes already have rows;
//! 3. gives new nodes rows: warm-started from already-embedded neighbours
//!    ([`crate::train::warm_rows`]) or random;
//! 4. mixes in `replay_ratio` edges per new edge drawn uniformly from the whole log and runs one
//!    [`crate::train::train_step`], pulled toward the last published version (with the
//!    exchange, the gradients of rows owned elsewhere are also summed for their owners);
//! 5. moves the cursor past the new edges — only now, so a checkpoint's cursor always means "every
//!    edge before this was trained into these tables".

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::config::{Config, TrainerConfig};
use crate::exchange::{ExchangePosition, GradientInbox};
use crate::store::{Edge, GraphStore, NodeRef, StoreError};
use crate::train::start::{take_published, PublishedRows, StartedFrom};
use crate::train::{
    history_targets, history_with_rows, known_targets, non_finite_rows, rows_needed,
    schema_fingerprint, target_ranks, train_step_tapped, warm_rows, CheckpointError, Checkpoints,
    DeltaExchange, DeltaRequest, Embeddings, ForeignRows, GradientTap, History, ModelDelta,
    OwnedSources, Pull, RankWindow, RelationShares, ResumedFrom, Snapshot, StepStats, TableDelta,
    TargetQuery, TrainParams,
};

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
pub(super) fn next_batch_size(current: usize, backlog: u64, base: usize, max: usize) -> usize {
    let current = current.clamp(base, max);
    if backlog > 4 * current as u64 {
        (current * 2).min(max)
    } else if backlog < (current / 2) as u64 {
        (current / 2).max(base)
    } else {
        current
    }
}

/// The replay ratio with `waiting` edges still behind the step: `ratio` with none, falling
/// linearly to 0 at `limit` (0: no limit).
pub(super) fn replay_ratio_behind(ratio: f64, waiting: u64, limit: u64) -> f64 {
    if limit == 0 {
        return ratio;
    }
    ratio * (1.0 - waiting as f64 / limit as f64).max(0.0)
}

/// Replayed edges for `fresh` new ones at `ratio` replayed per new edge.
fn replay_count(fresh: usize, ratio: f64) -> usize {
    (fresh as f64 * ratio).round() as usize
}

/// What one step did.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub new_edges: usize,
    pub replayed: usize,
    /// New edges passed over because another instance owns their source.
    pub left_to_owners: usize,
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
    /// What the drift control pulls toward (the last acknowledged version).
    pull_target: Option<PullTarget>,
    /// Strength of the pull toward it (0: none), set by the alignment's controller.
    pull: f64,
    /// Where [`TrainerCore::take_delta`]'s scan for non-finite rows continues, per type.
    scan: Vec<i64>,
    /// Erased nodes' rows per type (the store's erasures, read up to `erasures_seen`): zeroed
    /// when seen and again before each version, as negatives may have moved them since.
    erased: Vec<Vec<i64>>,
    erasures_seen: usize,
    /// The checkpoint this trainer resumed from (`None`: a new model).
    resumed_from: Option<ResumedFrom>,
    /// The published version a new model started from (`None`: a checkpoint's, or random).
    started_from: Option<StartedFrom>,
    /// With several instances: only edges whose source this instance owns are trained
    /// (`None`: every edge, as offline).
    sources: Option<OwnedSources>,
    /// With several instances and `remote.exchange_gradients`: the gradient exchange.
    foreign: Option<ForeignRows>,
    /// The exchange position of the checkpoint [`TrainerCore::open`] resumed from, until the
    /// exchange starts.
    resumed_exchange: Option<ExchangePosition>,
}

/// Rows [`TrainerCore::take_delta`] scans for non-finite values besides the written ones (all of
/// a smaller model; a larger one in turn, this many per version).
pub(super) const SCAN_ROWS: i64 = 32_768;

/// What the pull draws trained rows back toward: the version subscribers hold, on the model's
/// device. The publish stage decides what it is ([`TrainerCore::set_pull`]).
struct PullTarget {
    tables: Vec<Tensor>,
    relations: Tensor,
}

impl PullTarget {
    /// The pull toward `target` at `strength`, on every row.
    fn pull(target: Option<&PullTarget>, strength: f64) -> Option<Pull<'_>> {
        target.map(|r| Pull {
            tables: &r.tables,
            relations: &r.relations,
            strength,
            skip: None,
        })
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
            pull_target: None,
            pull: 0.0,
            scan: vec![0; model.tables.len()],
            erased: vec![Vec::new(); model.tables.len()],
            erasures_seen: 0,
            resumed_from: None,
            started_from: None,
            sources: None,
            foreign: None,
            resumed_exchange: None,
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
                let mut model = r.model;
                // The config decides which tables carry a bias (a new one starts at zero).
                model.set_biased(&store.stored_schema().node_types, &params.bias_types);
                let mut core = TrainerCore::resume(model, r.meta.cursor, params, opts);
                core.resumed_exchange = r.meta.exchange;
                core.resumed_from = Some(ResumedFrom {
                    version: r.meta.version,
                    cursor: r.meta.cursor,
                    unusable: r.unusable,
                });
                core
            }
            None => {
                tch::manual_seed(params.seed as i64);
                let model = Embeddings::for_schema(&cfg.schema(), &params, device);
                info!(path = %cfg.trainer.checkpoint_path.display(), "trainer starts a new model (no checkpoint)");
                TrainerCore::new(model, params, opts)
            }
        })
    }

    /// The checkpoint [`TrainerCore::open`] resumed from (`None`: a new model).
    pub fn resumed_from(&self) -> Option<&ResumedFrom> {
        self.resumed_from.as_ref()
    }

    /// Start a new model (no checkpoint, nothing trained yet) from a published version: its
    /// rows, biases and relation vectors where the store holds their nodes (`crate::train::start`).
    /// The cursor stays at 0: the history is trained again from those rows.
    pub fn start_from_published(
        &mut self,
        store: &GraphStore,
        table: PublishedRows<'_>,
    ) -> Result<&StartedFrom, StoreError> {
        let started = take_published(
            &mut self.model,
            store,
            table,
            self.params.init_scale,
            self.opts.published_history_steps,
        )?;
        if !table.relation_deltas.is_empty() {
            // The relations are the sum of every partition's share, which the exchange goes on
            // from ([`RelationShares`]), rather than the summed vectors one owner published.
            let width = self.model.relation_values().len();
            let shares = RelationShares::from_deltas(width, table.relation_deltas);
            self.model.set_relation_values(&shares.sum());
            let position = self.resumed_exchange.get_or_insert_with(Default::default);
            position.relation_deltas = shares.held().clone();
        }
        Ok(self.started_from.insert(started))
    }

    /// The published version this new model started from (`None`: none).
    pub fn started_from(&self) -> Option<&StartedFrom> {
        self.started_from.as_ref()
    }

    /// Store sequence number of the next edge to train.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// One step on the next micro-batch (see the module docs). Does nothing when the cursor is
    /// at the end of the log.
    pub fn step(&mut self, store: &GraphStore) -> Result<StepReport, StoreError> {
        let started = Instant::now();
        self.follow_erasures(store);
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
        if self.sources.as_ref().is_some_and(OwnedSources::paused) {
            return Ok(report);
        }
        if let (Some(foreign), Some(sources)) = (&mut self.foreign, &mut self.sources) {
            let pull = PullTarget::pull(self.pull_target.as_ref(), self.pull);
            let rates = (self.params.lr, self.params.init_scale);
            foreign.take_in(&mut self.model, store, sources, rates, pull.as_ref())?;
        }
        if backlog == 0 {
            return Ok(report);
        }
        // Edges whose gradients went out with a committed version are trained again (after
        // going back to a checkpoint) in steps of their own that send nothing.
        let sent_below = self.foreign.as_ref().map_or(0, ForeignRows::sent_below);
        let already_sent = self.cursor < sent_below;
        let mut read = match already_sent {
            true => store.edges_from(
                self.cursor,
                self.batch.min((sent_below - self.cursor) as usize),
            )?,
            false => store.edges_from(self.cursor, self.batch)?,
        };
        if already_sent {
            read.retain(|&(seq, _)| seq < sent_below);
        }
        let Some(&(last_seq, _)) = read.last() else {
            return Ok(report);
        };
        let first_seq = read[0].0;
        let trained = self.trained_relations(store);
        let fresh: Vec<Edge> = read
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| trained.as_ref().is_none_or(|t| t[e.rel as usize]))
            .collect();
        let read_fresh = fresh.len();
        let fresh = match &mut self.sources {
            Some(sources) => sources.keep(store, fresh)?,
            None => fresh,
        };
        report.left_to_owners = read_fresh - fresh.len();
        (report.ranks, report.rank_relations) = self.prequential(store, &fresh, first_seq)?;
        (report.warm_rows, report.random_rows) = self.add_rows(store, &fresh)?;
        let waiting = store.edge_count().saturating_sub(last_seq + 1);
        let replay = replay_count(
            fresh.len(),
            replay_ratio_behind(
                self.opts.replay_ratio,
                waiting,
                self.opts.replay_backlog_limit,
            ),
        );
        let mut edges = fresh;
        report.new_edges = edges.len();
        edges.extend(self.replayed(store, replay, trained.as_deref())?);
        report.replayed = edges.len() - report.new_edges;
        report.stats = Some(self.train_on(store, &edges, !already_sent)?);
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

    /// One pass over every stored edge of the trained relations, shuffled, in micro-batches of
    /// `train.batch_size`, with the step [`TrainerCore::step`] takes (the pull toward the
    /// published version and the user model's histories included): what a periodic retrain runs
    /// over the whole log. The cursor must be at the end of the log (the rows of every stored
    /// node exist). Returns the mean loss.
    pub fn train_epoch(&mut self, store: &GraphStore) -> Result<f64, StoreError> {
        let trained = self.trained_relations(store);
        let mut edges: Vec<Edge> = store
            .edges_from(0, usize::MAX)?
            .into_iter()
            .map(|(_, e)| e)
            .filter(|e| trained.as_ref().is_none_or(|t| t[e.rel as usize]))
            .collect();
        edges.shuffle(&mut self.rng);
        let (mut loss, mut n) = (0.0, 0usize);
        for chunk in edges.chunks(self.params.batch_size.max(1)) {
            let stats = self.train_on(store, chunk, true)?;
            if !stats.skipped {
                loss += stats.loss * stats.edges as f64;
                n += stats.edges;
            }
        }
        Ok(if n == 0 { f64::NAN } else { loss / n as f64 })
    }

    /// One step on `edges`, pulled toward the published version, with the user model's
    /// histories read from the store; with the gradient exchange, the gradients of rows owned
    /// elsewhere are summed for their owners.
    fn train_on(
        &mut self,
        store: &GraphStore,
        edges: &[Edge],
        send: bool,
    ) -> Result<StepStats, StoreError> {
        let pull = PullTarget::pull(self.pull_target.as_ref(), self.pull);
        let params = &self.params;
        let lookup = |n: NodeRef, dst_type: usize| {
            history_targets(params, store, n, dst_type, u64::MAX).unwrap_or_default()
        };
        let history = self.history_on(store).then_some(&lookup as History<'_>);
        let (mut tap, skip) = match (&mut self.foreign, &mut self.sources) {
            (Some(foreign), Some(sources)) if sources.shared() => {
                let (tap, skip) = foreign.tap(sources, store, send);
                (tap, Some(skip))
            }
            _ => (None, None),
        };
        let pull = pull.map(|p| Pull { skip, ..p });
        let stats = train_step_tapped(
            &mut self.model,
            edges,
            &self.params,
            &mut self.rng,
            pull.as_ref(),
            history,
            tap.as_mut().map(|t| t as &mut dyn GradientTap),
        );
        match tap.and_then(|t| t.error) {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Take in the nodes erased since the last call and zero their rows (after a restart, every
    /// erasure again: zeroing is idempotent).
    pub fn follow_erasures(&mut self, store: &GraphStore) {
        if store.erased_count() <= self.erasures_seen {
            return;
        }
        let new = store.erasures_since(self.erasures_seen);
        self.erasures_seen += new.len();
        self.erased.resize(self.model.tables.len(), Vec::new());
        for node in new {
            if let Some(rows) = self.erased.get_mut(node.node_type as usize) {
                rows.push(i64::from(node.index));
            }
        }
        self.zero_erased();
    }

    /// Zero the erased rows the tables have (a row added later is zeroed before the next
    /// version).
    fn zero_erased(&mut self) {
        let device = self.model.device;
        for (table, rows) in self.model.tables.iter_mut().zip(&self.erased) {
            let live: Vec<i64> = rows.iter().copied().filter(|&i| i < table.len()).collect();
            if !live.is_empty() {
                table.erase(&Tensor::from_slice(&live).to_device(device));
            }
        }
    }

    /// Per relation id, whether it is trained (`trainer.train_relations`); `None`: all are.
    fn trained_relations(&self, store: &GraphStore) -> Option<Vec<bool>> {
        let only = &self.opts.train_relations;
        (!only.is_empty()).then(|| {
            store
                .stored_schema()
                .relations
                .iter()
                .map(|(name, _, _)| only.contains(name))
                .collect()
        })
    }

    /// `n` edges drawn uniformly from the log among the trained relations and, with several
    /// instances, the owned sources (a few draws at most: fewer when they are rare in it).
    fn replayed(
        &mut self,
        store: &GraphStore,
        n: usize,
        trained: Option<&[bool]>,
    ) -> Result<Vec<Edge>, StoreError> {
        if trained.is_none() && self.sources.is_none() {
            return store.sample_edges(&mut self.rng, n);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..4 {
            if out.len() >= n {
                break;
            }
            let want = n - out.len();
            let drawn: Vec<Edge> = (store.sample_edges(&mut self.rng, want)?.into_iter())
                .filter(|e| trained.is_none_or(|t| t[e.rel as usize]))
                .collect();
            let drawn = match &mut self.sources {
                Some(sources) => sources.keep(store, drawn)?,
                None => drawn,
            };
            out.extend(drawn.into_iter().take(want));
        }
        Ok(out)
    }

    /// Train only edges whose source belongs to a partition `ownership` gives this instance
    /// (see [`OwnedSources`]).
    pub fn train_owned_sources(&mut self, ownership: std::sync::Arc<crate::partition::Ownership>) {
        self.sources = Some(OwnedSources::new(ownership));
    }

    /// Exchange the gradients of rows owned elsewhere through `inbox` (see [`ForeignRows`]),
    /// starting where the checkpoint this trainer resumed from left the gradients topic. Needs
    /// [`TrainerCore::train_owned_sources`].
    pub fn exchange_gradients(&mut self, inbox: std::sync::Arc<GradientInbox>) {
        let position = self.resumed_exchange.take().unwrap_or_default();
        self.foreign = Some(ForeignRows::new(inbox, position));
    }

    /// Whether gradients other instances sent were applied since the last checkpoint.
    pub fn applied_gradients_unsaved(&self) -> bool {
        self.foreign.as_ref().is_some_and(ForeignRows::unsaved)
    }

    /// Where the gradient exchange reads from and what it applied (`None`: no exchange).
    pub fn exchange_position(&self) -> Option<&ExchangePosition> {
        self.foreign.as_ref().map(ForeignRows::position)
    }

    /// The ownership [`TrainerCore::train_owned_sources`] gave, if any.
    pub fn owned_sources(&self) -> Option<std::sync::Arc<crate::partition::Ownership>> {
        self.sources.as_ref().map(OwnedSources::ownership)
    }

    /// Whether some node type of the store is represented with its recent targets.
    fn history_on(&self, store: &GraphStore) -> bool {
        self.params.history_recent > 0
            && store
                .stored_schema()
                .node_types
                .iter()
                .any(|t| self.params.history_types.contains(t))
    }

    /// The recent targets of `src` of `dst_type` stored before sequence number `before`
    /// (`u64::MAX`: all) that have rows, when `src` is of a history type
    /// (`train.history_types`); empty otherwise.
    pub fn history_of(
        &self,
        store: &GraphStore,
        src: NodeRef,
        dst_type: usize,
        before: u64,
    ) -> Result<Vec<(i64, f32)>, StoreError> {
        let table = &self.model.tables[dst_type];
        let mut recent =
            history_with_rows(&self.params, store, src, dst_type, before, table.len())?;
        if table.has_placeholders() {
            recent.retain(|&(i, _)| table.holds(i));
        }
        Ok(recent)
    }

    /// Rank a sample of `fresh` (edges between nodes that already have rows, stored from
    /// `first_seq` on) before training: `(ranks, their relations)`. A history source's recent
    /// targets are those stored before the micro-batch.
    fn prequential(
        &mut self,
        store: &GraphStore,
        fresh: &[Edge],
        first_seq: u64,
    ) -> Result<(Vec<f64>, Vec<u16>), StoreError> {
        let has_row =
            |n: NodeRef| self.model.tables[n.node_type as usize].holds(i64::from(n.index));
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
                history: self.history_of(store, e.src, e.dst.node_type as usize, first_seq)?,
            });
        }
        Ok((
            target_ranks(&self.model, self.params.comparator, &queries),
            relations,
        ))
    }

    /// Rows for the nodes `edges` name that the model does not hold yet: new rows, and
    /// placeholders whose node comes now (see [`crate::train::NodeTable::grow_reaching`]).
    /// Returns the `(warm-started, random)` counts.
    fn add_rows(
        &mut self,
        store: &GraphStore,
        edges: &[Edge],
    ) -> Result<(usize, usize), StoreError> {
        let (dim, device, scale) = (self.model.dim, self.model.device, self.params.init_scale);
        let (mut warm, mut random) = (0, 0);
        let mut coming: Vec<HashSet<i64>> = vec![HashSet::new(); self.model.tables.len()];
        for n in edges.iter().flat_map(|e| [e.src, e.dst]) {
            let (t, i) = (n.node_type as usize, i64::from(n.index));
            if !self.model.tables[t].holds(i) {
                coming[t].insert(i);
            }
        }
        let needed = rows_needed(&self.model, edges);
        for (t, (n, coming)) in needed.into_iter().zip(coming).enumerate() {
            if coming.is_empty() {
                continue;
            }
            let mut starting: Vec<i64> = coming.iter().copied().collect();
            starting.sort_unstable();
            let k = starting.len() as i64;
            let names = &store.stored_schema().node_types;
            let history_type = names
                .get(t)
                .is_some_and(|name| self.params.history_types.contains(name))
                && self.params.history_recent > 0;
            let table = &self.model.tables[t];
            let centroid = match self.opts.warm_start && self.opts.warm_start_history_centroid {
                true => history_type.then(|| table.held_mean()).flatten(),
                false => None,
            };
            let rows = if let Some(centroid) = centroid {
                warm += starting.len();
                centroid + Tensor::randn([k, dim], (Kind::Float, device)) * scale
            } else if self.opts.warm_start {
                warm += starting.len();
                warm_rows(
                    &self.model,
                    store,
                    t as u16,
                    &starting,
                    scale,
                    self.opts.warm_start_shrinkage,
                )?
            } else {
                random += starting.len();
                Tensor::randn([k, dim], (Kind::Float, device)) * scale
            };
            let seed = (self.opts.warm_start && self.opts.warm_start_state)
                .then(|| table.mean_state())
                .flatten();
            let table = &mut self.model.tables[t];
            // Rows grown only to reach a later one are drawn as a new row is; the others are
            // written next (no draw: one trainer's draws stay those it made before placeholders).
            let reached =
                n - table.len() - starting.iter().filter(|&&i| i >= table.len()).count() as i64;
            table.grow_reaching(n, &coming, |count| match reached > 0 {
                true => Tensor::randn([count, dim], (Kind::Float, device)) * scale,
                false => Tensor::zeros([count, dim], (Kind::Float, device)),
            });
            table.restart(&starting, &rows, seed.unwrap_or(0.0));
        }
        Ok((warm, random))
    }

    /// What changed since the previous call, copied to the CPU (see [`ModelDelta`]): the rows
    /// every table marked dirty (all of them when `req.full`, and always all of a biased type's,
    /// whose biases move without their rows), their event times, the relation vectors, the
    /// requested samples, the cursor. Clears the marks. This is all a version pauses training
    /// for; its cost follows the rows written, not the table.
    pub fn take_delta(&mut self, req: &DeltaRequest) -> ModelDelta {
        tch::no_grad(|| {
            self.scan_non_finite();
            self.zero_erased();
            let mut tables = Vec::with_capacity(self.model.tables.len());
            for (t, table) in self.model.tables.iter_mut().enumerate() {
                if req.full || table.biased {
                    table.mark_all_dirty();
                }
                let idx = table.take_dirty();
                table.version_taken();
                let values = table.weights.index_select(0, &idx).to_device(Device::Cpu);
                let index = idx.to_device(Device::Cpu);
                let rows = Vec::<i64>::try_from(&index).expect("indices");
                let row_ts = &self.row_ts[t];
                tables.push(TableDelta {
                    len: table.len(),
                    ts: rows
                        .iter()
                        .map(|&i| row_ts.get(i as usize).copied().unwrap_or(0))
                        .collect(),
                    index,
                    values,
                    biases: table
                        .biased
                        .then(|| table.biases().to_device(Device::Cpu).copy()),
                });
            }
            let device = self.model.device;
            let samples = req
                .samples
                .iter()
                .map(|per_type| {
                    per_type
                        .iter()
                        .zip(&self.model.tables)
                        .enumerate()
                        .map(|(t, (idx, table))| {
                            let idx = idx.masked_select(&idx.lt(table.len()));
                            // Drift is this instance's to hold on the rows it publishes; its copies
                            // of other owners' rows move as their owners' versions come in.
                            let idx = match &self.foreign {
                                Some(foreign) => foreign.owned_only(t, idx),
                                None => idx,
                            };
                            // Nor does a row the reference holds as a placeholder's noise drift.
                            let idx = table.with_published_row(idx);
                            let values = table
                                .weights
                                .index_select(0, &idx.to_device(device))
                                .to_device(Device::Cpu);
                            (idx, values)
                        })
                        .collect()
                })
                .collect();
            ModelDelta {
                tables,
                relations: self.model.relations.to_device(Device::Cpu).copy(),
                samples,
                cursor: self.cursor,
                exchange: match self.foreign.as_mut() {
                    Some(foreign) => {
                        let owned =
                            (self.sources.as_ref()).map_or_else(Vec::new, OwnedSources::owned_now);
                        foreign.take_window(&self.model, req.window, (&owned, req.full))
                    }
                    None => DeltaExchange::default(),
                },
            }
        })
    }

    /// Mark dirty the non-finite rows among the next [`SCAN_ROWS`] rows (round robin over the
    /// tables), so the gate sees a row corrupted other than by a step (every step's rows are
    /// marked anyway) within `rows / SCAN_ROWS` versions, and at once in a smaller model.
    fn scan_non_finite(&mut self) {
        self.scan.resize(self.model.tables.len(), 0);
        let mut budget = SCAN_ROWS;
        for (table, at) in self.model.tables.iter_mut().zip(&mut self.scan) {
            let len = table.len();
            if budget == 0 {
                break;
            }
            if len == 0 {
                continue;
            }
            let mut start = *at % len;
            let mut left = budget.min(len);
            budget -= left;
            while left > 0 {
                let n = left.min(len - start);
                let window = table.weights.narrow(0, start, n);
                // One reduction first (a NaN or an infinity makes the sum non-finite); the rows
                // only when it is (or the sum overflowed).
                if window.sum(Kind::Float).isfinite().int64_value(&[]) == 1 {
                    start = (start + n) % len;
                    left -= n;
                    continue;
                }
                let bad = window
                    .isfinite()
                    .all_dim(1, false)
                    .logical_not()
                    .nonzero()
                    .view([-1]);
                if bad.numel() > 0 {
                    table.mark_dirty(&(bad + start));
                }
                start = (start + n) % len;
                left -= n;
            }
            *at = start;
        }
    }

    /// Rows written since the last [`TrainerCore::take_delta`], per node type.
    pub fn dirty_rows(&self) -> Vec<i64> {
        self.model.tables.iter().map(|t| t.dirty_count()).collect()
    }

    /// Rotate every row and relation vector by the orthogonal `r [D, D]` (Procrustes onto the
    /// anchor). Dot, L2 and cosine scores are unchanged; row-wise Adagrad state is a norm, so it
    /// stays valid too. Every row is then dirty: this costs a whole table, which is why the
    /// alignment asks for it only when it is not close to the identity
    /// ([`crate::align::assess`]).
    pub fn rotate(&mut self, r: &Tensor) {
        tch::no_grad(|| {
            let r = r.to_device(self.model.device);
            for table in &mut self.model.tables {
                let mut rows = table.rows();
                let turned = rows.matmul(&r);
                rows.copy_(&turned);
                table.mark_all_dirty();
            }
            let reverse = self.model.reverse.as_mut().map(|rev| &mut rev.relations);
            for relations in std::iter::once(&mut self.model.relations).chain(reverse) {
                let turned = relations.matmul(&r);
                relations.copy_(&turned);
            }
        })
    }

    /// Pull toward `target` (when given; otherwise the current target stays) with `strength`
    /// from now on.
    pub fn set_pull(&mut self, strength: f64, target: Option<&Snapshot>) {
        self.set_pull_changed(strength, target, None);
    }

    /// [`TrainerCore::set_pull`], told which rows of `target` differ from the current target
    /// (`changed`: per type, Int64 CPU indices; rows past the current target's end are new).
    /// On the CPU the target is shared, not copied; on another device only those rows (and
    /// the new ones) are sent, so a version does not copy the whole table to the GPU.
    pub fn set_pull_changed(
        &mut self,
        strength: f64,
        target: Option<&Snapshot>,
        changed: Option<&[Tensor]>,
    ) {
        self.pull = strength;
        let Some(s) = target else { return };
        self.model
            .tables
            .iter_mut()
            .for_each(crate::train::NodeTable::reference_adopted);
        let device = self.model.device;
        let incremental = match (&mut self.pull_target, changed) {
            (Some(current), Some(changed))
                if device != Device::Cpu && current.tables.len() == s.tables.len() =>
            {
                tch::no_grad(|| {
                    for ((cur, new), idx) in current.tables.iter_mut().zip(&s.tables).zip(changed) {
                        let (have, want) = (cur.size()[0], new.size()[0]);
                        if want < have {
                            *cur = cur.narrow(0, 0, want);
                        }
                        let have = have.min(want);
                        let idx = idx.masked_select(&idx.lt(have));
                        if idx.numel() > 0 {
                            let rows = new.index_select(0, &idx).to_device(device);
                            let _ = cur.index_copy_(0, &idx.to_device(device), &rows);
                        }
                        if want > have {
                            let tail = new.narrow(0, have, want - have).to_device(device);
                            *cur = Tensor::cat(&[cur.shallow_clone(), tail], 0);
                        }
                    }
                    current.relations = s.relations.to_device(device);
                });
                true
            }
            _ => false,
        };
        if !incremental {
            self.pull_target = Some(PullTarget {
                tables: s.tables.iter().map(|t| t.to_device(device)).collect(),
                relations: s.relations.to_device(device),
            });
        }
    }

    /// The strength of the pull now.
    pub fn pull(&self) -> f64 {
        self.pull
    }

    /// Go back to the newest usable checkpoint in `ckpts` (a fresh model when there is none),
    /// keeping the pull and its target. Returns the checkpoint's version (0: fresh).
    pub fn restore(
        &mut self,
        ckpts: &Checkpoints,
        fingerprint: u32,
    ) -> Result<u64, CheckpointError> {
        let device = self.model.device;
        let biased: Vec<bool> = self.model.tables.iter().map(|t| t.biased).collect();
        let (mut model, cursor, version, exchange) = match ckpts.load(fingerprint, device)? {
            Some(r) => (r.model, r.meta.cursor, r.meta.version, r.meta.exchange),
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
                None,
            ),
        };
        if let Some(foreign) = &mut self.foreign {
            foreign.went_back(exchange.unwrap_or_default());
        }
        for (table, on) in model.tables.iter_mut().zip(biased) {
            table.biased = on;
        }
        // A fresh model, or a checkpoint written before train.reverse_relations was set.
        if self.params.reverse_relations {
            model.add_reverse_relations(self.params.init_scale);
        }
        self.model = model;
        self.cursor = cursor;
        Ok(version)
    }

    /// Save a checkpoint at the current cursor; returns its version. Refuses non-finite
    /// parameters, so the newest checkpoint is always one a held version can go back to.
    pub fn checkpoint(&self, ckpts: &Checkpoints, fingerprint: u32) -> Result<u64, TrainerError> {
        let rows = tch::no_grad(|| {
            non_finite_rows(&Snapshot {
                tables: self.model.tables.iter().map(|t| t.rows()).collect(),
                relations: self.model.relations.shallow_clone(),
            })
        });
        if rows > 0 {
            return Err(TrainerError::NonFinite { rows });
        }
        let exchange = self.foreign.as_ref().map(ForeignRows::position);
        let version = ckpts.save_with(&self.model, self.cursor, fingerprint, exchange)?;
        if let Some(foreign) = &self.foreign {
            foreign.checkpointed();
        }
        Ok(version)
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
    fn replay_gives_way_to_new_edges_under_a_backlog() {
        assert_eq!(replay_ratio_behind(1.0, 0, 4000), 1.0);
        assert_eq!(replay_ratio_behind(1.0, 1000, 4000), 0.75);
        assert_eq!(replay_ratio_behind(2.0, 3000, 4000), 0.5);
        assert_eq!(replay_ratio_behind(1.0, 4000, 4000), 0.0);
        assert_eq!(replay_ratio_behind(1.0, 90_000, 4000), 0.0);
        assert_eq!(replay_ratio_behind(1.0, 90_000, 0), 1.0, "0: no limit");
    }

    /// An erased node's row (values, Adagrad state) is zeroed as soon as the trainer sees the
    /// erasure, and again before every version, whatever moved it since.
    #[test]
    fn an_erased_row_is_zeroed_when_seen_and_before_each_version() {
        use crate::schema::{Event, EventOp};
        use crate::store::testing::{follow, follows_store};
        use crate::store::AppendBatch;
        let dir = tempfile::tempdir().unwrap();
        let store = follows_store(dir.path());
        let ev = |op, src: u32, dst: u32| Event {
            op,
            ..follow(src, dst, 1)
        };
        store
            .append(&AppendBatch::from_events(
                "t",
                0,
                [ev(EventOp::Add, 0, 1), ev(EventOp::Add, 1, 2)],
            ))
            .unwrap();
        let cfg = Config::from_toml("").unwrap();
        let mut model = Embeddings::new(1, 1, 4, 0.1, Device::Cpu);
        model.tables[0].grow(3, |n| Tensor::ones([n, 4], (Kind::Float, Device::Cpu)));
        let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
        let grad = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        core.model.tables[0].adagrad(&Tensor::from_slice(&[0i64, 1, 2]), &grad, 0.1);
        store
            .append(&AppendBatch::from_events(
                "t",
                2,
                [ev(EventOp::Erase, 1, 1)],
            ))
            .unwrap();
        core.follow_erasures(&store);
        let row = |core: &TrainerCore, i: i64| {
            let t = &core.model.tables[0];
            (
                t.weights.get(i).abs().sum(Kind::Float).double_value(&[]),
                t.state.double_value(&[i]),
            )
        };
        assert_eq!(row(&core, 1), (0.0, 0.0));
        assert!(row(&core, 0).0 > 0.0 && row(&core, 2).1 > 0.0);
        // Moved again (as a negative), then a version: zero in the delta and the table.
        core.model.tables[0].adagrad(&Tensor::from_slice(&[1i64]), &grad.narrow(0, 0, 1), 0.1);
        let delta = core.take_delta(&DeltaRequest::default());
        assert_eq!(row(&core, 1), (0.0, 0.0));
        let values = &delta.tables[0].values;
        let at = Vec::<i64>::try_from(&delta.tables[0].index)
            .unwrap()
            .iter()
            .position(|&i| i == 1)
            .expect("the erased row is taken (the publisher leaves it out)");
        assert_eq!(
            values
                .get(at as i64)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
    }

    /// Rows made live only to reach a later node (as an applied window or a published start
    /// grows a table) are no nodes' rows: their first edges are not ranked, and their nodes are
    /// warm-started then, as one trainer starts a node it meets.
    #[test]
    fn a_row_grown_to_reach_another_is_not_ranked_and_is_started_when_its_node_comes() {
        use crate::store::testing::{follow, follows_store};
        use crate::store::AppendBatch;
        let dir = tempfile::tempdir().unwrap();
        let store = follows_store(dir.path());
        store
            .append(&AppendBatch::from_events(
                "t",
                0,
                [follow(0, 1, 1), follow(1, 2, 2)],
            ))
            .unwrap();
        let cfg = Config::from_toml("[trainer]\nwarm_start = true").unwrap();
        let model = Embeddings::new(1, 1, 4, 0.1, Device::Cpu);
        let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
        core.step(&store).unwrap();
        let _ = core.take_delta(&DeltaRequest::default());
        // Nodes 3..=6 are stored; a window then names node 6 before any of them is trained.
        store
            .append(&AppendBatch::from_events(
                "t",
                2,
                [follow(3, 4, 3), follow(5, 6, 4), follow(0, 2, 5)],
            ))
            .unwrap();
        let named = HashSet::from([6]);
        (core.model.tables[0]).grow_reaching(7, &named, |n| {
            Tensor::ones([n, 4], (Kind::Float, Device::Cpu))
        });
        let table = &core.model.tables[0];
        assert_eq!((table.len(), table.held_count()), (7, 4));
        assert!(!table.holds(3) && !table.holds(5) && table.holds(6));
        let _ = core.take_delta(&DeltaRequest::default());

        let report = core.step(&store).unwrap();
        assert_eq!(report.ranks.len(), 1, "only u0 → u2 had both rows");
        assert_eq!(report.warm_rows, 3, "u3, u4 and u5 start now");
        assert_eq!(core.model.tables[0].held_count(), 7);
        let delta = core.take_delta(&DeltaRequest::default());
        let taken = Vec::<i64>::try_from(&delta.tables[0].index).unwrap();
        assert!([3, 4, 5].iter().all(|i| taken.contains(i)), "{taken:?}");
    }

    #[test]
    fn a_delta_holds_the_written_rows_and_a_corrupted_one_only() {
        let cfg = Config::from_toml("").unwrap();
        let mut model = Embeddings::new(2, 1, 4, 0.1, Device::Cpu);
        model.tables[0].grow(100, |n| Tensor::zeros([n, 4], (Kind::Float, Device::Cpu)));
        let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
        let all = core.take_delta(&DeltaRequest::default());
        assert_eq!(all.tables[0].index.size(), vec![100], "new rows are dirty");
        assert_eq!(core.dirty_rows(), vec![0, 0]);
        let grad = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        core.model.tables[0].adagrad(&Tensor::from_slice(&[7i64, 42]), &grad, 0.1);
        // Written around the API: found by the scan.
        let _ = core.model.tables[0].rows().get(3).get(0).fill_(f64::NAN);
        let d = core.take_delta(&DeltaRequest {
            full: false,
            samples: vec![vec![
                Tensor::from_slice(&[1i64, 500]),
                Tensor::from_slice(&[0i64]),
            ]],
            ..Default::default()
        });
        assert_eq!(
            Vec::<i64>::try_from(&d.tables[0].index).unwrap(),
            vec![3, 7, 42]
        );
        assert_eq!(d.tables[0].values.size(), vec![3, 4]);
        assert_eq!(d.tables[1].index.numel(), 0);
        // Sampled rows the tables lack are left out.
        assert_eq!(Vec::<i64>::try_from(&d.samples[0][0].0).unwrap(), vec![1]);
        assert_eq!(d.samples[0][1].0.numel(), 0);
        let full = core.take_delta(&DeltaRequest {
            full: true,
            samples: Vec::new(),
            ..Default::default()
        });
        assert_eq!(full.tables[0].index.size(), vec![100]);
    }

    #[test]
    fn replay_count_rounds_the_ratio() {
        assert_eq!(replay_count(1000, 1.0), 1000);
        assert_eq!(replay_count(3, 0.5), 2);
        assert_eq!(replay_count(10, 0.0), 0);
    }
}
