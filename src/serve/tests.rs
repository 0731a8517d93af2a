use super::http::same_secret;
use super::*;

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self};
use actix_web::http::StatusCode;

use actix_web::web;

use tch::Tensor;

use crate::align::AlignStatus;
use crate::ingest::IngestStatus;
use crate::publish::PublishedView;
use crate::schema::TypeId;
use crate::serve::ServingView;
use crate::store::GraphStore;

use actix_web::test::{call_service, init_service, read_body, TestRequest};

use crate::schema::{Event, NodeKey, RelId, Schema, SchemaConfig};
use crate::store::{AppendBatch, StoreOptions};
use crate::train::Comparator;

const TOKEN: &str = "0123456789abcdef-test";

// Node types: user 0, movie 1, entity 2. Relations: rated_high 0 (user → movie),
// linked 1 (user → movie or entity), about 2 (entity → movie).
fn schema() -> Schema {
    let cfg: SchemaConfig = toml::from_str(
        r#"
            node_types = ["user", "movie", "entity"]
            relations = [
              { name = "rated_high", src = "user", dst = "movie" },
              { name = "linked", src = "user", dst = ["movie", "entity"] },
              { name = "about", src = "entity", dst = "movie" },
            ]"#,
    )
    .unwrap();
    Schema::new(&cfg).unwrap()
}

fn event(src: (TypeId, &str), rel: RelId, dst: (TypeId, &str)) -> Event {
    let key = |(node_type, id): (TypeId, &str)| NodeKey {
        node_type,
        id: id.into(),
    };
    Event {
        op: Default::default(),
        src: key(src),
        rel,
        dst: key(dst),
        ts: 1_000,
        weight: 1.0,
        event_id: None,
    }
}

/// Interned in order: users u1 0, u2 1, u3 2; movies m1 0, m2 1, m3 2; entity e1 0.
fn store(dir: &std::path::Path) -> Arc<GraphStore> {
    let store = GraphStore::open(dir, &schema(), &StoreOptions::default()).unwrap();
    store
        .append(&AppendBatch::from_events(
            "t",
            0,
            [
                event((0, "u1"), 0, (1, "m1")),
                event((0, "u1"), 0, (1, "m2")),
                event((0, "u2"), 1, (2, "e1")),
                event((0, "u1"), 1, (1, "m3")),
                event((0, "u3"), 0, (1, "m2")),
            ],
        ))
        .unwrap();
    Arc::new(store)
}

fn t(rows: &[[f32; 2]]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).reshape([rows.len() as i64, 2])
}

/// Version 7 covers u1 and u2 but not u3 (the user table has 2 rows).
fn view() -> PublishedView {
    PublishedView {
        version: 7,
        epoch: 2,
        comparator: Comparator::Dot,
        tables: vec![
            t(&[[1.0, 0.0], [0.0, 1.0]]),
            t(&[[1.0, 1.5], [2.0, -1.0], [-1.0, 4.0]]),
            t(&[[3.0, 0.0]]),
        ],
        relations: t(&[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        biases: Vec::new(),
        row_ts: vec![vec![1_732_190_000_123, 200], vec![], vec![]],
        changed: None,
        codes: None,
        scope: None,
    }
}

fn state(store: Arc<GraphStore>, serving: ServingView, token: Option<&str>) -> HttpState {
    HttpState {
        store,
        ingest: Arc::new(IngestStatus::default()),
        trainer: None,
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle(),
        torch: crate::train::info(tch::Device::Cpu),
        bootstrap_servers: "127.0.0.1:9".into(),
        engagements_topic: "twhin.engagements".into(),
        started: Instant::now(),
        serving,
        align: Arc::new(AlignStatus::default()),
        align_control: true,
        publish: None,
        remote: None,
        exchange: None,
        bearer_token: token.map(Into::into),
        peers: Peers::new(Duration::from_millis(500)),
        rate: Mutex::default(),
        train: None,
        multi_interest: default_section(&["http", "multi_interest"]),
    }
}

/// A section of `config/default.toml` (its documented defaults).
fn default_section<T: serde::de::DeserializeOwned>(path: &[&str]) -> T {
    let mut value = toml::Value::Table(
        toml::from_str::<toml::Table>(include_str!("../../config/default.toml")).unwrap(),
    );
    for key in path {
        value = value[*key].clone();
    }
    value.try_into().unwrap()
}

fn served_view() -> ServingView {
    let serving = ServingView::new();
    serving.publish(view());
    serving
}

fn request(uri: &str, token: Option<&str>) -> TestRequest {
    let req = TestRequest::get().uri(uri);
    match token {
        Some(token) => req.insert_header((header::AUTHORIZATION, format!("Bearer {token}"))),
        None => req,
    }
}

/// The app over a fresh store in `dir`, serving `view`, guarded by `token`. A macro: the
/// test service's request type (actix-http's) is not nameable from actix-web.
macro_rules! serve {
    ($dir:expr, $view:expr, $token:expr) => {
        init_service(app(web::Data::new(state(store($dir), $view, $token))))
    };
}

/// Call `app`: the status and the body as JSON (`null` if not JSON).
async fn call<S, R, B>(app: &S, req: R) -> (StatusCode, serde_json::Value)
where
    S: actix_web::dev::Service<R, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let res = call_service(app, req).await;
    let code = res.status();
    let body = read_body(res).await;
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

#[actix_web::test]
async fn embeddings_serve_the_committed_row() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), None).await;
    let (code, body) = call(&app, request("/v1/embeddings/user/u1", None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let got: EmbeddingResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        got,
        EmbeddingResponse {
            node: "user:u1".into(),
            version: 7,
            epoch: 2,
            ts: Some(1_732_190_000_123),
            vector: vec![1.0, 0.0],
            source: RowSource::Owner,
            partition: None,
        }
    );
    let (code, body) = call(&app, request("/v1/embeddings/movie/m3", None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["vector"], serde_json::json!([-1.0, 4.0]));
    assert_eq!(body["ts"], serde_json::Value::Null);
}

#[actix_web::test]
async fn embeddings_name_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), None).await;
    for (uri, want, text) in [
        ("/v1/embeddings/user/nobody", "unknown_node", "user:nobody"),
        ("/v1/embeddings/tweet/u1", "unknown_type", "tweet"),
        // u3 is interned but version 7 has no row for it yet.
        ("/v1/embeddings/user/u3", "node_not_served", "user:u3"),
    ] {
        let (code, body) = call(&app, request(uri, None).to_request()).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{uri}: {body}");
        assert_eq!(body["code"], want, "{uri}: {body}");
        assert!(body["error"].as_str().unwrap().contains(text), "{body}");
    }
}

