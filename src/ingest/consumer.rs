//! Ingest: live engagement events from Kafka into the graph store, each valid event exactly once.
//!
//! * [`IngestActor`] (an actix actor on its own arbiter) owns the consumer. It decodes every
//!   message with [`crate::schema::decode_event`], collects valid events and dead letters into a
//!   pending batch, and writes the batch when it is full or old enough.
//! * Writing a batch: first every dead letter is acknowledged by the DLQ topic (idempotent
//!   producer, retried until acknowledged); then, beside the loop that consumes the next batch,
//!   the batch's changelog records are acknowledged by the changelog topic ([`crate::changelog`],
//!   retried likewise) and the valid events, the next offset of every partition they came from
//!   and the changelog's positions go to the [`StoreWriter`] (a `SyncArbiter` thread, so sled's
//!   flush never blocks the arbiter that polls Kafka) as one atomic, flushed sled batch.
//! * Offsets live in sled, not Kafka: on every assignment the consumer is assigned at the stored
//!   offsets ([`IngestContext::rebalance`]), and the store skips any event at an offset it already
//!   holds. Offsets are also committed to Kafka after each durable write, for lag tooling only.
//! * The consumer subscribes to the engagements topic and the routed topic (`kafka.routed_topic`)
//!   with the range assignor, so it owns partition `q` of both. A valid event whose source
//!   another partition owns is forwarded there (acknowledged before the store write, as dead
//!   letters are); a forwarded event at or below its source partition's stored position is a
//!   copy sent again after a crash, and only moves the routed partition's offset.
//!
//! Dead letters are delivered at least once: a crash after the DLQ acknowledged a batch and before
//! its sled write re-sends them on restart (their headers name topic/partition/offset, which is a
//! unique key for consumers of the DLQ).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as KafkaMessage;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, OffsetPolicy};
use crate::ingest::batch::{Answer, BatchWriter, InFlight, Pending};
use crate::ingest::forward;
use crate::ingest::rebalance::History;
use crate::ingest::{IngestContext, IngestStatus, StoreWriter};
use crate::kafka::{create_client, create_client_with_context, partition_count, KafkaSetupError};
use crate::store::{GraphStore, RecordPrint, StoreError};
use crate::telemetry as m;

/// Why ingest stopped on its own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("subscribing to {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("writing a batch of {topic} to the store: {source}")]
    Store {
        topic: String,
        #[source]
        source: StoreError,
    },
    #[error("assigning {topic} partition {partition} at its stored offset: {problem}")]
    Assign {
        topic: String,
        partition: i32,
        problem: String,
    },
    #[error("the store writer is gone")]
    WriterGone,
    #[error(
        "{routed} has {routed_partitions} partitions and {topic} has {partitions}: the routed \
         topic (kafka.routed_topic) needs exactly as many, so that partition q of each has one \
         owner (recreate it with `twhin-stream topics apply` after deleting it)"
    )]
    RoutedPartitions {
        routed: String,
        routed_partitions: i32,
        topic: String,
        partitions: i32,
    },
    #[error(transparent)]
    Partitions(#[from] crate::kafka::ReadError),
    #[error(
        "bringing partitions {partitions:?} up to their changelog (kafka.changelog_topic) at \
         their assignment: {source}"
    )]
    MoveIn {
        partitions: Vec<i32>,
        #[source]
        source: Box<crate::changelog::RestoreError>,
    },
    #[error(
        "{topic} partition {partition} no longer holds the record stored at offset {stored} \
         ({found}; the topic was recreated or lost its data); ingest.offset_out_of_range = \"fail\""
    )]
    HistoryChanged {
        topic: String,
        partition: i32,
        stored: i64,
        found: String,
    },
}

/// Consumes the engagements topic until told to stop (see the module docs).
pub(crate) struct IngestActor {
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    writer: Addr<StoreWriter>,
    status: Arc<IngestStatus>,
    stop_tx: watch::Sender<bool>,
    done_rx: Option<oneshot::Receiver<()>>,
    /// Where the loop reports how it ended (an error when it stopped on its own).
    exit_tx: Option<oneshot::Sender<Result<(), IngestError>>>,
}

