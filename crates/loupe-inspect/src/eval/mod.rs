//! Evaluation on a labelled dataset (MVTec AD, class folders, or a CSV of labels). Image-level verdict
//! metrics (a defective part is the positive class), a confusion matrix over classes, overkill and
//! miss rates, AUROC and average precision of the fail and anomaly scores, the anomaly detector at its
//! calibrated threshold, pixel AUROC and PRO of the anomaly maps where masks exist, and box IoU
//! against the boxes of the masks' connected regions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::anomaly::variation::Gray;
use crate::boxes::PixelBox;
use crate::error::{Error, Result};

pub mod curves;
pub use curves::{auroc, average_precision, roc};

/// One labelled image.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image: PathBuf,
    /// `good` or the defect folder's name.
    pub class: String,
    pub mask: Option<PathBuf>,
}

/// The truth of a sample and what the inspection said.
#[derive(Debug, Clone)]
pub struct Scored {
    pub class: String,
    pub truth_boxes: Vec<PixelBox>,
    /// `None`: the inspection failed (an error record), counted as a miss or an overkill.
    pub predicted_fail: Option<bool>,
    /// Classes of the predicted defects, in order.
    pub predicted_classes: Vec<String>,
    pub predicted_boxes: Vec<PixelBox>,
    pub fail_score: Option<f64>,
    /// The anomaly detector's score, when the spec has one.
    pub anomaly_score: Option<f64>,
    /// Whether the detector flagged the part (its score above the threshold).
    pub anomalous: Option<bool>,
    /// The anomaly map against the truth mask, on a common grid (pixel AUROC, PRO).
    pub pixels: Option<PixelMap>,
}

/// An anomaly map and the truth mask on the same grid (the image's, at most [`PIXEL_GRID`] on its
/// longer side).
#[derive(Debug, Clone)]
pub struct PixelMap {
    pub w: usize,
    pub h: usize,
    pub score: Vec<f32>,
    pub truth: Vec<bool>,
}

/// The longer side of the grid pixel metrics are computed on.
pub const PIXEL_GRID: usize = 256;

/// The false-positive rate PRO is integrated up to (MVTec AD's protocol).
pub const PRO_MAX_FPR: f64 = 0.3;

impl PixelMap {
    /// `map` (covering the whole upright image of `img_w x img_h`) resized bilinearly to the grid,
    /// unscored (NaN) pixels as 0, and the mask (`None`: a good part, nothing defective) taken by
    /// nearest neighbour.
    pub fn new(
        map: &Gray,
        mask: Option<&image::GrayImage>,
        img_w: usize,
        img_h: usize,
    ) -> PixelMap {
        let scale = (PIXEL_GRID as f64 / img_w.max(img_h).max(1) as f64).min(1.0);
        let w = ((img_w as f64 * scale).round() as usize).max(1);
        let h = ((img_h as f64 * scale).round() as usize).max(1);
        let score = resize_bilinear(map, w, h);
        let truth = match mask {
            None => vec![false; w * h],
            Some(m) => {
                let (mw, mh) = (m.width() as usize, m.height() as usize);
                let mut t = Vec::with_capacity(w * h);
                for y in 0..h {
                    let my = ((y as f64 + 0.5) * mh as f64 / h as f64) as usize;
                    for x in 0..w {
                        let mx = ((x as f64 + 0.5) * mw as f64 / w as f64) as usize;
                        t.push(m.as_raw()[my.min(mh - 1) * mw + mx.min(mw - 1)] > 127);
                    }
                }
                t
            }
        };
        PixelMap { w, h, score, truth }
    }
}

