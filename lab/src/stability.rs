//! Downstream stability (docs/architecture.md §5: "the proof that it works is downstream"): does a model
//! trained once on an early version keep working on later ones?
//!
//! MovieLens-100k is streamed in time order (the knowledge graph, then every rating) through a
//! fresh store and the daemon's own trainer ([`TrainerCore`]) and alignment ([`Aligner`]); versions
//! are cut at evenly spaced points of the rating stream and go through the publisher's decisions
//! (assess → gate → rotate → rows that moved → commit → adopt → pull), without Kafka. A logistic
//! regression is fitted once on version 1's embeddings of labelled nodes (user gender, or one
//! movie genre against the rest), frozen, and scored on the same held-out nodes in every later
//! version. The whole run is repeated with drift control on and off (`align.enabled`), from the
//! same seed.
//!
//! Labels and the classifier are plain: the point is not the classifier's quality but whether a
//! consumer of version 1 still gets it on version N.

use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Device, Tensor};
use tracing::info;

use twhin_stream::align::{AlignFigures, AlignStatus, Aligner, Drift};
use twhin_stream::config::{Comparator, Config, ValueFormat};
use twhin_stream::offline::{run_dir, Dataset};
use twhin_stream::publish::{
    publish_in_process, InProcessTrainer, Ledger, MemorySink, Outcome, Publication, VersionSettings,
};
use twhin_stream::store::{AppendBatch, GraphStore};
use twhin_stream::train::TrainerCore;

use crate::classifier::{accuracies, features, fit_classifier, Frozen};
use crate::movielens::{labelled_nodes, movielens_stream, Label};

/// How the measurement runs (also the `stability` command's flags).
#[derive(Debug, Clone, clap::Args)]
pub struct StabilityOptions {
    /// stream: versions cut from one continuing stream; retrain: a full retrain from another
    /// seed on more data, published raw, rotated by Procrustes, and warm-started with the pull.
    #[arg(long, value_enum, default_value_t = Scenario::Stream)]
    pub scenario: Scenario,
    /// gender (users) or genre:<name> (movies, e.g. genre:Drama); default gender for stream,
    /// genre:Drama for retrain.
    #[arg(long)]
    pub label: Option<Label>,
    /// Versions cut from the rating stream (at least 2).
    #[arg(long, default_value_t = 12)]
    pub versions: usize,
    /// Share of the ratings streamed before version 1 (its nodes are the classifier's).
    #[arg(long, default_value_t = 0.3)]
    pub first_fraction: f64,
    /// Share of version 1's labelled nodes held out to score the classifier.
    #[arg(long, default_value_t = 0.3)]
    pub holdout: f64,
    /// Stream only the first N ratings (all by default).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Epochs over everything stored before version 1 (shuffled), as a batch trainer would run
    /// before a streaming deployment takes over its embeddings (not its optimiser state); 0
    /// streams from the start.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_epochs: usize,
    /// retrain: passes over the log for version A, for the retrain, and for the warm start.
    #[arg(long, default_value_t = 10)]
    pub retrain_epochs: usize,
    /// retrain: version A product-quantized with each of these sub-space counts (dimension 128:
    /// 32, 16, 8 are 16×, 32×, 64× smaller than f32 rows); empty (`--pq-subspaces ''`) skips it.
    #[arg(long, value_delimiter = ',', default_values_t = [32, 16, 8])]
    pub pq_subspaces: Vec<i64>,
}

/// Which stability case `stability` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Stream,
    Retrain,
}

impl StabilityOptions {
    /// The label asked for, or the scenario's default.
    pub fn label_or(&self, default: Label) -> Label {
        self.label.clone().unwrap_or(default)
    }

    /// The fractions both scenarios take, each strictly between 0 and 1.
    pub fn check_fractions(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.first_fraction > 0.0 && self.first_fraction < 1.0,
            "--first-fraction: between 0 and 1"
        );
        anyhow::ensure!(
            self.holdout > 0.0 && self.holdout < 1.0,
            "--holdout: between 0 and 1"
        );
        Ok(())
    }
}

