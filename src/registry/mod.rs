//! A client of the registry API (distribution's `/v2/`), for polling: one manifest `HEAD`
//! per image reference, a `GET` only when the `HEAD` is refused or says nothing, and a
//! `GET` of an index by digest to list its platform manifests. Tokens (`WWW-Authenticate:
//! Bearer` → the realm's token server) and basic auth with the `registries:` credentials.
//!
//! Invariants: every request is bounded in time and its answer in size; a digest taken
//! from a registry is a full `sha256:` digest or it is not taken; an index fetched by
//! digest must hash to that digest; passwords and tokens are never in an error, a log line
//! or a metric; each request is counted in `drover_registry_requests_total{registry,method}`.
//! Registries on a loopback address, and those listed as plain, are spoken to over plain
//! http (as the engine treats loopback registries as insecure); all others over https.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use hyper::Method;
use hyper::body::Bytes;
use tokio::time::Instant;

use crate::outbound::{self, Response};

mod auth;
mod manifest;
mod ratelimit;

pub use auth::{Challenge, TokenAnswer};
pub use manifest::{ACCEPT, accept, digest_of, is_index, platform_digests, valid_digest};
pub use ratelimit::RateLimit;

/// Manifests are small; distribution refuses to store one over 4 MiB.
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;
const TOKEN_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registry {registry}: {source}")]
    Transport {
        registry: String,
        #[source]
        source: outbound::Error,
    },
    #[error("registry {0}: no answer in time")]
    TimedOut(String),
    #[error("registry {0}: not authorized (check registries: credentials)")]
    Unauthorized(String),
    #[error("registry {0}: no such manifest")]
    NotFound(String),
    #[error("registry {0}: rate limited (429)")]
    RateLimited(String),
    #[error("registry {registry}: answered {status}")]
    Status { registry: String, status: u16 },
    #[error("registry {registry}: {reason}")]
    Invalid {
        registry: String,
        reason: &'static str,
    },
}

impl Error {
    /// The `outcome` of `drover_registry_checks_total` this error counts as.
    pub fn outcome(&self) -> &'static str {
        match self {
            Error::RateLimited(_) => "rate_limited",
            Error::Unauthorized(_) => "unauthorized",
            Error::NotFound(_) => "not_found",
            _ => "failed",
        }
    }
}

/// What a registry says a tag points at now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The digest of what the tag points at (the index's, for a multi-platform image).
    pub digest: String,
    /// Whether that is an index (or a Docker manifest list).
    pub index: bool,
    /// The platform manifests, when the answer was a `GET` of an index (a `HEAD` has no
    /// body: see [`Client::platforms`]).
    pub platforms: Option<Vec<String>>,
    /// What the registry said is left of its rate limit, if it said.
    pub rate: Option<RateLimit>,
    /// Requests this took (manifest requests only; token requests go elsewhere).
    pub requests: u32,
}

