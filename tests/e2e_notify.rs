//! End-to-end: notifications from the `drover` binary to real HTTP receivers (listeners in
//! this test). A signed webhook sink gets `drover_started` and, for a job that fails,
//! `job_failed` with the documented JSON and a valid `X-Hub-Signature-256`; a sink that
//! never answers and one that answers 500 delay neither that sink nor the webhook intake,
//! and the failing sink is counted as failed after its tries.
//!
//! Run by `scripts/test` (`DROVER_E2E=1`); skipped otherwise.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

const TOKEN: &str = "notify-token";
const SECRET: &[u8] = b"notify-secret";

/// A request a receiver got: its headers (lower-case names) and body.
#[derive(Debug, Clone)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a receiver answers.
#[derive(Clone, Copy)]
enum Answer {
    Status(u16),
    Never,
}

/// A listener on loopback recording every request; its URL and what it got so far.
fn receiver(answer: Answer) -> Result<(String, Arc<Mutex<Vec<Received>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}/notify", listener.local_addr()?);
    let got = Arc::new(Mutex::new(Vec::new()));
    let record = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut headers = Vec::new();
                let mut line = String::new();
                let mut length = 0;
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let l = line.trim_end().to_owned();
                    line.clear();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((n, v)) = l.split_once(':') {
                        let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_owned());
                        if n == "content-length" {
                            length = v.parse().unwrap_or(0);
                        }
                        headers.push((n, v));
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                if let Ok(mut r) = record.lock() {
                    r.push(Received { headers, body });
                }
                match answer {
                    Answer::Status(code) => {
                        let _ = (&stream).write_all(
                            format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .as_bytes(),
                        );
                    }
                    // Holds the connection open, answering nothing.
                    Answer::Never => std::thread::sleep(Duration::from_secs(120)),
                }
            });
        }
    });
    Ok((url, got))
}

#[test]
#[ignore = "end-to-end: scripts/test runs it (DROVER_E2E=1, --include-ignored)"]
fn a_signed_webhook_sink_is_told_of_the_start_and_of_a_failed_job_while_broken_sinks_delay_nothing()
-> Result<()> {
    require_e2e!();
    let dir = temp_dir("notify")?;
    let (good, got) = receiver(Answer::Status(200))?;
    let (hanging, _) = receiver(Answer::Never)?;
    let (failing, failed) = receiver(Answer::Status(500))?;
    let file = |name: &str, text: &[u8]| -> Result<String> {
        let path = dir.path().join(name);
        std::fs::write(&path, text)?;
        Ok(path.display().to_string())
    };
    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "http: {{ listen: {http} }}\njobs: {{ state_file: {state} }}\n\
         hooks:\n  - name: ci\n    kind: generic\n    token_file: {token}\n    quiet: 100ms\n    \
         action: {{ restart-service: {missing} }}\n\
         notifications:\n  sinks:\n\
         \x20   - {{ name: hanging, kind: slack, url_file: {hanging} }}\n\
         \x20   - {{ name: failing, kind: ntfy, url_file: {failing}, events: [job_failed] }}\n\
         \x20   - {{ name: good, kind: webhook, url_file: {good}, secret_file: {secret} }}\n",
        state = dir.path().join("jobs.json").display(),
        token = file("token", TOKEN.as_bytes())?,
        missing = unique("no-such-service"),
        hanging = file("hanging.url", hanging.as_bytes())?,
        failing = file("failing.url", failing.as_bytes())?,
        good = file("good.url", good.as_bytes())?,
        secret = file("secret", SECRET)?,
    );
    let mut drover = DroverProcess::start(&config, Some(&http))?;
    drover.wait_http_ok("/healthz", Duration::from_secs(30))?;

    let events = |kind: &str| -> Vec<Received> {
        got.lock()
            .map(|r| {
                r.iter()
                    .filter(|m| m.header("x-drover-event") == Some(kind))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(
        "drover_started at the good sink",
        Duration::from_secs(30),
        || !events("drover_started").is_empty(),
    )?;

    // The hanging sink holds a delivery; the intake answers all the same.
    let r = http_post(
        &http,
        "/hooks/ci",
        &[
            ("Content-Type", "application/json"),
            ("X-Drover-Token", TOKEN),
        ],
        br#"{"image": "127.0.0.1:5000/notify/app:latest", "build": 1}"#,
    )?;
    ensure!(r.status == 202, "webhook answered {}: {}", r.status, r.body);
    let job: serde_json::Value = serde_json::from_str(&r.body)?;
    let id = job["job"].as_str().context("job id")?.to_owned();
    wait_for(
        "job_failed at the good sink",
        Duration::from_secs(60),
        || !events("job_failed").is_empty(),
    )?;

    let message = events("job_failed").remove(0);
    let signature = message.header("x-hub-signature-256").context("signed")?;
    assert!(
        drover::hooks::verify::verify_signature(SECRET, Some(signature), &message.body),
        "the signature verifies: {signature}"
    );
    let body: serde_json::Value = serde_json::from_slice(&message.body)?;
    assert_eq!(body["event"], "job_failed", "{body}");
    assert_eq!(body["subject"], id.as_str(), "{body}");
    assert_eq!(body["details"]["hook"], "ci", "{body}");
    assert_eq!(body["details"]["state"], "failed", "{body}");
    for key in ["summary", "node", "at"] {
        assert!(!body[key].is_null(), "{key} in {body}");
    }
    let text = String::from_utf8_lossy(&message.body);
    assert!(!text.contains(TOKEN), "no secret in a notification: {text}");

    // The ntfy sink answering 500 got its tries and is counted as failed, once.
    wait_for(
        "the failing sink counted as failed",
        Duration::from_secs(60),
        || {
            metric_value(
                &drover.metrics(),
                "drover_notifications_total",
                &[("sink", "failing"), ("outcome", "failed")],
            )
            .is_some_and(|v| v >= 1.0)
        },
    )?;
    let tries = failed.lock().map(|r| r.len()).unwrap_or_default();
    assert_eq!(tries, 3, "three tries at a sink answering 500");
    assert_eq!(events("drover_started").len(), 1, "one start, told once");
    Ok(())
}
