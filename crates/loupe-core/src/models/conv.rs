//! The layers of the convolutional backbones ([`super::resnet`], [`super::efficientnet`]):
//! convolutions with their batch norm folded in at load, the depthwise convolution, activations and
//! squeeze-and-excitation, on `(batch, channels, height, width)` f32 tensors.
//!
//! The depthwise convolution is our own: candle runs a grouped convolution as one convolution per
//! group (a few hundred calls per EfficientNet block), where a direct loop over each channel's plane
//! reads it once.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::load::weights::Weights;

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The same number of zeros on every side (PyTorch's `padding=p`; timm's own models use `k / 2`).
    Symmetric(usize),
    /// TensorFlow's `SAME`: the output is `ceil(input / stride)`, the padding that takes split with
    /// the odd one at the bottom and right (timm's `tf_` models, ported from TensorFlow).
    Same,
}

impl Padding {
    /// The zeros before and after an input of `size` for kernel `k` and `stride`.
    fn amounts(self, size: usize, k: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric(p) => (p, p),
            Padding::Same => {
                let out = size.div_ceil(stride);
                let total = ((out - 1) * stride + k).saturating_sub(size);
                (total / 2, total - total / 2)
            }
        }
    }
}

/// What follows a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    /// `min(max(x, 0), 6)` (the EfficientNet-Lite models).
    Relu6,
    /// `x sigmoid(x)` (EfficientNet B0-B7).
    Silu,
}

impl Act {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::None => x.clone(),
            Act::Relu => x.relu()?,
            Act::Relu6 => x.clamp(0f32, 6f32)?,
            Act::Silu => x.silu()?,
        })
    }
}

/// A convolution, its batch norm (running statistics) folded into its weights and bias, and its
/// activation.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// `(out, in / groups, k, k)`.
    weight: Tensor,
    /// `(1, out, 1, 1)`.
    bias: Tensor,
    stride: usize,
    padding: Padding,
    groups: usize,
    act: Act,
}

/// Where a convolution's parameters are and how it runs.
pub struct ConvSpec<'a> {
    /// The convolution's name (`conv`: `conv.weight`, and `conv.bias` when it has one).
    pub conv: &'a str,
    /// The batch norm after it, if any (`bn.weight`, `bn.bias`, `bn.running_mean`,
    /// `bn.running_var`), and its epsilon.
    pub bn: Option<&'a str>,
    pub eps: f64,
    pub stride: usize,
    pub padding: Padding,
    pub act: Act,
}

