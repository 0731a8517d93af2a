//! Appending a batch: the offsets it covers, event-id deduplication, node interning, the edge
//! log, counts, all in one sled batch, flushed before it counts.
//!
//! [`GraphStore::append`] runs in phases: read the stored offsets of the batch's partitions;
//! expire event ids that left the dedup window; turn each new event into an edge
//! (`add_event`); write the edge chunks, node-id chunks, the expiry chunk and offsets; apply and
//! flush. Only then do the in-memory indexes (interner, adjacency, dedup) and counts change.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::schema::{EventOp, NodeKey, RelId, TypeId};
use crate::store::format::{chunk_entries, NodeChunks};
use crate::store::keys::*;
use crate::store::memory::{DedupIndex, Interner};
use crate::store::{
    AppendBatch, AppendOutcome, Counts, Edge, Graph, GraphStore, NodeRef, StoreError, WriterState,
    EDGES_PER_CHUNK, EDGE_BYTES, MAX_CHUNK_BYTES, META_NEXT_SEQ,
};

/// Event times (ms) of the most recent events with an id, for the dedup expiry watermark.
const WATERMARK_SAMPLES: usize = 1024;
/// Fewer samples than this (after a start) and nothing expires yet: one early outlier must not
/// move the watermark. Expiry is only garbage collection, so waiting costs nothing.
const WATERMARK_MIN_SAMPLES: usize = 64;

/// The event-time watermark the dedup expiry follows: the median of the last
/// [`WATERMARK_SAMPLES`] event times with an id, never moving back. A single far-future event
/// moves a median by one rank, not to the year 2286, so it cannot expire every stored id.
#[derive(Debug, Default)]
pub(super) struct DedupWatermark {
    recent: VecDeque<u64>,
    watermark: u64,
}

impl DedupWatermark {
    pub(super) fn observe(&mut self, ts: u64) {
        if self.recent.len() == WATERMARK_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(ts);
    }

    /// The watermark after the samples so far (0 until there are enough of them).
    pub(super) fn advance(&mut self) -> u64 {
        if self.recent.len() >= WATERMARK_MIN_SAMPLES {
            let mut sorted: Vec<u64> = self.recent.iter().copied().collect();
            let mid = sorted.len() / 2;
            let (_, median, _) = sorted.select_nth_unstable(mid);
            self.watermark = self.watermark.max(*median);
        }
        self.watermark
    }
}

/// Whether an append returns once its batch is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Flushed,
    AtNextFlush,
}

/// What one batch writes, gathered before anything is applied.
struct BatchWrites<'b> {
    sled: sled::Batch,
    counts: Counts,
    out: AppendOutcome,
    /// Node counts per type before the batch: a new node's index is its count plus its rank.
    nodes_before: Vec<u32>,
    new_nodes: HashMap<(TypeId, &'b str), u32>,
    /// The new nodes in index order, per type.
    new_ids: Vec<Vec<&'b str>>,
    edges: Vec<Edge>,
    edge_chunk: Vec<u8>,
    /// The event ids this batch stores, as expiry chunks: (ts u64, len u16, id) each.
    expiry_chunk: Vec<u8>,
    expiry_max_ts: u64,
    expiry_chunks: u64,
    batch_ids: HashSet<&'b str>,
    remembered: Vec<(&'b str, u64)>,
    /// Ids whose expiry chunk this batch deletes, with the time they were stored at.
    expired: Vec<(Vec<u8>, u64)>,
    /// Edges this batch's delete and erase events remove: seq → (src, dst).
    deletions: BTreeMap<u64, (NodeRef, NodeRef)>,
    /// Nodes this batch erases, in order, and as a set.
    erasures: Vec<NodeRef>,
    erased_now: HashSet<NodeRef>,
}

impl<'b> BatchWrites<'b> {
    /// Nothing written yet: `nodes_before` per type, room for `events` edges.
    fn new(counts: Counts, nodes_before: Vec<u32>, events: usize) -> BatchWrites<'b> {
        let types = nodes_before.len();
        BatchWrites {
            out: AppendOutcome {
                first_seq: counts.next_seq,
                ..Default::default()
            },
            counts,
            sled: sled::Batch::default(),
            nodes_before,
            new_nodes: HashMap::new(),
            new_ids: vec![Vec::new(); types],
            edges: Vec::with_capacity(events),
            edge_chunk: Vec::with_capacity(events * EDGE_BYTES),
            expiry_chunk: Vec::new(),
            expiry_max_ts: 0,
            expiry_chunks: 0,
            batch_ids: HashSet::new(),
            remembered: Vec::new(),
            expired: Vec::new(),
            deletions: BTreeMap::new(),
            erasures: Vec::new(),
            erased_now: HashSet::new(),
        }
    }
}

