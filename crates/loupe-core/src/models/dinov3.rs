//! DINOv3 (Siméoni et al., 2025) ViTs in the Hugging Face layout (`model_type` `dinov3_vit`:
//! `facebook/dinov3-vits16-pretrain-lvd1689m` .. `-vit7b16`), as an image backbone for the anomaly
//! detectors: the backbone of the 2026 training-free memory-bank detectors.
//!
//! Where it differs from DINOv2 ([`super::dinov2`], whose layer it shares): no position
//! embeddings; instead q and k of every patch token are turned by rotary positions made from the
//! patch's centre `(y, x)` in `[-1, 1]` (a quarter of each head's frequencies for y, a quarter for
//! x, both repeated for the rotate-half pairs), the class and register tokens left unturned, so any
//! grid is read without resampling. The key projection has no bias unless the config says so; the
//! MLP is plain or gated (`use_gated_mlp`); the final norm is `norm`.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::dinov2::{layer_maps, patch_grid, patches, scaled_linear, Layer, Mlp, PatchRope};
use super::layers::{cos_sin, Activation, GatedMlp, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::load::weights::Weights;

/// What `config.json` says about the network.
#[derive(Debug, Clone, Deserialize)]
pub struct Dinov3Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub patch_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "yes")]
    pub query_bias: bool,
    #[serde(default)]
    pub key_bias: bool,
    #[serde(default = "yes")]
    pub value_bias: bool,
    #[serde(default = "yes")]
    pub proj_bias: bool,
    #[serde(default = "yes")]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_gated_mlp: bool,
    #[serde(default)]
    pub num_register_tokens: usize,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}
fn default_theta() -> f64 {
    100.0
}
fn yes() -> bool {
    true
}

/// The model type [`Dinov3::load`] reads.
pub const MODEL_TYPE: &str = "dinov3_vit";

/// A loaded DINOv3 ViT.
#[derive(Debug, Clone)]
pub struct Dinov3 {
    pub cfg: Dinov3Config,
    /// The patch convolution as a projection of each flattened `3 x patch x patch` patch.
    patch_embed: Linear,
    /// The class token, then the registers: `(1 + registers, hidden)`.
    prefix: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
}

