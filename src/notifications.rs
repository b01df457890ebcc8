//! Notifications: the events that need a person, sent to the sinks `notifications:` names
//! (a Slack-compatible incoming webhook, a JSON webhook signed like GitHub's, an ntfy-style
//! plain POST).
//!
//! Invariants: [`Notifier::notify`] never waits (a full queue drops the event, counted); each
//! delivery runs on its own task, bounded in time ([`TRY_TIMEOUT`] per try, [`TRIES`] tries
//! with a pause between) and in number ([`MAX_IN_FLIGHT`]), so a sink that hangs or fails
//! slows neither the render loop, the intake nor the other sinks; the same event (kind and
//! subject) reaches a sink at most once per `repeat_after`; a sink's URL never reaches a
//! log line or a metric (sinks are named).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::{EventKind, Notifications, SinkKind};

/// Events waiting for the sender; beyond this they are dropped (and counted).
const QUEUE: usize = 256;
/// Deliveries in flight at once, over all sinks.
const MAX_IN_FLIGHT: usize = 8;
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
const TRIES: u32 = 3;
const PAUSE: Duration = Duration::from_secs(2);

/// Something a person should hear about.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// What the event is about (a job id, `target/host`, a node): with the kind, what makes
    /// two events the same for `repeat_after`.
    pub subject: String,
    /// One line for a person.
    pub summary: String,
    pub details: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("notifications: sink {sink}: cannot read {path}: {source}")]
    Read {
        sink: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("notifications: sink {sink}: {reason}")]
    Url { sink: String, reason: String },
}

/// The sending end: cheap to clone, a no-op when no sink is configured.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Event>>,
    /// This node's name in every message; set once it is known (asking the engine must
    /// not hold up the start).
    node: Arc<OnceLock<String>>,
}

impl Notifier {
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Whether any sink is configured.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Names this drover in the messages sent from now on.
    pub fn set_node(&self, node: String) {
        let _ = self.node.set(node);
    }

    /// Queues `event` for every sink that wants its kind; never waits.
    pub fn notify(&self, event: Event) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(event).is_err() {
            crate::metrics::get()
                .notifications
                .with_label_values(&["*", "dropped"])
                .inc();
        }
    }
}

/// A sink with its files read.
struct Loaded {
    name: String,
    kind: SinkKind,
    url: Uri,
    secret: Option<Vec<u8>>,
    events: Vec<EventKind>,
}

/// Reads every sink's files (refusing one that cannot be read or holds no http(s) URL)
/// and starts the sender.
pub fn start(config: &Notifications) -> Result<Notifier, Error> {
    if config.sinks.is_empty() {
        return Ok(Notifier::disabled());
    }
    let mut sinks = Vec::new();
    for sink in &config.sinks {
        let read = |path: &Path| {
            crate::config::read_secret(path).map_err(|source| Error::Read {
                sink: sink.name.clone(),
                path: path.display().to_string(),
                source,
            })
        };
        let text = String::from_utf8_lossy(&read(&sink.url_file)?)
            .trim()
            .to_owned();
        // The reason never repeats the URL: it may be the sink's secret.
        let url: Uri = text.parse().map_err(|_| Error::Url {
            sink: sink.name.clone(),
            reason: format!("{} does not hold a URL", sink.url_file.display()),
        })?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(Error::Url {
                sink: sink.name.clone(),
                reason: format!("{} does not hold an http(s) URL", sink.url_file.display()),
            });
        }
        let secret = match &sink.secret_file {
            Some(path) => Some(read(path)?),
            None => None,
        };
        sinks.push(Arc::new(Loaded {
            name: sink.name.clone(),
            kind: sink.kind,
            url,
            secret,
            events: sink.events.clone(),
        }));
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    let node = Arc::new(OnceLock::new());
    tokio::spawn(run(rx, sinks, config.repeat_after, node.clone()));
    Ok(Notifier { tx: Some(tx), node })
}

