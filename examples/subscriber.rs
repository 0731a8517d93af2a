//! A downstream subscriber of twhin-stream's versions: reads the embeddings and versions topics
//! from the beginning (`isolation.level=read_committed`, plain assign, no offsets committed),
//! feeds [`VersionAssembler`] (each embeddings record with the partition it was read from), and
//! prints one JSON line per version applied in a scope (whole versions only; with contract 3, one
//! line per partition of a round, `"partition"` naming it; see `topics/README.md`). Once both topics are read to their ends it catches up past
//! versions that compaction left incomplete (`VersionAssembler::catch_up`).
//!
//! ```text
//! cargo run --example subscriber -- --bootstrap-servers 127.0.0.1:9092 \
//!     --summary-json summary.json --idle-exit-secs 30
//! ```
//!
//! It stops on SIGINT/SIGTERM, or after `--idle-exit-secs` without a new record, and then writes
//! the summary (versions applied and when, nodes in the table, counters).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use twhin_stream::publish::{tombstone_attempt, AttemptRef, DecodeError, Record, VersionMarker};
use twhin_stream::subscriber::{Applied, Counts, VersionAssembler, RELATION_DELTA_PREFIX};

/// How long `--idle-exit-secs` waits for the very first record at least.
const FIRST_RECORD_GRACE: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(about = "Apply twhin-stream versions whole, from the embeddings and versions topics")]
struct Args {
    #[arg(
        long,
        env = "TWHIN_KAFKA__BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap_servers: String,
    #[arg(long, default_value = "twhin.embeddings")]
    embeddings_topic: String,
    #[arg(long, default_value = "twhin.versions")]
    versions_topic: String,
    /// Write a JSON summary here at exit.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Write the keys of the table at exit here, one per line, sorted.
    #[arg(long)]
    keys_out: Option<PathBuf>,
    /// Stop after this many seconds without a new record (before the first record: at least 300
    /// s after the start; default: run until a signal).
    #[arg(long)]
    idle_exit_secs: Option<u64>,
}

#[derive(Serialize)]
struct AppliedAt {
    #[serde(flatten)]
    applied: Applied,
    applied_at_ms: u64,
}

#[derive(Serialize)]
struct Summary {
    versions_applied: usize,
    /// The highest version applied in any scope, and its epoch.
    last_version: u64,
    last_epoch: Option<u64>,
    /// The attempt each scope holds: `"null"` the whole topic (contracts 1 and 2), else the
    /// partition (contract 3).
    held: BTreeMap<String, AttemptRef>,
    nodes: usize,
    relations: usize,
    rows_read: u64,
    /// Tombstones (erased nodes) among the rows read.
    tombstones_read: u64,
    markers_read: u64,
    /// Records that were not a row, a tombstone or a marker (undecodable, keyless, a null value
    /// without its version headers).
    skipped_records: u64,
    caught_up: bool,
    stopped_by: &'static str,
    /// Epochs of the codebooks held (`publish.format = "pq"`), in any scope.
    codebooks: Vec<u64>,
    /// The sum of every value of the node rows and relation vectors held (not the
    /// partitions' shares of the relations), in f64: a check that two readers hold the same
    /// table (`examples/subscriber.py` prints the same figure, `export` writes those rows).
    checksum: f64,
    counts: Counts,
    applied: Vec<AppliedAt>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A consumer of every partition of `topic` from the beginning. One consumer per topic, because
/// a partition-EOF event names the partition but not the topic.
fn consumer(args: &Args, topic: &str) -> anyhow::Result<(StreamConsumer, usize)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("group.id", "twhin-subscriber-example")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .with_context(|| format!("consumer for {topic}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    anyhow::ensure!(
        partitions > 0,
        "topic {topic} has no partitions (does it exist?)"
    );
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok((consumer, partitions))
}

struct State {
    assembler: VersionAssembler,
    applied: Vec<AppliedAt>,
    rows_read: u64,
    tombstones_read: u64,
    markers_read: u64,
    skipped: u64,
    /// `(is_versions_topic, partition)` that reached their end at least once.
    at_end: HashSet<(bool, i32)>,
    partitions: usize,
    caught_up: bool,
}

impl State {
    fn report(&mut self, applied: Vec<Applied>) {
        for a in applied {
            let line = AppliedAt {
                applied: a,
                applied_at_ms: now_ms(),
            };
            println!("{}", serde_json::to_string(&line).expect("plain data"));
            self.applied.push(line);
        }
    }

    fn row(&mut self, m: &BorrowedMessage<'_>) {
        if m.payload().is_none() {
            return self.tombstone(m);
        }
        let decoded = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .zip(m.payload())
            .map(|(k, p)| (k, Record::decode(p)));
        match decoded {
            Some((key, Ok(record))) => {
                self.rows_read += 1;
                let applied = self.assembler.push_record(m.partition(), key, record);
                self.report(applied);
            }
            Some((key, Err(e))) => {
                self.skipped += 1;
                eprintln!("skipping row {key} at offset {}: {e}", m.offset());
            }
            None => self.skipped += 1,
        }
    }

