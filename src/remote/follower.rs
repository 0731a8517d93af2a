//! The follower thread: reads the embeddings topic's partitions this instance does not own, and
//! the versions topic, into the [`RemoteCache`]. It acts on the group's ownership once a change
//! has held for `remote.settle_ms`: partitions now owned are forgotten, partitions now owned
//! elsewhere are read from their beginning and caught up, then followed live with the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::kafka::{partition_count, read_partitions_to_end, reader, ReadError, READ_IDLE};
use crate::partition::{Owned, Ownership};
use crate::persist::now_ms;
use crate::publish::TopicRecord;
use crate::remote::{RemoteCache, TopicRead};
use crate::telemetry as m;

/// Records handed to the cache under one write lock.
const BATCH: usize = 1024;
/// How long one poll waits for a record.
const POLL: Duration = Duration::from_millis(100);
/// A catch-up reads a partition's backlog for at most this long.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    #[error("following the published state ([remote]): {0}")]
    Read(#[from] ReadError),
    #[error("following the published state ([remote]): {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("starting the remote follower thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Start the follower thread; it ends once `stop` turns true.
pub fn start_follower(
    cfg: Arc<Config>,
    cache: Arc<RemoteCache>,
    ownership: Arc<Ownership>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, FollowerError> {
    let follower = Follower::new(cfg, cache, ownership, stop);
    Ok(std::thread::Builder::new()
        .name("remote-follower".into())
        .spawn(move || follower.run())?)
}

/// Which topic a position is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Topic {
    Versions,
    Embeddings,
}

struct Follower {
    cfg: Arc<Config>,
    cache: Arc<RemoteCache>,
    ownership: Arc<Ownership>,
    stop: watch::Receiver<bool>,
    settle: Duration,
    /// Made at the first change of ownership acted on.
    consumer: Option<BaseConsumer>,
    /// The next offset to read per partition.
    positions: BTreeMap<(Topic, i32), i64>,
    /// The ownership generation the assignment reflects.
    acted_on: u64,
    /// The newest generation seen and since when.
    seen: Option<(u64, Instant)>,
    /// Records that did not decode (skipped, as any subscriber skips them).
    skipped: u64,
}

impl Follower {
    fn new(
        cfg: Arc<Config>,
        cache: Arc<RemoteCache>,
        ownership: Arc<Ownership>,
        stop: watch::Receiver<bool>,
    ) -> Follower {
        Follower {
            settle: Duration::from_millis(cfg.remote.settle_ms),
            cfg,
            cache,
            ownership,
            stop,
            consumer: None,
            positions: BTreeMap::new(),
            acted_on: 0,
            seen: None,
            skipped: 0,
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn run(mut self) {
        let mut reported = Instant::now();
        while !self.stopping() {
            if let Some(owned) = self.settled_change() {
                if let Err(e) = self.act_on(&owned) {
                    // Tried again once the ownership has held for `settle` anew.
                    warn!(error = %e, "remote follower: acting on the new ownership failed");
                    self.seen = None;
                }
            }
            match self.consumer.is_some() && !self.cache.followed().is_empty() {
                true => self.poll_batch(),
                false => std::thread::sleep(POLL),
            }
            if reported.elapsed() >= Duration::from_secs(1) {
                self.report();
                reported = Instant::now();
            }
        }
    }

    /// The ownership, once it changed from what the assignment reflects and then held for
    /// `settle`. Owning nothing is never acted on: it is the state before the first assignment,
    /// and between an eager rebalance's revocation and its assignment, which lasts as long as
    /// the assigned partitions' changelog read (tens of seconds at a million nodes), and reading
    /// every partition from its beginning meanwhile would slow that read down.
    fn settled_change(&mut self) -> Option<Owned> {
        let owned = self.ownership.get();
        if owned.partitions.is_empty() || owned.generation == self.acted_on {
            self.seen = None;
            return None;
        }
        match self.seen {
            Some((generation, since)) if generation == owned.generation => {
                (since.elapsed() >= self.settle).then_some(owned)
            }
            _ => {
                self.seen = Some((owned.generation, Instant::now()));
                None
            }
        }
    }

    fn embeddings(&self) -> &str {
        &self.cfg.kafka.embeddings_topic
    }

    fn versions(&self) -> &str {
        &self.cfg.kafka.versions_topic
    }

    /// Forget the partitions now owned, catch up those now owned elsewhere, follow them all.
    fn act_on(&mut self, owned: &Owned) -> Result<(), FollowerError> {
        // The embeddings topic has the engagements topic's partitions (a publisher refuses to
        // start otherwise), which the consumer read before its first assignment.
        let partitions = self.ownership.partition_count();
        if partitions == 0 {
            return Ok(());
        }
        self.cache.set_partitions(partitions);
        if self.consumer.is_none() {
            self.consumer = Some(self.reader()?);
        }
        let remote: BTreeSet<i32> = (0..partitions as i32)
            .filter(|q| !owned.partitions.contains(q))
            .collect();
        let followed = self.cache.followed();
        let gone: BTreeSet<i32> = followed.difference(&remote).copied().collect();
        self.cache.hand_over(&gone);
        let taken_over = self.to_take_over(owned, &followed, remote.is_empty());
        let new: BTreeSet<i32> = remote.difference(&followed).copied().collect();
        // One read of the published state for both: the partitions now owned elsewhere, and
        // those taken over, which are read only to be handed over.
        let read: BTreeSet<i32> = new.union(&taken_over).copied().collect();
        if !read.is_empty() {
            let started = Instant::now();
            self.cache.follow(&read);
            let caught_up = self.catch_up(&read);
            self.cache.hand_over(&taken_over);
            self.positions
                .retain(|(topic, q), _| *topic == Topic::Versions || !taken_over.contains(q));
            if let Err(e) = caught_up {
                self.cache.forget(&new);
                return Err(e);
            }
            info!(
                partitions = ?new,
                taken_over = ?taken_over,
                rows = self.cache.figures(now_ms()).rows,
                secs = started.elapsed().as_secs_f64(),
                "remote follower: caught up on partitions owned elsewhere"
            );
        }
        self.positions
            .retain(|(topic, q), _| *topic == Topic::Versions || !gone.contains(q));
        self.assign()?;
        self.acted_on = owned.generation;
        Ok(())
    }

    /// Partitions this instance owns after a change that it did not follow: read from the
    /// published state and handed over to the trainer as their last owner left them, as
    /// [`RemoteCache::hand_over`] hands over a followed one. Every one, not only those that moved
    /// here: a partition this instance owned before the change may have been another's
    /// meanwhile (an eager rebalance, a stall past the session), and the trainer starts only
    /// the rows it does not hold, so a partition it kept costs the read alone. None at a start
    /// that owns every partition: one instance alone knows every node its partitions' events
    /// name, and reading all its published rows back at every start would cost what a
    /// subscriber's catch-up costs.
    fn to_take_over(
        &self,
        owned: &Owned,
        followed: &BTreeSet<i32>,
        owns_all: bool,
    ) -> BTreeSet<i32> {
        if !self.cache.hands_over() || (self.acted_on == 0 && owns_all) {
            return BTreeSet::new();
        }
        (owned.partitions.iter().copied())
            .filter(|q| !followed.contains(q))
            .collect()
    }

    fn reader(&self) -> Result<BaseConsumer, ReadError> {
        reader(&self.cfg, &format!("{}.remote", self.cfg.kafka.group_id))
    }

    /// Read the versions topic and `new`'s partitions of the embeddings topic from their
    /// beginnings to their ends into the cache, then catch up.
    fn catch_up(&mut self, new: &BTreeSet<i32>) -> Result<(), FollowerError> {
        let consumer = self.reader()?;
        for topic in [Topic::Versions, Topic::Embeddings] {
            let name = match topic {
                Topic::Versions => self.versions().to_owned(),
                Topic::Embeddings => self.embeddings().to_owned(),
            };
            let start = |q: i32| match topic {
                Topic::Versions => Some(Offset::Beginning),
                Topic::Embeddings => new.contains(&q).then_some(Offset::Beginning),
            };
            let mut reads = Vec::with_capacity(BATCH);
            let mut reached: BTreeMap<i32, i64> = BTreeMap::new();
            let (cache, stop) = (&self.cache, &self.stop);
            let mut skipped = 0u64;
            read_partitions_to_end(
                &consumer,
                &name,
                start,
                READ_IDLE,
                CATCH_UP_TIMEOUT,
                |msg| {
                    if *stop.borrow() {
                        return Err("stopping".into());
                    }
                    reached.insert(msg.partition(), msg.offset() + 1);
                    match decoded(topic, msg) {
                        Some(read) => reads.push(read),
                        None => skipped += 1,
                    }
                    if reads.len() == BATCH {
                        cache.feed(std::mem::take(&mut reads), Some(new), now_ms());
                    }
                    Ok(())
                },
            )?;
            self.cache.feed(reads, Some(new), now_ms());
            self.skipped += skipped;
            for (q, next) in reached {
                // The live consumer goes on from where it was in the versions topic: the
                // markers between are read again, and stale to the partitions they reach.
                let position = self.positions.entry((topic, q)).or_insert(next);
                if topic == Topic::Embeddings {
                    *position = next;
                }
            }
        }
        self.cache.catch_up(new, now_ms());
        Ok(())
    }

    /// Assign the live consumer every partition of the versions topic and the followed ones of
    /// the embeddings topic, each at its next offset; nothing when none is followed (one
    /// instance owns every partition).
    fn assign(&mut self) -> Result<(), FollowerError> {
        let Some(consumer) = &self.consumer else {
            return Ok(());
        };
        let mut list = TopicPartitionList::new();
        if self.cache.followed().is_empty() {
            consumer.assign(&list)?;
            return Ok(());
        }
        let versions = partition_count(consumer, self.versions(), POLL * 100)?;
        let at = |topic, q| {
            (self.positions.get(&(topic, q))).map_or(Offset::Beginning, |&o| Offset::Offset(o))
        };
        for q in 0..versions {
            list.add_partition_offset(self.versions(), q, at(Topic::Versions, q))?;
        }
        for q in self.cache.followed() {
            list.add_partition_offset(self.embeddings(), q, at(Topic::Embeddings, q))?;
        }
        consumer.assign(&list)?;
        Ok(())
    }

    /// Read what is there (up to [`BATCH`] records) and hand it to the cache.
    fn poll_batch(&mut self) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        let mut reads = Vec::new();
        let mut wait = POLL;
        while reads.len() < BATCH {
            let Some(message) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let msg = match message {
                Ok(msg) => msg,
                Err(e) => {
                    warn!(error = %e, "remote follower: reading the published state");
                    break;
                }
            };
            let topic = match msg.topic() == self.cfg.kafka.versions_topic {
                true => Topic::Versions,
                false => Topic::Embeddings,
            };
            self.positions
                .insert((topic, msg.partition()), msg.offset() + 1);
            match decoded(topic, &msg) {
                Some(read) => reads.push(read),
                None => self.skipped += 1,
            }
        }
        if reads.is_empty() {
            return;
        }
        for delay in self.cache.feed(reads, None, now_ms()) {
            metrics::histogram!(m::REMOTE_APPLY_DELAY_SECONDS).record(delay as f64 / 1e3);
        }
        let dropped = self.cache.enforce_bound();
        if !dropped.is_empty() {
            warn!(
                partitions = ?dropped,
                max_rows = self.cfg.remote.max_rows,
                "remote follower: the cache is full (remote.max_rows); these partitions are no \
                 longer followed, and their nodes are answered from this instance's own model"
            );
            self.positions
                .retain(|(topic, q), _| *topic == Topic::Versions || !dropped.contains(q));
            if let Err(e) = self.assign() {
                warn!(error = %e, "remote follower: assigning the partitions left");
            }
        }
    }

    fn report(&self) {
        let figures = self.cache.figures(now_ms());
        metrics::gauge!(m::REMOTE_ROWS).set(figures.rows as f64);
        metrics::gauge!(m::REMOTE_LAG_SECONDS).set(figures.lag_ms as f64 / 1e3);
        metrics::gauge!(m::REMOTE_PARTITIONS, "state" => "followed")
            .set(figures.followed.len() as f64);
        metrics::gauge!(m::REMOTE_PARTITIONS, "state" => "uncached")
            .set(figures.uncached.len() as f64);
        metrics::gauge!(m::REMOTE_SKIPPED_RECORDS).set(self.skipped as f64);
    }
}

/// A record decoded, or `None` (logged) when it does not decode.
fn decoded(topic: Topic, msg: &BorrowedMessage<'_>) -> Option<TopicRead> {
    match TopicRecord::decode(topic == Topic::Versions, msg) {
        Ok(record) => Some(TopicRead {
            record,
            timestamp_ms: msg.timestamp().to_millis(),
        }),
        Err(e) => {
            warn!(
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                error = %e,
                "remote follower: skipping a record"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_ownership_is_acted_on_once_it_held_and_owning_nothing_never() {
        let cfg = Config::from_toml("[remote]\nsettle_ms = 20").unwrap();
        let ownership = Arc::new(Ownership::default());
        let (_stop, stopped) = watch::channel(false);
        let cache = Arc::new(RemoteCache::new(10));
        let mut f = Follower::new(Arc::new(cfg), cache, ownership.clone(), stopped);
        let held = || std::thread::sleep(Duration::from_millis(30));
        assert_eq!(f.settled_change(), None, "before the first assignment");
        ownership.assign(&[0, 1]);
        assert_eq!(f.settled_change(), None, "not held yet");
        held();
        let owned = f.settled_change().expect("held");
        assert_eq!(owned.partitions, [0, 1]);
        f.acted_on = owned.generation;
        assert_eq!(f.settled_change(), None, "acted on");
        // An eager rebalance: everything revoked, then a new set assigned.
        ownership.revoke(&[0, 1]);
        assert_eq!(f.settled_change(), None);
        held();
        assert_eq!(
            f.settled_change(),
            None,
            "owning nothing is a rebalance under way"
        );
        ownership.assign(&[1]);
        assert_eq!(f.settled_change(), None, "not held yet");
        held();
        assert_eq!(f.settled_change().map(|o| o.partitions), Some(vec![1]));
    }
}
