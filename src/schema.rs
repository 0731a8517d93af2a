//! The network's schema and the engagement-event contract (DESIGN §2, §3).
//!
//! [`Schema`] resolves node-type and relation names to the small integer ids used everywhere
//! else; [`decode_event`] turns one Kafka payload into a validated [`Event`] or an
//! [`InvalidEvent`] whose [`InvalidReason`] is the label used in metrics and DLQ headers.
//! Everything here is pure: no I/O, no clocks (the fallback timestamp is passed in).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Dense id of a node type (its position in `schema.node_types`).
pub type TypeId = u16;
/// Dense id of a relation (its position in `schema.relations`).
pub type RelId = u16;

/// One relation as written in the config: a name and the node types it may connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationDef {
    pub name: String,
    /// Allowed source type(s): a single name or a list.
    pub src: OneOrMany,
    /// Allowed target type(s): a single name or a list.
    pub dst: OneOrMany,
}

/// A type name or a list of them (`src = "user"` or `src = ["movie", "entity"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// The schema section of the config, before resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaConfig {
    pub node_types: Vec<String>,
    pub relations: Vec<RelationDef>,
}

/// A relation with its endpoint types resolved to ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    pub src_types: Vec<TypeId>,
    pub dst_types: Vec<TypeId>,
}

/// A resolved schema: names ↔ ids for node types and relations.
#[derive(Debug, Clone)]
pub struct Schema {
    node_types: Vec<String>,
    relations: Vec<Relation>,
    type_ids: HashMap<String, TypeId>,
    rel_ids: HashMap<String, RelId>,
}

/// Why a schema section cannot be used; `key` is the config key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct SchemaError {
    pub key: String,
    pub problem: String,
}

impl Schema {
    /// Resolve and validate a schema section. Errors name the offending config key.
    pub fn new(cfg: &SchemaConfig) -> Result<Self, SchemaError> {
        let err = |key: String, problem: String| SchemaError { key, problem };
        if cfg.node_types.is_empty() {
            return Err(err(
                "schema.node_types".into(),
                "must list at least one node type".into(),
            ));
        }
        if cfg.node_types.len() > TypeId::MAX as usize {
            return Err(err(
                "schema.node_types".into(),
                "too many node types".into(),
            ));
        }
        let mut type_ids = HashMap::new();
        for (i, name) in cfg.node_types.iter().enumerate() {
            let key = format!("schema.node_types[{i}]");
            if !is_valid_name(name) || name.contains(':') {
                return Err(err(
                    key,
                    format!("{name:?} is not a valid type name (1-64 chars, no ':' or whitespace)"),
                ));
            }
            if type_ids.insert(name.clone(), i as TypeId).is_some() {
                return Err(err(key, format!("node type {name:?} is listed twice")));
            }
        }
        if cfg.relations.is_empty() {
            return Err(err(
                "schema.relations".into(),
                "must list at least one relation".into(),
            ));
        }
        if cfg.relations.len() > RelId::MAX as usize {
            return Err(err("schema.relations".into(), "too many relations".into()));
        }
        let mut rel_ids = HashMap::new();
        let mut relations = Vec::with_capacity(cfg.relations.len());
        for (i, rel) in cfg.relations.iter().enumerate() {
            let key = format!("schema.relations[{i}]");
            if !is_valid_name(&rel.name) {
                return Err(err(
                    format!("{key}.name"),
                    format!(
                        "{:?} is not a valid relation name (1-64 chars, no whitespace)",
                        rel.name
                    ),
                ));
            }
            if rel_ids.insert(rel.name.clone(), i as RelId).is_some() {
                return Err(err(
                    format!("{key}.name"),
                    format!("relation {:?} is listed twice", rel.name),
                ));
            }
            let resolve = |side: &str, names: &OneOrMany| -> Result<Vec<TypeId>, SchemaError> {
                if names.names().is_empty() {
                    return Err(err(
                        format!("{key}.{side}"),
                        "must name at least one node type".into(),
                    ));
                }
                names
                    .names()
                    .iter()
                    .map(|n| {
                        type_ids.get(n).copied().ok_or_else(|| {
                            err(
                                format!("{key}.{side}"),
                                format!("unknown node type {n:?} (not in schema.node_types)"),
                            )
                        })
                    })
                    .collect()
            };
            relations.push(Relation {
                name: rel.name.clone(),
                src_types: resolve("src", &rel.src)?,
                dst_types: resolve("dst", &rel.dst)?,
            });
        }
        Ok(Schema {
            node_types: cfg.node_types.clone(),
            relations,
            type_ids,
            rel_ids,
        })
    }

    pub fn node_types(&self) -> &[String] {
        &self.node_types
    }

    pub fn relations(&self) -> &[Relation] {
        &self.relations
    }

    pub fn type_id(&self, name: &str) -> Option<TypeId> {
        self.type_ids.get(name).copied()
    }

