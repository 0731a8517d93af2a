//! Parameters: one growable embedding table per node type, one vector per relation, and their
//! Adagrad state, on the configured device. Scoring lives in [`crate::train`].
//!
//! Node tables use row-wise sparse Adagrad (PyTorch-BigGraph's choice): one accumulator scalar
//! per row (the mean squared gradient of that row), and only rows touched by a step move.
//! Relations are few and use ordinary element-wise Adagrad.
//!
//! Each table also tracks its dirty rows (a bool mask on the device, set by every write: Adagrad
//! steps, the pull, which moves only rows a step touched, and growth): a version copies only the
//! rows changed since the last one ([`NodeTable::take_dirty`]), so its cost follows the change,
//! not the table.
//!
//! A table is dense by index, so a row may have to be made live before its node is trained: a
//! node stored but not trained yet, below a later one this instance was sent or given. Such a
//! row is a *placeholder* ([`NodeTable::grow_reaching`]): it holds noise and is not ranked
//! ([`NodeTable::holds`]), and its node gets its first row when it comes
//! ([`NodeTable::restart`]). It is published as any new row is (a version's tables are dense by
//! index, and a subscriber holds every row below the highest), noise until then.

use std::collections::HashSet;

use tch::{Device, Kind, Tensor};

/// Adagrad's epsilon, added to the root of the accumulator.
const ADAGRAD_EPS: f64 = 1e-10;

/// One node type's rows: `len` live rows in a tensor of `capacity` rows.
pub struct NodeTable {
    pub weights: Tensor,
    /// Row-wise Adagrad accumulator, `[capacity]`.
    pub state: Tensor,
    /// Whether the rows carry a learned scalar bias, added to every score in which one of them
    /// is the target ([`crate::config::TrainParams::bias_types`]).
    pub biased: bool,
    /// The biases, `[capacity]` (zeros unless `biased`), and their element-wise Adagrad
    /// accumulator.
    pub bias: Tensor,
    pub bias_state: Tensor,
    /// Rows written since the last [`NodeTable::take_dirty`], `[capacity]` (bool).
    dirty: Tensor,
    len: i64,
    /// Live rows made live only to reach a later one (see the module docs).
    placeholders: HashSet<i64>,
    /// Former placeholders started since the last version was taken, and those started before
    /// it whose version is not the reference yet: the published reference holds a placeholder's
    /// noise for them, so the drift control neither measures nor pulls them.
    started: HashSet<i64>,
    in_flight: HashSet<i64>,
}

impl NodeTable {
    fn new(dim: i64, device: Device) -> NodeTable {
        NodeTable {
            weights: Tensor::zeros([0, dim], (Kind::Float, device)),
            state: Tensor::zeros([0], (Kind::Float, device)),
            biased: false,
            bias: Tensor::zeros([0], (Kind::Float, device)),
            bias_state: Tensor::zeros([0], (Kind::Float, device)),
            dirty: Tensor::zeros([0], (Kind::Bool, device)),
            len: 0,
            placeholders: HashSet::new(),
            started: HashSet::new(),
            in_flight: HashSet::new(),
        }
    }

    /// Indices (`[k]`, Int64, on the device) of the live rows written since the last call, and
    /// the mask cleared: the rows the next version must look at.
    pub fn take_dirty(&mut self) -> Tensor {
        tch::no_grad(|| {
            let live = self.dirty.narrow(0, 0, self.len);
            let idx = live.nonzero().view([-1]);
            let _ = self.dirty.fill_(0);
            idx
        })
    }

