use super::*;
use crate::schema::{NodeKey, SchemaConfig};
use std::collections::HashSet;

fn schema() -> Schema {
    let cfg: SchemaConfig = toml::from_str(
        r#"
            node_types = ["user", "tweet"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = "tweet" },
            ]"#,
    )
    .unwrap();
    Schema::new(&cfg).unwrap()
}

fn ev(src: &str, rel: RelId, dst: &str, ts: u64, id: Option<&str>) -> Event {
    let key = |s: &str| {
        let (t, i) = s.split_once(':').unwrap();
        NodeKey {
            node_type: if t == "user" { 0 } else { 1 },
            id: i.into(),
        }
    };
    Event {
        op: Default::default(),
        src: key(src),
        rel,
        dst: key(dst),
        ts,
        weight: 1.0,
        event_id: id.map(Into::into),
    }
}

fn batch(events: Vec<(i32, i64, Event)>) -> AppendBatch {
    AppendBatch {
        topic: "t".into(),
        events: events
            .into_iter()
            .map(|(partition, offset, event)| SourcedEvent {
                partition,
                offset,
                event,
            })
            .collect(),
        next_offsets: vec![],
        last_records: vec![],
        extra_offsets: vec![],
        logged: Vec::new(),
        upstream: vec![],
    }
}

fn open(dir: &Path) -> GraphStore {
    GraphStore::open(dir, &schema(), &StoreOptions::default()).unwrap()
}

/// Nodes named by another instance's gradients are interned without an edge, after those the
/// events named, durably; a known node keeps its index.
#[test]
fn nodes_interned_without_an_edge_follow_the_known_ones_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        s.append(&batch(vec![(0, 0, ev("user:a", 1, "tweet:x", 10, None))]))
            .unwrap();
        let key = |t: TypeId, id: &str| NodeKey {
            node_type: t,
            id: id.into(),
        };
        let nodes = s
            .intern_nodes(&[key(1, "y"), key(1, "x"), key(0, "b"), key(1, "y")])
            .unwrap();
        let at = |t, index| NodeRef {
            node_type: t,
            index,
        };
        assert_eq!(nodes, vec![at(1, 1), at(1, 0), at(0, 1), at(1, 1)]);
        assert_eq!(
            (s.node_count(0), s.node_count(1), s.edge_count()),
            (2, 2, 1)
        );
        // Nothing new: nothing written.
        assert_eq!(s.intern_nodes(&[key(0, "a")]).unwrap(), vec![at(0, 0)]);
        // The next event's new node comes after them.
        s.append(&batch(vec![(0, 1, ev("user:c", 1, "tweet:y", 11, None))]))
            .unwrap();
        assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
    }
    let s = open(dir.path());
    assert_eq!(s.node_index(1, "y").unwrap(), Some(1));
    assert_eq!(s.node_index(0, "b").unwrap(), Some(1));
    assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
    assert_eq!(
        (s.node_count(0), s.node_count(1), s.edge_count()),
        (3, 2, 2)
    );
}

