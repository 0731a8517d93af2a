//! The wire formats of embedding rows and version markers (JSON, or f32le for rows). The
//! contract is documented in `topics/README.md`.

use serde::{Deserialize, Serialize};

use crate::align::AlignFigures;
use crate::config::ValueFormat;
use crate::exchange::GradientsApplied;
use crate::publish::{PqTable, CENTROIDS};

/// One published embedding row (a node's or a relation's vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    pub version: u64,
    pub epoch: u64,
    /// Event time (ms) of the newest event that touched the row (for a relation: the newest
    /// event the version reflects).
    pub ts: i64,
    pub vector: Vec<f32>,
}

/// Header of a tombstone (a record with a null value: the node was erased) naming the version
/// that carries it, in decimal; the value alone cannot, and compaction needs it null.
pub(crate) const TOMBSTONE_VERSION_HEADER: &str = "twhin-version";
/// Header of a tombstone naming the publisher's epoch, in decimal.
pub(crate) const TOMBSTONE_EPOCH_HEADER: &str = "twhin-epoch";

/// The `(version, epoch)` a tombstone's headers name; `None` when either is missing or not a
/// decimal number (a null value that is not the publisher's).
pub fn tombstone_attempt<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Option<(u64, u64)> {
    let (mut version, mut epoch) = (None, None);
    for (name, value) in headers {
        let number = || std::str::from_utf8(value).ok()?.parse::<u64>().ok();
        match name {
            TOMBSTONE_VERSION_HEADER => version = number(),
            TOMBSTONE_EPOCH_HEADER => epoch = number(),
            _ => {}
        }
    }
    Some((version?, epoch?))
}

/// The version of the contract in `topics/README.md` that markers follow. Contract 2 (2026-12)
/// added `contract` and `builds_on`: a version's canonical attempt is its last, and a later
/// complete attempt of the applied version is applied over it. Contract 3 (2026-12-06) scopes
/// every version to one partition of the embeddings topic (`partition`, `partitions`), so that
/// each partition's owner publishes its own. A marker without `contract` is contract 1.
pub const CONTRACT: u32 = 3;

/// One attempt of a version: the `(version, epoch)` its rows and marker carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AttemptRef {
    pub version: u64,
    pub epoch: u64,
}

fn contract_1() -> u32 {
    1
}

/// The marker written after all of a version's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMarker {
    /// The contract version ([`CONTRACT`]); 1 when absent (markers written before it).
    #[serde(default = "contract_1")]
    pub contract: u32,
    pub version: u64,
    pub epoch: u64,
    /// Records (node rows, tombstones of erased nodes, relation vectors) this version and epoch
    /// published.
    pub rows: u64,
    /// Contract 3: the partition of the embeddings topic this marker's version covers; its
    /// records are that partition's records of `(version, epoch)`, and `rows` counts those.
    /// `None` (contracts 1 and 2): the version covers the whole topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Contract 3: the embeddings topic's partition count when it was published (a key belongs
    /// to partition `partition_of(key, partitions)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// The attempt of the previous version this one was selected against: the publisher's
    /// reference, which every subscriber must hold before applying this version. `None` for the
    /// first version, and for a publisher that does not know its reference's epoch (a ledger
    /// from before contract 2).
    #[serde(default)]
    pub builds_on: Option<AttemptRef>,
    /// The deployment that published it: its `kafka.group_id`, stamped by the Kafka sink
    /// (absent in markers written before 2026-12). A publisher refuses a versions topic whose
    /// newest marker names another deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Contract 3: the `host:port` of the publisher's HTTP server (`http.advertise`), which
    /// answers `POST /v1/candidates` for the partition (`/v1/neighbors` of another instance
    /// asks each partition's owner through it). Absent when the publisher advertises none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Contract 3, with the gradient exchange: per sender, the newest of its windows whose
    /// gradients for this partition the version's rows include (`topics/README.md`,
    /// "Gradients"). Absent when the owner applied none; readers that do not exchange
    /// gradients ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradients_applied: Option<GradientsApplied>,
    /// Drift figures of the version (absent when the publisher measured none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align: Option<AlignFigures>,
}

