//! Kafka plumbing shared by the actors and the CLI: client construction from the config, the
//! topic definitions in `topics/`, `topics apply`, and the embedded (in-process) broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::KafkaError;
use rdkafka::message::ToBytes;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

use crate::config::Config;

mod read;

pub use read::{
    partition_count, read_partitions_to_end, read_to_end, reader, ReadError, READ_IDLE,
};

/// Enqueue `record` on `producer`, waiting while librdkafka's queue is full (it drains as
/// deliveries complete); any other error is returned with the record.
pub async fn send_retrying<'a, K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'a, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka.bootstrap_servers is empty: set it (TWHIN_KAFKA__BOOTSTRAP_SERVERS) or pass --embedded-kafka")]
    NoBroker,
    #[error("creating a Kafka {what}: {source}")]
    Client {
        what: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("topic definition {path}: {problem}")]
    TopicFile { path: PathBuf, problem: String },
    #[error("topic {topic}: {problem}")]
    Topic { topic: String, problem: String },
    #[error("embedded broker: {0}")]
    Embedded(KafkaError),
}

fn client_config(props: &[(String, String)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in props {
        cc.set(k, v);
    }
    cc
}

/// Build any rdkafka client from a property list.
pub fn create_client<T: FromClientConfig>(
    props: &[(String, String)],
    what: &'static str,
) -> Result<T, KafkaSetupError> {
    client_config(props)
        .create()
        .map_err(|source| KafkaSetupError::Client { what, source })
}

/// Build an rdkafka client with a custom context.
pub fn create_client_with_context<C, T>(
    props: &[(String, String)],
    ctx: C,
    what: &'static str,
) -> Result<T, KafkaSetupError>
where
    C: rdkafka::ClientContext,
    T: FromClientConfigAndContext<C>,
{
    client_config(props)
        .create_with_context(ctx)
        .map_err(|source| KafkaSetupError::Client { what, source })
}

/// Fail early, naming the key, when no broker is configured.
pub fn require_broker(cfg: &Config) -> Result<(), KafkaSetupError> {
    if cfg.kafka.bootstrap_servers.trim().is_empty() {
        return Err(KafkaSetupError::NoBroker);
    }
    Ok(())
}

/// The shape of one topic (`topics/<role>.toml`); its name comes from the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub partitions: i32,
    pub replication_factor: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// A topic to create: its role (file stem), name and shape.
#[derive(Debug, Clone)]
pub struct TopicDef {
    pub role: &'static str,
    pub name: String,
    pub spec: TopicSpec,
}

/// The seven topics, read from `kafka.topics_dir`, named by the config.
pub fn topic_defs(cfg: &Config) -> Result<Vec<TopicDef>, KafkaSetupError> {
    let roles: [(&'static str, &String); 7] = [
        ("engagements", &cfg.kafka.engagements_topic),
        ("engagements-dlq", &cfg.kafka.dlq_topic),
        ("embeddings", &cfg.kafka.embeddings_topic),
        ("versions", &cfg.kafka.versions_topic),
        ("changelog", &cfg.kafka.changelog_topic),
        ("routed", &cfg.kafka.routed_topic),
        ("gradients", &cfg.kafka.gradients_topic),
    ];
    roles
        .into_iter()
        .map(|(role, name)| {
            let path = cfg.kafka.topics_dir.join(format!("{role}.toml"));
            let spec = read_topic_spec(&path)?;
            Ok(TopicDef {
                role,
                name: name.clone(),
                spec,
            })
        })
        .collect()
}

fn read_topic_spec(path: &Path) -> Result<TopicSpec, KafkaSetupError> {
    let err = |problem: String| KafkaSetupError::TopicFile {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("{e} (kafka.topics_dir)")))?;
    let spec: TopicSpec = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    if spec.partitions < 1 {
        return Err(err("partitions must be at least 1".into()));
    }
    if spec.replication_factor < 1 {
        return Err(err("replication_factor must be at least 1".into()));
    }
    Ok(spec)
}

/// What `topics apply` did to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Exists { partitions: usize },
}

/// Create the missing topics; report the ones that exist (their partition count as found).
pub async fn apply_topics(
    cfg: &Config,
    defs: &[TopicDef],
) -> Result<Vec<(String, ApplyOutcome)>, KafkaSetupError> {
    require_broker(cfg)?;
    let admin: AdminClient<DefaultClientContext> =
        create_client(&cfg.admin_properties(), "admin client")?;
    let existing = existing_topics(cfg).await?;
    let missing: Vec<&TopicDef> = defs
        .iter()
        .filter(|d| !existing.contains_key(&d.name))
        .collect();
    let mut out: Vec<(String, ApplyOutcome)> = defs
        .iter()
        .filter_map(|d| {
            existing
                .get(&d.name)
                .map(|&partitions| (d.name.clone(), ApplyOutcome::Exists { partitions }))
        })
        .collect();
    if missing.is_empty() {
        return Ok(out);
    }
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|d| {
            let mut t = NewTopic::new(
                &d.name,
                d.spec.partitions,
                TopicReplication::Fixed(d.spec.replication_factor),
            );
            for (k, v) in &d.spec.config {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(|source| KafkaSetupError::Client {
            what: "topic creation request",
            source,
        })?;
    for r in results {
        match r {
            Ok(name) => out.push((name, ApplyOutcome::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                out.push((name, ApplyOutcome::Exists { partitions: 0 }));
            }
            Err((name, code)) => {
                return Err(KafkaSetupError::Topic {
                    topic: name,
                    problem: format!("creation failed: {code}"),
                })
            }
        }
    }
    Ok(out)
}

/// Topic name → partition count, as the broker reports it.
pub async fn existing_topics(cfg: &Config) -> Result<BTreeMap<String, usize>, KafkaSetupError> {
    let props = cfg.admin_properties();
    // Metadata calls block: keep them off the async threads.
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::BaseConsumer = create_client(&props, "metadata client")?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .map_err(|source| KafkaSetupError::Client {
                what: "metadata request (is the broker reachable?)",
                source,
            })?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_owned(), t.partitions().len()))
            .collect())
    })
    .await
    .expect("metadata thread panicked")
}

/// librdkafka's in-process Kafka-protocol cluster, with the configured topics created.
///
/// It listens on 127.0.0.1 (random ports), so other processes can produce to it while it lives.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    pub fn start(defs: &[TopicDef]) -> Result<EmbeddedKafka, KafkaSetupError> {
        let cluster = MockCluster::new(1).map_err(KafkaSetupError::Embedded)?;
        for d in defs {
            cluster
                .create_topic(&d.name, d.spec.partitions, 1)
                .map_err(KafkaSetupError::Embedded)?;
        }
        Ok(EmbeddedKafka { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
