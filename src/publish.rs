//! Publishing versions (DESIGN §3): the wire formats of embedding rows and version markers, the
//! ledger that numbers versions across restarts, and the choice of rows a version carries. The
//! contract is documented in `topics/README.md`.
//!
//! Numbering: the ledger records the last version whose marker the broker acknowledged and the
//! publisher's epoch, which grows by one at every start and after every failed attempt (the
//! publisher reopens the ledger). The next version is always
//! `last + 1`; a publication cut short (rows out, no marker) is retried under the same number
//! with a newer epoch, and a subscriber, which applies a `(version, epoch)` only when its marker
//! and all its rows are in, never mixes the two. So a restart never republishes an older number
//! and never skips one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How embedding rows are encoded (`publish.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// `{"version":…,"epoch":…,"ts":…,"vector":[…]}`
    Json,
    /// `b"TWE1"`, version u64, epoch u64, ts i64, dim u32, then `dim` f32, all little-endian.
    F32le,
}

/// One published embedding row (a node's or a relation's vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    pub version: u64,
    pub epoch: u64,
    /// Event time (ms) of the newest event that touched the row (for a relation: the newest
    /// event the version reflects).
    pub ts: i64,
    pub vector: Vec<f32>,
}

/// The marker written after all of a version's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMarker {
    pub version: u64,
    pub epoch: u64,
    /// Rows (nodes and relations) this version and epoch published.
    pub rows: u64,
    /// Drift figures of the version (absent when the publisher measured none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align: Option<crate::align::AlignFigures>,
}

const F32LE_MAGIC: &[u8; 4] = b"TWE1";
const F32LE_HEADER: usize = 4 + 8 + 8 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("row payload: {0}")]
    Json(String),
    #[error("row payload: f32le record of {len} bytes: {problem}")]
    Binary { len: usize, problem: &'static str },
}

impl RowRecord {
    pub fn encode(&self, format: ValueFormat) -> Vec<u8> {
        match format {
            ValueFormat::Json => serde_json::to_vec(self).expect("a row serialises"),
            ValueFormat::F32le => {
                let mut out = Vec::with_capacity(F32LE_HEADER + 4 * self.vector.len());
                out.extend_from_slice(F32LE_MAGIC);
                out.extend_from_slice(&self.version.to_le_bytes());
                out.extend_from_slice(&self.epoch.to_le_bytes());
                out.extend_from_slice(&self.ts.to_le_bytes());
                out.extend_from_slice(&(self.vector.len() as u32).to_le_bytes());
                for v in &self.vector {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out
            }
        }
    }

    /// Decode either format (the f32le magic tells them apart).
    pub fn decode(bytes: &[u8]) -> Result<RowRecord, DecodeError> {
        if !bytes.starts_with(F32LE_MAGIC) {
            return serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()));
        }
        let bad = |problem| DecodeError::Binary {
            len: bytes.len(),
            problem,
        };
        if bytes.len() < F32LE_HEADER {
            return Err(bad("shorter than the header"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let dim = u32::from_le_bytes(bytes[28..32].try_into().expect("4")) as usize;
        let body = &bytes[F32LE_HEADER..];
        if body.len() != dim * 4 {
            return Err(bad("length does not match its dimension"));
        }
        Ok(RowRecord {
            version: u64_at(4),
            epoch: u64_at(12),
            ts: u64_at(20) as i64,
            vector: body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        })
    }
}

impl VersionMarker {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<VersionMarker, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))
    }
}

/// Indices of the rows a version carries: every row of `current [N, D]` beyond the `reference`
/// (new nodes), plus those whose relative change `‖c_i − r_i‖ / ‖r_i‖` exceeds `threshold`.
/// A non-finite row always counts as moved (the gate, not this, decides whether to publish).
pub fn rows_to_publish(current: &Tensor, reference: &Tensor, threshold: f64) -> Vec<i64> {
    let n = current.size()[0];
    let m = reference.size()[0].min(n);
    let mut out: Vec<i64> = tch::no_grad(|| {
        if m == 0 {
            return Vec::new();
        }
        let c = current.narrow(0, 0, m);
        let change = (&c - reference.narrow(0, 0, m))
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            .sqrt();
        let base = reference
            .narrow(0, 0, m)
            .square()
            .sum_dim_intlist(1, false, Kind::Float)
            .sqrt()
            .clamp_min(1e-12);
        let rel = change / base;
        let moved = rel.gt(threshold).logical_or(&rel.isfinite().logical_not());
        Vec::<i64>::try_from(moved.nonzero().view([-1]).to_device(tch::Device::Cpu))
            .expect("indices")
    });
    out.extend(m..n);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// What `<stem>.json` records beside `<stem>.pt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u64,
    pub tables: usize,
}

