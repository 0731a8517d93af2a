//! The trainer's side of the gradient exchange ([`crate::exchange`]): the gradients of rows
//! another instance owns, summed per node until the next version takes them; the window parts
//! other instances sent, applied to the owned rows with this instance's Adagrad state; and the
//! local copies of rows owned elsewhere, replaced by their owners' published rows plus what this
//! instance learned on them that those rows do not include yet.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tracing::warn;

use crate::exchange::{
    ChangedRow, ExchangePosition, GradientInbox, RefreshedRow, WindowAttempt, WindowPart,
};
use crate::partition::partition_of;
use crate::schema::NodeKey;
use crate::store::{GraphStore, NodeRef, StoreError};
use crate::subscriber::{relation_delta_partition, RELATION_PREFIX};
use crate::train::{
    DeltaExchange, Embeddings, GradientTap, NodeTable, OwnedSources, Pull, RelationShares,
};

/// Windows whose local learning is remembered, at most (the newest): an owner's version says it
/// applied a window one or two versions after it was sent, so older ones only matter when an
/// owner stopped applying them, and then they are dropped.
const WINDOWS_REMEMBERED: usize = 4;

/// One node's gradient summed over the steps since the last take.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeGradient {
    pub node: NodeRef,
    pub steps: u32,
    pub grad: Vec<f32>,
    pub bias: Option<f32>,
    /// The row before the window's steps (then its bias), with the first window that names the
    /// node: where its owner starts the row when its store does not know the node.
    pub start: Option<Vec<f32>>,
}

/// The exchange's state in the trainer.
#[derive(Debug)]
pub struct ForeignRows {
    inbox: Arc<GradientInbox>,
    outbox: HashMap<NodeRef, NodeGradient>,
    position: ExchangePosition,
    /// Per node type, the rows known to be owned elsewhere (Bool), and those a tap found since
    /// they were last marked.
    foreign_rows: Vec<Tensor>,
    seen_foreign: Vec<NodeRef>,
    /// Nodes whose starting row went out with a window ([`NodeGradient::start`]).
    announced: HashSet<NodeRef>,
    /// A window part was applied since the last checkpoint (which an idle trainer then still
    /// writes, so that the owner can delete what it applied).
    unsaved: AtomicBool,
    learned: LocalLearning,
    /// The relation vectors as per-partition deltas, once the partition count is known
    /// (`None` before, and after going back to a checkpoint until the next step).
    relations: Option<RelationShares>,
    /// Rows started at a partition's previous owner's published values since the last take:
    /// the next version publishes them whatever they moved (the publication's reference for
    /// them is this instance's old copy, not what subscribers hold).
    taken_over: Vec<NodeRef>,
}

/// What this instance learned on rows owned elsewhere, by window, until their owner's published
/// rows include it. A refreshed copy is the owner's row plus the local change of every window
/// the owner did not apply yet and of the steps since the last window: replacing the copy would
/// drop up to two windows of this instance's learning on it, and adding all of it back would
/// count twice what the owner applied.
#[derive(Debug, Default)]
struct LocalLearning {
    /// Rows touched since their last window or refresh: their value then (the row, then its bias
    /// for a biased type).
    before: HashMap<NodeRef, Vec<f32>>,
    /// The change of each window taken, oldest first, for the rows it touched.
    windows: VecDeque<(WindowAttempt, HashMap<NodeRef, Vec<f32>>)>,
}

impl LocalLearning {
    /// The change of the windows after `includes` for `node`, added to `row`.
    fn add_unapplied(&self, node: NodeRef, includes: Option<WindowAttempt>, row: &mut [f32]) {
        let after = (self.windows.iter()).filter(|(w, _)| includes.is_none_or(|i| *w > i));
        for change in after.filter_map(|(_, changes)| changes.get(&node)) {
            row.iter_mut().zip(change).for_each(|(r, c)| *r += c);
        }
    }
}

impl ForeignRows {
    /// Start from `position` (a checkpoint's; the default for a new model): the follower reads
    /// the gradients topic again from there.
    pub fn new(inbox: Arc<GradientInbox>, position: ExchangePosition) -> ForeignRows {
        inbox.rewind_to(&position);
        ForeignRows {
            inbox,
            outbox: HashMap::new(),
            position,
            foreign_rows: Vec::new(),
            seen_foreign: Vec::new(),
            announced: HashSet::new(),
            unsaved: AtomicBool::new(false),
            learned: LocalLearning::default(),
            relations: None,
            taken_over: Vec::new(),
        }
    }

    pub fn position(&self) -> &ExchangePosition {
        &self.position
    }

    /// A checkpoint holding [`ForeignRows::position`] is written: the gradients below it are
    /// never read again, and the follower deletes them.
    pub fn checkpointed(&self) {
        self.unsaved.store(false, Ordering::Relaxed);
        self.inbox.checkpointed(&self.position);
    }

    /// Edges below this sequence number had their gradients sent with a committed version:
    /// trained again (after going back to a checkpoint), they send none.
    pub fn sent_below(&self) -> u64 {
        self.inbox.sent_below()
    }

    /// Whether a window part was applied since the last checkpoint.
    pub fn unsaved(&self) -> bool {
        self.unsaved.load(Ordering::Relaxed)
    }

    /// The trainer went back to a checkpoint (`position`: its, or the default for none): what
    /// was summed since is undone with the rows, and the windows applied since are read again.
    pub fn went_back(&mut self, position: ExchangePosition) {
        self.outbox.clear();
        self.learned = LocalLearning::default();
        // The windows that carried their starts may not have committed: they go out again.
        self.announced.clear();
        self.position = position;
        self.inbox.rewind_to(&self.position);
        // Made again from the checkpoint's deltas, which its relation vectors sum.
        self.relations = None;
    }

    /// For the next version, sent as `window`: the gradients summed since the last take, and
    /// per owned partition the newest window of each sender applied here. The local change of
    /// the rows those gradients came from is remembered under `window`.
    /// With them, the relation deltas of the `owned` partitions that changed since the last
    /// take (all of them when `every`: the version starts partitions over, or the last may not
    /// have gone out).
    pub fn take_window(
        &mut self,
        model: &Embeddings,
        window: Option<WindowAttempt>,
        (owned, every): (&[i32], bool),
    ) -> DeltaExchange {
        let mut gradients: Vec<NodeGradient> = self.outbox.drain().map(|(_, g)| g).collect();
        gradients.sort_unstable_by_key(|g| g.node);
        let before = std::mem::take(&mut self.learned.before);
        for g in &mut gradients {
            if self.announced.insert(g.node) {
                g.start = before.get(&g.node).cloned();
            }
        }
        if let Some(window) = window.filter(|_| !before.is_empty()) {
            let mut changes = HashMap::with_capacity(before.len());
            for (t, nodes) in by_type(before.keys().copied()) {
                let now = read_rows(&model.tables[t], &nodes);
                let width = now.len() / nodes.len().max(1);
                for (node, now) in nodes.into_iter().zip(now.chunks_exact(width)) {
                    let was = &before[&node];
                    changes.insert(node, now.iter().zip(was).map(|(n, w)| n - w).collect());
                }
            }
            let windows = &mut self.learned.windows;
            match windows.back_mut() {
                // An attempt that published nothing sends its window with the next one's.
                Some((last, into)) if *last == window => {
                    for (node, change) in changes {
                        match into.entry(node) {
                            Entry::Occupied(mut o) => o
                                .get_mut()
                                .iter_mut()
                                .zip(&change)
                                .for_each(|(a, c)| *a += c),
                            Entry::Vacant(v) => {
                                v.insert(change);
                            }
                        }
                    }
                }
                _ => windows.push_back((window, changes)),
            }
            while windows.len() > WINDOWS_REMEMBERED {
                windows.pop_front();
            }
        }
        let relation_deltas = match self.relations.as_mut() {
            Some(shares) => {
                let deltas = shares.take(owned, &model.relation_values(), every);
                self.position.relation_deltas = shares.held().clone();
                deltas
            }
            None => BTreeMap::new(),
        };
        let taken_over = (0..model.tables.len())
            .map(|t| {
                let rows: Vec<i64> = (self.taken_over.iter())
                    .filter(|n| n.node_type as usize == t)
                    .map(|n| i64::from(n.index))
                    .collect();
                Tensor::from_slice(&rows)
            })
            .collect();
        self.taken_over.clear();
        DeltaExchange {
            gradients,
            applied: self.position.newest_applied(),
            relation_deltas,
            taken_over,
        }
    }

