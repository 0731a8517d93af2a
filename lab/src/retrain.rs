//! Versions that survive a full retrain (`twhin-lab stability --scenario retrain`): the case downstream
//! teams fear, where a periodic retrain (new seed, more data) rotates the whole space under a
//! classifier fitted on the version before it.
//!
//! Version A is trained on the knowledge graph and the first `--first-fraction` of the ratings
//! (streamed through the daemon's trainer, then `--retrain-epochs` passes over the log) and
//! published; a logistic regression is fitted on A's rows of labelled nodes and frozen. The rest
//! of the ratings arrive, and the next version is published three ways, each through its own
//! in-memory publication whose version 1 is A, with the daemon's publisher and alignment:
//!
//! * `raw`: a new model from another seed, trained on everything, published as trained;
//! * `procrustes`: the same new model, rotated onto A by the aligner's Procrustes (post-hoc
//!   linear alignment over the shared nodes' sample);
//! * `warm_pull`: A's parameters, trained on the same data with the other seed as the daemon
//!   does it: the new ratings streamed, then the passes over the log, a version cut after each,
//!   the pull toward the version subscribers hold and its controller, the rotation onto A, all at
//!   the daemon's `[align]` settings.
//!
//! The frozen classifier is scored on the held-out nodes' rows of each. BC-Aligner (KDD'22)
//! reports −26.5% relative for no alignment, −10 to −14% for post-hoc linear alignment, −0.65%
//! for joint training.

use serde::Serialize;
use tch::Device;
use tracing::info;

use crate::classifier::{accuracies, features, fit_classifier, Frozen};
use crate::movielens::{labelled_nodes, movielens_stream, type_index};
use crate::pq_tradeoff::{measure_pq, PqTradeoffFigures, Retrieval};
use crate::stability::{in_memory_publication_with, StabilityOptions};
use twhin_stream::align::{Aligner, Drift};
use twhin_stream::config::Config;
use twhin_stream::offline::{append_events, drain, run_dir, Dataset};
use twhin_stream::publish::{
    publish_in_process, InProcessTrainer, MemorySink, Outcome, Publication, PublishedView,
};
use twhin_stream::schema::Event;
use twhin_stream::store::GraphStore;
use twhin_stream::train::{schema_fingerprint, Checkpoints, Embeddings, TrainParams, TrainerCore};

