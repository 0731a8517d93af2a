//! `/v1/neighbors` at scale through its approximate-candidate index (`serve/ann.rs`): recall
//! against the exact ranking, latency and throughput under concurrent load over HTTP on
//! 127.0.0.1, the index's memory, its build time, and the cost of each version's update.
//!
//! One target type (`user`, the `follows` relation of the default schema) of `ANN_ROWS` rows
//! (default 20,000; the figure is 1,000,000), dimension `ANN_DIM` (default 128), keyed by
//! the users of a real store. The rows are shaped like trained embeddings of the synthetic
//! workload: node `k` in community `k mod C` (C = rows / 1,000, 2 to 1,000), each row its
//! community's centre plus noise (`ANN_NOISE`, default 0.5 of the centre's scale), its length
//! spread by a popularity factor (0.5 to 1.5). The index is `[http.ann]` of
//! `config/default.toml` (`min_rows` set to 1 so the type is indexed at any size), built with
//! `ANN_BUILD_THREADS` (default 2) threads; `ANN_QUANTIZATION=f32` stores the rows as f32 rather
//! than the default's f16.
//!
//! Phases, each bounded in count and time:
//! 1. build: version 1 served and indexed from every row (`build_ms`, `memory_bytes`);
//! 2. recall: `ANN_QUERIES` (default 200) random users, `k=10`, the index's answer against
//!    `exact=true`'s (`recall_at_10`), both over HTTP;
//! 3. load: `ANN_CLIENTS` (default 4) clients, each a keep-alive connection sending requests back
//!    to back for `ANN_LOAD_SECS` (default 3) or `ANN_LOAD_REQUESTS` (default 20,000) in all,
//!    whichever comes first: p50/p99 latency and queries/s; the same with `exact=true` for
//!    comparison (a tenth of the time and count);
//! 4. updates: `ANN_VERSIONS` (default 3) versions, each moving `ANN_MOVED` rows (default 2%;
//!    a version at 1M rows carried 15–40k in the daemon) by up to `ANN_MOVE` (default 0.1) in
//!    each coordinate and adding `ANN_NEW` (default 0.1%) new ones, published while the load
//!    runs again: each update's time (`update_ms`), the rows it re-inserted and kept in place
//!    (`http.ann.reindex_threshold`, `ANN_REINDEX_THRESHOLD` overrides it), the latency
//!    meanwhile, and the recall once they are indexed (`recall_at_10_after_updates`);
//! 5. codes: the last table product-quantized (`ANN_PQ_SUBSPACES`, default 32: 16× smaller at
//!    dim 128) and served as `publish.format = "pq"` serves it; `codes=true`'s answer against
//!    `exact=true`'s (`codes_recall_at_10`), and the load again with `codes=true`.
//!
//! Run with `ANN_ROWS=1000000 cargo bench --bench ann`. Prints each phase and one JSON line.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tch::Tensor;

use common::{env_or, store_with_users};
use twhin_stream::align::AlignStatus;
use twhin_stream::config::{Comparator, Config};
use twhin_stream::ingest::IngestStatus;
use twhin_stream::publish::{Codebooks, PublishedView, ServedCodes};
use twhin_stream::serve::{HttpState, NeighborsResponse, RankMethod, ServingView};
use twhin_stream::store::GraphStore;

/// The clustered rows (see the module docs), `rows × dim`, seeded.
fn clustered(rng: &mut SmallRng, rows: usize, dim: usize, noise: f32) -> Vec<f32> {
    let communities = (rows / 1000).clamp(2, 1000);
    let centres: Vec<Vec<f32>> = (0..communities)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let mut out = Vec::with_capacity(rows * dim);
    for k in 0..rows {
        let scale = rng.random_range(0.5..1.5f32);
        let c = &centres[k % communities];
        out.extend(
            c.iter()
                .map(|x| scale * (x + noise * rng.random_range(-1.0..1.0))),
        );
    }
    out
}

/// Version `version` of a schema of `types` node types whose type 0 has `rows`.
fn view(
    version: u64,
    types: usize,
    rows: &[f32],
    dim: usize,
    relations: &Tensor,
    changed: Option<Vec<i64>>,
) -> PublishedView {
    let n = (rows.len() / dim) as i64;
    let empty = || Tensor::zeros([0, dim as i64], (tch::Kind::Float, tch::Device::Cpu));
    let mut tables = vec![Tensor::from_slice(rows).reshape([n, dim as i64])];
    tables.extend((1..types).map(|_| empty()));
    PublishedView {
        version,
        epoch: 1,
        comparator: Comparator::Dot,
        tables,
        relations: relations.shallow_clone(),
        biases: Vec::new(),
        row_ts: Vec::new(),
        changed: changed.map(|c| vec![Tensor::from_slice(&c)]),
        codes: None,
        scope: None,
    }
}

