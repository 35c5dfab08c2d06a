//! Decode-shaped products on block-quantized weights: Loupe's in-place kernels against candle's
//! `QMatMul`, one activation row, the Qwen2-VL-2B decoder's matrix shapes. Each measurement cycles
//! through copies of the matrix that together exceed the CPU caches (about 400 MB), as decode does.
//!
//! `cargo run --release -p loupe-core --example qmatmul_bench [-- many]` (`many`: only the many-row
//! products of the second table; threads: candle's, `RAYON_NUM_THREADS`).
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use loupe_core::kernels::qmatmul::{matmul_q4k, matvec, Format, QRows};
use loupe_core::kernels::Isa;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let isa = Isa::detect();
    println!(
        "isa {isa:?}, threads {}",
        candle_core::utils::get_num_threads()
    );
    let many_only = std::env::args().any(|a| a == "many");
    if !many_only {
        decode_shapes(&dev, isa)?;
    }
    many_rows(&dev, isa)
}

fn decode_shapes(dev: &Device, isa: Isa) -> candle_core::Result<()> {
    println!("| weights | shape | candle ms | Loupe ms | Loupe GB/s | speed-up |");
    println!("|---|---|---|---|---|---|");
    for (dtype, rows, cols) in [
        (GgmlDType::Q4K, 8960, 1536),
        (GgmlDType::Q4K, 1536, 8960),
        (GgmlDType::Q4K, 1536, 1536),
        (GgmlDType::Q6K, 151936, 1536),
    ] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), dev)?;
        let q = QTensor::quantize(&w, dtype)?;
        let bytes = q.data()?.into_owned();
        let copies = (400_000_000 / bytes.len()).max(2);
        let format = if dtype == GgmlDType::Q4K {
            Format::Q4K
        } else {
            Format::Q6K
        };
        let qms: Vec<QMatMul> = (0..copies)
            .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?))
            .collect::<candle_core::Result<_>>()?;
        let all: Vec<Vec<u8>> = (0..copies).map(|_| bytes.clone()).collect();
        let mats: Vec<QRows> = all
            .iter()
            .map(|b| QRows::new(format, rows, cols, b).expect("layout"))
            .collect();
        let x = Tensor::randn(0f32, 1.0, (1, cols), dev)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let reps = 4 * copies;
        let time = |f: &mut dyn FnMut(usize)| {
            (0..copies).for_each(&mut *f);
            let t = Instant::now();
            for i in 0..reps {
                f(i % copies);
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        };
        let c = time(&mut |i| {
            qms[i].forward(&x).unwrap();
        });
        let l = time(&mut |i| {
            matvec(isa, &[mats[i]], &xv, 1);
        });
        println!(
            "| {dtype:?} | {rows}x{cols} | {c:.3} | {l:.3} | {:.1} | {:.2}x |",
            bytes.len() as f64 / l / 1e6,
            c / l
        );
    }
    println!();
    Ok(())
}

