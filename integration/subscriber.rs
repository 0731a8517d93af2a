//! Subscribers against a real broker (tansu on 127.0.0.1): whatever the daemon leaves on the
//! embeddings and versions topics, across SIGKILLs inside a publication and in transactional
//! mode, [`VersionAssembler`] applies whole versions only, numbered 1, 2, 3, … with none skipped
//! or repeated, each one's table exactly the rows of the versions up to it.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use twhin_stream::publish::{RowRecord, VersionMarker};
use twhin_stream::subscriber::VersionAssembler;

const TOPIC: &str = "twhin.engagements";

type Table = HashMap<String, (Vec<f32>, u64)>;

/// Each version's canonical attempt: the marker of its last attempt (`topics/README.md`),
/// one per publication ([`rounds`]: a single instance's version covers every partition, each
/// with its marker). Checks that versions run 1..=N and that a repeated version (a marker whose
/// acknowledgement was lost, then the retry) comes under a newer epoch.
fn canonical_markers(p: &Published) -> Vec<VersionMarker> {
    let mut canonical: Vec<VersionMarker> = Vec::new();
    for m in rounds(&p.markers) {
        if let Some(last) = canonical.last().filter(|c| c.version == m.version) {
            assert!(
                m.epoch > last.epoch,
                "a repeated version under a newer epoch"
            );
            canonical.pop();
        }
        canonical.push(m);
    }
    let versions: Vec<u64> = canonical.iter().map(|m| m.version).collect();
    assert_eq!(
        versions,
        (1..=versions.len() as u64).collect::<Vec<_>>(),
        "markers in version order, none skipped"
    );
    canonical
}

/// The table after each version, replayed from the markers without the assembler: version v's
/// table is v−1's overlaid with the rows of v's canonical attempt. Also checks that every marked
/// attempt's rows are all on the broker, each on its marker's partition, and that a canonical
/// attempt carries every key of the earlier attempts of its version.
fn expected_tables(p: &Published) -> Vec<Table> {
    let mut by_attempt: HashMap<(u64, u64), Vec<&PublishedRow>> = HashMap::new();
    for r in &p.rows {
        by_attempt
            .entry((r.2.version, r.2.epoch))
            .or_default()
            .push(r);
    }
    for m in &p.markers {
        let on_partition = (by_attempt.get(&(m.version, m.epoch)).into_iter().flatten())
            .filter(|(q, _, _)| Some(*q) == m.partition)
            .count();
        assert_eq!(
            on_partition as u64, m.rows,
            "{m:?}: its rows on its partition"
        );
    }
    let keys = |m: &VersionMarker| -> HashSet<&str> {
        let rows = by_attempt.get(&(m.version, m.epoch));
        let keys: HashSet<&str> = rows
            .into_iter()
            .flatten()
            .map(|(_, k, _)| k.as_str())
            .collect();
        assert_eq!(
            keys.len() as u64,
            m.rows,
            "every row of version {} epoch {} is on the broker",
            m.version,
            m.epoch
        );
        keys
    };
    let canonical = canonical_markers(p);
    for m in &rounds(&p.markers) {
        let last = &canonical[m.version as usize - 1];
        assert!(
            keys(last).is_superset(&keys(m)),
            "version {}: the canonical attempt carries every key of epoch {}",
            m.version,
            m.epoch
        );
    }
    let mut table = Table::new();
    let mut out = Vec::new();
    for m in canonical {
        for (_, k, r) in by_attempt.get(&(m.version, m.epoch)).into_iter().flatten() {
            table.insert(k.clone(), (r.vector.clone(), r.version));
        }
        out.push(table.clone());
    }
    out
}

