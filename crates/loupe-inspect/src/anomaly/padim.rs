//! PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
//! Localization", 2020; anomalib's `PadimModel`) on a pretrained CNN: one Gaussian per patch position
//! of the good images' features, a new patch scored by its Mahalanobis distance to its position's
//! Gaussian.
//!
//! Cheap to learn (no search) and to score (one triangular solve per position), it fits parts that
//! sit in the same place in every image (fixtured, aligned): a position's Gaussian knows only what
//! was at that position. Parts that move or rotate between images want PatchCore's bank, which
//! compares a patch with every good patch wherever it was.
//!
//! The features are the backbone's three stages at stride 4, 8 and 16, the later two resized to the
//! first's grid (nearest) and concatenated, of which a seeded random subset of channels is kept (the
//! paper's dimensionality reduction: 100 of ResNet-18's 448). Each position's covariance is the
//! unbiased estimate plus 0.01 on the diagonal ([`REGULARIZATION`]), held as its Cholesky factor `L` (half the values of
//! the inverse anomalib keeps): the squared distance `d^T S^-1 d` is `|L^-1 d|^2`. The map is the
//! distances resized to the image (bilinear, corners not aligned) and smoothed by a Gaussian of
//! sigma 4; the image score is its largest value.

use candle_core::{Device, Tensor};
use loupe_core::image::RgbImage;
use loupe_core::models::backbone::Backbone;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::patchcore::{backbone_maps, gaussian_blur, grid_of, PatchGrid, MAP_SIGMA};
use crate::error::{Error, Result};

/// Channels kept when none are asked for (the paper's and anomalib's choice for ResNet-18).
pub const DEFAULT_CHANNELS: usize = 100;
/// Added to each covariance's diagonal: the paper's 0.01, which keeps a position's covariance
/// invertible when the good images vary in fewer directions than there are channels, and the 1e-5
/// anomalib (2.x) adds on top before it inverts, so the scores are anomalib's.
pub const REGULARIZATION: f64 = 0.01 + 1e-5;

/// `n` of `total` channels drawn at random from `seed`, in increasing order.
pub fn choose_channels(total: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..total).collect();
    all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut kept = all[..n.min(total)].to_vec();
    kept.sort_unstable();
    kept
}

/// The embedding of `img` resized to `w x h`: the backbone's `stages` (the first the finest), the
/// others resized to the first one's grid (nearest, as PyTorch's default), concatenated, the
/// `channels` kept in the order given.
pub fn embedding(
    backbone: &Backbone,
    stages: &[usize],
    channels: &[usize],
    img: &RgbImage,
    w: usize,
    h: usize,
) -> Result<PatchGrid> {
    let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
    let maps = backbone_maps(backbone, stages, img, w, h)?;
    let (_, _, gh, gw) = maps
        .first()
        .ok_or_else(|| Error::InvalidInput("no backbone stages".into()))?
        .dims4()
        .map_err(e)?;
    let resized = maps
        .iter()
        .map(|m| m.upsample_nearest2d(gh, gw))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(e)?;
    let all = Tensor::cat(&resized, 1).map_err(e)?;
    let total = all.dims()[1];
    if let Some(&bad) = channels.iter().find(|&&c| c >= total) {
        return Err(Error::InvalidInput(format!(
            "channel {bad} of a backbone whose stages give {total}"
        )));
    }
    let index: Vec<u32> = channels.iter().map(|&c| c as u32).collect();
    let index = Tensor::from_vec(index, channels.len(), &Device::Cpu).map_err(e)?;
    grid_of(&all.index_select(&index, 1).map_err(e)?)
}

/// A Gaussian per patch position.
#[derive(Debug, Clone)]
pub struct Gaussians {
    pub gh: usize,
    pub gw: usize,
    pub dim: usize,
    /// `[position][dim]`.
    pub mean: Vec<f32>,
    /// `[position][row i][column j <= i]`: each covariance's lower Cholesky factor, rows packed.
    pub cholesky: Vec<f32>,
}

