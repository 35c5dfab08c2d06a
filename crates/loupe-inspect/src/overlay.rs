//! The picture for the technician: the image as shown (EXIF orientation applied), each defect's box
//! outlined in its class colour with its label, and a banner with the verdict.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::inspector::{AnomalyFinding, Record};
#[cfg(test)]
use crate::verdict::Finding;
use crate::verdict::Outcome;

const PASS: Rgb<u8> = Rgb([22, 140, 60]);
const FAIL: Rgb<u8> = Rgb([200, 30, 30]);
const ERROR: Rgb<u8> = Rgb([110, 110, 110]);
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
/// The anomaly detector's regions: a colour no defect class has.
pub const ANOMALY: Rgb<u8> = Rgb([255, 0, 255]);

/// Distinct, colour-blind-friendly colours for defect classes (Okabe-Ito).
pub const PALETTE: [[u8; 3]; 7] = [
    [230, 159, 0],
    [86, 180, 233],
    [204, 121, 167],
    [0, 158, 115],
    [240, 228, 66],
    [0, 114, 178],
    [213, 94, 0],
];

pub fn class_colour(classes: &[String], class: &str) -> Rgb<u8> {
    let i = classes.iter().position(|c| c == class).unwrap_or(0);
    Rgb(PALETTE[i % PALETTE.len()])
}

fn fill(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}

/// Draws `text` with its top-left at `(x, y)`, each font pixel a `scale`-sized square.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + i as i64 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = gx + col * scale;
                    let py = y + row as i64 * scale;
                    fill(img, px, py, px + scale, py + scale, c);
                }
            }
        }
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

fn outline(img: &mut RgbImage, [x1, y1, x2, y2]: [i64; 4], thick: i64, c: Rgb<u8>) {
    fill(img, x1 - thick, y1 - thick, x2 + thick, y1, c);
    fill(img, x1 - thick, y2, x2 + thick, y2 + thick, c);
    fill(img, x1 - thick, y1, x1, y2, c);
    fill(img, x2, y1, x2 + thick, y2, c);
}

/// Tints `body` red where the anomaly map is high: from half the threshold (clear) to twice it
/// (half red), the map scaled to the image.
fn heatmap(body: &mut RgbImage, a: &AnomalyFinding) {
    let Some(map) = &a.map else { return };
    let (w, h) = (body.width() as usize, body.height() as usize);
    if map.w == 0 || map.h == 0 || a.threshold <= 0.0 {
        return;
    }
    for y in 0..h {
        for x in 0..w {
            let v = map.v[(y * map.h / h) * map.w + x * map.w / w];
            let alpha = ((v / a.threshold - 0.5) / 1.5).clamp(0.0, 1.0) * 0.5;
            if alpha > 0.0 {
                let p = body.get_pixel_mut(x as u32, y as u32);
                p.0 = [
                    (p.0[0] as f32 * (1.0 - alpha) + 255.0 * alpha) as u8,
                    (p.0[1] as f32 * (1.0 - alpha)) as u8,
                    (p.0[2] as f32 * (1.0 - alpha)) as u8,
                ];
            }
        }
    }
}

/// Images narrower than this are enlarged (by a whole factor, nearest neighbour) for the overlay, so
/// that boxes, labels and the banner stay legible on a small camera crop.
pub const MIN_WIDTH: u32 = 384;
/// Most banner lines: the verdict and title, then the reason, wrapped.
const MAX_BANNER_LINES: usize = 4;

/// How a `w x h` image is drawn: enlarged `zoom` times, text `scale` pixels per font pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub zoom: u32,
    pub scale: i64,
}

impl Layout {
    pub fn new(w: u32, h: u32) -> Layout {
        // Enlarged no more than to 16 million pixels (a tall sliver stays as it is).
        let pixels = u64::from(w.max(1)) * u64::from(h.max(1));
        let room = ((16u64 << 20) / pixels).max(1);
        let most = (1..=16u32)
            .rev()
            .find(|z| u64::from(*z).pow(2) <= room)
            .unwrap_or(1);
        let zoom = MIN_WIDTH.div_ceil(w.max(1)).clamp(1, most);
        let (zw, zh) = (w * zoom, h * zoom);
        Layout {
            zoom,
            scale: i64::from((zw.min(zh) / 320).max(1)),
        }
    }

    /// Characters of text that fit across `width` pixels.
    fn columns(&self, width: u32) -> usize {
        ((i64::from(width) - 4 * self.scale) / (8 * self.scale)).max(1) as usize
    }
}