#[test]
fn interns_nodes_densely_per_type_and_keeps_edges_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let out = s
        .append(&batch(vec![
            (0, 0, ev("user:a", 0, "user:b", 10, None)),
            (0, 1, ev("user:a", 1, "tweet:x", 11, None)),
            (1, 0, ev("user:c", 1, "tweet:x", 12, None)),
        ]))
        .unwrap();
    assert_eq!((out.appended, out.new_nodes, out.first_seq), (3, 4, 0));
    assert_eq!(
        out.node_creating_events,
        vec![0, 1, 2],
        "each event met a new node"
    );
    assert_eq!(s.node_index(0, "a").unwrap(), Some(0));
    assert_eq!(s.node_index(0, "b").unwrap(), Some(1));
    assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
    assert_eq!(s.node_index(1, "x").unwrap(), Some(0));
    assert_eq!(
        s.node_id(NodeRef {
            node_type: 0,
            index: 2
        })
        .unwrap()
        .as_deref(),
        Some("c")
    );
    assert_eq!(
        (s.node_count(0), s.node_count(1), s.edge_count()),
        (3, 1, 3)
    );
    assert_eq!(s.relation_counts(), vec![1, 2]);
    let edges = s.edges_from(1, 10).unwrap();
    assert_eq!(
        edges.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(edges[1].1.ts, 12);
    assert_eq!(
        edges[1].1.src,
        NodeRef {
            node_type: 0,
            index: 2
        }
    );

    let tweet = NodeRef {
        node_type: 1,
        index: 0,
    };
    let fans = s
        .neighbors(tweet, Some(1), Some(Direction::In), 10)
        .unwrap();
    assert_eq!(
        fans.iter().map(|n| n.node.index).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(s.degree(tweet, 1, Direction::In).unwrap(), 2);
    let a = NodeRef {
        node_type: 0,
        index: 0,
    };
    let all = s.neighbors(a, None, None, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        s.neighbors(a, Some(0), Some(Direction::In), 10)
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        s.offsets().unwrap(),
        vec![("t".to_string(), 0, 2), ("t".to_string(), 1, 1)]
    );
}

#[test]
fn redelivered_offsets_are_skipped_and_offsets_only_move_forward() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.append(&batch(vec![(0, 5, ev("user:a", 0, "user:b", 1, None))]))
        .unwrap();
    // Offsets 3..=5 were already consumed (5 stored; 3 and 4 were invalid events).
    let mut b = batch(vec![
        (0, 5, ev("user:a", 0, "user:b", 1, None)),
        (0, 6, ev("user:b", 0, "user:a", 2, None)),
    ]);
    b.next_offsets = vec![(0, 9), (2, 4)];
    let out = s.append(&b).unwrap();
    assert_eq!((out.appended, out.already_stored), (1, 1));
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(9));
    assert_eq!(s.stored_offset("t", 2).unwrap(), Some(4));
    let mut back = batch(vec![]);
    back.next_offsets = vec![(0, 3)];
    s.append(&back).unwrap();
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(9));
    assert_eq!(s.edge_count(), 2);
}

#[test]
fn upstream_positions_are_kept_per_partition_and_source_move_forward_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let up = |partition, source, next| Upstream {
        partition,
        source,
        next,
    };
    {
        let s = open(dir.path());
        assert_eq!(s.upstream_offset("t", 2, 5).unwrap(), None);
        let mut b = batch(vec![(2, 0, ev("user:a", 0, "user:b", 1, None))]);
        // One position named twice, the furthest first (a restore reading a late record).
        b.upstream = vec![up(2, 5, 40), up(2, 6, 7), up(3, 5, 11), up(2, 5, 21)];
        b.extra_offsets = vec![("log".into(), 1, 30), ("log".into(), 1, 8)];
        s.append(&b).unwrap();
        let mut back = batch(vec![]);
        back.upstream = vec![up(2, 5, 12), up(2, 6, 9)];
        s.append_unflushed(&back).unwrap();
        s.flush().unwrap();
    }
    let s = open(dir.path());
    let got = |p, source| s.upstream_offset("t", p, source).unwrap();
    assert_eq!(
        [got(2, 5), got(2, 6), got(3, 5), got(3, 6)],
        [Some(40), Some(9), Some(11), None],
        "per (partition, source), only forward"
    );
    assert_eq!(s.upstream_offset("other", 2, 5).unwrap(), None, "per topic");
    assert_eq!(
        s.stored_offset("log", 1).unwrap(),
        Some(30),
        "only forward in one batch"
    );
    assert_eq!(s.offsets().unwrap().len(), 2, "not offsets of their own");
}

/// A batch's own changelog records move the store's changelog position only when they follow
/// it: records another instance wrote in between (the partition moved while the batch was
/// under way) are still read by a restore from the stored position.
#[test]
fn the_changelog_position_skips_no_other_writers_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let logged = |first, next| {
        let mut b = batch(vec![]);
        b.logged = vec![("log".into(), 2, first, next)];
        b
    };
    s.append(&logged(0, 3)).unwrap();
    assert_eq!(
        s.stored_offset("log", 2).unwrap(),
        Some(3),
        "the first records"
    );
    s.append(&logged(7, 8)).unwrap();
    assert_eq!(
        s.stored_offset("log", 2).unwrap(),
        Some(3),
        "3..7 are another's"
    );
    // A restore reads them (and this batch's own record again) in one batch.
    let mut restored = batch(vec![]);
    restored.extra_offsets = vec![("log".into(), 2, 8)];
    restored.logged = vec![("log".into(), 2, 8, 9)];
    s.append(&restored).unwrap();
    assert_eq!(s.stored_offset("log", 2).unwrap(), Some(9));
}