enum Item<'a> {
    Row(&'a PublishedRow),
    Marker(&'a VersionMarker),
}

/// Orders in which a subscriber may read the two topics.
fn orders(p: &Published) -> Vec<(&'static str, Vec<Item<'_>>)> {
    let rows = || p.rows.iter().map(Item::Row);
    let markers = || p.markers.iter().map(Item::Marker);
    let rows_first = rows().chain(markers()).collect();
    let markers_first = markers().chain(rows()).collect();
    let reversed = p
        .rows
        .iter()
        .rev()
        .map(Item::Row)
        .chain(p.markers.iter().rev().map(Item::Marker))
        .collect();
    // Each marker at a scattered position among the rows.
    let mut at: Vec<usize> = (0..p.markers.len())
        .map(|i| (i * 7_919 + 13) % (p.rows.len() + 1))
        .collect();
    at.sort_unstable();
    let mut scattered = Vec::new();
    let mut next_marker = 0;
    for (i, r) in p.rows.iter().enumerate() {
        while next_marker < at.len() && at[next_marker] == i {
            scattered.push(Item::Marker(&p.markers[next_marker]));
            next_marker += 1;
        }
        scattered.push(Item::Row(r));
    }
    scattered.extend(p.markers[next_marker..].iter().map(Item::Marker));
    vec![
        ("rows first", rows_first),
        ("markers first", markers_first),
        ("reversed", reversed),
        ("scattered", scattered),
    ]
}

/// `a`'s table holds exactly `expected`'s keys of `partition` (every key: `None`).
fn assert_table(a: &VersionAssembler, expected: &Table, partition: Option<i32>, context: &str) {
    let partitions = rounds_partitions(a);
    // A partition's relation delta is on that partition, whatever its key's hash.
    let ours = |k: &str| {
        partition.is_none_or(|q| {
            let on = twhin_stream::subscriber::relation_delta_partition(k).unwrap_or_else(|| {
                twhin_stream::partition::partition_of(k.as_bytes(), partitions) as i32
            });
            on == q
        })
    };
    let held = a.table().keys().filter(|k| ours(k)).count();
    let wanted = expected.keys().filter(|k| ours(k)).count();
    assert_eq!(held, wanted, "{context}: table size");
    for (k, (vector, version)) in expected.iter().filter(|(k, _)| ours(k)) {
        let e = a.get(k).unwrap_or_else(|| panic!("{context}: {k} missing"));
        assert!(
            e.version == *version && e.vector == *vector,
            "{context}: {k} holds version {} instead of {version}",
            e.version
        );
    }
}

/// The partition count the assembler's applied markers name (1 for markers that name none).
fn rounds_partitions(a: &VersionAssembler) -> u32 {
    a.applied_marker()
        .and_then(|m| m.partitions)
        .map_or(1, |p| p as u32)
}

/// Feed the broker's contents through the assembler in every order of [`orders`]; in every
/// partition, every applied attempt must be the next version or a newer epoch of the one held,
/// and once a partition applied a version's canonical attempt, its keys in the table must be
/// exactly the expected ones. Returns the canonical `(version, epoch)`s.
fn check_whole_versions(p: &Published) -> Vec<(u64, u64)> {
    let expected = expected_tables(p);
    let marked: Vec<(u64, u64)> = (canonical_markers(p).iter())
        .map(|m| (m.version, m.epoch))
        .collect();
    for (name, items) in orders(p) {
        let mut a = VersionAssembler::new();
        let mut applied: HashMap<Option<i32>, Vec<(u64, u64)>> = HashMap::new();
        for item in items {
            let done = match item {
                Item::Row((q, k, r)) => a.push_row(*q, k.as_str(), r.clone()),
                Item::Marker(m) => a.push_marker((*m).clone()),
            };
            for v in &done {
                let applied = applied.entry(v.partition).or_default();
                match applied.last_mut() {
                    Some(held) if held.0 == v.version => {
                        assert!(v.epoch > held.1, "{name}: a retry of version {}", v.version);
                        *held = (v.version, v.epoch);
                    }
                    _ => {
                        assert_eq!(v.version, applied.len() as u64 + 1, "{name}: in order");
                        applied.push((v.version, v.epoch));
                    }
                }
                assert_eq!(v.skipped, 0);
            }
            // One record can complete several versions of a partition; its keys are then at
            // the last one. Partitions apply on their own: each one's keys are at its version.
            let mut last: HashMap<Option<i32>, (u64, u64)> = HashMap::new();
            for v in &done {
                last.insert(v.partition, (v.version, v.epoch));
            }
            for (partition, (version, epoch)) in last {
                if marked[version as usize - 1] == (version, epoch) {
                    assert_table(
                        &a,
                        &expected[version as usize - 1],
                        partition,
                        &format!("{name}, partition {partition:?} version {version}"),
                    );
                }
            }
        }
        assert!(!applied.is_empty(), "{name}: nothing applied");
        for (partition, applied) in &applied {
            assert_eq!(
                applied, &marked,
                "{name}: partition {partition:?} applied every version's canonical attempt"
            );
        }
        assert_table(&a, expected.last().expect("a version"), None, name);
        assert_eq!(a.counts().pending_rows, 0, "{name}: {:?}", a.counts());
        assert!(a.catch_up().is_empty());
    }
    marked
}

/// Attempts with rows on the broker and no marker, with their row counts.
fn unmarked_attempts(p: &Published) -> HashMap<(u64, u64), usize> {
    let marked: HashSet<(u64, u64)> = p.markers.iter().map(|m| (m.version, m.epoch)).collect();
    let mut out = HashMap::new();
    for (_, _, r) in &p.rows {
        if !marked.contains(&(r.version, r.epoch)) {
            *out.entry((r.version, r.epoch)).or_default() += 1;
        }
    }
    out
}

/// A subscriber that starts late on the compacted topic (newest row per key) catches up to the
/// last version; its table is the full reader's, less keys whose newest row belongs to an
/// attempt without a marker.
fn check_catch_up_after_compaction(p: &Published) {
    let expected = expected_tables(p);
    let last = expected.last().expect("a version");
    let mut newest: HashMap<&str, usize> = HashMap::new();
    for (i, (_, k, _)) in p.rows.iter().enumerate() {
        newest.insert(k.as_str(), i);
    }
    let mut survivors: Vec<usize> = newest.values().copied().collect();
    survivors.sort_unstable();
    let marked: HashSet<(u64, u64)> = p.markers.iter().map(|m| (m.version, m.epoch)).collect();
    let mut a = VersionAssembler::new();
    for m in &p.markers {
        a.push_marker(m.clone());
    }
    for &i in &survivors {
        let (q, k, r) = &p.rows[i];
        a.push_row(*q, k.as_str(), r.clone());
    }
    a.catch_up();
    assert_eq!(a.applied_version(), canonical_markers(p).len() as u64);
    let orphans: HashSet<&str> = survivors
        .iter()
        .map(|&i| &p.rows[i])
        .filter(|(_, _, r)| !marked.contains(&(r.version, r.epoch)))
        .map(|(_, k, _)| k.as_str())
        .collect();
    for (k, (vector, version)) in last {
        match a.get(k) {
            Some(e) => assert!(e.vector == *vector && e.version == *version, "{k}"),
            None => assert!(orphans.contains(k.as_str()), "{k} missing after catch-up"),
        }
    }
    assert_eq!(a.table().len() + orphans.len(), last.len());
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

/// `(version, epoch, rows)` of the publication under way (`/v1/status` `publish.in_progress`),
/// when it has a version above `after` and at least `min_rows` rows.
fn publication_started(daemon: &Daemon, after: u64, min_rows: u64) -> Option<(u64, u64, u64)> {
    let p = daemon.status()?.pointer("/publish/in_progress")?.clone();
    let field = |k: &str| p.get(k).and_then(|v| v.as_u64());
    let found = (field("version")?, field("epoch")?, field("rows")?);
    (found.0 > after && found.2 >= min_rows).then_some(found)
}

/// Records on the embeddings topic: the sum of its partitions' high watermarks.
fn embeddings_end(consumer: &rdkafka::consumer::BaseConsumer) -> i64 {
    use rdkafka::consumer::Consumer;
    let timeout = Duration::from_secs(5);
    let md = consumer
        .fetch_metadata(Some("twhin.embeddings"), timeout)
        .unwrap();
    let partitions = md.topics()[0].partitions().len() as i32;
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks("twhin.embeddings", p, timeout)
                .map_or(0, |(_, high)| high)
        })
        .sum()
}

const CHUNK: usize = 12_000;

