//! The picture for the technician: the image as shown (EXIF orientation applied), each defect's box
//! outlined in its class colour with its label, and a banner with the verdict.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::inspector::AnomalyFinding;
use crate::verdict::{Finding, Outcome};

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

/// The overlay of one inspected image. `verdict` is `None` for an answer that could not be read.
/// With an anomaly finding, its regions are outlined and, with `heat`, its map tinted in as a
/// heatmap.
pub fn draw(
    upright: &loupe_core::image::RgbImage,
    verdict: Option<Outcome>,
    defects: &[Finding],
    anomaly: Option<&AnomalyFinding>,
    heat: bool,
    classes: &[String],
    title: &str,
) -> RgbImage {
    let (w, h) = (upright.width as u32, upright.height as u32);
    let scale = i64::from((w.min(h) / 320).max(1));
    let banner = 12 * scale;
    let mut img = RgbImage::new(w, h + banner as u32);
    let mut body =
        RgbImage::from_raw(w, h, upright.data.clone()).unwrap_or_else(|| RgbImage::new(w, h));
    if let Some(a) = anomaly.filter(|_| heat) {
        heatmap(&mut body, a);
    }
    image::imageops::replace(&mut img, &body, 0, banner);

    let (colour, word) = match verdict {
        Some(Outcome::Pass) => (PASS, "PASS"),
        Some(Outcome::Fail) => (FAIL, "FAIL"),
        None => (ERROR, "ERROR"),
    };
    fill(&mut img, 0, 0, i64::from(w), banner, colour);
    let n = defects.len();
    let mut line = format!(
        "{word}  {title}  {n} defect{}",
        if n == 1 { "" } else { "s" }
    );
    if let Some(a) = anomaly {
        line.push_str(&format!("  anomaly {:.2}/{:.2}", a.score, a.threshold));
    }
    text(&mut img, 2 * scale, 2 * scale, &line, scale, WHITE);

    let thick = 2 * scale;
    if let Some(a) = anomaly.filter(|a| a.anomalous) {
        for r in &a.regions {
            outline(
                &mut img,
                [r[0], r[1] + banner, r[2], r[3] + banner],
                thick,
                ANOMALY,
            );
        }
    }
    for d in defects {
        let c = class_colour(classes, &d.class);
        let [x1, y1, x2, y2] = d.box_px;
        let (y1, y2) = (y1 + banner, y2 + banner);
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
