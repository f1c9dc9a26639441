//! The file API: round trips through mmap and sparse files, the header, and every way a
//! delta can be refused (wrong base, truncated, flipped byte, not a delta) without the
//! target being created or overwritten.

use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bids_delta::{
    apply, apply_bytes, build, build_bytes, read_header, verify, BuildOptions, DeltaError,
    HEADER_LEN, VERSION,
};
use sha2::{Digest, Sha256};

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

struct Fixture {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    delta: PathBuf,
    out: PathBuf,
    a_bytes: Vec<u8>,
    b_bytes: Vec<u8>,
}

/// A 2 MiB pair: B changes a few blocks, moves some, shifts a region, grows by 10000.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut a = noise(1, 2 << 20);
    a[1 << 20..(1 << 20) + 300_000].fill(0);
    let mut b = a.clone();
    b[4096 * 3..4096 * 4].copy_from_slice(&noise(2, 4096));
    let moved = a[4096 * 10..4096 * 20].to_vec();
    b[4096 * 100..4096 * 110].copy_from_slice(&moved);
    let shifted = a[500_000..600_000].to_vec();
    b[700_123..800_123].copy_from_slice(&shifted);
    b.extend(noise(3, 10_000));
    let f = Fixture {
        a: dir.path().join("a.img"),
        b: dir.path().join("b.img"),
        delta: dir.path().join("ab.delta"),
        out: dir.path().join("b.out"),
        _dir: dir,
        a_bytes: a,
        b_bytes: b,
    };
    fs::write(&f.a, &f.a_bytes).unwrap();
    fs::write(&f.b, &f.b_bytes).unwrap();
    f
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[test]
fn file_roundtrip_and_header() {
    let f = fixture();
    let st = build(&f.a, &f.b, &f.delta, &BuildOptions::default()).unwrap();
    assert_eq!(st.delta_size, fs::metadata(&f.delta).unwrap().len());
    assert_eq!(st.from_size, f.a_bytes.len() as u64);
    assert_eq!(st.to_size, f.b_bytes.len() as u64);
    assert_eq!(
        st.same_offset_bytes + st.moved_bytes + st.zero_bytes + st.literal_bytes,
        st.to_size
    );
    // The changed and appended bytes are literal; everything else was found in A.
    assert!(st.literal_bytes < 30_000, "{st:?}");
    assert!(st.delta_size < 30_000, "{st:?}");

    let h = read_header(&f.delta).unwrap();
    assert_eq!(h.version, VERSION);
    assert_eq!(h.block_size, 4096);
    assert_eq!(h.from_size, f.a_bytes.len() as u64);
    assert_eq!(h.to_size, f.b_bytes.len() as u64);
    assert_eq!(h.from_sha256, sha(&f.a_bytes));
    assert_eq!(h.to_sha256, sha(&f.b_bytes));
    assert_eq!(verify(&f.delta).unwrap(), h);

    let ap = apply(&f.a, &f.delta, &f.out).unwrap();
    assert_eq!(fs::read(&f.out).unwrap(), f.b_bytes);
    assert_eq!(ap.to_size, f.b_bytes.len() as u64);
    assert_eq!(
        ap.copied_bytes + ap.zero_bytes + ap.literal_bytes,
        ap.to_size
    );

    // The file and in-memory builders produce the same delta.
    assert_eq!(
        fs::read(&f.delta).unwrap(),
        build_bytes(&f.a_bytes, &f.b_bytes).unwrap()
    );
    // No temporary files left behind.
    let names: Vec<_> = fs::read_dir(f.a.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

#[test]
fn sparse_images_stay_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, d, o) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("d"),
        dir.path().join("o"),
    );
    let size = 64u64 << 20;
    let write_sparse = |p: &Path, parts: &[(u64, Vec<u8>)]| {
        let mut f = File::create(p).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in parts {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(data).unwrap();
        }
    };
    let data1 = noise(7, 1 << 20);
    let data2 = noise(8, 64 << 10);
    write_sparse(&a, &[(10 << 20, data1.clone())]);
    write_sparse(&b, &[(10 << 20, data1.clone()), (50 << 20, data2.clone())]);
    let st = build(&a, &b, &d, &BuildOptions::default()).unwrap();
    assert!(st.delta_size < 80 << 10, "{st:?}");
    assert_eq!(st.zero_bytes, size - (1 << 20) - (64 << 10));
    apply(&a, &d, &o).unwrap();
    let out = fs::read(&o).unwrap();
    assert_eq!(out.len() as u64, size);
    assert_eq!(&out[10 << 20..(10 << 20) + (1 << 20)], &data1[..]);
    assert_eq!(&out[50 << 20..(50 << 20) + (64 << 10)], &data2[..]);
    assert_eq!(sha(&out), sha(&fs::read(&b).unwrap()));
    // Zero runs were not written: far fewer than 64 MiB of blocks are allocated.
    let allocated = fs::metadata(&o).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "output allocates {allocated} bytes");
}

