//! Attention kernels.
//!
//! [`decode_attention`]: a few query rows against the KV cache, read where it lies. Why our own: at
//! decode the general path (candle matmul, mask, softmax, matmul) copies the narrowed K and V of
//! every layer and repeats the KV heads for grouped queries, which costs more than the arithmetic.
//! Here the query heads of a KV head read its rows in place together (grouped-query attention needs
//! no copies, and a row read once serves up to three heads), one pass for the scores, one for the
//! weighted sum, with the sums in registers; runs of heads spread over candle's pool. The cache may
//! hold f32 or f16 rows ([`CacheValue`]); f16 rows are widened as they are loaded (F16C).
//!
//! [`segment_attention`]: the vision tower's attention, every patch of an image (or window) against
//! every other, thousands of rows. Why our own: the general path builds blocks of the score matrix
//! as fresh tensors (scale, softmax and the casts each a pass and an allocation over 32 MB; the
//! kernel zeroing fresh pages showed at 7.5% of the profile, libm's `expf` at 7.5%). Here one tile of
//! query rows at a time meets its whole run of keys in a per-thread buffer that is reused (never more
//! than a tile of scores per thread in memory), the two products run in `gemm` (the library behind
//! candle's matmul), the softmax between them is one pass with a vectorized exp, the normalization
//! is applied to the output rows (head dim) instead of the scores (thousands), and the output is
//! written straight in the `(rows, heads, dim)` layout the output projection reads.

use std::cell::RefCell;

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

/// What the KV cache holds, read as f32: `f32`, or `f16` (half the bytes read per token and kept per
/// token; the cache of a quantized decoder, `generate/kv_cache.rs`).
pub trait CacheValue: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// Eight values from `p` as f32 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C, and `p` points to eight readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> core::arch::x86_64::__m256;

    /// Four values from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` points to four readable values (every AArch64 CPU has NEON).
    #[cfg(target_arch = "aarch64")]
    unsafe fn load4(p: *const Self) -> core::arch::aarch64::float32x4_t;
}

impl CacheValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const f32) -> core::arch::x86_64::__m256 {
        core::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const f32) -> core::arch::aarch64::float32x4_t {
        core::arch::aarch64::vld1q_f32(p)
    }
}

impl CacheValue for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const half::f16) -> core::arch::x86_64::__m256 {
        use core::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    /// `fcvtl`, the base AArch64 widening of four halves (Rust's intrinsic for it takes the
    /// `f16` vector type, which is unstable).
    #[cfg(target_arch = "aarch64")]
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load4(p: *const half::f16) -> core::arch::aarch64::float32x4_t {
        use core::arch::aarch64::*;
        let bits = vld1_u16(p.cast());
        let out: float32x4_t;
        core::arch::asm!(
            "fcvtl {out:v}.4s, {bits:v}.4h",
            out = lateout(vreg) out,
            bits = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags)
        );
        out
    }
}

/// Query heads that one work unit of [`decode_attention`] takes through its KV head's rows together.
const HEADS_PER_UNIT: usize = 3;

