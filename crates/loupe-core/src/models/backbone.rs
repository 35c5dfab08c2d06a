//! Pretrained image backbones a user already has, for the anomaly detectors: a folder in timm's
//! published layout (`config.json` with `architecture`, and `model.safetensors`), a torchvision
//! ResNet's `.pth` state dict as `torch.save` writes it, or a DINOv2 or DINOv3 in the
//! Hugging Face layout (`config.json` with `model_type`), loaded by the family's own file
//! ([`super::resnet`], [`super::efficientnet`], [`super::dinov2`], [`super::dinov3`]) and run to the
//! stages a detector reads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::dinov2::{Dinov2, Dinov2Config};
use super::dinov3::{Dinov3, Dinov3Config};
use super::efficientnet::{EfficientNet, Variant};
use super::resnet::ResNet;
use crate::error::{Error, Result};
use crate::image::RgbImage;
use crate::load::weights::Weights;

/// The architectures [`Backbone::load`] reads, as timm names them (`N` a digit).
pub const SUPPORTED: &str = "resnet18, resnet34, resnet50, resnet101, resnet152, \
    wide_resnet50_2, wide_resnet101_2, efficientnet_bN, tf_efficientnet_bN, efficientnet_liteN, \
    tf_efficientnet_liteN (timm's layout); dinov2, dinov2_with_registers, dinov3_vit (Hugging Face's)";

/// The largest weights file read (Wide-ResNet-101-2 in f32 is 500 MB).
const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

#[derive(Debug, Clone)]
enum Net {
    ResNet(ResNet),
    EfficientNet(EfficientNet),
    Dinov2(Dinov2),
    Dinov3(Dinov3),
}

/// One stage's output: its name (as timm's modules are named), channels and stride.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub channels: usize,
    pub stride: usize,
}

/// A loaded backbone.
#[derive(Debug, Clone)]
pub struct Backbone {
    /// timm's architecture name, from `config.json`.
    pub architecture: String,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// The normalization its weights were trained with (`pretrained_cfg`; ImageNet's by default).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    net: Net,
    stages: Vec<Stage>,
}

#[derive(Deserialize)]
struct Config {
    architecture: Option<String>,
    model_type: Option<String>,
    #[serde(default)]
    pretrained_cfg: PretrainedCfg,
}

#[derive(Deserialize, Default)]
struct PretrainedCfg {
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
}

