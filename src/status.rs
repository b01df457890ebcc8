//! What this instance is doing right now, for `/readyz` and the status page.
//!
//! Written by the render loop and the cluster role check, read by HTTP handlers; it holds
//! only small summaries, never a snapshot.

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub output: String,
    /// Unix seconds of the last render attempt.
    pub last_render: Option<u64>,
    /// Unix seconds of the last successful apply (written, checked, notified).
    pub last_apply: Option<u64>,
    /// SHA-256 (hex) of the config currently in place.
    pub hash: Option<String>,
    pub check: CheckResult,
    pub error: Option<String>,
    pub skipped: Vec<SkippedService>,
    /// Hosts whose server blocks failed the check, left out of the file in place.
    pub left_out: Vec<LeftOutHost>,
    /// TLS hosts served on port 80 until their certificate files appear.
    pub without_certificate: Vec<String>,
    /// Per node, when the target is delivered through agents: outcome and hash there.
    pub nodes: Vec<crate::cluster::delivery::NodeResult>,
}

/// The last check of a target's file. Shown (status page, JSON) as `none`, `passed`,
/// `failed: OUTPUT` or `unavailable: WHY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CheckResult {
    /// No check configured, or none run yet.
    #[default]
    None,
    Passed,
    /// The checker rejected the file; its output.
    Failed(String),
    /// The check could not run (container missing, exec failed); why.
    Unavailable(String),
}

impl CheckResult {
    /// One word, for badges and metric labels.
    pub fn word(&self) -> &'static str {
        match self {
            CheckResult::None => "none",
            CheckResult::Passed => "passed",
            CheckResult::Failed(_) => "failed",
            CheckResult::Unavailable(_) => "unavailable",
        }
    }
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckResult::None | CheckResult::Passed => f.write_str(self.word()),
            CheckResult::Failed(why) | CheckResult::Unavailable(why) => {
                write!(f, "{}: {why}", self.word())
            }
        }
    }
}

impl Serialize for CheckResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SkippedService {
    pub service: String,
    pub label: String,
    pub value: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LeftOutHost {
    pub host: String,
    /// The checker's message that made drover leave the host out.
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub version: &'static str,
    /// `None` until the engine has been asked.
    pub role: Option<crate::cluster::role::Role>,
    pub node: String,
    pub engine: String,
    pub ready: bool,
    pub peers: Vec<String>,
    pub targets: Vec<TargetStatus>,
}

#[derive(Debug, Default)]
pub struct Board {
    inner: RwLock<Summary>,
    targets: RwLock<BTreeMap<String, TargetStatus>>,
}

impl Board {
    pub fn new() -> Board {
        Board {
            inner: RwLock::new(Summary {
                version: env!("CARGO_PKG_VERSION"),
                ..Summary::default()
            }),
            targets: RwLock::default(),
        }
    }

    pub fn summary(&self) -> Summary {
        let mut s = self.inner.read().map(|s| s.clone()).unwrap_or_default();
        s.targets = self
            .targets
            .read()
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        s
    }

    pub fn role(&self) -> Option<crate::cluster::role::Role> {
        self.inner.read().ok().and_then(|s| s.role)
    }

    pub fn is_ready(&self) -> bool {
        self.inner.read().map(|s| s.ready).unwrap_or(false)
    }

    pub fn update(&self, f: impl FnOnce(&mut Summary)) {
        if let Ok(mut s) = self.inner.write() {
            f(&mut s);
        }
    }

    /// A target that a config reload removed.
    pub fn remove_target(&self, name: &str) {
        if let Ok(mut t) = self.targets.write() {
            t.remove(name);
        }
    }

    pub fn update_target(&self, name: &str, f: impl FnOnce(&mut TargetStatus)) {
        if let Ok(mut t) = self.targets.write() {
            let entry = t.entry(name.to_owned()).or_insert_with(|| TargetStatus {
                name: name.to_owned(),
                check: CheckResult::None,
                ..TargetStatus::default()
            });
            f(entry);
        }
    }
}
