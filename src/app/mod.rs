//! The daemon (`twhin-stream run`): every stage built in [`run`], downstream first, each handed
//! what it sends to; then it waits for the shutdown future the caller passes (the binary:
//! SIGTERM/SIGINT; tests: a oneshot) or a failing stage, and stops in order: stop consuming,
//! write what is pending, finish the training round, checkpoint, publish, flush, stop HTTP.

mod heap;
mod supervisor;
mod ticker;

use parking_lot::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::align::{AlignActor, AlignStatus, Aligner, PullController};
use crate::config::{Comparator, Config, ValueFormat};
use crate::exchange::{sender_id, start_gradients_follower, GradientInbox};
use crate::ingest::{IngestActor, IngestError, IngestStatus, StopIngest, StoreWriter};
use crate::kafka::{self, ApplyOutcome};
use crate::publish::{
    read_version, read_versions_tail_checked, reconcile_with_tail, KafkaSink, Ledger, Publication,
    PublishedView, Quantizer, ReadVersionError, TrainerActorPort, VersionSettings, VersionsTail,
};
use crate::remote::{start_follower, RemoteCache};
use crate::serve::{HttpState, ServingView};
use crate::store::{GraphStore, StoreOptions, StoreSummary};
use crate::telemetry as m;
use crate::train::{SaveCheckpoint, TrainerActor, TrainerCore, TrainerStatus};

pub use supervisor::{drive_training, Supervisor};
pub use ticker::Ticker;

pub fn open_store(cfg: &Config) -> anyhow::Result<Arc<GraphStore>> {
    let opts = StoreOptions {
        cache_capacity_bytes: cfg.storage.cache_capacity_mb << 20,
        dedup_window_ms: cfg.ingest.dedup_window_secs.saturating_mul(1000),
    };
    let store = GraphStore::open(&cfg.storage.path, &cfg.schema(), &opts).with_context(|| {
        format!(
            "opening storage.path = {} (is another twhin-stream using it?)",
            cfg.storage.path.display()
        )
    })?;
    Ok(Arc::new(store))
}

/// Run the daemon until `shutdown` completes or a stage fails. The broker must be reachable at
/// `kafka.bootstrap_servers` (the binary starts the embedded one first when asked to).
pub fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = m::init_metrics();
    let defs = kafka::topic_defs(&cfg)?;
    kafka::require_broker(&cfg)?;
    cfg.check_data_layout()?;
    let device =
        crate::train::resolve(&cfg.torch.device, cfg.torch.threads).map_err(anyhow::Error::msg)?;
    let torch = crate::train::info(device);
    info!(?torch, "libtorch ready");
    let store = open_store(&cfg)?;
    actix_rt::System::new().block_on(async move {
        for (topic, outcome) in kafka::apply_topics(&cfg, &defs).await? {
            if let ApplyOutcome::Created = outcome {
                info!(topic, "topic created");
            }
        }
        // What subscribers hold, read meanwhile (it waits on the broker, not on the store).
        let tail = (cfg.trainer.enabled && cfg.publish.enabled).then(|| {
            let cfg = cfg.clone();
            std::thread::spawn(move || read_versions_tail_checked(&cfg))
        });
        let restored = restore_an_empty_store(&cfg, &store)?;
        let mut core = open_trainer(&cfg, &store, device)?;
        let publication = match (core.as_mut(), tail) {
            (Some(core), Some(tail)) => {
                let tail = (tail.join())
                    .map_err(|_| anyhow::anyhow!("reading the versions topic panicked"))??;
                start_from_published(&cfg, &store, core, &tail)?;
                Some(open_publication(&cfg, core, &tail)?)
            }
            _ => None,
        };
        let opened = Opened {
            cfg: Arc::new(cfg),
            store,
            core,
            publication,
            device,
            torch,
            metrics,
            restored,
        };
        let mut daemon = Daemon::start(opened).await?;
        let outcome = daemon.wait(shutdown).await;
        daemon.stop().await?;
        outcome
    })
}

