//! A synthetic TwHIN-shaped workload of any size, generated as a stream (O(node types) memory).
//!
//! Owns the generator behind `replay synthetic` and `synthetic --out DIR`; hands on
//! [`SyntheticEdge`]s (and [`ReplayEvent`]s made from them) in event-time order.
//!
//! The workload follows the schema of the loaded config: every node type that a relation uses gets
//! a share of `nodes`, and every relation gets a share of `edges` (Twitter's names have set
//! shares, [`relation_weight`]; any other relation a default one). What makes it TwHIN-shaped:
//! * **Power-law degrees.** Node `k` of a type has popularity rank `k / C` inside its community,
//!   and both endpoints are drawn Zipf-like by rank (a bounded continuous power law, exponent
//!   `zipf`), so old nodes are the hubs (preferential attachment) and the top 1% of nodes hold a
//!   large share of the edges.
//! * **Planted communities.** Node `k` belongs to community `k mod C`. An event's target is an
//!   item of its source's community with probability `affinity`, otherwise of a uniformly drawn
//!   one; so held-out edges are predictable from the communities and a model that learns them
//!   beats popularity (the popular items of all communities) by far.
//! * **Arrivals.** A tenth of each type's nodes exist from the start; the others are born
//!   throughout the stream, each by one event that names it first (a new user follows someone, a
//!   tweet is authored, an ad is promoted, a query is searched; [`birth_relation`]). Births are
//!   spread evenly over the events and over the types in proportion to their sizes, so node ids
//!   are drawn from a growing population.
//! * **Events.** Ids `syn-<seed>-<n>` (unique), timestamps 1-5 ms apart from 2024-01-01T00:00Z,
//!   everything a function of the seed (`StdRng`), so a run is reproducible.

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::offline::ReplayEvent;
use crate::schema::Schema;

/// The first event's time: 2024-01-01T00:00:00Z in ms.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
/// Share of each type's nodes present before the first event (the rest arrive by births).
const INITIAL_SHARE: f64 = 0.1;
/// Splits of `synthetic --out`, by event order (as MovieLens-100k's: train 85%, valid 5%, test
/// 10%).
const SPLIT_SHARES: [(&str, f64); 3] = [("train", 0.85), ("valid", 0.05), ("test", 0.10)];

/// What to generate (the `--nodes`, `--edges`, `--seed`, ... flags).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SyntheticSpec {
    /// Nodes in all (at the end of the stream), shared among the schema's node types.
    pub nodes: u64,
    /// Events (edges) in all.
    pub edges: u64,
    pub seed: u64,
    /// Planted communities; 0: one per 1,000 nodes, between 2 and 1,000.
    pub communities: u64,
    /// Probability that an event's target is in its source's community.
    pub affinity: f64,
    /// Exponent of the power law by which endpoints are drawn (1: Zipf's law).
    pub zipf: f64,
}

impl SyntheticSpec {
    pub fn new(nodes: u64, edges: u64, seed: u64) -> Self {
        SyntheticSpec {
            nodes,
            edges,
            seed,
            communities: 0,
            affinity: 0.9,
            zipf: 1.0,
        }
    }

    /// The number of communities `communities = 0` stands for.
    pub fn community_count(&self) -> u64 {
        if self.communities > 0 {
            self.communities
        } else {
            (self.nodes / 1000).clamp(2, 1000)
        }
    }
}

/// The flags of `replay synthetic` and `synthetic --out` (see [`SyntheticSpec`]).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Synthetic stream")]
pub struct SyntheticArgs {
    /// Nodes in all, shared among the schema's node types (required for the synthetic stream).
    #[arg(long)]
    pub nodes: Option<u64>,
    /// Events (edges) in all (required for the synthetic stream).
    #[arg(long)]
    pub edges: Option<u64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Planted communities (0: one per 1,000 nodes, between 2 and 1,000).
    #[arg(long, default_value_t = 0)]
    pub communities: u64,
    /// Probability that an event's target is in its source's community.
    #[arg(long, default_value_t = 0.9)]
    pub affinity: f64,
    /// Exponent of the power law endpoints are drawn by (1: Zipf's law).
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
}

impl SyntheticArgs {
    /// Whether any flag of the synthetic stream was given (they mean nothing for a dataset).
    pub fn given(&self) -> bool {
        self.nodes.is_some() || self.edges.is_some()
    }

