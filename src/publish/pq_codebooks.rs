//! Product quantization of embedding rows (Jégou, Douze and Schmid, 2011), as the TwHIN paper
//! compresses its embeddings for low-latency serving: a row of dimension `D` is cut into `m`
//! sub-vectors of `D / m` values, and each is replaced by the index (one byte) of its nearest
//! of 256 centroids, learned per sub-space by k-means. A row then costs `m` bytes instead of
//! `4·D`; a consumer decodes it by concatenating its centroids, and an inner product with an f32
//! query is the sum of `m` table lookups (asymmetric distance).
//!
//! Pure functions over libtorch tensors: [`Codebooks::train`], [`Codebooks::encode`],
//! [`Codebooks::decode`], [`Codebooks::relative_error`], and the codebooks as plain values
//! ([`PqTable`], whose wire record is [`crate::publish::CodebooksRecord`]). Which codebooks a
//! version uses, and when they are retrained, is the publisher's concern
//! ([`crate::publish::Quantizer`]).

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use crate::config::Comparator;
use crate::config::PQ_CENTROIDS as CENTROIDS;

/// The floor of squared norms and distances before a square root, as the model's scores have.
const SCORE_EPS: f64 = 1e-12;

/// Rows encoded at a time (each a contiguous `[m, rows, D / m]` copy).
const ENCODE_CHUNK: i64 = 16_384;

/// Rows whose distances to every centroid are computed at once (`[m, rows, 256]` f32: 32 MiB at
/// 32 sub-spaces).
const NEAREST_CHUNK: i64 = 1_024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PqError {
    #[error("product quantization: dimension {dim} is not a multiple of {subspaces} sub-spaces")]
    Shape { dim: i64, subspaces: i64 },
    #[error("product quantization: {rows} rows are too few to learn {CENTROIDS} centroids")]
    TooFewRows { rows: i64 },
}

/// One codebook per sub-space: `centroids [m, 256, D / m]`, and the epoch that names them (a
/// code is meaningful only with the codebooks of its epoch).
#[derive(Debug)]
pub struct Codebooks {
    pub epoch: u64,
    pub centroids: Tensor,
}

impl PartialEq for Codebooks {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch
            && self.centroids.size() == other.centroids.size()
            && self.centroids.equal(&other.centroids)
    }
}

impl Codebooks {
    pub fn subspaces(&self) -> i64 {
        self.centroids.size()[0]
    }

    pub fn dim(&self) -> i64 {
        self.centroids.size()[0] * self.centroids.size()[2]
    }

    /// Bytes of one row's codes.
    pub fn code_bytes(&self) -> usize {
        self.subspaces() as usize
    }

