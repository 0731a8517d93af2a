//! The subscriber's side of the version contract (`topics/README.md`, contract 2, "Rule for
//! subscribers"): [`VersionAssembler`] turns embedding rows and version markers, read in any
//! interleaving, into a local table that only ever holds whole versions. It is pure (no Kafka):
//! feed it what a consumer reads; `examples/subscriber.rs` is such a consumer.
//!
//! Rows are grouped by `(version, epoch)`, an *attempt*. An attempt is complete when its marker is
//! in and exactly `marker.rows` distinct keys of that attempt are in. Rows of another epoch of the
//! same version (an interrupted attempt; the publisher retries under the same number with a new
//! epoch) never count toward a marker. Versions are applied in order: a complete `v + 1` waits
//! for `v`, because a version carries only the rows that changed since its predecessor, and for
//! the very attempt of `v` its marker names (`builds_on`), the one the publisher adopted.
//!
//! A version's canonical attempt is its last: the publisher retries a version only while it does
//! not know that an attempt's marker landed, and the retry carries every key the earlier attempt
//! did. So a complete attempt of the applied version under a newer epoch (a marker whose
//! acknowledgement was lost, then the retry) is applied over the one held, and older attempts of
//! an applied version are stale.
//!
//! Late start on a compacted embeddings topic: compaction keeps only each key's newest row, so
//! the rows of old versions that later versions superseded are gone and those versions never
//! complete. A subscriber that starts late therefore reads both topics to their ends and then
//! calls [`VersionAssembler::catch_up`]: it applies the newest complete version it can assemble,
//! from the surviving rows of every version up to it that has a marker (newest row per key).
//! That is the table a reader of the full log would hold at that version, except for a key whose
//! newest surviving row belongs to an attempt that never got a marker (the attempt's rows
//! superseded the key's published row before compaction): such rows are never applied (counted
//! as `orphan_rows`), and the key stays absent until a later version carries it. Call `catch_up`
//! only once the backlog is read: before that, a version may look incomplete only because its
//! rows sit further on in a partition not yet read, and jumping over it would lose them.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::publish::{
    AttemptRef, CodedRow, PqTable, Record, RowRecord, VersionMarker, CODEBOOKS_PREFIX,
};

/// Keys of relation vectors start with this (`relation:favorites`); everything else is a node.
pub const RELATION_PREFIX: &str = "relation:";

/// One key's vector in the local table and the version that last carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub vector: Vec<f32>,
    pub version: u64,
}

/// A version the assembler applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub version: u64,
    pub epoch: u64,
    /// Rows of the applied attempt (its marker's count; for a catch-up, the rows merged).
    pub rows: u64,
    /// Node keys in the table afterwards.
    pub nodes: usize,
    /// Relation keys in the table afterwards.
    pub relations: usize,
    /// Versions jumped over by [`VersionAssembler::catch_up`] to reach this one.
    pub skipped: u64,
}

/// Counters for monitoring a subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub applied_versions: u64,
    /// Later attempts of the applied version applied over it (its first attempt's marker
    /// landed but the publisher never learned so, and retried).
    pub retries_applied: u64,
    /// Versions jumped over by catch-ups.
    pub skipped_versions: u64,
    /// Rows held for versions not applied yet.
    pub pending_rows: usize,
    /// `(version, epoch)` attempts with rows or a marker, not applied yet.
    pub pending_attempts: usize,
    /// Rows ignored or dropped because their attempt is older than the one applied (an earlier
    /// version, or an earlier epoch of the applied version).
    pub stale_rows: u64,
    /// Markers of such attempts.
    pub stale_markers: u64,
    /// Rows of attempts without a marker that a catch-up left out.
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
    rows: HashMap<String, Pending>,
    marker: Option<VersionMarker>,
}

impl Attempt {
    /// Distinct keys, so a row delivered twice counts once. More keys than the marker announces
    /// means two attempts shared an epoch: that is never applied.
    fn complete(&self) -> bool {
        self.marker
            .as_ref()
            .is_some_and(|m| m.rows == self.rows.len() as u64)
    }

    /// Whether this attempt may be applied over `held` (the applied attempt, `None`: nothing):
    /// its marker names no attempt, or names `held`.
    fn builds_on(&self, held: Option<AttemptRef>) -> bool {
        self.marker
            .as_ref()
            .is_some_and(|m| m.builds_on.is_none() || m.builds_on == held)
    }
}

