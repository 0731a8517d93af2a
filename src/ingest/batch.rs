//! The batch being collected: each message decoded into a valid event (stored here, or
//! forwarded to the partition that owns it) or a dead letter; then, when full or old enough,
//! made durable (dead letters and forwarded events acknowledged first, then one atomic sled
//! batch of the events and the offsets they cover per topic consumed).

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
use crate::ingest::dlq::{deliver_copies, Copy};
use crate::ingest::forward::{self, Route};
use crate::ingest::{AppendEvents, IngestError, IngestStatus, StoreBatchWritten, StoreWriter};
use crate::persist::now_ms;
use crate::schema::{decode_event, DecodeLimits, Event, InvalidEvent, Schema};
use crate::store::{AppendBatch, AppendOutcome, GraphStore, RecordPrint, SourcedEvent, Upstream};
use crate::telemetry as m;

/// What was consumed from one topic and not yet durable.
#[derive(Default)]
struct Lane {
    events: Vec<SourcedEvent>,
    /// Kafka timestamps (ms) of `events`, for the freshness histogram.
    kafka_ts: Vec<i64>,
    next_offsets: HashMap<i32, i64>,
    /// The last record consumed per partition (valid or not), for the history check.
    last_records: HashMap<i32, RecordPrint>,
}

impl Lane {
    fn consumed(&mut self, p: i32, offset: i64) {
        let next = self.next_offsets.entry(p).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    fn push(&mut self, p: i32, offset: i64, event: Event, record_ts: u64) {
        self.kafka_ts.push(record_ts as i64);
        self.events.push(SourcedEvent {
            partition: p,
            offset,
            event,
        });
    }

    fn into_batch(self, topic: &str) -> (AppendBatch, Vec<i64>) {
        let batch = AppendBatch {
            topic: topic.to_owned(),
            events: self.events,
            next_offsets: self.next_offsets.into_iter().collect(),
            last_records: self.last_records.into_iter().collect(),
            extra_offsets: Vec::new(),
            logged: Vec::new(),
            upstream: Vec::new(),
        };
        (batch, self.kafka_ts)
    }
}

/// Events consumed but not yet durable: from the engagements topic, and forwarded to this
/// instance's partitions on the routed topic; with the copies that must be acknowledged first.
#[derive(Default)]
pub(super) struct Pending {
    input: Lane,
    routed: Lane,
    /// Dead letters, and valid events that belong to other partitions on their way to the
    /// routed topic: delivered together before the store write.
    copies: Vec<Copy>,
    /// Dead letters among `copies`.
    invalid: u64,
    /// Per (routed partition, source partition): the source offset after the last forwarded
    /// event taken from it.
    upstream: HashMap<(i32, i32), i64>,
    /// Messages from the engagements topic.
    pub(super) consumed: u64,
    /// Messages from the routed topic.
    pub(super) routed_consumed: u64,
    forwarded: u64,
    forwarded_copies: u64,
    pub(super) since: Option<Instant>,
    /// Scratch space for a source's key.
    key: Vec<u8>,
}

/// A consumed message's event time when its payload has none: its Kafka timestamp, or now.
fn timestamps(msg: &BorrowedMessage<'_>) -> (Option<u64>, u64) {
    let kafka_ts = msg
        .timestamp()
        .to_millis()
        .filter(|&t| t >= 0)
        .map(|t| t as u64);
    (kafka_ts, kafka_ts.unwrap_or_else(|| now_ms() as u64))
}

impl Pending {
    pub(super) fn is_empty(&self) -> bool {
        self.consumed == 0 && self.routed_consumed == 0
    }

    /// Messages of both topics.
    pub(super) fn len(&self) -> u64 {
        self.consumed + self.routed_consumed
    }

