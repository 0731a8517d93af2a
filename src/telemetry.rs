//! Logs (tracing-subscriber, text or JSON) and metrics (the `metrics` facade rendered as
//! Prometheus text). Metric names live here so dashboards have one place to look.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Events read from the engagements topic (valid or not).
pub const EVENTS_CONSUMED: &str = "twhin_ingest_events_consumed_total";
/// Invalid events, by `reason` (see `schema::InvalidReason`).
pub const EVENTS_INVALID: &str = "twhin_ingest_events_invalid_total";
/// Invalid events acknowledged by the dead-letter topic.
pub const DLQ_PRODUCED: &str = "twhin_ingest_dlq_produced_total";
/// Edges durably appended to the store.
pub const EDGES_APPENDED: &str = "twhin_ingest_edges_appended_total";
/// Events not stored again, by `kind`: `event_id` (dedup window), `redelivered` (offset) or
/// `forwarded_copy` (a forwarded event the store holds already).
pub const DUPLICATES: &str = "twhin_ingest_duplicates_total";
/// Valid events consumed from a partition that does not own their source, forwarded to the one
/// that does (an erasure counts once, whatever the partitions it goes to).
pub const FORWARDED: &str = "twhin_ingest_forwarded_total";
/// Forwarded events consumed from the routed topic.
pub const FORWARDED_IN: &str = "twhin_ingest_forwarded_in_total";
/// Nodes erased by erase events.
pub const NODES_ERASED: &str = "twhin_ingest_nodes_erased_total";
/// Add events not stored because they name an erased node.
pub const ERASED_REFUSED: &str = "twhin_ingest_erased_refused_total";
/// New nodes interned.
pub const NODES_CREATED: &str = "twhin_ingest_nodes_created_total";
/// Time to make one batch durable (DLQ acknowledgements + atomic append + flush), seconds.
pub const BATCH_SECONDS: &str = "twhin_ingest_batch_seconds";
/// Events per written batch.
pub const BATCH_EVENTS: &str = "twhin_ingest_batch_events";
/// Messages behind the partition's high watermark, from the stored offset, by `topic` (the
/// engagements topic, the routed topic) and `partition`.
pub const CONSUMER_LAG: &str = "twhin_ingest_consumer_lag";
/// Partitions consumed again from their start because their history changed, by `reason`:
/// `out_of_range` or `history_changed`.
pub const PARTITION_RESETS: &str = "twhin_ingest_partition_resets_total";
/// Partition assignments received.
pub const REBALANCES: &str = "twhin_ingest_rebalances_total";
pub const MOVED_IN_EVENTS: &str = "twhin_ingest_moved_in_events_total";
/// Failed attempts to write a batch (retried).
pub const BATCH_RETRIES: &str = "twhin_ingest_batch_retries_total";
/// Edges in the store (gauge).
pub const STORE_EDGES: &str = "twhin_store_edges";
/// Nodes in the store by `type` (gauge).
pub const STORE_NODES: &str = "twhin_store_nodes";

/// Training steps taken (skipped ones included).
pub const TRAIN_STEPS: &str = "twhin_train_steps_total";
/// Steps skipped because the loss or a gradient was not finite.
pub const TRAIN_SKIPPED: &str = "twhin_train_skipped_steps_total";
/// Edges trained, by `kind`: `new` (from the cursor) or `replay` (uniform from the log); and
/// `left_to_owners`, new edges passed over because another instance owns their source.
pub const TRAIN_EDGES: &str = "twhin_train_edges_total";
/// Loss of the last step that was not skipped.
pub const TRAIN_LOSS: &str = "twhin_train_loss";
/// Time of one step (read, prequential test, new rows, replay sample, train step), seconds.
pub const TRAIN_STEP_SECONDS: &str = "twhin_train_step_seconds";
/// Stored edges the trainer has not trained yet.
pub const TRAIN_BACKLOG: &str = "twhin_train_backlog_edges";
/// The current micro-batch size (adapts to the backlog).
pub const TRAIN_BATCH_EDGES: &str = "twhin_train_batch_edges";
/// New rows initialised, by `init`: `warm` (from neighbours) or `random`.
pub const TRAIN_ROWS: &str = "twhin_train_rows_initialised_total";
/// Checkpoints written.
pub const TRAIN_CHECKPOINTS: &str = "twhin_train_checkpoints_total";
/// Prequential (test-then-train) MRR over the last `trainer.prequential_window` ranks.
pub const PREQ_MRR: &str = "twhin_prequential_mrr";
/// Prequential Hits@10 over the same window.
pub const PREQ_HITS10: &str = "twhin_prequential_hits_at_10";
/// Prequential Hits@10 per relation (label `relation`).
pub const PREQ_RELATION_HITS10: &str = "twhin_prequential_relation_hits_at_10";
/// Edges ranked prequentially.
pub const PREQ_RANKED: &str = "twhin_prequential_ranked_total";

