//! Which partition a node belongs to: Kafka's default partitioner on the node's key (`type:id`,
//! the key every event and embedding record already carries), so that every producer, every
//! instance and every subscriber computes the same owner without asking anyone
//! (docs/architecture.md §9).
//!
//! Kafka's Java producer hashes a key with murmur2 (seed `0x9747b28c`) and takes the positive
//! hash modulo the partition count. librdkafka's default (`consistent_random`) is CRC32
//! instead, so a producer on librdkafka must set `partitioner = murmur2_random` to agree; this
//! module is the reference both are checked against.

use crate::schema::TypeId;

/// Kafka's `Utils.murmur2`: the 32-bit MurmurHash2 of `data` with Kafka's seed, as a signed
/// integer (what the Java client computes).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `key` among `partitions` (at least 1), as Kafka's default partitioner
/// assigns a keyed record: `toPositive(murmur2(key)) % partitions`.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions.max(1)
}

/// Where the partitions of a node type's rows come from: each node's key (the store knows it).
pub trait NodePartitions: Send + Sync {
    /// The partition (of `partitions`) of rows `from..to` of type `t`; `None` for a row
    /// without a node.
    fn partitions_of(&self, t: TypeId, from: u32, to: u32, partitions: u32) -> Vec<Option<i32>>;
}

/// Rows whose partitions are looked up at once (one read of the store's graph each).
const LOOKUP_CHUNK: u32 = 65_536;

/// Not looked up yet, and looked up without a node.
const UNKNOWN: i32 = -1;
const NO_NODE: i32 = -2;

/// The partition of each node row as far as it was looked up: a node's partition never changes
/// while the partition count holds, so each row is looked up once, and all are forgotten when
/// the count changes.
#[derive(Debug, Default)]
pub struct PartitionsByRow {
    partitions: u32,
    types: Vec<Vec<i32>>,
    /// Per type: every row below it is looked up ([`PartitionsByRow::first`] looks only
    /// above, so asking for a grown table again costs its new rows).
    known_below: Vec<usize>,
}

impl PartitionsByRow {
    /// Type `t`'s rows, at least `n` of them, after forgetting everything looked up under
    /// another partition count.
    fn rows_of(&mut self, t: TypeId, n: usize, partitions: u32) -> &mut Vec<i32> {
        if self.partitions != partitions {
            self.partitions = partitions;
            self.types.clear();
            self.known_below.clear();
        }
        let t = t as usize;
        if self.types.len() <= t {
            self.types.resize(t + 1, Vec::new());
            self.known_below.resize(t + 1, 0);
        }
        let rows = &mut self.types[t];
        if rows.len() < n {
            rows.resize(n, UNKNOWN);
        }
        rows
    }

    /// The partition of row `row` of type `t` among `partitions` (`None`: no node).
    pub fn of(
        &mut self,
        lookup: &dyn NodePartitions,
        t: TypeId,
        row: u32,
        partitions: u32,
    ) -> Option<i32> {
        let known = self.rows_of(t, row as usize + 1, partitions);
        if known[row as usize] == UNKNOWN {
            let found = lookup.partitions_of(t, row, row + 1, partitions);
            known[row as usize] = found.first().copied().flatten().unwrap_or(NO_NODE);
        }
        Some(known[row as usize]).filter(|&q| q >= 0)
    }

    /// The partitions of rows `0..n` of type `t` (negative: no node), looking up those not
    /// known yet in runs.
    pub fn first(
        &mut self,
        lookup: &dyn NodePartitions,
        t: TypeId,
        n: usize,
        partitions: u32,
    ) -> &[i32] {
        self.rows_of(t, n, partitions);
        let from = self.known_below[t as usize];
        self.known_below[t as usize] = from.max(n);
        let known = &mut self.types[t as usize];
        let mut row = from;
        while row < n {
            if known[row] != UNKNOWN {
                row += 1;
                continue;
            }
            let from = row as u32;
            let mut to = from + 1;
            while (to as usize) < n && known[to as usize] == UNKNOWN && to - from < LOOKUP_CHUNK {
                to += 1;
            }
            let found = lookup.partitions_of(t, from, to, partitions);
            for (i, q) in found.into_iter().enumerate() {
                known[from as usize + i] = q.unwrap_or(NO_NODE);
            }
            row = to as usize;
        }
        &known[..n]
    }
}

