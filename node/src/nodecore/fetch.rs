//! Downloads: host lists and candidates, chunk requests and their answers, verified
//! writes, progress, lookups and publications, bans.

use super::{
    truncate, Action, DownloadState, FetchReply, GisPurpose, NodeCore, Prepared, ReqKey, StoreFail,
    MAX_WRITING,
};
use crate::accounting::PeerKind;
use crate::cadence::{Cadence, Pace};
use crate::scheduler::{Download, Failure, SourceKind};
use crate::startup::Startup;
use crate::store::StoreError;
use crate::FetchProgress;
use bids_protocols::chunk::{ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::{self as gisp, GisRequest, Holding, HostEntry, HostList, ImageQuery};
use bids_protocols::{ChunkIndex, ImageId, Manifest, Policy, Role};
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

impl NodeCore {
    /// `peer` answered our chunk request `key`.
    pub fn handle_chunk_response(
        &mut self,
        now: Instant,
        peer: PeerId,
        key: ReqKey,
        resp: ChunkResponse,
    ) {
        self.at(now);
        let arrived = match &resp {
            ChunkResponse::Data { payload, .. } => payload.len() as u64,
            _ => 0,
        };
        self.download.answered(&key, arrived, now);
        let Some((image, idx, _)) = self.inflight.remove(&key) else {
            return;
        };
        self.take_chunk_response(peer, image, idx, resp);
        // The answer freed a request slot (data goes on to verification without holding
        // it): fill it now.
        self.pump(&image, now);
    }

    /// Our chunk request `key` to `peer` failed: `why` says how.
    pub fn handle_request_failed(&mut self, now: Instant, peer: PeerId, key: ReqKey, why: Failure) {
        self.at(now);
        self.download.answered(&key, 0, now);
        if let Some((image, idx, _)) = self.inflight.remove(&key) {
            debug!(%peer, idx, ?why, "chunk request failed");
            if let Some(d) = self.downloads.get_mut(&image) {
                d.sched.on_failure(&peer, idx, why, now);
            }
        }
    }

    fn take_chunk_response(
        &mut self,
        peer: PeerId,
        image: ImageId,
        idx: ChunkIndex,
        resp: ChunkResponse,
    ) {
        let now = self.now;
        let kind = self.kind_of(&peer);
        let Some(d) = self.downloads.get_mut(&image) else {
            return;
        };
        match resp {
            ChunkResponse::Data { payload, .. } if self.bans.contains_key(&peer) => {
                // Its requests were released when it was banned: this answer was already on
                // its way. Not one more chunk from it is trusted.
                debug!(%peer, idx, bytes = payload.len(), "dropping a chunk from a peer banned for corrupt chunks");
            }
            ChunkResponse::Data { encoding, payload } => {
                if let Some(kind) = kind {
                    if let Some(m) = &self.metrics {
                        m.received(&image, kind, payload.len() as u64);
                    }
                }
                let stored = self.store.has_chunk(&image, idx);
                if stored || d.sched.is_verifying(idx) {
                    // A late endgame duplicate: count the bytes, drop the data.
                    if let Some(kind) = kind {
                        self.acct.received(image, kind, payload.len() as u64);
                    }
                    if stored {
                        d.sched.on_chunk(&peer, idx, now);
                    } else {
                        // The first copy is still being verified: only free this slot.
                        d.sched.on_arrived(&peer, idx, now);
                    }
                    return;
                }
                if let Some(kind) = kind {
                    self.acct.received(image, kind, payload.len() as u64);
                }
                let lan_bytes = match kind {
                    Some(PeerKind::Bridgehead | PeerKind::Host) => payload.len() as u64,
                    _ => 0,
                };
                debug!(%peer, idx, bytes = payload.len(), "chunk arrived");
                if d.startup.data_arrived(now) {
                    let startup = d.startup.report();
                    info!(image = %d.manifest.image_ref(), %startup, "first chunk data arrived");
                    d.progress.send_modify(|p| p.startup = Some(startup));
                }
                d.sched.on_arrived(&peer, idx, now);
                let manifest = d.manifest.clone();
                self.note_lan_availability(&image, now, lan_bytes);
                self.push(Action::Store {
                    manifest,
                    image,
                    idx,
                    peer,
                    encoding,
                    payload,
                });
            }
            ChunkResponse::NotHeld => {
                debug!(%peer, idx, "peer does not hold the chunk");
                d.sched.on_failure(&peer, idx, Failure::NotHeld, now)
            }
            ChunkResponse::Busy => d.sched.on_failure(&peer, idx, Failure::Busy, now),
            ChunkResponse::UnknownImage => {
                debug!(%peer, idx, "peer does not know the image");
                d.sched.on_failure(&peer, idx, Failure::UnknownImage, now)
            }
            ChunkResponse::BadIndex => d.sched.on_failure(&peer, idx, Failure::Refused, now),
            ChunkResponse::Refused(reason) => {
                warn!(%peer, reason = %truncate(&reason, 200), "peer refused a chunk request");
                d.sched.on_failure(&peer, idx, Failure::Refused, now);
            }
        }
    }

    /// The verified write asked by [`Action::Store`] is done: the encoded payload (for
    /// relaying), or why the chunk was not stored.
    pub fn handle_stored(
        &mut self,
        now: Instant,
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        result: Result<(Encoding, Bytes), StoreFail>,
    ) {
        self.at(now);
        let Some(d) = self.downloads.get_mut(&image) else {
            return;
        };
        match result {
            Ok((encoding, payload)) => {
                if let Some(m) = &self.metrics {
                    m.chunk_verified();
                }
                let from_bridgehead = d.sched.peer_kind(&peer) == Some(SourceKind::LocalBridgehead);
                d.sched.on_chunk(&peer, idx, now);
                if from_bridgehead {
                    self.announcer.gained_awaited(image, idx);
                } else {
                    self.announcer.gained(image, idx);
                }
                self.answer_waiters(image, idx, encoding, &payload);
                self.payload_cache.insert(image, idx, (encoding, payload));
                self.update_progress(&image);
            }
            Err(StoreFail::Corrupt(e)) if self.bans.contains_key(&peer) => {
                // Arrived before the ban, verified after: it changes nothing.
                debug!(%peer, idx, error = %e, "another corrupt chunk from a banned peer");
                d.sched.on_failure(&peer, idx, Failure::Corrupt, now);
            }
            Err(StoreFail::Corrupt(e)) => {
                warn!(%peer, image = %image.short(), idx, error = %e, "chunk failed verification; penalising the sender");
                self.acct.bad_chunk(image);
                if let Some(m) = &self.metrics {
                    m.chunk_failed();
                }
                d.sched.on_failure(&peer, idx, Failure::Corrupt, now);
                if d.sched.is_banned(&peer) && !self.bans.contains_key(&peer) {
                    self.ban(peer, now);
                }
            }
            Err(StoreFail::Local(e)) => {
                // Our disk, not the sender: nobody is penalised, and fetching more only
                // fails the same way, so the download stops (the chunk stays missing).
                let reason = match e {
                    // The driver says how much room the rest needs and how much is free.
                    StoreError::NoSpace { .. } | StoreError::DiskFull { .. } => e.to_string(),
                    e => format!(
                        "storing chunk {idx} of {} failed: {e} (a local fault; no sender is blamed)",
                        d.manifest.image_ref()
                    ),
                };
                self.fail_download(image, reason);
                return;
            }
        }
        self.pump(&image, now);
    }

    pub(super) fn update_progress(&mut self, image: &ImageId) {
        let Some(d) = self.downloads.get_mut(image) else {
            return;
        };
        let held = self.store.status(image).map(|s| s.held).unwrap_or(0);
        let complete = d.sched.is_complete() && d.sched.verifying() == 0;
        d.progress.send_modify(|p| p.held = held);
        if complete {
            let took = self.now.saturating_duration_since(d.started);
            let secs = took.as_secs_f64();
            info!(image = %d.manifest.image_ref(), id = %image.short(), secs = format!("{secs:.2}"), "download complete and verified");
            // Counted before watchers learn of it: what they scrape then includes it.
            if let Some(m) = &self.metrics {
                m.download_done(took);
            }
            d.progress.send_modify(|p| p.done = Some(Ok(secs)));
            // The host's own measure of the provision time, for the GIS and the console.
            self.acct.provisioned(
                *image,
                gisp::ProvisionTime {
                    millis: u64::try_from(took.as_micros().div_ceil(1000)).unwrap_or(u64::MAX),
                    completed_ms: self.wall_ms(),
                },
            );
            let fresh = self.announcer.take_fresh(image);
            self.downloads.remove(image);
            self.announcer.completed(*image, self.now);
            self.announce(*image, &fresh, true);
            self.publish(image, false);
            self.push(Action::Touch(*image));
            // Anyone still waiting on us gets what we now hold.
            self.replay_waiters(image);
        }
    }

    /// Starts a download of `image` unless one runs (the GIS is asked for a host list
    /// first); `reply` hears of its progress, or why it cannot start.
    pub fn handle_fetch(&mut self, now: Instant, image: ImageQuery, reply: Option<FetchReply>) {
        self.at(now);
        self.ensure_download(image, reply);
    }

    pub(super) fn ensure_download(&mut self, image: ImageQuery, reply: Option<FetchReply>) {
        let known = match &image {
            ImageQuery::Id(id) => Some(*id),
            ImageQuery::Ref(r) => self.store.resolve(r),
        };
        if let Some(id) = known {
            if let Some(d) = self.downloads.get(&id) {
                if let Some(r) = reply {
                    let _ = r.send(Ok(d.progress.subscribe()));
                }
                return;
            }
            if let (Some(m), Some(st)) = (self.store.manifest(&id), self.store.status(&id)) {
                if st.complete {
                    if let Some(r) = reply {
                        let (_tx, rx) = watch::channel(FetchProgress {
                            image: m.image_ref(),
                            id,
                            held: st.held,
                            total: st.total,
                            size: m.size,
                            done: Some(Ok(0.0)),
                            startup: None,
                        });
                        let _ = r.send(Ok(rx));
                    }
                    return;
                }
            }
        }
        self.gis_request(
            GisRequest::Lookup {
                image: image.clone(),
                idc: None,
            },
            GisPurpose::Lookup {
                image,
                for_fetch: Some(reply.unwrap_or_else(|| oneshot::channel().0)),
                asked: self.now,
            },
        );
        // Mark a pending id so repeated requests for it do not each start a lookup.
        if let Some(id) = known {
            if let Some(d) = self.downloads.get_mut(&id) {
                d.cadence.lookup_sent();
            }
        }
    }

    /// The GIS answered a lookup for `query` (asked at `asked`) with `list`.
    pub fn handle_host_list(
        &mut self,
        now: Instant,
        query: ImageQuery,
        list: HostList,
        reply: Option<FetchReply>,
        asked: Instant,
    ) {
        self.at(now);
        let id = list.image.id;
        let known = match self.downloads.get(&id) {
            // A refresh's answer carries no manifest: the download has it.
            Some(d) if list.manifest.is_empty() => Some(d.manifest.clone()),
            // Only refreshes go without a reply, and their answers without a manifest: this
            // one comes after its download ended (completed or given up), and is moot.
            None if list.manifest.is_empty() && reply.is_none() => {
                debug!(image = %id.short(), "a refresh answered after its download ended");
                return;
            }
            _ => None,
        };
        let manifest = match known.map_or_else(
            || Manifest::from_bytes_with_id(&list.manifest, id).map(Arc::new),
            Ok,
        ) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "the GIS sent a manifest that does not verify");
                if let Some(r) = reply {
                    let _ = r.send(Err(format!("manifest from the GIS does not verify: {e}")));
                }
                return;
            }
        };
        if let ImageQuery::Ref(r) = &query {
            if &manifest.image_ref() != r {
                if let Some(r) = reply {
                    let _ = r.send(Err("the GIS answered for another image".into()));
                }
                return;
            }
        }
        if !self.downloads.contains_key(&id) {
            if self.store.status(&id).is_some_and(|s| s.complete) {
                if let Some(r) = reply {
                    let (_tx, rx) = watch::channel(FetchProgress {
                        image: manifest.image_ref(),
                        id,
                        held: manifest.chunk_count(),
                        total: manifest.chunk_count(),
                        size: manifest.size,
                        done: Some(Ok(0.0)),
                        startup: None,
                    });
                    let _ = r.send(Ok(rx));
                }
                return;
            }
            let sources = list.level0.len() + list.level1.len() + list.level2.len();
            if sources == 0 && reply.is_some() && !self.may_relay_any() {
                if let Some(r) = reply {
                    let _ = r.send(Err(format!(
                        "no source for {}: no live host of IDC {} holds it and no bridgehead can fetch it",
                        manifest.image_ref(),
                        self.cfg.idc
                    )));
                }
                return;
            }
            // The store's part (a file created, a sled transaction) runs off the loop; the
            // lists that arrive meanwhile wait with this one.
            if let Some(waiting) = self.preparing.get_mut(&id) {
                waiting.push((list, reply));
                return;
            }
            self.preparing.insert(id, vec![(list, reply)]);
            let times = (asked, self.now);
            self.push(Action::Prepare { manifest, times });
            return;
        }
        self.take_host_list(id, list, reply);
    }

    /// The store is ready (or not) for the download of `manifest`: the download starts and
    /// takes the host lists that waited, or each waiting fetch gets the error.
    pub fn handle_prepared(
        &mut self,
        now: Instant,
        manifest: Arc<Manifest>,
        (asked, answered): (Instant, Instant),
        result: Result<Prepared, String>,
    ) {
        self.at(now);
        let id = manifest.id();
        let lists = self.preparing.remove(&id).unwrap_or_default();
        let prepared = match result {
            Ok(p) => p,
            Err(e) => {
                for (_, reply) in lists {
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.clone()));
                    }
                }
                return;
            }
        };
        if !self.downloads.contains_key(&id) {
            let (level0, level1, level2) = lists.first().map_or((0, 0, 0), |(l, _)| {
                (l.level0.len(), l.level1.len(), l.level2.len())
            });
            let held = prepared.held;
            let mut sched = Download::new(
                manifest.chunk_count(),
                |i| held.get(i as usize).copied().unwrap_or(false),
                self.cfg.scheduler.clone(),
                self.rng.gen(),
            );
            sched.set_identity(self.cfg.me);
            let (tx, _) = watch::channel(FetchProgress {
                image: manifest.image_ref(),
                id,
                held: prepared.held_chunks,
                total: manifest.chunk_count(),
                size: manifest.size,
                done: None,
                startup: None,
            });
            info!(image = %manifest.image_ref(), id = %id.short(), chunks = manifest.chunk_count(),
                  level0, level1, level2, prepare_ms = now.saturating_duration_since(answered).as_millis() as u64, "download started");
            if self.downloads.is_empty() {
                // No saved-up burst: the download limit holds from the first request.
                self.download.start_fresh(self.now);
            }
            let mut startup = Startup::new(asked);
            startup.lookup_answered(answered);
            self.downloads.insert(
                id,
                DownloadState {
                    manifest: manifest.clone(),
                    sched,
                    started: self.now,
                    progress: tx,
                    candidates: HashMap::new(),
                    pending_haves: HashMap::new(),
                    active: HashSet::new(),
                    cadence: Cadence::new(self.now),
                    list_digest: None,
                    startup,
                    lan_available: (false, self.now),
                },
            );
            self.publish(&id, true);
        }
        for (list, reply) in lists {
            self.take_host_list(id, list, reply);
        }
        self.take_heard(id);
    }

    /// What the IDC's peers announced of `id` before its download started goes to the
    /// download, as if announced now: a host that starts late takes the chunks the IDC
    /// already holds from the peers that hold them at once (`crate::heard`).
    fn take_heard(&mut self, id: ImageId) {
        for (peer, have) in self.heard.take(&id) {
            self.take_have(id, peer, have.remote, &have.ranges, have.complete);
        }
    }

    /// Takes a host list into the running download of `id`: its peers become candidates.
    pub(super) fn take_host_list(
        &mut self,
        id: ImageId,
        list: HostList,
        reply: Option<FetchReply>,
    ) {
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        d.cadence.lookup_answered(self.now);
        d.list_digest = Some(list.digest());
        if let Some(r) = reply {
            let _ = r.send(Ok(d.progress.subscribe()));
        }
        let bids = self.cfg.policy == Policy::Bids;
        let mut entries: Vec<(HostEntry, SourceKind)> = Vec::new();
        for e in list.level0 {
            entries.push((e, SourceKind::Lan));
        }
        for e in list.level1 {
            entries.push((
                e,
                if bids {
                    SourceKind::LocalBridgehead
                } else {
                    SourceKind::Lan
                },
            ));
        }
        if bids && self.role == Role::Bridgehead {
            for e in list.level2 {
                entries.push((e, SourceKind::RemoteBridgehead));
            }
        }
        for (e, kind) in entries {
            if e.peer == self.cfg.me {
                continue;
            }
            // A remote bridgehead whose IDC holds the image supplies everything; one that is
            // itself fetching supplies what it announces.
            let complete = if kind == SourceKind::RemoteBridgehead {
                e.idc_complete || e.complete
            } else {
                e.complete
            };
            if bids && e.idc != self.cfg.idc && kind != SourceKind::RemoteBridgehead {
                // Ordinary hosts never dial another IDC.
                continue;
            }
            let addrs: Vec<Multiaddr> = e.addrs.into_iter().take(gisp::MAX_ADDRS).collect();
            if !addrs.is_empty() {
                self.addrs.insert(e.peer, addrs);
            }
            if let Some(d) = self.downloads.get_mut(&id) {
                d.candidates.insert(e.peer, (kind, complete));
            }
            self.activate(&id, &e.peer);
        }
    }

    /// A bridgehead under BIDS keeps links to the other IDCs' bridgeheads (the GIS lists
    /// them in its answers to our heartbeats) open: the first image they trade then does
    /// not wait for TCP, noise and hello round trips over the WAN.
    pub fn link_bridgeheads(&mut self, now: Instant, list: Vec<HostEntry>) {
        self.at(now);
        if self.role != Role::Bridgehead || self.cfg.policy != Policy::Bids {
            return;
        }
        for e in list {
            if e.peer == self.cfg.me || e.idc == self.cfg.idc || e.role != Role::Bridgehead {
                continue;
            }
            let addrs: Vec<Multiaddr> = e.addrs.into_iter().take(gisp::MAX_ADDRS).collect();
            if addrs.is_empty() {
                continue;
            }
            self.addrs.insert(e.peer, addrs.clone());
            if self.connected.contains(&e.peer) || !self.dialing.insert(e.peer) {
                continue;
            }
            debug!(peer = %e.peer, idc = %e.idc, "linking to a bridgehead of another IDC");
            self.push(Action::Dial {
                peer: e.peer,
                addrs,
            });
        }
    }

    pub(super) fn may_relay_any(&self) -> bool {
        self.cfg.policy == Policy::Bids && self.role == Role::Bridgehead
    }

    /// Adds a candidate source to its download once its hello is accepted; dials it otherwise.
    pub(super) fn activate(&mut self, image: &ImageId, peer: &PeerId) {
        if self.bans.contains_key(peer) {
            return;
        }
        let accepted = self.peers.is_accepted(peer);
        let connected = self.connected.contains(peer);
        let Some(d) = self.downloads.get_mut(image) else {
            return;
        };
        let Some(&(kind, complete)) = d.candidates.get(peer) else {
            return;
        };
        if accepted {
            if d.active.insert(*peer) {
                d.startup.source_ready(self.now);
                if kind == SourceKind::RemoteBridgehead && !complete {
                    d.sched.add_fetching_bridgehead(*peer);
                } else {
                    d.sched.add_peer(*peer, kind, complete);
                }
                if let Some(r) = d.pending_haves.remove(peer) {
                    d.sched.peer_has(peer, &r);
                }
            } else if complete {
                d.sched.peer_complete(peer);
            }
        } else if !connected && !self.dialing.contains(peer) {
            if let Some(addrs) = self.addrs.get(peer).cloned() {
                self.dialing.insert(*peer);
                self.push(Action::Dial { peer: *peer, addrs });
            } else if let Some(d) = self.downloads.get_mut(image) {
                // Known only from an announcement: the GIS has its address.
                d.cadence.unknown_announcer();
            }
        }
    }

    /// Counts the time since the last look as time the IDC could have kept us busy over
    /// the LAN if it held a chunk we lacked then (with the LAN bytes that arrived by `now`),
    /// and looks again. Called on every tick and every chunk that arrives.
    pub(super) fn note_lan_availability(&mut self, id: &ImageId, now: Instant, lan_bytes: u64) {
        let Some(d) = self.downloads.get_mut(id) else {
            return;
        };
        let (was, since) = d.lan_available;
        d.lan_available = (d.sched.idc_holds_missing(), now);
        if was {
            self.acct
                .lan_available(*id, now.saturating_duration_since(since), lan_bytes);
        }
    }

    /// Sends the requests the scheduler wants now (called on every event that frees a slot,
    /// not only on the tick, so the pipeline never waits for the clock).
    pub(super) fn pump(&mut self, id: &ImageId, now: Instant) {
        if !self.download.may_send(now) {
            return;
        }
        let Some(d) = self.downloads.get_mut(id) else {
            return;
        };
        if d.sched.verifying() >= MAX_WRITING {
            // Verification and the disk lag behind the network: received chunks wait in
            // memory, so no more are asked for until some are stored (bounded memory).
            return;
        }
        let reqs = d.sched.next_requests(now);
        let mut send = Vec::with_capacity(reqs.len());
        for (peer, idx) in reqs {
            // Over the download limit the rest wait for a later pump: requests are charged
            // as they leave, so the pipeline cannot run ahead of the limit.
            if !self.download.may_send(now) {
                d.sched.cancel(&peer, idx);
                continue;
            }
            debug!(%peer, idx, "requesting chunk");
            d.startup.request_sent(now);
            self.next_key += 1;
            let key = ReqKey(self.next_key);
            self.download
                .sent(key, d.manifest.chunk_len(idx) as u64, now);
            self.inflight.insert(key, (*id, idx, peer));
            send.push((key, peer, idx));
        }
        for (key, peer, index) in send {
            let req = ChunkRequest { image: *id, index };
            self.push(Action::Request { key, peer, req });
        }
    }

    pub(super) fn drive_downloads(&mut self, now: Instant) {
        let ids: Vec<ImageId> = self.downloads.keys().copied().collect();
        for id in ids {
            let Some(d) = self.downloads.get_mut(&id) else {
                continue;
            };
            for (peer, idx) in d.sched.expire(now) {
                debug!(%peer, idx, "chunk request timed out");
            }
            self.note_lan_availability(&id, now, 0);
            self.pump(&id, now);
            let Some(d) = self.downloads.get_mut(&id) else {
                continue;
            };
            let pace = Pace {
                lookup_refresh: self.cfg.lookup_refresh,
                no_source_timeout: self.cfg.no_source_timeout,
            };
            let due = d.cadence.tick(now, self.role, d.sched.is_stalled(), &pace);
            let (lookup, publish, known) = (due.lookup, due.publish, d.list_digest);
            let failed = due.no_source_for.map(|for_| {
                format!(
                    "no source for {} for {for_:?}: {} of {} chunks missing and no reachable host or bridgehead holds them",
                    d.manifest.image_ref(),
                    d.sched.missing(),
                    d.manifest.chunk_count()
                )
            });
            if let Some(reason) = failed {
                self.fail_download(id, reason);
                continue;
            }
            if lookup {
                self.gis_request(
                    GisRequest::Refresh { image: id, known },
                    GisPurpose::Lookup {
                        image: ImageQuery::Id(id),
                        for_fetch: None,
                        asked: now,
                    },
                );
            }
            if publish {
                self.publish(&id, true);
            }
        }
    }

    /// Ends a download with `reason`: its watchers learn why, requests deferred on it are
    /// answered NotHeld, and the GIS learns what we hold now.
    pub(super) fn fail_download(&mut self, id: ImageId, reason: String) {
        if let Some(m) = &self.metrics {
            m.download_failed();
        }
        warn!(image = %id.short(), %reason, "download failed");
        if let Some(d) = self.downloads.remove(&id) {
            d.progress
                .send_modify(|p| p.done = Some(Err(reason.clone())));
        }
        self.refuse_waiters(&id);
        self.publish(&id, false);
    }

    /// Bans `peer` node-wide for serving corrupt chunks: every download drops it (its
    /// in-flight requests go elsewhere; answers still on their way are dropped), no new one
    /// takes it until the ban expires, and the GIS hears of it at once.
    pub(super) fn ban(&mut self, peer: PeerId, now: Instant) {
        let until = now + self.cfg.ban_duration;
        self.bans.insert(peer, until);
        warn!(%peer, secs = self.cfg.ban_duration.as_secs(), "peer banned node-wide for serving corrupt chunks; reported to the GIS");
        for d in self.downloads.values_mut() {
            d.sched.ban(&peer);
            d.active.remove(&peer);
            if d.candidates.remove(&peer).is_some() {
                d.list_digest = None;
            }
        }
        self.heartbeat_now();
    }

    /// Tells the GIS what we hold of `id` (and whether we are fetching it).
    pub(super) fn publish(&mut self, id: &ImageId, fetching: bool) {
        let (Some(m), Some(st)) = (self.store.manifest(id), self.store.status(id)) else {
            return;
        };
        let holding = Holding {
            image: *id,
            chunks_held: st.held,
            complete: st.complete,
            fetching,
        };
        // Progress of a download: the GIS knows the image (we got its manifest from it).
        let manifest = if fetching && self.downloads.contains_key(id) {
            Vec::new()
        } else {
            m.to_bytes()
        };
        self.gis_request(
            GisRequest::Publish { holding, manifest },
            GisPurpose::Publish,
        );
    }

    /// Tells the GIS everything the store holds (after a registration).
    pub fn publish_all(&mut self, now: Instant) {
        self.at(now);
        let ids: Vec<ImageId> = self.store.list().into_iter().map(|s| s.id).collect();
        for id in ids {
            let fetching = self.downloads.contains_key(&id);
            self.publish(&id, fetching);
        }
    }

    /// The GIS answered a refresh of `id`'s host list with "unchanged": the download keeps
    /// its candidates, and those not active (their link closed since, say) are tried
    /// again, as taking the same list whole would have done.
    pub fn handle_host_list_unchanged(&mut self, now: Instant, id: ImageId) {
        self.at(now);
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        d.cadence.lookup_answered(now);
        // Only those with an address: one known only from an announcement would have
        // the download ask the GIS again at once, and the GIS just said it has no news.
        let idle: Vec<PeerId> = d
            .candidates
            .keys()
            .filter(|p| !d.active.contains(*p) && self.addrs.contains_key(*p))
            .copied()
            .collect();
        for peer in idle {
            self.activate(&id, &peer);
        }
    }

    /// A lookup got no host list: the download may ask again; a waiting fetch gets the reason.
    pub fn handle_lookup_failed(
        &mut self,
        now: Instant,
        image: &ImageQuery,
        for_fetch: Option<FetchReply>,
        reason: String,
    ) {
        self.at(now);
        let id = match image {
            ImageQuery::Id(id) => Some(*id),
            ImageQuery::Ref(r) => self.store.resolve(r),
        };
        if let Some(d) = id.and_then(|id| self.downloads.get_mut(&id)) {
            d.cadence.lookup_failed();
        }
        if let Some(reply) = for_fetch {
            let _ = reply.send(Err(reason));
        }
    }
}
