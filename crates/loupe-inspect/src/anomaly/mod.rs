//! Anomaly detection learned from good parts only, beside the VLM: a detector file (a "bank") that
//! `loupe learn` writes and a spec's `[anomaly]` section names.
//!
//! Three methods ([`Method`]): the classical variation model ([`variation`]), a PatchCore
//! patch-feature memory bank ([`patchcore`]): on the loaded VLM's vision tower, or as published on a
//! pretrained CNN the user names (`loupe learn --backbone DIR`, timm's layout), and PaDiM's Gaussian
//! per patch position ([`padim`], on a pretrained CNN). Each gives a per-pixel anomaly map and an
//! image score; the threshold comes from held-out good images ([`calibrate`]), never from a guess.
//!
//! The file is safetensors: the learned tensors, and in its metadata (`loupe_anomaly`) a JSON header
//! with the method, model, layer, image size, threshold, calibration and the hashes of the images it
//! was learned and calibrated on.

pub mod calibrate;
pub mod padim;
pub mod patchcore;
pub mod variation;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use loupe_core::image::RgbImage;
use loupe_core::models::backbone::Backbone;
use loupe_core::Engine;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::spec::Augment;
use calibrate::Calibration;
use padim::Gaussians;
use variation::{Gray, VariationModel};

/// The metadata key of the JSON header.
const HEADER_KEY: &str = "loupe_anomaly";
/// The header's format version.
const FORMAT: u32 = 1;
/// The largest bank file read (a bank of 200k features of 1280 values in f32 is 1 GiB).
pub const MAX_BANK_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Aligned golden template: per-pixel mean and spread.
    Variation,
    /// Patch features of the VLM's vision tower or a pretrained CNN, nearest neighbour in a
    /// coreset.
    Patchcore,
    /// A Gaussian per patch position of a pretrained CNN's features, Mahalanobis distance.
    Padim,
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "variation" => Ok(Method::Variation),
            "patchcore" => Ok(Method::Patchcore),
            "padim" => Ok(Method::Padim),
            o => Err(format!(
                "method `{o}` is not one of variation, patchcore, padim"
            )),
        }
    }
}

/// What a bank file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub method: Method,
    /// Patchcore: the model whose tower made the features (its `model_type`, depth and width, which
    /// must match the model that scores).
    pub model_type: Option<String>,
    pub vision_depth: Option<usize>,
    pub layer: Option<usize>,
    pub feature_dim: Option<usize>,
    /// The size images are brought to before scoring.
    pub width: usize,
    pub height: usize,
    /// An image scoring above this is anomalous.
    pub threshold: f32,
    pub calibration: Calibration,
    /// Images learned from and held out for the threshold.
    pub trained_on: usize,
    pub calibrated_on: usize,
    /// SHA-256 over the sorted SHA-256 of each image's file, per set.
    pub training_set_sha256: String,
    pub calibration_set_sha256: String,
    pub coreset_fraction: Option<f64>,
    /// Patchcore: features averaged over 3x3 patches.
    #[serde(default)]
    pub pool: bool,
    pub max_rotation: Option<f32>,
    pub seed: u64,
    /// Patchcore on a pretrained backbone rather than the VLM's tower; PaDiM's backbone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<BackboneRef>,
    /// PaDiM: the channels of the stages' concatenated features it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<usize>>,
    /// PaDiM: the positions of its grid, across and down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<[usize; 2]>,
    /// The flips and turns each good image was also learned in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub augment: Vec<Augment>,
}

/// The pretrained backbone a bank was learned with: where it was, what it is, and the SHA-256 of
/// its weights (a bank only scores with the very weights it was learned on).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackboneRef {
    pub dir: PathBuf,
    pub architecture: String,
    pub weights_sha256: String,
    /// The stages the features come from, by name.
    pub stages: Vec<String>,
}