    /// Decode one message of the engagements topic into the batch: a valid event (stored here,
    /// or forwarded to the partition that owns its source), or a dead letter
    /// with its reason. `partitions`: the engagements topic's.
    pub(super) fn accept(
        &mut self,
        schema: &Schema,
        limits: &DecodeLimits,
        msg: &BorrowedMessage<'_>,
        partitions: i32,
    ) {
        let (p, offset) = (msg.partition(), msg.offset());
        let (kafka_ts, record_ts) = timestamps(msg);
        match decode_event(schema, limits, msg.payload(), record_ts) {
            Ok(event) => match forward::route(schema, &event, p, partitions, &mut self.key) {
                Route::Here => self.input.push(p, offset, event, record_ts),
                Route::To(q) => {
                    self.copies.push(forward::copy(msg, q));
                    self.forwarded += 1;
                }
            },
            Err(invalid) => self.dead_letter(msg, &invalid, kafka_ts),
        }
        let print = RecordPrint::of(
            offset,
            msg.timestamp().to_millis(),
            msg.key(),
            msg.payload(),
        );
        self.input.last_records.insert(p, print);
        self.input.consumed(p, offset);
        self.consumed += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// Decode one message of the routed topic into the batch, forwarded from `origin` (source
    /// partition and offset, when it says); `copy`: the store holds that source offset already,
    /// so only the position moves.
    pub(super) fn accept_routed(
        &mut self,
        schema: &Schema,
        limits: &DecodeLimits,
        msg: &BorrowedMessage<'_>,
        origin: Option<(i32, i64)>,
        copy: bool,
    ) {
        let (q, offset) = (msg.partition(), msg.offset());
        if copy {
            self.forwarded_copies += 1;
        } else {
            let (kafka_ts, record_ts) = timestamps(msg);
            match decode_event(schema, limits, msg.payload(), record_ts) {
                Ok(event) => self.routed.push(q, offset, event, record_ts),
                Err(invalid) => self.dead_letter(msg, &invalid, kafka_ts),
            }
            if let Some((source, source_offset)) = origin {
                let next = self
                    .upstream
                    .entry((q, source))
                    .or_insert(source_offset + 1);
                *next = (*next).max(source_offset + 1);
            }
        }
        self.routed.consumed(q, offset);
        self.routed_consumed += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    fn dead_letter(&mut self, msg: &BorrowedMessage<'_>, invalid: &InvalidEvent, ts: Option<u64>) {
        metrics::counter!(m::EVENTS_INVALID, "reason" => invalid.reason.as_str()).increment(1);
        debug!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
            reason = %invalid.reason, detail = invalid.detail, "invalid event");
        self.copies.push(Copy::dead_letter(msg, invalid, ts));
        self.invalid += 1;
    }
}

/// How a batch in flight ended.
pub(super) enum Written {
    /// Its changelog records acknowledged, then the store writes flushed: one outcome per part
    /// (the engagements topic's events, then, when there were any, the routed topic's).
    Durable(Vec<AppendOutcome>),
    /// Asked to stop while the changelog did not acknowledge: nothing was written to the store,
    /// and the batch is consumed again at the next start.
    Stopped,
}

/// A batch handed to the changelog and the store writer, not yet known to be durable.
pub(super) struct InFlight {
    outcome: tokio::task::JoinHandle<Result<Written, IngestError>>,
    /// Per part, the Kafka timestamps of its events.
    kafka_ts: Vec<Vec<i64>>,
    figures: StoreBatchWritten,
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
    /// The engagements topic.
    pub topic: &'a str,
    /// Delivers dead letters, forwarded events and changelog records.
    pub producer: &'a FutureProducer,
    pub store: &'a GraphStore,
    pub writer: &'a Addr<StoreWriter>,
    pub status: &'a IngestStatus,
}

impl BatchWriter<'_> {
    /// Make the pending batch durable: copies first, then the atomic appends. Returns
    /// `Ok(false)` when asked to stop while the DLQ or the routed topic was still unreachable
    /// (nothing was written; it will be re-consumed).
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

    /// Deliver the batch's dead letters and forwarded events, then hand its changelog records
    /// to the producer without waiting for them. `pending` is empty afterwards. `None`: asked to
    /// stop while a copy was undelivered (nothing written; `pending` kept).
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
        if !self.deliver(stop_rx, &pending.copies).await {
            return None;
        }
        if pending.invalid > 0 {
            metrics::counter!(m::DLQ_PRODUCED).increment(pending.invalid);
        }
        let pending = std::mem::take(pending);
        let figures = StoreBatchWritten {
            consumed: pending.consumed,
            invalid: pending.invalid,
            forwarded: pending.forwarded,
            forwarded_in: pending.routed_consumed,
            forwarded_copies: pending.forwarded_copies,
            ..StoreBatchWritten::default()
        };
        let mut parts = Vec::with_capacity(2);
        if pending.consumed > 0 {
            parts.push(pending.input.into_batch(self.topic));
        }
        if pending.routed_consumed > 0 {
            let (mut batch, kafka_ts) = pending.routed.into_batch(&self.cfg.kafka.routed_topic);
            batch.upstream = (pending.upstream.into_iter())
                .map(|((partition, source), next)| Upstream {
                    partition,
                    source,
                    next,
                })
                .collect();
            parts.push((batch, kafka_ts));
        }
        let mut logged = Vec::with_capacity(parts.len());
        for (batch, kafka_ts) in parts {
            logged.push(self.log(batch, kafka_ts).await);
        }
        Some(Prepared {
            parts: logged,
            figures,
            started,
        })
    }

