//! One inspection: an image file in, a record out (verdict, boxes in pixels, raw answer, timings), or
//! an error record when the image cannot be read; the batch always goes on.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use loupe_core::generate::{GenerateParams, Generation, Grammar, Prompt, Reuse, SamplingParams};
use loupe_core::image::{ImageInput, Preprocessor, RgbImage};
use loupe_core::tokenize::{Content, Message};
use loupe_core::Engine;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::anomaly::Bank;
use crate::boxes::{BoxConvention, Frame, PixelBox};
use crate::error::{Error, Result};
use crate::schema::verdict_schema;
use crate::spec::{hex, Combine, RefLabel, Spec};
use crate::verdict::{parse_answer, Finding, Outcome};

/// What is reused from one image to the next (`--reuse`, for measuring what reuse saves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReuseMode {
    /// Every image runs the whole prompt: reference images encoded and prefilled again.
    None,
    /// Reference images' vision features are cached by content hash; the prompt is prefilled again.
    Features,
    /// The shared prefix (system prompt, instructions, reference images) is prefilled once and its KV
    /// state reused: each image costs only its own tokens.
    Prefix,
}

impl ReuseMode {
    pub fn parse(s: &str) -> std::result::Result<ReuseMode, String> {
        match s {
            "none" => Ok(ReuseMode::None),
            "features" => Ok(ReuseMode::Features),
            "prefix" => Ok(ReuseMode::Prefix),
            o => Err(format!(
                "--reuse `{o}` is not one of none, features, prefix"
            )),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RecordTimings {
    /// Reading and decoding the file.
    pub read_ms: f64,
    /// Building the shared prefix (first image of a run only).
    pub prefix_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
}

/// Everything known about one inspected image: the JSON Lines row, the audit row, the report card.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    pub time: String,
    pub image: PathBuf,
    pub image_sha256: Option<String>,
    pub spec: String,
    pub spec_sha256: String,
    pub model: String,
    pub weights_sha256: Option<String>,
    /// `null` when `error` is set.
    pub verdict: Option<Outcome>,
    pub model_verdict: Option<Outcome>,
    pub defects: Vec<Finding>,
    /// The model's probability that the part fails, read at its verdict token (for AUROC).
    pub fail_score: Option<f64>,
    pub frame: Option<Frame>,
    pub raw_output: String,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Of `output_tokens`, those the answer's schema forced (not sampled: keys, quotes, braces).
    #[serde(default)]
    pub forced_tokens: usize,
    pub error: Option<String>,
    pub timings: RecordTimings,
    /// The anomaly detector's part, when the spec has `[anomaly]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<AnomalyFinding>,
    /// The prompt text, image placeholders collapsed (for the audit log).
    #[serde(skip)]
    pub prompt: String,
}

/// What the anomaly detector found on one image.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AnomalyFinding {
    pub score: f32,
    pub threshold: f32,
    /// `score > threshold`.
    pub anomalous: bool,
    /// Connected regions of the anomaly map above the threshold (the 16 largest), boxes
    /// `[x1, y1, x2, y2]` in pixels of the image as shown.
    pub regions: Vec<[i64; 4]>,
    pub ms: f64,
    /// The map itself (for the overlay's heatmap; not written).
    #[serde(skip)]
    pub map: Option<crate::anomaly::variation::Gray>,
}

/// `anomaly 7.500 > 5.000` (flagged) or `anomaly 1.200 <= 5.000`: the words of the overlay, the
/// CSV's `reason` and `loupe history`.
pub fn anomaly_summary(score: f64, threshold: f64, flagged: bool) -> String {
    let cmp = if flagged { ">" } else { "<=" };
    format!("anomaly {score:.3} {cmp} {threshold:.3}")
}

/// Each defect class once, in the order first seen, with its count where it repeats (`scratch x2`,
/// `dent`).
pub fn class_counts<'a>(classes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for class in classes {
        match counts.iter_mut().find(|(c, _)| *c == class) {
            Some((_, n)) => *n += 1,
            None => counts.push((class, 1)),
        }
    }
    counts
        .into_iter()
        .map(|(c, n)| {
            if n == 1 {
                c.to_owned()
            } else {
                format!("{c} x{n}")
            }
        })
        .collect()
}