/// Causal attention of `q` over the first `keys` rows of `k` and `v`: query row `i` of `rows` sees
/// keys `0..keys - rows + i + 1`; scores are scaled by `scale`.
///
/// Work units are a KV head and a run of up to [`HEADS_PER_UNIT`] of its query heads: the run reads
/// each key and value row once for all its heads (grouped-query attention), four keys at a time,
/// with the sums held in registers instead of a horizontal sum per key and an output row loaded and
/// stored per value row.
pub fn decode_attention<T: CacheValue>(
    isa: Isa,
    q: &[f32],
    k: &[T],
    v: &[T],
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
    let per_unit = HEADS_PER_UNIT.min(group);
    let runs = group.div_ceil(per_unit);
    let scratch = || vec![0f32; per_unit * s.keys];
    super::pool::parallel_for_with(s.kv_heads * runs, scratch, |scores, units| {
        for unit in units {
            let (g, run) = (unit / runs, unit % runs);
            let first = g * group + run * per_unit;
            let heads = first..(first + per_unit).min((g + 1) * group);
            let base = g * s.head_stride;
            let kv = (&k[base..], &v[base..], s.row_stride);
            for i in 0..s.rows {
                let visible = s.keys - s.rows + i + 1;
                let at = |h: usize| (h * s.rows + i) * s.dim;
                let qs: Vec<&[f32]> = heads.clone().map(|h| &q[at(h)..][..s.dim]).collect();
                // SAFETY: output rows (h, i) of this unit's heads are written by this unit alone.
                let mut os: Vec<&mut [f32]> = heads
                    .clone()
                    .map(|h| unsafe {
                        std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(at(h)), s.dim)
                    })
                    .collect();
                attend_rows(
                    isa,
                    &qs,
                    kv,
                    scale,
                    &mut scores[..qs.len() * visible],
                    &mut os,
                );
            }
        }
    });
    out
}

/// Query rows per tile of [`segment_attention`]: 32 rows of 4096 scores are 512 KB, one L2's worth.
const TILE: usize = 32;

thread_local! {
    /// Each pool thread's score buffer, kept between calls.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The operands of [`segment_attention`]'s two products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    F32,
    /// Integer operands (8-bit scores, 16-bit weighted sum) where the CPU multiplies them fast
    /// ([`super::attention_int`]: AVX-512 VNNI); f32 elsewhere.
    Int,
}

/// Attention without a mask within runs of rows: `q`, `k`, `v` are `(heads, n, dim)` contiguous,
/// `segments` split the `n` rows into consecutive runs (an image, a window) that attend only within
/// themselves. Returns `(n, heads, dim)`.
#[allow(clippy::too_many_arguments)]
pub fn segment_attention(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    dim: usize,
    segments: &[usize],
    scale: f32,
    products: Products,
) -> Vec<f32> {
    use super::attention_int as int;
    if products == Products::Int && int::available(isa) {
        let src = int::Layout::Split { q, k, v };
        return int::segment_attention(isa, src, heads, dim, segments, scale);
    }
    let n: usize = segments.iter().sum();
    assert!(q.len() == heads * n * dim && k.len() == q.len() && v.len() == q.len());
    // Units of work: (first row of the segment, its length, head, first query row in it).
    let mut units = Vec::new();
    let mut start = 0;
    for &len in segments {
        for h in 0..heads {
            units.extend((0..len).step_by(TILE).map(|t| (start, len, h, t)));
        }
        start += len;
    }
    let mut out = vec![0f32; n * heads * dim];
    let out_ptr = out.as_mut_ptr() as usize;
    let row_stride = heads * dim;
    super::pool::parallel_for(units.len(), |range| {
        SCORES.with_borrow_mut(|buf| {
            for &(s0, len, h, t) in &units[range] {
                let rows = TILE.min(len - t);
                if buf.len() < rows * len {
                    buf.resize(rows * len, 0.0);
                }
                let base = (h * n + s0) * dim;
                let tile = Tile {
                    q: &q[base + t * dim..][..rows * dim],
                    k: &k[base..][..len * dim],
                    v: &v[base..][..len * dim],
                    rows,
                    keys: len,
                    dim,
                };
                // SAFETY: this unit alone writes output rows `s0 + t ..+ rows`, columns of head `h`;
                // the last of them ends inside `out`.
                let o = unsafe {
                    super::StridedRows::new(
                        (out_ptr as *mut f32).add((s0 + t) * row_stride + h * dim),
                        row_stride,
                        dim,
                        rows,
                    )
                };
                tile.run(isa, scale, &mut buf[..rows * len], o);
            }
        })
    });
    out
}

/// One tile of query rows against the keys of its segment.
struct Tile<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    rows: usize,
    keys: usize,
    dim: usize,
}