#[actix_web::test]
async fn nothing_is_served_before_the_first_commit() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), ServingView::new(), None).await;
    for uri in [
        "/v1/embeddings/user/u1",
        "/v1/neighbors/user/u1?rel=rated_high",
    ] {
        let (code, body) = call(&app, request(uri, None).to_request()).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert_eq!(body["code"], "no_version");
    }
    let (code, body) = call(&app, request("/v1/status", None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["publish"]["version"], serde_json::Value::Null);
}

#[actix_web::test]
async fn neighbors_rank_exactly_across_target_types() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), None).await;
    let ranked = |body: serde_json::Value| {
        let r: NeighborsResponse = serde_json::from_value(body).unwrap();
        let list: Vec<(String, f32)> = r.neighbors.into_iter().map(|n| (n.node, n.score)).collect();
        (r.node, r.rel, r.version, list)
    };
    // u1 + rated_high = (1, 0) + (0, 1) = (1, 1); against the movies:
    // m1 (1, 1.5) → 2.5, m2 (2, -1) → 1, m3 (-1, 4) → 3.
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=rated_high&k=2", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        ranked(body),
        (
            "user:u1".into(),
            "rated_high".into(),
            7,
            vec![("movie:m3".into(), 3.0), ("movie:m1".into(), 2.5)]
        )
    );
    // u1 + linked = (2, 0): m1 → 2, m2 → 4, m3 → -2, and the entity e1 (3, 0) → 6.
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=linked&k=3", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        ranked(body).3,
        vec![
            ("entity:e1".into(), 6.0),
            ("movie:m2".into(), 4.0),
            ("movie:m1".into(), 2.0)
        ]
    );
    // k defaults to 10 and is capped by the candidates: all four, best first.
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=linked", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let scores: Vec<f32> = ranked(body).3.into_iter().map(|(_, s)| s).collect();
    assert_eq!(scores, vec![6.0, 4.0, 2.0, -2.0]);
    // A node the version does not cover yet.
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u3?rel=rated_high", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
}

#[actix_web::test]
async fn neighbors_rank_with_the_target_bias() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = view();
    // Movie biases (0, 0, -1): u1 + rated_high = (1, 1) scores m1 2.5, m2 1, m3 3 - 1 = 2.
    v.biases = vec![None, Some(Tensor::from_slice(&[0.0f32, 0.0, -1.0])), None];
    let serving = ServingView::new();
    serving.publish(v);
    let app = serve!(dir.path(), serving, None).await;
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=rated_high&k=2", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let r: NeighborsResponse = serde_json::from_value(body).unwrap();
    let list: Vec<(String, f32)> = r.neighbors.into_iter().map(|n| (n.node, n.score)).collect();
    assert_eq!(
        list,
        vec![("movie:m1".into(), 2.5), ("movie:m3".into(), 2.0)]
    );
}

/// The default `[train]` with users composed from their `recent` most recent targets.
fn history_train(recent: usize) -> crate::config::TrainParams {
    let mut train: crate::config::TrainParams = default_section(&["train"]);
    train.history_types = vec!["user".into()];
    train.history_recent = recent;
    train
}

#[actix_web::test]
async fn neighbors_rank_a_history_source_with_its_recent_targets() {
    let dir = tempfile::tempdir().unwrap();
    let train = history_train(2);
    let mut st = state(store(dir.path()), served_view(), None);
    st.train = Some(train);
    let app = init_service(app(web::Data::new(st))).await;
    // u1's two most recent movies are m2 (2, -1) and m3 (-1, 4): u1 = (1, 0) + (1, 3) / √2,
    // plus rated_high (0, 1); m3 scores -1.707 + 4 · 3.121 = 10.778, m1 1.707 + 1.5 · 3.121.
    let (code, body) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=rated_high&k=2", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let r: NeighborsResponse = serde_json::from_value(body).unwrap();
    let h = 1.0 / 2f32.sqrt();
    let (a, b) = (1.0 + h, 3.0 * h + 1.0);
    let want = [("movie:m3", -a + 4.0 * b), ("movie:m1", a + 1.5 * b)];
    assert_eq!(r.neighbors.len(), 2);
    for (got, (node, score)) in r.neighbors.iter().zip(want) {
        assert_eq!(got.node, node);
        assert!((got.score - score).abs() < 1e-4, "{:?}", r.neighbors);
    }
}

