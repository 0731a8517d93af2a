//! Ingest hot-path benchmarks: payload decoding/validation and durable sled appends.
//!
//! Run with `cargo bench --bench ingest`. Groups:
//!
//! * `decode`: [`decode_event`] throughput (events/s) over 10,000 realistic payloads for the
//!   default Twitter schema, all valid (`valid`) and with ~5% malformed ones mixed in
//!   (`mixed_5pct_invalid`, so the error path is measured too).
//! * `store_append`: [`GraphStore::append`] throughput (edges/s) for batches of 1, 100 and
//!   10,000 events, one atomic, flushed `append` per batch, dedup off; plus batches of 10,000
//!   with event ids and dedup on (`batch_dedup/10000`) to show its cost. Every iteration appends
//!   a new batch at increasing offsets to a store that grows over the run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use twhin_stream::config::Config;
use twhin_stream::schema::{
    decode_event, DecodeLimits, Event, InvalidReason, NodeKey, RelId, Schema, TypeId,
};
use twhin_stream::store::{AppendBatch, GraphStore, SourcedEvent, StoreOptions};

/// 2024-11-21T12:00:00Z in ms: event times start here and move forward.
const BASE_TS: u64 = 1_732_190_400_000;
const DECODE_EVENTS: usize = 10_000;
const TOPIC: &str = "twhin.engagements";
const PARTITIONS: i32 = 4;

fn load_config() -> (Schema, DecodeLimits) {
    let cfg = Config::load(None).expect("default config loads");
    (cfg.schema(), cfg.decode_limits())
}

/// Id space per node type: ids are drawn from `0..size`.
fn id_space(type_name: &str) -> u64 {
    match type_name {
        "user" => 100_000,
        "tweet" => 1_000_000,
        "advertiser" => 2_000,
        "ad" => 50_000,
        "query" => 200_000,
        _ => 100_000,
    }
}

/// Relative frequency of a relation in the generated stream (engagements dominate).
fn relation_weight(name: &str) -> u32 {
    match name {
        "favorites" => 40,
        "retweets" => 10,
        "replies" => 8,
        "follows" => 10,
        "authors" => 5,
        "clicks" => 12,
        "promotes" => 3,
        "searches" => 12,
        _ => 5,
    }
}

/// One generated event, before it becomes JSON or an [`Event`].
struct Spec {
    src_type: TypeId,
    src_id: u64,
    rel: RelId,
    dst_type: TypeId,
    dst_id: u64,
    ts: u64,
    weight: f32,
    event_id: Option<String>,
}

/// Seeded generator of schema-conforming events with a power-law-ish popularity: an id is
/// `floor(size * u^3)` for uniform `u`, so low ids are hot (repeated nodes) and the long tail keeps
/// introducing new nodes.
struct EventGen<'s> {
    schema: &'s Schema,
    rng: SmallRng,
    /// (relation id, cumulative weight)
    rel_table: Vec<(RelId, u32)>,
    total_weight: u32,
    ts: u64,
    next_event_id: u64,
}

impl<'s> EventGen<'s> {
    fn new(schema: &'s Schema, seed: u64) -> Self {
        let mut rel_table = Vec::new();
        let mut total_weight = 0;
        for (i, r) in schema.relations().iter().enumerate() {
            total_weight += relation_weight(&r.name);
            rel_table.push((i as RelId, total_weight));
        }
        EventGen {
            schema,
            rng: SmallRng::seed_from_u64(seed),
            rel_table,
            total_weight,
            ts: BASE_TS,
            next_event_id: 0,
        }
    }

    fn node_id(&mut self, node_type: TypeId) -> u64 {
        let size = id_space(self.schema.type_name(node_type));
        let u: f64 = self.rng.random_range(0.0..1.0);
        ((size as f64 * u * u * u) as u64).min(size - 1)
    }

