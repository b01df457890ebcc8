//! `notifications:`: where drover tells a person what needs one (a failed job, a host left
//! out, a node that stopped answering, ...), and which of those events each sink gets.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Problem, at_field, bounds, valid_name};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Notifications {
    pub sinks: Vec<Sink>,
    /// The same event (same kind, same subject) is not sent to a sink again within this.
    #[serde(with = "humantime_serde")]
    pub repeat_after: Duration,
}

impl Default for Notifications {
    fn default() -> Self {
        Notifications {
            sinks: Vec::new(),
            repeat_after: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    /// `[A-Za-z0-9_-]+`, unique: what logs and metrics call the sink (never its URL).
    pub name: String,
    pub kind: SinkKind,
    /// A file holding the URL: a Slack incoming webhook's URL is its secret.
    pub url_file: PathBuf,
    /// `webhook` only: the HMAC-SHA256 key of `X-Hub-Signature-256`, as GitHub signs.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The events this sink gets; all of them when left out.
    #[serde(default = "EventKind::all")]
    pub events: Vec<EventKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// A Slack-compatible incoming webhook: `{"text": ...}`.
    Slack,
    /// A JSON document, signed with `secret_file` when given.
    Webhook,
    /// ntfy-style: the text as a plain POST body, the event as its `Title`.
    Ntfy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A job ended failed or rolled back.
    JobFailed,
    /// A host was left out of a node's nginx (its check refused it).
    HostLeftOut,
    /// A node's agent stopped answering the controller.
    NodeUnreachable,
    /// This drover started.
    DroverStarted,
    /// A stack from git was deployed at a new commit.
    StackDeployed,
    /// drover's ACME client obtained or renewed a certificate.
    CertificateRenewed,
    /// An order for a certificate failed, or the ledger refused one.
    CertificateFailing,
}

impl EventKind {
    pub fn all() -> Vec<EventKind> {
        vec![
            EventKind::JobFailed,
            EventKind::HostLeftOut,
            EventKind::NodeUnreachable,
            EventKind::DroverStarted,
            EventKind::StackDeployed,
            EventKind::CertificateRenewed,
            EventKind::CertificateFailing,
        ]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobFailed => "job_failed",
            EventKind::HostLeftOut => "host_left_out",
            EventKind::NodeUnreachable => "node_unreachable",
            EventKind::DroverStarted => "drover_started",
            EventKind::StackDeployed => "stack_deployed",
            EventKind::CertificateRenewed => "certificate_renewed",
            EventKind::CertificateFailing => "certificate_failing",
        }
    }
}

impl Notifications {
    pub(super) fn validate(&self) -> Result<(), Problem> {
        bounds::duration(
            "notifications.repeat_after",
            self.repeat_after,
            Duration::from_secs(1),
            Duration::from_secs(7 * 24 * 3600),
        )
        .map_err(at_field("repeat_after"))?;
        let mut names = std::collections::BTreeSet::new();
        for sink in &self.sinks {
            let at = format!("name: {}", sink.name);
            if !valid_name(&sink.name) {
                return Err(Problem::new(
                    format!(
                        "notifications: sink name {:?} is not [A-Za-z0-9_-]+",
                        sink.name
                    ),
                    at,
                ));
            }
            if !names.insert(sink.name.as_str()) {
                return Err(Problem::new(
                    format!("notifications: sink {:?} is defined twice", sink.name),
                    at,
                ));
            }
            if sink.secret_file.is_some() && sink.kind != SinkKind::Webhook {
                return Err(Problem::new(
                    format!(
                        "notifications: sink {}: secret_file signs `webhook` sinks only",
                        sink.name
                    ),
                    at,
                ));
            }
            if sink.events.is_empty() {
                return Err(Problem::new(
                    format!(
                        "notifications: sink {}: events is empty (leave it out for all)",
                        sink.name
                    ),
                    at,
                ));
            }
        }
        Ok(())
    }
}
