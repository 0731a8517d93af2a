//! The trainer on a real graph, fed the way the daemon feeds it: UMLS's train split arrives in
//! batches through a GraphStore and [`TrainerCore`] follows the store's cursor. No broker is
//! needed here (the broker path is `ingest_broker.rs` and the daemon end to end); the datasets
//! come from `.ci/setup`.

use std::path::PathBuf;

use figment::providers::Env;
use twhin_stream::config::Config;
use twhin_stream::offline::Dataset;
use twhin_stream::offline::{open_offline_store, split_events};
use twhin_stream::store::AppendBatch;
use twhin_stream::train::TrainerCore;
use twhin_stream::train::{schema_fingerprint, Checkpoints};

fn umls_config(checkpoints: &std::path::Path) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cfg = Config::load_from(
        Some(&root.join("config/umls.toml")),
        Env::prefixed("TWHIN_TEST_UNUSED_"),
    )
    .expect("config/umls.toml loads");
    cfg.datasets.dir = root.join("data/datasets");
    cfg.trainer.checkpoint_path = checkpoints.to_owned();
    cfg.train.batch_size = 256;
    // Replay at its full ratio whatever waits: an arrival is several batches here, and the
    // test counts one replayed edge per new one.
    cfg.trainer.replay_backlog_limit = 0;
    cfg
}

#[test]
fn the_trainer_follows_the_store_trains_each_new_edge_once_and_resumes_from_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = umls_config(&dir.path().join("checkpoints"));
    let schema = cfg.schema();
    let store = open_offline_store(&dir.path().join("store"), &schema).unwrap();
    let events = split_events(&cfg, &schema, Dataset::Umls, "train").unwrap_or_else(|e| {
        panic!("UMLS train split missing ({e}); run .ci/setup to fetch the datasets")
    });
    tch::manual_seed(1);
    let model = twhin_stream::train::Embeddings::for_schema(&schema, &cfg.train, tch::Device::Cpu);
    let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());

    // The stream: 8 arrivals, the trainer catching up after each; then 4 passes of replay-heavy
    // fine-tuning would be the daemon's idle time, here we only follow the stream.
    let (mut trained, mut losses) = (0usize, Vec::new());
    let per_arrival = events.len().div_ceil(8);
    for (i, chunk) in events.chunks(per_arrival).enumerate() {
        let batch = AppendBatch::from_events("umls", (i * per_arrival) as i64, chunk.to_vec());
        store.append(&batch).unwrap();
        loop {
            let r = core.step(&store).unwrap();
            let Some(stats) = r.stats else { break };
            assert!(!stats.skipped);
            assert_eq!(r.replayed, r.new_edges, "replay_ratio 1.0");
            trained += r.new_edges;
            losses.push(stats.loss);
        }
        assert_eq!(
            core.cursor(),
            store.edge_count(),
            "caught up after arrival {i}"
        );
    }
    assert_eq!(
        trained as u64,
        store.edge_count(),
        "every new edge trained once"
    );
    let first = losses[0];
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!(
        "loss {first} -> {last}; prequential {:?} over {}",
        core.window.figures(),
        core.window.total()
    );
    assert!(last < first * 0.9, "loss {first} -> {last}");
    // Test-then-train ranks were taken; the model learned something (random is ~0.04 here).
    let (mrr, hits10) = core.window.figures().expect("prequential ranks");
    assert!(core.window.total() > 500, "{} ranked", core.window.total());
    // Every rank is also in its relation's window.
    let per_relation: u64 = core.by_relation.values().map(|w| w.total()).sum();
    assert_eq!(per_relation, core.window.total());
    assert!(core.by_relation.len() > 10, "UMLS has 46 relations");
    assert!(
        mrr > 0.15 && hits10 > 0.3,
        "prequential MRR {mrr} Hits@10 {hits10}"
    );

    // Checkpoint and resume: same cursor, bit-identical tables.
    let fingerprint = schema_fingerprint(store.stored_schema());
    let ckpts = Checkpoints::new(&cfg.trainer.checkpoint_path, cfg.trainer.checkpoint_keep);
    core.checkpoint(&ckpts, fingerprint).unwrap();
    let resumed = TrainerCore::open(&cfg, &store, tch::Device::Cpu).unwrap();
    assert_eq!(resumed.cursor(), core.cursor());
    assert!(resumed.model.tables[0]
        .rows()
        .equal(&core.model.tables[0].rows()));
    assert!(resumed.model.relations.equal(&core.model.relations));
}