fn many_rows(dev: &Device, isa: Isa) -> candle_core::Result<()> {
    println!("| many rows (Q4K) | m x k x n | candle ms | Loupe ms | candle GFLOP/s | Loupe GFLOP/s | speed-up |");
    println!("|---|---|---|---|---|---|---|");
    for (m, k, n) in [
        (512, 1536, 8960),
        (512, 8960, 1536),
        (1024, 1280, 3840),
        (1024, 5120, 1280),
    ] {
        let w = Tensor::randn(0f32, 0.02, (n, k), dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
        let bytes = q.data()?.into_owned();
        let mat = QRows::new(Format::Q4K, n, k, &bytes).expect("layout");
        let qm = QMatMul::from_qtensor(q)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        // The best of 10: on a shared machine the fastest run is the one least disturbed.
        let time = |f: &mut dyn FnMut()| {
            f();
            (0..10)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        let c = time(&mut || {
            qm.forward(&x).unwrap();
        });
        let l = time(&mut || {
            matmul_q4k(isa, &mat, &xv, m, &Default::default());
        });
        let flop = 2.0 * (m * k * n) as f64;
        let qt = time(&mut || {
            for row in xv.chunks_exact(k) {
                std::hint::black_box(loupe_core::kernels::qmatmul::quantize_q8k(row));
            }
        });
        eprintln!("quantize {m}x{k}: {qt:.2} ms");
        println!(
            "| | {m}x{k}x{n} | {c:.1} | {l:.1} | {:.0} | {:.0} | {:.2}x |",
            flop / c / 1e6,
            flop / l / 1e6,
            c / l
        );
    }
    if isa == Isa::Avx512 {
        requantization_error(dev)?;
    }
    Ok(())
}

/// What the 8-bit tiles (VNNI, from `REQUANT_ROWS` activation rows on) add to Q4_K's own error: the
/// relative RMS error against the f32 product of the Q4_K tiles (the AVX2 kernel, exact Q4_K sums)
/// and of the 8-bit tiles, on the tower's qkv shape.
fn requantization_error(dev: &Device) -> candle_core::Result<()> {
    let (m, k, n) = (1024, 1280, 3840);
    let w = Tensor::randn(0f32, 0.02, (n, k), dev)?;
    let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
    let exact = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
    let bytes = q.data()?.into_owned();
    let mat = QRows::new(Format::Q4K, n, k, &bytes).expect("layout");
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let norm = exact
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let error = |got: &[f32]| {
        let d: f64 = got
            .iter()
            .zip(&exact)
            .map(|(g, e)| (*g as f64 - *e as f64).powi(2))
            .sum();
        d.sqrt() / norm
    };
    let q4 = error(&matmul_q4k(Isa::Avx2, &mat, &xv, m, &Default::default()));
    let q8 = error(&matmul_q4k(Isa::Avx512, &mat, &xv, m, &Default::default()));
    println!();
    println!(
        "relative RMS error against f32, {m}x{k}x{n}: Q4_K tiles {q4:.5}, 8-bit tiles {q8:.5}"
    );
    merger_error(dev)
}

/// The 8-bit tiles of f32 weights are x86 only.
#[cfg(not(target_arch = "x86_64"))]
fn merger_error(_dev: &Device) -> candle_core::Result<()> {
    println!("f32 weights on 8-bit tiles: x86 only");
    Ok(())
}

/// The error of f32 weights multiplied on the 8-bit tiles (the vision merger of a quantized tower,
/// `docs/quantization.md`), and the time against candle's f32 product, on the merger's first
/// matrix for a 448² image: 256 rows of 5120 by 5120 x 5120.
#[cfg(target_arch = "x86_64")]
fn merger_error(dev: &Device) -> candle_core::Result<()> {
    use loupe_core::kernels::qmatmul::matmul_f32_8bit;
    let (m, k, n) = (256, 5120, 5120);
    let w = Tensor::randn(0f32, 0.02, (n, k), dev)?;
    let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
    let t = Instant::now();
    let exact = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let f32_ms = t.elapsed().as_secs_f64() * 1e3;
    let (wv, xv) = (
        w.flatten_all()?.to_vec1::<f32>()?,
        x.flatten_all()?.to_vec1::<f32>()?,
    );
    let t = Instant::now();
    let got = matmul_f32_8bit(Isa::Avx512, &wv, n, &xv, m, &Default::default());
    let q8_ms = t.elapsed().as_secs_f64() * 1e3;
    let (mut d, mut e) = (0f64, 0f64);
    for (g, x) in got.iter().zip(&exact) {
        d += (*g as f64 - *x as f64).powi(2);
        e += (*x as f64).powi(2);
    }
    println!(
        "f32 weights on 8-bit tiles, {m}x{k}x{n}: relative RMS error {:.5}, {q8_ms:.1} ms against f32 {f32_ms:.1} ms",
        (d / e).sqrt()
    );
    Ok(())
}
