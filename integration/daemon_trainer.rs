//! The daemon's trainer against a real broker (tansu on 127.0.0.1): it trains every edge it
//! ingests, reports it in `/v1/status` and `/metrics`, checkpoints on SIGTERM, resumes after a
//! restart or a SIGKILL, and falls back past a corrupt checkpoint.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const TOPIC: &str = "twhin.engagements";

/// `(version, cursor)` of the checkpoint `CURRENT` names.
fn current_checkpoint(dir: &Path) -> (u64, u64) {
    let name = std::fs::read_to_string(dir.join("CURRENT")).expect("CURRENT pointer");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(name.trim()).join("meta.json")).expect("meta.json"),
    )
    .unwrap();
    (
        meta["version"].as_u64().unwrap(),
        meta["cursor"].as_u64().unwrap(),
    )
}

fn wait_for_cursor(daemon: &Daemon, at_least: u64) -> serde_json::Value {
    wait_until(
        &format!("the trainer's cursor at {at_least}"),
        Duration::from_secs(180),
        || {
            daemon
                .status()
                .filter(|st| status_u64(st, "/trainer/cursor") >= at_least)
        },
    )
}

#[test]
fn the_daemon_trains_what_it_ingests_checkpoints_and_resumes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let store = dir.path().join("store");
    let ckpts = store.join("checkpoints");
    let port = free_port();
    let mut env = daemon_env(&broker.bootstrap, &store, port);
    env.push(("TWHIN_TRAIN__DIM".into(), "32".into()));
    env.push(("TWHIN_TRAINER__CHECKPOINT_INTERVAL_SECS".into(), "1".into()));
    cli(&env, &["topics", "apply"]);
    let msgs: Vec<Outgoing> = (0..6_000).map(|i| valid_event(i, false).0).collect();

    let mut daemon = Daemon::start(env, port, dir.path());
    produce(&broker.bootstrap, TOPIC, &msgs[..4_000], None);
    let st = wait_for_cursor(&daemon, 4_000);
    assert_eq!(status_u64(&st, "/store/edges_total"), 4_000);
    assert_eq!(status_u64(&st, "/trainer/cursor"), 4_000, "{st}");
    assert_eq!(
        status_u64(&st, "/trainer/edges_trained"),
        4_000,
        "each edge once"
    );
    assert!(status_u64(&st, "/trainer/steps") >= 4, "{st}");
    assert_eq!(status_u64(&st, "/trainer/backlog"), 0);
    assert!(
        st.pointer("/trainer/loss")
            .and_then(|v| v.as_f64())
            .is_some(),
        "{st}"
    );
    let metrics = daemon.metrics();
    for name in [
        "twhin_train_steps_total",
        "twhin_train_edges_total{kind=\"new\"} 4000",
        "twhin_train_edges_total{kind=\"replay\"}",
        "twhin_train_step_seconds_bucket",
        "twhin_train_backlog_edges 0",
        "twhin_train_rows_initialised_total{init=\"random\"}",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }

    // SIGTERM: the final checkpoint is at the cursor; a restart resumes there with no backlog.
    assert!(daemon.terminate().success());
    let (v1, c1) = current_checkpoint(&ckpts);
    assert_eq!(c1, 4_000);
    daemon.restart();
    let st = daemon.status().unwrap();
    assert_eq!(status_u64(&st, "/trainer/cursor"), 4_000, "{st}");
    assert_eq!(
        status_u64(&st, "/trainer/steps"),
        0,
        "nothing retrained: {st}"
    );
    assert_eq!(resumed_from(&st), (v1, 4_000, Vec::new()), "{st}");

    // More events; the prequential evaluation ranks new edges between known nodes.
    produce(&broker.bootstrap, TOPIC, &msgs[4_000..], None);
    let st = wait_for_cursor(&daemon, 6_000);
    assert!(status_u64(&st, "/trainer/prequential/ranked") > 0, "{st}");
    assert!(daemon.metrics().contains("twhin_prequential_hits_at_10"));
    let by_relation = st
        .pointer("/trainer/prequential/by_relation")
        .and_then(|v| v.as_object())
        .expect("per-relation prequential figures");
    assert!(!by_relation.is_empty(), "{st}");
    assert!(daemon
        .metrics()
        .contains("twhin_prequential_relation_hits_at_10{relation="));

    // SIGKILL: the restart resumes from the newest checkpoint on disk, then catches up.
    std::thread::sleep(Duration::from_millis(1_500));
    daemon.kill9();
    let (v2, c2) = current_checkpoint(&ckpts);
    assert!(v2 > v1 && (4_000..=6_000).contains(&c2), "{v2} {c2}");
    daemon.restart();
    let st = daemon.status().unwrap();
    assert_eq!(resumed_from(&st), (v2, c2, Vec::new()), "{st}");
    wait_for_cursor(&daemon, 6_000);
    assert!(daemon.terminate().success());

    // A corrupt newest checkpoint: reported, and the one before it is used.
    let (v3, c3) = current_checkpoint(&ckpts);
    assert_eq!(c3, 6_000);
    let tensors = ckpts.join(format!("ckpt-{v3:012}")).join("tensors.ot");
    let mut bytes = std::fs::read(&tensors).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&tensors, bytes).unwrap();
    daemon.restart();
    let st = daemon.status().unwrap();
    let (version, cursor, unusable) = resumed_from(&st);
    assert!(
        version < v3 && cursor <= c3,
        "an older checkpoint is used: {st}"
    );
    assert_eq!(unusable.len(), 1, "{st}");
    assert_eq!(unusable[0].0, v3, "{st}");
    assert!(unusable[0].1.contains("CRC-32"), "{st}");
    wait_for_cursor(&daemon, 6_000);
    assert!(daemon.terminate().success());
}