const F32LE_MAGIC: &[u8; 4] = b"TWE1";
const F32LE_HEADER: usize = 4 + 8 + 8 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("row payload: {0}")]
    Json(String),
    #[error("row payload: f32le record of {len} bytes: {problem}")]
    Binary { len: usize, problem: &'static str },
    #[error(
        "version marker of contract {found}: this subscriber implements contract {CONTRACT} \
         (topics/README.md); upgrade the subscriber"
    )]
    Contract { found: u32 },
}

impl RowRecord {
    pub fn encode(&self, format: ValueFormat) -> Vec<u8> {
        match format {
            ValueFormat::Json => serde_json::to_vec(self).expect("a row serialises"),
            // A row's values alone: `pq` codes node rows from a version's codebooks
            // (`VersionRows`), not one row by itself.
            ValueFormat::F32le | ValueFormat::Pq => {
                encode_f32le(self.version, self.epoch, self.ts, &self.vector, None)
            }
        }
    }
}

/// One row's f32le record straight from its values (`extra`: a last value, the bias), without
/// building a [`RowRecord`] (the publication's hot path).
pub(crate) fn encode_f32le(
    version: u64,
    epoch: u64,
    ts: i64,
    vector: &[f32],
    extra: Option<f32>,
) -> Vec<u8> {
    let dim = vector.len() + usize::from(extra.is_some());
    let mut out = Vec::with_capacity(F32LE_HEADER + 4 * dim);
    out.extend_from_slice(F32LE_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    for v in vector.iter().chain(extra.as_ref()) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

impl RowRecord {
    /// Decode either format (the f32le magic tells them apart).
    pub fn decode(bytes: &[u8]) -> Result<RowRecord, DecodeError> {
        if !bytes.starts_with(F32LE_MAGIC) {
            return serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()));
        }
        let bad = |problem| DecodeError::Binary {
            len: bytes.len(),
            problem,
        };
        if bytes.len() < F32LE_HEADER {
            return Err(bad("shorter than the header"));
        }
        let dim = u32_at(bytes, 28) as usize;
        let body = &bytes[F32LE_HEADER..];
        if body.len() != dim * 4 {
            return Err(bad("length does not match its dimension"));
        }
        Ok(RowRecord {
            version: u64_at(bytes, 4),
            epoch: u64_at(bytes, 12),
            ts: u64_at(bytes, 20) as i64,
            vector: f32s(body),
        })
    }
}

/// Keys of codebooks records start with this (`codebooks:12`, named by their epoch).
pub(crate) const CODEBOOKS_PREFIX: &str = "codebooks:";

const CODED_MAGIC: &[u8; 4] = b"TWQ1";
const CODED_HEADER: usize = 4 + 8 + 8 + 8 + 8 + 2 + 2;
const CODEBOOKS_MAGIC: &[u8; 4] = b"TWC1";
const CODEBOOKS_HEADER: usize = 4 + 8 + 8 + 8 + 4 + 4 + 4;

/// One product-quantized row (`publish.format = "pq"`): a byte per sub-space, decoded with the
/// codebooks of epoch `codebooks`, and `extra` values sent as they are (the target bias).
#[derive(Debug, Clone, PartialEq)]
pub struct CodedRow {
    pub version: u64,
    pub epoch: u64,
    pub ts: i64,
    pub codebooks: u64,
    pub codes: Vec<u8>,
    pub extra: Vec<f32>,
}

/// The codebooks a version introduces, published as one record of it under
/// `codebooks:<epoch>` (the epoch of the codebooks is the version that introduced them).
#[derive(Debug, Clone, PartialEq)]
pub struct CodebooksRecord {
    pub version: u64,
    pub epoch: u64,
    pub table: PqTable,
}

/// Any record of the embeddings topic with a value, told apart by its first bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Row(RowRecord),
    Coded(CodedRow),
    Codebooks(CodebooksRecord),
}