    /// Another handle on the same storage: a write through either is seen by both (growth is
    /// not: it reallocates). For offline Hogwild workers ([`Embeddings::share`]).
    pub fn share(&self) -> NodeTable {
        NodeTable {
            weights: self.weights.shallow_clone(),
            state: self.state.shallow_clone(),
            biased: self.biased,
            bias: self.bias.shallow_clone(),
            bias_state: self.bias_state.shallow_clone(),
            dirty: self.dirty.shallow_clone(),
            len: self.len,
            placeholders: self.placeholders.clone(),
            started: self.started.clone(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// Count every live row as written (a rotation, a restored checkpoint).
    pub fn mark_all_dirty(&mut self) {
        tch::no_grad(|| {
            let _ = self.dirty.narrow(0, 0, self.len).fill_(1);
        });
    }

    /// Count `rows` (indices on the table's device) as written.
    pub fn mark_dirty(&mut self, rows: &Tensor) {
        tch::no_grad(|| {
            let _ = self.dirty.index_fill_(0, rows, 1);
        });
    }

    /// Zero `rows` (indices below `len`, on the table's device): their values, Adagrad state
    /// and bias, so nothing of an erased node stays in the model or its checkpoints. They count
    /// as written, so the next version takes them (and leaves them out: they are erased).
    pub fn erase(&mut self, rows: &Tensor) {
        tch::no_grad(|| {
            let _ = self.weights.index_fill_(0, rows, 0.0);
            let _ = self.state.index_fill_(0, rows, 0.0);
            let _ = self.bias.index_fill_(0, rows, 0.0);
            let _ = self.bias_state.index_fill_(0, rows, 0.0);
            let _ = self.dirty.index_fill_(0, rows, 1);
        });
    }

    /// Live rows written since the last [`NodeTable::take_dirty`].
    pub fn dirty_count(&self) -> i64 {
        tch::no_grad(|| {
            self.dirty
                .narrow(0, 0, self.len)
                .sum(Kind::Int64)
                .int64_value(&[])
        })
    }

    /// The live rows' biases, `[len]` (a view; zeros when the table is not biased).
    pub fn biases(&self) -> Tensor {
        self.bias.narrow(0, 0, self.len)
    }

    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.weights.size()[0]
    }

    /// The live rows, `[len, D]` (a view).
    pub fn rows(&self) -> Tensor {
        self.weights.narrow(0, 0, self.len)
    }

    /// Make rows `len..n` live, initialised by `init(count)` (a `[count, D]` tensor); capacity
    /// doubles as needed, old rows keep their values.
    pub fn grow(&mut self, n: i64, init: impl FnOnce(i64) -> Tensor) {
        if n <= self.len {
            return;
        }
        if n > self.capacity() {
            let mut cap = self.capacity().max(16);
            while cap < n {
                cap *= 2;
            }
            let (dim, device) = (self.weights.size()[1], self.weights.device());
            let weights = Tensor::zeros([cap, dim], (Kind::Float, device));
            let state = Tensor::zeros([cap], (Kind::Float, device));
            let bias = Tensor::zeros([cap], (Kind::Float, device));
            let bias_state = Tensor::zeros([cap], (Kind::Float, device));
            let dirty = Tensor::zeros([cap], (Kind::Bool, device));
            tch::no_grad(|| {
                dirty
                    .narrow(0, 0, self.len)
                    .copy_(&self.dirty.narrow(0, 0, self.len));
                weights.narrow(0, 0, self.len).copy_(&self.rows());
                for (new, old) in [
                    (&state, &self.state),
                    (&bias, &self.bias),
                    (&bias_state, &self.bias_state),
                ] {
                    new.narrow(0, 0, self.len)
                        .copy_(&old.narrow(0, 0, self.len));
                }
            });
            self.weights = weights;
            self.state = state;
            self.bias = bias;
            self.bias_state = bias_state;
            self.dirty = dirty;
        }
        let fresh = init(n - self.len)
            .to_device(self.weights.device())
            .to_kind(Kind::Float);
        tch::no_grad(|| {
            self.weights.narrow(0, self.len, n - self.len).copy_(&fresh);
            let _ = self.dirty.narrow(0, self.len, n - self.len).fill_(1);
        });
        self.len = n;
    }

    /// [`NodeTable::grow`] to `n` rows, of which only the new ones in `named` are nodes' rows:
    /// the others are placeholders (see the module docs).
    pub fn grow_reaching(
        &mut self,
        n: i64,
        named: &HashSet<i64>,
        init: impl FnOnce(i64) -> Tensor,
    ) {
        let start = self.len;
        self.grow(n, init);
        self.placeholders
            .extend((start..n).filter(|i| !named.contains(i)));
    }

    /// Whether row `i` is live and a node's row (not a placeholder).
    pub fn holds(&self, i: i64) -> bool {
        i < self.len && !self.placeholders.contains(&i)
    }

    /// Live rows that are nodes' rows (not placeholders).
    pub fn held_count(&self) -> i64 {
        self.len - self.placeholders.len() as i64
    }

    /// Whether any live row is a placeholder.
    pub fn has_placeholders(&self) -> bool {
        !self.placeholders.is_empty()
    }

    /// The placeholders' indices (`[k]`, Int64, on the table's device), in no fixed order.
    pub fn placeholder_indices(&self) -> Tensor {
        let idx: Vec<i64> = self.placeholders.iter().copied().collect();
        Tensor::from_slice(&idx).to_device(self.weights.device())
    }

    /// Count `rows` as nodes' rows from now on, with the values they hold (a row given its
    /// node's value from elsewhere: a published one, a sender's start).
    pub fn hold(&mut self, rows: &[i64]) {
        if !self.placeholders.is_empty() {
            rows.iter().for_each(|&i| {
                if self.placeholders.remove(&i) {
                    self.started.insert(i);
                }
            });
        }
    }

    /// Whether the published reference holds row `i` as its node's row (not a placeholder's
    /// noise, and not a row started since the version the reference is): the drift control
    /// measures and pulls only such rows. Rows past the reference's end are the caller's to
    /// leave out.
    pub fn has_published_row(&self, i: i64) -> bool {
        !(self.placeholders.contains(&i)
            || self.started.contains(&i)
            || self.in_flight.contains(&i))
    }

    /// The rows of `idx` (Int64, any device) that [`NodeTable::has_published_row`], in order.
    pub fn with_published_row(&self, idx: Tensor) -> Tensor {
        if self.placeholders.is_empty() && self.started.is_empty() && self.in_flight.is_empty() {
            return idx;
        }
        let device = idx.device();
        let all = Vec::<i64>::try_from(&idx.to_device(Device::Cpu)).unwrap_or_default();
        let kept: Vec<i64> = all
            .into_iter()
            .filter(|&i| self.has_published_row(i))
            .collect();
        Tensor::from_slice(&kept).to_device(device)
    }

    /// A version was taken: the rows started so far go out in it with their values.
    pub fn version_taken(&mut self) {
        self.in_flight.extend(self.started.drain());
    }

    /// The version last taken is the reference now (the pull's target): it holds the rows
    /// started before it.
    pub fn reference_adopted(&mut self) {
        self.in_flight.clear();
    }

    /// Start `rows` (indices below `len`, on the table's device) anew as their nodes' first rows
    /// `values` (`[k, D]`): no Adagrad history beyond `state`, bias 0, written, held.
    pub fn restart(&mut self, rows: &[i64], values: &Tensor, state: f64) {
        let idx = Tensor::from_slice(rows).to_device(self.weights.device());
        tch::no_grad(|| {
            let _ = self.weights.index_copy_(0, &idx, values);
            let _ = self.state.index_fill_(0, &idx, state);
            let _ = self.bias.index_fill_(0, &idx, 0.0);
            let _ = self.bias_state.index_fill_(0, &idx, 0.0);
            let _ = self.dirty.index_fill_(0, &idx, 1);
        });
        self.hold(rows);
    }

    /// The mean of the rows nodes hold (`[D]`; `None` when there are none): a type's centroid.
    pub fn held_mean(&self) -> Option<Tensor> {
        if self.placeholders.is_empty() {
            return (self.len > 0).then(|| self.rows().mean_dim(0, false, Kind::Float));
        }
        let held = self.len - self.placeholders.len() as i64;
        (held > 0).then(|| {
            tch::no_grad(|| {
                let reached = self.weights.index_select(0, &self.placeholder_indices());
                (self.rows().sum_dim_intlist(0, false, Kind::Float)
                    - reached.sum_dim_intlist(0, false, Kind::Float))
                    / held as f64
            })
        })
    }

    /// The mean Adagrad accumulator of the live rows (`None` when there are none); a row taken
    /// without its history counts as 0 until its first step.
    pub fn mean_state(&self) -> Option<f64> {
        (self.len > 0).then(|| {
            self.state
                .narrow(0, 0, self.len)
                .clamp_min(0.0)
                .mean(Kind::Float)
                .double_value(&[])
        })
    }

    /// Mark `rows` as taken without their Adagrad history (from the published state): each
    /// one's accumulator becomes `steps` times its first gradient's mean square at that first
    /// step, so that the step has the size of a row `steps` steps old (`lr/√(steps+1)` a
    /// coordinate) instead of a new row's `lr`, which would undo the row it was given. Stored
    /// as `-steps` until then.
    pub fn take_without_history(&mut self, rows: &Tensor, steps: f64) {
        tch::no_grad(|| {
            let _ = self
                .state
                .index_fill_(0, rows, -steps.max(f64::MIN_POSITIVE));
        });
    }

    /// Set the accumulator of rows `from..len` to `value` (a warm row's first step then has the
    /// size of an established row's, not `lr·√d`).
    pub fn seed_state(&mut self, from: i64, value: f64) {
        if from < self.len {
            tch::no_grad(|| {
                let _ = self.state.narrow(0, from, self.len - from).fill_(value);
            });
        }
    }

    /// Element-wise Adagrad on the biases of `rows` (unique indices) with their gradients `[n]`.
    pub fn adagrad_bias(&mut self, rows: &Tensor, grad: &Tensor, lr: f64) {
        tch::no_grad(|| {
            let g2 = grad.square();
            // The accumulated state is read before it is written (see `adagrad`).
            let denom = (self.bias_state.index_select(0, rows) + &g2).sqrt() + ADAGRAD_EPS;
            let _ = self.bias_state.index_add_(0, rows, &g2);
            let _ = self.bias.index_add_(0, rows, &(grad / denom * (-lr)));
            let _ = self.dirty.index_fill_(0, rows, 1);
        });
    }

    /// Apply gradients summed over several steps (`steps`: `[n]` Float, how many each row's sum
    /// is over) as that many steps of their mean: the state grows by `steps · mean²` (what the
    /// steps would have added, to first order) and the row moves by the sum over the
    /// denominator, where one Adagrad step of the sum would add `sum²` (`steps`² times as much)
    /// and slow the row's every later step. With `steps` all 1 it is [`NodeTable::adagrad`].
    pub fn adagrad_summed(&mut self, rows: &Tensor, grad: &Tensor, steps: &Tensor, lr: f64) {
        let g2 = tch::no_grad(|| grad.square().mean_dim(1, false, Kind::Float) / steps);
        self.adagrad_with(rows, grad, &g2, lr);
    }

    /// [`NodeTable::adagrad_bias`] of summed gradients (see [`NodeTable::adagrad_summed`]).
    pub fn adagrad_bias_summed(&mut self, rows: &Tensor, grad: &Tensor, steps: &Tensor, lr: f64) {
        tch::no_grad(|| {
            let g2 = grad.square() / steps;
            let denom = (self.bias_state.index_select(0, rows) + &g2).sqrt() + ADAGRAD_EPS;
            let _ = self.bias_state.index_add_(0, rows, &g2);
            let _ = self.bias.index_add_(0, rows, &(grad / denom * (-lr)));
            let _ = self.dirty.index_fill_(0, rows, 1);
        });
    }

    /// Apply one sparse Adagrad step to `rows` (unique indices) with their gradients `[n, D]`.
    pub fn adagrad(&mut self, rows: &Tensor, grad: &Tensor, lr: f64) {
        if self.adagrad_on_host(rows, grad, lr) {
            return;
        }
        let g2 = tch::no_grad(|| grad.square().mean_dim(1, false, Kind::Float));
        self.adagrad_with(rows, grad, &g2, lr);
    }

    /// The Adagrad step of `grad` on `rows` whose accumulators grow by `g2` (`[n]`).
    fn adagrad_with(&mut self, rows: &Tensor, grad: &Tensor, g2: &Tensor, lr: f64) {
        tch::no_grad(|| {
            // The denominator is this step's own `state + g²`, not the shared state read back
            // after adding: under Hogwild (`train.offline_workers`) another worker's write can
            // replace this one's addition, and a state read back smaller than `g²` (early on,
            // when states are tiny) turned a step of at most `lr` into one of `lr · g / g'`.
            let read = self.state.index_select(0, rows);
            // A row taken without its history (`-K`) starts as if it had seen K gradients of
            // this one's size ([`NodeTable::take_without_history`]).
            let state = read.where_self(&read.ge(0.0), &(-&read * g2));
            let denom = (&state + g2).sqrt() + ADAGRAD_EPS;
            let _ = self.state.index_add_(0, rows, &(state - read + g2));
            let step = grad / denom.unsqueeze(1) * (-lr);
            let _ = self.weights.index_add_(0, rows, &step);
            let _ = self.dirty.index_fill_(0, rows, 1);
        });
    }

    /// [`NodeTable::adagrad`] in one pass over host memory, when the table, its state and marks,
    /// the rows and the gradient are contiguous CPU tensors (else `false`, nothing done): each
    /// row's `g²`, denominator, state, values and dirty mark at once, where the tensor form walks
    /// the `[n, D]` gradient and the touched rows eleven times (square, mean, gather, add, sqrt,
    /// add, scatter, divide, multiply, scatter, fill). The same arithmetic up to one rounding
    /// (`g · (−lr / denom)` for `g / denom · −lr`), so the same values to float precision (a
    /// test holds them so).
    fn adagrad_on_host(&mut self, rows: &Tensor, grad: &Tensor, lr: f64) -> bool {
        let dim = self.weights.size()[1] as usize;
        let capacity = self.capacity();
        let host = |t: &Tensor, kind: Kind| {
            t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous()
        };
        if !(host(&self.weights, Kind::Float)
            && host(&self.state, Kind::Float)
            && host(&self.dirty, Kind::Bool)
            && host(rows, Kind::Int64)
            && host(grad, Kind::Float)
            && grad.dim() == 2
            && grad.size() == [rows.numel() as i64, dim as i64])
        {
            return false;
        }
        let n = rows.numel();
        if n == 0 {
            return true;
        }
        // SAFETY: `rows` is a contiguous CPU Int64 tensor of `n` values, `grad` a contiguous CPU
        // float tensor of `n · dim` (both checked above), alive for this call and only read.
        let (rows, grad) = unsafe {
            (
                std::slice::from_raw_parts(rows.data_ptr() as *const i64, n),
                std::slice::from_raw_parts(grad.data_ptr() as *const f32, n * dim),
            )
        };
        if rows.iter().any(|&r| r < 0 || r >= capacity) {
            return false;
        }
        let (weights, state) = (
            self.weights.data_ptr() as *mut f32,
            self.state.data_ptr() as *mut f32,
        );
        let dirty = self.dirty.data_ptr() as *mut bool;
        for (&row, g) in rows.iter().zip(grad.chunks_exact(dim)) {
            let row = row as usize;
            let g2 = mean_square(g);
            // SAFETY: `row < capacity` (checked above) indexes the table's `[capacity, dim]`
            // values, `[capacity]` state and marks, contiguous CPU tensors this table owns. Under
            // Hogwild (`train.offline_workers`) another worker may write the same row at once, as
            // libtorch's own index_add_ would: a lost addition, never a read out of bounds.
            unsafe {
                let s = state.add(row);
                if *s < 0.0 {
                    *s *= -g2;
                }
                let step = -(lr as f32) / ((*s + g2).sqrt() + ADAGRAD_EPS as f32);
                *s += g2;
                let values = std::slice::from_raw_parts_mut(weights.add(row * dim), dim);
                for (w, &gi) in values.iter_mut().zip(g) {
                    *w += gi * step;
                }
                *dirty.add(row) = true;
            }
        }
        true
    }
}

/// `Σ g² / len` with eight running sums (one accumulator would be a chain the compiler may not
/// reorder, so not vectorise).
fn mean_square(g: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    (lanes.iter().sum::<f32>() + rest) / g.len().max(1) as f32
}

/// All parameters of the model.
pub struct Embeddings {
    pub dim: i64,
    pub device: Device,
    pub tables: Vec<NodeTable>,
    pub relations: Tensor,
    /// Element-wise Adagrad accumulator of the relations.
    pub relation_state: Tensor,
    /// Each relation's operator for the other direction ([`ReverseRelations`]), when the model
    /// has them (`train.reverse_relations`).
    pub reverse: Option<ReverseRelations>,
}

/// PyTorch-BigGraph's dynamic-relation operators for the source side: a second translation per
/// relation, `h_r`, applied to the target when sources are ranked. Then a source `c` of
/// `(?, r, t)` scores `score(c, e_t + h_r)` while a target `c` of `(s, r, ?)` still scores
/// `score(e_s + e_r, c)`. Without them both directions share `e_r`, and with the dot comparator
/// the source side cannot use the relation at all: `(c + e_r)·e_t = c·e_t + e_r·e_t`, whose
/// relation term is the same for every candidate source.
pub struct ReverseRelations {
    /// `[relations, D]`.
    pub relations: Tensor,
    /// Element-wise Adagrad accumulator, `[relations, D]`.
    pub state: Tensor,
}

impl Embeddings {
    /// Empty tables for `node_types` types; relation vectors drawn from N(0, init_scale²).
    pub fn new(
        node_types: usize,
        relations: i64,
        dim: i64,
        init_scale: f64,
        device: Device,
    ) -> Embeddings {
        let relations_t =
            (Tensor::randn([relations, dim], (Kind::Float, device)) * init_scale).detach();
        Embeddings {
            dim,
            device,
            tables: (0..node_types)
                .map(|_| NodeTable::new(dim, device))
                .collect(),
            relation_state: Tensor::zeros([relations, dim], (Kind::Float, device)),
            relations: relations_t,
            reverse: None,
        }
    }

    /// Another handle on every parameter's storage ([`NodeTable::share`]): offline `train`'s
    /// workers each step through one, on tables grown beforehand.
    pub fn share(&self) -> Embeddings {
        Embeddings {
            dim: self.dim,
            device: self.device,
            tables: self.tables.iter().map(NodeTable::share).collect(),
            relations: self.relations.shallow_clone(),
            relation_state: self.relation_state.shallow_clone(),
            reverse: self.reverse.as_ref().map(|r| ReverseRelations {
                relations: r.relations.shallow_clone(),
                state: r.state.shallow_clone(),
            }),
        }
    }

    /// The relation parameters, flat ([`crate::train::RelationShares`]): every relation's
    /// vector, then every reverse operator when the model has them.
    pub fn relation_values(&self) -> Vec<f32> {
        let flat = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).expect("f32 relations");
        let mut values = flat(&self.relations);
        if let Some(rev) = &self.reverse {
            values.extend(flat(&rev.relations));
        }
        values
    }

    /// Set the relation parameters from [`Embeddings::relation_values`]' layout.
    pub fn set_relation_values(&mut self, values: &[f32]) {
        let device = self.device;
        let set = |t: &mut Tensor, values: &[f32]| {
            let v = Tensor::from_slice(values)
                .view(t.size().as_slice())
                .to_device(device);
            tch::no_grad(|| t.copy_(&v));
        };
        let n = self.relations.numel();
        set(&mut self.relations, &values[..n]);
        if let Some(rev) = &mut self.reverse {
            set(&mut rev.relations, &values[n..]);
        }
    }

    /// Give the model reverse relation operators ([`ReverseRelations`]), drawn from
    /// N(0, init_scale²), unless it has them.
    pub fn add_reverse_relations(&mut self, init_scale: f64) {
        if self.reverse.is_some() {
            return;
        }
        let size = self.relations.size();
        let opts = (Kind::Float, self.device);
        self.reverse = Some(ReverseRelations {
            relations: (Tensor::randn(size.as_slice(), opts) * init_scale).detach(),
            state: Tensor::zeros(size.as_slice(), opts),
        });
    }

    /// Empty tables for every node type of `schema` and its relations, shaped by `[train]`.
    pub fn for_schema(
        schema: &crate::schema::Schema,
        p: &crate::train::TrainParams,
        device: Device,
    ) -> Embeddings {
        let mut model = Embeddings::new(
            schema.node_types().len(),
            schema.relations().len() as i64,
            p.dim,
            p.init_scale,
            device,
        );
        model.set_biased(schema.node_types(), &p.bias_types);
        if p.reverse_relations {
            model.add_reverse_relations(p.init_scale);
        }
        model
    }

    /// Tables of the types named in `bias_types` carry a bias (`names`: the types in order).
    pub fn set_biased(&mut self, names: &[String], bias_types: &[String]) {
        for (table, name) in self.tables.iter_mut().zip(names) {
            table.biased = bias_types.contains(name);
        }
    }

    /// The biases of `dst_type`'s live rows when it is biased.
    pub fn target_bias(&self, dst_type: usize) -> Option<Tensor> {
        let t = &self.tables[dst_type];
        t.biased.then(|| t.biases())
    }

    /// Dense Adagrad step on the relation vectors.
    pub fn adagrad_relations(&mut self, grad: &Tensor, lr: f64) {
        dense_adagrad(&mut self.relations, &mut self.relation_state, grad, lr);
    }

    /// Dense Adagrad step on the reverse relation operators (none: nothing to do).
    pub fn adagrad_reverse(&mut self, grad: &Tensor, lr: f64) {
        if let Some(rev) = self.reverse.as_mut() {
            dense_adagrad(&mut rev.relations, &mut rev.state, grad, lr);
        }
    }
}

/// Element-wise Adagrad: `state += g²; params -= lr · g / (√state + ε)`, the denominator from
/// this step's own `state + g²` (see [`NodeTable::adagrad`]: every Hogwild worker updates the
/// relations at once, so a lost addition is the rule there, not the exception).
fn dense_adagrad(params: &mut Tensor, state: &mut Tensor, grad: &Tensor, lr: f64) {
    tch::no_grad(|| {
        let g2 = grad.square();
        let step = grad / ((&*state + &g2).sqrt() + ADAGRAD_EPS) * (-lr);
        let _ = state.g_add_(&g2);
        let _ = params.g_add_(&step);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(x.reshape([-1]).to_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn a_summed_gradient_counts_as_its_steps() {
        let table = || {
            let mut t = NodeTable::new(2, Device::Cpu);
            t.grow(2, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
            t
        };
        let rows = Tensor::from_slice(&[1i64]);
        let g = Tensor::from_slice(&[0.6f32, -0.8]).reshape([1, 2]);
        // One step's gradient: the plain step.
        let (mut a, mut b) = (table(), table());
        a.adagrad(&rows, &g, 0.1);
        b.adagrad_summed(&rows, &g, &Tensor::from_slice(&[1.0f32]), 0.1);
        assert_eq!(vals(&a.rows()), vals(&b.rows()));
        assert_eq!(vals(&a.state), vals(&b.state));
        // Four steps of g summed: the state grows by 4 · mean(g²) = 4 · 0.5 (not 16 · 0.5), and
        // the row moves by 4g / √2 · lr.
        let mut c = table();
        c.adagrad_summed(&rows, &(&g * 4.0), &Tensor::from_slice(&[4.0f32]), 0.1);
        assert!((vals(&c.state)[1] - 2.0).abs() < 1e-6);
        let moved = vals(&c.rows());
        let want = [
            -4.0 * 0.6 / 2f32.sqrt() * 0.1,
            4.0 * 0.8 / 2f32.sqrt() * 0.1,
        ];
        assert!(
            (moved[2] - want[0]).abs() < 1e-5 && (moved[3] - want[1]).abs() < 1e-5,
            "{moved:?}"
        );
        let mut d = table();
        d.biased = true;
        let bias = Tensor::from_slice(&[2.0f32]);
        d.adagrad_bias_summed(&rows, &bias, &Tensor::from_slice(&[4.0f32]), 0.1);
        // state 2²/4 = 1; the bias moves by −0.1 · 2 / √1.
        assert!((vals(&d.biases())[1] + 0.2).abs() < 1e-5);
    }

    /// A placeholder is live but no node's row: not held, not in the centroid; started, it is
    /// both, and written.
    #[test]
    fn placeholders_are_live_but_held_only_once_started() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(1, |n| Tensor::ones([n, 2], (Kind::Float, Device::Cpu)));
        let _ = t.take_dirty();
        t.grow_reaching(4, &HashSet::from([3]), |n| {
            Tensor::full([n, 2], 5.0, (Kind::Float, Device::Cpu))
        });
        assert_eq!((t.len(), t.held_count()), (4, 2));
        assert_eq!(
            (0..4).map(|i| t.holds(i)).collect::<Vec<_>>(),
            [true, false, false, true]
        );
        let mean = Vec::<f32>::try_from(t.held_mean().unwrap()).unwrap();
        assert_eq!(mean, [3.0, 3.0], "rows 0 and 3 only");
        assert_eq!(Vec::<i64>::try_from(t.take_dirty()).unwrap(), [1, 2, 3]);

        t.restart(
            &[1],
            &Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)),
            0.5,
        );
        assert!(t.holds(1) && !t.holds(2));
        assert_eq!(t.state.double_value(&[1]), 0.5);
        assert_eq!(t.weights.get(1).sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(Vec::<i64>::try_from(t.take_dirty()).unwrap(), [1]);
    }

    /// A placeholder's row in the published reference is noise until a version taken after
    /// its start is the reference: the drift control leaves it out until then.
    #[test]
    fn a_started_placeholder_has_a_published_row_once_a_later_version_is_the_reference() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(1, |n| Tensor::ones([n, 2], (Kind::Float, Device::Cpu)));
        t.grow_reaching(3, &HashSet::from([2]), |n| {
            Tensor::zeros([n, 2], (Kind::Float, Device::Cpu))
        });
        let published = |t: &NodeTable| {
            Vec::<i64>::try_from(t.with_published_row(Tensor::from_slice(&[0i64, 1, 2]))).unwrap()
        };
        assert_eq!(published(&t), [0, 2], "row 1 is a placeholder");
        t.version_taken(); // published with row 1 as noise
        t.reference_adopted();
        t.hold(&[1]);
        assert_eq!(published(&t), [0, 2], "started since the reference");
        t.version_taken(); // row 1 goes out with its value
        assert_eq!(
            published(&t),
            [0, 2],
            "its version is not the reference yet"
        );
        t.reference_adopted();
        assert_eq!(published(&t), [0, 1, 2]);
        assert!((0..3).all(|i| t.has_published_row(i)));
    }

    #[test]
    fn growth_doubles_capacity_and_keeps_old_rows() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(3, |n| Tensor::ones([n, 2], (Kind::Float, Device::Cpu)));
        assert_eq!((t.len(), t.capacity()), (3, 16));
        t.adagrad(
            &Tensor::from_slice(&[1i64]),
            &Tensor::from_slice(&[1.0f32, 1.0]).reshape([1, 2]),
            0.5,
        );
        let before = vals(&t.rows());
        t.grow(40, |n| {
            Tensor::full([n, 2], 7.0, (Kind::Float, Device::Cpu))
        });
        assert_eq!((t.len(), t.capacity()), (40, 64));
        assert_eq!(
            &vals(&t.rows())[..6],
            &before[..],
            "old rows survive growth"
        );
        assert_eq!(vals(&t.rows())[6], 7.0, "new rows are initialised");
        assert_eq!(
            vals(&t.state.narrow(0, 0, 3)),
            vec![0.0, 1.0, 0.0],
            "optimiser state survives growth"
        );
    }

    #[test]
    fn row_wise_adagrad_matches_hand_computation_and_leaves_other_rows() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(3, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        let rows = Tensor::from_slice(&[2i64, 0]);
        let grad = Tensor::from_slice(&[3.0f32, 4.0, 1.0, 1.0]).reshape([2, 2]);
        t.adagrad(&rows, &grad, 0.1);
        // row 2: state = (9 + 16)/2 = 12.5; step = −0.1 · g / √12.5
        let s = 12.5f32.sqrt();
        let w = vals(&t.rows());
        let want = [-0.1 / 1.0, -0.1 / 1.0, 0.0, 0.0, -0.3 / s, -0.4 / s];
        for (g, e) in w.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(vals(&t.state.narrow(0, 0, 3)), vec![1.0, 0.0, 12.5]);
        // A second step accumulates.
        t.adagrad(
            &Tensor::from_slice(&[0i64]),
            &Tensor::from_slice(&[1.0f32, 1.0]).reshape([1, 2]),
            0.1,
        );
        let w0 = vals(&t.rows())[0];
        assert!((w0 - (-0.1 - 0.1 / 2f32.sqrt())).abs() < 1e-6);
    }

    #[test]
    fn golden_seeded_state_shrinks_the_first_step() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(2, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        let g = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
        t.adagrad(&Tensor::from_slice(&[0i64]), &g, 0.1);
        // Row 0's accumulator is 12.5; the mean over rows 0 and 1 is 6.25.
        assert_eq!(t.mean_state(), Some(6.25));
        t.grow(3, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        t.seed_state(2, 6.25);
        assert_eq!(vals(&t.state.narrow(0, 0, 3)), vec![12.5, 0.0, 6.25]);
        // Its first step: -0.1 · g / √(6.25 + 12.5), not -0.1 · g / √12.5.
        t.adagrad(&Tensor::from_slice(&[2i64]), &g, 0.1);
        let w = vals(&t.rows().get(2));
        let d = 18.75f32.sqrt();
        assert!(
            (w[0] + 0.3 / d).abs() < 1e-6 && (w[1] + 0.4 / d).abs() < 1e-6,
            "{w:?}"
        );
    }

    /// A row taken without its history steps as one K steps old, on the host and through
    /// libtorch (a gradient that is not contiguous takes the tensor path): K = 3, g = (3, 4),
    /// g² = 12.5, state 3 · 12.5 + 12.5 = 50, step −0.1 · g / √50; a row beside it is untouched.
    #[test]
    fn golden_a_row_taken_without_history_steps_as_one_k_steps_old() {
        for contiguous in [true, false] {
            let mut t = NodeTable::new(2, Device::Cpu);
            t.grow(2, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
            t.take_without_history(&Tensor::from_slice(&[0i64]), 3.0);
            assert_eq!(vals(&t.state.narrow(0, 0, 2)), vec![-3.0, 0.0]);
            assert_eq!(t.mean_state(), Some(0.0));
            let g = if contiguous {
                Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2])
            } else {
                // Every other value of (3, 0, 4, 0): a view with stride 2.
                let spaced = Tensor::from_slice(&[3.0f32, 0.0, 4.0, 0.0]).reshape([1, 4]);
                spaced.slice(1, 0, 4, 2)
            };
            assert_eq!(g.is_contiguous(), contiguous);
            t.adagrad(&Tensor::from_slice(&[0i64]), &g, 0.1);
            let d = 50f32.sqrt();
            let w = vals(&t.rows());
            let want = [-0.3 / d, -0.4 / d, 0.0, 0.0];
            for (got, e) in w.iter().zip(want) {
                assert!((got - e).abs() < 1e-6, "contiguous {contiguous}: {w:?}");
            }
            let state = vals(&t.state.narrow(0, 0, 2));
            assert!(
                (state[0] - 50.0).abs() < 1e-4 && state[1] == 0.0,
                "{state:?}"
            );
        }
    }

    #[test]
    fn dirty_rows_are_the_grown_and_the_stepped_ones() {
        let mut t = NodeTable::new(2, Device::Cpu);
        t.grow(3, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        assert_eq!(Vec::<i64>::try_from(t.take_dirty()).unwrap(), vec![0, 1, 2]);
        assert_eq!(t.dirty_count(), 0);
        t.adagrad(
            &Tensor::from_slice(&[2i64]),
            &Tensor::from_slice(&[1.0f32, 1.0]).reshape([1, 2]),
            0.1,
        );
        // Growth past the capacity keeps the marks.
        t.grow(20, |n| Tensor::zeros([n, 2], (Kind::Float, Device::Cpu)));
        let dirty = Vec::<i64>::try_from(t.take_dirty()).unwrap();
        assert_eq!(dirty, [2].into_iter().chain(3..20).collect::<Vec<i64>>());
        t.mark_all_dirty();
        assert_eq!(t.dirty_count(), 20);
    }

    /// The host pass and the tensor form of row-wise Adagrad give the same rows, state and
    /// marks (to float rounding), over repeated rows' steps and rows left alone.
    #[test]
    fn host_adagrad_is_the_tensor_adagrad() {
        // Drawn from a generator of the test's own: torch's is shared with the tests beside it.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut draw = |rows: i64| {
            let v: Vec<f32> = (0..rows * 40)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            Tensor::from_slice(&v).reshape([rows, 40])
        };
        let mut host = NodeTable::new(40, Device::Cpu);
        host.grow(30, &mut draw);
        let _ = host.take_dirty();
        let mut tensor = host.share();
        tensor.weights = host.weights.copy();
        tensor.state = host.state.copy();
        tensor.dirty = host.dirty.copy();
        for step in 0..3 {
            let rows = Tensor::from_slice(&[4i64, 17, 0, 29 - step]);
            let grad = draw(4) * (step + 1);
            assert!(host.adagrad_on_host(&rows, &grad, 0.1));
            let (g2, denom) = tch::no_grad(|| {
                let g2 = grad.square().mean_dim(1, false, Kind::Float);
                let denom = (tensor.state.index_select(0, &rows) + &g2).sqrt() + ADAGRAD_EPS;
                (g2, denom)
            });
            let _ = tensor.state.index_add_(0, &rows, &g2);
            let step = &grad / denom.unsqueeze(1) * (-0.1);
            let _ = tensor.weights.index_add_(0, &rows, &step);
            let _ = tensor.dirty.index_fill_(0, &rows, 1);
        }
        // To float rounding: relative to the values' size (the state sums squares).
        let close = |a: &Tensor, b: &Tensor| {
            let diff = (a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]).max(1.0);
            assert!(
                diff <= 1e-6 * scale,
                "max difference {diff} at scale {scale}"
            );
        };
        close(&host.rows(), &tensor.rows());
        close(&host.state, &tensor.state);
        assert_eq!(
            Vec::<i64>::try_from(host.take_dirty()).unwrap(),
            Vec::<i64>::try_from(tensor.take_dirty()).unwrap()
        );
    }

    #[test]
    fn relation_adagrad_is_element_wise() {
        let mut e = Embeddings::new(1, 1, 2, 0.0, Device::Cpu);
        e.adagrad_relations(&Tensor::from_slice(&[2.0f32, -1.0]).reshape([1, 2]), 0.5);
        let r = vals(&e.relations);
        assert!(
            (r[0] + 0.5).abs() < 1e-6 && (r[1] - 0.5).abs() < 1e-6,
            "{r:?}"
        );
    }
}
