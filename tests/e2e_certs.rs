//! End-to-end: HTTPS as the home lab served it, through a real nginx on the test Swarm
//! (issue 22, items 5 and 6).
//!
//! A TLS host with its certificate files is served with HTTP/2 (`curl --http2` negotiates
//! h2) and HSTS, port 80 answers 301 to https except the ACME challenge path, which is
//! served for the host, its extra names and names nobody routes; a certificate replaced in
//! place, with nothing else changed, is served after the next resync.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`, images built); skipped otherwise. Unique names
//! per test; everything is removed on drop.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

/// How long drover and nginx may take to follow a change (resync is 2 s here).
const BOUND: Duration = Duration::from_secs(40);
/// How long Swarm itself may take to start tasks (not drover's time).
const SWARM: Duration = Duration::from_secs(90);

fn config(http: &str, target: &str) -> String {
    format!("http: {{ listen: {http} }}\nresync: 2s\ntargets:{target}")
}

/// `curl` over TLS to nginx's published 443 for `host`: (HTTP version, status, headers).
fn curl_tls(port: u16, host: &str, path: &str) -> Result<(String, String)> {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--http2", "-D", "-", "-o", "/dev/null"])
        .args(["--max-time", "5", "-w", "%{http_version}"])
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .context("curl")?;
    ensure!(
        out.status.success(),
        "curl https://{host}:{port}{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.lines().last().unwrap_or_default().trim().to_owned();
    Ok((version, text))
}

/// The SHA-256 fingerprint of the certificate nginx shows for `host` on `port`.
fn served_fingerprint(port: u16, host: &str) -> Result<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {host} </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    );
    let out = Command::new("sh").args(["-c", &script]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        text.contains("Fingerprint="),
        "no certificate served: {text:?}"
    );
    Ok(text)
}