impl AnomalyFinding {
    /// [`anomaly_summary`] of this finding.
    pub fn summary(&self) -> String {
        anomaly_summary(self.score.into(), self.threshold.into(), self.anomalous)
    }
}

impl Record {
    /// Why the part got its verdict, in a few words: the error; the defect classes (`scratch x2,
    /// dent`) and the anomaly score against its threshold when it was flagged; for a fail with
    /// neither, that the model said so; for a pass, `no defect` or the score under its threshold.
    pub fn reason(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        let mut parts = class_counts(self.defects.iter().map(|d| d.class.as_str()));
        match (&self.anomaly, self.verdict) {
            (Some(a), Some(Outcome::Pass)) if parts.is_empty() => parts.push(a.summary()),
            (Some(a), _) if a.anomalous => parts.push(a.summary()),
            _ => {}
        }
        if !parts.is_empty() {
            return parts.join(", ");
        }
        match self.verdict {
            Some(Outcome::Fail) => "the model's verdict, no defect named".into(),
            Some(Outcome::Pass) => "no defect".into(),
            None => "no verdict".into(),
        }
    }
}

/// The class a region gets when it is none of the spec's (`combine = "classify"`).
pub const OTHER: &str = "other";

/// The answer for one flagged region: `{"class": one of the spec's or "other", "note"}`.
pub fn region_schema(spec: &Spec) -> serde_json::Value {
    let mut classes: Vec<&str> = spec.defects.iter().map(|d| d.name.as_str()).collect();
    classes.push(OTHER);
    serde_json::json!({
        "type": "object",
        "properties": {
            "class": {"enum": classes},
            "note": {"type": "string", "maxLength": spec.decoding.max_note_chars}
        },
        "required": ["class", "note"],
        "additionalProperties": false
    })
}

/// The square around `region` (`[x1, y1, x2, y2]`) twice its longer side (at least 32 px), moved
/// inside the image and cut to it.
pub fn crop_around(img: &RgbImage, region: &[i64; 4]) -> RgbImage {
    let (w, h) = (img.width as i64, img.height as i64);
    let side = ((region[2] - region[0]).max(region[3] - region[1]) * 2)
        .max(32)
        .min(w.min(h))
        .max(1);
    let (cx, cy) = ((region[0] + region[2]) / 2, (region[1] + region[3]) / 2);
    let x0 = (cx - side / 2).clamp(0, w - side) as usize;
    let y0 = (cy - side / 2).clamp(0, h - side) as usize;
    let s = side as usize;
    let mut data = Vec::with_capacity(s * s * 3);
    for y in y0..y0 + s {
        let row = (y * img.width + x0) * 3;
        data.extend_from_slice(&img.data[row..row + s * 3]);
    }
    RgbImage {
        width: s,
        height: s,
        data,
        orientation: 1,
    }
}

