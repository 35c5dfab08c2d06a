//! The shared text decoder: pre-norm blocks of grouped-query attention with rotary positions and a
//! gated MLP, RMSNorm, an output head tied or not. Qwen2 (and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL
//! decoders), Llama and Gemma 3 are this decoder with different options ([`DecoderOptions`], and
//! the config's sliding layers, attention scale and final cap); each family's file says which, and
//! how its positions turn (M-RoPE sections, RoPE scaling, a second base for sliding layers).

use candle_core::{DType, Device, Tensor};

use super::layers::{
    causal_attention, load_lm_head, mrope_cos_sin, rope, Activation, Embedding, GatedMlp, Linear,
    Matrix, RmsNorm, Taps,
};
use super::{text_only, VisionLanguageModel};
use crate::error::{Error, Result};
use crate::generate::kv_cache::KvCache;
use crate::image::PixelBatch;
use crate::load::config::{Qwen2VlConfig, TextConfig};
use crate::load::weights::Weights;

/// What differs between the families built on this decoder.
#[derive(Debug, Clone, Copy)]
pub struct DecoderOptions {
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the output projection.
    pub o_bias: bool,
    /// Biases on the gate, up and down projections.
    pub mlp_bias: bool,
    /// Gemma: every RMSNorm scales by `1 + w` (the checkpoint stores `w`).
    pub zero_centred_norms: bool,
    /// Gemma: norms on the attention output (`post_attention_layernorm`, before the residual is
    /// added) and on the MLP output (`post_feedforward_layernorm`); the MLP input's is then
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Gemma: the token embeddings are multiplied by sqrt(hidden_size).
    pub scale_embeddings: bool,
    /// Phi-3: q, k and v in one matrix (`qkv_proj`), gate and up in one (`gate_up_proj`).
    pub fused_projections: bool,
}

impl DecoderOptions {
    /// No biases, plain norms, unscaled embeddings (Qwen3-VL's decoder; the base of the others).
    pub const PLAIN: DecoderOptions = DecoderOptions {
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        zero_centred_norms: false,
        sandwich_norms: false,
        scale_embeddings: false,
        fused_projections: false,
    };
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    /// Qwen3: RMSNorm over each head of q and k.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Gemma: the attention output's norm.
    attn_out_norm: Option<RmsNorm>,
    /// The MLP input's norm (`post_attention_layernorm`; Gemma's `pre_feedforward_layernorm`).
    mlp_in_norm: RmsNorm,
    /// Gemma: the MLP output's norm.
    mlp_out_norm: Option<RmsNorm>,
    mlp: GatedMlp,
    /// Gemma 3's sliding layers: how many positions back they see, their own included.
    window: Option<usize>,
    /// Sliding layers turn with [`Decoder::local_inv_freq`] where it is set.
    sliding: bool,
}

pub struct Decoder {
    /// The text hyper-parameters (head counts, M-RoPE sections).
    pub t: TextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The rotary inverse frequencies, after any scaling.
    inv_freq: Vec<f32>,
    /// Gemma 3: the sliding layers' own frequencies (another base).
    local_inv_freq: Option<Vec<f32>>,
    /// Scores are `q.k * attn_scale`: `head_dim^-0.5`, or `query_pre_attn_scalar^-0.5` (Gemma 3).
    attn_scale: f64,
    /// Gemma: `cap * tanh(logit / cap)` over the output logits.
    final_softcap: Option<f64>,
    options: DecoderOptions,
    dtype: DType,
    device: Device,
}