#[test]
fn wrong_base_refused_and_nothing_written() {
    let f = fixture();
    build(&f.a, &f.b, &f.delta, &BuildOptions::default()).unwrap();

    // Same size, one byte different.
    let mut other = f.a_bytes.clone();
    other[12345] ^= 1;
    let other_path = f.a.with_file_name("other.img");
    fs::write(&other_path, &other).unwrap();
    let err = apply(&other_path, &f.delta, &f.out).unwrap_err();
    assert!(matches!(err, DeltaError::WrongBase { .. }), "{err}");
    assert!(err.to_string().contains("wrong base image"), "{err}");
    assert!(!f.out.exists());

    // Different size.
    let err = apply(&f.b, &f.delta, &f.out).unwrap_err();
    assert!(matches!(err, DeltaError::WrongBase { .. }), "{err}");
    assert!(!f.out.exists());

    // An existing target is left untouched.
    fs::write(&f.out, b"keep me").unwrap();
    assert!(apply(&other_path, &f.delta, &f.out).is_err());
    assert_eq!(fs::read(&f.out).unwrap(), b"keep me");

    // In memory too.
    let d = fs::read(&f.delta).unwrap();
    assert!(matches!(
        apply_bytes(&other, &d),
        Err(DeltaError::WrongBase { .. })
    ));
}

#[test]
fn truncated_delta_refused() {
    let f = fixture();
    build(&f.a, &f.b, &f.delta, &BuildOptions::default()).unwrap();
    let d = fs::read(&f.delta).unwrap();
    let cut = f.delta.with_file_name("cut.delta");
    for len in [
        0,
        3,
        7,
        50,
        HEADER_LEN,
        HEADER_LEN + 1,
        d.len() / 2,
        d.len() - 1,
    ] {
        fs::write(&cut, &d[..len]).unwrap();
        let err = apply(&f.a, &cut, &f.out).unwrap_err();
        match (len, &err) {
            (0..=6, DeltaError::NotADelta { .. }) => {}
            (7.., DeltaError::Truncated { .. }) => {}
            _ => panic!("length {len}: unexpected {err}"),
        }
        assert!(!f.out.exists(), "length {len}");
        assert!(apply_bytes(&f.a_bytes, &d[..len]).is_err());
    }
    // Bytes appended after the trailer are refused too.
    let mut long = d.clone();
    long.push(0);
    assert!(matches!(
        apply_bytes(&f.a_bytes, &long),
        Err(DeltaError::Corrupt { .. })
    ));
}

#[test]
fn flipped_byte_refused() {
    let f = fixture();
    build(&f.a, &f.b, &f.delta, &BuildOptions::default()).unwrap();
    let d = fs::read(&f.delta).unwrap();
    let bad = f.delta.with_file_name("bad.delta");
    let step = (d.len() / 200).max(1);
    for pos in (0..d.len())
        .step_by(step)
        .chain([7, 8, 20, 40, 80, d.len() - 1])
    {
        let mut x = d.clone();
        x[pos] ^= 0x10;
        assert!(
            apply_bytes(&f.a_bytes, &x).is_err(),
            "flip at {pos} accepted"
        );
        if pos % (step * 20) == 0 {
            fs::write(&bad, &x).unwrap();
            assert!(apply(&f.a, &bad, &f.out).is_err(), "flip at {pos}");
            assert!(!f.out.exists());
        }
    }
}