impl BackboneRef {
    /// The reference to `net`, loaded from `dir`, read at `stages`.
    fn of(net: &Backbone, dir: &Path, stages: &[usize]) -> Result<BackboneRef> {
        Ok(BackboneRef {
            dir: dir.to_path_buf(),
            architecture: net.architecture.clone(),
            weights_sha256: weights_hash(dir)?,
            stages: stages
                .iter()
                .map(|&i| net.stages()[i].name.clone())
                .collect(),
        })
    }
}

/// The SHA-256 of a backbone's `model.safetensors` (or of the `.pth` file it was loaded from).
fn weights_hash(dir: &Path) -> Result<String> {
    use std::io::Read;
    let path = loupe_core::models::backbone::weights_file(dir);
    let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Loads the backbone `r` names and checks it is the one the bank was learned with.
fn load_backbone(r: &BackboneRef) -> Result<(Arc<Backbone>, Vec<usize>)> {
    let backbone = Backbone::load(&r.dir)?;
    let hash = weights_hash(&r.dir)?;
    if hash != r.weights_sha256 || backbone.architecture != r.architecture {
        return Err(Error::InvalidInput(format!(
            "the anomaly bank was learned with the {} backbone whose weights have SHA-256 {}; {} \
             holds {} weights with SHA-256 {hash}: learn the bank again, or restore those weights",
            r.architecture,
            r.weights_sha256,
            r.dir.display(),
            backbone.architecture
        )));
    }
    let stages = r
        .stages
        .iter()
        .map(|s| backbone.stage_index(s))
        .collect::<loupe_core::Result<Vec<_>>>()?;
    Ok((Arc::new(backbone), stages))
}

enum Data {
    Variation(VariationModel),
    Patchcore { features: Vec<f32>, dim: usize },
    Padim(Gaussians),
}

/// A learned detector.
pub struct Bank {
    pub header: Header,
    data: Data,
    /// The pretrained backbone and the stages it gives features from, for a bank learned on one.
    backbone: Option<Scorer>,
}

/// The anomaly of one image: its score and the map it came from, at the bank's size, in the image's
/// own frame (scale it to the image to place boxes).
#[derive(Debug, Clone)]
pub struct Scored {
    pub score: f32,
    pub map: Gray,
}

/// How `learn` runs.
#[derive(Debug, Clone)]
pub struct LearnOptions {
    pub method: Method,
    /// Patchcore: the tower block features come from.
    pub layer: Option<usize>,
    pub width: usize,
    pub height: usize,
    /// Patchcore: the share of all patch features kept.
    pub coreset_fraction: f64,
    /// Patchcore: average each feature over its 3x3 patch neighbourhood.
    pub pool: bool,
    /// Patchcore: a pretrained backbone's folder (timm's layout): PatchCore as published on it,
    /// rather than on the VLM's tower. PaDiM: its backbone (required).
    pub backbone: Option<PathBuf>,
    /// PaDiM: the channels kept (a seeded random subset; `None`: [`padim::DEFAULT_CHANNELS`]).
    pub channels: Option<usize>,
    /// The flips and turns under which a good part stays good (the spec's `anomaly.augment`):
    /// each good image is learned as it is and so changed.
    pub augment: Vec<Augment>,
    /// The share of good images held out to set the threshold.
    pub holdout: f64,
    /// Good images to set the threshold on instead of a held-out share: then every image in
    /// `goods` is learned from.
    pub calibrate_on: Option<Vec<PathBuf>>,
    pub far: f64,
    pub confidence: f64,
    pub seed: u64,
    /// Variation: the largest rotation searched, in degrees.
    pub max_rotation: f32,
}

/// What `learn` reports as it goes: (stage, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// The outcome of `learn`: the bank and the calibration table of its held-out scores.
pub struct Learned {
    pub bank: Bank,
    pub table: Vec<std::result::Result<Calibration, (f64, usize)>>,
    pub held_out_scores: Vec<f32>,
}

fn set_hash(hashes: &[String]) -> String {
    let mut sorted = hashes.to_vec();
    sorted.sort();
    let mut h = Sha256::new();
    for s in sorted {
        h.update(s.as_bytes());
        h.update(b"\n");
    }
    format!("{:x}", h.finalize())
}

/// Reads an image file once (within the `image-bytes` limit): its SHA-256 goes to `hashes`, the
/// decoded image comes back.
fn read_image(path: &Path, hashes: &mut Vec<String>) -> Result<RgbImage> {
    let limit = loupe_core::limits::get().image_bytes;
    let bytes = loupe_core::limits::read_file(path, limit, "image-bytes")?;
    hashes.push(format!("{:x}", Sha256::digest(&bytes)));
    loupe_core::image::decode(&bytes).map_err(|msg| {
        Error::Engine(loupe_core::Error::Image {
            path: path.to_path_buf(),
            msg,
        })
    })
}

/// The default layer for patch features: two thirds up the tower (PatchCore takes mid-level features:
/// local enough to place a defect, abstract enough to ignore noise).
pub fn default_layer(depth: usize) -> usize {
    (depth * 2 / 3).saturating_sub(1)
}

/// Learns a detector from good images: a seeded share held out ([`LearnOptions::holdout`]), the rest
/// learned from, the threshold set on the held-out scores for `far` at `confidence`.
pub fn learn(
    engine: Option<&Engine>,
    goods: &[PathBuf],
    opts: &LearnOptions,
    progress: Progress,
) -> Result<Learned> {
    if !(0.0..1.0).contains(&opts.holdout) || opts.holdout == 0.0 {
        return Err(Error::InvalidInput(format!(
            "--holdout {} is not between 0 and 1",
            opts.holdout
        )));
    }
    if !(opts.coreset_fraction > 0.0 && opts.coreset_fraction <= 1.0) {
        return Err(Error::InvalidInput(format!(
            "--coreset {} is not in (0, 1]",
            opts.coreset_fraction
        )));
    }
    // The backbone first: a wrong folder is named before any image is read.
    let pretrained = match (&opts.backbone, opts.method) {
        (Some(dir), Method::Patchcore | Method::Padim) => {
            let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
            Some((Backbone::load(&dir)?, dir))
        }
        (None, Method::Padim) => {
            return Err(Error::InvalidInput(
                "PaDiM runs on a pretrained backbone: name its folder with --backbone DIR".into(),
            ))
        }
        _ => None,
    };
    let mut order: Vec<PathBuf> = goods.to_vec();
    order.sort();
    order.dedup();
    let needed = calibrate::images_needed(opts.far, opts.confidence);
    let (held, train): (Vec<PathBuf>, Vec<PathBuf>) = match &opts.calibrate_on {
        Some(cal) => {
            let mut cal = cal.clone();
            cal.sort();
            cal.dedup();
            if let Some(both) = cal.iter().find(|p| order.binary_search(p).is_ok()) {
                return Err(Error::InvalidInput(format!(
                    "{} is both learned from and calibrated on: a threshold must be set on \
                     images the detector has not seen",
                    both.display()
                )));
            }
            if cal.is_empty() || order.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "{} good images to learn from and {} to calibrate on: each needs at least 1",
                    order.len(),
                    cal.len()
                )));
            }
            (cal, order)
        }
        None => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
            order.shuffle(&mut rng);
            if order.is_empty() || (order.len() == 1 && opts.augment.is_empty()) {
                return Err(Error::InvalidInput(format!(
                    "{} good image: one image cannot both be learned from and set the threshold \
                     (give at least 2, or let the spec's [anomaly] augment turn or flip it; a \
                     false-alarm rate of {} at {} confidence needs {needed} held out)",
                    order.len(),
                    opts.far,
                    opts.confidence
                )));
            }
            if order.len() == 1 {
                // One image: learned from in all its views; the threshold from those views left
                // out in turn, below.
                return learn_one(engine, pretrained.as_ref(), &order, opts, progress);
            }
            // At least one image each way: with fewer held out than the rate needs, the
            // calibration states the rate they do bound (`calibrate::weakest`).
            let n_hold =
                (((order.len() as f64) * opts.holdout).round() as usize).clamp(1, order.len() - 1);
            let train = order.split_off(n_hold);
            (order, train)
        }
    };
    let (held, train) = (&held[..], &train[..]);
    let (mut train_hashes, mut held_hashes) = (Vec::new(), Vec::new());
    let mut header = new_header(opts, train.len(), held.len());
    let (data, backbone) = fit(
        engine,
        pretrained.as_ref(),
        train,
        opts,
        None,
        &mut header,
        &mut train_hashes,
        progress,
    )?;
    let mut bank = Bank {
        header,
        data,
        backbone,
    };
    let mut held_out_scores = Vec::with_capacity(held.len());
    for (i, p) in held.iter().enumerate() {
        held_out_scores.push(bank.score(engine, &read_image(p, &mut held_hashes)?)?.score);
        progress("calibrating", i + 1, held.len());
    }
    // Too few held out for the rate asked: the rate they do bound, stated in the calibration.
    let cal = calibrate::calibrate(&held_out_scores, opts.far, opts.confidence)
        .or_else(|| calibrate::weakest(&held_out_scores, opts.confidence))
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "no threshold at {} confidence from {} held-out images",
                opts.confidence,
                held.len()
            ))
        })?;
    bank.header.training_set_sha256 = set_hash(&train_hashes);
    bank.header.calibration_set_sha256 = set_hash(&held_hashes);
    bank.header.threshold = cal.threshold;
    bank.header.calibration = cal;
    let table = calibrate::table(&held_out_scores, opts.confidence);
    Ok(Learned {
        bank,
        table,
        held_out_scores,
    })
}

