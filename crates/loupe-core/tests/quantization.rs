//! Quantization at load keeps the model's answers: agreement with the f32 reference (top-1 and mean
//! KL divergence of the next-token distributions, over every position of the two-image prompt) stays
//! above a floor per format, so a kernel bug cannot hide behind "it's quantized". The fixtures' row
//! lengths are multiples of 32, so q8_0 and q4_0 quantize every projection; the k-quants need rows of
//! 256 and are measured on full-size shapes instead (docs/quantization.md).

mod common;

use candle_core::DType;
use common::*;
use loupe_core::{Engine, LoadOptions};

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// (top-1 agreement, mean KL(reference || quantized)) over all positions.
fn agreement(name: &str, quant: &str) -> (f64, f64) {
    let dir = fixtures().join("qwen2_vl").join(name);
    let e = Engine::load(
        dir.to_str().unwrap(),
        &LoadOptions {
            dtype: Some(DType::F32),
            quant: Some(loupe_core::engine::parse_quant(quant).unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    let r = Reference::load(dir.join("reference.safetensors"));
    let got = prompt_logits(&e, &reference_prompt(&r, &prompt_pixels(), "two_images"));
    let got = got.to_vec2::<f32>().unwrap();
    let want = r.get("two_images/logits").to_vec2::<f32>().unwrap();
    let (mut agree, mut kl) = (0usize, 0f64);
    for (g, w) in got.iter().zip(&want) {
        let top = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
        };
        agree += usize::from(top(g) == top(w));
        let (lg, lw) = (log_softmax(g), log_softmax(w));
        kl += lw
            .iter()
            .zip(&lg)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    (agree as f64 / got.len() as f64, kl / got.len() as f64)
}

#[test]
fn quantized_models_stay_close_to_f32() {
    // Measured (AVX2 machine): q8_0 top-1 0.92 / 0.80, KL 0.005 / 0.013; q4_0 top-1 0.48 / 0.43,
    // KL 0.42 / 1.14 (gqa2 / mha4). The fixtures' weights are large and structureless (init 0.25), so
    // quantization costs more here than on trained weights. The floors sit below the measured values
    // with room for other SIMD paths, and far above a broken kernel (top-1 near 1/434, KL of nats).
    let floors = [("q8_0", 0.70, 0.03), ("q4_0", 0.30, 2.0)];
    for name in ["gqa2_tied_published", "mha4_tied_bf16_v5"] {
        for (quant, min_agree, max_kl) in floors {
            let (agree, kl) = agreement(name, quant);
            eprintln!("{name} {quant}: top-1 agreement {agree:.3}, mean KL {kl:.5}");
            assert!(
                agree >= min_agree,
                "{name} {quant}: top-1 agreement {agree}"
            );
            assert!(kl <= max_kl, "{name} {quant}: mean KL {kl}");
        }
    }
}
