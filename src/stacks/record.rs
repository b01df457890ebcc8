//! The commit each stack was last deployed at, kept in Swarm so it survives drover's
//! restart and a move of the leader to another manager: a poll of an unchanged branch then
//! starts no container on the instance that comes up.
//!
//! One small config object per stack and deploy, named `drover-stack-STACK-COMMIT12`
//! and labelled with the stack, the commit and when it was written; its data is the same
//! as JSON (a commit id is no secret). Config objects are immutable: the new record is
//! created before the older ones of the stack are removed, so a crash in between leaves
//! two, and the newest (by its `at` label) is read. Never on a service spec: writing it
//! must not roll anything.

use std::collections::HashMap;

use bollard::models::Config;

use crate::docker::Engine;

/// The stack a record belongs to.
pub const STACK_LABEL: &str = "drover.stack.deployed";
pub const COMMIT_LABEL: &str = "drover.stack.commit";
/// Unix milliseconds of the write: the newest record wins.
pub const AT_LABEL: &str = "drover.stack.at";

/// The record's object name (within Swarm's 64 characters: a stack name is at most 32).
pub fn name(stack: &str, commit: &str) -> String {
    format!(
        "drover-stack-{stack}-{}",
        commit.get(..12).unwrap_or(commit)
    )
}

/// Of the records listed for `stack`: the commit of the newest.
pub fn newest(stack: &str, configs: &[Config]) -> Option<String> {
    configs
        .iter()
        .filter_map(|c| {
            let spec = c.spec.as_ref()?;
            let labels = spec.labels.as_ref()?;
            if labels.get(STACK_LABEL).map(String::as_str) != Some(stack) {
                return None;
            }
            let commit = labels.get(COMMIT_LABEL)?;
            if !super::deployer::is_commit(commit) {
                return None;
            }
            let at: u64 = labels.get(AT_LABEL)?.parse().ok()?;
            Some((at, commit.clone()))
        })
        .max()
        .map(|(_, commit)| commit)
}

/// The commit `stack` was last deployed at, as Swarm keeps it.
pub async fn read(engine: &Engine, stack: &str) -> Result<Option<String>, crate::docker::Error> {
    let configs = engine
        .list_configs(&format!("{STACK_LABEL}={stack}"))
        .await?;
    Ok(newest(stack, &configs))
}

/// Records `commit` as what `stack` runs, then removes the stack's older records.
pub async fn write(engine: &Engine, stack: &str, commit: &str) -> Result<(), crate::docker::Error> {
    let at = crate::clock::unix_millis();
    let labels = HashMap::from([
        (STACK_LABEL.to_owned(), stack.to_owned()),
        (COMMIT_LABEL.to_owned(), commit.to_owned()),
        (AT_LABEL.to_owned(), at.to_string()),
    ]);
    let data = serde_json::json!({ "stack": stack, "commit": commit, "at": at }).to_string();
    let name = name(stack, commit);
    let listed = engine
        .list_configs(&format!("{STACK_LABEL}={stack}"))
        .await?;
    let names: Vec<String> = listed
        .iter()
        .filter_map(|c| c.spec.as_ref()?.name.clone())
        .collect();
    // The same commit deployed again (a manual sync after a restart): the old record of
    // that name goes first, or the create would conflict.
    if names.contains(&name) {
        engine.delete_config(&name).await?;
    }
    engine.create_config(&name, labels, data.as_bytes()).await?;
    // Every other record of the stack is older than the one just written.
    for old in names.iter().filter(|n| **n != name) {
        if let Err(e) = engine.delete_config(old).await {
            tracing::warn!(config = %old, error = %e, "cannot remove an old stack record");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ConfigSpec;

    fn config(name: &str, stack: &str, commit: &str, at: &str) -> Config {
        Config {
            spec: Some(ConfigSpec {
                name: Some(name.into()),
                labels: Some(HashMap::from([
                    (STACK_LABEL.to_owned(), stack.to_owned()),
                    (COMMIT_LABEL.to_owned(), commit.to_owned()),
                    (AT_LABEL.to_owned(), at.to_owned()),
                ])),
                ..ConfigSpec::default()
            }),
            ..Config::default()
        }
    }

    #[test]
    fn the_newest_record_of_the_stack_wins() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let configs = vec![
            config("r1", "web", &a, "1000"),
            config("r3", "web", &c, "900"),
            config("r2", "web", &b, "2000"),
            config("other", "mon", &c, "5000"),
            config("bad-commit", "web", "HEAD", "9000"),
            config("bad-at", "web", &c, "soon"),
        ];
        assert_eq!(newest("web", &configs), Some(b));
        assert_eq!(newest("none", &configs), None);
    }

    #[test]
    fn a_record_name_fits_swarms_limit() {
        let stack = "s".repeat(32);
        let n = name(&stack, &"f".repeat(64));
        assert!(n.len() <= 64, "{n}");
        assert_eq!(
            name("web", &"a".repeat(40)),
            format!("drover-stack-web-{}", "a".repeat(12))
        );
    }
}
