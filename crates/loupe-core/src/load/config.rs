//! Config structs read straight from `config.json` and `preprocessor_config.json`.
//!
//! Two layouts exist and both are read here, and only here:
//! - published Qwen2-VL checkpoints keep the text fields at the top level with
//!   `rope_scaling: {"type": "mrope", "mrope_section": [...]}` and `rope_theta`;
//! - checkpoints saved by transformers 5 nest them under `text_config` with `rope_parameters`.
//!
//! Defaults are transformers' defaults.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{read_json, Error, Result};

/// The text decoder's hyper-parameters (Qwen2 family).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_act_silu")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Filled from `rope_parameters` / `rope_scaling` / `rope_theta`, whichever the file has.
    #[serde(skip)]
    pub rope_theta: f64,
    #[serde(skip)]
    pub mrope_section: Vec<usize>,
    #[serde(skip)]
    pub tie_word_embeddings: bool,
    /// Qwen3: biases on the q/k/v/o projections (`attention_bias`); Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: biases on the gate, up and down projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Llama: how the rotary frequencies are scaled (`rope_scaling` / `rope_parameters`).
    #[serde(skip)]
    pub rope_scaling: RopeScaling,
    /// Qwen3: RMSNorm over each head of q and k before the rotary embedding.
    #[serde(skip)]
    pub qk_norm: bool,
    /// Qwen3-VL: M-RoPE frequencies interleaved (t, h, w, t, h, w, ...) rather than in three blocks.
    #[serde(skip)]
    pub mrope_interleaved: bool,
    /// Qwen3.5: the fraction of each head that turns with the rotary embedding (the rest passes).
    #[serde(skip)]
    pub partial_rotary_factor: f64,
    /// Qwen3.5: `linear_attention` (Gated DeltaNet) or `full_attention` per layer.
    #[serde(default)]
    pub layer_types: Vec<String>,
    /// Qwen3.5's Gated DeltaNet: causal convolution width, key/value head sizes and counts.
    #[serde(default = "default_conv_kernel")]
    pub linear_conv_kernel_dim: usize,
    #[serde(default = "default_linear_head_dim")]
    pub linear_key_head_dim: usize,
    #[serde(default = "default_linear_head_dim")]
    pub linear_value_head_dim: usize,
    #[serde(default = "default_linear_key_heads")]
    pub linear_num_key_heads: usize,
    #[serde(default = "default_linear_value_heads")]
    pub linear_num_value_heads: usize,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-0.5` (else `head_dim^-0.5`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: how many positions a `sliding_attention` layer sees, its own included.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 3: the rotary base of the `sliding_attention` layers (`rope_local_base_freq`, or
    /// `rope_parameters.sliding_attention.rope_theta`); `rope_theta` is the other layers'.
    #[serde(skip)]
    pub local_rope_theta: f64,
    /// Gemma 2's cap on attention scores. Gemma 3 configs carry the field but transformers' (and
    /// llama.cpp's) Gemma 3 never applies it, so neither does Loupe (it warns where it is set).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Phi-3: LongRoPE (`rope_type` `longrope`, the older `su`), read by [`LongRope::from_json`].
    #[serde(skip)]
    pub longrope: Option<LongRope>,
    /// Phi-3: the context the model was pretrained with (LongRoPE switches past it).
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Gemma: the output logits become `cap * tanh(logit / cap)`.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
}

/// How the rotary inverse frequencies are scaled for a longer context (transformers' `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// `linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3`: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Reads a `rope_scaling` / `rope_parameters` object (`rope_type` or the older `type`).
    pub fn from_json(path: &Path, rope: Option<&Map<String, Value>>) -> Result<RopeScaling> {
        let Some(r) = rope else {
            return Ok(RopeScaling::None);
        };
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            let v = r.get(key).and_then(Value::as_f64).ok_or_else(|| {
                Error::config(
                    path,
                    format!("rope_scaling.{key}"),
                    "missing or not a number",
                )
            })?;
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(
                    path,
                    format!("rope_scaling.{key}"),
                    format!("{v} is not a positive number"),
                ));
            }
            Ok(v)
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let s = RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    ..
                } = s
                {
                    if hi <= lo {
                        return Err(Error::config(
                            path,
                            "rope_scaling.high_freq_factor",
                            format!("{hi} is not above low_freq_factor {lo}"),
                        ));
                    }
                }
                Ok(s)
            }
            other => Err(Error::config(
                path,
                "rope_scaling.rope_type",
                format!("`{other}` is not supported; Loupe reads default, linear and llama3"),
            )),
        }
    }

    /// `inv_freq` scaled, in f32 as transformers computes it.
    pub fn apply(self, inv_freq: &mut [f32]) {
        match self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                for f in inv_freq {
                    *f /= factor as f32;
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, lo, hi, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                for f in inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }
}

impl TextConfig {
    /// `head_dim`, else hidden size over heads (0 for zero heads, which validation refuses).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or_else(|| {
            self.hidden_size
                .checked_div(self.num_attention_heads)
                .unwrap_or(0)
        })
    }

    /// The width of each head that turns with the rotary embedding (`partial_rotary_factor` of it,
    /// even); the rest passes unturned.
    pub fn rotary_dim(&self) -> usize {
        ((self.head_dim() as f64 * self.partial_rotary_factor) as usize) & !1
    }
}

