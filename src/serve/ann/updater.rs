//! The updater thread: takes the newest committed version submitted and brings every type's
//! index to it, building an index only when there is none to update.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tch::{Kind, Tensor};
use tracing::{info, warn};

use crate::publish::Scope;
use crate::schema::TypeId;
use crate::train::Comparator;

use super::reduction::Reduction;
use super::type_index::{TypeIndex, BUILD_CHUNK};
use super::{index_err, AnnError, AnnIndexes};

/// A committed version as the updater receives it (shallow copies of the served tensors: the
/// served version's tables are never written after publication).
pub(super) struct Submitted {
    pub(super) version: u64,
    pub(super) comparator: Comparator,
    pub(super) tables: Vec<Tensor>,
    pub(super) biases: Vec<Option<Tensor>>,
    /// Per type, the rows changed since the previously submitted version; `None`: not known.
    pub(super) changed: Option<Vec<Vec<i64>>>,
    /// The partitions the version covers when not every one.
    pub(super) scope: Option<Scope>,
}

impl Submitted {
    /// `self` taken over by the newer `next` before the updater got to it: `next`'s rows with the
    /// changes of both.
    pub(super) fn followed_by(self, mut next: Submitted) -> Submitted {
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

/// Which rows of a type an index holds: those of the covered partitions.
pub(super) struct OwnedRows<'a> {
    partition: &'a [i32],
    covered: &'a [bool],
}

impl OwnedRows<'_> {
    pub(super) fn holds(&self, row: i64) -> bool {
        (self.partition.get(row as usize))
            .is_some_and(|&p| p >= 0 && self.covered.get(p as usize) == Some(&true))
    }
}

#[derive(Default)]
pub(super) struct Inbox {
    pub(super) next: Option<Submitted>,
    pub(super) stop: bool,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) builds: AtomicU64,
    pub(super) updates: AtomicU64,
    pub(super) rows_updated: AtomicU64,
    pub(super) rows_kept: AtomicU64,
    pub(super) failures: AtomicU64,
    pub(super) last_error: Mutex<Option<String>>,
    pub(super) last: Mutex<(f64, u64, f64, u64)>,
    /// The last version the updater finished with (tests and the bench wait on it).
    pub(super) done: Mutex<u64>,
    pub(super) done_changed: Condvar,
}

