//! The trainer's side of the gradient exchange ([`crate::exchange`]): the gradients of rows
//! another instance owns, summed per node until the next version takes them; the window parts
//! other instances sent, applied to the owned rows with this instance's Adagrad state; and the
//! local copies of rows owned elsewhere, replaced by their owners' published rows.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tracing::warn;

use crate::exchange::{ExchangePosition, GradientInbox, WindowPart};
use crate::store::{GraphStore, NodeRef, StoreError};
use crate::train::{Embeddings, GradientTap, OwnedSources};

/// One node's gradient summed over the steps since the last take.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeGradient {
    pub node: NodeRef,
    pub steps: u32,
    pub grad: Vec<f32>,
    pub bias: Option<f32>,
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
    /// A window part was applied since the last checkpoint (which an idle trainer then still
    /// writes, so that the owner can delete what it applied).
    unsaved: AtomicBool,
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
            unsaved: AtomicBool::new(false),
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

    /// Whether a window part was applied since the last checkpoint.
    pub fn unsaved(&self) -> bool {
        self.unsaved.load(Ordering::Relaxed)
    }

    /// The trainer went back to a checkpoint (`position`: its, or the default for none): what
    /// was summed since is undone with the rows, and the windows applied since are read again.
    pub fn went_back(&mut self, position: ExchangePosition) {
        self.outbox.clear();
        self.position = position;
        self.inbox.rewind_to(&self.position);
    }

    /// The gradients summed since the last take, for the next version.
    pub fn take_outbox(&mut self) -> Vec<NodeGradient> {
        let mut out: Vec<NodeGradient> = self.outbox.drain().map(|(_, g)| g).collect();
        out.sort_unstable_by_key(|g| g.node);
        out
    }

    /// A tap for one step that sums the gradients of the rows `sources` says another instance
    /// owns, and the rows known to be owned elsewhere (per type, a mask), which the drift
    /// control does not pull: their reference here is stale, and their owner's published rows
    /// replace them.
    pub fn tap<'a>(
        &'a mut self,
        sources: &'a mut OwnedSources,
        store: &'a GraphStore,
    ) -> (OutboxTap<'a>, &'a [Tensor]) {
        let tap = OutboxTap {
            owned: sources.owned_now(),
            sources,
            store,
            outbox: &mut self.outbox,
            seen: &mut self.seen_foreign,
            error: None,
        };
        (tap, &self.foreign_rows)
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
        let mut by_type: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
        for n in nodes {
            by_type
                .entry(n.node_type as usize)
                .or_default()
                .push(i64::from(n.index));
        }
        for (t, rows) in by_type {
            let idx = Tensor::from_slice(&rows).to_device(device);
            let _ = self.foreign_rows[t].index_fill_(0, &idx, 1);
        }
    }

    /// Apply the window parts read since the last call (each once: one read again after a
    /// rewind is recognised by its id), then copy the rows the remote cache applied over the
    /// local copies of rows owned elsewhere.
    pub fn take_in(
        &mut self,
        model: &mut Embeddings,
        store: &GraphStore,
        sources: &mut OwnedSources,
        lr: f64,
        init_scale: f64,
    ) -> Result<(), StoreError> {
        let seen = std::mem::take(&mut self.seen_foreign);
        self.mark_foreign(&seen, model.device);
        let (parts, refreshed) = (self.inbox.take_parts(), self.inbox.take_refreshed());
        if parts.is_empty() && refreshed.is_empty() {
            return Ok(());
        }
        // (Built only when something came: this runs before every step.)
        let types = type_ids(store);
        for part in parts {
            if self.position.has(&part.id, part.partition) {
                self.inbox.count_repeated();
                // Still the newest place to read from.
                self.position
                    .resume_at
                    .insert(part.partition, part.resume_at);
                continue;
            }
            let (applied, unknown) = apply_part(model, store, &types, &part, lr, init_scale)?;
            self.inbox.count_applied(applied, unknown);
            self.position.record(&part);
            self.unsaved.store(true, Ordering::Relaxed);
        }
        if refreshed.is_empty() {
            return Ok(());
        }
        let owned = sources.owned_now();
        let mut by_type: BTreeMap<usize, Rows> = BTreeMap::new();
        let dim = model.dim as usize;
        let mut count = 0;
        for (key, vector) in refreshed {
            let Some((t, node)) = node_of(store, &types, &key)? else {
                continue;
            };
            let table = &model.tables[t];
            if i64::from(node.index) >= table.len() || vector.len() < dim {
                continue;
            }
            if owned
                .binary_search(&sources.partition(store, node)?)
                .is_ok()
            {
                // Owned here since (the cache had not forgotten it yet): this instance's own row wins.
                continue;
            }
            let Rows {
                rows,
                values,
                biases,
                ..
            } = by_type.entry(t).or_default();
            rows.push(i64::from(node.index));
            values.extend_from_slice(&vector[..dim]);
            biases.push(vector.get(dim).copied().unwrap_or(0.0));
            count += 1;
        }
        let device = model.device;
        tch::no_grad(|| {
            for (
                t,
                Rows {
                    rows,
                    values,
                    biases,
                    ..
                },
            ) in by_type
            {
                let table = &mut model.tables[t];
                let idx = Tensor::from_slice(&rows).to_device(device);
                let values = Tensor::from_slice(&values)
                    .view([rows.len() as i64, dim as i64])
                    .to_device(device);
                let _ = table.weights.index_copy_(0, &idx, &values);
                if table.biased {
                    let b = Tensor::from_slice(&biases).to_device(device);
                    let _ = table.bias.index_copy_(0, &idx, &b);
                }
            }
        });
        self.inbox.count_refreshed(count);
        Ok(())
    }
}

