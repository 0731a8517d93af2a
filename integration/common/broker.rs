//! A real Kafka-protocol broker (tansu) for one test, on 127.0.0.1.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::*;

/// A tansu broker with in-memory storage on a free loopback port.
pub struct Broker {
    child: Child,
    pub bootstrap: String,
    log: PathBuf,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_on(dir, free_port())
    }

    /// A broker on every address, advertising `host` (an address of this machine that a
    /// network namespace reaches too: [`super::Netns`]).
    pub fn start_reachable_at(dir: &Path, host: &str) -> Broker {
        Broker::start_at(dir, "0.0.0.0", host, free_port())
    }

    /// Replace this broker by an empty one on the same address (a broker lost with its data,
    /// or every topic deleted and recreated).
    pub fn replace_with_empty(&mut self, dir: &Path) {
        let _ = signal_quiet(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port: u16 = self.bootstrap.rsplit(':').next().unwrap().parse().unwrap();
        wait_until(
            "the old broker's port to close",
            Duration::from_secs(20),
            || TcpStream::connect(&self.bootstrap).is_err().then_some(()),
        );
        *self = Broker::start_on(dir, port);
    }

    fn start_on(dir: &Path, port: u16) -> Broker {
        Broker::start_at(dir, "127.0.0.1", "127.0.0.1", port)
    }

    fn start_at(dir: &Path, listen: &str, host: &str, port: u16) -> Broker {
        let bin = std::env::var_os("TANSU_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".cache/bin/tansu"));
        assert!(
            bin.exists(),
            "the test broker is missing: {} (run `bash .ci/setup`, or set TANSU_BIN)",
            bin.display()
        );
        let (url, advertised) = (
            format!("tcp://{listen}:{port}"),
            format!("tcp://{host}:{port}"),
        );
        let log = dir.join("tansu.log");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let bootstrap = format!("{host}:{port}");
        wait_until("the broker to listen", Duration::from_secs(20), || {
            TcpStream::connect(&bootstrap).ok()
        });
        Broker {
            child,
            bootstrap,
            log,
        }
    }

    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = signal_quiet(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_quiet(pid: u32, sig: &str) -> std::io::Result<ExitStatus> {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
}
