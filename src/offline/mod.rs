//! Offline: the commands that run the daemon's stages without Kafka, and the datasets.
//!
//! Owns the real datasets as events, `train` / `eval` on their splits, the warm-start,
//! downstream-value and downstream-stability measurements (a continuing stream, and a full retrain), `replay` (a dataset produced to the engagements topic),
//! `synthetic` (a TwHIN-shaped stream of any size), `export` (a published version as files) and `watch` (a running daemon's figures over
//! time). Uses the store, train, align and publish stages as the daemon does; hands on reports.

mod baselines;
mod datasets;
mod downstream;
pub mod export;
mod genre;
mod quantize;
pub mod replay;
mod retrain;
mod stability;
mod stream_eval;
mod stream_metrics;
pub mod synthetic;
mod train_eval;
pub mod watch;

pub use baselines::*;
pub use datasets::*;
pub use downstream::*;
pub use genre::*;
pub use quantize::PqFigures;
pub use retrain::*;
pub use stability::*;
pub use stream_eval::*;
pub use stream_metrics::*;
pub use train_eval::*;