impl GraphStore {
    /// The nodes of `keys`, interned durably where the store does not know them yet, with no
    /// edge: nodes that gradients from another instance name, which this instance owns although
    /// no event it stored names them (`crate::train::foreign`). Their owner has to know them to
    /// apply and publish their rows. Such nodes are not in the changelog, which holds events: an
    /// instance that takes the partition over learns them from the next gradients that name them.
    pub fn intern_nodes(&self, keys: &[NodeKey]) -> Result<Vec<NodeRef>, StoreError> {
        let mut writer = self.writer.lock();
        let counts = self.counts.read().clone();
        let graph = self.graph.read();
        let nodes_before = (0..self.schema.node_types.len() as TypeId)
            .map(|t| graph.nodes.count(t))
            .collect();
        let mut w = BatchWrites::new(counts, nodes_before, 0);
        let nodes = (keys.iter())
            .map(|key| self.intern(&graph.nodes, &mut w, key))
            .collect::<Result<Vec<_>, _>>()?;
        drop(graph);
        if w.new_nodes.is_empty() {
            return Ok(nodes);
        }
        w.finish_chunks();
        self.commit(&mut writer, w, Durability::Flushed)?;
        Ok(nodes)
    }

    /// Forget what was consumed from `topic`'s `partition` (its next offset and last record),
    /// durably: the partition's history changed (the topic was recreated, or its data lost),
    /// so it is consumed again from its start. The edges stored from it stay.
    pub fn forget_partition(&self, topic: &str, partition: i32) -> Result<(), StoreError> {
        let _writer = self.writer.lock();
        let mut b = sled::Batch::default();
        b.remove(offset_key(topic, partition));
        b.remove(record_print_key(topic, partition));
        self.tree.apply_batch(b).map_err(|e| self.sled_err(e))?;
        self.db.flush().map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// Append one batch atomically and durably (see the module docs).
    ///
    /// Events at offsets below the stored next offset of their partition are skipped (they are
    /// already stored), as are events whose `event_id` is within the dedup window. The stored
    /// offsets only move forward.
    pub fn append(&self, batch: &AppendBatch) -> Result<AppendOutcome, StoreError> {
        self.append_with(batch, Durability::Flushed)
    }

    /// [`Self::append`] without the flush: durable at the next [`GraphStore::flush`] (or a
    /// flushed append). A crash before it loses a suffix of such batches, each whole with the
    /// offsets it covers (sled applies batches atomically and recovers them in order), so a
    /// reader of those offsets simply reads them again: for the restore, which writes many
    /// batches and flushes once at its end.
    pub fn append_unflushed(&self, batch: &AppendBatch) -> Result<AppendOutcome, StoreError> {
        self.append_with(batch, Durability::AtNextFlush)
    }

    fn append_with(
        &self,
        batch: &AppendBatch,
        durability: Durability,
    ) -> Result<AppendOutcome, StoreError> {
        let mut writer = self.writer.lock();
        let counts = self.counts.read().clone();
        let stored_next = self.stored_offsets(batch)?;
        let types = self.schema.node_types.len();
        let graph = self.graph.read();
        let nodes_before = (0..types as TypeId).map(|t| graph.nodes.count(t)).collect();
        let mut w = BatchWrites::new(counts, nodes_before, batch.events.len());
        // Expire old ids first: the index forgets them before this batch's ids are remembered.
        if self.dedup_window_ms > 0 {
            for e in batch.events.iter().filter(|e| e.event.event_id.is_some()) {
                writer.watermark.observe(e.event.ts);
            }
            let watermark = writer.watermark.advance();
            if watermark > 0 {
                self.expire_dedup(watermark.saturating_sub(self.dedup_window_ms), &mut w)?;
            }
        }
        // Running per-partition cursor: skips offsets already stored *and* repeats within the
        // batch (a rebalance can redeliver messages that are still pending).
        let mut cursor = stored_next.clone();
        for (position, se) in batch.events.iter().enumerate() {
            let next = cursor
                .get_mut(&se.partition)
                .expect("every partition was looked up");
            if se.offset < *next {
                w.out.already_stored += 1;
                continue;
            }
            *next = se.offset + 1;
            self.add_event(&graph, &writer.dedup, &mut w, position, se)?;
        }
        let delete_chunk = graph.delete_chunks;
        let erase_chunk = graph.erasures.len() as u64;
        drop(graph);
        w.finish_chunks();
        w.finish_deletions(delete_chunk);
        w.finish_erasures(erase_chunk);
        write_offsets(&mut w.sled, batch, &stored_next);
        // A batch may name one position several times, in any order (a restore reads a
        // partition's previous owner's late record after the new owner's): the furthest counts,
        // as a sled batch's last insert of a key would otherwise.
        let mut extra: HashMap<(&str, i32), i64> = HashMap::new();
        for (topic, p, next) in &batch.extra_offsets {
            furthest(&mut extra, (topic.as_str(), *p), *next);
        }
        for (topic, p, first, next) in &batch.logged {
            let at = extra.get(&(topic.as_str(), *p)).copied();
            let stored = self
                .stored_offset(topic, *p)?
                .unwrap_or(0)
                .max(at.unwrap_or(0));
            if stored >= *first {
                furthest(&mut extra, (topic.as_str(), *p), *next);
            }
        }
        for ((topic, p), next) in extra {
            if (self.stored_offset(topic, p)?).is_none_or(|stored| next > stored) {
                w.sled.insert(offset_key(topic, p), &next.to_be_bytes());
            }
        }
        let mut upstream: HashMap<(i32, i32), i64> = HashMap::new();
        for u in &batch.upstream {
            furthest(&mut upstream, (u.partition, u.source), u.next);
        }
        for ((partition, source), next) in upstream {
            if (self.upstream_offset(&batch.topic, partition, source)?)
                .is_none_or(|stored| next > stored)
            {
                let key = upstream_key(&batch.topic, partition, source);
                w.sled.insert(key, &next.to_be_bytes());
            }
        }
        self.commit(&mut writer, w, durability)
    }

    /// The next offset stored for every partition the batch covers (-1: none yet).
    fn stored_offsets(&self, batch: &AppendBatch) -> Result<HashMap<i32, i64>, StoreError> {
        let mut stored_next: HashMap<i32, i64> = HashMap::new();
        let partitions = batch
            .next_offsets
            .iter()
            .map(|&(p, _)| p)
            .chain(batch.events.iter().map(|e| e.partition));
        for p in partitions {
            if let std::collections::hash_map::Entry::Vacant(v) = stored_next.entry(p) {
                v.insert(self.stored_offset(&batch.topic, p)?.unwrap_or(-1));
            }
        }
        Ok(stored_next)
    }

    /// One new event: deduplicated by its id, its nodes interned, its edge added.
    fn add_event<'b>(
        &self,
        graph: &Graph,
        dedup: &DedupIndex,
        w: &mut BatchWrites<'b>,
        position: usize,
        se: &'b crate::store::SourcedEvent,
    ) -> Result<(), StoreError> {
        let ev = &se.event;
        if self.dedup_window_ms > 0 {
            if let Some(id) = ev.event_id.as_deref() {
                let seen = dedup
                    .seen_at(id.as_bytes())
                    .is_some_and(|seen| ev.ts.saturating_sub(seen) <= self.dedup_window_ms);
                if !w.batch_ids.insert(id) || seen {
                    w.out.duplicate_event_ids += 1;
                    return Ok(());
                }
                w.remember_id(id, ev.ts);
            }
        }
        match ev.op {
            EventOp::Add => {}
            EventOp::Delete => {
                self.delete_edges(graph, w, ev);
                return Ok(());
            }
            EventOp::Erase => return self.erase_node(graph, w, ev),
        }
        if !(graph.erased.is_empty() && w.erased_now.is_empty())
            && [&ev.src, &ev.dst]
                .into_iter()
                .filter_map(|key| known_node(graph, w, key))
                .any(|n| graph.erased.contains(&n) || w.erased_now.contains(&n))
        {
            w.out.erased_refused += 1;
            return Ok(());
        }
        let nodes = &graph.nodes;
        let nodes_before = w.new_nodes.len();
        let src = self.intern(nodes, w, &ev.src)?;
        let dst = self.intern(nodes, w, &ev.dst)?;
        if w.new_nodes.len() > nodes_before {
            w.out.node_creating_events.push(position as u32);
        }
        w.counts.next_seq += 1;
        let edge = Edge {
            src,
            rel: ev.rel,
            dst,
            ts: ev.ts,
            weight: ev.weight,
        };
        w.edge_chunk.extend_from_slice(&edge.encode());
        w.edges.push(edge);
        w.counts.relations[ev.rel as usize] += 1;
        w.out.appended += 1;
        Ok(())
    }

