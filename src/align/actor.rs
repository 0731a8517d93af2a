//! The alignment actor: an [`Aligner`] on its own `SyncArbiter` thread (the measures are
//! libtorch work), and the messages it receives from the publish stage.

use actix::prelude::*;

use crate::align::{AlignError, AlignFigures, Aligner, Assessed, Candidate, DriftPlan};
use crate::train::Snapshot;

/// The actor: an [`Aligner`] on a `SyncArbiter` thread (the measures are libtorch work).
pub struct AlignActor(pub Aligner);

impl Actor for AlignActor {
    type Context = SyncContext<Self>;
}

/// The rows the next version's drift is measured on (see [`Aligner::plan`]).
#[derive(Message)]
#[rtype(result = "DriftPlan")]
pub struct Plan {
    pub version: u64,
    /// Rows per node type of the version subscribers hold.
    pub reference: Option<Vec<i64>>,
}

impl Handler<Plan> for AlignActor {
    type Result = MessageResult<Plan>;

    fn handle(&mut self, msg: Plan, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.0.plan(msg.version, msg.reference.as_deref()))
    }
}

/// Assess the next version (see [`Aligner::assess`]).
#[derive(Message)]
#[rtype(result = "Assessed")]
pub struct Assess {
    pub version: u64,
    pub current: Candidate,
    pub reference: Option<Snapshot>,
}

impl Handler<Assess> for AlignActor {
    type Result = MessageResult<Assess>;

    fn handle(&mut self, msg: Assess, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.0
                .assess(msg.version, &msg.current, msg.reference.as_ref()),
        )
    }
}

/// Version `version` was acknowledged (see [`Aligner::adopt`]); resolves with the pull strength
/// for the next interval.
#[derive(Message)]
#[rtype(result = "Result<f64, AlignError>")]
pub struct Adopt {
    pub version: u64,
    pub figures: AlignFigures,
    pub published: Snapshot,
    /// Nodes the version erased: their anchor rows are zeroed.
    pub erased: Vec<crate::store::NodeRef>,
}

impl Handler<Adopt> for AlignActor {
    type Result = Result<f64, AlignError>;

    fn handle(&mut self, msg: Adopt, _: &mut Self::Context) -> Self::Result {
        self.0
            .adopt(msg.version, &msg.figures, msg.published, &msg.erased)
    }
}
