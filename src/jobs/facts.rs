//! What a verified webhook said: the facts a job carries, matched by rules and handed to
//! actions. A noun of the job table (it is journalled with the job), filled by `hooks`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// What the payload said, after verification. Passed to actions as `DROVER_*` variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub hook: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub r#ref: Option<String>,
    /// Git forges: the commit the push moved `ref` to (`after`; Bitbucket: the change's
    /// `new.target.hash`). A job that coalesced several pushes shows the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Docker Hub: `repository.owner`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Docker Hub: `repository.namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Docker Hub: `push_data.pusher`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pusher: Option<String>,
    /// GitHub, Gitea: `sender.login`; GitLab: `user_username`; Bitbucket: `actor.nickname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// GitHub: `repository.clone_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_url: Option<String>,
    /// GitHub: the number of commits in the push (a payload without the list has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<usize>,
    /// GitHub: the ids of the pushed commits, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commit_ids: Vec<String>,
    /// GitHub: `head_commit.message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_commit_message: Option<String>,
}

impl Facts {
    /// The value a rule named `name` is matched against; `commits` is the count in decimal
    /// and `commit_ids` the ids joined by spaces.
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        fn s(o: &Option<String>) -> Option<Cow<'_, str>> {
            o.as_deref().map(Cow::Borrowed)
        }
        match name {
            "event" => s(&self.event),
            "repository" => s(&self.repository),
            "tag" => s(&self.tag),
            "ref" => s(&self.r#ref),
            "after" => s(&self.after),
            "image" => s(&self.image),
            "owner" => s(&self.owner),
            "namespace" => s(&self.namespace),
            "pusher" => s(&self.pusher),
            "sender" => s(&self.sender),
            "clone_url" => s(&self.clone_url),
            "commits" => self.commits.map(|n| Cow::Owned(n.to_string())),
            "commit_ids" => self.commits.map(|_| Cow::Owned(self.commit_ids.join(" "))),
            "head_commit_message" => s(&self.head_commit_message),
            _ => None,
        }
    }

    /// The environment an action gets: every fact under a fixed name, empty when the
    /// payload did not have it (documented in docs/configuration and docs/migration.md).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let v = |name: &str| self.get(name).map(Cow::into_owned).unwrap_or_default();
        vec![
            ("DROVER_HOOK", self.hook.clone()),
            ("DROVER_EVENT", v("event")),
            ("DROVER_REPOSITORY", v("repository")),
            ("DROVER_TAG", v("tag")),
            ("DROVER_REF", v("ref")),
            ("DROVER_AFTER", v("after")),
            ("DROVER_IMAGE", v("image")),
            ("DROVER_OWNER", v("owner")),
            ("DROVER_NAMESPACE", v("namespace")),
            ("DROVER_PUSHER", v("pusher")),
            ("DROVER_SENDER", v("sender")),
            ("DROVER_CLONE_URL", v("clone_url")),
            ("DROVER_COMMITS", v("commits")),
            ("DROVER_COMMIT_IDS", v("commit_ids")),
            ("DROVER_HEAD_COMMIT_MESSAGE", v("head_commit_message")),
        ]
    }
}
