//! `twhin-stream export`: one published version, read from the embeddings and versions topics
//! as a subscriber reads them ([`VersionAssembler`], whole versions only), written as files a
//! Python user loads in one line.
//!
//! `npy`: per node type `OUT/<type>.npy` (float32 `[rows, dim]`, rows in id order) beside
//! `OUT/<type>.ids` (one id a line, in row order); `OUT/relations.npy` with `OUT/relations.ids`;
//! `OUT/meta.json` ([`ExportMeta`]). `tsv`: `OUT/<type>.tsv` and `OUT/relations.tsv`, one row a
//! line, the id then the values, tab-separated, and the same `meta.json`.
//!
//! A biased type's rows carry the bias as their last value, as published (`topics/README.md`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::align::AlignFigures;
use crate::config::Config;
use crate::publish::{read_version, ReadVersionError, VersionTable};

/// Version of the files' layout, in `meta.json`.
pub const EXPORT_FORMAT_VERSION: u32 = 1;

/// The file formats of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// NumPy `.npy` (float32) plus a `.ids` list per node type.
    Npy,
    /// Tab-separated text, one row a line.
    Tsv,
    /// Apache Parquet, one file per node type: columns `id` (string) and `vector`
    /// (fixed-size list of float32), rows in id order.
    Parquet,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Version(#[from] ReadVersionError),
    #[error("{key} has {got} values, other rows of `{group}` have {want}")]
    Width {
        key: String,
        group: String,
        got: usize,
        want: usize,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {what}")]
    ReadFile { path: PathBuf, what: String },
}

/// What `meta.json` says about an export.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ExportMeta {
    pub format_version: u32,
    pub format: ExportFormat,
    pub version: u64,
    pub epoch: u64,
    /// Records the version itself carried (its marker's count).
    pub version_rows: u64,
    /// Per node type: rows and values a row.
    pub types: BTreeMap<String, TypeMeta>,
    pub relations: TypeMeta,
    /// The version's drift figures, as its marker published them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub align: Option<AlignFigures>,
    pub embeddings_topic: String,
    pub versions_topic: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TypeMeta {
    pub rows: usize,
    pub dim: usize,
    /// The files, relative to the export folder.
    pub files: Vec<String>,
}

/// What the command prints.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub seconds: f64,
    pub records_read: u64,
    #[serde(flatten)]
    pub meta: ExportMeta,
}

/// Read `version` (the newest whole one when `None`) from the topics, and write it to `out`.
pub fn export(
    cfg: &Config,
    version: Option<u64>,
    format: ExportFormat,
    out: &Path,
    timeout: Duration,
) -> Result<ExportSummary, ExportError> {
    let started = Instant::now();
    let (table, records_read) = read_version(cfg, version, timeout)?;
    let topics = (
        cfg.kafka.embeddings_topic.as_str(),
        cfg.kafka.versions_topic.as_str(),
    );
    let meta = write(&table, format, out, topics)?;
    Ok(ExportSummary {
        out: out.to_path_buf(),
        seconds: started.elapsed().as_secs_f64(),
        records_read,
        meta,
    })
}

/// Write `table` to `out` (created if missing) in `format`; returns what `meta.json` says
/// (`topics`: the embeddings and versions topics it was read from).
pub fn write(
    table: &VersionTable,
    format: ExportFormat,
    out: &Path,
    topics: (&str, &str),
) -> Result<ExportMeta, ExportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut types = BTreeMap::new();
    for (name, rows) in &table.types {
        types.insert(name.clone(), write_group(out, name, rows, format)?);
    }
    let relations = write_group(out, "relations", &table.relations, format)?;
    let meta = ExportMeta {
        format_version: EXPORT_FORMAT_VERSION,
        format,
        version: table.version,
        epoch: table.marker.epoch,
        version_rows: table.marker.rows,
        types,
        relations,
        align: table.marker.align.clone(),
        embeddings_topic: topics.0.to_string(),
        versions_topic: topics.1.to_string(),
    };
    let path = out.join("meta.json");
    let json = serde_json::to_vec_pretty(&meta).expect("plain data");
    std::fs::write(&path, json).map_err(io(&path))?;
    Ok(meta)
}

