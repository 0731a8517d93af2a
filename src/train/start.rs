//! A new model started from the published state: the newest whole version's rows, biases and
//! relation vectors, put at the store's indices of their nodes. A trainer without a checkpoint
//! (lost, or an instance that never trained here) then goes on in the coordinates subscribers
//! hold, instead of in new random ones that every downstream model would have to learn again.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::store::{GraphStore, StoreError};
use crate::train::Embeddings;

/// A published version's rows (`crate::publish::VersionTable`, which the daemon reads from the
/// topics): per node type name `(id, values)`, and `(relation name, vector)`.
#[derive(Debug, Clone, Copy)]
pub struct PublishedRows<'a> {
    pub version: u64,
    pub types: &'a BTreeMap<String, Vec<(String, Vec<f32>)>>,
    pub relations: &'a [(String, Vec<f32>)],
    /// Per partition, its share of the relations ([`crate::train::RelationShares`]).
    pub relation_deltas: &'a BTreeMap<i32, Vec<f32>>,
}

/// What a new model took from a published version (`/v1/status` `trainer.started_from`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StartedFrom {
    /// The version taken.
    pub version: u64,
    /// Node rows taken, every type together.
    pub rows: u64,
    /// Published rows of nodes the store does not hold, or of types the schema does not have
    /// (not taken).
    pub unknown: u64,
    /// Relation vectors taken.
    pub relations: u64,
    /// Published rows or relation vectors whose width is not the model's (`train.dim` changed,
    /// or a type's bias turned on or off): not taken, the model starts them anew.
    pub other_width: u64,
}

/// Put `table`'s rows into `model` (a new one, tables empty) at the store's indices of their
/// nodes; a table grows to its highest published index, the rows below it that were not
/// published are placeholders drawn as a new model draws them (N(0, `init_scale`²)), started
/// when their nodes' first edges come. The taken rows have no
/// Adagrad history: each starts as one `history_steps` steps old
/// (`NodeTable::take_without_history`).
pub(crate) fn take_published(
    model: &mut Embeddings,
    store: &GraphStore,
    table: PublishedRows<'_>,
    init_scale: f64,
    history_steps: f64,
) -> Result<StartedFrom, StoreError> {
    let mut out = StartedFrom {
        version: table.version,
        ..StartedFrom::default()
    };
    let (dim, device) = (model.dim, model.device);
    let schema = store.stored_schema();
    let of_unknown_types: usize = (table.types)
        .iter()
        .filter(|(name, _)| !schema.node_types.contains(name))
        .map(|(_, rows)| rows.len())
        .sum();
    out.unknown += of_unknown_types as u64;
    for (t, name) in schema.node_types.iter().enumerate() {
        let Some(rows) = table.types.get(name) else {
            continue;
        };
        let node_table = &mut model.tables[t];
        let width = dim as usize + usize::from(node_table.biased);
        let (mut index, mut values, mut biases) = (Vec::new(), Vec::new(), Vec::new());
        for (id, vector) in rows {
            let Some(i) = store.node_index(t as u16, id)? else {
                out.unknown += 1;
                continue;
            };
            if vector.len() != width {
                out.other_width += 1;
                continue;
            }
            index.push(i64::from(i));
            values.extend_from_slice(&vector[..dim as usize]);
            biases.extend(vector.get(dim as usize).copied());
        }
        let Some(&highest) = index.iter().max() else {
            continue;
        };
        let published: HashSet<i64> = index.iter().copied().collect();
        node_table.grow_reaching(highest + 1, &published, |count| {
            Tensor::randn([count, dim], (Kind::Float, device)) * init_scale
        });
        let k = index.len() as i64;
        let index = Tensor::from_slice(&index).to_device(device);
        let values = Tensor::from_slice(&values).view([k, dim]).to_device(device);
        tch::no_grad(|| {
            let _ = node_table.weights.index_copy_(0, &index, &values);
            if node_table.biased {
                let biases = Tensor::from_slice(&biases).to_device(device);
                let _ = node_table.bias.index_copy_(0, &index, &biases);
            }
        });
        node_table.take_without_history(&index, history_steps);
        out.rows += k as u64;
    }
    for (name, vector) in table.relations {
        let Some(r) = schema.relations.iter().position(|(n, _, _)| n == name) else {
            out.unknown += 1;
            continue;
        };
        if vector.len() != dim as usize {
            out.other_width += 1;
            continue;
        }
        let value = Tensor::from_slice(vector).to_device(device);
        tch::no_grad(|| model.relations.get(r as i64).copy_(&value));
        out.relations += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::test_graph::likes_store;
    use tch::Device;

    /// Rows go to their nodes' store indices (with a biased type's bias, its last value), a
    /// table grows to its highest taken index, relations by name; rows of nodes the store does
    /// not hold, of unknown types or relations, and of another width are counted, not taken.
    #[test]
    fn published_rows_go_to_their_nodes_indices_and_the_rest_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = likes_store(dir.path(), &[("a", "m0"), ("b", "m1"), ("c", "m2")]);
        let (b, m2) = (
            store.node_index(0, "b").unwrap().unwrap() as i64,
            store.node_index(1, "m2").unwrap().unwrap() as i64,
        );

        let mut model = Embeddings::new(2, 1, 2, 0.0, Device::Cpu);
        model.tables[1].biased = true;
        let mut types = BTreeMap::new();
        types.insert(
            "user".to_string(),
            vec![
                ("b".to_string(), vec![1.0, 2.0]),
                ("nobody".to_string(), vec![5.0, 5.0]),
                ("c".to_string(), vec![1.0, 2.0, 3.0]),
            ],
        );
        types.insert(
            "movie".to_string(),
            vec![("m2".to_string(), vec![3.0, 4.0, 0.5])],
        );
        types.insert("robot".to_string(), vec![("r".to_string(), vec![0.0, 0.0])]);
        let relations = vec![
            ("likes".to_string(), vec![0.25, -0.25]),
            ("hates".to_string(), vec![1.0, 1.0]),
        ];
        let rows = PublishedRows {
            version: 7,
            types: &types,
            relations: &relations,
            relation_deltas: &BTreeMap::new(),
        };
        let out = take_published(&mut model, &store, rows, 0.0, 100.0).unwrap();
        assert_eq!(
            out,
            StartedFrom {
                version: 7,
                rows: 2,
                unknown: 3,
                relations: 1,
                other_width: 1,
            }
        );
        let row = |t: usize, i: i64| Vec::<f32>::try_from(model.tables[t].rows().get(i)).unwrap();
        assert_eq!(model.tables[0].len(), b + 1);
        assert_eq!(row(0, b), vec![1.0, 2.0]);
        assert_eq!(model.tables[1].len(), m2 + 1);
        assert_eq!(row(1, m2), vec![3.0, 4.0]);
        assert_eq!(model.tables[1].biases().double_value(&[m2]), 0.5);
        assert_eq!(model.tables[0].state.double_value(&[b]), -100.0);
        assert_eq!(
            Vec::<f32>::try_from(model.relations.get(0)).unwrap(),
            vec![0.25, -0.25]
        );
    }
}
