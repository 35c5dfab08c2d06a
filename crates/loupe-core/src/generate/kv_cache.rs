//! The decoder's cache: keys and values for attention layers (preallocated, grown by doubling, written
//! in place), and for linear-attention layers (Qwen3.5's Gated DeltaNet) their fixed-size state: the
//! last inputs of the causal convolution and the recurrent matrix.
//!
//! Keys and values are kept in the compute dtype, except under a quantized decoder on a CPU: there in
//! f16 ([`cache_dtype`]), half the bytes that decode attention reads per token and that the cache
//! holds, a rounding far below the projections' own (docs/quantization.md has the measured effect).

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// The dtype keys and values are kept in: f16 for a quantized decoder of f32 activations on a CPU
/// (where decode attention reads f16 rows as they lie), else the compute dtype, so that f32 and bf16
/// checkpoints keep their parity with the reference. `LOUPE_KV_CACHE=f32` keeps the compute dtype
/// under quantized weights too (for comparing the two).
pub fn cache_dtype(compute: DType, quantized: bool, device: &Device) -> DType {
    let keep = std::env::var("LOUPE_KV_CACHE").is_ok_and(|v| v == "f32");
    if quantized && !keep && compute == DType::F32 && device.is_cpu() {
        DType::F16
    } else {
        compute
    }
}

#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// What keys and values are stored as; `None`: as they come.
    dtype: Option<DType>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    /// Linear attention: `(conv state, recurrent state)` after `len` tokens. Replaced, never written
    /// in place, so a saved copy stays valid.
    state: Option<(Tensor, Tensor)>,
    /// A truncation asked this state to forget tokens, which a recurrent state cannot do.
    stale: bool,
}

impl LayerKv {
    /// Appends `(b, kv_heads, n, d)` keys and values; returns all keys and values so far, in the
    /// cache's dtype.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.dtype {
            Some(d) => (&k.to_dtype(d)?, &v.to_dtype(d)?),
            None => (k, v),
        };
        let n = k.dim(2)?;
        let needed = self.len + n;
        let cap = self.k.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if needed > cap {
            let new_cap = needed.max(cap * 2).max(256).next_multiple_of(64);
            let (b, h, _, d) = k.dims4()?;
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let (Some(ok), Some(ov)) = (&self.k, &self.v) {
                nk.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (ck, cv) = match (&self.k, &self.v) {
            (Some(ck), Some(cv)) => (ck, cv),
            _ => unreachable!("allocated above"),
        };
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((
            ck.narrow(D::Minus2, 0, self.len)?,
            cv.narrow(D::Minus2, 0, self.len)?,
        ))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything after `len` tokens (prefix reuse, retries). A recurrent state cannot forget:
    /// it must be restored from a copy taken at `len` ([`KvCache::restore_states`]) before use.
    pub fn truncate(&mut self, len: usize) {
        if self.state.is_some() && len < self.len {
            self.stale = true;
        }
        self.len = self.len.min(len);
    }

    /// The linear-attention state, `None` before the first token.
    pub fn state(&self) -> Result<Option<&(Tensor, Tensor)>> {
        if self.stale {
            return Err(crate::error::Error::InvalidInput(
                "a recurrent layer's state was rewound without a saved copy".into(),
            ));
        }
        Ok(self.state.as_ref())
    }

    /// Records the state after `n` more tokens.
    pub fn set_state(&mut self, n: usize, conv: Tensor, recurrent: Tensor) {
        self.state = Some((conv, recurrent));
        self.stale = false;
        self.len += n;
    }
}

/// The cache of a whole decoder: one entry per layer, plus the rope offset of multimodal positions.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// `max(position) + 1 - prompt_len` after the prompt: decode positions are `len + delta`.
    pub rope_delta: i64,
}

impl KvCache {
    /// A cache that keeps keys and values in the dtype they come in.
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); n_layers],
            rope_delta: 0,
        }
    }

    /// A cache that keeps keys and values as `dtype`.
    pub fn with_dtype(n_layers: usize, dtype: DType) -> Self {
        let layer = LayerKv {
            dtype: Some(dtype),
            ..LayerKv::default()
        };
        KvCache {
            layers: vec![layer; n_layers],
            rope_delta: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.truncate(len);
        }
    }

    /// The linear-attention states (cheap copies: tensors are shared), to restore after a truncation.
    pub fn states(&self) -> Vec<Option<(Tensor, Tensor)>> {
        self.layers.iter().map(|l| l.state.clone()).collect()
    }

    /// Puts back states saved by [`KvCache::states`] when the cache held `len` tokens.
    pub fn restore_states(&mut self, saved: &[Option<(Tensor, Tensor)>], len: usize) {
        for (l, s) in self.layers.iter_mut().zip(saved) {
            if s.is_some() {
                l.state = s.clone();
                l.stale = false;
                l.len = len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An f16 cache keeps what comes in rounded to f16, across a growth of its buffer, and hands back
    /// every row so far; the policy picks f16 only for a quantized f32 decoder.
    #[test]
    fn f16_cache_rounds_and_keeps_rows() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::with_dtype(1, DType::F16);
        let mut all = Vec::new();
        for (step, n) in [(0, 5), (1, 300), (2, 1)] {
            let vals: Vec<f32> = (0..2 * n * 4)
                .map(|i| ((i * 7919 + step * 31) % 997) as f32 / 97.0 - 5.0)
                .collect();
            let k = Tensor::from_vec(vals.clone(), (1, 2, n, 4), &dev)?;
            let (ck, cv) = cache.layers[0].append(&k, &(&k * 2.0)?)?;
            all.push(k);
            assert_eq!(ck.dtype(), DType::F16);
            let want = Tensor::cat(&all, 2)?;
            let rounded = want.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
            let got = ck.to_dtype(DType::F32)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                rounded.flatten_all()?.to_vec1::<f32>()?
            );
            let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err > 0.0 && err < 5e-3, "f16 rounding error {err}");
            let doubled = (rounded * 2.0)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(
                cv.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                doubled
            );
        }
        assert_eq!(cache.len(), 306);
        assert_eq!(cache_dtype(DType::F32, true, &dev), DType::F16);
        assert_eq!(cache_dtype(DType::F32, false, &dev), DType::F32);
        assert_eq!(cache_dtype(DType::BF16, true, &dev), DType::BF16);
        Ok(())
    }
}