/// Bilinear resize with pixel centres aligned (`align_corners = False`), NaN read as 0.
fn resize_bilinear(g: &Gray, w: usize, h: usize) -> Vec<f32> {
    let at = |x: usize, y: usize| {
        let v = g.v[y * g.w + x];
        if v.is_nan() {
            0.0
        } else {
            v
        }
    };
    let coord = |o: usize, n_out: usize, n_in: usize| {
        let c = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).clamp(0.0, (n_in - 1) as f64);
        let i = c.floor() as usize;
        (i, (i + 1).min(n_in - 1), (c - i as f64) as f32)
    };
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let (y0, y1, fy) = coord(y, h, g.h);
        for x in 0..w {
            let (x0, x1, fx) = coord(x, w, g.w);
            let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
            let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Precision, recall and F1 of "fail", with overkill and miss rates.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Binary {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub overkill_rate: f64,
    pub miss_rate: f64,
}

impl Binary {
    fn new(tp: usize, fp: usize, tn: usize, fn_: usize) -> Binary {
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        Binary {
            precision,
            recall,
            f1: if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            },
            overkill_rate: ratio(fp, tn + fp),
            miss_rate: ratio(fn_, tp + fn_),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassStats {
    pub images: usize,
    /// Defective images of this class that failed (for `good`: good images that passed).
    pub recall: f64,
    /// Images of this class whose first predicted defect (or `good` for a pass) is this class.
    pub class_accuracy: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub images: usize,
    pub good: usize,
    pub defective: usize,
    pub errors: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Good parts rejected / good parts.
    pub overkill_rate: f64,
    /// Defective parts passed / defective parts.
    pub miss_rate: f64,
    /// Area under the ROC curve of the fail score (ties count half); `None` without scores or
    /// without both classes.
    pub auroc: Option<f64>,
    /// Average precision (area under the precision-recall curve) of the fail score.
    pub auprc: Option<f64>,
    /// The same AUROC of the anomaly detector's score (a spec with `[anomaly]`).
    pub anomaly_auroc: Option<f64>,
    pub anomaly_auprc: Option<f64>,
    /// The detector alone at its threshold (the calibrated one, or the spec's override).
    pub anomaly_at_threshold: Option<Binary>,
    /// AUROC over all pixels of the anomaly maps against the masks (every defective image masked).
    pub pixel_auroc: Option<f64>,
    /// Per-region overlap up to a 30% pixel false-positive rate, normalised (MVTec AD's AUPRO).
    pub pro: Option<f64>,
    /// Mean over ground-truth boxes of failed defective images of the best IoU with a predicted box.
    pub mean_iou: Option<f64>,
    /// Share of ground-truth boxes (of all defective images) matched by a prediction with IoU >= 0.5.
    pub box_recall_at_50: Option<f64>,
    /// `confusion[truth][predicted]`: predicted is `good` for a pass, the first defect's class for a
    /// fail, `anomaly` for a fail the detector flagged with no class named, `unknown` for any other
    /// fail that lists none, `error` for a failed inspection.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    pub per_class: BTreeMap<String, ClassStats>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The confusion matrix's class for a part failed by the anomaly detector with no class named.
pub const ANOMALY: &str = "anomaly";

pub fn score(samples: &[Scored]) -> Metrics {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    let mut errors = 0;
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut per: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let (mut pos_scores, mut neg_scores) = (Vec::new(), Vec::new());
    let mut all_scored = true;
    let (mut pos_anomaly, mut neg_anomaly, mut all_anomaly) = (Vec::new(), Vec::new(), true);
    let mut flagged = Some([0usize; 4]);
    let (mut iou_sum, mut iou_n) = (0.0, 0usize);
    let (mut hits, mut gt_total) = (0usize, 0usize);
    for s in samples {
        let defective = s.class != "good";
        let predicted = match s.predicted_fail {
            None => {
                errors += 1;
                "error".to_owned()
            }
            Some(false) => "good".to_owned(),
            Some(true) => match s.predicted_classes.first() {
                Some(class) => class.clone(),
                // Failed by the anomaly detector alone.
                None if s.anomalous == Some(true) => ANOMALY.into(),
                None => "unknown".into(),
            },
        };
        // An error never confirms a part: a defective part is missed, a good part is rejected.
        let said_fail = s.predicted_fail.unwrap_or(!defective);
        match (defective, said_fail) {
            (true, true) => tp += 1,
            (true, false) => fn_ += 1,
            (false, true) => fp += 1,
            (false, false) => tn += 1,
        }
        *confusion
            .entry(s.class.clone())
            .or_default()
            .entry(predicted.clone())
            .or_default() += 1;
        let e = per.entry(s.class.clone()).or_default();
        e.0 += 1;
        if said_fail == defective {
            e.1 += 1;
        }
        if predicted == s.class {
            e.2 += 1;
        }
        match s.fail_score {
            Some(sc) if defective => pos_scores.push(sc),
            Some(sc) => neg_scores.push(sc),
            None => all_scored = false,
        }
        match s.anomaly_score {
            Some(sc) if defective => pos_anomaly.push(sc),
            Some(sc) => neg_anomaly.push(sc),
            None => all_anomaly = false,
        }
        // [tp, fp, tn, fn] of the detector's own flag.
        flagged = match (flagged, s.anomalous) {
            (Some(mut c), Some(a)) => {
                c[match (defective, a) {
                    (true, true) => 0,
                    (false, true) => 1,
                    (false, false) => 2,
                    (true, false) => 3,
                }] += 1;
                Some(c)
            }
            _ => None,
        };
        if defective {
            gt_total += s.truth_boxes.len();
            for t in &s.truth_boxes {
                let best = s
                    .predicted_boxes
                    .iter()
                    .map(|p| p.iou(t))
                    .fold(0.0, f64::max);
                if s.predicted_fail == Some(true) {
                    iou_sum += best;
                    iou_n += 1;
                }
                if best >= 0.5 {
                    hits += 1;
                }
            }
        }
    }
    let verdict = Binary::new(tp, fp, tn, fn_);
    let (pixel_auroc, pro) = pixel_metrics(samples);
    Metrics {
        images: samples.len(),
        good: tn + fp,
        defective: tp + fn_,
        errors,
        accuracy: ratio(tp + tn, samples.len()),
        precision: verdict.precision,
        recall: verdict.recall,
        f1: verdict.f1,
        overkill_rate: verdict.overkill_rate,
        miss_rate: verdict.miss_rate,
        auroc: all_scored
            .then(|| auroc(&pos_scores, &neg_scores))
            .flatten(),
        auprc: all_scored
            .then(|| average_precision(&pos_scores, &neg_scores))
            .flatten(),
        anomaly_auroc: all_anomaly
            .then(|| auroc(&pos_anomaly, &neg_anomaly))
            .flatten(),
        anomaly_auprc: all_anomaly
            .then(|| average_precision(&pos_anomaly, &neg_anomaly))
            .flatten(),
        anomaly_at_threshold: flagged
            .filter(|_| !samples.is_empty())
            .map(|[tp, fp, tn, fn_]| Binary::new(tp, fp, tn, fn_)),
        pixel_auroc,
        pro,
        mean_iou: (iou_n > 0).then(|| iou_sum / iou_n as f64),
        box_recall_at_50: (gt_total > 0).then(|| ratio(hits, gt_total)),
        confusion,
        per_class: per
            .into_iter()
            .map(|(k, (n, ok, cls))| {
                (
                    k,
                    ClassStats {
                        images: n,
                        recall: ratio(ok, n),
                        class_accuracy: ratio(cls, n),
                    },
                )
            })
            .collect(),
    }
}

/// Pixel AUROC and PRO over every image's map, when every image has one (the caller gives a
/// defective image one only with its mask; good images count as all-good pixels).
fn pixel_metrics(samples: &[Scored]) -> (Option<f64>, Option<f64>) {
    if samples.is_empty() || samples.iter().any(|s| s.pixels.is_none()) {
        return (None, None);
    }
    let mut region_px: Vec<curves::RegionPixel> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    for s in samples {
        let Some(p) = &s.pixels else { continue };
        let (labels, n) = components8(&p.truth, p.w, p.h);
        let base = sizes.len() as u32;
        sizes.extend(std::iter::repeat_n(0, n));
        for (i, (&sc, &t)) in p.score.iter().zip(&p.truth).enumerate() {
            if t {
                let r = base + labels[i];
                sizes[r as usize] += 1;
                region_px.push((sc, Some(r)));
            } else {
                region_px.push((sc, None));
            }
        }
    }
    curves::pixel_curves(&mut region_px, &sizes, PRO_MAX_FPR)
}

/// The 8-connected regions of the `on` pixels of a `w x h` grid: each pixel's region index (0 for
/// off pixels too: read it only where `on`), and the number of regions.
pub fn components8(on: &[bool], w: usize, h: usize) -> (Vec<u32>, usize) {
    let mut label = vec![u32::MAX; w * h];
    let mut n = 0u32;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !on[start] || label[start] != u32::MAX {
            continue;
        }
        label[start] = n;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if on[j] && label[j] == u32::MAX {
                        label[j] = n;
                        stack.push(j);
                    }
                }
            }
        }
        n += 1;
    }
    for l in &mut label {
        if *l == u32::MAX {
            *l = 0;
        }
    }
    (label, n as usize)
}

