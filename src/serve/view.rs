//! The published embeddings as the serving API reads them: exactly what subscribers of the
//! latest committed version hold (rows that moved less than `publish.row_threshold` keep their
//! earlier published values), on the CPU.
//!
//! The publish stage builds a [`PublishedView`] with each version; the daemon hands it to the
//! shared [`ServingView`] only once the version is committed (its marker acknowledged), so
//! `/v1/embeddings` and `/v1/neighbors` never show a version that Kafka subscribers cannot have.
//! Each version handed over also goes to the approximate-candidate indexes' updater
//! ([`AnnIndexes`]), which brings them to it on its own thread.
//!
//! Every request reads the view and one writer replaces it once per version, so it is an
//! [`ArcSwapOption`]: a read is a pointer load, never a lock, and a request keeps the version it
//! loaded however many are published meanwhile.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::config::AnnConfig;
use crate::partition::NodePartitions;
use crate::publish::PublishedView;
use crate::serve::{AnnHandle, AnnIndexes};

/// A committed version as served: never written after publication.
struct Committed(PublishedView);

// SAFETY: `tch::Tensor` is `Send` but not `Sync` because a tensor can be written in place
// through a shared handle (`shallow_clone` shares its storage). A `PublishedView` is never
// written after the publisher hands it over: the serving code and the index updater only read
// it (index_select, matmul, copies out, `shallow_clone`s that are read), and libtorch's reading
// operators, like the atomic reference counts of `shallow_clone`, are safe to run on one tensor
// from several threads at once (what PyTorch's multi-threaded inference relies on). The index
// updater already read a version's storage on its own thread, through its `shallow_clone`s, while
// requests read it; sharing the view itself adds readers, not writers.
unsafe impl Sync for Committed {}

/// The latest committed version, shared between the publication ticker (writer) and HTTP
/// (readers).
#[derive(Clone, Default)]
pub struct ServingView {
    current: Arc<ArcSwapOption<Committed>>,
    /// `None`: `/v1/neighbors` is always exact (`http.ann.enabled = false`).
    ann: Option<Arc<AnnHandle>>,
}

impl ServingView {
    /// A view without approximate-candidate indexes.
    pub fn new() -> ServingView {
        ServingView::default()
    }

    /// A view whose versions are also indexed for `/v1/neighbors` (`[http.ann]`; none when
    /// disabled). The indexes' updater thread stops when the last clone is dropped. `rows_of`
    /// (the store): where rows' partitions come from, so that a version that covers some
    /// partitions only is indexed for those alone (`None`: every row is).
    pub fn with_ann(
        cfg: &AnnConfig,
        rows_of: Option<Arc<dyn NodePartitions>>,
    ) -> std::io::Result<ServingView> {
        let ann = match cfg.enabled {
            true => Some(Arc::new(AnnIndexes::start(cfg.clone(), rows_of)?)),
            false => None,
        };
        Ok(ServingView {
            current: Arc::default(),
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
                view.scope.as_ref(),
            );
        }
        self.current.store(Some(Arc::new(Committed(view))));
    }

    /// The approximate-candidate indexes, when enabled.
    pub fn ann(&self) -> Option<&AnnIndexes> {
        self.ann.as_deref().map(|h| &**h)
    }

    /// Run `f` on the served version (`None` before the first commit).
    pub fn with<R>(&self, f: impl FnOnce(Option<&PublishedView>) -> R) -> R {
        let current = self.current.load();
        f(current.as_deref().map(|c| &c.0))
    }

    /// The served version number, if any.
    pub fn version(&self) -> Option<u64> {
        self.with(|v| v.map(|v| v.version))
    }
}
