//! `http:`: the public listener (webhooks, `/healthz`, `/readyz`), its limits, and the
//! private operator listener under `http.ops`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, at_field, bounds};
use super::values::Cidr;

/// The public listener (webhooks, `/healthz`, `/readyz`) and its limits. Every limit is
/// there so one hostile client cannot take memory or sockets from the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// Where webhooks, `/healthz` and `/readyz` are served.
    pub listen: SocketAddr,
    /// Largest accepted webhook body; GitHub caps payloads at 25 MB, the ones we act on are small.
    pub max_body: usize,
    /// Bytes of webhook bodies held at once, over all requests (beyond: 503), so a crowd
    /// of stalled large bodies cannot take more memory than this. At least `max_body`.
    /// Bytes are taken as they arrive, not as `Content-Length` promises, and one source
    /// holds at most a quarter of it (or `max_body`, if larger).
    pub body_budget: usize,
    /// Bytes per second a body must average once it has had a 2 s start (beyond: 408), so
    /// a trickled body frees its share of `body_budget` long before `request_timeout`.
    pub min_body_rate: usize,
    /// A request not answered within this is cut off (408).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection that has not sent a complete request head within this is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections, in all.
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_connections_per_source: usize,
    /// Requests being handled at once, in all (beyond: 503).
    pub max_requests: usize,
    /// Requests being handled at once from one source address (beyond: 503).
    pub max_requests_per_source: usize,
    /// Failed signature or token checks allowed per source address and minute (beyond: 429
    /// before the body is read); a forged flood does not spend a hook's own `rate`.
    pub auth_failures_per_minute: u32,
    /// Peers whose `X-Forwarded-For` names a webhook's source (its right-most address
    /// that is not itself a trusted proxy). Unset: the addresses of the containers the
    /// targets' check and notify steps reach (nginx), as the last snapshot saw them; `[]`
    /// trusts no one.
    pub trusted_proxies: Option<Vec<Cidr>>,
    /// The operator endpoints: status page, `/jobs`, `/metrics`.
    pub ops: Ops,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            max_body: 1024 * 1024,
            body_budget: 8 * 1024 * 1024,
            min_body_rate: 4096,
            request_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_connections_per_source: 32,
            max_requests: 64,
            max_requests_per_source: 16,
            auth_failures_per_minute: 30,
            trusted_proxies: None,
            ops: Ops::default(),
        }
    }
}

/// The private listener of the operator endpoints. Loopback by default: what jobs ran and
/// how they ended is nobody else's business. Bind it elsewhere (for Prometheus on an
/// overlay network) only with `token_file`, or behind a network you trust.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ops {
    /// Where the status page, `/jobs` and `/metrics` are served.
    pub listen: SocketAddr,
    /// When set, every operator request needs `Authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
}

impl Default for Ops {
    fn default() -> Self {
        Ops {
            listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            token_file: None,
        }
    }
}

impl Http {
    /// The sizes and durations `run` relies on, within their bounds.
    pub(super) fn check_bounds(&self) -> Result<(), Problem> {
        use bounds::*;
        size("http.max_body", self.max_body, 1, MAX_BODY).map_err(at_field("max_body"))?;
        duration(
            "http.request_timeout",
            self.request_timeout,
            REQUEST_TIMEOUT.0,
            REQUEST_TIMEOUT.1,
        )
        .map_err(at_field("request_timeout"))
    }

    /// The listeners apart, and every limit one that lets something through.
    pub(super) fn validate(&self) -> Result<(), Problem> {
        if self.ops.listen == self.listen && self.listen.port() != 0 {
            return Err(Problem::new(
                "http.ops.listen must differ from http.listen",
                "listen:",
            ));
        }
        if self.body_budget < self.max_body {
            return Err(Problem::new(
                "http.body_budget must be at least http.max_body",
                "body_budget:",
            ));
        }
        let zero = [
            ("max_body", self.max_body),
            ("min_body_rate", self.min_body_rate),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
            ),
            ("max_requests", self.max_requests),
            ("max_requests_per_source", self.max_requests_per_source),
            (
                "auth_failures_per_minute",
                self.auth_failures_per_minute as usize,
            ),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(Problem::new(
                format!("http.{name} must be at least 1"),
                format!("{name}:"),
            ));
        }
        for (name, d) in [
            ("request_timeout", self.request_timeout),
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err(Problem::new(
                    format!("http.{name} must be between 1ms and 1h"),
                    format!("{name}:"),
                ));
            }
        }
        Ok(())
    }
}
