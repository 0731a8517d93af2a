//! `twhin-lab warm-start`: does a new node's warm-started first row rank its next edges better
//! than a random one? Prequential (test-then-train) Hits@10 on the 2nd to 5th edges of every
//! source node, streamed through the daemon's trainer once with warm start and once without.

use std::collections::HashMap;

use serde::Serialize;
use tch::Device;

use twhin_stream::config::Config;
use twhin_stream::offline::{run_dir, stream_start, DataSource};
use twhin_stream::store::{AppendBatch, NodeRef};
use twhin_stream::train::{known_targets, target_ranks, RankSum, TargetQuery};

/// Prequential (test-then-train) quality on the first edges of new nodes.
#[derive(Debug, Clone, Serialize)]
pub struct PrequentialReport {
    pub dataset: String,
    pub init: String,
    /// Edges ranked: the 2nd to 5th edge of a source node, before training on them.
    pub evaluated: usize,
    pub mrr: f64,
    #[serde(rename = "hits@10")]
    pub hits10: f64,
}

/// Stream the train split in order through a fresh store, in micro-batches of
/// `train.batch_size`. Each batch is first *tested*: every edge whose source already has 1 to 4
/// earlier edges is ranked against all nodes of the target type, the source's earlier targets
/// filtered (the node's row comes only from earlier edges). Then it is appended and the daemon's
/// trainer ([`twhin_stream::train::TrainerCore`]) follows the store: new rows warm-started or random,
/// `trainer.replay_ratio` replayed edges per new one.
pub fn prequential_new_nodes(
    cfg: &Config,
    dataset: impl Into<DataSource>,
    warm: bool,
    device: Device,
) -> anyhow::Result<PrequentialReport> {
    let dataset = dataset.into();
    let dir = run_dir(cfg, &dataset).join(if warm {
        "prequential-warm"
    } else {
        "prequential-random"
    });
    let mut opts = cfg.trainer.clone();
    opts.warm_start = warm;
    let (store, events, mut core) = stream_start(cfg, &dataset, &["train"], &dir, opts, device)?;
    let p = &cfg.train;
    let mut seen: HashMap<NodeRef, u32> = HashMap::new();
    let mut sum = RankSum::default();

    for (b, chunk) in events.chunks(p.batch_size).enumerate() {
        // Test: young sources with a row, before this batch is stored or trained; each source's
        // earlier targets are filtered.
        let mut tests = Vec::new();
        for e in chunk {
            let (Some(s), Some(d)) = (
                store.node_index(e.src.node_type, &e.src.id)?,
                store.node_index(e.dst.node_type, &e.dst.id)?,
            ) else {
                continue;
            };
            let src = NodeRef {
                node_type: e.src.node_type,
                index: s,
            };
            let prior = seen.get(&src).copied().unwrap_or(0);
            let has_row = (d as i64) < core.model.tables[e.dst.node_type as usize].len();
            if (1..=4).contains(&prior) && has_row {
                let known = known_targets(&store, src, e.rel, e.dst.node_type)?;
                tests.push(TargetQuery {
                    src_type: src.node_type as usize,
                    src: s as i64,
                    rel: e.rel as i64,
                    dst_type: e.dst.node_type as usize,
                    dst: d as i64,
                    known,
                    history: core.history_of(&store, src, e.dst.node_type as usize, u64::MAX)?,
                });
            }
        }
        for r in target_ranks(&core.model, p.comparator, &tests) {
            sum.add(r);
        }

        // Then train with the daemon's trainer: store the batch, and let the trainer follow the
        // store (new rows warm-started or random, replayed edges mixed in).
        let first_offset = (b * p.batch_size) as i64;
        let batch = AppendBatch::from_events("prequential", first_offset, chunk.iter().cloned());
        let out = store.append(&batch)?;
        while core.step(&store)?.stats.is_some() {}
        for (_, e) in store.edges_from(out.first_seq, chunk.len())? {
            *seen.entry(e.src).or_insert(0) += 1;
        }
    }
    let m = sum.metrics();
    Ok(PrequentialReport {
        dataset: dataset.name(),
        init: if warm { "warm" } else { "random" }.into(),
        evaluated: m.rankings,
        mrr: m.mrr,
        hits10: m.hits10,
    })
}
