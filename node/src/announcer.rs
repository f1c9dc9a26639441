//! When a node tells its IDC (gossip) what it holds, sans-IO: chunks gained are batched
//! for `ANNOUNCE_BATCH`; the full have-state of the images in progress, and the images
//! completed in the last two minutes, is repeated every `ANNOUNCE_FULL` for peers that
//! joined late, and soon after a bridgehead of another IDC is accepted (it missed the
//! incremental ones). The caller passes the time, builds the announcements from its store
//! and publishes them.

use bids_protocols::{ChunkIndex, ImageId};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// New-chunk announcements are batched for this long.
pub const ANNOUNCE_BATCH: Duration = Duration::from_millis(100);
/// Full have-state of images in progress is re-announced this often (late joiners).
pub const ANNOUNCE_FULL: Duration = Duration::from_secs(2);
/// How soon after a bridgehead of another IDC is accepted the full announcements repeat.
pub const FULL_ANNOUNCE_AFTER_CONNECT: Duration = Duration::from_millis(100);
/// A completed image is announced complete in the full rounds for this long.
pub const COMPLETED_FOR: Duration = Duration::from_secs(120);

/// What is due at a tick.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Chunks gained since the last batch, per image (in image order).
    pub fresh: Vec<(ImageId, Vec<ChunkIndex>)>,
    /// A full round is due: announce the held chunks of every image in progress, and these
    /// images as complete.
    pub full: Option<Vec<ImageId>>,
}

/// The announcement schedule of one node.
#[derive(Debug)]
pub struct Announcer {
    fresh: BTreeMap<ImageId, Vec<ChunkIndex>>,
    last_batch: Instant,
    /// A chunk gained is awaited by the IDC: the batch goes out at the next tick.
    urgent: bool,
    last_full: Instant,
    completed: HashMap<ImageId, Instant>,
}

impl Announcer {
    pub fn new(now: Instant) -> Self {
        Announcer {
            fresh: BTreeMap::new(),
            last_batch: now,
            urgent: false,
            last_full: now,
            completed: HashMap::new(),
        }
    }

    /// Chunk `idx` of `image` was stored and verified.
    pub fn gained(&mut self, image: ImageId, idx: ChunkIndex) {
        self.fresh.entry(image).or_default().push(idx);
    }

    /// Chunk `idx` of `image` was stored, and the IDC's other hosts wait for it: our
    /// bridgehead relayed it to us alone (super-seeding), so until we announce it they have
    /// nowhere to take it from. It goes out at the next tick, with the batch so far.
    pub fn gained_awaited(&mut self, image: ImageId, idx: ChunkIndex) {
        self.gained(image, idx);
        self.urgent = true;
    }

    /// The chunks of `image` not announced yet (the download ended: the caller announces
    /// them with the completion, or drops them).
    pub fn take_fresh(&mut self, image: &ImageId) -> Vec<ChunkIndex> {
        self.fresh.remove(image).unwrap_or_default()
    }

    /// `image` completed at `now`: announced complete in the full rounds for a while.
    pub fn completed(&mut self, image: ImageId, now: Instant) {
        self.completed.insert(image, now);
    }

    /// `image` is no longer complete here (chunks found corrupt at rest).
    pub fn no_longer_complete(&mut self, image: &ImageId) {
        self.completed.remove(image);
    }

    /// A bridgehead of another IDC was accepted at `now`: the next full round comes within
    /// `FULL_ANNOUNCE_AFTER_CONNECT` (once gossip has swapped subscriptions).
    pub fn remote_joined(&mut self, now: Instant) {
        let soon = ANNOUNCE_FULL.saturating_sub(FULL_ANNOUNCE_AFTER_CONNECT);
        if let Some(at) = now.checked_sub(soon) {
            self.last_full = self.last_full.min(at);
        }
    }

    /// What is due at `now`.
    pub fn tick(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if self.urgent || now.duration_since(self.last_batch) >= ANNOUNCE_BATCH {
            self.last_batch = now;
            self.urgent = false;
            due.fresh = std::mem::take(&mut self.fresh)
                .into_iter()
                .filter(|(_, idx)| !idx.is_empty())
                .collect();
        }
        if now.duration_since(self.last_full) >= ANNOUNCE_FULL {
            self.last_full = now;
            self.completed
                .retain(|_, t| now.duration_since(*t) < COMPLETED_FOR);
            let mut done: Vec<ImageId> = self.completed.keys().copied().collect();
            done.sort_unstable();
            due.full = Some(done);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn gained_chunks_go_out_in_batches_and_full_rounds_repeat() {
        let t0 = Instant::now();
        let mut a = Announcer::new(t0);
        let (x, y) = (ImageId([1; 32]), ImageId([2; 32]));
        a.gained(y, 5);
        a.gained(x, 1);
        a.gained(x, 2);
        assert_eq!(a.tick(t0 + 50 * MS), Due::default());
        let due = a.tick(t0 + 100 * MS);
        assert_eq!(due.fresh, vec![(x, vec![1, 2]), (y, vec![5])]);
        assert_eq!(due.full, None);
        assert!(a.tick(t0 + 200 * MS).fresh.is_empty());
        a.completed(x, t0 + 300 * MS);
        assert_eq!(a.tick(t0 + 2000 * MS).full, Some(vec![x]));
        // Complete for two minutes, then no longer repeated.
        let late = t0 + 300 * MS + COMPLETED_FOR;
        assert_eq!(a.tick(late).full, Some(vec![]));
    }

    #[test]
    fn an_awaited_chunk_goes_out_at_the_next_tick_with_the_batch() {
        let t0 = Instant::now();
        let mut a = Announcer::new(t0);
        let x = ImageId([1; 32]);
        a.gained(x, 1);
        assert_eq!(a.tick(t0 + 10 * MS), Due::default());
        a.gained_awaited(x, 7);
        assert_eq!(a.tick(t0 + 20 * MS).fresh, vec![(x, vec![1, 7])]);
        // Then batching as before, from that tick.
        a.gained(x, 2);
        assert_eq!(a.tick(t0 + 100 * MS), Due::default());
        assert_eq!(a.tick(t0 + 120 * MS).fresh, vec![(x, vec![2])]);
    }

    #[test]
    fn a_remote_bridgehead_brings_the_full_round_forward() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut a = Announcer::new(t0);
        a.remote_joined(t0 + 500 * MS);
        assert_eq!(a.tick(t0 + 590 * MS).full, None);
        assert!(a.tick(t0 + 600 * MS).full.is_some());
    }

    #[test]
    fn an_ended_download_takes_its_unannounced_chunks_along() {
        let t0 = Instant::now();
        let mut a = Announcer::new(t0);
        let x = ImageId([1; 32]);
        a.gained(x, 7);
        assert_eq!(a.take_fresh(&x), vec![7]);
        assert!(a.tick(t0 + 100 * MS).fresh.is_empty());
    }
}