    /// A delete event: every live edge `src -rel-> dst`, stored before or earlier in this batch,
    /// is removed (none when either node is unknown).
    fn delete_edges(&self, graph: &Graph, w: &mut BatchWrites<'_>, ev: &crate::schema::Event) {
        let (Some(src), Some(dst)) = (known_node(graph, w, &ev.src), known_node(graph, w, &ev.dst))
        else {
            w.out.deletes_unmatched += 1;
            return;
        };
        // Stored edges (the adjacency holds live ones only), then this batch's own, less those
        // an earlier delete of the batch took.
        let first_new = w.out.first_seq;
        let in_batch = w.edges.iter().enumerate().filter_map(|(i, e)| {
            (e.src == src && e.rel == ev.rel && e.dst == dst).then_some(first_new + i as u64)
        });
        let found: Vec<u64> = graph
            .adjacency
            .matching(src, ev.rel, dst)
            .into_iter()
            .chain(in_batch)
            .filter(|seq| !w.deletions.contains_key(seq))
            .collect();
        if found.is_empty() {
            w.out.deletes_unmatched += 1;
            return;
        }
        let live = &mut w.counts.relations[ev.rel as usize];
        *live = live.saturating_sub(found.len() as u64);
        w.out.deleted += found.len() as u64;
        w.deletions
            .extend(found.into_iter().map(|seq| (seq, (src, dst))));
    }

