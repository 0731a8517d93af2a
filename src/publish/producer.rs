//! The version producer (docs/architecture.md §1): the Kafka [`VersionSink`]. Rows go to the embeddings
//! topic, and after every row's acknowledgement the marker goes to the versions topic; the
//! contract is in `topics/README.md`. The sequence around it is [`crate::publish::Publication`].
//!
//! Transactional mode (`publish.transactional`): the producer carries `publish.transactional_id`,
//! and each attempt's rows and marker are one transaction (begin, rows, marker, commit; abort on
//! any error). It is an extra guard for readers on brokers that honour `read_committed`; the
//! marker's row count stays the rule, because some brokers (the test broker, tansu) deliver
//! aborted records to `read_committed` readers anyway.

use std::sync::Arc;

use anyhow::Context as _;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tracing::{info, warn};

use crate::config::Config;
use crate::kafka::{self, send_retrying, KafkaSetupError};
use crate::partition::Ownership;
use crate::publish::{
    codebooks_key, PreparedVersion, VersionMarker, VersionSink, TOMBSTONE_EPOCH_HEADER,
    TOMBSTONE_VERSION_HEADER,
};

/// Failures of the version producer itself (set-up and transactions).
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("initialising transactions (publish.transactional_id = {id:?}): {source}")]
    InitTransactions {
        id: String,
        #[source]
        source: KafkaError,
    },
    #[error("transaction of version {version}: {step}: {source}")]
    Transaction {
        version: u64,
        step: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("a blocking producer call did not finish: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// How an open transaction ends.
#[derive(Debug, Clone, Copy)]
enum TransactionEnd {
    Commit,
    Abort,
}

impl TransactionEnd {
    fn label(self) -> &'static str {
        match self {
            TransactionEnd::Commit => "commit",
            TransactionEnd::Abort => "abort",
        }
    }
}

/// The version producer: delivers a version's rows, then its marker, to Kafka (in one
/// transaction in transactional mode).
pub struct KafkaSink {
    cfg: Arc<Config>,
    /// `None` after a fatal transactional error: the next attempt builds a new producer (and
    /// fences the old one by initialising transactions again).
    producer: Option<FutureProducer>,
    /// What this instance owns: a version's markers are withheld when the ownership changed
    /// since the version's scope was taken (some of its partitions may have another owner
    /// now, which publishes them). `None`: not checked (the final publication at shutdown).
    pub fence: Option<Arc<Ownership>>,
}

/// Rows encoded before they are handed to the producer, at most (see [`KafkaSink::send`]).
const PRODUCE_RANGE: usize = 65_536;

impl KafkaSink {
    /// Build the version producer (and, in transactional mode, initialise its transactions,
    /// which fences a previous instance with the same `transactional.id`).
    pub async fn start(cfg: Arc<Config>) -> Result<KafkaSink, PublisherError> {
        let producer = create_producer(&cfg).await?;
        if cfg.publish.transactional {
            info!(transactional_id = %cfg.publish.transactional_id, "transactional version producer ready");
        }
        Ok(KafkaSink {
            cfg,
            producer: Some(producer),
            fence: None,
        })
    }

    /// Withhold a version's markers when `ownership` changed since its scope was taken.
    pub fn fenced_by(self, ownership: Arc<Ownership>) -> KafkaSink {
        KafkaSink {
            fence: Some(ownership),
            ..self
        }
    }
}

impl VersionSink for KafkaSink {
    async fn produce(&mut self, prepared: &PreparedVersion) -> anyhow::Result<()> {
        let version = prepared.marker.version;
        if self.producer.is_none() {
            self.producer = Some(create_producer(&self.cfg).await?);
        }
        let producer = self.producer.clone().expect("set above");
        if !self.cfg.publish.transactional {
            return self.send(&producer, prepared, version).await;
        }
        let begun = producer
            .begin_transaction()
            .map_err(|source| PublisherError::Transaction {
                version,
                step: "begin",
                source,
            });
        let mut sent = match begun {
            Ok(()) => self.send(&producer, prepared, version).await,
            Err(e) => Err(e.into()),
        };
        if sent.is_ok() {
            sent = self
                .end_transaction(producer, version, TransactionEnd::Commit)
                .await
                .map_err(anyhow::Error::from);
        }
        if sent.is_err() {
            self.abort(version).await;
        }
        sent
    }
}

impl KafkaSink {
    /// Rows, their acknowledgements, then the marker and its acknowledgement. The marker waits
    /// for the rows in transactional mode too: a reader that sees aborted records must still
    /// never find a marker whose rows did not all land.
    async fn send(
        &self,
        producer: &FutureProducer,
        prepared: &PreparedVersion,
        version: u64,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let timeout = Duration::from_millis(cfg.publish.delivery_timeout_ms);
        let topic = &cfg.kafka.embeddings_topic;
        let mut acks = Vec::with_capacity(prepared.rows.len() + 2);
        let covered = prepared.scope.covered();
        if let Some(codebooks) = &prepared.codebooks {
            // Subscribers decode rows when the version is whole, so the order is not needed;
            // first is where a reader of one partition looks. Each partition gets its copy: a
            // subscriber decodes a partition's rows with that partition's codebooks.
            let key = codebooks_key(codebooks.table.epoch);
            let payload = codebooks.encode();
            for &p in covered {
                let record = FutureRecord::to(topic)
                    .key(&key)
                    .payload(&payload)
                    .partition(p);
                let ack = send_retrying(producer, record)
                    .await
                    .with_context(|| format!("producing {key} to {topic} partition {p}"))?;
                acks.push(ack);
            }
        }
        // Encoded a range at a time (on all cores), so a version carrying every row never holds
        // all its records at once; the producer's own queue bounds what waits for the broker.
        // Each record goes to its key's partition, named rather than left to the partitioner.
        for (from, to) in prepared.rows.ranges(PRODUCE_RANGE) {
            for (key, p, payload) in prepared.rows.encode_range(from, to) {
                let record = FutureRecord::to(topic)
                    .key(key)
                    .payload(&payload)
                    .partition(p);
                let ack = send_retrying(producer, record)
                    .await
                    .with_context(|| format!("producing {key} to {topic}"))?;
                acks.push(ack);
            }
        }
        let (version_text, epoch_text) = (version.to_string(), prepared.marker.epoch.to_string());
        // Collected first: a lazy chain of closures held across the awaits below is not `Send`
        // in the form the compiler can prove.
        let mut nulls: Vec<(&str, i32)> = Vec::new();
        for key in &prepared.tombstones {
            if let Some(p) = prepared.scope.place(key) {
                nulls.push((key, p));
            }
        }
        if let Some(key) = &prepared.retired_codebooks {
            nulls.extend(covered.iter().map(|&p| (key.as_str(), p)));
        }
        for (key, p) in nulls {
            // A null value: compaction drops the key, and subscribers drop the node.
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: TOMBSTONE_VERSION_HEADER,
                    value: Some(&version_text),
                })
                .insert(Header {
                    key: TOMBSTONE_EPOCH_HEADER,
                    value: Some(&epoch_text),
                });
            let record = FutureRecord::<str, [u8]>::to(topic)
                .key(key)
                .headers(headers)
                .partition(p);
            let ack = send_retrying(producer, record)
                .await
                .with_context(|| format!("producing the tombstone of {key} to {topic}"))?;
            acks.push(ack);
        }
        await_acks(acks, timeout, version, topic).await?;
        self.send_gradients(producer, prepared, version).await?;
        if let Some(fence) = &self.fence {
            let now = fence.generation();
            anyhow::ensure!(
                now == prepared.scope.generation,
                "the partitions this instance owns changed while version {version} was produced \
                 (ownership generation {} then, {now} now): its markers are withheld, and the \
                 next version covers what it owns then",
                prepared.scope.generation
            );
        }
        let versions_topic = &cfg.kafka.versions_topic;
        let mut marker_acks = Vec::new();
        for marker in prepared.markers() {
            let p = marker.partition.unwrap_or(0);
            let payload = VersionMarker {
                deployment: Some(cfg.kafka.group_id.clone()),
                http: cfg.http.advertised(),
                ..marker
            }
            .encode();
            let key = format!("{p}:{version}");
            let record = FutureRecord::to(versions_topic).key(&key).payload(&payload);
            let ack = send_retrying(producer, record)
                .await
                .with_context(|| format!("producing the marker {key} to {versions_topic}"))?;
            marker_acks.push(ack);
        }
        await_acks(marker_acks, timeout, version, versions_topic).await?;
        Ok(())
    }

    /// The gradients for other owners ([`crate::exchange`]), each chunk to its partition of the
    /// gradients topic, keyed by the sender; before the markers, in the same transaction.
    async fn send_gradients(
        &self,
        producer: &FutureProducer,
        prepared: &PreparedVersion,
        version: u64,
    ) -> anyhow::Result<()> {
        if prepared.gradients.is_empty() {
            return Ok(());
        }
        let topic = &self.cfg.kafka.gradients_topic;
        let mut acks = Vec::with_capacity(prepared.gradients.len());
        for chunk in prepared.gradients.iter() {
            let payload = chunk.encode();
            let record = FutureRecord::to(topic)
                .key(&chunk.window.sender)
                .payload(&payload)
                .partition(chunk.partition);
            let ack = send_retrying(producer, record).await.with_context(|| {
                format!(
                    "producing gradients (window {}.{}) to {topic} partition {}",
                    chunk.window.version, chunk.window.epoch, chunk.partition
                )
            })?;
            acks.push(ack);
        }
        let timeout = Duration::from_millis(self.cfg.publish.delivery_timeout_ms);
        await_acks(acks, timeout, version, topic).await?;
        Ok(())
    }

    /// Commit or abort (`step`) the open transaction, off the async threads: both block up to
    /// `publish.delivery_timeout_ms`.
    async fn end_transaction(
        &self,
        producer: FutureProducer,
        version: u64,
        end: TransactionEnd,
    ) -> Result<(), PublisherError> {
        let timeout = Duration::from_millis(self.cfg.publish.delivery_timeout_ms);
        tokio::task::spawn_blocking(move || match end {
            TransactionEnd::Commit => producer.commit_transaction(timeout),
            TransactionEnd::Abort => producer.abort_transaction(timeout),
        })
        .await?
        .map_err(|source| PublisherError::Transaction {
            version,
            step: end.label(),
            source,
        })
    }

    /// Abort the open transaction; when that fails too (or the producer is fenced or in a fatal
    /// state), drop the producer so the next attempt starts from a fresh one.
    async fn abort(&mut self, version: u64) {
        let Some(producer) = self.producer.clone() else {
            return;
        };
        match self
            .end_transaction(producer, version, TransactionEnd::Abort)
            .await
        {
            Ok(()) => warn!(version, "transaction aborted; the version is retried"),
            Err(e) => {
                warn!(error = %e, version, "the transaction could not be aborted; the producer is rebuilt before the next attempt");
                if let Some(old) = self.producer.take() {
                    // Dropping a producer purges and polls, which may block.
                    let _ = tokio::task::spawn_blocking(move || drop(old)).await;
                }
            }
        }
    }
}

