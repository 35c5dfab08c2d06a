//! Loupe's own compute kernels, where the profile says candle's leave speed on the table.
//!
//! Every kernel has a scalar reference beside its SIMD versions; the SIMD version is picked at run
//! time from the CPU's features, and a property test compares the two on random odd shapes
//! (`tests` in each file). The models reach the kernels through `models::layers`, never directly.

pub mod attention;
pub mod qmatmul;

/// The instruction set a kernel runs with on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA (+ F16C), x86-64.
    Avx2,
}

impl Isa {
    /// The best instruction set this CPU has that our kernels use (`LOUPE_KERNELS=scalar` forces the
    /// reference, for checking a result).
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("LOUPE_KERNELS").is_ok_and(|v| v == "scalar") {
                return Isa::Scalar;
            }
            if has_avx2() {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    /// Every instruction set this CPU can run, for tests that check each path against the reference.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        if has_avx2() {
            v.push(Isa::Avx2);
        }
        v
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
}
