//! Download scheduler (sans-IO): for one image, decides which chunk to request from which
//! peer, tracks requests in flight, retries, penalties and bans. It owns no socket, clock or
//! store: the swarm driver sends the requests it returns, verifies and stores chunks, and
//! reports results and the current time (`now: Instant`) back.
//!
//! # Strategy
//!
//! **Sources.** Ordinary LAN peers ([`SourceKind::Lan`]) serve only the chunks they are known
//! to hold (from the GIS list and gossip have-announcements). Bridgeheads, local
//! ([`SourceKind::LocalBridgehead`]) or remote ([`SourceKind::RemoteBridgehead`], over the
//! WAN), are assumed to provide every chunk: a bridgehead that lacks one pulls it and answers
//! later, so their requests are *deferred* and get the long `deferred_timeout`.
//!
//! **Piece selection** is rarest-first over LAN availability (how many usable LAN peers hold
//! each chunk), ties broken by a per-download random permutation drawn from the seed, so
//! hosts of one IDC pull different chunks and can trade them; availability is told apart up to
//! 8 holders (more count as equally common). Priority hints (chunks a local waiter needs) go
//! first, in the order they were given. The wanted chunks are kept as one bitset per
//! availability level, so a call costs O(chunks / 64) word operations plus the requests it
//! makes (and at most `ANNOUNCED_SCAN` designated-taker checks), and a call with every slot
//! busy returns at once.
//!
//! **Peer choice**, per chunk, in this order:
//! 1. a chunk some LAN peer holds goes to the least-loaded such LAN peer with a free slot;
//! 2. a chunk no LAN peer holds goes to the local bridgehead (first those it announced and
//!    this host is the designated taker of among its LAN peers: it answers them at once, so
//!    hosts keep pace with its pull), else to the least-loaded remote bridgehead (rotating
//!    among equals, so different chunks go to different remote bridgeheads and they work in
//!    parallel); bridgeheads of IDCs that are themselves fetching are asked only for chunks
//!    they announced, at most `max_inflight_fetching` requests to all of them together;
//! 3. when every LAN holder is saturated, the local bridgehead takes LAN-available chunks only
//!    while it has fewer than `bridgehead_spill` requests in flight: its upload relays every
//!    chunk into the IDC, so hosts should mostly serve each other.
//!
//! **WAN once.** A chunk is requested over the WAN only when no usable LAN peer holds it and no
//! request for it is in flight anywhere; it is never duplicated over the WAN (not even in
//! endgame) and is re-requested over the WAN only after the previous request really failed
//! (failure report, timeout, or removal/ban/drop of its peer).
//!
//! **Failures.** `NotHeld` clears the LAN peer's availability bit (a bridgehead is retried for
//! that chunk after `retry_backoff`); `Corrupt` is counted against the peer, which is banned
//! after `max_failures_before_ban` of them; `Timeout`/`Disconnected` re-request elsewhere (the
//! peer cools down for `retry_backoff` and that chunk avoids it for as long); `Busy` cools the
//! peer down exponentially; `Refused`/`UnknownImage` drop the peer from this download until a
//! fresh [`Download::add_peer`]. Banning, dropping and removing a peer make its in-flight
//! requests re-requestable at once.
//!
//! **Endgame** (LAN only): once every missing chunk is in flight, spare LAN slots duplicate
//! in-flight chunks to other LAN peers holding them (at most `endgame_copies` requests per
//! chunk); [`Download::on_chunk`] returns `false` for the late copies.

use bids_protocols::chunk::ChunkResponse;
use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Chunks the local bridgehead announced that one scheduling pass looks at, at most, for the
/// ones this host is the designated taker of.
const ANNOUNCED_SCAN: usize = 256;
/// Endgame copies a LAN request only once it has waited at least this long (and four times
/// the smoothed LAN latency).
const ENDGAME_MIN_WAIT: Duration = Duration::from_millis(200);
/// LAN availability is tracked exactly up to this many holders; chunks held by more count as
/// equally common (rarest-first only matters among the rare ones).
const MAX_RARITY: u32 = 8;

/// Where a source sits relative to the downloading node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// An ordinary host of the same IDC: serves only what it holds.
    Lan,
    /// The bridgehead (level 1) of our IDC: provides every chunk, deferred if it must pull it.
    LocalBridgehead,
    /// A bridgehead of another IDC (level 2), reached over the WAN: provides every chunk.
    RemoteBridgehead,
}

impl SourceKind {
    /// Bridgeheads are assumed to provide every chunk (they pull what they lack).
    pub fn is_bridgehead(self) -> bool {
        !matches!(self, SourceKind::Lan)
    }
    /// Requests to this source cross the WAN into our IDC.
    pub fn is_wan(self) -> bool {
        matches!(self, SourceKind::RemoteBridgehead)
    }
}

/// Default of [`SchedulerConfig::wan_window`].
pub const DEFAULT_WAN_WINDOW: Duration = Duration::from_millis(300);
/// Fewest requests kept in flight over the WAN (one arriving, one on its way).
pub const WAN_WINDOW_MIN: usize = 2;
/// The span over which the WAN arrival rate is measured.
const WAN_RATE_SPAN: Duration = Duration::from_secs(1);

/// Tuning of one download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests in flight to one LAN peer.
    pub max_inflight_lan: usize,
    /// Requests in flight to the local bridgehead (deferred ones included).
    pub max_inflight_bridgehead: usize,
    /// Requests in flight to one remote bridgehead.
    pub max_inflight_wan: usize,
    /// Requests in flight to the bridgeheads of IDCs that are themselves fetching, all
    /// together. Each such bridgehead writes a few chunks to other IDCs at a time
    /// ([`crate::uploads::WAN_SENDING`], 4), so a chunk from it comes at about a quarter of
    /// its uplink; six keep our WAN link full from several of them. More share our link
    /// among more of their write slots, which then carry chunks more slowly than they
    /// could to an IDC with room (`bids sim`, 30 IDCs of 2 hosts, 1 GiB in 4 MiB chunks,
    /// 3 seeds: last host 1.35-1.40 x S/B_wan with no total limit (8 to each), 1.28-1.31
    /// with 6, 1.29-1.33 with 8, 1.40-1.41 with 4).
    pub max_inflight_fetching: usize,
    /// Requests in flight over the WAN to bridgeheads that supply every chunk (IDCs that
    /// hold the image), all together: enough to keep the WAN busy for this long at the rate
    /// chunks have been arriving over it (at least [`WAN_WINDOW_MIN`]). Every chunk in
    /// flight shares the WAN link, so each extra one delays them all: with the whole image
    /// in flight at once, the first chunk lands when nearly everything does, and the IDC's
    /// hosts have nothing to trade until then. Zero: no limit beyond `max_inflight_wan` per
    /// peer.
    ///
    /// Requests to bridgeheads of IDCs that are themselves fetching are not counted: those
    /// are asked only for chunks they announced, and each serves many IDCs from an uplink
    /// that queues them, so a window sized by our arrival rate kept too few in flight to
    /// fill our link from them (`bids sim`, 30 IDCs: last host 2.9 x the bound with them
    /// counted, 1.4 x without).
    pub wan_window: Duration,
    /// A LAN request unanswered this long counts as failed (`Timeout`).
    pub request_timeout: Duration,
    /// A bridgehead request (local or remote, possibly deferred) unanswered this long fails.
    pub deferred_timeout: Duration,
    /// Duplicate in-flight chunks to spare LAN peers once every missing chunk is in flight.
    pub endgame: bool,
    /// Corrupt chunks after which a peer is banned from this download (at least 1).
    pub max_failures_before_ban: u32,
    /// The local bridgehead takes chunks that LAN peers hold only while it has fewer than
    /// this many requests in flight (its upload is kept for chunks nobody else has).
    pub bridgehead_spill: usize,
    /// During endgame, at most this many requests in flight for one chunk.
    pub endgame_copies: usize,
    /// First cool-down after `Busy`; doubles with each consecutive `Busy` up to `max_backoff`.
    pub busy_backoff: Duration,
    /// After `NotHeld` (bridgehead), `Timeout` or `Disconnected`, the same peer is not asked
    /// the same chunk again for this long (after `Corrupt`, for `max_backoff`); after
    /// `Timeout`/`Disconnected` the whole peer also cools down for this long.
    pub retry_backoff: Duration,
    /// Cap of every cool-down.
    pub max_backoff: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_inflight_lan: 8,
            max_inflight_bridgehead: 16,
            max_inflight_wan: 8,
            max_inflight_fetching: 6,
            wan_window: DEFAULT_WAN_WINDOW,
            request_timeout: Duration::from_secs(30),
            deferred_timeout: Duration::from_secs(120),
            endgame: true,
            max_failures_before_ban: 3,
            bridgehead_spill: 2,
            endgame_copies: 2,
            busy_backoff: Duration::from_millis(200),
            retry_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl SchedulerConfig {
    /// Requests in flight allowed to one peer of this kind.
    pub fn limit(&self, kind: SourceKind) -> usize {
        match kind {
            SourceKind::Lan => self.max_inflight_lan,
            SourceKind::LocalBridgehead => self.max_inflight_bridgehead,
            SourceKind::RemoteBridgehead => self.max_inflight_wan,
        }
    }
    /// How long a request to a peer of this kind may stay unanswered.
    pub fn timeout(&self, kind: SourceKind) -> Duration {
        match kind {
            SourceKind::Lan => self.request_timeout,
            SourceKind::LocalBridgehead | SourceKind::RemoteBridgehead => self.deferred_timeout,
        }
    }
}

/// Why a chunk request failed, as reported by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The peer does not hold that chunk.
    NotHeld,
    /// The chunk failed verification (SHA-256 or payload decoding).
    Corrupt,
    /// No answer in time.
    Timeout,
    /// The peer refused to serve us (IDC rule, sharing off, …).
    Refused,
    /// The peer has too many requests from us in flight.
    Busy,
    /// The connection closed before the answer came.
    Disconnected,
    /// The peer does not know the image (or disagrees about its chunk count).
    UnknownImage,
}

impl Failure {
    /// The failure a non-data chunk response reports; `None` for data, which the driver must
    /// verify (a bad payload is [`Failure::Corrupt`]).
    pub fn from_response(resp: &ChunkResponse) -> Option<Failure> {
        match resp {
            ChunkResponse::Data { .. } => None,
            ChunkResponse::NotHeld => Some(Failure::NotHeld),
            // A peer that places our index past the end has another manifest in mind.
            ChunkResponse::UnknownImage | ChunkResponse::BadIndex => Some(Failure::UnknownImage),
            ChunkResponse::Refused(_) => Some(Failure::Refused),
            ChunkResponse::Busy => Some(Failure::Busy),
        }
    }
}

/// A fixed-size bit set with a count of ones.
#[derive(Clone, Debug)]
struct Bits {
    words: Vec<u64>,
    len: u32,
    ones: u32,
}

impl Bits {
    fn new(n: u32) -> Self {
        Bits {
            words: vec![0; (n as usize).div_ceil(64)],
            len: n,
            ones: 0,
        }
    }
    fn get(&self, i: u32) -> bool {
        i < self.len
            && self
                .words
                .get(i as usize / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Sets bit `i`; true when it was clear.
    fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        match self.words.get_mut(i as usize / 64) {
            Some(w) if *w & (1 << (i % 64)) == 0 => {
                *w |= 1 << (i % 64);
                self.ones += 1;
                true
            }
            _ => false,
        }
    }
    /// Clears bit `i`; true when it was set.
    fn clear(&mut self, i: u32) -> bool {
        match self.words.get_mut(i as usize / 64) {
            Some(w) if *w & (1 << (i % 64)) != 0 => {
                *w &= !(1 << (i % 64));
                self.ones -= 1;
                true
            }
            _ => false,
        }
    }
    fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }
}