/// One good image and the spec's augmentations: the bank learned from the image in every view; the
/// threshold the largest score of each augmented view against the bank learned without it. Views of
/// one part are not independent good parts, so the calibration bounds no false-alarm rate (`far`
/// 1, reached with confidence 0, on 0 held-out images): a starting point to check, said so.
fn learn_one(
    engine: Option<&Engine>,
    pretrained: Option<&(Backbone, PathBuf)>,
    image: &[PathBuf],
    opts: &LearnOptions,
    progress: Progress,
) -> Result<Learned> {
    let mut hashes = Vec::new();
    let mut header = new_header(opts, 1, 0);
    let (data, backbone) = fit(
        engine,
        pretrained,
        image,
        opts,
        None,
        &mut header,
        &mut hashes,
        progress,
    )?;
    let img = read_image(&image[0], &mut Vec::new())?;
    let mut view_scores = Vec::with_capacity(opts.augment.len());
    for (i, a) in opts.augment.iter().enumerate() {
        let mut without = header.clone();
        let (data, backbone) = fit(
            engine,
            pretrained,
            image,
            opts,
            Some(i),
            &mut without,
            &mut Vec::new(),
            &mut |_: &str, _: usize, _: usize| {},
        )?;
        let bank = Bank {
            header: without,
            data,
            backbone,
        };
        view_scores.push(bank.score(engine, &a.apply(&img))?.score);
        progress("views left out", i + 1, opts.augment.len());
    }
    let threshold = view_scores
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    header.threshold = threshold;
    header.calibration = Calibration {
        far: 1.0,
        confidence: opts.confidence,
        threshold,
        exceedances: 0,
        achieved: 0.0,
        n: 0,
    };
    header.training_set_sha256 = set_hash(&hashes);
    header.calibration_set_sha256 = set_hash(&[]);
    let table = calibrate::table(&[], opts.confidence);
    Ok(Learned {
        bank: Bank {
            header,
            data,
            backbone,
        },
        table,
        held_out_scores: view_scores,
    })
}

