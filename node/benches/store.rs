//! Chunk store hot paths, each beside a reference measured in the same run:
//! - import of a 64 MiB file vs. reading it and hashing it (SHA-256 + MD5) with no store;
//! - write_chunk (verify + pwrite into a fresh sparse file) of 1 MiB chunks vs. SHA-256 +
//!   memcpy;
//! - read_chunk of 1 MiB chunks vs. a plain positional read of the same bytes;
//! - export of a 64 MiB image vs. copying the stored file with std::fs::copy.

use bids_node::store::{Store, StoreOptions};
use bids_protocols::manifest::{chunk_info, sha256, Manifest, ObjectKind};
use bids_protocols::ImageRef;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use md5::Digest;
use rand::{RngCore, SeedableRng};
use std::fs;
use std::hint::black_box;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const MIB: usize = 1024 * 1024;
const IMAGE: usize = 64 * MIB;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn bench_import(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    fs::write(&src, random(IMAGE, 1)).unwrap();
    let mut g = c.benchmark_group("import_64MiB");
    g.throughput(Throughput::Bytes(IMAGE as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("reference_read_sha256_md5", |b| {
        b.iter(|| {
            let mut f = fs::File::open(&src).unwrap();
            let mut buf = vec![0u8; MIB];
            let mut acc = 0u8;
            while f.read_exact(&mut buf).is_ok() {
                acc ^= sha256(&buf)[0] ^ md5::Md5::digest(&buf)[0];
            }
            black_box(acc)
        })
    });
    let mut n = 0u64;
    g.bench_function("store_import", |b| {
        b.iter_batched(
            || {
                n += 1;
                let d = tempfile::tempdir_in(dir.path()).unwrap();
                let s = Store::open(d.path()).unwrap();
                (d, s, ImageRef::new("bench", &n.to_string()).unwrap())
            },
            |(d, s, image)| {
                let m = s
                    .import(
                        &src,
                        &image,
                        MIB as u32,
                        None,
                        ObjectKind::Image,
                        &mut |_, _| {},
                    )
                    .unwrap();
                black_box(m);
                (d, s)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_chunks(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data = random(IMAGE, 2);
    let m = Manifest {
        name: "bench".into(),
        version: "1".into(),
        base: None,
        kind: ObjectKind::Image,
        size: IMAGE as u64,
        chunk_size: MIB as u32,
        chunks: data.chunks(MIB).map(chunk_info).collect(),
    };
    let id = m.id();
    let opts = StoreOptions::default();

    let mut g = c.benchmark_group("chunk_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("reference_sha256_memcpy", |b| {
        let mut dst = vec![0u8; MIB];
        let mut i = 0;
        b.iter(|| {
            let chunk = &data[i * MIB..(i + 1) * MIB];
            black_box(sha256(chunk));
            dst.copy_from_slice(chunk);
            i = (i + 1) % 64;
            black_box(&dst);
        })
    });
    // Each sample writes into a fresh image: a held chunk would be skipped.
    let mut round = 0u64;
    g.bench_function("write_chunk", |b| {
        b.iter_batched(
            || {
                round += 1;
                let d = tempfile::tempdir_in(dir.path()).unwrap();
                let s = Store::open_with(d.path(), opts.clone()).unwrap();
                s.add_manifest(&m).unwrap();
                (d, s, (round % 64) as u32)
            },
            |(d, s, i)| {
                let chunk = &data[i as usize * MIB..(i as usize + 1) * MIB];
                assert!(s.write_chunk(&id, i, chunk).unwrap());
                (d, s)
            },
            BatchSize::PerIteration,
        )
    });

    let d = tempfile::tempdir_in(dir.path()).unwrap();
    let s = Store::open_with(d.path(), opts).unwrap();
    s.add_manifest(&m).unwrap();
    for i in 0..64u32 {
        s.write_chunk(&id, i, &data[i as usize * MIB..(i as usize + 1) * MIB])
            .unwrap();
    }
    s.flush().unwrap();
    let file = fs::File::open(s.image_path(&id)).unwrap();
    g.bench_function("reference_pread", |b| {
        let mut i = 0u64;
        b.iter(|| {
            let mut buf = vec![0u8; MIB];
            file.read_exact_at(&mut buf, i * MIB as u64).unwrap();
            i = (i + 1) % 64;
            black_box(buf)
        })
    });
    g.bench_function("read_chunk", |b| {
        let mut i = 0u32;
        b.iter(|| {
            let v = s.read_chunk(&id, i).unwrap();
            i = (i + 1) % 64;
            black_box(v)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("export_64MiB");
    g.throughput(Throughput::Bytes(IMAGE as u64));
    g.sample_size(10);
    let out = dir.path().join("out.img");
    g.bench_function("reference_fs_copy", |b| {
        b.iter(|| fs::copy(s.image_path(&id), &out).unwrap())
    });
    g.bench_function("store_export", |b| {
        b.iter(|| s.export(&id, &out, &mut |_, _| {}).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_import, bench_chunks);
criterion_main!(benches);
