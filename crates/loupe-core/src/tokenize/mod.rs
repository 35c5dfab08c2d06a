//! Text to token ids and back: the checkpoint's `tokenizer.json` and its own Jinja chat template.

mod stream;
mod template;

pub use stream::TextStream;
pub use template::{ChatTemplate, Content, Message};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A Hugging Face `tokenizer.json`, loaded with the pure-Rust `tokenizers` crate.
pub struct Tokenizer {
    /// Shared with the grammar's tokenizer environment (constrained decoding's forced tokens).
    inner: std::sync::Arc<tokenizers::Tokenizer>,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::limits::read_file(
            path,
            crate::limits::get().tokenizer_bytes,
            "tokenizer-bytes",
        )?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses `tokenizer.json` bytes; `path` names the source in errors.
    ///
    /// A BPE model (every Qwen tokenizer) is read straight into its type. `tokenizers`' own entry
    /// point reads the model through an untagged enum, which first copies the whole model (151k
    /// vocabulary entries and as many merges) into a generic tree and then into a JSON value before
    /// reading it: that took 0.35-0.5 s of Qwen2-VL's 0.9 s load. Other models, or a file this does
    /// not read, go through `tokenizers`' entry point (and its error messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        use tokenizers::{
            models::bpe::BPE, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper,
            PreTokenizerWrapper, TokenizerImpl,
        };
        type BpeTokenizer = TokenizerImpl<
            BPE,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >;
        let bad = |msg: String| Error::Tokenizer {
            path: path.into(),
            msg: format!("cannot parse tokenizer.json: {msg}"),
        };
        // JSON syntax first: `tokenizers`' component readers panic (`expect`) on a syntax error met
        // inside a component, and on some malformed components; what remains is contained.
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| bad(e.to_string()))?;
        let inner = crate::error::contain(|| match serde_json::from_slice::<BpeTokenizer>(bytes) {
            Ok(bpe) => Ok(tokenizers::Tokenizer::from(bpe)),
            Err(_) => tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string()),
        })
        .map_err(bad)?
        .map_err(bad)?;
        Ok(Tokenizer {
            inner: std::sync::Arc::new(inner),
            path: path.into(),
        })
    }

    /// Encodes text as transformers' `tokenizer(text)` does (special tokens in the text are matched,
    /// the post-processor runs).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot encode: {e}"),
            })
    }

    /// Encodes text a chat template rendered, as transformers' `apply_chat_template` does: the
    /// template writes its own special tokens (`<bos>`), so the post-processor adds none.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot encode: {e}"),
            })
    }

    /// Puts `bos` before and `eos` after each encoded text, in place of the file's post-processor,
    /// as transformers does when `tokenizer_config.json` sets `add_bos_token` or `add_eos_token`
    /// (and llama.cpp with a GGUF's `tokenizer.ggml.add_bos_token`). `None` adds nothing.
    pub fn with_added_specials(mut self, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        use tokenizers::processors::template::TemplateProcessing;
        let mut specials = Vec::new();
        for tok in [bos, eos].into_iter().flatten() {
            let id = self.token_to_id(tok).ok_or_else(|| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!(
                    "the special token {tok:?} it adds to each text is not in the vocabulary"
                ),
            })?;
            specials.push((tok.to_owned(), id));
        }
        // `<bos>:0 $A:0 <eos>:0`, and the same for a pair with `$B:1`, as transformers writes it.
        let part = |seq: &str, type_id: u8| {
            let mut out = Vec::new();
            out.extend(bos.map(|b| format!("{b}:{type_id}")));
            out.push(format!("${seq}:{type_id}"));
            out.extend(eos.map(|e| format!("{e}:{type_id}")));
            out.join(" ")
        };
        let single = part("A", 0);
        let pair = format!("{single} {}", part("B", 1));
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| e.to_string())
            .and_then(|b| {
                b.special_tokens(specials)
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(|msg| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("cannot add the special tokens: {msg}"),
            })?;
        std::sync::Arc::make_mut(&mut self.inner).with_post_processor(Some(processor));
        Ok(self)
    }

    /// Decodes ids, keeping special tokens out of the text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("cannot decode: {e}"),
        })
    }

    /// Decodes ids with special tokens kept (grounding markers such as `<|box_start|>`).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("cannot decode: {e}"),
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes each token id stands for (special tokens marked as llguidance expects), for
    /// constrained decoding.
    /// The `tokenizers` tokenizer itself, shared.
    pub(crate) fn shared(&self) -> std::sync::Arc<tokenizers::Tokenizer> {
        self.inner.clone()
    }

    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        let err = |msg: String| Error::Tokenizer {
            path: self.path.clone(),
            msg,
        };
        let json = self
            .inner
            .to_string(false)
            .map_err(|e| err(format!("cannot serialize: {e}")))?;
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| err(format!("cannot serialize: {e}")))?;
        llguidance::token_bytes_from_tokenizer_json(&value)
            .map_err(|e| err(format!("cannot read the token bytes: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The special tokens transformers adds to each text by `tokenizer_config.json`: only where the
/// file sets `add_bos_token` or `add_eos_token` (transformers then rebuilds the post-processor from
/// them; otherwise `tokenizer.json`'s own stands). Each is `bos_token` / `eos_token`, a string or
/// `{"content": ...}`; a flag that is set with no such token adds nothing, as in transformers.
pub fn config_specials(cfg: &serde_json::Value) -> Option<(Option<String>, Option<String>)> {
    let flag = |k: &str| cfg.get(k).and_then(serde_json::Value::as_bool);
    let token = |k: &str| {
        let v = cfg.get(k)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(serde_json::Value::as_str))
            .map(str::to_owned)
    };
    let (bos, eos) = (flag("add_bos_token"), flag("add_eos_token"));
    if bos.is_none() && eos.is_none() {
        return None;
    }
    Some((
        bos.unwrap_or(false).then(|| token("bos_token")).flatten(),
        eos.unwrap_or(false).then(|| token("eos_token")).flatten(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct BPE read gives the tokenizer `tokenizers`' own entry point gives: the same
    /// serialization (vocabulary, merges, added tokens, normalizer, pre-tokenizer, post-processor,
    /// decoder) and the same ids for text with special tokens, on every committed tokenizer; a file
    /// that is not a BPE tokenizer still loads through the entry point.
    #[test]
    fn direct_bpe_read_equals_the_general_one() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut files = vec![root.join("models/loupe-parts-demo/tokenizer.json")];
        for family in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_text"] {
            let dir = root.join("tests/fixtures").join(family);
            for entry in std::fs::read_dir(&dir).unwrap() {
                let file = entry.unwrap().path().join("tokenizer.json");
                if file.exists() {
                    files.push(file);
                }
            }
        }
        assert!(files.len() >= 9);
        let text = "<|im_start|>user\nA scratch on the part ü 123 <|vision_start|>?<|im_end|>";
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let ours = Tokenizer::from_bytes(&bytes, &file).unwrap();
            let general = tokenizers::Tokenizer::from_bytes(&bytes).unwrap();
            assert_eq!(
                ours.inner.to_string(false).unwrap(),
                general.to_string(false).unwrap(),
                "{}",
                file.display()
            );
            let want = general.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(ours.encode(text).unwrap(), want, "{}", file.display());
            assert!(want.len() > 10);
        }
        // A WordLevel model takes the general path.
        let word_level = br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"part":1,"ok":2},
            "unk_token":"[UNK]"}}"#;
        let t = Tokenizer::from_bytes(word_level, Path::new("w.json")).unwrap();
        assert_eq!(t.encode("part ok nope").unwrap(), [1, 2, 0]);
        let err = Tokenizer::from_bytes(b"{\"model\": 3}", Path::new("bad.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bad.json"), "{err}");
    }
}
