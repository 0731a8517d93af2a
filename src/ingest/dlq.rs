//! Dead letters: an invalid event goes to the DLQ topic unchanged, with headers naming the
//! reason and where it came from (documented in `topics/README.md`), acknowledged before the
//! batch that covers its offset is written.

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

/// One invalid event on its way to the DLQ.
pub(super) struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

impl DeadLetter {
    /// `msg` as it came, with headers naming `invalid`'s reason and detail and the source.
    pub(super) fn of(
        msg: &BorrowedMessage<'_>,
        invalid: &InvalidEvent,
        kafka_ts: Option<u64>,
    ) -> Self {
        let mut headers = msg.headers().map(|h| h.detach()).unwrap_or_default();
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        let ts = kafka_ts.map(|t| t.to_string()).unwrap_or_default();
        for (key, value) in [
            (HEADER_ERROR, invalid.reason.as_str()),
            (HEADER_ERROR_DETAIL, invalid.detail.as_str()),
            (HEADER_SOURCE_TOPIC, msg.topic()),
            (HEADER_SOURCE_PARTITION, partition.as_str()),
            (HEADER_SOURCE_OFFSET, offset.as_str()),
            (HEADER_SOURCE_TIMESTAMP, ts.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        DeadLetter {
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
        }
    }
}

/// Send every dead letter and wait for all acknowledgements (`ingest.dlq_timeout_ms` each).
pub(super) async fn deliver_dead_letters(
    cfg: &Config,
    dlq: &FutureProducer,
    dead: &[DeadLetter],
) -> Result<(), KafkaError> {
    let timeout = Duration::from_millis(cfg.ingest.dlq_timeout_ms);
    let sends = dead.iter().map(|d| {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&cfg.kafka.dlq_topic).headers(d.headers.clone());
        if let Some(k) = &d.key {
            record = record.key(k.as_slice());
        }
        if let Some(p) = &d.payload {
            record = record.payload(p.as_slice());
        }
        dlq.send(record, timeout)
    });
    for r in join_all(sends).await {
        r.map_err(|(e, _)| e)?;
    }
    Ok(())
}
