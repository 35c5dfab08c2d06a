//! Work done once and reused across answers: vision features keyed by the content of the pixels, and
//! the KV state of a shared prompt prefix (system prompt, reference images, instructions).

use std::collections::HashMap;

use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::image::PixelBatch;
use crate::models::VisionLanguageModel;

use super::kv_cache::KvCache;
use super::Prompt;

/// Vision features by SHA-256 of an image's model pixels and grid: an image seen before (a reference
/// image, the same part photographed twice) is not encoded again. It keeps the most recently used
/// [`FeatureCache::CAPACITY`] images, so a process that runs for weeks holds a bounded amount.
#[derive(Default)]
pub struct FeatureCache {
    map: HashMap<[u8; 32], (Tensor, u64)>,
    /// Use counter: the entry with the smallest stamp goes first when the cache is full.
    clock: u64,
    pub hits: usize,
    pub misses: usize,
}

impl FeatureCache {
    /// Images kept: a spec's references and the parts of a burst, with room to spare.
    pub const CAPACITY: usize = 64;

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn key(pixels: &PixelBatch) -> [u8; 32] {
        let mut h = Sha256::new();
        for g in &pixels.grids {
            for d in g {
                h.update((*d as u64).to_le_bytes());
            }
        }
        for v in &pixels.pixel_values {
            h.update(v.to_le_bytes());
        }
        h.finalize().into()
    }

    /// Features of every image of the batch, in order, encoding only the images not seen before.
    pub fn encode(
        &mut self,
        model: &dyn VisionLanguageModel,
        pixels: &PixelBatch,
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(pixels.grids.len());
        for i in 0..pixels.grids.len() {
            let one = pixels.images(i..i + 1);
            let key = Self::key(&one);
            self.clock += 1;
            let feats = match self.map.get_mut(&key) {
                Some((t, stamp)) => {
                    self.hits += 1;
                    *stamp = self.clock;
                    t.clone()
                }
                None => {
                    self.misses += 1;
                    let t = model.encode_images(&one)?;
                    if self.map.len() >= Self::CAPACITY {
                        let oldest = self
                            .map
                            .iter()
                            .min_by_key(|(_, (_, s))| *s)
                            .map(|(k, _)| *k);
                        if let Some(k) = oldest {
                            self.map.remove(&k);
                        }
                    }
                    self.map.insert(key, (t.clone(), self.clock));
                    t
                }
            };
            parts.push(feats);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The decoder state after a prompt prefix: its ids, how many images it holds, and its KV cache.
/// Every prompt that starts with these ids and images continues from here instead of from scratch.
pub struct PrefixCache {
    ids: Vec<u32>,
    grids: Vec<[usize; 3]>,
    pub(super) cache: KvCache,
    /// Linear-attention states right after the prefix (a recurrent state cannot be truncated).
    states: Vec<Option<(Tensor, Tensor)>>,
}

impl PrefixCache {
    /// Prefills `prefix` (ids and the images among them) once.
    pub fn build(
        model: &dyn VisionLanguageModel,
        prefix: &Prompt,
        features: &mut FeatureCache,
    ) -> Result<Self> {
        let feats = if prefix.pixels.grids.is_empty() {
            None
        } else {
            Some(features.encode(model, &prefix.pixels)?)
        };
        let (positions, _) = model.prompt_positions(&prefix.ids, &prefix.pixels.grids)?;
        let embeds = model.embed(&prefix.ids, feats.as_ref())?;
        let mut cache = model.new_cache();
        model.forward(&embeds, &positions, &mut cache, false)?;
        Ok(PrefixCache {
            ids: prefix.ids.clone(),
            grids: prefix.pixels.grids.clone(),
            states: cache.states(),
            cache,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `prompt` continues this prefix (same ids, same images first).
    pub fn matches(&self, prompt: &Prompt) -> bool {
        prompt.ids.len() > self.ids.len()
            && prompt.ids.starts_with(&self.ids)
            && prompt.pixels.grids.len() >= self.grids.len()
            && prompt.pixels.grids[..self.grids.len()] == self.grids[..]
    }

    /// Images of the prefix.
    pub fn n_images(&self) -> usize {
        self.grids.len()
    }

    /// The cache holding only the prefix again (the tokens of the previous answer dropped in place).
    pub(super) fn rewind(&mut self) -> Result<&mut KvCache> {
        if self.cache.len() < self.ids.len() {
            return Err(Error::InvalidInput(
                "the prefix cache lost its prefix (an earlier answer failed mid-prefill)".into(),
            ));
        }
        self.cache.truncate(self.ids.len());
        self.cache.restore_states(&self.states, self.ids.len());
        Ok(&mut self.cache)
    }
}

/// What an answer may reuse: cached features, and a prefilled prefix when the prompt starts with it.
#[derive(Default)]
pub struct Reuse {
    pub features: FeatureCache,
    pub prefix: Option<PrefixCache>,
}
