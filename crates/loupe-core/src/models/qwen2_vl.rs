//! Qwen2-VL: a ViT with 2D rotary positions and a 2x2 patch merger, feeding a Qwen2 decoder
//! (grouped-query attention, SwiGLU, RMSNorm) with multimodal rotary positions (M-RoPE).
//!
//! Three parts, as in llama.cpp's model files: hyper-parameters (`Qwen2VlConfig`), tensors (`load`),
//! forward graph (`encode_images`, `forward`). Modules are named like the checkpoint's tensors.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

use super::decoder::{Decoder, DecoderOptions};
use super::layers::{
    frame_lengths, inv_freq, load_merger_mlp, load_patch_embed, vision_attention, vision_rotary,
    Activation, LayerNorm, Linear, Taps,
};
use super::{qwen2_5_vl, qwen3_vl, VisionEncoder};
use crate::error::Result;
use crate::generate::kv_cache::KvCache;
use crate::image::PixelBatch;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

/// The one place where stored tensor names are mapped: transformers' in-memory names
/// (`model.language_model.*`, `model.visual.*`) to the checkpoint names (`model.*`, `visual.*`).
pub fn sanitize(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        name.to_owned()
    }
}

/// Which tensors are quantized, and to what, when the user asks for `q` (docs/quantization.md):
/// decoder and vision-block projections take `q`; embeddings and `lm_head` (one matrix when tied) take
/// Q8_0 for 8-bit runs and Q6_K below that, as llama.cpp's `_M` mixes keep the output matrix at 6 bits;
/// the patch embedding, the merger, norms and biases stay dense.
pub fn quant_policy(name: &str, q: GgmlDType) -> Option<GgmlDType> {
    let projection = name.ends_with("_proj.weight")
        || (name.starts_with("visual.blocks.")
            && [
                ".attn.qkv.weight",
                ".attn.proj.weight",
                ".mlp.fc1.weight",
                ".mlp.fc2.weight",
                ".mlp.linear_fc1.weight",
                ".mlp.linear_fc2.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s)))
        || (name.contains(".linear_attn.")
            && [".in_proj_qkv.weight", ".in_proj_z.weight"]
                .iter()
                .any(|s| name.ends_with(s)));
    if projection {
        Some(q)
    } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        Some(if q == GgmlDType::Q8_0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q6K
        })
    } else {
        None
    }
}

// ---------------------------------------------------------------- vision tower

struct VisionBlock {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    ln_q: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    act: Activation,
    heads: usize,
    head_dim: usize,
    merge: usize,
    inv_freq: Vec<f32>,
    params: usize,
}

