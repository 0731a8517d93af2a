//! The rows of the partitions this instance follows, one assembler per partition, with the
//! figures that say how stale they are.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::exchange::{ChangedRow, ChangedRows, GradientsApplied};
use crate::partition::partition_of;
use crate::publish::TopicRecord;
use crate::subscriber::{
    is_node_key, relation_delta_key, Applied, VersionAssembler, RELATION_PREFIX,
};

/// Apply delays kept for the figures (the newest).
const DELAYS_KEPT: usize = 1024;

/// A record read from the published topics and the time its producer stamped on it (ms since
/// the epoch; a marker's is when its version was published).
#[derive(Debug)]
pub struct TopicRead {
    pub record: TopicRecord,
    pub timestamp_ms: Option<i64>,
}

/// A row of another owner's published version.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteRow {
    pub vector: Vec<f32>,
    /// The version that last carried the row.
    pub version: u64,
    /// The attempt its partition holds (the version and epoch of its newest applied marker).
    pub applied: (u64, u64),
    pub partition: i32,
}

/// `/v1/status` `remote`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RemoteFigures {
    /// Partitions of the embeddings topic (0 until the first change of ownership is acted on).
    pub partitions: u32,
    pub followed: Vec<RemotePartition>,
    /// Partitions owned elsewhere that are not followed because the cache reached
    /// `remote.max_rows`: their nodes are answered from this instance's own model.
    pub uncached: Vec<i32>,
    /// Rows cached (nodes and relations).
    pub rows: usize,
    pub max_rows: usize,
    /// The largest `lag_ms` of a partition followed.
    pub lag_ms: i64,
    /// From a version's publication (its marker's timestamp) to its application here, over the
    /// last versions applied live (not those a catch-up applied); `null` before the first.
    pub apply_delay_ms: Option<ApplyDelays>,
    /// Versions applied, over every partition followed, catch-ups included.
    pub versions_applied: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ApplyDelays {
    pub versions: usize,
    pub p50: i64,
    pub p99: i64,
    pub max: i64,
}

/// One partition followed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RemotePartition {
    pub partition: i32,
    /// Its backlog was read and caught up.
    pub caught_up: bool,
    /// The version applied last (`null`: none yet) and its epoch.
    pub version: Option<u64>,
    pub epoch: Option<u64>,
    /// The newest version whose marker was read.
    pub newest_version: Option<u64>,
    pub rows: usize,
    /// The owner's HTTP address, as the newest marker read names it (`null`: none advertised).
    pub owner_http: Option<String>,
    /// How long the cached rows have lagged the owner's newest published version: the age of
    /// the oldest marker read that is newer than the applied one (0 when none is).
    pub lag_ms: i64,
}

/// The rows other instances own, as their published versions left them. Shared between the
/// follower (the writer) and HTTP.
#[derive(Debug)]
pub struct RemoteCache {
    max_rows: usize,
    inner: RwLock<Inner>,
    /// With the gradient exchange: the keys of the rows versions applied live, until the
    /// trainer takes them ([`ChangedRows`]).
    changed: Option<Mutex<HashSet<String>>>,
    /// With the gradient exchange: the rows of partitions this instance took over, as their
    /// previous owner last published them, until the trainer takes them
    /// ([`ChangedRows::take_handed_over`]).
    handed_over: Option<Mutex<Vec<ChangedRow>>>,
    /// With the gradient exchange: per followed partition, its relation delta as the newest
    /// version applied left it, until the trainer takes them
    /// ([`ChangedRows::take_relation_deltas`]).
    relation_deltas: Option<Mutex<BTreeMap<i32, Vec<f32>>>>,
}

#[derive(Debug, Default)]
struct Inner {
    partitions: u32,
    followed: BTreeMap<i32, Followed>,
    uncached: BTreeSet<i32>,
    delays: VecDeque<i64>,
    versions_applied: u64,
}

#[derive(Debug, Default)]
struct Followed {
    assembler: VersionAssembler,
    caught_up: bool,
    /// Publication times of the markers read that are newer than the attempt held, by attempt.
    unapplied: BTreeMap<(u64, u64), i64>,
    /// The windows of other senders the markers read say their rows include (those newer than
    /// the attempt held, by attempt), and what the held attempt's said.
    windows: BTreeMap<(u64, u64), Arc<GradientsApplied>>,
    includes: Option<Arc<GradientsApplied>>,
    /// The newest marker read (its attempt) and the HTTP address it advertises.
    owner_http: Option<((u64, u64), Option<String>)>,
}

