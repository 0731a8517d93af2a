//! Events produced to the broker, and what comes back: dead letters, published versions, the
//! store's triples.

use std::collections::HashMap;
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

/// The first `n` valid events, every fourth keyed by something other than its source
/// (`request-<i>`): those reach their source's owner through the routed topic.
pub fn partly_miskeyed_events(n: usize) -> Vec<(Outgoing, Triple)> {
    (0..n)
        .map(|i| {
            let (mut m, triple) = valid_event(i, false);
            if i % 4 == 3 {
                m.key = format!("request-{i}");
            }
            (m, triple)
        })
        .collect()
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
    let mut landed = Vec::with_capacity(msgs.len());
    produce_each(bootstrap, topic, msgs.iter().cloned(), per_sec, |l| {
        landed.push(l)
    });
    landed
}

/// As [`produce`], for a stream of any length: each message is made as it is sent, at most
/// [`IN_FLIGHT`] deliveries are awaited at once; returns how many were produced.
pub fn produce_stream(
    bootstrap: &str,
    topic: &str,
    msgs: impl Iterator<Item = Outgoing>,
    per_sec: Option<f64>,
) -> usize {
    produce_each(bootstrap, topic, msgs, per_sec, |_| {})
}

/// Most deliveries awaited at once by [`produce_stream`] (bounds memory).
pub const IN_FLIGHT: usize = 50_000;

/// The tests' producer: idempotent, and placing keyed records with Kafka's default partitioner,
/// as topics/README.md asks of every producer (a keyed event lands in the partition that owns
/// its source). Build it inside a Tokio runtime.
pub fn test_producer(bootstrap: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap()
}

/// Send `msgs` in order (paced: message `i` not before `i / per_sec` s), handing each one's
/// landing place to `landed` in input order; panics when a delivery fails.
fn produce_each(
    bootstrap: &str,
    topic: &str,
    msgs: impl Iterator<Item = Outgoing>,
    per_sec: Option<f64>,
    mut landed: impl FnMut(Landed),
) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let producer = test_producer(bootstrap);
        let start = Instant::now();
        let mut pending = std::collections::VecDeque::new();
        let mut sent = 0;
        for (i, m) in msgs.enumerate() {
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
                        pending.push_back(f);
                        break;
                    }
                    Err((_, back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            sent += 1;
            if pending.len() >= IN_FLIGHT {
                landed(delivered(pending.pop_front().unwrap()).await);
            }
        }
        while let Some(f) = pending.pop_front() {
            landed(delivered(f).await);
        }
        sent
    })
}

async fn delivered(f: rdkafka::producer::DeliveryFuture) -> Landed {
    let d = f
        .await
        .unwrap()
        .unwrap_or_else(|(e, _)| panic!("produce failed: {e}"));
    (d.partition, d.offset)
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
    let mut out = Vec::new();
    for_each_record(bootstrap, topic, expected, timeout, settle, |m| {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_owned(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
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
    });
    out
}

/// As [`read_all`], every partition, each record handed to `f` as it is read (nothing kept);
/// returns how many were read.
pub fn for_each_record(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> usize {
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
    let mut read = 0;
    while start.elapsed() < timeout && !(read >= expected && last.elapsed() > settle) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                f(&m);
                read += 1;
                last = Instant::now();
            }
            Some(Err(e)) => eprintln!("{topic} read: {e}"),
            None => {}
        }
    }
    read
}

/// Distinct `(src, rel, dst)` triples in a stopped daemon's store, and the edge count.
pub fn stored_triples(store: &Path) -> (std::collections::HashSet<(String, String, String)>, u64) {
    let mut triples = std::collections::HashSet::new();
    let edges = stored_edges(store, |src, rel, dst| {
        triples.insert((
            format!("{}:{}", src.0, src.1),
            rel.to_owned(),
            format!("{}:{}", dst.0, dst.1),
        ));
    });
    (triples, edges)
}

