//! The publication ticker: a [`Publication`] every `publish.interval_ms`, start to start, with
//! the daemon's ports (trainer and alignment actors, Kafka); each committed version goes to the
//! serving view.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::sync::watch;
use tracing::warn;

use crate::align::AlignActor;
use crate::ingest::IngestStatus;
use crate::publish::{KafkaSink, Outcome, Publication, TrainerActorPort};
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
    /// Versions go out only while this instance consumes every partition (its graph is whole):
    /// per-partition versions from several instances are not built yet.
    pub ingest: Arc<IngestStatus>,
}

impl Ticker {
    /// Publish the next version; a committed one becomes the served version. Returns its number
    /// (`None`: held or nothing moved).
    pub async fn publish_once(&mut self) -> anyhow::Result<Option<u64>> {
        if !self.ingest.owns_all_partitions() {
            let status = self.publication.status();
            // Said once every 60 held ticks: several instances hold it for as long as they
            // share the partitions.
            if status.held_partial.fetch_add(1, Ordering::Relaxed) % 60 == 0 {
                warn!(
                    assigned = self.ingest.assigned_partitions.load(Ordering::Relaxed),
                    total = self.ingest.topic_partitions.load(Ordering::Relaxed),
                    "publication held: this instance owns part of the engagements topic's partitions (others in the group own the rest); versions go out from an instance that owns them all"
                );
            }
            return Ok(None);
        }
        self.publish_once_owned().await
    }

    /// [`Ticker::publish_once`] without the ownership check (the final publication at shutdown,
    /// after the consumer gave its partitions up).
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