impl Followed {
    fn held(&self, q: i32) -> Option<(u64, u64)> {
        (self.assembler.applied_attempt(Some(q))).map(|a| (a.version, a.epoch))
    }

    /// Forget the publication times of what is applied; the delays of versions just applied.
    fn settle(&mut self, q: i32, applied: &[Applied], now_ms: i64) -> Vec<i64> {
        let delays = (applied.iter())
            .filter_map(|a| self.unapplied.get(&(a.version, a.epoch)))
            .map(|&published| (now_ms - published).max(0))
            .collect();
        if let Some(held) = self.held(q) {
            self.unapplied = self.unapplied.split_off(&(held.0, held.1 + 1));
            if !applied.is_empty() {
                self.includes = self.windows.get(&held).cloned();
            }
            self.windows = self.windows.split_off(&(held.0, held.1 + 1));
        }
        delays
    }
}

impl RemoteCache {
    pub fn new(max_rows: usize) -> RemoteCache {
        RemoteCache {
            max_rows,
            inner: RwLock::default(),
            changed: None,
            handed_over: None,
            relation_deltas: None,
        }
    }

    /// Keep the keys of the rows every version applied live carries, for [`ChangedRows`] (the
    /// trainer replaces its copies of rows owned elsewhere with them).
    /// Rows of partitions it takes over go to the trainer too ([`Self::hand_over`]).
    pub fn tracking_changes(mut self) -> RemoteCache {
        self.changed = Some(Mutex::default());
        self.handed_over = Some(Mutex::default());
        self.relation_deltas = Some(Mutex::default());
        self
    }

    /// After versions of followed partition `q` applied: its relation delta, for the trainer,
    /// when one of `applied` carried it (all: a catch-up, whose share the trainer has not had).
    fn note_relation_delta(&self, q: i32, followed: &Followed, applied: Option<&[Applied]>) {
        let Some(deltas) = &self.relation_deltas else {
            return;
        };
        let Some(entry) = followed.assembler.get(&relation_delta_key(q)) else {
            return;
        };
        if applied.is_none_or(|done| done.iter().any(|a| a.version == entry.version)) {
            deltas.lock().insert(q, entry.vector.clone());
        }
    }

    /// Whether partitions it stops following are handed over to the trainer
    /// ([`Self::tracking_changes`]).
    pub fn hands_over(&self) -> bool {
        self.handed_over.is_some()
    }

    /// The embeddings topic's partition count, which places every key.
    pub fn set_partitions(&self, partitions: u32) {
        self.inner.write().partitions = partitions;
    }

    /// `key`'s row, when its partition is followed and has applied a version carrying it.
    pub fn get(&self, key: &str) -> Option<RemoteRow> {
        let inner = self.inner.read();
        if inner.partitions == 0 {
            return None;
        }
        let q = partition_of(key.as_bytes(), inner.partitions) as i32;
        let followed = inner.followed.get(&q)?;
        let entry = followed.assembler.get(key)?;
        Some(RemoteRow {
            vector: entry.vector.clone(),
            version: entry.version,
            applied: followed.held(q)?,
            partition: q,
        })
    }

    /// Of `partitions`, those followed whose newest marker read names its owner's HTTP address,
    /// grouped by that address.
    pub fn owners_of(&self, partitions: &[i32]) -> BTreeMap<String, Vec<i32>> {
        let inner = self.inner.read();
        let mut owners: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for q in partitions {
            let address = (inner.followed.get(q))
                .and_then(|f| f.owner_http.as_ref())
                .and_then(|(_, a)| a.clone());
            if let Some(address) = address {
                owners.entry(address).or_default().push(*q);
            }
        }
        owners
    }

    /// The partitions followed.
    pub fn followed(&self) -> BTreeSet<i32> {
        self.inner.read().followed.keys().copied().collect()
    }

    /// Start following `partitions` from nothing (their backlog is read next, then
    /// [`RemoteCache::catch_up`]). A new set of owners is a fresh start: partitions left out
    /// for the bound are tried again.
    pub fn follow(&self, partitions: &BTreeSet<i32>) {
        let mut inner = self.inner.write();
        inner.uncached.clear();
        for &q in partitions {
            inner.followed.insert(q, Followed::default());
        }
    }