/// Every edge in a stopped daemon's store, in log order, handed to `f` as `((type, id), rel,
/// (type, id))` a page at a time (nothing kept); returns the store's edge count.
pub fn stored_edges(store: &Path, mut f: impl FnMut((&str, &str), &str, (&str, &str))) -> u64 {
    use twhin_stream::store::{GraphStore, NodeRef};
    let s = GraphStore::open_existing(store).unwrap();
    let schema = s.stored_schema().clone();
    let id = |n: NodeRef| {
        s.node_id(n)
            .unwrap()
            .expect("every node has a reverse entry")
    };
    let mut cursor = 0;
    loop {
        let page = s.edges_from(cursor, 1 << 20).unwrap();
        let Some(&(last, _)) = page.last() else {
            break;
        };
        for (_, e) in &page {
            f(
                (&schema.node_types[e.src.node_type as usize], &id(e.src)),
                &schema.relations[e.rel as usize].0,
                (&schema.node_types[e.dst.node_type as usize], &id(e.dst)),
            );
        }
        cursor = last + 1;
    }
    s.edge_count()
}

/// A row as read from the embeddings topic: `(partition, key, row)`.
pub type PublishedRow = (i32, String, RowRecord);

/// Everything the publisher left on the broker, rows in the order read (per partition, log
/// order).
pub struct Published {
    pub rows: Vec<PublishedRow>,
    pub markers: Vec<VersionMarker>,
}

/// The publications behind `markers`, in the order each one's first marker was read: the
/// markers of one attempt (contract 3: one per partition it covered, all sharing its version
/// and epoch) merged into one that counts all their rows and names no partition.
pub fn rounds(markers: &[VersionMarker]) -> Vec<VersionMarker> {
    let mut out: Vec<VersionMarker> = Vec::new();
    let mut at: HashMap<(u64, u64), usize> = HashMap::new();
    for m in markers {
        match at.get(&(m.version, m.epoch)) {
            Some(&i) => out[i].rows += m.rows,
            None => {
                at.insert((m.version, m.epoch), out.len());
                out.push(VersionMarker {
                    partition: None,
                    ..m.clone()
                });
            }
        }
    }
    out
}

/// The table a subscriber holds after every row and then every marker of `p`, in the order read.
pub fn assemble(p: &Published) -> HashMap<String, twhin_stream::subscriber::Entry> {
    let mut a = twhin_stream::subscriber::VersionAssembler::new();
    for (partition, key, row) in &p.rows {
        a.push_row(*partition, key.clone(), row.clone());
    }
    for m in &p.markers {
        a.push_marker(m.clone());
    }
    a.table().clone()
}

/// Waits for at least `min_markers` markers, then for every row they announce.
pub fn read_published(bootstrap: &str, min_markers: usize) -> Published {
    let markers = read_markers(bootstrap, min_markers);
    let mut rows = Vec::new();
    for_each_row(
        bootstrap,
        markers.iter().map(|m| m.rows as usize).sum(),
        Duration::from_secs(120),
        |q, k, r| rows.push((q, k, r)),
    );
    Published { rows, markers }
}

/// Every marker on the versions topic, once at least `min_markers` are in and no more came for
/// 3 s.
pub fn read_markers(bootstrap: &str, min_markers: usize) -> Vec<VersionMarker> {
    read_all(
        bootstrap,
        "twhin.versions",
        min_markers,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .iter()
    .map(|m| VersionMarker::decode(m.payload.as_deref().unwrap()).unwrap())
    .collect()
}

/// Every row on the embeddings topic (per partition, log order), handed to `f` with its partition
/// and key as it is read,
/// once at least `expected` are in and no more came for 3 s (or `timeout` passed); returns how
/// many were read.
pub fn for_each_row(
    bootstrap: &str,
    expected: usize,
    timeout: Duration,
    mut f: impl FnMut(i32, String, RowRecord),
) -> usize {
    for_each_record(
        bootstrap,
        "twhin.embeddings",
        expected,
        timeout,
        Duration::from_secs(3),
        |m| {
            f(
                m.partition(),
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                RowRecord::decode(m.payload().unwrap()).unwrap(),
            )
        },
    )
}

/// The store's live edges are `expected`, each once (an edge stored twice would be live twice).
pub fn assert_live_exactly(store: &std::path::Path, expected: &std::collections::HashSet<Triple>) {
    let (live, edges) = stored_triples(store);
    let deleted = (twhin_stream::store::GraphStore::open_existing(store).unwrap()).deleted_edges();
    assert_eq!(
        edges - deleted,
        live.len() as u64,
        "duplicate edges in the store"
    );
    assert_eq!(live.len(), expected.len(), "live edge count");
    assert_eq!(&live, expected);
}