/// Values of a packed lower triangle of side `dim`.
pub fn triangle(dim: usize) -> usize {
    dim * (dim + 1) / 2
}

impl Gaussians {
    /// The Gaussians of the embeddings of the good images (at least 2, one grid and dimension).
    pub fn fit(goods: &[PatchGrid]) -> Result<Gaussians> {
        let first = match goods {
            [first, _, ..] => first,
            _ => {
                return Err(Error::InvalidInput(
                    "PaDiM needs at least 2 good images to learn from".into(),
                ))
            }
        };
        let (gh, gw, dim) = (first.gh, first.gw, first.dim);
        if goods
            .iter()
            .any(|g| (g.gh, g.gw, g.dim) != (gh, gw, dim) || g.v.len() != gh * gw * dim)
        {
            return Err(Error::InvalidInput(
                "PaDiM's embeddings differ in size".into(),
            ));
        }
        let positions = gh * gw;
        let tri = triangle(dim);
        let mut mean = vec![0f32; positions * dim];
        let mut cholesky = vec![0f32; positions * tri];
        // Positions are independent: split over the cores, each with its own scratch.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = positions.div_ceil(threads).max(1);
        let failed = std::thread::scope(|s| {
            let jobs: Vec<_> = mean
                .chunks_mut(per * dim)
                .zip(cholesky.chunks_mut(per * tri))
                .enumerate()
                .map(|(k, (mean, chol))| {
                    s.spawn(move || {
                        let mut cov = vec![0f64; dim * dim];
                        let mut m = vec![0f64; dim];
                        for (i, (mean, chol)) in
                            mean.chunks_mut(dim).zip(chol.chunks_mut(tri)).enumerate()
                        {
                            let p = k * per + i;
                            fit_position(goods, p, dim, &mut m, &mut cov);
                            if !cholesky_in_place(&mut cov, dim) {
                                return Some(p);
                            }
                            for (o, v) in mean.iter_mut().zip(&m) {
                                *o = *v as f32;
                            }
                            for r in 0..dim {
                                for c in 0..=r {
                                    chol[triangle(r) + c] = cov[r * dim + c] as f32;
                                }
                            }
                        }
                        None
                    })
                })
                .collect();
            jobs.into_iter()
                .filter_map(|j| j.join().expect("a PaDiM worker panicked"))
                .next()
        });
        if let Some(p) = failed {
            return Err(Error::InvalidInput(format!(
                "the good images' features at position ({}, {}) have no positive-definite \
                 covariance (a value that is not finite?)",
                p % gw,
                p / gw
            )));
        }
        Ok(Gaussians {
            gh,
            gw,
            dim,
            mean,
            cholesky,
        })
    }

    /// Each position's Mahalanobis distance to its Gaussian, raster order.
    pub fn distances(&self, g: &PatchGrid) -> Result<Vec<f32>> {
        let dim = self.dim;
        if (g.gh, g.gw, g.dim) != (self.gh, self.gw, dim) {
            return Err(Error::InvalidInput(format!(
                "an embedding of {}x{} positions of {} values; the PaDiM bank holds {}x{} of {dim}",
                g.gw, g.gh, g.dim, self.gw, self.gh
            )));
        }
        let tri = triangle(dim);
        let positions = self.gh * self.gw;
        let mut out = vec![0f32; positions];
        let at = out.as_mut_ptr() as usize;
        // Positions shared out over the cores, each a forward substitution `L z = x - m`.
        loupe_core::kernels::pool::parallel_for(positions, |range| {
            let mut z = vec![0f64; dim];
            for p in range {
                let (x, m) = (&g.v[p * dim..][..dim], &self.mean[p * dim..][..dim]);
                let l = &self.cholesky[p * tri..][..tri];
                let mut sq = 0f64;
                for i in 0..dim {
                    let row = &l[triangle(i)..triangle(i) + i + 1];
                    let mut s = (x[i] - m[i]) as f64;
                    for (lij, zj) in row[..i].iter().zip(&z) {
                        s -= *lij as f64 * zj;
                    }
                    z[i] = s / row[i] as f64;
                    sq += z[i] * z[i];
                }
                // SAFETY: position p is this iteration's alone, inside `out`.
                unsafe { *(at as *mut f32).add(p) = sq.sqrt() as f32 };
            }
        });
        Ok(out)
    }

