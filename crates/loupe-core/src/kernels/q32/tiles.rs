//! The many-row product with the 32-value block formats (prefill, batched decode, the server's
//! batches): `out = x W^T` for `m` activation rows, read from the blocks where they are stored.
//!
//! Before, these products expanded every matrix to f32 on each call from 16 rows on (and ran
//! candle's plain loop below that for Q4_1, Q5_0 and Q5_1): a batch of 16 answers paid the whole
//! expansion once per decode step, so the server got slower as clients were added.
//!
//! Here each 32-value block of 16 weight rows is unpacked once per call into a [`Tile`]: for each
//! step of 4 values, the 16 rows' 4 codes side by side (one 512-bit register, or two of 256 bits),
//! as unsigned bytes. An activation row's 4 bytes of that step, broadcast, multiply all 16 rows in
//! one instruction (`vpdpbusd` on a VNNI CPU, `maddubs` on AVX2) and the 16 sums come out in the
//! rows' order, with no horizontal adds. Each tile meets every activation row, 4 at a time.
//!
//! The codes are unsigned (`vpdpbusd` and `maddubs` want the weights' side unsigned): Q4_0's and
//! Q5_0's as stored (their offsets of 8 and 16 left out), Q8_0's plus 128. The offset comes off in
//! integers, once per block: `sum((q - o) a) = sum(q a) - o sum(a)`, with the activations' block sum
//! kept by [`quantize`](super::quantize). So every block's integer is exactly the reference's
//! ([`super::scalar::dot`]), and it is scaled once, as there; only the order of the float sums
//! differs.

use super::{quantize_into, BlockQ8x32, Format32, Q32Rows, QK};
use crate::kernels::qmatmul::Epilogue;
use crate::kernels::Isa;

/// Weight rows per tile: 16 rows x 4 codes fill one 512-bit register.
const TILE_ROWS: usize = 16;
/// Steps of 4 values per block.
const STEPS: usize = QK / 4;
/// Activation rows per kernel call (each weight register is used this many times).
const MR: usize = 4;

/// One 32-value block of 16 weight rows, laid out for the kernels.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile {
    /// `[step 8][row 16][4 values]`: the codes as stored, unsigned (Q8_0's plus 128 on x86, whose
    /// byte products want one side unsigned; as stored, signed, on AArch64, whose `sdot` is
    /// signed on both sides).
    codes: [u8; QK * TILE_ROWS],
    /// Each row's scale (0 for rows past the matrix's end).
    d: [f32; TILE_ROWS],
    /// Each row's minimum (Q4_1, Q5_1; else 0).
    m: [f32; TILE_ROWS],
}

const EMPTY: Tile = Tile {
    codes: [0; QK * TILE_ROWS],
    d: [0.0; TILE_ROWS],
    m: [0.0; TILE_ROWS],
};

/// Whether the tiles hold Q8_0's codes plus 128 (x86) rather than as stored.
const FLIPPED_Q8: bool = cfg!(target_arch = "x86_64");

/// What the tiles' codes carry above the format's values: `q_tile = q + offset`.
fn offset(format: Format32) -> i32 {
    match format {
        Format32::Q4_0 => 8,
        Format32::Q5_0 => 16,
        Format32::Q8_0 if FLIPPED_Q8 => 128,
        Format32::Q8_0 | Format32::Q4_1 | Format32::Q5_1 => 0,
    }
}

/// Where a block keeps its codes: the offset of its 32 code bytes (Q8_0) or 16 nibble bytes, and of
/// the 4 bytes of fifth bits for the Q5 formats.
fn code_bytes(format: Format32) -> (usize, Option<usize>) {
    match format {
        Format32::Q4_0 | Format32::Q8_0 => (2, None),
        Format32::Q4_1 => (4, None),
        Format32::Q5_0 => (6, Some(2)),
        Format32::Q5_1 => (8, Some(4)),
    }
}

fn has_min(format: Format32) -> bool {
    matches!(format, Format32::Q4_1 | Format32::Q5_1)
}

