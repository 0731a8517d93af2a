//! Ingest against a real Kafka-protocol broker (tansu on 127.0.0.1, started by the tests):
//! malformed events to the DLQ with their reasons, exactly-once storage across SIGKILLs, and
//! nothing lost while the broker is paused.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const TOPIC: &str = "twhin.engagements";
const DLQ: &str = "twhin.engagements.dlq";

/// A malformed event of a kind chosen by `rng`, with the reason the daemon must give.
fn malformed_event(rng: &mut SmallRng, i: usize) -> (Outgoing, &'static str) {
    let ok =
        |src: &str, rel: &str, dst: &str| serde_json::json!({"src": src, "rel": rel, "dst": dst});
    let (payload, reason): (Option<Vec<u8>>, &str) = match rng.random_range(0..17) {
        0 => (
            Some(format!(r#"{{"src":"user:{i}","rel":"follows","#).into_bytes()),
            "not_json",
        ),
        1 => (
            Some(vec![b'{', 0xff, 0xfe, b'}', (i % 200) as u8]),
            "not_utf8",
        ),
        2 => (Some(format!("[{i}, 2, 3]").into_bytes()), "not_object"),
        3 => (
            Some(format!(r#"{{"src":"user:{i}","rel":"follows"}}"#).into_bytes()),
            "missing_field",
        ),
        4 => (
            Some(
                ok(&format!("user:{i}"), "likes", "user:1")
                    .to_string()
                    .into_bytes(),
            ),
            "unknown_relation",
        ),
        5 => (
            Some(
                ok(&format!("robot:{i}"), "follows", "user:1")
                    .to_string()
                    .into_bytes(),
            ),
            "unknown_node_type",
        ),
        6 => (
            Some(
                ok(&format!("user:{i}"), "follows", "tweet:1")
                    .to_string()
                    .into_bytes(),
            ),
            "type_mismatch",
        ),
        7 => (
            Some(
                ok("user:", "follows", &format!("user:{i}"))
                    .to_string()
                    .into_bytes(),
            ),
            "empty_id",
        ),
        8 => (
            Some(
                ok(&format!("user:{i}{}", "x".repeat(300)), "follows", "user:1")
                    .to_string()
                    .into_bytes(),
            ),
            "id_too_long",
        ),
        9 => {
            let mut j = ok(&format!("user:{i}"), "follows", "user:2");
            j["weight"] = serde_json::json!(-1.5);
            (Some(j.to_string().into_bytes()), "negative_weight")
        }
        10 => (
            Some(
                format!(r#"{{"src":"user:{i}","rel":"follows","dst":"user:3","weight":1e999}}"#)
                    .into_bytes(),
            ),
            "non_finite_weight",
        ),
        11 => {
            let mut j = ok(&format!("user:{i}"), "follows", "user:2");
            j["ts"] = serde_json::json!(-5);
            (Some(j.to_string().into_bytes()), "bad_timestamp")
        }
        12 => {
            let mut j = ok(&format!("user:{i}"), "follows", "user:2");
            j["pad"] = serde_json::json!("p".repeat(5000));
            (Some(j.to_string().into_bytes()), "too_large")
        }
        13 => (
            Some(
                ok(&format!("user{i}"), "follows", "user:2")
                    .to_string()
                    .into_bytes(),
            ),
            "bad_node_ref",
        ),
        14 => {
            let mut j = ok(&format!("user:{i}"), "follows", "user:2");
            j["weight"] = serde_json::json!("heavy");
            (Some(j.to_string().into_bytes()), "wrong_type")
        }
        15 => (
            if i % 2 == 0 { None } else { Some(Vec::new()) },
            "empty_payload",
        ),
        _ => {
            let mut j = ok(&format!("user:{i}"), "follows", "user:2");
            j["event_id"] = serde_json::json!("");
            (Some(j.to_string().into_bytes()), "bad_event_id")
        }
    };
    (
        Outgoing {
            key: format!("bad-{i}"),
            payload,
        },
        reason,
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: Broker,
    store: std::path::PathBuf,
    env: Vec<(String, String)>,
    http_port: u16,
    log_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let store = dir.path().join("store");
    let http_port = free_port();
    let env = daemon_env(&broker.bootstrap, &store, http_port);
    let out = cli(&env, &["topics", "apply"]);
    assert_eq!(out.matches("created").count(), 7, "{out}");
    let again = cli(&env, &["topics", "apply"]);
    assert_eq!(
        again.matches("exists").count(),
        7,
        "a second apply reports the topics as existing: {again}"
    );
    Setup {
        log_dir: dir.path().to_owned(),
        _dir: dir,
        broker,
        store,
        env,
        http_port,
    }
}

fn assert_exactly(store: &std::path::Path, expected: &HashSet<Triple>) {
    let (stored, edges) = stored_triples(store);
    assert_eq!(edges as usize, stored.len(), "duplicate edges in the store");
    assert_eq!(stored.len(), expected.len(), "edge count");
    let missing: Vec<_> = expected.difference(&stored).take(5).collect();
    assert!(missing.is_empty(), "missing edges, e.g. {missing:?}");
}

#[test]
fn malformed_events_go_to_the_dlq_with_their_reasons_and_valid_ones_are_stored() {
    let _serial = serial();
    let s = setup();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);

    let mut rng = SmallRng::seed_from_u64(2026);
    let mut msgs = Vec::new();
    let mut expected_reason: Vec<Option<&'static str>> = Vec::new();
    let mut valid = HashSet::new();
    for i in 0..20_000 {
        if rng.random_bool(0.05) {
            let (m, reason) = malformed_event(&mut rng, i);
            msgs.push(m);
            expected_reason.push(Some(reason));
        } else {
            let (m, t) = valid_event(i, i % 2 == 0);
            msgs.push(m);
            expected_reason.push(None);
            valid.insert(t);
        }
    }
    let n_bad = expected_reason.iter().flatten().count();
    let kinds: HashSet<_> = expected_reason.iter().flatten().collect();
    assert!(
        n_bad > 800 && kinds.len() == 17,
        "{n_bad} malformed of {} kinds",
        kinds.len()
    );

    let landed = produce(&s.broker.bootstrap, TOPIC, &msgs, None);
    let status = wait_until(
        "all 20,000 events consumed",
        Duration::from_secs(120),
        || {
            daemon.status().filter(|st| {
                status_u64(st, "/ingest/consumed") >= 20_000 && status_u64(st, "/kafka/lag") == 0
            })
        },
    );
    assert_eq!(status_u64(&status, "/ingest/consumed"), 20_000);
    assert_eq!(status_u64(&status, "/ingest/invalid"), n_bad as u64);
    assert_eq!(status_u64(&status, "/ingest/appended"), valid.len() as u64);
    assert_eq!(
        status_u64(&status, "/store/edges_total"),
        valid.len() as u64
    );

    // Metrics count the invalid events by reason.
    let metrics = daemon.metrics();
    let mut by_reason: HashMap<&str, u64> = HashMap::new();
    for r in expected_reason.iter().flatten() {
        *by_reason.entry(r).or_default() += 1;
    }
    for (reason, n) in &by_reason {
        let line = format!("twhin_ingest_events_invalid_total{{reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "missing `{line}` in /metrics");
    }

    // The DLQ holds exactly the malformed events, unchanged, with reason and source position.
    let dead = read_all(
        &s.broker.bootstrap,
        DLQ,
        n_bad,
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    assert_eq!(dead.len(), n_bad, "DLQ record count");
    let mut want: HashMap<(i32, i64), (&Outgoing, &str)> = HashMap::new();
    for ((m, r), pos) in msgs.iter().zip(&expected_reason).zip(&landed) {
        if let Some(r) = r {
            want.insert(*pos, (m, r));
        }
    }
    for d in &dead {
        assert_eq!(d.header("twhin.source.topic"), Some(TOPIC));
        let pos = (
            d.header("twhin.source.partition")
                .unwrap()
                .parse::<i32>()
                .unwrap(),
            d.header("twhin.source.offset")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        let (orig, reason) = want
            .remove(&pos)
            .unwrap_or_else(|| panic!("unexpected or repeated DLQ record {pos:?}"));
        assert_eq!(d.header("twhin.error"), Some(reason), "reason of {pos:?}");
        assert!(!d.header("twhin.error.detail").unwrap_or("").is_empty());
        assert_eq!(d.key.as_deref(), Some(orig.key.as_bytes()), "key unchanged");
        let empty: &[u8] = &[];
        assert_eq!(
            d.payload.as_deref().unwrap_or(empty),
            orig.payload.as_deref().unwrap_or(empty),
            "payload unchanged"
        );
    }
    assert!(
        want.is_empty(),
        "{} malformed events never reached the DLQ",
        want.len()
    );

    assert!(daemon.terminate().success(), "SIGTERM exits 0");
    assert_exactly(&s.store, &valid);

    // inspect --json reports what was stored and where consumption stopped.
    let env: Vec<(String, String)> = s.env.clone();
    let inspect: serde_json::Value =
        serde_json::from_str(&cli(&env, &["inspect", "--json"])).unwrap();
    assert_eq!(inspect["edges_total"].as_u64(), Some(valid.len() as u64));
    let next_offsets: i64 = inspect["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["topic"] == TOPIC)
        .map(|o| o["next_offset"].as_i64().unwrap())
        .sum();
    assert_eq!(
        next_offsets, 20_000,
        "stored offsets cover every consumed event, valid or not"
    );
    let users: HashSet<&String> = valid
        .iter()
        .flat_map(|(src, _, dst)| [src, dst])
        .filter(|n| n.starts_with("user:"))
        .collect();
    assert_eq!(inspect["nodes"]["user"].as_u64(), Some(users.len() as u64));

    // Replaying the events that carry an event_id is absorbed by the dedup window.
    let replay: Vec<Outgoing> = (0..2_000)
        .filter(|i| i % 2 == 0 && expected_reason[*i].is_none())
        .map(|i| msgs[i].clone())
        .collect();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    produce(&s.broker.bootstrap, TOPIC, &replay, None);
    let st = wait_until(
        "the replayed events consumed",
        Duration::from_secs(60),
        || {
            daemon
                .status()
                .filter(|st| status_u64(st, "/ingest/consumed") >= replay.len() as u64)
        },
    );
    assert_eq!(status_u64(&st, "/ingest/duplicates"), replay.len() as u64);
    assert_eq!(status_u64(&st, "/store/edges_total"), valid.len() as u64);
    assert!(daemon.terminate().success());
}

#[test]
fn sigkill_at_random_moments_stores_each_valid_event_exactly_once() {
    let _serial = serial();
    let s = setup();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);

    let mut rng = SmallRng::seed_from_u64(7);
    let mut msgs = Vec::new();
    let mut valid = HashSet::new();
    for i in 0..24_000 {
        if rng.random_bool(0.02) {
            msgs.push(malformed_event(&mut rng, i).0);
        } else {
            // No event ids: exactly-once must come from the stored offsets alone.
            let (m, t) = valid_event(i, false);
            msgs.push(m);
            valid.insert(t);
        }
    }
    // Paced so that events keep flowing through every incarnation: after a SIGKILL the group
    // only rebalances once the dead member's session (6 s here) expires.
    let bootstrap = s.broker.bootstrap.clone();
    let producer = std::thread::spawn(move || produce(&bootstrap, TOPIC, &msgs, Some(250.0)));

    let mut kills = 0;
    while kills < 8 && !producer.is_finished() {
        // Kill only while events are flowing into this incarnation, at a random moment.
        let consuming = wait_until(
            "the restarted daemon to consume or the stream to end",
            Duration::from_secs(60),
            || {
                if producer.is_finished() {
                    return Some(false);
                }
                daemon
                    .status()
                    .filter(|st| status_u64(st, "/ingest/consumed") > 0)
                    .map(|_| true)
            },
        );
        if !consuming {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1_500)));
        daemon.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..700)));
        daemon.restart();
    }
    assert!(
        kills >= 5,
        "only {kills} kills landed while events were flowing"
    );
    producer.join().unwrap();

    wait_until(
        "every valid event stored after the last restart",
        Duration::from_secs(180),
        || {
            daemon.status().filter(|st| {
                status_u64(st, "/store/edges_total") >= valid.len() as u64
                    && status_u64(st, "/kafka/lag") == 0
            })
        },
    );
    // A little longer: anything beyond the expected count would be a duplicate.
    std::thread::sleep(Duration::from_secs(2));
    assert!(daemon.terminate().success());
    assert_exactly(&s.store, &valid);
}

#[test]
fn broker_paused_for_20s_mid_stream_loses_nothing() {
    let _serial = serial();
    let s = setup();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);

    let (msgs, valid): (Vec<Outgoing>, HashSet<Triple>) =
        (0..12_000).map(|i| valid_event(i, false)).unzip();
    let bootstrap = s.broker.bootstrap.clone();
    let producer = std::thread::spawn(move || produce(&bootstrap, TOPIC, &msgs, Some(500.0)));

    wait_until("events flowing", Duration::from_secs(60), || {
        daemon
            .status()
            .filter(|st| status_u64(st, "/store/edges_total") > 1_000)
    });
    s.broker.pause();
    std::thread::sleep(Duration::from_secs(20));
    s.broker.resume();
    producer.join().unwrap();

    wait_until(
        "every event stored after the pause",
        Duration::from_secs(180),
        || {
            daemon
                .status()
                .filter(|st| status_u64(st, "/store/edges_total") >= valid.len() as u64)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(daemon.terminate().success(), "{}", s.broker.log_tail());
    assert_exactly(&s.store, &valid);
}

/// Issue 10.1: the broker replaced by an empty one (the topic recreated) which then holds 3,000
/// new events past the stored offsets: the restarted daemon sees that its partitions no longer
/// hold the records it consumed last, counts it, and consumes them again from their start, so
/// every new event is stored once.
#[test]
fn a_recreated_topic_is_consumed_from_its_start_and_nothing_is_lost() {
    let _serial = serial();
    let mut s = setup();
    let first: Vec<Outgoing> = (0..3_000).map(|i| valid_event(i, false).0).collect();
    let second: Vec<(Outgoing, Triple)> = (3_000..6_000).map(|i| valid_event(i, false)).collect();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    produce(&s.broker.bootstrap, TOPIC, &first, None);
    wait_until("the first 3,000 stored", Duration::from_secs(120), || {
        daemon
            .status()
            .filter(|st| status_u64(st, "/store/edges_total") == 3_000)
    });
    assert!(daemon.terminate().success());

    s.broker.replace_with_empty(&s.log_dir);
    cli(&s.env, &["topics", "apply"]);
    let msgs: Vec<Outgoing> = second.iter().map(|(m, _)| m.clone()).collect();
    produce(&s.broker.bootstrap, TOPIC, &msgs, None);
    daemon.restart();
    let st = wait_until(
        "the 3,000 new events stored",
        Duration::from_secs(120),
        || {
            daemon.status().filter(|st| {
                status_u64(st, "/store/edges_total") >= 6_000 && status_u64(st, "/kafka/lag") == 0
            })
        },
    );
    assert!(status_u64(&st, "/kafka/partition_resets") > 0, "{st}");
    assert!(daemon
        .metrics()
        .contains("twhin_ingest_partition_resets_total"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(daemon.terminate().success());
    let (stored, edges) = stored_triples(&s.store);
    assert_eq!(edges, 6_000, "each event once");
    let missing = second.iter().filter(|(_, t)| !stored.contains(t)).count();
    assert_eq!(missing, 0, "events of the recreated topic lost");
}

/// Issue 10.2: 1,000 events with ids, one with `"ts": 9999999999999` (year 2286), then the same
/// 1,000 again: the outlier goes to the DLQ as `bad_timestamp`, the repeats are duplicates.
#[test]
fn one_far_future_timestamp_neither_enters_nor_switches_dedup_off() {
    let _serial = serial();
    let s = setup();
    let with_ids: Vec<(Outgoing, Triple)> = (0..1_000).map(|i| valid_event(i, true)).collect();
    let mut msgs: Vec<Outgoing> = with_ids.iter().map(|(m, _)| m.clone()).collect();
    msgs.push(Outgoing {
        key: "user:future".into(),
        payload: Some(
            br#"{"src":"user:future","rel":"follows","dst":"user:1","ts":9999999999999,"event_id":"future"}"#
                .to_vec(),
        ),
    });
    msgs.extend(with_ids.iter().map(|(m, _)| m.clone()));
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    produce(&s.broker.bootstrap, TOPIC, &msgs, None);
    let st = wait_until("all 2,001 consumed", Duration::from_secs(120), || {
        daemon
            .status()
            .filter(|st| status_u64(st, "/ingest/consumed") == 2_001)
    });
    assert_eq!(status_u64(&st, "/ingest/invalid"), 1, "{st}");
    assert_eq!(status_u64(&st, "/ingest/duplicates"), 1_000, "{st}");
    assert_eq!(status_u64(&st, "/store/edges_total"), 1_000, "{st}");
    let dead = read_all(
        &s.broker.bootstrap,
        DLQ,
        1,
        Duration::from_secs(30),
        Duration::from_secs(2),
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("twhin.error"), Some("bad_timestamp"));
    assert!(daemon.terminate().success());
}

/// Issue 24: a second instance with its own store joins the group and is given part of the
/// partitions; each event is stored by the instance that owns its source's partition (a quarter
/// arrive mis-keyed and are forwarded, across instances), and each publishes the versions of
/// its partitions (contract 3). When the second is SIGKILLed, the first takes its partitions
/// back with what the second stored, from their changelog, not the input: every event once;
/// and it starts them over with a base numbered above the second's versions. A subscriber
/// reading both instances' versions ends with the rows the first serves.
#[test]
fn a_second_instance_shares_the_partitions_and_its_share_moves_back_through_the_changelog() {
    let _serial = serial();
    let s = setup();
    let mut env = s.env.clone();
    env.push(("TWHIN_TRAIN__DIM".into(), "16".into()));
    env.push(("TWHIN_PUBLISH__INTERVAL_SECS".into(), "1".into()));
    // No replay: once the stream is trained nothing moves, so versions stop and the served rows
    // can be compared with a subscriber's.
    env.push(("TWHIN_TRAINER__REPLAY_RATIO".into(), "0".into()));
    // The gradient exchange (on by default; named, as the test is about it), and checkpoints
    // (which let an owner delete the gradients it applied) within the test.
    env.push(("TWHIN_REMOTE__EXCHANGE_GRADIENTS".into(), "true".into()));
    env.push(("TWHIN_TRAINER__CHECKPOINT_INTERVAL_SECS".into(), "2".into()));
    // Indexes at this size, so that each holds its owner's partitions and /v1/neighbors asks
    // the other owner for the rest.
    env.push(("TWHIN_HTTP__ANN__MIN_ROWS".into(), "100".into()));
    let events = partly_miskeyed_events(6_000);
    let part = |r: std::ops::Range<usize>| -> Vec<Outgoing> {
        events[r].iter().map(|(m, _)| m.clone()).collect()
    };
    let edges = |st: &serde_json::Value| status_u64(st, "/store/edges_total");
    let assigned = |st: &serde_json::Value| status_u64(st, "/kafka/assigned_partitions");

    let mut first = Daemon::start(env.clone(), s.http_port, &s.log_dir);
    produce(&s.broker.bootstrap, TOPIC, &part(0..2_000), None);
    let before = wait_until(
        "the first 2,000 stored and a version out",
        Duration::from_secs(120),
        || {
            (first.status())
                .filter(|st| edges(st) == 2_000 && status_u64(st, "/publish/committed") > 0)
        },
    );

    let (mut second, second_port) = start_another_instance(&env, &s.log_dir.join("second"));
    wait_until("the partitions split", Duration::from_secs(90), || {
        let (a, b) = (first.status()?, second.status()?);
        (assigned(&a) > 0 && assigned(&b) > 0 && assigned(&a) + assigned(&b) == 8).then_some(())
    });
    produce(&s.broker.bootstrap, TOPIC, &part(2_000..4_000), None);
    // Both stores hold the first 2,000 (the second's from the changelog at its start), and
    // each its own share of the next 2,000.
    let (a, b) = wait_until(
        "each instance's share stored",
        Duration::from_secs(120),
        || {
            let (a, b) = (first.status()?, second.status()?);
            (edges(&a) + edges(&b) >= 6_000).then_some((a, b))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let (a, b) = (first.status().unwrap_or(a), second.status().unwrap_or(b));
    assert_eq!(edges(&a) + edges(&b), 6_000, "each event once\n{a}\n{b}");
    let second_share = edges(&b) - 2_000;
    assert!(second_share > 0 && edges(&a) > 2_000, "{a}\n{b}");
    assert_eq!(status_u64(&b, "/ingest/restored/appended"), 2_000, "{b}");
    assert!(status_u64(&b, "/ingest/forwarded_in") > 0, "{b}");
    // Each publishes its own partitions: together every partition, none twice.
    let (a, b) = wait_until("both publish", Duration::from_secs(60), || {
        let (a, b) = (first.status()?, second.status()?);
        let (pa, pb) = (
            published_partitions(Some(&a)),
            published_partitions(Some(&b)),
        );
        let mut all: Vec<i32> = pa.iter().chain(&pb).copied().collect();
        all.sort_unstable();
        (!pa.is_empty() && !pb.is_empty() && all == (0..8).collect::<Vec<_>>()).then_some((a, b))
    });
    assert!(status_u64(&b, "/publish/committed") > 0, "{b}");
    // Each trains the edges whose source it owns: the second's store also holds what it
    // restored of the first's partitions at its start, and leaves those to the first.
    let firsts = published_partitions(Some(&a));
    let place = |key: &str| twhin_stream::partition::partition_of(key.as_bytes(), 8) as i32;
    let left_to_the_first = (events[..2_000].iter())
        .filter(|(_, (src, _, _))| firsts.contains(&place(src)))
        .count() as u64;
    assert!(left_to_the_first > 0);
    let b = wait_until(
        "the second trained its edges",
        Duration::from_secs(60),
        || {
            second
                .status()
                .filter(|st| status_u64(st, "/trainer/backlog") == 0)
        },
    );
    assert_eq!(
        status_u64(&b, "/trainer/edges_trained"),
        edges(&b) - left_to_the_first,
        "{b}"
    );
    assert_eq!(
        status_u64(&b, "/trainer/edges_left_to_owners"),
        left_to_the_first,
        "{b}"
    );
    // One model (item 3): each sends the gradients of rows the other owns with its versions,
    // and each applies what the other sent, with its own optimiser state.
    let exchanged =
        |st: &serde_json::Value, what: &str| status_u64(st, &format!("/exchange/{what}"));
    let (a_ex, b_ex) = wait_until(
        "gradients exchanged both ways",
        Duration::from_secs(60),
        || {
            let (a, b) = (first.status()?, second.status()?);
            let both = |what| exchanged(&a, what) > 0 && exchanged(&b, what) > 0;
            let deleted = both("records_deleted");
            // Each took the other's share of the relation vectors, which it trains too.
            let relations = both("relation_deltas_applied");
            (both("rows_sent") && both("rows_applied") && deleted && relations).then_some((a, b))
        },
    );
    for st in [&a_ex, &b_ex] {
        assert_eq!(exchanged(st, "records_skipped"), 0, "{st}");
        assert!(exchanged(st, "windows_applied") > 0, "{st}");
        // Every row sent is applied by its owner, those of nodes only the other instance's
        // events name (each event's target is a node of its own) included: interned there.
        assert_eq!(exchanged(st, "rows_unknown"), 0, "{st}");
    }
    assert!(
        exchanged(&a_ex, "rows_started") + exchanged(&b_ex, "rows_started") > 0,
        "{a_ex}\n{b_ex}"
    );
    let bases_split = status_u64(&a, "/publish/bases");
    assert!(bases_split >= 2, "its first version and its share's\n{a}");
    assert_first_serves_the_seconds_rows(&s, &first, &second, second_port);
    let favoriting = |mine: bool| {
        (events[..4_000].iter())
            .map(|(_, (src, rel, _))| (src, rel))
            .find(|(src, rel)| *rel == "favorites" && firsts.contains(&place(src)) == mine)
            .map(|(src, _)| src.clone())
            .unwrap()
    };
    assert_first_gathers_the_seconds_candidates(&s, &second, second_port, &favoriting(true));
    // A source the second owns is ranked by the second: the first forwards the request.
    let (t, id) = favoriting(false)
        .split_once(':')
        .map(|(t, id)| (t.to_owned(), id.to_owned()))
        .unwrap();
    let body = http_get(
        s.http_port,
        &format!("/v1/neighbors/{t}/{id}?rel=favorites&k=5"),
    )
    .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer["answered_by"],
        serde_json::json!(format!("127.0.0.1:{second_port}")),
        "{answer}"
    );

    second.kill9();
    let taken_back = wait_until(
        "the first owns every partition again",
        Duration::from_secs(90),
        || first.status().filter(|st| assigned(st) == 8),
    );
    assert_eq!(
        status_u64(&taken_back, "/ingest/moved_in/appended"),
        second_share,
        "the second's share, from the changelog\n{taken_back}"
    );
    produce(&s.broker.bootstrap, TOPIC, &part(4_000..6_000), None);
    let committed = status_u64(&taken_back, "/publish/committed");
    let after = wait_until(
        "every event stored and a version of every partition out",
        Duration::from_secs(120),
        || {
            first.status().filter(|st| {
                edges(st) == 6_000
                    && status_u64(st, "/kafka/lag") == 0
                    && status_u64(st, "/publish/committed") > committed
                    && st
                        .pointer("/publish/partitions")
                        .and_then(|p| p.as_array())
                        .map(Vec::len)
                        == Some(8)
            })
        },
    );
    assert!(
        status_u64(&after, "/publish/committed") > status_u64(&before, "/publish/committed"),
        "{after}"
    );
    assert!(
        status_u64(&after, "/publish/bases") > bases_split,
        "the second's partitions started over\n{after}"
    );
    // Owning every partition, the first follows none (settled ownership; remote.settle_ms).
    let followed = |st: &serde_json::Value| st.pointer("/remote/followed").cloned();
    wait_until("the first follows nothing", Duration::from_secs(30), || {
        (followed(&first.status()?)? == serde_json::json!([])).then_some(())
    });
    // Quiet: no version is under way while the subscriber's table is compared with the served
    // rows.
    let served_version = wait_until(
        "the served version settles",
        Duration::from_secs(60),
        || {
            let v = status_u64(&first.status()?, "/publish/version");
            std::thread::sleep(Duration::from_secs(3));
            (status_u64(&first.status()?, "/publish/version") == v).then_some(v)
        },
    );
    let published = read_published(&s.broker.bootstrap, 1);
    // Per partition: numbers grow in log order (a retry repeats one under a newer epoch), and
    // every marker builds on an earlier marker of its own partition, or on nothing (a base).
    let mut last: HashMap<i32, (u64, u64)> = HashMap::new();
    for m in &published.markers {
        let p = m
            .partition
            .expect("contract 3 markers name their partition");
        assert_eq!(m.partitions, Some(8));
        if let Some(&held) = last.get(&p) {
            assert!(
                (m.version, m.epoch) > held,
                "partition {p}: {m:?} after {held:?}"
            );
        }
        if let Some(on) = m.builds_on {
            assert!(
                published
                    .markers
                    .iter()
                    .any(|o| o.partition == Some(p) && o.attempt() == on),
                "{m:?} builds on an attempt its partition never marked"
            );
        }
        last.insert(p, (m.version, m.epoch));
    }
    assert_eq!(last.len(), 8, "every partition published");
    assert!(
        last.values().all(|&(v, _)| v == served_version),
        "{last:?} served {served_version}"
    );
    let table = assemble(&published);
    let mut compared = 0;
    for (key, entry) in &table {
        if !twhin_stream::subscriber::is_node_key(key) {
            continue;
        }
        let (_, served) = served_row(s.http_port, key);
        assert_eq!(&served, &entry.vector[..served.len()], "{key}");
        compared += 1;
    }
    assert!(compared > 100, "{compared} rows compared");
    // The relations' shares: at least each instance's home partition's, on that partition.
    let shares: Vec<&String> = (table.keys())
        .filter(|k| k.starts_with("relation-delta:"))
        .collect();
    assert!(shares.len() >= 2, "{shares:?}");
    assert!(first.terminate().success());
    let expected: HashSet<Triple> = events.into_iter().map(|(_, t)| t).collect();
    assert_live_exactly(&s.store, &expected);
}

/// The first instance answers `/v1/embeddings` for the second's nodes with the rows the second
/// published (`source: "remote"`, from its cache of the second's partitions), which are the rows
/// the second serves, once the second's versions settle.
fn assert_first_serves_the_seconds_rows(
    s: &Setup,
    first: &Daemon,
    second: &Daemon,
    second_port: u16,
) {
    let version = |d: &Daemon| Some(status_u64(&d.status()?, "/publish/version"));
    let settled = wait_until(
        "the second's versions settle",
        Duration::from_secs(60),
        || {
            let v = version(second)?;
            std::thread::sleep(Duration::from_secs(3));
            (version(second)? == v).then_some(v)
        },
    );
    let theirs = published_partitions(second.status().as_ref());
    let followed = |st: &serde_json::Value| -> Option<Vec<(i64, bool, u64)>> {
        let list = st.pointer("/remote/followed")?.as_array()?;
        let one = |p: &serde_json::Value| {
            Some((
                p["partition"].as_i64()?,
                p["caught_up"].as_bool()?,
                p["version"].as_u64()?,
            ))
        };
        list.iter().map(one).collect()
    };
    let remote = wait_until(
        "the first holds the second's partitions at its version",
        Duration::from_secs(60),
        || {
            let st = first.status()?;
            let want: Vec<(i64, bool, u64)> = (theirs.iter())
                .map(|&q| (q as i64, true, settled))
                .collect();
            (followed(&st)? == want).then_some(st)
        },
    );
    assert_eq!(status_u64(&remote, "/remote/lag_ms"), 0, "{remote}");
    let table = assemble(&read_published(&s.broker.bootstrap, 1));
    let mut compared = 0;
    for (key, entry) in &table {
        let q = twhin_stream::partition::partition_of(key.as_bytes(), 8) as i32;
        if !twhin_stream::subscriber::is_node_key(key) || !theirs.contains(&q) {
            continue;
        }
        let (t, id) = key.split_once(':').unwrap();
        let body = http_get(s.http_port, &format!("/v1/embeddings/{t}/{id}")).unwrap();
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (&answer["source"], &answer["partition"], &answer["version"]),
            (
                &serde_json::json!("remote"),
                &serde_json::json!(q),
                &serde_json::json!(settled)
            ),
            "{key}: {answer}"
        );
        let (_, owners) = served_row(second_port, key);
        let vector: Vec<f32> = serde_json::from_value(answer["vector"].clone()).unwrap();
        assert_eq!(vector, owners, "{key}: the owner serves what it published");
        assert_eq!(&vector[..], &entry.vector[..owners.len()], "{key}");
        compared += 1;
    }
    assert!(compared > 100, "{compared} of the second's rows compared");
}

/// The first instance's index holds its own partitions' tweets; `/v1/neighbors` asks the second
/// (at the address its version markers advertise) for the best of its partitions, and merges
/// them by score.
fn assert_first_gathers_the_seconds_candidates(
    s: &Setup,
    second: &Daemon,
    second_port: u16,
    source: &str,
) {
    let theirs = published_partitions(second.status().as_ref());
    let (t, id) = source.split_once(':').unwrap();
    let path = format!("/v1/neighbors/{t}/{id}?rel=favorites&k=50");
    // (The index lags the served version by its update: once it holds the first's partitions
    // only, the rest is gathered.)
    let answer = wait_until(
        "the first's index holds its own partitions",
        Duration::from_secs(60),
        || {
            let body = http_get(s.http_port, &path).ok()?;
            let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
            answer.get("gathered").is_some().then_some(answer)
        },
    );
    assert_eq!(answer["method"], "ann", "{answer}");
    let owners = answer
        .pointer("/gathered/owners")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(owners.len(), 1, "{answer}");
    assert_eq!(
        (
            &owners[0]["address"],
            &owners[0]["partitions"],
            &owners[0]["error"]
        ),
        (
            &serde_json::json!(format!("127.0.0.1:{second_port}")),
            &serde_json::json!(theirs),
            &serde_json::Value::Null
        ),
        "{answer}"
    );
    assert_eq!(
        answer.pointer("/gathered/local"),
        Some(&serde_json::json!([]))
    );
    let neighbors = answer["neighbors"].as_array().unwrap();
    assert_eq!(neighbors.len(), 50, "{answer}");
    let place = |n: &serde_json::Value| {
        let key = n["node"].as_str().unwrap();
        twhin_stream::partition::partition_of(key.as_bytes(), 8) as i32
    };
    assert!(
        neighbors.iter().any(|n| theirs.contains(&place(n))),
        "{answer}"
    );
    assert!(
        neighbors.iter().any(|n| !theirs.contains(&place(n))),
        "{answer}"
    );
    let scores: Vec<f64> = neighbors
        .iter()
        .map(|n| n["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {answer}"
    );
}

/// Unfollows through the broker: each removes its stored follow (the add and the delete share
/// the source's key, so one partition orders them), the relation's live count drops with them,
/// and an unknown `op` is a dead letter (`bad_op`), not an add.
#[test]
fn delete_events_remove_their_edges_and_a_bad_op_is_a_dead_letter() {
    let _serial = serial();
    let s = setup();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    let event = |i: usize, op: Option<&str>| {
        let src = format!("user:{}", i % 50);
        let mut json = serde_json::json!({"src": src, "rel": "follows", "dst": format!("user:f{i}"),
            "ts": 1_732_190_000_000u64 + i as u64});
        if let Some(op) = op {
            json["op"] = serde_json::json!(op);
        }
        Outgoing {
            key: src,
            payload: Some(json.to_string().into_bytes()),
        }
    };
    let mut msgs: Vec<Outgoing> = (0..2_000).map(|i| event(i, None)).collect();
    msgs.extend((0..500).map(|i| event(i, Some("delete"))));
    msgs.extend((0..3).map(|i| event(1_000 + i, Some("unfollow"))));
    produce(&s.broker.bootstrap, TOPIC, &msgs, None);
    let status = wait_until(
        "all 2,503 events consumed",
        Duration::from_secs(120),
        || {
            daemon.status().filter(|st| {
                status_u64(st, "/ingest/consumed") >= 2_503 && status_u64(st, "/kafka/lag") == 0
            })
        },
    );
    assert_eq!(status_u64(&status, "/ingest/invalid"), 3);
    assert_eq!(status_u64(&status, "/store/edges_total"), 2_000);
    assert_eq!(status_u64(&status, "/store/edges_deleted"), 500);
    assert_eq!(status_u64(&status, "/store/edges/follows"), 1_500);
    let line = "twhin_ingest_events_invalid_total{reason=\"bad_op\"} 3";
    assert!(daemon.metrics().contains(line), "missing `{line}`");
    assert!(daemon.terminate().success());
}

/// The daemon's producers place a keyed record where Kafka's default partitioner does
/// (`twhin_stream::partition::partition_of`: murmur2 of the key, not librdkafka's CRC32):
/// `replay` produces each event to its source node's partition, which every producer and
/// subscriber can compute, so the owner of a node's partition consumes that node's events.
#[test]
fn replay_puts_each_event_in_its_source_nodes_partition() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let env = daemon_env(&broker.bootstrap, &dir.path().join("store"), free_port());
    cli(&env, &["topics", "apply"]);
    cli(&env, &["replay", "umls", "--limit", "600", "--json"]);
    let mut partitions = HashMap::new();
    let read = for_each_record(
        &broker.bootstrap,
        TOPIC,
        600,
        Duration::from_secs(60),
        Duration::from_secs(2),
        |m| {
            use rdkafka::Message as _;
            let key = m.key().expect("events are keyed by their source node");
            let owner = twhin_stream::partition::partition_of(key, 8);
            assert_eq!(
                m.partition() as u32,
                owner,
                "{} in partition {}",
                String::from_utf8_lossy(key),
                m.partition()
            );
            *partitions.entry(m.partition()).or_insert(0u32) += 1;
        },
    );
    assert_eq!(read, 600);
    assert!(
        partitions.len() > 4,
        "spread over the partitions: {partitions:?}"
    );
}

/// A lost store rebuilt from its changelog: after a run with valid events, repeated event ids,
/// dead letters, deletes and an erasure, the store folder is deleted and the daemon restarted.
/// It takes every edge, deletion, erasure and offset back from `kafka.changelog_topic` (the
/// store's figures are those of before), consumes nothing of the input again (no dead letter
/// twice), and still refuses an event naming the erased node.
#[test]
fn a_lost_store_is_rebuilt_from_its_changelog_without_consuming_the_input_again() {
    let _serial = serial();
    let s = setup();
    let mut rng = SmallRng::seed_from_u64(24);
    let mut msgs: Vec<Outgoing> = (0..3_000).map(|i| valid_event(i, true).0).collect();
    // Repeated ids (dropped), dead letters, deletes of stored triples, an erasure.
    msgs.extend((0..200).map(|i| valid_event(i, true).0));
    msgs.extend((0..100).map(|i| malformed_event(&mut rng, i).0));
    let delete = |i: usize| {
        let (_, (src, rel, dst)) = valid_event(i, false);
        let json = serde_json::json!({"src": src, "rel": rel, "dst": dst, "op": "delete"});
        Outgoing {
            key: src,
            payload: Some(json.to_string().into_bytes()),
        }
    };
    msgs.extend((1_000..1_050).map(delete));
    let erased = valid_event(8, false).1 .0;
    msgs.push(Outgoing {
        key: erased.clone(),
        payload: Some(
            serde_json::json!({"op": "erase", "node": erased})
                .to_string()
                .into_bytes(),
        ),
    });
    let total = msgs.len() as u64;
    produce(&s.broker.bootstrap, TOPIC, &msgs, None);

    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    let consumed = |daemon: &Daemon, n: u64| {
        daemon.status().filter(|st| {
            status_u64(st, "/ingest/consumed") >= n && status_u64(st, "/kafka/lag") == 0
        })
    };
    let before = wait_until("every event consumed", Duration::from_secs(120), || {
        consumed(&daemon, total)
    });
    assert_eq!(status_u64(&before, "/ingest/invalid"), 100);
    assert_eq!(status_u64(&before, "/store/nodes_erased"), 1);
    assert!(status_u64(&before, "/store/edges_deleted") >= 50);
    assert!(daemon.terminate().success());
    let (triples, edges) = stored_triples(&s.store);
    let dead_letters = || {
        let settle = Duration::from_secs(2);
        read_all(
            &s.broker.bootstrap,
            DLQ,
            100,
            Duration::from_secs(30),
            settle,
        )
        .len()
    };
    assert_eq!(dead_letters(), 100);

    std::fs::remove_dir_all(&s.store).unwrap();
    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    let after = wait_until(
        "the store restored and every partition assigned",
        Duration::from_secs(120),
        || {
            daemon.status().filter(|st| {
                status_u64(st, "/kafka/assigned_partitions") == 8
                    && status_u64(st, "/kafka/lag") == 0
            })
        },
    );
    assert_eq!(
        status_u64(&after, "/ingest/consumed"),
        0,
        "nothing consumed again: {after}"
    );
    assert_eq!(
        status_u64(&after, "/ingest/restored/appended"),
        edges,
        "every edge from the changelog: {after}"
    );
    for figure in [
        "nodes",
        "edges",
        "edges_total",
        "edges_deleted",
        "nodes_erased",
        "offsets",
    ] {
        assert_eq!(
            after["store"][figure], before["store"][figure],
            "store.{figure} as before the loss"
        );
    }
    // The erased node stays erased; a new event is stored.
    let (new, new_triple) = valid_event(3_000, false);
    let naming_erased = serde_json::json!({"src": erased, "rel": "follows", "dst": "user:new"});
    produce(
        &s.broker.bootstrap,
        TOPIC,
        &[
            new,
            Outgoing {
                key: erased.clone(),
                payload: Some(naming_erased.to_string().into_bytes()),
            },
        ],
        None,
    );
    let st = wait_until("two more consumed", Duration::from_secs(60), || {
        consumed(&daemon, 2)
    });
    assert_eq!(status_u64(&st, "/ingest/erased_refused"), 1, "{st}");
    // Only those two: the input before them was not consumed again.
    assert_eq!(status_u64(&st, "/ingest/consumed"), 2, "{st}");
    assert!(daemon.terminate().success());
    let (restored, restored_edges) = stored_triples(&s.store);
    assert_eq!(restored_edges, edges + 1);
    let mut expected = triples;
    expected.insert(new_triple);
    assert_eq!(restored, expected);
    assert_eq!(dead_letters(), 100, "no dead letter sent twice");
}

/// A store from before the changelog (input offsets, no changelog position) logs from its next
/// batch on, its first record of each partition saying that history precedes it: a restore into
/// an empty store refuses that changelog, naming the partitions and offsets (typed), rather than
/// rebuild a store without its history; the upgraded store itself restarts as before.
#[test]
fn a_changelog_begun_by_an_upgraded_store_is_refused_for_an_empty_one() {
    use twhin_stream::changelog::{restore, RestoreError};
    use twhin_stream::config::Config;
    use twhin_stream::store::{AppendBatch, SourcedEvent};

    let _serial = serial();
    let s = setup();
    let cfg = Config::from_toml(&format!(
        "[kafka]\nbootstrap_servers = \"{}\"",
        s.broker.bootstrap
    ))
    .unwrap()
    .with_storage_path(&s.store);
    let schema = cfg.schema();
    // Events stored here, not consumed: no record timestamp to hold their times against.
    let limits = cfg.file_decode_limits();
    // The first 500 events, stored as a build before the changelog stored them.
    let old: Vec<(Outgoing, Triple)> = (0..500).map(|i| valid_event(i, false)).collect();
    let msgs: Vec<Outgoing> = old.iter().map(|(m, _)| m.clone()).collect();
    let landed = produce(&s.broker.bootstrap, TOPIC, &msgs, None);
    let mut batch = AppendBatch {
        topic: TOPIC.into(),
        ..AppendBatch::default()
    };
    let mut next: HashMap<i32, i64> = HashMap::new();
    for (m, &(partition, offset)) in msgs.iter().zip(&landed) {
        let payload = m.payload.as_deref();
        let event = twhin_stream::schema::decode_event(&schema, &limits, payload, 0).unwrap();
        batch.events.push(SourcedEvent {
            partition,
            offset,
            event,
        });
        let n = next.entry(partition).or_default();
        *n = (*n).max(offset + 1);
    }
    batch.next_offsets = next.into_iter().collect();
    {
        let store = twhin_stream::app::open_store(&cfg).unwrap();
        store.append(&batch).unwrap();
    }

    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    let new: Vec<Outgoing> = (500..800).map(|i| valid_event(i, false).0).collect();
    produce(&s.broker.bootstrap, TOPIC, &new, None);
    wait_until("the new events consumed", Duration::from_secs(120), || {
        daemon.status().filter(|st| {
            status_u64(st, "/ingest/consumed") >= 300 && status_u64(st, "/kafka/lag") == 0
        })
    });
    assert!(daemon.terminate().success());
    assert_eq!(
        stored_triples(&s.store).1,
        800,
        "the old and the new events"
    );

    // The upgraded store restores what it lacks (nothing) and starts as before.
    let store = twhin_stream::app::open_store(&cfg).unwrap();
    assert_eq!(restore(&cfg, &store).unwrap().appended, 0);
    drop(store);
    // An empty store cannot be rebuilt from a changelog that lacks the first 500 events.
    std::fs::remove_dir_all(&s.store).unwrap();
    let store = twhin_stream::app::open_store(&cfg).unwrap();
    match restore(&cfg, &store) {
        Err(RestoreError::HistoryMissing {
            topic, next_offset, ..
        }) => {
            assert_eq!(topic, TOPIC);
            assert!(next_offset > 0);
        }
        other => panic!("a changelog without the history was restored: {other:?}"),
    }
    assert_eq!(store.edge_count(), 0, "nothing appended from it");
}

const ROUTED: &str = "twhin-stream.routed";
const CHANGELOG: &str = "twhin-stream.changelog";

/// Every record of the routed topic: (partition, key, payload, headers).
type Forwarded = (i32, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>);

fn forwarded_records(bootstrap: &str, expected: usize) -> Vec<Forwarded> {
    use rdkafka::message::{Headers, Message};
    let mut out = Vec::new();
    let settle = Duration::from_secs(2);
    for_each_record(
        bootstrap,
        ROUTED,
        expected,
        Duration::from_secs(60),
        settle,
        |m| {
            let headers = (m.headers().iter())
                .flat_map(|h| h.iter())
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                    (h.key.to_owned(), value)
                })
                .collect();
            let (key, payload) = (m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec));
            out.push((m.partition(), key, payload, headers));
        },
    );
    out
}

/// Produce `records` to the routed topic as they are (the copies a forwarder that died before
/// its store write sends again).
fn send_again(bootstrap: &str, records: &[Forwarded]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let producer = test_producer(bootstrap);
        for (q, key, payload, headers) in records {
            let mut owned = OwnedHeaders::new();
            for (k, v) in headers {
                owned = owned.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_str()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(ROUTED).partition(*q).headers(owned);
            if let Some(k) = key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = payload {
                record = record.payload(p.as_slice());
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    });
}

/// Issue 24, routing: events on a partition that does not own their source (keyed by their
/// target, or by anything; an erasure's source is its node) go through the routed topic to the
/// partition that does. Each is stored exactly once across SIGKILLs; copies sent again
/// (what a forwarder that died between the routed topic's acknowledgement and its store write
/// does) are skipped, also by a store rebuilt from the changelog; and every changelog record
/// holds only events whose source its partition owns, so a partition's state can move with it.
#[test]
fn events_on_the_wrong_partition_reach_their_owner_exactly_once_across_kills_and_a_lost_store() {
    use twhin_stream::changelog::ChangelogRecord;
    use twhin_stream::partition::partition_of;

    let _serial = serial();
    let s = setup();
    let mut expected = HashSet::new();
    let mut msgs = Vec::new();
    for i in 0..6_000 {
        let (mut m, triple) = valid_event(i, false);
        // A third keyed by source, a third by target, a third by something else.
        m.key = match i % 3 {
            0 => m.key,
            1 => triple.2.clone(),
            _ => format!("request-{i}"),
        };
        msgs.push(m);
        expected.insert(triple);
    }
    // An erasure keyed by something else: forwarded to its node's partition.
    let erased = valid_event(8, false).1 .0;
    msgs.push(Outgoing {
        key: "account-deletions".into(),
        payload: Some(
            serde_json::json!({"op": "erase", "node": erased})
                .to_string()
                .into_bytes(),
        ),
    });
    expected.retain(|(src, _, dst)| *src != erased && *dst != erased);
    produce(&s.broker.bootstrap, TOPIC, &msgs, None);

    let mut daemon = Daemon::start(s.env.clone(), s.http_port, &s.log_dir);
    let mut rng = SmallRng::seed_from_u64(2024);
    for _ in 0..4 {
        // Killed once it consumes: an instance killed while it joins the group stays a member
        // until its session times out, and the test broker may then give it partitions, which
        // the next start takes for a second instance.
        wait_until("the daemon consuming", Duration::from_secs(60), || {
            daemon.status().filter(|st| {
                status_u64(st, "/ingest/consumed") + status_u64(st, "/ingest/forwarded_in") > 0
                    || status_u64(st, "/kafka/assigned_partitions") == 8
            })
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(0..600)));
        daemon.kill9();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..700)));
        daemon.restart();
    }
    let settled = |daemon: &Daemon| {
        daemon.status().filter(|st| {
            let live =
                status_u64(st, "/store/edges_total") - status_u64(st, "/store/edges_deleted");
            status_u64(st, "/kafka/assigned_partitions") == 8
                && status_u64(st, "/kafka/lag") == 0
                && live >= expected.len() as u64
        })
    };
    wait_until("every event stored", Duration::from_secs(180), || {
        settled(&daemon)
    });
    assert!(daemon.terminate().success());
    assert_live_exactly(&s.store, &expected);

    // What went through the routed topic: the mis-keyed events (at least once), each at the
    // partition that owns its source.
    let forwarded = forwarded_records(&s.broker.bootstrap, 1);
    let owner = |key: &str| partition_of(key.as_bytes(), 8) as i32;
    let mis_keyed = (msgs.iter())
        .filter(|m| owner(&m.key) != owner(&source_of(m.payload.as_deref().unwrap())))
        .count();
    assert!(mis_keyed > 3_000, "{mis_keyed}");
    assert!(
        forwarded.len() >= mis_keyed,
        "{} < {mis_keyed}",
        forwarded.len()
    );
    for (q, _, payload, headers) in &forwarded {
        assert_eq!(*q, owner(&source_of(payload.as_deref().unwrap())));
        let from: i32 = (headers.iter())
            .find(|(k, _)| k == twhin_stream::ingest::HEADER_FORWARDED_PARTITION)
            .map(|(_, v)| v.parse().unwrap())
            .expect("the partition it was consumed from");
        assert_ne!(from, *q);
    }
    // Every changelog record holds events its partition owns.
    let mut logged = 0;
    for_each_record(
        &s.broker.bootstrap,
        CHANGELOG,
        1,
        Duration::from_secs(60),
        Duration::from_secs(2),
        |m| {
            use rdkafka::message::Message;
            let record = ChangelogRecord::decode(m.payload().unwrap()).unwrap();
            for e in &record.events {
                let src = format!("{}:{}", record.node_types[e.src_type as usize], e.src);
                assert_eq!(
                    owner(&src),
                    m.partition(),
                    "{src} in changelog partition {}",
                    m.partition()
                );
                logged += 1;
            }
        },
    );
    assert!(logged >= expected.len(), "{logged}");

    // Copies sent again are skipped; so are they by a store rebuilt from the changelog.
    let copies: Vec<Forwarded> = forwarded.iter().take(50).cloned().collect();
    for lose_the_store in [false, true] {
        if lose_the_store {
            std::fs::remove_dir_all(&s.store).unwrap();
        }
        daemon.restart();
        send_again(&s.broker.bootstrap, &copies);
        let st = wait_until("the copies consumed", Duration::from_secs(120), || {
            settled(&daemon).filter(|st| status_u64(st, "/ingest/forwarded_in") >= 50)
        });
        assert_eq!(status_u64(&st, "/ingest/consumed"), 0, "{st}");
        assert!(daemon.terminate().success());
        assert_live_exactly(&s.store, &expected);
    }
}

/// The source of a valid event's payload (an erasure's: its node).
fn source_of(payload: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(payload).unwrap();
    let src = json.get("src").or(json.get("node"));
    src.and_then(|v| v.as_str()).unwrap().to_owned()
}
