//! Which partitions of the embeddings topic a publication covers (contract 3): the engagements
//! partitions its instance owns. A key's embeddings partition is `partition_of(key, P)`, the
//! same partition number that owns the node in the engagements topic, so each partition's
//! owner is the only writer of its records and numbers its versions; a subscriber applies each
//! partition's versions whole (`topics/README.md`).

use crate::partition::{partition_of, Owned};

/// The partitions one publication covers, of `partitions` (the topics' partition count), and
/// the ownership generation it was taken at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    partitions: u32,
    /// Sorted, each once, every one below `partitions`.
    owned: Vec<i32>,
    /// The [`crate::partition::Ownership`] generation the partitions were read at (0: not
    /// from a consumer group, e.g. offline).
    pub generation: u64,
}

impl Scope {
    /// Every partition of `partitions` (one instance that owns them all; offline: 1).
    pub fn whole(partitions: u32) -> Scope {
        let partitions = partitions.max(1);
        Scope {
            partitions,
            owned: (0..partitions as i32).collect(),
            generation: 0,
        }
    }

    /// The partitions `owned` reads, of `partitions`.
    pub fn owned(partitions: u32, owned: &Owned) -> Scope {
        let partitions = partitions.max(1);
        let mut list: Vec<i32> = (owned.partitions.iter().copied())
            .filter(|&p| p >= 0 && (p as u32) < partitions)
            .collect();
        list.sort_unstable();
        list.dedup();
        Scope {
            partitions,
            owned: list,
            generation: owned.generation,
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partitions covered, ascending.
    pub fn covered(&self) -> &[i32] {
        &self.owned
    }

    /// Every partition is covered.
    pub fn is_whole(&self) -> bool {
        self.owned.len() == self.partitions as usize
    }

    /// The partition of `key`'s records when this scope covers it.
    pub fn place(&self, key: &str) -> Option<i32> {
        let p = partition_of(key.as_bytes(), self.partitions) as i32;
        self.covers(p).then_some(p)
    }

    pub fn covers(&self, partition: i32) -> bool {
        self.owned.binary_search(&partition).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_places_only_the_keys_of_its_partitions() {
        let whole = Scope::whole(8);
        assert!(whole.is_whole());
        // Golden: `partition::tests::golden_node_partitions`.
        assert_eq!(whole.place("user:42"), Some(5));
        assert_eq!(whole.place("tweet:9001"), Some(6));
        let part = Scope::owned(
            8,
            &Owned {
                generation: 4,
                partitions: vec![6, 2, 11],
            },
        );
        assert_eq!(part.covered(), &[2, 6], "partition 11 does not exist");
        assert_eq!(
            (part.place("user:42"), part.place("tweet:9001")),
            (None, Some(6))
        );
        assert!(!part.is_whole());
        assert_eq!(
            Scope::whole(0).place("user:42"),
            Some(0),
            "offline: one partition"
        );
    }
}
