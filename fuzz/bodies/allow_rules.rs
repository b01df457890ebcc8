//! `allow` rules: an operator's regex (any text) is compiled as a full match or refused
//! with an error, and matching any payload value against it never panics. A rule always
//! matches whole values: a value matched by a literal rule equals the literal.
//!
//! Shared by the cargo-fuzz target (fuzz/fuzz_targets/) and the smoke run in
//! tests/fuzz_smoke.rs, so both exercise one body.

use drover::config::FullMatch;

fn rule(pattern: &str) -> Option<FullMatch> {
    // Rules arrive as YAML strings in the config file; JSON quoting (valid YAML) keeps any
    // text one string.
    serde_yaml_ng::from_str::<FullMatch>(&serde_json_quote(pattern)).ok()
}

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Layout: PATTERN \n VALUE (the value may hold further newlines).
    let (pattern, value) = text.split_once('\n').unwrap_or((text, ""));
    if let Some(r) = rule(pattern) {
        let _ = r.is_match(value);
    }
    if let Some(literal) = rule(&regex_escape(pattern)) {
        assert!(
            literal.is_match(pattern),
            "a literal rule refused its own text"
        );
        if value != pattern {
            assert!(!literal.is_match(value), "{pattern:?} matched {value:?}");
        }
    }
}

/// The pattern as a regex matching exactly that text.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A double-quoted YAML scalar holding exactly `text`.
fn serde_json_quote(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20
                || c == '\u{7f}'
                || c == '\u{85}'
                || c == '\u{2028}'
                || c == '\u{2029}'
                || c == '\u{feff}' =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
