//! The `twhin-stream` command line. Each subcommand loads and validates the config first.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use twhin_stream::app;
use twhin_stream::config::Config;
use twhin_stream::kafka::{self, ApplyOutcome, EmbeddedKafka};
use twhin_stream::offline::synthetic::{SyntheticArgs, Workload};
use twhin_stream::offline::{self, replay, watch, DataArgs, DataSource, Dataset};
use twhin_stream::store::{GraphStore, StoreSummary};
use twhin_stream::telemetry;

#[derive(Parser)]
#[command(
    name = "twhin-stream",
    version,
    about = "Keeps TwHIN graph embeddings fresh from a live Kafka stream"
)]
struct Cli {
    /// Config file merged over config/default.toml (environment variables TWHIN_* win over both).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM/SIGINT.
    Run {
        /// Start librdkafka's in-process Kafka-protocol broker when kafka.bootstrap_servers is empty.
        #[arg(long)]
        embedded_kafka: bool,
    },
    /// Manage the topics defined in kafka.topics_dir.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Produce a dataset to the engagements topic as events, in order.
    Replay {
        /// umls, nations, kinships, movielens-100k, or synthetic (a TwHIN-shaped stream of the
        /// config's schema: --nodes, --edges).
        #[arg(required_unless_present = "data")]
        dataset: Option<ReplaySource>,
        /// A folder of train.tsv, valid.tsv, test.tsv instead (see `train --help`).
        #[arg(long, value_name = "DIR", conflicts_with = "dataset")]
        data: Option<PathBuf>,
        /// Events per second (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Splits, in order: all, or any of train, valid, test.
        #[arg(long, value_delimiter = ',', default_value = "all")]
        splits: Vec<String>,
        /// Produce only the first N events.
        #[arg(long)]
        limit: Option<usize>,
        /// Overrides kafka.bootstrap_servers.
        #[arg(long)]
        bootstrap_servers: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        synthetic: SyntheticArgs,
    },
    /// Write the synthetic TwHIN-shaped stream of the config's schema (the one `replay
    /// synthetic` produces) as a dataset folder for `--data DIR`: train.tsv, valid.tsv, test.tsv
    /// (85/5/10% of the events in order).
    Synthetic {
        #[command(flatten)]
        synthetic: SyntheticArgs,
        /// The folder to write (created if missing; its split files are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train from scratch on a dataset's train split (offline mode, same trainer).
    Train {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Filtered MRR and Hits@1/3/10 of the model `train` saved, on a held-out split.
    Eval {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long)]
        json: bool,
    },
    /// Prequential quality on the engagement stream in time order (every engagement ranked
    /// before training on it), the model beside popularity-so-far and item-to-item
    /// co-occurrence on the same events.
    StreamEval {
        #[command(flatten)]
        opts: twhin_stream::offline::StreamEvalOptions,
        /// Print the report as JSON (the summary otherwise).
        #[arg(long)]
        json: bool,
    },
    /// Follow a running daemon (`/v1/status`) until it has consumed, trained and published
    /// `--until-events` events: progress, then a summary, the timeline and a plot.
    Watch {
        /// The daemon's HTTP address (default: http.bind).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        #[arg(long)]
        until_events: u64,
        /// Timeline as JSON lines.
        #[arg(long, value_name = "PATH")]
        timeline: Option<PathBuf>,
        /// The figures over time as an SVG image.
        #[arg(long, value_name = "PATH")]
        plot: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a published version, read from the embeddings and versions topics as a subscriber
    /// reads them (whole versions only), as files: per node type `OUT/<type>.npy` (float32,
    /// `[rows, dim]`) with `OUT/<type>.ids` (one id a line, in row order), `OUT/relations.npy`
    /// with `OUT/relations.ids`, and `OUT/meta.json`; or the same as `.tsv` or `.parquet`.
    Export {
        /// The version (default: the newest whole version on the topics).
        #[arg(long)]
        version: Option<u64>,
        #[arg(long, value_enum, default_value = "npy")]
        format: offline::export::ExportFormat,
        /// The folder to write (created if missing; its files are replaced).
        out: PathBuf,
        /// Give up reading the topics after this long.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Summarise the store (read-only; the daemon must be stopped).
    Inspect {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Store folder (default: storage.path).
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

/// What `replay` produces: a built-in dataset or the synthetic stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplaySource {
    Dataset(Dataset),
    Synthetic,
}

impl std::str::FromStr for ReplaySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "synthetic" {
            return Ok(ReplaySource::Synthetic);
        }
        s.parse().map(ReplaySource::Dataset).map_err(|_: String| {
            format!(
                "unknown dataset {s:?}; expected one of {}, synthetic (with --nodes and --edges), \
                 or --data DIR for a folder",
                Dataset::ALL.map(|d| d.name()).join(", ")
            )
        })
    }
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create the missing topics and report the ones that exist.
    Apply,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let source = dataset_of(&cli.command);
    // The dataset's own config file unless --config names one, then its schema (inferred from
    // the files unless that file has a [schema] section).
    let config_file = cli
        .config
        .clone()
        .or_else(|| source.as_ref().and_then(DataSource::config_file));
    let mut cfg = Config::load(config_file.as_deref())?;
    telemetry::init_logging(&cfg.log);
    if let Some(source) = &source {
        offline::apply_dataset_schema(&mut cfg, source, config_file.as_deref())?;
    }
    match cli.command {
        Command::Run { embedded_kafka } => run_daemon(cfg, embedded_kafka),
        Command::Topics {
            action: TopicsAction::Apply,
        } => apply_topics(&cfg),
        Command::Replay {
            dataset: Some(ReplaySource::Synthetic),
            rate,
            splits,
            limit,
            bootstrap_servers,
            json,
            synthetic,
            ..
        } => {
            anyhow::ensure!(
                splits == ["all"],
                "--splits is for datasets; the synthetic stream is one (`synthetic --out` splits it)"
            );
            replay_synthetic(cfg, &synthetic, rate, limit, bootstrap_servers, json)
        }
        Command::Replay {
            rate,
            splits,
            limit,
            bootstrap_servers,
            json,
            synthetic,
            ..
        } => {
            anyhow::ensure!(
                !synthetic.given(),
                "--nodes and --edges are for `replay synthetic`"
            );
            let source = source.expect("replay reads a dataset");
            replay_dataset(cfg, &source, rate, &splits, limit, bootstrap_servers, json)
        }
        Command::Synthetic {
            synthetic,
            out,
            json,
        } => write_synthetic(&cfg, &synthetic, &out, json),
        Command::Train { data, epochs, json } => train_offline(&cfg, &data.source(), epochs, json),
        Command::Eval { data, split, json } => eval_offline(&cfg, &data.source(), &split, json),
        Command::StreamEval { opts, json } => stream_eval(&cfg, &opts, json),
        Command::Watch {
            http,
            until_events,
            timeline,
            plot,
            interval_ms,
            timeout_secs,
            json,
        } => {
            let opts = watch::WatchOptions {
                addr: match http {
                    Some(a) => a,
                    None => cfg.http_bind()?,
                },
                token: (!cfg.http.bearer_token.is_empty()).then(|| cfg.http.bearer_token.clone()),
                until_events,
                interval: std::time::Duration::from_millis(interval_ms),
                timeout: std::time::Duration::from_secs(timeout_secs),
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            watch_daemon(&opts, timeline.as_deref(), plot.as_deref(), json)
        }
        Command::Export {
            version,
            format,
            out,
            timeout_secs,
            json,
        } => export(&cfg, version, format, &out, timeout_secs, json),
        Command::Inspect { json, path } => inspect(&cfg, path, json),
    }
}

/// The dataset a command reads, when it reads one.
fn dataset_of(command: &Command) -> Option<DataSource> {
    match command {
        Command::Train { data, .. } | Command::Eval { data, .. } => Some(data.source()),
        Command::StreamEval { opts, .. } => Some(opts.data.source()),
        Command::Replay { dataset, data, .. } => match (dataset, data) {
            (Some(ReplaySource::Dataset(d)), _) => Some(DataSource::Builtin(*d)),
            (Some(ReplaySource::Synthetic), _) => None,
            (None, Some(dir)) => Some(DataSource::Dir(dir.clone())),
            (None, None) => unreachable!("clap requires a dataset or --data"),
        },
        _ => None,
    }
}

/// The daemon, stopped by SIGTERM/SIGINT; with `--embedded-kafka` and no broker configured, an
/// in-process one that lives as long as the daemon.
fn run_daemon(mut cfg: Config, embedded_kafka: bool) -> anyhow::Result<()> {
    let _embedded = if cfg.kafka.bootstrap_servers.trim().is_empty() && embedded_kafka {
        let broker = EmbeddedKafka::start(&kafka::topic_defs(&cfg)?)?;
        cfg.kafka.bootstrap_servers = broker.bootstrap_servers();
        tracing::info!(bootstrap_servers = %cfg.kafka.bootstrap_servers, "embedded Kafka-protocol broker listening");
        Some(broker)
    } else {
        if embedded_kafka {
            tracing::warn!(bootstrap_servers = %cfg.kafka.bootstrap_servers, "kafka.bootstrap_servers is set; --embedded-kafka ignored");
        }
        None
    };
    app::run(cfg, app::shutdown_signal())
}

fn apply_topics(cfg: &Config) -> anyhow::Result<()> {
    let defs = kafka::topic_defs(cfg)?;
    let results = block_on(kafka::apply_topics(cfg, &defs))?;
    for (topic, outcome) in results {
        match outcome {
            ApplyOutcome::Created => println!("created {topic}"),
            ApplyOutcome::Exists { partitions } => {
                println!("exists  {topic} ({partitions} partitions)")
            }
        }
    }
    Ok(())
}

fn replay_dataset(
    mut cfg: Config,
    dataset: &DataSource,
    rate: u64,
    splits: &[String],
    limit: Option<usize>,
    bootstrap_servers: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(b) = bootstrap_servers {
        cfg.kafka.bootstrap_servers = b;
    }
    let mut events = offline::checked_replay_events(&cfg, dataset, splits)?;
    if let Some(n) = limit {
        events.truncate(n);
    }
    let progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = block_on(replay::produce(
        &cfg,
        &dataset.name(),
        &events,
        rate,
        progress,
    ))?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "replayed {} events of {} to {} in {:.1} s ({:.0} events/s)",
            summary.events, summary.dataset, summary.topic, summary.seconds, summary.events_per_sec
        );
    }
    Ok(())
}

