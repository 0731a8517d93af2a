//! `[http]` (with `[http.ann]`, the approximate candidate retrieval behind `/v1/neighbors`) and
//! `[log]`: what the daemon serves and how it logs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{invalid, positive, ConfigError, Validate};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: String,
    /// Empty: no authentication. Otherwise every route but `/healthz` requires
    /// `Authorization: Bearer <token>`.
    pub bearer_token: String,
    /// The `host:port` other instances of the deployment reach this one's HTTP server at; each
    /// version marker carries it, so that `/v1/neighbors` can ask the owner of a partition for
    /// its best rows (`POST /v1/candidates`). Empty: `bind`, unless that is an unspecified
    /// address (`0.0.0.0`, `::`) or port 0, and then nothing is advertised (other instances
    /// score this one's partitions from their own copies).
    pub advertise: String,
    /// How long `/v1/neighbors` waits for another owner's candidates before it scores that
    /// owner's partitions from this instance's own copies.
    pub gather_timeout_ms: u64,
    /// `[http.ann]`: the HNSW index per target type that `/v1/neighbors` searches above a size.
    pub ann: AnnConfig,
    /// `[http.multi_interest]`: users as several interests (`train::history::split_history`).
    pub multi_interest: MultiInterestConfig,
}

/// `[http.multi_interest]`: how a user's recent targets are clustered into interests, one query
/// each, candidates merged as a mixture. `stream-eval` measures it beside one embedding;
/// `/v1/neighbors` ranks with it when `enabled` (or a request's `interests=true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiInterestConfig {
    /// `/v1/neighbors` ranks a history-type source as its interests unless a request says
    /// `interests=false` (off: only with `interests=true`).
    #[serde(default)]
    pub enabled: bool,
    /// At most this many interests per user.
    pub max_interests: usize,
    /// One interest per this many recent targets (a shorter history is one interest).
    pub targets_per_interest: usize,
    /// Spherical k-means iterations (it stops earlier once no target moves).
    pub iterations: usize,
}

/// `[http.ann]`: approximate candidate retrieval for `/v1/neighbors` (`crate::serve::ann`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnConfig {
    /// `false`: `/v1/neighbors` is always exact and no index is kept.
    pub enabled: bool,
    /// A target type is searched through its index from this many served rows on; smaller types
    /// (and every request with `exact=true`) are scored exactly.
    pub min_rows: usize,
    /// HNSW links per node (usearch `connectivity`, hnswlib's `M`).
    pub connectivity: usize,
    /// Candidate list size while inserting (`ef_construction`).
    pub expansion_add: usize,
    /// Candidate list size while searching (`ef`); at least the candidates asked for.
    pub expansion_search: usize,
    /// Candidates taken from the index per neighbour asked for; all are re-scored exactly with
    /// the served version and the best `k` returned.
    pub oversample: usize,
    /// Requests searching one index at the same time; more wait for a turn.
    pub search_threads: usize,
    /// Threads that build an index from scratch (updates use one).
    pub build_threads: usize,
    /// How the index stores its copy of the rows: `f32`, or `f16` (half the memory; the
    /// candidates are re-scored with the served f32 rows, so only recall can change).
    pub quantization: AnnQuantization,
    /// A version's changed row is re-inserted only when it moved more than this (relative L2
    /// change) from the copy the index holds; 0: every changed row is.
    pub reindex_threshold: f64,
    /// The nice value of the thread that builds and updates the indexes (0: the daemon's own;
    /// up to 19, the lowest priority).
    pub updater_nice: i32,
}

/// `http.ann.quantization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnQuantization {
    F32,
    F16,
}

/// Written by hand so that logging the config never prints the token.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.bearer_token.is_empty() {
            "(none)"
        } else {
            "(set)"
        };
        f.debug_struct("HttpConfig")
            .field("bind", &self.bind)
            .field("bearer_token", &token)
            .field("advertise", &self.advertise)
            .field("gather_timeout_ms", &self.gather_timeout_ms)
            .field("ann", &self.ann)
            .field("multi_interest", &self.multi_interest)
            .finish()
    }
}

/// Shortest `http.bearer_token` accepted: a short token is guessable over the network.
pub const MIN_BEARER_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl HttpConfig {
    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.bind.parse().map_err(|e| {
            invalid(
                "http.bind",
                format!("{:?} is not host:port: {e}", self.bind),
            )
        })
    }
}

impl HttpConfig {
    /// The address version markers carry (`http.advertise`; see there).
    pub fn advertised(&self) -> Option<String> {
        if !self.advertise.is_empty() {
            return Some(self.advertise.clone());
        }
        let bind = self.bind_addr().ok()?;
        (!bind.ip().is_unspecified() && bind.port() != 0).then(|| bind.to_string())
    }
}

impl Validate for HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        positive("http.gather_timeout_ms", self.gather_timeout_ms)?;
        let advertise = &self.advertise;
        // `host:port`: a name or address, then a port; what a URL's authority holds.
        let well_formed = advertise.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && port.parse::<u16>().is_ok_and(|p| p != 0)
                && !advertise.contains(['/', ' ', '@', '?', '#'])
        });
        if !advertise.is_empty() && !well_formed {
            return Err(invalid(
                "http.advertise",
                format!("{advertise:?} is not host:port (empty: http.bind)"),
            ));
        }
        self.ann.validate()?;
        self.multi_interest.validate()?;
        let token = &self.bearer_token;
        if !token.is_empty() {
            if token.len() < MIN_BEARER_TOKEN_CHARS {
                return Err(invalid(
                    "http.bearer_token",
                    format!("must be empty (no authentication) or at least {MIN_BEARER_TOKEN_CHARS} characters"),
                ));
            }
            // What an `Authorization: Bearer` header can carry as one token.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "http.bearer_token",
                    "must be printable ASCII without spaces",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for AnnConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("http.ann.min_rows", self.min_rows),
            ("http.ann.connectivity", self.connectivity),
            ("http.ann.expansion_add", self.expansion_add),
            ("http.ann.expansion_search", self.expansion_search),
            ("http.ann.oversample", self.oversample),
            ("http.ann.search_threads", self.search_threads),
            ("http.ann.build_threads", self.build_threads),
        ] {
            positive(key, value as u64)?;
        }
        if self.connectivity < 2 {
            return Err(invalid("http.ann.connectivity", "must be at least 2"));
        }
        if !(0..=19).contains(&self.updater_nice) {
            return Err(invalid(
                "http.ann.updater_nice",
                format!("must be 0 to 19, not {}", self.updater_nice),
            ));
        }
        if !(0.0..1.0).contains(&self.reindex_threshold) {
            return Err(invalid(
                "http.ann.reindex_threshold",
                format!("must be in [0, 1), not {}", self.reindex_threshold),
            ));
        }
        Ok(())
    }
}

impl Validate for MultiInterestConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("http.multi_interest.max_interests", self.max_interests),
            (
                "http.multi_interest.targets_per_interest",
                self.targets_per_interest,
            ),
            ("http.multi_interest.iterations", self.iterations),
        ] {
            positive(key, value as u64)?;
        }
        Ok(())
    }
}

impl Validate for LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(
            self.level.to_ascii_lowercase().as_str(),
            "trace" | "debug" | "info" | "warn" | "error"
        ) && tracing_subscriber::EnvFilter::try_new(&self.level).is_err()
        {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a level or filter", self.level),
            ));
        }
        Ok(())
    }
}