/// A bank's header for `opts`, before the method's fields and the calibration are filled in.
fn new_header(opts: &LearnOptions, trained_on: usize, calibrated_on: usize) -> Header {
    let (w, h) = (opts.width, opts.height);
    Header {
        format: FORMAT,
        method: opts.method,
        model_type: None,
        vision_depth: None,
        layer: None,
        feature_dim: None,
        width: w,
        height: h,
        threshold: f32::INFINITY,
        calibration: Calibration {
            far: opts.far,
            confidence: opts.confidence,
            threshold: f32::INFINITY,
            exceedances: 0,
            achieved: 0.0,
            n: 0,
        },
        trained_on,
        calibrated_on,
        training_set_sha256: String::new(),
        calibration_set_sha256: String::new(),
        coreset_fraction: None,
        pool: opts.pool,
        max_rotation: None,
        seed: opts.seed,
        backbone: None,
        channels: None,
        grid: None,
        augment: opts.augment.clone(),
    }
}

/// The backbone a bank scores with and the stages it reads.
type Scorer = (Arc<Backbone>, Vec<usize>);

/// The method's data fitted to the good images `train`, each in every view the spec allows but the
/// augmentation `skip`, the header's fields for it filled in, with the backbone it scores with.
#[allow(clippy::too_many_arguments)]
fn fit(
    engine: Option<&Engine>,
    pretrained: Option<&(Backbone, PathBuf)>,
    train: &[PathBuf],
    opts: &LearnOptions,
    skip: Option<usize>,
    header: &mut Header,
    hashes: &mut Vec<String>,
    progress: Progress,
) -> Result<(Data, Option<Scorer>)> {
    // Each good image learned from, as it is and in every change the spec allows (but `skip`).
    let views = |img: RgbImage| -> Vec<RgbImage> {
        let mut v: Vec<RgbImage> = (opts.augment.iter().enumerate())
            .filter(|&(i, _)| Some(i) != skip)
            .map(|(_, a)| a.apply(&img))
            .collect();
        v.insert(0, img);
        v
    };
    let (w, h) = (opts.width, opts.height);
    let mut backbone = None;
    let data = match opts.method {
        Method::Variation => {
            let mut grays = Vec::with_capacity(train.len());
            for (i, p) in train.iter().enumerate() {
                for view in views(read_image(p, hashes)?) {
                    grays.push(Gray::from_rgb(&view, w, h));
                }
                progress("reading good images", i + 1, train.len());
            }
            let mut done = 0;
            let model = VariationModel::learn(&grays, opts.max_rotation, || {
                done += 1;
                progress("aligning", done, grays.len());
            })
            .ok_or_else(|| Error::InvalidInput("the variation model needs 2 good images".into()))?;
            header.max_rotation = Some(opts.max_rotation);
            Data::Variation(model)
        }
        Method::Padim => {
            let (net, dir) = pretrained.expect("checked above");
            let net = net.clone();
            if net.is_vit() {
                return Err(Error::InvalidInput(format!(
                    "PaDiM reads a CNN's stages at strides 4, 8 and 16; {} is a ViT with one \
                     grid: use --method patchcore on it",
                    net.architecture
                )));
            }
            let stages = net.padim_stages();
            let reference = BackboneRef::of(&net, dir, &stages)?;
            let total: usize = stages.iter().map(|&i| net.stages()[i].channels).sum();
            let wanted = opts.channels.unwrap_or(padim::DEFAULT_CHANNELS);
            if wanted == 0 {
                return Err(Error::InvalidInput(
                    "--channels 0: PaDiM keeps at least 1".into(),
                ));
            }
            let channels = padim::choose_channels(total, wanted, opts.seed);
            let mut goods = Vec::with_capacity(train.len());
            for (i, p) in train.iter().enumerate() {
                for view in views(read_image(p, hashes)?) {
                    let g = padim::embedding(&net, &stages, &channels, &view, w, h)?;
                    let bytes = (4 * g.gh * g.gw * (g.dim + padim::triangle(g.dim))) as u64;
                    if goods.is_empty() && bytes > MAX_BANK_BYTES {
                        return Err(Error::InvalidInput(format!(
                            "a PaDiM bank of {}x{} positions of {} channels would take {bytes} \
                             bytes, over the {MAX_BANK_BYTES} a bank may have: keep fewer \
                             --channels or a smaller --size",
                            g.gw, g.gh, g.dim
                        )));
                    }
                    goods.push(g);
                }
                progress("patch features", i + 1, train.len());
            }
            let gaussians = Gaussians::fit(&goods)?;
            header.feature_dim = Some(gaussians.dim);
            header.grid = Some([gaussians.gw, gaussians.gh]);
            header.channels = Some(channels);
            header.backbone = Some(reference);
            backbone = Some((Arc::new(net), stages.to_vec()));
            Data::Padim(gaussians)
        }
        Method::Patchcore if pretrained.is_some() => {
            let (net, dir) = pretrained.expect("matched");
            let net = net.clone();
            let stages = net.patchcore_stages();
            let reference = BackboneRef::of(&net, dir, &stages)?;
            let mut all = Vec::new();
            let mut dim = 0;
            for (i, p) in train.iter().enumerate() {
                for view in views(read_image(p, hashes)?) {
                    let g = patchcore::backbone_features(&net, &stages, &view, w, h)?;
                    dim = g.dim;
                    all.extend_from_slice(&g.v);
                }
                progress("patch features", i + 1, train.len());
            }
            let features = coreset_of(&all, dim, opts, progress);
            header.feature_dim = Some(dim);
            header.coreset_fraction = Some(opts.coreset_fraction);
            header.pool = !net.is_vit();
            header.backbone = Some(reference);
            backbone = Some((Arc::new(net), stages.to_vec()));
            Data::Patchcore { features, dim }
        }
        Method::Patchcore => {
            let engine = engine.ok_or_else(|| {
                Error::InvalidInput("the patchcore method needs the spec's model".into())
            })?;
            let depth = engine.model.vision_depth();
            let layer = opts.layer.unwrap_or_else(|| default_layer(depth));
            let mut all = Vec::new();
            let mut dim = 0;
            for (i, p) in train.iter().enumerate() {
                for view in views(read_image(p, hashes)?) {
                    let g = patchcore::features(engine, &view, w, h, layer, opts.pool)?;
                    dim = g.dim;
                    all.extend_from_slice(&g.v);
                }
                progress("patch features", i + 1, train.len());
            }
            let features = coreset_of(&all, dim, opts, progress);
            header.model_type = Some(engine.model_type.clone());
            header.vision_depth = Some(depth);
            header.layer = Some(layer);
            header.feature_dim = Some(dim);
            header.coreset_fraction = Some(opts.coreset_fraction);
            Data::Patchcore { features, dim }
        }
    };
    Ok((data, backbone))
}