    /// The relation deltas of other owners that came since the last step, and those of
    /// partitions taken over (`handed_over`), into the model's relation vectors; the home
    /// follows the ownership. The shares start here once the partition count is known: from
    /// the deltas the checkpoint or the published state held, or, for a new model, with each
    /// relation's start in its anchor partition.
    fn share_relations(
        &mut self,
        model: &mut Embeddings,
        store: &GraphStore,
        sources: &OwnedSources,
        handed_over: BTreeMap<i32, Vec<f32>>,
    ) {
        let ownership = sources.ownership();
        let partitions = ownership.partition_count();
        if partitions == 0 {
            return;
        }
        let owned = sources.owned_now();
        // The checkpoint's position keeps the shares held: copied there whenever they change
        // (here, and when a version takes them), not compared before every step.
        let mut changed = false;
        let shares = self.relations.get_or_insert_with(|| {
            changed = true;
            let values = model.relation_values();
            if self.position.relation_deltas.is_empty() {
                let anchors: Vec<i32> = (store.stored_schema().relations.iter())
                    .map(|(name, _, _)| {
                        let key = format!("{RELATION_PREFIX}{name}");
                        partition_of(key.as_bytes(), partitions) as i32
                    })
                    .collect();
                RelationShares::anchored(&values, &anchors, model.dim as usize)
            } else {
                RelationShares::from_deltas(values.len(), &self.position.relation_deltas)
            }
        });
        let received = self.inbox.take_relation_deltas();
        if !handed_over.is_empty() || !received.is_empty() {
            let mut values = model.relation_values();
            let mut moved = 0;
            for (p, delta) in &handed_over {
                moved += u64::from(shares.take_over(*p, delta, &mut values));
            }
            for (p, delta) in &received {
                moved += u64::from(shares.receive(*p, delta, &owned, &mut values));
            }
            if moved > 0 {
                model.set_relation_values(&values);
                self.inbox.count_relation_deltas(moved);
                changed = true;
            }
        }
        shares.settle_home(&owned);
        if changed {
            self.position.relation_deltas = shares.held().clone();
        }
    }

    /// A tap for one step that sums the gradients of the rows `sources` says another instance
    /// owns (none when the step must `send` nothing), and the rows known to be owned elsewhere
    /// (per type, a mask), which the drift control does not pull: their reference here is
    /// stale, and their owner's published rows replace them.
    pub fn tap<'a>(
        &'a mut self,
        sources: &'a mut OwnedSources,
        store: &'a GraphStore,
        send: bool,
    ) -> (Option<OutboxTap<'a>>, &'a [Tensor]) {
        let tap = send.then(|| OutboxTap {
            owned: sources.owned_now(),
            sources,
            store,
            outbox: &mut self.outbox,
            before: &mut self.learned.before,
            seen: &mut self.seen_foreign,
            error: None,
        });
        (tap, &self.foreign_rows)
    }

    /// The rows of `idx` (Int64, CPU; rows of type `t`) not known to be owned elsewhere.
    pub fn owned_only(&self, t: usize, idx: Tensor) -> Tensor {
        let Some(mask) = self.foreign_rows.get(t).filter(|m| m.size()[0] > 0) else {
            return idx;
        };
        let mask = mask.to_device(Device::Cpu);
        let len = mask.size()[0];
        let inside = idx.lt(len);
        let foreign = mask
            .index_select(0, &idx.clamp(0, len - 1))
            .logical_and(&inside);
        idx.masked_select(&foreign.logical_not())
    }

    /// Mark `nodes` as owned elsewhere in [`ForeignRows::tap`]'s mask.
    fn mark_foreign(&mut self, nodes: &[NodeRef], device: Device) {
        for n in nodes {
            let t = n.node_type as usize;
            if self.foreign_rows.len() <= t {
                self.foreign_rows
                    .resize_with(t + 1, || Tensor::zeros([0], (Kind::Bool, device)));
            }
            let mask = &mut self.foreign_rows[t];
            let i = i64::from(n.index);
            let len = mask.size()[0];
            if i >= len {
                let grown = Tensor::zeros([(2 * len).max(i + 1).max(1024)], (Kind::Bool, device));
                if len > 0 {
                    grown.narrow(0, 0, len).copy_(mask);
                }
                *mask = grown;
            }
        }
        for (t, nodes) in by_type(nodes.iter().copied()) {
            let _ = self.foreign_rows[t].index_fill_(0, &indices(&nodes, device), 1);
        }
    }

    /// Apply the window parts read since the last call (each once: one read again after a
    /// rewind is recognised by its id), pulled toward the published version as the steps they
    /// sum would have been (`pull`), then copy the rows the remote cache applied over the local
    /// copies of rows owned elsewhere.
    pub fn take_in(
        &mut self,
        model: &mut Embeddings,
        store: &GraphStore,
        sources: &mut OwnedSources,
        (lr, init_scale): (f64, f64),
        pull: Option<&Pull<'_>>,
    ) -> Result<(), StoreError> {
        let seen = std::mem::take(&mut self.seen_foreign);
        self.mark_foreign(&seen, model.device);
        let (parts, refreshed) = (self.inbox.take_parts(), self.inbox.take_refreshed());
        let (handed_over, deltas_handed_over) =
            relation_deltas_apart(self.inbox.take_handed_over());
        self.share_relations(model, store, sources, deltas_handed_over);
        if parts.is_empty() && refreshed.is_empty() && handed_over.is_empty() {
            return Ok(());
        }
        // (Built only when something came: this runs before every step.)
        let types = type_ids(store);
        if !handed_over.is_empty() {
            let started = take_over(model, store, &types, &handed_over, init_scale)?;
            self.inbox.count_taken_over(started.len() as u64);
            self.taken_over.extend(started);
        }
        for part in parts {
            if self.position.has(&part.id, part.partition) {
                self.inbox.count_repeated();
                // Still the newest place to read from.
                self.position
                    .resume_at
                    .insert(part.partition, part.resume_at);
                continue;
            }
            let applied = apply_part(model, store, &types, &part, (lr, init_scale), pull)?;
            self.inbox
                .count_applied(applied.rows, applied.started, applied.unknown);
            self.position.record(&part);
            self.unsaved.store(true, Ordering::Relaxed);
        }
        if refreshed.is_empty() {
            return Ok(());
        }
        let owned = sources.owned_now();
        let dim = model.dim as usize;
        let mut copies: BTreeMap<usize, Vec<(NodeRef, RefreshedRow)>> = BTreeMap::new();
        let mut count = 0;
        for row in refreshed {
            let Some((t, node)) = node_of(store, &types, &row.key)? else {
                continue;
            };
            if i64::from(node.index) >= model.tables[t].len() || row.vector.len() < dim {
                continue;
            }
            if owned
                .binary_search(&sources.partition(store, node)?)
                .is_ok()
            {
                // Owned here since (the cache had not forgotten it yet): this instance's own row wins.
                continue;
            }
            copies.entry(t).or_default().push((node, row));
            count += 1;
        }
        // A row refreshed from its owner is owned elsewhere, whether or not a tap met it since
        // its ownership moved (the tap marks only rows it sums gradients of): the drift control
        // neither measures nor pulls it. Unmarked, such copies were measured against a
        // reference they left long ago, and the pull they raised froze every owned row.
        let refreshed: Vec<NodeRef> = copies.values().flatten().map(|(node, _)| *node).collect();
        self.mark_foreign(&refreshed, model.device);
        for (t, copies) in copies {
            let table = &mut model.tables[t];
            let width = dim + usize::from(table.biased);
            let nodes: Vec<NodeRef> = copies.iter().map(|(node, _)| *node).collect();
            // Only the rows stepped on since their last window need their values here.
            let stepped: Vec<NodeRef> = (nodes.iter().copied())
                .filter(|n| self.learned.before.contains_key(n))
                .collect();
            let now = read_rows(table, &stepped);
            let now: HashMap<NodeRef, &[f32]> =
                stepped.into_iter().zip(now.chunks_exact(width)).collect();
            let mut values = Vec::with_capacity(nodes.len() * width);
            for (node, row) in copies {
                let mut value = row.vector[..dim].to_vec();
                if table.biased {
                    value.push(row.vector.get(dim).copied().unwrap_or(0.0));
                }
                self.learned.add_unapplied(node, row.includes, &mut value);
                if let (Some(was), Some(now)) = (self.learned.before.get_mut(&node), now.get(&node))
                {
                    // The steps since the last window stay on top, counted from here on.
                    let since: Vec<f32> = now.iter().zip(was.iter()).map(|(n, w)| n - w).collect();
                    was.copy_from_slice(&value);
                    value.iter_mut().zip(&since).for_each(|(v, s)| *v += s);
                }
                values.extend_from_slice(&value);
            }
            write_rows(table, &nodes, &values);
            table.hold(&nodes.iter().map(|n| i64::from(n.index)).collect::<Vec<_>>());
        }
        self.inbox.count_refreshed(count);
        Ok(())
    }
}