    /// `with_event_id`: None = on about half of the events, Some(b) = always / never.
    fn next(&mut self, with_event_id: Option<bool>) -> Spec {
        let pick = self.rng.random_range(0..self.total_weight);
        let rel = self
            .rel_table
            .iter()
            .find(|&&(_, cum)| pick < cum)
            .expect("pick < total")
            .0;
        let relation = self.schema.relation(rel);
        let src_type = relation.src_types[self.rng.random_range(0..relation.src_types.len())];
        let dst_type = relation.dst_types[self.rng.random_range(0..relation.dst_types.len())];
        let src_id = self.node_id(src_type);
        let dst_id = self.node_id(dst_type);
        self.ts += self.rng.random_range(0..5);
        // Mostly unit weights, some fractional (dwell-time-like) ones.
        let weight = if self.rng.random_bool(0.7) {
            1.0
        } else {
            (self.rng.random_range(1..=5000) as f32) / 1000.0
        };
        let event_id = if with_event_id.unwrap_or_else(|| self.rng.random_bool(0.5)) {
            self.next_event_id += 1;
            Some(format!(
                "evt-{:016x}",
                self.next_event_id ^ 0x5bd1_e995_0000_0000
            ))
        } else {
            None
        };
        Spec {
            src_type,
            src_id,
            rel,
            dst_type,
            dst_id,
            ts: self.ts,
            weight,
            event_id,
        }
    }