    /// Stop following `partitions` and drop their rows.
    pub fn forget(&self, partitions: &BTreeSet<i32>) {
        self.remove(partitions);
    }

    /// Stop following `partitions`, which this instance owns now, and, when tracking changes,
    /// hand the node rows of those caught up to the trainer: the new owner takes the rows of
    /// nodes its store never met (a node that only other owners' edges name reached the
    /// previous owner through gradients, which are not sent again), as their previous owner
    /// last published them.
    pub fn hand_over(&self, partitions: &BTreeSet<i32>) {
        let gone = self.remove(partitions);
        let Some(handed_over) = &self.handed_over else {
            return;
        };
        let mut rows = handed_over.lock();
        for followed in gone.into_iter().filter(|f| f.caught_up) {
            let applied = followed.includes.clone();
            rows.extend(
                (followed.assembler.table().iter())
                    .filter(|(key, _)| !key.starts_with(RELATION_PREFIX))
                    .map(|(key, entry)| ChangedRow {
                        key: key.clone(),
                        vector: entry.vector.clone(),
                        applied: applied.clone(),
                    }),
            );
        }
    }

    /// Stop following `partitions`; returns what was followed of them.
    fn remove(&self, partitions: &BTreeSet<i32>) -> Vec<Followed> {
        let mut inner = self.inner.write();
        inner.uncached.retain(|q| !partitions.contains(q));
        (partitions.iter())
            .filter_map(|q| inner.followed.remove(q))
            .collect()
    }

    /// Hand records read to the partitions they belong to (only those in `only`, when given:
    /// a catch-up reads the versions topic again for the partitions it starts). A marker goes
    /// to the partition it covers; a contract 1 or 2 marker (the whole topic, one publisher)
    /// is not followed. Returns the delays of the versions applied, from their publication to
    /// `now_ms`.
    pub fn feed(
        &self,
        reads: Vec<TopicRead>,
        only: Option<&BTreeSet<i32>>,
        now_ms: i64,
    ) -> Vec<i64> {
        let mut inner = self.inner.write();
        let mut delays = Vec::new();
        let mut applied = 0u64;
        for TopicRead {
            record,
            timestamp_ms,
        } in reads
        {
            let q = match &record {
                TopicRecord::Marker(m) => m.partition,
                TopicRecord::Row { partition, .. } | TopicRecord::Tombstone { partition, .. } => {
                    Some(*partition)
                }
            };
            let Some(q) = q.filter(|q| only.is_none_or(|only| only.contains(q))) else {
                continue;
            };
            let Some(followed) = inner.followed.get_mut(&q) else {
                continue;
            };
            if let TopicRecord::Marker(m) = &record {
                let attempt = (m.version, m.epoch);
                if followed
                    .owner_http
                    .as_ref()
                    .is_none_or(|(a, _)| attempt >= *a)
                {
                    followed.owner_http = Some((attempt, m.http.clone()));
                }
                if followed.held(q).is_none_or(|held| attempt > held) {
                    followed
                        .unapplied
                        .insert(attempt, timestamp_ms.unwrap_or(now_ms));
                    if let Some(windows) = &m.gradients_applied {
                        followed.windows.insert(attempt, Arc::new(windows.clone()));
                    }
                }
            }
            let done = record.push(&mut followed.assembler);
            if !done.is_empty() {
                applied += done.len() as u64;
                delays.extend(followed.settle(q, &done, now_ms));
                self.note_relation_delta(q, followed, Some(&done));
                if let (Some(changed), None) = (&self.changed, only) {
                    let versions: BTreeSet<u64> = done.iter().map(|a| a.version).collect();
                    changed.lock().extend(
                        (followed.assembler.table().iter())
                            .filter(|(_, e)| versions.contains(&e.version))
                            .map(|(k, _)| k.clone()),
                    );
                }
            }
        }
        inner.versions_applied += applied;
        for &d in &delays {
            if inner.delays.len() == DELAYS_KEPT {
                inner.delays.pop_front();
            }
            inner.delays.push_back(d);
        }
        delays
    }

