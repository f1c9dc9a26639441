//! The GIS's leg of the admin control path: answers the admin's queries from the `Index`
//! (hosts, images, statistics as hosts last reported them), applies revocations, and relays
//! signed host commands to their target over the host's own connection, then the host's
//! answer back. Only the admin peer is served; every command is logged with who, what, when.
//! What a command does is the host's business; the swarm is the server loop's.

use crate::index::{CertState, HostView, Index};
use bids_protocols::admin::{
    AdminErrorKind, AdminRequest, AdminResponse, CertInfo, CertStatus, Holder, HostInfo,
    HostProvision, IdcStats, ImageCounters, ImageHolders, ImageProvision, SignedCommand, Stats,
};
use bids_protocols::gis::{Counters, ProvisionTime};
use bids_protocols::{Idc, ImageId};
use libp2p::request_response::{self as rr, OutboundRequestId, ResponseChannel};
use libp2p::PeerId;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tracing::{info, warn};

/// How long the GIS waits for a host to carry out a command; below the admin client's own
/// timeout so the console gets "host did not answer" rather than a bare timeout.
pub const HOST_COMMAND_TIMEOUT: Duration = Duration::from_secs(100);

/// A reply to send to the admin once the batch's changes are durable.
pub type AdminReply = (ResponseChannel<AdminResponse>, AdminResponse);

/// What the GIS does with one admin request.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Answer at once.
    Reply(AdminResponse),
    /// Deliver the command to its target and relay the answer.
    Forward(Box<SignedCommand>),
}

fn refuse(kind: AdminErrorKind, message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        kind,
        message: message.into(),
    }
}

/// Decides what to do with `req` from `from` (pure: the caller passes the clock and who is
/// connected). Only the admin gets anything but `Forbidden`.
pub fn decide(
    index: &mut Index,
    from: PeerId,
    req: AdminRequest,
    now_ms: i64,
    connected: &dyn Fn(&PeerId) -> bool,
) -> Decision {
    let admin = index.config().admin;
    if from != admin {
        warn!(%from, "admin request from a peer that is not the admin refused");
        return Decision::Reply(refuse(
            AdminErrorKind::Forbidden,
            format!("only the admin {admin} may use the admin protocol, not {from}"),
        ));
    }
    match req {
        AdminRequest::Hosts => {
            Decision::Reply(AdminResponse::Hosts(hosts(index, now_ms, connected)))
        }
        AdminRequest::Images => Decision::Reply(AdminResponse::Images(images(index, now_ms))),
        AdminRequest::Stats => Decision::Reply(AdminResponse::Stats(stats(index, now_ms))),
        AdminRequest::Revoke { serial } => {
            info!(admin = %from, serial, "admin revokes a certificate");
            match index.revoke(from, serial) {
                Ok(hosts) => Decision::Reply(AdminResponse::Revoked { hosts }),
                Err(e) => Decision::Reply(refuse(AdminErrorKind::Forbidden, e.message)),
            }
        }
        AdminRequest::Command(cmd) => {
            let target = cmd.body.target;
            let what = cmd.body.command.describe();
            // The host checks the signature itself; checking here too refuses a forgery
            // before it travels and puts the refusal in the GIS's log.
            if let Err(e) = cmd.verify(&admin, now_ms.div_euclid(1000)) {
                warn!(admin = %from, %target, command = %what, error = %e, "admin command refused");
                return Decision::Reply(refuse(e.kind(), e.to_string()));
            }
            if let Err(e) = cmd.body.command.validate() {
                warn!(admin = %from, %target, command = %what, error = %e, "admin command refused");
                return Decision::Reply(refuse(AdminErrorKind::BadRequest, e));
            }
            if !index.is_registered(&target) {
                warn!(admin = %from, %target, command = %what, "admin command for an unknown host refused");
                return Decision::Reply(refuse(
                    AdminErrorKind::UnknownHost,
                    format!("host {target} has not registered with this GIS"),
                ));
            }
            if !connected(&target) {
                warn!(admin = %from, %target, command = %what, "admin command for a disconnected host refused");
                return Decision::Reply(refuse(
                    AdminErrorKind::Unreachable,
                    format!(
                        "host {target} is not connected to the GIS (it reconnects at its next heartbeat); retry shortly"
                    ),
                ));
            }
            info!(admin = %from, %target, command = %what, issued_at = cmd.body.issued_at, nonce = cmd.body.nonce, "admin command forwarded to the host");
            Decision::Forward(Box::new(cmd))
        }
    }
}