/// One version of one run.
#[derive(Debug, Clone, Serialize)]
pub struct VersionFigures {
    pub version: u64,
    /// Ratings streamed when the version was cut.
    pub ratings: usize,
    /// Accuracy of the frozen classifier on the held-out nodes' rows of this version.
    pub accuracy: f64,
    /// Mean of the per-class recalls (the classes are unbalanced).
    pub balanced_accuracy: f64,
    /// Drift from the previous version, and from version 1 (the anchor).
    pub previous: Option<Drift>,
    pub anchor: Option<Drift>,
    pub procrustes_residual: Option<f64>,
    pub pull: f64,
    /// Rows the version carried (moved or new nodes, plus relations).
    pub rows: u64,
    /// Prequential Hits@10 of the trainer's recent test-then-train ranks: what the pull costs
    /// in fitting new edges. Over every relation (the knowledge graph's too), and over the
    /// ratings alone.
    pub prequential_hits10: Option<f64>,
    pub ratings_hits10: Option<f64>,
}

/// One run (drift control on or off).
#[derive(Debug, Clone, Serialize)]
pub struct StabilityRun {
    pub control: bool,
    pub versions: Vec<VersionFigures>,
    /// Versions the gate held back.
    pub held: u64,
    /// The classifier's accuracy on the nodes it was fitted on (version 1).
    pub fit_accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StabilityReport {
    pub dataset: String,
    pub label: String,
    pub classifier_nodes: usize,
    pub holdout_nodes: usize,
    /// Accuracy of always answering the held-out set's most frequent class.
    pub majority_baseline: f64,
    pub on: StabilityRun,
    pub off: StabilityRun,
}

/// Run the measurement with drift control on and off.
pub fn measure(
    cfg: &Config,
    device: Device,
    opts: &StabilityOptions,
) -> anyhow::Result<StabilityReport> {
    anyhow::ensure!(opts.versions >= 2, "--versions: at least 2");
    opts.check_fractions()?;
    let label = opts.label_or(Label::Gender);
    let (node_type, labelled) = labelled_nodes(cfg, &label)?;
    let mut baseline = None;
    let mut runs = Vec::new();
    for control in [true, false] {
        let (run, split) = run_once(cfg, device, opts, control, node_type, &labelled)?;
        baseline.get_or_insert(split);
        runs.push(run);
    }
    let (classifier_nodes, holdout, majority_baseline) = baseline.expect("two runs");
    let off = runs.pop().expect("two runs");
    let on = runs.pop().expect("two runs");
    Ok(StabilityReport {
        dataset: Dataset::MovieLens100k.name().into(),
        label: label.to_string(),
        classifier_nodes,
        holdout_nodes: holdout,
        majority_baseline,
        on,
        off,
    })
}

/// One run: `(figures, (classifier nodes, held-out nodes, majority baseline))`.
fn run_once(
    cfg: &Config,
    device: Device,
    opts: &StabilityOptions,
    control: bool,
    node_type: &str,
    labelled: &[(String, f64)],
) -> anyhow::Result<(StabilityRun, (usize, usize, f64))> {
    let dataset = Dataset::MovieLens100k;
    let dir = run_dir(cfg, dataset).join(if control {
        "stability-on"
    } else {
        "stability-off"
    });
    let (store, events, mut core, kg_end) = movielens_stream(cfg, &dir, opts.limit, device)?;
    let ratings = events.len() - kg_end;
    let schema = cfg.schema();
    let cuts = version_cuts(ratings, opts.first_fraction, opts.versions);

    let p = &cfg.train;
    let (mut aligner, mut publication) = in_memory_publication(cfg, control)?;
    core.set_pull(aligner.pull(), None);
    let mut sink = MemorySink::default();

    let mut out = StabilityRun {
        control,
        versions: Vec::new(),
        held: 0,
        fit_accuracy: f64::NAN,
    };
    // Fitted at version 1: the model, the node type's table, the held-out nodes.
    let mut classifier: Option<Frozen> = None;
    let mut split_info = (0, 0, 0.0);
    let mut next_cut = 0;
    let mut streamed = 0usize;
    for chunk in events.chunks(p.batch_size) {
        let batch = AppendBatch::from_events("stability", streamed as i64, chunk.iter().cloned());
        store.append(&batch)?;
        while core.step(&store)?.stats.is_some() {}
        streamed += chunk.len();
        let rated_so_far = streamed.saturating_sub(kg_end);
        if next_cut >= cuts.len() || rated_so_far < cuts[next_cut] || streamed <= kg_end {
            continue;
        }
        next_cut += 1;
        if publication.ledger().next_version() == 1 && opts.bootstrap_epochs > 0 {
            bootstrap(&mut core, &store, p, opts.bootstrap_epochs)?;
        }
        let mut trainer = InProcessTrainer {
            core: &mut core,
            checkpoints: None,
        };
        let published = publish_in_process(
            &mut publication,
            &store,
            &mut trainer,
            &mut aligner,
            &mut sink,
        )?;
        let (prepared, view, figures) = match published {
            Outcome::Committed {
                prepared,
                view,
                figures,
            } => (prepared, view, figures),
            Outcome::Held(_) => {
                out.held += 1;
                continue;
            }
            Outcome::Unchanged => continue,
        };
        let frozen = match &mut classifier {
            Some(frozen) => frozen,
            None => {
                let (frozen, fit_accuracy, info) = fit_classifier(
                    &store,
                    &view.tables,
                    node_type,
                    labelled,
                    opts.holdout,
                    p.seed,
                )?;
                out.fit_accuracy = fit_accuracy;
                split_info = info;
                classifier.insert(frozen)
            }
        };
        let version = Committed {
            number: prepared.marker.version,
            rows: prepared.marker.rows,
            tables: &view.tables,
            figures: &figures,
            ratings: rated_so_far,
        };
        out.versions
            .push(version_figures(frozen, &version, &core, &schema, control));
    }
    Ok((out, split_info))
}

/// A committed version, as the frozen classifier scores it.
struct Committed<'a> {
    number: u64,
    rows: u64,
    tables: &'a [Tensor],
    figures: &'a AlignFigures,
    /// Ratings trained when it was cut.
    ratings: usize,
}

