//! The one way drover runs a local command: [`run`].
//!
//! Invariants: argv only, never a shell; the child's environment is an explicit
//! allow-list ([`INHERITED`] from drover's own environment plus what the caller passes),
//! never drover's whole environment, which may hold secrets; the child is killed when
//! its time is up or the caller stops waiting; only a bounded tail of stdout and stderr
//! is kept however much the child prints.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Variables a command inherits from drover's environment (tools need a `PATH`, a
/// locale, a home for their config, and the engine drover talks to).
pub const INHERITED: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "DOCKER_HOST",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("command is empty")]
    Empty,
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for {program}: {source}")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {}", humantime::format_duration(*.after))]
    Timeout { program: String, after: Duration },
}

/// How a finished command ended and the last bytes it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `exit code N` (or `killed by a signal`) and the output tails, for logs and jobs.
    pub fn summary(&self) -> String {
        let mut message = match self.code {
            Some(code) => format!("exit code {code}"),
            None => "killed by a signal".to_owned(),
        };
        for (name, text) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = text.trim_end();
            if !text.is_empty() {
                message.push_str(&format!("; {name}: {text}"));
            }
        }
        message
    }
}

/// Runs `argv` with the [`INHERITED`] variables plus `env`, stdin closed, for at most
/// `timeout`; keeps the last `tail` bytes of stdout and of stderr.
pub async fn run(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    tail: usize,
) -> Result<Output, Error> {
    let (program, args) = argv.split_first().ok_or(Error::Empty)?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for key in INHERITED {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().map_err(|source| Error::Start {
        program: program.clone(),
        source,
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::Start {
            program: program.clone(),
            source: std::io::Error::other("no output pipes"),
        });
    };
    let finished = async {
        let (out, err, status) = tokio::join!(
            read_tail(stdout, tail),
            read_tail(stderr, tail),
            child.wait()
        );
        status.map(|s| (s, out, err))
    };
    match tokio::time::timeout(timeout, finished).await {
        Ok(Ok((status, stdout, stderr))) => Ok(Output {
            code: status.code(),
            stdout,
            stderr,
        }),
        Ok(Err(source)) => Err(Error::Wait {
            program: program.clone(),
            source,
        }),
        // Dropping `child` (kill_on_drop) kills it.
        Err(_) => Err(Error::Timeout {
            program: program.clone(),
            after: timeout,
        }),
    }
}

/// Reads `r` to its end, keeping only the last `tail` bytes, marked with a leading `...`
/// when anything before them was dropped.
async fn read_tail(mut r: impl AsyncRead + Unpin, tail: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    // Whether bytes were dropped is counted, not inferred from `kept` at the end: how
    // much `kept` holds then depends on how the pipe happened to split the output (a
    // drain right before EOF leaves exactly `tail` bytes, which looked like "nothing
    // dropped" and lost the mark under load).
    let mut dropped = 0usize;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > tail.saturating_mul(2).max(buf.len()) {
                    let excess = kept.len() - tail;
                    kept.drain(..excess);
                    dropped += excess;
                }
            }
        }
    }
    let start = kept.len().saturating_sub(tail);
    dropped += start;
    let mut text = String::from_utf8_lossy(&kept[start..]).into_owned();
    if dropped > 0 {
        text.insert_str(0, "...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_command_sees_only_the_allow_list_and_its_own_variables() {
        // cargo sets CARGO_* for the test process: none of it may reach the child.
        assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
        let out = run(
            &argv(&["env"]),
            &[("DROVER_HOOK".into(), "gh".into())],
            Duration::from_secs(10),
            10_000,
        )
        .await
        .expect("run");
        assert!(out.success(), "{out:?}");
        let names: Vec<&str> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(names.contains(&"DROVER_HOOK"), "{names:?}");
        assert!(out.stdout.contains("DROVER_HOOK=gh"));
        for name in names {
            assert!(
                INHERITED.contains(&name) || name == "DROVER_HOOK",
                "{name} leaked into the child's environment"
            );
        }
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_stopped() {
        let started = std::time::Instant::now();
        let e = run(
            &argv(&["sleep", "30"]),
            &[],
            Duration::from_millis(200),
            100,
        )
        .await
        .expect_err("timed out");
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("did not finish within 200ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
    }

    #[tokio::test]
    async fn only_a_bounded_tail_of_the_output_is_kept() {
        let out = run(
            &argv(&[
                "sh",
                "-c",
                "yes abcdefgh | head -c 999999; echo END >&2; exit 3",
            ]),
            &[],
            Duration::from_secs(120),
            100,
        )
        .await
        .expect("run");
        assert_eq!(out.code, Some(3));
        assert!(out.stdout.len() <= 103, "{}", out.stdout.len());
        assert!(out.stdout.starts_with("..."));
        assert!(out.stdout.ends_with("abcdefgh\n"));
        assert_eq!(out.stderr, "END\n");
        assert!(out.summary().starts_with("exit code 3; stdout: ..."));
    }

    /// Hands out its chunks one `read` at a time, the way a pipe splits output.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(chunk.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_tail_is_marked_as_cut_however_the_output_was_split() {
        let tail = 100;
        // 8192 + 1: the second read crosses the drain threshold and the output ends
        // right after the drain, leaving exactly `tail` bytes.
        let splits: [&[usize]; 4] = [&[8192, 1], &[8193], &[1; 9000], &[101]];
        for split in splits {
            let chunks = split.iter().map(|n| vec![b'x'; *n]).collect();
            let text = read_tail(Chunks(chunks), tail).await;
            assert_eq!(text.len(), 3 + tail, "{split:?}");
            assert!(text.starts_with("..."), "{split:?}");
        }
        let whole = read_tail(Chunks([vec![b'x'; 100]].into()), tail).await;
        assert_eq!(whole, "x".repeat(100));
    }

    #[tokio::test]
    async fn an_empty_or_missing_program_is_an_error() {
        assert!(matches!(
            run(&[], &[], Duration::from_secs(1), 10).await,
            Err(Error::Empty)
        ));
        let e = run(&argv(&["/nonexistent/x"]), &[], Duration::from_secs(1), 10)
            .await
            .expect_err("missing");
        assert!(
            e.to_string().starts_with("cannot start /nonexistent/x"),
            "{e}"
        );
    }
}