async fn run(
    mut rx: mpsc::Receiver<Event>,
    sinks: Vec<Arc<Loaded>>,
    repeat_after: Duration,
    node: Arc<OnceLock<String>>,
) {
    let metrics = crate::metrics::get();
    let mut repeats = Repeats::new(repeat_after);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(event) = rx.recv().await {
        let now = Instant::now();
        for sink in sinks.iter().filter(|s| s.events.contains(&event.kind)) {
            let count = |outcome: &str| {
                metrics
                    .notifications
                    .with_label_values(&[sink.name.as_str(), outcome])
                    .inc()
            };
            if !repeats.admit(&sink.name, event.kind, &event.subject, now) {
                count("suppressed");
                continue;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(sink = %sink.name, event = event.kind.as_str(), "notification dropped: too many deliveries in flight");
                count("dropped");
                continue;
            };
            let name = node.get().map_or("", String::as_str);
            let message = Message::of(sink, &event, name, crate::clock::unix_secs());
            let sink = sink.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let outcome = deliver(&sink, &message).await;
                metrics
                    .notifications
                    .with_label_values(&[sink.name.as_str(), outcome])
                    .inc();
            });
        }
    }
}

/// Which (sink, kind, subject) was sent when: the pure part of the repeat rule.
struct Repeats {
    window: Duration,
    sent: HashMap<(String, EventKind, String), Instant>,
}

impl Repeats {
    fn new(window: Duration) -> Repeats {
        Repeats {
            window,
            sent: HashMap::new(),
        }
    }

    /// Whether to send now; remembers it when so.
    fn admit(&mut self, sink: &str, kind: EventKind, subject: &str, now: Instant) -> bool {
        let window = self.window;
        self.sent
            .retain(|_, at| now.saturating_duration_since(*at) < window);
        let key = (sink.to_owned(), kind, subject.to_owned());
        if self.sent.contains_key(&key) {
            return false;
        }
        self.sent.insert(key, now);
        true
    }
}

/// One request's headers and body for one sink.
#[derive(Debug)]
struct Message {
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

impl Message {
    fn of(sink: &Loaded, event: &Event, node: &str, at: i64) -> Message {
        let line = format!("drover on {node}: {}", event.summary);
        match sink.kind {
            SinkKind::Slack => Message {
                headers: vec![("content-type", "application/json".into())],
                body: Bytes::from(json!({ "text": line }).to_string()),
            },
            SinkKind::Ntfy => Message {
                headers: vec![
                    ("content-type", "text/plain; charset=utf-8".into()),
                    ("title", format!("drover: {}", event.kind.as_str())),
                ],
                body: Bytes::from(line),
            },
            SinkKind::Webhook => {
                let body = json!({
                    "event": event.kind.as_str(),
                    "subject": event.subject,
                    "summary": event.summary,
                    "node": node,
                    "at": at,
                    "details": event.details,
                })
                .to_string();
                let mut headers = vec![
                    ("content-type", "application/json".into()),
                    ("x-drover-event", event.kind.as_str().into()),
                ];
                if let Some(secret) = &sink.secret {
                    headers.push((
                        "x-hub-signature-256",
                        crate::hash::sign(secret, body.as_bytes()),
                    ));
                }
                Message {
                    headers,
                    body: Bytes::from(body),
                }
            }
        }
    }
}

/// Up to [`TRIES`] posts; the outcome for the metric.
async fn deliver(sink: &Loaded, message: &Message) -> &'static str {
    let mut last = String::new();
    for n in 1..=TRIES {
        match tokio::time::timeout(TRY_TIMEOUT, post(&sink.url, message)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                debug!(sink = %sink.name, "notification sent");
                return "sent";
            }
            Ok(Ok(status)) => last = format!("answered {status}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("no answer within {TRY_TIMEOUT:?}"),
        }
        if n < TRIES {
            tokio::time::sleep(PAUSE * n).await;
        }
    }
    warn!(sink = %sink.name, tries = TRIES, reason = %last, "notification not delivered");
    "failed"
}

