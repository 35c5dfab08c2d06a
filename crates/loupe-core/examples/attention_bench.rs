//! Decode attention on Qwen2-VL-2B's shapes (12 query heads over 2 KV heads of 128): one query row
//! against caches of several lengths, kept in f32 and in f16, cycling through 64 caches (one per
//! layer and then some) so that, as in decode, the cache comes from memory rather than from the CPU
//! caches.
//!
//! `cargo run --release -p loupe-core --example attention_bench` (threads: candle's,
//! `RAYON_NUM_THREADS`; `CACHES=2` cycles through 2 caches instead, which stay in the L3 cache).
use std::time::Instant;

use half::f16;
use loupe_core::kernels::attention::{decode_attention, CacheValue, Shape};
use loupe_core::kernels::Isa;

fn main() {
    let isa = Isa::detect();
    let count: usize = std::env::var("CACHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    println!(
        "isa {isa:?}, threads {}",
        candle_core::utils::get_num_threads()
    );
    println!(
        "| cache length | f32: µs per layer | GB/s | f16: µs per layer | GB/s | f16 / f32 time |"
    );
    println!("|---|---|---|---|---|---|");
    for keys in [256, 512, 1024, 2048, 4096] {
        let (t32, gb32) = bench(isa, count, keys, |x| x);
        let (t16, gb16) = bench(isa, count, keys, f16::from_f32);
        println!(
            "| {keys} | {:.1} | {gb32:.1} | {:.1} | {gb16:.1} | {:.2} |",
            t32 * 1e6,
            t16 * 1e6,
            t16 / t32
        );
    }
}

/// Seconds per call and the cache's GB/s for caches of `keys` rows stored through `store`.
fn bench<T: CacheValue>(isa: Isa, count: usize, keys: usize, store: fn(f32) -> T) -> (f64, f64) {
    let (heads, kv_heads, dim) = (12, 2, 128);
    let caches: Vec<(Vec<T>, Vec<T>)> = (0..count)
        .map(|c| {
            let r = |s: usize| -> Vec<T> {
                (0..kv_heads * keys * dim)
                    .map(|i| store(((i * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0))
                    .collect()
            };
            (r(2 * c), r(2 * c + 1))
        })
        .collect();
    let q: Vec<f32> = (0..heads * dim).map(|i| (i % 7) as f32 / 7.0).collect();
    let shape = Shape {
        heads,
        kv_heads,
        rows: 1,
        dim,
        keys,
        head_stride: keys * dim,
        row_stride: dim,
    };
    let scale = 1.0 / (dim as f32).sqrt();
    let run = |i: usize| {
        let (k, v) = &caches[i % caches.len()];
        std::hint::black_box(decode_attention(isa, &q, k, v, shape, scale));
    };
    (0..count).for_each(run);
    let reps = 64 * 8;
    let t = Instant::now();
    (0..reps).for_each(run);
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    let bytes = 2 * kv_heads * keys * dim * size_of::<T>();
    (secs, bytes as f64 / secs / 1e9)
}