#[actix_web::test]
async fn neighbors_merge_a_history_sources_interests_as_a_mixture() {
    let dir = tempfile::tempdir().unwrap();
    let train = history_train(3);
    let mut st = state(store(dir.path()), served_view(), None);
    st.train = Some(train);
    // u1's three recent movies, one interest per movie, at most two.
    st.multi_interest.max_interests = 2;
    st.multi_interest.targets_per_interest = 1;
    let app = init_service(app(web::Data::new(st))).await;
    let rank = |uri: &'static str| {
        let app = &app;
        async move {
            let (code, body) = call(app, request(uri, None).to_request()).await;
            assert_eq!(code, StatusCode::OK, "{body}");
            serde_json::from_value::<NeighborsResponse>(body).unwrap()
        }
    };
    let mixed = rank("/v1/neighbors/user/u1?rel=rated_high&k=3&interests=true").await;
    assert_eq!(mixed.interests, Some(2));
    assert_eq!(mixed.method, RankMethod::Exact);
    // The scores are a mixture of softmaxes over the three movies: a distribution.
    let total: f32 = mixed.neighbors.iter().map(|n| n.score.exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "{:?}", mixed.neighbors);
    // Off by default (http.multi_interest.enabled = false): the one composed user.
    let one = rank("/v1/neighbors/user/u1?rel=rated_high&k=3").await;
    assert_eq!(one.interests, None);
    assert_eq!(one.neighbors[0].node, "movie:m3");
    // A source without recent movies is one interest: its own row's softmax.
    let alone = rank("/v1/neighbors/user/u2?rel=rated_high&k=3&interests=true").await;
    assert_eq!(alone.interests, Some(1));
    let total: f32 = alone.neighbors.iter().map(|n| n.score.exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "{:?}", alone.neighbors);
}

/// Users u1 (0) and u2 (1); movies m0..m{n-1} (indices in order): u1 rated m0..m4 (its known
/// targets), u2 the rest.
fn many_movies(dir: &std::path::Path, n: usize) -> Arc<GraphStore> {
    let store = GraphStore::open(dir, &schema(), &StoreOptions::default()).unwrap();
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let events = names.iter().enumerate().map(|(i, m)| {
        let user = if i < 5 { "u1" } else { "u2" };
        event((0, user), 0, (1, m.as_str()))
    });
    store
        .append(&AppendBatch::from_events(
            "t",
            0,
            events.collect::<Vec<_>>(),
        ))
        .unwrap();
    Arc::new(store)
}

