//! Versions and delta files in the index: the lineage of image versions (`Manifest::base`),
//! the table of delta files (objects whose manifest kind is `Delta { from, to }`) and the
//! cheapest upgrade path for a host that holds some versions. Deltas are ordinary published
//! objects, so nothing here is persisted on its own: the table is derived from the stored
//! manifests. Fetching and applying the deltas is the node's job.
//!
//! Path choice: a shortest path (Dijkstra, by bytes then by number of steps) over the
//! deltas that a live host holds completely, from every held version at once, compared
//! with fetching the target whole. Bytes are those of non-zero chunks, the ones that
//! travel. Any delta counts, not only deltas along the target's lineage: a delta is checked
//! against the SHA-256 of its base when applied, so a cross-lineage delta is as safe.

use super::{GisError, Index, ObjectKind};
use bids_protocols::gis::{ErrorKind, ImageQuery, UpgradePath, MAX_HAVE};
use bids_protocols::{ImageId, ImageRef, Manifest};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use tracing::debug;

/// Bytes of a manifest's non-zero chunks: what fetching the object whole moves.
pub(super) fn data_bytes(m: &Manifest) -> u64 {
    (0..m.chunk_count())
        .filter(|&i| !m.chunks[i as usize].zero)
        .map(|i| m.chunk_len(i) as u64)
        .sum()
}

/// Where a walk along `base` links ended.
#[derive(Debug, PartialEq, Eq)]
enum LineageEnd {
    /// A version without a base.
    Root,
    /// A base the GIS does not know (not published yet, or forgotten).
    Hole(ImageRef),
    /// The walk came back to a version it had passed: the refs, in walk order.
    Cycle(Vec<ImageRef>),
}

impl Index {
    /// Adds a just-known object to the delta table if it is a delta.
    pub(super) fn index_delta(&mut self, id: &ImageId) {
        if let Some(ObjectKind::Delta { from, .. }) = self.images.get(id).map(|s| &s.kind) {
            self.deltas.entry(*from).or_default().insert(*id);
        }
    }

    /// Removes a forgotten object from the delta table.
    pub(super) fn unindex_delta(&mut self, id: &ImageId, kind: &ObjectKind) {
        if let ObjectKind::Delta { from, .. } = kind {
            if let Some(set) = self.deltas.get_mut(from) {
                set.remove(id);
                if set.is_empty() {
                    self.deltas.remove(from);
                }
            }
        }
    }

