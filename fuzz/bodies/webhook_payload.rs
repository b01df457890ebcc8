//! The image reference of a webhook payload (generic hooks send `{"image": ...}`; Docker Hub
//! sends repo and tag): any string gives an error or a reference whose parts are plain
//! and re-parse to the same value.
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

pub fn run(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(image) = drover::update::ImageRef::parse(raw) {
        for part in [&image.registry, &image.repo, &image.tag] {
            assert!(!part.is_empty(), "empty part of {raw:?}: {image:?}");
            assert!(
                // No `+`: distribution's grammar allows it only in a digest's algorithm
                // (this target once found `127.0.0.1:500+0/app:latest` accepted).
                part.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b)),
                "{raw:?} gave {image:?}"
            );
        }
    }
}
