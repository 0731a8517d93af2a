//! What the store keeps in memory beside sled (store format 2): the node interner, the adjacency
//! index and the event-id dedup index. Each is rebuilt at open from what sled holds durably
//! (node-id chunks, the edge log, the dedup expiry chunks), so none of them costs a sled key per
//! edge or per event on the write path.
//!
//! Sizes, for capacity planning: an interned node ≈ 40 bytes plus its id; an adjacency entry 16
//! bytes (an edge has two: one at each end) plus 24 bytes per node; a remembered event id 16
//! bytes (a hash, not the id) in a hash table at most 7/8 full.

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use indexmap::IndexSet;

use crate::schema::{RelId, TypeId};
use crate::store::{Direction, Edge, Neighbor, NodeRef};

/// External id ↔ dense index, per node type: index `i` is the `i`-th id interned. Hashed with
/// foldhash, seeded per process (SipHash cost a third of the writer's time).
#[derive(Debug, Default)]
pub(super) struct Interner {
    by_type: Vec<IndexSet<Box<str>, RandomState>>,
}

impl Interner {
    pub(super) fn new(types: usize) -> Interner {
        Interner {
            by_type: (0..types).map(|_| IndexSet::default()).collect(),
        }
    }

    pub(super) fn index(&self, node_type: TypeId, id: &str) -> Option<u32> {
        self.by_type
            .get(node_type as usize)?
            .get_index_of(id)
            .map(|i| i as u32)
    }

    pub(super) fn id(&self, node: NodeRef) -> Option<&str> {
        self.by_type
            .get(node.node_type as usize)?
            .get_index(node.index as usize)
            .map(|s| &**s)
    }

    /// How many node types it holds ids for.
    pub(super) fn types(&self) -> usize {
        self.by_type.len()
    }

    pub(super) fn count(&self, node_type: TypeId) -> u32 {
        self.by_type
            .get(node_type as usize)
            .map_or(0, |s| s.len() as u32)
    }

    /// Intern `id` as the next index of its type; `Err` with the index it already has.
    pub(super) fn push(&mut self, node_type: TypeId, id: &str) -> Result<u32, u32> {
        let set = &mut self.by_type[node_type as usize];
        let (index, fresh) = set.insert_full(id.into());
        if fresh {
            Ok(index as u32)
        } else {
            Err(index as u32)
        }
    }
}

/// One adjacency entry: the edge's sequence number, the other end, the relation and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AdjacencyEntry {
    seq: u64,
    other_index: u32,
    other_type: TypeId,
    /// relation << 1 | direction
    rel_dir: u16,
}

/// Every node's edges, both directions, in append (sequence) order.
#[derive(Debug, Default)]
pub(super) struct Adjacency {
    by_type: Vec<Vec<Vec<AdjacencyEntry>>>,
}

impl Adjacency {
    pub(super) fn new(types: usize) -> Adjacency {
        Adjacency {
            by_type: vec![Vec::new(); types],
        }
    }

    /// Add both ends of `edge`, appended as `seq` (sequence numbers only grow).
    pub(super) fn add(&mut self, seq: u64, edge: &Edge) {
        for (node, dir, other) in [
            (edge.src, Direction::Out, edge.dst),
            (edge.dst, Direction::In, edge.src),
        ] {
            let rows = &mut self.by_type[node.node_type as usize];
            let i = node.index as usize;
            if rows.len() <= i {
                rows.resize_with(i + 1, Vec::new);
            }
            rows[i].push(AdjacencyEntry {
                seq,
                other_index: other.index,
                other_type: other.node_type,
                rel_dir: edge.rel << 1 | dir as u16,
            });
        }
    }

    /// The sequence numbers of the stored edges `src -rel-> dst`.
    pub(super) fn matching(&self, src: NodeRef, rel: RelId, dst: NodeRef) -> Vec<u64> {
        let mut out = Vec::new();
        self.visit(src, Some(rel), Some(Direction::Out), |n| {
            if n.node == dst {
                out.push(n.seq);
            }
            true
        });
        out
    }

    /// Take edge `seq` out of both its ends' entries.
    pub(super) fn remove(&mut self, seq: u64, src: NodeRef, dst: NodeRef) {
        for node in [src, dst] {
            if let Some(entries) = self
                .by_type
                .get_mut(node.node_type as usize)
                .and_then(|rows| rows.get_mut(node.index as usize))
            {
                entries.retain(|e| e.seq != seq);
            }
        }
    }

    /// Visit `node`'s entries (of `rel` and `dir` when given) in sequence order until `visit`
    /// returns false.
    pub(super) fn visit(
        &self,
        node: NodeRef,
        rel: Option<RelId>,
        dir: Option<Direction>,
        mut visit: impl FnMut(Neighbor) -> bool,
    ) {
        let Some(entries) = self
            .by_type
            .get(node.node_type as usize)
            .and_then(|rows| rows.get(node.index as usize))
        else {
            return;
        };
        for e in entries {
            let (r, d) = (
                e.rel_dir >> 1,
                if e.rel_dir & 1 == 0 {
                    Direction::Out
                } else {
                    Direction::In
                },
            );
            if rel.is_some_and(|want| want != r) || dir.is_some_and(|want| want != d) {
                continue;
            }
            let n = Neighbor {
                node: NodeRef {
                    node_type: e.other_type,
                    index: e.other_index,
                },
                rel: r,
                dir: d,
                seq: e.seq,
            };
            if !visit(n) {
                return;
            }
        }
    }
}