#[test]
fn a_subscriber_never_applies_part_of_a_version_when_the_daemon_dies_inside_a_publication() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // Wide rows and thousands of new nodes per version: a publication takes long enough on
    // the wire for the kill to land inside it.
    let Publishing {
        broker,
        port,
        env,
        store,
    } = publishing(dir.path(), 64, 2, &[]);
    let msgs: Vec<Outgoing> = (0..CHUNK * 5).map(|i| valid_event(i, false).0).collect();
    let mut chunks = msgs.chunks(CHUNK);

    let mut daemon = Daemon::start(env, port, dir.path());
    let watermarks: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let mut seen = 0;
    let mut interrupted = None;
    for _ in 0..4 {
        produce(&broker.bootstrap, TOPIC, chunks.next().unwrap(), None);
        // Polled tightly: sending ten thousand rows to a local broker takes about 100 ms.
        let start = Instant::now();
        let (version, epoch, rows) = loop {
            if let Some(found) = publication_started(&daemon, seen, 2_000) {
                break found;
            }
            assert!(
                start.elapsed() < Duration::from_secs(240),
                "no publication of thousands of rows\n{}",
                daemon.log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        // Once the first rows are on the broker (its embeddings topic grows; on a slow machine
        // encoding comes first, and a kill before any row left would leave nothing partial),
        // stopping the broker holds back the acknowledgements the marker waits for, so the kill
        // leaves rows without a marker.
        let before = embeddings_end(&watermarks);
        let grew = Instant::now();
        while embeddings_end(&watermarks) <= before && grew.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(2));
        }
        broker.pause();
        std::thread::sleep(Duration::from_millis(300));
        daemon.kill9();
        broker.resume();
        if ledger_last_version(&store) < version {
            // On a loaded machine the kill can come before librdkafka sent any row of the
            // attempt: then there is nothing partial to ignore, and the kill is tried again.
            let mut on_broker = 0;
            for_each_row(&broker.bootstrap, 1, Duration::from_secs(30), |_, _, r| {
                on_broker += usize::from((r.version, r.epoch) == (version, epoch));
            });
            if on_broker > 0 {
                eprintln!("killed inside version {version} (epoch {epoch}, {rows} rows, {on_broker} on the broker)");
                interrupted = Some((version, epoch));
                break;
            }
            eprintln!("killed inside version {version} before any of its rows left; again");
            seen = version - 1;
            daemon.restart();
            continue;
        }
        eprintln!("version {version} finished before the kill; again");
        seen = version;
        daemon.restart();
    }
    let (version, epoch) = interrupted.expect("a kill inside a publication");
    daemon.restart();
    // The retry carries the same number; new events after it make the next version. (Events
    // produced before the retry is built ride in it, and with nothing new after it no version
    // follows.)
    wait_until(
        &format!("version {version} retried"),
        Duration::from_secs(240),
        || (ledger_last_version(&store) >= version).then_some(()),
    );
    produce(&broker.bootstrap, TOPIC, chunks.next().unwrap(), None);
    wait_until(
        &format!("version {} published", version + 1),
        Duration::from_secs(240),
        || (last_version(&daemon) > version).then_some(()),
    );
    assert!(daemon.terminate().success());

    let p = read_published(&broker.bootstrap, 1);
    let applied = check_whole_versions(&p);
    let unmarked = unmarked_attempts(&p);
    let rows_left = unmarked.get(&(version, epoch)).copied().unwrap_or(0);
    eprintln!(
        "markers {:?}; rows without a marker: {unmarked:?}",
        p.markers
            .iter()
            .map(|m| (m.version, m.epoch, m.rows))
            .collect::<Vec<_>>()
    );
    assert!(
        rows_left > 0,
        "the interrupted attempt left rows on the broker"
    );
    let retry = applied
        .iter()
        .find(|(v, _)| *v == version)
        .expect("the interrupted version was retried");
    assert!(
        retry.1 > epoch,
        "retried under a newer epoch, never the interrupted one: {retry:?}"
    );
    check_catch_up_after_compaction(&p);
}

#[test]
fn transactional_versions_commit_and_apply_whole_across_a_restart_and_export_as_files() {
    let _serial = serial();
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
        &[("TWHIN_PUBLISH__TRANSACTIONAL", "true")],
    );
    let msgs: Vec<Outgoing> = (0..4_000).map(|i| valid_event(i, false).0).collect();

    let mut daemon = Daemon::start(env, port, dir.path());
    let mut committed = 0;
    for (round, part) in msgs.chunks(2_000).enumerate() {
        if round > 0 {
            // A restart initialises transactions again under the same transactional.id.
            daemon.restart();
        }
        let before = last_version(&daemon);
        produce(&broker.bootstrap, TOPIC, part, None);
        wait_until("a transactional version", Duration::from_secs(120), || {
            (last_version(&daemon) > before).then_some(())
        });
        let st = daemon.status().expect("status");
        assert_eq!(
            st.pointer("/publish/transactional"),
            Some(&true.into()),
            "{st}"
        );
        assert_eq!(
            status_u64(&st, "/publish/failures"),
            0,
            "no attempt failed or aborted"
        );
        assert!(daemon.terminate().success());
        // The final publication at shutdown may add one more.
        committed = ledger_last_version(&store);
    }
    let p = read_published(&broker.bootstrap, 1);
    let versions = rounds(&p.markers);
    assert!(versions.len() >= 2, "{versions:?}");
    assert_eq!(
        committed,
        versions.len() as u64,
        "each version's markers from a committed transaction"
    );
    check_whole_versions(&p);
    assert!(unmarked_attempts(&p).is_empty());
    check_export(&env_of(&broker, &store), &p, dir.path());
}

/// A publisher that lost its ledger and reference (`publish.path`: a new volume, a new machine)
/// goes on with the versions topic's numbering under a newer epoch, its first version carrying
/// every row and building on the topic's last, so subscribers apply it; a deployment of another
/// group on the same topics is refused before it publishes, naming the topic and the deployment.
#[test]
fn a_lost_publish_ledger_goes_on_with_the_topics_numbering_and_another_deployment_is_refused() {
    use twhin_stream::config::Config;
    use twhin_stream::publish::{reconcile_with_versions_topic, Ledger, VersionsTopicError};

    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Publishing {
        broker,
        port,
        env,
        store,
    } = publishing(dir.path(), 16, 1, &[]);
    let msgs: Vec<Outgoing> = (0..4_000).map(|i| valid_event(i, false).0).collect();
    let mut daemon = Daemon::start(env, port, dir.path());
    produce(&broker.bootstrap, TOPIC, &msgs[..2_000], None);
    wait_until("a version", Duration::from_secs(120), || {
        (last_version(&daemon) > 0).then_some(())
    });
    assert!(daemon.terminate().success());
    let before = read_markers(&broker.bootstrap, 1);
    let last = before.iter().map(|m| m.attempt()).max().unwrap();
    assert!(before
        .iter()
        .all(|m| m.deployment.as_deref() == Some("twhin-stream")));

    std::fs::remove_dir_all(store.join("publish")).unwrap();
    daemon.restart();
    produce(&broker.bootstrap, TOPIC, &msgs[2_000..], None);
    wait_until(
        "a version after the restart",
        Duration::from_secs(120),
        || (last_version(&daemon) > last.version).then_some(()),
    );
    assert!(daemon.terminate().success());
    let p = read_published(&broker.bootstrap, before.len() + 1);
    // Versions 1, 2, 3, … across the lost ledger, each applied whole in every reading order.
    check_whole_versions(&p);
    let first_after = (rounds(&p.markers).into_iter())
        .find(|m| m.version == last.version + 1)
        .expect("the next version");
    let max_epoch_before = before.iter().map(|m| m.epoch).max().unwrap();
    assert!(first_after.epoch > max_epoch_before, "{first_after:?}");
    assert_eq!(first_after.builds_on, Some(last));
    let table = &expected_tables(&p)[first_after.version as usize - 1];
    assert_eq!(
        first_after.rows as usize,
        table.len(),
        "the first version after the lost ledger carries every row"
    );

    let other = Config::from_toml(&format!(
        "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"ads-ranking\"",
        broker.bootstrap
    ))
    .unwrap();
    let mut ledger = Ledger::in_memory();
    match reconcile_with_versions_topic(&other, &mut ledger) {
        Err(VersionsTopicError::Foreign { topic, source }) => {
            assert_eq!(topic, "twhin.versions");
            assert_eq!(source.theirs, "twhin-stream");
            assert_eq!(source.ours, "ads-ranking");
            assert!(source.version > last.version);
        }
        other => panic!("another deployment's versions topic was accepted: {other:?}"),
    }
    assert_eq!(ledger.next_version(), 1, "nothing adopted from it");
}

fn env_of(broker: &common::Broker, store: &std::path::Path) -> Vec<(String, String)> {
    daemon_env(&broker.bootstrap, store, free_port())
}