/// A keep-alive HTTP/1.1 client: one GET, its status and body.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .expect("send");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, body)
    }

    fn neighbors(&mut self, path: &str) -> NeighborsResponse {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("neighbors JSON")
    }
}

/// Latency and rate of one load run.
#[derive(Debug, serde::Serialize)]
struct Load {
    clients: usize,
    requests: u64,
    seconds: f64,
    queries_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// `clients` connections sending `/v1/neighbors` for random users back to back, until `secs`
/// pass or `max_requests` are answered (or `stop` turns true).
fn load(
    addr: SocketAddr,
    users: usize,
    clients: usize,
    secs: f64,
    max_requests: u64,
    extra: &str,
    stop: &AtomicBool,
) -> Load {
    let sent = AtomicU64::new(0);
    let latencies = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (sent, latencies) = (&sent, &latencies);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(1000 + c as u64);
                let mut client = Client::connect(addr);
                let mut mine = Vec::new();
                while started.elapsed().as_secs_f64() < secs
                    && !stop.load(Ordering::Relaxed)
                    && sent.fetch_add(1, Ordering::Relaxed) < max_requests
                {
                    let u = rng.random_range(0..users);
                    let path = format!("/v1/neighbors/user/u{u}?rel=follows&k=10{extra}");
                    let t = Instant::now();
                    let (status, body) = client.get(&path);
                    mine.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut l = latencies.into_inner().unwrap();
    l.sort_by(f64::total_cmp);
    let at = |q: f64| {
        l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Load {
        clients,
        requests: l.len() as u64,
        seconds,
        queries_per_s: l.len() as f64 / seconds,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: l.last().copied().unwrap_or(0.0),
    }
}

/// Share of `exact=true`'s top 10 that the ranking with `suffix` also returns, over `queries`
/// random users, on a connection of its own (the server closes idle ones); each answer must come
/// by `method`.
fn recall_at_10(
    addr: SocketAddr,
    rng: &mut SmallRng,
    rows: usize,
    queries: usize,
    suffix: &str,
    method: RankMethod,
) -> f64 {
    let mut client = Client::connect(addr);
    let (mut hits, mut wanted) = (0usize, 0usize);
    for _ in 0..queries {
        let u = rng.random_range(0..rows);
        let path = format!("/v1/neighbors/user/u{u}?rel=follows&k=10");
        let ranked = client.neighbors(&format!("{path}{suffix}"));
        let exact = client.neighbors(&format!("{path}&exact=true"));
        assert_eq!(ranked.method, method, "{path}{suffix}");
        assert_eq!(exact.method, RankMethod::Exact, "{path}&exact=true");
        wanted += exact.neighbors.len();
        hits += exact
            .neighbors
            .iter()
            .filter(|e| ranked.neighbors.iter().any(|a| a.node == e.node))
            .count();
    }
    hits as f64 / wanted.max(1) as f64
}

fn main() {
    let rows: usize = env_or("ANN_ROWS", 20_000);
    let dim: usize = env_or("ANN_DIM", 128);
    let noise: f32 = env_or("ANN_NOISE", 0.5);
    let queries: usize = env_or("ANN_QUERIES", 200);
    let clients: usize = env_or("ANN_CLIENTS", 4);
    let load_secs: f64 = env_or("ANN_LOAD_SECS", 3.0);
    let load_requests: u64 = env_or("ANN_LOAD_REQUESTS", 20_000);
    let versions: u64 = env_or("ANN_VERSIONS", 3);
    let moved: usize = env_or("ANN_MOVED", (rows / 50).max(1));
    let new: usize = env_or("ANN_NEW", (rows / 1000).max(1));
    let build_threads: usize = env_or("ANN_BUILD_THREADS", 2);
    let move_by: f32 = env_or("ANN_MOVE", 0.1);
    let f32_rows = std::env::var("ANN_QUANTIZATION").is_ok_and(|q| q == "f32");

    let mut cfg = Config::load(None).expect("default config");
    cfg.http.ann.min_rows = 1;
    cfg.http.ann.build_threads = build_threads;
    cfg.http.ann.reindex_threshold =
        env_or("ANN_REINDEX_THRESHOLD", cfg.http.ann.reindex_threshold);
    if f32_rows {
        cfg.http.ann.quantization = twhin_stream::config::AnnQuantization::F32;
    }
    let mut ann_cfg = cfg.http.ann.clone();
    ann_cfg.enabled = true;
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let total_users = rows + new * versions as usize;
    let store = Arc::new(store_with_users(&cfg, dir.path(), total_users as i64));
    eprintln!(
        "store: {total_users} users in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut rng = SmallRng::seed_from_u64(7);
    let mut table = clustered(&mut rng, rows, dim, noise);
    let n_relations = cfg.schema().relations().len();
    let n_types = cfg.schema().node_types().len();
    let relations: Vec<f32> = (0..n_relations * dim)
        .map(|_| rng.random_range(-0.1..0.1))
        .collect();
    let relations = Tensor::from_slice(&relations).reshape([n_relations as i64, dim as i64]);

    // Phase 1: build.
    let serving = ServingView::with_ann(&ann_cfg, None).expect("ann thread");
    let ann = || serving.ann().expect("enabled");
    let started = Instant::now();
    serving.publish(view(1, n_types, &table, dim, &relations, None));
    assert!(ann().wait_for(1, Duration::from_secs(3600)), "index built");
    let build_s = started.elapsed().as_secs_f64();
    let built = ann().figures();
    let memory_bytes = built.types[0].memory_bytes;
    eprintln!(
        "build: {rows} rows, dim {dim}, {build_threads} threads: {build_s:.1} s, index {} MiB (the rows alone {} MiB)",
        memory_bytes >> 20,
        (rows * dim * 4) >> 20
    );

    // The daemon's HTTP server on 127.0.0.1, on its own actix System.
    let state = Arc::new(HttpState {
        store: store.clone() as Arc<GraphStore>,
        ingest: Arc::new(IngestStatus::default()),
        trainer: None,
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle(),
        torch: twhin_stream::train::info(tch::Device::Cpu),
        bootstrap_servers: "127.0.0.1:9".into(),
        engagements_topic: "twhin.engagements".into(),
        started: Instant::now(),
        serving: serving.clone(),
        align: Arc::new(AlignStatus::default()),
        align_control: true,
        publish: None,
        remote: None,
        exchange: None,
        bearer_token: None,
        peers: twhin_stream::serve::Peers::new(std::time::Duration::from_millis(500)),
        rate: Default::default(),
        train: None,
        multi_interest: cfg.http.multi_interest.clone(),
    });
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let (handle, addr) =
                twhin_stream::serve::start("127.0.0.1:0".parse().unwrap(), state).expect("bind");
            addr_tx.send(addr).unwrap();
            let _ = stop_rx.await;
            handle.stop(true).await;
        })
    });
    let addr = addr_rx.recv().expect("server address");

