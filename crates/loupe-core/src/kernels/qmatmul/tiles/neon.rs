//! The many-row Q4_K product's tiles on AArch64 (prefill, the vision tower): the x86 design
//! (`super`: 8 weight rows unpacked once per call and met by every activation row, 4 rows per
//! kernel call, sums kept in integers over a sub-block and scaled once) with NEON's instructions:
//! - `i8mm` ([`Isa::NeonI8mm`]): `smmla`, a 2x8 by 8x2 byte product into a 2x2 tile of 32-bit sums.
//!   The tile holds each pair of weight rows' 8 values of a step side by side, the kernel builds the
//!   same from each pair of activation rows, and one instruction does 32 multiply-adds;
//! - `dotprod` ([`Isa::NeonDot`]): `sdot` by element, each register 4 values of 4 weight rows
//!   against one activation row's 4 values picked from a register (no broadcast);
//! - NEON alone ([`Isa::Neon`]): the `sdot` layout, the activations' 4 values broadcast and the 16
//!   products widened (`smull`) and summed pairwise.
//!
//! Each computes the integers of [`scalar::dot_q4k`] exactly (codes 0..15 times 8-bit activations,
//! per sub-block times its 6-bit scale, the mins against the activations' sums) and differs from it
//! only in the order of the float operations at the end of each superblock.

use core::arch::aarch64::*;
use core::arch::asm;

use half::f16;

use super::{run, Kind, Source, MR, T};
use crate::kernels::neon::dot_widening;
use crate::kernels::qmatmul::{
    scales_mins_q4k, BlockQ4K, BlockQ8K, Epilogue, QRows, QK_K, TILE_ROWS,
};
use crate::kernels::Isa;

// The kernels below hold one tile set of 8 rows and up to 4 activation rows (2 pairs).
const _: () = assert!(T == 1 && TILE_ROWS == 8 && MR == 4);

/// `out[r * rows + j] = post(x_r · row j of w)` for the `m` rows of `x` on the tiles of `isa`'s
/// level (an AArch64 path).
pub fn matmul_q4k(isa: Isa, w: &QRows, x: &[f32], m: usize, post: &Epilogue) -> Vec<f32> {
    assert!(isa.neon());
    if isa == Isa::NeonI8mm {
        run::<Pairs>(isa, &Source::Q4K(w), x, m, post)
    } else {
        run::<Quads>(isa, &Source::Q4K(w), x, m, post)
    }
}

/// One superblock (256 values) of 8 weight rows: the codes in a kernel's order, and each row's
/// scales, mins and the block's two f16 factors in f32.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Tile {
    /// [`Quads`]: `[sub-block 8][step 8][row 8][4 values]`; [`Pairs`]: `[sub-block 8][step 4][pair
    /// of rows 4][2 rows][8 values]`. The unsigned 4-bit codes, one per byte.
    codes: [u8; QK_K * TILE_ROWS],
    /// `[sub-block][row]`.
    scales: [[i32; TILE_ROWS]; 8],
    /// `[sub-block][row]`.
    mins: [[i16; TILE_ROWS]; 8],
    d: [f32; TILE_ROWS],
    dmin: [f32; TILE_ROWS],
}

const EMPTY: Tile = Tile {
    codes: [0; QK_K * TILE_ROWS],
    scales: [[0; TILE_ROWS]; 8],
    mins: [[0; TILE_ROWS]; 8],
    d: [0.0; TILE_ROWS],
    dmin: [0.0; TILE_ROWS],
};

/// A block of zeros (scales and factors 0): the rows of a short last tile.
const ZERO_BLOCK: BlockQ4K = BlockQ4K {
    d: 0,
    dmin: 0,
    scales: [0; 12],
    qs: [0; QK_K / 2],
};

/// Unpacks rows `r0..r0 + 8` of `w` (rows past the end: zero blocks) into `tiles`, the codes laid
/// out by `codes`.
fn pack(w: &Source, r0: usize, tiles: &mut [Tile], codes: unsafe fn([&BlockQ4K; 8], &mut Tile)) {
    let Source::Q4K(w) = w else {
        unreachable!("the AArch64 tiles unpack Q4_K blocks only")
    };
    let n = TILE_ROWS.min(w.rows() - r0);
    let rows: [&[BlockQ4K]; TILE_ROWS] =
        std::array::from_fn(|rho| if rho < n { w.blocks(r0 + rho) } else { &[] });
    for (b, tile) in tiles.iter_mut().enumerate() {
        let blks: [&BlockQ4K; TILE_ROWS] =
            std::array::from_fn(|rho| rows[rho].get(b).unwrap_or(&ZERO_BLOCK));
        for (rho, blk) in blks.iter().enumerate() {
            tile.d[rho] = f16::from_bits(blk.d).to_f32();
            tile.dmin[rho] = f16::from_bits(blk.dmin).to_f32();
            // Bytes 0..8 the sub-blocks' scales, 8..16 their mins.
            let words = scales_mins_q4k(&blk.scales);
            let bytes: [u8; 16] = std::array::from_fn(|i| words[i / 4].to_le_bytes()[i % 4]);
            for sub in 0..8 {
                tile.scales[sub][rho] = bytes[sub] as i32;
                tile.mins[sub][rho] = bytes[8 + sub] as i16;
            }
        }
        // SAFETY: every AArch64 CPU has NEON.
        unsafe { codes(blks, tile) };
    }
}