/// Rows of other owners' partitions cached (`crate::remote`, gauge).
pub const REMOTE_ROWS: &str = "twhin_remote_rows";
/// The largest lag of a followed partition behind its owner's newest published version: the age
/// of the oldest marker read and not applied yet (gauge, seconds).
pub const REMOTE_LAG_SECONDS: &str = "twhin_remote_lag_seconds";
/// From an owner's publication of a version (its marker's timestamp) to its application in the
/// cache, seconds.
pub const REMOTE_APPLY_DELAY_SECONDS: &str = "twhin_remote_apply_delay_seconds";
/// Partitions owned elsewhere, by `state`: `followed`, or `uncached` (`remote.max_rows`).
pub const REMOTE_PARTITIONS: &str = "twhin_remote_partitions";
/// Records of the published topics the follower could not decode (skipped).
pub const REMOTE_SKIPPED_RECORDS: &str = "twhin_remote_skipped_records";
/// Partitions owned elsewhere that `/v1/neighbors` needed candidates of, by `from`: `owner`
/// (its owner answered `POST /v1/candidates`) or `local` (ranked from this instance's copies:
/// no owner advertised, or it failed or did not answer within `http.gather_timeout_ms`).
pub const NEIGHBORS_GATHERED: &str = "twhin_neighbors_gathered_partitions_total";
/// Gradient rows of the exchange (`crate::exchange`), by `kind`: `sent` (to other owners, with
/// a committed version), `applied` (to owned rows), `unknown` (a node the store does not know),
/// `refreshed` (rows owned elsewhere replaced by their owner's published row).
pub const EXCHANGE_ROWS: &str = "twhin_exchange_rows_total";

/// Versions whose marker the broker acknowledged.
pub const PUBLISH_VERSIONS: &str = "twhin_publish_versions_total";
/// Embedding rows (nodes and relations) published.
pub const PUBLISH_ROWS: &str = "twhin_publish_rows_total";
/// The last acknowledged version.
pub const PUBLISH_LAST_VERSION: &str = "twhin_publish_last_version";
/// Publications that failed (retried at the next interval under the same number).
pub const PUBLISH_FAILURES: &str = "twhin_publish_failures_total";

/// Drift of the last published version, by `against` (previous, anchor) and `measure`
/// (cosine_mean, cosine_p99, relative_l2, knn_overlap).
pub const ALIGN_DRIFT: &str = "twhin_align_drift";
/// Strength of the L2 pull toward the reference.
pub const ALIGN_PULL: &str = "twhin_align_pull_strength";
/// Relative residual of the last rotation onto the anchor.
pub const ALIGN_RESIDUAL: &str = "twhin_align_procrustes_residual";
/// Versions held back by the gate, by reason (non_finite, drift).
pub const ALIGN_HELD: &str = "twhin_align_held_total";
/// Actors restarted by their supervisor, by actor.
pub const ACTOR_RESTARTS: &str = "twhin_actor_restarts_total";
/// Seconds from an event's Kafka timestamp to the commit of the first version after it was
/// trained; label `events`: `all`, or `new_node` (the events that created a node).
pub const PUBLISH_FRESHNESS: &str = "twhin_publish_freshness_seconds";

