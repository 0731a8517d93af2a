//! A version's rows, held as keys and values and encoded only as they are produced.
//!
//! A version that carries every row of a large table (the first one, one after a rotation or a
//! restart without a reference) would otherwise hold every record at once: at a million rows of
//! dimension 128 that is 1.3 GB of JSON beside the 0.5 GB of values it is made from. Encoding a
//! bounded range at a time, on all cores, keeps the publication's memory at the values plus one
//! range.

use crate::config::ValueFormat;
use crate::publish::{encode_f32le, RowRecord};

/// Rows encoded per thread at least (smaller ranges are encoded on the calling thread).
const ENCODE_CHUNK: usize = 16_384;

/// The rows of one version: `(key, event time, vector[, bias])` each, in production order.
#[derive(Debug, Clone)]
pub struct VersionRows {
    version: u64,
    epoch: u64,
    format: ValueFormat,
    width: usize,
    keys: Vec<String>,
    ts: Vec<i64>,
    /// `keys.len() × width`, row after row.
    values: Vec<f32>,
    /// Per row: its target bias, sent as one more value (`train.bias_types`).
    biases: Vec<Option<f32>>,
}

impl VersionRows {
    /// No rows yet, for vectors of `width` values.
    pub fn new(version: u64, epoch: u64, format: ValueFormat, width: usize) -> VersionRows {
        VersionRows {
            version,
            epoch,
            format,
            width,
            keys: Vec::new(),
            ts: Vec::new(),
            values: Vec::new(),
            biases: Vec::new(),
        }
    }

    /// An empty set of the same version, format and width.
    pub fn empty_like(&self) -> VersionRows {
        VersionRows::new(self.version, self.epoch, self.format, self.width)
    }

    pub fn reserve(&mut self, rows: usize) {
        self.keys.reserve(rows);
        self.ts.reserve(rows);
        self.values.reserve(rows * self.width);
        self.biases.reserve(rows);
    }

    /// Add a row; `vector` has the set's width.
    pub fn push(&mut self, key: String, ts: i64, vector: &[f32], bias: Option<f32>) {
        debug_assert_eq!(vector.len(), self.width);
        self.keys.push(key);
        self.ts.push(ts);
        self.values.extend_from_slice(vector);
        self.biases.push(bias);
    }

    /// Move `other`'s rows after these.
    pub fn append(&mut self, other: VersionRows) {
        self.keys.extend(other.keys);
        self.ts.extend(other.ts);
        self.values.extend(other.values);
        self.biases.extend(other.biases);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.keys.iter().map(String::as_str)
    }

    /// Row `i`'s record in the set's format.
    pub fn encode(&self, i: usize) -> Vec<u8> {
        let vector = &self.values[i * self.width..(i + 1) * self.width];
        let (ts, bias) = (self.ts[i], self.biases[i]);
        match self.format {
            ValueFormat::F32le => encode_f32le(self.version, self.epoch, ts, vector, bias),
            ValueFormat::Json => {
                let mut vector = vector.to_vec();
                vector.extend(bias);
                RowRecord {
                    version: self.version,
                    epoch: self.epoch,
                    ts,
                    vector,
                }
                .encode(self.format)
            }
        }
    }

    /// Rows `from..to` as `(key, record)`, encoded on all cores when the range is large.
    pub fn encode_range(&self, from: usize, to: usize) -> Vec<(&str, Vec<u8>)> {
        let encode = |from: usize, to: usize| -> Vec<(&str, Vec<u8>)> {
            (from..to)
                .map(|i| (self.keys[i].as_str(), self.encode(i)))
                .collect()
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = (to - from).div_ceil(threads).max(ENCODE_CHUNK);
        if to - from <= chunk {
            return encode(from, to);
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = (from..to)
                .step_by(chunk)
                .map(|start| scope.spawn(move || encode(start, (start + chunk).min(to))))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("an encoding thread panicked"))
                .collect()
        })
    }

    /// Every row encoded, in order (tests, small sinks).
    pub fn encoded(&self) -> Vec<(String, Vec<u8>)> {
        self.encode_range(0, self.len())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// Ranges of at most `size` rows covering the set, in order.
    pub fn ranges(&self, size: usize) -> impl Iterator<Item = (usize, usize)> {
        let len = self.len();
        (0..len)
            .step_by(size.max(1))
            .map(move |from| (from, (from + size.max(1)).min(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(format: ValueFormat) -> VersionRows {
        let mut rows = VersionRows::new(7, 2, format, 2);
        rows.push("user:a".into(), 10, &[1.0, 2.0], None);
        rows.push("movie:m".into(), 11, &[0.5, -0.5], Some(0.25));
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
        for i in 0..40_000 {
            many.push(format!("user:{i}"), i, &[i as f32, 0.0, 1.0], None);
        }
        let ranges: Vec<_> = many.ranges(15_000).collect();
        assert_eq!(
            ranges,
            vec![(0, 15_000), (15_000, 30_000), (30_000, 40_000)]
        );
        let all = many.encode_range(0, many.len());
        assert_eq!(all.len(), 40_000);
        for (i, (key, record)) in all.iter().enumerate().step_by(997) {
            assert_eq!(*key, format!("user:{i}"));
            assert_eq!(RowRecord::decode(record).unwrap().vector[0], i as f32);
        }
        let mut joined = rows(ValueFormat::Json);
        joined.append(rows(ValueFormat::Json));
        assert_eq!(
            joined.keys().collect::<Vec<_>>(),
            ["user:a", "movie:m", "user:a", "movie:m"]
        );
        assert_eq!(joined.encoded()[3].1, rows(ValueFormat::Json).encode(1));
    }
}