/// A `.npy` file's float32 rows, read without the crate that wrote it: the format's header
/// (`\x93NUMPY`, version, header length, a dict naming dtype, order and shape), then the values.
fn read_npy(path: &std::path::Path) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let (len_at, len_size) = if bytes[6] == 1 { (8, 2) } else { (8, 4) };
    let mut header_len = 0usize;
    for (i, b) in bytes[len_at..len_at + len_size].iter().enumerate() {
        header_len |= (*b as usize) << (8 * i);
    }
    let start = len_at + len_size;
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let (rows, dim) = (dims[0], dims.get(1).copied().unwrap_or(0));
    let data = &bytes[start + header_len..];
    assert_eq!(data.len(), rows * dim * 4, "{header}");
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect::<Vec<_>>()
        .chunks(dim.max(1))
        .map(<[f32]>::to_vec)
        .collect()
}

/// The files of `export --format npy` as a table (`type:id` / `relation:name` → vector).
fn exported_table(out: &std::path::Path) -> HashMap<String, Vec<f32>> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let mut groups: Vec<(String, String)> = meta["types"]
        .as_object()
        .unwrap()
        .keys()
        .map(|t| (t.clone(), format!("{t}:")))
        .collect();
    groups.push(("relations".into(), "relation:".into()));
    let mut table = HashMap::new();
    for (file, prefix) in groups {
        let ids = std::fs::read_to_string(out.join(format!("{file}.ids"))).unwrap();
        let rows = read_npy(&out.join(format!("{file}.npy")));
        assert_eq!(ids.lines().count(), rows.len(), "{file}");
        for (id, row) in ids.lines().zip(rows) {
            table.insert(format!("{prefix}{id}"), row);
        }
    }
    table
}

/// `export` writes exactly the table a subscriber holds at the version asked for (the first,
/// and the newest by default), names what is missing when the version is not on the topics,
/// and its TSV form carries the same rows.
fn check_export(env: &[(String, String)], p: &Published, dir: &std::path::Path) {
    let tables = expected_tables(p);
    // What `export` writes: node rows and relation vectors (not the partitions' shares).
    let as_vectors = |t: &Table| -> HashMap<String, Vec<f32>> {
        (t.iter())
            .filter(|(k, _)| !k.starts_with(twhin_stream::subscriber::RELATION_DELTA_PREFIX))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    };
    let first = dir.join("export-v1");
    let summary = cli(
        env,
        &[
            "export",
            "--version",
            "1",
            "--json",
            first.to_str().unwrap(),
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    assert_eq!(summary["version"], 1, "{summary}");
    assert_eq!(exported_table(&first), as_vectors(&tables[0]), "version 1");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        meta["version_rows"],
        canonical_markers(p)[0].rows,
        "the records version 1 carried, in every partition"
    );
    let newest = dir.join("export-newest");
    cli(env, &["export", newest.to_str().unwrap()]);
    assert_eq!(
        exported_table(&newest),
        as_vectors(tables.last().unwrap()),
        "the newest version"
    );
    let tsv = dir.join("export-tsv");
    cli(
        env,
        &[
            "export",
            "--version",
            "1",
            "--format",
            "tsv",
            tsv.to_str().unwrap(),
        ],
    );
    let mut from_tsv = 0;
    for entry in std::fs::read_dir(&tsv).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "tsv") {
            from_tsv += std::fs::read_to_string(&path).unwrap().lines().count();
        }
    }
    assert_eq!(from_tsv, as_vectors(&tables[0]).len(), "one TSV line a row");
    // Parquet: the same rows, read back through the Arrow reader.
    let parquet = dir.join("export-parquet");
    let summary = cli(
        env,
        &[
            "export",
            "--version",
            "1",
            "--format",
            "parquet",
            "--json",
            parquet.to_str().unwrap(),
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(summary.trim()).unwrap();
    let mut from_parquet = HashMap::new();
    for (group, meta) in summary["types"].as_object().unwrap() {
        for (key, vector) in
            twhin_stream::offline::export::read_parquet(&parquet.join(format!("{group}.parquet")))
                .unwrap()
        {
            from_parquet.insert(format!("{group}:{key}"), vector);
        }
        assert_eq!(meta["files"][0], format!("{group}.parquet"));
    }
    for (key, vector) in
        twhin_stream::offline::export::read_parquet(&parquet.join("relations.parquet")).unwrap()
    {
        from_parquet.insert(format!("relation:{key}"), vector);
    }
    assert_eq!(from_parquet, as_vectors(&tables[0]), "version 1 as Parquet");
    // The Python reader of the two topics (examples/subscriber.py) ends on the same version.
    let bootstrap = &env
        .iter()
        .find(|(k, _)| k == "TWHIN_KAFKA__BOOTSTRAP_SERVERS")
        .unwrap()
        .1;
    let last = run_python_subscriber(bootstrap);
    assert_eq!(last["version"], tables.len() as u64, "{last}");
    assert_eq!(last["keys"], tables.last().unwrap().len() as u64, "{last}");
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_twhin-stream"))
        .current_dir(repo_root())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args([
            "export",
            "--version",
            "999",
            dir.join("none").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("version 999 cannot be assembled"),
        "{stderr}"
    );
}

/// `examples/subscriber.py` from the beginning of both topics until they idle 5 s: its last line
/// (`version`, `keys`, `checksum`).
fn run_python_subscriber(bootstrap: &str) -> serde_json::Value {
    let python = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .current_dir(repo_root())
        .args(["examples/subscriber.py", "--bootstrap-servers", bootstrap])
        .args(["--idle-exit-secs", "5"])
        .output()
        .expect(".venv/bin/python (bash .ci/setup installs it with confluent-kafka and numpy)");
    let stdout = String::from_utf8_lossy(&python.stdout);
    assert!(
        python.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&python.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The example subscriber run from the beginning of both topics until they idle 5 s: its JSON
/// summary and the keys of its table.
fn run_example_subscriber(
    bootstrap: &str,
    dir: &std::path::Path,
) -> (serde_json::Value, HashSet<String>) {
    let summary = dir.join("subscriber.json");
    let keys_out = dir.join("keys.txt");
    let out = std::process::Command::new(example_subscriber())
        .args(["--bootstrap-servers", bootstrap, "--idle-exit-secs", "5"])
        .arg("--summary-json")
        .arg(&summary)
        .arg("--keys-out")
        .arg(&keys_out)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "subscriber: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let keys = std::fs::read_to_string(&keys_out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (summary, keys)
}

/// `examples/subscriber.rs`, built by `cargo test --all-targets` beside the test binaries (built
/// here when it is missing, as under a bare `cargo test --test subscriber`).
fn example_subscriber() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = debug.join("examples").join("subscriber");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "--example", "subscriber"])
            .status()
            .unwrap();
        assert!(
            status.success() && bin.exists(),
            "building the example subscriber"
        );
    }
    bin
}

