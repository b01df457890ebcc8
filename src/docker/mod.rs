//! The only code that talks to the Docker Engine: one file per Engine API area, all of
//! them methods of one negotiated [`Engine`].
//!
//! Invariants: every call has a deadline ([`Engine::call_timeout`], 30 s by default), except
//! the event stream, which is long-lived by nature, and exec output, which is bounded by
//! the exec's own limit; every failure is a [`Error`] whose [`Kind`] tells callers whether
//! to retry, so no caller ever matches the engine's error text (the one place that must,
//! "update out of sequence", is [`Error::from_status`]); a service spec is only ever
//! changed through [`Engine::edit_service`], which edits the engine's raw JSON so fields
//! bollard's typed models do not know (or spell differently, like `Healthcheck`) survive.
//!
//! bollard does the typed reads and the streams. Answers whose fields bollard's models
//! drop (a task's `NetworksAttachments`) and every spec write go through [`Engine::raw`],
//! a plain HTTP/1 request over the same transport (unix socket, tcp or tcp+TLS from
//! `DOCKER_HOST`/`DOCKER_CERT_PATH`/`DOCKER_TLS_VERIFY`) at the negotiated API version.

mod configs;
mod containers;
mod distribution;
mod networks;
mod services;
mod system;
mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

pub use bollard::auth::DockerCredentials as Credentials;
pub use containers::ExecOutput;
pub use services::{Edit, Edited, ServiceLocks, UpdateStatus};

use bollard::Docker;

/// How long one engine call may take unless the engine was built with another limit.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a failed engine call means for the caller: retry later, give up, or look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The engine is unreachable, restarting or overloaded: worth retrying.
    Transient,
    /// The engine did not answer within the call's deadline.
    Timeout,
    /// The object does not exist (404).
    NotFound,
    /// The object exists already or is in use (409).
    Conflict,
    /// A service update carried a stale version index: read again and retry.
    OutOfSequence,
    /// The request itself is wrong (bad spec, bad TLS setup, unexpected answer): retrying
    /// the same thing gives the same answer.
    Permanent,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot connect to the docker engine at {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{op}: the engine did not answer within {}", humantime::format_duration(*.after))]
    Timeout { op: String, after: Duration },
    #[error("{op}: the engine answered {status}: {message}")]
    Status {
        op: String,
        status: u16,
        message: String,
        kind: Kind,
    },
    #[error("{op}: {reason}")]
    Transport { op: String, reason: String },
    #[error("{op}: {source}")]
    Api {
        op: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{op}: unexpected answer: {reason}")]
    Decode { op: String, reason: String },
    #[error("tls setup: {0}")]
    Tls(String),
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Connect { source, .. } => match source {
                bollard::errors::Error::UnsupportedURISchemeError { .. } => Kind::Permanent,
                _ => Kind::Transient,
            },
            Error::Timeout { .. } => Kind::Timeout,
            Error::Status { kind, .. } => *kind,
            Error::Transport { .. } => Kind::Transient,
            Error::Api { source, .. } => match source {
                bollard::errors::Error::JsonDataError { .. }
                | bollard::errors::Error::JsonSerdeError { .. } => Kind::Permanent,
                _ => Kind::Transient,
            },
            Error::Decode { .. } | Error::Tls(_) => Kind::Permanent,
        }
    }

    /// Worth retrying as is: the engine may be restarting, briefly overloaded or slow.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind(), Kind::Transient | Kind::Timeout)
    }

    pub fn is_not_found(&self) -> bool {
        self.kind() == Kind::NotFound
    }

    pub fn is_conflict(&self) -> bool {
        self.kind() == Kind::Conflict
    }

    pub fn is_out_of_sequence(&self) -> bool {
        self.kind() == Kind::OutOfSequence
    }

    pub fn is_timeout(&self) -> bool {
        self.kind() == Kind::Timeout
    }

    /// Classifies an error answer. The engine reports a stale service version only in
    /// words (as a 500 on older engines), so this is the one place that reads its text.
    pub fn from_status(op: impl Into<String>, status: u16, message: String) -> Error {
        let kind = if message.contains("update out of sequence") {
            Kind::OutOfSequence
        } else {
            match status {
                404 => Kind::NotFound,
                409 => Kind::Conflict,
                s if s >= 500 => Kind::Transient,
                _ => Kind::Permanent,
            }
        };
        Error::Status {
            op: op.into(),
            status,
            message,
            kind,
        }
    }

    fn from_bollard(op: impl Into<String>, e: bollard::errors::Error) -> Error {
        match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            } => Error::from_status(op, status_code, message),
            bollard::errors::Error::RequestTimeoutError => Error::Timeout {
                op: op.into(),
                after: CALL_TIMEOUT,
            },
            source => Error::Api {
                op: op.into(),
                source,
            },
        }
    }
}