/// `replay synthetic`: the stream generated as it is produced (memory independent of its length).
fn replay_synthetic(
    mut cfg: Config,
    args: &SyntheticArgs,
    rate: u64,
    limit: Option<usize>,
    bootstrap_servers: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(b) = bootstrap_servers {
        cfg.kafka.bootstrap_servers = b;
    }
    let spec = args.spec()?;
    let workload = Workload::new(&cfg.schema(), spec)?;
    let total = limit.map_or(spec.edges, |n| spec.edges.min(n as u64));
    let events = workload.events().take(total as usize);
    let progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = block_on(replay::produce_stream(
        &cfg,
        "synthetic",
        events,
        total,
        rate,
        progress,
    ))?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "replayed {} synthetic events ({} nodes, {} communities, seed {}) to {} in {:.1} s ({:.0} events/s)",
            summary.events,
            spec.nodes,
            workload.communities(),
            spec.seed,
            summary.topic,
            summary.seconds,
            summary.events_per_sec
        );
    }
    Ok(())
}

fn write_synthetic(
    cfg: &Config,
    args: &SyntheticArgs,
    out: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let workload = Workload::new(&cfg.schema(), args.spec()?)?;
    let summary = workload
        .write_dir(out)
        .with_context(|| format!("writing {}", out.display()))?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "wrote {} synthetic events to {} in {:.1} s ({:.0} events/s); {} communities; nodes: {}",
            summary.events,
            summary.dir,
            summary.seconds,
            summary.events_per_sec,
            summary.communities,
            summary
                .node_types
                .iter()
                .map(|t| format!("{} {}", t.node_type, t.nodes))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn train_offline(
    cfg: &Config,
    dataset: &DataSource,
    epochs: usize,
    json: bool,
) -> anyhow::Result<()> {
    let device = torch_device(cfg)?;
    let report = offline::train(cfg, dataset, epochs, device)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "trained {} on {} edges x {} epochs in {:.1} s ({:.0} positive edges/s, {}), final loss {:.4}",
            report.dataset, report.edges, report.epochs, report.seconds, report.edges_per_sec, report.device, report.final_loss
        );
    }
    Ok(())
}

