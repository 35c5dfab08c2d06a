//! Layer norm and RMSNorm over the rows of a matrix. Why our own: candle's CPU norms run on rayon's
//! pool, so between two of our products (on candle's pool) a second set of threads wakes and spins
//! on the same cores, and they sum each row one value at a time (a chain of dependent adds). Here the
//! rows are split over candle's pool and summed in vector lanes; the mean and the variance are taken
//! in two passes (`sum (x - mean)^2`, as PyTorch does, not `E[x^2] - mean^2`).

use super::Isa;

/// Which norm, with its per-column weights.
#[derive(Debug, Clone, Copy)]
pub enum Norm<'a> {
    /// `(x - mean) / sqrt(var + eps) * weight + bias`.
    Layer { weight: &'a [f32], bias: &'a [f32] },
    /// `x / sqrt(mean(x^2) + eps) * weight`.
    Rms { weight: &'a [f32] },
}

impl Norm<'_> {
    fn weight(&self) -> &[f32] {
        match self {
            Norm::Layer { weight, .. } | Norm::Rms { weight } => weight,
        }
    }
}

/// Rows per unit of parallel work.
const ROWS: usize = 8;

/// `out` = the norm of each row of `x` (rows of `weight.len()` values), rows spread over candle's pool.
pub fn norm_rows(isa: Isa, x: &[f32], norm: Norm, eps: f32, out: &mut [f32]) {
    let dim = norm.weight().len();
    assert!(dim > 0 && x.len().is_multiple_of(dim) && out.len() == x.len());
    if let Norm::Layer { bias, .. } = norm {
        assert_eq!(bias.len(), dim);
    }
    let rows = x.len() / dim;
    let out_ptr = out.as_mut_ptr() as usize;
    let run = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: row r of `out` is written by this iteration alone.
            let o =
                unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(r * dim), dim) };
            row(isa, &x[r * dim..(r + 1) * dim], norm, eps, o);
        }
    };
    if rows <= ROWS {
        // Decode: one row; not worth waking the pool.
        return run(0..rows);
    }
    super::pool::parallel_for(rows.div_ceil(ROWS), |units| {
        for u in units {
            run(u * ROWS..rows.min((u + 1) * ROWS));
        }
    });
}

