//! Answering chunk requests: the gate of the hello exchange, the serving decision
//! (`crate::serving`), deferred requests, LAN seeding, the payload cache and the upload
//! queues.

use super::{Action, NodeCore, QueuedResponse, Token, MAX_SERVING};
use crate::accounting::PeerKind;
use crate::gate::{Link, RefusalReason};
use crate::peers::Early;
use crate::seeding::Verdict;
use crate::serving::{self, Serve};
use crate::uploads::Lane;
use bids_protocols::chunk::{ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ChunkIndex, ImageId, Policy, Role};
use libp2p::PeerId;
use std::time::Instant;
use tracing::{debug, warn};

impl NodeCore {
    /// `peer` asks for a chunk; `token` names the request until it is answered.
    pub fn handle_chunk_request(
        &mut self,
        now: Instant,
        peer: PeerId,
        req: ChunkRequest,
        token: Token,
    ) {
        self.at(now);
        let Some(link) = self.link_of(&peer) else {
            let idx = req.index;
            let token = match self.peers.early_request(&peer, (req, token)) {
                Early::Held => {
                    debug!(%peer, idx, "holding a chunk request until the peer's hello is judged");
                    return;
                }
                Early::Busy((_, token)) => {
                    self.respond(peer, token, ChunkResponse::Busy);
                    return;
                }
                Early::Refuse((_, token)) => token,
            };
            // No image data before an accepted hello.
            self.acct.refused();
            if let Some(m) = &self.metrics {
                m.refused(RefusalReason::NoHello);
            }
            warn!(%peer, "chunk request before an accepted hello refused");
            self.respond(
                peer,
                token,
                ChunkResponse::Refused("say hello first (or you were refused)".into()),
            );
            return;
        };
        let facts = serving::Facts {
            link,
            sharing: self.sharing,
            busy: self.serving >= MAX_SERVING,
            chunks: self.store.manifest(&req.image).map(|m| m.chunk_count()),
            index: req.index,
            held: self.store.has_chunk(&req.image, req.index),
            may_relay: self.may_relay(&peer),
            downloading: self
                .downloads
                .get(&req.image)
                .map(|d| d.sched.lan_available(req.index)),
        };
        match serving::decide(&facts) {
            Serve::Read => {}
            Serve::Refused(why) => {
                return self.respond(peer, token, ChunkResponse::Refused(why.into()))
            }
            Serve::Busy => return self.respond(peer, token, ChunkResponse::Busy),
            Serve::UnknownImage => return self.respond(peer, token, ChunkResponse::UnknownImage),
            Serve::BadIndex => return self.respond(peer, token, ChunkResponse::BadIndex),
            Serve::NotHeld { fetch } => {
                if fetch {
                    self.ensure_download(ImageQuery::Id(req.image), None);
                }
                return self.respond(peer, token, ChunkResponse::NotHeld);
            }
            Serve::Defer { fetch } => {
                if fetch {
                    self.ensure_download(ImageQuery::Id(req.image), None);
                }
                debug!(%peer, idx = req.index, "deferring a request until the chunk arrives");
                self.waiters
                    .entry((req.image, req.index))
                    .or_default()
                    .push((token, peer));
                if let Some(d) = self.downloads.get_mut(&req.image) {
                    d.sched.prioritize(req.index);
                }
                return;
            }
        }
        if link == Link::Lan
            && self.seeds_lan()
            && self.seeder.on_request(req.image, req.index, peer, now) == Verdict::Elsewhere
        {
            // Another host of our IDC got it from us a moment ago: take it from there.
            self.respond(peer, token, ChunkResponse::NotHeld);
            return;
        }
        if link == Link::Wan
            && self.seeds_wan(&req.image)
            && self.wan_seeder.on_request(req.image, req.index, peer, now) == Verdict::Elsewhere
        {
            // Another fetching IDC's bridgehead got it from us a moment ago: the fetching
            // IDCs take it from each other, so our uplink carries each chunk about once.
            debug!(%peer, idx = req.index, "chunk just sent to another IDC: not held here for now");
            self.respond(peer, token, ChunkResponse::NotHeld);
            return;
        }
        if self.lane(Some(link)) == Lane::Wan && self.uploads.wan_full() {
            // Our uplink to other IDCs has all it can carry soon: the asker takes this chunk
            // from another IDC that holds it, or asks us again later.
            debug!(%peer, idx = req.index, "WAN uploads full: not held here for now");
            return self.respond(peer, token, ChunkResponse::NotHeld);
        }
        // A payload sent or received a moment ago is served again as it was.
        if let Some(p) = self.payload_cache.get(&req.image, req.index) {
            let resp = ChunkResponse::Data {
                encoding: p.0,
                payload: p.1.clone(),
            };
            self.finish_serve(token, peer, req.image, resp, link);
            return;
        }
        self.serving += 1;
        self.push(Action::Read { token, peer, req });
    }

