//! The deployed copy of a compose file: what `docker stack config` printed (merged and
//! interpolated by the CLI, file paths made absolute), with every top-level config and
//! secret that has `file:` renamed by its content, and the external networks it needs.
//!
//! Pure: bytes in, bytes out, so it is tested on hand-built files. Swarm configs and
//! secrets are immutable: a changed file under the same name is refused ("only updates to
//! Labels are allowed"), so the name carries the content's hash and a change rotates the
//! object. An entry that sets its own `name:` or is `external` is left as written.

use serde_yaml_ng::{Mapping, Value};

/// Swarm's limit on an object name.
pub const MAX_NAME: usize = 64;
/// Hex digits of the content hash in a rotated name: 64 bits tell versions of one file
/// apart.
const HASH_LEN: usize = 16;
/// Labels on every rotated object: the stack and the compose key it is a version of (so
/// the old versions of one key can be pruned).
pub const STACK_LABEL: &str = "drover.stack";
pub const KEY_LABEL: &str = "drover.stack.key";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("compose file is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("compose file is not a mapping")]
    NotAMapping,
    #[error("{kind} {key}: cannot read {path}: {source}")]
    Read {
        kind: &'static str,
        key: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One config or secret given a content-hash name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rotated {
    /// `config` or `secret`.
    pub kind: String,
    /// Its key in the compose file.
    pub key: String,
    /// The name it is deployed under.
    pub name: String,
}

/// The rewritten file and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub text: String,
    pub rotated: Vec<Rotated>,
    /// Names of the external networks the file uses (created when missing).
    pub networks: Vec<String>,
}

/// The name a version of `key` in `stack` is deployed under: `STACK_KEY-HASH`, the prefix
/// cut so the whole stays within [`MAX_NAME`] (the hash is never cut).
pub fn rotated_name(stack: &str, key: &str, content: &[u8]) -> String {
    let hash = crate::hash::sha256_hex(content);
    let hash = &hash[..HASH_LEN];
    let mut prefix = format!("{stack}_{key}");
    let room = MAX_NAME - HASH_LEN - 1;
    if prefix.len() > room {
        let mut cut = room;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
    }
    format!("{prefix}-{hash}")
}

/// Rewrites `text` (the output of `docker stack config`); `read` returns a `file:`'s bytes.
pub fn prepare(
    stack: &str,
    text: &str,
    mut read: impl FnMut(&str) -> std::io::Result<Vec<u8>>,
) -> Result<Prepared, Error> {
    let mut doc: Value = serde_yaml_ng::from_str(text)?;
    let root = doc.as_mapping_mut().ok_or(Error::NotAMapping)?;
    let mut rotated = Vec::new();
    for (section, kind) in [("configs", "config"), ("secrets", "secret")] {
        let Some(entries) = root.get_mut(section).and_then(Value::as_mapping_mut) else {
            continue;
        };
        for (key, entry) in entries.iter_mut() {
            let (Some(key), Some(entry)) = (key.as_str(), entry.as_mapping_mut()) else {
                continue;
            };
            let external = entry.get("external").is_some_and(is_true);
            if external || entry.contains_key("name") {
                continue;
            }
            let Some(path) = entry.get("file").and_then(Value::as_str).map(str::to_owned) else {
                continue;
            };
            let content = read(&path).map_err(|source| Error::Read {
                kind,
                key: key.to_owned(),
                path: path.clone(),
                source,
            })?;
            let name = rotated_name(stack, key, &content);
            entry.insert("name".into(), name.clone().into());
            let labels = entry
                .entry("labels".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if let Some(labels) = labels.as_mapping_mut() {
                labels.insert(STACK_LABEL.into(), stack.into());
                labels.insert(KEY_LABEL.into(), key.into());
            }
            rotated.push(Rotated {
                kind: kind.to_owned(),
                key: key.to_owned(),
                name,
            });
        }
    }
    let mut networks = Vec::new();
    if let Some(nets) = root.get("networks").and_then(Value::as_mapping) {
        for (key, entry) in nets {
            let Some(entry) = entry.as_mapping() else {
                continue;
            };
            if !entry.get("external").is_some_and(is_true) {
                continue;
            }
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .or_else(|| key.as_str());
            if let Some(name) = name {
                networks.push(name.to_owned());
            }
        }
    }
    Ok(Prepared {
        text: serde_yaml_ng::to_string(&doc)?,
        rotated,
        networks,
    })
}

/// `external: true`, or the long form `external: {name: ...}` of old files.
fn is_true(v: &Value) -> bool {
    v.as_bool().unwrap_or(false) || v.is_mapping()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
version: "3.8"
services:
  app:
    image: busybox
    configs: [{source: app_conf, target: /etc/a.conf}]
    secrets: [token]
networks:
  web: { name: web-net, external: true }
  internal: {}
configs:
  app_conf: { file: /repo/a.conf }
  fixed: { name: my-fixed, file: /repo/a.conf }
  ext: { name: ext, external: true }
secrets:
  token: { file: /repo/token }
"#;

    fn files(path: &str) -> std::io::Result<Vec<u8>> {
        match path {
            "/repo/a.conf" => Ok(b"v1".to_vec()),
            "/repo/token" => Ok(b"s3cret".to_vec()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    #[test]
    fn file_configs_and_secrets_get_content_names_and_the_rest_is_left_alone() {
        let p = prepare("web", FILE, files).expect("prepared");
        let conf = rotated_name("web", "app_conf", b"v1");
        let token = rotated_name("web", "token", b"s3cret");
        assert_eq!(
            p.rotated,
            vec![
                Rotated {
                    kind: "config".into(),
                    key: "app_conf".into(),
                    name: conf.clone()
                },
                Rotated {
                    kind: "secret".into(),
                    key: "token".into(),
                    name: token.clone()
                },
            ]
        );
        assert_eq!(p.networks, vec!["web-net".to_owned()]);
        let doc: Value = serde_yaml_ng::from_str(&p.text).expect("yaml");
        assert_eq!(
            doc["configs"]["app_conf"]["name"].as_str(),
            Some(conf.as_str())
        );
        assert_eq!(
            doc["configs"]["app_conf"]["labels"][KEY_LABEL].as_str(),
            Some("app_conf")
        );
        assert_eq!(doc["configs"]["fixed"]["name"].as_str(), Some("my-fixed"));
        assert_eq!(
            doc["secrets"]["token"]["name"].as_str(),
            Some(token.as_str())
        );
        assert!(
            !p.text.contains("s3cret"),
            "the file holds names, never content"
        );
        assert_eq!(doc["services"]["app"]["image"].as_str(), Some("busybox"));
    }

    #[test]
    fn a_changed_file_rotates_and_the_same_file_keeps_its_name() {
        assert_eq!(
            rotated_name("web", "conf", b"v1"),
            rotated_name("web", "conf", b"v1")
        );
        assert_ne!(
            rotated_name("web", "conf", b"v1"),
            rotated_name("web", "conf", b"v2")
        );
        assert_ne!(
            rotated_name("web", "a", b"v1"),
            rotated_name("api", "a", b"v1")
        );
    }

    #[test]
    fn rotated_names_stay_within_swarms_limit_and_keep_the_whole_hash() {
        let long = "k".repeat(100);
        let name = rotated_name("a-very-long-stack-name-of-32-chr", &long, b"x");
        assert_eq!(name.len(), MAX_NAME);
        let hash = &crate::hash::sha256_hex(b"x")[..HASH_LEN];
        assert!(name.ends_with(&format!("-{hash}")), "{name}");
        assert_eq!(
            rotated_name("web", "conf", b"x"),
            format!("web_conf-{hash}")
        );
    }

    #[test]
    fn an_unreadable_file_names_its_key() {
        let text = "configs:\n  c: { file: /missing }\n";
        let err = prepare("web", text, files)
            .expect_err("missing")
            .to_string();
        assert!(
            err.contains("config c") && err.contains("/missing"),
            "{err}"
        );
    }
}
