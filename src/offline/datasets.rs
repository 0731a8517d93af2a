//! The real datasets (fetched by `.ci/setup`, never committed) as engagement events.
//!
//! * UMLS, Nations, Kinships: pykeen 1.11.1's splits, `<dir>/<name>/{train,valid,test}.txt`
//!   (tab-separated head, relation, tail). One node type per dataset (see `config/<name>.toml`).
//!   They have no time, so file order is replay order.
//! * MovieLens-100k: recbole 1.2.1's `ml-100k` atomic files in `<dir>/ml-100k/`. The static
//!   knowledge graph comes first (stamped with the first rating's time), then the ratings in time
//!   order: rating >= 4 is `rated_high`, <= 3 `rated_low`. Items linked to a KG entity keep their
//!   MovieLens id (`movie:<item>`); other KG entities are `entity:<freebase mid>`. Splits are by
//!   time: `train` is the KG and the first 85% of ratings, `valid` the next 5%, `test` the last
//!   10% (so test holds users and movies that train never saw).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataset {
    Umls,
    Nations,
    Kinships,
    MovieLens100k,
}

impl Dataset {
    pub const ALL: [Dataset; 4] = [
        Dataset::Umls,
        Dataset::Nations,
        Dataset::Kinships,
        Dataset::MovieLens100k,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dataset::Umls => "umls",
            Dataset::Nations => "nations",
            Dataset::Kinships => "kinships",
            Dataset::MovieLens100k => "movielens-100k",
        }
    }

    /// The node type of the single-type knowledge graphs.
    fn kg_node_type(self) -> &'static str {
        match self {
            Dataset::Umls => "concept",
            Dataset::Nations => "nation",
            Dataset::Kinships => "person",
            Dataset::MovieLens100k => "entity",
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Dataset::MovieLens100k => "ml-100k",
            other => other.name(),
        }
    }

    /// The config file holding this dataset's schema.
    pub fn config_file(self) -> PathBuf {
        PathBuf::from(format!("config/{}.toml", self.name()))
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dataset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Dataset::ALL
            .into_iter()
            .find(|d| d.name() == s || (s == "ml-100k" && *d == Dataset::MovieLens100k))
            .ok_or_else(|| {
                format!(
                    "unknown dataset {s:?}; expected one of {}",
                    Dataset::ALL.map(|d| d.name()).join(", ")
                )
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source} (run .ci/setup to fetch the datasets, or set datasets.dir)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Format {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// One event to produce: its key (the source node) and JSON payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayEvent {
    pub src: String,
    pub rel: String,
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    pub event_id: String,
}

impl ReplayEvent {
    pub fn payload(&self) -> String {
        serde_json::to_string(self).expect("plain strings and numbers serialise")
    }
}

/// A labelled triple of a knowledge-graph split.
pub type Triple = (String, String, String);

fn read(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Tab-separated rows of `path` with exactly `n` fields, skipping `skip` header lines.
fn rows(path: &Path, n: usize, skip: usize) -> Result<Vec<(usize, Vec<String>)>, DatasetError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(skip) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<String> = line.split('\t').map(str::to_owned).collect();
        if fields.len() != n {
            return Err(DatasetError::Format {
                path: path.to_owned(),
                line: i + 1,
                problem: format!("expected {n} tab-separated fields, found {}", fields.len()),
            });
        }
        out.push((i + 1, fields));
    }
    Ok(out)
}

/// One split (`train`, `valid`, `test`) of UMLS, Nations or Kinships.
pub fn kg_split(dir: &Path, dataset: Dataset, split: &str) -> Result<Vec<Triple>, DatasetError> {
    let path = dir.join(dataset.folder()).join(format!("{split}.txt"));
    Ok(rows(&path, 3, 0)?
        .into_iter()
        .map(|(_, mut f)| {
            let t = f.pop().expect("3 fields");
            let r = f.pop().expect("3 fields");
            let h = f.pop().expect("3 fields");
            (h, r, t)
        })
        .collect())
}

/// The events of a dataset in replay order. `splits` applies to the knowledge-graph datasets.
pub fn replay_events(
    dir: &Path,
    dataset: Dataset,
    splits: &[String],
) -> Result<Vec<ReplayEvent>, DatasetError> {
    match dataset {
        Dataset::MovieLens100k => {
            let all = movielens_events(&dir.join(dataset.folder()))?;
            let ratings_start = all
                .iter()
                .position(|e| e.rel.starts_with("rated_"))
                .unwrap_or(all.len());
            let n = all.len() - ratings_start;
            let (train_end, valid_end) =
                (ratings_start + n * 85 / 100, ratings_start + n * 90 / 100);
            let mut out = Vec::new();
            for split in splits {
                let range = match split.as_str() {
                    "all" => 0..all.len(),
                    "train" => 0..train_end,
                    "valid" => train_end..valid_end,
                    "test" => valid_end..all.len(),
                    other => return Err(unknown_split(other)),
                };
                out.extend_from_slice(&all[range]);
            }
            Ok(out)
        }
        kg => {
            let ty = kg.kg_node_type();
            let mut out = Vec::new();
            let all = ["train".to_owned(), "valid".to_owned(), "test".to_owned()];
            let splits = if splits.iter().any(|s| s == "all") {
                &all[..]
            } else {
                splits
            };
            for split in splits {
                if !all.contains(split) {
                    return Err(unknown_split(split));
                }
                for (i, (h, r, t)) in kg_split(dir, kg, split)?.into_iter().enumerate() {
                    out.push(ReplayEvent {
                        src: format!("{ty}:{h}"),
                        rel: r,
                        dst: format!("{ty}:{t}"),
                        ts: None,
                        event_id: format!("{}:{split}:{i}", kg.name()),
                    });
                }
            }
            Ok(out)
        }
    }
}

fn unknown_split(name: &str) -> DatasetError {
    DatasetError::Format {
        path: PathBuf::from("--splits"),
        line: 0,
        problem: format!("unknown split {name:?}; expected all, train, valid or test"),
    }
}

/// A MovieLens-100k user's demographics (`ml-100k.user`), the labels of the downstream-stability
/// measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovieLensUser {
    /// The node id, `user:<id>` as in the events.
    pub node: String,
    pub age: u32,
    /// `M` or `F`.
    pub gender: String,
    pub occupation: String,
}