    /// The store read asked by [`Action::Read`] is done: `response` is the data (or
    /// `NotHeld` if the chunk was found corrupt at rest or could not be read).
    pub fn handle_read(
        &mut self,
        now: Instant,
        token: Token,
        peer: PeerId,
        req: ChunkRequest,
        response: ChunkResponse,
    ) {
        self.at(now);
        self.serving = self.serving.saturating_sub(1);
        if let ChunkResponse::Data { encoding, payload } = &response {
            self.payload_cache
                .insert(req.image, req.index, (*encoding, payload.clone()));
        }
        let link = self.link_of(&peer).unwrap_or(Link::Lan);
        self.finish_serve(token, peer, req.image, response, link);
    }

    /// A response to `peer` was written out (or failed): the next queued ones may go.
    pub fn handle_response_done(&mut self, now: Instant, peer: PeerId) {
        self.at(now);
        for (peer, q) in self.uploads.done(peer, now) {
            self.send_data(peer, q);
        }
    }

    pub(super) fn respond(&mut self, peer: PeerId, token: Token, resp: ChunkResponse) {
        let lane = self.lane(self.link_of(&peer));
        self.uploads.started(peer, lane);
        self.push(Action::Respond { token, peer, resp });
    }

    /// May we pull an image on `peer`'s behalf? Only a bridgehead, for its own IDC's hosts or
    /// for another IDC's bridgehead, under the BIDS policy.
    fn may_relay(&self, peer: &PeerId) -> bool {
        self.cfg.policy == Policy::Bids
            && self.role == Role::Bridgehead
            && self.cert.is_some()
            && self.peers.is_accepted(peer)
    }

    /// A bridgehead under BIDS sends each chunk into its LAN about once (super-seeding).
    pub(super) fn seeds_lan(&self) -> bool {
        self.cfg.policy == Policy::Bids && self.role == Role::Bridgehead
    }

    /// The upload lane of a response over `link`: a BIDS bridgehead's responses to other
    /// IDCs share [`crate::uploads::WAN_SENDING`] writes.
    fn lane(&self, link: Option<Link>) -> Lane {
        if link == Some(Link::Wan) && self.seeds_lan() {
            Lane::Wan
        } else {
            Lane::Open
        }
    }

    /// A bridgehead under BIDS that holds `image` whole (it is not fetching it) sends each
    /// chunk to the fetching IDCs' bridgeheads about once.
    fn seeds_wan(&self, image: &ImageId) -> bool {
        self.seeds_lan() && !self.downloads.contains_key(image)
    }

    pub(super) fn finish_serve(
        &mut self,
        token: Token,
        peer: PeerId,
        image: ImageId,
        resp: ChunkResponse,
        link: Link,
    ) {
        let ChunkResponse::Data { payload, .. } = &resp else {
            return self.respond(peer, token, resp);
        };
        let n = payload.len() as u64;
        let q = (token, image, resp, link);
        let lane = self.lane(Some(link));
        if let Some(q) = self.uploads.offer(peer, lane, q, n, self.now) {
            self.send_data(peer, q);
        }
    }

    /// Writes a data response the upload queues released, and counts its bytes.
    pub(super) fn send_data(&mut self, peer: PeerId, (token, image, resp, link): QueuedResponse) {
        if let ChunkResponse::Data { payload, .. } = &resp {
            let n = payload.len() as u64;
            let kind = self.kind_of(&peer).unwrap_or(PeerKind::of(link, false));
            self.acct.sent(image, kind, n);
            if let Some(m) = &self.metrics {
                m.sent(&image, link, n);
            }
        }
        self.respond(peer, token, resp);
    }

