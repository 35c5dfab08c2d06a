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
}

impl Isa {
    /// The best instruction set this CPU has that our kernels use. `LOUPE_KERNELS=scalar` forces the
    /// reference (for checking a result), `LOUPE_KERNELS=avx2` the AVX2 kernels on an AVX-512 CPU
    /// (for comparing the two).
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::available().pop().unwrap_or(Isa::Scalar);
            match std::env::var("LOUPE_KERNELS").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") if best != Isa::Scalar => Isa::Avx2,
                _ => best,
            }
        })
    }

    /// Every instruction set this CPU can run, for tests that check each path against the reference.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if has_avx2() {
            v.push(Isa::Avx2);
            if has_avx512() {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Whether this path may run AVX2 kernels (every x86 SIMD path can).
    pub fn avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }
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

/// Small AVX helpers shared by the kernels' AVX2 paths.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// The sum of the 4 lanes.
    #[inline(always)]
    pub unsafe fn hsum128(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The sum of the 8 lanes.
    #[inline(always)]
    pub unsafe fn hsum256(v: __m256) -> f32 {
        hsum128(_mm_add_ps(
            _mm256_castps256_ps128(v),
            _mm256_extractf128_ps(v, 1),
        ))
    }

    /// `ln 2` in two parts, a short one exact in f32 and the rest, so `n ln2` loses no bits.
    const LN2_HI: f32 = 355.0 / 512.0;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// Cephes' polynomial for `(e^r - 1 - r) / r^2`, highest degree first.
    const EXP_POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];

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
