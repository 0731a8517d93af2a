//! The publication, written once: assess → hold → prepare → produce → commit → adopt.
//!
//! [`Publication::publish`] runs it against three ports, so the daemon (trainer and alignment
//! actors, Kafka) and the offline measurements and tests (a [`TrainerCore`] and an [`Aligner`]
//! in the caller's thread, an in-memory sink) take the same decisions:
//!
//! 1. **assess**: training pauses; the trainer's parameters are copied to the CPU and the aligner
//!    measures them against the reference (the version subscribers hold) and the anchor;
//! 2. **hold**: a non-finite or runaway version is not published: the trainer goes back to its
//!    newest checkpoint (where it has one) and the pull rises to `align.pull_max`;
//! 3. **prepare**: the rotation onto the anchor is applied to the model and to the copy, and the
//!    version is built from the copy ([`build_version`]); training resumes;
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

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::Addr;
use anyhow::Context as _;
use serde::Serialize;
use tch::Tensor;
use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};

use crate::align::{Adopt, AlignActor, AlignFigures, Aligner, Assess, Assessed, Hold};
use crate::config::{Comparator, ValueFormat};
use crate::persist;
use crate::publish::{
    build_version, Freshness, Ledger, PreparedVersion, PublishedView, VersionMarker, VersionRequest,
};
use crate::store::GraphStore;
use crate::telemetry as m;
use crate::train::{
    load_snapshot, save_snapshot, Checkpoints, ModelState, RestoreCheckpoint, Rotate, SetPull,
    Snapshot, TakeSnapshot, TrainerActor, TrainerCore,
};

/// The persisted reference's file stem in `publish.path`.
pub const REFERENCE: &str = "reference";

/// The trainer as a publication sees it.
#[allow(async_fn_in_trait)]
pub trait TrainerPort {
    /// Pause training until the guard drops (`None`: nothing else trains meanwhile).
    async fn pause(&mut self) -> Option<OwnedMutexGuard<()>>;
    /// The parameters on the CPU, each row's newest event time, the cursor.
    async fn state(&mut self) -> anyhow::Result<ModelState>;
    async fn rotate(&mut self, r: &Tensor) -> anyhow::Result<()>;
    /// Go back to the newest checkpoint: `(checkpoint, cursor)`, `None` without checkpoints.
    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>>;
    /// Pull with `strength` from now on, toward `target` when given.
    async fn set_pull(&mut self, strength: f64, target: Option<Snapshot>) -> anyhow::Result<()>;
}

/// The alignment as a publication sees it.
#[allow(async_fn_in_trait)]
pub trait AlignPort {
    async fn assess(
        &mut self,
        version: u64,
        current: Snapshot,
        reference: Option<Snapshot>,
    ) -> anyhow::Result<Assessed>;
    /// The version is committed: returns the pull strength for the next interval.
    async fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
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
    /// No node row moved since the reference: nothing to publish.
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
    /// Publications skipped because this daemon did not consume every partition.
    pub held_partial: AtomicU64,
}

