//! A small store for the stage's unit tests: users who like movies.

use std::path::Path;

use crate::schema::{Event, NodeKey, Schema, SchemaConfig};
use crate::store::{AppendBatch, GraphStore, StoreOptions};

/// A store under `dir` with node types `user` (0) and `movie` (1), relation `likes`, and one
/// edge per `(user, movie)` of `likes`, appended in order as one batch.
pub(super) fn likes_store(dir: &Path, likes: &[(&str, &str)]) -> GraphStore {
    let cfg: SchemaConfig = toml::from_str(
        r#"node_types = ["user", "movie"]
           relations = [{ name = "likes", src = "user", dst = "movie" }]"#,
    )
    .unwrap();
    let store =
        GraphStore::open(dir, &Schema::new(&cfg).unwrap(), &StoreOptions::default()).unwrap();
    let node = |node_type, id: &str| NodeKey {
        node_type,
        id: id.into(),
    };
    let events: Vec<Event> = (likes.iter())
        .map(|&(u, m)| Event {
            op: Default::default(),
            src: node(0, u),
            rel: 0,
            dst: node(1, m),
            ts: 0,
            weight: 1.0,
            event_id: None,
        })
        .collect();
    store
        .append(&AppendBatch::from_events("t", 0, events))
        .unwrap();
    store
}