    /// The image score and the map of an embedding, at `w x h`.
    pub fn score(&self, g: &PatchGrid, w: usize, h: usize) -> Result<(f32, Vec<f32>)> {
        let e = |e: candle_core::Error| Error::Engine(loupe_core::Error::from(e));
        let d = self.distances(g)?;
        let map = Tensor::from_vec(d, (1, 1, self.gh, self.gw), &Device::Cpu)
            .and_then(|t| t.upsample_bilinear2d(h, w, false))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(e)?;
        let map = gaussian_blur(&map, w, h, MAP_SIGMA);
        let score = map.iter().copied().fold(0.0, f32::max);
        Ok((score, map))
    }

    /// Checks values read from a file: finite means, factors with a positive diagonal.
    pub fn check(&self) -> std::result::Result<(), String> {
        let tri = triangle(self.dim);
        if self.mean.len() != self.gh * self.gw * self.dim
            || self.cholesky.len() != self.gh * self.gw * tri
        {
            return Err("tensor sizes do not match the grid".into());
        }
        if self.mean.iter().any(|v| !v.is_finite()) || self.cholesky.iter().any(|v| !v.is_finite())
        {
            return Err("a value is not finite".into());
        }
        let diagonal_ok = self
            .cholesky
            .chunks_exact(tri)
            .all(|l| (0..self.dim).all(|i| l[triangle(i) + i] > 0.0));
        if !diagonal_ok {
            return Err("a Cholesky factor's diagonal is not positive".into());
        }
        Ok(())
    }
}

/// Position `p`'s mean into `m` and covariance (unbiased, plus [`REGULARIZATION`] on the diagonal;
/// the lower triangle) into `cov`, from the good images' embeddings.
fn fit_position(goods: &[PatchGrid], p: usize, dim: usize, m: &mut [f64], cov: &mut [f64]) {
    let n = goods.len();
    m.fill(0.0);
    for g in goods {
        for (m, x) in m.iter_mut().zip(&g.v[p * dim..(p + 1) * dim]) {
            *m += *x as f64;
        }
    }
    m.iter_mut().for_each(|v| *v /= n as f64);
    cov.fill(0.0);
    let mut d = vec![0f64; dim];
    for g in goods {
        for ((d, x), m) in d.iter_mut().zip(&g.v[p * dim..(p + 1) * dim]).zip(&*m) {
            *d = *x as f64 - m;
        }
        for r in 0..dim {
            let dr = d[r];
            for (c, o) in cov[r * dim..r * dim + r + 1].iter_mut().enumerate() {
                *o += dr * d[c];
            }
        }
    }
    for r in 0..dim {
        for c in 0..=r {
            cov[r * dim + c] /= (n - 1) as f64;
        }
        cov[r * dim + r] += REGULARIZATION;
    }
}