/// The engagements partitions this instance owns, as the group's assignments and revocations
/// left them, and a count of the changes: a publication covers the partitions owned when it
/// began, and withholds its markers when the count moved meanwhile (the group gave some of
/// them to another instance, which publishes them from now on).
#[derive(Debug, Default)]
pub struct Ownership {
    state: parking_lot::Mutex<Owned>,
    /// The engagements topic's partition count (0 until the consumer has read it).
    partition_count: std::sync::atomic::AtomicU32,
}

/// One reading of [`Ownership`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Changes so far (each assignment and revocation counts one).
    pub generation: u64,
    /// Sorted, each once.
    pub partitions: Vec<i32>,
}

impl Ownership {
    pub fn assign(&self, partitions: &[i32]) {
        let mut s = self.state.lock();
        s.partitions.extend_from_slice(partitions);
        s.partitions.sort_unstable();
        s.partitions.dedup();
        s.generation += 1;
    }

    pub fn revoke(&self, partitions: &[i32]) {
        let mut s = self.state.lock();
        s.partitions.retain(|p| !partitions.contains(p));
        s.generation += 1;
    }

    pub fn get(&self) -> Owned {
        self.state.lock().clone()
    }

    pub fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    pub fn set_partition_count(&self, partitions: u32) {
        (self.partition_count).store(partitions, std::sync::atomic::Ordering::Relaxed);
    }

    /// The engagements topic's partition count, which places every node (0: not known yet).
    pub fn partition_count(&self) -> u32 {
        (self.partition_count).load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row `i` of type `t` is in partition `(i + t) % partitions`, rows from 100 on have no
    /// node; every row asked for is counted.
    #[derive(Default)]
    struct Counted(parking_lot::Mutex<Vec<(TypeId, u32, u32)>>);

    impl NodePartitions for Counted {
        fn partitions_of(&self, t: TypeId, from: u32, to: u32, n: u32) -> Vec<Option<i32>> {
            self.0.lock().push((t, from, to));
            (from..to)
                .map(|i| (i < 100).then_some(((i + u32::from(t)) % n) as i32))
                .collect()
        }
    }

    /// Each row is looked up once, in runs of the rows not known, and all again under another
    /// partition count.
    #[test]
    fn rows_partitions_are_looked_up_once_per_partition_count() {
        let lookup = Counted::default();
        let mut cache = PartitionsByRow::default();
        assert_eq!(cache.of(&lookup, 1, 5, 4), Some(2));
        assert_eq!(cache.of(&lookup, 1, 5, 4), Some(2));
        assert_eq!(cache.first(&lookup, 1, 8, 4), &[1, 2, 3, 0, 1, 2, 3, 0]);
        assert_eq!(*lookup.0.lock(), vec![(1, 5, 6), (1, 0, 5), (1, 6, 8)]);
        // A grown table: only its new rows.
        assert_eq!(cache.first(&lookup, 1, 10, 4)[8..], [1, 2]);
        assert_eq!(lookup.0.lock().last(), Some(&(1, 8, 10)));
        assert_eq!(cache.of(&lookup, 0, 150, 4), None, "no node");
        assert_eq!(cache.first(&lookup, 1, 8, 3)[..3], [1, 2, 0]);
        assert_eq!(lookup.0.lock().len(), 6);
    }

    /// Kafka's own test vectors (`UtilsTest.testMurmur2`), also what kafka-python 3.0.12 gives.
    #[test]
    fn golden_murmur2_matches_kafka() {
        for (key, hash) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
            ("", 275_646_681),
        ] {
            assert_eq!(murmur2(key.as_bytes()), hash, "{key:?}");
        }
    }

    /// Node keys to partitions of an 8-partition topic, as kafka-python's default partitioner
    /// places them.
    #[test]
    fn golden_node_partitions() {
        for (key, partition) in [
            ("user:42", 5),
            ("tweet:9001", 6),
            ("movie:1", 5),
            ("21", 4),
            ("foobar", 6),
            ("abc", 3),
        ] {
            assert_eq!(partition_of(key.as_bytes(), 8), partition, "{key:?}");
        }
        assert_eq!(partition_of(b"user:42", 1), 0);
        assert_eq!(partition_of(b"user:42", 0), 0, "no partitions reads as one");
    }

    #[test]
    fn ownership_counts_every_change() {
        let o = Ownership::default();
        o.assign(&[3, 1]);
        o.assign(&[2, 1]);
        assert_eq!(
            o.get(),
            Owned {
                generation: 2,
                partitions: vec![1, 2, 3]
            }
        );
        o.revoke(&[2, 9]);
        assert_eq!((o.generation(), o.get().partitions), (3, vec![1, 3]));
    }
}
