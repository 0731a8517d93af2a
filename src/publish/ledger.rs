//! The ledger: version numbers and publisher epochs that survive restarts.
//!
//! It records the last version whose marker the broker acknowledged and the publisher's epoch,
//! which grows by one at every start and after every failed attempt. The next version is always
//! `last + 1`; a publication cut short (rows out, no marker) is retried under the same number
//! with a newer epoch, and a subscriber, which applies a `(version, epoch)` only when its marker
//! and all its rows are in, never mixes the two. So a restart never republishes an older number
//! and never skips one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::persist;
use crate::publish::{AttemptRef, VersionMarker};

/// The persisted numbering state (`<publish.path>/ledger.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LedgerState {
    /// The last version whose marker the broker acknowledged (0: none yet).
    pub last_version: u64,
    /// The publisher's epoch for this process.
    pub epoch: u64,
    /// How many of the store's erasures (in erasure order) the committed versions carried as
    /// tombstones (absent in ledgers written before erasures: none).
    #[serde(default)]
    pub erasures_published: u64,
    /// The epoch of the last committed version's attempt, which the next version builds on
    /// (0: not known, a ledger from before contract 2).
    #[serde(default)]
    pub last_epoch: u64,
    /// An attempt whose rows may be on the broker and that was not committed: set before its
    /// rows go out, cleared by its commit. Found at open, it means the attempt's marker may be
    /// there too, so the next attempt of that version carries every row (it must hold every key
    /// the attempt did; see [`crate::publish::VersionRequest::retried_rows`]).
    #[serde(default)]
    pub in_flight: Option<AttemptRef>,
    /// The embeddings partitions the last committed version covered and the topic's partition
    /// count then (contract 3); `None` in ledgers written before: that publisher covered every
    /// partition.
    #[serde(default)]
    pub scope: Option<LedgerScope>,
    /// Every stored edge below this sequence number was trained into the last committed
    /// version, and with the gradient exchange its gradients for other owners went out in that
    /// version's transaction or an earlier one (0: none, or a ledger written before 2026-12-07).
    #[serde(default)]
    pub cursor: u64,
}

/// A committed version's partitions ([`crate::publish::Scope`], persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerScope {
    pub partitions: u32,
    pub covered: Vec<i32>,
}

/// Why [`Ledger::reconcile`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Foreign(ForeignVersions),
    #[error(transparent)]
    Ledger(LedgerError),
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("publish ledger {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("publish ledger {path}: corrupt: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

/// Version numbering that survives restarts; every change is fsynced before it counts.
pub struct Ledger {
    /// `None`: in memory only (offline measurements and tests).
    path: Option<PathBuf>,
    state: LedgerState,
    /// How the versions topic disagreed with this ledger at start, when it did: subscribers do
    /// not hold the version the ledger names, so the next version carries every row.
    disagreement: Option<TopicDisagreement>,
    /// This instance's epoch tag ([`Ledger::set_instance_tag`]); `None`: epochs count by one.
    tag: Option<u64>,
}

/// Epochs of one instance are all its tag modulo this (65,536 tags: two instances of a
/// deployment share one with odds of 1 in 65,536; JSON carries epochs exactly below 2^53).
pub(super) const EPOCH_TAGS: u64 = 1 << 16;

/// The newest markers of the versions topic, as a publisher reads them at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionsTail {
    /// The newest attempt on the topic (the highest version, its highest epoch) and the
    /// deployment that published it (`None` for markers from before the field).
    pub newest: Option<(AttemptRef, Option<String>)>,
    /// The highest epoch of any marker read: every attempt this publisher makes must be newer.
    pub max_epoch: u64,
    /// Contract 3: the newest attempt of each partition read.
    pub by_partition: std::collections::BTreeMap<i32, AttemptRef>,
    /// The newest attempt of a marker that names no partition (contracts 1 and 2: the whole
    /// topic), which a partition without markers of its own continues.
    pub unscoped: Option<AttemptRef>,
}

