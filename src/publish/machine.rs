//! The publication, written once: assess → hold → prepare → produce → commit → adopt.
//!
//! [`Publication::publish`] runs it against three ports, so the daemon (trainer and alignment
//! actors, Kafka) and the offline measurements and tests (a [`TrainerCore`] and an [`Aligner`]
//! in the caller's thread, an in-memory sink) take the same decisions:
//!
//! 1. **take**: training pauses only while the trainer copies out the rows it wrote since the
//!    previous version, the relation vectors and the aligner's bounded drift samples (a
//!    [`ModelDelta`]: its size follows the change, not the table); then
//!    **assess**: the aligner measures the samples against the reference (the version
//!    subscribers hold) and the anchor, on its own thread;
//! 2. **hold**: a non-finite or runaway version is not published: the trainer goes back to its
//!    newest checkpoint (where it has one) and the pull rises to `align.pull_max`;
//! 3. **prepare**: when the aligner asks for a rotation onto the anchor (rarely: only one that is
//!    not nearly the identity), training pauses again while the trainer rotates its tables and
//!    hands every row over; the version's rows are selected against the reference and encoded
//!    ([`build_delta_version`]) here, on the publication's thread, while training runs;
//! 4. **produce**: the sink delivers the rows, then the marker;
//! 5. **commit**: the ledger records the number (fsynced); the version becomes the reference
//!    (persisted beside the ledger, so a restart diffs against what subscribers hold);
//! 6. **adopt**: the aligner takes the version (the anchor, the pull controller) and the trainer
//!    pulls toward it with the new strength.
//!
//! Epochs: every attempt that fails takes a new epoch before the next one (the ledger persists
//! it). A failed attempt may have left rows under `(version, epoch)`; had the retry reused that
//! pair, a subscriber counting rows toward the retry's marker could count stale rows of the
//! failed attempt and apply a mix.
//!
//! The canonical attempt of a version is its last, the one committed: the next version's marker
//! names it (`builds_on`). A failed attempt may still have completed on the broker (its marker
//! stored, the acknowledgement lost), and a live subscriber may have applied it; so the retry
//! carries every row that attempt carried (moved or not since), and a subscriber applies the
//! retry over it to hold what the publisher adopted (`topics/README.md`, contract 2).

use parking_lot::Mutex;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use anyhow::Context as _;
use serde::Serialize;
use tch::Tensor;
use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};

use crate::align::{
    Adopt, AlignActor, AlignFigures, Aligner, Assess, Assessed, Candidate, DriftPlan, Hold, Plan,
};
use crate::config::{Comparator, ValueFormat};
use crate::exchange::{
    window_chunks, GradientChunk, GradientInbox, KeyedGradient, WindowAttempt, WindowId,
};
use crate::persist;
use crate::publish::{
    build_delta_version, row_mask, served_codes, Coding, Freshness, Ledger, PreparedVersion,
    PublishedView, Quantizer, Scope, ServedCodes, VersionMarker, VersionRequest, VersionsTail,
    ViewUpdate,
};
use crate::store::{GraphStore, NodeRef};
use crate::telemetry as m;
use crate::train::{
    load_snapshot, save_snapshot, Checkpoints, DeltaRequest, ModelDelta, NodeGradient,
    RestoreCheckpoint, Rotate, SetPull, Snapshot, TakeDelta, TrainerActor, TrainerCore,
};

/// The persisted reference's file stem in `publish.path`.
pub(super) const REFERENCE: &str = "reference";

/// The trainer as a publication sees it.
#[allow(async_fn_in_trait)]
pub trait TrainerPort {
    /// Pause training until the guard drops (`None`: nothing else trains meanwhile).
    async fn pause(&mut self) -> Option<OwnedMutexGuard<()>>;
    /// The rows written since the previous call, on the CPU (see [`TrainerCore::take_delta`]).
    async fn take_delta(&mut self, req: DeltaRequest) -> anyhow::Result<ModelDelta>;
    async fn rotate(&mut self, r: Tensor) -> anyhow::Result<()>;
    /// Go back to the newest checkpoint: `(checkpoint, cursor)`, `None` without checkpoints.
    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>>;
    /// Pull with `strength` from now on, toward `target` when given (`changed`: per type, the
    /// rows of `target` that differ from the previous target).
    async fn set_pull(
        &mut self,
        strength: f64,
        target: Option<Snapshot>,
        changed: Option<Vec<Tensor>>,
    ) -> anyhow::Result<()>;
}

/// The alignment as a publication sees it.
#[allow(async_fn_in_trait)]
pub trait AlignPort {
    /// The rows the version's drift is measured on, for a reference of these row counts.
    async fn plan(
        &mut self,
        version: u64,
        reference: Option<Vec<i64>>,
    ) -> anyhow::Result<DriftPlan>;
    async fn assess(
        &mut self,
        version: u64,
        current: Candidate,
        reference: Option<Snapshot>,
    ) -> anyhow::Result<Assessed>;
    /// The version is committed (`erased`: the nodes it carried tombstones for): returns the
    /// pull strength for the next interval.
    async fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
        erased: &[NodeRef],
    ) -> anyhow::Result<f64>;
}

/// Where a version's rows and marker go.
#[allow(async_fn_in_trait)]
pub trait VersionSink {
    /// Deliver every row, then the marker; `Ok` only once all are acknowledged.
    async fn produce(&mut self, prepared: &PreparedVersion) -> anyhow::Result<()>;
}

/// What one publication did.
// Returned once per version and matched at once, never stored: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// The drift gate held it back.
    Held(Hold),
    /// Nothing moved past `publish.row_threshold` since the reference (no row, bias or relation
    /// vector) and no node was erased: nothing to publish.
    Unchanged,
    Committed {
        prepared: PreparedVersion,
        /// What subscribers now hold (also the new reference).
        view: PublishedView,
        figures: AlignFigures,
    },
}

/// How versions are encoded and which rows they carry.
#[derive(Debug, Clone, Copy)]
pub struct VersionSettings {
    pub format: ValueFormat,
    pub threshold: f64,
    pub comparator: Comparator,
}

/// The publication under way, for `/v1/status` (`publish.in_progress`) and the tests that time
/// a kill inside one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InProgress {
    pub version: u64,
    pub epoch: u64,
    pub rows: u64,
}