    /// Deferred requests for a chunk that just arrived are answered (cut-through relay),
    /// all from the one received buffer. Of the hosts of our IDC waiting, one gets it; the
    /// others take it from that host once it announces it (`crate::seeding`).
    pub(super) fn answer_waiters(
        &mut self,
        image: ImageId,
        idx: ChunkIndex,
        encoding: Encoding,
        payload: &bytes::Bytes,
    ) {
        let Some(ws) = self.waiters.remove(&(image, idx)) else {
            return;
        };
        debug!(idx, waiters = ws.len(), "answering deferred requests");
        let seeds = self.seeds_lan();
        let lan: Vec<PeerId> = ws
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| self.link_of(p) == Some(Link::Lan))
            .collect();
        let taker = if seeds && !lan.is_empty() {
            let missing: Vec<u32> = match self.downloads.get(&image) {
                Some(d) => lan.iter().map(|p| d.sched.peer_missing(p)).collect(),
                None => Vec::new(),
            };
            self.seeder
                .pick_taker(image, idx, &lan, &missing, self.now)
                .and_then(|k| lan.get(k).copied())
        } else {
            None
        };
        for (token, p) in ws {
            let link = self.link_of(&p).unwrap_or(Link::Lan);
            if seeds && link == Link::Lan && Some(p) != taker {
                self.respond(p, token, ChunkResponse::NotHeld);
                continue;
            }
            let resp = ChunkResponse::Data {
                encoding,
                payload: payload.clone(),
            };
            self.finish_serve(token, p, image, resp, link);
        }
    }

    /// Takes every request deferred on `image`, with the chunk each waits for.
    fn take_waiters(&mut self, image: &ImageId) -> Vec<(ChunkIndex, super::Waiter)> {
        let keys: Vec<(ImageId, ChunkIndex)> = self
            .waiters
            .keys()
            .filter(|(i, _)| i == image)
            .copied()
            .collect();
        let mut out = Vec::new();
        for k in keys {
            for w in self.waiters.remove(&k).unwrap_or_default() {
                out.push((k.1, w));
            }
        }
        out
    }

    /// Requests deferred on `image` go through the usual door again (its download
    /// completed: they are served).
    pub(super) fn replay_waiters(&mut self, image: &ImageId) {
        for (index, (token, p)) in self.take_waiters(image) {
            let req = ChunkRequest {
                image: *image,
                index,
            };
            self.handle_chunk_request(self.now, p, req, token);
        }
    }

    /// Requests deferred on `image` are answered NotHeld (its download failed).
    pub(super) fn refuse_waiters(&mut self, image: &ImageId) {
        for (_, (token, p)) in self.take_waiters(image) {
            self.respond(p, token, ChunkResponse::NotHeld);
        }
    }

    /// Remote bridgeheads that asked before we knew what our IDC holds are answered NotHeld
    /// for chunks no LAN peer of ours has (they fetch them elsewhere), so no two bridgeheads
    /// ever wait on each other.
    pub(super) fn release_stuck_waiters(&mut self) {
        let now = self.now;
        let mut release = Vec::new();
        for ((image, idx), ws) in &self.waiters {
            let Some(d) = self.downloads.get(image) else {
                continue;
            };
            // Until the LAN peers the GIS listed have said hello, we do not know yet what our
            // IDC holds (a bridgehead that lacks an image learns it only then).
            let discovering = now.duration_since(d.started) < super::LAN_DISCOVERY_GRACE
                && d.candidates
                    .iter()
                    .any(|(p, (kind, _))| !kind.is_wan() && !d.active.contains(p));
            if discovering {
                continue;
            }
            if d.sched.lan_available(*idx) || d.sched.is_held(*idx) {
                continue;
            }
            for (i, (_, p)) in ws.iter().enumerate() {
                if self.link_of(p) == Some(Link::Wan) {
                    release.push(((*image, *idx), i));
                }
            }
        }
        // Remove from the back so indexes stay valid.
        let mut answer = Vec::new();
        for ((image, idx), i) in release.into_iter().rev() {
            let Some(ws) = self.waiters.get_mut(&(image, idx)) else {
                continue;
            };
            if i < ws.len() {
                answer.push((idx, ws.remove(i)));
            }
            if ws.is_empty() {
                self.waiters.remove(&(image, idx));
            }
        }
        for (idx, (token, p)) in answer {
            debug!(peer = %p, idx, "remote bridgehead's request answered NotHeld (not in our IDC)");
            self.respond(p, token, ChunkResponse::NotHeld);
        }
    }
}
