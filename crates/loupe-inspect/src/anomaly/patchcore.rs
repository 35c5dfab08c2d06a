//! The patch-feature memory bank (PatchCore's recipe) on the loaded VLM's own vision tower, or as
//! published on a pretrained CNN or ViT ([`backbone_features`], [`published_score`]).
//!
//! Each good image, resized to the bank's size, runs the tower up to one block; with `--pool`, its
//! patch features are averaged over their 3x3 neighbourhood on the patch grid (PatchCore's local
//! context). Off by default: PatchCore pools a CNN map of 8-pixel stride, while a ViT patch is 14
//! pixels, so 3x3 patches span 42 and average away a defect smaller than a patch (measured on the
//! synthetic washers of `tests/anomaly.rs`: 6 of 12 dents flagged pooled, 12 of 12 not). A greedy
//! k-centre coreset keeps a stated fraction of all of them (distances measured on a
//! seeded random projection to [`PROJECTION_DIM`] dimensions, as PatchCore does, to keep the
//! selection fast). A new image's patch scores are the distances to their nearest bank feature.
//!
//! The nearest-neighbour search is exact: one matrix product of the image's patches against the bank
//! (candle's SIMD GEMM), `|q|^2 + |b|^2 - 2 q.b`, in blocks. Banks here hold thousands to a few tens of
//! thousands of features (a coreset of tens of good images), where an exact product costs tens of
//! milliseconds and returns no approximate neighbour; an index (HNSW and the like) pays off at millions.

use candle_core::{Device, Tensor};
use loupe_core::image::{resize_rgb, Filter, ImageInput, RgbImage};
use loupe_core::models::backbone::Backbone;
use loupe_core::Engine;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Dimensions of the random projection the coreset selection measures distances in.
pub const PROJECTION_DIM: usize = 128;
/// Bank features compared per block of the exact search.
const BANK_BLOCK: usize = 8192;

/// The patch grid of one image: `gh x gw` features of `dim` values, row-major (raster order).
#[derive(Debug, Clone)]
pub struct PatchGrid {
    pub gh: usize,
    pub gw: usize,
    pub dim: usize,
    pub v: Vec<f32>,
}

/// Block `layer`'s patch features of `img` resized to `w x h` (multiples of the tower's patch and
/// merge size), in raster order; with `pool`, averaged over 3x3 neighbourhoods.
pub fn features(
    engine: &Engine,
    img: &RgbImage,
    w: usize,
    h: usize,
    layer: usize,
    pool: bool,
) -> Result<PatchGrid> {
    let cfg = &engine.preprocessor.cfg;
    let (p, m) = (cfg.patch_size, cfg.merge_size);
    if w == 0 || h == 0 || !w.is_multiple_of(p * m) || !h.is_multiple_of(p * m) {
        return Err(Error::InvalidInput(format!(
            "anomaly image size {w}x{h} is not a multiple of {} (the tower's patch {p} x merge {m})",
            p * m
        )));
    }
    let resized = RgbImage {
        width: w,
        height: h,
        data: resize_rgb(&img.data, img.width, img.height, w, h, Filter::Bilinear),
        orientation: 1,
    };
    let pre = engine
        .preprocessor
        .clone()
        .with_pixels(Some(w * h), Some(w * h))?;
    let px = pre.preprocess(&[ImageInput {
        source: "<anomaly>".into(),
        image: resized,
    }])?;
    let (gh, gw) = (h / p, w / p);
    if px.grids != [[1, gh, gw]] {
        return Err(Error::InvalidInput(format!(
            "the preprocessor made a {:?} patch grid of a {w}x{h} image, not 1x{gh}x{gw}",
            px.grids
        )));
    }
    let t = engine
        .model
        .patch_features(&px, layer)?
        .to_dtype(candle_core::DType::F32)
        .map_err(loupe_core::Error::from)?;
    let (n, dim) = t.dims2().map_err(loupe_core::Error::from)?;
    let flat = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(loupe_core::Error::from)?;
    if n != gh * gw {
        return Err(Error::InvalidInput(format!(
            "the tower gave {n} patch features for a {gh}x{gw} grid"
        )));
    }
    // The preprocessor's order: merge blocks of m x m patches, row-major, each block row-major.
    let mut raster = vec![0f32; n * dim];
    for (k, row) in flat.chunks_exact(dim).enumerate() {
        let (block, inner) = (k / (m * m), k % (m * m));
        let (by, bx) = (block / (gw / m), block % (gw / m));
        let (y, x) = (by * m + inner / m, bx * m + inner % m);
        raster[(y * gw + x) * dim..(y * gw + x + 1) * dim].copy_from_slice(row);
    }
    let g = PatchGrid {
        gh,
        gw,
        dim,
        v: raster,
    };
    Ok(if pool { pool3(&g) } else { g })
}