/// Publication figures shared with `/v1/status`.
#[derive(Debug, Default)]
pub struct PublishStatus {
    in_progress: Mutex<Option<InProgress>>,
    /// Versions committed by this process.
    pub committed: AtomicU64,
    /// Attempts that failed (each retried under a new epoch).
    pub failures: AtomicU64,
    /// Rows and marker go out in one Kafka transaction (`publish.transactional`).
    pub transactional: AtomicBool,
    /// The embeddings partitions the last committed version covered (the engagements
    /// partitions this instance owned when it began).
    covered: Mutex<Vec<i32>>,
    /// Versions that started their partitions over (a base: every row, building on nothing),
    /// after the partitions this instance owns changed.
    pub bases: AtomicU64,
    /// The last committed version paused training this long (µs): rows copied out.
    pub last_pause_us: AtomicU64,
    /// ... and was prepared this long after that (µs), training running.
    pub last_prepare_us: AtomicU64,
    /// `publish.format = "pq"`: the last committed version's coding.
    pq: Mutex<Option<PqPublishFigures>>,
}

/// How the last committed version was product-quantized (`/v1/status` `publish.pq`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PqPublishFigures {
    /// The epoch of the codebooks its rows were coded with (`null`: too few rows to learn
    /// codebooks from yet; they went out as f32).
    pub codebooks_epoch: Option<u64>,
    /// `Σ‖x − x̂‖² / Σ‖x‖²` of its node rows.
    pub relative_error: f64,
    /// The version learned its codebooks (and carried every row).
    pub learned: bool,
    /// Codebooks learned by this process.
    pub codebooks_learned: u64,
}

impl PublishStatus {
    pub fn in_progress(&self) -> Option<InProgress> {
        *self.in_progress.lock()
    }

    fn set_in_progress(&self, v: Option<InProgress>) {
        *self.in_progress.lock() = v;
    }

    pub fn pq(&self) -> Option<PqPublishFigures> {
        *self.pq.lock()
    }

    pub fn covered(&self) -> Vec<i32> {
        self.covered.lock().clone()
    }

    fn record_coding(&self, coding: &Coding) {
        let mut pq = self.pq.lock();
        let learned = coding.learned;
        *pq = Some(PqPublishFigures {
            codebooks_epoch: coding.epoch(),
            relative_error: coding.relative_error,
            learned,
            codebooks_learned: pq.map_or(0, |f| f.codebooks_learned) + u64::from(learned),
        });
    }
}

/// A version committed: its marker acknowledged and the ledger written. [`VersionPublished::emit`]
/// is the only place this is recorded (metrics, `/v1/status`, the log line).
pub(super) struct VersionPublished<'a> {
    pub version: u64,
    pub epoch: u64,
    pub rows: u64,
    /// Ingested events whose freshness this version resolved.
    pub events: usize,
    pub figures: &'a AlignFigures,
    pub pull: f64,
    /// Training was paused this long (the changed rows and samples copied out; a rotation).
    pub pause_ms: f64,
    /// The version was prepared this long after the take: assessment, rows selected against the
    /// reference and encoded, the new view (training running meanwhile).
    pub prepare_ms: f64,
    /// Rows the trainer handed over (written since the previous version).
    pub changed: i64,
    pub total_ms: u64,
}

impl VersionPublished<'_> {
    pub(super) fn emit(&self, status: &PublishStatus) {
        status.committed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::PUBLISH_VERSIONS).increment(1);
        metrics::counter!(m::PUBLISH_ROWS).increment(self.rows);
        metrics::gauge!(m::PUBLISH_LAST_VERSION).set(self.version as f64);
        status
            .last_pause_us
            .store((self.pause_ms * 1e3) as u64, Ordering::Relaxed);
        status
            .last_prepare_us
            .store((self.prepare_ms * 1e3) as u64, Ordering::Relaxed);
        info!(
            version = self.version,
            epoch = self.epoch,
            rows = self.rows,
            events = self.events,
            drift = self.figures.previous.map(|d| d.cosine_mean),
            residual = self.figures.procrustes_residual,
            pull = self.pull,
            changed = self.changed,
            pause_ms = self.pause_ms,
            prepare_ms = self.prepare_ms,
            total_ms = self.total_ms,
            "version published"
        );
    }
}

/// The version subscribers hold.
struct Reference {
    version: u64,
    params: Snapshot,
    /// Per type, the target biases subscribers hold; empty for a reference restored from disk,
    /// which holds none (its first version then carries every row of a biased type).
    biases: Vec<Option<Tensor>>,
}

/// Per type and row, the newest event time the trainer reported (the view's `row_ts`), kept up
/// to date from each delta.
fn update_row_ts(row_ts: &mut Vec<Vec<i64>>, delta: &ModelDelta) {
    row_ts.resize(delta.tables.len(), Vec::new());
    for (ts, table) in row_ts.iter_mut().zip(&delta.tables) {
        ts.resize(table.len as usize, 0);
        let index = Vec::<i64>::try_from(&table.index).unwrap_or_default();
        for (&i, &t) in index.iter().zip(&table.ts) {
            ts[i as usize] = t;
        }
    }
}

/// Per type, the rows in `a` or `b` (`[k]` Int64 each), each once.
fn union_rows(a: &[Tensor], b: &[Tensor]) -> Vec<Tensor> {
    (0..a.len().max(b.len()))
        .map(|t| {
            let parts: Vec<&Tensor> = [a.get(t), b.get(t)].into_iter().flatten().collect();
            let all = Tensor::cat(&parts, 0);
            if all.numel() == 0 {
                return all;
            }
            let len = all.max().int64_value(&[]) + 1;
            row_mask(len, &all).nonzero().view([-1])
        })
        .collect()
}

/// The publication state machine: numbering, the reference, and the sequence above.
pub struct Publication {
    ledger: Ledger,
    settings: VersionSettings,
    reference: Option<Reference>,
    /// Where the reference persists (`publish.path`); `None`: in memory only.
    dir: Option<PathBuf>,
    freshness: Option<Arc<Freshness>>,
    status: Arc<PublishStatus>,
    /// The last attempt failed and the ledger's epoch may be on the broker already.
    epoch_spent: bool,
    /// The next take must hand over every row: there is no reference yet, or the last attempt
    /// failed after the trainer handed its changed rows over (they are no longer marked).
    full_next: bool,
    /// The view's row times (see [`update_row_ts`]).
    row_ts: Vec<Vec<i64>>,
    /// The reference on disk is older than the one in memory (it is written whole, so at most
    /// every [`REFERENCE_PERSIST_EVERY`] and at shutdown), and when it was last written.
    reference_stale: bool,
    reference_written: Option<Instant>,
    /// `publish.format = "pq"`: the codebooks, and the codes of the version subscribers hold.
    quantizer: Option<Quantizer>,
    served_codes: Option<ServedCodes>,
    /// Per node type, the rows (`[k]` Int64) that uncommitted attempts of the next version
    /// carried: its retry carries them again (see [`VersionRequest::retried_rows`]).
    retried_rows: Vec<Tensor>,
    /// The partitions versions cover ([`Publication::rescope`]; offline, the one partition).
    scope: Scope,
    /// With the gradient exchange: who sends ([`crate::exchange::sender_id`]), the counters, and
    /// the windows taken from the trainer and not committed yet (each attempt sends them all).
    gradients: Option<GradientSender>,
}

