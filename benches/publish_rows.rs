//! Publication throughput (rows/s) in `f32le`: a version of `PUBLISH_ROWS` changed rows (default
//! 20,000; dimension `PUBLISH_DIM`, default 128) built from a [`ModelDelta`] — rows selected
//! against the reference, keys looked up in the store, values encoded — and then produced to a
//! real Kafka-protocol broker through the daemon's [`KafkaSink`] (rows, acknowledgements, the
//! marker), when the test broker is there (`TANSU_BIN`, or `.cache/bin/tansu`; started on
//! 127.0.0.1 with in-memory storage). Without it only the build is measured, and the bench says so.
//!
//! Run with `PUBLISH_ROWS=200000 cargo bench --bench publish_rows`. Prints
//! `publish_rows rows=… build_rows_per_s=… produce_rows_per_s=… end_to_end_rows_per_s=…`
//! (medians over `PUBLISH_ROUNDS` versions, default 3), then what a subscriber pays to decode
//! the same rows: `decode_rows json=… f32le=…` (rows/s, medians over the rounds).

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use common::{env_or, store_with_users};
use twhin_stream::config::{Config, ValueFormat};
use twhin_stream::kafka;
use twhin_stream::publish::{
    build_delta_version, KafkaSink, RowRecord, Scope, VersionRequest, VersionSink,
};
use twhin_stream::train::{ModelDelta, Snapshot, TableDelta};

/// A delta in which every one of `rows` rows of type 0 moved (by 10%, over the threshold).
fn delta(reference: &Snapshot, types: usize, rows: i64) -> ModelDelta {
    let dim = reference.relations.size()[1];
    let values = &reference.tables[0] * 1.1;
    let mut tables = vec![TableDelta {
        len: rows,
        index: Tensor::arange(rows, (Kind::Int64, Device::Cpu)),
        values,
        ts: vec![1_732_190_400_000; rows as usize],
        biases: None,
    }];
    for _ in 1..types {
        tables.push(TableDelta {
            len: 0,
            index: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            values: Tensor::zeros([0, dim], (Kind::Float, Device::Cpu)),
            ts: Vec::new(),
            biases: None,
        });
    }
    ModelDelta {
        tables,
        relations: reference.relations.shallow_clone(),
        samples: Vec::new(),
        cursor: 0,
        exchange: Default::default(),
    }
}

