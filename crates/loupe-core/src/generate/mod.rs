//! Tokens and pixels in, tokens and text out: prefill, decode loop, stops, streaming.

pub mod constraint;
pub mod conversation;
pub mod kv_cache;
pub mod reuse;
pub mod sampler;

use std::time::Instant;

use candle_core::Tensor;

pub use constraint::{Constraint, ConstraintFactory, FastForward, Grammar};
pub use conversation::Conversation;
pub use reuse::{FeatureCache, PrefixCache, Reuse};
pub use sampler::{Sampler, SamplingParams, SamplingRequest};

use crate::error::{Error, Result};
use crate::image::PixelBatch;
use crate::models::VisionLanguageModel;
use crate::tokenize::{TextStream, Tokenizer};
use kv_cache::KvCache;

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
    /// Of `tokens`, those the grammar forced (appended without sampling).
    pub forced_tokens: usize,
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
    constraint: Option<Constraint>,
    reuse: Option<&mut Reuse>,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let (features, prefix) = match reuse {
        Some(Reuse { features, prefix }) => (Some(features), prefix.as_mut()),
        None => (None, None),
    };
    let mut seq = Sequence::start(
        model, tokenizer, prompt, params, constraint, features, prefix,
    )?;
    while !seq.is_finished() {
        let piece = seq.step()?;
        if !piece.is_empty() {
            on_text(&piece);
        }
    }
    seq.finish(on_text)
}

/// The decoder's cache of one answer: its own, or a prefilled prefix's, borrowed.
enum CacheSlot<'a> {
    Owned(KvCache),
    Prefix(&'a mut KvCache),
}

impl CacheSlot<'_> {
    fn get(&mut self) -> &mut KvCache {
        match self {
            CacheSlot::Owned(c) => c,
            CacheSlot::Prefix(c) => c,
        }
    }
}

/// One answer being generated, a token at a time: the prompt is encoded and prefilled by `start`;
/// each `step` samples a token and runs the model on it. A server steps several in turn and drops
/// one whose client has gone.
pub struct Sequence<'a> {
    model: &'a dyn VisionLanguageModel,
    cache: CacheSlot<'a>,
    constraint: Option<Constraint>,
    sampler: Sampler,
    stream: TextStream<'a>,
    eos_token_ids: Vec<u32>,
    max_tokens: usize,
    history: Vec<u32>,
    tokens: Vec<u32>,
    forced_tokens: usize,
    logprobs: Vec<f32>,
    /// Logits for the next token.
    logits: Vec<f32>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    timings: Timings,
    decode_start: Instant,
}

impl<'a> Sequence<'a> {
    /// Encodes the prompt's images (those not in `features`) and prefills the prompt (after
    /// `prefix`, when the prompt continues it; the answer then borrows the prefix's cache).
    pub fn start(
        model: &'a dyn VisionLanguageModel,
        tokenizer: &'a Tokenizer,
        prompt: &Prompt,
        params: &GenerateParams,
        constraint: Option<Constraint>,
        features: Option<&mut FeatureCache>,
        prefix: Option<&'a mut PrefixCache>,
    ) -> Result<Self> {
        // A LongRoPE model's keys depend on the length of the whole sequence (`rotary_switch`): a
        // shared prefix's cache would serve prompts of either side, so it is not used.
        let prefix = prefix.filter(|p| p.matches(prompt) && model.rotary_switch().is_none());
        // The part of the prompt still to run: all of it, or what follows a cached prefix.
        let (start, first_image) = prefix.as_ref().map_or((0, 0), |p| (p.len(), p.n_images()));
        let cache = match prefix {
            Some(p) => CacheSlot::Prefix(p.rewind()?),
            None => CacheSlot::Owned(model.new_cache()),
        };
        Self::begin(
            model,
            tokenizer,
            prompt,
            params,
            constraint,
            features,
            cache,
            (start, first_image),
        )
    }

