//! DINOv2 (Oquab et al., 2023) and DINOv2 with registers (Darcet et al., 2024) in the Hugging Face
//! layout (`model_type` `dinov2` or `dinov2_with_registers`: `facebook/dinov2-small` .. `-giant`,
//! `facebook/dinov2-with-registers-*`), as an image backbone for the anomaly detectors: a plain ViT
//! whose patch tokens, self-supervised on 142M images, describe texture and shape without a label.
//!
//! The patches are embedded by a `patch x patch` convolution; a class token (and, with registers,
//! that many register tokens after it) goes in front; the position embeddings, made for one square
//! grid, are resampled to the image's grid as transformers does (bicubic, corners not aligned; with
//! registers antialiased, as the registers variant's code asks). Each layer is pre-norm attention
//! and MLP (GELU, or SwiGLU for the giant), each scaled per channel by its layer scale before the
//! residual: the scale is folded into the output projection's rows at load.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::layers::{attention, Activation, GatedMlp, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::load::weights::Weights;

/// What `config.json` says about the network.
#[derive(Debug, Clone, Deserialize)]
pub struct Dinov2Config {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub num_register_tokens: usize,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

/// The model types [`Dinov2::load`] reads.
pub const MODEL_TYPES: [&str; 2] = ["dinov2", "dinov2_with_registers"];

/// A ViT layer's MLP: two projections around an activation, or gated (SwiGLU).
#[derive(Debug, Clone)]
pub(super) enum Mlp {
    Plain {
        fc1: Linear,
        fc2: Linear,
        act: Activation,
    },
    Gated(GatedMlp),
}

/// One pre-norm ViT layer with layer scales (DINOv2's and DINOv3's): `x + ls1 * attn(norm1(x))`,
/// then `x + ls2 * mlp(norm2(x))`, each scale folded into the projection before it.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub norm1: LayerNorm,
    /// q, k and v in one projection.
    pub qkv: Linear,
    /// The output projection, times the first layer scale.
    pub proj: Linear,
    pub norm2: LayerNorm,
    /// Its last projection times the second layer scale.
    pub mlp: Mlp,
}

/// Rotary positions for the patch tokens (DINOv3): cos and sin `(patches, head_dim / 2)`, and how
/// many tokens in front (class, registers) stay unturned.
pub(super) struct PatchRope<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub prefix: usize,
}

impl Layer {
    /// The layer over `hidden` `(tokens, dim)` with `heads` heads, q and k of the patch tokens
    /// turned by `rope` where given.
    pub fn forward(
        &self,
        hidden: &Tensor,
        heads: usize,
        rope: Option<&PatchRope>,
    ) -> Result<Tensor> {
        let (t, d) = hidden.dims2()?;
        let head_dim = d / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(hidden)?)?
            .reshape((t, 3, heads, head_dim))?
            .permute((1, 2, 0, 3))?; // (3, heads, t, head_dim)
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.get(i)?.unsqueeze(0)?.contiguous()?) };
        let turn = |x: Tensor| -> Result<Tensor> {
            let Some(r) = rope else { return Ok(x) };
            let patches = super::layers::rope(&x.narrow(2, r.prefix, t - r.prefix)?, r.cos, r.sin)?;
            Ok(Tensor::cat(&[&x.narrow(2, 0, r.prefix)?, &patches], 2)?)
        };
        let attn = attention(&turn(part(0)?)?, &turn(part(1)?)?, &part(2)?, scale, false)?
            .squeeze(0)?
            .transpose(0, 1)?
            .reshape((t, d))?;
        let hidden = self.proj.forward_then(&attn, None, Some(hidden))?;
        let normed = self.norm2.forward(&hidden)?;
        match &self.mlp {
            Mlp::Plain { fc1, fc2, act } => {
                fc2.forward_then(&act.forward(&fc1.forward(&normed)?)?, None, Some(&hidden))
            }
            Mlp::Gated(mlp) => mlp.forward_then(&normed, Some(&hidden)),
        }
    }
}

/// A loaded DINOv2.
#[derive(Debug, Clone)]
pub struct Dinov2 {
    pub cfg: Dinov2Config,
    /// The patch convolution as a projection of each flattened `3 x patch x patch` patch.
    patch_embed: Linear,
    cls: Tensor,
    registers: Option<Tensor>,
    /// `(1 + grid^2, hidden)`: the class token's, then the square grid's in raster order.
    positions: Tensor,
    /// The side of the grid the position embeddings were made for.
    grid: usize,
    layers: Vec<Layer>,
    norm: LayerNorm,
}