/// Rows handed over split into node rows and relation deltas (by partition).
fn relation_deltas_apart(rows: Vec<ChangedRow>) -> (Vec<ChangedRow>, BTreeMap<i32, Vec<f32>>) {
    let mut deltas = BTreeMap::new();
    let rows = (rows.into_iter())
        .filter_map(|row| match relation_delta_partition(&row.key) {
            Some(p) => {
                deltas.insert(p, row.vector);
                None
            }
            None => Some(row),
        })
        .collect();
    (rows, deltas)
}

/// One type's summed gradients gathered for one write: indices, `[k × D]` gradients, and per
/// row its steps and bias gradient; the starting rows of nodes interned for them.
#[derive(Debug, Default)]
struct Rows<'p> {
    rows: Vec<i64>,
    values: Vec<f32>,
    steps: Vec<f32>,
    biases: Vec<f32>,
    starts: Vec<(NodeRef, &'p Vec<f32>)>,
    /// Per row: the drift control may pull it, the model having held it before this part with a
    /// published row (the reference for a row started now, or since the reference, is a
    /// placeholder's noise).
    pullable: Vec<bool>,
}

/// `nodes` grouped by type, each group in a fixed order.
fn by_type(nodes: impl IntoIterator<Item = NodeRef>) -> BTreeMap<usize, Vec<NodeRef>> {
    let mut out: BTreeMap<usize, Vec<NodeRef>> = BTreeMap::new();
    for n in nodes {
        out.entry(n.node_type as usize).or_default().push(n);
    }
    out
}

/// The values of `nodes` (of `table`'s type), row after row: the row, then its bias for a
/// biased table.
fn read_rows(table: &NodeTable, nodes: &[NodeRef]) -> Vec<f32> {
    let idx = indices(nodes, table.weights.device());
    let rows = table.weights.index_select(0, &idx);
    let rows = match table.biased {
        true => Tensor::cat(&[rows, table.bias.index_select(0, &idx).unsqueeze(1)], 1),
        false => rows,
    };
    Vec::<f32>::try_from(rows.to_device(Device::Cpu).contiguous().view([-1])).unwrap_or_default()
}

fn indices(nodes: &[NodeRef], device: Device) -> Tensor {
    let idx: Vec<i64> = nodes.iter().map(|n| i64::from(n.index)).collect();
    Tensor::from_slice(&idx).to_device(device)
}

/// Write [`read_rows`]'s layout back.
fn write_rows(table: &mut NodeTable, nodes: &[NodeRef], values: &[f32]) {
    let device = table.weights.device();
    let (n, width) = (
        nodes.len() as i64,
        table.weights.size()[1] + i64::from(table.biased),
    );
    let idx = indices(nodes, device);
    let values = Tensor::from_slice(values)
        .view([n, width])
        .to_device(device);
    tch::no_grad(|| {
        let dim = table.weights.size()[1];
        let _ = (table.weights).index_copy_(0, &idx, &values.narrow(1, 0, dim));
        if table.biased {
            let _ = (table.bias).index_copy_(0, &idx, &values.select(1, dim));
        }
    });
}

/// Start `nodes`' rows anew at `values` ([`read_rows`]'s layout): no Adagrad history, and a
/// placeholder's negative steps forgotten.
fn start_rows(table: &mut NodeTable, nodes: &[NodeRef], values: &[f32]) {
    let (n, dim) = (nodes.len() as i64, table.weights.size()[1]);
    let width = dim + i64::from(table.biased);
    let values = Tensor::from_slice(values)
        .view([n, width])
        .to_device(table.weights.device());
    let rows: Vec<i64> = nodes.iter().map(|n| i64::from(n.index)).collect();
    table.restart(&rows, &values.narrow(1, 0, dim), 0.0);
    if table.biased {
        let idx = indices(nodes, table.weights.device());
        tch::no_grad(|| {
            let _ = (table.bias).index_copy_(0, &idx, &values.select(1, dim));
        });
    }
}

/// The rows of partitions this instance took over, as their previous owner last published them:
/// a node the store does not know is interned and its row started there, and so is a known
/// node's placeholder (a row no step or window has started); a row this instance already holds
/// is its own (its copy was refreshed from the owner and carries what it learned since).
/// Returns how many rows were started.
fn take_over(
    model: &mut Embeddings,
    store: &GraphStore,
    types: &HashMap<String, usize>,
    rows: &[crate::exchange::ChangedRow],
    init_scale: f64,
) -> Result<Vec<NodeRef>, StoreError> {
    let width = |t: usize| model.dim as usize + usize::from(model.tables[t].biased);
    // A row of another width (the model's dimension or bias changed) is not taken.
    let usable = (rows.iter())
        .filter(|r| type_and_id(types, &r.key).is_none_or(|(t, _)| r.vector.len() >= width(t)));
    let nodes = nodes_interning(store, types, usable.map(|r| (r.key.as_str(), r)))?;
    let mut by_type: BTreeMap<usize, (Vec<NodeRef>, Vec<f32>)> = BTreeMap::new();
    for (node, row, is_fresh) in nodes.found {
        let t = node.node_type as usize;
        let value = &row.vector[..width(t)];
        let held = !is_fresh && model.tables[t].holds(i64::from(node.index));
        if held || store.is_erased(node) {
            continue;
        }
        let (nodes, values) = by_type.entry(t).or_default();
        nodes.push(node);
        values.extend_from_slice(value);
    }
    let mut started = Vec::new();
    for (t, (nodes, values)) in by_type {
        let table = &mut model.tables[t];
        let indices: Vec<i64> = nodes.iter().map(|n| i64::from(n.index)).collect();
        grow_to_hold(table, &indices, init_scale);
        start_rows(table, &nodes, &values);
        table.hold(&indices);
        started.extend(nodes);
    }
    Ok(started)
}