/// The publication's side of the gradient exchange.
struct GradientSender {
    sender: String,
    inbox: Arc<GradientInbox>,
    /// Windows of attempts that sent them and did not commit: each goes out again, under its
    /// id, with every attempt until one commits.
    pending: Arc<Vec<GradientChunk>>,
    /// The window of the current attempt, not sent yet. An attempt with nothing to publish
    /// sends nothing, and the next one (the same version and epoch) adds its gradients to it:
    /// a window id is never sent for two different sums.
    unsent: BTreeMap<String, KeyedGradient>,
}

/// The published reference is written whole (every row), so not once per version: a crash
/// between two writes costs one version carrying every row after the restart (the persisted
/// reference then is not the ledger's last version, see [`Publication::open`]).
pub(super) const REFERENCE_PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Publication {
    /// Versions numbered by `ledger`, the reference persisted in `dir` (when given) and read
    /// back from it when it is that of the ledger's last version. Otherwise (none yet, or a
    /// crash between the ledger's commit and the reference's write) the next version carries
    /// every row, which any subscriber can apply.
    pub fn open(
        ledger: Ledger,
        settings: VersionSettings,
        dir: Option<PathBuf>,
    ) -> anyhow::Result<Publication> {
        let last = ledger.state().last_version;
        let reference = match &dir {
            None => None,
            Some(_) if ledger.disagreement().is_some() => {
                warn!(disagreement = ?ledger.disagreement(),
                    "the versions topic does not hold the ledger's last version; the next version carries every row");
                None
            }
            Some(_) if ledger.state().in_flight.is_some() => {
                warn!(in_flight = ?ledger.state().in_flight,
                    "an attempt was under way at the last stop and its marker may be on the broker; the next version carries every row, so that it holds every key that attempt did");
                None
            }
            Some(dir) => match load_snapshot(dir, REFERENCE)? {
                Some((meta, params)) if meta.version == last && last > 0 => {
                    info!(version = meta.version, "published reference restored");
                    Some(Reference {
                        version: meta.version,
                        params,
                        biases: Vec::new(),
                    })
                }
                Some((meta, _)) => {
                    warn!(reference = meta.version, ledger = last,
                        "the persisted reference is not the last published version; the next version carries every row");
                    None
                }
                None if last > 0 => {
                    warn!(
                        ledger = last,
                        "no persisted reference; the next version carries every row"
                    );
                    None
                }
                None => None,
            },
        };
        Ok(Publication {
            ledger,
            settings,
            reference,
            dir,
            freshness: None,
            status: Arc::default(),
            epoch_spent: false,
            full_next: true,
            row_ts: Vec::new(),
            reference_stale: false,
            reference_written: None,
            quantizer: None,
            served_codes: None,
            retried_rows: Vec::new(),
            scope: Scope::whole(1),
            gradients: None,
        })
    }

    /// The partitions versions cover.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// Cover `scope` from the next version on (the partitions this instance owns changed, or
    /// it starts). `tail`: the versions topic's newest markers, those of `scope`'s partitions
    /// among them ([`crate::publish::read_versions_tail_of`]). When the last committed version
    /// covered the same partitions and is still what the topic shows as theirs, versions go on
    /// building on it; otherwise the next version is a base: numbered above what the topic
    /// shows for them, building on nothing, and carrying every row (no reference), so that a
    /// subscriber can apply it whatever it holds. Returns whether it is a base.
    pub fn rescope(&mut self, scope: Scope, tail: &VersionsTail) -> anyhow::Result<bool> {
        let base = !self.ledger.continues(&scope, tail);
        if base {
            self.ledger
                .rebase(&scope, tail)
                .context("numbering a base version")?;
            self.reference = None;
            self.full_next = true;
            self.retried_rows.clear();
            info!(partitions = ?scope.covered(), of = scope.partitions(),
                next = self.ledger.next_version(),
                "the partitions this instance publishes changed; the next version starts them over");
        }
        self.scope = scope;
        Ok(base)
    }

    /// Send the gradients the trainer summed for other owners with each version, as `inbox`'s
    /// sender, counting them in its figures.
    pub fn with_gradients(mut self, inbox: Arc<GradientInbox>) -> Publication {
        self.gradients = Some(GradientSender {
            sender: inbox.sender().to_owned(),
            inbox,
            pending: Arc::default(),
            unsent: BTreeMap::new(),
        });
        self
    }

    /// Whether this instance trains one model with others: it exchanges gradients and owns
    /// only some partitions.
    fn shares_rows(&self) -> bool {
        self.gradients.is_some() && self.scope.covered().len() < self.scope.partitions() as usize
    }

    /// Add the delta's gradients, keyed, to the current attempt's window.
    fn take_gradients(&mut self, store: &GraphStore, delta: &mut ModelDelta) -> anyhow::Result<()> {
        let taken = std::mem::take(&mut delta.exchange.gradients);
        let Some(g) = self.gradients.as_mut().filter(|_| !taken.is_empty()) else {
            return Ok(());
        };
        let types = &store.stored_schema().node_types;
        for NodeGradient {
            node,
            steps,
            grad,
            bias,
            start,
        } in taken
        {
            let Some(id) = store.node_id(node)? else {
                continue;
            };
            let key = format!("{}:{id}", types[node.node_type as usize]);
            match g.unsent.entry(key) {
                Entry::Vacant(v) => {
                    let key = v.key().clone();
                    v.insert(KeyedGradient {
                        key,
                        steps,
                        grad,
                        bias,
                        start,
                    });
                }
                Entry::Occupied(mut o) => {
                    let sum = o.get_mut();
                    sum.steps += steps;
                    sum.grad.iter_mut().zip(&grad).for_each(|(s, g)| *s += g);
                    if let Some(b) = bias {
                        *sum.bias.get_or_insert(0.0) += b;
                    }
                    // The earlier window's start is where the learning on the node began.
                    if sum.start.is_none() {
                        sum.start = start;
                    }
                }
            }
        }
        Ok(())
    }

    /// The current attempt's window as records, added to those still pending: it goes out with
    /// this attempt, as `(version, epoch)`.
    fn send_unsent(&mut self, version: u64, epoch: u64) {
        let partitions = self.scope.partitions();
        let Some(g) = self.gradients.as_mut().filter(|g| !g.unsent.is_empty()) else {
            return;
        };
        let window = WindowId {
            sender: g.sender.clone(),
            version,
            epoch,
        };
        let rows = std::mem::take(&mut g.unsent).into_values().collect();
        // (Shared only while an attempt produces them: this clones nothing after a commit.)
        Arc::make_mut(&mut g.pending).extend(window_chunks(&window, rows, partitions));
    }

    /// Code node rows with `quantizer`'s codebooks (`publish.format = "pq"`).
    pub fn with_quantizer(mut self, quantizer: Quantizer) -> Publication {
        self.quantizer = Some(quantizer);
        self
    }

    /// Resolve the freshness of ingested events at each commit.
    pub fn with_freshness(mut self, freshness: Arc<Freshness>) -> Publication {
        self.freshness = Some(freshness);
        self
    }

    pub fn status(&self) -> Arc<PublishStatus> {
        self.status.clone()
    }

    /// Encode and select rows differently from the next version on.
    pub fn set_settings(&mut self, settings: VersionSettings) {
        self.settings = settings;
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The version subscribers hold, as restored at open or last committed.
    pub fn reference(&self) -> Option<(u64, Snapshot)> {
        self.reference
            .as_ref()
            .map(|r| (r.version, r.params.shallow_clone()))
    }

    /// Publish the next version (see the module docs). After an error the same number is
    /// retried by the next call, under a new epoch.
    pub async fn publish(
        &mut self,
        store: &GraphStore,
        trainer: &mut impl TrainerPort,
        align: &mut impl AlignPort,
        sink: &mut impl VersionSink,
    ) -> anyhow::Result<Outcome> {
        if self.epoch_spent {
            self.ledger
                .new_epoch()
                .context("taking a new epoch after a failed publication")?;
            self.epoch_spent = false;
        }
        let result = self.attempt(store, trainer, align, sink).await;
        self.status.set_in_progress(None);
        if result.is_err() {
            self.epoch_spent = true;
            self.status.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::PUBLISH_FAILURES).increment(1);
        }
        result
    }

    async fn attempt(
        &mut self,
        store: &GraphStore,
        trainer: &mut impl TrainerPort,
        align: &mut impl AlignPort,
        sink: &mut impl VersionSink,
    ) -> anyhow::Result<Outcome> {
        let (version, epoch) = (self.ledger.next_version(), self.ledger.state().epoch);
        let started = Instant::now();
        let (delta, assessed, pause) = match self.take_assessed(version, trainer, align).await? {
            Assessment::Held(hold) => return Ok(Outcome::Held(hold)),
            Assessment::Passed {
                delta,
                assessed,
                pause,
            } => (delta, assessed, pause),
        };
        let mut delta = delta;
        self.take_gradients(store, &mut delta)?;
        let applied = std::mem::take(&mut delta.exchange.applied);
        let taken = Instant::now();
        let Some(mut built) = self.build(store, version, epoch, delta, &assessed)? else {
            // Pending gradients wait for the next version.
            self.full_next = false;
            return Ok(Outcome::Unchanged);
        };
        self.send_unsent(version, epoch);
        if let Some(g) = &self.gradients {
            built.prepared.gradients = g.pending.clone();
            built.prepared.gradients_applied = applied;
        }
        let timing = Timing {
            started,
            pause_ms: pause.as_secs_f64() * 1e3,
            prepare_ms: taken.elapsed().as_secs_f64() * 1e3,
        };
        self.commit(built, assessed.figures, timing, trainer, align, sink)
            .await
    }

    /// The trainer's delta for `version`, assessed by the aligner: held back (the trainer goes
    /// back to its newest checkpoint), or passed, rotated onto the anchor when the aligner says
    /// so. Also returns how long training was paused.
    async fn take_assessed(
        &mut self,
        version: u64,
        trainer: &mut impl TrainerPort,
        align: &mut impl AlignPort,
    ) -> anyhow::Result<Assessment> {
        let lens = self
            .reference
            .as_ref()
            .map(|r| r.params.tables.iter().map(|t| t.size()[0]).collect());
        let plan = align.plan(version, lens).await?;
        let window = WindowAttempt {
            version,
            epoch: self.ledger.state().epoch,
        };
        let request = DeltaRequest {
            full: self.full_next || self.reference.is_none() || self.every_row(),
            samples: vec![plan.previous, plan.anchor],
            window: self.gradients.is_some().then_some(window),
        };
        // From here on the trainer's marks are cleared: should this attempt fail, the next one
        // takes every row.
        self.full_next = true;
        let (mut delta, mut pause) = {
            let _pause = trainer.pause().await;
            let paused = Instant::now();
            (trainer.take_delta(request).await?, paused.elapsed())
        };
        // Rows taken over at their previous owner's values: subscribers hold those, not the
        // reference here (this instance's old copies), so they go out whatever they moved.
        let taken_over = std::mem::take(&mut delta.exchange.taken_over);
        if taken_over.iter().any(|t| t.numel() > 0) {
            self.retried_rows = union_rows(&self.retried_rows, &taken_over);
        }
        update_row_ts(&mut self.row_ts, &delta);
        let candidate = Candidate::of_delta(&mut delta);
        let reference = self.reference.as_ref().map(|r| r.params.shallow_clone());
        let mut assessed = align.assess(version, candidate, reference).await?;
        if let Some(hold) = assessed.hold {
            let restored = trainer.restore().await?;
            trainer.set_pull(assessed.pull, None, None).await?;
            warn!(version, reason = hold.label(), ?hold, ?restored, pull = assessed.pull,
                "version held back by the drift gate; the trainer goes back to its newest checkpoint");
            return Ok(Assessment::Held(hold));
        }
        if assessed.rotation.is_some() && self.shares_rows() {
            // Instances that exchange gradients and rows train one model in one coordinate
            // frame; rotating one instance's rows alone would split it (its copies of other
            // owners' rows, and the gradients it sends, in another frame than theirs).
            assessed.rotation = None;
        }
        if let Some(r) = assessed.rotation.take() {
            // The model turned away from the anchor: rotate it (every row, on the training
            // thread) and take every row, all of which moved.
            let _pause = trainer.pause().await;
            let paused = Instant::now();
            trainer.rotate(r).await?;
            delta = trainer
                .take_delta(DeltaRequest {
                    full: true,
                    samples: Vec::new(),
                    window: self.gradients.is_some().then_some(window),
                })
                .await?;
            pause += paused.elapsed();
            update_row_ts(&mut self.row_ts, &delta);
            info!(
                version,
                residual = assessed.figures.procrustes_residual,
                "version rotated onto the anchor"
            );
        }
        Ok(Assessment::Passed {
            delta,
            assessed,
            pause,
        })
    }

    /// Codebooks to learn: every row goes out, coded with them.
    fn every_row(&self) -> bool {
        self.quantizer
            .as_ref()
            .is_some_and(Quantizer::needs_every_row)
    }

    /// The version built from `delta` (encoded rows, coded when `publish.format = "pq"`) and the
    /// view subscribers will hold after it; `None` when nothing moved.
    fn build(
        &self,
        store: &GraphStore,
        version: u64,
        epoch: u64,
        mut delta: ModelDelta,
        assessed: &Assessed,
    ) -> anyhow::Result<Option<Built>> {
        // A model without a single node row has seen no edge: its relation vectors are its
        // random start, not a version.
        if self.reference.is_none() && delta.tables.iter().all(|t| t.len == 0) {
            return Ok(None);
        }
        let every_row = self.every_row();
        let held = self.reference.as_ref().map_or(&[][..], |r| &r.biases);
        // Erasures the committed versions have not carried yet; the ledger records how far the
        // tombstones went with the commit, so a failed attempt carries them again.
        let erasures_published = self.ledger.state().erasures_published;
        let tombstones = store.erasures_since(erasures_published as usize);
        let req = VersionRequest {
            version,
            epoch,
            format: self.settings.format,
            threshold: self.settings.threshold,
            comparator: self.settings.comparator,
            align: Some(&assessed.figures),
            tombstones: &tombstones,
            every_row,
            reference_biases: held,
            builds_on: self.ledger.builds_on(),
            retried_rows: &self.retried_rows,
            scope: &self.scope,
        };
        let reference = self.reference.as_ref().map(|r| &r.params);
        let Some((mut prepared, update)) = build_delta_version(store, &delta, reference, &req)?
        else {
            return Ok(None);
        };
        // Every row is in this version when the take was full and nothing was compared away.
        let carries_every_row = every_row || self.reference.is_none();
        let coding = match &self.quantizer {
            Some(q) => Some(q.code(&mut prepared, carries_every_row)?),
            None => None,
        };
        // The rows not published go now, before the view's copy is made (at a million rows
        // under a backlog the delta is as large as a table).
        let changed = delta.changed_rows();
        for table in &mut delta.tables {
            table.values = Tensor::empty([0], (tch::Kind::Float, tch::Device::Cpu));
        }
        let tables = update.apply(reference)?;
        let codes = match coding.as_ref().and_then(|c| c.codebooks.as_ref()) {
            Some(books) => Some(served_codes(
                self.served_codes.as_ref(),
                books,
                &update,
                &prepared.rows,
                &tables,
                carries_every_row,
            )?),
            None => None,
        };
        let view = PublishedView {
            version,
            epoch,
            comparator: self.settings.comparator,
            tables,
            relations: delta.relations.shallow_clone(),
            biases: update.apply_biases(held),
            row_ts: self.row_ts.clone(),
            changed: Some(update.changed()),
            codes,
            scope: Some(self.scope.clone()),
        };
        Ok(Some(Built {
            prepared,
            update,
            view,
            coding,
            changed,
            tombstones,
            erasures_published,
        }))
    }

    /// Produce `built`, commit it to the ledger (and its codebooks), make it the reference, and
    /// hand the aligner and the trainer their new pull.
    async fn commit(
        &mut self,
        built: Built,
        figures: AlignFigures,
        timing: Timing,
        trainer: &mut impl TrainerPort,
        align: &mut impl AlignPort,
        sink: &mut impl VersionSink,
    ) -> anyhow::Result<Outcome> {
        let Built {
            prepared,
            update,
            view,
            coding,
            changed,
            tombstones,
            erasures_published,
        } = built;
        let (version, epoch) = (view.version, view.epoch);
        let (pause_ms, prepare_ms) = (timing.pause_ms, timing.prepare_ms);
        let rows = prepared.marker.rows;
        self.status.set_in_progress(Some(InProgress {
            version,
            epoch,
            rows,
        }));
        info!(
            version,
            epoch, rows, pause_ms, prepare_ms, "publication started"
        );
        // Until the commit, this attempt may complete on the broker (a lost acknowledgement):
        // whatever retries the version carries its rows again.
        self.ledger.begin()?;
        self.retried_rows = union_rows(&self.retried_rows, &update.changed());
        sink.produce(&prepared).await?;
        let base = self.ledger.builds_on().is_none();
        self.ledger.commit(
            version,
            erasures_published + tombstones.len() as u64,
            &self.scope,
            prepared.cursor,
        )?;
        *self.status.covered.lock() = self.scope.covered().to_vec();
        if base {
            self.status.bases.fetch_add(1, Ordering::Relaxed);
        }
        self.retried_rows.clear();
        if let Some(g) = &mut self.gradients {
            // Each window part has exactly one first chunk.
            let parts = g.pending.iter().filter(|c| c.chunk == 0).count() as u64;
            let rows: usize = g.pending.iter().map(|c| c.rows.len()).sum();
            g.inbox.count_sent(parts, rows as u64);
            g.inbox.set_sent_below(prepared.cursor);
            metrics::counter!(m::EXCHANGE_ROWS, "kind" => "sent").increment(rows as u64);
            g.pending = Arc::default();
        }
        if let (Some(q), Some(coding)) = (&mut self.quantizer, coding) {
            self.status.record_coding(&coding);
            q.commit(coding)?;
            self.served_codes = view.codes.as_ref().map(ServedCodes::shallow_clone);
        }
        let events = self
            .freshness
            .as_ref()
            .map_or(0, |f| f.published(prepared.cursor, persist::now_ms()));
        self.adopt(version, &view)?;
        let pull = align
            .adopt(version, &figures, view.params(), &tombstones)
            .await?;
        trainer
            .set_pull(pull, Some(view.params()), Some(update.changed()))
            .await?;
        self.full_next = false;
        VersionPublished {
            version,
            epoch,
            rows,
            events,
            figures: &figures,
            pull,
            pause_ms,
            prepare_ms,
            changed,
            total_ms: timing.started.elapsed().as_millis() as u64,
        }
        .emit(&self.status);
        Ok(Outcome::Committed {
            prepared,
            view,
            figures,
        })
    }

    /// The committed version becomes the reference (in memory first: subscribers hold it
    /// whether or not it persists; then persisted when there is a folder and the last write is
    /// [`REFERENCE_PERSIST_EVERY`] old).
    fn adopt(&mut self, version: u64, view: &PublishedView) -> anyhow::Result<()> {
        let params = view.params();
        let biases = (view.biases.iter())
            .map(|b| b.as_ref().map(Tensor::shallow_clone))
            .collect();
        self.reference = Some(Reference {
            version,
            params,
            biases,
        });
        self.reference_stale = true;
        if self
            .reference_written
            .is_none_or(|at| at.elapsed() >= REFERENCE_PERSIST_EVERY)
        {
            self.persist_reference()?;
        }
        Ok(())
    }

    /// Write the reference now if the one on disk is older (at shutdown, after the final
    /// publication).
    pub fn persist_reference(&mut self) -> anyhow::Result<()> {
        if let (true, Some(dir), Some(r)) = (self.reference_stale, &self.dir, &self.reference) {
            save_snapshot(dir, REFERENCE, r.version, &r.params)?;
            self.reference_written = Some(Instant::now());
        }
        self.reference_stale = false;
        Ok(())
    }
}

