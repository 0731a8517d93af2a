//! Which codebooks a `publish.format = "pq"` version is coded with, and when they are learned
//! again.
//!
//! Codebooks have an epoch of their own: the version that learned them. A version that learns
//! codebooks carries every row, coded with them, plus their record (`codebooks:<epoch>`) and a
//! tombstone for the previous epoch's record, which no row names any more; every other version
//! carries only the rows that moved, coded with the codebooks in force. They are learned again
//! when a version's rows lose more than `publish.pq.max_relative_error` of their energy (the
//! tables drifted away from what the codebooks were learned on; a rotation onto the anchor does
//! this at once): that version still goes out with the old codebooks, and the next one learns
//! and carries every row. Any version that carries every row (the first, one after a restart
//! without the reference) carries the codebooks record too, so a subscriber that lost it, or a
//! record retired by a version whose commit the codebooks file missed, has it again.
//!
//! The codebooks in force persist in `publish.path/codebooks.twc` (their `TWC1` record), written
//! after the commit of the version that learned them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::{info, warn};

use crate::config::PqConfig;
use crate::persist;
use tch::{Kind, Tensor};

use crate::publish::{
    Codebooks, CodebooksRecord, PqError, PreparedVersion, ServedCodes, VersionRows, ViewUpdate,
};

const CODEBOOKS_FILE: &str = "codebooks.twc";

/// The publisher's codebooks (see the module docs).
pub struct Quantizer {
    cfg: PqConfig,
    current: Option<Codebooks>,
    /// A version's error passed the bound: the next version learns codebooks again.
    relearn: bool,
    /// Saved codebooks of another `publish.pq.subspaces`, whose record the next codebooks
    /// retire.
    unusable: Option<u64>,
    dir: Option<PathBuf>,
}

/// How one version was coded, adopted by [`Quantizer::commit`] once it is committed.
#[derive(Debug)]
pub struct Coding {
    /// The codebooks the rows were coded with (`None`: no codebooks yet, rows went out f32).
    pub codebooks: Option<Codebooks>,
    /// They were learned for this version.
    pub learned: bool,
    /// `Σ‖x − x̂‖² / Σ‖x‖²` of the version's node rows.
    pub relative_error: f64,
}

impl Coding {
    /// The epoch of the codebooks the rows were coded with.
    pub fn epoch(&self) -> Option<u64> {
        self.codebooks.as_ref().map(|c| c.epoch)
    }
}

impl Quantizer {
    /// The codebooks in force from `dir` when they were saved there.
    pub fn open(cfg: PqConfig, dir: Option<&Path>) -> anyhow::Result<Quantizer> {
        let mut unusable = None;
        let current = match dir.map(|d| d.join(CODEBOOKS_FILE)) {
            Some(path) if path.exists() => {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let record = CodebooksRecord::decode(&bytes).with_context(|| {
                    format!("{}: delete it to learn new codebooks", path.display())
                })?;
                if record.table.subspaces != cfg.subspaces {
                    warn!(
                        saved = record.table.subspaces,
                        configured = cfg.subspaces,
                        "publish.pq.subspaces changed: the next version learns new codebooks"
                    );
                    unusable = Some(record.table.epoch);
                    None
                } else {
                    Some(Codebooks::from_table(&record.table))
                }
            }
            _ => None,
        };
        Ok(Quantizer {
            cfg,
            current,
            relearn: false,
            unusable,
            dir: dir.map(Path::to_path_buf),
        })
    }

    /// The next version must carry every row: it learns codebooks (none yet, or the last
    /// version's error passed the bound).
    pub fn needs_every_row(&self) -> bool {
        self.current.is_none() || self.relearn
    }

    /// The codebooks in force, if any.
    pub fn current(&self) -> Option<&Codebooks> {
        self.current.as_ref()
    }