/// Install the global tracing subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init_logging(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests, repeated CLI calls in one process) is harmless: keep the first.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Install the global metrics recorder and return the handle that renders `/metrics`.
pub fn init_metrics() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SECONDS.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_EVENTS.into()),
                &[
                    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(TRAIN_STEP_SECONDS.into()),
                &[
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(REMOTE_APPLY_DELAY_SECONDS.into()),
                &[
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(PUBLISH_FRESHNESS.into()),
                &[
                    0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ],
            )
        })
        .expect("static bucket lists are non-empty");
    match builder.install_recorder() {
        Ok(handle) => {
            describe();
            handle
        }
        // Already installed in this process: render from a fresh, detached recorder.
        Err(_) => PrometheusBuilder::new().build_recorder().handle(),
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_CONSUMED, "Events read from the engagements topic");
    describe_counter!(
        EVENTS_INVALID,
        "Invalid events sent to the dead-letter topic, by reason"
    );
    describe_counter!(
        DLQ_PRODUCED,
        "Invalid events acknowledged by the dead-letter topic"
    );
    describe_counter!(EDGES_APPENDED, "Edges durably appended to the graph store");
    describe_counter!(DUPLICATES, "Events not stored again, by kind");
    describe_counter!(
        FORWARDED,
        "Events forwarded to the partition that owns their source"
    );
    describe_counter!(
        FORWARDED_IN,
        "Forwarded events consumed from the routed topic"
    );
    describe_counter!(NODES_CREATED, "Nodes created in the graph store");
    describe_counter!(NODES_ERASED, "Nodes erased by erase events");
    describe_counter!(
        ERASED_REFUSED,
        "Add events not stored because they name an erased node"
    );
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Time to make one ingest batch durable"
    );
    describe_histogram!(BATCH_EVENTS, Unit::Count, "Events per ingest batch");
    describe_gauge!(
        CONSUMER_LAG,
        "Messages between the stored offset and the high watermark"
    );
    describe_counter!(REBALANCES, "Partition assignments received");
    describe_counter!(
        MOVED_IN_EVENTS,
        "Events an assigned partition's changelog added to the store (stored by its previous owner)"
    );
    describe_counter!(
        PARTITION_RESETS,
        "Partitions consumed again from their start after their history changed, by reason"
    );
    describe_counter!(
        BATCH_RETRIES,
        "Failed attempts to make a batch durable (retried)"
    );
    describe_gauge!(STORE_EDGES, "Edges in the graph store");
    describe_gauge!(STORE_NODES, "Nodes in the graph store, by type");
    describe_counter!(TRAIN_STEPS, "Training steps taken");
    describe_counter!(
        TRAIN_SKIPPED,
        "Training steps skipped (non-finite loss or gradient)"
    );
    describe_counter!(
        TRAIN_EDGES,
        "Edges trained, by kind (new, replay), and new edges left to their source's owner (left_to_owners)"
    );
    describe_gauge!(TRAIN_LOSS, "Loss of the last training step");
    describe_histogram!(
        TRAIN_STEP_SECONDS,
        Unit::Seconds,
        "Time of one training step"
    );
    describe_gauge!(TRAIN_BACKLOG, "Stored edges not trained yet");
    describe_gauge!(TRAIN_BATCH_EDGES, "Current micro-batch size of new edges");
    describe_counter!(
        TRAIN_ROWS,
        "New embedding rows initialised, by init (warm, random)"
    );
    describe_counter!(TRAIN_CHECKPOINTS, "Model checkpoints written");
    describe_gauge!(PREQ_MRR, "Prequential MRR over the recent window");
    describe_gauge!(PREQ_HITS10, "Prequential Hits@10 over the recent window");
    describe_gauge!(
        PREQ_RELATION_HITS10,
        "Prequential Hits@10 over the recent window, per relation"
    );
    describe_counter!(
        PREQ_RANKED,
        "Edges ranked prequentially (test before train)"
    );
    describe_counter!(PUBLISH_VERSIONS, "Versions published (marker acknowledged)");
    describe_counter!(PUBLISH_ROWS, "Embedding rows published");
    describe_gauge!(PUBLISH_LAST_VERSION, "Last acknowledged version");
    describe_counter!(PUBLISH_FAILURES, "Failed publications (retried)");
    describe_gauge!(ALIGN_DRIFT, "Drift of the last published version");
    describe_gauge!(ALIGN_PULL, "Strength of the L2 pull toward the reference");
    describe_gauge!(
        ALIGN_RESIDUAL,
        "Residual of the last rotation onto the anchor"
    );
    describe_counter!(
        ALIGN_HELD,
        "Versions held back by the drift gate, by reason"
    );
    describe_gauge!(REMOTE_ROWS, "Rows of partitions owned elsewhere, cached");
    describe_gauge!(
        REMOTE_LAG_SECONDS,
        "Largest lag of a followed partition behind its owner's newest published version"
    );
    describe_histogram!(
        REMOTE_APPLY_DELAY_SECONDS,
        Unit::Seconds,
        "From an owner's publication of a version to its application in this instance's cache"
    );
    describe_gauge!(
        REMOTE_PARTITIONS,
        "Partitions owned elsewhere, by state (followed, uncached)"
    );
    describe_gauge!(
        REMOTE_SKIPPED_RECORDS,
        "Records of the published topics the remote follower could not decode"
    );
    describe_counter!(
        NEIGHBORS_GATHERED,
        "Partitions owned elsewhere /v1/neighbors ranked, by where from (owner, local)"
    );
    describe_counter!(
        EXCHANGE_ROWS,
        "Gradient rows of the exchange, by kind (sent, applied, started, unknown, refreshed)"
    );
    describe_counter!(ACTOR_RESTARTS, "Actors restarted by their supervisor");
    describe_histogram!(
        PUBLISH_FRESHNESS,
        Unit::Seconds,
        "Event (Kafka timestamp) to the commit of the first version after it was trained, for all events and for those that created a node"
    );
}