    /// After `partitions`' backlog is read: apply, per partition, the newest whole version the
    /// records left (`VersionAssembler::catch_up`).
    pub fn catch_up(&self, partitions: &BTreeSet<i32>, now_ms: i64) {
        let mut inner = self.inner.write();
        let mut applied = 0u64;
        for &q in partitions {
            let Some(followed) = inner.followed.get_mut(&q) else {
                continue;
            };
            let done = followed.assembler.catch_up();
            applied += done.len() as u64;
            followed.settle(q, &done, now_ms);
            followed.caught_up = true;
            self.note_relation_delta(q, followed, None);
        }
        inner.versions_applied += applied;
    }

    /// Stop following partitions, the highest-numbered first, while the rows cached exceed
    /// `max_rows`; returns those dropped.
    pub fn enforce_bound(&self) -> BTreeSet<i32> {
        let mut inner = self.inner.write();
        let mut rows: usize = (inner.followed.values())
            .map(|f| f.assembler.table().len())
            .sum();
        let mut dropped = BTreeSet::new();
        while rows > self.max_rows {
            let Some((q, f)) = inner.followed.pop_last() else {
                break;
            };
            rows -= f.assembler.table().len();
            inner.uncached.insert(q);
            dropped.insert(q);
        }
        dropped
    }

    pub fn figures(&self, now_ms: i64) -> RemoteFigures {
        let inner = self.inner.read();
        let followed: Vec<RemotePartition> = (inner.followed.iter())
            .map(|(&q, f)| {
                let held = f.held(q);
                // `unapplied` holds only attempts newer than the one held.
                let lag_ms = (f.unapplied.values().next())
                    .map_or(0, |&published| (now_ms - published).max(0));
                let newest = f.unapplied.keys().next_back().copied().or(held);
                RemotePartition {
                    partition: q,
                    caught_up: f.caught_up,
                    version: held.map(|h| h.0),
                    epoch: held.map(|h| h.1),
                    newest_version: newest.map(|n| n.0),
                    rows: f.assembler.table().len(),
                    owner_http: f.owner_http.as_ref().and_then(|(_, a)| a.clone()),
                    lag_ms,
                }
            })
            .collect();
        let mut delays: Vec<i64> = inner.delays.iter().copied().collect();
        delays.sort_unstable();
        let at = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
        RemoteFigures {
            partitions: inner.partitions,
            rows: followed.iter().map(|p| p.rows).sum(),
            lag_ms: followed.iter().map(|p| p.lag_ms).max().unwrap_or(0),
            followed,
            uncached: inner.uncached.iter().copied().collect(),
            max_rows: self.max_rows,
            apply_delay_ms: (!delays.is_empty()).then(|| ApplyDelays {
                versions: delays.len(),
                p50: at(0.5),
                p99: at(0.99),
                max: delays[delays.len() - 1],
            }),
            versions_applied: inner.versions_applied,
        }
    }
}

impl ChangedRows for RemoteCache {
    fn take_handed_over(&self) -> Vec<ChangedRow> {
        (self.handed_over.as_ref()).map_or_else(Vec::new, |rows| std::mem::take(&mut *rows.lock()))
    }

    fn take_relation_deltas(&self) -> BTreeMap<i32, Vec<f32>> {
        (self.relation_deltas.as_ref())
            .map_or_else(BTreeMap::new, |d| std::mem::take(&mut *d.lock()))
    }

