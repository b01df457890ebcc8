//! Pebble for the ACME tests and benches (issue 22): a TLS relay from a namespace node's
//! host-side address to a Pebble on loopback, Pebble's DNS (challtestsrv), what a node's
//! nginx serves over TLS, the shipped stack with `certificates:` naming Pebble, and a
//! second Pebble that wants external account binding.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::cluster::{Cluster, Node, ShippedStack};
use super::*;

/// How long Pebble's root may take to be fetched (Pebble just started).
const ROOT_WAIT: Duration = Duration::from_secs(120);

/// The relay to Pebble listens on this port of the manager's host-side address.
pub const RELAY_PORT: u16 = 14400;

pub fn var(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| {
        format!("{k} unset: run `scripts/test pebble` and `eval \"$(scripts/test env)\"`")
    })
}

/// socat terminating TLS on `ip:RELAY_PORT` and speaking TLS to Pebble on loopback.
pub struct Relay(Child);

impl Relay {
    pub fn start(dir: &std::path::Path, ip: &str, pebble_ca: &str, ca: &Ca) -> Result<Relay> {
        let p = |f: &str| dir.join(f).display().to_string();
        let child = Command::new("socat")
            .process_group(0)
            .arg(format!(
                "OPENSSL-LISTEN:{RELAY_PORT},bind={ip},reuseaddr,fork,cert={},key={},verify=0",
                p("relay.pem"),
                p("relay.key")
            ))
            .arg(format!(
                "OPENSSL:127.0.0.1:{},cafile={pebble_ca},commonname=localhost",
                ca.acme
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let relay = Relay(child);
        // Ours, and through to Pebble: a relay left bound to the address by another run
        // shows another certificate, and a failed bind leaves nothing listening.
        let ca = dir.join("ca.pem");
        let through = wait_until(Duration::from_secs(15), Duration::from_millis(250), || {
            Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--max-time", "3", "--cacert"])
                .arg(&ca)
                .arg(format!("https://{ip}:{RELAY_PORT}/dir"))
                .status()
                .is_ok_and(|s| s.success())
        });
        ensure!(
            through,
            "the TLS relay to Pebble on {ip}:{RELAY_PORT} does not answer with its certificate (is another relay bound there?)"
        );
        Ok(relay)
    }
}

impl Drop for Relay {
    /// The whole process group: socat forks a child per connection, and a child whose peer
    /// (a drover container of a cluster now gone) never closed would outlive the relay.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points `names` at `addr` in Pebble's DNS (pebble-challtestsrv's management API).
pub fn dns(names: &[&str], addr: &str, add: bool) -> Result<()> {
    if add {
        // A run that failed before its cleanup leaves its records, and add-a appends:
        // the CA would dial a dead cluster's address.
        dns(names, "", false)?;
    }
    for name in names {
        let (path, body) = if add {
            (
                "add-a",
                format!(r#"{{"host":"{name}","addresses":["{addr}"]}}"#),
            )
        } else {
            ("clear-a", format!(r#"{{"host":"{name}"}}"#))
        };
        let out = Command::new("curl")
            .args(["-fsS", "-X", "POST", "-d", &body])
            .arg(format!("http://127.0.0.1:8055/{path}"))
            .output()?;
        ensure!(
            out.status.success(),
            "challtestsrv {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What `node`'s nginx serves for `name` over TLS: (HTTP version, SHA-256 of the leaf).
pub fn served(
    node: &Node,
    tls_port: u16,
    name: &str,
    root: &std::path::Path,
) -> Result<(String, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(root)
        .args(["--resolve", &format!("{name}:{tls_port}:{}", node.addr)])
        .arg(format!("https://{name}:{tls_port}/"))
        .output()?;
    ensure!(
        out.status.success(),
        "{}: {}",
        node.short,
        String::from_utf8_lossy(&out.stderr)
    );
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let leaf = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect {}:{tls_port} -servername {name} 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
            node.addr
        ))
        .output()?;
    Ok((
        version,
        String::from_utf8_lossy(&leaf.stdout).trim().to_owned(),
    ))
}

/// A Pebble instance: its ACME port and its management port (roots, `/roots/0`).
pub struct Ca {
    pub acme: u16,
    pub management: u16,
}

/// The Pebble `scripts/test pebble` starts (no external account binding).
pub const PEBBLE: Ca = Ca {
    acme: 14000,
    management: 15000,
};

/// The shipped stack on `cluster`, with `certificates:` naming Pebble (`ca`) through the
/// relay (and `settings` below it); `secrets` (name, file) are mounted in drover's
/// container by the second compose file, at `/run/secrets/NAME`.
pub struct World {
    pub stack: ShippedStack,
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub m1_host: String,
    _relay: Relay,
}

impl World {
    pub fn deploy(net: &str, app_host: &str, workers: usize, settings: &str) -> Result<World> {
        World::deploy_to(
            Cluster::new(1, workers)?,
            net,
            app_host,
            &PEBBLE,
            settings,
            &[],
        )
    }

    pub fn deploy_to(
        cluster: Cluster,
        net: &str,
        app_host: &str,
        ca: &Ca,
        settings: &str,
        secrets: &[(&str, &std::path::Path)],
    ) -> Result<World> {
        let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
        let http_port: u16 = var("DROVER_TEST_PEBBLE_HTTP_PORT")?.parse()?;
        let m1_host = cluster.node("m1").host_addr.clone();
        let dir = temp_dir("acme-e2e")?;
        super::tls_ca_and_leaf(dir.path(), &m1_host)?;
        let relay = Relay::start(dir.path(), &m1_host, &pebble_ca, ca)?;
        let extra = ca_compose_file(dir.path(), secrets)?;
        let directory = format!("https://{m1_host}:{RELAY_PORT}/dir");
        let stack = ShippedStack::deploy_files(
            &["stack.yml", &extra],
            cluster,
            net,
            app_host,
            http_port,
            &[],
            |c| {
                format!(
                    "{c}\ncertificates:\n  directory: {directory}\n  ca_file: /etc/drover/ca.pem\n{settings}"
                )
            },
        )?;
        Ok(World {
            stack,
            dir,
            http_port,
            m1_host,
            _relay: relay,
        })
    }
}

/// Pebble's issuing root (new at every Pebble start), as a PEM file in `dir`.
pub fn pebble_root(pebble_ca: &str, dir: &std::path::Path, ca: &Ca) -> Result<std::path::PathBuf> {
    let root = dir.join(format!("pebble-root-{}.pem", ca.management));
    let got = wait_until(ROOT_WAIT, Duration::from_secs(1), || {
        Command::new("curl")
            .args(["-fsS", "--cacert", pebble_ca, "-o"])
            .arg(&root)
            .arg(format!("https://127.0.0.1:{}/roots/0", ca.management))
            .status()
            .is_ok_and(|s| s.success())
    });
    ensure!(got, "Pebble's root");
    Ok(root)
}

/// The second compose file docs/certificates.md shows for a private CA's root (the
/// relay's CA in `dir`) and, when given, `secrets` (name, file) such as an external account
/// binding's key; its path.
pub fn ca_compose_file(
    dir: &std::path::Path,
    secrets: &[(&str, &std::path::Path)],
) -> Result<String> {
    let ca_copy = dir.join("acme-ca.pem");
    std::fs::copy(dir.join("ca.pem"), &ca_copy)?;
    let extra = dir.join("stack.acme-ca.yml");
    let mut text = "version: \"3.7\"\nservices:\n  drover:\n    configs:\n      - source: drover-config\n        target: /etc/drover/drover.yml\n        mode: 0444\n      - source: acme-ca\n        target: /etc/drover/ca.pem\n        mode: 0444\n"
        .to_owned();
    if !secrets.is_empty() {
        text.push_str("    secrets:\n");
        for (name, _) in secrets {
            text.push_str(&format!("      - {name}\n"));
        }
    }
    text.push_str(&format!(
        "configs:\n  acme-ca:\n    file: {}\n",
        ca_copy.display()
    ));
    if !secrets.is_empty() {
        text.push_str("secrets:\n");
        for (name, file) in secrets {
            text.push_str(&format!("  {name}:\n    file: {}\n", file.display()));
        }
    }
    std::fs::write(&extra, text)?;
    Ok(extra.display().to_string())
}

/// A second Pebble that creates accounts only with external account binding
/// (`externalAccountBindingRequired`, one key `kid` → `key`, base64url), on free ports, so
/// the Pebble of `scripts/test` is untouched. It shares that Pebble's TLS certificate and
/// its DNS (challtestsrv); stopped on drop.
pub struct EabPebble {
    child: Child,
    pub ca: Ca,
    _dir: tempfile::TempDir,
}

impl EabPebble {
    pub fn start(kid: &str, key: &str) -> Result<EabPebble> {
        let pebble_ca = var("DROVER_TEST_PEBBLE_CA")?;
        let http_port = var("DROVER_TEST_PEBBLE_HTTP_PORT")?;
        let state = std::path::Path::new(&pebble_ca)
            .parent()
            .context("Pebble's state directory")?;
        let (acme, management) = (free_port(), free_port());
        let dir = temp_dir("acme-eab-pebble")?;
        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{acme}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": state.join("cert.pem"),
                "privateKey": state.join("key.pem"),
                "httpPort": http_port.parse::<u16>()?,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": true,
                "externalAccountMACKeys": { kid: key },
            }})
            .to_string(),
        )?;
        let log = std::fs::File::create(dir.path().join("pebble.log"))?;
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", "127.0.0.1:8053"])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("pebble (scripts/test installs it)")?;
        let pebble = EabPebble {
            child,
            ca: Ca { acme, management },
            _dir: dir,
        };
        wait_for("the second Pebble", Duration::from_secs(30), || {
            Command::new("curl")
                .args(["-fsS", "-o", "/dev/null", "--cacert", &pebble_ca])
                .arg(pebble.directory())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        Ok(pebble)
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.ca.acme)
    }
}

impl Drop for EabPebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 32 random bytes, base64url as a CA shows an HMAC key.
pub fn random_key() -> Result<String> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
