//! What several benches build the same way. Each bench includes this with `mod common;` and
//! uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use twhin_stream::config::Config;
use twhin_stream::schema::{Event, NodeKey};
use twhin_stream::store::{AppendBatch, GraphStore, StoreOptions};

/// The checkout whose `config/` and `data/` a bench reads: the working directory when it holds
/// `config/default.toml` (cargo runs benches from the package root; `benches/gpu.sh` runs a
/// bench binary built elsewhere from its checkout's root), else the one the bench was built in.
pub fn repo_root() -> PathBuf {
    let cwd = PathBuf::from(".");
    if cwd.join("config/default.toml").is_file() {
        cwd
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }
}

/// An environment variable parsed, or `default` when unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A store at `dir` whose type 0 (`user`) holds `nodes` users (`u0`, `u1`, …), one `follows`
/// edge per two, appended in batches of 20,000 events.
pub fn store_with_users(cfg: &Config, dir: &Path, nodes: i64) -> GraphStore {
    let schema = cfg.schema();
    let store = GraphStore::open(dir, &schema, &StoreOptions::default()).expect("store");
    let follows = schema
        .relations()
        .iter()
        .position(|r| r.name == "follows")
        .expect("follows") as u16;
    let user = |i: i64| NodeKey {
        node_type: 0,
        id: format!("u{i}"),
    };
    let mut offset = 0i64;
    for chunk in (0..(nodes + 1) / 2).collect::<Vec<_>>().chunks(20_000) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|&i| Event {
                op: Default::default(),
                src: user(2 * i),
                rel: follows,
                dst: user(2 * i + 1),
                ts: 1_732_190_400_000 + i as u64,
                weight: 1.0,
                event_id: None,
            })
            .collect();
        let n = events.len() as i64;
        store
            .append(&AppendBatch::from_events("bench", offset, events))
            .expect("append");
        offset += n;
    }
    store
}
