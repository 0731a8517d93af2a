//! The one validated config tree.
//!
//! Layers, later ones win: `config/default.toml` (compiled in, so the binary runs from any
//! directory), an optional file given with `--config`, then environment variables
//! `TWHIN_<SECTION>__<KEY>` (e.g. `TWHIN_KAFKA__BOOTSTRAP_SERVERS`). [`Config::validate`] checks
//! everything once at start; its errors name the key at fault.
//!
//! librdkafka properties pass through untouched from `[kafka.common]`, `[kafka.consumer]` and
//! `[kafka.producer]`. In the environment, write the property with `_` for `.`:
//! `TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS=6000` sets `session.timeout.ms` (librdkafka property
//! names contain no underscores).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::schema::{DecodeLimits, Schema, SchemaConfig};

/// The defaults, documented key by key in the file itself.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub schema: SchemaConfig,
    pub kafka: KafkaConfig,
    pub storage: StorageConfig,
    pub ingest: IngestConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub torch: TorchConfig,
    pub train: crate::train::TrainParams,
    pub trainer: TrainerConfig,
    pub publish: PublishConfig,
    pub align: crate::align::AlignConfig,
    pub datasets: DatasetsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Empty means "not configured" (then `run --embedded-kafka` starts an in-process broker).
    pub bootstrap_servers: String,
    pub group_id: String,
    /// Folder of topic definitions (`*.toml`), relative to the working directory.
    pub topics_dir: PathBuf,
    pub engagements_topic: String,
    pub dlq_topic: String,
    pub embeddings_topic: String,
    pub versions_topic: String,
    /// librdkafka properties for every client.
    #[serde(default)]
    pub common: BTreeMap<String, toml::Value>,
    /// librdkafka properties for the consumer only.
    #[serde(default)]
    pub consumer: BTreeMap<String, toml::Value>,
    /// librdkafka properties for producers only.
    #[serde(default)]
    pub producer: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
    pub cache_capacity_mb: u64,
    pub node_cache_entries: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub batch_max_events: usize,
    pub batch_max_wait_ms: u64,
    pub max_event_bytes: usize,
    pub max_id_bytes: usize,
    pub dedup_window_secs: u64,
    pub dlq_timeout_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: String,
    /// Empty: no authentication. Otherwise every route but `/healthz` requires
    /// `Authorization: Bearer <token>`.
    pub bearer_token: String,
}

/// Written by hand so that logging the config never prints the token.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.bearer_token.is_empty() {
            "(none)"
        } else {
            "(set)"
        };
        f.debug_struct("HttpConfig")
            .field("bind", &self.bind)
            .field("bearer_token", &token)
            .finish()
    }
}

/// Shortest `http.bearer_token` accepted: a short token is guessable over the network.
pub const MIN_BEARER_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorchConfig {
    pub device: String,
    pub threads: i32,
}

/// The `[trainer]` section: how the daemon's trainer actor feeds [`crate::train::train_step`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    pub enabled: bool,
    pub replay_ratio: f64,
    pub max_batch_size: usize,
    pub warm_start: bool,
    pub warm_start_shrinkage: f64,
    pub prequential_per_step: usize,
    pub prequential_window: usize,
    pub idle_poll_ms: u64,
    pub round_budget_ms: u64,
    pub checkpoint_path: PathBuf,
    pub checkpoint_interval_secs: u64,
    pub checkpoint_keep: usize,
}

/// The `[publish]` section: versions to Kafka (see [`crate::publish`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    pub enabled: bool,
    pub interval_secs: u64,
    pub format: crate::publish::ValueFormat,
    pub row_threshold: f64,
    pub path: PathBuf,
    pub delivery_timeout_ms: u64,
    /// Each version's rows and marker in one Kafka transaction.
    pub transactional: bool,
    /// `transactional.id` of the version producer; unique per daemon (a second producer with
    /// the same id fences the first).
    pub transactional_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    pub dir: PathBuf,
}

/// A config problem, naming the key (dotted path) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

