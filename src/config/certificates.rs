//! `certificates:`: drover's own ACME client (docs/certificates.md). Left out, drover
//! obtains nothing and serves whatever certificate files are there.

use std::path::PathBuf;

use serde::Deserialize;

use super::check::Problem;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Certificates {
    /// The ACME directory URL (default Let's Encrypt production; its staging is
    /// `https://acme-staging-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// A PEM root to trust for the directory instead of the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Which TLS hosts get a certificate: those whose services say `routing-acme: "true"`
    /// (`label`, the default), or every TLS host (`all`).
    pub hosts: HostChoice,
    /// The target whose nginx serves the challenges and the certificates (default: the
    /// first `builtin:nginx` target).
    pub target: Option<String>,
    /// Where drover writes `HOST/fullchain.pem` and `HOST/privkey.pem`, as drover's
    /// container sees it; nginx reads them at `/etc/letsencrypt/live/HOST/`.
    pub dir: PathBuf,
    /// Renew when this fraction of the lifetime is left (default 1/3), or earlier when the
    /// CA's renewal information says so.
    pub renew_when_left: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostChoice {
    #[default]
    Label,
    All,
}

impl Default for Certificates {
    fn default() -> Self {
        Certificates {
            directory: LETS_ENCRYPT.to_owned(),
            ca_file: None,
            hosts: HostChoice::Label,
            target: None,
            dir: PathBuf::from("/etc/letsencrypt/live"),
            renew_when_left: 1.0 / 3.0,
        }
    }
}

impl Certificates {
    pub(super) fn validate(&self, targets: &[super::Target]) -> Result<(), Problem> {
        let url = self.directory.as_str();
        if !(url.starts_with("https://") || url.starts_with("http://127.0.0.1")) {
            return Err(Problem::new(
                format!("certificates: directory {url:?} is not an https URL"),
                "directory:",
            ));
        }
        if !(self.renew_when_left > 0.0 && self.renew_when_left < 1.0) {
            return Err(Problem::new(
                format!(
                    "certificates: renew_when_left {} is not between 0 and 1",
                    self.renew_when_left
                ),
                "renew_when_left:",
            ));
        }
        if !self.dir.is_absolute() {
            return Err(Problem::new(
                format!("certificates: dir {:?} is not absolute", self.dir),
                "dir:",
            ));
        }
        if self.target(targets).is_none() {
            let reason = match &self.target {
                Some(t) => format!("certificates: target {t:?} is not a builtin:nginx target"),
                None => "certificates: no builtin:nginx target serves the challenges".to_owned(),
            };
            return Err(Problem::new(reason, "certificates:"));
        }
        Ok(())
    }

    /// The target whose nginx serves challenges and certificates.
    pub fn target<'a>(&self, targets: &'a [super::Target]) -> Option<&'a super::Target> {
        targets.iter().find(|t| {
            t.builtin() == Some("nginx") && self.target.as_ref().is_none_or(|n| *n == t.name)
        })
    }
}