/// One POST to `url`; the status. Errors name no part of the URL.
async fn post(url: &Uri, message: &Message) -> Result<u16, String> {
    let host = url.host().ok_or("no host")?;
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut request = hyper::Request::post(path).header("host", host);
    for (name, value) in &message.headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(message.body.clone()))
        .map_err(|e| e.to_string())?;
    if https {
        let name = rustls_pki_types::ServerName::try_from(bare.to_owned())
            .map_err(|_| "not a TLS server name".to_owned())?;
        let tls = tls()
            .ok_or("no TLS client")?
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {}", e.kind()))?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(stream), request).await
    }
}

async fn exchange<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    // Read a little of the answer so the connection ends cleanly; its content is unused.
    let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
        .collect()
        .await;
    Ok(status)
}

/// A TLS client trusting the system's roots (`SSL_CERT_FILE`, else Debian's bundle, which
/// the image carries); `None` if rustls cannot build one (an https sink then fails its
/// tries, and says why).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(kind: SinkKind, secret: Option<&[u8]>) -> Loaded {
        Loaded {
            name: "s".into(),
            kind,
            url: Uri::from_static("http://127.0.0.1:1/hook"),
            secret: secret.map(<[u8]>::to_vec),
            events: EventKind::all(),
        }
    }

    fn event() -> Event {
        Event {
            kind: EventKind::JobFailed,
            subject: "j-1".into(),
            summary: "job j-1 failed: update-services app:latest".into(),
            details: json!({"state": "failed"}),
        }
    }

    #[test]
    fn the_same_event_reaches_a_sink_once_per_window_and_other_events_pass() {
        let mut r = Repeats::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(r.admit("a", EventKind::HostLeftOut, "nginx/x.test", t0));
        assert!(!r.admit(
            "a",
            EventKind::HostLeftOut,
            "nginx/x.test",
            t0 + Duration::from_secs(59)
        ));
        assert!(
            r.admit("b", EventKind::HostLeftOut, "nginx/x.test", t0),
            "another sink"
        );
        assert!(
            r.admit("a", EventKind::HostLeftOut, "nginx/y.test", t0),
            "another subject"
        );
        assert!(
            r.admit("a", EventKind::NodeUnreachable, "nginx/x.test", t0),
            "another kind"
        );
        assert!(r.admit(
            "a",
            EventKind::HostLeftOut,
            "nginx/x.test",
            t0 + Duration::from_secs(60)
        ));
    }

    #[test]
    fn a_webhook_message_is_the_documented_json_signed_as_github_signs() {
        let m = Message::of(
            &sink(SinkKind::Webhook, Some(b"k")),
            &event(),
            "node-1",
            1700,
        );
        let body: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
        assert_eq!(
            body,
            json!({
                "event": "job_failed",
                "subject": "j-1",
                "summary": "job j-1 failed: update-services app:latest",
                "node": "node-1",
                "at": 1700,
                "details": {"state": "failed"},
            })
        );
        let signature = m
            .headers
            .iter()
            .find(|(n, _)| *n == "x-hub-signature-256")
            .map(|(_, v)| v.clone())
            .expect("signed");
        // The one signature, which the hooks' verifier checks (hooks::verify's tests).
        assert_eq!(signature, crate::hash::sign(b"k", &m.body));
    }

    #[test]
    fn slack_gets_text_and_ntfy_a_plain_body_with_a_title() {
        let m = Message::of(&sink(SinkKind::Slack, None), &event(), "n", 0);
        let body: serde_json::Value = serde_json::from_slice(&m.body).expect("json");
        assert_eq!(
            body["text"],
            "drover on n: job j-1 failed: update-services app:latest"
        );
        let m = Message::of(&sink(SinkKind::Ntfy, None), &event(), "n", 0);
        assert_eq!(
            &m.body[..],
            b"drover on n: job j-1 failed: update-services app:latest"
        );
        assert!(m.headers.contains(&("title", "drover: job_failed".into())));
    }

    #[test]
    fn no_sink_means_notify_is_a_no_op() {
        Notifier::disabled().notify(event());
    }
}
