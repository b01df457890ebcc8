//! The branch head of a repository served over git's smart HTTP, in one request:
//! `GET {repository}/info/refs?service=git-upload-pack`, the ref advertisement of protocol
//! v0, read for `refs/heads/BRANCH`. A poll that finds the head already deployed starts
//! no container. Plain `http://` only for now (a server on a private network); https and
//! ssh repositories are looked up by the deploy container's fetch instead.

use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

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

async fn fetch(repository: &str, token: Option<Vec<u8>>) -> Result<Vec<u8>, Error> {
    let rest = repository
        .strip_prefix("http://")
        .ok_or_else(|| Error::Lookup("not an http:// repository".into()))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| Error::Lookup(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Lookup(e.to_string()))?;
    tokio::spawn(conn);
    let uri = format!(
        "/{}/info/refs?service=git-upload-pack",
        path.trim_end_matches('/')
    );
    let mut req = hyper::Request::get(uri)
        .header("host", authority)
        .header("user-agent", "git/2.0 (drover)");
    if let Some(token) = token {
        let text = String::from_utf8_lossy(&token);
        let userpass = if text.contains(':') {
            text.into_owned()
        } else {
            format!("x-access-token:{text}")
        };
        let basic = base64::engine::general_purpose::STANDARD.encode(userpass);
        req = req.header("authorization", format!("Basic {basic}"));
    }
    let req = req
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| Error::Lookup(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::Lookup(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(Error::Status(resp.status().as_u16()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Error::Lookup(e.to_string()))?;
    Ok(body.to_bytes().to_vec())
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
}
