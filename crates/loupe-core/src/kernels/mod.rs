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
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
            Isa::Scalar
        })
    }

    /// Every instruction set this CPU can run, for tests that check each path against the reference.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            v.push(Isa::Avx2);
        }
        v
    }
}