impl Decoder {
    /// The decoder's tensors under `model.` (and `lm_head`), with the rotary `inv_freq` given.
    pub fn load(
        t: &TextConfig,
        w: &Weights,
        o: DecoderOptions,
        inv_freq: Vec<f32>,
    ) -> Result<Self> {
        let (hd, dim) = (t.head_dim(), t.hidden_size);
        let act = Activation::from_config(&t.hidden_act, "hidden_act")?;
        let embed = Matrix::load(w, "model.embed_tokens.weight", t.vocab_size, dim)?;
        let norm = |prefix: &str, dim: usize| {
            if o.zero_centred_norms {
                RmsNorm::load_zero_centred(w, prefix, dim, t.rms_norm_eps)
            } else {
                RmsNorm::load(w, prefix, dim, t.rms_norm_eps)
            }
        };
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let sliding = t
                    .layer_types
                    .get(i)
                    .is_some_and(|l| l == "sliding_attention");
                let (mlp_in, attn_out, mlp_out) = if o.sandwich_norms {
                    (
                        norm(&format!("{p}.pre_feedforward_layernorm"), dim)?,
                        Some(norm(&format!("{p}.post_attention_layernorm"), dim)?),
                        Some(norm(&format!("{p}.post_feedforward_layernorm"), dim)?),
                    )
                } else {
                    (
                        norm(&format!("{p}.post_attention_layernorm"), dim)?,
                        None,
                        None,
                    )
                };
                let (q_dim, kv_dim) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
                let (q_proj, k_proj, v_proj) = if o.fused_projections {
                    let [q, k, v]: [Linear; 3] = Linear::load_parts(
                        w,
                        &format!("{p}.self_attn.qkv_proj"),
                        dim,
                        &[q_dim, kv_dim, kv_dim],
                        o.qkv_bias,
                    )?
                    .try_into()
                    .map_err(|_| {
                        candle_core::Error::Msg("qkv_proj: three parts expected".into())
                    })?;
                    (q, k, v)
                } else {
                    let proj = |name: &str, out: usize| {
                        Linear::load(w, &format!("{p}.self_attn.{name}"), dim, out, o.qkv_bias)
                    };
                    (
                        proj("q_proj", q_dim)?,
                        proj("k_proj", kv_dim)?,
                        proj("v_proj", kv_dim)?,
                    )
                };
                let mlp = if o.fused_projections {
                    GatedMlp::load_fused
                } else {
                    GatedMlp::load
                };
                Ok(DecoderLayer {
                    input_layernorm: norm(&format!("{p}.input_layernorm"), dim)?,
                    qk_norm: if t.qk_norm {
                        Some((
                            norm(&format!("{p}.self_attn.q_norm"), hd)?,
                            norm(&format!("{p}.self_attn.k_norm"), hd)?,
                        ))
                    } else {
                        None
                    },
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        t.num_attention_heads * hd,
                        dim,
                        o.o_bias,
                    )?,
                    attn_out_norm: attn_out,
                    mlp_in_norm: mlp_in,
                    mlp_out_norm: mlp_out,
                    window: if sliding { t.sliding_window } else { None },
                    sliding,
                    mlp: mlp(
                        w,
                        &format!("{p}.mlp"),
                        dim,
                        t.intermediate_size,
                        act,
                        o.mlp_bias,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = load_lm_head(w, &embed, t.vocab_size, dim, t.tie_word_embeddings)?;
        Ok(Decoder {
            t: t.clone(),
            embed_tokens: Embedding::new(embed, w.dtype()),
            layers,
            norm: norm("model.norm", dim)?,
            lm_head,
            inv_freq,
            local_inv_freq: None,
            attn_scale: 1.0 / t.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt(),
            final_softcap: t.final_logit_softcapping,
            options: o,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The sliding layers' own rotary frequencies (Gemma 3's local base).
    pub fn with_sliding_rotary(mut self, inv_freq: Vec<f32>) -> Self {
        self.local_inv_freq = Some(inv_freq);
        self
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

    /// Token embeddings with the image features over the `image_token` placeholders
    /// ([`super::embed_with_images`]).
    pub fn embed(
        &self,
        ids: &[u32],
        image_features: Option<&Tensor>,
        image_token: u32,
    ) -> Result<Tensor> {
        let x = super::embed_with_images(
            &self.embed_tokens,
            ids,
            image_features,
            image_token,
            self.t.vocab_size,
            &self.device,
        )?;
        if !self.options.scale_embeddings {
            return Ok(x);
        }
        // As transformers: sqrt(hidden) rounded to the weights' type, then multiplied.
        let scale = Tensor::new(&[(self.t.hidden_size as f64).sqrt() as f32], &self.device)?
            .to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&scale)?)
    }

    /// cos/sin `(seq, head_dim / 2)` for M-RoPE positions: frequency `j` turns with the temporal,
    /// height or width position according to `mrope_section` (one stream for a text-only model).
    fn rotary(&self, positions: &[[i64; 3]], inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
        mrope_cos_sin(
            positions,
            inv_freq,
            &self.t.mrope_section,
            self.t.mrope_interleaved,
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
        taps: &Taps,
    ) -> Result<Tensor> {
        self.run(embeds, positions, &mut [cache], all_logits, taps)
    }

    /// One decode step of several answers at once: `tokens[i]` continues `caches[i]`. The
    /// projections and the MLP run on all the rows together (the weights are read once for them);
    /// attention runs per answer against its own cache. Returns f32 logits `(answers, vocab)`.
    pub fn forward_decode(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        taps: &Taps,
    ) -> Result<Tensor> {
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
        // Without image features no id is a placeholder: the image token does not matter here.
        let embeds = self.embed(tokens, None, u32::MAX)?;
        let all_logits = caches.len() != 1;
        self.run(&embeds, &positions, caches, all_logits, taps)
    }

    /// The decoder over `embeds`: with one cache, all rows are one sequence continuing it; with
    /// several, row `i` is one token of the sequence in `caches[i]`.
    fn run(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        caches: &mut [&mut KvCache],
        all_logits: bool,
        taps: &Taps,
    ) -> Result<Tensor> {
        let t = &self.t;
        let (b, seq, width) = embeds.dims3()?;
        let hd = t.head_dim();
        let global = match &self.t.longrope {
            Some(long) => {
                let last = positions.iter().map(|p| p[0]).max().unwrap_or(0).max(0) as usize;
                let f = long.inv_freq(self.t.rope_theta, self.t.rotary_dim(), last);
                let (cos, sin) = mrope_cos_sin(
                    positions,
                    &f,
                    &self.t.mrope_section,
                    false,
                    DType::F32,
                    &self.device,
                )?;
                let a = long.attention_factor;
                (
                    (cos * a)?.to_dtype(self.dtype)?,
                    (sin * a)?.to_dtype(self.dtype)?,
                )
            }
            None => self.rotary(positions, &self.inv_freq)?,
        };
        let local = match &self.local_inv_freq {
            Some(f) if self.layers.iter().any(|l| l.sliding) => Some(self.rotary(positions, f)?),
            _ => None,
        };
        let scale = self.attn_scale;
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
            let (cos, sin) = match &local {
                Some(l) if layer.sliding => l,
                _ => &global,
            };
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
            let q = rope(&heads(&qkv[0], t.num_attention_heads, q_norm)?, cos, sin)?;
            let k = rope(&heads(&qkv[1], t.num_key_value_heads, k_norm)?, cos, sin)?;
            let v = heads(&qkv[2], t.num_key_value_heads, None)?;
            let attn = match caches {
                [cache] => {
                    let (k, v) = cache.layers[i].append(&k, &v)?;
                    causal_attention(&q, &k, &v, scale, layer.window)?
                }
                _ => {
                    let mut rows = Vec::with_capacity(seq);
                    for (r, cache) in caches.iter_mut().enumerate() {
                        let one = |x: &Tensor| x.narrow(2, r, 1)?.contiguous();
                        let (k, v) = cache.layers[i].append(&one(&k)?, &one(&v)?)?;
                        rows.push(causal_attention(&one(&q)?, &k, &v, scale, layer.window)?);
                    }
                    Tensor::cat(&rows, 2)?
                }
            };
            let attn = attn
                .transpose(1, 2)?
                .reshape((b, seq, t.num_attention_heads * hd))?;
            x = match &layer.attn_out_norm {
                Some(norm) => (&x + norm.forward(&layer.o_proj.forward(&attn)?)?)?,
                None => layer.o_proj.forward_then(&attn, None, Some(&x))?,
            };
            let h = layer.mlp_in_norm.forward(&x)?;
            x = match &layer.mlp_out_norm {
                Some(norm) => (&x + norm.forward(&layer.mlp.forward(&h)?)?)?,
                None => layer.mlp.forward_then(&h, Some(&x))?,
            };
            if i < deepstack {
                x = (x + embeds.narrow(2, (i + 1) * dim, dim)?)?;
            }
            taps.record("text.layer", Some(i), &x);
        }
        let x = if all_logits {
            x
        } else {
            x.narrow(1, seq - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?;
        match self.final_softcap {
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// The decoder's parameter count.
    pub fn param_count(&self) -> usize {
        let t = &self.t;
        let (d, hd) = (t.hidden_size, t.head_dim());
        let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
        let mut layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size;
        if self.options.sandwich_norms {
            layer += 2 * d;
        }
        if t.qk_norm {
            layer += 2 * hd;
        }
        let DecoderOptions {
            qkv_bias,
            o_bias,
            mlp_bias,
            ..
        } = self.options;
        layer += if qkv_bias { q + 2 * kv } else { 0 } + if o_bias { d } else { 0 };
        layer += if mlp_bias {
            2 * t.intermediate_size + d
        } else {
            0
        };
        let mut text = t.vocab_size * d + t.num_hidden_layers * layer + d;
        if !t.tie_word_embeddings {
            text += t.vocab_size * d;
        }
        text
    }
}

/// A text-only family (Llama, Gemma 3): the decoder alone, as a [`VisionLanguageModel`] that
/// refuses images.
pub struct TextOnly {
    pub cfg: Qwen2VlConfig,
    decoder: Decoder,
    pub taps: Taps,
    architecture: &'static str,
}

impl TextOnly {
    pub fn new(cfg: Qwen2VlConfig, decoder: Decoder, architecture: &'static str) -> Self {
        TextOnly {
            cfg,
            decoder,
            taps: Taps::default(),
            architecture,
        }
    }
}

const CANNOT_SEE: &str = "it cannot take images";

/// No image placeholder: every id of a text-only prompt is text.
const NO_IMAGE: u32 = u32::MAX;

impl VisionLanguageModel for TextOnly {
    fn encode_images(&self, _: &PixelBatch) -> Result<Tensor> {
        Err(text_only(CANNOT_SEE))
    }
    fn patch_features(&self, _: &PixelBatch, _: usize) -> Result<Tensor> {
        Err(text_only("it has no vision tower to take features from"))
    }
    fn vision_depth(&self) -> usize {
        0
    }
    fn prompt_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)> {
        if !grids.is_empty() {
            return Err(text_only(CANNOT_SEE));
        }
        Ok(((0..ids.len() as i64).map(|p| [p; 3]).collect(), 0))
    }
    fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        if image_features.is_some() {
            return Err(text_only(CANNOT_SEE));
        }
        self.decoder.embed(ids, None, NO_IMAGE)
    }
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.decoder
            .forward(embeds, positions, cache, all_logits, &self.taps)
    }
    fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decoder.forward_decode(tokens, caches, &self.taps)
    }
    fn rotary_switch(&self) -> Option<usize> {
        self.decoder
            .t
            .longrope
            .as_ref()
            .map(|l| l.original_max_position_embeddings)
    }
    fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }
    fn image_token_id(&self) -> u32 {
        NO_IMAGE
    }
    fn param_counts(&self) -> (usize, usize) {
        (0, self.decoder.param_count())
    }
    fn architecture(&self) -> &'static str {
        self.architecture
    }
    fn vocab_size(&self) -> usize {
        self.cfg.text.vocab_size
    }
    fn taps(&self) -> &Taps {
        &self.taps
    }
}
