//! A version's rows, held as keys and values and encoded only as they are produced.
//!
//! A version that carries every row of a large table (the first one, one after a rotation or a
//! restart without a reference) would otherwise hold every record at once: at a million rows of
//! dimension 128 that is 1.3 GB of JSON beside the 0.5 GB of values it is made from. Encoding a
//! bounded range at a time, on all cores, keeps the publication's memory at the values plus one
//! range.

use tch::Tensor;

use crate::config::ValueFormat;
use crate::publish::{encode_coded, encode_f32le, squared_error, Codebooks, PqError, RowRecord};

/// Rows encoded or gathered per thread at least (smaller ranges stay on the calling thread).
const MIN_CHUNK: usize = 16_384;

/// `work` over `from..to` split into consecutive chunks of at least [`MIN_CHUNK`], one per core,
/// on scoped threads; the chunks' results in order. (The publication's thread, not training's.)
pub(crate) fn in_chunks<T: Send>(
    from: usize,
    to: usize,
    work: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = (to - from).div_ceil(threads).max(MIN_CHUNK);
    if to - from <= chunk {
        return vec![work(from, to)];
    }
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (from..to)
            .step_by(chunk)
            .map(|start| scope.spawn(move || work(start, (start + chunk).min(to))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a publication worker thread panicked"))
            .collect()
    })
}

/// The rows of one version, in production order: each a key, an event time, an optional bias
/// and where its vector lies in one of the blocks (a node type's rows as the delta gave them,
/// kept as they are, not copied per row).
#[derive(Debug, Clone)]
pub struct VersionRows {
    version: u64,
    epoch: u64,
    format: ValueFormat,
    width: usize,
    /// Row-major `[n, width]` values.
    blocks: Vec<Vec<f32>>,
    /// Per block, its rows' width: `width`, except for relation deltas (one row of every
    /// relation's values, [`VersionRows::add_wide_row`]).
    block_width: Vec<usize>,
    /// Per block: node rows, coded under `publish.format = "pq"` (relation vectors never are).
    node_block: Vec<bool>,
    /// Per block, its rows' codes (`[n, m]` row-major) once [`VersionRows::quantize`] ran.
    codes: Vec<Option<Vec<u8>>>,
    /// The codebooks' epoch and sub-spaces the codes are of.
    coded_with: Option<(u64, usize)>,
    rows: Vec<RowRef>,
}

/// One row of a [`VersionRows`].
#[derive(Debug, Clone)]
pub struct RowRef {
    pub key: String,
    pub ts: i64,
    /// The row's target bias, sent as one more value (`train.bias_types`).
    pub bias: Option<f32>,
    /// The embeddings partition the record goes to (its key's, [`crate::publish::Scope::place`]).
    pub partition: i32,
    block: u32,
    row: u32,
}

impl RowRef {
    /// The row, produced to `partition`.
    pub fn in_partition(self, partition: i32) -> RowRef {
        RowRef { partition, ..self }
    }
}

impl VersionRows {
    /// No rows yet, for vectors of `width` values.
    pub fn new(version: u64, epoch: u64, format: ValueFormat, width: usize) -> VersionRows {
        VersionRows {
            version,
            epoch,
            format,
            width,
            blocks: Vec::new(),
            block_width: Vec::new(),
            node_block: Vec::new(),
            codes: Vec::new(),
            coded_with: None,
            rows: Vec::new(),
        }
    }

    /// Keep node rows `values` (`[n, width]`, row-major) as a block; its number, for
    /// [`VersionRows::row`].
    pub fn add_block(&mut self, values: Vec<f32>) -> u32 {
        self.push_block(values, true)
    }

    /// The same for relation vectors, which are never quantized (every score adds one).
    pub fn add_relation_block(&mut self, values: Vec<f32>) -> u32 {
        self.push_block(values, false)
    }

    /// A block of one row of any width, never quantized (a relation delta, whose vector is
    /// every relation's): the row, for [`VersionRows::push`].
    pub fn add_wide_row(&mut self, key: String, ts: i64, values: Vec<f32>) -> RowRef {
        let width = values.len();
        let block = self.push_block(values, false);
        self.block_width[block as usize] = width;
        VersionRows::row(key, ts, None, block, 0)
    }

    fn push_block(&mut self, values: Vec<f32>, node: bool) -> u32 {
        debug_assert!(!node || values.len() % self.width.max(1) == 0);
        self.blocks.push(values);
        self.block_width.push(self.width);
        self.node_block.push(node);
        self.codes.push(None);
        (self.blocks.len() - 1) as u32
    }

    /// The node rows of every block, `[n, width]` (what codebooks are learned from).
    pub fn node_values(&self) -> Tensor {
        let values: Vec<f32> = self
            .blocks
            .iter()
            .zip(&self.node_block)
            .filter(|(_, &node)| node)
            .flat_map(|(b, _)| b.iter().copied())
            .collect();
        Tensor::from_slice(&values).reshape([-1, self.width as i64])
    }

    /// Code every node block with `codebooks` (the set's rows then go out as `TWQ1` records when
    /// its format is `pq`); the relative error of the node rows so coded.
    pub fn quantize(&mut self, codebooks: &Codebooks) -> Result<f64, PqError> {
        let (mut err, mut total) = (0.0, 0.0);
        for b in 0..self.blocks.len() {
            if !self.node_block[b] || self.blocks[b].is_empty() {
                continue;
            }
            let rows = Tensor::from_slice(&self.blocks[b]).reshape([-1, self.width as i64]);
            let codes = codebooks.encode(&rows)?;
            let (block_err, block_total) = squared_error(&rows, &codebooks.decode(&codes));
            err += block_err;
            total += block_total;
            self.codes[b] = Some(Vec::<u8>::try_from(codes.reshape([-1])).expect("u8 codes"));
        }
        self.coded_with = Some((codebooks.epoch, codebooks.code_bytes()));
        Ok(if total > 0.0 { err / total } else { 0.0 })
    }

