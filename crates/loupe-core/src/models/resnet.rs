//! ResNet as timm publishes it (`resnet18`, `resnet34`, `resnet50`, `wide_resnet50_2`, ...; the
//! torchvision layout, which timm keeps): a 7x7 stem with max pooling, four stages of basic (two
//! 3x3) or bottleneck (1x1, 3x3, 1x1) blocks, the first block of stages 2-4 at stride 2 with a 1x1
//! projection on its shortcut. Widths, block counts and groups are read from the weights, so every
//! width of the family (Wide-ResNet's doubled bottleneck included) loads the same way.

use candle_core::Tensor;

use super::conv::{count_children, Act, ConvBn, ConvSpec, Padding};
use crate::error::{Error, Result};
use crate::load::weights::Weights;

/// PyTorch's batch-norm epsilon, which timm's ResNets keep.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    shortcut: Option<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for conv in &self.convs {
            y = conv.forward(&y)?;
        }
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((y + skip)?.relu()?)
    }
}

/// A ResNet's feature stages (`layer1` .. `layer4`) and classifier.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    /// `fc`: `(classes, features)` and its bias, when the weights have it.
    head: Option<(Tensor, Tensor)>,
}

/// The stage names, as timm's and torchvision's modules are named.
pub const STAGES: [&str; 4] = ["layer1", "layer2", "layer3", "layer4"];

impl ResNet {
    pub fn load(w: &Weights) -> Result<Self> {
        let conv = |name: &str, bn: &str, stride, pad, act, inc| {
            let spec = ConvSpec {
                conv: name,
                bn: Some(bn),
                eps: BN_EPS,
                stride,
                padding: Padding::Symmetric(pad),
                act,
            };
            ConvBn::load(w, spec, inc)
        };
        if !w.contains("conv1.weight") {
            return Err(Error::InvalidInput(format!(
                "{}: no `conv1.weight`: not a plain-stem ResNet (the deep-stem `d` variants are not \
                 supported)",
                w.missing("conv1.weight")
            )));
        }
        let stem = conv("conv1", "bn1", 2, 3, Act::Relu, 3)?;
        let bottleneck = w.contains("layer1.0.conv3.weight");
        let mut channels = stem.out_channels();
        let mut stages = Vec::new();
        for (s, stage) in STAGES.iter().enumerate() {
            let n = count_children(w, stage, "conv1.weight");
            if n == 0 {
                return Err(w.missing(&format!("{stage}.0.conv1.weight")));
            }
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let p = format!("{stage}.{b}");
                let stride = if b == 0 && s > 0 { 2 } else { 1 };
                let c1 = format!("{p}.conv1");
                let b1 = format!("{p}.bn1");
                let c2 = format!("{p}.conv2");
                let b2 = format!("{p}.bn2");
                let convs = if bottleneck {
                    // timm and torchvision stride the 3x3 (ResNet v1.5).
                    let a = conv(&c1, &b1, 1, 0, Act::Relu, channels)?;
                    let m = conv(&c2, &b2, stride, 1, Act::Relu, a.out_channels())?;
                    let c3 = format!("{p}.conv3");
                    let o = conv(&c3, &format!("{p}.bn3"), 1, 0, Act::None, m.out_channels())?;
                    vec![a, m, o]
                } else {
                    let a = conv(&c1, &b1, stride, 1, Act::Relu, channels)?;
                    let o = conv(&c2, &b2, 1, 1, Act::None, a.out_channels())?;
                    vec![a, o]
                };
                let out = convs.last().map_or(channels, ConvBn::out_channels);
                let down = format!("{p}.downsample.0");
                let shortcut = if w.contains(&format!("{down}.weight")) {
                    let bn = format!("{p}.downsample.1");
                    Some(conv(&down, &bn, stride, 0, Act::None, channels)?)
                } else if stride != 1 || out != channels {
                    return Err(w.missing(&format!("{down}.weight")));
                } else {
                    None
                };
                channels = out;
                blocks.push(Block { convs, shortcut });
            }
            stages.push(blocks);
        }
        let head = if w.contains("fc.weight") {
            let classes = w.shape("fc.weight").map_or(0, |s| s[0]);
            Some((
                w.get("fc.weight", &[classes, channels])?,
                w.get("fc.bias", &[classes])?,
            ))
        } else {
            None
        };
        Ok(ResNet { stem, stages, head })
    }

    /// The output of each stage up to stage `last` (0-based) of `x` `(n, 3, h, w)`.
    pub fn stages(&self, x: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(x)?;
        // 3x3 max pooling, stride 2, padding 1: the input is a ReLU's (>= 0), so zeros pad as -inf.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut outs = Vec::new();
        for blocks in self.stages.iter().take(last + 1) {
            for b in blocks {
                x = b.forward(&x)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Class logits `(n, classes)`: global average pooling and `fc`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let Some((fc, bias)) = &self.head else {
            return Err(Error::InvalidInput(
                "these ResNet weights have no classifier (`fc.weight`)".into(),
            ));
        };
        let last = self
            .stages(x, STAGES.len() - 1)?
            .pop()
            .expect("four stages");
        let pooled = last.mean(3)?.mean(2)?;
        Ok(pooled.matmul(&fc.t()?)?.broadcast_add(bias)?)
    }

    /// Each stage's channels and stride.
    pub fn stage_shapes(&self) -> Vec<(usize, usize)> {
        self.stages
            .iter()
            .enumerate()
            .map(|(s, blocks)| {
                let c = blocks
                    .last()
                    .and_then(|b| b.convs.last())
                    .map_or(0, ConvBn::out_channels);
                (c, 4 << s)
            })
            .collect()
    }
}