    /// An erase event: every live edge at either end of the node (stored, or earlier in this
    /// batch) is removed, and the node is marked erased. A node the store does not know is
    /// interned first, so that its id is recognised as erased when events name it later.
    fn erase_node<'b>(
        &self,
        graph: &Graph,
        w: &mut BatchWrites<'b>,
        ev: &'b crate::schema::Event,
    ) -> Result<(), StoreError> {
        let node = self.intern(&graph.nodes, w, &ev.src)?;
        if graph.erased.contains(&node) || !w.erased_now.insert(node) {
            return Ok(());
        }
        let mut found: Vec<(u64, NodeRef, NodeRef, RelId)> = Vec::new();
        graph.adjacency.visit(node, None, None, |n| {
            let (src, dst) = match n.dir {
                crate::store::Direction::Out => (node, n.node),
                crate::store::Direction::In => (n.node, node),
            };
            found.push((n.seq, src, dst, n.rel));
            true
        });
        let first_new = w.out.first_seq;
        found.extend(w.edges.iter().enumerate().filter_map(|(i, e)| {
            (e.src == node || e.dst == node).then_some((first_new + i as u64, e.src, e.dst, e.rel))
        }));
        // A self-loop is at both ends of the node: taken once.
        for (seq, src, dst, rel) in found {
            if w.deletions.insert(seq, (src, dst)).is_none() {
                let live = &mut w.counts.relations[rel as usize];
                *live = live.saturating_sub(1);
                w.out.deleted += 1;
            }
        }
        w.erasures.push(node);
        w.out.erased += 1;
        Ok(())
    }

    fn intern<'b>(
        &self,
        nodes: &Interner,
        w: &mut BatchWrites<'b>,
        key: &'b NodeKey,
    ) -> Result<NodeRef, StoreError> {
        let (node_type, id) = (key.node_type, key.id.as_str());
        if let Some(index) = nodes.index(node_type, id) {
            return Ok(NodeRef { node_type, index });
        }
        if let Some(&index) = w.new_nodes.get(&(node_type, id)) {
            return Ok(NodeRef { node_type, index });
        }
        let t = node_type as usize;
        let index = w.nodes_before[t]
            .checked_add(w.new_ids[t].len() as u32)
            .filter(|&i| i < u32::MAX)
            .ok_or_else(|| StoreError::Full {
                path: self.path.clone(),
                what: format!("node type {} has 2^32 nodes", self.schema.node_types[t]),
            })?;
        w.new_nodes.insert((node_type, id), index);
        w.new_ids[t].push(id);
        Ok(NodeRef { node_type, index })
    }

    /// Apply and flush the batch; only then may the in-memory indexes and counts vouch for it
    /// (the counts last: an edge below `next_seq` has its nodes and adjacency in memory).
    fn commit(
        &self,
        writer: &mut WriterState,
        mut w: BatchWrites<'_>,
        durability: Durability,
    ) -> Result<AppendOutcome, StoreError> {
        w.out.new_nodes = w.new_nodes.len() as u64;
        if w.out.appended > 0 || w.out.deleted > 0 {
            w.sled
                .insert(META_NEXT_SEQ, &w.counts.next_seq.to_be_bytes());
            for (r, n) in w.counts.relations.iter().enumerate() {
                w.sled
                    .insert(&rel_count_key(r as RelId)[..], &n.to_be_bytes());
            }
        }
        self.tree
            .apply_batch(w.sled)
            .map_err(|e| self.sled_err(e))?;
        if durability == Durability::Flushed {
            self.db.flush().map_err(|e| self.sled_err(e))?;
        }
        for (id, ts) in &w.expired {
            writer.dedup.remove_at(id, *ts);
        }
        for (id, ts) in &w.remembered {
            writer.dedup.insert(id.as_bytes(), *ts);
        }
        {
            let mut graph = self.graph.write();
            for (t, ids) in w.new_ids.iter().enumerate() {
                for id in ids {
                    // A fresh index by construction: `intern` saw it absent under the writer
                    // lock, which every change to the interner holds.
                    let _ = graph.nodes.push(t as TypeId, id);
                }
            }
            for (i, edge) in w.edges.iter().enumerate() {
                graph.adjacency.add(w.out.first_seq + i as u64, edge);
            }
            if !w.deletions.is_empty() {
                graph.delete_chunks += 1;
            }
            for (&seq, &(src, dst)) in &w.deletions {
                graph.adjacency.remove(seq, src, dst);
                graph.deleted.insert(seq);
            }
            for &node in &w.erasures {
                graph.erased.insert(node);
                graph.erasures.push(node);
            }
        }
        *self.counts.write() = w.counts;
        Ok(w.out)
    }

    /// Forget event ids of the expiry chunks whose newest id is older than `cutoff`. A chunk
    /// goes whole once all its ids are out of the window (an id may outlive the window by up to
    /// a batch's time span; the window check ignores it by then anyway). Bounded per batch so a
    /// backlog never stalls ingest.
    fn expire_dedup(&self, cutoff: u64, w: &mut BatchWrites<'_>) -> Result<(), StoreError> {
        const MAX_CHUNKS_PER_BATCH: usize = 16;
        let end = dedup_expiry_key(cutoff, 0);
        for kv in self
            .tree
            .range(&b"Y"[..]..&end[..])
            .take(MAX_CHUNKS_PER_BATCH)
        {
            let (k, chunk) = kv.map_err(|e| self.sled_err(e))?;
            for (ts, id) in chunk_entries(&chunk, true, &self.path, "dedup expiry chunk")? {
                w.expired.push((id.to_vec(), ts));
            }
            w.sled.remove(k);
        }
        Ok(())
    }
}

