//! Proof of downstream value on an attribute the graph does not hold: a movie's genre, from a
//! version trained **without** the knowledge graph's genre relations (`downstream --task genre`).
//!
//! MovieLens-100k's knowledge graph less every relation whose name mentions `genre`, then every
//! rating, are streamed in time order through a fresh store and the daemon's trainer, and one
//! version is published through the daemon's publisher and alignment, without Kafka. The movies
//! the version covers are split once (seeded) into a fitting half and a scored half; for each
//! genre asked for, a logistic regression says whether a movie has it. Without embeddings it has
//! what a catalogue team has anyway: the movie's number of ratings, its share of high ratings
//! (smoothed toward the global share), and its degree in the graph it was trained on. With
//! embeddings: the same plus the movie's published row (and its target bias when its type has
//! one). Both are chosen and fitted as in [`crate::downstream::measure_downstream`].

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::downstream::{fit_and_score, publish_one, Counts};
use crate::downstream::{DownstreamOptions, ModelFigures};
use crate::movielens::{movielens_stream, type_index};
use twhin_stream::config::Config;
use twhin_stream::offline::{append_events, drain, movielens_genres, run_dir, Dataset};
use twhin_stream::store::GraphStore;

/// The seed of the movies' split into a fitting and a scored half.
const SPLIT_SEED: u64 = 7;

/// One genre's downstream models on the scored half.
#[derive(Debug, Clone, Serialize)]
pub struct GenreFigures {
    pub genre: String,
    /// Share of the scored movies with the genre.
    pub positive_share: f64,
    pub without_embeddings: ModelFigures,
    pub with_embeddings: ModelFigures,
}

/// What `downstream --task genre` prints.
#[derive(Debug, Clone, Serialize)]
pub struct GenreReport {
    pub dataset: String,
    pub task: String,
    /// Relations left out of the trained graph (they name the label).
    pub left_out_relations: Vec<String>,
    pub version: u64,
    pub version_rows: u64,
    pub fit_movies: usize,
    pub scored_movies: usize,
    pub genres: Vec<GenreFigures>,
}

impl GenreReport {
    /// The table docs/measurements.md quotes.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} on {}: version {} ({} rows) trained without {}; {} movies fitted, {} scored",
            self.task,
            self.dataset,
            self.version,
            self.version_rows,
            self.left_out_relations.join(", "),
            self.fit_movies,
            self.scored_movies
        );
        let _ = writeln!(
            s,
            "{:<10} {:>6} | {:>8} {:>9} | {:>8} {:>9}",
            "genre", "share", "AUC w/o", "bal. w/o", "AUC with", "bal. with"
        );
        for g in &self.genres {
            let _ = writeln!(
                s,
                "{:<10} {:>6.3} | {:>8.4} {:>9.4} | {:>8.4} {:>9.4}",
                g.genre,
                g.positive_share,
                g.without_embeddings.auc,
                g.without_embeddings.balanced_accuracy,
                g.with_embeddings.auc,
                g.with_embeddings.balanced_accuracy
            );
        }
        s
    }
}

/// A movie: its id, its row in the version, its genres.
type Movie = (String, i64, Vec<String>);

/// The movies of `ml-100k.item` whose rows are among the version's first `covered`.
fn covered_movies(
    cfg: &Config,
    store: &GraphStore,
    movie_type: u16,
    covered: i64,
) -> anyhow::Result<Vec<Movie>> {
    let mut movies = Vec::new();
    for (node, movie_genres) in movielens_genres(&cfg.datasets.dir)? {
        let id = node.strip_prefix("movie:").unwrap_or(&node);
        if let Some(index) = store.node_index(movie_type, id)? {
            if i64::from(index) < covered {
                movies.push((id.to_owned(), i64::from(index), movie_genres));
            }
        }
    }
    Ok(movies)
}

/// The two models' features `(fitting half, scored half)`: the counts alone, and the counts
/// beside the version's rows.
struct Features<'a> {
    without: (&'a Tensor, &'a Tensor),
    with: (&'a Tensor, &'a Tensor),
}

/// Both models fitted for `genre` on the `fit` movies and scored on the `scored` ones.
fn genre_figures(
    genre: &str,
    fit: &[Movie],
    scored: &[Movie],
    features: &Features,
) -> anyhow::Result<GenreFigures> {
    let label = |part: &[Movie]| {
        let y: Vec<f64> = part
            .iter()
            .map(|(_, _, g)| f64::from(g.iter().any(|x| x == genre)))
            .collect();
        Tensor::from_slice(&y)
    };
    let (fit_y, scored_y) = (label(fit), label(scored));
    let positives = scored_y.sum(Kind::Double).double_value(&[]);
    anyhow::ensure!(
        positives > 0.0 && fit_y.sum(Kind::Double).double_value(&[]) > 0.0,
        "no movie of the split has the genre {genre:?}"
    );
    Ok(GenreFigures {
        genre: genre.to_owned(),
        positive_share: positives / scored.len() as f64,
        without_embeddings: fit_and_score(&[features.without], &fit_y, &scored_y),
        with_embeddings: fit_and_score(&[features.with], &fit_y, &scored_y),
    })
}

