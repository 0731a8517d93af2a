//! Proof of downstream value, as the TwHIN paper shows it: a downstream model for a real task,
//! with and without the published embeddings as features, on the same examples.
//!
//! The task: will a user rate a movie high (4 or 5 stars, `rated_high`) — for ratings that come
//! *after* the version's cut, so no label of the task was ever trained into the embeddings.
//! MovieLens-100k is streamed in time order (the knowledge graph, then the ratings up to the cut)
//! through a fresh store and the daemon's own trainer, and one version is published through the
//! daemon's publisher and alignment ([`publish_in_process`]), without Kafka. The ratings after the
//! cut whose user and movie the version covers are the examples: the earlier half (by time) fits
//! the downstream models, the later half scores them.
//!
//! Without embeddings, the model has what a team has anyway, all counted before the cut: the
//! movie's and the user's number of ratings, the movie's degree in the graph (ratings and
//! knowledge-graph edges), and the user's and the movie's share of high ratings (their mean
//! rating on the task's scale, smoothed toward the global share). With embeddings, the same plus
//! the published rows as a recommender would use them: the user composed as the server composes
//! it (its row plus its recent movies', [`twhin_stream::train::composed_source`]), the element-wise product
//! of user and movie, and the published score of each rating relation (`(u + r)·m + b_m`).
//!
//! Both models are logistic regressions ([`LogisticRegression`]). The L2 penalty of each, and for
//! the model with embeddings whether it takes the product or only the scores, are chosen on the
//! last fifth of its fitting examples; then it is refitted on all of them.

use std::collections::HashMap;

use serde::Serialize;
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::classifier::{accuracies, LogisticRegression};
use crate::movielens::{movielens_stream, type_index};
use crate::stability::in_memory_publication_with;
use twhin_stream::config::Config;
use twhin_stream::offline::{append_events, drain, run_dir, Dataset};
use twhin_stream::publish::{
    publish_in_process, InProcessTrainer, MemorySink, Outcome, PreparedVersion, PublishedView,
};
use twhin_stream::schema::Event;
use twhin_stream::store::{GraphStore, NodeRef};
use twhin_stream::train::{composed_source, TrainParams};

/// How `downstream` runs (its flags).
#[derive(Debug, Clone, clap::Args)]
pub struct DownstreamOptions {
    /// Share of the ratings (in time order) streamed and trained before the version is cut; the
    /// task's examples are the ratings after it.
    #[arg(long, default_value_t = 0.5)]
    pub cut_fraction: f64,
    /// Use only the first N ratings (all by default).
    #[arg(long)]
    pub limit: Option<usize>,
    /// `rated-high`: will a user rate a movie high, for ratings after the cut. `genre`: a movie's
    /// genres, from a version trained without the genre relations (every rating, no cut).
    #[arg(long, value_enum, default_value_t = DownstreamTask::RatedHigh)]
    pub task: DownstreamTask,
    /// With `--task genre`: the genres, each its own model (the five most common in ml-100k by
    /// default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "Drama,Comedy,Thriller,Action,Romance"
    )]
    pub genres: Vec<String>,
}

/// Which downstream task `downstream` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DownstreamTask {
    RatedHigh,
    Genre,
}

/// One downstream model's figures on the scored half.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    pub features: usize,
    /// The L2 penalty chosen on the fitting half's last fifth.
    pub l2: f64,
    pub auc: f64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
}

/// What `downstream` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DownstreamReport {
    pub dataset: String,
    pub task: String,
    /// The version the features come from, as the daemon's publisher committed it, and its rows.
    pub version: u64,
    pub version_rows: u64,
    /// Ratings trained before the cut.
    pub ratings_before_cut: usize,
    /// Ratings after the cut whose user and movie the version covers: fitted on, scored on.
    pub fit_examples: usize,
    pub scored_examples: usize,
    /// Ratings after the cut with a user or movie the version does not cover (not used).
    pub skipped_new_nodes: usize,
    /// Share of high ratings among the scored examples (the majority class's accuracy is the
    /// larger of it and its complement).
    pub positive_share: f64,
    pub without_embeddings: ModelFigures,
    pub with_embeddings: ModelFigures,
}

