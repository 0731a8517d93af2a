//! Harness for the broker integration tests, by concern: [`broker`] (a real Kafka-protocol
//! broker, tansu, on 127.0.0.1), [`daemon`] (the `twhin-stream` binary as a child process, its
//! environment, `/v1/status`), [`events`] (events produced, dead letters and published versions
//! read back, the store's contents).
//!
//! The broker binary is found at `$TANSU_BIN` or `.cache/bin/tansu` (installed by `.ci/setup`).
//! A missing broker fails the test with instructions; it is never a skip.

#![allow(dead_code)]

pub mod broker;
pub mod daemon;
pub mod events;
pub mod netns;

pub use broker::*;
pub use daemon::*;
pub use events::*;
pub use netns::*;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

/// The scenarios start brokers and daemons and measure nothing, but they share two cores: run
/// them one at a time whatever `--test-threads` says.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid} failed");
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
