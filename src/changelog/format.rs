//! The changelog record (pure): one ingest batch's valid events of one input partition, with
//! the partition's position after it, as `b"TWL2"` then bincode (standard configuration) of
//! [`ChangelogRecord`]. Node types and relations travel by name, so a record restores into any
//! store whose schema knows them, whatever their ids there.
//!
//! `TWL1` records (before 2026-12-06) are `TWL2` records without the last field, `upstream`, and
//! are still read (as having none).

use serde::{Deserialize, Serialize};

use crate::schema::{Event, EventOp, NodeKey, Schema};
use crate::store::{RecordPrint, SourcedEvent};

/// The record format's magic and version; a change brings a new magic and a refusal of the old
/// (or, as for [`CHANGELOG_MAGIC_1`], a reading of it).
pub const CHANGELOG_MAGIC: &[u8; 4] = b"TWL2";

/// The first version: the same layout up to `upstream`, which it lacks.
pub const CHANGELOG_MAGIC_1: &[u8; 4] = b"TWL1";

/// One input partition's part of one ingest batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangelogRecord {
    /// The input topic and partition the events were consumed from.
    pub topic: String,
    pub partition: i32,
    /// The partition's next offset after the batch (past its invalid events too).
    pub next_offset: i64,
    /// The last record the batch consumed from the partition: `(offset, ts, crc)` of its
    /// [`RecordPrint`], when the batch had one.
    pub last_record: Option<(i64, i64, u32)>,
    /// The store held the partition's earlier events before it logged them here (a store from
    /// before the changelog): this record is the partition's first, and the changelog cannot
    /// rebuild what came before it.
    pub starts_after_history: bool,
    /// The names the events' type and relation numbers stand for.
    pub node_types: Vec<String>,
    pub relations: Vec<String>,
    pub events: Vec<LoggedEvent>,
    /// For a partition of the routed topic: where the events forwarded to it stand in each
    /// engagements partition they came from, `(source partition, next source offset)`, after
    /// this record (empty otherwise, and in `TWL1` records).
    pub upstream: Vec<(i32, i64)>,
}

