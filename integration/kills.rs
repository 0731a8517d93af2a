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
//! The workload is `event(i)` (about 7,000 nodes, every triple distinct) unless
//! `KILL_TEST_NODES` and `KILL_TEST_EDGES` are set: then it is the synthetic TwHIN-shaped stream
//! of `replay synthetic` (`src/offline/synthetic.rs`, the Twitter schema of
//! `config/default.toml`, which the daemon here runs with; seed `KILL_TEST_SEED`), produced
//! without event ids, `KILL_TEST_EDGES` events in all: each stage produces at least an even
//! share of what is left, in the same seconds as the small workload (faster than the daemon
//! takes them), and the rest comes after the last kill. Before each stage the test waits until
//! the daemon is at most half a share behind (produced but not stored, stored but not trained),
//! so that the kills spread over the whole stream, not only its first part.
//! Its triples repeat, so exactly-once compares multisets: per `(src, rel, dst)`, the times
//! produced against the times stored, a shortfall counted as lost, a surplus as duplicated.
//! `benches/kills_at_scale.sh` runs it at 1M nodes / 10M edges.
//!
//! The subscriber's table is compared with the served rows of every node when there are at most
//! 20,000 nodes, else of a seeded sample of `KILL_TEST_CHECK_NODES` (default 2,000; reading a
//! million rows over HTTP one by one is too slow); either way the table must hold every node and
//! nothing else. The small workload feeds the subscriber every row before any marker (the worst
//! order: every version waits for its marker); the synthetic one feeds it the markers first and
//! the rows as they are read, since the rows of every version held at once would not fit in
//! memory.
//!
//! The knobs are not `TWHIN_*`: the daemon inherits the test's environment and refuses unknown
//! `TWHIN_` keys. The last line of the report is `kills-summary {json}`: kills per stage, lost,
//! duplicated, versions, wall seconds.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use twhin_stream::config::Config;
use twhin_stream::offline::synthetic::{SyntheticEdge, SyntheticEdges, SyntheticSpec, Workload};
use twhin_stream::publish::VersionMarker;
use twhin_stream::subscriber::{Applied, VersionAssembler};

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

/// A synthetic edge as an event, without its event id (as [`event`]).
fn synthetic_event(w: &Workload, e: &SyntheticEdge) -> Outgoing {
    let src = format!("{}:{}", w.type_name(e.src_type), e.src);
    let dst = format!("{}:{}", w.type_name(e.dst_type), e.dst);
    let json =
        serde_json::json!({"src": src, "rel": w.relation_name(e.rel), "dst": dst, "ts": e.ts});
    Outgoing {
        key: src,
        payload: Some(json.to_string().into_bytes()),
    }
}

/// Where a run's events come from.
enum Events {
    /// `event(i)` for the next `i`.
    Small,
    /// The synthetic stream, `total` events (the workload is leaked: its generator borrows it
    /// for the whole test).
    Synthetic {
        workload: &'static Workload,
        edges: Box<SyntheticEdges<'static>>,
        total: usize,
    },
}

/// A node `type:N` packed into 56 bits (the type's index in the schema, then N), and a
/// `(src, rel, dst)` into one number (src, the relation's index, dst), so that ten million
/// produced and stored triples can be counted in a few hundred MB. Both workloads name nodes
/// `type:N`.
struct Keys {
    types: Vec<String>,
    rels: Vec<String>,
}

const ID_BITS: u32 = 48;

impl Keys {
    fn new() -> Keys {
        // The daemon's schema: the defaults (no `--config`, no schema in the environment).
        let schema = Config::from_toml("").unwrap().schema();
        Keys {
            types: schema.node_types().to_vec(),
            rels: schema.relations().iter().map(|r| r.name.clone()).collect(),
        }
    }

    fn node(&self, node_type: &str, id: &str) -> Option<u64> {
        self.node_of(node_type, id.parse().ok()?)
    }

    fn node_of(&self, node_type: &str, id: u64) -> Option<u64> {
        let t = self.types.iter().position(|n| n == node_type)? as u64;
        (id < 1 << ID_BITS).then_some(t << ID_BITS | id)
    }

