//! The one HTTP/1.1 client for requests drover makes itself: notifications to their sinks,
//! manifest and token requests to registries. One request per connection (each caller
//! makes few, minutes apart), `https` through rustls with the system's roots.
//!
//! Invariants: an error never names the URL's path or query (a Slack webhook's URL is its
//! secret; a token request's query may carry a scope worth keeping out of logs) — only the
//! step that failed; an answer's body is read up to the caller's limit and no further;
//! there is no timeout here: every caller bounds its own request.

use std::sync::{Arc, OnceLock};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Uri};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no host in the URL")]
    NoHost,
    #[error("not an http(s) URL")]
    Scheme,
    #[error("connect: {0}")]
    Connect(std::io::ErrorKind),
    #[error("not a TLS server name")]
    ServerName,
    #[error("no TLS client")]
    NoTls,
    #[error("TLS: {0}")]
    Tls(std::io::ErrorKind),
    #[error("request: {0}")]
    Request(String),
}

/// An answer: its status, headers and (bounded) body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    /// Empty when the body was larger than the limit (see `complete`).
    pub body: Bytes,
    /// Whether the whole body was read (false: it was larger than the limit, or broke off).
    pub complete: bool,
}

impl Response {
    /// A header's value as text, when it is there and is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request to `url` with `headers` and `body`; the answer's body is read up to `limit`
/// bytes (a larger one is left unread, and the answer says so). A `HEAD` answer has no body.
pub async fn send(
    method: Method,
    url: &Uri,
    headers: &[(&str, String)],
    body: Bytes,
    limit: usize,
) -> Result<Response, Error> {
    let host = url.host().ok_or(Error::NoHost)?;
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(Error::Scheme),
    };
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| Error::Connect(e.kind()))?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let authority = url.authority().map_or(host, |a| a.as_str());
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", authority);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| Error::Request(e.to_string()))?;
    if https {
        let name = rustls_pki_types::ServerName::try_from(bare.to_owned())
            .map_err(|_| Error::ServerName)?;
        let tls = tls()
            .ok_or(Error::NoTls)?
            .connect(name, stream)
            .await
            .map_err(|e| Error::Tls(e.kind()))?;
        exchange(TokioIo::new(tls), request, limit).await
    } else {
        exchange(TokioIo::new(stream), request, limit).await
    }
}

async fn exchange<T>(
    io: T,
    request: hyper::Request<Full<Bytes>>,
    limit: usize,
) -> Result<Response, Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Error::Request(format!("handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::Request(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let (body, complete) = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => (b.to_bytes(), true),
        Err(_) => (Bytes::new(), false),
    };
    Ok(Response {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        complete,
    })
}

/// A TLS client trusting the system's roots (`SSL_CERT_FILE`, else Debian's bundle, which
/// the image carries); `None` if rustls cannot build one (a request over https then fails,
/// and says why).
fn tls() -> Option<tokio_rustls::TlsConnector> {
    static CONNECTOR: OnceLock<Option<tokio_rustls::TlsConnector>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject;
            let file = std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
            let mut roots = rustls::RootCertStore::empty();
            if let Ok(certs) = CertificateDer::pem_file_iter(&file) {
                for cert in certs.flatten() {
                    let _ = roots.add(cert);
                }
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .clone()
}
