//! Events produced to the broker, and what comes back: dead letters, published versions, the
//! store's triples.

use std::path::Path;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use twhin_stream::publish::{RowRecord, VersionMarker};

use super::*;

/// `(src, rel, dst)` as written in an event.
pub type Triple = (String, String, String);

/// The default Twitter schema's relations: `(source type, relation, target type)`.
pub const RELS: [(&str, &str, &str); 8] = [
    ("user", "follows", "user"),
    ("user", "favorites", "tweet"),
    ("user", "retweets", "tweet"),
    ("user", "replies", "tweet"),
    ("user", "authors", "tweet"),
    ("user", "clicks", "ad"),
    ("advertiser", "promotes", "ad"),
    ("user", "searches", "query"),
];

/// The i-th valid event of the default Twitter schema; every (src, rel, dst) is distinct.
pub fn valid_event(i: usize, with_event_id: bool) -> (Outgoing, Triple) {
    let (st, rel, dt) = RELS[i % RELS.len()];
    let src = format!("{st}:{}", i % 997);
    let dst = format!("{dt}:{i}");
    let mut json = serde_json::json!({"src": src, "rel": rel, "dst": dst, "ts": 1_732_190_000_000u64 + i as u64});
    if i % 3 == 0 {
        json["weight"] = serde_json::json!(0.5 + (i % 5) as f64);
    }
    if with_event_id {
        json["event_id"] = serde_json::json!(format!("ev-{i}"));
    }
    let out = Outgoing {
        key: src.clone(),
        payload: Some(json.to_string().into_bytes()),
    };
    (out, (src, rel.to_owned(), dst))
}

/// One message to produce: key and raw payload (None = tombstone).
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub key: String,
    pub payload: Option<Vec<u8>>,
}

/// Where each produced message landed.
pub type Landed = (i32, i64);

/// Produce messages with an idempotent producer, optionally paced, returning each one's
/// partition and offset (in input order).
pub fn produce(
    bootstrap: &str,
    topic: &str,
    msgs: &[Outgoing],
    per_sec: Option<f64>,
) -> Vec<Landed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .unwrap();
        let start = Instant::now();
        let mut pending = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            if let Some(rate) = per_sec {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
            }
            let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(m.key.as_str());
            if let Some(p) = &m.payload {
                rec = rec.payload(p.as_slice());
            }
            loop {
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((_, back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        let mut landed = Vec::with_capacity(pending.len());
        for f in pending {
            let d = f
                .await
                .unwrap()
                .unwrap_or_else(|(e, _)| panic!("produce failed: {e}"));
            landed.push((d.partition, d.offset));
        }
        landed
    })
}

/// A record read back from the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Read every record of partition 0 of `topic` from the beginning until `expected` arrived and
/// nothing more came for `settle`.
pub fn read_all(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<DeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "integration-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // Every partition of the topic, from the beginning.
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()
        .and_then(|md| md.topics().first().map(|t| t.partitions().len()))
        .unwrap_or(1)
        .max(1);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let start = Instant::now();
    let mut last = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < timeout && !(out.len() >= expected && last.elapsed() > settle) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_owned(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(DeadLetter {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                last = Instant::now();
            }
            Some(Err(e)) => eprintln!("dlq read: {e}"),
            None => {}
        }
    }
    out
}

/// Distinct `(src, rel, dst)` triples in a stopped daemon's store, and the edge count.
pub fn stored_triples(store: &Path) -> (std::collections::HashSet<(String, String, String)>, u64) {
    use twhin_stream::store::{GraphStore, NodeRef};
    let s = GraphStore::open_existing(store).unwrap();
    let schema = s.stored_schema().clone();
    let name = |n: NodeRef| {
        format!(
            "{}:{}",
            schema.node_types[n.node_type as usize],
            s.node_id(n)
                .unwrap()
                .expect("every node has a reverse entry")
        )
    };
    let edges = s.edges_from(0, usize::MAX).unwrap();
    let triples = edges
        .iter()
        .map(|(_, e)| {
            (
                name(e.src),
                schema.relations[e.rel as usize].0.clone(),
                name(e.dst),
            )
        })
        .collect();
    (triples, s.edge_count())
}

/// Everything the publisher left on the broker, rows in the order read (per partition, log
/// order).
pub struct Published {
    pub rows: Vec<(String, RowRecord)>,
    pub markers: Vec<VersionMarker>,
}

/// Waits for at least `min_markers` markers, then for every row they announce.
pub fn read_published(bootstrap: &str, min_markers: usize) -> Published {
    let markers: Vec<VersionMarker> = read_all(
        bootstrap,
        "twhin.versions",
        min_markers,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .iter()
    .map(|m| VersionMarker::decode(m.payload.as_deref().unwrap()).unwrap())
    .collect();
    let rows = read_all(
        bootstrap,
        "twhin.embeddings",
        markers.iter().map(|m| m.rows as usize).sum(),
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
    .iter()
    .map(|r| {
        (
            String::from_utf8(r.key.clone().unwrap()).unwrap(),
            RowRecord::decode(r.payload.as_deref().unwrap()).unwrap(),
        )
    })
    .collect();
    Published { rows, markers }
}
