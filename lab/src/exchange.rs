//! `twhin-lab exchange`: the gradient exchange (issue 24) without Kafka, versions or their delay.
//! Two trainers ([`TrainerCore`]) share one store and split its nodes by the daemon's
//! partitioner; each trains the edges whose source it owns. Every `window` chunks of the stream
//! each takes a window as a version would, the other applies it at once, and each hands the
//! rows it owns that changed to the other's copies, with the windows of that sender its rows
//! include, as its version marker says. The same stream goes through one trainer, and through
//! two trainers that never exchange (two independent models, the daemon with the exchange
//! off). If the exchange at a window of one chunk ranks below one trainer, the mechanism is at
//! fault; if it comes close and falls behind as the window grows, the delay is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tch::Device;

use twhin_stream::config::Config;
use twhin_stream::exchange::{
    ChangedRow, ChangedRows, GradientInbox, KeyedGradient, WindowAttempt, WindowId, WindowPart,
};
use twhin_stream::offline::synthetic::{SyntheticSpec, Workload};
use twhin_stream::offline::{open_offline_store, run_dir, split_events, DataSource};
use twhin_stream::partition::{partition_of, Ownership};
use twhin_stream::schema::{Event, NodeKey};
use twhin_stream::store::{AppendBatch, GraphStore, NodeRef};
use twhin_stream::train::{
    known_targets, target_ranks, DeltaRequest, Embeddings, ModelDelta, RankSum, RankTotals,
    TargetQuery, TrainerCore,
};

/// Partitions the nodes are split by (the engagements topic's count); the first trainer owns
/// the lower half.
const PARTITIONS: u32 = 8;

#[derive(Debug, Clone, clap::Args)]
pub struct ExchangeOptions {
    /// Nodes of the synthetic stream.
    #[arg(long, default_value_t = 300_000)]
    pub nodes: u64,
    /// Events of the synthetic stream.
    #[arg(long, default_value_t = 3_000_000)]
    pub edges: u64,
    /// Events appended to the store at a time; every trainer then trains all of them.
    #[arg(long, default_value_t = 10_000)]
    pub chunk: usize,
    /// Chunks per exchange window (1: the other trainer has a window's gradients and rows
    /// before the next chunk), one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub windows: Vec<usize>,
    /// Train only this first share of the stream (settings are chosen on the first 20%, and
    /// the figures of the whole stream's last 80% are the test).
    #[arg(long, default_value_t = 1.0)]
    pub prefix: f64,
    /// Leave the copies of rows owned elsewhere as each trainer trains them (gradients still go
    /// to their owners): what the owners' application of the windows does on its own.
    #[arg(long)]
    pub no_refresh: bool,
    /// Give each trainer a store of its own holding the events whose source it owns, as the
    /// daemon's instances have (the default: one store both read): an owner then learns of the
    /// nodes only the other's events name from their gradients, and each trainer ranks against
    /// the nodes it knows.
    #[arg(long)]
    pub separate_stores: bool,
    /// With `--separate-stores`: also store each event at its target's owner (which does not
    /// train it: it trains the edges whose source it owns), so that an owner knows every node
    /// of its partitions that a gradient can name.
    #[arg(long)]
    pub targets_stored: bool,
    /// With `--separate-stores`: the target's owner interns the target node when its event
    /// arrives, without storing the event (what knowing the node on arrival is worth, apart
    /// from the event's edge).
    #[arg(long)]
    pub targets_interned: bool,
    /// Each trainer applies the other's window before the next chunk is appended (by default it
    /// applies it at its first step on that chunk, as the daemon applies a window while ingest
    /// goes on: growing its tables to a node the window names then gives the nodes appended
    /// since a row before their first edge is ranked).
    #[arg(long)]
    pub apply_at_once: bool,
    /// Also rank the same sample of the stream (every 40th event of the last 80%, before its
    /// chunk is stored) against the served table, as a subscriber would: the source's row and
    /// every node of the target's type each as its owner holds it (one trainer: its model; two:
    /// each node from the trainer owning its partition, a copy of a node its owner does not
    /// hold is not served). The trainers' own prequential ranks each trainer's copies against the
    /// rows it holds.
    #[arg(long)]
    pub rank_served: bool,
    /// Also run each window with the owner's Adagrad accumulators copied with its rows (which
    /// the daemon cannot do: they are not published), to see what the copies' own optimiser
    /// state costs.
    #[arg(long)]
    pub with_state: bool,
}