/// An empty store (new, or lost) first takes every partition's changelog, so that the trainer
/// resumes on the graph it trained on and a new model finds the nodes of the published rows. A
/// kept store is brought up to the changelog partition by partition as the group assigns them
/// (`IngestContext::move_in`): a restart then reads only what its own partitions gained, not
/// what other instances stored for theirs.
fn restore_an_empty_store(
    cfg: &Config,
    store: &GraphStore,
) -> anyhow::Result<Option<crate::changelog::Restored>> {
    if store.edge_count() > 0 {
        return Ok(None);
    }
    let restored = crate::changelog::restore(cfg, store)
        .context("bringing the store up to its changelog (kafka.changelog_topic)")?;
    Ok(Some(restored))
}

/// What is opened before the actor system starts: the store, the resumed trainer, the ledger.
struct Opened {
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    core: Option<TrainerCore>,
    publication: Option<Publication>,
    device: tch::Device,
    torch: crate::train::TorchInfo,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// What an empty store took from its changelog at start (`None`: a kept store).
    restored: Option<crate::changelog::Restored>,
}

/// The running stages, as [`Daemon::stop`] needs them.
struct Daemon {
    cfg: Arc<Config>,
    store: Arc<GraphStore>,
    ingest: Addr<IngestActor>,
    ingest_status: Arc<IngestStatus>,
    ingest_exit: Option<oneshot::Receiver<Result<(), IngestError>>>,
    trainer: Option<Addr<TrainerActor>>,
    stop: watch::Sender<bool>,
    training: Option<actix_rt::task::JoinHandle<anyhow::Result<()>>>,
    /// The ticker, handed back when it stops (it runs on its own arbiter).
    publishing: Option<oneshot::Receiver<Ticker>>,
    /// The thread following other owners' partitions (`[remote]`); it ends with `stop`.
    remote: Option<std::thread::JoinHandle<()>>,
    /// The thread reading the gradients other instances send (`remote.exchange_gradients`).
    gradients: Option<std::thread::JoinHandle<()>>,
    http: actix_web::dev::ServerHandle,
}