    /// k-means in every sub-space at once on `rows [n, D]` (at most `sample` of them, drawn
    /// with `seed`), `iterations` Lloyd steps from 256 distinct rows; a centroid left without
    /// rows keeps its place.
    pub fn train(
        rows: &Tensor,
        subspaces: i64,
        sample_rows: usize,
        iterations: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Codebooks, PqError> {
        let (n, dim) = (rows.size()[0], rows.size()[1]);
        if subspaces < 1 || dim % subspaces != 0 {
            return Err(PqError::Shape { dim, subspaces });
        }
        if n < CENTROIDS {
            return Err(PqError::TooFewRows { rows: n });
        }
        tch::no_grad(|| {
            let mut rng = SmallRng::seed_from_u64(seed);
            let rows = rows.to_kind(Kind::Float);
            let device = rows.device();
            let taken = sample_rows.clamp(CENTROIDS as usize, n as usize);
            let pick = |count: usize, rng: &mut SmallRng| {
                let idx: Vec<i64> = sample(rng, n as usize, count)
                    .into_iter()
                    .map(|i| i as i64)
                    .collect();
                Tensor::from_slice(&idx).to_device(device)
            };
            let x = split(&rows.index_select(0, &pick(taken, &mut rng)), subspaces);
            let first = pick(CENTROIDS as usize, &mut rng);
            let mut centroids = split(&rows.index_select(0, &first), subspaces);
            let dsub = dim / subspaces;
            for _ in 0..iterations {
                let assigned = nearest(&x, &centroids); // [m, taken]
                                                        // One flat index per (sub-space, centroid): sums and counts in one scatter each.
                let offsets =
                    Tensor::arange(subspaces, (Kind::Int64, device)).unsqueeze(1) * CENTROIDS;
                let flat = (&assigned + offsets).reshape([-1]);
                let sums = Tensor::zeros([subspaces * CENTROIDS, dsub], (Kind::Float, device))
                    .index_add(0, &flat, &x.reshape([-1, dsub]));
                let counts = Tensor::zeros([subspaces * CENTROIDS], (Kind::Float, device))
                    .index_add(0, &flat, &Tensor::ones_like(&flat).to_kind(Kind::Float));
                let filled = counts.gt(0.0).unsqueeze(1);
                let means = sums / counts.clamp_min(1.0).unsqueeze(1);
                centroids = means
                    .where_self(&filled, &centroids.reshape([-1, dsub]))
                    .reshape([subspaces, CENTROIDS, dsub]);
            }
            Ok(Codebooks {
                epoch,
                centroids: centroids.to_device(Device::Cpu),
            })
        })
    }

    /// Each row's codes, `[n, m]` (u8): the nearest centroid in every sub-space.
    pub fn encode(&self, rows: &Tensor) -> Result<Tensor, PqError> {
        let (n, dim) = (rows.size()[0], rows.size()[1]);
        if dim != self.dim() {
            return Err(PqError::Shape {
                dim,
                subspaces: self.subspaces(),
            });
        }
        Ok(tch::no_grad(|| {
            let centroids = self.centroids.to_device(rows.device());
            let parts: Vec<Tensor> = (0..n)
                .step_by(ENCODE_CHUNK as usize)
                .map(|start| {
                    let len = ENCODE_CHUNK.min(n - start);
                    let x = split(
                        &rows.narrow(0, start, len).to_kind(Kind::Float),
                        self.subspaces(),
                    );
                    nearest(&x, &centroids).transpose(0, 1).to_kind(Kind::Uint8)
                })
                .collect();
            if parts.is_empty() {
                Tensor::zeros([0, self.subspaces()], (Kind::Uint8, rows.device()))
            } else {
                Tensor::cat(&parts, 0)
            }
        }))
    }

    /// Rows from their codes `[n, m]`: the concatenated centroids, `[n, D]` (f32).
    pub fn decode(&self, codes: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let m = self.subspaces();
            let dsub = self.centroids.size()[2];
            let centroids = self.centroids.to_device(codes.device());
            let offsets = Tensor::arange(m, (Kind::Int64, codes.device())) * CENTROIDS;
            let flat = (codes.to_kind(Kind::Int64) + offsets).reshape([-1]);
            centroids
                .reshape([-1, dsub])
                .index_select(0, &flat)
                .reshape([-1, m * dsub])
        })
    }

    /// [`relative_error`] of `rows` against their codes decoded.
    pub fn relative_error(&self, rows: &Tensor) -> Result<f64, PqError> {
        Ok(relative_error(rows, &self.decode(&self.encode(rows)?)))
    }

    /// Scores of `query [D]` (a translated source) against coded rows `codes [n, m]`, without
    /// decoding them (asymmetric distance): per sub-space, the query's term with each of the 256
    /// centroids, then per row the sum of its codes' terms. Equals
    /// `score_targets(cmp, query, decode(codes))` up to rounding, at `n·m` lookups instead of
    /// `n·D` products; `[n]`.
    pub fn code_scores(&self, cmp: Comparator, query: &Tensor, codes: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let (m, dsub) = (self.subspaces(), self.centroids.size()[2]);
            let c = &self.centroids;
            let q = query
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .reshape([m, 1, dsub]);
            let over = |t: Tensor| {
                let t = t.sum_dim_intlist(2, false, Kind::Float).contiguous();
                Vec::<f32>::try_from(t.reshape([-1])).unwrap_or_default()
            };
            // Per sub-space and centroid, the query's term (`[m · 256]`), and for the cosine
            // the centroid's squared norm.
            let (terms, norms) = match cmp {
                Comparator::Dot => (over(c * &q), None),
                Comparator::L2 => (over((c - &q).square()), None),
                Comparator::L1 => (over((c - &q).abs()), None),
                Comparator::Cos => (over(c * &q), Some(over(c.square()))),
            };
            let sums = |table: &[f32]| scan_codes(table, m as usize, codes);
            let scores: Vec<f32> = match cmp {
                Comparator::Dot => sums(&terms),
                Comparator::L2 => sums(&terms)
                    .into_iter()
                    .map(|d| -(d.max(SCORE_EPS as f32)).sqrt())
                    .collect(),
                Comparator::L1 => sums(&terms).into_iter().map(|d| -d).collect(),
                Comparator::Cos => {
                    let q_norm = q
                        .square()
                        .sum(Kind::Float)
                        .clamp_min(SCORE_EPS)
                        .sqrt()
                        .double_value(&[]) as f32;
                    let norms = sums(norms.as_deref().unwrap_or_default());
                    sums(&terms)
                        .into_iter()
                        .zip(norms)
                        .map(|(dot, n)| dot / (n.max(SCORE_EPS as f32).sqrt() * q_norm))
                        .collect()
                }
            };
            Tensor::from_slice(&scores)
        })
    }

    /// The same codebooks, sharing the centroids' storage.
    pub fn shallow_clone(&self) -> Codebooks {
        Codebooks {
            epoch: self.epoch,
            centroids: self.centroids.shallow_clone(),
        }
    }

    /// The codebooks as plain values ([`PqTable`]: what a subscriber decodes with).
    pub fn table(&self) -> PqTable {
        let size = self.centroids.size();
        PqTable {
            epoch: self.epoch,
            subspaces: size[0] as usize,
            sub_dim: size[2] as usize,
            centroids: Vec::<f32>::try_from(&self.centroids.reshape([-1])).expect("f32 centroids"),
        }
    }

    pub fn from_table(table: &PqTable) -> Codebooks {
        Codebooks {
            epoch: table.epoch,
            centroids: Tensor::from_slice(&table.centroids).reshape([
                table.subspaces as i64,
                CENTROIDS,
                table.sub_dim as i64,
            ]),
        }
    }
}

