//! Container endpoints on the local node: list, signal, restart, and exec (used to check
//! a config inside the proxy's container, e.g. `nginx -t`).
//!
//! An exec's output stream has no per-call deadline; the whole exec is bounded by the
//! caller's limit instead, and only a bounded tail of its output is kept.

use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::ContainerSummary;
use bollard::query_parameters::{KillContainerOptions, ListContainersOptions};
use futures_util::StreamExt;

use super::{Engine, Error};

/// Bytes of exec output kept (the tail: checkers print the verdict last).
const EXEC_OUTPUT_LIMIT: usize = 8 * 1024;

/// What an exec printed (stdout and stderr interleaved, the last bytes only) and how it
/// ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub output: String,
}

impl Engine {
    /// `GET /containers/json`: the running containers of this node.
    pub async fn list_containers(&self) -> Result<Vec<ContainerSummary>, Error> {
        self.call(
            || "list containers".into(),
            self.api.list_containers(None::<ListContainersOptions>),
        )
        .await
    }

    /// `POST /containers/{id}/kill?signal=...`.
    pub async fn kill_container(&self, id: &str, signal: &str) -> Result<(), Error> {
        self.call(
            || format!("signal container {id}"),
            self.api.kill_container(
                id,
                Some(KillContainerOptions {
                    signal: signal.to_owned(),
                }),
            ),
        )
        .await
    }

    /// `POST /containers/{id}/restart`.
    pub async fn restart_container(&self, id: &str) -> Result<(), Error> {
        self.call(
            || format!("restart container {id}"),
            self.api.restart_container(
                id,
                None::<bollard::query_parameters::RestartContainerOptions>,
            ),
        )
        .await
    }

    /// Runs `argv` in container `id` and waits up to `limit` for it to end.
    pub async fn exec(
        &self,
        id: &str,
        argv: &[String],
        limit: Duration,
    ) -> Result<ExecOutput, Error> {
        let op = || format!("exec {argv:?} in container {id}");
        let created = self
            .call(
                op,
                self.api.create_exec(
                    id,
                    CreateExecOptions {
                        cmd: Some(argv.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                ),
            )
            .await?;
        let run = async {
            let mut output = Vec::new();
            if let StartExecResults::Attached {
                output: mut stream, ..
            } = self
                .call(op, self.api.start_exec(&created.id, None))
                .await?
            {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| Error::from_bollard(op(), e))?;
                    output.extend_from_slice(&chunk.into_bytes());
                    if output.len() > 2 * EXEC_OUTPUT_LIMIT {
                        output.drain(..output.len() - EXEC_OUTPUT_LIMIT);
                    }
                }
            }
            Ok::<_, Error>(output)
        };
        let output = tokio::time::timeout(limit, run)
            .await
            .map_err(|_| Error::Timeout {
                op: op(),
                after: limit,
            })??;
        let exit_code = self
            .call(op, self.api.inspect_exec(&created.id))
            .await?
            .exit_code
            .unwrap_or(-1);
        let start = output.len().saturating_sub(EXEC_OUTPUT_LIMIT);
        Ok(ExecOutput {
            exit_code,
            output: String::from_utf8_lossy(&output[start..]).into_owned(),
        })
    }
}
