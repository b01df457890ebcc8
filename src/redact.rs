//! What a job may show of command, container and engine output: a bounded tail with the
//! values of secrets drover loaded cut out.
//!
//! Invariants: every job message and output tail passes [`Redactor::clean`] before a job
//! view, the journal or a log line holds it. Hook tokens are known only by their SHA-256
//! and length (SECURITY.md: the token itself is not kept), so they are found by hashing
//! each window of that length; HMAC keys and registry passwords are held by drover anyway
//! and are matched as they are. Values shorter than [`MIN_SECRET`] bytes are not looked
//! for: cutting every `a` out of a message helps no one.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

/// Bytes of a job or service message kept (its end: errors come last).
pub const MESSAGE_MAX: usize = 4096;
/// Bytes of a command's or container's output tail kept.
pub const LOG_TAIL_MAX: usize = 16 * 1024;
/// Secrets shorter than this are not redacted.
pub const MIN_SECRET: usize = 4;
/// What a secret value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// The secret values to cut out of job output.
///
/// A handle: clones share one set of secrets, so the intake can add the secrets of hooks
/// a reload brings in while the job table, which holds a clone, keeps cleaning with the
/// same set. Secrets are only ever added: output of a job run before a reload may still
/// hold a removed hook's secret.
#[derive(Default, Clone)]
pub struct Redactor {
    secrets: Arc<RwLock<Secrets>>,
}

#[derive(Default)]
struct Secrets {
    plain: Vec<String>,
    /// (length, SHA-256) of secrets known only by their hash.
    hashed: Vec<(usize, [u8; 32])>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.read();
        write!(
            f,
            "Redactor({} plain, {} hashed)",
            s.plain.len(),
            s.hashed.len()
        )
    }
}

impl Redactor {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Secrets> {
        // A panic while adding leaves at worst a secret not added yet; still usable.
        self.secrets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Secrets> {
        self.secrets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A secret held as its value.
    pub fn add(&self, secret: &[u8]) {
        // A secret that is not UTF-8 cannot appear in a `str` as such.
        if let Ok(s) = std::str::from_utf8(secret) {
            let mut secrets = self.write();
            if s.len() >= MIN_SECRET && !secrets.plain.iter().any(|p| p == s) {
                secrets.plain.push(s.to_owned());
            }
        }
    }

    /// A secret known only by its length and SHA-256.
    pub fn add_hashed(&self, len: usize, sha256: [u8; 32]) {
        let mut secrets = self.write();
        if len >= MIN_SECRET && !secrets.hashed.contains(&(len, sha256)) {
            secrets.hashed.push((len, sha256));
        }
    }

    /// `text` with every known secret replaced by [`REDACTED`], then cut to its last
    /// `max` bytes (at a character boundary, marked with a leading `…`).
    pub fn clean(&self, text: &str, max: usize) -> String {
        let mut out = text.to_owned();
        let secrets = self.read();
        for secret in &secrets.plain {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        for (len, hash) in &secrets.hashed {
            out = replace_hashed(&out, *len, hash);
        }
        // Output reaches here already cut to its tail (a command's or container's last
        // bytes or lines): a secret split at that cut starts the text with its end.
        for secret in &secrets.plain {
            out = replace_cut_start(&out, secret);
        }
        tail(&out, max)
    }
}

/// `text` with a leading piece that is the end of `secret` (at least [`MIN_SECRET`]
/// bytes, after an optional `…` cut mark) replaced by [`REDACTED`].
fn replace_cut_start(text: &str, secret: &str) -> String {
    let (mark, body) = match text.strip_prefix('…') {
        Some(rest) => ("…", rest),
        None => ("", text),
    };
    let longest = (MIN_SECRET..secret.len())
        .rev()
        .map(|k| secret.len() - k)
        .filter(|&from| secret.is_char_boundary(from))
        .find(|&from| body.starts_with(&secret[from..]));
    match longest {
        Some(from) => format!("{mark}{REDACTED}{}", &body[secret.len() - from..]),
        None => text.to_owned(),
    }
}

fn replace_hashed(text: &str, len: usize, hash: &[u8; 32]) -> String {
    if text.len() < len {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i + len <= text.len() {
        if text.is_char_boundary(i)
            && text.is_char_boundary(i + len)
            && Sha256::digest(&text.as_bytes()[i..i + len]).as_slice() == hash
        {
            out.push_str(&text[copied..i]);
            out.push_str(REDACTED);
            i += len;
            copied = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The last `max` bytes of `text`, starting at a character boundary; `…` marks a cut.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut from = text.len() - max + '…'.len_utf8().min(max);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    format!("…{}", &text[from..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_cut_by_an_earlier_tail_is_redacted_in_part_too() {
        let r = Redactor::default();
        r.add(b"supersecretvalue");
        assert_eq!(r.clean("retvalue rest", 100), "[redacted] rest");
        assert_eq!(r.clean("…etvalue rest", 100), "…[redacted] rest");
        assert_eq!(
            r.clean("lue rest", 100),
            "lue rest",
            "under MIN_SECRET: kept"
        );
        assert_eq!(r.clean("x supersecretvalue", 100), "x [redacted]");
    }

    fn redactor() -> Redactor {
        let r = Redactor::default();
        r.add(b"hmac-key-1");
        r.add(b"registry-pw");
        r.add(b"abc"); // too short to look for
        let token = "hub-token-0123";
        r.add_hashed(token.len(), Sha256::digest(token.as_bytes()).into());
        r
    }

    #[test]
    fn loaded_secret_values_are_cut_out_wherever_they_appear() {
        let r = redactor();
        let out = r.clean(
            "env: DROVER_X=1 SECRET=hmac-key-1\nlogin registry-pw failed; token hub-token-0123!",
            MESSAGE_MAX,
        );
        assert_eq!(
            out,
            "env: DROVER_X=1 SECRET=[redacted]\nlogin [redacted] failed; token [redacted]!"
        );
        assert_eq!(r.clean("abc hub-token-012 é", 100), "abc hub-token-012 é");
        assert_eq!(
            r.clean("hub-token-0123hub-token-0123", 100),
            "[redacted][redacted]"
        );
    }

    #[test]
    fn a_secret_added_through_one_handle_is_cut_out_by_every_clone() {
        let r = Redactor::default();
        let held_by_jobs = r.clone();
        assert_eq!(held_by_jobs.clean("key new-secret", 100), "key new-secret");
        r.add(b"new-secret");
        assert_eq!(held_by_jobs.clean("key new-secret", 100), "key [redacted]");
    }

    #[test]
    fn messages_keep_a_bounded_tail() {
        let r = Redactor::default();
        let long = format!("{}the error", "é".repeat(5000));
        let out = r.clean(&long, MESSAGE_MAX);
        assert!(out.len() <= MESSAGE_MAX, "{}", out.len());
        assert!(out.starts_with('…') && out.ends_with("the error"));
        assert_eq!(r.clean("short", MESSAGE_MAX), "short");
    }

    #[test]
    fn a_secret_cut_by_the_bound_does_not_survive_in_part() {
        // Redaction runs before the cut, so the kept tail never holds a secret's end
        // next to where its start was removed.
        let r = redactor();
        let text = format!("x{}registry-pw tail", "y".repeat(10));
        let out = r.clean(&text, 16);
        assert!(!out.contains("pw"), "{out}");
    }
}
