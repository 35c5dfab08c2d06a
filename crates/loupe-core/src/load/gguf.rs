//! A model given as one llama.cpp GGUF file, as users download them: its hyper-parameters, tokenizer
//! and chat template are read from the file's metadata, and its tensors are renamed from llama.cpp's
//! names (`blk.0.attn_q.weight`) to the checkpoint names the model files use
//! (`model.layers.0.self_attn.q_proj.weight`). The tensors stay in their stored block formats.
//!
//! Architectures: `qwen2` (text only: Qwen2 and Qwen2.5 language models).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as Gv};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The Qwen2 pre-tokenizer split (`tokenizer.ggml.pre = qwen2`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct GgufModel {
    pub path: PathBuf,
    meta: HashMap<String, Gv>,
    tensors: Vec<String>,
    pub arch: String,
}

impl GgufModel {
    /// Reads the header (metadata and tensor table), not the tensors.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut f).map_err(|e| Error::Weights {
            path: path.into(),
            msg: format!("not a valid GGUF file ({})", crate::error::first_line(&e)),
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
        Ok(GgufModel {
            path: path.into(),
            tensors: content.tensor_infos.keys().cloned().collect(),
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

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key)? {
            Gv::Array(items) => items
                .iter()
                .map(|v| match v {
                    Gv::String(s) => Ok(s.clone()),
                    other => Err(Error::config(
                        &self.path,
                        key,
                        format!("expected strings, found {other:?}"),
                    )),
                })
                .collect(),
            other => Err(Error::config(
                &self.path,
                key,
                format!("expected an array, found {other:?}"),
            )),
        }
    }

    fn require_arch(&self) -> Result<()> {
        if self.arch != "qwen2" {
            return Err(Error::UnsupportedModel {
                path: self.path.clone(),
                model_type: format!("{} (GGUF general.architecture)", self.arch),
                supported: "qwen2".into(),
            });
        }
        Ok(())
    }

    /// The model's `config.json`, in transformers' names.
    pub fn config_json(&self) -> Result<Value> {
        self.require_arch()?;
        let a = &self.arch;
        let heads = self.uint(&format!("{a}.attention.head_count"))?;
        let hidden = self.uint(&format!("{a}.embedding_length"))?;
        let vocab = self.strings("tokenizer.ggml.tokens")?.len();
        let eos = self.uint("tokenizer.ggml.eos_token_id").ok();
        Ok(json!({
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.uint(&format!("{a}.feed_forward_length"))?,
            "num_hidden_layers": self.uint(&format!("{a}.block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.uint(&format!("{a}.attention.head_count_kv")).unwrap_or(heads),
            "rms_norm_eps": self.float(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            "rope_theta": self.float(&format!("{a}.rope.freq_base")).unwrap_or(1_000_000.0),
            "max_position_embeddings": self.uint(&format!("{a}.context_length")).unwrap_or(32768),
            "tie_word_embeddings": !self.tensors.iter().any(|t| t == "output.weight"),
            "eos_token_id": eos,
        }))
    }

    /// The tokenizer as a `tokenizer.json` document (byte-level BPE with the Qwen2 split): the
    /// vocabulary and merges from the metadata; control and user-defined tokens as added tokens.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = match self.get("tokenizer.ggml.model")? {
            Gv::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        let pre = match self.meta.get("tokenizer.ggml.pre") {
            Some(Gv::String(s)) => s.clone(),
            _ => "default".into(),
        };
        if model != "gpt2" || pre != "qwen2" {
            return Err(Error::config(
                &self.path,
                "tokenizer.ggml.model",
                format!(
                    "`{model}` with pre-tokenizer `{pre}`; Loupe reads gpt2 + qwen2 tokenizers"
                ),
            ));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.meta.get("tokenizer.ggml.token_type") {
            Some(Gv::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Gv::I32(x) => *x as i64,
                    Gv::U32(x) => *x as i64,
                    _ => 1,
                })
                .collect(),
            _ => vec![1; tokens.len()],
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            // 3 control, 4 user-defined: whole tokens, never split.
            if let t @ (3 | 4) = types.get(id).copied().unwrap_or(1) {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": t == 3,
                }));
            }
            vocab.insert(tok.clone(), json!(id));
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let byte_level = |prefix: bool, trim: bool, regex: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim, "use_regex": regex});
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
                byte_level(false, true, false),
            ]},
            "post_processor": byte_level(true, false, true),
            "decoder": byte_level(true, true, true),
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        Ok(doc.to_string())
    }

    pub fn chat_template(&self) -> Option<String> {
        match self.meta.get("tokenizer.chat_template") {
            Some(Gv::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.uint("tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(|x| u32::try_from(x).ok())
    }
}

/// llama.cpp's tensor names to the checkpoint names (Qwen2 family).
pub fn hf_name(name: &str) -> String {
    match name {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
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
        ] {
            assert_eq!(hf_name(from), to);
        }
    }
}