/// One valid event and its input offset, with the schema's numbers of the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub offset: i64,
    /// 0 add, 1 delete, 2 erase.
    pub op: u8,
    pub src_type: u16,
    pub src: String,
    pub rel: u16,
    pub dst_type: u16,
    pub dst: String,
    pub ts: u64,
    pub weight: f32,
    pub event_id: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ChangelogFormatError {
    #[error("not a changelog record of this version (expected the magic TWL2 or TWL1, found {found:?}); it was written by another version of twhin-stream")]
    Magic { found: Vec<u8> },
    #[error("changelog record: {0}")]
    Decode(String),
    #[error("changelog record names {what} {name:?}, which the schema does not have")]
    Unknown { what: &'static str, name: String },
    #[error("changelog record: {what} number {number} is past its list of names")]
    OutOfRange { what: &'static str, number: u16 },
}

/// Operations as the record numbers them.
const OPS: [EventOp; 3] = [EventOp::Add, EventOp::Delete, EventOp::Erase];

fn op_code(op: EventOp) -> u8 {
    OPS.iter()
        .position(|&o| o == op)
        .expect("every operation is numbered") as u8
}

fn op_of(code: u8) -> Option<EventOp> {
    OPS.get(code as usize).copied()
}

/// Per name of a record, the number `lookup` gives it in the store's schema, or why none.
fn numbering(
    names: &[String],
    what: &'static str,
    lookup: impl Fn(&str) -> Option<u16>,
) -> Vec<Result<u16, ChangelogFormatError>> {
    names
        .iter()
        .map(|name| {
            lookup(name).ok_or(ChangelogFormatError::Unknown {
                what,
                name: name.clone(),
            })
        })
        .collect()
}

impl ChangelogRecord {
    /// The record of `partition`'s `events` (all of that partition, in order).
    pub fn of(
        schema: &Schema,
        topic: &str,
        partition: i32,
        next_offset: i64,
        last_record: Option<RecordPrint>,
        events: &[&SourcedEvent],
    ) -> ChangelogRecord {
        ChangelogRecord {
            topic: topic.to_owned(),
            partition,
            next_offset,
            last_record: last_record.map(|r| (r.offset, r.ts, r.crc)),
            starts_after_history: false,
            node_types: schema.node_types().to_vec(),
            relations: schema.relations().iter().map(|r| r.name.clone()).collect(),
            events: events
                .iter()
                .map(|s| LoggedEvent {
                    offset: s.offset,
                    op: op_code(s.event.op),
                    src_type: s.event.src.node_type,
                    src: s.event.src.id.clone(),
                    rel: s.event.rel,
                    dst_type: s.event.dst.node_type,
                    dst: s.event.dst.id.clone(),
                    ts: s.event.ts,
                    weight: s.event.weight,
                    event_id: s.event.event_id.clone(),
                })
                .collect(),
            upstream: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = CHANGELOG_MAGIC.to_vec();
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("a changelog record encodes");
        out.extend(body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ChangelogRecord, ChangelogFormatError> {
        let v1_body;
        let body = if let Some(body) = bytes.strip_prefix(CHANGELOG_MAGIC) {
            body
        } else if let Some(body) = bytes.strip_prefix(CHANGELOG_MAGIC_1) {
            // A TWL1 body followed by an empty list (one zero byte) is that record in TWL2.
            v1_body = [body, &[0u8]].concat();
            &v1_body
        } else {
            return Err(ChangelogFormatError::Magic {
                found: bytes.iter().take(4).copied().collect(),
            });
        };
        let (record, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
            .map_err(|e| ChangelogFormatError::Decode(e.to_string()))?;
        if used != body.len() {
            return Err(ChangelogFormatError::Decode(format!(
                "{} bytes left over",
                body.len() - used
            )));
        }
        Ok(record)
    }

    /// The events with their offsets, numbered as `schema` numbers types and relations (taken
    /// out of the record: their ids move, not copied).
    pub fn take_events(
        &mut self,
        schema: &Schema,
    ) -> Result<Vec<SourcedEvent>, ChangelogFormatError> {
        // Each name looked up once per record, not once per event.
        let types = numbering(&self.node_types, "node type", |n| schema.type_id(n));
        let relations = numbering(&self.relations, "relation", |n| schema.rel_id(n));
        let of = |numbers: &[Result<u16, ChangelogFormatError>], what, number: u16| {
            numbers
                .get(number as usize)
                .ok_or(ChangelogFormatError::OutOfRange { what, number })?
                .clone()
        };
        let partition = self.partition;
        std::mem::take(&mut self.events)
            .into_iter()
            .map(|e| {
                let op = op_of(e.op)
                    .ok_or_else(|| ChangelogFormatError::Decode(format!("operation {}", e.op)))?;
                Ok(SourcedEvent {
                    partition,
                    offset: e.offset,
                    event: Event {
                        op,
                        src: NodeKey {
                            node_type: of(&types, "node type", e.src_type)?,
                            id: e.src,
                        },
                        rel: of(&relations, "relation", e.rel)?,
                        dst: NodeKey {
                            node_type: of(&types, "node type", e.dst_type)?,
                            id: e.dst,
                        },
                        ts: e.ts,
                        weight: e.weight,
                        event_id: e.event_id,
                    },
                })
            })
            .collect()
    }

    /// The last record as the store keeps it.
    pub fn last_print(&self) -> Option<RecordPrint> {
        self.last_record
            .map(|(offset, ts, crc)| RecordPrint { offset, ts, crc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn schema() -> Schema {
        Config::from_toml("").unwrap().schema()
    }

    fn sourced(
        offset: i64,
        op: EventOp,
        src: (u16, &str),
        rel: u16,
        dst: (u16, &str),
    ) -> SourcedEvent {
        SourcedEvent {
            partition: 3,
            offset,
            event: Event {
                op,
                src: NodeKey {
                    node_type: src.0,
                    id: src.1.into(),
                },
                rel,
                dst: NodeKey {
                    node_type: dst.0,
                    id: dst.1.into(),
                },
                ts: 1_732_190_000_123,
                weight: 0.5,
                event_id: (offset == 7).then(|| "fav-1".into()),
            },
        }
    }

    fn record() -> ChangelogRecord {
        let s = schema();
        let follows = s.rel_id("follows").unwrap();
        let favorites = s.rel_id("favorites").unwrap();
        let (user, tweet) = (s.type_id("user").unwrap(), s.type_id("tweet").unwrap());
        let events = [
            sourced(7, EventOp::Add, (user, "42"), favorites, (tweet, "9001")),
            sourced(9, EventOp::Delete, (user, "42"), follows, (user, "7")),
        ];
        let print = RecordPrint {
            offset: 10,
            ts: 1_732_190_000_200,
            crc: 0xdead_beef,
        };
        ChangelogRecord::of(
            &s,
            "twhin.engagements",
            3,
            11,
            Some(print),
            &events.iter().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn a_record_round_trips_and_restores_its_events_by_name() {
        let r = record();
        let bytes = r.encode();
        assert_eq!(ChangelogRecord::decode(&bytes), Ok(r.clone()));
        let s = schema();
        let events = r.clone().take_events(&s).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].partition, events[0].offset), (3, 7));
        assert_eq!(events[0].event.src.id, "42");
        assert_eq!(s.relation(events[1].event.rel).name, "follows");
        assert_eq!(events[1].event.op, EventOp::Delete);
        assert_eq!(r.last_print().unwrap().crc, 0xdead_beef);
        // Another store numbers the types otherwise: the names decide.
        let mut other = Config::from_toml("").unwrap();
        other.schema.node_types.reverse();
        let reordered = other.schema();
        let moved = r.clone().take_events(&reordered).unwrap();
        assert_eq!(reordered.type_name(moved[0].event.dst.node_type), "tweet");
    }

    #[test]
    fn golden_layout() {
        let bytes = record().encode();
        // The magic, then bincode's standard configuration: a string is its length (varint) and
        // bytes, an i32 is zig-zag varint (3 → 6), an i64 past 250 is 0xfb and 2 bytes or 0xfc
        // and 4 or 0xfd and 8.
        assert_eq!(&bytes[..4], b"TWL2");
        assert_eq!(bytes[4], 17, "the topic's length");
        assert_eq!(&bytes[5..22], b"twhin.engagements");
        assert_eq!(bytes[22], 6, "partition 3, zig-zag");
        assert_eq!(bytes[23], 22, "next offset 11, zig-zag");
        assert_eq!(bytes[24], 1, "a last record");
        // Then: last record (offset 10 → 0x14, ts as 0xfd + 8 bytes, CRC as 0xfc + 4 bytes), not
        // after history (0), 5 node types, 8 relations, 2 events (offset, op, source type and
        // id, relation, target type and id, ts, weight 0.5 as f32 LE, event id option), then
        // the upstream positions: source partition 1 at 40 (zig-zag: 2, 80).
        let mut r = record();
        r.upstream = vec![(1, 40)];
        let bytes = r.encode();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex[..8], "54574c32");
        assert_eq!(&hex[8..hex.len() - 6], &GOLDEN_HEX_1[8..]);
        assert_eq!(&hex[hex.len() - 6..], "010250");
        // A TWL1 record (the same fields but `upstream`) is read as having none.
        let v1: Vec<u8> = (0..GOLDEN_HEX_1.len() / 2)
            .map(|i| u8::from_str_radix(&GOLDEN_HEX_1[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        assert_eq!(ChangelogRecord::decode(&v1), Ok(record()));
    }

    /// A record of `record()` as TWL1 wrote it.
    const GOLDEN_HEX_1: &str = "54574c3111747768696e2e656e676167656d656e747306160114fd90a8239d2603\
        0000fcefbeadde000504757365720574776565740a616476657274697365720261640571756572790807666f\
        6c6c6f7773096661766f7269746573087265747765657473077265706c69657307617574686f727306636c69\
        636b730870726f6d6f746573087365617263686573020e000002343201010439303031fdfbd3914e93010000\
        0000003f01056661762d3112010002343200000137fdfbd3914e930100000000003f00";

    #[test]
    fn bad_records_are_errors_naming_what_is_wrong() {
        assert!(matches!(
            ChangelogRecord::decode(b"TWE1...."),
            Err(ChangelogFormatError::Magic { .. })
        ));
        let mut bytes = record().encode();
        bytes.push(0);
        assert!(matches!(
            ChangelogRecord::decode(&bytes),
            Err(ChangelogFormatError::Decode(_))
        ));
        assert!(ChangelogRecord::decode(&bytes[..20]).is_err());
        let mut unknown = record();
        unknown.relations[0] = "pokes".into();
        let err = unknown.take_events(&schema()).err().unwrap();
        assert!(err.to_string().contains("\"pokes\""), "{err}");
    }
}
