//! A conversation whose earlier turns stay in the decoder's cache: each turn's prompt (the whole
//! conversation, rendered by the chat template) is compared with what the cache holds, and only what
//! differs is run. The rendered earlier answer may tokenize differently from the tokens generated
//! (and a template may rewrite earlier turns), so the cache is cut back to the longest common prefix
//! rather than trusted.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::Engine;
use crate::error::Result;

use super::kv_cache::KvCache;
use super::{FeatureCache, FinishReason, GenerateParams, Generation, Prompt, Sequence};

pub struct Conversation {
    cache: KvCache,
    /// The ids the cache holds, in order.
    ids: Vec<u32>,
    /// The images among them: each one's content key, in order.
    images: Vec<[u8; 32]>,
    features: FeatureCache,
}

/// How much of a turn's prompt came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnStats {
    /// Prompt tokens taken from the cache.
    pub reused: usize,
    /// Prompt tokens run through the model.
    pub prefilled: usize,
    /// The answer was stopped by the caller (`stop`), not by the model or the token limit.
    pub interrupted: bool,
}

/// Where each image's run of placeholder tokens starts in `ids`.
fn image_starts(ids: &[u32], image_token: u32) -> impl Iterator<Item = usize> + '_ {
    (0..ids.len()).filter(move |&i| ids[i] == image_token && (i == 0 || ids[i - 1] != image_token))
}

impl Conversation {
    pub fn new(engine: &Engine) -> Self {
        Conversation {
            cache: engine.model.new_cache(),
            ids: Vec::new(),
            images: Vec::new(),
            features: FeatureCache::default(),
        }
    }

    /// Forgets every turn (image features stay cached).
    pub fn reset(&mut self, engine: &Engine) {
        self.cache = engine.model.new_cache();
        self.ids.clear();
        self.images.clear();
    }

    /// Tokens the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.ids.len()
    }

    /// How many of `prompt`'s ids, and of its images, the cache holds: the longest common prefix
    /// of ids that ends before the first image that differs, leaving at least one id to run.
    fn common_prefix(
        &self,
        prompt: &Prompt,
        keys: &[[u8; 32]],
        image_token: u32,
    ) -> (usize, usize) {
        let mut n = self
            .ids
            .iter()
            .zip(&prompt.ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.ids.len().saturating_sub(1));
        let same = self
            .images
            .iter()
            .zip(keys)
            .take_while(|(a, b)| a == b)
            .count();
        // Equal placeholders are not equal images.
        if let Some(first_other) = image_starts(&prompt.ids[..n], image_token).nth(same) {
            n = first_other;
        }
        // An image's placeholders run together: never stop inside one.
        while n > 0 && prompt.ids[n - 1] == image_token {
            n -= 1;
        }
        (n, image_starts(&prompt.ids[..n], image_token).count())
    }

    /// Answers `prompt` (the whole conversation so far, ending with the assistant's turn opened),
    /// streaming text to `on_text`, until the model ends, the limit, or `stop` is set. The answer's
    /// tokens stay in the cache for the next turn.
    pub fn reply(
        &mut self,
        engine: &Engine,
        prompt: &Prompt,
        params: &GenerateParams,
        stop: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(Generation, TurnStats)> {
        let params = engine.fit(prompt, params)?;
        let constraint = params
            .grammar
            .as_ref()
            .map(|g| engine.constraint(g))
            .transpose()?;
        let model = engine.model.as_ref();
        let keys: Vec<[u8; 32]> = (0..prompt.pixels.grids.len())
            .map(|i| FeatureCache::key(&prompt.pixels.images(i..i + 1)))
            .collect();
        let (mut start, mut first_image) =
            self.common_prefix(prompt, &keys, model.image_token_id());
        // A recurrent (linear-attention) state cannot be cut back: start over unless it continues.
        let recurrent = self.cache.states().iter().any(Option::is_some);
        if start < self.ids.len() && recurrent {
            (start, first_image) = (0, 0);
        }
        if start == 0 {
            self.cache = model.new_cache();
        } else {
            self.cache.truncate(start);
        }
        self.ids.truncate(start);
        self.images.truncate(first_image);
        let mut seq = Sequence::resume(
            model,
            &engine.tokenizer,
            prompt,
            &params,
            constraint,
            Some(&mut self.features),
            &mut self.cache,
            (start, first_image),
        )?;
        let mut interrupted = false;
        while !seq.is_finished() {
            if stop.load(Ordering::Relaxed) {
                interrupted = true;
                break;
            }
            let piece = seq.step()?;
            if !piece.is_empty() {
                on_text(&piece);
            }
        }
        let mut out = seq.finish(on_text)?;
        if interrupted {
            out.finish_reason = FinishReason::Length;
        }
        // The cache holds the prompt and every answer token the model has run on.
        let held = self.cache.len();
        self.ids = prompt.ids.clone();
        self.ids
            .extend(&out.tokens[..held.saturating_sub(prompt.ids.len()).min(out.tokens.len())]);
        self.images = keys;
        let stats = TurnStats {
            reused: start,
            prefilled: prompt.ids.len() - start,
            interrupted,
        };
        Ok((out, stats))
    }
}
