//! Building a version (pure, on the CPU): which rows it carries, their records, the marker, and
//! the view subscribers will hold once it is applied.
//!
//! A version carries every new row, every row whose relative change from the reference (the
//! version subscribers hold) exceeds `publish.row_threshold`, every row a failed attempt of the
//! same version carried (so that the retry can be applied over that attempt), and all relation
//! vectors. Rows that
//! moved less keep their earlier published values in the view, which is what subscribers have.
//!
//! The daemon builds versions from a [`ModelDelta`] ([`build_delta_version`]): only the rows
//! training wrote since the previous version are compared with the reference; a row not written
//! since is where it was when last compared, and the reference changes only where it was
//! published, so its verdict cannot have changed. This runs on the publication's thread, after
//! training resumed.
//!
//! A published row is the row alone: a history-type node (`train.history_types`, a user composed
//! from its recent items) is composed by whoever scores with it (`/v1/neighbors`, subscribers),
//! from the published rows of its items, so no published value depends on another row. Were a
//! composed row published, its dependents would have to be marked changed with what they are
//! composed of.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::align::AlignFigures;
use crate::config::{Comparator, ValueFormat};
use crate::exchange::{GradientChunk, GradientsApplied};
use crate::publish::rows::in_chunks;
use crate::publish::subscriber::relation_delta_key;
use crate::publish::{
    AttemptRef, Codebooks, CodebooksRecord, RowRef, Scope, VersionMarker, VersionRows,
    CODEBOOKS_PREFIX, CONTRACT,
};
use crate::store::{GraphStore, NodeRef, StoreError};
use crate::train::{ModelDelta, Snapshot, TableDelta};

/// A version ready to produce: its rows (encoded as they are produced), then the marker.
#[derive(Debug, Clone)]
pub struct PreparedVersion {
    pub rows: VersionRows,
    /// Keys of erased nodes, produced with a null value (a tombstone) and the version and epoch
    /// as headers ([`crate::publish::TOMBSTONE_VERSION_HEADER`]); counted in the marker's rows.
    pub tombstones: Vec<String>,
    /// Codebooks the version's coded rows need (`publish.format = "pq"`, a version that carries
    /// every row), produced before the rows; and the key of codebooks no row names any more,
    /// produced as a tombstone. Both counted in the marker's rows.
    pub codebooks: Option<CodebooksRecord>,
    pub retired_codebooks: Option<String>,
    /// The round's marker, unscoped: `rows` counts every record the version produces (in every
    /// partition); [`PreparedVersion::markers`] are what goes out.
    pub marker: VersionMarker,
    /// The embeddings partitions the version covers: its records are theirs, and each gets a
    /// marker (contract 3).
    pub scope: Scope,
    /// Event time (ms) of the newest event the version reflects.
    pub newest_ts: i64,
    /// Every stored edge before this sequence number was trained into the version.
    pub cursor: u64,
    /// The gradients sent with the version to other owners (the gradients topic, in its
    /// transaction): every window taken and not committed yet, each under its own id.
    pub gradients: Arc<Vec<GradientChunk>>,
    /// Per partition the version covers, the windows of other senders its rows include (each
    /// partition's marker carries its own).
    pub gradients_applied: BTreeMap<i32, GradientsApplied>,
}

/// One committed version's parameters as subscribers hold them, on the CPU (what the serving API
/// answers from and what the drift control pulls toward).
pub struct PublishedView {
    pub version: u64,
    pub epoch: u64,
    pub comparator: Comparator,
    /// Per node type (the store's type ids): `[rows, D]`, row `i` being the node of dense index
    /// `i`. Nodes the version does not cover have no row (index ≥ rows).
    pub tables: Vec<Tensor>,
    /// `[relations, D]`, in the store's relation order.
    pub relations: Tensor,
    /// Per node type, the rows' target biases `[rows]` when the type carries one
    /// (`train.bias_types`: added to the score of every row of it as a target); empty or
    /// `None`: no bias.
    pub biases: Vec<Option<Tensor>>,
    /// Per node type and row: event time (ms) of the newest event that touched the row.
    pub row_ts: Vec<Vec<i64>>,
    /// Per node type, the rows (`[k]` Int64) this version published over the previous one, new
    /// rows included; `None`: not known (a view restored at start). The serving indexes update
    /// these rows only ([`crate::serve::AnnIndexes`]).
    pub changed: Option<Vec<Tensor>>,
    /// `publish.format = "pq"`: the node rows as subscribers hold them, coded.
    pub codes: Option<ServedCodes>,
    /// The partitions whose rows the version published (its instance owns them); the other
    /// rows are this instance's copies of rows other owners publish. `None`: not known (a view
    /// restored at start), taken as every partition.
    pub scope: Option<Scope>,
}