/// Whether [`matmul`] runs on this instruction set (x86's AVX2 and AVX-512, AArch64's NEON).
pub fn applies(isa: Isa) -> bool {
    (cfg!(target_arch = "x86_64") && isa.avx2()) || (cfg!(target_arch = "aarch64") && isa.neon())
}

/// Whether `m` activation rows go to [`matmul`] rather than the matrix-vector kernel: from one row
/// on x86 (where the tiles are faster at every size, `docs/benchmarks.md`, session 29); above 4
/// on AArch64, whose portable unpacking costs more than a few rows' products.
pub fn preferred(isa: Isa, m: usize) -> bool {
    applies(isa) && (cfg!(target_arch = "x86_64") || m > 4)
}

/// `outs[i][r * rows_i + j] = posts[i](x_r · row j of ws[i])` for the `m` rows of `x` (`m x cols`,
/// row-major): the activations are quantized once and shared by every matrix (q, k and v; gate and
/// up), whose tiles of 16 rows are spread over candle's thread pool as one piece of work.
///
/// # Panics
/// Unless [`applies`]`(isa)`, every matrix has `x`'s columns, and `posts` has one epilogue per
/// matrix that fits it.
pub fn matmul(isa: Isa, ws: &[Q32Rows], x: &[f32], m: usize, posts: &[Epilogue]) -> Vec<Vec<f32>> {
    assert!(applies(isa) && posts.len() == ws.len());
    let cols = ws.first().map_or(QK, |w| w.cols);
    assert!(ws.iter().all(|w| w.cols == cols) && x.len() == m * cols);
    let kb = cols / QK;
    let yq = quantize_rows(x, cols, m);
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.rows)).collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    let mut starts = Vec::with_capacity(ws.len());
    let mut units = 0;
    for w in ws {
        starts.push(units);
        units += w.rows.div_ceil(TILE_ROWS);
    }
    crate::kernels::pool::parallel_for_with(
        units,
        || vec![EMPTY; kb],
        |tiles, range| {
            for unit in range.clone() {
                let i = starts.partition_point(|&s| s <= unit) - 1;
                let (w, post) = (&ws[i], &posts[i]);
                let r0 = (unit - starts[i]) * TILE_ROWS;
                let n = TILE_ROWS.min(w.rows - r0);
                if unit + 1 < range.end && starts.get(i + 1).is_none_or(|&s| unit + 1 < s) {
                    // The next unit's rows, asked for while this one is unpacked and multiplied:
                    // at one activation row the product waits on memory alone.
                    let next = w.rows.min(r0 + 2 * TILE_ROWS);
                    let bytes = w.row_bytes(r0).len();
                    let at = w.data[(r0 + TILE_ROWS).min(next) * bytes..next * bytes].as_ptr();
                    crate::kernels::prefetch(at as *const f32, (next - r0 - TILE_ROWS) * bytes / 4);
                }
                pack(w, r0, tiles);
                let store = |r: usize, sums: &mut [f32; TILE_ROWS]| {
                    post.apply(isa, &mut sums[..n], r, r0, w.rows);
                    // SAFETY: columns r0..r0 + n of row r of matrix i belong to this unit alone,
                    // inside the m x rows values reserved above.
                    unsafe {
                        let dst = (ptrs[i] as *mut f32).add(r * w.rows + r0);
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), dst, n);
                    }
                };
                let act = |r: usize| &yq[r * kb..(r + 1) * kb];
                let mut r = 0;
                while r + MR <= m {
                    let mut acc = [[0f32; TILE_ROWS]; MR];
                    kernel(
                        isa,
                        w.format,
                        tiles,
                        std::array::from_fn(|k| act(r + k)),
                        &mut acc,
                    );
                    for (k, sums) in acc.iter_mut().enumerate() {
                        store(r + k, sums);
                    }
                    r += MR;
                }
                for r in r..m {
                    let mut acc = [[0f32; TILE_ROWS]; 1];
                    kernel(isa, w.format, tiles, [act(r)], &mut acc);
                    store(r, &mut acc[0]);
                }
            }
        },
    );
    for (out, w) in outs.iter_mut().zip(ws) {
        // SAFETY: the units cover every column of every row of every matrix, each stored above.
        unsafe { out.set_len(m * w.rows) };
    }
    outs
}

