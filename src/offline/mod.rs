//! Offline: the commands that run the daemon's stages without Kafka, and the datasets.
//!
//! Owns the real datasets as events, `train` / `eval` on their splits, `stream-eval` (the
//! prequential protocol with its popularity and item-to-item baselines), `replay` (a dataset
//! produced to the engagements topic), `synthetic` (a TwHIN-shaped stream of any size), `export`
//! (a published version as files) and `watch` (a running daemon's figures over time): what an
//! operator, or a user with their own graph or stream, runs. Uses the store, train, align and
//! publish stages as the daemon does; hands on reports. The measurements of the product on fixed
//! datasets (stability, retrain, downstream value, warm start) live in the `twhin-lab` crate.

mod baselines;
mod datasets;
pub mod export;
pub mod replay;
mod stream_eval;
mod stream_metrics;
pub mod synthetic;
mod train_eval;
pub mod watch;

pub(crate) use baselines::{ItemKnn, Popularity};
pub use datasets::{
    apply_dataset_schema, movielens_genres, movielens_users, replay_events, DataArgs, DataSource,
    Dataset, Row,
};
pub(crate) use datasets::{read_splits, ReplayEvent};
pub use stream_eval::{stream_eval, StreamEvalOptions};
pub(crate) use stream_metrics::{
    realistic_rank, Accounting, Figures, Phase, RankedEvent, ANY, HISTORY_BUCKETS, NEW_USERS,
};
pub use train_eval::{
    append_events, checked_replay_events, drain, eval, open_offline_store, run_dir, split_events,
    stream_start, train,
};
