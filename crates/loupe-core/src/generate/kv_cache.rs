//! The decoder's cache: keys and values for attention layers (preallocated, grown by doubling, written
//! in place), and for linear-attention layers (Qwen3.5's Gated DeltaNet) their fixed-size state: the
//! last inputs of the causal convolution and the recurrent matrix.

use candle_core::{Tensor, D};

use crate::error::Result;

#[derive(Debug, Clone, Default)]
pub struct LayerKv {
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
    /// Appends `(b, kv_heads, n, d)` keys and values; returns all keys and values so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
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
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); n_layers],
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
