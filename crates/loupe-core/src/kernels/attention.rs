//! Decode attention: a few query rows against the KV cache, read where it lies.
//!
//! Why our own: at decode the general path (candle matmul, mask, softmax, matmul) copies the narrowed
//! K and V of every layer and repeats the KV heads for grouped queries, which costs more than the
//! arithmetic. Here each query head reads its KV head's rows in place (grouped-query attention needs
//! no copies), one pass for the scores, one for the weighted sum, heads spread over candle's pool.

use super::Isa;

/// Where the operands lie: `q` and the output are `(heads, rows, dim)` contiguous; row `j` of KV head
/// `g` starts at `g * head_stride + j * row_stride` in `k` and in `v`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub rows: usize,
    pub dim: usize,
    /// Keys visible to the last query row (the cache length).
    pub keys: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

/// Causal attention of `q` over the first `keys` rows of `k` and `v`: query row `i` of `rows` sees
/// keys `0..keys - rows + i + 1`; scores are scaled by `scale`.
pub fn decode_attention(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: Shape,
    scale: f32,
) -> Vec<f32> {
    let group = s.heads / s.kv_heads.max(1);
    assert!(
        s.heads == group * s.kv_heads && s.rows <= s.keys && q.len() == s.heads * s.rows * s.dim
    );
    let last = (s.kv_heads - 1) * s.head_stride + (s.keys - 1) * s.row_stride + s.dim;
    assert!(k.len() >= last && v.len() >= last);
    let mut out = vec![0f32; q.len()];
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(s.heads, |heads| {
        let mut scores = vec![0f32; s.keys];
        for h in heads {
            let base = (h / group) * s.head_stride;
            for i in 0..s.rows {
                let visible = s.keys - s.rows + i + 1;
                let qi = &q[(h * s.rows + i) * s.dim..][..s.dim];
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores[..visible].iter_mut().enumerate() {
                    *sc = dot(isa, qi, &k[base + j * s.row_stride..][..s.dim]) * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in &mut scores[..visible] {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                // SAFETY: output row (h, i) is written by this head's iteration alone.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_ptr as *mut f32).add((h * s.rows + i) * s.dim),
                        s.dim,
                    )
                };
                for (j, &p) in scores[..visible].iter().enumerate() {
                    axpy(isa, p / sum, &v[base + j * s.row_stride..][..s.dim], o);
                }
            }
        }
    });
    out
}

fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only handed out when the CPU has AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2::dot(a, b) },
        _ => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// `o += p * x`.
fn axpy(isa: Isa, p: f32, x: &[f32], o: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        Isa::Avx2 => unsafe { avx2::axpy(p, x, o) },
        _ => o.iter_mut().zip(x).for_each(|(o, x)| *o += p * x),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use crate::kernels::x86::hsum256;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let mut sum = hsum256(_mm256_add_ps(s0, s1));
        for j in i..n {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(p: f32, x: &[f32], o: &mut [f32]) {
        let n = x.len().min(o.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            let y = _mm256_fmadd_ps(
                pv,
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_loadu_ps(o.as_ptr().add(i)),
            );
            _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
            i += 8;
        }
        for j in i..n {
            o[j] += p * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path against an f64 softmax attention, on odd shapes: head dims that are not a multiple
    /// of 8 or 16, grouped and plain heads, one and several query rows, a strided cache with room
    /// past its length.
    #[test]
    fn decode_attention_matches_reference_on_every_path() {
        for (heads, kv_heads, rows, dim, keys, cap) in [
            (4, 2, 1, 8, 5, 9),
            (6, 1, 3, 19, 40, 64),
            (3, 3, 2, 128, 300, 300),
            (2, 1, 1, 33, 1, 4),
        ] {
            let r = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
                    .collect()
            };
            let q = r(heads * rows * dim, 1);
            let (k, v) = (r(kv_heads * cap * dim, 2), r(kv_heads * cap * dim, 3));
            let shape = Shape {
                heads,
                kv_heads,
                rows,
                dim,
                keys,
                head_stride: cap * dim,
                row_stride: dim,
            };
            let scale = 1.0 / (dim as f32).sqrt();
            let mut want = vec![0f64; q.len()];
            for h in 0..heads {
                let base = (h / (heads / kv_heads)) * cap * dim;
                for i in 0..rows {
                    let visible = keys - rows + i + 1;
                    let qi = &q[(h * rows + i) * dim..][..dim];
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            let kj = &k[base + j * dim..][..dim];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (j, sj) in s.iter().enumerate() {
                        for t in 0..dim {
                            want[(h * rows + i) * dim + t] +=
                                (sj - m).exp() / z * v[base + j * dim + t] as f64;
                        }
                    }
                }
            }
            for isa in Isa::available() {
                let got = decode_attention(isa, &q, &k, &v, shape, scale);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "{isa:?} {heads}/{kv_heads} d{dim} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
