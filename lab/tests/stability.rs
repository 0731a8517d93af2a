//! Downstream stability on real data (MovieLens-100k from `.ci/setup`), the way
//! `twhin-lab stability` measures it, on a prefix of the rating stream: the daemon's trainer
//! and alignment publish versions in process; a classifier fitted on version 1 is scored on every
//! later one, with drift control on and off.

use std::path::PathBuf;

use figment::providers::Env;
use twhin_lab::movielens::Label;
use twhin_lab::retrain::measure_retrain;
use twhin_lab::stability::{measure, Scenario, StabilityOptions};
use twhin_stream::config::Config;

/// libtorch's random generator is global (each run seeds it): the two runs take turns, or one's
/// draws land in the other's initialisation.
static TORCH_RNG: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// `config/movielens-100k.toml` at dim 32, its store under `dir`.
fn movielens_config(dir: &std::path::Path) -> Config {
    // The workspace root, where config/ and data/ live.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cfg = Config::load_from(
        Some(&root.join("config/movielens-100k.toml")),
        Env::prefixed("TWHIN_TEST_UNUSED_"),
    )
    .expect("config/movielens-100k.toml loads");
    cfg.datasets.dir = root.join("data/datasets");
    cfg.storage.path = dir.join("store");
    cfg.train.dim = 32;
    cfg
}

#[test]
fn drift_control_holds_consecutive_and_accumulated_drift_below_the_uncontrolled_run() {
    let _turn = TORCH_RNG.lock();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = movielens_config(dir.path());
    // Fewer, larger steps through the knowledge graph: the test is about versions, not quality.
    cfg.train.batch_size = 2_000;
    // A target below the stream's natural drift (about 0.003 per version here), so the
    // controller has to pull.
    cfg.align.max_drift = 0.0005;
    let opts = StabilityOptions {
        scenario: Scenario::Stream,
        label: Some(Label::Gender),
        versions: 6,
        first_fraction: 0.3,
        holdout: 0.3,
        limit: Some(20_000),
        bootstrap_epochs: 0,
        retrain_epochs: 0,
        pq_subspaces: Vec::new(),
    };
    let report = measure(&cfg, tch::Device::Cpu, &opts).unwrap_or_else(|e| {
        panic!("MovieLens-100k missing or unreadable ({e:#}); run .ci/setup to fetch it")
    });
    eprintln!("{}", report.table());
    let (on, off) = (&report.on, &report.off);
    assert!(on.control && !off.control);
    for run in [on, off] {
        let numbers: Vec<u64> = run.versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, (1..=6).collect::<Vec<_>>(), "no version held");
        assert!(run
            .versions
            .iter()
            .all(|v| (0.0..=1.0).contains(&v.accuracy) && v.rows > 0));
    }
    // Version 1 is the same model either way (no reference to pull toward, no anchor yet).
    assert_eq!(on.versions[0].accuracy, off.versions[0].accuracy);
    assert!(on.versions[0].previous.is_none());
    let drift = |run: &twhin_lab::stability::StabilityRun, from: usize| {
        let d: Vec<f64> = run.versions[from..]
            .iter()
            .map(|v| v.previous.expect("measured").cosine_mean)
            .collect();
        d.iter().sum::<f64>() / d.len() as f64
    };
    // Once the controller has adapted (versions 3 on), consecutive drift is well below the
    // uncontrolled run's, and so is the drift accumulated since version 1.
    let (held, free) = (drift(on, 2), drift(off, 2));
    assert!(
        held < 0.6 * free,
        "consecutive drift on {held} vs off {free}"
    );
    let last = |run: &twhin_lab::stability::StabilityRun| {
        run.versions.last().unwrap().anchor.unwrap().cosine_mean
    };
    assert!(
        last(on) < last(off),
        "anchor drift on {} vs off {}",
        last(on),
        last(off)
    );
    assert!(
        on.versions.last().unwrap().pull > cfg.align.pull_init,
        "the pull was raised"
    );
    assert_eq!(off.versions.last().unwrap().pull, 0.0);
}

#[test]
fn a_full_retrain_is_published_raw_rotated_and_warm_started_and_only_the_warm_start_stays_near_a() {
    let _turn = TORCH_RNG.lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = movielens_config(dir.path());
    let opts = StabilityOptions {
        scenario: Scenario::Retrain,
        label: None,
        versions: 2,
        first_fraction: 0.5,
        holdout: 0.3,
        limit: Some(10_000),
        bootstrap_epochs: 0,
        retrain_epochs: 2,
        pq_subspaces: vec![32, 8],
    };
    let r = measure_retrain(&cfg, tch::Device::Cpu, &opts).unwrap_or_else(|e| {
        panic!("MovieLens-100k missing or unreadable ({e:#}); run .ci/setup to fetch it")
    });
    eprintln!("{}", r.table());
    assert_eq!(r.label, "genre:Drama");
    assert_eq!((r.anchor_ratings, r.retrain_ratings), (5_000, 10_000));
    assert_ne!(r.seed, r.retrain_seed);
    // Another seed lands far from A: the daemon's gate would hold it back as trained.
    let drift = |v: &twhin_lab::retrain::RetrainVariant| v.anchor_drift.expect("measured");
    assert!(drift(&r.raw) > 0.5, "raw drift {}", drift(&r.raw));
    assert!(r.raw.default_gate_holds && r.raw.procrustes_residual.is_none());
    // Procrustes turns it toward A; the warm start stays nearer still, at the default gate.
    assert!(r.procrustes.procrustes_residual.is_some());
    assert!(drift(&r.procrustes) < drift(&r.raw));
    assert!(drift(&r.warm_pull) < drift(&r.procrustes));
    assert!(!r.warm_pull.default_gate_holds);
    assert_eq!((r.warm_pull.versions, r.warm_pull.held), (3, 0));
    for v in [&r.raw, &r.procrustes, &r.warm_pull] {
        assert!((0.0..=1.0).contains(&v.balanced_accuracy));
    }
    // Version A product-quantized: 32 and 8 bytes a row; the coarser codes lose more.
    let [fine, coarse] = &r.pq[..] else {
        panic!("two compression ratios: {:?}", r.pq)
    };
    assert_eq!(
        (fine.code_bytes_per_row, coarse.code_bytes_per_row),
        (32, 8)
    );
    let f32_bytes = 4.0 * cfg.train.dim as f64;
    assert_eq!(
        (fine.compression, coarse.compression),
        (f32_bytes / 32.0, f32_bytes / 8.0)
    );
    eprintln!("{:?}", r.pq);
    assert!(fine.relative_error < coarse.relative_error);
    assert!(fine.recall_at_10 > coarse.recall_at_10);
    assert!((0.0..=1.0).contains(&fine.balanced_accuracy));
}

