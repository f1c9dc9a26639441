//! The [`ChunkStore`] contract: one set of behaviour tests run against the disk [`Store`]
//! (on a temporary directory) and the in-memory [`MemStore`], so the two cannot drift
//! apart. Each test takes a [`Fixture`]; the `contract!` macro makes one `#[test]` per
//! backend.

use super::*;
use std::os::unix::fs::FileExt;
use tempfile::TempDir;

/// Changes a stored chunk's bytes behind the store's back (bit rot at rest).
type Damage = Box<dyn Fn(&ImageId, ChunkIndex)>;

/// A store behind the trait, a way to damage a stored chunk behind its back, and the
/// directory it lives in (dropped last).
struct Fixture {
    store: Arc<dyn ChunkStore>,
    damage: Damage,
    _dir: Option<TempDir>,
}

fn disk() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let s = Arc::clone(&store);
    Fixture {
        store,
        damage: Box::new(move |id, idx| {
            let path = s.image_path(id);
            let f = File::options().read(true).write(true).open(path).unwrap();
            let off = s.manifest(id).unwrap().chunk_offset(idx);
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], off).unwrap();
        }),
        _dir: Some(dir),
    }
}

fn mem() -> Fixture {
    let store = Arc::new(MemStore::new(u64::MAX));
    let s = Arc::clone(&store);
    Fixture {
        store,
        damage: Box::new(move |id, idx| assert!(s.damage(id, idx), "chunk {idx} not damaged")),
        _dir: None,
    }
}

const CS: usize = 4096;

/// 8 chunks of 4 KiB, the last one 100 bytes; chunk 2 all zeros.
fn sample(name: &str) -> (Vec<u8>, Manifest) {
    let mut data: Vec<u8> = (0..7 * CS as u32 + 100)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    data[2 * CS..3 * CS].fill(0);
    let m = Manifest {
        name: name.into(),
        version: "1".into(),
        base: None,
        kind: ObjectKind::Image,
        size: data.len() as u64,
        chunk_size: CS as u32,
        chunks: data.chunks(CS).map(chunk_info).collect(),
    };
    (data, m)
}

fn chunk(data: &[u8], i: ChunkIndex) -> &[u8] {
    let start = i as usize * CS;
    &data[start..(start + CS).min(data.len())]
}

/// Data chunks of the sample (all but the zero chunk 2).
const DATA: [ChunkIndex; 7] = [0, 1, 3, 4, 5, 6, 7];

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_disk {
            $( #[test] fn $name() { super::$name(super::disk()) } )*
        }
        mod in_memory {
            $( #[test] fn $name() { super::$name(super::mem()) } )*
        }
    };
}

contract!(
    added_manifest_is_known_listed_and_idempotent,
    conflicting_and_invalid_manifests_are_refused,
    chunks_written_are_read_back,
    bad_hash_and_wrong_length_are_refused_with_nothing_written,
    unknown_images_and_bad_indexes_are_errors,
    held_missing_and_status_follow_partial_writes,
    removal_forgets_the_image_and_its_counters,
    touch_records_uses,
    damaged_chunks_are_marked_missing_and_reported_lost,
    space_needed_counts_only_missing_data_chunks,
    concurrent_writes_of_one_chunk_store_it_once,
);

fn added_manifest_is_known_listed_and_idempotent(f: Fixture) {
    let s = &*f.store;
    let (_, m) = sample("a");
    let id = m.id();
    assert!(s.manifest(&id).is_none() && s.list().is_empty());
    s.add_manifest(&m).unwrap();
    assert_eq!(*s.manifest(&id).unwrap(), m);
    assert_eq!(s.resolve(&m.image_ref()), Some(id));
    let st = s.status(&id).unwrap();
    assert_eq!((st.id, &st.image, st.size), (id, &m.image_ref(), m.size));
    assert_eq!(
        (st.held, st.total, st.complete),
        (1, 8, false),
        "zero chunk held"
    );
    assert_eq!((st.uses, st.last_used), (0, st.added_at));
    s.add_manifest(&m).unwrap();
    assert_eq!(s.list(), vec![st]);
    let (_, b) = sample("b");
    s.add_manifest(&b).unwrap();
    let names: Vec<String> = s.list().iter().map(|st| st.image.to_string()).collect();
    assert_eq!(names, vec!["a:1", "b:1"]);
}

