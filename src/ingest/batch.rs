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

use crate::changelog;
use crate::config::Config;
use crate::ingest::dlq::{deliver_dead_letters, DeadLetter};
use crate::ingest::{AppendEvents, IngestError, IngestStatus, StoreBatchWritten, StoreWriter};
use crate::persist::now_ms;
use crate::schema::{decode_event, DecodeLimits, Schema};
use crate::store::{AppendBatch, AppendOutcome, GraphStore, RecordPrint, SourcedEvent};
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

/// How a batch in flight ended.
pub(super) enum Written {
    /// Its changelog records acknowledged, then the store write flushed.
    Durable(AppendOutcome),
    /// Asked to stop while the changelog did not acknowledge: nothing was written to the store,
    /// and the batch is consumed again at the next start.
    Stopped,
}

/// A batch handed to the changelog and the store writer, not yet known to be durable.
pub(super) struct InFlight {
    outcome: tokio::task::JoinHandle<Result<Written, IngestError>>,
    kafka_ts: Vec<i64>,
    consumed: u64,
    invalid: u64,
    started: Instant,
}

/// The answer for an [`InFlight`] batch.
pub(super) type Answer = Result<Result<Written, IngestError>, tokio::task::JoinError>;

impl InFlight {
    /// The writer's answer, when it comes (cancel-safe: poll it again later).
    pub(super) async fn answer(&mut self) -> Answer {
        (&mut self.outcome).await
    }
}