/// The node `key` names, stored or new in this batch; `None` when neither.
fn known_node(graph: &Graph, w: &BatchWrites<'_>, key: &NodeKey) -> Option<NodeRef> {
    graph
        .nodes
        .index(key.node_type, &key.id)
        .or_else(|| w.new_nodes.get(&(key.node_type, key.id.as_str())).copied())
        .map(|index| NodeRef {
            node_type: key.node_type,
            index,
        })
}

impl<'b> BatchWrites<'b> {
    /// Store `id` as seen at `ts`, in this batch's expiry chunks.
    fn remember_id(&mut self, id: &'b str, ts: u64) {
        self.remembered.push((id, ts));
        self.expiry_chunk.extend_from_slice(&ts.to_be_bytes());
        self.expiry_chunk
            .extend_from_slice(&(id.len() as u16).to_be_bytes());
        self.expiry_chunk.extend_from_slice(id.as_bytes());
        self.expiry_max_ts = self.expiry_max_ts.max(ts);
        if self.expiry_chunk.len() >= MAX_CHUNK_BYTES {
            // Distinct keys: this batch owns the seqs first_seq.., and it appends at least one
            // edge per expiry chunk.
            let key = dedup_expiry_key(self.expiry_max_ts, self.out.first_seq + self.expiry_chunks);
            self.sled
                .insert(&key[..], std::mem::take(&mut self.expiry_chunk));
            (self.expiry_max_ts, self.expiry_chunks) = (0, self.expiry_chunks + 1);
        }
    }

