//! `[storage]` and `[ingest]`: where the graph lives and how events become edges.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub cache_capacity_mb: u64,
    /// Removed with store format 2 (every node id is in memory): read only to refuse it with a
    /// message that says so, instead of serde's bare "unknown field".
    #[serde(default, skip_serializing)]
    node_cache_entries: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub batch_max_events: usize,
    pub batch_max_wait_ms: u64,
    pub max_event_bytes: usize,
    pub max_id_bytes: usize,
    pub dedup_window_secs: u64,
    pub max_event_time_ahead_secs: u64,
    pub offset_out_of_range: OffsetPolicy,
    pub dlq_timeout_ms: u64,
}

/// What to do when a partition no longer holds the record the store last consumed from it
/// (`ingest.offset_out_of_range`): the topic was recreated, its data lost, or retention deleted
/// what the stored offset points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetPolicy {
    /// Log it, count it, forget the partition's stored offset and consume it from its start:
    /// nothing the partition now holds is lost (ids within the dedup window still dedup).
    Earliest,
    /// Stop ingest with an error naming the topic, partition and offsets.
    Fail,
}

impl Validate for StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        if self.node_cache_entries.is_some() {
            return Err(invalid(
                "storage.node_cache_entries",
                "was removed with store format 2 (every node id is kept in memory); delete it",
            ));
        }
        Ok(())
    }
}

impl Validate for IngestConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let i = self;
        positive("ingest.batch_max_events", i.batch_max_events as u64)?;
        positive("ingest.batch_max_wait_ms", i.batch_max_wait_ms)?;
        positive("ingest.dlq_timeout_ms", i.dlq_timeout_ms)?;
        if i.max_event_bytes < 64 {
            return Err(invalid("ingest.max_event_bytes", "must be at least 64"));
        }
        if i.max_id_bytes == 0 || i.max_id_bytes > 4096 {
            return Err(invalid("ingest.max_id_bytes", "must be in 1..=4096"));
        }
        Ok(())
    }
}