impl IngestActor {
    pub(crate) fn new(
        cfg: Arc<Config>,
        store: Arc<GraphStore>,
        writer: Addr<StoreWriter>,
        status: Arc<IngestStatus>,
        exit_tx: oneshot::Sender<Result<(), IngestError>>,
    ) -> Self {
        let (stop_tx, _) = watch::channel(false);
        IngestActor {
            cfg,
            store,
            writer,
            status,
            stop_tx,
            done_rx: None,
            exit_tx: Some(exit_tx),
        }
    }
}

impl Actor for IngestActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (done_tx, done_rx) = oneshot::channel();
        self.done_rx = Some(done_rx);
        let stop_rx = self.stop_tx.subscribe();
        let cfg = self.cfg.clone();
        let store = self.store.clone();
        let writer = self.writer.clone();
        let status = self.status.clone();
        let exit_tx = self.exit_tx.take();
        ctx.spawn(actix::fut::wrap_future(async move {
            let result = run_consumer(cfg, store, writer, status, stop_rx).await;
            if let Err(e) = &result {
                error!(error = %e, "ingest stopped");
            }
            if let Some(tx) = exit_tx {
                let _ = tx.send(result);
            }
            let _ = done_tx.send(());
        }));
    }
}

impl Handler<StopIngest> for IngestActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: StopIngest, _: &mut Context<Self>) -> Self::Result {
        let _ = self.stop_tx.send(true);
        let done = self.done_rx.take();
        Box::pin(async move {
            if let Some(done) = done {
                let _ = done.await;
            }
        })
    }
}

/// Stop consuming, make the pending batch durable, close the consumer; resolves when done.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct StopIngest;

/// The consumer and the producer of what ingest writes besides the store.
struct Clients {
    consumer: Arc<StreamConsumer<IngestContext>>,
    producer: FutureProducer,
    /// The engagements topic's partitions: a node's owner is its key's partition among them.
    partitions: i32,
}

/// The consumer, subscribed to the engagements and routed topics, assigning at the stored
/// offsets; and the producer of dead letters, forwarded events and changelog records.
fn open_clients(
    cfg: &Arc<Config>,
    store: &Arc<GraphStore>,
    status: &Arc<IngestStatus>,
) -> Result<Clients, IngestError> {
    let topic = cfg.kafka.engagements_topic.clone();
    let routed = cfg.kafka.routed_topic.clone();
    let mut props = cfg.consumer_properties();
    // Partition q of both topics to one member: the range assignor splits each topic alike
    // when every member subscribes to both with equal partition counts (co-partitioning).
    props.retain(|(k, _)| k != "partition.assignment.strategy");
    props.push(("partition.assignment.strategy".into(), "range".into()));
    // Offsets are ours (sled); Kafka gets a monitoring copy after each durable write.
    props.push(("enable.auto.commit".into(), "false".into()));
    props.push(("enable.auto.offset.store".into(), "false".into()));
    props.push(("enable.partition.eof".into(), "false".into()));
    // Positions always come from sled; when one is out of range, start from the earliest
    // record, which the history check then tells apart from the one stored.
    props.push(("auto.offset.reset".into(), "earliest".into()));
    let ctx = IngestContext {
        cfg: cfg.clone(),
        store: store.clone(),
        status: status.clone(),
        failure: Default::default(),
        expected: Default::default(),
        moved_in: Default::default(),
        caught_up_at_start: (status.restored.lock().is_some()).into(),
    };
    let consumer: StreamConsumer<IngestContext> =
        create_client_with_context(&props, ctx, "consumer")?;
    let producer: FutureProducer = create_client(
        &cfg.producer_properties(),
        "DLQ, forwarding and changelog producer",
    )?;
    let count = |t: &str| partition_count(&consumer, t, Duration::from_secs(10));
    let (partitions, routed_partitions) = (count(&topic)?, count(&routed)?);
    if partitions != routed_partitions {
        return Err(IngestError::RoutedPartitions {
            routed,
            routed_partitions,
            topic,
            partitions,
        });
    }
    (status.ownership).set_partition_count(partitions as u32);
    consumer
        .subscribe(&[&topic, &routed])
        .map_err(|source| IngestError::Subscribe { topic, source })?;
    Ok(Clients {
        consumer: Arc::new(consumer),
        producer,
        partitions,
    })
}

