//! `twhin-stream watch`: follow a running daemon through `/v1/status` until it has consumed,
//! trained and published a given number of events, with a progress bar; keep the timeline
//! (JSON lines), print a summary and plot the figures over time (SVG).
//!
//! Reading the status document ([`Sample::from_status`]), summarising and plotting are pure; only
//! [`watch`] talks to the daemon.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

/// One reading of `/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the watch started.
    pub t: f64,
    pub consumed: u64,
    pub edges: u64,
    pub nodes: u64,
    /// The trainer's cursor: edges trained.
    pub trained: u64,
    pub backlog: u64,
    /// The latest committed version.
    pub version: Option<u64>,
    pub freshness_p50: Option<f64>,
    pub freshness_p99: Option<f64>,
    /// The same for the events that created a node (a new user's first rating).
    pub new_node_p50: Option<f64>,
    pub new_node_p99: Option<f64>,
    /// Mean cosine distance of the last version from the previous one, and from the anchor.
    pub drift_previous: Option<f64>,
    pub drift_anchor: Option<f64>,
    pub prequential_hits10: Option<f64>,
    /// Relation → `(ranks ever taken, Hits@10 over its recent window)`.
    pub prequential_by_relation: BTreeMap<String, (u64, f64)>,
    pub pull: Option<f64>,
}

fn u64_at(v: &Value, pointer: &str) -> Option<u64> {
    v.pointer(pointer).and_then(Value::as_u64)
}

