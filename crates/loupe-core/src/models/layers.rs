//! The layers every model here is built from: linear, norms, activations, rotary embedding,
//! grouped-query attention. Model files combine these; they do not re-implement them.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::Result;
use crate::kernels::attention::Products;
use crate::load::config::Qwen2VlConfig;
use crate::load::weights::{QMatrix, Weights};

/// A weight matrix `(out, in)`: dense in the compute dtype, or GGML block-quantized (then the product
/// runs with f32 activations: a few rows (decode) in our in-place kernels where the CPU and format
/// have one, and Q4_K with many rows (prefill, vision) too, `kernels::qmatmul`; otherwise candle's
/// runtime-dispatched AVX2 / AVX-512-VNNI / NEON kernels). A quantized matrix of a GGUF file stays
/// in the file mapping.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
    /// f32 weights that a product of many rows may run on the 8-bit tiles (each 256-value block
    /// quantized per call, `kernels::qmatmul::matmul_f32_8bit`), where the policy allows it: the
    /// vision merger of a quantized tower. Elsewhere (few rows, no VNNI) as [`Matrix::Dense`].
    Dense8(Tensor),
}

impl Matrix {
    /// Quantizes an f32 `(out, in)` matrix.
    pub fn quantize(t: &Tensor, q: GgmlDType) -> Result<Self> {
        let qt = QTensor::quantize(&t.to_dtype(DType::F32)?, q)?;
        Ok(Matrix::Quantized(Arc::new(QMatrix::from_qtensor(qt)?)))
    }

    /// Loads `name` as `(out, in)`: as stored when the file holds it quantized (a GGUF file, left
    /// in its mapping), else quantized at load as the weights' policy says, else dense.
    pub fn load(w: &Weights, name: &str, out_dim: usize, in_dim: usize) -> Result<Self> {
        if let Some(q) = w.get_quantized(name, &[out_dim, in_dim])? {
            return Ok(Matrix::Quantized(Arc::new(q)));
        }
        match w.quant_for(name, in_dim) {
            Some(q) => Self::quantize(&w.get_as(name, &[out_dim, in_dim], DType::F32)?, q),
            None => Ok(Matrix::Dense(w.get(name, &[out_dim, in_dim])?)),
        }
    }

    /// Loads the fused `(sum(parts), in)` matrix `name` as one matrix per part of rows, in order
    /// (Phi-3's `qkv_proj` and `gate_up_proj`). A GGUF matrix's parts stay in the file mapping (rows
    /// of blocks are whole); a dense one is read once and cut.
    pub fn load_parts(
        w: &Weights,
        name: &str,
        parts: &[usize],
        in_dim: usize,
    ) -> Result<Vec<Self>> {
        let total: usize = parts.iter().sum();
        let starts = parts.iter().scan(0, |at, n| {
            let s = *at;
            *at += n;
            Some(s)
        });
        if let Some(q) = w.get_quantized(name, &[total, in_dim])? {
            return starts
                .zip(parts)
                .map(|(s, &n)| Ok(Matrix::Quantized(Arc::new(q.row_range(s, n)?))))
                .collect();
        }
        let quant = w.quant_for(name, in_dim);
        let whole = match quant {
            Some(_) => w.get_as(name, &[total, in_dim], DType::F32)?,
            None => w.get(name, &[total, in_dim])?,
        };
        starts
            .zip(parts)
            .map(|(s, &n)| {
                let part = whole.narrow(0, s, n)?;
                match quant {
                    // Values of its own: candle quantizes a tensor's whole storage, not its view
                    // (and `copy` keeps the whole storage too).
                    Some(q) => {
                        let values = part.flatten_all()?.to_vec1::<f32>()?;
                        Self::quantize(&Tensor::from_vec(values, (n, in_dim), whole.device())?, q)
                    }
                    None => Ok(Matrix::Dense(part.contiguous()?)),
                }
            })
            .collect()
    }

    /// `x W^T` for 2D `x`.
    fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(mut y) = product_in_place(&[(self, None)], x, After::default())? {
            return Ok(y.remove(0));
        }
        Ok(match self {
            Matrix::Dense(w) | Matrix::Dense8(w) => x.matmul(&w.t()?)?,
            Matrix::Quantized(q) => {
                let xf = x.to_dtype(DType::F32)?;
                let y = match q.candle()? {
                    // candle 0.11's x86 kernels for many rows cover Q4_K and Q6_K; Q8_0, Q4_0 and Q5_K
                    // fall back to a plain dot-product loop (~29 GFLOP/s on 2 AVX2 cores against 180 for
                    // f32 gemm), so for prefill and vision we expand the blocks to f32 per call instead.
                    // So does every product on an ARM core where candle's would stop the process.
                    QMatMul::QTensor(t)
                        if !crate::kernels::candle_quantized_products_run()
                            || xf.dim(0)? >= DEQUANT_MIN_ROWS && !fast_batched(t.dtype()) =>
                    {
                        xf.matmul(&t.dequantize(x.device())?.t()?)?
                    }
                    candle => candle.forward(&xf)?,
                };
                y.to_dtype(x.dtype())?
            }
        })
    }

    /// Rows of the matrix (embedding lookup), in f32 when quantized.
    fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Matrix::Dense(w) | Matrix::Dense8(w) => w.index_select(ids, 0)?,
            Matrix::Quantized(q) => q.rows_f32(ids)?,
        })
    }
}

/// Activation rows up to which a quantized product runs in our matrix-vector kernels (decode; the
/// weights are read once for all rows, so a few rows cost little more than one).
const MATVEC_MAX_ROWS: usize = 4;

/// What a product in our kernels applies to its outputs after its bias, as it stores them: a
/// sigmoid-gated activation (`Activation::gate_alpha`), then a residual of the output's shape.
#[derive(Debug, Clone, Copy, Default)]
struct After<'a> {
    gate_alpha: Option<f32>,
    residual: Option<&'a Tensor>,
}