/// Flips bytes and then recomputes the trailer, so only the bounds checks, the record
/// parser and the output hash stand between a damaged body and a wrong image: the result
/// must be an error or exactly B, never a panic or another image.
#[test]
fn damaged_body_with_valid_checksum_never_yields_wrong_output() {
    let a = noise(21, 60_000);
    let mut b = a.clone();
    b[5000..9000].copy_from_slice(&noise(22, 4000));
    b.splice(30_000..30_000, noise(23, 777));
    b.extend(vec![0u8; 20_000]);
    let d = build_bytes(&a, &b).unwrap();
    let body_end = d.len() - 32;
    for pos in HEADER_LEN..body_end {
        for mask in [0x01u8, 0xff] {
            let mut x = d.clone();
            x[pos] ^= mask;
            let sum = Sha256::digest(&x[..body_end]);
            x[body_end..].copy_from_slice(&sum);
            // Either refused, or (e.g. a copy source moved to equal bytes) exactly B.
            if let Ok(out) = apply_bytes(&a, &x) {
                assert_eq!(out, b, "flip {mask:#x} at {pos} gave another image");
            }
        }
    }
}

#[test]
fn not_a_delta_and_unknown_version() {
    let f = fixture();
    let junk = f.a.with_file_name("junk");
    fs::write(&junk, vec![b'x'; 500]).unwrap();
    assert!(matches!(
        read_header(&junk),
        Err(DeltaError::NotADelta { .. })
    ));
    assert!(matches!(
        apply(&f.a, &junk, &f.out),
        Err(DeltaError::NotADelta { .. })
    ));
    let mut d = build_bytes(&f.a_bytes, &f.b_bytes).unwrap();
    d[7] = VERSION + 1;
    fs::write(&junk, &d).unwrap();
    assert!(matches!(
        read_header(&junk),
        Err(DeltaError::UnsupportedVersion { .. })
    ));
    assert!(matches!(
        apply(&f.a, &junk, &f.out),
        Err(DeltaError::UnsupportedVersion { .. })
    ));
    assert!(!f.out.exists());
    let missing = f.a.with_file_name("missing");
    let err = apply(&missing, &f.delta, &f.out).unwrap_err();
    assert!(matches!(err, DeltaError::Io { .. }), "{err}");
}

#[test]
fn apply_replaces_an_existing_target_and_handles_empty_files() {
    let f = fixture();
    build(&f.a, &f.b, &f.delta, &BuildOptions::default()).unwrap();
    fs::write(&f.out, b"old contents").unwrap();
    apply(&f.a, &f.delta, &f.out).unwrap();
    assert_eq!(fs::read(&f.out).unwrap(), f.b_bytes);

    let empty = f.a.with_file_name("empty");
    File::create(&empty).unwrap();
    for (from, to) in [(&empty, &empty), (&empty, &f.b), (&f.a, &empty)] {
        build(from, to, &f.delta, &BuildOptions::default()).unwrap();
        let out = f.a.with_file_name("empty.out");
        apply(from, &f.delta, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(to).unwrap());
    }
}

/// Copies from the output already written (COPY_OUT) are read back from the file being
/// rebuilt, including from its holes, and verified like everything else.
#[test]
fn file_apply_reads_back_its_own_output() {
    let dir = tempfile::tempdir().unwrap();
    let a = noise(31, 1 << 20);
    let new = noise(32, 5 << 20);
    let mut b = a.clone();
    b.extend_from_slice(&new);
    b.extend(std::iter::repeat_n(0u8, 3 << 20)); // a hole in the output
    b.extend_from_slice(&new[..(2 << 20) + 100]);
    b.extend_from_slice(&new[4096..(1 << 20) + 7]);
    let (pa, pb, pd, po) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("d"),
        dir.path().join("o"),
    );
    fs::write(&pa, &a).unwrap();
    fs::write(&pb, &b).unwrap();
    let opts = BuildOptions {
        level: 3,
        ..Default::default()
    };
    let st = build(&pa, &pb, &pd, &opts).unwrap();
    assert!(st.own_bytes >= 3_000_000, "{st:?}");
    assert!(st.delta_size < new.len() as u64 + (64 << 10), "{st:?}");
    let ap = apply(&pa, &pd, &po).unwrap();
    assert_eq!(ap.to_size, b.len() as u64);
    assert_eq!(sha(&fs::read(&po).unwrap()), sha(&b));
}
