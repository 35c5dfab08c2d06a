//! Products with GGML block-quantized weights, read where they are stored.
//!
//! Why our own: candle 0.11 multiplies Q4_K by first repacking the blocks into 16-row tiles with the
//! scales widened to f32 (6 bits read per weight instead of 4.5, and a second copy of every matrix in
//! memory), and its AVX2 tile kernel widens every 32 products to 32-bit sums. Here:
//! - [`matvec`] (decode, a few activation rows) reads the blocks as they are in the GGUF file:
//!   decode reads each weight once per token, so it is bound by bytes read;
//! - [`matmul_q4k`] (prefill, vision: many rows) unpacks 8 weight rows at a time into a small
//!   buffer laid out for `maddubs` (8 rows x 4 values per register, the activations broadcast), and
//!   keeps the products in 16-bit sums over a whole sub-block of 32 values before scaling them:
//!   about 2 vector operations per 32 multiply-adds instead of 4. On a VNNI CPU, from
//!   `tiles::REQUANT_ROWS` activation rows on, the unpacked rows are re-quantized to 8 bits with one
//!   scale per 256 values instead, so the inner loop is `vpdpbusd` alone (no scaling per sub-block
//!   of 32); this adds 0.4% to Q4_K's own error (`docs/quantization.md`). On AArch64 the same
//!   design runs on NEON's instructions (`tiles/neon.rs`: `smmla` with i8mm, `sdot` by element with
//!   the dot product, widening products with NEON alone), always on the Q4_K codes.
//!
//! `docs/benchmarks.md` has the measured gains.
//!
//! The activations are quantized once per call to Q8_K blocks (256 values, one f32 scale, sums of
//! 16) exactly as GGML does, and shared by every matrix of the call (q/k/v, or gate and up). Each
//! dot product sums integers per block and scales once per block; [`scalar`] is the reference, the
//! AVX2 version computes the same integers and differs only in the order of the float sums.

use half::f16;

use super::Isa;

/// Values per K-quant superblock.
pub const QK_K: usize = 256;

/// GGML `block_q4_K`: 8 sub-blocks of 32 four-bit values, 6-bit scales and mins.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// GGML `block_q6_K`: 16 sub-blocks of 16 six-bit values (low 4 bits in `ql`, high 2 in `qh`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}

/// GGML `block_q5_K`: 8 sub-blocks of 32 five-bit values (low 4 bits in `qs` as Q4_K's, the fifth
/// in `qh`), 6-bit scales and mins.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ5K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// GGML `block_q3_K`: 16 sub-blocks of 16 three-bit values (low 2 bits in `qs`, the third in
/// `hmask`, set meaning "no offset of -4"), 6-bit signed scales.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: u16,
}

/// GGML `block_q2_K`: 16 sub-blocks of 16 two-bit values, a 4-bit scale and a 4-bit min each.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: u16,
    pub dmin: u16,
}

/// GGML `block_q8_K`: the activations' format (never stored).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// All-zero activations (scale 0).
    pub const ZERO: BlockQ8K = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

/// The block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4K,
    Q6K,
    /// Read by the scalar reference only: products in these formats are candle's (its SIMD
    /// kernels, checked against this reference in the tests) except on an ARM core without
    /// `sdot`, where candle's cannot run; embedding rows are expanded here.
    Q5K,
    Q3K,
    Q2K,
}

impl Format {
    /// The format of a GGML type, when these kernels read it.
    pub fn of(q: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match q {
            G::Q4K => Some(Format::Q4K),
            G::Q6K => Some(Format::Q6K),
            G::Q5K => Some(Format::Q5K),
            G::Q3K => Some(Format::Q3K),
            G::Q2K => Some(Format::Q2K),
            _ => None,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4K => std::mem::size_of::<BlockQ4K>(),
            Format::Q6K => std::mem::size_of::<BlockQ6K>(),
            Format::Q5K => std::mem::size_of::<BlockQ5K>(),
            Format::Q3K => std::mem::size_of::<BlockQ3K>(),
            Format::Q2K => std::mem::size_of::<BlockQ2K>(),
        }
    }
}