/// The vision tower's hyper-parameters, in Qwen2-VL's field names. Qwen2.5-VL's tower is read from
/// its own names ([`Qwen25VisionConfig`]) into this struct, with its window-attention fields filled.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    /// Width of the merger output, equal to the text hidden size.
    pub hidden_size: usize,
    #[serde(default = "default_act_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub num_heads: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_merge")]
    pub spatial_merge_size: usize,
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    #[serde(skip)]
    pub rope_theta: f64,
    /// MLP width when the file states it (Qwen2.5-VL); otherwise `embed_dim * mlp_ratio`.
    #[serde(skip)]
    pub intermediate_size: Option<usize>,
    /// Qwen2.5-VL: attention window in pixels (0: every block attends over the whole image).
    #[serde(skip)]
    pub window_size: usize,
    /// Qwen2.5-VL: the blocks that attend over the whole image rather than within windows.
    #[serde(skip)]
    pub fullatt_block_indexes: Vec<usize>,
    /// Qwen3-VL: size of the learned position-embedding table (a square grid), 0 for none.
    #[serde(skip)]
    pub num_position_embeddings: usize,
    /// Qwen3-VL: the blocks whose output goes through a DeepStack merger into the first decoder layers.
    #[serde(skip)]
    pub deepstack_visual_indexes: Vec<usize>,
}

/// Qwen2.5-VL's `vision_config`: `hidden_size` is the tower's width and `out_hidden_size` the merger's
/// output (Qwen2-VL calls them `embed_dim` and `hidden_size`).
#[derive(Debug, Clone, Deserialize)]
struct Qwen25VisionConfig {
    depth: usize,
    hidden_size: usize,
    out_hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    #[serde(default = "default_act_silu")]
    hidden_act: String,
    #[serde(default = "default_in_channels")]
    in_channels: usize,
    #[serde(default = "default_patch")]
    patch_size: usize,
    #[serde(default = "default_merge")]
    spatial_merge_size: usize,
    #[serde(default = "default_temporal")]
    temporal_patch_size: usize,
    #[serde(default = "default_window")]
    window_size: usize,
    #[serde(default = "default_fullatt")]
    fullatt_block_indexes: Vec<usize>,
}

impl From<Qwen25VisionConfig> for VisionConfig {
    fn from(v: Qwen25VisionConfig) -> Self {
        VisionConfig {
            depth: v.depth,
            embed_dim: v.hidden_size,
            hidden_size: v.out_hidden_size,
            hidden_act: v.hidden_act,
            mlp_ratio: v.intermediate_size as f64 / v.hidden_size as f64,
            num_heads: v.num_heads,
            in_channels: v.in_channels,
            patch_size: v.patch_size,
            spatial_merge_size: v.spatial_merge_size,
            temporal_patch_size: v.temporal_patch_size,
            rope_theta: 10_000.0,
            intermediate_size: Some(v.intermediate_size),
            window_size: v.window_size,
            fullatt_block_indexes: v.fullatt_block_indexes,
            num_position_embeddings: 0,
            deepstack_visual_indexes: Vec::new(),
        }
    }
}

/// Qwen3-VL's `vision_config` (named as Qwen2.5-VL's, plus the learned position grid and DeepStack).
#[derive(Debug, Clone, Deserialize)]
struct Qwen3VisionConfig {
    depth: usize,
    hidden_size: usize,
    out_hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    #[serde(default = "default_act_gelu_tanh")]
    hidden_act: String,
    #[serde(default = "default_in_channels")]
    in_channels: usize,
    #[serde(default = "default_patch16")]
    patch_size: usize,
    #[serde(default = "default_merge")]
    spatial_merge_size: usize,
    #[serde(default = "default_temporal")]
    temporal_patch_size: usize,
    #[serde(default = "default_pos_embeddings")]
    num_position_embeddings: usize,
    #[serde(default = "default_deepstack")]
    deepstack_visual_indexes: Vec<usize>,
}

impl From<Qwen3VisionConfig> for VisionConfig {
    fn from(v: Qwen3VisionConfig) -> Self {
        VisionConfig {
            depth: v.depth,
            embed_dim: v.hidden_size,
            hidden_size: v.out_hidden_size,
            hidden_act: v.hidden_act,
            mlp_ratio: v.intermediate_size as f64 / v.hidden_size as f64,
            num_heads: v.num_heads,
            in_channels: v.in_channels,
            patch_size: v.patch_size,
            spatial_merge_size: v.spatial_merge_size,
            temporal_patch_size: v.temporal_patch_size,
            rope_theta: 10_000.0,
            intermediate_size: Some(v.intermediate_size),
            window_size: 0,
            fullatt_block_indexes: Vec::new(),
            num_position_embeddings: v.num_position_embeddings,
            deepstack_visual_indexes: v.deepstack_visual_indexes,
        }
    }
}

/// A Qwen2-VL or Qwen2.5-VL checkpoint's `config.json`, whichever layout it was saved in.
#[derive(Debug, Clone)]
pub struct Qwen2VlConfig {
    pub model_type: String,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    /// The dtype the weights were saved in (`torch_dtype` / `dtype`), if stated.
    pub dtype: Option<String>,
}

fn default_rms_eps() -> f64 {
    1e-5
}
fn default_act_silu() -> String {
    "silu".into()
}
fn default_act_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_max_pos() -> usize {
    32768
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_in_channels() -> usize {
    3
}
fn default_patch() -> usize {
    14
}
fn default_merge() -> usize {
    2
}
fn default_temporal() -> usize {
    2
}
fn default_conv_kernel() -> usize {
    4
}
fn default_linear_head_dim() -> usize {
    128
}
fn default_linear_key_heads() -> usize {
    16
}
fn default_linear_value_heads() -> usize {
    32
}
fn default_act_gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_patch16() -> usize {
    16
}
fn default_pos_embeddings() -> usize {
    2304
}
fn default_deepstack() -> Vec<usize> {
    vec![8, 16, 24]
}
fn default_window() -> usize {
    112
}
fn default_fullatt() -> Vec<usize> {
    vec![7, 15, 23, 31]
}

/// LongRoPE (Phi-3): each rotary frequency divided by its own factor, the short factors while the
/// positions of a forward pass stay within the pretrained context, the long ones past it (as
/// transformers decides per call, by the largest position), and cos and sin scaled by
/// `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f64,
}

