//! The variation model (the golden template every plant knows): good images aligned to a reference,
//! per-pixel mean and spread, and the deviation of a new image from them in spreads.
//!
//! Alignment is rotation and translation: the rotation by a search over `-max_rotation..=max_rotation`
//! degrees in steps of [`ANGLE_STEP`] (each candidate rotated about the image centre), the translation
//! by phase correlation (the peak of the normalised cross-power spectrum; FFTs from `rustfft`), the
//! candidate with the highest correlation peak kept. Images are compared in gray (Rec. 601 luma) at
//! the model's size. Pixels that alignment brought in from outside the image are not scored.

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use loupe_core::image::{resize_rgb, Filter, RgbImage};

/// Degrees between rotation candidates.
pub const ANGLE_STEP: f32 = 0.5;
/// The least spread a pixel is given, in gray levels of 0..1: a pixel that never varied on the good
/// images would otherwise flag any noise.
pub const MIN_SPREAD: f32 = 0.02;

/// A gray image `w x h`, values 0..1, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub w: usize,
    pub h: usize,
    pub v: Vec<f32>,
}

impl Gray {
    /// `img` resized (bilinear) to `w x h` and turned gray.
    pub fn from_rgb(img: &RgbImage, w: usize, h: usize) -> Gray {
        let px = resize_rgb(&img.data, img.width, img.height, w, h, Filter::Bilinear);
        let v = px
            .chunks_exact(3)
            .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0)
            .collect();
        Gray { w, h, v }
    }
}

/// A rotation about the image centre followed by a translation: where a source pixel lands.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Motion {
    pub degrees: f32,
    pub dx: f32,
    pub dy: f32,
}

impl Motion {
    /// `dst(x, y) = src(m(x, y))`: the source point each destination pixel reads (the inverse).
    fn source_of(self, w: usize, h: usize) -> impl Fn(f32, f32) -> (f32, f32) {
        let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
        let (s, c) = self.degrees.to_radians().sin_cos();
        move |x, y| {
            let (u, v) = (x - cx - self.dx, y - cy - self.dy);
            (c * u + s * v + cx, -s * u + c * v + cy)
        }
    }

    /// The motion that undoes this one.
    pub fn inverse(self) -> Motion {
        let (s, c) = (-self.degrees).to_radians().sin_cos();
        Motion {
            degrees: -self.degrees,
            dx: -(c * self.dx - s * self.dy),
            dy: -(s * self.dx + c * self.dy),
        }
    }
}

/// `g` moved by `m` (bilinear), and whether each pixel came from inside `g`.
pub fn warp(g: &Gray, m: Motion) -> (Gray, Vec<bool>) {
    let src = m.source_of(g.w, g.h);
    let mut v = vec![0f32; g.w * g.h];
    let mut inside = vec![false; g.w * g.h];
    for y in 0..g.h {
        for x in 0..g.w {
            let (sx, sy) = src(x as f32, y as f32);
            if sx < -0.5 || sy < -0.5 || sx > g.w as f32 - 0.5 || sy > g.h as f32 - 0.5 {
                continue;
            }
            let (sx, sy) = (
                sx.clamp(0.0, (g.w - 1) as f32),
                sy.clamp(0.0, (g.h - 1) as f32),
            );
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(g.w - 1), (y0 + 1).min(g.h - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize| g.v[yy * g.w + xx];
            let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
            let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
            v[y * g.w + x] = top * (1.0 - fy) + bottom * fy;
            inside[y * g.w + x] = true;
        }
    }
    (Gray { w: g.w, h: g.h, v }, inside)
}

/// 2D FFTs of one size, planned once.
#[derive(Clone)]
pub struct Fft2 {
    w: usize,
    h: usize,
    rows: std::sync::Arc<dyn rustfft::Fft<f32>>,
    cols: std::sync::Arc<dyn rustfft::Fft<f32>>,
    rows_inv: std::sync::Arc<dyn rustfft::Fft<f32>>,
    cols_inv: std::sync::Arc<dyn rustfft::Fft<f32>>,
    window: Vec<f32>,
}

impl Fft2 {
    pub fn new(w: usize, h: usize) -> Fft2 {
        let mut p = FftPlanner::new();
        let hann = |i: usize, n: usize| {
            0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / (n.max(2) - 1) as f32).cos()
        };
        let window = (0..h)
            .flat_map(|y| (0..w).map(move |x| hann(x, w) * hann(y, h)))
            .collect();
        Fft2 {
            w,
            h,
            rows: p.plan_fft_forward(w),
            cols: p.plan_fft_forward(h),
            rows_inv: p.plan_fft_inverse(w),
            cols_inv: p.plan_fft_inverse(h),
            window,
        }
    }

    fn transform(&self, data: &mut [Complex<f32>], inverse: bool) {
        let (rows, cols) = if inverse {
            (&self.rows_inv, &self.cols_inv)
        } else {
            (&self.rows, &self.cols)
        };
        for row in data.chunks_exact_mut(self.w) {
            rows.process(row);
        }
        let mut col = vec![Complex::default(); self.h];
        for x in 0..self.w {
            for y in 0..self.h {
                col[y] = data[y * self.w + x];
            }
            cols.process(&mut col);
            for y in 0..self.h {
                data[y * self.w + x] = col[y];
            }
        }
    }

    /// The spectrum of `g`, its mean taken out and a Hann window applied (so the image border is no
    /// edge).
    pub fn spectrum(&self, g: &Gray) -> Vec<Complex<f32>> {
        let mean = g.v.iter().sum::<f32>() / g.v.len().max(1) as f32;
        let mut d: Vec<Complex<f32>> =
            g.v.iter()
                .zip(&self.window)
                .map(|(&v, &wv)| Complex::new((v - mean) * wv, 0.0))
                .collect();
        self.transform(&mut d, false);
        d
    }

    /// The shift `(dx, dy)` that moves `moving` onto the image of spectrum `reference`, and the height
    /// of the correlation peak (1 for a pure shift).
    pub fn phase_correlate(&self, reference: &[Complex<f32>], moving: &Gray) -> (f32, f32, f32) {
        let m = self.spectrum(moving);
        let mut r: Vec<Complex<f32>> = reference
            .iter()
            .zip(&m)
            .map(|(a, b)| {
                let c = a * b.conj();
                let n = c.norm();
                if n > 1e-12 {
                    c / n
                } else {
                    Complex::default()
                }
            })
            .collect();
        self.transform(&mut r, true);
        let (mut best, mut at) = (f32::MIN, 0);
        for (i, c) in r.iter().enumerate() {
            if c.re > best {
                best = c.re;
                at = i;
            }
        }
        let (x, y) = (at % self.w, at / self.w);
        let wrap = |v: usize, n: usize| {
            if v > n / 2 {
                v as f32 - n as f32
            } else {
                v as f32
            }
        };
        let peak = best / (self.w * self.h) as f32;
        (wrap(x, self.w), wrap(y, self.h), peak)
    }
}

