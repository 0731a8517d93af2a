//! Relation vectors shared by the instances of one deployment (docs/architecture.md §9,
//! "Relation vectors"). Every instance trains every relation on the edges it owns, so no single
//! owner can write a relation vector. Instead a relation's value is the **sum of one cumulative
//! delta per engagements partition**:
//! * each partition's delta has one writer, the partition's owner, and goes out with that
//!   partition's versions under its own key (`relation-delta:<p>`, on partition `p` of the
//!   compacted embeddings topic), so a key's newest record is the whole delta: summing the
//!   newest deltas is order-free and survives compaction;
//! * an instance adds its own learning to one partition it owns, its **home**; the deltas of
//!   its other partitions stay as they were last published;
//! * a delta another instance publishes replaces the one held for its partition, and the
//!   instance's relation vectors move by the difference;
//! * a relation's starting value belongs to its **anchor**, the partition of its key
//!   `relation:<name>` (whose owner publishes the summed vector for subscribers), so that
//!   instances starting together do not each count a starting value.
//!
//! The values are flat: every relation's vector in schema order, then, when the model has them,
//! every reverse operator (`train.reverse_relations`). Nothing here touches a tensor.

use std::collections::BTreeMap;

/// One model's relation parameters as cumulative per-partition deltas (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct RelationShares {
    /// Values per delta.
    width: usize,
    /// Per partition, its delta as last published by its owner, or, for a partition this
    /// instance owns, as last handed to a publication (or as it started). The home's entry is
    /// not part of the sum while it is home (the instance's own learning is).
    held: BTreeMap<i32, Vec<f32>>,
    /// The owned partition this instance's learning goes to.
    home: Option<i32>,
    /// Per owned partition, the delta last handed to a publication.
    handed: BTreeMap<i32, Vec<f32>>,
}

impl RelationShares {
    /// A new model's relation values `values`, each relation's (and its reverse operator's)
    /// belonging to its anchor partition (`anchors`, one per relation, in schema order), every
    /// other partition's delta zero.
    pub fn anchored(values: &[f32], anchors: &[i32], dim: usize) -> RelationShares {
        let mut held: BTreeMap<i32, Vec<f32>> = BTreeMap::new();
        let relations = anchors.len();
        for (r, &anchor) in anchors.iter().enumerate() {
            let delta = held
                .entry(anchor)
                .or_insert_with(|| vec![0.0; values.len()]);
            // The relation's vector, then its reverse operator where the model has one.
            let mut at = r * dim;
            while at + dim <= values.len() {
                delta[at..at + dim].copy_from_slice(&values[at..at + dim]);
                at += relations * dim;
            }
        }
        RelationShares {
            width: values.len(),
            held,
            home: None,
            handed: BTreeMap::new(),
        }
    }

    /// The deltas a checkpoint or the published state held, for a model of `width` values (a
    /// delta of another width, from before relations were added or reverse operators turned
    /// on, is cut or padded with zeros).
    pub fn from_deltas(width: usize, deltas: &BTreeMap<i32, Vec<f32>>) -> RelationShares {
        RelationShares {
            width,
            held: (deltas.iter())
                .map(|(&p, d)| (p, fitted(d, width)))
                .collect(),
            home: None,
            handed: BTreeMap::new(),
        }
    }

    /// Every partition's delta summed: the relation values these deltas make.
    pub fn sum(&self) -> Vec<f32> {
        self.sum_except(None)
    }

    fn sum_except(&self, skip: Option<i32>) -> Vec<f32> {
        let mut sum = vec![0.0; self.width];
        for (&p, delta) in &self.held {
            if Some(p) != skip {
                sum.iter_mut().zip(delta).for_each(|(s, d)| *s += d);
            }
        }
        sum
    }

    /// The deltas held, as a checkpoint keeps them: the home's as last handed on.
    pub fn held(&self) -> &BTreeMap<i32, Vec<f32>> {
        &self.held
    }

    pub fn home(&self) -> Option<i32> {
        self.home
    }