impl ConvBn {
    /// Loads `spec.conv` with its batch norm folded in. `in_channels` is the input's; the groups
    /// follow from the weight's shape (`in_channels` of them, one input channel each, is a depthwise
    /// convolution).
    pub fn load(w: &Weights, spec: ConvSpec, in_channels: usize) -> Result<Self> {
        let name = format!("{}.weight", spec.conv);
        let shape = w.shape(&name).ok_or_else(|| w.missing(&name))?;
        let [out, per_group, kh, kw] = shape[..] else {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}`: a convolution's weight is 4-D (out, in, k, k), found {shape:?}"
            )));
        };
        if per_group == 0 || !in_channels.is_multiple_of(per_group) || kh != kw || kh == 0 {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}`: shape {shape:?} does not fit {in_channels} input channels \
                 (square kernels, the input channels a multiple of the weight's second dim)"
            )));
        }
        let groups = in_channels / per_group;
        if !out.is_multiple_of(groups) || spec.stride == 0 {
            return Err(Error::InvalidInput(format!(
                "tensor `{name}`: {out} outputs in {groups} groups, stride {}",
                spec.stride
            )));
        }
        let weight = w.get_as(&name, &shape, DType::F32)?;
        let bias_name = format!("{}.bias", spec.conv);
        let conv_bias = if w.contains(&bias_name) {
            w.get_as(&bias_name, &[out], DType::F32)?
        } else {
            Tensor::zeros(out, DType::F32, w.device())?
        };
        let (weight, bias) = match spec.bn {
            None => (weight, conv_bias),
            Some(bn) => {
                let get = |p: &str| w.get_as(&format!("{bn}.{p}"), &[out], DType::F32);
                let (gamma, beta) = (get("weight")?, get("bias")?);
                let (mean, var) = (get("running_mean")?, get("running_var")?);
                // y = (conv(x) + b - mean) * gamma / sqrt(var + eps) + beta
                let scale = (gamma / (var + spec.eps)?.sqrt()?)?;
                let weight = weight.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
                let bias = ((conv_bias - mean)? * &scale)?.add(&beta)?;
                (weight, bias)
            }
        };
        Ok(ConvBn {
            weight,
            bias: bias.reshape((1, out, 1, 1))?,
            stride: spec.stride,
            padding: spec.padding,
            groups,
            act: spec.act,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let k = self.weight.dims()[2];
        let (top, bottom) = self.padding.amounts(h, k, self.stride);
        let (left, right) = self.padding.amounts(w, k, self.stride);
        let y = if self.groups > 1 && self.groups == c && self.out_channels() == c {
            depthwise(x, &self.weight, self.stride, (top, bottom, left, right))?
        } else if top == bottom && left == right && top == left {
            x.conv2d(&self.weight, top, self.stride, 1, self.groups)?
        } else {
            let x = x
                .pad_with_zeros(2, top, bottom)?
                .pad_with_zeros(3, left, right)?;
            x.conv2d(&self.weight, 0, self.stride, 1, self.groups)?
        };
        self.act.apply(&y.broadcast_add(&self.bias)?)
    }
}

