//! Approximate candidate retrieval for `/v1/neighbors`: one HNSW graph (usearch) per target node
//! type of the served version, kept on a thread of its own and brought up to date with the rows
//! each committed version changed (new rows inserted; a changed row replaced under its row index
//! once it moved more than `http.ann.reindex_threshold` from the copy the index holds; no rebuild
//! per version).
//!
//! The graph only proposes candidates; `/v1/neighbors` re-scores them exactly with the served
//! version, so every score it returns is the published score and only recall is approximate.
//! What the graph holds per comparator, so that its nearest keys are the best-scoring targets:
//!
//! - `dot`: an inner-product graph over `[e_t, b_t]`, queried with `[e_s + e_r, 1]` (the target
//!   bias of a biased type as one more dimension; without one, `[e_t]` and `e_s + e_r`);
//! - `cos`: the same over unit rows, queried with the unit translated source;
//! - `l2` without a target bias: an L2 graph over the rows, queried with `e_s + e_r`;
//! - `l1`, and `l2` with a target bias, have no reduction to a graph metric: always exact.
//!
//! Why an inner-product graph and not the reduction of inner product to L2 (Bachrach et al.:
//! append `sqrt(M² − ‖x‖²)` to each row): on 100k clustered rows of dimension 128 (M = 16,
//! ef 128, 50 candidates re-scored) the reduction's recall@10 was 0.61, the inner-product graph's
//! 0.9998 (non-metric graphs for MIPS: Morozov and Babenko, 2018); and it has no radius `M` for a
//! growing row to outgrow. usearch over hnsw_rs: on the same rows it built 5× faster, searched
//! 8× faster, and removes and replaces a row, where hnsw_rs has no removal (figures in
//! docs/measurements.md, "Approximate neighbours at a million rows").
//!
//! Serving never waits for an update: usearch's index takes searches, inserts and removals
//! concurrently, and the one updater thread inserts while requests search. Only growing an
//! index's capacity (a reallocation) takes its gate exclusively, for the reserve alone. An index
//! lags the served version by its update: the response names the version it reflects
//! (`index_version`). Rebuilds happen only when there is no index to update: the first version a
//! type reaches `min_rows` with, a version without a record of its changed rows (the one
//! restored at start), a change of comparator, dimension or bias.
//!
//! With several instances (a version that covers some partitions only, `PublishedView::scope`)
//! an index holds only the rows of the partitions its version covers: the rows this instance
//! owns and publishes. Its other rows are copies of what other owners publish and index, and
//! indexing them too would make every instance build, update and hold an index of the whole
//! graph (measured: docs/measurements.md, "Throughput with a CPU cap per instance").
//! `/v1/neighbors` asks the other owners for theirs ([`Candidates::covered`]). Which partition a
//! row belongs to is its node key's ([`NodePartitions`]), looked up once per row and kept, so an
//! update still costs its changed rows; a version that covers other partitions than the index
//! holds builds it again.
//!
//! Memory: the index keeps its own copy of the rows (f16 by default: half the served f32 rows)
//! and its links; the updater holds shallow copies of the version it indexes, so while an update
//! runs the served version before the newest stays alive (one more copy of the tables, for the
//! update's duration). Versions that arrive during an update wait as one: the newest rows with
//! the union of their changed rows.

mod reduction;
#[cfg(test)]
mod tests;
mod type_index;
mod updater;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;
use tch::{Kind, Tensor};
use tracing::warn;

use crate::config::AnnConfig;
use crate::partition::{NodePartitions, PartitionsByRow};
use crate::publish::Scope;
use crate::schema::TypeId;
use crate::train::Comparator;

use reduction::Reduction;
use type_index::TypeIndex;
use updater::{Counters, Inbox, Submitted};

