//! The wire formats of embedding rows and version markers (JSON, or f32le for rows). The
//! contract is documented in `topics/README.md`.

use serde::{Deserialize, Serialize};

use crate::align::AlignFigures;
pub use crate::config::ValueFormat;

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
pub const TOMBSTONE_VERSION_HEADER: &str = "twhin-version";
/// Header of a tombstone naming the publisher's epoch, in decimal.
pub const TOMBSTONE_EPOCH_HEADER: &str = "twhin-epoch";

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

/// The marker written after all of a version's rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionMarker {
    pub version: u64,
    pub epoch: u64,
    /// Records (node rows, tombstones of erased nodes, relation vectors) this version and epoch
    /// published.
    pub rows: u64,
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
}

impl RowRecord {
    pub fn encode(&self, format: ValueFormat) -> Vec<u8> {
        match format {
            ValueFormat::Json => serde_json::to_vec(self).expect("a row serialises"),
            ValueFormat::F32le => {
                encode_f32le(self.version, self.epoch, self.ts, &self.vector, None)
            }
        }
    }
}

/// One row's f32le record straight from its values (`extra`: a last value, the bias), without
/// building a [`RowRecord`] (the publication's hot path).
pub fn encode_f32le(
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
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let dim = u32::from_le_bytes(bytes[28..32].try_into().expect("4")) as usize;
        let body = &bytes[F32LE_HEADER..];
        if body.len() != dim * 4 {
            return Err(bad("length does not match its dimension"));
        }
        Ok(RowRecord {
            version: u64_at(4),
            epoch: u64_at(12),
            ts: u64_at(20) as i64,
            vector: body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
                .collect(),
        })
    }
}

impl VersionMarker {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<VersionMarker, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
