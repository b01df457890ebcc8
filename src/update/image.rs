//! Image references: the one parser every module uses to split `registry/repo:tag@digest`.
//!
//! Invariants: references are normalised the way the engine does (`owner/repo`,
//! `docker.io/owner/repo` and `index.docker.io/owner/repo` are one image, single names
//! live under `library/`, a missing tag is `latest`); anything with characters outside a
//! reference's alphabet is refused, so a reference can never carry template or shell
//! syntax into a job. The alphabet is distribution's reference grammar's
//! (distribution/reference, reference.go): `+` appears in it only as a separator of a
//! digest's algorithm (`sha256+b64u:...`), never in a registry host, a path or a tag.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference")]
pub struct InvalidImage;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The repository as spelled, without tag or digest (`owner/repo`, `127.0.0.1:5000/x`).
    pub name: String,
    /// `docker.io`, `127.0.0.1:5000`, `ghcr.io`, ...
    pub registry: String,
    /// The path inside the registry, e.g. `library/nginx`.
    pub repo: String,
    pub tag: String,
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(raw: &str) -> Result<ImageRef, InvalidImage> {
        if raw.is_empty()
            || raw.len() > 512
            || !raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:@+".contains(&b))
        {
            return Err(InvalidImage);
        }
        let (name, digest) = match raw.split_once('@') {
            Some((n, d)) => {
                // `+` only between the algorithm's components, never in the encoded part.
                let Some((algorithm, encoded)) = d.split_once(':') else {
                    return Err(InvalidImage);
                };
                if d.contains('@')
                    || algorithm.split('+').any(str::is_empty)
                    || encoded.is_empty()
                    || encoded.contains(['+', ':'])
                {
                    return Err(InvalidImage);
                }
                (n, Some(d.to_owned()))
            }
            None => (raw, None),
        };
        if name.contains('+') {
            return Err(InvalidImage);
        }
        // The tag is after the last ':' that follows the last '/' (a registry port is not a tag).
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
            None => (name, "latest"),
        };
        if path.is_empty() || tag.is_empty() || tag.contains('/') {
            return Err(InvalidImage);
        }
        let (registry, repo) = match path.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => ("docker.io".to_owned(), path.to_owned()),
        };
        let registry = normalise_registry(&registry);
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        if repo.is_empty() || repo.split('/').any(str::is_empty) {
            return Err(InvalidImage);
        }
        Ok(ImageRef {
            name: path.to_owned(),
            registry,
            repo,
            tag: tag.to_owned(),
            digest,
        })
    }

    /// `registry/repo:tag`, the key that coalesces requests and matches services.
    pub fn key(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }

    pub fn same_repo_tag(&self, other: &ImageRef) -> bool {
        self.registry == other.registry && self.repo == other.repo && self.tag == other.tag
    }
}

/// Docker Hub answers to several host names.
pub fn normalise_registry(host: &str) -> String {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        h => h.to_owned(),
    }
}

/// The image with any `@digest` removed, as the user spelled it.
pub fn without_digest(image: &str) -> &str {
    image.split_once('@').map_or(image, |(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        ImageRef::parse(s).expect("valid").key()
    }

    #[test]
    fn hub_spellings_normalise_to_one_image() {
        let want = "docker.io/owner/repo:latest";
        assert_eq!(key("owner/repo"), want);
        assert_eq!(key("owner/repo:latest"), want);
        assert_eq!(key("docker.io/owner/repo:latest"), want);
        assert_eq!(key("index.docker.io/owner/repo"), want);
        assert_eq!(key("owner/repo:latest@sha256:abcd"), want);
    }

    #[test]
    fn single_names_live_under_library() {
        assert_eq!(key("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(key("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(key("docker.io/nginx"), "docker.io/library/nginx:latest");
    }

    #[test]
    fn registry_with_port_stays_as_is() {
        let r = ImageRef::parse("127.0.0.1:5000/x/y:latest@sha256:ff").expect("valid");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repo, "x/y");
        assert_eq!(r.tag, "latest");
        assert_eq!(r.digest.as_deref(), Some("sha256:ff"));
        assert_eq!(key("127.0.0.1:5000/x"), "127.0.0.1:5000/x:latest");
        assert_eq!(key("localhost/x:v2"), "localhost/x:v2");
        assert_ne!(key("127.0.0.1:5000/x/y"), key("x/y"));
    }

    #[test]
    fn the_name_is_the_repository_as_spelled() {
        let name = |s: &str| ImageRef::parse(s).expect("valid").name;
        assert_eq!(
            name("127.0.0.1:5000/x/y:v1@sha256:ff"),
            "127.0.0.1:5000/x/y"
        );
        assert_eq!(name("owner/repo"), "owner/repo");
        assert_eq!(name("nginx:1.27"), "nginx");
        assert_eq!(name("localhost:5000/app"), "localhost:5000/app");
    }

    #[test]
    fn hostile_or_broken_references_are_refused() {
        for bad in [
            "",
            "a b",
            "x:{{7*7}}",
            "/x",
            "x/",
            "x:",
            "x@",
            "x@sha256:1@2",
            "x//y",
            "$(id)",
            "x;rm",
            "x\ny",
        ] {
            assert_eq!(ImageRef::parse(bad), Err(InvalidImage), "{bad:?} accepted");
        }
        assert!(ImageRef::parse(&"a".repeat(600)).is_err());
    }

    #[test]
    fn a_plus_is_refused_outside_a_digest_algorithm() {
        for bad in [
            // Found by the fuzz target webhook_payload: once parsed as registry `127.0.0.1:500+0`.
            "127.0.0.1:500+0/app:latest",
            "regi+stry.example.com/app",
            "owner/ap+p",
            "owner/app:v1+build",
            "app+:latest",
            "app@sha256:ab+cd",
            "app@+sha256:abcd",
            "app@sha256+:abcd",
            "app@sha256++b64u:abcd",
        ] {
            assert_eq!(ImageRef::parse(bad), Err(InvalidImage), "{bad:?} accepted");
        }
        let r =
            ImageRef::parse("owner/app:v1@sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564")
                .expect("a separator inside the algorithm is the grammar's");
        assert_eq!(r.tag, "v1");
        assert_eq!(
            r.digest.as_deref(),
            Some("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564")
        );
    }

    #[test]
    fn digest_is_stripped_as_spelled() {
        assert_eq!(
            without_digest("127.0.0.1:5000/x:latest@sha256:1"),
            "127.0.0.1:5000/x:latest"
        );
        assert_eq!(without_digest("x"), "x");
    }
}
