//! Kills at every stage, against a real broker (tansu on 127.0.0.1): the daemon is SIGKILLed
//! `KILL_TEST_KILLS` times (default 20) at seeded random moments inside ingest, training,
//! checkpointing and publication, restarted after each, then left to finish. Afterwards the
//! store holds every produced event exactly once, the version numbers on the versions topic run
//! 1, 2, 3, … with none skipped, and a subscriber's table (built with [`VersionAssembler`] from
//! everything on the embeddings and versions topics, as `examples/subscriber.rs` does) equals
//! the rows the daemon serves (`GET /v1/embeddings/{type}/{id}`, every node of the store).
//!
//! How each kill lands in its stage (the stage of each kill is drawn from a seeded shuffle of
//! the four, so that each is hit `kills / 4` times or more):
//! * ingest: events are being produced (paced, from a thread) and `/v1/status`
//!   `store.edges_total` is below what has been produced while `ingest.consumed` moved between
//!   the last two polls;
//! * training: `trainer.backlog` > 0 at the poll just before the kill;
//! * checkpointing: a `ckpt-N` folder newer than the one `CURRENT` names exists (the checkpoint
//!   is being written: tensors, meta, pointer), seen by polling the folder every millisecond;
//!   when none is caught within a few seconds, the kill lands within a few milliseconds of
//!   `trainer.checkpoint_version` moving (counted apart, `checkpoint (just after)`);
//! * publication: `publish.in_progress` non-null, then a random 0–25 ms, then the same version
//!   and epoch still in progress at the poll just before the kill.
//!
//! The moment inside the stage is random (seeded: `KILL_TEST_SEED`): a random delay after
//! the stage is seen, then the stage is confirmed again before the kill.
//!
//! The knobs are not `TWHIN_*`: the daemon inherits the test's environment and refuses unknown
//! `TWHIN_` keys.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use twhin_stream::subscriber::VersionAssembler;

const TOPIC: &str = "twhin.engagements";

/// The i-th event; every `(src, rel, dst)` is distinct for i below 4,985,000 (the residues of i
/// modulo 997, 8 and 5,000 determine it), over about 7,000 nodes, so the served table stays
/// small enough to read back whole over HTTP.
fn event(i: usize) -> (Outgoing, Triple) {
    let (st, rel, dt) = RELS[i % RELS.len()];
    let src = format!("{st}:{}", i % 997);
    let dst = format!("{dt}:{}", i % 5_000);
    // No event_id: deduplication by id would hide an event stored twice.
    let json = serde_json::json!({"src": src, "rel": rel, "dst": dst, "ts": 1_732_190_000_000u64 + i as u64});
    let out = Outgoing {
        key: src.clone(),
        payload: Some(json.to_string().into_bytes()),
    };
    (out, (src, rel.to_owned(), dst))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Ingest,
    Training,
    Checkpoint,
    Publication,
}

const STAGES: [Stage; 4] = [
    Stage::Ingest,
    Stage::Training,
    Stage::Checkpoint,
    Stage::Publication,
];

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Parse a checkpoint folder or pointer name, `ckpt-000000000012`.
fn ckpt_version(name: &str) -> Option<u64> {
    name.trim().strip_prefix("ckpt-")?.parse().ok()
}

/// The versions of the `ckpt-N` folders, and the one `CURRENT` names (0: none).
fn checkpoints(dir: &Path) -> (BTreeSet<u64>, u64) {
    let folders = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| ckpt_version(e.ok()?.file_name().to_str()?))
                .collect()
        })
        .unwrap_or_default();
    let current = std::fs::read_to_string(dir.join("CURRENT"))
        .ok()
        .and_then(|s| ckpt_version(&s))
        .unwrap_or(0);
    (folders, current)
}

struct Run {
    daemon: Daemon,
    bootstrap: String,
    checkpoint_dir: PathBuf,
    rng: SmallRng,
    /// Events produced so far (each once, acknowledged).
    produced: usize,
    kills: BTreeMap<&'static str, u32>,
    /// Checkpoint folders left partial by earlier kills: never "being written".
    stale_checkpoints: BTreeSet<u64>,
}

