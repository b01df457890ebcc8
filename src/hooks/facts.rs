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
    #[error("invalid gitea payload")]
    Gitea,
    #[error("invalid gitlab payload")]
    Gitlab,
    #[error("invalid bitbucket payload")]
    Bitbucket,
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
            Error::Gitea => "invalid gitea payload",
            Error::Gitlab => "invalid gitlab payload",
            Error::Bitbucket => "invalid bitbucket payload",
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

/// GitHub's push payload, which Gitea and Forgejo send in the same shape.
#[derive(Deserialize)]
struct GithubPayload {
    #[serde(default, rename = "ref")]
    r#ref: Option<String>,
    #[serde(default)]
    after: Option<String>,
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

/// GitLab's push event (`X-Gitlab-Event: Push Hook`).
#[derive(Deserialize)]
struct GitlabPayload {
    #[serde(default, rename = "ref")]
    r#ref: Option<String>,
    #[serde(default)]
    after: Option<String>,
    /// The commit checked out at the head: `after`, or null when the branch was deleted.
    #[serde(default)]
    checkout_sha: Option<String>,
    #[serde(default)]
    user_username: Option<String>,
    #[serde(default)]
    project: Option<GitlabProject>,
    #[serde(default)]
    total_commits_count: Option<usize>,
    #[serde(default)]
    commits: Option<Vec<GitlabCommit>>,
}
#[derive(Deserialize)]
struct GitlabProject {
    #[serde(default)]
    path_with_namespace: Option<String>,
    #[serde(default)]
    git_http_url: Option<String>,
}
#[derive(Deserialize)]
struct GitlabCommit {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Bitbucket Cloud's `repo:push`: one entry in `push.changes` per updated ref.
#[derive(Deserialize)]
struct BitbucketPayload {
    #[serde(default)]
    actor: Option<BitbucketActor>,
    #[serde(default)]
    repository: Option<GithubRepository>,
    push: BitbucketPush,
}
#[derive(Deserialize)]
struct BitbucketActor {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    display_name: Option<String>,
}
#[derive(Deserialize)]
struct BitbucketPush {
    #[serde(default)]
    changes: Vec<BitbucketChange>,
}
#[derive(Deserialize)]
struct BitbucketChange {
    /// The ref after the push; null when it was deleted.
    #[serde(default)]
    new: Option<BitbucketRef>,
}
#[derive(Deserialize)]
struct BitbucketRef {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    target: Option<BitbucketTarget>,
}
#[derive(Deserialize)]
struct BitbucketTarget {
    #[serde(default)]
    hash: Option<String>,
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

/// A commit id as a forge writes it (hex, 40 or 64 digits), and not the all-zero id of a
/// deleted ref: anything else is dropped rather than shown or matched.
fn commit_like(s: &str) -> bool {
    matches!(s.len(), 40 | 64)
        && s.bytes().all(|b| b.is_ascii_hexdigit())
        && s.bytes().any(|b| b != b'0')
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
        HookKind::Github | HookKind::Gitea => {
            let p: GithubPayload = serde_json::from_slice(body).map_err(|_| {
                if kind == HookKind::Gitea {
                    Error::Gitea
                } else {
                    Error::Github
                }
            })?;
            f.r#ref = p.r#ref;
            f.after = p.after.filter(|c| commit_like(c));
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
        HookKind::Gitlab => {
            let p: GitlabPayload = serde_json::from_slice(body).map_err(|_| Error::Gitlab)?;
            f.r#ref = p.r#ref;
            // `checkout_sha` is null for a deleted branch, whose `after` is all zeros.
            f.after = p.checkout_sha.or(p.after).filter(|c| commit_like(c));
            if let Some(project) = p.project {
                f.repository = project.path_with_namespace;
                f.clone_url = project.git_http_url;
            }
            f.sender = p.user_username;
            if let Some(commits) = p.commits {
                f.commits = Some(p.total_commits_count.unwrap_or(commits.len()));
                // Oldest first, as GitHub lists them: the head's message is the last one's
                // (or the one whose id is the head, when GitLab cut the list).
                f.head_commit_message = commits
                    .iter()
                    .find(|c| c.id.is_some() && c.id == f.after)
                    .or(commits.last())
                    .and_then(|c| c.message.clone())
                    .map(|m| truncate(m, MAX_MESSAGE));
                f.commit_ids = commits
                    .into_iter()
                    .filter_map(|c| c.id)
                    .take(MAX_COMMIT_IDS)
                    .collect();
            }
        }
        HookKind::Bitbucket => {
            let p: BitbucketPayload = serde_json::from_slice(body).map_err(|_| Error::Bitbucket)?;
            // The first branch the push moved (a push of several branches at once is
            // taken for its first).
            let change = p.push.changes.into_iter().find_map(|c| {
                c.new
                    .filter(|n| n.kind.as_deref() == Some("branch") && n.name.is_some())
            });
            if let Some(new) = change {
                f.r#ref = new.name.map(|n| format!("refs/heads/{n}"));
                if let Some(t) = new.target {
                    f.after = t.hash.filter(|c| commit_like(c));
                    f.head_commit_message = t.message.map(|m| truncate(m, MAX_MESSAGE));
                }
            }
            f.repository = p.repository.and_then(|r| r.full_name);
            f.sender = p.actor.and_then(|a| a.nickname.or(a.display_name));
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

    /// Gitea's documented push delivery (docs.gitea.com, "Webhooks"), trimmed of the
    /// fields drover never reads, with the `head_commit` Gitea's `PushPayload` carries
    /// (the documented example predates it); Forgejo sends the same body.
    const GITEA_PUSH: &str = r#"{
  "ref": "refs/heads/develop",
  "before": "28e1879d029cb852e4844d9c718537df08844e03",
  "after": "bffeb74224043ba2feb48d137756c8a9331c449a",
  "compare_url": "http://localhost:3000/gitea/webhooks/compare/28e1879d029cb852e4844d9c718537df08844e03...bffeb74224043ba2feb48d137756c8a9331c449a",
  "commits": [
    {
      "id": "bffeb74224043ba2feb48d137756c8a9331c449a",
      "message": "Webhooks Yay!",
      "url": "http://localhost:3000/gitea/webhooks/commit/bffeb74224043ba2feb48d137756c8a9331c449a",
      "author": { "name": "Gitea", "email": "someone@gitea.io", "username": "gitea" },
      "committer": { "name": "Gitea", "email": "someone@gitea.io", "username": "gitea" },
      "timestamp": "2017-03-13T13:52:11-04:00"
    }
  ],
  "head_commit": {
    "id": "bffeb74224043ba2feb48d137756c8a9331c449a",
    "message": "Webhooks Yay!",
    "timestamp": "2017-03-13T13:52:11-04:00"
  },
  "repository": {
    "id": 140,
    "owner": { "id": 1, "login": "gitea", "full_name": "Gitea", "username": "gitea" },
    "name": "webhooks",
    "full_name": "gitea/webhooks",
    "private": false,
    "html_url": "http://localhost:3000/gitea/webhooks",
    "ssh_url": "ssh://gitea@localhost:2222/gitea/webhooks.git",
    "clone_url": "http://localhost:3000/gitea/webhooks.git",
    "default_branch": "master"
  },
  "pusher": { "id": 1, "login": "gitea", "full_name": "Gitea", "username": "gitea" },
  "sender": { "id": 1, "login": "gitea", "full_name": "Gitea", "username": "gitea" }
}"#;

    /// GitLab's documented push event (docs.gitlab.com, "Webhook events": Push events),
    /// trimmed.
    const GITLAB_PUSH: &str = r#"{
  "object_kind": "push",
  "event_name": "push",
  "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
  "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
  "ref": "refs/heads/master",
  "ref_protected": true,
  "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
  "user_id": 4,
  "user_name": "John Smith",
  "user_username": "jsmith",
  "project_id": 15,
  "project": {
    "id": 15,
    "name": "Diaspora",
    "web_url": "http://example.com/mike/diaspora",
    "git_ssh_url": "git@example.com:mike/diaspora.git",
    "git_http_url": "http://example.com/mike/diaspora.git",
    "namespace": "Mike",
    "path_with_namespace": "mike/diaspora",
    "default_branch": "master"
  },
  "commits": [
    {
      "id": "b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327",
      "message": "Update Catalan translation to e38cb41.\n\nSee https://gitlab.com/gitlab-org/gitlab for more information",
      "title": "Update Catalan translation to e38cb41.",
      "timestamp": "2011-12-12T14:27:31+02:00",
      "author": { "name": "Jordi Mallach", "email": "jordi@softcatala.org" },
      "added": ["CHANGELOG"], "modified": ["app/controller/application.rb"], "removed": []
    },
    {
      "id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
      "message": "fixed readme",
      "title": "fixed readme",
      "timestamp": "2012-01-03T23:36:29+02:00",
      "author": { "name": "GitLab dev user", "email": "gitlabdev@dv6700.(none)" },
      "added": ["CHANGELOG"], "modified": ["app/controller/application.rb"], "removed": []
    }
  ],
  "total_commits_count": 4
}"#;

    /// Bitbucket Cloud's `repo:push` (support.atlassian.com, "Event payloads"), trimmed to
    /// the entities drover reads.
    const BITBUCKET_PUSH: &str = r#"{
  "actor": {
    "type": "user",
    "display_name": "Emma",
    "nickname": "emma",
    "uuid": "{a54f16da-24e9-4d7f-a3a7-b1ba2cd98aa3}",
    "account_id": "557058:c0b72ad0-1cb5-4018-9cdc-0cde8492c443"
  },
  "repository": {
    "type": "repository",
    "name": "home-stack-web",
    "full_name": "team_name/home-stack-web",
    "uuid": "{673a6070-3421-46c9-9d48-90745f7bfe8e}",
    "is_private": true
  },
  "push": {
    "changes": [
      {
        "new": {
          "type": "branch",
          "name": "main",
          "target": {
            "type": "commit",
            "hash": "709d658dc5b6d6afcd46049c2f332ee3f515a67d",
            "author": { "raw": "Emma <emma@example.com>" },
            "message": "new commit message\n",
            "date": "2015-06-09T03:34:49+00:00",
            "parents": [{ "type": "commit", "hash": "1e65c05c1d5171631d92438a13901ca7dae9618c" }]
          }
        },
        "old": {
          "type": "branch",
          "name": "main",
          "target": { "type": "commit", "hash": "1e65c05c1d5171631d92438a13901ca7dae9618c" }
        },
        "created": false,
        "forced": false,
        "closed": false,
        "commits": [{ "hash": "709d658dc5b6d6afcd46049c2f332ee3f515a67d", "type": "commit" }],
        "truncated": false
      }
    ]
  }
}"#;

