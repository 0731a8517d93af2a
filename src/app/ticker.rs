//! The publication ticker: a [`Publication`] every `publish.interval_ms`, start to start, with
//! the daemon's ports (trainer and alignment actors, Kafka), covering the partitions this
//! instance owns; each committed version goes to the serving view.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::sync::watch;
use tracing::warn;

use crate::align::AlignActor;
use crate::config::Config;
use crate::ingest::IngestStatus;
use crate::publish::{
    read_versions_tail_of, KafkaSink, Outcome, Publication, Scope, TrainerActorPort,
};
use crate::serve::ServingView;
use crate::store::GraphStore;

/// Everything one publication needs in the daemon.
pub struct Ticker {
    pub publication: Publication,
    pub store: Arc<GraphStore>,
    pub trainer: TrainerActorPort,
    pub align: Addr<AlignActor>,
    pub sink: KafkaSink,
    pub serving: ServingView,
    /// Which partitions this instance owns: its versions cover them.
    pub ingest: Arc<IngestStatus>,
    pub cfg: Arc<Config>,
}

impl Ticker {
    /// Publish the next version of the partitions this instance owns; a committed one becomes
    /// the served version. Returns its number (`None`: nothing owned yet, held, or nothing
    /// moved). When the partitions owned changed since the last version (an assignment, a
    /// revocation, the start), the versions topic is read first for their newest markers
    /// ([`Publication::rescope`]).
    pub async fn publish_once(&mut self) -> anyhow::Result<Option<u64>> {
        let partitions = self.ingest.ownership.partition_count();
        let owned = self.ingest.ownership.get();
        if partitions == 0 || owned.partitions.is_empty() {
            return Ok(None);
        }
        // A scope taken from the group has a generation of 1 or more: the first assignment is one.
        if self.publication.scope().generation != owned.generation {
            let scope = Scope::owned(partitions, &owned);
            let (cfg, covered) = (self.cfg.clone(), scope.covered().to_vec());
            let tail = tokio::task::spawn_blocking(move || read_versions_tail_of(&cfg, &covered))
                .await??;
            self.publication.rescope(scope, &tail)?;
        }
        self.publish_once_owned().await
    }

    /// [`Ticker::publish_once`] over the partitions of the last one, without looking at what
    /// this instance owns now (the final publication at shutdown, after the consumer gave its
    /// partitions up).
    pub async fn publish_once_owned(&mut self) -> anyhow::Result<Option<u64>> {
        let outcome = self
            .publication
            .publish(
                &self.store,
                &mut self.trainer,
                &mut self.align,
                &mut self.sink,
            )
            .await?;
        Ok(match outcome {
            Outcome::Committed { view, prepared, .. } => {
                let version = view.version;
                // The version's records and the previous view are freed here; give their pages
                // back.
                drop(prepared);
                self.serving.publish(view);
                super::heap::release_freed_memory();
                Some(version)
            }
            Outcome::Held(_) | Outcome::Unchanged => None,
        })
    }

    /// Publish every `every` (start to start, not end to start: a publication's own duration
    /// does not stretch the interval; a late tick fires at once) until `stop` turns true; then
    /// hand the ticker back for the final publication.
    pub async fn run(mut self, every: Duration, mut stop: watch::Receiver<bool>) -> Ticker {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => return self,
            }
            if let Err(e) = self.publish_once().await {
                warn!(error = %format!("{e:#}"), version = self.publication.ledger().next_version(),
                    "publication failed; retried at the next interval");
            }
        }
    }
}