    fn take_changed(&self) -> Vec<ChangedRow> {
        let Some(changed) = &self.changed else {
            return Vec::new();
        };
        let keys = std::mem::take(&mut *changed.lock());
        if keys.is_empty() {
            return Vec::new();
        }
        let inner = self.inner.read();
        let place = |key: &String| partition_of(key.as_bytes(), inner.partitions) as i32;
        (keys.into_iter())
            .filter(|key| is_node_key(key))
            .filter_map(|key| {
                let followed = inner.followed.get(&place(&key))?;
                let vector = followed.assembler.get(&key)?.vector.clone();
                Some(ChangedRow {
                    key,
                    vector,
                    applied: followed.includes.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::WindowAttempt;
    use crate::publish::{AttemptRef, Record, RowRecord, VersionMarker};

    const P: u32 = 4;

    /// The first `n` keys `user:<i>` that belong to partition `q`.
    fn keys_in(q: i32, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("user:{i}"))
            .filter(|k| partition_of(k.as_bytes(), P) as i32 == q)
            .take(n)
            .collect()
    }

    fn row(q: i32, key: &str, version: u64, x: f32) -> TopicRead {
        let record = Record::Row(RowRecord {
            version,
            epoch: 1,
            ts: 0,
            vector: vec![x, -x],
        });
        TopicRead {
            record: TopicRecord::Row {
                partition: q,
                key: key.to_owned(),
                record,
            },
            timestamp_ms: Some(0),
        }
    }

    fn marker(q: i32, version: u64, rows: u64, published_ms: i64) -> TopicRead {
        let mut m = VersionMarker::for_partition(version, 1, rows, q, P as i32);
        m.builds_on = (version > 1).then_some(AttemptRef {
            version: version - 1,
            epoch: 1,
        });
        TopicRead {
            record: TopicRecord::Marker(m),
            timestamp_ms: Some(published_ms),
        }
    }

    fn cache_following(partitions: &[i32]) -> RemoteCache {
        let cache = RemoteCache::new(100);
        cache.set_partitions(P);
        cache.follow(&partitions.iter().copied().collect());
        cache
    }

    /// `/v1/neighbors` asks each partition's owner at the address its newest marker names, even
    /// one whose version is not whole yet (the owner, not its rows, is what is asked); an older
    /// marker read later does not name it back.
    #[test]
    fn each_partitions_owner_is_found_at_the_address_its_newest_marker_names() {
        let cache = cache_following(&[1, 2, 3]);
        let with_http = |q: i32, version: u64, http: Option<&str>| {
            let mut read = marker(q, version, 1, 0);
            if let TopicRecord::Marker(m) = &mut read.record {
                m.http = http.map(str::to_owned);
            }
            read
        };
        cache.feed(
            vec![
                with_http(1, 1, Some("10.0.0.1:8080")),
                with_http(2, 1, Some("10.0.0.2:8080")),
                with_http(2, 2, Some("10.0.0.1:8080")),
                with_http(2, 1, Some("10.0.0.2:8080")),
                with_http(3, 4, None),
            ],
            None,
            0,
        );
        assert_eq!(
            cache.owners_of(&[0, 1, 2, 3]),
            [("10.0.0.1:8080".to_owned(), vec![1, 2])].into(),
            "partition 0 is not followed, 3's owner advertises nothing"
        );
        let figures = cache.figures(0);
        assert_eq!(
            figures.followed[1].owner_http.as_deref(),
            Some("10.0.0.1:8080")
        );
        assert_eq!(figures.followed[2].owner_http, None);
    }

    /// A followed partition's share of the relations goes to the trainer on its own channel
    /// (at the catch-up, then with each version that carries it), not as a node row, and with
    /// the partition's rows when it is taken over.
    #[test]
    fn a_followed_partitions_relation_share_goes_to_the_trainer_apart_from_its_rows() {
        let cache = RemoteCache::new(100).tracking_changes();
        cache.set_partitions(P);
        cache.follow(&[1, 2].into());
        let k1 = keys_in(1, 1);
        // Caught up (a follow's first read), then a live version.
        cache.feed(
            vec![row(1, "relation-delta:1", 1, 0.5), marker(1, 1, 1, 0)],
            Some(&[1].into()),
            0,
        );
        cache.catch_up(&[1].into(), 0);
        assert_eq!(cache.take_relation_deltas(), [(1, vec![0.5, -0.5])].into());
        cache.feed(
            vec![
                row(1, &k1[0], 2, 3.0),
                row(1, "relation-delta:1", 2, 0.75),
                marker(1, 2, 2, 0),
            ],
            None,
            0,
        );
        assert_eq!(
            cache.take_relation_deltas(),
            [(1, vec![0.75, -0.75])].into()
        );
        assert!(cache.take_relation_deltas().is_empty(), "taken once");
        let changed: Vec<String> = cache.take_changed().into_iter().map(|r| r.key).collect();
        assert_eq!(changed, [k1[0].clone()], "a share is not a node's row");
        // Taken over, the partition's share goes with its rows.
        cache.hand_over(&[1].into());
        let mut handed: Vec<String> = (cache.take_handed_over().into_iter())
            .map(|r| r.key)
            .collect();
        handed.sort();
        assert_eq!(handed, ["relation-delta:1".to_string(), k1[0].clone()]);
    }

    /// A partition this instance takes over is handed to the trainer whole, as its previous
    /// owner last published it (node rows, not relation vectors), once; a partition forgotten
    /// before it was caught up hands nothing, and without the exchange nothing is kept.
    #[test]
    fn a_partition_taken_over_is_handed_to_the_trainer_as_last_published() {
        let cache = RemoteCache::new(100).tracking_changes();
        assert!(cache.hands_over());
        cache.set_partitions(P);
        cache.follow(&[1, 2].into());
        let (k1, k2) = (keys_in(1, 2), keys_in(2, 1));
        let relation = (0..)
            .map(|i| format!("relation:r{i}"))
            .find(|k| partition_of(k.as_bytes(), P) == 1)
            .unwrap();
        cache.feed(
            vec![
                row(1, &k1[0], 1, 1.0),
                row(1, &k1[1], 1, 2.0),
                row(1, &relation, 1, 9.0),
                marker(1, 1, 3, 0),
                row(2, &k2[0], 1, 5.0),
                marker(2, 1, 1, 0),
            ],
            Some(&[1, 2].into()),
            0,
        );
        cache.catch_up(&[1].into(), 0);
        cache.hand_over(&[1, 2].into());
        let mut handed = cache.take_handed_over();
        handed.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<(&str, f32)> = handed
            .iter()
            .map(|r| (r.key.as_str(), r.vector[0]))
            .collect();
        let mut want = vec![(k1[0].as_str(), 1.0), (k1[1].as_str(), 2.0)];
        want.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(keys, want, "partition 2 was never caught up");
        assert!(cache.take_handed_over().is_empty(), "handed over once");
        assert!(cache.followed().is_empty());

        let plain = cache_following(&[1]);
        assert!(!plain.hands_over());
        plain.feed(vec![row(1, &k1[0], 1, 1.0), marker(1, 1, 1, 0)], None, 0);
        plain.hand_over(&[1].into());
        assert!(plain.take_handed_over().is_empty());
    }

    /// With the gradient exchange the trainer takes the rows each version applied live carried,
    /// once, as the cache holds them; a catch-up's rows are not handed over.
    #[test]
    fn the_rows_of_versions_applied_live_are_handed_over_once() {
        let cache = RemoteCache::new(100).tracking_changes();
        cache.set_partitions(P);
        cache.follow(&[1].into());
        let k = keys_in(1, 3);
        cache.feed(
            vec![
                row(1, &k[0], 1, 1.0),
                row(1, &k[1], 1, 2.0),
                marker(1, 1, 2, 0),
            ],
            Some(&[1].into()),
            0,
        );
        cache.catch_up(&[1].into(), 0);
        assert!(cache.take_changed().is_empty(), "a catch-up's rows");
        // Version 2's marker says which windows its rows include; version 3's is read, not
        // applied (its rows are missing), so the rows handed over still carry version 2's.
        let windows: GradientsApplied = [(
            "a".to_owned(),
            WindowAttempt {
                version: 7,
                epoch: 1,
            },
        )]
        .into();
        let mut second = marker(1, 2, 2, 0);
        let mut third = marker(1, 3, 1, 0);
        for (m, version) in [(&mut second, 7), (&mut third, 8)] {
            if let TopicRecord::Marker(m) = &mut m.record {
                let mut w = windows.clone();
                w.get_mut("a").unwrap().version = version;
                m.gradients_applied = Some(w);
            }
        }
        cache.feed(
            vec![row(1, &k[2], 2, 3.0), row(1, &k[0], 2, 4.0), second, third],
            None,
            0,
        );
        let mut changed = cache.take_changed();
        changed.sort_by(|a, b| a.key.cmp(&b.key));
        let mut want: Vec<ChangedRow> = [(&k[0], 4.0), (&k[2], 3.0)]
            .into_iter()
            .map(|(key, x)| ChangedRow {
                key: key.clone(),
                vector: vec![x, -x],
                applied: Some(Arc::new(windows.clone())),
            })
            .collect();
        want.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(changed, want);
        assert!(cache.take_changed().is_empty(), "handed over once");
    }

    #[test]
    fn a_followed_partition_serves_whole_versions_and_says_how_far_behind_it_is() {
        let cache = cache_following(&[1]);
        let (k1, k0) = (keys_in(1, 2), keys_in(0, 1));
        // Partition 0 is owned here: its records and markers are not cached.
        let delays = cache.feed(
            vec![
                row(1, &k1[0], 1, 1.0),
                row(0, &k0[0], 1, 5.0),
                marker(0, 1, 1, 1_000),
                marker(1, 1, 2, 1_000),
            ],
            None,
            2_000,
        );
        assert!(delays.is_empty());
        assert_eq!(cache.get(&k1[0]), None, "version 1 is not whole yet");
        let f = cache.figures(4_000);
        assert_eq!((f.followed[0].version, f.followed[0].lag_ms), (None, 3_000));
        assert_eq!(f.lag_ms, 3_000);
        let delays = cache.feed(vec![row(1, &k1[1], 1, 2.0)], None, 4_500);
        assert_eq!(delays, [3_500]);
        let got = cache.get(&k1[1]).expect("version 1 applied");
        assert_eq!(
            (got.vector, got.version, got.applied, got.partition),
            (vec![2.0, -2.0], 1, (1, 1), 1)
        );
        assert_eq!(cache.get(&k0[0]), None);
        let f = cache.figures(9_000);
        assert_eq!((f.rows, f.lag_ms, f.versions_applied), (2, 0, 1));
        assert_eq!(
            f.apply_delay_ms,
            Some(ApplyDelays {
                versions: 1,
                p50: 3_500,
                p99: 3_500,
                max: 3_500
            })
        );
        // Version 2 moves one row; the other keeps version 1's.
        cache.feed(
            vec![marker(1, 2, 1, 9_000), row(1, &k1[0], 2, 7.0)],
            None,
            9_200,
        );
        assert_eq!(
            cache.get(&k1[0]).map(|r| (r.vector[0], r.applied)),
            Some((7.0, (2, 1)))
        );
        assert_eq!(
            cache.get(&k1[1]).map(|r| (r.version, r.applied)),
            Some((1, (2, 1)))
        );
        // The partition is assigned to this instance: its rows go.
        cache.forget(&[1].into());
        assert_eq!((cache.get(&k1[0]), cache.figures(9_300).rows), (None, 0));
    }

    #[test]
    fn a_catch_up_applies_what_compaction_left_and_only_to_the_partitions_it_starts() {
        let cache = cache_following(&[2]);
        let k = keys_in(2, 2);
        cache.feed(vec![marker(2, 1, 1, 0), row(2, &k[0], 1, 1.0)], None, 10);
        // Partition 3 starts being followed: the versions topic is read again from its start
        // for it alone, and its embeddings partition, where compaction left version 1's row of
        // k3[0] superseded by version 2's.
        let k3 = keys_in(3, 2);
        cache.follow(&[3].into());
        let only = [3].into();
        cache.feed(
            vec![
                marker(2, 1, 1, 0),
                marker(3, 1, 2, 0),
                marker(3, 2, 1, 0),
                row(3, &k3[1], 1, 3.0),
                row(3, &k3[0], 2, 4.0),
            ],
            Some(&only),
            20,
        );
        assert_eq!(
            cache.get(&k3[0]),
            None,
            "version 1 of partition 3 cannot complete"
        );
        cache.catch_up(&only, 30);
        assert_eq!(cache.get(&k3[0]).map(|r| r.vector[0]), Some(4.0));
        assert_eq!(cache.get(&k3[1]).map(|r| r.vector[0]), Some(3.0));
        let f = cache.figures(40);
        assert_eq!(
            (f.followed.iter())
                .map(|p| (p.partition, p.caught_up, p.version, p.rows))
                .collect::<Vec<_>>(),
            [(2, false, Some(1), 1), (3, true, Some(2), 2)]
        );
        // Partition 2's marker, read again, changed nothing there.
        assert_eq!((f.versions_applied, f.lag_ms), (2, 0));
    }

    #[test]
    fn past_max_rows_the_highest_partitions_stop_being_followed_until_ownership_changes() {
        let cache = RemoteCache::new(3);
        cache.set_partitions(P);
        cache.follow(&[1, 2].into());
        for q in [1, 2] {
            let k = keys_in(q, 2);
            let reads = vec![
                marker(q, 1, 2, 0),
                row(q, &k[0], 1, 1.0),
                row(q, &k[1], 1, 1.0),
            ];
            cache.feed(reads, None, 0);
        }
        assert_eq!(cache.figures(0).rows, 4);
        assert_eq!(cache.enforce_bound(), [2].into());
        let f = cache.figures(0);
        assert_eq!((f.rows, f.uncached.clone()), (2, vec![2]));
        assert_eq!(cache.followed(), [1].into());
        cache.follow(&[2].into());
        assert!(cache.figures(0).uncached.is_empty());
    }
}
