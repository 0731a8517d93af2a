//! Typed messages between the actors, in one place.
//!
//! ```text
//! IngestActor ──AppendEvents──► StoreWriter (SyncArbiter thread) ──► sled
//!   ▲
//!   └── StopIngest (from the lifecycle in app.rs: stop consuming, write what is pending, close)
//! ```

use actix::Message;

use crate::store::{AppendBatch, AppendOutcome, StoreError};

/// Make one batch of valid events and the offsets it covers durable, atomically.
#[derive(Debug, Message)]
#[rtype(result = "Result<AppendOutcome, StoreError>")]
pub struct AppendEvents(pub AppendBatch);

/// Stop consuming, make the pending batch durable, close the consumer; resolves when done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopIngest;
