//! Train: turns the store's edge log into better embeddings.
//!
//! Owns the model (embedding tables, relation vectors, row-wise Adagrad), the pure score and loss
//! functions, one training step (groups → scores → loss → update), warm start of new rows,
//! prequential ranking, checkpoints, a new model's start from the published state, its side of
//! the gradient exchange between instances ([`ForeignRows`]), the libtorch
//! device, and the trainer actor with its messages. Reads edges from the [`crate::store::GraphStore`] from its cursor; hands on
//! [`Snapshot`]s of its parameters (to align and publish) and its figures ([`TrainerStatus`]).

mod actor;
mod checkpoint;
mod device;
mod foreign;
mod history;
mod logistic_host;
mod loss;
mod model;
mod owned;
mod prequential;
mod query;
mod rank;
mod relation_shares;
mod score;
mod snapshot;
mod start;
mod status;
mod step;
#[cfg(test)]
mod test_graph;
mod trainer;
mod warm;

/// The training settings live in `[train]` (config); the stage's code names them from here.
pub use crate::config::{Comparator, LossKind, TrainParams};
pub(crate) use actor::{
    RestoreCheckpoint, Rotate, SaveCheckpoint, SetPull, TakeDelta, TrainRound, TrainerActor,
};
pub use checkpoint::{schema_fingerprint, Checkpoints};
pub(crate) use checkpoint::{CheckpointError, ResumedFrom};
pub(crate) use device::TorchInfo;
pub use device::{info, resolve};
pub use foreign::{ForeignRows, NodeGradient};
pub(crate) use history::{
    compose, history_targets, history_weights, history_with_rows, interest_groups,
    interest_sources, mixture,
};
pub use history::{composed_source, known_targets, weighted_recent, History};
pub use loss::loss;
pub(crate) use loss::{loss_and_gradients, loss_parts_fast};
pub(crate) use model::ReverseRelations;
pub use model::{Embeddings, NodeTable};
pub use owned::OwnedSources;
pub use prequential::RankTotals;
pub(crate) use prequential::RankWindow;
pub(crate) use query::{all_target_scores, SourceQuery};
pub(crate) use rank::{evaluate, Filter, RankMetrics};
pub use rank::{target_ranks, RankSum, TargetQuery, Triple};
pub use relation_shares::RelationShares;
pub(crate) use score::{score_pairs, score_sources};
pub use score::{score_targets, translate};
pub(crate) use snapshot::{
    load_snapshot, non_finite_in, non_finite_rows, save_snapshot, SnapshotError,
};
pub use snapshot::{DeltaExchange, DeltaRequest, ModelDelta, Snapshot, TableDelta};
pub use start::{PublishedRows, StartedFrom};
pub(crate) use status::{TrainStepTaken, TrainerFigures, TrainerStatus};
pub(crate) use step::rows_needed;
pub use step::{
    ensure_rows, train_step, train_step_autograd, train_step_tapped, train_step_with, GradientTap,
    Pull, StepStats,
};
pub use trainer::TrainerCore;
pub(crate) use trainer::{StepReport, TrainerError};
pub(crate) use warm::warm_rows;
