//! Swarm config endpoints: list by label, create, delete. drover's job journal keeps one
//! config object per pending job, so these are replicated by Raft.

use std::collections::HashMap;

use base64::Engine as _;
use bollard::models::{Config, ConfigSpec};
use bollard::query_parameters::ListConfigsOptions;

use super::{Engine, Error};

impl Engine {
    /// `GET /configs` with the label filter `label` (`key` or `key=value`).
    pub async fn list_configs(&self, label: &str) -> Result<Vec<Config>, Error> {
        let filters = HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
        self.call(
            || format!("list configs labelled {label}"),
            self.api.list_configs(Some(ListConfigsOptions {
                filters: Some(filters),
            })),
        )
        .await
    }

    /// `POST /configs/create`. A config of that name already existing is a
    /// [`super::Kind::Conflict`].
    pub async fn create_config(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        data: &[u8],
    ) -> Result<(), Error> {
        let spec = ConfigSpec {
            name: Some(name.to_owned()),
            labels: Some(labels),
            data: Some(base64::engine::general_purpose::STANDARD.encode(data)),
            templating: None,
        };
        self.call(
            || format!("create config {name}"),
            self.api.create_config(spec),
        )
        .await
        .map(drop)
    }

    /// `DELETE /configs/{id or name}`.
    pub async fn delete_config(&self, name: &str) -> Result<(), Error> {
        self.call(
            || format!("delete config {name}"),
            self.api.delete_config(name),
        )
        .await
    }
}

impl Engine {
    /// `GET /secrets` with the label filter `label`: each secret's name and labels (the
    /// engine never returns a secret's data).
    pub async fn list_secrets(
        &self,
        label: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>, Error> {
        let filters = HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
        let secrets = self
            .call(
                || format!("list secrets labelled {label}"),
                self.api
                    .list_secrets(Some(bollard::query_parameters::ListSecretsOptions {
                        filters: Some(filters),
                    })),
            )
            .await?;
        Ok(secrets
            .into_iter()
            .filter_map(|s| {
                let spec = s.spec?;
                Some((spec.name?, spec.labels.unwrap_or_default()))
            })
            .collect())
    }

    /// `DELETE /secrets/{id or name}`.
    pub async fn delete_secret(&self, name: &str) -> Result<(), Error> {
        self.call(
            || format!("delete secret {name}"),
            self.api.delete_secret(name),
        )
        .await
    }
}
