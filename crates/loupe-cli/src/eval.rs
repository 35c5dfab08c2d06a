//! `loupe eval`: inspect a labelled dataset (MVTec AD, class folders, a CSV) and score the spec, the
//! model and the anomaly detector; `eval.html` draws the ROC curves and score histograms as SVG.

use std::path::PathBuf;
use std::process::ExitCode;

use loupe_inspect::eval::{mask_boxes, read_mask, roc, score, split, Metrics, PixelMap, Scored};
use loupe_inspect::report::{escape, RunOutputs};
use loupe_inspect::verdict::Outcome;
use loupe_inspect::{Error, Result};

use crate::inspect::{record, SessionArgs};
use crate::progress_bar;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub session: SessionArgs,
    /// The labelled images: an MVTec AD folder (test/good, test/<defect>/, ground_truth/<defect>/
    /// *_mask.png), a folder of class folders (good/, one per defect), or a CSV of path,label.
    pub dataset: PathBuf,
    /// With a CSV whose labels are numbers: the rule that makes one defective, e.g. '>=0.5'.
    #[arg(long)]
    pub defect_if: Option<String>,
    /// Class folders and CSV: leave out this share of the good images, the ones `loupe learn
    /// --dataset` learned from with the same --split and --seed.
    #[arg(long)]
    pub split: Option<f64>,
    /// Seed of --split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the metrics as one JSON object (eval.json's `metrics` and `mean_ms_per_image`)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(args: EvalArgs) -> Result<ExitCode> {
    let samples = split(
        &args.dataset,
        args.defect_if.as_deref(),
        args.split,
        args.seed,
    )?
    .test;
    let mut session = args.session.open()?;
    let mut outputs = RunOutputs::create(&args.session.out)?;
    let spec = session.spec.clone();
    let mut audit = session.audit.take();
    let mut inspector = session.inspector()?;
    let pb = progress_bar(
        samples.len() as u64,
        "{bar:30} {pos}/{len} images [{elapsed}, eta {eta}]",
    );
    let mut scored = Vec::with_capacity(samples.len());
    let mut rows = Vec::with_capacity(samples.len());
    for s in &samples {
        let (rec, upright) = inspector.inspect(&s.image);
        record(&mut outputs, audit.as_mut(), &spec, &rec, upright.as_ref())?;
        // The mask is read once, for the truth boxes and the pixel metrics.
        let mask = s.mask.as_deref().map(read_mask).transpose()?;
        let truth_boxes = mask.as_ref().map(mask_boxes).unwrap_or_default();
        rows.push(serde_json::json!({
            "image": s.image,
            "class": s.class,
            "verdict": rec.verdict,
            "defects": rec.defects,
            "fail_score": rec.fail_score,
            "anomaly": rec.anomaly,
            "truth_boxes": truth_boxes.iter().map(|b| b.rounded()).collect::<Vec<_>>(),
            "error": rec.error,
        }));
        scored.push(Scored {
            class: s.class.clone(),
            truth_boxes,
            predicted_fail: rec.verdict.map(|v| v == Outcome::Fail),
            predicted_classes: rec.defects.iter().map(|d| d.class.clone()).collect(),
            predicted_boxes: rec.defects.iter().map(|d| d.pixel_box).collect(),
            fail_score: rec.fail_score,
            anomaly_score: rec.anomaly.as_ref().map(|a| a.score as f64),
            anomalous: rec.anomaly.as_ref().map(|a| a.anomalous),
            // Pixel truth is known for good parts and for masked defective ones.
            pixels: match (&rec.anomaly, &rec.frame) {
                (Some(a), Some(f)) if s.class == "good" || mask.is_some() => a
                    .map
                    .as_ref()
                    .map(|m| PixelMap::new(m, mask.as_ref(), f.upright.0, f.upright.1)),
                _ => None,
            },
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    drop(inspector);
    let metrics = score(&scored);
    let mean_ms = outputs.records().map(|r| r.timings.total_ms).sum::<f64>() / samples.len() as f64;
    outputs.finish(&format!("{} — eval", spec.name))?;
    let out = serde_json::json!({
        "dataset": args.dataset,
        "spec": spec.name,
        "model": session.engine.files.dir,
        "mean_ms_per_image": mean_ms,
        "metrics": metrics,
        "images": rows,
    });
    let dir = &args.session.out;
    let jp = dir.join("eval.json");
    let text = serde_json::to_string_pretty(&out).map_err(|e| Error::output(&jp, e))?;
    std::fs::write(&jp, text).map_err(|e| Error::io(&jp, e))?;
    let hp = dir.join("eval.html");
    std::fs::write(
        &hp,
        eval_html(&spec.name, &args.dataset, &metrics, &scored, mean_ms),
    )
    .map_err(|e| Error::io(&hp, e))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"metrics": metrics, "mean_ms_per_image": mean_ms})
        );
    } else {
        print!("{}", summary_table(&metrics, mean_ms));
    }
    eprintln!(
        "eval: {} | {} | report {}",
        jp.display(),
        hp.display(),
        dir.join("report.html").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The metrics as a person reads them in a terminal: counts, the verdict's and the detector's
/// rates side by side, the curves' areas, boxes, and the confusion matrix.
fn summary_table(m: &Metrics, mean_ms: f64) -> String {
    let opt = |x: Option<f64>| x.map_or("-".to_owned(), f3);
    let mut t = format!(
        "{} images: {} good, {} defective, {} errors | {mean_ms:.0} ms per image\n\n",
        m.images, m.good, m.defective, m.errors
    );
    let det = m.anomaly_at_threshold.as_ref();
    let d = |f: fn(&loupe_inspect::eval::Binary) -> f64, p: fn(f64) -> String| {
        det.map_or("-".to_owned(), |b| p(f(b)))
    };
    t += &format!("{:<22}{:>10}{:>12}\n", "", "verdict", "detector");
    let rows: [(&str, String, String); 8] = [
        ("accuracy", pct(m.accuracy), "-".into()),
        ("precision", f3(m.precision), d(|b| b.precision, f3)),
        ("recall", f3(m.recall), d(|b| b.recall, f3)),
        ("F1", f3(m.f1), d(|b| b.f1, f3)),
        (
            "overkill (good failed)",
            pct(m.overkill_rate),
            d(|b| b.overkill_rate, pct),
        ),
        (
            "miss (defect passed)",
            pct(m.miss_rate),
            d(|b| b.miss_rate, pct),
        ),
        ("AUROC", opt(m.auroc), opt(m.anomaly_auroc)),
        ("AUPRC", opt(m.auprc), opt(m.anomaly_auprc)),
    ];
    for (name, v, a) in rows {
        t += &format!("{name:<22}{v:>10}{a:>12}\n");
    }
    if m.pixel_auroc.is_some() || m.pro.is_some() {
        t += &format!("pixel AUROC {} | PRO {}\n", opt(m.pixel_auroc), opt(m.pro));
    }
    if m.mean_iou.is_some() || m.box_recall_at_50.is_some() {
        t += &format!(
            "boxes: mean IoU {} | recall at IoU 0.5 {}\n",
            opt(m.mean_iou),
            opt(m.box_recall_at_50)
        );
    }
    // Confusion matrix: truth down, predicted across.
    let mut predicted: Vec<&str> = Vec::new();
    for row in m.confusion.values() {
        for p in row.keys() {
            if !predicted.contains(&p.as_str()) {
                predicted.push(p);
            }
        }
    }
    predicted.sort_by_key(|p| (*p != "good", *p));
    let w = m
        .confusion
        .keys()
        .map(String::len)
        .chain(predicted.iter().map(|p| p.len()))
        .max()
        .unwrap_or(5)
        .max(5)
        + 2;
    t += &format!("\nconfusion (truth down, predicted across)\n{:<w$}", "");
    for p in &predicted {
        t += &format!("{p:>w$}");
    }
    t += "\n";
    for (truth, row) in &m.confusion {
        t += &format!("{truth:<w$}");
        for p in &predicted {
            t += &format!("{:>w$}", row.get(*p).copied().unwrap_or(0));
        }
        t += "\n";
    }
    t
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

/// The scores of defective and of good parts, or both empty when any image has none.
fn scores(scored: &[Scored], f: fn(&Scored) -> Option<f64>) -> (Vec<f64>, Vec<f64>) {
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for s in scored {
        match f(s) {
            Some(v) if s.class == "good" => neg.push(v),
            Some(v) => pos.push(v),
            None => return (vec![], vec![]),
        }
    }
    (pos, neg)
}

const W: f64 = 320.0;
const H: f64 = 240.0;
const PAD: f64 = 36.0;

fn svg_frame(title: &str, x_label: &str, y_label: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         style=\"margin-right:24px;font:11px system-ui,sans-serif\">\
         <rect x=\"{PAD}\" y=\"8\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>\
         <text x=\"{cx}\" y=\"{by}\" text-anchor=\"middle\">{x_label}</text>\
         <text x=\"10\" y=\"{cy}\" transform=\"rotate(-90 10 {cy})\" text-anchor=\"middle\">{y_label}</text>\
         <text x=\"{cx}\" y=\"22\" text-anchor=\"middle\">{title}</text>",
        w = W + PAD + 8.0,
        h = H + PAD + 8.0,
        cx = PAD + W / 2.0,
        cy = 8.0 + H / 2.0,
        by = H + PAD,
    )
}

/// The ROC curve (false-positive rate across, true-positive rate up) with the chance diagonal.
pub fn roc_svg(pos: &[f64], neg: &[f64]) -> String {
    let pts: Vec<String> = roc(pos, neg)
        .iter()
        .map(|(x, y)| format!("{:.1},{:.1}", PAD + x * W, 8.0 + (1.0 - y) * H))
        .collect();
    let area = loupe_inspect::eval::auroc(pos, neg).unwrap_or(0.0);
    format!(
        "{}<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"8\" stroke=\"#ccc\" stroke-dasharray=\"4\"/>\
         <polyline class=\"roc\" fill=\"none\" stroke=\"#1f6feb\" stroke-width=\"2\" points=\"{}\"/></svg>",
        svg_frame(&format!("ROC, AUROC {area:.3}"), "false-positive rate", "true-positive rate"),
        pts.join(" "),
        b = 8.0 + H,
        r = PAD + W,
    )
}

/// Histograms of the scores of good parts (green) and defective parts (red), 20 bins over the
/// range of all scores, each as a share of its own class.
pub fn histogram_svg(pos: &[f64], neg: &[f64]) -> String {
    const BINS: usize = 20;
    let all = pos.iter().chain(neg);
    let lo = all.clone().copied().fold(f64::INFINITY, f64::min);
    let hi = all.copied().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let hist = |v: &[f64]| {
        let mut c = [0.0f64; BINS];
        for x in v {
            c[(((x - lo) / span * BINS as f64) as usize).min(BINS - 1)] += 1.0 / v.len() as f64;
        }
        c
    };
    let (hp, hn) = (hist(pos), hist(neg));
    let top = hp.iter().chain(&hn).copied().fold(0.0, f64::max).max(1e-9);
    let bw = W / BINS as f64;
    let mut bars = String::new();
    for (c, colour) in [(&hn, "#2da44e"), (&hp, "#cf222e")] {
        for (i, v) in c.iter().enumerate().filter(|(_, v)| **v > 0.0) {
            let bh = v / top * (H - 24.0);
            bars.push_str(&format!(
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" \
                 fill=\"{colour}\" fill-opacity=\"0.5\"/>",
                PAD + i as f64 * bw,
                8.0 + H - bh,
                bw
            ));
        }
    }
    format!(
        "{}{bars}<text x=\"{PAD}\" y=\"{y}\">{lo:.3}</text><text x=\"{r}\" y=\"{y}\" \
         text-anchor=\"end\">{hi:.3}</text></svg>",
        svg_frame(
            "scores: good (green), defective (red)",
            "score",
            "share of class"
        ),
        y = H + 20.0,
        r = PAD + W,
    )
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn eval_html(
    spec: &str,
    dataset: &std::path::Path,
    m: &Metrics,
    scored: &[Scored],
    mean_ms: f64,
) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Loupe eval</title><style>\
body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:10px 0 20px}\
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
</style></head><body>",
    );
    h.push_str(&format!(
        "<h1>{} on {}</h1><p><a href=\"report.html\">per-image report</a></p>",
        escape(spec),
        escape(&dataset.display().to_string())
    ));
    let opt = |x: Option<f64>, f: fn(f64) -> String| x.map_or("n/a".to_owned(), f);
    let rows = [
        (
            "images (good / defective / errors)",
            format!("{} ({} / {} / {})", m.images, m.good, m.defective, m.errors),
        ),
        ("accuracy", pct(m.accuracy)),
        ("precision (fail)", pct(m.precision)),
        ("recall (fail)", pct(m.recall)),
        ("F1", format!("{:.3}", m.f1)),
        ("overkill rate (good parts rejected)", pct(m.overkill_rate)),
        ("miss rate (defective parts passed)", pct(m.miss_rate)),
        ("AUROC (fail score)", opt(m.auroc, f3)),
        ("AUPRC (fail score)", opt(m.auprc, f3)),
        ("AUROC (anomaly score)", opt(m.anomaly_auroc, f3)),
        ("AUPRC (anomaly score)", opt(m.anomaly_auprc, f3)),
        (
            "detector alone at its threshold: F1",
            opt(m.anomaly_at_threshold.as_ref().map(|b| b.f1), f3),
        ),
        (
            "detector alone: overkill / miss",
            m.anomaly_at_threshold.as_ref().map_or("n/a".into(), |b| {
                format!("{} / {}", pct(b.overkill_rate), pct(b.miss_rate))
            }),
        ),
        ("pixel AUROC (anomaly map)", opt(m.pixel_auroc, f3)),
        ("PRO up to 30% pixel FPR", opt(m.pro, f3)),
        (
            "mean box IoU (failed defective images)",
            opt(m.mean_iou, |x| format!("{x:.3}")),
        ),
        ("box recall at IoU 0.5", opt(m.box_recall_at_50, pct)),
        ("time per image", format!("{mean_ms:.0} ms")),
    ];
    h.push_str("<table><tr><th>metric</th><th>value</th></tr>");
    for (k, v) in rows {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(k),
            escape(&v)
        ));
    }
    h.push_str("</table>");
    let curves = [
        ("fail score", scores(scored, |s| s.fail_score)),
        ("anomaly score", scores(scored, |s| s.anomaly_score)),
    ];
    for (name, (pos, neg)) in curves
        .iter()
        .filter(|(_, (p, n))| !p.is_empty() && !n.is_empty())
    {
        h.push_str(&format!(
            "<h2>{name}</h2><p>{}{}</p>",
            roc_svg(pos, neg),
            histogram_svg(pos, neg)
        ));
    }
    h.push_str("<h2>Per class</h2><table><tr><th>class</th><th>images</th><th>verdict recall</th><th>class accuracy</th></tr>");
    for (c, s) in &m.per_class {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(c),
            s.images,
            pct(s.recall),
            pct(s.class_accuracy)
        ));
    }
    let mut cols: Vec<&String> = m.confusion.values().flat_map(|r| r.keys()).collect();
    cols.sort();
    cols.dedup();
    h.push_str("</table><h2>Confusion (rows: truth, columns: predicted)</h2><table><tr><th></th>");
    for c in &cols {
        h.push_str(&format!("<th>{}</th>", escape(c)));
    }
    h.push_str("</tr>");
    for (t, row) in &m.confusion {
        h.push_str(&format!("<tr><td>{}</td>", escape(t)));
        for c in &cols {
            h.push_str(&format!("<td>{}</td>", row.get(*c).copied().unwrap_or(0)));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></body></html>\n");
    h
}
