//! The alignment actor (docs/architecture.md §5): keeps each published version close to the one before, so
//! models trained downstream on an earlier version keep working.
//!
//! At every publication the publisher hands it a CPU snapshot of the trainer's parameters and of
//! the reference (the version subscribers hold). [`assess`] (pure) then
//! 1. refuses a snapshot with non-finite values;
//! 2. when `align.procrustes` is on, fits the rotation onto the anchor (the first published
//!    version, persisted in `publish.path`) with the orthogonal Procrustes solution over a sample
//!    of the nodes both have (`align.drift_sample`), and records the residual — a rotation of
//!    every table and relation vector changes no dot, L2 or cosine score;
//! 3. measures drift against the reference and the anchor ([`crate::align::drift`]), each on a
//!    sample of at most `align.drift_sample` shared rows;
//! 4. holds the version back when its drift from the reference exceeds `align.hard_limit`.
//!
//! Where the rotation runs: the aligner only fits it (a `[D, D]` SVD over the sample). When it
//! lowers the residual by more than `align.rotation_min_gain` (the model turned away from the
//! anchor, not noise), the publication has the trainer rotate its own tables in place
//! ([`crate::train::TrainerCore::rotate`], on the training thread, every row: O(table)), and that
//! version carries every row that then moved. Otherwise nothing rotates, and a version costs what
//! changed. With the pull toward the reference, rotations are rare after the first versions.
//!
//! After the version is acknowledged, [`PullController`] turns the measured drift into the
//! strength of the L2 pull the trainer applies toward the new reference until the next version
//! (`align.max_drift` is its target). A held version makes the lifecycle restore the trainer's
//! newest checkpoint and sets the pull to `align.pull_max`.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::seq::index::{sample, sample as sample_index};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::config::AlignConfig;
use tch::{Kind, Tensor};
use tracing::info;

use crate::align::{drift, procrustes, relative_l2, Drift};
use crate::store::NodeRef;
use crate::telemetry as m;
use crate::train::{
    load_snapshot, non_finite_in, save_snapshot, ModelDelta, Snapshot, SnapshotError,
};

/// Why a version was held back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Hold {
    NonFinite { rows: i64 },
    Drift { cosine_mean: f64, hard_limit: f64 },
}

impl Hold {
    pub fn label(&self) -> &'static str {
        match self {
            Hold::NonFinite { .. } => "non_finite",
            Hold::Drift { .. } => "drift",
        }
    }
}

/// What the alignment found for one version (also in the version marker and `/v1/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignFigures {
    /// Drift control was on for this version.
    pub control: bool,
    /// Against the version subscribers hold (none for the first version).
    pub previous: Option<Drift>,
    /// Against the anchor (none until one is published).
    pub anchor: Option<Drift>,
    /// Relative residual of the rotation onto the anchor, when one was applied.
    pub procrustes_residual: Option<f64>,
    /// Strength of the pull during the interval that produced this version.
    pub pull: f64,
}

/// The outcome of [`assess`].
pub struct Assessed {
    pub figures: AlignFigures,
    /// `[D, D]` to apply to the model before publishing (Procrustes onto the anchor).
    pub rotation: Option<Tensor>,
    pub hold: Option<Hold>,
    /// The pull strength from now on (raised to `align.pull_max` after a hold).
    pub pull: f64,
}

/// Which rows a version's drift is measured on: per node type, sorted row indices (Int64, CPU)
/// drawn uniformly from the rows the model shares with the reference (`previous`) and with the
/// anchor (`anchor`), at most `align.drift_sample` of each. The trainer copies their current
/// values out with the changed rows ([`crate::train::DeltaRequest::samples`]).
#[derive(Debug)]
pub struct DriftPlan {
    pub previous: Vec<Tensor>,
    pub anchor: Vec<Tensor>,
}

