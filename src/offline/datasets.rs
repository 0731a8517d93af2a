//! Datasets as folders of split files, the one way every dataset is loaded.
//!
//! A dataset is a folder holding `train.tsv`, `valid.tsv` and `test.tsv`: one edge per line,
//! tab-separated `head relation tail`, optionally a fourth column with the event time in ms since
//! the epoch. A node is `type:id` (the type is the part before the first `:`); an id without a
//! type prefix belongs to the type `node`. Blank lines and lines starting with `#` are skipped.
//! The schema (node types, relations with their source and target types) is inferred from the
//! three files, in order of first appearance, unless the config gives one (a `[schema]` section);
//! then every row must fit it. A bad row names its file and line.
//!
//! The built-in datasets are such folders, made by `.ci/setup` in `datasets.dir/<name>/` from the
//! wheels' files (never committed), with their settings in `config/<name>.toml`:
//! * `umls`, `nations`, `kinships`: pykeen 1.11.1's splits, one node type each (`concept`,
//!   `nation`, `person`), no time, so file order is replay order.
//! * `movielens-100k`: recbole 1.2.1's `ml-100k`. The static knowledge graph comes first (stamped
//!   with the first rating's time), then the ratings in time order: rating >= 4 is `rated_high`,
//!   <= 3 `rated_low`. Items linked to a KG entity keep their MovieLens id (`movie:<item>`); other
//!   KG entities are `entity:<freebase mid>`. Splits are by time: `train` is the KG and the first
//!   85% of ratings, `valid` the next 5%, `test` the last 10% (so test holds users and movies that
//!   train never saw). The raw `ml-100k/` folder stays beside it for the users' and movies'
//!   labels ([`movielens_users`], [`movielens_genres`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use crate::config::Config;
use crate::schema::{OneOrMany, RelationDef, SchemaConfig};

/// The node type of an id without a `type:` prefix.
pub(super) const DEFAULT_NODE_TYPE: &str = "node";
/// The split files of a dataset folder, in replay order.
pub(super) const SPLITS: [&str; 3] = ["train", "valid", "test"];
/// recbole's raw MovieLens-100k folder inside `datasets.dir`.
const MOVIELENS_RAW: &str = "ml-100k";

/// A built-in dataset: a folder `datasets.dir/<name>/` made by `.ci/setup`, with its settings in
/// `config/<name>.toml`.
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

    /// The config file holding this dataset's schema and settings.
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
                    "unknown dataset {s:?}; expected one of {} (or --data DIR for a folder)",
                    Dataset::ALL.map(|d| d.name()).join(", ")
                )
            })
    }
}

/// Where a dataset's split files are: a built-in dataset or a folder the user brings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    Builtin(Dataset),
    Dir(PathBuf),
}

impl DataSource {
    /// The dataset's name: the built-in one's, or the folder's last component.
    pub fn name(&self) -> String {
        match self {
            DataSource::Builtin(d) => d.name().to_owned(),
            DataSource::Dir(dir) => dir
                .canonicalize()
                .unwrap_or_else(|_| dir.clone())
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".to_owned()),
        }
    }

    /// The folder holding `train.tsv`, `valid.tsv`, `test.tsv` (`datasets_dir` is `datasets.dir`).
    pub fn folder(&self, datasets_dir: &Path) -> PathBuf {
        match self {
            DataSource::Builtin(d) => datasets_dir.join(d.name()),
            DataSource::Dir(dir) => dir.clone(),
        }
    }