/// Codebooks as plain values, `centroids[(s · 256 + c) · d + j]` for sub-space `s`, centroid `c`
/// and value `j` of `d = D / m`: what a subscriber decodes codes with, without libtorch. Its wire
/// record is [`crate::publish::CodebooksRecord`].
#[derive(Debug, Clone, PartialEq)]
pub struct PqTable {
    pub epoch: u64,
    pub subspaces: usize,
    pub sub_dim: usize,
    pub centroids: Vec<f32>,
}

impl PqTable {
    pub fn dim(&self) -> usize {
        self.subspaces * self.sub_dim
    }

    /// A row from its codes (one byte per sub-space); `None` when there are not `m` of them.
    pub fn decode(&self, codes: &[u8]) -> Option<Vec<f32>> {
        if codes.len() != self.subspaces {
            return None;
        }
        let d = self.sub_dim;
        let mut out = Vec::with_capacity(self.dim());
        for (s, &c) in codes.iter().enumerate() {
            let at = (s * CENTROIDS as usize + c as usize) * d;
            out.extend_from_slice(&self.centroids[at..at + d]);
        }
        Some(out)
    }
}

/// `Σ‖x − x̂‖² / Σ‖x‖²` of `rows` and their approximations `decoded` (0 for an all-zero table).
pub fn relative_error(rows: &Tensor, decoded: &Tensor) -> f64 {
    let (err, total) = squared_error(rows, decoded);
    if total > 0.0 {
        err / total
    } else {
        0.0
    }
}

/// `(Σ‖x − x̂‖², Σ‖x‖²)` of `rows` and `decoded`: the two sums of [`relative_error`], for adding
/// up over several tables.
pub(crate) fn squared_error(rows: &Tensor, decoded: &Tensor) -> (f64, f64) {
    let rows = rows.to_kind(Kind::Float);
    let decoded = decoded.to_device(rows.device());
    let total = rows.square().sum(Kind::Double).double_value(&[]);
    let err = (&rows - decoded)
        .square()
        .sum(Kind::Double)
        .double_value(&[]);
    (err, total)
}