/// At most `k` rows drawn uniformly from the first `lens[t]` rows of each type together.
pub(super) fn sample_rows(lens: &[i64], k: usize, rng: &mut SmallRng) -> Vec<Tensor> {
    let total: i64 = lens.iter().sum();
    let mut per_type: Vec<Vec<i64>> = vec![Vec::new(); lens.len()];
    if total > 0 {
        let picked = sample(rng, total as usize, k.min(total as usize));
        for i in picked {
            let (mut i, mut t) = (i as i64, 0);
            while i >= lens[t] {
                i -= lens[t];
                t += 1;
            }
            per_type[t].push(i);
        }
    }
    per_type
        .into_iter()
        .map(|mut v| {
            v.sort_unstable();
            Tensor::from_slice(&v)
        })
        .collect()
}

/// A version as the alignment sees it: the rows written since the previous version (checked for
/// non-finite values; rows not written were checked when they were), the relation vectors, and
/// the current values of the [`DriftPlan`]'s samples, per type `(indices, values [n, D])`.
#[derive(Debug)]
pub struct Candidate {
    pub changed: Vec<Tensor>,
    pub relations: Tensor,
    pub previous: Vec<(Tensor, Tensor)>,
    pub anchor: Vec<(Tensor, Tensor)>,
}

impl Candidate {
    /// The candidate of a trainer's delta: its changed rows and relations, and the two samples
    /// it was asked for (previous version, anchor), taken out of it.
    pub fn of_delta(delta: &mut ModelDelta) -> Candidate {
        let mut samples = std::mem::take(&mut delta.samples).into_iter();
        Candidate {
            changed: delta
                .tables
                .iter()
                .map(|t| t.values.shallow_clone())
                .collect(),
            relations: delta.relations.shallow_clone(),
            previous: samples.next().unwrap_or_default(),
            anchor: samples.next().unwrap_or_default(),
        }
    }

    /// The candidate of a whole snapshot for `plan` (offline measurements, tests).
    pub fn of_snapshot(current: &Snapshot, plan: &DriftPlan) -> Candidate {
        let pick = |per_type: &[Tensor]| {
            per_type
                .iter()
                .zip(&current.tables)
                .map(|(idx, table)| {
                    let idx = idx.masked_select(&idx.lt(table.size()[0]));
                    let values = table.index_select(0, &idx);
                    (idx, values)
                })
                .collect()
        };
        Candidate {
            changed: current.tables.iter().map(Tensor::shallow_clone).collect(),
            relations: current.relations.shallow_clone(),
            previous: pick(&plan.previous),
            anchor: pick(&plan.anchor),
        }
    }
}

/// The sampled rows `other` has too, stacked: `(current values, other's values)`.
fn paired(sample: &[(Tensor, Tensor)], other: &Snapshot) -> (Tensor, Tensor) {
    let (mut xa, mut xb) = (Vec::new(), Vec::new());
    for ((idx, values), table) in sample.iter().zip(&other.tables) {
        let keep = idx.lt(table.size()[0]);
        let idx = idx.masked_select(&keep);
        if idx.numel() > 0 {
            xa.push(values.index_select(0, &keep.nonzero().view([-1])));
            xb.push(table.index_select(0, &idx));
        }
    }
    if xa.is_empty() {
        let d = other.relations.size()[1];
        let empty = Tensor::zeros([0, d], (Kind::Float, tch::Device::Cpu));
        return (empty.shallow_clone(), empty);
    }
    (Tensor::cat(&xa, 0), Tensor::cat(&xb, 0))
}

/// The plan for `current` against the `reference` and the `anchor` (their table lengths).
pub(super) fn plan_drift(
    current: Option<&[i64]>,
    reference: Option<&[i64]>,
    anchor: Option<&[i64]>,
    k: usize,
    seed: u64,
) -> DriftPlan {
    let mut rng = SmallRng::seed_from_u64(seed);
    let shared = |other: Option<&[i64]>| -> Vec<i64> {
        match (other, current) {
            (None, _) => Vec::new(),
            (Some(o), None) => o.to_vec(),
            (Some(o), Some(c)) => o
                .iter()
                .enumerate()
                .map(|(t, &n)| n.min(c.get(t).copied().unwrap_or(0)))
                .collect(),
        }
    };
    DriftPlan {
        previous: sample_rows(&shared(reference), k, &mut rng),
        anchor: sample_rows(&shared(anchor), k, &mut rng),
    }
}