impl Daemon {
    /// Every stage, downstream first: serving, alignment, trainer, publication, store writer,
    /// ingest; then the drivers (training rounds, the publication ticker) and HTTP.
    async fn start(o: Opened) -> anyhow::Result<Daemon> {
        let cfg = o.cfg.clone();
        let ingest_status = Arc::new(IngestStatus::default());
        *ingest_status.restored.lock() = o.restored.clone();
        let trainer_status = o.core.as_ref().map(|core| {
            let status = TrainerStatus::new();
            status.set_resumed_from(core.resumed_from(), core.started_from());
            Arc::new(status)
        });
        let align_status = Arc::new(AlignStatus::default());
        let publish_status = o.publication.as_ref().map(Publication::status);

        // With several instances each index holds the rows this instance owns (the store says
        // which partition a row's node is in).
        let serving = ServingView::with_ann(&cfg.http.ann, Some(o.store.clone()))?;
        if let Some(view) = o.publication.as_ref().and_then(|p| restored_view(&cfg, p)) {
            serving.publish(view);
        }
        let align = match &o.publication {
            Some(_) => Some(start_aligner(&cfg, align_status.clone())?),
            None => None,
        };
        // The gradient exchange needs the cache (the rows owned elsewhere), the trainer and the
        // publication (the windows go out with the versions).
        let exchange = match cfg.remote.exchange_gradients
            && cfg.remote.enabled
            && o.core.is_some()
            && o.publication.is_some()
        {
            true => {
                let sender = sender_id(&cfg.publish.path).with_context(|| {
                    format!(
                        "naming this instance in publish.path = {}",
                        cfg.publish.path.display()
                    )
                })?;
                let inbox = GradientInbox::new(sender);
                if let Some(p) = &o.publication {
                    // Before the trainer's first step: what a restart trains again was sent.
                    inbox.set_sent_below(p.ledger().state().cursor);
                }
                Some(Arc::new(inbox))
            }
            false => None,
        };
        let trainer = o.core.map(|mut core| {
            // Each edge is trained by its source's owner, whatever else the store holds.
            core.train_owned_sources(ingest_status.ownership.clone());
            if let Some(inbox) = &exchange {
                core.exchange_gradients(inbox.clone());
            }
            let status = trainer_status.clone().expect("made with the core");
            start_trainer(&cfg, core, o.store.clone(), status, o.device)
        });
        // Training pauses while a version is assessed and prepared, so the version published is
        // exactly the one the alignment actor measured.
        let model_turn = Arc::new(tokio::sync::Mutex::new(()));
        let ticker = match (o.publication, &trainer, &align) {
            (Some(publication), Some(trainer), Some(align)) => Some(Ticker {
                publication: match &exchange {
                    Some(inbox) => publication.with_gradients(inbox.clone()),
                    None => publication,
                }
                .with_freshness(ingest_status.freshness.clone()),
                store: o.store.clone(),
                trainer: TrainerActorPort {
                    trainer: trainer.clone(),
                    turn: model_turn.clone(),
                },
                align: align.clone(),
                sink: KafkaSink::start(cfg.clone())
                    .await
                    .context("starting the version publisher")?
                    .fenced_by(ingest_status.ownership.clone()),
                serving: serving.clone(),
                ingest: ingest_status.clone(),
                cfg: cfg.clone(),
            }),
            _ => None,
        };
        let (ingest, ingest_exit) = start_ingest(&cfg, &o.store, &ingest_status);

        let (stop, stop_rx) = watch::channel(false);
        let training = match (&trainer, &trainer_status) {
            (Some(t), Some(s)) => {
                let idle = Duration::from_millis(cfg.trainer.idle_poll_ms);
                let run = drive_training(t.clone(), s.clone(), model_turn, idle, stop_rx.clone());
                Some(actix_rt::spawn(run))
            }
            _ => None,
        };
        // On its own arbiter: a version's rows are selected and encoded on the publication's
        // thread, which must not be the one that drives training.
        let publishing = ticker.map(|t| {
            let every = cfg.publish.interval();
            let (back, handed_back) = oneshot::channel();
            let stop = stop_rx.clone();
            Arbiter::new().spawn(async move {
                let _ = back.send(t.run(every, stop).await);
            });
            handed_back
        });
        let remote_cache = cfg.remote.enabled.then(|| {
            let cache = RemoteCache::new(cfg.remote.max_rows);
            match &exchange {
                Some(inbox) => {
                    let cache = Arc::new(cache.tracking_changes());
                    inbox.refresh_from(cache.clone());
                    cache
                }
                None => Arc::new(cache),
            }
        });
        let gradients = match &exchange {
            Some(inbox) => Some(start_gradients_follower(
                cfg.clone(),
                inbox.clone(),
                ingest_status.ownership.clone(),
                stop_rx.clone(),
            )?),
            None => None,
        };
        let remote = match &remote_cache {
            Some(cache) => Some(start_follower(
                cfg.clone(),
                cache.clone(),
                ingest_status.ownership.clone(),
                stop_rx.clone(),
            )?),
            None => None,
        };
        let state = Arc::new(HttpState {
            store: o.store.clone(),
            ingest: ingest_status.clone(),
            trainer: trainer_status,
            metrics: o.metrics,
            torch: o.torch,
            bootstrap_servers: cfg.kafka.bootstrap_servers.clone(),
            engagements_topic: cfg.kafka.engagements_topic.clone(),
            started: Instant::now(),
            serving,
            align: align_status,
            align_control: cfg.align.enabled,
            publish: publish_status,
            remote: remote_cache,
            exchange,
            bearer_token: Some(cfg.http.bearer_token.clone()).filter(|t| !t.is_empty()),
            peers: crate::serve::Peers::new(Duration::from_millis(cfg.http.gather_timeout_ms)),
            rate: Default::default(),
            train: Some(cfg.train.clone()),
            multi_interest: cfg.http.multi_interest.clone(),
        });
        let bind = cfg.http_bind()?;
        let (http, addr) = crate::serve::start(bind, state)
            .with_context(|| format!("binding http.bind = {bind}"))?;
        info!(%addr, "http listening");
        Ok(Daemon {
            cfg,
            store: o.store,
            ingest,
            ingest_status: ingest_status.clone(),
            ingest_exit: Some(ingest_exit),
            trainer,
            stop,
            training,
            publishing,
            remote,
            gradients,
            http,
        })
    }

    /// Until `shutdown` completes (`Ok`) or a stage stops on its own (an error).
    async fn wait(&mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ingest_exit = self.ingest_exit.take().expect("waited once");
        let training = async {
            match self.training.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown => { info!("shutdown requested"); Ok(()) }
            r = ingest_exit => ingest_ended(r),
            r = training => {
                self.training = None;
                match r.map_err(|e| anyhow::anyhow!("trainer driver panicked: {e}"))? {
                    Ok(()) => Err(anyhow::anyhow!("trainer stopped unexpectedly")),
                    Err(e) => Err(e.context("trainer failed")),
                }
            }
        }
    }