#[actix_web::test]
async fn neighbors_search_the_index_above_its_size_and_score_exactly() {
    use rand::{Rng, SeedableRng};
    let (n, dim) = (3000usize, 8i64);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
    let mut movies: Vec<f32> = (0..n * dim as usize)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    // m0, a known target of u1, is its best movie by far; m7 the second.
    movies[..dim as usize].fill(3.0);
    movies[7 * dim as usize..8 * dim as usize].fill(2.0);
    let biases: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2..0.2)).collect();
    let view = PublishedView {
        version: 3,
        epoch: 1,
        comparator: Comparator::Dot,
        tables: vec![
            Tensor::from_slice(&[0.5f32; 16]).reshape([2, dim]),
            Tensor::from_slice(&movies).reshape([n as i64, dim]),
            Tensor::zeros([0, dim], (tch::Kind::Float, tch::Device::Cpu)),
        ],
        relations: Tensor::from_slice(&[0.1f32; 24]).reshape([3, dim]),
        biases: vec![None, Some(Tensor::from_slice(&biases)), None],
        row_ts: Vec::new(),
        changed: None,
        codes: None,
        scope: None,
    };
    let mut cfg: crate::config::AnnConfig =
        toml::from_str::<toml::Table>(include_str!("../../config/default.toml")).unwrap()["http"]
            ["ann"]
            .clone()
            .try_into()
            .unwrap();
    (cfg.enabled, cfg.min_rows) = (true, 1000);
    let serving = ServingView::with_ann(&cfg, None).unwrap();
    serving.publish(view);
    assert!(serving.ann().unwrap().wait_for(3, Duration::from_secs(60)));
    let dir = tempfile::tempdir().unwrap();
    let st = state(many_movies(dir.path(), n), serving, None);
    let app = init_service(app(web::Data::new(st))).await;
    let get =
        |q: &str| request(&format!("/v1/neighbors/user/u1?rel=rated_high&{q}"), None).to_request();
    let (code, body) = call(&app, get("k=10")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let ann: NeighborsResponse = serde_json::from_value(body).unwrap();
    assert_eq!((ann.method, ann.index_version), (RankMethod::Ann, Some(3)));
    let (code, body) = call(&app, get("k=10&exact=true")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let exact: NeighborsResponse = serde_json::from_value(body).unwrap();
    assert_eq!(
        (exact.method, exact.index_version),
        (RankMethod::Exact, None)
    );
    // The same targets with the same (exact) scores, best first: m0 then m7.
    assert_eq!(ann.neighbors, exact.neighbors);
    assert_eq!(ann.neighbors[0].node, "movie:m0");
    assert_eq!(ann.neighbors[1].node, "movie:m7");
    // exclude_known leaves u1's rated movies (m0..m4) out, on both paths alike.
    let mut lists = Vec::new();
    for q in [
        "k=10&exclude_known=true",
        "k=10&exclude_known=true&exact=true",
    ] {
        let (code, body) = call(&app, get(q)).await;
        assert_eq!(code, StatusCode::OK, "{q}: {body}");
        let r: NeighborsResponse = serde_json::from_value(body).unwrap();
        assert_eq!(r.neighbors[0].node, "movie:m7", "{q}");
        assert_eq!(r.neighbors.len(), 10);
        let known = ["movie:m0", "movie:m1", "movie:m2", "movie:m3", "movie:m4"];
        assert!(
            r.neighbors
                .iter()
                .all(|n| !known.contains(&n.node.as_str())),
            "{q}"
        );
        lists.push(r.neighbors);
    }
    assert_eq!(lists[0], lists[1]);
    // /v1/status reports the index: the movies (type 1), version 3, one build.
    let (code, body) = call(&app, request("/v1/status", None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["ann"]["builds"], 1, "{body}");
    assert_eq!(body["ann"]["types"][0]["node_type"], 1);
    assert_eq!(body["ann"]["types"][0]["version"], 3);
    assert_eq!(body["ann"]["types"][0]["rows"], n);
    let (code, body) = call(&app, get("exact=maybe")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("`exact`"),
        "{body}"
    );
    // A version that does not say which partitions it covers answers for none when another
    // instance asks; a body that is not a candidates request is refused as such.
    let post = |body: serde_json::Value| {
        TestRequest::post()
            .uri("/v1/candidates/movie")
            .set_json(body)
            .to_request()
    };
    let (code, body) = call(
        &app,
        post(serde_json::json!({"vector": vec![0.6; 8], "k": 3})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["partitions"], &body["of"], &body["candidates"]),
        (
            &serde_json::json!([]),
            &serde_json::json!(0),
            &serde_json::json!([])
        )
    );
    let (code, body) = call(&app, post(serde_json::json!({"vector": "x", "k": 3}))).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "bad_parameter", "{body}");
}

#[actix_web::test]
async fn neighbors_reject_bad_parameters_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), None).await;
    for (uri, param) in [
        ("/v1/neighbors/user/u1?rel=rated_high&k=0", "`k`"),
        ("/v1/neighbors/user/u1?rel=rated_high&k=1001", "`k`"),
        ("/v1/neighbors/user/u1?rel=rated_high&k=ten", "`k`"),
        ("/v1/neighbors/user/u1?rel=rated_high&k=-1", "`k`"),
        ("/v1/neighbors/user/u1", "`rel`"),
        ("/v1/neighbors/user/u1?rel=", "`rel`"),
        ("/v1/neighbors/user/u1?rel=follows", "`rel`"),
        // `about` starts at entities.
        ("/v1/neighbors/user/u1?rel=about", "`rel`"),
        (
            "/v1/neighbors/user/u1?rel=rated_high&interests=maybe",
            "`interests`",
        ),
        // The served version was not published as codes (publish.format = "pq").
        ("/v1/neighbors/user/u1?rel=rated_high&codes=true", "`codes`"),
    ] {
        let (code, body) = call(&app, request(uri, None).to_request()).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(param), "{uri}: {error}");
    }
    let (code, _) = call(
        &app,
        request("/v1/neighbors/user/u1?rel=rated_high&k=1000", None).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[actix_web::test]
async fn status_reports_the_served_version_alignment_and_rate() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), None).await;
    let (code, body) = call(&app, request("/v1/status", None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let p = &body["publish"];
    assert_eq!(
        (p["version"].as_u64(), p["epoch"].as_u64()),
        (Some(7), Some(2))
    );
    assert_eq!(
        p["rows"],
        serde_json::json!({ "user": 2, "movie": 3, "entity": 1 })
    );
    assert_eq!(p["relations"], 3);
    assert_eq!(p["freshness"]["events"], 0);
    assert_eq!(body["align"]["control"], true);
    assert_eq!(body["align"]["held"], 0);
    assert_eq!(body["ingest"]["events_per_sec"], 0.0);
    assert!(body["ingest"]["recent_events_per_sec"].is_null());
    assert_eq!(body["store"]["edges_total"], 5);
}

#[actix_web::test]
async fn a_bearer_token_guards_everything_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let app = serve!(dir.path(), served_view(), Some(TOKEN)).await;
    let res = call_service(&app, TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(res.status(), StatusCode::OK);
    for uri in [
        "/v1/status",
        "/v1/embeddings/user/u1",
        "/metrics",
        "/readyz",
    ] {
        let res = call_service(&app, TestRequest::get().uri(uri).to_request()).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{uri}");
        let challenge = res.headers().get(header::WWW_AUTHENTICATE).unwrap();
        assert!(challenge.to_str().unwrap().starts_with("Bearer"));
    }
    let (code, _) = call(
        &app,
        request("/v1/status", Some("0123456789abcdef-tesT")).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = call(
        &app,
        request("/v1/status", Some("0123456789abcdef-test-and-more")).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let basic = TestRequest::get()
        .uri("/v1/status")
        .insert_header((header::AUTHORIZATION, format!("Basic {TOKEN}")))
        .to_request();
    assert_eq!(
        call_service(&app, basic).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (code, body) = call(&app, request("/v1/status", Some(TOKEN)).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = call(
        &app,
        request("/v1/embeddings/user/u1", Some(TOKEN)).to_request(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    // The scheme is case-insensitive.
    let lower = TestRequest::get()
        .uri("/v1/status")
        .insert_header((header::AUTHORIZATION, format!("bearer {TOKEN}")))
        .to_request();
    assert_eq!(call_service(&app, lower).await.status(), StatusCode::OK);
}

#[test]
fn secrets_compare_whole() {
    assert!(same_secret(b"abcdef", b"abcdef"));
    assert!(!same_secret(b"abcdef", b"abcdeg"));
    assert!(!same_secret(b"abc", b"abcdef"));
    assert!(!same_secret(b"abcdef", b"abc"));
    assert!(!same_secret(b"", b"a"));
}

#[test]
fn the_rate_window_spans_about_a_minute() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut w = RateWindow::default();
    assert_eq!(w.observe(at(0), 0), None);
    // Too close to the baseline for a rate.
    assert_eq!(w.observe(at(0), 5), None);
    assert_eq!(w.observe(at(10), 100), Some(10.0));
    assert_eq!(w.observe(at(30), 400), Some(400.0 / 30.0));
    // At 70 s the sample at 0 s is dropped: the one at 10 s is a full span old already and
    // becomes the baseline.
    assert_eq!(w.observe(at(70), 1000), Some(900.0 / 60.0));
    // A poller slower than the span gets the rate since its previous poll.
    assert_eq!(w.observe(at(300), 1000 + 2300), Some(2300.0 / 230.0));
}

/// Property test (proptest) of every route over arbitrary paths and query strings: each answer
/// is a result (JSON from the `/v1` routes, text from `/healthz` and `/metrics`, `/readyz`'s
/// readiness document) or a JSON error `{"error", "code"}` whose status matches its code, and
/// never a 500: a panic in a handler fails the case, a panic on the blocking pool would answer
/// 500 `internal`.
mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use std::str::FromStr;

    /// Requests per run, spread over a served version and no version yet.
    const CASES: u32 = 500;

    /// A path segment: a name the app knows, printable URI characters, or arbitrary bytes
    /// percent-encoded (invalid UTF-8 included), or a stray `%`.
    fn segment() -> impl Strategy<Value = String> {
        let known = prop::sample::select(vec![
            "v1",
            "embeddings",
            "neighbors",
            "status",
            "healthz",
            "readyz",
            "metrics",
            "user",
            "movie",
            "entity",
            "tweet",
            "u1",
            "u2",
            "u3",
            "m1",
            "m3",
            "e1",
            "nobody",
            "",
            ".",
            "..",
        ])
        .prop_map(str::to_owned);
        prop_oneof![
            6 => known,
            3 => "[A-Za-z0-9._~!$&'()*+,;=:@-]{0,12}",
            3 => prop::collection::vec(any::<u8>(), 0..12)
                .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect()),
            1 => "%[0-9A-Za-z]{0,2}",
        ]
    }

    fn query_part() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            4 => prop::sample::select(vec!["rel", "k"]).prop_map(str::to_owned),
            1 => "[a-z%&=+]{0,6}",
        ];
        let value = prop_oneof![
            3 => prop::sample::select(vec![
                "rated_high", "linked", "about", "follows", "", "1", "2", "10", "1000",
                "1001", "0", "-1", "ten", "1e3", " 5", "%20", "99999999999999999999999",
            ])
            .prop_map(str::to_owned),
            2 => any::<i64>().prop_map(|k| k.to_string()),
            2 => "[A-Za-z0-9._~!$'()*+,;:@/?%-]{0,12}",
            1 => prop::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect()),
        ];
        prop_oneof![
            6 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
            1 => "[A-Za-z0-9=&%]{0,6}",
        ]
    }

    /// A query string: parts joined by `&`.
    fn query() -> impl Strategy<Value = String> {
        prop::collection::vec(query_part(), 0..5).prop_map(|q| q.join("&"))
    }

    /// A request for one of the routes, its parameters often valid: most of these reach a
    /// handler.
    fn routed() -> impl Strategy<Value = String> {
        let node_type = prop_oneof![
            4 => prop::sample::select(vec!["user", "movie", "entity"]).prop_map(str::to_owned),
            1 => segment(),
        ];
        let id = prop_oneof![
            4 => prop::sample::select(vec!["u1", "u2", "u3", "m1", "m2", "m3", "e1"])
                .prop_map(str::to_owned),
            1 => prop::collection::vec(segment(), 1..3).prop_map(|s| s.join("/")),
        ];
        let rel = prop::sample::select(vec!["rated_high", "linked", "about", "follows", ""]);
        let k = prop_oneof![
            3 => (1usize..=1_000).prop_map(|k| format!("&k={k}")),
            1 => Just(String::new()),
            1 => query_part().prop_map(|q| format!("&{q}")),
        ];
        prop_oneof![
            3 => (node_type.clone(), id.clone())
                .prop_map(|(t, id)| format!("/v1/embeddings/{t}/{id}")),
            4 => (node_type, id, rel, k, query())
                .prop_map(|(t, id, rel, k, q)| format!("/v1/neighbors/{t}/{id}?rel={rel}{k}&{q}")),
            1 => (
                prop::sample::select(vec!["/v1/status", "/healthz", "/readyz", "/metrics"]),
                prop::option::of(query()),
            )
                .prop_map(|(p, q)| match q {
                    Some(q) => format!("{p}?{q}"),
                    None => p.to_owned(),
                }),
        ]
    }

    /// `/seg/seg…[?query]`, often under a known route's prefix.
    fn anywhere() -> impl Strategy<Value = String> {
        let prefix = prop::sample::select(vec![
            "",
            "/v1/embeddings",
            "/v1/embeddings/user",
            "/v1/neighbors",
            "/v1/neighbors/user",
            "/v1/neighbors/entity",
            "/v1",
        ]);
        (
            prefix,
            prop::collection::vec(segment(), 0..5),
            prop::option::of(query()),
        )
            .prop_map(|(prefix, segs, query)| {
                let mut uri = prefix.to_owned();
                for s in segs {
                    uri.push('/');
                    uri.push_str(&s);
                }
                if uri.is_empty() {
                    uri.push('/');
                }
                if let Some(q) = query {
                    uri.push('?');
                    uri.push_str(&q);
                }
                uri
            })
    }

    fn uri() -> impl Strategy<Value = String> {
        prop_oneof![1 => routed(), 1 => anywhere()]
            .prop_filter("a URI the HTTP parser takes", |u| {
                actix_web::http::Uri::from_str(u).is_ok()
            })
    }

    /// What an answer must be; `Err` describes how it is not.
    fn check(uri: &str, code: StatusCode, body: &[u8]) -> Result<(), String> {
        if code == StatusCode::INTERNAL_SERVER_ERROR {
            return Err(format!("500: {}", String::from_utf8_lossy(body)));
        }
        let path = uri.split('?').next().unwrap_or_default();
        if code.is_success() && (path == "/healthz" || path == "/metrics") {
            return Ok(());
        }
        let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "{code}, not JSON ({e}): {:?}",
                String::from_utf8_lossy(body)
            )
        })?;
        if code.is_success() {
            return match json.get("error") {
                None if json.is_object() => Ok(()),
                _ => Err(format!("{code} with an error body: {json}")),
            };
        }
        if path == "/readyz" && code == StatusCode::SERVICE_UNAVAILABLE {
            // Readiness is a result: the store is open, the (test) broker is not reachable.
            return match json.get("broker_reachable") {
                Some(serde_json::Value::Bool(_)) => Ok(()),
                _ => Err(format!(
                    "readiness document without broker_reachable: {json}"
                )),
            };
        }
        let (Some(error), Some(name)) = (
            json.get("error").and_then(|e| e.as_str()),
            json.get("code").and_then(|c| c.as_str()),
        ) else {
            return Err(format!(
                "{code}, a JSON body without error and code: {json}"
            ));
        };
        let want = match name {
            "unknown_type" | "unknown_node" | "node_not_served" | "relation_not_served" => {
                StatusCode::NOT_FOUND
            }
            "no_version" => StatusCode::SERVICE_UNAVAILABLE,
            "bad_parameter" => StatusCode::BAD_REQUEST,
            "unauthorized" => StatusCode::UNAUTHORIZED,
            // A code this test does not know (a new route's): any client error.
            _ if code.is_client_error() => code,
            other => return Err(format!("{code}, unexpected code {other:?}: {error}")),
        };
        if code != want || error.is_empty() || name.is_empty() {
            return Err(format!("{code} for code {name:?}: {json}"));
        }
        Ok(())
    }

    #[test]
    fn every_path_and_query_answers_a_result_or_a_json_error_never_a_500() {
        let rt = actix_rt::System::new();
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let served = rt.block_on(serve!(dir.path(), served_view(), None));
        let empty = rt.block_on(serve!(other.path(), ServingView::new(), None));
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        });
        let started = Instant::now();
        let answered = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u32>::new());
        let result = runner.run(&(uri(), any::<bool>()), |(uri, with_version)| {
            let app = if with_version { &served } else { &empty };
            let (code, body) = rt.block_on(async {
                let res = call_service(app, TestRequest::get().uri(&uri).to_request()).await;
                let code = res.status();
                (code, read_body(res).await)
            });
            *answered.borrow_mut().entry(code.as_u16()).or_default() += 1;
            check(&uri, code, &body).map_err(|e| TestCaseError::fail(format!("GET {uri}: {e}")))
        });
        eprintln!(
            "HTTP property: {CASES} cases in {:.1?}; answers by status {:?}",
            started.elapsed(),
            answered.borrow()
        );
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}

