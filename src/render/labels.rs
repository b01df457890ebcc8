//! Validation of the service labels the built-in templates read.
//!
//! Label values end up inside nginx directives and YAML, so each one is checked against a
//! strict, positive grammar (what is allowed, never what is forbidden). Nothing that can end
//! a directive or open a block (`;`, `{`, `}`, quotes, whitespace, newlines, `$`) passes any
//! rule that is inserted unquoted; the one quoted value (the realm) refuses quotes,
//! backslashes, `$` and those same characters.

use crate::state::Service;
use crate::status::SkippedService;

pub const HOST: &str = "routing-host";
pub const CONTEXT: &str = "routing-context";
pub const INTERNAL_CONTEXT: &str = "routing-internal-context";
/// drover's extension: a location reachable from private networks only.
pub const PRIVATE_CONTEXT: &str = "routing-private-context";
pub const PORT: &str = "routing-port";
pub const MAX_BODY: &str = "routing-max-body";
/// drover's extension: how long nginx waits to connect to a task before it asks the next.
pub const CONNECT_TIMEOUT: &str = "routing-connect-timeout";
pub const AUTH: &str = "routing-auth";
pub const AUTH_REALM: &str = "routing-auth-realm";
pub const ON_HTTPS: &str = "routing-on-https";
pub const TLS: &str = "routing-tls";
/// The home lab's extra names (domain-automation read them): more server names for the
/// service's first host, and more names on that host's certificate.
pub const EXTRA_HOSTS: &str = "routing-extra-hosts";
/// drover's extension: `Strict-Transport-Security` on the host's TLS server.
pub const HSTS: &str = "routing-hsts";
/// drover's extension: drover obtains the host's certificate (`certificates.hosts: label`).
pub const ACME: &str = "routing-acme";
pub const NETWORK: &str = "routing-network";
pub const PROMETHEUS_JOB: &str = "prometheus-job";
pub const PROMETHEUS_PORT: &str = "prometheus-port";

/// Every label the built-in templates read.
pub const INTERPRETED: &[&str] = &[
    HOST,
    CONTEXT,
    INTERNAL_CONTEXT,
    PRIVATE_CONTEXT,
    PORT,
    MAX_BODY,
    CONNECT_TIMEOUT,
    AUTH,
    AUTH_REALM,
    ON_HTTPS,
    TLS,
    EXTRA_HOSTS,
    HSTS,
    ACME,
    NETWORK,
    PROMETHEUS_JOB,
    PROMETHEUS_PORT,
];

type Rule = fn(&str) -> Result<(), String>;

/// The rule for a label drover interprets, `None` for any other label.
fn rule(label: &str) -> Option<Rule> {
    Some(match label {
        HOST | EXTRA_HOSTS => check_hosts,
        CONTEXT | PRIVATE_CONTEXT => check_location,
        INTERNAL_CONTEXT => check_path,
        PORT | PROMETHEUS_PORT => check_port,
        MAX_BODY => check_size,
        CONNECT_TIMEOUT => check_timeout,
        AUTH => check_auth_file,
        AUTH_REALM => check_realm,
        // Never inserted into the config: any value is fine (non-empty means https).
        ON_HTTPS => return None,
        TLS | ACME => check_bool,
        HSTS => check_hsts,
        NETWORK => check_network,
        PROMETHEUS_JOB => check_job,
        _ => return None,
    })
}

/// Checks every label drover interprets; the first bad one (in label-name order) names the
/// label, the value and why.
pub fn validate_service(service: &Service) -> Result<(), SkippedService> {
    // One pass over the service's own labels: cheaper than a lookup per rule.
    for (label, value) in &service.labels {
        if let Some(rule) = rule(label) {
            rule(value).map_err(|reason| SkippedService {
                service: service.name.clone(),
                label: label.clone(),
                value: shown(value),
                reason,
            })?;
        }
    }
    Ok(())
}

/// The longest part of a refused label value that is kept for logs and the status page.
pub const SHOWN_MAX: usize = 64;

/// A refused label value as logs and the status page show it: quoted with escapes, so a
/// newline cannot forge a log line, and cut after [`SHOWN_MAX`] characters, so a 100 KB
/// value is not logged whole on every render.
pub fn shown(value: &str) -> String {
    let mut chars = value.char_indices();
    match chars.nth(SHOWN_MAX) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &value[..cut], value.len()),
        None => format!("{value:?}"),
    }
}

