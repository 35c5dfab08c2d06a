//! Sigmoid-gated activations in one pass: `y = x * sigmoid(alpha * x) [* up]`, which is SiLU
//! (`alpha = 1`, the decoders' SwiGLU, times `up`) and quick GELU (`alpha = 1.702`, Qwen2-VL's vision
//! MLP). Why our own: candle runs quick GELU as three passes over the tensor (scale, sigmoid,
//! product), each allocating its output, and SwiGLU as two, all with the C library's scalar `expf`;
//! here one pass with a vectorized exp, split over candle's pool.

use super::Isa;

/// Values per unit of parallel work.
const CHUNK: usize = 16 * 1024;

/// `out[i] = x[i] * sigmoid(alpha * x[i]) * up[i]` (`up` taken as ones when `None`).
pub fn sigmoid_gated(isa: Isa, x: &[f32], alpha: f32, up: Option<&[f32]>, out: &mut [f32]) {
    let n = x.len();
    assert!(out.len() == n && up.is_none_or(|u| u.len() == n));
    let out_ptr = out.as_mut_ptr() as usize;
    super::pool::parallel_for(n.div_ceil(CHUNK), |range| {
        for c in range {
            let span = c * CHUNK..n.min((c + 1) * CHUNK);
            // SAFETY: chunk `c` of `out` is written by this iteration alone.
            let o = unsafe {
                std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(span.start), span.len())
            };
            let u = up.map(|u| &u[span.clone()]);
            chunk(isa, &x[span], alpha, u, o);
        }
    });
}

/// `y[i] = y[i] * sigmoid(alpha * y[i])` on the calling thread: the epilogue of a product, on the
/// few values of one output row it is storing (`kernels::qmatmul::Epilogue`).
pub fn sigmoid_gated_in_place(isa: Isa, alpha: f32, y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `chunk`; the kernel reads each vector of `y` before it writes it back.
        Isa::Avx2 | Isa::Avx512 => unsafe {
            avx2::sigmoid_gated(y.as_ptr(), alpha, None, y.as_mut_ptr(), y.len())
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON; as above for `y`.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe {
            neon::sigmoid_gated(y.as_ptr(), alpha, None, y.as_mut_ptr(), y.len())
        },
        _ => y.iter_mut().for_each(|v| *v = scalar_one(*v, alpha, 1.0)),
    }
}