/// `after(x W^T (+ b))` for every matrix and bias of `ms` (all `(out_i, in)`) in our kernels, or
/// `None` (then candle computes them). Needs a CPU with our SIMD path and every matrix block-quantized
/// in a format the kernels read: at most [`MATVEC_MAX_ROWS`] rows of `x` go to the matrix-vector
/// kernel (Q4_K, Q6_K; `x` quantized once for all matrices), more rows to the many-row kernel (Q4_K
/// only), which applies bias and `after` while it stores each value. A residual needs one matrix.
fn product_in_place(
    ms: &[(&Matrix, Option<&Tensor>)],
    x: &Tensor,
    after: After,
) -> Result<Option<Vec<Tensor>>> {
    use crate::kernels::qmatmul::{matmul_q4k, matvec, Format, QRows};
    use crate::kernels::Isa;
    let isa = Isa::detect();
    let (m, k) = x.dims2()?;
    if isa == Isa::Scalar || !x.device().is_cpu() {
        return Ok(None);
    }
    if let [(Matrix::Dense8(w), bias)] = ms {
        return dense_8bit(isa, w, *bias, x, after);
    }
    if m <= MATVEC_MAX_ROWS || crate::kernels::q32::matmul_applies(isa) {
        if let Some(outs) = product_32(isa, ms, x, after)? {
            return Ok(Some(outs));
        }
    }
    // The K-quant kernels have x86 and NEON versions: elsewhere candle's take the product.
    if !(isa.avx2() || isa.neon()) {
        return Ok(None);
    }
    let mut parts = Vec::with_capacity(ms.len());
    for (matrix, _) in ms {
        let Matrix::Quantized(q) = matrix else {
            return Ok(None);
        };
        // Q2_K, Q3_K and Q5_K are candle's where it runs (its SIMD beats our scalar reference); on
        // an ARM core without `sdot` our reference takes the decode rows.
        let format = match Format::of(q.dtype()) {
            Some(f @ Format::Q4K) => f,
            Some(f @ Format::Q6K) if m <= MATVEC_MAX_ROWS => f,
            Some(f) if m <= MATVEC_MAX_ROWS && !crate::kernels::candle_quantized_products_run() => {
                f
            }
            _ => return Ok(None),
        };
        parts.push((format, q.dims(), q.blocks()?));
    }
    let Some(mats) = parts
        .iter()
        .map(|(format, (rows, cols), data)| QRows::new(*format, *rows, *cols, data))
        .collect::<Option<Vec<_>>>()
        .filter(|mats| mats.iter().all(|q| q.cols() == k))
    else {
        return Ok(None);
    };
    check_residual(after, mats.first().map(|q| q.rows()), mats.len(), m)?;
    let biases = bias_values(ms)?;
    let outs = with_f32_values(x, |xv| {
        with_optional_f32_values(after.residual, |residual| {
            let posts = epilogues(&biases, after, residual);
            if m <= MATVEC_MAX_ROWS {
                let mut outs = matvec(isa, &mats, xv, m);
                for ((y, q), post) in outs.iter_mut().zip(&mats).zip(&posts) {
                    post.apply_rows(isa, y, q.rows());
                }
                outs
            } else {
                mats.iter()
                    .zip(&posts)
                    .map(|(q, post)| matmul_q4k(isa, q, xv, m, post))
                    .collect()
            }
        })
    })??;
    let rows: Vec<usize> = mats.iter().map(|q| q.rows()).collect();
    Ok(Some(output_tensors(outs, &rows, x)?))
}

/// A residual is added to the output of one product, of `m` rows of `rows` values: anything else
/// is refused before the kernels index it.
fn check_residual(after: After, rows: Option<usize>, products: usize, m: usize) -> Result<()> {
    match after.residual {
        Some(r) if products != 1 || Some(r.elem_count()) != rows.map(|rows| m * rows) => {
            Err(candle_core::Error::Msg(format!(
                "residual of {} values for a product of {products} matrices of {m} rows",
                r.elem_count()
            ))
            .into())
        }
        _ => Ok(()),
    }
}

/// Each product's epilogue: its own bias, the call's gated activation and residual.
fn epilogues<'a>(
    biases: &'a [Option<Vec<f32>>],
    after: After,
    residual: Option<&'a [f32]>,
) -> Vec<crate::kernels::qmatmul::Epilogue<'a>> {
    biases
        .iter()
        .map(|bias| crate::kernels::qmatmul::Epilogue {
            bias: bias.as_deref(),
            gate_alpha: after.gate_alpha,
            residual,
        })
        .collect()
}

/// Each product's bias as f32 values, if it has one.
fn bias_values(ms: &[(&Matrix, Option<&Tensor>)]) -> Result<Vec<Option<Vec<f32>>>> {
    Ok(ms
        .iter()
        .map(|(_, b)| {
            b.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
                .transpose()
        })
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// The products' outputs (`x`'s rows by each matrix's `rows`) as tensors of `x`'s dtype.
fn output_tensors(outs: Vec<Vec<f32>>, rows: &[usize], x: &Tensor) -> Result<Vec<Tensor>> {
    let m = x.dim(0)?;
    outs.into_iter()
        .zip(rows)
        .map(|(y, &r)| Ok(Tensor::from_vec(y, (m, r), x.device())?.to_dtype(x.dtype())?))
        .collect()
}

/// [`product_in_place`] when every matrix is in a 32-value block format (`kernels::q32`: Q4_0,
/// Q4_1, Q5_0, Q5_1, Q8_0), else `None`: on the tiles where they are preferred, else in the
/// matrix-vector kernel (for at most `MATVEC_MAX_ROWS` rows: the caller's limit).
fn product_32(
    isa: crate::kernels::Isa,
    ms: &[(&Matrix, Option<&Tensor>)],
    x: &Tensor,
    after: After,
) -> Result<Option<Vec<Tensor>>> {
    use crate::kernels::q32::{matmul, matvec, Format32, Q32Rows};
    let (m, k) = x.dims2()?;
    let mut parts = Vec::with_capacity(ms.len());
    for (matrix, _) in ms {
        let Matrix::Quantized(q) = matrix else {
            return Ok(None);
        };
        let Some(format) = Format32::of(q.dtype()) else {
            return Ok(None);
        };
        parts.push((format, q.dims(), q.blocks()?));
    }
    let Some(mats) = parts
        .iter()
        .map(|(format, (rows, cols), data)| Q32Rows::new(*format, *rows, *cols, data))
        .collect::<Option<Vec<_>>>()
        .filter(|mats| mats.iter().all(|q| q.cols() == k))
    else {
        return Ok(None);
    };
    check_residual(after, mats.first().map(|q| q.rows()), mats.len(), m)?;
    let biases = bias_values(ms)?;
    let outs = with_f32_values(x, |xv| {
        with_optional_f32_values(after.residual, |residual| {
            let posts = epilogues(&biases, after, residual);
            if crate::kernels::q32::matmul_preferred(isa, m) {
                return matmul(isa, &mats, xv, m, &posts);
            }
            let mut outs = matvec(isa, &mats, xv, m);
            for ((y, q), post) in outs.iter_mut().zip(&mats).zip(&posts) {
                post.apply_rows(isa, y, q.rows());
            }
            outs
        })
    })??;
    let rows: Vec<usize> = mats.iter().map(|q| q.rows()).collect();
    Ok(Some(output_tensors(outs, &rows, x)?))
}

/// [`product_in_place`] of one [`Matrix::Dense8`]: on the 8-bit tiles where they apply (a VNNI
/// CPU, enough rows, rows of whole 256-value blocks), else `None`.
fn dense_8bit(
    isa: crate::kernels::Isa,
    w: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
    after: After,
) -> Result<Option<Vec<Tensor>>> {
    use crate::kernels::qmatmul::f32_8bit_applies;
    let (m, k) = x.dims2()?;
    let (rows, cols) = w.dims2()?;
    if cols != k || w.dtype() != DType::F32 || !f32_8bit_applies(isa, m, k) {
        return Ok(None);
    }
    // The 8-bit tiles of f32 weights exist on x86 only (`f32_8bit_applies` is false elsewhere).
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (bias, after, rows);
        Ok(None)
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::kernels::qmatmul::Epilogue;
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        let y = with_f32_values(w, |wv| {
            with_f32_values(x, |xv| {
                with_optional_f32_values(after.residual, |residual| {
                    let post = Epilogue {
                        bias: bias.as_deref(),
                        gate_alpha: after.gate_alpha,
                        residual,
                    };
                    crate::kernels::qmatmul::matmul_f32_8bit(isa, wv, rows, xv, m, &post)
                })
            })
        })???;
        let y = Tensor::from_vec(y, (m, rows), x.device())?.to_dtype(x.dtype())?;
        Ok(Some(vec![y]))
    }
}

/// [`with_f32_values`] of a tensor that may be absent.
fn with_optional_f32_values<T>(
    x: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> T,
) -> Result<T> {
    match x {
        Some(x) => with_f32_values(x, |v| f(Some(v))),
        None => Ok(f(None)),
    }
}

/// `f` of `x`'s values as one f32 slice: read in place when `x` is a contiguous f32 CPU tensor (no
/// copy of the activations per product), else from a converted copy.
fn with_f32_values<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(c) = &*storage {
            return Ok(f(
                &c.as_slice::<f32>()?[layout.start_offset()..][..x.elem_count()]
            ));
        }
    }
    Ok(f(&x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?))
}