/// PatchCore as published (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
/// 2022; anomalib's `PatchcoreModel`) on a pretrained CNN: the two mid-level `stages` of `img`
/// resized to `w x h`, each averaged over 3x3 neighbourhoods (zeros padded, always divided by 9, as
/// PyTorch's `AvgPool2d(3, 1, 1)`), the deeper map resized to the first's grid (bilinear, corners
/// not aligned), concatenated per patch, in raster order. On a ViT (DINOv2) the `stages` are layers
/// of one grid, whose tokens are concatenated as they are (the multi-layer patch-token bank).
pub fn backbone_features(
    backbone: &Backbone,
    stages: &[usize],
    img: &RgbImage,
    w: usize,
    h: usize,
) -> Result<PatchGrid> {
    let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
    let maps = backbone_maps(backbone, stages, img, w, h)?;
    let mut grid = None;
    let mut pooled = Vec::with_capacity(maps.len());
    for m in maps {
        // A ViT's tokens already carry their context: not pooled (as the DINO-based detectors).
        let p = if backbone.is_vit() {
            m
        } else {
            m.pad_with_zeros(2, 1, 1)
                .and_then(|m| m.pad_with_zeros(3, 1, 1))
                .and_then(|m| m.avg_pool2d_with_stride(3, 1))
                .map_err(e)?
        };
        let (_, _, gh, gw) = p.dims4().map_err(e)?;
        let (gh, gw) = *grid.get_or_insert((gh, gw));
        pooled.push(p.upsample_bilinear2d(gh, gw, false).map_err(e)?);
    }
    if grid.is_none() {
        return Err(Error::InvalidInput("no backbone stages".into()));
    }
    grid_of(&Tensor::cat(&pooled, 1).map_err(e)?)
}

/// The outputs of a backbone's `stages` for `img` resized to `w x h` (bilinear), each `(1, c, gh,
/// gw)`.
pub fn backbone_maps(
    backbone: &Backbone,
    stages: &[usize],
    img: &RgbImage,
    w: usize,
    h: usize,
) -> Result<Vec<Tensor>> {
    let resized = RgbImage {
        width: w,
        height: h,
        data: resize_rgb(&img.data, img.width, img.height, w, h, Filter::Bilinear),
        orientation: 1,
    };
    let x = backbone.pixels(&resized)?;
    Ok(backbone.features(&x, stages)?)
}

/// A `(1, dim, gh, gw)` feature map as a patch grid (raster order).
pub fn grid_of(map: &Tensor) -> Result<PatchGrid> {
    let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
    let (_, dim, gh, gw) = map.dims4().map_err(e)?;
    let v = map
        .squeeze(0)
        .and_then(|t| t.permute((1, 2, 0)))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)?;
    Ok(PatchGrid { gh, gw, dim, v })
}

/// Neighbours of the nearest bank feature that the published image score weighs against (the
/// paper's `b`, anomalib's `num_neighbors`).
pub const REWEIGHT_NEIGHBOURS: usize = 9;
/// The Gaussian smoothing of the published anomaly map.
pub const MAP_SIGMA: f32 = 4.0;

/// The published PatchCore score of one image's patches `g` against `bank`: each patch's distance
/// to its nearest bank feature; the image score is the largest of them, weighed by how isolated
/// that nearest feature is among its own [`REWEIGHT_NEIGHBOURS`] nearest in the bank (`1 -
/// softmax` of the patch's distances to them, at the nearest: the paper's equation 7); the map is
/// the patch distances resized to `w x h` (nearest, as anomalib's `F.interpolate` default) and
/// smoothed by a Gaussian of sigma [`MAP_SIGMA`] (reflected at the borders).
pub fn published_score(bank: &[f32], g: &PatchGrid, w: usize, h: usize) -> Result<(f32, Vec<f32>)> {
    let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
    let dim = g.dim;
    let (dist, index) = nearest_indexed(bank, &g.v, dim)?;
    let (worst, &top) = dist
        .iter()
        .enumerate()
        .fold((0, &f32::MIN), |a, b| if b.1 > a.1 { b } else { a });
    let nn = &bank[index[worst] * dim..][..dim];
    let support = k_nearest(bank, nn, dim, REWEIGHT_NEIGHBOURS.min(bank.len() / dim));
    let query = &g.v[worst * dim..][..dim];
    let d: Vec<f32> = support
        .iter()
        .map(|&i| euclidean(query, &bank[i * dim..][..dim]))
        .collect();
    let m = d.iter().copied().fold(f32::MIN, f32::max);
    let z: f32 = d.iter().map(|x| (x - m).exp()).sum();
    let score = (1.0 - (d[0] - m).exp() / z) * top;
    let map = Tensor::from_vec(dist, (1, 1, g.gh, g.gw), &Device::Cpu)
        .and_then(|t| t.upsample_nearest2d(h, w))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e)?;
    Ok((score, gaussian_blur(&map, w, h, MAP_SIGMA)))
}

