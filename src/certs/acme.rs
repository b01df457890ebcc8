//! The ACME conversation (RFC 8555) for one certificate, through instant-acme: an account
//! (created once, then restored from its credentials), an order for a set of names, their
//! HTTP-01 challenges answered by whoever the caller says serves the tokens, and the
//! certificate chain with a fresh private key.
//!
//! The caller decides where tokens go: [`Client::obtain`] hands every pending token to
//! `publish` and asks the CA to validate only after `publish` returned `Ok` (in cluster
//! mode: after every node that runs nginx acknowledged the token). Authorizations the CA
//! already holds as valid (Let's Encrypt and Pebble reuse them) need no token. A `badNonce`
//! answer (Pebble rejects 5 % of nonces) is retried by instant-acme itself, three times.
//! The private key never leaves [`Issued`] except through [`Issued::key_pem`], and is never
//! printed by `Debug`.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};

/// How long the CA may take to validate every name of an order, and to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("the CA offers no http-01 challenge for {0}")]
    NoHttpChallenge(String),
    #[error("serving the challenge tokens: {0}")]
    Publish(String),
    #[error("the order for [{names}] ended {status}: {detail}")]
    Order {
        names: String,
        status: String,
        detail: String,
    },
}

/// One HTTP-01 token: nginx answers `GET /.well-known/acme-challenge/TOKEN` with
/// `key_authorization` (public by design: the CA reads it over plain http).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub token: String,
    pub key_authorization: String,
}

/// A certificate chain and its private key.
pub struct Issued {
    pub names: Vec<String>,
    /// The leaf first, then the intermediates (nginx's `fullchain.pem`).
    pub chain_pem: String,
    key_pem: String,
}

impl Issued {
    /// The private key (nginx's `privkey.pem`): write it with mode 0600 only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("names", &self.names)
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// An external account binding key (RFC 8555 §7.3.4): the key identifier and HMAC key a CA
/// such as ZeroSSL or Google Trust Services hands out, needed once, to create the account.
/// Never printed by `Debug`.
pub struct BindingKey {
    kid: String,
    hmac: Vec<u8>,
}

impl BindingKey {
    /// The shortest HMAC key taken: CAs hand out 32 bytes or more; a shorter one is a kid
    /// or a truncated paste.
    const MIN_KEY: usize = 16;

    /// The key from `path` (base64url as the CA shows it, padded or not, surrounding
    /// white space ignored). The error names the file, never its content.
    pub fn load(kid: &str, path: &Path) -> Result<BindingKey, String> {
        let text = crate::config::read_secret(path)
            .map_err(|e| format!("certificates: eab.hmac_key_file {}: {e}", path.display()))?;
        Self::decode(kid, &text)
            .map_err(|why| format!("certificates: eab.hmac_key_file {}: {why}", path.display()))
    }

    fn decode(kid: &str, text: &[u8]) -> Result<BindingKey, String> {
        let text = text.trim_ascii();
        let unpadded = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
        let hmac = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(unpadded.unwrap_or(text))
            .map_err(|_| "the key is not base64url (the CA's HMAC key, as it shows it)")?;
        if hmac.len() < Self::MIN_KEY {
            return Err(format!(
                "the key is {} bytes long; an HMAC key from a CA is at least {}",
                hmac.len(),
                Self::MIN_KEY
            ));
        }
        Ok(BindingKey {
            kid: kid.trim().to_owned(),
            hmac,
        })
    }

    fn external_account_key(&self) -> ExternalAccountKey {
        ExternalAccountKey::new(self.kid.clone(), &self.hmac)
    }
}

impl std::fmt::Debug for BindingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindingKey")
            .field("kid", &self.kid)
            .field("hmac", &"<redacted>")
            .finish()
    }
}

/// An ACME account at one CA.
pub struct Client {
    account: Account,
}