/// A linear layer (with its bias where `bias`) whose outputs are multiplied by `scale` (a layer
/// scale), folded into its rows.
pub(super) fn scaled_linear(
    w: &Weights,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    scale: &Tensor,
) -> Result<Linear> {
    let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
    let bias = bias
        .then(|| w.get(&format!("{prefix}.bias"), &[out_dim]))
        .transpose()?;
    Ok(Linear::from_weight(
        weight.broadcast_mul(&scale.unsqueeze(1)?)?,
        bias.map(|b| b * scale).transpose()?,
    ))
}

impl Dinov2 {
    /// Loads the network from its config and weights (names as `save_pretrained` writes them, with
    /// or without a `dinov2.` prefix).
    pub fn load(cfg: Dinov2Config, w: &Weights) -> Result<Self> {
        let bad = |msg: String| Error::InvalidInput(format!("DINOv2 config.json: {msg}"));
        let (d, heads, p) = (cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size);
        if d == 0 || heads == 0 || !d.is_multiple_of(heads) || d > 8192 {
            return Err(bad(format!(
                "hidden_size {d} is not a positive multiple of num_attention_heads {heads} up to 8192"
            )));
        }
        if p == 0 || p > 64 || cfg.image_size < p || cfg.image_size > 8192 {
            return Err(bad(format!(
                "patch_size {p} or image_size {} out of range",
                cfg.image_size
            )));
        }
        if cfg.num_hidden_layers == 0 || cfg.num_hidden_layers > 256 || cfg.num_register_tokens > 64
        {
            return Err(bad(format!(
                "num_hidden_layers {} or num_register_tokens {} out of range",
                cfg.num_hidden_layers, cfg.num_register_tokens
            )));
        }
        if !(cfg.mlp_ratio > 0.0 && cfg.mlp_ratio <= 16.0) {
            return Err(bad(format!("mlp_ratio {} out of range", cfg.mlp_ratio)));
        }
        let prefix = if w.contains("embeddings.cls_token") {
            ""
        } else {
            "dinov2."
        };
        let name = |n: &str| format!("{prefix}{n}");
        let grid = cfg.image_size / p;
        let conv = w.get(
            &name("embeddings.patch_embeddings.projection.weight"),
            &[d, 3, p, p],
        )?;
        let patch_embed = Linear::from_weight(
            conv.reshape((d, 3 * p * p))?,
            Some(w.get(&name("embeddings.patch_embeddings.projection.bias"), &[d])?),
        );
        let cls = w
            .get(&name("embeddings.cls_token"), &[1, 1, d])?
            .reshape((1, d))?;
        let registers = (cfg.num_register_tokens > 0)
            .then(|| -> Result<Tensor> {
                let r = w.get(
                    &name("embeddings.register_tokens"),
                    &[1, cfg.num_register_tokens, d],
                )?;
                Ok(r.reshape((cfg.num_register_tokens, d))?)
            })
            .transpose()?;
        let positions = w
            .get(
                &name("embeddings.position_embeddings"),
                &[1, 1 + grid * grid, d],
            )?
            .reshape((1 + grid * grid, d))?;
        let act = Activation::from_config(&cfg.hidden_act, "hidden_act")?;
        let mlp_hidden = (d as f64 * cfg.mlp_ratio) as usize;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = name(&format!("encoder.layer.{i}"));
                let a = format!("{l}.attention");
                let scale1 = w.get(&format!("{l}.layer_scale1.lambda1"), &[d])?;
                let scale2 = w.get(&format!("{l}.layer_scale2.lambda1"), &[d])?;
                let part = |n: &str| -> Result<(Tensor, Option<Tensor>)> {
                    let weight = w.get(&format!("{a}.attention.{n}.weight"), &[d, d])?;
                    let bias = cfg
                        .qkv_bias
                        .then(|| w.get(&format!("{a}.attention.{n}.bias"), &[d]))
                        .transpose()?;
                    Ok((weight, bias))
                };
                let (q, k, v) = (part("query")?, part("key")?, part("value")?);
                let qkv_bias = match (&q.1, &k.1, &v.1) {
                    (Some(qb), Some(kb), Some(vb)) => Some(Tensor::cat(&[qb, kb, vb], 0)?),
                    _ => None,
                };
                let qkv = Linear::from_weight(Tensor::cat(&[&q.0, &k.0, &v.0], 0)?, qkv_bias);
                let mlp = if cfg.use_swiglu_ffn {
                    // Two thirds of the MLP's width, rounded up to a multiple of 8.
                    let hidden = (mlp_hidden * 2 / 3).div_ceil(8) * 8;
                    let [gate, up]: [Linear; 2] = Linear::load_parts(
                        w,
                        &format!("{l}.mlp.weights_in"),
                        d,
                        &[hidden, hidden],
                        true,
                    )?
                    .try_into()
                    .map_err(|_| Error::InvalidInput("weights_in: two parts expected".into()))?;
                    let down = scaled_linear(
                        w,
                        &format!("{l}.mlp.weights_out"),
                        hidden,
                        d,
                        true,
                        &scale2,
                    )?;
                    Mlp::Gated(GatedMlp::from_parts(gate, up, down, Activation::Silu))
                } else {
                    Mlp::Plain {
                        fc1: Linear::load(w, &format!("{l}.mlp.fc1"), d, mlp_hidden, true)?,
                        fc2: scaled_linear(
                            w,
                            &format!("{l}.mlp.fc2"),
                            mlp_hidden,
                            d,
                            true,
                            &scale2,
                        )?,
                        act,
                    }
                };
                Ok(Layer {
                    norm1: LayerNorm::load(w, &format!("{l}.norm1"), d, cfg.layer_norm_eps)?,
                    qkv,
                    proj: scaled_linear(w, &format!("{a}.output.dense"), d, d, true, &scale1)?,
                    norm2: LayerNorm::load(w, &format!("{l}.norm2"), d, cfg.layer_norm_eps)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(w, &name("layernorm"), d, cfg.layer_norm_eps)?;
        Ok(Dinov2 {
            cfg,
            patch_embed,
            cls,
            registers,
            positions,
            grid,
            layers,
            norm,
        })
    }

    /// `(hidden, patch)` of every layer: the stages a detector may read.
    pub fn stage_shapes(&self) -> Vec<(usize, usize)> {
        vec![(self.cfg.hidden_size, self.cfg.patch_size); self.layers.len()]
    }

    /// The patch tokens after layers `0..=last` of `x` `(1, 3, h, w)` (a `patch`-pixel grid, the
    /// rest of the image cut off), each through the final layer norm (as DINOv2's intermediate
    /// features are read), as maps `(1, hidden, h / patch, w / patch)`.
    pub fn stages(&self, x: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        let p = self.cfg.patch_size;
        let (gh, gw) = patch_grid(x, p, "DINOv2")?;
        let tokens = self.patch_embed.forward(&patches(x, p, gh, gw)?)?;
        let tokens = Tensor::cat(&[&self.cls, &tokens], 0)?;
        let tokens = (tokens + self.positions_for(gh, gw)?)?;
        let extra = 1 + self.cfg.num_register_tokens;
        let hidden = match &self.registers {
            Some(r) => Tensor::cat(
                &[&tokens.narrow(0, 0, 1)?, r, &tokens.narrow(0, 1, gh * gw)?],
                0,
            )?,
            None => tokens,
        };
        let heads = self.cfg.num_attention_heads;
        layer_maps(
            &self.layers[..self.layers.len().min(last + 1)],
            &self.norm,
            hidden,
            heads,
            None,
            extra,
            (gh, gw),
        )
    }

    /// The position embeddings for a `gh x gw` grid, the class token's first: as stored for the
    /// square grid they were made for, else the grid resampled (each channel a `grid x grid`
    /// image).
    fn positions_for(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let (g, d) = (self.grid, self.cfg.hidden_size);
        if gh == g && gw == g {
            return Ok(self.positions.clone());
        }
        let grid = self.positions.narrow(0, 1, g * g)?.to_dtype(DType::F32)?;
        let values = grid.flatten_all()?.to_vec1::<f32>()?;
        let antialias = self.cfg.num_register_tokens > 0 || self.cfg.model_type == MODEL_TYPES[1];
        let resampled = resample_bicubic(&values, d, (g, g), (gh, gw), antialias);
        let resampled = Tensor::from_vec(resampled, (gh * gw, d), &Device::Cpu)?;
        Ok(Tensor::cat(
            &[&self.positions.narrow(0, 0, 1)?, &resampled],
            0,
        )?)
    }
}

/// The grid of `p x p` patches of `x` `(1, 3, h, w)` (the rest of the image cut off), or the error
/// naming `family` for an input that is not one image of at least one patch.
pub(super) fn patch_grid(x: &Tensor, p: usize, family: &str) -> Result<(usize, usize)> {
    let (n, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    if n != 1 || c != 3 || gh == 0 || gw == 0 {
        return Err(Error::InvalidInput(format!(
            "{family} takes one image (1, 3, h, w) of at least {p} x {p} pixels, not {:?}",
            x.dims()
        )));
    }
    Ok((gh, gw))
}

/// `hidden` `(extra + gh * gw, dim)` through each of `layers`, and after each its patch tokens
/// (those after the `extra` in front) through `norm`, as maps `(1, dim, gh, gw)`.
pub(super) fn layer_maps(
    layers: &[Layer],
    norm: &LayerNorm,
    mut hidden: Tensor,
    heads: usize,
    rope: Option<&PatchRope>,
    extra: usize,
    (gh, gw): (usize, usize),
) -> Result<Vec<Tensor>> {
    let mut outs = Vec::with_capacity(layers.len());
    for layer in layers {
        hidden = layer.forward(&hidden, heads, rope)?;
        let d = hidden.dim(1)?;
        let patches = norm.forward(&hidden)?.narrow(0, extra, gh * gw)?;
        outs.push(patches.t()?.reshape((1, d, gh, gw))?);
    }
    Ok(outs)
}

/// The `(gh * gw, 3 * p * p)` flattened `p x p` patches of `x` `(1, 3, h, w)` (the rest of the
/// image cut off), in raster order, each as a patch convolution's weight rows read them.
pub(super) fn patches(x: &Tensor, p: usize, gh: usize, gw: usize) -> Result<Tensor> {
    Ok(x.narrow(2, 0, gh * p)?
        .narrow(3, 0, gw * p)?
        .reshape((3, gh, p, gw, p))?
        .permute((1, 3, 0, 2, 4))?
        .reshape((gh * gw, 3 * p * p))?)
}

/// Per output index along one axis, the input indices and weights of PyTorch's bicubic resampling
/// from `inp` to `out` values (`align_corners=False`): without `antialias`, cubic convolution with
/// `a = -0.75` over the 4 nearest inputs, indices clamped at the edges; with it, the antialiased
/// windows of `a = -0.5`, widened by the scale when shrinking (Pillow's, which the image resizer
/// shares).
fn axis_weights(inp: usize, out: usize, antialias: bool) -> Vec<Vec<(usize, f32)>> {
    if antialias {
        return crate::image::resize_windows(inp, out, crate::image::Filter::Bicubic)
            .into_iter()
            .map(|(start, w)| {
                w.into_iter()
                    .enumerate()
                    .map(|(k, v)| (start + k, v as f32))
                    .collect()
            })
            .collect();
    }
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let x0 = real.floor();
            let t = real - x0;
            [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
                .iter()
                .enumerate()
                .map(|(k, &v)| {
                    let j = (x0 as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
                    (j, v)
                })
                .collect()
        })
        .collect()
}

/// `values` (`ih x iw` positions of `dim` channels, raster order) resampled to `oh x ow`: along
/// the width, then the height, with [`axis_weights`].
fn resample_bicubic(
    values: &[f32],
    dim: usize,
    (ih, iw): (usize, usize),
    (oh, ow): (usize, usize),
    antialias: bool,
) -> Vec<f32> {
    let wx = axis_weights(iw, ow, antialias);
    let wy = axis_weights(ih, oh, antialias);
    let mut rows = vec![0f32; ih * ow * dim];
    for y in 0..ih {
        for (x, taps) in wx.iter().enumerate() {
            let out = &mut rows[(y * ow + x) * dim..][..dim];
            for &(j, w) in taps {
                let src = &values[(y * iw + j) * dim..][..dim];
                out.iter_mut().zip(src).for_each(|(o, s)| *o += w * s);
            }
        }
    }
    let mut out = vec![0f32; oh * ow * dim];
    for (y, taps) in wy.iter().enumerate() {
        for x in 0..ow {
            let o = &mut out[(y * ow + x) * dim..][..dim];
            for &(j, w) in taps {
                let src = &rows[(j * ow + x) * dim..][..dim];
                o.iter_mut().zip(src).for_each(|(o, s)| *o += w * s);
            }
        }
    }
    out
}
