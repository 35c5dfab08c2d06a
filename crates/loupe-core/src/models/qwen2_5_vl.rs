//! Qwen2.5-VL's vision tower: Qwen2-VL's ViT with RMSNorm, a SwiGLU MLP (with biases) and window
//! attention. Patches are re-ordered so that each window (`window_size` pixels square, 112 by default:
//! 4x4 merged tokens) is contiguous; most blocks attend within their window, the blocks listed in
//! `fullatt_block_indexes` over the whole image; the merger (RMSNorm, then the same two-layer MLP as
//! Qwen2-VL) runs in window order and its output is put back in raster order.
//!
//! The decoder is Qwen2-VL's (grouped-query attention with M-RoPE; for images the positions are the
//! same), so the model itself is [`super::qwen2_vl::Qwen2Vl`] with this tower.

use candle_core::{Device, Tensor};

use super::layers::{
    frame_lengths, inv_freq, load_merger_mlp, load_patch_embed, vision_attention, vision_rotary,
    Activation, GatedMlp, Linear, RmsNorm, Taps,
};
use super::VisionEncoder;
use crate::error::Result;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;

struct Block {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    mlp: GatedMlp,
}

pub struct VisionTower {
    patch_embed: Linear,
    blocks: Vec<Block>,
    ln_q: RmsNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    heads: usize,
    head_dim: usize,
    merge: usize,
    /// Window side in merged tokens.
    window: usize,
    full_attention: Vec<usize>,
    inv_freq: Vec<f32>,
    params: usize,
}