impl VersionsTail {
    /// Take `marker` into account (markers come in any order).
    pub fn observe(&mut self, marker: &VersionMarker) {
        let attempt = marker.attempt();
        self.max_epoch = self.max_epoch.max(attempt.epoch);
        if self.newest.as_ref().is_none_or(|(a, _)| attempt > *a) {
            self.newest = Some((attempt, marker.deployment.clone()));
        }
        let slot = match marker.partition {
            Some(p) => self.by_partition.entry(p).or_insert(attempt),
            None => self.unscoped.get_or_insert(attempt),
        };
        *slot = (*slot).max(attempt);
    }

    /// The newest attempt a subscriber may hold for `partition`: its own newest marker's, or
    /// the newest unscoped one when it has none.
    pub fn newest_of(&self, partition: i32) -> Option<AttemptRef> {
        self.by_partition.get(&partition).copied().or(self.unscoped)
    }
}

/// How the versions topic's newest marker disagreed with the ledger at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicDisagreement {
    /// The topic holds a newer attempt than the ledger's last (a lost or restored ledger, or a
    /// new machine for the same deployment): its numbering is adopted.
    LedgerBehind { ledger: u64, topic: AttemptRef },
    /// The topic lacks the ledger's last version (it was recreated or lost data): the numbering
    /// goes on and the next version names no attempt it builds on.
    TopicBehind { ledger: u64, topic: Option<u64> },
}

/// A versions topic that this deployment must not publish into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "its newest version ({version}) was published by deployment {theirs:?}, and this one is \
     {ours:?} (kafka.group_id): two deployments would number versions over each other. Give \
     this deployment its own kafka.versions_topic and kafka.embeddings_topic, or run it under \
     the other's group"
)]
pub struct ForeignVersions {
    pub version: u64,
    pub theirs: String,
    pub ours: String,
}