/// A Hugging Face image processor's normalization (`preprocessor_config.json`).
#[derive(Deserialize)]
struct Preprocessor {
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

/// ImageNet's channel means and deviations, timm's default.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Backbone {
    /// Loads the backbone in `dir` (`config.json` and `model.safetensors`), or the `.pth` file
    /// `dir` names ([`Backbone::load_pth`]).
    pub fn load(dir: &Path) -> Result<Self> {
        if dir.is_file() {
            return Self::load_pth(dir);
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Config = parse(&text, &config_path)?;
        let field = |field: &str, msg: String| Error::Config {
            path: config_path.clone(),
            field: field.into(),
            msg,
        };
        let vit = config
            .model_type
            .as_deref()
            .filter(|t| super::dinov2::MODEL_TYPES.contains(t) || *t == super::dinov3::MODEL_TYPE);
        let architecture = match (config.architecture, vit) {
            (_, Some(t)) => t.to_string(),
            (Some(a), None) => a,
            (None, None) => {
                return Err(field(
                    "architecture",
                    "missing: a backbone folder is timm's layout (config.json names the \
                     architecture) or a DINOv2 / DINOv3 in Hugging Face's (config.json's \
                     model_type)"
                        .into(),
                ))
            }
        };
        // A Hugging Face image processor's normalization, where the folder has one.
        let processor_path = dir.join("preprocessor_config.json");
        let processor = match std::fs::read_to_string(&processor_path) {
            Ok(text) => Some(
                serde_json::from_str::<Preprocessor>(&text).map_err(|source| Error::Json {
                    path: processor_path.clone(),
                    source,
                })?,
            ),
            Err(_) => None,
        };
        let (hf_mean, hf_std) = processor.map_or((None, None), |p| (p.image_mean, p.image_std));
        let three = |v: Option<Vec<f32>>, name: &str, default: [f32; 3]| match v {
            None => Ok(default),
            Some(v) => <[f32; 3]>::try_from(v.as_slice())
                .ok()
                .filter(|v| v.iter().all(|x| x.is_finite()))
                .ok_or_else(|| field(name, format!("{v:?} is not three finite numbers"))),
        };
        let mean = three(
            config.pretrained_cfg.mean.or(hf_mean),
            "pretrained_cfg.mean",
            IMAGENET_MEAN,
        )?;
        let std = three(
            config.pretrained_cfg.std.or(hf_std),
            "pretrained_cfg.std",
            IMAGENET_STD,
        )?;
        if std.iter().any(|&s| s <= 0.0) {
            return Err(field(
                "pretrained_cfg.std",
                format!("{std:?} must be positive"),
            ));
        }
        let weights_path = weights_file(dir);
        check_size(&weights_path)?;
        let w = Weights::open(&[weights_path], DType::F32, &Device::Cpu, |s| s.to_string())?;
        let net = match family(&architecture) {
            Some(Family::Dinov2) => Net::Dinov2(Dinov2::load(
                parse::<Dinov2Config>(&text, &config_path)?,
                &w,
            )?),
            Some(Family::Dinov3) => Net::Dinov3(Dinov3::load(
                parse::<Dinov3Config>(&text, &config_path)?,
                &w,
            )?),
            Some(Family::ResNet) => Net::ResNet(ResNet::load(&w)?),
            Some(Family::EfficientNet(v)) => Net::EfficientNet(EfficientNet::load(&w, v)?),
            None => {
                return Err(Error::UnsupportedModel {
                    path: config_path,
                    model_type: architecture,
                    supported: SUPPORTED.into(),
                })
            }
        };
        let stages = stages_of(&net);
        Ok(Backbone {
            architecture,
            dir: dir.to_path_buf(),
            mean,
            std,
            net,
            stages,
        })
    }

    /// A torchvision ResNet or Wide-ResNet state dict as `torch.save` writes it (PyTorch's zip
    /// format; the dict itself, or under `state_dict` or `model`; a `module.` prefix dropped),
    /// normalized with ImageNet's statistics as torchvision's weights are. The architecture is read
    /// from the weights (block kind, counts, width). Other `.pth` files are refused with the
    /// converter's name (tools/convert_backbone.py), which also turns the legacy format into timm's
    /// layout.
    pub fn load_pth(path: &Path) -> Result<Self> {
        let convert = "convert it with tools/convert_backbone.py into timm's layout (a folder of \
                       config.json + model.safetensors)";
        let bad = |msg: String| Error::Weights {
            path: path.to_path_buf(),
            msg,
        };
        check_size(path)?;
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            f.read_exact(&mut magic).map_err(|e| Error::io(path, e))?;
        }
        if &magic != b"PK\x03\x04" {
            return Err(bad(format!(
                "not a PyTorch zip file (saved before PyTorch 1.6, or not a .pth at all): {convert}"
            )));
        }
        // candle's reader of PyTorch's pickles, kept from taking the process down on a file it
        // does not expect.
        let read = |key: Option<&str>| {
            std::panic::catch_unwind(|| candle_core::pickle::read_all_with_key(path, key))
                .map_err(|_| bad(format!("PyTorch's pickle could not be read: {convert}")))?
                .map_err(|e| {
                    bad(format!(
                        "PyTorch's pickle could not be read ({e}): {convert}"
                    ))
                })
        };
        let mut tensors = read(None)?;
        for key in ["state_dict", "model"] {
            if tensors.is_empty() {
                tensors = read(Some(key)).unwrap_or_default();
            }
        }
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(name, t)| {
                let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
                Ok((name, t.to_dtype(DType::F32)?))
            })
            .collect::<Result<_>>()?;
        let w = Weights::from_tensors(path, tensors, DType::F32);
        if !(w.contains("conv1.weight") && w.contains("layer1.0.conv1.weight")) {
            return Err(bad(format!(
                "not a torchvision ResNet state dict (no conv1 and layer1 weights; it has {}): \
                 Loupe reads ResNet and Wide-ResNet .pth files directly; for others, {convert}",
                first_names(&w.names())
            )));
        }
        let net = ResNet::load(&w)?;
        let architecture = resnet_name(&w);
        let stages = stages_of(&Net::ResNet(net.clone()));
        Ok(Backbone {
            architecture,
            dir: path.to_path_buf(),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            net: Net::ResNet(net),
            stages,
        })
    }

    /// Every stage, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The index of the stage named `name`.
    pub fn stage_index(&self, name: &str) -> Result<usize> {
        self.stages
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                Error::InvalidInput(format!(
                    "{} has no stage `{name}` (it has {})",
                    self.architecture,
                    names.join(", ")
                ))
            })
    }

    /// Whether this is a vision transformer (one patch grid at every stage, tokens that already
    /// see the whole image).
    pub fn is_vit(&self) -> bool {
        matches!(self.net, Net::Dinov2(_) | Net::Dinov3(_))
    }

    /// The stages PatchCore reads. A CNN's two mid-level stages: the last at stride 8 and the last
    /// at stride 16 (ResNet's `layer2` and `layer3`, EfficientNet's `blocks.2` and `blocks.4`). A
    /// ViT's layers at a half, two thirds, five sixths and the whole of its depth (the multi-layer
    /// patch-token bank of the DINO-based detectors: mid layers place a defect, the last knows the
    /// part).
    pub fn patchcore_stages(&self) -> Vec<usize> {
        if self.is_vit() {
            let depth = self.stages.len();
            let mut layers: Vec<usize> = [(1, 2), (2, 3), (5, 6), (1, 1)]
                .iter()
                .map(|&(a, b)| (depth * a).div_ceil(b).clamp(1, depth) - 1)
                .collect();
            layers.dedup();
            layers
        } else {
            vec![self.last_at(8), self.last_at(16)]
        }
    }

    /// PaDiM's three stages: the last at stride 4, 8 and 16 (ResNet's `layer1`, `layer2` and
    /// `layer3`; EfficientNet's `blocks.1`, `blocks.2` and `blocks.4`).
    pub fn padim_stages(&self) -> [usize; 3] {
        [self.last_at(4), self.last_at(8), self.last_at(16)]
    }

    fn last_at(&self, stride: usize) -> usize {
        self.stages
            .iter()
            .rposition(|s| s.stride == stride)
            .unwrap_or(0)
    }

    /// An image as the network's input `(1, 3, h, w)`: values in [0, 1], normalized by its mean and
    /// deviation.
    pub fn pixels(&self, img: &RgbImage) -> Result<Tensor> {
        let (h, w) = (img.height, img.width);
        let mut v = vec![0f32; 3 * h * w];
        for (i, px) in img.data.chunks_exact(3).take(h * w).enumerate() {
            for c in 0..3 {
                v[c * h * w + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu)?)
    }

    /// The outputs of the stages `wanted` (indices, any order) for `x` `(n, 3, h, w)`, in the order
    /// asked; the network runs only as far as the deepest.
    pub fn features(&self, x: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let last = wanted.iter().copied().max().unwrap_or(0);
        if last >= self.stages.len() {
            return Err(Error::InvalidInput(format!(
                "stage {last} of a backbone with {} stages",
                self.stages.len()
            )));
        }
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h < 32 || w < 32 {
            return Err(Error::InvalidInput(format!(
                "a backbone's input is (n, 3, h, w) with h, w >= 32, not {:?}",
                x.dims()
            )));
        }
        let outs = match &self.net {
            Net::ResNet(r) => r.stages(x, last)?,
            Net::EfficientNet(e) => e.stages(x, last)?,
            Net::Dinov2(v) => v.stages(x, last)?,
            Net::Dinov3(v) => v.stages(x, last)?,
        };
        Ok(wanted.iter().map(|&i| outs[i].clone()).collect())
    }

    /// Class logits `(n, classes)` for `x` `(n, 3, h, w)`, where the weights have a classifier.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::ResNet(r) => r.logits(x),
            Net::EfficientNet(e) => e.logits(x),
            Net::Dinov2(_) | Net::Dinov3(_) => Err(Error::InvalidInput(format!(
                "{} has no classifier: it gives features only",
                self.architecture
            ))),
        }
    }
}

