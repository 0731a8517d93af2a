//! What product quantization ([`twhin_stream::publish::Codebooks`]) costs a version's consumers, at
//! several compression ratios: one set of codebooks learned on every node row of the version
//! (the types share one space), every row encoded and decoded, then
//!
//! - bytes per row (the codes; and with the codebooks spread over the version's rows), the
//!   compression against f32 rows, the relative squared error;
//! - retrieval: each user's top 10 movies by the published score (`(u + r)·m + b_m`, the user
//!   composed from its recent movies as the server composes it) from decoded rows, against the
//!   top 10 from the f32 rows (recall@10);
//! - a downstream classifier fitted on the f32 rows and frozen, scored on the decoded rows.
//!
//! `twhin-lab stability --scenario retrain` runs it on version A (its classifier is the frozen one).

use serde::Serialize;
use tch::{Kind, Tensor};

use twhin_stream::publish::{relative_error, Codebooks};
use twhin_stream::store::{GraphStore, NodeRef};
use twhin_stream::train::{composed_source, score_targets, translate, Embeddings, TrainParams};

/// Lloyd iterations, and rows sampled to learn the codebooks.
const ITERATIONS: usize = 25;
const SAMPLE_ROWS: usize = 65_536;

/// One compression ratio's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PqTradeoffFigures {
    pub subspaces: i64,
    /// One row's codes.
    pub code_bytes_per_row: usize,
    /// f32 row bytes over code bytes.
    pub compression: f64,
    /// The codes plus the codebooks spread over the version's rows.
    pub bytes_per_row_with_codebooks: f64,
    pub relative_error: f64,
    /// Users' top 10 movies from decoded rows against those from f32 rows.
    pub recall_at_10: f64,
    /// The frozen classifier on decoded rows, and its relative loss of balanced accuracy
    /// against the f32 rows.
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub relative_loss: f64,
}

/// Where the retrieval figure looks: users of `user_type`, movies of `movie_type`, scored with
/// relation `relation`.
pub struct Retrieval {
    pub user_type: usize,
    pub movie_type: usize,
    pub relation: usize,
}

/// The figures at each of `subspaces` (dimension 128: 32, 16, 8 are 16×, 32×, 64×).
/// `classify` scores the frozen classifier on a version's tables: `(accuracy, balanced)`.
pub fn measure_pq(
    model: &Embeddings,
    store: &GraphStore,
    p: &TrainParams,
    retrieval: &Retrieval,
    classify: impl Fn(&[Tensor]) -> (f64, f64),
    subspaces: &[i64],
) -> anyhow::Result<Vec<PqTradeoffFigures>> {
    let tables: Vec<Tensor> = model.tables.iter().map(|t| t.rows()).collect();
    let all = Tensor::cat(&tables.iter().collect::<Vec<_>>(), 0);
    let rows = all.size()[0];
    let reference_top = top_movies(store, p, model, &tables, retrieval)?;
    let (_, balanced_f32) = classify(&tables);
    subspaces
        .iter()
        .map(|&m| {
            let books = Codebooks::train(&all, m, SAMPLE_ROWS, ITERATIONS, p.seed, 1)?;
            let decoded_all = books.decode(&books.encode(&all)?);
            let sizes: Vec<i64> = tables.iter().map(|t| t.size()[0]).collect();
            let decoded = decoded_all.split_with_sizes(sizes.as_slice(), 0);
            let top = top_movies(store, p, model, &decoded, retrieval)?;
            let recall = reference_top
                .iter()
                .zip(&top)
                .map(|(want, got)| got.iter().filter(|g| want.contains(g)).count() as f64 / 10.0)
                .sum::<f64>()
                / reference_top.len().max(1) as f64;
            let (accuracy, balanced_accuracy) = classify(&decoded);
            let f32_bytes = 4.0 * model.dim as f64;
            let codebook_bytes = (books.centroids.numel() * 4) as f64;
            Ok(PqTradeoffFigures {
                subspaces: m,
                code_bytes_per_row: books.code_bytes(),
                compression: f32_bytes / books.code_bytes() as f64,
                bytes_per_row_with_codebooks: books.code_bytes() as f64
                    + codebook_bytes / rows.max(1) as f64,
                relative_error: relative_error(&all, &decoded_all),
                recall_at_10: recall,
                accuracy,
                balanced_accuracy,
                relative_loss: 1.0 - balanced_accuracy / balanced_f32,
            })
        })
        .collect()
}

/// Every user's 10 best-scoring movies under `tables` (the model's relations and biases).
fn top_movies(
    store: &GraphStore,
    p: &TrainParams,
    model: &Embeddings,
    tables: &[Tensor],
    r: &Retrieval,
) -> anyhow::Result<Vec<Vec<i64>>> {
    let (users, movies) = (&tables[r.user_type], &tables[r.movie_type]);
    let bias = model.target_bias(r.movie_type);
    let relation = model.relations.get(r.relation as i64).unsqueeze(0);
    let composed: Vec<Tensor> = (0..users.size()[0])
        .map(|i| {
            let user = NodeRef {
                node_type: r.user_type as u16,
                index: i as u32,
            };
            composed_source(p, store, user, r.movie_type, &users.get(i), movies)
        })
        .collect::<Result<_, _>>()?;
    if composed.is_empty() {
        return Ok(Vec::new());
    }
    let queries = translate(&Tensor::stack(&composed, 0), &relation);
    let mut scores = score_targets(p.comparator, &queries, movies);
    if let Some(b) = bias {
        scores += b.unsqueeze(0);
    }
    let k = 10.min(movies.size()[0]);
    let (_, top) = scores.to_kind(Kind::Float).topk(k, 1, true, true);
    Ok((0..top.size()[0])
        .map(|i| Vec::<i64>::try_from(&top.get(i)).expect("int64 indices"))
        .collect())
}
