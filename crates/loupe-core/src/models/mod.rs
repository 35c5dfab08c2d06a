//! The model architectures (one file each) and the shared layers they are built from.

pub mod layers;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod qwen3_vl;

use candle_core::Tensor;

use crate::error::Result;
use crate::generate::kv_cache::KvCache;
use crate::image::PixelBatch;
use layers::Taps;

/// A vision tower: patches `(patches, patch values)` of the images in `grids`, in the preprocessor's
/// merge-block order, to merged image tokens `(tokens, text hidden)`.
pub trait VisionEncoder: Send + Sync {
    fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]], taps: &Taps) -> Result<Tensor>;
    fn param_count(&self) -> usize;
}

/// What the generation loop needs from a vision-language model.
pub trait VisionLanguageModel: Send + Sync {
    /// Vision tower: `(image tokens, hidden)` for every image of the batch, in order.
    fn encode_images(&self, pixels: &PixelBatch) -> Result<Tensor>;
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
    fn new_cache(&self) -> KvCache;
    /// Token ids of the image placeholder and the vision start marker.
    fn image_token_id(&self) -> u32;
    /// Parameter counts `(vision, text)`.
    fn param_counts(&self) -> (usize, usize);
    fn architecture(&self) -> &'static str;
    fn vocab_size(&self) -> usize;
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
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        qwen2_vl::Qwen2Vl::forward(self, embeds, positions, cache, all_logits)
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
