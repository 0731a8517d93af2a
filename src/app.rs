//! The daemon's lifecycle (`twhin-stream run`): open the store, resume the trainer from its
//! newest checkpoint, start the actors and the HTTP server, wait for SIGTERM/SIGINT or a failing
//! actor, then shut down in order: stop consuming, write what is pending, finish the training
//! round, checkpoint, flush, stop HTTP, exit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use serde::Serialize;
use tch::Tensor;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::align::{AlignActor, AlignStatus, Aligner, PullController};
use crate::config::Config;
use crate::ingest::{IngestActor, IngestStatus, StoreWriter};
use crate::kafka::{self, ApplyOutcome, EmbeddedKafka};
use crate::messages::{RestoreCheckpoint, SaveCheckpoint, StopIngest, TrainRound};
use crate::publish::{load_snapshot, Ledger};
use crate::publisher::Publisher;
use crate::score::Comparator;
use crate::serving::{PublishedView, ServingView};
use crate::store::{GraphStore, StoreError, StoreOptions};
use crate::telemetry as m;
use crate::trainer::{TrainerActor, TrainerCore, TrainerError, TrainerStatus, REFERENCE};

/// Node, edge and offset counts of a store (`inspect --json`, `/v1/status`).
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    pub path: String,
    /// Node type → count.
    pub nodes: BTreeMap<String, u64>,
    /// Relation → edge count.
    pub edges: BTreeMap<String, u64>,
    pub edges_total: u64,
    pub offsets: Vec<OffsetEntry>,
    pub size_on_disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OffsetEntry {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

impl StoreSummary {
    pub fn read(store: &GraphStore) -> Result<StoreSummary, StoreError> {
        let schema = store.stored_schema();
        let nodes = schema
            .node_types
            .iter()
            .enumerate()
            .map(|(t, name)| (name.clone(), store.node_count(t as u16) as u64))
            .collect();
        let edges = schema
            .relations
            .iter()
            .map(|(name, _, _)| name.clone())
            .zip(store.relation_counts())
            .collect();
        let offsets = store
            .offsets()?
            .into_iter()
            .map(|(topic, partition, next_offset)| OffsetEntry {
                topic,
                partition,
                next_offset,
            })
            .collect();
        Ok(StoreSummary {
            path: store.path().display().to_string(),
            nodes,
            edges,
            edges_total: store.edge_count(),
            offsets,
            size_on_disk_bytes: store.size_on_disk(),
        })
    }
}

/// Update the store gauges (called when `/metrics` is scraped).
pub fn refresh_store_gauges(store: &GraphStore) {
    metrics::gauge!(m::STORE_EDGES).set(store.edge_count() as f64);
    for (t, name) in store.stored_schema().node_types.iter().enumerate() {
        metrics::gauge!(m::STORE_NODES, "type" => name.clone())
            .set(store.node_count(t as u16) as f64);
    }
}

pub fn open_store(cfg: &Config) -> anyhow::Result<Arc<GraphStore>> {
    let opts = StoreOptions {
        cache_capacity_bytes: cfg.storage.cache_capacity_mb << 20,
        dedup_window_ms: cfg.ingest.dedup_window_secs.saturating_mul(1000),
        node_cache_entries: cfg.storage.node_cache_entries,
    };
    let store = GraphStore::open(&cfg.storage.path, &cfg.schema(), &opts).with_context(|| {
        format!(
            "opening storage.path = {} (is another twhin-stream using it?)",
            cfg.storage.path.display()
        )
    })?;
    Ok(Arc::new(store))
}

/// Run the daemon until a signal or a fatal actor error.
pub fn run(mut cfg: Config, embedded_kafka: bool) -> anyhow::Result<()> {
    let metrics = m::init_metrics();
    let defs = kafka::topic_defs(&cfg)?;
    // The embedded broker must outlive the System: it is dropped at the end of this function.
    let _embedded = if cfg.kafka.bootstrap_servers.trim().is_empty() && embedded_kafka {
        let broker = EmbeddedKafka::start(&defs)?;
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers();
        info!(bootstrap_servers = %cfg.kafka.bootstrap_servers, "embedded Kafka-protocol broker listening");
        Some(broker)
    } else {
        if embedded_kafka {
            warn!(bootstrap_servers = %cfg.kafka.bootstrap_servers, "kafka.bootstrap_servers is set; --embedded-kafka ignored");
        }
        kafka::require_broker(&cfg)?;
        None
    };
    let device =
        crate::device::resolve(&cfg.torch.device, cfg.torch.threads).map_err(anyhow::Error::msg)?;
    let torch = crate::device::info(device);
    info!(?torch, "libtorch ready");
    let store = open_store(&cfg)?;
    let core = if cfg.trainer.enabled {
        Some(TrainerCore::open(&cfg, &store, device).with_context(|| {
            format!(
                "resuming the trainer from trainer.checkpoint_path = {}",
                cfg.trainer.checkpoint_path.display()
            )
        })?)
    } else {
        info!("trainer.enabled = false: ingest only");
        None
    };
    let mut core = core;
    let serving = ServingView::new();
    let ledger = if cfg.publish.enabled && core.is_some() {
        let ledger = Ledger::open(&cfg.publish.path)?;
        info!(
            last_version = ledger.state().last_version,
            epoch = ledger.state().epoch,
            "publisher ready"
        );
        if let Some(core) = core.as_mut() {
            adopt_persisted_reference(&cfg, core, ledger.state().last_version, &serving)?;
            core.set_pull(PullController::from_config(&cfg.align).strength);
        }
        Some(ledger)
    } else {
        None
    };
    let bind = cfg.http_bind()?;
    let cfg = Arc::new(cfg);

    actix_rt::System::new().block_on(async move {
        if _embedded.is_none() {
            for (topic, outcome) in kafka::apply_topics(&cfg, &defs).await? {
                match outcome {
                    ApplyOutcome::Created => info!(topic, "topic created"),
                    ApplyOutcome::Exists { .. } => {}
                }
            }
        }
        let status = Arc::new(IngestStatus::default());
        let writer = {
            let store = store.clone();
            SyncArbiter::start(1, move || StoreWriter::new(store.clone()))
        };
        let (exit_tx, exit_rx) = oneshot::channel();
        let ingest = {
            let (cfg, store, writer, status) =
                (cfg.clone(), store.clone(), writer.clone(), status.clone());
            IngestActor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                IngestActor::new(cfg, store, writer, status, exit_tx)
            })
        };
        let trainer_status = core.as_ref().map(|_| Arc::new(TrainerStatus::new()));
        let trainer = core.map(|core| {
            let slot = Arc::new(Mutex::new(Some(core)));
            let (cfg, store, status, serving) = (
                cfg.clone(),
                store.clone(),
                trainer_status.clone().expect("made with the core"),
                serving.clone(),
            );
            SyncArbiter::start(1, move || {
                TrainerActor::new(
                    &cfg,
                    slot.clone(),
                    store.clone(),
                    status.clone(),
                    serving.clone(),
                    device,
                )
            })
        });
        // Training pauses while a version is assessed and prepared, so the version published is
        // exactly the one the alignment actor measured.
        let model_turn = Arc::new(tokio::sync::Mutex::new(()));
        let (stop_training, mut training) = {
            let (tx, mut rx) = tokio::sync::watch::channel(false);
            let idle = Duration::from_millis(cfg.trainer.idle_poll_ms);
            let (trainer, turn, status) =
                (trainer.clone(), model_turn.clone(), trainer_status.clone());
            let driver = actix_rt::spawn(async move {
                let (Some(trainer), Some(status)) = (trainer, status) else {
                    let _ = rx.changed().await;
                    return Ok(());
                };
                let mut supervisor = Supervisor::default();
                while !*rx.borrow() {
                    let round = {
                        let _turn = turn.lock().await;
                        trainer
                            .send(TrainRound)
                            .await
                            .map_err(|e| anyhow::anyhow!("trainer actor unreachable: {e}"))?
                    };
                    match round {
                        Ok(outcome) if outcome.idle => {
                            tokio::select! {
                                _ = tokio::time::sleep(idle) => {}
                                _ = rx.changed() => {}
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _turn = turn.lock().await;
                            supervisor.restart(&trainer, &status, e).await?;
                        }
                    }
                }
                anyhow::Ok(())
            });
            (tx, driver)
        };
        let align_status = Arc::new(AlignStatus::default());
        let align = match &ledger {
            Some(_) => {
                let rotate = cfg.train.comparator != Comparator::L1;
                let actor = AlignActor(Aligner::new(
                    cfg.align.clone(),
                    rotate,
                    Some(cfg.publish.path.clone()),
                    align_status.clone(),
                )?);
                let slot = Mutex::new(Some(actor));
                Some(SyncArbiter::start(1, move || {
                    slot.lock()
                        .ok()
                        .and_then(|mut s| s.take())
                        .expect("one alignment actor")
                }))
            }
            None => None,
        };
        let ledger = ledger.map(|l| Arc::new(tokio::sync::Mutex::new(l)));
        let publisher = match (&trainer, &align) {
            (Some(trainer), Some(align)) => Some(
                Publisher::start(
                    cfg.clone(),
                    trainer.clone(),
                    align.clone(),
                    model_turn.clone(),
                    status.clone(),
                )
                .await
                .context("starting the version publisher")?,
            ),
            _ => None,
        };
        let (stop_publishing, publishing) = {
            let (tx, mut rx) = tokio::sync::watch::channel(false);
            let every = Duration::from_secs(cfg.publish.interval_secs);
            let (publisher, ledger) = (publisher.clone(), ledger.clone());
            let task = actix_rt::spawn(async move {
                let (Some(publisher), Some(ledger)) = (publisher, ledger) else {
                    return;
                };
                // Start to start, not end to start: a publication's own duration does not stretch
                // the interval (a late tick fires at once, then the rhythm resumes from there).
                let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = rx.changed() => return,
                    }
                    let mut ledger = ledger.lock().await;
                    if let Err(e) = publisher.publish_version(&mut ledger).await {
                        metrics::counter!(m::PUBLISH_FAILURES).increment(1);
                        warn!(error = %format!("{e:#}"), version = ledger.next_version(), "publication failed; retried at the next interval");
                    }
                }
            });
            (tx, task)
        };
        let state = Arc::new(crate::http::HttpState {
            store: store.clone(),
            ingest: status.clone(),
            trainer: trainer_status,
            metrics,
            torch,
            bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
            engagements_topic: cfg.kafka.engagements_topic.clone(),
            started: Instant::now(),
            serving: serving.clone(),
            align: align_status.clone(),
            align_control: cfg.align.enabled,
            bearer_token: Some(cfg.http.bearer_token.clone()).filter(|t| !t.is_empty()),
            rate: Default::default(),
        });
        let (http, addr) = crate::http::start(bind, state)
            .with_context(|| format!("binding http.bind = {bind}"))?;
        info!(%addr, "http listening");

        let mut training_done = None;
        let outcome = tokio::select! {
            _ = shutdown_signal() => { info!("shutdown requested"); Ok(()) }
            r = exit_rx => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("ingest failed")),
                Err(_) => Err(anyhow::anyhow!("ingest actor vanished")),
            },
            r = &mut training => {
                let r = r.map_err(|e| anyhow::anyhow!("trainer driver panicked: {e}")).and_then(|r| r);
                training_done = Some(());
                match r {
                    Ok(()) => Err(anyhow::anyhow!("trainer stopped unexpectedly")),
                    Err(e) => Err(e.context("trainer failed")),
                }
            }
        };
        let _ = ingest.send(StopIngest).await;
        if training_done.is_none() {
            let _ = stop_training.send(true);
            if let Ok(Err(e)) = training.await {
                warn!(error = %e, "trainer failed while stopping");
            }
        }
        let _ = stop_publishing.send(true);
        let _ = publishing.await;
        if let Some(trainer) = &trainer {
            match trainer.send(SaveCheckpoint).await {
                Ok(Ok(version)) => info!(version, "final checkpoint"),
                Ok(Err(e)) => warn!(error = %e, "final checkpoint failed"),
                Err(e) => warn!(error = %e, "trainer unreachable for the final checkpoint"),
            }
            if let (Some(publisher), Some(ledger)) = (&publisher, &ledger) {
                let mut ledger = ledger.lock().await;
                if let Err(e) = publisher.publish_version(&mut ledger).await {
                    warn!(error = %format!("{e:#}"), "final publication failed");
                }
            }
        }
        store.flush().context("final flush")?;
        http.stop(true).await;
        System::current().stop();
        let summary = StoreSummary::read(&store)?;
        info!(edges_total = summary.edges_total, nodes = ?summary.nodes, "stopped");
        outcome
    })
}