#[derive(Clone)]
enum Host {
    Unix(PathBuf),
    Tcp {
        addr: String,
        tls: Option<(tokio_rustls::TlsConnector, String)>,
    },
}

/// A negotiated connection to one engine. Clones share the per-service edit locks.
#[derive(Clone)]
pub struct Engine {
    api: Docker,
    host: Host,
    display: String,
    timeout: Duration,
    locks: Arc<ServiceLocks>,
}

const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

impl Engine {
    /// Connects as the Docker CLI would (`DOCKER_HOST`, `DOCKER_TLS_VERIFY`,
    /// `DOCKER_CERT_PATH`) and negotiates the API version down to the engine's.
    pub async fn connect() -> Result<Engine, Error> {
        let engine = Engine::from_env()?;
        engine.negotiate().await?;
        Ok(engine)
    }

    /// Like [`Engine::connect`], but waits for an engine that is not up yet (drover may
    /// start before dockerd on boot): retries every second, then every 10 s, until
    /// `shutdown`. Only a malformed `DOCKER_HOST` or TLS setup fails at once.
    pub async fn connect_waiting(
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Engine>, Error> {
        let mut attempt = 0u32;
        loop {
            let result = match Engine::from_env() {
                Ok(engine) => engine.negotiate().await.map(|()| engine),
                Err(e) => Err(e),
            };
            match result {
                Ok(engine) => return Ok(Some(engine)),
                Err(e) if e.is_transient() => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "docker engine not reachable; retrying");
                }
                Err(e) => return Err(e),
            }
            let delay = Duration::from_secs(if attempt < 10 { 1 } else { 10 });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Asks the engine for its API version; every clone of this client then speaks it.
    pub async fn negotiate(&self) -> Result<(), Error> {
        let negotiated = tokio::time::timeout(self.timeout, self.api.clone().negotiate_version())
            .await
            .map_err(|_| Error::Timeout {
                op: format!("connect to {}", self.display),
                after: self.timeout,
            })?;
        negotiated.map(drop).map_err(|source| Error::Connect {
            host: self.display.clone(),
            source,
        })
    }

    /// A client for the engine the environment names; no request is made yet.
    fn from_env() -> Result<Engine, Error> {
        let display = std::env::var("DOCKER_HOST").unwrap_or_else(|_| DEFAULT_HOST.into());
        let tls = std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty())
            || display.starts_with("https://");
        let connect_err = |source| Error::Connect {
            host: display.clone(),
            source,
        };
        let api = if tls {
            let dir = cert_path();
            let url = display.replacen("tcp://", "https://", 1);
            Docker::connect_with_ssl(
                &url,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                120,
                bollard::API_DEFAULT_VERSION,
            )
        } else {
            Docker::connect_with_host(&display)
        }
        .map_err(connect_err)?;
        // bollard's own timeout covers only the wait for response headers, and the event
        // stream must not be cut: deadlines are set per call in `call` instead.
        let api = api.with_timeout(Duration::from_secs(24 * 3600));
        let host = parse_host(&display, tls)?;
        Ok(Engine {
            api,
            host,
            display,
            timeout: CALL_TIMEOUT,
            locks: Arc::default(),
        })
    }

    pub fn host(&self) -> &str {
        &self.display
    }

