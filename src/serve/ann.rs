//! Approximate candidate retrieval for `/v1/neighbors`: one HNSW graph (usearch) per target node
//! type of the served version, kept on a thread of its own and brought up to date with the rows
//! each committed version changed (new rows inserted, moved rows replaced under their row index;
//! no rebuild per version).
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
//! Memory: the index keeps its own copy of the rows (f16 by default: half the served f32 rows)
//! and its links; the updater holds shallow copies of the version it indexes, so while an update
//! runs the served version before the newest stays alive (one more copy of the tables, for the
//! update's duration). Versions that arrive during an update wait as one: the newest rows with
//! the union of their changed rows.

use async_lock::Semaphore;
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use tch::{Kind, Tensor};
use tracing::{info, warn};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

use crate::config::{AnnConfig, AnnQuantization};
use crate::schema::TypeId;
use crate::train::Comparator;

/// Rows converted and inserted at a time while building (bounds the copy out of libtorch).
const BUILD_CHUNK: i64 = 8192;

/// What an index operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("usearch: {0}")]
    Index(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn index_err(e: impl std::fmt::Display) -> AnnError {
    AnnError::Index(e.to_string())
}

/// How a comparator's score becomes the graph's metric (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduction {
    /// Inner product; `unit`: rows and query scaled to unit length first (cos).
    Inner { unit: bool, biased: bool },
    /// Squared Euclidean distance.
    L2,
}

impl Reduction {
    fn of(comparator: Comparator, biased: bool) -> Option<Reduction> {
        match comparator {
            Comparator::Dot => Some(Reduction::Inner {
                unit: false,
                biased,
            }),
            Comparator::Cos => Some(Reduction::Inner { unit: true, biased }),
            Comparator::L2 if !biased => Some(Reduction::L2),
            Comparator::L2 | Comparator::L1 => None,
        }
    }

    fn metric(self) -> MetricKind {
        match self {
            Reduction::Inner { .. } => MetricKind::IP,
            Reduction::L2 => MetricKind::L2sq,
        }
    }

    fn dims(self, dim: usize) -> usize {
        match self {
            Reduction::Inner { biased: true, .. } => dim + 1,
            _ => dim,
        }
    }

    /// A target row (with its bias) as the graph holds it.
    fn item(self, row: &[f32], bias: Option<f32>, out: &mut Vec<f32>) {
        out.clear();
        match self {
            Reduction::Inner { unit, biased } => {
                push_scaled(row, unit, out);
                if biased {
                    out.push(bias.unwrap_or(0.0));
                }
            }
            Reduction::L2 => out.extend_from_slice(row),
        }
    }

    /// The translated source as the graph is searched with.
    fn query(self, translated: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(translated.len() + 1);
        match self {
            Reduction::Inner { unit, biased } => {
                push_scaled(translated, unit, &mut out);
                if biased {
                    out.push(1.0);
                }
            }
            Reduction::L2 => out.extend_from_slice(translated),
        }
        out
    }
}

/// `row` appended to `out`, divided by its length when `unit` (as the cos score does: a zero
/// row stays zero).
fn push_scaled(row: &[f32], unit: bool, out: &mut Vec<f32>) {
    let scale = if unit {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            1.0 / norm
        } else {
            1.0
        }
    } else {
        1.0
    };
    out.extend(row.iter().map(|x| x * scale));
}

/// One target type's graph: key = the row's dense index.
struct TypeIndex {
    index: Index,
    reduction: Reduction,
    /// The rows' dimension (the graph's may be one more).
    dim: usize,
    /// The served version whose rows it holds, every one.
    version: AtomicU64,
    /// Rows indexed: keys `0..rows`.
    rows: AtomicUsize,
    /// Bytes the index holds, as of its last build or update ([`TypeIndex::measure`]).
    memory: AtomicUsize,
    /// Searches, inserts and removals share it; growing the capacity takes it alone.
    gate: RwLock<()>,
    /// usearch needs a thread context per concurrent call: at most `http.ann.search_threads`
    /// searches at once, the rest wait for a turn.
    turns: Semaphore,
}

