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
use crate::publish::AttemptRef;

/// The persisted numbering state (`<publish.path>/ledger.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
        };
        ledger.new_epoch()?;
        Ok(ledger)
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
        }
    }

    /// Take (and persist) a new epoch: at every start, and after a failed attempt whose rows
    /// may already be on the broker under the old one.
    pub fn new_epoch(&mut self) -> Result<(), LedgerError> {
        self.state.epoch += 1;
        self.persist()
    }

    pub fn state(&self) -> LedgerState {
        self.state
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
    pub fn commit(&mut self, version: u64, erasures_published: u64) -> Result<(), LedgerError> {
        debug_assert_eq!(version, self.next_version());
        self.state.last_version = version;
        self.state.last_epoch = self.state.epoch;
        self.state.erasures_published = erasures_published;
        self.state.in_flight = None;
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

    #[test]
    fn the_ledger_continues_numbering_with_a_new_epoch_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            l.state(),
            LedgerState {
                epoch: 1,
                ..LedgerState::default()
            }
        );
        assert_eq!((l.next_version(), l.builds_on()), (1, None));
        l.commit(1, 0).unwrap();
        l.begin().unwrap();
        l.commit(2, 1).unwrap();
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
            l.state(),
            LedgerState {
                last_version: 2,
                epoch: 2,
                erasures_published: 1,
                last_epoch: 1,
                in_flight: Some(v3),
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
        l.commit(3, 1).unwrap();
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
}
