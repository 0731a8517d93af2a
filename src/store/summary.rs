//! What a store holds, in numbers: for `inspect --json`, `/v1/status` and the store gauges.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{GraphStore, StoreError};
use crate::telemetry as m;

/// Node, edge and offset counts of a store (`inspect --json`, `/v1/status`).
#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    pub path: String,
    /// Node type → count.
    pub nodes: BTreeMap<String, u64>,
    /// Relation → edge count.
    pub edges: BTreeMap<String, u64>,
    pub edges_total: u64,
    /// Edges removed by delete events (counted in `edges_total`, not in `edges`).
    pub edges_deleted: u64,
    /// Nodes erased by erase events (counted in `nodes`: they keep their index).
    pub nodes_erased: u64,
    pub offsets: Vec<OffsetEntry>,
    pub size_on_disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OffsetEntry {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

impl StoreSummary {
    pub fn read(store: &GraphStore) -> Result<StoreSummary, StoreError> {
        let schema = store.stored_schema();
        let nodes = schema
            .node_types
            .iter()
            .enumerate()
            .map(|(t, name)| (name.clone(), store.node_count(t as u16) as u64))
            .collect();
        let edges = schema
            .relations
            .iter()
            .map(|(name, _, _)| name.clone())
            .zip(store.relation_counts())
            .collect();
        let offsets = store
            .offsets()?
            .into_iter()
            .map(|(topic, partition, next_offset)| OffsetEntry {
                topic,
                partition,
                next_offset,
            })
            .collect();
        Ok(StoreSummary {
            path: store.path().display().to_string(),
            nodes,
            edges,
            edges_total: store.edge_count(),
            edges_deleted: store.deleted_edges(),
            nodes_erased: store.erased_count() as u64,
            offsets,
            size_on_disk_bytes: store.size_on_disk(),
        })
    }
}

/// Update the store gauges (called when `/metrics` is scraped).
pub fn refresh_store_gauges(store: &GraphStore) {
    metrics::gauge!(m::STORE_EDGES).set(store.edge_count() as f64);
    for (t, name) in store.stored_schema().node_types.iter().enumerate() {
        metrics::gauge!(m::STORE_NODES, "type" => name.clone())
            .set(store.node_count(t as u16) as f64);
    }
}