async fn run_consumer(
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    writer: Addr<StoreWriter>,
    status: Arc<IngestStatus>,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let topic = cfg.kafka.engagements_topic.clone();
    let Clients {
        consumer,
        producer,
        partitions,
    } = open_clients(&cfg, &store, &status)?;
    info!(
        topic,
        routed = cfg.kafka.routed_topic,
        partitions,
        group = cfg.kafka.group_id,
        "ingest started"
    );
    let schema = cfg.schema();
    let mut c = Consuming {
        consumer: &consumer,
        batches: BatchWriter {
            cfg: &cfg,
            schema: &schema,
            topic: &topic,
            producer: &producer,
            store: &store,
            writer: &writer,
            status: &status,
        },
        resets: ResetContext {
            cfg: &cfg,
            consumer: &consumer,
            store: &store,
            status: &status,
        },
        limits: cfg.decode_limits(),
        partitions,
        pending: Pending::default(),
        seen_next: HashMap::new(),
        routed_seen_next: HashMap::new(),
        upstream: HashMap::new(),
        in_flight: None,
    };
    let max_wait = Duration::from_millis(cfg.ingest.batch_max_wait_ms);
    let mut history_checks = tokio::time::interval(HISTORY_CHECK_EVERY);
    let result: Result<(), IngestError> = loop {
        if let Some(e) = consumer.context().take_failure() {
            break Err(e);
        }
        let deadline = c.pending.since.map(|t| t + max_wait);
        let step = tokio::select! {
            biased;
            _ = stop_rx.changed() => break Ok(()),
            answer = in_flight_answer(&mut c.in_flight) => {
                match c.settle(answer) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                }
            }
            _ = sleep_until_opt(deadline) => Ok(()),
            _ = history_checks.tick() => c.check_histories(&mut stop_rx).await,
            first = consumer.recv() => c.take_messages(first, &mut stop_rx).await,
        };
        if let Err(e) = step {
            break Err(e);
        }
        let full = c.pending.len() as usize >= cfg.ingest.batch_max_events;
        let due = c.pending.since.is_some_and(|t| t.elapsed() >= max_wait);
        if full || due {
            match c.start_batch(&mut stop_rx).await {
                Ok(true) => {}
                Ok(false) => break Ok(()), // asked to stop while the DLQ was unreachable
                Err(e) => break Err(e),
            }
        }
    };
    let result = c.stop(result).await;
    close_consumer(consumer).await;
    info!(topic, "ingest stopped");
    result
}

/// What became of one consumed message.
enum Taken {
    /// Into the pending batch.
    Accepted,
    /// Stored or buffered already (a redelivery).
    Skipped,
    /// Its partition's history changed and the partition was reset.
    Reset,
}

/// The consume loop's state: what was consumed and not yet written, the batch being written,
/// and what it writes with.
struct Consuming<'a> {
    consumer: &'a Arc<StreamConsumer<IngestContext>>,
    batches: BatchWriter<'a>,
    resets: ResetContext<'a>,
    limits: crate::schema::DecodeLimits,
    /// The engagements topic's partitions (and the routed topic's).
    partitions: i32,
    pending: Pending,
    /// Highest offset seen + 1 per partition: a message below it was already buffered or stored
    /// (redelivered after a rebalance), and must not be counted or dead-lettered twice.
    seen_next: HashMap<i32, i64>,
    /// The same for the routed topic's partitions.
    routed_seen_next: HashMap<i32, i64>,
    /// Per (routed partition, source partition): the source offset after the last forwarded
    /// event taken (loaded from the store at first sight): a forwarded event below it is a copy.
    upstream: HashMap<(i32, i32), i64>,
    /// The batch the store writer is making durable while the next one is consumed.
    in_flight: Option<InFlight>,
}

