//! EfficientNet B0-B7 and EfficientNet-Lite0-4 as timm publishes them (`efficientnet_b0`,
//! `efficientnet_lite0`, and the `tf_` ports of Google's weights): a 3x3 stem at stride 2, seven
//! stages of depthwise-separable (stage 1) and inverted-residual blocks (1x1 expansion, k x k
//! depthwise, squeeze-and-excitation on B0-B7, 1x1 projection), a 1x1 head and a classifier.
//!
//! The per-variant numbers (widths, repeats, kernel sizes, expansion) are read from the weights; what
//! they cannot say is fixed by the family: the stride of each stage's first block (1, 2, 2, 2, 1, 2,
//! 1), the activation (SiLU on B0-B7, ReLU6 on Lite), and for the `tf_` ports TensorFlow's `SAME`
//! padding and batch-norm epsilon 1e-3 (timm's own: padding `k / 2`, epsilon 1e-5).

use candle_core::Tensor;

use super::conv::{count_children, Act, ConvBn, ConvSpec, Padding, SqueezeExcite};
use crate::error::{Error, Result};
use crate::load::weights::Weights;

/// The stride of the first block of each of the seven stages.
const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// What the architecture's name decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// ReLU6 and no squeeze-and-excitation (Lite) or SiLU (B0-B7).
    pub lite: bool,
    /// A `tf_` port: `SAME` padding, epsilon 1e-3.
    pub tf: bool,
}

#[derive(Debug, Clone)]
struct Block {
    /// 1x1 expansion (inverted residual only), depthwise, then after the squeeze-and-excitation
    /// the 1x1 projection.
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: Option<SqueezeExcite>,
    project: ConvBn,
    skip: bool,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        y = self.depthwise.forward(&y)?;
        if let Some(se) = &self.se {
            y = se.forward(&y)?;
        }
        y = self.project.forward(&y)?;
        Ok(if self.skip { (y + x)? } else { y })
    }
}

#[derive(Debug, Clone)]
pub struct EfficientNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    /// `conv_head` (with `bn2` and the activation), and the classifier with its bias.
    head: Option<(ConvBn, Tensor, Tensor)>,
}

impl EfficientNet {
    pub fn load(w: &Weights, v: Variant) -> Result<Self> {
        let act = if v.lite { Act::Relu6 } else { Act::Silu };
        let eps = if v.tf { 1e-3 } else { 1e-5 };
        let conv = |name: &str, bn: &str, stride: usize, k_pad: bool, act, inc| {
            // timm's own padding is `k / 2` (read from the weight by `ConvBn`: set here per kernel).
            let k = w
                .shape(&format!("{name}.weight"))
                .and_then(|s| s.get(2).copied())
                .unwrap_or(1);
            let padding = match (v.tf, k_pad) {
                (true, _) => Padding::Same,
                (false, true) => Padding::Symmetric(k / 2),
                (false, false) => Padding::Symmetric(0),
            };
            let spec = ConvSpec {
                conv: name,
                bn: Some(bn),
                eps,
                stride,
                padding,
                act,
            };
            ConvBn::load(w, spec, inc)
        };
        let stem = conv("conv_stem", "bn1", 2, true, act, 3)?;
        let mut channels = stem.out_channels();
        let n_stages = count_children(w, "blocks", "0.conv_dw.weight");
        if n_stages != STAGE_STRIDES.len() {
            return Err(Error::InvalidInput(format!(
                "{}: {n_stages} stages of blocks (`blocks.N.0.conv_dw.weight`), EfficientNet has 7",
                w.missing(&format!("blocks.{n_stages}.0.conv_dw.weight"))
            )));
        }
        let mut stages = Vec::with_capacity(n_stages);
        for (s, &first_stride) in STAGE_STRIDES.iter().enumerate() {
            let n = count_children(w, &format!("blocks.{s}"), "conv_dw.weight");
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let p = format!("blocks.{s}.{b}");
                let stride = if b == 0 { first_stride } else { 1 };
                let inverted = w.contains(&format!("{p}.conv_pwl.weight"));
                let block_in = channels;
                let block = if inverted {
                    let e = conv(
                        &format!("{p}.conv_pw"),
                        &format!("{p}.bn1"),
                        1,
                        false,
                        act,
                        channels,
                    )?;
                    let mid = e.out_channels();
                    let d = conv(
                        &format!("{p}.conv_dw"),
                        &format!("{p}.bn2"),
                        stride,
                        true,
                        act,
                        mid,
                    )?;
                    let se = SqueezeExcite::load(w, &format!("{p}.se"), mid, act)?;
                    let pr = conv(
                        &format!("{p}.conv_pwl"),
                        &format!("{p}.bn3"),
                        1,
                        false,
                        Act::None,
                        mid,
                    )?;
                    (Some(e), d, se, pr)
                } else {
                    let d = conv(
                        &format!("{p}.conv_dw"),
                        &format!("{p}.bn1"),
                        stride,
                        true,
                        act,
                        channels,
                    )?;
                    let se = SqueezeExcite::load(w, &format!("{p}.se"), channels, act)?;
                    let pr = conv(
                        &format!("{p}.conv_pw"),
                        &format!("{p}.bn2"),
                        1,
                        false,
                        Act::None,
                        channels,
                    )?;
                    (None, d, se, pr)
                };
                let (expand, depthwise, se, project) = block;
                channels = project.out_channels();
                blocks.push(Block {
                    expand,
                    depthwise,
                    se,
                    project,
                    skip: stride == 1 && block_in == channels,
                });
            }
            stages.push(blocks);
        }
        let head = if w.contains("conv_head.weight") && w.contains("classifier.weight") {
            let h = conv("conv_head", "bn2", 1, false, act, channels)?;
            let classes = w.shape("classifier.weight").map_or(0, |s| s[0]);
            let fc = w.get("classifier.weight", &[classes, h.out_channels()])?;
            let bias = w.get("classifier.bias", &[classes])?;
            Some((h, fc, bias))
        } else {
            None
        };
        Ok(EfficientNet { stem, stages, head })
    }

    /// The output of each stage up to stage `last` (0-based) of `x` `(n, 3, h, w)`.
    pub fn stages(&self, x: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        let mut x = self.stem.forward(x)?;
        let mut outs = Vec::new();
        for blocks in self.stages.iter().take(last + 1) {
            for b in blocks {
                x = b.forward(&x)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Class logits `(n, classes)`: the 1x1 head, global average pooling, the classifier.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let Some((head, fc, bias)) = &self.head else {
            return Err(Error::InvalidInput(
                "these EfficientNet weights have no classifier (`conv_head`, `classifier`)".into(),
            ));
        };
        let last = self
            .stages(x, STAGE_STRIDES.len() - 1)?
            .pop()
            .expect("seven stages");
        let pooled = head.forward(&last)?.mean(3)?.mean(2)?;
        Ok(pooled.matmul(&fc.t()?)?.broadcast_add(bias)?)
    }

    /// Each stage's channels and stride.
    pub fn stage_shapes(&self) -> Vec<(usize, usize)> {
        let mut stride = 2;
        self.stages
            .iter()
            .zip(STAGE_STRIDES)
            .map(|(blocks, s)| {
                stride *= s;
                let c = blocks.last().map_or(0, |b| b.project.out_channels());
                (c, stride)
            })
            .collect()
    }
}
