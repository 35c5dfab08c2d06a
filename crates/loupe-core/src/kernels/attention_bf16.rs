//! The vision tower's attention with bf16 operands and f32 sums: AVX-512 BF16's `vdpbf16ps`
//! multiplies two pairs of bf16 values and adds both products into each f32 lane in one instruction,
//! twice the work of an f32 FMA. Why our own: the f32 products of [`super::attention`] were 15-20%
//! of a 448² encode once the linear layers ran in VNNI; `gemm` has no bf16 kernels on x86.
//!
//! Where the values are rounded to bf16 (the scalar reference [`reference`] rounds at the same
//! points): the queries once scaled, the keys, the values, and the softmax weights `p` before they
//! meet the values. Scores, the softmax, the row sums of `p` and every sum of products stay f32.
//! The models ask for it only where the projections feeding attention are already quantized, whose
//! error is far above bf16's 8-bit mantissa (`docs/quantization.md`).
//!
//! Layouts (bf16 bits as `u16`, for one segment and head; `keys` padded with zero rows to a multiple
//! of 16, `dim` with zero columns to even for the pairs and to a multiple of 16 for the values):
//! - keys: blocks of 16 keys, `[block][pair of dims][key 16][2]`, so one 64-byte load gives 16 keys'
//!   values of dims `2p, 2p + 1` and a broadcast query pair meets all of them;
//! - values: `[pair of keys][dim][2]`, so one load gives 16 dims of two consecutive keys and a
//!   broadcast pair of softmax weights meets all of them;
//! - queries and softmax weights: rows of bf16 as they are, read as 4-byte pairs.

use std::cell::RefCell;

use half::bf16;

use super::Isa;

/// Query rows per unit of work (as the f32 path's tile).
const TILE: usize = 32;
/// Query rows per kernel call.
const R: usize = 4;
/// Key blocks (of 16) per score-kernel call.
const JB: usize = 4;

/// Whether the CPU behind `isa` has AVX-512 BF16 (`vdpbf16ps`).
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

fn round(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

fn value(b: u16) -> f32 {
    bf16::from_bits(b).to_f32()
}

/// One segment and head's queries, keys and values, packed.
#[derive(Default)]
struct Packed {
    /// `(d.keys, 2 * d.pairs)`: the queries times the scale, zero rows and columns as padding.
    queries: Vec<u16>,
    keys: Vec<u16>,
    values: Vec<u16>,
}

/// The padded sizes of a segment of `len` keys with head dim `dim`.
#[derive(Clone, Copy)]
struct Dims {
    len: usize,
    dim: usize,
    /// Keys (and query rows) padded to a multiple of 16.
    keys: usize,
    /// Pairs of dims (the score product's depth).
    pairs: usize,
    /// Dims padded to a multiple of 16 (the value product's width).
    dpad: usize,
}

impl Dims {
    fn new(len: usize, dim: usize) -> Self {
        Dims {
            len,
            dim,
            keys: len.div_ceil(16) * 16,
            pairs: dim.div_ceil(2),
            dpad: dim.div_ceil(16) * 16,
        }
    }
}

/// Where the attention's operands lie.
#[derive(Clone, Copy)]
pub enum Layout<'a> {
    /// `q`, `k`, `v` each `(heads, n, dim)` contiguous, rotary already applied.
    Split {
        q: &'a [f32],
        k: &'a [f32],
        v: &'a [f32],
    },
    /// The fused projection's output `(n, 3, heads, dim)` as it comes out of the product, with the
    /// rotate-half rotary still to apply to q and k: `cos`, `sin` are `(n, dim / 2)`. Packing reads
    /// it in place, so no copy of q, k or v is made for the heads' layout or for the rotary.
    Fused {
        qkv: &'a [f32],
        cos: &'a [f32],
        sin: &'a [f32],
    },
}