impl VisionTower {
    pub fn load(cfg: &Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let v = &cfg.vision;
        let e = v.embed_dim;
        let patch_dim = cfg.patch_values();
        let hidden = cfg.vision_intermediate();
        let act = Activation::from_config(&v.hidden_act, "vision_config.hidden_act")?;
        let blocks = (0..v.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                Ok(Block {
                    norm1: RmsNorm::load(w, &format!("{p}.norm1"), e, 1e-6)?,
                    norm2: RmsNorm::load(w, &format!("{p}.norm2"), e, 1e-6)?,
                    qkv: Linear::load(w, &format!("{p}.attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(w, &format!("{p}.attn.proj"), e, e, true)?,
                    mlp: GatedMlp::load(w, &format!("{p}.mlp"), e, hidden, act, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m2 = e * v.spatial_merge_size * v.spatial_merge_size;
        let head_dim = e / v.num_heads;
        let quantized = blocks.first().is_some_and(|b| b.qkv.is_quantized());
        let (merger_fc1, merger_fc2) = load_merger_mlp(w, m2, v.hidden_size, quantized)?;
        let block = 2 * e + (3 * e * e + 3 * e) + (e * e + e) + 3 * e * hidden + 2 * hidden + e;
        let merger = e + (m2 * m2 + m2) + (m2 * v.hidden_size + v.hidden_size);
        Ok(VisionTower {
            patch_embed: load_patch_embed(cfg, w, false)?,
            blocks,
            ln_q: RmsNorm::load(w, "visual.merger.ln_q", e, 1e-6)?,
            merger_fc1,
            merger_fc2,
            heads: v.num_heads,
            head_dim,
            merge: v.spatial_merge_size,
            window: v.window_size / v.spatial_merge_size / v.patch_size,
            full_attention: v.fullatt_block_indexes.clone(),
            inv_freq: inv_freq(head_dim / 2, v.rope_theta),
            params: e * patch_dim + v.depth * block + merger,
        })
    }
}

/// The window order of merged tokens and the patch count of each window: per image and frame, windows
/// of `window` x `window` merged tokens in row-major order (the last row and column of windows may be
/// smaller), tokens row-major within each window. Indices count merged tokens over all images.
pub fn window_order(grids: &[[usize; 3]], merge: usize, window: usize) -> (Vec<u32>, Vec<usize>) {
    let (mut order, mut lengths) = (Vec::new(), Vec::new());
    let mut base = 0;
    for &[t, h, w] in grids {
        let (gh, gw) = (h / merge, w / merge);
        for frame in 0..t {
            let first = base + frame * gh * gw;
            for wy in (0..gh).step_by(window) {
                for wx in (0..gw).step_by(window) {
                    let before = order.len();
                    for y in wy..(wy + window).min(gh) {
                        for x in wx..(wx + window).min(gw) {
                            order.push((first + y * gw + x) as u32);
                        }
                    }
                    lengths.push((order.len() - before) * merge * merge);
                }
            }
        }
        base += t * gh * gw;
    }
    (order, lengths)
}

/// Rows of `x` `(patches, d)` taken by merge unit (`unit` consecutive rows) in the order `units`.
fn take_units(x: &Tensor, units: &[u32], unit: usize, dev: &Device) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let idx = Tensor::from_slice(units, units.len(), dev)?;
    Ok(x.reshape((n / unit, unit * d))?
        .index_select(&idx, 0)?
        .reshape((n, d))?)
}

impl VisionEncoder for VisionTower {
    fn param_count(&self) -> usize {
        self.params
    }

    fn depth(&self) -> usize {
        self.blocks.len()
    }

    fn run(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        taps: &Taps,
        until: Option<usize>,
    ) -> Result<Tensor> {
        let (dev, unit) = (pixels.device(), self.merge * self.merge);
        let (order, windows) = window_order(grids, self.merge, self.window);
        let (cos, sin) = vision_rotary(&self.inv_freq, self.merge, grids, pixels.dtype(), dev)?;
        let (cos, sin) = (
            take_units(&cos, &order, unit, dev)?,
            take_units(&sin, &order, unit, dev)?,
        );
        let x = self.patch_embed.forward(pixels)?;
        taps.record("vision.patch_embed", None, &x);
        let mut x = take_units(&x, &order, unit, dev)?;
        // Window order keeps each image frame contiguous, so full attention is per frame as before.
        let frames = frame_lengths(grids);
        for (i, blk) in self.blocks.iter().enumerate() {
            let segments = if self.full_attention.contains(&i) {
                &frames
            } else {
                &windows
            };
            let h = blk.norm1.forward(&x)?;
            let after_attn = vision_attention(
                &h,
                &blk.qkv,
                &blk.proj,
                self.heads,
                self.head_dim,
                &cos,
                &sin,
                segments,
                &x,
            )?;
            x = blk
                .mlp
                .forward_then(&blk.norm2.forward(&after_attn)?, Some(&after_attn))?;
            taps.record("vision.block", Some(i), &x);
            if until == Some(i) {
                // Back from window order to the preprocessor's.
                let mut inverse = vec![0u32; order.len()];
                for (pos, &unit_idx) in order.iter().enumerate() {
                    inverse[unit_idx as usize] = pos as u32;
                }
                return take_units(&x, &inverse, unit, dev);
            }
        }
        let (n, e) = x.dims2()?;
        let x = self.ln_q.forward(&x)?.reshape((n / unit, e * unit))?;
        let x = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&x)?.gelu_erf()?)?;
        // Back to raster order.
        let mut inverse = vec![0u32; order.len()];
        for (pos, &token) in order.iter().enumerate() {
            inverse[token as usize] = pos as u32;
        }
        let x = x.index_select(&Tensor::from_slice(&inverse, inverse.len(), dev)?, 0)?;
        taps.record("vision.merger", None, &x);
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_token_once_and_pad_at_the_edges() {
        // 2 images: 10x6 merged tokens (windows 4: 3 x 2 windows) and 2 frames of 4x4 (one window each).
        let grids = [[1, 20, 12], [2, 8, 8]];
        let (order, lens) = window_order(&grids, 2, 4);
        let total = 10 * 6 + 2 * 4 * 4;
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..total as u32).collect::<Vec<_>>());
        assert_eq!(lens.iter().sum::<usize>(), total * 4);
        // First image: rows 0-3 / 4-7 / 8-9, columns 0-3 / 4-5.
        let tokens: Vec<usize> = lens[..6].iter().map(|l| l / 4).collect();
        assert_eq!(tokens, vec![16, 8, 16, 8, 8, 4]);
        assert_eq!(&order[..5], &[0, 1, 2, 3, 6]);
        assert_eq!(&order[16..20], &[4, 5, 10, 11]);
        // Frames stay contiguous and in order.
        assert_eq!(order[60], 60);
        assert_eq!(order[76], 76);
    }
}
