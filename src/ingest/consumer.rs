//! Ingest: live engagement events from Kafka into the graph store, each valid event exactly once.
//!
//! * [`IngestActor`] (an actix actor on its own arbiter) owns the consumer. It decodes every
//!   message with [`crate::schema::decode_event`], collects valid events and dead letters into a
//!   pending batch, and writes the batch when it is full or old enough.
//! * Writing a batch: first every dead letter is acknowledged by the DLQ topic (idempotent
//!   producer, retried until acknowledged), then the valid events and the next offset of every
//!   partition they came from go to the [`StoreWriter`] (a `SyncArbiter` thread, so sled's flush
//!   never blocks the arbiter that polls Kafka) as one atomic, flushed sled batch.
//! * Offsets live in sled, not Kafka: on every assignment the consumer is assigned at the stored
//!   offsets ([`IngestContext::rebalance`]), and the store skips any event at an offset it already
//!   holds. Offsets are also committed to Kafka after each durable write, for lag tooling only.
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
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as KafkaMessage;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::{Config, OffsetPolicy};
use crate::ingest::batch::{Answer, BatchWriter, InFlight, Pending};
use crate::ingest::rebalance::History;
use crate::ingest::{IngestContext, IngestStatus, StoreWriter};
use crate::kafka::{create_client, create_client_with_context, KafkaSetupError};
use crate::store::{GraphStore, RecordPrint, StoreError};
use crate::telemetry as m;