/// The file that holds the weights of the backbone loaded from `dir` (a folder's
/// `model.safetensors`, or the `.pth` file itself).
pub fn weights_file(dir: &Path) -> PathBuf {
    if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join("model.safetensors")
    }
}

/// An error for a weights file over [`MAX_WEIGHTS_BYTES`] (or one that cannot be read).
fn check_size(path: &Path) -> Result<()> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > MAX_WEIGHTS_BYTES {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            msg: format!("{size} bytes, over the {MAX_WEIGHTS_BYTES} a backbone may have"),
        });
    }
    Ok(())
}

/// `config.json`'s `text` (read from `path`) as a family's own config.
fn parse<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The stages of `net`, named as timm's (or transformers') modules are.
fn stages_of(net: &Net) -> Vec<Stage> {
    let shapes = match net {
        Net::ResNet(r) => r.stage_shapes(),
        Net::EfficientNet(e) => e.stage_shapes(),
        Net::Dinov2(v) => v.stage_shapes(),
        Net::Dinov3(v) => v.stage_shapes(),
    };
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (channels, stride))| Stage {
            name: match net {
                Net::ResNet(_) => format!("layer{}", i + 1),
                Net::EfficientNet(_) => format!("blocks.{i}"),
                Net::Dinov2(_) => format!("encoder.layer.{i}"),
                Net::Dinov3(_) => format!("layer.{i}"),
            },
            channels,
            stride,
        })
        .collect()
}

