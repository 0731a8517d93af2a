//! The subscriber's side of the version contract (`topics/README.md`, contract 3, "Rule for
//! subscribers"): [`VersionAssembler`] turns embedding records and version markers, read in any
//! interleaving, into a local table that only ever holds whole versions. It is pure (no Kafka):
//! feed it what a consumer reads, each record with the partition of the embeddings topic it was
//! read from; `examples/subscriber.rs` is such a consumer.
//!
//! **Scopes.** A contract-3 marker covers one partition `q` of the embeddings topic (scope
//! `Some(q)`): its version's records are the records of its `(version, epoch)` read from
//! partition `q`, and each partition's owner (one of several publishing instances) writes its own
//! chain of versions. A contract-1 or contract-2 marker (no `partition`) covers the whole topic:
//! the legacy scope, `None`. Every key belongs to one partition, so the scopes' rows never
//! overlap and share one table.
//!
//! **Whole attempts.** Records are grouped by `(version, epoch)`, an *attempt*, and within it by
//! partition. An attempt is whole in scope `Some(q)` when q's marker is in and exactly
//! `marker.rows` distinct keys of the attempt were read from partition `q` (`rows` may be 0: the
//! marker only keeps the chain); in the legacy scope, when its marker is in and `marker.rows`
//! distinct keys were read from all partitions. Records of another epoch of the same version (an
//! interrupted attempt; the publisher retries under the same number with a new epoch) never
//! count toward a marker, and neither do more keys than it announces (two attempts that shared an
//! epoch: never applied).
//!
//! **Order, per scope.** A version carries only the records that changed since its predecessor,
//! so each scope applies on the attempt it holds `H`, repeating until nothing applies:
//! 1. a whole attempt of `H`'s version under a newer epoch (a marker whose acknowledgement was
//!    lost, then the retry, which carries every key the earlier attempt did) is applied over it,
//!    the newest epoch if several: a version's canonical attempt is its last;
//! 2. else, in the legacy scope (contract 2), the newest whole attempt of the next version whose
//!    `builds_on` is null or names `H`; in a partition scope, the lowest version above `H`'s
//!    (numbers may skip: a partition that moved to another instance is numbered above everything
//!    its new owner saw), newest epoch, whose `builds_on` names `H` or is null (a *base*: it
//!    carries every row its owner holds for the partition, after a move of the partition or a
//!    publisher restart that lost its reference).
//!
//! A partition scope that holds nothing of its own continues from the legacy scope's attempt: a
//! publisher upgraded from contract 2 builds its first contract-3 versions on its last contract-2
//! one. Once a partition scope holds an attempt, the legacy scope is closed (the publisher was
//! upgraded; legacy markers read after are stale). Records read from partition `q` and markers of
//! scope `q` whose attempt is not newer than what `q` holds (its own attempt, else the legacy
//! scope's) are stale, as are legacy markers not newer than the legacy scope's attempt.
//!
//! **Codebooks** (`publish.format = "pq"`) are held per scope and epoch: a partition's rounds
//! write their own copy of `codebooks:<epoch>` into it, a coded row read from partition `q`
//! decodes with `q`'s copy (else, for a partition that continued a legacy chain, the legacy
//! scope's), and a retired-codebooks tombstone drops its own scope's copy only.
//!
//! **Late start on a compacted embeddings topic**: compaction keeps only each key's newest
//! record, so the records of old versions that later versions superseded are gone and those
//! versions never complete. A subscriber that starts late therefore reads both topics to their
//! ends and then calls [`VersionAssembler::catch_up`]: per scope, it applies the newest whole
//! attempt it can assemble, from the surviving records of every earlier attempt of that scope
//! that has a marker (newest record per key; a partition scope also takes its partition's records
//! of legacy attempts with a marker). That is the table a reader of the full log would hold at
//! those versions, except for a key whose newest surviving record belongs to an attempt without a
//! marker of the scope (the attempt's records superseded the key's published row before
//! compaction): such records are never applied (counted as `orphan_rows`), and the key stays
//! absent until a later version carries it. Call `catch_up` only once the backlog is read: before
//! that, a version may look incomplete only because its records sit further on in a partition not
//! yet read, and jumping over it would lose them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::publish::{
    AttemptRef, CodedRow, PqTable, Record, RowRecord, VersionMarker, CODEBOOKS_PREFIX,
};

/// Keys of relation vectors start with this (`relation:favorites`); with
/// [`RELATION_DELTA_PREFIX`], everything else is a node.
pub const RELATION_PREFIX: &str = "relation:";

/// Keys of the relations' per-partition deltas (`relation-delta:3`, on partition 3): every
/// relation vector and reverse operator, flat, that partition's owner's share of them
/// (`crate::train::RelationShares`).
pub const RELATION_DELTA_PREFIX: &str = "relation-delta:";

/// The key of partition `p`'s relation delta.
pub fn relation_delta_key(p: i32) -> String {
    format!("{RELATION_DELTA_PREFIX}{p}")
}

/// The partition whose relation delta `key` is (`None`: another kind of key).
pub fn relation_delta_partition(key: &str) -> Option<i32> {
    key.strip_prefix(RELATION_DELTA_PREFIX)?.parse().ok()
}

/// Whether `key` is a node's (`type:id`), not a relation vector's or a relation delta's.
pub fn is_node_key(key: &str) -> bool {
    !key.starts_with(RELATION_PREFIX) && !key.starts_with(RELATION_DELTA_PREFIX)
}

/// What a marker covers: `Some(q)`, partition `q` of the embeddings topic (contract 3); `None`,
/// the whole topic (contracts 1 and 2, the legacy scope).
pub type Scope = Option<i32>;

/// An attempt: `(version, epoch)`.
type Key = (u64, u64);

/// One key's vector in the local table and the version that last carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub vector: Vec<f32>,
    pub version: u64,
}

/// A version the assembler applied in one scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub version: u64,
    pub epoch: u64,
    /// The scope: the partition of the embeddings topic the version covers (contract 3), `None`
    /// for the whole topic (contracts 1 and 2).
    pub partition: Option<i32>,
    /// Records of the applied attempt in its scope (its marker's count; for a catch-up, the
    /// records merged).
    pub rows: u64,
    /// Node keys in the table afterwards.
    pub nodes: usize,
    /// Relation keys (vectors and deltas) in the table afterwards.
    pub relations: usize,
    /// Versions of the scope jumped over by [`VersionAssembler::catch_up`] to reach this one.
    pub skipped: u64,
}

/// Counters for monitoring a subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Versions applied, one per scope (a contract-3 round over `P` partitions counts `P`).
    pub applied_versions: u64,
    /// Later attempts of a scope's held version applied over it (its first attempt's marker
    /// landed but the publisher never learned so, and retried).
    pub retries_applied: u64,
    /// Versions jumped over by catch-ups.
    pub skipped_versions: u64,
    /// Records held for versions not applied yet.
    pub pending_rows: usize,
    /// `(version, epoch)` attempts with records or a marker, not applied yet.
    pub pending_attempts: usize,
    /// Records ignored or dropped because their attempt is not newer than the one their
    /// partition holds (an earlier version, or an earlier epoch of the held version).
    pub stale_rows: u64,
    /// Markers of such attempts (and legacy markers once a partition went to contract 3).
    pub stale_markers: u64,
    /// Records of attempts without a marker of their scope that a catch-up left out.
    pub orphan_rows: u64,
    /// Coded rows (`publish.format = "pq"`) whose codebooks the assembler does not hold when
    /// their version is applied: the key is left out of the table.
    pub undecodable_rows: u64,
}

/// One key's record in an attempt.
#[derive(Debug)]
enum Pending {
    Vector(Vec<f32>),
    Coded(CodedRow),
    Codebooks(PqTable),
    /// The node was erased (or the codebooks retired).
    Tombstone,
}

#[derive(Debug, Default)]
struct Attempt {
    /// Records by the partition they were read from, then by key.
    rows: BTreeMap<i32, HashMap<String, Pending>>,
    /// Markers by scope.
    markers: BTreeMap<Scope, VersionMarker>,
}

impl Attempt {
    /// Distinct keys of the scope (a key read twice counts once; every key belongs to one
    /// partition, so the legacy scope sums the partitions).
    fn rows_in(&self, scope: Scope) -> u64 {
        match scope {
            Some(q) => self.rows.get(&q).map_or(0, |r| r.len() as u64),
            None => self.rows.values().map(|r| r.len() as u64).sum(),
        }
    }

