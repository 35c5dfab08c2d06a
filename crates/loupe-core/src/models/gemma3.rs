//! Gemma 3 text (270M, 1B): the shared decoder ([`Decoder`]) with Gemma's options: embeddings
//! scaled by sqrt(hidden), every RMSNorm as `1 + w`, norms before and after both attention and the
//! MLP, a GeGLU MLP (`gelu_pytorch_tanh`), RMSNorm over each head of q and k, scores scaled by
//! `query_pre_attn_scalar^-0.5`. Layers are `sliding_attention` (each position sees the last
//! `sliding_window` positions, rotary base `rope_local_base_freq`) or `full_attention` (base
//! `rope_theta`, with any `rope_scaling`), as `layer_types` or every sixth says; the final logits
//! are soft-capped where `final_logit_softcapping` is set. `attn_logit_softcapping` is not applied:
//! transformers' Gemma 3 reads it and never uses it, nor does llama.cpp's. Text only.

use super::decoder::{Decoder, DecoderOptions, TextOnly};
use super::layers::inv_freq;
use crate::error::Result;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<TextOnly> {
    let t = &cfg.text;
    if let Some(cap) = t.attn_logit_softcapping {
        tracing::warn!(
            "attn_logit_softcapping = {cap} is not applied: Gemma 3 does not cap attention scores \
             (transformers and llama.cpp ignore the field too)"
        );
    }
    let options = DecoderOptions {
        qkv_bias: t.attention_bias,
        o_bias: t.attention_bias,
        zero_centred_norms: true,
        sandwich_norms: true,
        scale_embeddings: true,
        ..DecoderOptions::PLAIN
    };
    let mut global = inv_freq(t.head_dim(), t.rope_theta);
    t.rope_scaling.apply(&mut global);
    let local = inv_freq(t.head_dim(), t.local_rope_theta);
    let decoder = Decoder::load(t, w, options, global)?.with_sliding_rotary(local);
    Ok(TextOnly::new(cfg, decoder, "Gemma 3 (gemma3_text)"))
}
