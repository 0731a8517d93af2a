//! Harness for the broker integration tests: a real Kafka-protocol broker (tansu) started on
//! 127.0.0.1, the `twhin-stream` binary as a child process, a producer, a DLQ reader, and a tiny
//! HTTP client for `/v1/status`.
//!
//! The broker binary is found at `$TANSU_BIN` or `.cache/bin/tansu` (installed by `.ci/setup`).
//! A missing broker fails the test with instructions; it is never a skip.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use twhin_stream::publish::{RowRecord, VersionMarker};

/// The scenarios start brokers and daemons and measure nothing, but they share two cores: run
/// them one at a time whatever `--test-threads` says.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A tansu broker with in-memory storage on a free loopback port.
pub struct Broker {
    child: Child,
    pub bootstrap: String,
    log: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        let bin = std::env::var_os("TANSU_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".cache/bin/tansu"));
        assert!(
            bin.exists(),
            "the test broker is missing: {} (run `bash .ci/setup`, or set TANSU_BIN)",
            bin.display()
        );
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join("tansu.log");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let bootstrap = format!("127.0.0.1:{port}");
        wait_until("the broker to listen", Duration::from_secs(20), || {
            TcpStream::connect(&bootstrap).ok()
        });
        Broker {
            child,
            bootstrap,
            log,
        }
    }

    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = signal_quiet(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_quiet(pid: u32, sig: &str) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
}

/// Environment for every `twhin-stream` child: the broker, the store, fast group joins.
pub fn daemon_env(bootstrap: &str, store: &Path, http_port: u16) -> Vec<(String, String)> {
    vec![
        ("TWHIN_KAFKA__BOOTSTRAP_SERVERS".into(), bootstrap.into()),
        ("TWHIN_STORAGE__PATH".into(), store.display().to_string()),
        (
            "TWHIN_TRAINER__CHECKPOINT_PATH".into(),
            store.with_extension("checkpoints").display().to_string(),
        ),
        (
            "TWHIN_PUBLISH__PATH".into(),
            store.with_extension("publish").display().to_string(),
        ),
        ("TWHIN_HTTP__BIND".into(), format!("127.0.0.1:{http_port}")),
        (
            "TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS".into(),
            "6000".into(),
        ),
        (
            "TWHIN_KAFKA__CONSUMER__STATISTICS_INTERVAL_MS".into(),
            "1000".into(),
        ),
        ("TWHIN_INGEST__BATCH_MAX_WAIT_MS".into(), "100".into()),
        (
            "TWHIN_LOG__LEVEL".into(),
            "info,librdkafka=warn,rdkafka=warn".into(),
        ),
    ]
}

/// A broker and the environment of a daemon that publishes: its store under `dir`, embeddings
/// of `dim`, a version every `interval_secs`, then `extra`; the topics are created.
pub struct Publishing {
    pub broker: Broker,
    pub store: PathBuf,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

pub fn publishing(
    dir: &Path,
    dim: usize,
    interval_secs: u64,
    extra: &[(&str, &str)],
) -> Publishing {
    let broker = Broker::start(dir);
    let store = dir.join("store");
    let port = free_port();
    let mut env = daemon_env(&broker.bootstrap, &store, port);
    env.push(("TWHIN_TRAIN__DIM".into(), dim.to_string()));
    env.push((
        "TWHIN_PUBLISH__INTERVAL_SECS".into(),
        interval_secs.to_string(),
    ));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    cli(&env, &["topics", "apply"]);
    Publishing {
        broker,
        store,
        port,
        env,
    }
}

/// Run the binary to completion (e.g. `topics apply`), returning stdout; panics on failure.
pub fn cli(env: &[(String, String)], args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_twhin-stream"))
        .current_dir(repo_root())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "twhin-stream {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The daemon as a child process.
pub struct Daemon {
    child: Option<Child>,
    pub http_port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    pub fn start(env: Vec<(String, String)>, http_port: u16, log_dir: &Path) -> Daemon {
        let mut d = Daemon {
            child: None,
            http_port,
            env,
            log: log_dir.join("daemon.log"),
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== start {} =====", self.starts).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_twhin-stream"))
            .current_dir(repo_root())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("run")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.http_port;
        wait_until("the daemon's HTTP server", Duration::from_secs(30), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early: {status}\n{}", self.log_tail());
            }
            http_get(port, "/healthz").ok()
        });
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.spawn();
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM for 60 s\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let body = http_get(self.http_port, "/v1/status").ok()?;
        serde_json::from_str(&body).ok()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics").unwrap()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 60)
    }

    /// Everything the current (or last) run logged.
    pub fn log_of_last_start(&self) -> String {
        let all = std::fs::read_to_string(&self.log).unwrap_or_default();
        let marker = format!("===== start {} =====", self.starts);
        all.split_once(&marker)
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or(all)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- daemon log tail ----\n{}", self.log_tail());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Minimal HTTP/1.0 GET on 127.0.0.1 (keeps an HTTP client out of the dependencies).
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("{path}: {head}")));
    }
    Ok(body.to_owned())
}

/// Read a number from the status document by JSON pointer.
pub fn status_u64(status: &serde_json::Value, pointer: &str) -> u64 {
    status
        .pointer(pointer)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// `(src, rel, dst)` as written in an event.
pub type Triple = (String, String, String);

/// The i-th valid event of the default Twitter schema; every (src, rel, dst) is distinct.
pub fn valid_event(i: usize, with_event_id: bool) -> (Outgoing, Triple) {
    const RELS: [(&str, &str, &str); 8] = [
        ("user", "follows", "user"),
        ("user", "favorites", "tweet"),
        ("user", "retweets", "tweet"),
        ("user", "replies", "tweet"),
        ("user", "authors", "tweet"),
        ("user", "clicks", "ad"),
        ("advertiser", "promotes", "ad"),
        ("user", "searches", "query"),
    ];
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