    /// Whether the scope's marker is in with exactly as many keys as it announces.
    fn complete(&self, scope: Scope) -> bool {
        (self.markers.get(&scope)).is_some_and(|m| m.rows == self.rows_in(scope))
    }

    /// Whether the scope's marker names no attempt, or names `held`.
    fn builds_on(&self, scope: Scope, held: Option<Key>) -> bool {
        let held = held.map(|(version, epoch)| AttemptRef { version, epoch });
        (self.markers.get(&scope)).is_some_and(|m| m.builds_on.is_none() || m.builds_on == held)
    }

    fn row_count(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.markers.is_empty()
    }
}

/// One record to merge into the table: its key, the version that carried it, the scope of the
/// attempt it came from (whose codebooks it uses, or is) and the record.
type Merge = (String, u64, Scope, Pending);

/// A catch-up's records, newest per key (codebooks keys per scope: [`merge_key`]).
type Merged = HashMap<(Option<Scope>, String), (u64, Scope, Pending)>;

/// Applies versions to a local table only when they are whole (see the module docs).
#[derive(Debug, Default)]
pub struct VersionAssembler {
    /// The attempt each scope holds.
    held: BTreeMap<Scope, Key>,
    table: HashMap<String, Entry>,
    /// Codebooks by scope and epoch, for coded rows.
    codebooks: HashMap<(Scope, u64), PqTable>,
    relations: usize,
    pending: BTreeMap<Key, Attempt>,
    counts: Counts,
    /// The marker of the version applied last (in any scope).
    applied_marker: Option<VersionMarker>,
    /// Each scope's applied marker.
    applied_markers: BTreeMap<Scope, VersionMarker>,
    /// The newest legacy (contract 1 or 2) marker read.
    legacy_seen: Option<Key>,
    /// Versions above this are ignored ([`VersionAssembler::up_to`]).
    limit: Option<u64>,
}

impl VersionAssembler {
    pub fn new() -> VersionAssembler {
        VersionAssembler::default()
    }

    /// An assembler that stops at `version`: records and markers of later versions are ignored,
    /// so its table is that version's once it is applied (an export of one version; with
    /// contract 3, each partition's newest version up to it).
    pub fn up_to(version: u64) -> VersionAssembler {
        VersionAssembler {
            limit: Some(version),
            ..VersionAssembler::default()
        }
    }

    /// The marker of the version applied last, in any scope (its row count and drift figures).
    pub fn applied_marker(&self) -> Option<&VersionMarker> {
        self.applied_marker.as_ref()
    }

    /// The marker each scope applied last (contract 3: one per partition).
    pub fn applied_markers(&self) -> &BTreeMap<Scope, VersionMarker> {
        &self.applied_markers
    }

    /// Set `marker` as `scope`'s applied marker and the last one applied.
    fn mark_applied(&mut self, scope: Scope, marker: Option<VersionMarker>) {
        if let Some(m) = &marker {
            self.applied_markers.insert(scope, m.clone());
        }
        self.applied_marker = marker;
    }

    fn beyond_limit(&self, version: u64) -> bool {
        self.limit.is_some_and(|limit| version > limit)
    }

    /// The newest attempt applied in any scope.
    fn newest_held(&self) -> Option<Key> {
        self.held.values().max().copied()
    }

    /// The highest version applied in any scope (0: none yet). With contract 3 every partition
    /// has its own chain: [`Self::applied_attempts`] tells them apart.
    pub fn applied_version(&self) -> u64 {
        self.newest_held().map_or(0, |(v, _)| v)
    }

    /// The epoch of the attempt of [`Self::applied_version`] (the newest held in any scope; the
    /// partitions of one contract-3 round share it).
    pub fn applied_epoch(&self) -> Option<u64> {
        self.newest_held().map(|(_, e)| e)
    }

    /// The attempt each scope holds: `None`, the legacy scope (contracts 1 and 2); `Some(q)`,
    /// partition `q` (contract 3).
    pub fn applied_attempts(&self) -> BTreeMap<Scope, AttemptRef> {
        (self.held.iter())
            .map(|(&scope, &(version, epoch))| (scope, AttemptRef { version, epoch }))
            .collect()
    }

    /// The attempt `scope` holds.
    pub fn applied_attempt(&self, scope: Scope) -> Option<AttemptRef> {
        (self.held.get(&scope)).map(|&(version, epoch)| AttemptRef { version, epoch })
    }

    /// Key → vector and the version that carried it, as of the attempts held.
    pub fn table(&self) -> &HashMap<String, Entry> {
        &self.table
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.table.get(key)
    }

    /// Node keys in the table (relation vectors excluded).
    pub fn nodes(&self) -> usize {
        self.table.len() - self.relations
    }

    pub fn counts(&self) -> Counts {
        Counts {
            pending_rows: self.pending.values().map(Attempt::row_count).sum(),
            pending_attempts: self.pending.len(),
            ..self.counts
        }
    }

    /// The codebooks held, by scope (`Some(q)`: partition `q`'s copy; `None`: the legacy
    /// scope's) and epoch.
    pub fn codebooks(&self) -> &HashMap<(Scope, u64), PqTable> {
        &self.codebooks
    }

    /// The epochs of the codebooks held, in any scope.
    pub fn codebook_epochs(&self) -> BTreeSet<u64> {
        self.codebooks.keys().map(|&(_, epoch)| epoch).collect()
    }

    /// One row read from `partition` of the embeddings topic (`key` is the record's key).
    /// Returns the versions this completed, in order.
    pub fn push_row(
        &mut self,
        partition: i32,
        key: impl Into<String>,
        row: RowRecord,
    ) -> Vec<Applied> {
        let (version, epoch) = (row.version, row.epoch);
        let p = Pending::Vector(row.vector);
        self.push_pending(partition, key.into(), (version, epoch), p)
    }

    /// Any record with a value read from `partition` of the embeddings topic
    /// ([`Record::decode`]): a row, a coded row (decoded when its version is applied) or
    /// codebooks.
    pub fn push_record(
        &mut self,
        partition: i32,
        key: impl Into<String>,
        record: Record,
    ) -> Vec<Applied> {
        let key = key.into();
        match record {
            Record::Row(row) => self.push_row(partition, key, row),
            Record::Coded(row) => {
                let attempt = (row.version, row.epoch);
                self.push_pending(partition, key, attempt, Pending::Coded(row))
            }
            Record::Codebooks(c) => {
                let attempt = (c.version, c.epoch);
                self.push_pending(partition, key, attempt, Pending::Codebooks(c.table))
            }
        }
    }

    /// One tombstone read from `partition` of the embeddings topic: a record with a null value
    /// whose headers name its `(version, epoch)` ([`crate::publish::tombstone_attempt`]). It
    /// counts toward its attempt like a row; applying the version drops the key from the table.
    pub fn push_tombstone(
        &mut self,
        partition: i32,
        key: impl Into<String>,
        version: u64,
        epoch: u64,
    ) -> Vec<Applied> {
        self.push_pending(partition, key.into(), (version, epoch), Pending::Tombstone)
    }

    /// One marker read from the versions topic. Returns the versions this completed, in order.
    pub fn push_marker(&mut self, marker: VersionMarker) -> Vec<Applied> {
        if self.beyond_limit(marker.version) {
            return Vec::new();
        }
        let (scope, attempt) = (marker.partition, (marker.version, marker.epoch));
        if scope.is_none() {
            self.legacy_seen = self.legacy_seen.max(Some(attempt));
        }
        if self.marker_stale(scope, attempt) {
            self.counts.stale_markers += 1;
            return Vec::new();
        }
        let a = self.pending.entry(attempt).or_default();
        a.markers.insert(scope, marker);
        let ready = a.complete(scope).then_some(scope);
        self.advance(ready)
    }

    /// The attempt `scope` builds on: its own, else (a partition) the legacy scope's.
    fn effective(&self, scope: Scope) -> Option<Key> {
        match (self.held.get(&scope), scope) {
            (Some(&held), _) => Some(held),
            (None, Some(_)) => self.held.get(&None).copied(),
            (None, None) => None,
        }
    }

    /// Whether a legacy (contract 1 or 2) marker was read that the legacy scope has not
    /// applied yet: until it is, records at or below a partition's held attempt may still be
    /// that legacy version's (a subscriber that starts late can apply a partition's base before
    /// the legacy versions under it).
    fn legacy_open(&self) -> bool {
        self.legacy_seen
            .is_some_and(|seen| self.held.get(&None).is_none_or(|&held| held < seen))
    }

