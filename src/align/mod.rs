//! Align: keeps consecutive versions usable by the models that consume them.
//!
//! Owns the drift measures (pure: cosine, relative L2, neighbour overlap, Procrustes), the
//! [`Aligner`] (the gate, the rotation onto the persisted anchor, the pull controller) and the
//! alignment actor around it. Takes a [`crate::train::Snapshot`] of the trainer's parameters and
//! the version subscribers hold; hands on an [`Assessed`] verdict (hold, rotation, figures for
//! the marker) to the publish stage, and the pull strength for the trainer.

mod actor;
mod aligner;
mod drift;

pub(crate) use actor::{Adopt, AlignActor, Assess, Plan};
pub use aligner::{assess, AlignFigures, AlignStatus, Aligner, Candidate, Hold};
pub(crate) use aligner::{AlignError, AlignReport, Assessed, DriftPlan, PullController};
pub(crate) use drift::relative_l2;
pub use drift::{drift, procrustes, Drift};