    /// The deadline of one engine call.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// The same engine with another per-call deadline (tests, slow links).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Engine {
        self.timeout = timeout;
        self
    }

    /// Runs one bollard call under the deadline and classifies its failure.
    async fn call<T>(
        &self,
        op: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::from_bollard(op(), e)),
            Err(_) => Err(Error::Timeout {
                op: op(),
                after: self.timeout,
            }),
        }
    }

    /// GET `path` (with query) and decode the JSON answer.
    async fn get_json<T: DeserializeOwned>(&self, op: &str, path: &str) -> Result<T, Error> {
        let body = self.raw(op, hyper::Method::GET, path, &[], None).await?;
        serde_json::from_slice(&body).map_err(|e| Error::Decode {
            op: op.to_owned(),
            reason: e.to_string(),
        })
    }

    /// One plain request at the negotiated API version, under the call deadline (the whole
    /// exchange, body included). A status of 300 or more is an [`Error::Status`].
    async fn raw(
        &self,
        op: &str,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        match tokio::time::timeout(
            self.timeout,
            self.raw_unbounded(op, method, path, headers, body),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                op: op.to_owned(),
                after: self.timeout,
            }),
        }
    }

    async fn raw_unbounded(
        &self,
        op: &str,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, Error> {
        let v = self.api.client_version();
        let uri = format!("/v{}.{}{}", v.major_version, v.minor_version, path);
        let transport = |reason: String| Error::Transport {
            op: op.to_owned(),
            reason,
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&uri)
            .header(hyper::header::HOST, "docker");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let res = match &self.host {
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
            Host::Tcp { addr, tls: None } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
            Host::Tcp {
                addr,
                tls: Some((connector, name)),
            } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                let server = rustls_pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| Error::Tls(e.to_string()))?;
                let s = connector
                    .connect(server, s)
                    .await
                    .map_err(|e| transport(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
        }
        .map_err(transport)?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if status >= 300 {
            #[derive(serde::Deserialize)]
            struct Msg {
                message: String,
            }
            let message = serde_json::from_slice::<Msg>(&body)
                .map(|m| m.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::from_status(op, status, message));
        }
        Ok(body)
    }
}

async fn send<S>(
    io: TokioIo<S>,
    req: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Percent-encodes a query value (filters are JSON).
fn query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes one path segment (a service name or id from config).
fn path_segment(s: &str) -> String {
    query_value(s)
}

fn cert_path() -> PathBuf {
    std::env::var_os("DOCKER_CERT_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".docker")
        })
}

fn parse_host(host: &str, tls: bool) -> Result<Host, Error> {
    if let Some(path) = host.strip_prefix("unix://") {
        return Ok(Host::Unix(PathBuf::from(path)));
    }
    let addr = host
        .strip_prefix("tcp://")
        .or_else(|| host.strip_prefix("http://"))
        .or_else(|| host.strip_prefix("https://"))
        .ok_or_else(|| Error::Tls(format!("unsupported DOCKER_HOST {host:?}")))?
        .trim_end_matches('/')
        .to_owned();
    if !tls {
        return Ok(Host::Tcp { addr, tls: None });
    }
    let name = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&addr)
        .trim_matches(['[', ']'])
        .to_owned();
    Ok(Host::Tcp {
        addr,
        tls: Some((tls_connector(&cert_path())?, name)),
    })
}

fn tls_connector(dir: &std::path::Path) -> Result<tokio_rustls::TlsConnector, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: &dyn std::fmt::Display| Error::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca.pem")).map_err(|e| tls(&e))? {
        roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    let certs = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .map_err(|e| tls(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).map_err(|e| tls(&e))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .map_err(|e| tls(&e))?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_version_is_told_apart_from_other_server_errors() {
        let e = Error::from_status(
            "update service web",
            500,
            "rpc error: code = Unknown desc = update out of sequence".into(),
        );
        assert_eq!(e.kind(), Kind::OutOfSequence);
        assert!(e.is_out_of_sequence());
        assert!(!e.is_transient(), "retried by edit_service, not blindly");
        let e = Error::from_status("list services", 500, "internal error".into());
        assert_eq!(e.kind(), Kind::Transient);
        assert!(e.is_transient());
    }

    #[test]
    fn status_codes_map_to_kinds() {
        let kind = |s| Error::from_status("op", s, "x".into()).kind();
        assert_eq!(kind(404), Kind::NotFound);
        assert_eq!(kind(409), Kind::Conflict);
        assert_eq!(kind(400), Kind::Permanent);
        assert_eq!(kind(503), Kind::Transient);
        assert!(Error::from_status("op", 404, "no such service".into()).is_not_found());
        assert!(Error::from_status("op", 409, "name in use".into()).is_conflict());
    }

    #[test]
    fn timeouts_and_broken_connections_are_worth_retrying() {
        let t = Error::Timeout {
            op: "inspect service".into(),
            after: Duration::from_secs(30),
        };
        assert!(t.is_timeout() && t.is_transient());
        assert_eq!(
            t.to_string(),
            "inspect service: the engine did not answer within 30s"
        );
        let c = Error::Transport {
            op: "list tasks".into(),
            reason: "connection refused".into(),
        };
        assert!(c.is_transient());
        let d = Error::Decode {
            op: "list tasks".into(),
            reason: "eof".into(),
        };
        assert!(!d.is_transient());
        let b = Error::from_bollard(
            "info",
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message: "no such node".into(),
            },
        );
        assert!(b.is_not_found());
        assert!(
            Error::from_bollard("info", bollard::errors::Error::RequestTimeoutError).is_timeout()
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value(r#"{"label":["a=1"]}"#),
            "%7B%22label%22%3A%5B%22a%3D1%22%5D%7D"
        );
        assert_eq!(path_segment("web_app-1.x"), "web_app-1.x");
        assert_eq!(path_segment("../x"), "..%2Fx");
    }
}
