//! Announcements: what peers say they hold, what we tell the IDC, chunks lost at rest;
//! and the periodic work.

use super::{Action, NodeCore};
use crate::gate::Link;
use crate::scheduler::SourceKind;
use bids_protocols::gis::HostStats;
use bids_protocols::gossip::{self, Announcement, Have};
use bids_protocols::{ChunkIndex, ImageId, Policy, Role};
use libp2p::PeerId;
use std::collections::HashMap;
use std::time::Instant;
use tracing::{debug, info};

impl NodeCore {
    /// An announcement from `src` arrived by gossip (`remote`: on the bridgeheads' topic).
    pub fn handle_announcement(&mut self, now: Instant, src: PeerId, data: &[u8], remote: bool) {
        self.at(now);
        if src == self.cfg.me {
            return;
        }
        // A bridgehead announcement from another IDC counts only for a bridgehead linked to it.
        if remote && (self.role != Role::Bridgehead || self.link_of(&src) != Some(Link::Wan)) {
            return;
        }
        let a = match Announcement::from_bytes(data) {
            Ok(a) => a,
            Err(e) => {
                debug!(peer = %src, error = %e, "bad announcement ignored");
                return;
            }
        };
        for h in a.haves {
            let Some(d) = self.downloads.get_mut(&h.image) else {
                // Kept for a download of it that may start (`crate::heard`).
                self.heard.heard(src, remote, &h, now);
                continue;
            };
            if !h.lost.is_empty() {
                d.sched.peer_lost(&src, &h.lost);
                if let Some(c) = d.candidates.get_mut(&src) {
                    c.1 = false;
                }
            }
            self.take_have(h.image, src, remote, &h.ranges, h.complete);
        }
    }

    /// `src` holds `ranges` of `image` (or all of it): news for the running download of
    /// it, whose source `src` becomes if it is not one yet.
    pub(super) fn take_have(
        &mut self,
        image: ImageId,
        src: PeerId,
        remote: bool,
        ranges: &[(ChunkIndex, ChunkIndex)],
        complete: bool,
    ) {
        let Some(d) = self.downloads.get_mut(&image) else {
            return;
        };
        if d.active.contains(&src) {
            if complete {
                d.sched.peer_complete(&src);
            } else {
                d.sched.peer_has(&src, ranges);
            }
            return;
        }
        let kind = if remote {
            SourceKind::RemoteBridgehead
        } else {
            SourceKind::Lan
        };
        let entry = d.candidates.entry(src).or_insert((kind, false));
        if complete {
            entry.1 = true;
        }
        d.pending_haves
            .entry(src)
            .or_default()
            .extend(ranges.iter().copied());
        self.activate(&image, &src);
    }

    pub(super) fn announce(&mut self, image: ImageId, fresh: &[ChunkIndex], complete: bool) {
        let mut idx: Vec<ChunkIndex> = fresh.to_vec();
        idx.sort_unstable();
        idx.dedup();
        let msg = Announcement {
            haves: vec![Have {
                image,
                ranges: gossip::to_ranges(&idx),
                complete,
                lost: Vec::new(),
            }],
        };
        self.publish_gossip(msg);
    }

    pub(super) fn publish_gossip(&mut self, msg: Announcement) {
        let bytes = msg.to_bytes();
        if bytes.len() > gossip::MAX_ANNOUNCE_BYTES {
            // Split: announce halves (only happens for very fragmented partial images).
            if msg.haves.len() == 1 && msg.haves[0].ranges.len() > 1 {
                let h = &msg.haves[0];
                let mid = h.ranges.len() / 2;
                let a = Have {
                    image: h.image,
                    ranges: h.ranges[..mid].to_vec(),
                    complete: false,
                    lost: Vec::new(),
                };
                let b = Have {
                    image: h.image,
                    ranges: h.ranges[mid..].to_vec(),
                    complete: h.complete,
                    lost: h.lost.clone(),
                };
                self.publish_gossip(Announcement { haves: vec![a] });
                self.publish_gossip(Announcement { haves: vec![b] });
            }
            return;
        }
        let bridgeheads = self.role == Role::Bridgehead && self.cfg.policy == Policy::Bids;
        self.push(Action::Gossip { bytes, bridgeheads });
    }

