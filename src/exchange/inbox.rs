//! What the follower hands the trainer and back: whole window parts, where to read again from,
//! and where the rows the remote cache applied are found. Shared, lock-guarded queues: neither side waits on the
//! other.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::exchange::{GradientsApplied, WindowAttempt, WindowId, WindowPart};
use crate::persist;
use crate::telemetry as m;

/// Window parts remembered per sender as applied, at most: a re-read after a rewind, or a
/// window read twice, is recognised among this many of the sender's newest.
const APPLIED_KEPT: usize = 4096;

/// The rows of other owners a cache applied since it was last asked, as it holds them now
/// (implemented by [`crate::remote::RemoteCache`]): the trainer copies them over its own copies.
pub trait ChangedRows: Send + Sync + std::fmt::Debug {
    fn take_changed(&self) -> Vec<ChangedRow>;

    /// The rows of partitions this instance took over, as their previous owner last published
    /// them, since it was last asked.
    fn take_handed_over(&self) -> Vec<ChangedRow> {
        Vec::new()
    }

    /// Per partition followed, its relation delta as its owner's newest version applied since
    /// last asked left it (`crate::train::RelationShares`).
    fn take_relation_deltas(&self) -> BTreeMap<i32, Vec<f32>> {
        BTreeMap::new()
    }
}

/// A row of another owner, as the cache holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedRow {
    /// The node's key, `type:id`.
    pub key: String,
    /// The row, then its bias for a biased type.
    pub vector: Vec<f32>,
    /// The windows the owner's rows of its partition include, as its newest version applied
    /// says (`gradients_applied`); `None` when it said none.
    pub applied: Option<Arc<GradientsApplied>>,
}

/// A row of another owner for the trainer, with the newest of this instance's windows it
/// includes.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshedRow {
    pub key: String,
    pub vector: Vec<f32>,
    /// This instance's newest window the owner applied before publishing the row (`None`: none
    /// of them, as far as the owner said).
    pub includes: Option<WindowAttempt>,
}

/// Where the gradients topic is read from and which window parts are in the model: kept in the
/// trainer's checkpoint, so that a trainer that goes back to a checkpoint reads again exactly
/// the windows it undid.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExchangePosition {
    /// Per partition of the gradients topic, the offset to read again from.
    pub resume_at: BTreeMap<i32, i64>,
    /// Per sender, the window parts applied: `(version, epoch, partition)`.
    pub applied: BTreeMap<String, BTreeSet<(u64, u64, i32)>>,
    /// The relation vectors' per-partition deltas the model's relations sum
    /// ([`crate::train::RelationShares`]; absent in checkpoints from before they were shared).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub relation_deltas: BTreeMap<i32, Vec<f32>>,
}

impl ExchangePosition {
    /// Whether `part` is in the model already.
    pub fn has(&self, id: &WindowId, partition: i32) -> bool {
        (self.applied.get(&id.sender))
            .is_some_and(|s| s.contains(&(id.version, id.epoch, partition)))
    }

    /// Per partition, the newest window of each sender applied (what the partition's next
    /// version marker says its rows include).
    pub fn newest_applied(&self) -> BTreeMap<i32, GradientsApplied> {
        let mut out: BTreeMap<i32, GradientsApplied> = BTreeMap::new();
        for (sender, parts) in &self.applied {
            for &(version, epoch, partition) in parts {
                let newest = out.entry(partition).or_default();
                let window = WindowAttempt { version, epoch };
                // Ascending: the last one seen per partition is the newest.
                newest.insert(sender.clone(), window);
            }
        }
        out
    }

    /// Record `part` as applied.
    pub fn record(&mut self, part: &WindowPart) {
        let set = self.applied.entry(part.id.sender.clone()).or_default();
        set.insert((part.id.version, part.id.epoch, part.partition));
        while set.len() > APPLIED_KEPT {
            set.pop_first();
        }
        self.resume_at.insert(part.partition, part.resume_at);
    }
}

/// This instance's name as a sender of windows: made at its first start and kept in `dir`
/// (`publish.path`), so it is stable across restarts and differs between instances, which
/// `publish.transactional_id` need not (it is only used in transactional mode).
pub fn sender_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(SENDER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let id = format!("{:016x}", rand::random::<u64>());
    persist::write_atomic(&path, id.as_bytes())?;
    Ok(id)
}

/// The file [`sender_id`] keeps the name in.
const SENDER_FILE: &str = "exchange-sender";

