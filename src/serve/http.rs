//! HTTP: `/healthz` (the process answers), `/readyz` (store open and broker reachable),
//! `/metrics` (Prometheus text), `/v1/status` (JSON), and the serving API over the latest
//! committed version ([`crate::serve`]): `/v1/embeddings/{type}/{id}` and
//! `/v1/neighbors/{type}/{id}?rel=R&k=K`.
//!
//! With `http.bearer_token` set, every route but `/healthz` requires
//! `Authorization: Bearer <token>` ([`require_bearer`], one middleware for the whole app).
//!
//! Reading the served version takes its lock and runs libtorch, and reading the store touches
//! sled: both happen on actix's blocking pool (`web::block`), never on the worker that accepts
//! connections.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{get, web, App, HttpResponse, HttpServer, Responder, ResponseError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::align::{AlignReport, AlignStatus};
use crate::ingest::IngestStatus;
use crate::publish::{FreshnessFigures, InProgress, PublishStatus, PublishedView};
use crate::schema::TypeId;
use crate::serve::ServingView;
use crate::store::{refresh_store_gauges, GraphStore, NodeRef, StoreError, StoreSummary};
use crate::train::{score_targets, translate, TorchInfo, TrainerFigures, TrainerStatus};

/// Default and largest `k` of `/v1/neighbors`.
pub const DEFAULT_K: usize = 10;
pub const MAX_K: usize = 1000;

/// What the handlers read.
pub struct HttpState {
    pub store: Arc<GraphStore>,
    pub ingest: Arc<IngestStatus>,
    /// `None` when `trainer.enabled = false`.
    pub trainer: Option<Arc<TrainerStatus>>,
    pub metrics: PrometheusHandle,
    pub torch: TorchInfo,
    pub bootstrap_servers: String,
    pub engagements_topic: String,
    pub started: Instant,
    /// The latest committed version (empty until the first commit, and without a publisher).
    pub serving: ServingView,
    pub align: Arc<AlignStatus>,
    /// `align.enabled`, reported beside the alignment figures.
    pub align_control: bool,
    /// `None` without a publisher.
    pub publish: Option<Arc<PublishStatus>>,
    /// `http.bearer_token`; `None`: no authentication.
    pub bearer_token: Option<String>,
    /// Samples of the consumed counter behind the recent ingest rate in `/v1/status`.
    pub rate: Mutex<RateWindow>,
}

/// Bind and start the server; returns its handle (stop it at shutdown) and the bound address.
pub fn start(
    bind: std::net::SocketAddr,
    state: Arc<HttpState>,
) -> std::io::Result<(ServerHandle, std::net::SocketAddr)> {
    let data = web::Data::from(state);
    let server = HttpServer::new(move || app(data.clone()))
        .workers(1)
        .disable_signals()
        .bind(bind)?;
    let addr = server.addrs().first().copied().unwrap_or(bind);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
}

/// Every route, behind the bearer-token middleware (the server and the tests build the same app).
pub fn app(
    state: web::Data<HttpState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap(from_fn(require_bearer))
        .service(healthz)
        .service(readyz)
        .service(metrics_text)
        .service(status_doc)
        .service(embedding_row)
        .service(neighbor_ranking)
}

/// What a request can fail with; the response is `{"error": <message>, "code": <code>}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unknown node type `{0}`")]
    UnknownType(String),
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    #[error("node `{node}` is not in the served version {version} yet")]
    NodeNotServed { node: String, version: u64 },
    #[error("relation `{rel}` is not in the served version {version} yet")]
    RelationNotServed { rel: String, version: u64 },
    #[error("no version has been committed yet")]
    NoVersion,
    #[error("query parameter `{param}`: {problem}")]
    BadParam {
        param: &'static str,
        problem: String,
    },
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store has no id for row {index} of node type {node_type}")]
    MissingId { node_type: TypeId, index: u32 },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("the request's work was cancelled (a panic on the blocking pool)")]
    Cancelled,
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::Cancelled
    }
}