/// The 4-connected regions of `map` (`w x h`) above `threshold`, largest first, at most `max`, as
/// boxes scaled to an image of `img_w x img_h`.
pub fn regions(
    map: &[f32],
    w: usize,
    h: usize,
    threshold: f32,
    img_w: usize,
    img_h: usize,
    max: usize,
) -> Vec<[i64; 4]> {
    let mut seen = vec![false; map.len()];
    let mut found: Vec<(usize, [usize; 4])> = Vec::new();
    for start in 0..map.len() {
        if seen[start] || map[start].is_nan() || map[start] <= threshold {
            continue;
        }
        let (mut bx, mut size, mut stack) = ([usize::MAX, usize::MAX, 0, 0], 0, vec![start]);
        seen[start] = true;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            size += 1;
            bx = [bx[0].min(x), bx[1].min(y), bx[2].max(x), bx[3].max(y)];
            let mut push = |j: usize| {
                if !seen[j] && map[j] > threshold {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
        found.push((size, bx));
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    let (sx, sy) = (img_w as f64 / w as f64, img_h as f64 / h as f64);
    found
        .into_iter()
        .take(max)
        .map(|(_, b)| {
            [
                (b[0] as f64 * sx).floor() as i64,
                (b[1] as f64 * sy).floor() as i64,
                ((b[2] + 1) as f64 * sx).ceil() as i64,
                ((b[3] + 1) as f64 * sy).ceil() as i64,
            ]
        })
        .collect()
}

pub struct Inspector<'e> {
    pub engine: &'e Engine,
    pub spec: Spec,
    pub convention: BoxConvention,
    pub reuse_mode: ReuseMode,
    /// Model id as recorded (path or hub id) and its weights' hash, when known.
    pub model_id: String,
    pub weights_sha256: Option<String>,
    preprocessor: Preprocessor,
    refs: Vec<ImageInput>,
    reuse: Reuse,
    vision_start: Option<u32>,
    /// The spec's anomaly detector, its threshold (the spec's override, else the bank's) and rule.
    anomaly: Option<(Bank, f32, Combine)>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl<'e> Inspector<'e> {
    pub fn new(engine: &'e Engine, spec: Spec, reuse_mode: ReuseMode) -> Result<Self> {
        let convention = spec
            .box_convention
            .unwrap_or_else(|| BoxConvention::for_model_type(&engine.model_type));
        let preprocessor = engine
            .preprocessor
            .clone()
            .with_pixels(spec.image.min_pixels, spec.image.max_pixels)?;
        let paths: Vec<&Path> = spec.references.iter().map(|r| r.image.as_path()).collect();
        let refs = Engine::load_images(&paths)?;
        // Check the schemas compile before the first image.
        engine.constraint(&Grammar::JsonSchema(verdict_schema(&spec, 1000)))?;
        if spec.anomaly.as_ref().map(|a| a.combine) == Some(Combine::Classify) {
            engine.constraint(&Grammar::JsonSchema(region_schema(&spec)))?;
        }
        let anomaly = match &spec.anomaly {
            None => None,
            Some(a) => {
                if !a.bank.is_file() {
                    return Err(Error::InvalidInput(format!(
                        "{}: the `[anomaly]` bank {} does not exist; write it with `loupe learn \
                         --spec {} GOOD_IMAGES...`",
                        spec.path.display(),
                        a.bank.display(),
                        spec.path.display()
                    )));
                }
                let bank = Bank::load(&a.bank)?;
                bank.check_model(engine)?;
                let threshold = a.threshold.unwrap_or(bank.header.threshold);
                Some((bank, threshold, a.combine))
            }
        };
        Ok(Inspector {
            engine,
            convention,
            reuse_mode,
            model_id: engine.files.dir.display().to_string(),
            weights_sha256: None,
            preprocessor,
            refs,
            reuse: Reuse::default(),
            vision_start: engine.tokenizer.token_to_id("<|vision_start|>"),
            anomaly,
            spec,
        })
    }

    /// The conversation: system prompt, then one user turn with the instructions, each reference
    /// image under its label, and the part to inspect last (so everything before it is a shared prefix).
    fn messages(&self) -> Vec<Message> {
        let mut content = vec![Content::Text {
            text: self.spec.preamble(self.convention),
        }];
        for r in &self.spec.references {
            let label = match &r.label {
                RefLabel::Good => "\nReference: a good part.".to_owned(),
                RefLabel::Defect(c) => format!("\nReference: a part with a {c}."),
            };
            let text = if r.note.is_empty() {
                label
            } else {
                format!("{label} {}", r.note)
            };
            content.push(Content::Text { text });
            content.push(Content::Image);
        }
        content.push(Content::Text {
            text: "\nPart to inspect:".into(),
        });
        content.push(Content::Image);
        let mut m = Vec::new();
        if let Some(s) = &self.spec.system {
            m.push(Message::system(s));
        }
        m.push(Message {
            role: "user".into(),
            content,
        });
        m
    }

    /// The model prompt for one part: the spec's conversation with the references and this image.
    pub fn prompt(&self, part: ImageInput) -> loupe_core::Result<Prompt> {
        let mut images = self.refs.clone();
        images.push(part);
        self.engine
            .prompt_from_messages(&self.messages(), &images, &self.preprocessor)
    }

    /// The spec's decoding settings, the answer constrained to `schema`.
    fn params(&self, schema: serde_json::Value) -> GenerateParams {
        let d = &self.spec.decoding;
        GenerateParams {
            max_tokens: d.max_tokens,
            sampling: SamplingParams {
                temperature: d.temperature,
                seed: d.seed,
                ..SamplingParams::default()
            },
            stop_strings: vec![],
            eos_token_ids: self.engine.eos_token_ids(),
            grammar: Some(Grammar::JsonSchema(schema)),
        }
    }

    fn empty_record(&self, path: &Path) -> Record {
        Record {
            time: now_rfc3339(),
            image: path.to_path_buf(),
            image_sha256: None,
            spec: self.spec.name.clone(),
            spec_sha256: self.spec.sha256.clone(),
            model: self.model_id.clone(),
            weights_sha256: self.weights_sha256.clone(),
            verdict: None,
            model_verdict: None,
            defects: vec![],
            fail_score: None,
            frame: None,
            raw_output: String::new(),
            prompt_tokens: 0,
            output_tokens: 0,
            forced_tokens: 0,
            error: None,
            timings: RecordTimings::default(),
            anomaly: None,
            prompt: String::new(),
        }
    }

    /// Inspects one image file. Problems with the image or the answer become the record's `error`;
    /// the decoded upright image comes back too when it could be read (for the overlay).
    pub fn inspect(&mut self, path: &Path) -> (Record, Option<RgbImage>) {
        let t0 = Instant::now();
        let max = loupe_core::limits::get().image_bytes;
        match loupe_core::limits::read_file(path, max, "image-bytes") {
            Ok(bytes) => self.inspect_bytes(path, &bytes, t0),
            Err(e) => {
                let mut rec = self.empty_record(path);
                rec.error = Some(e.to_string());
                rec.timings.total_ms = ms(t0);
                (rec, None)
            }
        }
    }

    /// Inspects an image already in memory (an upload); `name` is what the record calls it and
    /// `t0` when the work on it began (the total time counts from there).
    pub fn inspect_bytes(
        &mut self,
        name: &Path,
        bytes: &[u8],
        t0: Instant,
    ) -> (Record, Option<RgbImage>) {
        let mut rec = self.empty_record(name);
        let mut upright = None;
        if let Err(e) = self.inspect_into(name, bytes, &mut rec, &mut upright) {
            rec.error = Some(e);
        }
        rec.timings.total_ms = ms(t0);
        (rec, upright)
    }

    /// Inspects decoded pixels (a camera frame, an app's buffer): as [`Self::inspect_bytes`], the
    /// record's `image_sha256` the hash of the RGB bytes.
    pub fn inspect_pixels(
        &mut self,
        name: &Path,
        image: RgbImage,
        t0: Instant,
    ) -> (Record, Option<RgbImage>) {
        let mut rec = self.empty_record(name);
        rec.image_sha256 = Some(hex(&Sha256::digest(&image.data)));
        let mut upright = None;
        let input = ImageInput {
            source: name.to_path_buf(),
            image,
        };
        if let Err(e) = self.inspect_decoded(input, t0, &mut rec, &mut upright) {
            rec.error = Some(e);
        }
        rec.timings.total_ms = ms(t0);
        (rec, upright)
    }

    fn inspect_into(
        &mut self,
        path: &Path,
        bytes: &[u8],
        rec: &mut Record,
        upright: &mut Option<RgbImage>,
    ) -> std::result::Result<(), String> {
        let t = Instant::now();
        rec.image_sha256 = Some(hex(&Sha256::digest(bytes)));
        let image = loupe_core::image::decode(bytes)
            .map_err(|m| format!("image {}: {m}", path.display()))?;
        let input = ImageInput {
            source: path.to_path_buf(),
            image,
        };
        self.inspect_decoded(input, t, rec, upright)
    }

    /// The inspection of an upright image; `t` is when reading it began (for `read_ms`).
    fn inspect_decoded(
        &mut self,
        input: ImageInput,
        t: Instant,
        rec: &mut Record,
        upright: &mut Option<RgbImage>,
    ) -> std::result::Result<(), String> {
        let (mh, mw) = self
            .preprocessor
            .target_size(&input)
            .map_err(|e| e.to_string())?;
        let frame = Frame::new(
            (input.image.width, input.image.height),
            input.image.orientation,
            (mw, mh),
        );
        rec.frame = Some(frame);
        rec.timings.read_ms = ms(t);

        if let Some((bank, threshold, combine)) = &self.anomaly {
            let t = Instant::now();
            let scored = bank
                .score(Some(self.engine), &input.image)
                .map_err(|e| e.to_string())?;
            let anomalous = scored.score > *threshold;
            rec.anomaly = Some(AnomalyFinding {
                score: scored.score,
                threshold: *threshold,
                anomalous,
                regions: regions(
                    &scored.map.v,
                    scored.map.w,
                    scored.map.h,
                    *threshold,
                    input.image.width,
                    input.image.height,
                    16,
                ),
                ms: ms(t),
                map: Some(scored.map),
            });
            if *combine == Combine::Classify && anomalous {
                let regions = rec.anomaly.as_ref().map(|a| a.regions.clone());
                self.classify_regions(&input, &regions.unwrap_or_default(), &frame, rec)?;
                *upright = Some(input.image);
                return Ok(());
            }
            if matches!(*combine, Combine::Anomaly | Combine::Classify) {
                // The detector alone decides: no answer to wait for.
                rec.verdict = Some(if anomalous {
                    Outcome::Fail
                } else {
                    Outcome::Pass
                });
                *upright = Some(input.image);
                return Ok(());
            }
        }

        rec.prompt = self
            .engine
            .template
            .render(&self.messages(), true)
            .map_err(|e| e.to_string())?;
        *upright = Some(input.image.clone());
        let prompt = self.prompt(input).map_err(|e| e.to_string())?;
        let t = Instant::now();
        self.ensure_prefix(&prompt).map_err(|e| e.to_string())?;
        rec.timings.prefix_ms = ms(t);

        let params = self.params(verdict_schema(
            &self.spec,
            self.convention.max_coordinate(&frame),
        ));
        let reuse = match self.reuse_mode {
            ReuseMode::None => None,
            _ => Some(&mut self.reuse),
        };
        let out = self
            .engine
            .generate_with(&prompt, &params, reuse, &mut |_| {})
            .map_err(|e| e.to_string())?;
        rec.raw_output = out.text.clone();
        rec.prompt_tokens = out.prompt_tokens;
        rec.output_tokens = out.tokens.len();
        rec.forced_tokens = out.forced_tokens;
        rec.timings.vision_ms = out.timings.vision_ms;
        rec.timings.prefill_ms = out.timings.prefill_ms;
        rec.timings.decode_ms = out.timings.decode_ms;
        let v = parse_answer(&out.text, &self.spec, self.convention, &frame)?;
        rec.fail_score = self.fail_score(&out, v.model_verdict);
        let flagged = rec.anomaly.as_ref().map(|a| a.anomalous);
        rec.verdict = Some(match (self.anomaly.as_ref().map(|a| a.2), flagged) {
            (Some(Combine::Either), Some(true)) => Outcome::Fail,
            (Some(Combine::Both), Some(false)) => Outcome::Pass,
            _ => v.verdict,
        });
        rec.model_verdict = Some(v.model_verdict);
        rec.defects = v.defects;
        Ok(())
    }

    /// `combine = "classify"` on a flagged part: each region (the largest first, at most
    /// `decoding.max_defects`) is cut out with as much context again around it and the VLM names
    /// its class (or `other`). The part fails unless every region is a class the rule tolerates.
    fn classify_regions(
        &mut self,
        part: &ImageInput,
        regions: &[[i64; 4]],
        frame: &Frame,
        rec: &mut Record,
    ) -> std::result::Result<(), String> {
        let mut content = vec![Content::Text {
            text: self.spec.region_preamble(),
        }];
        content.push(Content::Image);
        let mut messages = Vec::new();
        if let Some(s) = &self.spec.system {
            messages.push(Message::system(s));
        }
        messages.push(Message {
            role: "user".into(),
            content,
        });
        rec.prompt = self
            .engine
            .template
            .render(&messages, true)
            .map_err(|e| e.to_string())?;
        let params = self.params(region_schema(&self.spec));
        let mut answers = Vec::new();
        for r in regions.iter().take(self.spec.decoding.max_defects) {
            let crop = ImageInput {
                source: part.source.clone(),
                image: crop_around(&part.image, r),
            };
            let prompt = self
                .engine
                .prompt_from_messages(&messages, &[crop], &self.preprocessor)
                .map_err(|e| e.to_string())?;
            let out = self
                .engine
                .generate_with(&prompt, &params, None, &mut |_| {})
                .map_err(|e| e.to_string())?;
            rec.prompt_tokens += out.prompt_tokens;
            rec.output_tokens += out.tokens.len();
            rec.forced_tokens += out.forced_tokens;
            rec.timings.vision_ms += out.timings.vision_ms;
            rec.timings.prefill_ms += out.timings.prefill_ms;
            rec.timings.decode_ms += out.timings.decode_ms;
            #[derive(serde::Deserialize)]
            struct Named {
                class: String,
                #[serde(default)]
                note: String,
            }
            let named: Named = serde_json::from_str(&out.text).map_err(|e| {
                format!(
                    "the answer for region {r:?} is not complete ({e}); raise decoding.max_tokens \
                     if it was cut"
                )
            })?;
            let px = PixelBox::ordered(r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64);
            answers.push(out.text);
            rec.defects.push(Finding {
                class: named.class,
                box_model: self.convention.from_pixels(&px, frame),
                box_px: *r,
                box_stored: frame.to_stored(&px).rounded(),
                note: named.note,
                pixel_box: px,
            });
        }
        rec.raw_output = answers.join("\n");
        let tolerated = |c: &str| c != OTHER && !self.spec.rule.fail_on.iter().any(|f| f == c);
        let fail = rec.defects.is_empty() || !rec.defects.iter().all(|d| tolerated(&d.class));
        rec.verdict = Some(if fail { Outcome::Fail } else { Outcome::Pass });
        Ok(())
    }

    /// Prefills the shared prefix on the first image (prefix mode): everything before the part's
    /// image, which is the last one of the prompt.
    fn ensure_prefix(&mut self, prompt: &Prompt) -> loupe_core::Result<()> {
        if self.reuse_mode != ReuseMode::Prefix || self.reuse.prefix.is_some() {
            return Ok(());
        }
        let n_refs = self.refs.len();
        let Some(vs) = self.vision_start else {
            return Ok(());
        };
        let Some(cut) = prompt
            .ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == vs)
            .nth(n_refs)
            .map(|(i, _)| i)
        else {
            return Ok(());
        };
        let prefix = Prompt {
            ids: prompt.ids[..cut].to_vec(),
            pixels: prompt.pixels.images(0..n_refs),
        };
        self.engine.prefill_prefix(&prefix, &mut self.reuse)
    }

    /// The probability of "fail" at the token that chose the verdict. The answer is compact JSON that
    /// starts `{"verdict":"`, so that token is the one covering the next byte.
    fn fail_score(&self, out: &Generation, said: Outcome) -> Option<f64> {
        const AT: usize = r#"{"verdict":""#.len();
        let mut len = 0;
        for (i, &t) in out.tokens.iter().enumerate() {
            len += self.engine.tokenizer.decode(&[t]).ok()?.len();
            if len > AT {
                let p = f64::from(*out.logprobs.get(i)?).exp();
                return Some(match said {
                    Outcome::Fail => p,
                    Outcome::Pass => 1.0 - p,
                });
            }
        }
        None
    }

    /// How many reference images were encoded, and how many times their features were reused.
    pub fn feature_cache_stats(&self) -> (usize, usize) {
        (self.reuse.features.misses, self.reuse.features.hits)
    }
}

/// Image files under `paths` (files as given; folders walked recursively, sorted), by extension.
pub fn collect_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            out.extend(found);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(crate::Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
    }
    Ok(out)
}

pub fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .is_some_and(|e| {
            matches!(
                e.as_str(),
                "jpg" | "jpeg" | "png" | "webp" | "gif" | "bmp" | "tif" | "tiff"
            )
        })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| crate::Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| crate::Error::io(dir, e))?;
        let p = entry.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image_name(&p) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crop_is_twice_the_region_and_stays_inside_the_image() {
        let img = RgbImage {
            width: 100,
            height: 80,
            data: (0..100 * 80 * 3).map(|i| (i % 251) as u8).collect(),
            orientation: 1,
        };
        let c = crop_around(&img, &[40, 30, 60, 40]);
        assert_eq!((c.width, c.height), (40, 40));
        // Centred on (50, 35): the crop starts at (30, 15); its first pixel is that one.
        assert_eq!(
            c.data[..3],
            img.data[(15 * 100 + 30) * 3..(15 * 100 + 30) * 3 + 3]
        );
        // At the corner it is moved inside; a small region still gets 32 px of context.
        let c = crop_around(&img, &[95, 75, 100, 80]);
        assert_eq!((c.width, c.height), (32, 32));
        let last = img.data.len() - 3;
        assert_eq!(c.data[c.data.len() - 3..], img.data[last..]);
        // Bigger than the image: cut to its shorter side.
        assert_eq!(crop_around(&img, &[0, 0, 100, 80]).width, 80);
    }
}
