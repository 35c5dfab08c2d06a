//! Evaluation on a labelled dataset in the MVTec AD layout: `test/good/*`, `test/<defect>/*` and
//! `ground_truth/<defect>/<name>_mask.png`. Image-level verdict metrics (a defective part is the
//! positive class), a confusion matrix over classes, overkill and miss rates, AUROC of the fail score,
//! and box IoU against the boxes of the masks' connected regions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::boxes::PixelBox;
use crate::error::{Error, Result};

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
    /// The same AUROC of the anomaly detector's score (a spec with `[anomaly]`).
    pub anomaly_auroc: Option<f64>,
    /// Mean over ground-truth boxes of failed defective images of the best IoU with a predicted box.
    pub mean_iou: Option<f64>,
    /// Share of ground-truth boxes (of all defective images) matched by a prediction with IoU >= 0.5.
    pub box_recall_at_50: Option<f64>,
    /// `confusion[truth][predicted]`: predicted is `good` for a pass, the first defect's class for a
    /// fail (`unknown` when the fail lists none), `error` for a failed inspection.
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

/// Mann-Whitney AUROC of `scores` (positives vs negatives), ties counted half.
pub fn auroc(pos: &[f64], neg: &[f64]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for p in pos {
        for n in neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (pos.len() * neg.len()) as f64)
}

pub fn score(samples: &[Scored]) -> Metrics {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    let mut errors = 0;
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut per: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let (mut pos_scores, mut neg_scores) = (Vec::new(), Vec::new());
    let mut all_scored = true;
    let (mut pos_anomaly, mut neg_anomaly, mut all_anomaly) = (Vec::new(), Vec::new(), true);
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
            Some(true) => s
                .predicted_classes
                .first()
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
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
    let good = tn + fp;
    let defective = tp + fn_;
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    Metrics {
        images: samples.len(),
        good,
        defective,
        errors,
        accuracy: ratio(tp + tn, samples.len()),
        precision,
        recall,
        f1: if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        },
        overkill_rate: ratio(fp, good),
        miss_rate: ratio(fn_, defective),
        auroc: if all_scored {
            auroc(&pos_scores, &neg_scores)
        } else {
            None
        },
        anomaly_auroc: if all_anomaly {
            auroc(&pos_anomaly, &neg_anomaly)
        } else {
            None
        },
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
    let classes_dir = if root.join("test").is_dir() {
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

/// Bounding boxes of the 8-connected regions of non-zero pixels of a mask, in pixel coordinates.
pub fn mask_boxes(path: &Path) -> Result<Vec<PixelBox>> {
    let img = image::open(path)
        .map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            msg: format!("cannot read mask: {e}"),
        })?
        .to_luma8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let on: Vec<bool> = img.as_raw().iter().map(|&v| v > 127).collect();
    let mut seen = vec![false; w * h];
    let mut boxes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !on[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if on[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        boxes.push(PixelBox::ordered(
            x0 as f64,
            y0 as f64,
            (x1 + 1) as f64,
            (y1 + 1) as f64,
        ));
    }
    Ok(boxes)
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
        let boxes = mask_boxes(&p).unwrap();
        assert_eq!(
            boxes,
            vec![b(3.0, 2.0, 9.0, 5.0), b(20.0, 10.0, 26.0, 16.0)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
