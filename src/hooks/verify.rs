//! Proof that a webhook came from whom it claims: shared tokens and HMAC signatures.
//!
//! Invariants: secrets are read once, at start; every comparison is constant-time (tokens
//! through their SHA-256, so their length does not leak; signatures through the MAC's own
//! `verify_slice`). A GitHub hook with per-repository secrets checks a delivery against the
//! one secret of the repository its body names and never tries another, so a secret leaked
//! from one repository cannot sign for the others. The only thing read from an unverified
//! body is that repository name. No HTTP types here: the intake hands over the presented
//! credentials as strings.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Error, Result, facts};
use crate::config::{self, FullMatch, HookKind};

/// The credentials a request presented, taken from its headers and query by the intake.
#[derive(Debug, Default, Clone)]
pub struct Presented<'a> {
    /// A shared token (`Authorization: Bearer`, `X-Drover-Token` or `?token=`).
    pub token: Option<String>,
    /// `sha256=<hex>` (`X-Hub-Signature-256`, `X-Drover-Signature`; Bitbucket's
    /// `X-Hub-Signature`).
    pub sha256: Option<&'a str>,
    /// Bare `<hex>` of HMAC-SHA256 (Gitea's `X-Gitea-Signature`, Forgejo's
    /// `X-Forgejo-Signature`).
    pub hex256: Option<&'a str>,
    /// `sha1=<hex>` (GitHub's legacy `X-Hub-Signature`).
    pub sha1: Option<&'a str>,
    /// Generic hooks: `X-Drover-Timestamp`, signed with the body.
    pub timestamp: Option<&'a str>,
}

/// The secret of one repository (or of every repository matching a pattern).
struct RepoKey {
    name: String,
    pattern: FullMatch,
    secret: Secret,
}

/// A signing secret, with its HMAC-SHA256 keyed once at load: the key's two padded blocks
/// are hashed here rather than for every delivery (2 of a GitHub push's dozen SHA-256
/// blocks; on boards without SHA instructions that is CPU paid per webhook).
struct Secret {
    bytes: Vec<u8>,
    sha256: Hmac<Sha256>,
}

impl Secret {
    fn new(bytes: Vec<u8>) -> Secret {
        let sha256 = keyed(&bytes);
        Secret { bytes, sha256 }
    }
}

fn keyed(secret: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes keys of any length")
}

/// A hook's loaded secrets.
pub struct Keys {
    kind: HookKind,
    /// SHA-256 of the shared token.
    token: Option<[u8; 32]>,
    /// Its length, so job output can be searched for it without keeping it.
    token_len: usize,
    secret: Option<Secret>,
    repos: Vec<RepoKey>,
    sha1: bool,
}

impl Keys {
    pub fn load(cfg: &config::Hook) -> Result<Keys> {
        let read = |path: &Path| -> Result<Vec<u8>> {
            let bytes = config::read_secret(path).map_err(|source| Error::Secret {
                hook: cfg.name.clone(),
                path: path.to_owned(),
                source,
            })?;
            if bytes.is_empty() {
                return Err(Error::EmptySecret {
                    hook: cfg.name.clone(),
                    path: path.to_owned(),
                });
            }
            Ok(bytes)
        };
        let (token, token_len) = match &cfg.token_file {
            Some(p) => {
                let t = read(p)?;
                (Some(Sha256::digest(&t).into()), t.len())
            }
            None => (None, 0),
        };
        let secret = match &cfg.secret_file {
            Some(p) => Some(Secret::new(read(p)?)),
            None => None,
        };
        let mut repos = Vec::new();
        for entry in &cfg.secrets.0 {
            repos.push(RepoKey {
                name: entry.repository.clone(),
                pattern: entry.pattern.clone(),
                secret: Secret::new(read(&entry.file)?),
            });
        }
        Ok(Keys {
            kind: cfg.kind,
            token,
            token_len,
            secret,
            repos,
            sha1: cfg.accept_sha1,
        })
    }

    /// Adds this hook's secrets to what job output is cleaned of.
    pub fn redact_into(&self, r: &crate::redact::Redactor) {
        if let Some(hash) = self.token {
            r.add_hashed(self.token_len, hash);
        }
        if let Some(s) = &self.secret {
            r.add(&s.bytes);
        }
        for k in &self.repos {
            r.add(&k.secret.bytes);
        }
    }