/// The frozen classifier on one way of publishing the retrain.
#[derive(Debug, Clone, Serialize)]
pub struct RetrainVariant {
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    /// `1 − balanced accuracy / A's balanced accuracy` (negative: better than on A).
    pub relative_loss: f64,
    /// Mean cosine distance of the published rows from A's (the aligner's sample).
    pub anchor_drift: Option<f64>,
    /// Relative L2 residual against A after the rotation, when one was fitted.
    pub procrustes_residual: Option<f64>,
    /// Versions committed after A, and versions the drift gate held back.
    pub versions: u64,
    pub held: u64,
    /// The pull strength at the end.
    pub pull: f64,
    /// Whether the daemon's gate (`align.hard_limit` on drift from the previous version) would
    /// have held the retrain back (`raw` and `procrustes` are published with the gate lifted).
    pub default_gate_holds: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrainReport {
    pub dataset: String,
    pub label: String,
    pub classifier_nodes: usize,
    pub holdout_nodes: usize,
    /// Accuracy of always answering the held-out set's most frequent class.
    pub majority_baseline: f64,
    /// Ratings version A was trained on, and the retrain.
    pub anchor_ratings: usize,
    pub retrain_ratings: usize,
    pub epochs: usize,
    pub seed: u64,
    pub retrain_seed: u64,
    /// The classifier on A's held-out rows (what each variant is compared with).
    pub anchor_accuracy: f64,
    pub anchor_balanced_accuracy: f64,
    pub raw: RetrainVariant,
    pub procrustes: RetrainVariant,
    pub warm_pull: RetrainVariant,
    /// Version A product-quantized (`--pq-subspaces`): the frozen classifier and retrieval on
    /// its decoded rows.
    pub pq: Vec<PqTradeoffFigures>,
}

/// The offsets' source name of the events this scenario appends.
const SOURCE: &str = "stability-retrain";

/// The retrain's seed: another one than version A's, as a periodic retrain would draw.
fn retrain_seed(seed: u64) -> u64 {
    seed.wrapping_add(1)
}

/// How a variant's publication runs: `(drift control on, gate lifted)`.
#[derive(Clone, Copy)]
enum Way {
    Raw,
    Procrustes,
    WarmPull,
}

impl Way {
    fn control(self) -> bool {
        !matches!(self, Way::Raw)
    }
    /// A model trained from another seed lands far from A (mean cosine distance near 1); the
    /// gate would hold it, so these two are published with it lifted, to score what subscribers
    /// would get.
    fn gate_lifted(self) -> bool {
        !matches!(self, Way::WarmPull)
    }
}

/// Run the scenario (see the module docs).
pub fn measure_retrain(
    cfg: &Config,
    device: Device,
    opts: &StabilityOptions,
) -> anyhow::Result<RetrainReport> {
    opts.check_fractions()?;
    anyhow::ensure!(opts.retrain_epochs >= 1, "--retrain-epochs: at least 1");
    let label = opts.label_or(crate::movielens::Label::Genre("Drama".into()));
    let (node_type, labelled) = labelled_nodes(cfg, &label)?;
    let dataset = Dataset::MovieLens100k;
    let dir = run_dir(cfg, dataset).join("stability-retrain");
    let (store, events, anchor_core, kg_end) =
        movielens_stream(cfg, &dir.join("store"), opts.limit, device)?;
    let ratings = events.len() - kg_end;
    let anchor_ratings = (ratings as f64 * opts.first_fraction) as usize;
    let p = &cfg.train;

    // Version A: streamed, then passes over the log, kept as a checkpoint each way starts from.
    let a = &events[..kg_end + anchor_ratings];
    let a = (a, 0, p.batch_size);
    let anchor = train_and_keep(anchor_core, &store, a, opts, &dir.join("checkpoint-a"))?;
    let anchor_model = load(&anchor.checkpoints, &store, p, device)?;
    let anchor_tables = anchor_model
        .tables
        .iter()
        .map(|t| t.rows())
        .collect::<Vec<_>>();
    let (classifier, _, (classifier_nodes, holdout_nodes, majority_baseline)) = fit_classifier(
        &store,
        &anchor_tables,
        node_type,
        &labelled,
        opts.holdout,
        p.seed,
    )?;
    let (anchor_accuracy, anchor_balanced_accuracy) = score(&classifier, &anchor_tables);
    // Version A compressed: what the frozen classifier and retrieval lose to its codes.
    let pq = match opts.pq_subspaces.is_empty() {
        true => Vec::new(),
        false => {
            let classify = |tables: &[tch::Tensor]| score(&classifier, tables);
            let retrieval = retrieval(&store, cfg)?;
            measure_pq(
                &anchor_model,
                &store,
                p,
                &retrieval,
                classify,
                &opts.pq_subspaces,
            )?
        }
    };
    drop(anchor_model);

    // The rest of the ratings, and the retrain from another seed on all of them.
    let mut params = p.clone();
    params.seed = retrain_seed(p.seed);
    tch::manual_seed(params.seed as i64);
    let fresh = TrainerCore::new(
        Embeddings::for_schema(&cfg.schema(), &params, device),
        params.clone(),
        cfg.trainer.clone(),
    );
    let rest = &events[kg_end + anchor_ratings..];
    let rest = (rest, kg_end + anchor_ratings, p.batch_size);
    let fresh = train_and_keep(fresh, &store, rest, opts, &dir.join("checkpoint-b"))?;

    let scenario = Variants {
        cfg,
        store: &store,
        device,
        params: &params,
        anchor: &anchor,
        fresh: &fresh,
        classifier: &classifier,
        anchor_balanced_accuracy,
        epochs: opts.retrain_epochs,
    };
    let raw = scenario.publish(Way::Raw)?;
    let procrustes = scenario.publish(Way::Procrustes)?;
    let warm_pull = scenario.publish(Way::WarmPull)?;
    Ok(RetrainReport {
        dataset: dataset.name().into(),
        label: label.to_string(),
        classifier_nodes,
        holdout_nodes,
        majority_baseline,
        anchor_ratings,
        retrain_ratings: ratings,
        epochs: opts.retrain_epochs,
        seed: p.seed,
        retrain_seed: params.seed,
        anchor_accuracy,
        anchor_balanced_accuracy,
        raw,
        procrustes,
        warm_pull,
        pq,
    })
}

/// Which users, movies and relation the PQ retrieval figures rank.
fn retrieval(store: &GraphStore, cfg: &Config) -> anyhow::Result<Retrieval> {
    Ok(Retrieval {
        user_type: type_index(store, "user")?,
        movie_type: type_index(store, "movie")?,
        relation: cfg
            .schema()
            .rel_id("rated_high")
            .ok_or_else(|| anyhow::anyhow!("the schema has no relation rated_high"))?
            as usize,
    })
}

/// A trained model kept as a checkpoint, and its cursor.
struct Kept {
    checkpoints: Checkpoints,
    cursor: u64,
}

/// `events` appended in batches of `batch` (offsets from `first_offset`) and streamed through `core`, then
/// `--retrain-epochs` passes over the whole log; the model kept as a checkpoint in `dir`.
fn train_and_keep(
    mut core: TrainerCore,
    store: &GraphStore,
    (events, first_offset, batch): (&[Event], usize, usize),
    opts: &StabilityOptions,
    dir: &std::path::Path,
) -> anyhow::Result<Kept> {
    append_events(store, SOURCE, events, batch, first_offset as i64)?;
    drain(&mut core, store)?;
    let which = if first_offset == 0 {
        "version A"
    } else {
        "new model from another seed"
    };
    for epoch in 0..opts.retrain_epochs {
        let loss = core.train_epoch(store)?;
        info!(epoch, loss, "retrain: {which}");
    }
    let checkpoints = Checkpoints::new(dir, 1);
    core.checkpoint(&checkpoints, schema_fingerprint(store.stored_schema()))?;
    Ok(Kept {
        checkpoints,
        cursor: core.cursor(),
    })
}

/// What each way of publishing the retrain starts from.
struct Variants<'a> {
    cfg: &'a Config,
    store: &'a GraphStore,
    device: Device,
    /// The retrain's settings (its seed), which every way resumes with.
    params: &'a TrainParams,
    anchor: &'a Kept,
    fresh: &'a Kept,
    classifier: &'a Frozen,
    anchor_balanced_accuracy: f64,
    epochs: usize,
}

