//! The consumer's context: every assignment brought up to the changelog (another instance may
//! have owned the partitions meanwhile) and started at the offsets stored in sled (never
//! Kafka's), a flush before partitions are given up, and lag and broker health from
//! librdkafka's statistics.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::changelog::{restore_partitions, RestoreError};
use crate::config::Config;
use crate::ingest::{IngestError, IngestStatus};
use crate::store::{GraphStore, RecordPrint};
use crate::telemetry as m;

/// The consumer's context: assigns partitions at the offsets stored in sled.
pub struct IngestContext {
    pub(super) cfg: Arc<Config>,
    pub(super) store: Arc<GraphStore>,
    pub(super) status: Arc<IngestStatus>,
    /// Set when an assignment could not be honoured; the loop stops with this error.
    pub(super) failure: Mutex<Option<IngestError>>,
    /// Per assigned partition: the record the store consumed last, which must be the first one
    /// the partition delivers (it is assigned one offset before the stored one).
    pub(super) expected: Mutex<HashMap<i32, (RecordPrint, Instant)>>,
    /// Partitions brought up to their changelog at an assignment, whose positions the consume
    /// loop must read from the store again.
    pub(super) moved_in: Mutex<Vec<i32>>,
    /// The store was brought up to every changelog partition's end at this start (it was
    /// empty): the first assignment, moments later, reads nothing the input does not still hold.
    pub(super) caught_up_at_start: AtomicBool,
}

/// How the first record of a partition after its assignment compares with the one the store
/// consumed last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum History {
    /// The same record: the partition holds what was consumed.
    Same,
    /// Another offset came first: the stored one is outside the partition now (recreated
    /// smaller, or deleted by retention).
    OutOfRange,
    /// The offset is there but holds another record: the topic was recreated and grew past it.
    Changed,
}

impl History {
    pub(super) fn of(expected: &RecordPrint, first: &RecordPrint) -> History {
        if first.offset != expected.offset {
            History::OutOfRange
        } else if first != expected {
            History::Changed
        } else {
            History::Same
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            History::Same => "same",
            History::OutOfRange => "out_of_range",
            History::Changed => "history_changed",
        }
    }
}

impl IngestContext {
    /// The record partition `p`'s first delivery must match, once (`None` when not waiting).
    pub(super) fn take_expected(&self, p: i32) -> Option<RecordPrint> {
        let mut expected = self.expected.lock();
        if expected.is_empty() {
            return None;
        }
        expected.remove(&p).map(|(print, _)| print)
    }

    /// Partitions still waiting, `wait` after their assignment, for the record they must
    /// deliver first. Some brokers answer a fetch past a partition's end with nothing rather
    /// than an out-of-range error, so the consumer would wait for it forever.
    pub(super) fn overdue(&self, wait: Duration) -> Vec<(i32, RecordPrint)> {
        let expected = self.expected.lock();
        expected
            .iter()
            .filter(|(_, (_, since))| since.elapsed() >= wait)
            .map(|(&p, (print, _))| (p, *print))
            .collect()
    }

    fn fail(&self, error: IngestError) {
        *self.failure.lock() = Some(error);
    }

    /// Where partition `p` starts: one before the stored offset when the store knows the record
    /// there (to check it), at the stored offset for a store from before records were kept, or
    /// at the beginning when nothing was consumed.
    fn start_of(&self, topic: &str, p: i32) -> Result<Offset, crate::store::StoreError> {
        let Some(next) = self.store.stored_offset(topic, p)? else {
            return Ok(Offset::Beginning);
        };
        if topic != self.topic() {
            // The routed topic: ours, created with the deployment, so its history is not checked.
            return Ok(Offset::Offset(next));
        }
        match self.store.last_record(topic, p)? {
            Some(print) if print.offset + 1 == next => {
                self.expected.lock().insert(p, (print, Instant::now()));
                Ok(Offset::Offset(print.offset))
            }
            _ => Ok(Offset::Offset(next)),
        }
    }

    /// Bring the engagements partitions assigned (and the routed ones by the same numbers) up
    /// to their changelog: another instance may have owned them since this store last did.
    fn move_in(&self, partitions: &[i32]) -> Result<(), RestoreError> {
        // After the start's restore of every partition, what another instance stored since
        // (while this one started and joined) is still in the input, consumed from the
        // restored offsets: the first assignment skips the read (0.66 s with nothing new).
        let caught_up = self.caught_up_at_start.swap(false, Ordering::Relaxed);
        if partitions.is_empty() || caught_up {
            return Ok(());
        }
        let restored = restore_partitions(&self.cfg, &self.store, Some(partitions))?;
        metrics::counter!(m::MOVED_IN_EVENTS).increment(restored.appended);
        let mut moved = self.status.moved_in.lock();
        moved.assignments += 1;
        moved.partitions += partitions.len() as u64;
        moved.restored.add(&restored);
        drop(moved);
        self.moved_in.lock().extend_from_slice(partitions);
        Ok(())
    }