impl TypeIndex {
    fn new(
        cfg: &AnnConfig,
        reduction: Reduction,
        dim: usize,
        capacity: usize,
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
            memory: AtomicUsize::new(0),
            gate: RwLock::new(()),
            turns: Semaphore::new(cfg.search_threads),
        })
    }

    /// Room for `more` keys beyond the present ones (doubling; the reserve reallocates, so it
    /// waits for running searches and holds new ones back while it runs).
    fn make_room(&self, more: usize, threads: usize) -> Result<(), AnnError> {
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

    /// Insert or replace `keys` with `rows [keys, dim]` (and `biases [keys]`).
    fn upsert(&self, keys: &[i64], rows: &[f32], biases: Option<&[f32]>) -> Result<(), AnnError> {
        let _shared = self.gate.read();
        let mut item = Vec::with_capacity(self.dim + 1);
        for (i, &key) in keys.iter().enumerate() {
            let row = &rows[i * self.dim..(i + 1) * self.dim];
            self.reduction.item(row, biases.map(|b| b[i]), &mut item);
            let key = key as u64;
            if self.index.contains(key) {
                self.index.remove(key).map_err(index_err)?;
            }
            self.index.add(key, &item).map_err(index_err)?;
        }
        Ok(())
    }

    /// Records the bytes the index holds, for [`AnnIndexes::figures`]. usearch's figure walks
    /// every node without a lock, so it is only safe on the updater's thread (the one writer)
    /// and costs a pass over the index: after a build (`rows_before` 0) it is measured; after an
    /// update, grown by the new rows at the bytes per row last measured.
    fn measure(&self, rows_before: usize, rows_now: usize) {
        let bytes = if rows_before == 0 {
            self.index.memory_usage()
        } else {
            let measured = self.memory.load(Ordering::Relaxed);
            measured + rows_now.saturating_sub(rows_before) * (measured / rows_before)
        };
        self.memory.store(bytes, Ordering::Relaxed);
    }
}

/// The figures `/v1/status` and the bench report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AnnFigures {
    /// Per node type (the store's type ids) with an index: what it holds.
    pub types: Vec<AnnTypeFigures>,
    /// Indexes built from every row (see the module docs for when).
    pub builds: u64,
    /// Versions applied to existing indexes, and the rows they inserted or replaced.
    pub updates: u64,
    pub rows_updated: u64,
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
    pub rows: u64,
    /// The index's bytes: measured after each build, then grown by the bytes a row took at the
    /// last measure for each row an update adds (an estimate until the next build; measuring
    /// walks every node and is only safe on the updater's thread).
    pub memory_bytes: u64,
}

/// A committed version as the updater receives it (shallow copies of the served tensors: the
/// served version's tables are never written after publication).
struct Submitted {
    version: u64,
    comparator: Comparator,
    tables: Vec<Tensor>,
    biases: Vec<Option<Tensor>>,
    /// Per type, the rows changed since the previously submitted version; `None`: not known.
    changed: Option<Vec<Vec<i64>>>,
}

impl Submitted {
    /// `self` taken over by the newer `next` before the updater got to it: `next`'s rows with the
    /// changes of both.
    fn followed_by(self, mut next: Submitted) -> Submitted {
        next.changed = match (self.changed, next.changed) {
            (Some(mut a), Some(b)) if self.comparator == next.comparator => {
                a.resize(a.len().max(b.len()), Vec::new());
                for (t, rows) in b.into_iter().enumerate() {
                    a[t].extend(rows);
                }
                Some(a)
            }
            _ => None,
        };
        next
    }
}

#[derive(Default)]
struct Inbox {
    next: Option<Submitted>,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    builds: AtomicU64,
    updates: AtomicU64,
    rows_updated: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    last: Mutex<(f64, u64, f64, u64)>,
    /// The last version the updater finished with (tests and the bench wait on it).
    done: Mutex<u64>,
    done_changed: Condvar,
}

/// The indexes and their updater, shared by the serving view (which submits each committed
/// version) and the requests (which search).
pub struct AnnIndexes {
    cfg: AnnConfig,
    types: RwLock<Vec<Option<Arc<TypeIndex>>>>,
    inbox: Mutex<Inbox>,
    wake: Condvar,
    counters: Counters,
}

