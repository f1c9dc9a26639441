//! The control plane of the core: the GIS session (registration, heartbeats, requests and
//! their answers), the hello exchange's judging, this node's certificate and those of the
//! bridgeheads it links to, admitted admin commands, the node's status and its gauges.

use super::{Action, GisKey, GisPurpose, NodeCore, Token};
use crate::gate::{self, Link, RefusalReason};
use crate::gis_session::{Connected, Step};
use crate::NodeStatus;
use bids_protocols::admin::AdminRequest;
use bids_protocols::cert::{BridgeheadCert, Revocations};
use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, ImageQuery};
use bids_protocols::hello::{Hello, HelloReply};
use bids_protocols::{Policy, Role};
use libp2p::PeerId;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// While this node's bridgehead certificate is about to expire, the warning repeats this often.
const CERT_WARN_EVERY: Duration = Duration::from_secs(86_400);
/// How often the metrics' gauges are sampled from the core's state (readiness follows).
const METRICS_SAMPLE: Duration = Duration::from_millis(200);

impl NodeCore {
    /// Unix seconds at `self.now`.
    fn now_secs(&self) -> i64 {
        self.wall_ms().div_euclid(1000)
    }

    /// The GIS replica in use: its peer id.
    pub fn gis_peer(&self) -> PeerId {
        self.gis_peers[self.gis.replica()].0
    }

    /// Whether `peer` is the GIS replica in use (its connections are the session's).
    pub fn is_gis(&self, peer: &PeerId) -> bool {
        *peer == self.gis_peer()
    }

    /// Starts the node: the GIS is dialled; registration follows once connected.
    pub fn start(&mut self, now: Instant) {
        self.at(now);
        self.dial_gis();
    }

    pub(super) fn gis_request(&mut self, req: GisRequest, purpose: GisPurpose) {
        self.gis_request_attempt(req, purpose, 0);
    }

    fn gis_request_attempt(&mut self, req: GisRequest, purpose: GisPurpose, attempt: u32) {
        if let Some(step) = self.gis.submit(req, purpose, attempt, self.now) {
            self.gis_step(step);
        }
    }

    /// Carries out what the GIS session says: a request sent, or failed to whoever waits.
    fn gis_step(&mut self, step: Step<GisPurpose>) {
        match step {
            Step::Send {
                req,
                purpose,
                attempt,
            } => {
                let kept = super::GisSessionOf::keep(&req, &purpose);
                self.next_gis_key += 1;
                let key = GisKey(self.next_gis_key);
                let peer = self.gis_peer();
                self.gis.sent(key, kept, purpose, attempt);
                self.push(Action::GisSend { key, peer, req });
            }
            Step::Fail { purpose, why } => self.on_gis_failure(purpose, why),
        }
    }

    /// Dials the GIS replica in use. Its address goes with every dial: the swarm forgets a
    /// peer's address after a failed dial, and the GIS is worth redialling.
    fn dial_gis(&mut self) {
        let (peer, addr) = self.gis_peers[self.gis.replica()].clone();
        self.gis.dial_started();
        self.push(Action::DialGis { peer, addr });
    }

    /// A dial of the GIS failed (or could not start), for `cause`.
    pub fn handle_gis_dial_failed(&mut self, now: Instant, cause: &str) {
        self.at(now);
        let unit = self.unit();
        let (wait, report) = self.gis.dial_failed(now, cause, unit);
        if report {
            warn!(gis = %self.gis.name(), %cause, "cannot reach the GIS; redialling with backoff (reminders follow while it stays out of reach)");
        } else {
            debug!(gis = %self.gis.name(), %cause, attempt = self.gis.failed_dials(), retry_in = ?wait, "cannot reach the GIS; redialling");
        }
    }

    /// Whether a failed dial of `peer` is the GIS session's business (it is the GIS and the
    /// session is not connected).
    pub fn is_gis_dial(&self, peer: &PeerId) -> bool {
        self.is_gis(peer) && !self.gis.connected()
    }

