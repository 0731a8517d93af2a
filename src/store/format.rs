//! The store's on-disk format: its version, the upgrade of an older store in place, and reading
//! back at open what the in-memory indexes are built from (node-id chunks, the edge log, the
//! dedup chunks).

use std::path::Path;

use crate::schema::{RelId, TypeId};
use crate::store::keys::*;
use crate::store::memory::{Adjacency, DedupIndex, Interner};
use crate::store::{corrupt, Counts, Edge, Graph, NodeRef, StoreError, StoredSchema, EDGE_BYTES};

/// The format this build writes. 1: one sled key per node, adjacency chunk and event id;
/// 2: chunks only, indexes in memory (see the module docs of [`crate::store`]); 3: erased
/// nodes (`Z` chunks), which a format-2 build would not honour (so it must refuse the store).
pub(super) const STORE_FORMAT: u32 = 3;

const META_FORMAT: &[u8] = b"Mformat";
const META_NEXT_SEQ: &[u8] = crate::store::META_NEXT_SEQ;

/// Node ids per chunk at most (a chunk stays well under sled's blob threshold).
pub(super) const NODE_CHUNK_BYTES: usize = 48 << 10;

fn sled_err(path: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |source| StoreError::Sled {
        path: path.to_owned(),
        source,
    }
}

/// Bring the store at `path` to [`STORE_FORMAT`]: a new store is stamped, a format-1 store is
/// rewritten in one atomic batch (its per-node and per-id keys become chunks, its adjacency and
/// counts are dropped: they are rebuilt in memory), a format-2 store (no erasures yet) is only
/// stamped, a newer format is refused.
pub(super) fn upgrade(
    tree: &sled::Tree,
    path: &Path,
    schema: &StoredSchema,
) -> Result<(), StoreError> {
    let err = sled_err(path);
    let stamp = tree.get(META_FORMAT).map_err(&err)?;
    let stamped = stamp.is_some();
    let format = match stamp {
        Some(v) => be_u32(&v).ok_or_else(|| corrupt(path, "store format"))?,
        // No stamp: format 1 if it holds anything, else a new store.
        None if tree.get(META_NEXT_SEQ).map_err(&err)?.is_some() => 1,
        None => STORE_FORMAT,
    };
    match format {
        STORE_FORMAT if stamped => return Ok(()),
        STORE_FORMAT | 2 => {}
        1 => upgrade_from_1(tree, path, schema)?,
        newer => {
            return Err(StoreError::Format {
                path: path.to_owned(),
                found: newer,
                supported: STORE_FORMAT,
            })
        }
    }
    tree.insert(META_FORMAT, &STORE_FORMAT.to_be_bytes())
        .map_err(&err)?;
    Ok(())
}

fn upgrade_from_1(tree: &sled::Tree, path: &Path, schema: &StoredSchema) -> Result<(), StoreError> {
    let err = sled_err(path);
    let mut batch = sled::Batch::default();
    // Format 1's `C` keys (node counts) are format 2's too: rewritten below.
    for prefix in [b"N", b"C", b"A", b"X"] {
        for k in tree.scan_prefix(prefix).keys() {
            batch.remove(k.map_err(&err)?);
        }
    }
    // Format 1's `I` keys (type, index → one id) become chunks under the key of their first
    // node; removals go first, since in a sled batch the last write to a key wins.
    let mut ids: Vec<(NodeRef, sled::IVec)> = Vec::new();
    for kv in tree.scan_prefix(b"I") {
        let (k, v) = kv.map_err(&err)?;
        let node = (k.len() == 7)
            .then(|| NodeRef {
                node_type: u16::from_be_bytes([k[1], k[2]]),
                index: u32::from_be_bytes([k[3], k[4], k[5], k[6]]),
            })
            .ok_or_else(|| corrupt(path, "format-1 node key"))?;
        batch.remove(k);
        ids.push((node, v));
    }
    for t in 0..schema.node_types.len() as TypeId {
        let mut writer = NodeChunks::new(t, 0);
        for (expected, (node, id)) in ids.iter().filter(|(n, _)| n.node_type == t).enumerate() {
            if node.index as usize != expected {
                return Err(corrupt(
                    path,
                    &format!("format-1 node ids of type {t} skip index {expected}"),
                ));
            }
            let id = std::str::from_utf8(id).map_err(|_| corrupt(path, "format-1 node id"))?;
            writer.push(id, &mut batch);
        }
        writer.finish(&mut batch);
        let count = ids.iter().filter(|(n, _)| n.node_type == t).count() as u32;
        batch.insert(&node_count_key(t)[..], &count.to_be_bytes());
    }
    tree.apply_batch(batch).map_err(&err)?;
    tracing::info!(
        path = %path.display(),
        nodes = ids.len(),
        "store upgraded from format 1 to format {STORE_FORMAT}"
    );
    Ok(())
}