fn conflicting_and_invalid_manifests_are_refused(f: Fixture) {
    let s = &*f.store;
    let (_, m) = sample("a");
    s.add_manifest(&m).unwrap();
    let mut other = m.clone();
    other.chunks[0].sha256[0] ^= 1;
    let err = s.add_manifest(&other).unwrap_err();
    assert!(
        matches!(err, StoreError::VersionExists { existing, .. } if existing == m.id()),
        "{err}"
    );
    assert!(s.manifest(&other.id()).is_none());
    let mut bad = sample("c").1;
    bad.chunks.pop();
    let err = s.add_manifest(&bad).unwrap_err();
    assert!(matches!(err, StoreError::InvalidManifest(_)), "{err}");
    assert!(s.resolve(&bad.image_ref()).is_none());
    assert_eq!(s.list().len(), 1);
}

fn chunks_written_are_read_back(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    assert_eq!(s.read_chunk(&id, 2).unwrap(), vec![0; CS], "zero chunk");
    for i in DATA {
        let fresh = if i % 2 == 0 {
            s.write_chunk(&id, i, chunk(&data, i))
        } else {
            s.write_verified_chunk(&id, i, chunk(&data, i))
        };
        assert!(fresh.unwrap(), "chunk {i}");
        assert!(s.has_chunk(&id, i));
    }
    assert!(
        !s.write_chunk(&id, 3, chunk(&data, 3)).unwrap(),
        "held already"
    );
    assert!(
        !s.write_chunk(&id, 2, chunk(&data, 2)).unwrap(),
        "zero chunk"
    );
    s.flush().unwrap();
    for i in 0..8 {
        assert_eq!(s.read_chunk(&id, i).unwrap(), chunk(&data, i), "chunk {i}");
    }
    assert!(s.status(&id).unwrap().complete);
    assert!(s.missing(&id).unwrap().is_empty());
    assert_eq!(s.held_ranges(&id).unwrap(), vec![(0, 8)]);
    assert!(s.verify(&id, &mut |_, _| {}).unwrap().is_empty());
    assert!(s.take_lost().is_empty());
}

fn bad_hash_and_wrong_length_are_refused_with_nothing_written(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    let mut bad = chunk(&data, 4).to_vec();
    bad[100] ^= 1;
    let err = s.write_chunk(&id, 4, &bad).unwrap_err();
    assert!(
        matches!(err, StoreError::BadChunk { index: 4, .. }),
        "{err}"
    );
    let err = s
        .write_chunk(&id, 7, &data[7 * CS..7 * CS + 99])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::WrongLength {
                index: 7,
                got: 99,
                want: 100,
                ..
            }
        ),
        "{err}"
    );
    let err = s.write_verified_chunk(&id, 0, &data[..CS + 1]).unwrap_err();
    assert!(
        matches!(err, StoreError::WrongLength { index: 0, .. }),
        "{err}"
    );
    assert!(!s.has_chunk(&id, 4) && !s.has_chunk(&id, 7) && !s.has_chunk(&id, 0));
    assert_eq!(s.missing(&id).unwrap(), DATA.to_vec(), "nothing written");
    assert!(matches!(
        s.read_chunk(&id, 4),
        Err(StoreError::NotHeld { .. })
    ));
    // Bad data for a chunk held already is still reported (the sender is penalised).
    s.write_chunk(&id, 4, chunk(&data, 4)).unwrap();
    let err = s.write_chunk(&id, 4, &bad).unwrap_err();
    assert!(matches!(err, StoreError::BadChunk { .. }), "{err}");
    assert_eq!(s.read_chunk(&id, 4).unwrap(), chunk(&data, 4));
}

