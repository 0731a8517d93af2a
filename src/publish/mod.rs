//! Publish: turns the trainer's parameters into versions on Kafka that subscribers apply whole.
//!
//! Owns the wire formats (rows, markers; JSON or f32le), the numbering ledger, the version
//! producer (rows, then the marker, optionally in one transaction; an epoch per attempt),
//! event-to-publish freshness, and the subscriber side's [`subscriber::VersionAssembler`].
//! Takes the trainer's parameters and the aligner's verdict; hands on the committed version to
//! the serving view. The contract is `topics/README.md`.

mod freshness;
mod ledger;
mod machine;
mod pq;
mod producer;
mod quantizer;
mod rows;
pub mod subscriber;
mod version;
mod wire;

pub use freshness::*;
pub use ledger::*;
pub use machine::*;
pub use pq::*;
pub use producer::*;
pub use quantizer::*;
pub use rows::*;
pub use version::*;
pub use wire::*;