fn snapshot_error(path: &Path, problem: impl ToString) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

/// Write a snapshot of published parameters as `<dir>/<stem>.pt` (tensors) and
/// `<dir>/<stem>.json` (the version), each through a fsynced temporary file and a rename; the
/// metadata goes last, so a crash leaves either the old pair or a new `.pt` that the old
/// metadata does not match by table count or version (and [`load_snapshot`] then reports it).
pub fn save_snapshot(
    dir: &Path,
    stem: &str,
    version: u64,
    s: &crate::align::Snapshot,
) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(|e| snapshot_error(dir, e))?;
    let mut named: Vec<(String, Tensor)> = s
        .tables
        .iter()
        .enumerate()
        .map(|(t, x)| (format!("table.{t}"), x.shallow_clone()))
        .collect();
    named.push(("relations".into(), s.relations.shallow_clone()));
    named.push(("version".into(), Tensor::from_slice(&[version as i64])));
    let pt = dir.join(format!("{stem}.pt"));
    let tmp = dir.join(format!("{stem}.pt.tmp"));
    Tensor::save_multi(&named, &tmp).map_err(|e| snapshot_error(&tmp, e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .and_then(|_| fs::rename(&tmp, &pt))
        .map_err(|e| snapshot_error(&pt, e))?;
    let meta = SnapshotMeta {
        version,
        tables: s.tables.len(),
    };
    let json = dir.join(format!("{stem}.json"));
    let tmp = dir.join(format!("{stem}.json.tmp"));
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&serde_json::to_vec(&meta).expect("plain data"))?;
            f.sync_all()
        })
        .and_then(|_| fs::rename(&tmp, &json))
        .and_then(|_| File::open(dir).and_then(|d| d.sync_all()))
        .map_err(|e| snapshot_error(&json, e))
}

/// Read a snapshot written by [`save_snapshot`]; `Ok(None)` when there is none. The tensors'
/// own version must match the metadata's.
pub fn load_snapshot(
    dir: &Path,
    stem: &str,
) -> Result<Option<(SnapshotMeta, crate::align::Snapshot)>, SnapshotError> {
    let json = dir.join(format!("{stem}.json"));
    let meta: SnapshotMeta = match fs::read(&json) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| snapshot_error(&json, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(snapshot_error(&json, e)),
    };
    let pt = dir.join(format!("{stem}.pt"));
    let named = Tensor::load_multi(&pt).map_err(|e| snapshot_error(&pt, e))?;
    let mut by_name: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
    let mut take = |name: &str| {
        by_name
            .remove(name)
            .ok_or_else(|| snapshot_error(&pt, format!("no tensor {name:?}")))
    };
    let version = take("version")?.int64_value(&[0]) as u64;
    if version != meta.version {
        return Err(snapshot_error(
            &pt,
            format!(
                "holds version {version}, {} says {}",
                json.display(),
                meta.version
            ),
        ));
    }
    let tables = (0..meta.tables)
        .map(|t| take(&format!("table.{t}")))
        .collect::<Result<Vec<_>, _>>()?;
    let relations = take("relations")?;
    Ok(Some((meta, crate::align::Snapshot { tables, relations })))
}