/// `/v1/status` `exchange`: the gradient exchange's counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ExchangeFigures {
    /// Window parts and rows this instance sent to other owners (committed).
    pub windows_sent: u64,
    pub rows_sent: u64,
    /// Window parts and rows it applied to the rows it owns.
    pub windows_applied: u64,
    pub rows_applied: u64,
    /// Window parts read again after a rewind (or twice) and not applied again.
    pub windows_repeated: u64,
    /// Of the rows applied, those whose node this instance's store did not know: interned then,
    /// and started at the sender's row where the record carried it.
    pub rows_started: u64,
    /// Rows not applied: of a node type the schema does not have, of an erased node, or of
    /// another dimension.
    pub rows_unknown: u64,
    /// Rows of other owners copied from the remote cache into the model.
    pub rows_refreshed: u64,
    /// Rows of partitions this instance took over that it started at their previous owner's
    /// published row (nodes its store did not know, or whose row it had not started).
    pub rows_taken_over: u64,
    /// Relation deltas of other owners (published, or handed over with a partition taken over)
    /// that moved this instance's relation vectors.
    pub relation_deltas_applied: u64,
    /// Records of the gradients topic that did not decode (skipped).
    pub records_skipped: u64,
    /// Records deleted below the positions of the trainer's checkpoints (never read again).
    pub records_deleted: u64,
}

/// The exchange's shared state (see the module docs).
#[derive(Debug, Default)]
pub struct GradientInbox {
    /// This instance's name as a sender ([`sender_id`]).
    sender: String,
    /// The store sequence number below which every edge's gradients went out with a committed
    /// version: a trainer that goes back to a checkpoint trains those edges again without
    /// sending their gradients again (the owners applied them).
    sent_below: AtomicU64,
    parts: Mutex<VecDeque<WindowPart>>,
    rewind: Mutex<Option<BTreeMap<i32, i64>>>,
    checkpointed: Mutex<Option<BTreeMap<i32, i64>>>,
    changed: OnceLock<Arc<dyn ChangedRows>>,
    windows_sent: AtomicU64,
    rows_sent: AtomicU64,
    windows_applied: AtomicU64,
    rows_applied: AtomicU64,
    windows_repeated: AtomicU64,
    rows_started: AtomicU64,
    rows_unknown: AtomicU64,
    rows_refreshed: AtomicU64,
    rows_taken_over: AtomicU64,
    relation_deltas_applied: AtomicU64,
    records_skipped: AtomicU64,
    records_deleted: AtomicU64,
}

impl GradientInbox {
    /// The inbox of the instance named `sender` ([`sender_id`]).
    pub fn new(sender: String) -> GradientInbox {
        GradientInbox {
            sender,
            ..GradientInbox::default()
        }
    }

    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// The publication: every edge below `cursor` is in a committed version (at start: the
    /// ledger's last).
    pub fn set_sent_below(&self, cursor: u64) {
        self.sent_below.fetch_max(cursor, Ordering::Relaxed);
    }

    /// The trainer: edges below this were sent (see [`GradientInbox::set_sent_below`]).
    pub fn sent_below(&self) -> u64 {
        self.sent_below.load(Ordering::Relaxed)
    }

    /// The follower: a whole part read.
    pub fn push_part(&self, part: WindowPart) {
        self.parts.lock().push_back(part);
    }

    /// The trainer: the parts read since the last call.
    pub fn take_parts(&self) -> Vec<WindowPart> {
        self.parts.lock().drain(..).collect()
    }

    /// The trainer went back to `position` (a checkpoint's): drop what is queued and have the
    /// follower read its partitions again from there.
    pub fn rewind_to(&self, position: &ExchangePosition) {
        let mut parts = self.parts.lock();
        parts.clear();
        *self.rewind.lock() = Some(position.resume_at.clone());
    }

    /// The follower: positions to read again from, once.
    pub fn take_rewind(&self) -> Option<BTreeMap<i32, i64>> {
        self.rewind.lock().take()
    }

    /// The trainer wrote a checkpoint at `position`: nothing below its offsets is read again.
    pub fn checkpointed(&self, position: &ExchangePosition) {
        *self.checkpointed.lock() = Some(position.resume_at.clone());
    }

    /// The follower: the offsets below which records may be deleted, once.
    pub fn take_checkpointed(&self) -> Option<BTreeMap<i32, i64>> {
        self.checkpointed.lock().take()
    }

    /// Where the rows of other owners come from (the remote cache); set once.
    pub fn refresh_from(&self, rows: Arc<dyn ChangedRows>) {
        let _ = self.changed.set(rows);
    }