/// Why ingest stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
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
        "consumer group {group:?} is consumed by another instance: this one was assigned {assigned} \
         of the {total} partitions of {topic}; run one twhin-stream per kafka.group_id (two would \
         each train on part of the graph and publish versions under the same numbers)"
    )]
    NotSoleConsumer {
        group: String,
        topic: String,
        assigned: usize,
        total: usize,
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
pub struct IngestActor {
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
    pub fn new(
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
pub struct StopIngest;

/// The consumer, subscribed, assigning at the stored offsets; and the DLQ producer.
fn open_clients(
    cfg: &Config,
    store: &Arc<GraphStore>,
    status: &Arc<IngestStatus>,
) -> Result<(Arc<StreamConsumer<IngestContext>>, FutureProducer), IngestError> {
    let topic = cfg.kafka.engagements_topic.clone();
    let mut props = cfg.consumer_properties();
    // Offsets are ours (sled); Kafka gets a monitoring copy after each durable write.
    props.push(("enable.auto.commit".into(), "false".into()));
    props.push(("enable.auto.offset.store".into(), "false".into()));
    props.push(("enable.partition.eof".into(), "false".into()));
    // Positions always come from sled; when one is out of range, start from the earliest
    // record, which the history check then tells apart from the one stored.
    props.push(("auto.offset.reset".into(), "earliest".into()));
    let ctx = IngestContext {
        store: store.clone(),
        topic: topic.clone(),
        group: cfg.kafka.group_id.clone(),
        status: status.clone(),
        failure: Default::default(),
        expected: Default::default(),
        first_assignment: std::sync::atomic::AtomicBool::new(true),
    };
    let consumer: StreamConsumer<IngestContext> =
        create_client_with_context(&props, ctx, "consumer")?;
    let dlq: FutureProducer = create_client(&cfg.producer_properties(), "DLQ producer")?;
    consumer
        .subscribe(&[&topic])
        .map_err(|source| IngestError::Subscribe { topic, source })?;
    Ok((Arc::new(consumer), dlq))
}

async fn run_consumer(
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    writer: Addr<StoreWriter>,
    status: Arc<IngestStatus>,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let topic = cfg.kafka.engagements_topic.clone();
    let (consumer, dlq) = open_clients(&cfg, &store, &status)?;
    info!(topic, group = cfg.kafka.group_id, "ingest started");
    let batches = BatchWriter {
        cfg: &cfg,
        topic: &topic,
        dlq: &dlq,
        writer: &writer,
        status: &status,
    };
    let schema = cfg.schema();
    let limits = cfg.decode_limits();
    let max_wait = Duration::from_millis(cfg.ingest.batch_max_wait_ms);
    let mut pending = Pending::default();
    // Highest offset seen + 1 per partition: a message below it was already buffered or stored
    // (redelivered after a rebalance), and must not be counted or dead-lettered twice.
    let mut seen_next: HashMap<i32, i64> = HashMap::new();

    let mut history_checks = tokio::time::interval(HISTORY_CHECK_EVERY);
    // The batch the store writer is making durable while the next one is consumed.
    let mut in_flight: Option<InFlight> = None;
    let result: Result<(), IngestError> = loop {
        if let Some(e) = consumer.context().take_failure() {
            break Err(e);
        }
        let deadline = pending.since.map(|t| t + max_wait);
        tokio::select! {
            biased;
            _ = stop_rx.changed() => break Ok(()),
            answer = in_flight_answer(&mut in_flight) => {
                let f = in_flight.take().expect("an answer comes from a batch in flight");
                if let Err(e) = batches.settle(f, answer) {
                    break Err(e);
                }
                commit_mirror(&consumer, &topic, &store);
                continue;
            }
            _ = sleep_until_opt(deadline) => {}
            _ = history_checks.tick() => {
                if let Some(f) = in_flight.take() {
                    if let Err(e) = batches.finish(f).await {
                        break Err(e);
                    }
                }
                let gone = past_their_end(&consumer, &topic).await;
                let resets = gone.into_iter().map(|(partition, expected, end)| HistoryChange {
                    partition,
                    expected,
                    first: RecordPrint { offset: end, ts: -1, crc: 0 },
                    history: History::OutOfRange,
                });
                let ctx = ResetContext { cfg: &cfg, consumer: &consumer, store: &store, status: &status };
                if let Err(e) = ctx.apply(resets.collect(), &batches, &mut stop_rx, &mut pending, &mut seen_next).await {
                    break Err(e);
                }
            }
            first = consumer.recv() => {
                // The message that woke the loop, then whatever else is queued, taken without
                // the select's timers (most of a busy loop's cost), up to the batch's size.
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
                    let p = msg.partition();
                    if let Some(expected) = consumer.context().take_expected(p) {
                        if let Some(f) = in_flight.take() {
                            if let Err(e) = batches.finish(f).await {
                                failed = Some(e);
                                break;
                            }
                        }
                        let first = RecordPrint::of(msg.offset(), msg.timestamp().to_millis(), msg.key(), msg.payload());
                        match History::of(&expected, &first) {
                            // Stored already: skip it, as any redelivery.
                            History::Same => {
                                seen_next.insert(p, msg.offset() + 1);
                            }
                            history => {
                                let change = HistoryChange { partition: p, expected, first, history };
                                let ctx = ResetContext { cfg: &cfg, consumer: &consumer, store: &store, status: &status };
                                failed = ctx.apply(vec![change], &batches, &mut stop_rx, &mut pending, &mut seen_next).await.err();
                                break;
                            }
                        }
                    } else if msg.offset() < seen_next.get(&p).copied().unwrap_or(i64::MIN) {
                        metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(1);
                    } else {
                        seen_next.insert(p, msg.offset() + 1);
                        pending.accept(&schema, &limits, &msg);
                        accepted += 1;
                    }
                    if pending.consumed as usize >= cfg.ingest.batch_max_events {
                        break;
                    }
                    next = consumer.recv().now_or_never();
                }
                metrics::counter!(m::EVENTS_CONSUMED).increment(accepted);
                if let Some(e) = failed {
                    break Err(e);
                }
            }
        }
        let full = pending.consumed as usize >= cfg.ingest.batch_max_events;
        let due = pending.since.is_some_and(|t| t.elapsed() >= max_wait);
        if full || due {
            // At most one batch in flight: the previous one is durable before the next goes.
            if let Some(f) = in_flight.take() {
                if let Err(e) = batches.finish(f).await {
                    break Err(e);
                }
                commit_mirror(&consumer, &topic, &store);
            }
            match batches.start(&mut stop_rx, &mut pending).await {
                Ok(Some(f)) => in_flight = Some(f),
                Ok(None) => break Ok(()), // asked to stop while the DLQ was unreachable
                Err(e) => break Err(e),
            }
        }
    };
    if let Some(f) = in_flight.take() {
        let finished = batches.finish(f).await;
        if result.is_ok() {
            finished?;
            commit_mirror(&consumer, &topic, &store);
        }
    }
    if result.is_ok() && !pending.is_empty() {
        write_at_shutdown(&batches, &mut pending).await?;
        commit_mirror(&consumer, &topic, &store);
    }
    close_consumer(consumer).await;
    info!(topic, "ingest stopped");
    result
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

/// Mirror the durable offsets to Kafka for lag tooling (best effort; sled is the truth).
fn commit_mirror(consumer: &StreamConsumer<IngestContext>, topic: &str, store: &GraphStore) {
    let Ok(offsets) = store.offsets() else { return };
    let mut tpl = TopicPartitionList::new();
    for (t, p, next) in offsets {
        if t == topic {
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
