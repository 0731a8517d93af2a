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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::schema::{DecodeLimits, Schema, SchemaConfig};

mod ingest;
mod kafka;
mod publish;
mod remote;
mod serve;
mod train;

pub use ingest::{IngestConfig, OffsetPolicy, StorageConfig};
pub use kafka::{flatten_properties, KafkaConfig};
pub use publish::{AlignConfig, PqConfig, PublishConfig, ValueFormat, PQ_CENTROIDS};
pub use remote::RemoteConfig;
pub use serve::{
    AnnConfig, AnnQuantization, HttpConfig, LogConfig, LogFormat, MultiInterestConfig,
    MIN_BEARER_TOKEN_CHARS,
};
pub use train::{Comparator, LossKind, TorchConfig, TrainParams, TrainerConfig};

/// A section that checks its own keys; its errors name them.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// The defaults, documented key by key in the file itself.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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
    pub train: TrainParams,
    pub trainer: TrainerConfig,
    pub publish: PublishConfig,
    pub align: AlignConfig,
    pub remote: RemoteConfig,
    pub datasets: DatasetsConfig,
    /// Which folders were derived from `storage.path` (their keys left empty).
    #[serde(skip)]
    pub derived: DerivedPaths,
}

/// The folders [`Config::load`] derived from `storage.path` because their keys were empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DerivedPaths {
    pub checkpoints: bool,
    pub publish: bool,
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