    /// Hand `batch`'s changelog records to the producer.
    async fn log(&self, batch: AppendBatch, kafka_ts: Vec<i64>) -> LoggedPart {
        let changelog = &self.cfg.kafka.changelog_topic;
        // A store from before the changelog: its first record of a partition says so.
        let after_history = |p| {
            let held = |topic: &str| self.store.stored_offset(topic, p).ok().flatten();
            held(&batch.topic).is_some() && held(changelog).is_none()
        };
        let records = changelog::records_of(self.schema, &batch, after_history);
        let sent = changelog::send(self.producer, changelog, &records).await;
        LoggedPart {
            log: ChangelogDelivery {
                producer: self.producer.clone(),
                topic: changelog.clone(),
                records,
                sent,
            },
            batch,
            kafka_ts,
        }
    }

    /// Once the batch before is durable: wait for the prepared batch's changelog
    /// acknowledgements and write it to the store, beside the loop that consumes the next one.
    /// At most one batch is in flight ([`Self::finish`] it before the next, or before anything
    /// else touches the stored offsets); the writer is one thread taking batches in order.
    pub(super) fn launch(&self, p: Prepared, stop_rx: &watch::Receiver<bool>) -> InFlight {
        let (writer, stop) = (self.writer.clone(), stop_rx.clone());
        let mut kafka_ts = Vec::with_capacity(p.parts.len());
        let mut parts = Vec::with_capacity(p.parts.len());
        for part in p.parts {
            kafka_ts.push(part.kafka_ts);
            parts.push((part.log, part.batch));
        }
        InFlight {
            outcome: actix::spawn(log_then_write(parts, writer, stop)),
            kafka_ts,
            figures: p.figures,
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
        let outcomes = match answer.map_err(|_| IngestError::WriterGone)?? {
            Written::Durable(outcomes) => outcomes,
            Written::Stopped => return Ok(()),
        };
        let mut figures = in_flight.figures;
        for (outcome, kafka_ts) in outcomes.into_iter().zip(in_flight.kafka_ts) {
            if outcome.appended > 0 {
                let new_node_ts = outcome
                    .node_creating_events
                    .iter()
                    .filter_map(|&i| kafka_ts.get(i as usize).copied())
                    .collect();
                self.status.freshness.ingested(
                    outcome.first_seq + outcome.appended,
                    kafka_ts,
                    new_node_ts,
                );
            }
            figures.appended += outcome.appended;
            figures.duplicate_event_ids += outcome.duplicate_event_ids;
            figures.redelivered += outcome.already_stored;
            figures.new_nodes += outcome.new_nodes;
            figures.erased += outcome.erased;
            figures.erased_refused += outcome.erased_refused;
        }
        figures.seconds = in_flight.started.elapsed().as_secs_f64();
        figures.emit(self.status);
        Ok(())
    }

    /// Retry until every copy is acknowledged; `false` when asked to stop first.
    async fn deliver(&self, stop_rx: &mut watch::Receiver<bool>, copies: &[Copy]) -> bool {
        let mut backoff = Backoff::default();
        while !copies.is_empty() {
            match deliver_copies(self.cfg, self.producer, copies).await {
                Ok(()) => break,
                Err(e) => {
                    metrics::counter!(m::BATCH_RETRIES).increment(1);
                    warn!(error = %e, copies = copies.len(), "DLQ or routed topic not acknowledged; retrying");
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

/// A batch whose copies are delivered and whose changelog records are on their way.
pub(super) struct Prepared {
    parts: Vec<LoggedPart>,
    figures: StoreBatchWritten,
    started: Instant,
}

/// One topic's part of a batch, its changelog records handed to the producer.
struct LoggedPart {
    log: ChangelogDelivery,
    batch: AppendBatch,
    kafka_ts: Vec<i64>,
}

/// What the changelog delivery of one batch needs, owned (it runs beside the consume loop).
struct ChangelogDelivery {
    producer: FutureProducer,
    topic: String,
    records: Vec<changelog::ChangelogRecord>,
    /// The records handed to the producer: their acknowledgements, or why they were not taken.
    sent: Result<Vec<rdkafka::producer::DeliveryFuture>, rdkafka::error::KafkaError>,
}

/// Each part in turn: its changelog records ([`crate::changelog`]), retried until acknowledged,
/// then the part with the changelog positions after them, written to the store: the changelog
/// is never behind the store. [`Written::Stopped`] when asked to stop before an
/// acknowledgement (a part written before it stays written; the rest is consumed again).
async fn log_then_write(
    parts: Vec<(ChangelogDelivery, AppendBatch)>,
    writer: Addr<StoreWriter>,
    stop: watch::Receiver<bool>,
) -> Result<Written, IngestError> {
    let mut outcomes = Vec::with_capacity(parts.len());
    for (log, mut batch) in parts {
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
        batch.logged.extend(
            (positions.into_iter()).map(|(p, first, next)| (log.topic.clone(), p, first, next)),
        );
        let topic = batch.topic.clone();
        match writer.send(AppendEvents(batch)).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(source)) => return Err(IngestError::Store { topic, source }),
            Err(_) => return Err(IngestError::WriterGone),
        }
    }
    Ok(Written::Durable(outcomes))
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
