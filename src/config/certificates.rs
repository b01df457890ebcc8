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
    /// Renew when this fraction of the lifetime is left (default 1/3).
    pub renew_when_left: f64,
    /// External account binding (RFC 8555 §7.3.4), for CAs that create an account only
    /// for a key they handed out (ZeroSSL, Google Trust Services).
    pub eab: Option<Eab>,
}

/// The CA's key identifier and the file holding its HMAC key, base64url as the CA shows
/// it. The key is read when drover starts, and only used to sign the account's creation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Eab {
    pub kid: String,
    pub hmac_key_file: PathBuf,
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
            eab: None,
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
        if let Some(eab) = &self.eab {
            let kid = eab.kid.trim();
            if kid.is_empty() || kid.len() > 256 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Problem::new(
                    "certificates: eab.kid must be the CA's key identifier (printable, no spaces)",
                    "kid:",
                )
                .under("certificates:"));
            }
            if !eab.hmac_key_file.is_absolute() {
                return Err(Problem::new(
                    format!(
                        "certificates: eab.hmac_key_file {:?} is not absolute",
                        eab.hmac_key_file
                    ),
                    "hmac_key_file:",
                )
                .under("certificates:"));
            }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Error};

    const NGINX: &str = "targets:\n  - name: nginx\n    template: builtin:nginx\n    output: /etc/nginx/conf.d/drover.conf\n";

    fn refused(certificates: &str) -> (usize, String) {
        let text = format!("{NGINX}certificates:\n{certificates}");
        match Config::parse(Path::new("drover.yml"), &text) {
            Err(Error::Parse { line, reason, .. }) => (line, reason),
            other => panic!("not refused with a line: {other:?}"),
        }
    }

    #[test]
    fn external_account_binding_takes_a_kid_and_a_key_file() {
        let text = format!(
            "{NGINX}certificates:\n  directory: https://acme.zerossl.com/v2/DV90\n  eab:\n    kid: f0a1b2\n    hmac_key_file: /run/secrets/acme-eab\n"
        );
        let c = Config::parse(Path::new("drover.yml"), &text)
            .expect("parses")
            .certificates
            .expect("certificates");
        let eab = c.eab.expect("eab");
        assert_eq!(eab.kid, "f0a1b2");
        assert_eq!(eab.hmac_key_file, Path::new("/run/secrets/acme-eab"));
    }

    #[test]
    fn a_bad_external_account_binding_is_refused_at_its_line() {
        let (line, why) = refused("  eab:\n    kid: \"two words\"\n    hmac_key_file: /k\n");
        assert_eq!(line, 7, "{why}");
        assert!(why.contains("eab.kid"), "{why}");
        let (line, why) = refused("  eab:\n    kid: k1\n    hmac_key_file: relative/key\n");
        assert_eq!(line, 8, "{why}");
        assert!(why.contains("not absolute"), "{why}");
        // The key itself has no place in the file.
        let (line, why) = refused("  eab:\n    kid: k1\n    hmac_key: c2VjcmV0\n");
        assert_eq!(line, 8, "{why}");
        assert!(!why.contains("c2VjcmV0"), "{why}");
    }
}