struct Tansu(Child);

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test broker on a free port, when its binary is there.
fn start_broker(dir: &std::path::Path) -> Option<(Tansu, String)> {
    let root = common::repo_root();
    let bin = std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache/bin/tansu"));
    if !bin.exists() {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join("tansu.log")).expect("log");
    let child = Command::new(&bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("starting tansu");
    let bootstrap = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while TcpStream::connect(&bootstrap).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "tansu did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((Tansu(child), bootstrap))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rows = env_or("PUBLISH_ROWS", 20_000i64);
    let dim = env_or("PUBLISH_DIM", 128i64);
    let rounds = env_or("PUBLISH_ROUNDS", 3usize);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::load(None).expect("default config");
    cfg.publish.format = ValueFormat::F32le;
    // Producer properties to try (`PUBLISH_PRODUCER="compression.type=none,linger.ms=20"`).
    for kv in std::env::var("PUBLISH_PRODUCER")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = kv.split_once('=') {
            cfg.kafka
                .producer
                .insert(k.trim().into(), toml::Value::String(v.trim().into()));
        }
    }
    let store = store_with_users(&cfg, &dir.path().join("store"), rows);
    let types = store.stored_schema().node_types.len();
    tch::manual_seed(1);
    let reference = Snapshot {
        tables: (0..types)
            .map(|t| {
                let n = if t == 0 { rows } else { 0 };
                Tensor::randn([n, dim], (Kind::Float, Device::Cpu))
            })
            .collect(),
        relations: Tensor::randn(
            [store.stored_schema().relations.len() as i64, dim],
            (Kind::Float, Device::Cpu),
        ),
    };
    let broker = start_broker(dir.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut sink = broker.as_ref().map(|(_, bootstrap)| {
        cfg.kafka.bootstrap_servers = bootstrap.clone();
        let cfg = Arc::new(cfg.clone());
        runtime.block_on(async {
            let defs = kafka::topic_defs(&cfg).expect("topics");
            kafka::apply_topics(&cfg, &defs)
                .await
                .expect("topics apply");
            KafkaSink::start(cfg).await.expect("producer")
        })
    });
    if sink.is_none() {
        eprintln!("publish_rows: no test broker (TANSU_BIN): measuring the build only");
    }
    let (mut build, mut produce, mut total) = (Vec::new(), Vec::new(), Vec::new());
    // The daemon's scope when one instance owns every partition of the default topics.
    let scope = Scope::whole(8);
    for version in 1..=rounds as u64 {
        let d = delta(&reference, types, rows);
        let req = VersionRequest {
            version,
            epoch: 1,
            format: ValueFormat::F32le,
            threshold: cfg.publish.row_threshold,
            comparator: cfg.train.comparator,
            align: None,
            tombstones: &[],
            every_row: false,
            reference_biases: &[],
            builds_on: None,
            retried_rows: &[],
            scope: &scope,
        };
        let started = Instant::now();
        let (prepared, _) = build_delta_version(&store, &d, Some(&reference), &req)
            .expect("build")
            .expect("rows");
        let built = started.elapsed();
        let n = prepared.rows.len() as f64;
        build.push(n / built.as_secs_f64());
        if let Some(sink) = sink.as_mut() {
            let sent = Instant::now();
            runtime.block_on(sink.produce(&prepared)).expect("produce");
            produce.push(n / sent.elapsed().as_secs_f64());
            total.push(n / started.elapsed().as_secs_f64());
        }
        eprintln!(
            "version {version}: {n} rows, build {:.0} ms, total {:.0} ms",
            built.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    let or_none = |v: Vec<f64>| {
        if v.is_empty() {
            "none".to_string()
        } else {
            format!("{:.0}", median(v))
        }
    };
    println!(
        "publish_rows rows={rows} dim={dim} build_rows_per_s={:.0} produce_rows_per_s={} end_to_end_rows_per_s={}",
        median(build),
        or_none(produce),
        or_none(total)
    );
    drop(sink);
    drop(broker);
    decode_rows(&reference.tables[0], rounds);
}

/// Rows/s decoding every row of `table` as a subscriber does, from its JSON and its f32le
/// records (the same rows, in one run).
fn decode_rows(table: &Tensor, rounds: usize) {
    let rows: Vec<RowRecord> = (0..table.size()[0])
        .map(|i| RowRecord {
            version: 7,
            epoch: 2,
            ts: 1_732_190_400_000,
            vector: Vec::<f32>::try_from(&table.get(i)).expect("f32 row"),
        })
        .collect();
    let encoded = |format| -> Vec<Vec<u8>> { rows.iter().map(|r| r.encode(format)).collect() };
    let (json, f32le) = (encoded(ValueFormat::Json), encoded(ValueFormat::F32le));
    let rate = |records: &[Vec<u8>], decode: &dyn Fn(&[u8]) -> RowRecord| {
        let started = Instant::now();
        let mut check = 0.0f32;
        for r in records {
            check += decode(r).vector[0];
        }
        std::hint::black_box(check);
        records.len() as f64 / started.elapsed().as_secs_f64()
    };
    let decode = |b: &[u8]| RowRecord::decode(b).expect("a row");
    assert_eq!(decode(&json[0]), decode(&f32le[0]));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        a.push(rate(&json, &decode));
        b.push(rate(&f32le, &decode));
    }
    println!(
        "decode_rows rows={} json={:.0} f32le={:.0}",
        rows.len(),
        median(a),
        median(b)
    );
}