    /// A row whose vector is row `row` of block `block`.
    pub fn row(key: String, ts: i64, bias: Option<f32>, block: u32, row: usize) -> RowRef {
        RowRef {
            key,
            ts,
            bias,
            partition: 0,
            block,
            row: row as u32,
        }
    }

    /// Add rows, in order.
    pub fn extend(&mut self, rows: Vec<RowRef>) {
        self.rows.extend(rows);
    }

    pub fn push(&mut self, row: RowRef) {
        self.rows.push(row);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.rows.iter().map(|r| r.key.as_str())
    }

    /// Each row's embeddings partition, in order.
    pub fn partitions(&self) -> impl ExactSizeIterator<Item = i32> + '_ {
        self.rows.iter().map(|r| r.partition)
    }

    /// Codes of block `block`'s rows (`[n, m]` row-major) once [`VersionRows::quantize`] ran.
    pub fn block_codes(&self, block: u32) -> Option<&[u8]> {
        self.codes.get(block as usize)?.as_deref()
    }

    /// Row `i`'s record in the set's format.
    pub fn encode(&self, i: usize) -> Vec<u8> {
        let r = &self.rows[i];
        let width = self.block_width[r.block as usize];
        let at = r.row as usize * width;
        let vector = &self.blocks[r.block as usize][at..at + width];
        match self.format {
            ValueFormat::Pq => match (&self.codes[r.block as usize], self.coded_with) {
                (Some(codes), Some((codebooks, m))) => {
                    let at = r.row as usize * m;
                    let bias = r.bias.as_slice();
                    let codes = &codes[at..at + m];
                    encode_coded(self.version, self.epoch, r.ts, codebooks, codes, bias)
                }
                // Relation vectors, and node rows before there are codebooks.
                _ => encode_f32le(self.version, self.epoch, r.ts, vector, r.bias),
            },
            ValueFormat::F32le => encode_f32le(self.version, self.epoch, r.ts, vector, r.bias),
            ValueFormat::Json => {
                let mut vector = vector.to_vec();
                vector.extend(r.bias);
                RowRecord {
                    version: self.version,
                    epoch: self.epoch,
                    ts: r.ts,
                    vector,
                }
                .encode(self.format)
            }
        }
    }

    /// Rows `from..to` as `(key, partition, record)`, encoded on all cores when the range is
    /// large.
    pub fn encode_range(&self, from: usize, to: usize) -> Vec<(&str, i32, Vec<u8>)> {
        in_chunks(from, to, |from, to| {
            (from..to)
                .map(|i| {
                    let r = &self.rows[i];
                    (r.key.as_str(), r.partition, self.encode(i))
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Ranges of at most `size` rows covering the set, in order.
    pub fn ranges(&self, size: usize) -> impl Iterator<Item = (usize, usize)> {
        let (len, size) = (self.len(), size.max(1));
        (0..len)
            .step_by(size)
            .map(move |from| (from, (from + size).min(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(format: ValueFormat) -> VersionRows {
        let mut rows = VersionRows::new(7, 2, format, 2);
        let users = rows.add_block(vec![9.0, 9.0, 1.0, 2.0]);
        let movies = rows.add_block(vec![0.5, -0.5]);
        rows.push(VersionRows::row("user:a".into(), 10, None, users, 1));
        rows.push(VersionRows::row(
            "movie:m".into(),
            11,
            Some(0.25),
            movies,
            0,
        ));
        rows
    }

    #[test]
    fn records_are_the_wire_formats_with_the_bias_as_a_last_value() {
        for format in [ValueFormat::Json, ValueFormat::F32le] {
            let rows = rows(format);
            let a = RowRecord::decode(&rows.encode(0)).unwrap();
            assert_eq!(
                (a.version, a.epoch, a.ts, a.vector),
                (7, 2, 10, vec![1.0, 2.0])
            );
            let m = RowRecord::decode(&rows.encode(1)).unwrap();
            assert_eq!((m.ts, m.vector), (11, vec![0.5, -0.5, 0.25]));
        }
        assert_eq!(
            rows(ValueFormat::F32le).encode(0),
            encode_f32le(7, 2, 10, &[1.0, 2.0], None)
        );
    }

    #[test]
    fn ranges_cover_every_row_once_in_order_and_parallel_encoding_keeps_it() {
        let mut many = VersionRows::new(1, 1, ValueFormat::F32le, 3);
        let block = many.add_block((0..40_000).flat_map(|i| [i as f32, 0.0, 1.0]).collect());
        many.extend(
            (0..40_000)
                .map(|i| VersionRows::row(format!("user:{i}"), i as i64, None, block, i))
                .collect(),
        );
        let ranges: Vec<_> = many.ranges(15_000).collect();
        assert_eq!(
            ranges,
            vec![(0, 15_000), (15_000, 30_000), (30_000, 40_000)]
        );
        let all = many.encode_range(0, many.len());
        assert_eq!(all.len(), 40_000);
        for (i, (key, _, record)) in all.iter().enumerate().step_by(997) {
            assert_eq!(*key, format!("user:{i}"));
            assert_eq!(RowRecord::decode(record).unwrap().vector[0], i as f32);
        }
        let json = rows(ValueFormat::Json);
        assert_eq!(json.keys().collect::<Vec<_>>(), ["user:a", "movie:m"]);
        assert_eq!(json.encode_range(0, 2)[1], ("movie:m", 0, json.encode(1)));
    }
}