    /// Code `prepared`'s node rows. `every_row`: it carries every row, so it can learn codebooks
    /// when they are due (and carries their record in any case). Fewer than 256 rows to learn
    /// from: no codes, the rows go out as f32.
    pub fn code(&self, prepared: &mut PreparedVersion, every_row: bool) -> Result<Coding, PqError> {
        let version = prepared.marker.version;
        let mut learned = None;
        if every_row && self.needs_every_row() {
            let rows = prepared.rows.node_values();
            match Codebooks::train(
                &rows,
                self.cfg.subspaces as i64,
                self.cfg.sample_rows,
                self.cfg.iterations,
                self.cfg.seed ^ version,
                version,
            ) {
                Ok(books) => learned = Some(books),
                Err(PqError::TooFewRows { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let is_learned = learned.is_some();
        let Some(books) = learned.or_else(|| self.current.as_ref().map(Codebooks::shallow_clone))
        else {
            return Ok(Coding {
                codebooks: None,
                learned: false,
                relative_error: 0.0,
            });
        };
        let relative_error = prepared.rows.quantize(&books)?;
        if every_row {
            let retire = match is_learned {
                true => self.current.as_ref().map(|c| c.epoch).or(self.unusable),
                false => None,
            };
            let record = CodebooksRecord {
                version,
                epoch: prepared.marker.epoch,
                table: books.table(),
            };
            prepared.with_codebooks(record, retire);
        }
        Ok(Coding {
            codebooks: Some(books),
            learned: is_learned,
            relative_error,
        })
    }

    /// The version coded as `coding` is committed: its codebooks are in force (and saved), and
    /// the next version learns new ones if its error passed the bound.
    pub fn commit(&mut self, coding: Coding) -> anyhow::Result<()> {
        let over =
            coding.codebooks.is_some() && coding.relative_error > self.cfg.max_relative_error;
        if let Some(books) = coding.codebooks.filter(|_| coding.learned) {
            if let Some(dir) = &self.dir {
                let record = CodebooksRecord {
                    version: books.epoch,
                    epoch: 0,
                    table: books.table(),
                };
                persist::write_atomic(&dir.join(CODEBOOKS_FILE), &record.encode())
                    .context("saving the codebooks")?;
            }
            info!(
                epoch = books.epoch,
                subspaces = books.subspaces(),
                error = coding.relative_error,
                "new codebooks in force"
            );
            if over {
                // Learning again would not help: relearning at every version would send every
                // row every time.
                warn!(
                    error = coding.relative_error,
                    bound = self.cfg.max_relative_error,
                    "codebooks just learned are over publish.pq.max_relative_error; raise it or \
                     publish.pq.subspaces"
                );
            }
            self.current = Some(books);
            self.relearn = false;
            self.unusable = None;
        } else if over {
            info!(
                error = coding.relative_error,
                bound = self.cfg.max_relative_error,
                "quantization error over publish.pq.max_relative_error: the next version learns \
                 new codebooks"
            );
            self.relearn = true;
        }
        Ok(())
    }
}

/// The codes subscribers hold once a version coded with `books` is applied: the previous view's
/// codes (when of the same codebooks and the version does not carry every row) with the
/// version's rows written over them; every row of `tables` encoded when there is nothing to
/// start from (the first version of a process whose reference was restored). The version's node
/// block `t` holds type `t`'s rows, as [`crate::publish::build_delta_version`] builds them.
pub(crate) fn served_codes(
    previous: Option<&ServedCodes>,
    books: &Codebooks,
    update: &ViewUpdate,
    rows: &VersionRows,
    tables: &[Tensor],
    every_row: bool,
) -> Result<ServedCodes, PqError> {
    let previous = previous.filter(|p| p.codebooks.epoch == books.epoch && !every_row);
    let m = books.subspaces();
    let mut out = Vec::with_capacity(update.tables.len());
    for (t, ((len, idx, _), table)) in update.tables.iter().zip(tables).enumerate() {
        let published = rows.block_codes(t as u32).unwrap_or_default();
        let published = Tensor::from_slice(published).reshape([-1, m]);
        let empty = || Tensor::zeros([*len, m], (Kind::Uint8, tch::Device::Cpu));
        let mut codes = match previous.and_then(|p| p.tables.get(t)) {
            Some(before) => {
                let codes = empty();
                let keep = before.size()[0].min(*len);
                codes.narrow(0, 0, keep).copy_(&before.narrow(0, 0, keep));
                codes
            }
            // Every row is written below.
            None if every_row => empty(),
            None => books.encode(table)?,
        };
        if idx.numel() > 0 {
            let _ = codes.index_copy_(0, idx, &published);
        }
        out.push(codes);
    }
    Ok(ServedCodes {
        codebooks: books.shallow_clone(),
        tables: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValueFormat;
    use crate::publish::{Record, VersionMarker};
    use rand::{Rng, SeedableRng};

    /// A version of `n` node rows of dimension 4 (from a generator of its own) and one relation.
    fn version(number: u64, n: usize, seed: u64) -> PreparedVersion {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut rows = VersionRows::new(number, 1, ValueFormat::Pq, 4);
        let values: Vec<f32> = (0..n * 4).map(|_| rng.random_range(-1.0..1.0)).collect();
        let block = rows.add_block(values);
        for i in 0..n {
            rows.push(VersionRows::row(format!("user:{i}"), 0, None, block, i));
        }
        let relation = rows.add_relation_block(vec![0.5; 4]);
        rows.push(VersionRows::row("relation:r".into(), 0, None, relation, 0));
        let marker = VersionMarker::new(number, 1, (n + 1) as u64);
        PreparedVersion {
            rows,
            tombstones: Vec::new(),
            codebooks: None,
            retired_codebooks: None,
            marker,
            scope: crate::publish::Scope::whole(1),
            newest_ts: 0,
            cursor: 0,
            gradients: Default::default(),
            gradients_applied: Default::default(),
        }
    }

    #[test]
    fn saved_codebooks_of_another_shape_are_retired_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = quantizer(0.5);
        q.dir = Some(dir.path().to_path_buf());
        let mut first = version(7, 600, 1);
        let coding = q.code(&mut first, true).unwrap();
        q.commit(coding).unwrap();
        // Restarted with the same sub-spaces: the saved codebooks are in force.
        let same = Quantizer::open(q.cfg.clone(), Some(dir.path())).unwrap();
        assert_eq!(same.current().map(|c| c.epoch), Some(7));
        assert!(!same.needs_every_row());
        // With other sub-spaces: new ones, which retire the saved ones' record.
        let cfg = PqConfig {
            subspaces: 4,
            ..q.cfg.clone()
        };
        let other = Quantizer::open(cfg, Some(dir.path())).unwrap();
        assert!(other.needs_every_row());
        let mut next = version(8, 600, 2);
        other.code(&mut next, true).unwrap();
        assert_eq!(next.retired_codebooks.as_deref(), Some("codebooks:7"));
    }

    fn quantizer(bound: f64) -> Quantizer {
        let cfg = PqConfig {
            subspaces: 2,
            max_relative_error: bound,
            sample_rows: 1000,
            iterations: 5,
            seed: 1,
        };
        Quantizer::open(cfg, None).unwrap()
    }

    #[test]
    fn codebooks_are_learned_with_every_row_and_the_old_ones_retired() {
        let mut q = quantizer(0.5);
        assert!(q.needs_every_row(), "no codebooks yet");
        // Too few rows to learn from: f32 rows, and the next version tries again.
        let mut small = version(1, 100, 1);
        let coding = q.code(&mut small, true).unwrap();
        assert_eq!(coding.epoch(), None);
        assert!(matches!(
            Record::decode(&small.rows.encode(0)),
            Ok(Record::Row(_))
        ));
        q.commit(coding).unwrap();
        assert!(q.needs_every_row());

        let mut first = version(2, 600, 2);
        let coding = q.code(&mut first, true).unwrap();
        assert_eq!(
            coding.epoch(),
            Some(2),
            "the codebooks' epoch is their version"
        );
        assert_eq!(first.marker.rows, 601 + 1, "the codebooks record counts");
        assert_eq!(first.retired_codebooks, None);
        assert!(
            matches!(Record::decode(&first.rows.encode(0)), Ok(Record::Coded(r)) if r.codebooks == 2)
        );
        // Relation vectors stay f32.
        assert!(matches!(
            Record::decode(&first.rows.encode(600)),
            Ok(Record::Row(_))
        ));
        q.commit(coding).unwrap();
        assert!(!q.needs_every_row(), "within the bound");

        // A version of moved rows only: coded with the codebooks in force, no record.
        let mut next = version(3, 50, 3);
        let coding = q.code(&mut next, false).unwrap();
        assert_eq!((coding.epoch(), coding.learned), (Some(2), false));
        assert!(next.codebooks.is_none() && next.marker.rows == 51);
        q.commit(coding).unwrap();

        // Over the bound: that version keeps the codebooks, the next learns and retires them.
        let mut tight = quantizer(1e-9);
        tight.current = q.current.take();
        let mut over = version(4, 50, 4);
        let coding = tight.code(&mut over, false).unwrap();
        tight.commit(coding).unwrap();
        assert!(tight.needs_every_row());
        let mut relearn = version(5, 600, 5);
        let coding = tight.code(&mut relearn, true).unwrap();
        assert_eq!(coding.epoch(), Some(5));
        assert_eq!(relearn.retired_codebooks.as_deref(), Some("codebooks:2"));
        assert_eq!(
            relearn.marker.rows,
            601 + 2,
            "the record and the retired one's tombstone"
        );
        tight.commit(coding).unwrap();
        assert!(
            !tight.needs_every_row(),
            "codebooks just learned over the bound are kept, not learned again at every version"
        );
    }
}
