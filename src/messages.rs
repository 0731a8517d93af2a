//! Typed messages between the actors, in one place.
//!
//! ```text
//! IngestActor ──AppendEvents──► StoreWriter (SyncArbiter thread) ──► sled
//!   ▲
//!   └── StopIngest (from the lifecycle in app.rs: stop consuming, write what is pending, close)
//!
//! lifecycle ──TrainRound──────► TrainerActor (SyncArbiter thread) ──reads──► GraphStore
//!           ──SaveCheckpoint──►               ──writes──► checkpoints
//! publisher ──PrepareVersion──► TrainerActor ──rows + marker──► publisher ──► Kafka
//!           ──CommitVersion───► (after the marker's acknowledgement: the new reference)
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
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<PreparedVersion>, TrainerError>")]
pub struct PrepareVersion {
    pub version: u64,
    pub epoch: u64,
    pub format: ValueFormat,
    /// Relative change over which a row is republished.
    pub threshold: f64,
}

/// The version's marker was acknowledged: adopt its snapshot as the reference.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CommitVersion(pub u64);