/// Applies versions to a local table only when they are whole (see the module docs).
#[derive(Debug, Default)]
pub struct VersionAssembler {
    applied: Option<(u64, u64)>,
    table: HashMap<String, Entry>,
    /// Codebooks by epoch, for coded rows.
    codebooks: HashMap<u64, PqTable>,
    relations: usize,
    pending: BTreeMap<(u64, u64), Attempt>,
    counts: Counts,
    /// The applied version's marker.
    applied_marker: Option<VersionMarker>,
    /// Versions above this are ignored ([`VersionAssembler::up_to`]).
    limit: Option<u64>,
}

impl VersionAssembler {
    pub fn new() -> VersionAssembler {
        VersionAssembler::default()
    }

    /// An assembler that stops at `version`: rows, tombstones and markers of later versions are
    /// ignored, so its table is that version's once it is applied (an export of one version).
    pub fn up_to(version: u64) -> VersionAssembler {
        VersionAssembler {
            limit: Some(version),
            ..VersionAssembler::default()
        }
    }

    /// The marker of the last applied version (its row count and drift figures).
    pub fn applied_marker(&self) -> Option<&VersionMarker> {
        self.applied_marker.as_ref()
    }

    fn beyond_limit(&self, version: u64) -> bool {
        self.limit.is_some_and(|limit| version > limit)
    }

    /// The last applied version (0: none yet).
    pub fn applied_version(&self) -> u64 {
        self.applied.map_or(0, |(v, _)| v)
    }

    /// The epoch of the last applied version's attempt.
    pub fn applied_epoch(&self) -> Option<u64> {
        self.applied.map(|(_, e)| e)
    }

