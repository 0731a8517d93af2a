//! HTTP: `/healthz` (the process answers), `/readyz` (store open and broker reachable),
//! `/metrics` (Prometheus text) and `/v1/status` (JSON).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::ServerHandle;
use actix_web::{get, web, App, HttpResponse, HttpServer, Responder};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::device::TorchInfo;
use crate::ingest::IngestStatus;
use crate::store::GraphStore;

/// What the handlers read.
pub struct HttpState {
    pub store: Arc<GraphStore>,
    pub ingest: Arc<IngestStatus>,
    /// `None` when `trainer.enabled = false`.
    pub trainer: Option<Arc<crate::trainer::TrainerStatus>>,
    pub metrics: PrometheusHandle,
    pub torch: TorchInfo,
    pub bootstrap_servers: String,
    pub engagements_topic: String,
    pub started: Instant,
}

/// Bind and start the server; returns its handle (stop it at shutdown) and the bound address.
pub fn start(
    bind: std::net::SocketAddr,
    state: Arc<HttpState>,
) -> std::io::Result<(ServerHandle, std::net::SocketAddr)> {
    let data = web::Data::from(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .service(healthz)
            .service(readyz)
            .service(metrics_text)
            .service(status)
    })
    .workers(1)
    .disable_signals()
    .bind(bind)?;
    let addr = server.addrs().first().copied().unwrap_or(bind);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((handle, addr))
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
    crate::app::refresh_store_gauges(&state.store);
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
    pub store: crate::app::StoreSummary,
    pub trainer: Option<crate::trainer::TrainerFigures>,
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
}

#[get("/v1/status")]
async fn status(state: web::Data<HttpState>) -> impl Responder {
    let i = &state.ingest;
    let store = match crate::app::StoreSummary::read(&state.store) {
        Ok(s) => s,
        Err(e) => {
            return HttpResponse::InternalServerError()
                .json(BTreeMap::from([("error", e.to_string())]))
        }
    };
    HttpResponse::Ok().json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started.elapsed().as_secs(),
        kafka: KafkaStatus {
            bootstrap_servers: state.bootstrap_servers.clone(),
            topic: state.engagements_topic.clone(),
            broker_reachable: i.broker_up.load(Ordering::Relaxed),
            assigned_partitions: i.assigned_partitions.load(Ordering::Relaxed),
            lag: i.lag.load(Ordering::Relaxed),
        },
        ingest: IngestFigures {
            consumed: i.consumed.load(Ordering::Relaxed),
            invalid: i.invalid.load(Ordering::Relaxed),
            appended: i.appended.load(Ordering::Relaxed),
            duplicates: i.duplicates.load(Ordering::Relaxed),
            batches: i.batches.load(Ordering::Relaxed),
        },
        store,
        trainer: state.trainer.as_ref().map(|t| t.figures()),
        torch: state.torch.clone(),
    })
}
