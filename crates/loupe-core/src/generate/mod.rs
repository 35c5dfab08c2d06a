//! Tokens and pixels in, tokens and text out: prefill, decode loop, stops, streaming.

pub mod constraint;
pub mod kv_cache;
pub mod reuse;
pub mod sampler;

use std::time::Instant;

use candle_core::Tensor;

pub use constraint::{Constraint, ConstraintFactory, Grammar};
pub use reuse::{FeatureCache, PrefixCache, Reuse};
pub use sampler::{Sampler, SamplingParams};

use crate::error::{Error, Result};
use crate::image::PixelBatch;
use crate::models::VisionLanguageModel;
use crate::tokenize::{TextStream, Tokenizer};

/// A prompt ready for the model: token ids (image placeholders expanded) and the images' pixels.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub pixels: PixelBatch,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Token ids that end the answer (`generation_config.json`'s `eos_token_id`).
    pub eos_token_ids: Vec<u32>,
    /// Output constraint (JSON schema or grammar); `None` for free text.
    pub grammar: Option<Grammar>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub text: String,
    /// Generated ids, including the end-of-sequence token when one was produced.
    pub tokens: Vec<u32>,
    /// Natural-log probability of each generated token under the model's distribution (after the
    /// constraint's mask, before temperature): a confidence for verdicts and classes.
    pub logprobs: Vec<f32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Logits of one row as a Vec (the last row of a `(seq, vocab)` tensor).
fn last_row(logits: &Tensor) -> Result<Vec<f32>> {
    let rows = logits.dim(0)?;
    Ok(logits.get(rows - 1)?.to_vec1::<f32>()?)
}

/// `log(softmax(logits)[i])`, computed stably; masked (minus infinity) entries count as zero mass.
fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
    (f64::from(logits[i] - max) - sum.ln()) as f32
}

/// Runs the model on a prompt and generates up to `max_tokens`, calling `on_text` with each piece of
/// text as soon as it is complete. `constraint` restricts every token to what its grammar allows;
/// `reuse` skips the vision encoder for images seen before and the prefill of a cached prefix.
pub fn generate(
    model: &dyn VisionLanguageModel,
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    params: &GenerateParams,
    mut constraint: Option<Constraint>,
    reuse: Option<&mut Reuse>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut timings = Timings::default();
    let image_token = model.image_token_id();
    if prompt.pixels.grids.is_empty() && prompt.ids.contains(&image_token) {
        return Err(Error::InvalidInput(
            "the prompt has image placeholder tokens but no images".into(),
        ));
    }
    let mut own_cache;
    let (features, prefix) = match reuse {
        Some(Reuse { features, prefix }) => (
            Some(features),
            prefix.as_mut().filter(|p| p.matches(prompt)),
        ),
        None => (None, None),
    };
    // The part of the prompt still to run: all of it, or what follows a cached prefix.
    let (start, first_image) = prefix.as_ref().map_or((0, 0), |p| (p.len(), p.n_images()));

    let t0 = Instant::now();
    let n_images = prompt.pixels.grids.len();
    let image_features = if first_image == n_images {
        None
    } else {
        let rest;
        let pixels = if first_image == 0 {
            &prompt.pixels
        } else {
            rest = prompt.pixels.images(first_image..n_images);
            &rest
        };
        // Without reuse the batch goes through the tower whole, with no hashing or splitting.
        Some(match features {
            Some(cache) => cache.encode(model, pixels)?,
            None => model.encode_images(pixels)?,
        })
    };
    timings.vision_ms = ms(t0);

    let t1 = Instant::now();
    let (positions, delta) = model.prompt_positions(&prompt.ids, &prompt.pixels.grids)?;
    let embeds = model.embed(&prompt.ids[start..], image_features.as_ref())?;
    let cache = match prefix {
        Some(p) => p.rewind()?,
        None => {
            own_cache = model.new_cache();
            &mut own_cache
        }
    };
    cache.rope_delta = delta;
    let mut logits = last_row(&model.forward(&embeds, &positions[start..], cache, false)?)?;
    timings.prefill_ms = ms(t1);
    let t2 = Instant::now();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut stream = TextStream::new(tokenizer, params.stop_strings.clone());
    let mut history = prompt.ids.clone();
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    let mut finish = FinishReason::Length;
    while tokens.len() < params.max_tokens {
        if let Some(c) = constraint.as_mut() {
            c.mask_logits(&mut logits)?;
        }
        let next = sampler.sample(&logits, &history);
        logprobs.push(log_softmax_at(&logits, next as usize));
        tokens.push(next);
        history.push(next);
        if params.eos_token_ids.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        if let Some(c) = constraint.as_mut() {
            c.commit(next)?;
        }
        let piece = stream.push(next)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stream.stopped() || constraint.as_ref().is_some_and(Constraint::is_finished) {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == params.max_tokens {
            break;
        }
        let pos = cache.len() as i64 + cache.rope_delta;
        let embeds = model.embed(&[next], None)?;
        logits = last_row(&model.forward(&embeds, &[[pos; 3]], cache, false)?)?;
    }
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
    }
    timings.decode_ms = ms(t2);
    Ok(Generation {
        text: stream.text().to_owned(),
        tokens,
        logprobs,
        prompt_tokens: prompt.ids.len(),
        finish_reason: finish,
        timings,
    })
}
