//! The vision tower's attention on integer operands, for quantized towers: the scores `q k^T` on
//! 8-bit codes (AVX-512 VNNI's `vpdpbusd`, 64 products per instruction; on AArch64 `sdot`, 16), the
//! weighted sum `p v` on 16-bit codes (VNNI's `vpdpwssd`, 32 products per instruction; NEON's
//! `smlal`, 4), both with 32-bit integer sums, so every path gives the same sums. Why
//! our own: the f32 products of [`super::attention`] were 15-20% of a 448² encode once the linear
//! layers ran in VNNI, and `gemm` has no integer kernels on x86. At 896² the attention over 4096
//! patches weighs as much as the projections; `vpdpwssd` runs at 154 GMAC/s per core on the Intel
//! Xeon of session 16, against 69-84 for f32 FMA and 41 for bf16's `vdpbf16ps`.
//!
//! Where the values are rounded (the scalar reference [`reference`] rounds at the same points):
//! - each query row, once scaled, to 8-bit codes with one scale (its largest magnitude over 127);
//! - the keys minus their mean over the segment (per dim: a shift of every score of a query row by the
//!   same amount, which the softmax does not see; SageAttention's smoothing, so a dim where all keys
//!   share an offset costs no precision), each key row to 8-bit codes with one scale;
//! - the values to 16-bit codes with one scale per dim over the segment (its largest magnitude over
//!   [`V_LEVELS`]: 12 bits with the sign);
//! - the softmax weights `p` to 16-bit codes with one scale per row and block of [`KB`] keys (the
//!   block's largest weight over [`P_LEVELS`]: 14 bits), so a block of small weights keeps its
//!   relative precision; what is lost is below 2^-15 of its block's largest.
//!
//! A score is the exact integer sum of the codes' products times both scales; a block's part of the
//! weighted sum is exact in 32 bits (`KB * P_LEVELS * V_LEVELS < 2^31`), taken into an f32 sum at the
//! block's end times its scale. The softmax and its row sums (of the unrounded weights) stay f32. The
//! models ask for this only where the projections feeding attention are already quantized, whose
//! error is far above these roundings (`docs/quantization.md`).
//!
//! Layouts (for one segment and head; `keys` padded with zero rows to a multiple of 16, `dim` with
//! zeros to a multiple of 4 for the codes and to a multiple of 16 for the values):
//! - keys: codes plus 128 (`vpdpbusd` wants the unsigned operand there), blocks of 16 keys,
//!   `[block][quad of dims][key 16][4]`, so one 64-byte load gives 16 keys' codes of dims
//!   `4s..4s + 4` and a broadcast quad of one query's codes meets all of them;
//! - values: codes `[pair of keys][dim][2]`, so one load gives 16 dims of two consecutive keys and a
//!   broadcast pair of softmax weights meets all of them;
//! - queries: rows of codes as they are, read 4 at a time; softmax weights: rows of codes, read as
//!   4-byte pairs.

use std::cell::RefCell;

use super::Isa;

/// Query rows per unit of work (as the f32 path's tile).
const TILE: usize = 32;
/// Query rows per kernel call.
const R: usize = 4;
/// Key blocks (of 16) per score-kernel call (AVX-512; NEON's 32 registers hold one).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const JB: usize = 4;
/// Keys per block of the weighted sum: one scale for a row's softmax weights over the block, and
/// its integer sums taken into f32 at its end.
const KB: usize = 64;
/// The largest code of a softmax weight (the block's largest weight).
const P_LEVELS: f32 = 16383.0;
/// The largest magnitude of a value's code (the dim's largest magnitude over the segment).
const V_LEVELS: f32 = 2047.0;
// A block's integer sums cannot overflow, even with a weight rounded up to one code past the top.
const _: () = assert!(KB as u64 * (P_LEVELS as u64 + 1) * V_LEVELS as u64 <= i32::MAX as u64);

/// Whether the CPU behind `isa` has the integer products these kernels use: AVX-512 VNNI
/// (`vpdpbusd`, `vpdpwssd`: [`Isa::Avx512`]) or AArch64's dot product (`sdot`: [`Isa::NeonDot`]
/// and up).
pub fn available(isa: Isa) -> bool {
    isa == Isa::Avx512 || isa.dotprod()
}

/// The scale and its inverse that map magnitudes up to `amax` onto codes up to `levels`: `(amax /
/// levels, levels / amax)`; both 0 (every code 0) when `amax` is 0 or so small (below 1e-34, as a
/// block of weights e^-87 under its row's largest) that the inverse is not a finite f32.
fn levels(amax: f32, levels: f32) -> (f32, f32) {
    let iscale = levels / amax;
    if iscale.is_finite() {
        (amax / levels, iscale)
    } else {
        (0.0, 0.0)
    }
}

/// `x` times `iscale`, rounded to the nearest integer (ties to even, as `vcvtps2dq`).
fn code(x: f32, iscale: f32) -> i32 {
    (x * iscale).round_ties_even() as i32
}

