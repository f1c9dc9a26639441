//! Admission of admin commands relayed by the GIS: a command is accepted only if it came
//! from the GIS this node registered with and carries a fresh, unreplayed signature of the
//! admin key addressed to this host. Pure decisions (the caller passes the time); carrying
//! a command out is `crate::admin`'s, above the event loop.

use bids_protocols::admin::{
    AdminErrorKind, AdminRequest, AdminResponse, CommandError, HostCommand, MAX_COMMAND_AGE_SECS,
};
use libp2p::PeerId;
use std::collections::HashMap;
use tracing::{info, warn};

/// Most nonces remembered; more commands than this within the freshness window are refused
/// (an admin sends a handful per minute).
const MAX_REMEMBERED: usize = 16 * 1024;

fn refuse(kind: AdminErrorKind, message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        kind,
        message: message.into(),
    }
}

/// Admission of admin commands: who may send them and which were already seen.
pub(crate) struct AdminGate {
    admin: PeerId,
    /// The GIS, or each replica of its Raft group.
    gis: Vec<PeerId>,
    me: PeerId,
    /// Nonce → issue time of commands accepted within the freshness window.
    seen: HashMap<u64, i64>,
}

impl AdminGate {
    pub(crate) fn new(admin: PeerId, gis: Vec<PeerId>, me: PeerId) -> Self {
        AdminGate {
            admin,
            gis,
            me,
            seen: HashMap::new(),
        }
    }

    /// Accepts `req` from `from` at `now` (unix seconds) and returns the command to carry
    /// out, or the refusal to send back. Every decision is logged.
    pub(crate) fn admit(
        &mut self,
        from: PeerId,
        req: AdminRequest,
        now: i64,
    ) -> Result<HostCommand, AdminResponse> {
        if !self.gis.contains(&from) {
            warn!(%from, "admin request that did not come from our GIS refused");
            return Err(refuse(
                AdminErrorKind::Forbidden,
                format!(
                    "this host takes admin commands only through its GIS ({}), not from {from}",
                    self.gis
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            ));
        }
        let AdminRequest::Command(cmd) = req else {
            return Err(refuse(
                AdminErrorKind::BadRequest,
                "a host answers only signed commands",
            ));
        };
        let what = cmd.body.command.describe();
        let issuer = cmd.body.issuer;
        let checked = cmd
            .verify_for(&self.admin, &self.me, now)
            .and_then(|()| self.remember(cmd.body.nonce, cmd.body.issued_at, now))
            .and_then(|()| cmd.body.command.validate().map_err(CommandError::Malformed));
        match checked {
            Ok(()) => {
                info!(admin = %issuer, via = %from, command = %what, issued_at = cmd.body.issued_at, nonce = cmd.body.nonce, "admin command accepted");
                Ok(cmd.body.command)
            }
            Err(e) => {
                warn!(claimed_admin = %issuer, via = %from, command = %what, error = %e, "admin command refused");
                Err(refuse(e.kind(), e.to_string()))
            }
        }
    }

    fn remember(&mut self, nonce: u64, issued_at: i64, now: i64) -> Result<(), CommandError> {
        // Anything issued before the window is refused as stale anyway.
        self.seen
            .retain(|_, t| now.saturating_sub(*t) <= MAX_COMMAND_AGE_SECS);
        if self.seen.contains_key(&nonce) {
            return Err(CommandError::Replay(nonce));
        }
        if self.seen.len() >= MAX_REMEMBERED {
            return Err(CommandError::Stale {
                issued_at,
                age: now.saturating_sub(issued_at),
            });
        }
        self.seen.insert(nonce, issued_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::admin::SignedCommand;
    use libp2p::identity::Keypair;

    #[test]
    fn gate_admits_only_signed_fresh_commands_through_the_gis() {
        let admin = Keypair::generate_ed25519();
        let a = admin.public().to_peer_id();
        let gis = PeerId::random();
        let me = PeerId::random();
        let mut gate = AdminGate::new(a, vec![gis], me);
        let cmd = HostCommand::SetSharing { enabled: false };
        let signed = |nonce| {
            AdminRequest::Command(
                SignedCommand::sign(&admin, me, cmd.clone(), 1000, nonce).unwrap(),
            )
        };
        let kind = |r: Result<HostCommand, AdminResponse>| match r {
            Err(AdminResponse::Error { kind, .. }) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(gate.admit(gis, signed(1), 1000).unwrap(), cmd);
        // Same nonce again: a replay.
        assert_eq!(
            kind(gate.admit(gis, signed(1), 1001)),
            AdminErrorKind::Stale
        );
        // Not through the GIS (e.g. the admin dialling the host directly).
        assert_eq!(
            kind(gate.admit(a, signed(2), 1000)),
            AdminErrorKind::Forbidden
        );
        // Through the GIS but forged by it.
        let gis_key = Keypair::generate_ed25519();
        let mut forged = SignedCommand::sign(&gis_key, me, cmd.clone(), 1000, 3).unwrap();
        forged.body.issuer = a;
        assert_eq!(
            kind(gate.admit(gis, AdminRequest::Command(forged), 1000)),
            AdminErrorKind::BadSignature
        );
        // For another host.
        let other = SignedCommand::sign(&admin, PeerId::random(), cmd.clone(), 1000, 4).unwrap();
        assert_eq!(
            kind(gate.admit(gis, AdminRequest::Command(other), 1000)),
            AdminErrorKind::Forbidden
        );
        // Queries are the GIS's, not a host's.
        assert_eq!(
            kind(gate.admit(gis, AdminRequest::Hosts, 1000)),
            AdminErrorKind::BadRequest
        );
        // Old nonces are forgotten once their commands would be stale anyway.
        gate.admit(gis, signed(5), 1000).unwrap();
        let later = 1000 + MAX_COMMAND_AGE_SECS + 1;
        assert_eq!(
            kind(gate.admit(gis, signed(5), later)),
            AdminErrorKind::Stale
        );
        gate.remember(6, later, later).unwrap();
        assert!(!gate.seen.contains_key(&1) && !gate.seen.contains_key(&5));
        assert!(gate.seen.contains_key(&6));
    }
}
