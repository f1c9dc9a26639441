//! Transfer accounting: bytes and chunks sent and received, LAN (same IDC) or WAN (other
//! IDC), split by the kind of peer (a bridgehead of our IDC, an ordinary host of our IDC, a
//! peer of another IDC), per image, and how long each download took (its provision time).
//! Reported to the GIS in heartbeats and shown by `bids image status`; the engine decides
//! what to record.

use crate::gate::Link;
use bids_protocols::gis::{Counters, HostStats, ProvisionTime};
use bids_protocols::ImageId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Default, Debug, Clone)]
pub struct Accounting {
    total: Counters,
    images: BTreeMap<ImageId, Counters>,
    refusals: u64,
    provisions: BTreeMap<ImageId, ProvisionTime>,
    /// Images whose counters changed since [`Accounting::take_dirty`] last ran.
    dirty: BTreeSet<ImageId>,
}

/// Whom bytes moved to or from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A certified bridgehead of our own IDC.
    Bridgehead,
    /// An ordinary host of our own IDC.
    Host,
    /// A peer of another IDC (a bridgehead under BIDS; anyone under Baseline).
    Remote,
}

impl PeerKind {
    /// The kind of an accepted peer: its link, and whether it presented a certificate.
    pub fn of(link: Link, certified: bool) -> PeerKind {
        match (link, certified) {
            (Link::Wan, _) => PeerKind::Remote,
            (Link::Lan, true) => PeerKind::Bridgehead,
            (Link::Lan, false) => PeerKind::Host,
        }
    }
}

impl Accounting {
    /// Starts from per-image counters saved in the store, so a restart does not reset
    /// them; the node's total starts as their sum.
    pub fn restore(saved: impl IntoIterator<Item = (ImageId, Counters)>) -> Self {
        let mut a = Accounting::default();
        for (id, c) in saved {
            a.total.add(&c);
            a.images.insert(id, c);
        }
        a
    }