/// Stream the graph without its genre relations and every rating, publish one version, and fit
/// and score both models for each of `opts.genres`.
pub fn measure_genre_downstream(
    cfg: &Config,
    device: Device,
    opts: &DownstreamOptions,
) -> anyhow::Result<GenreReport> {
    let genres = &opts.genres;
    anyhow::ensure!(!genres.is_empty(), "--genres: name at least one genre");
    let dataset = Dataset::MovieLens100k;
    let dir = run_dir(cfg, dataset).join("downstream-genre");
    let (store, mut events, mut core, _) = movielens_stream(cfg, &dir, opts.limit, device)?;
    let schema = cfg.schema();
    let left_out: Vec<_> = (0..schema.relations().len() as u16)
        .filter(|&r| schema.relation(r).name.contains("genre"))
        .collect();
    anyhow::ensure!(
        !left_out.is_empty(),
        "the MovieLens schema has no genre relation to leave out"
    );
    events.retain(|e| !left_out.contains(&e.rel));
    let rel = |name: &str| {
        schema
            .rel_id(name)
            .ok_or_else(|| anyhow::anyhow!("the MovieLens schema has no relation {name:?}"))
    };
    let (high_rel, low_rel) = (rel("rated_high")?, rel("rated_low")?);
    let movie_type = type_index(&store, "movie")? as u16;

    let p = &cfg.train;
    let mut counts = Counts::default();
    for (at, chunk) in events.chunks(p.batch_size).enumerate() {
        for e in chunk {
            let rating = e.rel == high_rel || e.rel == low_rel;
            counts.add(e, e.rel == high_rel, rating, movie_type);
        }
        append_events(
            &store,
            "downstream-genre",
            chunk,
            p.batch_size,
            (at * p.batch_size) as i64,
        )?;
        drain(&mut core, &store)?;
    }
    let (prepared, view) = publish_one(cfg, &store, &mut core)?;

    // The movies the version covers, with their genres, split once.
    let table = &view.tables[movie_type as usize];
    let mut movies = covered_movies(cfg, &store, movie_type, table.size()[0])?;
    anyhow::ensure!(
        movies.len() >= 100,
        "only {} movies are in the version",
        movies.len()
    );
    movies.shuffle(&mut SmallRng::seed_from_u64(SPLIT_SEED));
    let fit_n = movies.len() / 2;
    let baseline = |part: &[Movie]| {
        let flat: Vec<f64> = part
            .iter()
            .flat_map(|(id, _, _)| counts.movie_features(id))
            .collect();
        Tensor::from_slice(&flat).view([part.len() as i64, 3])
    };
    let rows = |part: &[Movie]| {
        let idx: Vec<i64> = part.iter().map(|(_, i, _)| *i).collect();
        let idx = Tensor::from_slice(&idx);
        let mut columns = vec![table.index_select(0, &idx)];
        if let Some(b) = view.biases[movie_type as usize]
            .as_ref()
            .filter(|b| b.numel() > 0)
        {
            columns.push(b.index_select(0, &idx).unsqueeze(1));
        }
        Tensor::cat(&columns, 1).to_kind(Kind::Double)
    };
    let (fit, scored) = movies.split_at(fit_n);
    let (fit_base, scored_base) = (baseline(fit), baseline(scored));
    let fit_with = Tensor::cat(&[&fit_base, &rows(fit)], 1);
    let scored_with = Tensor::cat(&[&scored_base, &rows(scored)], 1);
    let features = Features {
        without: (&fit_base, &scored_base),
        with: (&fit_with, &scored_with),
    };
    let figures = genres
        .iter()
        .map(|genre| genre_figures(genre, fit, scored, &features))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(GenreReport {
        dataset: dataset.name().into(),
        task: "movie genre, from a graph without the genre relations".into(),
        left_out_relations: left_out
            .iter()
            .map(|&r| schema.relation(r).name.clone())
            .collect(),
        version: prepared.marker.version,
        version_rows: prepared.marker.rows,
        fit_movies: fit.len(),
        scored_movies: scored.len(),
        genres: figures,
    })
}