/// One way of training the stream.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `one`, `two-apart`, `two-exchange`, or `two-exchange+state` (the owner's accumulators
    /// copied with its rows).
    pub mode: String,
    /// Chunks per window (`two-exchange` only).
    pub window_chunks: Option<usize>,
    /// Prequential ranks over the last 80% of the stream, both trainers' together.
    pub ranked: u64,
    #[serde(rename = "hits@10")]
    pub hits10: f64,
    pub mrr: f64,
    /// Rows sent, applied by their owner, and copied over the sender's copies, in all.
    pub rows_sent: u64,
    pub rows_applied: u64,
    pub rows_refreshed: u64,
    /// Rows sent for nodes their owner's store did not know (interned there, started at the
    /// sender's row).
    pub rows_started: u64,
    /// Rows the owner did not apply.
    pub rows_unknown: u64,
    /// Rows each trainer's model holds at the end, every type (the mean of the two): what it
    /// ranks a target against is its rows of the target's type, so a trainer that knows fewer
    /// nodes ranks against fewer candidates.
    pub rows_held: u64,
    /// With `--rank-served`: the same sample of the last 80% ranked against the served table.
    pub served: Option<ServedFigures>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExchangeReport {
    pub nodes: u64,
    pub edges: u64,
    /// The events trained (the prefix's).
    pub trained: usize,
    /// Whether each trainer had a store of its own (`--separate-stores`), and whether it also
    /// stored the events whose target it owns (`--targets-stored`) or interned their targets
    /// (`--targets-interned`).
    pub separate_stores: bool,
    pub targets_stored: bool,
    pub targets_interned: bool,
    /// Whether a sample was also ranked against the served table (`--rank-served`).
    pub rank_served: bool,
    pub chunk: usize,
    pub runs: Vec<Run>,
}

impl ExchangeReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "synthetic stream, {} nodes, {} events ({} trained), chunks of {}{}: prequential over \
             the last 80% of those trained{}\n\
             {:<18} {:>7} {:>8} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>21} {:>8}\n",
            self.nodes,
            self.edges,
            self.trained,
            self.chunk,
            match (
                self.separate_stores,
                self.targets_stored,
                self.targets_interned
            ) {
                (true, true, _) => ", a store per trainer with its targets' events too",
                (true, false, true) => ", a store per trainer, targets interned on arrival",
                (true, false, false) => ", a store per trainer",
                _ => "",
            },
            match self.rank_served {
                true => "; served: every 40th event ranked before its chunk against the served table",
                false => "",
            },
            "mode",
            "window",
            "ranked",
            "Hits@10",
            "MRR",
            "sent",
            "applied",
            "started",
            "unknown",
            "refreshed",
            "rows held",
            "served: ranked H@10 MRR",
            "seconds"
        );
        for r in &self.runs {
            let window = r.window_chunks.map_or("-".into(), |w| w.to_string());
            out += &format!(
                "{:<18} {:>7} {:>8} {:>8.4} {:>7.4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>21} {:>8.1}\n",
                r.mode,
                window,
                r.ranked,
                r.hits10,
                r.mrr,
                r.rows_sent,
                r.rows_applied,
                r.rows_started,
                r.rows_unknown,
                r.rows_refreshed,
                r.rows_held,
                r.served.as_ref().map_or("-".into(), |f| format!(
                    "{} {:.4} {:.4}",
                    f.ranked, f.hits10, f.mrr
                )),
                r.seconds
            );
        }
        out
    }
}

/// Rows an owner hands over, taken once by the other trainer.
#[derive(Debug, Default)]
struct Handed(Mutex<Vec<ChangedRow>>);

impl ChangedRows for Handed {
    fn take_changed(&self) -> Vec<ChangedRow> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One of two trainers: its name (the sender id), the partitions it owns, its inbox, and the
/// rows the other hands it.
struct Instance {
    core: TrainerCore,
    store: Arc<GraphStore>,
    keys: Keys,
    name: String,
    owns: Vec<i32>,
    inbox: Arc<GradientInbox>,
    handed: Arc<Handed>,
    sent: u64,
}

impl Instance {
    /// The rows of type `t` below `len` that this trainer's model holds (not placeholders): each
    /// row's index, its node's key, and whether this trainer owns the node.
    fn held_keys(&mut self, t: usize, len: i64) -> anyhow::Result<Vec<(i64, String, bool)>> {
        let mut held = Vec::new();
        for i in 0..len {
            if !self.core.model.tables[t].holds(i) {
                continue;
            }
            let node = NodeRef {
                node_type: t as u16,
                index: i as u32,
            };
            let (key, q) = self.keys.get(&self.store, node)?.clone();
            held.push((i, key, self.owns.binary_search(&q).is_ok()));
        }
        Ok(held)
    }
}

/// Each node's key and partition, by type and index (the store's nodes so far), and back.
#[derive(Default)]
struct Keys {
    by_type: Vec<Vec<(String, i32)>>,
    index_of: Vec<HashMap<String, u32>>,
}

impl Keys {
    fn get(&mut self, store: &GraphStore, node: NodeRef) -> anyhow::Result<&(String, i32)> {
        let t = node.node_type as usize;
        if self.by_type.len() <= t {
            self.by_type.resize_with(t + 1, Vec::new);
            self.index_of.resize_with(t + 1, HashMap::new);
        }
        let names = &store.stored_schema().node_types;
        let known = &mut self.by_type[t];
        while known.len() <= node.index as usize {
            let at = NodeRef {
                node_type: node.node_type,
                index: known.len() as u32,
            };
            let id = (store.node_id(at)?)
                .ok_or_else(|| anyhow::anyhow!("node {at:?} has no id in the store"))?;
            let key = format!("{}:{}", names[t], id);
            let q = partition_of(key.as_bytes(), PARTITIONS) as i32;
            self.index_of[t].insert(key.clone(), at.index);
            known.push((key, q));
        }
        Ok(&known[node.index as usize])
    }