    pub fn spec(&self) -> anyhow::Result<SyntheticSpec> {
        let (Some(nodes), Some(edges)) = (self.nodes, self.edges) else {
            anyhow::bail!("the synthetic stream needs --nodes N and --edges M");
        };
        Ok(SyntheticSpec {
            communities: self.communities,
            affinity: self.affinity,
            zipf: self.zipf,
            ..SyntheticSpec::new(nodes, edges, self.seed)
        })
    }
}

/// A Twitter relation's share of the events that are not births (any other relation: 0.05).
/// `authors` is 0: a tweet has one author, named at its birth.
pub fn relation_weight(name: &str) -> f64 {
    match name {
        "favorites" => 0.35,
        "follows" => 0.20,
        "retweets" => 0.10,
        "searches" => 0.10,
        "clicks" => 0.08,
        "replies" => 0.06,
        "promotes" => 0.01,
        "authors" => 0.0,
        _ => 0.05,
    }
}

/// A Twitter node type's share of the nodes (any other type: 0.1).
fn type_share(name: &str) -> f64 {
    match name {
        "tweet" => 0.50,
        "user" => 0.40,
        "query" => 0.05,
        "ad" => 0.045,
        "advertiser" => 0.005,
        _ => 0.1,
    }
}

/// The relation that names a new node of a Twitter type first, and whether the new node is its
/// source: a new user follows someone, a tweet is authored, an ad promoted, a query searched, an
/// advertiser promotes an ad.
fn birth_relation(node_type: &str) -> Option<(&'static str, bool)> {
    match node_type {
        "user" => Some(("follows", true)),
        "tweet" => Some(("authors", false)),
        "ad" => Some(("promotes", false)),
        "query" => Some(("searches", false)),
        "advertiser" => Some(("promotes", true)),
        _ => None,
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SyntheticError {
    #[error("--edges must be at least 1")]
    NoEdges,
    #[error("--nodes ({nodes}) must be at least 2 per community and node type ({need})")]
    TooFewNodes { nodes: u64, need: u64 },
    #[error("--affinity must be within 0..=1, got {0}")]
    BadAffinity(f64),
    #[error("--zipf must be within 0..=4, got {0}")]
    BadZipf(f64),
    #[error("the schema has no relation to generate")]
    NoRelations,
}

/// How a new node of a type is born: by `rel`, as its source or its target, with an existing
/// node of `other` at the other end.
#[derive(Debug, Clone, Copy)]
struct Birth {
    rel: usize,
    new_is_src: bool,
    other: usize,
}

#[derive(Debug, Clone)]
struct NodeType {
    name: String,
    /// Nodes at the end of the stream.
    total: u64,
    /// Nodes present before the first event.
    initial: u64,
    birth: Option<Birth>,
}

#[derive(Debug, Clone)]
struct RelationPlan {
    name: String,
    /// Indexes into the workload's types.
    src: Vec<usize>,
    dst: Vec<usize>,
}

/// The plan of a synthetic stream for one schema: node types with their sizes and births, the
/// relations with their shares. Cheap; [`Workload::edges`] generates.
#[derive(Debug, Clone)]
pub struct Workload {
    spec: SyntheticSpec,
    communities: u64,
    types: Vec<NodeType>,
    relations: Vec<RelationPlan>,
    /// Cumulative shares of the relations among the events that are not births.
    relation_cdf: Vec<f64>,
    /// Births in all, spread evenly over the events.
    births: u64,
}

/// One generated edge, its nodes as (type, id) indexes into the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticEdge {
    /// Position in the stream (0-based; the event id's number).
    pub n: u64,
    pub src_type: usize,
    pub src: u64,
    pub rel: usize,
    pub dst_type: usize,
    pub dst: u64,
    pub ts: u64,
    /// Whether this event names a new node first.
    pub birth: bool,
}

/// Per node type: how many nodes the stream will have named by its end.
#[derive(Debug, Clone, Serialize)]
pub struct TypeSize {
    pub node_type: String,
    pub nodes: u64,
    pub initial: u64,
}

impl Workload {
    /// The plan for `schema`: types that no relation uses get no nodes.
    pub fn new(schema: &Schema, spec: SyntheticSpec) -> Result<Self, SyntheticError> {
        if spec.edges == 0 {
            return Err(SyntheticError::NoEdges);
        }
        if !(0.0..=1.0).contains(&spec.affinity) {
            return Err(SyntheticError::BadAffinity(spec.affinity));
        }
        if !(0.0..=4.0).contains(&spec.zipf) {
            return Err(SyntheticError::BadZipf(spec.zipf));
        }
        let communities = spec.community_count();
        // The node types the relations use, in schema order.
        let mut used: Vec<u16> = Vec::new();
        for r in schema.relations() {
            for t in r.src_types.iter().chain(&r.dst_types) {
                if !used.contains(t) {
                    used.push(*t);
                }
            }
        }
        used.sort_unstable();
        if used.is_empty() {
            return Err(SyntheticError::NoRelations);
        }
        let need = 2 * communities * used.len() as u64;
        if spec.nodes < need {
            return Err(SyntheticError::TooFewNodes {
                nodes: spec.nodes,
                need,
            });
        }
        let index = |t: u16| used.iter().position(|u| *u == t).expect("a used type");
        let relations: Vec<RelationPlan> = schema
            .relations()
            .iter()
            .map(|r| RelationPlan {
                name: r.name.clone(),
                src: r.src_types.iter().map(|t| index(*t)).collect(),
                dst: r.dst_types.iter().map(|t| index(*t)).collect(),
            })
            .collect();
        let mut weights: Vec<f64> = relations.iter().map(|r| relation_weight(&r.name)).collect();
        if weights.iter().sum::<f64>() <= 0.0 {
            weights.iter_mut().for_each(|w| *w = 1.0);
        }
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let relation_cdf = weights
            .iter()
            .map(|w| {
                acc += w / sum;
                acc
            })
            .collect();

        let names: Vec<&str> = used.iter().map(|t| schema.type_name(*t)).collect();
        let share_sum: f64 = names.iter().map(|n| type_share(n)).sum();
        let mut types: Vec<NodeType> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = ((spec.nodes as f64 * type_share(name) / share_sum) as u64)
                    .max(2 * communities);
                NodeType {
                    name: (*name).to_owned(),
                    total,
                    initial: ((total as f64 * INITIAL_SHARE).ceil() as u64).max(communities),
                    birth: birth_for(i, name, &relations),
                }
            })
            .collect();
        for t in types.iter_mut().filter(|t| t.birth.is_none()) {
            t.total = t.initial;
        }
        // At most half the events are births: with more nodes than that, the last ones are
        // never born.
        let wanted: u64 = types.iter().map(|t| t.total - t.initial).sum();
        let max_births = spec.edges / 2;
        if wanted > max_births {
            for t in &mut types {
                let born = (t.total - t.initial) as u128 * max_births as u128 / wanted as u128;
                t.total = t.initial + born as u64;
            }
        }
        let births = types.iter().map(|t| t.total - t.initial).sum();
        Ok(Workload {
            spec,
            communities,
            types,
            relations,
            relation_cdf,
            births,
        })
    }

    pub fn spec(&self) -> &SyntheticSpec {
        &self.spec
    }

    pub fn communities(&self) -> u64 {
        self.communities
    }

    /// The planted community of node `id` (of any type).
    pub fn community(&self, id: u64) -> u64 {
        id % self.communities
    }

    /// The generated node types (indexes of [`SyntheticEdge`]) with their sizes.
    pub fn sizes(&self) -> Vec<TypeSize> {
        self.types
            .iter()
            .map(|t| TypeSize {
                node_type: t.name.clone(),
                nodes: t.total,
                initial: t.initial,
            })
            .collect()
    }

    pub fn type_name(&self, t: usize) -> &str {
        &self.types[t].name
    }

    pub fn relation_name(&self, r: usize) -> &str {
        &self.relations[r].name
    }

    /// The stream, generated lazily.
    pub fn edges(&self) -> SyntheticEdges<'_> {
        SyntheticEdges {
            w: self,
            rng: StdRng::seed_from_u64(self.spec.seed),
            n: 0,
            ts: EPOCH_MS,
            active: self.types.iter().map(|t| t.initial).collect(),
            births_done: 0,
            event_id: format!("syn-{}-", self.spec.seed),
        }
    }

    /// The stream as events to produce.
    pub fn events(&self) -> impl Iterator<Item = ReplayEvent> + '_ {
        let mut edges = self.edges();
        std::iter::from_fn(move || {
            let e = edges.next()?;
            Some(edges.event(&e))
        })
    }

    /// Write the stream as a dataset folder (`train.tsv`, `valid.tsv`, `test.tsv` by event order,
    /// `head relation tail ts_ms` per line) that `replay --data DIR` and `--data DIR` read.
    pub fn write_dir(&self, dir: &Path) -> std::io::Result<WriteSummary> {
        std::fs::create_dir_all(dir)?;
        let started = std::time::Instant::now();
        let mut edges = self.edges();
        let mut bounds = Vec::new();
        let mut acc = 0.0;
        for (split, share) in SPLIT_SHARES {
            acc += share;
            bounds.push((split, ((self.spec.edges as f64 * acc).round() as u64)));
        }
        bounds.last_mut().expect("three splits").1 = self.spec.edges;
        let mut written = 0;
        for (split, end) in bounds {
            let file = std::fs::File::create(dir.join(format!("{split}.tsv")))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            while written < end {
                let e = edges.next().expect("edges() yields spec.edges edges");
                writeln!(
                    out,
                    "{}:{}\t{}\t{}:{}\t{}",
                    self.types[e.src_type].name,
                    e.src,
                    self.relations[e.rel].name,
                    self.types[e.dst_type].name,
                    e.dst,
                    e.ts
                )?;
                written += 1;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(WriteSummary {
            dir: dir.display().to_string(),
            events: written,
            seconds,
            events_per_sec: written as f64 / seconds.max(1e-9),
            communities: self.communities,
            node_types: self.sizes(),
        })
    }
}

/// What `synthetic --out` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WriteSummary {
    pub dir: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub communities: u64,
    pub node_types: Vec<TypeSize>,
}