    pub fn rel_id(&self, name: &str) -> Option<RelId> {
        self.rel_ids.get(name).copied()
    }

    pub fn type_name(&self, id: TypeId) -> &str {
        &self.node_types[id as usize]
    }

    pub fn relation(&self, id: RelId) -> &Relation {
        &self.relations[id as usize]
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Limits applied while decoding (from the `ingest` config section).
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_event_bytes: usize,
    pub max_id_bytes: usize,
    /// An event time more than this far ahead of the record's timestamp (the `fallback_ts`
    /// [`decode_event`] is given) is invalid; `None` for events that have no record (datasets
    /// read from files).
    pub max_ahead_ms: Option<u64>,
}

/// A node named by an event: its type and external id (the part after the first `:`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeKey {
    pub node_type: TypeId,
    pub id: String,
}

/// A valid engagement event, resolved against the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub src: NodeKey,
    pub rel: RelId,
    pub dst: NodeKey,
    /// Milliseconds since the epoch.
    pub ts: u64,
    pub weight: f32,
    pub event_id: Option<String>,
}

/// Why an event was rejected. The `as_str` form is the metric label and the DLQ header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// Null or empty payload.
    EmptyPayload,
    /// Over `ingest.max_event_bytes`.
    TooLarge,
    NotUtf8,
    NotJson,
    /// Valid JSON, but not an object.
    NotObject,
    MissingField,
    /// A field has the wrong JSON type (e.g. `"weight": "1"`).
    WrongType,
    /// A node reference without the `type:id` form.
    BadNodeRef,
    UnknownNodeType,
    UnknownRelation,
    /// Node types that the relation does not connect.
    TypeMismatch,
    EmptyId,
    IdTooLong,
    NonFiniteWeight,
    NegativeWeight,
    /// `ts` is not a non-negative integer number of milliseconds, or is further ahead of the
    /// record's timestamp than `ingest.max_event_time_ahead_secs`.
    BadTimestamp,
    /// `event_id` is empty or over-long.
    BadEventId,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 17] = [
        InvalidReason::EmptyPayload,
        InvalidReason::TooLarge,
        InvalidReason::NotUtf8,
        InvalidReason::NotJson,
        InvalidReason::NotObject,
        InvalidReason::MissingField,
        InvalidReason::WrongType,
        InvalidReason::BadNodeRef,
        InvalidReason::UnknownNodeType,
        InvalidReason::UnknownRelation,
        InvalidReason::TypeMismatch,
        InvalidReason::EmptyId,
        InvalidReason::IdTooLong,
        InvalidReason::NonFiniteWeight,
        InvalidReason::NegativeWeight,
        InvalidReason::BadTimestamp,
        InvalidReason::BadEventId,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::EmptyPayload => "empty_payload",
            InvalidReason::TooLarge => "too_large",
            InvalidReason::NotUtf8 => "not_utf8",
            InvalidReason::NotJson => "not_json",
            InvalidReason::NotObject => "not_object",
            InvalidReason::MissingField => "missing_field",
            InvalidReason::WrongType => "wrong_type",
            InvalidReason::BadNodeRef => "bad_node_ref",
            InvalidReason::UnknownNodeType => "unknown_node_type",
            InvalidReason::UnknownRelation => "unknown_relation",
            InvalidReason::TypeMismatch => "type_mismatch",
            InvalidReason::EmptyId => "empty_id",
            InvalidReason::IdTooLong => "id_too_long",
            InvalidReason::NonFiniteWeight => "non_finite_weight",
            InvalidReason::NegativeWeight => "negative_weight",
            InvalidReason::BadTimestamp => "bad_timestamp",
            InvalidReason::BadEventId => "bad_event_id",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected event: the reason class and a human-readable detail (naming the field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct InvalidEvent {
    pub reason: InvalidReason,
    pub detail: String,
}

fn invalid(reason: InvalidReason, detail: impl Into<String>) -> InvalidEvent {
    InvalidEvent {
        reason,
        detail: detail.into(),
    }
}

/// The wire shape. Fields are kept raw so that each problem can be attributed to its field;
/// unknown fields are ignored (forward compatibility).
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    src: Option<&'a RawValue>,
    #[serde(borrow)]
    rel: Option<&'a RawValue>,
    #[serde(borrow)]
    dst: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    weight: Option<&'a RawValue>,
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
}

/// Decode and validate one payload. `fallback_ts` (the Kafka timestamp, in ms) is used when the
/// event carries no `ts`, and bounds how far ahead of it an event time may be
/// ([`DecodeLimits::max_ahead_ms`]): past times are valid (replayed datasets carry 1997's), a
/// far-future one is a producer's mistake.
pub fn decode_event(
    schema: &Schema,
    limits: &DecodeLimits,
    payload: Option<&[u8]>,
    fallback_ts: u64,
) -> Result<Event, InvalidEvent> {
    let bytes = match payload {
        None => {
            return Err(invalid(
                InvalidReason::EmptyPayload,
                "payload is null (tombstone)",
            ))
        }
        Some([]) => return Err(invalid(InvalidReason::EmptyPayload, "payload is empty")),
        Some(b) => b,
    };
    if bytes.len() > limits.max_event_bytes {
        return Err(invalid(
            InvalidReason::TooLarge,
            format!(
                "{} bytes > ingest.max_event_bytes = {}",
                bytes.len(),
                limits.max_event_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| invalid(InvalidReason::NotUtf8, format!("payload is not UTF-8: {e}")))?;
    let raw: RawEvent<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(classify_json_error(text, e)),
    };

    let src_raw = required(raw.src, "src")?;
    let rel_raw = required(raw.rel, "rel")?;
    let dst_raw = required(raw.dst, "dst")?;

    let src = node_key(schema, limits, "src", &string_field(src_raw, "src")?)?;
    let dst = node_key(schema, limits, "dst", &string_field(dst_raw, "dst")?)?;
    let rel_name = string_field(rel_raw, "rel")?;
    let rel = schema.rel_id(&rel_name).ok_or_else(|| {
        invalid(
            InvalidReason::UnknownRelation,
            format!("rel: unknown relation {rel_name:?}"),
        )
    })?;
    let relation = schema.relation(rel);
    if !relation.src_types.contains(&src.node_type) || !relation.dst_types.contains(&dst.node_type)
    {
        return Err(invalid(
            InvalidReason::TypeMismatch,
            format!(
                "relation {:?} does not connect {} -> {}",
                relation.name,
                schema.type_name(src.node_type),
                schema.type_name(dst.node_type)
            ),
        ));
    }

    let ts = match raw.ts {
        None => fallback_ts,
        Some(v) if v.get() == "null" => fallback_ts,
        Some(v) => serde_json::from_str::<u64>(v.get()).map_err(|_| {
            invalid(
                InvalidReason::BadTimestamp,
                format!(
                    "ts: {} is not a non-negative integer (ms since epoch)",
                    truncate(v.get())
                ),
            )
        })?,
    };

    if let Some(ahead) = limits.max_ahead_ms {
        if ts > fallback_ts.saturating_add(ahead) {
            return Err(invalid(
                InvalidReason::BadTimestamp,
                format!(
                    "ts: {ts} is {} s ahead of the record's timestamp {fallback_ts} (more than ingest.max_event_time_ahead_secs = {})",
                    (ts - fallback_ts) / 1000,
                    ahead / 1000
                ),
            ));
        }
    }

    let weight = match raw.weight {
        None => 1.0,
        Some(v) if v.get() == "null" => 1.0,
        Some(v) => weight_field(v)?,
    };

    let event_id = match raw.event_id {
        None => None,
        Some(v) if v.get() == "null" => None,
        Some(v) => {
            let id = string_field(v, "event_id")?;
            if id.is_empty() || id.len() > limits.max_id_bytes {
                return Err(invalid(
                    InvalidReason::BadEventId,
                    format!(
                        "event_id must be 1..={} bytes, got {}",
                        limits.max_id_bytes,
                        id.len()
                    ),
                ));
            }
            Some(id.into_owned())
        }
    };

    Ok(Event {
        src,
        rel,
        dst,
        ts,
        weight,
        event_id,
    })
}

fn classify_json_error(text: &str, e: serde_json::Error) -> InvalidEvent {
    use serde_json::error::Category;
    match e.classify() {
        // Valid JSON of the wrong shape (an array, a number, ...) fails as a data error.
        Category::Data if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('{') {
                invalid(InvalidReason::WrongType, format!("{e}"))
            } else {
                invalid(
                    InvalidReason::NotObject,
                    "payload is JSON but not an object",
                )
            }
        }
        _ => invalid(InvalidReason::NotJson, format!("payload is not JSON: {e}")),
    }
}

fn required<'a>(v: Option<&'a RawValue>, field: &str) -> Result<&'a RawValue, InvalidEvent> {
    match v {
        Some(v) if v.get() != "null" => Ok(v),
        _ => Err(invalid(
            InvalidReason::MissingField,
            format!("missing field {field:?}"),
        )),
    }
}