/// What an index operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("usearch: {0}")]
    Index(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub(super) fn index_err(e: impl std::fmt::Display) -> AnnError {
    AnnError::Index(e.to_string())
}

/// The figures `/v1/status` and the bench report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AnnFigures {
    /// Per node type (the store's type ids) with an index: what it holds.
    pub types: Vec<AnnTypeFigures>,
    /// Indexes built from every row (see the module docs for when).
    pub builds: u64,
    /// Versions applied to existing indexes, the rows they inserted or replaced, and the changed
    /// rows they left in place because they moved less than `http.ann.reindex_threshold` from
    /// the copy the index holds.
    pub updates: u64,
    pub rows_updated: u64,
    pub rows_kept: u64,
    /// The last build's and update's duration (ms) and rows.
    pub last_build_ms: f64,
    pub last_build_rows: u64,
    pub last_update_ms: f64,
    pub last_update_rows: u64,
    /// Versions that failed to index (the type is served exactly until the next build), and
    /// the last failure.
    pub failures: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AnnTypeFigures {
    pub node_type: TypeId,
    pub version: u64,
    /// Rows the index holds.
    pub rows: u64,
    /// The partitions whose rows it holds (`null`: every row of the type).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<Vec<i32>>,
    /// The index's bytes: measured after each build, then grown by the bytes a row took at the
    /// last measure for each row an update adds (an estimate until the next build; measuring
    /// walks every node and is only safe on the updater's thread).
    pub memory_bytes: u64,
}

/// The indexes and their updater, shared by the serving view (which submits each committed
/// version) and the requests (which search).
pub struct AnnIndexes {
    cfg: AnnConfig,
    types: RwLock<Vec<Option<Arc<TypeIndex>>>>,
    inbox: Mutex<Inbox>,
    wake: Condvar,
    counters: Counters,
    /// `None`: every index holds every row, whatever a version covers.
    rows_of: Option<Arc<dyn NodePartitions>>,
    /// The partition of each row looked up so far (the updater's alone).
    owners: Mutex<PartitionsByRow>,
}

/// Candidates for one target type: row indices (ascending, distinct).
pub struct Candidates {
    pub rows: Vec<i64>,
    /// The served version the index reflects.
    pub index_version: u64,
    /// The partitions whose rows the index holds (of `partitions`): the candidates of the
    /// others are their owners' to give. `None`: every row.
    pub covered: Option<(Vec<i32>, u32)>,
}

impl AnnIndexes {
    /// The indexes, with their updater thread started; it stops when the returned handle is
    /// dropped. `rows_of`: where rows' partitions come from, so that an index holds only the
    /// partitions its version covers (`None`: every row).
    pub fn start(
        cfg: AnnConfig,
        rows_of: Option<Arc<dyn NodePartitions>>,
    ) -> std::io::Result<AnnHandle> {
        let shared = Arc::new(AnnIndexes {
            cfg,
            types: RwLock::new(Vec::new()),
            inbox: Mutex::default(),
            wake: Condvar::new(),
            counters: Counters::default(),
            rows_of,
            owners: Mutex::default(),
        });
        let worker = shared.clone();
        let nice = shared.cfg.updater_nice;
        let thread = std::thread::Builder::new()
            .name("ann-index".into())
            .spawn(move || {
                lower_priority(nice);
                worker.run()
            })?;
        Ok(AnnHandle {
            shared,
            _thread: thread,
        })
    }

    pub fn config(&self) -> &AnnConfig {
        &self.cfg
    }

    /// Hand a committed version to the updater (never waits for it). `changed`: per type, the
    /// row indices the version published (`None`: not known, index every row); `scope`: the
    /// partitions it covers (`None`: every one).
    pub fn submit(
        &self,
        version: u64,
        comparator: Comparator,
        tables: &[Tensor],
        biases: &[Option<Tensor>],
        changed: Option<&[Tensor]>,
        scope: Option<&Scope>,
    ) {
        let changed = changed.map(|c| {
            c.iter()
                .map(|t| Vec::<i64>::try_from(&t.to_kind(Kind::Int64)).unwrap_or_default())
                .collect()
        });
        let next = Submitted {
            version,
            comparator,
            tables: tables.iter().map(Tensor::shallow_clone).collect(),
            biases: biases
                .iter()
                .map(|b| b.as_ref().map(Tensor::shallow_clone))
                .collect(),
            changed,
            scope: scope.filter(|s| !s.is_whole()).cloned(),
        };
        let mut inbox = self.inbox.lock();
        inbox.next = Some(match inbox.next.take() {
            Some(pending) => pending.followed_by(next),
            None => next,
        });
        self.wake.notify_one();
    }

    /// Wait (at most `timeout`) until the updater has finished with version `version` or a
    /// later one; true if it has.
    pub fn wait_for(&self, version: u64, timeout: std::time::Duration) -> bool {
        let mut done = self.counters.done.lock();
        self.counters
            .done_changed
            .wait_while_for(&mut done, |d| *d < version, timeout);
        *done >= version
    }

    /// Search type `t`'s index for `count` candidates for the translated source `translated`
    /// (served with `comparator`; `biased`: the type's rows carry a target bias), keeping only
    /// keys for which `keep` is true. `None`: no index fits (too few rows, none built yet, or
    /// built for another comparator or dimension): score exactly.
    pub fn search(
        &self,
        t: TypeId,
        comparator: Comparator,
        biased: bool,
        translated: &[f32],
        count: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Option<Result<Candidates, AnnError>> {
        let ix = self.index_of(t)?;
        if Reduction::of(comparator, biased) != Some(ix.reduction) || translated.len() != ix.dim {
            return None;
        }
        let query = ix.reduction.query(translated);
        let _turn = ix.turns.acquire_blocking();
        let _shared = ix.gate.read();
        // (usearch searches with max(ef, count) candidates.)
        let index_version = ix.version.load(Ordering::Acquire);
        Some(
            ix.index
                .filtered_search(&query, count, keep)
                .map_err(index_err)
                .map(|m| {
                    // A key replaced while the search ran can come back twice, or as usearch's
                    // free-slot key (u64::MAX).
                    let mut rows: Vec<i64> = m
                        .keys
                        .iter()
                        .filter(|&&k| k != u64::MAX)
                        .map(|&k| k as i64)
                        .collect();
                    rows.sort_unstable();
                    rows.dedup();
                    Candidates {
                        rows,
                        index_version,
                        covered: ix.scope.clone(),
                    }
                }),
        )
    }

    fn index_of(&self, t: TypeId) -> Option<Arc<TypeIndex>> {
        self.types.read().get(t as usize).cloned().flatten()
    }

    pub fn figures(&self) -> AnnFigures {
        let c = &self.counters;
        let (last_build_ms, last_build_rows, last_update_ms, last_update_rows) = *c.last.lock();
        let types = self
            .types
            .read()
            .iter()
            .enumerate()
            .filter_map(|(t, ix)| {
                ix.as_ref().map(|ix| AnnTypeFigures {
                    node_type: t as TypeId,
                    version: ix.version.load(Ordering::Acquire),
                    rows: ix.index.size() as u64,
                    partitions: ix.scope.as_ref().map(|(covered, _)| covered.clone()),
                    memory_bytes: ix.memory.load(Ordering::Relaxed) as u64,
                })
            })
            .collect();
        AnnFigures {
            types,
            builds: c.builds.load(Ordering::Relaxed),
            updates: c.updates.load(Ordering::Relaxed),
            rows_updated: c.rows_updated.load(Ordering::Relaxed),
            rows_kept: c.rows_kept.load(Ordering::Relaxed),
            last_build_ms,
            last_build_rows,
            last_update_ms,
            last_update_rows,
            failures: c.failures.load(Ordering::Relaxed),
            last_error: c.last_error.lock().clone(),
        }
    }
}

/// Give the calling thread nice value `nice` (Linux schedules threads, so this thread alone).
/// The updater is a cache of the served version that may lag it (the response names the version
/// the index reflects), and while the daemon works through a backlog it would otherwise take as
/// much CPU as training does: updates then coalesce, so every version's rows are indexed, later.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: plain system calls on the calling thread's own id.
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) != 0
    };
    if failed {
        warn!(nice, error = %std::io::Error::last_os_error(),
            "could not lower the ANN updater's priority (http.ann.updater_nice); it runs at the daemon's");
    }
}

/// Owns the updater thread: dropping the last handle stops it (a build under way stops at its
/// next chunk).
pub struct AnnHandle {
    shared: Arc<AnnIndexes>,
    _thread: JoinHandle<()>,
}

impl std::ops::Deref for AnnHandle {
    type Target = AnnIndexes;
    fn deref(&self) -> &AnnIndexes {
        &self.shared
    }
}

impl Drop for AnnHandle {
    fn drop(&mut self) {
        self.shared.inbox.lock().stop = true;
        self.shared.wake.notify_all();
    }
}