/// Type `i`'s birth: its Twitter relation when the schema has it with `i` on the right side,
/// else the first relation with `i` as target (or else as source).
fn birth_for(i: usize, name: &str, relations: &[RelationPlan]) -> Option<Birth> {
    let side = |r: &RelationPlan, new_is_src: bool| -> Option<Birth> {
        let (mine, theirs) = if new_is_src {
            (&r.src, &r.dst)
        } else {
            (&r.dst, &r.src)
        };
        mine.contains(&i).then(|| Birth {
            rel: 0,
            new_is_src,
            other: theirs[0],
        })
    };
    let found = |rel: usize, b: Option<Birth>| b.map(|b| Birth { rel, ..b });
    if let Some((rel_name, new_is_src)) = birth_relation(name) {
        if let Some(rel) = relations.iter().position(|r| r.name == rel_name) {
            if let Some(b) = found(rel, side(&relations[rel], new_is_src)) {
                return Some(b);
            }
        }
    }
    [false, true].into_iter().find_map(|new_is_src| {
        relations
            .iter()
            .enumerate()
            .find_map(|(rel, r)| found(rel, side(r, new_is_src)))
    })
}

/// The stream of a [`Workload`]: `spec.edges` edges in order, then `None`.
pub struct SyntheticEdges<'a> {
    w: &'a Workload,
    rng: StdRng,
    n: u64,
    ts: u64,
    /// Per type: nodes that exist so far (ids `0..active`).
    active: Vec<u64>,
    births_done: u64,
    /// `syn-<seed>-`.
    event_id: String,
}