    fn node_name(&self, node: &str) -> Option<u64> {
        let (t, id) = node.split_once(':')?;
        self.node(t, id)
    }

    fn triple(&self, src: (&str, &str), rel: &str, dst: (&str, &str)) -> Option<u128> {
        self.pack(self.node(src.0, src.1)?, rel, self.node(dst.0, dst.1)?)
    }

    fn pack(&self, src: u64, rel: &str, dst: u64) -> Option<u128> {
        let r = self.rels.iter().position(|n| n == rel)? as u128;
        Some((src as u128) << 72 | r << 64 | dst as u128)
    }

    fn synthetic(&self, w: &Workload, e: &SyntheticEdge) -> u128 {
        let src = self.node_of(w.type_name(e.src_type), e.src);
        let dst = self.node_of(w.type_name(e.dst_type), e.dst);
        self.pack(src.unwrap(), w.relation_name(e.rel), dst.unwrap())
            .expect("the synthetic stream follows the schema")
    }

    fn of(&self, (src, rel, dst): &Triple) -> u128 {
        fn split(n: &str) -> (&str, &str) {
            n.split_once(':').expect("type:id")
        }
        self.triple(split(src), rel, split(dst))
            .unwrap_or_else(|| panic!("{src} {rel} {dst} is not of the schema"))
    }

    /// The source and target nodes of a triple's key.
    fn ends(key: u128) -> [u64; 2] {
        [(key >> 72) as u64, key as u64]
    }

    fn name(&self, node: u64) -> String {
        format!(
            "{}:{}",
            self.types[(node >> ID_BITS) as usize],
            node & ((1 << ID_BITS) - 1)
        )
    }
}

