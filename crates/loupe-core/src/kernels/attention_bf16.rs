//! The vision tower's attention in low precision, for quantized towers: the scores `q k^T` on
//! 8-bit codes with 32-bit integer sums (AVX-512 VNNI's `vpdpbusd`, 64 products per instruction),
//! the weighted sum `p v` on bf16 operands with f32 sums (AVX-512 BF16's `vdpbf16ps`). Why our own:
//! the f32 products of [`super::attention`] were 15-20% of a 448² encode once the linear layers ran
//! in VNNI, and `gemm` has no 8-bit or bf16 kernels on x86; the scores were then a third of a 896²
//! encode's attention on bf16, and 8-bit operands multiply twice as fast here.
//!
//! Where the values are rounded (the scalar reference [`reference`] rounds at the same points):
//! - each query row, once scaled, to 8-bit codes with one scale (its largest magnitude over 127);
//! - the keys minus their mean over the segment (per dim: a shift of every score of a query row by the
//!   same amount, which the softmax does not see; SageAttention's smoothing, so a dim where all keys
//!   share an offset costs no precision), each key row to 8-bit codes with one scale;
//! - the values, and the softmax weights `p` before they meet the values, to bf16.
//!
//! A score is the exact integer sum of the codes' products times both scales; the softmax, the row
//! sums of `p` and every sum of the weighted product stay f32. The models ask for it only where the
//! projections feeding attention are already quantized, whose error is far above these roundings
//! (`docs/quantization.md`).
//!
//! Layouts (for one segment and head; `keys` padded with zero rows to a multiple of 16, `dim` with
//! zeros to a multiple of 4 for the codes and to a multiple of 16 for the values):
//! - keys: codes plus 128 (`vpdpbusd` wants the unsigned operand there), blocks of 16 keys,
//!   `[block][quad of dims][key 16][4]`, so one 64-byte load gives 16 keys' codes of dims
//!   `4s..4s + 4` and a broadcast quad of one query's codes meets all of them;
//! - values: bf16 `[pair of keys][dim][2]`, so one load gives 16 dims of two consecutive keys and a
//!   broadcast pair of softmax weights meets all of them;
//! - queries: rows of codes as they are, read 4 at a time; softmax weights: rows of bf16, read as
//!   4-byte pairs.

use std::cell::RefCell;

use half::bf16;

use super::Isa;

/// Query rows per unit of work (as the f32 path's tile).
const TILE: usize = 32;
/// Query rows per kernel call.
const R: usize = 4;
/// Key blocks (of 16) per score-kernel call.
const JB: usize = 4;

/// Whether the CPU behind `isa` has AVX-512 VNNI (`vpdpbusd`, part of [`Isa::Avx512`]) and BF16
/// (`vdpbf16ps`).
pub fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Whether the weighted sum widens its bf16 operands to f32 and multiplies them with FMA instead of
/// `vdpbf16ps`: on Intel's cores, whose `vdpbf16ps` gives 41 GMAC/s against FMA's 69-84 (session 15,
/// `docs/benchmarks.md`); AMD's Zen 4 runs `vdpbf16ps` at 104-114 against FMA's 58 (session 13).
/// The operands are the same bf16 values, the sums f32 either way (in another order).
/// `LOUPE_WEIGHTED=fma` or `=bf16` picks one (for comparing them).
fn widen_weighted() -> bool {
    use std::sync::OnceLock;
    static WIDEN: OnceLock<bool> = OnceLock::new();
    *WIDEN.get_or_init(|| match std::env::var("LOUPE_WEIGHTED").as_deref() {
        Ok("fma") => true,
        Ok("bf16") => false,
        _ => intel(),
    })
}

/// Whether the CPU is Intel's (CPUID vendor `GenuineIntel`).
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let v = core::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
    /// `(d.keys, 4 * d.quads)`: each query row's 8-bit codes (times the scale), zero padding.
    queries: Vec<i8>,
    /// Per query row: its codes' scale, and `-128 x` the sum of its codes (what the keys' `+128`
    /// adds to every integer sum).
    query_scale: Vec<f32>,
    query_offset: Vec<i32>,
    /// The keys' codes plus 128 in the layout above, and each key's scale (0 for padding).
    keys: Vec<u8>,
    key_scale: Vec<f32>,
    values: Vec<u16>,
}

