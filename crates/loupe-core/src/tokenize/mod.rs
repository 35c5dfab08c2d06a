//! Text to token ids and back: the checkpoint's `tokenizer.json` and its own Jinja chat template.

mod stream;
mod template;

pub use stream::TextStream;
pub use template::{ChatTemplate, Content, Message};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A Hugging Face `tokenizer.json`, loaded with the pure-Rust `tokenizers` crate.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses `tokenizer.json` bytes; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer {
            path: path.into(),
            msg: format!("cannot parse tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer {
            inner,
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
