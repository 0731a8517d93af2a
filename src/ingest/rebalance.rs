//! The consumer's context: every assignment at the offsets stored in sled (never Kafka's), a
//! flush before partitions are given up, and lag and broker health from librdkafka's statistics.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::ingest::{IngestError, IngestStatus};
use crate::store::GraphStore;
use crate::telemetry as m;

/// The consumer's context: assigns partitions at the offsets stored in sled.
pub struct IngestContext {
    pub(super) store: Arc<GraphStore>,
    pub(super) topic: String,
    pub(super) status: Arc<IngestStatus>,
    /// Set when an assignment could not be honoured; the loop stops with this error.
    pub(super) failure: std::sync::Mutex<Option<IngestError>>,
}

impl IngestContext {
    /// The error an assignment left for the consumer loop, if any.
    pub(super) fn take_failure(&self) -> Option<IngestError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        self.status.broker_up.store(
            stats.brokers.values().any(|b| b.state == "UP"),
            Ordering::Relaxed,
        );
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        let mut total = 0u64;
        for (&p, part) in &topic.partitions {
            if p < 0 || part.hi_offset < 0 {
                continue;
            }
            let stored = self
                .store
                .stored_offset(&self.topic, p)
                .ok()
                .flatten()
                .unwrap_or(part.lo_offset.max(0));
            let lag = (part.hi_offset - stored).max(0) as u64;
            total += lag;
            metrics::gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set(lag as f64);
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
                let mut positions = Vec::new();
                for elem in tpl.elements() {
                    let (topic, p) = (elem.topic().to_owned(), elem.partition());
                    match self.store.stored_offset(&topic, p) {
                        Ok(Some(next)) => positions.push((topic, p, Offset::Offset(next))),
                        // Nothing stored yet: the whole history belongs in the graph.
                        Ok(None) => positions.push((topic, p, Offset::Beginning)),
                        Err(e) => {
                            error!(topic, partition = p, error = %e, "cannot read the stored offset");
                            *self.failure.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(IngestError::Assign {
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
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
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
                let n = tpl.count() as u64;
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