/// The host names of a `routing-host` value (already validated): split on commas, spaces
/// around commas dropped, lowercased.
pub fn hosts(value: &str) -> impl Iterator<Item = String> + '_ {
    value
        .split(',')
        .map(|h| h.trim_matches(' ').to_ascii_lowercase())
}

/// A validated path label as a prefix: a leading `/`, no trailing `/`, and `""` for the root
/// (`api/` → `/api`, `/` → `""`). The home lab's template appends the `/` itself.
pub fn prefix(value: &str) -> String {
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

/// A validated boolean label (drover's `routing-tls`).
pub fn truthy(value: &str) -> bool {
    matches!(value.to_ascii_lowercase().as_str(), "true" | "yes" | "1")
}

/// The `max-age` of a validated `routing-hsts`: digits are seconds, `true`/`yes` one year,
/// `false`/`no` (or `0`) none.
pub fn hsts_max_age(value: &str) -> Option<u64> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" => Some(HSTS_DEFAULT),
        v => v.parse::<u64>().ok().filter(|n| *n > 0),
    }
}

/// One year, as most HSTS guidance (and the preload list) asks for.
pub const HSTS_DEFAULT: u64 = 31_536_000;

/// Where the built-in nginx template serves ACME HTTP-01 tokens from, for every host.
pub const CHALLENGE_PATH: &str = "/.well-known/acme-challenge";

/// `routing-on-https` as the home lab's Jinja template read it: any non-empty value is true
/// (even `false`).
pub fn jinja_truthy(value: &str) -> bool {
    !value.is_empty()
}

/// The `auth_basic_user_file` of a validated `routing-auth`: an absolute path as is (the
/// home lab's meaning), a relative one under `/etc/nginx/auth` (drover's extension).
pub fn auth_file(value: &str) -> String {
    if value.starts_with('/') {
        value.to_owned()
    } else {
        format!("/etc/nginx/auth/{value}")
    }
}

