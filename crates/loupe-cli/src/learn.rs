//! `loupe learn`: an anomaly detector from good images only, written as one bank file, with the
//! threshold calibrated on held-out good images and the calibration table printed.

use std::path::PathBuf;

use loupe_inspect::anomaly::{self, LearnOptions, Method};
use loupe_inspect::eval::{is_mvtec, split};
use loupe_inspect::inspector::collect_images;
use loupe_inspect::{Error, Result, Spec};

use crate::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct LearnArgs {
    /// The inspection spec: its model (patchcore) and its `[anomaly]` bank path (the default --out).
    #[arg(long)]
    pub spec: PathBuf,
    /// Folders or files of good images.
    #[arg(required_unless_present = "dataset")]
    pub good: Vec<PathBuf>,
    /// Learn from a labelled dataset's good images instead: MVTec AD's train/good, or for class
    /// folders and a CSV the --split share of good images drawn with --seed (`loupe eval` with the
    /// same --split and --seed leaves them out).
    #[arg(long, conflicts_with = "good")]
    pub dataset: Option<PathBuf>,
    /// With --dataset (class folders, CSV): the share of good images to learn from.
    #[arg(long, default_value_t = 0.5)]
    pub split: f64,
    /// With --dataset, a CSV of numeric labels: the rule that makes one defective, e.g. '>=0.5'.
    #[arg(long)]
    pub defect_if: Option<String>,
    /// The bank file to write (default: the spec's `anomaly.bank`, else `<spec name>.anomaly.safetensors`
    /// beside the spec).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// variation: an aligned golden template, per-pixel mean and spread, no model (fixtured parts at
    /// a fixed distance, plain surfaces, fast); patchcore: a memory bank of patch features, nearest
    /// neighbour (parts that vary in place and texture; on a pretrained --backbone as published);
    /// padim: a Gaussian per patch position of a pretrained --backbone's features, Mahalanobis
    /// distance (parts fixtured in the same place in every image: learns in one pass, no search).
    #[arg(long, default_value = "patchcore")]
    pub method: String,
    /// Patchcore: where the patch features come from: `vlm` (the spec's model's vision tower), or
    /// the folder of a pretrained backbone in timm's layout (config.json + model.safetensors:
    /// ResNet, Wide-ResNet, EfficientNet B0-B7 and Lite0-4), a torchvision ResNet / Wide-ResNet
    /// .pth file as torch.save writes it (tools/convert_backbone.py converts other .pth files and
    /// the legacy format): PatchCore as published on its two mid-level stages, 3x3 pooled, with the paper's
    /// image-score reweighting and a smoothed map; or a DINOv2 / DINOv3 ViT in Hugging Face's
    /// layout (facebook/dinov2-*, with registers too; facebook/dinov3-vit*): the patch tokens of
    /// four of its later layers. PaDiM: the backbone's folder (required), read at its stages of
    /// stride 4, 8 and 16.
    #[arg(long, default_value = "vlm")]
    pub backbone: String,
    /// PaDiM: the channels of the three stages kept, a random subset drawn with --seed (the paper's
    /// reduction; each position's Gaussian holds channels^2 / 2 values).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Patchcore: the vision tower block the features come from (default: two thirds up the tower).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Side of the square images are brought to (patchcore: a multiple of the tower's patch x merge
    /// size, default 224; variation: default 256).
    #[arg(long)]
    pub size: Option<usize>,
    /// Patchcore: the share of all patch features the coreset keeps.
    #[arg(long, default_value_t = 0.1)]
    pub coreset: f64,
    /// Patchcore: average each patch feature over its 3x3 neighbourhood (PatchCore's local context;
    /// off by default, since a 14-pixel ViT patch is already coarse).
    #[arg(long)]
    pub pool: bool,
    /// The share of good images held out to calibrate the threshold.
    #[arg(long, default_value_t = 0.3)]
    pub holdout: f64,
    /// Calibrate the threshold on these good images (a folder or file; repeatable) instead of a
    /// held-out share: every good image given is then learned from (for comparing with a detector
    /// trained on exactly those images, or a validation set kept apart).
    #[arg(long, conflicts_with = "dataset")]
    pub calibrate_on: Vec<PathBuf>,
    /// The false-alarm rate the threshold bounds on good parts.
    #[arg(long, default_value_t = 0.05)]
    pub far: f64,
    /// The confidence of that bound.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Variation: the largest rotation searched when aligning, in degrees.
    #[arg(long, default_value_t = 5.0)]
    pub max_rotation: f32,
    /// Seed of the held-out split, the coreset's start and projection, and of --split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn learn(args: LearnArgs) -> Result<()> {
    let spec = Spec::load(&args.spec)?;
    let method: Method = args.method.parse().map_err(Error::InvalidInput)?;
    if !(args.max_rotation >= 0.0 && args.max_rotation <= 45.0) {
        return Err(Error::InvalidInput(format!(
            "--max-rotation {} is not between 0 and 45 degrees",
            args.max_rotation
        )));
    }
    let goods = match &args.dataset {
        Some(d) => {
            let share = (!is_mvtec(d)).then_some(args.split);
            let sp = split(d, args.defect_if.as_deref(), share, args.seed)?;
            if sp.train_good.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "{}: no good images to learn from (an MVTec AD folder needs train/good/)",
                    d.display()
                )));
            }
            sp.train_good
        }
        None => collect_images(&args.good)?,
    };
    if goods.is_empty() {
        return Err(Error::InvalidInput(
            "no good images found in the paths given".into(),
        ));
    }
    let backbone = (args.backbone != "vlm").then(|| PathBuf::from(&args.backbone));
    if backbone.is_some() && (method == Method::Variation || args.layer.is_some() || args.pool) {
        return Err(Error::InvalidInput(
            "--backbone is for --method patchcore or padim, which then pick their stages \
             themselves (no --layer or --pool)"
                .into(),
        ));
    }
    if method == Method::Padim && backbone.is_none() {
        return Err(Error::InvalidInput(
            "--method padim runs on a pretrained backbone: name its folder with --backbone DIR"
                .into(),
        ));
    }
    if args.channels.is_some() && method != Method::Padim {
        return Err(Error::InvalidInput(
            "--channels is for --method padim".into(),
        ));
    }
    let engine = match method {
        Method::Patchcore if backbone.is_none() => Some(args.model.load_or(spec.model.as_deref())?),
        Method::Patchcore | Method::Padim | Method::Variation => None,
    };
    let size = match (method, args.size) {
        (_, Some(s)) => s,
        (Method::Patchcore | Method::Padim, None) => 224,
        (Method::Variation, None) => 256,
    };
    if size == 0 || size > 4096 {
        return Err(Error::InvalidInput(format!(
            "--size {size} is not between 1 and 4096"
        )));
    }
    let out = args
        .out
        .clone()
        .or_else(|| spec.anomaly.as_ref().map(|a| a.bank.clone()))
        .unwrap_or_else(|| {
            args.spec
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(format!("{}.anomaly.safetensors", spec.name))
        });
    let opts = LearnOptions {
        method,
        layer: args.layer,
        width: size,
        height: size,
        coreset_fraction: args.coreset,
        pool: args.pool,
        backbone,
        channels: args.channels,
        augment: spec
            .anomaly
            .as_ref()
            .map(|a| a.augment.clone())
            .unwrap_or_default(),
        holdout: args.holdout,
        calibrate_on: if args.calibrate_on.is_empty() {
            None
        } else {
            Some(collect_images(&args.calibrate_on)?)
        },
        far: args.far,
        confidence: args.confidence,
        seed: args.seed,
        max_rotation: args.max_rotation,
    };
    let bar = crate::progress_bar(
        goods.len() as u64,
        "{msg:>20} [{bar:30}] {pos}/{len} {elapsed_precise}",
    );
    let mut progress = |stage: &str, done: usize, total: usize| {
        if bar.message() != stage {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
        }
        bar.set_position(done as u64);
    };
    let t0 = std::time::Instant::now();
    let learned = anomaly::learn(engine.as_ref(), &goods, &opts, &mut progress)?;
    bar.finish_and_clear();
    learned.bank.save(&out)?;
    let h = &learned.bank.header;
    eprintln!(
        "loupe learn: {} good image{} ({} learned from, {} {}) in {:.1} s: {} bank of {} {} -> {}",
        goods.len() + opts.calibrate_on.as_ref().map_or(0, Vec::len),
        if goods.len() + opts.calibrate_on.as_ref().map_or(0, Vec::len) == 1 {
            ""
        } else {
            "s"
        },
        h.trained_on,
        h.calibrated_on,
        if opts.calibrate_on.is_some() {
            "to calibrate on"
        } else {
            "held out"
        },
        t0.elapsed().as_secs_f64(),
        args.method,
        learned.bank.len(),
        match (&h.backbone, method) {
            (Some(b), Method::Padim) => format!(
                "Gaussians of {} channels ({} {})",
                h.feature_dim.unwrap_or(0),
                b.architecture,
                b.stages.join(" + ")
            ),
            (Some(b), _) => format!("features ({} {})", b.architecture, b.stages.join(" + ")),
            (None, Method::Patchcore) => format!("features (layer {})", h.layer.unwrap_or(0)),
            (None, Method::Variation | Method::Padim) => "pixels".to_string(),
        },
        out.display()
    );
    if h.calibrated_on == 0 {
        eprintln!(
            "loupe learn: warning: one good image: none is left to calibrate on. The threshold is \
             the largest score of its {} augmented views, each against the bank learned without \
             it: views of one part are not other good parts, so it bounds no false-alarm rate. \
             Check it on parts, and learn again with more good images ({} held out bound {}% at \
             {} confidence)",
            learned.held_out_scores.len(),
            anomaly::calibrate::images_needed(args.far, args.confidence),
            100.0 * args.far,
            args.confidence
        );
    } else if h.calibration.far > args.far {
        eprintln!(
            "loupe learn: warning: {} held-out good images bound false alarms at {:.0}% only \
             (at {} confidence), not the {}% asked: {} would (the threshold is their largest score)",
            h.calibrated_on,
            100.0 * h.calibration.far,
            args.confidence,
            100.0 * args.far,
            anomaly::calibrate::images_needed(args.far, args.confidence)
        );
    }
    println!(
        "calibration on {} held-out good images, confidence {}:",
        h.calibrated_on, args.confidence
    );
    println!("| false-alarm rate at most | threshold | held-out above it | confidence reached |");
    println!("|---|---|---|---|");
    for row in &learned.table {
        match row {
            Ok(c) => println!(
                "| {:.0}% | {:.4} | {} | {:.3} |",
                c.far * 100.0,
                c.threshold,
                c.exceedances,
                c.achieved
            ),
            Err((far, needed)) => println!(
                "| {:.0}% | - | - | needs {needed} held-out images |",
                far * 100.0
            ),
        }
    }
    let c = &h.calibration;
    if c.n == 0 {
        println!(
            "threshold {:.4}: from one image's own views, no false-alarm rate bounded",
            h.threshold
        );
        return Ok(());
    }
    println!(
        "threshold {:.4}: at most {:.0}% false alarms on good parts with {:.1}% confidence ({} of {} held-out images above it)",
        h.threshold,
        c.far * 100.0,
        c.achieved * 100.0,
        c.exceedances,
        c.n
    );
    Ok(())
}