/// `/v1/status`'s `trainer.resumed_from`: the checkpoint's version and cursor, and the
/// `(version, error)` of each newer one found unusable. Panics when the field is missing.
fn resumed_from(st: &serde_json::Value) -> (u64, u64, Vec<(u64, String)>) {
    let r = st
        .pointer("/trainer/resumed_from")
        .filter(|r| !r.is_null())
        .unwrap_or_else(|| panic!("trainer.resumed_from missing: {st}"));
    let unusable = r["unusable"]
        .as_array()
        .unwrap_or_else(|| panic!("resumed_from.unusable missing: {st}"))
        .iter()
        .map(|u| {
            let v = u["version"].as_u64().expect("unusable version");
            (v, u["error"].as_str().expect("unusable error").to_owned())
        })
        .collect();
    (
        status_u64(r, "/version"),
        status_u64(r, "/cursor"),
        unusable,
    )
}

/// `twhin_publish_last_version` from `/metrics` (0 before the first version).
fn last_version(daemon: &Daemon) -> u64 {
    daemon
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("twhin_publish_last_version "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn versions_are_published_whole_and_numbered_across_restarts_and_kills() {
    use std::collections::HashMap;

    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Publishing {
        broker,
        store,
        port,
        env,
    } = publishing(dir.path(), 16, 1, &[]);
    let msgs: Vec<Outgoing> = (0..4_000).map(|i| valid_event(i, false).0).collect();

    let mut daemon = Daemon::start(env, port, dir.path());
    produce(&broker.bootstrap, TOPIC, &msgs[..2_000], None);
    wait_for_cursor(&daemon, 2_000);
    wait_until("a version", Duration::from_secs(60), || {
        (last_version(&daemon) >= 1).then_some(())
    });
    assert!(daemon.terminate().success(), "final publication and exit 0");
    daemon.restart();
    produce(&broker.bootstrap, TOPIC, &msgs[2_000..3_000], None);
    wait_for_cursor(&daemon, 3_000);
    std::thread::sleep(Duration::from_secs(3));
    // Killed at a moment that may fall inside a publication.
    daemon.kill9();
    daemon.restart();
    produce(&broker.bootstrap, TOPIC, &msgs[3_000..], None);
    wait_for_cursor(&daemon, 4_000);
    std::thread::sleep(Duration::from_secs(3));
    assert!(daemon.terminate().success());

    let Published { rows, markers } = read_published(&broker.bootstrap, 3);
    // One per version (a version covers every partition, each with its marker).
    let markers = rounds(&markers);
    let versions: Vec<u64> = markers.iter().map(|m| m.version).collect();
    assert!(versions.len() >= 3, "{versions:?}");
    assert_eq!(
        versions,
        (1..=versions.len() as u64).collect::<Vec<_>>(),
        "strictly increasing, none skipped, none republished"
    );
    assert!(markers.windows(2).all(|w| w[0].epoch <= w[1].epoch));
    let mut count: HashMap<(u64, u64), u64> = HashMap::new();
    for (_, key, rec) in &rows {
        // A partition's share of the relations holds every relation's vector (8 of them).
        let width = match twhin_stream::subscriber::is_node_key(key) {
            true => 16,
            false if key.starts_with("relation-delta:") => 8 * 16,
            false => 16,
        };
        assert_eq!(rec.vector.len(), width, "{key}");
        assert!(rec.vector.iter().all(|v| v.is_finite()));
        *count.entry((rec.version, rec.epoch)).or_default() += 1;
    }
    for m in &markers {
        assert_eq!(
            count.get(&(m.version, m.epoch)).copied().unwrap_or(0),
            m.rows,
            "every row of version {} epoch {} is in",
            m.version,
            m.epoch
        );
    }
    // The first version carries every node seen so far plus the relations.
    assert!(markers[0].rows > 1_000, "{:?}", markers[0]);
    // Drift figures ride on every marker; every version after the first (restarts included:
    // the reference is persisted) is measured against its predecessor, rotated onto the anchor
    // (version 1), and the pull is on.
    for m in &markers {
        let a = m.align.as_ref().expect("alignment figures in the marker");
        assert!(a.control);
        if m.version > 1 {
            let prev = a.previous.expect("drift against the previous version");
            assert!(
                prev.cosine_mean.is_finite() && prev.cosine_mean < 0.5,
                "{m:?}"
            );
            assert!(
                a.anchor.is_some() && a.procrustes_residual.is_some(),
                "{m:?}"
            );
            assert!(a.pull > 0.0);
        }
    }
    let publish_dir = store.join("publish");
    let meta = |stem: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(publish_dir.join(format!("{stem}.json"))).unwrap())
            .unwrap()
    };
    assert_eq!(meta("anchor")["version"], 1);
    assert_eq!(meta("reference")["version"], *versions.last().unwrap());
}