/// The `m` rows of `x` quantized block by block ([`quantize_into`]), rows spread over the pool.
fn quantize_rows(x: &[f32], cols: usize, m: usize) -> Vec<BlockQ8x32> {
    let kb = cols / QK;
    let mut out = vec![BlockQ8x32::ZERO; m * kb];
    let ptr = out.as_mut_ptr() as usize;
    crate::kernels::pool::parallel_for(m, |rows| {
        // SAFETY: rows `rows` of `out` are written by this range alone, inside `out`.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                (ptr as *mut BlockQ8x32).add(rows.start * kb),
                rows.len() * kb,
            )
        };
        quantize_into(&x[rows.start * cols..rows.end * cols], dst);
    });
    out
}

/// Unpacks rows `r0..r0 + 16` of `w` into `tiles` (one per block); rows past the end get scale and
/// minimum 0 (their codes repeat the last row's), so they add nothing.
fn pack(w: &Q32Rows, r0: usize, tiles: &mut [Tile]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the tiles run on x86 only with AVX2 and F16C (`applies`).
    unsafe {
        x86::pack(w, r0, tiles)
    }
    #[cfg(not(target_arch = "x86_64"))]
    pack_words(w, r0, tiles)
}

/// [`pack`] in plain integer code, one 4-byte word of a row at a time: AArch64's, and the
/// reference the x86 version is tested against.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn pack_words(w: &Q32Rows, r0: usize, tiles: &mut [Tile]) {
    let n = TILE_ROWS.min(w.rows - r0);
    let bb = w.format.block_bytes();
    let (qs, qh) = code_bytes(w.format);
    for rho in 0..TILE_ROWS {
        let row = w.row_bytes(r0 + rho.min(n - 1));
        for (b, tile) in tiles.iter_mut().enumerate() {
            let blk = &row[b * bb..(b + 1) * bb];
            let word32 =
                |at: usize| u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let mut put = |step: usize, v: u32| {
                let at = (step * TILE_ROWS + rho) * 4;
                tile.codes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            };
            if w.format == Format32::Q8_0 {
                let flip = if FLIPPED_Q8 { 0x8080_8080 } else { 0 };
                for step in 0..STEPS {
                    put(step, word32(qs + 4 * step) ^ flip);
                }
            } else {
                let high = qh.map(word32);
                // Value e's fifth bit is bit e of `high`: 0x10 in byte e % 4 of step e / 4.
                let fifth = |step: usize| {
                    high.map_or(0, |h| {
                        let bits = (h >> (4 * step)) & 0xf;
                        (bits.wrapping_mul(0x0020_4081) & 0x0101_0101) << 4
                    })
                };
                for k in 0..STEPS / 2 {
                    let v = word32(qs + 4 * k);
                    put(k, (v & 0x0f0f_0f0f) | fifth(k));
                    put(
                        k + STEPS / 2,
                        ((v >> 4) & 0x0f0f_0f0f) | fifth(k + STEPS / 2),
                    );
                }
            }
            let live = rho < n;
            tile.d[rho] = if live { super::half(blk, 0) } else { 0.0 };
            tile.m[rho] = if live && has_min(w.format) {
                super::half(blk, 2)
            } else {
                0.0
            };
        }
    }
}

/// The 4 activation bytes of step `step` of block `y`, as one 32-bit value.
#[inline(always)]
fn word(y: &BlockQ8x32, step: usize) -> i32 {
    let q = &y.qs[4 * step..4 * step + 4];
    i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
}

