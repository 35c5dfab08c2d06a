//! One layer of the vision tower's attention on Qwen2-VL-2B's shapes (16 heads of 80 dims) over the
//! patches of one image, on the integer kernels of quantized towers (`kernels::attention_int`) and,
//! for scale, on the f32 ones: milliseconds per layer and the rate of its two products together
//! (`2 x heads x n^2 x dim` multiply-adds).
//!
//! `cargo run --release -p loupe-core --example vision_attention_bench [-- PATCHES...]` (default
//! 1024 and 4096: a 448² and a 896² image; threads: candle's, `RAYON_NUM_THREADS`; `F32=0` skips
//! the f32 kernels, which take seconds per layer at 4096).
use std::time::Instant;

use loupe_core::kernels::attention::{segment_attention, Products};
use loupe_core::kernels::Isa;

const HEADS: usize = 16;
const DIM: usize = 80;

fn main() {
    let isa = Isa::detect();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1024, 4096]
    } else {
        sizes
    };
    let f32_too = std::env::var("F32").as_deref() != Ok("0");
    println!(
        "isa {isa:?}, threads {}",
        candle_core::utils::get_num_threads()
    );
    println!("| patches | products | ms per layer | GMAC/s |");
    println!("|---|---|---|---|");
    for n in sizes {
        let mut kinds = vec![Products::Int];
        if f32_too {
            kinds.push(Products::F32);
        }
        for products in kinds {
            let ms = bench(isa, n, products);
            let macs = 2.0 * (HEADS * n * n * DIM) as f64;
            println!("| {n} | {products:?} | {ms:.1} | {:.0} |", macs / ms / 1e6);
        }
    }
}

/// The best of a few calls' milliseconds, after one to warm up.
fn bench(isa: Isa, n: usize, products: Products) -> f64 {
    let len = HEADS * n * DIM;
    let data = |seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 2654435761 + seed * 97) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    };
    let (q, k, v) = (data(1), data(2), data(3));
    let scale = 1.0 / (DIM as f32).sqrt();
    let run = || segment_attention(isa, &q, &k, &v, HEADS, DIM, &[n], scale, products);
    std::hint::black_box(run());
    let calls = if n > 2048 { 3 } else { 10 };
    (0..calls)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(run());
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}