/// Rows from which a quantized product without a fast many-row kernel runs as dequantize + f32 gemm.
const DEQUANT_MIN_ROWS: usize = 16;

/// Formats with a fast many-row kernel in candle 0.11 on x86 (measured: `docs/quantization.md`).
fn fast_batched(q: GgmlDType) -> bool {
    matches!(q, GgmlDType::Q4K | GgmlDType::Q6K)
}

/// `y = x W^T + b`, with `W` stored `(out, in)` as in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    out_dim: usize,
}

impl Linear {
    /// Loads a projection; whether it is quantized is the weights' policy's decision.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = Matrix::load(w, &format!("{prefix}.weight"), out_dim, in_dim)?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_dim,
        })
    }

    /// The fused projection `prefix` `(sum(parts), in)` as one projection per part of its rows,
    /// in order ([`Matrix::load_parts`]), each with its part of the bias when `bias`.
    pub fn load_parts(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        parts: &[usize],
        bias: bool,
    ) -> Result<Vec<Self>> {
        let total: usize = parts.iter().sum();
        let weights = Matrix::load_parts(w, &format!("{prefix}.weight"), parts, in_dim)?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[total])?)
        } else {
            None
        };
        let mut at = 0;
        weights
            .into_iter()
            .zip(parts)
            .map(|(weight, &n)| {
                let b = bias
                    .as_ref()
                    .map(|b| b.narrow(0, at, n)?.contiguous())
                    .transpose()?;
                at += n;
                Ok(Linear::new(weight, b, n))
            })
            .collect()
    }

    pub fn new(weight: Matrix, bias: Option<Tensor>, out_dim: usize) -> Self {
        Linear {
            weight,
            bias,
            out_dim,
        }
    }

    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        let out_dim = weight.dims()[0];
        Linear {
            weight: Matrix::Dense(weight),
            bias,
            out_dim,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The same projection, its f32 weights allowed to multiply at 8 bits in products of many rows
    /// ([`Matrix::Dense8`]): for the vision merger when the tower's blocks are quantized
    /// ([`load_merger_mlp`]). Quantized or non-f32 weights are left as they are.
    fn allow_8bit(self) -> Self {
        let weight = match self.weight {
            Matrix::Dense(w) if w.dtype() == DType::F32 => Matrix::Dense8(w),
            other => other,
        };
        Linear { weight, ..self }
    }

    /// Whether the weight is block-quantized (its products are approximate already).
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Matrix::Quantized(_))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_many(&[self], x)?.remove(0))
    }

    /// `act(x W^T + b) + residual` (`residual` of the output's shape): in our many-row kernel, the
    /// activation (when sigmoid-gated) and the residual are applied as each value is stored, so the
    /// output is written once; elsewhere, one step after the other with the same operations.
    pub fn forward_then(
        &self,
        x: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let gate_alpha = act.and_then(Activation::gate_alpha);
        if act.is_none() || gate_alpha.is_some() {
            let (x2, dims) = Self::rows_of(x)?;
            let after = After {
                gate_alpha,
                residual,
            };
            let ms = [(&self.weight, self.bias.as_ref())];
            if let Some(mut ys) = product_in_place(&ms, &x2, after)? {
                return self.shape_out(ys.remove(0), &dims);
            }
        }
        let mut y = self.forward(x)?;
        if let Some(act) = act {
            y = act.forward(&y)?;
        }
        if let Some(r) = residual {
            y = (y + r)?;
        }
        Ok(y)
    }

    /// The forward of several projections of the same input (q/k/v, gate/up): in our kernels when
    /// all of them can be (at decode, one quantization of `x` and one parallel region for all).
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let (x2, dims) = Self::rows_of(x)?;
        let weights: Vec<_> = layers
            .iter()
            .map(|l| (&l.weight, l.bias.as_ref()))
            .collect();
        match product_in_place(&weights, &x2, After::default())? {
            Some(ys) => layers
                .iter()
                .zip(ys)
                .map(|(l, y)| l.shape_out(y, &dims))
                .collect(),
            None => layers
                .iter()
                .map(|l| {
                    let mut y = l.weight.matmul_t(&x2)?;
                    if let Some(b) = &l.bias {
                        y = y.broadcast_add(b)?;
                    }
                    l.shape_out(y, &dims)
                })
                .collect(),
        }
    }

    /// `x` as a 2D `(rows, in)` matrix, with its original dims.
    fn rows_of(x: &Tensor) -> Result<(Tensor, Vec<usize>)> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        Ok((x.reshape((rows, in_dim))?, dims))
    }

    /// `y` with the input's leading dims.
    fn shape_out(&self, y: Tensor, dims: &[usize]) -> Result<Tensor> {
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// Token embeddings, possibly sharing a quantized matrix with a tied `lm_head`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Matrix,
    dtype: DType,
}

