//! The publisher (DESIGN §1): turns the trainer's parameters into a version on Kafka. The
//! alignment actor assesses it, the trainer encodes its rows, the rows go to the embeddings topic,
//! and after every row's acknowledgement the marker goes to the versions topic; then the ledger
//! records the number and the version becomes the reference. Wire formats and the ledger live in
//! [`crate::publish`]; the contract is in `topics/README.md`.
//!
//! Transactional mode (`publish.transactional`): the producer carries `publish.transactional_id`,
//! and each attempt's rows and marker are one transaction (begin, rows, marker, commit; abort on
//! any error). It is an extra guard for readers on brokers that honour `read_committed`; the
//! marker's row count stays the rule, because some brokers (the test broker, tansu) deliver
//! aborted records to `read_committed` readers anyway.
//!
//! Epochs: every attempt that fails takes a new epoch before the next one (the ledger persists
//! it). A failed attempt may have left rows under `(version, epoch)`; had the retry reused that
//! pair, a subscriber counting rows toward the retry's marker could count stale rows of the
//! failed attempt and apply a mix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tracing::{info, warn};

use crate::align::{Adopt, AlignActor, Assess};
use crate::config::Config;
use crate::ingest::IngestStatus;
use crate::kafka::{self, KafkaSetupError};
use crate::messages::{CommitVersion, PrepareVersion, RestoreCheckpoint, SetPull, TakeSnapshot};
use crate::publish::Ledger;
use crate::telemetry as m;
use crate::trainer::{PreparedVersion, TrainerActor};

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

/// What a publication needs. Clones share the producer and the epoch state.
#[derive(Clone)]
pub struct Publisher {
    cfg: Arc<Config>,
    trainer: Addr<TrainerActor>,
    align: Addr<AlignActor>,
    model_turn: Arc<tokio::sync::Mutex<()>>,
    ingest: Arc<IngestStatus>,
    /// `None` after a fatal transactional error: the next attempt builds a new producer (and
    /// fences the old one by initialising transactions again).
    producer: Arc<tokio::sync::Mutex<Option<FutureProducer>>>,
    /// The last attempt failed and the ledger's epoch may be on the broker already.
    epoch_spent: Arc<AtomicBool>,
}

