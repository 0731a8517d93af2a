//! Serve: what a running daemon shows over HTTP.
//!
//! Owns the routes (`/healthz`, `/readyz`, `/metrics` in `http.rs` with the bearer-token check,
//! `/v1/status` in `status.rs`, `/v1/embeddings` and `/v1/neighbors` in `embeddings.rs`) and the
//! [`ServingView`]: the latest committed version, exactly what Kafka subscribers hold, with the
//! approximate-candidate indexes kept beside it (`ann.rs`). Reads every stage's status; hands on
//! nothing.

mod ann;
mod embeddings;
mod http;
mod status;
mod view;

pub use ann::*;
pub use embeddings::*;
pub use http::*;
pub use status::*;
pub use view::*;

#[cfg(test)]
mod tests;