impl Dinov3 {
    /// Loads the network from its config and weights (layers named `layer.N` as published, or
    /// `model.layer.N` as transformers holds them).
    pub fn load(cfg: Dinov3Config, w: &Weights) -> Result<Self> {
        let bad = |msg: String| Error::InvalidInput(format!("DINOv3 config.json: {msg}"));
        let (d, heads, p) = (cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size);
        // Rotary positions take a quarter of each head for y and a quarter for x.
        if d == 0 || heads == 0 || !d.is_multiple_of(heads) || !(d / heads).is_multiple_of(4) {
            return Err(bad(format!(
                "hidden_size {d} over num_attention_heads {heads} is not a head width divisible \
                 by 4"
            )));
        }
        if d > 8192 || p == 0 || p > 64 {
            return Err(bad(format!(
                "hidden_size {d} or patch_size {p} out of range"
            )));
        }
        if cfg.num_hidden_layers == 0
            || cfg.num_hidden_layers > 256
            || cfg.num_register_tokens > 64
            || cfg.intermediate_size == 0
            || cfg.intermediate_size > 65536
        {
            return Err(bad(format!(
                "num_hidden_layers {}, num_register_tokens {} or intermediate_size {} out of range",
                cfg.num_hidden_layers, cfg.num_register_tokens, cfg.intermediate_size
            )));
        }
        if !(cfg.rope_theta > 1.0 && cfg.rope_theta.is_finite()) {
            return Err(bad(format!("rope_theta {} out of range", cfg.rope_theta)));
        }
        let layer_prefix = if w.contains("model.layer.0.norm1.weight") {
            "model.layer"
        } else {
            "layer"
        };
        let conv = w.get("embeddings.patch_embeddings.weight", &[d, 3, p, p])?;
        let patch_embed = Linear::from_weight(
            conv.reshape((d, 3 * p * p))?,
            Some(w.get("embeddings.patch_embeddings.bias", &[d])?),
        );
        let cls = w.get("embeddings.cls_token", &[1, 1, d])?.reshape((1, d))?;
        let prefix = match cfg.num_register_tokens {
            0 => cls,
            r => Tensor::cat(
                &[
                    &cls,
                    &w.get("embeddings.register_tokens", &[1, r, d])?
                        .reshape((r, d))?,
                ],
                0,
            )?,
        };
        let act = Activation::from_config(&cfg.hidden_act, "hidden_act")?;
        let hidden = cfg.intermediate_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{layer_prefix}.{i}");
                let scale1 = w.get(&format!("{l}.layer_scale1.lambda1"), &[d])?;
                let scale2 = w.get(&format!("{l}.layer_scale2.lambda1"), &[d])?;
                let proj = |n: &str, bias: bool| -> Result<(Tensor, Tensor)> {
                    let name = format!("{l}.attention.{n}_proj");
                    let weight = w.get(&format!("{name}.weight"), &[d, d])?;
                    let bias = match bias {
                        true => w.get(&format!("{name}.bias"), &[d])?,
                        false => Tensor::zeros(d, weight.dtype(), &Device::Cpu)?,
                    };
                    Ok((weight, bias))
                };
                let (q, k, v) = (
                    proj("q", cfg.query_bias)?,
                    proj("k", cfg.key_bias)?,
                    proj("v", cfg.value_bias)?,
                );
                let qkv = Linear::from_weight(
                    Tensor::cat(&[&q.0, &k.0, &v.0], 0)?,
                    Some(Tensor::cat(&[&q.1, &k.1, &v.1], 0)?),
                );
                let mlp = format!("{l}.mlp");
                let down = scaled_linear(
                    w,
                    &format!("{mlp}.down_proj"),
                    hidden,
                    d,
                    cfg.mlp_bias,
                    &scale2,
                )?;
                let up = Linear::load(w, &format!("{mlp}.up_proj"), d, hidden, cfg.mlp_bias)?;
                let mlp = if cfg.use_gated_mlp {
                    let gate =
                        Linear::load(w, &format!("{mlp}.gate_proj"), d, hidden, cfg.mlp_bias)?;
                    Mlp::Gated(GatedMlp::from_parts(gate, up, down, act))
                } else {
                    Mlp::Plain {
                        fc1: up,
                        fc2: down,
                        act,
                    }
                };
                let eps = cfg.layer_norm_eps;
                Ok(Layer {
                    norm1: LayerNorm::load(w, &format!("{l}.norm1"), d, eps)?,
                    qkv,
                    proj: scaled_linear(
                        w,
                        &format!("{l}.attention.o_proj"),
                        d,
                        d,
                        cfg.proj_bias,
                        &scale1,
                    )?,
                    norm2: LayerNorm::load(w, &format!("{l}.norm2"), d, eps)?,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::load(w, "norm", d, cfg.layer_norm_eps)?;
        Ok(Dinov3 {
            cfg,
            patch_embed,
            prefix,
            layers,
            norm,
        })
    }

    /// `(hidden, patch)` of every layer: the stages a detector may read.
    pub fn stage_shapes(&self) -> Vec<(usize, usize)> {
        vec![(self.cfg.hidden_size, self.cfg.patch_size); self.layers.len()]
    }

    /// The patch tokens after layers `0..=last` of `x` `(1, 3, h, w)` (a `patch`-pixel grid, the
    /// rest of the image cut off), each through the final norm (as the backbone's feature maps
    /// are read), as maps `(1, hidden, h / patch, w / patch)`.
    pub fn stages(&self, x: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        let p = self.cfg.patch_size;
        let (gh, gw) = patch_grid(x, p, "DINOv3")?;
        let tokens = self.patch_embed.forward(&patches(x, p, gh, gw)?)?;
        let hidden = Tensor::cat(&[&self.prefix, &tokens], 0)?;
        let (cos, sin) = self.rotary(gh, gw)?;
        let extra = self.prefix.dim(0)?;
        let rope = PatchRope {
            cos: &cos,
            sin: &sin,
            prefix: extra,
        };
        let heads = self.cfg.num_attention_heads;
        layer_maps(
            &self.layers[..self.layers.len().min(last + 1)],
            &self.norm,
            hidden,
            heads,
            Some(&rope),
            extra,
            (gh, gw),
        )
    }

    /// cos and sin `(gh * gw, head_dim / 2)` of each patch's angles: `2 pi y f_k` then
    /// `2 pi x f_k` for the `head_dim / 4` frequencies `f_k = theta^(-4k / head_dim)`, with `(y, x)`
    /// the patch's centre scaled to `[-1, 1]`.
    fn rotary(&self, gh: usize, gw: usize) -> Result<(Tensor, Tensor)> {
        let head_dim = self.cfg.hidden_size / self.cfg.num_attention_heads;
        let base = self.cfg.rope_theta as f32;
        let freqs: Vec<f32> = (0..head_dim / 4)
            .map(|k| 1.0 / base.powf((4 * k) as f32 / head_dim as f32))
            .collect();
        let centre = |i: usize, n: usize| 2.0 * ((i as f32 + 0.5) / n as f32) - 1.0;
        let mut angles = Vec::with_capacity(gh * gw * head_dim / 2);
        for y in 0..gh {
            for x in 0..gw {
                for coord in [centre(y, gh), centre(x, gw)] {
                    angles.extend(freqs.iter().map(|f| 2.0 * std::f32::consts::PI * coord * f));
                }
            }
        }
        cos_sin(
            &angles,
            gh * gw,
            head_dim / 2,
            candle_core::DType::F32,
            &Device::Cpu,
        )
    }
}