/// The nodes of keyed items, each with whether it was interned now.
struct NodesFound<R> {
    /// Known to the store first, then those interned now (`true`), in the items' order.
    found: Vec<(NodeRef, R, bool)>,
    /// Items whose key names no node type of the schema (left out).
    not_nodes: u64,
    interned: u64,
}

/// The nodes that `items`' keys (`type:id`) name: those the store knows, and those it does not,
/// interned together in one write (whoever hands this instance a row of its own partitions
/// makes its node known here, whatever its store saw).
fn nodes_interning<'k, R>(
    store: &GraphStore,
    types: &HashMap<String, usize>,
    items: impl IntoIterator<Item = (&'k str, R)>,
) -> Result<NodesFound<R>, StoreError> {
    let mut found = Vec::new();
    let mut not_nodes = 0;
    let (mut fresh, mut fresh_items): (Vec<NodeKey>, Vec<R>) = Default::default();
    for (key, item) in items {
        let Some((t, id)) = type_and_id(types, key) else {
            not_nodes += 1;
            continue;
        };
        let node_type = t as u16;
        match store.node_index(node_type, id)? {
            Some(index) => found.push((NodeRef { node_type, index }, item, false)),
            None => {
                fresh.push(NodeKey {
                    node_type,
                    id: id.to_owned(),
                });
                fresh_items.push(item);
            }
        }
    }
    let interned = match fresh.is_empty() {
        true => Vec::new(),
        false => store.intern_nodes(&fresh)?,
    };
    let count = interned.len() as u64;
    found.extend((interned.into_iter().zip(fresh_items)).map(|(node, item)| (node, item, true)));
    Ok(NodesFound {
        found,
        not_nodes,
        interned: count,
    })
}

/// Grow `table` to hold `rows`: a row the model has not grown to yet is started at random, as a
/// step starts one, and rows between that no node names are placeholders.
fn grow_to_hold(table: &mut NodeTable, rows: &[i64], init_scale: f64) {
    let dim = table.weights.size()[1];
    let needed = rows.iter().max().map_or(0, |&r| r + 1);
    let named: HashSet<i64> = rows.iter().copied().collect();
    table.grow_reaching(needed, &named, |count| {
        Tensor::randn([count, dim], (Kind::Float, Device::Cpu)) * init_scale
    });
}

/// Store type names to type ids.
fn type_ids(store: &GraphStore) -> HashMap<String, usize> {
    (store.stored_schema().node_types.iter().enumerate())
        .map(|(t, name)| (name.clone(), t))
        .collect()
}

/// The type and id a key (`type:id`) names, when its type is a node type.
fn type_and_id<'k>(types: &HashMap<String, usize>, key: &'k str) -> Option<(usize, &'k str)> {
    let (name, id) = key.split_once(':')?;
    Some((*types.get(name)?, id))
}

/// The node a key (`type:id`) names, when its type is a node type and the store knows it.
fn node_of(
    store: &GraphStore,
    types: &HashMap<String, usize>,
    key: &str,
) -> Result<Option<(usize, NodeRef)>, StoreError> {
    let Some((t, id)) = type_and_id(types, key) else {
        return Ok(None);
    };
    Ok(store.node_index(t as u16, id)?.map(|index| {
        (
            t,
            NodeRef {
                node_type: t as u16,
                index,
            },
        )
    }))
}

/// What [`apply_part`] did with a part's rows.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Applied {
    rows: u64,
    /// Of `rows`, those of nodes the store did not know (interned now).
    started: u64,
    unknown: u64,
}

/// Apply one window part: per type, the rows the store knows, and those it does not (the
/// part's owner is this instance, whatever its store saw: interned, and started at the
/// sender's row where the record carries it, so that the owner's row goes on from where the
/// sender's learning began instead of from noise). A row the model has not grown to yet is
/// started at random, as a step starts one. Rows held before are then pulled toward the
/// published version ([`pull_window`]).
fn apply_part(
    model: &mut Embeddings,
    store: &GraphStore,
    types: &HashMap<String, usize>,
    part: &WindowPart,
    (lr, init_scale): (f64, f64),
    pull: Option<&Pull<'_>>,
) -> Result<Applied, StoreError> {
    let dim = model.dim as usize;
    let mut by_type: BTreeMap<usize, Rows> = BTreeMap::new();
    let mut out = Applied::default();
    let usable = (part.rows.iter()).filter(|row| {
        let usable = row.grad.len() == dim && row.steps > 0;
        if !usable {
            warn!(key = %row.key, dim = row.grad.len(), "a gradient of another dimension or of no step; skipped");
            out.unknown += 1;
        }
        usable
    });
    let nodes = nodes_interning(store, types, usable.map(|row| (row.key.as_str(), row)))?;
    out.unknown += nodes.not_nodes;
    out.started = nodes.interned;
    for (node, row, is_fresh) in nodes.found {
        if store.is_erased(node) {
            out.unknown += 1;
            continue;
        }
        let rows = by_type.entry(node.node_type as usize).or_default();
        let index = i64::from(node.index);
        rows.rows.push(index);
        rows.values.extend_from_slice(&row.grad);
        rows.steps.push(row.steps as f32);
        rows.biases.push(row.bias.unwrap_or(0.0));
        let table = &model.tables[node.node_type as usize];
        let held = !is_fresh && table.holds(index);
        rows.pullable.push(held && table.has_published_row(index));
        if let Some(start) = row.start.as_ref().filter(|_| !held) {
            rows.starts.push((node, start));
        }
    }
    let device = model.device;
    for (t, rows) in by_type {
        let n = rows.rows.len() as i64;
        let table = &mut model.tables[t];
        grow_to_hold(table, &rows.rows, init_scale);
        let width = dim + usize::from(table.biased);
        // A start of another width (the model's dimension or bias changed) is not taken.
        let (nodes, values): (Vec<NodeRef>, Vec<&[f32]>) = (rows.starts.iter())
            .filter(|(_, start)| start.len() == width)
            .map(|&(node, start)| (node, start.as_slice()))
            .unzip();
        if !nodes.is_empty() {
            start_rows(table, &nodes, &values.concat());
        }
        // A row without a start (its sender announced it before) is its node's from here on.
        table.hold(&rows.rows);
        let idx = Tensor::from_slice(&rows.rows).to_device(device);
        let grads = Tensor::from_slice(&rows.values)
            .view([n, dim as i64])
            .to_device(device);
        let steps = Tensor::from_slice(&rows.steps).to_device(device);
        let reference = pull
            .filter(|p| p.strength > 0.0)
            .and_then(|p| Some((p.tables.get(t)?, 1.0 / (1.0 + lr * p.strength))));
        let pulled = reference.map(|(reference, keep)| {
            let pullable = Tensor::from_slice(&rows.pullable).to_device(device);
            let pulled = idx.lt(reference.size()[0]).logical_and(&pullable);
            let pulled = pulled.nonzero().view([-1]);
            let at = idx.index_select(0, &pulled);
            let before = table.weights.index_select(0, &at);
            (reference, keep, pulled, at, before)
        });
        table.adagrad_summed(&idx, &grads, &steps, lr);
        if table.biased {
            let biases = Tensor::from_slice(&rows.biases).to_device(device);
            table.adagrad_bias_summed(&idx, &biases, &steps, lr);
        }
        if let Some((reference, keep, pulled, at, before)) = pulled {
            let steps = steps.index_select(0, &pulled);
            pull_window(table, &at, &before, &steps, reference, keep);
        }
        out.rows += n as u64;
    }
    Ok(out)
}

