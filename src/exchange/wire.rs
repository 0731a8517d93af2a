//! The gradients topic's record (`topics/README.md`, "Gradients"): one chunk of one window's
//! summed gradients for the nodes of one partition, bincode-encoded behind a format byte, the
//! gradients as bfloat16 (half the bytes of f32 with its range; 8 bits of mantissa are plenty
//! for a gradient, and the topic's volume is what the broker holds).

use half::bf16;
use serde::{Deserialize, Serialize};

use crate::partition::partition_of;

/// The record format this build writes; it reads this one and [`GRADIENTS_FORMAT_1`] (rows
/// without `start`), and refuses another, naming it.
pub const GRADIENTS_FORMAT: u8 = 2;
/// The first format: read as rows without a starting value.
pub const GRADIENTS_FORMAT_1: u8 = 1;

/// Rows per record at most: 1,024 rows of dimension 128 are about 0.27 MiB, under the broker's
/// default record size limit (1 MiB) up to dimension 480.
pub const CHUNK_ROWS: usize = 1024;

/// Which window a chunk belongs to: its sender and the publication attempt that took it
/// (`version`, `epoch`), unique per sender because an epoch is never reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowId {
    /// The sender's name ([`crate::exchange::sender_id`]).
    pub sender: String,
    pub version: u64,
    pub epoch: u64,
}

/// A window of one sender, by the attempt that took it (a [`WindowId`] without its sender): what
/// a version marker says its owner's rows include ([`GradientsApplied`]). Windows of a sender are
/// ordered by `(version, epoch)`, as it sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowAttempt {
    pub version: u64,
    pub epoch: u64,
}

/// Per sender, the newest of its windows whose gradients for one partition an owner applied:
/// carried by the owner's version markers (`gradients_applied`), so that a sender knows which of
/// its own updates the owner's published rows include.
pub type GradientsApplied = std::collections::BTreeMap<String, WindowAttempt>;

/// One node's gradient, summed over the window's steps that touched it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyedGradient {
    /// The node's key, `type:id` (what places it in a partition).
    pub key: String,
    /// How many steps the sum is over: the owner's Adagrad counts the sum as that many steps of
    /// its mean.
    pub steps: u32,
    pub grad: Vec<f32>,
    /// The summed gradient of the node's target bias, for a biased type.
    pub bias: Option<f32>,
    /// The sender's row before this window's steps (then its bias, for a biased type), sent
    /// with the first window that names the node: an owner that does not know the node yet
    /// starts its row there, where the sender's own learning on it began.
    pub start: Option<Vec<f32>>,
}