fn euclidean(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

/// The `k` rows of `bank` nearest `x`, nearest first.
fn k_nearest(bank: &[f32], x: &[f32], dim: usize, k: usize) -> Vec<usize> {
    let mut d: Vec<(f32, usize)> = bank
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, b)| (euclidean(x, b), i))
        .collect();
    d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    d.into_iter().take(k.max(1)).map(|(_, i)| i).collect()
}

/// `v` (`h` rows of `w`) smoothed by a normalized Gaussian of `sigma`, `2 round(4 sigma) + 1` taps
/// (anomalib's kernel), rows then columns, the image reflected at its borders (without repeating
/// the edge, as PyTorch's `reflect` padding).
pub fn gaussian_blur(v: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let taps: Vec<f32> = (-radius..=radius)
        .map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / total).collect();
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let i = i.rem_euclid(period);
        (if i < n { i } else { period - i }) as usize
    };
    let mut rows = vec![0f32; v.len()];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = taps
                .iter()
                .enumerate()
                .map(|(t, k)| k * v[y * w + reflect(x as i64 + t as i64 - radius, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; v.len()];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = taps
                .iter()
                .enumerate()
                .map(|(t, k)| k * rows[reflect(y as i64 + t as i64 - radius, h) * w + x])
                .sum();
        }
    }
    out
}

/// Each feature replaced by the mean of its 3x3 neighbourhood (the neighbours present at edges).
pub fn pool3(g: &PatchGrid) -> PatchGrid {
    let mut v = vec![0f32; g.v.len()];
    for y in 0..g.gh {
        for x in 0..g.gw {
            let out = &mut v[(y * g.gw + x) * g.dim..(y * g.gw + x + 1) * g.dim];
            let mut n = 0f32;
            for yy in y.saturating_sub(1)..(y + 2).min(g.gh) {
                for xx in x.saturating_sub(1)..(x + 2).min(g.gw) {
                    let src = &g.v[(yy * g.gw + xx) * g.dim..(yy * g.gw + xx + 1) * g.dim];
                    for (o, s) in out.iter_mut().zip(src) {
                        *o += s;
                    }
                    n += 1.0;
                }
            }
            out.iter_mut().for_each(|o| *o /= n);
        }
    }
    PatchGrid { v, ..*g }
}