    /// Refuses a new manifest that would make the version graph inconsistent: a delta from
    /// a version to itself, or an image whose `base` chain leads back to itself.
    pub(super) fn check_lineage(&self, m: &Manifest) -> Result<(), GisError> {
        match (&m.kind, &m.base) {
            (ObjectKind::Delta { from, to }, _) if from == to => Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "delta {} turns image {} into itself; a delta must join two different versions",
                    m.image_ref(),
                    from.short()
                ),
            )),
            (ObjectKind::Image, Some(base)) => {
                let me = m.image_ref();
                if let LineageEnd::Cycle(path) = self.walk_lineage(&me, base.clone()) {
                    return Err(GisError::new(
                        ErrorKind::BadRequest,
                        format!(
                            "image {me} with base {base} would close a cycle in the lineage ({}); a version must derive from an older one",
                            show_path(&path)
                        ),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Follows `base` links from `start` (the base of `me`) until a root, a hole or a
    /// version already passed (`me` included).
    fn walk_lineage(&self, me: &ImageRef, start: ImageRef) -> LineageEnd {
        let mut path = vec![me.clone()];
        let mut seen: BTreeSet<ImageRef> = BTreeSet::from([me.clone()]);
        let mut cur = start;
        loop {
            path.push(cur.clone());
            if !seen.insert(cur.clone()) {
                return LineageEnd::Cycle(path);
            }
            let Some(st) = self.by_ref.get(&cur).and_then(|id| self.images.get(id)) else {
                return LineageEnd::Hole(cur);
            };
            match &st.base {
                Some(b) => cur = b.clone(),
                None => return LineageEnd::Root,
            }
        }
    }

    /// Usable as a step: some live, listable host holds the delta completely.
    fn delta_available(&self, delta: &ImageId, now_ms: i64) -> bool {
        self.has_live_complete_holder(delta, now_ms)
    }

    fn has_live_complete_holder(&self, id: &ImageId, now_ms: i64) -> bool {
        self.holders.get(id).is_some_and(|hs| {
            hs.iter().any(|(p, hd)| {
                hd.complete
                    && self
                        .hosts
                        .get(p)
                        .is_some_and(|h| self.is_listable_host(h, now_ms))
            })
        })
    }

    /// The cheapest way for a host holding `have` to get `want` (see the module docs).
    /// `have` may name versions the GIS does not know: a delta from them still counts.
    pub fn upgrade_path(
        &self,
        have: &[ImageId],
        want: &ImageQuery,
        now_ms: i64,
    ) -> Result<UpgradePath, GisError> {
        if have.len() > MAX_HAVE {
            return Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "{} held versions named, at most {MAX_HAVE} are accepted; name the versions of the image you want",
                    have.len()
                ),
            ));
        }
        let target = self.resolve(want)?;
        let tid = target.info.id;
        let tref = ImageRef {
            name: target.info.name.clone(),
            version: target.info.version.clone(),
        };
        if target.kind != ObjectKind::Image {
            return Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "{tref} is a delta file, not an image version; ask for the version it leads to"
                ),
            ));
        }
        if let Some(base) = &target.base {
            match self.walk_lineage(&tref, base.clone()) {
                LineageEnd::Cycle(path) => {
                    return Err(GisError::new(
                        ErrorKind::Internal,
                        format!(
                            "the lineage of {tref} loops ({}); the GIS records are inconsistent: forget and republish one of these versions",
                            show_path(&path)
                        ),
                    ))
                }
                // Not an error: deltas from versions past the hole may still exist.
                LineageEnd::Hole(missing) => {
                    debug!(target = %tref, %missing, "lineage has a hole: a base version is not known")
                }
                LineageEnd::Root => {}
            }
        }
        let full_bytes = target.data_bytes;
        let mut path = UpgradePath {
            target: target.info.clone(),
            manifest: target.stored.manifest.clone(),
            base: None,
            steps: Vec::new(),
            bytes: full_bytes,
            full_bytes,
        };
        if have.contains(&tid) {
            path.base = Some(tid);
            path.bytes = 0;
            return Ok(path);
        }
        let full_available = self.has_live_complete_holder(&tid, now_ms);
        if let Some((base, steps, bytes)) = self.cheapest_chain(have, &tid, now_ms) {
            // Ties go to the whole image: same bytes, no apply work.
            if bytes < full_bytes || !full_available {
                path.base = Some(base);
                path.bytes = bytes;
                path.steps = steps
                    .iter()
                    .filter_map(|d| self.images.get(d).map(|s| s.info.clone()))
                    .collect();
            }
        }
        debug!(target = %tref, steps = path.steps.len(), bytes = path.bytes, full_bytes, "upgrade path served");
        Ok(path)
    }

    /// Dijkstra from every held version at once over available deltas; the cost of a path
    /// is (bytes, steps). Returns the start, the deltas in order and the bytes.
    fn cheapest_chain(
        &self,
        have: &[ImageId],
        target: &ImageId,
        now_ms: i64,
    ) -> Option<(ImageId, Vec<ImageId>, u64)> {
        let mut best: BTreeMap<ImageId, (u64, u32)> = BTreeMap::new();
        // How each reached version was reached: (delta, previous version).
        let mut prev: BTreeMap<ImageId, (ImageId, ImageId)> = BTreeMap::new();
        let mut heap = BinaryHeap::new();
        for h in have {
            if best.insert(*h, (0, 0)).is_none() {
                heap.push(Reverse((0u64, 0u32, *h)));
            }
        }
        while let Some(Reverse((bytes, hops, v))) = heap.pop() {
            if best.get(&v) != Some(&(bytes, hops)) {
                continue; // a stale entry: v was reached more cheaply since
            }
            if v == *target {
                let mut steps = Vec::new();
                let mut cur = v;
                while let Some((delta, from)) = prev.get(&cur) {
                    steps.push(*delta);
                    cur = *from;
                }
                steps.reverse();
                return Some((cur, steps, bytes));
            }
            for d in self.deltas.get(&v).into_iter().flatten() {
                let Some(st) = self.images.get(d) else {
                    continue;
                };
                let ObjectKind::Delta { to, .. } = st.kind else {
                    continue;
                };
                if !self.delta_available(d, now_ms) {
                    continue;
                }
                let cand = (bytes.saturating_add(st.data_bytes), hops + 1);
                if best.get(&to).is_none_or(|b| cand < *b) {
                    best.insert(to, cand);
                    prev.insert(to, (*d, v));
                    heap.push(Reverse((cand.0, cand.1, to)));
                }
            }
        }
        None
    }
}