    /// The one secret a GitHub (Gitea, Bitbucket) delivery must be signed with: the entry
    /// naming its repository exactly, else the first pattern (in file order) matching it,
    /// else the hook's `secret_file`.
    fn repository_secret(&self, body: &[u8]) -> Option<&Secret> {
        if self.repos.is_empty() {
            return self.secret.as_ref();
        }
        let repo = facts::github_repository(body);
        let chosen = repo.as_deref().and_then(|r| {
            self.repos
                .iter()
                .find(|k| k.name == r)
                .or_else(|| self.repos.iter().find(|k| k.pattern.is_match(r)))
        });
        match chosen {
            Some(k) => Some(&k.secret),
            None => self.secret.as_ref(),
        }
    }

    fn token_matches(&self, presented: &str) -> bool {
        let Some(want) = &self.token else {
            return false;
        };
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(got.ct_eq(want))
    }

    /// Token, signature or both, by kind. Runs before the body is parsed.
    pub fn verify(&self, p: &Presented<'_>, body: &[u8]) -> bool {
        match self.kind {
            HookKind::Github => {
                let Some(secret) = self.repository_secret(body) else {
                    return false;
                };
                match (p.sha256, p.sha1) {
                    (Some(sig), _) => verify_parts(&secret.sha256, sig, &[body]),
                    (None, Some(sig)) if self.sha1 => verify_sha1(&secret.bytes, sig, body),
                    _ => false,
                }
            }
            HookKind::Gitea => {
                let (Some(secret), Some(sig)) = (self.repository_secret(body), p.hex256) else {
                    return false;
                };
                verify_hex(&secret.sha256, sig, body)
            }
            HookKind::Bitbucket => {
                let (Some(secret), Some(sig)) = (self.repository_secret(body), p.sha256) else {
                    return false;
                };
                verify_parts(&secret.sha256, sig, &[body])
            }
            HookKind::Dockerhub | HookKind::Gitlab => {
                p.token.as_deref().is_some_and(|t| self.token_matches(t))
            }
            HookKind::Generic => match (p.sha256, &self.secret) {
                (Some(sig), Some(secret)) => p.timestamp.is_some_and(|ts| {
                    verify_parts(&secret.sha256, sig, &[ts.as_bytes(), b".", body])
                }),
                (Some(_), None) => false,
                (None, _) => p.token.as_deref().is_some_and(|t| self.token_matches(t)),
            },
        }
    }
}

/// `sha256=<hex>` over the raw body, compared in constant time.
pub fn verify_signature(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    header.is_some_and(|h| verify_parts(&keyed(secret), h, &[body]))
}

/// `sha256=<hex>` over the concatenated parts, compared in constant time.
fn verify_parts(keyed: &Hmac<Sha256>, header: &str, parts: &[&[u8]]) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    verify_hex_parts(keyed, hex_sig, parts)
}

/// Bare `<hex>` of HMAC-SHA256 over the body (Gitea, Forgejo), compared in constant time.
fn verify_hex(keyed: &Hmac<Sha256>, header: &str, body: &[u8]) -> bool {
    verify_hex_parts(keyed, header.trim(), &[body])
}

fn verify_hex_parts(keyed: &Hmac<Sha256>, hex_sig: &str, parts: &[&[u8]]) -> bool {
    let mut sig = [0u8; 32];
    if hex::decode_to_slice(hex_sig, &mut sig).is_err() {
        return false;
    }
    let mut mac = keyed.clone();
    for p in parts {
        mac.update(p);
    }
    mac.verify_slice(&sig).is_ok()
}