/// Every user of `<dir>/ml-100k/ml-100k.user` (recbole's atomic file: id, age, gender,
/// occupation, zip code, tab-separated, one header line).
pub fn movielens_users(dir: &Path) -> Result<Vec<MovieLensUser>, DatasetError> {
    let path = dir
        .join(Dataset::MovieLens100k.folder())
        .join("ml-100k.user");
    rows(&path, 5, 1)?
        .into_iter()
        .map(|(line, f)| {
            let age = f[1].parse().map_err(|_| DatasetError::Format {
                path: path.clone(),
                line,
                problem: format!("age {:?} is not a number", f[1]),
            })?;
            Ok(MovieLensUser {
                node: format!("user:{}", f[0]),
                age,
                gender: f[2].clone(),
                occupation: f[3].clone(),
            })
        })
        .collect()
}

/// MovieLens-100k movies and their genres (`ml-100k.item`: id, title, year, genres separated by
/// spaces), as `(movie:<id>, genres)`.
pub fn movielens_genres(dir: &Path) -> Result<Vec<(String, Vec<String>)>, DatasetError> {
    let path = dir
        .join(Dataset::MovieLens100k.folder())
        .join("ml-100k.item");
    Ok(rows(&path, 4, 1)?
        .into_iter()
        .map(|(_, f)| {
            let genres = f[3].split_whitespace().map(str::to_owned).collect();
            (format!("movie:{}", f[0]), genres)
        })
        .collect())
}

