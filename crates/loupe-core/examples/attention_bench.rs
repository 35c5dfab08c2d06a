//! Decode attention on Qwen2-VL-2B's shapes (12 query heads over 2 KV heads of 128): one query row
//! against caches of several lengths, cycling through 64 caches (one per layer and then some) so
//! that, as in decode, the cache comes from memory rather than from the CPU caches.
//!
//! `cargo run --release -p loupe-core --example attention_bench` (threads: candle's,
//! `RAYON_NUM_THREADS`; `CACHES=2` cycles through 2 caches instead, which stay in the L3 cache).
use std::time::Instant;

use loupe_core::kernels::attention::{decode_attention, Shape};
use loupe_core::kernels::Isa;

fn main() {
    let isa = Isa::detect();
    let (heads, kv_heads, dim) = (12, 2, 128);
    let count: usize = std::env::var("CACHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    println!(
        "isa {isa:?}, threads {}",
        candle_core::utils::get_num_threads()
    );
    println!("| cache length | µs per layer | cache GB/s |");
    println!("|---|---|---|");
    for keys in [256, 512, 1024, 2048] {
        let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..count)
            .map(|c| {
                let r = |s: usize| -> Vec<f32> {
                    (0..kv_heads * keys * dim)
                        .map(|i| ((i * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0)
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
        let bytes = 2 * kv_heads * keys * dim * 4;
        println!(
            "| {keys} | {:.1} | {:.1} |",
            secs * 1e6,
            bytes as f64 / secs / 1e9
        );
    }
}
