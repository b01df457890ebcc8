//! End-to-end: only a WebSocket upgrade reaches a backend through the built-in nginx
//! template (issue 12 item 7). An `h2c` upgrade on `/` would turn the connection into a
//! tunnel to the backend past every location's allow/deny; nginx must forward it as a
//! plain request, while a WebSocket upgrade on the same route still goes through.
//!
//! The backend is busybox `nc` running a tiny handler: it answers `101 Switching
//! Protocols` to any request that reaches it with an `Upgrade` header (as an h2c-capable
//! server would), else `200` with the request headers it got as the body.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`, images built); skipped otherwise.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

const BOUND: Duration = Duration::from_secs(40);
const SWARM: Duration = Duration::from_secs(90);

/// Writes the handler and serves it on port 80 for ever (`-ll`: one handler per
/// connection).
const BACKEND: &str = r#"mkdir -p /tmp
cat > /tmp/handler <<'EOF'
#!/bin/busybox sh
cr=$(printf '\r'); seen=""; up=""
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  seen="$seen$line
"
  case "$line" in [Uu][Pp][Gg][Rr][Aa][Dd][Ee]:*) up=1;; esac
done
if [ -n "$up" ]; then
  printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n%s' "$seen"
else
  printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#seen}" "$seen"
fi
EOF
chmod +x /tmp/handler
exec nc -ll -p 80 -e /tmp/handler"#;

/// Sends `request` to `addr` and returns what comes back within a few seconds (the
/// connection may stay open after an upgrade).
fn exchange(addr: &str, request: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(request.as_bytes())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
        let text = String::from_utf8_lossy(&got);
        // A complete 200: headers and its Content-Length of body.
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// [`exchange`] asked until nginx routes it: right after a reload, a worker still running
/// the previous config may take the connection and answer its fallback 404.
fn routed_exchange(addr: &str, request: &str) -> String {
    let mut answer = String::new();
    wait_until(BOUND, Duration::from_millis(250), || {
        answer = exchange(addr, request).unwrap_or_default();
        !matches!(status(&answer), None | Some(404))
    });
    answer
}

fn status(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn an_h2c_upgrade_is_not_forwarded_while_a_websocket_upgrade_is() -> Result<()> {
    require_e2e!();
    let net = create_overlay_network(&unique("upg-net"))?;
    let nginx = nginx_service(net.name(), &[])?;
    let name = unique("upg-be");
    let host = format!("{name}.test");
    let be = ServiceBuilder::backend(&name)
        .network(net.name())
        .label("routing-host", &host)
        .label("routing-port", "80")
        .label("routing-tls", "false")
        .args(["sh", "-c", BACKEND])
        .create()?;
    wait_running(be.name(), 1, SWARM)?;
    let http = format!("127.0.0.1:{}", free_port());
    let mut drover = DroverProcess::start(
        &format!(
            "http: {{ listen: {http} }}\nresync: 5s\ntargets:{}",
            nginx_target(&nginx.conf("drover.conf"), net.name(), nginx.name())
        ),
        Some(&http),
    )?;
    drover.wait_http_ok("/healthz", BOUND)?;
    let plain = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut last = String::new();
    let routed = wait_until(BOUND, Duration::from_millis(250), || {
        last = exchange(&nginx.addr, &plain).unwrap_or_default();
        status(&last) == Some(200)
    });
    assert!(routed, "the backend answers through nginx: {last:?}");

    let h2c = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let answer = routed_exchange(&nginx.addr, &h2c);
    assert_eq!(status(&answer), Some(200), "no switch to h2c: {answer}");
    let seen = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let lower = seen.to_ascii_lowercase();
    assert!(
        !lower.contains("upgrade: h2c") && !lower.contains("connection: upgrade"),
        "the backend got no upgrade: {seen}"
    );
    assert!(
        lower.contains(&format!("host: {host}")),
        "the headers the backend got: {seen}"
    );

    let websocket = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let answer = routed_exchange(&nginx.addr, &websocket);
    assert_eq!(
        status(&answer),
        Some(101),
        "a WebSocket upgrade goes through: {answer}"
    );
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"),
        "{answer}"
    );
    assert!(drover.is_running());
    Ok(())
}
