//! Faults with several instances (issue 24, "Faults"), against a real broker (tansu on
//! 127.0.0.1): three instances of one deployment, each with its own store, share the
//! engagements partitions while
//! * the second and the third join mid-stream;
//! * instances are SIGKILLed `FAULT_TEST_KILLS` times (default 3) at seeded random moments, each
//!   restarted on its own store (the stage each kill landed in is read from the instance's
//!   status just before it: publication, training, ingest or idle);
//! * one instance is stopped (SIGSTOP) for longer than the group's session timeout while events
//!   keep coming, so that the group gives its partitions to the others, and then continued: a
//!   zombie that believes, until it hears from the group, that it still owns its partitions.
//!   With `FAULT_TEST_CUT=netns` (root: `ip netns`) that instance runs in a network namespace
//!   of its own, and its network is cut instead while it runs: its consumer's session times
//!   out, its publications cannot reach the broker, and what it queued meanwhile is delivered
//!   once the network is back.
//!
//! Afterwards:
//! * **nothing stale was published**: per partition, in the versions topic's order, once an
//!   instance publishes a base (it took the partition over), another instance's later markers
//!   of that partition are bases (it took the partition back) or numbered below that base (a
//!   publication the old owner had under way, which the subscriber rule orders before it);
//! * **a subscriber's table is what the owners serve**: the table built with
//!   [`twhin_stream::subscriber::VersionAssembler`] from everything on the embeddings and versions
//!   topics equals, row for row, what each partition's owner serves (`GET /v1/embeddings`);
//! * **every edge once**: the other two leave, the first takes every partition back through the
//!   changelogs, and its store holds every event produced exactly once.
//!
//! The knobs are not `TWHIN_*` (the daemon inherits the test's environment and refuses unknown
//! `TWHIN_` keys). The last line of the report is `faults-summary {json}`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use twhin_stream::partition::partition_of;
use twhin_stream::publish::VersionMarker;
use twhin_stream::subscriber::is_node_key;

const TOPIC: &str = "twhin.engagements";
const PARTITIONS: u32 = 8;
/// `TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS` in [`daemon_env`].
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
    })
}

/// One instance of the deployment: the daemon, its HTTP port and the name the test gives it.
struct Instance {
    name: &'static str,
    daemon: Daemon,
    host: String,
    port: u16,
    store: PathBuf,
}

impl Instance {
    fn status(&self) -> Option<serde_json::Value> {
        self.daemon.status()
    }

    fn advertised(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn assigned(st: &serde_json::Value) -> u64 {
    status_u64(st, "/kafka/assigned_partitions")
}

/// Every instance's status, once every one answers.
fn statuses(instances: &[Instance]) -> Option<Vec<serde_json::Value>> {
    instances.iter().map(Instance::status).collect()
}

/// Wait until the group's partitions are split among exactly `live` (each owns some, together
/// all of them, none twice).
fn wait_split<'a>(
    what: &str,
    live: impl IntoIterator<Item = &'a Instance> + Clone,
    timeout: Duration,
) {
    wait_until(what, timeout, || {
        let st: Vec<serde_json::Value> = (live.clone().into_iter())
            .map(Instance::status)
            .collect::<Option<_>>()?;
        let counts: Vec<u64> = st.iter().map(assigned).collect();
        (counts.iter().all(|&c| c > 0) && counts.iter().sum::<u64>() == u64::from(PARTITIONS))
            .then_some(())
    });
}

/// The stage an instance is in, from its status: a version under way, a training backlog,
/// events not stored yet, or none.
fn stage(st: &serde_json::Value) -> &'static str {
    if st
        .pointer("/publish/in_progress")
        .is_some_and(|v| !v.is_null())
    {
        "publication"
    } else if status_u64(st, "/trainer/backlog") > 0 {
        "training"
    } else if status_u64(st, "/kafka/lag") > 0 {
        "ingest"
    } else {
        "idle"
    }
}

