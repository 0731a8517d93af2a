//! The published embeddings as the serving API reads them: exactly what subscribers of the
//! latest committed version hold (rows that moved less than `publish.row_threshold` keep their
//! earlier published values), on the CPU.
//!
//! The publish stage builds a [`PublishedView`] with each version; the daemon hands it to the
//! shared [`ServingView`] only once the version is committed (its marker acknowledged), so
//! `/v1/embeddings` and `/v1/neighbors` never show a version that Kafka subscribers cannot have.

use std::sync::{Arc, Mutex};

use crate::publish::PublishedView;

/// The latest committed version, shared between the publication ticker (writer) and HTTP
/// (readers).
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
