//! Whole windows out of the gradients topic's chunks, read without read_committed (the test
//! broker shows aborted records): a window's part for a partition is handed on once all its
//! chunks arrived, as a version is applied once its marker's rows all arrived.

use std::collections::BTreeMap;

use crate::exchange::{GradientChunk, KeyedGradient, WindowId};

/// One window's rows for one partition, complete.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowPart {
    pub id: WindowId,
    pub partition: i32,
    pub rows: Vec<KeyedGradient>,
    /// Where a reader of the partition goes back to so that no window it has not handed on yet
    /// is missed: the first offset of the oldest incomplete window, else past this chunk.
    pub resume_at: i64,
}

#[derive(Debug)]
struct Pending {
    chunks: u32,
    got: BTreeMap<u32, Vec<KeyedGradient>>,
    first_offset: i64,
}

/// Collects chunks per (partition, window) until a window's part is whole.
#[derive(Debug, Default)]
pub struct WindowAssembler {
    pending: BTreeMap<(i32, WindowId), Pending>,
}

impl WindowAssembler {
    /// Take the chunk read at `offset` of its partition; the window part it completes, if any.
    /// A chunk read twice (a retried attempt re-sends its earlier windows) counts once. Since a
    /// sender produces a partition's windows in order, a window's completion ends the sender's
    /// older incomplete windows there: what is left of an aborted attempt that the retry did
    /// not repeat.
    pub fn feed(&mut self, chunk: GradientChunk, offset: i64) -> Option<WindowPart> {
        let q = chunk.partition;
        let key = (q, chunk.window.clone());
        let pending = self.pending.entry(key.clone()).or_insert(Pending {
            chunks: chunk.chunks,
            got: BTreeMap::new(),
            first_offset: offset,
        });
        pending.first_offset = pending.first_offset.min(offset);
        if chunk.chunk < pending.chunks {
            pending.got.insert(chunk.chunk, chunk.rows);
        }
        if (pending.got.len() as u32) < pending.chunks {
            return None;
        }
        let done = self.pending.remove(&key).expect("present");
        let id = key.1;
        self.pending.retain(|(p, other), _| {
            *p != q
                || other.sender != id.sender
                || (other.version, other.epoch) > (id.version, id.epoch)
        });
        let resume_at = (self.pending.iter())
            .filter(|((p, _), _)| *p == q)
            .map(|(_, w)| w.first_offset)
            .min()
            .unwrap_or(offset + 1);
        Some(WindowPart {
            id,
            partition: q,
            rows: done.got.into_values().flatten().collect(),
            resume_at,
        })
    }

    /// Forget what is pending for `partition` (it is read again from an earlier offset, or no
    /// longer owned).
    pub fn forget(&mut self, partition: i32) {
        self.pending.retain(|(p, _), _| *p != partition);
    }

    /// Incomplete window parts held.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::window_chunks;

    fn id(version: u64, epoch: u64) -> WindowId {
        WindowId {
            sender: "b".into(),
            version,
            epoch,
        }
    }

    fn rows(n: usize) -> Vec<KeyedGradient> {
        (0..n)
            .map(|i| KeyedGradient {
                key: format!("tweet:{i}"),
                steps: 1,
                grad: vec![i as f32],
                bias: None,
                start: None,
            })
            .collect()
    }

    #[test]
    fn a_part_is_handed_on_whole_once_and_an_aborted_attempts_rest_is_dropped() {
        // One partition, 2,500 rows: three chunks.
        let chunks = window_chunks(&id(5, 0), rows(2500), 1);
        assert_eq!(chunks.len(), 3);
        let mut asm = WindowAssembler::default();
        // An aborted attempt (5, 0) left its first chunk only; the retry (5, 1) re-sends the
        // window, then its own.
        assert_eq!(asm.feed(chunks[0].clone(), 10), None);
        // An older window of the sender completes meanwhile; the newer one stays open.
        let older = window_chunks(&id(4, 3), rows(2), 1);
        assert_eq!(
            asm.feed(older[0].clone(), 11).map(|p| p.resume_at),
            Some(10)
        );
        assert_eq!(asm.feed(chunks[0].clone(), 12), None, "a chunk read twice");
        assert_eq!(asm.feed(chunks[1].clone(), 13), None);
        let part = asm.feed(chunks[2].clone(), 14).expect("whole");
        assert_eq!(part.rows, rows(2500));
        assert_eq!(part.resume_at, 15);
        // An older incomplete window of the sender is ended by a newer one's completion.
        let old = window_chunks(&id(3, 0), rows(2000), 1);
        asm.feed(old[0].clone(), 20);
        assert_eq!(asm.pending(), 1);
        let newer = window_chunks(&id(6, 0), rows(1), 1);
        let part = asm.feed(newer[0].clone(), 21).unwrap();
        assert_eq!(asm.pending(), 0);
        assert_eq!(part.resume_at, 22);
    }

    #[test]
    fn resume_at_stays_at_the_oldest_incomplete_window_of_the_partition() {
        let mut asm = WindowAssembler::default();
        let slow = window_chunks(
            &WindowId {
                sender: "a".into(),
                version: 1,
                epoch: 0,
            },
            rows(1500),
            1,
        );
        asm.feed(slow[0].clone(), 100);
        let quick = window_chunks(&id(9, 0), rows(3), 1);
        let part = asm.feed(quick[0].clone(), 101).unwrap();
        assert_eq!(part.resume_at, 100, "sender a's window is still open");
        let done = asm.feed(slow[1].clone(), 102).unwrap();
        assert_eq!(done.resume_at, 103);
    }
}
