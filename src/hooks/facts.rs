//! Payload facts: the few values of a verified webhook body that rules match and actions get.
//!
//! Invariants: facts are plain strings read from JSON fields by name, never templates and
//! never evaluated; each hook kind has a fixed set of fact names ([`known`]), so a rule on
//! a name the kind never produces is refused when the config is loaded instead of failing
//! every request. Values are bounded (commit ids, messages) because they end up in the job
//! journal and in environment variables.

use serde::Deserialize;

use crate::config::HookKind;
pub use crate::jobs::Facts;
use crate::update::ImageRef;

/// Commit ids kept per push (GitHub sends at most 20 commits in a push payload).
const MAX_COMMIT_IDS: usize = 100;
/// Bytes of the head commit's message kept.
const MAX_MESSAGE: usize = 4096;

/// Why a verified body gave no facts. Fixed strings: nothing from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid docker hub payload")]
    Dockerhub,
    #[error("invalid github payload")]
    Github,
    #[error("invalid json payload")]
    Generic,
    #[error("invalid image reference")]
    Image,
}

impl Error {
    /// The message as a fixed string, for answers that must not carry request data.
    pub fn as_str(self) -> &'static str {
        match self {
            Error::Dockerhub => "invalid docker hub payload",
            Error::Github => "invalid github payload",
            Error::Generic => "invalid json payload",
            Error::Image => "invalid image reference",
        }
    }
}

#[derive(Deserialize)]
struct HubPayload {
    repository: HubRepository,
    push_data: HubPushData,
}
#[derive(Deserialize)]
struct HubRepository {
    repo_name: String,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}
#[derive(Deserialize)]
struct HubPushData {
    tag: String,
    #[serde(default)]
    pusher: Option<String>,
}