/// One type's rows gathered for one write: indices, `[k × D]` values (or gradients), and per row
/// its steps and bias.
#[derive(Debug, Default)]
struct Rows {
    rows: Vec<i64>,
    values: Vec<f32>,
    steps: Vec<f32>,
    biases: Vec<f32>,
}

/// Store type names to type ids.
fn type_ids(store: &GraphStore) -> HashMap<String, usize> {
    (store.stored_schema().node_types.iter().enumerate())
        .map(|(t, name)| (name.clone(), t))
        .collect()
}

/// The node a key (`type:id`) names, when its type is a node type and the store knows it.
fn node_of(
    store: &GraphStore,
    types: &HashMap<String, usize>,
    key: &str,
) -> Result<Option<(usize, NodeRef)>, StoreError> {
    let Some((name, id)) = key.split_once(':') else {
        return Ok(None);
    };
    let Some(&t) = types.get(name) else {
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

/// Apply one window part: per type, the rows the store knows (a row the model has not grown to
/// yet is started at random, as a step starts one). Returns (rows applied, rows unknown).
fn apply_part(
    model: &mut Embeddings,
    store: &GraphStore,
    types: &HashMap<String, usize>,
    part: &WindowPart,
    lr: f64,
    init_scale: f64,
) -> Result<(u64, u64), StoreError> {
    let dim = model.dim as usize;
    let mut by_type: BTreeMap<usize, Rows> = BTreeMap::new();
    let mut unknown = 0u64;
    for row in &part.rows {
        let Some((t, node)) = node_of(store, types, &row.key)? else {
            unknown += 1;
            continue;
        };
        if row.grad.len() != dim || row.steps == 0 {
            warn!(key = %row.key, dim = row.grad.len(), "a gradient of another dimension or of no step; skipped");
            unknown += 1;
            continue;
        }
        let Rows {
            rows,
            values: grads,
            steps,
            biases,
        } = by_type.entry(t).or_default();
        rows.push(i64::from(node.index));
        grads.extend_from_slice(&row.grad);
        steps.push(row.steps as f32);
        biases.push(row.bias.unwrap_or(0.0));
    }
    let (device, mut applied) = (model.device, 0u64);
    for (
        t,
        Rows {
            rows,
            values: grads,
            steps,
            biases,
        },
    ) in by_type
    {
        let n = rows.len() as i64;
        let table = &mut model.tables[t];
        let needed = rows.iter().max().map_or(0, |&r| r + 1);
        table.grow(needed, |count| {
            Tensor::randn([count, dim as i64], (Kind::Float, Device::Cpu)) * init_scale
        });
        let idx = Tensor::from_slice(&rows).to_device(device);
        let grads = Tensor::from_slice(&grads)
            .view([n, dim as i64])
            .to_device(device);
        let steps = Tensor::from_slice(&steps).to_device(device);
        table.adagrad_summed(&idx, &grads, &steps, lr);
        if table.biased {
            let biases = Tensor::from_slice(&biases).to_device(device);
            table.adagrad_bias_summed(&idx, &biases, &steps, lr);
        }
        applied += n as u64;
    }
    Ok((applied, unknown))
}

/// Sums, per node another instance owns, the gradients a step shows it.
pub struct OutboxTap<'a> {
    sources: &'a mut OwnedSources,
    owned: Vec<i32>,
    store: &'a GraphStore,
    outbox: &'a mut HashMap<NodeRef, NodeGradient>,
    /// Rows found owned elsewhere (marked at the next step: the mask is read meanwhile).
    seen: &'a mut Vec<NodeRef>,
    /// A store read failed: the step is taken, its foreign gradients partly summed.
    pub error: Option<StoreError>,
}

impl GradientTap for OutboxTap<'_> {
    fn rows(&mut self, table: usize, rows: &Tensor, grad: &Tensor, bias: Option<&Tensor>) {
        if self.error.is_some() {
            return;
        }
        let idx = Vec::<i64>::try_from(&rows.to_device(Device::Cpu)).unwrap_or_default();
        let mut foreign: Vec<(usize, NodeRef)> = Vec::new();
        for (i, &row) in idx.iter().enumerate() {
            let node = NodeRef {
                node_type: table as u16,
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
    use crate::exchange::{KeyedGradient, WindowId};
    use crate::partition::{partition_of, Ownership};
    use crate::train::test_graph::likes_store;
    use crate::train::{DeltaRequest, TrainerCore};

    /// Rows an owner published, handed over once.
    #[derive(Debug)]
    struct Published(parking_lot::Mutex<Vec<(String, Vec<f32>)>>);

    impl crate::exchange::ChangedRows for Published {
        fn take_changed(&self) -> Vec<(String, Vec<f32>)> {
            std::mem::take(&mut *self.0.lock())
        }
    }

    fn place(key: &str) -> i32 {
        partition_of(key.as_bytes(), 2) as i32
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
        let inbox = Arc::new(GradientInbox::default());
        core.exchange_gradients(inbox.clone());
        (core, inbox)
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
        let users: Vec<String> = (0..40)
            .map(|i| format!("u{i}"))
            .filter(|u| place(&format!("user:{u}")) == 0)
            .collect();
        let movies: Vec<String> = (0..40)
            .map(|i| format!("m{i}"))
            .filter(|m| place(&format!("movie:{m}")) == 1)
            .collect();
        let likes: Vec<(&str, &str)> = (0..12)
            .map(|i| (users[i % 4].as_str(), movies[i % 3].as_str()))
            .collect();
        let store = likes_store(dir.path(), &likes);
        let cfg = Config::from_toml("[train]\ndim = 4\nuniform_negatives = 0").unwrap();
        let (a_owns, b_owns) = (
            Arc::new(Ownership::default()),
            Arc::new(Ownership::default()),
        );
        for (o, q) in [(&a_owns, 0), (&b_owns, 1)] {
            o.set_partition_count(2);
            o.assign(&[q]);
        }
        let (mut a, a_inbox) = core(&cfg, &a_owns, 0);
        while a.step(&store).unwrap().stats.is_some() {}
        let taken = a.take_delta(&DeltaRequest {
            full: false,
            samples: Vec::new(),
        });
        // Every movie A's users liked (and only rows B owns) has a summed gradient.
        let mut keys: Vec<String> = (taken.gradients.iter())
            .map(|g| {
                assert_eq!(g.node.node_type, 1, "a user of A's own partition was sent");
                assert!(g.steps >= 1 && g.grad.iter().any(|&x| x != 0.0));
                format!("movie:{}", store.node_id(g.node).unwrap().unwrap())
            })
            .collect();
        keys.sort();
        let mut want: Vec<String> = movies[..3].iter().map(|m| format!("movie:{m}")).collect();
        want.sort();
        assert_eq!(keys, want);
        assert!(
            a.take_delta(&DeltaRequest {
                full: false,
                samples: Vec::new()
            })
            .gradients
            .is_empty(),
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
                })
                .chain([KeyedGradient {
                    key: "movie:never-seen".into(),
                    steps: 1,
                    grad: vec![1.0; 4],
                    bias: None,
                }])
                .collect(),
            resume_at: 9,
        };
        b_inbox.push_part(part.clone());
        b.step(&store).unwrap();
        let f = b_inbox.figures();
        assert_eq!(
            (f.windows_applied, f.rows_applied, f.rows_unknown),
            (1, 3, 1)
        );
        let first = taken.gradients[0].node;
        let after = row(&b, 1, i64::from(first.index));
        // A second read of the same part (a rewind) changes nothing.
        b_inbox.push_part(part);
        b.step(&store).unwrap();
        assert_eq!(b_inbox.figures().windows_repeated, 1);
        assert_eq!(row(&b, 1, i64::from(first.index)), after);
        assert_eq!(b.exchange_position().unwrap().resume_at[&1], 9);

        // B publishes the movie; A's copy becomes B's row, A's own users' rows stay A's.
        let published = vec![0.25f32; 4];
        let user = NodeRef {
            node_type: 0,
            index: 0,
        };
        let user_before = row(&a, 0, 0);
        a_inbox.refresh_from(Arc::new(Published(parking_lot::Mutex::new(vec![
            (
                format!("movie:{}", store.node_id(first).unwrap().unwrap()),
                published.clone(),
            ),
            (
                format!("user:{}", store.node_id(user).unwrap().unwrap()),
                vec![9.0; 4],
            ),
        ]))));
        a.step(&store).unwrap();
        assert_eq!(row(&a, 1, i64::from(first.index)), published);
        assert_eq!(row(&a, 0, 0), user_before, "a row A owns is its own");
        assert_eq!(a_inbox.figures().rows_refreshed, 1);
    }
}