impl Embedding {
    pub fn new(table: Matrix, dtype: DType) -> Self {
        Embedding { table, dtype }
    }

    /// `(n, hidden)` rows for `ids`, in the compute dtype.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.table.rows(ids)?.to_dtype(self.dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            eps: eps as f32,
        })
    }

    /// A zero-centred RMSNorm (Qwen3.5, Gemma): the stored weight is `w` and the scale `1 + w`,
    /// formed once here in f32.
    pub fn load_zero_centred(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        let stored = w.get_as(&format!("{prefix}.weight"), &[dim], DType::F32)?;
        Ok(RmsNorm {
            weight: (stored + 1.0)?.to_dtype(w.dtype())?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = norm_in_place(x, &self.weight, None, self.eps)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = norm_in_place(x, &self.weight, Some(&self.bias), self.eps)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// Layer norm (with `bias`) or RMSNorm over the last dim of an f32 CPU tensor in our kernel
/// (`kernels::norm`: on candle's pool, not rayon's), or `None` where it does not run (then candle's).
fn norm_in_place(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f32,
) -> Result<Option<Tensor>> {
    use crate::kernels::norm::{norm_rows, Norm};
    use crate::kernels::Isa;
    let isa = Isa::detect();
    let dim = weight.elem_count();
    let fits = x.dims().last() == Some(&dim) && bias.is_none_or(|b| b.elem_count() == dim);
    // x86 and NEON versions: elsewhere (and on the scalar path) candle's norm.
    if !(isa.avx2() || isa.neon()) || !fits || x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut out = vec![0f32; x.elem_count()];
    with_f32_values(&x, |xv| {
        with_f32_values(weight, |weight| {
            with_optional_f32_values(bias, |bias| {
                let norm = match bias {
                    Some(bias) => Norm::Layer { weight, bias },
                    None => Norm::Rms { weight },
                };
                norm_rows(isa, xv, norm, eps, &mut out)
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
}

/// Activations by their transformers name (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" => Activation::GeluTanh,
            _ => return None,
        })
    }

    /// The activation a config field names (`field` says which, for the error).
    pub fn from_config(name: &str, field: &str) -> Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            crate::error::Error::InvalidInput(format!(
                "config.json: {field} `{name}` is not a supported activation"
            ))
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.gated_in_one_pass(x, None)? {
            return Ok(y);
        }
        Ok(match self {
            Activation::Silu => x.silu()?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
        })
    }

    /// `act(x) * up`.
    pub fn forward_times(self, x: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self.gated_in_one_pass(x, Some(up))? {
            Some(y) => Ok(y),
            None => Ok((self.forward(x)? * up)?),
        }
    }

    /// `alpha` when the activation is `x * sigmoid(alpha x)` (SiLU, quick GELU): the ones our
    /// kernels run (in one pass, or in a product's epilogue).
    pub fn gate_alpha(self) -> Option<f32> {
        match self {
            Activation::Silu => Some(1.0),
            Activation::QuickGelu => Some(1.702),
            Activation::Gelu | Activation::GeluTanh => None,
        }
    }

    /// SiLU and quick GELU (`x * sigmoid(alpha x)`), times `up` when given, in our one-pass kernel
    /// when the operands are f32 on the CPU and the CPU has our SIMD path; else `None`.
    fn gated_in_one_pass(self, x: &Tensor, up: Option<&Tensor>) -> Result<Option<Tensor>> {
        use crate::kernels::{activation::sigmoid_gated, Isa};
        let Some(alpha) = self.gate_alpha() else {
            return Ok(None);
        };
        let isa = Isa::detect();
        let fits = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        let simd = isa.avx2() || isa.neon();
        if !simd || !fits(x) || up.is_some_and(|u| !fits(u) || u.dims() != x.dims()) {
            return Ok(None);
        }
        let mut out = vec![0f32; x.elem_count()];
        with_f32_values(x, |xv| match up {
            Some(u) => with_f32_values(u, |uv| sigmoid_gated(isa, xv, alpha, Some(uv), &mut out)),
            None => {
                sigmoid_gated(isa, xv, alpha, None, &mut out);
                Ok(())
            }
        })??;
        Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl GatedMlp {
    /// `gate_proj`, `up_proj`, `down_proj` under `prefix`, with biases when `bias`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        hidden: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        Ok(GatedMlp {
            gate: Linear::load(w, &format!("{prefix}.gate_proj"), dim, hidden, bias)?,
            up: Linear::load(w, &format!("{prefix}.up_proj"), dim, hidden, bias)?,
            down: Linear::load(w, &format!("{prefix}.down_proj"), hidden, dim, bias)?,
            act,
        })
    }

    /// From its three projections.
    pub fn from_parts(gate: Linear, up: Linear, down: Linear, act: Activation) -> Self {
        GatedMlp {
            gate,
            up,
            down,
            act,
        }
    }

    /// Phi-3's MLP: `gate_up_proj` holds the gate's rows, then the up projection's.
    pub fn load_fused(
        w: &Weights,
        prefix: &str,
        dim: usize,
        hidden: usize,
        act: Activation,
        bias: bool,
    ) -> Result<Self> {
        let [gate, up]: [Linear; 2] = Linear::load_parts(
            w,
            &format!("{prefix}.gate_up_proj"),
            dim,
            &[hidden, hidden],
            bias,
        )?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("gate_up_proj: two parts expected".into()))?;
        Ok(GatedMlp {
            gate,
            up,
            down: Linear::load(w, &format!("{prefix}.down_proj"), hidden, dim, bias)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_then(x, None)
    }

    /// `residual + forward(x)`, the residual added as `down` stores its output.
    pub fn forward_then(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] = Linear::forward_many(&[&self.gate, &self.up], x)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate/up: two outputs expected".into()))?;
        self.down
            .forward_then(&self.act.forward_times(&g, &u)?, None, residual)
    }
}

/// Inverse frequencies `1 / base^(2i/dim)`, computed in f32 as transformers does.
pub fn inv_freq(dim: usize, base: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// cos and sin tables `(rows, cols)` from per-row, per-column angles.
pub fn cos_sin(
    angles: &[f32],
    rows: usize,
    cols: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    Ok((
        Tensor::from_vec(cos, (rows, cols), dev)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (rows, cols), dev)?.to_dtype(dtype)?,
    ))
}

/// Rotary embedding in the rotate-half convention. `x`: `(b, heads, seq, head_dim)`; cos/sin:
/// `(seq, rotary_dim / 2)` (both halves of the turned part share a frequency). Where `rotary_dim`
/// is less than the head (partial rotary: Qwen3.5, Phi-4-mini), the first `rotary_dim` values of
/// each head turn and the rest pass as they are.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (hd, rot) = (x.dim(3)?, 2 * cos.dim(1)?);
    if rot >= hd {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let turned = candle_nn::rotary_emb::rope(&x.narrow(3, 0, rot)?.contiguous()?, cos, sin)?;
    Ok(Tensor::cat(&[&turned, &x.narrow(3, rot, hd - rot)?], 3)?)
}

/// Scaled dot-product attention with grouped KV heads, without copying K/V per query head.
/// `q`: `(b, heads, sq, d)`; `k`, `v`: `(b, kv_heads, sk, d)`. With `causal`, query `i` sees keys
/// `0..=sk - sq + i` (the queries are the last `sq` positions). Long query runs are processed in blocks
/// so the score matrix never exceeds [`ATTENTION_BLOCK_BYTES`] (vision attention over thousands of
/// patches would otherwise materialise gigabytes).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if causal {
        if let Some(out) = decode_attention_in_place(q, k, v, scale)? {
            return Ok(out);
        }
    }
    general_attention(q, k, v, scale, causal, None)
}

/// Causal attention of the last `sq` positions over `sk` keys ([`attention`]) where each position
/// sees only the last `window` keys, its own included (Gemma 3's sliding layers). A window that
/// hides nothing is dropped, and a single query (decode) reads only its window's keys, so both
/// stay on the fast paths.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (sq, sk) = (q.dim(2)?, k.dim(2)?);
    // The last query sees keys past `sk - 1 - window`: none is hidden while `sk <= window`.
    match window.filter(|&w| sk > w) {
        None => attention(q, k, v, scale, true),
        Some(w) if sq == 1 => attention(
            q,
            &k.narrow(2, sk - w, w)?,
            &v.narrow(2, sk - w, w)?,
            scale,
            true,
        ),
        window => general_attention(q, k, v, scale, true, window),
    }
}