impl Variants<'_> {
    fn resume(&self, kept: &Kept) -> anyhow::Result<TrainerCore> {
        let model = load(&kept.checkpoints, self.store, self.params, self.device)?;
        Ok(TrainerCore::resume(
            model,
            kept.cursor,
            self.params.clone(),
            self.cfg.trainer.clone(),
        ))
    }

    /// Version 1 is A, from its own copy (publishing marks rows clean and sets the pull); then
    /// the retrain published `way`, and the frozen classifier scored on it.
    fn publish(&self, way: Way) -> anyhow::Result<RetrainVariant> {
        let (mut aligner, mut publication) = publication_for(self.cfg, way)?;
        let mut sink = MemorySink::default();
        let mut anchor = self.resume(self.anchor)?;
        let mut publish = |core: &mut TrainerCore, aligner: &mut Aligner| {
            let mut trainer = InProcessTrainer {
                core,
                checkpoints: None,
            };
            publish_in_process(
                &mut publication,
                self.store,
                &mut trainer,
                aligner,
                &mut sink,
            )
        };
        anyhow::ensure!(
            matches!(
                publish(&mut anchor, &mut aligner)?,
                Outcome::Committed { .. }
            ),
            "version A was not published"
        );
        let mut out = Published::default();
        match way {
            Way::Raw | Way::Procrustes => {
                let mut retrained = self.resume(self.fresh)?;
                out.take(publish(&mut retrained, &mut aligner)?);
                out.pull = aligner.pull();
            }
            Way::WarmPull => {
                // The daemon's own continuation: the new ratings streamed with the pull, then
                // the passes over the log, a version after each.
                drain(&mut anchor, self.store)?;
                out.take(publish(&mut anchor, &mut aligner)?);
                for epoch in 0..self.epochs {
                    let loss = anchor.train_epoch(self.store)?;
                    out.take(publish(&mut anchor, &mut aligner)?);
                    info!(
                        epoch,
                        loss,
                        pull = aligner.pull(),
                        "retrain: warm start + pull"
                    );
                }
                out.pull = aligner.pull();
            }
        }
        let view = out
            .last
            .ok_or_else(|| anyhow::anyhow!("no version after A was committed"))?;
        let (accuracy, balanced_accuracy) = score(self.classifier, &view.tables);
        let gate = self.cfg.align.hard_limit;
        Ok(RetrainVariant {
            accuracy,
            balanced_accuracy,
            relative_loss: 1.0 - balanced_accuracy / self.anchor_balanced_accuracy,
            anchor_drift: out.anchor.map(|d| d.cosine_mean),
            procrustes_residual: out.residual,
            versions: out.versions,
            held: out.held,
            pull: out.pull,
            default_gate_holds: out.max_previous_drift > gate,
        })
    }
}

/// What a variant's publications after A came to.
#[derive(Default)]
struct Published {
    last: Option<PublishedView>,
    anchor: Option<Drift>,
    residual: Option<f64>,
    versions: u64,
    held: u64,
    max_previous_drift: f64,
    pull: f64,
}