fn check_hosts(value: &str) -> Result<(), String> {
    for host in value.split(',') {
        // Spaces next to commas are a common way to write lists; anything else is refused.
        let host = host.trim_matches(' ');
        check_host(host)?;
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if host.len() > MAX_HOST {
        return Err(format!("host name longer than {MAX_HOST} characters"));
    }
    for part in host.split('.') {
        let ok = !part.is_empty()
            && part.len() <= 63
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !part.starts_with('-')
            && !part.ends_with('-');
        if !ok {
            return Err(format!(
                "not a valid host name: {host:?} (letters, digits and inner hyphens, dot-separated)"
            ));
        }
    }
    Ok(())
}

/// DNS's limit. Names longer than nginx's default `server_names_hash_bucket_size` allows
/// are fine: the template sizes the bucket from the longest name it renders.
const MAX_HOST: usize = 253;

fn check_path(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 512 {
        return Err("path must be 1 to 512 characters".into());
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._~/-".contains(&b))
    {
        return Err("path may only contain letters, digits and . _ ~ / -".into());
    }
    if value.split('/').any(|s| s == "..") {
        return Err("path must not contain a .. segment".into());
    }
    Ok(())
}

/// A path that becomes an nginx location: [`check_path`], and not the ACME challenge path,
/// which the built-in template routes for every host (a second location there would fail
/// the whole file).
fn check_location(value: &str) -> Result<(), String> {
    check_path(value)?;
    let p = prefix(value);
    if p == CHALLENGE_PATH || p.starts_with(&format!("{CHALLENGE_PATH}/")) {
        return Err(format!(
            "{CHALLENGE_PATH}/ is reserved for ACME challenges on every host"
        ));
    }
    Ok(())
}

fn check_hsts(value: &str) -> Result<(), String> {
    let ok =
        matches!(
            value.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no"
        ) || (!value.is_empty() && value.len() <= 9 && value.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err("must be true, false, yes, no or a max-age in seconds (up to 9 digits)".into())
    }
}

fn check_port(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 5
        && value.bytes().all(|b| b.is_ascii_digit())
        && value.parse::<u16>().is_ok_and(|p| p >= 1);
    if ok {
        Ok(())
    } else {
        Err("port must be a number from 1 to 65535".into())
    }
}

fn check_size(value: &str) -> Result<(), String> {
    let digits = value
        .strip_suffix(['k', 'K', 'm', 'M', 'g', 'G'])
        .unwrap_or(value);
    let scale: u64 = match value.as_bytes().last() {
        Some(b'k' | b'K') => 1 << 10,
        Some(b'm' | b'M') => 1 << 20,
        Some(b'g' | b'G') => 1 << 30,
        _ => 1,
    };
    // nginx refuses (and fails the whole file on) a size above its off_t maximum.
    let fits = digits
        .parse::<u64>()
        .is_ok_and(|n| n <= i64::MAX as u64 / scale);
    if !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && fits
    {
        Ok(())
    } else {
        Err("size must be digits with an optional k, m or g suffix (like 10m or 0)".into())
    }
}

/// An nginx time of 1 ms to 60 s in `ms` or `s` (nginx's own connect limit is 75 s).
fn check_timeout(value: &str) -> Result<(), String> {
    let (digits, ms_per_unit) = match value.strip_suffix("ms") {
        Some(d) => (d, 1),
        None => (value.strip_suffix('s').unwrap_or(""), 1000),
    };
    let ms =
        (!digits.is_empty() && digits.len() <= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .map(|n| n * ms_per_unit);
    match ms {
        Some(1..=60_000) => Ok(()),
        _ => Err("timeout must be 1ms to 60s, in ms or s (like 500ms or 2s)".into()),
    }
}

fn check_auth_file(value: &str) -> Result<(), String> {
    let relative = value.strip_prefix('/').unwrap_or(value);
    let ok = !relative.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        && !relative
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..");
    if ok {
        Ok(())
    } else {
        Err(
            "auth file must be an absolute path, or one relative to /etc/nginx/auth, of letters, digits and . _ - / (no . or .. or empty segments)"
                .into(),
        )
    }
}

pub(super) fn check_realm(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && !b"\"'\\;{}$".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(
            "realm must be 1 to 128 printable ASCII characters without quotes, backslash, $ ; { }"
                .into(),
        )
    }
}

fn check_bool(value: &str) -> Result<(), String> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "false" | "yes" | "no" | "1" | "0" => Ok(()),
        _ => Err("must be true, false, yes, no, 1 or 0".into()),
    }
}

fn check_network(value: &str) -> Result<(), String> {
    let ok = value.len() <= 128
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("network name must be letters, digits and _ . - starting with a letter or digit".into())
    }
}

