//! Manifests as far as polling needs them: the media types asked for, whether an answer is
//! an index (a multi-platform image), the platform manifests an index lists, and digests.
//! Pure: read from headers and bodies.

use serde::Deserialize;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Every manifest type, indexes first: without the index types a registry answers with one
/// platform's manifest (or converts it), and its digest is not the one the engine pins.
pub const ACCEPT: [&str; 4] = [OCI_INDEX, DOCKER_LIST, DOCKER_V2, OCI_MANIFEST];

/// [`ACCEPT`] as an `Accept` header's value.
pub fn accept() -> String {
    ACCEPT.join(", ")
}

/// Whether a `Content-Type` (parameters ignored) is an index or a manifest list.
pub fn is_index(content_type: &str) -> bool {
    let bare = content_type.split(';').next().unwrap_or_default().trim();
    bare.eq_ignore_ascii_case(OCI_INDEX) || bare.eq_ignore_ascii_case(DOCKER_LIST)
}

/// `sha256:` and 64 lowercase hex digits: the only digests drover pins services to (a
/// digest goes into a service's image reference).
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The digest of a manifest's bytes, as a registry computes it.
pub fn digest_of(body: &[u8]) -> String {
    format!("sha256:{}", crate::hash::sha256_hex(body))
}

#[derive(Deserialize)]
struct Index {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    digest: String,
}

/// The digests of the platform manifests an index lists (attestation manifests included:
/// they are never what a service is pinned to, so listing them changes no answer); `None`
/// when the body is not an index.
pub fn platform_digests(body: &[u8]) -> Option<Vec<String>> {
    let index: Index = serde_json::from_slice(body).ok()?;
    if index.media_type.as_deref().is_some_and(|t| !is_index(t)) {
        return None;
    }
    let digests = index
        .manifests?
        .into_iter()
        .map(|e| e.digest)
        .filter(|d| valid_digest(d))
        .collect();
    Some(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn both_index_types_are_indexes_and_single_manifests_are_not() {
        assert!(is_index(OCI_INDEX));
        assert!(is_index(&format!("{DOCKER_LIST}; charset=utf-8")));
        assert!(!is_index(DOCKER_V2));
        assert!(!is_index(OCI_MANIFEST));
        assert!(!is_index(""));
        assert_eq!(
            accept(),
            "application/vnd.oci.image.index.v1+json, \
             application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.oci.image.manifest.v1+json"
        );
    }

    #[test]
    fn only_full_sha256_digests_are_valid() {
        assert!(valid_digest(&d('a')));
        assert!(!valid_digest("sha256:abc"));
        assert!(!valid_digest(&d('A')));
        assert!(!valid_digest(&format!("sha512:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("{}\nx", d('a'))));
    }

    #[test]
    fn an_index_lists_its_platform_digests_and_a_manifest_lists_none() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"not-a-digest"}}]}}"#,
            d('1'),
            d('2')
        );
        assert_eq!(
            platform_digests(index.as_bytes()),
            Some(vec![d('1'), d('2')])
        );
        let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_V2}","layers":[]}}"#);
        assert_eq!(platform_digests(manifest.as_bytes()), None);
        assert_eq!(platform_digests(b"[]"), None);
    }

    #[test]
    fn a_digest_is_the_sha256_of_the_bytes() {
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
