//! Llama (Llama 3.x, 3.1, 3.2; SmolLM2): the shared decoder ([`Decoder`]) with its own options:
//! biases only where `attention_bias` (q, k, v and o) and `mlp_bias` say, one stream of plain RoPE
//! positions, the frequencies scaled as `rope_scaling` says (`llama3`, `linear`; in a GGUF, llama3 as
//! `rope_freqs.weight`), the head tied to the embeddings or not. Text only.

use candle_core::DType;

use super::decoder::{Decoder, DecoderOptions, TextOnly};
use super::layers::inv_freq;
use crate::error::Result;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<TextOnly> {
    let t = &cfg.text;
    let options = DecoderOptions {
        qkv_bias: t.attention_bias,
        o_bias: t.attention_bias,
        mlp_bias: t.mlp_bias,
        ..DecoderOptions::PLAIN
    };
    let mut freq = inv_freq(t.head_dim(), t.rope_theta);
    t.rope_scaling.apply(&mut freq);
    // A llama.cpp file stores llama3 scaling as the divisor of each frequency.
    if w.contains(ROPE_FREQS) {
        let divisors = w
            .get_as(ROPE_FREQS, &[freq.len()], DType::F32)?
            .to_vec1::<f32>()?;
        for (f, d) in freq.iter_mut().zip(divisors) {
            *f /= d;
        }
    }
    let decoder = Decoder::load(t, w, options, freq)?;
    Ok(TextOnly::new(cfg, decoder, "Llama (llama)"))
}

/// llama.cpp's name for the llama3 frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";