/// An account deletion end to end: `{"op": "erase", "node": …}` takes the node's edges out of
/// the store, the daemon stops serving its row (410), a later event naming it is not stored, a
/// malformed erasure is a dead letter (`bad_erase`), and the next version carries a tombstone
/// for its key, so the example subscriber's table no longer holds it (while every other node
/// of the stream stays).
#[test]
fn an_erased_node_leaves_the_store_the_served_version_and_the_subscribers_table() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Publishing {
        broker,
        port,
        env,
        store,
    } = publishing(dir.path(), 8, 1, &[]);
    // Every type is searched through its ANN index (`/v1/neighbors` below, both ways).
    let mut env = env;
    env.push(("TWHIN_HTTP__ANN__ENABLED".into(), "true".into()));
    env.push(("TWHIN_HTTP__ANN__MIN_ROWS".into(), "1".into()));
    let mut daemon = Daemon::start(env, port, dir.path());
    let follow = |i: usize| {
        let src = format!("user:{}", i % 40);
        let json = serde_json::json!({"src": src, "rel": "follows", "dst": format!("user:f{}", i % 300),
            "ts": 1_732_190_000_000u64 + i as u64});
        Outgoing {
            key: src,
            payload: Some(json.to_string().into_bytes()),
        }
    };
    let msgs: Vec<Outgoing> = (0..2_000).map(follow).collect();
    produce(&broker.bootstrap, TOPIC, &msgs, None);
    wait_until(
        "user:7 served in a version",
        Duration::from_secs(120),
        || http_get(port, "/v1/embeddings/user/7").ok(),
    );
    let raw = |key: &str, json: serde_json::Value| Outgoing {
        key: key.into(),
        payload: Some(json.to_string().into_bytes()),
    };
    let erasures = vec![
        raw(
            "user:7",
            serde_json::json!({"op": "erase", "node": "user:7", "event_id": "gdpr-7"}),
        ),
        raw(
            "user:f9",
            serde_json::json!({"op": "erase", "node": "user:f9"}),
        ),
        // Malformed: an erasure names one node, not an edge.
        raw(
            "user:8",
            serde_json::json!({"op": "erase", "src": "user:8", "rel": "follows", "dst": "user:f1"}),
        ),
    ];
    produce(&broker.bootstrap, TOPIC, &erasures, None);
    // After the erasure, on the same partition: user:7 is gone for good.
    let late = vec![raw(
        "user:7",
        serde_json::json!({"src": "user:7", "rel": "follows", "dst": "user:f1"}),
    )];
    produce(&broker.bootstrap, TOPIC, &late, None);
    let st = wait_until("the erasures stored", Duration::from_secs(120), || {
        daemon.status().filter(|st| {
            status_u64(st, "/store/nodes_erased") == 2
                && status_u64(st, "/ingest/erased_refused") == 1
        })
    });
    // The ledger records, with each committed version, how many erasures went out as tombstones.
    let ledger = store.join("publish/ledger.json");
    wait_until("the tombstones published", Duration::from_secs(120), || {
        let l: serde_json::Value = serde_json::from_slice(&std::fs::read(&ledger).ok()?).ok()?;
        (status_u64(&l, "/erasures_published") == 2).then_some(())
    });
    assert_eq!(status_u64(&st, "/ingest/invalid"), 1, "{st}");
    // user:7 followed f7, f47, …: 2,000 / 40 = 50 edges; f9 was followed by 2,000 / 300 ≈ 7.
    let deleted = status_u64(&st, "/store/edges_deleted");
    assert!(
        (50..=58).contains(&deleted),
        "{deleted} edges deleted: {st}"
    );
    for gone in ["/v1/embeddings/user/7", "/v1/embeddings/user/f9"] {
        let err = http_get(port, gone).unwrap_err().to_string();
        assert!(err.contains("410"), "{gone}: {err}");
    }
    let through_index = wait_until(
        "the served version indexed",
        Duration::from_secs(60),
        || {
            http_get(port, "/v1/neighbors/user/3?rel=follows&k=300")
                .ok()
                .filter(|r| r.contains("\"method\":\"ann\""))
        },
    );
    let exact = http_get(port, "/v1/neighbors/user/3?rel=follows&k=300&exact=true").unwrap();
    assert!(exact.contains("\"method\":\"exact\""), "{exact}");
    for ranked in [through_index, exact] {
        assert!(
            !ranked.contains("\"user:f9\"") && !ranked.contains("\"user:7\""),
            "an erased node is never a candidate: {ranked}"
        );
    }
    let line = "twhin_ingest_events_invalid_total{reason=\"bad_erase\"} 1";
    assert!(daemon.metrics().contains(line), "missing `{line}`");
    assert!(daemon.terminate().success());

    // The example subscriber, from the beginning of both topics.
    let (summary, keys) = run_example_subscriber(&broker.bootstrap, dir.path());
    assert_eq!(
        summary["last_version"].as_u64(),
        Some(ledger_last_version(&store)),
        "{summary}"
    );
    assert!(
        summary["tombstones_read"].as_u64().unwrap() >= 2,
        "{summary}"
    );
    assert!(
        !keys.contains("user:7") && !keys.contains("user:f9"),
        "erased keys held"
    );
    let kept = (0..40)
        .filter(|&u| u != 7)
        .map(|u| format!("user:{u}"))
        .chain((0..300).filter(|&f| f != 9).map(|f| format!("user:f{f}")));
    let missing: Vec<String> = kept.filter(|k| !keys.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "nodes missing from the subscriber: {missing:?}"
    );
}

