//! A [`Snapshot`]: the tables and relation vectors at a moment, on the CPU, and its file form
//! (the aligner's anchor, the published reference).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::exchange::{GradientsApplied, WindowAttempt};
use crate::persist;
use crate::train::NodeGradient;

/// One model state's parameters on the CPU.
#[derive(Debug)]
pub struct Snapshot {
    /// Per node type, `[rows, D]`.
    pub tables: Vec<Tensor>,
    pub relations: Tensor,
}

impl Snapshot {
    /// Share the tensors (no copy).
    pub fn shallow_clone(&self) -> Snapshot {
        Snapshot {
            tables: self.tables.iter().map(Tensor::shallow_clone).collect(),
            relations: self.relations.shallow_clone(),
        }
    }

    pub fn rotated(&self, r: &Tensor) -> Snapshot {
        Snapshot {
            tables: self.tables.iter().map(|t| t.matmul(r)).collect(),
            relations: self.relations.matmul(r),
        }
    }
}

/// What a version asks of the trainer while training pauses ([`crate::train::TrainerCore::take_delta`]).
#[derive(Debug, Default)]
pub struct DeltaRequest {
    /// Every live row, not just the changed ones (no reference yet, or the last attempt failed
    /// after the changed rows were taken).
    pub full: bool,
    /// Row samples whose current values the drift measures need: per sample, per node type,
    /// row indices (Int64, CPU; rows the table does not have are left out).
    pub samples: Vec<Vec<Tensor>>,
    /// With the gradient exchange: the window the version's gradients go out as (the local
    /// learning on rows owned elsewhere is remembered under it until their owner applied it).
    pub window: Option<WindowAttempt>,
}

/// One node type's part of a [`ModelDelta`].
#[derive(Debug)]
pub struct TableDelta {
    /// Live rows of the table now.
    pub len: i64,
    /// The rows written since the previous delta (every row for a full delta, and always every
    /// row of a biased type), ascending: indices `[k]` (Int64, CPU) and values `[k, D]`.
    pub index: Tensor,
    pub values: Tensor,
    /// Newest event time (ms) of each of those rows, in the same order.
    pub ts: Vec<i64>,
    /// Every live row's target bias, when the type carries one.
    pub biases: Option<Tensor>,
}

/// What changed in the model since the previous delta, on the CPU: what a version is built from.
/// Its size follows the change (the rows training wrote), not the table.
#[derive(Debug)]
pub struct ModelDelta {
    pub tables: Vec<TableDelta>,
    pub relations: Tensor,
    /// Per requested sample, per node type: `(indices kept, their current values)`.
    pub samples: Vec<Vec<(Tensor, Tensor)>>,
    /// Every stored edge before this sequence number is trained in.
    pub cursor: u64,
    /// With the gradient exchange: what the version sends and says.
    pub exchange: DeltaExchange,
}

/// The gradient exchange's part of a [`ModelDelta`].
#[derive(Debug, Default)]
pub struct DeltaExchange {
    /// The gradients of rows other instances own, summed per node since the previous take (the
    /// version sends them to their owners).
    pub gradients: Vec<NodeGradient>,
    /// Per partition this instance owns, the newest window of each sender applied to its rows
    /// (each partition's marker says it, `gradients_applied`).
    pub applied: BTreeMap<i32, GradientsApplied>,
    /// Per partition this instance owns, its relation delta where the version carries it
    /// ([`crate::train::RelationShares::take`]).
    pub relation_deltas: BTreeMap<i32, Vec<f32>>,
    /// Per node type, the rows (Int64, CPU) started at a partition's previous owner's
    /// published values since the last take: the version publishes them whatever they moved.
    pub taken_over: Vec<Tensor>,
}

impl ModelDelta {
    /// Changed rows over all types.
    pub fn changed_rows(&self) -> i64 {
        self.tables.iter().map(|t| t.index.size()[0]).sum()
    }
}