fn eval_offline(cfg: &Config, dataset: &DataSource, split: &str, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        split == "test" || split == "valid",
        "--split must be test or valid"
    );
    let device = torch_device(cfg)?;
    let report = offline::eval(cfg, dataset, split, device)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let m = &report.metrics;
        println!(
            "{dataset} {split}: MRR {:.4}  Hits@1 {:.4}  Hits@3 {:.4}  Hits@10 {:.4}  ({} rankings; {} edges with unseen nodes skipped)",
            m.mrr, m.hits1, m.hits3, m.hits10, m.rankings, report.skipped_unseen
        );
    }
    Ok(())
}

fn stream_eval(cfg: &Config, opts: &offline::StreamEvalOptions, json: bool) -> anyhow::Result<()> {
    let device = torch_device(cfg)?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    eprintln!(
        "stream-eval {}: fixed micro-batch of {} new edges per trainer step",
        opts.data.source(),
        opts.batch_size
    );
    let report = offline::stream_eval(cfg, opts, device, progress)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn watch_daemon(
    opts: &watch::WatchOptions,
    timeline: Option<&std::path::Path>,
    plot: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let samples = watch::watch(opts)?;
    if let Some(path) = timeline {
        watch::write_timeline(&samples, path)?;
    }
    if let Some(path) = plot {
        watch::render_svg(&samples, path)?;
    }
    let summary = watch::summarize(&samples)
        .ok_or_else(|| anyhow::anyhow!("no status was read from the daemon"))?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{summary}");
        if let Some(path) = plot {
            println!("plot        {}", path.display());
        }
    }
    Ok(())
}