fn f64_at(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

impl Sample {
    /// Read the figures out of a `/v1/status` document (absent parts read as zero or none).
    pub fn from_status(t: f64, s: &Value) -> Sample {
        let nodes = s
            .pointer("/store/nodes")
            .and_then(Value::as_object)
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
        Sample {
            t,
            consumed: u64_at(s, "/ingest/consumed").unwrap_or(0),
            edges: u64_at(s, "/store/edges_total").unwrap_or(0),
            nodes,
            trained: u64_at(s, "/trainer/cursor").unwrap_or(0),
            backlog: u64_at(s, "/trainer/backlog").unwrap_or(0),
            version: u64_at(s, "/publish/version"),
            freshness_p50: f64_at(s, "/publish/freshness/p50_secs"),
            freshness_p99: f64_at(s, "/publish/freshness/p99_secs"),
            new_node_p50: f64_at(s, "/publish/freshness/new_nodes/p50_secs"),
            new_node_p99: f64_at(s, "/publish/freshness/new_nodes/p99_secs"),
            drift_previous: f64_at(s, "/align/last/previous/cosine_mean"),
            drift_anchor: f64_at(s, "/align/last/anchor/cosine_mean"),
            prequential_hits10: f64_at(s, "/trainer/prequential/hits@10"),
            prequential_by_relation: s
                .pointer("/trainer/prequential/by_relation")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(name, v)| {
                            Some((
                                name.clone(),
                                (v.get("ranked")?.as_u64()?, v.get("hits@10")?.as_f64()?),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            pull: f64_at(s, "/align/pull"),
        }
    }
}

/// What the demo prints at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub events: u64,
    pub events_per_sec: f64,
    pub edges: u64,
    pub nodes: u64,
    pub versions: Option<u64>,
    pub freshness_p50_secs: Option<f64>,
    pub freshness_p99_secs: Option<f64>,
    pub new_node_p50_secs: Option<f64>,
    pub new_node_p99_secs: Option<f64>,
    /// Mean over versions of the drift from the previous version.
    pub drift_previous_mean: Option<f64>,
    pub drift_anchor_last: Option<f64>,
    pub prequential_hits10: Option<f64>,
    /// The most-ranked relations: `(name, ranks, Hits@10)`.
    pub prequential_by_relation: Vec<(String, u64, f64)>,
}

/// Relations the summary lists.
const SUMMARY_RELATIONS: usize = 4;

/// Summarise a timeline (its last sample, and the drift of every distinct version seen).
pub fn summarize(samples: &[Sample]) -> Option<Summary> {
    let last = samples.last()?;
    let first_busy = samples.iter().find(|s| s.consumed > 0).unwrap_or(last);
    let busy = (last.t - first_busy.t).max(1e-9);
    let mut drifts = Vec::new();
    let mut seen = None;
    for s in samples {
        if s.version.is_some() && s.version != seen {
            seen = s.version;
            drifts.extend(s.drift_previous);
        }
    }
    Some(Summary {
        seconds: last.t,
        events: last.consumed,
        events_per_sec: last.consumed.saturating_sub(first_busy.consumed) as f64 / busy,
        edges: last.edges,
        nodes: last.nodes,
        versions: last.version,
        freshness_p50_secs: last.freshness_p50,
        freshness_p99_secs: last.freshness_p99,
        new_node_p50_secs: last.new_node_p50,
        new_node_p99_secs: last.new_node_p99,
        drift_previous_mean: (!drifts.is_empty())
            .then(|| drifts.iter().sum::<f64>() / drifts.len() as f64),
        drift_anchor_last: last.drift_anchor,
        prequential_hits10: last.prequential_hits10,
        prequential_by_relation: {
            let mut by: Vec<(String, u64, f64)> = last
                .prequential_by_relation
                .iter()
                .map(|(name, &(ranked, hits))| (name.clone(), ranked, hits))
                .collect();
            by.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            by.truncate(SUMMARY_RELATIONS);
            by
        },
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        writeln!(
            f,
            "events      {} in {:.1} s ({:.0} events/s consumed)",
            self.events, self.seconds, self.events_per_sec
        )?;
        writeln!(f, "graph       {} nodes, {} edges", self.nodes, self.edges)?;
        writeln!(
            f,
            "versions    {}",
            self.versions.map_or("none".into(), |v| v.to_string())
        )?;
        writeln!(
            f,
            "freshness   p50 {} s, p99 {} s (Kafka timestamp of an event to the commit of the first version covering it)",
            opt(self.freshness_p50_secs, 2),
            opt(self.freshness_p99_secs, 2)
        )?;
        writeln!(
            f,
            "new nodes   p50 {} s, p99 {} s (a node's first event to the first version carrying its row)",
            opt(self.new_node_p50_secs, 2),
            opt(self.new_node_p99_secs, 2)
        )?;
        writeln!(
            f,
            "drift       {} mean cosine distance between consecutive versions; {} from the anchor at the end",
            opt(self.drift_previous_mean, 4),
            opt(self.drift_anchor_last, 4)
        )?;
        writeln!(
            f,
            "prequential Hits@10 {} (new edges ranked before training on them)",
            opt(self.prequential_hits10, 3)
        )?;
        for (name, ranked, hits) in &self.prequential_by_relation {
            writeln!(f, "  {name:<28} Hits@10 {hits:.3} ({ranked} ranked)")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("GET http://{addr}{path}: {problem}")]
    Http {
        addr: SocketAddr,
        path: String,
        problem: String,
    },
    #[error("plot {path}: {problem}")]
    Plot { path: String, problem: String },
    #[error("timeline {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// GET a JSON document from the daemon's HTTP server (loopback, HTTP/1.1, `Connection: close`).
pub fn get_json(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Value, ReportError> {
    let fail = |problem: String| ReportError::Http {
        addr,
        path: path.to_owned(),
        problem,
    };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| fail(e.to_string()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(e.to_string()))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no HTTP header".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(fail(format!("status {status}: {}", body.trim())));
    }
    // actix-web answers a small document with Content-Length; a chunked body would start with
    // its size line, which is not JSON.
    serde_json::from_str(body.trim()).map_err(|e| fail(format!("not JSON: {e}")))
}

/// How `watch` runs.
pub struct WatchOptions {
    pub addr: SocketAddr,
    pub token: Option<String>,
    /// Stop once this many events are consumed, trained, and a version published after that.
    pub until_events: u64,
    pub interval: Duration,
    pub timeout: Duration,
    pub progress: bool,
}

/// Poll the daemon until the stop condition holds (see [`WatchOptions::until_events`]); returns
/// the timeline.
pub fn watch(opts: &WatchOptions) -> anyhow::Result<Vec<Sample>> {
    let started = Instant::now();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(opts.until_events)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} events {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut samples: Vec<Sample> = Vec::new();
    // The version committed once everything was trained: the run is complete when a newer one
    // is committed.
    let mut caught_up_at: Option<Option<u64>> = None;
    loop {
        let t = started.elapsed().as_secs_f64();
        match get_json(opts.addr, "/v1/status", opts.token.as_deref()) {
            Ok(status) => {
                let s = Sample::from_status(t, &status);
                bar.set_position(s.consumed.min(opts.until_events));
                bar.set_message(format!(
                    "| trained {} | v{} | fresh p50 {} s | drift {} | Hits@10 {}",
                    s.trained,
                    s.version.unwrap_or(0),
                    s.freshness_p50.map_or("-".into(), |v| format!("{v:.1}")),
                    s.drift_previous.map_or("-".into(), |v| format!("{v:.4}")),
                    s.prequential_hits10
                        .map_or("-".into(), |v| format!("{v:.3}")),
                ));
                let done_training =
                    s.consumed >= opts.until_events && s.trained >= s.edges && s.backlog == 0;
                match caught_up_at {
                    None if done_training => caught_up_at = Some(s.version),
                    Some(v) if s.version > v => {
                        samples.push(s);
                        break;
                    }
                    _ => {}
                }
                samples.push(s);
            }
            Err(e) if samples.is_empty() => tracing::debug!(error = %e, "daemon not up yet"),
            Err(e) => return Err(e.into()),
        }
        if started.elapsed() > opts.timeout {
            bar.abandon();
            anyhow::bail!(
                "--timeout-secs: the daemon did not consume, train and publish {} events within {} s (last: {:?})",
                opts.until_events,
                opts.timeout.as_secs(),
                samples.last()
            );
        }
        std::thread::sleep(opts.interval);
    }
    bar.finish();
    Ok(samples)
}

/// Write the timeline as JSON lines.
pub fn write_timeline(samples: &[Sample], path: &Path) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for s in samples {
        serde_json::to_writer(&mut out, s).expect("plain data");
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)
}

/// One panel of the plot: a title, a y label and its series.
struct Panel<'a> {
    title: &'a str,
    series: Vec<(&'a str, Vec<(f64, f64)>)>,
}

fn series(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter_map(|s| f(s).map(|v| (s.t, v)))
        .collect()
}

/// Plot the timeline as an SVG: events and training, versions, freshness, drift and Hits@10.
pub fn render_svg(samples: &[Sample], path: &Path) -> Result<(), ReportError> {
    use plotters::prelude::*;

    let fail = |e: &dyn std::fmt::Display| ReportError::Plot {
        path: path.display().to_string(),
        problem: e.to_string(),
    };
    let k = |v: u64| v as f64 / 1000.0;
    let panels = [
        Panel {
            title: "events (thousands)",
            series: vec![
                ("consumed", series(samples, |s| Some(k(s.consumed)))),
                ("trained", series(samples, |s| Some(k(s.trained)))),
            ],
        },
        Panel {
            title: "published version",
            series: vec![("version", series(samples, |s| s.version.map(|v| v as f64)))],
        },
        Panel {
            title: "freshness (s)",
            series: vec![
                ("p50", series(samples, |s| s.freshness_p50)),
                ("p99", series(samples, |s| s.freshness_p99)),
                ("new nodes p50", series(samples, |s| s.new_node_p50)),
            ],
        },
        Panel {
            title: "drift (mean cosine distance) and prequential Hits@10",
            series: vec![
                ("vs previous", series(samples, |s| s.drift_previous)),
                ("vs anchor", series(samples, |s| s.drift_anchor)),
                ("Hits@10", series(samples, |s| s.prequential_hits10)),
            ],
        },
    ];
    let t_max = samples.last().map_or(1.0, |s| s.t.max(1.0));
    let root = SVGBackend::new(path, (1000, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let areas = root.split_evenly((4, 1));
    for (area, panel) in areas.iter().zip(&panels) {
        let y_max = panel
            .series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-6)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .draw()
            .map_err(|e| fail(&e))?;
        for (i, (name, pts)) in panel.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| fail(&e))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(consumed: u64, version: Option<u64>, drift: f64) -> Value {
        serde_json::json!({
            "ingest": {"consumed": consumed},
            "store": {"nodes": {"user": 10, "movie": 5}, "edges_total": consumed},
            "trainer": {"cursor": consumed, "backlog": 0, "prequential": {"hits@10": 0.25,
                "by_relation": {"rated_high": {"ranked": 40, "mrr": 0.1, "hits@10": 0.2},
                                "follows": {"ranked": 90, "mrr": 0.2, "hits@10": 0.3}}}},
            "publish": {"version": version, "freshness": {"p50_secs": 1.5, "p99_secs": 4.0, "new_nodes": {"p50_secs": 1.0, "p99_secs": 3.0}}},
            "align": {"pull": 2.0, "last": {"previous": {"cosine_mean": drift}, "anchor": {"cosine_mean": 0.1}}}
        })
    }

    #[test]
    fn a_status_document_reads_into_a_sample() {
        let s = Sample::from_status(2.0, &status(100, Some(3), 0.01));
        assert_eq!(
            s,
            Sample {
                t: 2.0,
                consumed: 100,
                edges: 100,
                nodes: 15,
                trained: 100,
                backlog: 0,
                version: Some(3),
                freshness_p50: Some(1.5),
                freshness_p99: Some(4.0),
                new_node_p50: Some(1.0),
                new_node_p99: Some(3.0),
                drift_previous: Some(0.01),
                drift_anchor: Some(0.1),
                prequential_hits10: Some(0.25),
                prequential_by_relation: BTreeMap::from([
                    ("follows".to_owned(), (90, 0.3)),
                    ("rated_high".to_owned(), (40, 0.2)),
                ]),
                pull: Some(2.0),
            }
        );
        let empty = Sample::from_status(0.0, &serde_json::json!({}));
        assert_eq!((empty.consumed, empty.version), (0, None));
    }

    #[test]
    fn the_summary_averages_drift_over_distinct_versions() {
        let samples = vec![
            Sample::from_status(0.0, &status(0, None, 0.0)),
            Sample::from_status(1.0, &status(100, Some(1), 0.02)),
            Sample::from_status(2.0, &status(200, Some(1), 0.02)),
            Sample::from_status(3.0, &status(300, Some(2), 0.04)),
        ];
        let s = summarize(&samples).unwrap();
        assert_eq!(s.versions, Some(2));
        assert!((s.drift_previous_mean.unwrap() - 0.03).abs() < 1e-12);
        assert_eq!(s.events, 300);
        assert!((s.events_per_sec - 100.0).abs() < 1e-9, "{s:?}");
        assert!(s.to_string().contains("p50 1.50 s, p99 4.00 s"));
        assert!(s
            .to_string()
            .contains("p50 1.00 s, p99 3.00 s (a node's first event"));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn the_plot_is_an_svg_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timeline.svg");
        let samples: Vec<Sample> = (0..20)
            .map(|i| Sample::from_status(i as f64, &status(i * 100, Some(i / 4), 0.01)))
            .collect();
        render_svg(&samples, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        for label in [
            "consumed",
            "published version",
            "p99",
            "vs anchor",
            "Hits@10",
        ] {
            assert!(svg.contains(label), "no {label} in the plot");
        }
        write_timeline(&samples, &dir.path().join("t.jsonl")).unwrap();
        let lines = std::fs::read_to_string(dir.path().join("t.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 20);
    }
}
