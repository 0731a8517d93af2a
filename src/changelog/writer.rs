//! Writing the changelog: one record per input partition an ingest batch covers, delivered to
//! the changelog partition of the same number and acknowledged before the batch is written to
//! the store, so the changelog is never behind the store.

use std::collections::BTreeMap;

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::changelog::ChangelogRecord;
use crate::kafka::send_retrying;
use crate::schema::Schema;
use crate::store::{AppendBatch, SourcedEvent};

/// One record per input partition of `batch`: its valid events there, in order, and where the
/// partition stands after it. `after_history(p)`: the store holds input partition `p`'s earlier
/// events but never logged them (a store from before the changelog).
pub(crate) fn records_of(
    schema: &Schema,
    batch: &AppendBatch,
    after_history: impl Fn(i32) -> bool,
) -> Vec<ChangelogRecord> {
    let mut partitions: BTreeMap<i32, (i64, Vec<&SourcedEvent>)> = BTreeMap::new();
    for &(p, next) in &batch.next_offsets {
        let entry = partitions.entry(p).or_default();
        entry.0 = entry.0.max(next);
    }
    for e in &batch.events {
        let entry = partitions.entry(e.partition).or_default();
        entry.0 = entry.0.max(e.offset + 1);
        entry.1.push(e);
    }
    partitions
        .into_iter()
        .map(|(p, (next, events))| {
            let last = (batch.last_records.iter())
                .find(|(q, r)| *q == p && r.offset + 1 == next)
                .map(|(_, r)| *r);
            let mut record = ChangelogRecord::of(schema, &batch.topic, p, next, last, &events);
            record.starts_after_history = after_history(p);
            record.upstream = (batch.upstream.iter())
                .filter(|u| u.partition == p)
                .map(|u| (u.source, u.next))
                .collect();
            record
        })
        .collect()
}

/// The key of a record: its input topic and partition and the offset it reaches. A batch
/// consumed again after a crash that lost its store write (not its record) ends at the same
/// offset or not; the restore skips offsets the store holds either way.
fn key(record: &ChangelogRecord) -> String {
    let (topic, p, next) = (&record.topic, record.partition, record.next_offset);
    format!("{topic}:{p}:{next}")
}

/// Hand `records` to the producer for `topic` (`kafka.changelog_topic`), each to the partition
/// of its input partition, waiting only while the producer's queue is full: their
/// acknowledgements, pending. Records of one partition are acknowledged in the order they were
/// handed over (one idempotent producer).
pub(crate) async fn send(
    producer: &FutureProducer,
    topic: &str,
    records: &[ChangelogRecord],
) -> Result<Vec<DeliveryFuture>, KafkaError> {
    let mut deliveries = Vec::with_capacity(records.len());
    for r in records {
        let (key, value) = (key(r), r.encode());
        let record = FutureRecord::to(topic)
            .partition(r.partition)
            .key(key.as_str())
            .payload(value.as_slice());
        deliveries.push(send_retrying(producer, record).await?);
    }
    Ok(deliveries)
}

/// Wait for the acknowledgements [`send`] returned. Returns, per changelog partition written,
/// the offset after its last record (what the store keeps as its restore position).
pub(crate) async fn acknowledged(
    deliveries: Vec<DeliveryFuture>,
) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
    let mut positions: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for r in join_all(deliveries).await {
        let delivered = r.map_err(|_| KafkaError::Canceled)?.map_err(|(e, _)| e)?;
        let (first, end) = positions
            .entry(delivered.partition)
            .or_insert((delivered.offset, 0));
        *first = (*first).min(delivered.offset);
        *end = (*end).max(delivered.offset + 1);
    }
    Ok((positions.into_iter())
        .map(|(p, (first, end))| (p, first, end))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::testing::follow;
    use crate::store::{RecordPrint, Upstream};

    #[test]
    fn a_batch_gives_one_record_per_input_partition_with_its_position() {
        let schema = Config::from_toml("").unwrap().schema();
        let sourced = |partition, offset| SourcedEvent {
            partition,
            offset,
            event: follow(1, 2, 5),
        };
        let batch = AppendBatch {
            topic: "t".into(),
            events: vec![sourced(2, 10), sourced(0, 4), sourced(2, 12)],
            // Partition 2 read past an invalid event at 13; partition 5 had only invalid ones.
            next_offsets: vec![(2, 14), (0, 5), (5, 30)],
            last_records: vec![(
                2,
                RecordPrint {
                    offset: 13,
                    ts: 1,
                    crc: 9,
                },
            )],
            extra_offsets: vec![],
            logged: Vec::new(),
            upstream: vec![Upstream {
                partition: 2,
                source: 6,
                next: 71,
            }],
        };
        let records = records_of(&schema, &batch, |p| p == 5);
        let summary: Vec<(i32, i64, Vec<i64>, bool)> = records
            .iter()
            .map(|r| {
                let offsets = r.events.iter().map(|e| e.offset).collect();
                (r.partition, r.next_offset, offsets, r.last_record.is_some())
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, 5, vec![4], false),
                (2, 14, vec![10, 12], true),
                (5, 30, vec![], false)
            ]
        );
        let after: Vec<bool> = records.iter().map(|r| r.starts_after_history).collect();
        assert_eq!(after, [false, false, true]);
        assert_eq!(key(&records[1]), "t:2:14");
        let upstream: Vec<&[(i32, i64)]> = records.iter().map(|r| &r.upstream[..]).collect();
        assert_eq!(upstream, [&[][..], &[(6, 71)][..], &[][..]]);
    }
}
