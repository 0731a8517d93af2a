//! The store's key layout (see the table in the module docs of [`crate::store`]): one byte of
//! prefix, then big-endian fields, so sled's order is the order scans need.

use crate::schema::{RelId, TypeId};
use crate::store::NodeRef;

pub(super) fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

pub(super) fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// The key of a chunk of node ids whose first node is `node`.
pub(super) fn node_chunk_key(node: NodeRef) -> [u8; 7] {
    let mut k = [b'I', 0, 0, 0, 0, 0, 0];
    k[1..3].copy_from_slice(&node.node_type.to_be_bytes());
    k[3..7].copy_from_slice(&node.index.to_be_bytes());
    k
}

pub(super) fn node_count_key(node_type: TypeId) -> [u8; 3] {
    let t = node_type.to_be_bytes();
    [b'C', t[0], t[1]]
}

pub(super) fn rel_count_key(rel: RelId) -> [u8; 3] {
    let r = rel.to_be_bytes();
    [b'R', r[0], r[1]]
}

pub(super) fn edge_key(seq: u64) -> [u8; 9] {
    let mut k = [b'E', 0, 0, 0, 0, 0, 0, 0, 0];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn delete_chunk_key(chunk: u64) -> [u8; 9] {
    let mut k = [b'D', 0, 0, 0, 0, 0, 0, 0, 0];
    k[1..].copy_from_slice(&chunk.to_be_bytes());
    k
}

pub(super) fn erase_chunk_key(chunk: u64) -> [u8; 9] {
    let mut k = [b'Z', 0, 0, 0, 0, 0, 0, 0, 0];
    k[1..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// A node as 6 bytes (type u16, index u32), as erasure chunks hold it.
pub(super) fn encode_node(node: NodeRef) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[0..2].copy_from_slice(&node.node_type.to_be_bytes());
    b[2..6].copy_from_slice(&node.index.to_be_bytes());
    b
}

pub(super) fn decode_node(b: &[u8]) -> Option<NodeRef> {
    Some(NodeRef {
        node_type: u16::from_be_bytes(b.get(0..2)?.try_into().ok()?),
        index: be_u32(b.get(2..6)?)?,
    })
}

pub(super) fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    partition_key(b'O', topic, partition)
}

pub(super) fn record_print_key(topic: &str, partition: i32) -> Vec<u8> {
    partition_key(b'P', topic, partition)
}

/// The key of `topic`'s `partition`'s position in `source`, the partition its events were
/// forwarded from.
pub(super) fn upstream_key(topic: &str, partition: i32, source: i32) -> Vec<u8> {
    let mut k = partition_key(b'U', topic, partition);
    k.extend_from_slice(&source.to_be_bytes());
    k
}

fn partition_key(prefix: u8, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 6);
    k.push(prefix);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn dedup_expiry_key(max_ts: u64, first_seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = b'Y';
    k[1..9].copy_from_slice(&max_ts.to_be_bytes());
    k[9..17].copy_from_slice(&first_seq.to_be_bytes());
    k
}

pub(super) fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(b'M');
    k.extend_from_slice(name.as_bytes());
    k
}