/// Read the reference persisted at the last commit, when it is that of the ledger's last version.
/// Otherwise (none yet, or a crash between the ledger's commit and the reference's write) the next
/// version carries every row, which any subscriber can apply.
fn adopt_persisted_reference(
    cfg: &Config,
    core: &mut TrainerCore,
    last_version: u64,
    serving: &ServingView,
) -> anyhow::Result<()> {
    match load_snapshot(&cfg.publish.path, REFERENCE)? {
        Some((meta, s)) if meta.version == last_version && last_version > 0 => {
            let (tables, relations) = (
                s.tables.iter().map(Tensor::shallow_clone).collect(),
                s.relations.shallow_clone(),
            );
            core.set_reference(meta.version, s);
            serving.publish(PublishedView {
                version: meta.version,
                epoch: 0,
                comparator: cfg.train.comparator,
                tables,
                relations,
                row_ts: Vec::new(),
            });
            info!(version = meta.version, "published reference restored");
        }
        Some((meta, _)) => warn!(
            reference = meta.version,
            ledger = last_version,
            "the persisted reference is not the last published version; the next version carries every row"
        ),
        None if last_version > 0 => warn!(
            ledger = last_version,
            "no persisted reference; the next version carries every row"
        ),
        None => {}
    }
    Ok(())
}

/// Failures tolerated within [`RESTART_WINDOW`] before the daemon gives up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// Restarts the trainer from its newest checkpoint after a failed round.
#[derive(Default)]
struct Supervisor {
    recent: std::collections::VecDeque<Instant>,
}

impl Supervisor {
    async fn restart(
        &mut self,
        trainer: &Addr<TrainerActor>,
        status: &TrainerStatus,
        error: TrainerError,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        self.recent
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.recent.len() >= MAX_RESTARTS {
            return Err(anyhow::Error::new(error).context(format!(
                "the trainer failed {} times within {} s; giving up",
                MAX_RESTARTS + 1,
                RESTART_WINDOW.as_secs()
            )));
        }
        self.recent.push_back(now);
        metrics::counter!(m::ACTOR_RESTARTS, "actor" => "trainer").increment(1);
        status
            .restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        warn!(error = %error, "trainer failed; its supervisor restarts it from the newest checkpoint");
        let (checkpoint, cursor) = trainer
            .send(RestoreCheckpoint)
            .await
            .map_err(|e| anyhow::anyhow!("trainer actor unreachable: {e}"))??;
        info!(checkpoint, cursor, "trainer restarted");
        Ok(())
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
