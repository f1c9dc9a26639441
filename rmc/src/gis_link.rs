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

/// Whether `e` means the GIS gave no answer at all (worth asking another replica), as
/// opposed to an answer that refused.
fn no_answer(e: &AdminError) -> bool {
    matches!(
        e,
        AdminError::Transport(_) | AdminError::Connect { .. } | AdminError::Stopped
    )
}

/// Several GIS replicas of one Raft group: calls go to the replica in use; when it gives no
/// answer, the next one that does takes over (and stays in use). Queries and revocations
/// (which the replicas apply once, however often asked) are retried there; a host command
/// is not, since the first replica may have forwarded it already: its caller gets the
/// error and may send it again.
pub struct FailoverGis {
    addrs: Vec<libp2p::Multiaddr>,
    admin: libp2p::identity::Keypair,
    /// The replica in use: its index in `addrs` and its client. Locked only to read or
    /// swap it, never across a request.
    current: std::sync::Mutex<(usize, AdminClient)>,
}

impl FailoverGis {
    /// Connects to the first of `addrs` that answers.
    pub async fn connect(
        addrs: Vec<libp2p::Multiaddr>,
        admin: libp2p::identity::Keypair,
    ) -> Result<Self, AdminError> {
        let mut failures = Vec::new();
        for (i, a) in addrs.iter().enumerate() {
            match AdminClient::connect(a.clone(), admin.clone()).await {
                Ok(c) => {
                    return Ok(FailoverGis {
                        addrs,
                        admin,
                        current: std::sync::Mutex::new((i, c)),
                    })
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(AdminError::Transport(format!(
            "no GIS replica answered: {}",
            failures.join("; ")
        )))
    }

    fn current(&self) -> (usize, AdminClient) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `call` on the replica in use, then, while none answers, on each other replica
    /// in turn (`retry` false: only switches replica for the next call).
    async fn call<T, F, Fut>(&self, retry: bool, call: F) -> Result<T, GisCallError>
    where
        F: Fn(AdminClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, AdminError>>,
    {
        let (start, client) = self.current();
        let mut last = match call(client).await {
            Err(e) if no_answer(&e) => e,
            other => return other.map_err(Into::into),
        };
        let n = self.addrs.len();
        for step in 1..=n {
            let i = (start + step) % n;
            let addr = &self.addrs[i];
            let c = match AdminClient::connect(addr.clone(), self.admin.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(gis = %addr, error = %e, "GIS replica does not answer either");
                    last = e;
                    continue;
                }
            };
            tracing::warn!(from = %self.addrs[start], to = %addr, error = %last, "GIS replica gave no answer; the console uses another");
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (i, c.clone());
            if !retry {
                break;
            }
            match call(c).await {
                Err(e) if no_answer(&e) => last = e,
                other => return other.map_err(Into::into),
            }
        }
        Err(last.into())
    }
}

#[async_trait]
impl AdminGis for FailoverGis {
    async fn hosts(&self) -> Result<Vec<HostInfo>, GisCallError> {
        self.call(true, |c| async move { c.hosts().await }).await
    }
    async fn images(&self) -> Result<Vec<ImageHolders>, GisCallError> {
        self.call(true, |c| async move { c.images().await }).await
    }
    async fn stats(&self) -> Result<Stats, GisCallError> {
        self.call(true, |c| async move { c.stats().await }).await
    }
    async fn command(
        &self,
        peer: PeerId,
        cmd: HostCommand,
    ) -> Result<CommandOutcome, GisCallError> {
        self.call(false, |c| {
            let cmd = cmd.clone();
            async move { c.command(peer, cmd).await }
        })
        .await
    }
    async fn revoke(&self, serial: u64) -> Result<(), GisCallError> {
        self.call(true, |c| async move { c.revoke(serial).await })
            .await
    }
}

/// Connects to the GIS replicas at `addrs` (each ending in `/p2p/<peer id>`) as the admin,
/// failing over between them; one address: a plain client, as [`connect`].
pub async fn connect_any(
    addrs: Vec<libp2p::Multiaddr>,
    admin: libp2p::identity::Keypair,
) -> Result<std::sync::Arc<dyn AdminGis>, AdminError> {
    match addrs.as_slice() {
        [one] => connect(one.clone(), admin).await,
        _ => Ok(std::sync::Arc::new(
            FailoverGis::connect(addrs, admin).await?,
        )),
    }
}
