//! The Qwen2-VL image processor: `smart_resize`, resize, rescale + normalize, patchify.
//! Equal to transformers' default `Qwen2VLImageProcessor` (torchvision backend).

use std::path::PathBuf;

use super::resize::{resize_rgb, Filter};
use super::RgbImage;
use crate::error::{Error, Result};
use crate::load::config::PreprocessorConfig;

/// The largest aspect ratio the reference accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Picks the resized height and width: multiples of `factor`, pixel count within
/// `[min_pixels, max_pixels]`, aspect ratio kept as closely as possible (transformers' `smart_resize`).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> std::result::Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err(format!("the image has no pixels ({width}x{height})"));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(format!(
            "aspect ratio {ratio:.1} ({width}x{height}) is over the limit of {MAX_ASPECT_RATIO}"
        ));
    }
    // Python's round() rounds halves to even.
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < f || w_bar < f {
        return Err(format!(
            "{width}x{height} resizes to {w_bar}x{h_bar}, smaller than one {factor}-pixel block; raise --min-pixels"
        ));
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// An image and where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub source: PathBuf,
    pub image: RgbImage,
}

/// The model-ready pixels of several images, concatenated patch by patch.
#[derive(Debug, Clone, Default)]
pub struct PixelBatch {
    /// `(total_patches, patch_dim)` row-major.
    pub pixel_values: Vec<f32>,
    pub patch_dim: usize,
    /// `[t, h, w]` in patches, per image.
    pub grids: Vec<[usize; 3]>,
}

impl PixelBatch {
    pub fn n_patches(&self) -> usize {
        self.grids.iter().map(|g| g[0] * g[1] * g[2]).sum()
    }

