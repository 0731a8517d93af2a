//! The store-writer actor: makes each batch of valid events and the offsets it covers durable,
//! atomically, on its own thread (a `SyncArbiter`: sled's flush blocks).

use std::sync::Arc;

use actix::prelude::*;

use crate::store::{AppendBatch, AppendOutcome, GraphStore, StoreError};

/// Make one batch of valid events and the offsets it covers durable, atomically.
#[derive(Debug, Message)]
#[rtype(result = "Result<AppendOutcome, StoreError>")]
pub(crate) struct AppendEvents(pub AppendBatch);

/// Applies batches to the store on its own thread (`SyncArbiter`).
pub(crate) struct StoreWriter {
    store: Arc<GraphStore>,
}

impl StoreWriter {
    pub(crate) fn new(store: Arc<GraphStore>) -> Self {
        StoreWriter { store }
    }
}

impl Actor for StoreWriter {
    type Context = SyncContext<Self>;
}

impl Handler<AppendEvents> for StoreWriter {
    type Result = Result<AppendOutcome, StoreError>;

    fn handle(&mut self, msg: AppendEvents, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.append(&msg.0)
    }
}