/// `publish.format = "pq"` end to end: node rows go out as one byte per sub-space with the
/// codebooks as a record of the version that learned them. With a quantization bound no version
/// can meet, each version that keeps its codebooks sends the next one to learn new codebooks,
/// carry every row again and retire the old record. The example subscribers (Rust and Python)
/// decode every row, hold only the newest codebooks, and the decoded table is the served one
/// within the quantization error the daemon reports.
#[test]
fn product_quantized_versions_decode_to_the_served_rows_and_new_codebooks_retire_the_old() {
    let _serial = serial();
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
            ("TWHIN_PUBLISH__FORMAT", "pq"),
            ("TWHIN_PUBLISH__PQ__SUBSPACES", "8"),
            ("TWHIN_PUBLISH__PQ__MAX_RELATIVE_ERROR", "0.000000001"),
        ],
    );
    let mut daemon = Daemon::start(env.clone(), port, dir.path());
    let msgs: Vec<Outgoing> = (0..4_000).map(|i| valid_event(i, false).0).collect();
    let pq_status = |daemon: &Daemon| -> serde_json::Value {
        let st = daemon.status().expect("status");
        st.pointer("/publish/pq").cloned().unwrap_or_default()
    };
    for (round, part) in msgs.chunks(2_000).enumerate() {
        produce(&broker.bootstrap, TOPIC, part, None);
        wait_until("codebooks learned", Duration::from_secs(120), || {
            let pq = pq_status(&daemon);
            (pq["codebooks_learned"].as_u64()? > round as u64).then_some(())
        });
    }
    // Quiet: no new events, the trainer idles and versions stop (the last ones may still learn
    // and carry every row).
    let mut last = (last_version(&daemon), Instant::now());
    wait_until("versions to stop", Duration::from_secs(120), || {
        let now = last_version(&daemon);
        if now != last.0 {
            last = (now, Instant::now());
        }
        (last.1.elapsed() > Duration::from_secs(5)).then_some(())
    });
    let pq = pq_status(&daemon);
    let reported = pq["relative_error"]
        .as_f64()
        .expect("publish.pq.relative_error");
    assert!(pq["codebooks_epoch"].as_u64().is_some(), "{pq}");
    let served: HashMap<String, Vec<f32>> = (0..200)
        .map(|u| {
            let key = format!("user:{u}");
            let (_, vector) = served_row(port, &key);
            (key, vector)
        })
        .collect();
    let version = last_version(&daemon);
    // Ranked from the codes, as a pq subscriber would rank with the rows it decoded.
    let from_codes: serde_json::Value = serde_json::from_str(
        &http_get(port, "/v1/neighbors/user/0?rel=follows&k=10&codes=true").unwrap(),
    )
    .unwrap();
    assert_eq!(from_codes["method"], "codes", "{from_codes}");
    assert_eq!(from_codes["version"], version, "{from_codes}");
    assert!(daemon.terminate().success());

    let (summary, keys) = run_example_subscriber(&broker.bootstrap, dir.path());
    assert_eq!(
        summary["last_version"].as_u64(),
        Some(ledger_last_version(&store)),
        "{summary}"
    );
    assert_eq!(summary["counts"]["undecodable_rows"], 0, "{summary}");
    let held = summary["codebooks"].as_array().unwrap();
    assert_eq!(held.len(), 1, "older codebooks retired: {summary}");
    assert_eq!(held[0], pq["codebooks_epoch"], "{summary} {pq}");

    // The decoded table (through `export`, the same assembler) against the served rows.
    let out_dir = dir.path().join("export");
    cli(
        &env_of(&broker, &store),
        &[
            "export",
            "--version",
            &version.to_string(),
            out_dir.to_str().unwrap(),
        ],
    );
    let decoded = exported_table(&out_dir);
    let (mut err, mut total) = (0f64, 0f64);
    for (key, x) in &served {
        let y = decoded
            .get(key)
            .unwrap_or_else(|| panic!("{key} not exported"));
        for (a, b) in x.iter().zip(y) {
            err += ((a - b) as f64).powi(2);
            total += (*a as f64).powi(2);
        }
    }
    let measured = err / total;
    // The codes ranking is the decoded rows' ranking: (e_user:0 + e_follows) · decoded row.
    let query: Vec<f32> = served["user:0"]
        .iter()
        .zip(&decoded["relation:follows"])
        .map(|(a, b)| a + b)
        .collect();
    let score = |row: &[f32]| query.iter().zip(row).map(|(a, b)| a * b).sum::<f32>();
    let mut ranked: Vec<(f32, &String)> = decoded
        .iter()
        .filter(|(k, _)| k.starts_with("user:"))
        .map(|(k, row)| (score(row), k))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let tenth = ranked[9].0;
    for hit in from_codes["neighbors"].as_array().unwrap() {
        let key = hit["node"].as_str().unwrap();
        let expected = score(&decoded[key]);
        let got = hit["score"].as_f64().unwrap() as f32;
        assert!(
            (got - expected).abs() <= 1e-3 * expected.abs().max(1.0),
            "{key}: {got} from codes, {expected} from the decoded row"
        );
        assert!(
            expected >= tenth - 1e-3 * tenth.abs().max(1.0),
            "{key} is not in the decoded rows' top 10"
        );
    }
    assert!(measured > 0.0, "the rows were quantized");
    assert!(
        measured < 0.1 && measured < 4.0 * reported.max(0.005),
        "decoded rows lose {measured} of the served rows' energy; the daemon reported {reported}"
    );

    // The Python reader: the same version and keys, and the same values (its checksum against
    // the newest version exported).
    let last = run_python_subscriber(&broker.bootstrap);
    assert_eq!(last["version"], summary["last_version"], "{last}");
    let newest = dir.path().join("export-newest");
    cli(
        &env_of(&broker, &store),
        &["export", newest.to_str().unwrap()],
    );
    let sum: f64 = (exported_table(&newest).values())
        .flat_map(|v| v.iter().map(|&x| x as f64))
        .sum();
    let checksum = last["checksum"].as_f64().expect("checksum");
    assert!(
        (checksum - sum).abs() <= 1e-6 * sum.abs().max(1.0),
        "the Python reader's values sum to {checksum}, the exported ones to {sum}"
    );
    assert_eq!(
        last["keys"].as_u64().unwrap() as usize,
        keys.len(),
        "{last}"
    );
}

/// The seam: delivers through the daemon's Kafka sink, then reports a failure once when told
/// to, as a producer does whose marker landed but whose acknowledgement was lost.
struct LosesAnAck {
    sink: twhin_stream::publish::KafkaSink,
    lose_next: bool,
}

impl twhin_stream::publish::VersionSink for LosesAnAck {
    async fn produce(
        &mut self,
        prepared: &twhin_stream::publish::PreparedVersion,
    ) -> anyhow::Result<()> {
        self.sink.produce(prepared).await?;
        anyhow::ensure!(
            !std::mem::take(&mut self.lose_next),
            "the marker's acknowledgement was lost (test seam)"
        );
        Ok(())
    }
}

/// Every node row and relation vector of `view`, by the key subscribers hold it under.
fn served_table(
    store: &twhin_stream::store::GraphStore,
    view: &twhin_stream::publish::PublishedView,
) -> HashMap<String, Vec<f32>> {
    let schema = store.stored_schema();
    let mut out = HashMap::new();
    for (t, table) in view.tables.iter().enumerate() {
        for i in 0..table.size()[0] {
            let node = twhin_stream::store::NodeRef {
                node_type: t as u16,
                index: i as u32,
            };
            let id = store.node_id(node).unwrap().unwrap();
            let key = format!("{}:{id}", schema.node_types[t]);
            out.insert(key, Vec::<f32>::try_from(table.get(i)).unwrap());
        }
    }
    for (r, (name, _, _)) in schema.relations.iter().enumerate() {
        let vector = Vec::<f32>::try_from(view.relations.get(r as i64)).unwrap();
        out.insert(format!("relation:{name}"), vector);
    }
    out
}

/// The examples' checksum: every value of the node rows and relation vectors (not the
/// partitions' shares of the relations).
fn checksum(table: &HashMap<String, Vec<f32>>) -> f64 {
    (table.iter())
        .filter(|(k, _)| !k.starts_with(twhin_stream::subscriber::RELATION_DELTA_PREFIX))
        .flat_map(|(_, v)| v)
        .map(|&x| f64::from(x))
        .sum()
}