    /// The per-image counters changed since the last call, to be saved.
    pub fn take_dirty(&mut self) -> Vec<(ImageId, Counters)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|id| self.images.get(&id).map(|c| (id, *c)))
            .collect()
    }

    pub fn sent(&mut self, image: ImageId, to: PeerKind, bytes: u64) {
        self.dirty.insert(image);
        for c in [&mut self.total, self.images.entry(image).or_default()] {
            if to == PeerKind::Remote {
                c.wan_sent_bytes += bytes;
                c.wan_sent_chunks += 1;
            } else {
                c.lan_sent_bytes += bytes;
                c.lan_sent_chunks += 1;
                if to == PeerKind::Bridgehead {
                    c.bridgehead_sent_bytes += bytes;
                } else {
                    c.hosts_sent_bytes += bytes;
                }
            }
        }
    }

    pub fn received(&mut self, image: ImageId, from: PeerKind, bytes: u64) {
        self.dirty.insert(image);
        for c in [&mut self.total, self.images.entry(image).or_default()] {
            if from == PeerKind::Remote {
                c.wan_recv_bytes += bytes;
                c.wan_recv_chunks += 1;
            } else {
                c.lan_recv_bytes += bytes;
                c.lan_recv_chunks += 1;
                if from == PeerKind::Bridgehead {
                    c.bridgehead_recv_bytes += bytes;
                } else {
                    c.hosts_recv_bytes += bytes;
                }
            }
        }
    }

    pub fn bad_chunk(&mut self, image: ImageId) {
        self.total.bad_chunks += 1;
        self.dirty.insert(image);
        self.images.entry(image).or_default().bad_chunks += 1;
    }

    /// `elapsed` of downloading `image` while our IDC held a chunk we lacked, during which
    /// `lan_bytes` arrived over the LAN.
    pub fn lan_available(&mut self, image: ImageId, elapsed: Duration, lan_bytes: u64) {
        let ms = elapsed.as_millis() as u64;
        for c in [&mut self.total, self.images.entry(image).or_default()] {
            c.lan_available_ms += ms;
            c.lan_available_recv_bytes += lan_bytes;
        }
        self.dirty.insert(image);
    }

    /// A download of `image` completed and verified; a later download of it replaces this.
    pub fn provisioned(&mut self, image: ImageId, time: ProvisionTime) {
        self.provisions.insert(image, time);
    }

    pub fn provision(&self, image: &ImageId) -> Option<ProvisionTime> {
        self.provisions.get(image).copied()
    }

    pub fn refused(&mut self) {
        self.refusals += 1;
    }

    pub fn refusals(&self) -> u64 {
        self.refusals
    }

    pub fn image(&self, image: &ImageId) -> Counters {
        self.images.get(image).copied().unwrap_or_default()
    }

    pub fn total(&self) -> Counters {
        self.total
    }

    pub fn forget(&mut self, image: &ImageId) {
        self.images.remove(image);
        self.provisions.remove(image);
        self.dirty.remove(image);
    }

    pub fn snapshot(&self) -> HostStats {
        HostStats {
            total: self.total,
            images: self.images.clone(),
            refusals: self.refusals,
            settings: None,
            provisions: self.provisions.clone(),
            banned: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lan_and_wan_per_image() {
        let mut a = Accounting::default();
        let x = ImageId([1; 32]);
        let y = ImageId([2; 32]);
        a.received(x, PeerKind::of(Link::Wan, true), 100);
        a.received(x, PeerKind::of(Link::Lan, false), 50);
        a.received(x, PeerKind::of(Link::Lan, true), 20);
        a.sent(y, PeerKind::Host, 7);
        a.sent(y, PeerKind::Bridgehead, 3);
        a.refused();
        assert_eq!(a.image(&x).wan_recv_bytes, 100);
        assert_eq!(a.image(&x).lan_recv_chunks, 2);
        assert_eq!(a.image(&x).lan_recv_bytes, 70);
        assert_eq!(a.image(&x).hosts_recv_bytes, 50);
        assert_eq!(a.image(&x).bridgehead_recv_bytes, 20);
        assert_eq!(a.total().lan_sent_bytes, 10);
        assert_eq!(a.total().hosts_sent_bytes, 7);
        assert_eq!(a.total().bridgehead_sent_bytes, 3);
        assert_eq!(a.total().wan_sent_bytes, 0);
        assert_eq!(a.snapshot().refusals, 1);
    }

    #[test]
    fn changed_counters_are_taken_for_saving_and_restored() {
        let mut a = Accounting::default();
        let x = ImageId([1; 32]);
        let y = ImageId([2; 32]);
        a.received(x, PeerKind::Host, 100);
        a.sent(y, PeerKind::Remote, 7);
        let saved = a.take_dirty();
        assert_eq!(saved.len(), 2);
        assert!(a.take_dirty().is_empty(), "nothing changed since");
        a.forget(&y);
        a.bad_chunk(y);
        a.forget(&y);
        assert!(a.take_dirty().is_empty(), "a forgotten image is not saved");
        let b = Accounting::restore(saved);
        assert_eq!(b.image(&x).lan_recv_bytes, 100);
        assert_eq!(
            b.image(&x).hosts_recv_bytes,
            100,
            "kinds of peer are kept too"
        );
        assert_eq!(b.image(&y).wan_sent_chunks, 1);
        assert_eq!(b.total().lan_recv_bytes + b.total().wan_sent_bytes, 107);
    }

    #[test]
    fn provision_times_are_reported_until_the_image_goes() {
        let mut a = Accounting::default();
        let x = ImageId([1; 32]);
        let t = ProvisionTime {
            millis: 1234,
            completed_ms: 1_700_000_000_000,
        };
        a.provisioned(x, t);
        assert_eq!(a.snapshot().provisions.get(&x), Some(&t));
        assert_eq!(a.provision(&x), Some(t));
        a.forget(&x);
        assert!(a.snapshot().provisions.is_empty());
    }
}
