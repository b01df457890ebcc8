//! Container endpoints on the local node: list, signal, restart, and exec (used to check
//! a config inside the proxy's container, e.g. `nginx -t`).
//!
//! An exec's output stream has no per-call deadline; the whole exec is bounded by the
//! caller's limit instead, and only a bounded tail of its output is kept. The same holds
//! for one-off containers (a hook's `container` action): create, start, wait (bounded by
//! the caller), read the output tail, remove.

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

    /// `GET /containers/json?all=1&filters={"label":[...]}`: the containers of this node,
    /// running or not, that carry every one of `labels` (`KEY=VALUE`).
    pub async fn list_containers_labelled(
        &self,
        labels: &[String],
    ) -> Result<Vec<ContainerSummary>, Error> {
        let filters = std::collections::HashMap::from([("label".to_owned(), labels.to_vec())]);
        self.call(
            || format!("list containers labelled {}", labels.join(",")),
            self.api.list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..ListContainersOptions::default()
            })),
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

/// Bytes of a one-off container's output read at most (its tail).
const RUN_OUTPUT_LIMIT: usize = 16 * 1024;

impl Engine {
    /// `POST /containers/create?name=...`; the new container's id.
    pub async fn create_container(
        &self,
        name: &str,
        body: bollard::models::ContainerCreateBody,
    ) -> Result<String, Error> {
        let options = bollard::query_parameters::CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        self.call(
            || format!("create container {name}"),
            self.api.create_container(Some(options), body),
        )
        .await
        .map(|r| r.id)
    }

    /// `POST /images/create?fromImage=...`, followed to its end within `limit` (a pull
    /// streams progress for as long as it takes).
    pub async fn pull_image(
        &self,
        image: &str,
        credentials: Option<super::Credentials>,
        limit: Duration,
    ) -> Result<(), Error> {
        let op = || format!("pull {image}");
        let options = bollard::query_parameters::CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        let pull = async {
            let mut progress = self.api.create_image(Some(options), None, credentials);
            while let Some(item) = progress.next().await {
                item.map_err(|e| Error::from_bollard(op(), e))?;
            }
            Ok(())
        };
        tokio::time::timeout(limit, pull)
            .await
            .map_err(|_| Error::Timeout {
                op: op(),
                after: limit,
            })?
    }

    /// `PUT /containers/{id}/archive?path=/`: unpacks `tar` into the (created, not yet
    /// started) container, so files reach it without a bind mount or its environment.
    pub async fn upload_archive(&self, id: &str, tar: Vec<u8>) -> Result<(), Error> {
        let options = bollard::query_parameters::UploadToContainerOptions {
            path: "/".to_owned(),
            ..Default::default()
        };
        self.call(
            || format!("upload files to container {id}"),
            self.api.upload_to_container(
                id,
                Some(options),
                bollard::body_full(hyper::body::Bytes::from(tar)),
            ),
        )
        .await
    }

    /// `POST /networks/{net}/connect` for container `id`.
    pub async fn connect_container(&self, net: &str, id: &str) -> Result<(), Error> {
        let req = bollard::models::NetworkConnectRequest {
            container: id.to_owned(),
            endpoint_config: None,
        };
        self.call(
            || format!("attach container {id} to network {net}"),
            self.api.connect_network(net, req),
        )
        .await
    }

    /// `POST /containers/{id}/start`.
    pub async fn start_container(&self, id: &str) -> Result<(), Error> {
        self.call(
            || format!("start container {id}"),
            self.api
                .start_container(id, None::<bollard::query_parameters::StartContainerOptions>),
        )
        .await
    }

    /// `POST /containers/{id}/wait`: the exit code. No deadline of its own: the caller
    /// bounds the wait by the container's time limit.
    pub async fn wait_container(&self, id: &str) -> Result<i64, Error> {
        let op = || format!("wait for container {id}");
        let mut stream = self
            .api
            .wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>);
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            // bollard turns a non-zero exit into an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(Error::from_bollard(op(), e)),
            None => Err(Error::Decode {
                op: op(),
                reason: "the wait ended without a status".into(),
            }),
        }
    }

    /// `GET /containers/{id}/logs?tail=N`: stdout and stderr interleaved as stored, at
    /// most the last [`RUN_OUTPUT_LIMIT`] bytes.
    pub async fn container_logs(&self, id: &str, lines: usize) -> Result<String, Error> {
        let op = || format!("read the output of container {id}");
        let options = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let read = async {
            let mut stream = self.api.logs(id, Some(options));
            let mut text = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Error::from_bollard(op(), e))?;
                text.extend_from_slice(chunk.as_ref());
                if text.len() > 2 * RUN_OUTPUT_LIMIT {
                    text.drain(..text.len() - RUN_OUTPUT_LIMIT);
                }
            }
            let start = text.len().saturating_sub(RUN_OUTPUT_LIMIT);
            Ok(String::from_utf8_lossy(&text[start..]).into_owned())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| Error::Timeout {
                op: op(),
                after: self.timeout,
            })?
    }

    /// `DELETE /containers/{id}?force=1&v=1`; a container already gone is not an error.
    pub async fn remove_container(&self, id: &str) -> Result<(), Error> {
        let options = bollard::query_parameters::RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self
            .call(
                || format!("remove container {id}"),
                self.api.remove_container(id, Some(options)),
            )
            .await
        {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }
}