/// The SHA-256 fingerprint of the certificate file `cert`.
fn file_fingerprint(cert: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Waits until `GET path` with `Host: name` answers `status` with `body` (trimmed; any
/// body when empty).
fn wait_answer(
    nginx: &NginxService,
    name: &str,
    path: &str,
    status: u16,
    body: &str,
) -> Result<()> {
    let mut last = None;
    let ok = wait_until(BOUND, Duration::from_millis(250), || {
        let r = nginx.get(name, path);
        let done =
            matches!(&r, Ok(r) if r.status == status && (body.is_empty() || r.body.trim() == body));
        last = Some(r);
        done
    });
    ensure!(
        ok,
        "GET {name}{path}: wanted {status} {body:?}, last answer {last:?}"
    );
    Ok(())
}

fn world_readable(paths: &[&Path]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for p in paths {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_tls_host_is_served_with_h2_hsts_and_redirects_and_a_certificate_renewed_in_place_is_served()
-> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("crt-net"))?;
    let certs = temp_dir("crt-certs")?;
    let live = certs.path().join("live");
    let webroot = temp_dir("crt-challenge")?;
    let tokens = webroot.path().join(".well-known/acme-challenge");
    std::fs::create_dir_all(&live)?;
    std::fs::create_dir_all(&tokens)?;
    std::fs::write(tokens.join("token-1"), "token-1.thumbprint")?;
    world_readable(&[
        certs.path(),
        &live,
        webroot.path(),
        &webroot.path().join(".well-known"),
        &tokens,
        &tokens.join("token-1"),
    ])?;

    let host = format!("{}.test", unique("crt-shop"));
    let alias = format!("www.{host}");
    make_certificate(&live, &host, false)?;
    let nginx = nginx_service_mounting(
        net.name(),
        &[],
        &[
            (certs.path(), "/etc/letsencrypt"),
            (webroot.path(), "/var/www/challenge"),
        ],
    )?;
    let shop = ServiceBuilder::backend(&unique("crt-shop"))
        .network(net.name())
        .label("routing-host", &host)
        .label("routing-port", "80")
        .label("routing-extra-hosts", &alias)
        .label("routing-hsts", "600")
        .create()?;
    wait_running(shop.name(), 1, SWARM)?;

    let http = format!("127.0.0.1:{}", free_port());
    let conf = nginx.conf("drover.conf");
    let mut drover = DroverProcess::start(
        &config(&http, &nginx_target(&conf, net.name(), nginx.name())),
        Some(&http),
    )?;
    drover.wait_http_ok("/healthz", BOUND)?;

    // Port 80: 301 to https for the host and its extra name.
    // A connection may still meet a worker of the config before (a reload under load, other
    // tests' services share the file): each answer is waited for, never a single request.
    let mut last = None;
    let want = format!("https://{host}/x?y=1");
    let redirected = wait_until(BOUND, Duration::from_millis(250), || {
        let r = nginx.get(&host, "/x?y=1");
        let done =
            matches!(&r, Ok(r) if r.status == 301 && r.header("location") == Some(want.as_str()));
        last = Some(r);
        done
    });
    ensure!(redirected, "port 80 redirects {host} to {want}: {last:?}");
    wait_answer(&nginx, &alias, "/", 301, "").context("the extra name too")?;

    // The challenge path is not redirected: served from the webroot for every name.
    for name in [host.as_str(), alias.as_str(), "nobody-routes-this.test"] {
        wait_answer(
            &nginx,
            name,
            "/.well-known/acme-challenge/token-1",
            200,
            "token-1.thumbprint",
        )
        .with_context(|| format!("challenge for {name}"))?;
    }

    // Port 443: h2, HSTS, the backend behind it, and the certificate on disk.
    let (version, head) = curl_tls(nginx.tls_port, &host, "/")?;
    assert_eq!(version, "2", "curl --http2 negotiates h2: {head}");
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=600"),
        "{head}"
    );
    let (version, _) = curl_tls(nginx.tls_port, &alias, "/")?;
    assert_eq!(version, "2");
    let cert = live.join(&host).join("fullchain.pem");
    let first = file_fingerprint(&cert)?;
    assert_eq!(served_fingerprint(nginx.tls_port, &host)?, first);

    // Renewed in place, nothing else changes: served after a resync, with the same file.
    // Other tests' services share the engine and this file: only this host's block counts.
    let block = || -> Result<String> {
        let text = std::fs::read_to_string(&conf)?;
        Ok(host_block(&text, &host).unwrap_or_default().to_owned())
    };
    let before = block()?;
    ensure!(!before.is_empty(), "{host} in drover's file");
    make_certificate(&live, &host, false)?;
    let renewed = file_fingerprint(&cert)?;
    assert_ne!(first, renewed);
    let mut seen = String::new();
    let served = wait_until(BOUND, Duration::from_millis(500), || {
        seen = served_fingerprint(nginx.tls_port, &host).unwrap_or_default();
        seen == renewed
    });
    assert!(
        served,
        "renewed certificate {renewed} served; nginx shows {seen}"
    );
    assert_eq!(block()?, before, "the host's lines did not change");
    // drover logs the change once the reload is through, which can be a moment after
    // nginx already serves the new certificate.
    let said = wait_until(BOUND, Duration::from_millis(200), || {
        drover.logs().contains("certificate files changed on disk")
    });
    assert!(said, "{}", drover.logs());
    assert!(drover.is_running());
    Ok(())
}

/// Pebble as `scripts/test` starts it: (directory URL, its listener certificate, the host
/// port its HTTP-01 validation dials).
fn pebble() -> Result<(String, std::path::PathBuf, u16)> {
    let var = |k: &str| {
        std::env::var(k).with_context(|| {
            format!("{k} unset: run `scripts/test pebble` and `eval \"$(scripts/test env)\"`")
        })
    };
    Ok((
        var("DROVER_TEST_PEBBLE")?,
        var("DROVER_TEST_PEBBLE_CA")?.into(),
        var("DROVER_TEST_PEBBLE_HTTP_PORT")?.parse()?,
    ))
}

/// Pebble's issuing root (new at every Pebble start), as a PEM file in `dir`.
fn pebble_root(ca: &Path, dir: &Path) -> Result<std::path::PathBuf> {
    let root = dir.join("pebble-root.pem");
    let out = Command::new("curl")
        .args(["-fsS", "--cacert"])
        .arg(ca)
        .args(["-o"])
        .arg(&root)
        .arg("https://127.0.0.1:15000/roots/0")
        .output()?;
    ensure!(
        out.status.success(),
        "Pebble's root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(root)
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_certificate_from_pebble_for_a_host_and_its_extra_name_chains_to_its_root_and_is_served_with_h2()
-> Result<()> {
    require_e2e!();
    let (directory, ca, http_port) = pebble()?;
    let net = create_overlay_network(&unique("acme-net"))?;
    let certs = temp_dir("acme-certs")?;
    let live = certs.path().join("live");
    let webroot = temp_dir("acme-challenge")?;
    let tokens = webroot.path().join(".well-known/acme-challenge");
    std::fs::create_dir_all(&live)?;
    std::fs::create_dir_all(&tokens)?;
    world_readable(&[
        certs.path(),
        &live,
        webroot.path(),
        &webroot.path().join(".well-known"),
        &tokens,
    ])?;
    let nginx = nginx_service_on(
        net.name(),
        &[],
        &[
            (certs.path(), "/etc/letsencrypt"),
            (webroot.path(), "/var/www/challenge"),
        ],
        http_port,
    )?;
    let host = format!("{}.test", unique("acme-shop"));
    let alias = format!("www.{host}");
    let shop = ServiceBuilder::backend(&unique("acme-shop"))
        .network(net.name())
        .label("routing-host", &host)
        .label("routing-port", "80")
        .label("routing-extra-hosts", &alias)
        .create()?;
    wait_running(shop.name(), 1, SWARM)?;
    let http = format!("127.0.0.1:{}", free_port());
    let conf = nginx.conf("drover.conf");
    let mut drover = DroverProcess::start(
        &config(&http, &nginx_target(&conf, net.name(), nginx.name())),
        Some(&http),
    )?;
    drover.wait_http_ok("/healthz", BOUND)?;
    // No certificate yet: the host is proxied on port 80, challenge path included.
    let proxied = wait_until(BOUND, Duration::from_millis(250), || {
        nginx.get(&host, "/").is_ok_and(|r| r.status == 200)
    });
    ensure!(proxied, "{host} on port 80 before its certificate");

    let runtime = tokio::runtime::Runtime::new()?;
    let names = vec![host.clone(), alias.clone()];
    let issued = runtime.block_on(async {
        let (client, created) =
            drover::certs::acme::Client::connect(&directory, Some(&ca), None, None).await?;
        ensure!(created.is_some(), "a new account's credentials come back");
        let dir = tokens.clone();
        let issued = client
            .obtain(
                &names,
                async move |list: Vec<drover::certs::acme::Token>| {
                    for t in list {
                        let path = dir.join(&t.token);
                        std::fs::write(&path, &t.key_authorization).map_err(|e| e.to_string())?;
                        world_readable(&[&path]).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                },
            )
            .await?;
        // A name nobody serves a token for fails, with the CA's words, and nothing else.
        let nobody = format!("{}.test", unique("acme-nobody"));
        let failed = client
            .obtain(std::slice::from_ref(&nobody), async |_| Ok(()))
            .await
            .expect_err("no token served");
        let text = failed.to_string();
        ensure!(
            text.contains(&format!("the order for [{nobody}] ended invalid"))
                && text.contains("unauthorized"),
            "the failure names the order, its status and the CA's words: {text}"
        );
        Ok(issued)
    })?;

    // The chain verifies against Pebble's root, for both names.
    let root = pebble_root(&ca, certs.path())?;
    let dir = live.join(&host);
    std::fs::create_dir_all(&dir)?;
    world_readable(&[&dir])?;
    let chain = dir.join("fullchain.pem");
    std::fs::write(&chain, &issued.chain_pem)?;
    world_readable(&[&chain])?;
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&chain)
        .output()?;
    ensure!(
        verify.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&chain)
        .output()?;
    let sans = String::from_utf8_lossy(&text.stdout).into_owned();
    ensure!(
        sans.contains(&format!("DNS:{host}")) && sans.contains(&format!("DNS:{alias}")),
        "{sans}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("privkey.pem");
        std::fs::write(&key, issued.key_pem())?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }

    // drover finds the files on a resync and serves the host with TLS: curl trusts Pebble's
    // root only, and negotiates h2 for both names.
    for name in [&host, &alias] {
        let mut last = String::new();
        let served = wait_until(BOUND, Duration::from_millis(500), || {
            let out = Command::new("curl")
                .args(["-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version}"])
                .args(["--max-time", "5", "--cacert"])
                .arg(&root)
                .args(["--resolve", &format!("{name}:{}:127.0.0.1", nginx.tls_port)])
                .arg(format!("https://{name}:{}/", nginx.tls_port))
                .output();
            last = match out {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => e.to_string(),
            };
            last.trim() == "2"
        });
        ensure!(served, "https://{name} with Pebble's certificate: {last}");
    }
    wait_answer(&nginx, &host, "/", 301, "")?;
    assert!(drover.is_running());
    Ok(())
}
