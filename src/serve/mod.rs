//! Serve: what a running daemon shows over HTTP.
//!
//! Owns the routes (`/healthz`, `/readyz`, `/metrics` in `http.rs` with the bearer-token check,
//! `/v1/status` in `status.rs`, `/v1/embeddings` and `/v1/neighbors` in `embeddings.rs`,
//! `POST /v1/candidates` and the asking of other owners in `candidates.rs`) and the
//! [`ServingView`]: the latest committed version, exactly what Kafka subscribers hold, with the
//! approximate-candidate indexes kept beside it (`ann.rs`). Reads every stage's status; hands on
//! nothing.

mod ann;
mod candidates;
mod embeddings;
mod http;
mod status;
mod view;

pub(crate) use ann::{AnnError, AnnFigures, AnnHandle, AnnIndexes};
pub use candidates::{
    Candidate, CandidatesRequest, CandidatesResponse, GatherReport, OwnerAnswer, Peers,
};
pub use embeddings::{EmbeddingResponse, NeighborsResponse, RankMethod, RowSource};
pub use http::{app, start, HttpState};
pub(crate) use http::{ApiError, DEFAULT_K, MAX_K};
pub(crate) use status::RateWindow;
pub use view::ServingView;

#[cfg(test)]
mod tests;
