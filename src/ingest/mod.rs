//! Ingest: Kafka's engagement events into the graph store, exactly once.
//!
//! Owns the consumer (assignment at the offsets stored in sled, rebalance handling), decoding
//! and validation of each event, dead letters to the DLQ topic, forwarding an event consumed
//! from a partition that does not own its source to the one that does (`kafka.routed_topic`,
//! docs/architecture.md §9), each batch's changelog records
//! (their format and the restore are [`crate::changelog`]'s), and the store-writer actor that
//! makes each batch and its offsets durable in one sled batch. Hands on edges (in the store, for
//! the trainer) and each event's Kafka timestamp (to the publish stage's freshness tracking).
//!
//! | file | what |
//! |------|------|
//! | `consumer.rs` | the ingest actor and its consumer loop |
//! | `rebalance.rs` | assignment at stored offsets, flush on revoke, lag from statistics |
//! | `batch.rs` | the batch being collected, decoded, and made durable |
//! | `dlq.rs` | copies acknowledged before the store write: dead letters and their headers, forwarded events |
//! | `forward.rs` | which partition owns an event, and its forwarded copies |
//! | `writer.rs` | the store-writer actor (sled's flush on its own thread) |
//! | `status.rs` | ingest's live figures and the batch event that records them |

mod batch;
mod consumer;
mod dlq;
mod forward;
mod rebalance;
mod status;
mod writer;

pub(crate) use consumer::{IngestActor, IngestError, StopIngest};
pub use dlq::{
    HEADER_ERROR, HEADER_ERROR_DETAIL, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TIMESTAMP, HEADER_SOURCE_TOPIC,
};
pub use forward::{HEADER_FORWARDED_OFFSET, HEADER_FORWARDED_PARTITION};
pub use rebalance::IngestContext;
pub(crate) use status::StoreBatchWritten;
pub use status::{IngestStatus, MovedIn};
pub(crate) use writer::{AppendEvents, StoreWriter};