fn chunk(isa: Isa, x: &[f32], alpha: f32, up: Option<&[f32]>, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` are only handed out when the CPU has AVX2 and FMA;
        // `up` and `out` are as long as `x` (asserted by the callers).
        Isa::Avx2 | Isa::Avx512 => unsafe {
            let up = up.map(|u| u.as_ptr());
            avx2::sigmoid_gated(x.as_ptr(), alpha, up, out.as_mut_ptr(), x.len())
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON; `up` and `out` are as long as `x`.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe {
            let up = up.map(|u| u.as_ptr());
            neon::sigmoid_gated(x.as_ptr(), alpha, up, out.as_mut_ptr(), x.len())
        },
        _ => scalar(x, alpha, up, out),
    }
}

/// The reference, one value at a time with the standard library's exp.
fn scalar(x: &[f32], alpha: f32, up: Option<&[f32]>, out: &mut [f32]) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = scalar_one(v, alpha, up.map_or(1.0, |u| u[i]));
    }
}

fn scalar_one(v: f32, alpha: f32, up: f32) -> f32 {
    v / (1.0 + (-alpha * v).exp()) * up
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use core::arch::x86_64::*;

    use crate::kernels::x86::exp;

    /// `out[i] = x[i] * sigmoid(alpha * x[i]) * up[i]` for `i < n`; `out` may be `x` (each vector
    /// is read before it is written). The caller guarantees `n` values behind every pointer.
    /// `v * sigmoid(alpha v)` of 8 values, given `-alpha` in every lane (also the fused epilogue
    /// of the many-row products, which must give the same values as this pass).
    #[inline(always)]
    pub unsafe fn gated(v: __m256, minus_alpha: __m256) -> __m256 {
        _mm256_div_ps(
            v,
            _mm256_add_ps(_mm256_set1_ps(1.0), exp(_mm256_mul_ps(minus_alpha, v))),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sigmoid_gated(
        x: *const f32,
        alpha: f32,
        up: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        let minus_alpha = _mm256_set1_ps(-alpha);
        let gate = |v: __m256, u: Option<__m256>| {
            let y = gated(v, minus_alpha);
            u.map_or(y, |u| _mm256_mul_ps(y, u))
        };
        let mut i = 0;
        while i + 8 <= n {
            let u = up.map(|u| _mm256_loadu_ps(u.add(i)));
            _mm256_storeu_ps(out.add(i), gate(_mm256_loadu_ps(x.add(i)), u));
            i += 8;
        }
        if i < n {
            // The last values through the same vector formula, padded to a full vector, so that a
            // value's result does not depend on where the span it comes in ends.
            let rest = n - i;
            let (mut xs, mut us, mut ys) = ([0f32; 8], [1f32; 8], [0f32; 8]);
            std::ptr::copy_nonoverlapping(x.add(i), xs.as_mut_ptr(), rest);
            if let Some(u) = up {
                std::ptr::copy_nonoverlapping(u.add(i), us.as_mut_ptr(), rest);
            }
            let u = up.map(|_| _mm256_loadu_ps(us.as_ptr()));
            _mm256_storeu_ps(ys.as_mut_ptr(), gate(_mm256_loadu_ps(xs.as_ptr()), u));
            std::ptr::copy_nonoverlapping(ys.as_ptr(), out.add(i), rest);
        }
    }
}

/// The NEON version of [`avx2`]'s, 4 lanes at a time, the last values padded to a full vector.
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use crate::kernels::neon::exp;

    /// `out[i] = x[i] * sigmoid(alpha * x[i]) * up[i]` for `i < n`; `out` may be `x`. The caller
    /// guarantees `n` values behind every pointer.
    #[target_feature(enable = "neon")]
    pub unsafe fn sigmoid_gated(
        x: *const f32,
        alpha: f32,
        up: Option<*const f32>,
        out: *mut f32,
        n: usize,
    ) {
        let minus_alpha = vdupq_n_f32(-alpha);
        let gate = |v: float32x4_t, u: Option<float32x4_t>| {
            let y = vdivq_f32(
                v,
                vaddq_f32(vdupq_n_f32(1.0), exp(vmulq_f32(minus_alpha, v))),
            );
            u.map_or(y, |u| vmulq_f32(y, u))
        };
        let mut i = 0;
        while i + 4 <= n {
            let u = up.map(|u| vld1q_f32(u.add(i)));
            vst1q_f32(out.add(i), gate(vld1q_f32(x.add(i)), u));
            i += 4;
        }
        if i < n {
            // As on x86: a value's result does not depend on where its span ends.
            let rest = n - i;
            let (mut xs, mut us, mut ys) = ([0f32; 4], [1f32; 4], [0f32; 4]);
            std::ptr::copy_nonoverlapping(x.add(i), xs.as_mut_ptr(), rest);
            if let Some(u) = up {
                std::ptr::copy_nonoverlapping(u.add(i), us.as_mut_ptr(), rest);
            }
            let u = up.map(|_| vld1q_f32(us.as_ptr()));
            vst1q_f32(ys.as_mut_ptr(), gate(vld1q_f32(xs.as_ptr()), u));
            std::ptr::copy_nonoverlapping(ys.as_ptr(), out.add(i), rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place form (a product's epilogue) gives each value exactly what the whole-tensor pass
    /// gives it, whatever span the value comes in.
    #[test]
    fn in_place_spans_equal_the_whole_pass() {
        let x: Vec<f32> = (0..203)
            .map(|i| ((i * 37) % 101) as f32 / 8.0 - 6.0)
            .collect();
        for isa in Isa::available() {
            let mut whole = vec![0f32; x.len()];
            sigmoid_gated(isa, &x, 1.702, None, &mut whole);
            for span in [1, 5, 8, 13, 24, 64, 70] {
                let mut y = x.clone();
                y.chunks_mut(span)
                    .for_each(|part| sigmoid_gated_in_place(isa, 1.702, part));
                assert_eq!(y, whole, "{isa:?}, spans of {span}");
            }
        }
    }

    /// Every path against an f64 evaluation, over values that reach exp's clamps (large negative and
    /// positive inputs), with and without `up`, on a length that is not a multiple of the vector nor
    /// of a chunk.
    #[test]
    fn sigmoid_gated_matches_reference_on_every_path() {
        let n = 2 * CHUNK + 13;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 20001) as f32 / 100.0 - 100.0)
            .collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 4.0 - 2.0).collect();
        for alpha in [1.0f32, 1.702] {
            for u in [None, Some(&up[..])] {
                let want: Vec<f64> = (0..n)
                    .map(|i| {
                        let v = x[i] as f64;
                        v / (1.0 + (-(alpha as f64) * v).exp()) * u.map_or(1.0, |u| u[i] as f64)
                    })
                    .collect();
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; n];
                    sigmoid_gated(isa, &x, alpha, u, &mut got);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()),
                            "{isa:?} alpha {alpha} at {i} (x = {}): {g} vs {w}",
                            x[i]
                        );
                    }
                }
            }
        }
    }
}