#[test]
fn a_rebalance_redelivery_inside_one_batch_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // Offsets 0..=2 consumed, then the partition is re-assigned at stored offset 0 and the
    // same messages arrive again before the batch is written.
    let b = batch(vec![
        (0, 0, ev("user:a", 0, "user:b", 1, None)),
        (0, 1, ev("user:b", 0, "user:c", 2, None)),
        (0, 0, ev("user:a", 0, "user:b", 1, None)),
        (0, 1, ev("user:b", 0, "user:c", 2, None)),
        (0, 2, ev("user:c", 0, "user:a", 3, None)),
    ]);
    let out = s.append(&b).unwrap();
    assert_eq!((out.appended, out.already_stored), (3, 2));
    assert_eq!(s.edge_count(), 3);
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(3));
}

#[test]
fn event_ids_dedup_within_the_window_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = GraphStore::open(
        dir.path(),
        &schema(),
        &StoreOptions {
            dedup_window_ms: 1000,
            ..Default::default()
        },
    )
    .unwrap();
    let out = s
        .append(&batch(vec![
            (0, 0, ev("user:a", 0, "user:b", 100, Some("e1"))),
            (0, 1, ev("user:a", 0, "user:b", 100, Some("e1"))),
            (0, 2, ev("user:a", 0, "user:c", 100, Some("e2"))),
        ]))
        .unwrap();
    assert_eq!((out.appended, out.duplicate_event_ids), (2, 1));
    let out = s
        .append(&batch(vec![(
            0,
            3,
            ev("user:a", 0, "user:b", 900, Some("e1")),
        )]))
        .unwrap();
    assert_eq!(out.duplicate_event_ids, 1);
    // 2000 ms later e1 is outside the window: stored again. Old ids expire once the
    // watermark (the median of recent event times) has moved: here 100 new ids at 2100.
    let mut later = vec![(0, 4, ev("user:a", 0, "user:b", 2100, Some("e1")))];
    for i in 0..100 {
        let id = format!("n{i}");
        later.push((0, 5 + i, ev("user:a", 0, "user:d", 2100, Some(id.as_str()))));
    }
    let out = s.append(&batch(later)).unwrap();
    assert_eq!(out.appended, 101);
    assert_eq!(
        s.writer.lock().dedup.len(),
        101,
        "e2 expired, e1 re-stored beside the 100 new ids"
    );
    assert_eq!(s.tree.scan_prefix(b"Y").count(), 1);
    assert_eq!(s.edge_count(), 103);
}

/// One far-future event time among ids (the year 2286) does not expire every stored id:
/// the same 1,000 events again are all duplicates.
#[test]
fn one_far_future_event_time_does_not_switch_deduplication_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = GraphStore::open(dir.path(), &schema(), &StoreOptions::default()).unwrap();
    let events = |from: i64| -> Vec<(i32, i64, Event)> {
        (0..1_000)
            .map(|i| {
                let (id, dst) = (format!("e{i}"), format!("user:{i}"));
                (
                    0,
                    from + i,
                    ev("user:a", 0, &dst, 874_724_710_000 + i as u64, Some(&id)),
                )
            })
            .collect()
    };
    assert_eq!(s.append(&batch(events(0))).unwrap().appended, 1_000);
    let outlier = ev("user:a", 0, "user:z", 9_999_999_999_999, Some("future"));
    assert_eq!(
        s.append(&batch(vec![(0, 1_000, outlier)]))
            .unwrap()
            .appended,
        1
    );
    let again = s.append(&batch(events(1_001))).unwrap();
    assert_eq!((again.appended, again.duplicate_event_ids), (0, 1_000));
    assert_eq!(s.edge_count(), 1_001);
}

#[test]
fn everything_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let mut b = batch(vec![
            (0, 0, ev("user:a", 0, "user:b", 1, Some("x"))),
            (0, 1, ev("user:b", 1, "tweet:t", 2, None)),
        ]);
        b.next_offsets = vec![(0, 3)];
        s.append(&b).unwrap();
    }
    let s = open(dir.path());
    assert_eq!(s.edge_count(), 2);
    assert_eq!(s.node_count(0), 2);
    assert_eq!(s.relation_counts(), vec![1, 1]);
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(3));
    let out = s
        .append(&batch(vec![(
            0,
            3,
            ev("user:a", 0, "user:c", 3, Some("x")),
        )]))
        .unwrap();
    assert_eq!(out.duplicate_event_ids, 1);
    let out = s
        .append(&batch(vec![(0, 4, ev("user:b", 0, "user:c", 3, None))]))
        .unwrap();
    assert_eq!((out.first_seq, out.new_nodes), (2, 1));
    assert_eq!(s.node_index(0, "c").unwrap(), Some(2));
    drop(s);
    let s = GraphStore::open_existing(dir.path()).unwrap();
    assert_eq!(s.stored_schema().node_types, vec!["user", "tweet"]);
    assert_eq!(s.edge_count(), 3);
}

