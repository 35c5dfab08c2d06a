//! Qwen3.5 (dense): Qwen3-VL's vision tower without DeepStack, feeding a hybrid decoder where most
//! layers are Gated DeltaNet (linear attention with a fixed-size recurrent state) and every few a gated
//! full-attention layer, as `layer_types` says.
//!
//! - Gated attention: `q_proj` gives each head its query and an output gate; q/k RMSNorm; rotary on the
//!   first `partial_rotary_factor` of each head with interleaved M-RoPE; the output is multiplied by
//!   `sigmoid(gate)` before `o_proj`.
//! - Gated DeltaNet: one fused projection for q, k, v through a causal depthwise convolution (its last
//!   inputs kept in the cache) and SiLU; L2-normalized q and k; per-head decay `g` and write strength
//!   `beta`; the gated delta rule `S <- exp(g) S + k (beta (v - S^T k))^T`, read out as `S^T q`; an
//!   RMSNorm gated by `silu(z)`; `out_proj`. Prefill runs the rule in chunks of 64 (the parallel form,
//!   a few matrix products per chunk); decode runs the recurrent step.
//! - Norms are zero-centred (`1 + w`), except the DeltaNet output norm.
//!
//! Multi-token-prediction weights (`mtp.*`) in a checkpoint are left unread, so they load untouched.

use candle_core::{DType, Device, Tensor, D};

use super::layers::{
    attention, inv_freq, load_lm_head, rope, Activation, Embedding, GatedMlp, Linear, Matrix,
    RmsNorm, Taps,
};
use super::{qwen3_vl, VisionEncoder};
use crate::error::Result;
use crate::generate::kv_cache::{KvCache, LayerKv};
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

/// Tokens per chunk of the parallel delta rule (transformers' value).
pub const CHUNK: usize = 64;

struct GatedAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

struct DeltaNet {
    in_proj_qkv: Linear,
    in_proj_z: Linear,
    in_proj_b: Linear,
    in_proj_a: Linear,
    /// `(channels, kernel)`.
    conv: Tensor,
    /// `-exp(A_log)`, f32.
    neg_a: Tensor,
    dt_bias: Tensor,
    norm: RmsNorm,
    out_proj: Linear,
}

enum Mixer {
    Attention(GatedAttention),
    DeltaNet(DeltaNet),
}

struct Layer {
    input_layernorm: RmsNorm,
    mixer: Mixer,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
}

pub struct Qwen35 {
    pub cfg: Qwen2VlConfig,
    vision: qwen3_vl::VisionTower,
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Frequencies of the rotary part of a head (`rotary_dim / 2` of them; `rope` turns that part).
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
    pub taps: Taps,
}