fn string_field<'a>(v: &'a RawValue, field: &str) -> Result<Cow<'a, str>, InvalidEvent> {
    serde_json::from_str::<Cow<'a, str>>(v.get()).map_err(|_| {
        invalid(
            InvalidReason::WrongType,
            format!("{field}: expected a string, got {}", truncate(v.get())),
        )
    })
}

fn weight_field(v: &RawValue) -> Result<f32, InvalidEvent> {
    let w = match serde_json::from_str::<f64>(v.get()) {
        Ok(w) => w,
        // serde_json refuses numbers that overflow f64 (e.g. 1e999): they are not finite.
        Err(_) if looks_numeric(v.get()) => f64::INFINITY,
        Err(_) => {
            return Err(invalid(
                InvalidReason::WrongType,
                format!("weight: expected a number, got {}", truncate(v.get())),
            ))
        }
    };
    let w32 = w as f32;
    if !w32.is_finite() {
        return Err(invalid(
            InvalidReason::NonFiniteWeight,
            format!("weight: {} is not a finite f32", truncate(v.get())),
        ));
    }
    if w32 < 0.0 {
        return Err(invalid(
            InvalidReason::NegativeWeight,
            format!("weight: {w32} is negative"),
        ));
    }
    Ok(w32)
}

fn looks_numeric(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
}

