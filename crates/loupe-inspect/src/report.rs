//! Results as files: JSON Lines and CSV written as each image finishes (a crash keeps what was done),
//! overlays, and one self-contained HTML report that works offline.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::inspector::Record;
use crate::verdict::Outcome;

/// The files of one run under `dir`.
pub struct RunOutputs {
    pub dir: PathBuf,
    jsonl: BufWriter<File>,
    csv: csv::Writer<File>,
    cards: Vec<Card>,
}

/// What the HTML report shows of one record.
struct Card {
    record: Record,
    overlay: Option<String>,
    thumbnail: Option<String>,
    /// The overlay with the anomaly heatmap, and its thumbnail.
    heat: Option<String>,
    heat_thumbnail: Option<String>,
}

fn create(path: &Path) -> Result<File> {
    File::create(path).map_err(|e| Error::io(path, e))
}

const CSV_HEADER: [&str; 16] = [
    "image",
    "verdict",
    "model_verdict",
    "defects",
    "classes",
    "boxes",
    "fail_score",
    "error",
    "total_ms",
    "image_sha256",
    "reason",
    "anomaly_score",
    "anomaly_threshold",
    "anomaly_flagged",
    "anomaly_regions",
    "overlay",
];

/// One CSV row; `overlay` is the overlay's path under the output folder (empty without one).
fn csv_row(record: &Record, overlay: Option<&str>) -> [String; 16] {
    let classes: Vec<&str> = record.defects.iter().map(|d| d.class.as_str()).collect();
    let boxes: Vec<String> = record
        .defects
        .iter()
        .map(|d| format!("{:?}", d.box_px))
        .collect();
    let a = record.anomaly.as_ref();
    [
        record.image.display().to_string(),
        record.verdict.map_or("error", Outcome::as_str).to_owned(),
        record.model_verdict.map_or("", Outcome::as_str).to_owned(),
        record.defects.len().to_string(),
        classes.join(";"),
        boxes.join(";"),
        record
            .fail_score
            .map_or(String::new(), |s| format!("{s:.4}")),
        record.error.clone().unwrap_or_default(),
        format!("{:.1}", record.timings.total_ms),
        record.image_sha256.clone().unwrap_or_default(),
        record.reason(),
        a.map_or(String::new(), |a| format!("{:.4}", a.score)),
        a.map_or(String::new(), |a| format!("{:.4}", a.threshold)),
        a.map_or(String::new(), |a| a.anomalous.to_string()),
        a.map_or(String::new(), |a| {
            a.regions
                .iter()
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join(";")
        }),
        overlay.unwrap_or_default().to_owned(),
    ]
}