#[test]
fn schema_may_grow_but_not_change() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let grown: SchemaConfig = toml::from_str(
        r#"
            node_types = ["user", "tweet", "ad"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = ["tweet", "ad"] },
              { name = "clicks", src = "user", dst = "ad" },
            ]"#,
    )
    .unwrap();
    drop(
        GraphStore::open(
            dir.path(),
            &Schema::new(&grown).unwrap(),
            &StoreOptions::default(),
        )
        .unwrap(),
    );
    let swapped: SchemaConfig = toml::from_str(
        r#"
            node_types = ["tweet", "user", "ad"]
            relations = [{ name = "follows", src = "user", dst = "user" }]"#,
    )
    .unwrap();
    let err = GraphStore::open(
        dir.path(),
        &Schema::new(&swapped).unwrap(),
        &StoreOptions::default(),
    )
    .err()
    .expect("reordered types must be refused");
    match err {
        StoreError::SchemaMismatch { key, .. } => assert_eq!(key, "schema.node_types[0]"),
        other => panic!("{other}"),
    }
}

#[test]
fn a_large_batch_spans_several_chunks_and_reads_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let n = EDGES_PER_CHUNK * 2 + 10;
    let events = (0..n)
        .map(|i| {
            (
                0,
                i as i64,
                ev(
                    &format!("user:{i}"),
                    1,
                    "tweet:x",
                    i as u64,
                    Some(&format!("id-{i}")),
                ),
            )
        })
        .collect();
    assert_eq!(s.append(&batch(events)).unwrap().appended, n as u64);
    assert_eq!(s.tree.scan_prefix(b"E").count(), 3);
    assert!(
        s.tree.scan_prefix(b"Y").count() > 1,
        "expiry chunks are split too"
    );
    let from = s.edges_from(EDGES_PER_CHUNK as u64 - 2, 5).unwrap();
    let seqs: Vec<u64> = from.iter().map(|(q, _)| *q).collect();
    let first = EDGES_PER_CHUNK as u64 - 2;
    assert_eq!(seqs, (first..first + 5).collect::<Vec<_>>());
    for (seq, e) in from {
        assert_eq!(e.ts, seq, "edge {seq} read from the right chunk");
        assert_eq!(s.edge(seq).unwrap(), Some(e));
    }
    assert_eq!(s.edge(n as u64).unwrap(), None);
}

#[test]
fn samples_stay_in_range() {
    use rand::SeedableRng;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let events = (0..50)
        .map(|i| {
            (
                0,
                i as i64,
                ev(
                    &format!("user:{i}"),
                    1,
                    &format!("tweet:{}", i % 7),
                    i,
                    None,
                ),
            )
        })
        .collect();
    s.append(&batch(events)).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let edges = s.sample_edges(&mut rng, 200).unwrap();
    assert_eq!(edges.len(), 200);
    assert!(edges.iter().all(|e| e.rel == 1 && e.dst.index < 7));
    let nodes = s.sample_nodes(&mut rng, 1, 100);
    assert!(nodes.iter().all(|n| n.index < 7));
    let distinct: HashSet<u32> = nodes.iter().map(|n| n.index).collect();
    assert_eq!(
        distinct.len(),
        7,
        "uniform sampling over 100 draws reaches all 7 tweets"
    );
}

#[test]
fn the_last_record_of_a_partition_is_kept_with_its_offset_and_forgotten_on_reset() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let print = RecordPrint::of(1, Some(1_000), Some(b"user:a"), Some(b"{}"));
    let mut b = batch(vec![
        (0, 0, ev("user:a", 0, "user:b", 100, None)),
        (0, 1, ev("user:a", 0, "user:c", 100, None)),
    ]);
    b.last_records = vec![(0, print)];
    s.append(&b).unwrap();
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(2));
    assert_eq!(s.last_record("t", 0).unwrap(), Some(print));
    assert_ne!(
        RecordPrint::of(1, Some(1_000), Some(b"user:a"), Some(b"{ }")),
        print,
        "another payload at the same offset"
    );
    s.forget_partition("t", 0).unwrap();
    assert_eq!(s.stored_offset("t", 0).unwrap(), None);
    assert_eq!(s.last_record("t", 0).unwrap(), None);
    assert_eq!(s.edge_count(), 2, "the edges stay");
}

