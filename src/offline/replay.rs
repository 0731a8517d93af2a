//! `twhin-stream replay`: produce a dataset (real, or the synthetic stream) as engagement events,
//! in order, keyed by the source node, at an optional rate, with a progress bar.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use crate::config::Config;
use crate::kafka::{create_client, require_broker};
use crate::offline::ReplayEvent;

/// Most deliveries awaited at once (bounds memory; librdkafka batches underneath).
const IN_FLIGHT: usize = 20_000;

#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    pub dataset: String,
    pub topic: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
}

/// Produce `events` to the engagements topic; `rate` is events per second (0: as fast as the
/// broker acknowledges).
pub async fn produce(
    cfg: &Config,
    dataset: &str,
    events: &[ReplayEvent],
    rate: u64,
    progress: bool,
) -> anyhow::Result<ReplaySummary> {
    let total = events.len() as u64;
    produce_stream(cfg, dataset, events.iter().cloned(), total, rate, progress).await
}

/// As [`produce`], with the events generated as they go (a synthetic stream of any length in
/// bounded memory); `total` sizes the progress bar.
pub async fn produce_stream(
    cfg: &Config,
    dataset: &str,
    events: impl Iterator<Item = ReplayEvent>,
    total: u64,
    rate: u64,
    progress: bool,
) -> anyhow::Result<ReplaySummary> {
    require_broker(cfg)?;
    let topic = cfg.kafka.engagements_topic.as_str();
    let producer: FutureProducer = create_client(&cfg.producer_properties(), "producer")?;
    let bar = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {human_pos}/{human_len} {per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("replay {dataset}"));

    let started = Instant::now();
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
    let mut produced = 0u64;
    for ev in events {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(produced as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let payload = ev.payload();
        let record = FutureRecord::to(topic)
            .key(ev.src.as_str())
            .payload(payload.as_str());
        let delivery = crate::kafka::send_retrying(&producer, record)
            .await
            .map_err(|e| anyhow::anyhow!("producing to {topic}: {e}"))?;
        in_flight.push_back(delivery);
        if in_flight.len() >= IN_FLIGHT {
            await_delivery(in_flight.pop_front().expect("non-empty"), topic).await?;
        }
        produced += 1;
        if produced % 1024 == 0 {
            bar.set_position(produced);
        }
    }
    while let Some(d) = in_flight.pop_front() {
        await_delivery(d, topic).await?;
    }
    bar.set_position(produced);
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    Ok(ReplaySummary {
        dataset: dataset.to_owned(),
        topic: topic.to_owned(),
        events: produced,
        seconds,
        events_per_sec: produced as f64 / seconds.max(1e-9),
    })
}

async fn await_delivery(d: DeliveryFuture, topic: &str) -> anyhow::Result<()> {
    match d.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => anyhow::bail!("producing to {topic}: {e}"),
        Err(_) => anyhow::bail!("producing to {topic}: the producer went away"),
    }
}