    /// The index of `key` of type `t` among the first `below` nodes of `store` (`None`: not
    /// among them).
    fn index_below(
        &mut self,
        store: &GraphStore,
        t: usize,
        key: &str,
        below: i64,
    ) -> anyhow::Result<Option<u32>> {
        if below > 0 {
            let last = NodeRef {
                node_type: t as u16,
                index: (below - 1) as u32,
            };
            self.get(store, last)?;
        }
        let found = self.index_of.get(t).and_then(|m| m.get(key)).copied();
        Ok(found.filter(|&i| i64::from(i) < below))
    }
}

/// Every this many events of the stream, one is ranked against the served table
/// (`--rank-served`): the same events at every instance count.
const SERVED_EVERY: usize = 40;

/// Ranks against the served table (`--rank-served`).
#[derive(Debug, Clone, Serialize)]
pub struct ServedFigures {
    pub ranked: usize,
    #[serde(rename = "hits@10")]
    pub hits10: f64,
    pub mrr: f64,
}

impl ServedFigures {
    fn of(sum: &RankSum) -> ServedFigures {
        let m = sum.metrics();
        ServedFigures {
            ranked: m.rankings,
            hits10: m.hits10,
            mrr: m.mrr,
        }
    }
}

/// The events of chunk `c` that the served ranking takes.
fn sampled(chunk: &[Event], c: usize, size: usize) -> impl Iterator<Item = &Event> {
    (chunk.iter().enumerate())
        .filter(move |(k, _)| (c * size + k) % SERVED_EVERY == 0)
        .map(|(_, e)| e)
}

fn key_of(store: &GraphStore, node: &NodeKey) -> String {
    format!(
        "{}:{}",
        store.stored_schema().node_types[node.node_type as usize],
        node.id
    )
}

/// `node`'s row in `core`, when its store knows it and its model holds it.
fn held(core: &TrainerCore, store: &GraphStore, node: &NodeKey) -> anyhow::Result<Option<i64>> {
    let t = node.node_type as usize;
    Ok((store.node_index(node.node_type, &node.id)?)
        .map(i64::from)
        .filter(|&i| core.model.tables[t].holds(i)))
}

/// The query ranking `e`'s target at row `dst` of the served table, its source being `src` of
/// `core`'s, with `core`'s known targets and history.
fn served_query(
    core: &TrainerCore,
    store: &GraphStore,
    e: &Event,
    src: i64,
    dst: i64,
) -> anyhow::Result<TargetQuery> {
    let node = NodeRef {
        node_type: e.src.node_type,
        index: src as u32,
    };
    let dst_type = e.dst.node_type as usize;
    Ok(TargetQuery {
        src_type: e.src.node_type as usize,
        src,
        rel: e.rel as i64,
        dst_type,
        dst,
        known: known_targets(store, node, e.rel, e.dst.node_type)?,
        history: core.history_of(store, node, dst_type, u64::MAX)?,
    })
}

/// Trainer `x`'s source rows beside the served table: per type, `x`'s rows of the nodes it
/// owns, the other's rows of the nodes the other owns and holds (over `x`'s copies, or after
/// `x`'s rows for the nodes `x` does not hold: `appended` says where), and a copy `x` holds of
/// a node its owner does not hold left a placeholder (not served).
struct ServedView {
    model: Embeddings,
    appended: Vec<HashMap<String, i64>>,
}

fn served_view(pair: &mut [Instance], x: usize) -> anyhow::Result<ServedView> {
    let y = 1 - x;
    let (types, dim) = (pair[x].core.model.tables.len(), pair[x].core.model.dim);
    let (relations, device) = {
        let m = &pair[x].core.model;
        (m.relations.size()[0], m.device)
    };
    let mut model = Embeddings::new(types, relations, dim, 0.0, device);
    tch::no_grad(|| model.relations.copy_(&pair[x].core.model.relations));
    let mut appended = vec![HashMap::new(); types];
    for (t, appended) in appended.iter_mut().enumerate() {
        let (x_len, y_len) = (
            pair[x].core.model.tables[t].len(),
            pair[y].core.model.tables[t].len(),
        );
        let mut named = HashSet::new();
        let (mut over, mut from) = (Vec::new(), Vec::new());
        for (i, key, owned) in pair[x].held_keys(t, x_len)? {
            if owned {
                named.insert(i);
                continue;
            }
            let other = &mut pair[y];
            let j = other.keys.index_below(&other.store, t, &key, y_len)?;
            if let Some(j) = j.map(i64::from) {
                if other.core.model.tables[t].holds(j) {
                    named.insert(i);
                    over.push(i);
                    from.push(j);
                }
            }
        }
        let mut outside = Vec::new();
        for (j, key, owned) in pair[y].held_keys(t, y_len)? {
            if !owned {
                continue;
            }
            let me = &mut pair[x];
            let i = me.keys.index_below(&me.store, t, &key, x_len)?;
            if i.is_some_and(|i| named.contains(&i64::from(i))) {
                continue;
            }
            let at = x_len + outside.len() as i64;
            named.insert(at);
            appended.insert(key, at);
            outside.push(j);
        }
        let (mine, theirs) = (&pair[x].core.model.tables[t], &pair[y].core.model.tables[t]);
        let idx = |v: &[i64]| tch::Tensor::from_slice(v).to_device(device);
        let (values, biases) = tch::no_grad(|| {
            let mut values = mine.rows().copy();
            let mut biases = mine.biases().copy();
            if !over.is_empty() {
                let rows = theirs.weights.index_select(0, &idx(&from));
                let _ = values.index_copy_(0, &idx(&over), &rows);
                let b = theirs.bias.index_select(0, &idx(&from));
                let _ = biases.index_copy_(0, &idx(&over), &b);
            }
            if !outside.is_empty() {
                let rows = theirs.weights.index_select(0, &idx(&outside));
                values = tch::Tensor::cat(&[values, rows], 0);
                let b = theirs.bias.index_select(0, &idx(&outside));
                biases = tch::Tensor::cat(&[biases, b], 0);
            }
            (values, biases)
        });
        let n = values.size()[0];
        let table = &mut model.tables[t];
        table.biased = mine.biased;
        table.grow_reaching(n, &named, |_| values);
        tch::no_grad(|| table.bias.narrow(0, 0, n).copy_(&biases));
    }
    Ok(ServedView { model, appended })
}

/// Rank chunk `c`'s sampled events whose source trainer `x` owns against `x`'s served view.
fn rank_served_two(
    pair: &mut [Instance],
    chunk: &[Event],
    c: usize,
    opts: &ExchangeOptions,
    owner: &dyn Fn(&NodeKey) -> usize,
    cfg: &Config,
    sum: &mut RankSum,
) -> anyhow::Result<()> {
    for x in 0..pair.len() {
        let events: Vec<&Event> = sampled(chunk, c, opts.chunk)
            .filter(|e| owner(&e.src) == x)
            .collect();
        if events.is_empty() {
            continue;
        }
        let view = served_view(pair, x)?;
        let me = &pair[x];
        let mut queries = Vec::new();
        for e in events {
            let Some(src) = held(&me.core, &me.store, &e.src)? else {
                continue;
            };
            let t = e.dst.node_type as usize;
            let dst = match owner(&e.dst) == x {
                true => held(&me.core, &me.store, &e.dst)?,
                false => match me.store.node_index(e.dst.node_type, &e.dst.id)? {
                    Some(i) if view.model.tables[t].holds(i64::from(i)) => Some(i64::from(i)),
                    _ => view.appended[t].get(&key_of(&me.store, &e.dst)).copied(),
                },
            };
            if let Some(dst) = dst {
                queries.push(served_query(&me.core, &me.store, e, src, dst)?);
            }
        }
        for r in target_ranks(&view.model, cfg.train.comparator, &queries) {
            sum.add(r);
        }
    }
    Ok(())
}

/// The synthetic stream, generated into `dir` and read back as events in order.
fn synthetic_events(
    cfg: &Config,
    opts: &ExchangeOptions,
    dir: &Path,
) -> anyhow::Result<Vec<Event>> {
    let schema = cfg.schema();
    let data = dir.join("data");
    Workload::new(
        &schema,
        SyntheticSpec::new(opts.nodes, opts.edges, cfg.train.seed),
    )?
    .write_dir(&data)?;
    let mut events = Vec::new();
    for split in ["train", "valid", "test"] {
        events.extend(split_events(
            cfg,
            &schema,
            DataSource::Dir(data.clone()),
            split,
        )?);
    }
    Ok(events)
}

/// Every run of `opts` on the synthetic stream: one trainer, two apart, then two exchanging at
/// each window (and with the owner's accumulators, when asked). Each run is logged as it ends.
pub fn measure(
    cfg: &Config,
    device: Device,
    opts: &ExchangeOptions,
) -> anyhow::Result<ExchangeReport> {
    if !(opts.prefix > 0.0 && opts.prefix <= 1.0) {
        anyhow::bail!(
            "--prefix {} is not a share of the stream in (0, 1]",
            opts.prefix
        );
    }
    if opts.with_state && opts.separate_stores {
        anyhow::bail!("--with-state copies accumulators by row index, which needs one store: drop --separate-stores");
    }
    if opts.chunk == 0 || opts.windows.contains(&0) {
        anyhow::bail!("--chunk and every --windows value count chunks of events: at least 1");
    }
    // A folder of its own beside the other offline runs', removed at the end.
    let base = run_dir(cfg, DataSource::Dir("exchange".into()));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new().prefix("run-").tempdir_in(&base)?;
    let work = work.path();
    let mut events = synthetic_events(cfg, opts, work)?;
    events.truncate((events.len() as f64 * opts.prefix).round() as usize);
    let mut runs = vec![
        one(cfg, device, opts, &events, &work.join("one"))?,
        two(cfg, device, opts, &events, &work.join("apart"), None, false)?,
    ];
    for &w in &opts.windows {
        let dir = work.join(format!("window-{w}"));
        runs.push(two(cfg, device, opts, &events, &dir, Some(w), false)?);
        if opts.with_state {
            let dir = work.join(format!("window-{w}-state"));
            runs.push(two(cfg, device, opts, &events, &dir, Some(w), true)?);
        }
    }
    Ok(ExchangeReport {
        nodes: opts.nodes,
        edges: opts.edges,
        trained: events.len(),
        separate_stores: opts.separate_stores,
        targets_stored: opts.separate_stores && opts.targets_stored,
        targets_interned: opts.separate_stores && opts.targets_interned,
        rank_served: opts.rank_served,
        chunk: opts.chunk,
        runs,
    })
}

fn new_core(cfg: &Config, device: Device) -> TrainerCore {
    tch::manual_seed(cfg.train.seed as i64);
    let model = Embeddings::for_schema(&cfg.schema(), &cfg.train, device);
    TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone())
}