/// The daemon's trainer: its actor, paused through the lock its driver takes for every round.
pub struct TrainerActorPort {
    pub trainer: Addr<TrainerActor>,
    pub turn: Arc<tokio::sync::Mutex<()>>,
}

impl TrainerPort for TrainerActorPort {
    async fn pause(&mut self) -> Option<OwnedMutexGuard<()>> {
        Some(self.turn.clone().lock_owned().await)
    }

    async fn take_delta(&mut self, req: DeltaRequest) -> anyhow::Result<ModelDelta> {
        Ok(self.trainer.send(TakeDelta(req)).await??)
    }

    async fn rotate(&mut self, r: Tensor) -> anyhow::Result<()> {
        Ok(self.trainer.send(Rotate(r)).await??)
    }

    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>> {
        Ok(Some(self.trainer.send(RestoreCheckpoint).await??))
    }

    async fn set_pull(
        &mut self,
        strength: f64,
        target: Option<Snapshot>,
        changed: Option<Vec<Tensor>>,
    ) -> anyhow::Result<()> {
        Ok(self
            .trainer
            .send(SetPull {
                strength,
                target,
                changed,
            })
            .await?)
    }
}

/// A trainer in the caller's thread (offline measurements, tests), with the checkpoints a held
/// version goes back to (none: a hold only raises the pull).
pub struct InProcessTrainer<'a> {
    pub core: &'a mut TrainerCore,
    pub checkpoints: Option<(&'a Checkpoints, u32)>,
}

