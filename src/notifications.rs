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

use hyper::Uri;
use hyper::body::Bytes;
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

/// One POST to `url`; the status. Errors name no part of the URL (`outbound`'s rule).
async fn post(url: &Uri, message: &Message) -> Result<u16, String> {
    // A little of the answer is read so the connection ends cleanly; its content is unused.
    crate::outbound::send(
        hyper::Method::POST,
        url,
        &message.headers,
        message.body.clone(),
        64 * 1024,
    )
    .await
    .map(|r| r.status)
    .map_err(|e| e.to_string())
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