    /// The deleted edges' chunk (`D`, numbered: batches without edges share a first seq).
    fn finish_deletions(&mut self, chunk: u64) {
        if self.deletions.is_empty() {
            return;
        }
        let mut bytes = Vec::with_capacity(self.deletions.len() * 8);
        for seq in self.deletions.keys() {
            bytes.extend_from_slice(&seq.to_be_bytes());
        }
        self.sled.insert(&delete_chunk_key(chunk)[..], bytes);
    }

    /// The erased nodes' chunk (`Z`, keyed by how many nodes were erased before it).
    fn finish_erasures(&mut self, chunk: u64) {
        if self.erasures.is_empty() {
            return;
        }
        let bytes: Vec<u8> = self.erasures.iter().flat_map(|&n| encode_node(n)).collect();
        self.sled.insert(&erase_chunk_key(chunk)[..], bytes);
    }

    /// The edge log's chunks, the new nodes' id chunks and the last expiry chunk.
    fn finish_chunks(&mut self) {
        for (i, part) in self
            .edge_chunk
            .chunks(EDGES_PER_CHUNK * EDGE_BYTES)
            .enumerate()
        {
            let first = self.out.first_seq + (i * EDGES_PER_CHUNK) as u64;
            self.sled.insert(&edge_key(first)[..], part);
        }
        for (t, ids) in self.new_ids.iter().enumerate() {
            let mut chunks = NodeChunks::new(t as TypeId, self.nodes_before[t]);
            for id in ids {
                chunks.push(id, &mut self.sled);
            }
            chunks.finish(&mut self.sled);
            if !ids.is_empty() {
                let count = self.nodes_before[t] + ids.len() as u32;
                self.sled
                    .insert(&node_count_key(t as TypeId)[..], &count.to_be_bytes());
            }
        }
        if !self.expiry_chunk.is_empty() {
            let key = dedup_expiry_key(self.expiry_max_ts, self.out.first_seq + self.expiry_chunks);
            self.sled
                .insert(&key[..], std::mem::take(&mut self.expiry_chunk));
        }
    }
}

/// The batch's next offsets, where they move a partition forward.
/// `positions[key]` moved to `next` unless it is further already.
fn furthest<K: std::hash::Hash + Eq>(positions: &mut HashMap<K, i64>, key: K, next: i64) {
    let at = positions.entry(key).or_insert(next);
    *at = (*at).max(next);
}

fn write_offsets(sled: &mut sled::Batch, batch: &AppendBatch, stored_next: &HashMap<i32, i64>) {
    let mut new_next: HashMap<i32, i64> = HashMap::new();
    for e in &batch.events {
        let n = new_next.entry(e.partition).or_insert(-1);
        *n = (*n).max(e.offset + 1);
    }
    for &(p, next) in &batch.next_offsets {
        let n = new_next.entry(p).or_insert(-1);
        *n = (*n).max(next);
    }
    for (p, next) in new_next {
        if next > stored_next[&p] {
            sled.insert(offset_key(&batch.topic, p), &next.to_be_bytes());
            if let Some((_, print)) = batch
                .last_records
                .iter()
                .find(|(q, r)| *q == p && r.offset + 1 == next)
            {
                sled.insert(record_print_key(&batch.topic, p), &print.encode()[..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_far_future_event_does_not_move_the_watermark() {
        let mut w = DedupWatermark::default();
        for ts in 0..WATERMARK_MIN_SAMPLES as u64 - 1 {
            w.observe(1_000 + ts);
        }
        assert_eq!(w.advance(), 0, "too few samples: nothing expires yet");
        w.observe(9_999_999_999_999);
        let m = w.advance();
        assert!((1_000..1_100).contains(&m), "{m}");
        for _ in 0..10 {
            w.observe(500);
        }
        assert!(w.advance() >= m, "never moves back");
    }
}