impl ApiError {
    /// A stable, machine-readable name of the failure.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownType(_) => "unknown_type",
            ApiError::UnknownNode(_) => "unknown_node",
            ApiError::NodeNotServed { .. } => "node_not_served",
            ApiError::RelationNotServed { .. } => "relation_not_served",
            ApiError::NoVersion => "no_version",
            ApiError::BadParam { .. } => "bad_parameter",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Store(_) | ApiError::MissingId { .. } => "store",
            ApiError::Torch(_) | ApiError::Cancelled => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnknownType(_)
            | ApiError::UnknownNode(_)
            | ApiError::NodeNotServed { .. }
            | ApiError::RelationNotServed { .. } => StatusCode::NOT_FOUND,
            ApiError::NoVersion => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadParam { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Store(_)
            | ApiError::MissingId { .. }
            | ApiError::Torch(_)
            | ApiError::Cancelled => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            res.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"twhin-stream\""),
            ));
        }
        res.json(serde_json::json!({ "error": self.to_string(), "code": self.code() }))
    }
}

/// The bearer-token check (a no-op without `http.bearer_token`). `/healthz` stays open so that
/// liveness probes need no secret.
async fn require_bearer(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let allowed = match req
        .app_data::<web::Data<HttpState>>()
        .and_then(|s| s.bearer_token.as_deref())
    {
        None => true,
        Some(_) if req.path() == "/healthz" => true,
        Some(token) => presented_bearer(req.headers())
            .is_some_and(|given| same_secret(given.as_bytes(), token.as_bytes())),
    };
    if allowed {
        next.call(req)
            .await
            .map(ServiceResponse::map_into_left_body)
    } else {
        Ok(req
            .into_response(ApiError::Unauthorized.error_response())
            .map_into_right_body())
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive,
/// RFC 7235).
fn presented_bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Equality whose running time depends on the lengths only, not on where the inputs differ, so
/// response times do not reveal the token byte by byte.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for i in 0..given.len().max(expected.len()) {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(a ^ b);
    }
    diff == 0
}

#[get("/healthz")]
async fn healthz() -> impl Responder {
    HttpResponse::Ok().body("ok\n")
}

#[get("/readyz")]
async fn readyz(state: web::Data<HttpState>) -> impl Responder {
    let broker = state.ingest.broker_up.load(Ordering::Relaxed);
    let store = state.store.meta("next_seq").is_ok();
    let body = serde_json::json!({ "broker_reachable": broker, "store_open": store });
    if broker && store {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

#[get("/metrics")]
async fn metrics_text(state: web::Data<HttpState>) -> impl Responder {
    refresh_store_gauges(&state.store);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// The `/v1/status` document.
#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub uptime_secs: u64,
    pub kafka: KafkaStatus,
    pub ingest: IngestFigures,
    pub store: StoreSummary,
    pub trainer: Option<TrainerFigures>,
    pub publish: PublishFigures,
    pub align: AlignReport,
    pub torch: TorchInfo,
}

#[derive(Debug, Serialize)]
pub struct KafkaStatus {
    pub bootstrap_servers: String,
    pub topic: String,
    pub broker_reachable: bool,
    pub assigned_partitions: u64,
    pub lag: u64,
}

#[derive(Debug, Serialize)]
pub struct IngestFigures {
    pub consumed: u64,
    pub invalid: u64,
    pub appended: u64,
    pub duplicates: u64,
    pub batches: u64,
    /// Events consumed per second since the process started.
    pub events_per_sec: f64,
    /// Events consumed per second over the last minute or so of `/v1/status` requests (from the
    /// oldest sample kept to this request); `null` on the first request.
    pub recent_events_per_sec: Option<f64>,
}

/// The version the serving API shows, and how fresh versions are.
#[derive(Debug, Serialize)]
pub struct PublishFigures {
    /// The latest committed version; `null` before the first.
    pub version: Option<u64>,
    pub epoch: Option<u64>,
    /// Node type → rows the served version holds.
    pub rows: BTreeMap<String, i64>,
    pub relations: i64,
    /// The publication under way (its rows are being produced); `null` between publications.
    pub in_progress: Option<InProgress>,
    /// Versions committed by this process.
    pub committed: u64,
    /// Publication attempts that failed in this process (each retried under a new epoch).
    pub failures: u64,
    /// Each version's rows and marker in one Kafka transaction.
    pub transactional: bool,
    /// Event-to-publish latency of this process's events.
    pub freshness: FreshnessFigures,
}

/// Samples of a monotonic counter, at least [`RateWindow::MIN_GAP`] apart, spanning about
/// [`RateWindow::SPAN`]: the newest sample older than the span is kept as the baseline, so a
/// client polling less often than the span still gets the rate since its previous poll.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub const SPAN: Duration = Duration::from_secs(60);
    pub const MIN_GAP: Duration = Duration::from_secs(1);

    /// Record `count` at `now`; returns the rate per second since the oldest sample kept, if
    /// that is at least `MIN_GAP` ago.
    pub fn observe(&mut self, now: Instant, count: u64) -> Option<f64> {
        while self
            .samples
            .get(1)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= Self::SPAN)
        {
            self.samples.pop_front();
        }
        let rate = self.samples.front().and_then(|&(t, c)| {
            let secs = now.saturating_duration_since(t);
            (secs >= Self::MIN_GAP).then(|| count.saturating_sub(c) as f64 / secs.as_secs_f64())
        });
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= Self::MIN_GAP)
        {
            self.samples.push_back((now, count));
        }
        rate
    }
}

