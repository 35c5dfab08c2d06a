//! Loupe's own compute kernels, where the profile says candle's leave speed on the table.
//!
//! Every kernel has a scalar reference beside its SIMD versions; the SIMD version is picked at run
//! time from the CPU's features, and a property test compares the two on random odd shapes
//! (`tests` in each file). The models reach the kernels through `models::layers`, never directly.

pub mod activation;
pub mod attention;
pub mod attention_int;
pub mod norm;
pub mod pool;
pub mod q32;
pub mod qmatmul;

/// The rows of `dim` values, `stride` apart, that one piece of parallel work writes inside a larger
/// output whose other columns other pieces write at the same time (an attention head's columns of
/// the output rows). Held as a raw pointer, not a slice: a slice over the whole span would also cover
/// the other pieces' columns, and two threads may not hold `&mut` to the same memory.
pub(crate) struct StridedRows {
    ptr: *mut f32,
    stride: usize,
    dim: usize,
    rows: usize,
}

impl StridedRows {
    /// # Safety
    /// Rows `0..rows` of `dim` values at `ptr + i * stride` lie inside one allocation, and nothing
    /// else reads or writes them while this value lives.
    pub(crate) unsafe fn new(ptr: *mut f32, stride: usize, dim: usize, rows: usize) -> Self {
        StridedRows {
            ptr,
            stride,
            dim,
            rows,
        }
    }

    /// Row `i`, for as long as `self` is borrowed.
    pub(crate) fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        // SAFETY: `new`'s contract; `i` is one of the rows.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), self.dim) }
    }

    /// The first row's start, for products that write rows `stride()` apart themselves.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut f32 {
        self.ptr
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }
}

/// Asks the CPU to bring the cache lines of the `len` values at `ptr` closer (a hint: it neither
/// faults nor changes memory, so any pointer will do; nothing on other targets).
pub(crate) fn prefetch(ptr: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let end = ptr.wrapping_add(len) as usize;
        let mut at = ptr as usize & !63;
        while at < end {
            // SAFETY: a prefetch neither faults nor changes memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len);
}

/// The instruction set a kernel runs with on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA (+ F16C), x86-64.
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512 (F, BW, VL) and VNNI: 32 vector registers and `vpdpbusd`, which
    /// multiplies bytes and adds them into 32-bit sums in one instruction. Kernels without a version
    /// of their own for it run their AVX2 version.
    Avx512,
    /// AArch64's Advanced SIMD (NEON; every AArch64 CPU has it): 32 registers of 128 bits, byte
    /// products widened with `smull` and summed pairwise with `sadalp`.
    Neon,
    /// [`Isa::Neon`] plus the dot-product extension (`sdot`: four byte products summed into each
    /// 32-bit lane in one instruction). Cortex-A76 (Raspberry Pi 5), Apple A13/M1 and later.
    NeonDot,
    /// [`Isa::NeonDot`] plus the 8-bit matrix multiply (`smmla`: a 2x8 by 8x2 tile of bytes into a
    /// 2x2 tile of 32-bit sums). Apple A15/M2 and later, Neoverse V1/N2, Cortex-A710 and later.
    /// Kernels without a version of their own for it run their dot-product version.
    NeonI8mm,
}

impl Isa {
    /// The best instruction set this CPU has that our kernels use. `LOUPE_KERNELS` names a lower
    /// one to force it: `scalar` (the reference, for checking a result) anywhere, `avx2` on an
    /// AVX-512 CPU, `neon` or `dotprod` on an AArch64 CPU with more (for comparing the paths).
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().unwrap_or(&Isa::Scalar);
            match std::env::var("LOUPE_KERNELS") {
                Ok(name) => available
                    .into_iter()
                    .find(|i| i.name() == name)
                    .unwrap_or(best),
                Err(_) => best,
            }
        })
    }

    /// Every instruction set this CPU can run, lowest first, for tests that check each path
    /// against the reference.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if has_avx2() {
            v.push(Isa::Avx2);
            if has_avx512() {
                v.push(Isa::Avx512);
            }
        }
        if cfg!(target_arch = "aarch64") {
            v.push(Isa::Neon);
            if has_dotprod() {
                v.push(Isa::NeonDot);
                if has_i8mm() {
                    v.push(Isa::NeonI8mm);
                }
            }
        }
        v
    }

    /// The name `LOUPE_KERNELS` takes, and `loupe info` and `loupe bench` print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "dotprod",
            Isa::NeonI8mm => "i8mm",
        }
    }

    /// Whether this path may run AVX2 kernels (every x86 SIMD path can).
    pub fn avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }

    /// Whether this path may run NEON kernels (every AArch64 SIMD path can).
    pub fn neon(self) -> bool {
        matches!(self, Isa::Neon | Isa::NeonDot | Isa::NeonI8mm)
    }

    /// Whether this path may run `sdot` kernels.
    pub fn dotprod(self) -> bool {
        matches!(self, Isa::NeonDot | Isa::NeonI8mm)
    }
}