    /// Images `range` of the batch, as a batch of their own.
    pub fn images(&self, range: std::ops::Range<usize>) -> PixelBatch {
        let patches = |gs: &[[usize; 3]]| gs.iter().map(|g| g[0] * g[1] * g[2]).sum::<usize>();
        let start = patches(&self.grids[..range.start]) * self.patch_dim;
        let len = patches(&self.grids[range.clone()]) * self.patch_dim;
        PixelBatch {
            pixel_values: self.pixel_values[start..start + len].to_vec(),
            patch_dim: self.patch_dim,
            grids: self.grids[range].to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Preprocessor {
    pub cfg: PreprocessorConfig,
}

impl Preprocessor {
    pub fn new(cfg: PreprocessorConfig) -> Self {
        Preprocessor { cfg }
    }

    /// Overrides the pixel budget for one call (`--min-pixels`, `--max-pixels`).
    pub fn with_pixels(
        mut self,
        min_pixels: Option<usize>,
        max_pixels: Option<usize>,
    ) -> Result<Self> {
        if let Some(m) = min_pixels {
            self.cfg.min_pixels = m;
        }
        if let Some(m) = max_pixels {
            self.cfg.max_pixels = m;
        }
        let budget = crate::limits::get().model_pixels;
        for (flag, v) in [("--min-pixels", min_pixels), ("--max-pixels", max_pixels)] {
            if let Some(v) = v.filter(|&v| v as u64 > budget || v == 0) {
                return Err(Error::Limit {
                    what: flag.into(),
                    found: format!("{v} pixels"),
                    limit: budget,
                    name: "model-pixels".into(),
                });
            }
        }
        if self.cfg.min_pixels > self.cfg.max_pixels {
            return Err(Error::InvalidInput(format!(
                "--min-pixels {} is larger than --max-pixels {}",
                self.cfg.min_pixels, self.cfg.max_pixels
            )));
        }
        Ok(self)
    }

    pub fn factor(&self) -> usize {
        self.cfg.patch_size * self.cfg.merge_size
    }

    /// Merged tokens (image pad tokens) for a grid.
    pub fn tokens_for(&self, grid: [usize; 3]) -> usize {
        grid[0] * grid[1] * grid[2] / (self.cfg.merge_size * self.cfg.merge_size)
    }

    /// The resized size of an image, as `(height, width)`.
    pub fn target_size(&self, input: &ImageInput) -> Result<(usize, usize)> {
        let img = &input.image;
        if !self.cfg.do_resize {
            let budget = crate::limits::get().model_pixels;
            let pixels = (img.height as u64).saturating_mul(img.width as u64);
            if pixels > budget {
                return Err(Error::Limit {
                    what: format!("image {} (do_resize is off)", input.source.display()),
                    found: format!("{}x{} = {pixels} pixels", img.width, img.height),
                    limit: budget,
                    name: "model-pixels".into(),
                });
            }
            return Ok((img.height, img.width));
        }
        smart_resize(
            img.height,
            img.width,
            self.factor(),
            self.cfg.min_pixels,
            self.cfg.max_pixels,
        )
        .map_err(|msg| Error::image(&input.source, msg))
    }

    pub fn preprocess(&self, images: &[ImageInput]) -> Result<PixelBatch> {
        let c = &self.cfg;
        let p = c.patch_size;
        let m = c.merge_size;
        let tps = c.temporal_patch_size;
        let patch_dim = 3 * tps * p * p;
        let mut batch = PixelBatch {
            patch_dim,
            ..Default::default()
        };
        // Fused rescale + normalize, in f32, as the reference computes it.
        let (scale, mean, std) = self.affine();
        for input in images {
            let (rh, rw) = self.target_size(input)?;
            if rh % (p * m) != 0 || rw % (p * m) != 0 {
                return Err(Error::image(
                    &input.source,
                    format!(
                        "{rw}x{rh} is not a multiple of {} (do_resize is off)",
                        p * m
                    ),
                ));
            }
            let img = &input.image;
            let filter = if c.resample == 2 {
                Filter::Bilinear
            } else {
                Filter::Bicubic
            };
            let resized = resize_rgb(&img.data, img.width, img.height, rw, rh, filter);
            let (gh, gw) = (rh / p, rw / p);
            batch.grids.push([1, gh, gw]);
            let start = batch.pixel_values.len();
            batch.pixel_values.resize(start + gh * gw * patch_dim, 0.0);
            let out = &mut batch.pixel_values[start..];
            let mut o = 0;
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (row, col) = ((bh * m + mh) * p, (bw * m + mw) * p);
                            for ch in 0..3 {
                                for _t in 0..tps {
                                    for py in 0..p {
                                        let line = ((row + py) * rw + col) * 3 + ch;
                                        for px in 0..p {
                                            let v = f32::from(resized[line + px * 3]);
                                            out[o] = (v * scale - mean[ch]) / std[ch];
                                            o += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(batch)
    }

    /// `(scale, mean, std)` such that a pixel value `v` in 0..=255 becomes `(v * scale - mean) / std`.
    fn affine(&self) -> (f32, [f32; 3], [f32; 3]) {
        let c = &self.cfg;
        let m = c.image_mean.map(|x| x as f32);
        let s = c.image_std.map(|x| x as f32);
        match (c.do_rescale, c.do_normalize) {
            (true, true) => {
                let k = (1.0 / c.rescale_factor) as f32;
                (1.0, m.map(|x| x * k), s.map(|x| x * k))
            }
            (false, true) => (1.0, m, s),
            (true, false) => (c.rescale_factor as f32, [0.0; 3], [1.0; 3]),
            (false, false) => (1.0, [0.0; 3], [1.0; 3]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_known_values() {
        // Values computed with transformers' smart_resize.
        assert_eq!(smart_resize(480, 640, 28, 3136, 1003520), Ok((476, 644)));
        assert_eq!(smart_resize(97, 211, 28, 3136, 1003520), Ok((84, 224)));
        assert_eq!(smart_resize(10, 10, 28, 3136, 1003520), Ok((56, 56)));
        assert!(smart_resize(1, 300, 28, 3136, 1003520)
            .unwrap_err()
            .contains("aspect ratio"));
        assert!(smart_resize(0, 300, 28, 3136, 1003520).is_err());
    }

    #[test]
    fn smart_resize_respects_bounds() {
        for h in (1..2000).step_by(37) {
            for w in (1..2000).step_by(53) {
                if let Ok((rh, rw)) = smart_resize(h, w, 28, 3136, 200_000) {
                    assert_eq!(rh % 28, 0);
                    assert_eq!(rw % 28, 0);
                    assert!(
                        rh * rw <= 200_000 || rh == 28 || rw == 28,
                        "{h}x{w} -> {rh}x{rw}"
                    );
                }
            }
        }
    }
}