impl Layout<'_> {
    /// Row `j` of head `h` of q (`which` 0), k (1) or v (2), of `n` rows in all.
    fn row(
        &self,
        which: usize,
        h: usize,
        j: usize,
        (n, heads, dim): (usize, usize, usize),
    ) -> &[f32] {
        match *self {
            Layout::Split { q, k, v } => &[q, k, v][which][(h * n + j) * dim..][..dim],
            Layout::Fused { qkv, .. } => &qkv[((j * 3 + which) * heads + h) * dim..][..dim],
        }
    }

    /// Row `j`'s `which` operand of head `h` into `out` (`dim` values), rotated where still due.
    fn load(
        &self,
        which: usize,
        h: usize,
        j: usize,
        shape: (usize, usize, usize),
        out: &mut [f32],
    ) {
        let x = self.row(which, h, j, shape);
        match *self {
            Layout::Fused { cos, sin, .. } if which < 2 => {
                let half = x.len() / 2;
                let (c, s) = (&cos[j * half..][..half], &sin[j * half..][..half]);
                for t in 0..half {
                    out[t] = x[t] * c[t] - x[t + half] * s[t];
                    out[t + half] = x[t] * s[t] + x[t + half] * c[t];
                }
            }
            _ => out.copy_from_slice(x),
        }
    }
}

/// How many rows ahead [`pack`] asks for its operands.
const AHEAD: usize = 4;

/// Packs rows `start..start + d.len` of head `h`.
fn pack(
    src: &Layout,
    h: usize,
    start: usize,
    shape: (usize, usize, usize),
    d: Dims,
    scale: f32,
) -> Packed {
    let qw = 2 * d.pairs;
    let mut queries = vec![0u16; d.keys * qw];
    let mut keys = vec![0u16; d.keys * qw];
    let mut values = vec![0u16; d.keys * d.dpad];
    let (mut row, mut words) = (vec![0f32; qw], vec![0u16; qw]);
    for j in 0..d.len {
        // The rows lie a whole token's q, k and v of every head apart (the fused layout): each
        // read would wait on memory without a request made a few rows ahead.
        if j + AHEAD < d.len {
            for which in 0..3 {
                let x = src.row(which, h, start + j + AHEAD, shape);
                super::prefetch(x.as_ptr(), x.len());
            }
        }
        src.load(0, h, start + j, shape, &mut row[..d.dim]);
        row[..d.dim].iter_mut().for_each(|r| *r *= scale);
        to_bf16(&row, &mut queries[j * qw..][..qw]);
        src.load(1, h, start + j, shape, &mut row[..d.dim]);
        to_bf16(&row, &mut words);
        let (blk, lane) = (j / 16, j % 16);
        for p in 0..d.pairs {
            let dst = ((blk * d.pairs + p) * 16 + lane) * 2;
            keys[dst..dst + 2].copy_from_slice(&words[2 * p..2 * p + 2]);
        }
        src.load(2, h, start + j, shape, &mut row[..d.dim]);
        to_bf16(&row[..d.dim], &mut words[..d.dim]);
        for (t, &w) in words[..d.dim].iter().enumerate() {
            values[((j / 2) * d.dpad + t) * 2 + j % 2] = w;
        }
    }
    Packed {
        queries,
        keys,
        values,
    }
}