impl PublishStatus {
    pub fn in_progress(&self) -> Option<InProgress> {
        *self.in_progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_in_progress(&self, v: Option<InProgress>) {
        *self.in_progress.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// A version committed: its marker acknowledged and the ledger written. [`VersionPublished::emit`]
/// is the only place this is recorded (metrics, `/v1/status`, the log line).
pub struct VersionPublished<'a> {
    pub version: u64,
    pub epoch: u64,
    pub rows: u64,
    /// Ingested events whose freshness this version resolved.
    pub events: usize,
    pub figures: &'a AlignFigures,
    pub pull: f64,
    /// Training was paused this long (snapshot, assessment, rows selected and encoded).
    pub prepare_ms: u64,
    pub total_ms: u64,
}

impl VersionPublished<'_> {
    pub fn emit(&self, status: &PublishStatus) {
        status.committed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::PUBLISH_VERSIONS).increment(1);
        metrics::counter!(m::PUBLISH_ROWS).increment(self.rows);
        metrics::gauge!(m::PUBLISH_LAST_VERSION).set(self.version as f64);
        info!(
            version = self.version,
            epoch = self.epoch,
            rows = self.rows,
            events = self.events,
            drift = self.figures.previous.map(|d| d.cosine_mean),
            residual = self.figures.procrustes_residual,
            pull = self.pull,
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
}

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
            Some(dir) => match load_snapshot(dir, REFERENCE)? {
                Some((meta, params)) if meta.version == last && last > 0 => {
                    info!(version = meta.version, "published reference restored");
                    Some(Reference {
                        version: meta.version,
                        params,
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
        })
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
        let (prepared, view, figures) = {
            let _pause = trainer.pause().await;
            let mut state = trainer.state().await?;
            let reference = self.reference.as_ref().map(|r| r.params.shallow_clone());
            let assessed = align
                .assess(version, state.params.shallow_clone(), reference)
                .await?;
            if let Some(hold) = assessed.hold {
                let restored = trainer.restore().await?;
                trainer.set_pull(assessed.pull, None).await?;
                warn!(version, reason = hold.label(), ?hold, ?restored, pull = assessed.pull,
                    "version held back by the drift gate; the trainer goes back to its newest checkpoint");
                return Ok(Outcome::Held(hold));
            }
            if let Some(r) = &assessed.rotation {
                trainer.rotate(r).await?;
                state.params = tch::no_grad(|| state.params.rotated(r));
            }
            let req = VersionRequest {
                version,
                epoch,
                format: self.settings.format,
                threshold: self.settings.threshold,
                comparator: self.settings.comparator,
                align: Some(&assessed.figures),
            };
            let reference = self.reference.as_ref().map(|r| &r.params);
            match build_version(store, &state, reference, &req)? {
                Some((prepared, view)) => (prepared, view, assessed.figures),
                None => return Ok(Outcome::Unchanged),
            }
        };
        // Training was paused for this long: snapshot, assessment, rows selected and encoded.
        let prepare_ms = started.elapsed().as_millis() as u64;
        let rows = prepared.marker.rows;
        self.status.set_in_progress(Some(InProgress {
            version,
            epoch,
            rows,
        }));
        info!(version, epoch, rows, prepare_ms, "publication started");
        sink.produce(&prepared).await?;
        self.ledger.commit(version)?;
        let events = self
            .freshness
            .as_ref()
            .map_or(0, |f| f.published(prepared.cursor, persist::now_ms()));
        self.adopt(version, &view)?;
        let pull = align.adopt(version, &figures, view.params()).await?;
        trainer.set_pull(pull, Some(view.params())).await?;
        VersionPublished {
            version,
            epoch,
            rows,
            events,
            figures: &figures,
            pull,
            prepare_ms,
            total_ms: started.elapsed().as_millis() as u64,
        }
        .emit(&self.status);
        Ok(Outcome::Committed {
            prepared,
            view,
            figures,
        })
    }

    /// The committed version becomes the reference (persisted first when there is a folder).
    fn adopt(&mut self, version: u64, view: &PublishedView) -> anyhow::Result<()> {
        let params = view.params();
        if let Some(dir) = &self.dir {
            save_snapshot(dir, REFERENCE, version, &params)?;
        }
        self.reference = Some(Reference { version, params });
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

    async fn state(&mut self) -> anyhow::Result<ModelState> {
        Ok(self.trainer.send(TakeSnapshot).await??)
    }

    async fn rotate(&mut self, r: &Tensor) -> anyhow::Result<()> {
        Ok(self.trainer.send(Rotate(r.shallow_clone())).await??)
    }

    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>> {
        Ok(Some(self.trainer.send(RestoreCheckpoint).await??))
    }

    async fn set_pull(&mut self, strength: f64, target: Option<Snapshot>) -> anyhow::Result<()> {
        Ok(self.trainer.send(SetPull { strength, target }).await?)
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

    async fn state(&mut self) -> anyhow::Result<ModelState> {
        Ok(self.core.state())
    }

    async fn rotate(&mut self, r: &Tensor) -> anyhow::Result<()> {
        self.core.rotate(r);
        Ok(())
    }

    async fn restore(&mut self) -> anyhow::Result<Option<(u64, u64)>> {
        let Some((ckpts, fingerprint)) = self.checkpoints else {
            return Ok(None);
        };
        let version = self.core.restore(ckpts, fingerprint)?;
        Ok(Some((version, self.core.cursor())))
    }

    async fn set_pull(&mut self, strength: f64, target: Option<Snapshot>) -> anyhow::Result<()> {
        self.core.set_pull(strength, target.as_ref());
        Ok(())
    }
}

impl AlignPort for Addr<AlignActor> {
    async fn assess(
        &mut self,
        version: u64,
        current: Snapshot,
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
    ) -> anyhow::Result<f64> {
        Ok(self
            .send(Adopt {
                version,
                figures: figures.clone(),
                published,
            })
            .await??)
    }
}

impl AlignPort for &mut Aligner {
    async fn assess(
        &mut self,
        version: u64,
        current: Snapshot,
        reference: Option<Snapshot>,
    ) -> anyhow::Result<Assessed> {
        Ok(Aligner::assess(self, version, &current, reference.as_ref()))
    }

    async fn adopt(
        &mut self,
        version: u64,
        figures: &AlignFigures,
        published: Snapshot,
    ) -> anyhow::Result<f64> {
        Ok(Aligner::adopt(self, version, figures, published)?)
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
        self.markers.push(prepared.marker.clone());
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