/// The samples of a labelled dataset, in one of three layouts:
/// - MVTec AD: `test/good/`, `test/<defect>/`, masks in `ground_truth/<defect>/<stem>_mask.png`;
/// - class folders: `good/` and one folder per defect class (masks as above when present);
/// - a CSV file with `path` and `label` columns (paths relative to the file): the label a class
///   name, or with `defect_if` (e.g. `>=0.5`) a number, defective when the rule holds.
///
/// Sorted by class then file name (CSV: in file order).
pub fn read_dataset(root: &Path, defect_if: Option<&str>) -> Result<Vec<Sample>> {
    let err = |msg: String| Error::Dataset {
        path: root.to_path_buf(),
        msg,
    };
    if root.is_file() {
        return read_csv(root, defect_if);
    }
    if defect_if.is_some() {
        return Err(err(
            "--defect-if applies to a CSV of labels, not a folder".into()
        ));
    }
    let classes_dir = if is_mvtec(root) {
        root.join("test")
    } else if root.join("good").is_dir() {
        root.to_path_buf()
    } else {
        return Err(err(
            "not a dataset: expected test/good and test/<defect>/ (MVTec AD), good/ and \
             <defect>/ folders, or a CSV file of path,label"
                .into(),
        ));
    };
    let mut classes: Vec<PathBuf> = std::fs::read_dir(&classes_dir)
        .map_err(|e| Error::io(&classes_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "ground_truth"))
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for dir in classes {
        let class = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| crate::inspector::is_image_name(p))
            .collect();
        files.sort();
        for image in files {
            let mask = if class == "good" {
                None
            } else {
                let stem = image
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let m = root
                    .join("ground_truth")
                    .join(&class)
                    .join(format!("{stem}_mask.png"));
                m.is_file().then_some(m)
            };
            out.push(Sample {
                image,
                class: class.clone(),
                mask,
            });
        }
    }
    if out.is_empty() {
        return Err(err(format!("no images under {}", classes_dir.display())));
    }
    if !out.iter().any(|s| s.class == "good") {
        return Err(err("no good images (a `good/` folder)".into()));
    }
    Ok(out)
}