    // Phase 2: recall against the exact ranking, both over HTTP.
    let recall = recall_at_10(addr, &mut rng, rows, queries, "", RankMethod::Ann);
    eprintln!("recall@10 against exact, {queries} queries: {recall:.4}");

    // Phase 3: load, through the index and exactly.
    let idle = AtomicBool::new(false);
    let ann_load = load(addr, rows, clients, load_secs, load_requests, "", &idle);
    eprintln!("load (index): {ann_load:?}");
    let exact_load = load(
        addr,
        rows,
        clients,
        load_secs / 10.0,
        (load_requests / 10).max(1),
        "&exact=true",
        &idle,
    );
    eprintln!("load (exact): {exact_load:?}");

    // Phase 4: versions, each with moved and new rows, indexed while the load runs.
    let updating = AtomicBool::new(false);
    let mut updates = Vec::new();
    let during = std::thread::scope(|s| {
        let under_load = s.spawn(|| load(addr, rows, clients, 3600.0, u64::MAX, "", &updating));
        for v in 2..=versions + 1 {
            let n = table.len() / dim;
            let mut changed: Vec<i64> = (0..moved).map(|_| rng.random_range(0..n as i64)).collect();
            for &i in &changed {
                for x in &mut table[i as usize * dim..(i as usize + 1) * dim] {
                    *x += move_by * rng.random_range(-1.0..1.0f32);
                }
            }
            table.extend(clustered(&mut rng, new, dim, noise));
            changed.extend(n as i64..(n + new) as i64);
            changed.sort_unstable();
            changed.dedup();
            let rows_changed = changed.len();
            let t = Instant::now();
            serving.publish(view(v, n_types, &table, dim, &relations, Some(changed)));
            assert!(
                ann().wait_for(v, Duration::from_secs(3600)),
                "version {v} indexed"
            );
            let ms = t.elapsed().as_secs_f64() * 1e3;
            eprintln!("version {v}: {rows_changed} rows inserted or replaced in {ms:.0} ms");
            updates.push((rows_changed, ms));
        }
        updating.store(true, Ordering::Relaxed);
        under_load.join().expect("load thread")
    });
    eprintln!("load while versions were indexed: {during:?}");
    let figures = ann().figures();
    assert_eq!(
        figures.builds, 1,
        "versions with their changes never rebuild"
    );
    eprintln!(
        "updates: {} rows re-inserted, {} kept in place (reindex_threshold {})",
        figures.rows_updated, figures.rows_kept, ann_cfg.reindex_threshold
    );
    let recall_after = recall_at_10(addr, &mut rng, rows, queries, "", RankMethod::Ann);
    eprintln!("recall@10 against exact after the updates, {queries} queries: {recall_after:.4}");

