//! The trainer actor (docs/architecture.md §4) around [`TrainerCore`], on its own thread (a one-thread
//! `SyncArbiter`, so libtorch never blocks an async arbiter), and the messages it receives.
//!
//! ```text
//! app's driver ──TrainRound────────► TrainerActor ──reads──► GraphStore
//!              ──SaveCheckpoint────►              ──writes─► checkpoints
//! publish      ──TakeDelta─────────► (rows written since the last version, samples, cursor)
//!              ──Rotate────────────► (Procrustes onto the anchor, when the aligner asks)
//!              ──SetPull───────────► (strength, and the newly committed version to pull toward)
//!              ──RestoreCheckpoint─► (a held version; the supervisor after a failure)
//! ```
//!
//! The actor runs steps back to back for at most `trainer.round_budget_ms` per [`TrainRound`],
//! then answers; the driver keeps sending rounds and, when idle, waits `trainer.idle_poll_ms`.
//! Checkpoints are written every `trainer.checkpoint_interval_secs` and on [`SaveCheckpoint`]; a
//! restart resumes from the newest usable one ([`TrainerCore::open`]).

use parking_lot::Mutex;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tch::{Device, Tensor};
use tracing::info;

use crate::config::Config;
use crate::store::GraphStore;
use crate::telemetry as m;
use crate::train::{
    schema_fingerprint, Checkpoints, DeltaRequest, ModelDelta, Snapshot, TrainStepTaken,
    TrainerCore, TrainerError, TrainerStatus,
};

/// Train on new edges for up to `trainer.round_budget_ms`, then answer.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoundOutcome, TrainerError>")]
pub struct TrainRound;

/// Write a checkpoint now (shutdown); resolves with its version.
#[derive(Debug, Message)]
#[rtype(result = "Result<u64, TrainerError>")]
pub struct SaveCheckpoint;

/// Copy the rows written since the previous delta (and the requested samples) to the CPU: a
/// version is built from them (see [`TrainerCore::take_delta`]).
#[derive(Debug, Message)]
#[rtype(result = "Result<ModelDelta, TrainerError>")]
pub struct TakeDelta(pub DeltaRequest);

/// Rotate the model by an orthogonal `[D, D]` matrix (onto the anchor).
#[derive(Debug, Message)]
#[rtype(result = "Result<(), TrainerError>")]
pub struct Rotate(pub Tensor);

/// Set the strength of the pull, and (when given) the version it pulls toward.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetPull {
    pub strength: f64,
    pub target: Option<Snapshot>,
    /// Per type, the rows of `target` that differ from the previous target (see
    /// [`TrainerCore::set_pull_changed`]); `None`: any.
    pub changed: Option<Vec<Tensor>>,
}

/// Go back to the newest usable checkpoint (a held version, or a failed round); resolves with
/// the checkpoint's version and cursor.
#[derive(Debug, Message)]
#[rtype(result = "Result<(u64, u64), TrainerError>")]
pub struct RestoreCheckpoint;

/// What a [`TrainRound`] did.
#[derive(Debug, Clone, Copy)]
pub struct RoundOutcome {
    pub steps: usize,
    /// The cursor reached the end of the log: wait before the next round.
    pub idle: bool,
}

/// The actor around [`TrainerCore`].
pub struct TrainerActor {
    /// Taken out of the shared slot by the first actor the arbiter makes.
    slot: Arc<Mutex<Option<TrainerCore>>>,
    core: Option<TrainerCore>,
    store: Arc<GraphStore>,
    ckpts: Checkpoints,
    fingerprint: u32,
    status: Arc<TrainerStatus>,
    budget: Duration,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    /// The pull and its target as last set, for a core reopened after a panic.
    pull: (f64, Option<Snapshot>),
    /// The ownership the core trains its sources by, for a core reopened after a panic.
    ownership: Option<Arc<crate::partition::Ownership>>,
    cfg: Config,
    device: Device,
    /// Relation names by id, for the per-relation figures.
    relation_names: Vec<String>,
}

impl TrainerActor {
    pub fn new(
        cfg: &Config,
        slot: Arc<Mutex<Option<TrainerCore>>>,
        store: Arc<GraphStore>,
        status: Arc<TrainerStatus>,
        device: Device,
    ) -> TrainerActor {
        let core = slot.lock().take();
        let ownership = core.as_ref().and_then(TrainerCore::owned_sources);
        if let Some(c) = &core {
            status.cursor.store(c.cursor(), Ordering::Relaxed);
        }
        TrainerActor {
            slot,
            core,
            relation_names: store
                .stored_schema()
                .relations
                .iter()
                .map(|(name, _, _)| name.clone())
                .collect(),
            fingerprint: schema_fingerprint(store.stored_schema()),
            store,
            ckpts: Checkpoints::new(&cfg.trainer.checkpoint_path, cfg.trainer.checkpoint_keep),
            status,
            budget: Duration::from_millis(cfg.trainer.round_budget_ms),
            checkpoint_every: Duration::from_secs(cfg.trainer.checkpoint_interval_secs),
            last_checkpoint: Instant::now(),
            pull: (0.0, None),
            ownership,
            cfg: cfg.clone(),
            device,
        }
    }

