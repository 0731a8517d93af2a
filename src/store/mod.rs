//! The durable graph on sled: node interning, the append-only edge log, adjacency (degrees),
//! consumer offsets, event-id deduplication and metadata.
//!
//! Everything lives in one sled tree under one-byte key prefixes, so that one ingest batch — its
//! edges *and* the consumer offsets they cover — is a single atomic `apply_batch`, made durable
//! by one `flush` before [`GraphStore::append`] returns. A crash therefore leaves either the
//! whole batch with its offsets or neither, which is what makes ingest exactly-once.
//!
//! sled pays per key written (several µs each, and on disk tens of bytes of its own), so a batch
//! writes a handful of keys whatever its size (store format 2): its edges as chunks of the log,
//! the ids of the nodes it creates as one chunk per type, the event ids it stores as one chunk,
//! and the offsets. Lookups that need an index keep it in memory, rebuilt at open from those
//! chunks ([`memory`]): node id → index, adjacency (degrees included), and event ids.
//!
//! What each stored byte is for, per edge: 26 bytes of the edge log (below); per event with an
//! id, 10 bytes plus the id in a dedup chunk (until the window expires it); per node, 2 bytes plus
//! its id. Everything else is a constant number of keys per batch or per partition.
//!
//! Key layout (all integers big-endian so that key order is numeric order):
//!
//! | prefix | key                                   | value                     |
//! |--------|---------------------------------------|---------------------------|
//! | `I`    | type u16, index u32 of its first node | the ids of consecutive nodes: len u16, id bytes, each |
//! | `C`    | type u16                              | node count u32 (how far the `I` chunks go) |
//! | `E`    | first seq u64 of the chunk            | [`Edge`]s, 26 bytes each  |
//! | `R`    | rel u16                               | edge count u64            |
//! | `O`    | topic bytes, 0x00, partition i32      | next offset i64           |
//! | `P`    | topic bytes, 0x00, partition i32      | the last consumed record: [`RecordPrint`] (offset i64, ts i64, crc u32) |
//! | `U`    | topic bytes, 0x00, partition i32, source partition i32 | next source offset i64: how far the events forwarded to the partition from that source partition are stored ([`Upstream`]) |
//! | `Y`    | newest ts u64, first seq u64 of the batch | the batch's ids: ts u64, len u16, id |
//! | `D`    | chunk number u64                      | sequence numbers (u64 each) of the edges a batch deleted |
//! | `Z`    | chunk number u64                      | the nodes a batch erased: type u16, index u32 each (format 3) |
//! | `M`    | name                                  | metadata (bincode; `Mformat`: the format, u32) |
//!
//! Format 1 (before 2026-12) also kept `N` (id → index), one `I` key per node, `A` (adjacency
//! chunks) and `X` (one key per event id); [`format::upgrade`] rewrites such a
//! store in place at open.

use parking_lot::{Mutex, RwLock};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::schema::{Event, RelId, Schema, TypeId};

mod append;
mod format;
mod keys;
mod memory;
mod read;
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
    /// The last record of each partition this batch consumed (invalid ones too), stored with
    /// the offsets so an assignment can check that the partition still holds it.
    pub last_records: Vec<(i32, RecordPrint)>,
    /// Next offsets of other topics made durable with the batch: the changelog's, past the
    /// records written for it (`(topic, partition, next offset)`; only moved forward).
    pub extra_offsets: Vec<(String, i32, i64)>,
    /// The changelog records written for this batch, `(topic, partition, first offset, next
    /// offset)`: the store's position there moves to `next` only when it had reached `first`.
    /// Otherwise another instance wrote records in between (the partition moved while this
    /// batch was under way), and a restore from the stored position must still read them.
    pub logged: Vec<(String, i32, i64, i64)>,
    /// Where the batch's events forwarded from other partitions leave those partitions (only
    /// moved forward).
    pub upstream: Vec<Upstream>,
}

/// How far the events forwarded to `partition` (of the batch's topic) from another topic's
/// `source` partition are stored: `next` is the source offset after the last one. Forwarding
/// is at least once; a forwarded event below this position is a copy and is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream {
    pub partition: i32,
    pub source: i32,
    pub next: i64,
}

/// What identifies one Kafka record at an offset: after a topic is recreated (or its data lost)
/// another record sits there. Kept per partition for the last record consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPrint {
    pub offset: i64,
    /// The record's timestamp (ms), -1 when it has none.
    pub ts: i64,
    /// CRC-32 of the key's length and bytes, then the payload's.
    pub crc: u32,
}