/// Per partition, in the versions topic's order: markers another instance published after an
/// instance's base of the partition, numbered below that base (`late`, a publication the old
/// owner had under way), and those numbered at or above it that are not a base (`stale`, which
/// must never happen), each with the markers around it.
fn late_and_stale(markers: &[VersionMarker]) -> (u64, Vec<String>) {
    let mut base: HashMap<i32, (Option<String>, u64)> = HashMap::new();
    let (mut late, mut stale) = (0u64, Vec::new());
    for m in markers {
        let p = m
            .partition
            .expect("contract 3 markers name their partition");
        if m.builds_on.is_none() {
            base.insert(p, (m.http.clone(), m.version));
            continue;
        }
        let Some((by, at)) = base.get(&p) else {
            continue;
        };
        if *by == m.http {
            continue;
        }
        if m.version < *at {
            late += 1;
        } else {
            stale.push(format!(
                "partition {p}: version {} by {:?} after {at}, a base by {by:?}",
                m.version, m.http
            ));
        }
    }
    (late, stale)
}

/// Why `owner` serves `key` otherwise than a subscriber holds it (`entry`), if it does: another
/// row, or none (then with what every instance answers for it, to tell where it went).
fn served_differently(
    instances: &[Instance],
    owner: &Instance,
    key: &str,
    entry: &twhin_stream::subscriber::Entry,
) -> Option<String> {
    let (t, id) = key.split_once(':').unwrap();
    let path = format!("/v1/embeddings/{t}/{id}");
    match http_get_at(&owner.host, owner.port, &path) {
        Ok(body) => {
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
            let served: Vec<f32> = (answer["vector"].as_array().unwrap().iter())
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let held = &entry.vector[..served.len().min(entry.vector.len())];
            (served[..] != *held).then(|| {
                format!(
                    "{key}: {} serves another row (its version {}, the row's {})",
                    owner.name, answer["version"], entry.version
                )
            })
        }
        Err(e) => {
            let elsewhere: Vec<String> = (instances.iter())
                .map(|i| {
                    let answer = http_get_at(&i.host, i.port, &path);
                    format!("{}: {}", i.name, answer.unwrap_or_else(|e| e.to_string()))
                })
                .collect();
            Some(format!(
                "{key} (the row's version {}): {e} at its owner {}; {elsewhere:?}",
                entry.version, owner.name
            ))
        }
    }
}