/// Assess `current` (a whole snapshot) against the `reference` subscribers hold and the
/// `anchor`: [`assess_candidate`] on samples of `align.drift_sample` rows. `seed` picks them.
pub fn assess(
    current: &Snapshot,
    reference: Option<&Snapshot>,
    anchor: Option<&Snapshot>,
    cfg: &AlignConfig,
    rotate: bool,
    pull: f64,
    seed: u64,
) -> Assessed {
    let lens = |s: &Snapshot| s.tables.iter().map(|t| t.size()[0]).collect::<Vec<_>>();
    let plan = plan_drift(
        Some(&lens(current)),
        reference.map(lens).as_deref(),
        anchor.map(lens).as_deref(),
        cfg.drift_sample,
        seed,
    );
    let candidate = Candidate::of_snapshot(current, &plan);
    assess_candidate(&candidate, reference, anchor, cfg, rotate, pull, seed)
}

/// Assess a version (see the module docs). Every measure runs on the candidate's bounded samples,
/// so its cost does not grow with the tables: the non-finite check covers the changed rows, the
/// rotation is fitted on the anchor sample, and drift (and its top-10 neighbour overlap, among
/// the sampled rows) on each sample. The rotation is returned only when it lowers the sample's
/// residual against the anchor by more than `align.rotation_min_gain`: rotating the model turns
/// (and then republishes) every row, so a rotation that is nearly the identity is not applied.
pub(super) fn assess_candidate(
    current: &Candidate,
    reference: Option<&Snapshot>,
    anchor: Option<&Snapshot>,
    cfg: &AlignConfig,
    rotate: bool,
    pull: f64,
    seed: u64,
) -> Assessed {
    tch::no_grad(|| {
        let mut figures = AlignFigures {
            control: cfg.enabled,
            previous: None,
            anchor: None,
            procrustes_residual: None,
            pull,
        };
        let mut bad = non_finite_in(
            current
                .changed
                .iter()
                .filter(|t| t.numel() > 0)
                .chain(std::iter::once(&current.relations)),
        );
        if bad == 0 {
            // A row corrupted outside a step and not yet scanned by the trainer, sampled.
            bad = non_finite_in(
                current
                    .previous
                    .iter()
                    .chain(&current.anchor)
                    .map(|(_, v)| v)
                    .filter(|v| v.numel() > 0),
            );
        }
        if bad > 0 {
            return Assessed {
                figures,
                rotation: None,
                hold: Some(Hold::NonFinite { rows: bad }),
                pull,
            };
        }
        let mut rotation = None;
        if let Some(a) = anchor.filter(|_| rotate) {
            let (c, o) = paired(&current.anchor, a);
            if c.size()[0] >= c.size()[1] {
                let (r, residual) = procrustes(&c, &o);
                let unrotated = relative_l2(&c, &o);
                if unrotated - residual > cfg.rotation_min_gain {
                    figures.procrustes_residual = Some(residual);
                    rotation = Some(r);
                } else {
                    figures.procrustes_residual = Some(unrotated);
                }
            }
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut measure = |sample: &[(Tensor, Tensor)], other: &Snapshot| {
            let (c, o) = paired(sample, other);
            let n = c.size()[0] as usize;
            if n == 0 {
                return None;
            }
            let c = match &rotation {
                Some(r) => c.matmul(r),
                None => c,
            };
            let picked: Vec<i64> = sample_index(&mut rng, n, cfg.overlap_sample.min(n))
                .into_iter()
                .map(|i| i as i64)
                .collect();
            Some(drift(&c, &o, &Tensor::from_slice(&picked)))
        };
        figures.previous = reference.and_then(|r| measure(&current.previous, r));
        figures.anchor = anchor.and_then(|a| measure(&current.anchor, a));
        let hold = figures
            .previous
            .filter(|d| d.cosine_mean > cfg.hard_limit)
            .map(|d| Hold::Drift {
                cosine_mean: d.cosine_mean,
                hard_limit: cfg.hard_limit,
            });
        Assessed {
            figures,
            rotation,
            hold,
            pull,
        }
    })
}

/// Adjusts the pull strength toward `target` drift: multiplied by `measured / target` (clamped
/// to ×¼…×4 per version), within `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PullController {
    pub strength: f64,
    pub target: f64,
    pub min: f64,
    pub max: f64,
}