/// A ResNet's name from its weights: torchvision's for the published depths and widths
/// (`resnet50`, `wide_resnet50_2`, ...), else its block kind and counts.
fn resnet_name(w: &Weights) -> String {
    let bottleneck = w.contains("layer1.0.conv3.weight");
    let counts: Vec<usize> = super::resnet::STAGES
        .iter()
        .map(|s| super::conv::count_children(w, s, "conv1.weight"))
        .collect();
    // A bottleneck's inner width: 64 in a ResNet's first stage, 128 in a Wide-ResNet-*-2's.
    let inner = w
        .shape("layer1.0.conv1.weight")
        .and_then(|s| s.first().copied());
    let depth = match (bottleneck, counts.as_slice()) {
        (false, [2, 2, 2, 2]) => Some(18),
        (false, [3, 4, 6, 3]) => Some(34),
        (true, [3, 4, 6, 3]) => Some(50),
        (true, [3, 4, 23, 3]) => Some(101),
        (true, [3, 8, 36, 3]) => Some(152),
        _ => None,
    };
    match (depth, inner) {
        (Some(d @ (50 | 101)), Some(128)) => format!("wide_resnet{d}_2"),
        (Some(d), _) => format!("resnet{d}"),
        (None, _) => format!(
            "resnet ({} blocks {})",
            if bottleneck { "bottleneck" } else { "basic" },
            counts
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("-")
        ),
    }
}

/// The first few of `names`, for an error.
fn first_names(names: &[String]) -> String {
    let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        s.push_str(&format!(" and {} more", names.len() - 4));
    }
    if s.is_empty() {
        s = "no tensors".into();
    }
    s
}

enum Family {
    ResNet,
    EfficientNet(Variant),
    Dinov2,
    Dinov3,
}

/// The family of timm's architecture `name`.
fn family(name: &str) -> Option<Family> {
    let digit_after = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.len() == 1 && rest.chars().all(|c| c.is_ascii_digit()))
    };
    let resnets = [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "wide_resnet50_2",
        "wide_resnet101_2",
    ];
    if resnets.contains(&name) {
        return Some(Family::ResNet);
    }
    if super::dinov2::MODEL_TYPES.contains(&name) {
        return Some(Family::Dinov2);
    }
    if name == super::dinov3::MODEL_TYPE {
        return Some(Family::Dinov3);
    }
    let variant = |lite, tf| Some(Family::EfficientNet(Variant { lite, tf }));
    if digit_after("efficientnet_b") {
        variant(false, false)
    } else if digit_after("tf_efficientnet_b") {
        variant(false, true)
    } else if digit_after("efficientnet_lite") {
        variant(true, false)
    } else if digit_after("tf_efficientnet_lite") {
        variant(true, true)
    } else {
        None
    }
}
