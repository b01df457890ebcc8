//! The connection to the Docker Engine, shared by every module that talks to it.
//!
//! bollard does the typed calls. A few answers carry fields bollard's generated models
//! drop (a task's `NetworksAttachments`, which hold the task IPs we route to), so
//! [`Engine::get_json`] makes a plain GET over the same endpoint (unix socket, tcp or
//! tcp+TLS from `DOCKER_HOST`/`DOCKER_CERT_PATH`/`DOCKER_TLS_VERIFY`) at the negotiated
//! API version. This is also the one place that reads the engine's error text, where it
//! only says "update out of sequence" in words.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

pub use bollard::Docker;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the docker engine at {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("engine api: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error("engine request {path}: {reason}")]
    Raw { path: String, reason: String },
    #[error("engine answered {status} to {path}: {message}")]
    Status {
        path: String,
        status: u16,
        message: String,
    },
    #[error("tls setup: {0}")]
    Tls(String),
}

impl Error {
    /// Worth retrying: the engine may be restarting or briefly overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { source, .. } => !matches!(
                source,
                bollard::errors::Error::UnsupportedURISchemeError { .. }
            ),
            Error::Raw { .. } => true,
            Error::Status { status, .. } => *status >= 500,
            Error::Api(e) => is_transient_api(e),
            Error::Tls(_) => false,
        }
    }
}

pub fn is_transient_api(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as B;
    match e {
        B::DockerResponseServerError { status_code, .. } => *status_code >= 500,
        B::JsonDataError { .. } | B::JsonSerdeError { .. } => false,
        _ => true,
    }
}

/// The engine refused a service update because our version index was stale.
pub fn is_out_of_sequence(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { message, .. }
        if message.contains("update out of sequence"))
}

/// The engine said the object does not exist.
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[derive(Clone)]
enum Host {
    Unix(PathBuf),
    Tcp {
        addr: String,
        tls: Option<(tokio_rustls::TlsConnector, String)>,
    },
}

/// A negotiated connection to one engine.
#[derive(Clone)]
pub struct Engine {
    pub api: Docker,
    host: Host,
    display: String,
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
        self.api
            .clone()
            .negotiate_version()
            .await
            .map(drop)
            .map_err(|source| Error::Connect {
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
        // The event stream is long-lived; the per-request timeout must not cut it.
        let api = api.with_timeout(Duration::from_secs(24 * 3600));
        let host = parse_host(&display, tls)?;
        Ok(Engine { api, host, display })
    }

    pub fn host(&self) -> &str {
        &self.display
    }

    /// GET `path` (with query) at the negotiated API version and decode the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let v = self.api.client_version();
        let uri = format!("/v{}.{}{}", v.major_version, v.minor_version, path);
        let raw = |reason: String| Error::Raw {
            path: path.to_owned(),
            reason,
        };
        let req = hyper::Request::get(&uri)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| raw(e.to_string()))?;
        let res = match &self.host {
            Host::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| raw(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
            Host::Tcp { addr, tls: None } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| raw(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
            Host::Tcp {
                addr,
                tls: Some((connector, name)),
            } => {
                let s = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| raw(e.to_string()))?;
                let server = rustls_pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| Error::Tls(e.to_string()))?;
                let s = connector
                    .connect(server, s)
                    .await
                    .map_err(|e| raw(e.to_string()))?;
                send(TokioIo::new(s), req).await
            }
        }
        .map_err(raw)?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| raw(e.to_string()))?
            .to_bytes();
        if status >= 300 {
            #[derive(serde::Deserialize)]
            struct Msg {
                message: String,
            }
            let message = serde_json::from_slice::<Msg>(&body)
                .map(|m| m.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(Error::Status {
                path: path.to_owned(),
                status,
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| raw(format!("bad json: {e}")))
    }
}

async fn send<S>(
    io: TokioIo<S>,
    req: hyper::Request<Empty<Bytes>>,
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
    tokio::time::timeout(Duration::from_secs(60), sender.send_request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
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