/// The drift control's pull on a window applied to `at` (rows the reference has; `before`: their
/// values before the window): as if its `steps` had come one by one, each a step followed by
/// the pull toward `reference` that shrinks a row's distance from it by `keep`. Over `k` steps
/// the distance the row had shrinks by `keep^k`, and the window's movement, spread evenly over
/// them, by `keep (1 - keep^k) / (k (1 - keep))`. Without it an applied window is never pulled
/// while one instance's own steps are, so with several instances the measured drift stays high,
/// the control raises its strength on the local steps alone, and the next local step pulls the
/// applied movement back.
fn pull_window(
    table: &mut NodeTable,
    at: &Tensor,
    before: &Tensor,
    steps: &Tensor,
    reference: &Tensor,
    keep: f64,
) {
    if at.numel() == 0 || !(0.0..1.0).contains(&keep) {
        return;
    }
    tch::no_grad(|| {
        let anchor = reference.index_select(0, at).to_device(before.device());
        let moved = table.weights.index_select(0, at) - before;
        let shrink = (steps * keep.ln()).exp();
        let spread: Tensor = (shrink.ones_like() - &shrink) * (keep / (1.0 - keep)) / steps;
        let value =
            &anchor + (before - &anchor) * shrink.unsqueeze(1) + moved * spread.unsqueeze(1);
        let _ = table.weights.index_copy_(0, at, &value);
    });
}

/// Sums, per node another instance owns, the gradients a step shows it.
pub struct OutboxTap<'a> {
    sources: &'a mut OwnedSources,
    owned: Vec<i32>,
    store: &'a GraphStore,
    outbox: &'a mut HashMap<NodeRef, NodeGradient>,
    /// [`LocalLearning::before`]: a row's value is kept at its first step since its last window.
    before: &'a mut HashMap<NodeRef, Vec<f32>>,
    /// Rows found owned elsewhere (marked at the next step: the mask is read meanwhile).
    seen: &'a mut Vec<NodeRef>,
    /// A store read failed: the step is taken, its foreign gradients partly summed.
    pub error: Option<StoreError>,
}