    /// A null value: an erased node, its version and epoch in the headers.
    fn tombstone(&mut self, m: &BorrowedMessage<'_>) {
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        let attempt = m.headers().and_then(|h| {
            tombstone_attempt(h.iter().map(|x| (x.key, x.value.unwrap_or_default())))
        });
        match (key, attempt) {
            (Some(key), Some((version, epoch))) => {
                self.rows_read += 1;
                self.tombstones_read += 1;
                let applied = self
                    .assembler
                    .push_tombstone(m.partition(), key, version, epoch);
                self.report(applied);
            }
            _ => {
                self.skipped += 1;
                eprintln!(
                    "skipping a null record at offset {} without its version headers",
                    m.offset()
                );
            }
        }
    }

    /// A marker of a later contract stops the subscriber: its rules may differ.
    fn marker(&mut self, m: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        match m.payload().map(VersionMarker::decode) {
            Some(Ok(marker)) => {
                self.markers_read += 1;
                let applied = self.assembler.push_marker(marker);
                self.report(applied);
            }
            Some(Err(e @ DecodeError::Contract { .. })) => {
                anyhow::bail!("{} offset {}: {e}", m.topic(), m.offset())
            }
            Some(Err(e)) => {
                self.skipped += 1;
                eprintln!("skipping marker at offset {}: {e}", m.offset());
            }
            None => self.skipped += 1,
        }
        Ok(())
    }

    /// Handle one poll result; `true` when it was a record.
    fn handle(
        &mut self,
        versions: bool,
        r: Result<BorrowedMessage<'_>, KafkaError>,
    ) -> anyhow::Result<bool> {
        match r {
            Ok(m) if versions => self.marker(&m)?,
            Ok(m) => self.row(&m),
            Err(KafkaError::PartitionEOF(p)) => {
                self.at_end.insert((versions, p));
                if !self.caught_up && self.at_end.len() == self.partitions {
                    // The backlog is read: only now can a version that is still incomplete be
                    // known to stay so (compaction).
                    self.caught_up = true;
                    let applied = self.assembler.catch_up();
                    self.report(applied);
                    eprintln!(
                        "backlog read: version {} applied (newest in any partition), {} nodes",
                        self.assembler.applied_version(),
                        self.assembler.nodes()
                    );
                }
                return Ok(false);
            }
            Err(e) => {
                eprintln!("consumer: {e}");
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (rows, row_partitions) = consumer(&args, &args.embeddings_topic)?;
    let (markers, marker_partitions) = consumer(&args, &args.versions_topic)?;
    let mut state = State {
        assembler: VersionAssembler::new(),
        applied: Vec::new(),
        rows_read: 0,
        tombstones_read: 0,
        markers_read: 0,
        skipped: 0,
        at_end: HashSet::new(),
        partitions: row_partitions + marker_partitions,
        caught_up: false,
    };
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let idle = args.idle_exit_secs.map(Duration::from_secs);
    // Idle counts from the last record; before the first one, from the start with a longer
    // grace: a daemon may publish its first version only after minutes of input (a stream that
    // opens with relations its trainer does not train, say).
    let started = tokio::time::Instant::now();
    let mut last_record: Option<tokio::time::Instant> = None;
    let stopped_by = loop {
        let deadline = idle.map(|d| match last_record {
            Some(t) => t + d,
            None => started + d.max(FIRST_RECORD_GRACE),
        });
        let record = tokio::select! {
            r = rows.recv() => state.handle(false, r)?,
            r = markers.recv() => state.handle(true, r)?,
            _ = int.recv() => break "SIGINT",
            _ = term.recv() => break "SIGTERM",
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => break "idle",
        };
        if record {
            last_record = Some(tokio::time::Instant::now());
        }
    };
    let a = &state.assembler;
    eprintln!(
        "stopped ({stopped_by}): version {} applied, {} nodes, {:?}",
        a.applied_version(),
        a.nodes(),
        a.counts()
    );
    if let Some(path) = &args.summary_json {
        let summary = Summary {
            versions_applied: state.applied.len(),
            last_version: a.applied_version(),
            last_epoch: a.applied_epoch(),
            held: (a.applied_attempts().into_iter())
                .map(|(scope, at)| {
                    (
                        scope.map_or_else(|| "null".to_string(), |q| q.to_string()),
                        at,
                    )
                })
                .collect(),
            nodes: a.nodes(),
            relations: a.table().len() - a.nodes(),
            rows_read: state.rows_read,
            tombstones_read: state.tombstones_read,
            markers_read: state.markers_read,
            skipped_records: state.skipped,
            caught_up: state.caught_up,
            stopped_by,
            codebooks: a.codebook_epochs().into_iter().collect(),
            checksum: (a.table().iter())
                .filter(|(k, _)| !k.starts_with(RELATION_DELTA_PREFIX))
                .flat_map(|(_, e)| &e.vector)
                .map(|&x| f64::from(x))
                .sum(),
            counts: a.counts(),
            applied: state.applied,
        };
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.keys_out {
        let mut keys: Vec<&str> = a.table().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut text = keys.join("\n");
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    // Closing a consumer can hang (rust-rdkafka issues 453, 597, 611); the process is ending.
    std::mem::forget(rows);
    std::mem::forget(markers);
    Ok(())
}
