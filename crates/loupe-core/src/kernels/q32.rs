//! Matrix-vector products with GGML's 32-value block formats, read where they are stored: Q4_0,
//! Q4_1, Q5_0, Q5_1 and Q8_0 (what llama.cpp writes for small models, and for the matrices of any
//! model whose rows are not whole 256-value K-quant blocks, e.g. SmolLM2's 576).
//!
//! Why our own: candle 0.11 has x86 SIMD for Q4_0 and Q8_0 only; Q4_1, Q5_0 and Q5_1 run as a plain
//! scalar loop (SmolLM2-135M at Q4_1 decoded at 26 tokens/s on 2 cores through it).
//!
//! The activations are quantized once per call to [`BlockQ8x32`] (llama.cpp's Q8_0 with Q8_1's
//! block sum: one f32 scale, 32 signed bytes, the scaled sum of the bytes for the formats with a
//! minimum). Each block's integer products are summed exactly and scaled once; [`scalar`] is the
//! reference, the AVX2 version computes the same integers and differs only in the order of the
//! float sums.

use half::f16;

use super::Isa;

mod tiles;
pub use tiles::{applies as matmul_applies, matmul, preferred as matmul_preferred};

/// Values per block.
pub const QK: usize = 32;

/// The 32-value block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format32 {
    /// `d`, 16 bytes of 4-bit codes; value `(q - 8) d`.
    Q4_0,
    /// `d`, `m`, 16 bytes of 4-bit codes; value `q d + m`.
    Q4_1,
    /// `d`, 32 high bits, 16 bytes of low 4 bits; value `(q - 16) d`.
    Q5_0,
    /// `d`, `m`, 32 high bits, 16 bytes of low 4 bits; value `q d + m`.
    Q5_1,
    /// `d`, 32 signed bytes; value `q d`.
    Q8_0,
}

impl Format32 {
    /// The format of a GGML type, when these kernels read it.
    pub fn of(q: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match q {
            G::Q4_0 => Some(Format32::Q4_0),
            G::Q4_1 => Some(Format32::Q4_1),
            G::Q5_0 => Some(Format32::Q5_0),
            G::Q5_1 => Some(Format32::Q5_1),
            G::Q8_0 => Some(Format32::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Format32::Q4_0 => 18,
            Format32::Q4_1 => 20,
            Format32::Q5_0 => 22,
            Format32::Q5_1 => 24,
            Format32::Q8_0 => 34,
        }
    }
}

/// 32 activations: `d` the scale, `qs` the codes, `sum = sum(qs)` and `s = d * sum` (for the
/// minimum's term).
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8x32 {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; QK],
}

impl BlockQ8x32 {
    /// All-zero activations (scale 0).
    pub const ZERO: BlockQ8x32 = BlockQ8x32 {
        d: 0.0,
        s: 0.0,
        sum: 0,
        qs: [0; QK],
    };
}

/// Quantizes `x` (a multiple of 32 values) as llama.cpp's `quantize_row_q8_0`: per block, the
/// largest magnitude maps to 127, values round to nearest (halves away from zero).
pub fn quantize(x: &[f32]) -> Vec<BlockQ8x32> {
    let mut out = vec![BlockQ8x32::ZERO; x.len() / QK];
    quantize_into(x, &mut out);
    out
}

/// [`quantize`] into `out` (one block per 32 values of `x`).
pub fn quantize_into(x: &[f32], out: &mut [BlockQ8x32]) {
    for (xs, block) in x.chunks_exact(QK).zip(out) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let mut qs = [0i8; QK];
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        }
        let sum: i32 = qs.iter().map(|&q| q as i32).sum();
        *block = BlockQ8x32 {
            d,
            s: d * sum as f32,
            sum,
            qs,
        };
    }
}