/// Taylor's coefficients of `2^f` (`ln 2^k / k!`), highest degree first: within 2e-7 of it,
/// relatively, for `|f| <= 1/2`.
const EXP2_POLY: [f32; 7] = [
    1.540_353e-4,
    1.333_355_8e-3,
    9.618_129e-3,
    5.550_411e-2,
    0.240_226_5,
    std::f32::consts::LN_2,
    1.0,
];

/// `2^t` for `t <= 0` (below -126 as -126, where a weight is 1e-38 of the row's largest): `t = n + f`
/// with `n` the nearest integer, `2^f` by [`EXP2_POLY`], `2^n` put in by an exact product (rounded
/// only where the result is subnormal). Fewer steps than [`super::attention`]'s `e^x`, which also
/// serves positive arguments: the softmax here only sees scores at or below their row's largest.
/// The reference of `x86::exp2`.
fn exp2(t: f32) -> f32 {
    let t = t.max(-126.0);
    let n = t.round_ties_even();
    let f = t - n;
    let p = EXP2_POLY[1..]
        .iter()
        .fold(EXP2_POLY[0], |p, &c| p.mul_add(f, c));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A row's softmax weights from its scores `s` (each still to be multiplied by the query's scale
/// `qscale`), written over them: `e[j] = 2^(s[j] c - max c)` with `c = qscale log2(e)`, one fused
/// multiply-subtract per score; returns their sum (in order). The reference of the exps of
/// `x86::softmax_codes`.
pub fn softmax_exps(s: &mut [f32], qscale: f32) -> f32 {
    let m = s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let c = qscale * std::f32::consts::LOG2_E;
    let mc = m * c;
    s.iter_mut().fold(0.0, |sum, x| {
        *x = exp2(x.mul_add(c, -mc));
        sum + *x
    })
}

/// A row's softmax weights `e` as 16-bit codes in `p` (as many slots as the padded keys, zeros past
/// `e.len()`): per block of [`KB`] keys, its largest weight is [`P_LEVELS`]; `scales` gets each
/// block's scale. The reference of `x86::softmax_codes` after the exps.
pub fn weight_codes(e: &[f32], p: &mut [i16], scales: &mut [f32]) {
    for (b, (codes, scale)) in p.chunks_mut(KB).zip(scales.iter_mut()).enumerate() {
        let first = (b * KB).min(e.len());
        let e = &e[first..(first + codes.len()).min(e.len())];
        let (s, iscale) = levels(e.iter().fold(0f32, |a, &x| a.max(x)), P_LEVELS);
        *scale = s;
        codes.fill(0);
        for (c, &x) in codes.iter_mut().zip(e) {
            *c = code(x, iscale) as i16;
        }
    }
}

/// One segment and head's queries, keys and values, packed.
#[derive(Default)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct Packed {
    /// `(d.keys, 4 * d.quads)`: each query row's 8-bit codes (times the scale), zero padding.
    queries: Vec<i8>,
    /// Per query row: its codes' scale, and `-128 x` the sum of its codes (what the keys' `+128`
    /// adds to every integer sum, for x86's unsigned operand).
    query_scale: Vec<f32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    query_offset: Vec<i32>,
    /// The keys' codes plus 128 in the layout above, and each key's scale (0 for padding).
    keys: Vec<u8>,
    key_scale: Vec<f32>,
    /// The values' 16-bit codes in the layout above, and each dim's scale (0 for padding).
    values: Vec<i16>,
    value_scale: Vec<f32>,
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

/// Each column's largest magnitude over the rows of `dim` values in `rows`.
fn column_amax(rows: &[f32], dim: usize) -> Vec<f32> {
    let mut amax = vec![0f32; dim];
    for row in rows.chunks_exact(dim) {
        amax.iter_mut()
            .zip(row)
            .for_each(|(m, &x)| *m = m.max(x.abs()));
    }
    amax
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
    let mut values = vec![0i16; d.keys * d.dpad];
    let mut value_scale = vec![0f32; d.dpad];
    // The keys, rotated, kept until their mean is known; the values until their largest magnitudes.
    let mut k = vec![0f32; d.len * d.dim];
    let mut v = vec![0f32; d.len * d.dim];
    let mut row = vec![0f32; d.dim];
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
        src.load(2, h, start + j, shape, &mut v[j * d.dim..][..d.dim]);
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
    let iscale: Vec<f32> = column_amax(&v, d.dim)
        .iter()
        .zip(&mut value_scale)
        .map(|(&amax, scale)| {
            let (s, is) = levels(amax, V_LEVELS);
            *scale = s;
            is
        })
        .collect();
    for (j, x) in v.chunks_exact(d.dim).enumerate() {
        let pair = &mut values[(j / 2) * d.dpad * 2..][..d.dpad * 2];
        for (t, (&x, &is)) in x.iter().zip(&iscale).enumerate() {
            pair[t * 2 + j % 2] = code(x, is) as i16;
        }
    }
    Packed {
        queries,
        query_scale,
        query_offset,
        keys,
        key_scale,
        values,
        value_scale,
    }
}

/// Each pool thread's scratch, kept between calls.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    /// Softmax weights' codes, and their scales per row and block of [`KB`] keys.
    weights: Vec<i16>,
    weight_scale: Vec<f32>,
    /// Output rows before the values' and the softmax's scales.
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// [`super::segment_attention`] on integer operands, on a CPU where [`available`] says yes, from
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
    s: &mut Scratch,
    mut o: super::StridedRows,
) {
    let rows = span.len();
    let kblocks = d.keys.div_ceil(KB);
    // Padded query rows (zero, inside the packed queries) run through the kernels too; their
    // results are never read, so the buffers are only grown, not cleared.
    let padded = rows.div_ceil(R) * R;
    let grow = |buf: &mut Vec<f32>, len: usize| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    };
    grow(&mut s.scores, padded * d.keys);
    grow(&mut s.weight_scale, padded * kblocks);
    grow(&mut s.out, padded * d.dpad);
    if s.weights.len() < padded * d.keys {
        s.weights.resize(padded * d.keys, 0);
    }
    let qs = span.start..span.start + padded;
    // SAFETY: `available` said the CPU has the integer products (checked by `segment_attention`);
    // the buffers hold `padded` rows of what each product reads and writes.
    unsafe { simd::scores(kv, qs, d, &mut s.scores) };
    let mut sums = [0f32; TILE];
    for (i, sum) in sums.iter_mut().enumerate().take(rows) {
        let row = &mut s.scores[i * d.keys..][..d.len];
        let p = &mut s.weights[i * d.keys..][..d.keys];
        let scales = &mut s.weight_scale[i * kblocks..][..kblocks];
        let qs = kv.query_scale[span.start + i];
        // SAFETY: as above.
        *sum = unsafe { simd::softmax_codes(row, qs, p, scales) };
    }
    // SAFETY: as above.
    unsafe {
        simd::weighted(
            &s.weights,
            &s.weight_scale,
            &kv.values,
            d,
            padded,
            &mut s.out,
        )
    };
    for (i, sum) in sums.iter().enumerate().take(rows) {
        let inv = 1.0 / sum;
        let y = &s.out[i * d.dpad..];
        for ((x, &y), &vs) in o.row(i).iter_mut().zip(y).zip(&kv.value_scale) {
            *x = y * (vs * inv);
        }
    }
}

