//! The inspection spec: one TOML file that says what to look for and how to decide. Paths in it are
//! relative to the file. `examples/inspection.toml` is the commented reference.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::boxes::BoxConvention;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Spanned<String>,
    model: Option<Spanned<String>>,
    system: Option<String>,
    instructions: Spanned<String>,
    #[serde(default)]
    defects: Vec<RawDefect>,
    #[serde(default)]
    references: Vec<RawReference>,
    #[serde(default)]
    image: ImageSettings,
    #[serde(default)]
    decoding: Decoding,
    #[serde(default)]
    rule: RawRule,
    #[serde(default)]
    boxes: RawBoxes,
    anomaly: Option<RawAnomaly>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnomaly {
    bank: Option<Spanned<String>>,
    combine: Option<Spanned<String>>,
    threshold: Option<Spanned<f64>>,
    #[serde(default)]
    augment: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefect {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReference {
    image: Spanned<String>,
    label: Spanned<String>,
    #[serde(default)]
    note: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    fail_on: Option<Spanned<Vec<String>>>,
    min_defects: Option<Spanned<usize>>,
    #[serde(default = "yes")]
    trust_model_verdict: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoxes {
    convention: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// How an anomaly detector's flag and the VLM's verdict make the record's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// The detector alone decides.
    Anomaly,
    /// The VLM alone decides (the detector's score is recorded).
    Vlm,
    /// Fail when either flags the part.
    Either,
    /// Fail only when both do.
    Both,
    /// The detector decides; the VLM is asked which defect class each flagged region is.
    Classify,
}

impl Combine {
    pub fn parse(s: &str) -> Option<Combine> {
        Some(match s {
            "anomaly" => Combine::Anomaly,
            "vlm" => Combine::Vlm,
            "either" => Combine::Either,
            "both" => Combine::Both,
            "classify" => Combine::Classify,
            _ => return None,
        })
    }
}

/// The spec's `[anomaly]` section: the detector `loupe learn` wrote, and how it combines with the VLM.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AnomalySettings {
    /// The bank file (relative to the spec); `loupe learn` writes it.
    pub bank: PathBuf,
    pub combine: Combine,
    /// Overrides the bank's calibrated threshold.
    pub threshold: Option<f32>,
    /// The flips and turns under which a good part still looks good: `loupe learn` learns from
    /// each good image so changed too (a few good images go further).
    pub augment: Vec<Augment>,
}

/// A change of a good image that leaves a good part good (the spec says which hold for its part).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// Mirrored left to right.
    Hflip,
    /// Mirrored top to bottom.
    Vflip,
    /// Turned a quarter clockwise.
    Rot90,
    Rot180,
    /// Turned a quarter counter-clockwise.
    Rot270,
}

impl Augment {
    pub const NAMES: &'static str = "hflip, vflip, rot90, rot180, rot270";

    pub fn parse(s: &str) -> Option<Augment> {
        Some(match s {
            "hflip" => Augment::Hflip,
            "vflip" => Augment::Vflip,
            "rot90" => Augment::Rot90,
            "rot180" => Augment::Rot180,
            "rot270" => Augment::Rot270,
            _ => return None,
        })
    }

    /// `img` so changed.
    pub fn apply(self, img: &loupe_core::image::RgbImage) -> loupe_core::image::RgbImage {
        let (w, h) = (img.width, img.height);
        // The output's size, and for each output pixel the input pixel it shows.
        let (ow, oh) = match self {
            Augment::Rot90 | Augment::Rot270 => (h, w),
            _ => (w, h),
        };
        let mut data = Vec::with_capacity(img.data.len());
        for y in 0..oh {
            for x in 0..ow {
                let (sx, sy) = match self {
                    Augment::Hflip => (w - 1 - x, y),
                    Augment::Vflip => (x, h - 1 - y),
                    Augment::Rot180 => (w - 1 - x, h - 1 - y),
                    Augment::Rot90 => (y, h - 1 - x),
                    Augment::Rot270 => (w - 1 - y, x),
                };
                let at = 3 * (sy * w + sx);
                data.extend_from_slice(&img.data[at..at + 3]);
            }
        }
        loupe_core::image::RgbImage {
            width: ow,
            height: oh,
            data,
            orientation: 1,
        }
    }
}

/// Pixel budget of each image (defaults: the model's preprocessor_config.json).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Decoding {
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
    /// Most defects one answer may list.
    #[serde(default = "default_max_defects")]
    pub max_defects: usize,
    /// Longest note per defect, in characters.
    #[serde(default = "default_max_note")]
    pub max_note_chars: usize,
}