impl TrainerPort for InProcessTrainer<'_> {
    async fn pause(&mut self) -> Option<OwnedMutexGuard<()>> {
        None
    }

    async fn take_delta(&mut self, req: DeltaRequest) -> anyhow::Result<ModelDelta> {
        Ok(self.core.take_delta(&req))
    }

    async fn rotate(&mut self, r: Tensor) -> anyhow::Result<()> {
        self.core.rotate(&r);
        Ok(())
    }

    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>> {
        let Some((ckpts, fingerprint)) = self.checkpoints else {
            return Ok(None);
        };
        let version = self.core.restore(ckpts, fingerprint)?;
        Ok(Some((version, self.core.cursor())))
    }

    async fn set_pull(
        &mut self,
        strength: f64,
        target: Option<Snapshot>,
        changed: Option<Vec<Tensor>>,
    ) -> anyhow::Result<()> {
        self.core
            .set_pull_changed(strength, target.as_ref(), changed.as_deref());
        Ok(())
    }
}

impl AlignPort for Addr<AlignActor> {
    async fn plan(
        &mut self,
        version: u64,
        reference: Option<Vec<i64>>,
    ) -> anyhow::Result<DriftPlan> {
        Ok(self.send(Plan { version, reference }).await?)
    }

    async fn assess(
        &mut self,
        version: u64,
        current: Candidate,
        reference: Option<Snapshot>,
    ) -> anyhow::Result<Assessed> {
        Ok(self
            .send(Assess {
                version,
                current,
                reference,
            })
            .await?)
    }