/// What writing a batch needs.
pub(super) struct BatchWriter<'a> {
    pub cfg: &'a Config,
    pub schema: &'a Schema,
    pub topic: &'a str,
    /// Delivers dead letters and changelog records.
    pub producer: &'a FutureProducer,
    pub store: &'a GraphStore,
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
        match self.prepare(stop_rx, pending).await {
            Some(prepared) => {
                let in_flight = self.launch(prepared, stop_rx);
                self.finish(in_flight).await.map(|()| true)
            }
            None => Ok(false),
        }
    }

    /// Deliver the batch's dead letters, then hand its changelog records to the producer
    /// without waiting for them. `pending` is empty afterwards. `None`: asked to stop while the
    /// DLQ was unreachable (nothing written; `pending` kept).
    ///
    /// The records may go out while the batch before is still in flight: the producer keeps each
    /// changelog partition in the order records are handed over, and [`Self::launch`] comes after
    /// that batch is durable.
    pub(super) async fn prepare(
        &self,
        stop_rx: &mut watch::Receiver<bool>,
        pending: &mut Pending,
    ) -> Option<Prepared> {
        let started = Instant::now();
        if !self.deliver_dead_letters(stop_rx, pending).await {
            return None;
        }
        let pending = std::mem::take(pending);
        let batch = AppendBatch {
            topic: self.topic.to_owned(),
            events: pending.events,
            next_offsets: pending.next_offsets.into_iter().collect(),
            last_records: pending.last_records.into_iter().collect(),
            extra_offsets: Vec::new(),
        };
        let changelog = &self.cfg.kafka.changelog_topic;
        // A store from before the changelog: its first record of a partition says so.
        let after_history = |p| {
            let held = |topic: &str| self.store.stored_offset(topic, p).ok().flatten();
            held(&batch.topic).is_some() && held(changelog).is_none()
        };
        let records = changelog::records_of(self.schema, &batch, after_history);
        let sent = changelog::send(self.producer, changelog, &records).await;
        Some(Prepared {
            log: ChangelogDelivery {
                producer: self.producer.clone(),
                topic: changelog.clone(),
                records,
                sent,
            },
            batch,
            kafka_ts: pending.kafka_ts,
            consumed: pending.consumed,
            invalid: pending.dead.len() as u64,
            started,
        })
    }

    /// Once the batch before is durable: wait for the prepared batch's changelog
    /// acknowledgements and write it to the store, beside the loop that consumes the next one.
    /// At most one batch is in flight ([`Self::finish`] it before the next, or before anything
    /// else touches the stored offsets); the writer is one thread taking batches in order.
    pub(super) fn launch(&self, p: Prepared, stop_rx: &watch::Receiver<bool>) -> InFlight {
        let (writer, stop) = (self.writer.clone(), stop_rx.clone());
        InFlight {
            outcome: actix::spawn(log_then_write(p.log, p.batch, writer, stop)),
            kafka_ts: p.kafka_ts,
            consumed: p.consumed,
            invalid: p.invalid,
            started: p.started,
        }
    }

    /// Wait until the batch `start` handed on is durable, then count it.
    pub(super) async fn finish(&self, mut in_flight: InFlight) -> Result<(), IngestError> {
        let answer = in_flight.answer().await;
        self.settle(in_flight, answer)
    }

    /// Count a batch the writer answered for (its `answer`).
    pub(super) fn settle(&self, in_flight: InFlight, answer: Answer) -> Result<(), IngestError> {
        let outcome = match answer.map_err(|_| IngestError::WriterGone)?? {
            Written::Durable(outcome) => outcome,
            Written::Stopped => return Ok(()),
        };
        if outcome.appended > 0 {
            let new_node_ts = outcome
                .node_creating_events
                .iter()
                .filter_map(|&i| in_flight.kafka_ts.get(i as usize).copied())
                .collect();
            self.status.freshness.ingested(
                outcome.first_seq + outcome.appended,
                in_flight.kafka_ts,
                new_node_ts,
            );
        }
        StoreBatchWritten {
            consumed: in_flight.consumed,
            invalid: in_flight.invalid,
            appended: outcome.appended,
            duplicate_event_ids: outcome.duplicate_event_ids,
            redelivered: outcome.already_stored,
            new_nodes: outcome.new_nodes,
            erased: outcome.erased,
            erased_refused: outcome.erased_refused,
            seconds: in_flight.started.elapsed().as_secs_f64(),
        }
        .emit(self.status);
        Ok(())
    }

    /// Retry until the DLQ acknowledges every dead letter; `false` when asked to stop first.
    async fn deliver_dead_letters(
        &self,
        stop_rx: &mut watch::Receiver<bool>,
        pending: &Pending,
    ) -> bool {
        let mut backoff = Backoff::default();
        while !pending.dead.is_empty() {
            match deliver_dead_letters(self.cfg, self.producer, &pending.dead).await {
                Ok(()) => {
                    metrics::counter!(m::DLQ_PRODUCED).increment(pending.dead.len() as u64);
                    break;
                }
                Err(e) => {
                    metrics::counter!(m::BATCH_RETRIES).increment(1);
                    warn!(error = %e, dead_letters = pending.dead.len(), "DLQ not acknowledged; retrying");
                    tokio::select! {
                        _ = stop_rx.changed() => return false,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
        }
        true
    }
}

/// A batch whose dead letters are delivered and whose changelog records are on their way.
pub(super) struct Prepared {
    log: ChangelogDelivery,
    batch: AppendBatch,
    kafka_ts: Vec<i64>,
    consumed: u64,
    invalid: u64,
    started: Instant,
}

/// What the changelog delivery of one batch needs, owned (it runs beside the consume loop).
struct ChangelogDelivery {
    producer: FutureProducer,
    topic: String,
    records: Vec<changelog::ChangelogRecord>,
    /// The records handed to the producer: their acknowledgements, or why they were not taken.
    sent: Result<Vec<rdkafka::producer::DeliveryFuture>, rdkafka::error::KafkaError>,
}

/// The batch's changelog records ([`crate::changelog`]), retried until acknowledged, then the
/// batch with the changelog positions after them, written to the store: the changelog is never
/// behind the store. [`Written::Stopped`] when asked to stop before the acknowledgement.
async fn log_then_write(
    log: ChangelogDelivery,
    mut batch: AppendBatch,
    writer: Addr<StoreWriter>,
    stop: watch::Receiver<bool>,
) -> Result<Written, IngestError> {
    let mut backoff = Backoff::default();
    let mut sent = log.sent;
    let positions = loop {
        if *stop.borrow() {
            return Ok(Written::Stopped);
        }
        let acknowledged = match sent {
            Ok(deliveries) => changelog::acknowledged(deliveries).await,
            Err(e) => Err(e),
        };
        match acknowledged {
            Ok(positions) => break positions,
            Err(e) => {
                metrics::counter!(m::BATCH_RETRIES).increment(1);
                warn!(error = %e, records = log.records.len(), "changelog not acknowledged; retrying");
                tokio::time::sleep(backoff.next()).await;
                // Every record again: one that was acknowledged is there twice, which the
                // restore skips by its offsets.
                sent = changelog::send(&log.producer, &log.topic, &log.records).await;
            }
        }
    };
    batch.extra_offsets = (positions.into_iter())
        .map(|(p, next)| (log.topic.clone(), p, next))
        .collect();
    let topic = batch.topic.clone();
    match writer.send(AppendEvents(batch)).await {
        Ok(Ok(outcome)) => Ok(Written::Durable(outcome)),
        Ok(Err(source)) => Err(IngestError::Store { topic, source }),
        Err(_) => Err(IngestError::WriterGone),
    }
}

/// The wait before each retry of a delivery: 100 ms, doubling up to 5 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (wait * 2).min(Duration::from_secs(5));
        wait
    }
}