fn export(
    cfg: &Config,
    version: Option<u64>,
    format: offline::export::ExportFormat,
    out: &std::path::Path,
    timeout_secs: u64,
    json: bool,
) -> anyhow::Result<()> {
    let timeout = std::time::Duration::from_secs(timeout_secs);
    let s = offline::export::export(cfg, version, format, out, timeout)?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!(
        "version {} (epoch {}) from {} records in {:.1} s, to {}:",
        s.meta.version,
        s.meta.epoch,
        s.records_read,
        s.seconds,
        s.out.display()
    );
    for (name, t) in s
        .meta
        .types
        .iter()
        .chain([(&"relations".to_string(), &s.meta.relations)])
    {
        println!(
            "  {name:<12} {:>9} rows × {:<4} {}",
            t.rows,
            t.dim,
            t.files.join(", ")
        );
    }
    Ok(())
}

fn inspect(cfg: &Config, path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let path = path.unwrap_or(cfg.storage.path.clone());
    let store = GraphStore::open_existing(&path).with_context(|| {
        format!(
            "opening {} (is the daemon still running on it?)",
            path.display()
        )
    })?;
    let summary = StoreSummary::read(&store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

/// The libtorch device `torch.device` names, with `torch.threads` set.
fn torch_device(cfg: &Config) -> anyhow::Result<tch::Device> {
    twhin_stream::train::resolve(&cfg.torch.device, cfg.torch.threads).map_err(anyhow::Error::msg)
}

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(fut)
}

fn print_summary(s: &StoreSummary) {
    println!(
        "store {} ({:.1} MiB)",
        s.path,
        s.size_on_disk_bytes as f64 / (1 << 20) as f64
    );
    println!("nodes:");
    for (t, n) in &s.nodes {
        println!("  {t:<24} {n:>10}");
    }
    println!("edges: {} in all", s.edges_total);
    for (r, n) in s.edges.iter().filter(|(_, n)| **n > 0) {
        println!("  {r:<40} {n:>10}");
    }
    println!("offsets:");
    for o in &s.offsets {
        println!("  {}[{}] next {}", o.topic, o.partition, o.next_offset);
    }
}