/// The frozen classifier on `version`'s held-out rows, beside its drift and the trainer's
/// prequential figures.
fn version_figures(
    (model, t, held): &Frozen,
    version: &Committed,
    core: &TrainerCore,
    schema: &twhin_stream::schema::Schema,
    control: bool,
) -> VersionFigures {
    let (x, y) = features(&version.tables[*t], held);
    let (accuracy, balanced_accuracy) = accuracies(&model.predict(&x), &y);
    let figures = version.figures;
    info!(
        control,
        version = version.number,
        rated_so_far = version.ratings,
        accuracy,
        pull = figures.pull,
        "stability: version"
    );
    VersionFigures {
        version: version.number,
        ratings: version.ratings,
        accuracy,
        balanced_accuracy,
        previous: figures.previous,
        anchor: figures.anchor,
        procrustes_residual: figures.procrustes_residual,
        pull: figures.pull,
        rows: version.rows,
        prequential_hits10: core.window.figures().map(|(_, hits)| hits),
        ratings_hits10: ratings_hits10(core, schema),
    }
}

/// The daemon's aligner (drift control on or off) and publication, in memory.
fn in_memory_publication(cfg: &Config, control: bool) -> anyhow::Result<(Aligner, Publication)> {
    let mut align_cfg = cfg.align.clone();
    align_cfg.enabled = control;
    in_memory_publication_with(cfg, align_cfg)
}

/// [`in_memory_publication`] with `align_cfg` for the aligner.
pub fn in_memory_publication_with(
    cfg: &Config,
    mut align_cfg: twhin_stream::config::AlignConfig,
) -> anyhow::Result<(Aligner, Publication)> {
    let p = &cfg.train;
    // Versions here are cut by events, seconds apart or less: the daemon's limit on rotations
    // per minute would leave all but the first unrotated.
    align_cfg.rotation_min_interval_secs = 0;
    let aligner = Aligner::new(
        align_cfg,
        p.comparator != Comparator::L1,
        None,
        Arc::new(AlignStatus::default()),
    )?;
    let settings = VersionSettings {
        format: ValueFormat::F32le,
        threshold: cfg.publish.row_threshold,
        comparator: p.comparator,
    };
    Ok((
        aligner,
        Publication::open(Ledger::in_memory(), settings, None)?,
    ))
}