/// The served version's node rows as its `pq` subscribers hold them: per node type the codes
/// `[rows, m]` (u8) of the codebooks in force, row `i` being the node of dense index `i`.
pub struct ServedCodes {
    pub codebooks: Codebooks,
    pub tables: Vec<Tensor>,
}

impl ServedCodes {
    pub fn shallow_clone(&self) -> ServedCodes {
        ServedCodes {
            codebooks: self.codebooks.shallow_clone(),
            tables: self.tables.iter().map(Tensor::shallow_clone).collect(),
        }
    }
}

impl PublishedView {
    /// The tables and relation vectors, shared (no copy).
    pub fn params(&self) -> Snapshot {
        Snapshot {
            tables: self.tables.iter().map(Tensor::shallow_clone).collect(),
            relations: self.relations.shallow_clone(),
        }
    }
}

/// What to build.
pub struct VersionRequest<'a> {
    pub version: u64,
    pub epoch: u64,
    pub format: ValueFormat,
    /// Relative change over which a row is republished.
    pub threshold: f64,
    pub comparator: Comparator,
    /// The alignment's figures, for the marker.
    pub align: Option<&'a AlignFigures>,
    /// Nodes erased since the previous version: each gets a tombstone.
    pub tombstones: &'a [NodeRef],
    /// Carry every row of the delta, moved or not (new codebooks code every row again).
    pub every_row: bool,
    /// Per node type, the target biases subscribers hold (`[rows]`), beside the reference's
    /// rows; empty when not known (a reference restored from disk), and then every row of a
    /// biased type goes out.
    pub reference_biases: &'a [Option<Tensor>],
    /// The attempt of the previous version the reference is (the marker's `builds_on`).
    pub builds_on: Option<AttemptRef>,
    /// Per node type, the rows (`[k]` Int64) that failed attempts of this version carried: a
    /// retry carries them again, moved or not, so that it holds every key an earlier attempt
    /// did and a subscriber that applied that attempt can apply the retry over it.
    pub retried_rows: &'a [Tensor],
    /// The partitions whose keys the version carries (a row of another partition is its
    /// owner's to publish; it still enters the view).
    pub scope: &'a Scope,
}

/// What a version built from a delta changes in the view subscribers hold, per node type: the
/// live row count and the published rows `(indices [k] Int64, values [k, D])`, and of a biased
/// type the published rows' biases `[k]`.
pub struct ViewUpdate {
    pub tables: Vec<(i64, Tensor, Tensor)>,
    pub biases: Vec<Option<Tensor>>,
}

impl ViewUpdate {
    /// Per type, the indices of the rows published.
    pub fn changed(&self) -> Vec<Tensor> {
        self.tables
            .iter()
            .map(|(_, i, _)| i.shallow_clone())
            .collect()
    }

    /// The tables after the update: `reference` (rows beyond the live count dropped) with the
    /// published rows written over it. Every row past the reference must be published (new rows
    /// always are); the copy is new, as the previous view may still be served.
    pub fn apply(&self, reference: Option<&Snapshot>) -> anyhow::Result<Vec<Tensor>> {
        tch::no_grad(|| {
            self.tables
                .iter()
                .enumerate()
                .map(|(t, (len, idx, values))| {
                    let dim = values.size()[1];
                    // Uninitialised: rows below `m` are the reference's, the rest all published
                    // (checked below).
                    let out = Tensor::empty([*len, dim], (Kind::Float, Device::Cpu));
                    let m = reference
                        .and_then(|r| r.tables.get(t))
                        .map_or(0, |r| r.size()[0].min(*len));
                    if m > 0 {
                        let r = &reference.expect("m > 0").tables[t];
                        out.narrow(0, 0, m).copy_(&r.narrow(0, 0, m));
                    }
                    let new = idx.ge(m).sum(Kind::Int64).int64_value(&[]);
                    anyhow::ensure!(
                        new == len - m,
                        "type {t}: rows {m}..{len} are new but only {new} of them were taken"
                    );
                    let mut out = out;
                    if idx.numel() > 0 {
                        let _ = out.index_copy_(0, idx, values);
                    }
                    Ok(out)
                })
                .collect()
        })
    }

    /// The target biases after the update, per type: `reference` (what subscribers hold; rows
    /// beyond it are all published) with the published rows' biases written over it.
    pub fn apply_biases(&self, reference: &[Option<Tensor>]) -> Vec<Option<Tensor>> {
        tch::no_grad(|| {
            self.tables
                .iter()
                .zip(&self.biases)
                .enumerate()
                .map(|(t, ((len, idx, _), published))| {
                    let published = published.as_ref()?;
                    let mut out = Tensor::zeros([*len], (Kind::Float, Device::Cpu));
                    if let Some(r) = reference.get(t).and_then(Option::as_ref) {
                        let m = r.size()[0].min(*len);
                        out.narrow(0, 0, m).copy_(&r.narrow(0, 0, m));
                    }
                    if idx.numel() > 0 {
                        let _ = out.index_copy_(0, idx, published);
                    }
                    Some(out)
                })
                .collect()
        })
    }
}