impl VisionTower {
    fn load(cfg: &Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let v = &cfg.vision;
        let e = v.embed_dim;
        let patch_dim = cfg.patch_values();
        let hidden = cfg.vision_intermediate();
        let blocks = (0..v.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                Ok(VisionBlock {
                    norm1: LayerNorm::load(w, &format!("{p}.norm1"), e, 1e-6)?,
                    norm2: LayerNorm::load(w, &format!("{p}.norm2"), e, 1e-6)?,
                    qkv: Linear::load(w, &format!("{p}.attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(w, &format!("{p}.attn.proj"), e, e, true)?,
                    fc1: Linear::load(w, &format!("{p}.mlp.fc1"), e, hidden, true)?,
                    fc2: Linear::load(w, &format!("{p}.mlp.fc2"), hidden, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m2 = e * v.spatial_merge_size * v.spatial_merge_size;
        let head_dim = e / v.num_heads;
        let quantized = blocks.first().is_some_and(|b| b.qkv.is_quantized());
        let (merger_fc1, merger_fc2) = load_merger_mlp(w, m2, v.hidden_size, quantized)?;
        Ok(VisionTower {
            patch_embed: load_patch_embed(cfg, w, false)?,
            blocks,
            ln_q: LayerNorm::load(w, "visual.merger.ln_q", e, 1e-6)?,
            merger_fc1,
            merger_fc2,
            act: Activation::from_config(&v.hidden_act, "vision_config.hidden_act")?,
            heads: v.num_heads,
            head_dim,
            merge: v.spatial_merge_size,
            inv_freq: inv_freq(head_dim / 2, v.rope_theta),
            params: {
                let block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e * hidden + hidden + e;
                let merger = 2 * e + (m2 * m2 + m2) + (m2 * v.hidden_size + v.hidden_size);
                e * patch_dim + v.depth * block + merger
            },
        })
    }
}

impl VisionEncoder for VisionTower {
    fn param_count(&self) -> usize {
        self.params
    }

    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn run(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        taps: &Taps,
        until: Option<usize>,
    ) -> Result<Tensor> {
        let n = pixels.dim(0)?;
        let (cos, sin) = vision_rotary(
            &self.inv_freq,
            self.merge,
            grids,
            pixels.dtype(),
            pixels.device(),
        )?;
        let mut x = self.patch_embed.forward(pixels)?;
        taps.record("vision.patch_embed", None, &x);
        // Attention is within each image (and each frame).
        let segments = frame_lengths(grids);
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.norm1.forward(&x)?;
            let after_attn = vision_attention(
                &h,
                &blk.qkv,
                &blk.proj,
                self.heads,
                self.head_dim,
                &cos,
                &sin,
                &segments,
                &x,
            )?;
            let h = blk.norm2.forward(&after_attn)?;
            let h = blk.fc1.forward_then(&h, Some(self.act), None)?;
            x = blk.fc2.forward_then(&h, None, Some(&after_attn))?;
            taps.record("vision.block", Some(i), &x);
            if until == Some(i) {
                return Ok(x);
            }
        }
        let m2 = self.merge * self.merge;
        let e = x.dim(1)?;
        let x = self.ln_q.forward(&x)?.reshape((n / m2, e * m2))?;
        let x = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&x)?.gelu_erf()?)?;
        taps.record("vision.merger", None, &x);
        Ok(x)
    }
}

// ---------------------------------------------------------------- the model

pub struct Qwen2Vl {
    pub cfg: Qwen2VlConfig,
    /// `None` for text-only models.
    vision: Option<Box<dyn VisionEncoder>>,
    decoder: Decoder,
    pub taps: Taps,
}

impl Qwen2Vl {
    pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let t = &cfg.text;
        // Qwen2: q/k/v biases, none on o; Qwen3: all four or none, as `attention_bias` says.
        let (qkv_bias, o_bias) = if t.qk_norm {
            (t.attention_bias, t.attention_bias)
        } else {
            (true, false)
        };
        let options = DecoderOptions {
            qkv_bias,
            o_bias,
            ..DecoderOptions::PLAIN
        };
        let decoder = Decoder::load(t, w, options, inv_freq(t.head_dim(), t.rope_theta))?;
        Ok(Qwen2Vl {
            vision: match cfg.model_type.as_str() {
                "qwen2" => None,
                "qwen2_5_vl" => Some(Box::new(qwen2_5_vl::VisionTower::load(&cfg, w)?)),
                "qwen3_vl" => Some(Box::new(qwen3_vl::VisionTower::load(&cfg, w)?)),
                _ => Some(Box::new(VisionTower::load(&cfg, w)?)),
            },
            decoder,
            taps: Taps::default(),
            cfg,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }

    /// Runs the vision tower: `(merged tokens, hidden)` for all images, in order.
    pub fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor> {
        let Some(vision) = &self.vision else {
            return Err(super::text_only("it cannot take images"));
        };
        let d = &self.decoder;
        let x = super::pixel_tensor(pixels, &self.cfg, d.dtype(), d.device())?;
        vision.forward(&x, &pixels.grids, &self.taps)
    }

    /// Block `layer`'s patch features ([`VisionEncoder::block_features`]).
    pub fn patch_features(&self, pixels: &PixelBatch, layer: usize) -> Result<Tensor> {
        let Some(vision) = &self.vision else {
            return Err(super::text_only(
                "it has no vision tower to take features from",
            ));
        };
        super::check_layer(layer, vision.depth())?;
        let d = &self.decoder;
        let x = super::pixel_tensor(pixels, &self.cfg, d.dtype(), d.device())?;
        vision.block_features(&x, &pixels.grids, layer)
    }

    pub fn vision_depth(&self) -> usize {
        self.vision.as_ref().map_or(0, |v| v.depth())
    }

    /// M-RoPE positions of the prompt and the decode delta ([`super::mrope_positions`]).
    pub fn rope_index(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)> {
        super::mrope_positions(
            ids,
            grids,
            self.cfg.vision.spatial_merge_size,
            self.cfg.image_token_id,
        )
    }

    /// Token embeddings with the image features over the placeholders.
    pub fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        self.decoder
            .embed(ids, image_features, self.cfg.image_token_id)
    }

    /// The decoder over `embeds` `(1, seq, hidden)` ([`Decoder::forward`]).
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.decoder
            .forward(embeds, positions, cache, all_logits, &self.taps)
    }

    /// One decode step of several answers at once ([`Decoder::forward_decode`]).
    pub fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decoder.forward_decode(tokens, caches, &self.taps)
    }

    /// Parameter counts `(vision, text)`.
    pub fn param_counts(&self) -> (usize, usize) {
        let vision = self.vision.as_ref().map_or(0, |v| v.param_count());
        (vision, self.decoder.param_count())
    }
}