/// Each channel of `x` `(n, c, h, w)` convolved with its own `k x k` kernel (`weight` `(c, 1, k,
/// k)`), zeros padded `(top, bottom, left, right)`: one pass over each output plane, channels spread
/// over the thread pool.
pub fn depthwise(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    (top, bottom, left, right): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (wc, one, k, k2) = weight.dims4()?;
    if wc != c || one != 1 || k != k2 || stride == 0 {
        return Err(Error::InvalidInput(format!(
            "depthwise convolution of {c} channels with a {:?} kernel",
            weight.dims()
        )));
    }
    let (hp, wp) = (h + top + bottom, w + left + right);
    if hp < k || wp < k {
        return Err(Error::InvalidInput(format!(
            "a {h}x{w} input is smaller than the {k}x{k} kernel"
        )));
    }
    let (ho, wo) = ((hp - k) / stride + 1, (wp - k) / stride + 1);
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let kv: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; n * c * ho * wo];
    let out_ptr = out.as_mut_ptr() as usize;
    crate::kernels::pool::parallel_for(n * c, |planes| {
        for plane in planes {
            let ch = plane % c;
            let src = &xv[plane * h * w..][..h * w];
            let kern = &kv[ch * k * k..][..k * k];
            // SAFETY: plane `plane` of the output is written by this iteration alone.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(plane * ho * wo), ho * wo)
            };
            for (oy, row) in dst.chunks_exact_mut(wo).enumerate() {
                for ky in 0..k {
                    // Input row of this kernel row, in the padded frame.
                    let Some(iy) = (oy * stride + ky).checked_sub(top).filter(|&iy| iy < h) else {
                        continue;
                    };
                    let src_row = &src[iy * w..][..w];
                    for kx in 0..k {
                        let kw = kern[ky * k + kx];
                        for (ox, o) in row.iter_mut().enumerate() {
                            let ix = ox * stride + kx;
                            if ix >= left && ix - left < w {
                                *o += kw * src_row[ix - left];
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(Tensor::from_vec(out, (n, c, ho, wo), x.device())?)
}

/// Squeeze-and-excitation (timm's `SqueezeExcite`): the channels' means through a 1x1 reduction,
/// the block's activation, a 1x1 expansion and a sigmoid, multiplying the channels.
#[derive(Debug, Clone)]
pub struct SqueezeExcite {
    reduce: ConvBn,
    expand: ConvBn,
}

impl SqueezeExcite {
    /// `prefix.conv_reduce` and `prefix.conv_expand`, when the weights have them.
    pub fn load(w: &Weights, prefix: &str, channels: usize, act: Act) -> Result<Option<Self>> {
        let reduce = format!("{prefix}.conv_reduce");
        if !w.contains(&format!("{reduce}.weight")) {
            return Ok(None);
        }
        fn one(conv: &str, act: Act) -> ConvSpec<'_> {
            ConvSpec {
                conv,
                bn: None,
                eps: 0.0,
                stride: 1,
                padding: Padding::Symmetric(0),
                act,
            }
        }
        let reduce = ConvBn::load(w, one(&reduce, act), channels)?;
        let expand = format!("{prefix}.conv_expand");
        let expand = ConvBn::load(w, one(&expand, Act::None), reduce.out_channels())?;
        if expand.out_channels() != channels {
            return Err(Error::InvalidInput(format!(
                "tensor `{prefix}.conv_expand.weight`: {} outputs for a block of {channels} channels",
                expand.out_channels()
            )));
        }
        Ok(Some(SqueezeExcite { reduce, expand }))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.mean_keepdim(3)?.mean_keepdim(2)?;
        let s = self.expand.forward(&self.reduce.forward(&s)?)?;
        Ok(x.broadcast_mul(&candle_nn::ops::sigmoid(&s)?)?)
    }
}

/// How many numbered children `prefix.0`, `prefix.1`, ... have a tensor named `prefix.i.suffix`.
pub fn count_children(w: &Weights, prefix: &str, suffix: &str) -> usize {
    (0..)
        .take_while(|i| w.contains(&format!("{prefix}.{i}.{suffix}")))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The depthwise loop equals candle's grouped convolution on odd sizes, strides 1 and 2, kernels
    /// 3 and 5, symmetric and uneven padding.
    #[test]
    fn depthwise_equals_the_grouped_convolution() {
        let dev = Device::Cpu;
        for (c, h, w, k, stride, pad) in [
            (3, 7, 9, 3, 1, (1, 1, 1, 1)),
            (5, 11, 6, 5, 2, (2, 2, 2, 2)),
            (4, 8, 8, 3, 2, (0, 1, 0, 1)),
            (2, 5, 5, 5, 1, (0, 0, 0, 0)),
        ] {
            let xv: Vec<f32> = (0..2 * c * h * w)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let kv: Vec<f32> = (0..c * k * k)
                .map(|i| ((i * 53 % 89) as f32 / 44.0) - 1.0)
                .collect();
            let x = Tensor::from_vec(xv, (2, c, h, w), &dev).unwrap();
            let kt = Tensor::from_vec(kv, (c, 1, k, k), &dev).unwrap();
            let got = depthwise(&x, &kt, stride, pad).unwrap();
            let (t, b, l, r) = pad;
            let xp = x
                .pad_with_zeros(2, t, b)
                .unwrap()
                .pad_with_zeros(3, l, r)
                .unwrap();
            let want = xp.conv2d(&kt, 0, stride, 1, c).unwrap();
            assert_eq!(got.dims(), want.dims());
            let (g, wv): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (a, b) in g.iter().zip(&wv) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    /// TensorFlow's `SAME` padding: the output is `ceil(in / stride)`, the extra zero at the end.
    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(Padding::Same.amounts(224, 3, 2), (0, 1));
        assert_eq!(Padding::Same.amounts(112, 3, 1), (1, 1));
        assert_eq!(Padding::Same.amounts(113, 5, 2), (2, 2));
        assert_eq!(Padding::Same.amounts(7, 5, 2), (2, 2));
        assert_eq!(Padding::Symmetric(3).amounts(10, 7, 2), (3, 3));
    }
}