    async fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
        erased: &[NodeRef],
    ) -> anyhow::Result<f64> {
        Ok(self
            .send(Adopt {
                version,
                figures: figures.clone(),
                published,
                erased: erased.to_vec(),
            })
            .await??)
    }
}

impl AlignPort for &mut Aligner {
    async fn plan(
        &mut self,
        version: u64,
        reference: Option<Vec<i64>>,
    ) -> anyhow::Result<DriftPlan> {
        Ok(Aligner::plan(self, version, reference.as_deref()))
    }

    async fn assess(
        &mut self,
        version: u64,
        current: Candidate,
        reference: Option<Snapshot>,
    ) -> anyhow::Result<Assessed> {
        Ok(Aligner::assess(self, version, &current, reference.as_ref()))
    }

    async fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
        erased: &[NodeRef],
    ) -> anyhow::Result<f64> {
        Ok(Aligner::adopt(self, version, figures, published, erased)?)
    }
}

/// Versions kept in memory (offline measurements, tests): every marker produced, in order.
#[derive(Debug, Default)]
pub struct MemorySink {
    pub markers: Vec<VersionMarker>,
    pub rows: u64,
}

impl VersionSink for MemorySink {
    async fn produce(&mut self, prepared: &PreparedVersion) -> anyhow::Result<()> {
        self.rows += prepared.rows.len() as u64;
        self.markers.extend(prepared.markers());
        Ok(())
    }
}

/// Run `publication.publish` in the caller's thread, for in-process ports (nothing they await
/// waits on I/O).
pub fn publish_in_process(
    publication: &mut Publication,
    store: &GraphStore,
    trainer: &mut InProcessTrainer,
    mut aligner: &mut Aligner,
    sink: &mut MemorySink,
) -> anyhow::Result<Outcome> {
    futures::executor::block_on(publication.publish(store, trainer, &mut aligner, sink))
}

/// The aligner's verdict on a version's delta. One per publication attempt, moved once: its
/// size does not matter.
#[allow(clippy::large_enum_variant)]
enum Assessment {
    Held(Hold),
    Passed {
        delta: ModelDelta,
        assessed: Assessed,
        /// How long training was paused for the delta (and a rotation).
        pause: std::time::Duration,
    },
}

/// A version built and not yet produced ([`Publication::build`]).
struct Built {
    prepared: PreparedVersion,
    update: ViewUpdate,
    view: PublishedView,
    coding: Option<Coding>,
    /// Rows the trainer changed since the previous version (published or not).
    changed: i64,
    tombstones: Vec<NodeRef>,
    erasures_published: u64,
}

/// When a publication started, and how long its pause and its preparation took.
struct Timing {
    started: Instant,
    pause_ms: f64,
    prepare_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::align::AlignStatus;
    use crate::config::Config;
    use crate::publish::subscriber::VersionAssembler;
    use crate::publish::Record;
    use crate::store::testing::{follow, follows_store};
    use crate::store::AppendBatch;
    use crate::train::Embeddings;
    use tch::Device;

    /// What a subscriber assembles from the records the publication produces; with
    /// `lose_ack`, the next version reaches it whole but the publication hears of a failure (a
    /// marker whose acknowledgement was lost).
    #[derive(Default)]
    struct Subscriber {
        assembler: VersionAssembler,
        lose_ack: bool,
    }

    impl VersionSink for Subscriber {
        async fn produce(&mut self, prepared: &PreparedVersion) -> anyhow::Result<()> {
            for (i, key) in prepared.rows.keys().enumerate() {
                self.assembler
                    .push_record(0, key, Record::decode(&prepared.rows.encode(i))?);
            }
            self.assembler.push_marker(prepared.marker.clone());
            anyhow::ensure!(
                !std::mem::take(&mut self.lose_ack),
                "the marker's acknowledgement was lost"
            );
            Ok(())
        }
    }