/// The codes of 8 blocks in [`Quads`]' order. Bytes `32j..32j + 32` of a block hold sub-block
/// `2j` in their low nibbles and `2j + 1` in their high ones; a step is 4 of those bytes (a 32-bit
/// word), so each 4 rows' 16 bytes are a 4 x 4 matrix of words to transpose.
#[target_feature(enable = "neon")]
unsafe fn codes_quads(blks: [&BlockQ4K; TILE_ROWS], tile: &mut Tile) {
    let low = vdupq_n_u8(0x0f);
    let out = tile.codes.as_mut_ptr();
    for j in 0..4 {
        for half in 0..2 {
            for q in 0..2 {
                let r: [uint32x4_t; 4] = std::array::from_fn(|k| {
                    vreinterpretq_u32_u8(vld1q_u8(
                        blks[4 * q + k].qs.as_ptr().add(32 * j + 16 * half),
                    ))
                });
                let (t0, t1) = (vtrn1q_u32(r[0], r[1]), vtrn2q_u32(r[0], r[1]));
                let (t2, t3) = (vtrn1q_u32(r[2], r[3]), vtrn2q_u32(r[2], r[3]));
                let u = |a: uint32x4_t| vreinterpretq_u64_u32(a);
                // Word k of rows 4q..4q + 4.
                let words = [
                    vtrn1q_u64(u(t0), u(t2)),
                    vtrn1q_u64(u(t1), u(t3)),
                    vtrn2q_u64(u(t0), u(t2)),
                    vtrn2q_u64(u(t1), u(t3)),
                ];
                for (k, w) in words.into_iter().enumerate() {
                    let (step, bytes) = (4 * half + k, vreinterpretq_u8_u64(w));
                    for (sub, nibbles) in [
                        (2 * j, vandq_u8(bytes, low)),
                        (2 * j + 1, vshrq_n_u8::<4>(bytes)),
                    ] {
                        vst1q_u8(out.add((sub * 8 + step) * 32 + 16 * q), nibbles);
                    }
                }
            }
        }
    }
}

/// The codes of 8 blocks in [`Pairs`]' order: each pair of rows' 8-byte runs side by side.
#[target_feature(enable = "neon")]
unsafe fn codes_pairs(blks: [&BlockQ4K; TILE_ROWS], tile: &mut Tile) {
    let low = vdupq_n_u8(0x0f);
    let out = tile.codes.as_mut_ptr();
    for j in 0..4 {
        for half in 0..2 {
            for p in 0..4 {
                let row = |rho: usize| {
                    vreinterpretq_u64_u8(vld1q_u8(blks[rho].qs.as_ptr().add(32 * j + 16 * half)))
                };
                let (a, b) = (row(2 * p), row(2 * p + 1));
                for (c, pair) in [(0, vtrn1q_u64(a, b)), (1, vtrn2q_u64(a, b))] {
                    let (step, bytes) = (2 * half + c, vreinterpretq_u8_u64(pair));
                    for (sub, nibbles) in [
                        (2 * j, vandq_u8(bytes, low)),
                        (2 * j + 1, vshrq_n_u8::<4>(bytes)),
                    ] {
                        vst1q_u8(out.add(((sub * 4 + step) * 4 + p) * 16), nibbles);
                    }
                }
            }
        }
    }
}

/// Tiles of 4 rows x 4 values per register, for `sdot` by element (and its NEON stand-in).
struct Quads;

impl Kind for Quads {
    type Tile = Tile;
    const EMPTY: Tile = EMPTY;
    fn pack(w: &Source, r0: usize, tiles: &mut [Tile]) {
        pack(w, r0, tiles, codes_quads)
    }
    fn kernel<const R: usize>(
        isa: Isa,
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        // SAFETY: `NeonDot` and up are handed out only on CPUs with `dotprod`; every AArch64 CPU
        // has NEON.
        unsafe {
            if isa.dotprod() {
                kernel_sdot::<R>(tiles[0], acts, &mut acc[0])
            } else {
                kernel_widening::<R>(tiles[0], acts, &mut acc[0])
            }
        }
    }
}

/// Tiles of pairs of rows x 8 values per register, for `smmla`.
struct Pairs;