/// The coreset of the patch features `all` (`dim` values each) that `opts` asks for.
fn coreset_of(all: &[f32], dim: usize, opts: &LearnOptions, progress: Progress) -> Vec<f32> {
    let n = all.len() / dim.max(1);
    let keep = ((n as f64 * opts.coreset_fraction).ceil() as usize).clamp(1, n.max(1));
    let kept = patchcore::coreset(all, dim, keep, opts.seed, |k| progress("coreset", k, keep));
    let mut features = Vec::with_capacity(kept.len() * dim);
    for i in kept {
        features.extend_from_slice(&all[i * dim..(i + 1) * dim]);
    }
    features
}

impl Bank {
    /// The score and map of one image.
    pub fn score(&self, engine: Option<&Engine>, img: &RgbImage) -> Result<Scored> {
        let (w, h) = (self.header.width, self.header.height);
        match &self.data {
            Data::Variation(model) => {
                let map = model.deviation(&Gray::from_rgb(img, w, h));
                let score = map.v.iter().copied().fold(0.0, f32::max);
                Ok(Scored { score, map })
            }
            Data::Padim(gaussians) => {
                let (net, stages) = self.backbone.as_ref().ok_or_else(|| {
                    Error::InvalidInput("a PaDiM bank scores with its backbone".into())
                })?;
                let channels = self.header.channels.as_deref().unwrap_or_default();
                let g = padim::embedding(net, stages, channels, img, w, h)?;
                let (score, map) = gaussians.score(&g, w, h)?;
                Ok(Scored {
                    score,
                    map: Gray { w, h, v: map },
                })
            }
            Data::Patchcore { features, dim } if self.backbone.is_some() => {
                let (net, stages) = self.backbone.as_ref().expect("matched");
                let g = patchcore::backbone_features(net, stages, img, w, h)?;
                if g.dim != *dim {
                    return Err(Error::InvalidInput(format!(
                        "the backbone gave {}-value features, the bank holds {dim}",
                        g.dim
                    )));
                }
                let (score, map) = patchcore::published_score(features, &g, w, h)?;
                Ok(Scored {
                    score,
                    map: Gray { w, h, v: map },
                })
            }
            Data::Patchcore { features, dim } => {
                let engine = engine.ok_or_else(|| {
                    Error::InvalidInput("a patchcore bank scores with its model loaded".into())
                })?;
                self.check_model(engine)?;
                let layer = self.header.layer.unwrap_or(0);
                let g = patchcore::features(engine, img, w, h, layer, self.header.pool)?;
                let d = patchcore::nearest(features, &g.v, *dim)?;
                let score = d.iter().copied().fold(0.0, f32::max);
                Ok(Scored {
                    score,
                    map: Gray {
                        w: g.gw,
                        h: g.gh,
                        v: d,
                    },
                })
            }
        }
    }

