//! One target type's HNSW graph: building it, inserting and removing rows, searching it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_lock::Semaphore;
use parking_lot::RwLock;
use usearch::{Index, IndexOptions, ScalarKind};

use crate::config::{AnnConfig, AnnQuantization};

use super::reduction::Reduction;
use super::{index_err, AnnError};

/// Rows converted and inserted at a time while building (bounds the copy out of libtorch).
pub(super) const BUILD_CHUNK: i64 = 8192;

/// One target type's graph: key = the row's dense index.
pub(super) struct TypeIndex {
    pub(super) index: Index,
    pub(super) reduction: Reduction,
    /// The rows' dimension (the graph's may be one more).
    pub(super) dim: usize,
    /// The served version whose rows it holds, every one.
    pub(super) version: AtomicU64,
    /// The table's rows when last brought up to date: every key below it that the index
    /// should hold, it holds.
    pub(super) rows: AtomicUsize,
    /// The partitions (of the count beside them) whose rows it holds; `None`: every row.
    pub(super) scope: Option<(Vec<i32>, u32)>,
    /// Bytes the index holds, as of its last build or update ([`TypeIndex::measure`]).
    pub(super) memory: AtomicUsize,
    /// Searches, inserts and removals share it; growing the capacity takes it alone.
    pub(super) gate: RwLock<()>,
    /// usearch needs a thread context per concurrent call: at most `http.ann.search_threads`
    /// searches at once, the rest wait for a turn.
    pub(super) turns: Semaphore,
}

impl TypeIndex {
    pub(super) fn new(
        cfg: &AnnConfig,
        reduction: Reduction,
        dim: usize,
        capacity: usize,
        scope: Option<(Vec<i32>, u32)>,
    ) -> Result<TypeIndex, AnnError> {
        let index = Index::new(&IndexOptions {
            dimensions: reduction.dims(dim),
            metric: reduction.metric(),
            quantization: match cfg.quantization {
                AnnQuantization::F32 => ScalarKind::F32,
                AnnQuantization::F16 => ScalarKind::F16,
            },
            connectivity: cfg.connectivity,
            expansion_add: cfg.expansion_add,
            expansion_search: cfg.expansion_search,
            multi: false,
        })
        .map_err(index_err)?;
        // Searches, the updater, and the builder's threads each hold a context.
        let contexts = (cfg.search_threads + 1).max(cfg.build_threads);
        index
            .reserve_capacity_and_threads(capacity.max(1024), contexts)
            .map_err(index_err)?;
        Ok(TypeIndex {
            index,
            reduction,
            dim,
            version: AtomicU64::new(0),
            rows: AtomicUsize::new(0),
            scope,
            memory: AtomicUsize::new(0),
            gate: RwLock::new(()),
            turns: Semaphore::new(cfg.search_threads),
        })
    }

    /// Room for `more` keys beyond the present ones (doubling; the reserve reallocates, so it
    /// waits for running searches and holds new ones back while it runs).
    pub(super) fn make_room(&self, more: usize, threads: usize) -> Result<(), AnnError> {
        let needed = self.index.size() + more;
        if needed <= self.index.capacity() {
            return Ok(());
        }
        let _alone = self.gate.write();
        let capacity = needed.max(self.index.capacity() * 2);
        self.index
            .reserve_capacity_and_threads(capacity, threads)
            .map_err(index_err)
    }

    /// Insert `keys` with `rows [keys, dim]` (and `biases [keys]`), replacing a key the index
    /// holds only when its item moved more than `min_move` (relative L2 change) from the copy
    /// held. Returns how many it inserted or replaced.
    ///
    /// Why a row that moved little keeps its place: the graph only proposes candidates, which
    /// are re-scored with the served rows, so a held copy near the row costs recall only at the
    /// margin, while a replacement is a removal and an insertion (a search of the graph with
    /// `expansion_add` candidates), which cost the updater most of its CPU under a live stream,
    /// where most rows of a version moved a little.
    pub(super) fn upsert(
        &self,
        keys: &[i64],
        rows: &[f32],
        biases: Option<&[f32]>,
        min_move: f64,
    ) -> Result<usize, AnnError> {
        let _shared = self.gate.read();
        let mut item = Vec::with_capacity(self.dim + 1);
        let mut held = Vec::new();
        let mut written = 0;
        for (i, &key) in keys.iter().enumerate() {
            let row = &rows[i * self.dim..(i + 1) * self.dim];
            self.reduction.item(row, biases.map(|b| b[i]), &mut item);
            let key = key as u64;
            if self.index.contains(key) {
                if min_move > 0.0 {
                    held.resize(item.len(), 0.0);
                    let got = self.index.get(key, &mut held).map_err(index_err)?;
                    if got == 1 && relative_change(&item, &held) <= min_move {
                        continue;
                    }
                }
                self.index.remove(key).map_err(index_err)?;
            }
            self.index.add(key, &item).map_err(index_err)?;
            written += 1;
        }
        Ok(written)
    }

    /// Records the bytes the index holds, for [`AnnIndexes::figures`]. usearch's figure walks
    /// every node without a lock, so it is only safe on the updater's thread (the one writer)
    /// and costs a pass over the index: after a build (`rows_before` 0) it is measured; after an
    /// update, grown by the new rows at the bytes per row last measured. (Rows held, not rows
    /// of the table.)
    pub(super) fn measure(&self, rows_before: usize, rows_now: usize) {
        let bytes = if rows_before == 0 {
            self.index.memory_usage()
        } else {
            let measured = self.memory.load(Ordering::Relaxed);
            measured + rows_now.saturating_sub(rows_before) * (measured / rows_before)
        };
        self.memory.store(bytes, Ordering::Relaxed);
    }
}

/// `‖item − held‖ / ‖held‖` (infinite when the held copy is zero and the item is not).
pub(super) fn relative_change(item: &[f32], held: &[f32]) -> f64 {
    let (mut diff, mut base) = (0.0f64, 0.0f64);
    for (&a, &b) in item.iter().zip(held) {
        diff += f64::from(a - b).powi(2);
        base += f64::from(b).powi(2);
    }
    if diff == 0.0 {
        0.0
    } else if base == 0.0 {
        f64::INFINITY
    } else {
        (diff / base).sqrt()
    }
}
