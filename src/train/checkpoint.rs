//! Versioned, atomic checkpoints of the model (PyTorch-BigGraph's scheme): write a new version
//! folder, fsync it, then switch the `CURRENT` pointer (written to a temporary file, fsynced,
//! renamed, folder fsynced), and prune to the newest `keep`.
//!
//! A version is `ckpt-<version>/` holding `tensors.ot` (tables, their Adagrad state, relations
//! and theirs) and `meta.json` (written last: version, trainer cursor, schema fingerprint,
//! dimension, row counts, and the CRC-32 of `tensors.ot`). Loading starts from `CURRENT` and falls
//! back to older versions when one is partial or corrupt, saying which and why.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use tracing::warn;

use crate::exchange::ExchangePosition;
use crate::persist;
use crate::train::Embeddings;

const POINTER: &str = "CURRENT";
const TENSORS: &str = "tensors.ot";
const META: &str = "meta.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, problem: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// What a checkpoint records beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub version: u64,
    /// The store sequence number up to which edges were trained.
    pub cursor: u64,
    /// Identifies the schema the tables were indexed by; a mismatch refuses the checkpoint.
    pub schema_fingerprint: u32,
    pub dim: i64,
    pub rows: Vec<i64>,
    pub tensors_crc32: u32,
    /// With the gradient exchange: where the gradients topic is read from and which windows
    /// are in these tables (absent in checkpoints written without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<ExchangePosition>,
}

/// A loaded checkpoint, and the newer ones that were found unusable on the way to it.
pub struct Restored {
    pub meta: CheckpointMeta,
    pub model: Embeddings,
    pub unusable: Vec<UnusableCheckpoint>,
}

/// A checkpoint a restart skipped, and why (`/v1/status`'s `trainer.resumed_from.unusable`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnusableCheckpoint {
    pub version: u64,
    pub error: String,
}

/// Where a restarted trainer began (`/v1/status`'s `trainer.resumed_from`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResumedFrom {
    /// The checkpoint loaded.
    pub version: u64,
    /// Its cursor: the store sequence number of the next edge trained.
    pub cursor: u64,
    /// Newer checkpoints skipped because they were unusable, newest first.
    pub unusable: Vec<UnusableCheckpoint>,
}

/// CRC-32 of a schema's names (node types, then relations with their endpoint types).
pub fn schema_fingerprint(schema: &crate::store::StoredSchema) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for t in &schema.node_types {
        h.update(t.as_bytes());
        h.update(&[0]);
    }
    for (name, src, dst) in &schema.relations {
        for part in std::iter::once(name).chain(src).chain(dst) {
            h.update(part.as_bytes());
            h.update(&[1]);
        }
        h.update(&[2]);
    }
    h.finalize()
}

/// Checkpoints under one folder.
pub struct Checkpoints {
    dir: PathBuf,
    keep: usize,
}

impl Checkpoints {
    pub fn new(dir: &Path, keep: usize) -> Checkpoints {
        Checkpoints {
            dir: dir.to_owned(),
            keep: keep.max(1),
        }
    }

    fn version_dir(&self, version: u64) -> PathBuf {
        self.dir.join(format!("ckpt-{version:012}"))
    }