/// Which images of a dataset learning may use, and which the evaluation scores.
#[derive(Debug, Clone)]
pub struct Split {
    /// Good images to learn from (`loupe learn --dataset`).
    pub train_good: Vec<PathBuf>,
    /// The images to evaluate on.
    pub test: Vec<Sample>,
}

/// True for a folder in the MVTec AD layout (a `test/` folder), which keeps its own split.
pub fn is_mvtec(root: &Path) -> bool {
    root.join("test").is_dir()
}

/// Splits a dataset, reproducibly. MVTec AD keeps its own split: `train/good/` to learn from, all of
/// `test/` to evaluate. For class folders and a CSV, `train` (a share between 0 and 1) of the good
/// images, drawn with `seed`, go to learning and the rest to the evaluation; without `train`
/// everything is evaluated.
pub fn split(root: &Path, defect_if: Option<&str>, train: Option<f64>, seed: u64) -> Result<Split> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let err = |msg: String| Error::Dataset {
        path: root.to_path_buf(),
        msg,
    };
    let mut samples = read_dataset(root, defect_if)?;
    if is_mvtec(root) {
        if train.is_some() {
            return Err(err(
                "an MVTec AD folder has its own train/good; --split is for class folders and CSV \
                 files"
                    .into(),
            ));
        }
        let good = root.join("train").join("good");
        let train_good = if good.is_dir() {
            crate::inspector::collect_images(&[good])?
        } else {
            vec![]
        };
        return Ok(Split {
            train_good,
            test: samples,
        });
    }
    let Some(share) = train else {
        return Ok(Split {
            train_good: vec![],
            test: samples,
        });
    };
    if !(share > 0.0 && share < 1.0) {
        return Err(err(format!("--split {share} is not between 0 and 1")));
    }
    let mut good: Vec<usize> = (0..samples.len())
        .filter(|&i| samples[i].class == "good")
        .collect();
    good.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let n = (good.len() as f64 * share).round() as usize;
    if n == 0 || n == good.len() {
        return Err(err(format!(
            "--split {share} of {} good images leaves none to learn from or none to test",
            good.len()
        )));
    }
    let mut to_train = good[..n].to_vec();
    to_train.sort_unstable();
    let mut train_good = Vec::with_capacity(n);
    for &i in to_train.iter().rev() {
        train_good.push(samples.remove(i).image);
    }
    train_good.reverse();
    Ok(Split {
        train_good,
        test: samples,
    })
}