/// Candidates for one target type: row indices (ascending, distinct).
pub struct Candidates {
    pub rows: Vec<i64>,
    /// The served version the index reflects.
    pub index_version: u64,
}

impl AnnIndexes {
    /// The indexes, with their updater thread started; it stops when the returned handle is
    /// dropped.
    pub fn start(cfg: AnnConfig) -> std::io::Result<AnnHandle> {
        let shared = Arc::new(AnnIndexes {
            cfg,
            types: RwLock::new(Vec::new()),
            inbox: Mutex::default(),
            wake: Condvar::new(),
            counters: Counters::default(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ann-index".into())
            .spawn(move || worker.run())?;
        Ok(AnnHandle {
            shared,
            _thread: thread,
        })
    }

    pub fn config(&self) -> &AnnConfig {
        &self.cfg
    }

    /// Hand a committed version to the updater (never waits for it). `changed`: per type, the
    /// row indices the version published (`None`: not known, index every row).
    pub fn submit(
        &self,
        version: u64,
        comparator: Comparator,
        tables: &[Tensor],
        biases: &[Option<Tensor>],
        changed: Option<&[Tensor]>,
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
                    rows: ix.rows.load(Ordering::Acquire) as u64,
                    memory_bytes: ix.memory.load(Ordering::Relaxed) as u64,
                })
            })
            .collect();
        AnnFigures {
            types,
            builds: c.builds.load(Ordering::Relaxed),
            updates: c.updates.load(Ordering::Relaxed),
            rows_updated: c.rows_updated.load(Ordering::Relaxed),
            last_build_ms,
            last_build_rows,
            last_update_ms,
            last_update_rows,
            failures: c.failures.load(Ordering::Relaxed),
            last_error: c.last_error.lock().clone(),
        }
    }

    /// The updater: take the newest submitted version, bring every type's index to it.
    fn run(self: Arc<Self>) {
        loop {
            let next = {
                let mut inbox = self.inbox.lock();
                loop {
                    if inbox.stop {
                        return;
                    }
                    if let Some(next) = inbox.next.take() {
                        break next;
                    }
                    self.wake.wait(&mut inbox);
                }
            };
            let version = next.version;
            tch::no_grad(|| self.apply(next));
            *self.counters.done.lock() = version;
            self.counters.done_changed.notify_all();
        }
    }

    fn stopping(&self) -> bool {
        self.inbox.lock().stop
    }

    fn apply(&self, s: Submitted) {
        let n_types = s.tables.len();
        for t in 0..n_types {
            let table = &s.tables[t];
            let bias = s.biases.get(t).and_then(Option::as_ref);
            let rows = if table.dim() == 2 {
                table.size()[0] as usize
            } else {
                0
            };
            let reduction = Reduction::of(s.comparator, bias.is_some());
            let (Some(reduction), true) = (reduction, rows >= self.cfg.min_rows) else {
                self.set(t, None);
                continue;
            };
            let dim = table.size()[1] as usize;
            let current = self
                .index_of(t as TypeId)
                .filter(|ix| ix.reduction == reduction && ix.dim == dim);
            let changed = s
                .changed
                .as_ref()
                .map(|c| c.get(t).cloned().unwrap_or_default());
            let result = match (current, changed) {
                (Some(ix), Some(changed)) => self.update(&ix, table, bias, changed, s.version),
                _ => match self.build(reduction, table, bias, s.version) {
                    Ok(Some(ix)) => {
                        self.set(t, Some(Arc::new(ix)));
                        Ok(())
                    }
                    Ok(None) => return, // stopping
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                // Served exactly until the next version builds it again from every row.
                self.set(t, None);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                *self.counters.last_error.lock() = Some(e.to_string());
                warn!(node_type = t, version = s.version, error = %e,
                    "ANN index update failed; the type is served exactly");
            }
        }
        let mut types = self.types.write();
        types.truncate(n_types);
    }

    fn set(&self, t: usize, ix: Option<Arc<TypeIndex>>) {
        let mut types = self.types.write();
        if types.len() <= t {
            types.resize(t + 1, None);
        }
        types[t] = ix;
    }

    /// A new index of every row of `table` (`None` when asked to stop meanwhile).
    fn build(
        &self,
        reduction: Reduction,
        table: &Tensor,
        bias: Option<&Tensor>,
        version: u64,
    ) -> Result<Option<TypeIndex>, AnnError> {
        let started = Instant::now();
        let (n, dim) = (table.size()[0], table.size()[1] as usize);
        let ix = TypeIndex::new(&self.cfg, reduction, dim, n as usize + n as usize / 4)?;
        let chunks = (n + BUILD_CHUNK - 1) / BUILD_CHUNK;
        let next_chunk = AtomicU64::new(0);
        let threads = self.cfg.build_threads.min(chunks.max(1) as usize);
        // Each thread owns shallow copies (a Tensor is Send, not Sync).
        let parts: Vec<(Tensor, Option<Tensor>)> = (0..threads)
            .map(|_| (table.shallow_clone(), bias.map(Tensor::shallow_clone)))
            .collect();
        let results: Vec<Result<bool, AnnError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|(table, bias)| {
                    let (ix, next_chunk) = (&ix, &next_chunk);
                    scope.spawn(move || -> Result<bool, AnnError> {
                        loop {
                            let c = next_chunk.fetch_add(1, Ordering::Relaxed) as i64;
                            if c >= chunks {
                                return Ok(true);
                            }
                            if self.stopping() {
                                return Ok(false);
                            }
                            let start = c * BUILD_CHUNK;
                            let len = BUILD_CHUNK.min(n - start);
                            let rows = Vec::<f32>::try_from(
                                &table
                                    .narrow(0, start, len)
                                    .to_kind(Kind::Float)
                                    .reshape([-1]),
                            )?;
                            let biases = bias
                                .as_ref()
                                .map(|b| {
                                    Vec::<f32>::try_from(
                                        &b.narrow(0, start, len).to_kind(Kind::Float),
                                    )
                                })
                                .transpose()?;
                            let keys: Vec<i64> = (start..start + len).collect();
                            ix.upsert(&keys, &rows, biases.as_deref())?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(index_err("a build thread panicked")))
                })
                .collect()
        });
        for r in results {
            if !r? {
                return Ok(None);
            }
        }
        ix.measure(0, n as usize);
        ix.rows.store(n as usize, Ordering::Release);
        ix.version.store(version, Ordering::Release);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        self.counters.builds.fetch_add(1, Ordering::Relaxed);
        {
            let mut last = self.counters.last.lock();
            last.0 = ms;
            last.1 = n as u64;
        }
        info!(
            version,
            rows = n,
            ms,
            memory_mib = ix.memory.load(Ordering::Relaxed) >> 20,
            "ANN index built"
        );
        Ok(Some(ix))
    }

    /// Bring `ix` to `version`: its `changed` rows (and every row past those indexed) inserted
    /// or replaced, rows past the table's end removed.
    fn update(
        &self,
        ix: &TypeIndex,
        table: &Tensor,
        bias: Option<&Tensor>,
        mut changed: Vec<i64>,
        version: u64,
    ) -> Result<(), AnnError> {
        let started = Instant::now();
        let n = table.size()[0];
        let indexed = ix.rows.load(Ordering::Acquire) as i64;
        changed.retain(|&i| (0..n).contains(&i));
        changed.extend(indexed..n);
        changed.sort_unstable();
        changed.dedup();
        {
            let _shared = ix.gate.read();
            for gone in n..indexed {
                if ix.index.contains(gone as u64) {
                    ix.index.remove(gone as u64).map_err(index_err)?;
                }
            }
        }
        let contexts = (self.cfg.search_threads + 1).max(self.cfg.build_threads);
        ix.make_room((n - indexed).max(0) as usize, contexts)?;
        for keys in changed.chunks(BUILD_CHUNK as usize) {
            let idx = Tensor::from_slice(keys);
            let rows = Vec::<f32>::try_from(
                &table
                    .index_select(0, &idx)
                    .to_kind(Kind::Float)
                    .reshape([-1]),
            )?;
            let biases = bias
                .map(|b| Vec::<f32>::try_from(&b.index_select(0, &idx).to_kind(Kind::Float)))
                .transpose()?;
            ix.upsert(keys, &rows, biases.as_deref())?;
        }
        ix.measure(indexed as usize, n as usize);
        ix.rows.store(n as usize, Ordering::Release);
        ix.version.store(version, Ordering::Release);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let c = &self.counters;
        c.updates.fetch_add(1, Ordering::Relaxed);
        c.rows_updated
            .fetch_add(changed.len() as u64, Ordering::Relaxed);
        let mut last = c.last.lock();
        last.2 = ms;
        last.3 = changed.len() as u64;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    fn config(min_rows: usize) -> AnnConfig {
        AnnConfig {
            enabled: true,
            min_rows,
            connectivity: 16,
            expansion_add: 64,
            expansion_search: 64,
            oversample: 5,
            search_threads: 2,
            build_threads: 2,
            quantization: AnnQuantization::F16,
        }
    }

    /// `n` rows of dimension `dim` around `n / 100` community centres, with spread norms (the
    /// shape of trained embeddings of the synthetic workload).
    fn clustered(rng: &mut SmallRng, n: usize, dim: usize) -> Vec<f32> {
        let centres: Vec<Vec<f32>> = (0..(n / 100).max(2))
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let scale = rng.random_range(0.5..1.5f32);
            let c = &centres[i % centres.len()];
            out.extend(c.iter().map(|x| scale * (x + rng.random_range(-0.5..0.5))));
        }
        out
    }

    fn table(flat: &[f32], dim: usize) -> Tensor {
        Tensor::from_slice(flat).reshape([(flat.len() / dim) as i64, dim as i64])
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The exact top `k` rows by `q · row + bias`.
    fn exact_top(flat: &[f32], dim: usize, bias: Option<&[f32]>, q: &[f32], k: usize) -> Vec<i64> {
        let mut s: Vec<(f32, i64)> = flat
            .chunks(dim)
            .enumerate()
            .map(|(i, r)| (dot(q, r) + bias.map_or(0.0, |b| b[i]), i as i64))
            .collect();
        s.sort_by(|a, b| b.0.total_cmp(&a.0));
        s.into_iter().take(k).map(|(_, i)| i).collect()
    }

    /// The index's candidates re-scored exactly, best `k`.
    fn ann_top(
        ann: &AnnIndexes,
        flat: &[f32],
        dim: usize,
        bias: Option<&[f32]>,
        q: &[f32],
        k: usize,
    ) -> Vec<i64> {
        let found = ann
            .search(0, Comparator::Dot, bias.is_some(), q, k * 5, |_| true)
            .expect("an index")
            .unwrap();
        let mut s: Vec<(f32, i64)> = found
            .rows
            .iter()
            .map(|&i| {
                let r = &flat[i as usize * dim..(i as usize + 1) * dim];
                (dot(q, r) + bias.map_or(0.0, |b| b[i as usize]), i)
            })
            .collect();
        s.sort_by(|a, b| b.0.total_cmp(&a.0));
        s.into_iter().take(k).map(|(_, i)| i).collect()
    }

    fn recall(want: &[i64], got: &[i64]) -> f64 {
        want.iter().filter(|i| got.contains(i)).count() as f64 / want.len() as f64
    }

    #[test]
    fn reductions_keep_the_score_order() {
        let mut rng = SmallRng::seed_from_u64(3);
        let dim = 8;
        for _ in 0..100 {
            let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
            let t: Vec<f32> = (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect();
            let b: f32 = rng.random_range(-1.0..1.0);
            let mut item = Vec::new();
            // dot with a bias: the graph's inner product is the score itself.
            let r = Reduction::of(Comparator::Dot, true).unwrap();
            r.item(&t, Some(b), &mut item);
            assert!((dot(&r.query(&q), &item) - (dot(&q, &t) + b)).abs() < 1e-4);
            // cos: the inner product of unit vectors (plus the bias).
            let r = Reduction::of(Comparator::Cos, true).unwrap();
            r.item(&t, Some(b), &mut item);
            let norm = |v: &[f32]| dot(v, v).sqrt();
            let cos = dot(&q, &t) / (norm(&q) * norm(&t));
            assert!((dot(&r.query(&q), &item) - (cos + b)).abs() < 1e-4);
        }
        assert_eq!(Reduction::of(Comparator::L2, false), Some(Reduction::L2));
        assert_eq!(Reduction::of(Comparator::L2, true), None);
        assert_eq!(Reduction::of(Comparator::L1, false), None);
    }

    #[test]
    fn the_index_finds_the_exact_top_ten() {
        let mut rng = SmallRng::seed_from_u64(11);
        let (n, dim) = (4000, 16);
        let flat = clustered(&mut rng, n, dim);
        let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-0.5..0.5)).collect();
        let ann = AnnIndexes::start(config(1000)).unwrap();
        let b = Tensor::from_slice(&bias);
        ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[Some(b)], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        assert_eq!(ann.figures().last_error, None);
        let mut total = 0.0;
        for _ in 0..50 {
            let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = exact_top(&flat, dim, Some(&bias), &q, 10);
            total += recall(&want, &ann_top(&ann, &flat, dim, Some(&bias), &q, 10));
        }
        assert!(total / 50.0 >= 0.95, "recall@10 {}", total / 50.0);
        let f = ann.figures();
        assert_eq!((f.builds, f.updates), (1, 0));
        assert_eq!(f.types[0].rows, n as u64);
        assert!(f.types[0].memory_bytes > 0);
    }

    #[test]
    fn versions_replace_moved_rows_and_add_new_ones_without_a_rebuild() {
        let mut rng = SmallRng::seed_from_u64(5);
        let (n, dim) = (3000, 8);
        let mut flat = clustered(&mut rng, n, dim);
        let ann = AnnIndexes::start(config(1000)).unwrap();
        ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        // Version 2: row 17 turns to a direction nothing else has, and 10 rows are new.
        let q: Vec<f32> = (0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
        flat[17 * dim..18 * dim].copy_from_slice(&[50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        flat.extend(clustered(&mut rng, 10, dim));
        flat[(n + 3) * dim] = 40.0;
        apply_version(&ann, 2, &flat, dim, &[17, 3000, 3001, 3002, 3003]);
        let top = ann_top(&ann, &flat, dim, None, &q, 2);
        assert_eq!(top, vec![17, n as i64 + 3]);
        let f = ann.figures();
        assert_eq!((f.builds, f.updates), (1, 1));
        // The changed rows and every row past those indexed (the new ones).
        assert_eq!(f.last_update_rows, 11);
        assert_eq!((f.types[0].version, f.types[0].rows), (2, n as u64 + 10));
        // Filtered: row 17 left out, the new row comes first.
        let found = ann
            .search(0, Comparator::Dot, false, &q, 5, |k| k != 17)
            .unwrap()
            .unwrap();
        assert!(found.rows.contains(&(n as i64 + 3)) && !found.rows.contains(&17));
        assert_eq!(found.index_version, 2);
        // A version without its changes recorded is indexed anew.
        ann.submit(3, Comparator::Dot, &[table(&flat, dim)], &[], None);
        assert!(ann.wait_for(3, Duration::from_secs(60)));
        assert_eq!(ann.figures().builds, 2);
    }

    #[test]
    fn searches_during_updates_name_only_indexed_rows() {
        let mut rng = SmallRng::seed_from_u64(13);
        let (n, dim) = (2000, 8);
        let mut flat = clustered(&mut rng, n, dim);
        let ann = AnnIndexes::start(config(1000)).unwrap();
        ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for c in 0..2u64 {
                let (ann, done) = (&ann, &done);
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(100 + c);
                    while !done.load(Ordering::Relaxed) {
                        let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                        let found = ann
                            .search(0, Comparator::Dot, false, &q, 50, |_| true)
                            .unwrap()
                            .unwrap();
                        assert!(found.rows.iter().all(|&r| (0..n as i64).contains(&r)));
                        assert!(found.rows.windows(2).all(|w| w[0] < w[1]));
                    }
                });
            }
            // Ten versions, each replacing half the rows, while the two threads search.
            for v in 2..12u64 {
                let changed: Vec<i64> = (0..n as i64).filter(|i| (i + v as i64) % 2 == 0).collect();
                for &i in &changed {
                    for x in &mut flat[i as usize * dim..(i as usize + 1) * dim] {
                        *x += rng.random_range(-0.1..0.1);
                    }
                }
                apply_version(&ann, v, &flat, dim, &changed);
            }
            done.store(true, Ordering::Relaxed);
        });
        let f = ann.figures();
        assert_eq!((f.builds, f.failures, f.types[0].version), (1, 0, 11));
    }

    /// Version `v` of the rows `flat` with `changed` rows, submitted and waited for.
    fn apply_version(ann: &AnnIndexes, v: u64, flat: &[f32], dim: usize, changed: &[i64]) {
        let changed = Tensor::from_slice(changed);
        ann.submit(
            v,
            Comparator::Dot,
            &[table(flat, dim)],
            &[],
            Some(&[changed]),
        );
        assert!(ann.wait_for(v, Duration::from_secs(60)));
    }

    /// `/v1/status` asks for the figures while the updater inserts and grows the index: the
    /// daemon once died of it (usearch's memory figure walks every node, unlocked).
    #[test]
    fn figures_are_safe_while_the_index_grows() {
        let mut rng = SmallRng::seed_from_u64(17);
        let dim = 8;
        let mut flat = clustered(&mut rng, 1500, dim);
        let ann = AnnIndexes::start(config(1000)).unwrap();
        ann.submit(1, Comparator::Dot, &[table(&flat, dim)], &[], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let (ann, done) = (&ann, &done);
            s.spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let f = ann.figures();
                    assert!(f.types.iter().all(|t| t.memory_bytes > 0));
                }
            });
            // Fifteen versions, each adding a fifth more rows (the capacity doubles on the way).
            for v in 2..17u64 {
                let n = flat.len() / dim;
                flat.extend(clustered(&mut rng, n / 5, dim));
                apply_version(ann, v, &flat, dim, &[0, 1, 2]);
            }
            done.store(true, Ordering::Relaxed);
        });
        let f = ann.figures();
        assert_eq!((f.builds, f.failures, f.types[0].version), (1, 0, 16));
    }

    #[test]
    fn small_types_and_l1_have_no_index() {
        let mut rng = SmallRng::seed_from_u64(9);
        let flat = clustered(&mut rng, 500, 4);
        let ann = AnnIndexes::start(config(1000)).unwrap();
        ann.submit(1, Comparator::Dot, &[table(&flat, 4)], &[], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        assert!(ann
            .search(0, Comparator::Dot, false, &[1.0; 4], 5, |_| true)
            .is_none());
        let ann = AnnIndexes::start(config(100)).unwrap();
        ann.submit(1, Comparator::L1, &[table(&flat, 4)], &[], None);
        assert!(ann.wait_for(1, Duration::from_secs(60)));
        assert!(ann.figures().types.is_empty());
        // An index built for dot is not used to answer for another comparator.
        ann.submit(2, Comparator::Dot, &[table(&flat, 4)], &[], None);
        assert!(ann.wait_for(2, Duration::from_secs(60)));
        assert!(ann
            .search(0, Comparator::Cos, false, &[1.0; 4], 5, |_| true)
            .is_none());
        assert!(ann
            .search(0, Comparator::Dot, false, &[1.0; 4], 5, |_| true)
            .is_some());
    }

    #[test]
    fn versions_waiting_together_carry_the_changes_of_both() {
        let sub = |version, changed: Option<Vec<Vec<i64>>>| Submitted {
            version,
            comparator: Comparator::Dot,
            tables: Vec::new(),
            biases: Vec::new(),
            changed,
        };
        let merged = sub(1, Some(vec![vec![1, 2], vec![]]))
            .followed_by(sub(2, Some(vec![vec![2, 5], vec![7], vec![9]])));
        assert_eq!(merged.version, 2);
        assert_eq!(
            merged.changed,
            Some(vec![vec![1, 2, 2, 5], vec![7], vec![9]])
        );
        assert_eq!(sub(1, None).followed_by(sub(2, Some(vec![]))).changed, None);
        assert_eq!(sub(1, Some(vec![])).followed_by(sub(2, None)).changed, None);
    }
}