/// The daemon inside the test process (`app::run` with a oneshot as its shutdown future)
/// against tansu: every event stored once, trained, checkpointed and published, and a clean
/// stop when the future completes.
#[test]
fn the_daemon_runs_in_process_and_stops_when_its_shutdown_future_completes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let store = dir.path().join("store");
    let port = free_port();
    let cfg = twhin_stream::config::Config::from_toml(&format!(
        r#"
        [kafka]
        bootstrap_servers = "{}"
        [kafka.consumer]
        "session.timeout.ms" = "6000"
        [storage]
        path = "{}"
        [http]
        bind = "127.0.0.1:{port}"
        [ingest]
        batch_max_wait_ms = 100
        [train]
        dim = 16
        [publish]
        interval_secs = 1
        "#,
        broker.bootstrap,
        store.display()
    ))
    .unwrap();
    let msgs: Vec<Outgoing> = (0..3_000).map(|i| valid_event(i, false).0).collect();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = std::thread::spawn(move || {
        twhin_stream::app::run(cfg, async {
            let _ = stopped.await;
        })
    });
    wait_until(
        "the in-process daemon's HTTP",
        Duration::from_secs(60),
        || http_get(port, "/healthz").ok(),
    );
    produce(&broker.bootstrap, TOPIC, &msgs, None);
    wait_until(
        "every event trained and a version out",
        Duration::from_secs(180),
        || {
            let st: serde_json::Value =
                serde_json::from_str(&http_get(port, "/v1/status").ok()?).ok()?;
            (status_u64(&st, "/trainer/cursor") == 3_000
                && status_u64(&st, "/publish/committed") > 0)
                .then_some(())
        },
    );
    stop.send(()).unwrap();
    daemon.join().expect("no panic").expect("a clean stop");

    let (triples, edges) = stored_triples(&store);
    assert_eq!(edges, 3_000, "nothing lost, nothing doubled");
    assert_eq!(triples.len(), 3_000);
    assert_eq!(
        current_checkpoint(&store.join("checkpoints")).1,
        3_000,
        "final checkpoint"
    );
    let markers = read_published(&broker.bootstrap, 1).markers;
    assert_eq!(
        markers.last().map(|m| m.version),
        Some(ledger_last_version(&store))
    );
}

