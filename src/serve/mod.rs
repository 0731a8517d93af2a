//! Serve: what a running daemon shows over HTTP.
//!
//! Owns the routes (`/healthz`, `/readyz`, `/metrics`, `/v1/status`, `/v1/embeddings`,
//! `/v1/neighbors`), the bearer-token check, and the [`ServingView`]: the latest committed
//! version, exactly what Kafka subscribers hold. Reads every stage's status; hands on nothing.

mod http;
mod view;

pub use http::*;
pub use view::*;
