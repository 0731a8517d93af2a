use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::*;
use crate::config::Config;
use crate::schema::decode_event;

fn config(file: Option<&str>) -> Config {
    match file {
        None => Config::from_toml("").unwrap(),
        Some(name) => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
            Config::from_toml(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        }
    }
}

fn workload(nodes: u64, edges: u64, seed: u64) -> Workload {
    Workload::new(
        &config(None).schema(),
        SyntheticSpec::new(nodes, edges, seed),
    )
    .unwrap()
}

#[test]
fn a_seed_gives_the_same_stream_and_another_seed_another() {
    let a: Vec<ReplayEvent> = workload(20_000, 50_000, 7).events().collect();
    let b: Vec<ReplayEvent> = workload(20_000, 50_000, 7).events().collect();
    let c: Vec<ReplayEvent> = workload(20_000, 50_000, 8).events().collect();
    assert_eq!(a.len(), 50_000);
    assert_eq!(a, b);
    let same = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| (&x.src, &x.rel, &x.dst) == (&y.src, &y.rel, &y.dst))
        .count();
    assert!(same < 5_000, "{same} of 50,000 edges alike across seeds");
}

#[test]
fn the_top_percent_of_nodes_hold_a_large_share_of_the_edges() {
    let w = workload(100_000, 500_000, 1);
    let mut degree: HashMap<(usize, u64), u64> = HashMap::new();
    for e in w.edges() {
        *degree.entry((e.src_type, e.src)).or_default() += 1;
        *degree.entry((e.dst_type, e.dst)).or_default() += 1;
    }
    let mut d: Vec<u64> = degree.into_values().collect();
    d.sort_unstable_by(|a, b| b.cmp(a));
    let top = d.len() / 100;
    let share = d[..top].iter().sum::<u64>() as f64 / d.iter().sum::<u64>() as f64;
    assert!(
        share > 0.35,
        "top 1% of {} nodes hold {share:.3} of the endpoints",
        d.len()
    );
}

#[test]
fn most_edges_stay_in_their_community() {
    let w = workload(100_000, 200_000, 3);
    assert_eq!(w.communities(), 100);
    let inside = w
        .edges()
        .filter(|e| w.community(e.src) == w.community(e.dst))
        .count();
    let share = inside as f64 / 200_000.0;
    // affinity 0.9, plus the 1/100 of the others that land in it by chance.
    assert!((0.88..0.93).contains(&share), "in-community share {share}");
}

#[test]
fn event_ids_are_unique_and_times_increase() {
    let w = workload(20_000, 100_000, 5);
    let mut ids = HashSet::new();
    let mut last = 0;
    for e in w.events() {
        let ts = e.ts.unwrap();
        assert!(ts > last, "{ts} after {last}");
        last = ts;
        assert!(ids.insert(e.event_id));
    }
    assert!(ids.contains("syn-5-0") && ids.contains("syn-5-99999"));
}

#[test]
fn new_nodes_arrive_until_the_end() {
    let w = workload(20_000, 100_000, 2);
    let mut seen = HashSet::new();
    let mut new_in_last_tenth = 0;
    for e in w.edges() {
        let fresh = seen.insert((e.src_type, e.src)) | seen.insert((e.dst_type, e.dst));
        if fresh && e.n >= 90_000 {
            new_in_last_tenth += 1;
        }
    }
    assert!(new_in_last_tenth > 1_000, "{new_in_last_tenth}");
    let born: u64 = w.sizes().iter().map(|s| s.nodes - s.initial).sum();
    assert!(
        seen.len() as u64 > born,
        "{} named, {born} born",
        seen.len()
    );
}

#[test]
fn every_event_decodes_against_its_config_and_uses_only_its_relations() {
    for file in [
        None,
        Some("config/twhin-follow.toml"),
        Some("config/twhin-engagement.toml"),
    ] {
        let cfg = config(file);
        let (schema, limits) = (cfg.schema(), cfg.decode_limits());
        let w = Workload::new(&schema, SyntheticSpec::new(50_000, 50_000, 9)).unwrap();
        let mut per_relation: HashMap<String, u64> = HashMap::new();
        for e in w.events() {
            let ts = e.ts.unwrap();
            decode_event(&schema, &limits, Some(e.payload().as_bytes()), ts)
                .unwrap_or_else(|err| panic!("{file:?}: {}: {err}", e.payload()));
            *per_relation.entry(e.rel).or_default() += 1;
        }
        for r in schema.relations() {
            assert!(
                per_relation.get(&r.name).copied().unwrap_or(0) > 0,
                "{file:?}: no {} edge: {per_relation:?}",
                r.name
            );
        }
        assert_eq!(per_relation.len(), schema.relations().len(), "{file:?}");
    }
}

#[test]
fn the_two_configs_are_the_papers_graphs() {
    let follow = config(Some("config/twhin-follow.toml"));
    assert_eq!(
        follow.schema.node_types,
        ["user", "advertiser", "ad"].map(String::from)
    );
    let engagement = config(Some("config/twhin-engagement.toml"));
    let rels: Vec<&str> = engagement
        .schema
        .relations
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(!rels.contains(&"follows"), "{rels:?}");
    for r in [
        "favorites",
        "retweets",
        "replies",
        "authors",
        "clicks",
        "promotes",
        "searches",
    ] {
        assert!(rels.contains(&r), "{r} missing from {rels:?}");
    }
}

#[test]
fn births_name_new_nodes_by_their_relation() {
    let w = workload(20_000, 40_000, 4);
    let mut seen = HashSet::new();
    for e in w.edges() {
        let new_src = seen.insert((e.src_type, e.src));
        let new_dst = seen.insert((e.dst_type, e.dst));
        if !e.birth {
            continue;
        }
        match w.relation_name(e.rel) {
            "follows" | "promotes" if new_src => {}
            "authors" | "promotes" | "searches" if new_dst => {}
            other => panic!("birth by {other} names no new node: {e:?}"),
        }
    }
}

#[test]
fn the_folder_holds_the_same_stream_for_replay() {
    let w = workload(10_000, 20_000, 6);
    let dir = tempfile::tempdir().unwrap();
    let summary = w.write_dir(dir.path()).unwrap();
    assert_eq!(summary.events, 20_000);
    let files = crate::offline::read_splits(
        dir.path(),
        crate::offline::DataSource::Dir(dir.path().to_owned()),
        &["all".to_owned()],
    )
    .unwrap();
    assert_eq!(
        files.iter().map(|f| f.rows.len()).collect::<Vec<_>>(),
        [17_000, 1_000, 2_000]
    );
    let rows = files.iter().flat_map(|f| &f.rows);
    for (row, e) in rows.zip(w.events()) {
        assert_eq!(
            (&row.src, &row.rel, &row.dst, row.ts),
            (&e.src, &e.rel, &e.dst, e.ts)
        );
    }
}

#[test]
fn bad_specs_are_refused() {
    let schema = config(None).schema();
    let spec = SyntheticSpec::new(1_000, 0, 1);
    assert!(matches!(
        Workload::new(&schema, spec),
        Err(SyntheticError::NoEdges)
    ));
    let spec = SyntheticSpec::new(10, 100, 1);
    assert!(matches!(
        Workload::new(&schema, spec),
        Err(SyntheticError::TooFewNodes { .. })
    ));
    let spec = SyntheticSpec {
        affinity: 1.5,
        ..SyntheticSpec::new(1_000, 100, 1)
    };
    assert!(matches!(
        Workload::new(&schema, spec),
        Err(SyntheticError::BadAffinity(_))
    ));
}