/// The overlay's name for the `n`th record: its number, then the image's folder and name
/// (`overlays/0003-scratch-001.png` for `.../test/scratch/001.png`), so that images of the same
/// name in class folders stay apart and say which they are.
pub fn overlay_name(n: usize, image: &Path, suffix: &str) -> String {
    // Each part at most 60 characters, so the name stays far below a file system's 255 bytes.
    let part = |p: Option<&std::ffi::OsStr>| {
        p.map(|s| {
            s.to_string_lossy()
                .chars()
                .take(60)
                .map(|c| {
                    if c.is_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .filter(|s| !s.is_empty() && s != "." && s != "..")
    };
    let stem = part(image.file_stem()).unwrap_or_else(|| "image".into());
    match part(image.parent().and_then(Path::file_name)) {
        Some(folder) => format!("overlays/{n:04}-{folder}-{stem}{suffix}.png"),
        None => format!("overlays/{n:04}-{stem}{suffix}.png"),
    }
}

impl RunOutputs {
    pub fn create(dir: &Path) -> Result<RunOutputs> {
        Self::open(dir, Vec::new())
    }

    /// The records of an earlier run's `results.jsonl` in `dir` (none when there is no file); a
    /// line torn by a crash is dropped.
    pub fn read_records(dir: &Path) -> Result<Vec<Record>> {
        let jl = dir.join("results.jsonl");
        let text = match std::fs::read_to_string(&jl) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&jl, e)),
        };
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str::<Record>(line).ok())
            .collect())
    }

    /// Continues the run in `dir` (`--resume`) with `records` kept from it: `results.jsonl` and
    /// `results.csv` are rewritten with them, and new records follow.
    pub fn resume(dir: &Path, records: Vec<Record>) -> Result<RunOutputs> {
        let mut cards = Vec::new();
        for record in records {
            let rel = overlay_name(cards.len(), &record.image, "");
            let heat = overlay_name(cards.len(), &record.image, ".heat");
            // The earlier run's overlays come back into the report with their thumbnails.
            let (overlay, thumbnail) = earlier_overlay(dir, rel);
            let (heat, heat_thumbnail) = earlier_overlay(dir, heat);
            cards.push(Card {
                overlay,
                heat,
                record,
                thumbnail,
                heat_thumbnail,
            });
        }
        Self::open(dir, cards)
    }

    fn open(dir: &Path, cards: Vec<Card>) -> Result<RunOutputs> {
        std::fs::create_dir_all(dir.join("overlays")).map_err(|e| Error::io(dir, e))?;
        let jl = dir.join("results.jsonl");
        let mut jsonl = BufWriter::new(create(&jl)?);
        let cp = dir.join("results.csv");
        let mut csv = csv::Writer::from_writer(create(&cp)?);
        csv.write_record(CSV_HEADER)
            .map_err(|e| Error::output(&cp, e))?;
        for c in &cards {
            let line = serde_json::to_string(&c.record).map_err(|e| Error::output(&jl, e))?;
            writeln!(jsonl, "{line}").map_err(|e| Error::io(&jl, e))?;
            csv.write_record(csv_row(&c.record, c.overlay.as_deref()))
                .map_err(|e| Error::output(&cp, e))?;
        }
        jsonl.flush().map_err(|e| Error::io(&jl, e))?;
        csv.flush().map_err(|e| Error::io(&cp, e))?;
        Ok(RunOutputs {
            dir: dir.to_path_buf(),
            jsonl,
            csv,
            cards,
        })
    }

    /// Adds a record, its overlay when the image could be read, and the overlay with the anomaly
    /// heatmap when there is one (`NNNN-stem.heat.png`; the report toggles between the two).
    pub fn add(
        &mut self,
        record: &Record,
        overlay: Option<&image::RgbImage>,
        heat: Option<&image::RgbImage>,
    ) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::output(&self.dir, e))?;
        let jl = self.dir.join("results.jsonl");
        writeln!(self.jsonl, "{line}").map_err(|e| Error::io(&jl, e))?;
        self.jsonl.flush().map_err(|e| Error::io(&jl, e))?;
        // The CSV row first, as the JSON line: a failure to write a picture loses no row.
        let n = self.cards.len();
        let rel = overlay_name(n, &record.image, "");
        let cp = self.dir.join("results.csv");
        self.csv
            .write_record(csv_row(record, overlay.is_some().then_some(rel.as_str())))
            .map_err(|e| Error::output(&cp, e))?;
        self.csv.flush().map_err(|e| Error::io(&cp, e))?;
        let (overlay, thumbnail) = self.save_overlay(overlay, &rel)?;
        let (heat, heat_thumbnail) =
            self.save_overlay(heat, &overlay_name(n, &record.image, ".heat"))?;
        self.cards.push(Card {
            record: record.clone(),
            overlay,
            thumbnail,
            heat,
            heat_thumbnail,
        });
        Ok(())
    }

    /// Writes an overlay at `rel`: its path and thumbnail, or nothing without an image.
    fn save_overlay(
        &self,
        img: Option<&image::RgbImage>,
        rel: &str,
    ) -> Result<(Option<String>, Option<String>)> {
        let Some(img) = img else {
            return Ok((None, None));
        };
        let path = self.dir.join(rel);
        img.save(&path).map_err(|e| Error::output(&path, e))?;
        let thumb = thumbnail_data_uri(img).map_err(|e| Error::output(&path, e))?;
        Ok((Some(rel.to_owned()), Some(thumb)))
    }

    /// Writes (or rewrites) `report.html` with every record so far; returns its path.
    pub fn write_report(&self, title: &str) -> Result<PathBuf> {
        let path = self.dir.join("report.html");
        let html = render_html(title, &self.cards);
        // Written aside and renamed, so a browser never reads half a report.
        let tmp = self.dir.join(".report.html.tmp");
        std::fs::write(&tmp, html).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// Writes the final report; returns its path.
    pub fn finish(mut self, title: &str) -> Result<PathBuf> {
        self.jsonl
            .flush()
            .map_err(|e| Error::io(self.dir.join("results.jsonl"), e))?;
        self.write_report(title)
    }

    /// The records added so far.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.cards.iter().map(|c| &c.record)
    }
}

/// An overlay an earlier run wrote at `rel` under `dir`, and its thumbnail; nothing where it is
/// missing or unreadable (the card then shows no picture).
fn earlier_overlay(dir: &Path, rel: String) -> (Option<String>, Option<String>) {
    let thumb = image::open(dir.join(&rel))
        .ok()
        .and_then(|img| thumbnail_data_uri(&img.to_rgb8()).ok());
    match thumb {
        Some(t) => (Some(rel), Some(t)),
        None => (None, None),
    }
}

/// A JPEG thumbnail, at most 320 pixels wide, as a `data:` URI.
fn thumbnail_data_uri(img: &image::RgbImage) -> std::result::Result<String, image::ImageError> {
    let w = img.width().min(320);
    let h =
        ((u64::from(img.height()) * u64::from(w)) / u64::from(img.width().max(1))).max(1) as u32;
    let small = image::imageops::resize(img, w, h, image::imageops::FilterType::Triangle);
    let mut buf = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 85);
    small.write_with_encoder(enc)?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&buf)
    ))
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub images: usize,
    pub pass: usize,
    pub fail: usize,
    pub error: usize,
    pub mean_ms: f64,
}

