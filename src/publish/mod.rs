//! Publish: turns the trainer's parameters into versions on Kafka that subscribers apply whole.
//!
//! Owns the wire formats (rows, markers; JSON or f32le), the numbering ledger (reconciled at
//! start with the versions topic's newest markers, which are what subscribers hold), the version
//! producer (rows, then the marker, optionally in one transaction; an epoch per attempt),
//! event-to-publish freshness, the subscriber side's [`subscriber::VersionAssembler`], and the
//! published state read back from the topics ([`read_version`]).
//! Takes the trainer's parameters and the aligner's verdict; hands on the committed version to
//! the serving view. The contract is `topics/README.md`.

mod freshness;
mod ledger;
mod machine;
mod pq_codebooks;
mod pq_policy;
mod producer;
mod published;
mod rows;
mod scope;
pub mod subscriber;
mod tail;
mod version;
mod wire;

/// The publishing settings live in `[publish]` (config); the stage's code names them from here.
pub use crate::config::{ValueFormat, PQ_CENTROIDS as CENTROIDS};
pub(crate) use freshness::{Freshness, FreshnessFigures};
pub use ledger::{
    ForeignVersions, Ledger, LedgerError, ReconcileError, TopicDisagreement, VersionsTail,
};
pub use machine::{
    publish_in_process, InProcessTrainer, MemorySink, Outcome, PqPublishFigures, Publication,
    VersionSettings, VersionSink,
};
pub(crate) use machine::{InProgress, PublishStatus, TrainerActorPort};
pub use pq_codebooks::{relative_error, Codebooks};
pub(crate) use pq_codebooks::{squared_error, PqError, PqTable};
pub(crate) use pq_policy::{served_codes, Coding, Quantizer};
pub use producer::KafkaSink;
pub use published::{read_version, ReadVersionError, TopicRecord, VersionTable};
pub(crate) use rows::{RowRef, VersionRows};
pub use scope::Scope;
pub use tail::{
    read_versions_tail, read_versions_tail_checked, read_versions_tail_of, reconcile_with_tail,
    reconcile_with_versions_topic, VersionsTopicError,
};
pub use version::{
    build_delta_version, PreparedVersion, PublishedView, ServedCodes, VersionRequest,
};
pub(crate) use version::{codebooks_key, row_mask, ViewUpdate};
pub(crate) use wire::{
    encode_coded, encode_f32le, CodebooksRecord, CodedRow, CODEBOOKS_PREFIX,
    TOMBSTONE_EPOCH_HEADER, TOMBSTONE_VERSION_HEADER,
};
pub use wire::{
    tombstone_attempt, AttemptRef, DecodeError, Record, RowRecord, VersionMarker, CONTRACT,
};