/// Per row of `codes [n, m]` (u8), the sum of its codes' entries of `table` (`[m · 256]`, sub-space
/// by sub-space): `m` lookups a row, the table in L1 cache. Read in place when `codes` is a
/// contiguous host tensor (the served tables are), else copied out first.
fn scan_codes(table: &[f32], m: usize, codes: &Tensor) -> Vec<f32> {
    let owned;
    let bytes: &[u8] = match host_bytes(codes) {
        Some(bytes) => bytes,
        None => {
            owned = Vec::<u8>::try_from(codes.to_device(Device::Cpu).contiguous().reshape([-1]))
                .unwrap_or_default();
            &owned
        }
    };
    if m == 0 || table.len() < m * CENTROIDS as usize {
        return Vec::new();
    }
    bytes
        .chunks_exact(m)
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(s, &c)| table[s * CENTROIDS as usize + c as usize])
                .sum()
        })
        .collect()
}

/// The bytes of a contiguous u8 tensor in host memory; `None` for any other.
fn host_bytes(t: &Tensor) -> Option<&[u8]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Uint8 || !t.is_contiguous() {
        return None;
    }
    if t.numel() == 0 {
        return Some(&[]);
    }
    // SAFETY: a contiguous CPU u8 tensor's storage holds `numel` bytes from its data pointer,
    // alive while `t` is borrowed; served codes are never written after they are published (a
    // version's codes are a new tensor).
    Some(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, t.numel()) })
}

/// `[n, D]` → `[m, n, D / m]`.
fn split(rows: &Tensor, subspaces: i64) -> Tensor {
    let (n, dim) = (rows.size()[0], rows.size()[1]);
    rows.reshape([n, subspaces, dim / subspaces])
        .transpose(0, 1)
        .contiguous()
}

