//! The store rebuilt from the changelog: at the start of an empty store every changelog
//! partition, and at each assignment the partitions assigned (another instance may have owned
//! them meanwhile), is read
//! from the position the store recorded (the beginning for an empty store) to its end, and its
//! records are appended as ingest appended them, their events at their input offsets. The store
//! skips offsets it holds, so a record read twice, one written for a batch whose store write was
//! lost, or one written late by a partition's previous owner, changes nothing or adds exactly
//! what is missing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::Offset;
use serde::Serialize;
use tracing::info;

use crate::changelog::ChangelogRecord;
use crate::config::Config;
use crate::kafka::{partition_count, read_partitions_to_end, reader, ReadError};
use crate::store::{AppendBatch, GraphStore, StoreError, Upstream};

/// A restore may read a long changelog; this bounds it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(3_600);

/// Nothing writes the partitions restored (at start ingest has not begun; at an assignment the
/// previous owner gave them up first), so a short quiet past the broker's reported ends finds
/// every record.
const RESTORE_QUIET: Duration = Duration::from_millis(250);

/// Events restored in one store append at most (one sled flush each; two such batches are held
/// at once). 250k took longer at 10M events (18.9 s against 15.4 s).
const RESTORE_BATCH_EVENTS: usize = 50_000;

/// What a restore read and appended (`/v1/status` `ingest.restored`, and summed over the
/// assignments in `ingest.moved_in`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Restored {
    /// Changelog records read past the store's recorded position.
    pub records: u64,
    /// Events they carried.
    pub events: u64,
    /// Events the store did not hold yet, now appended.
    pub appended: u64,
    pub seconds: f64,
    /// Of `seconds`: decoding records into events, and appending them to the store (the rest
    /// is reading from the broker).
    pub decode_seconds: f64,
    pub append_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("restoring from {topic}: {source}")]
    Store {
        topic: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "{changelog} partition {partition} offset {offset} begins after history the changelog \
         never held: the store was from before the changelog and held {topic} partition \
         {input_partition} up to offset {next_offset} then. The changelog cannot rebuild this \
         store; keep the store, or consume the input again from its start (delete the changelog \
         topic and the store)"
    )]
    HistoryMissing {
        changelog: String,
        partition: i32,
        offset: i64,
        topic: String,
        input_partition: i32,
        next_offset: i64,
    },
    #[error(
        "{changelog} (kafka.changelog_topic) has {changelog_partitions} partitions and \
         {engagements} (kafka.engagements_topic) {engagements_partitions}: input partition p \
         is logged to changelog partition p, so the changelog needs at least as many \
         (recreate it with topics/changelog.toml's count)"
    )]
    TooFewPartitions {
        changelog: String,
        changelog_partitions: i32,
        engagements: String,
        engagements_partitions: i32,
    },
}

impl Restored {
    /// `other`'s figures added to these (restores one after the other).
    pub fn add(&mut self, other: &Restored) {
        self.records += other.records;
        self.events += other.events;
        self.appended += other.appended;
        self.seconds += other.seconds;
        self.decode_seconds += other.decode_seconds;
        self.append_seconds += other.append_seconds;
    }
}

/// Bring `store` up to the end of `kafka.changelog_topic`, every partition (see the module docs).
pub fn restore(cfg: &Config, store: &GraphStore) -> Result<Restored, RestoreError> {
    restore_partitions(cfg, store, None)
}