/// A store written in format 1 (one key per node, adjacency chunk and event id) opens as format
/// 2 with its nodes, edges, adjacency, offsets and remembered event ids.
#[test]
fn a_format_1_store_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("graph").unwrap();
        let stored = StoredSchema::from_schema(&schema());
        let encoded = bincode::serde::encode_to_vec(&stored, bincode_config()).unwrap();
        tree.insert(META_SCHEMA, encoded).unwrap();
        let user = |i: u32| NodeRef {
            node_type: 0,
            index: i,
        };
        for (i, id) in ["a", "b"].iter().enumerate() {
            let mut n = vec![b'N', 0, 0];
            n.extend_from_slice(id.as_bytes());
            tree.insert(n, &(i as u32).to_be_bytes()).unwrap();
            tree.insert(&keys::node_chunk_key(user(i as u32))[..], id.as_bytes())
                .unwrap();
        }
        tree.insert(b"C\0\0", &2u32.to_be_bytes()).unwrap();
        let e = Edge {
            src: user(0),
            rel: 0,
            dst: user(1),
            ts: 5,
            weight: 1.0,
        };
        tree.insert(&keys::edge_key(0)[..], &e.encode()[..])
            .unwrap();
        tree.insert(b"A-some-adjacency-", &[0u8; 14][..]).unwrap();
        tree.insert(b"Xe1", &5u64.to_be_bytes()).unwrap();
        let mut y = 5u64.to_be_bytes().to_vec();
        y.extend_from_slice(&2u16.to_be_bytes());
        y.extend_from_slice(b"e1");
        tree.insert(&keys::dedup_expiry_key(5, 0)[..], y).unwrap();
        tree.insert(META_NEXT_SEQ, &1u64.to_be_bytes()).unwrap();
        tree.insert(&keys::rel_count_key(0)[..], &1u64.to_be_bytes())
            .unwrap();
        tree.insert(keys::offset_key("t", 0), &1u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let s = open(dir.path());
    assert_eq!((s.node_count(0), s.edge_count()), (2, 1));
    assert_eq!(s.node_index(0, "b").unwrap(), Some(1));
    let b = NodeRef {
        node_type: 0,
        index: 1,
    };
    assert_eq!(s.node_id(b).unwrap().as_deref(), Some("b"));
    assert_eq!(s.degree(b, 0, Direction::In).unwrap(), 1);
    assert_eq!(s.stored_offset("t", 0).unwrap(), Some(1));
    for prefix in [b"N", b"A", b"X"] {
        assert_eq!(
            s.tree.scan_prefix(prefix).count(),
            0,
            "{prefix:?} keys left"
        );
    }
    let again = s
        .append(&batch(vec![(
            0,
            1,
            ev("user:a", 0, "user:c", 6, Some("e1")),
        )]))
        .unwrap();
    assert_eq!(again.duplicate_event_ids, 1, "the event ids came along");
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.node_count(0), 2, "upgraded once, reopened as format 3");
}

/// A format-2 store (before erasures) opens as it is, and is stamped format 3 (a format-2
/// build, which would not honour erasures, then refuses it).
#[test]
fn a_format_2_store_is_stamped_format_3() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.append(&batch(vec![(0, 0, ev("user:a", 0, "user:b", 1, None))]))
        .unwrap();
    drop(s);
    {
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("graph").unwrap();
        tree.insert(b"Mformat", &2u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let s = open(dir.path());
    assert_eq!((s.edge_count(), s.node_count(0)), (1, 2));
    drop(s);
    let db = sled::open(dir.path()).unwrap();
    let stamp = db.open_tree("graph").unwrap().get(b"Mformat").unwrap();
    assert_eq!(stamp.as_deref(), Some(&3u32.to_be_bytes()[..]));
}

#[test]
fn a_newer_store_format_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    {
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("graph").unwrap();
        tree.insert(b"Mformat", &9u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let err = GraphStore::open(dir.path(), &schema(), &StoreOptions::default())
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            StoreError::Format {
                found: 9,
                supported: 3,
                ..
            }
        ),
        "{err}"
    );
}

