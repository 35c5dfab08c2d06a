//! Qwen3-VL's vision tower: 16-pixel patches (with a bias), a learned position grid resampled
//! bilinearly to each image's patch grid and added to the patch embeddings, LayerNorm blocks with a
//! GELU MLP, 2D rotary attention over each image, and DeepStack: the outputs of the blocks in
//! `deepstack_visual_indexes` go through their own mergers (LayerNorm after the 2x2 shuffle) and are
//! added to the hidden states of the image tokens after the first decoder layers.
//!
//! The decoder is the Qwen2-VL one in [`super::qwen2_vl`] with Qwen3's q/k RMSNorm and interleaved
//! M-RoPE, both switched on by the config. The tower's output is `(tokens, hidden * (1 + levels))`:
//! the merger's features, then one block of columns per DeepStack level, which the decoder adds.

use candle_core::{DType, Device, Tensor};

use super::layers::{
    frame_lengths, inv_freq, load_patch_embed, patch_positions, vision_attention, vision_rotary,
    LayerNorm, Linear, Taps,
};
use super::VisionEncoder;
use crate::error::Result;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::Weights;
use crate::models::layers::Activation;

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// LayerNorm, then `fc2(gelu(fc1(.)))`; the main merger normalizes each patch before the 2x2
/// shuffle, the DeepStack mergers the shuffled row.
struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    postshuffle: bool,
}

impl Merger {
    fn load(
        w: &Weights,
        prefix: &str,
        e: usize,
        unit: usize,
        out: usize,
        post: bool,
    ) -> Result<Self> {
        let m = e * unit;
        Ok(Merger {
            norm: LayerNorm::load(w, &format!("{prefix}.norm"), if post { m } else { e }, 1e-6)?,
            fc1: Linear::load(w, &format!("{prefix}.linear_fc1"), m, m, true)?,
            fc2: Linear::load(w, &format!("{prefix}.linear_fc2"), m, out, true)?,
            postshuffle: post,
        })
    }