/// The reference: the same rounding points, one value at a time, exact integer sums for the scores
/// and for each block of the weighted sum, f64 sums across blocks.
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
            let values = &v[row(0)..row(len)];
            let (value_scale, iscale): (Vec<f32>, Vec<f32>) = column_amax(values, dim)
                .iter()
                .map(|&amax| levels(amax, V_LEVELS))
                .unzip();
            let value_codes: Vec<i64> = values
                .chunks_exact(dim)
                .flat_map(|x| x.iter().zip(&iscale).map(|(&x, &is)| code(x, is) as i64))
                .collect();
            let padded = len.div_ceil(16) * 16;
            for i in 0..len {
                let qi: Vec<f32> = q[row(i)..][..dim].iter().map(|&x| x * scale).collect();
                let mut qc = vec![0i8; dim];
                let sq = quantize(&qi, &mut qc);
                let mut s: Vec<f32> = keys
                    .iter()
                    .map(|(sk, kc)| {
                        let dot: i32 = qc.iter().zip(kc).map(|(&a, &b)| a as i32 * b as i32).sum();
                        dot as f32 * sk
                    })
                    .collect();
                let sum = softmax_exps(&mut s, sq);
                let mut p = vec![0i16; padded];
                let mut p_scale = vec![0f32; padded.div_ceil(KB)];
                weight_codes(&s, &mut p, &mut p_scale);
                let o = &mut out[((start + i) * heads + h) * dim..][..dim];
                for (t, o) in o.iter_mut().enumerate() {
                    let blocks = p[..len].chunks(KB).zip(&p_scale).enumerate();
                    let dot: f64 = blocks
                        .map(|(b, (p, &ps))| {
                            let codes = p.iter().enumerate().map(|(j, &c)| (b * KB + j, c as i64));
                            let exact: i64 = codes.map(|(j, c)| c * value_codes[j * dim + t]).sum();
                            exact as f64 * ps as f64
                        })
                        .sum();
                    *o = (dot * value_scale[t] as f64 / sum as f64) as f32;
                }
            }
        }
        start += len;
    }
    out
}

/// The products and the softmax on this architecture's SIMD path: each function may only be called
/// where [`available`] said the CPU has it.
mod simd {
    use super::{Dims, Packed};

    /// `scores = q k^T`: `x86::scores` or `neon::scores`.
    #[allow(unused_variables)]
    pub unsafe fn scores(kv: &Packed, qs: std::ops::Range<usize>, d: Dims, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        super::x86::scores(kv, qs, d, scores);
        #[cfg(target_arch = "aarch64")]
        super::neon::scores(kv, qs, d, scores);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        unreachable!("no integer attention on this architecture");
    }

