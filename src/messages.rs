//! Typed messages between the actors, in one place.
//!
//! ```text
//! IngestActor ──AppendEvents──► StoreWriter (SyncArbiter thread) ──► sled
//!   ▲
//!   └── StopIngest (from the lifecycle in app.rs: stop consuming, write what is pending, close)
//!
//! lifecycle ──TrainRound──────► TrainerActor (SyncArbiter thread) ──reads──► GraphStore
//!           ──SaveCheckpoint──►               ──writes──► checkpoints
//! ```

use actix::Message;

use crate::store::{AppendBatch, AppendOutcome, StoreError};
use crate::trainer::{RoundOutcome, TrainerError};

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