/// A `--defect-if` rule: `>=0.5`, `>0.5`, `<=0.5`, `<0.5` or `==1`.
pub fn parse_rule(rule: &str) -> std::result::Result<(String, f64), String> {
    let r = rule.trim();
    let op = [">=", "<=", "==", ">", "<"]
        .into_iter()
        .find(|op| r.starts_with(op))
        .ok_or_else(|| format!("--defect-if `{rule}`: start with >=, >, <=, < or =="))?;
    let v: f64 = r[op.len()..].trim().parse().map_err(|_| {
        format!(
            "--defect-if `{rule}`: `{}` is not a number",
            r[op.len()..].trim()
        )
    })?;
    Ok((op.to_string(), v))
}

fn rule_holds((op, v): &(String, f64), x: f64) -> bool {
    match op.as_str() {
        ">=" => x >= *v,
        "<=" => x <= *v,
        "==" => x == *v,
        ">" => x > *v,
        _ => x < *v,
    }
}

fn read_csv(path: &Path, defect_if: Option<&str>) -> Result<Vec<Sample>> {
    let err = |line: usize, msg: String| Error::Dataset {
        path: path.to_path_buf(),
        msg: if line > 0 {
            format!("line {line}: {msg}")
        } else {
            msg
        },
    };
    let rule = defect_if
        .map(parse_rule)
        .transpose()
        .map_err(|m| err(0, m))?;
    let limits = loupe_core::limits::get();
    let bytes = loupe_core::limits::read_file(path, limits.text_bytes, "text-bytes")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut rd = csv::Reader::from_reader(bytes.as_slice());
    let headers = rd.headers().map_err(|e| err(1, e.to_string()))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| {
                err(
                    1,
                    format!("no `{name}` column (the header needs path,label)"),
                )
            })
    };
    let (pc, lc) = (col("path")?, col("label")?);
    let mut out = Vec::new();
    for (i, row) in rd.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| err(line, e.to_string()))?;
        let (p, label) = (
            row.get(pc).unwrap_or("").trim(),
            row.get(lc).unwrap_or("").trim(),
        );
        if p.is_empty() {
            return Err(err(line, "empty path".into()));
        }
        let image = dir.join(p);
        if !image.is_file() {
            return Err(err(
                line,
                format!("image {} does not exist", image.display()),
            ));
        }
        let class = match &rule {
            Some(r) => {
                let x: f64 = label.parse().map_err(|_| {
                    err(
                        line,
                        format!("label `{label}` is not a number (--defect-if is set)"),
                    )
                })?;
                if rule_holds(r, x) { "defect" } else { "good" }.to_string()
            }
            None if label.is_empty() => return Err(err(line, "empty label".into())),
            None if label.parse::<f64>().is_ok() => {
                return Err(err(
                    line,
                    format!(
                    "label `{label}` is a number: say which are defective with --defect-if '>=0.5'"
                ),
                ))
            }
            None => label.to_string(),
        };
        out.push(Sample {
            image,
            class,
            mask: None,
        });
    }
    if out.is_empty() {
        return Err(err(0, "no rows".into()));
    }
    if !out.iter().any(|s| s.class == "good") {
        return Err(err(0, "no row is labelled good".into()));
    }
    Ok(out)
}

/// A mask image, in gray.
pub fn read_mask(path: &Path) -> Result<image::GrayImage> {
    Ok(image::open(path)
        .map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            msg: format!("cannot read mask: {e}"),
        })?
        .to_luma8())
}

