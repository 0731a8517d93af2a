//! Exchange: the gradients of rows another instance owns, sent to their owner through Kafka.
//!
//! With several instances each trains the edges whose source it owns, and those edges touch
//! rows of every partition (their targets, the negatives). The gradient of a row owned elsewhere
//! is applied locally, so the next steps see it, and summed per node over the publication's
//! window; the window goes out in the version's transaction, one record per partition and chunk
//! of the gradients topic (`kafka.gradients_topic`, `topics/README.md`); the owner reads its
//! partitions, applies each whole window part once with its own Adagrad state, and keeps where
//! it read and what it applied in its checkpoint, and says in its version markers which windows
//! of each sender its rows include. The local copies of rows owned elsewhere become the owner's
//! published rows, as the remote cache applies them, plus this instance's learning on them that
//! those rows do not include yet.
//!
//! Owns the record format ([`GradientChunk`]), window assembly ([`WindowAssembler`]: pure), the
//! queues between the follower thread, the remote cache and the trainer ([`GradientInbox`]), and
//! the follower thread ([`start_gradients_follower`]). Takes the group's ownership; hands window
//! parts and refreshed rows to the trainer, and counters to `/v1/status`.

mod follower;
mod inbox;
mod window;
mod wire;

pub use follower::{start_gradients_follower, ExchangeError};
pub use inbox::{
    sender_id, ChangedRow, ChangedRows, ExchangeFigures, ExchangePosition, GradientInbox,
    RefreshedRow,
};
pub use window::{WindowAssembler, WindowPart};
pub use wire::{
    window_chunks, GradientChunk, GradientDecodeError, GradientsApplied, KeyedGradient,
    WindowAttempt, WindowId, CHUNK_ROWS, GRADIENTS_FORMAT, GRADIENTS_FORMAT_1,
};