impl Config {
    /// Load defaults, then `file` (if any), then the environment, and validate.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, Env::prefixed("TWHIN_").split("__"))
    }

    /// As [`Config::load`], with the environment provider passed in (tests use a fake one).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            fig = fig.merge(Toml::file(path));
        }
        let cfg: Config = fig.merge(env).extract().map_err(load_error)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every check in one place.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Schema::new(&self.schema).map_err(|e| invalid(&e.key, e.problem))?;
        let k = &self.kafka;
        for (key, v) in [
            ("kafka.group_id", &k.group_id),
            ("kafka.engagements_topic", &k.engagements_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.embeddings_topic", &k.embeddings_topic),
            ("kafka.versions_topic", &k.versions_topic),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if k.engagements_topic == k.dlq_topic {
            return Err(invalid(
                "kafka.dlq_topic",
                "must differ from kafka.engagements_topic",
            ));
        }
        for (section, map) in [
            ("common", &k.common),
            ("consumer", &k.consumer),
            ("producer", &k.producer),
        ] {
            for (prop, value) in flatten_properties(map) {
                if prop == "bootstrap.servers" || prop == "group.id" {
                    return Err(invalid(
                        &format!("kafka.{section}.{prop}"),
                        "set kafka.bootstrap_servers / kafka.group_id instead",
                    ));
                }
                if value.is_empty() {
                    return Err(invalid(&format!("kafka.{section}.{prop}"), "empty value"));
                }
            }
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        let i = &self.ingest;
        positive("ingest.batch_max_events", i.batch_max_events as u64)?;
        positive("ingest.batch_max_wait_ms", i.batch_max_wait_ms)?;
        positive("ingest.dlq_timeout_ms", i.dlq_timeout_ms)?;
        if i.max_event_bytes < 64 {
            return Err(invalid("ingest.max_event_bytes", "must be at least 64"));
        }
        if i.max_id_bytes == 0 || i.max_id_bytes > 4096 {
            return Err(invalid("ingest.max_id_bytes", "must be in 1..=4096"));
        }
        self.http_bind()?;
        let token = &self.http.bearer_token;
        if !token.is_empty() {
            if token.len() < MIN_BEARER_TOKEN_CHARS {
                return Err(invalid(
                    "http.bearer_token",
                    format!("must be empty (no authentication) or at least {MIN_BEARER_TOKEN_CHARS} characters"),
                ));
            }
            // What an `Authorization: Bearer` header can carry as one token.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "http.bearer_token",
                    "must be printable ASCII without spaces",
                ));
            }
        }
        if !matches!(
            self.log.level.to_ascii_lowercase().as_str(),
            "trace" | "debug" | "info" | "warn" | "error"
        ) && tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err()
        {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a level or filter", self.log.level),
            ));
        }
        match self.torch.device.as_str() {
            "auto" | "cpu" | "cuda" => {}
            d if d
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()) => {}
            d => {
                return Err(invalid(
                    "torch.device",
                    format!("{d:?}: expected auto, cpu, cuda or cuda:N"),
                ))
            }
        }
        if self.torch.threads < 1 {
            return Err(invalid("torch.threads", "must be at least 1"));
        }
        let t = &self.train;
        positive("train.dim", t.dim.max(0) as u64)?;
        positive("train.batch_size", t.batch_size as u64)?;
        positive("train.chunk_size", t.chunk_size as u64)?;
        for (key, v) in [("train.lr", t.lr), ("train.relation_lr", t.relation_lr)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if !(t.init_scale.is_finite() && t.init_scale >= 0.0) {
            return Err(invalid("train.init_scale", "must be a non-negative number"));
        }
        if t.uniform_negatives < 0 {
            return Err(invalid("train.uniform_negatives", "must be at least 0"));
        }
        let tr = &self.trainer;
        if !(tr.replay_ratio.is_finite() && tr.replay_ratio >= 0.0) {
            return Err(invalid(
                "trainer.replay_ratio",
                "must be a non-negative number",
            ));
        }
        if !(tr.warm_start_shrinkage.is_finite() && tr.warm_start_shrinkage >= 0.0) {
            return Err(invalid(
                "trainer.warm_start_shrinkage",
                "must be a non-negative number",
            ));
        }
        if tr.max_batch_size < t.batch_size {
            return Err(invalid(
                "trainer.max_batch_size",
                format!("must be at least train.batch_size ({})", t.batch_size),
            ));
        }
        positive("trainer.prequential_window", tr.prequential_window as u64)?;
        positive("trainer.idle_poll_ms", tr.idle_poll_ms)?;
        positive("trainer.round_budget_ms", tr.round_budget_ms)?;
        positive(
            "trainer.checkpoint_interval_secs",
            tr.checkpoint_interval_secs,
        )?;
        positive("trainer.checkpoint_keep", tr.checkpoint_keep as u64)?;
        let pb = &self.publish;
        positive("publish.interval_secs", pb.interval_secs)?;
        positive("publish.delivery_timeout_ms", pb.delivery_timeout_ms)?;
        if pb.transactional && pb.transactional_id.trim().is_empty() {
            return Err(invalid(
                "publish.transactional_id",
                "must not be empty when publish.transactional = true",
            ));
        }
        if !(pb.row_threshold.is_finite() && pb.row_threshold >= 0.0) {
            return Err(invalid(
                "publish.row_threshold",
                "must be a non-negative number",
            ));
        }
        if pb.enabled && !tr.enabled {
            return Err(invalid(
                "publish.enabled",
                "needs trainer.enabled = true (versions come from the trainer)",
            ));
        }
        if tr.checkpoint_path.as_os_str().is_empty() {
            return Err(invalid("trainer.checkpoint_path", "must not be empty"));
        }
        let al = &self.align;
        for (key, v) in [
            ("align.max_drift", al.max_drift),
            ("align.hard_limit", al.hard_limit),
            ("align.pull_init", al.pull_init),
            ("align.pull_min", al.pull_min),
            ("align.pull_max", al.pull_max),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, "must be a positive number"));
            }
        }
        if al.max_drift >= al.hard_limit {
            return Err(invalid(
                "align.max_drift",
                format!("must be below align.hard_limit ({})", al.hard_limit),
            ));
        }
        if !(al.pull_min <= al.pull_init && al.pull_init <= al.pull_max) {
            return Err(invalid(
                "align.pull_init",
                "must lie within align.pull_min..=align.pull_max",
            ));
        }
        positive("align.overlap_sample", al.overlap_sample as u64)?;
        Ok(())
    }

    pub fn schema(&self) -> Schema {
        Schema::new(&self.schema).expect("validated at load")
    }

    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_event_bytes: self.ingest.max_event_bytes,
            max_id_bytes: self.ingest.max_id_bytes,
        }
    }

    pub fn http_bind(&self) -> Result<SocketAddr, ConfigError> {
        self.http.bind.parse().map_err(|e| {
            invalid(
                "http.bind",
                format!("{:?} is not host:port: {e}", self.http.bind),
            )
        })
    }

    /// librdkafka properties for a consumer: common, then consumer-specific, then ours.
    pub fn consumer_properties(&self) -> Vec<(String, String)> {
        let mut props = flatten_properties(&self.kafka.common);
        props.extend(flatten_properties(&self.kafka.consumer));
        props.push((
            "bootstrap.servers".into(),
            self.kafka.bootstrap_servers.clone(),
        ));
        props.push(("group.id".into(), self.kafka.group_id.clone()));
        props
    }

    /// librdkafka properties for a producer: common, then producer-specific.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut props = flatten_properties(&self.kafka.common);
        props.extend(flatten_properties(&self.kafka.producer));
        props.push((
            "bootstrap.servers".into(),
            self.kafka.bootstrap_servers.clone(),
        ));
        props
    }

    /// librdkafka properties for admin and metadata clients.
    pub fn admin_properties(&self) -> Vec<(String, String)> {
        let mut props = flatten_properties(&self.kafka.common);
        props.push((
            "bootstrap.servers".into(),
            self.kafka.bootstrap_servers.clone(),
        ));
        props
    }
}

