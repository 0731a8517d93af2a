//! `[http]` and `[log]`: what the daemon serves and how it logs.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Validate};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: String,
    /// Empty: no authentication. Otherwise every route but `/healthz` requires
    /// `Authorization: Bearer <token>`.
    pub bearer_token: String,
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

impl Validate for HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
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