impl GradientTap for OutboxTap<'_> {
    fn rows(
        &mut self,
        t: usize,
        table: &NodeTable,
        rows: &Tensor,
        grad: &Tensor,
        bias: Option<&Tensor>,
    ) {
        if self.error.is_some() {
            return;
        }
        let idx = Vec::<i64>::try_from(&rows.to_device(Device::Cpu)).unwrap_or_default();
        let mut foreign: Vec<(usize, NodeRef)> = Vec::new();
        for (i, &row) in idx.iter().enumerate() {
            // A placeholder moves only as a negative drawn from the table: no node's learning.
            if !table.holds(row) {
                continue;
            }
            let node = NodeRef {
                node_type: t as u16,
                index: row as u32,
            };
            match self.sources.partition(self.store, node) {
                Ok(q) if self.owned.binary_search(&q).is_err() => foreign.push((i, node)),
                Ok(_) => {}
                Err(e) => {
                    self.error = Some(e);
                    return;
                }
            }
        }
        if foreign.is_empty() {
            return;
        }
        let first: Vec<NodeRef> = (foreign.iter())
            .map(|&(_, node)| node)
            .filter(|node| !self.before.contains_key(node))
            .collect();
        if !first.is_empty() {
            let was = read_rows(table, &first);
            let width = was.len() / first.len();
            for (node, was) in first.into_iter().zip(was.chunks_exact(width)) {
                self.before.insert(node, was.to_vec());
            }
        }
        let at: Vec<i64> = foreign.iter().map(|&(i, _)| i as i64).collect();
        let at = Tensor::from_slice(&at).to_device(grad.device());
        let dim = grad.size()[1] as usize;
        let values = Vec::<f32>::try_from(
            &grad
                .index_select(0, &at)
                .to_device(Device::Cpu)
                .contiguous()
                .view([-1]),
        )
        .unwrap_or_default();
        let biases = bias.map(|b| {
            Vec::<f32>::try_from(&b.index_select(0, &at).to_device(Device::Cpu)).unwrap_or_default()
        });
        for (j, &(_, node)) in foreign.iter().enumerate() {
            let sum = self.outbox.entry(node).or_insert_with(|| {
                self.seen.push(node);
                NodeGradient {
                    node,
                    steps: 0,
                    grad: vec![0.0; dim],
                    bias: None,
                    start: None,
                }
            });
            sum.steps += 1;
            for (s, g) in sum.grad.iter_mut().zip(&values[j * dim..(j + 1) * dim]) {
                *s += g;
            }
            if let Some(b) = biases.as_ref().and_then(|b| b.get(j)) {
                *sum.bias.get_or_insert(0.0) += b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::exchange::{ChangedRow, KeyedGradient, WindowId};
    use crate::partition::{partition_of, Ownership};
    use crate::train::test_graph::likes_store;
    use crate::train::{DeltaRequest, TrainerCore};

    /// Rows an owner published, handed over once.
    #[derive(Debug, Default)]
    struct Published(parking_lot::Mutex<Vec<ChangedRow>>);

    impl crate::exchange::ChangedRows for Published {
        fn take_changed(&self) -> Vec<ChangedRow> {
            std::mem::take(&mut *self.0.lock())
        }
    }

    impl Published {
        /// `key`'s row published as `vector` by an owner that applied `sender`'s windows up to
        /// `includes`.
        fn push(&self, key: String, vector: Vec<f32>, includes: Option<(&str, u64)>) {
            self.0.lock().push(ChangedRow {
                key,
                vector,
                applied: includes.map(|(sender, version)| {
                    Arc::new([(sender.to_owned(), WindowAttempt { version, epoch: 0 })].into())
                }),
            });
        }
    }

    fn place(key: &str) -> i32 {
        partition_of(key.as_bytes(), 2) as i32
    }

    /// Ids `<prefix><i>` (i < 40) whose `node_type:id` key is in partition `q` of 2.
    fn ids_in<'a>(
        node_type: &'a str,
        prefix: &'a str,
        q: i32,
    ) -> impl Iterator<Item = String> + 'a {
        (0..40)
            .map(move |i| format!("{prefix}{i}"))
            .filter(move |id| place(&format!("{node_type}:{id}")) == q)
    }

    fn core(
        cfg: &Config,
        ownership: &Arc<Ownership>,
        cursor: u64,
    ) -> (TrainerCore, Arc<GradientInbox>) {
        tch::manual_seed(3);
        let model = Embeddings::new(2, 1, cfg.train.dim, cfg.train.init_scale, Device::Cpu);
        let mut core = TrainerCore::resume(model, cursor, cfg.train.clone(), cfg.trainer.clone());
        core.train_owned_sources(ownership.clone());
        let inbox = Arc::new(GradientInbox::new(format!("sender-{cursor}")));
        core.exchange_gradients(inbox.clone());
        (core, inbox)
    }

    /// An instance's ownership of partition `q` of 2.
    fn owning(q: i32) -> Arc<Ownership> {
        let o = Arc::new(Ownership::default());
        o.set_partition_count(2);
        o.assign(&[q]);
        o
    }

    fn row(core: &TrainerCore, t: usize, i: i64) -> Vec<f32> {
        Vec::<f32>::try_from(core.model.tables[t].weights.get(i)).unwrap()
    }

    /// Issue 24, item 3: an instance sums the gradients of the rows another owns (applying them
    /// locally too) and hands them to the version; the owner applies a window part once, a
    /// second read of it not at all, and the local copies of rows owned elsewhere take their
    /// owner's published values.
    #[test]
    fn gradients_of_rows_owned_elsewhere_reach_their_owner_once() {
        let dir = tempfile::tempdir().unwrap();
        // Users of one partition, movies of the other.
        let users: Vec<String> = ids_in("user", "u", 0).collect();
        let movies: Vec<String> = ids_in("movie", "m", 1).collect();
        let likes: Vec<(&str, &str)> = (0..12)
            .map(|i| (users[i % 4].as_str(), movies[i % 3].as_str()))
            .collect();
        let store = likes_store(dir.path(), &likes);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let (a_owns, b_owns) = (owning(0), owning(1));
        let (mut a, a_inbox) = core(&cfg, &a_owns, 0);
        while a.step(&store).unwrap().stats.is_some() {}
        let taken = a.take_delta(&DeltaRequest::default()).exchange;
        // Every movie A's users liked (and only rows B owns) has a summed gradient.
        let mut keys: Vec<String> = (taken.gradients.iter())
            .map(|g| {
                assert_eq!(g.node.node_type, 1, "a user of A's own partition was sent");
                assert!(g.steps >= 1 && g.grad.iter().any(|&x| x != 0.0));
                // The first window naming a node carries where A's learning on it began.
                assert_eq!(g.start.as_ref().map(Vec::len), Some(4));
                format!("movie:{}", store.node_id(g.node).unwrap().unwrap())
            })
            .collect();
        keys.sort();
        let mut want: Vec<String> = movies[..3].iter().map(|m| format!("movie:{m}")).collect();
        want.sort();
        assert_eq!(keys, want);
        assert!(
            (a.take_delta(&DeltaRequest::default()).exchange.gradients).is_empty(),
            "taken once"
        );

        // B, the movies' owner, with nothing of its own to train.
        let (mut b, b_inbox) = core(&cfg, &b_owns, store.edge_count());
        let part = WindowPart {
            id: WindowId {
                sender: "a".into(),
                version: 1,
                epoch: 0,
            },
            partition: 1,
            rows: (taken.gradients.iter())
                .map(|g| KeyedGradient {
                    key: format!("movie:{}", store.node_id(g.node).unwrap().unwrap()),
                    steps: g.steps,
                    grad: g.grad.clone(),
                    bias: g.bias,
                    start: g.start.clone(),
                })
                .chain([
                    // A node B's store does not know: interned, and started at A's row.
                    KeyedGradient {
                        key: "movie:never-seen".into(),
                        steps: 1,
                        grad: vec![1.0; 4],
                        bias: None,
                        start: Some(vec![0.5; 4]),
                    },
                    KeyedGradient {
                        key: "planet:x".into(),
                        steps: 1,
                        grad: vec![1.0; 4],
                        bias: None,
                        start: None,
                    },
                ])
                .collect(),
            resume_at: 9,
        };
        b_inbox.push_part(part.clone());
        b.step(&store).unwrap();
        let f = b_inbox.figures();
        assert_eq!(
            (
                f.windows_applied,
                f.rows_applied,
                f.rows_started,
                f.rows_unknown
            ),
            (1, 4, 1, 1)
        );
        let interned = store
            .node_index(1, "never-seen")
            .unwrap()
            .expect("interned");
        let lr = cfg.train.lr as f32;
        for x in row(&b, 1, i64::from(interned)) {
            // One Adagrad step from the start: 0.5 − lr · g / √g².
            assert!((x - (0.5 - lr)).abs() < 1e-4, "{x}");
        }
        let first = taken.gradients[0].node;
        let after = row(&b, 1, i64::from(first.index));
        // A second read of the same part (a rewind) changes nothing.
        b_inbox.push_part(part);
        b.step(&store).unwrap();
        assert_eq!(b_inbox.figures().windows_repeated, 1);
        assert_eq!(row(&b, 1, i64::from(first.index)), after);
        assert_eq!(b.exchange_position().unwrap().resume_at[&1], 9);
        // B's next version says its partition's rows include A's window.
        let applied = b.take_delta(&DeltaRequest::default()).exchange.applied;
        let window = WindowAttempt {
            version: 1,
            epoch: 0,
        };
        assert_eq!(applied, [(1, [("a".to_owned(), window)].into())].into());

        // B publishes the movie; A's copy becomes B's row, A's own users' rows stay A's.
        let published = vec![0.25f32; 4];
        let user = NodeRef {
            node_type: 0,
            index: 0,
        };
        let user_before = row(&a, 0, 0);
        let changed = Arc::new(Published::default());
        let key = |n: NodeRef| {
            format!(
                "{}:{}",
                ["user", "movie"][n.node_type as usize],
                store.node_id(n).unwrap().unwrap()
            )
        };
        changed.push(key(first), published.clone(), None);
        changed.push(key(user), vec![9.0; 4], None);
        a_inbox.refresh_from(changed);
        a.step(&store).unwrap();
        assert_eq!(row(&a, 1, i64::from(first.index)), published);
        assert_eq!(row(&a, 0, 0), user_before, "a row A owns is its own");
        assert_eq!(a_inbox.figures().rows_refreshed, 1);
    }

    /// Relation deltas other owners published.
    #[derive(Debug, Default)]
    struct Shares(parking_lot::Mutex<BTreeMap<i32, Vec<f32>>>);

    impl crate::exchange::ChangedRows for Shares {
        fn take_changed(&self) -> Vec<ChangedRow> {
            Vec::new()
        }

        fn take_relation_deltas(&self) -> BTreeMap<i32, Vec<f32>> {
            std::mem::take(&mut *self.0.lock())
        }
    }

    /// Issue 24, item 3: two instances train the relation, each on the edges it owns, and hand
    /// their shares on with their versions; once each took the other's, both hold the same
    /// relation vector: its start once, plus both instances' learning.
    #[test]
    fn both_instances_end_with_the_relation_learnt_by_both() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (ids_in("user", "u", 0).take(3))
            .chain(ids_in("user", "u", 1).take(3))
            .collect();
        let likes: Vec<(&str, &str)> = (users.iter())
            .flat_map(|u| [(u.as_str(), "m1"), (u.as_str(), "m2")])
            .collect();
        let store = likes_store(dir.path(), &likes);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let (a_owns, b_owns) = (owning(0), owning(1));
        let (mut a, a_inbox) = core(&cfg, &a_owns, 0);
        let (mut b, b_inbox) = core(&cfg, &b_owns, 0);
        let start = a.model.relation_values();
        assert_eq!(b.model.relation_values(), start, "one seed");
        while a.step(&store).unwrap().stats.is_some() {}
        while b.step(&store).unwrap().stats.is_some() {}
        let (learnt_a, learnt_b) = (a.model.relation_values(), b.model.relation_values());
        assert!(learnt_a != start && learnt_b != start && learnt_a != learnt_b);
        let from_a = a
            .take_delta(&DeltaRequest::default())
            .exchange
            .relation_deltas;
        let from_b = b
            .take_delta(&DeltaRequest::default())
            .exchange
            .relation_deltas;
        // Each hands on its home's share; the relation's start is its anchor's.
        let anchor = place("relation:likes");
        assert_eq!(from_a.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(from_b.keys().copied().collect::<Vec<_>>(), [1]);
        let (own_a, own_b) = (&from_a[&0], &from_b[&1]);
        let with_start = if anchor == 0 { own_a } else { own_b };
        assert_eq!(with_start, if anchor == 0 { &learnt_a } else { &learnt_b });
        a_inbox.refresh_from(Arc::new(Shares(from_b.into())));
        b_inbox.refresh_from(Arc::new(Shares(from_a.into())));
        a.step(&store).unwrap();
        b.step(&store).unwrap();
        let both: Vec<f32> = (learnt_a.iter().zip(&learnt_b).zip(&start))
            .map(|((x, y), s)| x + y - s)
            .collect();
        for got in [a.model.relation_values(), b.model.relation_values()] {
            let off = got.iter().zip(&both).map(|(g, w)| (g - w).abs());
            assert!(
                off.fold(0.0f32, f32::max) < 1e-6,
                "{got:?} against {both:?}"
            );
        }
        assert_eq!(a_inbox.figures().relation_deltas_applied, 1);
        assert_eq!(b_inbox.figures().relation_deltas_applied, 1);
        // Nothing learnt since: the next versions carry no share.
        assert!((a
            .take_delta(&DeltaRequest::default())
            .exchange
            .relation_deltas)
            .is_empty());
    }

    /// The rows of partitions taken over, as their previous owner last published them.
    #[derive(Debug, Default)]
    struct TakenOver(parking_lot::Mutex<Vec<ChangedRow>>);

    impl crate::exchange::ChangedRows for TakenOver {
        fn take_changed(&self) -> Vec<ChangedRow> {
            Vec::new()
        }

        fn take_handed_over(&self) -> Vec<ChangedRow> {
            std::mem::take(&mut *self.0.lock())
        }
    }

    /// A partition taken over: a node its new owner's store never met (only other owners'
    /// edges name it) is interned and started at its previous owner's published row, and so is
    /// a known node whose row was never started; a row the new owner holds stays its own.
    #[test]
    fn a_partition_taken_over_starts_the_rows_its_new_owner_does_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = ids_in("user", "u", 0).collect();
        let movies: Vec<String> = ids_in("movie", "m", 1).collect();
        let likes: Vec<(&str, &str)> = (0..6)
            .map(|i| (users[i % 2].as_str(), movies[i % 3].as_str()))
            .collect();
        let store = likes_store(dir.path(), &likes);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let b_owns = owning(1);
        let (mut b, b_inbox) = core(&cfg, &b_owns, store.edge_count());
        let handed = Arc::new(TakenOver::default());
        b_inbox.refresh_from(handed.clone());
        let published = |key: &str, x: f32| ChangedRow {
            key: key.to_owned(),
            vector: vec![x; 4],
            applied: None,
        };
        let known = format!("movie:{}", movies[0]);
        handed.0.lock().extend([
            published("movie:only-named-elsewhere", 0.25),
            published(&known, 0.5),
            published("planet:x", 1.0),
        ]);
        b.step(&store).unwrap();
        assert_eq!(b_inbox.figures().rows_taken_over, 2);
        let interned = (store.node_index(1, "only-named-elsewhere").unwrap()).expect("interned");
        assert_eq!(row(&b, 1, i64::from(interned)), vec![0.25; 4]);
        let m0 = i64::from(store.node_index(1, &movies[0]).unwrap().unwrap());
        assert_eq!(row(&b, 1, m0), vec![0.5; 4]);
        // The next version publishes both, whatever they moved from the publication's
        // reference (this instance's old copies, not what subscribers hold); once.
        let taken = b.take_delta(&DeltaRequest::default()).exchange.taken_over;
        let mut movies_taken = Vec::<i64>::try_from(&taken[1]).unwrap();
        movies_taken.sort_unstable();
        let mut want = vec![m0, i64::from(interned)];
        want.sort_unstable();
        assert_eq!((taken[0].numel(), movies_taken), (0, want));
        let again = b.take_delta(&DeltaRequest::default()).exchange.taken_over;
        assert!(again.iter().all(|t| t.numel() == 0));
        // Handed over again (the partition moved away and back): a held row stays.
        handed.0.lock().push(published(&known, 0.75));
        b.step(&store).unwrap();
        assert_eq!(row(&b, 1, m0), vec![0.5; 4]);
        assert_eq!(b_inbox.figures().rows_taken_over, 2);
    }

    /// A copy of a row owned elsewhere, refreshed, is its owner's row plus this instance's
    /// learning on it that the owner has not applied: the windows after the one the owner's
    /// marker names, and the steps since the last window.
    #[test]
    fn a_refreshed_copy_keeps_the_learning_its_owner_has_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = ids_in("user", "u", 0).take(4).collect();
        let movie = ids_in("movie", "m", 1).next().unwrap();
        let store = likes_store(dir.path(), &[(users[0].as_str(), movie.as_str())]);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let owns = owning(0);
        let (mut a, inbox) = core(&cfg, &owns, 0);
        let sender = inbox.sender().to_owned();
        let changed = Arc::new(Published::default());
        inbox.refresh_from(changed.clone());
        let key = format!("movie:{movie}");
        let window = |version| DeltaRequest {
            window: Some(WindowAttempt { version, epoch: 0 }),
            ..Default::default()
        };
        // Train on `user` liking the movie, to the end of the store; the movie's row after.
        let train = |a: &mut TrainerCore, offset: i64, user: &str| {
            if offset > 0 {
                let event = crate::schema::Event {
                    op: Default::default(),
                    src: crate::schema::NodeKey {
                        node_type: 0,
                        id: user.into(),
                    },
                    rel: 0,
                    dst: crate::schema::NodeKey {
                        node_type: 1,
                        id: movie.clone(),
                    },
                    ts: offset as u64,
                    weight: 1.0,
                    event_id: None,
                };
                let batch = crate::store::AppendBatch::from_events("t", offset, vec![event]);
                store.append(&batch).unwrap();
            }
            while a.step(&store).unwrap().stats.is_some() {}
            row(a, 1, 0)
        };
        let l1 = train(&mut a, 0, &users[0]);
        // A take without a window (no exchange publication) remembers nothing.
        a.take_delta(&DeltaRequest::default());
        let l2 = train(&mut a, 1, &users[1]);
        a.take_delta(&window(1));
        let l3 = train(&mut a, 2, &users[2]);
        a.take_delta(&window(2));
        let l4 = train(&mut a, 3, &users[3]);
        assert!(
            l1 != l2 && l2 != l3 && l3 != l4,
            "every round moved the movie"
        );
        let close = |got: Vec<f32>, want: Vec<f32>, what: &str| {
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{what}: {got:?} against {want:?}");
            }
        };
        let plus = |o: f32, parts: &[(&Vec<f32>, &Vec<f32>)]| -> Vec<f32> {
            (0..4)
                .map(|i| o + parts.iter().map(|(to, from)| to[i] - from[i]).sum::<f32>())
                .collect()
        };

        // The owner applied window 1: window 2 and the steps since stay on top of its row.
        changed.push(key.clone(), vec![0.5; 4], Some((&sender, 1)));
        a.step(&store).unwrap();
        close(
            row(&a, 1, 0),
            plus(0.5, &[(&l3, &l2), (&l4, &l3)]),
            "after window 1",
        );
        // Window 3 takes the steps since window 2 (counted from the refresh on).
        a.take_delta(&window(3));
        changed.push(key.clone(), vec![-1.0; 4], Some((&sender, 2)));
        a.step(&store).unwrap();
        close(row(&a, 1, 0), plus(-1.0, &[(&l4, &l3)]), "after window 2");
        // An owner that names no window of this sender applied none: all of them stay on top.
        changed.push(key.clone(), vec![2.0; 4], Some(("another", 3)));
        a.step(&store).unwrap();
        let all = [(&l2, &l1), (&l3, &l2), (&l4, &l3)];
        close(row(&a, 1, 0), plus(2.0, &all), "none applied");
        // Every window applied: the owner's row.
        changed.push(key, vec![0.25; 4], Some((&sender, 3)));
        a.step(&store).unwrap();
        assert_eq!(row(&a, 1, 0), vec![0.25; 4]);
        assert_eq!(inbox.figures().rows_refreshed, 4);
    }

    /// Steps of at most 4 edges, none replayed (a replayed edge's gradients are new learning and
    /// go out).
    const TRAIN_AGAIN: &str = "[train]\ndim = 4\nuniform_negatives = 0\nbatch_size = 4\n\
        [trainer]\nreplay_ratio = 0\nmax_batch_size = 4";

    /// Issue 24, sender-side exactly once: after a restart (or going back to a checkpoint), the
    /// edges below the last committed version's cursor are trained again without sending their
    /// gradients again; the edges after it send theirs.
    #[test]
    fn edges_whose_gradients_went_out_send_none_when_trained_again() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = ids_in("user", "u", 0).take(6).collect();
        let movies: Vec<String> = ids_in("movie", "m", 1).take(6).collect();
        let likes: Vec<(&str, &str)> = users
            .iter()
            .zip(&movies)
            .map(|(u, m)| (u.as_str(), m.as_str()))
            .collect();
        let store = likes_store(dir.path(), &likes);
        let cfg = Config::from_toml(TRAIN_AGAIN).unwrap();
        let owns = owning(0);
        let (mut a, inbox) = core(&cfg, &owns, 0);
        // The ledger says the first five edges went out with a committed version.
        inbox.set_sent_below(5);
        while a.step(&store).unwrap().stats.is_some() {}
        let sent = a.take_delta(&DeltaRequest::default()).exchange.gradients;
        let keys: Vec<String> = (sent.iter())
            .map(|g| store.node_id(g.node).unwrap().unwrap())
            .collect();
        assert_eq!(
            keys,
            vec![movies[5].clone()],
            "only the edge after the cursor"
        );
        assert_eq!(a.cursor(), 6, "every edge trained");
    }

    /// A window of summed steps applied by its owner meets the drift control's pull as the
    /// steps would have one by one at one instance.
    #[test]
    fn an_applied_window_is_pulled_as_its_steps_would_have_been_one_by_one() {
        let keep = 1.0 / (1.0 + 0.05 * 4.0);
        let mut model = Embeddings::new(1, 1, 2, 0.1, Device::Cpu);
        let table = &mut model.tables[0];
        table.grow(3, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        let before = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.5]).view([2, 2]);
        let moved = Tensor::from_slice(&[0.4f32, 0.0, -0.3, 0.6]).view([2, 2]);
        let at = Tensor::from_slice(&[0i64, 2]);
        let _ = table.weights.index_copy_(0, &at, &(&before + &moved));
        let reference = Tensor::from_slice(&[0.2f32, 0.1, 9.0, 9.0, -0.1, 0.3]).view([3, 2]);
        let steps = Tensor::from_slice(&[1.0f32, 4.0]);
        pull_window(table, &at, &before, &steps, &reference, keep);

        // The same window as its steps, each its share of the movement and then the pull.
        let expected = |row: usize, k: usize| {
            let (r, b, m) = (
                Vec::<f32>::try_from(reference.get(if row == 0 { 0 } else { 2 })).unwrap(),
                Vec::<f32>::try_from(before.get(row as i64)).unwrap(),
                Vec::<f32>::try_from(moved.get(row as i64)).unwrap(),
            );
            let mut x: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
            for _ in 0..k {
                for d in 0..2 {
                    let stepped = x[d] + f64::from(m[d]) / k as f64;
                    x[d] = f64::from(r[d]) + (stepped - f64::from(r[d])) * keep;
                }
            }
            x
        };
        for (row, index, k) in [(0usize, 0i64, 1usize), (1, 2, 4)] {
            let got = Vec::<f32>::try_from(table.weights.get(index)).unwrap();
            for (g, e) in got.iter().zip(expected(row, k)) {
                assert!(
                    (f64::from(*g) - e).abs() < 1e-6,
                    "row {index}: {got:?} vs {e}"
                );
            }
        }
        // Golden: row 0, one step of keep = 1/1.2: 0.2 + (1.4 - 0.2) / 1.2 = 1.2.
        let first = Vec::<f32>::try_from(table.weights.get(0)).unwrap();
        assert!((first[0] - 1.2).abs() < 1e-6, "{first:?}");
        // The row between them is not touched.
        assert_eq!(
            Vec::<f32>::try_from(table.weights.get(1)).unwrap(),
            [0.0, 0.0]
        );
    }

    /// A copy trained while this instance owned its node (no tap: nothing to send) and refreshed
    /// from its owner's row after the ownership moved is owned elsewhere for the drift control:
    /// left out of the drift sample though no tap met it since.
    #[test]
    fn a_copy_refreshed_from_its_owner_leaves_the_drift_sample() {
        let dir = tempfile::tempdir().unwrap();
        let user = ids_in("user", "u", 0).next().unwrap();
        let movie = ids_in("movie", "m", 1).next().unwrap();
        let store = likes_store(dir.path(), &[(user.as_str(), movie.as_str())]);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let owns = Arc::new(Ownership::default());
        owns.set_partition_count(2);
        owns.assign(&[0, 1]);
        let (mut a, inbox) = core(&cfg, &owns, 0);
        let changed = Arc::new(Published::default());
        inbox.refresh_from(changed.clone());
        while a.step(&store).unwrap().stats.is_some() {}
        let sample = |a: &mut TrainerCore| {
            let d = a.take_delta(&DeltaRequest {
                samples: vec![vec![
                    Tensor::from_slice(&[0i64]),
                    Tensor::from_slice(&[0i64]),
                ]],
                ..Default::default()
            });
            let kept = |t: usize| Vec::<i64>::try_from(&d.samples[0][t].0).unwrap();
            (kept(0), kept(1))
        };
        assert_eq!(sample(&mut a), (vec![0], vec![0]), "both owned here");

        owns.revoke(&[1]);
        changed.push(format!("movie:{movie}"), vec![0.5; 4], None);
        a.step(&store).unwrap();
        assert_eq!(row(&a, 1, 0), vec![0.5; 4], "refreshed from its owner");
        assert_eq!(
            sample(&mut a),
            (vec![0], vec![]),
            "the movie is owned elsewhere"
        );
    }

    /// The drift sample keeps the rows this instance owns: its copies of other owners' rows
    /// (marked as a tap finds them) are left out, rows past the mask are kept.
    #[test]
    fn the_drift_sample_leaves_out_rows_owned_elsewhere() {
        let mut rows = ForeignRows::new(Arc::new(GradientInbox::default()), Default::default());
        let node = |index| NodeRef {
            node_type: 1,
            index,
        };
        rows.mark_foreign(&[node(2), node(5)], Device::Cpu);
        let sample = Tensor::from_slice(&[0i64, 2, 3, 5, 4000]);
        let kept = |t| Vec::<i64>::try_from(rows.owned_only(t, sample.shallow_clone())).unwrap();
        assert_eq!(kept(1), vec![0, 3, 4000]);
        assert_eq!(kept(0), vec![0, 2, 3, 5, 4000], "another type");
    }
}