/// With four partitions and only user:u1's owned here, a node of a followed partition is
/// answered with its owner's published row (even one this instance's store never saw), and one
/// whose owner published nothing with this instance's own committed row.
#[actix_web::test]
async fn embeddings_of_nodes_owned_elsewhere_come_from_the_remote_cache() {
    use crate::publish::{Record, RowRecord, TopicRecord, VersionMarker};
    use crate::remote::{RemoteCache, TopicRead};
    use serde_json::json;
    const P: u32 = 4;
    let q = |key: &str| crate::partition::partition_of(key.as_bytes(), P) as i32;
    let owned = q("user:u1");
    let dir = tempfile::tempdir().unwrap();
    let mut state = state(store(dir.path()), served_view(), None);
    state.ingest.ownership.set_partition_count(P);
    state.ingest.ownership.assign(&[owned]);
    // A node the store knows and one it does not, in one partition owned elsewhere; and a node
    // the view serves in another partition owned elsewhere, which is not followed.
    let known = ["user:u2", "user:u3", "movie:m1", "movie:m2", "movie:m3"]
        .into_iter()
        .find(|k| q(k) != owned)
        .unwrap();
    let followed = q(known);
    let unknown = (0..)
        .map(|i| format!("movie:new{i}"))
        .find(|k| q(k) == followed);
    let unknown = unknown.unwrap();
    let local = ["user:u2", "movie:m1", "movie:m2", "movie:m3"]
        .into_iter()
        .find(|k| q(k) != owned && q(k) != followed)
        .unwrap();
    let cache = RemoteCache::new(10);
    cache.set_partitions(P);
    cache.follow(&[followed].into());
    let row = |key: &str, x: f32| TopicRead {
        record: TopicRecord::Row {
            partition: followed,
            key: key.into(),
            record: Record::Row(RowRecord {
                version: 40,
                epoch: 3,
                ts: 5,
                vector: vec![x, x],
            }),
        },
        timestamp_ms: None,
    };
    let marker = TopicRecord::Marker(VersionMarker::for_partition(40, 3, 2, followed, P as i32));
    let reads = vec![
        row(known, 9.0),
        row(&unknown, 8.0),
        TopicRead {
            record: marker,
            timestamp_ms: None,
        },
    ];
    cache.feed(reads, None, 0);
    state.remote = Some(Arc::new(cache));
    let app = init_service(app(web::Data::new(state))).await;
    let get = |key: &str| format!("/v1/embeddings/{}", key.replacen(':', "/", 1));
    let answers = [
        ("user:u1", (json!([1.0, 0.0]), 7, "owner", owned)),
        (known, (json!([9.0, 9.0]), 40, "remote", followed)),
        (&unknown, (json!([8.0, 8.0]), 40, "remote", followed)),
    ];
    for (key, (vector, version, source, partition)) in answers {
        let (code, body) = call(&app, request(&get(key), None).to_request()).await;
        assert_eq!(code, StatusCode::OK, "{key}: {body}");
        assert_eq!(
            (
                &body["vector"],
                &body["version"],
                &body["source"],
                &body["partition"]
            ),
            (&vector, &json!(version), &json!(source), &json!(partition)),
            "{key}"
        );
    }
    let (code, body) = call(&app, request(&get(local), None).to_request()).await;
    assert_eq!(code, StatusCode::OK, "{local}: {body}");
    assert_eq!(
        (&body["source"], &body["version"]),
        (&json!("local"), &json!(7))
    );
}