/// The motion that brings `g` onto the reference (its spectrum): the rotation candidate with the
/// highest phase-correlation peak, and that candidate's shift.
pub fn align(fft: &Fft2, reference: &[Complex<f32>], g: &Gray, max_rotation: f32) -> Motion {
    let steps = (max_rotation / ANGLE_STEP).round().max(0.0) as i32;
    let mut best = (f32::MIN, Motion::default());
    for k in -steps..=steps {
        let degrees = k as f32 * ANGLE_STEP;
        let rotated = if k == 0 {
            g.clone()
        } else {
            warp(
                g,
                Motion {
                    degrees,
                    ..Default::default()
                },
            )
            .0
        };
        let (dx, dy, peak) = fft.phase_correlate(reference, &rotated);
        if peak > best.0 {
            best = (peak, Motion { degrees, dx, dy });
        }
    }
    best.1
}

/// The learned template: per-pixel mean and spread of the aligned good images, and what aligning to
/// the mean needs (its FFT plan and spectrum, made once rather than per scored image).
#[derive(Clone)]
pub struct VariationModel {
    pub mean: Gray,
    pub spread: Vec<f32>,
    pub max_rotation: f32,
    fft: Fft2,
    mean_spectrum: Vec<Complex<f32>>,
}

impl VariationModel {
    pub fn new(mean: Gray, spread: Vec<f32>, max_rotation: f32) -> VariationModel {
        let fft = Fft2::new(mean.w, mean.h);
        let mean_spectrum = fft.spectrum(&mean);
        VariationModel {
            mean,
            spread,
            max_rotation,
            fft,
            mean_spectrum,
        }
    }

