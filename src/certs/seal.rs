//! Sealing what must survive a restart or a leader change without shared disk: the ACME
//! account key, certificates and their keys, the ledger. They go into Swarm config
//! objects, which the Engine API hands back to any manager (unlike secrets, whose data it
//! never returns) — and to anyone who can read configs, so nothing is stored in plaintext.
//!
//! The key is derived from the cluster key (HKDF-SHA256, one key per purpose), the
//! content sealed with ChaCha20-Poly1305 under a fresh random nonce, and the purpose is
//! authenticated too, so a blob cannot be passed off as another one. Format: one version
//! byte, the 12-byte nonce, the ciphertext with its tag. Every instance with the same
//! cluster key opens what another sealed; a different key, a changed byte or another
//! purpose is refused.

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;
const SALT: &[u8] = b"drover certificates seal v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("sealed data too short")]
    Short,
    #[error("sealed data of version {0}: this drover reads version {VERSION}")]
    Version(u8),
    #[error("sealed data does not open with this cluster key (another key, or altered)")]
    Open,
    #[error("no randomness for a nonce")]
    Random,
}

fn key(cluster_key: &[u8], purpose: &str) -> LessSafeKey {
    let prk = Salt::new(HKDF_SHA256, SALT).extract(cluster_key);
    let info = [purpose.as_bytes()];
    let mut bytes = [0u8; 32];
    // HKDF-SHA256 can expand 32 bytes from any input: neither call can fail.
    if let Ok(okm) = prk.expand(&info, &CHACHA20_POLY1305) {
        let _ = okm.fill(&mut bytes);
    }
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
        .unwrap_or_else(|_| unreachable!("a 32-byte key is ChaCha20-Poly1305's length"));
    LessSafeKey::new(unbound)
}

/// Seals `plain` for `purpose` under a key derived from `cluster_key`.
pub fn seal(cluster_key: &[u8], purpose: &str, plain: &[u8]) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; aead::NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::Random)?;
    let mut data = plain.to_vec();
    key(cluster_key, purpose)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose.as_bytes()),
            &mut data,
        )
        .map_err(|_| Error::Open)?;
    let mut out = Vec::with_capacity(1 + nonce.len() + data.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Opens what [`seal`] sealed for `purpose` with the same cluster key.
pub fn open(cluster_key: &[u8], purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, Error> {
    let (&version, rest) = sealed.split_first().ok_or(Error::Short)?;
    if version != VERSION {
        return Err(Error::Version(version));
    }
    if rest.len() < aead::NONCE_LEN + CHACHA20_POLY1305.tag_len() {
        return Err(Error::Short);
    }
    let (nonce, data) = rest.split_at(aead::NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Error::Short)?;
    let mut data = data.to_vec();
    let plain = key(cluster_key, purpose)
        .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut data)
        .map_err(|_| Error::Open)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"cluster-key-for-tests";
    const SECRET: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEA...";

    #[test]
    fn what_one_instance_seals_another_with_the_same_key_opens() {
        let sealed = seal(KEY, "acme-account", SECRET).expect("seal");
        assert_eq!(open(KEY, "acme-account", &sealed), Ok(SECRET.to_vec()));
        // Never the plaintext, and a fresh nonce every time.
        assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"));
        assert_ne!(sealed, seal(KEY, "acme-account", SECRET).expect("seal"));
    }

    #[test]
    fn another_key_another_purpose_or_a_changed_byte_is_refused() {
        let sealed = seal(KEY, "certificate", SECRET).expect("seal");
        assert_eq!(
            open(b"another key", "certificate", &sealed),
            Err(Error::Open)
        );
        assert_eq!(open(KEY, "acme-account", &sealed), Err(Error::Open));
        for i in [0, 1, 13, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(KEY, "certificate", &bad).is_err(), "byte {i}");
        }
        assert_eq!(open(KEY, "certificate", &[]), Err(Error::Short));
        assert_eq!(open(KEY, "certificate", &sealed[..20]), Err(Error::Short));
    }
}
