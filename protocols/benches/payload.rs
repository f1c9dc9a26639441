//! Encoding a chunk for the wire (`chunk::encode_payload`), as a node does for every chunk it
//! serves, beside a reference measured in the same run: copying the chunk once, the least
//! that handing it to the transport costs.
//! - an incompressible 1 MiB chunk (random bytes): the sample says raw, nothing is compressed;
//! - a text-like 1 MiB chunk: it is compressed whole.

use bids_protocols::chunk::encode_payload;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{RngCore, SeedableRng};
use std::hint::black_box;

const CHUNK: usize = 1 << 20;

fn random_chunk() -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut v);
    v
}

fn text_chunk() -> Vec<u8> {
    let words = [
        "image",
        "chunk",
        "bridgehead",
        "idc",
        "manifest",
        "delta",
        "host",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut v = Vec::with_capacity(CHUNK + 16);
    while v.len() < CHUNK {
        v.extend_from_slice(words[(rng.next_u32() as usize) % words.len()].as_bytes());
        v.push(b' ');
    }
    v.truncate(CHUNK);
    v
}

fn bench_encode(c: &mut Criterion) {
    for (name, chunk) in [("random_1MiB", random_chunk()), ("text_1MiB", text_chunk())] {
        let mut g = c.benchmark_group(format!("encode_payload_{name}"));
        g.throughput(Throughput::Bytes(CHUNK as u64));
        g.bench_function("reference_copy", |b| {
            b.iter_batched(
                || chunk.clone(),
                |raw| black_box(bytes::Bytes::copy_from_slice(&raw)),
                BatchSize::LargeInput,
            )
        });
        g.bench_function("encode_payload", |b| {
            b.iter_batched(
                || chunk.clone(),
                |raw| black_box(encode_payload(raw)),
                BatchSize::LargeInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
