//! Distribution endpoint: `GET /distribution/{name}/json`, the registry's digest of a tag
//! as the engine resolves it (the index digest of a multi-arch image).

use super::{Credentials, Engine, Error};

impl Engine {
    /// The digest `reference` (`registry/repo:tag`) points to now, asking the registry
    /// through the engine with `credentials` when the registry needs them.
    pub async fn image_digest(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
    ) -> Result<String, Error> {
        let op = || format!("resolve {reference}");
        let inspect = self
            .call(op, self.api.inspect_registry_image(reference, credentials))
            .await?;
        inspect.descriptor.digest.ok_or_else(|| Error::Decode {
            op: op(),
            reason: "the registry returned no digest".into(),
        })
    }
}
