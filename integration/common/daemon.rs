//! The `twhin-stream` binary as a child process: its environment, start, restart, kill, and its
//! HTTP status.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Environment for every `twhin-stream` child: the broker, the store, fast group joins.
pub fn daemon_env(bootstrap: &str, store: &Path, http_port: u16) -> Vec<(String, String)> {
    vec![
        ("TWHIN_KAFKA__BOOTSTRAP_SERVERS".into(), bootstrap.into()),
        // Checkpoints and the publish ledger follow: `<store>/checkpoints`, `<store>/publish`.
        ("TWHIN_STORAGE__PATH".into(), store.display().to_string()),
        ("TWHIN_HTTP__BIND".into(), format!("127.0.0.1:{http_port}")),
        (
            "TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS".into(),
            "6000".into(),
        ),
        (
            "TWHIN_KAFKA__CONSUMER__STATISTICS_INTERVAL_MS".into(),
            "1000".into(),
        ),
        ("TWHIN_INGEST__BATCH_MAX_WAIT_MS".into(), "100".into()),
        (
            "TWHIN_LOG__LEVEL".into(),
            "info,librdkafka=warn,rdkafka=warn".into(),
        ),
    ]
}

/// A broker and the environment of a daemon that publishes: its store under `dir`, embeddings
/// of `dim`, a version every `interval_secs`, then `extra`; the topics are created.
pub struct Publishing {
    pub broker: Broker,
    pub store: PathBuf,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

pub fn publishing(
    dir: &Path,
    dim: usize,
    interval_secs: u64,
    extra: &[(&str, &str)],
) -> Publishing {
    publishing_on(Broker::start(dir), dir, dim, interval_secs, extra)
}

/// [`publishing`] on `broker`.
pub fn publishing_on(
    broker: Broker,
    dir: &Path,
    dim: usize,
    interval_secs: u64,
    extra: &[(&str, &str)],
) -> Publishing {
    let store = dir.join("store");
    let port = free_port();
    let mut env = daemon_env(&broker.bootstrap, &store, port);
    env.push(("TWHIN_TRAIN__DIM".into(), dim.to_string()));
    env.push((
        "TWHIN_PUBLISH__INTERVAL_SECS".into(),
        interval_secs.to_string(),
    ));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    cli(&env, &["topics", "apply"]);
    Publishing {
        broker,
        store,
        port,
        env,
    }
}

/// Run the binary to completion (e.g. `topics apply`), returning stdout; panics on failure.
pub fn cli(env: &[(String, String)], args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_twhin-stream"))
        .current_dir(repo_root())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "twhin-stream {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The daemon as a child process.
pub struct Daemon {
    child: Option<Child>,
    /// Where its HTTP server is reached: 127.0.0.1 unless it runs in a network namespace.
    pub http_host: String,
    pub http_port: u16,
    /// A command it runs under (`ip netns exec NAME`), or none.
    prefix: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    pub fn start(env: Vec<(String, String)>, http_port: u16, log_dir: &Path) -> Daemon {
        Daemon::start_under(env, ("127.0.0.1", http_port), Vec::new(), log_dir)
    }

    /// Start it under `prefix` (a command that runs it: `ip netns exec NAME`), its HTTP server
    /// reached at `http`.
    pub fn start_under(
        env: Vec<(String, String)>,
        (http_host, http_port): (&str, u16),
        prefix: Vec<String>,
        log_dir: &Path,
    ) -> Daemon {
        let mut d = Daemon {
            child: None,
            http_host: http_host.to_owned(),
            http_port,
            prefix,
            env,
            log: log_dir.join("daemon.log"),
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== start {} =====", self.starts).unwrap();
        let bin = env!("CARGO_BIN_EXE_twhin-stream");
        let mut command = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = command
            .current_dir(repo_root())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("run")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let (host, port) = (self.http_host.clone(), self.http_port);
        wait_until("the daemon's HTTP server", Duration::from_secs(30), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early: {status}\n{}", self.log_tail());
            }
            http_get_at(&host, port, "/healthz").ok()
        });
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running daemon");
        self.spawn();
    }

    /// The running daemon's process id (to signal it: `kill -STOP`, `kill -CONT`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM for 60 s\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let body = http_get_at(&self.http_host, self.http_port, "/v1/status").ok()?;
        serde_json::from_str(&body).ok()
    }