/// `acc[i][rho] = acts[i] · row rho of the tiles`.
fn kernel<const R: usize>(
    isa: Isa,
    format: Format32,
    tiles: &[Tile],
    acts: [&[BlockQ8x32]; R],
    acc: &mut [[f32; TILE_ROWS]; R],
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` is an x86 SIMD path (`applies`), handed out only when the CPU has what the
    // kernel's target features name (Avx512: AVX-512 F, BW and VNNI).
    unsafe {
        use x86::Codes;
        let off = offset(format);
        match (isa, has_min(format)) {
            (Isa::Avx512, true) => x86::kernel_vnni::<R, true>(tiles, acts, off, acc),
            (Isa::Avx512, false) => x86::kernel_vnni::<R, false>(tiles, acts, off, acc),
            _ => match format {
                Format32::Q4_0 => {
                    x86::kernel_avx2::<R, { Codes::FOUR }, false>(tiles, acts, 8, acc)
                }
                Format32::Q4_1 => x86::kernel_avx2::<R, { Codes::FOUR }, true>(tiles, acts, 0, acc),
                Format32::Q5_0 => {
                    x86::kernel_avx2::<R, { Codes::FIVE }, false>(tiles, acts, 16, acc)
                }
                Format32::Q5_1 => x86::kernel_avx2::<R, { Codes::FIVE }, true>(tiles, acts, 0, acc),
                // Signed products (`sign`): no offset to take off.
                Format32::Q8_0 => {
                    x86::kernel_avx2::<R, { Codes::EIGHT }, false>(tiles, acts, 0, acc)
                }
            },
        }
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `isa` is a NEON path (`applies`), `NeonDot` and `NeonI8mm` only where the CPU has
    // the dot-product extension.
    unsafe {
        let off = offset(format);
        match (isa, has_min(format)) {
            (Isa::NeonDot | Isa::NeonI8mm, true) => {
                arm::kernel_sdot::<R, true>(tiles, acts, off, acc)
            }
            (Isa::NeonDot | Isa::NeonI8mm, false) => {
                arm::kernel_sdot::<R, false>(tiles, acts, off, acc)
            }
            (_, true) => arm::kernel_widening::<R, true>(tiles, acts, off, acc),
            (_, false) => arm::kernel_widening::<R, false>(tiles, acts, off, acc),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (isa, format, tiles, acts, acc);
        unreachable!("the 32-value tiles run on x86 and AArch64 only")
    }
}

/// The NEON kernels: per half of 8 rows, two registers of 4 rows x 4 codes against an activation
/// word repeated in all 4 lanes, by `sdot` or by NEON's widening products (the same integers).
#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;
    use crate::kernels::neon::{dot_widening, sdot};
    use core::arch::aarch64::*;

    macro_rules! kernel_with {
        ($(#[$doc:meta])* $name:ident, $features:literal, $dot:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize, const MIN: bool>(
                tiles: &[Tile],
                acts: [&[BlockQ8x32]; R],
                off: i32,
                acc: &mut [[f32; TILE_ROWS]; R],
            ) {
                for half in 0..2 {
                    let mut accf = [[vdupq_n_f32(0.0); 2]; R];
                    for (b, t) in tiles.iter().enumerate() {
                        let mut int = [[vdupq_n_s32(0); 2]; R];
                        for s in 0..STEPS {
                            let c = t.codes.as_ptr().add(64 * s + 32 * half) as *const i8;
                            let (w0, w1) = (vld1q_s8(c), vld1q_s8(c.add(16)));
                            for i in 0..R {
                                let a = vreinterpretq_s8_s32(vdupq_n_s32(word(&acts[i][b], s)));
                                int[i][0] = $dot(int[i][0], w0, a);
                                int[i][1] = $dot(int[i][1], w1, a);
                            }
                        }
                        let d = t.d.as_ptr().add(8 * half);
                        let m = t.m.as_ptr().add(8 * half);
                        for i in 0..R {
                            let y = &acts[i][b];
                            let o = vdupq_n_s32(off * y.sum);
                            for g in 0..2 {
                                let exact = vcvtq_f32_s32(vsubq_s32(int[i][g], o));
                                let scale = vmulq_n_f32(vld1q_f32(d.add(4 * g)), y.d);
                                accf[i][g] = vfmaq_f32(accf[i][g], exact, scale);
                                if MIN {
                                    accf[i][g] = vfmaq_n_f32(accf[i][g], vld1q_f32(m.add(4 * g)), y.s);
                                }
                            }
                        }
                    }
                    for i in 0..R {
                        for g in 0..2 {
                            vst1q_f32(acc[i].as_mut_ptr().add(8 * half + 4 * g), accf[i][g]);
                        }
                    }
                }
            }
        };
    }

    kernel_with!(
        /// [`Isa::NeonDot`]: `sdot`.
        kernel_sdot,
        "neon,dotprod",
        sdot
    );
    kernel_with!(
        /// [`Isa::Neon`]: `smull` and pairwise adds.
        kernel_widening,
        "neon",
        dot_widening
    );
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use core::arch::x86_64::*;

    /// The codes' width, for [`kernel_avx2`]: how many steps' `maddubs` pairs fit a 16-bit sum.
    pub struct Codes;

    impl Codes {
        /// 4-bit codes: a pair is at most 2 x 15 x 127 = 3810, 8 steps 30480.
        pub const FOUR: u8 = 4;
        /// 5-bit codes: a pair is at most 2 x 31 x 127 = 7874, 4 steps 31496.
        pub const FIVE: u8 = 5;
        /// 8-bit signed codes (Q8_0): `maddubs` of `|q|` and `a` with `q`'s sign, one step each.
        pub const EIGHT: u8 = 8;
    }

    /// [`super::pack`]: for each half of 8 rows, one 32-bit gather per 4 bytes of the blocks.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `r0` is a row of `w`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack(w: &Q32Rows, r0: usize, tiles: &mut [Tile]) {
        let n = TILE_ROWS.min(w.rows - r0);
        let bb = w.format.block_bytes();
        let row_bytes = (w.cols / QK * bb) as i32;
        let base = w.data.as_ptr().add(r0 * row_bytes as usize);
        let nibble = _mm256_set1_epi8(0x0f);
        let row = |i: usize| (i.min(n - 1) as i32) * row_bytes;
        let idx: [__m256i; 2] = std::array::from_fn(|half| {
            let r = |j: usize| row(half * 8 + j);
            _mm256_setr_epi32(r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7))
        });
        // All ones in the lanes of rows that exist.
        let live: [__m256; 2] = std::array::from_fn(|half| {
            let at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let first = _mm256_set1_epi32((half * 8) as i32);
            let rows = _mm256_set1_epi32(n as i32);
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(rows, _mm256_add_epi32(at, first)))
        });
        // The 16-bit halves of each 32-bit lane, 8 lanes' worth into one 128-bit register.
        let low_halves = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1,
            -1, -1, -1, -1, -1, -1, -1,
        );
        let high_halves = _mm256_setr_epi8(
            2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15,
            -1, -1, -1, -1, -1, -1, -1, -1,
        );
        let halves = |v: __m256i, pick: __m256i| {
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(v, pick));
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
        };
        let min = super::has_min(w.format);
        for (b, tile) in tiles.iter_mut().enumerate() {
            let blk = base.add(b * bb);
            for (half, &idx) in idx.iter().enumerate() {
                let gather =
                    |at: usize| _mm256_i32gather_epi32::<1>(blk.add(at) as *const i32, idx);
                // The scale (and the minimum, in the next two bytes) of each row.
                let head = gather(0);
                let d = _mm256_and_ps(halves(head, low_halves), live[half]);
                _mm256_storeu_ps(tile.d.as_mut_ptr().add(8 * half), d);
                let m = if min {
                    _mm256_and_ps(halves(head, high_halves), live[half])
                } else {
                    _mm256_setzero_ps()
                };
                _mm256_storeu_ps(tile.m.as_mut_ptr().add(8 * half), m);
                let codes = tile.codes.as_mut_ptr().add(half * 32);
                let put = |step: usize, v: __m256i| {
                    _mm256_store_si256(codes.add(step * 64) as *mut __m256i, v)
                };
                let (qs, qh) = super::code_bytes(w.format);
                if w.format == Format32::Q8_0 {
                    // The 8 rows' 32 bytes are an 8 x 8 matrix of words (row x step): the tile
                    // wants it transposed (fewer instructions than 8 gathers).
                    let flip = _mm256_set1_epi8(-128);
                    let words = crate::kernels::x86::transpose_words(std::array::from_fn(|j| {
                        let at = row(half * 8 + j) as usize;
                        _mm256_loadu_si256(blk.add(at + qs) as *const __m256i)
                    }));
                    for (step, v) in words.into_iter().enumerate() {
                        put(step, _mm256_xor_si256(v, flip));
                    }
                    continue;
                }
                let high = qh.map(&gather);
                // Bytes 4k..4k+4 hold values 4k.. (low nibbles) and 16 + 4k.. (high nibbles).
                for k in 0..STEPS / 2 {
                    let v = gather(qs + 4 * k);
                    let mut lo = _mm256_and_si256(v, nibble);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi32::<4>(v), nibble);
                    if let Some(h) = high {
                        lo = _mm256_or_si256(lo, fifth_bits(h, k));
                        hi = _mm256_or_si256(hi, fifth_bits(h, k + STEPS / 2));
                    }
                    put(k, lo);
                    put(k + STEPS / 2, hi);
                }
            }
        }
    }

    /// Bits `4 step..4 step + 4` of each 32-bit lane of `h` as that lane's 4 bytes: 0x10 where set.
    #[inline(always)]
    unsafe fn fifth_bits(h: __m256i, step: usize) -> __m256i {
        let bits = _mm256_and_si256(
            _mm256_srl_epi32(h, _mm_cvtsi32_si128(4 * step as i32)),
            _mm256_set1_epi32(0xf),
        );
        // x * 0x00204081 puts bit e of x at bit 8e (the shifted copies do not overlap).
        let spread = _mm256_and_si256(
            _mm256_mullo_epi32(bits, _mm256_set1_epi32(0x0020_4081)),
            _mm256_set1_epi32(0x0101_0101),
        );
        _mm256_slli_epi32::<4>(spread)
    }

    /// [`super::kernel`] with `vpdpbusd` on 16 rows at once; `MIN`: the format has a minimum.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn kernel_vnni<const R: usize, const MIN: bool>(
        tiles: &[Tile],
        acts: [&[BlockQ8x32]; R],
        off: i32,
        acc: &mut [[f32; TILE_ROWS]; R],
    ) {
        let mut accf = [_mm512_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            let w: [__m512i; STEPS] = std::array::from_fn(|s| {
                _mm512_load_si512(t.codes.as_ptr().add(64 * s) as *const __m512i)
            });
            let d = _mm512_load_ps(t.d.as_ptr());
            for i in 0..R {
                let y = &acts[i][b];
                // Two chains of sums, so that 2R products are in flight.
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for s in (0..STEPS).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[s], _mm512_set1_epi32(word(y, s)));
                    s1 = _mm512_dpbusd_epi32(s1, w[s + 1], _mm512_set1_epi32(word(y, s + 1)));
                }
                let int =
                    _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(off * y.sum));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(y.d));
                accf[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(int), scale, accf[i]);
                if MIN {
                    let m = _mm512_load_ps(t.m.as_ptr());
                    accf[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(y.s), accf[i]);
                }
            }
        }
        for i in 0..R {
            _mm512_storeu_ps(acc[i].as_mut_ptr(), accf[i]);
        }
    }

    /// [`super::kernel`] with AVX2's `maddubs`, 8 rows at a time: the 16-bit products summed over
    /// as many steps as [`Codes`] allows, then widened by `madd`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2<const R: usize, const CODES: u8, const MIN: bool>(
        tiles: &[Tile],
        acts: [&[BlockQ8x32]; R],
        off: i32,
        acc: &mut [[f32; TILE_ROWS]; R],
    ) {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        // Steps whose 16-bit sums add up before they are widened.
        let run = match CODES {
            Codes::FOUR => STEPS,
            Codes::FIVE => STEPS / 2,
            _ => 1,
        };
        for half in 0..2 {
            let mut accf = [_mm256_setzero_ps(); R];
            for (b, t) in tiles.iter().enumerate() {
                let codes = t.codes.as_ptr().add(32 * half);
                let mut int = [_mm256_setzero_si256(); R];
                for s0 in (0..STEPS).step_by(run) {
                    let mut p16 = [_mm256_setzero_si256(); R];
                    for s in s0..s0 + run {
                        let u = _mm256_load_si256(codes.add(64 * s) as *const __m256i);
                        if CODES == Codes::EIGHT {
                            // q = u - 128 as a signed byte; |q| times a with q's sign.
                            let q = _mm256_xor_si256(u, flip);
                            let mag = _mm256_sign_epi8(q, q);
                            for i in 0..R {
                                let a = _mm256_set1_epi32(word(&acts[i][b], s));
                                let p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(a, q));
                                p16[i] = _mm256_add_epi16(p16[i], p);
                            }
                        } else {
                            for i in 0..R {
                                let a = _mm256_set1_epi32(word(&acts[i][b], s));
                                p16[i] = _mm256_add_epi16(p16[i], _mm256_maddubs_epi16(u, a));
                            }
                        }
                    }
                    for i in 0..R {
                        int[i] = _mm256_add_epi32(int[i], _mm256_madd_epi16(p16[i], ones));
                    }
                }
                let d = _mm256_load_ps(t.d.as_ptr().add(8 * half));
                for i in 0..R {
                    let y = &acts[i][b];
                    let exact = _mm256_sub_epi32(int[i], _mm256_set1_epi32(off * y.sum));
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(y.d));
                    accf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), scale, accf[i]);
                    if MIN {
                        let m = _mm256_load_ps(t.m.as_ptr().add(8 * half));
                        accf[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(y.s), accf[i]);
                    }
                }
            }
            for i in 0..R {
                _mm256_storeu_ps(acc[i].as_mut_ptr().add(8 * half), accf[i]);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// x86's unpacking (gathers, transposes) gives the portable version's tiles bit for bit: every
    /// format, a whole tile and one that ends past the last row.
    #[test]
    fn the_x86_unpacking_equals_the_portable_one() {
        if !applies(Isa::detect()) {
            return;
        }
        let (rows, cols) = (37, 96);
        for f in [
            Format32::Q4_0,
            Format32::Q4_1,
            Format32::Q5_0,
            Format32::Q5_1,
            Format32::Q8_0,
        ] {
            let bb = f.block_bytes();
            let mut state = 7u64;
            let mut data: Vec<u8> = (0..rows * cols / QK * bb)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 33) as u8
                })
                .collect();
            for blk in data.chunks_exact_mut(bb) {
                // Finite scales and minimums (exponent bits below all ones).
                blk[1] &= 0x3b;
                blk[3] &= 0x3b;
            }
            let w = Q32Rows::new(f, rows, cols, &data).unwrap();
            for r0 in [0, 16, 32] {
                let (mut want, mut got) = (vec![EMPTY; cols / QK], vec![EMPTY; cols / QK]);
                pack_words(&w, r0, &mut want);
                // SAFETY: checked above that the CPU has AVX2.
                unsafe { x86::pack(&w, r0, &mut got) };
                for (a, b) in want.iter().zip(&got) {
                    assert_eq!(a.codes, b.codes, "{f:?} rows {r0}..");
                    assert_eq!(
                        a.d.map(f32::to_bits),
                        b.d.map(f32::to_bits),
                        "{f:?} rows {r0}.."
                    );
                    assert_eq!(
                        a.m.map(f32::to_bits),
                        b.m.map(f32::to_bits),
                        "{f:?} rows {r0}.."
                    );
                }
            }
        }
    }
}
