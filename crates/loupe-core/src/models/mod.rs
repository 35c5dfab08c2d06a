//! The model architectures (one file each) and the shared layers they are built from.

pub mod backbone;
pub mod conv;
pub mod decoder;
pub mod dinov2;
pub mod dinov3;
pub mod efficientnet;
pub mod gemma3;
pub mod layers;
pub mod llama;
pub mod phi3;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod qwen3_5;
pub mod qwen3_vl;
pub mod resnet;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::generate::kv_cache::KvCache;
use crate::image::PixelBatch;
use crate::load::config::Qwen2VlConfig;
use layers::{Embedding, Taps};

/// The batch's pixels as `(patches, patch values)` in the compute dtype, once the preprocessor's patch
/// size is checked against the vision tower's.
pub(crate) fn pixel_tensor(
    pixels: &PixelBatch,
    cfg: &Qwen2VlConfig,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let expected = cfg.patch_values();
    if pixels.patch_dim != expected {
        return Err(Error::InvalidInput(format!(
            "preprocessor_config.json gives {} values per patch, the vision tower expects {expected}",
            pixels.patch_dim
        )));
    }
    Ok(Tensor::from_slice(
        &pixels.pixel_values,
        (pixels.n_patches(), pixels.patch_dim),
        device,
    )?
    .to_dtype(dtype)?)
}

/// A vision tower: patches `(patches, patch values)` of the images in `grids`, in the preprocessor's
/// merge-block order, to merged image tokens `(tokens, text hidden)`.
pub trait VisionEncoder: Send + Sync {
    /// The tower. With `until`, only the blocks up to that one, whose output `(patches, width)` is
    /// returned in the preprocessor's patch order.
    fn run(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        taps: &Taps,
        until: Option<usize>,
    ) -> Result<Tensor>;
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], taps: &Taps) -> Result<Tensor> {
        self.run(pixels, grids, taps, None)
    }
    /// The output of block `layer` (from 0), `(patches, width)` in the preprocessor's patch order,
    /// running only the blocks up to it: the patch features anomaly detection learns from.
    fn block_features(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        layer: usize,
    ) -> Result<Tensor> {
        self.run(pixels, grids, &Taps::default(), Some(layer))
    }
    /// Blocks in the tower.
    fn depth(&self) -> usize;
    fn param_count(&self) -> usize;
}

/// What a text-only model answers when asked for images: `doing` says what it cannot do.
pub(crate) fn text_only(doing: &str) -> Error {
    Error::InvalidInput(format!("this is a text-only model: {doing}"))
}

/// `layer` checked against a tower of `depth` blocks.
fn check_layer(layer: usize, depth: usize) -> Result<()> {
    if layer >= depth {
        return Err(Error::InvalidInput(format!(
            "vision layer {layer} does not exist: the tower has blocks 0..{}",
            depth.saturating_sub(1)
        )));
    }
    Ok(())
}