    /// The partitions brought up to their changelog since the last call (see `moved_in`).
    pub(super) fn take_moved_in(&self) -> Vec<i32> {
        std::mem::take(&mut *self.moved_in.lock())
    }

    /// The engagements topic (`kafka.engagements_topic`).
    fn topic(&self) -> &str {
        &self.cfg.kafka.engagements_topic
    }

    /// `tpl`'s partitions of the engagements topic (the routed topic's come with them, one for
    /// one).
    fn owned(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        (tpl.elements_for_topic(self.topic()).iter())
            .map(|e| e.partition())
            .collect()
    }

    pub(super) fn take_failure(&self) -> Option<IngestError> {
        self.failure.lock().take()
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        self.status.broker_up.store(
            stats.brokers.values().any(|b| b.state == "UP"),
            Ordering::Relaxed,
        );
        // Forwarded events not yet stored are behind too. Only the partitions owned now: the
        // statistics go on naming partitions given up, whose stored offsets stay where this
        // instance left them.
        let mut total = 0u64;
        let kafka = &self.cfg.kafka;
        let owned = self.status.ownership.get().partitions;
        for name in [&kafka.engagements_topic, &kafka.routed_topic] {
            let Some(topic) = stats.topics.get(name) else {
                continue;
            };
            for (&p, part) in &topic.partitions {
                if p < 0 || part.hi_offset < 0 {
                    continue;
                }
                let stored = self
                    .store
                    .stored_offset(name, p)
                    .ok()
                    .flatten()
                    .unwrap_or(part.lo_offset.max(0));
                let lag = match owned.binary_search(&p) {
                    Ok(_) => (part.hi_offset - stored).max(0) as u64,
                    Err(_) => 0,
                };
                total += lag;
                metrics::gauge!(m::CONSUMER_LAG, "topic" => name.clone(), "partition" => p.to_string())
                    .set(lag as f64);
            }
        }
        self.status.lag.store(total, Ordering::Relaxed);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.status.broker_up.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for IngestContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(m::REBALANCES).increment(1);
                let owned = self.owned(tpl);
                if let Err(e) = self.move_in(&owned) {
                    error!(partitions = ?owned, error = %e, "cannot bring the assigned partitions up to their changelog");
                    self.fail(IngestError::MoveIn {
                        partitions: owned,
                        source: Box::new(e),
                    });
                    return;
                }
                let mut positions = Vec::new();
                for elem in tpl.elements() {
                    let (topic, p) = (elem.topic().to_owned(), elem.partition());
                    match self.start_of(&topic, p) {
                        Ok(offset) => positions.push((topic, p, offset)),
                        Err(e) => {
                            error!(topic, partition = p, error = %e, "cannot read the stored offset");
                            self.fail(IngestError::Assign {
                                topic,
                                partition: p,
                                problem: e.to_string(),
                            });
                            return;
                        }
                    }
                }
                for (topic, p, offset) in &positions {
                    if let Err(e) = tpl.set_partition_offset(topic, *p, *offset) {
                        error!(topic, partition = p, error = %e, "cannot set the start offset");
                    }
                }
                info!(partitions = ?positions.iter().map(|(_, p, o)| (*p, *o)).collect::<Vec<_>>(), "assigned at stored offsets");
                self.status
                    .assigned_partitions
                    .fetch_add(owned.len() as u64, Ordering::Relaxed);
                self.status.ownership.assign(&owned);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Appends flush before they return; this covers anything written by other paths.
                if let Err(e) = self.store.flush() {
                    error!(error = %e, "flush on revoke failed");
                }
                info!(partitions = tpl.count(), "partitions revoked");
                let revoked = self.owned(tpl);
                self.status.ownership.revoke(&revoked);
                let n = revoked.len() as u64;
                let _ = self.status.assigned_partitions.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |v| Some(v.saturating_sub(n)),
                );
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    error!(error = %e, "unassign failed");
                }
            }
            other => {
                warn!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_record_after_assignment_tells_the_history() {
        let stored = RecordPrint::of(749, Some(1_000), Some(b"user:1"), Some(b"{\"a\":1}"));
        assert_eq!(History::of(&stored, &stored), History::Same);
        let elsewhere = RecordPrint::of(0, Some(2_000), Some(b"user:9"), Some(b"{}"));
        assert_eq!(History::of(&stored, &elsewhere), History::OutOfRange);
        let replaced = RecordPrint::of(749, Some(2_000), Some(b"user:1"), Some(b"{\"a\":1}"));
        assert_eq!(History::of(&stored, &replaced), History::Changed);
        let same_time_other_payload =
            RecordPrint::of(749, Some(1_000), Some(b"user:1"), Some(b"{\"a\":2}"));
        assert_eq!(
            History::of(&stored, &same_time_other_payload),
            History::Changed
        );
    }
}
