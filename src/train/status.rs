//! The trainer's live figures, shared with `/v1/status`, and the step event that records them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tracing::warn;

use crate::telemetry as m;
use crate::train::{ResumedFrom, StartedFrom, StepReport, TrainerCore};

/// Live trainer figures shared with `/v1/status` (floats stored as bits).
#[derive(Debug, Default)]
pub struct TrainerStatus {
    pub steps: AtomicU64,
    pub skipped_steps: AtomicU64,
    pub edges_new: AtomicU64,
    pub edges_replayed: AtomicU64,
    pub edges_left_to_owners: AtomicU64,
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
    /// Sums over every rank since the process started.
    preq_totals: parking_lot::Mutex<crate::train::RankTotals>,
    /// Relation name → its prequential figures.
    by_relation: parking_lot::Mutex<BTreeMap<String, RelationPrequential>>,
    /// Set once at start: the checkpoint the trainer resumed from.
    resumed_from: std::sync::OnceLock<ResumedFrom>,
    /// Set once at start: the published version a new model started from.
    started_from: std::sync::OnceLock<StartedFrom>,
}

/// The `trainer` part of `/v1/status`.
#[derive(Debug, Serialize)]
pub struct TrainerFigures {
    pub steps: u64,
    pub skipped_steps: u64,
    pub edges_trained: u64,
    pub edges_replayed: u64,
    /// Stored edges passed over because another instance owns their source (each edge is
    /// trained by its source's owner).
    pub edges_left_to_owners: u64,
    pub cursor: u64,
    pub backlog: u64,
    pub batch_size: u64,
    pub loss: Option<f64>,
    pub prequential: PrequentialFigures,
    /// Newest checkpoint written by this process (0: none yet).
    pub checkpoint_version: u64,
    pub restarts: u64,
    /// The checkpoint this process resumed from, and the newer ones it found unusable (`null`:
    /// a new model).
    pub resumed_from: Option<ResumedFrom>,
    /// The published version a new model started from (`trainer.start_from_published`), and
    /// what it took; `null`: resumed from a checkpoint, or nothing was published.
    pub started_from: Option<StartedFrom>,
}

#[derive(Debug, Serialize)]
pub struct PrequentialFigures {
    pub ranked: u64,
    pub mrr: Option<f64>,
    #[serde(rename = "hits@10")]
    pub hits10: Option<f64>,
    /// Per relation, over the last `trainer.prequential_window` ranks of each.
    pub by_relation: BTreeMap<String, RelationPrequential>,
    /// Sums over every rank since the process started (a stretch of the stream is the
    /// difference of two readings).
    pub totals: crate::train::RankTotals,
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
            edges_left_to_owners: get(&self.edges_left_to_owners),
            cursor: get(&self.cursor),
            backlog: get(&self.backlog),
            batch_size: get(&self.batch_size),
            loss: load_f64(&self.loss_bits),
            prequential: PrequentialFigures {
                ranked: get(&self.preq_ranked),
                mrr: load_f64(&self.preq_mrr_bits),
                hits10: load_f64(&self.preq_hits10_bits),
                by_relation: self.by_relation.lock().clone(),
                totals: *self.preq_totals.lock(),
            },
            checkpoint_version: get(&self.checkpoint_version),
            restarts: get(&self.restarts),
            resumed_from: self.resumed_from.get().cloned(),
            started_from: self.started_from.get().cloned(),
        }
    }

    /// Record where the trainer started (once, before the first step).
    pub fn set_resumed_from(&self, resumed: Option<&ResumedFrom>, started: Option<&StartedFrom>) {
        if let Some(r) = resumed {
            let _ = self.resumed_from.set(r.clone());
        }
        if let Some(s) = started {
            let _ = self.started_from.set(s.clone());
        }
    }
}

/// A training step taken: [`TrainStepTaken::emit`] is the only place it is recorded (the
/// status, the metrics, and the log line of a skipped step).
pub(crate) struct TrainStepTaken<'a> {
    pub report: &'a StepReport,
    pub core: &'a TrainerCore,
    /// Relation names by id, for the per-relation figures.
    pub relation_names: &'a [String],
}

impl TrainStepTaken<'_> {
    pub(crate) fn emit(&self, status: &TrainerStatus) {
        let (r, core, relation_names) = (self.report, self.core, self.relation_names);
        status.cursor.store(core.cursor(), Ordering::Relaxed);
        status.backlog.store(r.backlog, Ordering::Relaxed);
        status
            .batch_size
            .store(r.batch_size as u64, Ordering::Relaxed);
        metrics::gauge!(m::TRAIN_BACKLOG).set(r.backlog as f64);
        metrics::gauge!(m::TRAIN_BATCH_EDGES).set(r.batch_size as f64);
        if r.left_to_owners > 0 {
            (status.edges_left_to_owners).fetch_add(r.left_to_owners as u64, Ordering::Relaxed);
            metrics::counter!(m::TRAIN_EDGES, "kind" => "left_to_owners")
                .increment(r.left_to_owners as u64);
        }
        let Some(stats) = r.stats else { return };
        status.steps.fetch_add(1, Ordering::Relaxed);
        status
            .edges_new
            .fetch_add(r.new_edges as u64, Ordering::Relaxed);
        status
            .edges_replayed
            .fetch_add(r.replayed as u64, Ordering::Relaxed);
        metrics::counter!(m::TRAIN_STEPS).increment(1);
        metrics::counter!(m::TRAIN_EDGES, "kind" => "new").increment(r.new_edges as u64);
        metrics::counter!(m::TRAIN_EDGES, "kind" => "replay").increment(r.replayed as u64);
        metrics::histogram!(m::TRAIN_STEP_SECONDS).record(r.seconds);
        metrics::counter!(m::TRAIN_ROWS, "init" => "warm").increment(r.warm_rows as u64);
        metrics::counter!(m::TRAIN_ROWS, "init" => "random").increment(r.random_rows as u64);
        if stats.skipped {
            status.skipped_steps.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::TRAIN_SKIPPED).increment(1);
            warn!(
                loss = stats.loss,
                edges = stats.edges,
                cursor = core.cursor(),
                "training step skipped: loss or gradients not finite"
            );
        } else {
            status
                .loss_bits
                .store(stats.loss.to_bits(), Ordering::Relaxed);
            metrics::gauge!(m::TRAIN_LOSS).set(stats.loss);
        }
        if !r.ranks.is_empty() {
            status
                .preq_ranked
                .store(core.window.total(), Ordering::Relaxed);
            *status.preq_totals.lock() = core.window.totals();
            metrics::counter!(m::PREQ_RANKED).increment(r.ranks.len() as u64);
            if let Some((mrr, hits)) = core.window.figures() {
                status.preq_mrr_bits.store(mrr.to_bits(), Ordering::Relaxed);
                status
                    .preq_hits10_bits
                    .store(hits.to_bits(), Ordering::Relaxed);
                metrics::gauge!(m::PREQ_MRR).set(mrr);
                metrics::gauge!(m::PREQ_HITS10).set(hits);
            }
            let mut by_relation = status.by_relation.lock();
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