/// Whether candle's quantized matrix products may run on this CPU. On AArch64, candle 0.11's
/// one-row dot products of the K-quants, Q4_0 and Q8_0 execute `sdot` without asking the CPU, so a
/// core without the dot-product extension (Cortex-A53/A55/A72/A73: Raspberry Pi 3 and 4, many
/// industrial boards) stops with SIGILL there; the layers then take our kernels or expand the
/// blocks to f32 instead.
pub fn candle_quantized_products_run() -> bool {
    cfg!(not(target_arch = "aarch64")) || has_dotprod()
}

/// Whether this CPU has what [`Isa::Avx2`] kernels use: AVX2, FMA and F16C.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has what [`Isa::Avx512`] kernels use beyond AVX2: AVX-512 F, BW, VL and VNNI.
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has the dot-product extension ([`Isa::NeonDot`]).
fn has_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("dotprod");
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// Whether this CPU has the 8-bit matrix multiply ([`Isa::NeonI8mm`]).
fn has_i8mm() -> bool {
    #[cfg(target_arch = "aarch64")]
    return std::arch::is_aarch64_feature_detected!("i8mm");
    #[cfg(not(target_arch = "aarch64"))]
    false
}

/// NEON helpers shared by the kernels' AArch64 paths: the byte instruction Rust's `std::arch` keeps
/// unstable (`vdotq_s32`, as inline assembly of the one instruction: stable, and what the intrinsic
/// would emit), its stand-in without the dot-product extension, and `exp`.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use core::arch::aarch64::*;
    use core::arch::asm;

    /// `acc + ` the sums of each 4 byte products of `a` and `b` (`sdot`).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// `e^x` for each lane, `x` in [-87, 88] (clamped): the x86 kernels' method and constants
    /// (`x = n ln2 + r`, Cephes' polynomial for `e^r`, `2^n` written into the exponent bits).
    #[inline]
    #[target_feature(enable = "neon")]
    pub unsafe fn exp(x: float32x4_t) -> float32x4_t {
        use super::{EXP_POLY, LN2_HI, LN2_LO};
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0)), vdupq_n_f32(88.0));
        // Rounded to nearest, ties to even, as x86's `round`.
        let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
        let r = vfmsq_f32(x, n, vdupq_n_f32(LN2_HI));
        let r = vfmsq_f32(r, n, vdupq_n_f32(LN2_LO));
        let mut p = vdupq_n_f32(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = vfmaq_f32(vdupq_n_f32(*c), p, r);
        }
        let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), p, vmulq_f32(r, r));
        let pow2n = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(y, vreinterpretq_f32_s32(pow2n))
    }

    /// The sums of each 4 byte products of `a` and `b` without the dot-product extension: the 16
    /// products widened to 16 bits (`smull`), then summed pairwise twice.
    #[inline]
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_widening(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        // Each pair of 16-bit products summed into 32 bits, then adjacent pairs: lane i gets
        // products 4i..4i+3, as `sdot` would.
        let lo = vpaddlq_s16(lo);
        let hi = vpaddlq_s16(hi);
        vaddq_s32(acc, vpaddq_s32(lo, hi))
    }
}

/// `ln 2` in two parts, a short one exact in f32 and the rest, so `n ln2` loses no bits.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const LN2_HI: f32 = 355.0 / 512.0;
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `(e^r - 1 - r) / r^2`, highest degree first.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Small AVX helpers shared by the kernels' AVX2 paths.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::*;

    use super::{EXP_POLY, LN2_HI, LN2_LO};

    /// The sum of the 4 lanes.
    #[inline(always)]
    pub unsafe fn hsum128(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The 8 x 8 matrix of 4-byte words `r[row][k]` (8 rows of 32 bytes) transposed: `out[k][row]`.
    #[inline(always)]
    pub unsafe fn transpose_words(r: [__m256i; 8]) -> [__m256i; 8] {
        // Pairs of rows, then quads, then the two 128-bit halves.
        let t: [__m256i; 8] = std::array::from_fn(|k| {
            let (a, b) = (r[2 * (k / 2)], r[2 * (k / 2) + 1]);
            if k % 2 == 0 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        // u[q][s]: rows 4q..4q+4, words s and s+4 (s in 0..4).
        let u: [[__m256i; 4]; 2] = std::array::from_fn(|q| {
            let (t0, t1, t2, t3) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
            [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ]
        });
        std::array::from_fn(|k| {
            let (lo, hi) = (u[0][k % 4], u[1][k % 4]);
            if k < 4 {
                _mm256_permute2x128_si256(lo, hi, 0x20)
            } else {
                _mm256_permute2x128_si256(lo, hi, 0x31)
            }
        })
    }

    /// The sum of the 8 lanes.
    #[inline(always)]
    pub unsafe fn hsum256(v: __m256) -> f32 {
        hsum128(_mm_add_ps(
            _mm256_castps256_ps128(v),
            _mm256_extractf128_ps(v, 1),
        ))
    }

    /// `e^x` for each lane, `x` in [-87, 88] (clamped): `x = n ln2 + r` with `|r| <= ln2 / 2`,
    /// `e^r` by Cephes' degree-7 polynomial (within 2 ulp of the correctly rounded value), `2^n`
    /// written into the exponent bits.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n))
    }
}
