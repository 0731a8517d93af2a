//! Which edges a trainer trains: with several instances in one consumer group, those whose
//! source belongs to a partition the instance owns, so that each edge is trained once, by its
//! source's owner (the instance ingest routed it to). A store also holds edges of partitions the
//! instance does not own (an empty store restores every partition's changelog at start; a
//! partition given up stays in the store), and those are left to their owners. While the instance
//! owns every partition, every edge is trained; while it owns none (before its first assignment,
//! and between an eager rebalance's revocation and its assignment) the trainer waits, since
//! what it will own is not known yet.

use std::sync::Arc;

use crate::partition::{Ownership, PartitionsByRow};
use crate::store::{Edge, GraphStore, NodeRef, StoreError};

/// The source filter, with each source row's partition looked up once (a store read per new
/// source node).
#[derive(Debug)]
pub struct OwnedSources {
    ownership: Arc<Ownership>,
    by_row: PartitionsByRow,
}

impl OwnedSources {
    pub fn new(ownership: Arc<Ownership>) -> OwnedSources {
        OwnedSources {
            ownership,
            by_row: PartitionsByRow::default(),
        }
    }

    pub fn ownership(&self) -> Arc<Ownership> {
        self.ownership.clone()
    }

    /// Whether the instance owns no partition now: before its first assignment, or between an
    /// eager rebalance's revocation and its assignment. The trainer waits rather than skip
    /// edges that may be its own a moment later.
    pub fn paused(&self) -> bool {
        self.ownership.get().partitions.is_empty()
    }

    /// The partitions owned now (sorted).
    pub fn owned_now(&self) -> Vec<i32> {
        self.ownership.get().partitions
    }

    /// Whether another instance owns some partition now (the rows of the model are split
    /// between owners).
    pub fn shared(&self) -> bool {
        let partitions = self.ownership.partition_count() as usize;
        partitions > 0 && self.ownership.get().partitions.len() < partitions
    }

    /// The partition of `node` (its key's, among the partitions there are now; -1 for a node
    /// the store does not know).
    pub fn partition(&mut self, store: &GraphStore, node: NodeRef) -> Result<i32, StoreError> {
        let partitions = self.ownership.partition_count();
        Ok(self.partition_of(store, node, partitions))
    }

    /// `edges` without those whose source another instance owns (the ownership now).
    pub fn keep(&mut self, store: &GraphStore, edges: Vec<Edge>) -> Result<Vec<Edge>, StoreError> {
        let owned = self.ownership.get();
        let partitions = self.ownership.partition_count();
        if partitions == 0 || owned.partitions.len() >= partitions as usize {
            return Ok(edges);
        }
        let mut out = Vec::with_capacity(edges.len());
        for e in edges {
            let q = self.partition_of(store, e.src, partitions);
            if owned.partitions.binary_search(&q).is_ok() {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn partition_of(&mut self, store: &GraphStore, node: NodeRef, partitions: u32) -> i32 {
        (self.by_row)
            .of(store, node.node_type, node.index, partitions)
            .unwrap_or(-1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::partition_of;
    use crate::train::test_graph::likes_store;

    #[test]
    fn only_edges_whose_source_is_owned_are_kept_once_the_group_assigned_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"];
        let likes: Vec<(&str, &str)> = users.iter().map(|&u| (u, "m1")).collect();
        let store = likes_store(dir.path(), &likes);
        let edges: Vec<Edge> = (store.edges_from(0, 100).unwrap().into_iter())
            .map(|(_, e)| e)
            .collect();
        let place = |u: &str| partition_of(format!("user:{u}").as_bytes(), 4) as i32;
        let ownership = Arc::new(Ownership::default());
        let mut sources = OwnedSources::new(ownership.clone());
        let kept = |s: &mut OwnedSources| -> Vec<String> {
            (s.keep(&store, edges.clone()).unwrap().into_iter())
                .map(|e| store.node_id(e.src).unwrap().unwrap())
                .collect()
        };
        // Before the first assignment the trainer waits.
        ownership.set_partition_count(4);
        assert!(sources.paused());
        let ours = place("u1");
        ownership.assign(&[ours]);
        let want: Vec<&str> = users.into_iter().filter(|u| place(u) == ours).collect();
        assert!(want.len() < 8, "{want:?}: every user in one partition");
        assert_eq!(kept(&mut sources), want);
        // Every partition owned: everything again.
        ownership.assign(&[0, 1, 2, 3]);
        assert_eq!(kept(&mut sources).len(), 8);
        assert!(!sources.paused());
        ownership.revoke(&[0, 1, 2, 3]);
        assert!(sources.paused(), "a rebalance under way");
    }
}