/// Two instances, each owning one of two partitions and serving the movies of its own.
struct TwoOwners {
    /// Per instance: its store (and folder), its served view (indexed, scoped to its
    /// partition).
    _dirs: [tempfile::TempDir; 2],
    stores: [Arc<GraphStore>; 2],
    serving: [ServingView; 2],
    /// The partition each owns.
    partition: [i32; 2],
    /// Per instance: its movie rows (`[n, dim]`, row-major).
    movies: [Vec<f32>; 2],
}

const GATHER_MOVIES: usize = 3000;
const GATHER_DIM: i64 = 8;

/// u1's query for `rated_high` in every view below: its row (0.5 each) plus the relation (0.1).
const GATHER_QUERY: f32 = 0.6;

impl TwoOwners {
    /// Movies scored by their sum; the second owner's copy of the movie `boosted` (in its
    /// partition) is far ahead of every other, while the first's copy of it is ordinary.
    fn new(boosted: usize) -> TwoOwners {
        use crate::partition::Owned;
        use rand::{Rng, SeedableRng};
        let (n, dim) = (GATHER_MOVIES, GATHER_DIM as usize);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(29);
        let base: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut second = base.clone();
        second[boosted * dim..(boosted + 1) * dim].fill(5.0);
        let partition = [
            crate::partition::partition_of(format!("movie:m{boosted}").as_bytes(), 2) as i32 ^ 1,
            crate::partition::partition_of(format!("movie:m{boosted}").as_bytes(), 2) as i32,
        ];
        let mut cfg: crate::config::AnnConfig = default_section(&["http", "ann"]);
        (cfg.enabled, cfg.min_rows) = (true, 1000);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let stores = [0, 1].map(|i| many_movies(dirs[i].path(), n));
        let serving = [0, 1].map(|i| {
            let movies = if i == 0 { &base } else { &second };
            let serving = ServingView::with_ann(&cfg, Some(stores[i].clone())).unwrap();
            serving.publish(PublishedView {
                version: 5 + i as u64,
                epoch: 1,
                comparator: Comparator::Dot,
                tables: vec![
                    Tensor::from_slice(&[0.5f32; 16]).reshape([2, GATHER_DIM]),
                    Tensor::from_slice(movies).reshape([n as i64, GATHER_DIM]),
                    Tensor::zeros([0, GATHER_DIM], (tch::Kind::Float, tch::Device::Cpu)),
                ],
                relations: Tensor::from_slice(&[0.1f32; 24]).reshape([3, GATHER_DIM]),
                biases: Vec::new(),
                row_ts: Vec::new(),
                changed: None,
                codes: None,
                scope: Some(crate::publish::Scope::owned(
                    2,
                    &Owned {
                        generation: 1,
                        partitions: vec![partition[i]],
                    },
                )),
            });
            assert!(serving
                .ann()
                .unwrap()
                .wait_for(5 + i as u64, Duration::from_secs(60)));
            serving
        });
        TwoOwners {
            _dirs: dirs,
            stores,
            serving,
            partition,
            movies: [base, second],
        }
    }