/// Per sub-space, each row's nearest centroid: `x [m, n, d]`, `centroids [m, 256, d]` →
/// `[m, n]` (int64). `‖x − c‖² = ‖x‖² − 2x·c + ‖c‖²`, and `‖x‖²` does not change the argmin. The
/// rows go [`NEAREST_CHUNK`] at a time, so the `[m, chunk, 256]` distances stay small (learning
/// from 65,536 rows in 32 sub-spaces at once took 2 GB), each chunk's in one fused `baddbmm`.
fn nearest(x: &Tensor, centroids: &Tensor) -> Tensor {
    let n = x.size()[1];
    let norms = centroids
        .square()
        .sum_dim_intlist(2, false, Kind::Float)
        .unsqueeze(1);
    let transposed = centroids.transpose(1, 2);
    let parts: Vec<Tensor> = (0..n)
        .step_by(NEAREST_CHUNK as usize)
        .map(|start| {
            let chunk = x.narrow(1, start, NEAREST_CHUNK.min(n - start));
            norms
                .baddbmm(&chunk, &transposed, 1.0, -2.0)
                .argmin(2, false)
        })
        .collect();
    match parts.len() {
        0 => Tensor::zeros([x.size()[0], 0], (Kind::Int64, x.device())),
        _ => Tensor::cat(&parts, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows around 40 centres (uniform in ±1), spread ±0.1; from a seeded generator of its
    /// own (torch's is shared by the tests running beside it).
    fn clustered(seed: u64, n: i64, dim: i64) -> Tensor {
        use rand::Rng;
        let mut rng = SmallRng::seed_from_u64(seed);
        let centres: Vec<f32> = (0..40 * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let values: Vec<f32> = (0..n)
            .flat_map(|_| {
                let c = rng.random_range(0..40) as usize * dim as usize;
                (0..dim as usize)
                    .map(|j| centres[c + j] + rng.random_range(-0.1..0.1))
                    .collect::<Vec<_>>()
            })
            .collect();
        Tensor::from_slice(&values).reshape([n, dim])
    }

    #[test]
    fn codes_round_trip_and_more_subspaces_quantise_finer() {
        let rows = clustered(1, 3000, 32);
        let mut last = f64::INFINITY;
        for m in [2, 4, 8, 16] {
            let books = Codebooks::train(&rows, m, 2000, 10, 7, 1).unwrap();
            let codes = books.encode(&rows).unwrap();
            assert_eq!(codes.size(), vec![3000, m]);
            assert_eq!(codes.kind(), Kind::Uint8);
            assert_eq!(books.decode(&codes).size(), vec![3000, 32]);
            let err = books.relative_error(&rows).unwrap();
            assert!(err < last, "m = {m}: error {err} after {last}");
            last = err;
        }
        // 40 clusters of spread 0.1 in 16 sub-spaces of 2: most of the energy is kept.
        assert!(last < 0.02, "{last}");
    }

    #[test]
    fn a_centroid_of_the_codebook_encodes_to_itself() {
        let rows = clustered(2, 1000, 8);
        let books = Codebooks::train(&rows, 4, 1000, 5, 3, 1).unwrap();
        // Row made of centroid 17 of sub-space 0, 200 of 1, 3 of 2, 255 of 3.
        let pick = [17i64, 200, 3, 255];
        let row = Tensor::cat(
            &pick
                .iter()
                .enumerate()
                .map(|(s, &c)| books.centroids.get(s as i64).get(c))
                .collect::<Vec<_>>(),
            0,
        )
        .unsqueeze(0);
        let codes = books.encode(&row).unwrap();
        let got: Vec<u8> = Vec::try_from(&codes.reshape([-1])).unwrap();
        // Centroids can coincide (duplicate rows); the decoded row is what must match.
        assert!(
            books.decode(&codes).allclose(&row, 0.0, 1e-6, false),
            "{got:?}"
        );
    }

    #[test]
    fn golden_two_subspaces_of_one_value() {
        // 256 distinct values per sub-space: every row is a centroid, codes are exact.
        let v: Vec<f32> = (0..256).flat_map(|i| [i as f32, -(i as f32)]).collect();
        let rows = Tensor::from_slice(&v).reshape([256, 2]);
        let books = Codebooks::train(&rows, 2, 256, 3, 1, 9).unwrap();
        assert_eq!(books.relative_error(&rows).unwrap(), 0.0);
        let codes = books.encode(&rows.narrow(0, 5, 1)).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&books.decode(&codes).reshape([-1])).unwrap(),
            vec![5.0, -5.0]
        );
    }

    #[test]
    fn the_plain_table_decodes_as_libtorch_does() {
        let rows = clustered(3, 600, 12);
        let books = Codebooks::train(&rows, 3, 600, 4, 5, 42).unwrap();
        let table = books.table();
        assert_eq!((table.epoch, table.subspaces, table.sub_dim), (42, 3, 4));
        assert_eq!(Codebooks::from_table(&table), books);
        let codes = books.encode(&rows.narrow(0, 0, 5)).unwrap();
        let decoded = books.decode(&codes);
        for i in 0..5 {
            let row_codes: Vec<u8> = Vec::try_from(&codes.get(i)).unwrap();
            let expected: Vec<f32> = Vec::try_from(&decoded.get(i)).unwrap();
            assert_eq!(table.decode(&row_codes).unwrap(), expected);
        }
        assert_eq!(
            table.decode(&[1, 2]),
            None,
            "two codes for three sub-spaces"
        );
    }

    #[test]
    fn scores_from_codes_are_the_scores_of_the_decoded_rows() {
        let rows = clustered(5, 700, 16);
        let books = Codebooks::train(&rows, 4, 700, 5, 2, 1).unwrap();
        let codes = books.encode(&rows).unwrap();
        let decoded = books.decode(&codes);
        let query = clustered(6, 1, 16).reshape([-1]);
        for cmp in [
            Comparator::Dot,
            Comparator::L2,
            Comparator::L1,
            Comparator::Cos,
        ] {
            let from_codes = books.code_scores(cmp, &query, &codes);
            let exact =
                crate::train::score_targets(cmp, &query.unsqueeze(0), &decoded).reshape([-1]);
            assert!(
                from_codes.allclose(&exact, 1e-4, 1e-4, false),
                "{cmp:?}: {}",
                (&from_codes - &exact).abs().max().double_value(&[])
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let rows = clustered(4, 300, 10);
        assert!(matches!(
            Codebooks::train(&rows, 3, 300, 2, 1, 1),
            Err(PqError::Shape { .. })
        ));
        assert!(matches!(
            Codebooks::train(&rows.narrow(0, 0, 100), 2, 100, 2, 1, 1),
            Err(PqError::TooFewRows { rows: 100 })
        ));
        let books = Codebooks::train(&rows, 2, 300, 2, 1, 1).unwrap();
        assert!(books
            .encode(&Tensor::zeros([3, 8], (Kind::Float, Device::Cpu)))
            .is_err());
    }
}
