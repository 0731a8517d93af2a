//! `[publish]` and `[align]`: versions to Kafka and the drift control around them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

/// The `[publish]` section: versions to Kafka (see [`crate::publish`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    pub enabled: bool,
    /// A version every this many milliseconds (start to start); sub-second intervals are fine.
    /// Neither this nor `interval_secs` set: [`DEFAULT_INTERVAL_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// The same in seconds (the older key, kept as an alias); set one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    pub format: ValueFormat,
    pub row_threshold: f64,
    pub path: PathBuf,
    pub delivery_timeout_ms: u64,
    /// Each version's rows and marker in one Kafka transaction.
    pub transactional: bool,
    /// `transactional.id` of the version producer; unique per daemon (a second producer with
    /// the same id fences the first).
    pub transactional_id: String,
    /// Product quantization of node rows (read when `format = "pq"`).
    #[serde(default)]
    pub pq: PqConfig,
}

/// The `[publish.pq]` section: how `publish.format = "pq"` compresses node rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PqConfig {
    /// Sub-spaces `m`: a row is `m` bytes (must divide `train.dim`). At dim 128, 32 sub-spaces
    /// is 16× smaller than f32.
    pub subspaces: usize,
    /// `Σ‖x − x̂‖² / Σ‖x‖²` of a version's rows over which the codebooks are retrained (the next
    /// version then carries every row, coded with the new codebooks).
    pub max_relative_error: f64,
    /// Rows sampled to learn the codebooks.
    pub sample_rows: usize,
    /// Lloyd iterations of the k-means.
    pub iterations: usize,
    pub seed: u64,
}

/// Centroids per product-quantization sub-space: one byte a code (`crate::publish::CENTROIDS`).
pub const PQ_CENTROIDS: i64 = 256;

impl Default for PqConfig {
    fn default() -> PqConfig {
        PqConfig {
            subspaces: 32,
            max_relative_error: 0.1,
            sample_rows: 65_536,
            iterations: 15,
            seed: 1,
        }
    }
}

/// `publish.interval_ms` when neither interval key is set.
pub(super) const DEFAULT_INTERVAL_MS: u64 = 10_000;

impl PublishConfig {
    /// Time between two versions' starts: `publish.interval_ms`, or `publish.interval_secs`
    /// (validation refuses both).
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(match (self.interval_ms, self.interval_secs) {
            (Some(ms), _) => ms,
            (None, Some(secs)) => secs.saturating_mul(1000),
            (None, None) => DEFAULT_INTERVAL_MS,
        })
    }
}

/// How embedding rows are encoded (`publish.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// `{"version":…,"epoch":…,"ts":…,"vector":[…]}`
    Json,
    /// `b"TWE1"`, version u64, epoch u64, ts i64, dim u32, then `dim` f32, all little-endian.
    F32le,
    /// Node rows product-quantized (`b"TWQ1"`, a byte per sub-space, `[publish.pq]`) with the
    /// codebooks published as a record of their own (`b"TWC1"`); relation vectors as `f32le`.
    Pq,
}

/// The `[align]` config section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignConfig {
    /// Drift control on: the pull and the rotation. Off: versions go out as trained (drift is
    /// still measured, and the gate still holds non-finite or runaway versions).
    pub enabled: bool,
    /// Target mean cosine distance of a version from the previous one.
    pub max_drift: f64,
    /// Mean cosine distance from the previous version over which a version is held back.
    pub hard_limit: f64,
    pub pull_init: f64,
    pub pull_min: f64,
    pub pull_max: f64,
    /// Rotate onto the anchor before publishing (ignored for the `l1` comparator, which a
    /// rotation changes).
    pub procrustes: bool,
    /// Nodes sampled for the top-10 neighbour overlap (among the drift sample).
    pub overlap_sample: usize,
    /// Rows (over all node types) each drift measure and the rotation's fit sample, against the
    /// reference and against the anchor: the assessment's cost is bounded by this, not by the
    /// tables.
    #[serde(default = "default_drift_sample")]
    pub drift_sample: usize,
    /// The rotation onto the anchor is applied only when it lowers the sample's relative
    /// residual by more than this (rotating the model turns and republishes every row).
    #[serde(default = "default_rotation_min_gain")]
    pub rotation_min_gain: f64,
    /// At most one rotation per this many seconds: each one turns and republishes every row.
    #[serde(default = "default_rotation_min_interval_secs")]
    pub rotation_min_interval_secs: u64,
}