/// Setting `TWHIN_STORAGE__PATH` alone gives a daemon of the same deployment (the same consumer
/// group) its own data folder: the same environment with another store starts (no "checkpoint
/// ahead of the store"), takes the graph from the group's changelog rather than the topic and
/// its rows from the newest published version (it has no checkpoint), so that its versions go
/// on in the coordinates subscribers hold; trains and publishes, and keeps its checkpoints and
/// ledger beside its store, leaving the first's alone.
#[test]
fn a_daemon_on_another_storage_path_takes_the_graph_from_the_changelog_and_keeps_its_own_state() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let port = free_port();
    let env_for = |store: &Path| {
        let mut env = daemon_env(&broker.bootstrap, store, port);
        env.push(("TWHIN_TRAIN__DIM".into(), "16".into()));
        env.push(("TWHIN_PUBLISH__INTERVAL_SECS".into(), "1".into()));
        env
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    cli(&env_for(&a), &["topics", "apply"]);
    let msgs: Vec<Outgoing> = (0..2_000).map(|i| valid_event(i, false).0).collect();
    produce(&broker.bootstrap, TOPIC, &msgs, None);

    std::fs::create_dir_all(dir.path().join("a-log")).unwrap();
    let mut first = Daemon::start(env_for(&a), port, &dir.path().join("a-log"));
    wait_for_cursor(&first, 2_000);
    let nodes: Vec<String> = (0..40).map(|i| valid_event(i, false).1 .0).collect();
    let served =
        |port| -> Vec<(u64, Vec<f32>)> { nodes.iter().map(|n| served_row(port, n)).collect() };
    // The versions settled: none new for 2.5 s (the first goes out once the model has rows).
    let version = |d: &Daemon| d.status()?.pointer("/publish/version")?.as_u64();
    wait_until(
        "a version after the cursor",
        Duration::from_secs(60),
        || {
            let before = version(&first)?;
            std::thread::sleep(Duration::from_millis(2_500));
            (version(&first)? == before).then_some(())
        },
    );
    let a_rows = served(port);
    assert!(first.terminate().success());
    let a_checkpoint = current_checkpoint(&a.join("checkpoints"));
    let a_versions = ledger_last_version(&a);

    std::fs::create_dir_all(dir.path().join("b-log")).unwrap();
    let mut second = Daemon::start(env_for(&b), port, &dir.path().join("b-log"));
    let st = wait_for_cursor(&second, 2_000);
    assert_eq!(status_u64(&st, "/store/edges_total"), 2_000, "{st}");
    assert_eq!(status_u64(&st, "/ingest/restored/appended"), 2_000, "{st}");
    // It publishes once it holds every partition, assigned at the restored offsets: by then
    // nothing of the topic was consumed again.
    let st = wait_until("a version of the second", Duration::from_secs(60), || {
        let st = second.status()?;
        (st.pointer("/publish/version")?.as_u64()? >= 1).then_some(st)
    });
    assert_eq!(status_u64(&st, "/ingest/consumed"), 0, "{st}");
    let b_rows = served(port);
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let mean_cosine = (a_rows.iter().zip(&b_rows))
        .map(|((_, a), (_, b))| cosine(a, b))
        .sum::<f32>()
        / nodes.len() as f32;
    eprintln!("mean cosine between a's last rows and b's first version: {mean_cosine}");
    assert_eq!(
        status_u64(&st, "/trainer/started_from/version"),
        a_versions,
        "{st}"
    );
    assert!(status_u64(&st, "/trainer/started_from/rows") >= 997, "{st}");
    assert!(mean_cosine > 0.95, "{mean_cosine}");
    assert!(second.terminate().success());
    assert_eq!(current_checkpoint(&b.join("checkpoints")).1, 2_000);
    assert!(ledger_last_version(&b) >= 1);
    assert_eq!(
        current_checkpoint(&a.join("checkpoints")),
        a_checkpoint,
        "a's own"
    );
    assert_eq!(ledger_last_version(&a), a_versions);
}