fn cert_status(s: CertState) -> CertStatus {
    match s {
        CertState::Valid => CertStatus::Valid,
        CertState::NotYetValid => CertStatus::NotYetValid,
        CertState::Expired => CertStatus::Expired,
        CertState::Revoked => CertStatus::Revoked,
    }
}

fn image_counters(m: &BTreeMap<ImageId, Counters>) -> Vec<ImageCounters> {
    m.iter()
        .map(|(id, c)| ImageCounters {
            id: *id,
            counters: *c,
        })
        .collect()
}

fn image_provisions(m: &BTreeMap<ImageId, ProvisionTime>) -> Vec<ImageProvision> {
    m.iter()
        .map(|(id, t)| ImageProvision { id: *id, time: *t })
        .collect()
}

fn host_info(v: HostView, connected: bool) -> HostInfo {
    HostInfo {
        peer: v.peer,
        idc: v.idc,
        role: v.role,
        alive: v.alive,
        connected,
        addrs: v.addrs,
        last_seen_ms: v.last_seen_ms,
        registered_ms: v.registered_ms,
        cert: v.cert.map(|c| CertInfo {
            serial: c.serial,
            db_id: c.db_id,
            not_before: c.not_before,
            not_after: c.not_after,
            status: cert_status(c.state),
        }),
        settings: v.stats.settings,
        counters: v.stats.total,
        image_counters: image_counters(&v.stats.images),
        refusals: v.stats.refusals,
        images: u32::try_from(v.images).unwrap_or(u32::MAX),
        provisions: image_provisions(&v.stats.provisions),
    }
}

/// Every registered host.
pub fn hosts(index: &Index, now_ms: i64, connected: &dyn Fn(&PeerId) -> bool) -> Vec<HostInfo> {
    index
        .hosts(now_ms)
        .into_iter()
        .map(|v| {
            let c = connected(&v.peer);
            host_info(v, c)
        })
        .collect()
}

