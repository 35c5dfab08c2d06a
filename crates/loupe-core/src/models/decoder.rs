//! The shared text decoder: pre-norm blocks of grouped-query attention with rotary positions and a
//! gated MLP, RMSNorm, an output head tied or not. Qwen2 (and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL
//! decoders) and Llama are this decoder with different options ([`DecoderOptions`]); each family's
//! file says which, and how its positions turn (M-RoPE sections, RoPE scaling).

use candle_core::{DType, Device, Tensor};

use super::layers::{
    attention, load_lm_head, mrope_cos_sin, rope, Activation, Embedding, GatedMlp, Linear, Matrix,
    RmsNorm, Taps,
};
use crate::error::{Error, Result};
use crate::generate::kv_cache::KvCache;
use crate::load::config::TextConfig;
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
}

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

pub struct Decoder {
    /// The text hyper-parameters (head counts, M-RoPE sections).
    pub t: TextConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The rotary inverse frequencies, after any scaling.
    inv_freq: Vec<f32>,
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
                        o.qkv_bias,
                    )?,
                    k_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.k_proj"),
                        dim,
                        t.num_key_value_heads * hd,
                        o.qkv_bias,
                    )?,
                    v_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.v_proj"),
                        dim,
                        t.num_key_value_heads * hd,
                        o.qkv_bias,
                    )?,
                    o_proj: Linear::load(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        t.num_attention_heads * hd,
                        dim,
                        o.o_bias,
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
            norm: RmsNorm::load(w, "model.norm", dim, t.rms_norm_eps)?,
            lm_head,
            inv_freq,
            options: o,
            dtype: w.dtype(),
            device: w.device().clone(),
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

    /// Token embeddings with the image features over the `image_token` placeholders
    /// ([`super::embed_with_images`]).
    pub fn embed(
        &self,
        ids: &[u32],
        image_features: Option<&Tensor>,
        image_token: u32,
    ) -> Result<Tensor> {
        super::embed_with_images(
            &self.embed_tokens,
            ids,
            image_features,
            image_token,
            self.t.vocab_size,
            &self.device,
        )
    }

    /// cos/sin `(seq, head_dim / 2)` for M-RoPE positions: frequency `j` turns with the temporal,
    /// height or width position according to `mrope_section` (one stream for a text-only model).
    fn rotary(&self, positions: &[[i64; 3]]) -> Result<(Tensor, Tensor)> {
        mrope_cos_sin(
            positions,
            &self.inv_freq,
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
        let (cos, sin) = self.rotary(positions)?;
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
            taps.record("text.layer", Some(i), &x);
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

    /// The decoder's parameter count.
    pub fn param_count(&self) -> usize {
        let t = &self.t;
        let (d, hd) = (t.hidden_size, t.head_dim());
        let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
        let mut layer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * t.intermediate_size;
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