    /// Key → vector and the version that carried it, as of [`Self::applied_version`].
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
            pending_rows: self.pending.values().map(|a| a.rows.len()).sum(),
            pending_attempts: self.pending.len(),
            ..self.counts
        }
    }

    /// One row read from the embeddings topic (`key` is the record's key). Returns the versions
    /// this completed, in order.
    pub fn push_row(&mut self, key: impl Into<String>, row: RowRecord) -> Vec<Applied> {
        self.push_pending(
            key.into(),
            row.version,
            row.epoch,
            Pending::Vector(row.vector),
        )
    }

    /// Any record with a value read from the embeddings topic ([`Record::decode`]): a row, a
    /// coded row (decoded when its version is applied) or codebooks.
    pub fn push_record(&mut self, key: impl Into<String>, record: Record) -> Vec<Applied> {
        let key = key.into();
        match record {
            Record::Row(row) => self.push_row(key, row),
            Record::Coded(row) => {
                self.push_pending(key, row.version, row.epoch, Pending::Coded(row))
            }
            Record::Codebooks(c) => {
                self.push_pending(key, c.version, c.epoch, Pending::Codebooks(c.table))
            }
        }
    }

    /// The codebooks held, by epoch.
    pub fn codebooks(&self) -> &HashMap<u64, PqTable> {
        &self.codebooks
    }

    /// Whether an attempt is older than the applied one: an earlier version, or an earlier (or
    /// the same) epoch of the applied version.
    fn stale(&self, version: u64, epoch: u64) -> bool {
        self.applied.is_some_and(|held| (version, epoch) <= held)
    }

    fn push_pending(&mut self, key: String, version: u64, epoch: u64, p: Pending) -> Vec<Applied> {
        if self.beyond_limit(version) {
            return Vec::new();
        }
        if self.stale(version, epoch) {
            self.counts.stale_rows += 1;
            return Vec::new();
        }
        self.pending
            .entry((version, epoch))
            .or_default()
            .rows
            .insert(key, p);
        self.advance()
    }

    /// One tombstone read from the embeddings topic: a record with a null value whose headers
    /// name its `(version, epoch)` ([`crate::publish::tombstone_attempt`]). It counts toward its
    /// attempt like a row; applying the version drops the key from the table.
    pub fn push_tombstone(
        &mut self,
        key: impl Into<String>,
        version: u64,
        epoch: u64,
    ) -> Vec<Applied> {
        self.push_pending(key.into(), version, epoch, Pending::Tombstone)
    }

    /// One marker read from the versions topic. Returns the versions this completed, in order.
    pub fn push_marker(&mut self, marker: VersionMarker) -> Vec<Applied> {
        if self.beyond_limit(marker.version) {
            return Vec::new();
        }
        if self.stale(marker.version, marker.epoch) {
            self.counts.stale_markers += 1;
            return Vec::new();
        }
        let key = (marker.version, marker.epoch);
        self.pending.entry(key).or_default().marker = Some(marker);
        self.advance()
    }

    /// After reading the backlog to its end: apply the newest complete version even when older
    /// ones cannot complete (their rows were compacted away), then whatever follows it. Returns
    /// nothing when no complete version lies beyond a gap. See the module docs.
    pub fn catch_up(&mut self) -> Vec<Applied> {
        let Some(target) = self
            .pending
            .iter()
            .filter(|(_, a)| a.complete())
            .map(|(k, _)| *k)
            .next_back()
        else {
            return Vec::new();
        };
        // Later attempts of the target's version stay pending: one may be its retry.
        let above = self.pending.split_off(&(target.0, target.1 + 1));
        let below = std::mem::replace(&mut self.pending, above);
        let mut merged = 0u64;
        // Ascending (version, epoch): a newer row of a key overwrites an older one. Merged as one
        // set, so that a coded row superseded later is never decoded (its codebooks may be gone).
        let mut newest = HashMap::new();
        for ((version, epoch), attempt) in below {
            let usable =
                (version, epoch) == target || (version < target.0 && attempt.marker.is_some());
            if (version, epoch) == target {
                self.applied_marker = attempt.marker.clone();
            }
            if usable {
                merged += attempt.rows.len() as u64;
                newest.extend(attempt.rows.into_iter().map(|(k, p)| (k, (version, p))));
            } else if attempt.marker.is_none() {
                self.counts.orphan_rows += attempt.rows.len() as u64;
            } else {
                self.counts.stale_rows += attempt.rows.len() as u64;
            }
        }
        self.merge(newest);
        let skipped = target.0.saturating_sub(self.applied_version() + 1);
        self.counts.skipped_versions += skipped;
        self.count_applied(target);
        self.applied = Some(target);
        let mut out = vec![self.applied_event(target, merged, skipped)];
        out.extend(self.advance());
        out
    }

    /// Apply every attempt that is next in line and complete.
    fn advance(&mut self) -> Vec<Applied> {
        let mut out = Vec::new();
        while let Some(key) = self.next_in_line() {
            let attempt = self.pending.remove(&key).expect("found in pending");
            let rows = attempt.rows.len() as u64;
            self.applied_marker = attempt.marker;
            self.merge(
                attempt
                    .rows
                    .into_iter()
                    .map(|(k, p)| (k, (key.0, p)))
                    .collect(),
            );
            // Every older attempt is stale now; later epochs of this version stay pending.
            let rest = self.pending.split_off(&(key.0, key.1 + 1));
            for (_, dropped) in std::mem::replace(&mut self.pending, rest) {
                self.counts.stale_rows += dropped.rows.len() as u64;
            }
            self.count_applied(key);
            self.applied = Some(key);
            out.push(self.applied_event(key, rows, 0));
        }
        out
    }

    /// The complete attempt to apply next: a newer attempt of the applied version (its retry,
    /// which holds every key the applied one did), else the newest complete attempt of the next
    /// version that builds on the applied attempt.
    fn next_in_line(&self) -> Option<(u64, u64)> {
        let held = self
            .applied
            .map(|(version, epoch)| AttemptRef { version, epoch });
        let newest_complete =
            |from: (u64, u64), to: (u64, u64), check: &dyn Fn(&Attempt) -> bool| {
                (self.pending.range(from..=to))
                    .filter(|(_, a)| a.complete() && check(a))
                    .map(|(k, _)| *k)
                    .next_back()
            };
        if let Some((version, epoch)) = self.applied {
            let retry = newest_complete((version, epoch + 1), (version, u64::MAX), &|_| true);
            if retry.is_some() {
                return retry;
            }
        }
        let next = self.applied_version() + 1;
        newest_complete((next, 0), (next, u64::MAX), &|a| a.builds_on(held))
    }

    fn count_applied(&mut self, (version, _): (u64, u64)) {
        if version == self.applied_version() {
            self.counts.retries_applied += 1;
        } else {
            self.counts.applied_versions += 1;
        }
    }

    /// Apply rows (key → the version that carried it and its record): codebooks first, so the
    /// coded rows beside them decode; retired codebooks last.
    fn merge(&mut self, rows: HashMap<String, (u64, Pending)>) {
        let mut retired = Vec::new();
        let mut others = Vec::with_capacity(rows.len());
        for (key, (version, p)) in rows {
            match p {
                Pending::Codebooks(table) => {
                    self.codebooks.insert(table.epoch, table);
                }
                Pending::Tombstone if key.starts_with(CODEBOOKS_PREFIX) => {
                    retired.extend(key[CODEBOOKS_PREFIX.len()..].parse::<u64>().ok())
                }
                p => others.push((key, version, p)),
            }
        }
        for (key, version, p) in others {
            let vector = match p {
                Pending::Vector(v) => Some(v),
                Pending::Coded(row) => {
                    let decoded = self
                        .codebooks
                        .get(&row.codebooks)
                        .and_then(|t| row.vector(t));
                    if decoded.is_none() {
                        self.counts.undecodable_rows += 1;
                    }
                    decoded
                }
                Pending::Tombstone | Pending::Codebooks(_) => None,
            };
            let relation = key.starts_with(RELATION_PREFIX);
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
        for epoch in retired {
            self.codebooks.remove(&epoch);
        }
    }

    fn applied_event(&self, (version, epoch): (u64, u64), rows: u64, skipped: u64) -> Applied {
        Applied {
            version,
            epoch,
            rows,
            nodes: self.nodes(),
            relations: self.relations,
            skipped,
        }
    }
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
            a.push_row(k, r);
        }
        a.push_marker(marker(1, 1, 3));
        assert_eq!((a.applied_version(), a.nodes()), (1, 2));
        // Version 2 erases user:1 and carries user:2 and the relation: three records.
        assert!(a.push_tombstone("user:1", 2, 1).is_empty());
        assert!(a.push_marker(marker(2, 1, 3)).is_empty());
        assert!(a.push_row("user:2", row(2, 1, 5.0)).is_empty());
        assert_eq!(
            value(&a, "user:1"),
            Some((1.0, 1)),
            "not applied before it is whole"
        );
        let applied = a.push_row("relation:follows", row(2, 1, 8.0));
        assert_eq!(versions(&applied), vec![(2, 1)]);
        assert_eq!(value(&a, "user:1"), None);
        assert_eq!(value(&a, "user:2"), Some((5.0, 2)));
        assert_eq!((a.nodes(), applied[0].nodes), (1, 1));
        // A tombstone of an applied version is stale.
        assert!(a.push_tombstone("user:2", 2, 1).is_empty());
        assert_eq!(value(&a, "user:2"), Some((5.0, 2)));
    }

    #[test]
    fn an_assembler_up_to_a_version_holds_that_version_whatever_follows() {
        for catch_up in [false, true] {
            let mut a = VersionAssembler::up_to(1);
            // Version 2 is whole and read first, then version 1.
            a.push_row("user:1", row(2, 1, 5.0));
            a.push_marker(marker(2, 1, 1));
            for (k, r) in v1() {
                a.push_row(k, r);
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
            a.push_row(k, r);
        }
        // Version 2 erases user:2; its relation row was compacted away (version 3 superseded
        // it), so it never completes on its own.
        a.push_marker(marker(1, 1, 3));
        a.push_tombstone("user:2", 2, 1);
        a.push_marker(marker(2, 1, 2));
        a.push_row("user:1", row(3, 1, 7.0));
        a.push_row("relation:follows", row(3, 1, 6.0));
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
            assert!(a.push_row(k, r).is_empty());
            assert_eq!(a.applied_version(), 0);
            assert!(a.table().is_empty());
        }
        let (k, r) = rows.next().unwrap();
        let applied = a.push_row(k, r);
        assert_eq!(
            applied,
            vec![Applied {
                version: 1,
                epoch: 1,
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
            assert!(a.push_row(k, r).is_empty());
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
            a.push_row(k, r);
        }
        // A row delivered twice counts once.
        a.push_row("user:1", row(1, 1, 1.0));
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
            a.push_row(k, r);
        }
        a.push_marker(marker(1, 1, 3));
        // Version 2, epoch 1: two rows out, then the daemon died (no marker).
        a.push_row("user:1", row(2, 1, 10.0));
        a.push_row("user:3", row(2, 1, 30.0));
        // The retry, version 2 under epoch 2, carries two rows; its marker arrives first. The two
        // stale rows would make the count if they counted.
        assert!(a.push_marker(marker(2, 2, 2)).is_empty());
        assert!(a.push_row("user:1", row(2, 2, 11.0)).is_empty());
        assert_eq!(a.applied_version(), 1);
        assert_eq!(
            versions(&a.push_row("user:2", row(2, 2, 22.0))),
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
        assert!(a.push_row("user:4", row(2, 1, 40.0)).is_empty());
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
            a.push_row("user:1", row(2, 2, 12.0));
            a.push_row("user:2", row(2, 2, 22.0));
            a.push_marker(marker(2, 2, 2))
        };
        let first = |a: &mut VersionAssembler| {
            a.push_row("user:1", row(2, 1, 11.0));
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
                a.push_row(k, r);
            }
            a.push_marker(marker(1, 1, 3));
            // Version 3 (built on the retry) is read before either attempt of version 2.
            a.push_row("user:3", row(3, 2, 30.0));
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
            a.push_row(k, r);
        }
        a.push_marker(marker(1, 1, 3));
        let mut second = marker(2, 1, 1);
        second.builds_on = Some(AttemptRef {
            version: 1,
            epoch: 4,
        });
        a.push_row("user:1", row(2, 1, 10.0));
        assert!(a.push_marker(second).is_empty(), "(1, 4) is not held");
        assert_eq!(a.applied_version(), 1);
        a.push_row("user:1", row(1, 4, 5.0));
        a.push_row("user:2", row(1, 4, 6.0));
        a.push_row("relation:follows", row(1, 4, 7.0));
        let applied = a.push_marker(marker(1, 4, 3));
        assert_eq!(versions(&applied), [(1, 4), (2, 1)]);
        assert_eq!(value(&a, "user:1"), Some((10.0, 2)));
        assert_eq!(value(&a, "user:2"), Some((6.0, 1)));
    }

    #[test]
    fn a_complete_later_version_waits_for_its_predecessor() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(2, 1, 1));
        a.push_row("user:1", row(2, 1, 10.0));
        a.push_marker(marker(3, 1, 1));
        a.push_row("user:2", row(3, 1, 20.0));
        assert_eq!(a.applied_version(), 0, "2 and 3 are complete, 1 is not");
        a.push_marker(marker(1, 1, 3));
        let mut rows = v1().into_iter();
        for (k, r) in rows.by_ref().take(2) {
            assert!(a.push_row(k, r).is_empty());
        }
        let (k, r) = rows.next().unwrap();
        let applied = a.push_row(k, r);
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
        a.push_row("user:1", row(1, 1, 1.0));
        assert_eq!(a.applied_version(), 1);
        a.push_row("user:1", row(2, 1, 1.0));
        a.push_row("user:2", row(2, 1, 2.0));
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
            full.push_row(k, r);
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
                late.push_row(k, r).is_empty(),
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
            versions(&late.push_row("user:1", row(4, 2, 5.0))),
            vec![(4, 2)]
        );
    }

    #[test]
    fn a_catch_up_leaves_out_rows_of_attempts_without_a_marker() {
        let mut a = VersionAssembler::new();
        a.push_marker(marker(2, 1, 1));
        a.push_row("user:1", row(2, 1, 1.0));
        // Version 3, epoch 1: interrupted; its row superseded user:2's published row.
        a.push_row("user:2", row(3, 1, 2.0));
        a.push_marker(marker(3, 2, 1));
        a.push_row("user:3", row(3, 2, 3.0));
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
        a.push_record("user:1", coded(1, 1, 7));
        a.push_record("user:2", coded(1, 1, 8));
        a.push_record("codebooks:1", books(1, 1));
        assert_eq!(a.push_marker(marker(1, 1, 3)).len(), 1);
        assert_eq!(a.get("user:1").unwrap().vector, vec![7.0, 1.0]);
        assert_eq!(a.nodes(), 2, "codebooks are not nodes");
        // New codebooks: every row again, the old record retired.
        a.push_record("user:1", coded(2, 2, 9));
        a.push_record("user:2", coded(2, 2, 10));
        a.push_record("user:3", coded(2, 5, 1)); // names codebooks nobody published
        a.push_record("codebooks:2", books(2, 2));
        a.push_tombstone("codebooks:1", 2, 1);
        assert_eq!(a.push_marker(marker(2, 1, 5)).len(), 1);
        assert_eq!(a.get("user:2").unwrap().vector, vec![10.0, 2.0]);
        assert_eq!(a.get("user:3"), None);
        assert_eq!(a.counts().undecodable_rows, 1);
        assert_eq!(a.codebooks().keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn a_catch_up_decodes_the_newest_rows_only() {
        // Compaction kept user:1's version-1 row, whose codebooks are retired and gone, and
        // version 2's rows: the catch-up decodes user:1 from version 2 only.
        let mut a = VersionAssembler::new();
        a.push_record("user:1", coded(1, 1, 3));
        a.push_marker(marker(1, 1, 2));
        a.push_record("user:1", coded(2, 2, 4));
        a.push_record("codebooks:2", books(2, 2));
        a.push_tombstone("codebooks:1", 2, 1);
        a.push_marker(marker(2, 1, 3));
        assert_eq!(a.catch_up().len(), 1);
        assert_eq!(a.get("user:1").unwrap().vector, vec![4.0, 2.0]);
        assert_eq!(a.counts().undecodable_rows, 0);
    }
}
