//! Train: turns the store's edge log into better embeddings.
//!
//! Owns the model (embedding tables, relation vectors, row-wise Adagrad), the pure score and loss
//! functions, one training step (groups → scores → loss → update), warm start of new rows,
//! prequential ranking, checkpoints, the libtorch device, and the trainer actor with its
//! messages. Reads edges from the [`crate::store::GraphStore`] from its cursor; hands on
//! [`Snapshot`]s of its parameters (to align and publish) and its figures ([`TrainerStatus`]).

mod actor;
mod checkpoint;
mod device;
mod interests;
mod logistic_host;
mod loss;
mod model;
mod prequential;
mod query;
mod rank;
mod score;
mod snapshot;
mod status;
mod step;
mod trainer;
mod warm;

pub use actor::*;
pub use checkpoint::*;
pub use device::*;
pub use interests::*;
pub use loss::*;
pub use model::*;
pub use prequential::*;
pub use query::*;
pub use rank::*;
pub use score::*;
pub use snapshot::*;
pub use status::*;
pub use step::*;
pub use trainer::*;
pub use warm::*;
