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

use parking_lot::Mutex;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{get, web, App, HttpResponse, HttpServer, Responder, ResponseError};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::align::AlignStatus;
use crate::ingest::IngestStatus;
use crate::publish::PublishStatus;
use crate::schema::TypeId;
use crate::serve::candidates::owned_candidates;
use crate::serve::embeddings::{embedding_row, neighbor_ranking};
use crate::serve::status::status_doc;
use crate::serve::{RateWindow, ServingView};
use crate::store::{refresh_store_gauges, GraphStore, StoreError};
use crate::train::{TorchInfo, TrainerStatus};

/// Default and largest `k` of `/v1/neighbors`.
pub(crate) const DEFAULT_K: usize = 10;
pub(crate) const MAX_K: usize = 1000;

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
    /// Rows of partitions owned elsewhere (`[remote]`); `None` when `remote.enabled` is false.
    pub remote: Option<Arc<crate::remote::RemoteCache>>,
    /// The gradient exchange's counters (`remote.exchange_gradients`); `None` when off.
    pub exchange: Option<Arc<crate::exchange::GradientInbox>>,
    /// `http.bearer_token`; `None`: no authentication. (Also what this instance presents to
    /// the other owners it asks for candidates: one deployment, one token.)
    pub bearer_token: Option<String>,
    /// What `/v1/neighbors` asks the other owners with (`http.gather_timeout_ms` bounds each
    /// call).
    pub peers: crate::serve::Peers,
    /// Samples of the consumed counter behind the recent ingest rate in `/v1/status`.
    pub rate: Mutex<RateWindow>,
    /// `[train]`: `/v1/neighbors` adds a history-type source's recent targets
    /// (`train.history_types`) as the model scores it. `None`: the row alone.
    pub train: Option<crate::config::TrainParams>,
    /// `[http.multi_interest]`: a history-type source as several interests (`enabled`, or a
    /// request's `interests=true`).
    pub multi_interest: crate::config::MultiInterestConfig,
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
    // A query string the extractor rejects (a repeated key, a wrong type) and a path no route
    // matches answer in the API's JSON error form too.
    let query =
        web::QueryConfig::default().error_handler(|e, _| ApiError::BadQuery(e.to_string()).into());
    let body = web::JsonConfig::default()
        .limit(MAX_BODY_BYTES)
        .error_handler(|e, _| ApiError::BadBody(e.to_string()).into());
    App::new()
        .app_data(state)
        .app_data(query)
        .app_data(body)
        .default_service(web::to(no_route))
        .wrap(from_fn(require_bearer))
        .service(healthz)
        .service(readyz)
        .service(metrics_text)
        .service(status_doc)
        .service(embedding_row)
        .service(neighbor_ranking)
        .service(owned_candidates)
}

/// The largest JSON body a request may carry (a `POST /v1/candidates` query vector with its
/// excluded nodes).
pub(crate) const MAX_BODY_BYTES: usize = 4 << 20;

/// What a request can fail with; the response is `{"error": <message>, "code": <code>}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("unknown node type `{0}`")]
    UnknownType(String),
    #[error("unknown node `{0}`")]
    UnknownNode(String),
    #[error("node `{0}` was erased")]
    Erased(String),
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
    #[error("ANN index: {0}")]
    Ann(#[from] crate::serve::AnnError),
    #[error("the request's work was cancelled (a panic on the blocking pool)")]
    Cancelled,
    #[error("query string: {0}")]
    BadQuery(String),
    #[error("request body: {0}")]
    BadBody(String),
    #[error("no route {method} {path}")]
    NoRoute { method: String, path: String },
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(_: actix_web::error::BlockingError) -> Self {
        ApiError::Cancelled
    }
}

impl ApiError {
    /// A stable, machine-readable name of the failure.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownType(_) => "unknown_type",
            ApiError::UnknownNode(_) => "unknown_node",
            ApiError::Erased(_) => "erased",
            ApiError::NodeNotServed { .. } => "node_not_served",
            ApiError::RelationNotServed { .. } => "relation_not_served",
            ApiError::NoVersion => "no_version",
            ApiError::BadParam { .. } | ApiError::BadQuery(_) | ApiError::BadBody(_) => {
                "bad_parameter"
            }
            ApiError::NoRoute { .. } => "not_found",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Store(_) | ApiError::MissingId { .. } => "store",
            ApiError::Torch(_) | ApiError::Ann(_) | ApiError::Cancelled => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnknownType(_)
            | ApiError::UnknownNode(_)
            | ApiError::NodeNotServed { .. }
            | ApiError::RelationNotServed { .. }
            | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::Erased(_) => StatusCode::GONE,
            ApiError::NoVersion => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadParam { .. } | ApiError::BadQuery(_) | ApiError::BadBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Store(_)
            | ApiError::MissingId { .. }
            | ApiError::Torch(_)
            | ApiError::Ann(_)
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

async fn no_route(req: actix_web::HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoRoute {
        method: req.method().to_string(),
        path: req.path().chars().take(200).collect(),
    })
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
pub(super) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
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
