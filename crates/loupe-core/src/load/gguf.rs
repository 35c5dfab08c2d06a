//! A model given as one llama.cpp GGUF file, as users download them: its hyper-parameters, tokenizer
//! and chat template are read from the file's metadata, and its tensors are renamed from llama.cpp's
//! names (`blk.0.attn_q.weight`) to the checkpoint names the model files use
//! (`model.layers.0.self_attn.q_proj.weight`). The tensors stay in their stored block formats.
//!
//! Architectures: `qwen2` (text only: Qwen2 and Qwen2.5 language models), and `qwen2vl` (the
//! decoder of Qwen2-VL and Qwen2.5-VL) with its vision file (`mmproj`, `general.architecture = clip`,
//! `clip.projector_type` `qwen2vl_merger` or `qwen2.5vl_merger`), as llama.cpp's converter writes
//! them: the vision tower's hyper-parameters, normalization and tensors come from the second file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as Gv};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The Qwen2 pre-tokenizer split (`tokenizer.ggml.pre = qwen2`).
/// The Llama 3 split (`llama-bpe`): as Qwen2's, with numbers in runs of up to three digits.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct GgufModel {
    pub path: PathBuf,
    meta: HashMap<String, Gv>,
    /// Tensor shapes, row-major (candle's order: the reverse of GGML's `ne`).
    tensors: HashMap<String, Vec<usize>>,
    /// The f32 vectors a file keeps as tensors but the config needs (Phi-3's
    /// `rope_factors_long.weight` and `rope_factors_short.weight`).
    small: HashMap<String, Vec<f64>>,
    pub arch: String,
}

/// Vectors of at most this many values are read into the config (LongRoPE has one per rotary pair).
const SMALL_VECTOR: usize = 1 << 16;

/// The vision towers a llama.cpp vision file (`mmproj`) can hold for Loupe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projector {
    /// `qwen2vl_merger`: Qwen2-VL's tower (LayerNorm, GELU MLP, whole-image attention).
    Qwen2Vl,
    /// `qwen2.5vl_merger`: Qwen2.5-VL's tower (RMSNorm, SwiGLU, window attention).
    Qwen25Vl,
}