impl Tile<'_> {
    /// Writes output row `i` to `o.row(i)`; `scores` is `rows x keys` scratch.
    fn run(&self, isa: Isa, scale: f32, scores: &mut [f32], mut o: super::StridedRows) {
        let stride = o.stride();
        let (rows, keys, dim) = (self.rows, self.keys, self.dim);
        if isa == Isa::Scalar {
            for i in 0..rows {
                let oi = o.row(i);
                oi.fill(0.0);
                let kv = (self.k, self.v, dim);
                attend_row(
                    isa,
                    &self.q[i * dim..][..dim],
                    kv,
                    scale,
                    &mut scores[..keys],
                    oi,
                );
            }
            return;
        }
        // SAFETY: the operands hold what each product reads (`rows x dim` queries, `keys x dim` keys
        // and values, `rows x keys` scores, output rows `stride` apart), and nothing else writes them.
        unsafe {
            // scores = scale * q k^T
            gemm::gemm(
                rows,
                keys,
                dim,
                scores.as_mut_ptr(),
                1,
                keys as isize,
                false,
                self.q.as_ptr(),
                1,
                dim as isize,
                self.k.as_ptr(),
                dim as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut sums = [0f32; TILE];
        for (i, sum) in sums[..rows].iter_mut().enumerate() {
            *sum = exp_minus_max(isa, &mut scores[i * keys..][..keys]);
        }
        // SAFETY: as above.
        unsafe {
            // o = p v, then each row divided by its sum of p
            gemm::gemm(
                rows,
                dim,
                keys,
                o.as_mut_ptr(),
                1,
                stride as isize,
                false,
                scores.as_ptr(),
                1,
                keys as isize,
                self.v.as_ptr(),
                1,
                dim as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, sum) in sums[..rows].iter().enumerate() {
            o.row(i).iter_mut().for_each(|x| *x /= sum);
        }
    }
}

/// Query rows `qs` (heads of one KV head) against the first `n = scores.len() / qs.len()` rows of
/// `kv = (k, v, row_stride)`: `os[h] += softmax(scale * qs[h] k^T) v`, with `scores` as scratch
/// (head `h`'s scores at `h * n`). Up to [`HEADS_PER_UNIT`] heads together on AVX2 (dims of 8s),
/// else [`attend_row`] per head.
fn attend_rows<T: CacheValue>(
    isa: Isa,
    qs: &[&[f32]],
    kv: (&[T], &[T], usize),
    scale: f32,
    scores: &mut [f32],
    os: &mut [&mut [f32]],
) {
    let n = scores.len() / qs.len();
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() && qs[0].len().is_multiple_of(8) && qs.len() <= HEADS_PER_UNIT {
        // SAFETY: `avx2()` paths are only handed out when the CPU has AVX2, FMA and F16C; the kernel reads
        // rows `0..n` of `k` and `v` at `j * row_stride` (`dim` values each), inside them as the
        // caller checked.
        unsafe {
            match qs.len() {
                1 => avx2::attend_grouped::<T, 1>(qs, kv, scale, scores, os),
                2 => avx2::attend_grouped::<T, 2>(qs, kv, scale, scores, os),
                _ => avx2::attend_grouped::<T, 3>(qs, kv, scale, scores, os),
            }
        }
        return;
    }
    for ((qh, o), sh) in qs.iter().zip(os.iter_mut()).zip(scores.chunks_exact_mut(n)) {
        attend_row(isa, qh, kv, scale, sh, o);
    }
}

/// One query row `qi` against the first `scores.len()` rows of `kv = (k, v, row_stride)` (row `j` of
/// each at `j * row_stride`): `o += softmax(scale * qi k^T) v`, with `scores` as scratch.
fn attend_row<T: CacheValue>(
    isa: Isa,
    qi: &[f32],
    (k, v, row_stride): (&[T], &[T], usize),
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let dim = qi.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc = dot(isa, qi, &k[j * row_stride..][..dim]) * scale;
    }
    let sum = exp_minus_max(isa, scores);
    for (j, &p) in scores.iter().enumerate() {
        axpy(isa, p / sum, &v[j * row_stride..][..dim], o);
    }
}

/// `s[j] = exp(s[j] - max(s))` in place; returns the sum.
pub(super) fn exp_minus_max(isa: Isa, s: &mut [f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` are only handed out when the CPU has AVX2 and FMA.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::exp_minus_max(s) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe { neon::exp_minus_max(s) },
        _ => {
            let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            s.iter_mut()
                .map(|x| {
                    *x = (*x - max).exp();
                    *x
                })
                .sum()
        }
    }
}

fn dot<T: CacheValue>(isa: Isa, a: &[f32], b: &[T]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` are only handed out when the CPU has AVX2, FMA and
        // F16C.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::dot(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe { neon::dot(a, b) },
        _ => a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum(),
    }
}

/// `o += p * x`.
fn axpy<T: CacheValue>(isa: Isa, p: f32, x: &[T], o: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::axpy(p, x, o) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: every AArch64 CPU has NEON.
        Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => unsafe { neon::axpy(p, x, o) },
        _ => o.iter_mut().zip(x).for_each(|(o, x)| *o += p * x.to_f32()),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::CacheValue;
    use crate::kernels::x86::{exp, hsum256};

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<T: CacheValue>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                T::load8(b.as_ptr().add(i)),
                s0,
            );
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                T::load8(b.as_ptr().add(i + 8)),
                s1,
            );
            i += 16;
        }
        let mut sum = hsum256(_mm256_add_ps(s0, s1));
        for j in i..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_minus_max(s: &mut [f32]) -> f32 {
        let n = s.len();
        let p = s.as_mut_ptr();
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let max = s[i..]
            .iter()
            .chain(&lanes)
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max);
        let (m, mut acc) = (_mm256_set1_ps(max), _mm256_setzero_ps());
        i = 0;
        while i + 8 <= n {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        if i < n {
            // The tail through one masked vector, so it gets the same exp as the rest.
            let mut tail = [f32::NEG_INFINITY; 8];
            tail[..n - i].copy_from_slice(&s[i..]);
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
            _mm256_storeu_ps(tail.as_mut_ptr(), e);
            s[i..].copy_from_slice(&tail[..n - i]);
            tail[n - i..].fill(0.0);
            acc = _mm256_add_ps(acc, _mm256_loadu_ps(tail.as_ptr()));
        }
        hsum256(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy<T: CacheValue>(p: f32, x: &[T], o: &mut [f32]) {
        let n = x.len().min(o.len());
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            let y = _mm256_fmadd_ps(
                pv,
                T::load8(x.as_ptr().add(i)),
                _mm256_loadu_ps(o.as_ptr().add(i)),
            );
            _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
            i += 8;
        }
        for j in i..n {
            o[j] += p * x[j].to_f32();
        }
    }

    /// How many cache rows ahead of the one being read [`prefetch`] asks for.
    const AHEAD: usize = 16;

    /// Asks for the cache lines of `len` values from `p` (a hint: never faults, past an end either).
    #[inline(always)]
    unsafe fn prefetch<T>(p: *const T, len: usize) {
        for line in (0..len * size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(line));
        }
    }

    /// [`super::attend_rows`] for `H` heads: their scores, a softmax per head, the weighted sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_grouped<T: CacheValue, const H: usize>(
        qs: &[&[f32]],
        (k, v, row_stride): (&[T], &[T], usize),
        scale: f32,
        scores: &mut [f32],
        os: &mut [&mut [f32]],
    ) {
        grouped_scores::<T, H>(qs, k, row_stride, scale, scores);
        for sh in scores.chunks_exact_mut(scores.len() / H) {
            let sum = exp_minus_max(sh);
            sh.iter_mut().for_each(|p| *p /= sum);
        }
        grouped_values::<T, H>(scores, v, row_stride, os);
    }

    /// `scores[h * n + j] = scale * qs[h] · k_j` for the `H` heads (`n = scores.len() / H`, row `j`
    /// of `k` at `j * row_stride`; the dim a multiple of 8): four keys at a time, each loaded once
    /// for all heads, the 4 x H sums in registers and reduced four keys to one vector by `hadd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn grouped_scores<T: CacheValue, const H: usize>(
        qs: &[&[f32]],
        k: &[T],
        row_stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let dim = qs[0].len();
        let n = scores.len() / H;
        let q: [*const f32; H] = std::array::from_fn(|h| qs[h].as_ptr());
        let kp = k.as_ptr();
        let sv = _mm_set1_ps(scale);
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [[_mm256_setzero_ps(); 4]; H];
            let rows: [*const T; 4] = std::array::from_fn(|t| kp.add((j + t) * row_stride));
            // The cache is read once per token, mostly from memory: ask for rows well ahead.
            for t in 0..4 {
                prefetch(kp.wrapping_add((j + AHEAD + t) * row_stride), dim);
            }
            for c in (0..dim).step_by(8) {
                let kv: [__m256; 4] = std::array::from_fn(|t| T::load8(rows[t].add(c)));
                for h in 0..H {
                    let qv = _mm256_loadu_ps(q[h].add(c));
                    for t in 0..4 {
                        acc[h][t] = _mm256_fmadd_ps(qv, kv[t], acc[h][t]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                _mm_storeu_ps(scores.as_mut_ptr().add(h * n + j), _mm_mul_ps(s, sv));
            }
            j += 4;
        }
        for j in j..n {
            let row = kp.add(j * row_stride);
            let mut acc = [_mm256_setzero_ps(); H];
            for c in (0..dim).step_by(8) {
                let kv = T::load8(row.add(c));
                for h in 0..H {
                    acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h].add(c)), kv, acc[h]);
                }
            }
            for h in 0..H {
                scores[h * n + j] = hsum256(acc[h]) * scale;
            }
        }
    }

    /// `os[h] += Σ_j p[h * n + j] v_j` for the `H` heads (`n = p.len() / H`): 32 output values of
    /// every head at a time held in registers over all the value rows, each row's piece loaded once.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn grouped_values<T: CacheValue, const H: usize>(
        p: &[f32],
        v: &[T],
        row_stride: usize,
        os: &mut [&mut [f32]],
    ) {
        let dim = os[0].len();
        let mut c = 0;
        while c + 32 <= dim {
            values_piece::<T, H, 4>(p, v, row_stride, c, os);
            c += 32;
        }
        while c < dim {
            values_piece::<T, H, 1>(p, v, row_stride, c, os);
            c += 8;
        }
    }

    /// [`grouped_values`] for output values `c..c + 8 W` of every head.
    #[inline(always)]
    unsafe fn values_piece<T: CacheValue, const H: usize, const W: usize>(
        p: &[f32],
        v: &[T],
        row_stride: usize,
        c: usize,
        os: &mut [&mut [f32]],
    ) {
        let n = p.len() / H;
        let mut acc = [[_mm256_setzero_ps(); W]; H];
        for j in 0..n {
            let row = v.as_ptr().add(j * row_stride + c);
            prefetch(row.wrapping_add(AHEAD * row_stride), 8 * W);
            let vv: [__m256; W] = std::array::from_fn(|t| T::load8(row.add(8 * t)));
            for h in 0..H {
                let ph = _mm256_broadcast_ss(&p[h * n + j]);
                for t in 0..W {
                    acc[h][t] = _mm256_fmadd_ps(ph, vv[t], acc[h][t]);
                }
            }
        }
        for (o, acc) in os.iter_mut().zip(&acc) {
            for (t, a) in acc.iter().enumerate() {
                let o = o.as_mut_ptr().add(c + 8 * t);
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), *a));
            }
        }
    }
}