    /// As [`Sequence::start`], continuing `cache`, which holds the first `start` ids of the prompt
    /// and its first `first_image` images (a conversation's earlier turns).
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        model: &'a dyn VisionLanguageModel,
        tokenizer: &'a Tokenizer,
        prompt: &Prompt,
        params: &GenerateParams,
        constraint: Option<Constraint>,
        features: Option<&mut FeatureCache>,
        cache: &'a mut KvCache,
        (start, first_image): (usize, usize),
    ) -> Result<Self> {
        if cache.len() != start || start >= prompt.ids.len() {
            return Err(Error::InvalidInput(format!(
                "a cache of {} tokens to continue a prompt of {} from token {start}",
                cache.len(),
                prompt.ids.len()
            )));
        }
        Self::begin(
            model,
            tokenizer,
            prompt,
            params,
            constraint,
            features,
            CacheSlot::Prefix(cache),
            (start, first_image),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        model: &'a dyn VisionLanguageModel,
        tokenizer: &'a Tokenizer,
        prompt: &Prompt,
        params: &GenerateParams,
        constraint: Option<Constraint>,
        features: Option<&mut FeatureCache>,
        mut cache: CacheSlot<'a>,
        (start, first_image): (usize, usize),
    ) -> Result<Self> {
        let mut timings = Timings::default();
        let image_token = model.image_token_id();
        if prompt.pixels.grids.is_empty() && prompt.ids.contains(&image_token) {
            return Err(Error::InvalidInput(
                "the prompt has image placeholder tokens but no images".into(),
            ));
        }
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
        // Earlier turns cached within a LongRoPE model's pretrained context that this prompt grows
        // past: the whole prompt runs again, in the same cache (see `rotary_switch`).
        let start = match model.rotary_switch() {
            Some(n) if start > 0 && start <= n && prompt.ids.len() > n && n_images == 0 => {
                cache.get().truncate(0);
                0
            }
            _ => start,
        };
        let embeds = model.embed(&prompt.ids[start..], image_features.as_ref())?;
        cache.get().rope_delta = delta;
        let logits = last_row(&model.forward(&embeds, &positions[start..], cache.get(), false)?)?;
        timings.prefill_ms = ms(t1);
        Ok(Sequence {
            model,
            cache,
            constraint,
            sampler: Sampler::new(params.sampling.clone()),
            stream: TextStream::new(tokenizer, params.stop_strings.clone()),
            eos_token_ids: params.eos_token_ids.clone(),
            max_tokens: params.max_tokens,
            history: prompt.ids.clone(),
            tokens: Vec::new(),
            forced_tokens: 0,
            logprobs: Vec::new(),
            logits,
            finish: (params.max_tokens == 0).then_some(FinishReason::Length),
            prompt_tokens: prompt.ids.len(),
            timings,
            decode_start: Instant::now(),
        })
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Samples the next token (and takes the tokens the grammar forces after it), and unless the
    /// answer ends runs the model on them. Returns the text they completed (often empty
    /// mid-character or while a stop string may be starting).
    pub fn step(&mut self) -> Result<String> {
        let (piece, run) = self.sample()?;
        match run.as_slice() {
            [] => {}
            &[token] => {
                if !self.rerun_if_switching()? {
                    let logits = self
                        .model
                        .forward_decode(&[token], &mut [self.cache.get()])?;
                    self.logits = last_row(&logits)?;
                }
            }
            tokens => self.run_forced(tokens)?,
        }
        Ok(piece)
    }

    /// Runs the model on a sampled token and the forced ones after it: one forward over all of
    /// them ([`FastForward::Batched`]), or one decode step each ([`FastForward::Stepwise`]).
    fn run_forced(&mut self, tokens: &[u32]) -> Result<()> {
        let stepwise = self
            .constraint
            .as_ref()
            .is_some_and(|c| c.fast_forward() == FastForward::Stepwise);
        let cache = self.cache.get();
        if stepwise {
            for &token in tokens {
                self.logits = last_row(&self.model.forward_decode(&[token], &mut [&mut *cache])?)?;
            }
            return Ok(());
        }
        let start = cache.len() as i64 + cache.rope_delta;
        let positions: Vec<[i64; 3]> = (0..tokens.len() as i64).map(|i| [start + i; 3]).collect();
        let embeds = self.model.embed(tokens, None)?;
        self.logits = last_row(&self.model.forward(&embeds, &positions, cache, false)?)?;
        Ok(())
    }

    /// Where the next position is the first past a LongRoPE model's pretrained context
    /// ([`VisionLanguageModel::rotary_switch`]): runs the whole sequence again from an empty cache,
    /// with the frequencies for its new length (transformers' Phi-3 drops its cache there), and
    /// returns true. The sequence's last token is the one to run.
    fn rerun_if_switching(&mut self) -> Result<bool> {
        let cache = self.cache.get();
        if self.model.rotary_switch() != Some(cache.len()) || cache.len() + 1 != self.history.len()
        {
            return Ok(false);
        }
        cache.truncate(0);
        let (positions, _) = self.model.prompt_positions(&self.history, &[])?;
        let embeds = self.model.embed(&self.history, None)?;
        self.logits = last_row(&self.model.forward(&embeds, &positions, cache, false)?)?;
        Ok(true)
    }

    /// [`Sequence::step`] of several answers of one model, their model steps run as one batch
    /// ([`VisionLanguageModel::forward_decode`]): the same tokens as stepping each alone, the
    /// weights read once for all. An answer with forced tokens to run runs them on its own. One
    /// result per answer, in order; an answer whose sampling fails gets its error and the others go
    /// on.
    pub fn step_batch(seqs: &mut [&mut Sequence<'a>]) -> Vec<Result<String>> {
        let mut results = Vec::with_capacity(seqs.len());
        let mut going = Vec::new();
        let mut tokens = Vec::new();
        for (i, seq) in seqs.iter_mut().enumerate() {
            match seq.sample() {
                Ok((piece, run)) => {
                    results.push(Ok(piece));
                    match run.as_slice() {
                        [] => {}
                        &[t] => match seq.rerun_if_switching() {
                            Ok(false) => {
                                going.push(i);
                                tokens.push(t);
                            }
                            Ok(true) => {}
                            Err(e) => results[i] = Err(e),
                        },
                        run => {
                            if let Err(e) = seq.run_forced(run) {
                                results[i] = Err(e);
                            }
                        }
                    }
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let Some(&first) = going.first() else {
            return results;
        };
        let model = seqs[first].model;
        if going
            .iter()
            .any(|&i| !std::ptr::addr_eq(seqs[i].model, model))
        {
            for &i in &going {
                results[i] = Err(Error::InvalidInput(
                    "a decode batch mixes answers of different models".into(),
                ));
            }
            return results;
        }
        let mut caches: Vec<&mut KvCache> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| going.binary_search(i).is_ok())
            .map(|(_, seq)| seq.cache.get())
            .collect();
        let rows = model
            .forward_decode(&tokens, &mut caches)
            .and_then(|logits| {
                (0..going.len())
                    .map(|r| Ok(logits.get(r)?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()
            });
        drop(caches);
        match rows {
            Ok(rows) => {
                for (&i, row) in going.iter().zip(rows) {
                    seqs[i].logits = row;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for &i in &going {
                    results[i] = Err(Error::InvalidInput(msg.clone()));
                }
            }
        }
        results
    }

    /// Samples the next token, takes the tokens the grammar forces after it, and settles whether
    /// the answer ends; returns the text they completed and the tokens the model must run on next
    /// (none when the answer has ended).
    fn sample(&mut self) -> Result<(String, Vec<u32>)> {
        let mut piece = String::new();
        if self.finish.is_some() {
            return Ok((piece, Vec::new()));
        }
        let logits = &mut self.logits;
        if let Some(c) = self.constraint.as_mut() {
            c.mask_logits(logits)?;
        }
        let next = self.sampler.sample(logits, &self.history);
        let logprob = log_softmax_at(logits, next as usize);
        if !self.accept(next, logprob, None, &mut piece)? {
            return Ok((piece, Vec::new()));
        }
        let mut run = vec![next];
        // A LongRoPE model reruns its whole sequence at one position (`rerun_if_switching`),
        // which a run of several tokens would step over: it samples every token.
        if self.model.rotary_switch().is_none() {
            if let Some(c) = self.constraint.as_mut() {
                let forced = c.take_forced()?;
                for (i, &token) in forced.iter().enumerate() {
                    self.forced_tokens += 1;
                    let last = i + 1 == forced.len();
                    if !self.accept(token, 0.0, Some(last), &mut piece)? {
                        return Ok((piece, Vec::new()));
                    }
                    run.push(token);
                }
            }
        }
        Ok((piece, run))
    }

    /// Appends `token` to the answer (its text to `piece`) and settles whether the answer goes on
    /// past it. The grammar is advanced over a sampled token here; `forced` (`Some(last)`) marks
    /// one of the tokens the grammar forced, which it has advanced over already, all of them: it
    /// can have ended only after the last.
    fn accept(
        &mut self,
        token: u32,
        logprob: f32,
        forced: Option<bool>,
        piece: &mut String,
    ) -> Result<bool> {
        self.logprobs.push(logprob);
        self.tokens.push(token);
        self.history.push(token);
        if self.eos_token_ids.contains(&token) {
            self.finish = Some(FinishReason::Stop);
            return Ok(false);
        }
        if let Some(c) = self.constraint.as_mut().filter(|_| forced.is_none()) {
            c.commit(token)?;
        }
        piece.push_str(&self.stream.push(token)?);
        let grammar_ended = forced != Some(false)
            && self
                .constraint
                .as_ref()
                .is_some_and(Constraint::is_finished);
        if self.stream.stopped() || grammar_ended {
            self.finish = Some(FinishReason::Stop);
        } else if self.tokens.len() >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
        } else {
            return Ok(true);
        }
        Ok(false)
    }

    /// The whole answer; `on_text` gets the text still held back (a partial stop string that never
    /// completed).
    pub fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
        let rest = self.stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        self.timings.decode_ms = ms(self.decode_start);
        Ok(Generation {
            text: self.stream.text().to_owned(),
            tokens: self.tokens,
            logprobs: self.logprobs,
            prompt_tokens: self.prompt_tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            timings: self.timings,
            forced_tokens: self.forced_tokens,
        })
    }
}
