//! The published state read back: the newest whole version (or a given one) assembled from the
//! versions and embeddings topics as a subscriber assembles it ([`VersionAssembler`]). `export`
//! writes it to files; a trainer without a checkpoint starts from it
//! ([`crate::train::TrainerCore::start_from_published`]), so that it goes on in the coordinates
//! subscribers hold.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::Offset;

use crate::config::Config;
use crate::kafka::{read_to_end, reader, require_broker, KafkaSetupError, ReadError, READ_IDLE};
use crate::publish::subscriber::{
    relation_delta_partition, Applied, Entry, VersionAssembler, RELATION_PREFIX,
};
use crate::publish::{tombstone_attempt, Record, VersionMarker};

#[derive(Debug, thiserror::Error)]
pub enum ReadVersionError {
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(
        "version {wanted} cannot be assembled from {embeddings} and {versions}: the newest whole \
         version there is {newest} (0: none). A version older than what compaction kept is gone; \
         export a newer one, or omit --version for the newest"
    )]
    NotOnTopics {
        wanted: u64,
        newest: u64,
        embeddings: String,
        versions: String,
    },
}

/// One version's table as read: `(key, vector)` per group (a node type, or the relations), in id
/// order.
pub struct VersionTable {
    pub version: u64,
    pub marker: VersionMarker,
    pub types: BTreeMap<String, Vec<(String, Vec<f32>)>>,
    pub relations: Vec<(String, Vec<f32>)>,
    /// Per partition, its share of the relations (`relation-delta:<p>`), which
    /// [`crate::train::RelationShares`] sums.
    pub relation_deltas: BTreeMap<i32, Vec<f32>>,
}

impl VersionTable {
    /// Its rows, as a new model takes them ([`crate::train::TrainerCore::start_from_published`]).
    pub fn rows(&self) -> crate::train::PublishedRows<'_> {
        crate::train::PublishedRows {
            version: self.version,
            types: &self.types,
            relations: &self.relations,
            relation_deltas: &self.relation_deltas,
        }
    }

    /// Split an assembler's table into node types (`type:id`) and relations (`relation:name`).
    /// Its marker is the newest applied one, counting the records of that version in every
    /// partition that applied it (contract 3: a marker per partition).
    pub fn of(assembler: &VersionAssembler) -> Option<VersionTable> {
        let mut marker = assembler.applied_marker()?.clone();
        let same = |m: &&VersionMarker| m.attempt() == marker.attempt();
        let rows = assembler
            .applied_markers()
            .values()
            .filter(same)
            .map(|m| m.rows)
            .sum();
        marker.rows = rows;
        marker.partition = None;
        let mut types: BTreeMap<String, Vec<(String, Vec<f32>)>> = BTreeMap::new();
        let mut relations = Vec::new();
        let mut relation_deltas = BTreeMap::new();
        for (key, Entry { vector, .. }) in assembler.table() {
            if let Some(p) = relation_delta_partition(key) {
                relation_deltas.insert(p, vector.clone());
            } else if let Some(name) = key.strip_prefix(RELATION_PREFIX) {
                relations.push((name.to_string(), vector.clone()));
            } else if let Some((node_type, id)) = key.split_once(':') {
                types
                    .entry(node_type.to_string())
                    .or_default()
                    .push((id.to_string(), vector.clone()));
            }
        }
        for rows in types.values_mut() {
            rows.sort_unstable_by(|a, b| id_order(&a.0).cmp(&id_order(&b.0)));
        }
        relations.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Some(VersionTable {
            version: assembler.applied_version(),
            marker,
            types,
            relations,
            relation_deltas,
        })
    }
}

/// Numeric ids in numeric order (before any others), the others as text.
fn id_order(id: &str) -> (Result<u128, ()>, &str) {
    (id.parse::<u128>().map_err(|_| ()), id)
}

/// Read both topics from the beginning to their ends (`read_committed`), as a subscriber that
/// stops at `version`; then catch up past versions compaction left incomplete.
pub fn read_version(
    cfg: &Config,
    version: Option<u64>,
    timeout: Duration,
) -> Result<(VersionTable, u64), ReadVersionError> {
    require_broker(cfg)?;
    let mut assembler = version.map_or_else(VersionAssembler::new, VersionAssembler::up_to);
    let (embeddings, versions) = (&cfg.kafka.embeddings_topic, &cfg.kafka.versions_topic);
    let mut read = 0u64;
    for topic in [versions, embeddings] {
        let consumer = reader(cfg, "twhin-stream-published")?;
        read += read_to_end(
            &consumer,
            topic,
            |_| Offset::Beginning,
            READ_IDLE,
            timeout,
            |m| feed(&mut assembler, topic == versions, m),
        )?;
    }
    assembler.catch_up();
    let reached = VersionTable::of(&assembler).filter(|t| version.is_none_or(|v| t.version == v));
    match reached {
        Some(table) => Ok((table, read)),
        None => Err(ReadVersionError::NotOnTopics {
            wanted: version.unwrap_or(0),
            newest: assembler.applied_version(),
            embeddings: embeddings.clone(),
            versions: versions.clone(),
        }),
    }
}

/// One record of the versions topic (a marker) or the embeddings topic (a row or tombstone).
fn feed(
    assembler: &mut VersionAssembler,
    is_marker: bool,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<(), String> {
    TopicRecord::decode(is_marker, m)?.push(assembler);
    Ok(())
}

/// One record of the published topics, decoded: what a subscriber hands its assembler.
#[derive(Debug)]
pub enum TopicRecord {
    Marker(VersionMarker),
    Row {
        partition: i32,
        key: String,
        record: Record,
    },
    Tombstone {
        partition: i32,
        key: String,
        version: u64,
        epoch: u64,
    },
}

impl TopicRecord {
    /// A record read from the versions topic (`is_marker`) or the embeddings topic; the error
    /// says what is wrong with it.
    pub fn decode(
        is_marker: bool,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<TopicRecord, String> {
        if is_marker {
            let payload = m.payload().ok_or("a marker without a value")?;
            let marker = VersionMarker::decode(payload).map_err(|e| e.to_string())?;
            return Ok(TopicRecord::Marker(marker));
        }
        let key = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or("a row without a UTF-8 key")?
            .to_owned();
        let partition = m.partition();
        match m.payload() {
            Some(payload) => {
                let record = Record::decode(payload).map_err(|e| e.to_string())?;
                Ok(TopicRecord::Row {
                    partition,
                    key,
                    record,
                })
            }
            None => {
                let headers = m.headers().map(|h| {
                    h.iter()
                        .map(|x| (x.key, x.value.unwrap_or_default()))
                        .collect::<Vec<_>>()
                });
                let (version, epoch) = headers
                    .and_then(tombstone_attempt)
                    .ok_or("a null value without its version headers")?;
                Ok(TopicRecord::Tombstone {
                    partition,
                    key,
                    version,
                    epoch,
                })
            }
        }
    }

    /// Hand it to `assembler`; returns the versions it completed.
    pub fn push(self, assembler: &mut VersionAssembler) -> Vec<Applied> {
        match self {
            TopicRecord::Marker(marker) => assembler.push_marker(marker),
            TopicRecord::Row {
                partition,
                key,
                record,
            } => assembler.push_record(partition, key, record),
            TopicRecord::Tombstone {
                partition,
                key,
                version,
                epoch,
            } => assembler.push_tombstone(partition, key, version, epoch),
        }
    }
}
