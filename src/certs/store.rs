//! What must survive a restart or a leader change without shared disk — the ACME account,
//! every certificate with its key, the ledger — kept in Swarm config objects, which Raft
//! replicates to every manager. Each is sealed ([`super::seal`]) with a key derived from
//! the cluster key: the Engine API hands config data to anyone who may list configs.
//!
//! One object per thing, named `drover-acme-SCOPE-KIND-ID-VERSION` and labelled with the
//! scope (the job journal's name, so two deployments on one Swarm keep apart), the kind
//! and, for a certificate, its host. Objects are immutable: a new version is created
//! before the older ones of the same thing are removed, so a crash in between leaves two,
//! and the newest is read.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use instant_acme::AccountCredentials;
use serde::{Deserialize, Serialize};

use super::exchange::Pair;
use super::ledger::Ledger;
use super::seal;
use crate::docker::Engine;
use crate::hash::sha256_hex;

const SCOPE_LABEL: &str = "drover.acme";
const KIND_LABEL: &str = "drover.acme.kind";
const HOST_LABEL: &str = "drover.acme.host";
const AT_LABEL: &str = "drover.acme.at";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Swarm configs: {0}")]
    Engine(#[from] crate::docker::Error),
    #[error("sealing: {0}")]
    Seal(#[from] seal::Error),
}

/// A certificate as kept: its names (the host first) and the pair.
#[derive(Clone, Serialize, Deserialize)]
pub struct Kept {
    pub names: Vec<String>,
    pub pair: Pair,
}

/// Everything read back.
#[derive(Default)]
pub struct Loaded {
    pub account: Option<AccountCredentials>,
    pub certificates: BTreeMap<String, Kept>,
    pub ledger: Ledger,
    /// Objects that did not open (another cluster key, or altered): named in the log.
    pub unreadable: Vec<String>,
}

pub struct Store {
    engine: Engine,
    scope: String,
    key: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Account,
    Certificate,
    Ledger,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Account => "account",
            Kind::Certificate => "certificate",
            Kind::Ledger => "ledger",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Account, Kind::Certificate, Kind::Ledger]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl Store {
    pub fn new(engine: Engine, scope: &str, key: &[u8]) -> Store {
        Store {
            engine,
            scope: scope.to_owned(),
            key: key.to_vec(),
        }
    }

    /// Reads every object of this scope; of several versions of one thing, the newest.
    pub async fn load(&self) -> Result<Loaded, Error> {
        let configs = self
            .engine
            .list_configs(&format!("{SCOPE_LABEL}={}", self.scope))
            .await?;
        // (kind, host) → (at, name, plain)
        let mut newest: BTreeMap<(String, String), (u64, String, Vec<u8>)> = BTreeMap::new();
        let mut loaded = Loaded::default();
        for c in configs {
            let Some(spec) = c.spec else { continue };
            let name = spec.name.unwrap_or_default();
            let labels = spec.labels.unwrap_or_default();
            let kind = labels.get(KIND_LABEL).cloned().unwrap_or_default();
            let host = labels.get(HOST_LABEL).cloned().unwrap_or_default();
            let at: u64 = labels
                .get(AT_LABEL)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0);
            let plain = spec
                .data
                .and_then(|d| {
                    base64::engine::general_purpose::STANDARD
                        .decode(d.trim())
                        .ok()
                })
                .and_then(|d| seal::open(&self.key, &purpose(&kind), &d).ok());
            let Some(plain) = plain else {
                loaded.unreadable.push(name);
                continue;
            };
            let slot = newest
                .entry((kind, host))
                .or_insert((0, String::new(), Vec::new()));
            if at >= slot.0 {
                *slot = (at, name, plain);
            }
        }
        for ((kind, host), (_, name, plain)) in newest {
            match Kind::parse(&kind) {
                Some(Kind::Account) => loaded.account = serde_json::from_slice(&plain).ok(),
                Some(Kind::Ledger) => {
                    loaded.ledger = serde_json::from_slice(&plain).unwrap_or_default()
                }
                Some(Kind::Certificate) => match serde_json::from_slice::<Kept>(&plain) {
                    Ok(kept) => {
                        loaded.certificates.insert(host, kept);
                    }
                    Err(_) => loaded.unreadable.push(name),
                },
                None => loaded.unreadable.push(name),
            }
        }
        Ok(loaded)
    }

    pub async fn put_account(&self, credentials: &AccountCredentials) -> Result<(), Error> {
        let plain = serde_json::to_vec(credentials).unwrap_or_default();
        self.put(Kind::Account, "", &plain).await
    }

    pub async fn put_certificate(&self, kept: &Kept) -> Result<(), Error> {
        let plain = serde_json::to_vec(kept).unwrap_or_default();
        self.put(Kind::Certificate, &kept.pair.host, &plain).await
    }

    pub async fn put_ledger(&self, ledger: &Ledger) -> Result<(), Error> {
        let plain = serde_json::to_vec(ledger).unwrap_or_default();
        self.put(Kind::Ledger, "", &plain).await
    }

    /// Creates the new version, then removes the older ones of the same thing.
    async fn put(&self, kind: Kind, host: &str, plain: &[u8]) -> Result<(), Error> {
        let sealed = seal::seal(&self.key, &purpose(kind.as_str()), plain)?;
        let at = crate::clock::unix_nanos().to_string();
        let id = &sha256_hex(host.as_bytes())[..8];
        let version = &sha256_hex(&sealed)[..8];
        let name = object_name(&self.scope, kind.as_str(), id, version);
        let labels = HashMap::from([
            (SCOPE_LABEL.to_owned(), self.scope.clone()),
            (KIND_LABEL.to_owned(), kind.as_str().to_owned()),
            (HOST_LABEL.to_owned(), host.to_owned()),
            (AT_LABEL.to_owned(), at),
        ]);
        self.engine.create_config(&name, labels, &sealed).await?;
        let older = self
            .engine
            .list_configs(&format!("{SCOPE_LABEL}={}", self.scope))
            .await?;
        for c in older {
            let Some(spec) = c.spec else { continue };
            let labels = spec.labels.unwrap_or_default();
            let same = labels.get(KIND_LABEL).map(String::as_str) == Some(kind.as_str())
                && labels.get(HOST_LABEL).map(String::as_str) == Some(host);
            let other = spec.name.unwrap_or_default();
            if same && other != name {
                // Left for the next put when it fails: the newest is read anyway.
                let _ = self.engine.delete_config(&other).await;
            }
        }
        Ok(())
    }
}

/// The seal's purpose per kind: a blob of one kind never opens as another.
fn purpose(kind: &str) -> String {
    format!("acme {kind}")
}

/// A Swarm object name: at most 64 characters whatever the scope (1-32 characters).
fn object_name(scope: &str, kind: &str, id: &str, version: &str) -> String {
    let kind = &kind[..1];
    format!("drover-acme-{scope}-{kind}{id}-{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_fit_swarm_for_the_longest_scope() {
        let scope = "a".repeat(32);
        let name = object_name(&scope, "certificate", &"f".repeat(8), &"0".repeat(8));
        assert!(name.len() <= 64, "{} characters: {name}", name.len());
        assert!(name.starts_with("drover-acme-"));
    }

    #[test]
    fn each_kind_seals_under_its_own_purpose() {
        let sealed = seal::seal(b"k", &purpose("ledger"), b"{}").expect("seal");
        assert!(seal::open(b"k", &purpose("account"), &sealed).is_err());
        assert!(seal::open(b"k", &purpose("ledger"), &sealed).is_ok());
    }
}