    /// The exact best `k` for u1 (its known targets m0..m4 left out when `exclude_known`): each
    /// movie scored with its owner's row (`from_owners`), or with the first instance's.
    fn expected(&self, k: usize, exclude_known: bool, from_owners: bool) -> Vec<(String, f32)> {
        let dim = GATHER_DIM as usize;
        let mut all: Vec<(String, f32)> = (0..GATHER_MOVIES)
            .filter(|&m| !(exclude_known && m < 5))
            .map(|m| {
                let key = format!("movie:m{m}");
                let owner = (from_owners
                    && crate::partition::partition_of(key.as_bytes(), 2) as i32
                        == self.partition[1]) as usize;
                let row = &self.movies[owner][m * dim..(m + 1) * dim];
                (key, row.iter().map(|x| GATHER_QUERY * x).sum())
            })
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
        all
    }

    /// The first instance's state, following the second's partition, whose newest marker names
    /// `address`.
    fn first(&self, address: &str) -> HttpState {
        use crate::publish::{TopicRecord, VersionMarker};
        use crate::remote::{RemoteCache, TopicRead};
        let mut st = state(self.stores[0].clone(), self.serving[0].clone(), None);
        let cache = RemoteCache::new(10_000);
        cache.set_partitions(2);
        cache.follow(&[self.partition[1]].into());
        let mut marker = VersionMarker::for_partition(6, 1, 0, self.partition[1], 2);
        marker.http = Some(address.to_owned());
        let read = TopicRead {
            record: TopicRecord::Marker(marker),
            timestamp_ms: None,
        };
        cache.feed(vec![read], None, 0);
        st.remote = Some(Arc::new(cache));
        st
    }
}