    /// Every served row of type 0 (`user`), with its bias when the type has one, is what the
    /// subscriber holds under the node's key.
    fn assert_subscriber_holds(store: &GraphStore, view: &PublishedView, subscriber: &Subscriber) {
        let table = subscriber.assembler.table();
        let rows = view.tables[0].size()[0];
        for i in 0..rows {
            let mut served = Vec::<f32>::try_from(view.tables[0].get(i)).unwrap();
            if let Some(biases) = view.biases.first().and_then(Option::as_ref) {
                served.push(biases.double_value(&[i]) as f32);
            }
            let key = user_key(store, i as u32);
            assert_eq!(table[&key].vector, served, "{key}");
        }
    }

    /// The persisted reference is restored at open when it is the ledger's last version, but
    /// not when the ledger shows an attempt of the next version under way at the last stop: that
    /// attempt may have completed on the broker, so the first version carries every row.
    #[test]
    fn an_attempt_under_way_at_the_last_stop_makes_the_first_version_carry_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let reference = Snapshot {
            tables: vec![Tensor::ones([3, 2], (tch::Kind::Float, Device::Cpu))],
            relations: Tensor::zeros([1, 2], (tch::Kind::Float, Device::Cpu)),
        };
        save_snapshot(dir.path(), REFERENCE, 1, &reference).unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        ledger.commit(1, 0, &Scope::whole(1), 0).unwrap();
        drop(ledger);
        let settings = VersionSettings {
            format: ValueFormat::F32le,
            threshold: 0.01,
            comparator: Comparator::Dot,
        };
        let open = || {
            let ledger = Ledger::open(dir.path()).unwrap();
            Publication::open(ledger, settings, Some(dir.path().to_owned())).unwrap()
        };
        assert_eq!(open().reference().map(|(v, _)| v), Some(1), "restored");
        let mut ledger = Ledger::open(dir.path()).unwrap();
        ledger.begin().unwrap();
        drop(ledger);
        let publication = open();
        assert!(publication.reference().is_none(), "every row goes out");
        assert_eq!(publication.ledger().next_version(), 2);
    }

    /// Drift control off, f32le rows, a row threshold of 0.01, nothing on disk.
    fn in_memory_publication(cfg: &Config) -> (Aligner, Publication) {
        let mut align_cfg = cfg.align.clone();
        align_cfg.enabled = false;
        let status = Arc::new(AlignStatus::default());
        let aligner = Aligner::new(align_cfg, false, None, status).unwrap();
        let settings = VersionSettings {
            format: ValueFormat::F32le,
            threshold: 0.01,
            comparator: cfg.train.comparator,
        };
        let publication = Publication::open(Ledger::in_memory(), settings, None).unwrap();
        (aligner, publication)
    }

    /// A new model over `follows_store`'s one node type and relation, drawn after `seed`.
    fn new_core(cfg: &Config, seed: i64) -> TrainerCore {
        tch::manual_seed(seed);
        let model = Embeddings::new(1, 1, cfg.train.dim, cfg.train.init_scale, Device::Cpu);
        TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone())
    }

    /// Append `n` follows numbered from `first` and train until the trainer has drained them.
    fn train_follows(store: &GraphStore, core: &mut TrainerCore, first: u32, n: u32) {
        let events = (first..first + n).map(|i| follow(i % 40, (i * 7 + 3) % 40, u64::from(i)));
        store
            .append(&AppendBatch::from_events("t", i64::from(first), events))
            .unwrap();
        while core.step(store).unwrap().stats.is_some() {}
    }

    fn user_key(store: &GraphStore, index: u32) -> String {
        let node = NodeRef {
            node_type: 0,
            index,
        };
        format!("user:{}", store.node_id(node).unwrap().unwrap())
    }

    /// A biased type's rows go out when they or their biases moved, an idle trainer publishes
    /// nothing, and what a subscriber assembled is what the publication serves, biases included.
    /// Issue 24, contract 3: covering the same partitions again with the topic showing its own
    /// last attempt, a publication goes on building on it; covering others (an assignment moved
    /// some to another instance, which published them meanwhile), it starts its partitions
    /// over: a base two above what the topic shows, under a newer epoch, with every row of its
    /// partitions and none of the others', and a marker for each of its partitions.
    #[test]
    fn a_publication_whose_partitions_changed_starts_them_over_and_the_same_ones_continue() {
        use crate::partition::{partition_of, Owned};
        let dir = tempfile::tempdir().unwrap();
        let store = follows_store(dir.path());
        let cfg = Config::from_toml("[train]\ndim = 8\nbatch_size = 32").unwrap();
        let mut core = new_core(&cfg, 3);
        let (mut aligner, mut publication) = in_memory_publication(&cfg);
        let mut publish = |publication: &mut Publication, core: &mut TrainerCore| {
            let mut trainer = InProcessTrainer {
                core,
                checkpoints: None,
            };
            let (mut aligner, mut sink) = (&mut aligner, MemorySink::default());
            let published = publication.publish(&store, &mut trainer, &mut aligner, &mut sink);
            match futures::executor::block_on(published).unwrap() {
                Outcome::Committed { prepared, .. } => prepared,
                _ => panic!("a version was expected"),
            }
        };
        let append = |first: u32, n: u32, core: &mut TrainerCore| {
            train_follows(&store, core, first, n);
        };
        let tail = |markers: &[VersionMarker]| {
            let mut t = VersionsTail::default();
            markers.iter().for_each(|m| t.observe(m));
            t
        };
        let marks = |v: &PreparedVersion| -> Vec<(Option<i32>, Option<u64>)> {
            (v.markers().iter())
                .map(|m| (m.partition, m.builds_on.map(|a| a.version)))
                .collect()
        };
        let all = Scope::whole(4);
        assert!(!publication
            .rescope(all.clone(), &VersionsTail::default())
            .unwrap());
        append(0, 200, &mut core);
        let first = publish(&mut publication, &mut core);
        assert_eq!(
            marks(&first),
            [
                (Some(0), None),
                (Some(1), None),
                (Some(2), None),
                (Some(3), None)
            ]
        );
        assert!(
            !publication
                .rescope(all.clone(), &tail(&first.markers()))
                .unwrap(),
            "the same partitions, the topic showing its own attempt: it continues"
        );
        append(200, 100, &mut core);
        let second = publish(&mut publication, &mut core);
        assert_eq!(second.marker.version, 2);
        assert!(marks(&second).iter().all(|&(_, on)| on == Some(1)));
        // Partitions 2 and 3 moved to another instance, which published them up to version 7.
        let mut shown = second.markers();
        shown.extend([2, 3].map(|p| VersionMarker::for_partition(7, 9, 1, p, 4)));
        let half = Scope::owned(
            4,
            &Owned {
                generation: 2,
                partitions: vec![0, 1],
            },
        );
        assert!(publication.rescope(half, &tail(&shown)).unwrap(), "a base");
        let base = publish(&mut publication, &mut core);
        assert_eq!((base.marker.version, base.marker.epoch), (9, 10));
        assert_eq!(marks(&base), [(Some(0), None), (Some(1), None)]);
        let ours = |k: &str| partition_of(k.as_bytes(), 4) < 2;
        let mut expected: Vec<String> = (0..store.node_count(0))
            .map(|i| user_key(&store, i))
            .filter(|k| ours(k))
            .collect();
        expected.sort();
        let mut carried: Vec<String> = (base.rows.keys())
            .filter(|k| !k.starts_with("relation:"))
            .map(str::to_owned)
            .collect();
        carried.sort();
        assert!(!expected.is_empty());
        assert_eq!(
            carried, expected,
            "every row of its partitions, none of the others'"
        );
    }

    #[test]
    fn a_biased_type_publishes_what_moved_and_subscribers_hold_the_served_biases() {
        let dir = tempfile::tempdir().unwrap();
        let store = follows_store(dir.path());
        let cfg = Config::from_toml("[train]\ndim = 8\nbatch_size = 32\nbias_types = [\"user\"]")
            .unwrap();
        tch::manual_seed(5);
        let mut model = Embeddings::new(1, 1, cfg.train.dim, cfg.train.init_scale, Device::Cpu);
        model.set_biased(&["user".to_owned()], &cfg.train.bias_types);
        let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
        let (mut aligner, mut publication) = in_memory_publication(&cfg);
        let mut subscriber = Subscriber::default();
        let mut publish = |core: &mut TrainerCore| {
            let mut trainer = InProcessTrainer {
                core,
                checkpoints: None,
            };
            let mut aligner = &mut aligner;
            let published =
                publication.publish(&store, &mut trainer, &mut aligner, &mut subscriber);
            futures::executor::block_on(published).unwrap()
        };
        let append = |first: u32, n: u32, core: &mut TrainerCore| {
            train_follows(&store, core, first, n);
        };

        // A model that has seen no edge: its random relation vectors are no version.
        assert!(matches!(publish(&mut core), Outcome::Unchanged));
        append(0, 200, &mut core);
        assert!(matches!(publish(&mut core), Outcome::Committed { .. }));
        // Idle: nothing trained, nothing moved, nothing published.
        assert!(matches!(publish(&mut core), Outcome::Unchanged));
        // One bias moved, nothing else: one row (and the relation vector) goes out.
        tch::no_grad(|| {
            let _ = core.model.tables[0].bias.get(3).fill_(2.5);
        });
        let Outcome::Committed { prepared, .. } = publish(&mut core) else {
            panic!("a moved bias is a version")
        };
        let row3 = NodeRef {
            node_type: 0,
            index: 3,
        };
        let key3 = user_key(&store, row3.index);
        assert_eq!(
            prepared.rows.keys().collect::<Vec<_>>(),
            [key3.as_str(), "relation:follows"]
        );
        append(200, 100, &mut core);
        let Outcome::Committed { view, .. } = publish(&mut core) else {
            panic!("training moved rows")
        };
        // The subscriber's table: every user's vector then bias, as served.
        assert!(view.biases[0].is_some(), "a biased type's biases");
        assert_subscriber_holds(&store, &view, &subscriber);
    }

    /// A version whose marker landed but whose acknowledgement was lost: the publication
    /// retries it under a new epoch, carrying every row the lost attempt carried even where it
    /// moved back since, and builds the next version on the retry; the subscriber, which applied
    /// the first attempt, applies the retry over it and ends with the served rows.
    #[test]
    fn a_lost_acknowledgement_is_retried_over_what_subscribers_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = follows_store(dir.path());
        let cfg = Config::from_toml("[train]\ndim = 8\nbatch_size = 32").unwrap();
        let mut core = new_core(&cfg, 7);
        let (mut aligner, mut publication) = in_memory_publication(&cfg);
        let mut subscriber = Subscriber::default();
        let mut publish = |core: &mut TrainerCore, subscriber: &mut Subscriber| {
            let mut trainer = InProcessTrainer {
                core,
                checkpoints: None,
            };
            let mut aligner = &mut aligner;
            futures::executor::block_on(publication.publish(
                &store,
                &mut trainer,
                &mut aligner,
                subscriber,
            ))
        };
        let train = |core: &mut TrainerCore, from: u32| train_follows(&store, core, from, 100);
        let committed = |outcome: anyhow::Result<Outcome>| match outcome.unwrap() {
            Outcome::Committed { prepared, view, .. } => (prepared, view),
            _ => panic!("a version was expected"),
        };

        train(&mut core, 0);
        let (_, v1) = committed(publish(&mut core, &mut subscriber));
        train(&mut core, 100);
        subscriber.lose_ack = true;
        assert!(publish(&mut core, &mut subscriber).is_err());
        assert_eq!(
            subscriber.assembler.applied_version(),
            2,
            "the lost attempt completed"
        );
        let lost = subscriber.assembler.applied_marker().unwrap().clone();
        // A row the lost attempt carried goes back to where version 1 had it: compared with the
        // reference alone, the retry would leave it out.
        let back = (0..40u32)
            .find(|&i| {
                let key = user_key(&store, i);
                subscriber.assembler.get(&key).map(|e| e.version) == Some(2)
            })
            .expect("version 2 carried a user row");
        tch::no_grad(|| {
            (core.model.tables[0].weights.get(i64::from(back)))
                .copy_(&v1.tables[0].get(i64::from(back)));
        });
        let (retry, v2) = committed(publish(&mut core, &mut subscriber));
        assert_eq!(retry.marker.version, 2);
        assert!(retry.marker.epoch > lost.epoch, "a new epoch");
        assert_eq!(retry.marker.builds_on, lost.builds_on);
        let back_key = user_key(&store, back);
        assert!(
            retry.rows.keys().any(|k| k == back_key),
            "the retry carries {back_key} again"
        );
        assert_eq!(subscriber.assembler.counts().retries_applied, 1);
        assert_subscriber_holds(&store, &v2, &subscriber);

        train(&mut core, 200);
        let (v3_prepared, v3) = committed(publish(&mut core, &mut subscriber));
        assert_eq!(
            v3_prepared.marker.builds_on,
            Some(retry.marker.attempt()),
            "version 3 builds on the retry"
        );
        assert_eq!(subscriber.assembler.applied_version(), 3);
        assert_subscriber_holds(&store, &v3, &subscriber);
    }
}
