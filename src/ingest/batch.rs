//! The batch being collected: each message decoded into a valid event or a dead letter; then,
//! when full or old enough, made durable (dead letters acknowledged first, then one atomic sled
//! batch of the events and the offsets they cover).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::Addr;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::Message as _;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::Config;
use crate::ingest::dlq::{deliver_dead_letters, DeadLetter};
use crate::ingest::{AppendEvents, IngestError, IngestStatus, StoreBatchWritten, StoreWriter};
use crate::persist::now_ms;
use crate::schema::{decode_event, DecodeLimits, Schema};
use crate::store::{AppendBatch, RecordPrint, SourcedEvent};
use crate::telemetry as m;

/// Events consumed but not yet durable.
#[derive(Default)]
pub(super) struct Pending {
    events: Vec<SourcedEvent>,
    /// Kafka timestamps (ms) of `events`, for the freshness histogram.
    kafka_ts: Vec<i64>,
    dead: Vec<DeadLetter>,
    next_offsets: HashMap<i32, i64>,
    /// The last record consumed per partition (valid or not).
    last_records: HashMap<i32, RecordPrint>,
    pub(super) consumed: u64,
    pub(super) since: Option<Instant>,
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.consumed == 0
    }

    /// Decode one message into the batch: a valid event, or a dead letter with its reason.
    pub(super) fn accept(
        &mut self,
        schema: &Schema,
        limits: &DecodeLimits,
        msg: &BorrowedMessage<'_>,
    ) {
        metrics::counter!(m::EVENTS_CONSUMED).increment(1);
        let (p, offset) = (msg.partition(), msg.offset());
        let kafka_ts = msg
            .timestamp()
            .to_millis()
            .filter(|&t| t >= 0)
            .map(|t| t as u64);
        let record_ts = kafka_ts.unwrap_or_else(|| now_ms() as u64);
        match decode_event(schema, limits, msg.payload(), record_ts) {
            Ok(event) => {
                self.kafka_ts.push(record_ts as i64);
                self.events.push(SourcedEvent {
                    partition: p,
                    offset,
                    event,
                })
            }
            Err(invalid) => {
                metrics::counter!(m::EVENTS_INVALID, "reason" => invalid.reason.as_str())
                    .increment(1);
                debug!(partition = p, offset, reason = %invalid.reason, detail = invalid.detail, "invalid event");
                self.dead.push(DeadLetter::of(msg, &invalid, kafka_ts));
            }
        }
        let print = RecordPrint::of(
            offset,
            msg.timestamp().to_millis(),
            msg.key(),
            msg.payload(),
        );
        self.last_records.insert(p, print);
        let next = self.next_offsets.entry(p).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
        self.consumed += 1;
        self.since.get_or_insert_with(Instant::now);
    }
}

/// What writing a batch needs.
pub(super) struct BatchWriter<'a> {
    pub cfg: &'a Config,
    pub topic: &'a str,
    pub dlq: &'a FutureProducer,
    pub writer: &'a Addr<StoreWriter>,
    pub status: &'a IngestStatus,
}

impl BatchWriter<'_> {
    /// Make the pending batch durable: DLQ first, then the atomic append. Returns `Ok(false)`
    /// when asked to stop while the DLQ was still unreachable (nothing was written; it will be
    /// re-consumed).
    pub(super) async fn write(
        &self,
        stop_rx: &mut watch::Receiver<bool>,
        pending: &mut Pending,
    ) -> Result<bool, IngestError> {
        let started = Instant::now();
        if !self.deliver_dead_letters(stop_rx, pending).await {
            return Ok(false);
        }
        let batch = AppendBatch {
            topic: self.topic.to_owned(),
            events: std::mem::take(&mut pending.events),
            next_offsets: pending.next_offsets.drain().collect(),
            last_records: pending.last_records.drain().collect(),
        };
        let outcome = self
            .writer
            .send(AppendEvents(batch))
            .await
            .map_err(|_| IngestError::WriterGone)?
            .map_err(|source| IngestError::Store {
                topic: self.topic.to_owned(),
                source,
            })?;
        if outcome.appended > 0 {
            let new_node_ts = outcome
                .node_creating_events
                .iter()
                .filter_map(|&i| pending.kafka_ts.get(i as usize).copied())
                .collect();
            self.status.freshness.ingested(
                outcome.first_seq + outcome.appended,
                std::mem::take(&mut pending.kafka_ts),
                new_node_ts,
            );
        }
        StoreBatchWritten {
            consumed: pending.consumed,
            invalid: pending.dead.len() as u64,
            appended: outcome.appended,
            duplicate_event_ids: outcome.duplicate_event_ids,
            redelivered: outcome.already_stored,
            new_nodes: outcome.new_nodes,
            seconds: started.elapsed().as_secs_f64(),
        }
        .emit(self.status);
        *pending = Pending::default();
        Ok(true)
    }

    /// Retry until the DLQ acknowledges every dead letter; `false` when asked to stop first.
    async fn deliver_dead_letters(
        &self,
        stop_rx: &mut watch::Receiver<bool>,
        pending: &Pending,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        while !pending.dead.is_empty() {
            match deliver_dead_letters(self.cfg, self.dlq, &pending.dead).await {
                Ok(()) => {
                    metrics::counter!(m::DLQ_PRODUCED).increment(pending.dead.len() as u64);
                    break;
                }
                Err(e) => {
                    metrics::counter!(m::BATCH_RETRIES).increment(1);
                    warn!(error = %e, dead_letters = pending.dead.len(), "DLQ not acknowledged; retrying");
                    tokio::select! {
                        _ = stop_rx.changed() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        true
    }
}