    /// Keep the home while it is owned; otherwise the lowest partition of `owned` (sorted)
    /// becomes it. The learning not yet handed on under the old home stays in the values, so
    /// it goes to the new home's delta, the old home's staying as last published (its new owner
    /// goes on from there).
    pub fn settle_home(&mut self, owned: &[i32]) {
        if self.home.is_some_and(|h| owned.binary_search(&h).is_ok()) {
            return;
        }
        self.home = owned.first().copied();
    }

    /// A delta partition `p`'s owner published. Ignored for a partition this instance owns (it
    /// is the writer; an older owner's late record says less); otherwise it replaces the one
    /// held and `values` move by the difference. Returns whether they moved.
    pub fn receive(&mut self, p: i32, delta: &[f32], owned: &[i32], values: &mut [f32]) -> bool {
        if owned.binary_search(&p).is_ok() {
            return false;
        }
        self.replace(p, delta, values)
    }

    /// The delta of partition `p`, which this instance has just taken over, as its previous
    /// owner last published it: it goes on from there (call before [`Self::settle_home`]).
    pub fn take_over(&mut self, p: i32, delta: &[f32], values: &mut [f32]) -> bool {
        if self.home == Some(p) {
            return false;
        }
        self.replace(p, delta, values)
    }

    fn replace(&mut self, p: i32, delta: &[f32], values: &mut [f32]) -> bool {
        let delta = fitted(delta, self.width);
        let before = self.held.get(&p);
        if before == Some(&delta) || values.len() != self.width {
            return false;
        }
        match before {
            Some(before) => (values.iter_mut().zip(delta.iter().zip(before)))
                .for_each(|(v, (new, old))| *v += new - old),
            None => (values.iter_mut().zip(&delta)).for_each(|(v, new)| *v += new),
        }
        self.held.insert(p, delta);
        true
    }

    /// The deltas of `owned` partitions a version carries: those that changed since they were
    /// last handed on, or all of them (`every`: the version starts partitions over, or the
    /// last one may not have gone out). The home's is `values` less every other delta held.
    /// A partition with no delta (zero, never published) carries none.
    pub fn take(&mut self, owned: &[i32], values: &[f32], every: bool) -> BTreeMap<i32, Vec<f32>> {
        let mut out = BTreeMap::new();
        if values.len() != self.width {
            return out;
        }
        for &p in owned {
            let delta = if self.home == Some(p) {
                let others = self.sum_except(Some(p));
                let own: Vec<f32> = values.iter().zip(&others).map(|(v, o)| v - o).collect();
                self.held.insert(p, own.clone());
                own
            } else {
                match self.held.get(&p) {
                    Some(delta) => delta.clone(),
                    None => continue,
                }
            };
            if every || self.handed.get(&p).is_none_or(|was| moved(was, &delta)) {
                self.handed.insert(p, delta.clone());
                out.insert(p, delta);
            }
        }
        out
    }
}

/// Whether `now` differs from `was` by more than float rounding (the home's share is the
/// values less the others', recomputed after each delta received).
fn moved(was: &[f32], now: &[f32]) -> bool {
    was.len() != now.len()
        || (was.iter().zip(now)).any(|(w, n)| (w - n).abs() > 1e-6 * w.abs().max(1.0))
}

