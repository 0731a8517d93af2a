//! `[kafka]`: the broker, the group, the topics, and librdkafka properties passed through.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Validate};

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
    /// The store's changelog ([`crate::changelog`]): as many partitions as the engagements topic;
    /// empty in the file means `<group_id>.changelog` ([`super::Config::derive_paths`]).
    pub changelog_topic: String,
    /// Where ingest forwards an event consumed from another partition than its source's owner
    /// ([`crate::ingest`]): as many partitions as the engagements topic; empty in the file means
    /// `<group_id>.routed`.
    pub routed_topic: String,
    /// Where the gradients of rows owned elsewhere go to their owner ([`crate::exchange`]): as
    /// many partitions as the engagements topic; empty in the file means `<group_id>.gradients`.
    pub gradients_topic: String,
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

impl Validate for KafkaConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let k = self;
        for (key, v) in [
            ("kafka.group_id", &k.group_id),
            ("kafka.engagements_topic", &k.engagements_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.embeddings_topic", &k.embeddings_topic),
            ("kafka.versions_topic", &k.versions_topic),
            ("kafka.changelog_topic", &k.changelog_topic),
            ("kafka.routed_topic", &k.routed_topic),
            ("kafka.gradients_topic", &k.gradients_topic),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        let topics = [
            ("kafka.engagements_topic", &k.engagements_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.embeddings_topic", &k.embeddings_topic),
            ("kafka.versions_topic", &k.versions_topic),
            ("kafka.changelog_topic", &k.changelog_topic),
            ("kafka.routed_topic", &k.routed_topic),
            ("kafka.gradients_topic", &k.gradients_topic),
        ];
        for (i, (key, name)) in topics.iter().enumerate() {
            if let Some((other, _)) = topics[..i].iter().find(|(_, n)| n == name) {
                return Err(invalid(key, format!("must differ from {other} ({name:?})")));
            }
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
        Ok(())
    }
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