fn check_job(value: &str) -> Result<(), String> {
    let ok = value.len() <= 128
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err("job name must match [a-zA-Z_][a-zA-Z0-9_-]*".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(label: &str, value: &str) -> Service {
        Service {
            name: "svc".into(),
            labels: [(label.to_owned(), value.to_owned())].into_iter().collect(),
            ..Service::default()
        }
    }

    fn verdict(label: &str, value: &str) -> Result<(), SkippedService> {
        validate_service(&service(label, value))
    }

    #[test]
    fn refused_values_are_shown_quoted_and_cut() {
        let err = verdict(HOST, "a\nforged=1").expect_err("newline");
        assert_eq!(err.value, r#""a\nforged=1""#);
        let long = "x".repeat(100_000);
        let err = verdict(HOST, &long).expect_err("long");
        assert_eq!(
            err.value,
            format!("{:?}... (100000 bytes)", "x".repeat(SHOWN_MAX))
        );
        assert_eq!(shown("\u{2028}é"), r#""\u{2028}é""#);
    }

    #[test]
    fn valid_label_values_are_accepted() {
        let table = [
            (HOST, "example.com"),
            (HOST, "a.example.com,b.example.com"),
            (HOST, "a.example.com, B.Example.com"),
            (HOST, "localhost"),
            (HOST, "a-host-name-of-forty-six-chars0.example.com.xy"),
            (MAX_BODY, "8589934591g"),
            (HOST, "xn--bcher-kva.example"),
            (CONTEXT, "/"),
            (CONTEXT, "/api/v1"),
            (CONTEXT, "api"),
            (CONTEXT, "/~user/a.b_c-d"),
            (INTERNAL_CONTEXT, "/metrics"),
            (PORT, "1"),
            (PORT, "8080"),
            (PORT, "65535"),
            (PROMETHEUS_PORT, "9100"),
            (MAX_BODY, "0"),
            (MAX_BODY, "10m"),
            (MAX_BODY, "512k"),
            (MAX_BODY, "1G"),
            (MAX_BODY, "1048576"),
            (CONNECT_TIMEOUT, "500ms"),
            (CONNECT_TIMEOUT, "2s"),
            (CONNECT_TIMEOUT, "60s"),
            (AUTH, "users.htpasswd"),
            (AUTH, "team/admins"),
            (AUTH, "/etc/auth-config/kibana.auth.conf"),
            (PRIVATE_CONTEXT, "/metrics"),
            (ON_HTTPS, "anything at all"),
            (AUTH_REALM, "Restricted area (admins only)"),
            (ON_HTTPS, "true"),
            (ON_HTTPS, "No"),
            (ON_HTTPS, "a;b{c}"),
            (TLS, "0"),
            (TLS, "yes"),
            (NETWORK, "web_net-1.x"),
            (PROMETHEUS_JOB, "my_app-1"),
            (PROMETHEUS_JOB, "_private"),
        ];
        for (label, value) in table {
            assert_eq!(verdict(label, value), Ok(()), "{label}={value:?}");
        }
    }

    #[test]
    fn invalid_and_injecting_label_values_are_refused_naming_the_label() {
        // Over DNS's 253 characters with every part within 63, so only the length refuses it.
        let too_long = format!("{}.example.com", vec!["a".repeat(60); 4].join("."));
        let table = [
            (HOST, "example.com; include /etc/passwd"),
            (HOST, "x}\nserver{"),
            (HOST, "example.com\n"),
            (HOST, "exa mple.com"),
            (HOST, "\"example.com\""),
            (HOST, "$host"),
            (HOST, ""),
            (HOST, "a.com,"),
            (HOST, "-a.com"),
            (HOST, "a..com"),
            (HOST, "*.example.com"),
            (HOST, "under_score.com"),
            (CONNECT_TIMEOUT, "1s; return 200"),
            (CONNECT_TIMEOUT, "0s"),
            (CONNECT_TIMEOUT, "0ms"),
            (CONNECT_TIMEOUT, "61s"),
            (CONNECT_TIMEOUT, "1m"),
            (CONNECT_TIMEOUT, "s"),
            (CONNECT_TIMEOUT, "1.5s"),
            (CONNECT_TIMEOUT, ""),
            (CONTEXT, "/a;return 200"),
            (CONTEXT, "/a {"),
            (CONTEXT, "/a}"),
            (CONTEXT, "/../etc"),
            (CONTEXT, ".."),
            (CONTEXT, "/a b"),
            (CONTEXT, "/$uri"),
            (CONTEXT, "/a\nb"),
            (CONTEXT, "~ .*"),
            (CONTEXT, ""),
            (INTERNAL_CONTEXT, "/x;allow all"),
            (PORT, "0"),
            (PORT, "65536"),
            (PORT, "+80"),
            (PORT, "80;"),
            (PORT, "http"),
            (PORT, ""),
            (PROMETHEUS_PORT, "9100 "),
            (MAX_BODY, "10mb"),
            (MAX_BODY, "10m;"),
            (MAX_BODY, "m"),
            (MAX_BODY, "-1"),
            (MAX_BODY, "1 0m"),
            (AUTH, "/etc/../etc/shadow"),
            (AUTH, "/"),
            (AUTH, "//etc/x"),
            (AUTH, "/etc/./x"),
            (AUTH, "/etc/x/"),
            (AUTH, "/etc/x;"),
            (AUTH, "/etc/x y"),
            (AUTH, "../secrets"),
            (AUTH, "a//b"),
            (AUTH, "users; deny all"),
            (AUTH, "users\""),
            (AUTH_REALM, "realm\"; allow all; \""),
            (AUTH_REALM, "a\\"),
            (AUTH_REALM, "x}\nserver{"),
            (AUTH_REALM, "a;b"),
            (AUTH_REALM, "$remote_addr"),
            (AUTH_REALM, "tab\there"),
            (AUTH_REALM, ""),
            (AUTH_REALM, "caf\u{e9}"),
            (PRIVATE_CONTEXT, "/m;allow all"),
            (TLS, ""),
            (NETWORK, "web;"),
            (NETWORK, "-web"),
            (NETWORK, "a b"),
            (PROMETHEUS_JOB, "1job"),
            (PROMETHEUS_JOB, "job:x"),
            (PROMETHEUS_JOB, "job\n- targets"),
            (MAX_BODY, "999999999999g"),
            (HOST, too_long.as_str()),
            (PROMETHEUS_JOB, ""),
        ];
        for (label, value) in table {
            let skipped = verdict(label, value).expect_err(&format!("{label}={value:?} accepted"));
            assert_eq!(skipped.service, "svc");
            assert_eq!(skipped.label, label);
            assert_eq!(skipped.value, shown(value));
            assert!(!skipped.reason.is_empty());
            assert!(
                skipped.reason.starts_with(|c: char| c.is_ascii_lowercase()),
                "reasons start lowercase: {}",
                skipped.reason
            );
        }
    }

    #[test]
    fn unrelated_labels_are_not_validated() {
        assert_eq!(verdict("com.example.anything", "a;b{c}\n$"), Ok(()));
    }

    #[test]
    fn hosts_are_split_trimmed_and_lowercased() {
        let h: Vec<String> = hosts("A.example.com, b.example.com").collect();
        assert_eq!(h, ["a.example.com", "b.example.com"]);
    }

    #[test]
    fn prefixes_start_with_a_slash_and_never_end_with_one() {
        assert_eq!(prefix("api"), "/api");
        assert_eq!(prefix("/api/"), "/api");
        assert_eq!(prefix("/a/b"), "/a/b");
        assert_eq!(prefix("/"), "");
    }

    #[test]
    fn routing_on_https_is_true_for_any_non_empty_value_as_in_jinja() {
        assert!(jinja_truthy("true"));
        assert!(jinja_truthy("false"));
        assert!(jinja_truthy("0"));
        assert!(!jinja_truthy(""));
    }

    #[test]
    fn absolute_auth_files_are_used_as_is_and_relative_ones_live_under_etc_nginx_auth() {
        assert_eq!(
            auth_file("/etc/auth-config/kibana.auth.conf"),
            "/etc/auth-config/kibana.auth.conf"
        );
        assert_eq!(auth_file("team/admins"), "/etc/nginx/auth/team/admins");
    }

    #[test]
    fn the_challenge_path_cannot_be_a_service_location() {
        for v in [
            "/.well-known/acme-challenge",
            ".well-known/acme-challenge/",
            "/.well-known/acme-challenge/x",
        ] {
            assert!(validate_service(&service(CONTEXT, v)).is_err(), "{v}");
            assert!(
                validate_service(&service(PRIVATE_CONTEXT, v)).is_err(),
                "{v}"
            );
        }
        assert!(validate_service(&service(CONTEXT, "/.well-known")).is_ok());
        assert!(validate_service(&service(CONTEXT, "/.well-known/acme")).is_ok());
        // The backend's path is not a location of nginx.
        assert!(
            validate_service(&service(INTERNAL_CONTEXT, "/.well-known/acme-challenge")).is_ok()
        );
    }

    #[test]
    fn hsts_takes_a_boolean_or_seconds() {
        assert_eq!(hsts_max_age("true"), Some(HSTS_DEFAULT));
        assert_eq!(hsts_max_age("YES"), Some(HSTS_DEFAULT));
        assert_eq!(hsts_max_age("600"), Some(600));
        assert_eq!(hsts_max_age("0"), None);
        assert_eq!(hsts_max_age("false"), None);
        for bad in ["", "1y", "-1", "1234567890", "max-age=1", "on"] {
            assert!(validate_service(&service(HSTS, bad)).is_err(), "{bad:?}");
        }
        assert!(validate_service(&service(EXTRA_HOSTS, "a.com, b.com")).is_ok());
        assert!(validate_service(&service(EXTRA_HOSTS, "a.com;b")).is_err());
    }
}