    /// Stop in pipeline order: nothing new comes in, the trainer finishes its round and
    /// checkpoints, the last version goes out, the store is flushed, HTTP stops.
    async fn stop(self) -> anyhow::Result<()> {
        // Closing the consumer gives its partitions up: the final version covers what this
        // instance owned while it ran, when its last version covered the same.
        let owned = self.ingest_status.ownership.get().partitions;
        let _ = self.ingest.send(StopIngest).await;
        let _ = self.stop.send(true);
        if let Some(training) = self.training {
            if let Ok(Err(e)) = training.await {
                warn!(error = %e, "trainer failed while stopping");
            }
        }
        let ticker = match self.publishing {
            Some(task) => task.await.ok(),
            None => None,
        };
        if let Some(trainer) = &self.trainer {
            match trainer.send(SaveCheckpoint).await {
                Ok(Ok(version)) => info!(version, "final checkpoint"),
                Ok(Err(e)) => warn!(error = %e, "final checkpoint failed"),
                Err(e) => warn!(error = %e, "trainer unreachable for the final checkpoint"),
            }
        }
        if let Some(mut ticker) = ticker {
            let scope = ticker.publication.scope();
            if scope.generation > 0 && !owned.is_empty() && scope.covered() == owned {
                ticker.sink.fence = None;
                if let Err(e) = ticker.publish_once_owned().await {
                    warn!(error = %format!("{e:#}"), "final publication failed");
                }
            }
            if let Err(e) = ticker.publication.persist_reference() {
                warn!(error = %format!("{e:#}"), "writing the published reference failed");
            }
        }
        if let Some(gradients) = self.gradients {
            let _ = actix_rt::task::spawn_blocking(move || gradients.join()).await;
        }
        if let Some(remote) = self.remote {
            let _ = actix_rt::task::spawn_blocking(move || remote.join()).await;
        }
        self.store.flush().context("final flush")?;
        self.http.stop(true).await;
        System::current().stop();
        let summary = StoreSummary::read(&self.store)?;
        info!(edges_total = summary.edges_total, nodes = ?summary.nodes, group = self.cfg.kafka.group_id, "stopped");
        Ok(())
    }
}

fn start_ingest(
    cfg: &Arc<Config>,
    store: &Arc<GraphStore>,
    status: &Arc<IngestStatus>,
) -> (
    Addr<IngestActor>,
    oneshot::Receiver<Result<(), IngestError>>,
) {
    let writer = {
        let store = store.clone();
        SyncArbiter::start(1, move || StoreWriter::new(store.clone()))
    };
    let (exit_tx, exit_rx) = oneshot::channel();
    let (cfg, store, status) = (cfg.clone(), store.clone(), status.clone());
    let ingest = IngestActor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
        IngestActor::new(cfg, store, writer, status, exit_tx)
    });
    (ingest, exit_rx)
}

/// The trainer resumed from its newest checkpoint (`None` when `trainer.enabled = false`).
fn open_trainer(
    cfg: &Config,
    store: &GraphStore,
    device: tch::Device,
) -> anyhow::Result<Option<TrainerCore>> {
    if !cfg.trainer.enabled {
        info!("trainer.enabled = false: ingest only");
        return Ok(None);
    }
    let core = TrainerCore::open(cfg, store, device).with_context(|| {
        format!(
            "resuming the trainer from trainer.checkpoint_path = {}",
            cfg.trainer.checkpoint_path.display()
        )
    })?;
    Ok(Some(core))
}

/// A new model (no checkpoint) from the newest whole version on the topics, when the versions
/// topic's tail shows one (`trainer.start_from_published`).
fn start_from_published(
    cfg: &Config,
    store: &GraphStore,
    core: &mut TrainerCore,
    tail: &VersionsTail,
) -> anyhow::Result<()> {
    let wanted = cfg.trainer.start_from_published && core.resumed_from().is_none();
    if !wanted || tail.newest.is_none() {
        return Ok(());
    }
    let what = "reading the newest published version for a trainer without a checkpoint \
                (trainer.start_from_published)";
    let table = match read_version(cfg, None, PUBLISHED_READ_TIMEOUT) {
        Ok((table, _)) => table,
        Err(ReadVersionError::NotOnTopics { newest: 0, .. }) => {
            info!("nothing published yet: the trainer starts a new model");
            return Ok(());
        }
        Err(e) => return Err(e).context(what),
    };
    let started = (core.start_from_published(store, table.rows())).context(what)?;
    info!(?started, "the trainer starts from the published version");
    Ok(())
}

