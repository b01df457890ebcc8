//! A certificate and its private key as they travel from drover's ACME client to the
//! files nginx loads: a shared noun of the certificate manager, the render loop, the
//! agent API and the one executor, so it lives below all of them.

use serde::{Deserialize, Serialize};

/// A certificate chain and its private key, for one host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub host: String,
    /// The leaf first, then the intermediates (nginx's `fullchain.pem`).
    pub chain_pem: String,
    key_pem: String,
}

impl Pair {
    pub fn new(host: String, chain_pem: String, key_pem: String) -> Pair {
        Pair {
            host,
            chain_pem,
            key_pem,
        }
    }

    /// The private key (nginx's `privkey.pem`): written with mode 0600 only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// What the rendered file carries for this pair: a change of either file changes it.
    pub fn fingerprint(&self) -> String {
        crate::hash::sha256_hex(format!("{}\n{}", self.chain_pem, self.key_pem).as_bytes())
    }
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("host", &self.host)
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_or_chain_changes_the_fingerprint() {
        let a = Pair::new("a".into(), "c".into(), "k".into());
        let b = Pair::new("a".into(), "c".into(), "k2".into());
        let c = Pair::new("a".into(), "c2".into(), "k".into());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn the_key_is_never_printed() {
        let pair = Pair::new("a".into(), "c".into(), "PRIVATE".into());
        assert!(!format!("{pair:?}").contains("PRIVATE"));
    }
}