impl GgufModel {
    /// Reads the header (metadata and tensor table), not the tensors.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: a read-only mapping of a file we do not modify (as for the weights).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        super::gguf_check::check(&map, crate::limits::get()).map_err(|msg| Error::Weights {
            path: path.into(),
            msg: format!("not a valid GGUF file: {msg}"),
        })?;
        let content =
            gguf_file::Content::read(&mut std::io::Cursor::new(&map[..])).map_err(|e| {
                Error::Weights {
                    path: path.into(),
                    msg: format!("not a valid GGUF file ({})", crate::error::first_line(&e)),
                }
            })?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Gv::String(s)) => s.clone(),
            _ => {
                return Err(Error::config(
                    path,
                    "general.architecture",
                    "missing from the GGUF metadata",
                ))
            }
        };
        let mut small = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let n = info.shape.elem_count();
            if !name.starts_with("rope_factors_") || info.shape.rank() != 1 || n > SMALL_VECTOR {
                continue;
            }
            if info.ggml_dtype != candle_core::quantized::GgmlDType::F32 {
                return Err(Error::config(
                    path,
                    name,
                    format!("stored as {:?}; Loupe reads it as F32", info.ggml_dtype),
                ));
            }
            // The header check bounds every tensor within the file.
            let start = content.tensor_data_offset.saturating_add(info.offset);
            let bytes = usize::try_from(start)
                .ok()
                .and_then(|s| map.get(s..s.checked_add(4 * n)?))
                .ok_or_else(|| Error::Weights {
                    path: path.into(),
                    msg: format!("tensor `{name}` runs past the end of the file"),
                })?;
            let values = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            small.insert(name.clone(), values);
        }
        Ok(GgufModel {
            path: path.into(),
            small,
            tensors: content
                .tensor_infos
                .iter()
                .map(|(n, i)| (n.clone(), i.shape.dims().to_vec()))
                .collect(),
            meta: content.metadata,
            arch,
        })
    }

    fn get(&self, key: &str) -> Result<&Gv> {
        self.meta
            .get(key)
            .ok_or_else(|| Error::config(&self.path, key, "missing from the GGUF metadata"))
    }

    fn uint(&self, key: &str) -> Result<u64> {
        match self.get(key)? {
            Gv::U8(x) => Ok(*x as u64),
            Gv::U16(x) => Ok(*x as u64),
            Gv::U32(x) => Ok(*x as u64),
            Gv::U64(x) => Ok(*x),
            Gv::I32(x) if *x >= 0 => Ok(*x as u64),
            Gv::I64(x) if *x >= 0 => Ok(*x as u64),
            other => Err(Error::config(
                &self.path,
                key,
                format!("expected an unsigned integer, found {other:?}"),
            )),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Gv::F32(x) => Ok(*x as f64),
            Gv::F64(x) => Ok(*x),
            other => Err(Error::config(
                &self.path,
                key,
                format!("expected a number, found {other:?}"),
            )),
        }
    }

    /// An array of metadata values, each read by `item` (`what` names the kind it expects).
    fn array<T>(&self, key: &str, what: &str, item: impl Fn(&Gv) -> Option<T>) -> Result<Vec<T>> {
        match self.get(key)? {
            Gv::Array(items) => items
                .iter()
                .map(|v| {
                    item(v).ok_or_else(|| {
                        Error::config(&self.path, key, format!("expected {what}, found {v:?}"))
                    })
                })
                .collect(),
            other => Err(Error::config(
                &self.path,
                key,
                format!("expected an array, found {other:?}"),
            )),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key, "strings", |v| match v {
            Gv::String(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.tensors
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                path: self.path.clone(),
            })
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Gv::String(s) => Ok(s.clone()),
            other => Err(Error::config(
                &self.path,
                key,
                format!("expected a string, found {other:?}"),
            )),
        }
    }

    fn floats(&self, key: &str) -> Result<Vec<f64>> {
        self.array(key, "numbers", |v| match v {
            Gv::F32(x) => Some(*x as f64),
            Gv::F64(x) => Some(*x),
            _ => None,
        })
    }

    /// True for a text file whose model also needs a vision file (`qwen2vl`).
    pub fn needs_vision(&self) -> bool {
        self.arch == "qwen2vl"
    }

    /// The head width, for a file whose q and k rows llama.cpp's converter interleaved for its
    /// rotary layout (`llama`).
    pub fn interleaved_rope(&self) -> Result<Option<usize>> {
        if self.arch != "llama" {
            return Ok(None);
        }
        let a = &self.arch;
        let d = match self.uint(&format!("{a}.attention.key_length")) {
            Ok(d) => d,
            Err(_) => {
                let heads = self.uint(&format!("{a}.attention.head_count"))?.max(1);
                self.uint(&format!("{a}.embedding_length"))? / heads
            }
        };
        Ok(Some(usize::try_from(d).unwrap_or(usize::MAX)))
    }

    /// True for a vision file (`mmproj`).
    pub fn is_vision(&self) -> bool {
        self.arch == "clip"
    }

    /// The vision tower in a vision file.
    pub fn projector(&self) -> Result<Projector> {
        if !self.is_vision() {
            return Err(Error::config(
                &self.path,
                "general.architecture",
                format!(
                    "`{}`: not a vision (mmproj) file, which is `clip`",
                    self.arch
                ),
            ));
        }
        match self.string("clip.projector_type")?.as_str() {
            "qwen2vl_merger" => Ok(Projector::Qwen2Vl),
            "qwen2.5vl_merger" => Ok(Projector::Qwen25Vl),
            other => Err(Error::UnsupportedModel {
                path: self.path.clone(),
                model_type: format!("{other} (GGUF clip.projector_type)"),
                supported: "qwen2vl_merger, qwen2.5vl_merger".into(),
            }),
        }
    }

    /// The model's `config.json`, in transformers' names: a `qwen2` text model alone, or a `qwen2vl`
    /// text model with its vision file.
    pub fn config_json(&self, vision: Option<&GgufModel>) -> Result<Value> {
        let a = &self.arch;
        let model_type = match (a.as_str(), vision) {
            ("qwen2", None) => "qwen2",
            ("qwen2vl", Some(v)) => match v.projector()? {
                Projector::Qwen2Vl => "qwen2_vl",
                Projector::Qwen25Vl => "qwen2_5_vl",
            },
            ("qwen2vl", None) => {
                return Err(Error::ModelNotFound {
                    model: self.path.display().to_string(),
                    msg: "a Qwen2-VL GGUF needs its vision file: pass --mmproj FILE, or put the \
                          one mmproj*.gguf beside it"
                        .into(),
                })
            }
            ("llama", None) => "llama",
            ("gemma3", None) => "gemma3_text",
            ("phi3", None) => "phi3",
            ("qwen2" | "llama" | "gemma3" | "phi3", Some(v)) => {
                return Err(Error::config(
                    &v.path,
                    "general.architecture",
                    format!(
                        "{} is a text-only {a} model; it takes no vision file",
                        self.path.display()
                    ),
                ))
            }
            _ => {
                return Err(Error::UnsupportedModel {
                    path: self.path.clone(),
                    model_type: format!("{a} (GGUF general.architecture)"),
                    supported: "qwen2, llama, gemma3, phi3, qwen2vl (with its mmproj file)".into(),
                })
            }
        };
        let heads = self.uint(&format!("{a}.attention.head_count"))?;
        let hidden = self.uint(&format!("{a}.embedding_length"))?;
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let eos = self.uint("tokenizer.ggml.eos_token_id").ok();
        let mut cfg = json!({
            "model_type": model_type,
            "vocab_size": tokens.len(),
            "hidden_size": hidden,
            "intermediate_size": self.uint(&format!("{a}.feed_forward_length"))?,
            "num_hidden_layers": self.uint(&format!("{a}.block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.uint(&format!("{a}.attention.head_count_kv")).unwrap_or(heads),
            "rms_norm_eps": self.float(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            "rope_theta": self.float(&format!("{a}.rope.freq_base")).unwrap_or(1_000_000.0),
            "max_position_embeddings": self.uint(&format!("{a}.context_length")).unwrap_or(32768),
            "tie_word_embeddings": !self.tensors.contains_key("output.weight"),
            "eos_token_id": eos,
            "bos_token_id": self.uint("tokenizer.ggml.bos_token_id").ok(),
        });
        if let Ok(d) = self.uint(&format!("{a}.attention.key_length")) {
            cfg["head_dim"] = json!(d);
        }
        if model_type == "llama" || model_type == "gemma3_text" {
            cfg["attention_bias"] = json!(self.tensors.contains_key("blk.0.attn_q.bias"));
            // llama3 scaling is stored as its per-frequency divisors (`rope_freqs.weight`, read by
            // the model); linear as a type and factor.
            match self.meta.get(&format!("{a}.rope.scaling.type")) {
                None => {}
                Some(Gv::String(s)) if s == "none" => {}
                Some(Gv::String(s)) if s == "linear" => {
                    cfg["rope_scaling"] = json!({
                        "rope_type": "linear",
                        "factor": self.float(&format!("{a}.rope.scaling.factor"))?,
                    });
                }
                Some(other) => {
                    return Err(Error::config(
                        &self.path,
                        format!("{a}.rope.scaling.type"),
                        format!(
                        "{other:?}: Loupe reads linear scaling from a GGUF (llama3 as rope_freqs)"
                    ),
                    ))
                }
            }
        }
        if model_type == "llama" {
            cfg["hidden_act"] = json!("silu");
            cfg["rope_theta"] = json!(self.float("llama.rope.freq_base").unwrap_or(10_000.0));
            cfg["mlp_bias"] = json!(self.tensors.contains_key("blk.0.ffn_up.bias"));
        }
        if model_type == "gemma3_text" {
            self.gemma3_config(&mut cfg)?;
        }
        if model_type == "phi3" {
            self.phi3_config(&mut cfg)?;
        }
        if let Some(v) = vision {
            let key = format!("{a}.rope.dimension_sections");
            let sections = self.array(&key, "unsigned integers", |v| match v {
                Gv::I32(x) => u64::try_from(*x).ok(),
                Gv::U32(x) => Some(*x as u64),
                _ => None,
            })?;
            // Qwen2-VL's three sections (time, height, width); llama.cpp pads the list with a zero.
            let mrope: Vec<u64> = sections.iter().copied().take(3).collect();
            cfg["rope_scaling"] = json!({"type": "mrope", "mrope_section": mrope});
            cfg["vision_config"] = v.vision_config_json()?;
            let id = |token: &str| -> Result<usize> {
                tokens.iter().position(|t| t == token).ok_or_else(|| {
                    Error::config(
                        &self.path,
                        "tokenizer.ggml.tokens",
                        format!("has no `{token}`, which a vision model needs"),
                    )
                })
            };
            cfg["image_token_id"] = json!(id("<|image_pad|>")?);
            cfg["video_token_id"] = json!(id("<|video_pad|>")?);
            cfg["vision_start_token_id"] = json!(id("<|vision_start|>")?);
            cfg["vision_end_token_id"] = json!(id("<|vision_end|>")?);
        }
        Ok(cfg)
    }

    /// What a Gemma 3 file leaves to llama.cpp's code, as llama.cpp sets it: every sixth layer
    /// global, the others within `gemma3.attention.sliding_window` and with rotary base 10000;
    /// scores scaled by the head width, but for the 27B (62 layers), whose
    /// `query_pre_attn_scalar` is hidden / heads.
    fn gemma3_config(&self, cfg: &mut Value) -> Result<()> {
        let heads = self.uint("gemma3.attention.head_count")?.max(1);
        let hidden = self.uint("gemma3.embedding_length")?;
        let layers = self.uint("gemma3.block_count")?;
        let head_dim = self
            .uint("gemma3.attention.key_length")
            .unwrap_or(hidden / heads);
        let pattern = self
            .uint("gemma3.attention.sliding_window_pattern")
            .unwrap_or(6)
            .max(1);
        cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
        cfg["head_dim"] = json!(head_dim);
        cfg["query_pre_attn_scalar"] = json!(if layers == 62 {
            hidden / heads
        } else {
            head_dim
        });
        cfg["sliding_window"] = json!(self.uint("gemma3.attention.sliding_window")?);
        cfg["sliding_window_pattern"] = json!(pattern);
        cfg["rope_local_base_freq"] = json!(10_000.0);
        if let Ok(cap) = self.float("gemma3.final_logit_softcapping") {
            cfg["final_logit_softcapping"] = json!(cap);
        }
        Ok(())
    }

    /// What a Phi-3 file keeps in llama.cpp's terms: the rotary width (`rope.dimension_count`, a
    /// part of each head for Phi-4-mini), the window (0 for none), and LongRoPE as two tensors of
    /// per-frequency factors beside the pretrained context (`rope.scaling.original_context_length`)
    /// and the attention factor. A file without the factors has plain RoPE.
    fn phi3_config(&self, cfg: &mut Value) -> Result<()> {
        let heads = self.uint("phi3.attention.head_count")?.max(1);
        let head_dim = self.uint("phi3.embedding_length")? / heads;
        cfg["hidden_act"] = json!("silu");
        cfg["rope_theta"] = json!(self.float("phi3.rope.freq_base").unwrap_or(10_000.0));
        if let Ok(rot) = self.uint("phi3.rope.dimension_count") {
            if rot == 0 || rot > head_dim {
                return Err(Error::config(
                    &self.path,
                    "phi3.rope.dimension_count",
                    format!("{rot}: not within a head of {head_dim}"),
                ));
            }
            cfg["partial_rotary_factor"] = json!(rot as f64 / head_dim as f64);
        }
        cfg["sliding_window"] = match self.uint("phi3.attention.sliding_window") {
            Ok(0) | Err(_) => Value::Null,
            Ok(w) => json!(w),
        };
        let long = self.small.get("rope_factors_long.weight");
        let short = self.small.get("rope_factors_short.weight");
        match (long, short) {
            (None, None) => {}
            (Some(long), Some(short)) => {
                let original = self.uint("phi3.rope.scaling.original_context_length")?;
                cfg["original_max_position_embeddings"] = json!(original);
                let mut scaling = json!({
                    "rope_type": "longrope",
                    "long_factor": long,
                    "short_factor": short,
                    "original_max_position_embeddings": original,
                });
                if let Ok(f) = self.float("phi3.rope.scaling.attn_factor") {
                    scaling["attention_factor"] = json!(f);
                }
                cfg["rope_scaling"] = scaling;
            }
            (Some(_), None) | (None, Some(_)) => return Err(Error::config(
                &self.path,
                "rope_factors_short.weight",
                "LongRoPE needs both rope_factors_long and rope_factors_short; the file has one",
            )),
        }
        Ok(())
    }

    /// The published chat template of a family whose llama.cpp files may come without one.
    pub fn published_chat_template(&self) -> Option<String> {
        (self.arch == "gemma3").then(|| GEMMA3_TEMPLATE.to_owned())
    }

    /// A vision file's `vision_config`, in the checkpoint's names. Widths come from the tensors'
    /// shapes where the metadata is not specific (llama.cpp writes Qwen2-VL's text width as
    /// `feed_forward_length`); the merge size from the merger's input width.
    fn vision_config_json(&self) -> Result<Value> {
        let projector = self.projector()?;
        let width = self.uint("clip.vision.embedding_length")?;
        let merger_in = self.shape("mm.0.weight")?.last().copied().unwrap_or(0) as u64;
        let merge = (1..=8u64).find(|m| m * m * width == merger_in).ok_or_else(|| {
            Error::config(
                &self.path,
                "mm.0.weight",
                format!("its input width {merger_in} is not a square multiple of the tower's {width}"),
            )
        })?;
        let depth = self.uint("clip.vision.block_count")?;
        let mut v = json!({
            "depth": depth,
            "num_heads": self.uint("clip.vision.attention.head_count")?,
            "patch_size": self.uint("clip.vision.patch_size")?,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "in_channels": 3,
        });
        let out = self.uint("clip.vision.projection_dim")?;
        match projector {
            Projector::Qwen2Vl => {
                let mlp = self.shape("v.blk.0.ffn_up.weight")?[0] as f64;
                v["embed_dim"] = json!(width);
                v["hidden_size"] = json!(out);
                v["mlp_ratio"] = json!(mlp / width as f64);
                v["hidden_act"] = json!("quick_gelu");
            }
            Projector::Qwen25Vl => {
                // Every n-th block attends over the whole image; the others within windows of
                // `clip.vision.window_size` px, else 112 (every published Qwen2.5-VL's, and what
                // llama.cpp assumes when the key is absent, as its converter leaves it).
                let n = self.uint("clip.vision.n_wa_pattern")?.max(1);
                let full: Vec<u64> = (0..depth).filter(|i| (i + 1) % n == 0).collect();
                v["hidden_size"] = json!(width);
                v["out_hidden_size"] = json!(out);
                v["intermediate_size"] = json!(self.shape("v.blk.0.ffn_up.weight")?[0]);
                v["hidden_act"] = json!("silu");
                v["window_size"] = json!(self.uint("clip.vision.window_size").unwrap_or(112));
                v["fullatt_block_indexes"] = json!(full);
            }
        }
        Ok(v)
    }

    /// A vision file's image processor settings (transformers' names): its normalization and patch
    /// size; the pixel budget stays transformers' default.
    pub fn preprocessor_json(&self) -> Result<Value> {
        let vision = self.vision_config_json()?;
        Ok(json!({
            "image_mean": self.floats("clip.vision.image_mean")?,
            "image_std": self.floats("clip.vision.image_std")?,
            "patch_size": vision["patch_size"],
            "merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": 2,
        }))
    }

    /// The tokenizer as a `tokenizer.json` document: byte-level BPE with the file's merges and the
    /// pre-tokenizer `tokenizer.ggml.pre` names, or a SentencePiece BPE as transformers rebuilds
    /// Gemma's and Phi-3's ([`sentencepiece_tokenizer`]); control and user-defined tokens as added
    /// tokens.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = match self.get("tokenizer.ggml.model")? {
            Gv::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        if model == "llama" {
            let style = match self.arch.as_str() {
                "gemma3" => Spm::Gemma,
                "phi3" => Spm::Phi3,
                other => {
                    return Err(Error::config(
                        &self.path,
                        "tokenizer.ggml.model",
                        format!(
                            "`llama` (SentencePiece) in a `{other}` file; Loupe reads it for \
                             gemma3 and phi3"
                        ),
                    ))
                }
            };
            let tokens = self.strings("tokenizer.ggml.tokens")?;
            let types = self.token_types(tokens.len());
            let scores = match style {
                // Gemma's scores do not follow its merge order; the order in the file does.
                Spm::Gemma => (0..tokens.len()).map(|i| -(i as f64)).collect(),
                Spm::Phi3 => self.floats("tokenizer.ggml.scores")?,
            };
            if scores.len() != tokens.len() {
                return Err(Error::config(
                    &self.path,
                    "tokenizer.ggml.scores",
                    format!("{} scores for {} tokens", scores.len(), tokens.len()),
                ));
            }
            return Ok(sentencepiece_tokenizer(tokens, &types, &scores, style).to_string());
        }
        let pre = match self.meta.get("tokenizer.ggml.pre") {
            Some(Gv::String(s)) => s.clone(),
            _ => "default".into(),
        };
        let byte_level = |prefix: bool, trim: bool, regex: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim, "use_regex": regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        // Each pre-tokenizer as the model's own tokenizer.json has it.
        let (normalizer, pre_tokenizer) = match (model.as_str(), pre.as_str()) {
            ("gpt2", "qwen2") => (
                json!({"type": "NFC"}),
                vec![split(QWEN2_PATTERN), byte_level(false, true, false)],
            ),
            ("gpt2", "llama-bpe") => (
                Value::Null,
                vec![split(LLAMA3_PATTERN), byte_level(false, true, false)],
            ),
            // SmolLM: every digit alone, then GPT-2's split.
            ("gpt2", "smollm") => (
                Value::Null,
                vec![
                    json!({"type": "Digits", "individual_digits": true}),
                    byte_level(false, true, true),
                ],
            ),
            _ => {
                return Err(Error::config(
                    &self.path,
                    "tokenizer.ggml.pre",
                    format!(
                        "`{model}` with pre-tokenizer `{pre}`; Loupe reads gpt2 tokenizers with \
                         the qwen2, llama-bpe or smollm pre-tokenizer"
                    ),
                ));
            }
        };
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let added = added_tokens(&tokens, &self.token_types(tokens.len()));
        let mut vocab = serde_json::Map::new();
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizer},
            "post_processor": byte_level(true, false, true),
            "decoder": byte_level(true, true, true),
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        Ok(doc.to_string())
    }

    /// `tokenizer.ggml.token_type`, one per token (1, normal, where the file has none).
    fn token_types(&self, n: usize) -> Vec<i64> {
        match self.meta.get("tokenizer.ggml.token_type") {
            Some(Gv::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Gv::I32(x) => *x as i64,
                    Gv::U32(x) => *x as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; n],
        }
    }

    pub fn chat_template(&self) -> Option<String> {
        match self.meta.get("tokenizer.chat_template") {
            Some(Gv::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The text of the token at `tokenizer.ggml.{which}_token_id` (`bos`, `eos`).
    pub fn special_token(&self, which: &str) -> Option<String> {
        let id = self
            .uint(&format!("tokenizer.ggml.{which}_token_id"))
            .ok()?;
        // One entry, not a copy of the whole vocabulary.
        match self.meta.get("tokenizer.ggml.tokens")? {
            Gv::Array(items) => match items.get(usize::try_from(id).ok()?)? {
                Gv::String(s) => Some(s.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// The `bos` or `eos` token llama.cpp adds to each text: where `tokenizer.ggml.add_{which}_token`
    /// is true.
    pub fn added_special(&self, which: &str) -> Option<String> {
        match self.meta.get(&format!("tokenizer.ggml.add_{which}_token")) {
            Some(Gv::Bool(true)) => self.special_token(which),
            _ => None,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.uint("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|x| u32::try_from(x).ok())
    }
}

/// Control (3) and user-defined (4) tokens as `tokenizer.json` added tokens: matched whole in the
/// text, never split.
fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<Value> {
    tokens
        .iter()
        .enumerate()
        .filter_map(|(id, tok)| match types.get(id).copied().unwrap_or(1) {
            t @ (3 | 4) => Some(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": t == 3,
            })),
            _ => None,
        })
        .collect()
}

/// The longest token a rebuilt SentencePiece vocabulary makes by merges (real vocabularies' longest
/// are a few dozen bytes; Gemma's runs of spaces 31).
const MAX_MERGED_TOKEN_BYTES: usize = 1024;

/// The SentencePiece layouts transformers rebuilds from a GGUF's vocabulary.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spm {
    /// Gemma's: no prefix space, words split after each space (merges may not cross one).
    Gemma,
    /// Phi-3's (Llama's): a `▁` put before the text, no split.
    Phi3,
}

/// A SentencePiece BPE as transformers rebuilds it from a GGUF (and as the model's own
/// `tokenizer.json` is): spaces written as `▁`, byte fallback for what the vocabulary lacks. The
/// file has no merges: each token gives one merge per way of cutting it into two tokens, best
/// first by `scores` (higher first; for Gemma the order in the file), then longer left part, then
/// longer right part. For Gemma, llama.cpp stores the tokens of two or more spaces as spaces; they
/// are looked up as `▁`s.
fn sentencepiece_tokenizer(
    tokens: Vec<String>,
    types: &[i64],
    scores: &[f64],
    style: Spm,
) -> Value {
    let tokens: Vec<String> = tokens
        .into_iter()
        .map(|t| {
            if style == Spm::Gemma && t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t
            }
        })
        .collect();
    // A token spelled twice keeps its last id and its last score, as a dictionary built in order
    // does, and its first place in the order.
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if id.insert(t, i).is_none() {
            order.push(t);
        }
    }
    // (score of the merged token, left chars, right chars, left, right)
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for piece in &order {
        // Each cut costs a lookup of both halves: a token longer than any real one (a hostile
        // file's megabyte token) gets no merges rather than hours of hashing.
        if piece.len() > MAX_MERGED_TOKEN_BYTES {
            continue;
        }
        let score = scores[id[piece]];
        let mut local: Vec<(usize, usize, &str, &str)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*id.get(l)?, *id.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(li, ri, ..)| (li, ri));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (score, l.chars().count(), r.chars().count(), l, r)),
        );
    }
    // Best first (a stable sort, so cuts that tie keep their order).
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| b.2.cmp(&a.2))
    });
    let vocab: serde_json::Map<String, Value> = order
        .iter()
        .map(|t| ((*t).to_owned(), json!(id[t])))
        .collect();
    let merges: Vec<Value> = merges.iter().map(|m| json!([m.3, m.4])).collect();
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    let (normalizer, pre_tokenizer, unk) = match style {
        Spm::Gemma => (
            space,
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
            json!("<unk>"),
        ),
        Spm::Phi3 => {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            (
                json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"}, space]}),
                Value::Null,
                Value::Null,
            )
        }
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens(&tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

/// Gemma 3's chat template as published with its checkpoints (llama.cpp's Gemma 3 files may come
/// without one): a system message goes before the first user turn, the assistant is `model`.
const GEMMA3_TEMPLATE: &str = "{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = \"\" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = \"model\" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception(\"Invalid content type\") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
";

/// llama.cpp's tensor names to the checkpoint names: Qwen2 decoders, and the Qwen2-VL vision file.
pub fn hf_name(name: &str) -> String {
    hf_name_with(name, false)
}

/// As [`hf_name`], for Gemma 3, whose MLP input norm llama.cpp also calls `ffn_norm`: it is the
/// checkpoint's `pre_feedforward_layernorm` (`post_attention_layernorm` is on the attention output).
pub fn hf_name_gemma3(name: &str) -> String {
    match name.strip_suffix(".ffn_norm.weight") {
        Some(block) if block.starts_with("blk.") => {
            format!(
                "model.layers.{}.pre_feedforward_layernorm.weight",
                &block[4..]
            )
        }
        _ => hf_name(name),
    }
}

/// As [`hf_name`], for Phi-3, whose fused projections llama.cpp keeps fused: `attn_qkv` is the
/// checkpoint's `qkv_proj`, `ffn_up` its `gate_up_proj` (the gate's rows first).
pub fn hf_name_phi3(name: &str) -> String {
    for (part, hf) in [
        (".attn_qkv.", "self_attn.qkv_proj"),
        (".ffn_up.", "mlp.gate_up_proj"),
    ] {
        if let Some((block, kind)) = name.split_once(part) {
            if let Some(layer) = block.strip_prefix("blk.") {
                return format!("model.layers.{layer}.{hf}.{kind}");
            }
        }
    }
    hf_name(name)
}

/// As [`hf_name`], for a vision file whose blocks have a gated MLP (Qwen2.5-VL: `ffn_gate`,
/// `ffn_up`, `ffn_down` are the checkpoint's `gate_proj`, `up_proj`, `down_proj`).
pub fn hf_name_gated_vision(name: &str) -> String {
    hf_name_with(name, true)
}

fn hf_name_with(name: &str, gated_vision: bool) -> String {
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        // The vision file splits Conv3D's two temporal kernels; `Weights` stacks them back.
        "v.patch_embd.weight" => return "visual.patch_embed.proj.weight:0".into(),
        "v.patch_embd.weight.1" => return "visual.patch_embed.proj.weight:1".into(),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("v.post_ln.") {
        return format!("visual.merger.ln_q.{rest}");
    }
    if let Some(rest) = name.strip_prefix("mm.") {
        return format!("visual.merger.mlp.{rest}");
    }
    if let Some(rest) = name.strip_prefix("v.blk.") {
        return vision_block_name(name, rest, gated_vision);
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return name.into();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return name.into();
    };
    let (part, kind) = rest.rsplit_once('.').unwrap_or((rest, ""));
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return name.into(),
    };
    format!("model.layers.{layer}.{hf}.{kind}")
}

/// `v.blk.{i}.{part}.{kind}`: the fused qkv is stored as three pieces, joined by `Weights`.
fn vision_block_name(name: &str, rest: &str, gated: bool) -> String {
    let Some((block, rest)) = rest.split_once('.') else {
        return name.into();
    };
    let (part, kind) = rest.rsplit_once('.').unwrap_or((rest, ""));
    let p = format!("visual.blocks.{block}");
    match (part, gated) {
        ("ln1", _) => format!("{p}.norm1.{kind}"),
        ("ln2", _) => format!("{p}.norm2.{kind}"),
        ("attn_q", _) => format!("{p}.attn.qkv.{kind}:0"),
        ("attn_k", _) => format!("{p}.attn.qkv.{kind}:1"),
        ("attn_v", _) => format!("{p}.attn.qkv.{kind}:2"),
        ("attn_out", _) => format!("{p}.attn.proj.{kind}"),
        ("ffn_up", false) => format!("{p}.mlp.fc1.{kind}"),
        ("ffn_down", false) => format!("{p}.mlp.fc2.{kind}"),
        ("ffn_gate", true) => format!("{p}.mlp.gate_proj.{kind}"),
        ("ffn_up", true) => format!("{p}.mlp.up_proj.{kind}"),
        ("ffn_down", true) => format!("{p}.mlp.down_proj.{kind}"),
        _ => name.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_checkpoint_names() {
        for (from, to) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
            (
                "blk.23.attn_output.weight",
                "model.layers.23.self_attn.o_proj.weight",
            ),
            (
                "blk.7.ffn_norm.weight",
                "model.layers.7.post_attention_layernorm.weight",
            ),
            (
                "blk.7.ffn_down.weight",
                "model.layers.7.mlp.down_proj.weight",
            ),
            ("blk.7.something_new.weight", "blk.7.something_new.weight"),
            ("v.blk.3.attn_k.bias", "visual.blocks.3.attn.qkv.bias:1"),
            ("v.blk.0.ln2.weight", "visual.blocks.0.norm2.weight"),
            ("v.blk.0.ffn_up.weight", "visual.blocks.0.mlp.fc1.weight"),
            ("v.patch_embd.weight.1", "visual.patch_embed.proj.weight:1"),
            ("v.post_ln.bias", "visual.merger.ln_q.bias"),
            ("mm.2.weight", "visual.merger.mlp.2.weight"),
        ] {
            assert_eq!(hf_name(from), to);
        }
        for (from, to) in [
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.3.post_attention_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            (
                "blk.3.post_ffw_norm.weight",
                "model.layers.3.post_feedforward_layernorm.weight",
            ),
            (
                "blk.0.attn_k_norm.weight",
                "model.layers.0.self_attn.k_norm.weight",
            ),
            ("token_embd.weight", "model.embed_tokens.weight"),
        ] {
            assert_eq!(hf_name_gemma3(from), to);
        }
        for (from, to) in [
            (
                "blk.2.attn_qkv.weight",
                "model.layers.2.self_attn.qkv_proj.weight",
            ),
            (
                "blk.0.ffn_up.weight",
                "model.layers.0.mlp.gate_up_proj.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            ("output.weight", "lm_head.weight"),
            ("rope_factors_long.weight", "rope_factors_long.weight"),
        ] {
            assert_eq!(hf_name_phi3(from), to);
        }
        assert_eq!(
            hf_name_gated_vision("v.blk.1.ffn_gate.weight"),
            "visual.blocks.1.mlp.gate_proj.weight"
        );
        assert_eq!(
            hf_name_gated_vision("v.blk.1.ffn_down.bias"),
            "visual.blocks.1.mlp.down_proj.bias"
        );
    }
}
