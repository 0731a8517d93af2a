//! The gradients follower thread: reads the partitions of the gradients topic this instance
//! owns, assembles whole window parts, and queues them for the trainer. It follows the group's
//! ownership (a partition newly owned is read from its end: what was sent before the move was
//! the previous owner's to apply) and the trainer's rewinds (a checkpoint gone back to).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::exchange::{GradientChunk, GradientInbox, WindowAssembler};
use crate::kafka::{create_client, partition_count, reader, ReadError};
use crate::partition::Ownership;

/// How long one poll waits for a record.
const POLL: Duration = Duration::from_millis(100);
/// How long a metadata request waits.
const METADATA: Duration = Duration::from_secs(10);
/// Records read per turn at most, before the ownership and rewinds are looked at again.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("reading the gradients topic (kafka.gradients_topic): {0}")]
    Read(#[from] ReadError),
    #[error("reading the gradients topic (kafka.gradients_topic): {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the gradients topic's admin client (kafka.gradients_topic): {0}")]
    Admin(String),
    #[error("starting the gradients follower thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error(
        "{gradients} has {got} partitions and {topic} has {partitions}: the gradients topic \
         (kafka.gradients_topic) needs exactly as many, so that partition q of each has one owner \
         (recreate it with `twhin-stream topics apply` after deleting it)"
    )]
    Partitions {
        gradients: String,
        got: i32,
        topic: String,
        partitions: i32,
    },
}