/// Where version `k` (1-based) is cut: once this many of `ratings` are trained, the first after
/// `first_fraction` of them, the rest evenly to the end.
fn version_cuts(ratings: usize, first_fraction: f64, versions: usize) -> Vec<usize> {
    let first = (ratings as f64 * first_fraction) as usize;
    (0..versions)
        .map(|k| first + (ratings - first) * k / (versions - 1))
        .collect()
}

/// `epochs` passes over every stored edge, shuffled, with the daemon's training step.
fn bootstrap(
    core: &mut TrainerCore,
    store: &GraphStore,
    p: &twhin_stream::train::TrainParams,
    epochs: usize,
) -> anyhow::Result<()> {
    let mut edges: Vec<_> = store
        .edges_from(0, usize::MAX)?
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let mut rng = SmallRng::seed_from_u64(p.seed ^ 0xb007);
    for _ in 0..epochs {
        edges.shuffle(&mut rng);
        for chunk in edges.chunks(p.batch_size) {
            twhin_stream::train::train_step(&mut core.model, chunk, p, &mut rng);
        }
    }
    // The streaming deployment takes over the batch trainer's parameters, not its optimiser
    // state (PyTorch-BigGraph and TwHIN export embeddings only).
    tch::no_grad(|| {
        for table in &mut core.model.tables {
            let _ = table.state.zero_();
        }
        let _ = core.model.relation_state.zero_();
    });
    Ok(())
}

/// Hits@10 over the trainer's rating windows (`rated_*`), weighted by their lengths.
fn ratings_hits10(core: &TrainerCore, schema: &twhin_stream::schema::Schema) -> Option<f64> {
    let (mut hits, mut n) = (0.0, 0usize);
    for (&rel, window) in &core.by_relation {
        if !schema.relation(rel).name.starts_with("rated_") {
            continue;
        }
        if let Some((_, h)) = window.figures() {
            hits += h * window.len() as f64;
            n += window.len();
        }
    }
    (n > 0).then(|| hits / n as f64)
}

impl StabilityReport {
    /// The table docs/measurements.md quotes.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "downstream stability on {} ({}): logistic regression fitted on version 1 ({} nodes), scored on {} held-out nodes; majority baseline {:.3}",
            self.dataset, self.label, self.classifier_nodes, self.holdout_nodes, self.majority_baseline
        );
        let _ = writeln!(
            s,
            "{:>7} {:>8} | {:>6} {:>6} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7} {:>7}",
            "", "", "on:", "", "", "", "", "off:", "", "", "", ""
        );
        let _ = writeln!(
            s,
            "{:>7} {:>8} | {:>6} {:>6} {:>7} {:>7} {:>7} | {:>6} {:>6} {:>7} {:>7} {:>7}",
            "version",
            "ratings",
            "acc",
            "bal",
            "drift",
            "anchor",
            "hits10",
            "acc",
            "bal",
            "drift",
            "anchor",
            "hits10"
        );
        let f = |d: &Option<Drift>| d.map_or("-".to_owned(), |d| format!("{:.4}", d.cosine_mean));
        let h = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
        for (a, b) in self.on.versions.iter().zip(&self.off.versions) {
            let _ = writeln!(
                s,
                "{:>7} {:>8} | {:>6.3} {:>6.3} {:>7} {:>7} {:>7} | {:>6.3} {:>6.3} {:>7} {:>7} {:>7}",
                a.version,
                a.ratings,
                a.accuracy,
                a.balanced_accuracy,
                f(&a.previous),
                f(&a.anchor),
                h(a.ratings_hits10),
                b.accuracy,
                b.balanced_accuracy,
                f(&b.previous),
                f(&b.anchor),
                h(b.ratings_hits10),
            );
        }
        let _ = writeln!(
            s,
            "drift = mean cosine distance of shared rows from the previous version / from version 1; h@10 r = prequential Hits@10 of the ratings; held: on {}, off {}; fit accuracy on {:.3}, off {:.3}",
            self.on.held, self.off.held, self.on.fit_accuracy, self.off.fit_accuracy
        );
        s
    }
}