impl Ledger {
    /// Open (or create) the ledger in `dir` and start a new epoch.
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        let path = dir.join("ledger.json");
        let io = |source| LedgerError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt {
                path: path.clone(),
                problem: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerState::default(),
            Err(e) => return Err(io(e)),
        };
        let mut ledger = Ledger {
            path: Some(path),
            state,
            disagreement: None,
            tag: None,
        };
        ledger.new_epoch()?;
        Ok(ledger)
    }

    /// From now on every epoch this ledger takes is `tag` modulo [`EPOCH_TAGS`] (the current one
    /// moves up to the next such): instances of one deployment, each with its own tag (from its
    /// sender name), then never make the same attempt `(version, epoch)`, even when two of them
    /// start the same partition over from the same view of the versions topic (a zombie that
    /// still believes it owns a partition, and its new owner).
    pub fn set_instance_tag(&mut self, tag: u64) -> Result<(), LedgerError> {
        self.tag = Some(tag % EPOCH_TAGS);
        self.state.epoch = self.tagged_at_least(self.state.epoch);
        self.persist()
    }

    /// The smallest epoch at or above `floor` that carries this instance's tag.
    fn tagged_at_least(&self, floor: u64) -> u64 {
        match self.tag {
            None => floor,
            Some(tag) => {
                let base = floor - floor % EPOCH_TAGS + tag;
                if base >= floor {
                    base
                } else {
                    base + EPOCH_TAGS
                }
            }
        }
    }

    /// A ledger that lives only as long as this process (epoch 1, nothing published).
    pub fn in_memory() -> Ledger {
        Ledger {
            path: None,
            state: LedgerState {
                last_version: 0,
                epoch: 1,
                ..LedgerState::default()
            },
            disagreement: None,
            tag: None,
        }
    }

    /// Bring the numbering in line with the versions topic, whose markers are what subscribers
    /// hold (`deployment`: this one's `kafka.group_id`). The topic wins: a newer attempt there
    /// is adopted, a topic without the ledger's last version gets a version carrying every row
    /// and naming nothing it builds on, and the epoch moves past every epoch the topic shows.
    /// A topic whose newest marker another deployment published is refused.
    pub fn reconcile(
        &mut self,
        tail: &VersionsTail,
        deployment: &str,
    ) -> Result<Option<TopicDisagreement>, ReconcileError> {
        if let Some((attempt, Some(theirs))) = &tail.newest {
            if theirs != deployment {
                return Err(ReconcileError::Foreign(ForeignVersions {
                    version: attempt.version,
                    theirs: theirs.clone(),
                    ours: deployment.to_owned(),
                }));
            }
        }
        let s = &mut self.state;
        let ledger = s.last_version;
        let topic = tail.newest.as_ref().map(|(a, _)| *a);
        self.disagreement = match topic {
            Some(t) if t.version > ledger || (t.version == ledger && t.epoch > s.last_epoch) => {
                // A pre-contract-2 ledger (`last_epoch` 0) at the topic's version is in step:
                // it only learns the epoch.
                let in_step = t.version == ledger && s.last_epoch == 0;
                s.last_version = t.version;
                s.last_epoch = t.epoch;
                if s.in_flight.is_some_and(|a| a.version <= t.version) {
                    s.in_flight = None;
                }
                (!in_step).then_some(TopicDisagreement::LedgerBehind { ledger, topic: t })
            }
            Some(t) if t.version == ledger => None,
            None if ledger == 0 => None,
            _ => {
                // What the ledger last committed is not there for subscribers to build on.
                s.last_epoch = 0;
                Some(TopicDisagreement::TopicBehind {
                    ledger,
                    topic: topic.map(|t| t.version),
                })
            }
        };
        s.epoch = s.epoch.max(tail.max_epoch + 1);
        self.state.epoch = self.tagged_at_least(self.state.epoch);
        self.persist().map_err(ReconcileError::Ledger)?;
        Ok(self.disagreement)
    }

    /// How the versions topic disagreed with the ledger at start ([`Self::reconcile`]), if it did.
    pub fn disagreement(&self) -> Option<TopicDisagreement> {
        self.disagreement
    }

    /// Take (and persist) a new epoch: at every start, and after a failed attempt whose rows
    /// may already be on the broker under the old one.
    pub fn new_epoch(&mut self) -> Result<(), LedgerError> {
        self.state.epoch = self.tagged_at_least(self.state.epoch + 1);
        self.persist()
    }

    pub fn state(&self) -> &LedgerState {
        &self.state
    }

    /// Whether versions covering `scope` may go on building on the last committed attempt:
    /// the last committed version covered the same partitions (a ledger from before contract 3
    /// covered all of them), and `tail` shows that attempt as every one of those partitions'
    /// newest. Otherwise another instance published some of them meanwhile, or none of this
    /// ledger's attempts is what subscribers hold, and the next version must be a base
    /// ([`Ledger::rebase`]).
    pub fn continues(&self, scope: &crate::publish::Scope, tail: &VersionsTail) -> bool {
        let same = match &self.state.scope {
            Some(s) => s.partitions == scope.partitions() && s.covered == scope.covered(),
            None => scope.is_whole(),
        };
        let held = self.builds_on();
        same && (scope.covered().iter()).all(|&p| tail.newest_of(p) == held)
    }

    /// The next version starts its partitions over (a base, carrying every row and naming no
    /// attempt it builds on), numbered two above every version `tail` shows for them: above
    /// them, so that no subscriber takes it for a stale one, and not the next number, which the
    /// previous owner of a partition may still be writing records under (a publication it began
    /// before it gave the partition up; its markers are withheld, its records are not), so that
    /// no two instances' records ever share an attempt.
    pub fn rebase(
        &mut self,
        scope: &crate::publish::Scope,
        tail: &VersionsTail,
    ) -> Result<(), LedgerError> {
        let s = &mut self.state;
        let above = (scope.covered().iter())
            .filter_map(|&p| tail.newest_of(p))
            .map(|a| a.version)
            .chain(tail.newest.as_ref().map(|(a, _)| a.version))
            .max()
            .unwrap_or(0);
        s.last_version = s.last_version.max(above + 1);
        s.last_epoch = 0;
        s.epoch = s.epoch.max(tail.max_epoch + 1);
        self.state.epoch = self.tagged_at_least(self.state.epoch);
        self.persist()
    }

    /// The number the next publication uses.
    pub fn next_version(&self) -> u64 {
        self.state.last_version + 1
    }

    /// The committed attempt the next version builds on (`None` before the first version, or
    /// when the ledger predates contract 2 and does not know its epoch).
    pub fn builds_on(&self) -> Option<AttemptRef> {
        let s = &self.state;
        (s.last_version > 0 && s.last_epoch > 0).then_some(AttemptRef {
            version: s.last_version,
            epoch: s.last_epoch,
        })
    }

    /// Record, before its rows go out, that the next version's attempt under the current epoch
    /// is under way.
    pub fn begin(&mut self) -> Result<(), LedgerError> {
        self.state.in_flight = Some(AttemptRef {
            version: self.next_version(),
            epoch: self.state.epoch,
        });
        self.persist()
    }

    /// Record that `version`'s marker was acknowledged (under the current epoch), and that the
    /// versions so far carried the tombstones of the store's first `erasures_published`
    /// erasures.
    pub fn commit(
        &mut self,
        version: u64,
        erasures_published: u64,
        scope: &crate::publish::Scope,
        cursor: u64,
    ) -> Result<(), LedgerError> {
        debug_assert_eq!(version, self.next_version());
        self.state.last_version = version;
        self.state.cursor = cursor;
        self.state.last_epoch = self.state.epoch;
        self.state.erasures_published = erasures_published;
        self.state.in_flight = None;
        self.state.scope = Some(LedgerScope {
            partitions: scope.partitions(),
            covered: scope.covered().to_vec(),
        });
        self.persist()
    }

    fn persist(&self) -> Result<(), LedgerError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(&self.state).expect("state serialises");
        persist::write_atomic(path, &bytes).map_err(|source| LedgerError::Io {
            path: path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::Scope;

    #[test]
    fn the_ledger_continues_numbering_with_a_new_epoch_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            *l.state(),
            LedgerState {
                epoch: 1,
                ..LedgerState::default()
            }
        );
        assert_eq!((l.next_version(), l.builds_on()), (1, None));
        l.commit(1, 0, &Scope::whole(1), 0).unwrap();
        l.begin().unwrap();
        l.commit(2, 1, &Scope::whole(1), 640).unwrap();
        // A crash after version 3's rows but before its marker: 3 is not committed, and its
        // attempt is known to have been under way.
        l.begin().unwrap();
        drop(l);
        let mut l = Ledger::open(dir.path()).unwrap();
        let v3 = AttemptRef {
            version: 3,
            epoch: 1,
        };
        assert_eq!(
            *l.state(),
            LedgerState {
                last_version: 2,
                epoch: 2,
                erasures_published: 1,
                last_epoch: 1,
                in_flight: Some(v3),
                scope: Some(LedgerScope {
                    partitions: 1,
                    covered: vec![0]
                }),
                cursor: 640,
            }
        );
        assert_eq!(
            l.builds_on(),
            Some(AttemptRef {
                version: 2,
                epoch: 1
            })
        );
        // A failed attempt in this process: a new epoch, persisted, the same next number.
        l.new_epoch().unwrap();
        assert_eq!(Ledger::open(dir.path()).unwrap().state().epoch, 4);
        assert_eq!(
            l.next_version(),
            3,
            "retried under the same number, newer epoch"
        );
        l.commit(3, 1, &Scope::whole(1), 0).unwrap();
        assert_eq!(l.state().in_flight, None, "committed");
        assert_eq!((l.state().last_epoch, l.builds_on().unwrap().epoch), (3, 3));
        // A ledger from before erasures has no count (none were published), and one from
        // before contract 2 no epoch of its last version (its next marker names none).
        std::fs::write(
            dir.path().join("ledger.json"),
            br#"{"last_version":5,"epoch":7}"#,
        )
        .unwrap();
        let old = Ledger::open(dir.path()).unwrap();
        assert_eq!(old.state().erasures_published, 0);
        assert_eq!(old.builds_on(), None);
        std::fs::write(dir.path().join("ledger.json"), b"{").unwrap();
        let err = Ledger::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("ledger.json") && err.contains("corrupt"),
            "{err}"
        );
    }

    /// Two instances that start the same partitions over from the same view of the topic take
    /// different epochs (the faults test found both making attempt 32, epoch 8: the zombie's
    /// unmarked records then counted toward its successor's marker).
    #[test]
    fn tagged_instances_never_take_the_same_epoch() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut a, mut b) = (
            Ledger::open(a_dir.path()).unwrap(),
            Ledger::open(b_dir.path()).unwrap(),
        );
        a.set_instance_tag(0x1234_0007).unwrap();
        b.set_instance_tag(0x9999_0009).unwrap();
        assert_eq!((a.state().epoch, b.state().epoch), (7, 9));
        let scope = crate::publish::Scope::whole(8);
        let tail = VersionsTail {
            newest: Some((
                AttemptRef {
                    version: 30,
                    epoch: 7,
                },
                None,
            )),
            max_epoch: 7,
            ..VersionsTail::default()
        };
        a.rebase(&scope, &tail).unwrap();
        b.rebase(&scope, &tail).unwrap();
        assert_eq!((a.next_version(), b.next_version()), (32, 32));
        assert_eq!((a.state().epoch, b.state().epoch), (EPOCH_TAGS + 7, 9));
        a.new_epoch().unwrap();
        assert_eq!(
            a.state().epoch,
            2 * EPOCH_TAGS + 7,
            "always above, always its tag"
        );
        // Reopened, the epoch moves on and keeps the tag once set again.
        let mut a = Ledger::open(a_dir.path()).unwrap();
        a.set_instance_tag(0x1234_0007).unwrap();
        assert_eq!(a.state().epoch, 3 * EPOCH_TAGS + 7);
    }

    fn marker(version: u64, epoch: u64, deployment: Option<&str>) -> VersionMarker {
        VersionMarker {
            deployment: deployment.map(str::to_owned),
            ..VersionMarker::new(version, epoch, 1)
        }
    }

    fn tail(markers: &[VersionMarker]) -> VersionsTail {
        let mut tail = VersionsTail::default();
        for m in markers {
            tail.observe(m);
        }
        tail
    }

    fn attempt(version: u64, epoch: u64) -> AttemptRef {
        AttemptRef { version, epoch }
    }

    /// A ledger that committed versions 1 to 4 under epoch 2 in `dir`, opened again (epoch 3).
    fn ledger_at_4(dir: &Path) -> Ledger {
        let mut l = Ledger::open(dir).unwrap();
        l.new_epoch().unwrap();
        for v in 1..=4 {
            l.commit(v, 0, &Scope::whole(1), 0).unwrap();
        }
        drop(l);
        Ledger::open(dir).unwrap()
    }

    #[test]
    fn a_ledger_in_step_with_its_topic_keeps_its_numbering_and_its_reference() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger_at_4(dir.path());
        let t = tail(&[marker(3, 2, Some("g")), marker(4, 2, Some("g"))]);
        assert_eq!(l.reconcile(&t, "g").unwrap(), None);
        assert_eq!((l.next_version(), l.builds_on()), (5, Some(attempt(4, 2))));
        assert_eq!(l.state().epoch, 3);
        assert_eq!(l.disagreement(), None);
        // A fresh ledger on an empty topic, and markers from before `deployment`.
        let fresh = tempfile::tempdir().unwrap();
        let mut f = Ledger::open(fresh.path()).unwrap();
        assert_eq!(f.reconcile(&VersionsTail::default(), "g").unwrap(), None);
        assert_eq!(f.next_version(), 1);
        let old_dir = tempfile::tempdir().unwrap();
        let mut old = ledger_at_4(old_dir.path());
        assert_eq!(
            old.reconcile(&tail(&[marker(4, 2, None)]), "g").unwrap(),
            None
        );
    }

    #[test]
    fn a_lost_ledger_adopts_the_topics_numbering_with_a_newer_epoch_and_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        // Markers in any order; the newest attempt is the highest version's highest epoch.
        let t = tail(&[
            marker(41, 9, Some("g")),
            marker(42, 7, Some("g")),
            marker(42, 8, Some("g")),
        ]);
        assert_eq!(t.max_epoch, 9);
        assert_eq!(
            l.reconcile(&t, "g").unwrap(),
            Some(TopicDisagreement::LedgerBehind {
                ledger: 0,
                topic: attempt(42, 8)
            })
        );
        assert_eq!(
            (l.next_version(), l.builds_on()),
            (43, Some(attempt(42, 8)))
        );
        assert_eq!(l.state().epoch, 10, "newer than any attempt on the topic");
        assert!(l.disagreement().is_some());
        // Persisted: the next start is in step.
        let mut again = Ledger::open(dir.path()).unwrap();
        assert_eq!(again.reconcile(&t, "g").unwrap(), None);
        assert_eq!(again.state().epoch, 11);
        // A lost acknowledgement of version 5's marker, found on the topic: adopted.
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger_at_4(dir.path());
        l.begin().unwrap();
        assert_eq!(l.state().in_flight, Some(attempt(5, 3)));
        let t = tail(&[marker(4, 2, Some("g")), marker(5, 3, Some("g"))]);
        assert!(l.reconcile(&t, "g").unwrap().is_some());
        assert_eq!(
            (l.builds_on(), l.state().in_flight),
            (Some(attempt(5, 3)), None)
        );
        assert_eq!(l.state().epoch, 4);
    }

    #[test]
    fn a_topic_without_the_ledgers_last_version_gets_every_row_building_on_nothing() {
        for t in [VersionsTail::default(), tail(&[marker(2, 1, Some("g"))])] {
            let dir = tempfile::tempdir().unwrap();
            let mut l = ledger_at_4(dir.path());
            let topic = t.newest.as_ref().map(|(a, _)| a.version);
            assert_eq!(
                l.reconcile(&t, "g").unwrap(),
                Some(TopicDisagreement::TopicBehind { ledger: 4, topic })
            );
            assert_eq!((l.next_version(), l.builds_on()), (5, None));
        }
    }

    #[test]
    fn a_topic_another_deployment_publishes_into_is_refused_and_the_ledger_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = ledger_at_4(dir.path());
        let before = l.state().clone();
        let t = tail(&[marker(4, 2, Some("g")), marker(9, 2, Some("ads"))]);
        match l.reconcile(&t, "g") {
            Err(ReconcileError::Foreign(f)) => assert_eq!(
                f,
                ForeignVersions {
                    version: 9,
                    theirs: "ads".into(),
                    ours: "g".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Ledger::open(dir.path()).unwrap().state().last_version,
            before.last_version
        );
    }

    #[test]
    fn a_ledger_continues_only_the_partitions_it_published_last_and_rebases_above_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        let all = Scope::whole(4);
        l.commit(1, 0, &all, 0).unwrap();
        l.commit(2, 0, &all, 0).unwrap();
        let scoped = |v, e, p| VersionMarker::for_partition(v, e, 1, p, 4);
        let mine = tail(&(0..4).map(|p| scoped(2, 1, p)).collect::<Vec<_>>());
        assert!(l.continues(&all, &mine));
        let half = Scope::owned(
            4,
            &crate::partition::Owned {
                generation: 3,
                partitions: vec![0, 1],
            },
        );
        assert!(!l.continues(&half, &mine), "another set of partitions");
        // Another instance owned partitions 2 and 3 meanwhile and published them up to 7.
        let shared = tail(&[
            scoped(2, 1, 0),
            scoped(2, 1, 1),
            scoped(6, 5, 2),
            scoped(7, 5, 3),
        ]);
        assert!(!l.continues(&all, &shared));
        l.rebase(&all, &shared).unwrap();
        assert_eq!(
            (l.next_version(), l.builds_on(), l.state().epoch),
            (9, None, 6),
            "a base two above every version of its partitions, above every epoch"
        );
        // A ledger from before contract 3 (no scope) covered every partition: it continues the
        // unscoped chain when it still owns them all.
        std::fs::write(
            dir.path().join("ledger.json"),
            br#"{"last_version":4,"epoch":3,"last_epoch":2}"#,
        )
        .unwrap();
        let old = Ledger::open(dir.path()).unwrap();
        let unscoped = tail(&[marker(3, 2, Some("g")), marker(4, 2, Some("g"))]);
        assert!(old.continues(&Scope::whole(8), &unscoped));
        assert!(!old.continues(&half, &unscoped));
    }
}