thread_local! {
    /// Each pool thread's scratch (scores, softmax weights, output rows), kept between calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<u16>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// [`super::segment_attention`] with bf16 operands, on a CPU where [`available`] says yes, from
/// operands laid out as `src` says. Returns `(n, heads, dim)`.
pub fn segment_attention(
    isa: Isa,
    src: Layout,
    heads: usize,
    dim: usize,
    segments: &[usize],
    scale: f32,
) -> Vec<f32> {
    assert!(available(isa));
    let n: usize = segments.iter().sum();
    match src {
        Layout::Split { q, k, v } => {
            assert!(q.len() == heads * n * dim && k.len() == q.len() && v.len() == q.len())
        }
        Layout::Fused { qkv, cos, sin } => assert!(
            dim.is_multiple_of(2)
                && qkv.len() == n * 3 * heads * dim
                && cos.len() == n * dim / 2
                && sin.len() == cos.len()
        ),
    }
    let starts: Vec<usize> = segments
        .iter()
        .scan(0, |s, &len| {
            *s += len;
            Some(*s - len)
        })
        .collect();
    // Pack every (segment, head) once, in parallel; every query tile of it reads the same copy.
    let pairs: Vec<(usize, usize)> = (0..segments.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    let mut packed: Vec<Packed> = (0..pairs.len()).map(|_| Packed::default()).collect();
    let packed_ptr = packed.as_mut_ptr() as usize;
    super::pool::parallel_for(pairs.len(), |range| {
        for u in range {
            let (s, h) = pairs[u];
            let d = Dims::new(segments[s], dim);
            let p = pack(&src, h, starts[s], (n, heads, dim), d, scale);
            // SAFETY: slot `u` is written by this iteration alone.
            unsafe { *(packed_ptr as *mut Packed).add(u) = p };
        }
    });
    let mut units = Vec::new();
    for (u, &(s, _)) in pairs.iter().enumerate() {
        units.extend((0..segments[s]).step_by(TILE).map(|t| (u, t)));
    }
    let mut out = vec![0f32; n * heads * dim];
    let out_ptr = out.as_mut_ptr() as usize;
    let row_stride = heads * dim;
    super::pool::parallel_for(units.len(), |range| {
        SCRATCH.with_borrow_mut(|scratch| {
            for &(u, t) in &units[range] {
                let (s, h) = pairs[u];
                let kv = &packed[u];
                let d = Dims::new(segments[s], dim);
                let rows = TILE.min(d.len - t);
                // SAFETY: this unit alone writes output rows `start + t ..+ rows`, columns of head
                // `h`; the last of them ends inside `out`.
                let o = unsafe {
                    super::StridedRows::new(
                        (out_ptr as *mut f32).add((starts[s] + t) * row_stride + h * dim),
                        row_stride,
                        dim,
                        rows,
                    )
                };
                tile(kv, d, t..t + rows, scratch, o);
            }
        })
    });
    out
}

/// Query rows `span` of one packed segment and head against all its keys; output row `i` of the span
/// goes to `o[i * stride..][..dim]`.
fn tile(
    kv: &Packed,
    d: Dims,
    span: std::ops::Range<usize>,
    (scores, ps, os): &mut (Vec<f32>, Vec<u16>, Vec<f32>),
    mut o: super::StridedRows,
) {
    let rows = span.len();
    // Padded query rows (zero, inside the packed queries) run through the kernels too; their
    // results are never read, so the buffers are only grown, not cleared.
    let padded = rows.div_ceil(R) * R;
    if ps.len() < padded * d.keys {
        ps.resize(padded * d.keys, 0);
    }
    for (buf, len) in [(&mut *scores, padded * d.keys), (&mut *os, padded * d.dpad)] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    }
    let qs = &kv.queries[span.start * 2 * d.pairs..][..padded * 2 * d.pairs];
    // SAFETY: `available` said the CPU has AVX-512 F and BF16 (checked by `segment_attention`); the
    // buffers hold `padded` rows of what each product reads and writes.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::scores(qs, &kv.keys, d, padded, scores)
    };
    let mut sums = [0f32; TILE];
    for i in 0..rows {
        let row = &mut scores[i * d.keys..][..d.len];
        let p = &mut ps[i * d.keys..][..d.keys];
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        {
            sums[i] = unsafe { x86::softmax_weights(row, p) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            sums[i] = super::attention::exp_minus_max(Isa::Scalar, row);
            to_bf16(row, &mut p[..d.len]);
            p[d.len..].fill(0);
        }
    }
    // SAFETY: as above.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::weighted(ps, &kv.values, d, padded, os)
    };
    for i in 0..rows {
        let inv = 1.0 / sums[i];
        for (x, &y) in o.row(i).iter_mut().zip(&os[i * d.dpad..]) {
            *x = y * inv;
        }
    }
}

fn to_bf16(src: &[f32], dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only reached where `available` said the CPU has AVX-512 BF16.
    unsafe {
        x86::to_bf16(src, dst)
    };
    #[cfg(not(target_arch = "x86_64"))]
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = round(s));
}