fn node_key(
    schema: &Schema,
    limits: &DecodeLimits,
    field: &str,
    value: &str,
) -> Result<NodeKey, InvalidEvent> {
    let Some((type_name, id)) = value.split_once(':') else {
        return Err(invalid(
            InvalidReason::BadNodeRef,
            format!("{field}: {:?} is not of the form type:id", truncate(value)),
        ));
    };
    let node_type = schema.type_id(type_name).ok_or_else(|| {
        invalid(
            InvalidReason::UnknownNodeType,
            format!("{field}: unknown node type {:?}", truncate(type_name)),
        )
    })?;
    if id.is_empty() {
        return Err(invalid(
            InvalidReason::EmptyId,
            format!("{field}: empty id"),
        ));
    }
    if id.len() > limits.max_id_bytes {
        return Err(invalid(
            InvalidReason::IdTooLong,
            format!(
                "{field}: id is {} bytes > ingest.max_id_bytes = {}",
                id.len(),
                limits.max_id_bytes
            ),
        ));
    }
    Ok(NodeKey {
        node_type,
        id: id.to_owned(),
    })
}

/// Shorten a value quoted in an error detail so a huge field cannot bloat DLQ headers.
fn truncate(s: &str) -> &str {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twitter() -> Schema {
        let cfg: SchemaConfig = toml::from_str(
            r#"
            node_types = ["user", "tweet", "ad"]
            relations = [
              { name = "follows", src = "user", dst = "user" },
              { name = "favorites", src = "user", dst = "tweet" },
              { name = "mixed", src = ["user", "ad"], dst = "tweet" },
            ]
            "#,
        )
        .unwrap();
        Schema::new(&cfg).unwrap()
    }

    const LIMITS: DecodeLimits = DecodeLimits {
        max_event_bytes: 512,
        max_id_bytes: 16,
        max_ahead_ms: None,
    };

    fn decode(s: &str) -> Result<Event, InvalidEvent> {
        decode_event(&twitter(), &LIMITS, Some(s.as_bytes()), 777)
    }

    fn reason(s: &str) -> InvalidReason {
        decode(s).expect_err(s).reason
    }

    #[test]
    fn decodes_a_full_event() {
        let e = decode(r#"{"src":"user:42","rel":"favorites","dst":"tweet:9001","ts":1732190000123,"weight":2.5,"event_id":"e1"}"#)
            .unwrap();
        let s = twitter();
        assert_eq!(
            e.src,
            NodeKey {
                node_type: s.type_id("user").unwrap(),
                id: "42".into()
            }
        );
        assert_eq!(
            e.dst,
            NodeKey {
                node_type: s.type_id("tweet").unwrap(),
                id: "9001".into()
            }
        );
        assert_eq!(e.rel, s.rel_id("favorites").unwrap());
        assert_eq!(e.ts, 1732190000123);
        assert_eq!(e.weight, 2.5);
        assert_eq!(e.event_id.as_deref(), Some("e1"));
    }

    #[test]
    fn defaults_ts_weight_and_keeps_colons_and_escapes_in_ids() {
        let e =
            decode(r#"{"src":"user:a:b","rel":"follows","dst":"user:\u00e9t\u00e9","extra":[1]}"#)
                .unwrap();
        assert_eq!(e.ts, 777);
        assert_eq!(e.weight, 1.0);
        assert_eq!(e.src.id, "a:b");
        assert_eq!(e.dst.id, "été");
        assert_eq!(e.event_id, None);
        let e =
            decode(r#"{"src":"ad:1","rel":"mixed","dst":"tweet:2","weight":0,"ts":null}"#).unwrap();
        assert_eq!((e.weight, e.ts), (0.0, 777));
    }

    #[test]
    fn every_invalid_class_is_named() {
        let big = format!(
            r#"{{"src":"user:1","rel":"follows","dst":"user:2","pad":"{}"}}"#,
            "x".repeat(600)
        );
        let cases: Vec<(Vec<u8>, InvalidReason)> = vec![
            (b"".to_vec(), InvalidReason::EmptyPayload),
            (big.into_bytes(), InvalidReason::TooLarge),
            (vec![b'{', 0xff, 0xfe, b'}'], InvalidReason::NotUtf8),
            (b"{not json".to_vec(), InvalidReason::NotJson),
            (
                br#"{"src":"user:1","src":"user:2"}"#.to_vec(),
                InvalidReason::WrongType,
            ),
            (b"[1,2,3]".to_vec(), InvalidReason::NotObject),
            (b"42".to_vec(), InvalidReason::NotObject),
            (
                br#"{"rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::MissingField,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":null}"#.to_vec(),
                InvalidReason::MissingField,
            ),
            (
                br#"{"src":1,"rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::WrongType,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":"1"}"#.to_vec(),
                InvalidReason::WrongType,
            ),
            (
                br#"{"src":"user1","rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::BadNodeRef,
            ),
            (
                br#"{"src":"robot:1","rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::UnknownNodeType,
            ),
            (
                br#"{"src":"user:1","rel":"likes","dst":"user:2"}"#.to_vec(),
                InvalidReason::UnknownRelation,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"tweet:2"}"#.to_vec(),
                InvalidReason::TypeMismatch,
            ),
            (
                br#"{"src":"ad:1","rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::TypeMismatch,
            ),
            (
                br#"{"src":"user:","rel":"follows","dst":"user:2"}"#.to_vec(),
                InvalidReason::EmptyId,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:01234567890123456"}"#.to_vec(),
                InvalidReason::IdTooLong,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":1e999}"#.to_vec(),
                InvalidReason::NonFiniteWeight,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":1e39}"#.to_vec(),
                InvalidReason::NonFiniteWeight,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","weight":-0.5}"#.to_vec(),
                InvalidReason::NegativeWeight,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":-1}"#.to_vec(),
                InvalidReason::BadTimestamp,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":1.5}"#.to_vec(),
                InvalidReason::BadTimestamp,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","ts":"now"}"#.to_vec(),
                InvalidReason::BadTimestamp,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","event_id":""}"#.to_vec(),
                InvalidReason::BadEventId,
            ),
            (
                br#"{"src":"user:1","rel":"follows","dst":"user:2","event_id":7}"#.to_vec(),
                InvalidReason::WrongType,
            ),
        ];
        for (payload, want) in cases {
            let got = decode_event(&twitter(), &LIMITS, Some(&payload), 0)
                .expect_err(&String::from_utf8_lossy(&payload));
            assert_eq!(
                got.reason,
                want,
                "payload {:?}: {}",
                String::from_utf8_lossy(&payload),
                got.detail
            );
            assert!(!got.detail.is_empty());
        }
        assert_eq!(
            decode_event(&twitter(), &LIMITS, None, 0)
                .unwrap_err()
                .reason,
            InvalidReason::EmptyPayload
        );
        assert_eq!(
            reason(r#"{"src":"user:1","rel":"follows"}"#),
            InvalidReason::MissingField
        );
    }

    #[test]
    fn reason_labels_round_trip() {
        for r in InvalidReason::ALL {
            assert_eq!(InvalidReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(InvalidReason::parse("nope"), None);
    }

    #[test]
    fn schema_errors_name_the_key() {
        let bad = |toml_src: &str| {
            let cfg: SchemaConfig = toml::from_str(toml_src).unwrap();
            Schema::new(&cfg).unwrap_err()
        };
        let e = bad(r#"node_types = ["user", "user"]
                       relations = [{ name = "f", src = "user", dst = "user" }]"#);
        assert_eq!(e.key, "schema.node_types[1]");
        let e = bad(r#"node_types = ["user"]
                       relations = [{ name = "f", src = "user", dst = "tweet" }]"#);
        assert_eq!(e.key, "schema.relations[0].dst");
        assert!(e.problem.contains("tweet"));
        let e = bad(r#"node_types = ["us:er"]
                       relations = [{ name = "f", src = "user", dst = "user" }]"#);
        assert_eq!(e.key, "schema.node_types[0]");
        let e = bad(r#"node_types = ["user"]
                       relations = []"#);
        assert_eq!(e.key, "schema.relations");
    }

    #[test]
    fn an_event_time_far_ahead_of_its_record_is_a_bad_timestamp_but_past_times_are_valid() {
        let limits = DecodeLimits {
            max_ahead_ms: Some(3_600_000),
            ..LIMITS
        };
        let record = 1_732_190_400_000u64;
        let at = |ts: u64| {
            let s = format!(r#"{{"src":"user:1","rel":"follows","dst":"user:2","ts":{ts}}}"#);
            decode_event(&twitter(), &limits, Some(s.as_bytes()), record).map(|e| e.ts)
        };
        assert_eq!(
            at(874_724_710_000).unwrap(),
            874_724_710_000,
            "1997 is fine"
        );
        assert_eq!(at(record + 3_600_000).unwrap(), record + 3_600_000);
        let e = at(9_999_999_999_999).unwrap_err();
        assert_eq!(e.reason, InvalidReason::BadTimestamp);
        assert!(
            e.detail.contains("ingest.max_event_time_ahead_secs"),
            "{}",
            e.detail
        );
        let files = DecodeLimits {
            max_ahead_ms: None,
            ..LIMITS
        };
        let s = r#"{"src":"user:1","rel":"follows","dst":"user:2","ts":9999999999999}"#;
        assert!(decode_event(&twitter(), &files, Some(s.as_bytes()), 0).is_ok());
    }

    /// Property tests (proptest): every payload, arbitrary or a mutated valid event, decodes to
    /// a valid event or an [`InvalidEvent`] with a reason, never a panic; valid events carry
    /// exactly the fields written, and a decoded event re-encoded decodes to itself.
    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Cases per property; the three properties run about 2,000 cases each.
        const CASES: u32 = 2_000;
        const AHEAD_MS: u64 = 3_600_000;
        const PROPS: DecodeLimits = DecodeLimits {
            max_event_bytes: 1_024,
            max_id_bytes: 24,
            max_ahead_ms: Some(AHEAD_MS),
        };
        const RECORD_TS: u64 = 1_732_190_400_000;

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: CASES,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        /// `type:id` of a node key, as an event names it.
        fn node_name(s: &Schema, k: &NodeKey) -> String {
            format!("{}:{}", s.type_name(k.node_type), k.id)
        }

        /// The event as JSON, every optional field written.
        fn encode(s: &Schema, e: &Event) -> Vec<u8> {
            let mut j = serde_json::json!({
                "src": node_name(s, &e.src),
                "rel": s.relation(e.rel).name,
                "dst": node_name(s, &e.dst),
                "ts": e.ts,
                // Exact: an f32 widened to f64 prints a decimal that parses back to it.
                "weight": f64::from(e.weight),
            });
            if let Some(id) = &e.event_id {
                j["event_id"] = serde_json::json!(id);
            }
            j.to_string().into_bytes()
        }

        /// What every decoder answer must satisfy: a valid event within the schema and the
        /// limits that re-encodes to itself, or a reason with a detail.
        fn check_answer(payload: Option<&[u8]>) -> Result<(), TestCaseError> {
            let s = twitter();
            match decode_event(&s, &PROPS, payload, RECORD_TS) {
                Ok(e) => {
                    let rel = s.relation(e.rel);
                    prop_assert!(rel.src_types.contains(&e.src.node_type), "{e:?}");
                    prop_assert!(rel.dst_types.contains(&e.dst.node_type), "{e:?}");
                    for id in [&e.src.id, &e.dst.id] {
                        prop_assert!(!id.is_empty() && id.len() <= PROPS.max_id_bytes, "{e:?}");
                    }
                    prop_assert!(e.weight.is_finite() && e.weight >= 0.0, "{e:?}");
                    prop_assert!(e.ts <= RECORD_TS + AHEAD_MS, "{e:?}");
                    if let Some(id) = &e.event_id {
                        prop_assert!(!id.is_empty() && id.len() <= PROPS.max_id_bytes, "{e:?}");
                    }
                    let again = encode(&s, &e);
                    if again.len() <= PROPS.max_event_bytes {
                        let back = decode_event(&s, &PROPS, Some(&again), RECORD_TS);
                        prop_assert_eq!(
                            back.as_ref(),
                            Ok(&e),
                            "re-encoded {}",
                            String::from_utf8_lossy(&again)
                        );
                    }
                }
                Err(e) => {
                    prop_assert_eq!(InvalidReason::parse(e.reason.as_str()), Some(e.reason));
                    prop_assert!(!e.detail.is_empty(), "{e:?}");
                    // Details go into DLQ headers: quoted values are truncated.
                    prop_assert!(e.detail.len() < 600, "{} bytes: {e:?}", e.detail.len());
                }
            }
            Ok(())
        }

        /// A written `ts`: a whole number of ms, null, or something else.
        #[derive(Debug, Clone)]
        enum Ts {
            Absent,
            Null,
            Ms(u64),
            Other(serde_json::Value),
        }

        /// A written `weight`.
        #[derive(Debug, Clone)]
        enum Weight {
            Absent,
            Null,
            Number(f64),
            Other(serde_json::Value),
        }

        /// An event as written by a producer: valid types for its relation, any ids.
        #[derive(Debug, Clone)]
        struct Written {
            rel: RelId,
            src_type: TypeId,
            dst_type: TypeId,
            src_id: String,
            dst_id: String,
            ts: Ts,
            weight: Weight,
            event_id: Option<String>,
            /// An unknown field the decoder ignores.
            extra: Option<(String, serde_json::Value)>,
        }

        impl Written {
            fn json(&self, s: &Schema) -> serde_json::Value {
                let mut j = serde_json::json!({
                    "src": format!("{}:{}", s.type_name(self.src_type), self.src_id),
                    "rel": s.relation(self.rel).name,
                    "dst": format!("{}:{}", s.type_name(self.dst_type), self.dst_id),
                });
                if let Some((k, v)) = &self.extra {
                    j[k] = v.clone();
                }
                match &self.ts {
                    Ts::Absent => {}
                    Ts::Null => j["ts"] = serde_json::Value::Null,
                    Ts::Ms(ms) => j["ts"] = serde_json::json!(ms),
                    Ts::Other(v) => j["ts"] = v.clone(),
                }
                match &self.weight {
                    Weight::Absent => {}
                    Weight::Null => j["weight"] = serde_json::Value::Null,
                    Weight::Number(w) => j["weight"] = serde_json::json!(w),
                    Weight::Other(v) => j["weight"] = v.clone(),
                }
                if let Some(id) = &self.event_id {
                    j["event_id"] = serde_json::json!(id);
                }
                j
            }

            /// The decoder's answer, from the contract: the first failing check in the
            /// documented order (ids, then ts, then weight, then event_id).
            fn expected(&self, s: &Schema, bytes: usize) -> Result<Event, InvalidReason> {
                use InvalidReason as R;
                if bytes > PROPS.max_event_bytes {
                    return Err(R::TooLarge);
                }
                for id in [&self.src_id, &self.dst_id] {
                    if id.is_empty() {
                        return Err(R::EmptyId);
                    }
                    if id.len() > PROPS.max_id_bytes {
                        return Err(R::IdTooLong);
                    }
                }
                let ts = match &self.ts {
                    Ts::Absent | Ts::Null => RECORD_TS,
                    Ts::Ms(ms) if *ms <= RECORD_TS + AHEAD_MS => *ms,
                    Ts::Ms(_) | Ts::Other(_) => return Err(R::BadTimestamp),
                };
                let weight = match &self.weight {
                    Weight::Absent | Weight::Null => 1.0,
                    Weight::Number(w) if !(*w as f32).is_finite() => {
                        return Err(R::NonFiniteWeight)
                    }
                    Weight::Number(w) if (*w as f32) < 0.0 => return Err(R::NegativeWeight),
                    Weight::Number(w) => *w as f32,
                    Weight::Other(_) => return Err(R::WrongType),
                };
                if let Some(id) = &self.event_id {
                    if id.is_empty() || id.len() > PROPS.max_id_bytes {
                        return Err(R::BadEventId);
                    }
                }
                let _ = s;
                Ok(Event {
                    src: NodeKey {
                        node_type: self.src_type,
                        id: self.src_id.clone(),
                    },
                    rel: self.rel,
                    dst: NodeKey {
                        node_type: self.dst_type,
                        id: self.dst_id.clone(),
                    },
                    ts,
                    weight,
                    event_id: self.event_id.clone(),
                })
            }
        }

        /// Any JSON value, nested a few levels.
        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            use serde_json::Value;
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec(("\\PC{0,6}", inner), 0..4)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        /// Ids: any characters (colons, slashes, quotes, controls, astral), sometimes empty or
        /// over `max_id_bytes`.
        fn id() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z0-9]{1,12}",
                4 => "\\PC{1,8}",
                1 => "[\\x00-\\x1f\"\\\\:/ ]{1,8}",
                1 => Just(String::new()),
                1 => "\\PC{20,30}",
            ]
        }

        fn written() -> impl Strategy<Value = Written> {
            let s = twitter();
            let rels: Vec<(RelId, Vec<TypeId>, Vec<TypeId>)> = (0..s.relations().len())
                .map(|r| {
                    let rel = s.relation(r as RelId);
                    (r as RelId, rel.src_types.clone(), rel.dst_types.clone())
                })
                .collect();
            let ts = prop_oneof![
                Just(Ts::Absent),
                Just(Ts::Null),
                (0..=RECORD_TS + AHEAD_MS).prop_map(Ts::Ms),
                (RECORD_TS - 10..RECORD_TS + AHEAD_MS + 10).prop_map(Ts::Ms),
                any::<u64>().prop_map(Ts::Ms),
                json_value()
                    .prop_filter("not a ts", |v| !v.is_u64() && !v.is_null())
                    .prop_map(Ts::Other),
            ];
            let weight = prop_oneof![
                Just(Weight::Absent),
                Just(Weight::Null),
                (0.0f64..100.0).prop_map(Weight::Number),
                any::<f32>()
                    .prop_filter("finite", |w| w.is_finite())
                    .prop_map(|w| Weight::Number(f64::from(w))),
                any::<f64>()
                    .prop_filter("finite", |w| w.is_finite())
                    .prop_map(Weight::Number),
                json_value()
                    .prop_filter("not a number", |v| !v.is_number() && !v.is_null())
                    .prop_map(Weight::Other),
            ];
            let extra = prop::option::of((
                prop::sample::select(vec!["pad", "meta", "ts_ms", "weights", "Src", "src "]),
                json_value(),
            ))
            .prop_map(|e| e.map(|(k, v)| (k.to_owned(), v)));
            (
                prop::sample::select(rels),
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                id(),
                id(),
                ts,
                weight,
                prop::option::of(id()),
                extra,
            )
                .prop_map(
                    |((rel, srcs, dsts), si, di, src_id, dst_id, ts, weight, event_id, extra)| {
                        Written {
                            rel,
                            src_type: *si.get(&srcs),
                            dst_type: *di.get(&dsts),
                            src_id,
                            dst_id,
                            ts,
                            weight,
                            event_id,
                            extra,
                        }
                    },
                )
        }

        /// One edit of a payload's bytes.
        #[derive(Debug, Clone)]
        enum Edit {
            Flip(prop::sample::Index, u8),
            Insert(prop::sample::Index, u8),
            Delete(prop::sample::Index, usize),
            Duplicate(prop::sample::Index, usize),
            Splice(prop::sample::Index, &'static str),
            Truncate(prop::sample::Index),
        }

        const FRAGMENTS: [&str; 16] = [
            "\"",
            "\\",
            "\\u",
            "\\ud800",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "null",
            "-",
            "1e999",
            "\u{0}",
            "\"src\":",
            "\u{1F600}",
        ];

        fn edit() -> impl Strategy<Value = Edit> {
            let at = any::<prop::sample::Index>;
            prop_oneof![
                (at(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
                (at(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
                (at(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
                (at(), 1usize..16).prop_map(|(i, n)| Edit::Duplicate(i, n)),
                (at(), prop::sample::select(FRAGMENTS.to_vec()))
                    .prop_map(|(i, f)| Edit::Splice(i, f)),
                at().prop_map(Edit::Truncate),
            ]
        }

        fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
            let pos = |i: &prop::sample::Index, len: usize| i.index(len + 1);
            match edit {
                Edit::Flip(i, bit) if !bytes.is_empty() => {
                    let at = i.index(bytes.len());
                    bytes[at] ^= 1 << bit;
                }
                Edit::Flip(..) => {}
                Edit::Insert(i, b) => bytes.insert(pos(i, bytes.len()), *b),
                Edit::Delete(i, n) => {
                    let at = pos(i, bytes.len());
                    bytes.drain(at..(at + n).min(bytes.len()));
                }
                Edit::Duplicate(i, n) => {
                    let at = pos(i, bytes.len());
                    let copy = bytes[at..(at + n).min(bytes.len())].to_vec();
                    bytes.splice(at..at, copy);
                }
                Edit::Splice(i, f) => {
                    let at = pos(i, bytes.len());
                    bytes.splice(at..at, f.bytes());
                }
                Edit::Truncate(i) => bytes.truncate(pos(i, bytes.len())),
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Any bytes at all, and nothing (a tombstone).
            #[test]
            fn arbitrary_bytes_are_an_event_or_a_reason(
                payload in prop::option::weighted(
                    0.98,
                    prop_oneof![
                        prop::collection::vec(any::<u8>(), 0..1_200),
                        "\\PC{0,64}".prop_map(String::into_bytes),
                        json_value().prop_map(|v| v.to_string().into_bytes()),
                    ],
                ),
            ) {
                check_answer(payload.as_deref())?;
            }

            /// Events as a producer writes them, with any ids, times, weights and event ids:
            /// the answer is exactly what the contract says, and a valid one carries its fields.
            #[test]
            fn written_events_decode_to_their_fields_or_the_contracts_reason(w in written()) {
                let s = twitter();
                let bytes = w.json(&s).to_string().into_bytes();
                let got = decode_event(&s, &PROPS, Some(&bytes), RECORD_TS);
                let want = w.expected(&s, bytes.len());
                prop_assert_eq!(
                    got.as_ref().map_err(|e| e.reason),
                    want.as_ref().map_err(|r| *r),
                    "payload {}",
                    String::from_utf8_lossy(&bytes)
                );
                check_answer(Some(&bytes))?;
            }

            /// Valid events with their bytes edited (flipped bits, insertions, deletions,
            /// duplicated runs, JSON fragments spliced in, truncation).
            #[test]
            fn mutated_valid_events_are_an_event_or_a_reason(
                w in written(),
                edits in prop::collection::vec(edit(), 1..6),
            ) {
                let s = twitter();
                let mut bytes = w.json(&s).to_string().into_bytes();
                for e in &edits {
                    apply(&mut bytes, e);
                }
                check_answer(Some(&bytes))?;
            }
        }
    }
}