/// Downstream value (`twhin-lab downstream`) on a prefix of the rating stream: one version
/// published by the daemon's publisher at the cut; the ratings after it, whose user and movie
/// the version covers, split by time into the fitted and the scored half; both models scored on
/// the same examples, the one with embeddings reading the version's rows.
#[test]
fn downstream_models_with_and_without_the_published_version_score_the_same_later_ratings() {
    let _turn = TORCH_RNG.lock();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = movielens_config(dir.path());
    cfg.train.batch_size = 2_000;
    let opts = twhin_lab::downstream::DownstreamOptions {
        cut_fraction: 0.5,
        limit: Some(20_000),
        task: twhin_lab::downstream::DownstreamTask::RatedHigh,
        genres: Vec::new(),
    };
    let r = twhin_lab::downstream::measure_downstream(&cfg, tch::Device::Cpu, &opts)
        .unwrap_or_else(|e| panic!("MovieLens-100k missing or unreadable ({e:#})"));
    eprintln!("{}", r.table());
    assert_eq!(
        r.version, 1,
        "the first version, committed by the publisher"
    );
    assert!(r.version_rows > 0);
    assert_eq!(r.ratings_before_cut, 10_000);
    assert_eq!(
        r.fit_examples + r.scored_examples + r.skipped_new_nodes,
        10_000,
        "every rating after the cut is an example or skipped"
    );
    assert!(r.fit_examples.abs_diff(r.scored_examples) <= 1);
    // Most later ratings come from users who arrive after the cut (MovieLens users rate in
    // sessions); a few hundred remain on each side.
    assert!(r.scored_examples > 300, "{} scored", r.scored_examples);
    let (without, with) = (&r.without_embeddings, &r.with_embeddings);
    assert_eq!(without.features, 5);
    // One score per rating relation, with or without the user-movie product (dim 32).
    assert!(
        [5 + 2, 5 + 32 + 2].contains(&with.features),
        "{} features",
        with.features
    );
    for m in [without, with] {
        assert!((0.0..=1.0).contains(&m.accuracy) && (0.0..=1.0).contains(&m.balanced_accuracy));
        // A user's and a movie's earlier share of high ratings already rank later ratings.
        assert!(m.auc > 0.6, "AUC {} ({} features)", m.auc, m.features);
    }
}

/// Downstream value on an attribute the trained graph does not hold (`downstream --task genre`):
/// the genre relations are left out, one version is published, and for each genre both models
/// are fitted on half the movies it covers and scored on the other half, the one with embeddings
/// reading the movie's published row.
#[test]
fn genre_models_read_a_version_trained_without_the_genre_relations() {
    let _turn = TORCH_RNG.lock();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = movielens_config(dir.path());
    cfg.train.batch_size = 2_000;
    let genres = vec!["Action".to_owned(), "Comedy".to_owned()];
    let opts = twhin_lab::downstream::DownstreamOptions {
        cut_fraction: 0.5,
        limit: Some(20_000),
        task: twhin_lab::downstream::DownstreamTask::Genre,
        genres: genres.clone(),
    };
    let r = twhin_lab::genre::measure_genre_downstream(&cfg, tch::Device::Cpu, &opts)
        .unwrap_or_else(|e| panic!("MovieLens-100k missing or unreadable ({e:#})"));
    eprintln!("{}", r.table());
    assert_eq!(r.version, 1);
    assert_eq!(
        r.left_out_relations,
        ["film.film.genre", "film.film_genre.films_in_this_genre"]
    );
    assert!(r.fit_movies.abs_diff(r.scored_movies) <= 1 && r.scored_movies > 300);
    assert_eq!(r.genres.len(), 2);
    for g in &r.genres {
        assert_eq!(g.without_embeddings.features, 3, "{}", g.genre);
        assert!(
            g.with_embeddings.features > 3 + 16,
            "{} features",
            g.with_embeddings.features
        );
        assert!(
            (0.0..0.5).contains(&g.positive_share),
            "{} {}",
            g.genre,
            g.positive_share
        );
        for m in [&g.without_embeddings, &g.with_embeddings] {
            assert!(m.auc > 0.5 && m.auc <= 1.0, "{}: AUC {}", g.genre, m.auc);
        }
    }
    assert!(
        r.genres
            .iter()
            .any(|g| g.with_embeddings.auc > g.without_embeddings.auc),
        "the movie rows add to the counts for some genre"
    );
}
