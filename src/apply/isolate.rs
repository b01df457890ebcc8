//! One bad host never freezes the others: when the check of a rendered nginx file fails,
//! which hosts to leave out before checking again.
//!
//! The built-in nginx template marks each host's server blocks (`# host NAME` up to the
//! next marker or `# end of hosts`), so a file is a list of [`Block`]s. The decision is
//! pure: given the blocks of the file that was checked, those of the last good file and
//! the checker's output, [`next`] names the hosts to leave out next:
//!
//! 1. the hosts nginx blames: the block holding the line it names (`in FILE:LINE`, FILE
//!    being the checked file), else a host whose name appears in a path it quotes
//!    (`/etc/letsencrypt/live/HOST/fullchain.pem`);
//! 2. else every host whose block changed since the last good file (or is new);
//! 3. else nothing: the file as a whole is bad (as for any other target).
//!
//! The executor applies [`without`] and checks again, at most [`MAX_EXTRA_CHECKS`] times
//! per pass. A file without markers (a user template) has no blocks: step 3 at once.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use crate::hash::sha256_hex;

/// Extra checks one pass may spend finding the hosts to leave out.
pub const MAX_EXTRA_CHECKS: usize = 6;

const MARKER: &str = "# host ";
const END: &str = "# end of hosts";

/// One host's server blocks in a rendered file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub host: String,
    /// 1-based line numbers, as nginx counts them: the marker to the line before the next.
    pub lines: Range<usize>,
    /// SHA-256 of the block's text: a block that did not change since the last good file
    /// cannot be what broke it.
    pub hash: String,
}