#[get("/v1/status")]
async fn status_doc(state: web::Data<HttpState>) -> Result<web::Json<Status>, ApiError> {
    let now = Instant::now();
    let i = &state.ingest;
    let consumed = i.consumed.load(Ordering::Relaxed);
    let uptime = now.saturating_duration_since(state.started);
    let recent = state
        .rate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(now, consumed);
    let ingest = IngestFigures {
        consumed,
        invalid: i.invalid.load(Ordering::Relaxed),
        appended: i.appended.load(Ordering::Relaxed),
        duplicates: i.duplicates.load(Ordering::Relaxed),
        batches: i.batches.load(Ordering::Relaxed),
        events_per_sec: consumed as f64 / uptime.as_secs_f64().max(1e-3),
        recent_events_per_sec: recent,
    };
    let kafka = KafkaStatus {
        bootstrap_servers: state.bootstrap_servers.clone(),
        topic: state.engagements_topic.clone(),
        broker_reachable: i.broker_up.load(Ordering::Relaxed),
        assigned_partitions: i.assigned_partitions.load(Ordering::Relaxed),
        lag: i.lag.load(Ordering::Relaxed),
    };
    let s = state.clone();
    let (store, publish) = web::block(move || {
        let store = StoreSummary::read(&s.store)?;
        Ok::<_, ApiError>((store, publish_figures(&s)))
    })
    .await??;
    Ok(web::Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: uptime.as_secs(),
        kafka,
        ingest,
        store,
        trainer: state.trainer.as_ref().map(|t| t.figures()),
        publish,
        align: state.align.report(state.align_control),
        torch: state.torch.clone(),
    }))
}

fn publish_figures(state: &HttpState) -> PublishFigures {
    let names = &state.store.stored_schema().node_types;
    let (version, epoch, rows, relations) = state.serving.with(|view| match view {
        None => (None, None, BTreeMap::new(), 0),
        Some(v) => (
            Some(v.version),
            Some(v.epoch),
            names
                .iter()
                .zip(&v.tables)
                .map(|(name, t)| (name.clone(), rows(t)))
                .collect(),
            rows(&v.relations),
        ),
    });
    PublishFigures {
        version,
        epoch,
        rows,
        relations,
        in_progress: state.publish.as_ref().and_then(|p| p.in_progress()),
        committed: state
            .publish
            .as_ref()
            .map_or(0, |p| p.committed.load(Ordering::Relaxed)),
        failures: state
            .publish
            .as_ref()
            .map_or(0, |p| p.failures.load(Ordering::Relaxed)),
        transactional: state
            .publish
            .as_ref()
            .is_some_and(|p| p.transactional.load(Ordering::Relaxed)),
        freshness: state.ingest.freshness.figures(),
    }
}

/// Rows of a `[rows, D]` table (0 for anything else).
fn rows(t: &Tensor) -> i64 {
    if t.dim() == 2 {
        t.size()[0]
    } else {
        0
    }
}

/// Row `index` of a `[rows, D]` table, if the table has it.
fn row(t: &Tensor, index: i64) -> Option<Tensor> {
    (index < rows(t)).then(|| t.get(index))
}

