//! `twhin-lab warm-start` on UMLS (from `.ci/setup`): the train split streamed through the
//! daemon's trainer, the 2nd to 5th edges of every source ranked before training on them, once
//! with warm-started rows for new nodes and once with random ones.

use std::path::PathBuf;

use figment::providers::Env;
use twhin_lab::warm_start::prequential_new_nodes;
use twhin_stream::config::Config;
use twhin_stream::offline::{apply_dataset_schema, DataSource, Dataset};

#[test]
fn new_nodes_first_edges_are_ranked_before_training_with_warm_and_random_rows() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let file = root.join("config/umls.toml");
    let mut cfg = Config::load_from(Some(&file), Env::prefixed("TWHIN_TEST_UNUSED_"))
        .expect("config/umls.toml loads");
    cfg.datasets.dir = root.join("data/datasets");
    cfg.storage.path = dir.path().join("store");
    let source = DataSource::Builtin(Dataset::Umls);
    apply_dataset_schema(&mut cfg, &source, Some(&file)).expect("UMLS's schema");
    let run = |warm| {
        prequential_new_nodes(&cfg, &source, warm, tch::Device::Cpu).unwrap_or_else(|e| {
            panic!("UMLS missing or unreadable ({e:#}); run .ci/setup to fetch it")
        })
    };
    let (random, warm) = (run(false), run(true));
    assert_eq!(
        (random.init.as_str(), warm.init.as_str()),
        ("random", "warm")
    );
    // Which edges are ranked depends on the split alone: the same ones both ways.
    assert_eq!(random.evaluated, 427);
    assert_eq!(warm.evaluated, random.evaluated);
    for r in [&random, &warm] {
        assert!(r.mrr > 0.0 && r.mrr <= r.hits10 && r.hits10 <= 1.0, "{r:?}");
    }
    // The two initialisations lead to different rows, so to different ranks.
    assert_ne!(warm.mrr, random.mrr);
}