    /// A row's softmax weights as codes: `x86::softmax_codes` or `neon::softmax_codes`.
    pub unsafe fn softmax_codes(
        s: &mut [f32],
        qscale: f32,
        p: &mut [i16],
        scales: &mut [f32],
    ) -> f32 {
        #[cfg(target_arch = "x86_64")]
        return super::x86::softmax_codes(s, qscale, p, scales);
        #[cfg(target_arch = "aarch64")]
        return super::neon::softmax_codes(s, qscale, p, scales);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let sum = super::softmax_exps(s, qscale);
            super::weight_codes(s, p, scales);
            sum
        }
    }

    /// `os = ps v`: `x86::weighted` or `neon::weighted`.
    #[allow(unused_variables)]
    pub unsafe fn weighted(
        ps: &[i16],
        ps_scale: &[f32],
        values: &[i16],
        d: Dims,
        rows: usize,
        os: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        super::x86::weighted(ps, ps_scale, values, d, rows, os);
        #[cfg(target_arch = "aarch64")]
        super::neon::weighted(ps, ps_scale, values, d, rows, os);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        unreachable!("no integer attention on this architecture");
    }
}

/// The AArch64 path: the same packed operands and integer sums as `x86`, so the same results bit
/// for bit. 32 registers of 128 bits: one block of 16 keys per score call (16 sums for 4 rows),
/// 8 dims per weighted-sum call (16 sums for 4 rows).
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::{Dims, Packed, EXP2_POLY, KB, P_LEVELS, R};
    use crate::kernels::neon::sdot;

    /// `scores = q k^T` for query rows `qs` (as many as a multiple of [`R`]) of the packed segment
    /// against all its keys; `scores` is `qs.len() x d.keys`. The keys' codes are stored plus 128
    /// (for x86's unsigned operand): a flip of the top bit gives the signed codes back, so the sums
    /// start from 0, not from the query's offset.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn scores(kv: &Packed, qs: std::ops::Range<usize>, d: Dims, scores: &mut [f32]) {
        let qw = 4 * d.quads;
        let blocks = d.keys / 16;
        assert!(qs.end <= d.keys && qs.len().is_multiple_of(R));
        assert!(scores.len() >= qs.len() * d.keys && kv.keys.len() >= blocks * 16 * qw);
        let flip = vdupq_n_u8(0x80);
        for (i, first) in qs.step_by(R).enumerate() {
            let q: [*const i8; R] =
                std::array::from_fn(|r| kv.queries.as_ptr().add((first + r) * qw));
            for b in 0..blocks {
                let keys = kv.keys.as_ptr().add(b * 16 * qw);
                let mut acc = [[vdupq_n_s32(0); 4]; R];
                for s in 0..d.quads {
                    // Dims 4s..4s + 4 of the block's 16 keys, 4 keys a vector.
                    let k: [int8x16_t; 4] = std::array::from_fn(|v| {
                        vreinterpretq_s8_u8(veorq_u8(vld1q_u8(keys.add(s * 64 + 16 * v)), flip))
                    });
                    for (sums, codes) in acc.iter_mut().zip(q) {
                        let quad = (codes.add(4 * s) as *const i32).read_unaligned();
                        let quad = vreinterpretq_s8_s32(vdupq_n_s32(quad));
                        for (sum, k) in sums.iter_mut().zip(k) {
                            *sum = sdot(*sum, k, quad);
                        }
                    }
                }
                let scale: [float32x4_t; 4] =
                    std::array::from_fn(|v| vld1q_f32(kv.key_scale.as_ptr().add(b * 16 + 4 * v)));
                for (r, sums) in acc.iter().enumerate() {
                    let o = scores.as_mut_ptr().add((i * R + r) * d.keys + b * 16);
                    for (v, sum) in sums.iter().enumerate() {
                        vst1q_f32(o.add(4 * v), vmulq_f32(vcvtq_f32_s32(*sum), scale[v]));
                    }
                }
            }
        }
    }

    /// `os = ps v` as `x86::weighted` computes it (the same exact integer sums per key block, the
    /// same fused multiply-add across blocks). A pair of keys' codes for 4 dims is one vector of 8;
    /// `smlal` multiplies it by the broadcast pair of weights into 4 lanes of sums (two per dim),
    /// added pairwise at the block's end.
    #[target_feature(enable = "neon")]
    pub unsafe fn weighted(
        ps: &[i16],
        ps_scale: &[f32],
        values: &[i16],
        d: Dims,
        rows: usize,
        os: &mut [f32],
    ) {
        let kblocks = d.keys.div_ceil(KB);
        assert!(rows.is_multiple_of(R) && d.keys.is_multiple_of(2) && d.dpad.is_multiple_of(8));
        assert!(ps.len() >= rows * d.keys && ps_scale.len() >= rows * kblocks);
        assert!(values.len() >= d.keys * d.dpad && os.len() >= rows * d.dpad);
        for kb in 0..kblocks {
            let first = kb * KB;
            let steps = (d.keys.min(first + KB) - first) / 2;
            let panel = values.as_ptr().add(first * d.dpad);
            for i in (0..rows).step_by(R) {
                let a: [*const i16; R] =
                    std::array::from_fn(|r| ps.as_ptr().add((i + r) * d.keys + first));
                let scale: [float32x4_t; R] =
                    std::array::from_fn(|r| vdupq_n_f32(ps_scale[(i + r) * kblocks + kb]));
                for c in (0..d.dpad).step_by(8) {
                    let mut acc = [[vdupq_n_s32(0); 4]; R];
                    for s in 0..steps {
                        // Dims c..c + 8 of keys first + 2s and first + 2s + 1, interleaved.
                        let at = panel.add(s * 2 * d.dpad + 2 * c);
                        let (v0, v1) = (vld1q_s16(at), vld1q_s16(at.add(8)));
                        for (sums, a) in acc.iter_mut().zip(a) {
                            let pair = (a.add(2 * s) as *const i32).read_unaligned();
                            let pair = vreinterpretq_s16_s32(vdupq_n_s32(pair));
                            let low = vget_low_s16(pair);
                            sums[0] = vmlal_s16(sums[0], vget_low_s16(v0), low);
                            sums[1] = vmlal_high_s16(sums[1], v0, pair);
                            sums[2] = vmlal_s16(sums[2], vget_low_s16(v1), low);
                            sums[3] = vmlal_high_s16(sums[3], v1, pair);
                        }
                    }
                    for (r, sums) in acc.iter().enumerate() {
                        let o = os.as_mut_ptr().add((i + r) * d.dpad + c);
                        for h in 0..2 {
                            let x = vcvtq_f32_s32(vpaddq_s32(sums[2 * h], sums[2 * h + 1]));
                            let y = if kb == 0 {
                                vmulq_f32(x, scale[r])
                            } else {
                                vfmaq_f32(vld1q_f32(o.add(4 * h)), x, scale[r])
                            };
                            vst1q_f32(o.add(4 * h), y);
                        }
                    }
                }
            }
        }
    }

    /// [`super::exp2`] on 4 lanes: the same clamp, steps and rounding, `2^n` written into the
    /// exponent bits (exact: `n >= -126`).
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn exp2(t: float32x4_t) -> float32x4_t {
        let t = vmaxq_f32(t, vdupq_n_f32(-126.0));
        let n = vrndnq_f32(t);
        let f = vsubq_f32(t, n);
        let mut p = vdupq_n_f32(EXP2_POLY[0]);
        for c in &EXP2_POLY[1..] {
            p = vfmaq_f32(vdupq_n_f32(*c), p, f);
        }
        let pow2n = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(p, vreinterpretq_f32_s32(pow2n))
    }

    /// One row's softmax weights as codes, as `x86::softmax_codes` (and the reference) makes them:
    /// the exps of [`super::softmax_exps`] written over the scores `s`, coded per block of [`KB`]
    /// keys as [`super::weight_codes`] codes them, zeros for the padding `p[s.len()..]`; returns
    /// the f32 sum of the unrounded exps. The last `s.len() % 4` scores take the scalar steps.
    #[target_feature(enable = "neon")]
    pub unsafe fn softmax_codes(
        s: &mut [f32],
        qscale: f32,
        p: &mut [i16],
        scales: &mut [f32],
    ) -> f32 {
        let (n, keys) = (s.len(), p.len());
        assert!(n <= keys && keys.is_multiple_of(16) && scales.len() >= keys.div_ceil(KB));
        let full = n - n % 4;
        let x = s.as_mut_ptr();
        let mut mv = vdupq_n_f32(f32::NEG_INFINITY);
        for at in (0..full).step_by(4) {
            mv = vmaxq_f32(mv, vld1q_f32(x.add(at)));
        }
        let m = (full..n).fold(vmaxvq_f32(mv), |a, j| a.max(*x.add(j)));
        let c = qscale * std::f32::consts::LOG2_E;
        let mc = m * c;
        let (cv, neg_mc) = (vdupq_n_f32(c), vdupq_n_f32(-mc));
        let mut acc = vdupq_n_f32(0.0);
        let mut tail = 0f32;
        for (kb, first) in (0..n).step_by(KB).enumerate() {
            let end = n.min(first + KB);
            let mut top = vdupq_n_f32(0.0);
            let mut top_tail = 0f32;
            for at in (first..end).step_by(4) {
                if at + 4 <= end {
                    let e = exp2(vfmaq_f32(neg_mc, vld1q_f32(x.add(at)), cv));
                    vst1q_f32(x.add(at), e);
                    acc = vaddq_f32(acc, e);
                    top = vmaxq_f32(top, e);
                } else {
                    for j in at..end {
                        let v = &mut *x.add(j);
                        *v = super::exp2(v.mul_add(c, -mc));
                        tail += *v;
                        top_tail = top_tail.max(*v);
                    }
                }
            }
            scales[kb] = vmaxvq_f32(top).max(top_tail);
        }
        for (kb, first) in (0..keys).step_by(KB).enumerate() {
            let (scale, iscale) = if first < n {
                super::levels(scales[kb], P_LEVELS)
            } else {
                (0.0, 0.0)
            };
            scales[kb] = scale;
            let iscale = vdupq_n_f32(iscale);
            for at in (first..keys.min(first + KB)).step_by(4) {
                let e = if at + 4 <= n {
                    vld1q_f32(x.add(at))
                } else {
                    let lanes: [f32; 4] =
                        std::array::from_fn(|j| if at + j < n { *x.add(at + j) } else { 0.0 });
                    vld1q_f32(lanes.as_ptr())
                };
                let codes = vmovn_s32(vcvtnq_s32_f32(vmulq_f32(e, iscale)));
                vst1_s16(p.as_mut_ptr().add(at), codes);
            }
        }
        vaddvq_f32(acc) + tail
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{Dims, Packed, JB, KB, R};

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
            let q: [*const i8; R] =
                std::array::from_fn(|r| kv.queries.as_ptr().add((first + r) * qw));
            let a = Query {
                codes: q,
                offset: kv.query_offset[first..first + R]
                    .try_into()
                    .expect("R rows"),
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

    /// [`R`] query rows' codes and offsets.
    struct Query {
        codes: [*const i8; R],
        offset: [i32; R],
    }

    /// [`R`] query rows against `B` blocks of 16 keys starting at `keys` (their scales at
    /// `key_scale`): per row and block, the integer sum of the codes' products (starting from the
    /// row's offset, which takes the `+128` of the keys back off), then times the key's scale. The
    /// query's scale is left to the softmax ([`softmax_codes`]), one multiply there per score.
    #[inline(always)]
    unsafe fn kernel8<const B: usize>(
        q: &Query,
        keys: *const u8,
        key_scale: *const f32,
        quads: usize,
        out: [*mut f32; R],
    ) {
        let mut acc: [[__m512i; B]; R] =
            std::array::from_fn(|r| [_mm512_set1_epi32(q.offset[r]); B]);
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
        let scale: [__m512; B] = std::array::from_fn(|b| _mm512_loadu_ps(key_scale.add(16 * b)));
        for (o, sums) in out.iter().zip(&acc) {
            for (b, sum) in sums.iter().enumerate() {
                let exact = _mm512_cvtepi32_ps(*sum);
                _mm512_storeu_ps(o.add(16 * b), _mm512_mul_ps(exact, scale[b]));
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

    /// `os = ps v` for `rows` (a multiple of [`R`]) rows of softmax weights' codes `ps` (`d.keys`
    /// per row; their scales `ps_scale`, one per row and block of [`KB`] keys) against the packed
    /// values' codes; `os` is `rows x d.dpad`, before the values' scales. Key blocks outermost, so a
    /// block's values (64 keys of 80 dims are 10 KB) stay in L1 for every row group of the tile.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn weighted(
        ps: &[i16],
        ps_scale: &[f32],
        values: &[i16],
        d: Dims,
        rows: usize,
        os: &mut [f32],
    ) {
        let kblocks = d.keys.div_ceil(KB);
        let blocks = d.dpad / 16;
        assert!(rows.is_multiple_of(R) && d.keys.is_multiple_of(2));
        assert!(ps.len() >= rows * d.keys && ps_scale.len() >= rows * kblocks);
        assert!(values.len() >= d.keys * d.dpad && os.len() >= rows * d.dpad);
        for kb in 0..kblocks {
            let first = kb * KB;
            let steps = (d.keys.min(first + KB) - first) / 2;
            // Pair `first / 2` of keys, each pair `2 * d.dpad` codes.
            let panel = values.as_ptr().add(first * d.dpad);
            for i in (0..rows).step_by(R) {
                let a: [*const i16; R] =
                    std::array::from_fn(|r| ps.as_ptr().add((i + r) * d.keys + first));
                let scale: [f32; R] = std::array::from_fn(|r| ps_scale[(i + r) * kblocks + kb]);
                let mut b = 0;
                while b < blocks {
                    // Up to 6 blocks (96 dims) per call: 24 sums, 6 loads and a broadcast.
                    let w = (blocks - b).min(6);
                    let at = Block {
                        values: panel.add(b * 32),
                        step: 2 * d.dpad,
                        steps,
                        first: kb == 0,
                    };
                    let o: [*mut f32; R] =
                        std::array::from_fn(|r| os.as_mut_ptr().add((i + r) * d.dpad + b * 16));
                    match w {
                        1 => kernel::<1>(a, scale, &at, o),
                        2 => kernel::<2>(a, scale, &at, o),
                        3 => kernel::<3>(a, scale, &at, o),
                        4 => kernel::<4>(a, scale, &at, o),
                        5 => kernel::<5>(a, scale, &at, o),
                        _ => kernel::<6>(a, scale, &at, o),
                    }
                    b += w;
                }
            }
        }
    }

    /// Where a kernel call's values lie: 16 dims' codes of a pair of keys at `values + s * step`
    /// for step `s < steps`, the next 16 dims 32 codes on; `first` when it is the first key block
    /// (the output is written, not added to).
    struct Block {
        values: *const i16,
        step: usize,
        steps: usize,
        first: bool,
    }

    /// [`R`] rows of weights (`a`, their block scales `scale`) against `B` blocks of 16 dims: `R x B`
    /// integer sums in registers, one broadcast pair per row and one load per block each step; at
    /// the end each sum, as f32 times its row's scale, is stored or added to `out`.
    #[inline(always)]
    unsafe fn kernel<const B: usize>(
        a: [*const i16; R],
        scale: [f32; R],
        at: &Block,
        out: [*mut f32; R],
    ) {
        let mut acc = [[_mm512_setzero_si512(); B]; R];
        for s in 0..at.steps {
            let v: [__m512i; B] = std::array::from_fn(|b| {
                _mm512_loadu_si512(at.values.add(s * at.step + b * 32) as *const __m512i)
            });
            for r in 0..R {
                let pair = _mm512_set1_epi32((a[r].add(2 * s) as *const i32).read_unaligned());
                for b in 0..B {
                    acc[r][b] = _mm512_dpwssd_epi32(acc[r][b], pair, v[b]);
                }
            }
        }
        for r in 0..R {
            let sc = _mm512_set1_ps(scale[r]);
            for (b, sum) in acc[r].iter().enumerate() {
                let o = out[r].add(16 * b);
                let x = _mm512_cvtepi32_ps(*sum);
                let y = if at.first {
                    _mm512_mul_ps(x, sc)
                } else {
                    _mm512_fmadd_ps(x, sc, _mm512_loadu_ps(o))
                };
                _mm512_storeu_ps(o, y);
            }
        }
    }

    /// [`super::exp2`] on 16 lanes, the same value in every lane (the same clamp, steps and
    /// rounding; `vscalefps` multiplies by `2^n`).
    #[inline(always)]
    unsafe fn exp2(t: __m512) -> __m512 {
        let t = _mm512_max_ps(t, _mm512_set1_ps(-126.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(super::EXP2_POLY[0]);
        for c in &super::EXP2_POLY[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// One row's softmax weights as codes: the exps of [`super::softmax_exps`] (the row's scores
    /// `s`, before the query's scale `qscale`), written over the scores, then coded as
    /// [`super::weight_codes`] codes them (zeros for the padded keys `p[s.len()..]`, `p.len()` a
    /// multiple of 16); returns the f32 sum of the unrounded exps. Each block's largest exp is found
    /// in the first pass and its codes made in a second, so no block waits on its own reduction and
    /// division.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn softmax_codes(
        s: &mut [f32],
        qscale: f32,
        p: &mut [i16],
        scales: &mut [f32],
    ) -> f32 {
        let (n, keys) = (s.len(), p.len());
        assert!(n <= keys && keys.is_multiple_of(16) && scales.len() >= keys.div_ceil(KB));
        let full = n - n % 16;
        let tail = ((1u32 << (n % 16)) - 1) as u16;
        let x = s.as_mut_ptr();
        // Four running maxima, so the loads (from L2: the tile's scores outgrow L1) overlap rather
        // than wait on one chain of `vmaxps`.
        let mut mv = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
        let mut at = 0;
        while at + 64 <= full {
            for (i, m) in mv.iter_mut().enumerate() {
                *m = _mm512_max_ps(*m, _mm512_loadu_ps(x.add(at + 16 * i)));
            }
            at += 64;
        }
        while at < full {
            mv[0] = _mm512_max_ps(mv[0], _mm512_loadu_ps(x.add(at)));
            at += 16;
        }
        if tail != 0 {
            mv[1] = _mm512_max_ps(mv[1], _mm512_mask_loadu_ps(mv[1], tail, x.add(full)));
        }
        let mv = _mm512_max_ps(_mm512_max_ps(mv[0], mv[1]), _mm512_max_ps(mv[2], mv[3]));
        let c = qscale * std::f32::consts::LOG2_E;
        let mc = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * c);
        let c = _mm512_set1_ps(c);
        let mut acc = _mm512_setzero_ps();
        for (kb, first) in (0..n).step_by(KB).enumerate() {
            let mut top = _mm512_setzero_ps();
            for at in (first..n.min(first + KB)).step_by(16) {
                let e = if at < full {
                    let e = exp2(_mm512_fmsub_ps(_mm512_loadu_ps(x.add(at)), c, mc));
                    _mm512_storeu_ps(x.add(at), e);
                    e
                } else {
                    let t = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, x.add(at)), c, mc);
                    let e = _mm512_maskz_mov_ps(tail, exp2(t));
                    _mm512_mask_storeu_ps(x.add(at), tail, e);
                    e
                };
                acc = _mm512_add_ps(acc, e);
                top = _mm512_max_ps(top, e);
            }
            scales[kb] = _mm512_reduce_max_ps(top);
        }
        for (kb, first) in (0..keys).step_by(KB).enumerate() {
            let (scale, iscale) = if first < n {
                super::levels(scales[kb], super::P_LEVELS)
            } else {
                (0.0, 0.0)
            };
            scales[kb] = scale;
            let iscale = _mm512_set1_ps(iscale);
            for at in (first..keys.min(first + KB)).step_by(16) {
                let e = if at < full {
                    _mm512_loadu_ps(x.add(at))
                } else {
                    let mask = if at == full { tail } else { 0 };
                    _mm512_maskz_loadu_ps(mask, x.add(at))
                };
                let codes = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(e, iscale)));
                _mm256_storeu_si256(p.as_mut_ptr().add(at) as *mut __m256i, codes);
            }
        }
        _mm512_reduce_add_ps(acc)
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
    fn integer_segment_attention_matches_reference() {
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
    /// of its roundings), and the kernel against the reference (same rounding points and the same
    /// `2^t`, so only the order of the f32 sums differs), `q`, `k`, `v` laid out per head.
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

    /// The weighted-sum kernel against the exact integer sums of each key block times its scale
    /// (summed in f64), on widths of 1 to 7 blocks of 16 dims (every call width and a remainder),
    /// several row groups, key counts of one step, one block and a partial last block; and at the
    /// codes' extremes (every weight and value code at its largest, same sign), where a block's sum
    /// is 2^31 less 0.05%.
    #[test]
    fn weighted_kernel_matches_the_exact_sums() {
        if !available(Isa::detect()) {
            return;
        }
        let cases = [
            (16, 2, 4, false),
            (80, 48, 8, false),
            (96, 64, 4, false),
            (112, 150, 12, false),
            (48, 128, 4, true),
        ];
        for (dpad, keys, rows, extreme) in cases {
            let d = Dims {
                len: keys,
                dim: dpad,
                keys,
                quads: dpad / 4,
                dpad,
            };
            let kblocks = keys.div_ceil(KB);
            let (ps, values): (Vec<i16>, Vec<i16>) = if extreme {
                let p = P_LEVELS as i16;
                (vec![p; rows * keys], vec![V_LEVELS as i16; keys * dpad])
            } else {
                let ps = data(rows * keys, 6)
                    .into_iter()
                    .map(|x| (x.abs() * 8191.0) as i16);
                let vs = data(keys * dpad, 7)
                    .into_iter()
                    .map(|x| (x * 1023.0) as i16);
                (ps.collect(), vs.collect())
            };
            let ps_scale: Vec<f32> = data(rows * kblocks, 8).iter().map(|x| x.abs()).collect();
            // `[pair of keys][dim][2]`.
            let at = |j: usize, c: usize| values[(j / 2) * dpad * 2 + c * 2 + j % 2] as i64;
            let mut got = vec![0f32; rows * dpad];
            // SAFETY: `available` said the CPU has the integer products; the operands hold `rows`
            // rows of `keys` weights and of `kblocks` scales, `keys` rows of `dpad` values and
            // `rows x dpad` outputs.
            unsafe { simd::weighted(&ps, &ps_scale, &values, d, rows, &mut got) };
            for i in 0..rows {
                for c in 0..dpad {
                    let (mut want, mut size) = (0f64, 0f64);
                    for b in 0..kblocks {
                        let block = b * KB..keys.min(b * KB + KB);
                        let p = |j: usize| ps[i * keys + j] as i64;
                        let exact: i64 = block.clone().map(|j| p(j) * at(j, c)).sum();
                        let abs: i64 = block.map(|j| (p(j) * at(j, c)).abs()).sum();
                        let scale = ps_scale[i * kblocks + b] as f64;
                        want += exact as f64 * scale;
                        size += abs as f64 * scale;
                    }
                    let g = got[i * dpad + c] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * size,
                        "d{dpad} k{keys} r{rows} at {i},{c}: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The softmax codes equal the exps of `softmax_exps` coded by `weight_codes`, bit for
    /// bit, scales included, with zeros over the padding, and the same sum up to the order of f32
    /// additions: rows shorter than, equal to and longer than a vector and a key block, with a tail
    /// and without, with blocks whose weights all underflow to zero.
    #[test]
    fn softmax_codes_equal_exp_then_coding() {
        if !available(Isa::detect()) {
            return;
        }
        for len in [1, 15, 16, 17, 64, 70, 200, 1024] {
            let mut s: Vec<f32> = data(len, len).iter().map(|x| 9.0 * x).collect();
            if len > 128 {
                // The second block far below the first: every weight in it underflows.
                s[64..128].iter_mut().for_each(|x| *x -= 400.0);
            }
            let keys = len.div_ceil(16) * 16;
            let kblocks = keys.div_ceil(KB);
            let mut e = s.clone();
            let qscale = 0.37;
            let want_sum = softmax_exps(&mut e, qscale);
            let (mut want, mut want_scale) = (vec![0i16; keys], vec![0f32; kblocks]);
            weight_codes(&e, &mut want, &mut want_scale);
            let (mut got, mut got_scale) = (vec![-1i16; keys], vec![-1f32; kblocks]);
            // SAFETY: `available` said the CPU has the SIMD path.
            let mut scores = s.clone();
            let sum = unsafe { simd::softmax_codes(&mut scores, qscale, &mut got, &mut got_scale) };
            assert_eq!(got, want, "len {len}");
            assert_eq!(got_scale, want_scale, "len {len}");
            assert_eq!(scores, e, "len {len}: the exps, written over the scores");
            assert!(
                (sum - want_sum).abs() <= 1e-6 * want_sum,
                "len {len}: {sum} vs {want_sum}"
            );
            if len > 128 {
                assert_eq!(want_scale[1], 0.0, "the underflowing block");
            }
        }
    }

    /// The softmax's `2^t` within 3e-7 of f64's, relatively, over the whole range it serves above
    /// the subnormals, integers and halves included; the clamp at -126 below it.
    #[test]
    fn exp2_is_within_3e7_of_f64() {
        for i in 0..=120_000 {
            let t = -(i as f32) * 1e-3;
            let (got, want) = (exp2(t) as f64, (t as f64).exp2());
            assert!((got - want).abs() <= 3e-7 * want, "2^{t}: {got} vs {want}");
        }
        assert_eq!(exp2(-1000.0), exp2(-126.0));
        assert_eq!(exp2(0.0), 1.0);
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
    fn integer_attention_reads_the_fused_projection_in_place() {
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