/// The blocked path of [`attention`], with an optional sliding window.
fn general_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    window: Option<usize>,
) -> Result<Tensor> {
    // A cache kept in a narrower type than the queries (f16 under a quantized decoder) is widened
    // for the general path.
    let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
    let (b, h, _, _) = q.dims4()?;
    let sk = k.dim(2)?;
    let rows = (ATTENTION_BLOCK_BYTES / (4 * b * h * sk).max(1)).max(16);
    attention_in_blocks(q, k, v, scale, causal, rows, window)
}

/// Causal attention of a few f32 query rows (decode) in our kernel, reading K and V (f32 or f16)
/// where they lie in the cache; `None` when the operands do not fit it (then the general path runs).
fn decode_attention_in_place(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    use crate::kernels::attention::{decode_attention, Shape};
    use crate::kernels::Isa;
    let isa = Isa::detect();
    let (b, h, sq, d) = q.dims4()?;
    let (_, kvh, sk, _) = k.dims4()?;
    let kv_dtype = k.dtype();
    let fits = q.dtype() == DType::F32
        && matches!(kv_dtype, DType::F32 | DType::F16)
        && v.dtype() == kv_dtype
        && [q, k, v].iter().all(|t| t.device().is_cpu());
    if !(isa.avx2() || isa.neon()) || b != 1 || sq > MATVEC_MAX_ROWS || sq > sk || !fits {
        return Ok(None);
    }
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
        return Ok(None);
    };
    let stride = kl.stride();
    if stride != vl.stride() || stride[3] != 1 || kvh == 0 || h % kvh != 0 {
        return Ok(None);
    }
    let shape = Shape {
        heads: h,
        kv_heads: kvh,
        rows: sq,
        dim: d,
        keys: sk,
        head_stride: stride[1],
        row_stride: stride[2],
    };
    let qv = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let (ko, vo) = (kl.start_offset(), vl.start_offset());
    let out = if kv_dtype == DType::F16 {
        let (kd, vd) = (
            &kc.as_slice::<half::f16>()?[ko..],
            &vc.as_slice::<half::f16>()?[vo..],
        );
        decode_attention(isa, &qv, kd, vd, shape, scale as f32)
    } else {
        let (kd, vd) = (&kc.as_slice::<f32>()?[ko..], &vc.as_slice::<f32>()?[vo..]);
        decode_attention(isa, &qv, kd, vd, shape, scale as f32)
    };
    Ok(Some(Tensor::from_vec(out, (b, h, sq, d), q.device())?))
}

