//! Reads: offsets, node ids, counts, the edge log from a cursor, uniform samples, adjacency.

use rand::Rng;

use crate::schema::{RelId, TypeId};
use crate::store::keys::*;
use crate::store::{
    corrupt, Direction, Edge, Graph, GraphStore, Neighbor, NodeRef, RecordPrint, StoreError,
    EDGE_BYTES,
};

impl GraphStore {
    /// The last record consumed from `topic`'s `partition`, when the store has one.
    pub fn last_record(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<RecordPrint>, StoreError> {
        match self
            .tree
            .get(record_print_key(topic, partition))
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => RecordPrint::decode(&v)
                .map(Some)
                .ok_or_else(|| corrupt(&self.path, "last record of a partition")),
            None => Ok(None),
        }
    }

    /// The next offset to consume for a partition, if any was stored.
    pub fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        match self
            .tree
            .get(offset_key(topic, partition))
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => Ok(Some(
                be_u64(&v).ok_or_else(|| corrupt(&self.path, "offset"))? as i64,
            )),
            None => Ok(None),
        }
    }

    /// How far the events forwarded to `topic`'s `partition` from source partition `source` are
    /// stored (see [`crate::store::Upstream`]).
    pub fn upstream_offset(
        &self,
        topic: &str,
        partition: i32,
        source: i32,
    ) -> Result<Option<i64>, StoreError> {
        match self
            .tree
            .get(upstream_key(topic, partition, source))
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => Ok(Some(
                be_u64(&v).ok_or_else(|| corrupt(&self.path, "upstream offset"))? as i64,
            )),
            None => Ok(None),
        }
    }

    /// All stored offsets: (topic, partition, next offset).
    pub fn offsets(&self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(b"O") {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let body = &k[1..];
            let sep = body
                .len()
                .checked_sub(5)
                .filter(|&i| body[i] == 0)
                .ok_or_else(|| corrupt(&self.path, "offset key"))?;
            let topic = String::from_utf8_lossy(&body[..sep]).into_owned();
            let partition = i32::from_be_bytes(
                body[sep + 1..]
                    .try_into()
                    .map_err(|_| corrupt(&self.path, "offset key"))?,
            );
            out.push((
                topic,
                partition,
                be_u64(&v).ok_or_else(|| corrupt(&self.path, "offset"))? as i64,
            ));
        }
        Ok(out)
    }

    pub fn node_index(&self, node_type: TypeId, id: &str) -> Result<Option<u32>, StoreError> {
        Ok(self.graph().nodes.index(node_type, id))
    }

    pub fn node_id(&self, node: NodeRef) -> Result<Option<String>, StoreError> {
        Ok(self.graph().nodes.id(node).map(str::to_owned))
    }

    /// The partition (of `partitions`, [`crate::partition::partition_of`] on the node's key
    /// `type:id`) of each node of type `node_type` with an index in `from..to`, under one read
    /// of the graph; `None` past the type's nodes.
    pub fn partitions_of(
        &self,
        node_type: TypeId,
        from: u32,
        to: u32,
        partitions: u32,
    ) -> Vec<Option<i32>> {
        let type_name = &self.schema.node_types[node_type as usize];
        let graph = self.graph();
        let mut key = Vec::new();
        (from..to)
            .map(|index| {
                let id = graph.nodes.id(NodeRef { node_type, index })?;
                key.clear();
                key.extend_from_slice(type_name.as_bytes());
                key.push(b':');
                key.extend_from_slice(id.as_bytes());
                Some(crate::partition::partition_of(&key, partitions) as i32)
            })
            .collect()
    }

    fn graph(&self) -> parking_lot::RwLockReadGuard<'_, Graph> {
        self.graph.read()
    }

    /// Total number of edges ever appended (also the next sequence number).
    pub fn edge_count(&self) -> u64 {
        self.counts.read().next_seq
    }

    pub fn node_count(&self, node_type: TypeId) -> u32 {
        self.graph().nodes.count(node_type)
    }

    /// Edge count per relation id.
    pub fn relation_counts(&self) -> Vec<u64> {
        self.counts.read().relations.clone()
    }

    /// The chunk of the edge log holding `seq`: its first sequence number and its bytes.
    fn chunk_at(&self, seq: u64) -> Result<Option<(u64, sled::IVec)>, StoreError> {
        let Some(kv) = self.tree.range(edge_key(0)..=edge_key(seq)).next_back() else {
            return Ok(None);
        };
        let (k, v) = kv.map_err(|e| self.sled_err(e))?;
        let first = be_u64(&k[1..]).ok_or_else(|| corrupt(&self.path, "edge chunk key"))?;
        if v.len() % EDGE_BYTES != 0 {
            return Err(corrupt(&self.path, &format!("edge chunk {first}")));
        }
        Ok(Some((first, v)))
    }

    pub fn edge(&self, seq: u64) -> Result<Option<Edge>, StoreError> {
        let Some((first, chunk)) = self.chunk_at(seq)? else {
            return Ok(None);
        };
        let at = (seq - first) as usize * EDGE_BYTES;
        Ok(chunk.get(at..at + EDGE_BYTES).and_then(Edge::decode))
    }

    /// Up to `limit` committed edges with sequence numbers from `cursor` on, in order (the
    /// trainer's feed): their nodes and adjacency are in memory already.
    pub fn edges_from(&self, cursor: u64, limit: usize) -> Result<Vec<(u64, Edge)>, StoreError> {
        let end = self.edge_count();
        let limit = limit.min(end.saturating_sub(cursor) as usize);
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        if limit == 0 {
            return Ok(out);
        }
        let start = match self.chunk_at(cursor)? {
            Some((first, _)) => first,
            None => cursor,
        };
        let graph = self.graph();
        let deleted = &graph.deleted;
        for kv in self.tree.range(edge_key(start)..=edge_key(u64::MAX)) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let first = be_u64(&k[1..]).ok_or_else(|| corrupt(&self.path, "edge chunk key"))?;
            if first >= end {
                break;
            }
            for (i, rec) in v.chunks_exact(EDGE_BYTES).enumerate() {
                let seq = first + i as u64;
                if seq < cursor || deleted.contains(&seq) {
                    continue;
                }
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push((
                    seq,
                    Edge::decode(rec).ok_or_else(|| corrupt(&self.path, "edge"))?,
                ));
            }
        }
        Ok(out)
    }

    /// `n` edges drawn uniformly (with replacement) from the live edges of the log (a deleted
    /// edge is drawn again, a few times at most: with most of the log deleted, fewer come back).
    pub fn sample_edges<R: Rng>(&self, rng: &mut R, n: usize) -> Result<Vec<Edge>, StoreError> {
        const TRIES: usize = 8;
        let total = self.edge_count();
        if total == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            for _ in 0..TRIES {
                let seq = rng.random_range(0..total);
                // Locked per draw, not for the whole sample: the writer's commit waits on it.
                if self.graph().deleted.contains(&seq) {
                    continue;
                }
                out.push(
                    self.edge(seq)?
                        .ok_or_else(|| corrupt(&self.path, &format!("edge {seq} missing")))?,
                );
                break;
            }
        }
        Ok(out)
    }

    /// Nodes erased so far (erase events), in the order they were erased.
    pub fn erased_count(&self) -> usize {
        self.graph().erasures.len()
    }

    /// The erased nodes from the `from`-th erasure on, in erasure order (a reader keeps how far
    /// it got, as the trainer and the publisher do).
    pub fn erasures_since(&self, from: usize) -> Vec<NodeRef> {
        self.graph()
            .erasures
            .get(from..)
            .map_or_else(Vec::new, <[NodeRef]>::to_vec)
    }

    pub fn is_erased(&self, node: NodeRef) -> bool {
        self.graph().erased.contains(&node)
    }

    /// Edges removed by delete events.
    pub fn deleted_edges(&self) -> u64 {
        self.graph().deleted.len() as u64
    }

    /// `n` nodes of a type drawn uniformly (with replacement).
    pub fn sample_nodes<R: Rng>(&self, rng: &mut R, node_type: TypeId, n: usize) -> Vec<NodeRef> {
        let count = self.node_count(node_type);
        if count == 0 {
            return Vec::new();
        }
        (0..n)
            .map(|_| NodeRef {
                node_type,
                index: rng.random_range(0..count),
            })
            .collect()
    }

    /// Neighbours of `node` by relation (all when `None`) and direction, oldest first, at most
    /// `limit`.
    pub fn neighbors(
        &self,
        node: NodeRef,
        rel: Option<RelId>,
        dir: Option<Direction>,
        limit: usize,
    ) -> Result<Vec<Neighbor>, StoreError> {
        let mut out = Vec::new();
        self.scan_adjacency(node, rel, dir, |n| {
            out.push(n);
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Degree of `node` for one relation and direction.
    pub fn degree(&self, node: NodeRef, rel: RelId, dir: Direction) -> Result<u32, StoreError> {
        let mut n = 0u32;
        self.scan_adjacency(node, Some(rel), Some(dir), |_| {
            n += 1;
            true
        })?;
        Ok(n)
    }

    /// Visit adjacency entries in sequence order until `visit` returns false.
    fn scan_adjacency(
        &self,
        node: NodeRef,
        rel: Option<RelId>,
        dir: Option<Direction>,
        visit: impl FnMut(Neighbor) -> bool,
    ) -> Result<(), StoreError> {
        self.graph().adjacency.visit(node, rel, dir, visit);
        Ok(())
    }

    /// Read a metadata value (e.g. the trainer cursor).
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .get(meta_key(name))
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// Flush everything to disk (also done by every append).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.sled_err(e))
    }

    /// Size of the database on disk, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl crate::partition::NodePartitions for GraphStore {
    fn partitions_of(&self, t: TypeId, from: u32, to: u32, partitions: u32) -> Vec<Option<i32>> {
        GraphStore::partitions_of(self, t, from, to, partitions)
    }
}
