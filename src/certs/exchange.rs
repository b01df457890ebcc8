//! What the certificate manager and the render loop tell each other, through watch
//! channels (the newest value is all either side needs):
//! - the manager *publishes* the challenge tokens to serve and the certificates it holds
//!   ([`Published`], with a generation that grows on every change);
//! - the render loop renders them into the ACME target (tokens as exact nginx locations,
//!   each certificate's fingerprint as a comment, so a renewed pair changes the file),
//!   hands the pairs to every node with the file, and reports the newest generation that
//!   every node running the proxy serves ([`Exchange::served`]): the manager asks the CA
//!   to validate only then;
//! - the render loop says which certificates the routed TLS hosts want ([`Wanted`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::acme::Token;
use super::seal;
pub use crate::tls::Pair;

/// Purpose of the seal on a pair sent to an agent (not the one it is stored under).
const WIRE_PURPOSE: &str = "certificate delivery";

/// Seals `pair` with the cluster key for the agent API (the overlay may not be encrypted).
pub fn seal_pair(key: &[u8], pair: &Pair) -> Result<String, seal::Error> {
    use base64::Engine as _;
    let plain = serde_json::to_vec(pair).map_err(|_| seal::Error::Open)?;
    let sealed = seal::seal(key, WIRE_PURPOSE, &plain)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
}

/// Opens what [`seal_pair`] made with the same key.
pub fn open_pair(key: &[u8], sealed: &str) -> Result<Pair, seal::Error> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .map_err(|_| seal::Error::Short)?;
    let plain = seal::open(key, WIRE_PURPOSE, &bytes)?;
    serde_json::from_slice(&plain).map_err(|_| seal::Error::Open)
}

/// What the manager wants served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Grows on every change of what is published.
    pub generation: u64,
    /// HTTP-01 tokens every node's nginx answers, for any host name.
    pub tokens: Vec<Token>,
    /// The certificates drover obtained, by host.
    pub pairs: BTreeMap<String, Arc<Pair>>,
}

impl Published {
    /// `token → key authorization`, as the nginx template renders them.
    pub fn challenges(&self) -> BTreeMap<String, String> {
        self.tokens
            .iter()
            .map(|t| (t.token.clone(), t.key_authorization.clone()))
            .collect()
    }

    /// `host → fingerprint` of every pair.
    pub fn fingerprints(&self) -> BTreeMap<String, String> {
        self.pairs
            .iter()
            .map(|(h, p)| (h.clone(), p.fingerprint()))
            .collect()
    }
}

/// A certificate a routed TLS host wants: its names, the host first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub host: String,
    /// The host, then its `routing-extra-hosts`.
    pub names: Vec<String>,
    /// A service on the host says `routing-acme: "true"`.
    pub opted_in: bool,
}

/// The channels between the manager and the render loop (one of each, for the ACME
/// target named here).
pub struct Exchange {
    pub target: String,
    pub published: watch::Sender<Published>,
    pub served: watch::Sender<u64>,
    pub wanted: watch::Sender<Vec<Wanted>>,
}

impl Exchange {
    pub fn new(target: &str) -> Arc<Exchange> {
        Arc::new(Exchange {
            target: target.to_owned(),
            published: watch::Sender::new(Published::default()),
            served: watch::Sender::new(0),
            wanted: watch::Sender::new(Vec::new()),
        })
    }

    /// Changes what is published, with a new generation; returns it.
    pub fn publish(&self, f: impl FnOnce(&mut Published)) -> u64 {
        let mut generation = 0;
        self.published.send_modify(|p| {
            f(p);
            p.generation += 1;
            generation = p.generation;
        });
        generation
    }
}

/// A valid HTTP-01 token or key authorization: base64url and one `.` (RFC 8555 8.1, 8.3).
/// Anything else would be written into nginx's config: refused.
pub fn safe_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_crosses_the_wire_sealed_and_opens_with_the_same_key_only() {
        let pair = Pair::new("a.test".into(), "CHAIN".into(), "PRIVATE-KEY-BYTES".into());
        let sealed = seal_pair(b"k1", &pair).expect("seal");
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(open_pair(b"k1", &sealed), Ok(pair.clone()));
        assert!(open_pair(b"k2", &sealed).is_err());
        assert!(!format!("{pair:?}").contains("PRIVATE"));
    }

    #[test]
    fn only_base64url_tokens_reach_the_config() {
        assert!(safe_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(safe_token("tok.thumb-print_x"));
        for bad in ["", "a b", "a;b", "a\"b", "a}b", "a\nb", "$x"] {
            assert!(!safe_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn every_publish_is_a_new_generation() {
        let x = Exchange::new("nginx");
        let g1 = x.publish(|p| p.tokens.clear());
        let g2 = x.publish(|_| {});
        assert!(g2 > g1);
        assert_eq!(x.published.borrow().generation, g2);
    }
}
