//! Build and apply of a synthetic 64 MiB image pair, each next to a reference measured in
//! the same run: zstd -3 of B (what shipping B whole costs) and a plain copy of B.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const SIZE: usize = 64 << 20;
const BLOCK: usize = 4096;

/// xorshift64*: deterministic, fast, good enough to fill test images.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Fills `buf` with text-like data (words from a small vocabulary): compressible ~3x,
/// like the binaries and text of a root filesystem.
fn fill_text(rng: &mut Rng, buf: &mut [u8]) {
    const WORDS: [&str; 16] = [
        "lib",
        "usr",
        "share",
        "doc",
        "debian",
        "package",
        "config",
        "the ",
        "and ",
        "x86_64",
        "linux",
        "gnu",
        "\n",
        "0x7f454c46",
        "status: install ok",
        "Version: ",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[rng.below(WORDS.len())].as_bytes();
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
        if i < buf.len() && rng.below(4) == 0 {
            buf[i] = rng.next() as u8;
            i += 1;
        }
    }
}

/// A: 40% of the blocks hold data (text-like, some random). B: A with 3% of the blocks
/// rewritten, 2% of the data moved to other aligned offsets, one 1 MiB region shifted by
/// 1000 bytes, 1% of new data written into free space, and a few blocks zeroed.
fn image_pair() -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let blocks = SIZE / BLOCK;
    let mut a = vec![0u8; SIZE];
    for j in 0..blocks {
        if rng.below(10) < 4 {
            let blk = &mut a[j * BLOCK..(j + 1) * BLOCK];
            if rng.below(5) == 0 {
                blk.iter_mut().for_each(|x| *x = rng.next() as u8);
            } else {
                fill_text(&mut rng, blk);
            }
        }
    }
    let mut b = a.clone();
    for _ in 0..blocks * 3 / 100 {
        let j = rng.below(blocks);
        fill_text(&mut rng, &mut b[j * BLOCK..(j + 1) * BLOCK]);
    }
    for _ in 0..blocks * 2 / 100 {
        let (from, to) = (rng.below(blocks), rng.below(blocks));
        let blk = a[from * BLOCK..(from + 1) * BLOCK].to_vec();
        b[to * BLOCK..(to + 1) * BLOCK].copy_from_slice(&blk);
    }
    let src = 8 << 20;
    let shifted = a[src..src + (1 << 20)].to_vec();
    b[src + 1000..src + 1000 + (1 << 20)].copy_from_slice(&shifted);
    for _ in 0..blocks / 100 {
        let j = rng.below(blocks);
        fill_text(&mut rng, &mut b[j * BLOCK..(j + 1) * BLOCK]);
    }
    for _ in 0..blocks / 200 {
        let j = rng.below(blocks);
        b[j * BLOCK..(j + 1) * BLOCK].fill(0);
    }
    (a, b)
}

fn bench(c: &mut Criterion) {
    let (a, b) = image_pair();
    let delta = match bids_delta::build_bytes(&a, &b) {
        Ok(d) => d,
        Err(e) => panic!("building the bench delta failed: {e}"),
    };
    let zstd_b = zstd::bulk::compress(&b, 3).unwrap_or_default();
    println!(
        "64 MiB pair: delta {} bytes, zstd -3 of B {} bytes ({:.1}x smaller)",
        delta.len(),
        zstd_b.len(),
        zstd_b.len() as f64 / delta.len() as f64
    );

    let mut g = c.benchmark_group("delta_64MiB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("build", |it| {
        it.iter(|| bids_delta::build_bytes(black_box(&a), black_box(&b)).map(|d| d.len()))
    });
    g.bench_function("reference_zstd3_of_B", |it| {
        it.iter(|| zstd::bulk::compress(black_box(&b), 3))
    });
    g.bench_function("apply", |it| {
        it.iter(|| bids_delta::apply_bytes(black_box(&a), black_box(&delta)))
    });
    g.bench_function("reference_copy_of_B", |it| {
        it.iter(|| black_box(&b).to_vec())
    });

    // The same through files (mmap, hole-aware hashing, temporary file and rename).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (pa, pb, pd, po) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("ab.delta"),
        dir.path().join("b.out"),
    );
    std::fs::write(&pa, &a).unwrap_or_else(|e| panic!("write: {e}"));
    std::fs::write(&pb, &b).unwrap_or_else(|e| panic!("write: {e}"));
    let opts = bids_delta::BuildOptions::default();
    let must = |what: &str, r: Result<(), bids_delta::DeltaError>| {
        if let Err(e) = r {
            panic!("{what}: {e}");
        }
    };
    must("build", bids_delta::build(&pa, &pb, &pd, &opts).map(drop));
    // Outputs are removed in the (unmeasured) setup: replacing a file makes the
    // filesystem free (and maybe discard) the old blocks, which is not our cost.
    let rm = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
    };
    g.bench_function("build_files", |it| {
        it.iter_batched(
            || rm(&pd),
            |()| must("build", bids_delta::build(&pa, &pb, &pd, &opts).map(drop)),
            BatchSize::PerIteration,
        )
    });
    must("build", bids_delta::build(&pa, &pb, &pd, &opts).map(drop));
    let no_sync = bids_delta::ApplyOptions { sync: false };
    g.bench_function("apply_files_nosync", |it| {
        it.iter_batched(
            || rm(&po),
            |()| {
                must(
                    "apply",
                    bids_delta::apply_with(&pa, &pd, &po, &no_sync).map(drop),
                )
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("reference_copy_file", |it| {
        it.iter_batched(
            || rm(&po),
            |()| {
                std::fs::copy(&pb, &po)
                    .map(drop)
                    .unwrap_or_else(|e| panic!("copy: {e}"))
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