impl Publisher {
    /// Build the version producer (and, in transactional mode, initialise its transactions,
    /// which fences a previous instance with the same `transactional.id`).
    pub async fn start(
        cfg: Arc<Config>,
        trainer: Addr<TrainerActor>,
        align: Addr<AlignActor>,
        model_turn: Arc<tokio::sync::Mutex<()>>,
        ingest: Arc<IngestStatus>,
    ) -> Result<Publisher, PublisherError> {
        let producer = create_producer(&cfg).await?;
        if cfg.publish.transactional {
            info!(transactional_id = %cfg.publish.transactional_id, "transactional version producer ready");
        }
        Ok(Publisher {
            cfg,
            trainer,
            align,
            model_turn,
            ingest,
            producer: Arc::new(tokio::sync::Mutex::new(Some(producer))),
            epoch_spent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Publish the next version: assess it (alignment actor; a held version restores the
    /// trainer's newest checkpoint instead), rows, then (after every row's acknowledgement) the
    /// marker, then record the number in the ledger and make the version the reference. Returns
    /// the version, or `None` when none was published (nothing moved, or held). After an error
    /// the same number is retried by the next call, under a new epoch.
    pub async fn publish_version(&self, ledger: &mut Ledger) -> anyhow::Result<Option<u64>> {
        if self.epoch_spent.load(Ordering::Acquire) {
            ledger
                .new_epoch()
                .context("taking a new epoch after a failed publication")?;
            self.epoch_spent.store(false, Ordering::Release);
        }
        let result = self.attempt(ledger).await;
        if result.is_err() {
            self.epoch_spent.store(true, Ordering::Release);
        }
        result
    }

    async fn attempt(&self, ledger: &mut Ledger) -> anyhow::Result<Option<u64>> {
        let cfg = &self.cfg;
        let (version, epoch) = (ledger.next_version(), ledger.state().epoch);
        let started = std::time::Instant::now();
        let (prepared, figures) = {
            let _turn = self.model_turn.lock().await;
            let (current, reference) = self.trainer.send(TakeSnapshot).await??;
            let assessed = self
                .align
                .send(Assess {
                    version,
                    current,
                    reference,
                })
                .await?;
            if let Some(hold) = assessed.hold {
                let (checkpoint, cursor) = self.trainer.send(RestoreCheckpoint).await??;
                self.trainer.send(SetPull(assessed.pull)).await?;
                warn!(version, reason = hold.label(), ?hold, checkpoint, cursor, pull = assessed.pull,
                    "version held back by the drift gate; trainer restored to its newest checkpoint");
                return Ok(None);
            }
            let req = PrepareVersion {
                version,
                epoch,
                format: cfg.publish.format,
                threshold: cfg.publish.row_threshold,
                rotation: assessed.rotation,
                align: Some(assessed.figures.clone()),
            };
            match self.trainer.send(req).await?? {
                Some(p) => (p, assessed.figures),
                None => return Ok(None),
            }
        };
        let transactional = cfg.publish.transactional;
        // Training is paused for this long: snapshot, assessment, rows selected and encoded.
        let prepare_ms = started.elapsed().as_millis() as u64;
        // The integration tests time a kill by this line: it comes before the first row.
        info!(
            version,
            epoch,
            rows = prepared.marker.rows,
            transactional,
            prepare_ms,
            "publication started"
        );
        let mut slot = self.producer.lock().await;
        if slot.is_none() {
            *slot = Some(create_producer(cfg).await?);
        }
        let producer = (*slot).clone().expect("set above");
        if transactional {
            let begun =
                producer
                    .begin_transaction()
                    .map_err(|source| PublisherError::Transaction {
                        version,
                        step: "begin",
                        source,
                    });
            if let Err(e) = begun {
                self.abort(&mut slot, version).await;
                return Err(e.into());
            }
        }
        let mut sent = self.produce(&producer, &prepared, version).await;
        if transactional && sent.is_ok() {
            sent = self
                .end_transaction(producer.clone(), version, TransactionEnd::Commit)
                .await
                .map_err(anyhow::Error::from);
        }
        if let Err(e) = sent {
            if transactional {
                self.abort(&mut slot, version).await;
            }
            return Err(e);
        }
        drop(slot);
        ledger.commit(version)?;
        let committed_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let fresh = self
            .ingest
            .freshness
            .published(prepared.cursor, committed_ms);
        if let Some(view) = self.trainer.send(CommitVersion(version)).await?? {
            let pull = self
                .align
                .send(Adopt {
                    version,
                    figures: figures.clone(),
                    published: view,
                })
                .await??;
            self.trainer.send(SetPull(pull)).await?;
        }
        metrics::counter!(m::PUBLISH_VERSIONS).increment(1);
        metrics::counter!(m::PUBLISH_ROWS).increment(prepared.marker.rows);
        metrics::gauge!(m::PUBLISH_LAST_VERSION).set(version as f64);
        info!(
            version,
            epoch,
            rows = prepared.marker.rows,
            events = fresh,
            transactional,
            drift = figures.previous.map(|d| d.cosine_mean),
            residual = figures.procrustes_residual,
            pull = figures.pull,
            prepare_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "version published"
        );
        Ok(Some(version))
    }

    /// Rows, their acknowledgements, then the marker and its acknowledgement. The marker waits
    /// for the rows in transactional mode too: a reader that sees aborted records must still
    /// never find a marker whose rows did not all land.
    async fn produce(
        &self,
        producer: &FutureProducer,
        prepared: &PreparedVersion,
        version: u64,
    ) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let timeout = Duration::from_millis(cfg.publish.delivery_timeout_ms);
        let topic = &cfg.kafka.embeddings_topic;
        let mut acks = Vec::with_capacity(prepared.rows.len());
        for (key, payload) in &prepared.rows {
            loop {
                match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                    Ok(ack) => {
                        acks.push(ack);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("producing {key} to {topic}"))
                        )
                    }
                }
            }
        }
        for ack in acks {
            match tokio::time::timeout(timeout, ack).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("a row of version {version} to {topic}")))
                }
                Ok(Err(_)) => anyhow::bail!("row delivery of version {version} cancelled"),
                Err(_) => anyhow::bail!(
                    "row of version {version} not acknowledged within publish.delivery_timeout_ms"
                ),
            }
        }
        let marker = prepared.marker.encode();
        let key = version.to_string();
        producer
            .send(
                FutureRecord::to(&cfg.kafka.versions_topic)
                    .key(&key)
                    .payload(&marker),
                timeout,
            )
            .await
            .map_err(|(e, _)| {
                anyhow::Error::new(e).context(format!(
                    "marker of version {version} to {}",
                    cfg.kafka.versions_topic
                ))
            })?;
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
    async fn abort(&self, slot: &mut Option<FutureProducer>, version: u64) {
        let Some(producer) = slot.clone() else { return };
        match self
            .end_transaction(producer, version, TransactionEnd::Abort)
            .await
        {
            Ok(()) => warn!(version, "transaction aborted; the version is retried"),
            Err(e) => {
                warn!(error = %e, version, "the transaction could not be aborted; the producer is rebuilt before the next attempt");
                if let Some(old) = slot.take() {
                    // Dropping a producer purges and polls, which may block.
                    let _ = tokio::task::spawn_blocking(move || drop(old)).await;
                }
            }
        }
    }
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
