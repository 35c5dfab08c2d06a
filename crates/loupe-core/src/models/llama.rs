//! Llama (Llama 3.x, 3.1, 3.2; SmolLM2): the shared decoder ([`Decoder`]) with its own options:
//! biases only where `attention_bias` (q, k, v and o) and `mlp_bias` say, one stream of plain RoPE
//! positions, the frequencies scaled as `rope_scaling` says (`llama3`, `linear`; in a GGUF, llama3 as
//! `rope_freqs.weight`), the head tied to the embeddings or not. Text only.

use candle_core::{DType, Tensor};

use super::decoder::{Decoder, DecoderOptions};
use super::layers::{inv_freq, Taps};
use super::{text_only, VisionLanguageModel};
use crate::error::Result;
use crate::generate::kv_cache::KvCache;
use crate::image::PixelBatch;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

pub struct Llama {
    pub cfg: Qwen2VlConfig,
    decoder: Decoder,
    pub taps: Taps,
}

impl Llama {
    pub fn load(cfg: Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let t = &cfg.text;
        let options = DecoderOptions {
            qkv_bias: t.attention_bias,
            o_bias: t.attention_bias,
            mlp_bias: t.mlp_bias,
        };
        let mut freq = inv_freq(t.head_dim(), t.rope_theta);
        t.rope_scaling.apply(&mut freq);
        // A llama.cpp file stores llama3 scaling as the divisor of each frequency.
        if w.contains(ROPE_FREQS) {
            let divisors = w
                .get_as(ROPE_FREQS, &[freq.len()], DType::F32)?
                .to_vec1::<f32>()?;
            for (f, d) in freq.iter_mut().zip(divisors) {
                *f /= d;
            }
        }
        Ok(Llama {
            decoder: Decoder::load(t, w, options, freq)?,
            taps: Taps::default(),
            cfg,
        })
    }
}

/// llama.cpp's name for the llama3 frequency divisors.
const ROPE_FREQS: &str = "rope_freqs.weight";

const CANNOT_SEE: &str = "it cannot take images";

/// No image placeholder: every id of a text-only prompt is text.
const NO_IMAGE: u32 = u32::MAX;

impl VisionLanguageModel for Llama {
    fn encode_images(&self, _: &PixelBatch) -> Result<Tensor> {
        Err(text_only(CANNOT_SEE))
    }
    fn patch_features(&self, _: &PixelBatch, _: usize) -> Result<Tensor> {
        Err(text_only("it has no vision tower to take features from"))
    }
    fn vision_depth(&self) -> usize {
        0
    }
    fn prompt_positions(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<(Vec<[i64; 3]>, i64)> {
        if !grids.is_empty() {
            return self
                .encode_images(&PixelBatch::default())
                .map(|_| (vec![], 0));
        }
        Ok(((0..ids.len() as i64).map(|p| [p; 3]).collect(), 0))
    }
    fn embed(&self, ids: &[u32], image_features: Option<&Tensor>) -> Result<Tensor> {
        if image_features.is_some() {
            return Err(text_only(CANNOT_SEE));
        }
        self.decoder.embed(ids, None, NO_IMAGE)
    }
    fn forward(
        &self,
        embeds: &Tensor,
        positions: &[[i64; 3]],
        cache: &mut KvCache,
        all_logits: bool,
    ) -> Result<Tensor> {
        self.decoder
            .forward(embeds, positions, cache, all_logits, &self.taps)
    }
    fn forward_decode(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        self.decoder.forward_decode(tokens, caches, &self.taps)
    }
    fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }
    fn image_token_id(&self) -> u32 {
        NO_IMAGE
    }
    fn param_counts(&self) -> (usize, usize) {
        (0, self.decoder.param_count())
    }
    fn architecture(&self) -> &'static str {
        "Llama (llama)"
    }
    fn vocab_size(&self) -> usize {
        self.cfg.text.vocab_size
    }
    fn taps(&self) -> &Taps {
        &self.taps
    }
}