impl Client {
    /// The account at `directory`: restored from `credentials` when given, else created
    /// (terms of service agreed), in which case its new credentials come back to be kept
    /// (they hold the account's private key). `ca` is a PEM root to trust instead of the
    /// system's (a test CA such as Pebble). `binding` signs the creation for a CA that
    /// wants external account binding; a restored account needs it no more.
    pub async fn connect(
        directory: &str,
        ca: Option<&Path>,
        credentials: Option<AccountCredentials>,
        binding: Option<&BindingKey>,
    ) -> Result<(Client, Option<AccountCredentials>), Error> {
        let builder = match ca {
            Some(root) => Account::builder_with_root(root)?,
            None => Account::builder()?,
        };
        if let Some(c) = credentials {
            let account = builder.from_credentials(c).await?;
            return Ok((Client { account }, None));
        }
        let external = binding.map(BindingKey::external_account_key);
        let (account, created) = builder
            .create(
                &NewAccount {
                    contact: &[],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.to_owned(),
                external.as_ref(),
            )
            .await?;
        Ok((Client { account }, Some(created)))
    }

    /// Orders a certificate for `names` (the first is the certificate's main name):
    /// every pending authorization's http-01 token goes to `publish`, and the CA is asked
    /// to validate only once `publish` returned `Ok`.
    pub async fn obtain<P>(&self, names: &[String], publish: P) -> Result<Issued, Error>
    where
        P: AsyncFnOnce(Vec<Token>) -> Result<(), String>,
    {
        let identifiers: Vec<Identifier> =
            names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order = self
            .account
            .new_order(&NewOrder::new(identifiers.as_slice()))
            .await?;

        let mut tokens = Vec::new();
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz?;
                if authz.status != AuthorizationStatus::Pending {
                    // Valid: reused from an earlier order. Anything else shows below.
                    continue;
                }
                let name = authz.identifier().to_string();
                let challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| Error::NoHttpChallenge(name.clone()))?;
                tokens.push(Token {
                    name,
                    token: challenge.token.clone(),
                    key_authorization: challenge.key_authorization().as_str().to_owned(),
                });
            }
        }
        let pending: Vec<String> = tokens.iter().map(|t| t.token.clone()).collect();
        if !tokens.is_empty() {
            publish(tokens).await.map_err(Error::Publish)?;
        }
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                if let Some(mut challenge) = authz.challenge(ChallengeType::Http01) {
                    if pending.contains(&challenge.token) {
                        challenge.set_ready().await?;
                    }
                }
            }
        }

        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(VALIDATION_TIMEOUT);
        // An authorization the CA found invalid ends the poll with the CA's problem (which
        // names the URL it fetched): kept as this order's failure, with its names.
        let status = order.poll_ready(&retries).await.map_err(|e| Error::Order {
            names: names.join(","),
            status: "invalid".to_owned(),
            detail: e.to_string(),
        })?;
        if status != OrderStatus::Ready {
            let detail = order
                .state()
                .error
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "no detail from the CA".to_owned());
            return Err(Error::Order {
                names: names.join(","),
                status: format!("{status:?}").to_ascii_lowercase(),
                detail,
            });
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        Ok(Issued {
            names: names.to_vec(),
            chain_pem,
            key_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_never_prints_its_key() {
        let issued = Issued {
            names: vec!["a.test".into()],
            chain_pem: "-----BEGIN CERTIFICATE-----".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----secret".into(),
        };
        let shown = format!("{issued:?}");
        assert!(
            !shown.contains("secret") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert_eq!(issued.key_pem(), "-----BEGIN PRIVATE KEY-----secret");
    }

    #[test]
    fn a_binding_key_is_base64url_as_the_ca_shows_it_and_never_printed() {
        // Pebble's example key (test/config/pebble-config-external-account-bindings.json).
        let shown = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
        let k = BindingKey::decode("kid-1", format!("{shown}\n").as_bytes()).expect("decodes");
        assert_eq!(k.hmac.len(), 48);
        assert_eq!(k.kid, "kid-1");
        let printed = format!("{k:?}");
        assert!(
            printed.contains("<redacted>") && !printed.contains("zWNDZM"),
            "{printed}"
        );
        // Padded, and with URL-safe characters.
        let padded = BindingKey::decode(
            "k",
            b"--__--__--__--__--__--__--__--__--__--__--__--__--__--__--__--8=",
        )
        .expect("padded");
        assert_eq!(padded.hmac.len(), 47);
    }

    #[test]
    fn a_binding_key_that_is_not_one_is_refused_without_showing_it() {
        let standard = BindingKey::decode("k", b"ab+/ab+/ab+/ab+/ab+/ab+/").unwrap_err();
        assert!(
            standard.contains("not base64url") && !standard.contains("ab+/"),
            "{standard}"
        );
        let short = BindingKey::decode("k", b"c2hvcnQ").unwrap_err();
        assert!(short.contains("5 bytes"), "{short}");
        assert!(BindingKey::decode("k", b"").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none");
        let e = BindingKey::load("k", &missing).unwrap_err();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }
}