    /// The config file used when `--config` is not given.
    pub fn config_file(&self) -> Option<PathBuf> {
        match self {
            DataSource::Builtin(d) => Some(d.config_file()),
            DataSource::Dir(_) => None,
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Builtin(d) => write!(f, "{d}"),
            DataSource::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

impl From<Dataset> for DataSource {
    fn from(d: Dataset) -> Self {
        DataSource::Builtin(d)
    }
}

impl From<&DataSource> for DataSource {
    fn from(d: &DataSource) -> Self {
        d.clone()
    }
}

/// The `--dataset NAME` / `--data DIR` flags (exactly one).
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct DataArgs {
    /// A built-in dataset: umls, nations, kinships or movielens-100k (the folder
    /// `datasets.dir/<name>/`, with config/<name>.toml unless --config).
    #[arg(long)]
    pub dataset: Option<Dataset>,
    /// A folder of train.tsv, valid.tsv, test.tsv (`head<TAB>relation<TAB>tail[<TAB>ts_ms]`,
    /// nodes `type:id` or bare ids of type `node`); the schema is inferred from the files unless
    /// --config has a [schema] section.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

impl DataArgs {
    pub fn source(&self) -> DataSource {
        match (&self.dataset, &self.data) {
            (Some(d), _) => DataSource::Builtin(*d),
            (None, Some(dir)) => DataSource::Dir(dir.clone()),
            (None, None) => unreachable!("clap requires --dataset or --data"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source} (run .ci/setup to make the built-in datasets, or set datasets.dir)")]
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

fn format_error(path: &Path, line: usize, problem: impl Into<String>) -> DatasetError {
    DatasetError::Format {
        path: path.to_owned(),
        line,
        problem: problem.into(),
    }
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

/// One edge of a split file, its nodes as `type:id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub src: String,
    pub rel: String,
    pub dst: String,
    pub ts: Option<u64>,
    /// 1-based line in its file.
    pub line: usize,
}

/// One split file, read and checked row by row.
#[derive(Debug, Clone)]
pub(crate) struct SplitFile {
    pub split: String,
    pub path: PathBuf,
    pub rows: Vec<Row>,
}

impl SplitFile {
    /// The rows as events, with ids `<name>:<split>:<line>`.
    pub(crate) fn events(&self, name: &str) -> impl Iterator<Item = ReplayEvent> + '_ {
        let prefix = format!("{name}:{}", self.split);
        self.rows.iter().map(move |r| ReplayEvent {
            src: r.src.clone(),
            rel: r.rel.clone(),
            dst: r.dst.clone(),
            ts: r.ts,
            event_id: format!("{prefix}:{}", r.line),
        })
    }
}

fn read(path: &Path) -> Result<String, DatasetError> {
    std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A node-type or relation name the schema accepts: 1-64 characters, no whitespace or control
/// characters.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A node field as `type:id` (a bare id gets the type `node`).
fn node_field(path: &Path, line: usize, side: &str, field: &str) -> Result<String, DatasetError> {
    let (ty, id) = match field.split_once(':') {
        Some((ty, id)) => (ty, id),
        None => (DEFAULT_NODE_TYPE, field),
    };
    if field.is_empty() {
        return Err(format_error(path, line, format!("empty {side}")));
    }
    if !valid_name(ty) {
        return Err(format_error(
            path,
            line,
            format!("{side} {field:?}: node type {ty:?} is not a valid name (1-64 characters, no whitespace)"),
        ));
    }
    if id.is_empty() {
        return Err(format_error(
            path,
            line,
            format!("{side} {field:?}: empty id after the type"),
        ));
    }
    Ok(format!("{ty}:{id}"))
}

/// Parse a split file's text (see the module docs); `path` names it in errors.
pub(super) fn parse_split(path: &Path, split: &str, text: &str) -> Result<SplitFile, DatasetError> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() || raw.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = raw.split('\t').collect();
        if f.len() != 3 && f.len() != 4 {
            return Err(format_error(
                path,
                line,
                format!(
                    "expected 3 or 4 tab-separated fields (head, relation, tail[, ts in ms]), found {}",
                    f.len()
                ),
            ));
        }
        let rel = f[1];
        if !valid_name(rel) {
            return Err(format_error(
                path,
                line,
                format!("relation {rel:?} is not a valid name (1-64 characters, no whitespace)"),
            ));
        }
        let ts = match f.get(3) {
            None => None,
            Some(t) => Some(t.trim().parse::<u64>().map_err(|_| {
                format_error(
                    path,
                    line,
                    format!("timestamp {t:?} is not a non-negative integer (ms since the epoch)"),
                )
            })?),
        };
        rows.push(Row {
            src: node_field(path, line, "head", f[0])?,
            rel: rel.to_owned(),
            dst: node_field(path, line, "tail", f[2])?,
            ts,
            line,
        });
    }
    Ok(SplitFile {
        split: split.to_owned(),
        path: path.to_owned(),
        rows,
    })
}

/// Read one split (`train`, `valid` or `test`) of a dataset folder.
pub(super) fn read_split(folder: &Path, split: &str) -> Result<SplitFile, DatasetError> {
    let path = folder.join(format!("{split}.tsv"));
    parse_split(&path, split, &read(&path)?)
}

/// `splits` as split names in order: `all` is train, valid, test.
fn expand_splits(splits: &[String]) -> Result<Vec<&'static str>, DatasetError> {
    let mut out = Vec::new();
    for s in splits {
        if s == "all" {
            out.extend(SPLITS);
        } else {
            let known = SPLITS.iter().find(|k| **k == s.as_str()).ok_or_else(|| {
                format_error(
                    Path::new("--splits"),
                    0,
                    format!("unknown split {s:?}; expected all, train, valid or test"),
                )
            })?;
            out.push(*known);
        }
    }
    Ok(out)
}

/// The split files of a dataset, in the order `splits` names them (`all`: train, valid, test);
/// `datasets_dir` is `datasets.dir`.
pub(crate) fn read_splits(
    datasets_dir: &Path,
    source: impl Into<DataSource>,
    splits: &[String],
) -> Result<Vec<SplitFile>, DatasetError> {
    let folder = source.into().folder(datasets_dir);
    expand_splits(splits)?
        .into_iter()
        .map(|s| read_split(&folder, s))
        .collect()
}

/// The events of a dataset in replay order (the splits in the order given).
pub fn replay_events(
    datasets_dir: &Path,
    source: impl Into<DataSource>,
    splits: &[String],
) -> Result<Vec<ReplayEvent>, DatasetError> {
    let source = source.into();
    let name = source.name();
    Ok(read_splits(datasets_dir, &source, splits)?
        .iter()
        .flat_map(|f| f.events(&name).collect::<Vec<_>>())
        .collect())
}

/// The schema of a dataset's files: node types and relations in order of first appearance, each
/// relation with the source and target types it was seen with.
pub(super) fn infer_schema(files: &[SplitFile]) -> SchemaConfig {
    let mut types: Vec<String> = Vec::new();
    let mut rels: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut rel_index: HashMap<String, usize> = HashMap::new();
    let add = |list: &mut Vec<String>, t: &str| {
        if !list.iter().any(|x| x == t) {
            list.push(t.to_owned());
        }
    };
    for row in files.iter().flat_map(|f| &f.rows) {
        let st = row.src.split_once(':').expect("normalised").0;
        let dt = row.dst.split_once(':').expect("normalised").0;
        add(&mut types, st);
        add(&mut types, dt);
        let i = *rel_index.entry(row.rel.clone()).or_insert_with(|| {
            rels.push((row.rel.clone(), Vec::new(), Vec::new()));
            rels.len() - 1
        });
        add(&mut rels[i].1, st);
        add(&mut rels[i].2, dt);
    }
    let one_or_many = |mut v: Vec<String>| {
        if v.len() == 1 {
            OneOrMany::One(v.pop().expect("one"))
        } else {
            OneOrMany::Many(v)
        }
    };
    SchemaConfig {
        node_types: types,
        relations: rels
            .into_iter()
            .map(|(name, src, dst)| RelationDef {
                name,
                src: one_or_many(src),
                dst: one_or_many(dst),
            })
            .collect(),
    }
}

/// Whether a config file sets the schema (has a `[schema]` section).
pub(super) fn file_gives_schema(path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(value.contains_key("schema"))
}

/// Make `cfg`'s schema the dataset's: kept when `config_file` (the `--config` file, or the
/// built-in dataset's) has a `[schema]` section, otherwise inferred from the three split files.
pub fn apply_dataset_schema(
    cfg: &mut Config,
    source: &DataSource,
    config_file: Option<&Path>,
) -> anyhow::Result<()> {
    if let Some(path) = config_file {
        if file_gives_schema(path)? {
            return Ok(());
        }
    }
    let files = read_splits(&cfg.datasets.dir, source, &["all".to_owned()])?;
    let schema = infer_schema(&files);
    if schema.relations.is_empty() {
        anyhow::bail!(
            "{}: no edges in train.tsv, valid.tsv or test.tsv",
            source.folder(&cfg.datasets.dir).display()
        );
    }
    crate::schema::Schema::new(&schema).map_err(|e| {
        anyhow::anyhow!(
            "{}: the schema inferred from the files is invalid: {}: {}",
            source.folder(&cfg.datasets.dir).display(),
            e.key,
            e.problem
        )
    })?;
    cfg.schema = schema;
    Ok(())
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
            return Err(format_error(
                path,
                i + 1,
                format!("expected {n} tab-separated fields, found {}", fields.len()),
            ));
        }
        out.push((i + 1, fields));
    }
    Ok(out)
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
    let path = dir.join(MOVIELENS_RAW).join("ml-100k.user");
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
    let path = dir.join(MOVIELENS_RAW).join("ml-100k.item");
    Ok(rows(&path, 4, 1)?
        .into_iter()
        .map(|(_, f)| {
            let genres = f[3].split_whitespace().map(str::to_owned).collect();
            (format!("movie:{}", f[0]), genres)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// A folder with the three splits.
    fn folder(train: &str, valid: &str, test: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "train.tsv", train);
        write(root.path(), "valid.tsv", valid);
        write(root.path(), "test.tsv", test);
        root
    }

    fn all() -> Vec<String> {
        vec!["all".to_owned()]
    }

    fn cfg_for(root: &Path) -> Config {
        let mut cfg = Config::from_toml("").unwrap();
        cfg.datasets.dir = root.to_owned();
        cfg
    }

    #[test]
    fn typed_and_bare_ids_and_timestamps() {
        let d = folder(
            "# a comment\nuser:1\trated\tmovie:7\t1000\n\na\tlinks\tb\n",
            "user:2\trated\tmovie:7\t2000\n",
            "c\tlinks\tuser:1\n",
        );
        let src = DataSource::Dir(d.path().to_owned());
        let ev = replay_events(Path::new("unused"), &src, &all()).unwrap();
        let got: Vec<_> = ev
            .iter()
            .map(|e| (e.src.as_str(), e.rel.as_str(), e.dst.as_str(), e.ts))
            .collect();
        assert_eq!(
            got,
            vec![
                ("user:1", "rated", "movie:7", Some(1000)),
                ("node:a", "links", "node:b", None),
                ("user:2", "rated", "movie:7", Some(2000)),
                ("node:c", "links", "user:1", None),
            ]
        );
        let name = src.name();
        assert_eq!(
            ev[1].event_id,
            format!("{name}:train:4"),
            "ids name the line"
        );
        assert_eq!(ev[3].event_id, format!("{name}:test:1"));
        let test = replay_events(Path::new("unused"), &src, &["test".into()]).unwrap();
        assert_eq!(test.len(), 1);
        assert!(replay_events(Path::new("unused"), &src, &["dev".into()]).is_err());
    }

    #[test]
    fn schema_is_inferred_in_order_of_first_appearance() {
        let d = folder(
            "user:1\trated\tmovie:7\nmovie:7\tgenre\tentity:drama\n",
            "entity:x\tgenre\tmovie:8\n",
            "a\tlinks\tb\n",
        );
        let files = read_splits(
            Path::new("unused"),
            DataSource::Dir(d.path().into()),
            &all(),
        )
        .unwrap();
        let s = infer_schema(&files);
        assert_eq!(s.node_types, ["user", "movie", "entity", "node"]);
        let rels: Vec<_> = s
            .relations
            .iter()
            .map(|r| (r.name.as_str(), r.src.names(), r.dst.names()))
            .collect();
        assert_eq!(
            rels,
            vec![
                ("rated", &["user".to_owned()][..], &["movie".to_owned()][..]),
                (
                    "genre",
                    &["movie".to_owned(), "entity".to_owned()][..],
                    &["entity".to_owned(), "movie".to_owned()][..]
                ),
                ("links", &["node".to_owned()][..], &["node".to_owned()][..]),
            ]
        );
        assert!(matches!(s.relations[0].src, OneOrMany::One(_)));

        // The inferred schema becomes the config's, and every split decodes under it.
        let mut cfg = cfg_for(Path::new("unused"));
        let src = DataSource::Dir(d.path().into());
        apply_dataset_schema(&mut cfg, &src, None).unwrap();
        assert_eq!(cfg.schema, s);
        let events = crate::offline::split_events(&cfg, &cfg.schema(), &src, "all").unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(cfg.schema().type_name(events[3].src.node_type), "node");
        assert_eq!(events[3].src.id, "a");
    }

    #[test]
    fn bad_rows_name_their_file_and_line() {
        let cases = [
            ("a\tr\n", "expected 3 or 4 tab-separated fields"),
            ("a\tr\tb\tc\td\n", "found 5"),
            ("a\tr\tb\t12x\n", "timestamp \"12x\""),
            ("a\tr\tb\t-5\n", "timestamp \"-5\""),
            ("user:\tr\tb\n", "empty id"),
            (":x\tr\tb\n", "node type \"\""),
            ("a\t\tb\n", "relation \"\""),
            ("a\tr r\tb\n", "relation \"r r\""),
            ("\tr\tb\n", "empty head"),
        ];
        for (row, want) in cases {
            let d = folder(
                "ok\tr\tfine\n",
                "ok\tr\tfine\n",
                &format!("ok\tr\tfine\n{row}"),
            );
            let err = read_splits(
                Path::new("unused"),
                DataSource::Dir(d.path().into()),
                &all(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("test.tsv:2:") && err.contains(want),
                "{row:?}: {err}"
            );
        }
        let d = folder("a\tr\tb\n", "a\tr\tb\n", "a\tr\tb\n");
        std::fs::remove_file(d.path().join("valid.tsv")).unwrap();
        let err = read_splits(
            Path::new("unused"),
            DataSource::Dir(d.path().into()),
            &all(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("valid.tsv"), "{err}");
    }

    #[test]
    fn a_given_schema_is_kept_and_rows_outside_it_name_their_line() {
        let d = folder(
            "user:1\trated\tmovie:7\n",
            "user:1\trated\tmovie:8\nuser:2\tbought\tmovie:8\n",
            "movie:1\trated\tuser:1\n",
        );
        let conf = d.path().join("schema.toml");
        std::fs::write(
            &conf,
            "[schema]\nnode_types = [\"user\", \"movie\"]\nrelations = [{ name = \"rated\", src = \"user\", dst = \"movie\" }]\n",
        )
        .unwrap();
        let mut cfg =
            Config::load_from(Some(&conf), figment::providers::Env::prefixed("NONE_")).unwrap();
        let before = cfg.schema.clone();
        let src = DataSource::Dir(d.path().into());
        apply_dataset_schema(&mut cfg, &src, Some(&conf)).unwrap();
        assert_eq!(cfg.schema, before, "the config's schema wins");
        let schema = cfg.schema();
        assert_eq!(
            crate::offline::split_events(&cfg, &schema, &src, "train")
                .unwrap()
                .len(),
            1
        );
        let err = crate::offline::split_events(&cfg, &schema, &src, "valid")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("valid.tsv:2:") && err.contains("unknown relation \"bought\""),
            "{err}"
        );
        let err = crate::offline::split_events(&cfg, &schema, &src, "test")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.tsv:1:") && err.contains("does not connect movie -> user"),
            "{err}"
        );
        let err = crate::offline::checked_replay_events(&cfg, &src, &all())
            .unwrap_err()
            .to_string();
        assert!(err.contains("valid.tsv:2:"), "{err}");

        // A config without [schema] does not count: the schema is inferred.
        let plain = d.path().join("plain.toml");
        std::fs::write(&plain, "[train]\ndim = 8\n").unwrap();
        let mut cfg = cfg_for(Path::new("unused"));
        apply_dataset_schema(&mut cfg, &src, Some(&plain)).unwrap();
        assert_eq!(cfg.schema.relations.len(), 2);
    }

    #[test]
    fn builtin_datasets_are_folders_in_datasets_dir() {
        let root = tempfile::tempdir().unwrap();
        let umls = root.path().join("umls");
        write(&umls, "train.tsv", "concept:a\tr1\tconcept:b\n");
        write(&umls, "valid.tsv", "concept:a\tr1\tconcept:b\n");
        write(&umls, "test.tsv", "concept:b\tr1\tconcept:a\n");
        let ev = replay_events(root.path(), Dataset::Umls, &["test".into()]).unwrap();
        assert_eq!(ev[0].src, "concept:b");
        assert_eq!(ev[0].event_id, "umls:test:1");
        assert_eq!(
            DataSource::from(Dataset::MovieLens100k).folder(root.path()),
            root.path().join("movielens-100k")
        );
        let missing = replay_events(root.path(), Dataset::Nations, &["train".into()])
            .unwrap_err()
            .to_string();
        assert!(missing.contains(".ci/setup"), "{missing}");
        assert_eq!("ml-100k".parse::<Dataset>(), Ok(Dataset::MovieLens100k));
        assert!("imdb".parse::<Dataset>().is_err());
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
}
