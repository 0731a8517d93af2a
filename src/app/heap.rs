//! Handing freed heap memory back to the operating system.
//!
//! A version that carries many rows allocates its encoded records, a copy of the changed rows and
//! a new serving table, and frees them once it is committed; glibc keeps most of what is freed in
//! its arenas (small records are scattered through them and never reach the top of a heap), so
//! without this the daemon's resident memory settles at its largest version's peak, not at what
//! it holds (on the 1M-node synthetic stream: about 2 GB above the live heap).

use std::time::Instant;

use tracing::debug;

/// Return the free pages of every malloc arena to the OS (glibc's `malloc_trim`); elsewhere a
/// no-op. Walks the arenas (milliseconds at gigabytes), so it runs on the publication's task after
/// a commit, never on the training thread.
pub(super) fn release_freed_memory() {
    let started = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reads and adjusts the allocator's own state, under its locks; it
    // is safe to call from any thread at any time.
    let released = unsafe { libc::malloc_trim(0) } != 0;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let released = false;
    debug!(
        released,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "freed heap memory returned to the OS"
    );
}