impl Kind for Pairs {
    type Tile = Tile;
    const EMPTY: Tile = EMPTY;
    fn pack(w: &Source, r0: usize, tiles: &mut [Tile]) {
        pack(w, r0, tiles, codes_pairs)
    }
    fn kernel<const R: usize>(
        isa: Isa,
        tiles: [&[Tile]; T],
        acts: [&[BlockQ8K]; R],
        acc: &mut [[[f32; TILE_ROWS]; R]; T],
    ) {
        assert_eq!(isa, Isa::NeonI8mm);
        // SAFETY: `NeonI8mm` is handed out only on CPUs with `i8mm` (and `dotprod`).
        unsafe { kernel_i8mm::<R>(tiles[0], acts, &mut acc[0]) }
    }
}

/// `acc` plus, in lane `j`, row `j`'s 4 bytes of `w` times bytes `4L..4L + 4` of `a` (`sdot` by
/// element).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_lane<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        a = in(vreg) a,
        l = const L,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `acc` plus the 2 x 2 products of `a`'s two rows of 8 bytes with `w`'s two (`smmla`): lanes
/// `(a0 w0, a0 w1, a1 w0, a1 w1)`.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn smmla(mut acc: int32x4_t, a: int8x16_t, w: int8x16_t) -> int32x4_t {
    asm!(
        "smmla {acc:v}.4s, {a:v}.16b, {w:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        w = in(vreg) w,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// [`sdot_lane`], or without the dot product its result by widening products.
#[inline(always)]
unsafe fn dot_lane<const DOT: bool, const L: i32>(
    acc: int32x4_t,
    w: int8x16_t,
    a: int8x16_t,
) -> int32x4_t {
    if DOT {
        sdot_lane::<L>(acc, w, a)
    } else {
        let a = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
        dot_widening(acc, w, a)
    }
}

/// `acc[i][rho] = acts[i] · row rho` on [`Quads`] tiles.
#[inline(always)]
unsafe fn kernel_quads<const R: usize, const DOT: bool>(
    tiles: &[Tile],
    acts: [&[BlockQ8K]; R],
    acc: &mut [[f32; TILE_ROWS]; R],
) {
    let mut fsum = [[vdupq_n_f32(0.0); 2]; R];
    for (b, tile) in tiles.iter().enumerate() {
        let mut isum = [[vdupq_n_s32(0); 2]; R];
        for sub in 0..8 {
            // Per activation row, rows 0..4 and 4..8: the sub-block's 32 products each.
            let mut p = [[vdupq_n_s32(0); 2]; R];
            for quad in 0..2 {
                let a: [int8x16_t; R] = std::array::from_fn(|i| {
                    vld1q_s8(acts[i][b].qs.as_ptr().add(32 * sub + 16 * quad))
                });
                let base = tile.codes.as_ptr().add((sub * 8 + 4 * quad) * 32) as *const i8;
                let w: [[int8x16_t; 4]; 2] = std::array::from_fn(|h| {
                    std::array::from_fn(|k| vld1q_s8(base.add(32 * k + 16 * h)))
                });
                for i in 0..R {
                    for h in 0..2 {
                        let s = dot_lane::<DOT, 0>(p[i][h], w[h][0], a[i]);
                        let s = dot_lane::<DOT, 1>(s, w[h][1], a[i]);
                        let s = dot_lane::<DOT, 2>(s, w[h][2], a[i]);
                        p[i][h] = dot_lane::<DOT, 3>(s, w[h][3], a[i]);
                    }
                }
            }
            let sc = tile.scales[sub].as_ptr();
            let sc = [vld1q_s32(sc), vld1q_s32(sc.add(4))];
            for i in 0..R {
                for h in 0..2 {
                    isum[i][h] = vmlaq_s32(isum[i][h], p[i][h], sc[h]);
                }
            }
        }
        add_block(tile, acts, b, &isum, &mut fsum);
    }
    store(&fsum, acc);
}

/// [`kernel_quads`] with `sdot`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn kernel_sdot<const R: usize>(
    tiles: &[Tile],
    acts: [&[BlockQ8K]; R],
    acc: &mut [[f32; TILE_ROWS]; R],
) {
    kernel_quads::<R, true>(tiles, acts, acc)
}

/// [`kernel_quads`] with widening products.
#[target_feature(enable = "neon")]
unsafe fn kernel_widening<const R: usize>(
    tiles: &[Tile],
    acts: [&[BlockQ8K]; R],
    acc: &mut [[f32; TILE_ROWS]; R],
) {
    kernel_quads::<R, false>(tiles, acts, acc)
}