    fn json(&self, s: &Spec) -> String {
        let mut out = format!(
            r#"{{"src":"{}:{}","rel":"{}","dst":"{}:{}","ts":{},"weight":{}"#,
            self.schema.type_name(s.src_type),
            s.src_id,
            self.schema.relation(s.rel).name,
            self.schema.type_name(s.dst_type),
            s.dst_id,
            s.ts,
            s.weight,
        );
        if let Some(id) = &s.event_id {
            out.push_str(&format!(r#","event_id":"{id}""#));
        }
        out.push('}');
        out
    }

    fn event(s: Spec) -> Event {
        Event {
            op: Default::default(),
            src: NodeKey {
                node_type: s.src_type,
                id: s.src_id.to_string(),
            },
            rel: s.rel,
            dst: NodeKey {
                node_type: s.dst_type,
                id: s.dst_id.to_string(),
            },
            ts: s.ts,
            weight: s.weight,
            event_id: s.event_id,
        }
    }
}

fn valid_payloads(schema: &Schema, n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut g = EventGen::new(schema, seed);
    (0..n)
        .map(|_| {
            let s = g.next(None);
            g.json(&s).into_bytes()
        })
        .collect()
}

/// Replace about 5% of the payloads with malformed ones; returns the expected reason per index.
fn corrupt_payloads(
    schema: &Schema,
    payloads: &mut [Vec<u8>],
    seed: u64,
) -> Vec<Option<InvalidReason>> {
    // `follows` connects user -> user: a tweet target is a type mismatch.
    assert!(schema.rel_id("follows").is_some() && schema.rel_id("likes").is_none());
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut expected = vec![None; payloads.len()];
    for (i, p) in payloads.iter_mut().enumerate() {
        if !rng.random_bool(0.05) {
            continue;
        }
        let a = rng.random_range(0..100_000u32);
        let b = rng.random_range(0..1_000_000u32);
        let ts = BASE_TS + i as u64;
        let (payload, reason) = match rng.random_range(0..4) {
            // Truncated JSON (a cut-off message).
            0 => {
                let cut = p.len() / 2;
                (p[..cut].to_vec(), InvalidReason::NotJson)
            }
            1 => (
                format!(r#"{{"src":"user:{a}","rel":"likes","dst":"tweet:{b}","ts":{ts}}}"#).into_bytes(),
                InvalidReason::UnknownRelation,
            ),
            2 => (
                format!(r#"{{"src":"user:{a}","rel":"follows","dst":"tweet:{b}","ts":{ts}}}"#).into_bytes(),
                InvalidReason::TypeMismatch,
            ),
            _ => (
                format!(r#"{{"src":"user:{a}","rel":"favorites","dst":"tweet:{b}","ts":{ts},"weight":-1.5}}"#)
                    .into_bytes(),
                InvalidReason::NegativeWeight,
            ),
        };
        *p = payload;
        expected[i] = Some(reason);
    }
    expected
}

fn bench_decode(c: &mut Criterion) {
    let (schema, limits) = load_config();

    let valid = valid_payloads(&schema, DECODE_EVENTS, 0x7717);
    for p in &valid {
        decode_event(&schema, &limits, Some(p), BASE_TS).unwrap_or_else(|e| {
            panic!(
                "generated payload {} is invalid: {e}",
                String::from_utf8_lossy(p)
            )
        });
    }
    let mut mixed = valid.clone();
    let expected = corrupt_payloads(&schema, &mut mixed, 0xbad);
    for (p, want) in mixed.iter().zip(&expected) {
        let got = decode_event(&schema, &limits, Some(p), BASE_TS)
            .err()
            .map(|e| e.reason);
        assert_eq!(got, *want, "payload {}", String::from_utf8_lossy(p));
    }
    let n_invalid = expected.iter().filter(|e| e.is_some()).count();
    assert!(
        (300..=700).contains(&n_invalid),
        "{n_invalid} invalid payloads, expected ~5%"
    );

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(DECODE_EVENTS as u64));
    group.bench_function("valid", |b| {
        b.iter(|| {
            for p in &valid {
                let _ = black_box(decode_event(&schema, &limits, Some(black_box(p)), BASE_TS));
            }
        })
    });
    group.bench_function("mixed_5pct_invalid", |b| {
        b.iter(|| {
            for p in &mixed {
                let _ = black_box(decode_event(&schema, &limits, Some(black_box(p)), BASE_TS));
            }
        })
    });
    group.finish();
}

/// Produces append batches over `PARTITIONS` partitions with strictly increasing offsets, so
/// that every batch is new to the store.
struct BatchGen<'s> {
    events: EventGen<'s>,
    next_offset: [i64; PARTITIONS as usize],
    with_event_ids: bool,
}

impl<'s> BatchGen<'s> {
    fn new(schema: &'s Schema, seed: u64, with_event_ids: bool) -> Self {
        BatchGen {
            events: EventGen::new(schema, seed),
            next_offset: [0; PARTITIONS as usize],
            with_event_ids,
        }
    }

    fn batch(&mut self, n: usize) -> AppendBatch {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            let partition = self.events.rng.random_range(0..PARTITIONS);
            let offset = self.next_offset[partition as usize];
            self.next_offset[partition as usize] += 1;
            let spec = self.events.next(Some(self.with_event_ids));
            events.push(SourcedEvent {
                partition,
                offset,
                event: EventGen::event(spec),
            });
        }
        let next_offsets = (0..PARTITIONS)
            .map(|p| (p, self.next_offset[p as usize]))
            .collect();
        AppendBatch {
            topic: TOPIC.to_owned(),
            events,
            next_offsets,
            ..AppendBatch::default()
        }
    }
}

fn bench_store_append(c: &mut Criterion) {
    let (schema, _) = load_config();

    let mut group = c.benchmark_group("store_append");
    // (bench name, batch size, dedup on)
    let cases: [(&str, usize, bool); 4] = [
        ("batch", 1, false),
        ("batch", 100, false),
        ("batch", 10_000, false),
        ("batch_dedup", 10_000, true),
    ];
    for (name, size, dedup) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StoreOptions {
            dedup_window_ms: if dedup {
                StoreOptions::default().dedup_window_ms
            } else {
                0
            },
            ..Default::default()
        };
        let store =
            GraphStore::open(&dir.path().join("store"), &schema, &opts).expect("open store");
        let mut gen = BatchGen::new(&schema, 0x5eed ^ size as u64, dedup);

        group.throughput(Throughput::Elements(size as u64));
        if size >= 10_000 {
            // ~0.1 s or more per call: a fixed, small number of iterations per sample.
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_secs(2));
        } else {
            group
                .sampling_mode(SamplingMode::Auto)
                .sample_size(20)
                .warm_up_time(Duration::from_secs(1));
        }
        group.measurement_time(Duration::from_secs(5));
        group.bench_function(format!("{name}/{size}"), |b| {
            b.iter_batched(
                || gen.batch(size),
                |batch| {
                    let out = store.append(black_box(&batch)).expect("append");
                    assert_eq!(out.appended, size as u64, "{out:?}");
                    // Returned so that dropping the batch is not timed.
                    batch
                },
                BatchSize::PerIteration,
            )
        });
        drop(store);
        drop(dir);
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_store_append);
criterion_main!(benches);