/// Append chunk `c` of `events` to `store`.
fn append(
    store: &GraphStore,
    opts: &ExchangeOptions,
    c: usize,
    chunk: &[Event],
) -> anyhow::Result<()> {
    let batch =
        AppendBatch::from_events("exchange", (c * opts.chunk) as i64, chunk.iter().cloned());
    store.append(&batch)?;
    Ok(())
}

fn drain(core: &mut TrainerCore, store: &GraphStore) -> anyhow::Result<()> {
    while core.step(store)?.stats.is_some() {}
    Ok(())
}

/// The ranks since `mark`, as a run's figures.
fn figures(
    mode: &str,
    window: Option<usize>,
    now: RankTotals,
    mark: RankTotals,
    started: Instant,
) -> Run {
    let ranked = now.ranked - mark.ranked;
    let n = ranked.max(1) as f64;
    Run {
        mode: mode.into(),
        window_chunks: window,
        ranked,
        hits10: (now.hits10 - mark.hits10) as f64 / n,
        mrr: (now.reciprocal_ranks - mark.reciprocal_ranks) / n,
        rows_sent: 0,
        rows_applied: 0,
        rows_refreshed: 0,
        rows_started: 0,
        rows_unknown: 0,
        rows_held: 0,
        served: None,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// A run, logged as it ends (the whole measurement takes minutes per run).
fn logged(run: Run) -> Run {
    tracing::info!(mode = %run.mode, window = ?run.window_chunks, hits10 = run.hits10, mrr = run.mrr,
        seconds = run.seconds, "exchange run done");
    run
}

fn sum(a: RankTotals, b: RankTotals) -> RankTotals {
    RankTotals {
        ranked: a.ranked + b.ranked,
        hits10: a.hits10 + b.hits10,
        reciprocal_ranks: a.reciprocal_ranks + b.reciprocal_ranks,
    }
}

fn one(
    cfg: &Config,
    device: Device,
    opts: &ExchangeOptions,
    events: &[Event],
    dir: &Path,
) -> anyhow::Result<Run> {
    let store = open_offline_store(dir, &cfg.schema())?;
    let mut core = new_core(cfg, device);
    let started = Instant::now();
    let mut mark = None;
    let mut served = RankSum::default();
    for (c, chunk) in events.chunks(opts.chunk).enumerate() {
        if mark.is_none() && c * opts.chunk >= events.len() / 5 {
            mark = Some(core.window.totals());
        }
        if opts.rank_served && mark.is_some() {
            let mut queries = Vec::new();
            for e in sampled(chunk, c, opts.chunk) {
                if let (Some(src), Some(dst)) =
                    (held(&core, &store, &e.src)?, held(&core, &store, &e.dst)?)
                {
                    queries.push(served_query(&core, &store, e, src, dst)?);
                }
            }
            for r in target_ranks(&core.model, cfg.train.comparator, &queries) {
                served.add(r);
            }
        }
        append(&store, opts, c, chunk)?;
        drain(&mut core, &store)?;
    }
    let mut run = figures(
        "one",
        None,
        core.window.totals(),
        mark.unwrap_or_default(),
        started,
    );
    run.rows_held = rows_held(&core);
    run.served = opts.rank_served.then(|| ServedFigures::of(&served));
    Ok(logged(run))
}

/// Rows `core`'s model holds, every type.
fn rows_held(core: &TrainerCore) -> u64 {
    core.model
        .tables
        .iter()
        .map(|t| t.held_count() as u64)
        .sum()
}

fn two(
    cfg: &Config,
    device: Device,
    opts: &ExchangeOptions,
    events: &[Event],
    dir: &Path,
    window: Option<usize>,
    with_state: bool,
) -> anyhow::Result<Run> {
    let schema = cfg.schema();
    let shared = Arc::new(open_offline_store(dir, &schema)?);
    let half = PARTITIONS as i32 / 2;
    let mut pair: Vec<Instance> = [("a", 0..half), ("b", half..2 * half)]
        .into_iter()
        .map(|(name, owns)| -> anyhow::Result<Instance> {
            let store = match opts.separate_stores {
                true => Arc::new(open_offline_store(&dir.join(name), &schema)?),
                false => shared.clone(),
            };
            let owns: Vec<i32> = owns.collect();
            let ownership = Arc::new(Ownership::default());
            ownership.set_partition_count(PARTITIONS);
            ownership.assign(&owns);
            let mut core = new_core(cfg, device);
            core.train_owned_sources(ownership);
            let inbox = Arc::new(GradientInbox::new(name.into()));
            let handed = Arc::new(Handed::default());
            if window.is_some() {
                core.exchange_gradients(inbox.clone());
                if !opts.no_refresh {
                    inbox.refresh_from(handed.clone());
                }
            }
            Ok(Instance {
                core,
                store,
                keys: Keys::default(),
                name: name.into(),
                owns,
                inbox,
                handed,
                sent: 0,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut mark = None;
    let mut version = 0;
    let mut served = RankSum::default();
    let owner = |n: &NodeKey| {
        let key = format!("{}:{}", schema.type_name(n.node_type), n.id);
        usize::from(partition_of(key.as_bytes(), PARTITIONS) as i32 >= half)
    };
    for (c, chunk) in events.chunks(opts.chunk).enumerate() {
        if mark.is_none() && c * opts.chunk >= events.len() / 5 {
            mark = Some(sum(
                pair[0].core.window.totals(),
                pair[1].core.window.totals(),
            ));
        }
        if opts.rank_served && mark.is_some() {
            rank_served_two(&mut pair, chunk, c, opts, &owner, cfg, &mut served)?;
        }
        match opts.separate_stores {
            // Each event goes to its source's owner, as the daemon routes it.
            true => {
                let mut routed: [Vec<Event>; 2] = Default::default();
                let mut announced: [Vec<NodeKey>; 2] = Default::default();
                for e in chunk {
                    let at = owner(&e.src);
                    routed[at].push(e.clone());
                    let target = owner(&e.dst);
                    if opts.targets_stored && target != at {
                        routed[target].push(e.clone());
                    }
                    if opts.targets_interned && target != at {
                        announced[target].push(e.dst.clone());
                    }
                }
                for ((i, events), targets) in pair.iter().zip(&routed).zip(&announced) {
                    append(&i.store, opts, c, events)?;
                    i.store.intern_nodes(targets)?;
                }
            }
            false => append(&shared, opts, c, chunk)?,
        }
        for i in &mut pair {
            drain(&mut i.core, &i.store)?;
        }
        if window.is_some_and(|w| (c + 1) % w == 0) {
            version += 1;
            exchange(&mut pair, version, with_state)?;
            if opts.apply_at_once {
                for i in &mut pair {
                    drain(&mut i.core, &i.store)?;
                }
            }
        }
    }
    let now = sum(pair[0].core.window.totals(), pair[1].core.window.totals());
    let mode = match (window, with_state) {
        (None, _) => "two-apart",
        (Some(_), false) => "two-exchange",
        (Some(_), true) => "two-exchange+state",
    };
    let mut run = figures(mode, window, now, mark.unwrap_or_default(), started);
    for i in &pair {
        let f = i.inbox.figures();
        run.rows_sent += i.sent;
        run.rows_applied += f.rows_applied;
        run.rows_refreshed += f.rows_refreshed;
        run.rows_started += f.rows_started;
        run.rows_unknown += f.rows_unknown;
        run.rows_held += rows_held(&i.core) / pair.len() as u64;
    }
    run.served = opts.rank_served.then(|| ServedFigures::of(&served));
    Ok(logged(run))
}

/// One window: each trainer takes its delta as version `version` would, its gradients go to
/// the other as window parts (one per partition), and the rows it owns that changed go to the
/// other's copies with the windows of the other its rows include.
fn exchange(pair: &mut [Instance], version: u64, with_state: bool) -> anyhow::Result<()> {
    let window = WindowAttempt { version, epoch: 0 };
    let request = DeltaRequest {
        window: Some(window),
        ..Default::default()
    };
    let deltas: Vec<ModelDelta> = pair
        .iter_mut()
        .map(|i| i.core.take_delta(&request))
        .collect();
    for (from, to) in [(0, 1), (1, 0)] {
        let (delta, sender) = (&deltas[from], pair[from].name.clone());
        let (store, keys) = {
            let i = &mut pair[from];
            (i.store.clone(), &mut i.keys)
        };
        let mut parts: BTreeMap<i32, Vec<KeyedGradient>> = BTreeMap::new();
        for g in &delta.exchange.gradients {
            let (key, q) = keys.get(&store, g.node)?.clone();
            parts.entry(q).or_default().push(KeyedGradient {
                key,
                steps: g.steps,
                grad: g.grad.clone(),
                bias: g.bias,
                start: g.start.clone(),
            });
        }
        let owns = pair[from].owns.clone();
        pair[from].sent += delta.exchange.gradients.len() as u64;
        for (partition, rows) in parts {
            pair[to].inbox.push_part(WindowPart {
                id: WindowId {
                    sender: sender.clone(),
                    version,
                    epoch: 0,
                },
                partition,
                rows,
                resume_at: version as i64,
            });
        }
        let rows = owned_rows(delta, &owns, &store, &mut pair[from].keys)?;
        if with_state {
            let (first, second) = pair.split_at_mut(1);
            let (owner, copy) = match from {
                0 => (&first[0].core, &mut second[0].core),
                _ => (&second[0].core, &mut first[0].core),
            };
            copy_state(&rows, owner, copy, &store)?;
        }
        (pair[to].handed.0.lock().unwrap_or_else(|e| e.into_inner())).extend(rows);
    }
    Ok(())
}

/// The rows of `delta` in partitions `owns`, as a cache would hand them over, each with what its
/// partition's marker says was applied.
fn owned_rows(
    delta: &ModelDelta,
    owns: &[i32],
    store: &GraphStore,
    keys: &mut Keys,
) -> anyhow::Result<Vec<ChangedRow>> {
    let applied: BTreeMap<i32, Arc<_>> = (delta.exchange.applied.iter())
        .map(|(q, a)| (*q, Arc::new(a.clone())))
        .collect();
    let mut out = Vec::new();
    for (t, table) in delta.tables.iter().enumerate() {
        let index = Vec::<i64>::try_from(&table.index)?;
        if index.is_empty() {
            continue;
        }
        let dim = table.values.size()[1] as usize;
        let values = Vec::<f32>::try_from(table.values.contiguous().view([-1]))?;
        let biases: Option<Vec<f32>> = table
            .biases
            .as_ref()
            .map(Vec::<f32>::try_from)
            .transpose()?;
        for (k, &i) in index.iter().enumerate() {
            let node = NodeRef {
                node_type: t as u16,
                index: i as u32,
            };
            let (key, q) = keys.get(store, node)?.clone();
            if owns.binary_search(&q).is_err() {
                continue;
            }
            let mut vector = values[k * dim..(k + 1) * dim].to_vec();
            if let Some(b) = &biases {
                vector.push(b.get(i as usize).copied().unwrap_or(0.0));
            }
            out.push(ChangedRow {
                key,
                vector,
                applied: applied.get(&q).cloned(),
            });
        }
    }
    Ok(out)
}

/// The owner's Adagrad accumulators of `rows` over the other trainer's (rows it has).
fn copy_state(
    rows: &[ChangedRow],
    owner: &TrainerCore,
    copy: &mut TrainerCore,
    store: &GraphStore,
) -> anyhow::Result<()> {
    let names = &store.stored_schema().node_types;
    let mut by_type: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for r in rows {
        let Some((name, id)) = r.key.split_once(':') else {
            continue;
        };
        let Some(t) = names.iter().position(|n| n == name) else {
            continue;
        };
        if let Some(i) = store.node_index(t as u16, id)? {
            if i64::from(i) < copy.model.tables[t].len() {
                by_type.entry(t).or_default().push(i64::from(i));
            }
        }
    }
    tch::no_grad(|| {
        for (t, idx) in by_type {
            let idx = tch::Tensor::from_slice(&idx).to_device(copy.model.device);
            let (from, to) = (&owner.model.tables[t], &mut copy.model.tables[t]);
            let _ = to
                .state
                .index_copy_(0, &idx, &from.state.index_select(0, &idx));
            let _ = (to.bias_state).index_copy_(0, &idx, &from.bias_state.index_select(0, &idx));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of 20,000 events over 2,000 nodes, exchanged every chunk of 2,000, one store.
    fn small() -> ExchangeOptions {
        ExchangeOptions {
            nodes: 2_000,
            edges: 20_000,
            chunk: 2_000,
            windows: vec![1],
            prefix: 1.0,
            no_refresh: false,
            separate_stores: false,
            targets_stored: false,
            targets_interned: false,
            apply_at_once: false,
            rank_served: false,
            with_state: false,
        }
    }

    /// Two trainers exchanging every chunk: each sends the gradients of rows the other owns, the
    /// other applies every window but the last (no step follows it) and copies the rows handed
    /// to it; one trainer and two apart rank the same stream and send nothing.
    #[test]
    fn two_trainers_exchange_every_window_and_rank_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let cfg = Config::from_toml(&format!(
            "[storage]\npath = {:?}\n[train]\ndim = 8\nuniform_negatives = 4",
            store.display()
        ))
        .unwrap();
        let report = measure(&cfg, Device::Cpu, &small()).unwrap();
        let modes: Vec<&str> = report.runs.iter().map(|r| r.mode.as_str()).collect();
        assert_eq!(modes, ["one", "two-apart", "two-exchange"]);
        assert_eq!(report.trained, 20_000);
        for r in &report.runs {
            assert!(r.ranked > 0 && r.hits10 > 0.0, "{} ranked nothing", r.mode);
        }
        let (apart, exchange) = (&report.runs[1], &report.runs[2]);
        assert_eq!((apart.rows_sent, apart.rows_refreshed), (0, 0));
        assert!(exchange.rows_applied > 0 && exchange.rows_applied < exchange.rows_sent);
        assert!(exchange.rows_refreshed > 0);
        // Its work folder is gone with it.
        let left = std::fs::read_dir(run_dir(&cfg, DataSource::Dir("exchange".into()))).unwrap();
        assert_eq!(left.count(), 0);
    }

    /// A prefix outside (0, 1] or a chunk of no events is refused by name, before any work.
    #[test]
    fn a_bad_prefix_or_chunk_is_refused_naming_the_flag() {
        let cfg = Config::from_toml("").unwrap();
        let opts = |prefix, chunk| ExchangeOptions {
            chunk,
            prefix,
            ..small()
        };
        let err = measure(&cfg, Device::Cpu, &opts(0.0, 10)).unwrap_err();
        assert!(err.to_string().contains("--prefix"), "{err}");
        let err = measure(&cfg, Device::Cpu, &opts(1.0, 0)).unwrap_err();
        assert!(err.to_string().contains("--chunk"), "{err}");
    }

    /// The served table ranks the same sample at every instance count: one trainer's model,
    /// or each node's row as its owner holds it. Two models that never exchange serve rows
    /// learnt apart, which rank below the one trainer's table, the exchanging pair's table and
    /// their own models' figure. How far below depends on the trajectory, which libtorch's
    /// kernels change with the CPU: over 15 seeds here and one CI machine, apart/one Hits@10 was
    /// 0.56 to 0.88, so the margin is not asserted.
    #[test]
    fn the_served_table_ranks_the_same_sample_whatever_the_trainers() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml(&format!(
            "[storage]\npath = {:?}\n[train]\ndim = 8\nuniform_negatives = 4",
            dir.path().join("store").display()
        ))
        .unwrap();
        let opts = ExchangeOptions {
            separate_stores: true,
            rank_served: true,
            ..small()
        };
        let report = measure(&cfg, Device::Cpu, &opts).unwrap();
        assert!(report.rank_served);
        let served: Vec<&ServedFigures> = report
            .runs
            .iter()
            .map(|r| r.served.as_ref().unwrap())
            .collect();
        // Every 40th of the last 16,000 events, less those whose nodes had no row yet.
        for s in &served {
            assert!(s.ranked > 200 && s.ranked <= 400, "{s:?}");
            assert!(s.hits10 > 0.0 && s.hits10 <= 1.0);
        }
        let (one, apart) = (&report.runs[0], &report.runs[1]);
        assert!(
            served[1].hits10 < served[0].hits10.min(served[2].hits10),
            "{served:?}"
        );
        assert!(served[1].hits10 < apart.hits10 && one.served.is_some());
    }

    /// With a store per trainer, an owner does not know the nodes only the other's events name
    /// until their gradients come, and starts them then; with each event stored at its target's
    /// owner too, it knows every node a gradient names. No gradient is dropped either way.
    #[test]
    fn separate_stores_start_the_nodes_their_owner_has_not_seen_unless_targets_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml(&format!(
            "[storage]\npath = {:?}\n[train]\ndim = 8\nuniform_negatives = 4",
            dir.path().join("store").display()
        ))
        .unwrap();
        let started = |targets_stored| {
            let opts = ExchangeOptions {
                separate_stores: true,
                targets_stored,
                ..small()
            };
            let report = measure(&cfg, Device::Cpu, &opts).unwrap();
            let exchange = &report.runs[2];
            assert!(exchange.rows_applied > 0 && exchange.ranked > 0);
            assert_eq!(exchange.rows_unknown, 0);
            exchange.rows_started
        };
        assert!(started(false) > 0);
        assert_eq!(started(true), 0);
    }
}
