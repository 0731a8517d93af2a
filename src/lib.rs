//! twhin-stream keeps TwHIN graph embeddings fresh from a live Kafka stream of engagement events.
//!
//! Map of the modules (DESIGN.md §1 has the pipeline):
//!
//! | module      | concern |
//! |-------------|---------|
//! | [`config`]    | the one validated config tree: defaults, `--config` file, `TWHIN_*` environment |
//! | [`schema`]    | node types and relations; the event contract's decoder and validator (pure) |
//! | [`store`]     | the sled graph: node interning, edge log, adjacency, degrees, offsets, dedup |
//! | [`ingest`]    | the ingest actor (Kafka → store, exactly once; DLQ) and the store-writer actor |
//! | [`messages`]  | the typed messages between actors |
//! | [`kafka`]     | client construction, topic definitions and `topics apply`, embedded broker |
//! | [`http`]      | `/healthz`, `/readyz`, `/metrics`, `/v1/status`, the serving API, bearer token |
//! | [`telemetry`] | logging set-up and the metric names |
//! | [`device`]    | the libtorch device (CUDA when present) |
//! | [`score`]     | translation-then-comparison scores (pure) |
//! | [`loss`]      | logistic and softmax losses over scores (pure) |
//! | [`model`]     | embedding tables, relation vectors, sparse Adagrad |
//! | [`train`]     | one training step: negatives, masking, loss, update |
//! | [`trainer`]   | the trainer actor: cursor, replay, adaptive micro-batches, prequential, checkpoints |
//! | [`warm`]      | warm start of new nodes from their embedded neighbours |
//! | [`align`]     | the alignment actor: drift gate, Procrustes onto the anchor, pull controller |
//! | [`drift`]     | drift measures (cosine, relative L2, neighbour overlap) and Procrustes (pure) |
//! | [`freshness`] | event-to-publish latency: Kafka timestamps held until a version covers them |
//! | [`eval`]      | filtered MRR / Hits@k |
//! | [`checkpoint`] | versioned, atomic model checkpoints with an fsynced pointer |
//! | [`publish`]   | version wire formats (JSON, f32le), the numbering ledger, rows a version carries |
//! | [`publisher`] | the publisher: a version's rows then its marker (optionally one transaction), epochs |
//! | [`subscriber`] | applying versions whole on the consumer side: [`subscriber::VersionAssembler`] (pure) |
//! | [`serving`]   | the latest committed version as the serving API reads it |
//! | [`offline`]   | `train` / `eval` on a dataset's standard splits |
//! | [`stability`] | downstream stability: a frozen classifier across versions, drift control on/off |
//! | [`datasets`]  | real datasets as events (pure loading) |
//! | [`replay`]    | `replay`: produce a dataset to the engagements topic |
//! | [`report`]    | `watch`: a running daemon's figures over time, summary and plot |
//! | [`app`]       | the daemon's lifecycle (`run`) and store summaries |

pub mod align;
pub mod app;
pub mod checkpoint;
pub mod config;
pub mod datasets;
pub mod device;
pub mod drift;
pub mod eval;
pub mod freshness;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod loss;
pub mod messages;
pub mod model;
pub mod offline;
pub mod publish;
pub mod publisher;
pub mod replay;
pub mod report;
pub mod schema;
pub mod score;
pub mod serving;
pub mod stability;
pub mod store;
pub mod subscriber;
pub mod telemetry;
pub mod train;
pub mod trainer;
pub mod warm;