/// What the generation loop needs from a vision-language model.
pub trait VisionLanguageModel: Send + Sync {
    /// Vision tower: `(image tokens, hidden)` for every image of the batch, in order.
    fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor>;
    /// Block `layer`'s patch features `(patches, width)` of every image, in the preprocessor's
    /// patch order ([`VisionEncoder::block_features`]), and the tower's depth.
    fn patch_features(&self, pixels: &PixelBatch, layer: usize) -> Result<Tensor>;
    /// Blocks of the vision tower (0 for a text-only model).
    fn vision_depth(&self) -> usize;
    /// Positions of the prompt tokens (one row per token, one column per rotary stream) and the offset
    /// of decode positions after the prompt.
    fn prompt_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)>;
    /// Input embeddings `(1, seq, hidden)`, image features placed over the image tokens.
    fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor>;
    /// Decoder step; f32 logits for every position (`all_logits`) or for the last one.
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor>;
    /// One decode step of several answers: `tokens[i]` continues `caches[i]`; f32 logits
    /// `(answers, vocab)`. By default one answer after the other; a decoder that can runs them as
    /// one batch, reading its weights once for all.
    fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let mut rows = Vec::with_capacity(tokens.len());
        for (&token, cache) in tokens.iter().zip(caches.iter_mut()) {
            let pos = cache.len() as i64 + cache.rope_delta;
            let embeds = self.embed(&[token], None)?;
            rows.push(self.forward(&embeds, &[[pos; 3]], cache, false)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
    fn new_cache(&self) -> KvCache;
    /// The cache length past which the rotary frequencies of every position change (LongRoPE's
    /// pretrained context, Phi-3): an answer whose sequence grows past it is run again whole, as
    /// transformers does, so its earlier keys turn with the new frequencies too. `None` for most.
    fn rotary_switch(&self) -> Option<usize> {
        None
    }
    /// Token ids of the image placeholder and the vision start marker.
    fn image_token_id(&self) -> u32;
    /// Parameter counts `(vision, text)`.
    fn param_counts(&self) -> (usize, usize);
    fn architecture(&self) -> &'static str;
    fn vocab_size(&self) -> usize;
    /// Named intermediates of the forward pass, captured on request (tests, debugging).
    fn taps(&self) -> &Taps;
}

impl VisionLanguageModel for qwen3_5::Qwen35 {
    fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor> {
        qwen3_5::Qwen35::encode_images(self, pixels)
    }
    fn patch_features(&self, pixels: &PixelBatch, layer: usize) -> Result<Tensor> {
        qwen3_5::Qwen35::patch_features(self, pixels, layer)
    }
    fn vision_depth(&self) -> usize {
        qwen3_5::Qwen35::vision_depth(self)
    }
    fn taps(&self) -> &Taps {
        &self.taps
    }
    fn prompt_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)> {
        mrope_positions(
            ids,
            grids,
            self.cfg.vision.spatial_merge_size,
            self.cfg.image_token_id,
        )
    }
    fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        qwen3_5::Qwen35::embed(self, ids, image_features)
    }
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        qwen3_5::Qwen35::forward(self, embeds, positions, cache, all_logits)
    }
    fn new_cache(&self) -> KvCache {
        qwen3_5::Qwen35::new_cache(self)
    }
    fn image_token_id(&self) -> u32 {
        self.cfg.image_token_id
    }
    fn param_counts(&self) -> (usize, usize) {
        qwen3_5::Qwen35::param_counts(self)
    }
    fn architecture(&self) -> &'static str {
        "Qwen3.5 (qwen3_5)"
    }
    fn vocab_size(&self) -> usize {
        self.cfg.text.vocab_size
    }
}

impl VisionLanguageModel for qwen2_vl::Qwen2Vl {
    fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::encode_images(self, pixels)
    }
    fn prompt_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)> {
        self.rope_index(ids, grids)
    }
    fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::embed(self, ids, image_features)
    }
    fn patch_features(&self, pixels: &PixelBatch, layer: usize) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::patch_features(self, pixels, layer)
    }
    fn vision_depth(&self) -> usize {
        qwen2_vl::Qwen2Vl::vision_depth(self)
    }
    fn taps(&self) -> &Taps {
        &self.taps
    }
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::forward(self, embeds, positions, cache, all_logits)
    }
    fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::forward_decode(self, tokens, caches)
    }
    fn new_cache(&self) -> KvCache {
        qwen2_vl::Qwen2Vl::new_cache(self)
    }
    fn image_token_id(&self) -> u32 {
        self.cfg.image_token_id
    }
    fn param_counts(&self) -> (usize, usize) {
        qwen2_vl::Qwen2Vl::param_counts(self)
    }
    fn architecture(&self) -> &'static str {
        match self.cfg.model_type.as_str() {
            "qwen2_5_vl" => "Qwen2.5-VL (qwen2_5_vl)",
            "qwen3_vl" => "Qwen3-VL (qwen3_vl)",
            _ => "Qwen2-VL (qwen2_vl)",
        }
    }
    fn vocab_size(&self) -> usize {
        self.cfg.text.vocab_size
    }
}