/// `sha1=<hex>` over the raw body (GitHub's `X-Hub-Signature`), compared in constant time.
pub fn verify_sha1(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha1=") else {
        return false;
    };
    let mut sig = [0u8; 20];
    if hex::decode_to_slice(hex_sig, &mut sig).is_err() {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// `sha256=<hex>` of the body, as a sender computes it.
pub use crate::hash::sign;

/// `X-Drover-Signature` of a generic hook's request: `sha256=<hex>` of HMAC-SHA256 over
/// `TIMESTAMP.BODY` (the `X-Drover-Timestamp` value, a dot, the raw body), as a sender
/// computes it.
pub fn sign_timestamped(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = keyed(secret);
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `sha1=<hex>` of the body, as GitHub computes `X-Hub-Signature`.
pub fn sign_sha1(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("hmac takes keys of any length");
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GITHUB_SECRET: &[u8] = b"It's a Secret to Everybody";
    const GITHUB_BODY: &[u8] = b"Hello, World!";
    const GITHUB_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_published_vector_verifies() {
        assert!(verify_signature(
            GITHUB_SECRET,
            Some(GITHUB_SIGNATURE),
            GITHUB_BODY
        ));
        assert_eq!(sign(GITHUB_SECRET, GITHUB_BODY), GITHUB_SIGNATURE);
    }

    #[test]
    fn sha1_signature_matches_an_independent_hmac_sha1() {
        // RFC 2202 test case 2.
        let sig = sign_sha1(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        assert!(verify_sha1(b"Jefe", &sig, b"what do ya want for nothing?"));
        assert!(!verify_sha1(b"Jefe", &sig, b"what do ya want for nothing!"));
        assert!(!verify_sha1(b"jefe", &sig, b"what do ya want for nothing?"));
        assert!(!verify_sha1(
            b"Jefe",
            "sha256=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79",
            b"what do ya want for nothing?"
        ));
    }

    #[test]
    fn wrong_missing_or_malformed_signatures_fail() {
        let flipped = GITHUB_SIGNATURE.replace("757107", "757108");
        let cases: [Option<&str>; 8] = [
            None,
            Some(""),
            Some("sha256="),
            Some(&flipped),
            Some("sha1=757107ea0eb2509fc211221cce984b8a37570b6d"),
            Some("sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"),
            Some("sha256=757107ea0eb2509fc211221cce984b8a"),
            Some("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"),
        ];
        for c in cases {
            assert!(
                !verify_signature(GITHUB_SECRET, c, GITHUB_BODY),
                "{c:?} accepted"
            );
        }
        assert!(!verify_signature(
            b"other",
            Some(GITHUB_SIGNATURE),
            GITHUB_BODY
        ));
        assert!(!verify_signature(
            GITHUB_SECRET,
            Some(GITHUB_SIGNATURE),
            b"Hello, World?"
        ));
    }

    fn keys(yaml: &str, files: &[(&str, &str)]) -> (Keys, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut yaml = yaml.to_owned();
        for (name, content) in files {
            let p = dir.path().join(name);
            std::fs::write(&p, content).expect("write");
            yaml = yaml.replace(&format!("{{{name}}}"), &p.display().to_string());
        }
        let c = config::Config::parse(Path::new("t.yml"), &yaml).expect("config");
        (Keys::load(&c.hooks[0]).expect("keys"), dir)
    }

    fn push(repo: &str) -> Vec<u8> {
        format!(r#"{{"ref":"refs/heads/main","repository":{{"full_name":"{repo}"}}}}"#).into_bytes()
    }

    #[test]
    fn each_repository_is_checked_against_its_own_secret_only() {
        let (k, _dir) = keys(
            "hooks:\n  - name: gh\n    kind: github\n    secrets:\n      owner/web: {web}\n      \"owner/stack-.+\": {stacks}\n    action: update-services\n",
            &[("web", "web-secret\n"), ("stacks", "stacks-secret")],
        );
        let sig = |secret: &[u8], body: &[u8]| sign(secret, body);
        let web = push("owner/web");
        let media = push("owner/stack-media");
        let check = |body: &[u8], s: &str| {
            k.verify(
                &Presented {
                    sha256: Some(s),
                    ..Presented::default()
                },
                body,
            )
        };
        assert!(check(&web, &sig(b"web-secret", &web)));
        assert!(!check(&web, &sig(b"stacks-secret", &web)));
        assert!(check(&media, &sig(b"stacks-secret", &media)));
        assert!(!check(&media, &sig(b"web-secret", &media)));
        let other = push("someone/else");
        assert!(
            !check(&other, &sig(b"web-secret", &other)),
            "a repository without a secret is refused"
        );
        assert!(!check(b"{}", &sig(b"web-secret", b"{}")));
    }

    #[test]
    fn sha1_is_accepted_only_without_sha256_and_unless_switched_off() {
        let yaml = "hooks:\n  - name: gh\n    kind: github\n    secret_file: {s}\n    action: update-services\n";
        let (k, _dir) = keys(yaml, &[("s", "topsecret")]);
        let body = push("owner/web");
        let sha1 = sign_sha1(b"topsecret", &body);
        let only_sha1 = Presented {
            sha1: Some(&sha1),
            ..Presented::default()
        };
        assert!(k.verify(&only_sha1, &body));
        let wrong256 = sign(b"other", &body);
        let both = Presented {
            sha256: Some(&wrong256),
            sha1: Some(&sha1),
            ..Presented::default()
        };
        assert!(
            !k.verify(&both, &body),
            "a present sha256 decides, sha1 is not a fallback"
        );
        let (k, _dir) = keys(
            &yaml.replace("    action", "    accept_sha1: false\n    action"),
            &[("s", "topsecret")],
        );
        assert!(!k.verify(&only_sha1, &body));
    }
}