impl Run {
    fn status(&self) -> serde_json::Value {
        wait_until("/v1/status", Duration::from_secs(30), || {
            self.daemon.status()
        })
    }

    /// Produce the next `n` events now (returns once acknowledged).
    fn produce(&mut self, n: usize) {
        let msgs: Vec<Outgoing> = (self.produced..self.produced + n)
            .map(|i| event(i).0)
            .collect();
        produce(&self.bootstrap, TOPIC, &msgs, None);
        self.produced += n;
    }

    /// Produce the next `n` events at `per_sec` from a thread; `produced` counts them already.
    fn produce_paced(&mut self, n: usize, per_sec: f64) -> std::thread::JoinHandle<()> {
        let msgs: Vec<Outgoing> = (self.produced..self.produced + n)
            .map(|i| event(i).0)
            .collect();
        self.produced += n;
        let bootstrap = self.bootstrap.clone();
        std::thread::spawn(move || {
            produce(&bootstrap, TOPIC, &msgs, Some(per_sec));
        })
    }

    fn kill(&mut self, what: &'static str) {
        self.daemon.kill9();
        *self.kills.entry(what).or_default() += 1;
        self.stale_checkpoints = checkpoints(&self.checkpoint_dir).0;
        self.daemon.restart();
    }

    /// Poll `/v1/status` every `every` until `f` accepts it.
    fn wait_status<T>(
        &self,
        what: &str,
        every: Duration,
        mut f: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(st) = self.daemon.status() {
                if let Some(v) = f(&st) {
                    return v;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}\n{}",
                self.daemon.log_tail()
            );
            std::thread::sleep(every);
        }
    }

    /// Kill while events are being consumed and some are not stored yet.
    fn kill_in_ingest(&mut self) -> String {
        // Produced once this incarnation owns its partitions (a group join takes seconds on the
        // test broker): otherwise every event is there before it joins, and one batch takes
        // them all before a poll can see ingest under way.
        self.wait_status("the partitions assigned", Duration::from_millis(20), |st| {
            (status_u64(st, "/kafka/assigned_partitions") > 0).then_some(())
        });
        let n = self.rng.random_range(3_000..8_000);
        let before = status_u64(&self.status(), "/ingest/consumed");
        // Two seconds of production: the kill's random delay (under 0.7 s) falls inside it, and
        // the daemon keeps up, so stored < produced while it consumes.
        let producer = self.produce_paced(n, n as f64 / 2.0);
        let delay = Duration::from_millis(self.rng.random_range(100..700));
        let start = Instant::now();
        let mut last: Option<u64> = None;
        let detail = loop {
            let st = self.status();
            let consumed = status_u64(&st, "/ingest/consumed");
            let stored = status_u64(&st, "/store/edges_total");
            let moving = last.is_some_and(|l| consumed > l) && consumed > before;
            if start.elapsed() >= delay && moving && (stored as usize) < self.produced {
                break format!(
                    "consumed {consumed}, stored {stored} of {} produced",
                    self.produced
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "ingest never seen under way\n{}",
                self.daemon.log_tail()
            );
            last = Some(consumed);
            std::thread::sleep(Duration::from_millis(20));
        };
        self.kill("ingest");
        producer.join().unwrap();
        detail
    }

    /// Kill while the trainer has stored edges it has not trained on.
    fn kill_in_training(&mut self) -> String {
        // Edges keep arriving, so the trainer keeps having some to train on.
        let n = self.rng.random_range(3_000..6_000);
        let producer = self.produce_paced(n, 6_000.0);
        std::thread::sleep(Duration::from_millis(self.rng.random_range(100..600)));
        let backlog = self.wait_status("a training backlog", Duration::from_millis(5), |st| {
            let b = status_u64(st, "/trainer/backlog");
            (b > 0).then_some(b)
        });
        self.kill("training");
        producer.join().unwrap();
        format!("backlog {backlog}")
    }

    /// Kill while a checkpoint is being written, else just after one.
    fn kill_in_checkpoint(&mut self) -> String {
        let n = self.rng.random_range(4_000..10_000);
        let producer = self.produce_paced(n, 4_000.0);
        let first = status_u64(&self.status(), "/trainer/checkpoint_version");
        // Skip a random number of checkpoints (each about a second apart).
        let skip = self.rng.random_range(0..2u64);
        let start = Instant::now();
        let mut last_poll = Instant::now() - Duration::from_secs(1);
        let mut last_version = first;
        let (what, detail) = loop {
            let (folders, current) = checkpoints(&self.checkpoint_dir);
            if let Some(&newest) = folders.last() {
                if newest > current
                    && !self.stale_checkpoints.contains(&newest)
                    && last_version >= first + skip
                {
                    break (
                        "checkpoint (being written)",
                        format!("ckpt-{newest} being written, CURRENT ckpt-{current}"),
                    );
                }
            }
            if last_poll.elapsed() > Duration::from_millis(50) {
                last_poll = Instant::now();
                let v = status_u64(&self.status(), "/trainer/checkpoint_version");
                if v != last_version && start.elapsed() > Duration::from_secs(5) {
                    break (
                        "checkpoint (just after)",
                        format!("checkpoint_version moved {last_version} → {v}"),
                    );
                }
                last_version = v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no checkpoint written\n{}",
                self.daemon.log_tail()
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        self.kill(what);
        producer.join().unwrap();
        detail
    }

    /// Kill while a version's rows are being produced.
    fn kill_in_publication(&mut self) -> String {
        let n = self.rng.random_range(2_000..6_000);
        self.produce(n);
        // A random moment inside: some time after the publication is seen, confirmed still
        // under way (same version and epoch) at the poll just before the kill.
        let in_progress = |st: &serde_json::Value| {
            let p = st.pointer("/publish/in_progress")?;
            Some((
                p.get("version")?.as_u64()?,
                p.get("epoch")?.as_u64()?,
                p.to_string(),
            ))
        };
        let start = Instant::now();
        let mut quiet_since = Instant::now();
        let found = loop {
            // A version goes out only when training moved rows: while none is seen, more events.
            let Some(seen) = self.daemon.status().as_ref().and_then(in_progress) else {
                if quiet_since.elapsed() > Duration::from_secs(3) {
                    self.produce(1_500);
                    quiet_since = Instant::now();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(120),
                    "no publication seen\n{}",
                    self.daemon.log_tail()
                );
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            quiet_since = Instant::now();
            // Sending a version's rows takes some 40 ms here.
            std::thread::sleep(Duration::from_millis(self.rng.random_range(0..25)));
            if let Some(now) = self.daemon.status().as_ref().and_then(in_progress) {
                if (now.0, now.1) == (seen.0, seen.1) {
                    break now.2;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no publication lasted long enough to be killed inside\n{}",
                self.daemon.log_tail()
            );
        };
        self.kill("publication");
        format!("in progress {found}")
    }
}

/// Every node the events name, as `type:id` (the store cannot be opened while the daemon runs).
fn nodes_of(triples: &HashSet<Triple>) -> BTreeSet<String> {
    triples
        .iter()
        .flat_map(|(s, _, d)| [s.clone(), d.clone()])
        .collect()
}

/// The served row of `node` (`type:id`): its version and vector.
fn served_row(port: u16, node: &str) -> (u64, Vec<f32>) {
    let (t, id) = node.split_once(':').unwrap();
    let body = http_get(port, &format!("/v1/embeddings/{t}/{id}"))
        .unwrap_or_else(|e| panic!("GET embeddings of {node}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let vector = v["vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (status_u64(&v, "/version"), vector)
}

#[test]
fn kills_at_every_stage_lose_nothing_double_nothing_and_subscribers_hold_the_served_version() {
    let _serial = serial();
    let started = Instant::now();
    let kills = env_u64("KILL_TEST_KILLS", 20) as usize;
    let seed = env_u64("KILL_TEST_SEED", 20_260_310);
    assert!(kills >= 4, "KILL_TEST_KILLS must be at least 4");
    let dir = tempfile::tempdir().unwrap();
    let Publishing {
        broker,
        port,
        env,
        store,
    } = publishing(
        dir.path(),
        16,
        1,
        &[
            ("TWHIN_TRAINER__CHECKPOINT_INTERVAL_SECS", "1"),
            // Static membership: a restarted daemon takes its partitions back without waiting
            // out the dead one's session. (tansu 0.6 still answers JoinGroup and SyncGroup after
            // about 3 s each, so ingest resumes about 6 s after every restart.)
            (
                "TWHIN_KAFKA__CONSUMER__GROUP_INSTANCE_ID",
                "twhin-kill-test",
            ),
            ("TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "2000"),
            ("TWHIN_KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS", "500"),
        ],
    );
    let daemon = Daemon::start(env, port, dir.path());
    let mut run = Run {
        daemon,
        bootstrap: broker.bootstrap.clone(),
        checkpoint_dir: store.join("checkpoints"),
        rng: SmallRng::seed_from_u64(seed),
        produced: 0,
        kills: BTreeMap::new(),
        stale_checkpoints: BTreeSet::new(),
    };
    // A first version, so that every stage has something before it.
    run.produce(3_000);
    run.wait_status("version 1", Duration::from_millis(100), |st| {
        st.pointer("/publish/version")?.as_u64()
    });

    let mut plan = Vec::new();
    while plan.len() < kills {
        let mut round = STAGES.to_vec();
        round.shuffle(&mut run.rng);
        plan.extend(round);
    }
    plan.truncate(kills);
    for (k, stage) in plan.iter().enumerate() {
        let t = Instant::now();
        let detail = match stage {
            Stage::Ingest => run.kill_in_ingest(),
            Stage::Training => run.kill_in_training(),
            Stage::Checkpoint => run.kill_in_checkpoint(),
            Stage::Publication => run.kill_in_publication(),
        };
        eprintln!(
            "kill {:>2}/{kills} at {:>5.1} s, {stage:?}: {detail} ({:.1} s)",
            k + 1,
            started.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
    }
    let kill_phase = started.elapsed();

    // Left to finish: a last batch of events, every event stored, trained and published.
    run.produce(2_000);
    let expected: HashSet<Triple> = (0..run.produced).map(|i| event(i).1).collect();
    assert_eq!(expected.len(), run.produced, "the events are distinct");
    let produced = run.produced as u64;
    run.wait_status("every event stored", Duration::from_millis(200), |st| {
        (status_u64(st, "/store/edges_total") >= produced).then_some(())
    });
    // Quiet: nothing to train, no publication under way, the served version unchanged for 5 s.
    let mut stable_since = Instant::now();
    let mut served_version = 0;
    loop {
        let st = run.status();
        let v = st
            .pointer("/publish/version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let busy = status_u64(&st, "/trainer/backlog") > 0
            || !st.pointer("/publish/in_progress").unwrap().is_null();
        if busy || v != served_version {
            stable_since = Instant::now();
            served_version = v;
        }
        if stable_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        assert!(
            started.elapsed() < kill_phase + Duration::from_secs(180),
            "the daemon never went quiet: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The served rows of every node, then the same version still served.
    let nodes = nodes_of(&expected);
    let mut served: HashMap<String, Vec<f32>> = HashMap::new();
    for node in &nodes {
        let (version, vector) = served_row(port, node);
        assert_eq!(
            version, served_version,
            "{node} served from another version"
        );
        served.insert(node.clone(), vector);
    }
    let st = run.status();
    assert_eq!(
        st.pointer("/publish/version").and_then(|v| v.as_u64()),
        Some(served_version),
        "a version came out while the served rows were read"
    );
    let served_relations = status_u64(&st, "/publish/relations");

    // The subscriber: everything on both topics, rows first (the worst order: every version's
    // rows wait for its marker), then the markers, then a catch-up as the example does.
    let p = read_published(&broker.bootstrap, served_version as usize);
    let mut a = VersionAssembler::new();
    let mut applied = Vec::new();
    for (k, r) in &p.rows {
        applied.extend(a.push_row(k.as_str(), r.clone()));
    }
    for m in &p.markers {
        applied.extend(a.push_marker(m.clone()));
    }
    applied.extend(a.catch_up());
    let marker_versions: BTreeSet<u64> = p.markers.iter().map(|m| m.version).collect();
    let applied_versions: Vec<u64> = applied.iter().map(|v| v.version).collect();
    let repeated_markers = p.markers.len() - marker_versions.len();
    // Rows of attempts that never got a marker: publications the kills cut short.
    let marked: HashSet<(u64, u64)> = p.markers.iter().map(|m| (m.version, m.epoch)).collect();
    let mut interrupted: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for (_, r) in &p.rows {
        if !marked.contains(&(r.version, r.epoch)) {
            *interrupted.entry((r.version, r.epoch)).or_default() += 1;
        }
    }
    let subscriber_nodes = a.nodes();
    let mut differing = Vec::new();
    for (key, vector) in &served {
        match a.get(key) {
            Some(e) if e.vector == *vector => {}
            Some(e) => differing.push(format!(
                "{key}: subscriber {:?} (version {}) vs served {:?}",
                &e.vector[..3],
                e.version,
                &vector[..3]
            )),
            None => differing.push(format!("{key}: not in the subscriber's table")),
        }
    }
    let extra: Vec<&String> = a
        .table()
        .keys()
        .filter(|k| !k.starts_with("relation:") && !served.contains_key(*k))
        .collect();

    assert!(run.daemon.terminate().success(), "a clean stop at the end");
    let (stored, edges) = stored_triples(&store);
    let lost = expected.difference(&stored).count();
    let unexpected = stored.difference(&expected).count();
    let duplicated = edges - stored.len() as u64;

    let mut per_stage: BTreeMap<Stage, u32> = BTreeMap::new();
    for (what, n) in &run.kills {
        let stage = match *what {
            "ingest" => Stage::Ingest,
            "training" => Stage::Training,
            "publication" => Stage::Publication,
            _ => Stage::Checkpoint,
        };
        *per_stage.entry(stage).or_default() += n;
    }
    eprintln!("---- kills at every stage (seed {seed}) ----");
    eprintln!("kills: {} in all, {:?}", kills, run.kills);
    eprintln!(
        "edges: expected {}, stored {edges} ({} distinct), lost {lost}, duplicated {duplicated}, unexpected {unexpected}",
        expected.len(),
        stored.len()
    );
    eprintln!(
        "versions: served {served_version}; markers {} for versions {:?}..={:?} ({repeated_markers} repeated); rows without a marker {} in {} cut-short attempts {:?}; subscriber applied {} ({:?}..={:?}), counts {:?}",
        p.markers.len(),
        marker_versions.first(),
        marker_versions.last(),
        interrupted.values().sum::<usize>(),
        interrupted.len(),
        interrupted.keys().collect::<Vec<_>>(),
        applied.len(),
        applied_versions.first(),
        applied_versions.last(),
        a.counts()
    );
    eprintln!(
        "subscriber check: {} served node rows, subscriber holds {subscriber_nodes} nodes and {} relations (served {served_relations}); {} differ, {} extra",
        served.len(),
        a.table().len() - subscriber_nodes,
        differing.len(),
        extra.len()
    );
    eprintln!(
        "wall: {:.0} s ({:.0} s killing)",
        started.elapsed().as_secs_f64(),
        kill_phase.as_secs_f64()
    );

    if std::env::var_os("KILL_TEST_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    assert_eq!(run.kills.values().sum::<u32>() as usize, kills);
    for stage in STAGES {
        assert!(
            per_stage.get(&stage).copied().unwrap_or(0) >= (kills / 4) as u32,
            "{stage:?} hit {:?} times",
            per_stage.get(&stage)
        );
    }
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0), "exactly once");
    assert_eq!(edges as usize, expected.len());
    assert_eq!(
        marker_versions,
        (1..=served_version).collect::<BTreeSet<_>>(),
        "marker versions contiguous from 1 to the served one"
    );
    assert_eq!(
        applied_versions,
        (1..=served_version).collect::<Vec<_>>(),
        "the subscriber applies every version once, in order"
    );
    assert_eq!(a.counts().skipped_versions, 0);
    assert_eq!(served.len(), nodes.len());
    assert!(
        differing.is_empty(),
        "{} of {} rows differ, e.g. {:?}",
        differing.len(),
        served.len(),
        &differing[..differing.len().min(5)]
    );
    assert!(extra.is_empty(), "{extra:?}");
    assert_eq!(
        a.table().len() - subscriber_nodes,
        served_relations as usize
    );
}