/// Event ids seen within the dedup window, as 84-bit hashes with the event time: 16 bytes an id
/// whatever its length. Two ids share an entry only if 84 bits of two keyed hashes agree (about
/// 1 in 10^25 per lookup), and then the later one overwrites the earlier, which can only let a
/// duplicate through, never drop an event. The hash keys are random per process: the index is
/// rebuilt from the ids themselves at open.
#[derive(Debug, Default)]
pub(super) struct DedupIndex {
    map: HashMap<u64, u64, IdentityHash>,
    hasher: RandomState,
    /// A second, independent seed for the check bits.
    check: RandomState,
}

/// The map's keys are hashes already.
#[derive(Debug, Default, Clone, Copy)]
struct IdentityHash;

impl BuildHasher for IdentityHash {
    type Hasher = IdentityHasher;
    fn build_hasher(&self) -> IdentityHasher {
        IdentityHasher(0)
    }
}

#[derive(Debug, Default)]
struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Low bits of an entry's value holding the second hash; the event time (ms) is above them.
const CHECK_BITS: u32 = 20;
const TS_MAX: u64 = (1 << (64 - CHECK_BITS)) - 1;

impl DedupIndex {
    fn key(&self, id: &[u8]) -> (u64, u64) {
        let a = self.hasher.hash_one(id);
        let b = self.check.hash_one(id);
        (a, b & ((1 << CHECK_BITS) - 1))
    }

    /// When `id` was stored (event time, ms), if it is remembered.
    pub(super) fn seen_at(&self, id: &[u8]) -> Option<u64> {
        let (k, check) = self.key(id);
        let v = *self.map.get(&k)?;
        (v & ((1 << CHECK_BITS) - 1) == check).then_some(v >> CHECK_BITS)
    }

    pub(super) fn insert(&mut self, id: &[u8], ts: u64) {
        let (k, check) = self.key(id);
        self.map.insert(k, ts.min(TS_MAX) << CHECK_BITS | check);
    }

    /// Forget `id` if it is still remembered at `ts` (a newer occurrence stays).
    pub(super) fn remove_at(&mut self, id: &[u8], ts: u64) {
        let (k, check) = self.key(id);
        if self.map.get(&k) == Some(&(ts.min(TS_MAX) << CHECK_BITS | check)) {
            self.map.remove(&k);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interner_gives_dense_indices_and_keeps_them() {
        let mut i = Interner::new(2);
        assert_eq!(i.push(1, "x"), Ok(0));
        assert_eq!(i.push(1, "y"), Ok(1));
        assert_eq!(i.push(1, "x"), Err(0));
        assert_eq!(i.push(0, "x"), Ok(0));
        assert_eq!((i.index(1, "y"), i.index(1, "z")), (Some(1), None));
        let y = NodeRef {
            node_type: 1,
            index: 1,
        };
        assert_eq!((i.id(y), i.count(1), i.count(0)), (Some("y"), 2, 1));
    }

    #[test]
    fn adjacency_filters_by_relation_and_direction_in_sequence_order() {
        let (a, b, c) = (
            NodeRef {
                node_type: 0,
                index: 0,
            },
            NodeRef {
                node_type: 0,
                index: 5,
            },
            NodeRef {
                node_type: 1,
                index: 2,
            },
        );
        let edge = |src, rel, dst| Edge {
            src,
            rel,
            dst,
            ts: 0,
            weight: 1.0,
        };
        let mut adj = Adjacency::new(2);
        adj.add(0, &edge(a, 3, b));
        adj.add(1, &edge(a, 1, c));
        adj.add(2, &edge(b, 3, a));
        let collect = |node, rel, dir| {
            let mut out = Vec::new();
            adj.visit(node, rel, dir, |n: Neighbor| {
                out.push((n.seq, n.node.index, n.rel, n.dir));
                true
            });
            out
        };
        assert_eq!(
            collect(a, None, None),
            vec![
                (0, 5, 3, Direction::Out),
                (1, 2, 1, Direction::Out),
                (2, 5, 3, Direction::In)
            ]
        );
        assert_eq!(
            collect(a, Some(3), Some(Direction::In)),
            vec![(2, 5, 3, Direction::In)]
        );
        assert_eq!(collect(c, None, Some(Direction::In)).len(), 1);
        let unknown = NodeRef {
            node_type: 1,
            index: 99,
        };
        assert!(collect(unknown, None, None).is_empty());
    }

    #[test]
    fn the_dedup_index_remembers_ids_with_their_time() {
        let mut d = DedupIndex::default();
        d.insert(b"e1", 1_000);
        d.insert(b"e2", 2_000);
        assert_eq!(
            (d.seen_at(b"e1"), d.seen_at(b"e2"), d.seen_at(b"e3")),
            (Some(1_000), Some(2_000), None)
        );
        d.insert(b"e1", 5_000);
        d.remove_at(b"e1", 1_000);
        assert_eq!(d.seen_at(b"e1"), Some(5_000), "a newer occurrence stays");
        d.remove_at(b"e1", 5_000);
        assert_eq!((d.seen_at(b"e1"), d.len()), (None, 1));
    }
}
