//! The event contract's decoder and validator (pure): one payload in, a valid [`Event`] or an
//! [`InvalidEvent`] with its reason out, never a panic.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::schema::{RelId, Schema, TypeId};

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
    /// Add the edge (the default), delete every stored edge `(src, rel, dst)`, or erase the node
    /// `src`. An erasure names one node (`"node"` on the wire): its `dst` repeats `src`, and
    /// `rel` and `weight` mean nothing.
    pub op: EventOp,
    pub src: NodeKey,
    pub rel: RelId,
    pub dst: NodeKey,
    /// Milliseconds since the epoch.
    pub ts: u64,
    pub weight: f32,
    pub event_id: Option<String>,
}

/// What an event does to the graph (`"op"` in the payload; absent means `add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventOp {
    /// A new edge (a follow, a favorite, ...).
    #[default]
    Add,
    /// The edge is withdrawn (an unfollow, an un-favorite): every stored edge with the same
    /// source, relation and target leaves the store's adjacency and the training sample.
    Delete,
    /// The node is erased (an account deletion): its edges leave the store and the training
    /// sample, its row leaves the published tables (a tombstone on the embeddings topic), and
    /// later events naming it are not stored.
    Erase,
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
    /// `op` is not `"add"`, `"delete"` or `"erase"`.
    BadOp,
    /// An erasure without its `node`, or naming `src`, `rel` or `dst` as well.
    BadErase,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 19] = [
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
        InvalidReason::BadOp,
        InvalidReason::BadErase,
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
            InvalidReason::BadOp => "bad_op",
            InvalidReason::BadErase => "bad_erase",
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
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    node: Option<&'a RawValue>,
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
    let text = payload_text(payload, limits)?;
    let raw: RawEvent<'_> = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(classify_json_error(text, e)),
    };
    let op = op_field(raw.op)?;
    if op == EventOp::Erase {
        return erasure(schema, limits, &raw, fallback_ts);
    }
    let (src, rel, dst) = endpoints(schema, limits, &raw)?;
    let ts = event_time(raw.ts, fallback_ts, limits)?;
    let weight = match raw.weight {
        None => 1.0,
        Some(v) if v.get() == "null" => 1.0,
        Some(v) => weight_field(v)?,
    };
    let event_id = event_id_field(raw.event_id, limits)?;
    Ok(Event {
        op,
        src,
        rel,
        dst,
        ts,
        weight,
        event_id,
    })
}

/// `"op"`: absent or null is an add.
fn op_field(raw: Option<&RawValue>) -> Result<EventOp, InvalidEvent> {
    match raw.map(RawValue::get) {
        None | Some("null") | Some("\"add\"") => Ok(EventOp::Add),
        Some("\"delete\"") => Ok(EventOp::Delete),
        Some("\"erase\"") => Ok(EventOp::Erase),
        Some(other) => Err(invalid(
            InvalidReason::BadOp,
            format!(
                "op: expected \"add\", \"delete\" or \"erase\", got {}",
                truncate(other)
            ),
        )),
    }
}

/// `{"op": "erase", "node": "type:id"}` (with `ts` and `event_id` as for an edge): the node
/// alone, no `src`, `rel` or `dst`, so an erasure is never mistaken for an edge.
fn erasure(
    schema: &Schema,
    limits: &DecodeLimits,
    raw: &RawEvent<'_>,
    fallback_ts: u64,
) -> Result<Event, InvalidEvent> {
    let present = |v: Option<&RawValue>| v.is_some_and(|v| v.get() != "null");
    if let Some(field) = [("src", raw.src), ("rel", raw.rel), ("dst", raw.dst)]
        .into_iter()
        .find_map(|(name, v)| present(v).then_some(name))
    {
        return Err(invalid(
            InvalidReason::BadErase,
            format!("an erasure names its node as \"node\" and has no {field}"),
        ));
    }
    let Some(node_raw) = raw.node.filter(|v| v.get() != "null") else {
        return Err(invalid(
            InvalidReason::BadErase,
            "an erasure needs \"node\": \"type:id\"",
        ));
    };
    let node = node_key(schema, limits, "node", &string_field(node_raw, "node")?)?;
    Ok(Event {
        op: EventOp::Erase,
        src: node.clone(),
        rel: 0,
        dst: node,
        ts: event_time(raw.ts, fallback_ts, limits)?,
        weight: 0.0,
        event_id: event_id_field(raw.event_id, limits)?,
    })
}

/// The payload as UTF-8 text, within `ingest.max_event_bytes`.
fn payload_text<'a>(
    payload: Option<&'a [u8]>,
    limits: &DecodeLimits,
) -> Result<&'a str, InvalidEvent> {
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
    std::str::from_utf8(bytes)
        .map_err(|e| invalid(InvalidReason::NotUtf8, format!("payload is not UTF-8: {e}")))
}

/// `src`, `rel` and `dst`, resolved against the schema: the relation must connect the types.
fn endpoints(
    schema: &Schema,
    limits: &DecodeLimits,
    raw: &RawEvent<'_>,
) -> Result<(NodeKey, RelId, NodeKey), InvalidEvent> {
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
    Ok((src, rel, dst))
}

/// `ts` (ms since the epoch), the record's timestamp when absent; not too far ahead of it.
fn event_time(
    ts: Option<&RawValue>,
    fallback_ts: u64,
    limits: &DecodeLimits,
) -> Result<u64, InvalidEvent> {
    let ts = match ts {
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
    Ok(ts)
}

fn event_id_field(
    v: Option<&RawValue>,
    limits: &DecodeLimits,
) -> Result<Option<String>, InvalidEvent> {
    let v = match v {
        None => return Ok(None),
        Some(v) if v.get() == "null" => return Ok(None),
        Some(v) => v,
    };
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
    Ok(Some(id.into_owned()))
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
