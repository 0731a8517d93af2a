//! The versions topic's newest markers, read by the publisher at start (Kafka I/O): they are
//! what subscribers hold, so the ledger's numbering is reconciled with them
//! ([`Ledger::reconcile`]) before the first version.

use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::topic_partition_list::Offset;

use crate::config::Config;
use crate::kafka::{partition_count, read_to_end, reader, ReadError};
use crate::publish::ledger::{
    ForeignVersions, Ledger, LedgerError, ReconcileError, TopicDisagreement, VersionsTail,
};
use crate::publish::VersionMarker;

/// Markers read from the end of each partition of the versions topic: the newest attempt is
/// among the last few (a version has at most a handful of attempts), and a start must not
/// read the whole history.
const TAIL_MARKERS: i64 = 64;

/// How long the topic must stay quiet past its reported end before the read ends: nothing of
/// this deployment writes to it yet.
const TAIL_QUIET: Duration = Duration::from_millis(250);

/// Why the publisher could not start on the versions topic.
#[derive(Debug, thiserror::Error)]
pub enum VersionsTopicError {
    #[error("reading the newest markers of the versions topic (kafka.versions_topic)")]
    Read(#[source] Box<ReadError>),
    #[error("the versions topic kafka.versions_topic = {topic} belongs to another deployment")]
    Foreign {
        topic: String,
        #[source]
        source: ForeignVersions,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(
        "{embeddings} (kafka.embeddings_topic) has {embeddings_partitions} partitions and \
         {engagements} (kafka.engagements_topic) has {engagements_partitions}: a node's rows go \
         to the partition that owns it, so both need the same count (recreate the embeddings \
         topic with `twhin-stream topics apply` after deleting it)"
    )]
    Partitions {
        embeddings: String,
        embeddings_partitions: i32,
        engagements: String,
        engagements_partitions: i32,
    },
}

/// The newest markers of `kafka.versions_topic` ([`read_versions_tail`]), once the embeddings
/// topic is known to have as many partitions as the engagements topic (contract 3: a key's
/// records go to the partition that owns its node). One reader does both: the daemon's start
/// waits for it.
pub fn read_versions_tail_checked(cfg: &Config) -> Result<VersionsTail, VersionsTopicError> {
    let read_err = |e| VersionsTopicError::Read(Box::new(e));
    let consumer =
        reader(cfg, &format!("{}.versions-tail", cfg.kafka.group_id)).map_err(read_err)?;
    check_embeddings_partitions(cfg, &consumer)?;
    tail_of(cfg, &consumer, &[])
}

fn check_embeddings_partitions(
    cfg: &Config,
    consumer: &BaseConsumer,
) -> Result<(), VersionsTopicError> {
    let read_err = |e| VersionsTopicError::Read(Box::new(e));
    let timeout = Duration::from_millis(cfg.publish.delivery_timeout_ms.max(10_000));
    let k = &cfg.kafka;
    let count = |t: &str| partition_count(consumer, t, timeout).map_err(read_err);
    let (embeddings_partitions, engagements_partitions) =
        (count(&k.embeddings_topic)?, count(&k.engagements_topic)?);
    if embeddings_partitions != engagements_partitions {
        return Err(VersionsTopicError::Partitions {
            embeddings: k.embeddings_topic.clone(),
            embeddings_partitions,
            engagements: k.engagements_topic.clone(),
            engagements_partitions,
        });
    }
    Ok(())
}

/// The newest markers of `kafka.versions_topic`.
pub fn read_versions_tail(cfg: &Config) -> Result<VersionsTail, VersionsTopicError> {
    read_versions_tail_of(cfg, &[])
}

/// The newest markers of `kafka.versions_topic`, reaching back far enough to hold the newest
/// marker of each of `partitions` (contract 3) that the topic has: a partition's newest marker
/// lies further back than the last few when its previous owner stopped a while ago and others
/// published since. The window grows eightfold until it holds them all or the whole topic.
pub fn read_versions_tail_of(
    cfg: &Config,
    partitions: &[i32],
) -> Result<VersionsTail, VersionsTopicError> {
    let read_err = |e| VersionsTopicError::Read(Box::new(e));
    let consumer =
        reader(cfg, &format!("{}.versions-tail", cfg.kafka.group_id)).map_err(read_err)?;
    tail_of(cfg, &consumer, partitions)
}

fn tail_of(
    cfg: &Config,
    consumer: &BaseConsumer,
    partitions: &[i32],
) -> Result<VersionsTail, VersionsTopicError> {
    let topic = &cfg.kafka.versions_topic;
    let read_err = |e| VersionsTopicError::Read(Box::new(e));
    let timeout = Duration::from_millis(cfg.publish.delivery_timeout_ms.max(10_000));
    let mut window = TAIL_MARKERS;
    loop {
        let mut tail = VersionsTail::default();
        read_to_end(
            consumer,
            topic,
            |_| Offset::OffsetTail(window),
            TAIL_QUIET,
            timeout,
            |msg| {
                let payload = rdkafka::Message::payload(msg).unwrap_or_default();
                let marker = VersionMarker::decode(payload).map_err(|e| e.to_string())?;
                tail.observe(&marker);
                Ok(())
            },
        )
        .map_err(read_err)?;
        if (partitions.iter()).all(|p| tail.by_partition.contains_key(p)) {
            return Ok(tail);
        }
        let (low, high) = rdkafka::consumer::Consumer::fetch_watermarks(
            consumer, topic, 0, timeout,
        )
        .map_err(|source| {
            read_err(ReadError::Read {
                topic: topic.clone(),
                source,
            })
        })?;
        if window >= high - low {
            return Ok(tail);
        }
        window *= 8;
    }
}

/// Read the versions topic's newest markers and reconcile `ledger` with them (see
/// [`Ledger::reconcile`]); a topic another deployment publishes into is refused.
pub fn reconcile_with_versions_topic(
    cfg: &Config,
    ledger: &mut Ledger,
) -> Result<Option<TopicDisagreement>, VersionsTopicError> {
    let tail = read_versions_tail(cfg)?;
    reconcile_with_tail(cfg, ledger, &tail)
}

/// [`reconcile_with_versions_topic`] with the newest markers already read
/// ([`read_versions_tail`]; the daemon reads them while its store and trainer open).
pub fn reconcile_with_tail(
    cfg: &Config,
    ledger: &mut Ledger,
    tail: &VersionsTail,
) -> Result<Option<TopicDisagreement>, VersionsTopicError> {
    ledger
        .reconcile(tail, &cfg.kafka.group_id)
        .map_err(|e| match e {
            ReconcileError::Foreign(source) => VersionsTopicError::Foreign {
                topic: cfg.kafka.versions_topic.clone(),
                source,
            },
            ReconcileError::Ledger(e) => VersionsTopicError::Ledger(e),
        })
}