fn row(isa: Isa, x: &[f32], norm: Norm, eps: f32, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` are only handed out when the CPU has AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::row(x, norm, eps, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe { neon::row(x, norm, eps, out) },
        _ => scalar(x, norm, eps, out),
    }
}

/// The reference, one value at a time, sums in f64.
fn scalar(x: &[f32], norm: Norm, eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    match norm {
        Norm::Layer { weight, bias } => {
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((x[i] as f64 - mean) * inv * weight[i] as f64 + bias[i] as f64) as f32;
            }
        }
        Norm::Rms { weight } => {
            let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for (i, o) in out.iter_mut().enumerate() {
                *o = (x[i] as f64 * inv * weight[i] as f64) as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::Norm;
    use crate::kernels::x86::hsum256;

    /// `sum f(x_i)` in 4 x 8 lanes, the values past the last full vector added one by one.
    #[inline(always)]
    unsafe fn sum(x: &[f32], f: impl Fn(__m256) -> __m256, f1: impl Fn(f32) -> f32) -> f32 {
        let n = x.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, f(_mm256_loadu_ps(x.as_ptr().add(i + 8 * k))));
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_add_ps(acc[0], f(_mm256_loadu_ps(x.as_ptr().add(i))));
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum256(v) + x[i..].iter().map(|&v| f1(v)).sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row(x: &[f32], norm: Norm, eps: f32, out: &mut [f32]) {
        let n = x.len();
        let (shift, inv, weight, bias) = match norm {
            Norm::Layer { weight, bias } => {
                let mean = sum(x, |v| v, |v| v) / n as f32;
                let m = _mm256_set1_ps(mean);
                let var = sum(
                    x,
                    |v| {
                        let d = _mm256_sub_ps(v, m);
                        _mm256_mul_ps(d, d)
                    },
                    |v| (v - mean) * (v - mean),
                ) / n as f32;
                (mean, 1.0 / (var + eps).sqrt(), weight, Some(bias))
            }
            Norm::Rms { weight } => {
                let ms = sum(x, |v| _mm256_mul_ps(v, v), |v| v * v) / n as f32;
                (0.0, 1.0 / (ms + eps).sqrt(), weight, None)
            }
        };
        let (s, k) = (_mm256_set1_ps(shift), _mm256_set1_ps(inv));
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s), k);
            let w = _mm256_loadu_ps(weight.as_ptr().add(i));
            let y = match bias {
                Some(b) => _mm256_fmadd_ps(v, w, _mm256_loadu_ps(b.as_ptr().add(i))),
                None => _mm256_mul_ps(v, w),
            };
            _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
            i += 8;
        }
        for i in i..n {
            let v = (x[i] - shift) * inv;
            out[i] = match bias {
                Some(b) => v.mul_add(weight[i], b[i]),
                None => v * weight[i],
            };
        }
    }
}

/// The NEON version of [`avx2`]'s: the same two passes, 4 x 4 lanes.
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::Norm;

    /// `sum f(x_i)` in 4 x 4 lanes, the values past the last full vector added one by one.
    #[inline(always)]
    unsafe fn sum(
        x: &[f32],
        f: impl Fn(float32x4_t) -> float32x4_t,
        f1: impl Fn(f32) -> f32,
    ) -> f32 {
        let n = x.len();
        let mut acc = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = vaddq_f32(*a, f(vld1q_f32(x.as_ptr().add(i + 4 * k))));
            }
            i += 16;
        }
        while i + 4 <= n {
            acc[0] = vaddq_f32(acc[0], f(vld1q_f32(x.as_ptr().add(i))));
            i += 4;
        }
        let v = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
        vaddvq_f32(v) + x[i..].iter().map(|&v| f1(v)).sum::<f32>()
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn row(x: &[f32], norm: Norm, eps: f32, out: &mut [f32]) {
        let n = x.len();
        let (shift, inv, weight, bias) = match norm {
            Norm::Layer { weight, bias } => {
                let mean = sum(x, |v| v, |v| v) / n as f32;
                let m = vdupq_n_f32(mean);
                let var = sum(
                    x,
                    |v| {
                        let d = vsubq_f32(v, m);
                        vmulq_f32(d, d)
                    },
                    |v| (v - mean) * (v - mean),
                ) / n as f32;
                (mean, 1.0 / (var + eps).sqrt(), weight, Some(bias))
            }
            Norm::Rms { weight } => {
                let ms = sum(x, |v| vmulq_f32(v, v), |v| v * v) / n as f32;
                (0.0, 1.0 / (ms + eps).sqrt(), weight, None)
            }
        };
        let (s, k) = (vdupq_n_f32(shift), vdupq_n_f32(inv));
        let mut i = 0;
        while i + 4 <= n {
            let v = vmulq_f32(vsubq_f32(vld1q_f32(x.as_ptr().add(i)), s), k);
            let w = vld1q_f32(weight.as_ptr().add(i));
            let y = match bias {
                Some(b) => vfmaq_f32(vld1q_f32(b.as_ptr().add(i)), v, w),
                None => vmulq_f32(v, w),
            };
            vst1q_f32(out.as_mut_ptr().add(i), y);
            i += 4;
        }
        for i in i..n {
            let v = (x[i] - shift) * inv;
            out[i] = match bias {
                Some(b) => v.mul_add(weight[i], b[i]),
                None => v * weight[i],
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path against the f64 reference on odd widths (below, at and past a vector and the
    /// 32-value unroll), rows not a multiple of a unit, with a large offset (where `E[x^2] - mean^2`
    /// in f32 would lose the variance) and a constant row (variance 0: eps alone).
    #[test]
    fn norms_match_reference_on_every_path() {
        for (rows, dim) in [(3, 5), (17, 8), (9, 37), (20, 80), (2, 1283)] {
            let mut x: Vec<f32> = (0..rows * dim)
                .map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0)
                .collect();
            x[..dim].iter_mut().for_each(|v| *v += 1000.0);
            x[dim..2 * dim].fill(2.5);
            let weight: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 / 5.0).collect();
            let bias: Vec<f32> = (0..dim).map(|i| (i % 5) as f32 / 3.0 - 0.6).collect();
            for (name, norm) in [
                (
                    "layer",
                    Norm::Layer {
                        weight: &weight,
                        bias: &bias,
                    },
                ),
                ("rms", Norm::Rms { weight: &weight }),
            ] {
                let mut want = vec![0f32; x.len()];
                for (xr, wr) in x.chunks(dim).zip(want.chunks_mut(dim)) {
                    scalar(xr, norm, 1e-6, wr);
                }
                // The constant row normalizes to exactly the bias (layer) under any summation.
                if let Norm::Layer { bias, .. } = norm {
                    assert_eq!(&want[dim..2 * dim], bias);
                }
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; x.len()];
                    norm_rows(isa, &x, norm, 1e-6, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
                            "{name} {isa:?} {rows}x{dim} at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