fn unknown_images_and_bad_indexes_are_errors(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let (id, nobody) = (m.id(), ImageId([7; 32]));
    let unknown = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::UnknownImage(i)) if i == nobody),
            "{r:?}"
        );
    };
    unknown(s.read_chunk(&nobody, 0).map(drop));
    unknown(s.write_chunk(&nobody, 0, chunk(&data, 0)).map(drop));
    unknown(
        s.write_verified_chunk(&nobody, 0, chunk(&data, 0))
            .map(drop),
    );
    unknown(s.check_chunk(&nobody, 0).map(drop));
    unknown(s.verify(&nobody, &mut |_, _| {}).map(drop));
    unknown(s.remove(&nobody));
    assert!(s.status(&nobody).is_none() && s.held(&nobody).is_none());
    assert!(s.missing(&nobody).is_none() && s.held_ranges(&nobody).is_none());
    assert!(!s.has_chunk(&nobody, 0));
    s.touch(&nobody);
    s.save_counters(&nobody, &Counters::default()).unwrap();
    assert!(s.saved_counters().is_empty());
    s.add_manifest(&m).unwrap();
    let bad_index = |r: Result<(), StoreError>| {
        assert!(
            matches!(
                r,
                Err(StoreError::BadIndex {
                    index: 8,
                    count: 8,
                    ..
                })
            ),
            "{r:?}"
        );
    };
    bad_index(s.read_chunk(&id, 8).map(drop));
    bad_index(s.write_chunk(&id, 8, chunk(&data, 7)).map(drop));
    bad_index(s.check_chunk(&id, 8).map(drop));
    assert!(!s.has_chunk(&id, 8));
}

fn held_missing_and_status_follow_partial_writes(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    assert_eq!(s.missing(&id).unwrap(), DATA.to_vec());
    assert_eq!(s.held_ranges(&id).unwrap(), vec![(2, 3)]);
    for i in [0, 3, 7] {
        s.write_chunk(&id, i, chunk(&data, i)).unwrap();
    }
    let held = s.held(&id).unwrap();
    assert_eq!(
        held,
        vec![true, false, true, true, false, false, false, true]
    );
    assert_eq!(s.missing(&id).unwrap(), vec![1, 4, 5, 6]);
    assert_eq!(s.held_ranges(&id).unwrap(), vec![(0, 1), (2, 4), (7, 8)]);
    let st = s.status(&id).unwrap();
    assert_eq!((st.held, st.total, st.complete), (4, 8, false));
    assert_eq!(s.list()[0], st);
    for i in [1, 4, 5, 6] {
        s.write_verified_chunk(&id, i, chunk(&data, i)).unwrap();
    }
    assert!(s.status(&id).unwrap().complete);
}

fn removal_forgets_the_image_and_its_counters(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let (_, other) = sample("b");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    s.add_manifest(&other).unwrap();
    s.write_chunk(&id, 0, chunk(&data, 0)).unwrap();
    let c = Counters {
        wan_recv_bytes: 4096,
        wan_recv_chunks: 1,
        ..Counters::default()
    };
    s.save_counters(&id, &c).unwrap();
    s.save_counters(&other.id(), &Counters::default()).unwrap();
    let mut want = vec![(id, c), (other.id(), Counters::default())];
    want.sort_by_key(|(id, _)| *id);
    assert_eq!(s.saved_counters(), want);
    s.remove(&id).unwrap();
    assert!(s.manifest(&id).is_none() && s.status(&id).is_none());
    assert!(s.resolve(&m.image_ref()).is_none());
    assert!(!s.has_chunk(&id, 0));
    assert_eq!(s.saved_counters(), vec![(other.id(), Counters::default())]);
    assert_eq!(s.list().len(), 1);
    assert!(matches!(s.remove(&id), Err(StoreError::UnknownImage(_))));
    // Added again, it starts empty.
    s.add_manifest(&m).unwrap();
    assert_eq!(s.missing(&id).unwrap(), DATA.to_vec());
}