fn show_path(path: &[ImageRef]) -> String {
    path.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexConfig;
    use crate::storage::{MemStorage, Snapshot, Storage, StoredImage};
    use bids_protocols::gis::{GisRequest, GisResponse, Holding};
    use bids_protocols::manifest::chunk_info;
    use bids_protocols::{Idc, Policy};
    use libp2p::identity::Keypair;
    use libp2p::PeerId;

    const T0: i64 = 1_700_000_000_000;
    const CHUNK: u32 = 4096;
    const CS: u64 = CHUNK as u64;

    /// An object of `data` non-zero chunks followed by `zeros` all-zero chunks. `seed`
    /// makes the content (and so the id) distinct.
    fn object(
        name: &str,
        version: &str,
        base: Option<&str>,
        kind: ObjectKind,
        data: usize,
        zeros: usize,
        seed: u8,
    ) -> Manifest {
        let mut chunks: Vec<_> = (0..data)
            .map(|i| {
                let mut b = vec![seed; CHUNK as usize];
                b[..8].copy_from_slice(&(i as u64).to_le_bytes());
                b[8] = 1;
                chunk_info(&b)
            })
            .collect();
        chunks.extend((0..zeros).map(|_| chunk_info(&[0u8; CHUNK as usize])));
        Manifest {
            name: name.into(),
            version: version.into(),
            base: base.map(|b| b.parse().unwrap()),
            kind,
            size: (data + zeros) as u64 * CS,
            chunk_size: CHUNK,
            chunks,
        }
    }

    struct W {
        ix: Index,
        host: PeerId,
        seed: u8,
    }

    impl W {
        fn new() -> W {
            let admin = Keypair::generate_ed25519().public().to_peer_id();
            let mut ix = Index::new(IndexConfig::new(admin, Policy::Bids));
            let host = Keypair::generate_ed25519().public().to_peer_id();
            ix.register(host, Idc::new("A").unwrap(), vec![], None, Policy::Bids, T0)
                .unwrap();
            W { ix, host, seed: 1 }
        }

        fn publish_by(&mut self, peer: PeerId, m: &Manifest, complete: bool) -> ImageId {
            let id = m.id();
            let holding = Holding {
                image: id,
                chunks_held: if complete { m.chunk_count() } else { 0 },
                complete,
                fetching: !complete,
            };
            self.ix.publish(peer, holding, &m.to_bytes(), T0).unwrap();
            id
        }

        /// Publishes image `a:<version>` with `data` non-zero and `zeros` zero chunks.
        fn image(
            &mut self,
            version: &str,
            base: Option<&str>,
            data: usize,
            zeros: usize,
        ) -> ImageId {
            self.seed += 1;
            let m = object(
                "a",
                version,
                base,
                ObjectKind::Image,
                data,
                zeros,
                self.seed,
            );
            self.publish_by(self.host, &m, true)
        }

        /// Publishes a delta `from` → `to` of `data` chunks.
        fn delta(&mut self, from: ImageId, to: ImageId, data: usize) -> ImageId {
            self.seed += 1;
            let v = format!("d{}", self.seed);
            let kind = ObjectKind::Delta { from, to };
            let m = object("a", &v, None, kind, data, 0, self.seed);
            self.publish_by(self.host, &m, true)
        }

        fn path(&self, have: &[ImageId], want: ImageId) -> UpgradePath {
            self.ix
                .upgrade_path(have, &ImageQuery::Id(want), T0)
                .unwrap()
        }
    }

    fn ids(p: &UpgradePath) -> Vec<ImageId> {
        p.steps.iter().map(|s| s.id).collect()
    }

    #[test]
    fn chain_of_small_deltas_beats_the_whole_image() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let v3 = w.image("3", Some("a:2"), 100, 0);
        let d12 = w.delta(v1, v2, 5);
        let d23 = w.delta(v2, v3, 5);
        let p = w.path(&[v1], v3);
        assert_eq!(p.base, Some(v1));
        assert_eq!(ids(&p), vec![d12, d23]);
        assert_eq!(p.bytes, 10 * CS);
        assert_eq!(p.full_bytes, 100 * CS);
        assert_eq!(p.target.id, v3);
        assert_eq!(
            Manifest::from_bytes_with_id(&p.manifest, v3)
                .unwrap()
                .version,
            "3"
        );
        // The newest held version is the better start.
        let p = w.path(&[v1, v2], v3);
        assert_eq!((p.base, ids(&p), p.bytes), (Some(v2), vec![d23], 5 * CS));
    }

    #[test]
    fn direct_delta_or_chain_whichever_is_smaller() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let v3 = w.image("3", Some("a:2"), 100, 0);
        let d12 = w.delta(v1, v2, 5);
        let d23 = w.delta(v2, v3, 5);
        w.delta(v1, v3, 12);
        assert_eq!(ids(&w.path(&[v1], v3)), vec![d12, d23]);
        // A cheaper direct delta wins over the two-step chain.
        let d13b = w.delta(v1, v3, 8);
        let p = w.path(&[v1], v3);
        assert_eq!((ids(&p), p.bytes), (vec![d13b], 8 * CS));
        // Equal bytes: fewer steps.
        let mut w2 = W::new();
        let v1 = w2.image("1", None, 100, 0);
        let v2 = w2.image("2", Some("a:1"), 100, 0);
        let v3 = w2.image("3", Some("a:2"), 100, 0);
        w2.delta(v1, v2, 5);
        w2.delta(v2, v3, 5);
        let direct = w2.delta(v1, v3, 10);
        assert_eq!(ids(&w2.path(&[v1], v3)), vec![direct]);
    }

    #[test]
    fn whole_image_when_deltas_move_more_or_as_much() {
        let mut w = W::new();
        let v1 = w.image("1", None, 40, 0);
        let v2 = w.image("2", Some("a:1"), 40, 0);
        w.delta(v1, v2, 60);
        let p = w.path(&[v1], v2);
        assert_eq!((p.base, p.steps.len(), p.bytes), (None, 0, 40 * CS));
        // A tie goes to the whole image too: same bytes, no apply work.
        let v3 = w.image("3", Some("a:2"), 40, 0);
        w.delta(v2, v3, 40);
        let p = w.path(&[v2], v3);
        assert_eq!((p.base, p.steps.len()), (None, 0));
    }

    #[test]
    fn full_image_counts_only_non_zero_chunks() {
        let mut w = W::new();
        let v1 = w.image("1", None, 10, 0);
        // 1000 chunks, but only 8 of them travel: an 8-chunk delta does not pay off.
        let v2 = w.image("2", Some("a:1"), 8, 992);
        w.delta(v1, v2, 8);
        let p = w.path(&[v1], v2);
        assert_eq!(p.full_bytes, 8 * CS);
        assert!(p.steps.is_empty());
        let d = w.delta(v1, v2, 3);
        let p = w.path(&[v1], v2);
        assert_eq!((ids(&p), p.bytes), (vec![d], 3 * CS));
    }

    #[test]
    fn holes_in_the_chain_fall_back_to_the_whole_image() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let v3 = w.image("3", Some("a:2"), 100, 0);
        let v4 = w.image("4", Some("a:3"), 100, 0);
        // 2 → 3 is missing.
        w.delta(v1, v2, 5);
        w.delta(v3, v4, 5);
        let p = w.path(&[v1], v4);
        assert_eq!((p.base, p.steps.len(), p.bytes), (None, 0, 100 * CS));
        // A lineage hole (a base the GIS never saw) is not an error either.
        let v9 = w.image("9", Some("a:8"), 100, 0);
        let p = w.path(&[v1], v9);
        assert_eq!(p.base, None);
    }

    #[test]
    fn delta_graph_cycles_are_harmless() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let v3 = w.image("3", Some("a:2"), 100, 0);
        let d12 = w.delta(v1, v2, 4);
        w.delta(v2, v1, 4);
        // A tiny delta to a side branch that leads nowhere further.
        let side = w.image("2b", Some("a:2"), 100, 0);
        w.delta(v2, side, 1);
        let d23 = w.delta(v2, v3, 4);
        w.delta(v3, v1, 1);
        let p = w.path(&[v1], v3);
        assert_eq!((ids(&p), p.bytes), (vec![d12, d23], 8 * CS));
    }

    #[test]
    fn held_target_and_unknown_versions() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        w.delta(v1, v2, 5);
        // Already held.
        let p = w.path(&[v1, v2], v2);
        assert_eq!((p.base, p.steps.len(), p.bytes), (Some(v2), 0, 0));
        // Held versions the GIS does not know lead nowhere: the whole image.
        let p = w.path(&[ImageId([9; 32])], v2);
        assert_eq!((p.base, p.steps.len()), (None, 0));
        // Unknown targets, by id and by name.
        let e =
            w.ix.upgrade_path(&[v1], &ImageQuery::Id(ImageId([7; 32])), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownImage);
        let e =
            w.ix.upgrade_path(&[v1], &ImageQuery::Ref("a:5".parse().unwrap()), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownImage);
        // By name works like by id.
        let p =
            w.ix.upgrade_path(&[v1], &ImageQuery::Ref("a:2".parse().unwrap()), T0)
                .unwrap();
        assert_eq!(p.steps.len(), 1);
    }

    #[test]
    fn a_delta_from_a_version_unknown_to_the_gis_still_counts() {
        let mut w = W::new();
        let v2 = w.image("2", None, 100, 0);
        let private = ImageId([5; 32]);
        let d = w.delta(private, v2, 5);
        assert_eq!(ids(&w.path(&[private], v2)), vec![d]);
    }

    #[test]
    fn a_delta_is_not_a_target_and_bad_requests_are_refused() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let d = w.delta(v1, v2, 5);
        let e =
            w.ix.upgrade_path(&[v1], &ImageQuery::Id(d), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let many = vec![v1; MAX_HAVE + 1];
        let e =
            w.ix.upgrade_path(&many, &ImageQuery::Id(v2), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        // A delta from a version to itself is refused at publish.
        let m = object(
            "a",
            "self",
            None,
            ObjectKind::Delta { from: v1, to: v1 },
            1,
            0,
            99,
        );
        let holding = Holding {
            image: m.id(),
            chunks_held: 1,
            complete: true,
            fetching: false,
        };
        let e =
            w.ix.publish(w.host, holding, &m.to_bytes(), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn lineage_cycles_are_refused_at_publish_and_reported_at_lookup() {
        let mut w = W::new();
        // a:1 derives from a:2, which is not known yet (a hole: accepted).
        let m1 = object("a", "1", Some("a:2"), ObjectKind::Image, 3, 0, 50);
        w.publish_by(w.host, &m1, true);
        // a:2 deriving from a:1 would close the loop.
        let m2 = object("a", "2", Some("a:1"), ObjectKind::Image, 3, 0, 51);
        let holding = Holding {
            image: m2.id(),
            chunks_held: 3,
            complete: true,
            fetching: false,
        };
        let e =
            w.ix.publish(w.host, holding, &m2.to_bytes(), T0)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("cycle"), "{}", e.message);
        // So is a version that names itself as its base.
        let m3 = object("a", "3", Some("a:3"), ObjectKind::Image, 3, 0, 52);
        let holding = Holding {
            image: m3.id(),
            chunks_held: 3,
            complete: true,
            fetching: false,
        };
        assert!(w.ix.publish(w.host, holding, &m3.to_bytes(), T0).is_err());

        // Records that loop anyway (written by an older GIS) make a path request fail
        // clearly instead of looping.
        let admin = Keypair::generate_ed25519().public().to_peer_id();
        let stored = |m: &Manifest| StoredImage {
            id: m.id(),
            manifest: m.to_bytes(),
            publisher: admin,
            published_ms: T0,
        };
        let snap = Snapshot {
            images: vec![stored(&m1), stored(&m2)],
            ..Snapshot::default()
        };
        let ix = Index::restore(IndexConfig::new(admin, Policy::Bids), snap);
        let e = ix
            .upgrade_path(&[], &ImageQuery::Id(m2.id()), T0)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("loops"), "{}", e.message);
    }

    #[test]
    fn only_deltas_a_live_host_holds_completely_count() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        // A delta only partly held by a second host: not usable.
        let other = Keypair::generate_ed25519().public().to_peer_id();
        w.ix.register(
            other,
            Idc::new("B").unwrap(),
            vec![],
            None,
            Policy::Bids,
            T0,
        )
        .unwrap();
        let m = object(
            "a",
            "partial",
            None,
            ObjectKind::Delta { from: v1, to: v2 },
            5,
            0,
            77,
        );
        w.publish_by(other, &m, false);
        assert!(w.path(&[v1], v2).steps.is_empty());
        // Complete, but its holder died: still not usable.
        w.publish_by(other, &m, true);
        assert_eq!(ids(&w.path(&[v1], v2)), vec![m.id()]);
        let late = T0 + 60_000;
        w.ix.heartbeat(w.host, Default::default(), late).unwrap();
        let p = w.ix.upgrade_path(&[v1], &ImageQuery::Id(v2), late).unwrap();
        assert!(p.steps.is_empty());
        // When nobody live holds the whole target, a dearer chain is better than nothing.
        let mut w = W::new();
        let v1 = w.image("1", None, 10, 0);
        let v2m = object("a", "2", Some("a:1"), ObjectKind::Image, 10, 0, 88);
        let v2 = v2m.id();
        let holder = other_host(&mut w);
        w.publish_by(holder, &v2m, true);
        let d = w.delta(v1, v2, 30);
        let late = T0 + 60_000;
        w.ix.heartbeat(w.host, Default::default(), late).unwrap();
        let p = w.ix.upgrade_path(&[v1], &ImageQuery::Id(v2), late).unwrap();
        assert_eq!((ids(&p), p.bytes), (vec![d], 30 * CS));
    }

    fn other_host(w: &mut W) -> PeerId {
        let p = Keypair::generate_ed25519().public().to_peer_id();
        w.ix.register(p, Idc::new("C").unwrap(), vec![], None, Policy::Bids, T0)
            .unwrap();
        p
    }

    #[test]
    fn delta_table_survives_restore_and_forget() {
        let mut w = W::new();
        let v1 = w.image("1", None, 100, 0);
        let v2 = w.image("2", Some("a:1"), 100, 0);
        let d = w.delta(v1, v2, 5);
        let mut storage = MemStorage::new();
        storage.commit(&w.ix.take_changes()).unwrap();
        let mut ix = Index::restore(w.ix.config().clone(), storage.load().unwrap());
        // Hosts start dead after a restore; the next heartbeat brings the delta back.
        ix.heartbeat(w.host, Default::default(), T0).unwrap();
        let resp = ix.handle(
            w.host,
            GisRequest::UpgradePath {
                have: vec![v1],
                want: ImageQuery::Ref("a:2".parse().unwrap()),
            },
            T0,
        );
        let GisResponse::UpgradePath(p) = resp else {
            panic!("unexpected answer {resp:?}");
        };
        assert_eq!(ids(&p), vec![d]);
        assert!(ix.forget_image(&d));
        assert!(ix
            .upgrade_path(&[v1], &ImageQuery::Id(v2), T0)
            .unwrap()
            .steps
            .is_empty());
        assert!(ix.deltas.is_empty());
    }
}