pub(crate) fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
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
        let mut cfg: Config = fig.merge(env).extract().map_err(load_error)?;
        cfg.derive_paths();
        cfg.validate()?;
        Ok(cfg)
    }

    /// The defaults with `overrides` (TOML) merged over them, no file, no environment: a config
    /// written out in a test or by an embedding program.
    pub fn from_toml(overrides: &str) -> Result<Config, ConfigError> {
        let fig = Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(overrides));
        let mut cfg: Config = fig.extract().map_err(load_error)?;
        cfg.derive_paths();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fill `trainer.checkpoint_path` and `publish.path` from `storage.path` when empty, so one
    /// key gives a daemon its own data folder.
    /// Also names the changelog after the consumer group when `kafka.changelog_topic` is empty
    /// (`<group_id>.changelog`, as Kafka Streams names a changelog after its application), so
    /// that two deployments never share one; likewise the routed topic (`<group_id>.routed`) and the
    /// gradients topic (`<group_id>.gradients`).
    pub fn derive_paths(&mut self) {
        if self.kafka.changelog_topic.is_empty() {
            self.kafka.changelog_topic = format!("{}.changelog", self.kafka.group_id);
        }
        if self.kafka.routed_topic.is_empty() {
            self.kafka.routed_topic = format!("{}.routed", self.kafka.group_id);
        }
        if self.kafka.gradients_topic.is_empty() {
            self.kafka.gradients_topic = format!("{}.gradients", self.kafka.group_id);
        }
        if self.trainer.checkpoint_path.as_os_str().is_empty() {
            self.trainer.checkpoint_path = self.storage.path.join("checkpoints");
            self.derived.checkpoints = true;
        }
        if self.publish.path.as_os_str().is_empty() {
            self.publish.path = self.storage.path.join("publish");
            self.derived.publish = true;
        }
    }

    /// The same config with its data folder at `path`: checkpoints and the publish ledger that
    /// were derived follow it.
    pub fn with_storage_path(mut self, path: impl Into<PathBuf>) -> Config {
        self.storage.path = path.into();
        if self.derived.checkpoints {
            self.trainer.checkpoint_path = PathBuf::new();
        }
        if self.derived.publish {
            self.publish.path = PathBuf::new();
        }
        self.derive_paths();
        self
    }

    /// Refuse the layout before checkpoints and the ledger moved into `storage.path`: an existing
    /// store whose derived folders are missing while `checkpoints/` or `publish/` sit beside it
    /// (the old defaults `data/checkpoints`, `data/publish`) would otherwise start a new model and
    /// number versions from 1 again.
    pub fn check_data_layout(&self) -> Result<(), ConfigError> {
        let store = &self.storage.path;
        if !store.join("db").exists() {
            return Ok(());
        }
        let beside = store.parent().unwrap_or(Path::new("."));
        for (derived, key, env, path, old) in [
            (
                self.derived.checkpoints,
                "trainer.checkpoint_path",
                "TWHIN_TRAINER__CHECKPOINT_PATH",
                &self.trainer.checkpoint_path,
                beside.join("checkpoints"),
            ),
            (
                self.derived.publish,
                "publish.path",
                "TWHIN_PUBLISH__PATH",
                &self.publish.path,
                beside.join("publish"),
            ),
        ] {
            if derived && !path.exists() && old.is_dir() {
                return Err(invalid(
                    key,
                    format!(
                        "now defaults to {} (inside storage.path), which does not exist, while {} \
                         (the earlier default, beside the store) does: set {key} = {:?} \
                         ({env}) to keep that layout, or move the folder to {}",
                        path.display(),
                        old.display(),
                        old.display().to_string(),
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every section checks itself; the root checks what spans sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Schema::new(&self.schema).map_err(|e| invalid(&e.key, e.problem))?;
        let sections: [&dyn Validate; 11] = [
            &self.kafka,
            &self.storage,
            &self.ingest,
            &self.http,
            &self.log,
            &self.torch,
            &self.train,
            &self.trainer,
            &self.publish,
            &self.align,
            &self.remote,
        ];
        for section in sections {
            section.validate()?;
        }
        if self.trainer.max_batch_size < self.train.batch_size {
            return Err(invalid(
                "trainer.max_batch_size",
                format!(
                    "must be at least train.batch_size ({})",
                    self.train.batch_size
                ),
            ));
        }
        if self.publish.enabled && !self.trainer.enabled {
            return Err(invalid(
                "publish.enabled",
                "needs trainer.enabled = true (versions come from the trainer)",
            ));
        }
        if self.publish.format == ValueFormat::Pq
            && self.train.dim % self.publish.pq.subspaces as i64 != 0
        {
            return Err(invalid(
                "publish.pq.subspaces",
                format!("must divide train.dim ({})", self.train.dim),
            ));
        }
        if self.trainer.checkpoint_path.as_os_str().is_empty() {
            return Err(invalid("trainer.checkpoint_path", "must not be empty"));
        }
        Ok(())
    }

    pub fn schema(&self) -> Schema {
        Schema::new(&self.schema).expect("validated at load")
    }

    /// The limits events from Kafka are decoded under.
    pub fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_event_bytes: self.ingest.max_event_bytes,
            max_id_bytes: self.ingest.max_id_bytes,
            max_ahead_ms: Some(self.ingest.max_event_time_ahead_secs.saturating_mul(1000)),
        }
    }

    /// The limits events read from dataset files are decoded under: no record timestamp, so
    /// no bound on how far ahead an event time may be.
    pub fn file_decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_ahead_ms: None,
            ..self.decode_limits()
        }
    }

    pub fn http_bind(&self) -> Result<SocketAddr, ConfigError> {
        self.http.bind_addr()
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

pub(crate) fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
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
    fn ann_settings_come_from_the_environment_and_name_their_key() {
        let cfg = load_with_env(&[]).unwrap();
        assert!(cfg.http.ann.enabled);
        assert_eq!(cfg.http.ann.min_rows, 50_000);
        assert_eq!(cfg.http.ann.quantization, AnnQuantization::F16);
        let cfg = load_with_env(&[
            ("TWHIN_HTTP__ANN__MIN_ROWS", "1000"),
            ("TWHIN_HTTP__ANN__QUANTIZATION", "f32"),
            ("TWHIN_HTTP__ANN__ENABLED", "false"),
        ])
        .unwrap();
        assert_eq!(cfg.http.ann.min_rows, 1000);
        assert_eq!(cfg.http.ann.quantization, AnnQuantization::F32);
        assert!(!cfg.http.ann.enabled);
        for (var, key) in [
            ("TWHIN_HTTP__ANN__MIN_ROWS", "`http.ann.min_rows`"),
            ("TWHIN_HTTP__ANN__OVERSAMPLE", "`http.ann.oversample`"),
            (
                "TWHIN_HTTP__ANN__SEARCH_THREADS",
                "`http.ann.search_threads`",
            ),
        ] {
            let e = load_with_env(&[(var, "0")]).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
        let e = load_with_env(&[("TWHIN_HTTP__ANN__CONNECTIVITY", "1")]).unwrap_err();
        assert!(e.contains("`http.ann.connectivity`"), "{e}");
        let e = load_with_env(&[("TWHIN_HTTP__ANN__QUANTIZATION", "i4")]).unwrap_err();
        assert!(e.contains("quantization"), "{e}");
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
    fn pq_sub_spaces_must_divide_the_dimension() {
        let cfg = load_with_env(&[("TWHIN_PUBLISH__FORMAT", "pq")]).unwrap();
        assert_eq!(cfg.publish.format, ValueFormat::Pq);
        assert_eq!(cfg.publish.pq.subspaces, 32);
        let e = load_with_env(&[
            ("TWHIN_PUBLISH__FORMAT", "pq"),
            ("TWHIN_PUBLISH__PQ__SUBSPACES", "48"),
        ])
        .unwrap_err();
        assert!(
            e.contains("`publish.pq.subspaces`") && e.contains("train.dim"),
            "{e}"
        );
        let e = load_with_env(&[("TWHIN_PUBLISH__PQ__MAX_RELATIVE_ERROR", "0")]).unwrap_err();
        assert!(e.contains("`publish.pq.max_relative_error`"), "{e}");
    }

    #[test]
    fn a_removed_key_is_refused_by_name() {
        let e = load_with_env(&[("TWHIN_STORAGE__NODE_CACHE_ENTRIES", "1000")]).unwrap_err();
        assert!(
            e.contains("`storage.node_cache_entries`") && e.contains("removed"),
            "{e}"
        );
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

    #[test]
    fn checkpoints_and_the_ledger_follow_storage_path_unless_set() {
        let cfg = load_with_env(&[("TWHIN_STORAGE__PATH", "/srv/a")]).unwrap();
        assert_eq!(
            cfg.trainer.checkpoint_path,
            PathBuf::from("/srv/a/checkpoints")
        );
        assert_eq!(cfg.publish.path, PathBuf::from("/srv/a/publish"));
        let moved = cfg.with_storage_path("/srv/b");
        assert_eq!(
            moved.trainer.checkpoint_path,
            PathBuf::from("/srv/b/checkpoints")
        );
        assert_eq!(moved.publish.path, PathBuf::from("/srv/b/publish"));
        let cfg = load_with_env(&[
            ("TWHIN_STORAGE__PATH", "/srv/a"),
            ("TWHIN_TRAINER__CHECKPOINT_PATH", "/ckpt"),
        ])
        .unwrap();
        assert_eq!(cfg.trainer.checkpoint_path, PathBuf::from("/ckpt"));
        assert_eq!(
            cfg.with_storage_path("/srv/b").trainer.checkpoint_path,
            PathBuf::from("/ckpt"),
            "a path set by the user stays"
        );
    }

    #[test]
    fn the_changelog_is_named_after_the_group_unless_set() {
        let cfg = load_with_env(&[("TWHIN_KAFKA__GROUP_ID", "ads-ranker")]).unwrap();
        assert_eq!(cfg.kafka.changelog_topic, "ads-ranker.changelog");
        assert_eq!(
            load_with_env(&[]).unwrap().kafka.changelog_topic,
            "twhin-stream.changelog"
        );
        let set = load_with_env(&[("TWHIN_KAFKA__CHANGELOG_TOPIC", "graph.log")]).unwrap();
        assert_eq!(set.kafka.changelog_topic, "graph.log");
        let clash = load_with_env(&[("TWHIN_KAFKA__CHANGELOG_TOPIC", "twhin.versions")]);
        let err = clash.err().unwrap().to_string();
        assert!(
            err.contains("kafka.changelog_topic") && err.contains("kafka.versions_topic"),
            "{err}"
        );
    }

    #[test]
    fn the_layout_from_before_is_refused_naming_the_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let cfg = load_with_env(&[]).unwrap().with_storage_path(&store);
        assert!(cfg.check_data_layout().is_ok(), "no store yet");
        std::fs::create_dir_all(store.join("db")).unwrap();
        assert!(cfg.check_data_layout().is_ok(), "nothing beside the store");
        std::fs::create_dir_all(dir.path().join("checkpoints")).unwrap();
        let e = cfg.check_data_layout().unwrap_err().to_string();
        assert!(
            e.contains("`trainer.checkpoint_path`") && e.contains("TWHIN_TRAINER__CHECKPOINT_PATH"),
            "{e}"
        );
        std::fs::create_dir_all(store.join("checkpoints")).unwrap();
        assert!(
            cfg.check_data_layout().is_ok(),
            "the new layout is in place"
        );
        std::fs::create_dir_all(dir.path().join("publish")).unwrap();
        let e = cfg.check_data_layout().unwrap_err().to_string();
        assert!(e.contains("`publish.path`"), "{e}");
    }
}