    /// Learns from good images (at least 2): each aligned to the first, the mean taken, then each
    /// aligned again to that mean; the mean and spread (standard deviation, at least [`MIN_SPREAD`])
    /// of the second alignment. Pixels outside an aligned image do not count for it.
    pub fn learn(
        goods: &[Gray],
        max_rotation: f32,
        mut progress: impl FnMut(),
    ) -> Option<VariationModel> {
        let first = goods.first()?;
        if goods.len() < 2 || goods.iter().any(|g| (g.w, g.h) != (first.w, first.h)) {
            return None;
        }
        let fft = Fft2::new(first.w, first.h);
        let mut reference = first.clone();
        let mut stats = (
            vec![0f64; first.v.len()],
            vec![0f64; first.v.len()],
            vec![0u32; first.v.len()],
        );
        for pass in 0..2 {
            let spec = fft.spectrum(&reference);
            stats = (
                vec![0f64; first.v.len()],
                vec![0f64; first.v.len()],
                vec![0u32; first.v.len()],
            );
            for g in goods {
                let (aligned, inside) = warp(g, align(&fft, &spec, g, max_rotation));
                for (i, (&v, _)) in aligned
                    .v
                    .iter()
                    .zip(&inside)
                    .enumerate()
                    .filter(|(_, (_, &ok))| ok)
                {
                    let v = v as f64;
                    stats.0[i] += v;
                    stats.1[i] += v * v;
                    stats.2[i] += 1;
                }
                if pass == 1 {
                    progress();
                }
            }
            reference = Gray {
                w: first.w,
                h: first.h,
                v: (0..first.v.len())
                    .map(|i| {
                        if stats.2[i] > 0 {
                            (stats.0[i] / stats.2[i] as f64) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            };
        }
        let spread = (0..first.v.len())
            .map(|i| {
                let n = stats.2[i].max(1) as f64;
                let mean = stats.0[i] / n;
                let var = (stats.1[i] / n - mean * mean).max(0.0);
                (var.sqrt() as f32).max(MIN_SPREAD)
            })
            .collect();
        Some(VariationModel::new(reference, spread, max_rotation))
    }

    /// The deviation of `g` in spreads, per pixel, in `g`'s own frame (so boxes land on the image),
    /// smoothed over 3x3; 0 where the aligned image had no pixel.
    pub fn deviation(&self, g: &Gray) -> Gray {
        let m = align(&self.fft, &self.mean_spectrum, g, self.max_rotation);
        let (aligned, inside) = warp(g, m);
        let z: Vec<f32> = (0..aligned.v.len())
            .map(|i| {
                if inside[i] {
                    (aligned.v[i] - self.mean.v[i]).abs() / self.spread[i]
                } else {
                    0.0
                }
            })
            .collect();
        let z = box3(&Gray {
            w: g.w,
            h: g.h,
            v: z,
        });
        warp(&z, m.inverse()).0
    }
}

/// The 3x3 mean (edges over the pixels present).
pub fn box3(g: &Gray) -> Gray {
    let mut v = vec![0f32; g.v.len()];
    for y in 0..g.h {
        for x in 0..g.w {
            let (mut s, mut n) = (0f32, 0f32);
            for yy in y.saturating_sub(1)..(y + 2).min(g.h) {
                for xx in x.saturating_sub(1)..(x + 2).min(g.w) {
                    s += g.v[yy * g.w + xx];
                    n += 1.0;
                }
            }
            v[y * g.w + x] = s / n;
        }
    }
    Gray { w: g.w, h: g.h, v }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part: a bright disc with a notch and two holes on a dark background, moved by `m`.
    pub fn part(w: usize, h: usize, m: Motion) -> Gray {
        let base = Gray {
            w,
            h,
            v: (0..w * h)
                .map(|i| {
                    let (x, y) = (
                        (i % w) as f32 - w as f32 / 2.0,
                        (i / w) as f32 - h as f32 / 2.0,
                    );
                    let r = (x * x + y * y).sqrt();
                    let hole =
                        |hx: f32, hy: f32| ((x - hx).powi(2) + (y - hy).powi(2)).sqrt() < 5.0;
                    let notch = x > 10.0 && y.abs() < 3.0;
                    let cut = hole(-12.0, -8.0) || hole(14.0, 6.0) || notch;
                    if r < 0.38 * w as f32 && !cut {
                        0.8
                    } else {
                        0.15
                    }
                })
                .collect(),
        };
        warp(&base, m).0
    }

    #[test]
    fn phase_correlation_finds_the_shift_and_the_rotation() {
        let (w, h) = (96, 80);
        let reference = part(w, h, Motion::default());
        let fft = Fft2::new(w, h);
        let spec = fft.spectrum(&reference);
        let moved = part(
            w,
            h,
            Motion {
                degrees: 3.0,
                dx: 5.0,
                dy: -4.0,
            },
        );
        let m = align(&fft, &spec, &moved, 5.0);
        assert!((m.degrees + 3.0).abs() <= ANGLE_STEP, "{m:?}");
        let (back, inside) = warp(&moved, m);
        let err: f32 = back
            .v
            .iter()
            .zip(&reference.v)
            .zip(&inside)
            .filter(|(_, &i)| i)
            .map(|((a, b), _)| (a - b).abs())
            .sum::<f32>()
            / inside.iter().filter(|&&i| i).count() as f32;
        assert!(err < 0.03, "mean error after alignment {err} ({m:?})");
    }

    #[test]
    fn motion_inverse_undoes_it() {
        let m = Motion {
            degrees: 7.0,
            dx: 3.0,
            dy: -2.0,
        };
        let g = part(64, 64, Motion::default());
        let (there, _) = warp(&g, m);
        let (back, inside) = warp(&there, m.inverse());
        let err: f32 = back
            .v
            .iter()
            .zip(&g.v)
            .zip(&inside)
            .filter(|(_, &i)| i)
            .map(|((a, b), _)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 0.7, "{err}");
        let mean: f32 = back
            .v
            .iter()
            .zip(&g.v)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / g.v.len() as f32;
        assert!(mean < 0.03, "{mean}");
    }
}