pub fn summarize(records: &[&Record]) -> Summary {
    let mut s = Summary {
        images: records.len(),
        ..Summary::default()
    };
    for r in records {
        match r.verdict {
            Some(Outcome::Pass) => s.pass += 1,
            Some(Outcome::Fail) => s.fail += 1,
            None => s.error += 1,
        }
        s.mean_ms += r.timings.total_ms;
    }
    if s.images > 0 {
        s.mean_ms /= s.images as f64;
    }
    s
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}\
h1{font-size:20px;margin:0 0 4px}.sub{color:#666;margin-bottom:16px}\
.sum{display:flex;gap:12px;margin:12px 0 20px}.sum div{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px}\
.sum b{display:block;font-size:22px}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}\
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}.card img{width:100%;display:block;border-radius:3px}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}\
.pass{background:#168c3c}.fail{background:#c81e1e}.error{background:#6e6e6e}\
.name{font-weight:600;overflow-wrap:anywhere;margin:6px 0 2px}.why{font-size:12px;color:#333}.meta{color:#666;font-size:12px}\
ul{margin:4px 0;padding-left:18px}code{font-size:12px}.toggle{display:block;margin:0 0 12px}\
#heat:checked~.grid img.hv{display:none}#heat:not(:checked)~.grid img.heat{display:none}";

fn render_html(title: &str, cards: &[Card]) -> String {
    let recs: Vec<&Record> = cards.iter().map(|c| &c.record).collect();
    let s = summarize(&recs);
    let mut h = String::new();
    h.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>");
    h.push_str(&escape(title));
    h.push_str("</title><style>");
    h.push_str(STYLE);
    h.push_str("</style></head><body>");
    h.push_str(&format!("<h1>{}</h1>", escape(title)));
    let model = recs.first().map(|r| r.model.as_str()).unwrap_or("");
    h.push_str(&format!(
        "<div class=\"sub\">model <code>{}</code> &middot; {}</div>",
        escape(model),
        escape(&crate::inspector::now_rfc3339())
    ));
    h.push_str(&format!(
        "<div class=\"sum\"><div><b>{}</b>images</div><div><b style=\"color:#168c3c\">{}</b>pass</div>\
<div><b style=\"color:#c81e1e\">{}</b>fail</div><div><b>{}</b>errors</div><div><b>{:.0} ms</b>per image</div></div>",
        s.images, s.pass, s.fail, s.error, s.mean_ms
    ));
    if cards.iter().any(|c| c.heat.is_some()) {
        h.push_str(
            "<input type=\"checkbox\" id=\"heat\" checked><label class=\"toggle\" for=\"heat\"> \
             show the anomaly heatmap</label>",
        );
    }
    h.push_str("<div class=\"grid\">");
    for c in cards {
        let r = &c.record;
        let (cls, word) = match r.verdict {
            Some(Outcome::Pass) => ("pass", "PASS"),
            Some(Outcome::Fail) => ("fail", "FAIL"),
            None => ("error", "ERROR"),
        };
        h.push_str("<div class=\"card\">");
        // Without a heatmap the plain overlay always shows; with one, the toggle picks.
        let plain_class = if c.heat.is_some() { "hv" } else { "plain" };
        for (o, t, class) in [
            (&c.overlay, &c.thumbnail, plain_class),
            (&c.heat, &c.heat_thumbnail, "heat"),
        ] {
            if let (Some(o), Some(t)) = (o, t) {
                h.push_str(&format!(
                    "<a href=\"{}\"><img class=\"{class}\" src=\"{}\" alt=\"overlay\"></a>",
                    escape(o),
                    t
                ));
            }
        }
        // Long paths wrap after a folder, not inside a name.
        h.push_str(&format!(
            "<div class=\"name\">{}</div><span class=\"badge {cls}\">{word}</span> \
             <span class=\"why\">{}</span>",
            escape(&r.image.display().to_string()).replace('/', "/<wbr>"),
            // An error is shown in full below.
            if r.error.is_some() {
                String::new()
            } else {
                escape(&r.reason())
            }
        ));
        if let Some(sc) = r.fail_score {
            h.push_str(&format!(" <span class=\"meta\">fail score {sc:.3}</span>"));
        }
        if let Some(a) = &r.anomaly {
            h.push_str(&format!(
                " <span class=\"meta\">anomaly {:.3} / {:.3}{}</span>",
                a.score,
                a.threshold,
                if a.anomalous { " (flagged)" } else { "" }
            ));
        }
        if let Some(e) = &r.error {
            h.push_str(&format!("<div class=\"meta\">{}</div>", escape(e)));
        }
        if !r.defects.is_empty() {
            h.push_str("<ul>");
            for d in &r.defects {
                let [x1, y1, x2, y2] = d.box_px;
                h.push_str(&format!(
                    "<li><b>{}</b> [{x1}, {y1}, {x2}, {y2}] {}</li>",
                    escape(&d.class),
                    escape(&d.note)
                ));
            }
            h.push_str("</ul>");
        }
        let t = &r.timings;
        h.push_str(&format!(
            "<div class=\"meta\">{:.0} ms (vision {:.0}, prefill {:.0}, decode {:.0}) &middot; {} prompt tokens</div></div>",
            t.total_ms, t.vision_ms, t.prefill_ms, t.decode_ms, r.prompt_tokens
        ));
    }
    h.push_str("</div></body></html>\n");
    h
}