/// A `(rows, cols)` matrix of blocks, row-major, borrowed from wherever the weights live.
#[derive(Debug, Clone, Copy)]
pub struct QRows<'a> {
    format: Format,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl<'a> QRows<'a> {
    /// `None` unless `data` holds exactly `rows` rows of `cols / 256` blocks, suitably aligned.
    pub fn new(format: Format, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let ok = cols > 0
            && cols.is_multiple_of(QK_K)
            && data.len() == rows * cols / QK_K * format.block_bytes()
            && (data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u16>());
        ok.then_some(QRows {
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

    fn blocks<T>(&self, row: usize) -> &'a [T] {
        let per_row = self.cols / QK_K;
        let bytes = per_row * std::mem::size_of::<T>();
        let start = row * bytes;
        let row_bytes = &self.data[start..start + bytes];
        // SAFETY: `new` checked the length and the 2-byte alignment the block types need, and the
        // blocks are plain bytes and integers (any bit pattern is valid).
        unsafe { std::slice::from_raw_parts(row_bytes.as_ptr() as *const T, per_row) }
    }

    /// The dot product of row `row` with activations `y` (`cols / 256` blocks).
    pub fn dot(&self, isa: Isa, row: usize, y: &[BlockQ8K]) -> f32 {
        match (self.format, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the x86 SIMD paths are only handed out when the CPU has AVX2, FMA and F16C.
            (Format::Q4K, Isa::Avx2 | Isa::Avx512) => unsafe { avx2::dot_q4k(self.blocks(row), y) },
            #[cfg(target_arch = "x86_64")]
            (Format::Q6K, Isa::Avx2 | Isa::Avx512) => unsafe { avx2::dot_q6k(self.blocks(row), y) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `NeonDot` and `NeonI8mm` are only handed out when the CPU has `dotprod`, and
            // every AArch64 CPU has NEON.
            (Format::Q4K, Isa::NeonDot | Isa::NeonI8mm) => unsafe {
                neon::dot_q4k_sdot(self.blocks(row), y)
            },
            #[cfg(target_arch = "aarch64")]
            (Format::Q6K, Isa::NeonDot | Isa::NeonI8mm) => unsafe {
                neon::dot_q6k_sdot(self.blocks(row), y)
            },
            #[cfg(target_arch = "aarch64")]
            (Format::Q4K, Isa::Neon) => unsafe { neon::dot_q4k_widening(self.blocks(row), y) },
            #[cfg(target_arch = "aarch64")]
            (Format::Q6K, Isa::Neon) => unsafe { neon::dot_q6k_widening(self.blocks(row), y) },
            (Format::Q4K, _) => scalar::dot_q4k(self.blocks(row), y),
            (Format::Q6K, _) => scalar::dot_q6k(self.blocks(row), y),
            (Format::Q5K, _) => scalar::dot_q5k(self.blocks(row), y),
            (Format::Q3K, _) => scalar::dot_q3k(self.blocks(row), y),
            (Format::Q2K, _) => scalar::dot_q2k(self.blocks(row), y),
        }
    }

    /// [`Self::dot`] of row `row` with each of `R` activation rows, equal to `R` calls of it bit for
    /// bit; on the SIMD path a Q4_K row is unpacked once for all of them.
    pub fn dot_rows<const R: usize>(&self, isa: Isa, row: usize, ys: [&[BlockQ8K]; R]) -> [f32; R] {
        match (self.format, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot`.
            (Format::Q4K, Isa::Avx2) => unsafe { avx2::dot_q4k_rows(self.blocks(row), ys) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only handed out when the CPU has AVX-512 F, BW, VL and VNNI.
            (Format::Q4K, Isa::Avx512) => unsafe { avx512::dot_q4k_rows(self.blocks(row), ys) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as in `dot`.
            (Format::Q4K, Isa::NeonDot | Isa::NeonI8mm) => unsafe {
                neon::dot_q4k_rows_sdot(self.blocks(row), ys)
            },
            #[cfg(target_arch = "aarch64")]
            (Format::Q4K, Isa::Neon) => unsafe {
                neon::dot_q4k_rows_widening(self.blocks(row), ys)
            },
            _ => ys.map(|y| self.dot(isa, row, y)),
        }
    }

    /// Row `row` expanded to f32 (for tests and embedding lookups).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        match self.format {
            Format::Q4K => scalar::dequantize_q4k(self.blocks(row), out),
            Format::Q6K => scalar::dequantize_q6k(self.blocks(row), out),
            Format::Q5K => scalar::dequantize_q5k(self.blocks(row), out),
            Format::Q3K => scalar::dequantize_q3k(self.blocks(row), out),
            Format::Q2K => scalar::dequantize_q2k(self.blocks(row), out),
        }
    }
}

/// Quantizes `x` (a multiple of 256 values) to Q8_K blocks as GGML does: per block, the first value
/// of largest magnitude maps to -127, the others round to nearest (ties to even, GGML's
/// `nearest_int`), `bsums` hold sums of 16.
pub fn quantize_q8k(x: &[f32]) -> Vec<BlockQ8K> {
    quantize_q8k_with(Isa::detect(), x)
}

/// [`quantize_q8k`] on a chosen path (the paths give identical blocks).
pub fn quantize_q8k_with(isa: Isa, x: &[f32]) -> Vec<BlockQ8K> {
    let mut out = vec![BlockQ8K::ZERO; x.len() / QK_K];
    quantize_q8k_into(isa, x, &mut out);
    out
}

/// [`quantize_q8k_with`] into `out` (`x.len() / 256` blocks).
fn quantize_q8k_into(isa: Isa, x: &[f32], out: &mut [BlockQ8K]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(out) {
        *b = BlockQ8K::ZERO;
        let max = match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the x86 SIMD paths are only handed out when the CPU has AVX2.
            Isa::Avx2 | Isa::Avx512 => unsafe { avx2::first_largest(xs) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: every AArch64 CPU has NEON.
            i if i.neon() => unsafe { neon::first_largest(xs) },
            _ => first_largest(xs),
        };
        let amax = max.abs();
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        b.d = 1.0 / iscale;
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the x86 SIMD paths are only handed out when the CPU has AVX2.
            Isa::Avx2 | Isa::Avx512 => unsafe { avx2::quantize_q8k_codes(xs, iscale, b) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: every AArch64 CPU has NEON.
            i if i.neon() => unsafe { neon::quantize_q8k_codes(xs, iscale, b) },
            _ => {
                for (q, &v) in b.qs.iter_mut().zip(xs) {
                    *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
                }
                for (s, qs) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                    *s = qs.iter().map(|&q| q as i16).sum();
                }
            }
        }
    }
}

/// The first value of `xs` whose magnitude is the largest (NaNs are passed over; 0 when none).
fn first_largest(xs: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in xs {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// [`quantize_q8k`] of each of the `m` rows of `x`, rows spread over candle's thread pool.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn quantize_rows(isa: Isa, x: &[f32], m: usize) -> Vec<BlockQ8K> {
    if m <= 1 {
        return quantize_q8k_with(isa, x);
    }
    let k = x.len() / m;
    let kb = k / QK_K;
    let mut out = vec![BlockQ8K::ZERO; m * kb];
    let ptr = out.as_mut_ptr() as usize;
    super::pool::parallel_for(m, |rows| {
        for r in rows {
            // SAFETY: row r's blocks are written by this iteration alone, inside `out`.
            let dst =
                unsafe { std::slice::from_raw_parts_mut((ptr as *mut BlockQ8K).add(r * kb), kb) };
            quantize_q8k_into(isa, &x[r * k..(r + 1) * k], dst);
        }
    });
    out
}

/// Rows of weights handed to one parallel region at a time.
const ROW_BLOCK: usize = 16;

/// `outs[i][r * rows_i + j] = x_r · row j of ws[i]` for the `m` rows of `x` (`m x cols`, row-major):
/// the activations are quantized once and shared by every matrix, all on candle's thread pool.
pub fn matvec(isa: Isa, ws: &[QRows], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let cols = ws.first().map_or(0, |w| w.cols);
    assert!(ws.iter().all(|w| w.cols == cols) && x.len() == m * cols);
    let yq: Vec<Vec<BlockQ8K>> = x
        .chunks_exact(cols.max(1))
        .map(|row| quantize_q8k_with(isa, row))
        .collect();
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let rows: Vec<usize> = ws.iter().map(|w| w.rows).collect();
    super::pool::for_each_row(&rows, ROW_BLOCK, |i, row| {
        let w = &ws[i];
        let out = ptrs[i] as *mut f32;
        // Up to 4 activation rows per pass over the weight row (batched decode).
        for (ci, ys) in yq.chunks(4).enumerate() {
            let mut vals = [0f32; 4];
            match ys {
                [a, b, c, d] => vals = w.dot_rows(isa, row, [a, b, c, d].map(|y| &y[..])),
                [a, b, c] => {
                    vals[..3].copy_from_slice(&w.dot_rows(isa, row, [a, b, c].map(|y| &y[..])))
                }
                [a, b] => vals[..2].copy_from_slice(&w.dot_rows(isa, row, [a, b].map(|y| &y[..]))),
                [a] => vals[0] = w.dot(isa, row, a),
                _ => unreachable!("chunks of 1 to 4"),
            }
            for (k, v) in vals.into_iter().take(ys.len()).enumerate() {
                // SAFETY: every (matrix, r, row) is written by exactly one call, inside `outs`.
                unsafe { *out.add((4 * ci + k) * w.rows + row) = v };
            }
        }
    });
    outs
}

/// Weight rows unpacked together by [`matmul_q4k`]: one `maddubs` register holds 4 values of each.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const TILE_ROWS: usize = 8;

/// What a product does to its output values before it stores them, in this order: add `bias[j]`,
/// apply `y * sigmoid(gate_alpha * y)` (SiLU, quick GELU), add `residual[r * cols + j]`. Fused into
/// the many-row kernel, the output is written once, while its values are still in registers, instead
/// of being read and written again by a pass per step (one of them, the bias, on one thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub gate_alpha: Option<f32>,
    pub residual: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    /// Applies it to `y`: output row `r`'s values at columns `c0..c0 + y.len()` of `cols`.
    pub fn apply(&self, isa: Isa, y: &mut [f32], r: usize, c0: usize, cols: usize) {
        let span = c0..c0 + y.len();
        if let Some(b) = self.bias {
            y.iter_mut()
                .zip(&b[span.clone()])
                .for_each(|(y, b)| *y += b);
        }
        if let Some(alpha) = self.gate_alpha {
            super::activation::sigmoid_gated_in_place(isa, alpha, y);
        }
        if let Some(res) = self.residual {
            let res = &res[r * cols..][span];
            y.iter_mut().zip(res).for_each(|(y, x)| *y += x);
        }
    }

    /// [`Self::apply`] to every row of `out` (rows of `cols` values): for the products that store
    /// their output first (matrix-vector, the non-x86 fallback).
    pub fn apply_rows(&self, isa: Isa, out: &mut [f32], cols: usize) {
        for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
            self.apply(isa, row, r, 0, cols);
        }
    }

    fn check(&self, m: usize, cols: usize) {
        assert!(self.bias.is_none_or(|b| b.len() == cols));
        assert!(self.residual.is_none_or(|r| r.len() == m * cols));
    }
}

/// Whether [`matmul_f32_8bit`] runs on this CPU for `m` activation rows of `cols` values: a VNNI
/// CPU, at least `REQUANT_ROWS` rows (below, quantizing the weights per call costs more than the
/// 8-bit products save), rows of whole 256-value blocks.
pub fn f32_8bit_applies(isa: Isa, m: usize, cols: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa == Isa::Avx512 && m >= tiles::REQUANT_ROWS && cols > 0 && cols.is_multiple_of(QK_K);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, m, cols);
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub use tiles::matmul_f32_8bit;

/// `out[r * rows + j] = post(x_r · row j of w)` for the `m` rows of `x`, `w` in Q4_K: the many-row
/// product (prefill, vision tower). Each block of 8 weight rows is unpacked once and used for every
/// row of `x`; the blocks of rows are spread over candle's thread pool.
pub fn matmul_q4k(isa: Isa, w: &QRows, x: &[f32], m: usize, post: &Epilogue) -> Vec<f32> {
    assert!(w.format == Format::Q4K && x.len() == m * w.cols);
    post.check(m, w.rows);
    #[cfg(target_arch = "x86_64")]
    if isa.avx2() {
        return tiles::matmul_q4k(isa, w, x, m, post);
    }
    #[cfg(target_arch = "aarch64")]
    if isa.neon() {
        return tiles::neon::matmul_q4k(isa, w, x, m, post);
    }
    let mut out = matvec(isa, &[*w], x, m).remove(0);
    post.apply_rows(isa, &mut out, w.rows);
    out
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod tiles {
    use super::*;

    #[cfg(target_arch = "aarch64")]
    pub mod neon;

    /// One superblock (256 values) of 8 weight rows, laid out for the AVX2 tile kernel.
    #[repr(C, align(32))]
    #[derive(Clone, Copy)]
    #[cfg(target_arch = "x86_64")]
    pub struct Tile {
        /// `[sub-block 8][step 8][row 8][4 values]`: the unsigned 4-bit codes, one per byte.
        pub codes: [u8; QK_K * TILE_ROWS],
        /// Per sub-block, each row's scale twice (the 16-bit pairs `madd` multiplies).
        pub scales: [[i16; 2 * TILE_ROWS]; 8],
        /// Per pair of sub-blocks `(2k, 2k + 1)`, each row's two mins as a 16-bit pair: one
        /// `madd` / `vpdpwssd` with the pair's activation sums gives both sub-blocks' min terms.
        pub mins: [[i16; 2 * TILE_ROWS]; 4],
        pub d: [f32; TILE_ROWS],
        pub dmin: [f32; TILE_ROWS],
    }

    #[cfg(target_arch = "x86_64")]
    const EMPTY: Tile = Tile {
        codes: [0; QK_K * TILE_ROWS],
        scales: [[0; 2 * TILE_ROWS]; 8],
        mins: [[0; 2 * TILE_ROWS]; 4],
        d: [0.0; TILE_ROWS],
        dmin: [0.0; TILE_ROWS],
    };

    /// Unpacks rows `r0..r0 + 8` of `w` (missing rows past the end stay zero) into `tiles`.
    #[cfg(target_arch = "x86_64")]
    fn pack(w: &QRows, r0: usize, tiles: &mut [Tile]) {
        let n = TILE_ROWS.min(w.rows - r0);
        if n < TILE_ROWS {
            tiles.fill(EMPTY);
        }
        let rows: Vec<&[BlockQ4K]> = (0..n).map(|rho| w.blocks(r0 + rho)).collect();
        for (b, tile) in tiles.iter_mut().enumerate() {
            for (rho, blocks) in rows.iter().enumerate() {
                let blk = &blocks[b];
                tile.d[rho] = f16::from_bits(blk.d).to_f32();
                tile.dmin[rho] = f16::from_bits(blk.dmin).to_f32();
                for sub in 0..8 {
                    let (sc, mn) = scalar::scale_min_q4k(&blk.scales, sub);
                    tile.scales[sub][2 * rho] = sc as i16;
                    tile.scales[sub][2 * rho + 1] = sc as i16;
                    tile.mins[sub / 2][2 * rho + sub % 2] = mn as i16;
                }
            }
            if n == TILE_ROWS {
                // SAFETY: the tile kernels run only where the CPU has AVX2.
                unsafe {
                    pack_codes_avx2(std::array::from_fn(|rho| &rows[rho][b]), &mut tile.codes)
                };
            } else {
                for (rho, blocks) in rows.iter().enumerate() {
                    pack_codes(&blocks[b], rho, &mut tile.codes);
                }
            }
        }
    }

    /// Row `rho`'s codes of one superblock into a tile's layout, one 4-byte word at a time.
    #[cfg(target_arch = "x86_64")]
    fn pack_codes(blk: &BlockQ4K, rho: usize, codes: &mut [u8; QK_K * TILE_ROWS]) {
        // Sub-blocks 2j and 2j+1 are the low and high nibbles of bytes 32j..32j+32.
        for j in 0..4 {
            for step in 0..8 {
                let at = 32 * j + 4 * step;
                let word = u32::from_le_bytes([
                    blk.qs[at],
                    blk.qs[at + 1],
                    blk.qs[at + 2],
                    blk.qs[at + 3],
                ]);
                for (sub, nibbles) in [
                    (2 * j, word & 0x0f0f_0f0f),
                    (2 * j + 1, (word >> 4) & 0x0f0f_0f0f),
                ] {
                    let o = (sub * 8 + step) * 32 + rho * 4;
                    codes[o..o + 4].copy_from_slice(&nibbles.to_le_bytes());
                }
            }
        }
    }

    /// [`pack_codes`] for all 8 rows of a tile at once: the 8 rows' 32-byte runs are an 8 x 8
    /// matrix of 4-byte words (row x step), and the tile wants it transposed (step x row).
    #[target_feature(enable = "avx2")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn pack_codes_avx2(blks: [&BlockQ4K; TILE_ROWS], codes: &mut [u8; QK_K * TILE_ROWS]) {
        use core::arch::x86_64::*;
        let low = _mm256_set1_epi8(0x0f);
        for j in 0..4 {
            let words = crate::kernels::x86::transpose_words(std::array::from_fn(|rho| {
                _mm256_loadu_si256(blks[rho].qs.as_ptr().add(32 * j) as *const __m256i)
            }));
            for (step, words) in words.into_iter().enumerate() {
                for (sub, nibbles) in [
                    (2 * j, _mm256_and_si256(words, low)),
                    (
                        2 * j + 1,
                        _mm256_and_si256(_mm256_srli_epi16(words, 4), low),
                    ),
                ] {
                    let o = (sub * 8 + step) * 32;
                    _mm256_store_si256(codes.as_mut_ptr().add(o) as *mut __m256i, nibbles);
                }
            }
        }
    }

    /// Tiles of 8 rows per unit of work (each activation word is used for 24 weight rows): 12
    /// independent sums per step. Measured on an AVX-512 CPU (docs/benchmarks.md, session 9): 2 tiles
    /// left the VNNI kernel 12% slower, 4 made the AVX2 kernel spill its sums (25% slower).
    #[cfg(target_arch = "x86_64")]
    const T: usize = 3;
    /// One tile of 8 rows on AArch64: the sums of a sub-block and of a superblock for 4 activation
    /// rows already take 16 of its 32 registers (`neon.rs`).
    #[cfg(target_arch = "aarch64")]
    const T: usize = 1;

    /// Activation rows per kernel call (each weight register is used this many times).
    const MR: usize = 4;

    /// From this many activation rows on, a VNNI CPU multiplies on 8-bit tiles ([`Q8`]). Their
    /// re-quantization (about 1 cycle per weight) costs what 160-192 rows' products save: measured
    /// on the decoder's and the tower's shapes, m = 8..384 (session 13, `docs/benchmarks.md`).
    #[cfg(target_arch = "x86_64")]
    pub const REQUANT_ROWS: usize = 192;

    #[cfg(target_arch = "x86_64")]
    pub fn matmul_q4k(isa: Isa, w: &QRows, x: &[f32], m: usize, post: &Epilogue) -> Vec<f32> {
        if isa == Isa::Avx512 && m >= REQUANT_ROWS {
            run::<Q8>(isa, &Source::Q4K(w), x, m, post)
        } else {
            run::<Q4>(isa, &Source::Q4K(w), x, m, post)
        }
    }

    /// [`matmul_q4k`] on the tiles of `requantize` ([`Q8`], VNNI only) or of the Q4_K codes.
    #[cfg(test)]
    #[cfg(target_arch = "x86_64")]
    pub fn matmul_q4k_on(
        isa: Isa,
        requantize: bool,
        w: &QRows,
        x: &[f32],
        m: usize,
        post: &Epilogue,
    ) -> Vec<f32> {
        if requantize {
            assert_eq!(isa, Isa::Avx512);
            run::<Q8>(isa, &Source::Q4K(w), x, m, post)
        } else {
            run::<Q4>(isa, &Source::Q4K(w), x, m, post)
        }
    }

    /// `out[r * rows + j] = post(x_r · row j of w)` for f32 weights `w` (`rows x cols`, `cols` a
    /// multiple of 256) on the 8-bit tiles: each row's 256-value blocks quantized per call as
    /// [`scalar::quantize_8bit`] does. For dense matrices the policy allows at 8 bits (the vision
    /// merger of a quantized tower, `docs/quantization.md`); only on a VNNI CPU ([`Isa::Avx512`]).
    #[cfg(target_arch = "x86_64")]
    pub fn matmul_f32_8bit(
        isa: Isa,
        w: &[f32],
        rows: usize,
        x: &[f32],
        m: usize,
        post: &Epilogue,
    ) -> Vec<f32> {
        assert_eq!(isa, Isa::Avx512);
        let cols = x.len() / m.max(1);
        assert!(cols.is_multiple_of(QK_K) && w.len() == rows * cols && x.len() == m * cols);
        post.check(m, rows);
        run::<Q8>(isa, &Source::F32 { w, rows, cols }, x, m, post)
    }

    /// The weights a product unpacks its tiles from.
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))] // f32 tiles are x86's only
    enum Source<'a> {
        Q4K(&'a QRows<'a>),
        /// Row-major f32, `rows x cols`.
        F32 {
            w: &'a [f32],
            rows: usize,
            cols: usize,
        },
    }

    impl Source<'_> {
        fn rows(&self) -> usize {
            match self {
                Source::Q4K(q) => q.rows,
                Source::F32 { rows, .. } => *rows,
            }
        }

        fn cols(&self) -> usize {
            match self {
                Source::Q4K(q) => q.cols,
                Source::F32 { cols, .. } => *cols,
            }
        }
    }

    /// The product on tiles of kind `K`: each unit of `T` tiles is unpacked once and meets every
    /// activation row, `MR` rows per kernel call.
    fn run<K: Kind>(isa: Isa, w: &Source, x: &[f32], m: usize, post: &Epilogue) -> Vec<f32> {
        let (rows, kb) = (w.rows(), w.cols() / QK_K);
        let yq = quantize_rows(isa, x, m);
        // Not zeroed first: every value is written once below (all m rows of every unit's columns).
        let mut out = Vec::<f32>::with_capacity(m * rows);
        let out_ptr = out.as_mut_ptr() as usize;
        let unit_rows = T * TILE_ROWS;
        let units = rows.div_ceil(unit_rows);
        let scratch = || vec![K::EMPTY; T * kb];
        super::super::pool::parallel_for_with(units, scratch, |tiles, range| {
            for unit in range {
                let r0 = unit * unit_rows;
                let n = unit_rows.min(rows - r0);
                for (t, part) in tiles.chunks_exact_mut(kb).enumerate() {
                    K::pack(w, (r0 + t * TILE_ROWS).min(rows), part);
                }
                let parts: [&[K::Tile]; T] = std::array::from_fn(|t| &tiles[t * kb..(t + 1) * kb]);
                let act = |r: usize| &yq[r * kb..(r + 1) * kb];
                let store = |r: usize, acc: &[[f32; TILE_ROWS]; T]| {
                    let mut flat = [0f32; T * TILE_ROWS];
                    for (t, a) in acc.iter().enumerate() {
                        flat[t * TILE_ROWS..(t + 1) * TILE_ROWS].copy_from_slice(a);
                    }
                    post.apply(isa, &mut flat[..n], r, r0, rows);
                    let dst = (out_ptr as *mut f32).wrapping_add(r * rows + r0);
                    // SAFETY: rows r0..r0+n of activation row r belong to this unit alone. A whole
                    // unit is stored with a constant length (vector moves, not a memcpy call).
                    unsafe {
                        if n == T * TILE_ROWS {
                            std::ptr::write_unaligned(dst as *mut [f32; T * TILE_ROWS], flat)
                        } else {
                            std::ptr::copy_nonoverlapping(flat.as_ptr(), dst, n)
                        }
                    };
                };
                // The store reads the residual and writes the output 24 values per row, a stripe
                // across rows that are `rows` apart, where each read waits on memory: fetched
                // while the kernel computes the rows they belong to.
                let fetch = |r: usize| {
                    if let Some(res) = post.residual {
                        super::super::prefetch(res.as_ptr().wrapping_add(r * rows + r0), n);
                    }
                    super::super::prefetch((out_ptr as *const f32).wrapping_add(r * rows + r0), n);
                };
                let mut r = 0;
                while r + MR <= m {
                    (r..r + MR).for_each(fetch);
                    let mut acc = [[[0f32; TILE_ROWS]; MR]; T];
                    K::kernel(isa, parts, std::array::from_fn(|i| act(r + i)), &mut acc);
                    if cfg!(target_arch = "x86_64") && n == T * TILE_ROWS {
                        // SAFETY: as in `store`; the x86 tile kernels run only on AVX2 CPUs.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            store_unit(post, &acc, r, r0, rows, out_ptr as *mut f32)
                        };
                    } else {
                        #[allow(clippy::needless_range_loop)] // `i` picks one row of every tile set
                        for i in 0..MR {
                            store(r + i, &std::array::from_fn(|t| acc[t][i]));
                        }
                    }
                    r += MR;
                }
                for r in r..m {
                    let mut acc = [[[0f32; TILE_ROWS]; 1]; T];
                    K::kernel(isa, parts, [act(r)], &mut acc);
                    if cfg!(target_arch = "x86_64") && n == T * TILE_ROWS {
                        // SAFETY: as above.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            store_unit(post, &acc, r, r0, rows, out_ptr as *mut f32)
                        };
                    } else {
                        store(r, &std::array::from_fn(|t| acc[t][0]));
                    }
                }
            }
        });
        // SAFETY: the units cover all `rows` columns of all `m` rows, each written above.
        unsafe { out.set_len(m * rows) };
        out
    }

    /// A whole unit's sums for activation rows `r..r + R` (`acc[t][i]`: columns `r0 + 8t..`), through
    /// the epilogue and into `out` (rows of `rows` values), 8 values per register: the same
    /// operations in the same order as [`Epilogue::apply`], whose per-row calls over 24 values
    /// cost more than the work.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; columns `r0..r0 + 24` of rows `r..r + R` lie inside `out` and the
    /// epilogue's operands, and no other thread touches them in `out`.
    #[target_feature(enable = "avx2,fma")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn store_unit<const R: usize>(
        post: &Epilogue,
        acc: &[[[f32; TILE_ROWS]; R]; T],
        r: usize,
        r0: usize,
        rows: usize,
        out: *mut f32,
    ) {
        use core::arch::x86_64::*;
        let minus_alpha = post.gate_alpha.map(|a| _mm256_set1_ps(-a));
        for (t, sums) in acc.iter().enumerate() {
            let c = r0 + t * TILE_ROWS;
            let bias = post
                .bias
                .map(|b| _mm256_loadu_ps(b[c..c + TILE_ROWS].as_ptr()));
            for (i, sum) in sums.iter().enumerate() {
                let at = (r + i) * rows + c;
                let mut y = _mm256_loadu_ps(sum.as_ptr());
                if let Some(b) = bias {
                    y = _mm256_add_ps(y, b);
                }
                if let Some(minus_alpha) = minus_alpha {
                    y = super::super::activation::avx2::gated(y, minus_alpha);
                }
                if let Some(res) = post.residual {
                    y = _mm256_add_ps(y, _mm256_loadu_ps(res[at..at + TILE_ROWS].as_ptr()));
                }
                _mm256_storeu_ps(out.add(at), y);
            }
        }
    }

    /// A layout of unpacked weight tiles and the kernel that multiplies on it.
    trait Kind {
        type Tile: Copy + Send;
        const EMPTY: Self::Tile;
        /// Unpacks rows `r0..r0 + 8` of `w` (rows past the end contribute zero) into `tiles`.
        fn pack(w: &Source, r0: usize, tiles: &mut [Self::Tile]);
        /// `acc[t][i][rho] = acts[i] · row rho of tile set t`.
        fn kernel<const R: usize>(
            isa: Isa,
            tiles: [&[Self::Tile]; T],
            acts: [&[BlockQ8K]; R],
            acc: &mut [[[f32; TILE_ROWS]; R]; T],
        );
    }

    /// The Q4_K codes as they are, scaled per sub-block of 32 inside the kernel (any x86 path).
    #[cfg(target_arch = "x86_64")]
    struct Q4;

    #[cfg(target_arch = "x86_64")]
    impl Kind for Q4 {
        type Tile = Tile;
        const EMPTY: Tile = EMPTY;
        fn pack(w: &Source, r0: usize, tiles: &mut [Tile]) {
            match w {
                Source::Q4K(w) => pack(w, r0, tiles),
                Source::F32 { .. } => unreachable!("the Q4_K tiles unpack Q4_K blocks only"),
            }
        }
        fn kernel<const R: usize>(
            isa: Isa,
            tiles: [&[Tile]; T],
            acts: [&[BlockQ8K]; R],
            acc: &mut [[[f32; TILE_ROWS]; R]; T],
        ) {
            kernel_for(isa, tiles, acts, acc)
        }
    }

    /// The weights re-quantized to 8 bits with one scale per superblock ([`scalar::requantize_q4k`]):
    /// the kernel's inner loop is `vpdpbusd` alone, a block of 256 values into one 32-bit sum, with
    /// no scaling per sub-block (a `vpmulld` and an add for every 8 `vpdpbusd` on [`Q4`]). The extra
    /// rounding is far below Q4_K's own (8 bits against 4, `docs/quantization.md`).
    #[cfg(target_arch = "x86_64")]
    struct Q8;

    #[cfg(target_arch = "x86_64")]
    impl Kind for Q8 {
        type Tile = Tile8;
        const EMPTY: Tile8 = Tile8 {
            codes: [0; QK_K * TILE_ROWS],
            scale: [0.0; TILE_ROWS],
        };
        fn pack(w: &Source, r0: usize, tiles: &mut [Tile8]) {
            let n = TILE_ROWS.min(w.rows() - r0);
            // Each row's codes in value order (rows past the end: code 0, scale 0).
            let mut codes = [[0x80u8; QK_K]; TILE_ROWS];
            for (b, tile) in tiles.iter_mut().enumerate() {
                tile.scale = [0.0; TILE_ROWS];
                for (rho, row) in codes.iter_mut().enumerate().take(n) {
                    // SAFETY: the 8-bit tiles run only where the CPU has AVX-512 (and so AVX2).
                    tile.scale[rho] = unsafe {
                        match w {
                            Source::Q4K(q) => {
                                let blocks = q.blocks::<BlockQ4K>(r0 + rho);
                                if let Some(ahead) = blocks.get(b + 2) {
                                    let at = ahead as *const BlockQ4K as *const f32;
                                    super::super::prefetch(at, size_of::<BlockQ4K>() / 4);
                                }
                                requantize_avx2(&blocks[b], row)
                            }
                            Source::F32 { w, cols, .. } => {
                                let at = (r0 + rho) * cols + b * QK_K;
                                quantize_avx2(&w[at..at + QK_K], row)
                            }
                        }
                    };
                }
                interleave8(&codes, &mut tile.codes);
            }
        }
        fn kernel<const R: usize>(
            _: Isa,
            tiles: [&[Tile8]; T],
            acts: [&[BlockQ8K]; R],
            acc: &mut [[[f32; TILE_ROWS]; R]; T],
        ) {
            // SAFETY: `Q8` is only chosen for `Isa::Avx512`, handed out only on CPUs with VNNI.
            unsafe { kernel8::<T, R>(tiles, acts, acc) }
        }
    }

    /// One superblock (256 values) of 8 weight rows re-quantized to 8 bits, for [`kernel8`].
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    #[cfg(target_arch = "x86_64")]
    pub struct Tile8 {
        /// `[step 32][row 8][8 values]`: each value's 8-bit code plus 128 (`vpdpbusd` wants the
        /// unsigned operand here; the kernel takes `128 x` the activations' sum back off).
        pub codes: [u8; QK_K * TILE_ROWS],
        /// Each row's scale for this superblock.
        pub scale: [f32; TILE_ROWS],
    }

    /// [`scalar::requantize_q4k`] of one block: its codes plus 128 into `out` in value order, the
    /// same values, rounding and scale (returned).
    #[target_feature(enable = "avx2")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn requantize_avx2(blk: &BlockQ4K, out: &mut [u8; QK_K]) -> f32 {
        use core::arch::x86_64::*;
        let (d, dmin) = (
            f16::from_bits(blk.d).to_f32(),
            f16::from_bits(blk.dmin).to_f32(),
        );
        let mut v = [_mm256_setzero_ps(); 32];
        let mut amax = _mm256_setzero_ps();
        for sub in 0..8 {
            let (sc, mn) = scalar::scale_min_q4k(&blk.scales, sub);
            // As `scalar::dequantize_q4k`: (d sc) q - dmin mn, each product rounded.
            let (vs, vm) = (
                _mm256_set1_ps(d * sc as f32),
                _mm256_set1_ps(dmin * mn as f32),
            );
            for k in 0..4 {
                let at = blk.qs.as_ptr().add(32 * (sub / 2) + 8 * k);
                let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(at as *const __m128i));
                let shift = _mm_cvtsi32_si128(4 * (sub % 2) as i32);
                let code = _mm256_and_si256(_mm256_srl_epi32(bytes, shift), _mm256_set1_epi32(15));
                let x = _mm256_sub_ps(_mm256_mul_ps(vs, _mm256_cvtepi32_ps(code)), vm);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0), x));
                v[4 * sub + k] = x;
            }
        }
        to_codes(&v, amax, out)
    }

    /// [`scalar::quantize_8bit`] of 256 f32 values: their codes plus 128 into `out`, the scale
    /// returned.
    #[target_feature(enable = "avx2")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx2(x: &[f32], out: &mut [u8; QK_K]) -> f32 {
        use core::arch::x86_64::*;
        assert_eq!(x.len(), QK_K);
        let mut amax = _mm256_setzero_ps();
        let v: [__m256; 32] = std::array::from_fn(|k| {
            let v = _mm256_loadu_ps(x.as_ptr().add(8 * k));
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(_mm256_set1_ps(-0.0), v));
            v
        });
        to_codes(&v, amax, out)
    }

    /// 256 values' codes plus 128 into `out` in value order, given the lanes' largest magnitudes:
    /// times `127 / max`, rounded to nearest even (the CPU's default rounding, as the reference's
    /// `round_ties_even`). Returns the scale, `max / 127`.
    #[inline(always)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn to_codes(
        v: &[core::arch::x86_64::__m256; 32],
        amax: core::arch::x86_64::__m256,
        out: &mut [u8; QK_K],
    ) -> f32 {
        use core::arch::x86_64::*;
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), amax);
        let amax = lanes.iter().fold(0f32, |a, &x| a.max(x));
        if amax == 0.0 {
            out.fill(0x80);
            return 0.0;
        }
        let iscale = _mm256_set1_ps(127.0 / amax);
        // The packs interleave 128-bit lanes: dwords of 4 codes come out as values 0, 8, 16, 24,
        // 4, 12, 20, 28 (in fours); this puts them back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for sub in 0..8 {
            let q: [__m256i; 4] =
                std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * sub + k], iscale)));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_xor_si256(
                _mm256_permutevar8x32_epi32(bytes, order),
                _mm256_set1_epi8(-128),
            );
            _mm256_storeu_si256(out.as_mut_ptr().add(32 * sub) as *mut __m256i, bytes);
        }
        amax / 127.0
    }

    /// 8 rows of codes in value order into an 8-bit tile's `[step][row][8 values]`.
    #[cfg(target_arch = "x86_64")]
    fn interleave8(rows: &[[u8; QK_K]; TILE_ROWS], codes: &mut [u8; QK_K * TILE_ROWS]) {
        for (step, out) in codes.chunks_exact_mut(8 * TILE_ROWS).enumerate() {
            for (row, o) in rows.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&row[8 * step..8 * step + 8]);
            }
        }
    }

    /// `acc[t][i][rho] = acts[i] · row rho of tile set t` on 8-bit tiles: per superblock, 32-bit sums
    /// per (tile, activation row) by `vpdpbusd` alone in 512-bit registers (each row's 8 values of a
    /// step in one 64-bit lane pair, against 8 activation bytes broadcast), folded to one sum per row,
    /// then `128 x` the activations' sum off and both scales on in one multiply-add. 512-bit
    /// registers double the products per instruction where the CPU runs them at full width (Intel's
    /// server cores: 350-366 against 170-181 GMAC/s per core, `docs/benchmarks.md`, session 15).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel8<const T: usize, const R: usize>(
        tiles: [&[Tile8]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        use core::arch::x86_64::*;
        let mut accf = [[_mm256_setzero_ps(); R]; T];
        for b in 0..tiles[0].len() {
            let mut isum = [[_mm512_setzero_si512(); R]; T];
            for step in 0..QK_K / 8 {
                let wv: [__m512i; T] = std::array::from_fn(|t| {
                    _mm512_load_si512(tiles[t][b].codes.as_ptr().add(step * 64) as *const __m512i)
                });
                for i in 0..R {
                    let a8 = _mm512_set1_epi64(std::ptr::read_unaligned(
                        acts[i][b].qs.as_ptr().add(8 * step) as *const i64,
                    ));
                    for t in 0..T {
                        isum[t][i] = _mm512_dpbusd_epi32(isum[t][i], wv[t], a8);
                    }
                }
            }
            for i in 0..R {
                let sum: i32 = acts[i][b].bsums.iter().map(|&s| s as i32).sum();
                let offset = _mm256_set1_epi32(-128 * sum);
                let yd = _mm256_set1_ps(acts[i][b].d);
                for t in 0..T {
                    // Row rho's sum is 32-bit lanes 2 rho and 2 rho + 1.
                    let s = isum[t][i];
                    let rows = _mm512_cvtepi64_epi32(_mm512_add_epi32(s, _mm512_srli_epi64(s, 32)));
                    let scale = _mm256_mul_ps(_mm256_load_ps(tiles[t][b].scale.as_ptr()), yd);
                    let exact = _mm256_add_epi32(rows, offset);
                    accf[t][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, accf[t][i]);
                }
            }
        }
        for t in 0..T {
            for i in 0..R {
                _mm256_storeu_ps(acc[t][i].as_mut_ptr(), accf[t][i]);
            }
        }
    }

    /// [`kernel`] on the instruction set `isa` names.
    #[cfg(target_arch = "x86_64")]
    fn kernel_for<const R: usize>(
        isa: Isa,
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        // SAFETY: `isa` is an x86 SIMD path (the only callers of the tile kernels), handed out only
        // when the CPU has what that kernel's target features name.
        unsafe {
            match isa {
                Isa::Avx512 => kernel_vnni::<T, R>(tiles, acts, acc),
                _ => kernel_avx2::<T, R>(tiles, acts, acc),
            }
        }
    }

    /// [`kernel`] with AVX2's `maddubs`: 16-bit sums over a sub-block, widened once by its scale.
    #[target_feature(enable = "avx2,fma")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel_avx2<const T: usize, const R: usize>(
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        kernel::<T, R, false>(tiles, acts, acc)
    }

    /// [`kernel`] with VNNI's `vpdpbusd` (bytes multiplied and added into 32-bit sums in one
    /// instruction, no separate add) and AVX-512's 32 registers (no accumulator spills).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel_vnni<const T: usize, const R: usize>(
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        kernel::<T, R, true>(tiles, acts, acc)
    }

    /// `acc[t][i][rho] = acts[i] · row rho of tile set t`, over all superblocks: each weight register
    /// serves `R` activation rows, each broadcast activation word `T` tiles of 8 rows. Inlined into
    /// the two wrappers above, which give it its instruction set.
    #[inline(always)]
    #[cfg(target_arch = "x86_64")]
    unsafe fn kernel<const T: usize, const R: usize, const VNNI: bool>(
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        use core::arch::x86_64::*;
        let mut accf = [[_mm256_setzero_ps(); R]; T];
        for b in 0..tiles[0].len() {
            let mut isum = [[_mm256_setzero_si256(); R]; T];
            for sub in 0..8 {
                // Per (tile, activation row): 16-bit pair sums (AVX2) or 32-bit sums (VNNI) of the
                // sub-block's products, 4 values of each of the 8 rows per step.
                let mut p = [[_mm256_setzero_si256(); R]; T];
                for step in 0..8 {
                    let wv: [__m256i; T] = std::array::from_fn(|t| {
                        _mm256_load_si256(
                            tiles[t][b].codes.as_ptr().add((sub * 8 + step) * 32) as *const __m256i
                        )
                    });
                    for i in 0..R {
                        let a4 = _mm256_set1_epi32(std::ptr::read_unaligned(
                            acts[i][b].qs.as_ptr().add(32 * sub + 4 * step) as *const i32,
                        ));
                        for t in 0..T {
                            p[t][i] = if VNNI {
                                _mm256_dpbusd_epi32(p[t][i], wv[t], a4)
                            } else {
                                // 16-bit sums of at most 8 x 2 x 15 x 128 = 30720: no overflow.
                                _mm256_add_epi16(p[t][i], _mm256_maddubs_epi16(wv[t], a4))
                            };
                        }
                    }
                }
                for t in 0..T {
                    // Each row's scale twice, as 16-bit pairs; one 32-bit copy is the high half.
                    let sc = _mm256_load_si256(tiles[t][b].scales[sub].as_ptr() as *const __m256i);
                    let sc32 = _mm256_srli_epi32(sc, 16);
                    for i in 0..R {
                        let scaled = if VNNI {
                            _mm256_mullo_epi32(p[t][i], sc32)
                        } else {
                            _mm256_madd_epi16(p[t][i], sc)
                        };
                        isum[t][i] = _mm256_add_epi32(isum[t][i], scaled);
                    }
                }
            }
            // Each activation row's sums over sub-blocks (2k, 2k + 1) as a 16-bit pair (a sub-block
            // sum is at most 32 x 128 = 4096 in size), to meet the tiles' pairs of mins.
            let sums: [[i32; 4]; R] = std::array::from_fn(|i| {
                let bs = &acts[i][b].bsums;
                std::array::from_fn(|k| {
                    let lo = bs[4 * k] as i32 + bs[4 * k + 1] as i32;
                    let hi = bs[4 * k + 2] as i32 + bs[4 * k + 3] as i32;
                    (lo & 0xffff) | (hi << 16)
                })
            });
            for t in 0..T {
                let tile = &tiles[t][b];
                let d = _mm256_load_ps(tile.d.as_ptr());
                let dmin = _mm256_load_ps(tile.dmin.as_ptr());
                for i in 0..R {
                    let mut mins = _mm256_setzero_si256();
                    for (k, &pair) in sums[i].iter().enumerate() {
                        let mn = _mm256_load_si256(tile.mins[k].as_ptr() as *const __m256i);
                        let pair = _mm256_set1_epi32(pair);
                        mins = if VNNI {
                            _mm256_dpwssd_epi32(mins, mn, pair)
                        } else {
                            _mm256_add_epi32(mins, _mm256_madd_epi16(mn, pair))
                        };
                    }
                    let yd = _mm256_set1_ps(acts[i][b].d);
                    accf[t][i] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(isum[t][i]),
                        _mm256_mul_ps(d, yd),
                        accf[t][i],
                    );
                    accf[t][i] = _mm256_fnmadd_ps(
                        _mm256_cvtepi32_ps(mins),
                        _mm256_mul_ps(dmin, yd),
                        accf[t][i],
                    );
                }
            }
        }
        for t in 0..T {
            for i in 0..R {
                _mm256_storeu_ps(acc[t][i].as_mut_ptr(), accf[t][i]);
            }
        }
    }
}

/// The reference: the integer sums and scales of GGML's format definitions, one value at a time.
pub mod scalar {
    use super::*;

    /// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block.
    pub fn scale_min_q4k(scales: &[u8; 12], j: usize) -> (u8, u8) {
        if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            (
                (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
            )
        }
    }

    fn h(bits: u16) -> f32 {
        f16::from_bits(bits).to_f32()
    }

    /// Value `i` (0..256) of a Q4_K block as its unsigned 4-bit code and sub-block.
    fn q4k_code(b: &BlockQ4K, i: usize) -> (i32, usize) {
        let (group, l) = (i / 64, i % 64);
        let byte = b.qs[32 * group + l % 32];
        let code = if l < 32 { byte & 0xF } else { byte >> 4 };
        (code as i32, 2 * group + l / 32)
    }

    /// Value `i` (0..256) of a Q6_K block as its signed 6-bit code (-32..32) and sub-block of 16.
    fn q6k_code(b: &BlockQ6K, i: usize) -> (i32, usize) {
        let (half, t, l) = (i / 128, (i % 128) / 32, i % 32);
        let low = b.ql[64 * half + 32 * (t % 2) + l];
        let low = if t < 2 { low & 0xF } else { low >> 4 };
        let high = (b.qh[32 * half + l] >> (2 * t)) & 3;
        ((low | (high << 4)) as i32 - 32, i / 16)
    }

    /// Value `i` (0..256) of a Q5_K block as its unsigned 5-bit code and sub-block of 32.
    fn q5k_code(b: &BlockQ5K, i: usize) -> (i32, usize) {
        let (group, l) = (i / 64, i % 64);
        let byte = b.qs[32 * group + l % 32];
        let low = if l < 32 { byte & 0xF } else { byte >> 4 };
        let high = (b.qh[l % 32] >> (2 * group + l / 32)) & 1;
        ((low | (high << 4)) as i32, 2 * group + l / 32)
    }

    /// The 2-bit field of value `i` in the 64 bytes `qs` of a Q2_K or Q3_K block: bytes
    /// `32h..32h + 32` hold the four runs of 32 values of half `h`, run `j` in bits `2j..2j + 2`.
    fn two_bits(qs: &[u8; QK_K / 4], i: usize) -> i32 {
        let (half, run, l) = (i / 128, (i % 128) / 32, i % 32);
        ((qs[32 * half + l] >> (2 * run)) & 3) as i32
    }

    /// Value `i` of a Q3_K block as its signed code (-4..4): the two low bits, less 4 unless the
    /// value's `hmask` bit (bit `i / 32` of byte `i % 32`) is set.
    fn q3k_code(b: &BlockQ3K, i: usize) -> i32 {
        let high = (b.hmask[i % 32] >> (i / 32)) & 1;
        two_bits(&b.qs, i) - if high == 1 { 0 } else { 4 }
    }

    /// The 16 signed 6-bit scales of a Q3_K block (-32..32): the low 4 bits of scale `k` are
    /// nibble `k / 8` of byte `k % 8`, the high 2 bits are bits `2 (k / 4)..` of byte `8 + k % 4`.
    pub fn scales_q3k(scales: &[u8; 12]) -> [i32; 16] {
        std::array::from_fn(|k| {
            let low = (scales[k % 8] >> (4 * (k / 8))) & 0xF;
            let high = (scales[8 + k % 4] >> (2 * (k / 4))) & 3;
            (low | (high << 4)) as i32 - 32
        })
    }

    pub fn dot_q4k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for i in 0..QK_K {
                let (code, sub) = q4k_code(b, i);
                sumi += scale_min_q4k(&b.scales, sub).0 as i32 * code * a.qs[i] as i32;
            }
            for sub in 0..8 {
                let bsum = a.bsums[2 * sub] as i32 + a.bsums[2 * sub + 1] as i32;
                summ += scale_min_q4k(&b.scales, sub).1 as i32 * bsum;
            }
            sum += a.d * (h(b.d) * sumi as f32 - h(b.dmin) * summ as f32);
        }
        sum
    }

    /// Block `b` of a Q4_K row re-quantized to 8 bits with one scale (the many-row product's
    /// tiles on VNNI CPUs): its values as [`dequantize_q4k`] gives them, times `127 / max |value|`,
    /// rounded to nearest even; the scale is `max |value| / 127` (0 for an all-zero block).
    pub fn requantize_q4k(b: &BlockQ4K) -> (f32, [i8; QK_K]) {
        let mut v = [0f32; QK_K];
        dequantize_q4k(std::slice::from_ref(b), &mut v);
        quantize_8bit(&v)
    }

    /// 256 values at 8 bits with one scale: times `127 / max |value|`, rounded to nearest even; the
    /// scale is `max |value| / 127` (0 for all zeros).
    pub fn quantize_8bit(v: &[f32]) -> (f32, [i8; QK_K]) {
        let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
        let mut q = [0i8; QK_K];
        if amax == 0.0 {
            return (0.0, q);
        }
        let iscale = 127.0 / amax;
        for (q, v) in q.iter_mut().zip(v) {
            *q = (v * iscale).round_ties_even() as i8;
        }
        (amax / 127.0, q)
    }

    /// `x · y` as the 8-bit tiles compute it: per block, the integer sum of the re-quantized weights
    /// times the activations, then both scales in one fused multiply-add into the f32 sum.
    pub fn dot_q4k_requantized(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        dot_8bit(x.iter().map(requantize_q4k), y)
    }

    /// `w · y` for f32 weights `w` as the 8-bit tiles compute it ([`quantize_8bit`] per block).
    pub fn dot_f32_8bit(w: &[f32], y: &[BlockQ8K]) -> f32 {
        dot_8bit(w.chunks_exact(QK_K).map(quantize_8bit), y)
    }

    fn dot_8bit(x: impl Iterator<Item = (f32, [i8; QK_K])>, y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for ((scale, q), a) in x.zip(y) {
            let isum: i32 = q
                .iter()
                .zip(&a.qs)
                .map(|(&w, &a)| w as i32 * a as i32)
                .sum();
            sum = (isum as f32).mul_add(scale * a.d, sum);
        }
        sum
    }

    pub fn dot_q6k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let mut sumi = 0i32;
            for i in 0..QK_K {
                let (code, sub) = q6k_code(b, i);
                sumi += b.scales[sub] as i32 * code * a.qs[i] as i32;
            }
            sum += a.d * h(b.d) * sumi as f32;
        }
        sum
    }

    /// As [`dot_q4k`], with the fifth bit.
    pub fn dot_q5k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for i in 0..QK_K {
                let (code, sub) = q5k_code(b, i);
                sumi += scale_min_q4k(&b.scales, sub).0 as i32 * code * a.qs[i] as i32;
            }
            for sub in 0..8 {
                let bsum = a.bsums[2 * sub] as i32 + a.bsums[2 * sub + 1] as i32;
                summ += scale_min_q4k(&b.scales, sub).1 as i32 * bsum;
            }
            sum += a.d * (h(b.d) * sumi as f32 - h(b.dmin) * summ as f32);
        }
        sum
    }

    pub fn dot_q3k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let scales = scales_q3k(&b.scales);
            let mut sumi = 0i32;
            for i in 0..QK_K {
                sumi += scales[i / 16] * q3k_code(b, i) * a.qs[i] as i32;
            }
            sum += a.d * h(b.d) * sumi as f32;
        }
        sum
    }

    /// Per sub-block of 16: `d * (scale & 15) * code - dmin * (scale >> 4)`; the mins through the
    /// activations' sums of 16, as for Q4_K.
    pub fn dot_q2k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let (mut sumi, mut summ) = (0i32, 0i32);
            for i in 0..QK_K {
                sumi += (b.scales[i / 16] & 0xF) as i32 * two_bits(&b.qs, i) * a.qs[i] as i32;
            }
            for (sc, &bsum) in b.scales.iter().zip(&a.bsums) {
                summ += (sc >> 4) as i32 * bsum as i32;
            }
            sum += a.d * (h(b.d) * sumi as f32 - h(b.dmin) * summ as f32);
        }
        sum
    }

    pub fn dequantize_q5k(x: &[BlockQ5K], out: &mut [f32]) {
        for (b, out) in x.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (i, o) in out.iter_mut().enumerate() {
                let (code, sub) = q5k_code(b, i);
                let (sc, mn) = scale_min_q4k(&b.scales, sub);
                *o = h(b.d) * sc as f32 * code as f32 - h(b.dmin) * mn as f32;
            }
        }
    }

    pub fn dequantize_q3k(x: &[BlockQ3K], out: &mut [f32]) {
        for (b, out) in x.iter().zip(out.chunks_exact_mut(QK_K)) {
            let scales = scales_q3k(&b.scales);
            for (i, o) in out.iter_mut().enumerate() {
                *o = h(b.d) * scales[i / 16] as f32 * q3k_code(b, i) as f32;
            }
        }
    }

    pub fn dequantize_q2k(x: &[BlockQ2K], out: &mut [f32]) {
        for (b, out) in x.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (i, o) in out.iter_mut().enumerate() {
                let sc = b.scales[i / 16];
                *o = h(b.d) * (sc & 0xF) as f32 * two_bits(&b.qs, i) as f32
                    - h(b.dmin) * (sc >> 4) as f32;
            }
        }
    }

    pub fn dequantize_q4k(x: &[BlockQ4K], out: &mut [f32]) {
        for (b, out) in x.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (i, o) in out.iter_mut().enumerate() {
                let (code, sub) = q4k_code(b, i);
                let (sc, mn) = scale_min_q4k(&b.scales, sub);
                *o = h(b.d) * sc as f32 * code as f32 - h(b.dmin) * mn as f32;
            }
        }
    }

    pub fn dequantize_q6k(x: &[BlockQ6K], out: &mut [f32]) {
        for (b, out) in x.iter().zip(out.chunks_exact_mut(QK_K)) {
            for (i, o) in out.iter_mut().enumerate() {
                let (code, sub) = q6k_code(b, i);
                *o = h(b.d) * (b.scales[sub] as f32 * code as f32);
            }
        }
    }
}

/// The 8 scales and 8 mins of a Q4_K block as bytes: `[scales 0..8, mins 0..8]` (the 6-bit
/// fields of `scale_min_q4k`, unpacked four at a time in 32-bit words).
#[inline(always)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
fn scales_mins_q4k(scales: &[u8; 12]) -> [u32; 4] {
    let w = |i: usize| u32::from_le_bytes([scales[i], scales[i + 1], scales[i + 2], scales[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    [
        w0 & LOW6,
        (w2 & LOW4) | (((w0 >> 6) & TOP2) << 4),
        w1 & LOW6,
        ((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4),
    ]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{scales_mins_q4k, BlockQ4K, BlockQ6K, BlockQ8K};
    use crate::kernels::x86::{hsum128, hsum256};

    /// How far ahead of the block being read the weights are prefetched, in bytes.
    const PREFETCH: usize = 2048;

    #[inline(always)]
    pub(super) unsafe fn h(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Prefetches the weights [`PREFETCH`] bytes ahead of block `b` (one Q4_K block: 3 lines).
    #[inline(always)]
    pub(super) unsafe fn prefetch_q4k(b: &BlockQ4K) {
        let ahead = (b as *const BlockQ4K as *const i8).wrapping_add(PREFETCH);
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
    }

    /// `acc` plus one Q4_K block's mins term against activation block `a`: `a.d * dmin` times the
    /// 6-bit mins (16-bit, `mins`) dotted with the activations' sums of 32 (pairs of `bsums`).
    #[inline(always)]
    pub(super) unsafe fn mins_term(acc: __m128, mins: __m128i, a: &BlockQ8K, dmin: f32) -> __m128 {
        let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
        let pairs = _mm_hadd_epi16(
            _mm256_castsi256_si128(bsums),
            _mm256_extracti128_si256(bsums, 1),
        );
        _mm_fmadd_ps(
            _mm_set1_ps(a.d * dmin),
            _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs)),
            acc,
        )
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// The codes and sums of one Q8_K block, given its scale: 16 values at a time rounded to nearest
    /// even (as the scalar path), packed to 16 then 8 bits (the packs' lane interleave undone).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_q8k_codes(xs: &[f32], iscale: f32, b: &mut BlockQ8K) {
        let scale = _mm256_set1_ps(iscale);
        let ones = _mm256_set1_epi16(1);
        let mut halves = [_mm256_setzero_si256(); 2];
        for g in 0..16 {
            let round = |o: usize| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(xs.as_ptr().add(16 * g + o)), scale);
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(v))
            };
            let w16 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(round(0), round(8)));
            let s = _mm256_madd_epi16(w16, ones);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
            b.bsums[g] = _mm_cvtsi128_si32(s) as i16;
            halves[g % 2] = w16;
            if g % 2 == 1 {
                let w8 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi16(halves[0], halves[1]));
                _mm256_storeu_si256(b.qs.as_mut_ptr().add(16 * (g - 1)) as *mut __m256i, w8);
            }
        }
    }

    /// [`super::first_largest`] of a block (256 values): the largest magnitude over 8 lanes, then
    /// the first position holding it, found 8 values at a time.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn first_largest(xs: &[f32]) -> f32 {
        debug_assert!(xs.len().is_multiple_of(8));
        let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        let mut m = _mm256_setzero_ps();
        for c in xs.chunks_exact(8) {
            // `max(v, m)` returns `m` where `v` is NaN: NaNs are passed over, as the reference does.
            m = _mm256_max_ps(abs(_mm256_loadu_ps(c.as_ptr())), m);
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        if amax == 0.0 {
            return 0.0;
        }
        let want = _mm256_set1_ps(amax);
        for c in xs.chunks_exact(8) {
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                abs(_mm256_loadu_ps(c.as_ptr())),
                want,
            ));
            if hit != 0 {
                return c[hit.trailing_zeros() as usize];
            }
        }
        0.0
    }

    /// Per block: 64 values per step (32 bytes of codes, low nibbles then high nibbles), the
    /// unsigned codes times the signed activations by `maddubs`, times the sub-block scale by
    /// `madd`; the mins are subtracted once per block through the activations' sums of 16.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        let m4 = _mm256_set1_epi8(0x0F);
        // Shuffles that spread 16-bit scale k of a 128-bit lane over a whole register.
        let spread: [__m256i; 8] = std::array::from_fn(|k| {
            let lo = (2 * k) as i8;
            _mm256_set1_epi16(i16::from_le_bytes([lo as u8, (lo + 1) as u8]))
        });
        let mut acc = _mm256_setzero_ps();
        let mut acc_min = _mm_setzero_ps();
        for (b, a) in x.iter().zip(y) {
            prefetch_q4k(b);
            let sm = scales_mins_q4k(&b.scales);
            let sm = _mm_set_epi32(sm[3] as i32, sm[2] as i32, sm[1] as i32, sm[0] as i32);
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            acc_min = mins_term(acc_min, mins, a, h(b.dmin));
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q = load(b.qs.as_ptr().add(32 * j));
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                let ylo = load(a.qs.as_ptr().add(64 * j) as *const u8);
                let yhi = load(a.qs.as_ptr().add(64 * j + 32) as *const u8);
                let plo = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(lo, ylo),
                    _mm256_shuffle_epi8(scales, spread[2 * j]),
                );
                let phi = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, yhi),
                    _mm256_shuffle_epi8(scales, spread[2 * j + 1]),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(a.d * h(b.d)), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum256(acc) - hsum128(acc_min)
    }

    /// [`dot_q4k`] of one weight row with `R` activation rows at once: each block's scales and
    /// nibbles are unpacked once for all of them (batched decode). Per row the same integer and
    /// float operations in the same order as [`dot_q4k`], so the results are bit for bit its own.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k_rows<const R: usize>(x: &[BlockQ4K], ys: [&[BlockQ8K]; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let spread: [__m256i; 8] = std::array::from_fn(|k| {
            let lo = (2 * k) as i8;
            _mm256_set1_epi16(i16::from_le_bytes([lo as u8, (lo + 1) as u8]))
        });
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [_mm_setzero_ps(); R];
        for (i, b) in x.iter().enumerate() {
            prefetch_q4k(b);
            let sm = scales_mins_q4k(&b.scales);
            let sm = _mm_set_epi32(sm[3] as i32, sm[2] as i32, sm[1] as i32, sm[0] as i32);
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            let (d, dmin) = (h(b.d), h(b.dmin));
            for r in 0..R {
                acc_min[r] = mins_term(acc_min[r], mins, &ys[r][i], dmin);
            }
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let q = load(b.qs.as_ptr().add(32 * j));
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                let s_lo = _mm256_shuffle_epi8(scales, spread[2 * j]);
                let s_hi = _mm256_shuffle_epi8(scales, spread[2 * j + 1]);
                for r in 0..R {
                    let a = &ys[r][i];
                    let ylo = load(a.qs.as_ptr().add(64 * j) as *const u8);
                    let yhi = load(a.qs.as_ptr().add(64 * j + 32) as *const u8);
                    let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), s_lo);
                    let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), s_hi);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(plo, phi));
                }
            }
            for r in 0..R {
                let a = &ys[r][i];
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(a.d * d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum256(acc[r]) - hsum128(acc_min[r]))
    }

    /// Per half block (128 values): the four 32-value groups rebuilt from `ql` nibbles and `qh`
    /// bit pairs as unsigned codes 0..64; the offset of 32 is taken out once per block as
    /// 32 · Σ scale·(sum of 16 activations), since sub-block `g` of the scales covers exactly the
    /// 16 values of the activations' `bsums[g]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        // Shuffles that put 16-bit scale 2t in the low lane and 2t + 1 in the high lane.
        let spread: [__m256i; 4] = std::array::from_fn(|t| {
            let pick = |k: usize| i16::from_le_bytes([2 * k as u8, 2 * k as u8 + 1]);
            _mm256_set_m128i(_mm_set1_epi16(pick(2 * t + 1)), _mm_set1_epi16(pick(2 * t)))
        });
        let mut acc = _mm256_setzero_ps();
        for (b, a) in x.iter().zip(y) {
            let ahead = (b as *const BlockQ6K as *const i8).wrapping_add(PREFETCH);
            for line in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
            }
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.scales.as_ptr() as *const __m128i));
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr() as *const __m256i);
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums), 5);
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                // This half's 8 scales (16-bit) in both 128-bit lanes.
                let sc = if half == 0 {
                    _mm256_permute2x128_si256(sc16, sc16, 0x00)
                } else {
                    _mm256_permute2x128_si256(sc16, sc16, 0x11)
                };
                let ql0 = load(b.ql.as_ptr().add(64 * half));
                let ql1 = load(b.ql.as_ptr().add(64 * half + 32));
                let qh = load(b.qh.as_ptr().add(32 * half));
                let codes = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    ),
                ];
                for (t, q) in codes.into_iter().enumerate() {
                    let yv = load(a.qs.as_ptr().add(128 * half + 32 * t) as *const u8);
                    let s = _mm256_shuffle_epi8(sc, spread[t]);
                    sumi =
                        _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), s));
                }
            }
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(a.d * h(b.d)),
                _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi, offset)),
                acc,
            );
        }
        hsum256(acc)
    }
}