/// Reading every version still on the topics is bounded by this.
const PUBLISHED_READ_TIMEOUT: Duration = Duration::from_secs(600);

/// The publication from the ledger in `publish.path`, reconciled with the versions topic's newest
/// markers (`tail`); the trainer pulls toward the restored reference from the start.
fn open_publication(
    cfg: &Config,
    core: &mut TrainerCore,
    tail: &VersionsTail,
) -> anyhow::Result<Publication> {
    let mut ledger = Ledger::open(&cfg.publish.path)?;
    // Each instance's epochs carry a tag of its own (from the name it sends gradients under),
    // so that no two instances ever make the same attempt of a version.
    let name = sender_id(&cfg.publish.path).with_context(|| {
        format!(
            "naming this instance in publish.path = {}",
            cfg.publish.path.display()
        )
    })?;
    ledger.set_instance_tag(u64::from(crc32fast::hash(name.as_bytes())))?;
    // The topic, not the ledger, is what subscribers hold.
    if let Some(disagreement) = reconcile_with_tail(cfg, &mut ledger, tail)? {
        warn!(
            ?disagreement,
            topic = cfg.kafka.versions_topic,
            "the publish ledger disagreed with the versions topic; numbering follows the topic"
        );
    }
    info!(
        last_version = ledger.state().last_version,
        epoch = ledger.state().epoch,
        "publisher ready"
    );
    let settings = VersionSettings {
        format: cfg.publish.format,
        threshold: cfg.publish.row_threshold,
        comparator: cfg.train.comparator,
    };
    let mut publication = Publication::open(ledger, settings, Some(cfg.publish.path.clone()))?;
    if cfg.publish.format == ValueFormat::Pq {
        let quantizer = Quantizer::open(cfg.publish.pq.clone(), Some(&cfg.publish.path))?;
        publication = publication.with_quantizer(quantizer);
    }
    publication.status().transactional.store(
        cfg.publish.transactional,
        std::sync::atomic::Ordering::Relaxed,
    );
    let target = publication.reference().map(|(_, s)| s);
    core.set_pull(
        PullController::from_config(&cfg.align).strength,
        target.as_ref(),
    );
    Ok(publication)
}

/// The restored reference as the served version (rows have no event times until the next one).
fn restored_view(cfg: &Config, publication: &Publication) -> Option<PublishedView> {
    let (version, params) = publication.reference()?;
    Some(PublishedView {
        version,
        epoch: 0,
        comparator: cfg.train.comparator,
        tables: params.tables,
        relations: params.relations,
        // (The reference file holds no biases: the next version brings them.)
        biases: Vec::new(),
        row_ts: Vec::new(),
        // Which rows differ from the served indexes is not known: they index every row.
        changed: None,
        codes: None,
        scope: None,
    })
}

fn start_aligner(cfg: &Config, status: Arc<AlignStatus>) -> anyhow::Result<Addr<AlignActor>> {
    let rotate = cfg.train.comparator != Comparator::L1;
    let actor = AlignActor(Aligner::new(
        cfg.align.clone(),
        rotate,
        Some(cfg.publish.path.clone()),
        status,
    )?);
    let slot = Mutex::new(Some(actor));
    Ok(SyncArbiter::start(1, move || {
        slot.lock().take().expect("one alignment actor")
    }))
}

fn start_trainer(
    cfg: &Arc<Config>,
    core: TrainerCore,
    store: Arc<GraphStore>,
    status: Arc<TrainerStatus>,
    device: tch::Device,
) -> Addr<TrainerActor> {
    let slot = Arc::new(Mutex::new(Some(core)));
    let cfg = cfg.clone();
    SyncArbiter::start(1, move || {
        TrainerActor::new(&cfg, slot.clone(), store.clone(), status.clone(), device)
    })
}

fn ingest_ended(
    r: Result<Result<(), IngestError>, oneshot::error::RecvError>,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("ingest failed")),
        Err(_) => Err(anyhow::anyhow!("ingest actor vanished")),
    }
}

/// SIGTERM or SIGINT, whichever comes first (what the binary passes to [`run`]).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