/// What the scheduler knows about one source.
#[derive(Clone, Debug)]
struct Peer {
    id: PeerId,
    kind: SourceKind,
    /// Known and reachable as far as we know (false after `remove_peer`).
    present: bool,
    /// Refused us or does not know the image: not asked again until a fresh `add_peer`.
    dropped: bool,
    /// Sent too many corrupt chunks: never asked again by this download.
    banned: bool,
    /// A remote bridgehead that is itself still fetching: it supplies only the chunks it
    /// announced (`have`), not everything.
    partial: bool,
    /// Chunks it holds, by position in `order` (meaningful for LAN peers; bridgeheads
    /// provide everything anyway).
    have: Bits,
    inflight: usize,
    corrupt: u32,
    failures: u32,
    /// Consecutive `Busy` answers, for the exponential cool-down.
    busy_streak: u32,
    cooldown_until: Option<Instant>,
}

impl Peer {
    fn usable(&self) -> bool {
        self.present && !self.dropped && !self.banned
    }
    /// Counted in the LAN availability of the chunks it holds.
    fn counts_for_lan(&self) -> bool {
        self.usable() && self.kind == SourceKind::Lan
    }
}

#[derive(Clone, Copy, Debug)]
struct Request {
    sent: Instant,
    deadline: Instant,
    /// Sent to a WAN source (decided at send time, even if the peer's kind changes later).
    wan: bool,
    /// Counted in the WAN window (`SchedulerConfig::wan_window`).
    windowed: bool,
}

/// Peers with a free request slot during one `next_requests` call, by kind.
#[derive(Default)]
struct Free {
    lan: Vec<usize>,
    bridgehead: Vec<usize>,
    wan: Vec<usize>,
    /// WAN requests this pass may still make (`SchedulerConfig::wan_window`).
    wan_budget: usize,
    /// Requests to fetching bridgeheads this pass may still make
    /// (`SchedulerConfig::max_inflight_fetching`).
    partial_budget: usize,
}

impl Free {
    fn is_empty(&self) -> bool {
        self.lan.is_empty() && self.bridgehead.is_empty() && self.wan.is_empty()
    }
    fn list(&mut self, kind: SourceKind) -> &mut Vec<usize> {
        match kind {
            SourceKind::Lan => &mut self.lan,
            SourceKind::LocalBridgehead => &mut self.bridgehead,
            SourceKind::RemoteBridgehead => &mut self.wan,
        }
    }
}

/// The download of one image by one node: see the module documentation for the strategy.
#[derive(Debug)]
pub struct Download {
    cfg: SchedulerConfig,
    chunk_count: u32,
    held: Vec<bool>,
    held_count: u32,
    /// Chunks that arrived and are being verified and stored ([`Download::on_arrived`]):
    /// neither wanted nor in flight, until `on_chunk` or a `Corrupt` failure settles them.
    verifying: Vec<bool>,
    /// How many `verifying` flags are set (asked on every pump, so not counted each time).
    verifying_count: usize,
    /// Random permutation of the chunk indexes: the tie-break among equally rare chunks.
    order: Vec<u32>,
    /// Position of each chunk in `order`.
    pos_of: Vec<u32>,
    /// The *wanted* chunks (missing, no request in flight) by LAN availability level
    /// (`min(lan_avail, MAX_RARITY)`), as bitsets over positions in `order`. A scheduling pass
    /// ANDs them word by word with what free peers hold, so it costs O(chunks / 64) plus the
    /// requests it makes, however many chunks nobody free can serve.
    levels: Vec<Bits>,
    /// Usable LAN peers holding each chunk.
    lan_avail: Vec<u32>,
    /// Requests in flight per chunk, and how many of them cross the WAN (0 or 1).
    req_count: Vec<u16>,
    wan_count: Vec<u8>,
    /// Priority hints not yet held, in the order given (`prio` flags membership).
    prio: Vec<bool>,
    prio_queue: VecDeque<u32>,
    peers: Vec<Peer>,
    slots: HashMap<PeerId, usize>,
    /// In-flight requests keyed by (peer slot, chunk); ordered so iteration is deterministic.
    requests: BTreeMap<(usize, u32), Request>,
    /// (peer slot, chunk) pairs not to be asked again before the given time.
    pair_backoff: BTreeMap<(usize, u32), Instant>,
    /// Rotating start for least-loaded ties, so equal peers take turns.
    rotation: usize,
    last_progress: Option<Instant>,
    /// Our own identity, for splitting the origin's chunks among fetching bridgeheads.
    me: Option<PeerId>,
    /// When the download started (before the first chunk, progress is measured from here).
    started: Option<Instant>,
    /// Smoothed time from a LAN request to its data (endgame copies only requests that have
    /// waited several times this long).
    lan_latency: Option<Duration>,
    /// When chunks arrived from remote bridgeheads over the last `WAN_RATE_SPAN`.
    wan_arrivals: VecDeque<Instant>,
}

impl Download {
    /// A download of `chunk_count` chunks, of which those with `held(idx)` are already held.
    /// `seed` makes piece order and tie-breaks reproducible.
    pub fn new(
        chunk_count: u32,
        held: impl Fn(u32) -> bool,
        cfg: SchedulerConfig,
        seed: u64,
    ) -> Self {
        let n = chunk_count as usize;
        let held: Vec<bool> = (0..chunk_count).map(held).collect();
        let held_count = held.iter().filter(|h| **h).count() as u32;
        let mut order: Vec<u32> = (0..chunk_count).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        let mut pos_of = vec![0; n];
        let mut levels = vec![Bits::new(chunk_count); MAX_RARITY as usize + 1];
        for (pos, &idx) in order.iter().enumerate() {
            pos_of[idx as usize] = pos as u32;
            if !held[idx as usize] {
                // Nobody is known to hold anything yet: level 0.
                levels[0].set(pos as u32);
            }
        }
        Download {
            cfg,
            chunk_count,
            held,
            held_count,
            verifying: vec![false; n],
            verifying_count: 0,
            order,
            pos_of,
            levels,
            lan_avail: vec![0; n],
            req_count: vec![0; n],
            wan_count: vec![0; n],
            prio: vec![false; n],
            prio_queue: VecDeque::new(),
            peers: Vec::new(),
            slots: HashMap::new(),
            requests: BTreeMap::new(),
            pair_backoff: BTreeMap::new(),
            rotation: 0,
            last_progress: None,
            me: None,
            started: None,
            lan_latency: None,
            wan_arrivals: VecDeque::new(),
        }
    }

    /// WAN requests to keep in flight now (`SchedulerConfig::wan_window`): the chunks that
    /// arrived over the WAN in the last second, scaled to the window, plus one; at least
    /// `WAN_WINDOW_MIN`. It grows as the WAN delivers (each pass may use it all), so a fast
    /// link fills up within a few round trips, and it never holds more than the link drains
    /// in about the window.
    pub fn wan_window(&mut self, now: Instant) -> usize {
        if self.cfg.wan_window.is_zero() {
            return usize::MAX;
        }
        while self
            .wan_arrivals
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > WAN_RATE_SPAN)
        {
            self.wan_arrivals.pop_front();
        }
        // Arrivals per span, scaled to the window, rounded up (integers: no float edges).
        let span = WAN_RATE_SPAN.as_millis().max(1);
        let scaled =
            (self.wan_arrivals.len() as u128 * self.cfg.wan_window.as_millis()).div_ceil(span);
        (scaled as usize + 1).max(WAN_WINDOW_MIN)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// Adds a source, or refreshes one: it becomes present again and a dropped peer is
    /// re-admitted (a banned one stays banned). `complete` marks every chunk held; a partial
    /// listing keeps what announcements told. A bridgehead kind is not demoted by a later
    /// `Lan` listing (the GIS may list the bridgehead at level 0 too); `remove_peer` first to
    /// demote one.
    pub fn add_peer(&mut self, peer: PeerId, kind: SourceKind, complete: bool) {
        let slot = self.slot_or_insert(peer, kind);
        self.update_peer(slot, |p| {
            // A removed peer comes back as whatever it is listed as now.
            if !(p.present && kind == SourceKind::Lan && p.kind.is_bridgehead()) {
                p.kind = kind;
            }
            if kind == SourceKind::RemoteBridgehead {
                p.partial = false;
            }
            p.present = true;
            p.dropped = false;
        });
        if complete {
            self.set_have_range(slot, 0, self.chunk_count);
        }
    }

    /// Tells the scheduler who we are. With fetching bridgeheads present, each chunk the IDCs
    /// lack has one designated fetcher among them (rendezvous hashing on (peer, chunk)): only
    /// that bridgehead pulls it from the origin, the others take it from the fetcher once it
    /// is announced. So the origin's uplink carries each chunk about once.
    pub fn set_identity(&mut self, me: PeerId) {
        self.me = Some(me);
    }

    /// Whether we should pull chunk `idx` from a bridgehead that supplies everything (the
    /// origin). True unless another fetching bridgehead is designated for it and the
    /// download is still making progress.
    fn origin_share(&self, idx: u32, now: Instant) -> bool {
        let Some(me) = self.me else { return true };
        let since = self.last_progress.or(self.started);
        if since.is_some_and(|t| now.saturating_duration_since(t) > SHARE_PATIENCE) {
            // Nothing arrived for a while: a designated fetcher may be stuck; take it ourselves.
            return true;
        }
        self.designated(me, idx, |p| p.partial && p.usable())
    }

    /// Whether we are the designated taker of chunk `idx` from the local bridgehead among the
    /// usable LAN peers we know (rendezvous hashing, as for the origin's chunks).
    fn lan_share(&self, idx: u32) -> bool {
        let Some(me) = self.me else { return true };
        self.designated(me, idx, Peer::counts_for_lan)
    }

    /// Whether `me` wins the rendezvous hash of chunk `idx` against every peer `rival` picks.
    fn designated(&self, me: PeerId, idx: u32, rival: impl Fn(&Peer) -> bool) -> bool {
        let mine = share_score(&me, idx);
        !self
            .peers
            .iter()
            .any(|p| rival(p) && share_score(&p.id, idx) > mine)
    }

    /// Adds a remote bridgehead of an IDC that is itself still fetching the image: it is
    /// asked only for chunks it announced (`peer_has`), and preferred for them over the
    /// origin's bridgehead, so the origin's WAN uplink carries each chunk about once while
    /// the fetching IDCs trade the rest among themselves.
    pub fn add_fetching_bridgehead(&mut self, peer: PeerId) {
        let slot = self.slot_or_insert(peer, SourceKind::RemoteBridgehead);
        self.update_peer(slot, |p| {
            p.kind = SourceKind::RemoteBridgehead;
            p.partial = true;
            p.present = true;
            p.dropped = false;
        });
    }