impl Qwen35 {
    pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let t = &cfg.text;
        let (hd, dim, eps) = (t.head_dim(), t.hidden_size, t.rms_norm_eps);
        let act = Activation::from_config(&t.hidden_act, "hidden_act")?;
        let (nk, nv) = (t.linear_num_key_heads, t.linear_num_value_heads);
        let (dk, dv) = (t.linear_key_head_dim, t.linear_value_head_dim);
        let conv_dim = 2 * nk * dk + nv * dv;
        let kernel = t.linear_conv_kernel_dim;
        let bias = t.attention_bias;
        let layers = (0..t.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let mixer = if t.layer_types[i] == "full_attention" {
                    let a = format!("{p}.self_attn");
                    let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
                    Mixer::Attention(GatedAttention {
                        q_proj: Linear::load(w, &format!("{a}.q_proj"), dim, 2 * q, bias)?,
                        k_proj: Linear::load(w, &format!("{a}.k_proj"), dim, kv, bias)?,
                        v_proj: Linear::load(w, &format!("{a}.v_proj"), dim, kv, bias)?,
                        o_proj: Linear::load(w, &format!("{a}.o_proj"), q, dim, bias)?,
                        q_norm: RmsNorm::load_zero_centred(w, &format!("{a}.q_norm"), hd, eps)?,
                        k_norm: RmsNorm::load_zero_centred(w, &format!("{a}.k_norm"), hd, eps)?,
                    })
                } else {
                    let a = format!("{p}.linear_attn");
                    let conv = w.get(&format!("{a}.conv1d.weight"), &[conv_dim, 1, kernel])?;
                    let a_log = w.get_as(&format!("{a}.A_log"), &[nv], DType::F32)?;
                    Mixer::DeltaNet(DeltaNet {
                        in_proj_qkv: Linear::load(
                            w,
                            &format!("{a}.in_proj_qkv"),
                            dim,
                            conv_dim,
                            false,
                        )?,
                        in_proj_z: Linear::load(w, &format!("{a}.in_proj_z"), dim, nv * dv, false)?,
                        in_proj_b: Linear::load(w, &format!("{a}.in_proj_b"), dim, nv, false)?,
                        in_proj_a: Linear::load(w, &format!("{a}.in_proj_a"), dim, nv, false)?,
                        conv: conv.reshape((conv_dim, kernel))?,
                        neg_a: a_log.exp()?.neg()?,
                        dt_bias: w.get_as(&format!("{a}.dt_bias"), &[nv], DType::F32)?,
                        norm: RmsNorm::load(w, &format!("{a}.norm"), dv, eps)?,
                        out_proj: Linear::load(w, &format!("{a}.out_proj"), nv * dv, dim, false)?,
                    })
                };
                Ok(Layer {
                    input_layernorm: RmsNorm::load_zero_centred(
                        w,
                        &format!("{p}.input_layernorm"),
                        dim,
                        eps,
                    )?,
                    mixer,
                    post_attention_layernorm: RmsNorm::load_zero_centred(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        dim,
                        eps,
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
        let embed = Matrix::load(w, "model.embed_tokens.weight", t.vocab_size, dim)?;
        let lm_head = load_lm_head(w, &embed, t.vocab_size, dim, t.tie_word_embeddings)?;
        Ok(Qwen35 {
            vision: qwen3_vl::VisionTower::load(&cfg, w)?,
            embed_tokens: Embedding::new(embed, w.dtype()),
            layers,
            norm: RmsNorm::load_zero_centred(w, "model.norm", dim, eps)?,
            lm_head,
            inv_freq: inv_freq(t.rotary_dim(), t.rope_theta),
            dtype: w.dtype(),
            device: w.device().clone(),
            taps: Taps::default(),
            cfg,
        })
    }

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

    /// A cache for this decoder: f16 keys and values under quantized weights on a CPU
    /// ([`crate::generate::kv_cache::cache_dtype`]).
    pub fn new_cache(&self) -> KvCache {
        let quantized = self.lm_head.is_quantized();
        let dtype = crate::generate::kv_cache::cache_dtype(self.dtype, quantized, &self.device);
        KvCache::with_dtype(self.layers.len(), dtype)
    }

    pub fn encode_images(&self, pixels: &crate::image::PixelBatch) -> Result<Tensor> {
        let x = super::pixel_tensor(pixels, &self.cfg, self.dtype, &self.device)?;
        self.vision.forward(&x, &pixels.grids, &self.taps)
    }

    /// Block `layer`'s patch features ([`VisionEncoder::block_features`]).
    pub fn patch_features(
        &self,
        pixels: &crate::image::PixelBatch,
        layer: usize,
    ) -> Result<Tensor> {
        super::check_layer(layer, self.vision.depth())?;
        let x = super::pixel_tensor(pixels, &self.cfg, self.dtype, &self.device)?;
        self.vision.block_features(&x, &pixels.grids, layer)
    }

    pub fn vision_depth(&self) -> usize {
        self.vision.depth()
    }

    /// cos/sin `(seq, rotary_dim / 2)`, interleaved M-RoPE (t, h, w, t, h, w, ... while each stream has
    /// frequencies left in `mrope_section`).
    fn text_rotary(&self, positions: &[[i64; 3]]) -> Result<(Tensor, Tensor)> {
        let t = &self.cfg.text;
        super::layers::mrope_cos_sin(
            positions,
            &self.inv_freq,
            &t.mrope_section,
            t.mrope_interleaved,
            self.dtype,
            &self.device,
        )
    }

    fn attend(
        &self,
        a: &GatedAttention,
        h: &Tensor,
        rot: &(Tensor, Tensor),
        kv: &mut LayerKv,
    ) -> Result<Tensor> {
        let t = &self.cfg.text;
        let (b, seq, _) = h.dims3()?;
        let (hd, nh, nkv) = (t.head_dim(), t.num_attention_heads, t.num_key_value_heads);
        // Per head: `hd` of query, then `hd` of gate.
        let qg = a.q_proj.forward(h)?.reshape((b, seq, nh, 2 * hd))?;
        let gate = qg.narrow(3, hd, hd)?.reshape((b, seq, nh * hd))?;
        let q = a.q_norm.forward(&qg.narrow(3, 0, hd)?)?.transpose(1, 2)?;
        let k = a
            .k_norm
            .forward(&a.k_proj.forward(h)?.reshape((b, seq, nkv, hd))?)?
            .transpose(1, 2)?;
        let v = a
            .v_proj
            .forward(h)?
            .reshape((b, seq, nkv, hd))?
            .transpose(1, 2)?;
        let q = rope(&q, &rot.0, &rot.1)?;
        let k = rope(&k, &rot.0, &rot.1)?;
        let (k, v) = kv.append(&k, &v)?;
        let out = attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), true)?
            .transpose(1, 2)?
            .reshape((b, seq, nh * hd))?;
        let gated = (out * candle_nn::ops::sigmoid(&gate)?)?;
        a.o_proj.forward(&gated)
    }

    fn delta_net(&self, d: &DeltaNet, h: &Tensor, kv: &mut LayerKv) -> Result<Tensor> {
        let t = &self.cfg.text;
        let (_, seq, _) = h.dims3()?;
        let (nk, nv) = (t.linear_num_key_heads, t.linear_num_value_heads);
        let (dk, dv) = (t.linear_key_head_dim, t.linear_value_head_dim);
        let kernel = t.linear_conv_kernel_dim;
        let h = h.squeeze(0)?;
        let mixed = d.in_proj_qkv.forward(&h)?; // (seq, conv_dim)
        let channels = mixed.dim(1)?;
        let state = kv.state()?.cloned();
        // Causal depthwise convolution over [previous inputs; these inputs].
        let before = match &state {
            Some((conv, _)) => conv.clone(),
            None => Tensor::zeros((kernel - 1, channels), mixed.dtype(), mixed.device())?,
        };
        let xx = Tensor::cat(&[&before, &mixed], 0)?;
        let mut conv = xx
            .narrow(0, 0, seq)?
            .broadcast_mul(&d.conv.narrow(1, 0, 1)?.t()?)?;
        for j in 1..kernel {
            conv = (conv
                + xx.narrow(0, j, seq)?
                    .broadcast_mul(&d.conv.narrow(1, j, 1)?.t()?)?)?;
        }
        let conv = conv.silu()?;
        let conv_state = xx.narrow(0, seq, kernel - 1)?.contiguous()?;
        let heads = |x: Tensor, n: usize, width: usize| -> Result<Tensor> {
            Ok(x.reshape((seq, n, width))?.to_dtype(DType::F32)?)
        };
        let q = heads(conv.narrow(1, 0, nk * dk)?, nk, dk)?;
        let k = heads(conv.narrow(1, nk * dk, nk * dk)?, nk, dk)?;
        let v = heads(conv.narrow(1, 2 * nk * dk, nv * dv)?, nv, dv)?;
        let (q, k) = (l2norm(&q)?, l2norm(&k)?);
        let q = (q * (1.0 / (dk as f64).sqrt()))?;
        // Each query/key head serves nv / nk consecutive value heads.
        let spread = |x: Tensor| -> Result<Tensor> {
            let r = nv / nk;
            Ok(x.unsqueeze(2)?
                .broadcast_as((seq, nk, r, dk))?
                .reshape((seq, nv, dk))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (q, k) = (spread(q)?, spread(k)?);
        let v = v.transpose(0, 1)?.contiguous()?;
        let beta = candle_nn::ops::sigmoid(&d.in_proj_b.forward(&h)?)?
            .to_dtype(DType::F32)?
            .t()?
            .contiguous()?; // (nv, seq)
        let a = d.in_proj_a.forward(&h)?.to_dtype(DType::F32)?;
        let g = softplus(&a.broadcast_add(&d.dt_bias)?)?
            .broadcast_mul(&d.neg_a)?
            .t()?
            .contiguous()?; // (nv, seq)
        let s0 = match &state {
            Some((_, s)) => s.clone(),
            None => Tensor::zeros((nv, dk, dv), DType::F32, h.device())?,
        };
        let (out, s1) = if seq == 1 && state.is_some() {
            delta_rule_step(&q, &k, &v, &g, &beta, &s0)?
        } else {
            delta_rule_chunked(&q, &k, &v, &g, &beta, &s0, CHUNK)?
        };
        kv.set_state(seq, conv_state, s1);
        // (nv, seq, dv) -> (seq, nv, dv), normalized per head and gated by silu(z).
        let out = out.transpose(0, 1)?.to_dtype(h.dtype())?;
        let z = d.in_proj_z.forward(&h)?.reshape((seq, nv, dv))?;
        let normed = d.norm.forward(&out)?;
        let gated = (normed.to_dtype(DType::F32)? * z.to_dtype(DType::F32)?.silu()?)?
            .to_dtype(h.dtype())?
            .reshape((1, seq, nv * dv))?;
        d.out_proj.forward(&gated)
    }

    pub fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        let seq = embeds.dim(1)?;
        let rot = self.text_rotary(positions)?;
        let mut x = embeds.clone();
        for (i, (layer, kv)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let mixed = match &layer.mixer {
                Mixer::Attention(a) => self.attend(a, &h, &rot, kv)?,
                Mixer::DeltaNet(d) => self.delta_net(d, &h, kv)?,
            };
            x = (x + mixed)?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = layer.mlp.forward_then(&h, Some(&x))?;
            self.taps.record("text.layer", Some(i), &x);
        }
        let x = if all_logits {
            x
        } else {
            x.narrow(1, seq - 1, 1)?
        };
        let x = self.norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Parameter counts `(vision, text)`.
    pub fn param_counts(&self) -> (usize, usize) {
        let t = &self.cfg.text;
        let (d, hd) = (t.hidden_size, t.head_dim());
        let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
        let (nk, nv) = (t.linear_num_key_heads, t.linear_num_value_heads);
        let (dk, dv) = (t.linear_key_head_dim, t.linear_value_head_dim);
        let conv_dim = 2 * nk * dk + nv * dv;
        let bias = if t.attention_bias {
            2 * q + 2 * kv + d
        } else {
            0
        };
        let attn = d * 2 * q + 2 * d * kv + q * d + 2 * hd + bias;
        let delta = d * conv_dim
            + d * nv * dv
            + 2 * d * nv
            + conv_dim * t.linear_conv_kernel_dim
            + 2 * nv
            + dv
            + nv * dv * d;
        let shared = 2 * d + 3 * d * t.intermediate_size;
        let layers: usize = t
            .layer_types
            .iter()
            .map(|l| shared + if l == "full_attention" { attn } else { delta })
            .sum();
        let mut text = t.vocab_size * d + layers + d;
        if !t.tie_word_embeddings {
            text += t.vocab_size * d;
        }
        (self.vision.param_count(), text)
    }
}

/// `x / sqrt(sum(x^2) + 1e-6)` over the last dimension, in f32 (as the reference's FLA-compatible form).
fn l2norm(x: &Tensor) -> Result<Tensor> {
    let inv = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?)
}

/// `log(1 + exp(x))`, linear above 20 as torch's softplus.
fn softplus(x: &Tensor) -> Result<Tensor> {
    let soft = (x.exp()? + 1.0)?.log()?;
    let big = x.ge(20.0)?;
    Ok(big.where_cond(x, &soft)?)
}

/// One token of the gated delta rule. `q`, `k`: `(h, 1, dk)`; `v`: `(h, 1, dv)`; `g`, `beta`: `(h, 1)`;
/// `s`: `(h, dk, dv)`. Returns the output `(h, 1, dv)` and the new state.
pub fn delta_rule_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let s = s.broadcast_mul(&g.exp()?.unsqueeze(2)?)?;
    let remembered = k.matmul(&s)?; // (h, 1, dv)
    let delta = (v - remembered)?.broadcast_mul(&beta.unsqueeze(2)?)?;
    let s = (s + k.transpose(1, 2)?.matmul(&delta)?)?;
    Ok((q.matmul(&s)?, s))
}

/// The gated delta rule over a whole sequence in chunks (the parallel form): within a chunk, the
/// updates are condensed by the UT transform into matrix products; across chunks, the state carries.
/// Shapes as [`delta_rule_step`] with `n` tokens instead of 1. Agrees with `n` steps of
/// [`delta_rule_step`] (tested).
pub fn delta_rule_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    s: &Tensor,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (h, n, dk) = q.dims3()?;
    let dv = v.dim(2)?;
    let c = chunk;
    let pad = (c - n % c) % c;
    let nc = (n + pad) / c;
    let blocks = |x: &Tensor, width: usize| -> Result<Tensor> {
        Ok(x.pad_with_zeros(1, 0, pad)?.reshape((h, nc, c, width))?)
    };
    let (q, k, v) = (blocks(q, dk)?, blocks(k, dk)?, blocks(v, dv)?);
    let g = g.pad_with_zeros(1, 0, pad)?.reshape((h, nc, c))?;
    let beta = beta.pad_with_zeros(1, 0, pad)?.reshape((h, nc, c))?;
    let cum = running_sum(&g)?; // log of the decay from the chunk start to each token
                                // decay[i][j] = exp(cum_i - cum_j) for j <= i, 0 above the diagonal.
    let upper: Vec<f32> = (0..c * c)
        .map(|ij| {
            if ij % c > ij / c {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let upper = Tensor::from_vec(upper, (c, c), q.device())?;
    let decay = cum
        .unsqueeze(3)?
        .broadcast_sub(&cum.unsqueeze(2)?)?
        .broadcast_add(&upper)?
        .exp()?;
    let k_beta = k.broadcast_mul(&beta.unsqueeze(3)?)?;
    let v_beta = v.broadcast_mul(&beta.unsqueeze(3)?)?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let system = (k_beta.matmul(&kt)? * &decay)?;
    let exp_cum = cum.exp()?.unsqueeze(3)?;
    let new_values = unit_lower_solve(&system, &v_beta)?;
    let k_cumdecay = unit_lower_solve(&system, &k_beta.broadcast_mul(&exp_cum)?)?;
    let intra = (q.matmul(&kt)? * &decay)?;
    let q_decayed = q.broadcast_mul(&exp_cum)?;
    let last = cum.narrow(2, c - 1, 1)?; // (h, nc, 1)
    let k_decayed = k.broadcast_mul(&last.broadcast_sub(&cum)?.exp()?.unsqueeze(3)?)?;
    let chunk_decay = last.exp()?; // (h, nc, 1)
    let mut s = s.clone();
    let mut outs = Vec::with_capacity(nc);
    let at = |x: &Tensor, i: usize| -> Result<Tensor> { Ok(x.narrow(1, i, 1)?.squeeze(1)?) };
    for i in 0..nc {
        let v_new = (at(&new_values, i)? - at(&k_cumdecay, i)?.matmul(&s)?)?;
        outs.push((at(&q_decayed, i)?.matmul(&s)? + at(&intra, i)?.matmul(&v_new)?)?);
        let decay_i = at(&chunk_decay, i)?.unsqueeze(2)?; // (h, 1, 1)
        let written = at(&k_decayed, i)?.transpose(1, 2)?.matmul(&v_new)?;
        s = (s.broadcast_mul(&decay_i)? + written)?;
    }
    let out = Tensor::cat(&outs, 1)?.narrow(1, 0, n)?;
    Ok((out, s))
}

/// Cumulative sum over the last dimension, left to right in f32 as torch's CPU `cumsum` adds (candle's
/// `cumsum` is a matrix product, which rounds differently; with strong decays the sums reach thousands
/// and the rounding shows in the decay factors).
fn running_sum(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    for row in v.chunks_mut(n) {
        for i in 1..n {
            row[i] += row[i - 1];
        }
    }
    Ok(Tensor::from_vec(v, x.dims(), x.device())?)
}

/// For each `(c, c)` matrix `a` of `(.., c, c)` and right-hand side `b` `(.., c, d)`: `x` with
/// `(I + strictly_lower(a)) x = b` (the diagonal of `a` is ignored, as a unit-triangular solve does), by
/// forward substitution, row by row as LAPACK's solver does.
fn unit_lower_solve(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let c = a.dim(D::Minus1)?;
    let d = b.dim(D::Minus1)?;
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let mut x = b.flatten_all()?.to_vec1::<f32>()?;
    for (m, xs) in a.chunks(c * c).zip(x.chunks_mut(c * d)) {
        for i in 1..c {
            let (done, rest) = xs.split_at_mut(i * d);
            let row = &mut rest[..d];
            for (k, prev) in done.chunks(d).enumerate() {
                let f = m[i * c + k];
                if f != 0.0 {
                    for (r, p) in row.iter_mut().zip(prev) {
                        *r -= f * p;
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(x, b.dims(), b.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn chunked_delta_rule_equals_the_recurrent_steps() {
        // Odd sizes: 3 heads, 150 tokens (two full chunks of 64 and a ragged one), a chunk of 64 and
        // one of 7, a non-zero starting state.
        let (h, n, dk, dv) = (3, 150, 5, 7);
        let q = l2norm(&rand(&[h, n, dk], 1, 1.0)).unwrap();
        let k = l2norm(&rand(&[h, n, dk], 2, 1.0)).unwrap();
        let v = rand(&[h, n, dv], 3, 1.0);
        let g = (rand(&[h, n], 4, 0.5).abs().unwrap() * -1.0).unwrap();
        let beta = candle_nn::ops::sigmoid(&rand(&[h, n], 5, 2.0)).unwrap();
        let s0 = rand(&[h, dk, dv], 6, 0.3);
        let mut s = s0.clone();
        let mut outs = Vec::new();
        for i in 0..n {
            let tok = |x: &Tensor| x.narrow(1, i, 1).unwrap();
            let (o, s1) =
                delta_rule_step(&tok(&q), &tok(&k), &tok(&v), &tok(&g), &tok(&beta), &s).unwrap();
            outs.push(o);
            s = s1;
        }
        let want = Tensor::cat(&outs, 1).unwrap();
        for chunk in [64, 7] {
            let (got, s_got) = delta_rule_chunked(&q, &k, &v, &g, &beta, &s0, chunk).unwrap();
            let diff = |a: &Tensor, b: &Tensor| -> f32 {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            assert!(
                diff(&got, &want) < 1e-4,
                "chunk {chunk}: output off by {}",
                diff(&got, &want)
            );
            assert!(
                diff(&s_got, &s) < 1e-4,
                "chunk {chunk}: state off by {}",
                diff(&s_got, &s)
            );
        }
    }
}
