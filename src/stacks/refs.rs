//! The branch head of a repository served over git's smart HTTP, in one request:
//! `GET {repository}/info/refs?service=git-upload-pack`, the ref advertisement of protocol
//! v0, read for `refs/heads/BRANCH`. A poll that finds the head already deployed starts
//! no container. `https://` (through the one outbound client, `crate::outbound`, with the
//! system's roots) and plain `http://` (a server on a private network); ssh repositories
//! are looked up by the deploy container's fetch instead.

use std::time::Duration;

use crate::config::Stack;

/// The whole lookup's time limit.
const LIMIT: Duration = Duration::from_secs(20);
/// Bytes of advertisement read at most (a repository with many refs is cut off there).
const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot look up the branch head: {0}")]
    Lookup(String),
    #[error("cannot look up the branch head: the server answered {0}")]
    Status(u16),
    #[error("branch {0} does not exist in the repository")]
    NoBranch(String),
}

/// Whether the head of `repository` can be looked up here (rather than by a fetch).
pub fn can_look_up(repository: &str) -> bool {
    repository.starts_with("https://") || repository.starts_with("http://")
}

/// The commit `refs/heads/{branch}` points at.
pub async fn head(stack: &Stack, branch: &str) -> Result<String, Error> {
    let token = match &stack.token_file {
        Some(f) => Some(
            crate::config::read_secret(f)
                .map_err(|e| Error::Lookup(format!("cannot read {}: {e}", f.display())))?,
        ),
        None => None,
    };
    let body = tokio::time::timeout(LIMIT, fetch(&stack.repository, token))
        .await
        .map_err(|_| Error::Lookup("timed out".into()))??;
    find(&body, branch).ok_or_else(|| Error::NoBranch(branch.to_owned()))
}

/// The advertisement's URL: the repository's, with `/info/refs?service=git-upload-pack`.
fn refs_url(repository: &str) -> Result<hyper::Uri, Error> {
    if !can_look_up(repository) {
        return Err(Error::Lookup("not an http(s) repository".into()));
    }
    format!(
        "{}/info/refs?service=git-upload-pack",
        repository.trim_end_matches('/')
    )
    .parse()
    .map_err(|_| Error::Lookup("the repository is not a valid URL".into()))
}

async fn fetch(repository: &str, token: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
    let url = refs_url(repository)?;
    let mut headers = vec![("user-agent", "git/2.0 (drover)".to_owned())];
    if let Some(token) = token {
        headers.push(("authorization", super::deployer::basic_auth(&token)));
    }
    let resp = crate::outbound::send(
        hyper::Method::GET,
        &url,
        &headers,
        hyper::body::Bytes::new(),
        MAX_BODY,
    )
    .await
    .map_err(|e| Error::Lookup(e.to_string()))?;
    if !(200..300).contains(&resp.status) {
        return Err(Error::Status(resp.status));
    }
    if !resp.complete {
        return Err(Error::Lookup(
            "the ref advertisement is larger than 4 MiB".into(),
        ));
    }
    Ok(resp.body.to_vec())
}

/// The commit of `refs/heads/{branch}` in a protocol-v0 ref advertisement (pkt-lines:
/// four hex digits of length, then `SHA REF`, the first ref followed by NUL and
/// capabilities).
pub fn find(body: &[u8], branch: &str) -> Option<String> {
    let want = format!("refs/heads/{branch}");
    let mut rest = body;
    while rest.len() >= 4 {
        let len = usize::from_str_radix(std::str::from_utf8(&rest[..4]).ok()?, 16).ok()?;
        if len == 0 {
            rest = &rest[4..];
            continue;
        }
        if len < 4 || len > rest.len() {
            return None;
        }
        let line = &rest[4..len];
        rest = &rest[len..];
        let line = line.split(|b| *b == 0).next().unwrap_or_default();
        let line = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
        if let Some((sha, name)) = line.split_once(' ') {
            if name == want && super::deployer::is_commit(sha) {
                return Some(sha.to_owned());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn the_branch_head_is_read_from_a_ref_advertisement() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let body = format!(
            "{}0000{}{}{}0000",
            pkt("# service=git-upload-pack\n"),
            pkt(&format!("{a} HEAD\0multi_ack side-band-64k\n")),
            pkt(&format!("{b} refs/heads/main\n")),
            pkt(&format!("{a} refs/heads/mainline\n")),
        );
        assert_eq!(find(body.as_bytes(), "main"), Some(b.clone()));
        assert_eq!(find(body.as_bytes(), "mainline"), Some(a));
        assert_eq!(find(body.as_bytes(), "next"), None);
        assert_eq!(find(b"zzzz", "main"), None);
    }

    #[test]
    fn the_advertisement_url_and_credentials_are_the_ones_git_uses() {
        assert_eq!(
            refs_url("https://git.example.com/lab/web.git/")
                .expect("url")
                .to_string(),
            "https://git.example.com/lab/web.git/info/refs?service=git-upload-pack"
        );
        assert_eq!(
            refs_url("http://10.0.0.2:3000/lab/web")
                .expect("url")
                .to_string(),
            "http://10.0.0.2:3000/lab/web/info/refs?service=git-upload-pack"
        );
        assert!(refs_url("ssh://git@h/lab/web.git").is_err());
        assert!(refs_url("git@h:lab/web.git").is_err());
        // base64("x-access-token:tok"), base64("drover:tok")
        assert_eq!(
            super::super::deployer::basic_auth(b"tok"),
            "Basic eC1hY2Nlc3MtdG9rZW46dG9r"
        );
        assert_eq!(
            super::super::deployer::basic_auth(b"drover:tok"),
            "Basic ZHJvdmVyOnRvaw=="
        );
    }
}
