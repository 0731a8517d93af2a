//! Ingest: Kafka's engagement events into the graph store, exactly once.
//!
//! Owns the consumer (assignment at the offsets stored in sled, rebalance handling), decoding
//! and validation of each event, dead letters to the DLQ topic, and the store-writer actor that
//! makes each batch and its offsets durable in one sled batch. Hands on edges (in the store, for
//! the trainer) and each event's Kafka timestamp (to the publish stage's freshness tracking).

mod consumer;
mod writer;

pub use consumer::*;
pub use writer::*;
