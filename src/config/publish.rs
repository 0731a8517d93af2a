//! `[publish]` and `[align]`: versions to Kafka and the drift control around them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

/// The `[publish]` section: versions to Kafka (see [`crate::publish`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    pub enabled: bool,
    pub interval_secs: u64,
    pub format: ValueFormat,
    pub row_threshold: f64,
    pub path: PathBuf,
    pub delivery_timeout_ms: u64,
    /// Each version's rows and marker in one Kafka transaction.
    pub transactional: bool,
    /// `transactional.id` of the version producer; unique per daemon (a second producer with
    /// the same id fences the first).
    pub transactional_id: String,
}

/// How embedding rows are encoded (`publish.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// `{"version":…,"epoch":…,"ts":…,"vector":[…]}`
    Json,
    /// `b"TWE1"`, version u64, epoch u64, ts i64, dim u32, then `dim` f32, all little-endian.
    F32le,
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
    /// Nodes sampled for the top-10 neighbour overlap.
    pub overlap_sample: usize,
}

impl Validate for PublishConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let pb = self;
        positive("publish.interval_secs", pb.interval_secs)?;
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
        Ok(())
    }
}