    /// The peer announced it gained these chunks (half-open ranges, clamped to the image).
    /// An unknown peer is remembered as a LAN peer; a removed one is present again (it is
    /// evidently alive).
    pub fn peer_has(&mut self, peer: &PeerId, ranges: &[(u32, u32)]) {
        let slot = self.slot_or_insert(*peer, SourceKind::Lan);
        self.update_peer(slot, |p| p.present = true);
        for &(start, end) in ranges {
            self.set_have_range(slot, start, end.min(self.chunk_count));
        }
    }

    /// The peer now holds the whole image.
    pub fn peer_complete(&mut self, peer: &PeerId) {
        self.peer_has(peer, &[(0, self.chunk_count)]);
        if let Some(&slot) = self.slots.get(peer) {
            self.update_peer(slot, |p| p.partial = false);
        }
    }

    /// The peer no longer holds these chunks (it found them corrupt at rest): a LAN peer is
    /// not asked for them again until it announces them (a bridgehead supplies every chunk
    /// anyway, pulling what it lacks).
    pub fn peer_lost(&mut self, peer: &PeerId, ranges: &[(u32, u32)]) {
        let Some(&slot) = self.slots.get(peer) else {
            return;
        };
        for &(start, end) in ranges {
            for idx in start..end.min(self.chunk_count) {
                self.clear_have(slot, idx);
            }
        }
    }

    /// A chunk we held is missing again (found corrupt at rest): wanted once more.
    pub fn unmark_held(&mut self, idx: u32) {
        let i = idx as usize;
        if i < self.held.len() && self.held[i] {
            self.held[i] = false;
            self.held_count -= 1;
            self.refresh_wanted(idx);
        }
    }

    /// Forgets a source (disconnected, gone from the host list). Its in-flight requests become
    /// re-requestable; its penalties and ban are kept.
    pub fn remove_peer(&mut self, peer: &PeerId) {
        let Some(&slot) = self.slots.get(peer) else {
            return;
        };
        self.release(slot);
        self.update_peer(slot, |p| {
            p.present = false;
            p.cooldown_until = None;
            p.busy_streak = 0;
        });
        // What it held is re-learned from the GIS or its announcements if it comes back.
        self.peers[slot].have = Bits::new(self.chunk_count);
    }

    /// Hint: a local waiter needs this chunk, fetch it before the others.
    pub fn prioritize(&mut self, idx: u32) {
        let i = idx as usize;
        if i < self.held.len() && !self.held[i] && !self.prio[i] {
            self.prio[i] = true;
            self.prio_queue.push_back(idx);
        }
    }

    /// Some usable LAN peer (same IDC, not a bridgehead) holds chunk `idx`: we can get it
    /// without crossing the WAN. A bridgehead defers a remote bridgehead's request only then,
    /// so two IDCs that both fetch an image never wait on each other.
    pub fn lan_available(&self, idx: u32) -> bool {
        self.lan_avail.get(idx as usize).is_some_and(|&n| n > 0)
    }

    /// The requests to send now, each marked in flight with its send time.
    pub fn next_requests(&mut self, now: Instant) -> Vec<(PeerId, u32)> {
        self.started.get_or_insert(now);
        let mut out = Vec::new();
        if self.is_complete() {
            return out;
        }
        // WAN requests in flight: to whole-image holders (windowed), to fetching bridgeheads.
        let (wan_inflight, partial_inflight) =
            self.requests
                .values()
                .fold((0, 0), |(w, p), r| match (r.wan, r.windowed) {
                    (_, true) => (w + 1, p),
                    (true, false) => (w, p + 1),
                    (false, false) => (w, p),
                });
        let mut free = Free {
            wan_budget: self.wan_window(now).saturating_sub(wan_inflight),
            partial_budget: self
                .cfg
                .max_inflight_fetching
                .saturating_sub(partial_inflight),
            ..Free::default()
        };
        for (slot, p) in self.peers.iter_mut().enumerate() {
            if let Some(until) = p.cooldown_until {
                if until > now {
                    continue;
                }
                p.cooldown_until = None;
            }
            if !p.usable() || p.inflight >= self.cfg.limit(p.kind) {
                continue;
            }
            // A LAN peer known to hold nothing cannot serve anything.
            if p.kind == SourceKind::Lan && p.have.ones == 0 {
                continue;
            }
            free.list(p.kind).push(slot);
        }
        if free.wan_budget == 0 {
            self.close_window(&mut free);
        }
        if free.partial_budget == 0 {
            self.close_fetching(&mut free);
        }
        if free.is_empty() {
            return out;
        }

        // 1. Priority hints, oldest first.
        let held = &self.held;
        self.prio_queue.retain(|&i| !held[i as usize]);
        let mut k = 0;
        while k < self.prio_queue.len() && !free.is_empty() {
            let idx = self.prio_queue[k];
            if self.is_wanted(idx as usize) {
                self.assign_fresh(idx, now, &mut free, &mut out);
            }
            k += 1;
        }

        // 2. Rarest level first, to LAN peers only; within a level, random order. Candidates
        //    are the wanted chunks some free LAN peer holds (`cover`).
        if !free.lan.is_empty() && self.levels[1..].iter().any(|b| b.ones > 0) {
            let mut cover = self.have_union(&free.lan);
            'lan: for level in 1..=MAX_RARITY as usize {
                let mut from = 0;
                while let Some(pos) = self.next_wanted(level, from, Some(&cover)) {
                    from = pos + 1;
                    let idx = self.order[pos as usize];
                    if let Some(at) = self.pick(&free.lan, idx, now, true) {
                        let before = free.lan.len();
                        self.assign(free.lan[at], idx, now, &mut free, &mut out);
                        if free.lan.len() < before {
                            if free.lan.is_empty() {
                                break 'lan;
                            }
                            // A peer filled up: its chunks are no longer candidates.
                            cover = self.have_union(&free.lan);
                        }
                    }
                }
            }
        }

        // 3. Chunks no LAN peer holds: first those the local bridgehead announced and this
        //    host is the designated taker of among the LAN peers it knows (the bridgehead
        //    answers them at once, so hosts keep pace with its pull instead of waiting on
        //    chunks it has yet to get, and each fresh chunk leaves it about once: the others
        //    take it from the taker); then any, deferred at the local bridgehead, else the
        //    WAN.
        if !free.bridgehead.is_empty() && self.levels[0].ones > 0 {
            let cover = self.have_union(&free.bridgehead);
            let mut from = 0;
            // Each candidate costs a hash per LAN peer: look at a bounded number per call
            // (in random order, so about one in as many as the IDC's hosts is ours).
            let mut budget = ANNOUNCED_SCAN;
            while !free.bridgehead.is_empty() && budget > 0 {
                let Some(pos) = self.next_wanted(0, from, Some(&cover)) else {
                    break;
                };
                from = pos + 1;
                budget -= 1;
                let idx = self.order[pos as usize];
                if !self.lan_share(idx) {
                    continue;
                }
                if let Some(at) = self.pick(&free.bridgehead, idx, now, true) {
                    self.assign(free.bridgehead[at], idx, now, &mut free, &mut out);
                }
            }
        }
        let mut from = 0;
        while !(free.bridgehead.is_empty() && free.wan.is_empty()) {
            let Some(pos) = self.next_wanted(0, from, None) else {
                break;
            };
            from = pos + 1;
            self.assign_unavailable(self.order[pos as usize], now, &mut free, &mut out);
        }

