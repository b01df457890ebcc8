//! Config loading: any text is either refused with a message or gives a config whose
//! durations and sizes are within their bounds (so `run` cannot overflow a deadline or
//! busy-loop on a zero period). Loading itself never panics, whatever the YAML (anchors,
//! deep nesting, huge numbers, bad regexes).
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

use std::path::Path;
use std::time::Duration;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = drover::config::Config::parse(Path::new("fuzz.yml"), text) else {
        return;
    };
    let day = Duration::from_secs(24 * 3600);
    assert!(config.resync >= Duration::from_secs(1) && config.resync <= day);
    assert!(config.http.max_body >= 1 && config.http.max_body <= 64 << 20);
    assert!(config.jobs.queue >= 1);
    for t in &config.targets {
        assert!(t.debounce.min <= t.debounce.max && t.debounce.max <= day);
    }
    for h in &config.hooks {
        assert!(h.quiet <= day && h.rate >= 1);
        // Instant arithmetic the daemon does with these must not overflow.
        let _ = std::time::Instant::now() + h.quiet + config.jobs.update_timeout;
    }
}