/// `acc[i][rho] = acts[i] · row rho` on [`Pairs`] tiles: activation rows in pairs (an odd last row
/// paired with itself), 4 pairs of weight rows, a 2 x 2 tile of sums each.
#[target_feature(enable = "neon,i8mm")]
unsafe fn kernel_i8mm<const R: usize>(
    tiles: &[Tile],
    acts: [&[BlockQ8K]; R],
    acc: &mut [[f32; TILE_ROWS]; R],
) {
    let pairs = R.div_ceil(2);
    let mut fsum = [[vdupq_n_f32(0.0); 2]; R];
    for (b, tile) in tiles.iter().enumerate() {
        // [activation pair][weight pair].
        let mut blk = [[vdupq_n_s32(0); 4]; 2];
        for sub in 0..8 {
            let mut p = [[vdupq_n_s32(0); 4]; 2];
            for step in 0..4 {
                let base = tile.codes.as_ptr().add((sub * 4 + step) * 64) as *const i8;
                let w: [int8x16_t; 4] = std::array::from_fn(|wp| vld1q_s8(base.add(16 * wp)));
                for ap in 0..pairs {
                    let at = |i: usize| acts[i][b].qs.as_ptr().add(32 * sub + 8 * step);
                    let a = vcombine_s8(vld1_s8(at(2 * ap)), vld1_s8(at((2 * ap + 1).min(R - 1))));
                    for wp in 0..4 {
                        p[ap][wp] = smmla(p[ap][wp], a, w[wp]);
                    }
                }
            }
            for wp in 0..4 {
                let two = vld1_s32(tile.scales[sub].as_ptr().add(2 * wp));
                let sc = vcombine_s32(two, two);
                for ap in 0..pairs {
                    blk[ap][wp] = vmlaq_s32(blk[ap][wp], p[ap][wp], sc);
                }
            }
        }
        // Activation row i's sums for weight rows 0..4 and 4..8: the halves of its pair's tiles.
        let isum: [[int32x4_t; 2]; R] = std::array::from_fn(|i| {
            let t = &blk[i / 2];
            let half = |x: int32x4_t, y: int32x4_t| {
                let (x, y) = (vreinterpretq_s64_s32(x), vreinterpretq_s64_s32(y));
                vreinterpretq_s32_s64(if i % 2 == 0 {
                    vzip1q_s64(x, y)
                } else {
                    vzip2q_s64(x, y)
                })
            };
            [half(t[0], t[1]), half(t[2], t[3])]
        });
        add_block(tile, acts, b, &isum, &mut fsum);
    }
    store(&fsum, acc);
}

/// Adds superblock `b` to the float sums: per activation row, `d_act (d isum - dmin summ)` with
/// `summ` the rows' mins against the sums of each sub-block's activations, in the order x86's tile
/// kernels use.
#[inline(always)]
unsafe fn add_block<const R: usize>(
    tile: &Tile,
    acts: [&[BlockQ8K]; R],
    b: usize,
    isum: &[[int32x4_t; 2]; R],
    fsum: &mut [[float32x4_t; 2]; R],
) {
    let d = [
        vld1q_f32(tile.d.as_ptr()),
        vld1q_f32(tile.d.as_ptr().add(4)),
    ];
    let dmin = [
        vld1q_f32(tile.dmin.as_ptr()),
        vld1q_f32(tile.dmin.as_ptr().add(4)),
    ];
    for i in 0..R {
        let a = &acts[i][b];
        // Each sub-block's 32 activations summed from the pairs of sums of 16 (at most 4096).
        let bs = a.bsums.as_ptr();
        let mut sums = [0i16; 8];
        vst1q_s16(
            sums.as_mut_ptr(),
            vpaddq_s16(vld1q_s16(bs), vld1q_s16(bs.add(8))),
        );
        let mut summ = [vdupq_n_s32(0); 2];
        for (sub, &s) in sums.iter().enumerate() {
            let mn = vld1q_s16(tile.mins[sub].as_ptr());
            summ[0] = vmlal_n_s16(summ[0], vget_low_s16(mn), s);
            summ[1] = vmlal_n_s16(summ[1], vget_high_s16(mn), s);
        }
        let yd = vdupq_n_f32(a.d);
        for h in 0..2 {
            let f = vfmaq_f32(fsum[i][h], vcvtq_f32_s32(isum[i][h]), vmulq_f32(d[h], yd));
            fsum[i][h] = vfmsq_f32(f, vcvtq_f32_s32(summ[h]), vmulq_f32(dmin[h], yd));
        }
    }
}

#[inline(always)]
unsafe fn store<const R: usize>(fsum: &[[float32x4_t; 2]; R], acc: &mut [[f32; TILE_ROWS]; R]) {
    for i in 0..R {
        vst1q_f32(acc[i].as_mut_ptr(), fsum[i][0]);
        vst1q_f32(acc[i].as_mut_ptr().add(4), fsum[i][1]);
    }
}