    /// Whether a record of `attempt` read from `partition` can no longer count: its partition
    /// holds that attempt or a newer one, and no legacy version it may belong to is pending.
    fn record_stale(&self, partition: i32, attempt: Key) -> bool {
        let past = |held: Option<Key>| held.is_some_and(|held| attempt <= held);
        past(self.effective(Some(partition)))
            && (!self.legacy_open() || past(self.held.get(&None).copied()))
    }

    fn marker_stale(&self, scope: Scope, attempt: Key) -> bool {
        self.effective(scope).is_some_and(|held| attempt <= held)
    }

    fn push_pending(
        &mut self,
        partition: i32,
        key: String,
        attempt: Key,
        p: Pending,
    ) -> Vec<Applied> {
        if self.beyond_limit(attempt.0) {
            return Vec::new();
        }
        if self.record_stale(partition, attempt) {
            self.counts.stale_rows += 1;
            return Vec::new();
        }
        let a = self.pending.entry(attempt).or_default();
        a.rows.entry(partition).or_default().insert(key, p);
        // Only this attempt changed: nothing else can have become applicable.
        let ready: Vec<Scope> = [None, Some(partition)]
            .into_iter()
            .filter(|&scope| a.complete(scope))
            .collect();
        self.advance(ready)
    }

    /// Scopes of contract 3 with a marker pending.
    fn pending_partitions(&self) -> BTreeSet<i32> {
        (self.pending.values())
            .flat_map(|a| a.markers.keys().copied().flatten())
            .collect()
    }

    /// Apply every attempt that is next in line and whole, starting from `scopes`: a scope that
    /// applied one is looked at again, and after the legacy scope, every partition that
    /// continues its chain.
    fn advance(&mut self, scopes: impl IntoIterator<Item = Scope>) -> Vec<Applied> {
        let mut work: BTreeSet<Scope> = scopes.into_iter().collect();
        let mut out = Vec::new();
        while let Some(scope) = work.pop_first() {
            let Some(attempt) = self.next_in_line(scope) else {
                continue;
            };
            out.push(self.apply(scope, attempt));
            work.insert(scope);
            if scope.is_none() {
                let followers = (self.pending_partitions().into_iter())
                    .filter(|q| !self.held.contains_key(&Some(*q)))
                    .map(Some)
                    .collect::<Vec<_>>();
                work.extend(followers);
            }
        }
        out
    }

    /// The whole attempt `scope` applies next (module docs, "Order, per scope").
    fn next_in_line(&self, scope: Scope) -> Option<Key> {
        let held = self.effective(scope);
        let newest = |from: Key, to: Key, check: &dyn Fn(&Attempt) -> bool| {
            (self.pending.range(from..=to))
                .filter(|(_, a)| a.complete(scope) && check(a))
                .map(|(k, _)| *k)
                .next_back()
        };
        if let Some((version, epoch)) = held {
            let retry = newest((version, epoch + 1), (version, u64::MAX), &|_| true);
            if retry.is_some() {
                return retry;
            }
        }
        let follows = |a: &Attempt| a.builds_on(scope, held);
        let next = held.map_or(1, |(version, _)| version + 1);
        if scope.is_none() {
            return newest((next, 0), (next, u64::MAX), &follows);
        }
        let (lowest, _) = (self.pending.range((next, 0)..))
            .find(|(_, a)| a.complete(scope) && follows(a))
            .map(|(k, _)| *k)?;
        newest((lowest, 0), (lowest, u64::MAX), &follows)
    }

    /// Apply a whole attempt of `scope`: its records of the scope and its marker leave the
    /// pending attempts, and everything they made stale with them.
    fn apply(&mut self, scope: Scope, attempt: Key) -> Applied {
        let mut a = self.pending.remove(&attempt).expect("found in pending");
        let marker = a
            .markers
            .remove(&scope)
            .expect("a whole attempt has its marker");
        let rows: Vec<(String, Pending)> = match scope {
            Some(q) => a.rows.remove(&q).unwrap_or_default().into_iter().collect(),
            None => std::mem::take(&mut a.rows)
                .into_values()
                .flatten()
                .collect(),
        };
        if !a.is_empty() {
            self.pending.insert(attempt, a);
        }
        let count = rows.len() as u64;
        self.merge(rows.into_iter().map(|(key, p)| (key, attempt.0, scope, p)));
        self.count_applied(scope, attempt);
        self.held.insert(scope, attempt);
        self.mark_applied(scope, Some(marker));
        self.prune();
        self.applied_event(scope, attempt, count, 0)
    }

    /// Drop what the attempts held made stale: records of a partition not newer than what it
    /// holds, markers of a scope not newer than what it holds, legacy markers once the legacy
    /// scope is closed.
    fn prune(&mut self) {
        let scopes: BTreeSet<Scope> = (self.pending.values())
            .flat_map(|a| (a.rows.keys().map(|&q| Some(q))).chain(a.markers.keys().copied()))
            .collect();
        let held: HashMap<Scope, Key> = (scopes.into_iter())
            .filter_map(|scope| Some((scope, self.effective(scope)?)))
            .collect();
        let open = self.legacy_open();
        let legacy = self.held.get(&None).copied();
        let not_newer = |scope: Scope, k: Key| held.get(&scope).is_some_and(|&h| k <= h);
        let mut stale_rows = 0u64;
        self.pending.retain(|&k, a| {
            a.rows.retain(|&q, rows| {
                let stale =
                    not_newer(Some(q), k) && (!open || legacy.is_some_and(|held| k <= held));
                stale_rows += if stale { rows.len() as u64 } else { 0 };
                !stale
            });
            (a.markers).retain(|&scope, _| !not_newer(scope, k));
            !a.is_empty()
        });
        self.counts.stale_rows += stale_rows;
    }

    /// After reading the backlog to its end: per scope, apply the newest whole attempt even when
    /// older ones cannot complete (their records were compacted away), then whatever follows.
    /// Returns nothing when no whole attempt lies beyond a gap. See the module docs.
    pub fn catch_up(&mut self) -> Vec<Applied> {
        // Newest record per key over every scope caught up; a later scope's (a partition after
        // the legacy scope) overwrites. Codebooks keys are per scope.
        let mut merged = Merged::new();
        let mut events = Vec::new();
        events.extend(self.catch_up_legacy(&mut merged));
        for q in self.pending_partitions() {
            events.extend(self.catch_up_partition(q, &mut merged));
        }
        // A legacy version that never completed (compaction took some of its records) and whose
        // surviving records the partitions' catch-ups merged is settled: nothing is left of it.
        let settled: Vec<Key> = (self.pending.iter())
            .filter(|(_, a)| a.rows.is_empty() && a.markers.contains_key(&None))
            .map(|(k, _)| *k)
            .collect();
        for k in settled {
            if let Some(a) = self.pending.get_mut(&k) {
                a.markers.remove(&None);
            }
            let held = self.held.entry(None).or_insert(k);
            *held = (*held).max(k);
        }
        self.pending.retain(|_, a| !a.is_empty());
        if events.is_empty() {
            return Vec::new();
        }
        self.merge(
            merged
                .into_iter()
                .map(|((_, key), (version, scope, p))| (key, version, scope, p)),
        );
        self.prune();
        let mut out: Vec<Applied> = (events.into_iter())
            .map(|(scope, attempt, rows, skipped)| {
                self.applied_event(scope, attempt, rows, skipped)
            })
            .collect();
        let scopes: Vec<Scope> = std::iter::once(None)
            .chain(self.pending_partitions().into_iter().map(Some))
            .collect();
        out.extend(self.advance(scopes));
        out
    }