/// `delta` at `width` values: cut, or padded with zeros.
fn fitted(delta: &[f32], width: usize) -> Vec<f32> {
    let mut out = delta[..delta.len().min(width)].to_vec();
    out.resize(width, 0.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two relations of dimension 2, each with a reverse operator: `[r0, r1, rev0, rev1]`.
    const START: [f32; 8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];

    #[test]
    fn a_relation_starts_in_its_anchor_partition_and_the_deltas_sum_to_the_values() {
        let s = RelationShares::anchored(&START, &[3, 0], 2);
        assert_eq!(s.held()[&3], [1.0, 2.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]);
        assert_eq!(s.held()[&0], [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]);
        assert_eq!(s.sum(), START);
        // Without reverse operators.
        let s = RelationShares::anchored(&START[..4], &[1, 1], 2);
        assert_eq!(s.held().len(), 1);
        assert_eq!(s.sum(), START[..4]);
    }

    /// Two instances of four partitions, starting together from the same values: each learns
    /// into its home, hands its deltas on, receives the other's, and both end with the values
    /// one model would hold (the start once, plus both instances' learning).
    #[test]
    fn two_instances_merge_their_learning_order_free() {
        let start = [1.0, 1.0, 2.0, 2.0];
        let anchors = [0, 3];
        let (a_owns, b_owns) = ([0, 1], [2, 3]);
        let mut a = RelationShares::anchored(&start, &anchors, 2);
        let mut b = RelationShares::anchored(&start, &anchors, 2);
        a.settle_home(&a_owns);
        b.settle_home(&b_owns);
        assert_eq!((a.home(), b.home()), (Some(0), Some(2)));
        let (mut va, mut vb) = (start.to_vec(), start.to_vec());
        // Each trains: a moves relation 0, b relation 1.
        va[0] += 0.5;
        vb[3] -= 0.25;
        let from_a = a.take(&a_owns, &va, false);
        let from_b = b.take(&b_owns, &vb, false);
        // a's home carries the anchor's start and its learning; b's anchor (3) its start, its
        // home (2) only its learning.
        assert_eq!(from_a[&0], [1.5, 1.0, 0.0, 0.0]);
        assert_eq!(from_b[&3], [0.0, 0.0, 2.0, 2.0]);
        assert_eq!(from_b[&2], [0.0, 0.0, 0.0, -0.25]);
        // Delivered in any order, and again (a record read twice).
        for (p, d) in from_b.iter().rev().chain(&from_b) {
            a.receive(*p, d, &a_owns, &mut va);
        }
        for (p, d) in &from_a {
            b.receive(*p, d, &b_owns, &mut vb);
        }
        let one_model = [1.5, 1.0, 2.0, 1.75];
        assert_eq!(va, one_model);
        assert_eq!(vb, one_model);
        // Nothing changed since: nothing to hand on; a version that starts over carries all.
        assert!(a.take(&a_owns, &va, false).is_empty());
        assert_eq!(a.take(&a_owns, &va, true).keys().collect::<Vec<_>>(), [&0]);
        // An owner's own partition is not overwritten by a late record of an older owner.
        assert!(!a.receive(0, &[9.0; 4], &a_owns, &mut va));
        assert_eq!(va, one_model);
    }

    /// An instance that loses its home keeps its learning not yet handed on: it goes to its new
    /// home's delta, and the new owner of the old home goes on from what was published.
    #[test]
    fn learning_not_yet_handed_on_moves_to_the_new_home() {
        let mut a = RelationShares::anchored(&[1.0, 0.0], &[0], 2);
        a.settle_home(&[0, 1]);
        let mut values = vec![1.5, 0.0];
        assert_eq!(a.take(&[0, 1], &values, false)[&0], [1.5, 0.0]);
        values[1] += 0.25; // learnt, not handed on yet
        a.settle_home(&[1]);
        assert_eq!(a.home(), Some(1));
        let out = a.take(&[1], &values, false);
        assert_eq!(out[&1], [0.0, 0.25]);
        // The sum of what is on the topic (0's last published, 1's now) is the values.
        let published: Vec<f32> = (0..2).map(|i| [1.5, 0.0][i] + out[&1][i]).collect();
        assert_eq!(published, values);
        // Taking a partition over adopts its previous owner's delta, moving the values.
        let mut b = RelationShares::anchored(&[1.0, 0.0], &[0], 2);
        b.settle_home(&[2]);
        let mut vb = vec![1.0, 0.0];
        assert!(b.take_over(0, &[1.5, 0.0], &mut vb));
        assert_eq!(vb, [1.5, 0.0]);
    }

    #[test]
    fn deltas_of_another_width_are_cut_or_padded() {
        let deltas = BTreeMap::from([(0, vec![1.0, 2.0]), (1, vec![1.0, 1.0, 1.0, 1.0, 9.0])]);
        let s = RelationShares::from_deltas(4, &deltas);
        assert_eq!(s.sum(), [2.0, 3.0, 1.0, 1.0]);
        let mut values = s.sum();
        let mut s = s;
        assert!(s.receive(2, &[0.5], &[0], &mut values));
        assert_eq!(values, [2.5, 3.0, 1.0, 1.0]);
    }
}
