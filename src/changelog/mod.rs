//! The store's changelog: the store's state in Kafka, so that it can be rebuilt without the
//! input's history (input topics have retention), on this machine after its disk is lost and,
//! with scale-out, by the instance that takes over a partition (docs/architecture.md §9: the
//! Kafka Streams state-store pattern).
//!
//! Owns the record format, its writing (ingest delivers a batch's records and waits for their
//! acknowledgement before the store write, as it does for dead letters) and the restore, of an
//! empty store at start and of each partition assigned (another instance may have owned it
//! meanwhile). Hands
//! on the store, brought up to the changelog's end before ingest resumes at the store's offsets.
//!
//! Input partition `p` is logged to changelog partition `p`. A record holds one batch's valid
//! events of one input partition with their offsets, and the partition's next offset after the
//! batch; the store keeps the changelog offset it has applied beside its input offsets, in the
//! same atomic write. Events travel with their schema's names, not its numbers.
//!
//! | file | what |
//! |------|------|
//! | `format.rs` | the record, `TWL1` + bincode (pure) |
//! | `writer.rs` | a batch's records, delivered and acknowledged |
//! | `restore.rs` | the store brought up to the changelog's end |

mod format;
mod restore;
mod writer;

pub use format::{
    ChangelogFormatError, ChangelogRecord, LoggedEvent, CHANGELOG_MAGIC, CHANGELOG_MAGIC_1,
};
pub use restore::{restore, restore_partitions, RestoreError, Restored};
pub(crate) use writer::{acknowledged, records_of, send};