/// A version whose marker lands but whose acknowledgement is lost (through a seam in the
/// sink): the publication retries it under a new epoch and builds the next version on the
/// retry. Every subscriber, whichever attempt it completed first, ends with the rows the
/// publication serves: the assembler in every reading order and after compaction, `export`,
/// `examples/subscriber.rs` and `examples/subscriber.py`.
#[test]
fn a_lost_marker_acknowledgement_leaves_every_subscriber_with_the_served_rows() {
    use std::sync::Arc;
    use twhin_stream::align::{AlignStatus, Aligner};
    use twhin_stream::config::Config;
    use twhin_stream::publish::{
        InProcessTrainer, KafkaSink, Ledger, Outcome, Publication, VersionSettings,
    };
    use twhin_stream::store::{AppendBatch, GraphStore, StoreOptions};
    use twhin_stream::train::{Embeddings, TrainerCore};

    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let Publishing {
        broker, env, store, ..
    } = publishing(dir.path(), 16, 1, &[]);
    let cfg = Config::from_toml(&format!(
        "[kafka]\nbootstrap_servers = \"{}\"\n[train]\ndim = 16\n",
        broker.bootstrap
    ))
    .unwrap();
    let schema = cfg.schema();
    let graph = GraphStore::open(&store, &schema, &StoreOptions::default()).unwrap();
    tch::manual_seed(11);
    let model = Embeddings::for_schema(&schema, &cfg.train, tch::Device::Cpu);
    let mut core = TrainerCore::new(model, cfg.train.clone(), cfg.trainer.clone());
    let mut align_cfg = cfg.align.clone();
    align_cfg.enabled = false;
    let mut aligner =
        Aligner::new(align_cfg, false, None, Arc::new(AlignStatus::default())).unwrap();
    let settings = VersionSettings {
        format: cfg.publish.format,
        threshold: cfg.publish.row_threshold,
        comparator: cfg.train.comparator,
    };
    let mut publication = Publication::open(Ledger::in_memory(), settings, None).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sink = LosesAnAck {
        sink: rt
            .block_on(KafkaSink::start(Arc::new(cfg.clone())))
            .unwrap(),
        lose_next: false,
    };
    let limits = cfg.decode_limits();
    let train = |core: &mut TrainerCore, events: std::ops::Range<usize>| {
        let first = events.start as i64;
        let events = events.map(|i| {
            let payload = valid_event(i, false).0.payload.unwrap();
            let ts = 1_732_190_000_000 + i as u64;
            twhin_stream::schema::decode_event(&schema, &limits, Some(&payload), ts).unwrap()
        });
        graph
            .append(&AppendBatch::from_events(TOPIC, first, events))
            .unwrap();
        while core.step(&graph).unwrap().stats.is_some() {}
    };
    let mut publish = |core: &mut TrainerCore, sink: &mut LosesAnAck| {
        let mut trainer = InProcessTrainer {
            core,
            checkpoints: None,
        };
        let mut aligner = &mut aligner;
        rt.block_on(publication.publish(&graph, &mut trainer, &mut aligner, sink))
    };

    train(&mut core, 0..600);
    assert!(matches!(
        publish(&mut core, &mut sink),
        Ok(Outcome::Committed { .. })
    ));
    train(&mut core, 600..1_200);
    sink.lose_next = true;
    assert!(
        publish(&mut core, &mut sink).is_err(),
        "the seam lost the ack"
    );
    // The users of the lost attempt train on: the retry carries other values for them.
    train(&mut core, 1_200..1_800);
    assert!(matches!(
        publish(&mut core, &mut sink),
        Ok(Outcome::Committed { .. })
    ));
    train(&mut core, 1_800..2_000);
    let Ok(Outcome::Committed { view, .. }) = publish(&mut core, &mut sink) else {
        panic!("version 3 was expected")
    };
    assert_eq!(view.version, 3);
    let served = served_table(&graph, &view);

    let p = read_published(&broker.bootstrap, 4);
    let attempts: Vec<(u64, u64)> = p.markers.iter().map(|m| (m.version, m.epoch)).collect();
    assert_eq!(
        attempts.len(),
        4,
        "two complete attempts of version 2: {attempts:?}"
    );
    assert_eq!(attempts[1].0, 2);
    assert_eq!(attempts[2].0, 2);
    assert_eq!(
        p.markers[3].builds_on.map(|a| (a.version, a.epoch)),
        Some(attempts[2]),
        "version 3 builds on the retry"
    );
    let expect_served = |table: &HashMap<String, Vec<f32>>, who: &str| {
        assert_eq!(table.len(), served.len(), "{who}: keys");
        for (key, vector) in &served {
            assert_eq!(table.get(key), Some(vector), "{who}: {key}");
        }
    };
    // The assembler, live in every reading order (each version's table checked), then late on
    // the compacted topics.
    assert_eq!(
        check_whole_versions(&p),
        [attempts[0], attempts[2], attempts[3]]
    );
    for (name, items) in orders(&p) {
        let mut a = VersionAssembler::new();
        for item in items {
            match item {
                Item::Row((q, k, r)) => a.push_row(*q, k.as_str(), r.clone()),
                Item::Marker(m) => a.push_marker((*m).clone()),
            };
        }
        assert_eq!(
            (a.applied_version(), a.applied_epoch()),
            (3, Some(attempts[3].1))
        );
        let table = a
            .table()
            .iter()
            .map(|(k, e)| (k.clone(), e.vector.clone()))
            .collect();
        expect_served(&table, name);
    }
    let mut newest: HashMap<&str, (i32, &RowRecord)> = HashMap::new();
    for (q, k, r) in &p.rows {
        newest.insert(k.as_str(), (*q, r));
    }
    let mut late = VersionAssembler::new();
    for m in &p.markers {
        late.push_marker(m.clone());
    }
    for (k, (q, r)) in newest {
        late.push_row(q, k, r.clone());
    }
    late.catch_up();
    let table = late
        .table()
        .iter()
        .map(|(k, e)| (k.clone(), e.vector.clone()))
        .collect();
    expect_served(&table, "catch-up after compaction");
    // export, the Rust example and the Python example.
    let exported = dir.path().join("export-newest");
    cli(&env, &["export", exported.to_str().unwrap()]);
    expect_served(&exported_table(&exported), "export");
    let (summary, keys) = run_example_subscriber(&broker.bootstrap, dir.path());
    assert_eq!(summary["last_version"], 3, "{summary}");
    assert_eq!(keys, served.keys().cloned().collect::<HashSet<_>>());
    let near =
        |found: &serde_json::Value| (found.as_f64().unwrap() - checksum(&served)).abs() < 1e-6;
    assert!(
        near(&summary["checksum"]),
        "examples/subscriber.rs: {summary}"
    );
    let python = run_python_subscriber(&broker.bootstrap);
    assert_eq!(python["version"], 3, "{python}");
    assert_eq!(python["keys"], served.len() as u64, "{python}");
    assert!(
        near(&python["checksum"]),
        "examples/subscriber.py: {python}"
    );
}