    /// The trainer: rows of other owners applied since the last call, each with the newest of
    /// this instance's windows its owner included.
    pub fn take_refreshed(&self) -> Vec<RefreshedRow> {
        let Some(changed) = self.changed.get() else {
            return Vec::new();
        };
        (changed.take_changed().into_iter())
            .map(|row| RefreshedRow {
                includes: (row.applied.as_ref()).and_then(|a| a.get(&self.sender).copied()),
                key: row.key,
                vector: row.vector,
            })
            .collect()
    }

    /// The trainer: the rows of partitions this instance took over, as their previous owner
    /// last published them ([`ChangedRows::take_handed_over`]).
    pub fn take_handed_over(&self) -> Vec<ChangedRow> {
        (self.changed.get()).map_or_else(Vec::new, |changed| changed.take_handed_over())
    }

    /// The trainer: the relation deltas other owners published since last asked
    /// ([`ChangedRows::take_relation_deltas`]).
    pub fn take_relation_deltas(&self) -> BTreeMap<i32, Vec<f32>> {
        (self.changed.get()).map_or_else(BTreeMap::new, |changed| changed.take_relation_deltas())
    }

    pub fn count_sent(&self, windows: u64, rows: u64) {
        self.windows_sent.fetch_add(windows, Ordering::Relaxed);
        self.rows_sent.fetch_add(rows, Ordering::Relaxed);
    }

    /// A window part applied: `rows` of it, `started` of those interned here; `unknown` not.
    pub fn count_applied(&self, rows: u64, started: u64, unknown: u64) {
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "applied").increment(rows);
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "started").increment(started);
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "unknown").increment(unknown);
        self.windows_applied.fetch_add(1, Ordering::Relaxed);
        self.rows_applied.fetch_add(rows, Ordering::Relaxed);
        self.rows_started.fetch_add(started, Ordering::Relaxed);
        self.rows_unknown.fetch_add(unknown, Ordering::Relaxed);
    }

    pub fn count_repeated(&self) {
        self.windows_repeated.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_refreshed(&self, rows: u64) {
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "refreshed").increment(rows);
        self.rows_refreshed.fetch_add(rows, Ordering::Relaxed);
    }

    pub fn count_taken_over(&self, rows: u64) {
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "taken_over").increment(rows);
        self.rows_taken_over.fetch_add(rows, Ordering::Relaxed);
    }

    pub fn count_relation_deltas(&self, deltas: u64) {
        metrics::counter!(m::EXCHANGE_ROWS, "kind" => "relation_delta").increment(deltas);
        self.relation_deltas_applied
            .fetch_add(deltas, Ordering::Relaxed);
    }

    pub fn count_deleted(&self, records: u64) {
        self.records_deleted.fetch_add(records, Ordering::Relaxed);
    }

    pub fn count_skipped(&self) {
        self.records_skipped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn figures(&self) -> ExchangeFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExchangeFigures {
            windows_sent: get(&self.windows_sent),
            rows_sent: get(&self.rows_sent),
            windows_applied: get(&self.windows_applied),
            rows_applied: get(&self.rows_applied),
            windows_repeated: get(&self.windows_repeated),
            rows_started: get(&self.rows_started),
            rows_unknown: get(&self.rows_unknown),
            rows_refreshed: get(&self.rows_refreshed),
            rows_taken_over: get(&self.rows_taken_over),
            relation_deltas_applied: get(&self.relation_deltas_applied),
            records_skipped: get(&self.records_skipped),
            records_deleted: get(&self.records_deleted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint keeps the relation shares with the position; one written before them reads
    /// as holding none.
    #[test]
    fn a_position_keeps_its_relation_shares_and_older_ones_read_without() {
        let position = ExchangePosition {
            resume_at: [(1, 9)].into(),
            relation_deltas: [(3, vec![0.25, -1.5])].into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&position).unwrap();
        assert_eq!(
            serde_json::from_str::<ExchangePosition>(&json).unwrap(),
            position
        );
        let older: ExchangePosition =
            serde_json::from_str(r#"{"resume_at": {"1": 9}, "applied": {}}"#).unwrap();
        assert!(older.relation_deltas.is_empty() && older.resume_at[&1] == 9);
    }

    #[test]
    fn the_sender_id_is_made_once_and_kept() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = sender_id(a.path()).unwrap();
        assert_eq!(first.len(), 16);
        assert_eq!(
            sender_id(a.path()).unwrap(),
            first,
            "stable across restarts"
        );
        assert_ne!(sender_id(b.path()).unwrap(), first, "another instance's");
    }
}