/// [`attention`] with an explicit number of query rows per block.
pub fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    rows: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let sq = q.dim(2)?;
    let sk = k.dim(2)?;
    if sq <= rows {
        return attention_block(q, k, v, scale, causal.then_some(sk - sq), window);
    }
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(sq.div_ceil(rows));
    for start in (0..sq).step_by(rows) {
        let len = rows.min(sq - start);
        let offset = causal.then_some(sk - sq + start);
        outs.push(attention_block(
            &q.narrow(2, start, len)?,
            k,
            &v,
            scale,
            offset,
            window,
        )?);
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// Most bytes of f32 scores one attention block holds.
pub const ATTENTION_BLOCK_BYTES: usize = 32 << 20;

/// One block of queries; with `causal_offset = Some(o)`, query `i` sees keys `0..=o + i` (the
/// last `window` of them where a window is given).
fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal_offset: Option<usize>,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, h, sq, d) = q.dims4()?;
    let (_, kvh, sk, _) = k.dims4()?;
    let groups = h / kvh;
    let q = q.contiguous()?.reshape((b, kvh, groups * sq, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let window = window.unwrap_or(usize::MAX);
    let scores = match causal_offset {
        Some(offset) if offset + 1 < sk || window < sk => {
            let mask: Vec<f32> = (0..sq)
                .flat_map(|i| {
                    (0..sk).map(move |j| {
                        let p = offset + i;
                        if j <= p && p - j < window {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (sq, sk), q.device())?;
            scores
                .reshape((b, kvh, groups, sq, sk))?
                .broadcast_add(&mask)?
                .reshape((b, kvh, groups * sq, sk))?
        }
        _ => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?.reshape((b, h, sq, d))?)
}

/// The output matrix: `lm_head.weight`, or the embedding table when the embeddings are tied (an untied
/// checkpoint must ship `lm_head`; a tied one may ship it anyway, and then it is used).
pub fn load_lm_head(
    w: &Weights,
    embed: &Matrix,
    vocab: usize,
    dim: usize,
    tied: bool,
) -> Result<Linear> {
    let weight = if w.contains("lm_head.weight") || !tied {
        Matrix::load(w, "lm_head.weight", vocab, dim)?
    } else {
        embed.clone()
    };
    Ok(Linear::new(weight, None, vocab))
}

/// cos/sin `(seq, inv_freq.len())` for multimodal positions `[temporal, height, width]`: frequency `j`
/// turns with one of the three, in three blocks of `sections` (Qwen2-VL, Qwen2.5-VL) or interleaved
/// t, h, w, t, h, w, ... while the height and width streams have frequencies left (Qwen3-VL, Qwen3.5).
pub fn mrope_cos_sin(
    positions: &[[i64; 3]],
    inv_freq: &[f32],
    sections: &[usize],
    interleaved: bool,
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let stream_of: Vec<usize> = (0..inv_freq.len())
        .map(|j| {
            if interleaved {
                match j % 3 {
                    1 if j < 3 * sections[1] => 1,
                    2 if j < 3 * sections[2] => 2,
                    _ => 0,
                }
            } else if j < sections[0] {
                0
            } else if j < sections[0] + sections[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let angles: Vec<f32> = positions
        .iter()
        .flat_map(|p| {
            inv_freq
                .iter()
                .zip(&stream_of)
                .map(move |(f, &s)| p[s] as f32 * f)
        })
        .collect();
    cos_sin(&angles, positions.len(), inv_freq.len(), dtype, dev)
}

/// The vision merger's two projections (`visual.merger.mlp.0` and `.2`, `m2` wide in, `out` out of
/// the second). In a tower whose blocks are quantized they may multiply at 8 bits (the policy in
/// `docs/quantization.md`).
pub fn load_merger_mlp(
    w: &Weights,
    m2: usize,
    out: usize,
    tower_quantized: bool,
) -> Result<(Linear, Linear)> {
    let policy = |l: Linear| if tower_quantized { l.allow_8bit() } else { l };
    Ok((
        policy(Linear::load(w, "visual.merger.mlp.0", m2, m2, true)?),
        policy(Linear::load(w, "visual.merger.mlp.2", m2, out, true)?),
    ))
}

/// A ViT's patch embedding (`visual.patch_embed.proj`): a Conv3d whose stride is its kernel, so a
/// matrix product with the kernel flattened to `(width, patch values)`; Qwen3-VL and Qwen3.5 add a bias.
pub fn load_patch_embed(cfg: &Qwen2VlConfig, w: &Weights, bias: bool) -> Result<Linear> {
    let v = &cfg.vision;
    let e = v.embed_dim;
    let conv = w.get(
        "visual.patch_embed.proj.weight",
        &[
            e,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    )?;
    let bias = if bias {
        Some(w.get("visual.patch_embed.proj.bias", &[e])?)
    } else {
        None
    };
    Ok(Linear::from_weight(
        conv.reshape((e, cfg.patch_values()))?,
        bias,
    ))
}

/// Patches of each image frame, in order: the runs that whole-image vision attention stays within.
pub fn frame_lengths(grids: &[[usize; 3]]) -> Vec<usize> {
    grids
        .iter()
        .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t))
        .collect()
}

/// Every patch's `[row, col, rows, cols]`: its place on its image's patch grid and that grid's size,
/// in the preprocessor's merge-block order, frame after frame.
pub fn patch_positions(grids: &[[usize; 3]], merge: usize) -> Vec<[usize; 4]> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            out.push([bh * merge + mh, bw * merge + mw, h, w]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// cos/sin `(patches, head_dim / 2)` of a ViT's 2D rotary embedding (Qwen2-VL, Qwen2.5-VL): the first
/// half of the frequencies turn with the patch row, the second with its column; patches are in
/// merge-block order, as the preprocessor lays them out.
pub fn vision_rotary(
    inv_freq: &[f32],
    merge: usize,
    grids: &[[usize; 3]],
    dtype: DType,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let patches = patch_positions(grids, merge);
    let mut angles = Vec::with_capacity(patches.len() * 2 * inv_freq.len());
    for &[y, x, _, _] in &patches {
        angles.extend(inv_freq.iter().map(|f| y as f32 * f));
        angles.extend(inv_freq.iter().map(|f| x as f32 * f));
    }
    cos_sin(&angles, patches.len(), 2 * inv_freq.len(), dtype, dev)
}

/// A ViT block's self-attention over `h` `(patches, dim)`: fused `qkv` projection, 2D rotary, attention
/// within each run of `segments` (consecutive patch counts: one per image frame, or per window), `proj`;
/// returned added to `residual` (the block's input), which the projection adds as it stores.
#[allow(clippy::too_many_arguments)]
pub fn vision_attention(
    h: &Tensor,
    qkv: &Linear,
    proj: &Linear,
    heads: usize,
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
    segments: &[usize],
    residual: &Tensor,
) -> Result<Tensor> {
    let proj = |attn: &Tensor| proj.forward_then(attn, None, Some(residual));
    let n = h.dim(0)?;
    // With quantized projections, q, k and v already carry errors far above the roundings of
    // `kernels::attention_int`, so the attention products may run on its integer operands.
    let products = if qkv.is_quantized() {
        Products::Int
    } else {
        Products::F32
    };
    let qkv = qkv.forward(h)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if products == Products::Int {
        let rope = (cos, sin);
        if let Some(attn) = fused_int_attention(&qkv, rope, heads, head_dim, segments, scale)? {
            return proj(&attn);
        }
    }
    let qkv = qkv
        .reshape((n, 3, heads, head_dim))?
        .permute((1, 2, 0, 3))?; // (3, heads, n, d)
    let q = rope(&qkv.get(0)?.unsqueeze(0)?, cos, sin)?;
    let k = rope(&qkv.get(1)?.unsqueeze(0)?, cos, sin)?;
    let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
    if let Some(attn) = segment_attention_in_place(&q, &k, &v, scale, segments, products)? {
        return proj(&attn);
    }
    let mut outs = Vec::with_capacity(segments.len());
    let mut start = 0;
    for &len in segments {
        outs.push(attention(
            &q.narrow(2, start, len)?,
            &k.narrow(2, start, len)?,
            &v.narrow(2, start, len)?,
            scale,
            false,
        )?);
        start += len;
    }
    let attn = Tensor::cat(&outs, 2)?
        .squeeze(0)?
        .transpose(0, 1)?
        .reshape((n, heads * head_dim))?;
    proj(&attn)
}

/// Attention within `segments` straight from the fused projection's `(n, 3 * heads * dim)` f32
/// output, rotary applied while the integer kernel packs its operands (no copies for the heads' layout
/// or the rotary), returned as `(n, heads * dim)`; `None` where that kernel cannot run.
fn fused_int_attention(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    dim: usize,
    segments: &[usize],
    scale: f64,
) -> Result<Option<Tensor>> {
    use crate::kernels::attention_int::{available, segment_attention, Layout};
    use crate::kernels::Isa;
    let isa = Isa::detect();
    let n = qkv.dim(0)?;
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let fits = available(isa)
        && dim.is_multiple_of(2)
        && segments.iter().sum::<usize>() == n
        && qkv.dims() == [n, 3 * heads * dim]
        && [cos, sin].iter().all(|t| t.dims() == [n, dim / 2])
        && [qkv, cos, sin].into_iter().all(f32_cpu);
    if !fits {
        return Ok(None);
    }
    let out = with_f32_values(qkv, |qkv| {
        with_f32_values(cos, |cos| {
            with_f32_values(sin, |sin| {
                let src = Layout::Fused { qkv, cos, sin };
                segment_attention(isa, src, heads, dim, segments, scale as f32)
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(out, (n, heads * dim), qkv.device())?))
}

/// Attention within `segments` of `(1, heads, n, dim)` f32 operands in our kernel, returned as
/// `(n, heads * dim)`; `None` when they do not fit it (then the general path runs).
fn segment_attention_in_place(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    segments: &[usize],
    products: Products,
) -> Result<Option<Tensor>> {
    use crate::kernels::attention::segment_attention;
    use crate::kernels::Isa;
    let isa = Isa::detect();
    let (b, heads, n, dim) = q.dims4()?;
    let fits = (isa.avx2() || isa.neon())
        && b == 1
        && segments.iter().sum::<usize>() == n
        && [q, k, v].iter().all(|t| {
            t.dtype() == DType::F32
                && t.device().is_cpu()
                && t.dims4().ok() == Some((b, heads, n, dim))
        });
    if !fits {
        return Ok(None);
    }
    let out = with_f32_values(q, |q| {
        with_f32_values(k, |k| {
            with_f32_values(v, |v| {
                let scale = scale as f32;
                segment_attention(isa, q, k, v, heads, dim, segments, scale, products)
            })
        })
    })???;
    Ok(Some(Tensor::from_vec(out, (n, heads * dim), q.device())?))
}

/// Named intermediates of a forward pass (llama.cpp's `cb(cur, name, il)`), captured on request for
/// parity tests and debugging. Costs one branch per name when nothing is captured.
/// Names asked for, and the tensors captured so far.
type Capture = (Vec<String>, Vec<(String, Tensor)>);

#[derive(Default)]
pub struct Taps {
    wanted: std::sync::Mutex<Option<Capture>>,
}

impl Taps {
    /// Starts capturing the given names (`"vision.merger"`, `"text.attn_out.3"`, ...); `"*"` captures all.
    pub fn capture(&self, names: &[&str]) {
        if let Ok(mut g) = self.wanted.lock() {
            *g = Some((names.iter().map(|s| s.to_string()).collect(), Vec::new()));
        }
    }

    /// Stops capturing and returns what was captured, in order.
    pub fn take(&self) -> Vec<(String, Tensor)> {
        self.wanted
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .map(|(_, got)| got)
            .unwrap_or_default()
    }

    pub fn record(&self, name: &str, layer: Option<usize>, t: &Tensor) {
        if let Ok(mut g) = self.wanted.lock() {
            if let Some((wanted, got)) = g.as_mut() {
                let full = match layer {
                    Some(l) => format!("{name}.{l}"),
                    None => name.to_owned(),
                };
                if wanted.iter().any(|w| w == "*" || *w == full || *w == name) {
                    got.push((full, t.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block format a GGUF file brings, through whichever path this CPU takes (ours, candle's,
    /// or the blocks expanded to f32; on an ARM core without `sdot` never candle's, which would stop
    /// the process): the product at decode (1 row), small-batch (7) and prefill (20) sizes against
    /// the f32 product on the dequantized weights (the scalar reference): equal where the blocks are
    /// expanded, within what 8-bit activations cost elsewhere. CI runs it at each ARM CPU level.
    #[test]
    fn products_of_every_format_match_their_dequantized_weights() {
        let dev = Device::Cpu;
        let (k, n) = (512, 24);
        let v: Vec<f32> = (0..n * k)
            .map(|i| (i as f32 * 0.5173).sin() * 0.08)
            .collect();
        let weights = Tensor::from_vec(v, (n, k), &dev).unwrap();
        for q in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q5K,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let m = Matrix::quantize(&weights, q).unwrap();
            let Matrix::Quantized(qm) = &m else {
                unreachable!()
            };
            let deq = match qm.candle().unwrap() {
                QMatMul::QTensor(t) => t.dequantize(&dev).unwrap(),
                _ => unreachable!(),
            };
            let layer = Linear::new(m.clone(), None, n);
            for rows in [1, 7, 20] {
                let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.291).cos()).collect();
                let x = Tensor::from_vec(x, (1, rows, k), &dev).unwrap();
                let got = layer.forward(&x).unwrap().flatten_all().unwrap();
                let want = x
                    .reshape((rows, k))
                    .unwrap()
                    .matmul(&deq.t().unwrap())
                    .unwrap();
                let (got, want) = (
                    got.to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let scale = want.iter().fold(0f32, |a, w| a.max(w.abs()));
                let worst = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                assert!(scale > 0.1, "{q:?}: a product of zeros proves nothing");
                // Many rows expand the blocks to f32 (the reference's own product) unless the
                // 32-value tiles take them (x86). Elsewhere the products multiply 8-bit
                // activations (measured up to 1.6% of the range, Q8_0 at 7 rows).
                let tiled = crate::kernels::q32::Format32::of(q).is_some()
                    && crate::kernels::q32::matmul_applies(crate::kernels::Isa::detect());
                let expanded = rows >= DEQUANT_MIN_ROWS && !fast_batched(q) && !tiled;
                let bound = if expanded { 1e-5 } else { 0.02 };
                assert!(
                    worst <= bound * scale,
                    "{q:?}, {rows} rows: off by {worst} (range {scale})"
                );
            }
        }
    }

    /// Quantized projections run in our in-place kernels (when the CPU has a SIMD path) and agree
    /// with candle's product on the same blocks; a fused q/k/v-style call equals the separate calls,
    /// bias included; many rows of Q6_K still go to candle.
    #[test]
    fn quantized_decode_projections_match_candle() {
        let dev = Device::Cpu;
        let (k, n1, n2) = (512, 48, 32);
        let w = |rows: usize, seed: f32| {
            let v: Vec<f32> = (0..rows * k)
                .map(|i| (i as f32 * 0.7131 + seed).sin() * 0.05)
                .collect();
            Tensor::from_vec(v, (rows, k), &dev).unwrap()
        };
        let a = Linear::new(
            Matrix::quantize(&w(n1, 0.3), GgmlDType::Q4K).unwrap(),
            None,
            n1,
        );
        let bias = Tensor::arange(0f32, n2 as f32, &dev).unwrap();
        let b = Linear::new(
            Matrix::quantize(&w(n2, 1.1), GgmlDType::Q6K).unwrap(),
            Some(bias),
            n2,
        );
        for rows in [1, 3, 9] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i as f32 * 0.37).cos()).collect();
            let x = Tensor::from_vec(x, (1, rows, k), &dev).unwrap();
            let ours = Linear::forward_many(&[&a, &b], &x).unwrap();
            for (layer, got) in [&a, &b].into_iter().zip(&ours) {
                let Matrix::Quantized(q) = &layer.weight else {
                    unreachable!()
                };
                // candle's product where it runs; else the dequantized weights' (a looser check).
                let x2 = x.reshape((rows, k)).unwrap();
                let (mut want, tolerance) = match q.candle().unwrap() {
                    QMatMul::QTensor(t) if !crate::kernels::candle_quantized_products_run() => (
                        x2.matmul(&t.dequantize(&dev).unwrap().t().unwrap())
                            .unwrap(),
                        0.02,
                    ),
                    candle => (candle.forward(&x2).unwrap(), 1e-4),
                };
                if let Some(bias) = &layer.bias {
                    want = want.broadcast_add(bias).unwrap();
                }
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "{g} vs {w}");
                }
                let alone = layer.forward(&x).unwrap().flatten_all().unwrap();
                assert_eq!(alone.to_vec1::<f32>().unwrap(), got);
            }
        }
        // Q6_K has no many-row kernel of ours: candle multiplies it.
        let wide = Tensor::zeros((MATVEC_MAX_ROWS + 1, k), DType::F32, &dev).unwrap();
        assert!(
            product_in_place(&[(&b.weight, None)], &wide, After::default())
                .unwrap()
                .is_none()
        );
        let isa = crate::kernels::Isa::detect();
        let has_simd = isa.avx2() || isa.neon();
        assert_eq!(
            product_in_place(&[(&a.weight, None)], &wide, After::default())
                .unwrap()
                .is_some(),
            has_simd
        );
    }

    /// Plain attention, one head at a time, as the reference for the blocked and grouped version.
    fn reference_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: (usize, usize, usize, usize, usize),
        causal: bool,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (h, kvh, sq, sk, d) = dims;
        let mut out = vec![0f32; h * sq * d];
        for head in 0..h {
            let kv = head / (h / kvh);
            for i in 0..sq {
                let visible = if causal { sk - sq + i + 1 } else { sk };
                let first = window.map_or(0, |w| visible.saturating_sub(w));
                let qi = &q[(head * sq + i) * d..(head * sq + i + 1) * d];
                let s: Vec<f64> = (first..visible)
                    .map(|j| {
                        let kj = &k[(kv * sk + j) * d..(kv * sk + j + 1) * d];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (n, sj) in s.iter().enumerate() {
                    let j = first + n;
                    let p = (sj - m).exp() / z;
                    for t in 0..d {
                        out[(head * sq + i) * d + t] +=
                            (p * f64::from(v[(kv * sk + j) * d + t])) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocked_grouped_attention_matches_reference() {
        let dev = Device::Cpu;
        // (heads, kv heads, queries, keys, head dim, causal, rows per block): odd sizes on purpose.
        let cases = [
            (4, 2, 13, 13, 8, true, 5),
            (6, 1, 7, 20, 16, true, 3),
            (3, 3, 33, 33, 12, false, 7),
            (2, 1, 1, 9, 4, true, 16),
            (8, 2, 40, 40, 20, false, 40),
        ];
        for (n, &(h, kvh, sq, sk, d, causal, rows)) in cases.iter().enumerate() {
            let r = |len: usize, seed: u64| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
                    .collect()
            };
            let (qv, kv, vv) = (
                r(h * sq * d, 1 + n as u64),
                r(kvh * sk * d, 2),
                r(kvh * sk * d, 3),
            );
            let q = Tensor::from_vec(qv.clone(), (1, h, sq, d), &dev).unwrap();
            let k = Tensor::from_vec(kv.clone(), (1, kvh, sk, d), &dev).unwrap();
            let v = Tensor::from_vec(vv.clone(), (1, kvh, sk, d), &dev).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention_in_blocks(&q, &k, &v, scale, causal, rows, None).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference_attention(&qv, &kv, &vv, (h, kvh, sq, sk, d), causal, None);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "case {n}: max diff {diff}");
        }
    }

    /// Sliding windows (Gemma 3) against the reference: one query (decode, which reads only its
    /// window), a few (the decode kernel's sizes), a whole prompt (blocked), a window as wide as
    /// the keys and one wider (nothing hidden).
    #[test]
    fn windowed_attention_matches_reference() {
        let dev = Device::Cpu;
        let cases = [
            // (heads, kv heads, queries, keys, dim, window)
            (4, 1, 1, 30, 8, Some(7)),
            (2, 2, 3, 12, 8, Some(4)),
            (4, 2, 20, 20, 8, Some(5)),
            (4, 2, 20, 20, 8, Some(1)),
            (2, 1, 6, 6, 4, Some(6)),
            (2, 1, 6, 6, 4, Some(50)),
        ];
        for (n, &(h, kvh, sq, sk, d, window)) in cases.iter().enumerate() {
            let r = |len: usize, seed: u64| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i as u64 * 2654435761 + seed * 89) % 1000) as f32 / 250.0) - 2.0)
                    .collect()
            };
            let (qv, kv, vv) = (
                r(h * sq * d, 5 + n as u64),
                r(kvh * sk * d, 6),
                r(kvh * sk * d, 7),
            );
            let q = Tensor::from_vec(qv.clone(), (1, h, sq, d), &dev).unwrap();
            let k = Tensor::from_vec(kv.clone(), (1, kvh, sk, d), &dev).unwrap();
            let v = Tensor::from_vec(vv.clone(), (1, kvh, sk, d), &dev).unwrap();
            let got = causal_attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), window).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference_attention(&qv, &kv, &vv, (h, kvh, sq, sk, d), true, window);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "case {n}: max diff {diff}");
        }
    }
}
