//! `/v1/status`: every stage's live figures in one JSON document.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_web::{get, web};
use serde::Serialize;

use crate::align::AlignReport;
use crate::publish::{FreshnessFigures, InProgress, PqPublishFigures};
use crate::serve::embeddings::rows;
use crate::serve::{ApiError, HttpState};
use crate::store::StoreSummary;
use crate::train::{TorchInfo, TrainerFigures};

/// The `/v1/status` document.
#[derive(Debug, Serialize)]
pub(super) struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub kafka: KafkaStatus,
    pub ingest: IngestFigures,
    pub store: StoreSummary,
    pub trainer: Option<TrainerFigures>,
    pub publish: PublishFigures,
    pub align: AlignReport,
    /// The approximate-candidate indexes of `/v1/neighbors`; `null` when `http.ann.enabled` is
    /// false.
    pub ann: Option<crate::serve::AnnFigures>,
    /// Rows of partitions owned elsewhere and how stale they are; `null` when `remote.enabled`
    /// is false.
    pub remote: Option<crate::remote::RemoteFigures>,
    /// The gradient exchange between instances (counters since start); `null` when
    /// `remote.exchange_gradients` is off.
    pub exchange: Option<crate::exchange::ExchangeFigures>,
    pub torch: TorchInfo,
}

#[derive(Debug, Serialize)]
pub(super) struct KafkaStatus {
    pub bootstrap_servers: String,
    pub topic: String,
    pub broker_reachable: bool,
    pub assigned_partitions: u64,
    /// Partitions of the topic (0 before the first assignment).
    pub topic_partitions: u64,
    /// Partitions consumed again from their start because their history changed.
    pub partition_resets: u64,
    pub lag: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct IngestFigures {
    pub consumed: u64,
    /// Valid events consumed from a partition that does not own their source and sent on to
    /// the one that does (`kafka.routed_topic`).
    pub forwarded: u64,
    /// Forwarded events consumed from the routed topic (copies of ones stored already
    /// included; those count in `duplicates` too).
    pub forwarded_in: u64,
    pub invalid: u64,
    pub appended: u64,
    pub duplicates: u64,
    /// Add events not stored because they name an erased node.
    pub erased_refused: u64,
    pub batches: u64,
    /// Events consumed per second since the process started.
    pub events_per_sec: f64,
    /// Events consumed per second over the last minute or so of `/v1/status` requests (from the
    /// oldest sample kept to this request); `null` on the first request.
    pub recent_events_per_sec: Option<f64>,
    /// What an empty store took from its changelog at start (`kafka.changelog_topic`); `null`
    /// for a kept store, which catches up partition by partition as they are assigned.
    pub restored: Option<crate::changelog::Restored>,
    /// What it took at each assignment since: the partitions' records stored by another
    /// instance while it owned them.
    pub moved_in: crate::ingest::MovedIn,
}

/// The version the serving API shows, and how fresh versions are.
#[derive(Debug, Serialize)]
pub(super) struct PublishFigures {
    /// The latest committed version; `null` before the first.
    pub version: Option<u64>,
    pub epoch: Option<u64>,
    /// Node type → rows the served version holds.
    pub rows: BTreeMap<String, i64>,
    pub relations: i64,
    /// The publication under way (its rows are being produced); `null` between publications.
    pub in_progress: Option<InProgress>,
    /// Versions committed by this process.
    pub committed: u64,
    /// Publication attempts that failed in this process (each retried under a new epoch).
    pub failures: u64,
    /// Each version's rows and marker in one Kafka transaction.
    pub transactional: bool,
    /// The embeddings partitions this instance's last version covered: the engagements
    /// partitions it owned (contract 3: each partition's owner publishes its versions).
    pub partitions: Vec<i32>,
    /// Versions that started their partitions over (building on nothing, every row), after
    /// the partitions this instance owns changed.
    pub bases: u64,
    /// `publish.format = "pq"`: how the last committed version was coded; `null` otherwise.
    pub pq: Option<PqPublishFigures>,
    /// Event-to-publish latency of this process's events.
    pub freshness: FreshnessFigures,
}

/// Samples of a monotonic counter, at least [`RateWindow::MIN_GAP`] apart, spanning about
/// [`RateWindow::SPAN`]: the newest sample older than the span is kept as the baseline, so a
/// client polling less often than the span still gets the rate since its previous poll.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub const SPAN: Duration = Duration::from_secs(60);
    pub const MIN_GAP: Duration = Duration::from_secs(1);

