//! The durable graph on sled: node interning, the append-only edge log, adjacency (degrees),
//! consumer offsets, event-id deduplication and metadata.
//!
//! Everything lives in one sled tree under one-byte key prefixes, so that one ingest batch — its
//! edges *and* the consumer offsets they cover — is a single atomic `apply_batch`, made durable
//! by one `flush` before [`GraphStore::append`] returns. A crash therefore leaves either the
//! whole batch with its offsets or neither, which is what makes ingest exactly-once.
//!
//! sled pays per key written (several µs each here), so a batch writes as few keys as it can:
//! its edges as one chunk of the log, and its adjacency as one chunk per (node, relation,
//! direction) it touches, so a hub that gets k edges in a batch costs one key, not k. Degrees are
//! counted from the adjacency chunks rather than stored.
//!
//! Key layout (all integers big-endian so that key order is numeric order):
//!
//! | prefix | key                                   | value                     |
//! |--------|---------------------------------------|---------------------------|
//! | `N`    | type u16, external id bytes           | dense index u32           |
//! | `I`    | type u16, index u32                   | external id bytes         |
//! | `C`    | type u16                              | node count u32            |
//! | `E`    | first seq u64 of the chunk            | [`Edge`]s, 26 bytes each  |
//! | `A`    | type u16, index u32, rel u16, dir u8, first seq u64 | per edge: seq u64, other end type u16, index u32 |
//! | `R`    | rel u16                               | edge count u64            |
//! | `O`    | topic bytes, 0x00, partition i32      | next offset i64           |
//! | `X`    | event id bytes                        | event ts u64              |
//! | `Y`    | newest ts u64, first seq u64 of the batch | the batch's ids: ts u64, len u16, id |
//! | `M`    | name                                  | metadata (bincode)        |

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::schema::{Event, RelId, Schema, TypeId};

mod summary;

pub use summary::{refresh_store_gauges, OffsetEntry, StoreSummary};

/// A node inside the store: its type and dense per-type index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeRef {
    pub node_type: TypeId,
    pub index: u32,
}

/// One stored edge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edge {
    pub src: NodeRef,
    pub rel: RelId,
    pub dst: NodeRef,
    /// Event time, ms since the epoch.
    pub ts: u64,
    pub weight: f32,
}

const EDGE_BYTES: usize = 26;

/// Keep chunk values well under sled's blob threshold (segment size / 4 = 128 KiB): a larger
/// value is written as a file of its own, with its own fsync.
const MAX_CHUNK_BYTES: usize = 64 << 10;
/// Edges per edge-log chunk (≈ 104 KiB).
const EDGES_PER_CHUNK: usize = 4096;

impl Edge {
    fn encode(&self) -> [u8; EDGE_BYTES] {
        let mut b = [0u8; EDGE_BYTES];
        b[0..2].copy_from_slice(&self.src.node_type.to_be_bytes());
        b[2..6].copy_from_slice(&self.src.index.to_be_bytes());
        b[6..8].copy_from_slice(&self.rel.to_be_bytes());
        b[8..10].copy_from_slice(&self.dst.node_type.to_be_bytes());
        b[10..14].copy_from_slice(&self.dst.index.to_be_bytes());
        b[14..22].copy_from_slice(&self.ts.to_be_bytes());
        b[22..26].copy_from_slice(&self.weight.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Edge> {
        if b.len() != EDGE_BYTES {
            return None;
        }
        Some(Edge {
            src: NodeRef {
                node_type: u16::from_be_bytes(b[0..2].try_into().ok()?),
                index: u32::from_be_bytes(b[2..6].try_into().ok()?),
            },
            rel: u16::from_be_bytes(b[6..8].try_into().ok()?),
            dst: NodeRef {
                node_type: u16::from_be_bytes(b[8..10].try_into().ok()?),
                index: u32::from_be_bytes(b[10..14].try_into().ok()?),
            },
            ts: u64::from_be_bytes(b[14..22].try_into().ok()?),
            weight: f32::from_be_bytes(b[22..26].try_into().ok()?),
        })
    }
}

/// Direction of an adjacency entry, seen from the node that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Out = 0,
    In = 1,
}

/// One adjacency entry: the node at the other end and the edge's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub node: NodeRef,
    pub rel: RelId,
    pub dir: Direction,
    pub seq: u64,
}

/// One valid event with the Kafka position it came from.
#[derive(Debug, Clone)]
pub struct SourcedEvent {
    pub partition: i32,
    pub offset: i64,
    pub event: Event,
}

/// What one ingest batch asks the store to make durable.
#[derive(Debug, Clone, Default)]
pub struct AppendBatch {
    pub topic: String,
    /// Valid events in consumption order.
    pub events: Vec<SourcedEvent>,
    /// Next offset to consume per partition after this batch (covers invalid events too).
    pub next_offsets: Vec<(i32, i64)>,
}