impl LongRope {
    /// Reads `rope_scaling` / `rope_parameters` when its type is `longrope` or `su`; `rotary_dim` is
    /// the rotated width of a head (each factor list has half as many numbers).
    pub fn from_json(
        path: &Path,
        rope: Option<&Map<String, Value>>,
        original: Option<usize>,
        max_positions: usize,
        rotary_dim: usize,
    ) -> Result<Option<LongRope>> {
        let Some(r) = rope else { return Ok(None) };
        let kind = r
            .get("rope_type")
            .or_else(|| r.get("type"))
            .and_then(Value::as_str);
        if !matches!(kind, Some("longrope" | "su")) {
            return Ok(None);
        }
        let factors = |key: &str| -> Result<Vec<f64>> {
            let field = format!("rope_scaling.{key}");
            let v: Vec<f64> = r
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| Error::config(path, &field, "missing or not a list of numbers"))?
                .iter()
                .map(|x| x.as_f64().filter(|f| f.is_finite() && *f > 0.0))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::config(path, &field, "holds a value that is not a positive number")
                })?;
            if v.len() != rotary_dim / 2 {
                return Err(Error::config(
                    path,
                    &field,
                    format!(
                        "has {} factors for {} rotary frequencies",
                        v.len(),
                        rotary_dim / 2
                    ),
                ));
            }
            Ok(v)
        };
        let original = r
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .or(original)
            .filter(|&o| o > 0)
            .ok_or_else(|| {
                Error::config(
                    path,
                    "original_max_position_embeddings",
                    "missing (longrope needs it)",
                )
            })?;
        let factor = match r.get("factor").and_then(Value::as_f64) {
            Some(f) => f,
            None => max_positions as f64 / original as f64,
        };
        let attention_factor = match r.get("attention_factor").and_then(Value::as_f64) {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
        };
        if !(attention_factor.is_finite() && attention_factor > 0.0) {
            return Err(Error::config(
                path,
                "rope_scaling.attention_factor",
                format!("{attention_factor} is not a positive number"),
            ));
        }
        Ok(Some(LongRope {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_position_embeddings: original,
            attention_factor,
        }))
    }

    /// The inverse frequencies for a forward pass whose largest position is `max_position`, in f32
    /// as transformers computes them: `1 / (factor * base^(2i / dim))`.
    pub fn inv_freq(&self, base: f64, rotary_dim: usize, max_position: usize) -> Vec<f32> {
        let factors = if max_position + 1 > self.original_max_position_embeddings {
            &self.long_factor
        } else {
            &self.short_factor
        };
        factors
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let p = (base as f32).powf((2 * i) as f32 / rotary_dim as f32);
                1.0 / (*f as f32 * p)
            })
            .collect()
    }
}

/// The model families Loupe runs, by `model_type`.
/// The most layers, heads or blocks a config may ask for (the largest published models have a few
/// hundred): a count over it is refused before anything is sized by it.
const MAX_COUNT: usize = 4096;

pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "qwen2",
    "llama",
    "gemma3_text",
    "phi3",
];

/// False for the text-only families.
pub fn has_vision(model_type: &str) -> bool {
    !matches!(model_type, "qwen2" | "llama" | "gemma3_text" | "phi3")
}

/// Reads `model_type` from a `config.json`.
pub fn read_model_type(path: &Path) -> Result<String> {
    let v: Value = read_json(path)?;
    v.get("model_type")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::config(
                path,
                "model_type",
                "missing (is this a Hugging Face config.json?)",
            )
        })
}

/// Reads `model_type` and checks that Loupe runs it.
pub fn require_supported(path: &Path) -> Result<String> {
    let model_type = read_model_type(path)?;
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        return Err(Error::UnsupportedModel {
            path: path.into(),
            model_type,
            supported: SUPPORTED_MODEL_TYPES.join(", "),
        });
    }
    Ok(model_type)
}