/// Exactly-once as multisets of sorted triple keys: per triple produced `p` times and stored `s`
/// times, `(p - s)+` lost and `(s - p)+` duplicated; `s` of a triple never produced unexpected.
fn compare(produced: &[u128], stored: &[u128]) -> (u64, u64, u64) {
    let run = |keys: &[u128], i: usize| {
        let k = keys[i];
        keys[i..].iter().take_while(|x| **x == k).count()
    };
    let (mut lost, mut duplicated, mut unexpected) = (0u64, 0u64, 0u64);
    let (mut i, mut j) = (0, 0);
    while i < produced.len() || j < stored.len() {
        if j == stored.len() || (i < produced.len() && produced[i] < stored[j]) {
            let p = run(produced, i);
            lost += p as u64;
            i += p;
        } else if i == produced.len() || stored[j] < produced[i] {
            let s = run(stored, j);
            unexpected += s as u64;
            j += s;
        } else {
            let (p, s) = (run(produced, i), run(stored, j));
            lost += p.saturating_sub(s) as u64;
            duplicated += s.saturating_sub(p) as u64;
            i += p;
            j += s;
        }
    }
    (lost, duplicated, unexpected)
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
    events: Events,
    keys: Keys,
    /// The key of every event produced so far, in order.
    produced_keys: Vec<u128>,
    /// Events produced so far (each once, acknowledged).
    produced: usize,
    /// Stages left to run, this one included (shares the synthetic stream among them).
    stages_left: usize,
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

    /// Events a stage that draws `n` produces: `n`, or with the synthetic stream at least an
    /// even share of what is left among the stages left and the finish.
    fn chunk(&self, n: usize) -> usize {
        match &self.events {
            Events::Small => n,
            Events::Synthetic { total, .. } => {
                let left = total - self.produced;
                n.max(left / (self.stages_left + 1)).min(left)
            }
        }
    }

    /// With the synthetic stream, before a stage: wait until the daemon is at most half a share
    /// behind (events produced but not stored, and stored but not trained), so that the kills
    /// spread over the whole stream instead of all landing on its first part while production
    /// runs ahead of the trainer. Returns how long it waited.
    fn catch_up(&self) -> Option<Duration> {
        let Events::Synthetic { total, .. } = &self.events else {
            return None;
        };
        let half_share = ((total - self.produced) / (self.stages_left + 1) / 2) as u64;
        let produced = self.produced as u64;
        let start = Instant::now();
        self.wait_status_within(
            "the daemon to catch up",
            Duration::from_millis(200),
            Duration::from_secs(120 + half_share / 1_000),
            |st| {
                let stored = status_u64(st, "/store/edges_total");
                let behind = produced.saturating_sub(stored) + status_u64(st, "/trainer/backlog");
                (behind <= half_share).then_some(())
            },
        );
        Some(start.elapsed())
    }

    /// The next `n` events (fewer when the synthetic stream ends), counted as produced; their
    /// payloads are made as they are sent.
    fn take(&mut self, n: usize) -> Box<dyn Iterator<Item = Outgoing> + Send> {
        let from = self.produced;
        let msgs: Box<dyn Iterator<Item = Outgoing> + Send> = match &mut self.events {
            Events::Small => {
                for i in from..from + n {
                    self.produced_keys.push(self.keys.of(&event(i).1));
                }
                self.produced += n;
                Box::new((from..from + n).map(|i| event(i).0))
            }
            Events::Synthetic {
                workload, edges, ..
            } => {
                let w: &'static Workload = workload;
                let chunk: Vec<SyntheticEdge> = edges.by_ref().take(n).collect();
                let keys = chunk.iter().map(|e| self.keys.synthetic(w, e));
                self.produced_keys.extend(keys);
                self.produced += chunk.len();
                Box::new(chunk.into_iter().map(move |e| synthetic_event(w, &e)))
            }
        };
        msgs
    }

    /// Produce the next `n` events now (returns once acknowledged).
    fn produce(&mut self, n: usize) {
        let msgs = self.take(n);
        produce_stream(&self.bootstrap, TOPIC, msgs, None);
    }

    /// Produce the next `n` events at `per_sec` from a thread; `produced` counts them already.
    fn produce_paced(&mut self, n: usize, per_sec: f64) -> std::thread::JoinHandle<()> {
        let msgs = self.take(n);
        let bootstrap = self.bootstrap.clone();
        std::thread::spawn(move || {
            produce_stream(&bootstrap, TOPIC, msgs, Some(per_sec));
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
        f: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        self.wait_status_within(what, every, Duration::from_secs(120), f)
    }

    fn wait_status_within<T>(
        &self,
        what: &str,
        every: Duration,
        timeout: Duration,
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
                start.elapsed() < timeout,
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
        let drawn = self.rng.random_range(3_000..8_000);
        let n = self.chunk(drawn);
        let before = status_u64(&self.status(), "/ingest/consumed");
        // Two seconds of production: the kill's random delay (under 0.7 s) falls inside it, and
        // the daemon keeps up (the small workload; the synthetic one outruns it), so stored <
        // produced while it consumes.
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
        let drawn = self.rng.random_range(3_000..6_000);
        let n = self.chunk(drawn);
        let producer = self.produce_paced(n, 6_000.0 * n as f64 / drawn as f64);
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
        let drawn = self.rng.random_range(4_000..10_000);
        let n = self.chunk(drawn);
        let producer = self.produce_paced(n, 4_000.0 * n as f64 / drawn as f64);
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
        let drawn = self.rng.random_range(2_000..6_000);
        let n = self.chunk(drawn);
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

/// Every node the events name, sorted (the store cannot be opened while the daemon runs).
fn nodes_of(keys: &[u128]) -> Vec<u64> {
    let mut nodes: Vec<u64> = keys.iter().flat_map(|k| Keys::ends(*k)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// What a subscriber made of everything on both topics.
struct Subscribed {
    assembler: VersionAssembler,
    applied: Vec<Applied>,
    markers: Vec<VersionMarker>,
    /// Rows of attempts that never got a marker (publications the kills cut short), by attempt.
    interrupted: BTreeMap<(u64, u64), usize>,
    /// Rows read from the embeddings topic.
    rows: usize,
}

/// Everything on both topics through a [`VersionAssembler`], then a catch-up as the example
/// does: every row before any marker (`rows_first`: the worst order, every version's rows wait
/// for its marker; they are all held at once), else the markers first and each row as it is
/// read. `timeout` bounds the reading of the rows.
fn subscribe(bootstrap: &str, min_markers: u64, rows_first: bool, timeout: Duration) -> Subscribed {
    let mut a = VersionAssembler::new();
    let mut applied = Vec::new();
    let mut interrupted: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let (markers, rows) = if rows_first {
        let p = read_published(bootstrap, min_markers as usize);
        for (q, k, r) in &p.rows {
            applied.extend(a.push_row(*q, k.as_str(), r.clone()));
        }
        for m in &p.markers {
            applied.extend(a.push_marker(m.clone()));
        }
        let marked: HashSet<(u64, u64)> = p.markers.iter().map(|m| (m.version, m.epoch)).collect();
        for (_, _, r) in &p.rows {
            if !marked.contains(&(r.version, r.epoch)) {
                *interrupted.entry((r.version, r.epoch)).or_default() += 1;
            }
        }
        let rows = p.rows.len();
        (p.markers, rows)
    } else {
        let markers = read_markers(bootstrap, min_markers as usize);
        for m in &markers {
            applied.extend(a.push_marker(m.clone()));
        }
        let marked: HashSet<(u64, u64)> = markers.iter().map(|m| (m.version, m.epoch)).collect();
        let expected = markers.iter().map(|m| m.rows as usize).sum();
        let rows = for_each_row(bootstrap, expected, timeout, |q, k, r| {
            if !marked.contains(&(r.version, r.epoch)) {
                *interrupted.entry((r.version, r.epoch)).or_default() += 1;
            }
            applied.extend(a.push_row(q, k, r));
        });
        (markers, rows)
    };
    applied.extend(a.catch_up());
    Subscribed {
        assembler: a,
        applied,
        markers,
        interrupted,
        rows,
    }
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Ingest => "ingest",
        Stage::Training => "training",
        Stage::Checkpoint => "checkpoint",
        Stage::Publication => "publication",
    }
}

#[test]
fn kills_at_every_stage_lose_nothing_double_nothing_and_subscribers_hold_the_served_version() {
    let _serial = serial();
    let started = Instant::now();
    let kills = env_u64("KILL_TEST_KILLS", 20) as usize;
    let seed = env_u64("KILL_TEST_SEED", 20_260_310);
    assert!(kills >= 4, "KILL_TEST_KILLS must be at least 4");
    let keys = Keys::new();
    let events = match (
        std::env::var_os("KILL_TEST_NODES"),
        std::env::var_os("KILL_TEST_EDGES"),
    ) {
        (None, None) => Events::Small,
        (Some(_), Some(_)) => {
            let (nodes, edges) = (env_u64("KILL_TEST_NODES", 0), env_u64("KILL_TEST_EDGES", 0));
            let least = 3_000 + 10_000 * (kills as u64 + 1);
            assert!(
                edges >= least,
                "KILL_TEST_EDGES must be at least {least} with {kills} kills: every stage produces"
            );
            let schema = Config::from_toml("").unwrap().schema();
            let workload = Workload::new(&schema, SyntheticSpec::new(nodes, edges, seed))
                .unwrap_or_else(|e| panic!("the synthetic workload: {e}"));
            let workload: &'static Workload = Box::leak(Box::new(workload));
            Events::Synthetic {
                workload,
                edges: Box::new(workload.edges()),
                total: edges as usize,
            }
        }
        _ => panic!("set both KILL_TEST_NODES and KILL_TEST_EDGES, or neither"),
    };
    let synthetic = matches!(events, Events::Synthetic { .. });
    // Finishing the synthetic stream takes longer: a second more per 5,000 events.
    let extra_time = match &events {
        Events::Small => Duration::ZERO,
        Events::Synthetic { total, .. } => Duration::from_secs(*total as u64 / 5_000),
    };
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
        events,
        keys,
        produced_keys: Vec::new(),
        produced: 0,
        stages_left: kills,
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
        run.stages_left = kills - k;
        let waited = run
            .catch_up()
            .map(|w| format!(", {:.1} s waiting for the daemon", w.as_secs_f64()))
            .unwrap_or_default();
        let t = Instant::now();
        let detail = match stage {
            Stage::Ingest => run.kill_in_ingest(),
            Stage::Training => run.kill_in_training(),
            Stage::Checkpoint => run.kill_in_checkpoint(),
            Stage::Publication => run.kill_in_publication(),
        };
        eprintln!(
            "kill {:>2}/{kills} at {:>5.1} s, {stage:?}: {detail} ({:.1} s; {} produced{waited})",
            k + 1,
            started.elapsed().as_secs_f64(),
            t.elapsed().as_secs_f64(),
            run.produced
        );
    }
    let kill_phase = started.elapsed();

    // Left to finish: a last batch of events (the rest of the synthetic stream), every event
    // stored, trained and published.
    run.stages_left = 0;
    let last = run.chunk(2_000);
    run.produce(last);
    let mut expected = std::mem::take(&mut run.produced_keys);
    assert_eq!(expected.len(), run.produced);
    expected.sort_unstable();
    let distinct = 1 + expected.windows(2).filter(|w| w[0] != w[1]).count();
    if !synthetic {
        assert_eq!(distinct, run.produced, "the events are distinct");
    }
    let produced = run.produced as u64;
    run.wait_status_within(
        "every event stored",
        Duration::from_millis(200),
        Duration::from_secs(120) + extra_time,
        |st| (status_u64(st, "/store/edges_total") >= produced).then_some(()),
    );
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
            started.elapsed() < kill_phase + Duration::from_secs(180) + extra_time,
            "the daemon never went quiet: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let quiet_at = started.elapsed();

    // The served rows of every node (or of a seeded sample), then the same version still
    // served.
    let nodes = nodes_of(&expected);
    let default_check = if nodes.len() <= 20_000 {
        nodes.len()
    } else {
        2_000
    };
    let check = (env_u64("KILL_TEST_CHECK_NODES", default_check as u64) as usize).min(nodes.len());
    let checked: Vec<u64> = if check == nodes.len() {
        nodes.clone()
    } else {
        let mut sample = SmallRng::seed_from_u64(seed);
        let mut at = rand::seq::index::sample(&mut sample, nodes.len(), check).into_vec();
        at.sort_unstable();
        at.iter().map(|i| nodes[*i]).collect()
    };
    let mut served: HashMap<String, Vec<f32>> = HashMap::new();
    for node in checked.iter().map(|n| run.keys.name(*n)) {
        let (version, vector) = served_row(port, &node);
        assert_eq!(
            version, served_version,
            "{node} served from another version"
        );
        served.insert(node, vector);
    }
    let st = run.status();
    assert_eq!(
        st.pointer("/publish/version").and_then(|v| v.as_u64()),
        Some(served_version),
        "a version came out while the served rows were read"
    );
    let served_relations = status_u64(&st, "/publish/relations");

    // The subscriber: everything on both topics (the small workload's rows first, the worst
    // order), then a catch-up as the example does.
    let Subscribed {
        assembler: a,
        applied,
        markers,
        interrupted,
        rows,
    } = subscribe(
        &broker.bootstrap,
        served_version,
        !synthetic,
        Duration::from_secs(120) + extra_time,
    );
    let marker_versions: BTreeSet<u64> = markers.iter().map(|m| m.version).collect();
    // Per partition (each applies its own versions), in the order applied; a retry applied over
    // the version held (a lost acknowledgement) is that version again.
    let mut per_partition: BTreeMap<Option<i32>, Vec<u64>> = BTreeMap::new();
    for v in &applied {
        per_partition
            .entry(v.partition)
            .or_default()
            .push(v.version);
    }
    per_partition.values_mut().for_each(Vec::dedup);
    let applied_versions: Vec<u64> = per_partition.values().next().cloned().unwrap_or_default();
    let every_partition_alike = per_partition.values().all(|v| *v == applied_versions);
    let repeated_markers = rounds(&markers).len() - marker_versions.len();
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
    // Keys of the table that are no node of the events.
    let extra: Vec<&String> = a
        .table()
        .keys()
        .filter(|k| {
            twhin_stream::subscriber::is_node_key(k)
                && run
                    .keys
                    .node_name(k)
                    .is_none_or(|n| nodes.binary_search(&n).is_err())
        })
        .collect();

    assert!(run.daemon.terminate().success(), "a clean stop at the end");
    let mut stored = Vec::with_capacity(expected.len());
    let mut unparsed = 0u64;
    let edges = stored_edges(&store, |src, rel, dst| {
        match run.keys.triple(src, rel, dst) {
            Some(k) => stored.push(k),
            None => unparsed += 1,
        }
    });
    stored.sort_unstable();
    let stored_distinct = stored.windows(2).filter(|w| w[0] != w[1]).count() + 1;
    let (lost, duplicated, unexpected) = compare(&expected, &stored);
    let unexpected = unexpected + unparsed;
    drop(stored);

    let mut per_stage: BTreeMap<Stage, u32> = STAGES.iter().map(|s| (*s, 0)).collect();
    for (what, n) in &run.kills {
        let stage = match *what {
            "ingest" => Stage::Ingest,
            "training" => Stage::Training,
            "publication" => Stage::Publication,
            _ => Stage::Checkpoint,
        };
        *per_stage.entry(stage).or_default() += n;
    }
    let contiguous = marker_versions == (1..=served_version).collect::<BTreeSet<_>>()
        && applied_versions == (1..=served_version).collect::<Vec<_>>()
        && every_partition_alike;
    eprintln!("---- kills at every stage (seed {seed}) ----");
    eprintln!("kills: {} in all, {:?}", kills, run.kills);
    eprintln!(
        "edges: produced {produced} ({distinct} distinct triples), stored {edges} ({stored_distinct} distinct), lost {lost}, duplicated {duplicated}, unexpected {unexpected}",
    );
    eprintln!(
        "versions: served {served_version}; {rows} rows, markers {} for versions {:?}..={:?} ({repeated_markers} repeated); rows without a marker {} in {} cut-short attempts {:?}; subscriber applied {} ({:?}..={:?}), counts {:?}",
        markers.len(),
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
        "subscriber check: {} served node rows (of {} nodes), subscriber holds {subscriber_nodes} nodes and {} relations (served {served_relations}); {} differ, {} extra",
        served.len(),
        nodes.len(),
        a.table().len() - subscriber_nodes,
        differing.len(),
        extra.len()
    );
    eprintln!(
        "wall: {:.0} s ({:.0} s killing, quiet at {:.0} s)",
        started.elapsed().as_secs_f64(),
        kill_phase.as_secs_f64(),
        quiet_at.as_secs_f64()
    );
    let summary = serde_json::json!({
        "workload": if synthetic { "synthetic" } else { "small" },
        "seed": seed,
        "nodes": nodes.len(),
        "kills": kills,
        "kills_per_stage": per_stage
            .iter()
            .map(|(s, n)| (stage_name(*s), *n))
            .collect::<BTreeMap<_, _>>(),
        "kills_by_moment": run.kills,
        "produced": produced,
        "stored": edges,
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        "versions": served_version,
        "versions_contiguous": contiguous,
        "markers": markers.len(),
        "rows_published": rows,
        "cut_short_attempts": interrupted.len(),
        "checked_nodes": served.len(),
        "differing_rows": differing.len(),
        "extra_rows": extra.len(),
        "kill_phase_s": kill_phase.as_secs_f64().round(),
        "wall_s": started.elapsed().as_secs_f64().round(),
    });
    eprintln!("kills-summary {summary}");

    if std::env::var_os("KILL_TEST_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    assert_eq!(run.kills.values().sum::<u32>() as usize, kills);
    for stage in STAGES {
        assert!(
            per_stage[&stage] >= (kills / 4) as u32,
            "{stage:?} hit {:?} times",
            per_stage[&stage]
        );
    }
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0), "exactly once");
    assert_eq!(edges, produced);
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
    assert!(
        every_partition_alike,
        "every partition applies the same versions: {per_partition:?}"
    );
    assert_eq!(a.counts().skipped_versions, 0);
    assert_eq!(served.len(), checked.len());
    assert!(
        differing.is_empty(),
        "{} of {} rows differ, e.g. {:?}",
        differing.len(),
        served.len(),
        &differing[..differing.len().min(5)]
    );
    assert!(extra.is_empty(), "{extra:?}");
    assert_eq!(
        subscriber_nodes,
        nodes.len(),
        "the subscriber holds every node"
    );
    let relations = (a.table().keys())
        .filter(|k| k.starts_with(twhin_stream::subscriber::RELATION_PREFIX))
        .count();
    assert_eq!(relations, served_relations as usize);
}
