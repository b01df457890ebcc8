//! The one content hash: SHA-256, hex. It names a rendered file's content (what is in
//! place, what failed its check, what a node holds) and a host block's text. And the one
//! body signature: `sha256=<hex>` of HMAC-SHA256, as GitHub signs (`X-Hub-Signature-256`),
//! which drover verifies on hooks and puts on the notifications it sends.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256=<hex>` of HMAC-SHA256 of `body` under `secret`, as a sender computes it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