impl AnnIndexes {
    /// The updater: take the newest submitted version, bring every type's index to it.
    pub(super) fn run(self: Arc<Self>) {
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

    pub(super) fn stopping(&self) -> bool {
        self.inbox.lock().stop
    }

    pub(super) fn apply(&self, s: Submitted) {
        let n_types = s.tables.len();
        // The partitions the indexes hold: the version's, when it covers some only.
        let scope = match (&self.rows_of, &s.scope) {
            (Some(_), Some(scope)) => Some((scope.covered().to_vec(), scope.partitions())),
            _ => None,
        };
        let covered_flags = scope.as_ref().map(|(covered, partitions)| {
            let mut flags = vec![false; *partitions as usize];
            for &q in covered {
                flags[q as usize] = true;
            }
            flags
        });
        let mut owners = self.owners.lock();
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
                .filter(|ix| ix.reduction == reduction && ix.dim == dim && ix.scope == scope);
            let changed = s
                .changed
                .as_ref()
                .map(|c| c.get(t).cloned().unwrap_or_default());
            let owned = match (&self.rows_of, &scope, &covered_flags) {
                (Some(rows_of), Some((_, partitions)), Some(covered)) => Some(OwnedRows {
                    partition: owners.first(&**rows_of, t as TypeId, rows, *partitions),
                    covered,
                }),
                _ => None,
            };
            let owned = owned.as_ref();
            let result = match (current, changed) {
                (Some(ix), Some(changed)) => {
                    self.update(&ix, table, bias, changed, owned, s.version)
                }
                _ => match self.build(reduction, table, bias, owned, &scope, s.version) {
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

    pub(super) fn set(&self, t: usize, ix: Option<Arc<TypeIndex>>) {
        let mut types = self.types.write();
        if types.len() <= t {
            types.resize(t + 1, None);
        }
        types[t] = ix;
    }

    /// A new index of every row of `table` (of the `owned` rows only, when given, which are
    /// those of the partitions `scope` names); `None` when asked to stop meanwhile.
    pub(super) fn build(
        &self,
        reduction: Reduction,
        table: &Tensor,
        bias: Option<&Tensor>,
        owned: Option<&OwnedRows>,
        scope: &Option<(Vec<i32>, u32)>,
        version: u64,
    ) -> Result<Option<TypeIndex>, AnnError> {
        let started = Instant::now();
        let (n, dim) = (table.size()[0], table.size()[1] as usize);
        let held = owned.map_or(n as usize, |o| (0..n).filter(|&i| o.holds(i)).count());
        let ix = TypeIndex::new(&self.cfg, reduction, dim, held + held / 4, scope.clone())?;
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
                    // Named, so that a build's CPU is told apart from the updater's.
                    let builder = std::thread::Builder::new().name("ann-build".into());
                    builder.spawn_scoped(scope, move || -> Result<bool, AnnError> {
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
                            let keys: Vec<i64> = match owned {
                                Some(o) => (start..start + len).filter(|&i| o.holds(i)).collect(),
                                None => (start..start + len).collect(),
                            };
                            let rows = if keys.len() == len as usize {
                                table.narrow(0, start, len)
                            } else {
                                table.index_select(0, &Tensor::from_slice(&keys))
                            };
                            let rows =
                                Vec::<f32>::try_from(&rows.to_kind(Kind::Float).reshape([-1]))?;
                            let biases = bias
                                .as_ref()
                                .map(|b| {
                                    let b = if keys.len() == len as usize {
                                        b.narrow(0, start, len)
                                    } else {
                                        b.index_select(0, &Tensor::from_slice(&keys))
                                    };
                                    Vec::<f32>::try_from(&b.to_kind(Kind::Float))
                                })
                                .transpose()?;
                            ix.upsert(&keys, &rows, biases.as_deref(), 0.0)?;
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(index_err("a build thread panicked"))),
                    Err(e) => Err(index_err(format!("a build thread did not start: {e}"))),
                })
                .collect()
        });
        for r in results {
            if !r? {
                return Ok(None);
            }
        }
        ix.measure(0, held);
        ix.rows.store(n as usize, Ordering::Release);
        ix.version.store(version, Ordering::Release);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        self.counters.builds.fetch_add(1, Ordering::Relaxed);
        {
            let mut last = self.counters.last.lock();
            last.0 = ms;
            last.1 = held as u64;
        }
        info!(
            version,
            rows = held,
            of = n,
            ms,
            memory_mib = ix.memory.load(Ordering::Relaxed) >> 20,
            "ANN index built"
        );
        Ok(Some(ix))
    }

    /// Bring `ix` to `version`: its `changed` rows (and every row past those indexed) inserted
    /// or replaced, rows past the table's end removed; of the `owned` rows only, when given.
    pub(super) fn update(
        &self,
        ix: &TypeIndex,
        table: &Tensor,
        bias: Option<&Tensor>,
        mut changed: Vec<i64>,
        owned: Option<&OwnedRows>,
        version: u64,
    ) -> Result<(), AnnError> {
        let started = Instant::now();
        let n = table.size()[0];
        let indexed = ix.rows.load(Ordering::Acquire) as i64;
        let held_before = ix.index.size();
        let holds = |i: i64| owned.is_none_or(|o| o.holds(i));
        changed.retain(|&i| (0..n).contains(&i) && holds(i));
        let new_rows = changed.len();
        changed.extend((indexed..n).filter(|&i| holds(i)));
        let new_rows = changed.len() - new_rows;
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
        ix.make_room(new_rows, contexts)?;
        let mut written = 0;
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
            written += ix.upsert(keys, &rows, biases.as_deref(), self.cfg.reindex_threshold)?;
        }
        ix.measure(held_before, ix.index.size());
        ix.rows.store(n as usize, Ordering::Release);
        ix.version.store(version, Ordering::Release);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let c = &self.counters;
        c.updates.fetch_add(1, Ordering::Relaxed);
        c.rows_updated.fetch_add(written as u64, Ordering::Relaxed);
        c.rows_kept
            .fetch_add((changed.len() - written) as u64, Ordering::Relaxed);
        let mut last = c.last.lock();
        last.2 = ms;
        last.3 = written as u64;
        Ok(())
    }
}