/// Whether each row pair moved: relative change `‖c_i − r_i‖ / ‖r_i‖` over `threshold`, or a
/// non-finite row (`[k]` bool).
fn moved_rows(current: &Tensor, reference: &Tensor, threshold: f64) -> Tensor {
    let change = (current - reference)
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .sqrt();
    let base = reference
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .sqrt()
        .clamp_min(1e-12);
    let rel = change / base;
    rel.gt(threshold).logical_or(&rel.isfinite().logical_not())
}

/// The rows version `req.version` carries from `delta` (see the module docs), encoded, with its
/// marker, and what it changes in the view; `None` when nothing moved past `req.threshold` since
/// `reference`: no node row or bias, no relation vector, and no node was erased.
pub fn build_delta_version(
    store: &GraphStore,
    delta: &ModelDelta,
    reference: Option<&Snapshot>,
    req: &VersionRequest,
) -> Result<Option<(PreparedVersion, ViewUpdate)>, StoreError> {
    let schema = store.stored_schema();
    let width = delta.relations.size()[1] as usize;
    let mut rows = VersionRows::new(req.version, req.epoch, req.format, width);
    let mut newest = 0i64;
    let mut update = Vec::with_capacity(delta.tables.len());
    let mut biases = Vec::with_capacity(delta.tables.len());
    let erased = erased_nodes(store);
    for (t, table) in delta.tables.iter().enumerate() {
        let against = Against {
            rows: reference.and_then(|r| r.tables.get(t)),
            biases: req.reference_biases.get(t).and_then(Option::as_ref),
            retried: req.retried_rows.get(t),
        };
        let positions = moved_positions(table, &against, req);
        let published = add_type_rows(store, &erased, t, table, &positions, req.scope, &mut rows)?;
        newest = newest.max(published.newest);
        update.push((table.len, published.index, published.values));
        biases.push(published.biases);
    }
    let tombstones = tombstone_keys(store, req.tombstones, req.scope)?;
    // Compared only when no node row or tombstone already makes a version.
    let relations_moved = || {
        reference.is_none_or(|r| {
            r.relations.size() != delta.relations.size()
                || tch::no_grad(|| {
                    let moved = moved_rows(&delta.relations, &r.relations, req.threshold);
                    moved.any().int64_value(&[]) != 0
                })
        })
    };
    if rows.is_empty() && tombstones.is_empty() && !relations_moved() {
        return Ok(None);
    }
    let block =
        rows.add_relation_block(Vec::<f32>::try_from(delta.relations.reshape([-1])).expect("f32"));
    for (r, (name, _, _)) in schema.relations.iter().enumerate() {
        let key = format!("relation:{name}");
        if let Some(p) = req.scope.place(&key) {
            rows.push(VersionRows::row(key, newest, None, block, r).in_partition(p));
        }
    }
    // Each covered partition's share of the relations, when it changed (or the version starts
    // partitions over): on that partition, whatever its key's hash.
    for (&p, share) in &delta.exchange.relation_deltas {
        if req.scope.covers(p) {
            let row = rows.add_wide_row(relation_delta_key(p), newest, share.clone());
            rows.push(row.in_partition(p));
        }
    }
    let marker = VersionMarker {
        contract: CONTRACT,
        version: req.version,
        epoch: req.epoch,
        rows: (rows.len() + tombstones.len()) as u64,
        partition: None,
        partitions: None,
        builds_on: req.builds_on,
        deployment: None,
        http: None,
        gradients_applied: None,
        align: req.align.cloned(),
    };
    Ok(Some((
        PreparedVersion {
            rows,
            tombstones,
            codebooks: None,
            retired_codebooks: None,
            marker,
            scope: req.scope.clone(),
            newest_ts: newest,
            cursor: delta.cursor,
            gradients: Arc::default(),
            gradients_applied: BTreeMap::new(),
        },
        ViewUpdate {
            tables: update,
            biases,
        },
    )))
}

/// What a type's rows are compared with: the rows and biases subscribers hold, and the rows a
/// failed attempt of the version carried (they go out again).
struct Against<'a> {
    rows: Option<&'a Tensor>,
    biases: Option<&'a Tensor>,
    retried: Option<&'a Tensor>,
}