/// Wait for every acknowledgement of version `version`'s records on `topic`, each within
/// `timeout`.
async fn await_acks(
    acks: Vec<rdkafka::producer::DeliveryFuture>,
    timeout: Duration,
    version: u64,
    topic: &str,
) -> anyhow::Result<()> {
    for ack in acks {
        match tokio::time::timeout(timeout, ack).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("a record of version {version} to {topic}")))
            }
            Ok(Err(_)) => anyhow::bail!("delivery of version {version} to {topic} cancelled"),
            Err(_) => anyhow::bail!(
                "a record of version {version} to {topic} not acknowledged within \
                 publish.delivery_timeout_ms"
            ),
        }
    }
    Ok(())
}

/// The version producer from `[kafka.producer]`, plus `transactional.id` (transactions
/// initialised, off the async threads: it blocks up to `publish.delivery_timeout_ms`) in
/// transactional mode.
async fn create_producer(cfg: &Config) -> Result<FutureProducer, PublisherError> {
    let mut props = cfg.producer_properties();
    if !cfg.publish.transactional {
        return Ok(kafka::create_client(&props, "version publisher")?);
    }
    let id = cfg.publish.transactional_id.clone();
    props.push(("transactional.id".into(), id.clone()));
    let producer: FutureProducer = kafka::create_client(&props, "version publisher")?;
    let timeout = Duration::from_millis(cfg.publish.delivery_timeout_ms);
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(timeout))
        .await?
        .map_err(|source| PublisherError::InitTransactions { id, source })?;
    Ok(producer)
}