impl AppendBatch {
    /// Events not read from Kafka (offline loads, tests): partition 0 at consecutive offsets from
    /// `first_offset`.
    pub fn from_events(
        topic: &str,
        first_offset: i64,
        events: impl IntoIterator<Item = Event>,
    ) -> AppendBatch {
        AppendBatch {
            topic: topic.to_owned(),
            events: events
                .into_iter()
                .enumerate()
                .map(|(i, event)| SourcedEvent {
                    partition: 0,
                    offset: first_offset + i as i64,
                    event,
                })
                .collect(),
            next_offsets: vec![],
        }
    }
}

/// What [`GraphStore::append`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: u64,
    /// Events dropped because their `event_id` was stored within the dedup window.
    pub duplicate_event_ids: u64,
    /// Events at offsets below the stored offset (redelivered after a rebalance or restart).
    pub already_stored: u64,
    pub new_nodes: u64,
    /// Positions in the batch of the events that created at least one node (freshness of new
    /// nodes).
    pub node_creating_events: Vec<u32>,
    /// Sequence numbers of the appended edges: `first_seq..first_seq + appended`.
    pub first_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store {path}: schema does not match the stored one: `{key}`: {problem}")]
    SchemaMismatch {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("store {path}: corrupt entry: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("store {path}: {what}")]
    Full { path: PathBuf, what: String },
}

/// Names of node types and relations as the store holds them (ids are positions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchema {
    pub node_types: Vec<String>,
    /// (name, source types, target types)
    pub relations: Vec<(String, Vec<String>, Vec<String>)>,
}

impl StoredSchema {
    fn from_schema(schema: &Schema) -> Self {
        let names = |ids: &[TypeId]| {
            ids.iter()
                .map(|&t| schema.type_name(t).to_owned())
                .collect()
        };
        StoredSchema {
            node_types: schema.node_types().to_vec(),
            relations: schema
                .relations()
                .iter()
                .map(|r| (r.name.clone(), names(&r.src_types), names(&r.dst_types)))
                .collect(),
        }
    }