/// A `(rows, cols)` matrix of 32-value blocks, row-major, borrowed from wherever the weights live.
#[derive(Debug, Clone, Copy)]
pub struct Q32Rows<'a> {
    format: Format32,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl<'a> Q32Rows<'a> {
    /// `None` unless `data` holds exactly `rows` rows of `cols / 32` blocks.
    pub fn new(format: Format32, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let ok = cols > 0
            && cols.is_multiple_of(QK)
            && data.len() == rows * cols / QK * format.block_bytes();
        ok.then_some(Q32Rows {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self, row: usize) -> &'a [u8] {
        let n = self.cols / QK * self.format.block_bytes();
        &self.data[row * n..(row + 1) * n]
    }

    /// The dot product of row `row` with activations `y` (`cols / 32` blocks).
    pub fn dot(&self, isa: Isa, row: usize, y: &[BlockQ8x32]) -> f32 {
        let w = self.row_bytes(row);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the x86 SIMD paths are only handed out when the CPU has AVX2, FMA and F16C.
            Isa::Avx2 | Isa::Avx512 => unsafe { avx2::dot(self.format, w, y) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: the dot-product paths are only handed out when the CPU has `dotprod`.
            Isa::NeonDot | Isa::NeonI8mm => unsafe { neon::dot_sdot(self.format, w, y) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: every AArch64 CPU has NEON.
            Isa::Neon => unsafe { neon::dot_widening(self.format, w, y) },
            _ => scalar::dot(self.format, w, y),
        }
    }

    /// Row `row` expanded to f32.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        scalar::dequantize(self.format, self.row_bytes(row), out)
    }
}

/// Rows of weights handed to one parallel region at a time.
const ROW_BLOCK: usize = 16;

/// `outs[i][r * rows_i + j] = x_r · row j of ws[i]` for the `m` rows of `x` (`m x cols`, row-major):
/// the activations are quantized once and shared by every matrix, on candle's thread pool.
pub fn matvec(isa: Isa, ws: &[Q32Rows], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let cols = ws.first().map_or(0, |w| w.cols);
    assert!(ws.iter().all(|w| w.cols == cols) && x.len() == m * cols);
    let yq: Vec<Vec<BlockQ8x32>> = x.chunks_exact(cols.max(1)).map(quantize).collect();
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let rows: Vec<usize> = ws.iter().map(|w| w.rows).collect();
    super::pool::for_each_row(&rows, ROW_BLOCK, |i, row| {
        let (w, out) = (&ws[i], ptrs[i] as *mut f32);
        for (r, y) in yq.iter().enumerate() {
            let v = w.dot(isa, row, y);
            // SAFETY: every (matrix, r, row) is written by exactly one call, inside `outs`.
            unsafe { *out.add(r * w.rows + row) = v };
        }
    });
    outs
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The reference: one block at a time, in plain integer arithmetic.
pub mod scalar {
    use super::*;

    /// Block `b`'s 32 codes (before the offset), its scale and its minimum (0 where none).
    pub fn codes(format: Format32, b: &[u8]) -> ([i32; QK], f32, f32) {
        let mut q = [0i32; QK];
        let nibbles = |q: &mut [i32; QK], qs: &[u8]| {
            for j in 0..QK / 2 {
                q[j] = (qs[j] & 0x0F) as i32;
                q[j + QK / 2] = (qs[j] >> 4) as i32;
            }
        };
        let high = |q: &mut [i32; QK], qh: &[u8]| {
            let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for (j, v) in q.iter_mut().enumerate() {
                *v |= (((bits >> j) & 1) << 4) as i32;
            }
        };
        match format {
            Format32::Q4_0 => {
                nibbles(&mut q, &b[2..18]);
                q.iter_mut().for_each(|v| *v -= 8);
                (q, half(b, 0), 0.0)
            }
            Format32::Q4_1 => {
                nibbles(&mut q, &b[4..20]);
                (q, half(b, 0), half(b, 2))
            }
            Format32::Q5_0 => {
                nibbles(&mut q, &b[6..22]);
                high(&mut q, &b[2..6]);
                q.iter_mut().for_each(|v| *v -= 16);
                (q, half(b, 0), 0.0)
            }
            Format32::Q5_1 => {
                nibbles(&mut q, &b[8..24]);
                high(&mut q, &b[4..8]);
                (q, half(b, 0), half(b, 2))
            }
            Format32::Q8_0 => {
                for (v, &c) in q.iter_mut().zip(&b[2..34]) {
                    *v = c as i8 as i32;
                }
                (q, half(b, 0), 0.0)
            }
        }
    }

    pub fn dot(format: Format32, w: &[u8], y: &[BlockQ8x32]) -> f32 {
        let mut sum = 0f32;
        for (b, y) in w.chunks_exact(format.block_bytes()).zip(y) {
            let (q, d, m) = codes(format, b);
            let int: i32 = q.iter().zip(&y.qs).map(|(&a, &b)| a * b as i32).sum();
            sum += d * y.d * int as f32 + m * y.s;
        }
        sum
    }

    pub fn dequantize(format: Format32, w: &[u8], out: &mut [f32]) {
        for (b, o) in w
            .chunks_exact(format.block_bytes())
            .zip(out.chunks_exact_mut(QK))
        {
            let (q, d, m) = codes(format, b);
            for (o, &q) in o.iter_mut().zip(&q) {
                *o = q as f32 * d + m;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use core::arch::x86_64::*;

    /// The 32 bits at `p` as 32 bytes: 0x10 where the bit is set, else 0 (Q5's fifth bit).
    #[target_feature(enable = "avx2")]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        let bits = (p as *const u32).read_unaligned() as i32;
        let v = _mm256_set1_epi32(bits);
        // Byte e takes byte e / 8 of the bits, then tests its bit e % 8.
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0x0000000000000000,
            ),
        );
        let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// 16 bytes of nibbles at `p` as 32 bytes: the low nibbles, then the high ones.
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let b = _mm_loadu_si128(p as *const __m128i);
        let lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
        _mm256_set_m128i(hi, lo)
    }

    /// Sums of 8 products of unsigned bytes `u` and signed bytes `s`, as 8 i32 lanes.
    #[target_feature(enable = "avx2")]
    unsafe fn dot_us(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// As [`dot_us`] for signed `a`: `|a|` times `s` with `a`'s sign.
    #[target_feature(enable = "avx2")]
    unsafe fn dot_ss(a: __m256i, s: __m256i) -> __m256i {
        dot_us(_mm256_sign_epi8(a, a), _mm256_sign_epi8(s, a))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(format: Format32, w: &[u8], y: &[BlockQ8x32]) -> f32 {
        let bb = format.block_bytes();
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (i, y) in y.iter().enumerate().take(w.len() / bb) {
            let b = w.as_ptr().add(i * bb);
            let ys = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
            let d = half_at(b, 0) * y.d;
            let int = match format {
                Format32::Q4_0 => {
                    dot_ss(_mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8)), ys)
                }
                Format32::Q4_1 => {
                    mins += half_at(b, 2) * y.s;
                    dot_us(nibbles(b.add(4)), ys)
                }
                Format32::Q5_0 => {
                    let q = _mm256_or_si256(nibbles(b.add(6)), fifth_bits(b.add(2)));
                    dot_ss(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), ys)
                }
                Format32::Q5_1 => {
                    mins += half_at(b, 2) * y.s;
                    dot_us(_mm256_or_si256(nibbles(b.add(8)), fifth_bits(b.add(4))), ys)
                }
                Format32::Q8_0 => dot_ss(_mm256_loadu_si256(b.add(2) as *const __m256i), ys),
            };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(int), acc);
        }
        hsum(acc) + mins
    }

    #[target_feature(enable = "f16c")]
    unsafe fn half_at(p: *const u8, at: usize) -> f32 {
        let h = (p.add(at) as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }
}

/// The NEON versions: each block's 32 codes as two registers of signed bytes, their products with
/// the activations summed into four 32-bit lanes by `sdot` ([`Isa::NeonDot`]) or by `smull` and
/// pairwise adds ([`Isa::Neon`]): the same integers as the reference, scaled once per block.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::*;
    use crate::kernels::neon::{dot_widening as widening, sdot};
    use core::arch::aarch64::*;

    /// 16 bytes of nibbles at `p`: the low nibbles (values 0..16), then the high ones (16..32).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (int8x16_t, int8x16_t) {
        let b = vld1q_u8(p);
        (
            vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0F))),
            vreinterpretq_s8_u8(vshrq_n_u8::<4>(b)),
        )
    }

    /// The 32 bits at `p` as 32 bytes: 0x10 where the bit is set, else 0 (Q5's fifth bit).
    #[inline(always)]
    unsafe fn fifth_bits(p: *const u8) -> (int8x16_t, int8x16_t) {
        const LO: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
        const HI: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
        const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let bits = vreinterpretq_u8_u32(vdupq_n_u32((p as *const u32).read_unaligned()));
        let mask = vld1q_u8(BIT.as_ptr());
        // Byte e takes byte e / 8 of the bits, then tests its bit e % 8.
        let at = |idx: &[u8; 16]| {
            let spread = vqtbl1q_u8(bits, vld1q_u8(idx.as_ptr()));
            vreinterpretq_s8_u8(vandq_u8(vtstq_u8(spread, mask), vdupq_n_u8(0x10)))
        };
        (at(&LO), at(&HI))
    }

    #[inline(always)]
    unsafe fn half_at(p: *const u8, at: usize) -> f32 {
        f16::from_bits((p.add(at) as *const u16).read_unaligned()).to_f32()
    }

    /// One block's codes (offset applied) as two registers, and its minimum (0 where none).
    #[inline(always)]
    unsafe fn codes(format: Format32, b: *const u8) -> (int8x16_t, int8x16_t, f32) {
        let off = |(a, b): (int8x16_t, int8x16_t), o: i8| {
            (vsubq_s8(a, vdupq_n_s8(o)), vsubq_s8(b, vdupq_n_s8(o)))
        };
        let or = |(a, b): (int8x16_t, int8x16_t), (c, d): (int8x16_t, int8x16_t)| {
            (vorrq_s8(a, c), vorrq_s8(b, d))
        };
        let ((q0, q1), m) = match format {
            Format32::Q4_0 => (off(nibbles(b.add(2)), 8), 0.0),
            Format32::Q4_1 => (nibbles(b.add(4)), half_at(b, 2)),
            Format32::Q5_0 => (off(or(nibbles(b.add(6)), fifth_bits(b.add(2))), 16), 0.0),
            Format32::Q5_1 => (or(nibbles(b.add(8)), fifth_bits(b.add(4))), half_at(b, 2)),
            Format32::Q8_0 => ((vld1q_s8(b.add(2) as _), vld1q_s8(b.add(18) as _)), 0.0),
        };
        (q0, q1, m)
    }

    macro_rules! dot_with {
        ($(#[$doc:meta])* $name:ident, $features:literal, $dot:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub unsafe fn $name(format: Format32, w: &[u8], y: &[BlockQ8x32]) -> f32 {
                let bb = format.block_bytes();
                let mut acc = vdupq_n_f32(0.0);
                let mut mins = 0f32;
                for (i, y) in y.iter().enumerate().take(w.len() / bb) {
                    let b = w.as_ptr().add(i * bb);
                    let (q0, q1, m) = codes(format, b);
                    mins += m * y.s;
                    let ys = y.qs.as_ptr();
                    let int = $dot(vdupq_n_s32(0), q0, vld1q_s8(ys));
                    let int = $dot(int, q1, vld1q_s8(ys.add(16)));
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(int), half_at(b, 0) * y.d);
                }
                vaddvq_f32(acc) + mins
            }
        };
    }

    dot_with!(
        /// [`Isa::NeonDot`]: `sdot`.
        dot_sdot,
        "neon,dotprod",
        sdot
    );
    dot_with!(
        /// [`Isa::Neon`]: `smull` and pairwise adds.
        dot_widening,
        "neon",
        widening
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    const FORMATS: [(Format32, GgmlDType); 5] = [
        (Format32::Q4_0, GgmlDType::Q4_0),
        (Format32::Q4_1, GgmlDType::Q4_1),
        (Format32::Q5_0, GgmlDType::Q5_0),
        (Format32::Q5_1, GgmlDType::Q5_1),
        (Format32::Q8_0, GgmlDType::Q8_0),
    ];

    /// Blocks of `rows x cols` random weights in `q`, as candle (GGML's quantizer) writes them.
    fn blocks(q: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0.3f32, 1.0, (rows, cols), &dev).unwrap();
        // Distinct data per seed: scale by the seed.
        let w = (w * (1.0 + seed as f64 * 0.1)).unwrap();
        QTensor::quantize(&w, q)
            .unwrap()
            .data()
            .unwrap()
            .into_owned()
    }

    fn activations(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0 - 1.0) * 3.0)
            .collect()
    }

    #[test]
    fn the_reference_dequantizes_as_candle_does() {
        for (f, q) in FORMATS {
            let (rows, cols) = (3, 96);
            let data = blocks(q, rows, cols, 1);
            let m = Q32Rows::new(f, rows, cols, &data).unwrap();
            let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
                q,
                &data,
                vec![rows, cols],
                &Device::Cpu,
            )
            .unwrap();
            let want = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let want = want.to_vec1::<f32>().unwrap();
            let mut got = vec![0f32; rows * cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut got[r * cols..(r + 1) * cols]);
            }
            assert_eq!(got, want, "{f:?}");
        }
    }

    #[test]
    fn the_reference_dot_is_the_dequantized_dot_within_the_activations_rounding() {
        for (f, q) in FORMATS {
            let cols = 32 * 7;
            let data = blocks(q, 1, cols, 2);
            let m = Q32Rows::new(f, 1, cols, &data).unwrap();
            let x = activations(cols, 3);
            let mut w = vec![0f32; cols];
            m.dequantize_row(0, &mut w);
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            let got = m.dot(Isa::Scalar, 0, &quantize(&x));
            // Each activation is off by at most half a step (amax / 254).
            let bound: f32 = x
                .chunks(QK)
                .zip(w.chunks(QK))
                .map(|(x, w)| {
                    let step = x.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                    0.5 * step * w.iter().map(|v| v.abs()).sum::<f32>()
                })
                .sum();
            assert!(
                (got - exact).abs() <= bound * 1.001 + 1e-4,
                "{f:?}: {got} vs {exact} (bound {bound})"
            );
        }
    }

    /// Every path this CPU has (AVX2 and AVX-512; NEON, dot product, i8mm), not only the one
    /// picked.
    #[test]
    fn every_simd_path_equals_the_reference() {
        for isa in Isa::available() {
            every_format_equals_the_reference(isa);
        }
    }

    fn every_format_equals_the_reference(isa: Isa) {
        for (f, q) in FORMATS {
            for (cols, seed) in [(32, 4), (96, 5), (576, 6), (32 * 37, 7)] {
                let data = blocks(q, 5, cols, seed);
                let m = Q32Rows::new(f, 5, cols, &data).unwrap();
                let y = quantize(&activations(cols, seed));
                for r in 0..5 {
                    let (want, got) = (m.dot(Isa::Scalar, r, &y), m.dot(isa, r, &y));
                    // The same integers; only the float sums' order differs (over up to 37
                    // blocks of terms near 1, some cancelling).
                    let tol = 1e-4 * want.abs().max(1.0);
                    assert!(
                        (want - got).abs() <= tol,
                        "{isa:?} {f:?} {cols}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn matvec_gives_every_row_of_every_matrix() {
        let isa = Isa::detect();
        let cols = 64;
        let a = blocks(GgmlDType::Q4_1, 37, cols, 8);
        let b = blocks(GgmlDType::Q5_0, 5, cols, 9);
        let ma = Q32Rows::new(Format32::Q4_1, 37, cols, &a).unwrap();
        let mb = Q32Rows::new(Format32::Q5_0, 5, cols, &b).unwrap();
        let x = activations(2 * cols, 10);
        let outs = matvec(isa, &[ma, mb], &x, 2);
        for (w, out) in [ma, mb].iter().zip(&outs) {
            for r in 0..2 {
                let y = quantize(&x[r * cols..(r + 1) * cols]);
                for row in 0..w.rows() {
                    assert_eq!(out[r * w.rows() + row], w.dot(isa, row, &y));
                }
            }
        }
    }

    /// The many-row product on every x86 path this CPU has, against the reference dot per
    /// (activation row, weight row): every format, rows that end mid-tile, activation rows that
    /// end mid-group, two matrices sharing the activations, a bias and a residual applied.
    #[test]
    fn the_tiles_give_the_reference_products() {
        use crate::kernels::qmatmul::Epilogue;
        for isa in Isa::available().into_iter().filter(|&i| matmul_applies(i)) {
            for (f, q) in FORMATS {
                for (rows, cols, m, seed) in [(16, 32, 4, 11), (37, 96, 7, 12), (5, 576, 1, 13)] {
                    let a = blocks(q, rows, cols, seed);
                    let b = blocks(q, 3, cols, seed + 100);
                    let wa = Q32Rows::new(f, rows, cols, &a).unwrap();
                    let wb = Q32Rows::new(f, 3, cols, &b).unwrap();
                    let x = activations(m * cols, seed);
                    let bias: Vec<f32> = (0..rows).map(|j| j as f32 * 0.25 - 1.0).collect();
                    let residual = activations(m * rows, seed + 7);
                    let posts = [
                        Epilogue {
                            bias: Some(&bias),
                            gate_alpha: None,
                            residual: Some(&residual),
                        },
                        Epilogue::default(),
                    ];
                    let outs = matmul(isa, &[wa, wb], &x, m, &posts);
                    for (k, (w, out)) in [wa, wb].iter().zip(&outs).enumerate() {
                        assert_eq!(out.len(), m * w.rows());
                        for r in 0..m {
                            let y = quantize(&x[r * cols..(r + 1) * cols]);
                            for j in 0..w.rows() {
                                let mut want = w.dot(Isa::Scalar, j, &y);
                                if k == 0 {
                                    want += bias[j] + residual[r * rows + j];
                                }
                                let got = out[r * w.rows() + j];
                                let tol = 1e-4 * want.abs().max(1.0);
                                assert!(
                                    (want - got).abs() <= tol,
                                    "{isa:?} {f:?} {rows}x{cols} m={m} [{r}, {j}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Codes at the ends of their ranges (Q8_0's -128 and 127, every nibble 15, every fifth bit
    /// set) with activations at +-127: no 16-bit sum saturates on any path.
    #[test]
    fn the_tiles_do_not_saturate_at_the_extremes() {
        use crate::kernels::qmatmul::Epilogue;
        let cols = 64;
        // Rows: all +1, all -1, alternating, in runs of 3.
        let x: Vec<f32> = (0..4 * cols)
            .map(|i| match (i / cols, i % cols) {
                (0, _) => 1.0,
                (1, _) => -1.0,
                (2, c) if c % 2 == 0 => 1.0,
                (3, c) if (c / 3) % 2 == 0 => 1.0,
                _ => -1.0,
            })
            .collect();
        for (f, _) in FORMATS {
            let bb = f.block_bytes();
            for fill in [0x00u8, 0xff, 0x80, 0x7f] {
                let mut data = vec![fill; 2 * cols / QK * bb];
                for blk in data.chunks_exact_mut(bb) {
                    blk[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
                    if matches!(f, Format32::Q4_1 | Format32::Q5_1) {
                        blk[2..4].copy_from_slice(&f16::from_f32(-0.25).to_le_bytes());
                    }
                }
                let w = Q32Rows::new(f, 2, cols, &data).unwrap();
                for isa in Isa::available().into_iter().filter(|&i| matmul_applies(i)) {
                    let out = matmul(isa, &[w], &x, 4, &[Epilogue::default()]).remove(0);
                    for r in 0..4 {
                        let y = quantize(&x[r * cols..(r + 1) * cols]);
                        for j in 0..2 {
                            let want = w.dot(Isa::Scalar, j, &y);
                            let got = out[r * 2 + j];
                            assert!(
                                (want - got).abs() <= 1e-4 * want.abs().max(1.0),
                                "{isa:?} {f:?} fill {fill:#x}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_matrix_of_the_wrong_size_is_refused() {
        assert!(Q32Rows::new(Format32::Q4_0, 2, 32, &[0u8; 35]).is_none());
        assert!(Q32Rows::new(Format32::Q4_0, 2, 48, &[0u8; 54]).is_none());
        assert!(Q32Rows::new(Format32::Q4_0, 2, 32, &[0u8; 36]).is_some());
    }
}
