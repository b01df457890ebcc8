//! The one content hash: SHA-256, hex. It names a rendered file's content (what is in
//! place, what failed its check, what a node holds) and a host block's text.

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