/// The reference: the same rounding points, one value at a time, f32 sums in plain order.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    dim: usize,
    segments: &[usize],
    scale: f32,
) -> Vec<f32> {
    let n: usize = segments.iter().sum();
    let r = |x: f32| value(round(x));
    let mut out = vec![0f32; n * heads * dim];
    let mut start = 0;
    for &len in segments {
        for h in 0..heads {
            let row = |j: usize| (h * n + start + j) * dim;
            for i in 0..len {
                let qi: Vec<f32> = q[row(i)..][..dim].iter().map(|&x| r(x * scale)).collect();
                let mut s: Vec<f32> = (0..len)
                    .map(|j| {
                        let kj = &k[row(j)..][..dim];
                        qi.iter().zip(kj).map(|(a, &b)| a * r(b)).sum()
                    })
                    .collect();
                let sum = super::attention::exp_minus_max(Isa::Scalar, &mut s);
                let o = &mut out[((start + i) * heads + h) * dim..][..dim];
                for (j, &p) in s.iter().enumerate() {
                    let vj = &v[row(j)..][..dim];
                    o.iter_mut().zip(vj).for_each(|(o, &x)| *o += r(p) * r(x));
                }
                o.iter_mut().for_each(|x| *x /= sum);
            }
        }
        start += len;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{Dims, JB, R};

    /// `scores = q k^T` for `rows` (a multiple of [`R`]) rows of bf16 queries `qs` (`2 * pairs` per
    /// row) against the packed keys; `scores` is `rows x d.keys`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn scores(qs: &[u16], keys: &[u16], d: Dims, rows: usize, scores: &mut [f32]) {
        let panel = Panel {
            blocks: d.keys / 16,
            steps: d.pairs,
            step: 32,
            block: d.pairs * 32,
        };
        product((qs, 2 * d.pairs), rows, keys, panel, JB, (scores, d.keys));
    }

    /// `os = ps v` for `rows` (a multiple of [`R`]) rows of bf16 softmax weights `ps` (`d.keys` per
    /// row) against the packed values; `os` is `rows x d.dpad`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn weighted(ps: &[u16], values: &[u16], d: Dims, rows: usize, os: &mut [f32]) {
        let panel = Panel {
            blocks: d.dpad / 16,
            steps: d.keys / 2,
            step: d.dpad * 2,
            block: 32,
        };
        // Up to 6 blocks (96 dims) per call: 24 sums, 6 loads and a broadcast in 32 registers.
        product((ps, d.keys), rows, values, panel, 6, (os, d.dpad));
    }

    /// A packed operand: `blocks` blocks of 16 lanes, each lane a bf16 pair per step; block `b`'s
    /// step `s` is the 64 bytes at `b * block + s * step` (in `u16`s).
    struct Panel {
        blocks: usize,
        steps: usize,
        step: usize,
        block: usize,
    }

    /// `out[i][16 b..16 b + 16] = sum over steps s of a[i]'s pair s times block b's step s`, for rows
    /// `i < rows` (a multiple of [`R`]) of `a` and of `out` (each given with its row stride), at most
    /// `widest` (1..=6) blocks per kernel call.
    #[inline(always)]
    unsafe fn product(
        (a, a_stride): (&[u16], usize),
        rows: usize,
        packed: &[u16],
        panel: Panel,
        widest: usize,
        (out, out_stride): (&mut [f32], usize),
    ) {
        for i in (0..rows).step_by(R) {
            let a: [*const u16; R] = std::array::from_fn(|r| a.as_ptr().add((i + r) * a_stride));
            let mut b = 0;
            while b < panel.blocks {
                let w = (panel.blocks - b).min(widest);
                let at = packed.as_ptr().add(b * panel.block);
                let o: [*mut f32; R] =
                    std::array::from_fn(|r| out.as_mut_ptr().add((i + r) * out_stride + b * 16));
                match w {
                    1 => kernel::<1>(a, at, &panel, o),
                    2 => kernel::<2>(a, at, &panel, o),
                    3 => kernel::<3>(a, at, &panel, o),
                    4 => kernel::<4>(a, at, &panel, o),
                    5 => kernel::<5>(a, at, &panel, o),
                    _ => kernel::<6>(a, at, &panel, o),
                }
                b += w;
            }
        }
    }

    /// [`R`] rows against `B` blocks of the panel starting at `packed`: `R x B` sums in registers,
    /// one broadcast pair per row and one load per block each step.
    #[inline(always)]
    unsafe fn kernel<const B: usize>(
        a: [*const u16; R],
        packed: *const u16,
        panel: &Panel,
        out: [*mut f32; R],
    ) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        for s in 0..panel.steps {
            let blocks: [__m512bh; B] = std::array::from_fn(|b| {
                std::mem::transmute(_mm512_loadu_si512(
                    packed.add(b * panel.block + s * panel.step) as *const __m512i,
                ))
            });
            for r in 0..R {
                let pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                    (a[r].add(2 * s) as *const i32).read_unaligned(),
                ));
                for b in 0..B {
                    acc[r][b] = _mm512_dpbf16_ps(acc[r][b], pair, blocks[b]);
                }
            }
        }
        for (row, sums) in out.iter().zip(&acc) {
            for (b, sum) in sums.iter().enumerate() {
                _mm512_storeu_ps(row.add(b * 16), *sum);
            }
        }
    }

    /// One row's softmax weights in one pass after the max: `p[j] = bf16(e^(s[j] - max))` for the
    /// row's scores `s`, zero for the padded keys `p[s.len()..]` (stale bits there could be a NaN),
    /// returning the f32 sum of the unrounded exps. The same values as
    /// [`super::super::attention::exp_minus_max`] then [`to_bf16`] (the same exp, 16 lanes at a
    /// time), without writing the exps back and reading them again.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub unsafe fn softmax_weights(s: &[f32], p: &mut [u16]) -> f32 {
        use crate::kernels::x86::exp16;
        let n = s.len();
        assert!(p.len() >= n);
        let tail = ((1u32 << (n % 16)) - 1) as u16;
        let full = n - n % 16;
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            mv = _mm512_max_ps(mv, _mm512_loadu_ps(s.as_ptr().add(i)));
            i += 16;
        }
        if tail != 0 {
            mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, tail, s.as_ptr().add(full)));
        }
        let m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let out = p.as_mut_ptr();
        let store = |at: usize, e: __m512, mask: u16| {
            let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(out.add(at) as *mut i16, mask, h);
        };
        let mut acc = _mm512_setzero_ps();
        i = 0;
        while i < full {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr().add(i)), m));
            acc = _mm512_add_ps(acc, e);
            store(i, e, u16::MAX);
            i += 16;
        }
        if tail != 0 {
            let x = _mm512_maskz_loadu_ps(tail, s.as_ptr().add(full));
            let e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(x, m)));
            acc = _mm512_add_ps(acc, e);
            store(full, e, tail);
        }
        p[n..].fill(0);
        _mm512_reduce_add_ps(acc)
    }

    /// Rounds `src` to bf16 (to nearest, ties to even, as the reference), 16 values at a time.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
            i += 16;
        }
        for j in i..n {
            dst[j] = super::round(src[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect()
    }

    /// The reference against f32 attention (so it computes attention, to bf16's precision), and the
    /// kernel against the reference (same rounding points, so only the order of f32 sums and the
    /// vectorized exp differ) on odd shapes: head dims odd, not a multiple of 16, above 96 (two
    /// value passes); segments shorter than, equal to and longer than a tile and a key block.
    #[test]
    fn bf16_segment_attention_matches_reference() {
        for (heads, dim, segments) in [
            (1, 8, vec![1]),
            (2, 19, vec![5, 32, 70]),
            (3, 80, vec![33]),
            (2, 40, vec![100, 7]),
            (1, 112, vec![65]),
        ] {
            let n: usize = segments.iter().sum();
            let (q, k, v) = (
                data(heads * n * dim, 1),
                data(heads * n * dim, 2),
                data(heads * n * dim, 3),
            );
            let scale = 1.0 / (dim as f32).sqrt();
            let want = reference(&q, &k, &v, heads, dim, &segments, scale);
            let exact = super::super::attention::segment_attention(
                Isa::Scalar,
                &q,
                &k,
                &v,
                heads,
                dim,
                &segments,
                scale,
                super::super::attention::Products::F32,
            );
            for (i, (w, e)) in want.iter().zip(&exact).enumerate() {
                assert!(
                    (w - e).abs() < 3e-2 * (1.0 + e.abs()),
                    "reference h{heads} d{dim} {segments:?} at {i}: {w} vs f32 {e}"
                );
            }
            let src = Layout::Split {
                q: &q,
                k: &k,
                v: &v,
            };
            assert_kernel_matches(src, heads, dim, &segments, scale, &want);
        }
    }

    /// The one-pass softmax weights equal the exps of `exp_minus_max` rounded by `to_bf16`, bit for
    /// bit, with zeros over the padding, and the same sum up to the order of f32 additions, on rows
    /// shorter than, equal to and longer than a vector, with a tail and without.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn softmax_weights_equal_exp_then_rounding() {
        if !available(Isa::detect()) {
            return;
        }
        for len in [1, 15, 16, 17, 70, 1024] {
            let s: Vec<f32> = data(len, len).iter().map(|x| 9.0 * x).collect();
            let mut want_e = s.clone();
            let want_sum = super::super::attention::exp_minus_max(Isa::Avx2, &mut want_e);
            let mut want = vec![0u16; len + 9];
            want[..len]
                .iter_mut()
                .zip(&want_e)
                .for_each(|(w, &e)| *w = round(e));
            let mut got = vec![0xffffu16; len + 9];
            // SAFETY: `available` said the CPU has AVX-512 BF16 (and F, BW, VL).
            let sum = unsafe { x86::softmax_weights(&s, &mut got) };
            assert_eq!(got, want, "len {len}");
            assert!(
                (sum - want_sum).abs() <= 1e-6 * want_sum,
                "len {len}: {sum} vs {want_sum}"
            );
        }
    }

    /// The kernel on `src`, on every path that has it, within 1e-3 of the reference's `want`.
    fn assert_kernel_matches(
        src: Layout,
        heads: usize,
        dim: usize,
        segments: &[usize],
        scale: f32,
        want: &[f32],
    ) {
        for isa in Isa::available().into_iter().filter(|&i| available(i)) {
            let got = segment_attention(isa, src, heads, dim, segments, scale);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-3 * (1.0 + w.abs()),
                    "{isa:?} h{heads} d{dim} {segments:?} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// The fused projection's output read in place, rotary applied while packing, against the
    /// reference on q, k, v laid out per head and rotated beforehand (rotate-half, as candle's rope).
    #[test]
    fn bf16_attention_reads_the_fused_projection_in_place() {
        for (heads, dim, segments) in [(2, 80, vec![33, 70]), (3, 18, vec![5])] {
            let n: usize = segments.iter().sum();
            let half = dim / 2;
            let qkv = data(n * 3 * heads * dim, 4);
            let angles = data(n * half, 5);
            let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
            let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
            let mut split = vec![vec![0f32; heads * n * dim]; 3];
            for (which, out) in split.iter_mut().enumerate() {
                for j in 0..n {
                    for h in 0..heads {
                        let x = &qkv[((j * 3 + which) * heads + h) * dim..][..dim];
                        let o = &mut out[(h * n + j) * dim..][..dim];
                        for t in 0..half {
                            let (c, s) = (cos[j * half + t], sin[j * half + t]);
                            if which < 2 {
                                o[t] = x[t] * c - x[t + half] * s;
                                o[t + half] = x[t] * s + x[t + half] * c;
                            } else {
                                o[t] = x[t];
                                o[t + half] = x[t + half];
                            }
                        }
                    }
                }
            }
            let scale = 1.0 / (dim as f32).sqrt();
            let want = reference(
                &split[0], &split[1], &split[2], heads, dim, &segments, scale,
            );
            let src = Layout::Fused {
                qkv: &qkv,
                cos: &cos,
                sin: &sin,
            };
            assert_kernel_matches(src, heads, dim, &segments, scale, &want);
        }
    }
}