/// The padded sizes of a segment of `len` keys with head dim `dim`.
#[derive(Clone, Copy)]
struct Dims {
    len: usize,
    dim: usize,
    /// Keys (and query rows) padded to a multiple of 16.
    keys: usize,
    /// Quads of dims (the score product's depth).
    quads: usize,
    /// Dims padded to a multiple of 16 (the value product's width).
    dpad: usize,
}

impl Dims {
    fn new(len: usize, dim: usize) -> Self {
        Dims {
            len,
            dim,
            keys: len.div_ceil(16) * 16,
            quads: dim.div_ceil(4),
            dpad: dim.div_ceil(16) * 16,
        }
    }
}

/// `x` as 8-bit codes with one scale: `codes[i] = round(x[i] * 127 / max |x|)` (ties to even),
/// returning `max |x| / 127` (0, with zero codes, when `x` is all zeros). The reference of
/// `x86::quantize`.
pub fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax == 0.0 {
        codes[..x.len()].fill(0);
        return 0.0;
    }
    let iscale = 127.0 / amax;
    for (c, v) in codes.iter_mut().zip(x) {
        *c = (v * iscale).round_ties_even() as i8;
    }
    amax / 127.0
}

/// [`quantize`] on the SIMD path where the CPU has one.
fn quantize_row(x: &[f32], codes: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: only reached where `available` said the CPU has AVX-512 (F, BW, VL).
    return unsafe { x86::quantize(x, codes) };
    #[cfg(not(target_arch = "x86_64"))]
    quantize(x, codes)
}