    fn forward(&self, x: &Tensor, unit: usize) -> Result<Tensor> {
        let (n, e) = x.dims2()?;
        let x = if self.postshuffle {
            self.norm.forward(&x.reshape((n / unit, e * unit))?)?
        } else {
            self.norm.forward(x)?.reshape((n / unit, e * unit))?
        };
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

pub struct VisionTower {
    patch_embed: Linear,
    /// `(side * side, width)`, the learned position grid.
    pos_embed: Tensor,
    side: usize,
    blocks: Vec<Block>,
    act: Activation,
    merger: Merger,
    deepstack: Vec<(usize, Merger)>,
    heads: usize,
    head_dim: usize,
    merge: usize,
    inv_freq: Vec<f32>,
    params: usize,
}

impl VisionTower {
    pub fn load(cfg: &Qwen2VlConfig, w: &Weights) -> Result<Self> {
        let v = &cfg.vision;
        let e = v.embed_dim;
        let patch_dim = cfg.patch_values();
        let hidden = cfg.vision_intermediate();
        let blocks = (0..v.depth)
            .map(|i| {
                let p = format!("visual.blocks.{i}");
                Ok(Block {
                    norm1: LayerNorm::load(w, &format!("{p}.norm1"), e, 1e-6)?,
                    norm2: LayerNorm::load(w, &format!("{p}.norm2"), e, 1e-6)?,
                    qkv: Linear::load(w, &format!("{p}.attn.qkv"), e, 3 * e, true)?,
                    proj: Linear::load(w, &format!("{p}.attn.proj"), e, e, true)?,
                    fc1: Linear::load(w, &format!("{p}.mlp.linear_fc1"), e, hidden, true)?,
                    fc2: Linear::load(w, &format!("{p}.mlp.linear_fc2"), hidden, e, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let out = v.hidden_size;
        let deepstack = v
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(k, &block)| {
                let prefix = format!("visual.deepstack_merger_list.{k}");
                Ok((block, Merger::load(w, &prefix, e, unit, out, true)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        let head_dim = e / v.num_heads;
        let m = e * unit;
        let block = 4 * e + (3 * e * e + 3 * e) + (e * e + e) + 2 * e * hidden + hidden + e;
        let merger = |norm: usize| 2 * norm + (m * m + m) + (m * out + out);
        Ok(VisionTower {
            patch_embed: load_patch_embed(cfg, w, true)?,
            pos_embed: w.get("visual.pos_embed.weight", &[side * side, e])?,
            side,
            blocks,
            act: Activation::from_config(&v.hidden_act, "vision_config.hidden_act")?,
            merger: Merger::load(w, "visual.merger", e, unit, out, false)?,
            heads: v.num_heads,
            head_dim,
            merge: v.spatial_merge_size,
            inv_freq: inv_freq(head_dim / 2, v.rope_theta),
            params: e * patch_dim
                + e
                + side * side * e
                + v.depth * block
                + merger(e)
                + deepstack.len() * merger(m),
            deepstack,
        })
    }

    /// The learned position grid resampled to every patch (merge-block order, each frame alike):
    /// bilinear with aligned corners, as `F.interpolate(..., align_corners=True)`, in f32.
    fn positions(&self, grids: &[[usize; 3]], dev: &Device) -> Result<Tensor> {
        let side = self.side;
        // Per axis: the two grid taps of patch `i` of `size` and their weights.
        let taps = |i: usize, size: usize| -> [(usize, f32); 2] {
            let src = (i as f32 * (side - 1) as f32) / (size.max(2) - 1) as f32;
            let floor = src.floor();
            let tap = |o: f32| {
                let t = ((floor + o) as usize).min(side - 1);
                (t, (1.0 - (src - floor - o).abs()).max(0.0))
            };
            [tap(0.0), tap(1.0)]
        };
        let (mut idx, mut wts) = (Vec::new(), Vec::new());
        for [y, x, h, w] in patch_positions(grids, self.merge) {
            for (ty, wy) in taps(y, h) {
                for (tx, wx) in taps(x, w) {
                    idx.push((ty * side + tx) as u32);
                    wts.push(wy * wx);
                }
            }
        }
        let n = wts.len() / 4;
        let table = self.pos_embed.to_dtype(DType::F32)?;
        let rows = table.index_select(&Tensor::from_slice(&idx, idx.len(), dev)?, 0)?;
        let e = table.dim(1)?;
        let wts = Tensor::from_vec(wts, (n, 4, 1), dev)?;
        Ok(rows.reshape((n, 4, e))?.broadcast_mul(&wts)?.sum(1)?)
    }
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
        let (cos, sin) = vision_rotary(&self.inv_freq, self.merge, grids, pixels.dtype(), dev)?;
        let x = self.patch_embed.forward(pixels)?;
        // As the reference: positions summed in f32, rounded to the compute dtype, then added.
        let pos = self.positions(grids, dev)?.to_dtype(x.dtype())?;
        let mut x = (x + pos)?;
        taps.record("vision.patch_embed", None, &x);
        let frames = frame_lengths(grids);
        let mut levels = Vec::with_capacity(self.deepstack.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = blk.norm1.forward(&x)?;
            let after_attn = vision_attention(
                &h,
                &blk.qkv,
                &blk.proj,
                self.heads,
                self.head_dim,
                &cos,
                &sin,
                &frames,
                &x,
            )?;
            let h = blk.norm2.forward(&after_attn)?;
            let h = blk.fc1.forward_then(&h, Some(self.act), None)?;
            x = blk.fc2.forward_then(&h, None, Some(&after_attn))?;
            taps.record("vision.block", Some(i), &x);
            if until == Some(i) {
                return Ok(x);
            }
            for (block, merger) in &self.deepstack {
                if *block == i {
                    levels.push(merger.forward(&x, unit)?);
                }
            }
        }
        let main = self.merger.forward(&x, unit)?;
        taps.record("vision.merger", None, &main);
        if levels.is_empty() {
            return Ok(main);
        }
        levels.insert(0, main);
        Ok(Tensor::cat(&levels, 1)?)
    }
}