impl PullController {
    pub(crate) fn from_config(cfg: &AlignConfig) -> PullController {
        PullController {
            strength: if cfg.enabled { cfg.pull_init } else { 0.0 },
            target: cfg.max_drift,
            min: cfg.pull_min,
            max: cfg.pull_max,
        }
    }

    /// The strength after a version that drifted `measured` from its predecessor.
    pub(crate) fn update(&mut self, measured: f64) -> f64 {
        if self.strength == 0.0 || !measured.is_finite() {
            return self.strength;
        }
        let ratio = (measured / self.target).clamp(0.25, 4.0);
        self.strength = (self.strength * ratio).clamp(self.min, self.max);
        self.strength
    }

    /// After a held version: pull as hard as allowed.
    pub(crate) fn hold(&mut self) -> f64 {
        if self.strength > 0.0 {
            self.strength = self.max;
        }
        self.strength
    }
}

/// Alignment figures shared with `/v1/status`.
#[derive(Debug, Default)]
pub struct AlignStatus {
    pub last: Mutex<Option<(u64, AlignFigures)>>,
    pub held: AtomicU64,
    pub last_hold: Mutex<Option<Hold>>,
    pub anchor_version: AtomicU64,
    pull_bits: AtomicU64,
}

/// The `align` part of `/v1/status`.
#[derive(Debug, Serialize)]
pub struct AlignReport {
    pub control: bool,
    pub anchor_version: Option<u64>,
    pub pull: f64,
    pub last_version: Option<u64>,
    pub last: Option<AlignFigures>,
    pub held: u64,
    pub last_hold: Option<Hold>,
}

impl AlignStatus {
    pub fn report(&self, control: bool) -> AlignReport {
        let last = self.last.lock().clone();
        let anchor = self.anchor_version.load(Ordering::Relaxed);
        AlignReport {
            control,
            anchor_version: (anchor > 0).then_some(anchor),
            pull: f64::from_bits(self.pull_bits.load(Ordering::Relaxed)),
            last_version: last.as_ref().map(|(v, _)| *v),
            last: last.map(|(_, f)| f),
            held: self.held.load(Ordering::Relaxed),
            last_hold: self.last_hold.lock().clone(),
        }
    }