/// Start the gradients follower; it ends once `stop` turns true.
pub fn start_gradients_follower(
    cfg: Arc<Config>,
    inbox: Arc<GradientInbox>,
    ownership: Arc<Ownership>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ExchangeError> {
    let consumer = reader(&cfg, &format!("{}.gradients", cfg.kafka.group_id))?;
    let (topic, gradients) = (&cfg.kafka.engagements_topic, &cfg.kafka.gradients_topic);
    let partitions = partition_count(&consumer, topic, METADATA)?;
    let got = partition_count(&consumer, gradients, METADATA)?;
    if got != partitions {
        return Err(ExchangeError::Partitions {
            gradients: gradients.clone(),
            got,
            topic: topic.clone(),
            partitions,
        });
    }
    let admin = create_client(&cfg.admin_properties(), "gradients admin client")
        .map_err(|e| ExchangeError::Admin(e.to_string()))?;
    let mut follower = GradientsFollower {
        admin,
        topic: cfg.kafka.gradients_topic.clone(),
        consumer,
        inbox,
        ownership,
        stop,
        assembler: WindowAssembler::default(),
        positions: BTreeMap::new(),
        assigned: Vec::new(),
        deleted_to: BTreeMap::new(),
        generation: None,
    };
    Ok(std::thread::Builder::new()
        .name("gradients-follower".into())
        .spawn(move || follower.run())?)
}

struct GradientsFollower {
    admin: AdminClient<DefaultClientContext>,
    topic: String,
    consumer: BaseConsumer,
    inbox: Arc<GradientInbox>,
    ownership: Arc<Ownership>,
    stop: watch::Receiver<bool>,
    assembler: WindowAssembler,
    /// Per partition, the offset to read from next (known once read, or rewound to).
    positions: BTreeMap<i32, i64>,
    assigned: Vec<i32>,
    /// Per partition, the low watermark the last deletion left.
    deleted_to: BTreeMap<i32, i64>,
    /// The ownership generation the assignment reflects.
    generation: Option<u64>,
}

impl GradientsFollower {
    fn run(&mut self) {
        while !*self.stop.borrow() {
            if let Err(e) = self.follow_changes() {
                warn!(error = %e, "gradients follower: assigning partitions");
                self.generation = None;
                std::thread::sleep(POLL);
                continue;
            }
            if let Some(below) = self.inbox.take_checkpointed() {
                self.delete_below(&below);
            }
            if self.assigned.is_empty() {
                std::thread::sleep(POLL);
                continue;
            }
            self.poll_batch();
        }
    }

    /// Assign the owned partitions again when the ownership changed or the trainer rewound.
    fn follow_changes(&mut self) -> Result<(), ExchangeError> {
        let rewind = self.inbox.take_rewind();
        let owned = self.ownership.get();
        if rewind.is_none() && self.generation == Some(owned.generation) {
            return Ok(());
        }
        if let Some(at) = rewind {
            for (&q, &offset) in &at {
                self.positions.insert(q, offset);
                self.assembler.forget(q);
            }
        }
        for &q in &self.assigned {
            if !owned.partitions.contains(&q) {
                self.positions.remove(&q);
                self.assembler.forget(q);
            }
        }
        let mut list = TopicPartitionList::new();
        for &q in &owned.partitions {
            let at = self
                .positions
                .get(&q)
                .map_or(Offset::End, |&o| Offset::Offset(o));
            list.add_partition_offset(&self.topic, q, at)?;
        }
        self.consumer.assign(&list)?;
        if self.assigned != owned.partitions {
            info!(partitions = ?owned.partitions, "gradients follower: reading the owned partitions");
        }
        self.assigned = owned.partitions;
        self.generation = Some(owned.generation);
        Ok(())
    }

    /// Delete the records of the owned partitions below `below` (a checkpoint's positions: the
    /// trainer never reads them again), so the topic does not grow with the run whatever its
    /// retention. A failure is logged; the next checkpoint tries again.
    fn delete_below(&mut self, below: &BTreeMap<i32, i64>) {
        let mut list = TopicPartitionList::new();
        let mut gone = 0;
        for (&q, &offset) in below {
            let from = self.deleted_to.get(&q).copied().unwrap_or(0);
            if self.assigned.contains(&q) && offset > from {
                gone += offset - from;
                if let Err(e) = list.add_partition_offset(&self.topic, q, Offset::Offset(offset)) {
                    warn!(error = %e, partition = q, "gradients follower: deleting records");
                }
            }
        }
        if list.count() == 0 {
            return;
        }
        let opts = AdminOptions::new().operation_timeout(Some(METADATA));
        match futures::executor::block_on(self.admin.delete_records(&list, &opts)) {
            Ok(done) => {
                for e in done.elements() {
                    if let Err(err) = e.error() {
                        warn!(topic = %self.topic, partition = e.partition(), error = %err,
                            "gradients follower: deleting consumed records");
                    }
                }
                for e in done.elements() {
                    if let (Ok(()), Offset::Offset(low)) = (e.error(), e.offset()) {
                        self.deleted_to.insert(e.partition(), low);
                    }
                }
                self.inbox.count_deleted(gone as u64);
            }
            Err(e) => {
                warn!(topic = %self.topic, error = %e, "gradients follower: deleting consumed records")
            }
        }
    }

    fn poll_batch(&mut self) {
        let mut wait = POLL;
        for _ in 0..BATCH {
            let Some(message) = self.consumer.poll(wait) else {
                return;
            };
            wait = Duration::ZERO;
            let msg = match message {
                Ok(msg) => msg,
                Err(e) => {
                    warn!(error = %e, "gradients follower: reading the gradients topic");
                    return;
                }
            };
            let (q, offset) = (msg.partition(), msg.offset());
            self.positions.insert(q, offset + 1);
            match GradientChunk::decode(msg.payload().unwrap_or_default()) {
                Ok(chunk) if chunk.partition == q => {
                    if let Some(part) = self.assembler.feed(chunk, offset) {
                        self.inbox.push_part(part);
                    }
                }
                Ok(chunk) => {
                    warn!(topic = %self.topic, partition = q, offset, placed = chunk.partition,
                        "gradients follower: skipping a chunk produced to another partition than its rows'");
                    self.inbox.count_skipped();
                }
                Err(e) => {
                    warn!(topic = %self.topic, partition = q, offset, error = %e,
                        "gradients follower: skipping a record");
                    self.inbox.count_skipped();
                }
            }
        }
    }
}