impl Qwen2VlConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let root: Value = read_json(path)?;
        Self::from_value(path, &root)
    }

    pub fn from_value(path: &Path, root: &Value) -> Result<Self> {
        let top = root
            .as_object()
            .ok_or_else(|| Error::config(path, "<root>", "expected a JSON object"))?;
        let model_type = top
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::config(path, "model_type", "missing"))?
            .to_owned();
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(Error::UnsupportedModel {
                path: path.into(),
                model_type,
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            });
        }

        // Text fields: nested under `text_config` (transformers 5) or at the top level (published
        // layout); a field written in both places must say the same in both.
        let mut text_obj: Map<String, Value> = top.clone();
        let nested = match top.get("text_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(n)) => Some(n),
            Some(other) => {
                return Err(Error::config(
                    path,
                    "text_config",
                    format!("expected an object, found {other}"),
                ))
            }
        };
        if let Some(nested) = nested {
            // transformers reads only `text_config` when it exists: the top-level copies that a
            // re-save leaves behind are dead keys, and a fine-tune that resizes the vocabulary
            // leaves them stale. So `text_config` wins, with a warning where they disagree.
            for key in TEXT_FIELDS {
                let both = [
                    (format!("text_config.{key}"), nested.get(*key)),
                    (key.to_string(), top.get(*key)),
                ];
                if let [(_, Some(a)), (_, Some(b))] = &both {
                    if !a.is_null() && !b.is_null() && !same_value(a, b) {
                        tracing::warn!(
                            "{}: text_config.{key} = {a} is used; the top-level {key} = {b} is ignored, as transformers ignores it",
                            path.display()
                        );
                    }
                }
            }
            for (k, v) in nested {
                if !v.is_null() || !text_obj.contains_key(k) {
                    text_obj.insert(k.clone(), v.clone());
                }
            }
        }
        // Older checkpoints write `rope_scaling`, transformers 5 `rope_parameters`: one field.
        let rope_prefix = if nested.is_some() { "text_config." } else { "" };
        let rope_value = agreed(
            path,
            &[
                (
                    &format!("{rope_prefix}rope_parameters.mrope_section"),
                    text_obj
                        .get("rope_parameters")
                        .and_then(|r| r.get("mrope_section")),
                ),
                (
                    &format!("{rope_prefix}rope_scaling.mrope_section"),
                    text_obj
                        .get("rope_scaling")
                        .and_then(|r| r.get("mrope_section")),
                ),
            ],
        )?
        .cloned();
        let theta_value = agreed(
            path,
            &[
                (
                    &format!("{rope_prefix}rope_parameters.rope_theta"),
                    text_obj
                        .get("rope_parameters")
                        .and_then(|r| r.get("rope_theta")),
                ),
                (
                    &format!("{rope_prefix}rope_scaling.rope_theta"),
                    text_obj
                        .get("rope_scaling")
                        .and_then(|r| r.get("rope_theta")),
                ),
                (
                    &format!("{rope_prefix}rope_theta"),
                    text_obj.get("rope_theta"),
                ),
            ],
        )?
        .cloned();
        if model_type == "gemma3_text" {
            gemma3_defaults(path, &mut text_obj)?;
        }
        let mut text: TextConfig = serde_json::from_value(Value::Object(text_obj.clone()))
            .map_err(|e| {
                Error::config(
                    path,
                    field_of(&e, nested.is_some(), "text_config"),
                    e.to_string(),
                )
            })?;

        let rope = text_obj
            .get("rope_parameters")
            .or_else(|| text_obj.get("rope_scaling"))
            .and_then(Value::as_object);
        text.rope_theta = theta_value
            .as_ref()
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    Error::config(path, "rope_theta", format!("expected a number, found {v}"))
                })
            })
            .transpose()?
            .unwrap_or(match model_type.as_str() {
                "qwen3_vl" => 500_000.0,
                "qwen3_5" | "llama" | "phi3" => 10_000.0,
                _ => 1_000_000.0,
            });
        let rope_value_is_none = rope_value.is_none();
        text.mrope_section = match rope_value {
            Some(v) => serde_json::from_value(v)
                .map_err(|e| Error::config(path, "mrope_section", e.to_string()))?,
            None if model_type == "qwen3_vl" => vec![24, 20, 20],
            None if model_type == "qwen3_5" => vec![11, 11, 10],
            // Text-only: one stream of positions, plain RoPE.
            None if !has_vision(&model_type) => vec![text.head_dim() / 2, 0, 0],
            None => vec![16, 24, 24],
        };
        let qwen3 = model_type == "qwen3_vl" || model_type == "qwen3_5";
        text.qk_norm = qwen3;
        text.mrope_interleaved = qwen3;
        // transformers' defaults where the file leaves them out.
        if text.head_dim.is_none() {
            text.head_dim = match model_type.as_str() {
                "qwen3_vl" => Some(128),
                "qwen3_5" => Some(256),
                _ => None,
            };
        }
        text.partial_rotary_factor = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .or_else(|| text_obj.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(if model_type == "qwen3_5" { 0.25 } else { 1.0 });
        if !has_vision(&model_type) && rope_value_is_none {
            // One stream of positions over the rotated part of each head (Phi-4-mini: 3/4 of it).
            text.mrope_section = vec![text.rotary_dim() / 2, 0, 0];
        }
        // Counts that size what is built before any tensor is checked against them.
        for (name, n) in [
            ("num_hidden_layers", text.num_hidden_layers),
            ("num_attention_heads", text.num_attention_heads),
            ("num_key_value_heads", text.num_key_value_heads),
        ] {
            if n > MAX_COUNT {
                return Err(Error::config(
                    path,
                    name,
                    format!("{n} is over {MAX_COUNT}; no checkpoint Loupe reads has so many"),
                ));
            }
        }
        if model_type == "qwen3_5" && text.layer_types.is_empty() {
            // Every fourth layer attends over everything, the others are linear attention.
            text.layer_types = (0..text.num_hidden_layers)
                .map(|i| {
                    if (i + 1) % 4 == 0 {
                        "full_attention"
                    } else {
                        "linear_attention"
                    }
                    .to_owned()
                })
                .collect();
        }
        if !matches!(model_type.as_str(), "qwen3_5" | "gemma3_text") && text.layer_types.is_empty()
        {
            // transformers 5 writes `layer_types` for every family (all full attention where
            // `use_sliding_window` is off); the published files leave it out.
            text.layer_types = vec!["full_attention".to_owned(); text.num_hidden_layers];
        }
        let gemma3 = model_type == "gemma3_text";
        if model_type == "llama" {
            text.rope_scaling = RopeScaling::from_json(path, rope)?;
        } else if gemma3 {
            gemma3_rope(path, &text_obj, &mut text)?;
            text.qk_norm = true;
            if text.layer_types.is_empty() {
                text.layer_types = gemma3_layer_types(path, &text_obj, text.num_hidden_layers)?;
            }
        } else if model_type == "phi3" {
            phi3_rope(path, rope, &mut text)?;
            text.attention_bias = false;
            if text.sliding_window.is_some() {
                // transformers' Phi-3 masks every layer to the window when the config sets one.
                text.layer_types = vec!["sliding_attention".to_owned(); text.num_hidden_layers];
            }
        } else if !qwen3 {
            text.attention_bias = false;
        }
        if !gemma3 && model_type != "phi3" {
            // Qwen's configs carry a `sliding_window` that applies only with `use_sliding_window`
            // (off in every published Qwen2 / Qwen2-VL file; sliding `layer_types` are refused): the
            // published files write 4096, the re-saved ones null. It means nothing here.
            text.sliding_window = None;
        }
        text.tie_word_embeddings = nested
            .and_then(|n| n.get("tie_word_embeddings"))
            .or_else(|| top.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(gemma3);

        let no_vision =
            json!({"depth": 0, "embed_dim": 0, "hidden_size": text.hidden_size, "num_heads": 0});
        let mut vision_obj = match top.get("vision_config") {
            _ if !has_vision(&model_type) => no_vision,
            Some(v @ Value::Object(_)) => v.clone(),
            Some(other) => {
                return Err(Error::config(
                    path,
                    "vision_config",
                    format!("expected an object, found {other}"),
                ))
            }
            None => return Err(Error::config(path, "vision_config", "missing")),
        };
        if let Value::Object(obj) = &mut vision_obj {
            merge_alias(path, obj, "vision_config.", "in_channels", "in_chans")?;
        }
        let vision_value = &vision_obj;
        let vision_err = |e: serde_json::Error| {
            Error::config(path, field_of(&e, true, "vision_config"), e.to_string())
        };
        let mut vision: VisionConfig = match model_type.as_str() {
            "qwen2_5_vl" => serde_json::from_value::<Qwen25VisionConfig>(vision_value.clone())
                .map_err(vision_err)?
                .into(),
            "qwen3_vl" => serde_json::from_value::<Qwen3VisionConfig>(vision_value.clone())
                .map_err(vision_err)?
                .into(),
            // Qwen3.5: the Qwen3-VL tower without DeepStack.
            "qwen3_5" => {
                let mut v: VisionConfig =
                    serde_json::from_value::<Qwen3VisionConfig>(vision_value.clone())
                        .map_err(vision_err)?
                        .into();
                v.deepstack_visual_indexes.clear();
                v
            }
            _ => serde_json::from_value(vision_value.clone()).map_err(vision_err)?,
        };
        vision.rope_theta = vision_value
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);

        let token = |name: &str, default: u32| -> Result<u32> {
            match top.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| {
                        Error::config(path, name, format!("expected a token id, found {v}"))
                    }),
            }
        };
        // Qwen3.5's 248k vocabulary moved the vision tokens.
        let base = if model_type == "qwen3_5" {
            248053
        } else {
            151652
        };
        let cfg = Qwen2VlConfig {
            image_token_id: token("image_token_id", base + 3)?,
            video_token_id: token("video_token_id", base + 4)?,
            vision_start_token_id: token("vision_start_token_id", base)?,
            vision_end_token_id: token("vision_end_token_id", base + 1)?,
            model_type,
            dtype: agreed(
                path,
                &[
                    ("dtype", top.get("dtype")),
                    ("torch_dtype", top.get("torch_dtype")),
                ],
            )?
            .and_then(Value::as_str)
            .map(str::to_owned),
            text,
            vision,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let t = &self.text;
        let v = &self.vision;
        let positive = [
            ("vocab_size", t.vocab_size),
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_hidden_layers", t.num_hidden_layers),
            ("num_attention_heads", t.num_attention_heads),
            ("num_key_value_heads", t.num_key_value_heads),
            ("vision_config.depth", v.depth),
            ("vision_config.embed_dim", v.embed_dim),
            ("vision_config.num_heads", v.num_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.spatial_merge_size", v.spatial_merge_size),
            ("vision_config.temporal_patch_size", v.temporal_patch_size),
        ];
        for (name, value) in positive {
            if !self.has_vision() && name.starts_with("vision_config") {
                continue;
            }
            if value == 0 {
                return Err(Error::config(path, name, "must be greater than 0"));
            }
            if name.ends_with("depth") && value > MAX_COUNT {
                return Err(Error::config(
                    path,
                    name,
                    format!("{value} is over {MAX_COUNT}; no checkpoint Loupe reads has so many"),
                ));
            }
        }
        if t.max_position_embeddings == 0 {
            return Err(Error::config(
                path,
                "max_position_embeddings",
                "must be greater than 0",
            ));
        }
        if t.head_dim == Some(0) {
            return Err(Error::config(path, "head_dim", "must be greater than 0"));
        }
        let reals = [
            ("rms_norm_eps", t.rms_norm_eps),
            ("rope_theta", t.rope_theta),
            ("vision_config.mlp_ratio", v.mlp_ratio),
            ("vision_config.rope_theta", v.rope_theta),
        ];
        for (name, value) in reals {
            if !self.has_vision() && name.starts_with("vision_config") {
                continue;
            }
            if !(value.is_finite() && value > 0.0) {
                return Err(Error::config(
                    path,
                    name,
                    format!("{value} must be a positive number"),
                ));
            }
        }
        if !(t.partial_rotary_factor > 0.0 && t.partial_rotary_factor <= 1.0) {
            return Err(Error::config(
                path,
                "partial_rotary_factor",
                format!("{} must be in (0, 1]", t.partial_rotary_factor),
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            ));
        }
        if t.head_dim.is_none() && !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(Error::config(
                path,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size = {}",
                    t.num_attention_heads, t.hidden_size
                ),
            ));
        }
        // Every family: one layer type per layer.
        if t.layer_types.len() != t.num_hidden_layers {
            return Err(Error::config(
                path,
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    t.layer_types.len(),
                    t.num_hidden_layers
                ),
            ));
        }
        let phi3_window = self.model_type == "phi3" && t.sliding_window.is_some();
        if self.model_type == "gemma3_text" {
            self.validate_gemma3(path)?;
        } else if phi3_window {
            if t.sliding_window == Some(0) {
                return Err(Error::config(path, "sliding_window", "0 hides every key"));
            }
        } else if self.model_type != "qwen3_5" {
            // Sliding-window layers (Qwen2's `use_sliding_window`) are not implemented: refuse
            // them rather than attend over the whole context where the checkpoint would not.
            if let Some(bad) = t.layer_types.iter().find(|l| *l != "full_attention") {
                return Err(Error::config(
                    path,
                    "layer_types",
                    format!(
                        "`{bad}` layers are not supported for {} (only full_attention)",
                        self.model_type
                    ),
                ));
            }
        }
        if self.model_type == "qwen3_5" {
            if let Some(bad) = t
                .layer_types
                .iter()
                .find(|l| *l != "linear_attention" && *l != "full_attention")
            {
                return Err(Error::config(
                    path,
                    "layer_types",
                    format!("`{bad}` is not linear_attention or full_attention"),
                ));
            }
            if t.linear_num_key_heads == 0
                || !t
                    .linear_num_value_heads
                    .is_multiple_of(t.linear_num_key_heads)
                || t.linear_conv_kernel_dim == 0
            {
                return Err(Error::config(
                    path,
                    "linear_num_value_heads",
                    format!(
                        "{} value heads must be a multiple of {} key heads",
                        t.linear_num_value_heads, t.linear_num_key_heads
                    ),
                ));
            }
        }
        let half = t.rotary_dim() / 2;
        // Interleaved sections (Qwen3-VL) only bound how many frequencies turn with the height and
        // width; the temporal stream takes the rest, so they need not sum to the rotary width / 2.
        let total = t.mrope_section.iter().sum::<usize>();
        let sums = if t.mrope_interleaved {
            total <= half
        } else {
            total == half
        };
        if !t.head_dim().is_multiple_of(2) || !sums || t.mrope_section.len() != 3 {
            return Err(Error::config(
                path,
                "mrope_section",
                format!(
                    "{:?} must be three numbers summing to the rotary width / 2 = {half}",
                    t.mrope_section
                ),
            ));
        }
        if !self.has_vision() {
            return Ok(());
        }
        if !v.embed_dim.is_multiple_of(v.num_heads)
            || !(v.embed_dim / v.num_heads).is_multiple_of(4)
        {
            return Err(Error::config(
                path,
                "vision_config.num_heads",
                format!(
                    "embed_dim {} / num_heads {} must be a multiple of 4",
                    v.embed_dim, v.num_heads
                ),
            ));
        }
        let unit = v.patch_size * v.spatial_merge_size;
        if self.model_type == "qwen2_5_vl"
            && (v.window_size < unit || !v.window_size.is_multiple_of(unit))
        {
            return Err(Error::config(
                path,
                "vision_config.window_size",
                format!(
                    "{} must be a positive multiple of patch_size x spatial_merge_size = {unit}",
                    v.window_size
                ),
            ));
        }
        // Block indexes past the depth (fullatt_block_indexes, deepstack_visual_indexes) are ignored,
        // as transformers ignores them: a 4-block test model keeps the 32-block defaults.
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        if side * side != v.num_position_embeddings {
            return Err(Error::config(
                path,
                "vision_config.num_position_embeddings",
                format!("{} is not a square", v.num_position_embeddings),
            ));
        }
        if v.hidden_size != t.hidden_size {
            return Err(Error::config(
                path,
                if self.model_type != "qwen2_vl" {
                    "vision_config.out_hidden_size"
                } else {
                    "vision_config.hidden_size"
                },
                format!(
                    "{} differs from the text hidden_size {}",
                    v.hidden_size, t.hidden_size
                ),
            ));
        }
        for (name, id) in [
            ("image_token_id", self.image_token_id),
            ("vision_start_token_id", self.vision_start_token_id),
        ] {
            if id as usize >= t.vocab_size {
                return Err(Error::config(
                    path,
                    name,
                    format!(
                        "{id} is outside the vocabulary (vocab_size {})",
                        t.vocab_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Gemma 3's own fields: every layer sliding or full, a window for the sliding ones, positive
    /// scales and caps.
    fn validate_gemma3(&self, path: &Path) -> Result<()> {
        let t = &self.text;
        if let Some(bad) = t
            .layer_types
            .iter()
            .find(|l| *l != "sliding_attention" && *l != "full_attention")
        {
            return Err(Error::config(
                path,
                "layer_types",
                format!("`{bad}` is not sliding_attention or full_attention"),
            ));
        }
        if t.sliding_window == Some(0) {
            return Err(Error::config(
                path,
                "sliding_window",
                "must be greater than 0",
            ));
        }
        let reals = [
            ("query_pre_attn_scalar", t.query_pre_attn_scalar),
            ("attn_logit_softcapping", t.attn_logit_softcapping),
            ("final_logit_softcapping", t.final_logit_softcapping),
            ("rope_local_base_freq", Some(t.local_rope_theta)),
        ];
        for (name, value) in reals {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::config(
                    path,
                    name,
                    format!("{v} must be a positive number"),
                ));
            }
        }
        Ok(())
    }

    /// Values in one patch: channels x frames x rows x columns.
    pub fn patch_values(&self) -> usize {
        let v = &self.vision;
        v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
    }

    /// False for text-only models (`qwen2`: Qwen2 and Qwen2.5 language models).
    pub fn has_vision(&self) -> bool {
        has_vision(&self.model_type)
    }

    pub fn vision_intermediate(&self) -> usize {
        self.vision
            .intermediate_size
            .unwrap_or((self.vision.embed_dim as f64 * self.vision.mlp_ratio) as usize)
    }
}

/// Two or more keys that name one field (`in_channels` and `in_chans`, `dtype` and `torch_dtype`,
/// a text field at the top level and under `text_config`): the value they agree on, or an error
/// naming both keys when they disagree. Absent and `null` keys do not count. Numbers agree when
/// they are equal as numbers (`3` and `3.0`).
pub(crate) fn agreed<'a>(
    path: &Path,
    candidates: &[(&str, Option<&'a Value>)],
) -> Result<Option<&'a Value>> {
    let mut found: Option<(&str, &Value)> = None;
    for (name, value) in candidates {
        let Some(v) = value.filter(|v| !v.is_null()) else {
            continue;
        };
        match found {
            None => found = Some((name, v)),
            Some((first, w)) if !same_value(v, w) => {
                return Err(Error::config(
                    path,
                    first,
                    format!("`{first}` = {w} and `{name}` = {v} name the same field and disagree"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(found.map(|(_, v)| v))
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_value(a, b))
        }
        _ => a == b,
    }
}

/// Phi-3's rotary scaling: LongRoPE, or none (transformers' Phi-3 reads no other `rope_type`).
fn phi3_rope(path: &Path, rope: Option<&Map<String, Value>>, text: &mut TextConfig) -> Result<()> {
    text.longrope = LongRope::from_json(
        path,
        rope,
        text.original_max_position_embeddings,
        text.max_position_embeddings,
        text.rotary_dim(),
    )?;
    if text.longrope.is_none() && RopeScaling::from_json(path, rope)? != RopeScaling::None {
        return Err(Error::config(
            path,
            "rope_scaling.rope_type",
            "Phi-3 reads default and longrope (su) scaling only",
        ));
    }
    Ok(())
}

/// Gemma 3's defaults (transformers' `Gemma3TextConfig`) where the file leaves them out, and its
/// `hidden_activation` read as `hidden_act`.
fn gemma3_defaults(path: &Path, obj: &mut Map<String, Value>) -> Result<()> {
    merge_alias(path, obj, "", "hidden_act", "hidden_activation")?;
    for (key, value) in [
        ("hidden_act", json!("gelu_pytorch_tanh")),
        ("rms_norm_eps", json!(1e-6)),
        ("head_dim", json!(256)),
        ("query_pre_attn_scalar", json!(256)),
        ("sliding_window", json!(4096)),
        ("max_position_embeddings", json!(131_072)),
    ] {
        if obj.get(key).is_none_or(Value::is_null) {
            obj.insert(key.to_owned(), value);
        }
    }
    Ok(())
}

/// Gemma 3's two rotary settings. transformers 5 nests them by layer type
/// (`rope_parameters.full_attention`, `.sliding_attention`); published configs write `rope_theta`
/// with `rope_scaling` for the full layers and `rope_local_base_freq` for the sliding ones.
fn gemma3_rope(path: &Path, obj: &Map<String, Value>, text: &mut TextConfig) -> Result<()> {
    let number = |v: Option<&Value>, field: &str, default: f64| -> Result<f64> {
        match v {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::config(path, field, format!("expected a number, found {v}"))),
        }
    };
    let by_type = obj
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|r| r.contains_key("full_attention") || r.contains_key("sliding_attention"));
    match by_type {
        Some(r) => {
            let full = r.get("full_attention").and_then(Value::as_object);
            let sliding = r.get("sliding_attention").and_then(Value::as_object);
            text.rope_theta = number(
                full.and_then(|f| f.get("rope_theta")),
                "rope_parameters.full_attention.rope_theta",
                1_000_000.0,
            )?;
            text.local_rope_theta = number(
                sliding.and_then(|f| f.get("rope_theta")),
                "rope_parameters.sliding_attention.rope_theta",
                10_000.0,
            )?;
            text.rope_scaling = RopeScaling::from_json(path, full)?;
            if RopeScaling::from_json(path, sliding)? != RopeScaling::None {
                return Err(Error::config(
                    path,
                    "rope_parameters.sliding_attention.rope_type",
                    "the sliding layers' rotary embedding is not scaled in any Gemma 3",
                ));
            }
        }
        None => {
            text.local_rope_theta = number(
                obj.get("rope_local_base_freq"),
                "rope_local_base_freq",
                10_000.0,
            )?;
            let scaling = obj
                .get("rope_scaling")
                .or_else(|| obj.get("rope_parameters"))
                .and_then(Value::as_object);
            text.rope_scaling = RopeScaling::from_json(path, scaling)?;
        }
    }
    Ok(())
}

/// Gemma 3's layers when the file does not list them: every `sliding_window_pattern`-th (6 by
/// default) attends over everything, the others within the window.
fn gemma3_layer_types(path: &Path, obj: &Map<String, Value>, layers: usize) -> Result<Vec<String>> {
    let v = obj
        .get("sliding_window_pattern")
        .or_else(|| obj.get("_sliding_window_pattern"));
    let pattern = match v {
        None | Some(Value::Null) => 6,
        Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            Error::config(
                path,
                "sliding_window_pattern",
                format!("expected a positive whole number, found {v}"),
            )
        })? as usize,
    };
    Ok((0..layers)
        .map(|i| {
            if (i + 1) % pattern == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
            .to_owned()
        })
        .collect())
}

/// Renames `alias` to `canonical` in `obj`, checking that they agree where both are present
/// (transformers 5 writes both `in_channels` and `in_chans` when it re-saves a published config).
fn merge_alias(
    path: &Path,
    obj: &mut Map<String, Value>,
    prefix: &str,
    canonical: &str,
    alias: &str,
) -> Result<()> {
    let (c, a) = (format!("{prefix}{canonical}"), format!("{prefix}{alias}"));
    let value = agreed(path, &[(&c, obj.get(canonical)), (&a, obj.get(alias))])?.cloned();
    obj.remove(alias);
    if let Some(v) = value {
        obj.insert(canonical.to_owned(), v);
    }
    Ok(())
}

/// The text fields that may appear both at the top level (published layout) and under
/// `text_config` (transformers 5).
const TEXT_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "hidden_act",
    "max_position_embeddings",
    "attention_bias",
    "layer_types",
    "linear_conv_kernel_dim",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "rope_theta",
    "partial_rotary_factor",
];