/// Positions in `table` (one type's part of a delta) of the rows the version carries: every one
/// when `req.every_row` or without a reference; otherwise the rows new since the reference and
/// those that moved past `req.threshold` ([`moved_rows`]). A biased type's row counts as moved
/// when the row with its bias appended did, as subscribers hold the two together; when the
/// biases subscribers hold are not known, every row of the type goes out.
fn moved_positions(table: &TableDelta, against: &Against, req: &VersionRequest) -> Vec<i64> {
    tch::no_grad(|| {
        if table.index.numel() == 0 {
            return Vec::new();
        }
        let all = || table.index.ones_like().to_kind(Kind::Bool);
        let moved = match (&table.biases, against.rows, against.biases) {
            _ if req.every_row => all(),
            (_, None, _) | (Some(_), _, None) => all(),
            (None, Some(r), _) => {
                let m = r.size()[0].min(table.len);
                moved_since(&table.index, m, &table.values, r, req.threshold)
            }
            (Some(bias), Some(r), Some(held)) => {
                let m = r.size()[0].min(held.size()[0]).min(table.len);
                let with_bias =
                    |rows: &Tensor, b: &Tensor| Tensor::cat(&[rows, &b.unsqueeze(1)], 1);
                let current = with_bias(&table.values, &bias.index_select(0, &table.index));
                let reference = with_bias(&r.narrow(0, 0, m), &held.narrow(0, 0, m));
                moved_since(&table.index, m, &current, &reference, req.threshold)
            }
        };
        let moved = match against.retried.filter(|r| r.numel() > 0) {
            Some(retried) => moved.logical_or(&carried_before(&table.index, table.len, retried)),
            None => moved,
        };
        Vec::<i64>::try_from(moved.nonzero().view([-1])).expect("positions")
    })
}

/// Per row of `index` (`[k]`, rows of a table of `len`): whether it is one of `retried`.
fn carried_before(index: &Tensor, len: i64, retried: &Tensor) -> Tensor {
    row_mask(len, retried).index_select(0, index)
}

/// `[len]` bool, true at each of `rows` (`[k]` Int64) below `len`.
pub(crate) fn row_mask(len: i64, rows: &Tensor) -> Tensor {
    let rows = rows.masked_select(&rows.lt(len));
    let mut mask = Tensor::zeros([len], (Kind::Bool, Device::Cpu));
    let _ = mask.index_fill_(0, &rows, 1);
    mask
}

/// Per row of `index` (`[k]`, values `current [k, W]`): new (at or past row `m` of
/// `reference [≥m, W]`) or moved past `threshold` from its reference row (`[k]` bool).
fn moved_since(
    index: &Tensor,
    m: i64,
    current: &Tensor,
    reference: &Tensor,
    threshold: f64,
) -> Tensor {
    let old = index.lt(m);
    let idx = index.clamp_max((m - 1).max(0));
    let against = if m > 0 {
        reference.index_select(0, &idx)
    } else {
        current.zeros_like()
    };
    moved_rows(current, &against, threshold)
        .logical_and(&old)
        .logical_or(&old.logical_not())
}

/// One type's published rows: their indices `[k]`, values `[k, D]`, and the newest event time
/// among those that went out.
struct TypeRows {
    index: Tensor,
    values: Tensor,
    /// Of a biased type, the published rows' biases `[k]`.
    biases: Option<Tensor>,
    newest: i64,
}

/// Encode the rows of type `t` at `positions` of `table` into `rows` (erased nodes, rows
/// without an id and rows of partitions outside `scope` left out; all of them are in the
/// returned [`TypeRows`], which the view takes).
fn add_type_rows(
    store: &GraphStore,
    erased: &HashSet<NodeRef>,
    t: usize,
    table: &TableDelta,
    positions: &[i64],
    scope: &Scope,
    rows: &mut VersionRows,
) -> Result<TypeRows, StoreError> {
    let type_name = &store.stored_schema().node_types[t];
    // Under a backlog nearly every changed row moved: then the delta's own tensors are the
    // published rows (no copy of them).
    let (idx, picked) = if positions.len() == table.index.numel() {
        (table.index.shallow_clone(), table.values.shallow_clone())
    } else {
        let pos = Tensor::from_slice(positions);
        (
            table.index.index_select(0, &pos),
            table.values.index_select(0, &pos),
        )
    };
    let index = Vec::<i64>::try_from(&idx).expect("indices");
    let block = rows.add_block(Vec::<f32>::try_from(picked.reshape([-1])).expect("f32 rows"));
    let biases = table
        .biases
        .as_ref()
        .map(|b| Vec::<f32>::try_from(b).expect("f32 biases"));
    // Keys looked up and rows gathered in chunks on all cores (this is the publication's
    // thread, not training's): each chunk's rows in order, then appended in order. They are
    // encoded as they are produced (`VersionRows`).
    let row_ts = &table.ts;
    let gather = |from: usize, to: usize| -> Result<(Vec<RowRef>, i64), StoreError> {
        let mut out = Vec::with_capacity(to - from);
        let mut newest = 0i64;
        for k in from..to {
            let (i, p) = (index[k], positions[k]);
            let node = NodeRef {
                node_type: t as u16,
                index: i as u32,
            };
            if erased.contains(&node) {
                continue;
            }
            let Some(id) = store.node_id(node)? else {
                continue;
            };
            let key = format!("{type_name}:{id}");
            let Some(partition) = scope.place(&key) else {
                continue;
            };
            let ts = row_ts[p as usize];
            newest = newest.max(ts);
            let bias = biases.as_ref().map(|b| b[i as usize]);
            out.push(VersionRows::row(key, ts, bias, block, k).in_partition(partition));
        }
        Ok((out, newest))
    };
    let mut newest = 0i64;
    for part in in_chunks(0, index.len(), gather) {
        let (part, part_newest) = part?;
        newest = newest.max(part_newest);
        rows.extend(part);
    }
    let published_biases = (table.biases.as_ref()).map(|b| b.index_select(0, &idx));
    Ok(TypeRows {
        index: idx,
        values: picked,
        biases: published_biases,
        newest,
    })
}