/// Issue 24, upgrade in place: the topics and ledger a contract 2 publisher left (markers that
/// name no partition, a ledger that names none) are taken over by this version started on the
/// same store folder: its first version continues their chain in every partition (each marker
/// builds on the last contract 2 attempt: no base), a subscriber holding the contract 2 table
/// applies it, and a key only the old versions carried keeps its row. Then a second instance
/// joins the group: each publishes its own partitions, and the subscriber's table is, key by
/// key, what the key's owner serves.
#[test]
fn a_contract_2_deployment_upgrades_in_place_and_then_takes_a_second_instance() {
    use rdkafka::producer::FutureRecord;
    use twhin_stream::partition::partition_of;

    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // No replay: once the stream is trained nothing moves, so versions stop and the served rows
    // can be compared with the subscriber's.
    let Publishing {
        broker,
        port,
        env,
        store,
    } = publishing(dir.path(), 16, 1, &[("TWHIN_TRAINER__REPLAY_RATIO", "0")]);
    // What a contract 2 publisher left: versions 1 to 3 under epoch 2, each row on its key's
    // partition, markers for the whole topic, and its ledger.
    let legacy: [(u64, &[&str]); 3] = [
        (1, &["user:legacy-a", "user:legacy-b", "relation:follows"]),
        (2, &["user:legacy-a"]),
        (3, &["user:legacy-c"]),
    ];
    let producer = test_producer(&broker.bootstrap);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (version, keys) in legacy {
        for key in keys {
            let row = RowRecord {
                version,
                epoch: 2,
                ts: 1,
                vector: vec![version as f32; 16],
            };
            let payload = serde_json::to_vec(&row).unwrap();
            let p = partition_of(key.as_bytes(), 8) as i32;
            let record = FutureRecord::to("twhin.embeddings")
                .key(*key)
                .payload(&payload)
                .partition(p);
            rt.block_on(producer.send(record, Duration::from_secs(30)))
                .unwrap();
        }
        let builds_on =
            (version > 1).then(|| format!(r#"{{"version":{},"epoch":2}}"#, version - 1));
        let marker = format!(
            r#"{{"contract":2,"version":{version},"epoch":2,"rows":{},"builds_on":{},"deployment":"twhin-stream"}}"#,
            keys.len(),
            builds_on.as_deref().unwrap_or("null")
        );
        let key = version.to_string();
        let record = FutureRecord::to("twhin.versions")
            .key(&key)
            .payload(&marker);
        rt.block_on(producer.send(record, Duration::from_secs(30)))
            .unwrap();
    }
    std::fs::create_dir_all(store.join("publish")).unwrap();
    std::fs::write(
        store.join("publish/ledger.json"),
        br#"{"last_version":3,"epoch":2,"last_epoch":2,"erasures_published":0}"#,
    )
    .unwrap();

    let msgs: Vec<Outgoing> = (0..3_000).map(|i| valid_event(i, false).0).collect();
    let mut first = Daemon::start(env.clone(), port, dir.path());
    produce(&broker.bootstrap, TOPIC, &msgs[..1_500], None);
    wait_until("version 4", Duration::from_secs(120), || {
        (last_version(&first) >= 4).then_some(())
    });
    let p = read_published(&broker.bootstrap, 3 + 8);
    let fourth: Vec<&VersionMarker> = p.markers.iter().filter(|m| m.version == 4).collect();
    assert_eq!(
        fourth
            .iter()
            .filter_map(|m| m.partition)
            .collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>(),
        "a marker per partition"
    );
    let legacy_attempt = Some(twhin_stream::publish::AttemptRef {
        version: 3,
        epoch: 2,
    });
    assert!(
        fourth
            .iter()
            .all(|m| m.contract == 3 && m.builds_on == legacy_attempt),
        "every partition continues the contract 2 chain: {fourth:?}"
    );
    let table = assemble(&p);
    let old = table
        .get("user:legacy-c")
        .expect("a key only the old versions carried");
    assert_eq!((old.version, old.vector[0]), (3, 3.0));
    assert!(table.len() > 100, "{} keys", table.len());

    // A second instance of the deployment.
    let (mut second, second_port) = start_another_instance(&env, &dir.path().join("second"));
    let covered = |d: &Daemon| published_partitions(d.status().as_ref());
    produce(&broker.bootstrap, TOPIC, &msgs[1_500..], None);
    let (ours, theirs) = wait_until(
        "both instances publish their partitions",
        Duration::from_secs(120),
        || {
            let (a, b) = (covered(&first), covered(&second));
            let mut all: Vec<i32> = a.iter().chain(&b).copied().collect();
            all.sort_unstable();
            (!a.is_empty() && !b.is_empty() && all == (0..8).collect::<Vec<_>>()).then_some((a, b))
        },
    );
    // Quiet: no new version in either instance for 5 s.
    wait_until("both instances idle", Duration::from_secs(120), || {
        let before = (last_version(&first), last_version(&second));
        std::thread::sleep(Duration::from_secs(5));
        (before == (last_version(&first), last_version(&second))).then_some(())
    });
    let p = read_published(&broker.bootstrap, 1);
    let table = assemble(&p);
    assert_eq!(table.get("user:legacy-c").map(|e| e.version), Some(3));
    let mut compared = [0usize; 2];
    for (key, entry) in &table {
        if !twhin_stream::subscriber::is_node_key(key) || key.contains("legacy") {
            continue;
        }
        let q = partition_of(key.as_bytes(), 8) as i32;
        let (owner, n) = if ours.contains(&q) {
            (port, 0)
        } else {
            assert!(theirs.contains(&q));
            (second_port, 1)
        };
        let (_, served) = served_row(owner, key);
        assert_eq!(
            served,
            entry.vector[..served.len()],
            "{key} (partition {q})"
        );
        compared[n] += 1;
    }
    assert!(
        compared.iter().all(|&n| n > 50),
        "{compared:?} rows compared"
    );
    // Both example subscribers hold the same table: contract 2 versions, then two instances'
    // partition chains.
    let vectors: HashMap<String, Vec<f32>> = (table.iter())
        .map(|(k, e)| (k.clone(), e.vector.clone()))
        .collect();
    let near =
        |found: &serde_json::Value| (found.as_f64().unwrap() - checksum(&vectors)).abs() < 1e-3;
    let (summary, keys) = run_example_subscriber(&broker.bootstrap, dir.path());
    let ours: HashSet<String> = vectors.keys().cloned().collect();
    let (missing, extra): (Vec<_>, Vec<_>) = (
        ours.difference(&keys).collect(),
        keys.difference(&ours).collect(),
    );
    assert!(
        missing.is_empty() && extra.is_empty(),
        "examples/subscriber.rs: {} keys missing, e.g. {:?}; {} extra, e.g. {:?}; {summary}",
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    assert!(
        near(&summary["checksum"]),
        "examples/subscriber.rs: {summary}"
    );
    let python = run_python_subscriber(&broker.bootstrap);
    assert_eq!(python["keys"], vectors.len() as u64, "{python}");
    assert!(
        near(&python["checksum"]),
        "examples/subscriber.py: {python}"
    );
    assert!(second.terminate().success());
    assert!(first.terminate().success());
}