/// The mean over `len` rows of `dim` values (`rows` holds them one after another): sums in row
/// order, then one division per dim.
fn mean_rows(rows: &[f32], dim: usize, len: usize) -> Vec<f32> {
    let mut mean = vec![0f32; dim];
    for row in rows.chunks_exact(dim).take(len) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x);
    }
    mean.iter_mut().for_each(|m| *m /= len as f32);
    mean
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
    let qw = 4 * d.quads;
    let mut queries = vec![0i8; d.keys * qw];
    let mut query_scale = vec![0f32; d.keys];
    let mut query_offset = vec![0i32; d.keys];
    let mut keys = vec![0x80u8; d.keys * qw];
    let mut key_scale = vec![0f32; d.keys];
    let mut values = vec![0u16; d.keys * d.dpad];
    // The keys, rotated, kept until their mean is known.
    let mut k = vec![0f32; d.len * d.dim];
    let (mut row, mut words) = (vec![0f32; d.dim], vec![0u16; d.dim]);
    for j in 0..d.len {
        // The rows lie a whole token's q, k and v of every head apart (the fused layout): each
        // read would wait on memory without a request made a few rows ahead.
        if j + AHEAD < d.len {
            for which in 0..3 {
                let x = src.row(which, h, start + j + AHEAD, shape);
                super::prefetch(x.as_ptr(), x.len());
            }
        }
        src.load(0, h, start + j, shape, &mut row);
        row.iter_mut().for_each(|r| *r *= scale);
        let codes = &mut queries[j * qw..][..d.dim];
        query_scale[j] = quantize_row(&row, codes);
        query_offset[j] = -128 * codes.iter().map(|&c| c as i32).sum::<i32>();
        src.load(1, h, start + j, shape, &mut k[j * d.dim..][..d.dim]);
        src.load(2, h, start + j, shape, &mut row);
        to_bf16(&row, &mut words);
        for (t, &w) in words.iter().enumerate() {
            values[((j / 2) * d.dpad + t) * 2 + j % 2] = w;
        }
    }
    let mean = mean_rows(&k, d.dim, d.len);
    let mut codes = vec![0i8; d.dim];
    for j in 0..d.len {
        row.iter_mut()
            .zip(&k[j * d.dim..][..d.dim])
            .zip(&mean)
            .for_each(|((r, &x), &m)| *r = x - m);
        key_scale[j] = quantize_row(&row, &mut codes);
        let (blk, lane) = (j / 16, j % 16);
        for (t, &c) in codes.iter().enumerate() {
            keys[((blk * d.quads + t / 4) * 16 + lane) * 4 + t % 4] = (c as u8) ^ 0x80;
        }
    }
    Packed {
        queries,
        query_scale,
        query_offset,
        keys,
        key_scale,
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
    let qs = span.start..span.start + padded;
    // SAFETY: `available` said the CPU has AVX-512 F, VNNI and BF16 (checked by
    // `segment_attention`); the buffers hold `padded` rows of what each product reads and writes.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::scores(kv, qs, d, scores)
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
        if widen_weighted() {
            x86::weighted_fma(ps, &kv.values, d, padded, os)
        } else {
            x86::weighted(ps, &kv.values, d, padded, os)
        }
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

/// The reference: the same rounding points, one value at a time, exact integer sums for the scores
/// and f32 sums in plain order for the weighted sum.
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
            let rows = &k[row(0)..row(len)];
            let mean = mean_rows(rows, dim, len);
            let keys: Vec<(f32, Vec<i8>)> = rows
                .chunks_exact(dim)
                .map(|kj| {
                    let centred: Vec<f32> = kj.iter().zip(&mean).map(|(&x, &m)| x - m).collect();
                    let mut codes = vec![0i8; dim];
                    (quantize(&centred, &mut codes), codes)
                })
                .collect();
            for i in 0..len {
                let qi: Vec<f32> = q[row(i)..][..dim].iter().map(|&x| x * scale).collect();
                let mut qc = vec![0i8; dim];
                let sq = quantize(&qi, &mut qc);
                let mut s: Vec<f32> = keys
                    .iter()
                    .map(|(sk, kc)| {
                        let dot: i32 = qc.iter().zip(kc).map(|(&a, &b)| a as i32 * b as i32).sum();
                        dot as f32 * (sk * sq)
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

    use super::{Dims, Packed, JB, R};

    /// `scores = q k^T` for query rows `qs` (as many as a multiple of [`R`]) of the packed segment
    /// against all its keys; `scores` is `qs.len() x d.keys`. [`JB`] blocks of 16 keys per kernel
    /// call: `R x JB` integer sums in registers, one load per block and one broadcast per row each
    /// quad of dims.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn scores(kv: &Packed, qs: std::ops::Range<usize>, d: Dims, scores: &mut [f32]) {
        let qw = 4 * d.quads;
        let blocks = d.keys / 16;
        assert!(qs.end <= d.keys && scores.len() >= qs.len() * d.keys);
        for (i, first) in qs.clone().step_by(R).enumerate() {
            let rows = first..first + R;
            let q: [*const i8; R] =
                std::array::from_fn(|r| kv.queries.as_ptr().add((first + r) * qw));
            let a = Query {
                codes: q,
                scale: kv.query_scale[rows.clone()].try_into().expect("R rows"),
                offset: kv.query_offset[rows].try_into().expect("R rows"),
            };
            let mut b = 0;
            while b < blocks {
                let w = (blocks - b).min(JB);
                let keys = kv.keys.as_ptr().add(b * 16 * qw);
                let key_scale = kv.key_scale.as_ptr().add(b * 16);
                let o: [*mut f32; R] =
                    std::array::from_fn(|r| scores.as_mut_ptr().add((i * R + r) * d.keys + b * 16));
                match w {
                    1 => kernel8::<1>(&a, keys, key_scale, d.quads, o),
                    2 => kernel8::<2>(&a, keys, key_scale, d.quads, o),
                    3 => kernel8::<3>(&a, keys, key_scale, d.quads, o),
                    _ => kernel8::<4>(&a, keys, key_scale, d.quads, o),
                }
                b += w;
            }
        }
    }

    /// [`R`] query rows' codes, scales and offsets.
    struct Query {
        codes: [*const i8; R],
        scale: [f32; R],
        offset: [i32; R],
    }

    /// [`R`] query rows against `B` blocks of 16 keys starting at `keys` (their scales at
    /// `key_scale`): per row and block, the integer sum of the codes' products (the `+128` of the
    /// keys taken back off), then times the key's scale times the query's.
    #[inline(always)]
    unsafe fn kernel8<const B: usize>(
        q: &Query,
        keys: *const u8,
        key_scale: *const f32,
        quads: usize,
        out: [*mut f32; R],
    ) {
        let mut acc = [[_mm512_setzero_si512(); B]; R];
        for s in 0..quads {
            let blocks: [__m512i; B] = std::array::from_fn(|b| {
                _mm512_loadu_si512(keys.add((b * quads + s) * 64) as *const __m512i)
            });
            for (sums, codes) in acc.iter_mut().zip(q.codes) {
                let quad = _mm512_set1_epi32((codes.add(4 * s) as *const i32).read_unaligned());
                for (sum, block) in sums.iter_mut().zip(blocks) {
                    *sum = _mm512_dpbusd_epi32(*sum, block, quad);
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            let (offset, sq) = (_mm512_set1_epi32(q.offset[r]), _mm512_set1_ps(q.scale[r]));
            for (b, sum) in sums.iter().enumerate() {
                let scale = _mm512_mul_ps(_mm512_loadu_ps(key_scale.add(16 * b)), sq);
                let exact = _mm512_cvtepi32_ps(_mm512_add_epi32(*sum, offset));
                _mm512_storeu_ps(out[r].add(16 * b), _mm512_mul_ps(exact, scale));
            }
        }
    }

    /// [`super::quantize`], 16 values at a time: the same largest magnitude, scale and codes
    /// (`vcvtps2dq` rounds to nearest even, as `round_ties_even`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
        let n = x.len();
        assert!(codes.len() >= n);
        let mask = |at: usize| -> u16 {
            let left = n - at;
            if left >= 16 {
                u16::MAX
            } else {
                ((1u32 << left) - 1) as u16
            }
        };
        let mut amax = _mm512_setzero_ps();
        for at in (0..n).step_by(16) {
            let v = _mm512_maskz_loadu_ps(mask(at), x.as_ptr().add(at));
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        let amax = _mm512_reduce_max_ps(amax);
        if amax == 0.0 {
            codes[..n].fill(0);
            return 0.0;
        }
        let iscale = _mm512_set1_ps(127.0 / amax);
        for at in (0..n).step_by(16) {
            let m = mask(at);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(at));
            let c = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, iscale)));
            _mm_mask_storeu_epi8(codes.as_mut_ptr().add(at), m, c);
        }
        amax / 127.0
    }

    /// `os = ps v` for `rows` (a multiple of [`R`]) rows of bf16 softmax weights `ps` (`d.keys` per
    /// row) against the packed values; `os` is `rows x d.dpad`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn weighted(ps: &[u16], values: &[u16], d: Dims, rows: usize, os: &mut [f32]) {
        let panel = Panel::values(d);
        // Up to 6 blocks (96 dims) per call: 24 sums, 6 loads and a broadcast in 32 registers.
        product::<false>((ps, d.keys), rows, values, panel, 6, (os, d.dpad));
    }

    /// [`weighted`] with each bf16 pair widened to two f32 values (a bf16 is the high half of its f32)
    /// and multiplied by FMA: for CPUs whose `vdpbf16ps` is slower than two FMAs
    /// ([`super::widen_weighted`]).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_fma(ps: &[u16], values: &[u16], d: Dims, rows: usize, os: &mut [f32]) {
        let panel = Panel::values(d);
        // Up to 5 blocks per call: 20 sums, 8 broadcast weights and a widened pair.
        product::<true>((ps, d.keys), rows, values, panel, 5, (os, d.dpad));
    }

    /// [`kernel`] on widened operands: per step, each row's weight pair as two broadcast f32 values,
    /// each block's 16 value pairs as two f32 vectors (even keys, odd keys), two FMAs per sum.
    #[inline(always)]
    unsafe fn kernel_fma<const B: usize>(
        a: [*const u16; R],
        packed: *const u16,
        panel: &Panel,
        out: [*mut f32; R],
    ) {
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        for s in 0..panel.steps {
            let pairs: [(__m512, __m512); R] = std::array::from_fn(|r| {
                let pair = (a[r].add(2 * s) as *const u32).read_unaligned();
                (
                    _mm512_set1_ps(f32::from_bits(pair << 16)),
                    _mm512_set1_ps(f32::from_bits(pair & 0xffff_0000)),
                )
            });
            #[allow(clippy::needless_range_loop)] // `b` picks a block of every row's sums
            for b in 0..B {
                let x =
                    _mm512_loadu_si512(packed.add(b * panel.block + s * panel.step) as *const _);
                let even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(x, high));
                for r in 0..R {
                    acc[r][b] = _mm512_fmadd_ps(pairs[r].0, even, acc[r][b]);
                    acc[r][b] = _mm512_fmadd_ps(pairs[r].1, odd, acc[r][b]);
                }
            }
        }
        for (row, sums) in out.iter().zip(&acc) {
            for (b, sum) in sums.iter().enumerate() {
                _mm512_storeu_ps(row.add(b * 16), *sum);
            }
        }
    }

    /// A packed operand: `blocks` blocks of 16 lanes, each lane a bf16 pair per step; block `b`'s
    /// step `s` is the 64 bytes at `b * block + s * step` (in `u16`s).
    struct Panel {
        blocks: usize,
        steps: usize,
        step: usize,
        block: usize,
    }

    impl Panel {
        /// The packed values (`[pair of keys][dim][2]`): a block is 16 dims, a step a pair of keys.
        fn values(d: Dims) -> Self {
            Panel {
                blocks: d.dpad / 16,
                steps: d.keys / 2,
                step: d.dpad * 2,
                block: 32,
            }
        }
    }

    /// `out[i][16 b..16 b + 16] = sum over steps s of a[i]'s pair s times block b's step s`, for rows
    /// `i < rows` (a multiple of [`R`]) of `a` and of `out` (each given with its row stride), at most
    /// `widest` (1..=6) blocks per kernel call: on [`kernel`], or on [`kernel_fma`] when `WIDEN`.
    #[inline(always)]
    unsafe fn product<const WIDEN: bool>(
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
                match (WIDEN, w) {
                    (false, 1) => kernel::<1>(a, at, &panel, o),
                    (false, 2) => kernel::<2>(a, at, &panel, o),
                    (false, 3) => kernel::<3>(a, at, &panel, o),
                    (false, 4) => kernel::<4>(a, at, &panel, o),
                    (false, 5) => kernel::<5>(a, at, &panel, o),
                    (false, _) => kernel::<6>(a, at, &panel, o),
                    (true, 1) => kernel_fma::<1>(a, at, &panel, o),
                    (true, 2) => kernel_fma::<2>(a, at, &panel, o),
                    (true, 3) => kernel_fma::<3>(a, at, &panel, o),
                    (true, 4) => kernel_fma::<4>(a, at, &panel, o),
                    (true, _) => kernel_fma::<5>(a, at, &panel, o),
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

    /// [`assert_reference_and_kernel`] on odd shapes: head dims odd, not a multiple of 4 or 16,
    /// above 96 (two value passes); segments shorter than, equal to and longer than a tile and a
    /// key block.
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
            assert_reference_and_kernel(&q, &k, &v, heads, dim, &segments);
        }
    }

    /// The reference against f32 attention within 3e-2 (so it computes attention, to the precision
    /// of its roundings), and the kernel against the reference (same rounding points, so only the
    /// order of f32 sums and the vectorized exp differ), `q`, `k`, `v` laid out per head.
    fn assert_reference_and_kernel(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
        dim: usize,
        segments: &[usize],
    ) {
        let scale = 1.0 / (dim as f32).sqrt();
        let want = reference(q, k, v, heads, dim, segments, scale);
        let exact = super::super::attention::segment_attention(
            Isa::Scalar,
            q,
            k,
            v,
            heads,
            dim,
            segments,
            scale,
            super::super::attention::Products::F32,
        );
        for (i, (w, e)) in want.iter().zip(&exact).enumerate() {
            assert!(
                (w - e).abs() < 3e-2 * (1.0 + e.abs()),
                "reference h{heads} d{dim} {segments:?} at {i}: {w} vs f32 {e}"
            );
        }
        assert_kernel_matches(
            Layout::Split { q, k, v },
            heads,
            dim,
            segments,
            scale,
            &want,
        );
    }

    /// Both weighted-sum kernels (`vdpbf16ps`, and the operands widened for FMA) against an f64
    /// product of the same bf16 values, on widths of 1 to 6 blocks of 16 dims (every call width and
    /// a remainder), several row groups, key counts of one and many vector steps.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn both_weighted_kernels_match_the_product() {
        if !available(Isa::detect()) {
            return;
        }
        for (dpad, keys, rows) in [(16, 16, 4), (80, 48, 8), (96, 64, 4), (48, 16, 12)] {
            let d = Dims {
                len: keys,
                dim: dpad,
                keys,
                quads: dpad / 4,
                dpad,
            };
            let ps: Vec<u16> = data(rows * keys, 6)
                .iter()
                .map(|x| round(x.abs()))
                .collect();
            // `[pair of keys][dim][2]`.
            let values: Vec<u16> = data(keys * dpad, 7).iter().map(|&x| round(x)).collect();
            let at = |j: usize, c: usize| values[(j / 2) * dpad * 2 + c * 2 + j % 2];
            let mut want = vec![0f64; rows * dpad];
            for i in 0..rows {
                for c in 0..dpad {
                    want[i * dpad + c] = (0..keys)
                        .map(|j| value(ps[i * keys + j]) as f64 * value(at(j, c)) as f64)
                        .sum();
                }
            }
            let mut got = vec![0f32; rows * dpad];
            let mut got_fma = vec![0f32; rows * dpad];
            // SAFETY: `available` said the CPU has AVX-512 BF16 (and F); the operands hold `rows`
            // rows of `keys` weights, `keys` rows of `dpad` values and `rows x dpad` outputs.
            unsafe {
                x86::weighted(&ps, &values, d, rows, &mut got);
                x86::weighted_fma(&ps, &values, d, rows, &mut got_fma);
            }
            for (name, got) in [("bf16", &got), ("fma", &got_fma)] {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "{name} d{dpad} k{keys} r{rows} at {i}: {g} vs {w}"
                    );
                }
            }
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

    /// The SIMD quantization equals the reference bit for bit: lengths with and without a tail,
    /// exact ties (a value of largest magnitude 127 makes every integer and half-integer exact), an
    /// all-zero row, negative zero.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn quantize_equals_its_reference() {
        if !available(Isa::detect()) {
            return;
        }
        let mut rows: Vec<Vec<f32>> = [1, 15, 16, 17, 80, 112]
            .iter()
            .map(|&len| data(len, len).iter().map(|x| 3.0 * x).collect())
            .collect();
        rows.push(
            (0..40)
                .map(|i| (i as f32 - 20.0) * 0.5)
                .chain([127.0])
                .collect(),
        );
        rows.push(vec![0.0; 19]);
        rows.push(vec![-0.0, 1e-30, -2.5, 2.5]);
        for x in rows {
            let (mut want, mut got) = (vec![0i8; x.len()], vec![7i8; x.len() + 3]);
            let sw = quantize(&x, &mut want);
            // SAFETY: `available` said the CPU has AVX-512 (F, BW, VL).
            let sg = unsafe { x86::quantize(&x, &mut got) };
            assert_eq!(sg.to_bits(), sw.to_bits(), "{x:?}");
            assert_eq!(&got[..x.len()], &want[..], "{x:?}");
            assert_eq!(&got[x.len()..], &[7, 7, 7], "wrote past the row");
        }
    }

    /// Keys sharing a large offset in some dims (as a projection's bias gives them) change no
    /// softmax, and the smoothing (the keys' mean taken off before their 8-bit rounding) keeps that
    /// true here: the result stays within the same bound of f32 attention on the offset keys as on
    /// the plain ones. Without it, one key scale would span the offset and the other dims' codes
    /// would round to a few levels.
    #[test]
    fn shared_key_offsets_cost_no_precision() {
        let (heads, dim, segments) = (2, 40, vec![70, 33]);
        let n: usize = segments.iter().sum();
        let (q, v) = (data(heads * n * dim, 6), data(heads * n * dim, 7));
        let mut k = data(heads * n * dim, 8);
        for (i, x) in k.iter_mut().enumerate() {
            if i % dim == 3 || i % dim == 17 {
                *x += 60.0;
            }
        }
        assert_reference_and_kernel(&q, &k, &v, heads, dim, &segments);
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