impl RecordPrint {
    pub fn of(offset: i64, ts: Option<i64>, key: Option<&[u8]>, payload: Option<&[u8]>) -> Self {
        let mut h = crc32fast::Hasher::new();
        for part in [key, payload] {
            match part {
                Some(b) => {
                    h.update(&(b.len() as u64).to_be_bytes());
                    h.update(b);
                }
                None => h.update(&u64::MAX.to_be_bytes()),
            }
        }
        RecordPrint {
            offset,
            ts: ts.unwrap_or(-1),
            crc: h.finalize(),
        }
    }

    pub(super) fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.offset.to_be_bytes());
        b[8..16].copy_from_slice(&self.ts.to_be_bytes());
        b[16..].copy_from_slice(&self.crc.to_be_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> Option<RecordPrint> {
        (b.len() == 20).then(|| RecordPrint {
            offset: i64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
            ts: i64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            crc: u32::from_be_bytes(b[16..].try_into().expect("4 bytes")),
        })
    }
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
            last_records: vec![],
            extra_offsets: vec![],
            logged: Vec::new(),
            upstream: vec![],
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
    /// Stored edges removed by delete events.
    pub deleted: u64,
    /// Delete events that matched no stored edge.
    pub deletes_unmatched: u64,
    /// Nodes erased by erase events (a node erased again is not counted twice).
    pub erased: u64,
    /// Add events not stored because they name an erased node.
    pub erased_refused: u64,
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
    #[error(
        "store {path}: written in store format {found}, this build reads up to format {supported}: \
         run the twhin-stream that wrote it, or start on a new storage.path and replay the events"
    )]
    Format {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
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
    relations: Vec<u64>,
}

/// The graph store. Cheap to share behind an `Arc`; reads are concurrent, writes serialised.
pub struct GraphStore {
    path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    schema: StoredSchema,
    /// Changed last by a commit, after `graph`: an edge below `next_seq` has its nodes and
    /// adjacency in `graph`.
    counts: RwLock<Counts>,
    graph: RwLock<Graph>,
    /// Held while appending; also holds the dedup index and watermark.
    writer: Mutex<WriterState>,
    dedup_window_ms: u64,
}

/// The in-memory indexes readers share (see [`memory`]).
struct Graph {
    nodes: memory::Interner,
    adjacency: memory::Adjacency,
    /// Sequence numbers of deleted edges (their `D` chunks), skipped by every read.
    deleted: std::collections::HashSet<u64, foldhash::fast::RandomState>,
    /// `D` chunks written so far (the next one's key).
    delete_chunks: u64,
    /// Erased nodes (their `Z` chunks) in the order they were erased, and as a set. An erased
    /// node keeps its index and id (its tombstone's key, and how later events naming it are
    /// recognised) but has no edges, and events naming it are not stored.
    erasures: Vec<NodeRef>,
    erased: std::collections::HashSet<NodeRef, foldhash::fast::RandomState>,
}

/// What the single writer keeps between batches.
struct WriterState {
    dedup: memory::DedupIndex,
    watermark: append::DedupWatermark,
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity_bytes: 256 << 20,
            dedup_window_ms: 86_400_000,
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

        format::upgrade(&tree, path, &schema)?;
        let loaded = format::load(&tree, path, &schema)?;
        db.flush().map_err(sled_err)?;
        Ok(GraphStore {
            path: path.to_owned(),
            db,
            tree,
            schema,
            counts: RwLock::new(loaded.counts),
            graph: RwLock::new(loaded.graph),
            writer: Mutex::new(WriterState {
                dedup: loaded.dedup,
                watermark: Default::default(),
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
}

fn corrupt(path: &Path, what: &str) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        what: what.to_owned(),
    }
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
mod tests;

/// What the unit tests of later stages build on: a fresh store of one node type, `user`, and one
/// relation, `follows` (user → user), and its events.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use crate::schema::{Event, NodeKey, Schema, SchemaConfig};
    use crate::store::{GraphStore, StoreOptions};

    pub(crate) fn follows_store(dir: &Path) -> GraphStore {
        let schema: SchemaConfig = toml::from_str(
            r#"node_types = ["user"]
               relations = [{ name = "follows", src = "user", dst = "user" }]"#,
        )
        .unwrap();
        GraphStore::open(
            dir,
            &Schema::new(&schema).unwrap(),
            &StoreOptions::default(),
        )
        .unwrap()
    }

    /// `user:u{src}` follows `user:u{dst}` at `ts`.
    pub(crate) fn follow(
        src: impl std::fmt::Display,
        dst: impl std::fmt::Display,
        ts: u64,
    ) -> Event {
        let user = |i: String| NodeKey {
            node_type: 0,
            id: format!("u{i}"),
        };
        Event {
            op: Default::default(),
            src: user(src.to_string()),
            rel: 0,
            dst: user(dst.to_string()),
            ts,
            weight: 1.0,
            event_id: None,
        }
    }
}