impl PreparedVersion {
    /// Produce `codebooks` with the version (first), and a tombstone for the key of the codebooks
    /// of epoch `retire`, in every partition the version covers (a subscriber decodes a
    /// partition's coded rows with that partition's codebooks); the markers count both.
    pub fn with_codebooks(&mut self, codebooks: CodebooksRecord, retire: Option<u64>) {
        let per_partition = 1 + u64::from(retire.is_some());
        self.marker.rows += per_partition * self.scope.covered().len() as u64;
        self.retired_codebooks = retire.map(codebooks_key);
        self.codebooks = Some(codebooks);
    }

    /// One marker per partition the version covers (contract 3), each counting that
    /// partition's records: rows, tombstones, codebooks and their retired predecessor.
    pub fn markers(&self) -> Vec<VersionMarker> {
        let mut counts: std::collections::BTreeMap<i32, u64> =
            self.scope.covered().iter().map(|&p| (p, 0)).collect();
        let tombstones = self.tombstones.iter().filter_map(|k| self.scope.place(k));
        for p in self.rows.partitions().chain(tombstones) {
            *counts.entry(p).or_default() += 1;
        }
        let books =
            u64::from(self.codebooks.is_some()) + u64::from(self.retired_codebooks.is_some());
        let partitions = self.scope.partitions() as i32;
        counts
            .into_iter()
            .map(|(p, rows)| VersionMarker {
                rows: rows + books,
                partition: Some(p),
                partitions: Some(partitions),
                gradients_applied: self.gradients_applied.get(&p).cloned(),
                ..self.marker.clone()
            })
            .collect()
    }
}

/// The key of the codebooks of `epoch` on the embeddings topic.
pub(crate) fn codebooks_key(epoch: u64) -> String {
    format!("{CODEBOOKS_PREFIX}{epoch}")
}

/// Every erased node of the store (none of them is published again).
fn erased_nodes(store: &GraphStore) -> HashSet<NodeRef> {
    match store.erased_count() {
        0 => Default::default(),
        _ => store.erasures_since(0).into_iter().collect(),
    }
}

