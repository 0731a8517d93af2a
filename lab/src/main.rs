//! The `twhin-lab` command line: measurements of twhin-stream on fixed datasets. Each
//! subcommand loads and validates the product's config first, as `twhin-stream` does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use twhin_lab::{downstream, exchange, genre, retrain, stability, warm_start};
use twhin_stream::config::Config;
use twhin_stream::offline::{self, DataArgs, DataSource, Dataset};
use twhin_stream::telemetry;

#[derive(Parser)]
#[command(
    name = "twhin-lab",
    version,
    about = "Measurements of twhin-stream on fixed datasets (the tables of docs/measurements.md)"
)]
struct Cli {
    /// Config file merged over config/default.toml (environment variables TWHIN_* win over both;
    /// default: the dataset's own file, config/movielens-100k.toml for MovieLens-100k).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prequential Hits@10 on the first edges of new nodes, warm start against random init.
    WarmStart {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Downstream value on MovieLens-100k, by a logistic regression with and without a
    /// version's embeddings: will a user rate a movie high, for ratings after the version's cut
    /// (`--task rated-high`), or a movie's genres, from a version trained without the genre
    /// relations (`--task genre`).
    Downstream {
        #[command(flatten)]
        opts: downstream::DownstreamOptions,
        /// Print the report as JSON (the table otherwise).
        #[arg(long)]
        json: bool,
    },
    /// Downstream stability: MovieLens-100k streamed in time order through the daemon's trainer
    /// and alignment; a classifier fitted on version 1, frozen, scored on every later version,
    /// with drift control on and off; or (`--scenario retrain`) a full retrain from another seed
    /// published raw, rotated by Procrustes, and warm-started with the pull.
    Stability {
        #[command(flatten)]
        opts: stability::StabilityOptions,
        /// Print the report as JSON (the table otherwise).
        #[arg(long)]
        json: bool,
    },
    /// The gradient exchange without Kafka or delay: two trainers on one store, splitting the
    /// synthetic stream's nodes by partition, exchanging every few chunks; beside one trainer and
    /// two that never exchange. Prequential Hits@10 and MRR over the last 80% of the stream.
    Exchange {
        #[command(flatten)]
        opts: exchange::ExchangeOptions,
        /// Print the report as JSON (the table otherwise).
        #[arg(long)]
        json: bool,
    },
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
    // The dataset a command reads gives its config file unless --config names one; warm-start
    // reads any dataset, whose schema is inferred from its files unless that file has one.
    let source = match &cli.command {
        Command::WarmStart { data } => data.source(),
        Command::Downstream { .. } | Command::Stability { .. } => {
            DataSource::Builtin(Dataset::MovieLens100k)
        }
        Command::Exchange { .. } => DataSource::Dir("exchange".into()),
    };
    let config_file = cli.config.clone().or_else(|| source.config_file());
    let mut cfg = Config::load(config_file.as_deref())?;
    telemetry::init_logging(&cfg.log);
    let device = twhin_stream::train::resolve(&cfg.torch.device, cfg.torch.threads)
        .map_err(anyhow::Error::msg)?;
    let (report, table, json) = match cli.command {
        Command::WarmStart { .. } => {
            offline::apply_dataset_schema(&mut cfg, &source, config_file.as_deref())?;
            for warm in [false, true] {
                let r = warm_start::prequential_new_nodes(&cfg, &source, warm, device)?;
                println!("{}", serde_json::to_string(&r)?);
            }
            return Ok(());
        }
        Command::Downstream { opts, json } => match opts.task {
            downstream::DownstreamTask::RatedHigh => {
                let r = downstream::measure_downstream(&cfg, device, &opts)?;
                (serde_json::to_string_pretty(&r)?, r.table(), json)
            }
            downstream::DownstreamTask::Genre => {
                let r = genre::measure_genre_downstream(&cfg, device, &opts)?;
                (serde_json::to_string_pretty(&r)?, r.table(), json)
            }
        },
        Command::Exchange { opts, json } => {
            let r = exchange::measure(&cfg, device, &opts)?;
            (serde_json::to_string_pretty(&r)?, r.table(), json)
        }
        Command::Stability { opts, json } => match opts.scenario {
            stability::Scenario::Stream => {
                let r = stability::measure(&cfg, device, &opts)?;
                (serde_json::to_string_pretty(&r)?, r.table(), json)
            }
            stability::Scenario::Retrain => {
                let r = retrain::measure_retrain(&cfg, device, &opts)?;
                (serde_json::to_string_pretty(&r)?, r.table(), json)
            }
        },
    };
    if json {
        println!("{report}");
    } else {
        print!("{table}");
    }
    Ok(())
}