/// The publication without Kafka (the daemon's state machine with in-process ports: assess →
/// gate → restore, or rotate → prepare → commit → adopt): a NaN-poisoned model is held back and
/// the trainer goes back to its newest checkpoint; the next version is published under the number
/// the held one would have had, measured against the last published one.
#[test]
fn the_gate_holds_a_nan_poisoned_version_and_the_trainer_is_restored_from_its_checkpoint() {
    use std::sync::Arc;
    use twhin_stream::align::{AlignStatus, Aligner, Hold};
    use twhin_stream::publish::{
        publish_in_process, InProcessTrainer, Ledger, MemorySink, Outcome, Publication,
        ValueFormat, VersionMarker, VersionSettings,
    };

    let dir = tempfile::tempdir().unwrap();
    let cfg = umls_config(&dir.path().join("checkpoints"));
    let schema = cfg.schema();
    let store = open_offline_store(&dir.path().join("store"), &schema).unwrap();
    let events = split_events(&cfg, &schema, Dataset::Umls, "train").unwrap();
    tch::manual_seed(2);
    let model = twhin_stream::train::Embeddings::for_schema(&schema, &cfg.train, tch::Device::Cpu);
    let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
    let status = Arc::new(AlignStatus::default());
    // Versions here follow each other within milliseconds: no limit on rotations per minute.
    let mut align_cfg = cfg.align.clone();
    align_cfg.rotation_min_interval_secs = 0;
    let mut aligner = Aligner::new(
        align_cfg,
        true,
        Some(dir.path().join("publish")),
        status.clone(),
    )
    .unwrap();
    let fingerprint = schema_fingerprint(store.stored_schema());
    let ckpts = Checkpoints::new(&cfg.trainer.checkpoint_path, cfg.trainer.checkpoint_keep);
    let half = events.len() / 2;
    let settings = |threshold| VersionSettings {
        format: ValueFormat::Json,
        threshold,
        comparator: cfg.train.comparator,
    };
    let mut publication = Publication::open(
        Ledger::in_memory(),
        settings(cfg.publish.row_threshold),
        None,
    )
    .unwrap();
    let mut sink = MemorySink::default();
    let mut publish =
        |publication: &mut Publication, core: &mut TrainerCore| -> Result<VersionMarker, Hold> {
            let mut trainer = InProcessTrainer {
                core,
                checkpoints: Some((&ckpts, fingerprint)),
            };
            match publish_in_process(publication, &store, &mut trainer, &mut aligner, &mut sink)
                .unwrap()
            {
                Outcome::Committed { prepared, .. } => Ok(prepared.marker),
                Outcome::Held(hold) => Err(hold),
                Outcome::Unchanged => panic!("no row moved"),
            }
        };

    store
        .append(&AppendBatch::from_events(
            "umls",
            0,
            events[..half].to_vec(),
        ))
        .unwrap();
    while core.step(&store).unwrap().stats.is_some() {}
    let v1 = publish(&mut publication, &mut core).expect("version 1");
    assert_eq!(v1.version, 1);
    assert!(v1.align.unwrap().previous.is_none());
    let saved = core.checkpoint(&ckpts, fingerprint).unwrap();
    let cursor = core.cursor();

    // Poisoned: one row turns NaN. A checkpoint refuses it; the gate holds the version, and the
    // publication itself sends the trainer back to its checkpoint (the daemon's hold path).
    let _ = core.model.tables[0].rows().get(3).get(0).fill_(f64::NAN);
    assert!(core.checkpoint(&ckpts, fingerprint).is_err());
    let hold = publish(&mut publication, &mut core).expect_err("held");
    assert_eq!(hold, Hold::NonFinite { rows: 1 });
    assert_eq!(status.report(true).held, 1);
    assert_eq!(
        status.report(true).pull,
        cfg.align.pull_max,
        "the pull is raised after a hold"
    );
    assert_eq!(
        core.pull(),
        cfg.align.pull_max,
        "and the trainer pulls that hard"
    );
    assert_eq!(
        publication.ledger().next_version(),
        2,
        "a held version takes no number"
    );

    // Restored: the checkpoint's parameters and cursor; training goes on from there.
    assert_eq!(core.cursor(), cursor);
    let finite = core.model.tables[0]
        .rows()
        .isfinite()
        .all()
        .int64_value(&[]);
    assert_eq!(finite, 1);
    assert_eq!(
        ckpts
            .load(fingerprint, tch::Device::Cpu)
            .unwrap()
            .unwrap()
            .meta
            .version,
        saved
    );
    store
        .append(&AppendBatch::from_events(
            "umls",
            half as i64,
            events[half..].to_vec(),
        ))
        .unwrap();
    while core.step(&store).unwrap().stats.is_some() {}
    // The hold raised the pull to its maximum, which pins trained rows to version 1 within
    // `publish.row_threshold`; publish every row so that version 2 exists to be measured.
    publication.set_settings(settings(0.0));
    let v2 = publish(&mut publication, &mut core).expect("version 2 after the restore");
    assert_eq!(v2.version, 2);
    let figures = v2.align.unwrap();
    let drift = figures.previous.expect("measured against version 1");
    assert!(drift.cosine_mean.is_finite() && drift.cosine_mean < cfg.align.hard_limit);
    assert!(
        figures.procrustes_residual.is_some(),
        "rotated onto the anchor"
    );
}