/// Pulls the field name out of a serde error ("missing field `x`", "invalid type ... for key `x`").
fn field_of(e: &serde_json::Error, nested: bool, prefix: &str) -> String {
    let msg = e.to_string();
    let name = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.contains("field"))
        .unwrap_or("<unknown>");
    if nested {
        format!("{prefix}.{name}")
    } else {
        name.to_owned()
    }
}

/// `preprocessor_config.json` of the Qwen2-VL image processor.
#[derive(Debug, Clone)]
pub struct PreprocessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// PIL resample code: 2 bilinear, 3 bicubic.
    pub resample: u32,
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        PreprocessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            resample: 3,
        }
    }
}

impl PreprocessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = read_json(path)?;
        Self::from_value(path, &v)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        let mut c = PreprocessorConfig::default();
        let v = v.get("image_processor").unwrap_or(v);
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(path, "<root>", "expected a JSON object"))?;
        let uint = |name: &str, v: &Value| -> Result<usize> {
            v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::config(
                    path,
                    name,
                    format!("expected a positive integer, found {v}"),
                )
            })
        };
        let boolean = |name: &str, v: &Value| -> Result<bool> {
            v.as_bool().ok_or_else(|| {
                Error::config(path, name, format!("expected true or false, found {v}"))
            })
        };
        let triple = |name: &str, v: &Value| -> Result<[f64; 3]> {
            let xs: Vec<f64> = serde_json::from_value(v.clone())
                .map_err(|e| Error::config(path, name, e.to_string()))?;
            match xs.as_slice() {
                [a, b, c] => Ok([*a, *b, *c]),
                [a] => Ok([*a, *a, *a]),
                _ => Err(Error::config(
                    path,
                    name,
                    format!("expected 3 numbers, found {}", xs.len()),
                )),
            }
        };
        // The pixel range has two names: `min_pixels` / `max_pixels` (published checkpoints) and
        // `size.shortest_edge` / `size.longest_edge` (transformers 5, which writes both on save).
        let size = obj.get("size").and_then(Value::as_object);
        for (field, canonical, alias) in [
            (&mut c.min_pixels, "min_pixels", "shortest_edge"),
            (&mut c.max_pixels, "max_pixels", "longest_edge"),
        ] {
            let alias_key = format!("size.{alias}");
            let both = [
                (canonical, obj.get(canonical)),
                (alias_key.as_str(), size.and_then(|s| s.get(alias))),
            ];
            if let Some(x) = agreed(path, &both)? {
                *field = uint(canonical, x)?;
            }
        }
        for (k, x) in obj {
            if x.is_null() {
                continue;
            }
            match k.as_str() {
                "patch_size" => c.patch_size = uint(k, x)?,
                "temporal_patch_size" => c.temporal_patch_size = uint(k, x)?,
                "merge_size" => c.merge_size = uint(k, x)?,
                "image_mean" => c.image_mean = triple(k, x)?,
                "image_std" => c.image_std = triple(k, x)?,
                "rescale_factor" => {
                    c.rescale_factor = x.as_f64().ok_or_else(|| {
                        Error::config(path, k, format!("expected a number, found {x}"))
                    })?
                }
                "do_resize" => c.do_resize = boolean(k, x)?,
                "do_rescale" => c.do_rescale = boolean(k, x)?,
                "do_normalize" => c.do_normalize = boolean(k, x)?,
                "resample" => c.resample = uint(k, x)? as u32,
                _ => {}
            }
        }
        if c.patch_size == 0 || c.merge_size == 0 || c.temporal_patch_size == 0 {
            return Err(Error::config(
                path,
                "patch_size",
                "patch, merge and temporal sizes must be > 0",
            ));
        }
        if c.patch_size > 1024 || c.merge_size > 64 || c.temporal_patch_size > 64 {
            return Err(Error::config(
                path,
                "patch_size",
                format!(
                    "patch {}, merge {}, temporal {}: over the largest sizes read (1024, 64, 64)",
                    c.patch_size, c.merge_size, c.temporal_patch_size
                ),
            ));
        }
        if c.min_pixels == 0 || c.max_pixels == 0 {
            return Err(Error::config(
                path,
                "max_pixels",
                "min_pixels and max_pixels must be greater than 0",
            ));
        }
        if c.min_pixels > c.max_pixels {
            return Err(Error::config(
                path,
                "min_pixels",
                format!(
                    "{} is larger than max_pixels {}",
                    c.min_pixels, c.max_pixels
                ),
            ));
        }
        if !matches!(c.resample, 2 | 3) {
            return Err(Error::config(
                path,
                "resample",
                format!(
                    "{} is not supported (2 = bilinear, 3 = bicubic)",
                    c.resample
                ),
            ));
        }
        if c.image_std.contains(&0.0) {
            return Err(Error::config(path, "image_std", "must not contain 0"));
        }
        for (name, xs) in [
            ("image_mean", &c.image_mean[..]),
            ("image_std", &c.image_std[..]),
            ("rescale_factor", &[c.rescale_factor][..]),
        ] {
            if xs.iter().any(|x| !x.is_finite()) {
                return Err(Error::config(path, name, "must be finite numbers"));
            }
        }
        c.clamp_to_budget(path);
        Ok(c)
    }

    /// Clamps the pixel range to the `model-pixels` limit, so that a file asking for 10^12 pixels
    /// resizes small images to the limit instead of allocating without bound.
    pub fn clamp_to_budget(&mut self, path: &Path) {
        let budget = usize::try_from(crate::limits::get().model_pixels).unwrap_or(usize::MAX);
        if self.max_pixels > budget {
            tracing::warn!(
                "{}: max_pixels {} clamped to the model-pixels limit {budget} (--allow model-pixels=N)",
                path.display(),
                self.max_pixels
            );
            self.max_pixels = budget;
        }
        self.min_pixels = self.min_pixels.min(self.max_pixels);
    }
}

/// `generation_config.json`: the stop ids and the checkpoint's sampling defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub do_sample: Option<bool>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        None,
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        Some(OneOrMany::One(x)) => vec![x],
        Some(OneOrMany::Many(xs)) => xs,
        Some(OneOrMany::None) | None => vec![],
    })
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }
}