    #[test]
    fn gitea_push_gives_what_githubs_does_and_the_pushed_commit() {
        let f = parse(HookKind::Gitea, "tea", Some("push"), GITEA_PUSH.as_bytes()).expect("facts");
        assert_eq!(f.repository.as_deref(), Some("gitea/webhooks"));
        assert_eq!(f.r#ref.as_deref(), Some("refs/heads/develop"));
        assert_eq!(
            f.after.as_deref(),
            Some("bffeb74224043ba2feb48d137756c8a9331c449a")
        );
        assert_eq!(f.sender.as_deref(), Some("gitea"));
        assert_eq!(
            f.clone_url.as_deref(),
            Some("http://localhost:3000/gitea/webhooks.git")
        );
        assert_eq!(f.commits, Some(1));
        for name in HookKind::Gitea.facts() {
            assert!(f.get(name).is_some(), "{name} missing");
        }
        assert_eq!(
            parse(HookKind::Gitea, "tea", Some("push"), b"[1]"),
            Err(Error::Gitea)
        );
    }

    #[test]
    fn gitlab_push_names_the_project_path_and_the_checked_out_commit() {
        let f = parse(
            HookKind::Gitlab,
            "lab",
            Some("push"),
            GITLAB_PUSH.as_bytes(),
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("mike/diaspora"));
        assert_eq!(f.r#ref.as_deref(), Some("refs/heads/master"));
        assert_eq!(
            f.after.as_deref(),
            Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
        );
        assert_eq!(f.sender.as_deref(), Some("jsmith"));
        assert_eq!(
            f.clone_url.as_deref(),
            Some("http://example.com/mike/diaspora.git")
        );
        assert_eq!(f.commits, Some(4), "total_commits_count, not the cut list");
        assert_eq!(f.commit_ids.len(), 2);
        assert_eq!(f.head_commit_message.as_deref(), Some("fixed readme"));
        for name in HookKind::Gitlab.facts() {
            assert!(f.get(name).is_some(), "{name} missing");
        }
        // A deleted branch: `after` is all zeros and `checkout_sha` null.
        let deleted = br#"{"ref":"refs/heads/old","after":"0000000000000000000000000000000000000000","checkout_sha":null,"project":{"path_with_namespace":"a/b"}}"#;
        let f = parse(HookKind::Gitlab, "lab", Some("push"), deleted).expect("facts");
        assert_eq!(f.after, None);
        assert_eq!(
            parse(HookKind::Gitlab, "lab", Some("push"), b"\"x\""),
            Err(Error::Gitlab)
        );
    }

    #[test]
    fn bitbucket_push_takes_the_first_branch_it_moved() {
        let f = parse(
            HookKind::Bitbucket,
            "bb",
            Some("push"),
            BITBUCKET_PUSH.as_bytes(),
        )
        .expect("facts");
        assert_eq!(f.repository.as_deref(), Some("team_name/home-stack-web"));
        assert_eq!(f.r#ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(
            f.after.as_deref(),
            Some("709d658dc5b6d6afcd46049c2f332ee3f515a67d")
        );
        assert_eq!(f.sender.as_deref(), Some("emma"));
        assert_eq!(
            f.head_commit_message.as_deref(),
            Some("new commit message\n")
        );
        for name in HookKind::Bitbucket.facts() {
            assert!(f.get(name).is_some(), "{name} missing");
        }
        // A deleted branch and a tag come before the branch moved.
        let body = serde_json::json!({
            "repository": { "full_name": "t/r" },
            "push": { "changes": [
                { "new": null, "old": { "type": "branch", "name": "gone" } },
                { "new": { "type": "tag", "name": "v1", "target": { "hash": "a".repeat(40) } } },
                { "new": { "type": "branch", "name": "next", "target": { "hash": "b".repeat(40) } } }
            ] }
        })
        .to_string();
        let f = parse(HookKind::Bitbucket, "bb", Some("push"), body.as_bytes()).expect("facts");
        assert_eq!(f.r#ref.as_deref(), Some("refs/heads/next"));
        assert_eq!(f.after, Some("b".repeat(40)));
        assert_eq!(
            parse(
                HookKind::Bitbucket,
                "bb",
                Some("push"),
                b"{\"repository\":{}}"
            ),
            Err(Error::Bitbucket),
            "no push"
        );
    }

    #[test]
    fn github_push_gives_the_pushed_commit_but_never_a_malformed_one() {
        let f = parse(HookKind::Github, "gh", Some("push"), GITHUB_PUSH.as_bytes()).expect("facts");
        assert_eq!(
            f.after.as_deref(),
            Some("0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c")
        );
        for bad in ["HEAD", "--upload-pack=x", &"0".repeat(40), &"g".repeat(40)] {
            let body = serde_json::json!({ "ref": "refs/heads/main", "after": bad }).to_string();
            let f = parse(HookKind::Github, "gh", Some("push"), body.as_bytes()).expect("facts");
            assert_eq!(f.after, None, "{bad}");
        }
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
        let kinds = [
            HookKind::Dockerhub,
            HookKind::Github,
            HookKind::Gitea,
            HookKind::Gitlab,
            HookKind::Bitbucket,
            HookKind::Generic,
        ];
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