    /// Record `count` at `now`; returns the rate per second since the oldest sample kept, if
    /// that is at least `MIN_GAP` ago.
    pub fn observe(&mut self, now: Instant, count: u64) -> Option<f64> {
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= Self::SPAN)
        {
            self.samples.pop_front();
        }
        let rate = self.samples.front().and_then(|&(t, c)| {
            let secs = now.saturating_duration_since(t);
            (secs >= Self::MIN_GAP).then(|| count.saturating_sub(c) as f64 / secs.as_secs_f64())
        });
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= Self::MIN_GAP)
        {
            self.samples.push_back((now, count));
        }
        rate
    }
}

#[get("/v1/status")]
pub(super) async fn status_doc(state: web::Data<HttpState>) -> Result<web::Json<Status>, ApiError> {
    let now = Instant::now();
    let i = &state.ingest;
    let consumed = i.consumed.load(Ordering::Relaxed);
    let uptime = now.saturating_duration_since(state.started);
    let recent = state.rate.lock().observe(now, consumed);
    let ingest = IngestFigures {
        consumed,
        forwarded: i.forwarded.load(Ordering::Relaxed),
        forwarded_in: i.forwarded_in.load(Ordering::Relaxed),
        invalid: i.invalid.load(Ordering::Relaxed),
        appended: i.appended.load(Ordering::Relaxed),
        duplicates: i.duplicates.load(Ordering::Relaxed),
        erased_refused: i.erased_refused.load(Ordering::Relaxed),
        batches: i.batches.load(Ordering::Relaxed),
        events_per_sec: consumed as f64 / uptime.as_secs_f64().max(1e-3),
        recent_events_per_sec: recent,
        restored: i.restored.lock().clone(),
        moved_in: i.moved_in.lock().clone(),
    };
    let kafka = KafkaStatus {
        bootstrap_servers: state.bootstrap_servers.clone(),
        topic: state.engagements_topic.clone(),
        broker_reachable: i.broker_up.load(Ordering::Relaxed),
        assigned_partitions: i.assigned_partitions.load(Ordering::Relaxed),
        topic_partitions: i.ownership.partition_count().into(),
        partition_resets: i.partition_resets.load(Ordering::Relaxed),
        lag: i.lag.load(Ordering::Relaxed),
    };
    let s = state.clone();
    let (store, publish) = web::block(move || {
        let store = StoreSummary::read(&s.store)?;
        Ok::<_, ApiError>((store, publish_figures(&s)))
    })
    .await??;
    Ok(web::Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: uptime.as_secs(),
        kafka,
        ingest,
        store,
        trainer: state.trainer.as_ref().map(|t| t.figures()),
        publish,
        align: state.align.report(state.align_control),
        ann: state.serving.ann().map(|a| a.figures()),
        remote: (state.remote.as_ref()).map(|r| r.figures(crate::persist::now_ms())),
        exchange: state.exchange.as_ref().map(|e| e.figures()),
        torch: state.torch.clone(),
    }))
}

fn publish_figures(state: &HttpState) -> PublishFigures {
    let names = &state.store.stored_schema().node_types;
    let (version, epoch, rows, relations) = state.serving.with(|view| match view {
        None => (None, None, BTreeMap::new(), 0),
        Some(v) => (
            Some(v.version),
            Some(v.epoch),
            names
                .iter()
                .zip(&v.tables)
                .map(|(name, t)| (name.clone(), rows(t)))
                .collect(),
            rows(&v.relations),
        ),
    });
    PublishFigures {
        version,
        epoch,
        rows,
        relations,
        in_progress: state.publish.as_ref().and_then(|p| p.in_progress()),
        committed: state
            .publish
            .as_ref()
            .map_or(0, |p| p.committed.load(Ordering::Relaxed)),
        failures: state
            .publish
            .as_ref()
            .map_or(0, |p| p.failures.load(Ordering::Relaxed)),
        transactional: state
            .publish
            .as_ref()
            .is_some_and(|p| p.transactional.load(Ordering::Relaxed)),
        partitions: state
            .publish
            .as_ref()
            .map_or_else(Vec::new, |p| p.covered()),
        bases: state
            .publish
            .as_ref()
            .map_or(0, |p| p.bases.load(Ordering::Relaxed)),
        pq: state.publish.as_ref().and_then(|p| p.pq()),
        freshness: state.ingest.freshness.figures(),
    }
}