/// With two instances each index holds its owner's partition: `/v1/neighbors` ranks its own
/// candidates and asks the other owner (`POST /v1/candidates`, found at the address its marker
/// names) for the best of its partition, scored with that owner's rows; with the owner out of
/// reach, it ranks that partition from its own copies and says so.
#[actix_web::test]
async fn neighbors_gather_the_other_partitions_from_their_owners() {
    let boosted = 11;
    let two = TwoOwners::new(boosted);
    // The second instance, listening.
    let second = Arc::new(state(two.stores[1].clone(), two.serving[1].clone(), None));
    let (server, address) = start("127.0.0.1:0".parse().unwrap(), second).unwrap();
    let first = two.first(&address.to_string());
    let ingest = first.ingest.clone();
    let app = init_service(app(web::Data::new(first))).await;
    let get = |q: &str| request(&format!("/v1/neighbors/user/u1?rel=rated_high&{q}"), None);
    for exclude_known in [false, true] {
        let q = format!("k=10&exclude_known={exclude_known}");
        let (code, body) = call(&app, get(&q).to_request()).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let r: NeighborsResponse = serde_json::from_value(body).unwrap();
        assert_eq!(r.method, RankMethod::Ann);
        let gathered = r.gathered.expect("the other partition was gathered");
        assert_eq!(gathered.local, Vec::<i32>::new());
        assert_eq!(gathered.owners.len(), 1);
        let owner = &gathered.owners[0];
        assert_eq!(
            (
                &owner.address,
                &owner.partitions,
                owner.version,
                &owner.error
            ),
            (
                &address.to_string(),
                &vec![two.partition[1]],
                Some(6),
                &None
            )
        );
        let got: Vec<(String, f32)> = (r.neighbors.iter())
            .map(|n| (n.node.clone(), n.score))
            .collect();
        let want = two.expected(10, exclude_known, true);
        assert_eq!(got.len(), 10);
        for ((g, gs), (w, ws)) in got.iter().zip(&want) {
            assert_eq!(g, w, "{q}: {got:?}");
            assert!((gs - ws).abs() < 1e-4, "{q}: {g} {gs} {ws}");
        }
        assert_eq!(got[0].0, format!("movie:m{boosted}"), "the owner's row");
    }
    // The owner's side, asked directly: its partition only, best first; a query of the wrong
    // dimension is refused by name.
    let post = |body: serde_json::Value| {
        let agent = ureq::AgentBuilder::new().build();
        agent
            .post(&format!("http://{address}/v1/candidates/movie"))
            .send_json(body)
            .map_err(Box::new)
    };
    let answer: CandidatesResponse = post(serde_json::json!({
        "vector": vec![GATHER_QUERY; 8], "k": 3, "exclude": [format!("movie:m{boosted}")]
    }))
    .unwrap()
    .into_json()
    .unwrap();
    assert_eq!((answer.partitions, answer.of), (vec![two.partition[1]], 2));
    assert_eq!(answer.candidates.len(), 3);
    assert!(answer.candidates.iter().all(|c| {
        c.node != format!("movie:m{boosted}")
            && crate::partition::partition_of(c.node.as_bytes(), 2) as i32 == two.partition[1]
    }));
    assert!(answer
        .candidates
        .windows(2)
        .all(|w| w[0].score >= w[1].score));
    match post(serde_json::json!({"vector": [1.0, 2.0], "k": 3})).map_err(|e| *e) {
        Err(ureq::Error::Status(400, r)) => {
            let body: serde_json::Value = r.into_json().unwrap();
            assert!(
                body["error"].as_str().unwrap().contains("`vector`"),
                "{body}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Once the group says which partition is whose, a source of the other's partition (u1's
    // is the second's) is ranked by its owner: the request goes there, once.
    ingest.ownership.set_partition_count(2);
    ingest.ownership.assign(&[two.partition[0]]);
    assert_eq!(
        crate::partition::partition_of(b"user:u1", 2) as i32,
        two.partition[1]
    );
    let (code, body) = call(&app, get("k=10").to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let r: NeighborsResponse = serde_json::from_value(body).unwrap();
    assert_eq!(r.answered_by, Some(address.to_string()));
    // (The second has no cache of the first's rows here: it ranked that partition itself.)
    assert_eq!(r.gathered.unwrap().local, vec![two.partition[0]]);
    assert_eq!(r.neighbors[0].node, format!("movie:m{boosted}"));
    // The owner gone: its partition is ranked from this instance's copies (the boosted movie
    // is ordinary there), and so is a source it owns.
    server.stop(true).await;
    let (code, body) = call(&app, get("k=10").to_request()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let r: NeighborsResponse = serde_json::from_value(body).unwrap();
    assert_eq!(r.answered_by, None);
    let gathered = r.gathered.unwrap();
    assert_eq!(gathered.local, vec![two.partition[1]]);
    assert!(gathered.owners[0].error.is_some());
    let got: Vec<(String, f32)> = (r.neighbors.iter())
        .map(|n| (n.node.clone(), n.score))
        .collect();
    let want = two.expected(10, false, false);
    assert!(want.iter().all(|(k, _)| k != &format!("movie:m{boosted}")));
    for ((g, gs), (w, ws)) in got.iter().zip(&want) {
        assert_eq!(g, w, "{got:?}");
        assert!((gs - ws).abs() < 1e-4, "{g} {gs} {ws}");
    }
}
