//! The published embeddings as the serving API reads them: exactly what subscribers of the
//! latest committed version hold (rows that moved less than `publish.row_threshold` keep their
//! earlier published values), on the CPU.
//!
//! The publish stage builds a [`PublishedView`] with each version; the daemon hands it to the
//! shared [`ServingView`] only once the version is committed (its marker acknowledged), so
//! `/v1/embeddings` and `/v1/neighbors` never show a version that Kafka subscribers cannot have.
//! Each version handed over also goes to the approximate-candidate indexes' updater
//! ([`AnnIndexes`]), which brings them to it on its own thread.

use parking_lot::Mutex;
use std::sync::Arc;

use crate::config::AnnConfig;
use crate::publish::PublishedView;
use crate::serve::{AnnHandle, AnnIndexes};

/// The latest committed version, shared between the publication ticker (writer) and HTTP
/// (readers).
/// `Tensor` is `Send` but not `Sync`, hence a mutex; readers copy out what they need or compute
/// under the lock on a blocking thread.
#[derive(Clone, Default)]
pub struct ServingView {
    inner: Arc<Mutex<Option<PublishedView>>>,
    /// `None`: `/v1/neighbors` is always exact (`http.ann.enabled = false`).
    ann: Option<Arc<AnnHandle>>,
}

impl ServingView {
    /// A view without approximate-candidate indexes.
    pub fn new() -> ServingView {
        ServingView::default()
    }

    /// A view whose versions are also indexed for `/v1/neighbors` (`[http.ann]`; none when
    /// disabled). The indexes' updater thread stops when the last clone is dropped.
    pub fn with_ann(cfg: &AnnConfig) -> std::io::Result<ServingView> {
        let ann = match cfg.enabled {
            true => Some(Arc::new(AnnIndexes::start(cfg.clone())?)),
            false => None,
        };
        Ok(ServingView {
            inner: Arc::default(),
            ann,
        })
    }

    /// Replace the served version (and hand it to the indexes' updater, which never blocks
    /// this).
    pub fn publish(&self, view: PublishedView) {
        if let Some(ann) = &self.ann {
            ann.submit(
                view.version,
                view.comparator,
                &view.tables,
                &view.biases,
                view.changed.as_deref(),
            );
        }
        *self.inner.lock() = Some(view);
    }

    /// The approximate-candidate indexes, when enabled.
    pub fn ann(&self) -> Option<&AnnIndexes> {
        self.ann.as_deref().map(|h| &**h)
    }

    /// Run `f` on the served version (`None` before the first commit).
    pub fn with<R>(&self, f: impl FnOnce(Option<&PublishedView>) -> R) -> R {
        let guard = self.inner.lock();
        f(guard.as_ref())
    }

    /// The served version number, if any.
    pub fn version(&self) -> Option<u64> {
        self.with(|v| v.map(|v| v.version))
    }
}