impl SyntheticEdges<'_> {
    /// The edge as an event: nodes `type:id`, id `syn-<seed>-<n>`.
    pub fn event(&self, e: &SyntheticEdge) -> ReplayEvent {
        let w = self.w;
        ReplayEvent {
            src: format!("{}:{}", w.types[e.src_type].name, e.src),
            rel: w.relations[e.rel].name.clone(),
            dst: format!("{}:{}", w.types[e.dst_type].name, e.dst),
            ts: Some(e.ts),
            event_id: format!("{}{}", self.event_id, e.n),
        }
    }

    /// A rank in `0..n` drawn by a bounded continuous power law with exponent `zipf`.
    fn rank(&mut self, n: u64) -> u64 {
        let u: f64 = self.rng.random();
        let s = self.w.spec.zipf;
        let top = (n + 1) as f64;
        let x = if (s - 1.0).abs() < 1e-9 {
            top.powf(u)
        } else {
            let a = 1.0 - s;
            (1.0 + u * (top.powf(a) - 1.0)).powf(1.0 / a)
        };
        (x as u64).saturating_sub(1).min(n - 1)
    }

    /// A node of type `t` drawn by popularity, in community `c` when it has one yet.
    fn node_in(&mut self, t: usize, c: u64) -> u64 {
        let (active, k) = (self.active[t], self.w.communities);
        let members = (active + k - 1 - c) / k;
        if members == 0 {
            return self.rank(active);
        }
        self.rank(members) * k + c
    }

    /// The community of a target whose source is in `c`: `c` with probability `affinity`.
    fn target_community(&mut self, c: u64) -> u64 {
        if self.rng.random::<f64>() < self.w.spec.affinity {
            c
        } else {
            self.rng.random_range(0..self.w.communities)
        }
    }

    /// Whether event `n` is a birth: `births` of them spread evenly over `edges` events.
    fn is_birth(&self) -> bool {
        let (b, m, n) = (
            self.w.births as u128,
            self.w.spec.edges as u128,
            self.n as u128,
        );
        (n + 1) * b / m > n * b / m
    }

    /// The type whose births lag their share the most.
    fn next_birth_type(&self) -> usize {
        let done = (self.births_done + 1) as i128;
        let births = self.w.births as i128;
        (0..self.w.types.len())
            .filter(|t| self.w.types[*t].birth.is_some())
            .max_by_key(|t| {
                let ty = &self.w.types[*t];
                let due = (ty.total - ty.initial) as i128 * done;
                let born = (self.active[*t] - ty.initial) as i128 * births;
                // Ties go to the first type.
                (due - born, -(*t as i128))
            })
            .expect("births imply a type with a birth relation")
    }

    fn pick(&mut self, of: &[usize]) -> usize {
        if of.len() == 1 {
            of[0]
        } else {
            of[self.rng.random_range(0..of.len())]
        }
    }

    fn birth(&mut self) -> (usize, u64, usize, usize, u64) {
        let t = self.next_birth_type();
        let b = self.w.types[t].birth.expect("a type with births");
        let id = self.active[t];
        self.active[t] += 1;
        self.births_done += 1;
        let c = self.target_community(self.w.community(id));
        let other = self.node_in(b.other, c);
        if b.new_is_src {
            (t, id, b.rel, b.other, other)
        } else {
            (b.other, other, b.rel, t, id)
        }
    }

    fn engagement(&mut self) -> (usize, u64, usize, usize, u64) {
        let u: f64 = self.rng.random();
        let w = self.w;
        let cdf = &w.relation_cdf;
        let rel = cdf.partition_point(|p| *p <= u).min(cdf.len() - 1);
        let plan = &w.relations[rel];
        let st = self.pick(&plan.src);
        let dt = self.pick(&plan.dst);
        let src = self.rank(self.active[st]);
        let c = self.target_community(self.w.community(src));
        let mut dst = self.node_in(dt, c);
        if st == dt && dst == src {
            // No self-loops: the next member of the same community, or the one before.
            let k = self.w.communities;
            dst = if dst + k < self.active[dt] {
                dst + k
            } else {
                dst.checked_sub(k).unwrap_or(dst)
            };
        }
        (st, src, rel, dt, dst)
    }
}

impl Iterator for SyntheticEdges<'_> {
    type Item = SyntheticEdge;

    fn next(&mut self) -> Option<SyntheticEdge> {
        if self.n >= self.w.spec.edges {
            return None;
        }
        let birth = self.is_birth();
        let (src_type, src, rel, dst_type, dst) = if birth {
            self.birth()
        } else {
            self.engagement()
        };
        let e = SyntheticEdge {
            n: self.n,
            src_type,
            src,
            rel,
            dst_type,
            dst,
            ts: self.ts,
            birth,
        };
        self.n += 1;
        self.ts += self.rng.random_range(1..=5);
        Some(e)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.w.spec.edges - self.n) as usize;
        (left, Some(left))
    }
}

#[cfg(test)]
#[path = "synthetic_tests.rs"]
mod tests;