impl Published {
    fn take(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Committed { view, figures, .. } => {
                self.versions += 1;
                self.anchor = figures.anchor;
                self.residual = figures.procrustes_residual;
                if let Some(d) = figures.previous {
                    self.max_previous_drift = self.max_previous_drift.max(d.cosine_mean);
                }
                self.last = Some(view);
            }
            Outcome::Held(_) => self.held += 1,
            Outcome::Unchanged => {}
        }
    }
}

fn score(classifier: &Frozen, tables: &[tch::Tensor]) -> (f64, f64) {
    let (model, t, held) = classifier;
    let (x, y) = features(&tables[*t], held);
    accuracies(&model.predict(&x), &y)
}

fn load(
    ckpts: &Checkpoints,
    store: &GraphStore,
    params: &TrainParams,
    device: Device,
) -> anyhow::Result<Embeddings> {
    let mut model = ckpts
        .load(schema_fingerprint(store.stored_schema()), device)?
        .ok_or_else(|| anyhow::anyhow!("checkpoint missing right after it was written"))?
        .model;
    // As the daemon resumes one: the config decides which tables carry a bias.
    model.set_biased(&store.stored_schema().node_types, &params.bias_types);
    Ok(model)
}

/// The daemon's aligner and an in-memory publication for one way of publishing.
fn publication_for(cfg: &Config, way: Way) -> anyhow::Result<(Aligner, Publication)> {
    let mut align_cfg = cfg.align.clone();
    align_cfg.enabled = way.control();
    if way.gate_lifted() {
        align_cfg.hard_limit = f64::INFINITY;
    }
    in_memory_publication_with(cfg, align_cfg)
}

impl RetrainReport {
    /// The table docs/measurements.md quotes.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "full retrain on {} ({}): classifier fitted on version A ({} ratings, {} nodes), scored on {} held-out nodes; retrain on {} ratings, seed {} -> {}, {} epochs",
            self.dataset,
            self.label,
            self.anchor_ratings,
            self.classifier_nodes,
            self.holdout_nodes,
            self.retrain_ratings,
            self.seed,
            self.retrain_seed,
            self.epochs
        );
        let _ = writeln!(
            s,
            "majority class {:.3}; on A: accuracy {:.3}, balanced {:.3}",
            self.majority_baseline, self.anchor_accuracy, self.anchor_balanced_accuracy
        );
        let _ = writeln!(
            s,
            "{:<11} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>5} {:>8}",
            "published", "acc", "bal", "rel.loss", "drift/A", "resid.", "versions", "held", "gate"
        );
        let o = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.4}"));
        for (name, v) in [
            ("raw", &self.raw),
            ("procrustes", &self.procrustes),
            ("warm_pull", &self.warm_pull),
        ] {
            let _ = writeln!(
                s,
                "{:<11} {:>8.3} {:>8.3} {:>8.1}% {:>8} {:>8} {:>8} {:>5} {:>8}",
                name,
                v.accuracy,
                v.balanced_accuracy,
                100.0 * v.relative_loss,
                o(v.anchor_drift),
                o(v.procrustes_residual),
                v.versions,
                v.held,
                if v.default_gate_holds {
                    "holds"
                } else {
                    "passes"
                }
            );
        }
        let _ = writeln!(
            s,
            "rel.loss = relative loss of balanced accuracy against A; gate = what align.hard_limit would do; BC-Aligner: none -26.5%, post-hoc linear -10 to -14%, joint -0.65%"
        );
        if !self.pq.is_empty() {
            let _ = writeln!(
                s,
                "version A product-quantized (one codebook set for every node row):\n{:>9} {:>9} {:>11} {:>9} {:>10} {:>8} {:>8} {:>9}",
                "sub-sp.", "bytes/row", "compression", "+books", "rel.error", "R@10", "bal", "rel.loss"
            );
            for q in &self.pq {
                let _ = writeln!(
                    s,
                    "{:>9} {:>9} {:>10.0}x {:>9.2} {:>10.4} {:>8.3} {:>8.3} {:>8.1}%",
                    q.subspaces,
                    q.code_bytes_per_row,
                    q.compression,
                    q.bytes_per_row_with_codebooks,
                    q.relative_error,
                    q.recall_at_10,
                    q.balanced_accuracy,
                    100.0 * q.relative_loss
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retrain_draws_another_seed_and_only_the_warm_start_keeps_the_gate() {
        assert_ne!(retrain_seed(0), 0);
        assert_ne!(retrain_seed(u64::MAX), u64::MAX);
        assert!(!Way::Raw.control() && Way::Procrustes.control() && Way::WarmPull.control());
        assert!(Way::Raw.gate_lifted() && Way::Procrustes.gate_lifted());
        assert!(!Way::WarmPull.gate_lifted());
    }
}
