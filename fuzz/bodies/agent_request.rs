//! The agent API's request checks: any headers and body must give a plain refusal or a
//! pass, never a panic; whatever passes the full signature check passes the cheap
//! pre-body check too (so the pre-body check never refuses a genuine request); a request
//! signed with the key for this route and node passes once; and the bodies the routes
//! parse (apply, heartbeat, forwarded webhook, jobs query) parse or fail plainly.
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use drover::cluster::wire::{self, Guard, Key, To};

/// The receiver's clock in every run, so the corpus's timestamps stay fresh.
const NOW: i64 = 1_700_000_000;

pub fn run(data: &[u8]) {
    // Layout: [headers length][headers: `name: value` lines][body].
    let Some((&hlen, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = rest.split_at(usize::from(hlen).min(rest.len()));
    let mut headers = HeaderMap::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(n, v);
        }
    }
    let key = Key::from_bytes(b"fuzz cluster key");
    let guard = Guard::new(key.clone(), Duration::from_secs(30));
    let to = To {
        path: wire::APPLY_PATH,
        node: "node-a",
    };
    let pre = guard.precheck(&headers, NOW);
    if guard.verify(&headers, to, body, NOW).is_ok() {
        assert!(pre.is_ok(), "a verified request failed the pre-body check");
    }
    let _ = serde_json::from_slice::<wire::ApplyRequest>(body);
    let _ = serde_json::from_slice::<drover::cluster::contacts::Heartbeat>(body);
    let _ = serde_json::from_slice::<drover::cluster::forward::Envelope>(body);
    let _ = serde_json::from_slice::<drover::cluster::forward::JobsQuery>(body);

    // The same body, signed for this route and node: passes once, and nowhere else.
    let ts = NOW.to_string();
    let mut signed = HeaderMap::new();
    signed.insert(
        wire::TIMESTAMP_HEADER,
        HeaderValue::from_static("1700000000"),
    );
    signed.insert(wire::NONCE_HEADER, HeaderValue::from_static("fuzz-nonce"));
    let sig = key.sign(&ts, "fuzz-nonce", to, body);
    if let Ok(v) = HeaderValue::from_str(&sig) {
        signed.insert(wire::SIGNATURE_HEADER, v);
    }
    let elsewhere = To {
        path: wire::HEARTBEAT_PATH,
        node: "node-a",
    };
    assert!(guard.verify(&signed, elsewhere, body, NOW).is_err());
    assert!(guard.precheck(&signed, NOW).is_ok());
    assert!(guard.verify(&signed, to, body, NOW).is_ok());
    assert!(
        guard.verify(&signed, to, body, NOW).is_err(),
        "a replay passed"
    );
}