fn touch_records_uses(f: Fixture) {
    let s = &*f.store;
    let (_, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    s.touch(&id);
    s.touch(&id);
    let st = s.status(&id).unwrap();
    assert_eq!(st.uses, 2);
    assert!(st.last_used >= st.added_at);
}

fn damaged_chunks_are_marked_missing_and_reported_lost(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    for i in DATA {
        s.write_chunk(&id, i, chunk(&data, i)).unwrap();
    }
    for i in [1, 5, 6] {
        (f.damage)(&id, i);
    }
    let err = s.read_chunk(&id, 1).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                index: 1,
                count: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(!s.has_chunk(&id, 1));
    assert!(matches!(
        s.read_chunk(&id, 1),
        Err(StoreError::NotHeld { .. })
    ));
    assert_eq!(s.check_chunk(&id, 5).unwrap(), (CS as u64, true));
    assert_eq!(
        s.check_chunk(&id, 5).unwrap(),
        (0, false),
        "not held any more"
    );
    assert_eq!(s.check_chunk(&id, 2).unwrap(), (0, false), "all-zero");
    assert_eq!(s.check_chunk(&id, 7).unwrap(), (100, false));
    let mut last = 0;
    assert_eq!(s.verify(&id, &mut |done, _| last = done).unwrap(), vec![6]);
    assert_eq!(last, m.size, "progress reaches the end");
    assert_eq!(s.missing(&id).unwrap(), vec![1, 5, 6]);
    assert_eq!(s.take_lost(), vec![(id, 1), (id, 5), (id, 6)]);
    assert!(s.take_lost().is_empty());
    // Fetching them again repairs the image.
    for i in [1, 5, 6] {
        assert!(s.write_chunk(&id, i, chunk(&data, i)).unwrap());
    }
    assert!(s.verify(&id, &mut |_, _| {}).unwrap().is_empty());
    assert_eq!(s.read_chunk(&id, 6).unwrap(), chunk(&data, 6));
}

fn space_needed_counts_only_missing_data_chunks(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    let all = 6 * CS as u64 + 100;
    assert_eq!(s.bytes_needed(&m), all, "unknown image: every data chunk");
    s.add_manifest(&m).unwrap();
    assert_eq!(s.bytes_needed(&m), all);
    s.write_chunk(&id, 7, chunk(&data, 7)).unwrap();
    s.write_chunk(&id, 0, chunk(&data, 0)).unwrap();
    assert_eq!(s.bytes_needed(&m), all - 100 - CS as u64);
    assert!(s.free_space().unwrap() > 0);
    s.check_space(&m).unwrap();
}

fn concurrent_writes_of_one_chunk_store_it_once(f: Fixture) {
    let s = &*f.store;
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    // The same chunk from several peers at once (duplicate fetches): one write counts.
    let fresh: Vec<bool> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| s.write_chunk(&id, 5, chunk(&data, 5)).unwrap()))
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(fresh.iter().filter(|&&f| f).count(), 1, "{fresh:?}");
    assert_eq!(s.status(&id).unwrap().held, 2);
    assert_eq!(s.read_chunk(&id, 5).unwrap(), chunk(&data, 5));
}

/// Only [`MemStore`]'s capacity can be filled on purpose: a disk store's check and
/// refusal are the same variants, from `statvfs` and `ENOSPC`.
#[test]
fn mem_store_at_capacity_refuses_downloads_and_writes() {
    let s = MemStore::new(3 * CS as u64);
    let (data, m) = sample("a");
    let id = m.id();
    s.add_manifest(&m).unwrap();
    let err = s.check_space(&m).unwrap_err();
    assert!(
        matches!(err, StoreError::NoSpace { needed, free, .. }
            if needed == 6 * CS as u64 + 100 && free == 3 * CS as u64),
        "{err}"
    );
    assert!(err.to_string().contains("free some space"), "{err}");
    for i in [0, 1, 3] {
        assert!(s.write_chunk(&id, i, chunk(&data, i)).unwrap());
    }
    assert_eq!(s.free_space().unwrap(), 0);
    let err = s.write_chunk(&id, 7, chunk(&data, 7)).unwrap_err();
    assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
    assert!(!s.has_chunk(&id, 7), "a refused chunk is not held");
    assert_eq!(s.missing(&id).unwrap(), vec![4, 5, 6, 7]);
    assert!(
        !s.write_chunk(&id, 2, chunk(&data, 2)).unwrap(),
        "zero chunks take no space"
    );
    // A damaged chunk found at rest gives its space back, as does a removal.
    assert!(s.damage(&id, 3));
    assert!(s.check_chunk(&id, 3).unwrap().1);
    assert_eq!(s.free_space().unwrap(), CS as u64);
    assert!(s.write_chunk(&id, 7, chunk(&data, 7)).unwrap());
    s.remove(&id).unwrap();
    assert_eq!(s.free_space().unwrap(), 3 * CS as u64);
}

/// A chunk whose manifest entry does not flag it zero but whose bytes are all zeros is
/// held without taking space, as it would be a hole on disk.
#[test]
fn mem_store_keeps_no_bytes_for_unflagged_zero_data() {
    let s = MemStore::new(0);
    let (_, mut m) = sample("a");
    m.chunks[2].zero = false;
    s.add_manifest(&m).unwrap();
    let id = m.id();
    assert!(s.write_chunk(&id, 2, &[0; CS]).unwrap());
    assert_eq!(s.read_chunk(&id, 2).unwrap(), vec![0; CS]);
    assert!(!s.damage(&id, 2), "no stored bytes to damage");
    assert_eq!(s.free_space().unwrap(), 0);
}
