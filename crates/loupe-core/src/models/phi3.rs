//! Phi-3 (Phi-3 mini / small context and 128k, Phi-3.5 mini, Phi-4-mini): the shared decoder
//! ([`Decoder`]) with q, k and v in one matrix (`qkv_proj`) and the gate and up projections in one
//! (`gate_up_proj`, the gate's rows first), no biases, a SiLU-gated MLP. Positions are plain RoPE
//! over the first `partial_rotary_factor` of each head (Phi-4-mini turns 3/4), scaled by LongRoPE
//! where `rope_scaling` says (`longrope`, the older `su`): per-frequency short factors while a
//! forward pass stays within `original_max_position_embeddings`, the long ones past it, cos and sin
//! scaled by the attention factor. Every layer attends within `sliding_window` where the config
//! sets one (Phi-3 mini 4k: 2047). Text only.

use super::decoder::{Decoder, DecoderOptions, TextOnly};
use super::layers::inv_freq;
use crate::error::Result;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<TextOnly> {
    let t = &cfg.text;
    let options = DecoderOptions {
        fused_projections: true,
        ..DecoderOptions::PLAIN
    };
    // With LongRoPE the decoder picks the short or long frequencies per forward pass.
    let freq = inv_freq(t.rotary_dim(), t.rope_theta);
    let decoder = Decoder::load(t, w, options, freq)?;
    Ok(TextOnly::new(cfg, decoder, "Phi-3 (phi3)"))
}