fn resolve_type(store: &GraphStore, name: &str) -> Result<TypeId, ApiError> {
    store
        .stored_schema()
        .node_types
        .iter()
        .position(|t| t == name)
        .map(|t| t as TypeId)
        .ok_or_else(|| ApiError::UnknownType(name.to_owned()))
}

/// `key` is the node as the response names it (`type:id`).
fn resolve_node(
    store: &GraphStore,
    node_type: TypeId,
    id: &str,
    key: &str,
) -> Result<NodeRef, ApiError> {
    let index = store
        .node_index(node_type, id)?
        .ok_or_else(|| ApiError::UnknownNode(key.to_owned()))?;
    Ok(NodeRef { node_type, index })
}

/// The served version, or 503.
fn served(view: Option<&PublishedView>) -> Result<&PublishedView, ApiError> {
    view.ok_or(ApiError::NoVersion)
}

fn node_row(view: &PublishedView, node: NodeRef, key: &str) -> Result<Tensor, ApiError> {
    view.tables
        .get(node.node_type as usize)
        .and_then(|t| row(t, i64::from(node.index)))
        .ok_or_else(|| ApiError::NodeNotServed {
            node: key.to_owned(),
            version: view.version,
        })
}

/// `GET /v1/embeddings/{type}/{id}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    /// `type:id`.
    pub node: String,
    pub version: u64,
    pub epoch: u64,
    /// Event time (ms) of the newest event that touched the row, when the version records it.
    pub ts: Option<i64>,
    pub vector: Vec<f32>,
}

// `{id:.+}`: node ids may contain `/` (search queries, URLs).
#[get("/v1/embeddings/{type}/{id:.+}")]
async fn embedding_row(
    state: web::Data<HttpState>,
    path: web::Path<(String, String)>,
) -> Result<web::Json<EmbeddingResponse>, ApiError> {
    let (type_name, id) = path.into_inner();
    let out = web::block(move || lookup_embedding(&state, &type_name, &id)).await??;
    Ok(web::Json(out))
}

fn lookup_embedding(
    state: &HttpState,
    type_name: &str,
    id: &str,
) -> Result<EmbeddingResponse, ApiError> {
    let key = format!("{type_name}:{id}");
    let node_type = resolve_type(&state.store, type_name)?;
    let node = resolve_node(&state.store, node_type, id, &key)?;
    state.serving.with(|view| {
        let view = served(view)?;
        let row = node_row(view, node, &key)?;
        let vector = Vec::<f32>::try_from(&row.to_kind(Kind::Float).contiguous())?;
        let ts = view
            .row_ts
            .get(node.node_type as usize)
            .and_then(|r| r.get(node.index as usize))
            .copied();
        Ok(EmbeddingResponse {
            node: key.clone(),
            version: view.version,
            epoch: view.epoch,
            ts,
            vector,
        })
    })
}

#[derive(Debug, Deserialize)]
pub struct NeighborsQuery {
    pub rel: Option<String>,
    /// A string so that a bad value gets our error naming `k`, not the extractor's.
    pub k: Option<String>,
}

/// `GET /v1/neighbors/{type}/{id}`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct NeighborsResponse {
    pub node: String,
    pub rel: String,
    pub version: u64,
    /// Best first.
    pub neighbors: Vec<ScoredNode>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ScoredNode {
    pub node: String,
    pub score: f32,
}

fn parse_k(k: Option<&str>) -> Result<usize, ApiError> {
    let Some(k) = k else {
        return Ok(DEFAULT_K);
    };
    let bad = || ApiError::BadParam {
        param: "k",
        problem: format!("{k:?} is not an integer in 1..={MAX_K}"),
    };
    let k: usize = k.trim().parse().map_err(|_| bad())?;
    if (1..=MAX_K).contains(&k) {
        Ok(k)
    } else {
        Err(bad())
    }
}

#[get("/v1/neighbors/{type}/{id:.+}")]
async fn neighbor_ranking(
    state: web::Data<HttpState>,
    path: web::Path<(String, String)>,
    query: web::Query<NeighborsQuery>,
) -> Result<web::Json<NeighborsResponse>, ApiError> {
    let (type_name, id) = path.into_inner();
    let NeighborsQuery { rel, k } = query.into_inner();
    let k = parse_k(k.as_deref())?;
    let rel = rel.filter(|r| !r.is_empty()).ok_or(ApiError::BadParam {
        param: "rel",
        problem: "required: the relation to rank targets by".into(),
    })?;
    let out = web::block(move || rank_neighbors(&state, &type_name, &id, &rel, k)).await??;
    Ok(web::Json(out))
}

