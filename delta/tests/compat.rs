//! Old delta files keep applying: `data/v1-small.delta` was written by the version 1
//! encoder (before format version 2), `data/v2-small.delta` by the version 2 encoder
//! (before version 3) and `data/v3-small.delta` by the version 3 encoder (before
//! version 4) for the pair `pair()` rebuilds here, and every later build must
//! still apply them bit-exactly, through the in-memory and the file API.

use std::fs;

use bids_delta::{apply, apply_bytes, read_header, verify};

/// xorshift bytes: the same for a seed on every platform.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect()
}

/// Text-like bytes (compressible), so the fixture holds zstd literal frames.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"image ",
        b"delta ",
        b"bridgehead ",
        b"chunk ",
        b"manifest ",
        b"idc ",
        b"host ",
        b"\n",
    ];
    noise(seed, len / 4)
        .iter()
        .flat_map(|&r| words[(r & 7) as usize].iter().copied())
        .take(len)
        .collect()
}

/// A 384 KiB base and a target with changed, moved, shifted, zeroed and appended bytes.
fn pair() -> (Vec<u8>, Vec<u8>) {
    let mut a = noise(11, 384 << 10);
    a[200_000..260_000].fill(0);
    let mut b = a.clone();
    b[4096 * 2..4096 * 3].copy_from_slice(&text(12, 4096));
    let moved = a[4096 * 5..4096 * 9].to_vec();
    b[4096 * 40..4096 * 44].copy_from_slice(&moved);
    let shifted = a[100_000..140_000].to_vec();
    b[300_777..340_777].copy_from_slice(&shifted);
    b[350_000..360_000].fill(0);
    b.extend(text(13, 20_000));
    (a, b)
}

const V1_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/v1-small.delta");
const V2_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/v2-small.delta");
const V3_FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/v3-small.delta");

fn fixture_applies(path: &str, version: u8) {
    let (a, b) = pair();
    let delta = fs::read(path).unwrap();
    assert_eq!(
        delta[7], version,
        "the fixture is a version {version} delta"
    );
    assert_eq!(apply_bytes(&a, &delta).unwrap(), b);

    let dir = tempfile::tempdir().unwrap();
    let (pa, pd, po) = (
        dir.path().join("a"),
        dir.path().join("d"),
        dir.path().join("o"),
    );
    fs::write(&pa, &a).unwrap();
    fs::write(&pd, &delta).unwrap();
    let h = verify(&pd).unwrap();
    assert_eq!(h.version, version);
    assert_eq!(read_header(&pd).unwrap(), h);
    let st = apply(&pa, &pd, &po).unwrap();
    assert_eq!(st.to_size, b.len() as u64);
    assert!(
        st.literal_bytes > 0 && st.copied_bytes > 0 && st.zero_bytes > 0,
        "{st:?}"
    );
    assert_eq!(fs::read(&po).unwrap(), b);
}

#[test]
fn version_1_delta_still_applies() {
    fixture_applies(V1_FIXTURE, 1);
}

#[test]
fn version_2_delta_still_applies() {
    fixture_applies(V2_FIXTURE, 2);
}

#[test]
fn version_3_delta_still_applies() {
    fixture_applies(V3_FIXTURE, 3);
}