/// The NEON versions of [`dot`], [`exp_minus_max`] and [`axpy`] (f16 cache rows widened by
/// `fcvtl` as they are loaded); on AArch64 the heads of a group take [`attend_row`] one by one.
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::CacheValue;
    use crate::kernels::neon::exp;

    #[target_feature(enable = "neon")]
    pub unsafe fn dot<T: CacheValue>(a: &[f32], b: &[T]) -> f32 {
        let n = a.len().min(b.len());
        let mut s = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i + 16 <= n {
            for (k, acc) in s.iter_mut().enumerate() {
                let at = i + 4 * k;
                *acc = vfmaq_f32(
                    *acc,
                    vld1q_f32(a.as_ptr().add(at)),
                    T::load4(b.as_ptr().add(at)),
                );
            }
            i += 16;
        }
        while i + 4 <= n {
            s[0] = vfmaq_f32(
                s[0],
                vld1q_f32(a.as_ptr().add(i)),
                T::load4(b.as_ptr().add(i)),
            );
            i += 4;
        }
        let mut sum = vaddvq_f32(vaddq_f32(vaddq_f32(s[0], s[1]), vaddq_f32(s[2], s[3])));
        for j in i..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn exp_minus_max(s: &mut [f32]) -> f32 {
        let n = s.len();
        let p = s.as_mut_ptr();
        let mut mv = vdupq_n_f32(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 4 <= n {
            mv = vmaxq_f32(mv, vld1q_f32(p.add(i)));
            i += 4;
        }
        let max = s[i..].iter().fold(vmaxvq_f32(mv), |m, &x| m.max(x));
        let (m, mut acc) = (vdupq_n_f32(max), vdupq_n_f32(0.0));
        i = 0;
        while i + 4 <= n {
            let e = exp(vsubq_f32(vld1q_f32(p.add(i)), m));
            vst1q_f32(p.add(i), e);
            acc = vaddq_f32(acc, e);
            i += 4;
        }
        if i < n {
            // The tail through one padded vector, so it gets the same exp as the rest.
            let mut tail = [f32::NEG_INFINITY; 4];
            tail[..n - i].copy_from_slice(&s[i..]);
            let e = exp(vsubq_f32(vld1q_f32(tail.as_ptr()), m));
            vst1q_f32(tail.as_mut_ptr(), e);
            s[i..].copy_from_slice(&tail[..n - i]);
            tail[n - i..].fill(0.0);
            acc = vaddq_f32(acc, vld1q_f32(tail.as_ptr()));
        }
        vaddvq_f32(acc)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn axpy<T: CacheValue>(p: f32, x: &[T], o: &mut [f32]) {
        let n = x.len().min(o.len());
        let pv = vdupq_n_f32(p);
        let mut i = 0;
        while i + 4 <= n {
            let y = vfmaq_f32(
                vld1q_f32(o.as_ptr().add(i)),
                pv,
                T::load4(x.as_ptr().add(i)),
            );
            vst1q_f32(o.as_mut_ptr().add(i), y);
            i += 4;
        }
        for j in i..n {
            o[j] += p * x[j].to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    /// Every path against an f64 softmax attention, on odd shapes: head dims that are not a multiple
    /// of 8 or 16, grouped and plain heads, one and several query rows, a strided cache with room
    /// past its length, groups larger than a work unit's run of heads; an f32 and an f16 cache.
    #[test]
    fn decode_attention_matches_reference_on_every_path() {
        for (heads, kv_heads, rows, dim, keys, cap) in [
            (4, 2, 1, 8, 5, 9),
            (6, 1, 3, 19, 40, 64),
            (3, 3, 2, 128, 300, 300),
            (2, 1, 1, 33, 1, 4),
            // Grouped runs of 3 query heads and their remainders, dims of 32s and 8s, keys in
            // fours and not.
            (12, 2, 1, 128, 517, 600),
            (8, 1, 2, 24, 7, 9),
            (5, 1, 1, 40, 3, 3),
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
            let want = reference(&q, &k, &v, shape, scale);
            // An f16 cache: the same kernel on the rounded keys and values.
            let (kh, vh): (Vec<f16>, Vec<f16>) = (
                k.iter().map(|&x| f16::from_f32(x)).collect(),
                v.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let wide = |x: &[f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
            let want_h = reference(&q, &wide(&kh), &wide(&vh), shape, scale);
            assert!(want.iter().zip(&want_h).any(|(a, b)| a != b));
            for isa in Isa::available() {
                let got = decode_attention(isa, &q, &k, &v, shape, scale);
                let got_h = decode_attention(isa, &q, &kh, &vh, shape, scale);
                for (cache, got, want) in [("f32", got, &want), ("f16", got_h, &want_h)] {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "{isa:?} {cache} {heads}/{kv_heads} d{dim} at {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Causal softmax attention in f64 over `Shape`'s strided cache.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> Vec<f64> {
        let Shape {
            heads,
            kv_heads,
            rows,
            dim,
            keys,
            head_stride,
            row_stride,
        } = s;
        let mut want = vec![0f64; q.len()];
        for h in 0..heads {
            let base = (h / (heads / kv_heads)) * head_stride;
            for i in 0..rows {
                let visible = keys - rows + i + 1;
                let qi = &q[(h * rows + i) * dim..][..dim];
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &k[base + j * row_stride..][..dim];
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
                            (sj - m).exp() / z * v[base + j * row_stride + t] as f64;
                    }
                }
            }
        }
        want
    }

    /// Vision attention on every path against an f64 reference: head dims not a multiple of 8,
    /// segments shorter than, equal to and longer than a tile (and not multiples of it), one head
    /// and several; each segment sees only itself.
    #[test]
    fn segment_attention_matches_reference_on_every_path() {
        for (heads, dim, segments) in [
            (1, 8, vec![1]),
            (2, 19, vec![5, 32, 70]),
            (3, 80, vec![33]),
            (2, 40, vec![100, 7]),
        ] {
            let n: usize = segments.iter().sum();
            let r = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
                    .collect()
            };
            let (q, k, v) = (
                r(heads * n * dim, 1),
                r(heads * n * dim, 2),
                r(heads * n * dim, 3),
            );
            let scale = 1.0 / (dim as f32).sqrt();
            let mut want = vec![0f64; n * heads * dim];
            let mut start = 0;
            for &len in &segments {
                for h in 0..heads {
                    let at = |x: &[f32], row: usize| -> Vec<f64> {
                        x[(h * n + row) * dim..][..dim]
                            .iter()
                            .map(|&a| a as f64)
                            .collect()
                    };
                    for i in start..start + len {
                        let qi = at(&q, i);
                        let s: Vec<f64> = (start..start + len)
                            .map(|j| {
                                qi.iter().zip(at(&k, j)).map(|(a, b)| a * b).sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                        for (jj, sj) in s.iter().enumerate() {
                            for (t, vt) in at(&v, start + jj).iter().enumerate() {
                                want[(i * heads + h) * dim + t] += (sj - m).exp() / z * vt;
                            }
                        }
                    }
                }
                start += len;
            }
            for isa in Isa::available() {
                let got =
                    segment_attention(isa, &q, &k, &v, heads, dim, &segments, scale, Products::F32);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 2e-5 * (1.0 + w.abs()),
                        "{isa:?} h{heads} d{dim} {segments:?} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The vectorized exp against the standard library's over the range softmax uses, and a row
    /// whose length is not a multiple of the vector.
    #[test]
    fn exp_minus_max_matches_the_standard_exp() {
        let row: Vec<f32> = (0..1003).map(|i| -(i as f32) * 0.0871 + 3.0).collect();
        let mut want = row.clone();
        let want_sum = exp_minus_max(Isa::Scalar, &mut want);
        for isa in Isa::available() {
            let mut got = row.clone();
            let sum = exp_minus_max(isa, &mut got);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 3e-7 * w.max(1e-30), "{isa:?}: {g} vs {w}");
            }
            assert!(
                (sum - want_sum).abs() <= 1e-5 * want_sum,
                "{isa:?}: {sum} vs {want_sum}"
            );
        }
    }
}