/// The host blocks of `text`, in file order.
pub fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    let mut close = |open: &mut Option<(String, usize, String)>, end: usize| {
        if let Some((host, start, body)) = open.take() {
            out.push(Block {
                host,
                lines: start..end,
                hash: sha256_hex(body.as_bytes()),
            });
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(host) = line.strip_prefix(MARKER) {
            close(&mut open, n);
            open = Some((host.trim().to_owned(), n, String::new()));
        } else if line.starts_with(END) {
            close(&mut open, n);
        } else if let Some((_, _, body)) = open.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let last = text.lines().count() + 1;
    close(&mut open, last);
    out
}

/// `text` without the blocks of `hosts` (each replaced by one comment line, so an
/// operator reading the file sees why the host is missing).
pub fn without(text: &str, hosts: &BTreeSet<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut dropping = false;
    for line in text.split_inclusive('\n') {
        if let Some(host) = line.strip_prefix(MARKER) {
            let host = host.trim();
            dropping = hosts.contains(host);
            if dropping {
                out.push_str(&format!(
                    "# left out: host {host}, its check failed (see drover's status page)\n"
                ));
                continue;
            }
        } else if line.starts_with(END) {
            dropping = false;
        }
        if !dropping {
            out.push_str(line);
        }
    }
    out
}

/// The hosts to leave out next, each with the reason to show, or `None` when nothing
/// more can be left out (the whole file is bad).
///
/// `checked` are the blocks of the file whose check failed with `output`; `file_names`
/// the names nginx may call that file by (the live and the staged name); `good` the
/// blocks of the last file that passed.
pub fn next(
    checked: &[Block],
    good: &[Block],
    output: &str,
    file_names: &[&str],
) -> Option<BTreeMap<String, String>> {
    let message = first_error(output);
    let blamed = blame(checked, output, file_names);
    if !blamed.is_empty() {
        return Some(blamed.into_iter().map(|h| (h, message.clone())).collect());
    }
    let good: BTreeMap<&str, &str> = good
        .iter()
        .map(|b| (b.host.as_str(), b.hash.as_str()))
        .collect();
    let changed: BTreeMap<String, String> = checked
        .iter()
        .filter(|b| good.get(b.host.as_str()) != Some(&b.hash.as_str()))
        .map(|b| {
            (
                b.host.clone(),
                format!("changed with others while the check failed: {message}"),
            )
        })
        .collect();
    (!changed.is_empty()).then_some(changed)
}

/// The hosts nginx's message points at.
fn blame(checked: &[Block], output: &str, file_names: &[&str]) -> BTreeSet<String> {
    let mut hosts = BTreeSet::new();
    for line in output.lines() {
        if let Some(n) = line_in(line, file_names) {
            if let Some(b) = checked.iter().find(|b| b.lines.contains(&n)) {
                hosts.insert(b.host.clone());
                continue;
            }
        }
        // Errors found after parsing (a certificate that does not load) carry no line,
        // only the path, which has the host's name as a directory.
        for b in checked {
            if line.contains(&format!("/{}/", b.host)) {
                hosts.insert(b.host.clone());
            }
        }
    }
    hosts
}

/// The line number of `... in /path/FILE:LINE` when FILE is one of `file_names`.
fn line_in(line: &str, file_names: &[&str]) -> Option<usize> {
    let (_, place) = line.rsplit_once(" in ")?;
    let (path, number) = place.trim().rsplit_once(':')?;
    let name = path.rsplit('/').next()?;
    if !file_names.contains(&name) {
        return None;
    }
    number.parse().ok()
}

/// The first `[emerg]`/`[crit]`/`[error]` message of the checker's output, from its level
/// on (without the time and process id nginx puts before it, so the same fault reads the
/// same on every check), else the output's first line.
fn first_error(output: &str) -> String {
    let lines = || output.lines().map(str::trim).filter(|l| !l.is_empty());
    for line in lines() {
        for level in ["[emerg]", "[crit]", "[error]"] {
            if let Some(at) = line.find(level) {
                let rest = line[at + level.len()..].trim_start();
                // `15#15: ` (pid#thread) when nginx logs through its error log.
                let rest = match rest.split_once(": ") {
                    Some((pid, msg)) if pid.split('#').all(|p| p.parse::<u64>().is_ok()) => msg,
                    _ => rest,
                };
                return format!("{level} {rest}");
            }
        }
    }
    lines().next().unwrap_or("check failed").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# Generated by drover
server { listen 80 default_server; }

upstream a_test { server 10.0.0.2:80; }
# host a.test
server {
    listen 80;
    server_name a.test;
}

# host b.test
server {
    listen 443 ssl;
    server_name b.test;
    ssl_certificate /etc/letsencrypt/live/b.test/fullchain.pem;
}

# host c.test
server {
    listen 80;
    server_name c.test;
    bad_directive;
}
# end of hosts
";

    fn hosts(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn blocks_run_from_their_marker_to_the_next_and_nginx_line_numbers_fall_inside() {
        let b = blocks(FILE);
        let names: Vec<&str> = b.iter().map(|b| b.host.as_str()).collect();
        assert_eq!(names, ["a.test", "b.test", "c.test"]);
        assert_eq!(b[0].lines, 5..11);
        assert_eq!(b[1].lines, 11..18);
        assert_eq!(b[2].lines, 18..24);
        assert_eq!(FILE.lines().nth(21), Some("    bad_directive;"));
        assert!(b[2].lines.contains(&22));
    }

    #[test]
    fn a_file_without_markers_has_no_blocks_and_nothing_to_leave_out() {
        let text = "server { bad; }\n";
        assert!(blocks(text).is_empty());
        let out = "nginx: [emerg] unknown directive \"bad\" in /etc/nginx/conf.d/x.conf:1";
        assert_eq!(next(&blocks(text), &[], out, &["x.conf"]), None);
    }

    #[test]
    fn without_drops_exactly_the_blocks_named_and_says_so() {
        let text = without(FILE, &hosts(&["b.test"]));
        assert!(!text.contains("ssl_certificate"), "{text}");
        assert!(text.contains("# left out: host b.test"), "{text}");
        assert!(text.contains("server_name a.test;"));
        assert!(text.contains("server_name c.test;"));
        let left: Vec<String> = blocks(&text).into_iter().map(|b| b.host).collect();
        assert_eq!(left, ["a.test", "c.test"]);
        let none = without(FILE, &hosts(&[]));
        assert_eq!(none, FILE);
        let last = without(FILE, &hosts(&["c.test"]));
        assert!(last.ends_with("# end of hosts\n"), "{last}");
        assert!(!last.contains("bad_directive"));
    }

    #[test]
    fn the_reason_is_nginx_message_from_its_level_on_the_same_on_every_check() {
        let a = "exited with 1: 2026/11/25 17:41:18 [emerg] 15#15: cannot load certificate \"/x\"\nnginx: configuration file test failed";
        let b = "exited with 1: 2026/11/25 17:41:19 [emerg] 34#34: cannot load certificate \"/x\"";
        assert_eq!(first_error(a), "[emerg] cannot load certificate \"/x\"");
        assert_eq!(first_error(a), first_error(b));
        assert_eq!(
            first_error("nginx: [emerg] unknown directive \"x\" in /a.conf:3"),
            "[emerg] unknown directive \"x\" in /a.conf:3"
        );
        assert_eq!(first_error("exited with 2: oops"), "exited with 2: oops");
    }

    #[test]
    fn the_next_hosts_to_leave_out_follow_the_table() {
        let checked = blocks(FILE);
        let good_all = checked.clone();
        let good_ab: Vec<Block> = checked[..2].to_vec();
        let names = ["drover.conf", ".drover.conf.drover-candidate"];
        let line22 = "nginx: [emerg] unknown directive \"bad_directive\" in /etc/nginx/conf.d/drover.conf:22\n\
                      nginx: configuration file /etc/nginx/nginx.conf test failed";
        let cert = "nginx: [emerg] cannot load certificate \"/etc/letsencrypt/live/b.test/fullchain.pem\": \
                    PEM_read_bio_X509_AUX() failed";
        let staged = "nginx: [emerg] unknown directive \"x\" in /etc/nginx/conf.d/.drover.conf.drover-candidate:7";
        let elsewhere = "nginx: [emerg] unknown directive \"x\" in /etc/nginx/conf.d/other.conf:22";
        let header = "nginx: [emerg] \"server_names_hash_bucket_size\" directive is duplicate in /etc/nginx/conf.d/drover.conf:2";
        let vague = "nginx: [emerg] could not build server_names_hash, you should increase server_names_hash_bucket_size: 64";
        type Case<'a> = (&'a str, &'a str, &'a [Block], Option<Vec<&'a str>>);
        let cases: Vec<Case> = vec![
            (
                "the block of the line nginx names",
                line22,
                &good_ab,
                Some(vec!["c.test"]),
            ),
            (
                "the staged file's name counts too",
                staged,
                &good_all,
                Some(vec!["a.test"]),
            ),
            (
                "a certificate path names its host",
                cert,
                &good_all,
                Some(vec!["b.test"]),
            ),
            (
                "a line in another file blames the changed hosts",
                elsewhere,
                &good_ab,
                Some(vec!["c.test"]),
            ),
            (
                "a line outside every block: the changed hosts",
                header,
                &good_ab,
                Some(vec!["c.test"]),
            ),
            (
                "no place at all: the changed hosts",
                vague,
                &[],
                Some(vec!["a.test", "b.test", "c.test"]),
            ),
            (
                "nothing blamed and nothing changed: the file is bad",
                vague,
                &good_all,
                None,
            ),
        ];
        for (what, output, good, expected) in cases {
            let got = next(&checked, good, output, &names);
            let got_hosts: Option<Vec<&str>> =
                got.as_ref().map(|m| m.keys().map(String::as_str).collect());
            assert_eq!(got_hosts, expected, "{what}");
            if let Some(m) = got {
                for reason in m.values() {
                    assert!(
                        reason.contains("[emerg]"),
                        "{what}: the reason is nginx's: {reason}"
                    );
                }
            }
        }
    }
}