/// The `k` best targets of `rel` for the node, scored by the served version with its comparator
/// against every row of every target type of `rel` (exact; the node itself and its known
/// targets included).
fn rank_neighbors(
    state: &HttpState,
    type_name: &str,
    id: &str,
    rel: &str,
    k: usize,
) -> Result<NeighborsResponse, ApiError> {
    let store = &state.store;
    let schema = store.stored_schema();
    let key = format!("{type_name}:{id}");
    let node_type = resolve_type(store, type_name)?;
    let (rel_id, (_, src_types, dst_names)) = schema
        .relations
        .iter()
        .enumerate()
        .find(|(_, (name, _, _))| name == rel)
        .ok_or_else(|| ApiError::BadParam {
            param: "rel",
            problem: format!("unknown relation `{rel}`"),
        })?;
    if !src_types.iter().any(|t| t == type_name) {
        return Err(ApiError::BadParam {
            param: "rel",
            problem: format!(
                "relation `{rel}` starts at `{}`, not at `{type_name}`",
                src_types.join("` or `")
            ),
        });
    }
    let mut dst_types = Vec::with_capacity(dst_names.len());
    for name in dst_names {
        let t = resolve_type(store, name)?;
        if !dst_types.contains(&t) {
            dst_types.push(t);
        }
    }
    let node = resolve_node(store, node_type, id, &key)?;
    let (version, ranked) = state.serving.with(|view| {
        let view = served(view)?;
        let src = node_row(view, node, &key)?;
        let relation =
            row(&view.relations, rel_id as i64).ok_or_else(|| ApiError::RelationNotServed {
                rel: rel.to_owned(),
                version: view.version,
            })?;
        let ranked = tch::no_grad(|| top_targets(view, &src, &relation, &dst_types, k))?;
        Ok::<_, ApiError>((view.version, ranked))
    })?;
    let mut neighbors = Vec::with_capacity(ranked.len());
    for (score, target) in ranked {
        let id = store.node_id(target)?.ok_or(ApiError::MissingId {
            node_type: target.node_type,
            index: target.index,
        })?;
        let type_name = &schema.node_types[target.node_type as usize];
        neighbors.push(ScoredNode {
            node: format!("{type_name}:{id}"),
            score,
        });
    }
    Ok(NeighborsResponse {
        node: key,
        rel: rel.to_owned(),
        version,
        neighbors,
    })
}

/// Best `k` of each target type (libtorch's top-k), then merged: a best `k` overall is within
/// the union. Ties go to the lower type id, then the lower row.
fn top_targets(
    view: &PublishedView,
    src: &Tensor,
    relation: &Tensor,
    dst_types: &[TypeId],
    k: usize,
) -> Result<Vec<(f32, NodeRef)>, ApiError> {
    let translated = translate(&src.unsqueeze(0), &relation.unsqueeze(0));
    let mut hits = Vec::new();
    for &t in dst_types {
        let Some(candidates) = view.tables.get(t as usize).filter(|c| rows(c) > 0) else {
            continue;
        };
        let scores = score_targets(view.comparator, &translated, candidates).reshape([-1]);
        let take = (k as i64).min(rows(candidates));
        let (values, indices) = scores.f_topk(take, 0, true, true)?;
        let values = Vec::<f32>::try_from(&values.to_kind(Kind::Float))?;
        let indices = Vec::<i64>::try_from(&indices)?;
        hits.extend(values.into_iter().zip(indices).map(|(score, i)| {
            (
                score,
                NodeRef {
                    node_type: t,
                    index: i as u32,
                },
            )
        }));
    }
    hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    hits.truncate(k);
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
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
            row_ts: vec![vec![1_732_190_000_123, 200], vec![], vec![]],
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
            bearer_token: token.map(Into::into),
            rate: Mutex::default(),
        }
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
            let list: Vec<(String, f32)> =
                r.neighbors.into_iter().map(|n| (n.node, n.score)).collect();
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
}
