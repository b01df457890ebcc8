//! Whether a service is behind what its tag points at now. Pure.
//!
//! A service pinned to the digest the tag points at is current. When the tag points at an
//! index (a multi-platform image), a service pinned to one of the index's platform
//! manifests is current too: a node that runs the platform manifest is not outdated
//! (keel's rule). A service with no digest in its spec is compared with the first digest
//! drover saw for its tag (the baseline): only a later change rolls it.

/// What the registry said, as far as the comparison needs.
#[derive(Debug, Clone, Copy)]
pub struct Remote<'a> {
    pub digest: &'a str,
    pub index: bool,
    /// The index's platform manifests, when known.
    pub platforms: Option<&'a [String]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Current,
    Outdated,
    /// The tag points at an index that is not the service's digest: its platform
    /// manifests decide (one `GET` of the index).
    NeedPlatforms,
}

/// `running`: the service's pinned digest; `baseline`: the first digest seen for the tag.
pub fn verdict(running: Option<&str>, remote: Remote<'_>, baseline: Option<&str>) -> Verdict {
    let Some(running) = running else {
        return match baseline {
            Some(b) if b != remote.digest => Verdict::Outdated,
            _ => Verdict::Current,
        };
    };
    if running == remote.digest {
        return Verdict::Current;
    }
    if !remote.index {
        return Verdict::Outdated;
    }
    match remote.platforms {
        Some(p) if p.iter().any(|d| d == running) => Verdict::Current,
        Some(_) => Verdict::Outdated,
        None => Verdict::NeedPlatforms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote<'a>(digest: &'a str, platforms: Option<&'a [String]>) -> Remote<'a> {
        Remote {
            digest,
            index: platforms.is_some() || digest.starts_with("idx"),
            platforms,
        }
    }

    #[test]
    fn the_same_digest_is_current_and_another_single_manifest_is_outdated() {
        assert_eq!(
            verdict(Some("m1"), remote("m1", None), None),
            Verdict::Current
        );
        assert_eq!(
            verdict(Some("m1"), remote("m2", None), None),
            Verdict::Outdated
        );
    }

    #[test]
    fn a_service_on_a_platform_manifest_the_index_lists_is_current() {
        let platforms = ["amd".to_owned(), "arm".to_owned()];
        assert_eq!(
            verdict(Some("arm"), remote("idx1", Some(&platforms)), None),
            Verdict::Current
        );
        assert_eq!(
            verdict(Some("old-arm"), remote("idx1", Some(&platforms)), None),
            Verdict::Outdated
        );
        assert_eq!(
            verdict(Some("idx1"), remote("idx1", None), None),
            Verdict::Current,
            "the index itself needs no GET"
        );
        assert_eq!(
            verdict(Some("arm"), remote("idx2", None), None),
            Verdict::NeedPlatforms
        );
    }

    #[test]
    fn a_service_without_digest_follows_changes_from_the_first_digest_seen() {
        assert_eq!(verdict(None, remote("m1", None), None), Verdict::Current);
        assert_eq!(
            verdict(None, remote("m1", None), Some("m1")),
            Verdict::Current
        );
        assert_eq!(
            verdict(None, remote("m2", None), Some("m1")),
            Verdict::Outdated
        );
    }
}