    /// Versions present on disk, newest first.
    fn versions(&self) -> Result<Vec<u64>, CheckpointError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let mut out: Vec<u64> = fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("ckpt-")?.parse().ok())
            .collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// Write `model` as the next version and make it current. Returns the version number.
    pub fn save(
        &self,
        model: &Embeddings,
        cursor: u64,
        schema_fingerprint: u32,
    ) -> Result<u64, CheckpointError> {
        self.save_with(model, cursor, schema_fingerprint, None)
    }

    /// [`Checkpoints::save`] with the gradient exchange's position.
    pub fn save_with(
        &self,
        model: &Embeddings,
        cursor: u64,
        schema_fingerprint: u32,
        exchange: Option<&ExchangePosition>,
    ) -> Result<u64, CheckpointError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let version = self.versions()?.first().map_or(1, |v| v + 1);
        let dir = self.version_dir(version);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        fs::create_dir_all(&dir).map_err(io(&dir))?;

        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (t, table) in model.tables.iter().enumerate() {
            named.push((format!("table.{t}"), table.rows().to_device(Device::Cpu)));
            named.push((
                format!("state.{t}"),
                table.state.narrow(0, 0, table.len()).to_device(Device::Cpu),
            ));
            // Only tables that carry a bias write one: without biases the file is as before.
            if table.biased {
                named.push((format!("bias.{t}"), table.biases().to_device(Device::Cpu)));
                named.push((
                    format!("bias_state.{t}"),
                    table
                        .bias_state
                        .narrow(0, 0, table.len())
                        .to_device(Device::Cpu),
                ));
            }
        }
        named.push(("relations".into(), model.relations.to_device(Device::Cpu)));
        named.push((
            "relation_state".into(),
            model.relation_state.to_device(Device::Cpu),
        ));
        // Only a model with reverse relations writes them: without, the file is as before.
        if let Some(rev) = &model.reverse {
            named.push((
                "reverse_relations".into(),
                rev.relations.to_device(Device::Cpu),
            ));
            named.push((
                "reverse_relation_state".into(),
                rev.state.to_device(Device::Cpu),
            ));
        }
        let tensors = dir.join(TENSORS);
        Tensor::save_multi(&named, &tensors).map_err(|e| invalid(&tensors, e.to_string()))?;
        let crc = file_crc32(&tensors)?;
        File::open(&tensors)
            .and_then(|f| f.sync_all())
            .map_err(io(&tensors))?;

        let meta = CheckpointMeta {
            version,
            cursor,
            schema_fingerprint,
            dim: model.dim,
            rows: model.tables.iter().map(|t| t.len()).collect(),
            tensors_crc32: crc,
            exchange: exchange.cloned(),
        };
        let meta_path = dir.join(META);
        persist::write_synced(
            &meta_path,
            &serde_json::to_vec_pretty(&meta).expect("plain data"),
        )
        .map_err(io(&meta_path))?;
        persist::sync_dir(&dir).map_err(io(&dir))?;

        let pointer = self.dir.join(POINTER);
        persist::write_atomic(&pointer, format!("ckpt-{version:012}\n").as_bytes())
            .map_err(io(&pointer))?;

        for old in self.versions()?.into_iter().skip(self.keep) {
            let d = self.version_dir(old);
            fs::remove_dir_all(&d).map_err(io(&d))?;
        }
        Ok(version)
    }

    /// Load the newest usable checkpoint: the one `CURRENT` names, else older ones. `Ok(None)`
    /// when there is none at all.
    pub fn load(
        &self,
        schema_fingerprint: u32,
        device: Device,
    ) -> Result<Option<Restored>, CheckpointError> {
        let mut candidates = self.versions()?;
        let pointer = self.dir.join(POINTER);
        if let Ok(text) = fs::read_to_string(&pointer) {
            if let Some(v) = text
                .trim()
                .strip_prefix("ckpt-")
                .and_then(|v| v.parse::<u64>().ok())
            {
                // The pointer's version first; versions newer than it were never made current.
                candidates.retain(|&c| c <= v);
                candidates.sort_unstable_by_key(|&c| (c != v, std::cmp::Reverse(c)));
            }
        }
        let mut last_error = None;
        let mut unusable = Vec::new();
        for v in candidates {
            let dir = self.version_dir(v);
            match self.load_version(&dir, schema_fingerprint, device) {
                Ok(mut r) => {
                    r.unusable = unusable;
                    return Ok(Some(r));
                }
                Err(e) => {
                    warn!(error = %e, "checkpoint unusable; trying an older one");
                    unusable.push(UnusableCheckpoint {
                        version: v,
                        error: e.to_string(),
                    });
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    fn load_version(
        &self,
        dir: &Path,
        fingerprint: u32,
        device: Device,
    ) -> Result<Restored, CheckpointError> {
        let meta_path = dir.join(META);
        let meta: CheckpointMeta =
            serde_json::from_slice(&fs::read(&meta_path).map_err(io(&meta_path))?)
                .map_err(|e| invalid(&meta_path, format!("partial or corrupt: {e}")))?;
        if meta.schema_fingerprint != fingerprint {
            return Err(invalid(dir, "written for another schema"));
        }
        let tensors = dir.join(TENSORS);
        let crc = file_crc32(&tensors)?;
        if crc != meta.tensors_crc32 {
            return Err(invalid(
                &tensors,
                format!(
                    "corrupt: CRC-32 {crc:08x}, expected {:08x}",
                    meta.tensors_crc32
                ),
            ));
        }
        let loaded = Tensor::load_multi_with_device(&tensors, device)
            .map_err(|e| invalid(&tensors, e.to_string()))?;
        let get = |name: &str| {
            loaded
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| invalid(&tensors, format!("missing tensor {name}")))
        };
        let relations = get("relations")?;
        let mut model =
            Embeddings::new(meta.rows.len(), relations.size()[0], meta.dim, 0.0, device);
        model.relations = relations;
        model.relation_state = get("relation_state")?;
        if loaded.iter().any(|(n, _)| n == "reverse_relations") {
            let (relations, state) = (get("reverse_relations")?, get("reverse_relation_state")?);
            if relations.size() != model.relations.size() || state.size() != relations.size() {
                return Err(invalid(&tensors, "reverse relations have the wrong shape"));
            }
            model.reverse = Some(crate::train::ReverseRelations { relations, state });
        }
        for (t, &rows) in meta.rows.iter().enumerate() {
            let weights = get(&format!("table.{t}"))?;
            let state = get(&format!("state.{t}"))?;
            if weights.size() != [rows, meta.dim] || state.size() != [rows] {
                return Err(invalid(&tensors, format!("table {t} has the wrong shape")));
            }
            model.tables[t].grow(rows, |_| weights);
            tch::no_grad(|| model.tables[t].state.narrow(0, 0, rows).copy_(&state));
            if loaded.iter().any(|(n, _)| *n == format!("bias.{t}")) {
                let (bias, bias_state) =
                    (get(&format!("bias.{t}"))?, get(&format!("bias_state.{t}"))?);
                if bias.size() != [rows] || bias_state.size() != [rows] {
                    return Err(invalid(&tensors, format!("bias {t} has the wrong shape")));
                }
                let table = &mut model.tables[t];
                table.biased = true;
                tch::no_grad(|| {
                    table.bias.narrow(0, 0, rows).copy_(&bias);
                    table.bias_state.narrow(0, 0, rows).copy_(&bias_state);
                });
            }
        }
        Ok(Restored {
            meta,
            model,
            unusable: Vec::new(),
        })
    }
}

fn file_crc32(path: &Path) -> Result<u32, CheckpointError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// A model whose every value depends on `seed` (not on libtorch's process-wide RNG, which
    /// parallel tests share).
    fn model(seed: i64) -> Embeddings {
        let opts = (Kind::Float, Device::Cpu);
        let values = |n: i64| (Tensor::arange(n * 4, opts).view([n, 4]) * seed as f64 / 7.0).sin();
        let mut m = Embeddings::new(2, 3, 4, 0.0, Device::Cpu);
        m.relations = values(3);
        m.tables[0].grow(5, values);
        m.tables[1].grow(20, values);
        let rows = Tensor::from_slice(&[1i64, 3]);
        m.tables[0].adagrad(&rows, &values(2), 0.1);
        m.adagrad_relations(&values(3), 0.1);
        // Table 1 carries a bias (and its optimiser state); table 0 does not.
        m.tables[1].biased = true;
        let biased = Tensor::from_slice(&[2i64, 7]);
        let grad = Tensor::from_slice(&[0.5f32 * seed as f32, -1.0]);
        m.tables[1].adagrad_bias(&biased, &grad, 0.1);
        m
    }

    fn same(a: &Embeddings, b: &Embeddings) -> bool {
        let reverse = match (&a.reverse, &b.reverse) {
            (None, None) => true,
            (Some(x), Some(y)) => x.relations.equal(&y.relations) && x.state.equal(&y.state),
            _ => false,
        };
        reverse
            && a.relations.equal(&b.relations)
            && a.relation_state.equal(&b.relation_state)
            && a.tables.iter().zip(&b.tables).all(|(x, y)| {
                x.len() == y.len()
                    && x.biased == y.biased
                    && x.biases().equal(&y.biases())
                    && x.bias_state
                        .narrow(0, 0, x.len())
                        .equal(&y.bias_state.narrow(0, 0, y.len()))
                    && x.rows().equal(&y.rows())
                    && x.state
                        .narrow(0, 0, x.len())
                        .equal(&y.state.narrow(0, 0, y.len()))
            })
    }

    #[test]
    fn save_then_load_is_bit_identical_and_versions_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path(), 2);
        assert!(ck.load(7, Device::Cpu).unwrap().is_none());
        for (i, seed) in [1, 2, 3].into_iter().enumerate() {
            assert_eq!(
                ck.save(&model(seed), 100 + i as u64, 7).unwrap(),
                i as u64 + 1
            );
        }
        assert_eq!(ck.versions().unwrap(), vec![3, 2], "keep the newest 2");
        let r = ck.load(7, Device::Cpu).unwrap().unwrap();
        assert_eq!((r.meta.version, r.meta.cursor), (3, 102));
        assert!(same(&r.model, &model(3)));
        assert!(
            ck.load(8, Device::Cpu).is_err(),
            "another schema is refused"
        );
    }

    #[test]
    fn reverse_relations_are_saved_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path(), 2);
        let mut m = model(4);
        m.add_reverse_relations(0.5);
        let grad = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        m.adagrad_reverse(&grad, 0.1);
        ck.save(&m, 10, 7).unwrap();
        let r = ck.load(7, Device::Cpu).unwrap().unwrap();
        assert!(r.model.reverse.is_some() && same(&r.model, &m));
        // And a model without them loads without them.
        ck.save(&model(4), 11, 7).unwrap();
        let r = ck.load(7, Device::Cpu).unwrap().unwrap();
        assert!(r.model.reverse.is_none() && same(&r.model, &model(4)));
    }

    #[test]
    fn a_corrupt_or_partial_checkpoint_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path(), 3);
        ck.save(&model(1), 10, 7).unwrap();
        ck.save(&model(2), 20, 7).unwrap();
        // Flip a byte of the newest tensors file: CRC mismatch → version 1.
        let t = ck.version_dir(2).join(TENSORS);
        let mut bytes = fs::read(&t).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&t, bytes).unwrap();
        let r = ck.load(7, Device::Cpu).unwrap().unwrap();
        assert_eq!(r.meta.version, 1);
        assert!(same(&r.model, &model(1)));
        // A version folder without its meta (a crash mid-write) is skipped too, and so is one
        // newer than the pointer.
        ck.save(&model(3), 30, 7).unwrap();
        fs::remove_file(ck.version_dir(3).join(META)).unwrap();
        fs::create_dir_all(ck.version_dir(9)).unwrap();
        assert_eq!(ck.load(7, Device::Cpu).unwrap().unwrap().meta.version, 1);
    }
}
