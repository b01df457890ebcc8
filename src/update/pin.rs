//! The two spec changes drover makes, as edits of the engine's raw service JSON:
//! pin the image to a digest, or bump `ForceUpdate` to restart every task.
//!
//! Invariants: an edit touches exactly one field (`TaskTemplate.ContainerSpec.Image` or
//! `TaskTemplate.ForceUpdate`) and leaves every other byte of the spec as the engine
//! sent it; a service already pinned to the digest is not changed at all.

use serde_json::{Map, Value};

use super::image::{ImageRef, without_digest};
use crate::docker::Edit;

/// The spec's image (`TaskTemplate.ContainerSpec.Image`).
pub fn image(spec: &Value) -> Option<&str> {
    spec.pointer("/TaskTemplate/ContainerSpec/Image")
        .and_then(Value::as_str)
}

/// `Mode.Replicated.Replicas`; `None` for global and job services.
pub fn replicas(spec: &Value) -> Option<u64> {
    spec.pointer("/Mode/Replicated/Replicas")
        .and_then(Value::as_u64)
}

/// Sets the image to `repo:tag@digest` (repo and tag as spelled now), or skips when the
/// service already runs `digest`.
pub fn pin(spec: &mut Value, digest: &str) -> Edit {
    let Some(current) = image(spec) else {
        return Edit::Skip;
    };
    if ImageRef::parse(current).is_ok_and(|r| r.digest.as_deref() == Some(digest)) {
        return Edit::Skip;
    }
    let pinned = format!("{}@{digest}", without_digest(current));
    match spec.pointer_mut("/TaskTemplate/ContainerSpec/Image") {
        Some(slot) => {
            *slot = Value::String(pinned);
            Edit::Apply
        }
        None => Edit::Skip,
    }
}

/// Bumps `TaskTemplate.ForceUpdate`, which makes Swarm replace every task (what
/// `docker service update --force` does).
pub fn force(spec: &mut Value) -> Edit {
    let Some(root) = spec.as_object_mut() else {
        return Edit::Skip;
    };
    let template = root
        .entry("TaskTemplate")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(template) = template.as_object_mut() else {
        return Edit::Skip;
    };
    let next = template
        .get("ForceUpdate")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .wrapping_add(1);
    template.insert("ForceUpdate".into(), Value::from(next));
    Edit::Apply
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({
            "Name": "web",
            "Labels": {"routing-host": "a.test"},
            "TaskTemplate": {
                "ContainerSpec": {
                    "Image": "127.0.0.1:5000/x/web:latest@sha256:aaa",
                    "Healthcheck": {"Test": ["CMD", "true"], "StartPeriod": 3000000000u64},
                    "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 2048}],
                    "FutureField": {"kept": true}
                },
                "ForceUpdate": 4
            },
            "Mode": {"Replicated": {"Replicas": 2}},
            "UpdateConfig": {"Order": "start-first"}
        })
    }

    #[test]
    fn pin_changes_only_the_image() {
        let mut s = spec();
        assert_eq!(pin(&mut s, "sha256:bbb"), Edit::Apply);
        let mut want = spec();
        want["TaskTemplate"]["ContainerSpec"]["Image"] =
            json!("127.0.0.1:5000/x/web:latest@sha256:bbb");
        assert_eq!(s, want);
    }

    #[test]
    fn pin_to_the_running_digest_is_skipped() {
        let mut s = spec();
        assert_eq!(pin(&mut s, "sha256:aaa"), Edit::Skip);
        assert_eq!(s, spec());
    }

    #[test]
    fn pin_keeps_the_spelling_of_an_unpinned_image() {
        let mut s = json!({"TaskTemplate": {"ContainerSpec": {"Image": "owner/app"}}});
        assert_eq!(pin(&mut s, "sha256:ccc"), Edit::Apply);
        assert_eq!(image(&s), Some("owner/app@sha256:ccc"));
    }

    #[test]
    fn force_bumps_only_force_update() {
        let mut s = spec();
        assert_eq!(force(&mut s), Edit::Apply);
        let mut want = spec();
        want["TaskTemplate"]["ForceUpdate"] = json!(5);
        assert_eq!(s, want);
        let mut bare = json!({"Name": "x", "TaskTemplate": {"ContainerSpec": {"Image": "y"}}});
        force(&mut bare);
        assert_eq!(bare["TaskTemplate"]["ForceUpdate"], json!(1));
    }

    #[test]
    fn replicas_of_global_services_are_unknown() {
        assert_eq!(replicas(&spec()), Some(2));
        assert_eq!(replicas(&json!({"Mode": {"Global": {}}})), None);
    }
}
