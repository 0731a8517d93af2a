//! The training driver and its supervisor: rounds sent to the trainer actor back to back (idle
//! waits between them when the log is drained), and a failed round answered by a restart from
//! the newest checkpoint, with backoff, until too many failures in a row stop the daemon.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::telemetry as m;
use crate::train::{RestoreCheckpoint, TrainRound, TrainerActor, TrainerError, TrainerStatus};

/// Failures tolerated within [`RESTART_WINDOW`] before the daemon gives up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Wait before the first restart; doubled for each further failure within the window.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Restarts the trainer from its newest checkpoint after a failed round.
#[derive(Default)]
pub struct Supervisor {
    recent: VecDeque<Instant>,
}

impl Supervisor {
    /// How long to wait before restarting after a failure at `now`, or `None` when the failures
    /// within the window are too many (then the daemon stops).
    pub fn backoff(&mut self, now: Instant) -> Option<Duration> {
        self.recent
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.recent.len() >= MAX_RESTARTS {
            return None;
        }
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << self.recent.len().min(16))
            .min(MAX_BACKOFF);
        self.recent.push_back(now);
        Some(wait)
    }

    async fn restart(
        &mut self,
        trainer: &Addr<TrainerActor>,
        status: &TrainerStatus,
        error: TrainerError,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let Some(wait) = self.backoff(Instant::now()) else {
            return Err(anyhow::Error::new(error).context(format!(
                "the trainer failed {} times within {} s; giving up",
                MAX_RESTARTS + 1,
                RESTART_WINDOW.as_secs()
            )));
        };
        metrics::counter!(m::ACTOR_RESTARTS, "actor" => "trainer").increment(1);
        status.restarts.fetch_add(1, Ordering::Relaxed);
        warn!(error = %error, wait_ms = wait.as_millis() as u64,
            "trainer failed; its supervisor restarts it from the newest checkpoint");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Ok(()),
        }
        let (checkpoint, cursor) = trainer
            .send(RestoreCheckpoint)
            .await
            .map_err(|e| anyhow::anyhow!("trainer actor unreachable: {e}"))??;
        info!(checkpoint, cursor, "trainer restarted");
        Ok(())
    }
}

/// Send training rounds until `stop` turns true; each round holds `turn`, which a publication
/// takes to pause training. Ends with an error when the trainer cannot be kept running.
pub async fn drive_training(
    trainer: Addr<TrainerActor>,
    status: Arc<TrainerStatus>,
    turn: Arc<tokio::sync::Mutex<()>>,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut supervisor = Supervisor::default();
    while !*stop.borrow() {
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
                    _ = stop.changed() => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _turn = turn.lock().await;
                supervisor.restart(&trainer, &status, e, &mut stop).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_give_up_past_the_limit() {
        let mut s = Supervisor::default();
        let t0 = Instant::now();
        let waits: Vec<_> = (0..MAX_RESTARTS)
            .map(|i| s.backoff(t0 + Duration::from_millis(i as u64)))
            .collect();
        assert_eq!(
            waits,
            vec![
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(400)),
                Some(Duration::from_millis(800)),
                Some(Duration::from_millis(1600)),
                Some(Duration::from_millis(3200)),
            ]
        );
        assert_eq!(s.backoff(t0 + Duration::from_millis(10)), None);
        // Failures older than the window no longer count.
        assert_eq!(
            s.backoff(t0 + RESTART_WINDOW + Duration::from_secs(1)),
            Some(FIRST_BACKOFF)
        );
    }
}