    /// A patchcore bank only scores with a tower like the one it was learned with.
    pub fn check_model(&self, engine: &Engine) -> Result<()> {
        let h = &self.header;
        if h.method != Method::Patchcore || h.backbone.is_some() {
            return Ok(());
        }
        let depth = engine.model.vision_depth();
        if h.model_type.as_deref() != Some(engine.model_type.as_str())
            || h.vision_depth != Some(depth)
        {
            return Err(Error::InvalidInput(format!(
                "the anomaly bank was learned on a {} tower of {} blocks; the model is {} with {depth} blocks",
                h.model_type.as_deref().unwrap_or("?"),
                h.vision_depth.unwrap_or(0),
                engine.model_type
            )));
        }
        Ok(())
    }

    /// Writes the bank (to a temporary file beside `path`, then renamed: never half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (w, h) = (self.header.width, self.header.height);
        // (name, shape, little-endian f32 bytes)
        let mut tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = Vec::new();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        match &self.data {
            Data::Variation(m) => {
                tensors.push(("mean", vec![h, w], bytes(&m.mean.v)));
                tensors.push(("spread", vec![h, w], bytes(&m.spread)));
            }
            Data::Patchcore { features, dim } => {
                tensors.push((
                    "features",
                    vec![features.len() / dim, *dim],
                    bytes(features),
                ));
            }
            Data::Padim(g) => {
                let positions = g.gh * g.gw;
                tensors.push(("mean", vec![positions, g.dim], bytes(&g.mean)));
                tensors.push((
                    "cholesky",
                    vec![positions, padim::triangle(g.dim)],
                    bytes(&g.cholesky),
                ));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|v| (name.to_string(), v))
                    .map_err(|e| Error::output(path, e))
            })
            .collect::<Result<_>>()?;
        let header = serde_json::to_string(&self.header).map_err(|e| Error::output(path, e))?;
        let meta = HashMap::from([(HEADER_KEY.to_string(), header)]);
        let bytes =
            safetensors::serialize(views, Some(meta)).map_err(|e| Error::output(path, e))?;
        // Written by us, not safetensors' own writer: its temporary file keeps mode 0600, and a
        // bank must be readable by a service running as another user (the umask decides, as for
        // any file the user writes).
        let tmp = path.with_extension("partial");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads a bank, checking its header against its tensors.
    pub fn load(path: &Path) -> Result<Bank> {
        let bad =
            |msg: String| Error::InvalidInput(format!("anomaly bank {}: {msg}", path.display()));
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        if len > MAX_BANK_BYTES {
            return Err(bad(format!(
                "{len} bytes is over the {MAX_BANK_BYTES}-byte limit"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let header_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(HEADER_KEY))
            .ok_or_else(|| {
                bad(format!(
                    "no `{HEADER_KEY}` header: not written by loupe learn"
                ))
            })?;
        let header: Header =
            serde_json::from_str(header_json).map_err(|e| bad(format!("header: {e}")))?;
        if header.format != FORMAT {
            return Err(bad(format!(
                "format {} (this Loupe reads {FORMAT})",
                header.format
            )));
        }
        let (w, h) = (header.width, header.height);
        if w == 0 || h == 0 || w * h > 1 << 24 || !header.threshold.is_finite() {
            return Err(bad(format!(
                "size {w}x{h} or threshold {} out of range",
                header.threshold
            )));
        }
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("no tensor `{name}`")))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let data = match header.method {
            Method::Variation => {
                let mean = tensor("mean", &[h, w])?;
                let spread = tensor("spread", &[h, w])?;
                if spread.iter().any(|s| s.is_nan() || *s <= 0.0) {
                    return Err(bad("a spread is not positive".into()));
                }
                Data::Variation(VariationModel::new(
                    Gray { w, h, v: mean },
                    spread,
                    header.max_rotation.unwrap_or(0.0).clamp(0.0, 45.0),
                ))
            }
            Method::Patchcore => {
                let dim = header
                    .feature_dim
                    .ok_or_else(|| bad("no feature_dim".into()))?;
                let t = st
                    .tensor("features")
                    .map_err(|_| bad("no tensor `features`".into()))?;
                let n = t.shape().first().copied().unwrap_or(0);
                if n == 0 || header.layer.is_none() && header.backbone.is_none() {
                    return Err(bad(
                        "an empty bank, or neither a layer nor a backbone".into()
                    ));
                }
                Data::Patchcore {
                    features: tensor("features", &[n, dim])?,
                    dim,
                }
            }
            Method::Padim => {
                let (Some(dim), Some([gw, gh]), Some(channels), Some(_)) = (
                    header.feature_dim,
                    header.grid,
                    header.channels.as_ref(),
                    header.backbone.as_ref(),
                ) else {
                    return Err(bad(
                        "a PaDiM bank needs feature_dim, grid, channels and backbone".into(),
                    ));
                };
                if channels.len() != dim || dim == 0 || gw == 0 || gh == 0 || gw * gh > 1 << 20 {
                    return Err(bad(format!(
                        "{} channels for {dim} values, or a grid of {gw}x{gh}",
                        channels.len()
                    )));
                }
                let positions = gw * gh;
                let g = Gaussians {
                    gh,
                    gw,
                    dim,
                    mean: tensor("mean", &[positions, dim])?,
                    cholesky: tensor("cholesky", &[positions, padim::triangle(dim)])?,
                };
                g.check().map_err(bad)?;
                Data::Padim(g)
            }
        };
        let backbone = match (&header.backbone, &data) {
            (Some(r), Data::Patchcore { dim, .. }) => {
                let (net, stages) = load_backbone(r)?;
                let channels: usize = stages.iter().map(|&i| net.stages()[i].channels).sum();
                if channels != *dim {
                    return Err(bad(format!(
                        "features of {dim} values, the backbone's stages give {channels}"
                    )));
                }
                Some((net, stages))
            }
            (Some(r), Data::Padim(_)) => {
                let (net, stages) = load_backbone(r)?;
                let total: usize = stages.iter().map(|&i| net.stages()[i].channels).sum();
                let kept = header.channels.as_deref().unwrap_or_default();
                if let Some(c) = kept.iter().find(|&&c| c >= total) {
                    return Err(bad(format!(
                        "channel {c} of the backbone's stages, which give {total}"
                    )));
                }
                Some((net, stages))
            }
            _ => None,
        };
        Ok(Bank {
            header,
            data,
            backbone,
        })
    }

    /// Features (patchcore) or pixels (variation) the bank holds.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::Variation(m) => m.spread.len(),
            Data::Patchcore { features, dim } => features.len() / dim,
            Data::Padim(g) => g.gh * g.gw,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