    /// What a heartbeat tells the GIS: the counters, the settings and the banned peers.
    pub fn heartbeat_stats(&self) -> HostStats {
        let mut stats = self.acct.snapshot();
        stats.settings = Some(self.settings());
        stats.banned = self.bans.keys().copied().collect();
        stats
    }

    /// Chunks the store found corrupt at rest (serving, export, verification, scrubbing) and
    /// marked missing are withdrawn: the IDC's peers learn it by gossip (they stop asking us
    /// for them), the GIS by a publish (we no longer count as a complete holder), and a
    /// download of the image fetches them again.
    pub(super) fn withdraw_lost(&mut self) {
        let lost = self.store.take_lost();
        if lost.is_empty() {
            return;
        }
        let mut by_image: HashMap<ImageId, Vec<ChunkIndex>> = HashMap::new();
        for (id, idx) in lost {
            by_image.entry(id).or_default().push(idx);
        }
        for (id, mut idx) in by_image {
            idx.sort_unstable();
            idx.dedup();
            self.announcer.no_longer_complete(&id);
            if let Some(d) = self.downloads.get_mut(&id) {
                for &i in &idx {
                    d.sched.unmark_held(i);
                }
            }
            info!(image = %id.short(), chunks = idx.len(), "withdrawing chunks found corrupt at rest from the GIS and the IDC's peers");
            self.publish_gossip(Announcement {
                haves: vec![Have {
                    image: id,
                    ranges: Vec::new(),
                    complete: false,
                    lost: gossip::to_ranges(&idx),
                }],
            });
            let fetching = self.downloads.contains_key(&id);
            self.publish(&id, fetching);
        }
    }

    /// The periodic work (every few tens of milliseconds): hellos that never came,
    /// upload limits, chunks lost at rest, bans that end, stuck deferred requests,
    /// download timeouts and lookups, announcements.
    pub fn handle_tick(&mut self, now: Instant) {
        self.at(now);
        self.control_tick(now);
        // Peers that never said hello, or were refused and had time to read why, are dropped.
        for (p, early) in self.peers.expire(now) {
            self.release_early(p, early);
            self.push(Action::Disconnect(p));
        }
        for (peer, q) in self.uploads.tick(now) {
            self.send_data(peer, q);
        }
        self.withdraw_lost();
        let expired: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        let lifted = !expired.is_empty();
        for p in expired {
            self.bans.remove(&p);
            info!(peer = %p, "ban for corrupt chunks expired");
        }
        // The GIS hears of a lifted ban at once, as of a new one: it lists the peer again.
        if lifted {
            self.heartbeat_now();
        }
        self.release_stuck_waiters();
        self.drive_downloads(now);
        let due = self.announcer.tick(now);
        for (id, fresh) in due.fresh {
            if self.downloads.contains_key(&id) {
                self.announce(id, &fresh, false);
            }
        }
        if let Some(completed) = due.full {
            let mut haves = Vec::new();
            for id in self.downloads.keys() {
                if let Some(held) = self.store.held(id) {
                    let idx: Vec<ChunkIndex> = held
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| **h)
                        .map(|(i, _)| i as u32)
                        .collect();
                    if !idx.is_empty() {
                        haves.push(Have {
                            image: *id,
                            ranges: gossip::to_ranges(&idx),
                            complete: false,
                            lost: Vec::new(),
                        });
                    }
                }
            }
            for id in completed {
                haves.push(Have {
                    image: id,
                    ranges: Vec::new(),
                    complete: true,
                    lost: Vec::new(),
                });
            }
            for h in haves {
                self.publish_gossip(Announcement { haves: vec![h] });
            }
        }
    }
}
