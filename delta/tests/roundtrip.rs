//! apply(build(A, B), A) == B for generated image pairs: shared and moved blocks,
//! regions shifted by non-multiples of the block size, zero runs, size changes, empty
//! files; in memory and through files.

use bids_delta::{apply_bytes, build_bytes, build_bytes_with, BuildOptions};
use proptest::prelude::*;

/// Deterministic filler so generated cases stay small to print.
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

/// A piece of an image.
#[derive(Debug, Clone)]
enum Piece {
    /// Incompressible bytes.
    Random {
        seed: u64,
        len: usize,
    },
    /// Compressible bytes (a short pattern repeated with variations).
    Text {
        seed: u64,
        len: usize,
    },
    Zero {
        len: usize,
    },
    /// Bytes of A: `pos` is a fraction (per mille) of A's length; `align` rounds the start
    /// down to a multiple of it (1 = unaligned, so content shifts by any amount).
    FromA {
        pos: u16,
        len: usize,
        align: usize,
    },
}

fn render(pieces: &[Piece], a: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match *p {
            Piece::Random { seed, len } => out.extend(noise(seed, len)),
            Piece::Text { seed, len } => {
                let pat = noise(seed, 13);
                out.extend((0..len).map(|i| {
                    if i % 97 == 5 {
                        (i / 97) as u8
                    } else {
                        pat[i % 13]
                    }
                }));
            }
            Piece::Zero { len } => out.resize(out.len() + len, 0),
            Piece::FromA { pos, len, align } => {
                if a.is_empty() {
                    continue;
                }
                let start = (a.len() * usize::from(pos) / 1000) / align * align;
                let end = (start + len).min(a.len());
                out.extend_from_slice(&a[start..end]);
            }
        }
    }
    out
}

fn base_piece(max: usize) -> impl Strategy<Value = Piece> {
    prop_oneof![
        (any::<u64>(), 0..max).prop_map(|(seed, len)| Piece::Random { seed, len }),
        (any::<u64>(), 0..max).prop_map(|(seed, len)| Piece::Text { seed, len }),
        (0..max).prop_map(|len| Piece::Zero { len }),
    ]
}

fn edit_piece(max: usize) -> impl Strategy<Value = Piece> {
    prop_oneof![
        3 => (0u16..1000, 0..max * 4, prop::sample::select(vec![1usize, 512, 4096]))
            .prop_map(|(pos, len, align)| Piece::FromA { pos, len, align }),
        1 => base_piece(max),
    ]
}

/// (A, B) where B reuses A's bytes at aligned and unaligned offsets between new pieces.
fn image_pair(max_piece: usize) -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::collection::vec(base_piece(max_piece), 0..12),
        prop::collection::vec(edit_piece(max_piece), 0..12),
    )
        .prop_map(|(pa, pb)| {
            let a = render(&pa, &[]);
            let b = render(&pb, &a);
            (a, b)
        })
}

