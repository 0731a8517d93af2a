//! Forwarding (docs/architecture.md §9, "Routing"): a node belongs to the engagements partition
//! its key falls in under Kafka's default partitioner ([`crate::partition`]), and the instance
//! that consumes that partition stores its edges. An event consumed from a partition that does
//! not own its source goes, unchanged, to the routed topic's partition that does (an erasure's
//! source is the node it erases). Copies are delivered like dead letters, acknowledged before the batch that consumed
//! them is written, so at least once; the owner skips a copy at or below its source's position
//! ([`crate::store::Upstream`]), which it keeps with its offsets and logs with its changelog.

use rdkafka::message::{BorrowedMessage, Header, Headers as _};
use rdkafka::Message as _;

use crate::ingest::dlq::{Copy, CopyTo};
use crate::partition::partition_of;
use crate::schema::{Event, Schema};

/// The engagements partition a forwarded event was consumed from (decimal).
pub const HEADER_FORWARDED_PARTITION: &str = "twhin.forwarded.partition";
/// Its offset there (decimal).
pub const HEADER_FORWARDED_OFFSET: &str = "twhin.forwarded.offset";

/// Where a valid event consumed from an engagements partition belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The partition it came from owns its source.
    Here,
    /// Another partition owns its source.
    To(i32),
}

/// Where `event`, consumed from partition `consumed_from` of a topic of `partitions`, belongs.
/// `key` is scratch space for the source's key (kept by the caller: this runs per event).
pub(crate) fn route(
    schema: &Schema,
    event: &Event,
    consumed_from: i32,
    partitions: i32,
    key: &mut Vec<u8>,
) -> Route {
    key.clear();
    key.extend_from_slice(schema.type_name(event.src.node_type).as_bytes());
    key.push(b':');
    key.extend_from_slice(event.src.id.as_bytes());
    let owner = partition_of(key, partitions.max(1) as u32) as i32;
    if owner == consumed_from {
        Route::Here
    } else {
        Route::To(owner)
    }
}

/// The copy of `msg` that goes to partition `to` of the routed topic.
pub(super) fn copy(msg: &BorrowedMessage<'_>, to: i32) -> Copy {
    let (partition, offset) = (msg.partition().to_string(), msg.offset().to_string());
    let origin = [
        (HEADER_FORWARDED_PARTITION, partition.as_str()),
        (HEADER_FORWARDED_OFFSET, offset.as_str()),
    ];
    let ts = msg.timestamp().to_millis().filter(|&t| t >= 0);
    Copy::of(msg, CopyTo::Routed(to), &origin).with_timestamp(ts)
}

/// The engagements partition and offset a message of the routed topic was forwarded from
/// (`None` for a record without both headers, which nothing of ours writes).
pub(super) fn origin(msg: &BorrowedMessage<'_>) -> Option<(i32, i64)> {
    let headers = msg.headers()?;
    // The last occurrence counts: a record forwarded before may carry older ones.
    let value = |name: &str| -> Option<String> {
        headers
            .iter()
            .filter(|h: &Header<'_, &[u8]>| h.key == name)
            .last()
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let partition = value(HEADER_FORWARDED_PARTITION)?.parse().ok()?;
    let offset = value(HEADER_FORWARDED_OFFSET)?.parse().ok()?;
    Some((partition, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::schema::{EventOp, NodeKey};

    fn event(op: EventOp, src: &str) -> Event {
        let schema = Config::from_toml("").unwrap().schema();
        let user = schema.type_id("user").unwrap();
        Event {
            op,
            src: NodeKey {
                node_type: user,
                id: src.into(),
            },
            rel: schema.rel_id("follows").unwrap(),
            dst: NodeKey {
                node_type: user,
                id: "7".into(),
            },
            ts: 1,
            weight: 1.0,
            event_id: None,
        }
    }

    #[test]
    fn an_event_belongs_to_the_partition_of_its_source_key_an_erasure_to_its_nodes() {
        let schema = Config::from_toml("").unwrap().schema();
        let route = |e: &Event, from, n| route(&schema, e, from, n, &mut Vec::new());
        // Kafka's default partitioner on the key, as every producer computes it
        // (src/partition.rs checks it against Kafka's own vectors).
        let owner8 = partition_of(b"user:42", 8) as i32;
        let owner3 = partition_of(b"user:42", 3) as i32;
        let add = event(EventOp::Add, "42");
        assert_eq!(route(&add, owner8, 8), Route::Here);
        assert_eq!(route(&add, (owner8 + 1) % 8, 8), Route::To(owner8));
        assert_eq!(route(&add, (owner3 + 2) % 3, 3), Route::To(owner3));
        let delete = event(EventOp::Delete, "42");
        assert_eq!(route(&delete, (owner8 + 5) % 8, 8), Route::To(owner8));
        let erase = event(EventOp::Erase, "42");
        assert_eq!(route(&erase, owner8, 8), Route::Here);
        assert_eq!(route(&erase, (owner8 + 3) % 8, 8), Route::To(owner8));
        assert_eq!(route(&add, 0, 1), Route::Here);
    }
}