/// The AVX-512 (VNNI) matrix-vector kernel: 64 values per instruction instead of 32.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::avx2::{h, mins_term, prefetch_q4k};
    use super::scales_mins_q4k;
    use super::{BlockQ4K, BlockQ8K};
    use crate::kernels::x86::{hsum128, hsum256};

    /// [`super::avx2::dot_q4k_rows`] on 512-bit registers: per 64 values of a row one `maddubs`
    /// (both sub-blocks' nibbles against their 64 activations) and one `vpdpwssd` (times each
    /// sub-block's scale, summed into 32 bits). The two halves of the 32-bit sums added at the end of
    /// a block are exactly the AVX2 kernel's integer sums (integer adds in any order), and the float
    /// operations after them are the same, so every path gives the same bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q4k_rows<const R: usize>(x: &[BlockQ4K], ys: [&[BlockQ8K]; R]) -> [f32; R] {
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [_mm_setzero_ps(); R];
        for (i, b) in x.iter().enumerate() {
            prefetch_q4k(b);
            let sm = scales_mins_q4k(&b.scales);
            let sc: [u8; 8] = std::array::from_fn(|k| (sm[k / 4] >> (8 * (k % 4))) as u8);
            let sm = _mm_set_epi32(sm[3] as i32, sm[2] as i32, sm[1] as i32, sm[0] as i32);
            let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            let (d, dmin) = (h(b.d), h(b.dmin));
            for r in 0..R {
                acc_min[r] = mins_term(acc_min[r], mins, &ys[r][i], dmin);
            }
            let mut sumi = [_mm512_setzero_si512(); R];
            for j in 0..4 {
                // Low nibbles (sub-block 2j) in the low half, high nibbles (2j + 1) in the high half:
                // the order of the activations' 64 codes from 64j on.
                let q = _mm256_loadu_si256(b.qs.as_ptr().add(32 * j) as *const __m256i);
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4));
                let w = _mm512_and_si512(q, m4);
                let s = _mm512_inserti64x4::<1>(
                    _mm512_set1_epi16(sc[2 * j] as i16),
                    _mm256_set1_epi16(sc[2 * j + 1] as i16),
                );
                for r in 0..R {
                    let y = _mm512_loadu_si512(ys[r][i].qs.as_ptr().add(64 * j) as *const __m512i);
                    sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(w, y), s);
                }
            }
            for r in 0..R {
                let a = &ys[r][i];
                let v = _mm256_add_epi32(
                    _mm512_castsi512_si256(sumi[r]),
                    _mm512_extracti64x4_epi64::<1>(sumi[r]),
                );
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a.d * d), _mm256_cvtepi32_ps(v), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum256(acc[r]) - hsum128(acc_min[r]))
    }
}

