//! What a registry's `401` asks for: the `WWW-Authenticate` challenge (RFC 7235, as the
//! distribution token spec uses it) and the token server's answer. Pure: parsed from text.

use serde::Deserialize;

/// How a registry wants to be asked again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="…"`:
    /// fetch a token from `realm` and send it as `Authorization: Bearer`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// `Basic realm="…"`: send the configured user and password.
    Basic,
}

impl Challenge {
    /// The first challenge drover can answer, from a `WWW-Authenticate` value; `None` for
    /// an unknown scheme or a Bearer challenge without a realm.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header
            .split_once(char::is_whitespace)
            .unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = params(rest);
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let realm = get("realm").filter(|r| !r.is_empty())?;
        Some(Challenge::Bearer {
            realm,
            service: get("service"),
            scope: get("scope"),
        })
    }
}

/// `k="v", k2=v2` → pairs; a quoted value may hold commas and `\"`.
fn params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.trim().is_empty() {
            return out;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
            value = value.trim().to_owned();
        }
        out.push((key.trim().to_owned(), value));
    }
}

/// A token server's answer: `token` (Docker Hub) or `access_token` (OAuth2 style), and how
/// long it lasts (60 s when not said: the spec's default).
#[derive(Debug, Deserialize)]
pub struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenAnswer {
    /// The token and its lifetime in seconds, when the answer holds one.
    pub fn parse(body: &[u8]) -> Option<(String, u64)> {
        let a: TokenAnswer = serde_json::from_slice(body).ok()?;
        let token = a.token.or(a.access_token).filter(|t| !t.is_empty())?;
        // A token is sent as a header value: nothing that could end the header.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        Some((token, a.expires_in.unwrap_or(60).clamp(1, 3600)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hubs_bearer_challenge_gives_realm_service_and_scope() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#;
        assert_eq!(
            Challenge::parse(h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull".into()),
            })
        );
    }

    #[test]
    fn quoted_commas_escapes_spaces_and_case_are_read_as_the_rfc_says() {
        let h = r#"bearer  scope="repository:a/b:pull,push", REALM="https://r.test/t?x=\"1\"" , service=reg"#;
        assert_eq!(
            Challenge::parse(h),
            Some(Challenge::Bearer {
                realm: r#"https://r.test/t?x="1""#.into(),
                service: Some("reg".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
    }

    #[test]
    fn basic_is_answered_and_unknown_schemes_or_a_bearer_without_realm_are_not() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse(r#"Negotiate abc"#), None);
        assert_eq!(Challenge::parse(r#"Bearer service="x""#), None);
        assert_eq!(Challenge::parse(""), None);
    }

    #[test]
    fn a_token_answer_gives_either_spelling_with_a_bounded_lifetime() {
        assert_eq!(
            TokenAnswer::parse(br#"{"token":"abc","expires_in":300}"#),
            Some(("abc".into(), 300))
        );
        assert_eq!(
            TokenAnswer::parse(br#"{"access_token":"xyz"}"#),
            Some(("xyz".into(), 60))
        );
        assert_eq!(
            TokenAnswer::parse(br#"{"token":"a","expires_in":999999}"#),
            Some(("a".into(), 3600))
        );
        assert_eq!(TokenAnswer::parse(br#"{"token":""}"#), None);
        assert_eq!(TokenAnswer::parse(b"{\"token\":\"a\\r\\nX: y\"}"), None);
        assert_eq!(TokenAnswer::parse(b"not json"), None);
    }
}