fn movielens_events(dir: &Path) -> Result<Vec<ReplayEvent>, DatasetError> {
    let link: HashMap<String, String> = rows(&dir.join("ml-100k.link"), 2, 1)?
        .into_iter()
        .map(|(_, mut f)| {
            let entity = f.pop().expect("2 fields");
            (entity, f.pop().expect("2 fields"))
        })
        .collect();
    let node = |entity: &str| match link.get(entity) {
        Some(item) => format!("movie:{item}"),
        None => format!("entity:{entity}"),
    };

    let inter_path = dir.join("ml-100k.inter");
    let mut ratings = Vec::new();
    for (line, f) in rows(&inter_path, 4, 1)? {
        let bad = |what: &str| DatasetError::Format {
            path: inter_path.clone(),
            line,
            problem: format!("{what} is not a number"),
        };
        let rating: f64 = f[2].parse().map_err(|_| bad("rating"))?;
        let ts: f64 = f[3].parse().map_err(|_| bad("timestamp"))?;
        ratings.push((ts as u64 * 1000, f[0].clone(), f[1].clone(), rating, line));
    }
    // Stable: equal timestamps keep file order.
    ratings.sort_by_key(|r| r.0);
    let first_ts = ratings.first().map(|r| r.0);

    let mut out = Vec::with_capacity(ratings.len() + 92_000);
    for (line, f) in rows(&dir.join("ml-100k.kg"), 3, 1)? {
        out.push(ReplayEvent {
            src: node(&f[0]),
            rel: f[1].clone(),
            dst: node(&f[2]),
            ts: first_ts,
            event_id: format!("ml-100k:kg:{line}"),
        });
    }
    for (ts, user, item, rating, line) in ratings {
        out.push(ReplayEvent {
            src: format!("user:{user}"),
            rel: if rating >= 4.0 {
                "rated_high"
            } else {
                "rated_low"
            }
            .into(),
            dst: format!("movie:{item}"),
            ts: Some(ts),
            event_id: format!("ml-100k:inter:{line}"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn movielens_puts_the_kg_first_and_ratings_in_time_order() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("ml-100k");
        write(
            &d,
            "ml-100k.link",
            "item_id:token\tentity_id:token\n7\tm.seven\n",
        );
        write(
            &d,
            "ml-100k.kg",
            "head_id:token\trelation_id:token\ttail_id:token\nm.seven\tfilm.film.genre\tm.drama\n",
        );
        write(
            &d,
            "ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t7\t5\t300\n2\t9\t3\t100\n3\t7\t4\t300\n",
        );
        let ev = replay_events(root.path(), Dataset::MovieLens100k, &["all".into()]).unwrap();
        let train = replay_events(root.path(), Dataset::MovieLens100k, &["train".into()]).unwrap();
        let test = replay_events(root.path(), Dataset::MovieLens100k, &["test".into()]).unwrap();
        assert_eq!(
            (train.len(), test.len()),
            (3, 1),
            "KG + 85% of 3 ratings; the last rating"
        );
        assert_eq!(test[0].src, "user:3");
        let got: Vec<(&str, &str, &str, Option<u64>)> = ev
            .iter()
            .map(|e| (e.src.as_str(), e.rel.as_str(), e.dst.as_str(), e.ts))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "movie:7",
                    "film.film.genre",
                    "entity:m.drama",
                    Some(100_000)
                ),
                ("user:2", "rated_low", "movie:9", Some(100_000)),
                ("user:1", "rated_high", "movie:7", Some(300_000)),
                ("user:3", "rated_high", "movie:7", Some(300_000)),
            ]
        );
        let ids: std::collections::HashSet<_> = ev.iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(ids.len(), ev.len(), "event ids are unique");
        assert_eq!(
            ev[1].payload(),
            r#"{"src":"user:2","rel":"rated_low","dst":"movie:9","ts":100000,"event_id":"ml-100k:inter:3"}"#
        );
    }

    #[test]
    fn movielens_users_carry_their_labels() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("ml-100k");
        write(
            &d,
            "ml-100k.user",
            "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n",
        );
        let users = movielens_users(root.path()).unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(
            users[1],
            MovieLensUser {
                node: "user:2".into(),
                age: 53,
                gender: "F".into(),
                occupation: "other".into()
            }
        );
        write(&d, "ml-100k.user", "header\n3\tx\tM\tother\t1\n");
        let err = movielens_users(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("ml-100k.user:2") && err.contains("age"),
            "{err}"
        );
    }

    #[test]
    fn kg_splits_replay_in_file_order_and_bad_rows_name_the_line() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("umls"),
            "train.txt",
            "a\tr1\tb\nb\tr2\tc\n",
        );
        write(&root.path().join("umls"), "valid.txt", "a\tr2\tc\n");
        let ev = replay_events(
            root.path(),
            Dataset::Umls,
            &["train".into(), "valid".into()],
        )
        .unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(
            (ev[2].src.as_str(), ev[2].dst.as_str()),
            ("concept:a", "concept:c")
        );
        assert!(ev.iter().all(|e| e.ts.is_none()));
        write(&root.path().join("umls"), "test.txt", "a\tr1\n");
        let err = replay_events(root.path(), Dataset::Umls, &["test".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.txt:1"), "{err}");
        let missing = replay_events(root.path(), Dataset::Nations, &["train".into()])
            .unwrap_err()
            .to_string();
        assert!(missing.contains(".ci/setup"), "{missing}");
        assert_eq!("ml-100k".parse::<Dataset>(), Ok(Dataset::MovieLens100k));
        assert!("imdb".parse::<Dataset>().is_err());
    }
}
