//! `[train]`, `[trainer]` and `[torch]`: the model and its step, the daemon's trainer, libtorch.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

/// The `[train]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub dim: i64,
    pub comparator: Comparator,
    pub loss: LossKind,
    /// Learning rate of the node tables.
    pub lr: f64,
    /// Learning rate of the relation vectors.
    pub relation_lr: f64,
    /// Uniform negatives per group and side.
    pub uniform_negatives: i64,
    /// Positives per chunk: each is scored against the other positives of its chunk (in-batch
    /// negatives: `chunk_size - 1` of them), one batched product for all chunks.
    pub chunk_size: usize,
    /// Standard deviation of new rows' random initialisation.
    pub init_scale: f64,
    /// Edges per step.
    pub batch_size: usize,
    pub seed: u64,
    /// A target type with at most this many rows is scored against all its rows as the
    /// target-side negatives (instead of in-batch plus uniform ones). 0: never.
    pub all_targets_up_to: i64,
    /// Node types whose sources are scored as their row plus the normalised sum of the rows of
    /// their `history_recent` most recent targets (of the edge's target type).
    pub history_types: Vec<String>,
    /// How many recent targets represent a source of a history type. 0: off.
    pub history_recent: usize,
    /// Recency weight of the history: the `k`-th most recent target weighs `history_decay^k`
    /// (before the sum is normalised to unit weight norm). 1: all alike.
    pub history_decay: f64,
    /// The `history_recent` most recent targets of each relation, each relation's weights
    /// normalised on their own (so each relation weighs alike), instead of the most recent of
    /// all relations together.
    pub history_by_relation: bool,
    /// Node types whose rows carry a learned scalar bias, added to every score in which one of
    /// them is the target: `(e_s + e_r)·e_t + b_t`. Empty: off.
    pub bias_types: Vec<String>,
    /// A second translation per relation for the source side, as PyTorch-BigGraph's dynamic
    /// relations have: sources of `(?, r, t)` are scored against `e_t + h_r`
    /// ([`crate::train::ReverseRelations`]).
    pub reverse_relations: bool,
    /// Offline `train` only: threads that each run steps on their share of every epoch's
    /// batches, updating the shared tables without locks (Hogwild, as PyTorch-BigGraph's
    /// workers do), each with one libtorch thread. 1: one thread, `torch.threads` intra-op.
    pub offline_workers: usize,
}

/// How a translated source is compared with a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Comparator {
    Dot,
    L2,
    L1,
    Cos,
}

/// The loss over a positive's score and its negatives' scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Logistic, positives and negatives balanced: each valid negative weighs 1/(its row's count).
    Logistic,
    /// Softmax cross-entropy of each positive against its valid negatives.
    Softmax,
}

/// The `[trainer]` section: how the daemon's trainer actor feeds [`crate::train::train_step`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    pub enabled: bool,
    pub replay_ratio: f64,
    /// Behind by this many edges (after a step's read) and nothing is replayed; the ratio falls
    /// linearly to it from `replay_ratio` at no backlog. 0: always `replay_ratio`.
    pub replay_backlog_limit: u64,
    pub max_batch_size: usize,
    pub warm_start: bool,
    pub warm_start_shrinkage: f64,
    /// A warm row's Adagrad accumulator starts at its type's mean (instead of 0), so its first
    /// step is as small as an established row's rather than `lr·√d` whatever the gradient.
    pub warm_start_state: bool,
    /// A new source of a history type (`train.history_types`) starts at its type's centroid:
    /// its recent targets already stand in for its neighbours, and its row is the residual.
    pub warm_start_history_centroid: bool,
    /// A trainer without a checkpoint starts from the newest whole version on the topics (its
    /// rows, biases and relation vectors), not from random rows.
    pub start_from_published: bool,
    /// Rows so taken have no Adagrad history: each starts as a row this many steps old.
    pub published_history_steps: f64,
    /// Relations the trainer trains (new and replayed edges); empty: all. Edges of the others
    /// are stored and passed over.
    pub train_relations: Vec<String>,
    pub prequential_per_step: usize,
    pub prequential_window: usize,
    pub idle_poll_ms: u64,
    pub round_budget_ms: u64,
    pub checkpoint_path: PathBuf,
    pub checkpoint_interval_secs: u64,
    pub checkpoint_keep: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchConfig {
    pub device: String,
    pub threads: i32,
}

impl Validate for TrainParams {
    fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        positive("train.dim", t.dim.max(0) as u64)?;
        positive("train.batch_size", t.batch_size as u64)?;
        positive("train.chunk_size", t.chunk_size as u64)?;
        positive("train.offline_workers", t.offline_workers as u64)?;
        for (key, v) in [("train.lr", t.lr), ("train.relation_lr", t.relation_lr)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if !(t.init_scale.is_finite() && t.init_scale >= 0.0) {
            return Err(invalid("train.init_scale", "must be a non-negative number"));
        }
        if !(t.history_decay.is_finite() && t.history_decay > 0.0 && t.history_decay <= 1.0) {
            return Err(invalid("train.history_decay", "must be in (0, 1]"));
        }
        if t.all_targets_up_to < 0 {
            return Err(invalid("train.all_targets_up_to", "must be at least 0"));
        }
        if t.uniform_negatives < 0 {
            return Err(invalid("train.uniform_negatives", "must be at least 0"));
        }
        Ok(())
    }
}

impl Validate for TrainerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let tr = self;
        if !(tr.replay_ratio.is_finite() && tr.replay_ratio >= 0.0) {
            return Err(invalid(
                "trainer.replay_ratio",
                "must be a non-negative number",
            ));
        }
        if !(tr.warm_start_shrinkage.is_finite() && tr.warm_start_shrinkage >= 0.0) {
            return Err(invalid(
                "trainer.warm_start_shrinkage",
                "must be a non-negative number",
            ));
        }
        if !(tr.published_history_steps.is_finite() && tr.published_history_steps >= 0.0) {
            return Err(invalid(
                "trainer.published_history_steps",
                "must be a non-negative number",
            ));
        }
        positive("trainer.prequential_window", tr.prequential_window as u64)?;
        positive("trainer.idle_poll_ms", tr.idle_poll_ms)?;
        positive("trainer.round_budget_ms", tr.round_budget_ms)?;
        positive(
            "trainer.checkpoint_interval_secs",
            tr.checkpoint_interval_secs,
        )?;
        positive("trainer.checkpoint_keep", tr.checkpoint_keep as u64)?;
        Ok(())
    }
}

impl Validate for TorchConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        match self.device.as_str() {
            "auto" | "cpu" | "cuda" => {}
            d if d
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()) => {}
            d => {
                return Err(invalid(
                    "torch.device",
                    format!("{d:?}: expected auto, cpu, cuda or cuda:N"),
                ))
            }
        }
        if self.threads < 1 {
            return Err(invalid("torch.threads", "must be at least 1"));
        }
        Ok(())
    }
}