    fn set_pull(&self, pull: f64) {
        self.pull_bits.store(pull.to_bits(), Ordering::Relaxed);
        metrics::gauge!(m::ALIGN_PULL).set(pull);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlignError {
    #[error("alignment: {0}")]
    Snapshot(#[from] SnapshotError),
}

/// The anchor's file stem in `publish.path`.
pub(super) const ANCHOR: &str = "anchor";

/// The alignment's state and logic without the actor: the anchor and the pull controller. The
/// actor wraps it for the daemon; the offline stability measurement drives it directly, so both
/// publish through the same decisions.
pub struct Aligner {
    cfg: AlignConfig,
    rotate: bool,
    /// Where the anchor persists (`publish.path`); `None` keeps it in memory only.
    dir: Option<PathBuf>,
    anchor: Option<(u64, Snapshot)>,
    /// The anchor on disk still holds rows since erased (written again at most every
    /// [`ANCHOR_REWRITE_EVERY`]), and when it was last written.
    anchor_stale: bool,
    anchor_written: Option<std::time::Instant>,
    /// When the last rotation was handed out (`align.rotation_min_interval_secs`).
    rotated_at: Option<std::time::Instant>,
    controller: PullController,
    status: Arc<AlignStatus>,
}

/// The anchor is rewritten whole for erasures (its rows are not stored apart), so at most this
/// often, like a checkpoint, not once per version.
const ANCHOR_REWRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Aligner {
    /// `rotate`: Procrustes applies (config on and a rotation-invariant comparator). Loads the
    /// anchor from `dir` when one was published before.
    pub fn new(
        cfg: AlignConfig,
        rotate: bool,
        dir: Option<PathBuf>,
        status: Arc<AlignStatus>,
    ) -> Result<Aligner, AlignError> {
        let anchor = match &dir {
            Some(dir) => load_snapshot(dir, ANCHOR)?.map(|(meta, s)| (meta.version, s)),
            None => None,
        };
        if let Some((v, _)) = &anchor {
            status.anchor_version.store(*v, Ordering::Relaxed);
            info!(version = v, "alignment anchor loaded");
        }
        let controller = PullController::from_config(&cfg);
        status.set_pull(controller.strength);
        Ok(Aligner {
            rotate: rotate && cfg.enabled && cfg.procrustes,
            cfg,
            dir,
            anchor,
            anchor_stale: false,
            anchor_written: None,
            rotated_at: None,
            controller,
            status,
        })
    }

    /// The pull strength now.
    pub fn pull(&self) -> f64 {
        self.controller.strength
    }

    /// The rows version `version`'s drift will be measured on, against a reference of
    /// `reference` rows per type and the anchor (see [`DriftPlan`]); rows the model lacks are
    /// left out when the trainer copies the samples.
    pub fn plan(&self, version: u64, reference: Option<&[i64]>) -> DriftPlan {
        let anchor: Option<Vec<i64>> = self
            .anchor
            .as_ref()
            .map(|(_, a)| a.tables.iter().map(|t| t.size()[0]).collect());
        plan_drift(
            None,
            reference,
            anchor.as_deref(),
            self.cfg.drift_sample,
            version,
        )
    }

    /// Assess version `version` (see [`assess_candidate`]); a hold is counted, logged and raises
    /// the pull.
    pub fn assess(
        &mut self,
        version: u64,
        current: &Candidate,
        reference: Option<&Snapshot>,
    ) -> Assessed {
        let interval = std::time::Duration::from_secs(self.cfg.rotation_min_interval_secs);
        let may_rotate = self.rotate && self.rotated_at.is_none_or(|at| at.elapsed() >= interval);
        let out = assess_candidate(
            current,
            reference,
            self.anchor.as_ref().map(|(_, s)| s),
            &self.cfg,
            may_rotate,
            self.controller.strength,
            version,
        );
        if out.rotation.is_some() {
            self.rotated_at = Some(std::time::Instant::now());
        }
        let mut out = out;
        if let Some(hold) = &out.hold {
            self.status.held.fetch_add(1, Ordering::Relaxed);
            *self.status.last_hold.lock() = Some(hold.clone());
            metrics::counter!(m::ALIGN_HELD, "reason" => hold.label()).increment(1);
            let pull = self.controller.hold();
            self.status.set_pull(pull);
            out.pull = pull;
        }
        out
    }

    /// Version `version` was acknowledged with `figures`; `published` is what subscribers now
    /// hold (the first one becomes the anchor). The rows of the nodes it `erased` are zeroed in
    /// the anchor, in memory and on disk: nothing of an erased node outlives its erasure there
    /// either (drift is then measured on zero rows for them, which the sample rarely meets).
    /// Returns the pull strength for the next interval.
    pub fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
        erased: &[NodeRef],
    ) -> Result<f64, AlignError> {
        if let Some((_, anchor)) = self.anchor.as_mut().filter(|_| !erased.is_empty()) {
            tch::no_grad(|| {
                for node in erased {
                    if let Some(table) = anchor.tables.get(node.node_type as usize) {
                        if i64::from(node.index) < table.size()[0] {
                            let _ = table.get(i64::from(node.index)).fill_(0.0);
                        }
                    }
                }
            });
            self.anchor_stale = true;
        }
        let due = self
            .anchor_written
            .is_none_or(|at| at.elapsed() >= ANCHOR_REWRITE_EVERY);
        if let (true, true, Some(dir), Some((anchor_version, anchor))) =
            (self.anchor_stale, due, &self.dir, &self.anchor)
        {
            save_snapshot(dir, ANCHOR, *anchor_version, anchor)?;
            self.anchor_stale = false;
            self.anchor_written = Some(std::time::Instant::now());
        }
        if self.anchor.is_none() {
            if let Some(dir) = &self.dir {
                save_snapshot(dir, ANCHOR, version, &published)?;
            }
            self.status.anchor_version.store(version, Ordering::Relaxed);
            info!(version, "alignment anchor set");
            // Its own copy: erasures zero its rows in place, and the published view it comes
            // from may still be served.
            let owned = Snapshot {
                tables: published.tables.iter().map(Tensor::copy).collect(),
                relations: published.relations.copy(),
            };
            self.anchor = Some((version, owned));
        }
        for (against, d) in [("previous", &figures.previous), ("anchor", &figures.anchor)] {
            if let Some(d) = d {
                for (measure, v) in [
                    ("cosine_mean", d.cosine_mean),
                    ("cosine_p99", d.cosine_p99),
                    ("relative_l2", d.relative_l2),
                    ("knn_overlap", d.knn_overlap),
                ] {
                    metrics::gauge!(m::ALIGN_DRIFT, "against" => against, "measure" => measure)
                        .set(v);
                }
            }
        }
        if let Some(r) = figures.procrustes_residual {
            metrics::gauge!(m::ALIGN_RESIDUAL).set(r);
        }
        let pull = match &figures.previous {
            Some(d) => self.controller.update(d.cosine_mean),
            None => self.controller.strength,
        };
        self.status.set_pull(pull);
        *self.status.last.lock() = Some((version, figures.clone()));
        Ok(pull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn cfg() -> AlignConfig {
        AlignConfig {
            enabled: true,
            max_drift: 0.02,
            hard_limit: 0.5,
            pull_init: 1.0,
            pull_min: 0.01,
            pull_max: 100.0,
            procrustes: true,
            overlap_sample: 64,
            drift_sample: 4096,
            rotation_min_gain: 0.01,
            rotation_min_interval_secs: 0,
        }
    }

    fn snapshot(seed: i64, rows: &[i64], dim: i64) -> Snapshot {
        tch::manual_seed(seed);
        Snapshot {
            tables: rows
                .iter()
                .map(|&n| Tensor::randn([n, dim], (Kind::Float, Device::Cpu)))
                .collect(),
            relations: Tensor::randn([3, dim], (Kind::Float, Device::Cpu)),
        }
    }

    fn random_rotation(dim: i64) -> Tensor {
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([dim, dim], (Kind::Float, Device::Cpu)),
            "reduced",
        );
        q
    }

    #[test]
    fn controller_moves_the_pull_toward_the_target_within_bounds() {
        let mut c = PullController::from_config(&cfg());
        assert_eq!(c.update(0.04), 2.0); // twice the target: twice the pull
        assert_eq!(c.update(0.01), 1.0); // half: half
        assert_eq!(c.update(1.0), 4.0); // at most ×4 per version
        assert_eq!(c.update(0.0), 1.0); // at most ÷4
        for _ in 0..10 {
            c.update(10.0);
        }
        assert_eq!(c.strength, 100.0);
        assert_eq!(c.hold(), 100.0);
        let mut off = PullController::from_config(&AlignConfig {
            enabled: false,
            ..cfg()
        });
        assert_eq!(off.update(1.0), 0.0);
        assert_eq!(off.hold(), 0.0);
    }

    /// An erased node's anchor row is zeroed in memory at once and on disk with the next
    /// rewrite; the published view the anchor came from is left as it is.
    #[test]
    fn an_erased_nodes_anchor_row_is_zeroed_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Aligner::new(cfg(), true, Some(dir.path().into()), Default::default()).unwrap();
        let published = snapshot(1, &[4, 2], 3);
        let figures = AlignFigures {
            control: true,
            previous: None,
            anchor: None,
            procrustes_residual: None,
            pull: 1.0,
        };
        a.adopt(1, &figures, published.shallow_clone(), &[])
            .unwrap();
        let node = NodeRef {
            node_type: 0,
            index: 2,
        };
        a.adopt(2, &figures, snapshot(2, &[4, 2], 3), &[node])
            .unwrap();
        let row = |s: &Snapshot| s.tables[0].get(2).abs().sum(Kind::Float).double_value(&[]);
        assert_eq!(row(&a.anchor.as_ref().unwrap().1), 0.0);
        assert!(row(&published) > 0.0, "the view keeps its values");
        let (meta, on_disk) = load_snapshot(dir.path(), ANCHOR).unwrap().unwrap();
        assert_eq!((meta.version, row(&on_disk)), (1, 0.0));
        assert!(
            on_disk.tables[0]
                .get(1)
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
    }

    /// A second rotation within `align.rotation_min_interval_secs` is not handed out, however
    /// much it would gain: each one republishes every row.
    #[test]
    fn rotations_are_at_most_one_per_interval() {
        let anchor = snapshot(3, &[200, 50], 16);
        let r = random_rotation(16);
        let turned = Snapshot {
            tables: anchor.tables.iter().map(|t| t.matmul(&r)).collect(),
            relations: anchor.relations.matmul(&r),
        };
        let limited = AlignConfig {
            rotation_min_interval_secs: 3600,
            ..cfg()
        };
        let mut a = Aligner::new(limited, true, None, Default::default()).unwrap();
        a.anchor = Some((1, anchor.shallow_clone()));
        let lens = vec![200, 50];
        for (version, rotated) in [(2, true), (3, false)] {
            let plan = a.plan(version, Some(&lens));
            let out = a.assess(
                version,
                &Candidate::of_snapshot(&turned, &plan),
                Some(&anchor),
            );
            assert_eq!(out.rotation.is_some(), rotated, "version {version}");
        }
    }

    #[test]
    fn a_rotated_model_is_rotated_back_onto_the_anchor_and_passes() {
        let anchor = snapshot(3, &[200, 50], 16);
        let r = random_rotation(16);
        // The current model: the anchor turned by `r`, slightly trained, with 10 new rows.
        let current = Snapshot {
            tables: anchor
                .tables
                .iter()
                .map(|t| {
                    let turned = t.matmul(&r) + Tensor::randn_like(t) * 0.01;
                    Tensor::cat(
                        &[turned, Tensor::randn([10, 16], (Kind::Float, Device::Cpu))],
                        0,
                    )
                })
                .collect(),
            relations: anchor.relations.matmul(&r),
        };
        let out = assess(&current, Some(&anchor), Some(&anchor), &cfg(), true, 1.0, 7);
        assert!(out.hold.is_none());
        let residual = out.figures.procrustes_residual.unwrap();
        assert!(residual < 0.02, "residual {residual}");
        let back = out.rotation.unwrap();
        // The rotation found undoes `r`.
        let product = r.matmul(&back);
        assert!(product.allclose(
            &Tensor::eye(16, (Kind::Float, Device::Cpu)),
            1e-2,
            1e-2,
            false
        ));
        let d = out.figures.anchor.unwrap();
        assert!(d.cosine_mean < 0.01 && d.knn_overlap > 0.9, "{d:?}");
        // Without the rotation the same model looks like it moved everywhere.
        let raw = assess(
            &current,
            Some(&anchor),
            Some(&anchor),
            &cfg(),
            false,
            1.0,
            7,
        );
        assert!(raw.figures.previous.unwrap().cosine_mean > 0.5);
        assert_eq!(
            raw.hold.map(|h| h.label()),
            Some("drift"),
            "over align.hard_limit: held"
        );
    }

    #[test]
    fn the_gate_holds_a_version_with_non_finite_values() {
        let current = snapshot(4, &[20, 20], 8);
        let _ = current.tables[1].get(7).get(3).fill_(f64::NAN);
        let _ = current.relations.get(0).fill_(f64::INFINITY);
        let out = assess(&current, None, None, &cfg(), true, 1.0, 0);
        assert_eq!(out.hold, Some(Hold::NonFinite { rows: 2 }));
        assert!(out.rotation.is_none());
    }

    #[test]
    fn the_first_version_has_nothing_to_compare_with() {
        let current = snapshot(5, &[20], 8);
        let out = assess(&current, None, None, &cfg(), true, 1.0, 0);
        assert!(out.hold.is_none() && out.rotation.is_none());
        assert_eq!(out.figures.previous, None);
        assert_eq!(out.figures.anchor, None);
    }
}