        // 4. LAN holders saturated: a little help from the local bridgehead.
        'spill: for level in 1..=MAX_RARITY as usize {
            let mut from = 0;
            while self.spill_possible(&free) {
                let Some(pos) = self.next_wanted(level, from, None) else {
                    continue 'spill;
                };
                from = pos + 1;
                self.assign_spill(self.order[pos as usize], now, &mut free, &mut out);
            }
            break;
        }

        // 5. Endgame: everything missing is in flight, and to LAN peers (a chunk a bridgehead
        //    still has to pull is not late: copying LAN requests then only wastes the LAN);
        //    spare LAN slots duplicate the requests that have waited several times the usual
        //    LAN latency (a request just sent deserves its chance).
        if self.cfg.endgame
            && self.wanted_count() == 0
            && !free.lan.is_empty()
            && !self
                .requests
                .keys()
                .any(|&(slot, _)| self.peers[slot].kind.is_bridgehead())
        {
            let patience = self
                .lan_latency
                .map_or(ENDGAME_MIN_WAIT, |l| (l * 4).max(ENDGAME_MIN_WAIT));
            let mut chunks: Vec<u32> = self
                .requests
                .iter()
                .filter(|(_, r)| now.saturating_duration_since(r.sent) >= patience)
                .map(|(&(_, idx), _)| idx)
                .filter(|&idx| !self.held[idx as usize])
                .collect();
            // Random order again, and one entry per chunk.
            chunks.sort_unstable_by_key(|&idx| self.pos_of[idx as usize]);
            chunks.dedup();
            for idx in chunks {
                if free.lan.is_empty() {
                    break;
                }
                if (self.req_count[idx as usize] as usize) < self.cfg.endgame_copies {
                    if let Some(pos) = self.pick(&free.lan, idx, now, true) {
                        self.assign(free.lan[pos], idx, now, &mut free, &mut out);
                    }
                }
            }
        }
        out
    }

    /// A chunk's data arrived from `peer` and goes to verification and storage: the request
    /// no longer occupies the peer's slot (the network pipeline refills while the CPU
    /// hashes and writes), and the chunk is not asked of anyone else meanwhile. Settle it
    /// with [`Download::on_chunk`], or with [`Download::on_failure`] (`Corrupt`), which
    /// makes it wanted again.
    pub fn on_arrived(&mut self, peer: &PeerId, idx: u32, now: Instant) {
        if idx >= self.chunk_count || self.held[idx as usize] {
            return;
        }
        if let Some(&slot) = self.slots.get(peer) {
            if let Some(req) = self.finish_request(slot, idx) {
                self.peers[slot].busy_streak = 0;
                if req.wan {
                    self.wan_arrivals.push_back(now);
                }
                if self.peers[slot].kind == SourceKind::Lan {
                    let took = now.saturating_duration_since(req.sent);
                    self.lan_latency = Some(match self.lan_latency {
                        Some(l) => (l * 7 + took) / 8,
                        None => took,
                    });
                }
            }
        }
        self.set_verifying(idx, true);
        self.refresh_wanted(idx);
    }

    /// Some host or bridgehead of our IDC holds a chunk we lack: a LAN peer holds a wanted
    /// chunk, a LAN request is in flight, or the local bridgehead announced a chunk we still
    /// want or have asked it for. (The time this holds is what a host's LAN download rate is
    /// judged against: it could have been downloading over the LAN.)
    pub fn idc_holds_missing(&self) -> bool {
        if self.levels[1..].iter().any(|b| b.ones > 0) {
            return true;
        }
        let in_flight = self.requests.keys().any(|&(slot, idx)| {
            let p = &self.peers[slot];
            match p.kind {
                SourceKind::Lan => true,
                SourceKind::LocalBridgehead => p.have.get(self.pos_of[idx as usize]),
                SourceKind::RemoteBridgehead => false,
            }
        });
        if in_flight {
            return true;
        }
        let bridgeheads: Vec<usize> = (0..self.peers.len())
            .filter(|&s| {
                self.peers[s].usable() && self.peers[s].kind == SourceKind::LocalBridgehead
            })
            .collect();
        !bridgeheads.is_empty()
            && self
                .next_wanted(0, 0, Some(&self.have_union(&bridgeheads)))
                .is_some()
    }

    /// Chunks between [`Download::on_arrived`] and their settlement.
    pub fn verifying(&self) -> usize {
        self.verifying_count
    }

    /// Chunk `idx` arrived and is not settled yet (being verified and stored).
    pub fn is_verifying(&self, idx: u32) -> bool {
        self.verifying.get(idx as usize).copied().unwrap_or(false)
    }

    fn set_verifying(&mut self, idx: u32, on: bool) {
        let v = &mut self.verifying[idx as usize];
        if *v != on {
            *v = on;
            if on {
                self.verifying_count += 1;
            } else {
                self.verifying_count -= 1;
            }
        }
    }

    /// A verified chunk arrived (the driver checked its SHA-256 and stored it). Returns whether
    /// it was new (`false` for a duplicate, e.g. a late endgame copy).
    pub fn on_chunk(&mut self, peer: &PeerId, idx: u32, now: Instant) -> bool {
        if idx >= self.chunk_count {
            return false;
        }
        self.set_verifying(idx, false);
        if let Some(&slot) = self.slots.get(peer) {
            if self.finish_request(slot, idx).is_some() {
                self.peers[slot].busy_streak = 0;
            }
            // It served the chunk, so it holds it.
            if self.peers[slot].kind == SourceKind::Lan {
                self.set_have(slot, idx);
            }
        }
        let new = self.set_held(idx);
        if new {
            self.last_progress = Some(now);
        }
        new
    }

    /// A request failed; see the module documentation for what each failure does. Reports for
    /// requests no longer in flight (expired, peer removed) still carry their evidence
    /// (corrupt data, not held, refusal, busy) but are not counted twice.
    pub fn on_failure(&mut self, peer: &PeerId, idx: u32, why: Failure, now: Instant) {
        let Some(&slot) = self.slots.get(peer) else {
            return;
        };
        if idx >= self.chunk_count {
            return;
        }
        let was_inflight = self.finish_request(slot, idx).is_some();
        if why == Failure::Corrupt && self.verifying[idx as usize] {
            // It failed verification: wanted again (from another peer, see the backoff).
            self.set_verifying(idx, false);
            self.refresh_wanted(idx);
        }
        let backoff_until = now + self.cfg.retry_backoff;
        if was_inflight && why != Failure::Corrupt {
            self.peers[slot].failures += 1;
        }
        match why {
            Failure::NotHeld => {
                if self.peers[slot].kind == SourceKind::Lan {
                    self.clear_have(slot, idx);
                } else {
                    // A bridgehead provides everything eventually; ask it again later.
                    self.pair_backoff.insert((slot, idx), backoff_until);
                }
            }
            Failure::Corrupt => {
                // Evidence of bad data counts even for a request we had already given up on.
                self.peers[slot].corrupt += 1;
                let corrupt = self.peers[slot].corrupt;
                self.pair_backoff
                    .insert((slot, idx), now + self.cfg.max_backoff);
                let ban_at = self.cfg.max_failures_before_ban.max(1);
                if corrupt >= ban_at && !self.peers[slot].banned {
                    tracing::warn!(%peer, corrupt, "banned from this download: corrupt chunks");
                    self.update_peer(slot, |p| p.banned = true);
                    self.release(slot);
                }
            }
            Failure::Timeout | Failure::Disconnected => {
                // A stale report (request already expired or released) was handled then.
                if was_inflight {
                    self.pair_backoff.insert((slot, idx), backoff_until);
                    let p = &mut self.peers[slot];
                    p.cooldown_until = Some(
                        p.cooldown_until
                            .map_or(backoff_until, |t| t.max(backoff_until)),
                    );
                }
            }
            Failure::Busy => {
                let (base, cap) = (self.cfg.busy_backoff, self.cfg.max_backoff);
                let p = &mut self.peers[slot];
                p.busy_streak = p.busy_streak.saturating_add(1);
                let factor = 1u32 << (p.busy_streak - 1).min(16);
                p.cooldown_until = Some(now + base.saturating_mul(factor).min(cap));
            }
            Failure::Refused | Failure::UnknownImage => {
                if !self.peers[slot].dropped {
                    tracing::debug!(%peer, ?why, "dropping peer from this download");
                    self.update_peer(slot, |p| p.dropped = true);
                    self.release(slot);
                }
            }
        }
    }

    /// Withdraws a request [`Download::next_requests`] returned that the driver did not send
    /// (held back by the download rate limit): the chunk is wanted again at once and the
    /// peer is not blamed.
    pub fn cancel(&mut self, peer: &PeerId, idx: u32) {
        if let Some(&slot) = self.slots.get(peer) {
            if idx < self.chunk_count {
                self.finish_request(slot, idx);
            }
        }
    }

    /// A chunk gained some other way (e.g. written by another task): mark it held.
    pub fn mark_held(&mut self, idx: u32) {
        if idx < self.chunk_count {
            self.set_held(idx);
        }
    }

    /// Requests older than their timeout count as failed (`Timeout`); returns them so the
    /// driver can forget their pending responses.
    pub fn expire(&mut self, now: Instant) -> Vec<(PeerId, u32)> {
        self.pair_backoff.retain(|_, until| *until > now);
        let late: Vec<(usize, u32)> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(late.len());
        for (slot, idx) in late {
            let peer = self.peers[slot].id;
            self.on_failure(&peer, idx, Failure::Timeout, now);
            out.push((peer, idx));
        }
        out
    }

    pub fn is_complete(&self) -> bool {
        self.held_count == self.chunk_count
    }

    pub fn is_held(&self, idx: u32) -> bool {
        self.held.get(idx as usize).copied().unwrap_or(false)
    }

    pub fn held_count(&self) -> u32 {
        self.held_count
    }

    pub fn missing(&self) -> u32 {
        self.chunk_count - self.held_count
    }

    /// How many chunks a LAN peer lacks as far as its announcements tell (all of them for a
    /// peer we never heard of).
    pub fn peer_missing(&self, peer: &PeerId) -> u32 {
        let ones = self
            .slots
            .get(peer)
            .and_then(|&s| self.peers.get(s))
            .map_or(0, |p| p.have.ones);
        self.chunk_count.saturating_sub(ones)
    }

    /// Requests in flight (endgame copies included).
    pub fn inflight(&self) -> usize {
        self.requests.len()
    }

    /// Requests in flight to one peer.
    pub fn inflight_to(&self, peer: &PeerId) -> usize {
        self.slots
            .get(peer)
            .map_or(0, |&slot| self.peers[slot].inflight)
    }

    /// True when nothing is in flight, chunks are missing and no known peer can provide them:
    /// the driver then asks the GIS again or reports "no source". Peers only cooling down
    /// still count as sources.
    pub fn is_stalled(&self) -> bool {
        if !self.requests.is_empty() || self.is_complete() || self.verifying_count > 0 {
            return false;
        }
        let bridgehead = self
            .peers
            .iter()
            .any(|p| p.usable() && p.kind.is_bridgehead());
        // Nothing in flight: every missing chunk is wanted, so the levels tell.
        let lan = self.levels[1..].iter().any(|b| b.ones > 0);
        !bridgehead && !lan
    }

    /// (peer, corrupt chunks, other failed requests) for every peer with any.
    pub fn penalties(&self) -> Vec<(PeerId, u32, u32)> {
        self.peers
            .iter()
            .filter(|p| p.corrupt > 0 || p.failures > 0)
            .map(|p| (p.id, p.corrupt, p.failures))
            .collect()
    }

    /// Bans a peer from this download (a node-wide ban, decided elsewhere): its in-flight
    /// requests become re-requestable at once and it is never asked again.
    pub fn ban(&mut self, peer: &PeerId) {
        if let Some(&slot) = self.slots.get(peer) {
            if !self.peers[slot].banned {
                self.update_peer(slot, |p| p.banned = true);
                self.release(slot);
            }
        }
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.slots
            .get(peer)
            .is_some_and(|&slot| self.peers[slot].banned)
    }

    /// The peer's kind as this download sees it, if known.
    pub fn peer_kind(&self, peer: &PeerId) -> Option<SourceKind> {
        self.slots.get(peer).map(|&slot| self.peers[slot].kind)
    }

    /// The earliest time something may change without an event: a request deadline, the end
    /// of a cool-down or of a per-chunk backoff. The driver wakes up then and calls
    /// [`Download::expire`] and [`Download::next_requests`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let deadlines = self.requests.values().map(|r| r.deadline);
        let cooldowns = self.peers.iter().filter_map(|p| p.cooldown_until);
        let backoffs = self.pair_backoff.values().copied();
        deadlines.chain(cooldowns).chain(backoffs).min()
    }

    /// When the last new chunk arrived through `on_chunk`.
    pub fn last_progress(&self) -> Option<Instant> {
        self.last_progress
    }

    // ---- internals ----

    fn slot_or_insert(&mut self, peer: PeerId, kind: SourceKind) -> usize {
        if let Some(&slot) = self.slots.get(&peer) {
            return slot;
        }
        let slot = self.peers.len();
        self.peers.push(Peer {
            id: peer,
            kind,
            // Not counted anywhere until the caller makes it present.
            present: false,
            dropped: false,
            banned: false,
            partial: false,
            have: Bits::new(self.chunk_count),
            inflight: 0,
            corrupt: 0,
            failures: 0,
            busy_streak: 0,
            cooldown_until: None,
        });
        self.slots.insert(peer, slot);
        slot
    }

    /// Changes a peer's status or kind, keeping LAN availability consistent.
    fn update_peer(&mut self, slot: usize, f: impl FnOnce(&mut Peer)) {
        let before = self.peers[slot].counts_for_lan();
        f(&mut self.peers[slot]);
        let after = self.peers[slot].counts_for_lan();
        if before != after {
            let held: Vec<u32> = self.peers[slot].have.iter_ones().collect();
            for pos in held {
                self.bump_avail(self.order[pos as usize], after);
            }
        }
    }

    /// One more (or one fewer) usable LAN holder of a chunk; moves it between levels.
    fn bump_avail(&mut self, idx: u32, up: bool) {
        let i = idx as usize;
        let old = self.level(i);
        if up {
            self.lan_avail[i] += 1;
        } else {
            self.lan_avail[i] -= 1;
        }
        let new = self.level(i);
        if old != new && self.is_wanted(i) {
            let pos = self.pos_of[i];
            self.levels[old].clear(pos);
            self.levels[new].set(pos);
        }
    }

    fn level(&self, i: usize) -> usize {
        self.lan_avail[i].min(MAX_RARITY) as usize
    }

    fn is_wanted(&self, i: usize) -> bool {
        !self.held[i] && !self.verifying[i] && self.req_count[i] == 0
    }

    fn wanted_count(&self) -> u32 {
        self.levels.iter().map(|b| b.ones).sum()
    }

    /// The first wanted chunk position `>= from` at this level (and in `mask`, if given).
    fn next_wanted(&self, level: usize, from: u32, mask: Option<&[u64]>) -> Option<u32> {
        let words = &self.levels[level].words;
        let mut w = from as usize / 64;
        let mut bits = words.get(w)? & (!0u64 << (from % 64));
        loop {
            if let Some(m) = mask {
                bits &= m[w];
            }
            if bits != 0 {
                return Some(w as u32 * 64 + bits.trailing_zeros());
            }
            w += 1;
            bits = *words.get(w)?;
        }
    }

    fn set_have(&mut self, slot: usize, idx: u32) {
        let pos = self.pos_of[idx as usize];
        if self.peers[slot].have.set(pos) && self.peers[slot].counts_for_lan() {
            self.bump_avail(idx, true);
        }
    }

    fn set_have_range(&mut self, slot: usize, start: u32, end: u32) {
        for idx in start..end {
            self.set_have(slot, idx);
        }
    }

    fn clear_have(&mut self, slot: usize, idx: u32) {
        let pos = self.pos_of[idx as usize];
        if self.peers[slot].have.clear(pos) && self.peers[slot].counts_for_lan() {
            self.bump_avail(idx, false);
        }
    }

    /// Keeps the levels equal to "missing and nothing in flight" for one chunk.
    fn refresh_wanted(&mut self, idx: u32) {
        let i = idx as usize;
        let (pos, level) = (self.pos_of[i], self.level(i));
        if self.is_wanted(i) {
            self.levels[level].set(pos);
        } else {
            self.levels[level].clear(pos);
        }
    }

    /// The chunks at least one of these peers holds, as bitset words over positions.
    fn have_union(&self, slots: &[usize]) -> Vec<u64> {
        let mut words = vec![0u64; (self.chunk_count as usize).div_ceil(64)];
        for &slot in slots {
            for (w, h) in words.iter_mut().zip(&self.peers[slot].have.words) {
                *w |= h;
            }
        }
        words
    }

    fn set_held(&mut self, idx: u32) -> bool {
        let i = idx as usize;
        if self.held[i] {
            return false;
        }
        self.held[i] = true;
        self.held_count += 1;
        self.prio[i] = false;
        self.set_verifying(idx, false);
        self.refresh_wanted(idx);
        true
    }

    /// Removes one in-flight request.
    fn finish_request(&mut self, slot: usize, idx: u32) -> Option<Request> {
        let req = self.requests.remove(&(slot, idx))?;
        let i = idx as usize;
        self.req_count[i] -= 1;
        if req.wan {
            self.wan_count[i] -= 1;
        }
        self.peers[slot].inflight -= 1;
        self.refresh_wanted(idx);
        Some(req)
    }

    /// Forgets every request in flight to a peer, so its chunks can be asked elsewhere.
    fn release(&mut self, slot: usize) {
        let keys: Vec<(usize, u32)> = self
            .requests
            .range((slot, 0)..=(slot, u32::MAX))
            .map(|(k, _)| *k)
            .collect();
        for (s, idx) in keys {
            self.finish_request(s, idx);
        }
    }

    fn backed_off(&self, slot: usize, idx: u32, now: Instant) -> bool {
        self.pair_backoff
            .get(&(slot, idx))
            .is_some_and(|until| *until > now)
    }

    /// The least-loaded peer of `free` that may be asked chunk `idx` (holding it if
    /// `need_have`), as a position in `free`. Ties go to the first after a rotating start.
    fn pick(&self, free: &[usize], idx: u32, now: Instant, need_have: bool) -> Option<usize> {
        let n = free.len();
        if n == 0 {
            return None;
        }
        let start = self.rotation % n;
        let mut best: Option<(usize, usize)> = None;
        for k in 0..n {
            let pos = (start + k) % n;
            let slot = free[pos];
            let p = &self.peers[slot];
            if need_have && !p.have.get(self.pos_of[idx as usize]) {
                continue;
            }
            // The map lookups only when they can hit (the common case is a fresh chunk).
            if self.req_count[idx as usize] > 0 && self.requests.contains_key(&(slot, idx)) {
                continue;
            }
            if !self.pair_backoff.is_empty() && self.backed_off(slot, idx, now) {
                continue;
            }
            if best.is_none_or(|(_, load)| p.inflight < load) {
                best = Some((pos, p.inflight));
            }
        }
        best.map(|(pos, _)| pos)
    }

    /// The WAN window is used up: only the fetching bridgeheads, which it does not cover,
    /// stay free this pass.
    fn close_window(&self, free: &mut Free) {
        free.wan.retain(|&slot| self.peers[slot].partial);
    }

    /// The requests to fetching bridgeheads are used up
    /// ([`SchedulerConfig::max_inflight_fetching`]): they are not free this pass.
    fn close_fetching(&self, free: &mut Free) {
        free.wan.retain(|&slot| !self.peers[slot].partial);
    }

    /// Marks a request in flight and hands it out.
    fn assign(
        &mut self,
        slot: usize,
        idx: u32,
        now: Instant,
        free: &mut Free,
        out: &mut Vec<(PeerId, u32)>,
    ) {
        let p = &mut self.peers[slot];
        let kind = p.kind;
        let wan = kind.is_wan();
        let windowed = wan && !p.partial;
        debug_assert!(!self.held[idx as usize], "requesting held chunk {idx}");
        debug_assert!(
            !wan || self.wan_count[idx as usize] == 0,
            "chunk {idx} twice over WAN"
        );
        p.inflight += 1;
        let full = p.inflight >= self.cfg.limit(kind);
        out.push((p.id, idx));
        self.requests.insert(
            (slot, idx),
            Request {
                sent: now,
                deadline: now + self.cfg.timeout(kind),
                wan,
                windowed,
            },
        );
        let i = idx as usize;
        self.req_count[i] = self.req_count[i].saturating_add(1);
        if wan {
            self.wan_count[i] += 1;
        }
        if windowed {
            free.wan_budget = free.wan_budget.saturating_sub(1);
            if free.wan_budget == 0 {
                self.close_window(free);
            }
        } else if wan {
            free.partial_budget = free.partial_budget.saturating_sub(1);
            if free.partial_budget == 0 {
                self.close_fetching(free);
            }
        }
        self.refresh_wanted(idx);
        if full {
            free.list(kind).retain(|&s| s != slot);
        }
        self.rotation = self.rotation.wrapping_add(1);
    }

    /// A chunk with no request in flight, by the normal rules (used for priority hints).
    fn assign_fresh(
        &mut self,
        idx: u32,
        now: Instant,
        free: &mut Free,
        out: &mut Vec<(PeerId, u32)>,
    ) -> bool {
        if self.lan_avail[idx as usize] == 0 {
            return self.assign_unavailable(idx, now, free, out);
        }
        if let Some(pos) = self.pick(&free.lan, idx, now, true) {
            self.assign(free.lan[pos], idx, now, free, out);
            return true;
        }
        self.assign_spill(idx, now, free, out)
    }

    /// A chunk no usable LAN peer holds: local bridgehead first, then one WAN source.
    fn assign_unavailable(
        &mut self,
        idx: u32,
        now: Instant,
        free: &mut Free,
        out: &mut Vec<(PeerId, u32)>,
    ) -> bool {
        if let Some(pos) = self.pick(&free.bridgehead, idx, now, false) {
            self.assign(free.bridgehead[pos], idx, now, free, out);
            return true;
        }
        // The WAN rule: only a chunk the IDC lacks, with no request in flight anywhere (so
        // never two over the WAN, never an endgame copy).
        if self.is_wanted(idx as usize) && self.lan_avail[idx as usize] == 0 {
            // A fetching bridgehead that already has the chunk first (spares the origin's
            // uplink); then any bridgehead that can supply everything.
            let (partial, whole): (Vec<usize>, Vec<usize>) =
                free.wan.iter().partition(|&&slot| self.peers[slot].partial);
            if let Some(pos) = self.pick(&partial, idx, now, true) {
                self.assign(partial[pos], idx, now, free, out);
                return true;
            }
            if !whole.is_empty() && self.origin_share(idx, now) {
                if let Some(pos) = self.pick(&whole, idx, now, false) {
                    self.assign(whole[pos], idx, now, free, out);
                    return true;
                }
            }
        }
        false
    }

    fn spill_possible(&self, free: &Free) -> bool {
        free.bridgehead
            .iter()
            .any(|&slot| self.peers[slot].inflight < self.cfg.bridgehead_spill)
    }

    /// A LAN-available chunk whose holders are saturated: the local bridgehead, if it is
    /// nearly idle.
    fn assign_spill(
        &mut self,
        idx: u32,
        now: Instant,
        free: &mut Free,
        out: &mut Vec<(PeerId, u32)>,
    ) -> bool {
        let spill = self.cfg.bridgehead_spill;
        let idle: Vec<usize> = free
            .bridgehead
            .iter()
            .copied()
            .filter(|&slot| self.peers[slot].inflight < spill)
            .collect();
        match self.pick(&idle, idx, now, false) {
            Some(pos) => {
                self.assign(idle[pos], idx, now, free, out);
                true
            }
            None => false,
        }
    }
}