/// Bring `store` up to the end of the changelog's partitions `only` (all when `None`): those of
/// the input partitions by the same numbers, engagements and routed.
pub fn restore_partitions(
    cfg: &Config,
    store: &GraphStore,
    only: Option<&[i32]>,
) -> Result<Restored, RestoreError> {
    let started = Instant::now();
    let topic = &cfg.kafka.changelog_topic;
    let consumer = reader(cfg, &format!("{}.changelog-restore", cfg.kafka.group_id))?;
    let timeout = Duration::from_secs(10);
    let changelog_partitions = partition_count(&consumer, topic, timeout)?;
    let engagements_partitions = partition_count(&consumer, &cfg.kafka.engagements_topic, timeout)?;
    if changelog_partitions < engagements_partitions {
        return Err(RestoreError::TooFewPartitions {
            changelog: topic.clone(),
            changelog_partitions,
            engagements: cfg.kafka.engagements_topic.clone(),
            engagements_partitions,
        });
    }
    let store_err = |source| RestoreError::Store {
        topic: topic.clone(),
        source,
    };
    let mut positions = HashMap::new();
    for p in 0..changelog_partitions {
        if let Some(next) = store.stored_offset(topic, p).map_err(store_err)? {
            positions.insert(p, next);
        }
    }
    let schema = cfg.schema();
    let start = |p| {
        let wanted = only.is_none_or(|only| only.contains(&p));
        wanted.then(|| {
            positions
                .get(&p)
                .map_or(Offset::Beginning, |&o| Offset::Offset(o))
        })
    };
    let mut out = Restored::default();
    // Reading and decoding on this thread, appending on another: the two take about as long.
    let (read, appended) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<AppendBatch>(2);
        let appender = scope.spawn(move || -> Result<(u64, f64), StoreError> {
            let (mut appended, mut seconds) = (0, 0.0);
            // One flush at the end: a crash before it leaves the store at an earlier changelog
            // position, from which the next start reads on.
            for batch in rx {
                let started = Instant::now();
                appended += store.append_unflushed(&batch)?.appended;
                seconds += started.elapsed().as_secs_f64();
            }
            let started = Instant::now();
            store.flush()?;
            seconds += started.elapsed().as_secs_f64();
            Ok((appended, seconds))
        });
        let mut missing = None;
        let mut batch = AppendBatch::default();
        let hand_on = |batch: &mut AppendBatch| -> Result<(), String> {
            if batch.extra_offsets.is_empty() {
                return Ok(());
            }
            tx.send(std::mem::take(batch))
                .map_err(|_| "the store append stopped".to_owned())
        };
        let read = read_partitions_to_end(
            &consumer,
            topic,
            start,
            RESTORE_QUIET,
            RESTORE_TIMEOUT,
            |m| {
                let decoding = Instant::now();
                let bytes = m.payload().ok_or("a record without a value")?;
                let mut record = ChangelogRecord::decode(bytes).map_err(|e| e.to_string())?;
                let history_missing = record.starts_after_history
                    && (store.stored_offset(&record.topic, record.partition))
                        .map_err(|e| e.to_string())?
                        .is_none();
                if history_missing {
                    missing = Some(RestoreError::HistoryMissing {
                        changelog: topic.clone(),
                        partition: m.partition(),
                        offset: m.offset(),
                        topic: record.topic.clone(),
                        input_partition: record.partition,
                        next_offset: record.next_offset,
                    });
                    return Err("history missing".into());
                }
                let events = record.take_events(&schema).map_err(|e| e.to_string())?;
                out.decode_seconds += decoding.elapsed().as_secs_f64();
                if batch.topic != record.topic || batch.events.len() >= RESTORE_BATCH_EVENTS {
                    hand_on(&mut batch)?;
                }
                out.records += 1;
                out.events += events.len() as u64;
                batch.topic = record.topic.clone();
                batch.events.extend(events);
                let p = record.partition;
                batch.next_offsets.push((p, record.next_offset));
                batch
                    .last_records
                    .extend(record.last_print().map(|r| (p, r)));
                batch
                    .upstream
                    .extend(record.upstream.iter().map(|&(source, next)| Upstream {
                        partition: p,
                        source,
                        next,
                    }));
                let position = (topic.clone(), m.partition(), m.offset() + 1);
                batch.extra_offsets.push(position);
                Ok(())
            },
        )
        .map_err(|e| missing.take().unwrap_or(e.into()));
        // Fails only when the append stopped, whose own error is returned below.
        hand_on(&mut batch).ok();
        drop(tx);
        let appended = appender.join().expect("the store append does not panic");
        (read, appended)
    });
    // The store's own error first: a read that stopped because the append did says less.
    let (appended, append_seconds) = appended.map_err(store_err)?;
    read?;
    out.appended = appended;
    out.append_seconds = append_seconds;
    out.seconds = started.elapsed().as_secs_f64();
    info!(
        topic,
        partitions = ?only,
        records = out.records,
        events = out.events,
        appended = out.appended,
        seconds = out.seconds,
        decode_seconds = out.decode_seconds,
        append_seconds = out.append_seconds,
        "store restored from its changelog"
    );
    Ok(out)
}
