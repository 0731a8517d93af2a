//! `[remote]`: the rows other instances own, read from the published state (`crate::remote`).

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

/// The `[remote]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Follow the partitions of the embeddings topic this instance does not own and answer
    /// `/v1/embeddings` for their nodes with their owners' published rows. Off: such nodes are
    /// answered from this instance's own model (`source: "local"`).
    pub enabled: bool,
    /// At most this many rows (nodes and relations) are cached, over every partition followed.
    /// Past it, whole partitions stop being followed, the highest-numbered first, until the
    /// next change of ownership; `/v1/status` names them (`remote.uncached`).
    pub max_rows: usize,
    /// A change of ownership is acted on once it has held this long: a rebalance revokes every
    /// partition before assigning the new set, and following a partition begins by reading it
    /// from its start. Owning nothing (a rebalance under way) is never acted on.
    pub settle_ms: u64,
    /// With several instances: send the gradients of rows owned elsewhere to their owners
    /// (`kafka.gradients_topic`), apply those sent here, and replace the local copies of rows
    /// owned elsewhere with their owners' published rows, so that the instances train one
    /// model. Needs `enabled` (the rows come from the cache). On by default. Off: each instance
    /// trains its own copies of other owners' rows, which nobody publishes, and the instances
    /// serve several models side by side.
    pub exchange_gradients: bool,
}

impl Validate for RemoteConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_rows == 0 {
            return Err(invalid(
                "remote.max_rows",
                "must be greater than 0 (set remote.enabled = false to cache nothing)",
            ));
        }
        if self.exchange_gradients && !self.enabled {
            return Err(invalid(
                "remote.exchange_gradients",
                "needs remote.enabled = true (the rows owned elsewhere come from the remote cache)",
            ));
        }
        positive("remote.settle_ms", self.settle_ms)
    }
}