/// An unfollow removes the edge (stored before, or earlier in the same batch) from the adjacency,
/// the relation counts, the trainer's feed and the replay sample, and stays removed after reopen.
#[test]
fn a_delete_event_removes_its_edges_everywhere_and_for_good() {
    use crate::schema::EventOp;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let del = |src: &str, rel: RelId, dst: &str| Event {
        op: EventOp::Delete,
        ..ev(src, rel, dst, 5, None)
    };
    s.append(&batch(vec![
        (0, 0, ev("user:a", 0, "user:b", 1, None)),
        (0, 1, ev("user:a", 1, "tweet:t", 2, None)),
        (0, 2, ev("user:a", 0, "user:b", 3, None)),
    ]))
    .unwrap();
    let out = s
        .append(&batch(vec![
            (0, 3, ev("user:c", 0, "user:b", 4, None)),
            (0, 4, del("user:a", 0, "user:b")),
            (0, 5, del("user:c", 0, "user:b")),
            (0, 6, del("user:z", 0, "user:b")),
        ]))
        .unwrap();
    assert_eq!(
        (out.appended, out.deleted, out.deletes_unmatched),
        (1, 3, 1)
    );
    let check = |s: &GraphStore| {
        let b = NodeRef {
            node_type: 0,
            index: 1,
        };
        assert_eq!(s.degree(b, 0, Direction::In).unwrap(), 0);
        assert_eq!(s.relation_counts(), vec![0, 1]);
        assert_eq!((s.edge_count(), s.deleted_edges()), (4, 3));
        let live: Vec<u64> = s
            .edges_from(0, 10)
            .unwrap()
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(live, vec![1], "only the favorite is left to train");
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(3);
        assert!(s
            .sample_edges(&mut rng, 50)
            .unwrap()
            .iter()
            .all(|e| e.rel == 1));
    };
    check(&s);
    drop(s);
    check(&open(dir.path()));
}

/// An account deletion: every edge at either end of the node leaves the adjacency, the counts,
/// the feed and the sample; later events naming it are not stored; and all of it (and the
/// erasure order the trainer and publisher follow) survives a reopen.
#[test]
fn an_erased_node_loses_its_edges_and_later_events_naming_it_are_refused() {
    use crate::schema::EventOp;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let erase = |node: &str| Event {
        op: EventOp::Erase,
        ..ev(node, 0, node, 9, None)
    };
    s.append(&batch(vec![
        (0, 0, ev("user:a", 0, "user:b", 1, None)),
        (0, 1, ev("user:b", 0, "user:a", 2, None)),
        (0, 2, ev("user:a", 1, "tweet:t", 3, None)),
        (0, 3, ev("user:c", 1, "tweet:t", 4, None)),
        (0, 4, ev("user:a", 0, "user:a", 5, None)),
    ]))
    .unwrap();
    let out = s
        .append(&batch(vec![
            (0, 5, ev("user:c", 0, "user:a", 6, None)),
            (0, 6, erase("user:a")),
            (0, 7, erase("user:a")),
            (0, 8, ev("user:b", 0, "user:a", 7, None)),
            (0, 9, ev("user:c", 0, "user:b", 8, None)),
            (0, 10, erase("user:never-seen")),
        ]))
        .unwrap();
    assert_eq!(
        (out.appended, out.deleted, out.erased, out.erased_refused),
        (2, 5, 2, 1),
        "a's four stored edges (the self-loop once) and the batch's c→a; b→a refused"
    );
    let a = NodeRef {
        node_type: 0,
        index: 0,
    };
    let check = |s: &GraphStore| {
        assert!(s.is_erased(a));
        assert_eq!(s.erased_count(), 2);
        assert_eq!(s.erasures_since(0)[0], a);
        assert_eq!(s.erasures_since(1).len(), 1);
        for dir in [Direction::In, Direction::Out] {
            assert_eq!(s.degree(a, 0, dir).unwrap(), 0);
            assert_eq!(s.degree(a, 1, dir).unwrap(), 0);
        }
        assert_eq!(s.relation_counts(), vec![1, 1], "c→b and c→t are left");
        let live: Vec<u64> = s
            .edges_from(0, 100)
            .unwrap()
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(live, vec![3, 6]);
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(3);
        assert!(s
            .sample_edges(&mut rng, 50)
            .unwrap()
            .iter()
            .all(|e| e.src != a && e.dst != a));
    };
    check(&s);
    // Refused after a reopen too.
    drop(s);
    let s = open(dir.path());
    check(&s);
    let out = s
        .append(&batch(vec![(0, 11, ev("user:a", 1, "tweet:u", 10, None))]))
        .unwrap();
    assert_eq!((out.appended, out.erased_refused, out.new_nodes), (0, 1, 0));
}