    /// A connection to the GIS came up.
    pub fn handle_gis_connected(&mut self, now: Instant) {
        self.at(now);
        match self.gis.on_connected(now) {
            Connected::Already => return,
            Connected::First => info!("connected to the GIS"),
            Connected::Again { failed_dials } => {
                info!(gis = %self.gis.name(), failed_dials, "reconnected to the GIS; registering again")
            }
        }
        self.register();
    }

    /// The last connection to the GIS closed.
    pub fn handle_gis_disconnected(&mut self, now: Instant) {
        self.at(now);
        // A restarted GIS has forgotten that we are alive: register again once back.
        let unit = self.unit();
        if let Some(wait) = self.gis.on_disconnected(now, unit) {
            warn!(gis = %self.gis.name(), retry_in = ?wait, "connection to the GIS lost; redialling with backoff (downloads go on with the peers they know)");
        }
    }

    /// A draw in [0, 1) for backoff jitter.
    fn unit(&mut self) -> f64 {
        use rand::Rng;
        self.rng.gen()
    }

    fn register(&mut self) {
        self.register_for(GisPurpose::Register);
    }

    fn register_for(&mut self, purpose: GisPurpose) {
        let addrs = if self.cfg.external_addrs.is_empty() {
            self.cfg
                .listen
                .iter()
                .map(|a| {
                    let mut a = a.clone();
                    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                        a.pop();
                    }
                    a
                })
                .collect()
        } else {
            self.cfg.external_addrs.clone()
        };
        let req = GisRequest::Register {
            idc: self.cfg.idc.clone(),
            addrs,
            cert: self.cert.clone(),
            policy: self.cfg.policy,
        };
        self.gis_request(req, purpose);
    }

    fn send_heartbeat(&mut self) {
        let stats = self.heartbeat_stats();
        self.gis_request(GisRequest::Heartbeat { stats }, GisPurpose::Heartbeat);
    }

    /// A heartbeat now, if registered (a ban began or ended: the GIS hears of it at once).
    pub(super) fn heartbeat_now(&mut self) {
        if self.gis.registered() {
            self.send_heartbeat();
        }
    }

    /// The GIS answered request `key`.
    pub fn handle_gis_response(&mut self, now: Instant, key: GisKey, resp: GisResponse) {
        self.at(now);
        if let Some(purpose) = self.gis.answered(&key) {
            self.on_gis_response(purpose, resp);
        }
    }

    /// GIS request `key` failed (timed out, connection lost).
    pub fn handle_gis_request_failed(&mut self, now: Instant, key: GisKey, error: String) {
        self.at(now);
        if let Some(step) = self.gis.failed(&key, error, now) {
            self.gis_step(step);
        }
    }

    /// A caller's own request to the GIS, over the node's session.
    pub fn handle_gis_call(
        &mut self,
        now: Instant,
        req: GisRequest,
        reply: oneshot::Sender<Result<GisResponse, String>>,
    ) {
        self.at(now);
        self.gis_request(req, GisPurpose::Caller(reply));
    }

    fn on_gis_response(&mut self, purpose: GisPurpose, resp: GisResponse) {
        if let GisPurpose::Caller(reply) = purpose {
            let _ = reply.send(Ok(resp));
            return;
        }
        let purpose = match purpose {
            GisPurpose::RegisterFor(reply) => {
                let _ = reply.send(match &resp {
                    GisResponse::Registered { role, .. } => Ok(*role),
                    GisResponse::Error { message, .. } => {
                        Err(format!("the GIS refused the registration: {message}"))
                    }
                    other => Err(format!(
                        "unexpected GIS answer to a registration: {other:?}"
                    )),
                });
                GisPurpose::Register
            }
            p => p,
        };
        let now = self.now;
        match (purpose, resp) {
            (
                GisPurpose::Register,
                GisResponse::Registered {
                    role,
                    revocations,
                    bridgeheads,
                    heartbeat_secs,
                },
            ) => {
                info!(role = %role, heartbeat_s = heartbeat_secs, "registered with the GIS");
                self.follow_gis_pace(heartbeat_secs);
                self.role = role;
                if role == Role::Bridgehead && self.cfg.policy == Policy::Bids {
                    self.push(Action::JoinBridgeheads);
                }
                self.gis.on_registered();
                self.set_revocations(revocations);
                self.link_bridgeheads(now, bridgeheads);
                self.publish_all(now);
            }
            (
                _,
                GisResponse::Ack {
                    revocations,
                    bridgeheads,
                    heartbeat_secs,
                },
            ) => {
                self.follow_gis_pace(heartbeat_secs);
                self.set_revocations(revocations);
                self.link_bridgeheads(now, bridgeheads);
            }
            (
                GisPurpose::Lookup {
                    image,
                    for_fetch,
                    asked,
                },
                GisResponse::HostList(list),
            ) => {
                self.handle_host_list(now, image, *list, for_fetch, asked);
            }
            (
                GisPurpose::Lookup {
                    image: ImageQuery::Id(id),
                    ..
                },
                GisResponse::Unchanged,
            ) => self.handle_host_list_unchanged(now, id),
            (
                GisPurpose::Lookup {
                    image, for_fetch, ..
                },
                GisResponse::Error { kind, message },
            ) => {
                debug!(?kind, %message, "lookup refused");
                self.handle_lookup_failed(now, &image, for_fetch, message);
            }
            (GisPurpose::Register, GisResponse::Error { kind, message })
                if kind == ErrorKind::BadCert && self.cert.is_some() =>
            {
                self.bridgehead_cert_refused(&message);
            }
            (p, GisResponse::Error { kind, message }) => {
                if kind == ErrorKind::NotRegistered && !matches!(p, GisPurpose::Register) {
                    // The GIS restarted or forgot us: register again.
                    self.gis.on_unregistered();
                    self.register();
                } else if kind == ErrorKind::BadCert {
                    // A registration sent before the certificate was dropped: already handled.
                    debug!(%message, "a registration with the dropped certificate was refused");
                } else {
                    warn!(?kind, %message, "GIS request failed");
                }
            }
            (_, other) => debug!(?other, "unexpected GIS response"),
        }
    }

    fn on_gis_failure(&mut self, purpose: GisPurpose, error: String) {
        let purpose = match purpose {
            GisPurpose::RegisterFor(reply) => {
                let _ = reply.send(Err(format!("the GIS did not answer: {error}")));
                GisPurpose::Register
            }
            p => p,
        };
        match purpose {
            GisPurpose::Caller(reply) => {
                let _ = reply.send(Err(format!("the GIS did not answer: {error}")));
            }
            GisPurpose::Lookup {
                image, for_fetch, ..
            } => {
                let why = format!("the GIS did not answer: {error}");
                self.handle_lookup_failed(self.now, &image, for_fetch, why);
            }
            GisPurpose::Register => {
                debug!(%error, "register failed; retrying at next heartbeat");
                self.gis.on_unregistered();
            }
            _ => debug!(%error, "GIS request failed"),
        }
    }

    fn set_revocations(&mut self, r: Revocations) {
        if r == self.revocations {
            return;
        }
        self.revocations = r;
        // A revoked bridgehead's links close at once.
        let Some(c) = &self.cert else {
            return;
        };
        if self.revocations.is_revoked(c.body.serial) {
            warn!("this node's bridgehead certificate was revoked; cross-IDC links close");
            self.cert = None;
            self.role = Role::Host;
            if self.cfg.policy == Policy::Bids {
                for p in self.peers.wan_peers() {
                    self.push(Action::Disconnect(p));
                }
            }
        }
    }

    /// Heartbeats every `secs` from now on, as the GIS asks (0: an older GIS that says
    /// nothing; the pace stays).
    fn follow_gis_pace(&mut self, secs: u32) {
        if secs == 0 {
            return;
        }
        let pace = Duration::from_secs(u64::from(secs));
        if pace != self.gis_heartbeat {
            if !self.gis_heartbeat.is_zero() {
                info!(from = ?self.gis_heartbeat, to = ?pace, "the GIS asks for another heartbeat interval");
            }
            self.gis_heartbeat = pace;
        }
    }

    /// The GIS's share of the periodic work: redials and reminders, held requests, our
    /// certificate's end, heartbeats; and the gauges.
    pub(super) fn control_tick(&mut self, now: Instant) {
        let gis = self.gis.tick(now);
        if gis.dial {
            self.dial_gis();
        }
        if let Some(r) = gis.reminder {
            let cause = r.cause.as_deref().unwrap_or("a dial is under way, no answer yet (packets dropped on the way, or the port is not the GIS's?)");
            warn!(gis = %self.gis.name(), down_for = ?r.down_for, %cause, next_reminder_in = ?r.next_in, "still no connection to the GIS");
        }
        for step in gis.steps {
            self.gis_step(step);
        }
        self.check_cert_ends(now);
        self.sample_metrics(now);
        // Registered: at the pace the GIS asks (never faster than configured); not yet:
        // registration is retried at the configured pace.
        let every = if self.gis.registered() {
            self.cfg.heartbeat.max(self.gis_heartbeat)
        } else {
            self.cfg.heartbeat
        };
        if now.duration_since(self.last_heartbeat) >= every {
            self.last_heartbeat = now;
            let dirty = self.acct.take_dirty();
            if !dirty.is_empty() {
                self.push(Action::SaveCounters(dirty));
            }
            if !self.gis.registered() {
                self.register();
            } else {
                self.send_heartbeat();
            }
        }
    }

    // ---------------------------------------------------------------- hello

    /// Our hello, as we send it and answer others'.
    pub fn my_hello(&self) -> Hello {
        Hello {
            idc: self.cfg.idc.clone(),
            policy: self.cfg.policy,
            cert: self.cert.clone(),
        }
    }

    fn judge(&self, peer: &PeerId, h: &Hello) -> Result<Link, gate::Refusal> {
        let us = gate::Us {
            peer: &self.cfg.me,
            idc: &self.cfg.idc,
            policy: self.cfg.policy,
            cert: self.cert.as_ref(),
            admin: &self.cfg.admin_peer,
            revocations: &self.revocations,
            now: self.now_secs(),
        };
        gate::judge(&us, peer, h)
    }

    /// `peer` sent its hello, to be answered on `token`.
    pub fn handle_hello(&mut self, now: Instant, peer: PeerId, h: Hello, token: Token) {
        self.at(now);
        match self.judge(&peer, &h) {
            Ok(link) => {
                let reply = HelloReply::Welcome(self.my_hello());
                self.push(Action::HelloReply { token, reply });
                self.accept(peer, &h, link);
            }
            Err(reason) => {
                let reply = HelloReply::Refused(reason.message.clone());
                self.push(Action::HelloReply { token, reply });
                // Closing now would drop the refusal before the peer reads it; the tick
                // closes the connection after REFUSAL_GRACE. It gets no data meanwhile.
                warn!(%peer, %reason, "connection refused");
                self.acct.refused();
                if let Some(m) = &self.metrics {
                    m.refused(reason.reason);
                }
                let early = self.peers.refuse(peer, now);
                self.release_early(peer, early);
            }
        }
    }

    /// `peer` answered our hello.
    pub fn handle_hello_reply(&mut self, now: Instant, peer: PeerId, reply: HelloReply) {
        self.at(now);
        match reply {
            HelloReply::Welcome(h) => match self.judge(&peer, &h) {
                Ok(link) => self.accept(peer, &h, link),
                Err(r) => self.refuse(peer, r.reason, &r.message),
            },
            HelloReply::Refused(reason) => {
                let reason = format!("peer refused us: {}", super::truncate(&reason, 300));
                self.refuse(peer, RefusalReason::RefusedByPeer, &reason);
            }
        }
    }

    /// Our hello to `peer` got no answer.
    pub fn handle_hello_failed(&mut self, now: Instant, peer: PeerId) {
        self.at(now);
        if self.peers.is_pending(&peer) {
            let early = self.peers.drop_peer(&peer);
            self.release_early(peer, early);
            self.push(Action::Disconnect(peer));
        }
    }

    fn accept(&mut self, peer: PeerId, h: &Hello, link: Link) {
        debug!(%peer, idc = %h.idc, ?link, "peer accepted");
        if let (Link::Wan, Policy::Bids, Some(c)) = (link, self.cfg.policy, &h.cert) {
            self.wan_cert_ends.insert(peer, c.body.not_after);
        }
        self.accepted(peer, link, h.cert.is_some());
    }

    fn refuse(&mut self, peer: PeerId, why: RefusalReason, reason: &str) {
        warn!(%peer, %reason, "connection refused");
        self.acct.refused();
        if let Some(m) = &self.metrics {
            m.refused(why);
        }
        let early = self.peers.drop_peer(&peer);
        self.release_early(peer, early);
        self.push(Action::Disconnect(peer));
    }

    // ---------------------------------------------------------------- certificates

    /// Certificates end at their not-after, as if revoked then: ours (this node becomes an
    /// ordinary host of its IDC and registers again as one) and those of the bridgeheads of
    /// other IDCs we accepted (their connections close; the other end closes too). A
    /// certificate about to expire is warned about at start and daily.
    fn check_cert_ends(&mut self, now: Instant) {
        let secs = self.now_secs();
        if let Some(c) = &self.cert {
            let (serial, not_after) = (c.body.serial, c.body.not_after);
            let expires = bids_protocols::cert::fmt_time(not_after);
            if secs >= not_after {
                warn!(serial, %expires, "this node's bridgehead certificate expired: cross-IDC links close and the node goes on as an ordinary host of IDC {}; ask the admin for a new certificate and reload it (SIGHUP reloads --cert)", self.cfg.idc);
                self.cert = None;
                self.cert_warned = None;
                self.leave_bridgehead_role();
                self.register();
            } else if self.cert_expiring(secs)
                && self
                    .cert_warned
                    .is_none_or(|t| now.duration_since(t) >= CERT_WARN_EVERY)
            {
                self.cert_warned = Some(now);
                let days_left = (not_after - secs) as f64 / 86_400.0;
                warn!(serial, %expires, days_left = format!("{days_left:.1}"), "this node's bridgehead certificate expires soon; ask the admin for a new one and reload it (SIGHUP reloads --cert) before then");
            }
        }
        let ended: Vec<PeerId> = self
            .wan_cert_ends
            .iter()
            .filter(|(_, end)| secs >= **end)
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            self.wan_cert_ends.remove(&p);
            warn!(peer = %p, "the bridgehead certificate of this peer of another IDC expired; closing the connection");
            let early = self.peers.drop_peer(&p);
            self.release_early(p, early);
            self.push(Action::Disconnect(p));
        }
    }

    /// Our certificate ends within the warning period.
    fn cert_expiring(&self, secs: i64) -> bool {
        let warn = i64::try_from(self.cfg.cert_warn.as_secs()).unwrap_or(i64::MAX);
        self.cert
            .as_ref()
            .is_some_and(|c| secs.saturating_add(warn) >= c.body.not_after)
    }

    /// Takes or drops a bridgehead certificate, then re-registers so the GIS grants the role.
    pub fn handle_set_cert(
        &mut self,
        now: Instant,
        cert: Option<BridgeheadCert>,
        reply: oneshot::Sender<Result<Role, String>>,
    ) {
        self.at(now);
        if let Some(c) = &cert {
            let checked = c.verify_for(
                &self.cfg.admin_peer,
                &self.cfg.me,
                &self.cfg.idc,
                self.now_secs(),
                &self.revocations,
            );
            if let Err(e) = checked {
                let _ = reply.send(Err(format!("certificate refused: {e}")));
                return;
            }
        }
        if cert.is_none() && self.cert.is_some() {
            info!("bridgehead certificate dropped; cross-IDC links close");
            self.leave_bridgehead_role();
        } else if let Some(c) = &cert {
            info!(serial = c.body.serial, db_id = %c.body.db_id, not_after = %bids_protocols::cert::fmt_time(c.body.not_after), "bridgehead certificate set");
        }
        self.cert = cert;
        self.cert_warned = None;
        // Bridgeheads of other IDCs still linked to us know our old certificate's end and
        // would close then: tell them the new one.
        if self.cert.is_some() {
            let wan: Vec<PeerId> = self.wan_cert_ends.keys().copied().collect();
            for peer in wan {
                let hello = self.my_hello();
                self.push(Action::Hello { peer, hello });
            }
        }
        self.register_for(GisPurpose::RegisterFor(reply));
    }

    /// Becomes an ordinary host: off the bridgehead topic, cross-IDC links closed.
    fn leave_bridgehead_role(&mut self) {
        self.role = Role::Host;
        self.push(Action::LeaveBridgeheads);
        for p in self.peers.wan_peers() {
            let early = self.peers.drop_peer(&p);
            self.release_early(p, early);
            self.wan_cert_ends.remove(&p);
            self.push(Action::Disconnect(p));
        }
    }

    /// The GIS refused to register us with our bridgehead certificate (revoked, expired, not
    /// signed by its admin). Presenting it again would be refused forever and leave the host
    /// unregistered, so it is dropped once and the node registers as an ordinary host of its
    /// IDC: it keeps serving and fetching over the LAN.
    fn bridgehead_cert_refused(&mut self, message: &str) {
        let serial = self.cert.as_ref().map(|c| c.body.serial);
        warn!(?serial, %message, "the GIS refused this node's bridgehead certificate; dropping it and registering as an ordinary host");
        self.cert = None;
        self.leave_bridgehead_role();
        self.register();
    }

    // ---------------------------------------------------------------- admin, status

    /// An admin request relayed by the GIS, to be answered on `token`: an admitted command
    /// goes to the executor above the engine ([`Action::Admin`]), a refused one is answered.
    pub fn handle_admin(&mut self, now: Instant, from: PeerId, req: AdminRequest, token: Token) {
        self.at(now);
        let secs = self.now_secs();
        match self.admin_gate.admit(from, req, secs) {
            Ok(cmd) => self.push(Action::Admin { token, cmd }),
            Err(response) => self.push(Action::AdminAnswer { token, response }),
        }
    }

    /// The node as `bids node status` shows it.
    pub fn status(&self) -> NodeStatus {
        let census = self.peers.census();
        let acct = &self.acct;
        NodeStatus {
            peer: self.cfg.me,
            idc: self.cfg.idc.clone(),
            role: self.role,
            policy: self.cfg.policy,
            listen: self.cfg.listen.clone(),
            gis_connected: self.gis.connected(),
            registered: self.gis.registered(),
            connected_peers: census.connected,
            wan_links: census.wan_links,
            images: self.image_reports(),
            total: acct.total(),
            refusals: acct.refusals(),
            bad_chunks_served_to_us: acct.total().bad_chunks,
            banned_peers: self
                .bans()
                .into_iter()
                .map(|(p, left)| (p, left.as_secs()))
                .collect(),
            settings: self.settings(),
            cert_expires_at: self.cert.as_ref().map(|c| c.body.not_after),
            cert_expiring: self.cert_expiring(self.now_secs()),
        }
    }

    /// Gauges the core's state: peers by kind, downloads, GIS link, certificate expiry.
    fn sample_metrics(&mut self, now: Instant) {
        if now.duration_since(self.last_metrics_sample) < METRICS_SAMPLE {
            return;
        }
        self.last_metrics_sample = now;
        let mut s = crate::metrics::Sample {
            gis_connected: self.gis.connected(),
            registered: self.gis.registered(),
            downloads_active: self.downloads.len(),
            cert_expires_at: self.cert.as_ref().map(|c| c.body.not_after),
            cert_expiring: self.cert_expiring(self.now_secs()),
            ..Default::default()
        };
        let census = self.peers.census();
        (s.bridgeheads, s.hosts, s.remotes, s.pending) = (
            census.bridgeheads,
            census.hosts,
            census.remotes,
            census.pending,
        );
        if let Some(m) = &self.metrics {
            m.sample(&s);
        }
    }
}