#[test]
fn instances_that_join_die_and_stall_past_their_session_lose_nothing_and_publish_nothing_stale() {
    let _serial = serial();
    let started = Instant::now();
    let kills = env_u64("FAULT_TEST_KILLS", 3);
    let seed = env_u64("FAULT_TEST_SEED", 20_261_207);
    let per_stage = env_u64("FAULT_TEST_EVENTS_PER_STAGE", 1_000) as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    // `FAULT_TEST_CUT=netns`: the second instance runs in a network namespace of its own, and
    // the stall is a cut of its network (root only); otherwise it is a SIGSTOP.
    let netns = match std::env::var("FAULT_TEST_CUT").as_deref() {
        Ok("netns") => Some(Netns::create(7)),
        Ok(other) if !other.is_empty() => panic!("FAULT_TEST_CUT={other:?}: netns or nothing"),
        _ => None,
    };
    let mut dir = tempfile::tempdir().unwrap();
    // `FAULT_TEST_KEEP=1` keeps the logs, stores and the broker's log.
    dir.disable_cleanup(std::env::var_os("FAULT_TEST_KEEP").is_some());
    eprintln!("in {}", dir.path().display());
    let broker = match &netns {
        Some(ns) => Broker::start_reachable_at(dir.path(), &ns.host_ip),
        None => Broker::start(dir.path()),
    };
    let p = publishing_on(
        broker,
        dir.path(),
        16,
        1,
        &[
            // No replay: once the stream is trained nothing moves, so versions stop and the
            // served rows can be compared with a subscriber's.
            ("TWHIN_TRAINER__REPLAY_RATIO", "0"),
            ("TWHIN_REMOTE__EXCHANGE_GRADIENTS", "true"),
            ("TWHIN_TRAINER__CHECKPOINT_INTERVAL_SECS", "2"),
        ],
    );
    // Stages: the first alone, each join, each kill, the stall, the finish.
    let stages = 4 + kills as usize;
    // A quarter keyed by something else: they reach their owner through the routed topic,
    // which moves with its partitions too.
    let events = partly_miskeyed_events(per_stage * stages);
    let mut produced = 0usize;
    let mut next_chunk = |per_sec: Option<f64>| {
        let from = produced;
        produced = (produced + per_stage).min(events.len());
        let msgs: Vec<Outgoing> = events[from..produced]
            .iter()
            .map(|(m, _)| m.clone())
            .collect();
        let bootstrap = p.broker.bootstrap.clone();
        std::thread::spawn(move || {
            produce(&bootstrap, TOPIC, &msgs, per_sec);
        })
    };

    let a_home = dir.path().join("a");
    std::fs::create_dir_all(&a_home).unwrap();
    let a = Instance {
        name: "a",
        daemon: Daemon::start(p.env.clone(), p.port, &a_home),
        host: "127.0.0.1".into(),
        port: p.port,
        store: p.store.clone(),
    };
    next_chunk(None).join().unwrap();
    wait_until(
        "the first stage stored and a version out",
        Duration::from_secs(120),
        || {
            (a.status()).filter(|st| {
                status_u64(st, "/store/edges_total") == per_stage as u64
                    && status_u64(st, "/publish/committed") > 0
            })
        },
    );
    let mut instances = vec![a];
    for name in ["b", "c"] {
        let producing = next_chunk(Some(per_stage as f64 / 3.0));
        let home = dir.path().join(name);
        let netns = netns.as_ref().filter(|_| name == "b");
        let (daemon, port) = start_another_instance_in(&p.env, &home, netns);
        instances.push(Instance {
            name,
            host: daemon.http_host.clone(),
            daemon,
            port,
            store: home.join("store"),
        });
        wait_split(
            &format!("{name} to get its share"),
            &instances,
            Duration::from_secs(120),
        );
        producing.join().unwrap();
    }

    // Kills: a random instance at a random moment while events come, restarted on its store.
    let mut kill_stages: BTreeMap<&'static str, u64> = BTreeMap::new();
    for k in 0..kills {
        let producing = next_chunk(Some(per_stage as f64 / 4.0));
        std::thread::sleep(Duration::from_millis(rng.random_range(300..3_000)));
        let victim = rng.random_range(0..instances.len());
        let st = instances[victim].status();
        let at = st.as_ref().map_or("starting", stage);
        *kill_stages.entry(at).or_default() += 1;
        eprintln!(
            "kill {k}: {} during {at} ({:.1} s in)",
            instances[victim].name,
            started.elapsed().as_secs_f64()
        );
        instances[victim].daemon.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..2_000)));
        instances[victim].daemon.restart();
        producing.join().unwrap();
        wait_split(
            "the partitions split again after a kill",
            &instances,
            Duration::from_secs(120),
        );
    }

    // The stall: the second stops (or its network is cut) past its session; the others take
    // its partitions, publish them over (bases), and then it runs (or reaches them) again.
    let stalled = 1;
    let producing = next_chunk(Some(per_stage as f64 / 4.0));
    let stalled_pid = instances[stalled].daemon.pid();
    match &netns {
        Some(ns) => ns.cut(),
        None => signal(stalled_pid, "STOP"),
    }
    let stall_began = Instant::now();
    let others: Vec<&Instance> = (instances.iter().enumerate())
        .filter(|(i, _)| *i != stalled)
        .map(|(_, inst)| inst)
        .collect();
    wait_split(
        "the others to take the stalled instance's partitions",
        others.iter().copied(),
        SESSION_TIMEOUT * 10,
    );
    wait_until(
        "the others to publish every partition",
        Duration::from_secs(60),
        || {
            let mut covered: Vec<i32> = (others.iter())
                .flat_map(|i| published_partitions(i.status().as_ref()))
                .collect();
            covered.sort_unstable();
            (covered == (0..PARTITIONS as i32).collect::<Vec<_>>()).then_some(())
        },
    );
    let stall_s = stall_began.elapsed().as_secs_f64();
    match &netns {
        Some(ns) => ns.restore(),
        None => signal(stalled_pid, "CONT"),
    }
    producing.join().unwrap();
    wait_split(
        "the stalled instance to rejoin",
        &instances,
        Duration::from_secs(120),
    );

    next_chunk(None).join().unwrap();
    assert_eq!(produced, events.len());
    // Quiet: every instance has consumed and trained everything, and no version moved for 3 s.
    // None until an instance's first version (a restarted one).
    let version = |s: &serde_json::Value| s.pointer("/publish/version").and_then(|v| v.as_u64());
    let versions =
        |st: &[serde_json::Value]| -> Vec<Option<u64>> { st.iter().map(version).collect() };
    let brief = |st: &[serde_json::Value]| -> Vec<String> {
        st.iter()
            .map(|s| {
                format!(
                    "lag {} backlog {} version {:?} assigned {} published {:?}",
                    status_u64(s, "/kafka/lag"),
                    status_u64(s, "/trainer/backlog"),
                    version(s),
                    assigned(s),
                    published_partitions(Some(s)),
                )
            })
            .collect()
    };
    let settle_began = Instant::now();
    let mut last_seen = Vec::new();
    loop {
        assert!(
            settle_began.elapsed() < Duration::from_secs(180),
            "the instances did not settle in 180 s: {last_seen:#?}"
        );
        let Some(st) = statuses(&instances) else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        last_seen = brief(&st);
        let drained = st.iter().all(|s| {
            status_u64(s, "/kafka/lag") == 0
                && status_u64(s, "/trainer/backlog") == 0
                && version(s).is_some()
        });
        if drained {
            std::thread::sleep(Duration::from_secs(3));
            if statuses(&instances).is_some_and(|again| versions(&st) == versions(&again)) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = statuses(&instances).expect("every instance answers");
    let owner_of: HashMap<i32, usize> = (st.iter().enumerate())
        .flat_map(|(i, s)| {
            published_partitions(Some(s))
                .into_iter()
                .map(move |q| (q, i))
        })
        .collect();
    assert_eq!(
        owner_of.len(),
        PARTITIONS as usize,
        "every partition published once\n{st:?}"
    );
    for (i, inst) in instances.iter().enumerate() {
        assert!(
            owner_of.values().any(|&o| o == i),
            "{} publishes no partition",
            inst.name
        );
    }

    let published = read_published(&p.broker.bootstrap, 1);
    let (late, stale) = late_and_stale(&published.markers);
    // Each partition's newest marker is its current owner's.
    let mut newest: HashMap<i32, &VersionMarker> = HashMap::new();
    for m in &published.markers {
        newest.insert(m.partition.unwrap(), m);
    }
    for (q, m) in &newest {
        let owner = &instances[owner_of[q]];
        assert_eq!(
            m.http.as_deref(),
            Some(owner.advertised().as_str()),
            "partition {q}'s newest marker, owned by {}",
            owner.name
        );
    }
    // A row is compared with its owner's; rows that differ are compared again with what the
    // topics hold by then (an owner may have published a version since the read: the gradient
    // exchange can still move rows after the stream is trained), up to three times.
    let table = assemble(&published);
    let compare = |table: &HashMap<String, twhin_stream::subscriber::Entry>,
                   keys: &mut dyn Iterator<Item = &String>| {
        keys.filter(|key| is_node_key(key))
            .filter_map(|key| {
                let entry = table.get(key)?;
                let q = partition_of(key.as_bytes(), PARTITIONS) as i32;
                let owner = &instances[owner_of[&q]];
                served_differently(&instances, owner, key, entry).map(|why| (key.clone(), why))
            })
            .collect::<Vec<(String, String)>>()
    };
    let compared = table.keys().filter(|k| is_node_key(k)).count();
    let mut differing = compare(&table, &mut table.keys());
    let first_differing = differing.len();
    for _ in 0..3 {
        if differing.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
        let again = assemble(&read_published(
            &p.broker.bootstrap,
            published.markers.len(),
        ));
        differing = compare(&again, &mut differing.iter().map(|(key, _)| key));
    }
    let differing: Vec<String> = differing.into_iter().map(|(_, why)| why).collect();

    // Every edge once: the others leave, and the first takes their partitions back.
    // One at a time, each leave's rebalance done before the next: on the test broker, members
    // leaving within one rebalance have left the group stuck there (the one left never got its
    // assignment, minutes later).
    for leaving in (1..instances.len()).rev() {
        let inst = &mut instances[leaving];
        assert!(
            inst.daemon.terminate().success(),
            "{} stops cleanly",
            inst.name
        );
        wait_split(
            "the partitions split among those left",
            &instances[..leaving],
            Duration::from_secs(120),
        );
    }
    let first = &mut instances[0];
    let began = Instant::now();
    let taken_back =
        loop {
            let st = first.status();
            if let Some(st) = st.as_ref().filter(|st| {
                assigned(st) == u64::from(PARTITIONS) && status_u64(st, "/kafka/lag") == 0
            }) {
                break st.clone();
            }
            assert!(
            began.elapsed() < Duration::from_secs(120),
            "the first does not own every partition, drained, 120 s after the others left: {:?}",
            st.map(|st| (assigned(&st), status_u64(&st, "/kafka/lag"), st["kafka"].clone()))
        );
            std::thread::sleep(Duration::from_millis(500));
        };
    assert!(first.daemon.terminate().success(), "a stops cleanly");
    let store = first.store.clone();
    let expected: HashSet<Triple> = events.into_iter().map(|(_, t)| t).collect();
    let (live, edges) = stored_triples(&store);
    let lost = expected.difference(&live).count();
    let doubled = edges.saturating_sub(live.len() as u64);
    println!(
        "faults-summary {}",
        serde_json::json!({
            "instances": instances.len(),
            "events": expected.len(),
            "kills": kill_stages,
            "stall": if netns.is_some() { "network cut" } else { "SIGSTOP" },
            "stall_s": stall_s,
            "markers": published.markers.len(),
            "late_markers": late,
            "stale_markers": stale.len(),
            "rows_compared": compared,
            "rows_differing": differing.len(),
            "rows_differing_at_first_read": first_differing,
            "rows_taken_over": st.iter().map(|s| status_u64(s, "/exchange/rows_taken_over")).collect::<Vec<_>>(),
            "moved_in": status_u64(&taken_back, "/ingest/moved_in/appended"),
            "lost": lost,
            "doubled": doubled,
            "wall_s": started.elapsed().as_secs_f64(),
        })
    );
    assert!(stale.is_empty(), "stale markers: {stale:#?}");
    assert!(
        differing.is_empty(),
        "served rows that differ from a subscriber's: {:?}",
        &differing[..differing.len().min(5)]
    );
    assert!(compared > 100, "{compared} rows compared");
    if doubled > 0 {
        explain_doubled(&p.broker.bootstrap, &store);
    }
    assert_live_exactly(&store, &expected);
}

/// For each edge the store holds more than once (up to 5), every record of the routed topic and
/// of the changelog that carries it: where the copies came from.
fn explain_doubled(bootstrap: &str, store: &std::path::Path) {
    use rdkafka::message::{Headers as _, Message as _};
    let mut counts: HashMap<Triple, u32> = HashMap::new();
    stored_edges(store, |src, rel, dst| {
        let triple = (
            format!("{}:{}", src.0, src.1),
            rel.to_owned(),
            format!("{}:{}", dst.0, dst.1),
        );
        *counts.entry(triple).or_default() += 1;
    });
    let doubled: HashSet<String> = (counts.into_iter())
        .filter(|(_, n)| *n > 1)
        .map(|(t, _)| t.2)
        .take(5)
        .collect();
    let settle = Duration::from_secs(2);
    for_each_record(
        bootstrap,
        "twhin-stream.routed",
        0,
        Duration::from_secs(30),
        settle,
        |m| {
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default());
            if let Some(dst) = doubled
                .iter()
                .find(|d| payload.contains(&format!("\"{d}\"")))
            {
                let headers: Vec<String> = (m.headers().iter())
                    .flat_map(|h| h.iter())
                    .filter(|h| h.key.starts_with("twhin.forwarded"))
                    .map(|h| {
                        format!(
                            "{}={}",
                            h.key,
                            String::from_utf8_lossy(h.value.unwrap_or_default())
                        )
                    })
                    .collect();
                eprintln!(
                    "doubled {dst}: routed {}@{} {headers:?}",
                    m.partition(),
                    m.offset()
                );
            }
        },
    );
    for_each_record(
        bootstrap,
        "twhin-stream.changelog",
        0,
        Duration::from_secs(30),
        settle,
        |m| {
            let Ok(record) =
                twhin_stream::changelog::ChangelogRecord::decode(m.payload().unwrap_or_default())
            else {
                return;
            };
            for e in &record.events {
                let dst = format!("{}:{}", record.node_types[e.dst_type as usize], e.dst);
                if doubled.contains(&dst) {
                    eprintln!(
                        "doubled {dst}: changelog {}@{} logs {} {}@{} (next {}, upstream {:?})",
                        m.partition(),
                        m.offset(),
                        record.topic,
                        record.partition,
                        e.offset,
                        record.next_offset,
                        record.upstream
                    );
                }
            }
        },
    );
}
