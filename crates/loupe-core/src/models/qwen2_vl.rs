//! Qwen2-VL: a ViT with 2D rotary positions and a 2x2 patch merger, feeding a Qwen2 decoder
//! (grouped-query attention, SwiGLU, RMSNorm) with multimodal rotary positions (M-RoPE).
//!
//! Three parts, as in llama.cpp's model files: hyper-parameters (`Qwen2VlConfig`), tensors (`load`),
//! forward graph (`encode_images`, `forward`). Modules are named like the checkpoint's tensors.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::layers::{
    attention, frame_lengths, inv_freq, load_lm_head, load_merger_mlp, load_patch_embed,
    mrope_cos_sin, rope, vision_attention, vision_rotary, Activation, Embedding, GatedMlp,
    LayerNorm, Linear, Matrix, RmsNorm, Taps,
};
use super::{qwen2_5_vl, qwen3_vl, VisionEncoder};
use crate::error::{Error, Result};
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

pub(crate) fn activation(name: &str, field: &str) -> Result<Activation> {
    Activation::from_name(name).ok_or_else(|| {
        Error::InvalidInput(format!(
            "config.json: {field} `{name}` is not a supported activation"
        ))
    })
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
            act: activation(&v.hidden_act, "vision_config.hidden_act")?,
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

// ---------------------------------------------------------------- text decoder

struct DecoderLayer {
    input_layernorm: RmsNorm,
    /// Qwen3: RMSNorm over each head of q and k.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

pub struct Qwen2Vl {
    pub cfg: Qwen2VlConfig,
    /// `None` for text-only models.
    vision: Option<Box<dyn VisionEncoder>>,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
    pub taps: Taps,
}

impl Qwen2Vl {
    pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let t = &cfg.text;
        let (hd, dim) = (t.head_dim(), t.hidden_size);
        let act = activation(&t.hidden_act, "hidden_act")?;
        // Qwen2: q/k/v biases, none on o; Qwen3: all four or none, as `attention_bias` says.
        let (qkv_bias, o_bias) = if t.qk_norm {
            (t.attention_bias, t.attention_bias)
        } else {
            (true, false)
        };
        let embed = Matrix::load(w, "model.embed_tokens.weight", t.vocab_size, dim)?;
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(
                        w,
                        &format!("{p}.input_layernorm"),
                        dim,
                        t.rms_norm_eps,
                    )?,
                    qk_norm: if t.qk_norm {
                        Some((
                            RmsNorm::load(w, &format!("{p}.self_attn.q_norm"), hd, t.rms_norm_eps)?,
                            RmsNorm::load(w, &format!("{p}.self_attn.k_norm"), hd, t.rms_norm_eps)?,
                        ))
                    } else {
                        None
                    },
                    q_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.q_proj"),
                        dim,
                        t.num_attention_heads * hd,
                        qkv_bias,
                    )?,
                    k_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.k_proj"),
                        dim,
                        t.num_key_value_heads * hd,
                        qkv_bias,
                    )?,
                    v_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.v_proj"),
                        dim,
                        t.num_key_value_heads * hd,
                        qkv_bias,
                    )?,
                    o_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        t.num_attention_heads * hd,
                        dim,
                        o_bias,
                    )?,
                    post_attention_layernorm: RmsNorm::load(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        dim,
                        t.rms_norm_eps,
                    )?,
                    mlp: GatedMlp::load(
                        w,
                        &format!("{p}.mlp"),
                        dim,
                        t.intermediate_size,
                        act,
                        false,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = load_lm_head(w, &embed, t.vocab_size, dim, t.tie_word_embeddings)?;
        let embed_tokens = Embedding::new(embed, w.dtype());
        Ok(Qwen2Vl {
            vision: match cfg.model_type.as_str() {
                "qwen2" => None,
                "qwen2_5_vl" => Some(Box::new(qwen2_5_vl::VisionTower::load(&cfg, w)?)),
                "qwen3_vl" => Some(Box::new(qwen3_vl::VisionTower::load(&cfg, w)?)),
                _ => Some(Box::new(VisionTower::load(&cfg, w)?)),
            },
            embed_tokens,
            layers,
            norm: RmsNorm::load(w, "model.norm", dim, t.rms_norm_eps)?,
            lm_head,
            inv_freq: inv_freq(hd, t.rope_theta),
            dtype: w.dtype(),
            device: w.device().clone(),
            taps: Taps::default(),
            cfg,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A cache for this decoder: f16 keys and values under quantized weights on a CPU
    /// ([`crate::generate::kv_cache::cache_dtype`]).
    pub fn new_cache(&self) -> KvCache {
        let quantized = self.lm_head.is_quantized();
        let dtype = crate::generate::kv_cache::cache_dtype(self.dtype, quantized, &self.device);
        KvCache::with_dtype(self.layers.len(), dtype)
    }

    /// Runs the vision tower: `(merged tokens, hidden)` for all images, in order.
    pub fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor> {
        let Some(vision) = &self.vision else {
            return Err(Error::InvalidInput(
                "this is a text-only model: it cannot take images".into(),
            ));
        };
        let x = super::pixel_tensor(pixels, &self.cfg, self.dtype, &self.device)?;
        vision.forward(&x, &pixels.grids, &self.taps)
    }

    /// Block `layer`'s patch features ([`VisionEncoder::block_features`]).
    pub fn patch_features(&self, pixels: &PixelBatch, layer: usize) -> Result<Tensor> {
        let Some(vision) = &self.vision else {
            return Err(Error::InvalidInput(
                "this is a text-only model: it has no vision tower to take features from".into(),
            ));
        };
        super::check_layer(layer, vision.depth())?;
        let x = super::pixel_tensor(pixels, &self.cfg, self.dtype, &self.device)?;
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

    /// Token embeddings with the image features over the placeholders ([`super::embed_with_images`]).
    pub fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        super::embed_with_images(
            &self.embed_tokens,
            ids,
            image_features,
            self.cfg.image_token_id,
            self.cfg.text.vocab_size,
            &self.device,
        )
    }

    /// cos/sin `(seq, head_dim / 2)` for M-RoPE positions: frequency `j` turns with the temporal,
    /// height or width position according to `mrope_section`.
    fn text_rotary(&self, positions: &[[i64; 3]]) -> Result<(Tensor, Tensor)> {
        let t = &self.cfg.text;
        mrope_cos_sin(
            positions,
            &self.inv_freq,
            &t.mrope_section,
            t.mrope_interleaved,
            self.dtype,
            &self.device,
        )
    }

    /// Runs the decoder over `embeds` `(1, seq, hidden)` at `positions`, appending to `cache`.
    /// Returns f32 logits: `(seq, vocab)` with `all_logits`, else `(1, vocab)` for the last position.
    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.run(embeds, positions, &mut [cache], all_logits)
    }

    /// One decode step of several answers at once: `tokens[i]` continues `caches[i]`. The
    /// projections and the MLP run on all the rows together (the weights are read once for them);
    /// attention runs per answer against its own cache. Returns f32 logits `(answers, vocab)`.
    pub fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(Error::InvalidInput(format!(
                "a decode batch of {} tokens for {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        let positions: Vec<[i64; 3]> = caches
            .iter()
            .map(|c| [c.len() as i64 + c.rope_delta; 3])
            .collect();
        let embeds = self.embed(tokens, None)?;
        if caches.len() == 1 {
            return self.run(&embeds, &positions, caches, false);
        }
        self.run(&embeds, &positions, caches, true)
    }

    /// The decoder over `embeds`: with one cache, all rows are one sequence continuing it; with
    /// several, row `i` is one token of the sequence in `caches[i]`.
    fn run(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        caches: &mut [&mut KvCache],
        all_logits: bool,
    ) -> Result<Tensor> {
        let t = &self.cfg.text;
        let (b, seq, width) = embeds.dims3()?;
        let hd = t.head_dim();
        let (cos, sin) = self.text_rotary(positions)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // DeepStack (Qwen3-VL): columns past the hidden size hold, per level, what is added to the
        // hidden states after the first decoder layers (image features at image tokens, zeros elsewhere).
        let dim = t.hidden_size;
        let deepstack = width / dim - 1;
        let mut x = embeds.narrow(2, 0, dim)?;
        if caches.len() != 1 && caches.len() != seq {
            return Err(Error::InvalidInput(format!(
                "{} caches for {seq} rows: one, or one per row",
                caches.len()
            )));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let qkv = Linear::forward_many(&[&layer.q_proj, &layer.k_proj, &layer.v_proj], &h)?;
            let heads = |y: &Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
                let y = y.reshape((b, seq, n, hd))?;
                let y = match norm {
                    Some(norm) => norm.forward(&y)?,
                    None => y,
                };
                Ok(y.transpose(1, 2)?)
            };
            let (q_norm, k_norm) = layer.qk_norm.as_ref().map(|(q, k)| (q, k)).unzip();
            let q = rope(&heads(&qkv[0], t.num_attention_heads, q_norm)?, &cos, &sin)?;
            let k = rope(&heads(&qkv[1], t.num_key_value_heads, k_norm)?, &cos, &sin)?;
            let v = heads(&qkv[2], t.num_key_value_heads, None)?;
            let attn = match caches {
                [cache] => {
                    let (k, v) = cache.layers[i].append(&k, &v)?;
                    attention(&q, &k, &v, scale, true)?
                }
                _ => {
                    let mut rows = Vec::with_capacity(seq);
                    for (r, cache) in caches.iter_mut().enumerate() {
                        let one = |x: &Tensor| x.narrow(2, r, 1)?.contiguous();
                        let (k, v) = cache.layers[i].append(&one(&k)?, &one(&v)?)?;
                        rows.push(attention(&one(&q)?, &k, &v, scale, true)?);
                    }
                    Tensor::cat(&rows, 2)?
                }
            };
            let attn = attn
                .transpose(1, 2)?
                .reshape((b, seq, t.num_attention_heads * hd))?;
            x = layer.o_proj.forward_then(&attn, None, Some(&x))?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = layer.mlp.forward_then(&h, Some(&x))?;
            if i < deepstack {
                x = (x + embeds.narrow(2, (i + 1) * dim, dim)?)?;
            }
            self.taps.record("text.layer", Some(i), &x);
        }
        let x = if all_logits {
            x
        } else {
            x.narrow(1, seq - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        Ok(logits)
    }

    /// Parameter counts `(vision, text)`.
    pub fn param_counts(&self) -> (usize, usize) {
        let vision = self.vision.as_ref().map_or(0, |v| v.param_count());
        let t = &self.cfg.text;
        let (d, hd) = (t.hidden_size, t.head_dim());
        let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
        let mut layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size;
        if t.qk_norm {
            layer += 2 * hd + if t.attention_bias { q + 2 * kv + d } else { 0 };
        } else {
            layer += q + 2 * kv;
        }
        let mut text = t.vocab_size * d + t.num_hidden_layers * layer + d;
        if !t.tie_word_embeddings {
            text += t.vocab_size * d;
        }
        (vision, text)
    }
}