/// Every image with its holders per IDC.
pub fn images(index: &Index, now_ms: i64) -> Vec<ImageHolders> {
    index
        .images(now_ms)
        .into_iter()
        .map(|v| ImageHolders {
            info: v.info,
            kind: v.kind,
            base: v.base,
            chunks: v.chunks,
            publisher: v.publisher,
            published_ms: v.published_ms,
            holders: v
                .holders
                .into_iter()
                .map(|(idc, hs)| {
                    let hs = hs
                        .into_iter()
                        .map(|h| Holder {
                            peer: h.peer,
                            alive: h.alive,
                            chunks_held: h.chunks_held,
                            complete: h.complete,
                            fetching: h.fetching,
                        })
                        .collect();
                    (idc, hs)
                })
                .collect(),
        })
        .collect()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Totals per IDC, from the counters hosts last reported.
pub fn stats(index: &Index, now_ms: i64) -> Stats {
    type Sums = (Counters, BTreeMap<ImageId, Counters>, Vec<HostProvision>);
    let mut sums: BTreeMap<Idc, Sums> = BTreeMap::new();
    let hosts = index.hosts(now_ms);
    for h in &hosts {
        let (total, per_image, provisions) = sums.entry(h.idc.clone()).or_default();
        total.add(&h.stats.total);
        for (id, c) in &h.stats.images {
            per_image.entry(*id).or_default().add(c);
        }
        provisions.extend(h.stats.provisions.iter().map(|(id, t)| HostProvision {
            peer: h.peer,
            id: *id,
            time: *t,
        }));
    }
    let idcs = index
        .idcs(now_ms)
        .into_iter()
        .map(|v| {
            let (counters, per_image, provisions) = sums.remove(&v.idc).unwrap_or_default();
            IdcStats {
                idc: v.idc,
                hosts: count(v.hosts),
                live_hosts: count(v.live_hosts),
                bridgeheads: count(v.bridgeheads),
                live_bridgeheads: count(v.live_bridgeheads),
                counters,
                images: image_counters(&per_image),
                provisions,
            }
        })
        .collect();
    Stats {
        now_ms,
        hosts: count(hosts.len()),
        live_hosts: count(hosts.iter().filter(|h| h.alive).count()),
        images: count(index.images(now_ms).len()),
        idcs,
        policy: Some(index.config().policy),
    }
}

/// A command on its way to a host.
struct InFlight {
    channel: ResponseChannel<AdminResponse>,
    admin: PeerId,
    target: PeerId,
    what: String,
}

/// Relays admin requests: decides, forwards commands and matches hosts' answers to the
/// admin's waiting requests.
#[derive(Default)]
pub struct AdminDesk {
    in_flight: HashMap<OutboundRequestId, InFlight>,
}

impl AdminDesk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one event of the admin behaviour. Answers that depend on the index go to
    /// `replies` (sent after the batch is durable); forwarded commands leave at once.
    pub fn on_event(
        &mut self,
        ev: rr::Event<AdminRequest, AdminResponse>,
        index: &mut Index,
        behaviour: &mut rr::Behaviour<bids_protocols::admin::Codec>,
        now_ms: i64,
        replies: &mut Vec<AdminReply>,
    ) {
        match ev {
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let connected = |p: &PeerId| behaviour.is_connected(p);
                match decide(index, peer, request, now_ms, &connected) {
                    Decision::Reply(r) => replies.push((channel, r)),
                    Decision::Forward(cmd) => {
                        let target = cmd.body.target;
                        let what = cmd.body.command.describe();
                        let id = behaviour.send_request(&target, AdminRequest::Command(*cmd));
                        self.in_flight.insert(
                            id,
                            InFlight {
                                channel,
                                admin: peer,
                                target,
                                what,
                            },
                        );
                    }
                }
            }
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some(f) = self.in_flight.remove(&request_id) else {
                    warn!(%peer, "admin answer for no command in flight ignored");
                    return;
                };
                let response = match response {
                    AdminResponse::Outcome(o) => {
                        info!(admin = %f.admin, target = %f.target, command = %f.what, outcome = ?o, "admin command carried out");
                        AdminResponse::Outcome(o)
                    }
                    AdminResponse::Error { kind, message } => {
                        warn!(admin = %f.admin, target = %f.target, command = %f.what, ?kind, %message, "host refused or failed an admin command");
                        AdminResponse::Error { kind, message }
                    }
                    other => {
                        warn!(target = %f.target, command = %f.what, "host answered an admin command with something else");
                        drop(other);
                        refuse(
                            AdminErrorKind::Failed,
                            format!(
                                "host {} gave an answer that is not a command outcome",
                                f.target
                            ),
                        )
                    }
                };
                replies.push((f.channel, response));
            }
            rr::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(f) = self.in_flight.remove(&request_id) {
                    warn!(admin = %f.admin, target = %f.target, command = %f.what, %error, "admin command did not reach the host or got no answer");
                    replies.push((
                        f.channel,
                        refuse(
                            AdminErrorKind::Unreachable,
                            format!("host {} did not answer the command: {error}", f.target),
                        ),
                    ));
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                warn!(%peer, %error, "bad or failed admin request");
            }
            rr::Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexConfig;
    use bids_protocols::admin::HostCommand;
    use bids_protocols::gis::HostStats;
    use bids_protocols::Policy;
    use libp2p::identity::Keypair;

    fn setup() -> (Keypair, Index, PeerId) {
        let admin = Keypair::generate_ed25519();
        let mut ix = Index::new(IndexConfig::new(admin.public().to_peer_id(), Policy::Bids));
        let host = Keypair::generate_ed25519().public().to_peer_id();
        ix.register(
            host,
            Idc::new("A").unwrap(),
            vec![],
            None,
            Policy::Bids,
            1_000_000,
        )
        .unwrap();
        (admin, ix, host)
    }

    #[test]
    fn only_the_admin_is_served() {
        let (admin, mut ix, host) = setup();
        let yes = |_: &PeerId| true;
        match decide(&mut ix, host, AdminRequest::Hosts, 1_000_000, &yes) {
            Decision::Reply(AdminResponse::Error { kind, .. }) => {
                assert_eq!(kind, AdminErrorKind::Forbidden)
            }
            other => panic!("{other:?}"),
        }
        let a = admin.public().to_peer_id();
        match decide(&mut ix, a, AdminRequest::Hosts, 1_000_000, &yes) {
            Decision::Reply(AdminResponse::Hosts(h)) => {
                assert_eq!(h.len(), 1);
                assert_eq!(h[0].peer, host);
                assert!(h[0].alive && h[0].connected);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_are_checked_before_they_travel() {
        let (admin, mut ix, host) = setup();
        let a = admin.public().to_peer_id();
        let now_ms = 1_000_000;
        let cmd = HostCommand::SetSharing { enabled: false };
        let yes = |_: &PeerId| true;
        let no = |_: &PeerId| false;
        let good = SignedCommand::sign(&admin, host, cmd.clone(), 1000, 1).unwrap();
        assert!(matches!(
            decide(
                &mut ix,
                a,
                AdminRequest::Command(good.clone()),
                now_ms,
                &yes
            ),
            Decision::Forward(_)
        ));
        let kind_of = |d: Decision| match d {
            Decision::Reply(AdminResponse::Error { kind, .. }) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind_of(decide(
                &mut ix,
                a,
                AdminRequest::Command(good.clone()),
                now_ms,
                &no
            )),
            AdminErrorKind::Unreachable
        );
        let stranger = SignedCommand::sign(&admin, PeerId::random(), cmd.clone(), 1000, 2).unwrap();
        assert_eq!(
            kind_of(decide(
                &mut ix,
                a,
                AdminRequest::Command(stranger),
                now_ms,
                &yes
            )),
            AdminErrorKind::UnknownHost
        );
        let mut forged = good;
        forged.body.command = HostCommand::SetSharing { enabled: true };
        assert_eq!(
            kind_of(decide(
                &mut ix,
                a,
                AdminRequest::Command(forged),
                now_ms,
                &yes
            )),
            AdminErrorKind::BadSignature
        );
        let stale = SignedCommand::sign(&admin, host, cmd, 0, 3).unwrap();
        assert_eq!(
            kind_of(decide(
                &mut ix,
                a,
                AdminRequest::Command(stale),
                now_ms,
                &yes
            )),
            AdminErrorKind::Stale
        );
    }

    #[test]
    fn stats_sum_reported_counters_per_idc() {
        let (admin, mut ix, host) = setup();
        let a = admin.public().to_peer_id();
        let other = PeerId::random();
        ix.register(
            other,
            Idc::new("A").unwrap(),
            vec![],
            None,
            Policy::Bids,
            1_000_000,
        )
        .unwrap();
        let id = ImageId([7; 32]);
        for (p, n) in [(host, 10), (other, 5)] {
            let mut s = HostStats::default();
            s.total.wan_recv_bytes = n;
            s.images.insert(
                id,
                Counters {
                    lan_recv_bytes: n,
                    ..Counters::default()
                },
            );
            // Only `host` downloaded the image; `other` published it.
            if p == host {
                s.provisions.insert(
                    id,
                    ProvisionTime {
                        millis: 2500,
                        completed_ms: 999_000,
                    },
                );
            }
            ix.heartbeat(p, s, 1_000_000).unwrap();
        }
        let s = stats(&ix, 1_000_000);
        assert_eq!((s.hosts, s.live_hosts), (2, 2));
        assert_eq!(s.idcs.len(), 1);
        assert_eq!(s.idcs[0].counters.wan_recv_bytes, 15);
        assert_eq!(s.idcs[0].images[0].counters.lan_recv_bytes, 15);
        // Provision times are kept as each host reported them, in the stats and the hosts.
        let want = ProvisionTime {
            millis: 2500,
            completed_ms: 999_000,
        };
        assert_eq!(
            s.idcs[0].provisions,
            vec![HostProvision {
                peer: host,
                id,
                time: want
            }]
        );
        let listed = hosts(&ix, 1_000_000, &|_| true);
        let of = |p: PeerId| listed.iter().find(|h| h.peer == p).unwrap();
        assert_eq!(of(host).provisions, vec![ImageProvision { id, time: want }]);
        assert!(of(other).provisions.is_empty());
        // Revocation goes through the index (and is refused for anyone else).
        assert!(matches!(
            decide(
                &mut ix,
                a,
                AdminRequest::Revoke { serial: 9 },
                1_000_000,
                &|_| true
            ),
            Decision::Reply(AdminResponse::Revoked { .. })
        ));
        assert!(ix.revocations().is_revoked(9));
    }
}
