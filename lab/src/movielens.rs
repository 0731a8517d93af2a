//! MovieLens-100k as the measurements stream it through the daemon's trainer, and the labels
//! their classifiers predict (a user's gender, a movie's genre).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use tch::Device;

use twhin_stream::config::Config;
use twhin_stream::offline::{self, stream_start, Dataset};
use twhin_stream::store::GraphStore;
use twhin_stream::train::TrainerCore;

/// What the frozen classifier predicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Label {
    /// A user's gender (`ml-100k.user`), from user embeddings.
    Gender,
    /// Whether a movie has this genre (`ml-100k.item`), from movie embeddings.
    Genre(String),
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Label, String> {
        match s.split_once(':') {
            None if s == "gender" => Ok(Label::Gender),
            Some(("genre", g)) if !g.is_empty() => Ok(Label::Genre(g.to_owned())),
            _ => Err(format!(
                "unknown label {s:?}; expected gender or genre:<name> (e.g. genre:Drama)"
            )),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Gender => f.write_str("gender"),
            Label::Genre(g) => write!(f, "genre:{g}"),
        }
    }
}

/// Labelled nodes: `(node type name, [(node id "type:id", label 0/1)])`.
pub fn labelled_nodes(
    cfg: &Config,
    label: &Label,
) -> anyhow::Result<(&'static str, Vec<(String, f64)>)> {
    let dir = &cfg.datasets.dir;
    Ok(match label {
        Label::Gender => (
            "user",
            offline::movielens_users(dir)?
                .into_iter()
                .map(|u| {
                    let female = if u.gender == "F" { 1.0 } else { 0.0 };
                    (u.node, female)
                })
                .collect(),
        ),
        Label::Genre(g) => {
            let movies = offline::movielens_genres(dir)?;
            if !movies.iter().any(|(_, gs)| gs.contains(g)) {
                anyhow::bail!("no movie of ml-100k.item has the genre {g:?}");
            }
            (
                "movie",
                movies
                    .into_iter()
                    .map(|(node, gs)| {
                        let has = if gs.contains(g) { 1.0 } else { 0.0 };
                        (node, has)
                    })
                    .collect(),
            )
        }
    })
}

/// MovieLens-100k as the stability, retrain and downstream scenarios stream it, in a fresh
/// store under `dir` with a fresh trainer: every split's events, the knowledge graph first, then
/// at most `limit` ratings in time order; and where the ratings start in the events.
pub fn movielens_stream(
    cfg: &Config,
    dir: &std::path::Path,
    limit: Option<usize>,
    device: Device,
) -> anyhow::Result<(
    GraphStore,
    Vec<twhin_stream::schema::Event>,
    TrainerCore,
    usize,
)> {
    let (store, mut events, core) = stream_start(
        cfg,
        Dataset::MovieLens100k,
        &["train", "valid", "test"],
        dir,
        cfg.trainer.clone(),
        device,
    )?;
    let schema = cfg.schema();
    let rated = |e: &twhin_stream::schema::Event| schema.relation(e.rel).name.starts_with("rated_");
    let kg_end = events.iter().position(rated).unwrap_or(events.len());
    let ratings = (events.len() - kg_end).min(limit.unwrap_or(usize::MAX));
    events.truncate(kg_end + ratings);
    Ok((store, events, core, kg_end))
}

/// The dense index of the node type `name` in the store's schema.
pub fn type_index(store: &GraphStore, name: &str) -> anyhow::Result<usize> {
    store
        .stored_schema()
        .node_types
        .iter()
        .position(|n| n == name)
        .ok_or_else(|| anyhow::anyhow!("the schema has no node type {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_print() {
        assert_eq!("gender".parse::<Label>(), Ok(Label::Gender));
        assert_eq!(
            "genre:Drama".parse::<Label>(),
            Ok(Label::Genre("Drama".into()))
        );
        assert!("genre:".parse::<Label>().is_err());
        assert!("age".parse::<Label>().is_err());
        assert_eq!(Label::Genre("Sci-Fi".into()).to_string(), "genre:Sci-Fi");
    }
}
