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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::join_all;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message as KafkaMessage};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::ingest::{AppendEvents, StoreWriter};
use crate::kafka::{create_client, create_client_with_context, KafkaSetupError};
use crate::schema::{decode_event, DecodeLimits, Schema};
use crate::store::{AppendBatch, GraphStore, SourcedEvent, StoreError};
use crate::telemetry as m;

/// DLQ header names (documented in topics/README.md).
pub const HEADER_ERROR: &str = "twhin.error";
pub const HEADER_ERROR_DETAIL: &str = "twhin.error.detail";
pub const HEADER_SOURCE_TOPIC: &str = "twhin.source.topic";
pub const HEADER_SOURCE_PARTITION: &str = "twhin.source.partition";
pub const HEADER_SOURCE_OFFSET: &str = "twhin.source.offset";
pub const HEADER_SOURCE_TIMESTAMP: &str = "twhin.source.timestamp";

/// Live ingest figures shared with the HTTP status endpoint.
#[derive(Debug, Default)]
pub struct IngestStatus {
    pub consumed: AtomicU64,
    pub invalid: AtomicU64,
    pub appended: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    pub lag: AtomicU64,
    pub broker_up: AtomicBool,
    pub assigned_partitions: AtomicU64,
    /// Kafka timestamps of durable events, until a version covers them.
    pub freshness: Arc<crate::publish::Freshness>,
}

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
}

// ---------------------------------------------------------------------------------------------
// Consumer context: stored offsets on assignment, lag and broker health from statistics.

/// The consumer's context: assigns partitions at the offsets stored in sled.
pub struct IngestContext {
    store: Arc<GraphStore>,
    topic: String,
    status: Arc<IngestStatus>,
    /// Set when an assignment could not be honoured; the loop stops with this error.
    failure: std::sync::Mutex<Option<IngestError>>,
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        self.status.broker_up.store(
            stats.brokers.values().any(|b| b.state == "UP"),
            Ordering::Relaxed,
        );
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        let mut total = 0u64;
        for (&p, part) in &topic.partitions {
            if p < 0 || part.hi_offset < 0 {
                continue;
            }
            let stored = self
                .store
                .stored_offset(&self.topic, p)
                .ok()
                .flatten()
                .unwrap_or(part.lo_offset.max(0));
            let lag = (part.hi_offset - stored).max(0) as u64;
            total += lag;
            metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
        }
        self.status.lag.store(total, Ordering::Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.status.broker_up.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(m::REBALANCES).increment(1);
                let mut positions = Vec::new();
                for elem in tpl.elements() {
                    let (topic, p) = (elem.topic().to_owned(), elem.partition());
                    match self.store.stored_offset(&topic, p) {
                        Ok(Some(next)) => positions.push((topic, p, Offset::Offset(next))),
                        // Nothing stored yet: the whole history belongs in the graph.
                        Ok(None) => positions.push((topic, p, Offset::Beginning)),
                        Err(e) => {
                            error!(topic, partition = p, error = %e, "cannot read the stored offset");
                            *self.failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(IngestError::Assign {
                                    topic,
                                    partition: p,
                                    problem: e.to_string(),
                                });
                            return;
                        }
                    }
                }
                for (topic, p, offset) in &positions {
                    if let Err(e) = tpl.set_partition_offset(topic, *p, *offset) {
                        error!(topic, partition = p, error = %e, "cannot set the start offset");
                    }
                }
                info!(partitions = ?positions.iter().map(|(_, p, o)| (*p, *o)).collect::<Vec<_>>(), "assigned at stored offsets");
                self.status
                    .assigned_partitions
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Appends flush before they return; this covers anything written by other paths.
                if let Err(e) = self.store.flush() {
                    error!(error = %e, "flush on revoke failed");
                }
                info!(partitions = tpl.count(), "partitions revoked");
                let n = tpl.count() as u64;
                let _ = self.status.assigned_partitions.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |v| Some(v.saturating_sub(n)),
                );
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    error!(error = %e, "unassign failed");
                }
            }
            other => {
                warn!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The actor

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

/// One invalid event on its way to the DLQ.
struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

/// Events consumed but not yet durable.
#[derive(Default)]
struct Pending {
    events: Vec<SourcedEvent>,
    /// Kafka timestamps (ms) of `events`, for the freshness histogram.
    kafka_ts: Vec<i64>,
    dead: Vec<DeadLetter>,
    next_offsets: HashMap<i32, i64>,
    consumed: u64,
    since: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.consumed == 0
    }
}

