//! Warm start (docs/architecture.md §4): a new node's first row comes from its already-embedded neighbours,
//! each translated by the relation — `e_t − e_r` when the new node is the source of an edge,
//! `e_s + e_r` when it is the target — and averaged. With no embedded neighbour it starts at its
//! type's centroid plus noise (or plain noise for a type with no rows yet). With `shrinkage` k > 0
//! a row resting on n neighbours is pulled toward random initialisation's prior (zero plus noise):
//! `n / (n + k) · mean + k / (n + k) · noise`.

use tch::{Kind, Tensor};

use crate::store::{Direction, GraphStore, NodeRef, StoreError};
use crate::train::Embeddings;

/// Neighbours looked at per new node (the oldest ones: the node's first edges).
const MAX_NEIGHBOURS: usize = 64;

/// Rows (`[k, D]`) for the nodes `indices` of `node_type`, which the model does not hold yet.
pub(crate) fn warm_rows(
    model: &Embeddings,
    store: &GraphStore,
    node_type: u16,
    indices: &[i64],
    init_scale: f64,
    shrinkage: f64,
) -> Result<Tensor, StoreError> {
    let (dim, device) = (model.dim, model.device);
    let table = &model.tables[node_type as usize];
    let noise = || Tensor::randn([dim], (Kind::Float, device)) * init_scale;
    let fallback = table.held_mean();
    let mut rows = Vec::with_capacity(indices.len());
    for &index in indices {
        let node = NodeRef {
            node_type,
            index: index as u32,
        };
        let mut estimates = Vec::new();
        for n in store.neighbors(node, None, None, MAX_NEIGHBOURS)? {
            let other = &model.tables[n.node.node_type as usize];
            // Only neighbours that have a row (the new rows are not in the tables yet).
            if !other.holds(i64::from(n.node.index)) {
                continue;
            }
            let e_other = other.weights.get(n.node.index as i64);
            let e_rel = model.relations.get(n.rel as i64);
            estimates.push(match n.dir {
                // node --rel--> other: e_node + e_rel ≈ e_other
                Direction::Out => e_other - e_rel,
                // other --rel--> node: e_other + e_rel ≈ e_node
                Direction::In => e_other + e_rel,
            });
        }
        rows.push(if estimates.is_empty() {
            match &fallback {
                Some(c) => c + noise(),
                None => noise(),
            }
        } else {
            let n = estimates.len() as f64;
            let mean = Tensor::stack(&estimates, 0).mean_dim(0, false, Kind::Float);
            let w = n / (n + shrinkage);
            // The prior is random initialisation's: zero plus noise.
            mean * w + noise() * (1.0 - w)
        });
    }
    Ok(tch::no_grad(|| Tensor::stack(&rows, 0).detach()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::test_graph::likes_store;
    use tch::Device;

    #[test]
    fn a_new_node_starts_nearer_its_true_neighbours_than_random() {
        let dir = tempfile::tempdir().unwrap();
        // Old user 0 likes movies 0..3; the new user 1 likes movies 0 and 1.
        let likes = [
            ("old", "m0"),
            ("old", "m1"),
            ("old", "m2"),
            ("new", "m0"),
            ("new", "m1"),
        ];
        let store = likes_store(dir.path(), &likes);

        tch::manual_seed(5);
        let mut model = Embeddings::new(2, 1, 8, 0.5, Device::Cpu);
        model.tables[0].grow(1, |n| Tensor::randn([n, 8], (Kind::Float, Device::Cpu)));
        model.tables[1].grow(3, |n| Tensor::randn([n, 8], (Kind::Float, Device::Cpu)));

        let warm = warm_rows(&model, &store, 0, &[1], 0.5, 0.0).unwrap().get(0);
        // The ideal source for its two movies under translation: mean of e_m − e_r.
        let r = model.relations.get(0);
        let ideal = (model.tables[1].weights.get(0) + model.tables[1].weights.get(1)) / 2.0 - &r;
        let random = Tensor::randn([8], (Kind::Float, Device::Cpu)) * 0.5;
        let dist = |x: &Tensor| (x - &ideal).norm().double_value(&[]);
        assert!(dist(&warm) < 1e-5, "warm start is the translated mean");
        assert!(dist(&warm) < dist(&random));
        // Shrinkage k = 1 with two neighbours (and no noise): two thirds of the translated mean.
        let shrunk = warm_rows(&model, &store, 0, &[1], 0.0, 1.0).unwrap().get(0);
        assert!(shrunk.allclose(&(&ideal * (2.0 / 3.0)), 1e-5, 1e-5, false));
        // No embedded neighbour: the type's centroid plus noise, not zeros.
        let cold = warm_rows(&model, &store, 1, &[3], 0.0, 0.0).unwrap().get(0);
        assert!(cold.allclose(
            &model.tables[1].rows().mean_dim(0, false, Kind::Float),
            1e-6,
            1e-6,
            false
        ));
    }
}
