//! What the operator routes share: the status board, the job table, the bearer token's
//! hash and, in cluster mode, the way to the controller. Both `ops` and `jobs` read it.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::Error;
use crate::cluster::contacts::Contacts;
use crate::jobs::Jobs;
use crate::status::Board;

#[derive(Clone)]
pub struct OpsState {
    pub board: Arc<Board>,
    /// `None` while drover waits for the engine.
    pub jobs: Option<Arc<Jobs>>,
    /// SHA-256 of the bearer token, when one is required.
    pub token: Option<[u8; 32]>,
    /// Cluster mode: job reads go to the controller while this instance is not it.
    pub forward: Option<Arc<crate::cluster::forward::Forwarder>>,
    /// Who the controller is and when each peer last answered (`/healthz`, status page).
    pub contacts: Arc<Contacts>,
}

impl OpsState {
    /// Reads the token file named in the config, if any.
    pub fn new(
        board: Arc<Board>,
        jobs: Option<Arc<Jobs>>,
        contacts: Arc<Contacts>,
        ops: &crate::config::Ops,
    ) -> Result<OpsState, Error> {
        let token = match &ops.token_file {
            None => None,
            Some(path) => {
                let bytes = crate::config::read_secret(path).map_err(|source| Error::Token {
                    path: path.clone(),
                    source,
                })?;
                if bytes.is_empty() {
                    return Err(Error::EmptyToken(path.clone()));
                }
                Some(Sha256::digest(&bytes).into())
            }
        };
        Ok(OpsState {
            board,
            jobs,
            token,
            forward: None,
            contacts,
        })
    }

    pub fn with_forward(
        mut self,
        forward: Option<Arc<crate::cluster::forward::Forwarder>>,
    ) -> OpsState {
        self.forward = forward;
        self
    }
}