async fn run_consumer(
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    writer: Addr<StoreWriter>,
    status: Arc<IngestStatus>,
    mut stop_rx: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let topic = cfg.kafka.engagements_topic.clone();
    let mut props = cfg.consumer_properties();
    // Offsets are ours (sled); Kafka gets a monitoring copy after each durable write.
    props.push(("enable.auto.commit".into(), "false".into()));
    props.push(("enable.auto.offset.store".into(), "false".into()));
    props.push(("enable.partition.eof".into(), "false".into()));
    let ctx = IngestContext {
        store: store.clone(),
        topic: topic.clone(),
        status: status.clone(),
        failure: std::sync::Mutex::new(None),
    };
    let consumer: StreamConsumer<IngestContext> =
        create_client_with_context(&props, ctx, "consumer")?;
    let consumer = Arc::new(consumer);
    let dlq: FutureProducer = create_client(&cfg.producer_properties(), "DLQ producer")?;
    consumer
        .subscribe(&[&topic])
        .map_err(|source| IngestError::Subscribe {
            topic: topic.clone(),
            source,
        })?;
    info!(topic, group = cfg.kafka.group_id, "ingest started");

    let schema = cfg.schema();
    let limits = cfg.decode_limits();
    let max_wait = Duration::from_millis(cfg.ingest.batch_max_wait_ms);
    let mut pending = Pending::default();
    // Highest offset seen + 1 per partition: a message below it was already buffered or stored
    // (redelivered after a rebalance), and must not be counted or dead-lettered twice.
    let mut seen_next: HashMap<i32, i64> = HashMap::new();

    let result: Result<(), IngestError> = loop {
        if let Some(e) = consumer
            .context()
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            break Err(e);
        }
        let deadline = pending.since.map(|t| t + max_wait);
        tokio::select! {
            biased;
            _ = stop_rx.changed() => break Ok(()),
            _ = sleep_until_opt(deadline) => {}
            msg = consumer.recv() => match msg {
                Ok(msg) => {
                    let p = msg.partition();
                    if msg.offset() < seen_next.get(&p).copied().unwrap_or(i64::MIN) {
                        metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(1);
                    } else {
                        seen_next.insert(p, msg.offset() + 1);
                        accept(&schema, &limits, &msg, &mut pending);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
        let full = pending.consumed as usize >= cfg.ingest.batch_max_events;
        let due = pending.since.is_some_and(|t| t.elapsed() >= max_wait);
        if full || due {
            match write_batch(
                &cfg,
                &topic,
                &dlq,
                &writer,
                &status,
                &mut stop_rx,
                &mut pending,
            )
            .await
            {
                Ok(true) => commit_mirror(&consumer, &topic, &store),
                Ok(false) => break Ok(()), // asked to stop while the DLQ was unreachable
                Err(e) => break Err(e),
            }
        }
    };

    if result.is_ok() && !pending.is_empty() {
        // Shutting down: make what was consumed durable (bounded by the DLQ timeout).
        let (_, mut never) = watch::channel(false);
        match tokio::time::timeout(
            Duration::from_millis(cfg.ingest.dlq_timeout_ms),
            write_batch(
                &cfg,
                &topic,
                &dlq,
                &writer,
                &status,
                &mut never,
                &mut pending,
            ),
        )
        .await
        {
            Ok(Ok(_)) => commit_mirror(&consumer, &topic, &store),
            Ok(Err(e)) => return Err(e),
            Err(_) => warn!(
                "pending batch not written at shutdown (DLQ unreachable); it will be re-consumed"
            ),
        }
    }
    close_consumer(consumer).await;
    info!(topic, "ingest stopped");
    result
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => futures::future::pending().await,
    }
}

/// Decode one message into the pending batch.
fn accept(
    schema: &Schema,
    limits: &DecodeLimits,
    msg: &BorrowedMessage<'_>,
    pending: &mut Pending,
) {
    metrics::counter!(m::EVENTS_CONSUMED).increment(1);
    let (p, offset) = (msg.partition(), msg.offset());
    let kafka_ts = msg
        .timestamp()
        .to_millis()
        .filter(|&t| t >= 0)
        .map(|t| t as u64);
    match decode_event(
        schema,
        limits,
        msg.payload(),
        kafka_ts.unwrap_or_else(|| crate::persist::now_ms() as u64),
    ) {
        Ok(event) => {
            pending
                .kafka_ts
                .push(kafka_ts.map_or_else(crate::persist::now_ms, |t| t as i64));
            pending.events.push(SourcedEvent {
                partition: p,
                offset,
                event,
            })
        }
        Err(invalid) => {
            metrics::counter!(m::EVENTS_INVALID, "reason" => invalid.reason.as_str()).increment(1);
            debug!(partition = p, offset, reason = %invalid.reason, detail = invalid.detail, "invalid event");
            let mut headers = msg.headers().map(|h| h.detach()).unwrap_or_default();
            let partition = p.to_string();
            let off = offset.to_string();
            let ts = kafka_ts.map(|t| t.to_string()).unwrap_or_default();
            for (key, value) in [
                (HEADER_ERROR, invalid.reason.as_str()),
                (HEADER_ERROR_DETAIL, invalid.detail.as_str()),
                (HEADER_SOURCE_TOPIC, msg.topic()),
                (HEADER_SOURCE_PARTITION, partition.as_str()),
                (HEADER_SOURCE_OFFSET, off.as_str()),
                (HEADER_SOURCE_TIMESTAMP, ts.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            pending.dead.push(DeadLetter {
                key: msg.key().map(<[u8]>::to_vec),
                payload: msg.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    let next = pending.next_offsets.entry(p).or_insert(offset + 1);
    *next = (*next).max(offset + 1);
    pending.consumed += 1;
    pending.since.get_or_insert_with(Instant::now);
}

/// Make the pending batch durable: DLQ first, then the atomic append. Returns `Ok(false)` when
/// asked to stop while the DLQ was still unreachable (nothing was written; it will be
/// re-consumed).
async fn write_batch(
    cfg: &Config,
    topic: &str,
    dlq: &FutureProducer,
    writer: &Addr<StoreWriter>,
    status: &IngestStatus,
    stop_rx: &mut watch::Receiver<bool>,
    pending: &mut Pending,
) -> Result<bool, IngestError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    while !pending.dead.is_empty() {
        match deliver_dead_letters(cfg, dlq, &pending.dead).await {
            Ok(()) => {
                metrics::counter!(m::DLQ_PRODUCED).increment(pending.dead.len() as u64);
                break;
            }
            Err(e) => {
                metrics::counter!(m::BATCH_RETRIES).increment(1);
                warn!(error = %e, dead_letters = pending.dead.len(), "DLQ not acknowledged; retrying");
                tokio::select! {
                    _ = stop_rx.changed() => return Ok(false),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let batch = AppendBatch {
        topic: topic.to_owned(),
        events: std::mem::take(&mut pending.events),
        next_offsets: pending.next_offsets.drain().collect(),
    };
    let outcome = writer
        .send(AppendEvents(batch))
        .await
        .map_err(|_| IngestError::WriterGone)?
        .map_err(|source| IngestError::Store {
            topic: topic.to_owned(),
            source,
        })?;
    let invalid = pending.dead.len() as u64;
    let consumed = pending.consumed;
    if outcome.appended > 0 {
        let new_node_ts = outcome
            .node_creating_events
            .iter()
            .filter_map(|&i| pending.kafka_ts.get(i as usize).copied())
            .collect();
        status.freshness.ingested(
            outcome.first_seq + outcome.appended,
            std::mem::take(&mut pending.kafka_ts),
            new_node_ts,
        );
    }
    *pending = Pending::default();

    metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::histogram!(m::BATCH_EVENTS).record(consumed as f64);
    metrics::counter!(m::EDGES_APPENDED).increment(outcome.appended);
    metrics::counter!(m::NODES_CREATED).increment(outcome.new_nodes);
    metrics::counter!(m::DUPLICATES, "kind" => "event_id").increment(outcome.duplicate_event_ids);
    metrics::counter!(m::DUPLICATES, "kind" => "redelivered").increment(outcome.already_stored);
    status.consumed.fetch_add(consumed, Ordering::Relaxed);
    status.invalid.fetch_add(invalid, Ordering::Relaxed);
    status
        .appended
        .fetch_add(outcome.appended, Ordering::Relaxed);
    status.duplicates.fetch_add(
        outcome.duplicate_event_ids + outcome.already_stored,
        Ordering::Relaxed,
    );
    status.batches.fetch_add(1, Ordering::Relaxed);
    debug!(
        consumed,
        appended = outcome.appended,
        invalid,
        ms = started.elapsed().as_millis() as u64,
        "batch durable"
    );
    Ok(true)
}

async fn deliver_dead_letters(
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
