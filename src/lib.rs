//! twhin-stream keeps TwHIN graph embeddings fresh from a live Kafka stream of engagement events.
//!
//! One folder per pipeline stage; each `mod.rs` says what the stage owns and what it hands on.
//! Follow one event from left to right:
//!
//! ```text
//!  twhin.engagements ─► ingest ──► store ──► train ──► align ──► publish ─► twhin.embeddings
//!                        │ decode    sled      step      gate      rows,       twhin.versions
//!                        │ validate  edges +   warm      rotate    marker,
//!                        ▼ dedup     offsets   start     drift     ledger ──► serve (HTTP)
//!  twhin.engagements.dlq                       checkpoints          freshness
//! ```
//!
//! | module        | owns |
//! |---------------|------|
//! | [`ingest`]    | the consumer (assignment at stored offsets, rebalance), dead letters, the store-writer actor |
//! | [`store`]     | the sled graph: keys, node interning, the edge log, adjacency, degrees, offsets, dedup, summaries |
//! | [`changelog`] | the store's state in Kafka: the record, its writing with each batch, the restore (an empty store at start, each assigned partition) |
//! | [`train`]     | the model, scores, losses, the step, warm start, prequential ranks, checkpoints, the trainer actor |
//! | [`align`]     | drift measures, the gate, Procrustes onto the anchor, the pull controller, the alignment actor |
//! | [`publish`]   | wire formats, the ledger, the version producer, freshness, the subscriber's assembler |
//! | [`serve`]     | the HTTP routes, `/v1/status`, the serving view of the latest committed version, its ANN indexes |
//! | [`offline`]   | datasets, `train` / `eval`, warm-start and stability measurements, `replay`, `watch` |
//! | [`app`]       | the daemon: stages built downstream-first, the supervisor, the publication ticker, shutdown |
//! | [`config`]    | the one validated config tree: defaults, `--config` file, `TWHIN_*` environment |
//! | [`schema`]    | node types and relations; the event contract's decoder and validator (pure) |
//! | [`kafka`]     | client construction, topic definitions and `topics apply`, reading a topic to its end, the embedded broker |
//! | [`telemetry`] | logging set-up and the metric names |
//! | [`partition`] | which partition owns a node: Kafka's default partitioner on its key |
//! | [`persist`]   | atomic file writes and the wall clock, shared by checkpoints, snapshots and the ledger |

// The public surface is the named re-exports of each stage's `mod.rs`; everything else is
// `pub(crate)` or narrower, and this lint keeps it so.
#![warn(unreachable_pub)]

pub mod align;
pub mod app;
pub mod changelog;
pub mod config;
pub mod exchange;
pub mod ingest;
pub mod kafka;
pub mod offline;
pub mod partition;
pub mod persist;
pub mod publish;
pub mod remote;
pub mod schema;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod train;

/// `twhin_stream::subscriber::VersionAssembler`, the path `topics/README.md` cites.
pub use publish::subscriber;