    /// The legacy scope's catch-up (contract 2): every attempt up to its newest whole one leaves
    /// the pending attempts; the records of those with a legacy marker, of versions below it, go
    /// into `merged`. Returns `(scope, attempt, records merged, versions skipped)`.
    fn catch_up_legacy(&mut self, merged: &mut Merged) -> Option<(Scope, Key, u64, u64)> {
        let target = (self.pending.iter())
            .filter(|(_, a)| a.complete(None))
            .map(|(k, _)| *k)
            .next_back()?;
        // Later attempts of the target's version stay pending: one may be its retry.
        let above = self.pending.split_off(&(target.0, target.1 + 1));
        let below = std::mem::replace(&mut self.pending, above);
        let mut count = 0u64;
        // Ascending (version, epoch): a newer record of a key overwrites an older one. Merged as
        // one set, so that a coded row superseded later is never decoded (its codebooks may be
        // gone).
        for (attempt, mut a) in below {
            let legacy = a.markers.contains_key(&None);
            let usable = attempt == target || (attempt.0 < target.0 && legacy);
            if attempt == target {
                let marker = a.markers.remove(&None);
                self.mark_applied(None, marker);
            }
            let rows = a.row_count() as u64;
            if usable {
                count += rows;
                for (key, p) in std::mem::take(&mut a.rows).into_values().flatten() {
                    merged.insert(merge_key(None, key), (attempt.0, None, p));
                }
            } else if a.markers.is_empty() {
                self.counts.orphan_rows += rows;
            } else {
                self.counts.stale_rows += rows;
            }
        }
        let held = self.held.get(&None).map_or(0, |(v, _)| *v);
        let skipped = target.0.saturating_sub(held + 1);
        self.counts.skipped_versions += skipped;
        self.count_applied(None, target);
        self.held.insert(None, target);
        Some((None, target, count, skipped))
    }

    /// Partition `q`'s catch-up: its records of every attempt up to its newest whole one leave
    /// the pending attempts; those of attempts with a marker of `q` or a legacy marker, of
    /// versions below it, go into `merged`.
    fn catch_up_partition(
        &mut self,
        q: i32,
        merged: &mut Merged,
    ) -> Option<(Scope, Key, u64, u64)> {
        let scope = Some(q);
        let held = self.effective(scope);
        let target = (self.pending.iter())
            .filter(|(k, a)| held.is_none_or(|h| **k > h) && a.complete(scope))
            .map(|(k, _)| *k)
            .next_back()?;
        let mut count = 0u64;
        let mut skipped = BTreeSet::new();
        let held_version = held.map_or(0, |(v, _)| v);
        for (&attempt, a) in self.pending.range_mut(..=target) {
            let own = a.markers.contains_key(&scope);
            let legacy = a.markers.contains_key(&None);
            if (own || legacy) && attempt.0 > held_version && attempt.0 < target.0 {
                skipped.insert(attempt.0);
            }
            if attempt == target {
                let marker = a.markers.remove(&scope);
                if let Some(m) = &marker {
                    self.applied_markers.insert(scope, m.clone());
                }
                self.applied_marker = marker;
            }
            let Some(rows) = a.rows.remove(&q) else {
                continue;
            };
            let usable = attempt == target || (attempt.0 < target.0 && (own || legacy));
            if usable {
                count += rows.len() as u64;
                // A legacy attempt's codebooks are the legacy scope's.
                let from = if own { scope } else { None };
                for (key, p) in rows {
                    merged.insert(merge_key(from, key), (attempt.0, from, p));
                }
            } else if own || legacy {
                self.counts.stale_rows += rows.len() as u64;
            } else {
                self.counts.orphan_rows += rows.len() as u64;
            }
        }
        self.pending.retain(|_, a| !a.is_empty());
        let skipped = skipped.len() as u64;
        self.counts.skipped_versions += skipped;
        self.count_applied(scope, target);
        self.held.insert(scope, target);
        Some((scope, target, count, skipped))
    }

    fn count_applied(&mut self, scope: Scope, (version, _): Key) {
        if self
            .effective(scope)
            .is_some_and(|(held, _)| held == version)
        {
            self.counts.retries_applied += 1;
        } else {
            self.counts.applied_versions += 1;
        }
    }

    /// Apply records: codebooks first, so the coded rows beside them decode; retired codebooks
    /// last. Keys are distinct but for codebooks, which are per scope.
    fn merge(&mut self, records: impl IntoIterator<Item = Merge>) {
        let mut retired = Vec::new();
        let mut others = Vec::new();
        for (key, version, scope, p) in records {
            match p {
                Pending::Codebooks(table) => {
                    self.codebooks.insert((scope, table.epoch), table);
                }
                Pending::Tombstone if key.starts_with(CODEBOOKS_PREFIX) => retired.extend(
                    (key[CODEBOOKS_PREFIX.len()..].parse::<u64>().ok()).map(|epoch| (scope, epoch)),
                ),
                p => others.push((key, version, scope, p)),
            }
        }
        for (key, version, scope, p) in others {
            let vector = match p {
                Pending::Vector(v) => Some(v),
                Pending::Coded(row) => {
                    // A partition that continued a legacy chain may still use its codebooks.
                    let decoded = (self.codebooks.get(&(scope, row.codebooks)))
                        .or_else(|| self.codebooks.get(&(None, row.codebooks)))
                        .and_then(|t| row.vector(t));
                    if decoded.is_none() {
                        self.counts.undecodable_rows += 1;
                    }
                    decoded
                }
                Pending::Tombstone | Pending::Codebooks(_) => None,
            };
            // A key's row never goes back to an older version's: a late subscriber can apply a
            // legacy version after a partition's newer ones.
            if self.table.get(&key).is_some_and(|e| e.version > version) {
                continue;
            }
            let relation = !is_node_key(&key);
            let Some(vector) = vector else {
                if self.table.remove(&key).is_some() && relation {
                    self.relations -= 1;
                }
                continue;
            };
            if self.table.insert(key, Entry { vector, version }).is_none() && relation {
                self.relations += 1;
            }
        }
        for scope_epoch in retired {
            self.codebooks.remove(&scope_epoch);
        }
    }

    fn applied_event(
        &self,
        scope: Scope,
        (version, epoch): Key,
        rows: u64,
        skipped: u64,
    ) -> Applied {
        Applied {
            version,
            epoch,
            partition: scope,
            rows,
            nodes: self.nodes(),
            relations: self.relations,
            skipped,
        }
    }
}