/// Name the key of the first problem the way the docs do (`ingest.max_id_bytes`), and where
/// the value came from.
fn load_error(e: figment::Error) -> ConfigError {
    let Some(first) = e.clone().into_iter().next() else {
        return ConfigError::Load(Box::new(e));
    };
    if first.path.is_empty() {
        return ConfigError::Load(Box::new(e));
    }
    let key = first.path.join(".").to_lowercase();
    let source = first
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    invalid(&key, format!("{}{source}", first.kind))
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

/// Turn a passthrough table into librdkafka `(property, value)` pairs.
///
/// Nested tables are joined with `.` (the environment provider nests on `.`), and `_` becomes `.`
/// so `SESSION_TIMEOUT_MS` in the environment means `session.timeout.ms`.
pub fn flatten_properties(map: &BTreeMap<String, toml::Value>) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&join(prefix, k), v, out);
                }
            }
            toml::Value::String(s) => out.push((prefix.replace('_', "."), s.clone())),
            other => out.push((prefix.replace('_', "."), other.to_string())),
        }
    }
    fn join(prefix: &str, k: &str) -> String {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    }
    let mut out = Vec::new();
    for (k, v) in map {
        walk(k, v, &mut out);
    }
    out
}

#[cfg(test)]
// figment's Jail closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_with_env(vars: &[(&str, &str)]) -> Result<Config, String> {
        let mut out = Err(String::new());
        Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            out = Config::load(None).map_err(|e| e.to_string());
            Ok(())
        });
        out
    }

    #[test]
    fn defaults_load_and_validate() {
        let cfg = load_with_env(&[]).unwrap();
        assert_eq!(cfg.http.bind, "127.0.0.1:8080");
        assert!(cfg.schema.node_types.contains(&"advertiser".to_string()));
        assert_eq!(cfg.schema().relations().len(), 8);
        assert_eq!(cfg.kafka.bootstrap_servers, "");
    }

    #[test]
    fn environment_overrides_nested_keys_and_passthrough_properties() {
        let cfg = load_with_env(&[
            ("TWHIN_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9999"),
            ("TWHIN_STORAGE__PATH", "/tmp/x"),
            ("TWHIN_HTTP__BIND", "127.0.0.1:0"),
            ("TWHIN_INGEST__BATCH_MAX_EVENTS", "7"),
            ("TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "6000"),
        ])
        .unwrap();
        assert_eq!(cfg.kafka.bootstrap_servers, "127.0.0.1:9999");
        assert_eq!(cfg.storage.path, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.ingest.batch_max_events, 7);
        let props = cfg.consumer_properties();
        assert!(
            props.contains(&("session.timeout.ms".into(), "6000".into())),
            "{props:?}"
        );
        assert!(props.contains(&("bootstrap.servers".into(), "127.0.0.1:9999".into())));
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_with_env(&[("TWHIN_HTTP__BIND", "nowhere")]).unwrap_err();
        assert!(e.contains("`http.bind`"), "{e}");
        let e = load_with_env(&[("TWHIN_INGEST__BATCH_MAX_EVENTS", "0")]).unwrap_err();
        assert!(e.contains("`ingest.batch_max_events`"), "{e}");
        let e = load_with_env(&[("TWHIN_TORCH__DEVICE", "tpu")]).unwrap_err();
        assert!(e.contains("`torch.device`"), "{e}");
        let e = load_with_env(&[("TWHIN_INGEST__MAX_ID_BYTES", "many")]).unwrap_err();
        assert!(
            e.contains("`ingest.max_id_bytes`") && e.contains("TWHIN_"),
            "{e}"
        );
        let e = load_with_env(&[("TWHIN_KAFKA__CONSUMER__GROUP_ID", "x")]).unwrap_err();
        assert!(e.contains("kafka.consumer.group.id"), "{e}");
    }

    #[test]
    fn bearer_token_is_optional_but_long_and_never_logged() {
        let cfg = load_with_env(&[]).unwrap();
        assert_eq!(cfg.http.bearer_token, "");
        let e = load_with_env(&[("TWHIN_HTTP__BEARER_TOKEN", "short")]).unwrap_err();
        assert!(e.contains("`http.bearer_token`"), "{e}");
        let e = load_with_env(&[("TWHIN_HTTP__BEARER_TOKEN", "sixteen chars ok")]).unwrap_err();
        assert!(e.contains("`http.bearer_token`"), "{e}");
        let token = "0123456789abcdef-secret";
        let cfg = load_with_env(&[("TWHIN_HTTP__BEARER_TOKEN", token)]).unwrap();
        assert_eq!(cfg.http.bearer_token, token);
        assert!(!format!("{cfg:?}").contains(token));
    }

    #[test]
    fn transactional_publishing_is_off_by_default_and_needs_an_id() {
        let cfg = load_with_env(&[]).unwrap();
        assert!(!cfg.publish.transactional);
        assert_eq!(cfg.publish.transactional_id, "twhin-stream-publisher");
        let cfg = load_with_env(&[("TWHIN_PUBLISH__TRANSACTIONAL", "true")]).unwrap();
        assert!(cfg.publish.transactional);
        let e = load_with_env(&[
            ("TWHIN_PUBLISH__TRANSACTIONAL", "true"),
            ("TWHIN_PUBLISH__TRANSACTIONAL_ID", " "),
        ])
        .unwrap_err();
        assert!(e.contains("`publish.transactional_id`"), "{e}");
    }

    #[test]
    fn dataset_configs_replace_the_schema() {
        for name in ["umls", "nations", "kinships", "movielens-100k"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/{name}.toml"));
            let mut out = Err(String::new());
            Jail::expect_with(|jail| {
                jail.clear_env();
                out = Config::load(Some(&path)).map_err(|e| e.to_string());
                Ok(())
            });
            let cfg = out.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                !cfg.schema.node_types.contains(&"advertiser".to_string()),
                "{name}"
            );
        }
    }
}