    /// A config schema may only extend the stored one: same names at the same positions, new ones
    /// appended, endpoint type lists widened but not narrowed.
    fn check_extension(&self, new: &StoredSchema) -> Result<(), (String, String)> {
        for (i, old) in self.node_types.iter().enumerate() {
            match new.node_types.get(i) {
                Some(n) if n == old => {}
                other => {
                    return Err((
                        format!("schema.node_types[{i}]"),
                        format!("the store has {old:?} here, the config {other:?}; append new types at the end"),
                    ))
                }
            }
        }
        for (i, (name, src, dst)) in self.relations.iter().enumerate() {
            let Some((n, s, d)) = new.relations.get(i) else {
                return Err((
                    "schema.relations".into(),
                    format!(
                        "the store holds relation {name:?} at position {i}; the config drops it"
                    ),
                ));
            };
            if n != name {
                return Err((
                    format!("schema.relations[{i}].name"),
                    format!("the store has {name:?} here, the config {n:?}; append new relations at the end"),
                ));
            }
            for (side, old, new) in [("src", src, s), ("dst", dst, d)] {
                if let Some(t) = old.iter().find(|t| !new.contains(t)) {
                    return Err((
                        format!("schema.relations[{i}].{side}"),
                        format!("relation {name:?} has stored edges with {side} type {t:?}, which the config removes"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Counters kept in memory, mirrored in the tree, changed only after a batch is durable.
#[derive(Debug, Clone)]
struct Counts {
    next_seq: u64,
    nodes: Vec<u32>,
    relations: Vec<u64>,
}

/// The graph store. Cheap to share behind an `Arc`; reads are concurrent, writes serialised.
pub struct GraphStore {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    schema: StoredSchema,
    counts: RwLock<Counts>,
    /// Held while appending; also holds the writer's node-id cache.
    writer: Mutex<NodeCache>,
    dedup_window_ms: u64,
}

/// External id → index of recently seen nodes, per type: interning needs no sled read for them.
/// Bounded: a type's map is dropped whole when the total passes the capacity.
struct NodeCache {
    by_type: Vec<HashMap<Box<str>, u32>>,
    entries: usize,
    capacity: usize,
}

impl NodeCache {
    fn get(&self, node_type: TypeId, id: &str) -> Option<u32> {
        self.by_type.get(node_type as usize)?.get(id).copied()
    }

    fn insert(&mut self, node_type: TypeId, id: &str, index: u32) {
        if self.capacity == 0 {
            return;
        }
        if self.entries >= self.capacity {
            for m in &mut self.by_type {
                m.clear();
            }
            self.entries = 0;
        }
        if self.by_type[node_type as usize]
            .insert(id.into(), index)
            .is_none()
        {
            self.entries += 1;
        }
    }
}

const META_SCHEMA: &[u8] = b"Mschema";
const META_NEXT_SEQ: &[u8] = b"Mnext_seq";

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// Options for [`GraphStore::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub cache_capacity_bytes: u64,
    /// Event-id deduplication window in ms; 0 disables.
    pub dedup_window_ms: u64,
    /// Node ids the writer keeps in memory to skip sled reads while interning; 0 disables.
    pub node_cache_entries: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity_bytes: 256 << 20,
            dedup_window_ms: 86_400_000,
            node_cache_entries: 1 << 20,
        }
    }
}

impl GraphStore {
    /// Open (or create) the store at `path` for `schema`. The schema must extend the stored one.
    pub fn open(
        path: &Path,
        schema: &Schema,
        opts: &StoreOptions,
    ) -> Result<GraphStore, StoreError> {
        let wanted = StoredSchema::from_schema(schema);
        Self::open_inner(path, Some(wanted), opts)
    }

    /// Open an existing store with the schema it holds (read-mostly tools: `inspect`).
    pub fn open_existing(path: &Path) -> Result<GraphStore, StoreError> {
        if !path.exists() {
            return Err(StoreError::Corrupt {
                path: path.to_owned(),
                what: "no store here (storage.path)".into(),
            });
        }
        Self::open_inner(path, None, &StoreOptions::default())
    }

    fn open_inner(
        path: &Path,
        wanted: Option<StoredSchema>,
        opts: &StoreOptions,
    ) -> Result<GraphStore, StoreError> {
        let sled_err = |source| StoreError::Sled {
            path: path.to_owned(),
            source,
        };
        let db = open_db(path, opts.cache_capacity_bytes).map_err(sled_err)?;
        let tree = db.open_tree("graph").map_err(sled_err)?;
        let stored: Option<StoredSchema> = match tree.get(META_SCHEMA).map_err(sled_err)? {
            Some(bytes) => Some(
                bincode::serde::decode_from_slice(&bytes, bincode_config())
                    .map(|(s, _)| s)
                    .map_err(|e| StoreError::Corrupt {
                        path: path.to_owned(),
                        what: format!("schema metadata: {e}"),
                    })?,
            ),
            None => None,
        };
        let schema = match (stored, wanted) {
            (Some(old), Some(new)) => {
                old.check_extension(&new)
                    .map_err(|(key, problem)| StoreError::SchemaMismatch {
                        path: path.to_owned(),
                        key,
                        problem,
                    })?;
                new
            }
            (None, Some(new)) => new,
            (Some(old), None) => old,
            (None, None) => {
                return Err(StoreError::Corrupt {
                    path: path.to_owned(),
                    what: "store has no schema (never written by twhin-stream?)".into(),
                })
            }
        };
        let encoded = bincode::serde::encode_to_vec(&schema, bincode_config()).map_err(|e| {
            StoreError::Corrupt {
                path: path.to_owned(),
                what: format!("schema metadata: {e}"),
            }
        })?;
        tree.insert(META_SCHEMA, encoded).map_err(sled_err)?;

        let mut counts = Counts {
            next_seq: 0,
            nodes: vec![0; schema.node_types.len()],
            relations: vec![0; schema.relations.len()],
        };
        if let Some(v) = tree.get(META_NEXT_SEQ).map_err(sled_err)? {
            counts.next_seq = be_u64(&v).ok_or_else(|| corrupt(path, "next_seq"))?;
        }
        for (t, n) in counts.nodes.iter_mut().enumerate() {
            if let Some(v) = tree.get(count_key(t as TypeId)).map_err(sled_err)? {
                *n = be_u32(&v).ok_or_else(|| corrupt(path, "node count"))?;
            }
        }
        for (r, n) in counts.relations.iter_mut().enumerate() {
            if let Some(v) = tree.get(rel_count_key(r as RelId)).map_err(sled_err)? {
                *n = be_u64(&v).ok_or_else(|| corrupt(path, "relation count"))?;
            }
        }
        db.flush().map_err(sled_err)?;
        let schema_len = schema.node_types.len();
        Ok(GraphStore {
            path: path.to_owned(),
            db,
            tree,
            schema,
            counts: RwLock::new(counts),
            writer: Mutex::new(NodeCache {
                by_type: vec![HashMap::new(); schema_len],
                entries: 0,
                capacity: opts.node_cache_entries,
            }),
            dedup_window_ms: opts.dedup_window_ms,
        })
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stored_schema(&self) -> &StoredSchema {
        &self.schema
    }

    /// Append one batch atomically and durably (see the module docs).
    ///
    /// Events at offsets below the stored next offset of their partition are skipped (they are
    /// already stored), as are events whose `event_id` is within the dedup window. The stored
    /// offsets only move forward.
    pub fn append(&self, batch: &AppendBatch) -> Result<AppendOutcome, StoreError> {
        let mut cache = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = self
            .counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = AppendOutcome {
            first_seq: counts.next_seq,
            ..Default::default()
        };
        let mut sled_batch = sled::Batch::default();

        // Offsets as stored before this batch, and as they will be after it.
        let mut stored_next: HashMap<i32, i64> = HashMap::new();
        let mut new_next: HashMap<i32, i64> = HashMap::new();
        for &(p, _) in &batch.next_offsets {
            stored_next
                .entry(p)
                .or_insert(self.stored_offset(&batch.topic, p)?.unwrap_or(-1));
        }
        for e in &batch.events {
            if let std::collections::hash_map::Entry::Vacant(v) = stored_next.entry(e.partition) {
                v.insert(self.stored_offset(&batch.topic, e.partition)?.unwrap_or(-1));
            }
        }

        let mut new_nodes: HashMap<(TypeId, &str), u32> = HashMap::new();
        let mut edge_chunk: Vec<u8> = Vec::with_capacity(batch.events.len() * EDGE_BYTES);
        // The event ids this batch stores, as expiry chunks: (ts u64, len u16, id) each.
        let mut expiry_chunk: Vec<u8> = Vec::new();
        let mut expiry_max_ts = 0u64;
        let mut expiry_chunks = 0u64;
        // (node, rel, dir) → this batch's adjacency entries; BTreeMap so keys go in sorted.
        let mut adjacency: BTreeMap<(NodeRef, RelId, Direction), Vec<u8>> = BTreeMap::new();
        let mut batch_ids: HashSet<&str> = HashSet::new();
        // Expire old ids first: in a sled batch the last write to a key wins, so an id stored
        // again by this batch must be inserted after its expiry.
        if self.dedup_window_ms > 0 {
            let max_ts = batch.events.iter().map(|e| e.event.ts).max().unwrap_or(0);
            if max_ts > 0 {
                self.expire_dedup(max_ts.saturating_sub(self.dedup_window_ms), &mut sled_batch)?;
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
                out.already_stored += 1;
                continue;
            }
            *next = se.offset + 1;
            let ev = &se.event;
            if self.dedup_window_ms > 0 {
                if let Some(id) = ev.event_id.as_deref() {
                    if !batch_ids.insert(id) || self.recently_seen(id, ev.ts)? {
                        out.duplicate_event_ids += 1;
                        continue;
                    }
                    sled_batch.insert(dedup_key(id), &ev.ts.to_be_bytes());
                    expiry_chunk.extend_from_slice(&ev.ts.to_be_bytes());
                    expiry_chunk.extend_from_slice(&(id.len() as u16).to_be_bytes());
                    expiry_chunk.extend_from_slice(id.as_bytes());
                    expiry_max_ts = expiry_max_ts.max(ev.ts);
                    if expiry_chunk.len() >= MAX_CHUNK_BYTES {
                        // Distinct keys: this batch owns the seqs first_seq.., and it appends at
                        // least one edge per expiry chunk.
                        let key = dedup_expiry_key(expiry_max_ts, out.first_seq + expiry_chunks);
                        sled_batch.insert(&key[..], std::mem::take(&mut expiry_chunk));
                        (expiry_max_ts, expiry_chunks) = (0, expiry_chunks + 1);
                    }
                }
            }
            let nodes_before = new_nodes.len();
            let src = self.intern(
                &mut cache,
                &mut counts,
                &mut new_nodes,
                &mut sled_batch,
                ev.src.node_type,
                &ev.src.id,
            )?;
            let dst = self.intern(
                &mut cache,
                &mut counts,
                &mut new_nodes,
                &mut sled_batch,
                ev.dst.node_type,
                &ev.dst.id,
            )?;
            if new_nodes.len() > nodes_before {
                out.node_creating_events.push(position as u32);
            }
            let seq = counts.next_seq;
            counts.next_seq += 1;
            let edge = Edge {
                src,
                rel: ev.rel,
                dst,
                ts: ev.ts,
                weight: ev.weight,
            };
            edge_chunk.extend_from_slice(&edge.encode());
            for (node, dir, other) in [(src, Direction::Out, dst), (dst, Direction::In, src)] {
                let entries = adjacency.entry((node, ev.rel, dir)).or_default();
                entries.extend_from_slice(&seq.to_be_bytes());
                entries.extend_from_slice(&node_bytes(other));
            }
            counts.relations[ev.rel as usize] += 1;
            out.appended += 1;
        }
        out.new_nodes = new_nodes.len() as u64;

        for (i, part) in edge_chunk.chunks(EDGES_PER_CHUNK * EDGE_BYTES).enumerate() {
            let first = out.first_seq + (i * EDGES_PER_CHUNK) as u64;
            sled_batch.insert(&edge_key(first)[..], part);
        }
        if !expiry_chunk.is_empty() {
            let key = dedup_expiry_key(expiry_max_ts, out.first_seq + expiry_chunks);
            sled_batch.insert(&key[..], expiry_chunk);
        }
        for ((node, rel, dir), entries) in adjacency {
            sled_batch.insert(&adjacency_key(node, rel, dir, out.first_seq)[..], entries);
        }
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
                sled_batch.insert(offset_key(&batch.topic, p), &next.to_be_bytes());
            }
        }
        if out.appended > 0 {
            sled_batch.insert(META_NEXT_SEQ, &counts.next_seq.to_be_bytes());
            for (r, n) in counts.relations.iter().enumerate() {
                sled_batch.insert(&rel_count_key(r as RelId)[..], &n.to_be_bytes());
            }
        }

        self.tree
            .apply_batch(sled_batch)
            .map_err(|e| self.sled_err(e))?;
        self.db.flush().map_err(|e| self.sled_err(e))?;
        *self.counts.write().unwrap_or_else(|p| p.into_inner()) = counts;
        // Only now that they are durable may the cache vouch for the new nodes.
        for ((node_type, id), index) in new_nodes {
            cache.insert(node_type, id, index);
        }
        Ok(out)
    }

    fn intern<'e>(
        &self,
        cache: &mut NodeCache,
        counts: &mut Counts,
        new_nodes: &mut HashMap<(TypeId, &'e str), u32>,
        sled_batch: &mut sled::Batch,
        node_type: TypeId,
        id: &'e str,
    ) -> Result<NodeRef, StoreError> {
        if let Some(&index) = new_nodes.get(&(node_type, id)) {
            return Ok(NodeRef { node_type, index });
        }
        if let Some(index) = cache.get(node_type, id) {
            return Ok(NodeRef { node_type, index });
        }
        if let Some(index) = self.node_index(node_type, id)? {
            cache.insert(node_type, id, index);
            return Ok(NodeRef { node_type, index });
        }
        let index = counts.nodes[node_type as usize];
        let next = index.checked_add(1).ok_or_else(|| StoreError::Full {
            path: self.path.clone(),
            what: format!(
                "node type {} has 2^32 nodes",
                self.schema.node_types[node_type as usize]
            ),
        })?;
        counts.nodes[node_type as usize] = next;
        new_nodes.insert((node_type, id), index);
        let node = NodeRef { node_type, index };
        sled_batch.insert(node_key(node_type, id), &index.to_be_bytes());
        sled_batch.insert(&reverse_key(node)[..], id.as_bytes());
        sled_batch.insert(&count_key(node_type)[..], &next.to_be_bytes());
        Ok(node)
    }

    fn recently_seen(&self, id: &str, ts: u64) -> Result<bool, StoreError> {
        Ok(
            match self.tree.get(dedup_key(id)).map_err(|e| self.sled_err(e))? {
                Some(v) => {
                    let seen = be_u64(&v).ok_or_else(|| corrupt(&self.path, "dedup entry"))?;
                    ts.saturating_sub(seen) <= self.dedup_window_ms
                }
                None => false,
            },
        )
    }

    /// Forget event ids of the expiry chunks whose newest id is older than `cutoff`. A chunk
    /// goes whole once all its ids are out of the window (an id may outlive the window by up to
    /// a batch's time span; `recently_seen` ignores it by then anyway). Bounded per batch so a
    /// backlog never stalls ingest.
    fn expire_dedup(&self, cutoff: u64, sled_batch: &mut sled::Batch) -> Result<(), StoreError> {
        const MAX_CHUNKS_PER_BATCH: usize = 16;
        let end = dedup_expiry_key(cutoff, 0);
        for kv in self
            .tree
            .range(&b"Y"[..]..&end[..])
            .take(MAX_CHUNKS_PER_BATCH)
        {
            let (k, chunk) = kv.map_err(|e| self.sled_err(e))?;
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let bad = || corrupt(&self.path, "dedup expiry chunk");
                let ts = rest.get(0..8).and_then(be_u64).ok_or_else(bad)?;
                let len = rest
                    .get(8..10)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
                    .ok_or_else(bad)?;
                let id = rest.get(10..10 + len).ok_or_else(bad)?;
                rest = &rest[10 + len..];
                // Only drop X if it still points at this (old) occurrence.
                let key = dedup_key_bytes(id);
                if let Some(v) = self.tree.get(&key).map_err(|e| self.sled_err(e))? {
                    if be_u64(&v) == Some(ts) {
                        sled_batch.remove(key);
                    }
                }
            }
            sled_batch.remove(k);
        }
        Ok(())
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
        match self
            .tree
            .get(node_key(node_type, id))
            .map_err(|e| self.sled_err(e))?
        {
            Some(v) => Ok(Some(
                be_u32(&v).ok_or_else(|| corrupt(&self.path, "node index"))?,
            )),
            None => Ok(None),
        }
    }

    pub fn node_id(&self, node: NodeRef) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(reverse_key(node))
            .map_err(|e| self.sled_err(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Total number of edges ever appended (also the next sequence number).
    pub fn edge_count(&self) -> u64 {
        self.counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .next_seq
    }

    pub fn node_count(&self, node_type: TypeId) -> u32 {
        self.counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
            .get(node_type as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Edge count per relation id.
    pub fn relation_counts(&self) -> Vec<u64> {
        self.counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .relations
            .clone()
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

    /// Up to `limit` edges with sequence numbers from `cursor` on, in order (the trainer's feed).
    pub fn edges_from(&self, cursor: u64, limit: usize) -> Result<Vec<(u64, Edge)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        let start = match self.chunk_at(cursor)? {
            Some((first, _)) => first,
            None => cursor,
        };
        for kv in self.tree.range(edge_key(start)..=edge_key(u64::MAX)) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            let first = be_u64(&k[1..]).ok_or_else(|| corrupt(&self.path, "edge chunk key"))?;
            for (i, rec) in v.chunks_exact(EDGE_BYTES).enumerate() {
                let seq = first + i as u64;
                if seq < cursor {
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

    /// `n` edges drawn uniformly (with replacement) from the whole log.
    pub fn sample_edges<R: Rng>(&self, rng: &mut R, n: usize) -> Result<Vec<Edge>, StoreError> {
        let total = self.edge_count();
        if total == 0 {
            return Ok(Vec::new());
        }
        (0..n)
            .map(|_| {
                let seq = rng.random_range(0..total);
                self.edge(seq)?
                    .ok_or_else(|| corrupt(&self.path, &format!("edge {seq} missing")))
            })
            .collect()
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

    /// Visit adjacency entries in (relation, direction, seq) order until `visit` returns false.
    fn scan_adjacency(
        &self,
        node: NodeRef,
        rel: Option<RelId>,
        dir: Option<Direction>,
        mut visit: impl FnMut(Neighbor) -> bool,
    ) -> Result<(), StoreError> {
        let mut prefix = Vec::with_capacity(10);
        prefix.push(b'A');
        prefix.extend_from_slice(&node_bytes(node));
        if let Some(r) = rel {
            prefix.extend_from_slice(&r.to_be_bytes());
            if let Some(d) = dir {
                prefix.push(d as u8);
            }
        }
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(|e| self.sled_err(e))?;
            if k.len() != 18 || v.len() % ADJACENCY_ENTRY_BYTES != 0 {
                return Err(corrupt(&self.path, "adjacency chunk"));
            }
            let d = if k[9] == 0 {
                Direction::Out
            } else {
                Direction::In
            };
            if dir.is_some_and(|want| want != d) {
                continue;
            }
            let rel = u16::from_be_bytes([k[7], k[8]]);
            for e in v.chunks_exact(ADJACENCY_ENTRY_BYTES) {
                let n = Neighbor {
                    node: NodeRef {
                        node_type: u16::from_be_bytes([e[8], e[9]]),
                        index: u32::from_be_bytes([e[10], e[11], e[12], e[13]]),
                    },
                    rel,
                    dir: d,
                    seq: u64::from_be_bytes(e[0..8].try_into().expect("chunks_exact")),
                };
                if !visit(n) {
                    return Ok(());
                }
            }
        }
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

fn corrupt(path: &Path, what: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        what: what.to_owned(),
    }
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

fn node_key(node_type: TypeId, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + id.len());
    k.push(b'N');
    k.extend_from_slice(&node_type.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn reverse_key(node: NodeRef) -> [u8; 7] {
    let mut k = [b'I', 0, 0, 0, 0, 0, 0];
    k[1..3].copy_from_slice(&node.node_type.to_be_bytes());
    k[3..7].copy_from_slice(&node.index.to_be_bytes());
    k
}

fn node_bytes(node: NodeRef) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[0..2].copy_from_slice(&node.node_type.to_be_bytes());
    b[2..6].copy_from_slice(&node.index.to_be_bytes());
    b
}

fn count_key(node_type: TypeId) -> [u8; 3] {
    let t = node_type.to_be_bytes();
    [b'C', t[0], t[1]]
}

fn rel_count_key(rel: RelId) -> [u8; 3] {
    let r = rel.to_be_bytes();
    [b'R', r[0], r[1]]
}

fn edge_key(seq: u64) -> [u8; 9] {
    let mut k = [b'E', 0, 0, 0, 0, 0, 0, 0, 0];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Bytes of one adjacency entry: seq u64, other end type u16 and index u32.
const ADJACENCY_ENTRY_BYTES: usize = 14;

fn adjacency_key(node: NodeRef, rel: RelId, dir: Direction, first_seq: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = b'A';
    k[1..7].copy_from_slice(&node_bytes(node));
    k[7..9].copy_from_slice(&rel.to_be_bytes());
    k[9] = dir as u8;
    k[10..18].copy_from_slice(&first_seq.to_be_bytes());
    k
}

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 6);
    k.push(b'O');
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn dedup_key(id: &str) -> Vec<u8> {
    dedup_key_bytes(id.as_bytes())
}

fn dedup_key_bytes(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'X');
    k.extend_from_slice(id);
    k
}

fn dedup_expiry_key(max_ts: u64, first_seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'Y';
    k[1..9].copy_from_slice(&max_ts.to_be_bytes());
    k[9..17].copy_from_slice(&first_seq.to_be_bytes());
    k
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(b'M');
    k.extend_from_slice(name.as_bytes());
    k
}

/// Open sled at `path`. A store closed a moment ago in this process may still be locked while
/// sled's background flusher winds down, so a lock conflict is retried for up to two seconds
/// before it is reported (another process holding the store keeps failing).
fn open_db(path: &Path, cache_capacity_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_bytes)
            .open()
        {
            // sled reports the lock conflict as an `Other` error wrapping `WouldBlock`.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{NodeKey, SchemaConfig};

    fn schema() -> Schema {
        let cfg: SchemaConfig = toml::from_str(
            r#"
            node_types = ["user", "tweet"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = "tweet" },
            ]"#,
        )
        .unwrap();
        Schema::new(&cfg).unwrap()
    }

    fn ev(src: &str, rel: RelId, dst: &str, ts: u64, id: Option<&str>) -> Event {
        let key = |s: &str| {
            let (t, i) = s.split_once(':').unwrap();
            NodeKey {
                node_type: if t == "user" { 0 } else { 1 },
                id: i.into(),
            }
        };
        Event {
            src: key(src),
            rel,
            dst: key(dst),
            ts,
            weight: 1.0,
            event_id: id.map(Into::into),
        }
    }

    fn batch(events: Vec<(i32, i64, Event)>) -> AppendBatch {
        AppendBatch {
            topic: "t".into(),
            events: events
                .into_iter()
                .map(|(partition, offset, event)| SourcedEvent {
                    partition,
                    offset,
                    event,
                })
                .collect(),
            next_offsets: vec![],
        }
    }

    fn open(dir: &Path) -> GraphStore {
        GraphStore::open(dir, &schema(), &StoreOptions::default()).unwrap()
    }

    #[test]
    fn interns_nodes_densely_per_type_and_keeps_edges_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let out = s
            .append(&batch(vec![
                (0, 0, ev("user:a", 0, "user:b", 10, None)),
                (0, 1, ev("user:a", 1, "tweet:x", 11, None)),
                (1, 0, ev("user:c", 1, "tweet:x", 12, None)),
            ]))
            .unwrap();
        assert_eq!((out.appended, out.new_nodes, out.first_seq), (3, 4, 0));
        assert_eq!(
            out.node_creating_events,
            vec![0, 1, 2],
            "each event met a new node"
        );
        assert_eq!(s.node_index(0, "a").unwrap(), Some(0));
        assert_eq!(s.node_index(0, "b").unwrap(), Some(1));
        assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
        assert_eq!(s.node_index(1, "x").unwrap(), Some(0));
        assert_eq!(
            s.node_id(NodeRef {
                node_type: 0,
                index: 2
            })
            .unwrap()
            .as_deref(),
            Some("c")
        );
        assert_eq!(
            (s.node_count(0), s.node_count(1), s.edge_count()),
            (3, 1, 3)
        );
        assert_eq!(s.relation_counts(), vec![1, 2]);
        let edges = s.edges_from(1, 10).unwrap();
        assert_eq!(
            edges.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(edges[1].1.ts, 12);
        assert_eq!(
            edges[1].1.src,
            NodeRef {
                node_type: 0,
                index: 2
            }
        );

        let tweet = NodeRef {
            node_type: 1,
            index: 0,
        };
        let fans = s
            .neighbors(tweet, Some(1), Some(Direction::In), 10)
            .unwrap();
        assert_eq!(
            fans.iter().map(|n| n.node.index).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(s.degree(tweet, 1, Direction::In).unwrap(), 2);
        let a = NodeRef {
            node_type: 0,
            index: 0,
        };
        let all = s.neighbors(a, None, None, 10).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            s.neighbors(a, Some(0), Some(Direction::In), 10)
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            s.offsets().unwrap(),
            vec![("t".to_string(), 0, 2), ("t".to_string(), 1, 1)]
        );
    }

    #[test]
    fn redelivered_offsets_are_skipped_and_offsets_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(&batch(vec![(0, 5, ev("user:a", 0, "user:b", 1, None))]))
            .unwrap();
        // Offsets 3..=5 were already consumed (5 stored; 3 and 4 were invalid events).
        let mut b = batch(vec![
            (0, 5, ev("user:a", 0, "user:b", 1, None)),
            (0, 6, ev("user:b", 0, "user:a", 2, None)),
        ]);
        b.next_offsets = vec![(0, 9), (2, 4)];
        let out = s.append(&b).unwrap();
        assert_eq!((out.appended, out.already_stored), (1, 1));
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(9));
        assert_eq!(s.stored_offset("t", 2).unwrap(), Some(4));
        let mut back = batch(vec![]);
        back.next_offsets = vec![(0, 3)];
        s.append(&back).unwrap();
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(9));
        assert_eq!(s.edge_count(), 2);
    }

    #[test]
    fn a_rebalance_redelivery_inside_one_batch_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // Offsets 0..=2 consumed, then the partition is re-assigned at stored offset 0 and the
        // same messages arrive again before the batch is written.
        let b = batch(vec![
            (0, 0, ev("user:a", 0, "user:b", 1, None)),
            (0, 1, ev("user:b", 0, "user:c", 2, None)),
            (0, 0, ev("user:a", 0, "user:b", 1, None)),
            (0, 1, ev("user:b", 0, "user:c", 2, None)),
            (0, 2, ev("user:c", 0, "user:a", 3, None)),
        ]);
        let out = s.append(&b).unwrap();
        assert_eq!((out.appended, out.already_stored), (3, 2));
        assert_eq!(s.edge_count(), 3);
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(3));
    }

    #[test]
    fn event_ids_dedup_within_the_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = GraphStore::open(
            dir.path(),
            &schema(),
            &StoreOptions {
                dedup_window_ms: 1000,
                ..Default::default()
            },
        )
        .unwrap();
        let out = s
            .append(&batch(vec![
                (0, 0, ev("user:a", 0, "user:b", 100, Some("e1"))),
                (0, 1, ev("user:a", 0, "user:b", 100, Some("e1"))),
                (0, 2, ev("user:a", 0, "user:c", 100, Some("e2"))),
            ]))
            .unwrap();
        assert_eq!((out.appended, out.duplicate_event_ids), (2, 1));
        let out = s
            .append(&batch(vec![(
                0,
                3,
                ev("user:a", 0, "user:b", 900, Some("e1")),
            )]))
            .unwrap();
        assert_eq!(out.duplicate_event_ids, 1);
        // 2000 ms later e1 is outside the window: stored again, and old ids are expired.
        let out = s
            .append(&batch(vec![(
                0,
                4,
                ev("user:a", 0, "user:b", 2100, Some("e1")),
            )]))
            .unwrap();
        assert_eq!(out.appended, 1);
        assert_eq!(
            s.tree.scan_prefix(b"X").count(),
            1,
            "e2 expired, e1 re-stored"
        );
        assert_eq!(s.tree.scan_prefix(b"Y").count(), 1);
        assert_eq!(s.edge_count(), 3);
    }

    #[test]
    fn everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            let mut b = batch(vec![
                (0, 0, ev("user:a", 0, "user:b", 1, Some("x"))),
                (0, 1, ev("user:b", 1, "tweet:t", 2, None)),
            ]);
            b.next_offsets = vec![(0, 3)];
            s.append(&b).unwrap();
        }
        let s = open(dir.path());
        assert_eq!(s.edge_count(), 2);
        assert_eq!(s.node_count(0), 2);
        assert_eq!(s.relation_counts(), vec![1, 1]);
        assert_eq!(s.stored_offset("t", 0).unwrap(), Some(3));
        let out = s
            .append(&batch(vec![(
                0,
                3,
                ev("user:a", 0, "user:c", 3, Some("x")),
            )]))
            .unwrap();
        assert_eq!(out.duplicate_event_ids, 1);
        let out = s
            .append(&batch(vec![(0, 4, ev("user:b", 0, "user:c", 3, None))]))
            .unwrap();
        assert_eq!((out.first_seq, out.new_nodes), (2, 1));
        assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
        drop(s);
        let s = GraphStore::open_existing(dir.path()).unwrap();
        assert_eq!(s.stored_schema().node_types, vec!["user", "tweet"]);
        assert_eq!(s.edge_count(), 3);
    }

    #[test]
    fn schema_may_grow_but_not_change() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let grown: SchemaConfig = toml::from_str(
            r#"
            node_types = ["user", "tweet", "ad"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = ["tweet", "ad"] },
              { name = "clicks", src = "user", dst = "ad" },
            ]"#,
        )
        .unwrap();
        drop(
            GraphStore::open(
                dir.path(),
                &Schema::new(&grown).unwrap(),
                &StoreOptions::default(),
            )
            .unwrap(),
        );
        let swapped: SchemaConfig = toml::from_str(
            r#"
            node_types = ["tweet", "user", "ad"]
            relations = [{ name = "follows", src = "user", dst = "user" }]"#,
        )
        .unwrap();
        let err = GraphStore::open(
            dir.path(),
            &Schema::new(&swapped).unwrap(),
            &StoreOptions::default(),
        )
        .err()
        .expect("reordered types must be refused");
        match err {
            StoreError::SchemaMismatch { key, .. } => assert_eq!(key, "schema.node_types[0]"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_large_batch_spans_several_chunks_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let n = EDGES_PER_CHUNK * 2 + 10;
        let events = (0..n)
            .map(|i| {
                (
                    0,
                    i as i64,
                    ev(
                        &format!("user:{i}"),
                        1,
                        "tweet:x",
                        i as u64,
                        Some(&format!("id-{i}")),
                    ),
                )
            })
            .collect();
        assert_eq!(s.append(&batch(events)).unwrap().appended, n as u64);
        assert_eq!(s.tree.scan_prefix(b"E").count(), 3);
        assert!(
            s.tree.scan_prefix(b"Y").count() > 1,
            "expiry chunks are split too"
        );
        let from = s.edges_from(EDGES_PER_CHUNK as u64 - 2, 5).unwrap();
        let seqs: Vec<u64> = from.iter().map(|(q, _)| *q).collect();
        let first = EDGES_PER_CHUNK as u64 - 2;
        assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>());
        for (seq, e) in from {
            assert_eq!(e.ts, seq, "edge {seq} read from the right chunk");
            assert_eq!(s.edge(seq).unwrap(), Some(e));
        }
        assert_eq!(s.edge(n as u64).unwrap(), None);
    }

    #[test]
    fn samples_stay_in_range() {
        use rand::SeedableRng;
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let events = (0..50)
            .map(|i| {
                (
                    0,
                    i as i64,
                    ev(
                        &format!("user:{i}"),
                        1,
                        &format!("tweet:{}", i % 7),
                        i,
                        None,
                    ),
                )
            })
            .collect();
        s.append(&batch(events)).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let edges = s.sample_edges(&mut rng, 200).unwrap();
        assert_eq!(edges.len(), 200);
        assert!(edges.iter().all(|e| e.rel == 1 && e.dst.index < 7));
        let nodes = s.sample_nodes(&mut rng, 1, 100);
        assert!(nodes.iter().all(|n| n.index < 7));
        let distinct: HashSet<u32> = nodes.iter().map(|n| n.index).collect();
        assert_eq!(
            distinct.len(),
            7,
            "uniform sampling over 100 draws reaches all 7 tweets"
        );
    }
}