impl DownstreamReport {
    /// The table docs/measurements.md quotes.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} on {}: version {} ({} rows) after {} ratings; {} examples fitted, {} scored (high share {:.3}), {} skipped (new nodes)",
            self.task,
            self.dataset,
            self.version,
            self.version_rows,
            self.ratings_before_cut,
            self.fit_examples,
            self.scored_examples,
            self.positive_share,
            self.skipped_new_nodes
        );
        let _ = writeln!(
            s,
            "{:<20} {:>8} {:>8} {:>8} {:>9} {:>8}",
            "model", "features", "AUC", "accuracy", "balanced", "l2"
        );
        for (name, m) in [
            ("without embeddings", &self.without_embeddings),
            ("with embeddings", &self.with_embeddings),
        ] {
            let _ = writeln!(
                s,
                "{:<20} {:>8} {:>8.4} {:>8.4} {:>9.4} {:>8}",
                name, m.features, m.auc, m.accuracy, m.balanced_accuracy, m.l2
            );
        }
        s
    }
}

/// The area under the ROC curve of `scores` for `labels` (the probability that a random positive
/// scores above a random negative, ties counting one half); `None` without both classes.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Mann-Whitney: the positives' rank sum, ties given their average rank.
    let (mut rank_sum, mut at) = (0.0f64, 0usize);
    while at < order.len() {
        let mut end = at + 1;
        while end < order.len() && scores[order[end]] == scores[order[at]] {
            end += 1;
        }
        let average_rank = (at + 1 + end) as f64 / 2.0;
        rank_sum += order[at..end].iter().filter(|&&i| labels[i]).count() as f64 * average_rank;
        at = end;
    }
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    (positives > 0.0 && negatives > 0.0)
        .then(|| (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Counts before the cut, per user and movie, for the features a team has without embeddings.
#[derive(Default)]
pub struct Counts {
    /// `(ratings, high ratings)` per user and per movie.
    user: HashMap<String, (f64, f64)>,
    movie: HashMap<String, (f64, f64)>,
    /// Edges of any relation touching each movie.
    movie_degree: HashMap<String, f64>,
    high: f64,
    ratings: f64,
}

impl Counts {
    pub fn add(&mut self, e: &Event, high: bool, rating: bool, movie_type: u16) {
        for n in [&e.src, &e.dst] {
            if n.node_type == movie_type {
                *self.movie_degree.entry(n.id.clone()).or_default() += 1.0;
            }
        }
        if !rating {
            return;
        }
        let h = if high { 1.0 } else { 0.0 };
        for (map, key) in [(&mut self.user, &e.src.id), (&mut self.movie, &e.dst.id)] {
            let c = map.entry(key.clone()).or_default();
            c.0 += 1.0;
            c.1 += h;
        }
        self.ratings += 1.0;
        self.high += h;
    }

    /// `[ln(1 + movie ratings), ln(1 + user ratings), ln(1 + movie degree), user high share,
    /// movie high share]`, the shares smoothed toward the global one with 5 pseudo-ratings.
    fn features(&self, user: &str, movie: &str) -> [f64; 5] {
        let u = self.user.get(user).copied().unwrap_or_default();
        let [m_ratings, m_share, degree] = self.movie_features(movie);
        [m_ratings, u.0.ln_1p(), degree, self.share(u), m_share]
    }

    /// `[ln(1 + ratings), smoothed high share, ln(1 + degree)]` of a movie.
    pub fn movie_features(&self, movie: &str) -> [f64; 3] {
        let m = self.movie.get(movie).copied().unwrap_or_default();
        let degree = self.movie_degree.get(movie).copied().unwrap_or_default();
        [m.0.ln_1p(), self.share(m), degree.ln_1p()]
    }

    /// `(ratings, high ratings)`'s share of high ratings, smoothed toward the global share with
    /// 5 pseudo-ratings.
    fn share(&self, (n, h): (f64, f64)) -> f64 {
        let global = self.high / self.ratings.max(1.0);
        (h + 5.0 * global) / (n + 5.0)
    }
}

/// One example: the rating's user and movie rows in the version, its baseline features, its label.
struct Example {
    user: NodeRef,
    movie: i64,
    baseline: [f64; 5],
    high: bool,
}

/// Stream up to the cut, publish one version, fit and score both downstream models.
pub fn measure_downstream(
    cfg: &Config,
    device: Device,
    opts: &DownstreamOptions,
) -> anyhow::Result<DownstreamReport> {
    anyhow::ensure!(
        opts.cut_fraction > 0.0 && opts.cut_fraction < 1.0,
        "--cut-fraction: between 0 and 1 (exclusive), got {}",
        opts.cut_fraction
    );
    let dataset = Dataset::MovieLens100k;
    let dir = run_dir(cfg, dataset).join("downstream");
    let (store, events, mut core, kg_end) = movielens_stream(cfg, &dir, opts.limit, device)?;
    let ratings = events.len() - kg_end;
    let schema = cfg.schema();
    let rel = |name: &str| {
        schema
            .rel_id(name)
            .ok_or_else(|| anyhow::anyhow!("the MovieLens schema has no relation {name:?}"))
    };
    let (high_rel, low_rel) = (rel("rated_high")?, rel("rated_low")?);
    let rating = |e: &Event| e.rel == high_rel || e.rel == low_rel;
    let cut = kg_end + (ratings as f64 * opts.cut_fraction) as usize;
    anyhow::ensure!(
        cut > kg_end && cut < events.len(),
        "--cut-fraction {} leaves no ratings on one side of the cut ({ratings} ratings)",
        opts.cut_fraction
    );
    let movie_type = type_index(&store, "movie")? as u16;
    let user_type = type_index(&store, "user")? as u16;

    // Before the cut: the daemon's trainer on every event, and the counts.
    let p = &cfg.train;
    let mut counts = Counts::default();
    for (at, chunk) in events[..cut].chunks(p.batch_size).enumerate() {
        for e in chunk {
            counts.add(e, e.rel == high_rel, rating(e), movie_type);
        }
        let offset = (at * p.batch_size) as i64;
        append_events(&store, "downstream", chunk, p.batch_size, offset)?;
        drain(&mut core, &store)?;
    }
    let (prepared, view) = publish_one(cfg, &store, &mut core)?;

    // After the cut: the examples the version covers, in time order.
    let types = (user_type, movie_type);
    let (examples, skipped) = examples_after_cut(
        &store,
        &events[cut..],
        &view,
        &counts,
        types,
        [high_rel, low_rel],
    )?;
    anyhow::ensure!(
        examples.len() >= 100,
        "only {} ratings after the cut have a user and movie in the version; lower --cut-fraction",
        examples.len()
    );
    let fit_n = examples.len() / 2;
    let (fit, scored) = examples.split_at(fit_n);

    let with =
        |ex: &[Example]| embedding_features(&view, p, &store, ex, movie_type, [high_rel, low_rel]);
    let (fit_base, scored_base) = (baseline_features(fit), baseline_features(scored));
    let (fit_y, scored_y) = (labels(fit), labels(scored));
    let without_embeddings = fit_and_score(&[(&fit_base, &scored_base)], &fit_y, &scored_y);
    let (fit_emb, scored_emb) = (with(fit)?, with(scored)?);
    let dim = fit_emb.size()[1] - 2;
    // Two ways to use the version, chosen with the penalty on the fitting half: its scores
    // alone, or the scores and the user-movie product (a learned weighting of their dimensions).
    let scores_only = |x: &Tensor, base: &Tensor| Tensor::cat(&[base, &x.narrow(1, dim, 2)], 1);
    let everything = |x: &Tensor, base: &Tensor| Tensor::cat(&[base, x], 1);
    let variants = [
        (
            scores_only(&fit_emb, &fit_base),
            scores_only(&scored_emb, &scored_base),
        ),
        (
            everything(&fit_emb, &fit_base),
            everything(&scored_emb, &scored_base),
        ),
    ];
    let variants: Vec<(&Tensor, &Tensor)> = variants.iter().map(|(a, b)| (a, b)).collect();
    let with_embeddings = fit_and_score(&variants, &fit_y, &scored_y);
    let positive_share =
        scored.iter().filter(|e| e.high).count() as f64 / scored.len().max(1) as f64;
    Ok(DownstreamReport {
        dataset: dataset.name().into(),
        task: "rated high (4-5 stars), ratings after the cut".into(),
        version: prepared.marker.version,
        version_rows: prepared.marker.rows,
        ratings_before_cut: cut - kg_end,
        fit_examples: fit.len(),
        scored_examples: scored.len(),
        skipped_new_nodes: skipped,
        positive_share,
        without_embeddings,
        with_embeddings,
    })
}

/// The ratings among `events` whose user and movie have rows in `view`, as examples with their
/// counts so far; and how many were left out because one of them is newer than the version.
fn examples_after_cut(
    store: &GraphStore,
    events: &[Event],
    view: &PublishedView,
    counts: &Counts,
    (user_type, movie_type): (u16, u16),
    [high_rel, low_rel]: [twhin_stream::schema::RelId; 2],
) -> anyhow::Result<(Vec<Example>, usize)> {
    let rows = |t: u16| view.tables[t as usize].size()[0];
    let mut examples = Vec::new();
    let mut skipped = 0usize;
    for e in events
        .iter()
        .filter(|e| e.rel == high_rel || e.rel == low_rel)
    {
        let user = store.node_index(user_type, &e.src.id)?;
        let movie = store.node_index(movie_type, &e.dst.id)?;
        match (user, movie) {
            (Some(u), Some(m)) if (u as i64) < rows(user_type) && (m as i64) < rows(movie_type) => {
                examples.push(Example {
                    user: NodeRef {
                        node_type: user_type,
                        index: u,
                    },
                    movie: m as i64,
                    baseline: counts.features(&e.src.id, &e.dst.id),
                    high: e.rel == high_rel,
                })
            }
            _ => skipped += 1,
        }
    }
    Ok((examples, skipped))
}

/// Version 1 of what `core` trained on `store`, through the daemon's publisher and alignment
/// (in memory, no Kafka): its prepared records and the view subscribers hold.
pub fn publish_one(
    cfg: &Config,
    store: &GraphStore,
    core: &mut twhin_stream::train::TrainerCore,
) -> anyhow::Result<(PreparedVersion, PublishedView)> {
    let (mut aligner, mut publication) = in_memory_publication_with(cfg, cfg.align.clone())?;
    let mut trainer = InProcessTrainer {
        core,
        checkpoints: None,
    };
    let mut sink = MemorySink::default();
    let (prepared, view) = match publish_in_process(
        &mut publication,
        store,
        &mut trainer,
        &mut aligner,
        &mut sink,
    )? {
        Outcome::Committed { prepared, view, .. } => (prepared, view),
        Outcome::Held(why) => anyhow::bail!("the publisher held the version back: {why:?}"),
        Outcome::Unchanged => anyhow::bail!("the publisher found nothing to publish"),
    };
    info!(
        version = prepared.marker.version,
        rows = prepared.marker.rows,
        "downstream: version"
    );
    Ok((prepared, view))
}

fn baseline_features(examples: &[Example]) -> Tensor {
    let flat: Vec<f64> = examples.iter().flat_map(|e| e.baseline).collect();
    Tensor::from_slice(&flat).view([examples.len() as i64, 5])
}

fn labels(examples: &[Example]) -> Tensor {
    let y: Vec<f64> = examples
        .iter()
        .map(|e| if e.high { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_slice(&y)
}

/// `[N, D + 2]`: the element-wise product of the composed user and the movie, then the published
/// score of each relation in `rels` (`(u + r)·m`, plus the movie's bias when its type has one).
fn embedding_features(
    view: &PublishedView,
    p: &TrainParams,
    store: &GraphStore,
    examples: &[Example],
    movie_type: u16,
    rels: [twhin_stream::schema::RelId; 2],
) -> anyhow::Result<Tensor> {
    let movies_table = &view.tables[movie_type as usize];
    let mut users: HashMap<u32, Tensor> = HashMap::new();
    let mut rows_u = Vec::with_capacity(examples.len());
    for e in examples {
        let composed = match users.entry(e.user.index) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let own = view.tables[e.user.node_type as usize].get(e.user.index as i64);
                // The store holds only what came before the cut: the history the server uses.
                let movie = movie_type as usize;
                slot.insert(composed_source(
                    p,
                    store,
                    e.user,
                    movie,
                    &own,
                    movies_table,
                )?)
            }
        };
        rows_u.push(composed.shallow_clone());
    }
    let u = Tensor::stack(&rows_u, 0);
    let movie_idx: Vec<i64> = examples.iter().map(|e| e.movie).collect();
    let m = movies_table.index_select(0, &Tensor::from_slice(&movie_idx));
    let bias = view.biases[movie_type as usize]
        .as_ref()
        .filter(|b| b.numel() > 0)
        .map(|b| b.index_select(0, &Tensor::from_slice(&movie_idx)));
    let mut columns = vec![&u * &m];
    for r in rels {
        let translated = &u + view.relations.get(r as i64).unsqueeze(0);
        let mut score = (translated * &m).sum_dim_intlist(1, false, Kind::Float);
        if let Some(b) = &bias {
            score += b;
        }
        columns.push(score.unsqueeze(1));
    }
    Ok(Tensor::cat(&columns, 1).to_kind(Kind::Double))
}

/// The L2 penalties tried, chosen on the last fifth of the fitting examples.
const L2_GRID: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Of `variants` (each `(fitting features, scored features)`, the same examples), the one and the
/// L2 penalty with the best AUC on the last fifth of the fitting examples (fitted on the rest),
/// refitted on every fitting example and scored.
pub fn fit_and_score(variants: &[(&Tensor, &Tensor)], fit_y: &Tensor, y: &Tensor) -> ModelFigures {
    let n = fit_y.size()[0];
    let train_n = n * 4 / 5;
    let (ty, vy) = (
        fit_y.narrow(0, 0, train_n),
        fit_y.narrow(0, train_n, n - train_n),
    );
    let mut best = (0usize, L2_GRID[0], f64::NEG_INFINITY);
    for (v, (fit_x, _)) in variants.iter().enumerate() {
        let (tx, vx) = (
            fit_x.narrow(0, 0, train_n),
            fit_x.narrow(0, train_n, n - train_n),
        );
        for l2 in L2_GRID {
            let valid_auc = auc_of(&LogisticRegression::fit(&tx, &ty, l2, 300, 0.5), &vx, &vy);
            if valid_auc > best.2 {
                best = (v, l2, valid_auc);
            }
        }
    }
    let (v, l2, _) = best;
    let (fit_x, x) = variants[v];
    let model = LogisticRegression::fit(fit_x, fit_y, l2, 300, 0.5);
    let (accuracy, balanced_accuracy) = accuracies(&model.predict(x), y);
    ModelFigures {
        features: fit_x.size()[1] as usize,
        l2,
        auc: auc_of(&model, x, y),
        accuracy,
        balanced_accuracy,
    }
}

fn auc_of(model: &LogisticRegression, x: &Tensor, y: &Tensor) -> f64 {
    let scores = Vec::<f64>::try_from(model.probabilities(x)).unwrap_or_default();
    let labels: Vec<bool> = Vec::<f64>::try_from(y.to_kind(Kind::Double))
        .unwrap_or_default()
        .into_iter()
        .map(|v| v > 0.5)
        .collect();
    auc(&scores, &labels).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_auc_with_ties_and_one_class() {
        // Positives at 0.9 and 0.5, negatives at 0.5 and 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5,
        // 0.5>0.1) give 3.5 of 4.
        let got = auc(&[0.9, 0.5, 0.5, 0.1], &[true, true, false, false]);
        assert_eq!(got, Some(0.875));
        assert_eq!(auc(&[0.1, 0.2, 0.3], &[false, false, true]), Some(1.0));
        assert_eq!(auc(&[0.3, 0.2, 0.1], &[false, false, true]), Some(0.0));
        assert_eq!(auc(&[0.3, 0.2], &[true, true]), None);
    }

    #[test]
    fn counts_before_the_cut_make_smoothed_shares() {
        let mut c = Counts::default();
        let ev = |u: &str, m: &str| Event {
            op: twhin_stream::schema::EventOp::Add,
            src: twhin_stream::schema::NodeKey {
                node_type: 0,
                id: u.into(),
            },
            rel: 0,
            dst: twhin_stream::schema::NodeKey {
                node_type: 1,
                id: m.into(),
            },
            ts: 0,
            weight: 1.0,
            event_id: None,
        };
        c.add(&ev("u1", "m1"), true, true, 1);
        c.add(&ev("u1", "m2"), false, true, 1);
        c.add(&ev("u2", "m1"), true, true, 1);
        c.add(&ev("e9", "m1"), false, false, 1); // a knowledge-graph edge: degree only
        let f = c.features("u1", "m1");
        let global = 2.0 / 3.0;
        assert!((f[0] - 2f64.ln_1p()).abs() < 1e-12, "movie ratings {f:?}");
        assert!((f[1] - 2f64.ln_1p()).abs() < 1e-12, "user ratings {f:?}");
        assert!((f[2] - 3f64.ln_1p()).abs() < 1e-12, "movie degree {f:?}");
        assert!((f[3] - (1.0 + 5.0 * global) / 7.0).abs() < 1e-12);
        assert!((f[4] - (2.0 + 5.0 * global) / 7.0).abs() < 1e-12);
        // A user never seen falls back to the global share.
        assert!((c.features("nobody", "m2")[3] - global).abs() < 1e-12);
    }
}
