//! cargo-fuzz entry point; the body is shared with tests/fuzz_smoke.rs.
#![no_main]

#[path = "../bodies/agent_request.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::run(data));