/// Rows (of all tables) and relation vectors holding a non-finite value.
pub(crate) fn non_finite_rows(s: &Snapshot) -> i64 {
    non_finite_in(s.tables.iter().chain(std::iter::once(&s.relations)))
}

/// Rows of the `[n, D]` tensors holding a non-finite value.
pub(crate) fn non_finite_in<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> i64 {
    tensors
        .into_iter()
        .filter(|t| t.numel() > 0)
        .map(|t| {
            t.isfinite()
                .all_dim(1, false)
                .logical_not()
                .sum(Kind::Int64)
                .int64_value(&[])
        })
        .sum()
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// What `<stem>.json` records beside `<stem>.pt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotMeta {
    pub version: u64,
    pub tables: usize,
}

fn snapshot_error(path: &Path, problem: impl ToString) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

/// Write a snapshot of published parameters as `<dir>/<stem>.pt`: the tensors with their
/// version inside, through a fsynced temporary file and a rename, so a crash leaves the old
/// snapshot or the new one whole. `<dir>/<stem>.json` follows as a summary for people and
/// scripts; [`load_snapshot`] reads only the `.pt`, so a crash between the two renames (a new
/// `.pt` beside the old summary) loses nothing.
pub(crate) fn save_snapshot(
    dir: &Path,
    stem: &str,
    version: u64,
    s: &Snapshot,
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
    persist::replace_with(&pt, |tmp| {
        Tensor::save_multi(&named, tmp).map_err(std::io::Error::other)
    })
    .map_err(|e| snapshot_error(&pt, e))?;
    let meta = SnapshotMeta {
        version,
        tables: s.tables.len(),
    };
    let json = dir.join(format!("{stem}.json"));
    persist::write_atomic(&json, &serde_json::to_vec(&meta).expect("plain data"))
        .map_err(|e| snapshot_error(&json, e))
}

/// Read a snapshot written by [`save_snapshot`]; `Ok(None)` when there is none. Its version and
/// table count come from the `.pt` itself.
pub(crate) fn load_snapshot(
    dir: &Path,
    stem: &str,
) -> Result<Option<(SnapshotMeta, Snapshot)>, SnapshotError> {
    let pt = dir.join(format!("{stem}.pt"));
    if !pt.exists() {
        return Ok(None);
    }
    let named = Tensor::load_multi(&pt).map_err(|e| snapshot_error(&pt, e))?;
    let mut by_name: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
    let mut take = |name: &str| {
        by_name
            .remove(name)
            .ok_or_else(|| snapshot_error(&pt, format!("no tensor {name:?}")))
    };
    let version = take("version")?.int64_value(&[0]) as u64;
    let relations = take("relations")?;
    let mut tables = Vec::new();
    while let Some(t) = by_name.remove(&format!("table.{}", tables.len())) {
        tables.push(t);
    }
    if let Some(stray) = by_name.keys().next() {
        return Err(snapshot_error(
            &pt,
            format!(
                "tensor {stray:?} is not part of a snapshot of {} tables",
                tables.len()
            ),
        ));
    }
    let meta = SnapshotMeta {
        version,
        tables: tables.len(),
    };
    Ok(Some((meta, Snapshot { tables, relations })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_the_tensors_version_wins_over_a_stale_summary() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_snapshot(dir.path(), "reference").unwrap().is_none());
        let s = Snapshot {
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
        // A crash between the two renames: a new `.pt` beside the previous summary. The
        // tensors are whole and carry their version, so they are what is read back.
        std::fs::write(
            dir.path().join("reference.json"),
            br#"{"version":6,"tables":2}"#,
        )
        .unwrap();
        let (meta, _) = load_snapshot(dir.path(), "reference").unwrap().unwrap();
        assert_eq!(meta.version, 7);
        // A file that is not a snapshot is named.
        std::fs::write(dir.path().join("reference.pt"), b"not tensors").unwrap();
        let err = load_snapshot(dir.path(), "reference")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("reference.pt"), "{err}");
    }
}