/// The NEON matrix-vector kernels: per 16 values, 4 byte products summed into each 32-bit lane by
/// `sdot` ([`Isa::NeonDot`] and up) or by `smull` and pairwise adds ([`Isa::Neon`]), scaled per
/// sub-block in integers; per block the same integers and the same float steps as [`scalar`], so
/// every NEON path gives the reference's bits.
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::{scales_mins_q4k, BlockQ4K, BlockQ6K, BlockQ8K};
    use crate::kernels::neon::{dot_widening, sdot};
    use half::f16;

    /// `acc` plus the sums of each 4 byte products of `a` and `b`, by `sdot` when `DOT`.
    #[inline(always)]
    unsafe fn dot4<const DOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        if DOT {
            sdot(acc, a, b)
        } else {
            dot_widening(acc, a, b)
        }
    }

    fn h(bits: u16) -> f32 {
        f16::from_bits(bits).to_f32()
    }

    /// A Q4_K block unpacked: its 256 codes (0..16) as 16 registers in value order (register `k`
    /// holds values `16k..16k + 16`, of sub-block `k / 2`), its 8 scales and its 8 mins.
    struct Q4k {
        codes: [int8x16_t; 16],
        scales: [i32; 8],
        mins: int16x8_t,
    }

    #[inline(always)]
    unsafe fn unpack_q4k(b: &BlockQ4K) -> Q4k {
        let mut bytes = [0u8; 16];
        for (dst, word) in bytes.chunks_exact_mut(4).zip(scales_mins_q4k(&b.scales)) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
        let m4 = vdupq_n_u8(0x0F);
        let mut codes = [vdupq_n_s8(0); 16];
        // Bytes 32j..32j + 32 hold values 64j.. in their low nibbles and 64j + 32.. in the high.
        for j in 0..4 {
            let lo = vld1q_u8(b.qs.as_ptr().add(32 * j));
            let hi = vld1q_u8(b.qs.as_ptr().add(32 * j + 16));
            codes[4 * j] = vreinterpretq_s8_u8(vandq_u8(lo, m4));
            codes[4 * j + 1] = vreinterpretq_s8_u8(vandq_u8(hi, m4));
            codes[4 * j + 2] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(lo));
            codes[4 * j + 3] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(hi));
        }
        Q4k {
            codes,
            scales: std::array::from_fn(|k| bytes[k] as i32),
            mins: vreinterpretq_s16_u16(vmovl_u8(vld1_u8(bytes.as_ptr().add(8)))),
        }
    }

    /// One unpacked Q4_K block against activation block `a`: `(Σ scale·code·act, Σ min·(sum of
    /// the sub-block's activations))`, the two integers of [`super::scalar::dot_q4k`].
    #[inline(always)]
    unsafe fn q4k_ints<const DOT: bool>(q: &Q4k, a: &BlockQ8K) -> (i32, i32) {
        let ys = a.qs.as_ptr();
        let mut sumi = vdupq_n_s32(0);
        for s in 0..8 {
            let p = dot4::<DOT>(vdupq_n_s32(0), q.codes[2 * s], vld1q_s8(ys.add(32 * s)));
            let p = dot4::<DOT>(p, q.codes[2 * s + 1], vld1q_s8(ys.add(32 * s + 16)));
            sumi = vmlaq_n_s32(sumi, p, q.scales[s]);
        }
        // Sums of 32 activations from the pairs of sums of 16 (at most 4096 in magnitude).
        let bs = a.bsums.as_ptr();
        let sums = vpaddq_s16(vld1q_s16(bs), vld1q_s16(bs.add(8)));
        let summ = vaddq_s32(
            vmull_s16(vget_low_s16(q.mins), vget_low_s16(sums)),
            vmull_high_s16(q.mins, sums),
        );
        (vaddvq_s32(sumi), vaddvq_s32(summ))
    }

    #[inline(always)]
    unsafe fn dot_q4k<const DOT: bool>(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let (sumi, summ) = q4k_ints::<DOT>(&unpack_q4k(b), a);
            sum += a.d * (h(b.d) * sumi as f32 - h(b.dmin) * summ as f32);
        }
        sum
    }

    /// [`dot_q4k`] of one weight row with `R` activation rows, each block unpacked once for all of
    /// them (batched decode); bit for bit `R` calls of [`dot_q4k`].
    #[inline(always)]
    unsafe fn dot_q4k_rows<const DOT: bool, const R: usize>(
        x: &[BlockQ4K],
        ys: [&[BlockQ8K]; R],
    ) -> [f32; R] {
        let mut sum = [0f32; R];
        for (i, b) in x.iter().enumerate() {
            let q = unpack_q4k(b);
            let (d, dmin) = (h(b.d), h(b.dmin));
            for r in 0..R {
                let a = &ys[r][i];
                let (sumi, summ) = q4k_ints::<DOT>(&q, a);
                sum[r] += a.d * (d * sumi as f32 - dmin * summ as f32);
            }
        }
        sum
    }

    /// Per 16 values of a Q6_K block: the 6-bit codes rebuilt from `ql` nibbles and `qh` bit pairs,
    /// less 32 (signed bytes), times the activations, times the sub-block's scale.
    #[inline(always)]
    unsafe fn dot_q6k<const DOT: bool>(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        let (m4, m30, m32) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30), vdupq_n_s8(32));
        let mut sum = 0f32;
        for (b, a) in x.iter().zip(y) {
            let ys = a.qs.as_ptr();
            let mut sumi = vdupq_n_s32(0);
            for half in 0..2 {
                for k in 0..2 {
                    let ql0 = vld1q_u8(b.ql.as_ptr().add(64 * half + 16 * k));
                    let ql1 = vld1q_u8(b.ql.as_ptr().add(64 * half + 32 + 16 * k));
                    let qh = vld1q_u8(b.qh.as_ptr().add(32 * half + 16 * k));
                    // Values 128 half + 32 t + 16 k + (0..16): the low nibbles of ql0 and ql1,
                    // then their high nibbles; bit pair t of qh on top.
                    let codes = [
                        vorrq_u8(vandq_u8(ql0, m4), vandq_u8(vshlq_n_u8::<4>(qh), m30)),
                        vorrq_u8(vandq_u8(ql1, m4), vandq_u8(vshlq_n_u8::<2>(qh), m30)),
                        vorrq_u8(vshrq_n_u8::<4>(ql0), vandq_u8(qh, m30)),
                        vorrq_u8(vshrq_n_u8::<4>(ql1), vandq_u8(vshrq_n_u8::<2>(qh), m30)),
                    ];
                    for (t, c) in codes.into_iter().enumerate() {
                        let at = 128 * half + 32 * t + 16 * k;
                        let q = vsubq_s8(vreinterpretq_s8_u8(c), m32);
                        let p = dot4::<DOT>(vdupq_n_s32(0), q, vld1q_s8(ys.add(at)));
                        sumi = vmlaq_n_s32(sumi, p, b.scales[at / 16] as i32);
                    }
                }
            }
            sum += a.d * h(b.d) * vaddvq_s32(sumi) as f32;
        }
        sum
    }

    /// [`super::first_largest`] of a block: the largest magnitude over 4 lanes (`fmaxnm` passes
    /// over NaNs, as the reference does), then the first value holding it.
    #[target_feature(enable = "neon")]
    pub unsafe fn first_largest(xs: &[f32]) -> f32 {
        let mut m = vdupq_n_f32(0.0);
        for c in xs.chunks_exact(4) {
            m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(c.as_ptr())));
        }
        let amax = vmaxnmvq_f32(m);
        if amax == 0.0 {
            return 0.0;
        }
        xs.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
    }

    /// A block's codes `round_ties_even(iscale x)` saturated to 8 bits (`fcvtns`, then saturating
    /// narrows), and its sums of 16.
    #[target_feature(enable = "neon")]
    pub unsafe fn quantize_q8k_codes(xs: &[f32], iscale: f32, b: &mut BlockQ8K) {
        let s = vdupq_n_f32(iscale);
        for g in 0..16 {
            let q: [int32x4_t; 4] = std::array::from_fn(|k| {
                vcvtnq_s32_f32(vmulq_f32(vld1q_f32(xs.as_ptr().add(16 * g + 4 * k)), s))
            });
            let lo = vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1]));
            let hi = vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]));
            let codes = vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi));
            vst1q_s8(b.qs.as_mut_ptr().add(16 * g), codes);
            b.bsums[g] = vaddlvq_s8(codes);
        }
    }

    /// [`Isa::NeonDot`](crate::kernels::Isa::NeonDot) and up: `sdot`.
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_q4k_sdot(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        dot_q4k::<true>(x, y)
    }

    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_q4k_rows_sdot<const R: usize>(
        x: &[BlockQ4K],
        ys: [&[BlockQ8K]; R],
    ) -> [f32; R] {
        dot_q4k_rows::<true, R>(x, ys)
    }

    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_q6k_sdot(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        dot_q6k::<true>(x, y)
    }

    /// [`Isa::Neon`](crate::kernels::Isa::Neon): `smull` and pairwise adds.
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_q4k_widening(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
        dot_q4k::<false>(x, y)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_q4k_rows_widening<const R: usize>(
        x: &[BlockQ4K],
        ys: [&[BlockQ8K]; R],
    ) -> [f32; R] {
        dot_q4k_rows::<false, R>(x, ys)
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_q6k_widening(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
        dot_q6k::<false>(x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Blocks written by candle's quantizer (GGML's format), as bytes.
    fn quantized(w: &[f32], rows: usize, cols: usize, dtype: GgmlDType) -> (QTensor, Vec<u8>) {
        let t = Tensor::from_slice(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let bytes = q.data().unwrap().into_owned();
        (q, bytes)
    }

    fn format(dtype: GgmlDType) -> Format {
        Format::of(dtype).unwrap()
    }

    const K_QUANTS: [GgmlDType; 5] = [
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Our reading of the blocks equals candle's dequantization exactly.
    #[test]
    fn dequantize_reads_ggml_blocks_like_candle() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for dtype in K_QUANTS {
            let (rows, cols) = (7, 3 * QK_K);
            let w = random(&mut rng, rows * cols, 2.0);
            let (q, bytes) = quantized(&w, rows, cols, dtype);
            let expected = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
            let expected = expected.to_vec1::<f32>().unwrap();
            let m = QRows::new(format(dtype), rows, cols, &bytes).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                assert_eq!(row, expected[r * cols..(r + 1) * cols], "{dtype:?} row {r}");
            }
        }
    }

    /// The integer dot product equals the f64 product of the dequantized operands, and every SIMD
    /// path equals the scalar reference, on odd shapes (rows not a multiple of the row block, one
    /// to seven blocks per row, several activation rows, one all-zero activation block).
    #[test]
    fn matvec_matches_reference_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for (dtype, rows, blocks, m) in [
            (GgmlDType::Q4K, 37, 1, 1),
            (GgmlDType::Q4K, 5, 7, 3),
            (GgmlDType::Q6K, 19, 3, 2),
            (GgmlDType::Q6K, 1, 5, 1),
            (GgmlDType::Q5K, 9, 2, 2),
            (GgmlDType::Q3K, 9, 2, 2),
            (GgmlDType::Q2K, 9, 2, 2),
        ] {
            let cols = blocks * QK_K;
            let w = random(&mut rng, rows * cols, 0.5);
            let mut x = random(&mut rng, m * cols, 3.0);
            x[..QK_K].fill(0.0);
            let (_, bytes) = quantized(&w, rows, cols, dtype);
            let mat = QRows::new(format(dtype), rows, cols, &bytes).unwrap();
            // f64 reference on the dequantized weights and activations.
            let mut wd = vec![0f32; cols];
            let mut expected = vec![0f64; m * rows];
            for r in 0..m {
                let yq = quantize_q8k(&x[r * cols..(r + 1) * cols]);
                for row in 0..rows {
                    mat.dequantize_row(row, &mut wd);
                    expected[r * rows + row] = yq
                        .iter()
                        .zip(wd.chunks_exact(QK_K))
                        .map(|(b, wb)| {
                            b.qs.iter()
                                .zip(wb)
                                .map(|(&q, &wv)| q as f64 * b.d as f64 * wv as f64)
                                .sum::<f64>()
                        })
                        .sum();
                }
            }
            let scalar = matvec(Isa::Scalar, &[mat], &x, m).remove(0);
            for isa in Isa::available() {
                let got = matvec(isa, &[mat], &x, m).remove(0);
                // The NEON kernels sum the same integers and take the same float steps.
                if isa.neon() {
                    assert_eq!(got, scalar, "{dtype:?} {isa:?}");
                }
                for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                    let tol = 1e-4 * (1.0 + e.abs());
                    assert!(
                        (g as f64 - e).abs() <= tol,
                        "{dtype:?} {isa:?} out {i}: {g} vs {e}"
                    );
                    assert!(
                        (g - scalar[i]).abs() <= 1e-5 * (1.0 + scalar[i].abs()),
                        "{dtype:?} {isa:?} vs scalar at {i}: {g} vs {}",
                        scalar[i]
                    );
                }
            }
        }
    }

    /// candle's own products of every K-quant (its SIMD kernels on this CPU: AVX2 or NEON, the
    /// ones that multiply Q2_K, Q3_K and Q5_K) give what the scalar reference gives. On an ARM core
    /// without `sdot` they cannot run at all (see [`crate::kernels::candle_quantized_products_run`]):
    /// the layers' tests check what runs there instead.
    #[test]
    fn candles_k_quant_products_match_the_reference() {
        use candle_core::{quantized::QMatMul, Module};
        if !crate::kernels::candle_quantized_products_run() {
            eprintln!("candle's quantized products do not run on this CPU: nothing to compare");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for dtype in K_QUANTS {
            let (rows, cols, m) = (13, 3 * QK_K, 2);
            let w = random(&mut rng, rows * cols, 0.5);
            let x = random(&mut rng, m * cols, 3.0);
            let (q, bytes) = quantized(&w, rows, cols, dtype);
            let mat = QRows::new(format(dtype), rows, cols, &bytes).unwrap();
            let want = matvec(Isa::Scalar, &[mat], &x, m).remove(0);
            let xt = Tensor::from_slice(&x, (m, cols), &Device::Cpu).unwrap();
            let got = QMatMul::from_qtensor(q).unwrap().forward(&xt).unwrap();
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{dtype:?} at {i}: candle {g} vs reference {w}"
                );
            }
        }
    }

    /// Batched decode must not change a token: `m` activation rows in one call give, bit for bit,
    /// what each row gives alone, on every path (the SIMD path unpacks a Q4_K row once for 4 rows).
    #[test]
    fn matvec_rows_together_equal_rows_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (rows, cols) = (23, 3 * QK_K);
            let w = random(&mut rng, rows * cols, 0.5);
            let (_, bytes) = quantized(&w, rows, cols, dtype);
            let mat = QRows::new(format(dtype), rows, cols, &bytes).unwrap();
            for m in 1..=9 {
                let x = random(&mut rng, m * cols, 3.0);
                let mut simd: Option<Vec<f32>> = None;
                for isa in Isa::available() {
                    let together = matvec(isa, &[mat], &x, m).remove(0);
                    // The AVX2 and AVX-512 kernels compute the same integers and the same float
                    // steps: one CPU kind gives the tokens the other does.
                    if isa.avx2() {
                        match &simd {
                            Some(first) => assert_eq!(first, &together, "{dtype:?} {isa:?} m={m}"),
                            None => simd = Some(together.clone()),
                        }
                    }
                    for r in 0..m {
                        let alone = matvec(isa, &[mat], &x[r * cols..(r + 1) * cols], 1).remove(0);
                        assert_eq!(
                            &together[r * rows..(r + 1) * rows],
                            &alone[..],
                            "{dtype:?} {isa:?} m={m} row {r}"
                        );
                    }
                }
            }
        }
    }

    /// Every path quantizes activations to the same blocks, ties rounded to even as GGML does.
    #[test]
    fn activation_quantization_is_the_same_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut x = random(&mut rng, 3 * QK_K, 4.0);
        // A block whose scale is exactly 1, with ties: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0.
        x[QK_K..2 * QK_K].fill(0.25);
        x[QK_K] = -127.0;
        x[QK_K + 1] = 2.5;
        x[QK_K + 2] = -3.5;
        x[QK_K + 3] = 0.5;
        x[2 * QK_K..].fill(0.0);
        // Magnitude ties in the first block: the first of them sets the scale's sign.
        let (top, at) = (2.0 * x[..QK_K].iter().fold(0f32, |a, v| a.max(v.abs())), 37);
        x[at] = top;
        x[at + 100] = -top;
        let want = quantize_q8k_with(Isa::Scalar, &x);
        assert_eq!((want[0].qs[at], want[0].qs[at + 100]), (-127, 127));
        assert_eq!(&want[1].qs[..4], &[-127, 2, -4, 0]);
        assert_eq!(want[1].d, 1.0 / (-127.0 / -127.0));
        assert_eq!(want[1].bsums[0], -127 + 2 - 4);
        assert!(want[2].qs.iter().all(|&q| q == 0) && want[2].d == 0.0);
        for isa in Isa::available() {
            for (g, w) in quantize_q8k_with(isa, &x).iter().zip(&want) {
                assert_eq!((g.d, g.qs, g.bsums), (w.d, w.qs, w.bsums), "{isa:?}");
            }
            let rows = quantize_rows(isa, &x[..2 * QK_K], 2);
            assert_eq!(rows[1].qs, want[1].qs);
        }
    }

    /// The many-row Q4_K product equals the scalar reference on every path, with rows not a
    /// multiple of the 8-row tile and activation rows not a multiple of the kernel's 4.
    #[test]
    fn many_row_q4k_matches_reference_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for (rows, blocks, m) in [(8, 1, 4), (13, 2, 7), (3, 3, 5), (41, 1, 11), (16, 4, 1)] {
            let cols = blocks * QK_K;
            let w = random(&mut rng, rows * cols, 0.5);
            let x = random(&mut rng, m * cols, 2.0);
            let (_, bytes) = quantized(&w, rows, cols, GgmlDType::Q4K);
            let mat = QRows::new(Format::Q4K, rows, cols, &bytes).unwrap();
            let want = matvec(Isa::Scalar, &[mat], &x, m).remove(0);
            for isa in Isa::available() {
                let got = matmul_q4k(isa, &mat, &x, m, &Epilogue::default());
                assert_eq!(got.len(), want.len());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{isa:?} {rows}x{cols} m={m} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// The 8-bit tiles (VNNI) equal their scalar reference exactly (same integers, same fused
    /// multiply-adds in the same order), and stay within the re-quantization's rounding of the Q4_K
    /// product, on odd shapes; the re-quantization itself matches its reference on every block.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn requantized_tiles_match_their_reference() {
        if !Isa::available().contains(&Isa::Avx512) {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for (rows, blocks, m) in [(8, 1, 4), (13, 2, 7), (3, 3, 5), (41, 1, 11), (25, 4, 1)] {
            let cols = blocks * QK_K;
            let mut w = random(&mut rng, rows * cols, 0.5);
            // An all-zero block (scale 0) and a block of one value (every code at the extreme).
            w[..QK_K].fill(0.0);
            if rows > 1 {
                w[cols..cols + QK_K].fill(-0.3);
            }
            let x = random(&mut rng, m * cols, 2.0);
            let (_, bytes) = quantized(&w, rows, cols, GgmlDType::Q4K);
            let mat = QRows::new(Format::Q4K, rows, cols, &bytes).unwrap();
            let got = tiles::matmul_q4k_on(Isa::Avx512, true, &mat, &x, m, &Epilogue::default());
            let q4 = matvec(Isa::Scalar, &[mat], &x, m).remove(0);
            for r in 0..m {
                let yq = quantize_q8k(&x[r * cols..(r + 1) * cols]);
                for row in 0..rows {
                    let want = scalar::dot_q4k_requantized(mat.blocks(row), &yq);
                    let at = r * rows + row;
                    assert_eq!(got[at], want, "{rows}x{cols} m={m} at ({r}, {row})");
                    // Each weight moves by at most half a step of 1/127 of its block's largest.
                    let bound: f32 = mat
                        .blocks::<BlockQ4K>(row)
                        .iter()
                        .zip(&yq)
                        .map(|(b, a)| {
                            let (scale, _) = scalar::requantize_q4k(b);
                            let act: f32 = a.qs.iter().map(|&q| (q as f32 * a.d).abs()).sum();
                            0.5 * scale * act
                        })
                        .sum();
                    assert!(
                        (got[at] - q4[at]).abs() <= bound * 1.01 + 1e-6,
                        "{rows}x{cols} m={m} at ({r}, {row}): {} vs {} (bound {bound})",
                        got[at],
                        q4[at]
                    );
                }
            }
        }
    }

    /// f32 weights on the 8-bit tiles equal their scalar reference exactly, with a bias, on odd
    /// shapes (a short last unit, activation rows not a multiple of 4, an all-zero block), and stay
    /// within half a step of each block's scale of the f32 product.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn f32_weights_on_8bit_tiles_match_their_reference() {
        if !Isa::available().contains(&Isa::Avx512) {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for (rows, blocks, m) in [(8, 1, 4), (29, 2, 7), (3, 3, 1)] {
            let cols = blocks * QK_K;
            let mut w = random(&mut rng, rows * cols, 0.5);
            w[..QK_K].fill(0.0);
            let x = random(&mut rng, m * cols, 2.0);
            let bias = random(&mut rng, rows, 1.0);
            let post = Epilogue {
                bias: Some(&bias),
                ..Default::default()
            };
            let got = tiles::matmul_f32_8bit(Isa::Avx512, &w, rows, &x, m, &post);
            for r in 0..m {
                let xr = &x[r * cols..(r + 1) * cols];
                let yq = quantize_q8k(xr);
                for row in 0..rows {
                    let wr = &w[row * cols..(row + 1) * cols];
                    let want = scalar::dot_f32_8bit(wr, &yq) + bias[row];
                    assert_eq!(
                        got[r * rows + row],
                        want,
                        "{rows}x{cols} m={m} ({r}, {row})"
                    );
                    let exact: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>() + bias[row];
                    let bound: f32 = wr
                        .chunks_exact(QK_K)
                        .zip(&yq)
                        .map(|(wb, a)| {
                            let step = scalar::quantize_8bit(wb).0;
                            let act: f32 = a.qs.iter().map(|&q| (q as f32 * a.d).abs()).sum();
                            let wmax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
                            // The weights' rounding, and the activations' (half a step each).
                            0.5 * step * act + 0.5 * a.d.abs() * wmax * QK_K as f32
                        })
                        .sum();
                    assert!(
                        (got[r * rows + row] - exact).abs() <= bound * 1.01 + 1e-5,
                        "{rows}x{cols} ({r}, {row}): {} vs {exact}",
                        got[r * rows + row]
                    );
                }
            }
        }
    }

    /// The fused epilogue (bias, then `y * sigmoid(alpha y)`, then a residual) gives what the three
    /// steps give one after the other on the reference product, on every path, with rows not a
    /// multiple of a unit (the last unit's span is short) and activation rows not a multiple of 4.
    #[test]
    fn many_row_q4k_epilogue_matches_steps_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (rows, cols, m) = (37, 2 * QK_K, 6);
        let w = random(&mut rng, rows * cols, 0.5);
        let x = random(&mut rng, m * cols, 2.0);
        let bias = random(&mut rng, rows, 1.0);
        let residual = random(&mut rng, m * rows, 3.0);
        let (_, bytes) = quantized(&w, rows, cols, GgmlDType::Q4K);
        let mat = QRows::new(Format::Q4K, rows, cols, &bytes).unwrap();
        let q4 = matvec(Isa::Scalar, &[mat], &x, m).remove(0);
        let post = Epilogue {
            bias: Some(&bias),
            gate_alpha: Some(1.702),
            residual: Some(&residual),
        };
        // Each path with its own plain product: the Q4_K tiles on every x86 path and the reference
        // elsewhere, then the 8-bit tiles where the CPU has VNNI.
        let mut paths: Vec<(Isa, bool)> =
            Isa::available().into_iter().map(|i| (i, false)).collect();
        if cfg!(target_arch = "x86_64") && paths.iter().any(|&(i, _)| i == Isa::Avx512) {
            paths.push((Isa::Avx512, true));
        }
        for (isa, requantize) in paths {
            let product = |post: &Epilogue| -> Vec<f32> {
                #[cfg(target_arch = "x86_64")]
                if isa.avx2() {
                    return tiles::matmul_q4k_on(isa, requantize, &mat, &x, m, post);
                }
                matmul_q4k(isa, &mat, &x, m, post)
            };
            let plain = if requantize {
                product(&Epilogue::default())
            } else {
                q4.clone()
            };
            let got = product(&post);
            // Fused, it gives bit for bit what the epilogue gives applied afterwards (the whole
            // units' vector store and the short unit's per-row store alike).
            let mut after = product(&Epilogue::default());
            post.apply_rows(isa, &mut after, rows);
            assert_eq!(got, after, "{isa:?} {requantize}");
            for (i, g) in got.iter().enumerate() {
                let y = (plain[i] + bias[i % rows]) as f64;
                let want = y / (1.0 + (-1.702 * y).exp()) + residual[i] as f64;
                assert!(
                    (*g as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{isa:?} {requantize} at {i}: {g} vs {want}"
                );
            }
            // Each step alone, too: a bias or a residual that went to the wrong column fails here.
            for post in [
                Epilogue {
                    bias: Some(&bias),
                    ..Default::default()
                },
                Epilogue {
                    residual: Some(&residual),
                    ..Default::default()
                },
            ] {
                let got = product(&post);
                for (i, g) in got.iter().enumerate() {
                    let add = post.bias.map_or(0.0, |b| b[i % rows])
                        + post.residual.map_or(0.0, |r| r[i]);
                    let want = plain[i] + add;
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{isa:?} {requantize} at {i}"
                    );
                }
            }
        }
    }

    /// Several matrices in one call give what each gives alone (shared activations, unit split).
    #[test]
    fn fused_call_equals_separate_calls() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cols = 2 * QK_K;
        let (_, a) = quantized(&random(&mut rng, 33 * cols, 1.0), 33, cols, GgmlDType::Q4K);
        let (_, b) = quantized(&random(&mut rng, 17 * cols, 1.0), 17, cols, GgmlDType::Q6K);
        let ma = QRows::new(Format::Q4K, 33, cols, &a).unwrap();
        let mb = QRows::new(Format::Q6K, 17, cols, &b).unwrap();
        let x = random(&mut rng, 2 * cols, 1.0);
        let isa = Isa::detect();
        let both = matvec(isa, &[ma, mb], &x, 2);
        assert_eq!(both[0], matvec(isa, &[ma], &x, 2)[0]);
        assert_eq!(both[1], matvec(isa, &[mb], &x, 2)[0]);
    }

    #[test]
    fn rejects_wrong_sizes() {
        let bytes = vec![0u8; 144 * 2];
        assert!(QRows::new(Format::Q4K, 2, QK_K, &bytes).is_some());
        assert!(QRows::new(Format::Q4K, 3, QK_K, &bytes).is_none());
        assert!(QRows::new(Format::Q4K, 1, 100, &bytes).is_none());
        assert!(QRows::new(Format::Q6K, 2, QK_K, &bytes).is_none());
    }
}