/// Greedy k-centre coreset: `keep` rows of `features` (`n x dim`), each next one the farthest from
/// those already kept, distances in a seeded random projection. Starts from a seeded random row.
pub fn coreset(
    features: &[f32],
    dim: usize,
    keep: usize,
    seed: u64,
    mut progress: impl FnMut(usize),
) -> Vec<usize> {
    let n = features.len() / dim.max(1);
    if keep >= n {
        return (0..n).collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pd = PROJECTION_DIM.min(dim);
    // Gaussian-like projection (sum of uniforms), scaled: distances shrink by a common factor only.
    let proj: Vec<f32> = (0..dim * pd)
        .map(|_| (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>())
        .collect();
    let mut z = vec![0f32; n * pd];
    for (row, out) in features.chunks_exact(dim).zip(z.chunks_exact_mut(pd)) {
        for (k, &f) in row.iter().enumerate() {
            if f != 0.0 {
                let pr = &proj[k * pd..(k + 1) * pd];
                for (o, p) in out.iter_mut().zip(pr) {
                    *o += f * p;
                }
            }
        }
    }
    let mut min_d = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(keep);
    let mut next = rng.random_range(0..n);
    for _ in 0..keep {
        chosen.push(next);
        let c = z[next * pd..(next + 1) * pd].to_vec();
        let mut far = (f32::MIN, 0);
        for (i, (row, md)) in z.chunks_exact(pd).zip(min_d.iter_mut()).enumerate() {
            let d: f32 = row.iter().zip(&c).map(|(a, b)| (a - b) * (a - b)).sum();
            if d < *md {
                *md = d;
            }
            if *md > far.0 {
                far = (*md, i);
            }
        }
        next = far.1;
        progress(chosen.len());
    }
    chosen
}

/// For each row of `queries` (`q x dim`), the distance to its nearest row of `bank` (`n x dim`):
/// exact, by matrix products in blocks of [`BANK_BLOCK`] bank rows.
pub fn nearest(bank: &[f32], queries: &[f32], dim: usize) -> Result<Vec<f32>> {
    Ok(nearest_indexed(bank, queries, dim)?.0)
}

/// [`nearest`], and the index of each query's nearest bank row.
pub fn nearest_indexed(
    bank: &[f32],
    queries: &[f32],
    dim: usize,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
    let q = queries.len() / dim;
    let qt = Tensor::from_slice(queries, (q, dim), &Device::Cpu).map_err(e)?;
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    // Per query, the smallest `|b|^2 - 2 q.b` so far and its bank row; `|q|^2` is added at the end.
    let mut best = vec![f32::INFINITY; q];
    let mut best_index = vec![0usize; q];
    for (bi, block) in bank.chunks(BANK_BLOCK * dim).enumerate() {
        let b = block.len() / dim;
        let bt = Tensor::from_slice(block, (b, dim), &Device::Cpu).map_err(e)?;
        let bn: Vec<f32> = block.chunks_exact(dim).map(norm).collect();
        let products = qt.matmul(&bt.t().map_err(e)?).map_err(e)?; // (q, b)
        let (storage, layout) = products.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            unreachable!("made on the CPU above")
        };
        let values = &cpu.as_slice::<f32>().map_err(e)?[layout.start_offset()..][..q * b];
        // One pass over the products, the rows shared out over the cores: the distances are never
        // stored (each elementwise step on a tensor would read and write all of them again).
        let (best_at, index_at) = (best.as_mut_ptr() as usize, best_index.as_mut_ptr() as usize);
        loupe_core::kernels::pool::parallel_for(q, |rows| {
            for i in rows {
                let row = &values[i * b..(i + 1) * b];
                let (mut m, mut arg) = (f32::INFINITY, 0);
                for (j, (p, n)) in row.iter().zip(&bn).enumerate() {
                    let d = n - 2.0 * p;
                    if d < m {
                        m = d;
                        arg = j;
                    }
                }
                // SAFETY: query i is this iteration's alone, inside `best` and `best_index`.
                unsafe {
                    let (bst, idx) = (
                        (best_at as *mut f32).add(i),
                        (index_at as *mut usize).add(i),
                    );
                    if m < *bst {
                        *bst = m;
                        *idx = bi * BANK_BLOCK + arg;
                    }
                }
            }
        });
    }
    let dist = best
        .into_iter()
        .zip(queries.chunks_exact(dim))
        .map(|(d, x)| (d + norm(x)).max(0.0).sqrt())
        .collect();
    Ok((dist, best_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_search_equals_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dim = 17;
        let bank: Vec<f32> = (0..300 * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        let queries: Vec<f32> = (0..40 * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        let got = nearest(&bank, &queries, dim).unwrap();
        for (qi, q) in queries.chunks_exact(dim).enumerate() {
            let want = bank
                .chunks_exact(dim)
                .map(|b| b.iter().zip(q).map(|(x, y)| (x - y) * (x - y)).sum::<f32>())
                .fold(f32::INFINITY, f32::min)
                .sqrt();
            assert!(
                (got[qi] - want).abs() < 1e-4,
                "query {qi}: {} vs {want}",
                got[qi]
            );
        }
    }

    #[test]
    fn coreset_covers_every_cluster() {
        // 5 tight clusters of 50 points: a coreset of 5 takes one from each.
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let dim = 8;
        let mut f = Vec::new();
        for c in 0..5 {
            for _ in 0..50 {
                for k in 0..dim {
                    f.push(if k == c { 10.0 } else { 0.0 } + rng.random::<f32>() * 0.1);
                }
            }
        }
        let kept = coreset(&f, dim, 5, 9, |_| {});
        let mut clusters: Vec<usize> = kept.iter().map(|&i| i / 50).collect();
        clusters.sort();
        assert_eq!(clusters, vec![0, 1, 2, 3, 4]);
        assert_eq!(coreset(&f, dim, 1000, 9, |_| {}).len(), 250);
    }

    #[test]
    fn pooling_averages_the_neighbourhood() {
        let g = PatchGrid {
            gh: 2,
            gw: 3,
            dim: 1,
            v: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let p = pool3(&g);
        // Corner (0, 0): mean of 1, 2, 4, 5; middle top (0, 1): mean of all six.
        assert_eq!(p.v[0], 3.0);
        assert_eq!(p.v[1], 3.5);
    }
}