fn small_opts() -> impl Strategy<Value = BuildOptions> {
    (
        prop::sample::select(vec![512usize, 1024, 4096]),
        any::<bool>(),
        prop::sample::select(vec![8192usize, 4 << 20]),
        1i32..6,
        1usize..4,
        prop::sample::select(vec![0usize, 1 << 20]),
    )
        .prop_map(
            |(block_size, rolling, rolling_max_run, level, threads, reference_max)| BuildOptions {
                block_size,
                rolling,
                rolling_max_run,
                level,
                frame_size: 64 << 10,
                threads,
                reference_max,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random pairs, small blocks and frames (many blocks, many frames per case).
    #[test]
    fn roundtrip_small_blocks((a, b) in image_pair(6000), opts in small_opts()) {
        let d = build_bytes_with(&a, &b, &opts).unwrap();
        let out = apply_bytes(&a, &d).unwrap();
        prop_assert_eq!(out, b);
    }

    /// Random pairs with the default options.
    #[test]
    fn roundtrip_default((a, b) in image_pair(40_000)) {
        let d = build_bytes(&a, &b).unwrap();
        prop_assert_eq!(apply_bytes(&a, &d).unwrap(), b);
    }

    /// Any single damaged byte (header, body or trailer) or any truncation is refused.
    #[test]
    fn damaged_or_truncated_delta_refused(
        (a, b) in image_pair(6000),
        pos in 0.0f64..1.0,
        mask in 1u8..=255,
    ) {
        let d = build_bytes(&a, &b).unwrap();
        let i = ((d.len() as f64 * pos) as usize).min(d.len() - 1);
        let mut bad = d.clone();
        bad[i] ^= mask;
        prop_assert!(apply_bytes(&a, &bad).is_err(), "flip {:#x} at {} accepted", mask, i);
        prop_assert!(apply_bytes(&a, &d[..i]).is_err(), "cut at {} accepted", i);
    }

    /// A body damaged behind a valid trailer (what a malicious or buggy builder could
    /// send) never panics or over-allocates: the decoder's own checks (record bounds,
    /// frame and block limits, COPY_OUT before the output position) or the output's
    /// SHA-256 refuse it, or it still rebuilds B exactly.
    #[test]
    fn damaged_body_with_valid_trailer_never_panics(
        (a, b) in image_pair(6000),
        pos in 0.0f64..1.0,
        mask in 1u8..=255,
        threads in 1usize..3,
    ) {
        use sha2::{Digest, Sha256};
        let opts = BuildOptions { level: 3, threads, ..Default::default() };
        let d = build_bytes_with(&a, &b, &opts).unwrap();
        let body_end = d.len() - bids_delta::TRAILER_LEN;
        let span = body_end - bids_delta::HEADER_LEN;
        let i = bids_delta::HEADER_LEN + ((span as f64 * pos) as usize).min(span - 1);
        let mut bad = d[..body_end].to_vec();
        bad[i] ^= mask;
        let sum = Sha256::digest(&bad);
        bad.extend_from_slice(&sum);
        if let Ok(out) = apply_bytes(&a, &bad) {
            prop_assert_eq!(out, b);
        }
    }

    /// B = A with bytes inserted and deleted at unaligned offsets: correct, and the
    /// rolling search keeps the delta far smaller than B.
    #[test]
    fn shifted_regions(seed in any::<u64>(), ins in 1usize..5000, at in 0usize..1000, del in 0usize..3000) {
        let a = noise(seed, 256 << 10);
        let at = a.len() * at / 1000;
        let mut b = a[..at].to_vec();
        b.extend(noise(seed ^ 1, ins));
        b.extend_from_slice(&a[(at + del).min(a.len())..]);
        let d = build_bytes(&a, &b).unwrap();
        prop_assert_eq!(&apply_bytes(&a, &d).unwrap(), &b);
        prop_assert!(d.len() < ins + 2048, "delta {} bytes for {} inserted", d.len(), ins);
    }
}

#[test]
fn empty_files() {
    let x = noise(5, 10_000);
    for (a, b) in [(&[][..], &[][..]), (&[][..], &x[..]), (&x[..], &[][..])] {
        let d = build_bytes(a, b).unwrap();
        assert_eq!(apply_bytes(a, &d).unwrap(), b);
    }
}

#[test]
fn identical_and_moved_blocks_cost_almost_nothing() {
    let a = noise(9, 4 << 20);
    let d = build_bytes(&a, &a).unwrap();
    assert!(d.len() < 200, "identical: {} bytes", d.len());

    // Reverse the order of A's 4 KiB blocks: every block moved.
    let b: Vec<u8> = a.chunks(4096).rev().flatten().copied().collect();
    let d = build_bytes(&a, &b).unwrap();
    assert_eq!(apply_bytes(&a, &d).unwrap(), b);
    assert!(d.len() < 1024 * 8, "reversed blocks: {} bytes", d.len());
}

#[test]
fn rolling_search_finds_unaligned_moves() {
    let a = noise(11, 1 << 20);
    let mut b = vec![0xAAu8; 777];
    b.extend_from_slice(&a[..512 << 10]);
    let with = build_bytes(&a, &b).unwrap();
    let without = build_bytes_with(
        &a,
        &b,
        &BuildOptions {
            rolling: false,
            // The frame's reference would find the shifted bytes too.
            reference_max: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(apply_bytes(&a, &with).unwrap(), b);
    assert_eq!(apply_bytes(&a, &without).unwrap(), b);
    assert!(with.len() < 1024, "with rolling: {}", with.len());
    assert!(
        without.len() > 500 << 10,
        "without rolling: {}",
        without.len()
    );
}

/// New data that B repeats (aligned, and shifted by a non-multiple of the block size) is
/// carried once: later copies come from B's own earlier bytes.
#[test]
fn repeated_new_data_is_stored_once() {
    let a = noise(21, 1 << 20);
    let new = noise(22, 3 << 20);
    let mut b = a.clone();
    b.extend_from_slice(&new); // at a block boundary
    b.extend_from_slice(&new); // aligned repeat
    b.extend_from_slice(&[7u8; 1234]);
    b.extend_from_slice(&new[..1 << 20]); // unaligned repeat
    for threads in [1, 2] {
        let opts = BuildOptions {
            threads,
            ..Default::default()
        };
        let d = build_bytes_with(&a, &b, &opts).unwrap();
        assert_eq!(apply_bytes(&a, &d).unwrap(), b);
        // Noise does not compress: the delta holds `new` once and little else.
        assert!(
            d.len() < new.len() + (64 << 10),
            "{threads} threads: delta {} bytes for {} new",
            d.len(),
            new.len()
        );
    }
}

/// B holds an edited copy of a region of A at another, unaligned place: no block of it
/// equals a block of A (an edit every 997 bytes), so only the literal frame's reference
/// (the regions of A it resembles) keeps it cheap.
#[test]
fn edited_copy_of_the_base_is_compressed_against_it() {
    let a = noise(31, 4 << 20);
    let mut b = noise(32, 1 << 20);
    let mut edited = a[(1 << 20) + 100..(1 << 20) + 100 + (512 << 10)].to_vec();
    for i in (0..edited.len()).step_by(997) {
        edited[i] ^= 0x5A;
    }
    b.extend_from_slice(&edited);
    b.extend(noise(33, 777));
    let level = |reference_max| BuildOptions {
        level: 3,
        reference_max,
        ..Default::default()
    };
    let with = build_bytes_with(&a, &b, &level(16 << 20)).unwrap();
    let without = build_bytes_with(&a, &b, &level(0)).unwrap();
    assert_eq!(apply_bytes(&a, &with).unwrap(), b);
    assert_eq!(apply_bytes(&a, &without).unwrap(), b);
    // Without: the new 1 MiB and the edited 512 KiB, both noise. With: the edits cost a
    // few bytes each.
    assert!(without.len() > (1 << 20) + (500 << 10), "{}", without.len());
    assert!(with.len() < (1 << 20) + (64 << 10), "{}", with.len());
}

/// New data repeated far away (past the frame and the rolling search's run limit) at an
/// unaligned offset is carried once.
#[test]
fn far_unaligned_repeat_of_new_data_is_carried_once() {
    let a = noise(41, 1 << 20);
    let new = noise(42, 2 << 20);
    let mut b = a.clone();
    b.extend_from_slice(&new);
    b.extend(noise(43, (6 << 20) + 1234));
    b.extend_from_slice(&new[..1 << 20]);
    let opts = BuildOptions {
        level: 3,
        frame_size: 1 << 20,
        ..Default::default()
    };
    let d = build_bytes_with(&a, &b, &opts).unwrap();
    assert_eq!(apply_bytes(&a, &d).unwrap(), b);
    let fresh = new.len() + (6 << 20) + 1234;
    assert!(
        d.len() < fresh + (64 << 10),
        "delta {} bytes for {} new",
        d.len(),
        fresh
    );
}

/// Code-like new data (a CALL every 16 bytes) twice, at different offsets, the second
/// copy edited every 200 bytes (so it is no exact repeat): the x86 filter would make
/// the copies' call targets differ, so the frame is compressed without it, and the
/// second copy costs little.
#[test]
fn x86_filter_is_not_used_where_it_hurts() {
    let a = noise(51, 1 << 20);
    let r = noise(52, 256 << 10);
    let mut code = Vec::with_capacity(256 << 10);
    for unit in r.chunks(16) {
        code.push(0xE8);
        code.extend_from_slice(&[unit[0], unit[1], 0x0F & unit[2], 0x00]);
        code.extend_from_slice(&unit[5..]);
    }
    let mut edited = code.clone();
    for i in (0..edited.len()).step_by(200) {
        edited[i] ^= 0x01;
    }
    let mut b = a.clone();
    b.extend_from_slice(&code);
    b.extend(noise(53, 1000));
    b.extend_from_slice(&edited);
    let d = build_bytes(&a, &b).unwrap();
    assert_eq!(apply_bytes(&a, &d).unwrap(), b);
    assert!(
        d.len() < code.len() + code.len() / 16,
        "delta {} bytes for {} bytes of code twice",
        d.len(),
        code.len()
    );
}

/// New data repeated with edits (too short between them for copies) several frames
/// later is compressed against the output already written (version 4): the edits cost
/// a few bytes each, not the whole repeat.
#[test]
fn edited_repeat_of_new_data_is_compressed_against_the_output() {
    let a = noise(51, 1 << 20);
    let new = noise(52, 1 << 20);
    let mut b = a.clone();
    b.extend_from_slice(&new);
    b.extend(noise(53, (3 << 20) + 555));
    let mut edited = new[100_000..100_000 + (512 << 10)].to_vec();
    for i in (0..edited.len()).step_by(97) {
        edited[i] ^= 0x5A;
    }
    b.extend_from_slice(&edited);
    let opts = |reference_max| BuildOptions {
        level: 3,
        frame_size: 1 << 20,
        reference_max,
        ..Default::default()
    };
    let with = build_bytes_with(&a, &b, &opts(16 << 20)).unwrap();
    let without = build_bytes_with(&a, &b, &opts(0)).unwrap();
    assert_eq!(apply_bytes(&a, &with).unwrap(), b);
    assert_eq!(apply_bytes(&a, &without).unwrap(), b);
    assert!(
        with.len() + (400 << 10) < without.len(),
        "{} bytes with references, {} without",
        with.len(),
        without.len()
    );
    // Applied through a file, where the reference is read back from the output file.
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb, pd, po) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("d"),
        dir.path().join("out"),
    );
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    let st = bids_delta::build(&pa, &pb, &pd, &opts(16 << 20)).unwrap();
    assert!(st.output_reference_bytes > 0, "{st:?}");
    bids_delta::apply(&pa, &pd, &po).unwrap();
    assert_eq!(std::fs::read(&po).unwrap(), b);
}