fn default_max_tokens() -> usize {
    512
}
fn default_max_defects() -> usize {
    8
}
fn default_max_note() -> usize {
    80
}

impl Default for Decoding {
    fn default() -> Self {
        Decoding {
            max_tokens: default_max_tokens(),
            temperature: 0.0,
            seed: 0,
            max_defects: default_max_defects(),
            max_note_chars: default_max_note(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DefectClass {
    pub name: String,
    pub description: String,
}

/// What a reference image shows: a good part, or an example of one defect class.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum RefLabel {
    Good,
    Defect(String),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Reference {
    pub image: PathBuf,
    pub label: RefLabel,
    pub note: String,
}

/// How the pass/fail verdict follows from the model's answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rule {
    /// Defect classes that fail a part.
    pub fail_on: Vec<String>,
    /// How many defects of those classes fail a part.
    pub min_defects: usize,
    /// A "fail" from the model fails the part even when it lists no defect of `fail_on`.
    pub trust_model_verdict: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Spec {
    pub path: PathBuf,
    pub name: String,
    /// Model directory (resolved against the spec's folder) or hub id; `None` when the spec leaves it
    /// to `--model`.
    pub model: Option<String>,
    pub system: Option<String>,
    pub instructions: String,
    pub defects: Vec<DefectClass>,
    pub references: Vec<Reference>,
    pub image: ImageSettings,
    pub decoding: Decoding,
    pub rule: Rule,
    /// `None`: from the model's family.
    pub box_convention: Option<BoxConvention>,
    /// SHA-256 of the spec file's bytes (the audit log records it).
    pub sha256: String,
    pub anomaly: Option<AnomalySettings>,
}

/// 1-based line of a byte offset.
fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec> {
        let limits = loupe_core::limits::get();
        let bytes = loupe_core::limits::read_file(path, limits.text_bytes, "text-bytes")?;
        let src = String::from_utf8(bytes).map_err(|e| Error::Spec {
            path: path.into(),
            line: 1,
            msg: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        Spec::parse(&src, path)
    }

    /// Parses a spec's text; `path` names it in errors and anchors its relative paths.
    pub fn parse(src: &str, path: &Path) -> Result<Spec> {
        let err = |offset: usize, msg: String| Error::Spec {
            path: path.to_path_buf(),
            line: line_of(src, offset),
            msg,
        };
        let raw: RawSpec = toml::from_str(src).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let line = line_of(src, span.start);
            let text = src.lines().nth(line - 1).unwrap_or("").trim();
            let msg = e.message().trim().replace('\n', " ");
            if text.is_empty() {
                err(span.start, msg)
            } else {
                err(span.start, format!("`{text}`: {msg}"))
            }
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));

        let name = raw.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err(err(raw.name.span().start, "field `name` is empty".into()));
        }
        if raw.instructions.get_ref().trim().is_empty() {
            return Err(err(
                raw.instructions.span().start,
                "field `instructions` is empty".into(),
            ));
        }
        if raw.defects.is_empty() {
            return Err(err(
                0,
                "no `[[defects]]`: name at least one defect class to look for".into(),
            ));
        }
        let mut defects: Vec<DefectClass> = Vec::new();
        for d in &raw.defects {
            let n = d.name.get_ref().trim();
            if n.is_empty() || n.eq_ignore_ascii_case("good") {
                return Err(err(
                    d.name.span().start,
                    format!("defect `name` `{n}` is empty or reserved"),
                ));
            }
            if defects.iter().any(|x| x.name == n) {
                return Err(err(
                    d.name.span().start,
                    format!("defect `{n}` is named twice"),
                ));
            }
            defects.push(DefectClass {
                name: n.to_owned(),
                description: d.description.trim().to_owned(),
            });
        }
        let is_class = |n: &str| defects.iter().any(|d| d.name == n);
        let class_list = || {
            defects
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };

        let mut references = Vec::new();
        for r in &raw.references {
            let image = dir.join(r.image.get_ref());
            if !image.is_file() {
                return Err(err(
                    r.image.span().start,
                    format!("reference `image` {} does not exist", image.display()),
                ));
            }
            let l = r.label.get_ref().trim();
            let label = if l == "good" {
                RefLabel::Good
            } else if is_class(l) {
                RefLabel::Defect(l.to_owned())
            } else {
                return Err(err(
                    r.label.span().start,
                    format!(
                        "reference `label` `{l}` is neither `good` nor a defect ({})",
                        class_list()
                    ),
                ));
            };
            references.push(Reference {
                image,
                label,
                note: r.note.trim().to_owned(),
            });
        }

        let fail_on = match &raw.rule.fail_on {
            Some(list) => {
                for c in list.get_ref() {
                    if !is_class(c) {
                        return Err(err(
                            list.span().start,
                            format!(
                                "`rule.fail_on` names `{c}`, which is not a defect ({})",
                                class_list()
                            ),
                        ));
                    }
                }
                list.get_ref().clone()
            }
            None => defects.iter().map(|d| d.name.clone()).collect(),
        };
        let min_defects = match &raw.rule.min_defects {
            Some(m) if *m.get_ref() == 0 => {
                return Err(err(
                    m.span().start,
                    "`rule.min_defects` must be at least 1".into(),
                ))
            }
            Some(m) => *m.get_ref(),
            None => 1,
        };
        let box_convention = match &raw.boxes.convention {
            None => None,
            Some(c) if c.get_ref() == "auto" => None,
            Some(c) => Some(BoxConvention::parse(c.get_ref()).map_err(|m| err(c.span().start, m))?),
        };
        let d = &raw.decoding;
        if d.max_tokens == 0 || d.max_defects == 0 || !(0.0..=5.0).contains(&d.temperature) {
            let at = src.find("[decoding]").unwrap_or(0);
            return Err(err(
                at,
                "`decoding`: max_tokens and max_defects must be at least 1, temperature in 0..=5"
                    .into(),
            ));
        }
        if let (Some(lo), Some(hi)) = (raw.image.min_pixels, raw.image.max_pixels) {
            if lo > hi {
                let at = src.find("[image]").unwrap_or(0);
                return Err(err(
                    at,
                    format!("`image.min_pixels` {lo} is larger than `image.max_pixels` {hi}"),
                ));
            }
        }
        let anomaly = match &raw.anomaly {
            None => None,
            Some(a) => {
                let bank = match &a.bank {
                    Some(b) if b.get_ref().trim().is_empty() => {
                        return Err(err(b.span().start, "`anomaly.bank` is empty".into()))
                    }
                    Some(b) => dir.join(b.get_ref()),
                    None => dir.join(format!("{name}.anomaly.safetensors")),
                };
                let combine = match &a.combine {
                    None => Combine::Either,
                    Some(c) => Combine::parse(c.get_ref()).ok_or_else(|| {
                        err(
                            c.span().start,
                            format!(
                                "`anomaly.combine` `{}` is not one of anomaly, vlm, either, both, classify",
                                c.get_ref()
                            ),
                        )
                    })?,
                };
                let threshold = match &a.threshold {
                    Some(t) if !(t.get_ref().is_finite() && *t.get_ref() >= 0.0) => {
                        return Err(err(
                            t.span().start,
                            format!("`anomaly.threshold` {} is not a score (>= 0)", t.get_ref()),
                        ))
                    }
                    Some(t) => Some(*t.get_ref() as f32),
                    None => None,
                };
                let mut augment = Vec::new();
                for name in &a.augment {
                    let aug = Augment::parse(name.get_ref()).ok_or_else(|| {
                        err(
                            name.span().start,
                            format!(
                                "`anomaly.augment` `{}` is not one of {}",
                                name.get_ref(),
                                Augment::NAMES
                            ),
                        )
                    })?;
                    if !augment.contains(&aug) {
                        augment.push(aug);
                    }
                }
                Some(AnomalySettings {
                    bank,
                    combine,
                    threshold,
                    augment,
                })
            }
        };
        let model = raw.model.as_ref().map(|m| {
            let m = m.get_ref();
            let local = dir.join(m);
            if local.exists() {
                // Shown and recorded as a reader writes it, where that names the same folder.
                let tidy = clean(&local);
                let same = std::fs::canonicalize(&tidy).ok() == std::fs::canonicalize(&local).ok();
                if same { tidy } else { local }.display().to_string()
            } else {
                m.clone()
            }
        });
        Ok(Spec {
            path: path.to_path_buf(),
            name,
            model,
            system: raw.system.clone(),
            instructions: raw.instructions.get_ref().trim().to_owned(),
            defects,
            references,
            image: raw.image.clone(),
            decoding: raw.decoding.clone(),
            rule: Rule {
                fail_on,
                min_defects,
                trust_model_verdict: raw.rule.trust_model_verdict,
            },
            box_convention,
            sha256: hex(&Sha256::digest(src.as_bytes())),
            anomaly,
        })
    }

    /// The instructions and the list of defect classes with their descriptions.
    fn instructions_and_classes(&self) -> String {
        let mut s = self.instructions.clone();
        s.push_str("\n\nDefect classes:\n");
        for d in &self.defects {
            if d.description.is_empty() {
                s.push_str(&format!("- {}\n", d.name));
            } else {
                s.push_str(&format!("- {}: {}\n", d.name, d.description));
            }
        }
        s
    }

    /// The question for one flagged region (`combine = "classify"`): the instructions, the classes,
    /// and what to answer.
    pub fn region_preamble(&self) -> String {
        let mut s = self.instructions_and_classes();
        s.push_str(
            "\nAn anomaly detector flagged the middle of this close-up of the part. Which defect \
             class is it? Answer in JSON: {\"class\": one of the classes or \"other\", \"note\"}.",
        );
        s
    }

    /// The text the model reads before the reference images: the instructions, the defect classes,
    /// and the answer format.
    pub fn preamble(&self, convention: BoxConvention) -> String {
        let mut s = self.instructions_and_classes();
        s.push_str(&format!(
            "\nAnswer in JSON: {{\"verdict\": \"pass\" or \"fail\", \"defects\": [{{\"class\", \"box\": [x1, y1, x2, y2], \"note\"}}]}}, boxes {}.",
            convention.describe()
        ));
        s
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` without `.` parts and with each `..` taken against the part before it where there is one
/// (`models/demo/.` is `models/demo`), as a reader writes it; the file system is not asked.
pub fn clean(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            // The root's parent is the root.
            Component::ParentDir if matches!(out.last(), Some(Component::RootDir)) => {}
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clean_drops_dots_and_takes_parents() {
        use super::clean;
        use std::path::Path;
        let c = |p: &str| clean(Path::new(p)).display().to_string();
        assert_eq!(c("models/loupe-parts-demo/."), "models/loupe-parts-demo");
        assert_eq!(c("examples/../tests/fixtures/x"), "tests/fixtures/x");
        assert_eq!(c("./."), ".");
        assert_eq!(c("../a/./b/.."), "../a");
        assert_eq!(c("/a/../../b"), "/b");
    }

    use super::*;

    const GOOD: &str = r#"
name = "washers"
instructions = "Inspect the washer."

[[defects]]
name = "scratch"
description = "a thin line"

[[defects]]
name = "dent"

[rule]
fail_on = ["scratch"]
"#;

    fn parse(src: &str) -> Result<Spec> {
        Spec::parse(src, Path::new("/nonexistent/s.toml"))
    }

    /// Flips and turns move each pixel where they should: a quarter turn four times, a flip
    /// twice, and both flips are a half turn; `augment` parses, drops repeats, and names the
    /// choices on a wrong one.
    #[test]
    fn augmentations_move_pixels_and_parse() {
        let img = loupe_core::image::RgbImage {
            width: 3,
            height: 2,
            data: (0..18).collect(),
            orientation: 1,
        };
        let r = Augment::Rot90.apply(&img);
        assert_eq!((r.width, r.height), (2, 3));
        // Clockwise: the bottom-left pixel (0, 1) comes to the top-left.
        assert_eq!(&r.data[..3], &img.data[9..12]);
        let back = Augment::Rot270.apply(&r);
        assert_eq!(back.data, img.data);
        let mut four = img.clone();
        for _ in 0..4 {
            four = Augment::Rot90.apply(&four);
        }
        assert_eq!(four.data, img.data);
        let both = Augment::Vflip.apply(&Augment::Hflip.apply(&img));
        assert_eq!(both.data, Augment::Rot180.apply(&img).data);
        assert_eq!(
            Augment::Hflip.apply(&Augment::Hflip.apply(&img)).data,
            img.data
        );
        let a = parse(&format!(
            "{GOOD}\n[anomaly]\naugment = [\"hflip\", \"rot90\", \"hflip\"]\n"
        ))
        .unwrap()
        .anomaly
        .unwrap();
        assert_eq!(a.augment, [Augment::Hflip, Augment::Rot90]);
        let e = parse(&format!("{GOOD}\n[anomaly]\naugment = [\"twist\"]\n"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`twist` is not one of hflip, vflip"), "{e}");
    }

    #[test]
    fn anomaly_section_defaults_and_bad_values() {
        assert_eq!(parse(GOOD).unwrap().anomaly, None);
        let a = parse(&format!("{GOOD}\n[anomaly]\n"))
            .unwrap()
            .anomaly
            .unwrap();
        assert_eq!(a.combine, Combine::Either);
        assert!(a.bank.ends_with("washers.anomaly.safetensors"), "{a:?}");
        let a = parse(&format!(
            "{GOOD}\n[anomaly]\nbank = \"b.safetensors\"\ncombine = \"classify\"\nthreshold = 2.5\n"
        ))
        .unwrap()
        .anomaly
        .unwrap();
        assert_eq!((a.combine, a.threshold), (Combine::Classify, Some(2.5)));
        let e = parse(&format!("{GOOD}\n[anomaly]\ncombine = \"maybe\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`anomaly.combine` `maybe`") && e.contains(":16:"),
            "{e}"
        );
        let e = parse(&format!("{GOOD}\n[anomaly]\nthreshold = -1.0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`anomaly.threshold` -1"), "{e}");
        let e = parse(&format!("{GOOD}\n[anomaly]\nbanks = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("banks"), "{e}");
    }

    #[test]
    fn parses_and_fills_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.name, "washers");
        assert_eq!(s.defects.len(), 2);
        assert_eq!(s.rule.fail_on, vec!["scratch"]);
        assert_eq!(s.rule.min_defects, 1);
        assert!(s.rule.trust_model_verdict);
        assert_eq!(s.decoding.max_tokens, 512);
        assert_eq!(s.sha256.len(), 64);
        let p = s.preamble(BoxConvention::Rel1000);
        assert!(
            p.contains("- scratch: a thin line") && p.contains("- dent\n"),
            "{p}"
        );
    }

    fn msg(src: &str) -> String {
        parse(src).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_line_and_field() {
        let m = msg(&GOOD.replace("fail_on = [\"scratch\"]", "fail_on = [\"rust\"]"));
        assert!(
            m.starts_with("/nonexistent/s.toml:13:") && m.contains("`rust`"),
            "{m}"
        );
        let m = msg(&format!("{GOOD}\n[decoding]\ntemperature = \"hot\"\n"));
        assert!(m.contains(":16:") && m.contains("temperature"), "{m}");
        let m = msg(&GOOD.replace("name = \"dent\"", "name = \"scratch\""));
        assert!(m.contains(":10:") && m.contains("named twice"), "{m}");
        let m = msg(&GOOD.replace("[rule]", "[rules]"));
        assert!(m.contains(":12:") && m.contains("rules"), "{m}");
        let m = msg(&format!(
            "{GOOD}\n[[references]]\nimage = \"nope.png\"\nlabel = \"good\"\n"
        ));
        assert!(m.contains(":16:") && m.contains("nope.png"), "{m}");
        let m = msg("name = \"x\"\n");
        assert!(m.contains(":1:") && m.contains("instructions"), "{m}");
        let m = msg(&format!("{GOOD}\n[boxes]\nconvention = \"yolo\"\n"));
        assert!(m.contains(":16:") && m.contains("yolo"), "{m}");
        let m = msg("name = \"x\"\ninstructions = \"y\"\n");
        assert!(m.contains("[[defects]]"), "{m}");
    }
}