/// How long a download waits for a designated fetcher before pulling its chunks itself.
const SHARE_PATIENCE: Duration = Duration::from_secs(3);

/// A stable hash of (peer, chunk), the same on every node: FNV-1a 64 over the bytes, then
/// the SplitMix64 finaliser. FNV alone leaves the top bits set by the peer id (the chunk
/// index comes last and its bits barely reach them), so comparing two peers' scores split
/// an image's chunks 18 : 46 instead of about evenly.
fn share_score(peer: &PeerId, idx: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in peer.to_bytes().iter().chain(idx.to_le_bytes().iter()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::collections::HashSet;

    fn pid(n: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .expect("32 bytes make an ed25519 key")
            .public()
            .to_peer_id()
    }

    fn cfg() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    fn dl(n: u32) -> Download {
        Download::new(n, |_| false, cfg(), 7)
    }

    fn to(reqs: &[(PeerId, u32)], peer: PeerId) -> Vec<u32> {
        reqs.iter()
            .filter(|(p, _)| *p == peer)
            .map(|(_, i)| *i)
            .collect()
    }

    #[test]
    fn held_chunks_are_never_requested() {
        let mut d = Download::new(64, |i| i % 2 == 0, cfg(), 1);
        assert_eq!(d.held_count(), 32);
        assert_eq!(d.missing(), 32);
        d.add_peer(pid(1), SourceKind::LocalBridgehead, false);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert_eq!(reqs.len(), 16);
        assert!(reqs.iter().all(|(_, i)| i % 2 == 1));
        d.mark_held(1);
        // Chunk 1 in flight and now held: never asked again; the rest go out as slots free.
        for (p, i) in reqs {
            d.on_chunk(&p, i, now);
        }
        let mut seen = HashSet::new();
        while !d.is_complete() {
            let reqs = d.next_requests(now);
            assert!(!reqs.is_empty());
            for (p, i) in reqs {
                assert!(!d.is_held(i), "held chunk {i} requested");
                assert!(seen.insert(i));
                d.on_chunk(&p, i, now);
            }
        }
    }

    #[test]
    fn what_a_lan_peer_lacks_follows_its_announcements() {
        let mut d = dl(40);
        assert_eq!(
            d.peer_missing(&pid(1)),
            40,
            "never heard of: lacks everything"
        );
        d.peer_has(&pid(1), &[(0, 10), (5, 15), (38, 99)]);
        assert_eq!(d.peer_missing(&pid(1)), 40 - 17);
        d.peer_lost(&pid(1), &[(0, 2)]);
        assert_eq!(d.peer_missing(&pid(1)), 40 - 15);
        d.peer_complete(&pid(2));
        assert_eq!(d.peer_missing(&pid(2)), 0);
    }

    #[test]
    fn arrived_chunks_free_their_slot_and_are_not_asked_again() {
        let mut c = cfg();
        c.max_inflight_lan = 2;
        let mut d = Download::new(6, |_| false, c, 9);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::Lan, true);
        let now = Instant::now();
        let first = d.next_requests(now);
        assert_eq!(first.len(), 4, "two slots on each peer");
        // A's two answers arrive and go to verification: A's slots are free again at once.
        let from_a = to(&first, a);
        for &i in &from_a {
            d.on_arrived(&a, i, now);
        }
        assert_eq!(d.inflight_to(&a), 0);
        assert_eq!(d.verifying(), 2);
        assert!(!d.is_stalled());
        // A priority hint (a deferred relay request) does not re-ask a chunk being verified.
        d.prioritize(from_a[1]);
        let second = d.next_requests(now);
        assert_eq!(to(&second, a).len(), 2, "A's freed slots are refilled");
        let asked: HashSet<u32> = first.iter().chain(&second).map(|&(_, i)| i).collect();
        assert_eq!(
            asked.len(),
            6,
            "no chunk is asked twice while one copy is verified"
        );
        // One verifies; the other was corrupt and becomes wanted again, not from A.
        d.on_chunk(&a, from_a[0], now);
        d.on_failure(&a, from_a[1], Failure::Corrupt, now);
        assert_eq!(d.verifying(), 0);
        assert!(d.is_held(from_a[0]) && !d.is_held(from_a[1]));
        for (p, i) in first.iter().chain(&second).filter(|(p, _)| *p == b) {
            d.on_chunk(p, *i, now);
        }
        let third = d.next_requests(now);
        assert!(
            third.contains(&(b, from_a[1])),
            "the corrupt chunk goes to B: {third:?}"
        );
    }

    #[test]
    fn rarest_chunks_go_first() {
        let mut c = cfg();
        c.max_inflight_lan = 2;
        let mut d = Download::new(10, |_| false, c, 3);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::Lan, false);
        d.peer_has(&b, &[(0, 5)]);
        let reqs = d.next_requests(Instant::now());
        // 5..10 are held by A alone (rarest): A's two slots go to them, B serves 0..5.
        assert_eq!(to(&reqs, a).len(), 2);
        assert!(to(&reqs, a).iter().all(|i| (5..10).contains(i)));
        assert_eq!(to(&reqs, b).len(), 2);
        assert!(to(&reqs, b).iter().all(|i| (0..5).contains(i)));
    }

    #[test]
    fn tie_break_is_random_but_seeded() {
        let first = |seed| {
            let mut d = Download::new(256, |_| false, cfg(), seed);
            d.add_peer(pid(1), SourceKind::Lan, true);
            d.next_requests(Instant::now())
        };
        assert_eq!(first(5), first(5));
        assert_ne!(first(5), first(6));
        let picks: Vec<u32> = first(5).iter().map(|(_, i)| *i).collect();
        assert_ne!(
            picks,
            (0..8).collect::<Vec<_>>(),
            "order should not be sequential"
        );
    }

    #[test]
    fn priority_hints_come_first_in_order() {
        let mut d = dl(100);
        d.prioritize(77);
        d.prioritize(3);
        d.prioritize(77); // a repeat hint keeps its place
        d.add_peer(pid(1), SourceKind::Lan, true);
        let reqs = d.next_requests(Instant::now());
        assert_eq!(reqs.len(), 8);
        assert_eq!(reqs[0].1, 77);
        assert_eq!(reqs[1].1, 3);
    }

    #[test]
    fn pipelines_up_to_the_limit_and_spreads_over_peers() {
        let mut d = dl(100);
        let peers = [pid(1), pid(2), pid(3)];
        for p in peers {
            d.add_peer(p, SourceKind::Lan, true);
        }
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert_eq!(reqs.len(), 24);
        for p in peers {
            assert_eq!(to(&reqs, p).len(), 8);
            assert_eq!(d.inflight_to(&p), 8);
        }
        let distinct: HashSet<u32> = reqs.iter().map(|(_, i)| *i).collect();
        assert_eq!(
            distinct.len(),
            24,
            "no chunk requested twice outside endgame"
        );
        assert!(d.next_requests(now).is_empty(), "every slot is busy");
        // One answer frees exactly one slot, on that peer.
        d.on_chunk(&reqs[0].0, reqs[0].1, now);
        let more = d.next_requests(now);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].0, reqs[0].0);
    }

    #[test]
    fn cancelled_requests_are_wanted_again_without_blame() {
        let mut d = dl(20);
        let (a, bh) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert!(reqs.len() > 1);
        // The driver sends the first one only (the rate limit holds the rest back).
        for &(p, i) in &reqs[1..] {
            d.cancel(&p, i);
        }
        assert_eq!(d.inflight(), 1);
        assert!(
            d.penalties().is_empty(),
            "a withdrawn request blames nobody"
        );
        // The withdrawn chunks go out on the next call, with no cool-down.
        let again: HashSet<u32> = d.next_requests(now).iter().map(|(_, i)| *i).collect();
        let withdrawn: HashSet<u32> = reqs[1..].iter().map(|(_, i)| *i).collect();
        assert!(
            withdrawn.is_subset(&again),
            "{withdrawn:?} not in {again:?}"
        );
        // Cancelling what is not in flight changes nothing.
        let before = d.inflight();
        d.cancel(&pid(9), 0);
        d.cancel(&a, 999);
        assert_eq!(d.inflight(), before);
    }

    #[test]
    fn local_bridgehead_serves_what_no_lan_peer_has() {
        let mut d = dl(100);
        let (a, bh) = (pid(1), pid(9));
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        d.add_peer(a, SourceKind::Lan, false);
        d.peer_has(&a, &[(0, 50)]);
        let reqs = d.next_requests(Instant::now());
        assert_eq!(to(&reqs, a).len(), 8);
        assert!(to(&reqs, a).iter().all(|i| *i < 50));
        assert_eq!(to(&reqs, bh).len(), 16);
        assert!(to(&reqs, bh).iter().all(|i| *i >= 50));
    }

    #[test]
    fn local_bridgehead_is_asked_first_for_what_it_announced() {
        // A bridgehead still pulling the image answers at once only the chunks it has; a
        // host that asked it for random others would wait on its pull and fall behind.
        let mut d = dl(200);
        let bh = pid(9);
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        d.peer_has(&bh, &[(40, 50), (120, 124)]);
        let reqs = to(&d.next_requests(Instant::now()), bh);
        assert_eq!(reqs.len(), 16);
        let announced = |i: &u32| (40..50).contains(i) || (120..124).contains(i);
        let mut first: Vec<u32> = reqs[..14].to_vec();
        first.sort_unstable();
        assert_eq!(first, (40..50).chain(120..124).collect::<Vec<_>>());
        // The two slots left still drive its pull (deferred requests).
        assert!(reqs[14..].iter().all(|i| !announced(i)));

        // With another host of the IDC known, each announced chunk has one designated
        // taker: we ask first for ours only, the other host takes the rest.
        let (me, other) = (pid(1), pid(2));
        let mut d = dl(200);
        d.set_identity(me);
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        d.add_peer(other, SourceKind::Lan, false);
        d.peer_has(&other, &[(190, 200)]);
        d.peer_has(&bh, &[(40, 50), (120, 124)]);
        let ours: Vec<u32> = (40..50)
            .chain(120..124)
            .filter(|&i| share_score(&me, i) > share_score(&other, i))
            .collect();
        assert!(!ours.is_empty() && ours.len() < 14, "{ours:?}");
        let reqs = to(&d.next_requests(Instant::now()), bh);
        let mut first = reqs[..ours.len()].to_vec();
        first.sort_unstable();
        assert_eq!(first, ours);
    }

    #[test]
    fn fetching_bridgeheads_split_the_origins_chunks_about_evenly() {
        // Whatever two peer ids meet, each is the designated fetcher of about half the
        // chunks (an uneven split leaves one IDC's uplink idle while the other relays).
        for _ in 0..50 {
            let (a, b) = (PeerId::random(), PeerId::random());
            let mine = (0..1024u32)
                .filter(|&i| share_score(&a, i) > share_score(&b, i))
                .count();
            assert!(
                (430..=594).contains(&mine),
                "{a} won {mine} of 1024 against {b}"
            );
        }
    }

    #[test]
    fn bridgehead_share_stays_small_when_lan_peers_can_serve() {
        let mut d = dl(100);
        let (a, bh) = (pid(1), pid(9));
        d.add_peer(bh, SourceKind::LocalBridgehead, true);
        d.add_peer(a, SourceKind::Lan, true);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert_eq!(to(&reqs, a).len(), 8);
        // Everything is on the LAN: the bridgehead only gets its small spill share.
        assert_eq!(to(&reqs, bh).len(), cfg().bridgehead_spill);
        assert!(d.next_requests(now).is_empty());
        // Removing the LAN peer makes the bridgehead the only source: it gets its full share.
        d.remove_peer(&a);
        let reqs = d.next_requests(now);
        assert_eq!(to(&reqs, bh).len(), 16 - cfg().bridgehead_spill);
    }

    #[test]
    fn remote_bridgeheads_get_different_chunks_in_parallel() {
        // The per-peer limit alone (the WAN window is tested on its own below).
        let mut c = cfg();
        c.wan_window = Duration::ZERO;
        let mut d = Download::new(100, |_| false, c, 7);
        let (r1, r2) = (pid(21), pid(22));
        d.add_peer(r1, SourceKind::RemoteBridgehead, true);
        d.add_peer(r2, SourceKind::RemoteBridgehead, true);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert_eq!(to(&reqs, r1).len(), 8);
        assert_eq!(to(&reqs, r2).len(), 8);
        let distinct: HashSet<u32> = reqs.iter().map(|(_, i)| *i).collect();
        assert_eq!(distinct.len(), 16);
        // Alternating: consecutive picks go to different remote bridgeheads.
        assert!(reqs.windows(2).all(|w| w[0].0 != w[1].0));
    }

    #[test]
    fn wan_is_never_used_for_chunks_the_lan_holds() {
        let mut d = dl(100);
        let (a, r) = (pid(1), pid(21));
        d.add_peer(r, SourceKind::RemoteBridgehead, true);
        d.add_peer(a, SourceKind::Lan, false);
        d.peer_has(&a, &[(0, 90)]);
        let now = Instant::now();
        let mut wan = Vec::new();
        // Drain the WAN; the LAN peer never answers, so LAN chunks stay wanted meanwhile.
        for _ in 0..10 {
            for (p, i) in d.next_requests(now) {
                if p == r {
                    wan.push(i);
                    d.on_chunk(&p, i, now);
                }
            }
        }
        wan.sort_unstable();
        assert_eq!(wan, (90..100).collect::<Vec<_>>());
    }

    #[test]
    fn the_wan_window_starts_small_and_follows_the_arrival_rate() {
        let c = cfg();
        let mut d = Download::new(400, |_| false, c.clone(), 3);
        let remotes: Vec<PeerId> = (40..44).map(pid).collect();
        for r in &remotes {
            d.add_peer(*r, SourceKind::RemoteBridgehead, true);
        }
        let t0 = Instant::now();
        // Nothing has arrived yet: two requests, not 4 x max_inflight_wan.
        let first = d.next_requests(t0);
        assert_eq!(first.len(), WAN_WINDOW_MIN);
        assert!(d.next_requests(t0).is_empty(), "the window is full");
        // 40 chunks a second arrive: 40 x 0.3 s + 1 = 13 in flight.
        let mut t = t0;
        let mut inflight = first;
        for _ in 0..40 {
            t += Duration::from_millis(25);
            let (peer, idx) = inflight.remove(0);
            d.on_arrived(&peer, idx, t);
            assert!(d.on_chunk(&peer, idx, t));
            inflight.extend(d.next_requests(t));
        }
        assert_eq!(d.wan_window(t), 40 * 3 / 10 + 1);
        assert_eq!(inflight.len(), d.wan_window(t));
        // A second later with nothing arriving the window is back at its minimum, and no new
        // request leaves while more than that are in flight.
        let later = t + Duration::from_millis(1100);
        assert_eq!(d.wan_window(later), WAN_WINDOW_MIN);
        assert!(d.next_requests(later).is_empty());
    }

    #[test]
    fn fetching_bridgeheads_are_asked_beyond_the_wan_window_up_to_their_own_limit() {
        let mut d = Download::new(400, |_| false, cfg(), 3);
        let origin = pid(40);
        d.add_peer(origin, SourceKind::RemoteBridgehead, true);
        let fetching: Vec<PeerId> = (41..44).map(pid).collect();
        for (k, f) in fetching.iter().enumerate() {
            d.add_fetching_bridgehead(*f);
            let from = 100 * k as u32;
            d.peer_has(f, &[(from, from + 100)]);
        }
        let t0 = Instant::now();
        let reqs = d.next_requests(t0);
        let limit = cfg().max_inflight_fetching;
        assert!(limit < fetching.len() * cfg().max_inflight_wan);
        // The fetching bridgeheads get `max_inflight_fetching` requests in all, though
        // nothing has arrived yet (the window is at its minimum), spread over them, each for
        // chunks it announced.
        let mut asked_fetching = 0;
        for (k, f) in fetching.iter().enumerate() {
            let asked = to(&reqs, *f);
            assert!(!asked.is_empty(), "{f}");
            let from = 100 * k as u32;
            assert!(asked.iter().all(|&i| (from..from + 100).contains(&i)));
            asked_fetching += asked.len();
        }
        assert_eq!(asked_fetching, limit);
        // The origin is held to the window, which they do not use up.
        assert_eq!(to(&reqs, origin).len(), WAN_WINDOW_MIN);
        assert!(d.next_requests(t0).is_empty());
        // Still never two requests for one chunk over the WAN.
        let mut all: Vec<u32> = reqs.iter().map(|r| r.1).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), reqs.len());
        // A chunk from one of them frees a place: one more request to a fetching bridgehead.
        let (f, idx) = *reqs
            .iter()
            .find(|(p, _)| fetching.contains(p))
            .expect("a request to a fetching bridgehead");
        d.on_arrived(&f, idx, t0);
        let more = d.next_requests(t0);
        assert_eq!(more.len(), 1, "{more:?}");
        assert!(fetching.contains(&more[0].0));
    }

    #[test]
    fn the_idc_holds_missing_chunks_while_a_lan_peer_or_the_bridgehead_has_one() {
        let mut d = dl(8);
        let (remote, host, bh) = (pid(50), pid(51), pid(52));
        d.add_peer(remote, SourceKind::RemoteBridgehead, true);
        assert!(!d.idc_holds_missing(), "only the WAN has the image");
        d.add_peer(host, SourceKind::Lan, false);
        assert!(!d.idc_holds_missing(), "a LAN peer that holds nothing");
        d.peer_has(&host, &[(3, 4)]);
        assert!(d.idc_holds_missing(), "a LAN peer holds chunk 3");
        let t = Instant::now();
        d.on_arrived(&host, 3, t);
        assert!(d.on_chunk(&host, 3, t));
        assert!(!d.idc_holds_missing(), "we hold chunk 3 now");
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        assert!(
            !d.idc_holds_missing(),
            "the bridgehead announced nothing yet"
        );
        d.peer_has(&bh, &[(5, 6)]);
        assert!(d.idc_holds_missing(), "the bridgehead announced chunk 5");
    }

    #[test]
    fn a_zero_wan_window_keeps_only_the_per_peer_limit() {
        let mut c = cfg();
        c.wan_window = Duration::ZERO;
        let mut d = Download::new(400, |_| false, c.clone(), 3);
        for r in (40..44).map(pid) {
            d.add_peer(r, SourceKind::RemoteBridgehead, true);
        }
        assert_eq!(
            d.next_requests(Instant::now()).len(),
            4 * c.max_inflight_wan
        );
    }

    #[test]
    fn wan_chunk_is_re_requested_only_after_a_real_failure() {
        let mut c = cfg();
        c.max_inflight_wan = 1;
        let mut d = Download::new(1, |_| false, c.clone(), 1);
        let (r1, r2) = (pid(21), pid(22));
        d.add_peer(r1, SourceKind::RemoteBridgehead, true);
        d.add_peer(r2, SourceKind::RemoteBridgehead, true);
        let t0 = Instant::now();
        let reqs = d.next_requests(t0);
        assert_eq!(reqs.len(), 1, "one chunk, one WAN request, no endgame copy");
        let first = reqs[0].0;
        // Long silence is not a failure until the deferred timeout.
        assert!(d.next_requests(t0 + Duration::from_secs(60)).is_empty());
        assert!(d.expire(t0 + Duration::from_secs(60)).is_empty());
        let t1 = t0 + c.deferred_timeout;
        assert_eq!(d.expire(t1), vec![(first, 0)]);
        let again = d.next_requests(t1);
        assert_eq!(again.len(), 1);
        assert_ne!(
            again[0].0, first,
            "re-requested from the other remote bridgehead"
        );
        // The late answer of the first still counts; the second is then a duplicate.
        assert!(d.on_chunk(&first, 0, t1));
        assert!(!d.on_chunk(&again[0].0, 0, t1));
        assert!(d.is_complete());
        assert_eq!(d.inflight(), 0);
    }

    #[test]
    fn not_held_clears_lan_availability() {
        let mut d = dl(4);
        let a = pid(1);
        d.add_peer(a, SourceKind::Lan, true);
        let now = Instant::now();
        assert_eq!(d.next_requests(now).len(), 4);
        for i in 0..4 {
            d.on_failure(&a, i, Failure::NotHeld, now);
        }
        assert!(d.next_requests(now + Duration::from_secs(100)).is_empty());
        assert!(d.is_stalled(), "the only peer holds nothing we miss");
        assert_eq!(d.penalties(), vec![(a, 0, 4)]);
        d.peer_has(&a, &[(2, 3)]);
        assert!(!d.is_stalled());
        assert_eq!(d.next_requests(now), vec![(a, 2)]);
    }

    #[test]
    fn not_held_from_a_bridgehead_retries_after_backoff() {
        let mut d = dl(1);
        let bh = pid(9);
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        let t0 = Instant::now();
        assert_eq!(d.next_requests(t0), vec![(bh, 0)]);
        d.on_failure(&bh, 0, Failure::NotHeld, t0);
        assert!(!d.is_stalled(), "a bridgehead can still provide it");
        assert!(d.next_requests(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + cfg().retry_backoff));
        assert_eq!(d.next_requests(t0 + cfg().retry_backoff), vec![(bh, 0)]);
    }

    #[test]
    fn lost_chunks_are_not_asked_of_their_former_holder() {
        let now = Instant::now();
        let mut d = Download::new(4, |_| false, cfg(), 7);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::Lan, false);
        d.peer_has(&b, &[(2, 3)]);
        d.peer_lost(&a, &[(2, 4)]);
        let reqs = d.next_requests(now);
        let of = |i: u32| reqs.iter().find(|r| r.1 == i).map(|r| r.0);
        assert_eq!(of(2), Some(b), "chunk 2 only from b now: {reqs:?}");
        assert_eq!(of(3), None, "nobody holds chunk 3 any more: {reqs:?}");
        assert_eq!(of(0), Some(a));
        for (p, i) in reqs {
            d.on_chunk(&p, i, now);
        }
        assert_eq!(d.held_count(), 3);
        // One of ours rots: wanted again.
        d.unmark_held(0);
        assert_eq!(d.held_count(), 2);
        assert!(!d.is_held(0));
        assert_eq!(d.next_requests(now), vec![(a, 0)]);
    }

    #[test]
    fn corrupt_peers_are_penalised_then_banned() {
        let mut c = cfg();
        c.max_inflight_lan = 1;
        let mut d = Download::new(10, |_| false, c, 2);
        let (bad, good) = (pid(1), pid(2));
        d.add_peer(bad, SourceKind::Lan, true);
        let now = Instant::now();
        let mut corrupted = Vec::new();
        for _ in 0..3 {
            let reqs = d.next_requests(now);
            assert_eq!(reqs.len(), 1);
            d.on_failure(&bad, reqs[0].1, Failure::Corrupt, now);
            corrupted.push(reqs[0].1);
        }
        assert!(d.is_banned(&bad));
        assert_eq!(d.penalties(), vec![(bad, 3, 0)]);
        assert!(d.next_requests(now).is_empty(), "banned: no more requests");
        assert!(d.is_stalled());
        d.add_peer(bad, SourceKind::Lan, true);
        assert!(d.is_banned(&bad), "a fresh listing does not lift a ban");
        d.add_peer(good, SourceKind::Lan, true);
        let reqs = d.next_requests(now);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].0, good);
    }

    #[test]
    fn corrupt_chunk_is_re_requested_elsewhere() {
        let mut d = dl(1);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::Lan, true);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        assert_eq!(reqs.len(), 1);
        let (first, _) = reqs[0];
        d.on_failure(&first, 0, Failure::Corrupt, now);
        assert!(!d.is_banned(&first));
        let other = if first == a { b } else { a };
        assert_eq!(d.next_requests(now), vec![(other, 0)]);
    }

    #[test]
    fn lan_timeouts_expire_and_move_to_another_peer() {
        let mut d = dl(1);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        let t0 = Instant::now();
        assert_eq!(d.next_requests(t0), vec![(a, 0)]);
        assert_eq!(d.next_deadline(), Some(t0 + cfg().request_timeout));
        d.add_peer(b, SourceKind::Lan, true);
        let t1 = t0 + cfg().request_timeout;
        assert_eq!(d.expire(t1), vec![(a, 0)]);
        assert_eq!(d.penalties(), vec![(a, 0, 1)]);
        assert_eq!(d.next_requests(t1), vec![(b, 0)]);
        // A stale timeout report from the driver is not counted twice.
        d.on_failure(&a, 0, Failure::Timeout, t1);
        assert_eq!(d.penalties(), vec![(a, 0, 1)]);
    }

    #[test]
    fn busy_peers_back_off_exponentially() {
        let mut d = dl(4);
        let a = pid(1);
        d.add_peer(a, SourceKind::Lan, true);
        let t0 = Instant::now();
        let reqs = d.next_requests(t0);
        assert_eq!(reqs.len(), 4);
        d.on_failure(&a, reqs[0].1, Failure::Busy, t0);
        let b = cfg().busy_backoff;
        assert!(d.next_requests(t0 + b / 2).is_empty());
        assert_eq!(d.next_requests(t0 + b).len(), 1);
        let t1 = t0 + b;
        d.on_failure(&a, reqs[1].1, Failure::Busy, t1);
        // Second Busy in a row: twice as long.
        assert!(d.next_requests(t1 + b).is_empty());
        assert_eq!(d.next_requests(t1 + 2 * b).len(), 1);
        // A success resets the streak.
        d.on_chunk(&a, reqs[2].1, t1);
        d.on_failure(&a, reqs[3].1, Failure::Busy, t1 + 2 * b);
        assert!(!d.next_requests(t1 + 3 * b).is_empty());
    }

    #[test]
    fn refused_or_unknown_image_drops_the_peer_until_listed_again() {
        let mut d = dl(10);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::LocalBridgehead, false);
        let now = Instant::now();
        let reqs = d.next_requests(now);
        d.on_failure(&a, to(&reqs, a)[0], Failure::Refused, now);
        assert_eq!(d.inflight_to(&a), 0, "its other requests are released");
        d.on_failure(&b, to(&reqs, b)[0], Failure::UnknownImage, now);
        assert_eq!(d.inflight(), 0);
        assert!(d.next_requests(now).is_empty());
        assert!(d.is_stalled());
        d.peer_has(&a, &[(0, 10)]);
        assert!(
            d.next_requests(now).is_empty(),
            "an announcement does not re-admit"
        );
        d.add_peer(a, SourceKind::Lan, true);
        assert_eq!(d.next_requests(now).len(), 8);
    }

    #[test]
    fn removed_peer_frees_its_chunks_for_others() {
        let mut c = cfg();
        c.endgame = false;
        let mut d = Download::new(8, |_| false, c, 4);
        let (a, b) = (pid(1), pid(2));
        d.add_peer(a, SourceKind::Lan, true);
        let now = Instant::now();
        assert_eq!(d.next_requests(now).len(), 8);
        d.add_peer(b, SourceKind::Lan, true);
        assert!(
            d.next_requests(now).is_empty(),
            "all chunks in flight, no endgame"
        );
        d.remove_peer(&a);
        assert_eq!(d.inflight(), 0);
        let reqs = d.next_requests(now);
        assert_eq!(to(&reqs, b).len(), 8);
        // The removed peer's late answer is still a new chunk.
        assert!(d.on_chunk(&a, reqs[0].1, now));
        assert!(!d.on_chunk(&b, reqs[0].1, now));
    }

    #[test]
    fn endgame_duplicates_on_the_lan_only() {
        let mut d = dl(4);
        let (a, b, r) = (pid(1), pid(2), pid(21));
        d.add_peer(a, SourceKind::Lan, true);
        d.add_peer(b, SourceKind::Lan, true);
        let now = Instant::now();
        let first = d.next_requests(now);
        assert_eq!(first.len(), 4);
        assert!(
            d.next_requests(now).is_empty(),
            "a request just sent deserves its chance"
        );
        let now = now + ENDGAME_MIN_WAIT;
        let dups = d.next_requests(now);
        assert_eq!(
            dups.len(),
            4,
            "each in-flight chunk copied to the other peer"
        );
        for &(p, i) in &dups {
            assert!(first.iter().any(|&(q, j)| j == i && q != p));
        }
        assert!(
            d.next_requests(now).is_empty(),
            "at most endgame_copies per chunk"
        );
        for &(p, i) in &first {
            assert!(d.on_chunk(&p, i, now));
        }
        for &(p, i) in &dups {
            assert!(!d.on_chunk(&p, i, now), "late copy is a duplicate");
        }
        assert!(d.is_complete());
        assert_eq!(d.inflight(), 0);

        // Over the WAN, never.
        let mut w = dl(2);
        w.add_peer(r, SourceKind::RemoteBridgehead, true);
        w.add_peer(pid(22), SourceKind::RemoteBridgehead, true);
        assert_eq!(w.next_requests(now).len(), 2);
        assert!(w.next_requests(now).is_empty());
    }

    #[test]
    fn endgame_can_be_switched_off() {
        let mut c = cfg();
        c.endgame = false;
        let mut d = Download::new(4, |_| false, c, 1);
        d.add_peer(pid(1), SourceKind::Lan, true);
        d.add_peer(pid(2), SourceKind::Lan, true);
        let now = Instant::now();
        assert_eq!(d.next_requests(now).len(), 4);
        assert!(d.next_requests(now).is_empty());
    }

    #[test]
    fn stall_detection() {
        let mut d = dl(4);
        assert!(d.is_stalled(), "no peer at all");
        let a = pid(1);
        d.peer_has(&a, &[(0, 2)]);
        assert_eq!(
            d.peer_kind(&a),
            Some(SourceKind::Lan),
            "unknown announcer is a LAN peer"
        );
        assert!(!d.is_stalled());
        let now = Instant::now();
        for (p, i) in d.next_requests(now) {
            assert!(!d.is_stalled(), "requests in flight");
            d.on_chunk(&p, i, now);
        }
        assert_eq!(d.held_count(), 2);
        assert!(d.is_stalled(), "nobody holds 2..4");
        d.add_peer(pid(9), SourceKind::LocalBridgehead, false);
        assert!(!d.is_stalled());
        let mut done = Download::new(2, |_| true, cfg(), 0);
        assert!(done.is_complete() && !done.is_stalled());
        assert!(done.next_requests(now).is_empty());
    }

    #[test]
    fn bridgehead_kind_is_not_demoted_by_a_lan_listing() {
        let mut d = dl(4);
        let bh = pid(9);
        d.add_peer(bh, SourceKind::LocalBridgehead, false);
        d.add_peer(bh, SourceKind::Lan, false);
        d.peer_has(&bh, &[(0, 1)]);
        assert_eq!(d.peer_kind(&bh), Some(SourceKind::LocalBridgehead));
        d.remove_peer(&bh);
        d.add_peer(bh, SourceKind::Lan, false);
        assert_eq!(d.peer_kind(&bh), Some(SourceKind::Lan));
    }

    #[test]
    fn announced_ranges_are_clamped_and_counted() {
        let mut d = dl(10);
        let a = pid(1);
        d.peer_has(&a, &[(8, 50), (3, 1)]);
        d.peer_complete(&pid(2));
        assert_eq!(d.lan_avail, vec![1, 1, 1, 1, 1, 1, 1, 1, 2, 2]);
        d.remove_peer(&pid(2));
        assert_eq!(d.lan_avail.iter().sum::<u32>(), 2);
        d.on_failure(&a, 9, Failure::NotHeld, Instant::now());
        assert_eq!(d.lan_avail[9], 0);
    }

    #[test]
    fn chunk_indexes_past_the_end_are_ignored() {
        let mut d = dl(4);
        let a = pid(1);
        d.add_peer(a, SourceKind::Lan, true);
        let now = Instant::now();
        assert!(!d.on_chunk(&a, 4, now));
        d.on_failure(&a, 99, Failure::Corrupt, now);
        d.mark_held(1000);
        d.prioritize(1000);
        assert_eq!(d.held_count(), 0);
        assert!(d.penalties().is_empty());
    }

    #[test]
    fn failures_map_from_chunk_responses() {
        use bids_protocols::chunk::Encoding;
        let data = ChunkResponse::Data {
            encoding: Encoding::Raw,
            payload: Bytes::new(),
        };
        assert_eq!(Failure::from_response(&data), None);
        assert_eq!(
            Failure::from_response(&ChunkResponse::NotHeld),
            Some(Failure::NotHeld)
        );
        assert_eq!(
            Failure::from_response(&ChunkResponse::Busy),
            Some(Failure::Busy)
        );
        assert_eq!(
            Failure::from_response(&ChunkResponse::Refused("idc".into())),
            Some(Failure::Refused)
        );
        assert_eq!(
            Failure::from_response(&ChunkResponse::BadIndex),
            Some(Failure::UnknownImage)
        );
    }

    impl Download {
        /// Recomputes every incremental count from scratch and compares.
        fn assert_consistent(&self) {
            let n = self.chunk_count as usize;
            assert_eq!(
                self.held_count as usize,
                self.held.iter().filter(|h| **h).count()
            );
            let mut req = vec![0u16; n];
            let mut wan = vec![0u8; n];
            let mut per_peer = vec![0usize; self.peers.len()];
            for (&(slot, idx), r) in &self.requests {
                req[idx as usize] += 1;
                wan[idx as usize] += u8::from(r.wan);
                per_peer[slot] += 1;
            }
            assert_eq!(req, self.req_count);
            assert_eq!(wan, self.wan_count);
            assert!(wan.iter().all(|&w| w <= 1), "a chunk twice over the WAN");
            for (slot, p) in self.peers.iter().enumerate() {
                assert_eq!(per_peer[slot], p.inflight);
                assert_eq!(p.have.ones as usize, p.have.iter_ones().count());
            }
            for i in 0..n {
                let pos = self.pos_of[i];
                assert_eq!(self.order[pos as usize] as usize, i);
                let avail = self
                    .peers
                    .iter()
                    .filter(|p| p.counts_for_lan() && p.have.get(pos))
                    .count();
                assert_eq!(
                    self.lan_avail[i] as usize, avail,
                    "availability of chunk {i}"
                );
                for (level, bits) in self.levels.iter().enumerate() {
                    let expect = self.is_wanted(i) && level == self.level(i);
                    assert_eq!(bits.get(pos), expect, "chunk {i} at level {level}");
                }
            }
            for bits in &self.levels {
                assert_eq!(bits.ones as usize, bits.iter_ones().count());
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn bookkeeping_stays_consistent(
            ops in proptest::collection::vec((0u8..10, 0u8..6, 0u32..80, 1u32..80), 1..150),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut c = cfg();
            c.max_inflight_lan = 3;
            c.max_inflight_wan = 2;
            c.max_inflight_bridgehead = 4;
            let mut d = Download::new(70, |i| i % 9 == 0, c, seed);
            let peers: Vec<PeerId> = (1..=6).map(pid).collect();
            let base = Instant::now();
            let mut t = Duration::ZERO;
            let kinds = [
                SourceKind::Lan,
                SourceKind::LocalBridgehead,
                SourceKind::RemoteBridgehead,
            ];
            let failures = [
                Failure::NotHeld,
                Failure::Corrupt,
                Failure::Timeout,
                Failure::Refused,
                Failure::Busy,
                Failure::Disconnected,
                Failure::UnknownImage,
            ];
            let mut sent: Vec<(PeerId, u32)> = Vec::new();
            for (op, p, a, b) in ops {
                let peer = peers[p as usize];
                let now = base + t;
                match op {
                    0 => d.add_peer(peer, kinds[(a % 3) as usize], b % 2 == 0),
                    1 => d.peer_has(&peer, &[(a, a + b)]),
                    2 => d.remove_peer(&peer),
                    3 => d.prioritize(a),
                    4 | 5 => sent.extend(d.next_requests(now)),
                    6 if !sent.is_empty() => {
                        let (q, i) = sent.swap_remove(a as usize % sent.len());
                        d.on_chunk(&q, i, now);
                    }
                    7 if !sent.is_empty() => {
                        let (q, i) = sent.swap_remove(a as usize % sent.len());
                        d.on_failure(&q, i, failures[(b % 7) as usize], now);
                    }
                    8 => d.mark_held(a),
                    _ => {
                        t += Duration::from_millis(u64::from(a) * 500);
                        d.expire(base + t);
                    }
                }
                d.assert_consistent();
            }
        }
    }

    #[test]
    fn bits_track_ones() {
        let mut b = Bits::new(130);
        assert!(b.set(0) && b.set(64) && b.set(129));
        assert!(!b.set(64));
        assert!(!b.set(130), "out of range is ignored");
        assert_eq!(b.ones, 3);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(b.clear(64) && !b.clear(64));
        assert!(b.get(129) && !b.get(64) && !b.get(500));
    }
}