/// A login for one registry, from `registries:`.
#[derive(Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Talks to registries; one per poller, holding tokens between checks.
pub struct Client {
    logins: HashMap<String, Login>,
    plain: Vec<String>,
    timeout: Duration,
    /// `Authorization` values by (registry, repository), with when they stop being good.
    auth: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl Client {
    /// `logins` by normalised registry host; `plain`: further hosts spoken to over http.
    pub fn new(logins: HashMap<String, Login>, plain: Vec<String>, timeout: Duration) -> Client {
        Client {
            logins,
            plain,
            timeout,
            auth: Mutex::default(),
        }
    }

    /// Where `registry`'s API is: Docker Hub's API host for `docker.io`.
    fn base(&self, registry: &str) -> String {
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if is_loopback(registry) || self.plain.iter().any(|p| p == registry) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }

    /// What `registry/repo:tag` points at: a `HEAD` with every manifest type accepted;
    /// a `GET` when the `HEAD` is refused (405, 501) or answers without a digest.
    pub async fn head(&self, registry: &str, repo: &str, tag: &str) -> Result<Manifest, Error> {
        let r = self.manifest(Method::HEAD, registry, repo, tag).await?;
        let rate = rate_of(&r);
        match r.status {
            200 => {
                if let Some(digest) = r
                    .header("docker-content-digest")
                    .filter(|d| valid_digest(d))
                {
                    return Ok(Manifest {
                        digest: digest.to_owned(),
                        index: r.header("content-type").is_some_and(is_index),
                        platforms: None,
                        rate,
                        requests: 1,
                    });
                }
            }
            405 | 501 => {}
            s => return Err(status_error(registry, s)),
        }
        let r = self.manifest(Method::GET, registry, repo, tag).await?;
        if r.status != 200 {
            return Err(status_error(registry, r.status));
        }
        if !r.complete {
            return Err(invalid(registry, "manifest too large"));
        }
        let digest = match r
            .header("docker-content-digest")
            .filter(|d| valid_digest(d))
        {
            Some(d) => d.to_owned(),
            None => digest_of(&r.body),
        };
        let platforms = platform_digests(&r.body);
        Ok(Manifest {
            digest,
            index: platforms.is_some(),
            platforms,
            rate: rate_of(&r).or(rate),
            requests: 2,
        })
    }

    /// The platform manifests the index `digest` lists (one `GET`, checked against the digest).
    pub async fn platforms(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
    ) -> Result<Vec<String>, Error> {
        if !valid_digest(digest) {
            return Err(invalid(registry, "not a sha256 digest"));
        }
        let r = self.manifest(Method::GET, registry, repo, digest).await?;
        if r.status != 200 {
            return Err(status_error(registry, r.status));
        }
        if !r.complete || digest_of(&r.body) != digest {
            return Err(invalid(registry, "index does not match its digest"));
        }
        platform_digests(&r.body).ok_or_else(|| invalid(registry, "not an index"))
    }

    /// One manifest request, answering one `401` challenge and asking again.
    async fn manifest(
        &self,
        method: Method,
        registry: &str,
        repo: &str,
        reference: &str,
    ) -> Result<Response, Error> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base(registry));
        let key = (registry.to_owned(), repo.to_owned());
        let mut authorization = self.cached(&key);
        for first in [true, false] {
            let mut headers = vec![("accept", accept()), ("user-agent", user_agent())];
            if let Some(a) = &authorization {
                headers.push(("authorization", a.clone()));
            }
            let r = self
                .send(method.clone(), registry, &url, &headers, MANIFEST_LIMIT)
                .await?;
            crate::metrics::get()
                .registry_requests
                .with_label_values(&[registry, method.as_str()])
                .inc();
            if r.status != 401 || !first {
                return Ok(r);
            }
            let challenge = r
                .header("www-authenticate")
                .and_then(Challenge::parse)
                .ok_or_else(|| Error::Unauthorized(registry.to_owned()))?;
            let (value, lasts) = self.authorize(challenge, registry, repo).await?;
            if let Ok(mut cache) = self.auth.lock() {
                cache.insert(key.clone(), (value.clone(), Instant::now() + lasts));
            }
            authorization = Some(value);
        }
        Err(Error::Unauthorized(registry.to_owned()))
    }

    fn cached(&self, key: &(String, String)) -> Option<String> {
        let mut cache = self.auth.lock().ok()?;
        let now = Instant::now();
        cache.retain(|_, (_, until)| *until > now);
        cache.get(key).map(|(v, _)| v.clone())
    }

    /// The `Authorization` value a challenge asks for, and how long it is good for.
    async fn authorize(
        &self,
        challenge: Challenge,
        registry: &str,
        repo: &str,
    ) -> Result<(String, Duration), Error> {
        let login = self.logins.get(registry);
        let basic = login.map(|l| {
            let pair = format!("{}:{}", l.username, l.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        match challenge {
            Challenge::Basic => basic
                .map(|b| (b, Duration::from_secs(3600)))
                .ok_or_else(|| Error::Unauthorized(registry.to_owned())),
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let mut url = realm.clone();
                url.push(if realm.contains('?') { '&' } else { '?' });
                if let Some(s) = service {
                    url.push_str(&format!("service={}&", encode(&s)));
                }
                url.push_str(&format!("scope={}", encode(&scope)));
                let mut headers = vec![("user-agent", user_agent())];
                // A password goes to a token server over https, or over http only when
                // the registry itself is plain (a lab's own registry and its auth server).
                let safe =
                    realm.starts_with("https://") || self.base(registry).starts_with("http://");
                if let (Some(b), true) = (basic, safe) {
                    headers.push(("authorization", b));
                }
                let r = self
                    .send(Method::GET, registry, &url, &headers, TOKEN_LIMIT)
                    .await?;
                if r.status == 401 || r.status == 403 {
                    return Err(Error::Unauthorized(registry.to_owned()));
                }
                if r.status != 200 {
                    return Err(status_error(registry, r.status));
                }
                let (token, secs) = TokenAnswer::parse(&r.body)
                    .ok_or_else(|| invalid(registry, "token server answered no token"))?;
                // Renewed a little early, so a token never expires between cache and use.
                let lasts = Duration::from_secs(secs).mul_f64(0.9);
                Ok((format!("Bearer {token}"), lasts))
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        registry: &str,
        url: &str,
        headers: &[(&str, String)],
        limit: usize,
    ) -> Result<Response, Error> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| invalid(registry, "not a valid URL"))?;
        let sent = outbound::send(method, &uri, headers, Bytes::new(), limit);
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(source)) => Err(Error::Transport {
                registry: registry.to_owned(),
                source,
            }),
            Err(_) => Err(Error::TimedOut(registry.to_owned())),
        }
    }
}

fn user_agent() -> String {
    format!("drover/{}", env!("CARGO_PKG_VERSION"))
}

fn rate_of(r: &Response) -> Option<RateLimit> {
    r.header("ratelimit-remaining").and_then(RateLimit::parse)
}

fn status_error(registry: &str, status: u16) -> Error {
    let registry = registry.to_owned();
    match status {
        401 | 403 => Error::Unauthorized(registry),
        404 => Error::NotFound(registry),
        429 => Error::RateLimited(registry),
        status => Error::Status { registry, status },
    }
}

fn invalid(registry: &str, reason: &'static str) -> Error {
    Error::Invalid {
        registry: registry.to_owned(),
        reason,
    }
}

/// A host the engine would reach without TLS: `localhost` or a loopback address.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Percent-encoding of a query value: unreserved characters as they are, the rest `%XX`.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http_and_others_https_with_hub_at_its_api_host() {
        let c = Client::new(
            HashMap::new(),
            vec!["lab.internal:5000".into()],
            Duration::from_secs(1),
        );
        assert_eq!(c.base("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(c.base("localhost:5000"), "http://localhost:5000");
        assert_eq!(c.base("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(c.base("lab.internal:5000"), "http://lab.internal:5000");
        assert_eq!(c.base("ghcr.io"), "https://ghcr.io");
        assert_eq!(c.base("docker.io"), "https://registry-1.docker.io");
        assert_eq!(c.base("127.example.com"), "https://127.example.com");
    }

    #[test]
    fn a_scope_is_percent_encoded_for_the_token_query() {
        assert_eq!(
            encode("repository:library/nginx:pull"),
            "repository%3Alibrary%2Fnginx%3Apull"
        );
        assert_eq!(encode("registry.docker.io"), "registry.docker.io");
    }

    #[test]
    fn a_login_never_shows_its_password() {
        let l = Login {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{l:?}").contains("hunter2"));
    }
}
