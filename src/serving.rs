//! The published embeddings as the serving API reads them: exactly what subscribers of the
//! latest committed version hold (rows that moved less than `publish.row_threshold` keep their
//! earlier published values), on the CPU.
//!
//! The trainer builds a [`PublishedView`] when it prepares a version and hands it to the shared
//! [`ServingView`] only when the version's marker is acknowledged, so `/v1/embeddings` and
//! `/v1/neighbors` never show a version that Kafka subscribers cannot have.

use std::sync::{Arc, Mutex};

use tch::Tensor;

use crate::score::Comparator;

/// One committed version's parameters.
pub struct PublishedView {
    pub version: u64,
    pub epoch: u64,
    pub comparator: Comparator,
    /// Per node type (the store's type ids): `[rows, D]` on the CPU, row `i` being the node of
    /// dense index `i`. Nodes the version does not cover have no row (index ≥ rows).
    pub tables: Vec<Tensor>,
    /// `[relations, D]` on the CPU, in the store's relation order.
    pub relations: Tensor,
    /// Per node type and row: event time (ms) of the newest event that touched the row.
    pub row_ts: Vec<Vec<i64>>,
}

/// The latest committed version, shared between the trainer (writer) and HTTP (readers).
/// `Tensor` is `Send` but not `Sync`, hence a mutex; readers copy out what they need or compute
/// under the lock on a blocking thread.
#[derive(Clone, Default)]
pub struct ServingView {
    inner: Arc<Mutex<Option<PublishedView>>>,
}

impl ServingView {
    pub fn new() -> ServingView {
        ServingView::default()
    }

    /// Replace the served version.
    pub fn publish(&self, view: PublishedView) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
    }

    /// Run `f` on the served version (`None` before the first commit).
    pub fn with<R>(&self, f: impl FnOnce(Option<&PublishedView>) -> R) -> R {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_ref())
    }

    /// The served version number, if any.
    pub fn version(&self) -> Option<u64> {
        self.with(|v| v.map(|v| v.version))
    }
}