/// The key of a record in a catch-up's merged set: codebooks are per scope, other keys belong to
/// one partition.
fn merge_key(scope: Scope, key: String) -> (Option<Scope>, String) {
    let per_scope = key.starts_with(CODEBOOKS_PREFIX).then_some(scope);
    (per_scope, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: u64, epoch: u64, x: f32) -> RowRecord {
        RowRecord {
            version,
            epoch,
            ts: 0,
            vector: vec![x, -x],
        }
    }

    fn marker(version: u64, epoch: u64, rows: u64) -> VersionMarker {
        VersionMarker::new(version, epoch, rows)
    }

    fn value(a: &VersionAssembler, key: &str) -> Option<(f32, u64)> {
        a.get(key).map(|e| (e.vector[0], e.version))
    }

    fn versions(applied: &[Applied]) -> Vec<(u64, u64)> {
        applied.iter().map(|a| (a.version, a.epoch)).collect()
    }

    /// Version 1 (epoch 1): user:1, user:2, relation:follows.
    fn v1() -> Vec<(&'static str, RowRecord)> {
        vec![
            ("user:1", row(1, 1, 1.0)),
            ("user:2", row(1, 1, 2.0)),
            ("relation:follows", row(1, 1, 9.0)),
        ]
    }

    #[test]
    fn a_tombstone_counts_toward_its_version_and_drops_the_node_when_applied() {
        let mut a = VersionAssembler::new();
        for (k, r) in v1() {
            a.push_row(0, k, r);
        }
        a.push_marker(marker(1, 1, 3));
        assert_eq!((a.applied_version(), a.nodes()), (1, 2));
        // Version 2 erases user:1 and carries user:2 and the relation: three records.
        assert!(a.push_tombstone(0, "user:1", 2, 1).is_empty());
        assert!(a.push_marker(marker(2, 1, 3)).is_empty());
        assert!(a.push_row(0, "user:2", row(2, 1, 5.0)).is_empty());
        assert_eq!(
            value(&a, "user:1"),
            Some((1.0, 1)),
            "not applied before it is whole"
        );
        let applied = a.push_row(0, "relation:follows", row(2, 1, 8.0));
        assert_eq!(versions(&applied), vec![(2, 1)]);
        assert_eq!(value(&a, "user:1"), None);
        assert_eq!(value(&a, "user:2"), Some((5.0, 2)));
        assert_eq!((a.nodes(), applied[0].nodes), (1, 1));
        // A tombstone of an applied version is stale.
        assert!(a.push_tombstone(0, "user:2", 2, 1).is_empty());
        assert_eq!(value(&a, "user:2"), Some((5.0, 2)));
    }

    #[test]
    fn an_assembler_up_to_a_version_holds_that_version_whatever_follows() {
        for catch_up in [false, true] {
            let mut a = VersionAssembler::up_to(1);
            // Version 2 is whole and read first, then version 1.
            a.push_row(0, "user:1", row(2, 1, 5.0));
            a.push_marker(marker(2, 1, 1));
            for (k, r) in v1() {
                a.push_row(0, k, r);
            }
            a.push_marker(marker(1, 1, 3));
            if catch_up {
                a.catch_up();
            }
            assert_eq!(a.applied_version(), 1, "catch_up: {catch_up}");
            assert_eq!(value(&a, "user:1"), Some((1.0, 1)));
            assert_eq!(a.applied_marker(), Some(&marker(1, 1, 3)));
            assert_eq!(
                a.counts().pending_rows,
                0,
                "nothing beyond the limit is held"
            );
        }
    }

    #[test]
    fn a_catch_up_applies_tombstones_in_version_order() {
        let mut a = VersionAssembler::new();
        for (k, r) in v1() {
            a.push_row(0, k, r);
        }
        // Version 2 erases user:2; its relation row was compacted away (version 3 superseded
        // it), so it never completes on its own.
        a.push_marker(marker(1, 1, 3));
        a.push_tombstone(0, "user:2", 2, 1);
        a.push_marker(marker(2, 1, 2));
        a.push_row(0, "user:1", row(3, 1, 7.0));
        a.push_row(0, "relation:follows", row(3, 1, 6.0));
        a.push_marker(marker(3, 1, 2));
        a.catch_up();
        assert_eq!(a.applied_version(), 3);
        assert_eq!(
            (value(&a, "user:1"), value(&a, "user:2")),
            (Some((7.0, 3)), None)
        );
    }

    #[test]
    fn marker_before_rows_applies_with_the_last_row() {
        let mut a = VersionAssembler::new();
        assert!(a.push_marker(marker(1, 1, 3)).is_empty());
        let mut rows = v1().into_iter();
        for (k, r) in rows.by_ref().take(2) {
            assert!(a.push_row(0, k, r).is_empty());
            assert_eq!(a.applied_version(), 0);
            assert!(a.table().is_empty());
        }
        let (k, r) = rows.next().unwrap();
        let applied = a.push_row(0, k, r);
        assert_eq!(
            applied,
            vec![Applied {
                version: 1,
                epoch: 1,
                partition: None,
                rows: 3,
                nodes: 2,
                relations: 1,
                skipped: 0
            }]
        );
        assert_eq!(value(&a, "user:2"), Some((2.0, 1)));
        assert_eq!(a.counts().pending_rows, 0);
        assert_eq!(a.counts().applied_versions, 1);
    }

    #[test]
    fn rows_before_marker_apply_with_the_marker() {
        let mut a = VersionAssembler::new();
        for (k, r) in v1() {
            assert!(a.push_row(0, k, r).is_empty());
        }
        assert_eq!(a.counts().pending_rows, 3);
        assert_eq!(versions(&a.push_marker(marker(1, 1, 3))), vec![(1, 1)]);
        assert_eq!(a.table().len(), 3);
    }

    #[test]
    fn a_partial_version_is_never_applied() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(1, 1, 3));
        for (k, r) in v1().into_iter().take(2) {
            a.push_row(0, k, r);
        }
        // A row delivered twice counts once.
        a.push_row(0, "user:1", row(1, 1, 1.0));
        assert_eq!(a.applied_version(), 0);
        assert!(a.table().is_empty());
        assert!(a.catch_up().is_empty(), "nothing complete to catch up to");
        let c = a.counts();
        assert_eq!((c.pending_rows, c.pending_attempts), (2, 1));
    }

    #[test]
    fn an_interrupted_attempt_never_counts_toward_the_retry() {
        let mut a = VersionAssembler::new();
        for (k, r) in v1() {
            a.push_row(0, k, r);
        }
        a.push_marker(marker(1, 1, 3));
        // Version 2, epoch 1: two rows out, then the daemon died (no marker).
        a.push_row(0, "user:1", row(2, 1, 10.0));
        a.push_row(0, "user:3", row(2, 1, 30.0));
        // The retry, version 2 under epoch 2, carries two rows; its marker arrives first. The two
        // stale rows would make the count if they counted.
        assert!(a.push_marker(marker(2, 2, 2)).is_empty());
        assert!(a.push_row(0, "user:1", row(2, 2, 11.0)).is_empty());
        assert_eq!(a.applied_version(), 1);
        assert_eq!(
            versions(&a.push_row(0, "user:2", row(2, 2, 22.0))),
            vec![(2, 2)]
        );
        assert_eq!(value(&a, "user:1"), Some((11.0, 2)));
        assert_eq!(value(&a, "user:2"), Some((22.0, 2)));
        assert_eq!(value(&a, "user:3"), None, "only in the interrupted attempt");
        assert_eq!(value(&a, "relation:follows"), Some((9.0, 1)));
        let c = a.counts();
        assert_eq!(
            (c.stale_rows, c.pending_rows, c.pending_attempts),
            (2, 0, 0)
        );
        // A late row and a repeated marker of the interrupted attempt are ignored.
        assert!(a.push_row(0, "user:4", row(2, 1, 40.0)).is_empty());
        assert!(a.push_marker(marker(2, 1, 2)).is_empty());
        assert_eq!(value(&a, "user:4"), None);
        assert_eq!(a.counts().stale_markers, 1);
    }

    /// A marker whose acknowledgement was lost: attempt (2, 1) completed on the broker, the
    /// publisher retried under epoch 2 (every key of (2, 1) again, as it now holds them) and
    /// adopted the retry, and version 3 builds on it. A subscriber ends with the retry's rows
    /// whichever attempt it completed first.
    #[test]
    fn a_retry_of_the_applied_version_is_applied_over_it_and_the_next_waits_for_it() {
        let retried = |a: &mut VersionAssembler| {
            a.push_row(0, "user:1", row(2, 2, 12.0));
            a.push_row(0, "user:2", row(2, 2, 22.0));
            a.push_marker(marker(2, 2, 2))
        };
        let first = |a: &mut VersionAssembler| {
            a.push_row(0, "user:1", row(2, 1, 11.0));
            a.push_marker(marker(2, 1, 1))
        };
        let mut third = marker(3, 2, 1);
        third.builds_on = Some(AttemptRef {
            version: 2,
            epoch: 2,
        });
        for retry_first in [false, true] {
            let mut a = VersionAssembler::new();
            for (k, r) in v1() {
                a.push_row(0, k, r);
            }
            a.push_marker(marker(1, 1, 3));
            // Version 3 (built on the retry) is read before either attempt of version 2.
            a.push_row(0, "user:3", row(3, 2, 30.0));
            assert!(a.push_marker(third.clone()).is_empty());
            let applied = if retry_first {
                let mut applied = retried(&mut a);
                applied.extend(first(&mut a));
                assert_eq!(a.counts().stale_markers, 1, "the first attempt is older");
                applied
            } else {
                // The first attempt completes first and is applied; version 3 waits for the
                // retry it builds on, which is applied over it.
                let mut applied = first(&mut a);
                assert_eq!(versions(&applied), [(2, 1)]);
                assert_eq!(value(&a, "user:1"), Some((11.0, 2)));
                applied.extend(retried(&mut a));
                assert_eq!(a.counts().retries_applied, 1);
                applied
            };
            let expected: &[(u64, u64)] = if retry_first {
                &[(2, 2), (3, 2)]
            } else {
                &[(2, 1), (2, 2), (3, 2)]
            };
            assert_eq!(versions(&applied), expected, "retry first: {retry_first}");
            assert_eq!(value(&a, "user:1"), Some((12.0, 2)));
            assert_eq!(value(&a, "user:2"), Some((22.0, 2)));
            assert_eq!(value(&a, "user:3"), Some((30.0, 3)));
            assert_eq!((a.applied_version(), a.applied_epoch()), (3, Some(2)));
            assert_eq!(a.counts().applied_versions, 3);
        }
    }

    #[test]
    fn a_version_built_on_another_attempt_waits_for_it() {
        let mut a = VersionAssembler::new();
        for (k, r) in v1() {
            a.push_row(0, k, r);
        }
        a.push_marker(marker(1, 1, 3));
        let mut second = marker(2, 1, 1);
        second.builds_on = Some(AttemptRef {
            version: 1,
            epoch: 4,
        });
        a.push_row(0, "user:1", row(2, 1, 10.0));
        assert!(a.push_marker(second).is_empty(), "(1, 4) is not held");
        assert_eq!(a.applied_version(), 1);
        a.push_row(0, "user:1", row(1, 4, 5.0));
        a.push_row(0, "user:2", row(1, 4, 6.0));
        a.push_row(0, "relation:follows", row(1, 4, 7.0));
        let applied = a.push_marker(marker(1, 4, 3));
        assert_eq!(versions(&applied), [(1, 4), (2, 1)]);
        assert_eq!(value(&a, "user:1"), Some((10.0, 2)));
        assert_eq!(value(&a, "user:2"), Some((6.0, 1)));
    }

    #[test]
    fn a_complete_later_version_waits_for_its_predecessor() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(2, 1, 1));
        a.push_row(0, "user:1", row(2, 1, 10.0));
        a.push_marker(marker(3, 1, 1));
        a.push_row(0, "user:2", row(3, 1, 20.0));
        assert_eq!(a.applied_version(), 0, "2 and 3 are complete, 1 is not");
        a.push_marker(marker(1, 1, 3));
        let mut rows = v1().into_iter();
        for (k, r) in rows.by_ref().take(2) {
            assert!(a.push_row(0, k, r).is_empty());
        }
        let (k, r) = rows.next().unwrap();
        let applied = a.push_row(0, k, r);
        assert_eq!(versions(&applied), vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(applied[2].nodes, 2);
        assert_eq!(value(&a, "user:1"), Some((10.0, 2)));
        assert_eq!(value(&a, "user:2"), Some((20.0, 3)));
        assert_eq!(a.counts().applied_versions, 3);
    }

    #[test]
    fn more_rows_than_the_marker_announces_are_never_applied() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(1, 1, 1));
        a.push_row(0, "user:1", row(1, 1, 1.0));
        assert_eq!(a.applied_version(), 1);
        a.push_row(0, "user:1", row(2, 1, 1.0));
        a.push_row(0, "user:2", row(2, 1, 2.0));
        assert!(a.push_marker(marker(2, 1, 1)).is_empty());
        assert_eq!(a.applied_version(), 1);
    }

    /// Versions 1..=3 as the publisher writes them, in log order.
    fn history() -> (Vec<(&'static str, RowRecord)>, Vec<VersionMarker>) {
        let mut rows = v1();
        rows.extend([
            ("user:1", row(2, 1, 10.0)),
            ("user:3", row(2, 1, 30.0)),
            // Version 3's first attempt died after one row; the retry is epoch 2.
            ("user:3", row(3, 1, 99.0)),
            ("user:2", row(3, 2, 20.0)),
            ("user:3", row(3, 2, 31.0)),
            ("user:4", row(3, 2, 40.0)),
        ]);
        (
            rows,
            vec![marker(1, 1, 3), marker(2, 1, 2), marker(3, 2, 3)],
        )
    }

    /// Only the newest record of each key, in log order (what compaction leaves).
    fn compacted(rows: &[(&'static str, RowRecord)]) -> Vec<(&'static str, RowRecord)> {
        rows.iter()
            .enumerate()
            .filter(|(i, (k, _))| !rows[i + 1..].iter().any(|(later, _)| later == k))
            .map(|(_, r)| r.clone())
            .collect()
    }

    #[test]
    fn a_late_start_on_a_compacted_topic_catches_up_to_the_newest_complete_version() {
        let (rows, markers) = history();
        let mut full = VersionAssembler::new();
        for (k, r) in rows.clone() {
            full.push_row(0, k, r);
        }
        for m in markers.clone() {
            full.push_marker(m);
        }
        assert_eq!(full.applied_version(), 3);
        assert!(full.catch_up().is_empty(), "nothing beyond a gap");

        let mut late = VersionAssembler::new();
        for m in markers {
            late.push_marker(m);
        }
        for (k, r) in compacted(&rows) {
            assert!(
                late.push_row(0, k, r).is_empty(),
                "version 1 lost user:1 and user:2"
            );
        }
        assert_eq!(late.applied_version(), 0);
        let applied = late.catch_up();
        assert_eq!(versions(&applied), vec![(3, 2)]);
        assert_eq!(applied[0].skipped, 2);
        assert_eq!(late.table(), full.table());
        assert_eq!(late.counts().skipped_versions, 2);
        // Later versions follow in order again.
        late.push_marker(marker(4, 2, 1));
        assert_eq!(
            versions(&late.push_row(0, "user:1", row(4, 2, 5.0))),
            vec![(4, 2)]
        );
    }

    #[test]
    fn a_catch_up_leaves_out_rows_of_attempts_without_a_marker() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(2, 1, 1));
        a.push_row(0, "user:1", row(2, 1, 1.0));
        // Version 3, epoch 1: interrupted; its row superseded user:2's published row.
        a.push_row(0, "user:2", row(3, 1, 2.0));
        a.push_marker(marker(3, 2, 1));
        a.push_row(0, "user:3", row(3, 2, 3.0));
        let applied = a.catch_up();
        assert_eq!(versions(&applied), vec![(3, 2)]);
        assert_eq!(value(&a, "user:1"), Some((1.0, 2)));
        assert_eq!(value(&a, "user:2"), None);
        assert_eq!(value(&a, "user:3"), Some((3.0, 3)));
        assert_eq!(a.counts().orphan_rows, 1);
    }

    /// Codebooks of `epoch` for two values in one sub-space: centroid `c` is `(c, epoch)`.
    fn books(version: u64, epoch: u64) -> Record {
        Record::Codebooks(crate::publish::CodebooksRecord {
            version,
            epoch: 1,
            table: PqTable {
                epoch,
                subspaces: 1,
                sub_dim: 2,
                centroids: (0..256).flat_map(|c| [c as f32, epoch as f32]).collect(),
            },
        })
    }

    fn coded(version: u64, books: u64, code: u8) -> Record {
        Record::Coded(CodedRow {
            version,
            epoch: 1,
            ts: 0,
            codebooks: books,
            codes: vec![code],
            extra: vec![],
        })
    }

    #[test]
    fn coded_rows_decode_with_their_codebooks_and_retired_codebooks_are_dropped() {
        let mut a = VersionAssembler::new();
        // Rows before their codebooks: decoded when the version is whole.
        a.push_record(0, "user:1", coded(1, 1, 7));
        a.push_record(0, "user:2", coded(1, 1, 8));
        a.push_record(0, "codebooks:1", books(1, 1));
        assert_eq!(a.push_marker(marker(1, 1, 3)).len(), 1);
        assert_eq!(a.get("user:1").unwrap().vector, vec![7.0, 1.0]);
        assert_eq!(a.nodes(), 2, "codebooks are not nodes");
        // New codebooks: every row again, the old record retired.
        a.push_record(0, "user:1", coded(2, 2, 9));
        a.push_record(0, "user:2", coded(2, 2, 10));
        a.push_record(0, "user:3", coded(2, 5, 1)); // names codebooks nobody published
        a.push_record(0, "codebooks:2", books(2, 2));
        a.push_tombstone(0, "codebooks:1", 2, 1);
        assert_eq!(a.push_marker(marker(2, 1, 5)).len(), 1);
        assert_eq!(a.get("user:2").unwrap().vector, vec![10.0, 2.0]);
        assert_eq!(a.get("user:3"), None);
        assert_eq!(a.counts().undecodable_rows, 1);
        assert_eq!(a.codebook_epochs().into_iter().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_catch_up_decodes_the_newest_rows_only() {
        // Compaction kept user:1's version-1 row, whose codebooks are retired and gone, and
        // version 2's rows: the catch-up decodes user:1 from version 2 only.
        let mut a = VersionAssembler::new();
        a.push_record(0, "user:1", coded(1, 1, 3));
        a.push_marker(marker(1, 1, 2));
        a.push_record(0, "user:1", coded(2, 2, 4));
        a.push_record(0, "codebooks:2", books(2, 2));
        a.push_tombstone(0, "codebooks:1", 2, 1);
        a.push_marker(marker(2, 1, 3));
        assert_eq!(a.catch_up().len(), 1);
        assert_eq!(a.get("user:1").unwrap().vector, vec![4.0, 2.0]);
        assert_eq!(a.counts().undecodable_rows, 0);
    }

    // Contract 3: one scope per partition of the embeddings topic.

    /// Partition `q`'s marker of `(version, epoch)` (of 2 partitions), built on `on`.
    fn scoped(
        version: u64,
        epoch: u64,
        rows: u64,
        q: i32,
        on: Option<(u64, u64)>,
    ) -> VersionMarker {
        VersionMarker {
            builds_on: on.map(|(version, epoch)| AttemptRef { version, epoch }),
            ..VersionMarker::for_partition(version, epoch, rows, q, 2)
        }
    }

    /// A contract-2 marker (the whole topic).
    fn legacy(version: u64, epoch: u64, rows: u64, on: Option<(u64, u64)>) -> VersionMarker {
        VersionMarker {
            contract: 2,
            builds_on: on.map(|(version, epoch)| AttemptRef { version, epoch }),
            ..VersionMarker::new(version, epoch, rows)
        }
    }

    fn in_scopes(applied: &[Applied]) -> Vec<(u64, u64, Option<i32>)> {
        applied
            .iter()
            .map(|a| (a.version, a.epoch, a.partition))
            .collect()
    }

    fn held(a: &VersionAssembler) -> Vec<(Option<i32>, (u64, u64))> {
        (a.applied_attempts().into_iter())
            .map(|(scope, at)| (scope, (at.version, at.epoch)))
            .collect()
    }

    #[test]
    fn two_partitions_apply_their_own_chains_whatever_the_interleaving() {
        let mut a = VersionAssembler::new();
        // Partition 1's version 2 row is read before anything else.
        assert!(a.push_row(1, "user:2", row(2, 1, 22.0)).is_empty());
        assert!(a.push_marker(scoped(1, 1, 2, 0, None)).is_empty());
        assert!(a.push_row(0, "user:1", row(1, 1, 1.0)).is_empty());
        assert!(a.push_marker(scoped(1, 1, 2, 1, None)).is_empty());
        assert!(a.push_row(1, "user:2", row(1, 1, 2.0)).is_empty());
        // Partition 1 is whole first; partition 0 still waits for user:3.
        let applied = a.push_row(1, "relation:follows", row(1, 1, 9.0));
        assert_eq!(
            applied,
            vec![Applied {
                version: 1,
                epoch: 1,
                partition: Some(1),
                rows: 2,
                nodes: 1,
                relations: 1,
                skipped: 0
            }]
        );
        assert_eq!(value(&a, "user:1"), None, "partition 0 is not whole");
        // Partition 1's version 2: its row was read already.
        let applied = a.push_marker(scoped(2, 1, 1, 1, Some((1, 1))));
        assert_eq!(in_scopes(&applied), [(2, 1, Some(1))]);
        assert_eq!(value(&a, "user:2"), Some((22.0, 2)));
        let applied = a.push_row(0, "user:3", row(1, 1, 3.0));
        assert_eq!(in_scopes(&applied), [(1, 1, Some(0))]);
        assert!(a.push_marker(scoped(2, 1, 1, 0, Some((1, 1)))).is_empty());
        let applied = a.push_row(0, "user:1", row(2, 1, 11.0));
        assert_eq!(in_scopes(&applied), [(2, 1, Some(0))]);
        assert_eq!(held(&a), [(Some(0), (2, 1)), (Some(1), (2, 1))]);
        assert_eq!((a.applied_version(), a.applied_epoch()), (2, Some(1)));
        assert_eq!(
            (value(&a, "user:1"), value(&a, "user:3")),
            (Some((11.0, 2)), Some((3.0, 1)))
        );
        assert_eq!((a.nodes(), a.table().len()), (3, 4));
        // A late record of an applied attempt is stale in its partition.
        assert!(a.push_row(0, "user:1", row(1, 1, 5.0)).is_empty());
        let c = a.counts();
        assert_eq!(
            (
                c.applied_versions,
                c.stale_rows,
                c.pending_rows,
                c.pending_attempts
            ),
            (4, 1, 0, 0)
        );
        assert_eq!(value(&a, "user:1"), Some((11.0, 2)));
    }

    #[test]
    fn a_partition_marker_of_no_rows_applies_and_keeps_the_chain() {
        let mut a = VersionAssembler::new();
        a.push_row(0, "user:1", row(1, 1, 1.0));
        assert_eq!(
            in_scopes(&a.push_marker(scoped(1, 1, 1, 0, None))),
            [(1, 1, Some(0))]
        );
        // Partition 1 had nothing to publish in version 1.
        let applied = a.push_marker(scoped(1, 1, 0, 1, None));
        assert_eq!(in_scopes(&applied), [(1, 1, Some(1))]);
        assert_eq!(applied[0].rows, 0);
        a.push_marker(scoped(2, 1, 1, 1, Some((1, 1))));
        assert_eq!(
            in_scopes(&a.push_row(1, "user:2", row(2, 1, 2.0))),
            [(2, 1, Some(1))]
        );
        assert_eq!(held(&a), [(Some(0), (1, 1)), (Some(1), (2, 1))]);
        assert_eq!(a.table().len(), 2);
    }

    #[test]
    fn a_base_at_a_skipped_version_applies_over_the_held_chain() {
        let mut a = VersionAssembler::new();
        a.push_row(0, "user:1", row(1, 1, 1.0));
        a.push_row(0, "user:3", row(1, 1, 3.0));
        a.push_marker(scoped(1, 1, 2, 0, None));
        a.push_row(0, "user:1", row(2, 1, 11.0));
        a.push_marker(scoped(2, 1, 1, 0, Some((1, 1))));
        assert_eq!(held(&a), [(Some(0), (2, 1))]);
        // Built on attempts this subscriber never held: they wait.
        a.push_row(0, "user:1", row(3, 1, 99.0));
        assert!(a.push_marker(scoped(3, 1, 1, 0, Some((2, 9)))).is_empty());
        a.push_row(0, "user:3", row(5, 3, 53.0));
        assert!(a.push_marker(scoped(5, 3, 1, 0, Some((4, 2)))).is_empty());
        assert_eq!(a.counts().pending_attempts, 2);
        // The partition moved: its new owner publishes a base above every number it saw (3 is
        // skipped), with every row it holds; (5, 3) built on it follows.
        a.push_row(0, "user:1", row(4, 2, 41.0));
        assert!(a.push_marker(scoped(4, 2, 2, 0, None)).is_empty());
        let applied = a.push_row(0, "user:3", row(4, 2, 43.0));
        assert_eq!(in_scopes(&applied), [(4, 2, Some(0)), (5, 3, Some(0))]);
        assert_eq!(value(&a, "user:1"), Some((41.0, 4)));
        assert_eq!(value(&a, "user:3"), Some((53.0, 5)));
        let c = a.counts();
        assert_eq!(
            (c.applied_versions, c.pending_attempts, c.stale_rows),
            (4, 0, 1),
            "(3, 1) is stale under the base"
        );
    }

    /// A publisher upgraded from contract 2 builds its first contract-3 versions on its last
    /// contract-2 attempt; partition 0's is whole before that attempt is.
    /// A subscriber reading the markers first, then records in another order than they were
    /// written (a late start): a partition's base is whole before the legacy version under it;
    /// the legacy version still applies, keys only it carried join the table, and a key the base
    /// carried keeps the base's row.
    #[test]
    fn a_base_applied_before_the_legacy_version_under_it_leaves_its_keys() {
        let mut a = VersionAssembler::new();
        a.push_marker(legacy(1, 1, 2, None));
        a.push_marker(scoped(5, 3, 1, 0, None));
        let applied = a.push_row(0, "user:1", row(5, 3, 51.0));
        assert_eq!(in_scopes(&applied), [(5, 3, Some(0))]);
        assert!(a.push_row(0, "user:1", row(1, 1, 1.0)).is_empty());
        let applied = a.push_row(0, "user:old", row(1, 1, 7.0));
        assert_eq!(in_scopes(&applied), [(1, 1, None)]);
        assert_eq!(
            (value(&a, "user:1"), value(&a, "user:old")),
            (Some((51.0, 5)), Some((7.0, 1)))
        );
        assert_eq!(a.counts().pending_attempts, 0);
    }

    #[test]
    fn partitions_continue_the_legacy_chain_after_an_upgrade() {
        let mut a = VersionAssembler::new();
        a.push_row(0, "user:1", row(1, 1, 1.0));
        a.push_row(1, "user:2", row(1, 1, 2.0));
        a.push_marker(legacy(1, 1, 2, None));
        a.push_row(1, "user:2", row(2, 1, 12.0));
        a.push_marker(legacy(2, 1, 1, Some((1, 1))));
        a.push_marker(legacy(3, 2, 2, Some((2, 1))));
        a.push_row(0, "user:1", row(3, 2, 31.0));
        assert_eq!(held(&a), [(None, (2, 1))]);
        a.push_marker(scoped(4, 1, 1, 0, Some((3, 2))));
        a.push_row(0, "user:3", row(4, 1, 43.0));
        a.push_marker(scoped(4, 1, 1, 1, Some((3, 2))));
        a.push_row(1, "relation:follows", row(4, 1, 49.0));
        assert_eq!(a.applied_version(), 2, "version 4 builds on (3, 2)");
        // Version 3's last record, from partition 1.
        let applied = a.push_row(1, "user:2", row(3, 2, 32.0));
        assert_eq!(
            in_scopes(&applied),
            [(3, 2, None), (4, 1, Some(0)), (4, 1, Some(1))]
        );
        assert_eq!(
            held(&a),
            [(None, (3, 2)), (Some(0), (4, 1)), (Some(1), (4, 1))]
        );
        assert_eq!(
            (
                value(&a, "user:1"),
                value(&a, "user:2"),
                value(&a, "user:3")
            ),
            (Some((31.0, 3)), Some((32.0, 3)), Some((43.0, 4)))
        );
        // A legacy marker of an applied attempt is stale; a later one still follows contract 2
        // on the whole topic (a publisher of the old contract still writing).
        assert!(a.push_marker(legacy(3, 2, 2, Some((2, 1)))).is_empty());
        assert_eq!(a.counts().stale_markers, 1);
        assert_eq!(a.counts().applied_versions, 5);
    }

    #[test]
    fn a_retry_in_one_partition_is_applied_over_its_held_version() {
        let mut a = VersionAssembler::new();
        for q in [0, 1] {
            a.push_row(q, format!("user:{q}"), row(1, 1, 1.0));
            a.push_marker(scoped(1, 1, 1, q, None));
        }
        // Partition 0's version 3 builds on the retry of its version 2.
        a.push_row(0, "user:0", row(3, 2, 30.0));
        assert!(a.push_marker(scoped(3, 2, 1, 0, Some((2, 2)))).is_empty());
        a.push_row(0, "user:0", row(2, 1, 20.0));
        assert_eq!(
            in_scopes(&a.push_marker(scoped(2, 1, 1, 0, Some((1, 1))))),
            [(2, 1, Some(0))]
        );
        a.push_row(0, "user:0", row(2, 2, 21.0));
        a.push_row(0, "user:2", row(2, 2, 22.0));
        assert_eq!(
            in_scopes(&a.push_marker(scoped(2, 2, 2, 0, Some((1, 1))))),
            [(2, 2, Some(0)), (3, 2, Some(0))]
        );
        // Partition 1 goes on from its own version 1.
        a.push_row(1, "user:1", row(2, 1, 11.0));
        assert_eq!(
            in_scopes(&a.push_marker(scoped(2, 1, 1, 1, Some((1, 1))))),
            [(2, 1, Some(1))]
        );
        assert_eq!(held(&a), [(Some(0), (3, 2)), (Some(1), (2, 1))]);
        assert_eq!(
            (value(&a, "user:0"), value(&a, "user:2")),
            (Some((30.0, 3)), Some((22.0, 2)))
        );
        let c = a.counts();
        assert_eq!((c.applied_versions, c.retries_applied), (5, 1));
    }

    /// Legacy version 1 over both partitions, then versions 2 and 3 per partition (partition 1's
    /// version 3 carries nothing) and an interrupted attempt (3, 0) in partition 1.
    fn partitioned_history() -> (Vec<(i32, &'static str, RowRecord)>, Vec<VersionMarker>) {
        let rows = vec![
            (0, "user:1", row(1, 1, 1.0)),
            (0, "user:3", row(1, 1, 3.0)),
            (1, "user:2", row(1, 1, 2.0)),
            (1, "relation:follows", row(1, 1, 9.0)),
            (0, "user:1", row(2, 1, 11.0)),
            (1, "user:2", row(2, 1, 22.0)),
            (1, "user:4", row(3, 0, 40.0)),
            (0, "user:3", row(3, 1, 33.0)),
        ];
        let markers = vec![
            legacy(1, 1, 4, None),
            scoped(2, 1, 1, 0, Some((1, 1))),
            scoped(2, 1, 1, 1, Some((1, 1))),
            scoped(3, 1, 1, 0, Some((2, 1))),
            scoped(3, 1, 0, 1, Some((2, 1))),
        ];
        (rows, markers)
    }

    #[test]
    fn a_late_start_catches_up_per_partition() {
        let (rows, markers) = partitioned_history();
        let mut full = VersionAssembler::new();
        for m in markers.clone() {
            full.push_marker(m);
        }
        for (q, k, r) in rows.clone() {
            full.push_row(q, k, r);
        }
        assert_eq!(
            held(&full),
            [(None, (1, 1)), (Some(0), (3, 1)), (Some(1), (3, 1))]
        );
        assert_eq!(full.get("user:4"), None);

        let mut late = VersionAssembler::new();
        for m in markers {
            late.push_marker(m);
        }
        // Compaction kept the newest record of each key.
        let compacted: Vec<_> = (rows.iter().enumerate())
            .filter(|(i, (_, k, _))| !rows[i + 1..].iter().any(|(_, later, _)| later == k))
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(compacted.len(), 5);
        for (q, k, r) in compacted {
            assert!(
                late.push_row(q, k, r).is_empty(),
                "nothing builds on what is held"
            );
        }
        let applied = late.catch_up();
        assert_eq!(in_scopes(&applied), [(3, 1, Some(0)), (3, 1, Some(1))]);
        assert_eq!(
            applied
                .iter()
                .map(|a| (a.rows, a.skipped))
                .collect::<Vec<_>>(),
            [(2, 2), (2, 2)],
            "partition 1 merged the legacy relation and its version 2 row"
        );
        assert_eq!(late.table(), full.table());
        assert_eq!(
            held(&late),
            held(&full),
            "the legacy version is settled too"
        );
        let c = late.counts();
        assert_eq!((c.orphan_rows, c.pending_attempts), (1, 0));
        // Later versions follow each partition's chain again.
        late.push_marker(scoped(4, 1, 1, 1, Some((3, 1))));
        assert_eq!(
            in_scopes(&late.push_row(1, "user:2", row(4, 1, 24.0))),
            [(4, 1, Some(1))]
        );
    }

    #[test]
    fn a_coded_row_decodes_with_its_partitions_codebooks() {
        let mut a = VersionAssembler::new();
        // Version 1: each partition carries its own copy of codebooks 1.
        a.push_record(0, "codebooks:1", books(1, 1));
        a.push_record(0, "user:1", coded(1, 1, 7));
        a.push_record(1, "codebooks:1", books(1, 1));
        a.push_record(1, "user:2", coded(1, 1, 8));
        a.push_marker(scoped(1, 1, 2, 0, None));
        a.push_marker(scoped(1, 1, 2, 1, None));
        assert_eq!(a.get("user:2").unwrap().vector, vec![8.0, 1.0]);
        // Version 2: partition 0 moves to codebooks 2 and retires its copy of 1; partition 1
        // keeps codebooks 1, and codebooks 2 are not in its scope.
        a.push_record(0, "codebooks:2", books(2, 2));
        a.push_record(0, "user:1", coded(2, 2, 9));
        a.push_tombstone(0, "codebooks:1", 2, 1);
        assert_eq!(a.push_marker(scoped(2, 1, 3, 0, Some((1, 1)))).len(), 1);
        a.push_record(1, "user:2", coded(2, 1, 5));
        a.push_record(1, "user:4", coded(2, 2, 1));
        assert_eq!(a.push_marker(scoped(2, 1, 2, 1, Some((1, 1)))).len(), 1);
        assert_eq!(a.get("user:1").unwrap().vector, vec![9.0, 2.0]);
        assert_eq!(a.get("user:2").unwrap().vector, vec![5.0, 1.0]);
        assert_eq!(a.get("user:4"), None, "partition 1 holds no codebooks 2");
        assert_eq!(a.counts().undecodable_rows, 1);
        let mut held: Vec<_> = a.codebooks().keys().copied().collect();
        held.sort_unstable();
        assert_eq!(held, [(Some(0), 2), (Some(1), 1)]);
        assert_eq!(a.codebook_epochs().into_iter().collect::<Vec<_>>(), [1, 2]);
    }
}
