//! Typed messages between the actors, in one place.
//!
//! ```text
//! IngestActor ──AppendEvents──► StoreWriter (SyncArbiter thread) ──► sled
//!   ▲
//!   └── StopIngest (from the lifecycle in app.rs: stop consuming, write what is pending, close)
//!
//! lifecycle ──TrainRound──────► TrainerActor (SyncArbiter thread) ──reads──► GraphStore
//!           ──SaveCheckpoint──►               ──writes──► checkpoints
//! publisher ──TakeSnapshot────► TrainerActor ──snapshot──► publisher ──Assess──► AlignActor
//!           ──PrepareVersion──► TrainerActor (rotation applied) ──rows + marker──► Kafka
//!           ──CommitVersion───► TrainerActor (after the marker's ack: the new reference)
//!           ──Adopt───────────► AlignActor (anchor, pull controller) ──SetPull──► TrainerActor
//!           ──RestoreCheckpoint► TrainerActor (a held version; the supervisor after a failure)
//! ```

use actix::Message;

use crate::publish::ValueFormat;
use crate::store::{AppendBatch, AppendOutcome, StoreError};
use crate::trainer::{PreparedVersion, RoundOutcome, TrainerError};

/// Make one batch of valid events and the offsets it covers durable, atomically.
#[derive(Debug, Message)]
#[rtype(result = "Result<AppendOutcome, StoreError>")]
pub struct AppendEvents(pub AppendBatch);

/// Stop consuming, make the pending batch durable, close the consumer; resolves when done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopIngest;

/// Train on new edges for up to `trainer.round_budget_ms`, then answer.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoundOutcome, TrainerError>")]
pub struct TrainRound;

/// Write a checkpoint now (shutdown); resolves with its version.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, TrainerError>")]
pub struct SaveCheckpoint;

/// Select and encode the rows of the next version (see `TrainerCore::prepare_version`).
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<PreparedVersion>, TrainerError>")]
pub struct PrepareVersion {
    pub version: u64,
    pub epoch: u64,
    pub format: ValueFormat,
    /// Relative change over which a row is republished.
    pub threshold: f64,
    /// Rotation onto the anchor to apply to the model first (from the alignment actor).
    pub rotation: Option<tch::Tensor>,
    /// The alignment's figures, for the marker.
    pub align: Option<crate::align::AlignFigures>,
}

/// The version's marker was acknowledged: adopt its view as the reference (persisted in
/// `publish.path`, served by HTTP); resolves with the view for the alignment actor.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<crate::align::Snapshot>, TrainerError>")]
pub struct CommitVersion(pub u64);

/// Copy the current parameters and the reference to the CPU for the alignment actor.
#[derive(Debug, Message)]
#[rtype(result = "Result<(crate::align::Snapshot, Option<crate::align::Snapshot>), TrainerError>")]
pub struct TakeSnapshot;

/// Set the strength of the pull toward the reference.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetPull(pub f64);

/// Go back to the newest usable checkpoint (a held version, or a failed round); resolves with
/// the checkpoint's version and cursor.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, u64), TrainerError>")]
pub struct RestoreCheckpoint;
