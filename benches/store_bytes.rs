//! What the store costs per edge on disk, and how fast it makes a TwHIN-shaped stream durable.
//!
//! The synthetic workload of `twhin-stream replay synthetic` (the default Twitter schema,
//! `STORE_NODES` nodes, default 100,000, and `STORE_EDGES` edges, default 1,000,000; the issue's
//! figure is 1M / 10M), every event with an id, is decoded from its JSON payload as ingest does
//! and appended in batches of `STORE_BATCH` (default 5,000) events: one atomic, flushed
//! [`GraphStore::append`] each, dedup on. The store is then closed and its folder measured
//! (`du -sb`: the dedup chunks included), then opened again (what a restart costs: the interner,
//! adjacency and dedup index rebuilt).
//!
//! Run with `STORE_NODES=1000000 STORE_EDGES=10000000 cargo bench --bench store_bytes`. Prints
//! one JSON line: `edges`, `nodes`, `bytes`, `bytes_per_edge`, `append_edges_per_s`,
//! `reopen_s`. Under `cargo test` (no `--bench` argument) it runs 20,000 edges.

mod common;

use std::path::Path;
use std::time::Instant;

use common::env_or;
use twhin_stream::config::Config;
use twhin_stream::offline::synthetic::{SyntheticSpec, Workload};
use twhin_stream::schema::decode_event;
use twhin_stream::store::{AppendBatch, GraphStore, SourcedEvent, StoreOptions};

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let edges: u64 = if benching {
        env_or("STORE_EDGES", 1_000_000)
    } else {
        20_000
    };
    let nodes: u64 = env_or("STORE_NODES", (edges / 10).max(1_000));
    let batch_size: usize = env_or("STORE_BATCH", 5_000);
    let cfg = Config::load(None).expect("default config loads");
    let (schema, limits) = (cfg.schema(), cfg.decode_limits());
    let workload = Workload::new(&schema, SyntheticSpec::new(nodes, edges, 7)).expect("workload");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    let opts = StoreOptions::default();
    let store = GraphStore::open(&path, &schema, &opts).expect("store opens");

    let started = Instant::now();
    let mut batch = Vec::with_capacity(batch_size);
    let append = |batch: &mut Vec<SourcedEvent>| {
        let b = AppendBatch {
            topic: "twhin.engagements".into(),
            events: std::mem::take(batch),
            ..AppendBatch::default()
        };
        store.append(&b).expect("append");
    };
    for (offset, ev) in workload.events().enumerate() {
        let payload = ev.payload();
        let ts = ev.ts.unwrap_or(0);
        let event = decode_event(&schema, &limits, Some(payload.as_bytes()), ts)
            .expect("synthetic events are valid");
        batch.push(SourcedEvent {
            partition: 0,
            offset: offset as i64,
            event,
        });
        if batch.len() == batch_size {
            append(&mut batch);
        }
    }
    if !batch.is_empty() {
        append(&mut batch);
    }
    let append_s = started.elapsed().as_secs_f64();
    let stored = store.edge_count();
    let node_count: u64 = (0..schema.node_types().len())
        .map(|t| store.node_count(t as u16) as u64)
        .sum();
    drop(store);
    let bytes = dir_bytes(&path);
    let reopened = Instant::now();
    let again = GraphStore::open(&path, &schema, &opts).expect("store reopens");
    let reopen_s = reopened.elapsed().as_secs_f64();
    assert_eq!(again.edge_count(), stored, "every edge back after reopen");
    println!(
        "{}",
        serde_json::json!({
            "edges": stored,
            "nodes": node_count,
            "bytes": bytes,
            "bytes_per_edge": (bytes as f64 / stored.max(1) as f64 * 10.0).round() / 10.0,
            "append_edges_per_s": (stored as f64 / append_s).round(),
            "reopen_s": (reopen_s * 1000.0).round() / 1000.0,
        })
    );
}