/// `text` cut into lines of at most `columns` characters, at spaces where it can be, at most `max`
/// lines (the last one ending in `...` when text was left out).
pub fn wrap(text: &str, columns: usize, max: usize) -> Vec<String> {
    let columns = columns.max(4);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_owned();
        loop {
            let have = line.chars().count();
            let need = word.chars().count() + usize::from(have > 0);
            if have + need <= columns {
                if have > 0 {
                    line.push(' ');
                }
                line.push_str(&word);
                break;
            }
            if have > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word longer than a line is cut.
            let head: String = word.chars().take(columns).collect();
            word = word.chars().skip(columns).collect();
            lines.push(head);
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.len() > max {
        lines.truncate(max);
        if let Some(last) = lines.last_mut() {
            let keep: String = last.chars().take(columns.saturating_sub(3)).collect();
            *last = format!("{keep}...");
        }
    }
    lines
}

/// The banner's lines for an image `width` pixels wide: the verdict and title, then why.
pub fn banner_lines(record: &Record, title: &str, layout: Layout, width: u32) -> Vec<String> {
    let word = match record.verdict {
        Some(Outcome::Pass) => "PASS",
        Some(Outcome::Fail) => "FAIL",
        None => "ERROR",
    };
    let columns = layout.columns(width);
    let mut lines = wrap(&format!("{word}  {title}"), columns, 1);
    lines.extend(wrap(
        &record.reason(),
        columns,
        MAX_BANNER_LINES - lines.len(),
    ));
    lines
}

/// The overlay of one inspected record: the image (enlarged to at least [`MIN_WIDTH`] pixels
/// across), each defect's box in its class colour with its label, the anomaly detector's regions
/// (with `heat`, its map tinted in), under a banner that gives the verdict and always why.
pub fn draw(
    upright: &loupe_core::image::RgbImage,
    record: &Record,
    heat: bool,
    classes: &[String],
    title: &str,
) -> RgbImage {
    let (w0, h0) = (upright.width as u32, upright.height as u32);
    let layout = Layout::new(w0, h0);
    let (zoom, scale) = (layout.zoom, layout.scale);
    let (w, h) = (w0 * zoom, h0 * zoom);
    let mut body =
        RgbImage::from_raw(w0, h0, upright.data.clone()).unwrap_or_else(|| RgbImage::new(w0, h0));
    if zoom > 1 {
        body = image::imageops::resize(&body, w, h, image::imageops::FilterType::Nearest);
    }
    let anomaly = record.anomaly.as_ref();
    if let Some(a) = anomaly.filter(|_| heat) {
        heatmap(&mut body, a);
    }
    let lines = banner_lines(record, title, layout, w);
    let line_h = 10 * scale;
    let banner = line_h * lines.len() as i64 + 2 * scale;
    let mut img = RgbImage::new(w, h + banner as u32);
    image::imageops::replace(&mut img, &body, 0, banner);

    let colour = match record.verdict {
        Some(Outcome::Pass) => PASS,
        Some(Outcome::Fail) => FAIL,
        None => ERROR,
    };
    fill(&mut img, 0, 0, i64::from(w), banner, colour);
    for (i, line) in lines.iter().enumerate() {
        let y = 2 * scale + i as i64 * line_h;
        text(&mut img, 2 * scale, y, line, scale, WHITE);
    }

    let z = i64::from(zoom);
    let at = |b: [i64; 4]| [b[0] * z, b[1] * z + banner, b[2] * z, b[3] * z + banner];
    let thick = 2 * scale;
    if let Some(a) = anomaly.filter(|a| a.anomalous) {
        for r in &a.regions {
            outline(&mut img, at(*r), thick, ANOMALY);
        }
    }
    for d in &record.defects {
        let c = class_colour(classes, &d.class);
        let [x1, y1, x2, y2] = at(d.box_px);
        outline(&mut img, [x1, y1, x2, y2], thick, c);
        let label = &d.class;
        let lw = text_width(label, scale) + 4 * scale;
        let lh = 10 * scale;
        // The label sits above the box, or inside it when the box touches the banner.
        let ly = if y1 - thick - lh >= banner {
            y1 - thick - lh
        } else {
            y1
        };
        let lx = x1.min(i64::from(w) - lw).max(0);
        fill(&mut img, lx, ly, lx + lw, ly + lh, c);
        text(
            &mut img,
            lx + 2 * scale,
            ly + scale,
            label,
            scale,
            Rgb([0, 0, 0]),
        );
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verdict: Option<Outcome>, classes: &[&str], anomaly: Option<(f32, f32)>) -> Record {
        let mut r: Record = serde_json::from_value(serde_json::json!({
            "time": "t", "image": "a.png", "image_sha256": null, "spec": "s", "spec_sha256": "",
            "model": "m", "weights_sha256": null, "verdict": verdict, "model_verdict": null,
            "defects": [], "fail_score": null, "frame": null, "raw_output": "",
            "prompt_tokens": 0, "output_tokens": 0, "error": null,
            "timings": {"read_ms": 0.0, "prefix_ms": 0.0, "vision_ms": 0.0, "prefill_ms": 0.0,
                        "decode_ms": 0.0, "total_ms": 0.0},
        }))
        .unwrap();
        for c in classes {
            r.defects.push(Finding {
                class: (*c).into(),
                box_model: [0.0; 4],
                box_px: [10, 10, 40, 40],
                box_stored: [10, 10, 40, 40],
                note: String::new(),
                pixel_box: Default::default(),
            });
        }
        r.anomaly = anomaly.map(|(score, threshold)| AnomalyFinding {
            score,
            threshold,
            anomalous: score > threshold,
            regions: vec![[50, 50, 70, 70]],
            ms: 0.0,
            map: None,
        });
        r
    }

    #[test]
    fn the_banner_says_why_a_part_failed_and_fits_any_width() {
        let anomalous = record(Some(Outcome::Fail), &[], Some((0.8312, 0.5)));
        let classes = record(Some(Outcome::Fail), &["scratch", "dent", "scratch"], None);
        let pass = record(Some(Outcome::Pass), &[], Some((0.2, 0.5)));
        let title = "washers-line-7-station-b";
        for width in [16u32, 112, 320, 640, 1920] {
            let layout = Layout::new(width, width);
            let zoomed = width * layout.zoom;
            assert!(zoomed >= MIN_WIDTH.min(width * 16), "{width}: {zoomed}");
            for (r, why) in [
                (&anomalous, "anomaly 0.831 > 0.500"),
                (&classes, "scratch x2, dent"),
                (&pass, "anomaly 0.200 <= 0.500"),
            ] {
                let lines = banner_lines(r, title, layout, zoomed);
                let max = lines
                    .iter()
                    .map(|l| text_width(l, layout.scale) + 4 * layout.scale)
                    .max()
                    .unwrap();
                assert!(
                    max <= i64::from(zoomed),
                    "{width}: {lines:?} wider than the image"
                );
                assert!(lines.len() <= MAX_BANNER_LINES, "{lines:?}");
                let all = lines[1..].join(" ");
                assert_eq!(all, why, "{width}");
            }
        }
    }

    #[test]
    fn a_small_image_is_enlarged_with_its_boxes() {
        let img = loupe_core::image::RgbImage {
            width: 112,
            height: 112,
            data: vec![90; 112 * 112 * 3],
            orientation: 1,
        };
        let r = record(Some(Outcome::Fail), &["scratch"], Some((0.9, 0.5)));
        let ov = draw(&img, &r, false, &["scratch".into()], "parts-demo");
        let zoom = Layout::new(112, 112).zoom;
        assert_eq!(zoom, 4);
        assert_eq!(ov.width(), 448);
        let banner = ov.height() - 448;
        // The defect's box [10, 10, 40, 40] is outlined at 4x, the anomaly region at 4x too.
        let scratch = class_colour(&["scratch".into()], "scratch");
        assert_eq!(*ov.get_pixel(40 * 4 + 1, 25 * 4 + banner), scratch);
        assert_eq!(*ov.get_pixel(70 * 4 + 1, 60 * 4 + banner), ANOMALY);
        assert_eq!(ov.get_pixel(25 * 4, 25 * 4 + banner).0, [90, 90, 90]);
    }

    #[test]
    fn a_tall_sliver_is_not_enlarged_past_16_million_pixels() {
        assert_eq!(Layout::new(1, 16 << 20).zoom, 1);
        // 2 x 1 M pixels: 16x would be 512 M; 2x is 8 M, 3x 18 M.
        assert_eq!(Layout::new(2, 1 << 20).zoom, 2);
        assert_eq!(Layout::new(112, 112).zoom, 4);
    }

    #[test]
    fn wrapping_keeps_words_and_marks_what_was_left_out() {
        assert_eq!(wrap("a bb ccc dddd", 6, 4), ["a bb", "ccc", "dddd"]);
        assert_eq!(wrap("abcdefghij", 4, 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one two three four", 5, 2), ["one", "tw..."]);
    }
}
