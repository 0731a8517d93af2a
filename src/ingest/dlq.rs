//! Copies of consumed records, acknowledged before the batch that covers their offsets is
//! written: dead letters (an invalid event goes to the DLQ topic unchanged, with headers naming
//! the reason and where it came from, documented in `topics/README.md`) and forwarded events
//! ([`super::forward`]).

use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message as _;

use crate::config::Config;
use crate::schema::InvalidEvent;

pub const HEADER_ERROR: &str = "twhin.error";
pub const HEADER_ERROR_DETAIL: &str = "twhin.error.detail";
pub const HEADER_SOURCE_TOPIC: &str = "twhin.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "twhin.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "twhin.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "twhin.source.timestamp";

/// Where a [`Copy`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyTo {
    /// The DLQ topic (`kafka.dlq_topic`), partitioned by the producer.
    Dlq,
    /// This partition of the routed topic (`kafka.routed_topic`).
    Routed(i32),
}

/// A consumed record on its way to another topic before the batch that consumed it is written:
/// a dead letter, or an event forwarded to the partition that owns it.
pub(super) struct Copy {
    to: CopyTo,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
    /// The record's timestamp (ms); `None`: the time it is produced.
    timestamp: Option<i64>,
}

impl Copy {
    /// `msg`'s key and payload, its headers followed by `added`.
    pub(super) fn of(msg: &BorrowedMessage<'_>, to: CopyTo, added: &[(&str, &str)]) -> Self {
        let mut headers = msg.headers().map(|h| h.detach()).unwrap_or_default();
        for &(key, value) in added {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        Copy {
            to,
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
            timestamp: None,
        }
    }

    pub(super) fn with_timestamp(mut self, ts: Option<i64>) -> Self {
        self.timestamp = ts;
        self
    }

    /// `msg` as it came, with headers naming `invalid`'s reason and detail and the source.
    pub(super) fn dead_letter(
        msg: &BorrowedMessage<'_>,
        invalid: &InvalidEvent,
        kafka_ts: Option<u64>,
    ) -> Self {
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let ts = kafka_ts.map(|t| t.to_string()).unwrap_or_default();
        Copy::of(
            msg,
            CopyTo::Dlq,
            &[
                (HEADER_ERROR, invalid.reason.as_str()),
                (HEADER_ERROR_DETAIL, invalid.detail.as_str()),
                (HEADER_SOURCE_TOPIC, msg.topic()),
                (HEADER_SOURCE_PARTITION, partition.as_str()),
                (HEADER_SOURCE_OFFSET, offset.as_str()),
                (HEADER_SOURCE_TIMESTAMP, ts.as_str()),
            ],
        )
    }
}

/// Send every copy and wait for all acknowledgements (`ingest.dlq_timeout_ms` each).
pub(super) async fn deliver_copies(
    cfg: &Config,
    producer: &FutureProducer,
    copies: &[Copy],
) -> Result<(), KafkaError> {
    let timeout = Duration::from_millis(cfg.ingest.dlq_timeout_ms);
    let sends = copies.iter().map(|c| {
        let topic = match c.to {
            CopyTo::Dlq => &cfg.kafka.dlq_topic,
            CopyTo::Routed(_) => &cfg.kafka.routed_topic,
        };
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(c.headers.clone());
        if let CopyTo::Routed(q) = c.to {
            record = record.partition(q);
        }
        if let Some(ts) = c.timestamp {
            record = record.timestamp(ts);
        }
        if let Some(k) = &c.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &c.payload {
            record = record.payload(p.as_slice());
        }
        producer.send(record, timeout)
    });
    for r in join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(())
}