/// The keys (`type:id`) of `nodes`, for their tombstones.
fn tombstone_keys(
    store: &GraphStore,
    nodes: &[NodeRef],
    scope: &Scope,
) -> Result<Vec<String>, StoreError> {
    let types = &store.stored_schema().node_types;
    let mut keys = Vec::with_capacity(nodes.len());
    for &node in nodes {
        if let Some(id) = store.node_id(node)? {
            let key = format!("{}:{id}", types[node.node_type as usize]);
            if scope.place(&key).is_some() {
                keys.push(key);
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::RowRecord;
    use crate::schema::{Event, NodeKey};
    use crate::store::testing::{follow, follows_store};
    use crate::store::AppendBatch;
    use crate::train::TableDelta;

    /// Offline: one partition, all of it covered.
    static ONE_PARTITION: std::sync::LazyLock<Scope> = std::sync::LazyLock::new(|| Scope::whole(1));

    /// A store of `n` users (type 0), `u0..u{n-1}`, each following the next.
    fn users(dir: &std::path::Path, n: usize) -> GraphStore {
        let store = follows_store(dir);
        let events = (0..n - 1).map(|i| follow(i, i + 1, i as u64));
        store
            .append(&AppendBatch::from_events("t", 0, events))
            .unwrap();
        store
    }

    /// Version 2 of epoch 1 at a 1% threshold, nothing erased, against `held` biases.
    fn request(held: &[Option<Tensor>]) -> VersionRequest<'_> {
        VersionRequest {
            version: 2,
            epoch: 1,
            format: ValueFormat::F32le,
            threshold: 0.01,
            comparator: Comparator::Dot,
            align: None,
            tombstones: &[],
            every_row: false,
            reference_biases: held,
            builds_on: None,
            retried_rows: &[],
            scope: &ONE_PARTITION,
        }
    }

    /// Every one of `n` users' rows changed (to ones), one relation, nothing exchanged.
    fn every_user_changed(n: i64) -> ModelDelta {
        ModelDelta {
            tables: vec![TableDelta {
                len: n,
                index: Tensor::arange(n, (Kind::Int64, Device::Cpu)),
                values: Tensor::ones([n, 2], (Kind::Float, Device::Cpu)),
                ts: vec![5; n as usize],
                biases: None,
            }],
            relations: Tensor::ones([1, 2], (Kind::Float, Device::Cpu)),
            samples: Vec::new(),
            cursor: n as u64 - 1,
            exchange: Default::default(),
        }
    }

    #[test]
    fn a_version_carries_the_keys_of_its_partitions_and_marks_each_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = users(dir.path(), 10);
        let delta = every_user_changed(10);
        let scope = Scope::owned(
            4,
            &crate::partition::Owned {
                generation: 7,
                partitions: vec![0, 2],
            },
        );
        let req = VersionRequest {
            scope: &scope,
            builds_on: Some(AttemptRef {
                version: 1,
                epoch: 1,
            }),
            ..request(&[])
        };
        let (mut prepared, update) = build_delta_version(&store, &delta, None, &req)
            .unwrap()
            .unwrap();
        let all = (0..10)
            .map(|i| format!("user:u{i}"))
            .chain(["relation:follows".into()]);
        let place = |k: &str| crate::partition::partition_of(k.as_bytes(), 4) as i32;
        let ours: Vec<String> = all.filter(|k| [0, 2].contains(&place(k))).collect();
        assert!(!ours.is_empty() && ours.len() < 11, "{ours:?}");
        assert_eq!(prepared.rows.keys().collect::<Vec<_>>(), ours);
        assert!((prepared.rows.keys().zip(prepared.rows.partitions())).all(|(k, p)| place(k) == p));
        let count = |p| ours.iter().filter(|k| place(k) == p).count() as u64;
        let marks = |v: &PreparedVersion| {
            (v.markers().iter())
                .map(|m| {
                    (
                        m.partition,
                        m.partitions,
                        m.rows,
                        m.builds_on.map(|a| a.version),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            marks(&prepared),
            [
                (Some(0), Some(4), count(0), Some(1)),
                (Some(2), Some(4), count(2), Some(1))
            ],
            "one marker per partition covered, each counting that partition's records"
        );
        // Rows of other partitions are their owners' to publish, but the view takes them all.
        assert_eq!(update.changed()[0].numel(), 10);
        // Codebooks (and the retired ones' tombstone) go to every partition covered.
        let books = CodebooksRecord {
            version: 2,
            epoch: 1,
            table: crate::publish::PqTable {
                epoch: 2,
                subspaces: 1,
                sub_dim: 2,
                centroids: vec![0.0; 512],
            },
        };
        prepared.with_codebooks(books, Some(1));
        assert_eq!(
            marks(&prepared),
            [
                (Some(0), Some(4), count(0) + 2, Some(1)),
                (Some(2), Some(4), count(2) + 2, Some(1))
            ]
        );
        assert_eq!(prepared.marker.rows, ours.len() as u64 + 4);
    }

    /// A partition's share of the relations goes out on that partition, whatever its key's
    /// hash, as one row of every relation's values; a partition the version does not cover
    /// carries none.
    #[test]
    fn a_version_carries_its_partitions_relation_shares_on_their_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let store = users(dir.path(), 4);
        let share = vec![0.5f32, -1.0, 2.0, 4.0];
        let mut delta = every_user_changed(4);
        delta.exchange.relation_deltas = [(2, share.clone()), (1, vec![9.0; 4])].into();
        let owned = crate::partition::Owned {
            generation: 1,
            partitions: vec![0, 2],
        };
        let scope = Scope::owned(4, &owned);
        let req = VersionRequest {
            scope: &scope,
            ..request(&[])
        };
        let (prepared, _) = build_delta_version(&store, &delta, None, &req)
            .unwrap()
            .unwrap();
        let rows: Vec<(&str, i32)> = (prepared.rows.keys().zip(prepared.rows.partitions()))
            .filter(|(k, _)| k.starts_with("relation-delta:"))
            .collect();
        assert_eq!(rows, [("relation-delta:2", 2)]);
        let at = prepared
            .rows
            .keys()
            .position(|k| k == "relation-delta:2")
            .unwrap();
        let record = RowRecord::decode(&prepared.rows.encode(at)).unwrap();
        assert_eq!((record.version, record.vector), (req.version, share));
        let marked: u64 = prepared.markers().iter().map(|m| m.rows).sum();
        assert_eq!(
            marked,
            prepared.rows.len() as u64,
            "counted in its partition's marker"
        );
    }

    #[test]
    fn a_delta_version_carries_the_moved_and_new_rows_of_the_delta_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = users(dir.path(), 10);
        let reference = Snapshot {
            tables: vec![Tensor::ones([8, 2], (Kind::Float, Device::Cpu))],
            relations: Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
        };
        // Row 1 moved 50%, row 3 0.1%; rows 8 and 9 are new. Rows not in the delta did not move.
        let values =
            Tensor::from_slice(&[1.5f32, 1.5, 1.001, 1.0, 7.0, 7.0, 9.0, 9.0]).view([4, 2]);
        let delta = |index: &[i64], values: &Tensor| ModelDelta {
            tables: vec![TableDelta {
                len: 10,
                index: Tensor::from_slice(index),
                values: values.shallow_clone(),
                ts: vec![5; index.len()],
                biases: None,
            }],
            relations: Tensor::ones([1, 2], (Kind::Float, Device::Cpu)),
            samples: Vec::new(),
            cursor: 9,
            exchange: Default::default(),
        };
        let req = request(&[]);
        let d = delta(&[1, 3, 8, 9], &values);
        let (prepared, update) = build_delta_version(&store, &d, Some(&reference), &req)
            .unwrap()
            .unwrap();
        let keys: Vec<&str> = prepared.rows.keys().collect();
        assert_eq!(keys, ["user:u1", "user:u8", "user:u9", "relation:follows"]);
        assert_eq!(prepared.marker.rows, 4);
        assert_eq!(prepared.cursor, 9);
        let row = RowRecord::decode(&prepared.rows.encode(0)).unwrap();
        assert_eq!((row.version, row.ts, row.vector), (2, 5, vec![1.5, 1.5]));
        let view = update.apply(Some(&reference)).unwrap();
        let v = Vec::<f32>::try_from(view[0].reshape([-1])).unwrap();
        assert_eq!(&v[2..4], &[1.5, 1.5], "row 1 published");
        assert_eq!(&v[6..8], &[1.0, 1.0], "row 3 keeps what subscribers hold");
        assert_eq!(&v[16..], &[7.0, 7.0, 9.0, 9.0], "new rows");
        // A delta that misses a new row cannot make a view.
        let short = delta(&[1, 8], &values.narrow(0, 0, 2));
        let (_, update) = build_delta_version(&store, &short, Some(&reference), &req)
            .unwrap()
            .unwrap();
        assert!(update.apply(Some(&reference)).is_err());
        // Nothing moved over the threshold, rows or relations: no version.
        let still = |relations: Tensor| {
            let d = delta(&[3], &values.narrow(0, 1, 1));
            ModelDelta {
                tables: vec![TableDelta {
                    len: 8,
                    ..d.tables.into_iter().next().unwrap()
                }],
                relations,
                ..d
            }
        };
        let unmoved = still(reference.relations.copy());
        assert!(
            build_delta_version(&store, &unmoved, Some(&reference), &req)
                .unwrap()
                .is_none()
        );
        // The relation vectors alone moving past it make a version of them.
        let turned = still(Tensor::ones([1, 2], (Kind::Float, Device::Cpu)));
        let (prepared, _) = build_delta_version(&store, &turned, Some(&reference), &req)
            .unwrap()
            .unwrap();
        assert_eq!(
            prepared.rows.keys().collect::<Vec<_>>(),
            ["relation:follows"]
        );
    }

    /// A biased type's row goes out when the row or its bias moved past the threshold (the two
    /// as subscribers hold them), not in every version; the view's biases are what subscribers
    /// hold. Without the biases subscribers hold, every row goes out.
    #[test]
    fn a_biased_types_rows_go_out_only_when_the_row_or_its_bias_moved() {
        let dir = tempfile::tempdir().unwrap();
        let store = users(dir.path(), 4);
        let cpu = (Kind::Float, Device::Cpu);
        let reference = Snapshot {
            tables: vec![Tensor::ones([4, 2], cpu)],
            relations: Tensor::zeros([1, 2], cpu),
        };
        let held = vec![Some(Tensor::zeros([4], cpu))];
        // A biased type's delta carries every row. Row 1 moved 50%, row 2's bias by 0.5.
        let delta = |values: &[f32], biases: &[f32]| ModelDelta {
            tables: vec![TableDelta {
                len: 4,
                index: Tensor::from_slice(&[0i64, 1, 2, 3]),
                values: Tensor::from_slice(values).view([4, 2]),
                ts: vec![5; 4],
                biases: Some(Tensor::from_slice(biases)),
            }],
            relations: reference.relations.copy(),
            samples: Vec::new(),
            cursor: 3,
            exchange: Default::default(),
        };
        let moved = delta(
            &[1.0, 1.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0],
            &[0.0, 0.0, 0.5, 0.0],
        );
        let (prepared, update) =
            build_delta_version(&store, &moved, Some(&reference), &request(&held))
                .unwrap()
                .unwrap();
        let keys: Vec<&str> = prepared.rows.keys().collect();
        assert_eq!(keys, ["user:u1", "user:u2", "relation:follows"]);
        let biases = update.apply_biases(&held);
        let b = Vec::<f32>::try_from(biases[0].as_ref().unwrap()).unwrap();
        assert_eq!(b, [0.0, 0.0, 0.5, 0.0]);
        // Nothing moved: no version, however often the delta carries the type's rows.
        let still = delta(&[1.0; 8], &[0.0; 4]);
        assert!(
            build_delta_version(&store, &still, Some(&reference), &request(&held))
                .unwrap()
                .is_none()
        );
        // Biases subscribers hold not known (a reference restored from disk): every row.
        let (prepared, _) = build_delta_version(&store, &still, Some(&reference), &request(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(prepared.rows.len(), 5);
    }

    /// An erased node's row never goes out again; the version after its erasure carries its
    /// tombstone (and is a version even when nothing else moved).
    #[test]
    fn an_erased_node_gets_a_tombstone_and_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = users(dir.path(), 4);
        let erase = Event {
            op: crate::schema::EventOp::Erase,
            src: NodeKey {
                node_type: 0,
                id: "u1".into(),
            },
            rel: 0,
            dst: NodeKey {
                node_type: 0,
                id: "u1".into(),
            },
            ts: 9,
            weight: 0.0,
            event_id: None,
        };
        let batch = AppendBatch::from_events("t", 3, [erase]);
        assert_eq!(store.append(&batch).unwrap().erased, 1);
        let erased = store.erasures_since(0);
        let delta = ModelDelta {
            tables: vec![TableDelta {
                len: 4,
                index: Tensor::from_slice(&[0i64, 1, 2, 3]),
                values: Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)),
                ts: vec![1; 4],
                biases: None,
            }],
            relations: Tensor::ones([1, 2], (Kind::Float, Device::Cpu)),
            samples: Vec::new(),
            cursor: 3,
            exchange: Default::default(),
        };
        let req = |tombstones| VersionRequest {
            version: 1,
            epoch: 1,
            format: ValueFormat::Json,
            threshold: 0.01,
            comparator: Comparator::Dot,
            align: None,
            tombstones,
            every_row: false,
            reference_biases: &[],
            builds_on: None,
            retried_rows: &[],
            scope: &ONE_PARTITION,
        };
        let (prepared, _) = build_delta_version(&store, &delta, None, &req(&erased))
            .unwrap()
            .unwrap();
        let keys: Vec<&str> = prepared.rows.keys().collect();
        assert_eq!(keys, ["user:u0", "user:u2", "user:u3", "relation:follows"]);
        assert_eq!(prepared.tombstones, ["user:u1"]);
        assert_eq!(prepared.marker.rows, 5, "the tombstone counts");
        // The next version: the tombstone went out already, the row still stays out.
        let (later, _) = build_delta_version(&store, &delta, None, &req(&[]))
            .unwrap()
            .unwrap();
        assert!(later.tombstones.is_empty() && later.rows.keys().all(|k| k != "user:u1"));
        // Nothing moved, but an erasure: still a version, carrying the tombstone alone.
        let still = ModelDelta {
            tables: vec![TableDelta {
                len: 4,
                index: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
                values: Tensor::zeros([0, 2], (Kind::Float, Device::Cpu)),
                ts: vec![],
                biases: None,
            }],
            ..delta
        };
        let reference = Snapshot {
            tables: vec![Tensor::zeros([4, 2], (Kind::Float, Device::Cpu))],
            relations: Tensor::ones([1, 2], (Kind::Float, Device::Cpu)),
        };
        let (only, _) = build_delta_version(&store, &still, Some(&reference), &req(&erased))
            .unwrap()
            .unwrap();
        assert_eq!(only.tombstones, ["user:u1"]);
    }

    #[test]
    fn rows_that_moved_past_the_threshold_or_turned_non_finite_go_out() {
        let reference = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]).view([3, 2]);
        // Row 0 moves 5%, row 1 moves 50%, row 2 turns non-finite.
        let current = Tensor::from_slice(&[1.05f32, 0.0, 0.0, 1.5, f32::NAN, 1.0]).view([3, 2]);
        let moved = |threshold| {
            Vec::<bool>::try_from(moved_rows(&current, &reference, threshold)).expect("bools")
        };
        assert_eq!(moved(0.1), vec![false, true, true]);
        assert_eq!(moved(0.01), vec![true, true, true]);
    }
}