    pub fn metrics(&self) -> String {
        http_get_at(&self.http_host, self.http_port, "/metrics").unwrap()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log, 60)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- daemon log tail ----\n{}", self.log_tail());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Minimal HTTP/1.0 GET on 127.0.0.1 (keeps an HTTP client out of the dependencies).
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    http_get_at("127.0.0.1", port, path)
}

/// [`http_get`] at `host`.
pub fn http_get_at(host: &str, port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!("{path}: {head}")));
    }
    Ok(body.to_owned())
}

/// The served row of `node` (`type:id`): its version and vector.
pub fn served_row(port: u16, node: &str) -> (u64, Vec<f32>) {
    served_row_at("127.0.0.1", port, node)
}

/// [`served_row`] at `host`.
pub fn served_row_at(host: &str, port: u16, node: &str) -> (u64, Vec<f32>) {
    let (t, id) = node.split_once(':').unwrap();
    let body = http_get_at(host, port, &format!("/v1/embeddings/{t}/{id}"))
        .unwrap_or_else(|e| panic!("GET embeddings of {node}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let vector = v["vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (status_u64(&v, "/version"), vector)
}

/// Another instance of the deployment `env` describes, started: the same group and topics, its
/// own store under `dir` and its own HTTP port (returned).
pub fn start_another_instance(env: &[(String, String)], dir: &Path) -> (Daemon, u16) {
    start_another_instance_in(env, dir, None)
}

/// [`start_another_instance`], in network namespace `netns` when given (its HTTP server on the
/// namespace's address).
pub fn start_another_instance_in(
    env: &[(String, String)],
    dir: &Path,
    netns: Option<&Netns>,
) -> (Daemon, u16) {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let mut env: Vec<(String, String)> = (env.iter())
        .filter(|(k, _)| k != "TWHIN_STORAGE__PATH" && k != "TWHIN_HTTP__BIND")
        .cloned()
        .collect();
    env.push((
        "TWHIN_STORAGE__PATH".into(),
        dir.join("store").display().to_string(),
    ));
    let (host, prefix) = match netns {
        Some(ns) => (ns.ns_ip.as_str(), ns.exec_prefix()),
        None => ("127.0.0.1", Vec::new()),
    };
    env.push(("TWHIN_HTTP__BIND".into(), format!("{host}:{port}")));
    (Daemon::start_under(env, (host, port), prefix, dir), port)
}

/// The partitions a daemon's last version covered (`/v1/status` `publish.partitions`; none
/// before its first version, or without a status).
pub fn published_partitions(status: Option<&serde_json::Value>) -> Vec<i32> {
    (status.and_then(|st| st.pointer("/publish/partitions")?.as_array()))
        .map_or_else(Vec::new, |ps| {
            ps.iter().filter_map(|p| Some(p.as_i64()? as i32)).collect()
        })
}

/// Read a number from the status document by JSON pointer. A missing field, or one that is not
/// a whole number, fails the test: a renamed field must not read as 0.
pub fn status_u64(status: &serde_json::Value, pointer: &str) -> u64 {
    match status.pointer(pointer) {
        Some(v) => v
            .as_u64()
            .unwrap_or_else(|| panic!("status {pointer} is {v}, not a whole number")),
        None => panic!("status has no {pointer}: {status}"),
    }
}

/// The last version the ledger (`<store>/publish/ledger.json`) records as committed: it is
/// written once the version's marker is acknowledged.
pub fn ledger_last_version(store: &Path) -> u64 {
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("publish/ledger.json")).unwrap()).unwrap();
    status_u64(&ledger, "/last_version")
}