/// The persisted numbering state (`<publish.path>/ledger.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LedgerState {
    /// The last version whose marker the broker acknowledged (0: none yet).
    pub last_version: u64,
    /// The publisher's epoch for this process.
    pub epoch: u64,
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
    path: PathBuf,
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
        let mut ledger = Ledger { path, state };
        ledger.new_epoch()?;
        Ok(ledger)
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

    /// Record that `version`'s marker was acknowledged.
    pub fn commit(&mut self, version: u64) -> Result<(), LedgerError> {
        debug_assert_eq!(version, self.next_version());
        self.state.last_version = version;
        self.persist()
    }

    /// Write to a temporary file, fsync, rename over the ledger, fsync the folder.
    fn persist(&self) -> Result<(), LedgerError> {
        let io = |source| LedgerError::Io {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec(&self.state).expect("state serialises"))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RowRecord {
        RowRecord {
            version: 12,
            epoch: 3,
            ts: 1_732_190_000_123,
            vector: vec![0.0132, -0.2215, 0.4071],
        }
    }

    #[test]
    fn rows_round_trip_in_both_formats() {
        for format in [ValueFormat::Json, ValueFormat::F32le] {
            assert_eq!(RowRecord::decode(&row().encode(format)).unwrap(), row());
        }
        // The documented JSON shape.
        let json: serde_json::Value =
            serde_json::from_slice(&row().encode(ValueFormat::Json)).unwrap();
        assert_eq!(json["version"], 12);
        assert_eq!(json["epoch"], 3);
        assert_eq!(json["vector"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn golden_f32le_layout() {
        let bytes = row().encode(ValueFormat::F32le);
        assert_eq!(bytes.len(), 32 + 12);
        assert_eq!(&bytes[..4], b"TWE1");
        assert_eq!(bytes[4], 12, "version, little-endian");
        assert_eq!(bytes[12], 3, "epoch");
        assert_eq!(&bytes[28..32], &[3, 0, 0, 0], "dimension");
        assert_eq!(&bytes[32..36], &0.0132f32.to_le_bytes());
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let mut bytes = row().encode(ValueFormat::F32le);
        bytes.pop();
        assert!(matches!(
            RowRecord::decode(&bytes),
            Err(DecodeError::Binary { .. })
        ));
        assert!(RowRecord::decode(b"TWE1").is_err());
        assert!(RowRecord::decode(b"{\"version\":1}").is_err());
        assert!(VersionMarker::decode(b"[]").is_err());
    }

    #[test]
    fn a_version_carries_moved_and_new_rows() {
        let reference = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).view([3, 2]);
        // Row 0 moves 5%, row 1 moves 50%, row 2 turns non-finite, row 3 is new.
        let current =
            Tensor::from_slice(&[1.05f32, 0.0, 0.0, 1.5, f32::NAN, 1.0, 7.0, 7.0]).view([4, 2]);
        assert_eq!(rows_to_publish(&current, &reference, 0.1), vec![1, 2, 3]);
        assert_eq!(
            rows_to_publish(&current, &reference, 0.01),
            vec![0, 1, 2, 3]
        );
        let empty = Tensor::zeros([0, 2], (Kind::Float, tch::Device::Cpu));
        assert_eq!(rows_to_publish(&current, &empty, 0.1), vec![0, 1, 2, 3]);
    }

    #[test]
    fn snapshots_round_trip_and_a_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_snapshot(dir.path(), "reference").unwrap().is_none());
        let s = crate::align::Snapshot {
            tables: vec![
                Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]),
                Tensor::zeros([0, 2], (Kind::Float, tch::Device::Cpu)),
            ],
            relations: Tensor::from_slice(&[0.5f32, -0.5]).view([1, 2]),
        };
        save_snapshot(dir.path(), "reference", 7, &s).unwrap();
        let (meta, back) = load_snapshot(dir.path(), "reference").unwrap().unwrap();
        assert_eq!(
            meta,
            SnapshotMeta {
                version: 7,
                tables: 2
            }
        );
        assert!(back.tables[0].equal(&s.tables[0]) && back.relations.equal(&s.relations));
        assert_eq!(back.tables[1].size(), vec![0, 2]);
        // Tensors from another version than the metadata names (a crash between the renames).
        std::fs::write(
            dir.path().join("reference.json"),
            br#"{"version":8,"tables":2}"#,
        )
        .unwrap();
        let err = load_snapshot(dir.path(), "reference")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("holds version 7"), "{err}");
    }

    #[test]
    fn the_ledger_continues_numbering_with_a_new_epoch_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            l.state(),
            LedgerState {
                last_version: 0,
                epoch: 1
            }
        );
        assert_eq!(l.next_version(), 1);
        l.commit(1).unwrap();
        l.commit(2).unwrap();
        // A crash after version 3's rows but before its marker: 3 is not committed.
        drop(l);
        let mut l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            l.state(),
            LedgerState {
                last_version: 2,
                epoch: 2
            }
        );
        // A failed attempt in this process: a new epoch, persisted, the same next number.
        l.new_epoch().unwrap();
        assert_eq!(Ledger::open(dir.path()).unwrap().state().epoch, 4);
        assert_eq!(
            l.next_version(),
            3,
            "retried under the same number, newer epoch"
        );
        std::fs::write(dir.path().join("ledger.json"), b"{").unwrap();
        let err = Ledger::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("ledger.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