    // Phase 5: the same rows served from product-quantized codes.
    let subspaces: i64 = env_or("ANN_PQ_SUBSPACES", 32);
    let n = (table.len() / dim) as i64;
    let rows_tensor = Tensor::from_slice(&table).reshape([n, dim as i64]);
    let started = Instant::now();
    let books =
        Codebooks::train(&rows_tensor, subspaces, 65_536, 15, 1, versions + 2).expect("codebooks");
    let codes = books.encode(&rows_tensor).expect("codes");
    let pq_s = started.elapsed().as_secs_f64();
    let pq_error = twhin_stream::publish::relative_error(&rows_tensor, &books.decode(&codes));
    let mut coded = view(
        versions + 2,
        n_types,
        &table,
        dim,
        &relations,
        Some(Vec::new()),
    );
    let mut tables: Vec<Tensor> = (coded.tables.iter())
        .map(|t| {
            Tensor::zeros(
                [t.size()[0], subspaces],
                (tch::Kind::Uint8, tch::Device::Cpu),
            )
        })
        .collect();
    tables[0] = codes;
    coded.codes = Some(ServedCodes {
        codebooks: books,
        tables,
    });
    serving.publish(coded);
    eprintln!("codes: {subspaces} sub-spaces learned and {n} rows encoded in {pq_s:.1} s, relative error {pq_error:.4}");
    let codes_recall = recall_at_10(
        addr,
        &mut rng,
        rows,
        queries,
        "&codes=true",
        RankMethod::Codes,
    );
    eprintln!("codes recall@10 against exact, {queries} queries: {codes_recall:.4}");
    let codes_load = load(
        addr,
        rows,
        clients,
        load_secs / 10.0,
        (load_requests / 10).max(1),
        "&codes=true",
        &idle,
    );
    eprintln!("load (codes): {codes_load:?}");

    let _ = stop_tx.send(());
    server.join().expect("server thread");
    let update_ms: Vec<f64> = updates.iter().map(|u| u.1).collect();
    let summary = serde_json::json!({
        "rows": rows,
        "dim": dim,
        "build_threads": build_threads,
        "build_s": build_s,
        "memory_bytes": memory_bytes,
        "rows_bytes": rows * dim * 4,
        "recall_at_10": recall,
        "queries": queries,
        "load_ann": ann_load,
        "load_exact": exact_load,
        "load_during_updates": during,
        "codes_subspaces": subspaces,
        "codes_relative_error": pq_error,
        "codes_recall_at_10": codes_recall,
        "load_codes": codes_load,
        "update_rows": updates.iter().map(|u| u.0).collect::<Vec<_>>(),
        "update_ms": update_ms,
        "update_rows_reinserted": figures.rows_updated,
        "update_rows_kept": figures.rows_kept,
        "recall_at_10_after_updates": recall_after,
        "config": {
            "connectivity": ann_cfg.connectivity,
            "expansion_add": ann_cfg.expansion_add,
            "expansion_search": ann_cfg.expansion_search,
            "oversample": ann_cfg.oversample,
            "quantization": ann_cfg.quantization,
            "reindex_threshold": ann_cfg.reindex_threshold,
        },
    });
    println!("{summary}");
}