/// A record of the gradients topic.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientChunk {
    pub window: WindowId,
    /// The partition every row's node belongs to (the record is produced to it).
    pub partition: i32,
    /// This chunk's index among the window's `chunks` for the partition.
    pub chunk: u32,
    pub chunks: u32,
    pub rows: Vec<KeyedGradient>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GradientDecodeError {
    #[error("empty gradients record")]
    Empty,
    #[error(
        "gradients record format {0} (this build reads formats {GRADIENTS_FORMAT_1} and \
         {GRADIENTS_FORMAT}): upgrade every instance of the deployment to one build"
    )]
    Format(u8),
    #[error("gradients record does not decode: {0}")]
    Body(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// [`GradientChunk`] as it is encoded: gradients as bfloat16 bits.
#[derive(Serialize, Deserialize)]
struct WireChunk<Row> {
    window: WindowId,
    partition: i32,
    chunk: u32,
    chunks: u32,
    rows: Vec<Row>,
}

#[derive(Serialize, Deserialize)]
struct WireRow {
    key: String,
    steps: u32,
    grad: Vec<u16>,
    bias: Option<f32>,
    start: Option<Vec<f32>>,
}

/// A row of format 1: no `start`.
#[derive(Serialize, Deserialize)]
struct WireRow1 {
    key: String,
    steps: u32,
    grad: Vec<u16>,
    bias: Option<f32>,
}

impl From<WireRow1> for WireRow {
    fn from(r: WireRow1) -> WireRow {
        WireRow {
            key: r.key,
            steps: r.steps,
            grad: r.grad,
            bias: r.bias,
            start: None,
        }
    }
}

impl GradientChunk {
    pub fn encode(&self) -> Vec<u8> {
        let wire = WireChunk {
            window: self.window.clone(),
            partition: self.partition,
            chunk: self.chunk,
            chunks: self.chunks,
            rows: (self.rows.iter())
                .map(|r| WireRow {
                    key: r.key.clone(),
                    steps: r.steps,
                    grad: r
                        .grad
                        .iter()
                        .map(|&x| bf16::from_f32(x).to_bits())
                        .collect(),
                    bias: r.bias,
                    start: r.start.clone(),
                })
                .collect(),
        };
        let mut out = vec![GRADIENTS_FORMAT];
        out.extend(bincode::serde::encode_to_vec(&wire, config()).expect("plain data"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<GradientChunk, GradientDecodeError> {
        let (&format, body) = bytes.split_first().ok_or(GradientDecodeError::Empty)?;
        let body_err = |e: bincode::error::DecodeError| GradientDecodeError::Body(e.to_string());
        let wire: WireChunk<WireRow> = match format {
            GRADIENTS_FORMAT => {
                bincode::serde::decode_from_slice(body, config())
                    .map_err(body_err)?
                    .0
            }
            GRADIENTS_FORMAT_1 => {
                let (old, _): (WireChunk<WireRow1>, usize) =
                    bincode::serde::decode_from_slice(body, config()).map_err(body_err)?;
                WireChunk {
                    window: old.window,
                    partition: old.partition,
                    chunk: old.chunk,
                    chunks: old.chunks,
                    rows: old.rows.into_iter().map(WireRow::from).collect(),
                }
            }
            other => return Err(GradientDecodeError::Format(other)),
        };
        Ok(GradientChunk {
            window: wire.window,
            partition: wire.partition,
            chunk: wire.chunk,
            chunks: wire.chunks,
            rows: (wire.rows.into_iter())
                .map(|r| KeyedGradient {
                    key: r.key,
                    steps: r.steps,
                    grad: r
                        .grad
                        .into_iter()
                        .map(|b| bf16::from_bits(b).to_f32())
                        .collect(),
                    bias: r.bias,
                    start: r.start,
                })
                .collect(),
        })
    }
}

/// A window's rows as records: grouped by their node's partition (of `partitions`), at most
/// [`CHUNK_ROWS`] per record, each chunk numbered among its partition's.
pub fn window_chunks(
    window: &WindowId,
    rows: Vec<KeyedGradient>,
    partitions: u32,
) -> Vec<GradientChunk> {
    let mut by_partition: std::collections::BTreeMap<i32, Vec<KeyedGradient>> = Default::default();
    for row in rows {
        let q = partition_of(row.key.as_bytes(), partitions) as i32;
        by_partition.entry(q).or_default().push(row);
    }
    let mut out = Vec::new();
    for (q, rows) in by_partition {
        let chunks = rows.len().div_ceil(CHUNK_ROWS) as u32;
        let mut rows = rows.into_iter().peekable();
        for chunk in 0..chunks {
            out.push(GradientChunk {
                window: window.clone(),
                partition: q,
                chunk,
                chunks,
                rows: rows.by_ref().take(CHUNK_ROWS).collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, x: f32) -> KeyedGradient {
        KeyedGradient {
            key: key.into(),
            steps: 2,
            grad: vec![x, -x],
            bias: Some(x / 2.0),
            start: None,
        }
    }

    /// A row's starting value travels as f32; a format 1 record (rows without one) still reads.
    #[test]
    fn a_start_round_trips_and_format_1_reads_without_one() {
        let id = WindowId {
            sender: "a".into(),
            version: 3,
            epoch: 1,
        };
        let mut first = row("user:1", 0.25);
        first.start = Some(vec![0.1, -0.7, 0.123_456_7]);
        let chunk = &window_chunks(&id, vec![first, row("user:2", 1.0)], 1)[0];
        assert_eq!(GradientChunk::decode(&chunk.encode()).unwrap(), *chunk);
        let old = WireChunk {
            window: id.clone(),
            partition: 0,
            chunk: 0,
            chunks: 1,
            rows: vec![WireRow1 {
                key: "user:2".into(),
                steps: 2,
                grad: vec![
                    bf16::from_f32(1.0).to_bits(),
                    bf16::from_f32(-1.0).to_bits(),
                ],
                bias: Some(0.5),
            }],
        };
        let mut bytes = vec![GRADIENTS_FORMAT_1];
        bytes.extend(bincode::serde::encode_to_vec(&old, config()).unwrap());
        let read = GradientChunk::decode(&bytes).unwrap();
        assert_eq!(read.rows, vec![row("user:2", 1.0)]);
        assert_eq!(read.window, id);
    }

    #[test]
    fn a_chunk_round_trips_and_another_format_is_refused_by_number() {
        let id = WindowId {
            sender: "a".into(),
            version: 7,
            epoch: 2,
        };
        let chunk = &window_chunks(&id, vec![row("user:1", 0.5)], 8)[0];
        let bytes = chunk.encode();
        assert_eq!(GradientChunk::decode(&bytes).unwrap(), *chunk);
        // bfloat16: 8 bits of mantissa.
        let fine = &window_chunks(&id, vec![row("user:1", 1.0 + 1.0 / 512.0)], 8)[0];
        let got = GradientChunk::decode(&fine.encode()).unwrap().rows[0].grad[0];
        assert!(
            got != fine.rows[0].grad[0] && (got - 1.0).abs() < 1e-2,
            "{got}"
        );
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(
            GradientChunk::decode(&other),
            Err(GradientDecodeError::Format(9))
        );
        assert_eq!(GradientChunk::decode(&[]), Err(GradientDecodeError::Empty));
        assert!(matches!(
            GradientChunk::decode(&bytes[..bytes.len() - 3]),
            Err(GradientDecodeError::Body(_))
        ));
    }

    #[test]
    fn rows_go_to_their_nodes_partitions_in_numbered_chunks() {
        let id = WindowId {
            sender: "a".into(),
            version: 1,
            epoch: 0,
        };
        let rows: Vec<KeyedGradient> = (0..3000).map(|i| row(&format!("tweet:{i}"), 1.0)).collect();
        let chunks = window_chunks(&id, rows, 2);
        let mut seen = 0;
        for c in &chunks {
            assert!(c.rows.len() <= CHUNK_ROWS);
            assert!(c.chunk < c.chunks);
            for r in &c.rows {
                assert_eq!(partition_of(r.key.as_bytes(), 2) as i32, c.partition);
            }
            seen += c.rows.len();
        }
        assert_eq!(seen, 3000);
        // 3,000 rows over two partitions: two chunks each.
        assert_eq!(chunks.len(), 4);
    }
}