/// Bounding boxes of the 8-connected regions of non-zero pixels of a mask, in pixel coordinates.
pub fn mask_boxes(img: &image::GrayImage) -> Vec<PixelBox> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let on: Vec<bool> = img.as_raw().iter().map(|&v| v > 127).collect();
    let (labels, n) = components8(&on, w, h);
    let mut b = vec![[usize::MAX, usize::MAX, 0, 0]; n];
    for (i, _) in on.iter().enumerate().filter(|(_, &o)| o) {
        let (x, y, r) = (i % w, i / w, &mut b[labels[i] as usize]);
        *r = [r[0].min(x), r[1].min(y), r[2].max(x), r[3].max(y)];
    }
    b.into_iter()
        .map(|[x0, y0, x1, y1]| {
            PixelBox::ordered(x0 as f64, y0 as f64, (x1 + 1) as f64, (y1 + 1) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x1: f64, y1: f64, x2: f64, y2: f64) -> PixelBox {
        PixelBox::ordered(x1, y1, x2, y2)
    }

    fn s(class: &str, fail: Option<bool>, classes: &[&str], score: f64) -> Scored {
        Scored {
            class: class.into(),
            truth_boxes: vec![],
            predicted_fail: fail,
            predicted_classes: classes.iter().map(|c| c.to_string()).collect(),
            predicted_boxes: vec![],
            fail_score: Some(score),
            anomaly_score: None,
            anomalous: None,
            pixels: None,
        }
    }

    #[test]
    fn reads_all_three_layouts_and_refuses_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let touch = |p: &Path| {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        };
        // MVTec AD, with one mask.
        let mv = tmp.path().join("mvtec");
        for f in [
            "test/good/0.png",
            "test/good/1.png",
            "test/dent/0.png",
            "ground_truth/dent/0_mask.png",
        ] {
            touch(&mv.join(f));
        }
        let s = read_dataset(&mv, None).unwrap();
        let classes: Vec<&str> = s.iter().map(|x| x.class.as_str()).collect();
        assert_eq!(classes, ["dent", "good", "good"]);
        assert!(s[0]
            .mask
            .as_ref()
            .unwrap()
            .ends_with("ground_truth/dent/0_mask.png"));
        // Class folders.
        let cf = tmp.path().join("folders");
        for f in ["good/a.png", "scratch/b.jpg", "scratch/notes.txt"] {
            touch(&cf.join(f));
        }
        let s = read_dataset(&cf, None).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].class.as_str(), s[1].class.as_str()),
            ("good", "scratch")
        );
        // CSV with class names, then with scores.
        let csv = tmp.path().join("labels.csv");
        std::fs::write(
            &csv,
            "path,label\nfolders/good/a.png,good\nfolders/scratch/b.jpg,scratch\n",
        )
        .unwrap();
        let s = read_dataset(&csv, None).unwrap();
        assert_eq!(
            (s[0].class.as_str(), s[1].class.as_str()),
            ("good", "scratch")
        );
        std::fs::write(
            &csv,
            "label,path\n0.1,folders/good/a.png\n0.7,folders/scratch/b.jpg\n",
        )
        .unwrap();
        let s = read_dataset(&csv, Some(">=0.5")).unwrap();
        assert_eq!(
            (s[0].class.as_str(), s[1].class.as_str()),
            ("good", "defect")
        );
        let e = read_dataset(&csv, None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("--defect-if"), "{e}");
        let e = read_dataset(&csv, Some("about 0.5"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--defect-if `about 0.5`"), "{e}");
        std::fs::write(
            &csv,
            "path,label\nfolders/good/a.png,good\nmissing.png,dent\n",
        )
        .unwrap();
        let e = read_dataset(&csv, None).unwrap_err().to_string();
        assert!(
            e.contains("labels.csv") && e.contains("line 3") && e.contains("missing.png"),
            "{e}"
        );
        std::fs::write(&csv, "file,label\nfolders/good/a.png,good\n").unwrap();
        let e = read_dataset(&csv, None).unwrap_err().to_string();
        assert!(e.contains("no `path` column"), "{e}");
        let e = read_dataset(tmp.path(), None).unwrap_err().to_string();
        assert!(e.contains("not a dataset"), "{e}");

        // Splits: MVTec AD keeps its own; class folders split their good images by seed.
        touch(&mv.join("train/good/5.png"));
        let sp = split(&mv, None, None, 0).unwrap();
        assert_eq!((sp.train_good.len(), sp.test.len()), (1, 3));
        assert!(split(&mv, None, Some(0.5), 0).is_err());
        for i in 0..20 {
            touch(&cf.join(format!("good/g{i:02}.png")));
        }
        let a = split(&cf, None, Some(0.5), 7).unwrap();
        // 21 good images: 11 to learn from, 10 and the scratch to test.
        assert_eq!((a.train_good.len(), a.test.len()), (11, 11));
        assert!(a.test.iter().all(|t| !a.train_good.contains(&t.image)));
        let again = split(&cf, None, Some(0.5), 7).unwrap();
        assert_eq!(
            a.train_good, again.train_good,
            "the same seed, the same split"
        );
        let other = split(&cf, None, Some(0.5), 8).unwrap();
        assert_ne!(a.train_good, other.train_good);
        assert_eq!(split(&cf, None, None, 7).unwrap().test.len(), 22);
        let e = split(&cf, None, Some(1.0), 7).unwrap_err().to_string();
        assert!(e.contains("--split 1"), "{e}");
    }

    /// Ten images worked by hand: 4 good (one rejected), 6 defective (one passed, one error).
    #[test]
    fn hand_computed_example() {
        let mut v = vec![
            s("good", Some(false), &[], 0.1),
            s("good", Some(false), &[], 0.2),
            s("good", Some(false), &[], 0.35),
            s("good", Some(true), &["dent"], 0.7),
            s("scratch", Some(true), &["scratch"], 0.9),
            s("scratch", Some(true), &["dent"], 0.8),
            s("scratch", Some(false), &[], 0.3),
            s("dent", Some(true), &["dent"], 0.95),
            s("dent", Some(true), &["dent"], 0.6),
            s("dent", None, &[], 0.5),
        ];
        // Boxes on two defective images: IoU 1.0 and 1/3 (and one truth box on a passed image).
        v[4].truth_boxes = vec![b(0.0, 0.0, 10.0, 10.0)];
        v[4].predicted_boxes = vec![b(0.0, 0.0, 10.0, 10.0)];
        v[5].truth_boxes = vec![b(0.0, 0.0, 10.0, 10.0)];
        v[5].predicted_boxes = vec![b(5.0, 0.0, 15.0, 10.0)];
        v[6].truth_boxes = vec![b(0.0, 0.0, 4.0, 4.0)];
        let m = score(&v);
        // TP = 4 (v4, v5, v7, v8), FN = 2 (v6 passed, v9 error), FP = 1 (v3), TN = 3.
        assert_eq!((m.images, m.good, m.defective, m.errors), (10, 4, 6, 1));
        assert!((m.accuracy - 0.7).abs() < 1e-12);
        assert!((m.precision - 0.8).abs() < 1e-12);
        assert!((m.recall - 4.0 / 6.0).abs() < 1e-12);
        let f1 = 2.0 * 0.8 * (4.0 / 6.0) / (0.8 + 4.0 / 6.0);
        assert!((m.f1 - f1).abs() < 1e-12);
        assert!((m.overkill_rate - 0.25).abs() < 1e-12);
        assert!((m.miss_rate - 2.0 / 6.0).abs() < 1e-12);
        // AUROC: positives {.9,.8,.3,.95,.6,.5} vs negatives {.1,.2,.35,.7}: pairs won = 4+4+2+4+3+3 = 20 of 24.
        assert!((m.auroc.unwrap() - 20.0 / 24.0).abs() < 1e-12);
        // No anomaly scores: no anomaly AUROC. The same scores as anomaly scores: the same AUROC.
        assert_eq!(m.anomaly_auroc, None);
        let with_anomaly: Vec<Scored> = v
            .iter()
            .cloned()
            .map(|mut s| {
                s.anomaly_score = s.fail_score;
                s
            })
            .collect();
        assert_eq!(score(&with_anomaly).anomaly_auroc, m.auroc);
        // Ranked: .95P .9P .8P .7N .6P .5P .35N .3P .2N .1N: AP = (1 + 1 + 1 + 4/5 + 5/6 + 6/8) / 6.
        let ap = (3.0 + 0.8 + 5.0 / 6.0 + 0.75) / 6.0;
        assert!((m.auprc.unwrap() - ap).abs() < 1e-12);
        assert_eq!(m.anomaly_at_threshold, None);
        // Flagged above 0.5: 4 of 6 defective parts (.95 .9 .8 .6) and 1 of 4 good ones (.7).
        let flagged: Vec<Scored> = with_anomaly
            .iter()
            .cloned()
            .map(|mut s| {
                s.anomalous = s.anomaly_score.map(|a| a > 0.5);
                s
            })
            .collect();
        let at = score(&flagged).anomaly_at_threshold.unwrap();
        assert_eq!(at, Binary::new(4, 1, 3, 2));
        assert!((at.precision - 0.8).abs() < 1e-12 && (at.overkill_rate - 0.25).abs() < 1e-12);
        assert_eq!(m.pixel_auroc, None);
        // IoU over truth boxes of failed defective images: (1 + 1/3) / 2; recall@0.5: 1 of 3 truth boxes.
        assert!((m.mean_iou.unwrap() - (1.0 + 1.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((m.box_recall_at_50.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.confusion["scratch"]["scratch"], 1);
        assert_eq!(m.confusion["scratch"]["dent"], 1);
        assert_eq!(m.confusion["scratch"]["good"], 1);
        assert_eq!(m.confusion["dent"]["error"], 1);
        assert_eq!(m.confusion["good"]["dent"], 1);
        let sc = &m.per_class["scratch"];
        assert!(
            (sc.recall - 2.0 / 3.0).abs() < 1e-12 && (sc.class_accuracy - 1.0 / 3.0).abs() < 1e-12
        );
        let g = &m.per_class["good"];
        assert!((g.recall - 0.75).abs() < 1e-12 && (g.class_accuracy - 0.75).abs() < 1e-12);
    }

    /// A part failed by the detector alone has its own column in the confusion matrix; a fail
    /// with neither a class nor a flag stays `unknown`.
    #[test]
    fn detector_only_failures_are_their_own_class() {
        let mut by_detector = s("dent", Some(true), &[], 0.9);
        by_detector.anomalous = Some(true);
        let mut by_model = s("good", Some(true), &[], 0.7);
        by_model.anomalous = Some(false);
        let mut named = s("scratch", Some(true), &["scratch"], 0.8);
        named.anomalous = Some(true);
        let m = score(&[by_detector, by_model, named]);
        assert_eq!(m.confusion["dent"][ANOMALY], 1);
        assert_eq!(m.confusion["good"]["unknown"], 1);
        assert_eq!(m.confusion["scratch"]["scratch"], 1);
    }

    /// Pixel AUROC and PRO over two 2x2 maps: a good part, and a part whose defect is the diagonal
    /// (one 8-connected region of 2 pixels).
    #[test]
    fn pixel_metrics_by_hand() {
        let map = |score: [f32; 4], truth: [bool; 4]| PixelMap {
            w: 2,
            h: 2,
            score: score.to_vec(),
            truth: truth.to_vec(),
        };
        let mut good = s("good", Some(false), &[], 0.1);
        good.pixels = Some(map([0.1, 0.2, 0.3, 0.4], [false; 4]));
        let mut bad = s("dent", Some(true), &["dent"], 0.9);
        bad.pixels = Some(map([0.9, 0.5, 0.05, 0.3], [true, false, false, true]));
        let m = score(&[good.clone(), bad.clone()]);
        // Defect pixels {.9, .3} against {.1 .2 .3 .4 .5 .05}: 6 + (3 + 0.5) of 12 pairs.
        assert!((m.pixel_auroc.unwrap() - 9.5 / 12.0).abs() < 1e-12);
        // Half the region is found before any good pixel, and the rest only after fpr 0.3.
        assert!((m.pro.unwrap() - 0.5).abs() < 1e-9, "{:?}", m.pro);
        // One image without a map: no pixel metrics.
        good.pixels = None;
        assert_eq!(score(&[good, bad]).pixel_auroc, None);
    }

    #[test]
    fn a_map_and_mask_meet_on_the_grid() {
        let dir = tempfile::tempdir().unwrap();
        // A 1024 x 512 image: the grid is 256 x 128. Its mask marks the left half.
        let mut m = image::GrayImage::new(1024, 512);
        for y in 0..512 {
            for x in 0..512 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        let p = dir.path().join("m.png");
        m.save(&p).unwrap();
        let g = Gray {
            w: 2,
            h: 1,
            v: vec![1.0, f32::NAN],
        };
        let pm = PixelMap::new(&g, Some(&read_mask(&p).unwrap()), 1024, 512);
        assert_eq!((pm.w, pm.h), (256, 128));
        assert_eq!(pm.truth.iter().filter(|&&t| t).count(), 128 * 128);
        // The left end reads the first map cell, the right end the unscored one as 0, in between a
        // bilinear ramp.
        assert_eq!((pm.score[0], pm.score[255]), (1.0, 0.0));
        assert!(pm.score[100] > pm.score[150] && pm.score[150] > pm.score[200]);
        assert!(PixelMap::new(&g, None, 4, 4).truth.iter().all(|&t| !t));
    }

    #[test]
    fn mask_regions_become_boxes() {
        let dir = std::env::temp_dir().join(format!("loupe-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = image::GrayImage::new(40, 30);
        for y in 2..5 {
            for x in 3..9 {
                m.put_pixel(x, y, image::Luma([255]));
            }
        }
        // A diagonal line is one region under 8-connectivity.
        for i in 0..6 {
            m.put_pixel(20 + i, 10 + i, image::Luma([255]));
        }
        let p = dir.join("m.png");
        m.save(&p).unwrap();
        let boxes = mask_boxes(&read_mask(&p).unwrap());
        assert_eq!(
            boxes,
            vec![b(3.0, 2.0, 9.0, 5.0), b(20.0, 10.0, 26.0, 16.0)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