fn default_rotation_min_interval_secs() -> u64 {
    60
}

fn default_drift_sample() -> usize {
    4096
}

fn default_rotation_min_gain() -> f64 {
    0.01
}

impl Validate for PublishConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let pb = self;
        match (pb.interval_ms, pb.interval_secs) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "publish.interval_ms",
                    "and publish.interval_secs are both set: set one (interval_secs is the older \
                     alias of interval_ms / 1000)",
                ))
            }
            (Some(ms), None) => positive("publish.interval_ms", ms)?,
            (None, Some(secs)) => positive("publish.interval_secs", secs)?,
            (None, None) => {}
        }
        positive("publish.delivery_timeout_ms", pb.delivery_timeout_ms)?;
        if pb.transactional && pb.transactional_id.trim().is_empty() {
            return Err(invalid(
                "publish.transactional_id",
                "must not be empty when publish.transactional = true",
            ));
        }
        if !(pb.row_threshold.is_finite() && pb.row_threshold >= 0.0) {
            return Err(invalid(
                "publish.row_threshold",
                "must be a non-negative number",
            ));
        }
        let pq = &pb.pq;
        positive("publish.pq.subspaces", pq.subspaces as u64)?;
        positive("publish.pq.iterations", pq.iterations as u64)?;
        if pq.sample_rows < PQ_CENTROIDS as usize {
            return Err(invalid(
                "publish.pq.sample_rows",
                "must be at least 256 (the centroids of a sub-space)",
            ));
        }
        if !(pq.max_relative_error.is_finite() && pq.max_relative_error > 0.0) {
            return Err(invalid(
                "publish.pq.max_relative_error",
                "must be a positive number",
            ));
        }
        Ok(())
    }
}

impl Validate for AlignConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let al = self;
        for (key, v) in [
            ("align.max_drift", al.max_drift),
            ("align.hard_limit", al.hard_limit),
            ("align.pull_init", al.pull_init),
            ("align.pull_min", al.pull_min),
            ("align.pull_max", al.pull_max),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if al.max_drift >= al.hard_limit {
            return Err(invalid(
                "align.max_drift",
                format!("must be below align.hard_limit ({})", al.hard_limit),
            ));
        }
        if !(al.pull_min <= al.pull_init && al.pull_init <= al.pull_max) {
            return Err(invalid(
                "align.pull_init",
                "must lie within align.pull_min..=align.pull_max",
            ));
        }
        positive("align.overlap_sample", al.overlap_sample as u64)?;
        positive("align.drift_sample", al.drift_sample as u64)?;
        if al.overlap_sample > al.drift_sample {
            return Err(invalid(
                "align.overlap_sample",
                format!(
                    "must not exceed align.drift_sample ({}): the overlap is measured among the drift sample",
                    al.drift_sample
                ),
            ));
        }
        if !(al.rotation_min_gain.is_finite() && al.rotation_min_gain >= 0.0) {
            return Err(invalid(
                "align.rotation_min_gain",
                "must be a non-negative number",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn publish(ms: Option<u64>, secs: Option<u64>) -> Result<PublishConfig, String> {
        let mut p = Config::from_toml("").expect("default config").publish;
        (p.interval_ms, p.interval_secs) = (ms, secs);
        p.validate().map(|_| p).map_err(|e| e.to_string())
    }

    #[test]
    fn the_interval_in_ms_or_secs_but_not_both() {
        let default = Config::from_toml("").unwrap().publish.interval();
        assert_eq!(
            default,
            std::time::Duration::from_millis(DEFAULT_INTERVAL_MS)
        );
        assert_eq!(
            publish(Some(250), None).unwrap().interval().as_millis(),
            250
        );
        assert_eq!(publish(None, Some(3)).unwrap().interval().as_millis(), 3000);
        let both = publish(Some(250), Some(3)).unwrap_err();
        assert!(
            both.contains("publish.interval_ms") && both.contains("publish.interval_secs"),
            "{both}"
        );
        assert!(publish(Some(0), None)
            .unwrap_err()
            .contains("publish.interval_ms"));
        assert!(publish(None, Some(0))
            .unwrap_err()
            .contains("publish.interval_secs"));
    }
}
