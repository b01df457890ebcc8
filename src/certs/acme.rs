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

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
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

/// An ACME account at one CA.
pub struct Client {
    account: Account,
}

impl Client {
    /// The account at `directory`: restored from `credentials` when given, else created
    /// (terms of service agreed), in which case its new credentials come back to be kept
    /// (they hold the account's private key). `ca` is a PEM root to trust instead of the
    /// system's (a test CA such as Pebble).
    pub async fn connect(
        directory: &str,
        ca: Option<&Path>,
        credentials: Option<AccountCredentials>,
    ) -> Result<(Client, Option<AccountCredentials>), Error> {
        let builder = match ca {
            Some(root) => Account::builder_with_root(root)?,
            None => Account::builder()?,
        };
        if let Some(c) = credentials {
            let account = builder.from_credentials(c).await?;
            return Ok((Client { account }, None));
        }
        let (account, created) = builder
            .create(
                &NewAccount {
                    contact: &[],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.to_owned(),
                None,
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
}