/// The lower Cholesky factor of the symmetric matrix whose lower triangle `a` (`dim x dim`,
/// row-major) holds, in place; false when it is not positive definite.
fn cholesky_in_place(a: &mut [f64], dim: usize) -> bool {
    for j in 0..dim {
        let mut diag = a[j * dim + j];
        for k in 0..j {
            diag -= a[j * dim + k] * a[j * dim + k];
        }
        if !(diag > 0.0 && diag.is_finite()) {
            return false;
        }
        let diag = diag.sqrt();
        a[j * dim + j] = diag;
        for i in j + 1..dim {
            let mut s = a[i * dim + j];
            for k in 0..j {
                s -= a[i * dim + k] * a[j * dim + k];
            }
            a[i * dim + j] = s / diag;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn grid(rng: &mut rand::rngs::StdRng, gh: usize, gw: usize, dim: usize) -> PatchGrid {
        PatchGrid {
            gh,
            gw,
            dim,
            v: (0..gh * gw * dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        }
    }

    /// The distance equals `d^T S^-1 d` computed with the covariance inverted by Gauss-Jordan, for
    /// every position, and the fitted mean is the goods' mean.
    #[test]
    #[allow(clippy::needless_range_loop)] // the reference reads as the formulas do
    fn distances_are_mahalanobis_distances() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (gh, gw, dim, n) = (2, 3, 5, 4);
        let goods: Vec<PatchGrid> = (0..n).map(|_| grid(&mut rng, gh, gw, dim)).collect();
        let g = Gaussians::fit(&goods).unwrap();
        let q = grid(&mut rng, gh, gw, dim);
        let got = g.distances(&q).unwrap();
        for p in 0..gh * gw {
            let xs: Vec<&[f32]> = goods.iter().map(|g| &g.v[p * dim..][..dim]).collect();
            let m: Vec<f64> = (0..dim)
                .map(|k| xs.iter().map(|x| x[k] as f64).sum::<f64>() / n as f64)
                .collect();
            for k in 0..dim {
                assert!((g.mean[p * dim + k] as f64 - m[k]).abs() < 1e-6);
            }
            // The full covariance and its inverse, the plain way.
            let mut a = vec![vec![0f64; 2 * dim]; dim];
            for r in 0..dim {
                for c in 0..dim {
                    let s: f64 = xs
                        .iter()
                        .map(|x| (x[r] as f64 - m[r]) * (x[c] as f64 - m[c]))
                        .sum();
                    a[r][c] = s / (n - 1) as f64 + if r == c { REGULARIZATION } else { 0.0 };
                }
                a[r][dim + r] = 1.0;
            }
            for c in 0..dim {
                let piv = a[c][c];
                a[c].iter_mut().for_each(|v| *v /= piv);
                for r in 0..dim {
                    if r != c {
                        let f = a[r][c];
                        let row = a[c].clone();
                        a[r].iter_mut().zip(&row).for_each(|(v, x)| *v -= f * x);
                    }
                }
            }
            let d: Vec<f64> = (0..dim).map(|k| q.v[p * dim + k] as f64 - m[k]).collect();
            let want: f64 = (0..dim)
                .map(|r| (0..dim).map(|c| d[r] * a[r][dim + c] * d[c]).sum::<f64>())
                .sum::<f64>()
                .sqrt();
            assert!(
                (got[p] as f64 - want).abs() <= 1e-4 * want,
                "position {p}: {} vs {want}",
                got[p]
            );
        }
        // A good image's own features lie closer than a far-off point.
        let far = PatchGrid {
            v: q.v.iter().map(|v| v * 10.0).collect(),
            ..q.clone()
        };
        let near = g.distances(&goods[0]).unwrap();
        let away = g.distances(&far).unwrap();
        assert!(near.iter().zip(&away).all(|(a, b)| a < b));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let one = vec![grid(&mut rng, 2, 2, 3)];
        assert!(Gaussians::fit(&one).is_err());
        let mixed = vec![grid(&mut rng, 2, 2, 3), grid(&mut rng, 2, 3, 3)];
        assert!(Gaussians::fit(&mixed).is_err());
        let mut nan = vec![grid(&mut rng, 2, 2, 3), grid(&mut rng, 2, 2, 3)];
        nan[1].v[4] = f32::NAN;
        assert!(Gaussians::fit(&nan).is_err());
        let g = Gaussians::fit(&[grid(&mut rng, 2, 2, 3), grid(&mut rng, 2, 2, 3)]).unwrap();
        assert!(g.distances(&grid(&mut rng, 2, 2, 4)).is_err());
        let mut broken = g.clone();
        broken.cholesky[0] = -1.0;
        assert!(broken.check().is_err());
        assert!(g.check().is_ok());
    }

    #[test]
    fn channels_are_a_seeded_sorted_subset() {
        let a = choose_channels(448, 100, 7);
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a[99] < 448);
        assert_eq!(a, choose_channels(448, 100, 7));
        assert_ne!(a, choose_channels(448, 100, 8));
        assert_eq!(choose_channels(10, 100, 1), (0..10).collect::<Vec<_>>());
    }
}