/// Node-id chunks being written for one type: ids of consecutive nodes from `first`.
pub(super) struct NodeChunks {
    node_type: TypeId,
    first: u32,
    count: u32,
    bytes: Vec<u8>,
}

impl NodeChunks {
    pub(super) fn new(node_type: TypeId, first: u32) -> NodeChunks {
        NodeChunks {
            node_type,
            first,
            count: 0,
            bytes: Vec::new(),
        }
    }

    /// Add the next node's id (ids are at most `ingest.max_id_bytes` ≤ 65535 bytes).
    pub(super) fn push(&mut self, id: &str, batch: &mut sled::Batch) {
        self.bytes
            .extend_from_slice(&(id.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(id.as_bytes());
        self.count += 1;
        if self.bytes.len() >= NODE_CHUNK_BYTES {
            self.finish(batch);
        }
    }

    pub(super) fn finish(&mut self, batch: &mut sled::Batch) {
        if self.count > 0 {
            let key = node_chunk_key(NodeRef {
                node_type: self.node_type,
                index: self.first,
            });
            batch.insert(&key[..], std::mem::take(&mut self.bytes));
            self.first += self.count;
            self.count = 0;
        }
    }
}

/// The `(ts, id)` entries of a dedup expiry chunk (`Y`) or, with `ts` absent, the ids of a node
/// chunk (`I`), in order.
pub(super) fn chunk_entries<'c>(
    chunk: &'c [u8],
    with_ts: bool,
    path: &Path,
    what: &str,
) -> Result<Vec<(u64, &'c [u8])>, StoreError> {
    let mut out = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let bad = || corrupt(path, what);
        let ts = if with_ts {
            let ts = rest.get(0..8).and_then(be_u64).ok_or_else(bad)?;
            rest = &rest[8..];
            ts
        } else {
            0
        };
        let len = rest
            .get(0..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or_else(bad)?;
        let id = rest.get(2..2 + len).ok_or_else(bad)?;
        rest = &rest[2 + len..];
        out.push((ts, id));
    }
    Ok(out)
}

/// What [`load`] rebuilds.
pub(super) struct Loaded {
    pub counts: Counts,
    pub graph: Graph,
    pub dedup: DedupIndex,
}

/// Read back the counts, the interner (from the node-id chunks), the adjacency (from the edge
/// log) and the dedup index (from the expiry chunks), checking that they agree.
pub(super) fn load(
    tree: &sled::Tree,
    path: &Path,
    schema: &StoredSchema,
) -> Result<Loaded, StoreError> {
    let counts = load_counts(tree, path, schema)?;
    let nodes = load_nodes(tree, path, schema.node_types.len())?;
    let (deleted, delete_chunks) = load_deletions(tree, path)?;
    let (erasures, erased) = load_erasures(tree, path, &nodes)?;
    let adjacency = load_adjacency(tree, path, &counts, &nodes, &deleted)?;
    let dedup = load_dedup(tree, path)?;
    Ok(Loaded {
        counts,
        graph: Graph {
            nodes,
            adjacency,
            deleted,
            delete_chunks,
            erasures,
            erased,
        },
        dedup,
    })
}

type SeqSet = std::collections::HashSet<u64, foldhash::fast::RandomState>;
type NodeSet = std::collections::HashSet<NodeRef, foldhash::fast::RandomState>;

/// The next sequence number and the per-relation edge counts.
fn load_counts(
    tree: &sled::Tree,
    path: &Path,
    schema: &StoredSchema,
) -> Result<Counts, StoreError> {
    let err = sled_err(path);
    let mut counts = Counts {
        next_seq: 0,
        relations: vec![0; schema.relations.len()],
    };
    if let Some(v) = tree.get(META_NEXT_SEQ).map_err(&err)? {
        counts.next_seq = be_u64(&v).ok_or_else(|| corrupt(path, "next_seq"))?;
    }
    for (r, n) in counts.relations.iter_mut().enumerate() {
        if let Some(v) = tree.get(rel_count_key(r as RelId)).map_err(&err)? {
            *n = be_u64(&v).ok_or_else(|| corrupt(path, "relation count"))?;
        }
    }
    Ok(counts)
}

/// The interner. Node-id chunks are read by key, each chunk's length giving the next one's key,
/// up to the count stored beside them: no scan, so a chunk missing from the store is named.
fn load_nodes(tree: &sled::Tree, path: &Path, types: usize) -> Result<Interner, StoreError> {
    let err = sled_err(path);
    let mut nodes = Interner::new(types);
    for t in 0..types as TypeId {
        let count = match tree.get(node_count_key(t)).map_err(&err)? {
            Some(v) => be_u32(&v).ok_or_else(|| corrupt(path, "node count"))?,
            None => 0,
        };
        while nodes.count(t) < count {
            let first = nodes.count(t);
            let key = node_chunk_key(NodeRef {
                node_type: t,
                index: first,
            });
            let chunk = tree.get(key).map_err(&err)?.ok_or_else(|| {
                corrupt(
                    path,
                    &format!("node-id chunk of type {t} at {first} missing ({count} nodes)"),
                )
            })?;
            for (_, id) in chunk_entries(&chunk, false, path, "node chunk")? {
                let id = std::str::from_utf8(id).map_err(|_| corrupt(path, "node id"))?;
                nodes
                    .push(t, id)
                    .map_err(|_| corrupt(path, &format!("node id {id:?} stored twice")))?;
            }
        }
        if nodes.count(t) != count {
            return Err(corrupt(
                path,
                &format!(
                    "node-id chunks of type {t} hold {} ids, the count says {count}",
                    nodes.count(t)
                ),
            ));
        }
    }
    Ok(nodes)
}

/// The deleted edges' sequence numbers, and how many delete chunks there are.
fn load_deletions(tree: &sled::Tree, path: &Path) -> Result<(SeqSet, u64), StoreError> {
    let err = sled_err(path);
    let mut deleted = SeqSet::default();
    let mut delete_chunks = 0u64;
    for kv in tree.scan_prefix(b"D") {
        let (k, v) = kv.map_err(&err)?;
        let chunk = be_u64(&k[1..]).ok_or_else(|| corrupt(path, "delete chunk key"))?;
        if v.len() % 8 != 0 {
            return Err(corrupt(path, &format!("delete chunk {chunk}")));
        }
        deleted.extend(v.chunks_exact(8).map(|b| be_u64(b).expect("8 bytes")));
        delete_chunks = delete_chunks.max(chunk + 1);
    }
    Ok((deleted, delete_chunks))
}

/// The erased nodes, in erasure order and as a set.
fn load_erasures(
    tree: &sled::Tree,
    path: &Path,
    nodes: &Interner,
) -> Result<(Vec<NodeRef>, NodeSet), StoreError> {
    let err = sled_err(path);
    let mut erasures = Vec::new();
    let mut erased = NodeSet::default();
    // Chunk keys are big-endian numbers, so the scan is in erasure order.
    for kv in tree.scan_prefix(b"Z") {
        let (k, v) = kv.map_err(&err)?;
        let chunk = be_u64(&k[1..]).ok_or_else(|| corrupt(path, "erase chunk key"))?;
        if v.len() % 6 != 0 {
            return Err(corrupt(path, &format!("erase chunk {chunk}")));
        }
        for b in v.chunks_exact(6) {
            let node = decode_node(b).expect("6 bytes");
            if node.index >= nodes.count(node.node_type) {
                return Err(corrupt(
                    path,
                    &format!("erase chunk {chunk} names an unknown node"),
                ));
            }
            if erased.insert(node) {
                erasures.push(node);
            }
        }
    }
    Ok((erasures, erased))
}

/// The adjacency of every edge not deleted, from the edge log, which must be contiguous up to
/// `counts.next_seq` and name only known nodes.
fn load_adjacency(
    tree: &sled::Tree,
    path: &Path,
    counts: &Counts,
    nodes: &Interner,
    deleted: &SeqSet,
) -> Result<Adjacency, StoreError> {
    let err = sled_err(path);
    let mut adjacency = Adjacency::new(nodes.types());
    let mut seq = 0u64;
    for kv in tree.range(edge_key(0)..=edge_key(u64::MAX)) {
        let (k, v) = kv.map_err(&err)?;
        let first = be_u64(&k[1..]).ok_or_else(|| corrupt(path, "edge chunk key"))?;
        if first != seq || v.len() % EDGE_BYTES != 0 {
            return Err(corrupt(
                path,
                &format!("edge chunk {first} (expected {seq})"),
            ));
        }
        for rec in v.chunks_exact(EDGE_BYTES) {
            let edge = Edge::decode(rec).ok_or_else(|| corrupt(path, "edge"))?;
            for end in [edge.src, edge.dst] {
                if end.index >= nodes.count(end.node_type) {
                    return Err(corrupt(path, &format!("edge {seq} names an unknown node")));
                }
            }
            if !deleted.contains(&seq) {
                adjacency.add(seq, &edge);
            }
            seq += 1;
        }
    }
    if seq != counts.next_seq {
        return Err(corrupt(
            path,
            &format!(
                "the edge log holds {seq} edges, next_seq says {}",
                counts.next_seq
            ),
        ));
    }
    Ok(adjacency)
}

/// The dedup index, from the expiry chunks.
fn load_dedup(tree: &sled::Tree, path: &Path) -> Result<DedupIndex, StoreError> {
    let err = sled_err(path);
    let mut dedup = DedupIndex::default();
    for kv in tree.scan_prefix(b"Y") {
        let (_, v) = kv.map_err(&err)?;
        for (ts, id) in chunk_entries(&v, true, path, "dedup expiry chunk")? {
            // Chunks are in order of their newest time, so a later occurrence of an id wins.
            if dedup.seen_at(id).is_none_or(|seen| seen <= ts) {
                dedup.insert(id, ts);
            }
        }
    }
    Ok(dedup)
}