    fn save(&mut self) -> Result<u64, TrainerError> {
        let core = self.core.as_ref().ok_or(TrainerError::Gone)?;
        let version = core.checkpoint(&self.ckpts, self.fingerprint)?;
        self.last_checkpoint = Instant::now();
        self.status
            .checkpoint_version
            .store(version, Ordering::Relaxed);
        metrics::counter!(m::TRAIN_CHECKPOINTS).increment(1);
        info!(version, cursor = core.cursor(), "checkpoint written");
        Ok(version)
    }
}

impl Actor for TrainerActor {
    type Context = SyncContext<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        // Hand the model back so a restarted actor continues with it.
        if let Some(core) = self.core.take() {
            *self.slot.lock() = Some(core);
        }
    }
}

impl Handler<TrainRound> for TrainerActor {
    type Result = Result<RoundOutcome, TrainerError>;

    fn handle(&mut self, _: TrainRound, _: &mut Self::Context) -> Self::Result {
        let started = Instant::now();
        let mut steps = 0;
        let idle = loop {
            let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
            let cursor = core.cursor();
            let stepped =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step(&self.store)));
            let report = match stepped {
                Ok(r) => r?,
                Err(panic) => {
                    // The tables may be half-updated: drop them; the supervisor restores.
                    self.core = None;
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    return Err(TrainerError::Panicked { cursor, message });
                }
            };
            let core = self.core.as_mut().ok_or(TrainerError::Gone)?;
            TrainStepTaken {
                report: &report,
                core,
                relation_names: &self.relation_names,
            }
            .emit(&self.status);
            if report.stats.is_none() {
                break true;
            }
            steps += 1;
            if started.elapsed() >= self.budget {
                break false;
            }
        };
        let changed =
            steps > 0 || (self.core.as_ref()).is_some_and(TrainerCore::applied_gradients_unsaved);
        if changed && self.last_checkpoint.elapsed() >= self.checkpoint_every {
            self.save()?;
        }
        Ok(RoundOutcome { steps, idle })
    }
}

impl Handler<TakeDelta> for TrainerActor {
    type Result = Result<ModelDelta, TrainerError>;

    fn handle(&mut self, msg: TakeDelta, _: &mut Self::Context) -> Self::Result {
        Ok(self
            .core
            .as_mut()
            .ok_or(TrainerError::Gone)?
            .take_delta(&msg.0))
    }
}

impl Handler<Rotate> for TrainerActor {
    type Result = Result<(), TrainerError>;

    fn handle(&mut self, msg: Rotate, _: &mut Self::Context) -> Self::Result {
        self.core.as_mut().ok_or(TrainerError::Gone)?.rotate(&msg.0);
        Ok(())
    }
}

impl Handler<SetPull> for TrainerActor {
    type Result = ();

    fn handle(&mut self, msg: SetPull, _: &mut Self::Context) {
        if let Some(core) = self.core.as_mut() {
            core.set_pull_changed(msg.strength, msg.target.as_ref(), msg.changed.as_deref());
        }
        self.pull.0 = msg.strength;
        if msg.target.is_some() {
            self.pull.1 = msg.target;
        }
    }
}

impl Handler<RestoreCheckpoint> for TrainerActor {
    type Result = Result<(u64, u64), TrainerError>;

    fn handle(&mut self, _: RestoreCheckpoint, _: &mut Self::Context) -> Self::Result {
        let version = match self.core.as_mut() {
            Some(core) => core.restore(&self.ckpts, self.fingerprint)?,
            None => {
                // Lost after a panic: reopen from disk, with the pull as last set.
                let mut core = TrainerCore::open(&self.cfg, &self.store, self.device)?;
                core.set_pull(self.pull.0, self.pull.1.as_ref());
                if let Some(ownership) = &self.ownership {
                    core.train_owned_sources(ownership.clone());
                }
                self.core = Some(core);
                self.status.checkpoint_version.load(Ordering::Relaxed)
            }
        };
        let core = self.core.as_ref().ok_or(TrainerError::Gone)?;
        self.status.cursor.store(core.cursor(), Ordering::Relaxed);
        info!(
            checkpoint = version,
            cursor = core.cursor(),
            "trainer restored from checkpoint"
        );
        Ok((version, core.cursor()))
    }
}

impl Handler<SaveCheckpoint> for TrainerActor {
    type Result = Result<u64, TrainerError>;

    fn handle(&mut self, _: SaveCheckpoint, _: &mut Self::Context) -> Self::Result {
        self.save()
    }
}
