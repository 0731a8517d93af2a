//! Reading a topic to its end: every record from a start offset per partition up to the end
//! each partition had when reading started, and on past it until the topic is quiet (some
//! brokers report an end short of the last record). `export` reads the versions and embeddings
//! topics this way; the store's restore reads its changelog.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::config::Config;
use crate::kafka::{create_client, KafkaSetupError};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error("reading {topic}: {source}")]
    Read { topic: String, source: KafkaError },
    #[error("topic {0} has no partitions (does it exist? `twhin-stream topics apply` creates it)")]
    NoPartitions(String),
    #[error("{topic} partition {partition} offset {offset}: {what}")]
    Record {
        topic: String,
        partition: i32,
        offset: i64,
        what: String,
    },
}

/// How long a topic must stay quiet past the ends the broker reported before a read ends, for a
/// reader of topics that may be written meanwhile. A reader that knows nothing writes may pass
/// less: a batch past a reported end arrives in the same fetch as its first record.
pub const READ_IDLE: Duration = Duration::from_secs(1);

/// How long a read goes on past the ends the broker reported, quiet or not.
const READ_TAIL: Duration = Duration::from_secs(5);

/// The partitions of `topic` (an error when it has none).
pub fn partition_count<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<i32, ReadError> {
    let md = consumer
        .fetch_metadata(Some(topic), Timeout::After(timeout))
        .map_err(|source| ReadError::Read {
            topic: topic.to_string(),
            source,
        })?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    if partitions == 0 {
        return Err(ReadError::NoPartitions(topic.to_string()));
    }
    Ok(partitions)
}

/// A `read_committed` consumer that commits nothing, for reads from given offsets.
pub fn reader(cfg: &Config, group: &str) -> Result<BaseConsumer, ReadError> {
    let mut props = cfg.admin_properties();
    props.extend(
        [
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("isolation.level", "read_committed"),
            ("auto.offset.reset", "earliest"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(create_client(&props, "topic reader")?)
}

/// Every record of `topic`, partition `p` from `start(p)` to the end it had when reading started
/// and on until the topic is `quiet` for that long ([`READ_IDLE`]; at most [`READ_TAIL`] more),
/// handed to `f`; returns how many. `timeout` bounds the whole read. An error of `f` names the
/// record.
pub fn read_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    start: impl Fn(i32) -> Offset,
    quiet: Duration,
    timeout: Duration,
    f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), String>,
) -> Result<u64, ReadError> {
    read_partitions_to_end(consumer, topic, |p| Some(start(p)), quiet, timeout, f)
}

/// [`read_to_end`] of the partitions `start` gives an offset for (`None`: not read).
pub fn read_partitions_to_end(
    consumer: &BaseConsumer,
    topic: &str,
    start: impl Fn(i32) -> Option<Offset>,
    quiet: Duration,
    timeout: Duration,
    mut f: impl FnMut(&BorrowedMessage<'_>) -> Result<(), String>,
) -> Result<u64, ReadError> {
    let kafka = |source| ReadError::Read {
        topic: topic.to_string(),
        source,
    };
    let partitions = partition_count(consumer, topic, timeout)?;
    // The end of each partition now (the last stable offset under read_committed): what to read.
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let Some(from) = start(p) else {
            continue;
        };
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Timeout::After(timeout))
            .map_err(kafka)?;
        let from_offset = match from {
            Offset::Offset(o) => o,
            _ => 0,
        };
        if high > from_offset {
            remaining.insert(p, high);
        }
        // Every partition: one the broker reports empty may still hold a batch (below).
        assignment
            .add_partition_offset(topic, p, from)
            .map_err(kafka)?;
    }
    consumer.assign(&assignment).map_err(kafka)?;
    let deadline = Instant::now() + timeout;
    let mut read = 0u64;
    // Some brokers (tansu, the test broker) report an end up to one record batch short of the
    // last record: past the reported ends, read on until the topic is quiet, and at
    // most READ_TAIL (a producer writing meanwhile never leaves it quiet).
    let mut idle_since: Option<Instant> = None;
    let mut ends_reached: Option<Instant> = None;
    loop {
        if remaining.is_empty()
            && ends_reached.get_or_insert_with(Instant::now).elapsed() >= READ_TAIL
        {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(kafka(KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        let Some(message) = consumer.poll(left.min(Duration::from_millis(200))) else {
            // A transaction's control record is the last offset of a partition and is never
            // delivered: stop at the position instead.
            for (p, position) in positions(consumer, topic) {
                if remaining.get(&p).is_some_and(|&end| position >= end) {
                    remaining.remove(&p);
                }
            }
            if remaining.is_empty()
                && idle_since.get_or_insert_with(Instant::now).elapsed() >= quiet
            {
                break;
            }
            continue;
        };
        idle_since = None;
        let m = message.map_err(kafka)?;
        f(&m).map_err(|what| ReadError::Record {
            topic: topic.to_string(),
            partition: m.partition(),
            offset: m.offset(),
            what,
        })?;
        read += 1;
        let p = m.partition();
        if remaining.get(&p).is_some_and(|&end| m.offset() + 1 >= end) {
            remaining.remove(&p);
        }
    }
    Ok(read)
}

/// The consumer's next offset per assigned partition of `topic`.
fn positions(consumer: &BaseConsumer, topic: &str) -> Vec<(i32, i64)> {
    let Ok(list) = consumer.position() else {
        return Vec::new();
    };
    list.elements_for_topic(topic)
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}