impl Record {
    /// A value of the embeddings topic in any of its formats (JSON, `TWE1`, `TWQ1`, `TWC1`).
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        if bytes.starts_with(CODED_MAGIC) {
            CodedRow::decode(bytes).map(Record::Coded)
        } else if bytes.starts_with(CODEBOOKS_MAGIC) {
            CodebooksRecord::decode(bytes).map(Record::Codebooks)
        } else {
            RowRecord::decode(bytes).map(Record::Row)
        }
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn f32s(body: &[u8]) -> Vec<f32> {
    body.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// One coded row's `TWQ1` record straight from its values (the publication's hot path).
pub(crate) fn encode_coded(
    version: u64,
    epoch: u64,
    ts: i64,
    codebooks: u64,
    codes: &[u8],
    extra: &[f32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(CODED_HEADER + codes.len() + 4 * extra.len());
    out.extend_from_slice(CODED_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&codebooks.to_le_bytes());
    out.extend_from_slice(&(codes.len() as u16).to_le_bytes());
    out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    out.extend_from_slice(codes);
    for v in extra {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

impl CodedRow {
    pub fn encode(&self) -> Vec<u8> {
        encode_coded(
            self.version,
            self.epoch,
            self.ts,
            self.codebooks,
            &self.codes,
            &self.extra,
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<CodedRow, DecodeError> {
        let bad = |problem| DecodeError::Binary {
            len: bytes.len(),
            problem,
        };
        if bytes.len() < CODED_HEADER || !bytes.starts_with(CODED_MAGIC) {
            return Err(bad("not a TWQ1 record or shorter than its header"));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
        let (m, extras) = (u16_at(36), u16_at(38));
        let body = &bytes[CODED_HEADER..];
        if body.len() != m + 4 * extras {
            return Err(bad("length does not match its code and value counts"));
        }
        Ok(CodedRow {
            version: u64_at(bytes, 4),
            epoch: u64_at(bytes, 12),
            ts: u64_at(bytes, 20) as i64,
            codebooks: u64_at(bytes, 28),
            codes: body[..m].to_vec(),
            extra: f32s(&body[m..]),
        })
    }

    /// The row's values as its codebooks decode them, the extra values last; `None` when
    /// `table` is not of its epoch or has another number of sub-spaces.
    pub fn vector(&self, table: &PqTable) -> Option<Vec<f32>> {
        if table.epoch != self.codebooks {
            return None;
        }
        let mut out = table.decode(&self.codes)?;
        out.extend_from_slice(&self.extra);
        Some(out)
    }
}

impl CodebooksRecord {
    /// `TWC1`, version, epoch and the codebooks' epoch (u64 each), `m`, 256 and `D / m` (u32
    /// each), then the centroids as f32, sub-space by sub-space, centroid by centroid;
    /// little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let t = &self.table;
        let mut out = Vec::with_capacity(CODEBOOKS_HEADER + 4 * t.centroids.len());
        out.extend_from_slice(CODEBOOKS_MAGIC);
        for v in [self.version, self.epoch, t.epoch] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [t.subspaces, CENTROIDS as usize, t.sub_dim] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for v in &t.centroids {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<CodebooksRecord, DecodeError> {
        let bad = |problem| DecodeError::Binary {
            len: bytes.len(),
            problem,
        };
        if bytes.len() < CODEBOOKS_HEADER || !bytes.starts_with(CODEBOOKS_MAGIC) {
            return Err(bad("not a TWC1 record or shorter than its header"));
        }
        let (m, k, d) = (
            u32_at(bytes, 28) as usize,
            u32_at(bytes, 32) as i64,
            u32_at(bytes, 36) as usize,
        );
        if k != CENTROIDS || m == 0 || d == 0 {
            return Err(bad("its shape is not m × 256 × D/m"));
        }
        let body = &bytes[CODEBOOKS_HEADER..];
        if body.len() != m * k as usize * d * 4 {
            return Err(bad("length does not match its shape"));
        }
        Ok(CodebooksRecord {
            version: u64_at(bytes, 4),
            epoch: u64_at(bytes, 12),
            table: PqTable {
                epoch: u64_at(bytes, 20),
                subspaces: m,
                sub_dim: d,
                centroids: f32s(body),
            },
        })
    }
}

impl VersionMarker {
    /// A marker of this contract that names no attempt before it and no drift figures.
    pub fn new(version: u64, epoch: u64, rows: u64) -> VersionMarker {
        VersionMarker {
            contract: CONTRACT,
            version,
            epoch,
            rows,
            partition: None,
            partitions: None,
            builds_on: None,
            deployment: None,
            http: None,
            gradients_applied: None,
            align: None,
        }
    }

    /// [`VersionMarker::new`] scoped to `partition` of `partitions` (contract 3).
    pub fn for_partition(
        version: u64,
        epoch: u64,
        rows: u64,
        partition: i32,
        partitions: i32,
    ) -> VersionMarker {
        VersionMarker {
            partition: Some(partition),
            partitions: Some(partitions),
            ..VersionMarker::new(version, epoch, rows)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serialises")
    }

    /// A marker of a later contract than [`CONTRACT`] is refused: its rules may differ.
    pub fn decode(bytes: &[u8]) -> Result<VersionMarker, DecodeError> {
        let marker: VersionMarker =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        if marker.contract > CONTRACT {
            return Err(DecodeError::Contract {
                found: marker.contract,
            });
        }
        Ok(marker)
    }

    /// The attempt this marker closes.
    pub fn attempt(&self) -> AttemptRef {
        AttemptRef {
            version: self.version,
            epoch: self.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::WindowAttempt;

    #[test]
    fn a_tombstone_names_its_attempt_in_two_headers() {
        let h = |v: &'static [u8], e: &'static [u8]| {
            [
                ("other", &b"x"[..]),
                (TOMBSTONE_VERSION_HEADER, v),
                (TOMBSTONE_EPOCH_HEADER, e),
            ]
        };
        assert_eq!(tombstone_attempt(h(b"12", b"3")), Some((12, 3)));
        assert_eq!(tombstone_attempt(h(b"12", b"")), None);
        assert_eq!(tombstone_attempt(h(b"-1", b"3")), None);
        assert_eq!(
            tombstone_attempt([(TOMBSTONE_VERSION_HEADER, &b"1"[..])]),
            None
        );
    }

    fn row() -> RowRecord {
        RowRecord {
            version: 12,
            epoch: 3,
            ts: 1_732_190_000_123,
            vector: vec![0.0132, -0.2215, 0.4071],
        }
    }

    #[test]
    fn rows_round_trip_in_both_formats() {
        for format in [ValueFormat::Json, ValueFormat::F32le] {
            assert_eq!(RowRecord::decode(&row().encode(format)).unwrap(), row());
        }
        // The documented JSON shape.
        let json: serde_json::Value =
            serde_json::from_slice(&row().encode(ValueFormat::Json)).unwrap();
        assert_eq!(json["version"], 12);
        assert_eq!(json["epoch"], 3);
        assert_eq!(json["vector"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn golden_f32le_layout() {
        let bytes = row().encode(ValueFormat::F32le);
        assert_eq!(bytes.len(), 32 + 12);
        assert_eq!(&bytes[..4], b"TWE1");
        assert_eq!(bytes[4], 12, "version, little-endian");
        assert_eq!(bytes[12], 3, "epoch");
        assert_eq!(&bytes[28..32], &[3, 0, 0, 0], "dimension");
        assert_eq!(&bytes[32..36], &0.0132f32.to_le_bytes());
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let mut bytes = row().encode(ValueFormat::F32le);
        bytes.pop();
        assert!(matches!(
            RowRecord::decode(&bytes),
            Err(DecodeError::Binary { .. })
        ));
        assert!(RowRecord::decode(b"TWE1").is_err());
        assert!(RowRecord::decode(b"{\"version\":1}").is_err());
        assert!(VersionMarker::decode(b"[]").is_err());
    }

    #[test]
    fn markers_name_their_contract_and_a_later_one_is_refused() {
        let marker = VersionMarker {
            contract: CONTRACT,
            version: 12,
            epoch: 3,
            rows: 5,
            partition: Some(6),
            partitions: Some(8),
            builds_on: Some(AttemptRef {
                version: 11,
                epoch: 2,
            }),
            deployment: Some("feeds".into()),
            http: Some("10.0.0.5:8080".into()),
            gradients_applied: Some(
                [(
                    "5e1d".to_owned(),
                    WindowAttempt {
                        version: 40,
                        epoch: 7,
                    },
                )]
                .into(),
            ),
            align: None,
        };
        let json = String::from_utf8(marker.encode()).unwrap();
        assert_eq!(
            json,
            r#"{"contract":3,"version":12,"epoch":3,"rows":5,"partition":6,"partitions":8,"builds_on":{"version":11,"epoch":2},"deployment":"feeds","http":"10.0.0.5:8080","gradients_applied":{"5e1d":{"version":40,"epoch":7}}}"#
        );
        assert_eq!(VersionMarker::decode(json.as_bytes()), Ok(marker));
        // Contract 1 (no `contract`, no `builds_on`): still read.
        let old = VersionMarker::decode(br#"{"version":4,"epoch":1,"rows":9}"#).unwrap();
        assert_eq!(
            (old.contract, old.builds_on, old.deployment, old.partition),
            (1, None, None, None)
        );
        // Contract 2 (no `partition`): the version covers the whole topic.
        let two = VersionMarker::decode(br#"{"contract":2,"version":4,"epoch":1,"rows":9}"#);
        assert_eq!(two.map(|m| (m.contract, m.partition)), Ok((2, None)));
        assert_eq!(
            VersionMarker::decode(br#"{"contract":4,"version":4,"epoch":1,"rows":9}"#),
            Err(DecodeError::Contract { found: 4 })
        );
    }

    fn table() -> PqTable {
        // Two sub-spaces of two values; centroid c of sub-space s is (100s + c, -c).
        let centroids = (0..2)
            .flat_map(|s| (0..256).flat_map(move |c| [(100 * s + c) as f32, -(c as f32)]))
            .collect();
        PqTable {
            epoch: 5,
            subspaces: 2,
            sub_dim: 2,
            centroids,
        }
    }

    #[test]
    fn golden_coded_row_layout_and_decoding() {
        let row = CodedRow {
            version: 12,
            epoch: 3,
            ts: 7,
            codebooks: 5,
            codes: vec![4, 255],
            extra: vec![0.5],
        };
        let bytes = row.encode();
        assert_eq!(bytes.len(), 40 + 2 + 4);
        assert_eq!(&bytes[..4], b"TWQ1");
        assert_eq!(bytes[28], 5, "the codebooks' epoch");
        assert_eq!(&bytes[36..40], &[2, 0, 1, 0], "two codes, one extra value");
        assert_eq!(&bytes[40..42], &[4, 255]);
        assert_eq!(Record::decode(&bytes).unwrap(), Record::Coded(row.clone()));
        assert_eq!(
            row.vector(&table()).unwrap(),
            vec![4.0, -4.0, 355.0, -255.0, 0.5]
        );
        let other = PqTable {
            epoch: 6,
            ..table()
        };
        assert_eq!(
            row.vector(&other),
            None,
            "codes of epoch 5 need its codebooks"
        );
        let mut short = bytes;
        short.pop();
        assert!(matches!(
            Record::decode(&short),
            Err(DecodeError::Binary { .. })
        ));
    }

    #[test]
    fn golden_codebooks_record_layout() {
        let record = CodebooksRecord {
            version: 9,
            epoch: 2,
            table: table(),
        };
        let bytes = record.encode();
        assert_eq!(bytes.len(), 40 + 2 * 256 * 2 * 4);
        assert_eq!(&bytes[..4], b"TWC1");
        assert_eq!((bytes[4], bytes[12], bytes[20]), (9, 2, 5));
        assert_eq!(&bytes[28..40], &[2, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0]);
        assert_eq!(
            Record::decode(&bytes).unwrap(),
            Record::Codebooks(record.clone())
        );
        let mut shape = bytes.clone();
        shape[32] = 1; // 257 centroids
        assert!(Record::decode(&shape).is_err());
        assert!(Record::decode(&bytes[..bytes.len() - 4]).is_err());
        // Every format is told apart by its first bytes.
        assert!(matches!(
            Record::decode(&row().encode(ValueFormat::F32le)),
            Ok(Record::Row(_))
        ));
        assert!(matches!(
            Record::decode(&row().encode(ValueFormat::Json)),
            Ok(Record::Row(_))
        ));
    }
}