#[derive(Deserialize)]
struct GithubPayload {
    #[serde(default, rename = "ref")]
    r#ref: Option<String>,
    #[serde(default)]
    repository: Option<GithubRepository>,
    #[serde(default)]
    sender: Option<GithubUser>,
    // Of the commits only the ids are kept (their messages are skipped unread, not
    // copied and dropped: a push carries up to 20), of the head commit its message.
    #[serde(default)]
    commits: Option<Vec<GithubCommitId>>,
    #[serde(default)]
    head_commit: Option<GithubHeadCommit>,
}
#[derive(Deserialize)]
struct GithubRepository {
    #[serde(default)]
    full_name: Option<String>,
    #[serde(default)]
    clone_url: Option<String>,
}
#[derive(Deserialize)]
struct GithubUser {
    #[serde(default)]
    login: Option<String>,
}
#[derive(Deserialize)]
struct GithubCommitId {
    #[serde(default)]
    id: Option<String>,
}
#[derive(Deserialize)]
struct GithubHeadCommit {
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct GenericPayload {
    image: String,
}

/// Only the repository's full name, read to choose a per-repository secret before the
/// signature is checked; nothing else of an unverified body is looked at.
#[derive(Deserialize)]
struct RepositoryOnly {
    repository: GithubRepository,
}

/// `repository.full_name` of a GitHub body, or `None` if it has none.
pub fn github_repository(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<RepositoryOnly>(body)
        .ok()
        .and_then(|p| p.repository.full_name)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Payload facts of a verified body.
pub fn parse(kind: HookKind, hook: &str, event: Option<&str>, body: &[u8]) -> Result<Facts, Error> {
    let mut f = Facts {
        hook: hook.to_owned(),
        event: event.map(str::to_owned),
        ..Facts::default()
    };
    match kind {
        HookKind::Dockerhub => {
            let p: HubPayload = serde_json::from_slice(body).map_err(|_| Error::Dockerhub)?;
            f.image = Some(format!("{}:{}", p.repository.repo_name, p.push_data.tag));
            f.repository = Some(p.repository.repo_name);
            f.tag = Some(p.push_data.tag);
            f.owner = p.repository.owner;
            f.namespace = p.repository.namespace;
            f.pusher = p.push_data.pusher;
        }
        HookKind::Github => {
            let p: GithubPayload = serde_json::from_slice(body).map_err(|_| Error::Github)?;
            f.r#ref = p.r#ref;
            if let Some(r) = p.repository {
                f.repository = r.full_name;
                f.clone_url = r.clone_url;
            }
            f.sender = p.sender.and_then(|s| s.login);
            if let Some(commits) = p.commits {
                f.commits = Some(commits.len());
                f.commit_ids = commits
                    .into_iter()
                    .filter_map(|c| c.id)
                    .take(MAX_COMMIT_IDS)
                    .collect();
            }
            f.head_commit_message = p
                .head_commit
                .and_then(|c| c.message)
                .map(|m| truncate(m, MAX_MESSAGE));
        }
        HookKind::Generic => {
            let p: GenericPayload = serde_json::from_slice(body).map_err(|_| Error::Generic)?;
            let parsed = ImageRef::parse(&p.image).map_err(|_| Error::Image)?;
            f.repository = Some(parsed.name);
            f.tag = Some(parsed.tag);
            f.image = Some(p.image);
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docker Hub's documented example delivery.
    const HUB_PUSH: &str = r#"{
  "callback_url": "https://registry.hub.docker.com/u/svendowideit/testhook/hook/2141b5bi5i5b02bec211i4eeih0242eg11000a/",
  "push_data": {
    "pushed_at": 1417566161,
    "pusher": "trustedbuilder",
    "tag": "latest"
  },
  "repository": {
    "comment_count": 0,
    "date_created": 1417494799,
    "description": "",
    "dockerfile": "FROM busybox\n",
    "full_description": "",
    "is_official": false,
    "is_private": true,
    "is_trusted": true,
    "name": "testhook",
    "namespace": "svendowideit",
    "owner": "svendowideit",
    "repo_name": "svendowideit/testhook",
    "repo_url": "https://registry.hub.docker.com/u/svendowideit/testhook/",
    "star_count": 0,
    "status": "Active"
  }
}"#;

    /// A GitHub push delivery with two commits, trimmed of the fields drover never reads.
    const GITHUB_PUSH: &str = r#"{
  "ref": "refs/heads/master",
  "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
  "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
  "repository": {
    "id": 186853002,
    "name": "home-stack-web",
    "full_name": "rycus86/home-stack-web",
    "private": false,
    "owner": { "name": "rycus86", "login": "rycus86" },
    "clone_url": "https://github.com/rycus86/home-stack-web.git",
    "ssh_url": "git@github.com:rycus86/home-stack-web.git",
    "default_branch": "master"
  },
  "pusher": { "name": "rycus86", "email": "rycus86@example.com" },
  "sender": { "login": "rycus86", "id": 6233023, "type": "User" },
  "created": false,
  "deleted": false,
  "forced": false,
  "compare": "https://github.com/rycus86/home-stack-web/compare/6113728f27ae...0d1a26e67d8f",
  "commits": [
    {
      "id": "b3d4f1e0c5a1f2e3d4c5b6a7980123456789abcd",
      "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
      "message": "Route the new service",
      "timestamp": "2019-05-15T15:20:30-07:00",
      "author": { "name": "Viktor Adam", "username": "rycus86" },
      "added": [], "removed": [], "modified": ["stack.yml"]
    },
    {
      "id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
      "tree_id": "a9d2a07e9488b91af2641b26b9407fe22a451433",
      "message": "Bump nginx\n\nAnd its config.",
      "timestamp": "2019-05-15T15:22:01-07:00",
      "author": { "name": "Viktor Adam", "username": "rycus86" },
      "added": [], "removed": [], "modified": ["stack.yml", "config/nginx.conf"]
    }
  ],
  "head_commit": {
    "id": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
    "message": "Bump nginx\n\nAnd its config.",
    "timestamp": "2019-05-15T15:22:01-07:00"
  }
}"#;

    /// GitHub's ping after a webhook is created.
    const GITHUB_PING: &str = r#"{
  "zen": "Design for failure.",
  "hook_id": 109948940,
  "hook": {
    "type": "Repository",
    "id": 109948940,
    "name": "web",
    "active": true,
    "events": ["push"],
    "config": { "content_type": "json", "insecure_ssl": "0", "url": "https://api.example.com/hooks/github" }
  },
  "repository": {
    "id": 186853002,
    "full_name": "rycus86/home-stack-web",
    "clone_url": "https://github.com/rycus86/home-stack-web.git"
  },
  "sender": { "login": "rycus86", "id": 6233023 }
}"#;

    #[test]
    fn docker_hub_push_gives_owner_namespace_pusher_and_image() {
        let f = parse(HookKind::Dockerhub, "hub", None, HUB_PUSH.as_bytes()).expect("facts");
        assert_eq!(f.repository.as_deref(), Some("svendowideit/testhook"));
        assert_eq!(f.tag.as_deref(), Some("latest"));
        assert_eq!(f.image.as_deref(), Some("svendowideit/testhook:latest"));
        assert_eq!(f.owner.as_deref(), Some("svendowideit"));
        assert_eq!(f.namespace.as_deref(), Some("svendowideit"));
        assert_eq!(f.pusher.as_deref(), Some("trustedbuilder"));
        for name in HookKind::Dockerhub.facts() {
            assert!(f.get(name).is_some(), "{name} missing");
        }
        let body = br#"{"push_data":{"tag":"latest"},"repository":{"repo_name":"owner/app"}}"#;
        let f = parse(HookKind::Dockerhub, "hub", None, body).expect("facts");
        assert_eq!(f.owner, None, "a field the payload lacks is no fact");
        assert_eq!(
            parse(HookKind::Dockerhub, "hub", None, b"{\"repository\":{}}"),
            Err(Error::Dockerhub)
        );
    }

    #[test]
    fn github_push_gives_sender_clone_url_and_the_commits() {
        let f = parse(HookKind::Github, "gh", Some("push"), GITHUB_PUSH.as_bytes()).expect("facts");
        assert_eq!(f.repository.as_deref(), Some("rycus86/home-stack-web"));
        assert_eq!(f.r#ref.as_deref(), Some("refs/heads/master"));
        assert_eq!(f.sender.as_deref(), Some("rycus86"));
        assert_eq!(
            f.clone_url.as_deref(),
            Some("https://github.com/rycus86/home-stack-web.git")
        );
        assert_eq!(f.commits, Some(2));
        assert_eq!(
            f.commit_ids,
            [
                "b3d4f1e0c5a1f2e3d4c5b6a7980123456789abcd",
                "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
            ]
        );
        assert_eq!(
            f.head_commit_message.as_deref(),
            Some("Bump nginx\n\nAnd its config.")
        );
        assert_eq!(f.get("commits").as_deref(), Some("2"));
        assert_eq!(
            f.get("commit_ids").as_deref(),
            Some(
                "b3d4f1e0c5a1f2e3d4c5b6a7980123456789abcd 0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
            )
        );
        for name in HookKind::Github.facts() {
            assert!(f.get(name).is_some(), "{name} missing");
        }
        let env = f.env();
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("DROVER_SENDER"), Some("rycus86"));
        assert_eq!(get("DROVER_COMMITS"), Some("2"));
        assert_eq!(get("DROVER_EVENT"), Some("push"));
        assert_eq!(get("DROVER_TAG"), Some(""), "a missing fact is empty");
    }

    #[test]
    fn github_ping_gives_repository_and_sender_but_no_commits() {
        let f = parse(HookKind::Github, "gh", Some("ping"), GITHUB_PING.as_bytes()).expect("facts");
        assert_eq!(f.repository.as_deref(), Some("rycus86/home-stack-web"));
        assert_eq!(f.sender.as_deref(), Some("rycus86"));
        assert_eq!(f.r#ref, None);
        assert_eq!(f.commits, None);
        assert_eq!(f.get("commits"), None);
        assert_eq!(f.get("commit_ids"), None);
        assert_eq!(f.head_commit_message, None);
        assert_eq!(
            github_repository(GITHUB_PING.as_bytes()).as_deref(),
            Some("rycus86/home-stack-web")
        );
        assert_eq!(github_repository(b"{\"zen\":1}"), None);
        assert_eq!(github_repository(b"not json"), None);
    }

    #[test]
    fn long_head_commit_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(MAX_MESSAGE);
        let body = serde_json::json!({ "head_commit": { "message": msg } }).to_string();
        let f = parse(HookKind::Github, "gh", Some("push"), body.as_bytes()).expect("facts");
        let got = f.head_commit_message.expect("message");
        assert!(got.len() <= MAX_MESSAGE && got.len() >= MAX_MESSAGE - 1);
    }

    #[test]
    fn generic_payload_splits_the_image() {
        let f = parse(
            HookKind::Generic,
            "ci",
            None,
            br#"{"image":"127.0.0.1:5000/x/y:v2"}"#,
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("127.0.0.1:5000/x/y"));
        assert_eq!(f.tag.as_deref(), Some("v2"));
        let f = parse(
            HookKind::Generic,
            "ci",
            None,
            br#"{"image":"127.0.0.1:5000/x"}"#,
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("127.0.0.1:5000/x"));
        assert_eq!(f.tag.as_deref(), Some("latest"));
        assert_eq!(
            parse(HookKind::Generic, "ci", None, br#"{"image":"{{7*7}}"}"#),
            Err(Error::Image)
        );
        assert_eq!(
            parse(HookKind::Generic, "ci", None, br#"{"image":7}"#),
            Err(Error::Generic)
        );
    }

    #[test]
    fn every_kind_produces_only_names_get_knows() {
        let f = Facts {
            commits: Some(0),
            ..Facts::default()
        };
        let kinds = [HookKind::Dockerhub, HookKind::Github, HookKind::Generic];
        for name in kinds.iter().flat_map(|k| k.facts()) {
            let _ = f.get(name);
            assert!(
                f.env()
                    .iter()
                    .any(|(k, _)| *k == format!("DROVER_{}", name.to_uppercase())),
                "{name} has no environment variable"
            );
        }
        assert_eq!(f.get("colour"), None);
    }
}
