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
