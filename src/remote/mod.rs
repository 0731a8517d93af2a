//! Remote: the rows other instances own, read from the published state.
//!
//! With several instances in one consumer group each owns some partitions and publishes only
//! their rows (`topics/README.md`, contract 3). To answer `/v1/embeddings` for any node, an
//! instance follows the partitions of the embeddings topic it does not own as a subscriber does:
//! one [`crate::subscriber::VersionAssembler`] per partition, fed that partition's records and
//! markers, so the cache only ever holds whole versions of each owner. Following a partition
//! starts by reading it from its beginning (on a compacted topic: each key's newest record) and
//! catching up; it stops when the partition is assigned to this instance (it then serves its
//! own rows) or when the cache's bound (`remote.max_rows`) is reached.
//!
//! Owns the cache ([`RemoteCache`]: pure, shared with HTTP) and its follower thread
//! ([`start_follower`]: the Kafka reads, acting on the group's ownership once it settles).
//! Takes the ownership the ingest stage keeps and the published topics; hands rows and their
//! staleness to serving (`/v1/embeddings`, `/v1/status`, `/metrics`).

mod cache;
mod follower;

pub use cache::{ApplyDelays, RemoteCache, RemoteFigures, RemotePartition, RemoteRow, TopicRead};
pub use follower::{start_follower, FollowerError};