/// One group's files: `<name>.npy` and `<name>.ids`, or `<name>.tsv`.
fn write_group(
    out: &Path,
    name: &str,
    rows: &[(String, Vec<f32>)],
    format: ExportFormat,
) -> Result<TypeMeta, ExportError> {
    let dim = rows.first().map_or(0, |r| r.1.len());
    if let Some((key, v)) = rows.iter().find(|r| r.1.len() != dim) {
        return Err(ExportError::Width {
            key: key.clone(),
            group: name.to_string(),
            got: v.len(),
            want: dim,
        });
    }
    let files = match format {
        ExportFormat::Npy => {
            let values: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
            let array = ndarray::Array2::from_shape_vec((rows.len(), dim), values)
                .expect("rows of one width");
            let npy = format!("{name}.npy");
            let path = out.join(&npy);
            ndarray_npy::write_npy(&path, &array).map_err(|e| ExportError::Write {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            let ids = format!("{name}.ids");
            write_lines(&out.join(&ids), rows.iter().map(|r| r.0.clone()))?;
            vec![npy, ids]
        }
        ExportFormat::Parquet => {
            let file = format!("{name}.parquet");
            write_parquet(&out.join(&file), rows, dim)?;
            vec![file]
        }
        ExportFormat::Tsv => {
            let tsv = format!("{name}.tsv");
            write_lines(
                &out.join(&tsv),
                rows.iter().map(|(id, v)| {
                    let mut line = id.clone();
                    for x in v {
                        line.push('\t');
                        line.push_str(&x.to_string());
                    }
                    line
                }),
            )?;
            vec![tsv]
        }
    };
    Ok(TypeMeta {
        rows: rows.len(),
        dim,
        files,
    })
}

/// `rows` as one Parquet file: `id` (utf8) and `vector` (fixed-size list of `dim` float32).
fn write_parquet(path: &Path, rows: &[(String, Vec<f32>)], dim: usize) -> Result<(), ExportError> {
    use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let err = |e: &dyn std::fmt::Display| ExportError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let ids = StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()));
    let values = Float32Array::from_iter_values(rows.iter().flat_map(|r| r.1.iter().copied()));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let vectors = FixedSizeListArray::try_new(item.clone(), dim as i32, Arc::new(values), None)
        .map_err(|e| err(&e))?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("vector", DataType::FixedSizeList(item, dim as i32), false),
    ]));
    let columns: Vec<ArrayRef> = vec![Arc::new(ids), Arc::new(vectors)];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(&e))?;
    let file = File::create(path).map_err(|source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, schema, None).map_err(|e| err(&e))?;
    writer.write(&batch).map_err(|e| err(&e))?;
    writer.close().map_err(|e| err(&e))?;
    Ok(())
}

/// The `(id, vector)` rows of a file `write_parquet` wrote, in order.
pub fn read_parquet(path: &Path) -> Result<Vec<(String, Vec<f32>)>, ExportError> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;
    let err = |e: &dyn std::fmt::Display| ExportError::ReadFile {
        path: path.to_path_buf(),
        what: e.to_string(),
    };
    let file = File::open(path).map_err(|e| err(&e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(&e))?;
        let (Some(ids), Some(vectors)) = (
            batch
                .column_by_name("id")
                .and_then(|c| c.as_string_opt::<i32>()),
            batch
                .column_by_name("vector")
                .and_then(|c| c.as_fixed_size_list_opt()),
        ) else {
            return Err(err(&"no `id` strings and `vector` lists"));
        };
        for i in 0..batch.num_rows() {
            let v = vectors.value(i);
            let Some(values) = v.as_primitive_opt::<Float32Type>() else {
                return Err(err(&"`vector` is not float32"));
            };
            out.push((ids.value(i).to_owned(), values.values().to_vec()));
        }
    }
    Ok(out)
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> Result<(), ExportError> {
    let err = |source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(err)?);
    for line in lines {
        w.write_all(line.as_bytes()).map_err(err)?;
        w.write_all(b"\n").map_err(err)?;
    }
    w.flush().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{RowRecord, VersionMarker};
    use crate::subscriber::VersionAssembler;

    const TOPICS: (&str, &str) = ("twhin.embeddings", "twhin.versions");

    fn table() -> VersionTable {
        let mut a = VersionAssembler::new();
        let row = |x: f32, n: usize| RowRecord {
            version: 1,
            epoch: 3,
            ts: 0,
            vector: vec![x; n],
        };
        a.push_row(0, "user:b", row(2.0, 2));
        a.push_row(0, "user:a", row(1.0, 2));
        a.push_row(0, "movie:m", row(0.5, 3));
        a.push_row(0, "relation:follows", row(-1.0, 2));
        a.push_marker(VersionMarker::new(1, 3, 4));
        VersionTable::of(&a).expect("applied")
    }

    #[test]
    fn an_npy_export_reads_back_in_id_order_with_its_ids() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write(&table(), ExportFormat::Npy, dir.path(), TOPICS).unwrap();
        assert_eq!((meta.version, meta.epoch, meta.version_rows), (1, 3, 4));
        assert_eq!((meta.types["user"].rows, meta.types["movie"].dim), (2, 3));
        let users: ndarray::Array2<f32> =
            ndarray_npy::read_npy(dir.path().join("user.npy")).unwrap();
        assert_eq!(users, ndarray::array![[1.0, 1.0], [2.0, 2.0]]);
        let ids = std::fs::read_to_string(dir.path().join("user.ids")).unwrap();
        assert_eq!(ids, "a\nb\n");
        let rel: ndarray::Array2<f32> =
            ndarray_npy::read_npy(dir.path().join("relations.npy")).unwrap();
        assert_eq!(rel, ndarray::array![[-1.0, -1.0]]);
        let back: ExportMeta =
            serde_json::from_slice(&std::fs::read(dir.path().join("meta.json")).unwrap()).unwrap();
        assert_eq!(back, meta);
    }

    #[test]
    fn a_parquet_export_reads_back_as_ids_and_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let meta = write(&table(), ExportFormat::Parquet, dir.path(), TOPICS).unwrap();
        assert_eq!(meta.types["user"].files, ["user.parquet"]);
        let read = |name: &str| read_parquet(&dir.path().join(name)).unwrap();
        let t = table();
        assert_eq!(read("user.parquet"), t.types["user"]);
        assert_eq!(read("movie.parquet"), t.types["movie"]);
        assert_eq!(read("relations.parquet"), t.relations);
    }

    #[test]
    fn a_tsv_export_is_one_row_a_line() {
        let dir = tempfile::tempdir().unwrap();
        write(&table(), ExportFormat::Tsv, dir.path(), TOPICS).unwrap();
        let movies = std::fs::read_to_string(dir.path().join("movie.tsv")).unwrap();
        assert_eq!(movies, "m\t0.5\t0.5\t0.5\n");
    }
}
