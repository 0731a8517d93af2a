//! The store's key layout (see the table in the module docs of [`crate::store`]): one byte of
//! prefix, then big-endian fields, so sled's order is the order scans need.

use crate::schema::{RelId, TypeId};
use crate::store::{Direction, NodeRef};

pub(super) fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

pub(super) fn be_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

pub(super) fn node_key(node_type: TypeId, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + id.len());
    k.push(b'N');
    k.extend_from_slice(&node_type.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn reverse_key(node: NodeRef) -> [u8; 7] {
    let mut k = [b'I', 0, 0, 0, 0, 0, 0];
    k[1..3].copy_from_slice(&node.node_type.to_be_bytes());
    k[3..7].copy_from_slice(&node.index.to_be_bytes());
    k
}

pub(super) fn node_bytes(node: NodeRef) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[0..2].copy_from_slice(&node.node_type.to_be_bytes());
    b[2..6].copy_from_slice(&node.index.to_be_bytes());
    b
}

pub(super) fn count_key(node_type: TypeId) -> [u8; 3] {
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

/// Bytes of one adjacency entry: seq u64, other end type u16 and index u32.
pub(super) const ADJACENCY_ENTRY_BYTES: usize = 14;

pub(super) fn adjacency_key(node: NodeRef, rel: RelId, dir: Direction, first_seq: u64) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = b'A';
    k[1..7].copy_from_slice(&node_bytes(node));
    k[7..9].copy_from_slice(&rel.to_be_bytes());
    k[9] = dir as u8;
    k[10..18].copy_from_slice(&first_seq.to_be_bytes());
    k
}

pub(super) fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    partition_key(b'O', topic, partition)
}

pub(super) fn record_print_key(topic: &str, partition: i32) -> Vec<u8> {
    partition_key(b'P', topic, partition)
}

fn partition_key(prefix: u8, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + 6);
    k.push(prefix);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn dedup_key(id: &str) -> Vec<u8> {
    dedup_key_bytes(id.as_bytes())
}

pub(super) fn dedup_key_bytes(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'X');
    k.extend_from_slice(id);
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
