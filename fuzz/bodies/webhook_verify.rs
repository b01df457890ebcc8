//! Signature verification of webhook bodies: any header, any body, any key must give a
//! plain yes or no, and a body signed with the key must always verify (no panic, no
//! allocation beyond the body).
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

pub fn run(data: &[u8]) {
    // Layout: [key length][key][header length][header][body].
    let Some((&klen, rest)) = data.split_first() else {
        return;
    };
    let (key, rest) = rest.split_at(usize::from(klen).min(rest.len()));
    let Some((&hlen, rest)) = rest.split_first() else {
        return;
    };
    let (header, body) = rest.split_at(usize::from(hlen).min(rest.len()));
    let header = String::from_utf8_lossy(header);
    let verdict = drover::hooks::verify_signature(key, Some(&header), body);
    let signed = drover::hooks::sign(key, body);
    if verdict {
        // Only the exact signature (modulo surrounding whitespace and hex case) verifies.
        assert_eq!(
            header.trim().to_ascii_lowercase(),
            signed,
            "a foreign signature verified"
        );
    }
    assert!(drover::hooks::verify_signature(key, Some(&signed), body));
    assert!(!drover::hooks::verify_signature(key, None, body));
}