/// M-RoPE positions `[temporal, height, width]` per token, as transformers' `get_rope_index`:
/// text advances all three by one; an image's tokens take `start + (t, row, col)` on its merged grid,
/// and the text after it resumes at `start + max(rows, cols)`. Also returns the decode delta.
pub fn mrope_positions(
    ids: &[u32],
    grids: &[[usize; 3]],
    m: usize,
    image: u32,
) -> Result<(Vec<[i64; 3]>, i64)> {
    let mut pos = Vec::with_capacity(ids.len());
    let mut grids = grids.iter();
    let mut next: i64 = 0;
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image {
            pos.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&x| x == image).count();
        let &[t, h, w] = grids.next().ok_or_else(|| {
            Error::InvalidInput("the prompt holds more image placeholders than images".into())
        })?;
        let (gh, gw) = (h / m, w / m);
        if run != t * gh * gw {
            return Err(Error::InvalidInput(format!(
                "an image placeholder run of {run} tokens does not match its image grid {t}x{gh}x{gw}"
            )));
        }
        for ti in 0..t {
            for y in 0..gh {
                for x in 0..gw {
                    pos.push([next + ti as i64, next + y as i64, next + x as i64]);
                }
            }
        }
        next += gh.max(gw) as i64;
        i += run;
    }
    if grids.next().is_some() {
        return Err(Error::InvalidInput(
            "more images than image placeholders in the prompt".into(),
        ));
    }
    let max = pos
        .iter()
        .flat_map(|p| p.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok((pos, max + 1 - ids.len() as i64))
}

/// Token embeddings `(1, seq, width)` with the image features written over the image placeholder
/// tokens (`width` is the features' when they are wider than the hidden size: DeepStack).
pub fn embed_with_images(
    embed_tokens: &Embedding,
    ids: &[u32],
    image_features: Option<&Tensor>,
    image_token: u32,
    vocab: usize,
    device: &Device,
) -> Result<Tensor> {
    if let Some(&bad) = ids.iter().find(|&&x| x as usize >= vocab) {
        return Err(Error::InvalidInput(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    let idx = Tensor::from_slice(ids, ids.len(), device)?;
    let text = embed_tokens.forward(&idx)?;
    // Without features (decode steps, text-only prompts) every id is embedded as text, as the
    // reference does when a model generates a placeholder token itself.
    let Some(feats) = image_features else {
        return Ok(text.unsqueeze(0)?);
    };
    let n_image = ids.iter().filter(|&&x| x == image_token).count();
    if feats.dim(0)? != n_image {
        return Err(Error::InvalidInput(format!(
            "{n_image} image placeholder tokens but {} image features",
            feats.dim(0)?
        )));
    }
    // With DeepStack the features are wider than the hidden size (the extra columns are added after
    // the first decoder layers, see `forward`); text rows get zeros there, so adding is a no-op.
    let extra = feats.dim(1)? - text.dim(1)?;
    let text = if extra > 0 {
        Tensor::cat(
            &[
                &text,
                &Tensor::zeros((ids.len(), extra), text.dtype(), text.device())?,
            ],
            1,
        )?
    } else {
        text
    };
    // Stitch runs of text embeddings and image features in order.
    let mut parts = Vec::new();
    let (mut i, mut f) = (0, 0);
    while i < ids.len() {
        let is_img = ids[i] == image_token;
        let run = ids[i..]
            .iter()
            .take_while(|&&x| (x == image_token) == is_img)
            .count();
        parts.push(if is_img {
            f += run;
            feats.narrow(0, f - run, run)?
        } else {
            text.narrow(0, i, run)?
        });
        i += run;
    }
    Ok(Tensor::cat(&parts, 0)?.unsqueeze(0)?)
}