impl Consuming<'_> {
    /// The store writer answered for the batch in flight.
    fn settle(&mut self, answer: Answer) -> Result<(), IngestError> {
        let f = self
            .in_flight
            .take()
            .expect("an answer comes from a batch in flight");
        self.batches.settle(f, answer)?;
        self.commit_mirror();
        Ok(())
    }

    /// Wait until the batch in flight (if any) is durable.
    async fn finish_in_flight(&mut self) -> Result<(), IngestError> {
        match self.in_flight.take() {
            Some(f) => self.batches.finish(f).await,
            None => Ok(()),
        }
    }

    fn commit_mirror(&self) {
        let topics = [self.batches.topic, &self.batches.cfg.kafka.routed_topic];
        commit_mirror(self.consumer, &topics, self.resets.store);
    }

    /// Partitions still waiting for the record they must deliver first, whose end is past it:
    /// reset (the record is gone).
    async fn check_histories(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        self.finish_in_flight().await?;
        let gone = past_their_end(self.consumer, self.batches.topic).await;
        let resets = gone
            .into_iter()
            .map(|(partition, expected, end)| HistoryChange {
                partition,
                expected,
                first: RecordPrint {
                    offset: end,
                    ts: -1,
                    crc: 0,
                },
                history: History::OutOfRange,
            })
            .collect();
        self.apply_resets(resets, stop_rx).await
    }

    async fn apply_resets(
        &mut self,
        changes: Vec<HistoryChange>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let (batches, pending, seen_next) = (&self.batches, &mut self.pending, &mut self.seen_next);
        self.resets
            .apply(changes, batches, stop_rx, pending, seen_next)
            .await
    }

    /// The message that woke the loop, then whatever else is queued, taken without the select's
    /// timers (most of a busy loop's cost), up to the batch's size.
    async fn take_messages(
        &mut self,
        first: Result<BorrowedMessage<'_>, KafkaError>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let mut next = Some(first);
        let mut failed = None;
        let mut accepted = 0u64;
        while let Some(msg) = next.take() {
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            };
            match self.take_message(&msg, stop_rx).await {
                Ok(Taken::Accepted) => accepted += 1,
                Ok(Taken::Skipped) => {}
                // What else is queued is taken by the loop's next round.
                Ok(Taken::Reset) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if self.pending.len() as usize >= self.batches.cfg.ingest.batch_max_events {
                break;
            }
            next = self.consumer.recv().now_or_never();
        }
        metrics::counter!(m::EVENTS_CONSUMED).increment(accepted);
        failed.map_or(Ok(()), Err)
    }

    /// One message: the first of a newly assigned partition is checked against the record the
    /// store consumed last; a redelivered one is counted and dropped; any other goes into the
    /// pending batch.
    async fn take_message(
        &mut self,
        msg: &BorrowedMessage<'_>,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<Taken, IngestError> {
        if msg.topic() != self.batches.topic {
            return self.take_forwarded(msg);
        }
        let p = msg.partition();
        if let Some(expected) = self.consumer.context().take_expected(p) {
            self.finish_in_flight().await?;
            let first = RecordPrint::of(
                msg.offset(),
                msg.timestamp().to_millis(),
                msg.key(),
                msg.payload(),
            );
            match History::of(&expected, &first) {
                // Stored already: skip it, as any redelivery.
                History::Same => {
                    self.seen_next.insert(p, msg.offset() + 1);
                    Ok(Taken::Skipped)
                }
                history => {
                    let change = HistoryChange {
                        partition: p,
                        expected,
                        first,
                        history,
                    };
                    self.apply_resets(vec![change], stop_rx).await?;
                    Ok(Taken::Reset)
                }
            }
        } else if msg.offset() < self.seen_next.get(&p).copied().unwrap_or(i64::MIN) {
            metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(1);
            Ok(Taken::Skipped)
        } else {
            self.seen_next.insert(p, msg.offset() + 1);
            let partitions = self.partitions;
            (self.pending).accept(self.batches.schema, &self.limits, msg, partitions);
            Ok(Taken::Accepted)
        }
    }

    /// One message of the routed topic: a redelivery is dropped; a copy of a forwarded event
    /// already taken (below its source's position) only moves the partition's position; any
    /// other goes into the pending batch.
    fn take_forwarded(&mut self, msg: &BorrowedMessage<'_>) -> Result<Taken, IngestError> {
        // Another owner moved these partitions' positions on: read them from the store again.
        for moved in self.consumer.context().take_moved_in() {
            self.upstream.retain(|&(q, _), _| q != moved);
        }
        let q = msg.partition();
        if msg.offset() < self.routed_seen_next.get(&q).copied().unwrap_or(i64::MIN) {
            metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(1);
            return Ok(Taken::Skipped);
        }
        self.routed_seen_next.insert(q, msg.offset() + 1);
        let origin = forward::origin(msg);
        let mut copy = false;
        if let Some((source, source_offset)) = origin {
            let next = match self.upstream.get(&(q, source)) {
                Some(&next) => next,
                None => {
                    let routed = &self.batches.cfg.kafka.routed_topic;
                    (self.resets.store.upstream_offset(routed, q, source))
                        .map_err(|source| IngestError::Store {
                            topic: routed.clone(),
                            source,
                        })?
                        .unwrap_or(i64::MIN)
                }
            };
            copy = source_offset < next;
            self.upstream
                .insert((q, source), next.max(source_offset + 1));
        } else {
            warn!(
                partition = q,
                offset = msg.offset(),
                "a record on the routed topic without the forwarding headers; stored as it is"
            );
        }
        let (schema, limits) = (self.batches.schema, &self.limits);
        (self.pending).accept_routed(schema, limits, msg, origin, copy);
        Ok(Taken::Accepted)
    }

    /// Hand the pending batch to the store writer, at most one batch in flight: the previous
    /// one is durable before the next goes. `Ok(false)`: asked to stop meanwhile.
    async fn start_batch(
        &mut self,
        stop_rx: &mut watch::Receiver<bool>,
    ) -> Result<bool, IngestError> {
        // The changelog records go out while the batch before is written.
        let prepared = self.batches.prepare(stop_rx, &mut self.pending).await;
        if let Some(f) = self.in_flight.take() {
            self.batches.finish(f).await?;
            self.commit_mirror();
        }
        match prepared {
            Some(p) => {
                self.in_flight = Some(self.batches.launch(p, stop_rx));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The loop ended with `result`: after a clean stop, make the batch in flight and what was
    /// consumed since durable.
    async fn stop(mut self, result: Result<(), IngestError>) -> Result<(), IngestError> {
        if let Some(f) = self.in_flight.take() {
            let finished = self.batches.finish(f).await;
            if result.is_ok() {
                finished?;
                self.commit_mirror();
            }
        }
        if result.is_ok() && !self.pending.is_empty() {
            write_at_shutdown(&self.batches, &mut self.pending).await?;
            self.commit_mirror();
        }
        result
    }
}

/// How long a partition may wait for the record it must deliver first before its end is checked.
const HISTORY_CHECK_EVERY: Duration = Duration::from_secs(3);

/// The partitions still waiting for their first record whose end (the high watermark) is at or
/// before that record's offset: it is gone. `(partition, expected record, end)`.
async fn past_their_end(
    consumer: &Arc<StreamConsumer<IngestContext>>,
    topic: &str,
) -> Vec<(i32, RecordPrint, i64)> {
    let overdue = consumer.context().overdue(HISTORY_CHECK_EVERY);
    if overdue.is_empty() {
        return Vec::new();
    }
    let (consumer, topic) = (consumer.clone(), topic.to_owned());
    // Watermark requests block: off the async threads.
    let ends = tokio::task::spawn_blocking(move || {
        overdue
            .into_iter()
            .filter_map(|(p, print)| {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .ok()?;
                (high <= print.offset && consumer.context().take_expected(p).is_some())
                    .then_some((p, print, high))
            })
            .collect()
    })
    .await;
    ends.unwrap_or_default()
}

/// A partition that no longer holds the record the store consumed last (`expected`; `first`
/// came instead, or its end when nothing came).
struct HistoryChange {
    partition: i32,
    expected: RecordPrint,
    first: RecordPrint,
    history: History,
}

/// What resetting partitions needs.
struct ResetContext<'a> {
    cfg: &'a Config,
    consumer: &'a StreamConsumer<IngestContext>,
    store: &'a GraphStore,
    status: &'a IngestStatus,
}

impl ResetContext<'_> {
    /// Make the pending batch durable, then reset every changed partition and forget what the
    /// loop saw of it.
    async fn apply(
        &self,
        changes: Vec<HistoryChange>,
        batches: &BatchWriter<'_>,
        stop_rx: &mut watch::Receiver<bool>,
        pending: &mut Pending,
        seen_next: &mut HashMap<i32, i64>,
    ) -> Result<(), IngestError> {
        if changes.is_empty() {
            return Ok(());
        }
        if !pending.is_empty() {
            batches.write(stop_rx, pending).await?;
        }
        for change in &changes {
            self.reset(change)?;
            seen_next.remove(&change.partition);
        }
        Ok(())
    }

    /// Under `ingest.offset_out_of_range = "earliest"`, forget the partition's stored offset and
    /// consume it again from its start; under `"fail"`, stop.
    fn reset(&self, c: &HistoryChange) -> Result<(), IngestError> {
        let topic = &self.cfg.kafka.engagements_topic;
        let p = c.partition;
        let found = match c.history {
            History::OutOfRange => format!("its first record is at offset {}", c.first.offset),
            _ => format!("offset {} holds another record", c.first.offset),
        };
        metrics::counter!(m::PARTITION_RESETS, "reason" => c.history.label()).increment(1);
        if self.cfg.ingest.offset_out_of_range == OffsetPolicy::Fail {
            return Err(IngestError::HistoryChanged {
                topic: topic.clone(),
                partition: p,
                stored: c.expected.offset,
                found,
            });
        }
        warn!(topic, partition = p, stored = c.expected.offset, found, reason = c.history.label(),
            "partition history changed (topic recreated or data lost): consuming it again from its start");
        self.store
            .forget_partition(topic, p)
            .map_err(|source| IngestError::Store {
                topic: topic.clone(),
                source,
            })?;
        self.consumer
            .seek(topic, p, Offset::Beginning, Duration::from_secs(10))
            .map_err(|e| IngestError::Assign {
                topic: topic.clone(),
                partition: p,
                problem: format!("seeking to the start after a history change: {e}"),
            })?;
        self.status.partition_resets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Shutting down: make what was consumed durable (bounded by the DLQ timeout; otherwise it is
/// re-consumed at the next start).
async fn write_at_shutdown(
    batches: &BatchWriter<'_>,
    pending: &mut Pending,
) -> Result<(), IngestError> {
    let (_, mut never) = watch::channel(false);
    let limit = Duration::from_millis(batches.cfg.ingest.dlq_timeout_ms);
    match tokio::time::timeout(limit, batches.write(&mut never, pending)).await {
        Ok(written) => written.map(|_| ()),
        Err(_) => {
            warn!(
                "pending batch not written at shutdown (DLQ unreachable); it will be re-consumed"
            );
            Ok(())
        }
    }
}

/// The in-flight batch's answer; pending forever when there is none.
async fn in_flight_answer(in_flight: &mut Option<InFlight>) -> Answer {
    match in_flight {
        Some(f) => f.answer().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => futures::future::pending().await,
    }
}

/// Mirror the durable offsets of `topics` to Kafka for lag tooling (best effort; sled is the
/// truth).
fn commit_mirror(consumer: &StreamConsumer<IngestContext>, topics: &[&str], store: &GraphStore) {
    let Ok(offsets) = store.offsets() else { return };
    let mut tpl = TopicPartitionList::new();
    for (t, p, next) in offsets {
        if topics.contains(&t.as_str()) {
            let _ = tpl.add_partition_offset(&t, p, Offset::Offset(next));
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "offset mirror commit failed");
        }
    }
}

/// Dropping a consumer can hang (rust-rdkafka 453, 597, 611): close it on a plain thread and
/// give up waiting after a while.
async fn close_consumer(consumer: Arc<StreamConsumer<IngestContext>>) {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        consumer.unsubscribe();
        drop(consumer);
        let _ = tx.send(());
    });
    if tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .is_err()
    {
        warn!("consumer did not close within 10 s; continuing shutdown");
    }
}
