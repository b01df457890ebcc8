//! A target's `owners`: which stacks may route which hosts, overriding the first-claim rule.
//!
//! `owners: {"*.example.com": [web], "shop.example.com": [shop, service:legacy]}`. A key
//! is a host name or `*.` and a domain (every name under it, at any depth, not the domain
//! itself); a value lists stacks (`com.docker.stack.namespace`), or `service:NAME` for a
//! service outside any stack. Invariants: every key and name is checked while the file is
//! parsed, so a bad one is refused with its line and column; keys are lowercase; a list is
//! never empty (a host nobody may route is a mistake, not a setting).

use std::collections::BTreeMap;

use serde::Deserialize;

/// The `owners` setting of a target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Owners(pub BTreeMap<HostPattern, OwnerList>);

impl Owners {
    /// Who may route `host` (lowercase): the entry of the name itself, else of the longest
    /// matching `*.domain`; `None` when no entry covers it (the first claim decides).
    pub fn of(&self, host: &str) -> Option<&[Owner]> {
        if let Some(list) = self.0.get(&HostPattern::Exact(host.to_owned())) {
            return Some(&list.0);
        }
        self.0
            .iter()
            .filter_map(|(pattern, list)| match pattern {
                HostPattern::Under(domain) => host
                    .strip_suffix(domain.as_str())
                    .and_then(|rest| rest.strip_suffix('.'))
                    .filter(|rest| !rest.is_empty())
                    .map(|_| (domain.len(), &list.0)),
                HostPattern::Exact(_) => None,
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, list)| list.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A key of `owners`: one host name, or every name under a domain (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub enum HostPattern {
    Exact(String),
    /// The domain, without the `*.`.
    Under(String),
}

impl TryFrom<String> for HostPattern {
    type Error = String;

    fn try_from(raw: String) -> Result<HostPattern, String> {
        let lower = raw.to_ascii_lowercase();
        let (pattern, name) = match lower.strip_prefix("*.") {
            Some(domain) => (HostPattern::Under(domain.to_owned()), domain),
            None => (HostPattern::Exact(lower.clone()), lower.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{raw:?} is not a host name or `*.` and a domain (letters, digits, inner `-`, dot-separated)"
            ));
        }
        Ok(pattern)
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Under(d) => write!(f, "*.{d}"),
        }
    }
}

/// The stacks (and stack-less services) one pattern gives its hosts to: never empty.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<Owner>")]
pub struct OwnerList(pub Vec<Owner>);

impl TryFrom<Vec<Owner>> for OwnerList {
    type Error = String;

    fn try_from(list: Vec<Owner>) -> Result<OwnerList, String> {
        if list.is_empty() {
            return Err("a host pattern needs at least one stack".into());
        }
        Ok(OwnerList(list))
    }
}

/// Who a host can belong to: a stack by its name, or a service outside any stack.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Owner {
    Stack(String),
    Service(String),
}

impl TryFrom<String> for Owner {
    type Error = String;

    fn try_from(raw: String) -> Result<Owner, String> {
        let (owner, name) = match raw.strip_prefix("service:") {
            Some(name) => (Owner::Service(name.to_owned()), name),
            None => (Owner::Stack(raw.clone()), raw.as_str()),
        };
        // Docker's rule for stack and service names.
        let ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok {
            return Err(format!(
                "{raw:?} is not a stack name or `service:` and a service name ([A-Za-z0-9][A-Za-z0-9_.-]*)"
            ));
        }
        Ok(owner)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Stack(s) => write!(f, "stack {s}"),
            Owner::Service(s) => write!(f, "service {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(yaml: &str) -> Owners {
        serde_yaml_ng::from_str(yaml).expect("owners")
    }

    #[test]
    fn a_host_takes_its_own_entry_before_the_longest_matching_domain() {
        let o = owners(
            "{'*.example.com': [web], '*.shop.example.com': [shop], 'a.shop.example.com': ['service:old']}",
        );
        let stack = |s: &str| vec![Owner::Stack(s.to_owned())];
        assert_eq!(o.of("x.example.com"), Some(&stack("web")[..]));
        assert_eq!(o.of("a.b.example.com"), Some(&stack("web")[..]));
        assert_eq!(o.of("x.shop.example.com"), Some(&stack("shop")[..]));
        assert_eq!(
            o.of("a.shop.example.com"),
            Some(&[Owner::Service("old".to_owned())][..])
        );
        assert_eq!(o.of("example.com"), None, "a domain is not under itself");
        assert_eq!(o.of("badexample.com"), None);
        assert_eq!(o.of("other.org"), None);
    }

    #[test]
    fn patterns_are_read_in_lowercase() {
        let o = owners("{'*.Example.COM': [web]}");
        assert!(o.of("x.example.com").is_some());
    }

    #[test]
    fn bad_patterns_names_and_empty_lists_are_refused_while_parsing() {
        for (yaml, says) in [
            ("{'*example.com': [web]}", "not a host name"),
            ("{'a..com': [web]}", "not a host name"),
            ("{'*.': [web]}", "not a host name"),
            ("{'a.com': []}", "at least one stack"),
            ("{'a.com': ['-web']}", "not a stack name"),
            ("{'a.com': ['service:']}", "not a stack name"),
            ("{'a.com': [web stack]}", "not a stack name"),
            ("{'a.com': web}", "sequence"),
        ] {
            let err = serde_yaml_ng::from_str::<Owners>(yaml).expect_err(yaml);
            assert!(err.to_string().contains(says), "{yaml}: {err}");
        }
    }
}
