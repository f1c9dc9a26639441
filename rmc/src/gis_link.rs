//! The console's one way to the system: the admin requests it sends to the GIS. A trait, so
//! the service layer does not care how the request travels; the real implementation is
//! `bids_gis::admin_client::AdminClient` (libp2p, admin identity, commands signed with the
//! admin key), which also reconnects. Errors keep the GIS's or host's refusal kind so the API can map it to a status.

use async_trait::async_trait;
use bids_gis::admin_client::{AdminClient, AdminError};
use bids_protocols::admin::{
    AdminErrorKind, CommandOutcome, HostCommand, HostInfo, ImageHolders, Stats,
};
use libp2p::PeerId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GisCallError {
    /// The GIS or the host answered with a refusal.
    #[error("{message}")]
    Refused {
        kind: AdminErrorKind,
        message: String,
    },
    /// The request did not get an answer (connection, timeout, protocol).
    #[error("no answer from the GIS: {0}")]
    Transport(String),
}

/// What the console asks the GIS.
#[async_trait]
pub trait AdminGis: Send + Sync + 'static {
    async fn hosts(&self) -> Result<Vec<HostInfo>, GisCallError>;
    async fn images(&self) -> Result<Vec<ImageHolders>, GisCallError>;
    async fn stats(&self) -> Result<Stats, GisCallError>;
    /// Signs `cmd` for `peer` with the admin key and has the GIS forward it.
    async fn command(&self, peer: PeerId, cmd: HostCommand)
        -> Result<CommandOutcome, GisCallError>;
    async fn revoke(&self, serial: u64) -> Result<(), GisCallError>;
}

impl From<AdminError> for GisCallError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Refused { kind, message } => GisCallError::Refused { kind, message },
            other => GisCallError::Transport(other.to_string()),
        }
    }
}

/// The real link: libp2p to the GIS with the admin identity.
#[async_trait]
impl AdminGis for AdminClient {
    async fn hosts(&self) -> Result<Vec<HostInfo>, GisCallError> {
        Ok(AdminClient::hosts(self).await?)
    }
    async fn images(&self) -> Result<Vec<ImageHolders>, GisCallError> {
        Ok(AdminClient::images(self).await?)
    }
    async fn stats(&self) -> Result<Stats, GisCallError> {
        Ok(AdminClient::stats(self).await?)
    }
    async fn command(
        &self,
        peer: PeerId,
        cmd: HostCommand,
    ) -> Result<CommandOutcome, GisCallError> {
        Ok(AdminClient::command(self, peer, cmd).await?)
    }
    async fn revoke(&self, serial: u64) -> Result<(), GisCallError> {
        Ok(AdminClient::revoke(self, serial).await?)
    }
}

/// Connects to the GIS at `gis` (ending in `/p2p/<peer id>`) as the admin.
pub async fn connect(
    gis: libp2p::Multiaddr,
    admin: libp2p::identity::Keypair,
) -> Result<std::sync::Arc<dyn AdminGis>, AdminError> {
    Ok(std::sync::Arc::new(AdminClient::connect(gis, admin).await?))
}
