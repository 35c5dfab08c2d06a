//! `loupe eval`: inspect a labelled dataset (MVTec AD layout) and score the spec and model.

use std::path::PathBuf;
use std::process::ExitCode;

use loupe_inspect::eval::{mask_boxes, read_dataset, score, Metrics, Scored};
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
}

pub fn eval(args: EvalArgs) -> Result<ExitCode> {
    let samples = read_dataset(&args.dataset, args.defect_if.as_deref())?;
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
        let truth_boxes = match &s.mask {
            Some(m) => mask_boxes(m)?,
            None => vec![],
        };
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
    std::fs::write(&hp, eval_html(&spec.name, &args.dataset, &metrics, mean_ms))
        .map_err(|e| Error::io(&hp, e))?;
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({"metrics": metrics, "mean_ms_per_image": mean_ms})
        )
        .unwrap_or_default()
    );
    eprintln!(
        "eval: {} | {} | report {}",
        jp.display(),
        hp.display(),
        dir.join("report.html").display()
    );
    Ok(ExitCode::SUCCESS)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn eval_html(spec: &str, dataset: &std::path::Path, m: &Metrics, mean_ms: f64) -> String {
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
        ("AUROC (fail score)", opt(m.auroc, |x| format!("{x:.3}"))),
        (
            "AUROC (anomaly score)",
            opt(m.anomaly_auroc, |x| format!("{x:.3}")),
        ),
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
    h.push_str("</table><h2>Per class</h2><table><tr><th>class</th><th>images</th><th>verdict recall</th><th>class accuracy</th></tr>");
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
